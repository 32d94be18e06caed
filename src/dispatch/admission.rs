//! Admission: each published provider's lane of concurrency slots and the FIFO
//! queue of tasks waiting for one.
//!
//! Shape: a plain struct (`Lane`) behind an `Arc`, with one short lock. Tasks are
//! admitted synchronously on the control channel's task, in the order events
//! arrive, so the queue is in arrival order whatever the scheduler does. A slot
//! is a guard (`Slot`) that hands itself to the first waiter when dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::PublishedProvider;
use crate::observe::metrics::ProviderMetrics;
use crate::owner::{Meter, OwnerPolicy};
use crate::wire::ProviderLoad;

/// One provider's slots, queue and counters. A lane outlives an `update()`
/// that keeps its name (its slots and counters go on); the provider and
/// descriptor it runs new tasks with are swapped when mcpd accepted the set.
pub struct Lane {
  name: String,
  /// Shared, not copied, with each task that starts (a task keeps the one it
  /// started with).
  published: Mutex<Arc<PublishedProvider>>,
  max_concurrency: u32,
  max_queue: u32,
  slots: Mutex<Slots>,
  completed: AtomicU64,
  failed: AtomicU64,
  /// The owner's windows (rate and token limits); carried over by an `update()`
  /// that keeps the name.
  pub meter: Mutex<Meter>,
  /// Tasks admitted (running or queued) and not yet ended, for `pause({ drain })`.
  admitted: AtomicU32,
  /// This lane's metric handles, resolved at its first task (`observed.rs`).
  pub metrics: std::sync::OnceLock<Arc<ProviderMetrics>>,
}

#[derive(Default)]
struct Slots {
  in_use: u32,
  waiting: VecDeque<(String, oneshot::Sender<()>)>,
}

/// Where an admitted task stands; a task with neither is answered 429.
pub enum Admission {
  /// A slot is held.
  Now(Slot),
  /// In the queue; the receiver fires when a slot is handed over.
  Queued(Queued),
}

/// A place in a lane's queue.
pub struct Queued {
  lane: Arc<Lane>,
  task_id: String,
  granted: oneshot::Receiver<()>,
}

impl Queued {
  /// Resolves with the slot once one is handed over.
  pub async fn granted(&mut self) -> Slot {
    match (&mut self.granted).await {
      Ok(()) => Slot(Arc::clone(&self.lane)),
      // The sender lives in the lane until it is used or the task leaves.
      Err(_) => std::future::pending().await,
    }
  }

  /// Leaves the queue; a slot handed over in the meantime is given back.
  pub fn leave(mut self) {
    self.lane.leave_queue(&self.task_id);
    if self.granted.try_recv().is_ok() {
      drop(Slot(Arc::clone(&self.lane)));
    }
  }
}

impl Lane {
  pub fn new(published: PublishedProvider, max_concurrency: u32, max_queue: u32) -> Self {
    Self {
      name: published.descriptor.name.clone(),
      published: Mutex::new(Arc::new(published)),
      max_concurrency,
      max_queue,
      slots: Mutex::new(Slots::default()),
      completed: AtomicU64::new(0),
      failed: AtomicU64::new(0),
      meter: Mutex::new(Meter::new()),
      admitted: AtomicU32::new(0),
      metrics: std::sync::OnceLock::new(),
    }
  }

  /// The owner's policy new tasks are checked against.
  pub fn policy(&self) -> Arc<OwnerPolicy> {
    Arc::clone(&self.published.lock().policy)
  }

  /// Counts a task admitted (`true`) or one of those ended (`false`).
  pub fn hold(&self, admitted: bool) {
    if admitted {
      self.admitted.fetch_add(1, Ordering::SeqCst);
    } else {
      self.admitted.fetch_sub(1, Ordering::SeqCst);
    }
  }

  /// Tasks admitted and not yet ended.
  pub fn admitted(&self) -> u32 {
    self.admitted.load(Ordering::SeqCst)
  }

  pub fn name(&self) -> &str {
    &self.name
  }

  /// The provider and descriptor a task starting now runs with.
  pub fn published(&self) -> Arc<PublishedProvider> {
    Arc::clone(&self.published.lock())
  }

  /// What later tasks run with (same name; an `update()` accepted by mcpd).
  pub fn republish(&self, published: PublishedProvider) {
    *self.published.lock() = Arc::new(published);
  }

  /// A slot, a place in the queue, or `None` when both are full.
  pub fn admit(self: &Arc<Self>, task_id: &str) -> Option<Admission> {
    let mut slots = self.slots.lock();
    if slots.in_use < self.max_concurrency {
      slots.in_use += 1;
      return Some(Admission::Now(Slot(Arc::clone(self))));
    }
    if (slots.waiting.len() as u32) < self.max_queue {
      let (sender, granted) = oneshot::channel();
      slots.waiting.push_back((task_id.to_owned(), sender));
      return Some(Admission::Queued(Queued {
        lane: Arc::clone(self),
        task_id: task_id.to_owned(),
        granted,
      }));
    }
    None
  }

  /// Hands a freed slot to the first task still waiting, or frees it.
  fn release(&self) {
    let mut slots = self.slots.lock();
    while let Some((_, waiter)) = slots.waiting.pop_front() {
      if waiter.send(()).is_ok() {
        return;
      }
    }
    slots.in_use = slots.in_use.saturating_sub(1);
  }

  fn leave_queue(&self, task_id: &str) {
    self.slots.lock().waiting.retain(|(id, _)| id != task_id);
  }

  pub fn queued(&self) -> u32 {
    self.slots.lock().waiting.len() as u32
  }

  /// Counts a task of this lane that ended.
  pub fn count(&self, completed: bool) {
    let counter = if completed {
      &self.completed
    } else {
      &self.failed
    };
    counter.fetch_add(1, Ordering::SeqCst);
  }

  /// The figures the heartbeat reports for this provider.
  pub fn load(&self) -> ProviderLoad {
    let (in_flight, queued) = {
      let slots = self.slots.lock();
      (slots.in_use, slots.waiting.len() as u32)
    };
    ProviderLoad {
      name: self.name().to_owned(),
      in_flight,
      queued,
      max_concurrency: self.max_concurrency,
      completed: self.completed.load(Ordering::SeqCst),
      failed: self.failed.load(Ordering::SeqCst),
      paused: false,
    }
  }
}

/// A concurrency slot of a lane, handed on or freed when dropped.
pub struct Slot(Arc<Lane>);

impl Drop for Slot {
  fn drop(&mut self) {
    self.0.release();
  }
}
