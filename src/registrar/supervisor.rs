//! The supervisor: the one task that owns the registrar's state machine. Spawned
//! once, when the registrar is made; `start()` and `update()` reach it as
//! commands over its channel, `stop()` as the root token it checks first.
//!
//! Its life: idle → register → connect → run → (reconnect | re-register) → … →
//! stopped. A `start()` whose first register fails takes it back to idle.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::state::{Core, RegistrarState};
use super::updates::{UpdateAttempt, UpdateWaiter, Updates};
use crate::backoff::{Backoff, BackoffPolicy};
use crate::channel::{ChannelEnd, ControlChannel};
use crate::dispatch::PublishedProvider;
use crate::error::{describe, Error, Result};
use crate::heartbeat::{Heartbeat, HeartbeatEvent};

/// A connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);

/// What the supervisor is asked to do. (`stop()` is the root token instead: it
/// must overtake whatever waits in this queue.)
pub(super) enum Command {
  /// Start (the handle has claimed the start already); `first` gets the first
  /// register's result.
  Start {
    mode: StartMode,
    first: oneshot::Sender<Result<()>>,
  },
  /// Publish this set instead (`update()`); `done` gets the outcome.
  Update {
    providers: Vec<PublishedProvider>,
    done: UpdateWaiter,
  },
}

/// How the first register failing is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StartMode {
  /// `start()`: the failure is the caller's; the supervisor goes back to idle.
  Foreground,
  /// The boot hook: retried in the background with backoff.
  Background,
}

/// A start being answered.
struct Start {
  mode: StartMode,
  first: oneshot::Sender<Result<()>>,
}

/// How a life that started ended.
enum Ended {
  /// The root token fired.
  Stopped,
  /// A `start()`'s first register failed: idle again.
  StartFailed,
}

/// Why the supervisor left a running control channel.
enum Left {
  /// The connection ended on its own.
  Channel(ChannelEnd),
  /// The heartbeat found the session lost: register again.
  SessionLost,
  /// An update register got a new session id: the open channel is the old session's.
  SessionMoved,
}

/// The step after this one, and how long to wait before it.
struct Next {
  /// Register (again) before connecting.
  register: bool,
  pause: Option<Duration>,
}

impl Next {
  fn register(pause: Option<Duration>) -> Self {
    Self {
      register: true,
      pause,
    }
  }

  fn connect(pause: Option<Duration>) -> Self {
    Self {
      register: false,
      pause,
    }
  }
}

/// The one owner of the registrar's state machine.
pub(super) struct Supervisor {
  core: Arc<Core>,
  inbox: mpsc::UnboundedReceiver<Command>,
  /// Between failed registers and connects.
  backoff: Backoff,
  updates: Updates,
  channel: ControlChannel,
  /// The heartbeat's end of its report channel, cloned when it starts.
  events: mpsc::UnboundedSender<HeartbeatEvent>,
  heartbeat_events: mpsc::UnboundedReceiver<HeartbeatEvent>,
  heartbeat_started: bool,
  /// 404s on connect right after registering mean mcpd keeps forgetting us.
  unknown_in_a_row: u32,
}

impl Supervisor {
  pub fn new(
    core: Arc<Core>,
    inbox: mpsc::UnboundedReceiver<Command>,
    policy: BackoffPolicy,
  ) -> Self {
    let (events, heartbeat_events) = mpsc::unbounded_channel();
    let channel = ControlChannel::new(
      Arc::clone(&core.client),
      Arc::clone(&core.dispatcher),
      core.idle_timeout,
    );
    Self {
      core,
      inbox,
      backoff: Backoff::new(policy),
      updates: Updates::new(policy),
      channel,
      events,
      heartbeat_events,
      heartbeat_started: false,
      unknown_in_a_row: 0,
    }
  }

  /// Runs until the root token fires, or, while idle, until the handle is gone.
  pub async fn run(mut self) {
    while let Some(start) = self.idle().await {
      match self.live(start).await {
        Ended::Stopped => return,
        Ended::StartFailed => continue,
      }
    }
  }

  /// Not started: an update replaces the set at once, until a start comes.
  /// `None` when stopped, or when the handle is gone (nothing can start it).
  async fn idle(&mut self) -> Option<Start> {
    let root = self.core.owners.root.clone();
    loop {
      let command = tokio::select! {
        biased;
        _ = root.cancelled() => return None,
        command = self.inbox.recv() => command?,
      };
      match command {
        Command::Update { providers, done } => {
          Updates::replace_unstarted(&self.core, providers, done)
        }
        Command::Start { mode, first } => return Some(Start { mode, first }),
      }
    }
  }

  /// Keeps the registrar registered and its channel open, from its first
  /// register until stop, or until that register fails for a `start()`.
  async fn live(&mut self, start: Start) -> Ended {
    let mut start = Some(start);
    let mut next = Next::register(None);
    loop {
      if let Some(delay) = next.pause {
        let root = &self.core.owners.root;
        if unless_stopped(root, tokio::time::sleep(delay))
          .await
          .is_none()
        {
          return Ended::Stopped;
        }
      }
      if next.register {
        let Some(registered) = self.register().await else {
          return Ended::Stopped;
        };
        if let Err(error) = registered {
          // A start()'s first register failing is its caller's to handle.
          if let Some(start) = start.take_if(|start| start.mode == StartMode::Foreground) {
            self.give_back(start, error);
            return Ended::StartFailed;
          }
          next = self.after_failed_register(&error);
          answer(&mut start, Err(error));
          continue;
        }
        answer(&mut start, Ok(()));
      }
      let Some(left) = self.run_channel().await else {
        return Ended::Stopped;
      };
      next = self.after_channel(left);
    }
  }

  /// One register of the set wanted now (the one asked for last, if an update
  /// is pending); starts the heartbeat after the first good one. `None` when
  /// stopped.
  async fn register(&mut self) -> Option<Result<()>> {
    while let Ok(command) = self.inbox.try_recv() {
      take_command(&self.core, &mut self.updates, command);
    }
    let core = Arc::clone(&self.core);
    let (generation, descriptors) = self.updates.wanted(&core);
    core.set_state(RegistrarState::Registering);
    let registered = unless_stopped(&core.owners.root, core.register_once(&descriptors)).await?;
    if registered.is_ok() {
      self.updates.accepted(&core, generation);
      self.start_heartbeat();
    }
    Some(registered.map(|_moved| ()))
  }

  /// A `start()`'s first register failed: the caller hears of it once the
  /// start is given back (with its hold), so that its next `start()` is taken;
  /// the sets asked for meanwhile replace the one that start registers.
  fn give_back(&mut self, start: Start, error: Error) {
    let core = &self.core;
    core.set_state(if is_unauthorized(&error) {
      RegistrarState::Unauthorized
    } else {
      RegistrarState::Idle
    });
    self.updates.settle_unstarted(core);
    let mut hold = None;
    core.life.send_if_modified(|life| {
      life.started = false;
      hold = core.running_hold.lock().take();
      false
    });
    drop(hold);
    let _ = start.first.send(Err(error));
  }

  /// A register failed while started: again after a backoff (the longest when
  /// the token is refused).
  fn after_failed_register(&mut self, error: &Error) -> Next {
    if is_unauthorized(error) {
      self.core.set_state(RegistrarState::Unauthorized);
      Next::register(Some(self.backoff.max_delay()))
    } else {
      self.core.set_state(RegistrarState::Reconnecting);
      Next::register(Some(self.backoff.next_delay()))
    }
  }

  /// Opens the control channel and runs it until it ends, the session is lost
  /// or moved, or stop (`None`). Updates register meanwhile, the channel open.
  async fn run_channel(&mut self) -> Option<Left> {
    let Self {
      core,
      inbox,
      backoff,
      updates,
      channel,
      heartbeat_events,
      ..
    } = self;
    let root = core.owners.root.clone();
    // A lost session reported before this connect is checked by the connect
    // itself (404 → register again); only one reported while the channel is
    // open needs the heartbeat's word.
    while let Ok(event) = heartbeat_events.try_recv() {
      if let HeartbeatEvent::Failed(text) = event {
        core.record_error(text);
      }
    }
    let opened = || core.set_state(RegistrarState::Connected);
    let running = channel.run(opened, backoff);
    tokio::pin!(running);
    let mut attempt: Option<UpdateAttempt> = None;
    loop {
      if attempt.is_none() {
        attempt = updates.attempt(core);
      }
      let retry_at = updates.retry_at().filter(|_| attempt.is_none());
      // Order: stop; the heartbeat's news; a new set asked for; an update
      // register's answer; its retry time; the channel's end. Stop first, so
      // that nothing starts after it; the channel last, so that news that came
      // with its end is not lost.
      tokio::select! {
        biased;
        _ = root.cancelled() => return None,
        Some(event) = heartbeat_events.recv() => match event {
          // A beat sent before the channel registered a new session may be
          // answered 404 after it: that session is gone already, not this one.
          HeartbeatEvent::SessionLost(lost) if core.client.session_id().as_deref() == Some(lost.as_str()) => {
            return Some(Left::SessionLost)
          }
          HeartbeatEvent::SessionLost(_) => tracing::debug!("a stale heartbeat 404 for a replaced session; ignored"),
          HeartbeatEvent::Failed(text) => core.record_error(text),
        },
        Some(command) = inbox.recv() => take_command(core, updates, command),
        (generation, registered) = async { attempt.as_mut().expect("checked").await }, if attempt.is_some() => {
          attempt = None;
          match registered {
            Ok(moved) => {
              updates.accepted(core, Some(generation));
              if moved {
                return Some(Left::SessionMoved);
              }
            }
            Err(error) => updates.failed(core, &error),
          }
        }
        _ = sleep_until_some(retry_at), if retry_at.is_some() => {}
        end = &mut running => return Some(Left::Channel(end)),
      }
    }
  }

  /// What follows the channel's end.
  fn after_channel(&mut self, left: Left) -> Next {
    let core = &self.core;
    match left {
      Left::SessionMoved => {
        tracing::info!("the session id changed; reopening the control channel");
        core.set_state(RegistrarState::Reconnecting);
        Next::connect(None)
      }
      Left::SessionLost => {
        // mcpd answered the heartbeat: a fresh start, not a failure streak.
        self.backoff.reset();
        core.set_state(RegistrarState::Registering);
        Next::register(None)
      }
      Left::Channel(ChannelEnd::SessionUnknown) => {
        tracing::info!("mcpd does not know the session; registering again");
        core.set_state(RegistrarState::Registering);
        // Straight away the first time; with backoff if it keeps happening.
        self.unknown_in_a_row += 1;
        Next::register((self.unknown_in_a_row > 1).then(|| self.backoff.next_delay()))
      }
      Left::Channel(ChannelEnd::Unauthorized(error)) => {
        let text = describe(&error);
        tracing::warn!(error = %text, "mcpd refused the token");
        core.record_error(text);
        core.set_state(RegistrarState::Unauthorized);
        Next::connect(Some(self.backoff.max_delay()))
      }
      Left::Channel(ChannelEnd::Dropped {
        error,
        delivered,
        lasted,
      }) => {
        let text = describe(&error);
        tracing::warn!(error = %text, "control channel lost; reconnecting");
        core.record_error(text);
        self.unknown_in_a_row = 0;
        if delivered || lasted >= STABLE_CONNECTION {
          self.backoff.reset();
        }
        core.life.send_modify(|life| life.reconnects += 1);
        core.set_state(RegistrarState::Reconnecting);
        Next::connect(Some(self.backoff.next_delay()))
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
      interval: core.heartbeat_interval.subscribe(),
      events: self.events.clone(),
      stop: core.owners.root.clone(),
      now: Arc::clone(&core.beat_now),
    };
    core
      .owners
      .tracker
      .spawn(heartbeat.run().instrument(core.span.clone()));
  }
}

/// Tells the start being answered, if any, how its first register went.
fn answer(start: &mut Option<Start>, registered: Result<()>) {
  if let Some(start) = start.take() {
    let _ = start.first.send(registered);
  }
}

/// A command while started.
fn take_command(core: &Core, updates: &mut Updates, command: Command) {
  match command {
    Command::Update { providers, done } => updates.take(core, providers, done),
    // The handle claims a start before it sends one, so none comes while
    // started; answered all the same rather than left hanging.
    Command::Start { first, .. } => {
      let _ = first.send(Err(Error::AlreadyStarted));
    }
  }
}

fn is_unauthorized(error: &Error) -> bool {
  matches!(error.status(), Some(401 | 403))
}

/// `work`'s output, or `None` when the root token fires first.
async fn unless_stopped<T>(root: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
  tokio::select! {
    biased;
    _ = root.cancelled() => None,
    output = work => Some(output),
  }
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
  match at {
    Some(at) => tokio::time::sleep_until(at).await,
    None => std::future::pending().await,
  }
}
