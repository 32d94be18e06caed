//! The owner's controls over a published provider (docs/protocol.md, "Callers and
//! the owner's limits"): who may call it (`allowCallers`), how much (`limits`), the
//! pause switch, and what it was used for (`usage()`).
//!
//! Shape: plain structs under short locks. `OwnerPolicy` travels with a provider's
//! entry (an `update()` swaps it); a lane's `Meter` holds its windows and outlives an
//! `update()` that keeps the name, so what was counted carries over; the registrar's
//! `UsageBook` (usage.rs) holds the totals. Callers are kept in LRU maps of at most
//! [`MAX_CALLERS`], so a hostile mcpd sending endless caller ids costs a bounded
//! amount of memory.

pub mod usage;
pub mod window;

use std::num::NonZeroUsize;
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use self::window::{Window, DAY, MINUTE};
use crate::openai::Caller;

/// The most callers tracked per provider (limits) and per registrar (usage); the
/// least recently seen are forgotten (or, in usage, folded into "(other)") first.
pub const MAX_CALLERS: usize = 10_000;

/// The rate and token limits of one scope (the provider as a whole, or each caller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
  pub requests_per_minute: Option<u64>,
  pub tokens_per_minute: Option<u64>,
  pub tokens_per_day: Option<u64>,
}

impl RateLimits {
  pub fn is_empty(&self) -> bool {
    *self == Self::default()
  }
}

/// An entry's `limits` (index.d.ts `PublishLimits`); every field optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishLimits {
  pub max_output_tokens: Option<u64>,
  pub max_request_bytes: Option<u64>,
  /// All callers together.
  pub all: RateLimits,
  /// Each caller on its own (tasks that carry a caller only).
  pub per_caller: RateLimits,
}

/// What the owner set on an entry: `allowCallers`, `limits` and `errorDetail`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerPolicy {
  /// `None`: everyone (with or without a caller). Empty: nobody.
  pub allow_callers: Option<Vec<String>>,
  pub limits: PublishLimits,
  /// What a remote caller sees of the provider's failures.
  pub error_detail: ErrorDetail,
}

/// An entry's `errorDetail`: what a remote caller sees when the provider fails
/// (docs/protocol.md, "What a remote caller sees of a provider's failure").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ErrorDetail {
  /// The provider's own message, token scrubbed (`'message'`, the default).
  #[default]
  Message,
  /// "the provider failed" and an error id that the local warn line carries too
  /// (`'generic'`).
  Generic,
}

impl ErrorDetail {
  /// The option's JavaScript values, in the order of its type.
  pub const NAMES: [&'static str; 2] = ["message", "generic"];

  /// The value of `errorDetail` named `name`.
  pub fn from_name(name: &str) -> Option<Self> {
    match name {
      "message" => Some(Self::Message),
      "generic" => Some(Self::Generic),
      _ => None,
    }
  }

  /// This value's JavaScript name.
  pub fn name(self) -> &'static str {
    match self {
      Self::Message => "message",
      Self::Generic => "generic",
    }
  }
}

impl OwnerPolicy {
  /// Whether `caller` may use the provider: its id, name or one of its groups
  /// is listed, exactly (case-sensitive).
  pub fn allows(&self, caller: Option<&Caller>) -> bool {
    let Some(allowed) = &self.allow_callers else {
      return true;
    };
    let Some(caller) = caller else {
      return false;
    };
    let listed = |value: &str| allowed.iter().any(|entry| entry == value);
    listed(&caller.id)
      || caller.name.as_deref().is_some_and(listed)
      || caller.groups.iter().flatten().any(|group| listed(group))
  }
}

/// Why the owner's controls refused a task (`usage().refused`'s keys; the
/// error `code` posted to mcpd, but for `queue_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
  CallerNotAllowed,
  RequestsPerMinute,
  TokensPerMinute,
  TokensPerDay,
  MaxTokensExceeded,
  RequestTooLarge,
  ProviderPaused,
  QueueFull,
}

impl Refusal {
  /// Every reason, in `usage().refused`'s order.
  pub const ALL: [Refusal; 8] = [
    Refusal::CallerNotAllowed,
    Refusal::RequestsPerMinute,
    Refusal::TokensPerMinute,
    Refusal::TokensPerDay,
    Refusal::MaxTokensExceeded,
    Refusal::RequestTooLarge,
    Refusal::ProviderPaused,
    Refusal::QueueFull,
  ];

  pub fn as_str(self) -> &'static str {
    match self {
      Refusal::CallerNotAllowed => "caller_not_allowed",
      Refusal::RequestsPerMinute => "requests_per_minute",
      Refusal::TokensPerMinute => "tokens_per_minute",
      Refusal::TokensPerDay => "tokens_per_day",
      Refusal::MaxTokensExceeded => "max_tokens_exceeded",
      Refusal::RequestTooLarge => "request_too_large",
      Refusal::ProviderPaused => "provider_paused",
      Refusal::QueueFull => "queue_full",
    }
  }

  fn index(self) -> usize {
    Refusal::ALL
      .iter()
      .position(|reason| *reason == self)
      .unwrap_or(0)
  }
}

/// A rate or token limit that refuses a task, and how long until it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
  pub refusal: Refusal,
  pub limit: u64,
  /// Whole seconds, rounded up, at least 1.
  pub retry_after: u64,
}

/// One scope's windows: requests in the minute, tokens in the minute and the day.
#[derive(Debug, Default, Clone)]
struct Windows {
  requests: Window,
  tokens_minute: Window,
  tokens_day: Window,
}

impl Windows {
  /// The limits of `limits` that refuse now, as (refusal, limit, wait).
  fn over(&mut self, limits: &RateLimits, elapsed: Duration, worst: &mut Option<OverLimit>) {
    let checks = [
      (
        Refusal::RequestsPerMinute,
        limits.requests_per_minute,
        &mut self.requests,
        MINUTE,
      ),
      (
        Refusal::TokensPerMinute,
        limits.tokens_per_minute,
        &mut self.tokens_minute,
        MINUTE,
      ),
      (
        Refusal::TokensPerDay,
        limits.tokens_per_day,
        &mut self.tokens_day,
        DAY,
      ),
    ];
    for (refusal, limit, window, span) in checks {
      let Some(limit) = limit else { continue };
      if let Some(retry_after) = window.wait(span, elapsed, limit) {
        if worst.is_none_or(|worst| retry_after > worst.retry_after) {
          *worst = Some(OverLimit {
            refusal,
            limit,
            retry_after,
          });
        }
      }
    }
  }

  fn charge_tokens(&mut self, elapsed: Duration, tokens: u64) {
    if tokens > 0 {
      self.tokens_minute.add(MINUTE, elapsed, tokens);
      self.tokens_day.add(DAY, elapsed, tokens);
    }
  }
}

/// A request charged at admission, to be taken back if the task is cancelled
/// while it waits in the queue.
#[derive(Debug, Clone)]
pub struct Charge {
  bucket: u64,
  caller: Option<String>,
}

/// One provider's windows: the provider as a whole, and each caller (at most
/// [`MAX_CALLERS`], least recently seen forgotten first). Kept by its lane, so an
/// `update()` that keeps the name keeps what was counted.
pub struct Meter {
  epoch: Instant,
  all: Windows,
  callers: LruCache<String, Windows>,
}

impl Default for Meter {
  fn default() -> Self {
    Self::new()
  }
}

impl Meter {
  pub fn new() -> Self {
    Self {
      epoch: Instant::now(),
      all: Windows::default(),
      callers: LruCache::new(NonZeroUsize::new(MAX_CALLERS).expect("not zero")),
    }
  }

  fn elapsed(&self) -> Duration {
    self.epoch.elapsed()
  }

  /// The limit that refuses a task now (the one that waits longest), if any.
  /// A caller's windows are looked at only when per-caller limits are set.
  pub fn check(&mut self, limits: &PublishLimits, caller: Option<&Caller>) -> Option<OverLimit> {
    let elapsed = self.elapsed();
    let mut worst = None;
    self.all.over(&limits.all, elapsed, &mut worst);
    if let (Some(caller), false) = (caller, limits.per_caller.is_empty()) {
      if let Some(windows) = self.callers.get_mut(&caller.id) {
        windows.over(&limits.per_caller, elapsed, &mut worst);
      }
    }
    worst
  }

  /// Charges one request, at admission.
  pub fn charge_request(&mut self, limits: &PublishLimits, caller: Option<&Caller>) -> Charge {
    let elapsed = self.elapsed();
    let bucket = self.all.requests.add(MINUTE, elapsed, 1);
    let caller = caller
      .filter(|_| !limits.per_caller.is_empty())
      .map(|caller| {
        self
          .callers
          .get_or_insert_mut(caller.id.clone(), Windows::default)
          .requests
          .add(MINUTE, elapsed, 1);
        caller.id.clone()
      });
    Charge { bucket, caller }
  }

  /// Takes back a request charged at admission (a task cancelled while queued).
  pub fn refund(&mut self, charge: &Charge) {
    self.all.requests.refund(charge.bucket, 1);
    if let Some(windows) = charge
      .caller
      .as_ref()
      .and_then(|id| self.callers.peek_mut(id))
    {
      windows.requests.refund(charge.bucket, 1);
    }
  }

  /// Charges the tokens of a task that ended (to its caller too, when it was charged
  /// a request as one).
  pub fn charge_tokens(&mut self, charge: &Charge, tokens: u64) {
    let elapsed = self.elapsed();
    self.all.charge_tokens(elapsed, tokens);
    if let Some(windows) = charge
      .caller
      .as_ref()
      .and_then(|id| self.callers.get_mut(id))
    {
      windows.charge_tokens(elapsed, tokens);
    }
  }

  /// How many callers are tracked (for the memory bound's tests).
  pub fn callers(&self) -> usize {
    self.callers.len()
  }
}

/// The token estimate for a text with no usage reported: its characters
/// (Unicode scalar values) divided by 4, rounded up.
pub fn estimate_tokens(chars: u64) -> u64 {
  chars.div_ceil(4)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn caller(id: &str) -> Caller {
    Caller {
      id: id.to_owned(),
      name: Some(format!("{id}@example.com")),
      groups: Some(vec!["ml-team".to_owned()]),
    }
  }

  #[test]
  fn allow_callers_matches_id_name_or_group_exactly() {
    let policy = |list: &[&str]| OwnerPolicy {
      allow_callers: Some(list.iter().map(|s| (*s).to_owned()).collect()),
      ..OwnerPolicy::default()
    };
    let alice = caller("u-1");
    assert!(OwnerPolicy::default().allows(None));
    assert!(policy(&["u-1"]).allows(Some(&alice)));
    assert!(policy(&["u-1@example.com"]).allows(Some(&alice)));
    assert!(policy(&["ml-team"]).allows(Some(&alice)));
    assert!(!policy(&["ML-team"]).allows(Some(&alice)));
    assert!(!policy(&["u-1"]).allows(None));
    assert!(!policy(&[]).allows(Some(&alice)));
  }

  #[tokio::test(start_paused = true)]
  async fn request_n_plus_one_waits_for_the_window_and_the_longest_wait_answers() {
    let limits = PublishLimits {
      all: RateLimits {
        requests_per_minute: Some(2),
        ..RateLimits::default()
      },
      per_caller: RateLimits {
        requests_per_minute: Some(1),
        ..RateLimits::default()
      },
      ..PublishLimits::default()
    };
    let mut meter = Meter::new();
    let alice = caller("alice");
    assert_eq!(meter.check(&limits, Some(&alice)), None);
    meter.charge_request(&limits, Some(&alice));
    tokio::time::advance(Duration::from_millis(10_500)).await;
    // Alice's own minute is full; the provider's is not.
    let over = meter.check(&limits, Some(&alice)).unwrap();
    assert_eq!(
      (over.refusal, over.retry_after),
      (Refusal::RequestsPerMinute, 50)
    );
    assert_eq!(meter.check(&limits, Some(&caller("bob"))), None);
    meter.charge_request(&limits, Some(&caller("bob")));
    // Now the provider's is full too: it frees at 60 s, Alice's too.
    assert_eq!(meter.check(&limits, None).unwrap().retry_after, 50);
    tokio::time::advance(Duration::from_secs(50)).await;
    assert_eq!(meter.check(&limits, Some(&alice)), None);
  }

  #[tokio::test(start_paused = true)]
  async fn tokens_refuse_once_the_window_is_full_and_a_refund_frees_a_request() {
    let limits = PublishLimits {
      all: RateLimits {
        requests_per_minute: Some(1),
        tokens_per_minute: Some(100),
        tokens_per_day: Some(150),
      },
      ..PublishLimits::default()
    };
    let mut meter = Meter::new();
    let charge = meter.charge_request(&limits, None);
    meter.refund(&charge);
    assert_eq!(meter.check(&limits, None), None);
    let charge = meter.charge_request(&limits, None);
    meter.charge_tokens(&charge, 120);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(
      meter.check(&limits, None),
      None,
      "the minute moved; 120 < 150"
    );
    let charge = meter.charge_request(&limits, None);
    meter.charge_tokens(&charge, 40);
    tokio::time::advance(Duration::from_secs(61)).await;
    let over = meter.check(&limits, None).unwrap();
    assert_eq!(over.refusal, Refusal::TokensPerDay);
    // The first minute's bucket leaves the day 24 h after it.
    assert_eq!(over.retry_after, 86_400 - 122);
  }

  #[test]
  fn at_most_ten_thousand_callers_are_tracked() {
    let limits = PublishLimits {
      per_caller: RateLimits {
        requests_per_minute: Some(5),
        ..RateLimits::default()
      },
      ..PublishLimits::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
      .enable_time()
      .build()
      .unwrap();
    let _entered = runtime.enter();
    let mut meter = Meter::new();
    for n in 0..25_000 {
      meter.charge_request(&limits, Some(&caller(&format!("u-{n}"))));
    }
    assert_eq!(meter.callers(), MAX_CALLERS);
  }

  #[test]
  fn the_estimate_is_a_quarter_of_the_characters_rounded_up() {
    assert_eq!(estimate_tokens(0), 0);
    assert_eq!(estimate_tokens(1), 1);
    assert_eq!(estimate_tokens(8), 2);
    assert_eq!(estimate_tokens(9), 3);
  }
}
