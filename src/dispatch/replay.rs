//! The replay guard: a task id running or answered in the last 10 minutes is
//! not run again (docs/protocol.md section 2), bounded in time, count and bytes.
//!
//! Shape: a plain struct owned by the dispatcher's book (under its lock). Ids
//! are kept once (`Arc<str>` shared by the map and the age queue). When a bound
//! is reached the oldest ids are forgotten first; docs/protocol.md states the
//! worst case and the rule.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// How long an answered id is remembered.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(600);
/// The most ids remembered at once.
pub const MAX_IDS: usize = 100_000;
/// The most id bytes remembered at once (ids are at most 256 bytes).
pub const MAX_ID_BYTES: usize = 8 * 1024 * 1024;

pub struct ReplayGuard {
  window: Duration,
  max_ids: usize,
  max_bytes: usize,
  bytes: usize,
  recent: HashMap<Arc<str>, Instant>,
  order: VecDeque<(Instant, Arc<str>)>,
}

impl Default for ReplayGuard {
  fn default() -> Self {
    Self::new(REPLAY_WINDOW, MAX_IDS, MAX_ID_BYTES)
  }
}

impl ReplayGuard {
  pub fn new(window: Duration, max_ids: usize, max_bytes: usize) -> Self {
    Self {
      window,
      max_ids,
      max_bytes,
      bytes: 0,
      recent: HashMap::new(),
      order: VecDeque::new(),
    }
  }

  /// Whether the id was answered within the window.
  pub fn seen(&mut self, task_id: &str) -> bool {
    self.prune();
    self.recent.contains_key(task_id)
  }

  /// Remembers an answered id, forgetting the oldest ones beyond the bounds.
  pub fn remember(&mut self, task_id: &str) {
    self.prune();
    let now = Instant::now();
    let id: Arc<str> = Arc::from(task_id);
    if self.recent.insert(Arc::clone(&id), now).is_none() {
      self.bytes += id.len();
    }
    self.order.push_back((now, id));
    while self.recent.len() > self.max_ids || self.bytes > self.max_bytes {
      if !self.forget_oldest() {
        break;
      }
    }
  }

  pub fn len(&self) -> usize {
    self.recent.len()
  }

  pub fn is_empty(&self) -> bool {
    self.recent.is_empty()
  }

  pub fn bytes(&self) -> usize {
    self.bytes
  }

  fn prune(&mut self) {
    let now = Instant::now();
    while let Some((at, _)) = self.order.front() {
      if now.duration_since(*at) < self.window {
        break;
      }
      self.forget_oldest();
    }
  }

  /// Drops the oldest entry of the age queue (and its id, unless it was
  /// remembered again since).
  fn forget_oldest(&mut self) -> bool {
    let Some((at, id)) = self.order.pop_front() else {
      return false;
    };
    if self.recent.get(&id) == Some(&at) {
      self.recent.remove(&id);
      self.bytes -= id.len();
    }
    true
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[tokio::test(start_paused = true)]
  async fn forgets_after_the_window() {
    let mut guard = ReplayGuard::default();
    guard.remember("t-1");
    tokio::time::advance(Duration::from_secs(599)).await;
    assert!(guard.seen("t-1"));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!guard.seen("t-1"));
    assert_eq!((guard.len(), guard.bytes()), (0, 0));
  }

  #[tokio::test(start_paused = true)]
  async fn full_by_count_forgets_the_oldest() {
    let mut guard = ReplayGuard::new(REPLAY_WINDOW, 3, usize::MAX);
    for id in ["a", "b", "c", "d"] {
      guard.remember(id);
    }
    assert!(!guard.seen("a"));
    assert!(guard.seen("b") && guard.seen("c") && guard.seen("d"));
    assert_eq!(guard.len(), 3);
  }

  #[tokio::test(start_paused = true)]
  async fn full_by_bytes_forgets_the_oldest() {
    let mut guard = ReplayGuard::new(REPLAY_WINDOW, usize::MAX, 512);
    let long = |c: char| c.to_string().repeat(256);
    guard.remember(&long('a'));
    guard.remember(&long('b'));
    assert_eq!(guard.bytes(), 512);
    guard.remember(&long('c'));
    assert!(!guard.seen(&long('a')));
    assert!(guard.seen(&long('b')) && guard.seen(&long('c')));
    assert_eq!(guard.bytes(), 512);
  }

  #[tokio::test(start_paused = true)]
  async fn worst_case_stays_within_the_bounds() {
    let mut guard = ReplayGuard::default();
    for n in 0..(MAX_IDS + 10) {
      guard.remember(&format!("{n:0>256}"));
    }
    assert!(guard.len() <= MAX_IDS);
    assert!(guard.bytes() <= MAX_ID_BYTES);
  }
}
