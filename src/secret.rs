//! A bearer token that never shows itself: `Debug` and `Display` print `***`,
//! so it cannot leak into a log line, an error message or `status()`.

use std::fmt;

/// A secret string; read it only with [`Secret::expose`] where it goes on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
  pub fn new(value: impl Into<String>) -> Self {
    Self(value.into())
  }

  pub fn expose(&self) -> &str {
    &self.0
  }

  /// Replaces every occurrence of the secret in `text` with `***` (defence in depth
  /// for text that comes from outside, such as an error body echoed by a proxy).
  pub fn redact(&self, text: &str) -> String {
    if self.0.len() < 4 || !text.contains(&self.0) {
      return text.to_owned();
    }
    text.replace(&self.0, "***")
  }
}

impl fmt::Debug for Secret {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("***")
  }
}

impl fmt::Display for Secret {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("***")
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn never_prints_itself() {
    let secret = Secret::new("sk-very-secret");
    assert_eq!(format!("{secret} {secret:?}"), "*** ***");
    assert_eq!(
      secret.redact("echo: Bearer sk-very-secret!"),
      "echo: Bearer ***!"
    );
    assert_eq!(secret.expose(), "sk-very-secret");
  }
}
