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

use std::path::PathBuf;
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
  descriptors: Vec<ProviderDescriptor>,
  dispatcher: Arc<TaskDispatcher>,
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
    if config.providers.is_empty() {
      return Err(Error::InvalidInput(
        "providers must name at least one provider to publish".to_owned(),
      ));
    }
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
    let descriptors = config
      .providers
      .iter()
      .map(|published| published.descriptor.clone())
      .collect();
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
    Ok(Self {
      core: Arc::new(Core {
        client,
        store,
        descriptors,
        dispatcher,
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

  /// Like `start`, but a failed first register is retried in the background
  /// with backoff; returns after the first register, with its error for logging.
  pub async fn start_in_background(&self) -> Result<()> {
    self.launch(StartMode::Background).await
  }

  /// Claims the start, spawns the supervisor and waits for the first register.
  async fn launch(&self, mode: StartMode) -> Result<()> {
    self.claim_start()?;
    let (first, registered) = oneshot::channel();
    let (events, heartbeat_events) = mpsc::unbounded_channel();
    let supervisor = Supervisor {
      core: Arc::clone(&self.core),
      backoff: Backoff::new(self.core.backoff),
      events,
      heartbeat_events,
      heartbeat_started: false,
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
      providers: self.descriptors.iter().map(|d| d.name.clone()).collect(),
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
      tracing::debug!(state = state.as_str(), "state changed");
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

  /// One register call; adopts and persists the id mcpd answers.
  async fn register_once(&self) -> Result<()> {
    self.set_state(RegistrarState::Registering);
    let answer = match self.client.register(&self.descriptors).await {
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
    tracing::info!(providers = self.descriptors.len(), "registered with mcpd");
    Ok(())
  }
}

/// The one owner of the registrar's state machine.
struct Supervisor {
  core: Arc<Core>,
  backoff: Backoff,
  events: mpsc::UnboundedSender<HeartbeatEvent>,
  heartbeat_events: mpsc::UnboundedReceiver<HeartbeatEvent>,
  heartbeat_started: bool,
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
        let registered = tokio::select! {
          biased;
          _ = root.cancelled() => return,
          registered = core.register_once() => registered,
        };
        match registered {
          Ok(()) => {
            needs_register = false;
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
              core.life.send_modify(|life| life.claimed = false);
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
      // Run the channel until it ends, the session is lost, or stop.
      let end = {
        let opened = || core.set_state(RegistrarState::Connected);
        let running = channel.run(opened, &mut self.backoff);
        tokio::pin!(running);
        loop {
          tokio::select! {
            biased;
            _ = root.cancelled() => return,
            Some(event) = self.heartbeat_events.recv() => match event {
              HeartbeatEvent::SessionLost => break None,
              HeartbeatEvent::Failed(text) => core.record_error(text),
            },
            end = &mut running => break Some(end),
          }
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
