//! The registrar's state and what its handle and supervisor share: the states
//! and the status JavaScript sees, the `Life` published through one `watch`
//! channel, and `Core`, the parts fixed at construction (client, session file,
//! dispatcher, owners) with the few operations both sides need.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::SessionStore;
use crate::dispatch::{Owners, TaskDispatcher};
use crate::error::{describe, Result};
use crate::mcpd::McpdClient;
use crate::wire::ProviderDescriptor;

/// The floor under a `heartbeatIntervalMs` that mcpd sends.
const MIN_SERVER_HEARTBEAT: Duration = Duration::from_millis(100);

/// Where the registrar is in its life (index.d.ts `RegistrarState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrarState {
  /// Made, not started (or the last `start()` failed).
  Idle,
  /// Sending a register to mcpd.
  Registering,
  /// The control channel is open.
  Connected,
  /// The channel was lost (or a register failed); trying again after a backoff.
  Reconnecting,
  /// mcpd refused the token; trying again at the longest backoff.
  Unauthorized,
  /// `stop()` was called; for good.
  Stopped,
}

impl RegistrarState {
  /// The name JavaScript sees.
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

/// What `status()` reports (index.d.ts `RegistrarStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrarStatus {
  /// Where the registrar is in its life.
  pub state: RegistrarState,
  /// The sticky session id mcpd assigned, once there is one.
  pub provider_session_id: Option<String>,
  /// The names of the published set.
  pub providers: Vec<String>,
  /// Tasks running now.
  pub in_flight: u32,
  /// Tasks waiting for a slot.
  pub queued: u32,
  /// Tasks answered with a result.
  pub completed: u64,
  /// Tasks answered with an error.
  pub failed: u64,
  /// received = completed + failed + cancelled + inFlight + queued.
  pub cancelled: u64,
  /// How many times the control channel was lost and reopened.
  pub reconnects: u64,
  /// The last failure, token redacted.
  pub last_error: Option<String>,
  /// The published names paused by the owner (all of them when paused as a whole).
  pub paused: Vec<String>,
}

/// The registrar's life as one value, published through one `watch` channel:
/// the supervisor writes it, the handle writes it only at the edges (the
/// start claim, `stop()`), and everyone else reads it.
#[derive(Debug, Clone)]
pub(crate) struct Life {
  pub state: RegistrarState,
  pub last_error: Option<String>,
  pub reconnects: u64,
  /// How many times the control channel opened.
  pub connections: u64,
  /// The one "started" state: `start()` (or the boot hook) claimed the
  /// registrar and that start has not failed. Claimed by the handle under this
  /// channel's lock, so that two starts cannot both win; given back by the
  /// supervisor when a `start()`'s first register fails.
  pub started: bool,
}

/// Called with the status on every state change.
pub type StatusObserver = Arc<dyn Fn(RegistrarStatus) + Send + Sync>;

/// What must live while the registrar runs (the binding's hold on Node's event
/// loop): given with a start, dropped by `stop()` or when that start fails.
pub type RunningHold = Box<dyn Send + Sync>;

/// What the handle and the supervisor share.
pub(crate) struct Core {
  pub client: Arc<McpdClient>,
  pub store: SessionStore,
  /// The published set lives here (`serve`, `published`); the supervisor
  /// decides when it changes.
  pub dispatcher: Arc<TaskDispatcher>,
  pub idle_timeout: Option<Duration>,
  pub observer: Option<StatusObserver>,
  pub life: watch::Sender<Life>,
  /// The heartbeat's interval: the configured one, or mcpd's `heartbeatIntervalMs`.
  pub heartbeat_interval: watch::Sender<Duration>,
  pub owners: Owners,
  pub span: tracing::Span,
  /// What must live as long as the registrar (its log route).
  pub kept: Mutex<Vec<Box<dyn Send + Sync>>>,
  /// Wakes the heartbeat to send a beat at once (`pause()`, `resume()`).
  pub beat_now: Arc<tokio::sync::Notify>,
  /// Held by the core, which the supervisor holds, not by the JavaScript
  /// object, so that garbage collection cannot release it while running.
  pub running_hold: Mutex<Option<RunningHold>>,
}

impl Core {
  pub fn state(&self) -> RegistrarState {
    self.life.borrow().state
  }

  pub fn status(&self) -> RegistrarStatus {
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
      paused: self.dispatcher.paused(),
    }
  }

  /// Changes the state (never out of `Stopped`) and tells the observer.
  pub fn set_state(&self, state: RegistrarState) {
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

  pub fn record_error(&self, error: String) {
    let redacted = self.client.token().redact(&error);
    self
      .life
      .send_modify(|life| life.last_error = Some(redacted));
  }

  /// Drops the running hold (outside the lock: dropping it may call into napi).
  pub fn release_hold(&self) {
    let released = self.running_hold.lock().take();
    drop(released);
  }

  /// One register call of `descriptors`; adopts and persists the id mcpd
  /// answers, and the heartbeat interval it asks for. `Ok(true)` when that id
  /// is not the one sent.
  pub async fn register_once(&self, descriptors: &[ProviderDescriptor]) -> Result<bool> {
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
      if let Err(error) = self.store.save_off_runtime(&id).await {
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
        self.heartbeat_interval.send_replace(interval);
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
