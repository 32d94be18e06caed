//! The heartbeat: every `heartbeatIntervalMs` while registered, the per-provider
//! load figures go to mcpd; a 404/410 answer means mcpd forgot the session.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backoff::jitter;
use crate::dispatch::TaskDispatcher;
use crate::error::describe;
use crate::mcpd::McpdClient;

pub struct Heartbeat {
  pub client: Arc<McpdClient>,
  pub dispatcher: Arc<TaskDispatcher>,
  /// Shared with the registrar, which updates it from the register answer.
  pub interval: Arc<Mutex<Duration>>,
}

impl Heartbeat {
  /// Runs until dropped. `on_session_lost` fires on 404/410; other failures are
  /// logged and never stop the loop.
  pub async fn run(self, on_session_lost: impl Fn(), on_error: impl Fn(String)) {
    loop {
      let interval = *self.interval.lock();
      tokio::time::sleep(jitter(interval)).await;
      if self.client.session_id().is_none() {
        continue;
      }
      match self.client.heartbeat(&self.dispatcher.loads()).await {
        Ok(()) => tracing::trace!("heartbeat sent"),
        Err(error) if matches!(error.status(), Some(404 | 410)) => {
          tracing::info!("mcpd no longer knows the session; registering again");
          on_session_lost();
        }
        Err(error) => {
          let text = describe(&error);
          tracing::warn!(error = %text, "heartbeat failed");
          on_error(text);
        }
      }
    }
  }
}
