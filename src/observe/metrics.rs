//! `metrics()`: the registrar's Prometheus metrics, with vLLM's meanings under the
//! prefix `mcpctl_registrar_` (index.d.ts lists them).
//!
//! Crate: `prometheus` (tikv/rust-prometheus), for its `TextEncoder`, which writes the
//! classic text format 0.0.4: no `# EOF`, counters named as registered, so mcplocal
//! can join the text with prom-client's. `prometheus-client`'s encoder writes
//! OpenMetrics (`# EOF`, `_total` appended to counters), which cannot be joined.
//!
//! Cost: always on, so nothing here runs per chunk but an atomic histogram observe.
//! Each lane holds its [`ProviderMetrics`], whose label values were resolved once
//! (prometheus' `with_label_values` hashes and locks: never per task); counters and
//! histograms are atomics (prometheus' histograms observe lock-free). The gauges,
//! `reconnects_total`, `state` and `audit_lines_dropped_total` are set from their
//! sources when scraped ([`Scrape`]), under the one scrape lock.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
  Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
  Registry, TextEncoder,
};

use crate::dispatch::Outcome;
use crate::owner::Refusal;
use crate::registrar::RegistrarState;

/// Every metric's name starts with it.
pub const PREFIX: &str = "mcpctl_registrar_";

/// The label a task for a provider that is not served gets: never mcpd's string.
pub const UNKNOWN_PROVIDER: &str = "(unknown)";

/// vLLM's `time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: &[f64] = &[
  0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
  40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `inter_token_latency_seconds` buckets, with two below 10 ms: a relayed
/// stream's gaps are often that short.
const ITL_BUCKETS: &[f64] = &[
  0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
  10.0, 20.0, 40.0, 80.0,
];
/// vLLM's request latency buckets (queue time, end to end), with five below 0.3 s:
/// most tasks here wait for no slot at all.
const LATENCY_BUCKETS: &[f64] = &[
  0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
  40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

const OUTCOMES: [Outcome; 3] = [Outcome::Completed, Outcome::Failed, Outcome::Cancelled];

const STATES: [RegistrarState; 6] = [
  RegistrarState::Idle,
  RegistrarState::Registering,
  RegistrarState::Connected,
  RegistrarState::Reconnecting,
  RegistrarState::Unauthorized,
  RegistrarState::Stopped,
];

/// What a scrape reads from the registrar, beside what the tasks counted.
#[derive(Debug, Clone)]
pub struct Scrape {
  /// Every lane that exists now (published, joining, or left with tasks still
  /// holding it): its name, tasks running and tasks waiting for a slot.
  pub lanes: Vec<(String, u32, u32)>,
  pub state: RegistrarState,
  /// `status().reconnects`.
  pub reconnects: u64,
  /// The audit log's dropped lines so far.
  pub audit_lines_dropped: u64,
}

/// What the metrics count of a task that ended: copied out of its run, so that
/// counting needs no [`super::TaskRecord`] (built only for observers).
#[derive(Debug, Clone, Copy)]
pub struct Measures {
  pub outcome: Outcome,
  pub refused: Option<Refusal>,
  pub stream: bool,
  /// Time in the queue, for a task that got a slot.
  pub queue: Option<Duration>,
  /// From the arrival to the first content read.
  pub time_to_first_token: Option<Duration>,
  /// From the arrival to the end.
  pub duration: Duration,
  /// Prompt and completion tokens as `usage()` booked them.
  pub tokens: Option<(u64, u64)>,
}

/// The metrics of one provider label, resolved once: what a task that ends
/// touches, with no label look-up.
pub struct ProviderMetrics {
  requests: [IntCounter; 3],
  refused: [IntCounter; 8],
  queue_time: Histogram,
  time_to_first_token: Histogram,
  /// Observed per gap while a stream runs (`TaskClock`), not from the record.
  pub inter_token_latency: Histogram,
  e2e: Histogram,
  prompt_tokens: IntCounter,
  generation_tokens: IntCounter,
}

impl ProviderMetrics {
  /// Counts a task that ended.
  ///
  /// - `requests_total{outcome}`: every task, by the outcome `status()` counts.
  /// - `requests_refused_total{reason}`: the owner's refusals.
  /// - queue time and end-to-end latency: once per task that got a slot.
  /// - time to first token: once per streamed task that produced content.
  /// - tokens: those `usage()` books (tasks that reached the provider).
  pub fn task_ended(&self, record: &Measures) {
    self.requests[outcome_index(record.outcome)].inc();
    if let Some(refusal) = record.refused {
      self.refused[refusal_index(refusal)].inc();
    }
    if let Some(queue) = record.queue {
      self.queue_time.observe(queue.as_secs_f64());
      self.e2e.observe(record.duration.as_secs_f64());
    }
    if let (true, Some(first)) = (record.stream, record.time_to_first_token) {
      self.time_to_first_token.observe(first.as_secs_f64());
    }
    if let Some((prompt, completion)) = record.tokens {
      self.prompt_tokens.inc_by(prompt);
      self.generation_tokens.inc_by(completion);
    }
  }

  /// One gap between two reads of a stream's content.
  pub fn inter_token_gap(&self, gap: Duration) {
    self.inter_token_latency.observe(gap.as_secs_f64());
  }
}

fn outcome_index(outcome: Outcome) -> usize {
  match outcome {
    Outcome::Completed => 0,
    Outcome::Failed => 1,
    Outcome::Cancelled => 2,
  }
}

fn refusal_index(refusal: Refusal) -> usize {
  Refusal::ALL
    .iter()
    .position(|reason| *reason == refusal)
    .unwrap_or(0)
}

/// The families, registered once.
struct Families {
  running: IntGaugeVec,
  waiting: IntGaugeVec,
  requests: IntCounterVec,
  refused: IntCounterVec,
  queue_time: HistogramVec,
  time_to_first_token: HistogramVec,
  inter_token_latency: HistogramVec,
  e2e: HistogramVec,
  prompt_tokens: IntCounterVec,
  generation_tokens: IntCounterVec,
  reconnects: IntCounter,
  state: IntGaugeVec,
  audit_lines_dropped: IntCounter,
}

/// One registrar's metrics.
pub struct RegistrarMetrics {
  registry: Registry,
  families: Families,
  /// The "(unknown)" label's handles, made at the first such task (so that a
  /// registrar that never met one shows no such series).
  unknown: std::sync::OnceLock<Arc<ProviderMetrics>>,
  /// One scrape at a time: the gauges and the counters read from their sources
  /// are set, then encoded, as one.
  scrape: Mutex<()>,
}

impl Default for RegistrarMetrics {
  fn default() -> Self {
    Self::new()
  }
}

fn name(short: &str) -> String {
  format!("{PREFIX}{short}")
}

impl RegistrarMetrics {
  pub fn new() -> Self {
    // The names and labels are constants: registering them cannot fail but by a bug.
    let registry = Registry::new();
    let counter_vec = |short: &str, help: &str, labels: &[&str]| {
      let family = IntCounterVec::new(Opts::new(name(short), help), labels).expect("valid metric");
      registry
        .register(Box::new(family.clone()))
        .expect("registered once");
      family
    };
    let gauge_vec = |short: &str, help: &str, labels: &[&str]| {
      let family = IntGaugeVec::new(Opts::new(name(short), help), labels).expect("valid metric");
      registry
        .register(Box::new(family.clone()))
        .expect("registered once");
      family
    };
    let histogram_vec = |short: &str, help: &str, buckets: &[f64]| {
      let opts = HistogramOpts::new(name(short), help).buckets(buckets.to_vec());
      let family = HistogramVec::new(opts, &["provider"]).expect("valid metric");
      registry
        .register(Box::new(family.clone()))
        .expect("registered once");
      family
    };
    let counter = |short: &str, help: &str| {
      let counter = IntCounter::new(name(short), help).expect("valid metric");
      registry
        .register(Box::new(counter.clone()))
        .expect("registered once");
      counter
    };
    let families = Families {
      running: gauge_vec("requests_running", "Tasks running now (holding a concurrency slot).", &["provider"]),
      waiting: gauge_vec("requests_waiting", "Tasks waiting in the provider's queue for a slot.", &["provider"]),
      requests: counter_vec(
        "requests_total",
        "Tasks that reached the registrar and ended, by outcome (as status() counts them).",
        &["provider", "outcome"],
      ),
      refused: counter_vec(
        "requests_refused_total",
        "Tasks refused by the owner's controls, by reason (as usage() counts them).",
        &["provider", "reason"],
      ),
      queue_time: histogram_vec(
        "request_queue_time_seconds",
        "From a task's arrival to its slot, per task that got one.",
        LATENCY_BUCKETS,
      ),
      time_to_first_token: histogram_vec(
        "time_to_first_token_seconds",
        "From a streamed task's arrival to its first content, per streamed task that produced content.",
        TTFT_BUCKETS,
      ),
      inter_token_latency: histogram_vec(
        "inter_token_latency_seconds",
        "Gaps between a stream's content reads (chunks pushed together count once).",
        ITL_BUCKETS,
      ),
      e2e: histogram_vec(
        "e2e_request_latency_seconds",
        "From a task's arrival to its end, per task that got a slot.",
        LATENCY_BUCKETS,
      ),
      prompt_tokens: counter_vec(
        "prompt_tokens_total",
        "Prompt tokens, as usage() books them (reported, else estimated).",
        &["provider"],
      ),
      generation_tokens: counter_vec(
        "generation_tokens_total",
        "Completion tokens, as usage() books them (reported, else estimated).",
        &["provider"],
      ),
      reconnects: counter(
        "reconnects_total",
        "Times the control channel to mcpd was lost and reopened.",
      ),
      state: gauge_vec(
        "state",
        "The registrar's state: 1 for the current one, 0 for the others.",
        &["state"],
      ),
      audit_lines_dropped: counter(
        "audit_lines_dropped_total",
        "Audit log lines dropped because its queue was full or the write failed.",
      ),
    };
    Self {
      registry,
      families,
      unknown: std::sync::OnceLock::new(),
      scrape: Mutex::new(()),
    }
  }

  /// The handles of one provider label (a served name); its series appear at 0.
  pub fn provider(&self, provider: &str) -> Arc<ProviderMetrics> {
    let f = &self.families;
    let one = |family: &IntCounterVec| family.with_label_values(&[provider]);
    let histogram = |family: &HistogramVec| family.with_label_values(&[provider]);
    Arc::new(ProviderMetrics {
      requests: OUTCOMES.map(|outcome| f.requests.with_label_values(&[provider, outcome.as_str()])),
      refused: Refusal::ALL.map(|reason| f.refused.with_label_values(&[provider, reason.as_str()])),
      queue_time: histogram(&f.queue_time),
      time_to_first_token: histogram(&f.time_to_first_token),
      inter_token_latency: histogram(&f.inter_token_latency),
      e2e: histogram(&f.e2e),
      prompt_tokens: one(&f.prompt_tokens),
      generation_tokens: one(&f.generation_tokens),
    })
  }

  /// The handles of tasks for no served provider (and of malformed frames).
  pub fn unknown(&self) -> &Arc<ProviderMetrics> {
    self.unknown.get_or_init(|| self.provider(UNKNOWN_PROVIDER))
  }

  /// The text exposition (format 0.0.4) with `scrape`'s figures.
  pub fn render(&self, scrape: &Scrape) -> String {
    let _one_at_a_time = self.scrape.lock();
    let f = &self.families;
    // Only the lanes that exist now: a name gone for good leaves no gauge behind.
    f.running.reset();
    f.waiting.reset();
    for (name, running, waiting) in &scrape.lanes {
      f.running
        .with_label_values(&[name])
        .set(i64::from(*running));
      f.waiting
        .with_label_values(&[name])
        .set(i64::from(*waiting));
    }
    for state in STATES {
      f.state
        .with_label_values(&[state.as_str()])
        .set(i64::from(state == scrape.state));
    }
    // Counters kept elsewhere: brought up to their source (they never go down).
    let catch_up = |counter: &IntCounter, total: u64| {
      counter.inc_by(total.saturating_sub(counter.get()));
    };
    catch_up(&f.reconnects, scrape.reconnects);
    catch_up(&f.audit_lines_dropped, scrape.audit_lines_dropped);
    let mut text = Vec::new();
    // Encoding into a Vec fails only for a family the registry itself refused.
    if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
      tracing::warn!(error = %error, "metrics: cannot encode");
    }
    String::from_utf8(text).unwrap_or_default()
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn record(outcome: Outcome) -> Measures {
    Measures {
      outcome,
      refused: None,
      stream: true,
      queue: Some(Duration::from_millis(20)),
      time_to_first_token: Some(Duration::from_millis(70)),
      duration: Duration::from_millis(900),
      tokens: Some((3, 5)),
    }
  }

  fn scrape() -> Scrape {
    Scrape {
      lanes: vec![("p".into(), 1, 2)],
      state: RegistrarState::Connected,
      reconnects: 3,
      audit_lines_dropped: 0,
    }
  }

  /// The lines of `text` that start with `prefix`.
  fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text
      .lines()
      .filter(|line| line.starts_with(prefix))
      .collect()
  }

  /// Every sample of an exposition, by series; fails on a line that is not a
  /// HELP, a TYPE or `series value`, and on a series given twice.
  fn parse(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines() {
      if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
        continue;
      }
      let (series, value) = line.rsplit_once(' ').expect("a sample line");
      let value: f64 = value.parse().expect("a number");
      assert!(samples.insert(series.to_owned(), value).is_none(), "{line}");
    }
    samples
  }

  /// A scripted set of tasks, their durations taken on tokio's paused clock, read
  /// back from the text: exactly these series, with exactly these values.
  #[tokio::test(start_paused = true)]
  async fn the_exposition_parses_back_to_exactly_the_scripted_series() {
    use tokio::time::{advance, Instant};
    let metrics = RegistrarMetrics::new();
    let p = metrics.provider("p");
    // A stream: 20 ms queued, first token at 70 ms, one 30 ms gap, ended at 900 ms.
    let arrival = Instant::now();
    advance(Duration::from_millis(20)).await;
    let queue = arrival.elapsed();
    advance(Duration::from_millis(50)).await;
    let first = arrival.elapsed();
    p.inter_token_gap(Duration::from_millis(30));
    advance(Duration::from_millis(830)).await;
    p.task_ended(&Measures {
      outcome: Outcome::Completed,
      refused: None,
      stream: true,
      queue: Some(queue),
      time_to_first_token: Some(first),
      duration: arrival.elapsed(),
      tokens: Some((3, 5)),
    });
    // Not streamed: no slot wait, 250 ms; its whole answer is no "first token".
    let arrival = Instant::now();
    advance(Duration::from_millis(250)).await;
    p.task_ended(&Measures {
      outcome: Outcome::Completed,
      refused: None,
      stream: false,
      queue: Some(Duration::ZERO),
      time_to_first_token: Some(arrival.elapsed()),
      duration: arrival.elapsed(),
      tokens: Some((10, 1)),
    });
    // Refused at admission; cancelled in the queue.
    let nothing = Measures {
      outcome: Outcome::Failed,
      refused: Some(Refusal::RequestsPerMinute),
      stream: false,
      queue: None,
      time_to_first_token: None,
      duration: Duration::ZERO,
      tokens: None,
    };
    p.task_ended(&nothing);
    p.task_ended(&Measures {
      outcome: Outcome::Cancelled,
      refused: None,
      stream: true,
      ..nothing
    });
    let samples = parse(&metrics.render(&scrape()));
    let (buckets, rest): (Vec<_>, Vec<_>) = samples
      .iter()
      .partition(|(series, _)| series.contains("_bucket{"));
    let p = |name: &str| format!("mcpctl_registrar_{name}{{provider=\"p\"}}");
    let mut expected: Vec<(String, f64)> = vec![
      (p("requests_running"), 1.0),
      (p("requests_waiting"), 2.0),
      (p("request_queue_time_seconds_sum"), 0.02),
      (p("request_queue_time_seconds_count"), 2.0),
      (p("time_to_first_token_seconds_sum"), 0.07),
      (p("time_to_first_token_seconds_count"), 1.0),
      (p("inter_token_latency_seconds_sum"), 0.03),
      (p("inter_token_latency_seconds_count"), 1.0),
      (p("e2e_request_latency_seconds_sum"), 1.15),
      (p("e2e_request_latency_seconds_count"), 2.0),
      (p("prompt_tokens_total"), 13.0),
      (p("generation_tokens_total"), 6.0),
      ("mcpctl_registrar_reconnects_total".into(), 3.0),
      ("mcpctl_registrar_audit_lines_dropped_total".into(), 0.0),
    ];
    for (outcome, n) in [("completed", 2.0), ("failed", 1.0), ("cancelled", 1.0)] {
      let series =
        format!(r#"mcpctl_registrar_requests_total{{outcome="{outcome}",provider="p"}}"#);
      expected.push((series, n));
    }
    for reason in Refusal::ALL {
      let n = if reason == Refusal::RequestsPerMinute {
        1.0
      } else {
        0.0
      };
      let series = format!(
        r#"mcpctl_registrar_requests_refused_total{{provider="p",reason="{}"}}"#,
        reason.as_str()
      );
      expected.push((series, n));
    }
    for state in STATES {
      let on = if state == RegistrarState::Connected {
        1.0
      } else {
        0.0
      };
      let series = format!(r#"mcpctl_registrar_state{{state="{}"}}"#, state.as_str());
      expected.push((series, on));
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let got: Vec<(&String, &f64)> = rest;
    assert_eq!(
      got
        .iter()
        .map(|(series, _)| series.as_str())
        .collect::<Vec<_>>(),
      expected
        .iter()
        .map(|(series, _)| series.as_str())
        .collect::<Vec<_>>()
    );
    for ((series, value), (_, want)) in got.iter().zip(&expected) {
      assert!((**value - want).abs() < 1e-9, "{series} {value} != {want}");
    }
    // Buckets: cumulative, one per bound plus +Inf, for each of the four histograms.
    let ttft: Vec<(&str, f64)> = buckets
      .iter()
      .filter(|(series, _)| {
        series.starts_with("mcpctl_registrar_time_to_first_token_seconds_bucket")
      })
      .map(|(series, value)| (series.rsplit_once("le=").unwrap().1, **value))
      .collect();
    assert_eq!(ttft.len(), TTFT_BUCKETS.len() + 1);
    for (le, value) in ttft {
      let bound: f64 = le
        .trim_end_matches("\"}")
        .trim_start_matches('"')
        .parse()
        .unwrap_or(f64::INFINITY);
      assert_eq!(value, if bound >= 0.07 { 1.0 } else { 0.0 }, "le={le}");
    }
    let histograms = TTFT_BUCKETS.len() + ITL_BUCKETS.len() + 2 * LATENCY_BUCKETS.len() + 4;
    assert_eq!(buckets.len(), histograms);
  }

  #[test]
  fn a_task_is_counted_once_by_outcome_and_its_times_and_tokens_observed() {
    let metrics = RegistrarMetrics::new();
    let p = metrics.provider("p");
    p.task_ended(&record(Outcome::Completed));
    let refused = Measures {
      refused: Some(Refusal::QueueFull),
      queue: None,
      stream: false,
      time_to_first_token: None,
      tokens: None,
      ..record(Outcome::Failed)
    };
    p.task_ended(&refused);
    p.inter_token_gap(Duration::from_millis(30));
    let text = metrics.render(&scrape());
    assert!(!text.contains("# EOF"), "0.0.4, not OpenMetrics");
    let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    has("# TYPE mcpctl_registrar_requests_total counter");
    has(r#"mcpctl_registrar_requests_total{outcome="completed",provider="p"} 1"#);
    has(r#"mcpctl_registrar_requests_total{outcome="failed",provider="p"} 1"#);
    has(r#"mcpctl_registrar_requests_total{outcome="cancelled",provider="p"} 0"#);
    has(r#"mcpctl_registrar_requests_refused_total{provider="p",reason="queue_full"} 1"#);
    has(r#"mcpctl_registrar_requests_refused_total{provider="p",reason="caller_not_allowed"} 0"#);
    has(r#"mcpctl_registrar_prompt_tokens_total{provider="p"} 3"#);
    has(r#"mcpctl_registrar_generation_tokens_total{provider="p"} 5"#);
    has(r#"mcpctl_registrar_time_to_first_token_seconds_count{provider="p"} 1"#);
    has(r#"mcpctl_registrar_time_to_first_token_seconds_bucket{provider="p",le="0.06"} 0"#);
    has(r#"mcpctl_registrar_time_to_first_token_seconds_bucket{provider="p",le="0.08"} 1"#);
    has(r#"mcpctl_registrar_request_queue_time_seconds_count{provider="p"} 1"#);
    has(r#"mcpctl_registrar_e2e_request_latency_seconds_count{provider="p"} 1"#);
    has(r#"mcpctl_registrar_e2e_request_latency_seconds_sum{provider="p"} 0.9"#);
    has(r#"mcpctl_registrar_inter_token_latency_seconds_count{provider="p"} 1"#);
    has(r#"mcpctl_registrar_requests_running{provider="p"} 1"#);
    has(r#"mcpctl_registrar_requests_waiting{provider="p"} 2"#);
    has("mcpctl_registrar_reconnects_total 3");
    has(r#"mcpctl_registrar_state{state="connected"} 1"#);
    has(r#"mcpctl_registrar_state{state="idle"} 0"#);
    has("mcpctl_registrar_audit_lines_dropped_total 0");
    assert!(lines(&text, "mcpctl_registrar_reconnects_total{").is_empty());
    assert!(lines(&text, "mcpctl_registrar_state{provider").is_empty());
  }

  #[test]
  fn scraped_figures_follow_their_sources_and_gone_lanes_leave_no_gauge() {
    let metrics = RegistrarMetrics::new();
    let _p = metrics.provider("p");
    metrics.render(&scrape());
    let later = Scrape {
      lanes: vec![("q".into(), 0, 0)],
      state: RegistrarState::Reconnecting,
      reconnects: 5,
      audit_lines_dropped: 7,
    };
    let text = metrics.render(&later);
    assert_eq!(
      lines(&text, "mcpctl_registrar_requests_running{"),
      [r#"mcpctl_registrar_requests_running{provider="q"} 0"#]
    );
    assert!(text.contains("mcpctl_registrar_reconnects_total 5\n"));
    assert!(text.contains("mcpctl_registrar_audit_lines_dropped_total 7\n"));
    assert!(text.contains("mcpctl_registrar_state{state=\"reconnecting\"} 1\n"));
    assert!(text.contains("mcpctl_registrar_state{state=\"connected\"} 0\n"));
    // A registrar that met no unknown provider shows no such series.
    assert!(!text.contains(UNKNOWN_PROVIDER));
    metrics.unknown().task_ended(&record(Outcome::Failed));
    let text = metrics.render(&later);
    assert!(
      text.contains(r#"mcpctl_registrar_requests_total{outcome="failed",provider="(unknown)"} 1"#)
    );
  }

  /// index.d.ts's doc comment of `metrics()` (written on the binding fn) names
  /// every family registered.
  #[test]
  fn the_binding_doc_names_every_family() {
    let binding = include_str!("../binding/registrar.rs");
    let doc_start = binding.find("pub fn metrics(").expect("the binding fn");
    let doc = &binding[..doc_start];
    let metrics = RegistrarMetrics::new();
    metrics.unknown();
    for family in metrics.registry.gather() {
      let named = format!("`{}", family.name());
      assert!(doc.contains(&named), "{} is not in the doc", family.name());
    }
  }

  #[test]
  fn a_label_value_is_escaped() {
    let metrics = RegistrarMetrics::new();
    metrics.provider("a\"b\\c\nd");
    let text = metrics.render(&scrape());
    assert!(text.contains(r#"mcpctl_registrar_prompt_tokens_total{provider="a\"b\\c\nd"} 0"#));
  }
}
