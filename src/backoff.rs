//! Reconnect delays: exponential from `initial` to `max`, with jitter, a floor
//! that the server's `retry:` field can raise, and a reset after a good connection.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How far a delay may stray from its nominal value, either way.
const JITTER: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
  pub initial: Duration,
  pub max: Duration,
}

/// The first retry delay unless the `backoff.initialMs` option says otherwise.
pub const DEFAULT_INITIAL: Duration = Duration::from_secs(5);
/// The longest retry delay unless the `backoff.maxMs` option says otherwise.
pub const DEFAULT_MAX: Duration = Duration::from_secs(60);

impl Default for BackoffPolicy {
  fn default() -> Self {
    Self {
      initial: DEFAULT_INITIAL,
      max: DEFAULT_MAX,
    }
  }
}

#[derive(Debug)]
pub struct Backoff {
  policy: BackoffPolicy,
  failures: u32,
  floor: Duration,
}

impl Backoff {
  pub fn new(policy: BackoffPolicy) -> Self {
    Self {
      policy,
      failures: 0,
      floor: Duration::ZERO,
    }
  }

  /// The delay before the next attempt: `initial`, doubling on every call,
  /// capped at `max`, jittered by ±10% (never above `max`), never below the floor.
  pub fn next_delay(&mut self) -> Duration {
    let nominal = self
      .policy
      .initial
      .saturating_mul(2u32.saturating_pow(self.failures.min(30)))
      .min(self.policy.max);
    self.failures = self.failures.saturating_add(1);
    jitter(nominal).min(self.policy.max).max(self.floor)
  }

  /// The delay used while the token is refused: the maximum only.
  pub fn max_delay(&self) -> Duration {
    jitter(self.policy.max).min(self.policy.max).max(self.floor)
  }

  /// After a connection that stayed up or delivered an event.
  pub fn reset(&mut self) {
    self.failures = 0;
  }

  /// The server's `retry:` field raises the minimum delay, up to the maximum.
  pub fn raise_floor(&mut self, floor: Duration) {
    self.floor = floor.min(self.policy.max);
  }
}

/// `nominal` scaled by a random factor in [1 - JITTER, 1 + JITTER].
pub fn jitter(nominal: Duration) -> Duration {
  let factor = 1.0 + JITTER * (2.0 * random_unit() - 1.0);
  nominal.mul_f64(factor)
}

/// A uniform number in [0, 1), from the standard library's randomly keyed hasher.
fn random_unit() -> f64 {
  static COUNTER: AtomicU64 = AtomicU64::new(0);
  let mut hasher = RandomState::new().build_hasher();
  hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
  (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
  use super::*;

  fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value)
  }

  #[test]
  fn doubles_from_initial_to_max_with_bounded_jitter() {
    let mut backoff = Backoff::new(BackoffPolicy::default());
    let nominal = [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0];
    for expected in nominal {
      let delay = backoff.next_delay();
      assert!(
        delay >= secs(expected * 0.9),
        "{delay:?} < {expected} - 10%"
      );
      assert!(
        delay <= secs((expected * 1.1).min(60.0)),
        "{delay:?} > {expected} + 10%"
      );
    }
    backoff.reset();
    let delay = backoff.next_delay();
    assert!(delay >= secs(4.5) && delay <= secs(5.5), "{delay:?}");
  }

  #[test]
  fn jitter_actually_varies() {
    let delays: std::collections::HashSet<Duration> =
      (0..50).map(|_| jitter(Duration::from_secs(5))).collect();
    assert!(delays.len() > 40, "only {} distinct delays", delays.len());
  }

  #[test]
  fn retry_field_raises_the_floor() {
    let mut backoff = Backoff::new(BackoffPolicy {
      initial: Duration::from_millis(100),
      max: Duration::from_secs(5),
    });
    backoff.raise_floor(Duration::from_secs(3));
    assert_eq!(backoff.next_delay(), Duration::from_secs(3));
    // Never above the maximum, whatever the server asks.
    backoff.raise_floor(Duration::from_secs(86_400));
    assert!(backoff.next_delay() <= Duration::from_secs(5));
    assert!(backoff.max_delay() >= Duration::from_secs(5));
  }

  #[test]
  fn max_delay_stays_within_max() {
    let backoff = Backoff::new(BackoffPolicy::default());
    for _ in 0..100 {
      let delay = backoff.max_delay();
      assert!(delay >= secs(54.0) && delay <= secs(60.0), "{delay:?}");
    }
  }
}
