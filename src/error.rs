//! The registrar's one error type, and its single conversion to a JavaScript
//! error, which folds the `source()` chain into "…: caused by …" lines.

use std::error::Error as StdError;
use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug)]
pub enum Error {
  /// An option, a file or another input is not what it must be.
  InvalidInput(String),
  /// mcpd answered with a status outside 2xx.
  Status {
    operation: &'static str,
    status: u16,
    message: String,
  },
  /// The request did not get an answer (connect, TLS, timeout, reset...).
  Transport {
    operation: &'static str,
    source: reqwest::Error,
  },
  /// A file could not be read or written.
  Io {
    context: String,
    source: std::io::Error,
  },
  /// mcpd's answer could not be understood.
  Protocol(String),
  /// The registrar was stopped.
  Stopped,
}

impl Error {
  /// The HTTP status mcpd answered, when that is what went wrong.
  pub fn status(&self) -> Option<u16> {
    match self {
      Error::Status { status, .. } => Some(*status),
      _ => None,
    }
  }

  pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
    Error::Io {
      context: context.into(),
      source,
    }
  }
}

impl fmt::Display for Error {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match self {
      Error::InvalidInput(message) | Error::Protocol(message) => f.write_str(message),
      Error::Status {
        operation,
        status,
        message,
      } => write!(
        f,
        "{operation} failed: mcpd answered HTTP {status}: {message}"
      ),
      Error::Transport { operation, .. } => write!(f, "{operation} failed: no answer from mcpd"),
      Error::Io { context, .. } => f.write_str(context),
      Error::Stopped => f.write_str("registrar is stopped"),
    }
  }
}

impl StdError for Error {
  fn source(&self) -> Option<&(dyn StdError + 'static)> {
    match self {
      Error::Transport { source, .. } => Some(source),
      Error::Io { source, .. } => Some(source),
      _ => None,
    }
  }
}

/// The error's message followed by each cause on its own "caused by" line,
/// redacted (a cause such as a transport error may name a URL that holds the token).
pub fn describe(error: &dyn StdError) -> String {
  let mut text = error.to_string();
  let mut cause = error.source();
  while let Some(inner) = cause {
    let line = inner.to_string();
    // reqwest repeats its inner error in its own message; skip exact repeats.
    if !text.ends_with(&line) {
      text.push_str(": caused by ");
      text.push_str(&line);
    }
    cause = inner.source();
  }
  crate::secret::redact(&text)
}

impl From<Error> for napi::Error {
  fn from(error: Error) -> Self {
    let status = match error {
      Error::InvalidInput(_) => napi::Status::InvalidArg,
      _ => napi::Status::GenericFailure,
    };
    napi::Error::new(status, describe(&error))
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn describe_folds_the_cause_chain() {
    let error = Error::io(
      "cannot write /tmp/x/provider-session",
      std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied"),
    );
    assert_eq!(
      describe(&error),
      "cannot write /tmp/x/provider-session: caused by permission denied"
    );
  }

  #[test]
  fn status_errors_name_the_status() {
    let error = Error::Status {
      operation: "register",
      status: 503,
      message: "maintenance".into(),
    };
    assert_eq!(error.status(), Some(503));
    assert_eq!(
      error.to_string(),
      "register failed: mcpd answered HTTP 503: maintenance"
    );
  }
}
