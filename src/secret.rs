//! A bearer token that never shows itself (`Debug` and `Display` print `***`),
//! and the one redaction step that every error message and log line passes
//! through: [`redact`] removes every live token, in any percent-encoding, and
//! every `Authorization` or `Bearer` value.

use std::fmt;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// A token shorter than this is not searched for in text (it would match by chance).
const MIN_REDACTED_LEN: usize = 4;
const MASK: &str = "***";

/// The tokens of every live [`Secret`]: text from any registrar is redacted of
/// all of them, so that an error made where no token is at hand (a transport
/// error's URL, a panic message) is still safe once it becomes text.
static LIVE: Mutex<Vec<Entry>> = parking_lot::const_mutex(Vec::new());

/// One secret in [`LIVE`]: its token, copied, and a weak handle to the secret's
/// own, which tells whether it still lives. The copy is what a redaction holds
/// while it runs, so a redaction on another thread never keeps a dropped secret
/// alive, as upgrading the weak handle would.
struct Entry {
  alive: Weak<str>,
  token: Arc<str>,
}

/// A secret string; read it only with [`Secret::expose`] where it goes on the wire.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
  pub fn new(value: impl Into<String>) -> Self {
    let value: Arc<str> = Arc::from(value.into());
    if value.len() >= MIN_REDACTED_LEN {
      let mut live = LIVE.lock();
      live.retain(|entry| entry.alive.strong_count() > 0);
      live.push(Entry {
        alive: Arc::downgrade(&value),
        token: Arc::from(&*value),
      });
    }
    Self(value)
  }

  pub fn expose(&self) -> &str {
    &self.0
  }

  /// [`redact`], sure to cover this secret too.
  pub fn redact(&self, text: &str) -> String {
    redact(&mask_token(&self.0, text))
  }
}

impl PartialEq for Secret {
  fn eq(&self, other: &Self) -> bool {
    self.0 == other.0
  }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(MASK)
  }
}

impl fmt::Display for Secret {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(MASK)
  }
}

/// The redaction step: replaces with `***` every live token wherever it appears
/// in `text` (as is, or percent-encoded in any mix of cases, once or twice, as
/// in a URL's path or query), and the value after every `Authorization` and
/// `Bearer`.
pub fn redact(text: &str) -> String {
  let mut text = text.to_owned();
  for token in &live_tokens() {
    text = mask_token(token, &text);
  }
  mask_authorization(&text)
}

/// The tokens of the secrets alive now.
fn live_tokens() -> Vec<Arc<str>> {
  let live = LIVE.lock();
  live
    .iter()
    .filter(|entry| entry.alive.strong_count() > 0)
    .map(|entry| Arc::clone(&entry.token))
    .collect()
}

/// Replaces each occurrence of `token`, where any of its bytes may be written
/// `%XX` or `%25XX`.
fn mask_token(token: &str, text: &str) -> String {
  let token = token.as_bytes();
  let bytes = text.as_bytes();
  if token.len() < MIN_REDACTED_LEN || bytes.len() < token.len() {
    return text.to_owned();
  }
  let mut out = String::with_capacity(text.len());
  let mut copied = 0;
  let mut at = 0;
  while at < bytes.len() {
    match match_encoded(token, &bytes[at..]) {
      Some(length) => {
        // The match starts and ends on ASCII bytes, so both ends are char boundaries.
        out.push_str(&text[copied..at]);
        out.push_str(MASK);
        at += length;
        copied = at;
      }
      None => at += 1,
    }
  }
  out.push_str(&text[copied..]);
  out
}

/// The length of `text`'s prefix that spells `token`, each byte as is or percent-encoded.
fn match_encoded(token: &[u8], text: &[u8]) -> Option<usize> {
  let mut at = 0;
  for &wanted in token {
    let rest = &text[at..];
    if rest.first() == Some(&wanted) {
      at += 1;
    } else if rest.len() >= 3 && rest[0] == b'%' && hex_byte(&rest[1..3]) == Some(wanted) {
      at += 3;
    } else if rest.len() >= 5
      && rest[..3].eq_ignore_ascii_case(b"%25")
      && hex_byte(&rest[3..5]) == Some(wanted)
    {
      at += 5;
    } else {
      return None;
    }
  }
  Some(at)
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
  let digit = |byte: u8| (byte as char).to_digit(16);
  Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

/// Masks the value after `Authorization` (`: value` or `=value`, to the end of
/// the line or the closing quote) and the credential after `Bearer`.
fn mask_authorization(text: &str) -> String {
  let lower = text.to_ascii_lowercase();
  let bytes = text.as_bytes();
  // (start, end) of each value to mask, in order.
  let mut spans: Vec<(usize, usize)> = Vec::new();
  let push = |spans: &mut Vec<(usize, usize)>, start: usize, end: usize| {
    if end > start && spans.last().is_none_or(|&(_, last)| start >= last) {
      spans.push((start, end));
    }
  };
  let mut from = 0;
  while let Some(found) = find_keyword(&lower, from) {
    let (keyword_end, is_bearer) = found;
    from = keyword_end;
    let mut at = keyword_end;
    if is_bearer {
      let before = at;
      loop {
        if bytes
          .get(at)
          .is_some_and(|b| matches!(b, b' ' | b'\t' | b'+'))
        {
          at += 1;
        } else if lower[at..].starts_with("%20") {
          at += 3;
        } else {
          break;
        }
      }
      if at == before {
        continue;
      }
      let end = at
        + bytes[at..]
          .iter()
          .position(|b| b.is_ascii_whitespace() || b"\"'`,;&})]<>\\".contains(b))
          .unwrap_or(bytes.len() - at);
      push(&mut spans, at, end);
      from = end;
    } else {
      while bytes.get(at).is_some_and(|b| matches!(b, b'"' | b'\'')) {
        at += 1;
      }
      while bytes.get(at).is_some_and(|b| matches!(b, b' ' | b'\t')) {
        at += 1;
      }
      if !bytes.get(at).is_some_and(|b| matches!(b, b':' | b'=')) {
        continue;
      }
      at += 1;
      while bytes.get(at).is_some_and(|b| matches!(b, b' ' | b'\t')) {
        at += 1;
      }
      let quote = bytes.get(at).copied().filter(|b| matches!(b, b'"' | b'\''));
      if quote.is_some() {
        at += 1;
      }
      let end = at
        + bytes[at..]
          .iter()
          .position(|&b| match quote {
            Some(quote) => b == quote || b == b'\r' || b == b'\n',
            None => b"\r\n\"',;&}".contains(&b),
          })
          .unwrap_or(bytes.len() - at);
      push(&mut spans, at, end);
      from = end;
    }
  }
  if spans.is_empty() {
    return text.to_owned();
  }
  let mut out = String::with_capacity(text.len());
  let mut copied = 0;
  for (start, end) in spans {
    // Both ends sit next to ASCII delimiters, or at the ends of the text.
    out.push_str(&text[copied..start]);
    out.push_str(MASK);
    copied = end;
  }
  out.push_str(&text[copied..]);
  out
}

/// The next `authorization` or `bearer` at or after `from`: where it ends, and
/// whether it is `bearer`.
fn find_keyword(lower: &str, from: usize) -> Option<(usize, bool)> {
  let rest = lower.get(from..)?;
  let authorization = rest.find("authorization").map(|at| (at, false));
  let bearer = rest.find("bearer").map(|at| (at, true));
  let (at, is_bearer) = match (authorization, bearer) {
    (Some(a), Some(b)) => a.min(b),
    (a, b) => a.or(b)?,
  };
  let length = if is_bearer { 6 } else { 13 };
  Some((from + at + length, is_bearer))
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn never_prints_itself() {
    let secret = Secret::new("sk-very-secret");
    assert_eq!(format!("{secret} {secret:?}"), "*** ***");
    assert_eq!(
      secret.redact("echo: token sk-very-secret!"),
      "echo: token ***!"
    );
    assert_eq!(secret.expose(), "sk-very-secret");
  }

  #[test]
  fn redacts_live_tokens_in_every_encoding() {
    let secret = Secret::new("tok/en+1~x");
    let cases = [
      ("plain tok/en+1~x end", "plain *** end"),
      (
        "http://evil.example/r?t=tok%2Fen%2B1~x&a=1",
        "http://evil.example/r?t=***&a=1",
      ),
      ("path /tok%2fen%2b1%7Ex/", "path /***/"),
      ("all %74%6F%6B%2F%65%6E%2B%31%7E%78.", "all ***."),
      ("twice tok%252Fen%252B1~x", "twice ***"),
      ("twice again tok/en+1~xtok/en+1~x", "twice again ******"),
      (
        "near miss tok/en+1~ and tok%2Gen",
        "near miss tok/en+1~ and tok%2Gen",
      ),
      ("unicode é tok/en+1~x é", "unicode é *** é"),
    ];
    for (text, expected) in cases {
      assert_eq!(redact(text), expected, "{text}");
      assert_eq!(secret.redact(text), expected, "{text}");
    }
    drop(secret);
    // A secret no longer alive is no longer searched for.
    assert_eq!(redact("tok/en+1~x"), "tok/en+1~x");
  }

  #[test]
  fn a_redaction_elsewhere_does_not_keep_a_dropped_secret_alive() {
    let secret = Secret::new("held-elsewhere-9");
    // What a redaction on another thread holds while it runs.
    let held = live_tokens();
    assert!(held.iter().any(|token| &**token == "held-elsewhere-9"));
    drop(secret);
    assert_eq!(redact("held-elsewhere-9"), "held-elsewhere-9");
    drop(held);
  }

  #[test]
  fn redacts_authorization_values() {
    let cases = [
      (
        "Authorization: Bearer abc.def\r\nhost: x",
        "Authorization: ***\r\nhost: x",
      ),
      (
        "authorization=\"Basic dXNlcg==\", next",
        "authorization=\"***\", next",
      ),
      (
        "{\"Authorization\":\"Bearer x-1\",\"a\":1}",
        "{\"Authorization\":\"***\",\"a\":1}",
      ),
      ("sent bearer zzz-top, then", "sent bearer ***, then"),
      ("q?h=Bearer%20abc&x=1", "q?h=Bearer%20***&x=1"),
      ("no authorization here", "no authorization here"),
      ("a bearer", "a bearer"),
    ];
    for (text, expected) in cases {
      assert_eq!(redact(text), expected, "{text}");
    }
  }

  #[test]
  fn short_tokens_are_not_searched_for() {
    let secret = Secret::new("abc");
    assert_eq!(secret.redact("abc abc"), "abc abc");
  }
}
