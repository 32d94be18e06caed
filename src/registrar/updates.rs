//! The update book: the set `update()` asks for, from the moment it reaches the
//! supervisor until mcpd accepts it (docs/protocol.md section 1, "Changing the set"),
//! with the callers waiting for it and the backoff between failed registers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::state::Core;
use crate::backoff::{Backoff, BackoffPolicy};
use crate::dispatch::PublishedProvider;
use crate::error::{describe, Error, Result};
use crate::wire::ProviderDescriptor;

/// A register of an update, in flight; its generation and result.
pub(super) type UpdateAttempt = Pin<Box<dyn Future<Output = (u64, Result<bool>)> + Send>>;

/// Who waits for an update: told once mcpd accepted the set (or a later one).
pub(super) type UpdateWaiter = oneshot::Sender<Result<()>>;

/// The set an update asks for, until mcpd accepts it.
struct PendingUpdate {
  generation: u64,
  providers: Vec<PublishedProvider>,
  waiters: Vec<UpdateWaiter>,
}

/// The supervisor's part that changes the set (a value of its own, so that it
/// can be used while the control channel borrows the rest).
pub(super) struct Updates {
  pending: Option<PendingUpdate>,
  generation: u64,
  /// Between failed update registers; apart from the channel's.
  backoff: Backoff,
  /// When the next update register may go, after one failed.
  retry_at: Option<Instant>,
}

impl Updates {
  pub fn new(policy: BackoffPolicy) -> Self {
    Self {
      pending: None,
      generation: 0,
      backoff: Backoff::new(policy),
      retry_at: None,
    }
  }

  /// An update before the registrar started (or after a failed start): the
  /// set replaces the one the next start registers, at once.
  pub fn replace_unstarted(core: &Core, providers: Vec<PublishedProvider>, done: UpdateWaiter) {
    core.dispatcher.serve(&providers, &[]);
    tracing::info!(providers = %names(&providers), "published set replaced; start() registers it");
    let _ = done.send(Ok(()));
  }

  /// Takes an update while started: the last set wins; every waiter resolves with it.
  pub fn take(&mut self, core: &Core, providers: Vec<PublishedProvider>, done: UpdateWaiter) {
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

  /// What a register sends now: the pending set (with its generation), or the published one.
  pub fn wanted(&self, core: &Core) -> (Option<u64>, Vec<ProviderDescriptor>) {
    match &self.pending {
      Some(pending) => (Some(pending.generation), descriptors(&pending.providers)),
      None => (None, descriptors(&core.dispatcher.published())),
    }
  }

  /// When the next update register may go, while one waits out its backoff.
  pub fn retry_at(&self) -> Option<Instant> {
    self.retry_at
  }

  /// An update register to send now, if one is pending and not waiting out its backoff.
  pub fn attempt(&mut self, core: &Arc<Core>) -> Option<UpdateAttempt> {
    let pending = self.pending.as_ref()?;
    if self.retry_at.is_some_and(|at| at > Instant::now()) {
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

  /// mcpd accepted the set of `generation` (`None`: the published set): when
  /// it is the last one asked for, it becomes the published set and its
  /// callers resolve.
  pub fn accepted(&mut self, core: &Core, generation: Option<u64>) {
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

  /// An update register failed: the old set stays; retried after a backoff
  /// (the longest when the token is refused).
  pub fn failed(&mut self, core: &Core, error: &Error) {
    let text = describe(error);
    tracing::warn!(error = %text, "update register failed; the old set stays published; retrying");
    core.record_error(text);
    let delay = if matches!(error.status(), Some(401 | 403)) {
      self.backoff.max_delay()
    } else {
      self.backoff.next_delay()
    };
    self.retry_at = Some(Instant::now() + delay);
  }

  /// A start() failed: the set asked for meanwhile becomes the one the next
  /// start() registers, as before a start.
  pub fn settle_unstarted(&mut self, core: &Core) {
    self.retry_at = None;
    self.backoff.reset();
    if let Some(pending) = self.pending.take() {
      core.dispatcher.serve(&pending.providers, &[]);
      for waiter in pending.waiters {
        let _ = waiter.send(Ok(()));
      }
    }
  }
}

/// The names of a set, for logs.
pub(super) fn names(providers: &[PublishedProvider]) -> String {
  providers
    .iter()
    .map(|p| p.descriptor.name.as_str())
    .collect::<Vec<_>>()
    .join(", ")
}

fn descriptors(providers: &[PublishedProvider]) -> Vec<ProviderDescriptor> {
  providers.iter().map(|p| p.descriptor.clone()).collect()
}
