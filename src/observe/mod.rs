//! What happened to each task, told to the observers (metrics, the audit log)
//! once it ended: one record per task that reached the registrar (docs/protocol.md).
//! A refused task id or a replay makes no record.

pub mod audit;
pub mod metrics;

use std::time::{Duration, SystemTime};

use crate::dispatch::Outcome;
use crate::owner::Refusal;

/// One task, as it ended.
#[derive(Debug, Clone)]
pub struct TaskRecord {
  /// When it ended.
  pub time: SystemTime,
  pub task_id: String,
  /// The served provider's name, or "(unknown)": never mcpd's string unchecked.
  pub provider: String,
  pub caller_id: Option<String>,
  pub request_model: Option<String>,
  pub response_model: Option<String>,
  pub stream: bool,
  pub outcome: Outcome,
  /// The HTTP status posted to mcpd (200 for a stream that began); 0 when none.
  pub status: u16,
  /// Why the owner's controls refused it, if they did.
  pub refused: Option<Refusal>,
  pub prompt_tokens: Option<u64>,
  pub completion_tokens: Option<u64>,
  /// Time in the provider's queue.
  pub queue: Option<Duration>,
  pub time_to_first_token: Option<Duration>,
  /// From its arrival at the registrar to its end.
  pub duration: Duration,
  /// The W3C trace id (32 lower-case hex) of mcpd's traceparent, when valid.
  pub trace_id: Option<String>,
  /// The request's messages and the answer's text: filled only when an
  /// observer wants content (`audit: { content: true }`).
  pub messages: Option<serde_json::Value>,
  pub content: Option<String>,
}

/// Something told about every task that ended (metrics, the audit log). Called
/// on a runtime thread: it must not block (queue the work instead).
pub trait TaskObserver: Send + Sync {
  /// Whether records should carry the request's messages and the answer's text.
  fn wants_content(&self) -> bool {
    false
  }
  fn task_ended(&self, record: &TaskRecord);
}
