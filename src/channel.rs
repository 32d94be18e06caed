//! The SSE control channel: one connection to `_provider-stream`, read until it
//! ends, with the idle timeout, `Last-Event-ID` and `retry:` handling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::dispatch::TaskDispatcher;
use crate::error::Error;
use crate::mcpd::McpdClient;
use crate::sse::{SseEvent, SseItem, SseParser, DEFAULT_MAX_FRAME_BYTES};

/// How long a stream connect may wait for its answer when the idle timeout is off.
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// Why a connection ended.
#[derive(Debug)]
pub enum ChannelEnd {
  /// 404/410: mcpd does not know the session; register again.
  SessionUnknown,
  /// 401/403: the token is refused.
  Unauthorized(Error),
  /// Any other failure, a closed stream or an idle timeout: reconnect with backoff.
  Dropped {
    error: Error,
    /// The connection delivered at least one event (resets the backoff).
    delivered: bool,
    /// How long the connection was up.
    lasted: Duration,
  },
}

pub struct ControlChannel {
  client: Arc<McpdClient>,
  dispatcher: Arc<TaskDispatcher>,
  idle_timeout: Option<Duration>,
  last_event_id: Option<String>,
}

impl ControlChannel {
  pub fn new(
    client: Arc<McpdClient>,
    dispatcher: Arc<TaskDispatcher>,
    idle_timeout: Option<Duration>,
  ) -> Self {
    Self {
      client,
      dispatcher,
      idle_timeout,
      last_event_id: None,
    }
  }

  /// Connects and reads events until the connection ends; `on_open` runs once
  /// mcpd accepted the stream. Dropping the future closes the connection.
  pub async fn run(&mut self, on_open: impl FnOnce(), backoff: &mut Backoff) -> ChannelEnd {
    let dropped = |error: Error| ChannelEnd::Dropped {
      error,
      delivered: false,
      lasted: Duration::ZERO,
    };
    // mcpd (or a proxy) may accept the connection and never answer: the
    // answer's head, like every byte after it, must come within the idle timeout.
    let patience = self.idle_timeout.unwrap_or(CONNECT_PATIENCE);
    let silent = || {
      Error::Protocol(format!(
        "stream connect failed: no answer from mcpd within {} ms",
        patience.as_millis()
      ))
    };
    let opened = tokio::time::timeout(
      patience,
      self.client.open_stream(self.last_event_id.as_deref()),
    )
    .await;
    let response = match opened {
      Ok(Ok(response)) => response,
      Ok(Err(error)) => return dropped(error),
      Err(_) => return dropped(silent()),
    };
    let status = response.status().as_u16();
    if status != 200 {
      if matches!(status, 404 | 410) {
        return ChannelEnd::SessionUnknown;
      }
      let error = match tokio::time::timeout(
        patience,
        self.client.status_error("stream connect", response),
      )
      .await
      {
        Ok(error) => error,
        Err(_) => silent(),
      };
      return match status {
        401 | 403 => ChannelEnd::Unauthorized(error),
        _ => dropped(error),
      };
    }
    let content_type = response
      .headers()
      .get(reqwest::header::CONTENT_TYPE)
      .and_then(|value| value.to_str().ok())
      .unwrap_or_default()
      .to_ascii_lowercase();
    if !content_type.starts_with("text/event-stream") {
      return dropped(Error::Protocol(format!(
        "stream connect failed: mcpd answered content-type '{content_type}', not text/event-stream"
      )));
    }
    on_open();
    tracing::debug!("control channel open");
    let opened = Instant::now();
    let mut delivered = false;
    let mut parser = SseParser::resuming(DEFAULT_MAX_FRAME_BYTES, self.last_event_id.clone());
    let mut items = Vec::new();
    let mut response = response;
    let error = loop {
      let read = match self.idle_timeout {
        Some(idle) => match tokio::time::timeout(idle, response.chunk()).await {
          Ok(read) => read,
          Err(_) => {
            break Error::Protocol(format!(
              "control channel idle: no byte from mcpd for {} ms",
              idle.as_millis()
            ))
          }
        },
        None => response.chunk().await,
      };
      let bytes = match read {
        Ok(Some(bytes)) => bytes,
        Ok(None) => break Error::Protocol("control channel closed by mcpd".to_owned()),
        Err(source) => {
          break Error::Transport {
            operation: "control channel read",
            source,
          }
        }
      };
      let fed = parser.feed(&bytes, &mut items);
      self.last_event_id = parser.dispatched_event_id().map(str::to_owned);
      for item in items.drain(..) {
        match item {
          SseItem::Event(event) => {
            delivered = true;
            self.handle(event);
          }
          SseItem::Retry(ms) => backoff.raise_floor(Duration::from_millis(ms)),
          SseItem::Comment => {}
        }
      }
      if let Err(error) = fed {
        break Error::Protocol(format!("control channel unreadable: {error}"));
      }
    };
    ChannelEnd::Dropped {
      error,
      delivered,
      lasted: opened.elapsed(),
    }
  }

  fn handle(&self, event: SseEvent) {
    match event.event.as_str() {
      "task" => self.dispatcher.accept(&event.data),
      "cancel" => self.dispatcher.cancel(&event.data),
      "ping" => {}
      other => tracing::debug!(event = other, "ignoring an unknown control event"),
    }
  }
}
