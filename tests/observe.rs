//! The per-task record and `metrics()` (issue 17) against the fake mcpd: one record
//! per task that reached the registrar (none for a refused task id or a replay),
//! content only when an observer asks, and the exposition's counts equal to
//! `status()` and `usage()`. Exact times are checked on the paused clock in the unit
//! tests (dispatch/observed.rs, observe/metrics.rs); here they only must be there.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use mcpctl_registrar::dispatch::{Outcome, PublishedProvider};
use mcpctl_registrar::observe::{TaskObserver, TaskRecord};
use mcpctl_registrar::owner::{OwnerPolicy, Refusal};
use mcpctl_registrar::registrar::Registrar;
use mcpctl_registrar::wire::ProviderDescriptor;

use support::provider::{Behavior, MockProvider};
use support::{registrar_config, wait_for, FakeMcpd, TempDir, WAIT};

/// Keeps every record it is told about.
#[derive(Default)]
struct Recorder {
  content: bool,
  records: Mutex<Vec<TaskRecord>>,
}

impl TaskObserver for Recorder {
  fn wants_content(&self) -> bool {
    self.content
  }
  fn task_ended(&self, record: &TaskRecord) {
    self.records.lock().push(record.clone());
  }
}

impl Recorder {
  async fn wait(&self, n: usize) -> BTreeMap<String, TaskRecord> {
    wait_for("records", WAIT, || self.records.lock().len() >= n).await;
    let records = self.records.lock();
    assert_eq!(records.len(), n, "one record per task: {records:#?}");
    records
      .iter()
      .map(|record| (record.task_id.clone(), record.clone()))
      .collect()
  }
}

fn published(name: &str, provider: &Arc<MockProvider>, policy: OwnerPolicy) -> PublishedProvider {
  PublishedProvider {
    descriptor: ProviderDescriptor {
      name: name.to_owned(),
      kind: "ollama".to_owned(),
      model: Some("qwen2.5:7b".to_owned()),
      description: None,
      context_window: None,
    },
    provider: Arc::clone(provider) as _,
    policy: Arc::new(policy),
  }
}

fn chat(stream: bool) -> Value {
  json!({
    "model": "team-llm",
    "messages": [{ "role": "user", "content": "the prompt" }],
    "stream": stream,
  })
}

struct Rig {
  fake: FakeMcpd,
  _dir: TempDir,
  registrar: Registrar,
}

impl Rig {
  async fn connected(
    name: &str,
    providers: Vec<PublishedProvider>,
    observer: Arc<Recorder>,
  ) -> Self {
    let fake = FakeMcpd::start().await;
    let dir = TempDir::new(name);
    let config = registrar_config(&fake.url, "sk-observe", providers, dir.path());
    let registrar = Registrar::new(config, None, tracing::Span::none()).expect("valid config");
    registrar.add_observer(observer);
    registrar.start().await.expect("start");
    fake.wait_stream(1).await;
    Self {
      fake,
      _dir: dir,
      registrar,
    }
  }

  fn send(&self, task_id: &str, provider: &str, stream: bool, caller: Option<Value>) {
    let mut task =
      json!({ "taskId": task_id, "provider": provider, "stream": stream, "body": chat(stream) });
    if let Some(caller) = caller {
      task["caller"] = caller;
    }
    self.fake.send("task", &task);
  }
}

/// The samples of a text exposition, by series (`name{labels}`), every line checked.
fn samples(text: &str) -> BTreeMap<String, f64> {
  let mut samples = BTreeMap::new();
  for line in text.lines() {
    if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
      continue;
    }
    let (series, value) = line
      .rsplit_once(' ')
      .unwrap_or_else(|| panic!("not a sample line: {line}"));
    assert!(series.starts_with("mcpctl_registrar_"), "{line}");
    let value: f64 = value
      .parse()
      .unwrap_or_else(|_| panic!("bad value: {line}"));
    assert!(
      samples.insert(series.to_owned(), value).is_none(),
      "twice: {line}"
    );
  }
  samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_task_that_reached_the_registrar_and_metrics_that_agree() {
  let plain = MockProvider::answering(json!({
    "content": "the answer", "model": "qwen2.5:7b-q4",
    "usage": { "promptTokens": 3, "completionTokens": 2 }
  }));
  let streaming = MockProvider::new(true, vec![Behavior::GatedStream { count: 3 }]);
  let closed = OwnerPolicy {
    allow_callers: Some(vec!["alice".to_owned()]),
    ..OwnerPolicy::default()
  };
  let recorder = Arc::new(Recorder::default());
  let rig = Rig::connected(
    "records",
    vec![
      published("plain", &plain, OwnerPolicy::default()),
      published("streaming", &streaming, OwnerPolicy::default()),
      published("closed", &plain, closed),
    ],
    Arc::clone(&recorder),
  )
  .await;
  let fake = &rig.fake;
  rig.send("t-plain", "plain", false, Some(json!({ "id": "bob" })));
  fake.result("t-plain").await;
  // A replay of an answered id, and a refused id: no record, nothing counted.
  rig.send("t-plain", "plain", false, None);
  rig.send("..", "plain", false, None);
  rig.send("t-nope", "not-served-by-us", false, None);
  rig.send("t-closed", "closed", false, Some(json!({ "id": "bob" })));
  fake.result("t-nope").await;
  fake.result("t-closed").await;
  // The stream's chunks come one release at a time: two gaps between three reads.
  rig.send("t-stream", "streaming", true, None);
  for n in 1..=3 {
    let chunk = format!("c{} ", n - 1);
    wait_for("a chunk", WAIT, || {
      fake.payloads("t-stream").iter().any(|p| p.contains(&chunk))
    })
    .await;
    // The last release lets the stream end.
    streaming.release(1);
  }
  fake.done("t-stream").await;

  let records = recorder.wait(4).await;
  let ids: Vec<&str> = records.keys().map(String::as_str).collect();
  assert_eq!(ids, ["t-closed", "t-nope", "t-plain", "t-stream"]);

  let ran = &records["t-plain"];
  assert_eq!(
    (
      ran.provider.as_str(),
      ran.caller_id.as_deref(),
      ran.outcome,
      ran.status
    ),
    ("plain", Some("bob"), Outcome::Completed, 200)
  );
  assert_eq!(ran.request_model.as_deref(), Some("team-llm"));
  assert_eq!(ran.response_model.as_deref(), Some("qwen2.5:7b-q4"));
  assert_eq!(
    (ran.prompt_tokens, ran.completion_tokens),
    (Some(3), Some(2))
  );
  assert!(!ran.stream && ran.refused.is_none() && ran.queue.is_some());
  assert!(ran.duration >= ran.queue.unwrap());
  // Nobody asked for content: none is kept.
  assert!(ran.messages.is_none() && ran.content.is_none());

  let unknown = &records["t-nope"];
  assert_eq!(unknown.provider, "(unknown)", "never mcpd's string");
  assert_eq!((unknown.outcome, unknown.status), (Outcome::Failed, 404));
  assert!(unknown.queue.is_none() && unknown.prompt_tokens.is_none());

  let refused = &records["t-closed"];
  assert_eq!(refused.refused, Some(Refusal::CallerNotAllowed));
  assert_eq!((refused.provider.as_str(), refused.status), ("closed", 403));
  assert_eq!(refused.caller_id.as_deref(), Some("bob"));
  assert_eq!(refused.request_model.as_deref(), Some("team-llm"));

  let stream = &records["t-stream"];
  assert!(stream.stream);
  assert_eq!((stream.outcome, stream.status), (Outcome::Completed, 200));
  let first = stream.time_to_first_token.expect("a first token");
  assert!(stream.queue.unwrap() <= first && first <= stream.duration);
  assert_eq!(stream.response_model.as_deref(), Some("team-llm"));

  let status = rig.registrar.status();
  let usage = rig.registrar.usage();
  let text = rig.registrar.metrics();
  let samples = samples(&text);
  let get = |series: &str| {
    *samples
      .get(series)
      .unwrap_or_else(|| panic!("{series} in:\n{text}"))
  };
  let total = |outcome: &str| -> f64 {
    samples
      .iter()
      .filter(|(series, _)| {
        series.starts_with("mcpctl_registrar_requests_total{")
          && series.contains(&format!("outcome=\"{outcome}\""))
      })
      .map(|(_, value)| value)
      .sum()
  };
  assert_eq!(total("completed"), status.completed as f64);
  assert_eq!(total("failed"), status.failed as f64);
  assert_eq!(total("cancelled"), status.cancelled as f64);
  assert_eq!((status.completed, status.failed), (2, 2));
  assert_eq!(
    get(r#"mcpctl_registrar_requests_total{outcome="failed",provider="(unknown)"}"#),
    1.0
  );
  assert!(!text.contains("not-served-by-us"));
  // usage()'s tally lists the refusals in Refusal::ALL's order.
  assert_eq!(Refusal::ALL[0], Refusal::CallerNotAllowed);
  assert_eq!(
    get(
      r#"mcpctl_registrar_requests_refused_total{provider="closed",reason="caller_not_allowed"}"#
    ),
    usage.providers["closed"].refused[0] as f64
  );
  assert_eq!(
    get(r#"mcpctl_registrar_prompt_tokens_total{provider="plain"}"#),
    usage.providers["plain"].prompt_tokens as f64
  );
  assert_eq!(
    get(r#"mcpctl_registrar_prompt_tokens_total{provider="plain"}"#),
    3.0
  );
  assert_eq!(
    get(r#"mcpctl_registrar_time_to_first_token_seconds_count{provider="streaming"}"#),
    1.0
  );
  assert_eq!(
    get(r#"mcpctl_registrar_time_to_first_token_seconds_count{provider="plain"}"#),
    0.0
  );
  assert_eq!(
    get(r#"mcpctl_registrar_inter_token_latency_seconds_count{provider="streaming"}"#),
    2.0
  );
  assert_eq!(
    get(r#"mcpctl_registrar_e2e_request_latency_seconds_count{provider="plain"}"#),
    1.0
  );
  assert_eq!(
    get(r#"mcpctl_registrar_request_queue_time_seconds_count{provider="closed"}"#),
    0.0
  );
  assert_eq!(
    get(r#"mcpctl_registrar_requests_running{provider="plain"}"#),
    0.0
  );
  assert_eq!(get(r#"mcpctl_registrar_state{state="connected"}"#), 1.0);
  assert_eq!(get("mcpctl_registrar_reconnects_total"), 0.0);
  assert_eq!(get("mcpctl_registrar_audit_lines_dropped_total"), 0.0);
  rig
    .registrar
    .audit_lines_dropped()
    .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
  assert!(rig
    .registrar
    .metrics()
    .contains("\nmcpctl_registrar_audit_lines_dropped_total 2\n"));
  rig.registrar.stop().await;
  assert!(rig
    .registrar
    .metrics()
    .contains("\nmcpctl_registrar_state{state=\"stopped\"} 1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_kept_only_when_an_observer_wants_it() {
  let plain = MockProvider::answering(json!({ "content": "the answer" }));
  let streaming = MockProvider::streaming(2, Duration::ZERO, None);
  let recorder = Arc::new(Recorder {
    content: true,
    ..Recorder::default()
  });
  let rig = Rig::connected(
    "content",
    vec![
      published("plain", &plain, OwnerPolicy::default()),
      published("streaming", &streaming, OwnerPolicy::default()),
    ],
    Arc::clone(&recorder),
  )
  .await;
  rig.send("t-plain", "plain", false, None);
  rig.send("t-stream", "streaming", true, None);
  rig.send("t-nope", "nope", false, None);
  let records = recorder.wait(3).await;
  let prompt = json!([{ "role": "user", "content": "the prompt" }]);
  for id in ["t-plain", "t-stream", "t-nope"] {
    assert_eq!(records[id].messages.as_ref(), Some(&prompt), "{id}");
  }
  assert_eq!(records["t-plain"].content.as_deref(), Some("the answer"));
  assert_eq!(records["t-stream"].content.as_deref(), Some("c0 c1 "));
  assert_eq!(records["t-nope"].content, None, "no answer, no text");
  rig.registrar.stop().await;
}
