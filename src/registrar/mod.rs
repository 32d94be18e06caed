//! The registrar's handle: what `start()`, `update()`, `stop()` and `status()`
//! do, for the binding and the Rust tests. Knows nothing of napi.
//!
//! Shape: `Registrar` owns a `TaskTracker` and a root `CancellationToken`
//! (`dispatch::Owners`); everything it starts (the supervisor, the heartbeat,
//! every task) is spawned on that tracker and ends on that token.
//!
//! - state.rs: the states, the status, and `Core`, what the handle and the
//!   supervisor share; the registrar's life is published through one `watch`
//!   channel (`Life`), which `status()` and `start()` read.
//! - supervisor.rs: the one task that runs the state machine, spawned when the
//!   registrar is made. `start()` and `update()` are commands to it;
//!   `stop()` cancels the root token, which it checks first, and waits (at most
//!   `STOP_GRACE`, then the hard stop drops what is still in flight) until the
//!   tracker is empty.
//! - updates.rs: the sets `update()` asks for until mcpd accepts them; the
//!   dispatcher serves the old set until then (`TaskDispatcher::serve`).

mod state;
mod supervisor;
#[cfg(test)]
pub(crate) mod tests;
mod updates;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use self::state::{Core, Life};
pub use self::state::{RegistrarState, RegistrarStatus, RunningHold, StatusObserver};
use self::supervisor::{Command, StartMode, Supervisor};
use crate::backoff::BackoffPolicy;
use crate::config::SessionStore;
use crate::dispatch::{DispatchSettings, Owners, PublishedProvider, TaskDispatcher};
use crate::error::{describe, Error, Result};
use crate::mcpd::McpdClient;
use crate::observe::audit::{AuditConfig, AuditLog};
use crate::observe::metrics::Scrape;
use crate::observe::TaskObserver;
use crate::owner::usage::UsageReport;
use crate::secret::Secret;

/// How long `stop()` waits for the 503 answers of aborted tasks before it
/// drops whatever is still in flight.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything a registrar is made from (the binding reads it from `RegistrarOptions`).
pub struct RegistrarConfig {
  /// mcpd's base URL; plain http only for loopback unless `allow_insecure_http`.
  pub mcpd_url: String,
  /// The bearer token.
  pub token: Secret,
  /// The set to publish: not empty, no name twice.
  pub providers: Vec<PublishedProvider>,
  /// Where the sticky session id is kept.
  pub config_dir: PathBuf,
  /// Until mcpd asks for another.
  pub heartbeat_interval: Duration,
  /// A control channel silent this long is reopened; `None` disables it.
  pub idle_timeout: Option<Duration>,
  /// Between failed registers and connects.
  pub backoff: BackoffPolicy,
  /// Concurrency, queue and timeout per provider.
  pub dispatch: DispatchSettings,
  /// Plain http to a non-loopback host.
  pub allow_insecure_http: bool,
}

/// The registrar: publishes a set of providers to mcpd and serves the tasks it relays.
pub struct Registrar {
  core: Arc<Core>,
  /// To the supervisor. Only the handle sends: once it is gone, an idle
  /// supervisor ends, as nothing can start it any more.
  commands: mpsc::UnboundedSender<Command>,
  /// Audit lines dropped (queue full, write failed): the audit log counts,
  /// `metrics()` reads.
  audit_lines_dropped: Arc<AtomicU64>,
  /// The audit log, when the `audit` option asked for one and its file could
  /// be had: `stop()` closes it.
  audit: Mutex<Option<Arc<AuditLog>>>,
}

impl Registrar {
  /// Validates the configuration, reads the sticky session id and spawns the
  /// supervisor (idle until `start()`); contacts nobody. Must be called inside
  /// a tokio runtime.
  pub fn new(
    config: RegistrarConfig,
    observer: Option<StatusObserver>,
    span: tracing::Span,
  ) -> Result<Self> {
    check_set(&config.providers)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
      Error::InvalidInput("a registrar must be made inside a tokio runtime".to_owned())
    })?;
    let client = Arc::new(McpdClient::new(
      &config.mcpd_url,
      config.token,
      config.allow_insecure_http,
    )?);
    let store = SessionStore::new(config.config_dir);
    // Sweeps the temp files of saves a kill interrupted, then reads the id.
    match store.recover() {
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
      connections: 0,
      started: false,
    });
    let (heartbeat_interval, _) = watch::channel(config.heartbeat_interval);
    let core = Arc::new(Core {
      client,
      store,
      dispatcher,
      idle_timeout: config.idle_timeout,
      observer,
      life,
      heartbeat_interval,
      owners,
      span,
      kept: Mutex::new(Vec::new()),
      beat_now: Arc::new(tokio::sync::Notify::new()),
      running_hold: Mutex::new(None),
    });
    let (commands, inbox) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(Arc::clone(&core), inbox, config.backoff);
    core
      .owners
      .tracker
      .spawn_on(supervisor.run().instrument(core.span.clone()), &runtime);
    Ok(Self {
      core,
      commands,
      audit_lines_dropped: Arc::new(AtomicU64::new(0)),
      audit: Mutex::new(None),
    })
  }

  /// A snapshot of the state and the counters.
  pub fn status(&self) -> RegistrarStatus {
    self.core.status()
  }

  /// Whether `start()` (or the boot hook) has claimed the registrar and that
  /// start has not failed: the one "started" state.
  pub fn is_started(&self) -> bool {
    self.core.life.borrow().started
  }

  /// How many task ids the replay guard remembers (diagnostics and tests).
  pub fn remembered_task_ids(&self) -> usize {
    self.core.dispatcher.remembered()
  }

  /// How many tasks mcpd sent are still alive (diagnostics and tests). A task
  /// leaves after its last POST, so at 0 nothing more is posted for any task
  /// received so far: tests use it as the barrier after which counts are final.
  pub fn live_tasks(&self) -> usize {
    self.core.dispatcher.live()
  }

  /// How many tokio tasks the registrar owns now (diagnostics and tests): the
  /// supervisor, the heartbeat and one per live task. 0 once `stop()` returned.
  pub fn owned_tasks(&self) -> usize {
    self.core.owners.tracker.len()
  }

  /// Keeps `resource` alive as long as the registrar (its loops included).
  pub fn keep_for_life(&self, resource: Box<dyn Send + Sync>) {
    self.core.kept.lock().push(resource);
  }

  /// Registers, then resolves once the control channel is open (state
  /// `connected`), so a task mcpd sends from then on is run. Fails when the
  /// first register fails (naming the HTTP status; the registrar stays idle,
  /// or unauthorized, and may be started again), with `AlreadyStarted` while
  /// another start holds it, or with `Stopped` when stop() comes first. A
  /// stream that does not open after a good register is retried with backoff,
  /// and start() waits for it.
  ///
  /// The start is claimed when `start` is called, not when the future is
  /// first polled.
  pub fn start(&self) -> impl Future<Output = Result<()>> + Send + 'static {
    self.begin(StartMode::Foreground, None)
  }

  /// `start()`, holding `hold` while the registrar runs: it is dropped by
  /// `stop()`, when this start fails, or at once when the start is refused.
  pub fn start_holding(
    &self,
    hold: RunningHold,
  ) -> impl Future<Output = Result<()>> + Send + 'static {
    self.begin(StartMode::Foreground, Some(hold))
  }

  /// Like `start_holding`, but a failed first register is retried in the
  /// background with backoff; the future returns its error (for logging) at
  /// once, or, after a good register, returns once the channel is open.
  pub fn start_in_background(
    &self,
    hold: Option<RunningHold>,
  ) -> impl Future<Output = Result<()>> + Send + 'static {
    self.begin(StartMode::Background, hold)
  }

  /// Claims the start and sends it to the supervisor now; the future waits
  /// for the first register, then for the channel to open.
  fn begin(
    &self,
    mode: StartMode,
    hold: Option<RunningHold>,
  ) -> impl Future<Output = Result<()>> + Send + 'static {
    let (first, registered) = oneshot::channel();
    let sent = self.claim_start(hold).and_then(|()| {
      self
        .commands
        .send(Command::Start { mode, first })
        .map_err(|_| Error::Stopped)
    });
    let life = self.core.life.subscribe();
    async move {
      sent?;
      registered.await.unwrap_or(Err(Error::Stopped))?;
      channel_opened(life).await
    }
  }

  /// Marks the registrar started, taking `hold`, under the `Life` lock: of
  /// two starts only one wins. A refused start drops its `hold`.
  fn claim_start(&self, hold: Option<RunningHold>) -> Result<()> {
    let core = &self.core;
    let mut hold = hold;
    let mut refusal = None;
    core.life.send_if_modified(|life| {
      if life.state == RegistrarState::Stopped || core.owners.root.is_cancelled() {
        refusal = Some(Error::Stopped);
      } else if life.started {
        refusal = Some(Error::AlreadyStarted);
      } else {
        life.started = true;
        if let Some(hold) = hold.take() {
          *core.running_hold.lock() = Some(hold);
        }
        return true;
      }
      false
    });
    // A refused `hold` is dropped here, outside the lock.
    drop(hold);
    refusal.map_or(Ok(()), Err)
  }

  /// Replaces the published set (docs/protocol.md section 1, "Changing the set").
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
  ) -> impl Future<Output = Result<()>> + Send + 'static {
    let root = self.core.owners.root.clone();
    let (done, answer) = oneshot::channel();
    let sent = check_set(&providers).and_then(|()| {
      if root.is_cancelled() || self.core.state() == RegistrarState::Stopped {
        return Err(Error::Stopped);
      }
      self
        .commands
        .send(Command::Update { providers, done })
        .map_err(|_| Error::Stopped)
    });
    async move {
      sent?;
      tokio::select! {
        // mcpd's acceptance first: an update accepted as stop() comes did happen.
        biased;
        answer = answer => answer.unwrap_or(Err(Error::Stopped)),
        _ = root.cancelled() => Err(Error::Stopped),
      }
    }
  }

  /// Pauses one provider (`Some(name)`), or the whole registrar (`None`, providers
  /// added by `update()` while it lasts included): new tasks for it are answered 503
  /// `provider_paused`; tasks admitted (running or queued) go on. The heartbeat says
  /// so at once. With `drain`, the future resolves once those tasks have ended.
  /// Fails with `InvalidInput` for a name not published, and with `Stopped` after
  /// `stop()`, or when `stop()` comes while it drains. The pause happens when
  /// `pause` is called, not when the future is first polled.
  pub fn pause(
    &self,
    provider: Option<String>,
    drain: bool,
  ) -> impl Future<Output = Result<()>> + Send + 'static {
    let core = Arc::clone(&self.core);
    let paused = if core.owners.root.is_cancelled() {
      Err(Error::Stopped)
    } else {
      core.dispatcher.pause(provider.as_deref())
    };
    if paused.is_ok() {
      core.span.in_scope(|| {
        tracing::info!(
          provider = provider.as_deref().unwrap_or("(all)"),
          "paused by the owner"
        )
      });
      core.beat_now.notify_one();
    }
    async move {
      paused?;
      if drain {
        core.dispatcher.drained(provider.as_deref()).await?;
      }
      Ok(())
    }
  }

  /// Resumes one provider (a pause of the whole registrar stays), or clears every
  /// pause (`None`). The heartbeat says so at once. `InvalidInput` for a name not
  /// published.
  pub fn resume(&self, provider: Option<&str>) -> Result<()> {
    let core = &self.core;
    core.dispatcher.resume(provider)?;
    core.span.in_scope(|| {
      tracing::info!(
        provider = provider.unwrap_or("(all)"),
        "resumed by the owner"
      )
    });
    core.beat_now.notify_one();
    Ok(())
  }

  /// Tasks, tokens and refusals since the registrar was made, per provider and
  /// per caller.
  pub fn usage(&self) -> UsageReport {
    self.core.dispatcher.usage()
  }

  /// The Prometheus text exposition (format 0.0.4) of this registrar's metrics
  /// (observe/metrics.rs), with the lanes, the state, the reconnects and the
  /// audit log's dropped lines read now.
  pub fn metrics(&self) -> String {
    let status = self.core.status();
    let dropped = self.audit_lines_dropped.load(Ordering::Relaxed);
    self.core.dispatcher.metrics_text(|lanes| Scrape {
      lanes,
      state: status.state,
      reconnects: status.reconnects,
      audit_lines_dropped: dropped,
    })
  }

  /// Adds an observer told about every task that ends from now on (the audit log).
  pub fn add_observer(&self, observer: Arc<dyn TaskObserver>) {
    self.core.dispatcher.add_observer(observer);
  }

  /// The count of dropped audit lines, for the audit log to increment.
  pub fn audit_lines_dropped(&self) -> Arc<AtomicU64> {
    Arc::clone(&self.audit_lines_dropped)
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
    // After the tasks: their lines are queued by then, and written before this returns.
    self.close_audit().await;
    // Releasing the hold is what lets Node exit.
    core.release_hold();
  }
}

// The audit log (the `audit` option; observe/audit.rs).
impl Registrar {
  /// Opens the audit log and tells it every task that ends from now on; call it
  /// before `start()`. A file that cannot be had (a symlink, a directory, an
  /// unwritable place) is warned about and the registrar serves on without it.
  /// `token` is scrubbed from every line. Once per registrar: a second call is
  /// ignored.
  pub fn open_audit(&self, config: &AuditConfig, token: Secret) {
    let mut slot = self.audit.lock();
    if slot.is_some() {
      return;
    }
    let opened = AuditLog::open(
      config,
      Some(token),
      Arc::clone(&self.audit_lines_dropped),
      self.core.span.clone(),
    );
    if let Some(log) = opened.map(Arc::new) {
      self.add_observer(Arc::clone(&log) as Arc<dyn TaskObserver>);
      *slot = Some(log);
    }
  }

  /// Writes what the audit log holds and closes its file (bounded: `CLOSE_GRACE`).
  async fn close_audit(&self) {
    let log = self.audit.lock().clone();
    if let Some(log) = log {
      log.close().await;
    }
  }
}

/// Waits until the control channel has been open once; `Stopped` when stop()
/// comes first.
async fn channel_opened(mut life: watch::Receiver<Life>) -> Result<()> {
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
