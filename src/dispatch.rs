//! Runs the tasks mcpd sends: de-duplication, per-provider concurrency and
//! FIFO queue, timeouts, cancellation, and the answer (one result POST, or a
//! chunk sequence ending in `[DONE]`) for every task received.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::Instrument;

use crate::error::describe;
use crate::mcpd::{Delivery, McpdClient};
use crate::openai::{self, AnswerIdentity, ErrorReply, StreamEncoder, DONE};
use crate::provider::{AbortReason, Provider, ProviderCall};
use crate::wire::{CancelEvent, ProviderDescriptor, ProviderLoad, TaskEvent};

/// A task id seen this recently is not run again (PROTOCOL.md section 2).
const REPLAY_WINDOW: Duration = Duration::from_secs(600);
/// Payloads a streaming task may have waiting for the relay; the provider's
/// iterator is not pulled while this is full.
const RELAY_BUFFER: usize = 256;
/// The most payloads and bytes one chunk POST carries.
const MAX_BATCH_PAYLOADS: usize = 1024;
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// How long a chunk POST after the first waits for more payloads to join it.
const BATCH_LINGER: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy)]
pub struct DispatchSettings {
  pub task_timeout: Duration,
  pub max_concurrency: u32,
  pub max_queue: u32,
}

impl Default for DispatchSettings {
  fn default() -> Self {
    Self {
      task_timeout: Duration::from_secs(600),
      max_concurrency: 4,
      max_queue: 64,
    }
  }
}

/// A provider the registrar publishes.
#[derive(Clone)]
pub struct PublishedProvider {
  pub descriptor: ProviderDescriptor,
  pub provider: Arc<dyn Provider>,
}

/// What ends a task from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
  Cancelled,
  Stopping,
}

impl Ending {
  fn abort_reason(self) -> AbortReason {
    match self {
      Ending::Cancelled => AbortReason::Cancelled,
      Ending::Stopping => AbortReason::Stopping,
    }
  }
}

/// How a task ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
  Completed,
  Failed,
  Cancelled,
}

/// One provider's slots, queue and counters.
struct Lane {
  published: PublishedProvider,
  max_concurrency: u32,
  max_queue: u32,
  slots: Mutex<Slots>,
  completed: AtomicU64,
  failed: AtomicU64,
}

/// Slots in use and the FIFO queue of tasks waiting for one. Admission happens
/// on the channel's task, in the order events arrive, so the queue is in
/// arrival order whatever the runtime's scheduling.
#[derive(Default)]
struct Slots {
  in_use: u32,
  waiting: VecDeque<(String, oneshot::Sender<()>)>,
}

/// Where an admitted task stands; a task with neither is answered 429.
enum Admission {
  /// A slot is held.
  Now(Slot),
  /// In the queue; the sender fires when a slot is handed over.
  Queued(oneshot::Receiver<()>),
}

impl Lane {
  /// A slot, a place in the queue, or `None` when both are full.
  fn admit(self: &Arc<Self>, task_id: &str) -> Option<Admission> {
    let mut slots = self.slots.lock();
    if slots.in_use < self.max_concurrency {
      slots.in_use += 1;
      return Some(Admission::Now(Slot(Arc::clone(self))));
    }
    if (slots.waiting.len() as u32) < self.max_queue {
      let (sender, receiver) = oneshot::channel();
      slots.waiting.push_back((task_id.to_owned(), sender));
      return Some(Admission::Queued(receiver));
    }
    None
  }

  /// Hands a freed slot to the first task still waiting, or frees it.
  fn release(&self) {
    let mut slots = self.slots.lock();
    while let Some((_, waiter)) = slots.waiting.pop_front() {
      if waiter.send(()).is_ok() {
        return;
      }
    }
    slots.in_use = slots.in_use.saturating_sub(1);
  }

  fn leave_queue(&self, task_id: &str) {
    self.slots.lock().waiting.retain(|(id, _)| id != task_id);
  }

  /// Waits in the queue for a slot, unless the task ends first.
  async fn wait_for_slot(
    self: &Arc<Self>,
    task_id: &str,
    mut granted: oneshot::Receiver<()>,
    end: &mut watch::Receiver<Option<Ending>>,
  ) -> Result<Slot, Ending> {
    tokio::select! {
      biased;
      result = &mut granted => match result {
        Ok(()) => Ok(Slot(Arc::clone(self))),
        Err(_) => Err(Ending::Stopping),
      },
      ending = wait_for_ending(end) => {
        self.leave_queue(task_id);
        // A slot handed over just before we left is ours to give back.
        if granted.try_recv().is_ok() {
          drop(Slot(Arc::clone(self)));
        }
        Err(ending)
      }
    }
  }
}

/// A concurrency slot of a lane, given back when dropped.
struct Slot(Arc<Lane>);

impl Drop for Slot {
  fn drop(&mut self) {
    self.0.release();
  }
}

/// What `accept` decided for a task, in arrival order.
enum Decision {
  Answer(ErrorReply, Option<Arc<Lane>>),
  Run {
    lane: Arc<Lane>,
    request: openai::ChatRequest,
    admission: Admission,
  },
}

#[derive(Default)]
struct TaskTable {
  live: HashMap<String, watch::Sender<Option<Ending>>>,
  recent: HashMap<String, Instant>,
  recent_order: VecDeque<(Instant, String)>,
}

impl TaskTable {
  fn seen(&mut self, task_id: &str) -> bool {
    self.prune();
    self.live.contains_key(task_id) || self.recent.contains_key(task_id)
  }

  fn prune(&mut self) {
    let now = Instant::now();
    while let Some((at, _)) = self.recent_order.front() {
      if now.duration_since(*at) < REPLAY_WINDOW {
        break;
      }
      if let Some((at, id)) = self.recent_order.pop_front() {
        if self.recent.get(&id) == Some(&at) {
          self.recent.remove(&id);
        }
      }
    }
  }

  fn retire(&mut self, task_id: &str) {
    self.live.remove(task_id);
    let now = Instant::now();
    self.recent.insert(task_id.to_owned(), now);
    self.recent_order.push_back((now, task_id.to_owned()));
  }
}

/// Load totals for `status()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadTotals {
  pub in_flight: u32,
  pub queued: u32,
  pub completed: u64,
  pub failed: u64,
}

pub struct TaskDispatcher {
  lanes: HashMap<String, Arc<Lane>>,
  client: Arc<McpdClient>,
  settings: DispatchSettings,
  table: Mutex<TaskTable>,
  stopping: AtomicBool,
  idle: Notify,
  /// Tasks answered with an error before reaching a provider's lane (unknown provider).
  unrouted_failed: AtomicU64,
}

impl TaskDispatcher {
  pub fn new(
    providers: Vec<PublishedProvider>,
    client: Arc<McpdClient>,
    settings: DispatchSettings,
  ) -> Self {
    let lanes = providers
      .into_iter()
      .map(|published| {
        let name = published.descriptor.name.clone();
        let lane = Arc::new(Lane {
          published,
          max_concurrency: settings.max_concurrency,
          max_queue: settings.max_queue,
          slots: Mutex::new(Slots::default()),
          completed: AtomicU64::new(0),
          failed: AtomicU64::new(0),
        });
        (name, lane)
      })
      .collect();
    Self {
      lanes,
      client,
      settings,
      table: Mutex::new(TaskTable::default()),
      stopping: AtomicBool::new(false),
      idle: Notify::new(),
      unrouted_failed: AtomicU64::new(0),
    }
  }

  /// The load figures the heartbeat reports, one entry per provider.
  pub fn loads(&self) -> Vec<ProviderLoad> {
    let mut loads: Vec<ProviderLoad> = self
      .lanes
      .iter()
      .map(|(name, lane)| {
        let slots = lane.slots.lock();
        (name, lane, slots.in_use, slots.waiting.len() as u32)
      })
      .map(|(name, lane, in_flight, queued)| ProviderLoad {
        name: name.clone(),
        in_flight,
        queued,
        max_concurrency: lane.max_concurrency,
        completed: lane.completed.load(Ordering::SeqCst),
        failed: lane.failed.load(Ordering::SeqCst),
      })
      .collect();
    loads.sort_by(|a, b| a.name.cmp(&b.name));
    loads
  }

  pub fn totals(&self) -> LoadTotals {
    self.loads().iter().fold(
      LoadTotals {
        failed: self.unrouted_failed.load(Ordering::SeqCst),
        ..LoadTotals::default()
      },
      |totals, load| LoadTotals {
        in_flight: totals.in_flight + load.in_flight,
        queued: totals.queued + load.queued,
        completed: totals.completed + load.completed,
        failed: totals.failed + load.failed,
      },
    )
  }

  /// A `task` event: runs it unless its id was seen in the last 10 minutes.
  pub fn accept(self: &Arc<Self>, data: &str) {
    let event: TaskEvent = match serde_json::from_str(data) {
      Ok(event) => event,
      Err(error) => return self.reject_malformed(data, &error.to_string()),
    };
    if event.task_id.is_empty() {
      return tracing::warn!("ignoring a task event with an empty taskId");
    }
    let (sender, receiver) = watch::channel(None);
    {
      let mut table = self.table.lock();
      if table.seen(&event.task_id) {
        return tracing::debug!(task_id = %event.task_id, "task already running or answered; not run again");
      }
      table.live.insert(event.task_id.clone(), sender);
    }
    let decision = self.decide(&event);
    let dispatcher = Arc::clone(self);
    let task_id = event.task_id.clone();
    let span = tracing::Span::current();
    let task = tokio::spawn(
      async move { dispatcher.run(event, decision, receiver).await }.instrument(span.clone()),
    );
    // A bug that panics a task must still leave it answered and retired.
    let dispatcher = Arc::clone(self);
    tokio::spawn(
      async move {
        if let Err(error) = task.await {
          if error.is_panic() {
            tracing::error!(task_id, "task panicked; answering 502");
            let reply = ErrorReply::provider_error("internal error in the registrar");
            answer_error(&dispatcher.client, &task_id, &reply, None).await;
          }
        }
        dispatcher.retire(&task_id);
      }
      .instrument(span),
    );
  }

  /// Routes, checks and admits a task, synchronously and in arrival order.
  fn decide(&self, event: &TaskEvent) -> Decision {
    let provider = event.provider.as_deref().unwrap_or_default();
    let Some(lane) = self.lanes.get(provider) else {
      return Decision::Answer(ErrorReply::model_not_found(provider), None);
    };
    let lane = Arc::clone(lane);
    if self.stopping.load(Ordering::SeqCst) {
      return Decision::Answer(ErrorReply::unavailable(), Some(lane));
    }
    let request = match openai::to_completion_options(&event.body) {
      Ok(request) => request,
      Err(reply) => return Decision::Answer(reply, Some(lane)),
    };
    match lane.admit(&event.task_id) {
      Some(admission) => Decision::Run {
        lane,
        request,
        admission,
      },
      None => {
        let reply = ErrorReply::rate_limited(&lane.published.descriptor.name);
        Decision::Answer(reply, Some(lane))
      }
    }
  }

  /// A task event we cannot parse: answered 400 if it names its task, else only logged.
  fn reject_malformed(self: &Arc<Self>, data: &str, error: &str) {
    let task_id = serde_json::from_str::<Value>(data).ok().and_then(|value| {
      value
        .get("taskId")
        .and_then(Value::as_str)
        .map(str::to_owned)
    });
    let Some(task_id) = task_id.filter(|id| !id.is_empty()) else {
      return tracing::warn!(%error, "ignoring a task event without a taskId");
    };
    {
      let mut table = self.table.lock();
      if table.seen(&task_id) {
        return;
      }
      table.retire(&task_id);
    }
    self.unrouted_failed.fetch_add(1, Ordering::SeqCst);
    let reply = ErrorReply::invalid_request(format!("the task event is malformed: {error}"));
    let client = Arc::clone(&self.client);
    tokio::spawn(
      async move { answer_error(&client, &task_id, &reply, None).await }
        .instrument(tracing::Span::current()),
    );
  }

  /// A `cancel` event: fires the task's signal; unknown or finished tasks are a no-op.
  pub fn cancel(&self, data: &str) {
    let Ok(event) = serde_json::from_str::<CancelEvent>(data) else {
      return tracing::warn!("ignoring a cancel event without a taskId");
    };
    match self.table.lock().live.get(&event.task_id) {
      Some(ending) => {
        tracing::debug!(task_id = %event.task_id, "cancelled by mcpd");
        ending.send_replace(Some(Ending::Cancelled));
      }
      None => tracing::debug!(task_id = %event.task_id, "cancel for a task not running; ignored"),
    }
  }

  /// Stops taking tasks and aborts every running or queued one (answered 503),
  /// waiting at most `grace` for their answers to go out.
  pub async fn stop(&self, grace: Duration) {
    self.stopping.store(true, Ordering::SeqCst);
    for ending in self.table.lock().live.values() {
      ending.send_if_modified(|ending| {
        if ending.is_none() {
          *ending = Some(Ending::Stopping);
          true
        } else {
          false
        }
      });
    }
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
      let idle = self.idle.notified();
      tokio::pin!(idle);
      idle.as_mut().enable();
      if self.table.lock().live.is_empty() {
        return;
      }
      tokio::select! {
        _ = &mut idle => {}
        _ = &mut deadline => {
          return tracing::warn!("stopped with tasks still answering");
        }
      }
    }
  }

  fn retire(&self, task_id: &str) {
    let mut table = self.table.lock();
    table.retire(task_id);
    if table.live.is_empty() {
      self.idle.notify_waiters();
    }
  }

  async fn run(
    &self,
    event: TaskEvent,
    decision: Decision,
    mut end: watch::Receiver<Option<Ending>>,
  ) {
    let task_id = event.task_id.as_str();
    let (lane, outcome) = match decision {
      Decision::Answer(reply, lane) => (lane, self.fail(task_id, &reply, &mut end).await),
      Decision::Run {
        lane,
        request,
        admission,
      } => {
        let outcome = self
          .run_in_lane(&lane, &event, request, admission, &mut end)
          .await;
        (Some(lane), outcome)
      }
    };
    let counter = match (&lane, outcome) {
      (_, Outcome::Cancelled) => return,
      (None, _) => &self.unrouted_failed,
      (Some(lane), Outcome::Completed) => &lane.completed,
      (Some(lane), Outcome::Failed) => &lane.failed,
    };
    counter.fetch_add(1, Ordering::SeqCst);
  }

  async fn run_in_lane(
    &self,
    lane: &Arc<Lane>,
    event: &TaskEvent,
    request: openai::ChatRequest,
    admission: Admission,
    end: &mut watch::Receiver<Option<Ending>>,
  ) -> Outcome {
    let task_id = event.task_id.as_str();
    let _slot = match admission {
      Admission::Now(slot) => slot,
      Admission::Queued(granted) => match lane.wait_for_slot(task_id, granted, end).await {
        Ok(slot) => slot,
        Err(Ending::Cancelled) => return Outcome::Cancelled,
        Err(Ending::Stopping) => return self.fail(task_id, &ErrorReply::unavailable(), end).await,
      },
    };
    // A slot handed over while the task was being cancelled or stopped.
    let ending = *end.borrow();
    match ending {
      Some(Ending::Cancelled) => return Outcome::Cancelled,
      Some(Ending::Stopping) => return self.fail(task_id, &ErrorReply::unavailable(), end).await,
      None => {}
    }
    let stream = event
      .stream
      .or_else(|| event.body.get("stream").and_then(Value::as_bool))
      .unwrap_or(false);
    let descriptor = &lane.published.descriptor;
    let model = request
      .model
      .clone()
      .or_else(|| descriptor.model.clone())
      .unwrap_or_else(|| descriptor.name.clone());
    let identity = AnswerIdentity::new(task_id, model);
    let call = ProviderCall {
      task_id: task_id.to_owned(),
      options: request.options,
    };
    let provider = &lane.published.provider;
    if stream {
      let encoder = StreamEncoder::new(identity, request.include_usage);
      self.stream_task(provider, call, encoder, end).await
    } else {
      self.complete_task(provider, call, identity, end).await
    }
  }

  async fn fail(
    &self,
    task_id: &str,
    reply: &ErrorReply,
    end: &mut watch::Receiver<Option<Ending>>,
  ) -> Outcome {
    answer_error(&self.client, task_id, reply, Some(end)).await;
    Outcome::Failed
  }

  async fn complete_task(
    &self,
    provider: &Arc<dyn Provider>,
    call: ProviderCall,
    identity: AnswerIdentity,
    end: &mut watch::Receiver<Option<Ending>>,
  ) -> Outcome {
    let task_id = call.task_id.clone();
    let settled = tokio::select! {
      settled = provider.complete(call) => settled,
      _ = tokio::time::sleep(self.settings.task_timeout) => {
        provider.abort(&task_id, AbortReason::TimedOut);
        return self.fail(&task_id, &self.timeout_reply(), end).await;
      }
      ending = wait_for_ending(end) => {
        provider.abort(&task_id, ending.abort_reason());
        return match ending {
          Ending::Cancelled => Outcome::Cancelled,
          Ending::Stopping => self.fail(&task_id, &ErrorReply::unavailable(), end).await,
        };
      }
    };
    let result = settled
      .map_err(|failure| failure.0)
      .and_then(openai::parse_result);
    match result {
      Ok(result) => {
        let body = openai::chat_completion(&identity, &result);
        match deliver_result(&self.client, &task_id, 200, &body, Some(end)).await {
          true => Outcome::Completed,
          false => Outcome::Failed,
        }
      }
      Err(message) => {
        tracing::warn!(task_id = %task_id, error = %message, "provider failed");
        self
          .fail(&task_id, &ErrorReply::provider_error(message), end)
          .await
      }
    }
  }

  fn timeout_reply(&self) -> ErrorReply {
    ErrorReply::timeout(self.settings.task_timeout.as_millis() as u64)
  }

  async fn stream_task(
    &self,
    provider: &Arc<dyn Provider>,
    call: ProviderCall,
    mut encoder: StreamEncoder,
    end: &mut watch::Receiver<Option<Ending>>,
  ) -> Outcome {
    let task_id = call.task_id.clone();
    let (sender, receiver) = mpsc::channel::<String>(RELAY_BUFFER);
    let relay = relay_chunks(&self.client, &task_id, receiver, end.clone());
    let produce = async {
      let sender = sender;
      let failure = tokio::select! {
        produced = produce(provider.as_ref(), call, &mut encoder, &sender) => match produced {
          Ok(()) => return Outcome::Completed,
          Err(failure) => {
            // Let go of the provider's iterator and signal whatever went wrong.
            provider.abort(&task_id, AbortReason::Failed);
            failure
          }
        },
        // The relay gave up (mcpd forgot the task): stop the provider now,
        // not when it next yields.
        _ = sender.closed() => StreamFailure::RelayClosed,
        _ = tokio::time::sleep(self.settings.task_timeout) => {
          provider.abort(&task_id, AbortReason::TimedOut);
          StreamFailure::Reply(self.timeout_reply())
        }
        ending = wait_for_ending(end) => {
          provider.abort(&task_id, ending.abort_reason());
          match ending {
            Ending::Cancelled => return Outcome::Cancelled,
            Ending::Stopping => StreamFailure::Reply(ErrorReply::unavailable()),
          }
        }
      };
      let reply = match failure {
        StreamFailure::Reply(reply) => reply,
        StreamFailure::RelayClosed => {
          provider.abort(&task_id, AbortReason::Abandoned);
          return Outcome::Failed;
        }
      };
      if encoder.started() {
        // Payloads went out: the error goes in-band, then [DONE].
        let mut out = Vec::new();
        encoder.fail(&reply, &mut out);
        let _ = send_all(&sender, &mut out).await;
      } else {
        drop(sender);
        answer_error(&self.client, &task_id, &reply, Some(end)).await;
      }
      Outcome::Failed
    };
    let (outcome, relayed) = tokio::join!(produce, relay);
    match (outcome, relayed) {
      (Outcome::Cancelled, _) | (_, Relayed::Cancelled) => Outcome::Cancelled,
      (outcome, Relayed::Finished) => outcome,
      (_, Relayed::Undelivered) => Outcome::Failed,
    }
  }
}

enum StreamFailure {
  Reply(ErrorReply),
  /// The relay gave up (mcpd forgot the task, or retries ran out).
  RelayClosed,
}

/// Pulls the provider's chunks (or its one result, for a provider without
/// `stream()`) and hands the payloads to the relay, waiting while it is full.
async fn produce(
  provider: &dyn Provider,
  call: ProviderCall,
  encoder: &mut StreamEncoder,
  sender: &mpsc::Sender<String>,
) -> Result<(), StreamFailure> {
  let provider_failed = |message: String| {
    tracing::warn!(error = %message, "provider failed");
    StreamFailure::Reply(ErrorReply::provider_error(message))
  };
  let mut out = Vec::new();
  if provider.can_stream() {
    let mut source = provider
      .stream(call)
      .await
      .map_err(|failure| provider_failed(failure.0))?;
    while let Some(value) = source
      .next_chunk()
      .await
      .map_err(|failure| provider_failed(failure.0))?
    {
      let chunk = openai::parse_chunk(value).map_err(provider_failed)?;
      encoder.push(chunk, &mut out);
      send_all(sender, &mut out).await?;
    }
  } else {
    let value = provider
      .complete(call)
      .await
      .map_err(|failure| provider_failed(failure.0))?;
    let result = openai::parse_result(value).map_err(provider_failed)?;
    encoder.push_result(result, &mut out);
  }
  encoder.finish(&mut out);
  send_all(sender, &mut out).await
}

async fn send_all(
  sender: &mpsc::Sender<String>,
  out: &mut Vec<String>,
) -> Result<(), StreamFailure> {
  for payload in out.drain(..) {
    sender
      .send(payload)
      .await
      .map_err(|_| StreamFailure::RelayClosed)?;
  }
  Ok(())
}

enum Relayed {
  /// Everything up to `[DONE]` was delivered (or nothing was ever sent).
  Finished,
  Cancelled,
  Undelivered,
}

/// POSTs a task's payloads in order, one POST at a time; payloads that arrive
/// while a POST is in flight go together in the next one.
async fn relay_chunks(
  client: &McpdClient,
  task_id: &str,
  mut receiver: mpsc::Receiver<String>,
  mut end: watch::Receiver<Option<Ending>>,
) -> Relayed {
  let mut seq = 0u64;
  let mut batch: Vec<String> = Vec::new();
  loop {
    let first = tokio::select! {
      first = receiver.recv() => first,
      _ = wait_for_cancel(&mut end) => return Relayed::Cancelled,
    };
    let Some(first) = first else {
      return Relayed::Finished;
    };
    // The first POST goes at once (time to first token); later ones wait a
    // few milliseconds for company, so a fast provider is not relayed one
    // payload per POST when mcpd answers quickly.
    let linger = (seq > 0).then(|| tokio::time::Instant::now() + BATCH_LINGER);
    collect_batch(&mut receiver, &mut batch, first, linger).await;
    let done = batch.last().is_some_and(|payload| payload == DONE);
    let delivery = tokio::select! {
      delivery = client.post_chunks(task_id, seq, &batch) => delivery,
      _ = wait_for_cancel(&mut end) => return Relayed::Cancelled,
    };
    match delivery {
      Delivery::Delivered => {
        seq += batch.len() as u64;
        batch.clear();
        if done {
          return Relayed::Finished;
        }
      }
      Delivery::Gone => {
        tracing::debug!(
          task_id,
          "mcpd no longer knows the task; dropping its stream"
        );
        return Relayed::Undelivered;
      }
      Delivery::Failed(error) => {
        tracing::warn!(task_id, error = %describe(&error), "could not deliver the task's chunks");
        return Relayed::Undelivered;
      }
    }
  }
}

/// Fills a batch: what is already waiting, then, until `linger`, what arrives,
/// up to the batch limits or `[DONE]`.
async fn collect_batch(
  receiver: &mut mpsc::Receiver<String>,
  batch: &mut Vec<String>,
  first: String,
  linger: Option<tokio::time::Instant>,
) {
  let mut bytes = first.len();
  let mut done = first == DONE;
  batch.push(first);
  while !done && batch.len() < MAX_BATCH_PAYLOADS && bytes < MAX_BATCH_BYTES {
    let next = match receiver.try_recv() {
      Ok(payload) => Some(payload),
      Err(mpsc::error::TryRecvError::Disconnected) => None,
      Err(mpsc::error::TryRecvError::Empty) => match linger {
        Some(deadline) => tokio::time::timeout_at(deadline, receiver.recv())
          .await
          .ok()
          .flatten(),
        None => None,
      },
    };
    let Some(payload) = next else {
      break;
    };
    bytes += payload.len();
    done = payload == DONE;
    batch.push(payload);
  }
}

/// Answers a task with an OpenAI error body on the result endpoint.
async fn answer_error(
  client: &McpdClient,
  task_id: &str,
  reply: &ErrorReply,
  end: Option<&mut watch::Receiver<Option<Ending>>>,
) {
  tracing::debug!(task_id, status = reply.status, message = %reply.message, "answering with an error");
  deliver_result(client, task_id, reply.status, &reply.body(), end).await;
}

/// POSTs a task's result; a cancel meanwhile stops the retries (nothing more
/// is posted for a cancelled task).
async fn deliver_result(
  client: &McpdClient,
  task_id: &str,
  status: u16,
  body: &Value,
  end: Option<&mut watch::Receiver<Option<Ending>>>,
) -> bool {
  let delivery = match end {
    Some(end) => tokio::select! {
      delivery = client.post_result(task_id, status, body) => delivery,
      _ = wait_for_cancel(end) => {
        tracing::debug!(task_id, "cancelled while its result was being delivered");
        return false;
      }
    },
    None => client.post_result(task_id, status, body).await,
  };
  match delivery {
    Delivery::Delivered => true,
    Delivery::Gone => {
      tracing::debug!(task_id, "mcpd no longer knows the task; result dropped");
      false
    }
    Delivery::Failed(error) => {
      tracing::warn!(task_id, error = %describe(&error), "could not deliver the task's result");
      false
    }
  }
}

async fn wait_for_ending(end: &mut watch::Receiver<Option<Ending>>) -> Ending {
  loop {
    if let Some(ending) = *end.borrow_and_update() {
      return ending;
    }
    if end.changed().await.is_err() {
      return std::future::pending().await;
    }
  }
}

/// Only a cancel stops the relay: when stopping, the 503 still has to go out.
async fn wait_for_cancel(end: &mut watch::Receiver<Option<Ending>>) {
  loop {
    if *end.borrow_and_update() == Some(Ending::Cancelled) {
      return;
    }
    if end.changed().await.is_err() {
      return std::future::pending().await;
    }
  }
}
