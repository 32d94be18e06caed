//! What the published providers were used for since the registrar was made
//! (index.d.ts `UsageReport`): tasks, tokens and refusals, per provider and per
//! caller id, at most [`MAX_CALLERS`] callers (the least recently seen folded
//! into "(other)").

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::SystemTime;

use lru::LruCache;

use super::{Refusal, MAX_CALLERS};

/// The key the callers forgotten are folded into.
pub const OTHER_CALLERS: &str = "(other)";

/// The counts of one provider or caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
  /// Tasks that reached the provider.
  pub tasks: u64,
  pub prompt_tokens: u64,
  pub completion_tokens: u64,
  /// By `Refusal::ALL`'s order.
  pub refused: [u64; 8],
}

impl Tally {
  fn add(&mut self, other: &Tally) {
    self.tasks += other.tasks;
    self.prompt_tokens += other.prompt_tokens;
    self.completion_tokens += other.completion_tokens;
    for (mine, theirs) in self.refused.iter_mut().zip(other.refused) {
      *mine += theirs;
    }
  }

  /// The refusals by name, in `Refusal::ALL`'s order.
  pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    Refusal::ALL
      .iter()
      .zip(self.refused)
      .map(|(reason, count)| (reason.as_str(), count))
  }
}

/// A snapshot of the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
  /// When the registrar was made.
  pub since: SystemTime,
  pub providers: HashMap<String, Tally>,
  pub callers: HashMap<String, Tally>,
}

/// The usage totals, under the dispatcher's lock.
pub struct UsageBook {
  since: SystemTime,
  providers: HashMap<String, Tally>,
  callers: LruCache<String, Tally>,
  other: Option<Tally>,
}

impl Default for UsageBook {
  fn default() -> Self {
    Self {
      since: SystemTime::now(),
      providers: HashMap::new(),
      callers: LruCache::new(NonZeroUsize::new(MAX_CALLERS).expect("not zero")),
      other: None,
    }
  }
}

impl UsageBook {
  /// Applies `change` to the provider's tally and the caller's.
  fn record(&mut self, provider: &str, caller: Option<&str>, change: impl Fn(&mut Tally)) {
    match self.providers.get_mut(provider) {
      Some(tally) => change(tally),
      None => change(self.providers.entry(provider.to_owned()).or_default()),
    }
    let Some(caller) = caller else { return };
    if let Some(tally) = self.callers.get_mut(caller) {
      return change(tally);
    }
    let mut tally = Tally::default();
    change(&mut tally);
    if let Some((evicted, forgotten)) = self.callers.push(caller.to_owned(), tally) {
      if evicted != caller {
        self
          .other
          .get_or_insert_with(Tally::default)
          .add(&forgotten);
      }
    }
  }

  /// A task refused for `reason` (never run, never charged).
  pub fn refused(&mut self, provider: &str, caller: Option<&str>, reason: Refusal) {
    let index = reason.index();
    self.record(provider, caller, |tally| tally.refused[index] += 1);
  }

  /// A task that reached the provider ended, with these tokens.
  pub fn ran(&mut self, provider: &str, caller: Option<&str>, prompt: u64, completion: u64) {
    self.record(provider, caller, |tally| {
      tally.tasks += 1;
      tally.prompt_tokens += prompt;
      tally.completion_tokens += completion;
    });
  }

  pub fn report(&self) -> UsageReport {
    let mut callers: HashMap<String, Tally> = self
      .callers
      .iter()
      .map(|(id, tally)| (id.clone(), *tally))
      .collect();
    if let Some(other) = &self.other {
      // A caller named "(other)" by mcpd shares the row: the totals stay exact.
      callers
        .entry(OTHER_CALLERS.to_owned())
        .or_default()
        .add(other);
    }
    UsageReport {
      since: self.since,
      providers: self.providers.clone(),
      callers,
    }
  }
}

/// `time` as ISO 8601 in UTC with milliseconds (`2026-12-07T05:19:08.123Z`), as
/// JavaScript's `Date.prototype.toISOString` writes it.
pub fn iso_time(time: SystemTime) -> String {
  let since_epoch = time
    .duration_since(SystemTime::UNIX_EPOCH)
    .unwrap_or_default();
  let secs = since_epoch.as_secs();
  let (days, of_day) = (secs / 86_400, secs % 86_400);
  // Howard Hinnant's civil_from_days, for days since 1970-01-01.
  let z = days as i64 + 719_468;
  let era = z.div_euclid(146_097);
  let doe = z.rem_euclid(146_097);
  let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
  let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  let mp = (5 * doy + 2) / 153;
  let day = doy - (153 * mp + 2) / 5 + 1;
  let month = if mp < 10 { mp + 3 } else { mp - 9 };
  let year = yoe + era * 400 + i64::from(month <= 2);
  format!(
    "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
    of_day / 3600,
    of_day % 3600 / 60,
    of_day % 60,
    since_epoch.subsec_millis()
  )
}

#[cfg(test)]
mod tests {
  use super::*;
  use std::time::Duration;

  #[test]
  fn iso_time_is_javascripts() {
    let at = |ms: u64| iso_time(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
    // new Date(1796620748123).toISOString()
    assert_eq!(at(1_796_620_748_123), "2026-12-07T05:19:08.123Z");
    assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
  }

  #[test]
  fn forgotten_callers_fold_into_other_and_totals_stay_exact() {
    let mut book = UsageBook::default();
    for n in 0..(MAX_CALLERS as u64 + 500) {
      book.ran("p", Some(&format!("u-{n}")), 3, 2);
    }
    book.refused("p", Some("u-late"), Refusal::QueueFull);
    let report = book.report();
    assert_eq!(report.callers.len(), MAX_CALLERS + 1);
    let tasks: u64 = report.callers.values().map(|tally| tally.tasks).sum();
    assert_eq!(tasks, MAX_CALLERS as u64 + 500);
    assert_eq!(report.providers["p"].tasks, MAX_CALLERS as u64 + 500);
    assert_eq!(report.providers["p"].refused[7], 1);
    assert!(report.callers[OTHER_CALLERS].tasks >= 500);
  }
}
