//! What a remote caller sees of a failure (docs/protocol.md, "What a remote caller
//! sees of a provider's failure"): the provider's message or, with `errorDetail:
//! 'generic'`, "the provider failed" and an error id; and never the token, in any
//! error body or in-band error posted to mcpd.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::openai::ErrorReply;
use crate::owner::ErrorDetail;
use crate::secret::Secret;

/// What a `'generic'` provider's caller is told, before the error id.
pub const GENERIC_MESSAGE: &str = "the provider failed";

/// The 502 answer for a provider that failed with `message`. The warn line always
/// carries the real message (token redacted by the logger) and the error id, so
/// that the owner can find what a `'generic'` caller was told about.
pub fn provider_failed(detail: ErrorDetail, message: String) -> ErrorReply {
  let error_id = error_id();
  tracing::warn!(error_id = %error_id, error = %message, "provider failed");
  match detail {
    ErrorDetail::Message => ErrorReply::provider_error(message),
    ErrorDetail::Generic => {
      ErrorReply::provider_error(format!("{GENERIC_MESSAGE} (error id {error_id})"))
    }
  }
}

/// `reply` as it may leave the machine: its message redacted exactly as a log
/// line is (the registrar's token and every live one, in any percent-encoding,
/// and every `Authorization`/`Bearer` value). Every error posted to mcpd, as a
/// result body or in-band in a stream, goes through here.
pub fn scrubbed(reply: &ErrorReply, token: &Secret) -> ErrorReply {
  ErrorReply {
    message: token.redact(&reply.message),
    ..reply.clone()
  }
}

/// A short id for one failure, `e-` and 10 hex digits: unique enough to find one
/// warn line in an owner's log, and says nothing about the machine. From the
/// standard library's randomly keyed hasher (as backoff.rs's jitter), mixed with
/// a counter so two ids made at once still differ.
fn error_id() -> String {
  static COUNT: AtomicU64 = AtomicU64::new(0);
  let mut hasher = RandomState::new().build_hasher();
  hasher.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
  format!("e-{:010x}", hasher.finish() & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn generic_hides_the_message_behind_an_id_and_message_keeps_it() {
    let kept = provider_failed(ErrorDetail::Message, "ollama: connection refused".into());
    assert_eq!(kept.message, "ollama: connection refused");
    assert_eq!((kept.status, kept.code), (502, "provider_error"));
    let hidden = provider_failed(ErrorDetail::Generic, "ollama at 10.0.0.5:11434".into());
    assert_eq!((hidden.status, hidden.code), (502, "provider_error"));
    let id = hidden
      .message
      .strip_prefix("the provider failed (error id ")
      .and_then(|rest| rest.strip_suffix(')'))
      .unwrap_or_else(|| panic!("{}", hidden.message));
    assert!(id.len() == 12 && id.starts_with("e-"), "{id}");
    assert!(id[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let again = provider_failed(ErrorDetail::Generic, String::new());
    assert_ne!(again.message, hidden.message);
  }

  #[test]
  fn scrubbed_masks_the_token_however_it_is_written_and_keeps_the_rest() {
    let token = Secret::new("sk-failure-scrub");
    let reply = ErrorReply::provider_error(
      "401 for sk-failure-scrub at /x?t=sk%2Dfailure%2Dscrub; Authorization: Bearer abc",
    );
    let clean = scrubbed(&reply, &token);
    assert_eq!(clean.message, "401 for *** at /x?t=***; Authorization: ***");
    assert_eq!(
      (clean.status, clean.kind, clean.code),
      (reply.status, reply.kind, reply.code)
    );
  }
}
