//! The task engine: turns `task` and `cancel` events into exactly one outcome
//! per task (docs/protocol.md section 4).
//!
//! Shape: `TaskDispatcher` is a plain struct owned by the registrar. It admits
//! each task synchronously, in arrival order, on the control channel's task
//! (`admission`), checks the replay guard (`replay`), and runs the task's life
//! (`task`, with `relay` and `delivery` for its POSTs) on the registrar's
//! `TaskTracker`. Every task has a `CancellationToken` of its own for mcpd's
//! cancel and a child of the registrar's root token for stop; `stop()` in the
//! registrar cancels the root and waits on the tracker. The dispatcher's one
//! lock (`Book`) holds the live tasks, the replay guard and the counters.
//!
//! The published set can change (`update()`, docs/protocol.md section 1): the
//! registrar's supervisor calls `serve` with the set mcpd has accepted (and
//! the one it is asking mcpd to accept, so that a task for a joining name is
//! never refused while the answer is on its way). A name that left is no
//! longer routed (404 `model_not_found`); its tasks already admitted hold
//! their lane and run to their end.

mod admission;
mod delivery;
mod failure;
mod observed;
mod relay;
mod replay;
mod task;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::mcpd::McpdClient;
use crate::observe::metrics::RegistrarMetrics;
use crate::observe::TaskObserver;
use crate::openai::{self, Caller, CompletionTrace, ErrorReply};
use crate::owner::usage::{UsageBook, UsageReport};
use crate::owner::{estimate_tokens, Charge, OwnerPolicy, Refusal};
use crate::provider::Provider;
use crate::trace::{SpanEnd, TaskTrace, TraceContext};
use crate::wire::{self, CancelEvent, ProviderDescriptor, ProviderLoad, TaskEvent};

pub use delivery::{deliver, Delivery, DeliverySignals, DELIVERY_DEADLINE};
pub use observed::TaskClock;
pub use replay::{ReplayGuard, MAX_IDS, MAX_ID_BYTES, REPLAY_WINDOW};
pub use task::Outcome;

use admission::Lane;
use task::{Decision, Spent, TaskContext, TaskSignals};

#[derive(Debug, Clone, Copy)]
pub struct DispatchSettings {
  pub task_timeout: Duration,
  pub max_concurrency: u32,
  pub max_queue: u32,
}

/// The `taskTimeoutMs` option's default.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(600);
/// The `maxConcurrency` option's default (per provider).
pub const DEFAULT_MAX_CONCURRENCY: u32 = 4;
/// The `maxQueue` option's default (per provider).
pub const DEFAULT_MAX_QUEUE: u32 = 64;

impl Default for DispatchSettings {
  fn default() -> Self {
    Self {
      task_timeout: DEFAULT_TASK_TIMEOUT,
      max_concurrency: DEFAULT_MAX_CONCURRENCY,
      max_queue: DEFAULT_MAX_QUEUE,
    }
  }
}

/// A provider the registrar publishes.
#[derive(Clone)]
pub struct PublishedProvider {
  pub descriptor: ProviderDescriptor,
  pub provider: Arc<dyn Provider>,
  /// The owner's `allowCallers` and `limits`.
  pub policy: Arc<OwnerPolicy>,
}

/// The task counters of `status()`: received = completed + failed +
/// cancelled + in flight + queued, always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadTotals {
  pub received: u64,
  pub in_flight: u32,
  pub queued: u32,
  pub completed: u64,
  pub failed: u64,
  pub cancelled: u64,
}

/// The owners a dispatcher's tasks answer to (the registrar's).
#[derive(Clone)]
pub struct Owners {
  /// Spawns and waits for every task.
  pub tracker: TaskTracker,
  /// Cancelled by `stop()`; each task holds a child.
  pub root: CancellationToken,
  /// Cancelled when the stop's grace ran out: POSTs in flight are dropped.
  pub kill: CancellationToken,
}

/// Live tasks, the replay guard and the counters, under one lock.
#[derive(Default)]
struct Book {
  live: HashMap<String, CancellationToken>,
  guard: ReplayGuard,
  received: u64,
  completed: u64,
  failed: u64,
  cancelled: u64,
}

/// The lanes tasks are routed to, and which of them mcpd has accepted.
#[derive(Default)]
struct Lanes {
  /// By name: the published set, plus names joining in an update not yet accepted.
  serving: HashMap<String, Arc<Lane>>,
  /// The set mcpd accepted, in the order it was given (status, heartbeat).
  published: Vec<String>,
  /// Lanes of names that left, while tasks still hold them (their queue
  /// still counts; a name that comes back gets its lane again).
  retired: Vec<Weak<Lane>>,
}

/// What the owner paused: the whole registrar, or some providers by name.
#[derive(Default)]
struct Pauses {
  whole: bool,
  names: std::collections::HashSet<String>,
}

/// What a task that was admitted carries for the owner's books until it ends.
struct Metering {
  caller: Option<Caller>,
  charge: Charge,
  /// The characters of the prompt's text, for the token estimate.
  prompt_chars: u64,
}

pub struct TaskDispatcher {
  lanes: RwLock<Lanes>,
  client: Arc<McpdClient>,
  settings: DispatchSettings,
  owners: Owners,
  book: Mutex<Book>,
  pauses: Mutex<Pauses>,
  usage: Mutex<UsageBook>,
  /// Told each time an admitted task ends (for `pause({ drain })`).
  task_ended: Notify,
  /// Told about every task that ended (observed.rs); swapped whole, read per task.
  observers: RwLock<Arc<[Arc<dyn TaskObserver>]>>,
  /// This registrar's own metrics (no global registry).
  metrics: RegistrarMetrics,
}

impl TaskDispatcher {
  pub fn new(
    providers: Vec<PublishedProvider>,
    client: Arc<McpdClient>,
    settings: DispatchSettings,
    owners: Owners,
  ) -> Self {
    let dispatcher = Self {
      lanes: RwLock::new(Lanes::default()),
      client,
      settings,
      owners,
      book: Mutex::new(Book::default()),
      pauses: Mutex::new(Pauses::default()),
      usage: Mutex::new(UsageBook::default()),
      task_ended: Notify::new(),
      observers: RwLock::new(Arc::new([])),
      metrics: RegistrarMetrics::new(),
    };
    dispatcher.serve(&providers, &[]);
    dispatcher
  }

  /// Routes tasks to `published` (the set mcpd accepted) and to the names of
  /// `joining` not in it (a set being registered). Names in neither are no
  /// longer routed; their admitted tasks run to their end. A kept name keeps
  /// its lane (slots, queue, counters) and runs later tasks with its new entry.
  pub fn serve(&self, published: &[PublishedProvider], joining: &[PublishedProvider]) {
    let mut lanes = self.lanes.write();
    let mut previous = std::mem::take(&mut lanes.serving);
    let mut retired: Vec<Arc<Lane>> = lanes.retired.iter().filter_map(Weak::upgrade).collect();
    let mut serving = HashMap::new();
    let accepted = published.iter().map(|p| (p, true));
    let asked = joining.iter().map(|p| (p, false));
    for (entry, is_published) in accepted.chain(asked) {
      let name = &entry.descriptor.name;
      if serving.contains_key(name) {
        continue;
      }
      let kept = previous.remove(name).or_else(|| {
        let index = retired.iter().position(|lane| lane.name() == name)?;
        Some(retired.swap_remove(index))
      });
      let lane = match kept {
        // A joining name already served runs with its accepted entry until
        // mcpd accepts the new one.
        Some(lane) if is_published || !lanes.published.contains(name) => {
          lane.republish(entry.clone());
          lane
        }
        Some(lane) => lane,
        None => Arc::new(Lane::new(
          entry.clone(),
          self.settings.max_concurrency,
          self.settings.max_queue,
        )),
      };
      serving.insert(name.clone(), lane);
    }
    retired.extend(previous.into_values());
    lanes.retired = retired.iter().map(Arc::downgrade).collect();
    lanes.serving = serving;
    lanes.published = published
      .iter()
      .map(|p| p.descriptor.name.clone())
      .collect();
  }

  /// The set mcpd accepted (or that start() will register), in order.
  pub fn published(&self) -> Vec<PublishedProvider> {
    let lanes = self.lanes.read();
    lanes
      .published
      .iter()
      .filter_map(|name| lanes.serving.get(name))
      .map(|lane| PublishedProvider::clone(&lane.published()))
      .collect()
  }

  /// The names of the published set, in order (`status().providers`).
  pub fn published_names(&self) -> Vec<String> {
    self.lanes.read().published.clone()
  }

  /// The load figures the heartbeat reports, one entry per published provider.
  pub fn loads(&self) -> Vec<ProviderLoad> {
    let lanes = self.lanes.read();
    let pauses = self.pauses.lock();
    let mut loads: Vec<ProviderLoad> = lanes
      .published
      .iter()
      .filter_map(|name| lanes.serving.get(name))
      .map(|lane| ProviderLoad {
        paused: pauses.whole || pauses.names.contains(lane.name()),
        ..lane.load()
      })
      .collect();
    loads.sort_by(|a, b| a.name.cmp(&b.name));
    loads
  }

  pub fn totals(&self) -> LoadTotals {
    let book = self.book.lock();
    // Read under the book's lock: a queued task is always received and not
    // ended. Lanes of names that left still hold queued tasks.
    let queued: u32 = {
      let lanes = self.lanes.read();
      let serving: u32 = lanes.serving.values().map(|lane| lane.queued()).sum();
      let retired: u32 = lanes
        .retired
        .iter()
        .filter_map(Weak::upgrade)
        .map(|lane| lane.queued())
        .sum();
      serving + retired
    };
    let ended = book.completed + book.failed + book.cancelled;
    LoadTotals {
      received: book.received,
      in_flight: book
        .received
        .saturating_sub(ended)
        .saturating_sub(u64::from(queued)) as u32,
      queued,
      completed: book.completed,
      failed: book.failed,
      cancelled: book.cancelled,
    }
  }

  /// How many task ids the replay guard remembers (for tests and diagnostics).
  pub fn remembered(&self) -> usize {
    self.book.lock().guard.len()
  }

  /// How many tasks are admitted and not yet ended (for tests and diagnostics):
  /// a task leaves only at the very end of its life, after its last POST.
  pub fn live(&self) -> usize {
    self.book.lock().live.len()
  }

  /// A `task` event: runs it unless its id is refused or was seen in the last 10 minutes.
  pub fn accept(self: &Arc<Self>, data: &str) {
    let (task_id, parsed) = match wire::parse_task(data) {
      Ok(event) => (event.task_id.clone(), Ok(event)),
      Err(malformed) => match malformed.task_id {
        Some(task_id) => (task_id, Err(malformed.error)),
        None => {
          return tracing::warn!(error = %malformed.error, "ignoring a task event without a readable taskId")
        }
      },
    };
    if let Some(why) = wire::refuse_task_id(&task_id) {
      let shown: String = task_id.chars().take(64).collect();
      return tracing::warn!(task_id = %shown, reason = why, "refusing a task; not run, nothing posted");
    }
    let cancel = {
      let mut book = self.book.lock();
      if book.live.contains_key(&task_id) || book.guard.seen(&task_id) {
        return tracing::debug!(task_id, "task already running or answered; not run again");
      }
      let cancel = CancellationToken::new();
      book.live.insert(task_id.clone(), cancel.clone());
      book.received += 1;
      cancel
    };
    let signals = TaskSignals {
      cancel,
      stop: self.owners.root.child_token(),
      kill: self.owners.kill.clone(),
    };
    // Every line of the task carries its id and provider (pino: taskId, provider).
    let provider = parsed
      .as_ref()
      .ok()
      .and_then(|event| event.provider.clone())
      .unwrap_or_default();
    let span = tracing::info_span!("task", task_id = %task_id, provider = %provider);
    let started = tokio::time::Instant::now();
    let trace = Arc::new(TaskTrace::new(
      parsed
        .as_ref()
        .ok()
        .and_then(|event| span.in_scope(|| received_trace(event))),
    ));
    let (mut decision, lane, metering) = match &parsed {
      Ok(event) => span.in_scope(|| self.decide(event)),
      Err(error) => (
        Decision::Answer(ErrorReply::invalid_request(format!(
          "the task event is malformed: {error}"
        ))),
        None,
        None,
      ),
    };
    // A task answered with an error without running (404, 400, 429, 503) is
    // failed from this moment: it never counts as in flight, whatever its
    // POST meets.
    if let Decision::Run { request, .. } = &mut decision {
      request.options.trace = trace.received().map(CompletionTrace::from);
    }
    let counted = matches!(decision, Decision::Answer(_));
    if counted {
      Self::count(&mut self.book.lock(), lane.as_deref(), Outcome::Failed);
    }
    let (clock, arrival) = self.arrived(
      started,
      parsed.as_ref().ok(),
      &decision,
      lane.as_deref(),
      metering.as_ref(),
    );
    drop(parsed);
    let dispatcher = Arc::clone(self);
    self.owners.tracker.spawn(
      async move {
        // A bug that panics a task must still leave it answered and counted.
        let context = TaskContext {
          client: &dispatcher.client,
          task_timeout: dispatcher.settings.task_timeout,
          signals,
          answered: AtomicU16::new(0),
          spent: Mutex::new(Spent::default()),
          clock,
          trace: Arc::clone(&trace),
          failure: Mutex::new(None),
        };
        let run = AssertUnwindSafe(context.run(&task_id, decision)).catch_unwind();
        let outcome = match run.await {
          Ok(outcome) => outcome,
          Err(_) => {
            tracing::error!(task_id, "task panicked inside the registrar; answering 502");
            let fallback = TaskContext {
              client: &dispatcher.client,
              task_timeout: dispatcher.settings.task_timeout,
              signals: TaskSignals {
                cancel: CancellationToken::new(),
                stop: dispatcher.owners.root.child_token(),
                kill: dispatcher.owners.kill.clone(),
              },
              answered: AtomicU16::new(0),
              spent: Mutex::new(Spent::default()),
              clock: TaskClock::new(started, None, false, false),
              trace: Arc::clone(&trace),
              failure: Mutex::new(None),
            };
            let reply = ErrorReply::provider_error("internal error in the registrar");
            fallback.run(&task_id, Decision::Answer(reply)).await;
            context
              .answered
              .store(fallback.answered.load(Ordering::Relaxed), Ordering::Relaxed);
            Outcome::Failed
          }
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        match context.answered.load(Ordering::Relaxed) {
          0 => tracing::info!(
            outcome = outcome.as_str(),
            duration_ms,
            "task ended without an answer"
          ),
          status => tracing::info!(
            outcome = outcome.as_str(),
            status,
            duration_ms,
            "task answered"
          ),
        }
        end_span(lane.as_deref(), &task_id, &context, outcome);
        let tokens = match (lane.as_deref(), metering) {
          (Some(lane), Some(metering)) => {
            let spent = std::mem::take(&mut *context.spent.lock());
            dispatcher.settle(lane, metering, spent)
          }
          _ => None,
        };
        dispatcher.ended(
          &task_id,
          lane.as_deref(),
          arrival,
          &context,
          tokens,
          outcome,
        );
        dispatcher.finish(&task_id, lane.as_deref(), (!counted).then_some(outcome));
      }
      .instrument(span),
    );
  }

  /// Routes, checks and admits a task, synchronously and in arrival order. The
  /// checks run in docs/protocol.md section 6's order; the first that refuses answers.
  fn decide(&self, event: &TaskEvent) -> (Decision, Option<Arc<Lane>>, Option<Metering>) {
    let provider = event.provider.as_deref().unwrap_or_default();
    let Some(lane) = self.lanes.read().serving.get(provider).cloned() else {
      return (
        Decision::Answer(ErrorReply::model_not_found(provider)),
        None,
        None,
      );
    };
    let answer = |reply| (Decision::Answer(reply), Some(Arc::clone(&lane)), None);
    if self.owners.root.is_cancelled() {
      return answer(ErrorReply::unavailable());
    }
    let caller = event
      .caller
      .as_deref()
      .and_then(|raw| match wire::parse_caller(raw) {
        Ok(caller) => Some(caller),
        Err(why) => {
          tracing::debug!(reason = why, "ignoring a malformed caller");
          None
        }
      });
    let refuse = |refusal: Refusal, message: String| {
      self
        .usage
        .lock()
        .refused(lane.name(), caller.as_ref().map(|c| c.id.as_str()), refusal);
      tracing::debug!(
        reason = refusal.as_str(),
        caller = caller.as_ref().map(|c| c.id.as_str()),
        "refused by the owner's controls"
      );
      ErrorReply::refused(refusal, message)
    };
    let name = lane.name();
    let policy = lane.policy();
    if !policy.allows(caller.as_ref()) {
      let who = match &caller {
        Some(caller) => format!("the caller '{}' is", caller.id),
        None => "callers without an identity are".to_owned(),
      };
      return answer(refuse(
        Refusal::CallerNotAllowed,
        format!("{who} not allowed to use the model '{name}'"),
      ));
    }
    if self.is_paused(name) {
      return answer(refuse(
        Refusal::ProviderPaused,
        format!("the model '{name}' is paused by its owner"),
      ));
    }
    let limits = &policy.limits;
    if let Some(max) = limits.max_request_bytes {
      let size = event.body.as_deref().map_or(0, |raw| raw.get().len()) as u64;
      if size > max {
        return answer(refuse(
          Refusal::RequestTooLarge,
          format!("the request body is {size} bytes; the model '{name}' takes at most {max}"),
        ));
      }
    }
    // The body is parsed here, with serde_json's recursion limit: a body
    // too deep or of the wrong shape is answered 400 (an absent one as `null`).
    let sent = event.body.as_deref().unwrap_or(RawValue::NULL);
    let body: Value = match serde_json::from_str(sent.get()) {
      Ok(body) => body,
      Err(error) => {
        return answer(ErrorReply::invalid_request(format!(
          "the request body cannot be read: {error}"
        )))
      }
    };
    let mut request = match openai::to_completion_options(&body, sent.to_owned()) {
      Ok(request) => request,
      Err(reply) => return answer(reply),
    };
    let stream = event
      .stream
      .or_else(|| body.get("stream").and_then(Value::as_bool))
      .unwrap_or(false);
    if let Some(max) = limits.max_output_tokens {
      match request.options.max_tokens {
        Some(asked) if asked > max => {
          // `maxTokens` comes from max_completion_tokens when both are sent.
          let param = match body.get("max_completion_tokens") {
            Some(value) if !value.is_null() => "max_completion_tokens",
            _ => "max_tokens",
          };
          let mut reply = refuse(
            Refusal::MaxTokensExceeded,
            format!("'{param}' is {asked}; the model '{name}' answers at most {max} tokens"),
          );
          reply.param = Some(param);
          return answer(reply);
        }
        Some(_) => {}
        None => {
          // Capped for a provider that forwards the request as is, too.
          request.options.max_tokens = Some(max);
          let mut capped = body;
          if let Some(fields) = capped.as_object_mut() {
            fields.insert("max_tokens".to_owned(), max.into());
          }
          request.options.request =
            serde_json::value::to_raw_value(&capped).expect("a parsed body serializes");
        }
      }
    }
    let over = lane.meter.lock().check(limits, caller.as_ref());
    if let Some(over) = over {
      let what = match over.refusal {
        Refusal::RequestsPerMinute => "requests per minute",
        Refusal::TokensPerMinute => "tokens per minute",
        _ => "tokens per day",
      };
      let mut reply = refuse(
        over.refusal,
        format!(
          "the model '{name}' is over a limit of {} {what}; retry after {} s",
          over.limit, over.retry_after
        ),
      );
      reply.retry_after = Some(over.retry_after);
      return answer(reply);
    }
    let Some(admission) = lane.admit(&event.task_id) else {
      self.usage.lock().refused(
        name,
        caller.as_ref().map(|c| c.id.as_str()),
        Refusal::QueueFull,
      );
      return answer(ErrorReply::rate_limited(name));
    };
    let charge = lane.meter.lock().charge_request(limits, caller.as_ref());
    lane.hold(true);
    let prompt_chars = openai::text_chars(&request.options.messages);
    request.options.caller.clone_from(&caller);
    let metering = Metering {
      caller,
      charge,
      prompt_chars,
    };
    (
      Decision::Run {
        lane: Arc::clone(&lane),
        request,
        admission,
        stream,
      },
      Some(lane),
      Some(metering),
    )
  }

  /// Books an admitted task that ended: its tokens (the provider's usage, else the
  /// estimate) when it reached the provider, else its request taken back. Returns
  /// the tokens booked (for the metrics and the record).
  fn settle(&self, lane: &Lane, metering: Metering, spent: Spent) -> Option<(u64, u64)> {
    lane.hold(false);
    self.task_ended.notify_waiters();
    if !spent.reached {
      lane.meter.lock().refund(&metering.charge);
      return None;
    }
    let (prompt, completion) = match spent.usage {
      Some(usage) => (usage.prompt_tokens, usage.completion_tokens),
      None => (
        estimate_tokens(metering.prompt_chars),
        estimate_tokens(spent.text_chars),
      ),
    };
    lane
      .meter
      .lock()
      .charge_tokens(&metering.charge, prompt.saturating_add(completion));
    self.usage.lock().ran(
      lane.name(),
      metering.caller.as_ref().map(|c| c.id.as_str()),
      prompt,
      completion,
    );
    Some((prompt, completion))
  }

  fn is_paused(&self, name: &str) -> bool {
    let pauses = self.pauses.lock();
    pauses.whole || pauses.names.contains(name)
  }

  /// Refuses a provider name that is not served.
  fn known(&self, provider: &str) -> Result<()> {
    if self.lanes.read().serving.contains_key(provider) {
      Ok(())
    } else {
      Err(Error::InvalidInput(format!(
        "provider '{provider}' is not published by this registrar"
      )))
    }
  }

  /// Pauses one provider, or all (`None`, providers added later included).
  pub fn pause(&self, provider: Option<&str>) -> Result<()> {
    match provider {
      Some(name) => {
        self.known(name)?;
        self.pauses.lock().names.insert(name.to_owned());
      }
      None => self.pauses.lock().whole = true,
    }
    Ok(())
  }

  /// Resumes one provider (a whole pause stays), or clears every pause (`None`).
  pub fn resume(&self, provider: Option<&str>) -> Result<()> {
    match provider {
      Some(name) => {
        self.known(name)?;
        self.pauses.lock().names.remove(name);
      }
      None => *self.pauses.lock() = Pauses::default(),
    }
    Ok(())
  }

  /// The published names paused now, in order.
  pub fn paused(&self) -> Vec<String> {
    let lanes = self.lanes.read();
    let pauses = self.pauses.lock();
    lanes
      .published
      .iter()
      .filter(|name| pauses.whole || pauses.names.contains(*name))
      .cloned()
      .collect()
  }

  /// Tasks admitted (running or queued) and not yet ended, for one provider or all.
  fn admitted(&self, provider: Option<&str>) -> u32 {
    let lanes = self.lanes.read();
    let retired: Vec<Arc<Lane>> = lanes.retired.iter().filter_map(Weak::upgrade).collect();
    lanes
      .serving
      .values()
      .chain(retired.iter())
      .filter(|lane| provider.is_none_or(|name| lane.name() == name))
      .map(|lane| lane.admitted())
      .sum()
  }

  /// Resolves once no task of `provider` (or of any, `None`) is admitted; `Stopped`
  /// when the registrar stops first.
  pub async fn drained(&self, provider: Option<&str>) -> Result<()> {
    loop {
      let ended = self.task_ended.notified();
      tokio::pin!(ended);
      ended.as_mut().enable();
      if self.owners.root.is_cancelled() {
        return Err(Error::Stopped);
      }
      if self.admitted(provider) == 0 {
        return Ok(());
      }
      tokio::select! {
        biased;
        _ = self.owners.root.cancelled() => return Err(Error::Stopped),
        _ = ended => {}
      }
    }
  }

  /// The usage totals since the registrar was made.
  pub fn usage(&self) -> UsageReport {
    self.usage.lock().report()
  }

  /// Retires a task: no longer live, remembered by the replay guard, and
  /// its outcome counted (unless it was counted at admission).
  fn finish(&self, task_id: &str, lane: Option<&Lane>, outcome: Option<Outcome>) {
    let mut book = self.book.lock();
    book.live.remove(task_id);
    book.guard.remember(task_id);
    if let Some(outcome) = outcome {
      Self::count(&mut book, lane, outcome);
    }
  }

  /// Counts a task's one outcome.
  fn count(book: &mut Book, lane: Option<&Lane>, outcome: Outcome) {
    match outcome {
      Outcome::Completed => book.completed += 1,
      Outcome::Failed => book.failed += 1,
      Outcome::Cancelled => book.cancelled += 1,
    }
    if let (Some(lane), Outcome::Completed | Outcome::Failed) = (lane, outcome) {
      lane.count(outcome == Outcome::Completed);
    }
  }

  /// A `cancel` event: fires the task's token; unknown or finished tasks are a no-op.
  pub fn cancel(&self, data: &str) {
    let Ok(event) = serde_json::from_str::<CancelEvent>(data) else {
      return tracing::warn!("ignoring a cancel event without a taskId");
    };
    match self.book.lock().live.get(&event.task_id) {
      Some(cancel) => {
        tracing::debug!(task_id = %event.task_id, "cancelled by mcpd");
        cancel.cancel();
      }
      None => tracing::debug!(task_id = %event.task_id, "cancel for a task not running; ignored"),
    }
  }
}

/// mcpd's trace context from a task frame (docs/protocol.md section 5); a
/// malformed one is ignored with a debug line, never refusing the task.
fn received_trace(event: &TaskEvent) -> Option<TraceContext> {
  TraceContext::from_frame(event.traceparent.as_deref(), event.tracestate.as_deref())
    .unwrap_or_else(|why| {
      tracing::debug!(reason = why, "ignoring a malformed trace context");
      None
    })
}

/// Ends the task's span, when its provider call recorded one (src/trace.rs);
/// a task without one only leaves its `error.type` for a span recorded late.
fn end_span(lane: Option<&Lane>, task_id: &str, context: &TaskContext<'_>, outcome: Outcome) {
  let early = SpanEnd {
    error_type: context.error_type(outcome),
    ..SpanEnd::default()
  };
  if let Some(end) = context.trace.end(early, || context.span_end(outcome)) {
    if let Some(lane) = lane {
      lane.published().provider.span_ended(task_id, end);
    }
  }
}

#[cfg(test)]
mod tests {
  //! `serve`: which names are routed, which are reported, and which lanes live on.
  use super::*;
  use crate::provider::{AbortReason, BoxFuture, ProviderCall, ProviderFailure};
  use crate::secret::Secret;
  use crate::stream::ChunkReader;

  struct Idle;

  impl Provider for Idle {
    fn can_stream(&self) -> bool {
      false
    }
    fn complete(&self, _: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
      Box::pin(std::future::pending())
    }
    fn stream(&self, _: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
      Box::pin(std::future::pending())
    }
    fn abort(&self, _: &str, _: AbortReason) {}
  }

  fn entry(name: &str, model: &str) -> PublishedProvider {
    PublishedProvider {
      descriptor: ProviderDescriptor {
        name: name.to_owned(),
        kind: "test".to_owned(),
        model: Some(model.to_owned()),
        description: None,
        context_window: None,
      },
      provider: Arc::new(Idle),
      policy: Default::default(),
    }
  }

  fn dispatcher(providers: Vec<PublishedProvider>) -> TaskDispatcher {
    let client = McpdClient::new("http://127.0.0.1:9", Secret::new("t"), false).unwrap();
    let owners = Owners {
      tracker: TaskTracker::new(),
      root: CancellationToken::new(),
      kill: CancellationToken::new(),
    };
    TaskDispatcher::new(
      providers,
      Arc::new(client),
      DispatchSettings::default(),
      owners,
    )
  }

  fn lane(dispatcher: &TaskDispatcher, name: &str) -> Option<Arc<Lane>> {
    dispatcher.lanes.read().serving.get(name).cloned()
  }

  fn load_names(dispatcher: &TaskDispatcher) -> Vec<String> {
    dispatcher
      .loads()
      .into_iter()
      .map(|load| load.name)
      .collect()
  }

  #[test]
  fn a_joining_name_is_served_before_it_is_reported() {
    let dispatcher = dispatcher(vec![entry("a", "a-1")]);
    let a = lane(&dispatcher, "a").unwrap();
    dispatcher.serve(
      &[entry("a", "a-1")],
      &[entry("a", "a-2"), entry("b", "b-1")],
    );
    assert!(lane(&dispatcher, "b").is_some(), "b is routed already");
    assert_eq!(dispatcher.published_names(), ["a"]);
    assert_eq!(load_names(&dispatcher), ["a"]);
    // A kept name keeps its lane, and its accepted entry until the new one is.
    assert!(Arc::ptr_eq(&a, &lane(&dispatcher, "a").unwrap()));
    assert_eq!(a.published().descriptor.model.as_deref(), Some("a-1"));

    dispatcher.serve(&[entry("a", "a-2"), entry("b", "b-1")], &[]);
    assert_eq!(dispatcher.published_names(), ["a", "b"]);
    assert_eq!(load_names(&dispatcher), ["a", "b"]);
    assert!(Arc::ptr_eq(&a, &lane(&dispatcher, "a").unwrap()));
    assert_eq!(a.published().descriptor.model.as_deref(), Some("a-2"));
  }

  #[test]
  fn a_name_that_left_is_not_routed_and_its_held_lane_comes_back_with_it() {
    let dispatcher = dispatcher(vec![entry("a", "a-1"), entry("b", "b-1")]);
    // A task in flight holds b's lane.
    let held = lane(&dispatcher, "b").unwrap();
    dispatcher.serve(&[entry("a", "a-1")], &[]);
    assert!(lane(&dispatcher, "b").is_none());
    assert_eq!(load_names(&dispatcher), ["a"]);
    dispatcher.serve(&[entry("a", "a-1"), entry("b", "b-2")], &[]);
    let back = lane(&dispatcher, "b").unwrap();
    assert!(
      Arc::ptr_eq(&held, &back),
      "the slots in use are still counted"
    );
    assert_eq!(back.published().descriptor.model.as_deref(), Some("b-2"));
    // A lane no task holds is forgotten once it left.
    drop((held, back));
    dispatcher.serve(&[entry("a", "a-1")], &[]);
    dispatcher.serve(&[entry("a", "a-1")], &[]);
    assert!(dispatcher.lanes.read().retired.is_empty());
  }
}
