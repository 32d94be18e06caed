//! The registrar's life: register (with the sticky session id), keep the control
//! channel open, beat the heart, and stop. Knows nothing of napi.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::channel::{ChannelEnd, ControlChannel};
use crate::config::SessionStore;
use crate::dispatch::{DispatchSettings, PublishedProvider, TaskDispatcher};
use crate::error::{describe, Error, Result};
use crate::heartbeat::Heartbeat;
use crate::mcpd::McpdClient;
use crate::secret::Secret;
use crate::wire::ProviderDescriptor;

/// A connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);
/// The floor under a `heartbeatIntervalMs` that mcpd sends.
const MIN_SERVER_HEARTBEAT: Duration = Duration::from_millis(100);
/// How long `stop()` waits for the 503 answers of aborted tasks.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
  pub reconnects: u64,
  pub last_error: Option<String>,
}

/// How the first register went, which sets the supervisor's first wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstStart {
  Registered,
  Failed,
  /// The token was refused: retry at the maximum backoff only.
  Unauthorized,
}

/// Called with the status on every state change.
pub type StatusObserver = Arc<dyn Fn(RegistrarStatus) + Send + Sync>;

struct Life {
  state: RegistrarState,
  last_error: Option<String>,
  reconnects: u64,
}

struct Shared {
  client: Arc<McpdClient>,
  store: SessionStore,
  descriptors: Vec<ProviderDescriptor>,
  dispatcher: Arc<TaskDispatcher>,
  heartbeat_interval: Arc<Mutex<Duration>>,
  idle_timeout: Option<Duration>,
  backoff: BackoffPolicy,
  life: Mutex<Life>,
  observer: Option<StatusObserver>,
  shutdown: watch::Sender<bool>,
  session_lost: AtomicBool,
  session_lost_signal: Notify,
  span: tracing::Span,
  /// What must live as long as the registrar (its log route).
  kept: Mutex<Vec<Box<dyn Send + Sync>>>,
  /// What must live while it runs (the binding's hold on Node's event loop):
  /// taken by start(), released by stop() or a failed start(). Held here, not
  /// by the JavaScript object, so that garbage collection cannot release it.
  running_hold: Mutex<Option<Box<dyn Send + Sync>>>,
}

pub struct Registrar {
  shared: Arc<Shared>,
  started: AtomicBool,
  loops: Mutex<Vec<JoinHandle<()>>>,
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
    let dispatcher = Arc::new(TaskDispatcher::new(
      config.providers,
      Arc::clone(&client),
      config.dispatch,
    ));
    let (shutdown, _) = watch::channel(false);
    Ok(Self {
      shared: Arc::new(Shared {
        client,
        store,
        descriptors,
        dispatcher,
        heartbeat_interval: Arc::new(Mutex::new(config.heartbeat_interval)),
        idle_timeout: config.idle_timeout,
        backoff: config.backoff,
        life: Mutex::new(Life {
          state: RegistrarState::Idle,
          last_error: None,
          reconnects: 0,
        }),
        observer,
        shutdown,
        session_lost: AtomicBool::new(false),
        session_lost_signal: Notify::new(),
        span,
        kept: Mutex::new(Vec::new()),
        running_hold: Mutex::new(None),
      }),
      started: AtomicBool::new(false),
      loops: Mutex::new(Vec::new()),
    })
  }

  pub fn status(&self) -> RegistrarStatus {
    self.shared.status()
  }

  /// Keeps `resource` alive as long as the registrar (its loops included).
  pub fn keep_for_life(&self, resource: Box<dyn Send + Sync>) {
    self.shared.kept.lock().push(resource);
  }

  /// Holds `resource` until stop() or a failed start(); `false` (and
  /// `resource` dropped) when one is held already or the registrar is stopped.
  pub fn hold_while_running(&self, resource: Box<dyn Send + Sync>) -> bool {
    let mut hold = self.shared.running_hold.lock();
    if hold.is_some() || self.shared.state() == RegistrarState::Stopped {
      return false;
    }
    *hold = Some(resource);
    true
  }

  fn release_hold(&self) {
    let released = self.shared.running_hold.lock().take();
    drop(released);
  }

  /// Registers once; on success persists the id and starts the channel and the
  /// heartbeat. On failure returns the error (naming the HTTP status) and stays idle.
  pub async fn start(&self) -> Result<()> {
    self.claim_start()?;
    let shared = Arc::clone(&self.shared);
    match shared.register_once().instrument(shared.span.clone()).await {
      Ok(()) => {
        self.spawn_loops(FirstStart::Registered);
        Ok(())
      }
      Err(error) => {
        let state = if shared.state() == RegistrarState::Stopped {
          RegistrarState::Stopped
        } else if matches!(error.status(), Some(401 | 403)) {
          RegistrarState::Unauthorized
        } else {
          RegistrarState::Idle
        };
        shared.set_state(state);
        self.started.store(false, Ordering::SeqCst);
        self.release_hold();
        Err(error)
      }
    }
  }

  /// Like `start`, but a failed first register is retried in the background
  /// with backoff; the error of the first attempt is returned for logging.
  pub async fn start_in_background(&self) -> Result<()> {
    self.claim_start()?;
    let shared = Arc::clone(&self.shared);
    let first = shared.register_once().instrument(shared.span.clone()).await;
    let first_start = match &first {
      Ok(()) => FirstStart::Registered,
      Err(Error::Stopped) => return first,
      Err(error) if matches!(error.status(), Some(401 | 403)) => {
        shared.set_state(RegistrarState::Unauthorized);
        FirstStart::Unauthorized
      }
      Err(_) => {
        shared.set_state(RegistrarState::Reconnecting);
        FirstStart::Failed
      }
    };
    self.spawn_loops(first_start);
    first
  }

  fn claim_start(&self) -> Result<()> {
    if self.shared.state() == RegistrarState::Stopped {
      return Err(Error::Stopped);
    }
    if self.started.swap(true, Ordering::SeqCst) {
      return Err(Error::InvalidInput(
        "registrar is already started".to_owned(),
      ));
    }
    Ok(())
  }

  fn spawn_loops(&self, first_start: FirstStart) {
    let shared = &self.shared;
    let supervisor = tokio::spawn(
      Arc::clone(shared)
        .supervise(first_start)
        .instrument(shared.span.clone()),
    );
    let heartbeat = Heartbeat {
      client: Arc::clone(&shared.client),
      dispatcher: Arc::clone(&shared.dispatcher),
      interval: Arc::clone(&shared.heartbeat_interval),
    };
    let lost = Arc::clone(shared);
    let failed = Arc::clone(shared);
    let mut shutdown = shared.shutdown.subscribe();
    let beating = tokio::spawn(
      async move {
        tokio::select! {
          _ = heartbeat.run(move || lost.mark_session_lost(), move |error| failed.record_error(error)) => {}
          _ = shutdown.wait_for(|stopped| *stopped) => {}
        }
      }
      .instrument(shared.span.clone()),
    );
    self.loops.lock().extend([supervisor, beating]);
  }

  /// Stops taking tasks, answers in-flight ones 503, closes the channel and
  /// ends every loop. Idempotent.
  pub async fn stop(&self) {
    let shared = &self.shared;
    if shared.state() == RegistrarState::Stopped {
      self.release_hold();
      return;
    }
    shared.shutdown.send_replace(true);
    shared
      .dispatcher
      .stop(STOP_GRACE)
      .instrument(shared.span.clone())
      .await;
    let loops: Vec<_> = self.loops.lock().drain(..).collect();
    for handle in loops {
      handle.abort();
      let _ = handle.await;
    }
    shared.set_state(RegistrarState::Stopped);
    // Releasing the hold is what lets Node exit.
    self.release_hold();
  }
}

impl Shared {
  fn state(&self) -> RegistrarState {
    self.life.lock().state
  }

  fn status(&self) -> RegistrarStatus {
    let totals = self.dispatcher.totals();
    let life = self.life.lock();
    RegistrarStatus {
      state: life.state,
      provider_session_id: self.client.session_id(),
      providers: self.descriptors.iter().map(|d| d.name.clone()).collect(),
      in_flight: totals.in_flight,
      queued: totals.queued,
      completed: totals.completed,
      failed: totals.failed,
      reconnects: life.reconnects,
      last_error: life.last_error.clone(),
    }
  }

  fn set_state(&self, state: RegistrarState) {
    {
      let mut life = self.life.lock();
      if life.state == state || life.state == RegistrarState::Stopped {
        return;
      }
      life.state = state;
    }
    tracing::debug!(state = state.as_str(), "state changed");
    if let Some(observer) = &self.observer {
      observer(self.status());
    }
  }

  fn record_error(&self, error: String) {
    self.life.lock().last_error = Some(self.client.token().redact(&error));
  }

  fn mark_session_lost(&self) {
    self.session_lost.store(true, Ordering::SeqCst);
    self.session_lost_signal.notify_one();
  }

  async fn stopped(&self) {
    let mut shutdown = self.shutdown.subscribe();
    let _ = shutdown.wait_for(|stopped| *stopped).await;
  }

  async fn session_lost(&self) {
    loop {
      let signal = self.session_lost_signal.notified();
      if self.session_lost.load(Ordering::SeqCst) {
        return;
      }
      signal.await;
    }
  }

  /// One register call; adopts and persists the id mcpd answers.
  async fn register_once(&self) -> Result<()> {
    self.set_state(RegistrarState::Registering);
    let answer = tokio::select! {
      answer = self.client.register(&self.descriptors) => answer,
      _ = self.stopped() => return Err(Error::Stopped),
    };
    let answer = match answer {
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
        *self.heartbeat_interval.lock() = interval;
      } else {
        tracing::warn!(
          heartbeat_interval_ms = %value,
          "ignoring mcpd's invalid heartbeatIntervalMs"
        );
      }
    }
    self.session_lost.store(false, Ordering::SeqCst);
    tracing::info!(providers = self.descriptors.len(), "registered with mcpd");
    Ok(())
  }

  /// Keeps the registrar registered and its channel open until shutdown.
  async fn supervise(self: Arc<Self>, first_start: FirstStart) {
    let mut backoff = Backoff::new(self.backoff);
    let mut channel = ControlChannel::new(
      Arc::clone(&self.client),
      Arc::clone(&self.dispatcher),
      self.idle_timeout,
    );
    // A reconnect that follows a failure waits first; the first connect does not.
    let mut needs_register = first_start != FirstStart::Registered;
    let mut pause = match first_start {
      FirstStart::Registered => None,
      FirstStart::Failed => Some(backoff.next_delay()),
      FirstStart::Unauthorized => Some(backoff.max_delay()),
    };
    // 404s on connect right after registering mean mcpd keeps forgetting us.
    let mut unknown_in_a_row = 0u32;
    loop {
      if let Some(delay) = pause.take() {
        tokio::select! {
          _ = tokio::time::sleep(delay) => {}
          _ = self.stopped() => return,
        }
      }
      if needs_register {
        match self.register_once().await {
          Ok(()) => needs_register = false,
          Err(Error::Stopped) => return,
          Err(error) => {
            pause = Some(if matches!(error.status(), Some(401 | 403)) {
              self.set_state(RegistrarState::Unauthorized);
              backoff.max_delay()
            } else {
              self.set_state(RegistrarState::Reconnecting);
              backoff.next_delay()
            });
            continue;
          }
        }
      }
      let shared = Arc::clone(&self);
      let end = tokio::select! {
        end = channel.run(move || shared.set_state(RegistrarState::Connected), &mut backoff) => end,
        _ = self.session_lost() => {
          // mcpd answered the heartbeat: a fresh start, not a failure streak.
          backoff.reset();
          needs_register = true;
          self.set_state(RegistrarState::Registering);
          continue;
        }
        _ = self.stopped() => return,
      };
      match end {
        ChannelEnd::SessionUnknown => {
          tracing::info!("mcpd does not know the session; registering again");
          self.set_state(RegistrarState::Registering);
          needs_register = true;
          // Straight away the first time; with backoff if it keeps happening.
          unknown_in_a_row += 1;
          pause = (unknown_in_a_row > 1).then(|| backoff.next_delay());
        }
        ChannelEnd::Unauthorized(error) => {
          let text = describe(&error);
          tracing::warn!(error = %text, "mcpd refused the token");
          self.record_error(text);
          self.set_state(RegistrarState::Unauthorized);
          pause = Some(backoff.max_delay());
        }
        ChannelEnd::Dropped {
          error,
          delivered,
          lasted,
        } => {
          let text = describe(&error);
          tracing::warn!(error = %text, "control channel lost; reconnecting");
          self.record_error(text);
          unknown_in_a_row = 0;
          if delivered || lasted >= STABLE_CONNECTION {
            backoff.reset();
          }
          self.life.lock().reconnects += 1;
          self.set_state(RegistrarState::Reconnecting);
          pause = Some(backoff.next_delay());
        }
      }
    }
  }
}
