//! The seam between the registrar core and an LLM provider. The core knows
//! providers only through this trait; the JavaScript bridge implements it, and
//! so do the Rust tests.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use crate::openai::{parse_chunk, CompletionChunk};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One provider call: the task it serves and its `CompletionOptions` as JSON
/// (the bridge adds the `AbortSignal`).
#[derive(Debug, Clone)]
pub struct ProviderCall {
  pub task_id: String,
  pub options: Value,
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

/// The items of a provider's `stream()`, pulled one at a time, so that a slow
/// consumer slows the provider down instead of buffering without bound.
pub trait ChunkSource: Send {
  /// The next chunk as JSON, or `None` at the end.
  fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Value>, ProviderFailure>>;

  /// The next chunks, already typed: waits for one, then appends it and as
  /// many more as are ready at once to `out`; `false` at the end. A chunk
  /// that is not a valid `CompletionChunk` is a failure, reported after the
  /// valid chunks before it. The default takes one chunk through
  /// [`ChunkSource::next_chunk`]; a source holding chunk JSON text parses it
  /// straight into the typed chunk, with no `Value` in between.
  fn next_chunks<'a>(
    &'a mut self,
    out: &'a mut Vec<CompletionChunk>,
  ) -> BoxFuture<'a, Result<bool, ProviderFailure>> {
    Box::pin(async move {
      match self.next_chunk().await? {
        Some(value) => {
          out.push(parse_chunk(value).map_err(ProviderFailure)?);
          Ok(true)
        }
        None => Ok(false),
      }
    })
  }
}

pub trait Provider: Send + Sync + 'static {
  /// Whether the provider has `stream()`.
  fn can_stream(&self) -> bool;

  /// `complete(options)`: resolves to the `CompletionResult` as JSON.
  fn complete(&self, call: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>>;

  /// `stream(options)`: opens the provider's async iterator.
  fn stream(
    &self,
    call: ProviderCall,
  ) -> BoxFuture<'static, Result<Box<dyn ChunkSource>, ProviderFailure>>;

  /// Fires the task's `AbortSignal` and lets go of the task's call; a no-op for
  /// a task the provider no longer knows.
  fn abort(&self, task_id: &str, reason: AbortReason);
}
