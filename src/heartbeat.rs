//! The heartbeat: every `heartbeatIntervalMs` while registered, the per-provider
//! load figures go to mcpd; a 404/410 answer means mcpd forgot the session.
//!
//! Shape: an async loop on the registrar's `TaskTracker`. It reads the interval
//! from a `watch` channel (the configured one, or the one mcpd asks for),
//! reports to the supervisor through a channel (`HeartbeatEvent`), and ends on
//! the registrar's root token.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::backoff::jitter;
use crate::dispatch::TaskDispatcher;
use crate::error::describe;
use crate::mcpd::McpdClient;

/// What the heartbeat tells the supervisor.
#[derive(Debug)]
pub enum HeartbeatEvent {
  /// mcpd answered 404/410 to a beat for this session id: register again,
  /// unless the supervisor has registered a new session since (a stale answer).
  SessionLost(String),
  /// Another failure, for `lastError`; the heartbeat goes on.
  Failed(String),
}

/// The heartbeat loop and what it needs.
pub struct Heartbeat {
  /// Sends the beats.
  pub client: Arc<McpdClient>,
  /// Where the load figures come from.
  pub dispatcher: Arc<TaskDispatcher>,
  /// The interval between beats; read again before each one.
  pub interval: watch::Receiver<Duration>,
  /// To the supervisor.
  pub events: mpsc::UnboundedSender<HeartbeatEvent>,
  /// The registrar's root token.
  pub stop: CancellationToken,
  /// A beat at once, out of turn (the owner paused or resumed).
  pub now: Arc<Notify>,
}

impl Heartbeat {
  /// Runs until the stop token fires.
  pub async fn run(self) {
    loop {
      let interval = *self.interval.borrow();
      tokio::select! {
        biased;
        _ = self.stop.cancelled() => return,
        _ = self.now.notified() => {}
        _ = tokio::time::sleep(jitter(interval)) => {}
      }
      let Some(session) = self.client.session_id() else {
        continue;
      };
      let loads = self.dispatcher.loads();
      let sent = tokio::select! {
        biased;
        _ = self.stop.cancelled() => return,
        sent = self.client.heartbeat(&loads) => sent,
      };
      let event = match sent {
        Ok(()) => {
          tracing::trace!("heartbeat sent");
          continue;
        }
        Err(error) if matches!(error.status(), Some(404 | 410)) => {
          tracing::info!("mcpd no longer knows the session; registering again");
          HeartbeatEvent::SessionLost(session)
        }
        Err(error) => {
          let text = describe(&error);
          tracing::warn!(error = %text, "heartbeat failed");
          HeartbeatEvent::Failed(text)
        }
      };
      if self.events.send(event).is_err() {
        return;
      }
    }
  }
}
