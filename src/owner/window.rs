//! A rolling window of counts kept in buckets (docs/protocol.md, "Callers and the
//! owner's limits"): 1 s buckets for the minute windows, 1 min buckets for the day.
//! Only buckets with something in them are kept, so an idle or once-seen caller
//! costs a few bytes, and a window never holds more than its span of buckets.

use std::collections::VecDeque;
use std::time::Duration;

/// The length of a window and of its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
  /// One bucket, in whole seconds.
  pub bucket_secs: u64,
  /// How many buckets the window covers.
  pub buckets: u64,
}

/// A minute in 1 s buckets.
pub const MINUTE: Span = Span {
  bucket_secs: 1,
  buckets: 60,
};

/// A rolling 24 h in 1 min buckets.
pub const DAY: Span = Span {
  bucket_secs: 60,
  buckets: 1440,
};

impl Span {
  /// The bucket `elapsed` (since the meter's epoch) falls in.
  pub fn bucket(self, elapsed: Duration) -> u64 {
    elapsed.as_secs() / self.bucket_secs
  }
}

/// Counts in the last `span`, bucketed.
#[derive(Debug, Default, Clone)]
pub struct Window {
  /// (bucket, amount), oldest first, no empty bucket.
  buckets: VecDeque<(u64, u64)>,
  total: u64,
}

impl Window {
  /// Forgets the buckets that left the window at `elapsed`.
  fn expire(&mut self, span: Span, elapsed: Duration) {
    let now = span.bucket(elapsed);
    while let Some(&(bucket, amount)) = self.buckets.front() {
      if bucket + span.buckets > now {
        break;
      }
      self.total -= amount;
      self.buckets.pop_front();
    }
  }

  /// What the window holds at `elapsed`.
  pub fn used(&mut self, span: Span, elapsed: Duration) -> u64 {
    self.expire(span, elapsed);
    self.total
  }

  /// Adds `amount` to the bucket of `elapsed`; answers that bucket (for a refund).
  pub fn add(&mut self, span: Span, elapsed: Duration, amount: u64) -> u64 {
    self.expire(span, elapsed);
    let bucket = span.bucket(elapsed);
    match self.buckets.back_mut() {
      Some((last, held)) if *last == bucket => *held = held.saturating_add(amount),
      _ => self.buckets.push_back((bucket, amount)),
    }
    self.total = self.total.saturating_add(amount);
    bucket
  }

  /// Takes back `amount` from `bucket`, when that bucket is still in the window.
  pub fn refund(&mut self, bucket: u64, amount: u64) {
    if let Some(index) = self.buckets.iter().position(|(held, _)| *held == bucket) {
      let taken = amount.min(self.buckets[index].1);
      self.buckets[index].1 -= taken;
      self.total -= taken;
      if self.buckets[index].1 == 0 {
        self.buckets.remove(index);
      }
    }
  }

  /// How long until the window admits again under `limit` (used < limit), in
  /// whole seconds rounded up; `None` when it admits now.
  pub fn wait(&mut self, span: Span, elapsed: Duration, limit: u64) -> Option<u64> {
    self.expire(span, elapsed);
    if self.total < limit {
      return None;
    }
    let mut left = self.total;
    for &(bucket, amount) in &self.buckets {
      left -= amount;
      if left < limit {
        let frees_at = Duration::from_secs((bucket + span.buckets) * span.bucket_secs);
        let wait = frees_at.saturating_sub(elapsed);
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Some(secs.max(1));
      }
    }
    // A limit of 0 is refused as an option; whole-window wait as a bound.
    Some(span.buckets * span.bucket_secs)
  }

  /// How many buckets are kept (for the memory bound's tests).
  pub fn buckets(&self) -> usize {
    self.buckets.len()
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn at(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
  }

  #[test]
  fn a_full_minute_frees_when_its_oldest_bucket_leaves() {
    let mut window = Window::default();
    window.add(MINUTE, at(10.2), 1);
    window.add(MINUTE, at(30.5), 1);
    assert_eq!(window.wait(MINUTE, at(40.0), 3), None);
    window.add(MINUTE, at(40.0), 1);
    // Full at 3: the bucket of second 10 leaves at 70 s.
    assert_eq!(window.wait(MINUTE, at(40.0), 3), Some(30));
    assert_eq!(window.wait(MINUTE, at(69.1), 3), Some(1));
    assert_eq!(window.wait(MINUTE, at(70.0), 3), None);
    assert_eq!(window.used(MINUTE, at(70.0)), 2);
    // Two over the limit: the second bucket must leave too.
    assert_eq!(window.wait(MINUTE, at(70.0), 1), Some(30));
  }

  #[test]
  fn the_day_is_kept_in_minutes_and_refunds_find_their_bucket() {
    let mut window = Window::default();
    let bucket = window.add(DAY, at(59.0), 500);
    window.add(DAY, at(3600.0), 700);
    assert_eq!(window.used(DAY, at(7200.0)), 1200);
    assert_eq!(window.wait(DAY, at(7200.0), 1000), Some(86_400 - 7200));
    window.refund(bucket, 500);
    assert_eq!(window.used(DAY, at(7200.0)), 700);
    assert_eq!(window.buckets(), 1);
    assert_eq!(window.used(DAY, at(3600.0 + 86_400.0)), 0);
  }
}
