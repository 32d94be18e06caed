//! One task's life, from admission to its one outcome (docs/protocol.md section 4):
//! a result POST, a chunk sequence ending in `[DONE]`, or nothing after
//! mcpd's `cancel`.
//!
//! Shape: an async function run on the registrar's `TaskTracker`. What ends a
//! task is decided in one place, `decide`, a biased `select!` whose order is
//! the rule when several endings are ready at once:
//!
//! 1. **cancel from mcpd**: nothing more is posted; the provider's signal fires
//!    with `Cancelled`.
//! 2. **stop** (the registrar's root token): answered 503; signal `Stopping`.
//! 3. **timeout** (`taskTimeoutMs`): answered 504; signal `TimedOut`.
//! 4. **the provider settles**: its answer, or, when it failed, 502 (in-band
//!    after chunks went out); signal `Failed` when it failed.
//! 5. **relay gone** (mcpd forgot a streaming task, or delivery gave up): ends
//!    quietly; signal `Abandoned`.
//!
//! Once the provider call was started, every ending but the provider's own
//! settling calls `provider.abort(task_id, reason)`, so the signal fires even
//! when the call reaches the provider after the ending (the bridge records an
//! abort for a task it does not know yet).

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::admission::{Admission, Lane, Slot};
use super::delivery::{deliver, Delivery, DeliverySignals};
use super::failure;
use super::observed::TaskClock;
use super::relay::{relay_chunks, Outbox, Relayed};
use crate::error::describe;
use crate::mcpd::McpdClient;
use crate::openai::{
  self, AnswerIdentity, ErrorReply, PayloadForm, Payloads, StreamEncoder, Usage,
};
use crate::owner::ErrorDetail;
use crate::provider::{AbortReason, Provider, ProviderCall};
use crate::stream::ChunkItem;
use crate::trace::{SpanEnd, TaskTrace};

/// A task's tokens: mcpd's cancel (its own), the stop (a child of the
/// registrar's root) and the hard stop after the stop's grace.
pub type TaskSignals = DeliverySignals;

/// How a task ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
  Completed,
  Failed,
  Cancelled,
}

impl Outcome {
  pub fn as_str(self) -> &'static str {
    match self {
      Outcome::Completed => "completed",
      Outcome::Failed => "failed",
      Outcome::Cancelled => "cancelled",
    }
  }
}

/// What admission decided for a task, in arrival order.
pub enum Decision {
  /// Answered with an error without running (404, 400, 429, 503).
  Answer(ErrorReply),
  Run {
    lane: Arc<Lane>,
    request: openai::ChatRequest,
    admission: Admission,
    stream: bool,
  },
}

/// What a task spent, for the owner's books once it ended.
#[derive(Debug, Default)]
pub struct Spent {
  /// The provider was called.
  pub reached: bool,
  /// The usage the provider reported.
  pub usage: Option<Usage>,
  /// The characters of the answer's text written, for the estimate.
  pub text_chars: u64,
  /// The model the answer named and its finish reason, for the task's span.
  pub answer_model: Option<String>,
  pub finish_reason: Option<&'static str>,
}

/// What a task needs from the dispatcher.
pub struct TaskContext<'a> {
  pub client: &'a McpdClient,
  pub task_timeout: Duration,
  pub signals: TaskSignals,
  /// The HTTP status mcpd got as the task's answer (0: none yet; 200 for a
  /// stream that began, whatever came in-band after), for the log line.
  pub answered: AtomicU16,
  /// What the task spent (the dispatcher reads it when the task ended).
  pub spent: Mutex<Spent>,
  /// Its queue time, first content and gaps, for the metrics and its record.
  pub clock: TaskClock,
  /// mcpd's trace context and the registrar's span (src/trace.rs): the
  /// `traceparent` header of the task's POSTs.
  pub trace: Arc<TaskTrace>,
  /// The OpenAI error type the task was last answered with (in-band too), for
  /// the span's `error.type`.
  pub failure: Mutex<Option<&'static str>>,
}

/// Why the provider's part of a task ended.
enum Ending<T> {
  /// From outside: cancel, stop or timeout.
  Aborted(AbortReason),
  /// The provider settled (for a stream: its iterator ended or failed).
  Settled(T),
  /// The relay is gone.
  RelayGone,
}

impl TaskContext<'_> {
  /// Runs a task to its one outcome.
  pub async fn run(&self, task_id: &str, decision: Decision) -> Outcome {
    match decision {
      Decision::Answer(reply) => self.fail(task_id, &reply).await,
      Decision::Run {
        lane,
        request,
        admission,
        stream,
      } => {
        self
          .run_in_lane(task_id, &lane, request, admission, stream)
          .await
      }
    }
  }

  async fn run_in_lane(
    &self,
    task_id: &str,
    lane: &Arc<Lane>,
    request: openai::ChatRequest,
    admission: Admission,
    stream: bool,
  ) -> Outcome {
    let _slot: Slot = match admission {
      Admission::Now(slot) => slot,
      Admission::Queued(mut queued) => {
        // Same order as `decide`: cancel, then stop, then the slot.
        let signals = &self.signals;
        tokio::select! {
          biased;
          _ = signals.cancel.cancelled() => {
            queued.leave();
            return Outcome::Cancelled;
          }
          _ = signals.stop.cancelled() => {
            queued.leave();
            return self.fail(task_id, &ErrorReply::unavailable()).await;
          }
          slot = queued.granted() => slot,
        }
      }
    };
    self.clock.slot_granted();
    // A slot handed over just as the task was cancelled or stopped.
    if self.signals.cancel.is_cancelled() {
      return Outcome::Cancelled;
    }
    if self.signals.stop.is_cancelled() {
      return self.fail(task_id, &ErrorReply::unavailable()).await;
    }
    let published = lane.published();
    let descriptor = &published.descriptor;
    let identity_model = request
      .model
      .clone()
      .or_else(|| descriptor.model.clone())
      .unwrap_or_else(|| descriptor.name.clone());
    let identity = AnswerIdentity::new(task_id, identity_model);
    let mut options = request.options;
    // The provider gets the entry's configured model, never the virtual
    // LLM's name mcpd routed by (which stays in `options.request.model`).
    options.model.clone_from(&descriptor.model);
    let call = ProviderCall {
      task_id: task_id.to_owned(),
      options: options.to_json(),
      trace: Arc::clone(&self.trace),
    };
    let provider = &published.provider;
    let detail = published.policy.error_detail;
    if stream {
      self.clock.answered_by(&identity.model);
      let encoder = StreamEncoder::new(identity, request.include_usage);
      self.stream_task(provider, call, encoder, detail).await
    } else {
      self.complete_task(provider, call, identity, detail).await
    }
  }

  /// The one place where a task's endings race; see the module comment for the order.
  async fn decide<T>(
    &self,
    deadline: Instant,
    settled: impl std::future::Future<Output = T>,
    relay_gone: impl std::future::Future<Output = ()>,
  ) -> Ending<T> {
    let signals = &self.signals;
    tokio::select! {
      biased;
      _ = signals.cancel.cancelled() => Ending::Aborted(AbortReason::Cancelled),
      _ = signals.stop.cancelled() => Ending::Aborted(AbortReason::Stopping),
      _ = tokio::time::sleep_until(deadline) => Ending::Aborted(AbortReason::TimedOut),
      value = settled => Ending::Settled(value),
      _ = relay_gone => Ending::RelayGone,
    }
  }

  /// The error answer for an ending from outside; `None` for mcpd's cancel.
  fn reply_for(&self, reason: AbortReason) -> Option<ErrorReply> {
    match reason {
      AbortReason::Cancelled => None,
      AbortReason::Stopping => Some(ErrorReply::unavailable()),
      AbortReason::TimedOut => Some(ErrorReply::timeout(self.task_timeout.as_millis() as u64)),
      AbortReason::Failed | AbortReason::Abandoned => None,
    }
  }

  async fn complete_task(
    &self,
    provider: &Arc<dyn Provider>,
    call: ProviderCall,
    identity: AnswerIdentity,
    detail: ErrorDetail,
  ) -> Outcome {
    let task_id = call.task_id.clone();
    let deadline = Instant::now() + self.task_timeout;
    self.spent.lock().reached = true;
    let settled = self
      .decide(deadline, provider.complete(call), std::future::pending())
      .await;
    let settled = match settled {
      Ending::Settled(settled) => settled,
      Ending::Aborted(reason) => {
        provider.abort(&task_id, reason);
        return match self.reply_for(reason) {
          Some(reply) => self.fail(&task_id, &reply).await,
          None => Outcome::Cancelled,
        };
      }
      Ending::RelayGone => unreachable!("a non-streaming task has no relay"),
    };
    match settled
      .map_err(|failure| failure.0)
      .and_then(openai::parse_result)
    {
      Ok(result) => {
        self.clock.result_read(&result);
        self
          .clock
          .answered_by(result.model.as_deref().unwrap_or(&identity.model));
        {
          let mut spent = self.spent.lock();
          spent.usage = result.usage;
          spent.text_chars = openai::result_chars(&result);
          spent.finish_reason = Some(openai::result_finish_reason(&result));
          spent.answer_model = Some(
            result
              .model
              .clone()
              .unwrap_or_else(|| identity.model.clone()),
          );
        }
        let body = openai::ChatCompletion::new(&identity, &result);
        self
          .post_result(&task_id, 200, &body, Outcome::Completed)
          .await
      }
      Err(message) => {
        let reply = failure::provider_failed(detail, message);
        self.fail(&task_id, &reply).await
      }
    }
  }

  async fn stream_task(
    &self,
    provider: &Arc<dyn Provider>,
    call: ProviderCall,
    encoder: StreamEncoder,
    detail: ErrorDetail,
  ) -> Outcome {
    let task_id = call.task_id.clone();
    let deadline = Instant::now() + self.task_timeout;
    // Payloads are made ready-escaped for the chunk POST's body.
    let mut encoder = encoder.into_form(PayloadForm::JsonStringContent);
    let outbox = Outbox::new();
    let relay = relay_chunks(self.client, &task_id, &outbox, &self.signals, &self.trace);
    // `produce` calls the provider on its first poll: an ending that wins
    // before that has no call to abort.
    let called = AtomicBool::new(false);
    let abort = |reason| {
      if called.load(Ordering::Relaxed) {
        provider.abort(&task_id, reason);
      }
    };
    let produce = async {
      // However this block ends, the relay then posts what is left and ends.
      let producer = Producer(&outbox);
      let produced = produce(
        provider.as_ref(),
        call,
        &called,
        &mut encoder,
        &self.clock,
        &outbox,
        detail,
      );
      let ending = self.decide(deadline, produced, outbox.relay_gone()).await;
      let reply = match ending {
        Ending::Settled(Ok(())) => return Outcome::Completed,
        Ending::Settled(Err(Produced::RelayClosed)) | Ending::RelayGone => {
          abort(AbortReason::Abandoned);
          return Outcome::Failed;
        }
        Ending::Settled(Err(Produced::Failed(reply))) => {
          // Let go of the provider's iterator whatever went wrong.
          abort(AbortReason::Failed);
          reply
        }
        Ending::Aborted(reason) => {
          abort(reason);
          match self.reply_for(reason) {
            Some(reply) => reply,
            None => return Outcome::Cancelled,
          }
        }
      };
      if encoder.started() {
        // Payloads went out: the error goes in-band, then [DONE].
        let mut out = Payloads::default();
        *self.failure.lock() = Some(reply.kind);
        encoder.fail(&failure::scrubbed(&reply, self.client.token()), &mut out);
        let _ = outbox.push_escaped(&mut out).await;
        Outcome::Failed
      } else {
        drop(producer);
        self.fail(&task_id, &reply).await
      }
    };
    let (outcome, relayed) = tokio::join!(produce, relay);
    {
      let (usage, text_chars) = encoder.spent();
      let (model, finish_reason) = encoder.answer();
      let mut spent = self.spent.lock();
      spent.reached = called.load(Ordering::Relaxed);
      spent.usage = usage;
      spent.text_chars = text_chars;
      if encoder.started() {
        spent.answer_model = Some(model.to_owned());
        spent.finish_reason = finish_reason;
      }
    }
    if encoder.started() && !matches!(relayed, Relayed::Cancelled) {
      self.answered.store(200, Ordering::Relaxed);
    }
    match (outcome, relayed) {
      (Outcome::Cancelled, _) | (_, Relayed::Cancelled) => Outcome::Cancelled,
      (outcome, Relayed::Finished) => outcome,
      (_, Relayed::Undelivered) => Outcome::Failed,
    }
  }

  /// The span's `error.type` for `outcome`: none when it completed.
  pub fn error_type(&self, outcome: Outcome) -> Option<&'static str> {
    match outcome {
      Outcome::Completed => None,
      Outcome::Cancelled => Some("cancelled"),
      Outcome::Failed => Some(self.failure.lock().unwrap_or("_OTHER")),
    }
  }

  /// How the task's span ends, once `outcome` is known (built only for a
  /// task whose span was recorded).
  pub fn span_end(&self, outcome: Outcome) -> SpanEnd {
    let error_type = self.error_type(outcome);
    let spent = self.spent.lock();
    SpanEnd {
      error_type,
      response_model: spent.answer_model.clone(),
      finish_reason: spent.finish_reason,
      input_tokens: spent.usage.map(|usage| usage.prompt_tokens),
      output_tokens: spent.usage.map(|usage| usage.completion_tokens),
    }
  }

  /// Answers a task with an OpenAI error body on the result endpoint, its
  /// message scrubbed of the token.
  async fn fail(&self, task_id: &str, reply: &ErrorReply) -> Outcome {
    *self.failure.lock() = Some(reply.kind);
    let reply = &failure::scrubbed(reply, self.client.token());
    tracing::debug!(task_id, status = reply.status, message = %reply.message, "answering with an error");
    self
      .post_result_with(
        task_id,
        reply.status,
        &reply.body(),
        reply.headers().as_ref(),
        Outcome::Failed,
      )
      .await
  }

  /// POSTs a result; `delivered` is the outcome when it arrives.
  async fn post_result<B: serde::Serialize + ?Sized + Sync>(
    &self,
    task_id: &str,
    status: u16,
    body: &B,
    delivered: Outcome,
  ) -> Outcome {
    self
      .post_result_with(task_id, status, body, None, delivered)
      .await
  }

  /// POSTs a result with response headers for mcpd to relay (`retry-after`).
  async fn post_result_with<B: serde::Serialize + ?Sized + Sync>(
    &self,
    task_id: &str,
    status: u16,
    body: &B,
    headers: Option<&serde_json::Value>,
    delivered: Outcome,
  ) -> Outcome {
    let delivery = deliver(&self.signals, || {
      self
        .client
        .post_result_with(task_id, status, body, headers, self.trace.header())
    })
    .await;
    match delivery {
      Delivery::Delivered => {
        self.answered.store(status, Ordering::Relaxed);
        delivered
      }
      Delivery::Cancelled => {
        tracing::debug!(task_id, "cancelled while its result was being delivered");
        Outcome::Cancelled
      }
      Delivery::Gone => {
        tracing::debug!(task_id, "mcpd no longer knows the task; result dropped");
        Outcome::Failed
      }
      Delivery::Failed(error) => {
        tracing::warn!(task_id, error = %describe(&error), "could not deliver the task's result");
        Outcome::Failed
      }
    }
  }
}

/// The producer's hold on a task's outbox: dropped, it lets the relay finish.
struct Producer<'a>(&'a Outbox);

impl Drop for Producer<'_> {
  fn drop(&mut self) {
    self.0.close_producer();
  }
}

/// Why producing a stream stopped early.
enum Produced {
  Failed(ErrorReply),
  /// The relay is gone (its receiver dropped).
  RelayClosed,
}

/// Pulls the provider's chunks (or its one result, for a provider without
/// `stream()`) and hands the payloads to the relay, waiting while it is full.
async fn produce(
  provider: &dyn Provider,
  call: ProviderCall,
  called: &AtomicBool,
  encoder: &mut StreamEncoder,
  clock: &TaskClock,
  outbox: &Outbox,
  detail: ErrorDetail,
) -> Result<(), Produced> {
  let provider_failed =
    |message: String| Produced::Failed(failure::provider_failed(detail, message));
  let mut out = Payloads::default();
  called.store(true, Ordering::Relaxed);
  if provider.can_stream() {
    // The one call into the provider; its chunks then come from the core's
    // window, typed and several at a time (one await per run, not per token).
    let mut reader = provider
      .stream(call)
      .await
      .map_err(|failure| provider_failed(failure.0))?;
    loop {
      let mut content = false;
      let more = reader
        .next_items(|item| match item {
          ChunkItem::Content(text) => {
            content = true;
            clock.content_chunk_read(text);
            encoder.push_content(text, &mut out);
          }
          ChunkItem::Chunk(chunk) => {
            content |= clock.chunk_read(&chunk);
            encoder.push(chunk, &mut out);
          }
        })
        .await
        .map_err(|failure| provider_failed(failure.0))?;
      if !more {
        break;
      }
      clock.run_read(content);
      send_all(outbox, &mut out).await?;
    }
  } else {
    let value = provider
      .complete(call)
      .await
      .map_err(|failure| provider_failed(failure.0))?;
    let result = openai::parse_result(value).map_err(provider_failed)?;
    clock.result_read(&result);
    encoder.push_result(result, &mut out);
  }
  encoder.finish(&mut out);
  send_all(outbox, &mut out).await
}

async fn send_all(outbox: &Outbox, out: &mut Payloads) -> Result<(), Produced> {
  outbox
    .push_escaped(out)
    .await
    .map_err(|_| Produced::RelayClosed)
}

#[cfg(test)]
mod tests {
  //! The order of `decide` when several endings are ready at once.
  use super::*;
  use crate::provider::{BoxFuture, ProviderFailure};
  use crate::secret::Secret;
  use crate::stream::ChunkReader;
  use parking_lot::Mutex;
  use serde_json::Value;
  use tokio_util::sync::CancellationToken;

  /// A provider that never settles and records the aborts it gets.
  #[derive(Default)]
  struct Silent(Mutex<Vec<AbortReason>>);

  impl Provider for Silent {
    fn can_stream(&self) -> bool {
      false
    }
    fn complete(&self, _: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
      Box::pin(std::future::pending())
    }
    fn stream(&self, _: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
      Box::pin(std::future::pending())
    }
    fn abort(&self, _: &str, reason: AbortReason) {
      self.0.lock().push(reason);
    }
  }

  /// Runs one non-streaming task with the given endings already fired;
  /// answers go to a closed port (refused at once, never retried once stopping).
  async fn race(cancel: bool, stop: bool, timeout: Duration) -> (Outcome, Vec<AbortReason>) {
    let client = McpdClient::new("http://127.0.0.1:9", Secret::new("t"), false).unwrap();
    let signals = TaskSignals {
      cancel: CancellationToken::new(),
      stop: CancellationToken::new(),
      kill: CancellationToken::new(),
    };
    if cancel {
      signals.cancel.cancel();
    }
    if stop {
      signals.stop.cancel();
    }
    let context = TaskContext {
      client: &client,
      task_timeout: timeout,
      signals,
      answered: AtomicU16::new(0),
      spent: Mutex::new(Spent::default()),
      clock: TaskClock::new(Instant::now(), None, false, false),
      trace: Arc::default(),
      failure: Mutex::new(None),
    };
    let silent = Arc::new(Silent::default());
    let provider: Arc<dyn Provider> = silent.clone();
    let call = ProviderCall {
      task_id: "t".into(),
      options: String::new(),
      trace: Arc::default(),
    };
    let identity = AnswerIdentity::new("t", "m".into());
    let outcome = context
      .complete_task(&provider, call, identity, ErrorDetail::Message)
      .await;
    let aborts = silent.0.lock().clone();
    (outcome, aborts)
  }

  #[tokio::test]
  async fn cancel_beats_stop_beats_timeout() {
    let (outcome, aborts) = race(true, true, Duration::ZERO).await;
    assert_eq!(
      (outcome, aborts),
      (Outcome::Cancelled, vec![AbortReason::Cancelled])
    );
    let (outcome, aborts) = race(false, true, Duration::ZERO).await;
    assert_eq!(
      (outcome, aborts),
      (Outcome::Failed, vec![AbortReason::Stopping])
    );
  }

  #[tokio::test(start_paused = true)]
  async fn timeout_alone_times_out() {
    let (outcome, aborts) = race(false, false, Duration::from_millis(10)).await;
    assert_eq!(
      (outcome, aborts),
      (Outcome::Failed, vec![AbortReason::TimedOut])
    );
  }
}
