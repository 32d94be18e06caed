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
  /// `start()` was called on a registrar that is already started.
  AlreadyStarted,
}

/// The stable codes of JavaScript's `RegistrarError` (index.d.ts `RegistrarErrorCode`); the
/// list in src/binding/types.d.ts (`RegistrarErrorCode`) must match it.
pub mod code {
  /// An option (or a provider entry) is missing, mistyped, misspelled or out of range.
  pub const INVALID_OPTION: &str = "ERR_INVALID_OPTION";
  /// mcpd refused a register (an HTTP error other than 401/403), did not
  /// answer it, or answered something unreadable.
  pub const REGISTER_FAILED: &str = "ERR_REGISTER_FAILED";
  /// mcpd answered 401 or 403: the token is wrong or revoked.
  pub const UNAUTHORIZED: &str = "ERR_UNAUTHORIZED";
  /// The registrar is stopped (or was stopped while the call was waiting).
  pub const STOPPED: &str = "ERR_STOPPED";
  /// `start()` on a registrar that is already started (or starting).
  pub const ALREADY_STARTED: &str = "ERR_ALREADY_STARTED";
  /// A file in the config dir (the session id file) cannot be read or written.
  pub const CONFIG: &str = "ERR_CONFIG";
}

impl Error {
  /// The HTTP status mcpd answered, when that is what went wrong.
  pub fn status(&self) -> Option<u16> {
    match self {
      Error::Status { status, .. } => Some(*status),
      _ => None,
    }
  }

  /// The stable code JavaScript sees as `RegistrarError.code`.
  pub fn code(&self) -> &'static str {
    match self {
      Error::InvalidInput(_) => code::INVALID_OPTION,
      Error::Status {
        status: 401 | 403, ..
      } => code::UNAUTHORIZED,
      // A register is the only request to mcpd whose failure reaches a
      // caller (start() and update()); the others are retried and logged.
      Error::Status { .. } | Error::Transport { .. } | Error::Protocol(_) => code::REGISTER_FAILED,
      Error::Io { .. } => code::CONFIG,
      Error::Stopped => code::STOPPED,
      Error::AlreadyStarted => code::ALREADY_STARTED,
    }
  }

  /// What lies beneath, for JavaScript's `cause`: the `source()` chain folded.
  pub fn cause(&self) -> Option<String> {
    self.source().map(describe)
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
      Error::AlreadyStarted => f.write_str("registrar is already started"),
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

/// Outside JavaScript (Rust callers, tests): the message with its causes and
/// the code as the status text. The binding builds a `RegistrarError` instead.
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
    assert_eq!(error.code(), code::REGISTER_FAILED);
    assert_eq!(
      error.to_string(),
      "register failed: mcpd answered HTTP 503: maintenance"
    );
  }

  #[test]
  fn codes_tell_a_refused_token_from_a_typo() {
    let refused = Error::Status {
      operation: "register",
      status: 401,
      message: "invalid token".into(),
    };
    assert_eq!(refused.code(), code::UNAUTHORIZED);
    assert_eq!(Error::InvalidInput("x".into()).code(), code::INVALID_OPTION);
    assert_eq!(Error::Stopped.code(), code::STOPPED);
    assert_eq!(Error::AlreadyStarted.code(), code::ALREADY_STARTED);
    let io = Error::io("cannot write x", std::io::Error::other("disk full"));
    assert_eq!(io.code(), code::CONFIG);
    assert_eq!(io.cause().as_deref(), Some("disk full"));
    assert_eq!(Error::Stopped.cause(), None);
  }
}
