//! The registrar's life: register (with the sticky session id), keep the control
//! channel open, beat the heart, and stop. Knows nothing of napi.
//!
//! Shape: `Registrar` owns a `TaskTracker` and a root `CancellationToken`
//! (`dispatch::Owners`); everything it starts (the supervisor, the heartbeat,
//! every task) is spawned on that tracker and ends on that token. One
//! supervisor task runs the state machine in a single `select!` loop
//! (register → connect → run → reconnect/re-register → stop) and publishes
//! it through one `watch` channel (`Life`), which `status()`, the heartbeat
//! and `start()` read. The heartbeat reports to the supervisor through a
//! channel. `stop()` cancels the root token and waits (at most `STOP_GRACE`,
//! then the hard stop drops what is still in flight) until the tracker is empty.
//!
//! `update()` sends the new set to the supervisor over its command channel
//! (`Command`); the supervisor registers it under the same session id while
//! the channel stays open, retries with backoff, and tells the dispatcher
//! which set to serve (`TaskDispatcher::serve`): the old set until mcpd
//! accepted the new one.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::channel::{ChannelEnd, ControlChannel};
use crate::config::SessionStore;
use crate::dispatch::{DispatchSettings, Owners, PublishedProvider, TaskDispatcher};
use crate::error::{describe, Error, Result};
use crate::heartbeat::{Heartbeat, HeartbeatEvent};
use crate::mcpd::McpdClient;
use crate::secret::Secret;
use crate::wire::ProviderDescriptor;

/// What the supervisor is asked to do.
enum Command {
  /// Publish this set instead (`update()`); `done` gets the outcome.
  Update {
    providers: Vec<PublishedProvider>,
    done: oneshot::Sender<Result<()>>,
  },
}

/// A connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);
/// The floor under a `heartbeatIntervalMs` that mcpd sends.
const MIN_SERVER_HEARTBEAT: Duration = Duration::from_millis(100);
/// How long `stop()` waits for the 503 answers of aborted tasks before it
/// drops whatever is still in flight.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct RegistrarConfig {
  pub mcpd_url: String,
  pub token: Secret,
  pub providers: Vec<PublishedProvider>,
  pub config_dir: PathBuf,
  pub heartbeat_interval: Duration,
  pub idle_timeout: Option<Duration>,
  pub backoff: BackoffPolicy,
  pub dispatch: DispatchSettings,
  pub allow_insecure_http: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrarState {
  Idle,
  Registering,
  Connected,
  Reconnecting,
  Unauthorized,
  Stopped,
}

impl RegistrarState {
  pub fn as_str(self) -> &'static str {
    match self {
      RegistrarState::Idle => "idle",
      RegistrarState::Registering => "registering",
      RegistrarState::Connected => "connected",
      RegistrarState::Reconnecting => "reconnecting",
      RegistrarState::Unauthorized => "unauthorized",
      RegistrarState::Stopped => "stopped",
    }
  }
}

/// What `status()` reports (API.md `RegistrarStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrarStatus {
  pub state: RegistrarState,
  pub provider_session_id: Option<String>,
  pub providers: Vec<String>,
  pub in_flight: u32,
  pub queued: u32,
  pub completed: u64,
  pub failed: u64,
  /// received = completed + failed + cancelled + inFlight + queued.
  pub cancelled: u64,
  pub reconnects: u64,
  pub last_error: Option<String>,
}

/// The registrar's life as one value, published through one `watch` channel.
#[derive(Debug, Clone)]
pub struct Life {
  pub state: RegistrarState,
  pub last_error: Option<String>,
  pub reconnects: u64,
  /// The configured interval, or mcpd's `heartbeatIntervalMs`.
  pub heartbeat_interval: Duration,
  /// How many times the control channel opened.
  pub connections: u64,
  /// `start()` was called and did not fail.
  pub claimed: bool,
}

/// Called with the status on every state change.
pub type StatusObserver = Arc<dyn Fn(RegistrarStatus) + Send + Sync>;

/// How the first register failing is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartMode {
  /// `start()`: the failure is the caller's; the supervisor ends.
  Foreground,
  /// The boot hook: retried in the background with backoff.
  Background,
}

/// What the registrar and its supervisor share: fixed parts, and the `Life`
/// sender (written by the supervisor, and by start()/stop() at the edges).
struct Core {
  client: Arc<McpdClient>,
  store: SessionStore,
  /// The published set lives here (`serve`, `published`); the supervisor
  /// decides when it changes.
  dispatcher: Arc<TaskDispatcher>,
  /// To the supervisor.
  commands: mpsc::UnboundedSender<Command>,
  /// The supervisor's end, taken by each start and given back when a
  /// start() fails.
  command_inbox: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
  idle_timeout: Option<Duration>,
  backoff: BackoffPolicy,
  observer: Option<StatusObserver>,
  life: watch::Sender<Life>,
  owners: Owners,
  span: tracing::Span,
  /// What must live as long as the registrar (its log route).
  kept: Mutex<Vec<Box<dyn Send + Sync>>>,
  /// What must live while it runs (the binding's hold on Node's event loop):
  /// taken by start(), released by stop() or a failed start(). Held by the
  /// core, which the supervisor holds, not by the JavaScript object, so that
  /// garbage collection cannot release it.
  running_hold: Mutex<Option<Box<dyn Send + Sync>>>,
}

pub struct Registrar {
  core: Arc<Core>,
}

impl Registrar {
  /// Validates the configuration and reads the sticky session id; contacts nobody.
  pub fn new(
    config: RegistrarConfig,
    observer: Option<StatusObserver>,
    span: tracing::Span,
  ) -> Result<Self> {
    check_set(&config.providers)?;
    let client = Arc::new(McpdClient::new(
      &config.mcpd_url,
      config.token,
      config.allow_insecure_http,
    )?);
    let store = SessionStore::new(config.config_dir);
    match store.load() {
      Ok(id) => client.set_session_id(id),
      Err(error) => span.in_scope(|| {
        tracing::warn!(error = %describe(&error), "ignoring the stored session id; registering afresh")
      }),
    }
    let owners = Owners {
      tracker: TaskTracker::new(),
      root: CancellationToken::new(),
      kill: CancellationToken::new(),
    };
    let dispatcher = Arc::new(TaskDispatcher::new(
      config.providers,
      Arc::clone(&client),
      config.dispatch,
      owners.clone(),
    ));
    let (life, _) = watch::channel(Life {
      state: RegistrarState::Idle,
      last_error: None,
      reconnects: 0,
      heartbeat_interval: config.heartbeat_interval,
      connections: 0,
      claimed: false,
    });
    let (commands, command_inbox) = mpsc::unbounded_channel();
    Ok(Self {
      core: Arc::new(Core {
        client,
        store,
        dispatcher,
        commands,
        command_inbox: Mutex::new(Some(command_inbox)),
        idle_timeout: config.idle_timeout,
        backoff: config.backoff,
        observer,
        life,
        owners,
        span,
        kept: Mutex::new(Vec::new()),
        running_hold: Mutex::new(None),
      }),
    })
  }

  pub fn status(&self) -> RegistrarStatus {
    self.core.status()
  }

  /// How many task ids the replay guard remembers (diagnostics and tests).
  pub fn remembered_task_ids(&self) -> usize {
    self.core.dispatcher.remembered()
  }

  /// Keeps `resource` alive as long as the registrar (its loops included).
  pub fn keep_for_life(&self, resource: Box<dyn Send + Sync>) {
    self.core.kept.lock().push(resource);
  }

  /// Holds `resource` until stop() or a failed start(); `false` (and
  /// `resource` dropped) when one is held already or the registrar is stopped.
  pub fn hold_while_running(&self, resource: Box<dyn Send + Sync>) -> bool {
    let mut hold = self.core.running_hold.lock();
    if hold.is_some() || self.core.state() == RegistrarState::Stopped {
      return false;
    }
    *hold = Some(resource);
    true
  }

  fn release_hold(&self) {
    let released = self.core.running_hold.lock().take();
    drop(released);
  }

  /// Registers, then resolves once the control channel is open (state
  /// `connected`), so a task mcpd sends from then on is run. Fails when the
  /// first register fails (naming the HTTP status; the registrar stays idle,
  /// or unauthorized), or with `Stopped` when stop() comes first. A stream
  /// that does not open after a good register is retried with backoff, and
  /// start() waits for it.
  pub async fn start(&self) -> Result<()> {
    if let Err(error) = self.launch(StartMode::Foreground).await {
      self.release_hold();
      return Err(error);
    }
    self.channel_opened().await
  }

  /// Waits until the control channel has been open once; `Stopped` when stop()
  /// comes first.
  async fn channel_opened(&self) -> Result<()> {
    let mut life = self.core.life.subscribe();
    let opened = life
      .wait_for(|life| life.connections > 0 || life.state == RegistrarState::Stopped)
      .await
      .map(|life| life.connections > 0)
      .unwrap_or(false);
    if opened {
      Ok(())
    } else {
      Err(Error::Stopped)
    }
  }

  /// Replaces the published set (PROTOCOL.md section 1, "Changing the set").
  ///
  /// - Running (after start(), or the boot hook): the supervisor registers
  ///   the whole new set under the same session id, with the channel left
  ///   open, and resolves once mcpd accepted it. A failed register is retried
  ///   with backoff (the maximum delay when the token is refused); until one
  ///   succeeds the old set stays published and served. Then names that left
  ///   are answered 404 `model_not_found` (their tasks in flight run to their
  ///   end), joining names are served, kept names keep their lane (load and
  ///   counters) and run later tasks with their new entry.
  /// - Before start(), or after a failed start(): replaces the set the next
  ///   start() registers, and resolves at once.
  /// - Concurrent updates: the last one wins. Every caller waiting resolves
  ///   once mcpd accepted the last set (an earlier set may never be sent).
  ///
  /// Fails with `InvalidInput` for an empty set or a name listed twice, and
  /// with `Stopped` after stop(), or when stop() comes while it waits.
  ///
  /// Everything up to the wait for mcpd happens when `update` is called, not
  /// when the future is first polled: two updates called one after the other
  /// reach the supervisor in that order, whichever future runs first.
  pub fn update(
    &self,
    providers: Vec<PublishedProvider>,
  ) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
    let sent = self.send_update(providers);
    async move {
      let (answer, root) = match sent {
        Ok(Some(waiting)) => waiting,
        Ok(None) => return Ok(()),
        Err(error) => return Err(error),
      };
      tokio::select! {
        // mcpd's acceptance first: an update accepted as stop() comes did happen.
        biased;
        answer = answer => answer.unwrap_or(Err(Error::Stopped)),
        _ = root.cancelled() => Err(Error::Stopped),
      }
    }
  }

  /// The synchronous half of `update`: settles it at once (`None`) before a
  /// start, or hands the set to the supervisor and returns what to wait on.
  fn send_update(
    &self,
    providers: Vec<PublishedProvider>,
  ) -> Result<Option<(oneshot::Receiver<Result<()>>, CancellationToken)>> {
    check_set(&providers)?;
    let core = &self.core;
    let root = core.owners.root.clone();
    if root.is_cancelled() {
      return Err(Error::Stopped);
    }
    // Under the `Life` lock, as start() claims: either this update lands
    // before the claim (and start() registers it) or it goes to the supervisor.
    let mut settled = None;
    core.life.send_if_modified(|life| {
      if life.state == RegistrarState::Stopped {
        settled = Some(Err(Error::Stopped));
      } else if !life.claimed {
        core.dispatcher.serve(&providers, &[]);
        settled = Some(Ok(()));
      }
      false
    });
    if let Some(settled) = settled {
      if settled.is_ok() {
        core.span.in_scope(|| {
          tracing::info!(providers = %names(&providers), "published set replaced; start() registers it")
        });
      }
      return settled.map(|()| None);
    }
    let (done, answer) = oneshot::channel();
    core
      .commands
      .send(Command::Update { providers, done })
      .map_err(|_| Error::Stopped)?;
    Ok(Some((answer, root)))
  }

  /// Like `start`, but a failed first register is retried in the background
  /// with backoff; returns its error (for logging) at once, or, after a good
  /// register, once the channel is open, as `start()` does.
  pub async fn start_in_background(&self) -> Result<()> {
    self.launch(StartMode::Background).await?;
    self.channel_opened().await
  }

  /// Claims the start, spawns the supervisor and waits for the first register.
  async fn launch(&self, mode: StartMode) -> Result<()> {
    self.claim_start()?;
    let (first, registered) = oneshot::channel();
    let (events, heartbeat_events) = mpsc::unbounded_channel();
    // Always there after a claim: a failed start gives it back before it
    // lets the next claim in.
    let inbox = self.core.command_inbox.lock().take();
    let supervisor = Supervisor {
      core: Arc::clone(&self.core),
      backoff: Backoff::new(self.core.backoff),
      events,
      heartbeat_events,
      heartbeat_started: false,
      updates: Updates {
        inbox: inbox.unwrap_or_else(|| mpsc::unbounded_channel().1),
        pending: None,
        generation: 0,
        backoff: Backoff::new(self.core.backoff),
        retry_at: None,
      },
    };
    let span = self.core.span.clone();
    self
      .core
      .owners
      .tracker
      .spawn(supervisor.run(mode, first).instrument(span));
    registered.await.unwrap_or(Err(Error::Stopped))
  }

  fn claim_start(&self) -> Result<()> {
    if self.core.owners.root.is_cancelled() {
      return Err(Error::Stopped);
    }
    let mut refusal = None;
    self.core.life.send_if_modified(|life| {
      if life.state == RegistrarState::Stopped {
        refusal = Some(Error::Stopped);
      } else if life.claimed {
        refusal = Some(Error::InvalidInput(
          "registrar is already started".to_owned(),
        ));
      } else {
        life.claimed = true;
      }
      refusal.is_none()
    });
    refusal.map_or(Ok(()), Err)
  }

  /// Stops taking tasks, answers in-flight ones 503, closes the channel and
  /// ends every task of this registrar: when it returns, nothing of it is in
  /// flight, will be sent, or alive. Idempotent.
  pub async fn stop(&self) {
    let core = &self.core;
    if core.state() != RegistrarState::Stopped {
      let owners = &core.owners;
      owners.root.cancel();
      owners.tracker.close();
      let drained = tokio::time::timeout(STOP_GRACE, owners.tracker.wait()).await;
      if drained.is_err() {
        core.span.in_scope(|| {
          tracing::warn!("stopped with tasks still answering; dropping their requests")
        });
        owners.kill.cancel();
        owners.tracker.wait().await;
      }
      core.set_state(RegistrarState::Stopped);
    }
    // Releasing the hold is what lets Node exit.
    self.release_hold();
  }
}

impl Core {
  fn state(&self) -> RegistrarState {
    self.life.borrow().state
  }

  fn status(&self) -> RegistrarStatus {
    let totals = self.dispatcher.totals();
    let life = self.life.borrow();
    RegistrarStatus {
      state: life.state,
      provider_session_id: self.client.session_id(),
      providers: self.dispatcher.published_names(),
      in_flight: totals.in_flight,
      queued: totals.queued,
      completed: totals.completed,
      failed: totals.failed,
      cancelled: totals.cancelled,
      reconnects: life.reconnects,
      last_error: life.last_error.clone(),
    }
  }

  /// Changes the state (never out of `Stopped`) and tells the observer.
  fn set_state(&self, state: RegistrarState) {
    let changed = self.life.send_if_modified(|life| {
      if life.state == state || life.state == RegistrarState::Stopped {
        return false;
      }
      life.state = state;
      if state == RegistrarState::Connected {
        life.connections += 1;
      }
      true
    });
    if changed {
      // The states a service's operator wants to see at pino's default level.
      match state {
        RegistrarState::Idle | RegistrarState::Registering => {
          tracing::debug!(state = state.as_str(), "state changed")
        }
        _ => tracing::info!(state = state.as_str(), "state changed"),
      }
      if let Some(observer) = &self.observer {
        observer(self.status());
      }
    }
  }

  fn record_error(&self, error: String) {
    let redacted = self.client.token().redact(&error);
    self
      .life
      .send_modify(|life| life.last_error = Some(redacted));
  }

  /// One register call of `descriptors`; adopts and persists the id mcpd
  /// answers. `Ok(true)` when that id is not the one sent.
  async fn register_once(&self, descriptors: &[ProviderDescriptor]) -> Result<bool> {
    let answer = match self.client.register(descriptors).await {
      Ok(answer) => answer,
      Err(error) => {
        let text = describe(&error);
        tracing::warn!(error = %text, "register failed");
        self.record_error(text);
        return Err(error);
      }
    };
    let id = answer.provider_session_id;
    let previous = self.client.session_id();
    let moved = previous.is_some() && previous.as_deref() != Some(id.as_str());
    if previous.as_deref() != Some(id.as_str()) {
      if previous.is_some() {
        tracing::info!("mcpd assigned a new session id");
      }
      if let Err(error) = self.store.save(&id) {
        let text = describe(&error);
        tracing::warn!(error = %text, "cannot persist the session id");
        self.record_error(text);
      }
    }
    self.client.set_session_id(Some(id));
    if let Some(value) = answer
      .heartbeat_interval_ms
      .filter(|value| !value.is_null())
    {
      let ms = value.as_f64().unwrap_or(f64::NAN);
      if ms.is_finite() && ms > 0.0 && ms < 1e10 {
        let interval = Duration::from_millis(ms as u64).max(MIN_SERVER_HEARTBEAT);
        self
          .life
          .send_modify(|life| life.heartbeat_interval = interval);
      } else {
        tracing::warn!(
          heartbeat_interval_ms = %value,
          "ignoring mcpd's invalid heartbeatIntervalMs"
        );
      }
    }
    tracing::info!(providers = descriptors.len(), "registered with mcpd");
    Ok(moved)
  }
}

/// A set to publish: not empty, no name twice.
fn check_set(providers: &[PublishedProvider]) -> Result<()> {
  if providers.is_empty() {
    return Err(Error::InvalidInput(
      "providers must name at least one provider to publish".to_owned(),
    ));
  }
  let mut seen = std::collections::HashSet::new();
  for published in providers {
    let name = &published.descriptor.name;
    if !seen.insert(name) {
      return Err(Error::InvalidInput(format!(
        "provider '{name}' is listed twice"
      )));
    }
  }
  Ok(())
}

fn names(providers: &[PublishedProvider]) -> String {
  providers
    .iter()
    .map(|p| p.descriptor.name.as_str())
    .collect::<Vec<_>>()
    .join(", ")
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
  match at {
    Some(at) => tokio::time::sleep_until(at).await,
    None => std::future::pending().await,
  }
}

/// A register of an update, in flight; its generation and result.
type UpdateAttempt = Pin<Box<dyn Future<Output = (u64, Result<bool>)> + Send>>;

/// The set an update asks for, until mcpd accepts it.
struct PendingUpdate {
  generation: u64,
  providers: Vec<PublishedProvider>,
  waiters: Vec<oneshot::Sender<Result<()>>>,
}

/// The supervisor's part that changes the set (a field of its own, so that it
/// can be used while the channel borrows the rest).
struct Updates {
  inbox: mpsc::UnboundedReceiver<Command>,
  pending: Option<PendingUpdate>,
  generation: u64,
  /// Between failed update registers; apart from the channel's.
  backoff: Backoff,
  /// When the next update register may go, after one failed.
  retry_at: Option<tokio::time::Instant>,
}

impl Updates {
  /// Takes a command: the last set wins; every waiter resolves with it.
  fn take(&mut self, core: &Core, command: Command) {
    let Command::Update { providers, done } = command;
    self.generation += 1;
    let mut waiters = self
      .pending
      .take()
      .map(|pending| pending.waiters)
      .unwrap_or_default();
    waiters.push(done);
    // Joining names get lanes now: mcpd may send them a task as soon as it
    // accepted the set, before its answer reaches us.
    core
      .dispatcher
      .serve(&core.dispatcher.published(), &providers);
    tracing::info!(providers = %names(&providers), "publishing a new set");
    self.pending = Some(PendingUpdate {
      generation: self.generation,
      providers,
      waiters,
    });
  }

  /// Takes every command already sent.
  fn drain(&mut self, core: &Core) {
    while let Ok(command) = self.inbox.try_recv() {
      self.take(core, command);
    }
  }

  /// What a register sends now: the pending set (with its generation), or the published one.
  fn wanted(&self, core: &Core) -> (Option<u64>, Vec<ProviderDescriptor>) {
    match &self.pending {
      Some(pending) => (Some(pending.generation), descriptors(&pending.providers)),
      None => (None, descriptors(&core.dispatcher.published())),
    }
  }

  /// An update register to send now, if one is pending and not waiting out its backoff.
  fn attempt(&mut self, core: &Arc<Core>) -> Option<UpdateAttempt> {
    let pending = self.pending.as_ref()?;
    if self
      .retry_at
      .is_some_and(|at| at > tokio::time::Instant::now())
    {
      return None;
    }
    self.retry_at = None;
    let generation = pending.generation;
    let descriptors = descriptors(&pending.providers);
    let core = Arc::clone(core);
    Some(Box::pin(async move {
      (generation, core.register_once(&descriptors).await)
    }))
  }

  /// mcpd accepted the set of `generation`: when it is the last one asked
  /// for, it becomes the published set and its callers resolve.
  fn accepted(&mut self, core: &Core, generation: Option<u64>) {
    self.backoff.reset();
    self.retry_at = None;
    let current = self.pending.as_ref().map(|pending| pending.generation);
    if generation.is_none() || generation != current {
      return;
    }
    if let Some(pending) = self.pending.take() {
      core.dispatcher.serve(&pending.providers, &[]);
      tracing::info!(providers = %names(&pending.providers), "published set changed");
      for waiter in pending.waiters {
        let _ = waiter.send(Ok(()));
      }
    }
  }

  /// An update register failed: the old set stays; retried after a backoff.
  fn failed(&mut self, core: &Core, error: &Error) {
    let text = describe(error);
    tracing::warn!(error = %text, "update register failed; the old set stays published; retrying");
    core.record_error(text);
    let delay = if matches!(error.status(), Some(401 | 403)) {
      self.backoff.max_delay()
    } else {
      self.backoff.next_delay()
    };
    self.retry_at = Some(tokio::time::Instant::now() + delay);
  }

  /// A start() failed: the sets asked for meanwhile become the one the next
  /// start() registers, as before a start.
  fn settle_unstarted(&mut self, core: &Core) {
    self.drain(core);
    if let Some(pending) = self.pending.take() {
      core.dispatcher.serve(&pending.providers, &[]);
      for waiter in pending.waiters {
        let _ = waiter.send(Ok(()));
      }
    }
  }
}

fn descriptors(providers: &[PublishedProvider]) -> Vec<ProviderDescriptor> {
  providers.iter().map(|p| p.descriptor.clone()).collect()
}

/// Why the supervisor left a running channel on its own.
enum Interrupt {
  /// The heartbeat found the session lost: register again.
  SessionLost,
  /// An update register got a new session id: the open channel is the old session's.
  SessionMoved,
}

/// The one owner of the registrar's state machine.
struct Supervisor {
  core: Arc<Core>,
  backoff: Backoff,
  events: mpsc::UnboundedSender<HeartbeatEvent>,
  heartbeat_events: mpsc::UnboundedReceiver<HeartbeatEvent>,
  heartbeat_started: bool,
  updates: Updates,
}

impl Supervisor {
  /// Keeps the registrar registered and its channel open until the root
  /// token fires. `first` gets the first register's result.
  async fn run(mut self, mode: StartMode, first: oneshot::Sender<Result<()>>) {
    let core = Arc::clone(&self.core);
    let root = core.owners.root.clone();
    let mut first = Some(first);
    let mut channel = ControlChannel::new(
      Arc::clone(&core.client),
      Arc::clone(&core.dispatcher),
      core.idle_timeout,
    );
    let mut needs_register = true;
    let mut pause: Option<Duration> = None;
    // 404s on connect right after registering mean mcpd keeps forgetting us.
    let mut unknown_in_a_row = 0u32;
    loop {
      if let Some(delay) = pause.take() {
        tokio::select! {
          biased;
          _ = root.cancelled() => return,
          _ = tokio::time::sleep(delay) => {}
        }
      }
      if needs_register {
        // The set asked for last, if an update is pending.
        self.updates.drain(&core);
        let (generation, descriptors) = self.updates.wanted(&core);
        core.set_state(RegistrarState::Registering);
        let registered = tokio::select! {
          biased;
          _ = root.cancelled() => return,
          registered = core.register_once(&descriptors) => registered,
        };
        match registered {
          Ok(_) => {
            needs_register = false;
            self.updates.accepted(&core, generation);
            self.start_heartbeat();
            if let Some(first) = first.take() {
              let _ = first.send(Ok(()));
            }
          }
          Err(error) => {
            let unauthorized = matches!(error.status(), Some(401 | 403));
            if let (Some(first), StartMode::Foreground) = (first.take(), mode) {
              core.set_state(if unauthorized {
                RegistrarState::Unauthorized
              } else {
                RegistrarState::Idle
              });
              // Updates sent meanwhile replace the set the next start()
              // registers; the inbox goes back before the next claim can come.
              let mut updates = self.updates;
              core.life.send_modify(|life| {
                updates.settle_unstarted(&core);
                life.claimed = false;
              });
              *core.command_inbox.lock() = Some(updates.inbox);
              let _ = first.send(Err(error));
              return;
            }
            if let Some(first) = first.take() {
              let _ = first.send(Err(error));
            }
            pause = Some(if unauthorized {
              core.set_state(RegistrarState::Unauthorized);
              self.backoff.max_delay()
            } else {
              core.set_state(RegistrarState::Reconnecting);
              self.backoff.next_delay()
            });
            continue;
          }
        }
      }
      // A lost session reported before this connect is checked by the
      // connect itself (404 → register again); only one reported while the
      // channel is open needs the heartbeat's word.
      while let Ok(event) = self.heartbeat_events.try_recv() {
        if let HeartbeatEvent::Failed(text) = event {
          core.record_error(text);
        }
      }
      // Run the channel until it ends, the session is lost, or stop; an
      // update registers meanwhile, with the channel open.
      let end = {
        let opened = || core.set_state(RegistrarState::Connected);
        let running = channel.run(opened, &mut self.backoff);
        tokio::pin!(running);
        let updates = &mut self.updates;
        let mut attempt: Option<UpdateAttempt> = None;
        loop {
          if attempt.is_none() {
            attempt = updates.attempt(&core);
          }
          let retry_at = updates.retry_at.filter(|_| attempt.is_none());
          // Order: stop; the heartbeat's news; a new set asked for; an update
          // register's answer; its retry time; the channel's end.
          tokio::select! {
            biased;
            _ = root.cancelled() => return,
            Some(event) = self.heartbeat_events.recv() => match event {
              HeartbeatEvent::SessionLost => break Err(Interrupt::SessionLost),
              HeartbeatEvent::Failed(text) => core.record_error(text),
            },
            Some(command) = updates.inbox.recv() => updates.take(&core, command),
            (generation, registered) = async { attempt.as_mut().expect("checked").await }, if attempt.is_some() => {
              attempt = None;
              match registered {
                Ok(moved) => {
                  updates.accepted(&core, Some(generation));
                  if moved {
                    break Err(Interrupt::SessionMoved);
                  }
                }
                Err(error) => updates.failed(&core, &error),
              }
            }
            _ = sleep_until_some(retry_at), if retry_at.is_some() => {}
            end = &mut running => break Ok(end),
          }
        }
      };
      let end = match end {
        Ok(end) => Some(end),
        Err(Interrupt::SessionLost) => None,
        Err(Interrupt::SessionMoved) => {
          tracing::info!("the session id changed; reopening the control channel");
          core.set_state(RegistrarState::Reconnecting);
          continue;
        }
      };
      match end {
        None => {
          // mcpd answered the heartbeat: a fresh start, not a failure streak.
          self.backoff.reset();
          needs_register = true;
          core.set_state(RegistrarState::Registering);
        }
        Some(ChannelEnd::SessionUnknown) => {
          tracing::info!("mcpd does not know the session; registering again");
          core.set_state(RegistrarState::Registering);
          needs_register = true;
          // Straight away the first time; with backoff if it keeps happening.
          unknown_in_a_row += 1;
          pause = (unknown_in_a_row > 1).then(|| self.backoff.next_delay());
        }
        Some(ChannelEnd::Unauthorized(error)) => {
          let text = describe(&error);
          tracing::warn!(error = %text, "mcpd refused the token");
          core.record_error(text);
          core.set_state(RegistrarState::Unauthorized);
          pause = Some(self.backoff.max_delay());
        }
        Some(ChannelEnd::Dropped {
          error,
          delivered,
          lasted,
        }) => {
          let text = describe(&error);
          tracing::warn!(error = %text, "control channel lost; reconnecting");
          core.record_error(text);
          unknown_in_a_row = 0;
          if delivered || lasted >= STABLE_CONNECTION {
            self.backoff.reset();
          }
          core.life.send_modify(|life| life.reconnects += 1);
          core.set_state(RegistrarState::Reconnecting);
          pause = Some(self.backoff.next_delay());
        }
      }
    }
  }

  fn start_heartbeat(&mut self) {
    if self.heartbeat_started {
      return;
    }
    self.heartbeat_started = true;
    let core = &self.core;
    let heartbeat = Heartbeat {
      client: Arc::clone(&core.client),
      dispatcher: Arc::clone(&core.dispatcher),
      life: core.life.subscribe(),
      events: self.events.clone(),
      stop: core.owners.root.clone(),
    };
    core
      .owners
      .tracker
      .spawn(heartbeat.run().instrument(core.span.clone()));
  }
}
