//! The seam between the registrar core and an LLM provider. The core knows
//! providers only through this trait; the JavaScript bridge implements it, and
//! so do the Rust tests. A stream's chunks come through the core's own
//! window (stream.rs), not through the trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::stream::ChunkReader;
use crate::trace::{SpanEnd, TaskTrace};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One provider call: the task it serves and its `CompletionOptions` as JSON
/// text (the bridge adds the `AbortSignal`).
#[derive(Debug, Clone)]
pub struct ProviderCall {
  pub task_id: String,
  pub options: String,
  /// The task's trace: the bridge records the registrar's span in it, if it
  /// makes one, before the call settles.
  pub trace: Arc<TaskTrace>,
}

/// The provider threw, rejected, or handed back something unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderFailure(pub String);

/// Why a task's `AbortSignal` fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
  /// mcpd sent `cancel` for the task.
  Cancelled,
  /// The task ran past `taskTimeoutMs`.
  TimedOut,
  /// The registrar is stopping.
  Stopping,
  /// Nobody is left to receive the answer (mcpd forgot the task).
  Abandoned,
  /// The provider failed (threw, or yielded something unusable).
  Failed,
}

impl AbortReason {
  pub fn describe(self) -> &'static str {
    match self {
      AbortReason::Cancelled => "the task was cancelled by mcpd",
      AbortReason::TimedOut => "the task timed out",
      AbortReason::Stopping => "the registrar is stopping",
      AbortReason::Abandoned => "mcpd no longer waits for the task",
      AbortReason::Failed => "the task failed",
    }
  }
}

pub trait Provider: Send + Sync + 'static {
  /// Whether the provider has `stream()`.
  fn can_stream(&self) -> bool;

  /// `complete(options)`: resolves to the `CompletionResult` as JSON.
  fn complete(&self, call: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>>;

  /// `stream(options)`: opens the provider's async iterator. Its chunks are
  /// then pushed into the stream's window, and the task reads them through
  /// the reader this answers, without calling the provider again.
  fn stream(&self, call: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>>;

  /// Fires the task's `AbortSignal` and lets go of the task's call; a no-op for
  /// a task the provider no longer knows.
  fn abort(&self, task_id: &str, reason: AbortReason);

  /// The task whose call recorded a span in its `TaskTrace` has ended: the
  /// bridge ends the span. Called only for such tasks, so a registrar without
  /// spans pays nothing for it.
  fn span_ended(&self, _task_id: &str, _end: SpanEnd) {}
}
