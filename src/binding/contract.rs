//! The options, provider entries and status that cross between JavaScript and the
//! addon, declared once as Rust types: index.d.ts is generated from them, and so are
//! the name lists for "did you mean" and the readers (options.rs `js_object!`).

use std::collections::BTreeMap;

use napi::bindgen_prelude::{Function, Object, Unknown};

use super::options::{js_object, Required};
use crate::registrar as core;

/// The `heartbeatIntervalMs` option's default.
pub const DEFAULT_HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// The `idleTimeoutMs` option's default.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The boot hook's own option besides the registrar's (its TypeScript is the hook's
/// `ts_args_type`: an intersection a `#[napi(object)]` cannot state).
pub const REGISTRY: &str = "registry";
/// The field of a `RegistrarOptions['providers']` entry beside `LlmProviderFileEntry`'s.
pub const PROVIDER: &str = "provider";

/// What `new VirtualLlmRegistrar(options)` takes. An unknown name is refused with
/// ERR_INVALID_OPTION naming the nearest known one.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct RegistrarOptions<'env> {
  /// mcpd's base URL (`https://mcpd.example.com`). Plain `http` is refused for a
  /// non-loopback host unless `allowInsecureHttp`. Required.
  #[napi(ts_type = "string")]
  pub mcpd_url: Required<String>,
  /// The bearer token mcpd gave mcplocal. Never logged nor put in an error. Required.
  #[napi(ts_type = "string")]
  pub token: Required<String>,
  /// The providers to publish, each with its `LlmProvider`. At least one; names unique.
  #[napi(ts_type = "Array<LlmProviderFileEntry & { provider: LlmProvider }>")]
  pub providers: Required<Unknown<'env>>,
  /// Where the sticky session id is kept (`<configDir>/provider-session`).
  /// @default $MCPCTL_HOME, else ~/.mcpctl
  pub config_dir: Option<String>,
  /// How often to tell mcpd the registrar is alive, in ms; mcpd's answer to
  /// register may set another. @default 30000
  pub heartbeat_interval_ms: Option<f64>,
  /// How long the control channel may stay silent before it is reopened, in ms;
  /// 0 disables. @default 60000
  pub idle_timeout_ms: Option<f64>,
  /// Retry delays after a failed register or a lost channel (doubling, with jitter).
  /// @default { initialMs: 5000, maxMs: 60000 }
  pub backoff: Option<BackoffOptions>,
  /// How long a provider may take over one task before it is aborted (answered 504), in ms.
  /// @default 600000
  pub task_timeout_ms: Option<f64>,
  /// Tasks run at once per provider. @default 4
  pub max_concurrency: Option<f64>,
  /// Tasks waiting per provider beyond `maxConcurrency`; more are answered 429. @default 64
  pub max_queue: Option<f64>,
  /// Allows plain http to a non-loopback host (the token then travels in clear).
  /// @default false
  pub allow_insecure_http: Option<bool>,
  /// Where log lines go (pino's order, fields first). Without one, warnings and
  /// errors go to stderr; `MCPCTL_LOG` (`error`...`trace`, `off`) sets the level.
  /// @default undefined (stderr)
  #[napi(ts_type = "Logger")]
  pub logger: Option<Object<'env>>,
  /// Called with the status on every state change. A throw becomes a process warning.
  /// @default undefined
  #[napi(ts_type = "(status: RegistrarStatus) => void")]
  pub on_state_change: Option<Function<'env>>,
  /// The audit log: one JSON line (`AuditRecord`) per task that reached the
  /// registrar, written when it ends, off the JavaScript thread. A path that is a
  /// symlink, a directory or cannot be written is warned about and the registrar
  /// serves on without it. @default false (no audit file)
  #[napi(ts_type = "AuditOptions | false")]
  pub audit: Option<AuditChoice>,
}
js_object!(RegistrarOptions<'env> { mcpd_url, token, providers, config_dir, heartbeat_interval_ms, idle_timeout_ms, backoff, task_timeout_ms, max_concurrency, max_queue, allow_insecure_http, logger, on_state_change, audit });

/// The `backoff` option: retry delays, doubling from `initialMs` to `maxMs`.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct BackoffOptions {
  /// The first delay, in ms. @default 5000
  pub initial_ms: Option<f64>,
  /// The longest delay, in ms; not below `initialMs`. @default 60000
  pub max_ms: Option<f64>,
}
js_object!(BackoffOptions { initial_ms, max_ms });

/// The `audit` option: where the audit log goes and what it holds.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct AuditOptions {
  /// The file, created 0600 (its directory 0700 when missing) and opened without
  /// following a symlink; a relative path is from the process's working directory.
  /// @default <configDir>/audit.jsonl
  pub path: Option<String>,
  /// Past this size (in bytes, a positive integer) the file is rotated to
  /// `<path>.1`, `.1` to `.2`, and so on. @default 10485760
  pub max_bytes: Option<f64>,
  /// Rotated files kept (an integer from 0 to 1000; 0: the file is just emptied
  /// when full). @default 5
  pub keep: Option<f64>,
  /// Also write the request's messages and the answer's text. Without it no
  /// prompt or completion text is written anywhere. The token is never written.
  /// @default false
  pub content: Option<bool>,
}
js_object!(AuditOptions {
  path,
  max_bytes,
  keep,
  content
});

/// The `audit` option as given: `false`, or the audit log's settings (options.rs
/// reads it; its TypeScript is `AuditOptions | false`).
pub enum AuditChoice {
  Off,
  On(AuditOptions),
}

/// One entry of ~/.mcpctl/config.json's provider list, as mcplocal reads it.
/// Fields of mcplocal's own (`url`, `apiKey`...) may be present and are ignored;
/// a near miss of a field below (`modle`, `Publish`) is refused with ERR_INVALID_OPTION.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct LlmProviderFileEntry {
  /// The virtual LLM's name in mcpd: what OpenAI clients send as `model`. Unique.
  #[napi(ts_type = "string")]
  pub name: Required<String>,
  /// The provider's kind (`ollama`, `llamacpp`...), shown by mcpd.
  #[napi(ts_type = "string")]
  pub r#type: Required<String>,
  /// The model the provider runs; handed to it as `CompletionOptions.model`.
  /// @default undefined (the provider chooses)
  pub model: Option<String>,
  /// Whether to publish this provider to mcpd. The boot hook publishes only
  /// entries with `publish: true`; `new VirtualLlmRegistrar()` publishes every
  /// entry except those with `publish: false`.
  /// @default false (boot hook)
  pub publish: Option<bool>,
  /// Shown by mcpd next to the name. @default undefined
  pub description: Option<String>,
  /// The model's context window in tokens, shown by mcpd. @default undefined
  pub context_window: Option<f64>,
  /// When set, only callers whose id, name or one of whose groups is listed
  /// (exactly, case-sensitive) may use this provider; a task without a caller is
  /// refused, and an empty list refuses everyone (403 `caller_not_allowed`).
  /// Entries are non-empty strings. @default undefined (everyone)
  pub allow_callers: Option<Vec<String>>,
  /// The owner's limits for this provider. @default undefined (no limits)
  pub limits: Option<PublishLimits>,
  /// What a remote caller sees when this provider fails (throws, rejects, or
  /// answers something unusable): `'message'`, the provider's error message;
  /// `'generic'`, "the provider failed (error id e-…)", where the id is also on
  /// the local `provider failed` warn line (`errorId`), beside the real message.
  /// Either way the token is scrubbed from every answer. The registrar's own
  /// answers (503 stopping, 504 timeout, refusals) are the same for both.
  /// @default 'message'
  #[napi(ts_type = "'message' | 'generic'")]
  pub error_detail: Option<String>,
}
js_object!(LlmProviderFileEntry {
  name,
  r#type,
  model,
  publish,
  description,
  context_window,
  allow_callers,
  limits,
  error_detail
});

/// The owner's limits for one published provider. Every field is optional (absent:
/// no limit) and a positive integer: 0, negatives, fractions and non-numbers are
/// ERR_INVALID_OPTION, and so is an unknown name (naming the nearest known one).
///
/// Tokens are prompt + completion as the provider's `usage` reports them. Where it
/// reports none, they are estimated: the characters (Unicode code points) of the
/// request's message text (string contents, text parts, tool calls' arguments)
/// divided by 4 and rounded up, plus the same for the answer's content and tool
/// calls' arguments. Requests are charged when a task is admitted, tokens when it
/// ends (also when it failed or was cancelled after reaching the provider); a task
/// refused, or cancelled before it reached the provider, is not charged. A limit
/// refuses a task while its window is full (used ≥ limit); the minute windows are
/// kept in 1 s buckets, the day in 1 min buckets.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct PublishLimits {
  /// A request whose `max_completion_tokens` (else `max_tokens`) is larger is
  /// refused 400 `max_tokens_exceeded`; a request with neither gets this as its
  /// `maxTokens` and as `max_tokens` in `options.request`. @default undefined
  pub max_output_tokens: Option<f64>,
  /// A task whose `body` is larger, in bytes as mcpd sent it, is refused 400
  /// `request_too_large`. @default undefined
  pub max_request_bytes: Option<f64>,
  /// Requests a minute, all callers together; refused 429 `requests_per_minute`
  /// with `retry-after`. @default undefined
  pub requests_per_minute: Option<f64>,
  /// Tokens a minute, all callers together (429 `tokens_per_minute`). @default undefined
  pub tokens_per_minute: Option<f64>,
  /// Tokens in a rolling 24 h, all callers together (429 `tokens_per_day`).
  /// @default undefined
  pub tokens_per_day: Option<f64>,
  /// The same limits for each caller on its own, for tasks that carry a caller; at
  /// most 10,000 callers are tracked, the least recently seen forgotten first.
  /// @default undefined
  pub per_caller: Option<CallerLimits>,
}
js_object!(PublishLimits {
  max_output_tokens,
  max_request_bytes,
  requests_per_minute,
  tokens_per_minute,
  tokens_per_day,
  per_caller
});

/// `PublishLimits.perCaller`: each caller's own limits.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct CallerLimits {
  /// Requests a minute of one caller. @default undefined
  pub requests_per_minute: Option<f64>,
  /// Tokens a minute of one caller. @default undefined
  pub tokens_per_minute: Option<f64>,
  /// Tokens in a rolling 24 h of one caller. @default undefined
  pub tokens_per_day: Option<f64>,
}
js_object!(CallerLimits {
  requests_per_minute,
  tokens_per_minute,
  tokens_per_day
});

/// `pause()`'s options.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct PauseOptions {
  /// The provider to pause; the whole registrar when absent (providers added by
  /// `update()` while it lasts included). @default undefined (all)
  pub provider: Option<String>,
  /// Resolve only once the tasks already admitted (running or queued) have ended.
  /// @default false
  pub drain: Option<bool>,
}
js_object!(PauseOptions { provider, drain });

/// `resume()`'s options.
#[napi(object, object_from_js = false, object_to_js = false)]
pub struct ResumeOptions {
  /// The provider to resume (a pause of the whole registrar stays); every pause is
  /// cleared when absent. @default undefined (all)
  pub provider: Option<String>,
}
js_object!(ResumeOptions { provider });

/// What one provider, or one caller, was used for since the registrar was made.
/// Its maps are sorted by key, so `usage()` reads the same from call to call.
#[napi(object, object_from_js = false)]
#[derive(Debug)]
pub struct ProviderUsage {
  /// Tasks that reached the provider.
  pub tasks: i64,
  /// Prompt tokens, as reported by the provider or estimated (see `PublishLimits`).
  pub prompt_tokens: i64,
  /// Completion tokens, as reported by the provider or estimated.
  pub completion_tokens: i64,
  /// Tasks refused, by reason; every reason is present.
  #[napi(
    ts_type = "Record<'caller_not_allowed' | 'requests_per_minute' | 'tokens_per_minute' | 'tokens_per_day' | 'max_tokens_exceeded' | 'request_too_large' | 'provider_paused' | 'queue_full', number>"
  )]
  pub refused: BTreeMap<String, i64>,
}

/// What `usage()` answers.
#[napi(object, object_from_js = false)]
#[derive(Debug)]
pub struct UsageReport {
  /// When the registrar was made, as ISO 8601 (`Date.prototype.toISOString`).
  pub since: String,
  /// Per provider name.
  pub providers: BTreeMap<String, ProviderUsage>,
  /// Per caller id, for tasks that carried a caller; at most 10,000 callers (the
  /// least recently seen are folded into "(other)").
  pub callers: BTreeMap<String, ProviderUsage>,
}

impl From<crate::owner::usage::Tally> for ProviderUsage {
  fn from(tally: crate::owner::usage::Tally) -> Self {
    Self {
      tasks: count(tally.tasks),
      prompt_tokens: count(tally.prompt_tokens),
      completion_tokens: count(tally.completion_tokens),
      refused: tally
        .refusals()
        .map(|(reason, n)| (reason.to_owned(), count(n)))
        .collect(),
    }
  }
}

impl From<crate::owner::usage::UsageReport> for UsageReport {
  fn from(report: crate::owner::usage::UsageReport) -> Self {
    let convert = |map: std::collections::HashMap<String, crate::owner::usage::Tally>| {
      map
        .into_iter()
        .map(|(key, tally)| (key, tally.into()))
        .collect()
    };
    Self {
      since: crate::owner::usage::iso_time(report.since),
      providers: convert(report.providers),
      callers: convert(report.callers),
    }
  }
}

/// Where the registrar is in its life.
#[napi(string_enum = "lowercase")]
#[derive(Debug, PartialEq, Eq)]
pub enum RegistrarState {
  Idle,
  Registering,
  Connected,
  Reconnecting,
  Unauthorized,
  Stopped,
}

/// A snapshot of the registrar's state and counters: what `status()` answers and
/// `onStateChange` receives.
#[napi(object, object_from_js = false, use_nullable = true)]
#[derive(Debug)]
pub struct RegistrarStatus {
  pub state: RegistrarState,
  /// The session id mcpd gave (kept in `<configDir>/provider-session`); null before
  /// the first register.
  pub provider_session_id: Option<String>,
  /// The names published (or to be published by `start()`).
  pub providers: Vec<String>,
  /// Tasks a provider is working on.
  pub in_flight: u32,
  /// Tasks waiting for a free slot (`maxConcurrency`).
  pub queued: u32,
  /// Tasks answered with the provider's result.
  pub completed: i64,
  /// Tasks answered with an error.
  pub failed: i64,
  /// Tasks mcpd cancelled. received = completed + failed + cancelled + inFlight + queued.
  pub cancelled: i64,
  /// How many times the control channel was reopened.
  pub reconnects: i64,
  /// The last failure (register, channel), null when none.
  pub last_error: Option<String>,
  /// The names of the paused providers (all of them when paused as a whole).
  pub paused: Vec<String>,
}

impl From<core::RegistrarState> for RegistrarState {
  fn from(state: core::RegistrarState) -> Self {
    match state {
      core::RegistrarState::Idle => Self::Idle,
      core::RegistrarState::Registering => Self::Registering,
      core::RegistrarState::Connected => Self::Connected,
      core::RegistrarState::Reconnecting => Self::Reconnecting,
      core::RegistrarState::Unauthorized => Self::Unauthorized,
      core::RegistrarState::Stopped => Self::Stopped,
    }
  }
}

/// Counters are below 2^53 for any registrar's life: exact as JavaScript numbers.
fn count(value: u64) -> i64 {
  i64::try_from(value).unwrap_or(i64::MAX)
}

impl From<core::RegistrarStatus> for RegistrarStatus {
  fn from(status: core::RegistrarStatus) -> Self {
    Self {
      state: status.state.into(),
      provider_session_id: status.provider_session_id,
      providers: status.providers,
      in_flight: status.in_flight,
      queued: status.queued,
      completed: count(status.completed),
      failed: count(status.failed),
      cancelled: count(status.cancelled),
      reconnects: count(status.reconnects),
      last_error: status.last_error,
      paused: status.paused,
    }
  }
}

/// The defaults the code uses, by option name, as the doc comments above state them
/// in `@default` (checked against the generated index.d.ts by a test).
#[cfg(test)]
fn defaults() -> Vec<(&'static str, String)> {
  let ms = |duration: std::time::Duration| duration.as_millis().to_string();
  let policy = crate::backoff::BackoffPolicy::default();
  let dispatch = crate::dispatch::DispatchSettings::default();
  vec![
    ("heartbeatIntervalMs", ms(DEFAULT_HEARTBEAT_INTERVAL)),
    ("idleTimeoutMs", ms(DEFAULT_IDLE_TIMEOUT)),
    (
      "backoff",
      format!(
        "{{ initialMs: {}, maxMs: {} }}",
        ms(policy.initial),
        ms(policy.max)
      ),
    ),
    ("initialMs", ms(policy.initial)),
    ("maxMs", ms(policy.max)),
    ("taskTimeoutMs", ms(dispatch.task_timeout)),
    ("maxConcurrency", dispatch.max_concurrency.to_string()),
    ("maxQueue", dispatch.max_queue.to_string()),
    ("allowInsecureHttp", "false".to_owned()),
    (
      "errorDetail",
      format!("'{}'", crate::owner::ErrorDetail::default().name()),
    ),
    ("audit", "false (no audit file)".to_owned()),
    (
      "maxBytes",
      crate::observe::audit::DEFAULT_MAX_BYTES.to_string(),
    ),
    ("keep", crate::observe::audit::DEFAULT_KEEP.to_string()),
    (
      "path",
      format!("<configDir>/{}", crate::observe::audit::DEFAULT_FILE_NAME),
    ),
  ]
}

#[cfg(test)]
mod tests {
  use super::super::options::JsObject;
  use super::*;

  const INDEX_D_TS: &str = include_str!("../../index.d.ts");

  /// The doc comment right above `  name?:` (or `name:`) in the generated index.d.ts.
  fn doc_of(field: &str) -> &'static str {
    let line = INDEX_D_TS
      .lines()
      .position(|line| {
        let line = line.trim_start();
        line.starts_with(&format!("{field}?:")) || line.starts_with(&format!("{field}:"))
      })
      .unwrap_or_else(|| panic!("index.d.ts has no field `{field}`"));
    let lines: Vec<&str> = INDEX_D_TS.lines().collect();
    let start = (0..line)
      .rev()
      .find(|&index| lines[index].trim_start().starts_with("/**"))
      .unwrap_or_else(|| panic!("`{field}` has no doc comment"));
    let from = INDEX_D_TS.find(lines[start]).unwrap();
    let to = INDEX_D_TS.find(lines[line]).unwrap();
    &INDEX_D_TS[from..to]
  }

  #[test]
  fn the_generated_defaults_are_the_ones_the_code_uses() {
    for (field, value) in defaults() {
      let doc = doc_of(field);
      assert!(
        doc.contains(&format!("@default {value}")),
        "index.d.ts says for `{field}`: {doc}; the code uses {value}"
      );
    }
  }

  #[test]
  fn every_declared_name_is_in_the_generated_types() {
    for field in RegistrarOptions::fields()
      .iter()
      .chain(BackoffOptions::fields())
      .chain(LlmProviderFileEntry::fields())
      .chain(PublishLimits::fields())
      .chain(CallerLimits::fields())
      .chain(PauseOptions::fields())
      .chain(AuditOptions::fields())
    {
      doc_of(field);
    }
    assert!(RegistrarOptions::fields().contains(&"onStateChange"));
    // The boot hook reads `logger` by that name when the other options are mistyped.
    assert!(RegistrarOptions::fields().contains(&"logger"));
    assert!(LlmProviderFileEntry::fields().contains(&"type"));
  }
}
