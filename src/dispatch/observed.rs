//! What the dispatcher tells about each task that reached it (issue 17): what its
//! run measured ([`TaskClock`]), counted in the metrics ([`Measures`]) when it ended,
//! and, while observers are registered, the [`TaskRecord`] built from that and from
//! what was known at its arrival ([`Arrival`]), handed to them. A refused task id or
//! a replay never gets here (`accept`).
//!
//! Kept apart from `decide`/`settle`: it reads their results, never changes them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::admission::Lane;
use super::task::{Decision, Outcome, TaskContext};
use super::{Metering, TaskDispatcher};
use crate::observe::metrics::{Measures, ProviderMetrics, Scrape, UNKNOWN_PROVIDER};
use crate::observe::{TaskObserver, TaskRecord};
use crate::openai::{CompletionChunk, CompletionResult, ErrorReply, RawContent};
use crate::owner::Refusal;
use crate::wire::{self, TaskEvent};

/// "Not measured" in a [`TaskClock`] field.
const UNSET: u64 = u64::MAX;

/// What a task's run measured, from its arrival: lock-free, written only by the
/// task itself. Times are tokio's (`Instant`), so a paused clock drives them.
pub struct TaskClock {
  arrival: Instant,
  /// Nanoseconds from the arrival to the slot, to the first content, to the
  /// latest content read.
  slot: AtomicU64,
  first_content: AtomicU64,
  last_content: AtomicU64,
  /// The lane's inter-token histogram, for streams.
  gaps: Option<Arc<ProviderMetrics>>,
  /// The answer's text, gathered only when an observer wants content.
  text: Option<Mutex<String>>,
  /// The model the answer names, kept only while an observer is registered.
  model: Option<Mutex<Option<String>>>,
}

impl TaskClock {
  /// A clock started at `arrival`; `gaps` receives the stream's inter-token gaps;
  /// `keep_text` and `keep_model` are for a record's `content` and `response_model`.
  pub fn new(
    arrival: Instant,
    gaps: Option<Arc<ProviderMetrics>>,
    keep_text: bool,
    keep_model: bool,
  ) -> Self {
    Self {
      arrival,
      slot: AtomicU64::new(UNSET),
      first_content: AtomicU64::new(UNSET),
      last_content: AtomicU64::new(UNSET),
      gaps,
      text: keep_text.then(|| Mutex::new(String::new())),
      model: keep_model.then(|| Mutex::new(None)),
    }
  }

  fn since_arrival(&self) -> u64 {
    u64::try_from(self.arrival.elapsed().as_nanos()).unwrap_or(UNSET - 1)
  }

  fn read(field: &AtomicU64) -> Option<Duration> {
    match field.load(Ordering::Relaxed) {
      UNSET => None,
      nanos => Some(Duration::from_nanos(nanos)),
    }
  }

  /// The task holds a slot: its time in the queue ends.
  pub fn slot_granted(&self) {
    let _ = self.slot.compare_exchange(
      UNSET,
      self.since_arrival(),
      Ordering::Relaxed,
      Ordering::Relaxed,
    );
  }

  /// Content was read (a run of stream chunks pushed together, or a whole
  /// result): the first token's time, or one inter-token gap.
  fn content_read(&self) {
    let now = self.since_arrival();
    let last = self.last_content.swap(now, Ordering::Relaxed);
    if last == UNSET {
      self.first_content.store(now, Ordering::Relaxed);
    } else if let Some(metrics) = &self.gaps {
      metrics.inter_token_gap(Duration::from_nanos(now.saturating_sub(last)));
    }
  }

  /// A run of chunks read from a provider's stream (the chunks of one push).
  #[cfg(test)]
  pub fn chunks_read(&self, chunks: &[CompletionChunk]) {
    let mut content = false;
    for chunk in chunks {
      content |= self.chunk_read(chunk);
    }
    self.run_read(content);
  }

  /// One typed chunk of a run: its content kept for the observer (if it keeps
  /// the text); answers whether it carried content or a tool call.
  pub fn chunk_read(&self, chunk: &CompletionChunk) -> bool {
    let text = chunk.content.as_deref().unwrap_or_default();
    self.keep_text(text);
    let calls = chunk
      .tool_calls
      .as_ref()
      .is_some_and(|calls| !calls.is_empty());
    !text.is_empty() || calls
  }

  /// One chunk of a run with only content, as its JSON string: decoded only
  /// for an observer that keeps the text.
  pub fn content_chunk_read(&self, content: RawContent<'_>) {
    if self.text.is_some() {
      self.keep_text(&content.decode());
    }
  }

  fn keep_text(&self, text: &str) {
    if let (Some(kept), false) = (&self.text, text.is_empty()) {
      kept.lock().push_str(text);
    }
  }

  /// A run read: `content`, whether any of its chunks carried content or a
  /// tool call (the first token's time, or one inter-token gap).
  pub fn run_read(&self, content: bool) {
    if content {
      self.content_read();
    }
  }

  /// The model the answer names (the provider's, else the request's).
  pub fn answered_by(&self, model: &str) {
    if let Some(kept) = &self.model {
      *kept.lock() = Some(model.to_owned());
    }
  }

  /// A provider's whole result (`complete()`).
  pub fn result_read(&self, result: &CompletionResult) {
    let text = result.content.as_deref().unwrap_or_default();
    let calls = result
      .tool_calls
      .as_ref()
      .is_some_and(|calls| !calls.is_empty());
    if let (Some(kept), false) = (&self.text, text.is_empty()) {
      kept.lock().push_str(text);
    }
    if !text.is_empty() || calls {
      self.content_read();
    }
  }
}

/// What is known of a task when it arrives: what the metrics need (always, and
/// cheap), and what a record needs (only while an observer is registered).
pub struct Arrival {
  /// A streamed task that runs: its first token and gaps are measured.
  stream: bool,
  refused: Option<Refusal>,
  /// Counted in `status()` (and so in the metrics) at admission: answered
  /// without running.
  counted: bool,
  detail: Option<ArrivalDetail>,
}

/// The part of an [`Arrival`] that only a [`TaskRecord`] carries.
struct ArrivalDetail {
  provider: String,
  /// Whether the task asked for a stream (also for a task answered without running).
  stream: bool,
  caller_id: Option<String>,
  request_model: Option<String>,
  messages: Option<Value>,
}

/// The few body fields a record wants from a task that did not run (the
/// dispatcher parsed no body for it, or dropped it): a lenient look.
#[derive(Deserialize, Default)]
struct Peek {
  #[serde(default)]
  model: Option<Value>,
  #[serde(default)]
  stream: Option<Value>,
  #[serde(default)]
  messages: Option<Value>,
}

impl Peek {
  fn of(event: Option<&TaskEvent>) -> Self {
    event
      .and_then(|event| event.body.as_deref())
      .and_then(|raw| serde_json::from_str(raw.get()).ok())
      .unwrap_or_default()
  }
}

/// The owner's refusal an answer says, if it is one (`ErrorReply::refused`'s codes,
/// and the 429 of a full queue).
pub fn refusal_of(reply: &ErrorReply) -> Option<Refusal> {
  if reply.code == ErrorReply::rate_limited("").code {
    return Some(Refusal::QueueFull);
  }
  Refusal::ALL
    .into_iter()
    .find(|refusal| refusal.as_str() == reply.code)
}

impl TaskDispatcher {
  /// Adds an observer told about every task that ends from now on (the audit
  /// log). Called when the registrar is made.
  pub fn add_observer(&self, observer: Arc<dyn TaskObserver>) {
    let mut observers = self.observers.write();
    let mut list: Vec<Arc<dyn TaskObserver>> = observers.iter().cloned().collect();
    list.push(observer);
    *observers = list.into();
  }

  /// The metric handles of a lane (resolved once per lane), or of "(unknown)".
  fn provider_metrics<'a>(&'a self, lane: Option<&'a Lane>) -> &'a Arc<ProviderMetrics> {
    match lane {
      Some(lane) => lane
        .metrics
        .get_or_init(|| self.metrics.provider(lane.name())),
      None => self.metrics.unknown(),
    }
  }

  /// A new task's clock and what its record needs from its arrival. A task
  /// answered without running is counted in the metrics now, as `status()`
  /// counts it. Without observers nothing is copied or parsed for a record;
  /// the body is looked at again only for a task that will not run, or for its
  /// messages when an observer wants content.
  pub(super) fn arrived(
    &self,
    started: Instant,
    event: Option<&TaskEvent>,
    decision: &Decision,
    lane: Option<&Lane>,
    metering: Option<&Metering>,
  ) -> (TaskClock, Arrival) {
    let (observed, content) = {
      let observers = self.observers.read();
      let content = observers.iter().any(|observer| observer.wants_content());
      (!observers.is_empty(), content)
    };
    let (stream, refused, counted) = match decision {
      Decision::Run { stream, .. } => (*stream, None, false),
      Decision::Answer(reply) => (false, refusal_of(reply), true),
    };
    if counted {
      self.provider_metrics(lane).task_ended(&Measures {
        outcome: Outcome::Failed,
        refused,
        stream: false,
        queue: None,
        time_to_first_token: None,
        duration: Duration::ZERO,
        tokens: None,
      });
    }
    let detail = observed.then(|| {
      let provider = lane.map_or(UNKNOWN_PROVIDER, Lane::name).to_owned();
      match decision {
        Decision::Run { request, .. } => ArrivalDetail {
          provider,
          stream,
          caller_id: metering
            .and_then(|metering| metering.caller.as_ref())
            .map(|caller| caller.id.clone()),
          request_model: request.model.clone(),
          messages: content.then(|| Peek::of(event).messages).flatten(),
        },
        Decision::Answer(_) => {
          let peek = Peek::of(event);
          ArrivalDetail {
            provider,
            stream: event
              .and_then(|event| event.stream)
              .or_else(|| peek.stream.as_ref().and_then(Value::as_bool))
              .unwrap_or(false),
            // Only a caller that parses: a malformed one is mcpd's string unchecked.
            caller_id: event
              .and_then(|event| event.caller.as_deref())
              .and_then(|raw| wire::parse_caller(raw).ok())
              .map(|caller| caller.id),
            request_model: peek
              .model
              .and_then(|model| model.as_str().map(str::to_owned)),
            messages: peek.messages.filter(|_| content),
          }
        }
      }
    });
    let gaps = stream.then(|| Arc::clone(self.provider_metrics(lane)));
    let clock = TaskClock::new(started, gaps, content, observed);
    let arrival = Arrival {
      stream,
      refused,
      counted,
      detail,
    };
    (clock, arrival)
  }

  /// Counts a task that ended in the metrics (unless it was counted when it
  /// arrived), then, when observers are registered, builds its record and tells
  /// them. `tokens` are those `settle()` booked. Called before the task is
  /// retired, so `status()`, `usage()` and `metrics()` agree once it shows ended.
  pub(super) fn ended(
    &self,
    task_id: &str,
    lane: Option<&Lane>,
    arrival: Arrival,
    context: &TaskContext<'_>,
    tokens: Option<(u64, u64)>,
    outcome: Outcome,
  ) {
    let clock = &context.clock;
    let measures = Measures {
      outcome,
      refused: arrival.refused,
      stream: arrival.stream,
      queue: TaskClock::read(&clock.slot),
      time_to_first_token: TaskClock::read(&clock.first_content),
      duration: clock.arrival.elapsed(),
      tokens,
    };
    if !arrival.counted {
      self.provider_metrics(lane).task_ended(&measures);
    }
    let Some(detail) = arrival.detail else {
      return;
    };
    let record = TaskRecord {
      time: SystemTime::now(),
      task_id: task_id.to_owned(),
      provider: detail.provider,
      caller_id: detail.caller_id,
      request_model: detail.request_model,
      response_model: clock.model.as_ref().and_then(|model| model.lock().take()),
      stream: detail.stream,
      outcome,
      status: context.answered.load(Ordering::Relaxed),
      refused: arrival.refused,
      prompt_tokens: tokens.map(|(prompt, _)| prompt),
      completion_tokens: tokens.map(|(_, completion)| completion),
      queue: measures.queue,
      time_to_first_token: measures.time_to_first_token,
      duration: measures.duration,
      trace_id: context.trace.trace_id().map(str::to_owned),
      messages: detail.messages,
      // No text read (a task answered without running, a tool call): none.
      content: clock
        .text
        .as_ref()
        .map(|text| std::mem::take(&mut *text.lock()))
        .filter(|text| !text.is_empty()),
    };
    let observers = Arc::clone(&self.observers.read());
    for observer in observers.iter() {
      observer.task_ended(&record);
    }
  }

  /// The figures a scrape reads from the lanes: every lane that exists now, by name.
  pub fn lane_figures(&self) -> Vec<(String, u32, u32)> {
    let lanes = self.lanes.read();
    let retired = lanes.retired.iter().filter_map(std::sync::Weak::upgrade);
    let mut figures: Vec<(String, u32, u32)> = lanes
      .serving
      .values()
      .cloned()
      .chain(retired)
      .map(|lane| {
        let load = lane.load();
        (load.name, load.in_flight, load.queued)
      })
      .collect();
    figures.sort();
    figures.dedup_by(|a, b| a.0 == b.0);
    figures
  }

  /// The metrics' text, with the lanes read now and the registrar's figures.
  pub fn metrics_text(&self, scrape: impl FnOnce(Vec<(String, u32, u32)>) -> Scrape) -> String {
    self.metrics.render(&scrape(self.lane_figures()))
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn every_refusal_answer_names_its_refusal_and_other_answers_none() {
    for refusal in Refusal::ALL {
      let reply = ErrorReply::refused(refusal, String::new());
      assert_eq!(refusal_of(&reply), Some(refusal));
    }
    assert_eq!(
      refusal_of(&ErrorReply::rate_limited("p")),
      Some(Refusal::QueueFull)
    );
    for reply in [
      ErrorReply::model_not_found("p"),
      ErrorReply::invalid_request("x"),
      ErrorReply::unavailable(),
      ErrorReply::provider_error("x"),
      ErrorReply::timeout(1),
    ] {
      assert_eq!(refusal_of(&reply), None, "{}", reply.code);
    }
  }

  #[tokio::test(start_paused = true)]
  async fn the_clock_measures_queue_first_content_and_gaps_on_tokio_time() {
    let metrics = crate::observe::metrics::RegistrarMetrics::new();
    let lane = metrics.provider("p");
    let clock = TaskClock::new(Instant::now(), Some(Arc::clone(&lane)), true, true);
    tokio::time::advance(Duration::from_millis(40)).await;
    clock.slot_granted();
    tokio::time::advance(Duration::from_millis(10)).await;
    clock.slot_granted(); // the first grant counts
    let chunk = |text: &str| CompletionChunk {
      content: Some(text.to_owned()),
      ..CompletionChunk::default()
    };
    // A run without content (a role chunk, say) is no token.
    clock.chunks_read(&[chunk("")]);
    tokio::time::advance(Duration::from_millis(100)).await;
    clock.chunks_read(&[chunk("Hel"), chunk("lo")]);
    tokio::time::advance(Duration::from_millis(25)).await;
    clock.chunks_read(&[chunk(" world")]);
    assert_eq!(
      TaskClock::read(&clock.slot),
      Some(Duration::from_millis(40))
    );
    assert_eq!(
      TaskClock::read(&clock.first_content),
      Some(Duration::from_millis(150))
    );
    assert_eq!(clock.text.as_ref().unwrap().lock().as_str(), "Hello world");
    assert_eq!(lane.inter_token_latency.get_sample_count(), 1);
    assert!((lane.inter_token_latency.get_sample_sum() - 0.025).abs() < 1e-9);
  }

  #[tokio::test(start_paused = true)]
  async fn content_handed_over_as_its_json_string_is_kept_decoded_and_timed_once_a_run() {
    let metrics = crate::observe::metrics::RegistrarMetrics::new();
    let lane = metrics.provider("p");
    let clock = TaskClock::new(Instant::now(), Some(Arc::clone(&lane)), true, false);
    let json = [r#""a \"q\"""#, r#""\n\u001f🦀""#];
    let raw = json.map(|json| RawContent::new(json).unwrap());
    tokio::time::advance(Duration::from_millis(30)).await;
    clock.content_chunk_read(raw[0]);
    clock.content_chunk_read(raw[1]);
    clock.run_read(true);
    tokio::time::advance(Duration::from_millis(20)).await;
    let typed = CompletionChunk {
      content: Some("!".to_owned()),
      ..CompletionChunk::default()
    };
    let content = clock.chunk_read(&typed);
    clock.run_read(content);
    assert_eq!(
      clock.text.as_ref().unwrap().lock().as_str(),
      "a \"q\"\n\u{1f}🦀!"
    );
    assert_eq!(
      TaskClock::read(&clock.first_content),
      Some(Duration::from_millis(30))
    );
    assert_eq!(lane.inter_token_latency.get_sample_count(), 1);
    // Without an observer that keeps the text, nothing is decoded or kept.
    let bare = TaskClock::new(Instant::now(), None, false, false);
    bare.content_chunk_read(raw[0]);
    assert!(bare.text.is_none());
  }

  #[tokio::test(start_paused = true)]
  async fn a_clock_without_content_wanted_keeps_no_text() {
    let clock = TaskClock::new(Instant::now(), None, false, false);
    clock.result_read(&CompletionResult {
      content: Some("secret".to_owned()),
      tool_calls: None,
      finish_reason: None,
      usage: None,
      model: None,
    });
    assert!(clock.text.is_none());
    assert_eq!(TaskClock::read(&clock.first_content), Some(Duration::ZERO));
  }
}
