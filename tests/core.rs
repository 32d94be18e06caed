//! The registrar core against a fake mcpd: register, the control channel, the
//! heartbeat, and every task answer, checked on the bytes and JSON on the wire.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use mcpctl_registrar::backoff::BackoffPolicy;
use mcpctl_registrar::dispatch::{DispatchSettings, PublishedProvider};
use mcpctl_registrar::error::describe;
use mcpctl_registrar::mcpd::McpdClient;
use mcpctl_registrar::provider::AbortReason;
use mcpctl_registrar::registrar::{Registrar, RegistrarConfig, RegistrarState};
use mcpctl_registrar::secret::Secret;
use mcpctl_registrar::wire::ProviderDescriptor;

use support::mcpd::{McpdServer, Reply, Response};
use support::provider::{Behavior, MockProvider};
use support::{
  chunks_of, registrar_config, wait_for, Answer, FakeMcpd, Request, Route, TempDir, WAIT,
};

const TOKEN: &str = "sk-test-token";
const PROVIDER: &str = "local-qwen";
const MODEL: &str = "qwen2.5:7b";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn dispatch(max_concurrency: u32, max_queue: u32, task_timeout: Duration) -> DispatchSettings {
  DispatchSettings {
    task_timeout,
    max_concurrency,
    max_queue,
  }
}

fn roomy() -> DispatchSettings {
  dispatch(4, 16, Duration::from_secs(10))
}

fn published(name: &str, provider: Arc<MockProvider>) -> PublishedProvider {
  PublishedProvider {
    descriptor: ProviderDescriptor {
      name: name.to_owned(),
      kind: "ollama".to_owned(),
      model: Some(MODEL.to_owned()),
      description: None,
      context_window: Some(32768),
    },
    provider,
    policy: Default::default(),
  }
}

fn chat(stream: bool) -> Value {
  json!({
    "model": MODEL,
    "messages": [{ "role": "user", "content": "hi" }],
    "max_tokens": 16,
    "stream": stream,
  })
}

fn hello() -> Value {
  json!({ "content": "hello", "finishReason": "stop", "usage": { "promptTokens": 3, "completionTokens": 2 } })
}

/// A registrar, its fake mcpd and config dir, and every state it reported.
struct Rig {
  fake: FakeMcpd,
  dir: TempDir,
  registrar: Registrar,
  states: Arc<Mutex<Vec<RegistrarState>>>,
}

fn build_registrar(
  fake: &FakeMcpd,
  dir: &TempDir,
  providers: Vec<PublishedProvider>,
  settings: DispatchSettings,
) -> (Registrar, Arc<Mutex<Vec<RegistrarState>>>) {
  let config = RegistrarConfig {
    mcpd_url: fake.url.clone(),
    token: Secret::new(TOKEN),
    providers,
    config_dir: dir.path().to_owned(),
    heartbeat_interval: Duration::from_millis(50),
    idle_timeout: None,
    backoff: BackoffPolicy {
      initial: Duration::from_millis(20),
      max: Duration::from_millis(100),
    },
    dispatch: settings,
    allow_insecure_http: false,
  };
  let states = Arc::new(Mutex::new(Vec::new()));
  let seen = Arc::clone(&states);
  let observer = Arc::new(
    move |status: mcpctl_registrar::registrar::RegistrarStatus| seen.lock().push(status.state),
  );
  let registrar =
    Registrar::new(config, Some(observer), tracing::Span::none()).expect("valid config");
  (registrar, states)
}

impl Rig {
  /// A started registrar publishing `providers`, with its channel open.
  async fn connected(
    name: &str,
    providers: Vec<PublishedProvider>,
    settings: DispatchSettings,
  ) -> Self {
    let rig = Self::idle(name, providers, settings).await;
    rig.registrar.start().await.expect("start");
    rig.fake.wait_stream(1).await;
    rig.wait_state(RegistrarState::Connected).await;
    rig
  }

  async fn idle(name: &str, providers: Vec<PublishedProvider>, settings: DispatchSettings) -> Self {
    let fake = FakeMcpd::start().await;
    let dir = TempDir::new(name);
    let (registrar, states) = build_registrar(&fake, &dir, providers, settings);
    Self {
      fake,
      dir,
      registrar,
      states,
    }
  }

  /// Built, not started, publishing `provider` as [`PROVIDER`].
  async fn idle_one(name: &str, provider: &Arc<MockProvider>) -> Self {
    Self::idle(
      name,
      vec![published(PROVIDER, Arc::clone(provider))],
      roomy(),
    )
    .await
  }

  async fn one(name: &str, provider: &Arc<MockProvider>, settings: DispatchSettings) -> Self {
    Self::connected(
      name,
      vec![published(PROVIDER, Arc::clone(provider))],
      settings,
    )
    .await
  }

  async fn wait_state(&self, state: RegistrarState) {
    let what = format!("state {}", state.as_str());
    wait_for(&what, WAIT, || self.registrar.status().state == state).await;
  }

  async fn stop(self) {
    self.registrar.stop().await;
    assert_eq!(self.registrar.status().state, RegistrarState::Stopped);
  }
}

/// Checks that each chunk POST's `seq` is the index of its first payload, and
/// returns the payloads (retried POSTs count once).
fn payloads_in_seq_order(posts: &[Request]) -> Vec<String> {
  let mut payloads = Vec::new();
  for post in posts.iter().filter(|post| post.status == 200) {
    assert_eq!(
      post.body["seq"],
      json!(payloads.len()),
      "seq of a chunk POST: {}",
      post.body
    );
    payloads.extend(chunks_of(post));
  }
  payloads
}

fn parse(payloads: &[String]) -> Vec<Value> {
  payloads
    .iter()
    .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("payload {p} is not JSON: {e}")))
    .collect()
}

fn error_of(request: &Request) -> (u64, String, String) {
  let body = &request.body;
  (
    body["status"].as_u64().expect("status"),
    body["body"]["error"]["type"]
      .as_str()
      .expect("type")
      .to_owned(),
    body["body"]["error"]["code"]
      .as_str()
      .expect("code")
      .to_owned(),
  )
}

/// The barrier after which "nothing more happened" is exact, instead of a
/// pause that a later event outlives. The control channel handles its events
/// one by one, in order, and a task leaves the dispatcher's live set only at
/// the very end of its life, after its last POST (`Registrar::live_tasks`).
/// So once a sentinel task sent after the events under test has been answered,
/// every earlier event has been handled; and once no task is live but the
/// `still_running` ones, every other task has posted all it ever will. The
/// sentinel names a provider nobody publishes: it is answered 404 without
/// running, counts as one failed task, and posts one result for its own id.
async fn quiesce(rig: &Rig, sentinel: &str, still_running: usize) {
  rig
    .fake
    .send_task(sentinel, "sentinel-unknown", false, chat(false));
  assert_eq!(rig.fake.result(sentinel).await.body["status"], json!(404));
  tasks_ended(rig, still_running).await;
}

/// Waits until only `still_running` tasks are live: every other task received
/// so far has ended, its POSTs included (see [`quiesce`]).
async fn tasks_ended(rig: &Rig, still_running: usize) {
  let what = format!("{still_running} live tasks");
  wait_for(&what, WAIT, || rig.registrar.live_tasks() == still_running).await;
}

// ---------------------------------------------------------------- register

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_describes_providers_and_the_session_id_is_sticky() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("sticky", &provider, roomy()).await;
  let fake = &rig.fake;

  let first = fake.of(Route::Register).remove(0);
  assert_eq!(first.status, 201);
  assert_eq!(
    first.body,
    json!({
      "client": { "name": "mcplocal-registrar", "version": VERSION },
      "providers": [{ "name": PROVIDER, "type": "ollama", "model": MODEL, "contextWindow": 32768 }],
    }),
    "first register carries no providerSessionId"
  );
  assert_eq!(first.header("authorization"), Some("Bearer sk-test-token"));
  assert_eq!(first.header("content-type"), Some("application/json"));
  assert_eq!(first.header("x-mcpctl-provider-session"), None);
  assert_eq!(
    rig.registrar.status().provider_session_id.as_deref(),
    Some("ps-1")
  );
  let file =
    std::fs::read_to_string(rig.dir.path().join("provider-session")).expect("session file");
  assert_eq!(file, "{\"providerSessionId\":\"ps-1\"}\n");

  let stream = fake.of(Route::Stream).remove(0);
  assert_eq!(
    stream.query.get("providerSessionId").map(String::as_str),
    Some("ps-1")
  );
  assert_eq!(stream.header("x-mcpctl-provider-session"), Some("ps-1"));
  assert_eq!(stream.header("authorization"), Some("Bearer sk-test-token"));
  assert_eq!(stream.header("accept"), Some("text/event-stream"));
  assert_eq!(stream.header("last-event-id"), None);

  wait_for("a heartbeat", WAIT, || fake.count(Route::Heartbeat) > 0).await;
  let beat = fake.of(Route::Heartbeat).remove(0);
  assert_eq!(
    beat.body,
    json!({ "providerSessionId": "ps-1", "providers": [{
      "name": PROVIDER, "inFlight": 0, "queued": 0, "maxConcurrency": 4, "completed": 0, "failed": 0,
    }] })
  );
  assert_eq!(beat.header("x-mcpctl-provider-session"), Some("ps-1"));
  let Rig {
    fake,
    dir,
    registrar,
    ..
  } = rig;
  registrar.stop().await;

  // A second registrar in the same config dir sends the id back; mcpd answers
  // a different one, which is adopted and persisted.
  fake.next_session_id("ps-fresh");
  let (second, _) = registrar_again(&fake, &dir, &provider);
  second.start().await.expect("second start");
  let again = fake.of(Route::Register).remove(1);
  assert_eq!(again.body["providerSessionId"], json!("ps-1"));
  assert_eq!(again.header("x-mcpctl-provider-session"), Some("ps-1"));
  assert_eq!(
    second.status().provider_session_id.as_deref(),
    Some("ps-fresh")
  );
  let file = std::fs::read_to_string(dir.path().join("provider-session")).expect("session file");
  assert_eq!(file, "{\"providerSessionId\":\"ps-fresh\"}\n");
  fake.wait_stream(2).await;
  let stream = fake.of(Route::Stream).remove(1);
  assert_eq!(
    stream.query.get("providerSessionId").map(String::as_str),
    Some("ps-fresh")
  );
  assert_eq!(stream.header("x-mcpctl-provider-session"), Some("ps-fresh"));
  second.stop().await;

  for request in fake.requests() {
    assert_eq!(
      request.header("authorization"),
      Some("Bearer sk-test-token"),
      "{} {}",
      request.method,
      request.path
    );
  }
}

fn registrar_again(
  fake: &FakeMcpd,
  dir: &TempDir,
  provider: &Arc<MockProvider>,
) -> (Registrar, Arc<Mutex<Vec<RegistrarState>>>) {
  build_registrar(
    fake,
    dir,
    vec![published(PROVIDER, Arc::clone(provider))],
    roomy(),
  )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_follows_the_interval_mcpd_asks_and_reports_load() {
  let provider = MockProvider::hanging();
  let fake = FakeMcpd::start().await;
  fake.heartbeat_interval_ms(Some(100));
  let dir = TempDir::new("beat");
  let providers = vec![published(PROVIDER, Arc::clone(&provider))];
  let (registrar, _) = build_registrar(
    &fake,
    &dir,
    providers,
    dispatch(2, 4, Duration::from_secs(10)),
  );
  // Our own default would be 50 ms; mcpd's 100 ms wins.
  registrar.start().await.expect("start");
  fake.wait_stream(1).await;
  fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("the provider call", WAIT, || provider.calls().len() == 1).await;
  let busy = |beat: &Request| beat.body["providers"][0]["inFlight"] == json!(1);
  wait_for("a heartbeat with the task in flight", WAIT, || {
    fake.of(Route::Heartbeat).iter().any(busy)
  })
  .await;
  let beat = fake.of(Route::Heartbeat).into_iter().find(busy).unwrap();
  assert_eq!(
    beat.body["providers"],
    json!([{ "name": PROVIDER, "inFlight": 1, "queued": 0, "maxConcurrency": 2, "completed": 0, "failed": 0 }])
  );
  // mcpd's 100 ms (jittered by at most 10%) and not our 50 ms: every gap
  // between beats is at least 90 ms. Load can only make gaps longer.
  let seen = fake.count(Route::Heartbeat);
  wait_for("four more heartbeats", WAIT, || {
    fake.count(Route::Heartbeat) >= seen + 4
  })
  .await;
  let beats = fake.of(Route::Heartbeat);
  for pair in beats.windows(2) {
    let gap = pair[1].at - pair[0].at;
    assert!(
      gap >= Duration::from_millis(90),
      "a heartbeat {gap:?} after the last"
    );
  }
  registrar.stop().await;
}

// ------------------------------------------------------------ answers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_round_trip() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("roundtrip", &provider, roomy()).await;
  let mut body = chat(false);
  body["temperature"] = json!(0.5);
  body["stop"] = json!("END");
  rig.fake.send_task("t-1", PROVIDER, false, body.clone());
  let result = rig.fake.result("t-1").await;

  assert_eq!(result.path, "/api/v1/llms/_provider-tasks/t-1/result");
  assert_eq!(result.header("authorization"), Some("Bearer sk-test-token"));
  assert_eq!(result.header("x-mcpctl-provider-session"), Some("ps-1"));
  assert_eq!(result.header("content-type"), Some("application/json"));
  assert_eq!(result.body["status"], json!(200));
  let completion = &result.body["body"];
  let created = completion["created"].as_u64().expect("integer created");
  assert!(
    created > 1_600_000_000,
    "created {created} is seconds since the epoch"
  );
  assert_eq!(
    *completion,
    json!({
      "id": "chatcmpl-t-1",
      "object": "chat.completion",
      "created": created,
      "model": MODEL,
      "choices": [{
        "index": 0,
        "message": { "role": "assistant", "content": "hello", "refusal": null },
        "logprobs": null,
        "finish_reason": "stop",
      }],
      "usage": { "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5 },
    })
  );

  let call = provider.call(0);
  assert_eq!(call.task_id, "t-1");
  let options = &call.options;
  assert_eq!(
    options["messages"],
    json!([{ "role": "user", "content": "hi" }])
  );
  assert_eq!(options["maxTokens"], json!(16));
  assert_eq!(options["temperature"], json!(0.5));
  assert_eq!(options["stop"], json!(["END"]));
  assert_eq!(options["model"], json!(MODEL));

  // A task id is one path segment, whatever it holds.
  rig.fake.send_task("t/2 ?", PROVIDER, false, chat(false));
  let result = rig.fake.result("t/2 ?").await;
  assert_eq!(
    result.path,
    "/api/v1/llms/_provider-tasks/t%2F2%20%3F/result"
  );
  assert_eq!(result.body["status"], json!(200));
  // Counted once mcpd's answer to the POST came back.
  wait_for("two completed", WAIT, || {
    rig.registrar.status().completed == 2
  })
  .await;
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_v1_from_a_provider_without_stream() {
  let provider = MockProvider::answering(
    json!({ "content": "hello", "finishReason": "length", "usage": { "promptTokens": 3, "completionTokens": 2 } }),
  );
  let rig = Rig::one("v1", &provider, roomy()).await;
  let mut body = chat(true);
  body["stream_options"] = json!({ "include_usage": true });
  rig.fake.send_task("t-1", PROVIDER, true, body);
  rig.fake.done("t-1").await;
  let posts = rig.fake.for_task(Route::Chunks, "t-1");
  let payloads = payloads_in_seq_order(&posts);
  assert_eq!(payloads.len(), 5, "{payloads:?}");
  assert_eq!(payloads[4], "[DONE]");
  let chunks = parse(&payloads[..4]);
  let created = chunks[0]["created"].as_u64().expect("integer created");
  for chunk in &chunks {
    assert_eq!(chunk["id"], json!("chatcmpl-t-1"));
    assert_eq!(chunk["object"], json!("chat.completion.chunk"));
    assert_eq!(chunk["created"], json!(created));
    assert_eq!(chunk["model"], json!(MODEL));
  }
  let choice = |delta: Value, finish: Value| json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]);
  assert_eq!(
    chunks[0]["choices"],
    choice(json!({ "role": "assistant", "content": "" }), Value::Null)
  );
  assert_eq!(
    chunks[1]["choices"],
    choice(json!({ "content": "hello" }), Value::Null)
  );
  assert_eq!(chunks[2]["choices"], choice(json!({}), json!("length")));
  for chunk in &chunks[..3] {
    assert_eq!(chunk.get("usage"), Some(&Value::Null), "{chunk}");
  }
  assert_eq!(chunks[3]["choices"], json!([]));
  assert_eq!(
    chunks[3]["usage"],
    json!({ "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5 })
  );
  assert!(rig.fake.for_task(Route::Result, "t-1").is_empty());

  // Without include_usage: no usage anywhere, four payloads.
  rig.fake.send_task("t-2", PROVIDER, true, chat(true));
  let payloads = rig.fake.done("t-2").await;
  assert_eq!(
    payloads_in_seq_order(&rig.fake.for_task(Route::Chunks, "t-2")),
    payloads
  );
  assert_eq!(payloads.len(), 4, "{payloads:?}");
  for chunk in parse(&payloads[..3]) {
    assert!(chunk.get("usage").is_none(), "{chunk}");
  }
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_provider_is_batched_under_slow_chunk_posts() {
  // More chunks than two chunk POSTs may carry (4,096 payloads each): while the first
  // POST (sent at once, with what was made by then: up to a window's 2,048 chunks, or
  // the cap) is held, the provider fills the next POST's body to its cap and waits;
  // that body then goes whole. The hold is long beside the time a debug build takes to
  // make 4,096 chunks, even on a loaded machine (tens of ms).
  const COUNT: usize = 10_000;
  const CAP: usize = 4096;
  let provider = MockProvider::streaming(COUNT, Duration::ZERO, None);
  let rig = Rig::one("batch", &provider, roomy()).await;
  rig.fake.delay(Route::Chunks, Duration::from_millis(600));
  rig.fake.send_task("t-1", PROVIDER, true, chat(true));
  rig.fake.done("t-1").await;
  let posts = rig.fake.for_task(Route::Chunks, "t-1");
  let payloads = payloads_in_seq_order(&posts);
  assert_eq!(
    payloads.len(),
    COUNT + 3,
    "role + {COUNT} contents + finish + [DONE]"
  );
  let chunks = parse(&payloads[..COUNT + 2]);
  assert_eq!(chunks[0]["choices"][0]["delta"]["role"], json!("assistant"));
  for (i, chunk) in chunks[1..=COUNT].iter().enumerate() {
    assert_eq!(
      chunk["choices"][0]["delta"],
      json!({ "content": format!("c{i} ") })
    );
  }
  assert_eq!(
    chunks[COUNT + 1]["choices"][0]["finish_reason"],
    json!("stop")
  );
  let sizes: Vec<usize> = posts.iter().map(|post| chunks_of(post).len()).collect();
  assert_eq!(
    sizes.iter().max(),
    Some(&CAP),
    "a full body goes whole, and never more than the cap: {sizes:?}"
  );
  assert!(posts.len() <= 4, "POSTs of {sizes:?} payloads");
  assert_eq!(
    rig
      .fake
      .max_in_flight("/api/v1/llms/_provider-tasks/t-1/chunks"),
    1,
    "two chunk POSTs of one task were in flight at once"
  );
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_is_relayed_as_it_is_produced() {
  // The provider yields its first chunk, then each next one only when the
  // test lets it: the first must reach mcpd while the rest is still unmade.
  let provider = MockProvider::new(true, vec![Behavior::GatedStream { count: 8 }]);
  let rig = Rig::one("incremental", &provider, roomy()).await;
  rig.fake.send_task("t-1", PROVIDER, true, chat(true));
  wait_for("the first content chunk", WAIT, || {
    rig.fake.payloads("t-1").iter().any(|p| p.contains("c0 "))
  })
  .await;
  assert!(!rig.fake.payloads("t-1").iter().any(|p| p.contains("c1 ")));
  for n in 1..8 {
    provider.release(1);
    let what = format!("chunk c{n} relayed");
    let marker = format!("c{n} ");
    wait_for(&what, WAIT, || {
      rig.fake.payloads("t-1").iter().any(|p| p.contains(&marker))
    })
    .await;
  }
  provider.release(1);
  let payloads = rig.fake.done("t-1").await;
  assert_eq!(payloads.len(), 11);
  assert!(rig.fake.for_task(Route::Chunks, "t-1").len() >= 8);
  rig.stop().await;
}

// ------------------------------------------------------------- errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_provider_is_answered_404_model_not_found() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("unknown", &provider, roomy()).await;
  rig.fake.send_task("t-1", "nope", false, chat(false));
  rig.fake.send_task("t-2", "nope", true, chat(true));
  for task in ["t-1", "t-2"] {
    let result = rig.fake.result(task).await;
    assert_eq!(
      error_of(&result),
      (
        404,
        "invalid_request_error".into(),
        "model_not_found".into()
      )
    );
    assert!(result.body["body"]["error"]["message"]
      .as_str()
      .unwrap()
      .contains("nope"));
  }
  // Both refused tasks have ended: nothing more is posted for them.
  tasks_ended(&rig, 0).await;
  assert!(rig.fake.for_task(Route::Chunks, "t-2").is_empty());
  assert!(provider.calls().is_empty());
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_body_is_answered_400() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("invalid", &provider, roomy()).await;
  rig
    .fake
    .send_task("t-1", PROVIDER, false, json!({ "messages": "hi" }));
  rig.fake.send_task(
    "t-2",
    PROVIDER,
    true,
    json!({ "stream": true, "messages": [] }),
  );
  // A task event that does not parse but names its task.
  rig.fake.send(
    "task",
    &json!({ "taskId": "t-3", "provider": PROVIDER, "stream": "yes", "body": chat(false) }),
  );
  // A task event without a body.
  rig.fake.send(
    "task",
    &json!({ "taskId": "t-4", "provider": PROVIDER, "stream": false }),
  );
  for task in ["t-1", "t-2", "t-3", "t-4"] {
    let result = rig.fake.result(task).await;
    assert_eq!(
      error_of(&result),
      (
        400,
        "invalid_request_error".into(),
        "invalid_request".into()
      ),
      "{task}"
    );
  }
  assert!(
    rig.fake.result("t-1").await.body["body"]["error"]["message"]
      .as_str()
      .unwrap()
      .contains("'messages'")
  );
  assert_eq!(
    rig.fake.result("t-4").await.body["body"]["error"]["message"],
    "the request body must be a JSON object"
  );
  tasks_ended(&rig, 0).await;
  assert!(provider.calls().is_empty());
  assert!(rig.fake.for_task(Route::Chunks, "t-2").is_empty());
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_rejection_is_answered_502() {
  let complete = MockProvider::rejecting("boom");
  let stream = MockProvider::new(true, vec![Behavior::Reject("bang".into())]);
  let rig = Rig::connected(
    "reject",
    vec![published("complete", complete), published("stream", stream)],
    roomy(),
  )
  .await;
  rig.fake.send_task("t-1", "complete", false, chat(false));
  rig.fake.send_task("t-2", "stream", true, chat(true));
  let result = rig.fake.result("t-1").await;
  assert_eq!(
    error_of(&result),
    (502, "provider_error".into(), "provider_error".into())
  );
  assert_eq!(result.body["body"]["error"]["message"], json!("boom"));
  let result = rig.fake.result("t-2").await;
  assert_eq!(
    error_of(&result),
    (502, "provider_error".into(), "provider_error".into())
  );
  assert_eq!(result.body["body"]["error"]["message"], json!("bang"));
  tasks_ended(&rig, 0).await;
  assert!(
    rig.fake.for_task(Route::Chunks, "t-2").is_empty(),
    "nothing was streamed"
  );
  wait_for("two failed", WAIT, || rig.registrar.status().failed == 2).await;
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_error_after_chunks_goes_in_band_then_done() {
  let provider = MockProvider::streaming(3, Duration::ZERO, Some("broke mid-stream"));
  let rig = Rig::one("inband", &provider, roomy()).await;
  rig.fake.send_task("t-1", PROVIDER, true, chat(true));
  rig.fake.done("t-1").await;
  let payloads = payloads_in_seq_order(&rig.fake.for_task(Route::Chunks, "t-1"));
  assert_eq!(payloads.len(), 6, "{payloads:?}");
  let chunks = parse(&payloads[..5]);
  assert_eq!(chunks[0]["choices"][0]["delta"]["role"], json!("assistant"));
  for i in 0..3 {
    assert_eq!(
      chunks[i + 1]["choices"][0]["delta"]["content"],
      json!(format!("c{i} "))
    );
  }
  assert_eq!(
    chunks[4],
    json!({ "error": { "message": "broke mid-stream", "type": "provider_error", "code": "provider_error" } })
  );
  assert_eq!(payloads[5], "[DONE]");
  tasks_ended(&rig, 0).await;
  assert!(rig.fake.for_task(Route::Result, "t-1").is_empty());
  rig.stop().await;
}

// ------------------------------------------------------------- limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_concurrency_and_queue_is_answered_429() {
  let provider = MockProvider::hanging();
  let rig = Rig::one("limits", &provider, dispatch(1, 1, Duration::from_secs(10))).await;
  let fake = &rig.fake;
  fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("t-1 running", WAIT, || provider.calls().len() == 1).await;
  fake.send_task("t-2", PROVIDER, false, chat(false));
  wait_for("t-2 queued", WAIT, || rig.registrar.status().queued == 1).await;
  fake.send_task("t-3", PROVIDER, true, chat(true));
  let result = fake.result("t-3").await;
  assert_eq!(
    error_of(&result),
    (
      429,
      "rate_limit_exceeded".into(),
      "rate_limit_exceeded".into()
    )
  );
  let status = rig.registrar.status();
  assert_eq!((status.in_flight, status.queued), (1, 1));
  let full = |beat: &Request| beat.body["providers"][0]["queued"] == json!(1);
  wait_for("a heartbeat with one queued", WAIT, || {
    fake.of(Route::Heartbeat).iter().any(full)
  })
  .await;
  let beat = fake.of(Route::Heartbeat).into_iter().find(full).unwrap();
  assert_eq!(beat.body["providers"][0]["inFlight"], json!(1));
  assert_eq!(beat.body["providers"][0]["maxConcurrency"], json!(1));
  assert_eq!(provider.calls(), ["t-1"]);
  assert!(fake.posts_for("t-1").is_empty() && fake.posts_for("t-2").is_empty());
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_is_first_in_first_out() {
  let provider = MockProvider::gated(hello());
  let rig = Rig::one("fifo", &provider, dispatch(1, 8, Duration::from_secs(10))).await;
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("t-1 running", WAIT, || provider.calls().len() == 1).await;
  let queued = ["t-2", "t-3", "t-4", "t-5"];
  for (i, task) in queued.iter().enumerate() {
    rig.fake.send_task(task, PROVIDER, false, chat(false));
    let what = format!("{task} queued");
    wait_for(&what, WAIT, || {
      rig.registrar.status().queued == i as u32 + 1
    })
    .await;
  }
  for n in 2..=5 {
    provider.release(1);
    wait_for("the next queued task to run", WAIT, || {
      provider.calls().len() == n
    })
    .await;
  }
  provider.release(1);
  for task in ["t-1", "t-2", "t-3", "t-4", "t-5"] {
    assert_eq!(rig.fake.result(task).await.body["status"], json!(200));
  }
  assert_eq!(provider.calls(), ["t-1", "t-2", "t-3", "t-4", "t-5"]);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_timeout_answers_504_aborts_and_frees_the_slot() {
  let provider = MockProvider::new(false, vec![Behavior::Hang, Behavior::Answer(hello())]);
  let rig = Rig::one(
    "timeout",
    &provider,
    dispatch(1, 4, Duration::from_millis(100)),
  )
  .await;
  let sent = Instant::now();
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  let result = rig.fake.result("t-1").await;
  assert!(sent.elapsed() >= Duration::from_millis(100));
  assert_eq!(error_of(&result), (504, "timeout".into(), "timeout".into()));
  assert_eq!(
    provider.aborts(),
    [("t-1".to_owned(), AbortReason::TimedOut)]
  );
  rig.fake.send_task("t-2", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-2").await.body["status"], json!(200));
  wait_for("nothing in flight", WAIT, || {
    rig.registrar.status().in_flight == 0
  })
  .await;
  rig.stop().await;
}

// ------------------------------------------------------------ cancel

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_aborts_a_running_task_and_posts_nothing() {
  let provider = MockProvider::hanging();
  let rig = Rig::one("cancel", &provider, dispatch(1, 4, Duration::from_secs(10))).await;
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("t-1 running", WAIT, || provider.calls().len() == 1).await;
  rig.fake.cancel("t-1");
  wait_for("the abort", WAIT, || !provider.aborts().is_empty()).await;
  assert_eq!(
    provider.aborts(),
    [("t-1".to_owned(), AbortReason::Cancelled)]
  );
  wait_for("the slot freed", WAIT, || {
    rig.registrar.status().in_flight == 0
  })
  .await;
  // The slot is free: the next task reaches the provider.
  rig.fake.send_task("t-2", PROVIDER, false, chat(false));
  wait_for("t-2 running", WAIT, || provider.calls().len() == 2).await;
  // t-2 hangs; t-1 has ended, so its POSTs (none) are final.
  tasks_ended(&rig, 1).await;
  assert!(
    rig.fake.posts_for("t-1").is_empty(),
    "{:?}",
    rig.fake.posts_for("t-1")
  );
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_stream_without_done() {
  let provider = MockProvider::streaming(1000, Duration::from_millis(10), None);
  let rig = Rig::one("cancelstream", &provider, roomy()).await;
  rig.fake.send_task("t-1", PROVIDER, true, chat(true));
  wait_for("some chunks", WAIT, || rig.fake.payloads("t-1").len() > 3).await;
  let before_cancel = rig.fake.posts_for("t-1").len();
  rig.fake.cancel("t-1");
  wait_for("the task counted cancelled", WAIT, || {
    rig.registrar.status().cancelled == 1
  })
  .await;
  assert_eq!(
    provider.aborts(),
    [("t-1".to_owned(), AbortReason::Cancelled)]
  );
  // The relay never has two POSTs in flight and starts none after the
  // cancel: at most the one on its way when the cancel landed arrives later.
  // The task is counted when it ends, after its last POST; the live set says
  // the same without relying on where the count is taken.
  tasks_ended(&rig, 0).await;
  let posted = rig.fake.posts_for("t-1").len();
  assert!(
    posted <= before_cancel + 1,
    "{posted} POSTs, {before_cancel} before the cancel"
  );
  assert!(!rig.fake.payloads("t-1").contains(&"[DONE]".to_owned()));
  assert!(rig.fake.for_task(Route::Result, "t-1").is_empty());
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_queued_task_never_calls_the_provider() {
  let provider = MockProvider::hanging();
  let rig = Rig::one(
    "cancelqueued",
    &provider,
    dispatch(1, 4, Duration::from_secs(10)),
  )
  .await;
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("t-1 running", WAIT, || provider.calls().len() == 1).await;
  rig.fake.send_task("t-2", PROVIDER, false, chat(false));
  wait_for("t-2 queued", WAIT, || rig.registrar.status().queued == 1).await;
  rig.fake.cancel("t-2");
  wait_for("t-2 leaves the queue", WAIT, || {
    rig.registrar.status().queued == 0
  })
  .await;
  rig.fake.cancel("t-1");
  wait_for("t-1 aborted", WAIT, || !provider.aborts().is_empty()).await;
  rig.fake.send_task("t-3", PROVIDER, false, chat(false));
  wait_for("t-3 running", WAIT, || provider.calls().len() == 2).await;
  // t-3 hangs; t-1 and t-2 have ended and can neither call nor post.
  tasks_ended(&rig, 1).await;
  assert_eq!(provider.calls(), ["t-1", "t-3"]);
  assert_eq!(
    provider.aborts(),
    [("t-1".to_owned(), AbortReason::Cancelled)]
  );
  assert!(rig.fake.posts_for("t-1").is_empty());
  assert!(rig.fake.posts_for("t-2").is_empty());
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_an_unknown_task_is_a_no_op() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("cancelunknown", &provider, roomy()).await;
  rig.fake.cancel("t-unknown");
  rig.fake.send("cancel", &json!({ "nothing": true }));
  rig.fake.send("cancel", &json!("not even an object"));
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-1").await.body["status"], json!(200));
  // Cancelling a task already answered changes nothing either.
  rig.fake.cancel("t-1");
  // The sentinel's answer means every cancel above was handled (and that the
  // channel they came on is still the one being read).
  quiesce(&rig, "sentinel", 0).await;
  assert!(provider.aborts().is_empty());
  assert!(rig.fake.posts_for("t-unknown").is_empty());
  assert_eq!(rig.fake.posts_for("t-1").len(), 1);
  assert_eq!(rig.fake.streams_opened(), 1, "the channel stayed up");
  assert_eq!(rig.registrar.status().state, RegistrarState::Connected);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_task_id_runs_once() {
  let provider = MockProvider::gated(hello());
  let rig = Rig::one("replay", &provider, roomy()).await;
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("t-1 running", WAIT, || provider.calls().len() == 1).await;
  // The second t-1 was handled before the sentinel; only the gated t-1 lives.
  quiesce(&rig, "sentinel-1", 1).await;
  assert_eq!(provider.calls().len(), 1, "a replay while running");
  provider.release(4);
  rig.fake.result("t-1").await;
  rig.fake.send_task("t-1", PROVIDER, true, chat(true));
  quiesce(&rig, "sentinel-2", 0).await;
  assert_eq!(provider.calls().len(), 1, "a replay after the answer");
  assert_eq!(rig.fake.posts_for("t-1").len(), 1);
  rig.stop().await;
}

// -------------------------------------------------------------- stop

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_answers_running_and_queued_tasks_503() {
  let provider = MockProvider::hanging();
  let rig = Rig::one("stop", &provider, dispatch(1, 4, Duration::from_secs(10))).await;
  let fake = &rig.fake;
  fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("t-1 running", WAIT, || provider.calls().len() == 1).await;
  fake.send_task("t-2", PROVIDER, true, chat(true));
  wait_for("t-2 queued", WAIT, || rig.registrar.status().queued == 1).await;

  let stopping = Instant::now();
  rig.registrar.stop().await;
  assert!(
    stopping.elapsed() < Duration::from_secs(2),
    "stop took {:?}",
    stopping.elapsed()
  );
  // The answers went out before stop() returned.
  for task in ["t-1", "t-2"] {
    let results = fake.for_task(Route::Result, task);
    assert_eq!(results.len(), 1, "{task}: {results:?}");
    assert_eq!(
      error_of(&results[0]),
      (503, "unavailable".into(), "unavailable".into())
    );
  }
  assert_eq!(
    provider.aborts(),
    [("t-1".to_owned(), AbortReason::Stopping)]
  );
  assert_eq!(provider.calls(), ["t-1"]);
  let status = rig.registrar.status();
  assert_eq!(status.state, RegistrarState::Stopped);
  assert_eq!((status.in_flight, status.queued), (0, 0));
  assert_eq!(rig.states.lock().last(), Some(&RegistrarState::Stopped));

  // Idempotent, and nothing runs any more.
  rig.registrar.stop().await;
  assert_eq!(rig.registrar.status().state, RegistrarState::Stopped);
  assert!(rig.registrar.start().await.is_err());
  wait_for("the channel closed", WAIT, || !fake.stream_is_open(0)).await;
  // Nothing can arrive later: the registrar owns no task any more (the
  // supervisor, the heartbeat and every task have ended), so no code of it is
  // left to send. Every task's answer was awaited before its task ended.
  assert_eq!(rig.registrar.owned_tasks(), 0, "tasks alive after stop()");
  assert_eq!(rig.registrar.live_tasks(), 0);
}

// ----------------------------------------------------- channel and session

fn routes_without_heartbeats(fake: &FakeMcpd) -> Vec<(Route, u16)> {
  fake
    .requests()
    .iter()
    .filter(|r| r.route != Route::Heartbeat)
    .map(|r| (r.route, r.status))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_404_registers_again_then_reconnects() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::idle_one("stream404", &provider).await;
  rig.fake.script(Route::Stream, [Answer::Status(404)]);
  rig.registrar.start().await.expect("start");
  rig.fake.wait_stream(1).await;
  rig.wait_state(RegistrarState::Connected).await;
  assert_eq!(
    routes_without_heartbeats(&rig.fake),
    [
      (Route::Register, 201),
      (Route::Stream, 404),
      (Route::Register, 201),
      (Route::Stream, 200)
    ]
  );
  let registers = rig.fake.of(Route::Register);
  assert_eq!(registers[1].body["providerSessionId"], json!("ps-1"));
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-1").await.body["status"], json!(200));
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_404_registers_again() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::idle_one("beat404", &provider).await;
  rig.fake.script(Route::Heartbeat, [Answer::Status(404)]);
  rig.registrar.start().await.expect("start");
  wait_for("a second register", WAIT, || {
    rig.fake.count(Route::Register) == 2
  })
  .await;
  let registers = rig.fake.of(Route::Register);
  assert_eq!(registers[1].body["providerSessionId"], json!("ps-1"));
  assert_eq!(
    registers[1].header("x-mcpctl-provider-session"),
    Some("ps-1")
  );
  // ... after the 404, and followed by a fresh control channel.
  let requests = rig.fake.requests();
  let lost = requests
    .iter()
    .position(|r| r.route == Route::Heartbeat && r.status == 404);
  let again = requests.iter().rposition(|r| r.route == Route::Register);
  assert!(lost < again, "{:?}", routes_without_heartbeats(&rig.fake));
  rig.fake.wait_stream(2).await;
  rig.wait_state(RegistrarState::Connected).await;
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-1").await.body["status"], json!(200));
  rig.stop().await;
}

/// A beat sent for a session that the channel then replaced (mcpd forgot it, the
/// connect answered 404, a register got a new id) may be answered 404 after the new
/// session is up: that answer is about the old session and registers nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_heartbeat_404_for_a_replaced_session_registers_nothing() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::idle_one("stale404", &provider).await;
  rig.registrar.start().await.expect("start");
  let fake = &rig.fake;
  // The next beat (for ps-1) is held 3 s, then answered 404.
  fake.delay(Route::Heartbeat, Duration::from_secs(3));
  fake.script(Route::Heartbeat, [Answer::Status(404)]);
  let beats = fake.count(Route::Heartbeat);
  wait_for("a beat held in flight", WAIT, || {
    fake.count(Route::Heartbeat) > beats
  })
  .await;
  fake.delay(Route::Heartbeat, Duration::ZERO);
  // Meanwhile the channel learns the session is gone and registers a new one.
  fake.script(Route::Stream, [Answer::Status(404)]);
  fake.next_session_id("ps-new");
  fake.drop_stream();
  wait_for("the new session up", WAIT, || {
    rig.registrar.status().provider_session_id.as_deref() == Some("ps-new")
      && rig.registrar.status().state == RegistrarState::Connected
  })
  .await;
  assert_eq!(fake.count(Route::Register), 2);
  // The held beat's 404 comes back; the beats after it carry ps-new. Had the
  // stale 404 been taken for the new session, a third register would come first.
  wait_for("three beats for the new session", WAIT, || {
    fake
      .of(Route::Heartbeat)
      .iter()
      .filter(|beat| beat.body["providerSessionId"] == json!("ps-new"))
      .count()
      >= 3
  })
  .await;
  let held = fake
    .of(Route::Heartbeat)
    .into_iter()
    .find(|beat| beat.status == 404)
    .expect("the held beat was answered 404");
  assert_eq!(held.body["providerSessionId"], json!("ps-1"));
  assert_eq!(
    fake.count(Route::Register),
    2,
    "{:?}",
    routes_without_heartbeats(fake)
  );
  assert_eq!(rig.registrar.status().state, RegistrarState::Connected);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_reconnects_with_last_event_id() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("lastid", &provider, roomy()).await;
  let fake = &rig.fake;
  fake.push("id: ev-1\nevent: ping\ndata: x\n\n: keep-alive\n\n");
  let task = json!({ "taskId": "t-1", "provider": PROVIDER, "stream": false, "body": chat(false) });
  fake.push(format!(
    "id: ev-2\nevent: task\ndata: {task}\n\nevent: ping\ndata: y\n\n"
  ));
  fake.drop_stream();
  fake.wait_stream(2).await;
  let second = fake.of(Route::Stream).remove(1);
  assert_eq!(second.header("last-event-id"), Some("ev-2"));
  assert_eq!(
    second.query.get("providerSessionId").map(String::as_str),
    Some("ps-1")
  );
  assert_eq!(second.header("x-mcpctl-provider-session"), Some("ps-1"));
  assert_eq!(
    fake.count(Route::Register),
    1,
    "no register for a dropped stream"
  );
  rig.wait_state(RegistrarState::Connected).await;
  assert!(rig.registrar.status().reconnects >= 1);
  assert!(rig.states.lock().contains(&RegistrarState::Reconnecting));
  assert_eq!(fake.result("t-1").await.body["status"], json!(200));

  // mcpd re-sends the task it already has an answer for; a new one runs.
  fake.send_task("t-1", PROVIDER, false, chat(false));
  fake.send_task("t-2", PROVIDER, false, chat(false));
  assert_eq!(fake.result("t-2").await.body["status"], json!(200));
  // The re-sent t-1 came before t-2 on the channel, so it was handled; t-2's
  // answer is posted before it ends.
  tasks_ended(&rig, 0).await;
  assert_eq!(provider.calls(), ["t-1", "t-2"]);
  assert_eq!(fake.posts_for("t-1").len(), 1);
  rig.stop().await;
}

/// WHATWG: dispatch copies the `id:` to the event source even when the frame
/// has no data, and an empty `id:` resets it (then no `Last-Event-ID` is sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_sends_the_whatwg_last_event_id() {
  let cases = [
    (
      "idonly",
      "id: ev-1\nevent: ping\ndata: x\n\nid: ev-2\n\n",
      Some("ev-2"),
    ),
    (
      "idreset",
      "id: ev-1\nevent: ping\ndata: x\n\nid\nevent: ping\ndata: y\n\n",
      None,
    ),
  ];
  for (name, frames, expected) in cases {
    let provider = MockProvider::answering(hello());
    let rig = Rig::one(name, &provider, roomy()).await;
    rig.fake.push(frames);
    rig.fake.drop_stream();
    rig.fake.wait_stream(2).await;
    let second = rig.fake.of(Route::Stream).remove(1);
    assert_eq!(second.header("last-event-id"), expected, "{name}");
    rig.stop().await;
  }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_means_unauthorized() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::idle_one("unauthorized", &provider).await;
  rig.fake.script(Route::Stream, [Answer::Status(401)]);
  rig.registrar.start().await.expect("start");
  wait_for("unauthorized", WAIT, || {
    rig.states.lock().contains(&RegistrarState::Unauthorized)
  })
  .await;
  let error = rig.registrar.status().last_error.expect("last error");
  assert!(error.contains("401"), "{error}");
  assert!(!error.contains(TOKEN), "{error}");
  // At the maximum backoff (100 ms here) it tries again, and mcpd takes it back.
  rig.fake.wait_stream(1).await;
  rig.wait_state(RegistrarState::Connected).await;
  assert_eq!(rig.fake.count(Route::Register), 1);
  rig.stop().await;

  // A refused register: start() fails naming the status, state unauthorized.
  let fake = FakeMcpd::start().await;
  let dir = TempDir::new("unauthorized-register");
  fake.script(Route::Register, [Answer::Status(403)]);
  let (refused, _) = registrar_again(&fake, &dir, &provider);
  let error = refused
    .start()
    .await
    .expect_err("register refused")
    .to_string();
  assert!(error.contains("403"), "{error}");
  assert_eq!(refused.status().state, RegistrarState::Unauthorized);
  assert!(!dir.path().join("provider-session").exists());
  refused.stop().await;
}

// ---------------------------------------------------------- delivery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_post_is_retried_on_503() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("retry", &provider, roomy()).await;
  rig
    .fake
    .script(Route::Result, [Answer::Status(503), Answer::Status(503)]);
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("three result POSTs", WAIT, || {
    rig.fake.for_task(Route::Result, "t-1").len() == 3
  })
  .await;
  let posts = rig.fake.for_task(Route::Result, "t-1");
  let statuses: Vec<u16> = posts.iter().map(|p| p.status).collect();
  assert_eq!(statuses, [503, 503, 200]);
  assert!(posts.iter().all(|p| p.body == posts[0].body));
  assert_eq!(
    posts[2].body["body"]["choices"][0]["message"]["content"],
    json!("hello")
  );
  // Delivered on the third POST: the task ends, so no fourth can follow.
  tasks_ended(&rig, 0).await;
  assert_eq!(rig.fake.for_task(Route::Result, "t-1").len(), 3);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_post_404_is_given_up_quietly() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("gone", &provider, roomy()).await;
  rig.fake.script(Route::Result, [Answer::Status(404)]);
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  rig.fake.result("t-1").await;
  // A delivery that retried would keep the task live through its pause; it
  // ended, so no retry comes.
  tasks_ended(&rig, 0).await;
  assert_eq!(rig.fake.for_task(Route::Result, "t-1").len(), 1);
  assert_eq!(rig.registrar.status().state, RegistrarState::Connected);
  assert_eq!(rig.fake.streams_opened(), 1);
  rig.fake.send_task("t-2", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-2").await.status, 200);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_post_lost_on_the_wire_is_retried_with_the_same_seq() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("chunkdrop", &provider, roomy()).await;
  rig.fake.script(Route::Chunks, [Answer::Drop]);
  rig.fake.send_task("t-1", PROVIDER, true, chat(true));
  let payloads = rig.fake.done("t-1").await;
  let posts = rig.fake.for_task(Route::Chunks, "t-1");
  assert_eq!(posts[0].status, 0, "the first POST was dropped");
  assert_eq!(posts[1].status, 200);
  assert_eq!(posts[0].body, posts[1].body, "the retry repeats the POST");
  assert_eq!(payloads_in_seq_order(&posts), payloads);
  assert_eq!(payloads.len(), 4);
  rig.stop().await;
}

// ------------------------------------------------- the engine (issue 6)

/// When stop() resolves, nothing of the registrar is in flight or will be
/// sent, even while mcpd keeps failing result POSTs with 503 (the retry loop
/// stops on the root token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_arrives_after_stop_resolved_while_results_keep_failing() {
  let answering = MockProvider::answering(hello());
  let hanging = MockProvider::hanging();
  let rig = Rig::connected(
    "stopquiet",
    vec![
      published("fast", Arc::clone(&answering)),
      published("slow", Arc::clone(&hanging)),
    ],
    roomy(),
  )
  .await;
  let fake = &rig.fake;
  fake.always(Route::Result, 503);
  fake.send_task("t-retrying", "fast", false, chat(false));
  fake.send_task("t-running", "slow", false, chat(false));
  wait_for("the result retried", WAIT, || {
    fake.for_task(Route::Result, "t-retrying").len() >= 2
  })
  .await;
  wait_for("t-running running", WAIT, || hanging.calls().len() == 1).await;

  let stopping = Instant::now();
  rig.registrar.stop().await;
  let stopped = Instant::now();
  // Instead of a pause longer than several retry pauses: when stop() returns,
  // the registrar owns no task (the retrying delivery included), and every
  // request of this registrar is sent from one of them, so none can come
  // later. Not exact only for bytes already handed to the kernel by a
  // request stop() dropped, which the graceful stop here never does.
  assert_eq!(rig.registrar.owned_tasks(), 0, "tasks alive after stop()");
  let requests = fake.requests();
  let late: Vec<_> = requests
    .iter()
    .filter(|request| request.at > stopped)
    .map(|request| (request.route, request.path.clone()))
    .collect();
  assert!(late.is_empty(), "requests after stop() resolved: {late:?}");
  let last = requests.iter().map(|request| request.at).max().unwrap();
  eprintln!(
    "stop() took {:?}; its last request arrived {:?} after stop() was called",
    stopped - stopping,
    last.saturating_duration_since(stopping)
  );
  // The running task was answered 503 once, and not retried.
  let answers = fake.for_task(Route::Result, "t-running");
  assert_eq!(answers.len(), 1, "{answers:?}");
  assert_eq!(
    error_of(&answers[0]),
    (503, "unavailable".into(), "unavailable".into())
  );
  assert_eq!(
    hanging.aborts(),
    [("t-running".to_owned(), AbortReason::Stopping)]
  );
  let status = rig.registrar.status();
  assert_eq!(status.state, RegistrarState::Stopped);
  assert_eq!((status.in_flight, status.queued), (0, 0));
  assert_eq!(status.completed + status.failed + status.cancelled, 2);
  // The registrar dropped the channel before stop() returned; the fake sees the
  // close when its writer next fails, which may come a moment later.
  wait_for("the channel closed", WAIT, || !fake.stream_is_open(0)).await;
}

/// The provider's signal says which ending won: cancel, stop and timeout have
/// their own tests above; a provider failure mid-stream and a relay mcpd gave
/// up on are told apart here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_abort_reason_tells_failure_and_relay_gone_apart() {
  let failing = MockProvider::streaming(2, Duration::ZERO, Some("broke"));
  let endless = MockProvider::streaming(100_000, Duration::from_millis(5), None);
  let rig = Rig::connected(
    "reasons",
    vec![
      published("failing", Arc::clone(&failing)),
      published("endless", Arc::clone(&endless)),
    ],
    roomy(),
  )
  .await;
  rig.fake.send_task("t-fail", "failing", true, chat(true));
  rig.fake.done("t-fail").await;
  wait_for("the failure's abort", WAIT, || !failing.aborts().is_empty()).await;
  assert_eq!(
    failing.aborts(),
    [("t-fail".to_owned(), AbortReason::Failed)]
  );

  // mcpd forgets the streaming task: its chunk POSTs are answered 404.
  rig.fake.always(Route::Chunks, 404);
  rig.fake.send_task("t-gone", "endless", true, chat(true));
  wait_for("the relay gone", WAIT, || !endless.aborts().is_empty()).await;
  assert_eq!(
    endless.aborts(),
    [("t-gone".to_owned(), AbortReason::Abandoned)]
  );
  wait_for("both failed", WAIT, || rig.registrar.status().failed == 2).await;
  assert!(rig.fake.for_task(Route::Result, "t-gone").is_empty());
  rig.stop().await;
}

/// received = completed + failed + cancelled + in flight + queued, with one
/// task in each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counters_add_up() {
  let fast = MockProvider::answering(hello());
  let slow = MockProvider::hanging();
  let rig = Rig::connected(
    "counters",
    vec![
      published("fast", Arc::clone(&fast)),
      published("slow", Arc::clone(&slow)),
    ],
    dispatch(1, 4, Duration::from_secs(10)),
  )
  .await;
  let fake = &rig.fake;
  fake.send_task("t-done", "fast", false, chat(false));
  fake.send_task("t-404", "nope", false, chat(false));
  fake.send_task("t-running", "slow", false, chat(false));
  fake.send_task("t-queued", "slow", false, chat(false));
  fake.send_task("t-cancelled", "slow", false, chat(false));
  wait_for("two queued", WAIT, || rig.registrar.status().queued == 2).await;
  fake.cancel("t-cancelled");
  let expected = |status: &mcpctl_registrar::registrar::RegistrarStatus| {
    (
      status.completed,
      status.failed,
      status.cancelled,
      status.in_flight,
      status.queued,
    ) == (1, 1, 1, 1, 1)
  };
  wait_for("one task in each counter", WAIT, || {
    expected(&rig.registrar.status())
  })
  .await;
  let status = rig.registrar.status();
  let sum = status.completed
    + status.failed
    + status.cancelled
    + u64::from(status.in_flight)
    + u64::from(status.queued);
  assert_eq!(sum, 5, "{status:?}");
  assert!(fake.posts_for("t-cancelled").is_empty());
  rig.registrar.stop().await;
  // After stop: the running and queued tasks were answered 503 (failed).
  let status = rig.registrar.status();
  assert_eq!(
    (
      status.completed,
      status.failed,
      status.cancelled,
      status.in_flight,
      status.queued
    ),
    (1, 3, 1, 0, 0)
  );
  let json = serde_json::to_value(&status).unwrap();
  assert_eq!(json["cancelled"], json!(1), "serialized camelCase: {json}");
}

/// A cancel at any moment after the task frame (queued, just admitted, while
/// the provider call is being made) ends the task exactly: the provider is
/// told for every call that was made, nothing is posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_the_start_of_tasks_are_exact() {
  let provider = MockProvider::hanging();
  let rig = Rig::one(
    "cancelrace",
    &provider,
    dispatch(3, 64, Duration::from_secs(10)),
  )
  .await;
  let tasks = 40;
  for i in 0..tasks {
    let id = format!("t-{i}");
    let task =
      json!({ "taskId": id, "provider": PROVIDER, "stream": i % 2 == 0, "body": chat(i % 2 == 0) });
    // Task and cancel in one write, or the cancel a little later.
    let cancel = json!({ "taskId": id });
    if i % 3 == 0 {
      rig.fake.push(format!(
        "event: task\ndata: {task}\n\nevent: cancel\ndata: {cancel}\n\n"
      ));
    } else {
      rig.fake.push(format!("event: task\ndata: {task}\n\n"));
      tokio::time::sleep(Duration::from_millis(i % 5)).await;
      rig.fake.cancel(&id);
    }
  }
  wait_for("every task cancelled", WAIT, || {
    rig.registrar.status().cancelled == tasks
  })
  .await;
  let aborts = provider.aborts();
  for call in provider.calls() {
    assert!(
      aborts.contains(&(call.clone(), AbortReason::Cancelled)),
      "{call} was called but never aborted: {aborts:?}"
    );
  }
  assert_eq!(aborts.len(), provider.calls().len(), "{aborts:?}");
  // Each task is counted cancelled as it ends; none is live, none can post.
  tasks_ended(&rig, 0).await;
  let posted: Vec<_> = rig
    .fake
    .requests()
    .into_iter()
    .filter_map(|request| request.task_id)
    .collect();
  assert!(posted.is_empty(), "{posted:?}");
  let status = rig.registrar.status();
  assert_eq!((status.in_flight, status.queued, status.failed), (0, 0, 0));
  rig.stop().await;
}

// ------------------------------------------------- hardening (issue 8)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_task_ids_are_never_run_posted_or_remembered() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("refused", &provider, roomy()).await;
  let long = "x".repeat(257);
  let multibyte_over = format!("{}a", "é".repeat(128));
  for id in ["", ".", "..", long.as_str(), multibyte_over.as_str()] {
    rig.fake.send_task(id, PROVIDER, false, chat(false));
    rig.fake.send_task(id, PROVIDER, true, chat(true));
  }
  // A malformed frame whose id is refused is refused too, not answered 400.
  rig
    .fake
    .send("task", &json!({ "taskId": "..", "stream": "yes" }));
  // At the edge: 256 bytes (128 two-byte characters) is a fine id.
  let edge = "é".repeat(128);
  rig.fake.send_task(&edge, PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result(&edge).await.body["status"], json!(200));
  wait_for("the edge task counted", WAIT, || {
    rig.registrar.status().completed == 1
  })
  .await;
  // The edge task came after every refused frame on the channel, so they were
  // all handled before its answer; refused ids never become tasks at all.
  tasks_ended(&rig, 0).await;
  assert_eq!(provider.calls(), vec![edge.clone()]);
  let posted: Vec<_> = rig
    .fake
    .requests()
    .into_iter()
    .filter(|request| {
      request.route != Route::Heartbeat
        && request.route != Route::Register
        && request.route != Route::Stream
    })
    .map(|request| request.path)
    .collect();
  assert_eq!(posted.len(), 1, "{posted:?}");
  assert_eq!(
    rig.registrar.remembered_task_ids(),
    1,
    "only the edge id is remembered"
  );
  let status = rig.registrar.status();
  assert_eq!(
    (status.completed, status.failed, status.cancelled),
    (1, 0, 0)
  );
  rig.stop().await;
}

/// A task frame nested 10,000 deep, in `body` or in a message's content, is
/// answered 400 with its task id; the registrar goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_bodies_are_answered_400() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("deep", &provider, roomy()).await;
  let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
  let frames = [
    (
      "t-body",
      format!(r#"{{"taskId":"t-body","provider":"{PROVIDER}","stream":false,"body":{deep}}}"#),
    ),
    (
      "t-content",
      format!(
        r#"{{"taskId":"t-content","provider":"{PROVIDER}","stream":true,"body":{{"model":"m","messages":[{{"role":"user","content":{deep}}}]}}}}"#
      ),
    ),
    (
      "t-stream",
      format!(r#"{{"taskId":"t-stream","stream":{deep}}}"#),
    ),
  ];
  for (_, frame) in &frames {
    rig.fake.push(format!("event: task\ndata: {frame}\n\n"));
  }
  // A frame whose taskId cannot be read is dropped.
  rig
    .fake
    .push(format!("event: task\ndata: {{\"taskId\":{deep}}}\n\n"));
  for (task, _) in &frames {
    let result = rig.fake.result(task).await;
    assert_eq!(
      error_of(&result),
      (
        400,
        "invalid_request_error".into(),
        "invalid_request".into()
      ),
      "{task}"
    );
  }
  rig.fake.send_task("t-after", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-after").await.body["status"], json!(200));
  assert_eq!(provider.calls(), ["t-after"]);
  assert_eq!(rig.fake.streams_opened(), 1, "the channel stayed up");
  rig.stop().await;
}

// ------------------------------------------------------------- the core

/// index.d.ts `CompletionOptions.model`: `options.model` is the entry's configured model (absent when it
/// has none), never the virtual LLM's name; `options.request.model` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_gets_the_configured_model() {
  let configured = MockProvider::answering(hello());
  let bare = MockProvider::answering(hello());
  let mut unconfigured = published("bare", Arc::clone(&bare));
  unconfigured.descriptor.model = None;
  let rig = Rig::connected(
    "model",
    vec![published(PROVIDER, Arc::clone(&configured)), unconfigured],
    roomy(),
  )
  .await;
  let mut body = chat(false);
  body["model"] = json!("virtual-name");
  rig.fake.send_task("t-1", PROVIDER, false, body.clone());
  rig.fake.send_task("t-2", "bare", false, body);
  rig.fake.result("t-1").await;
  rig.fake.result("t-2").await;
  let options = configured.call(0).options;
  assert_eq!(options["model"], json!(MODEL));
  assert_eq!(options["request"]["model"], json!("virtual-name"));
  let options = bare.call(0).options;
  assert!(options.get("model").is_none(), "{options}");
  assert_eq!(options["request"]["model"], json!("virtual-name"));
  rig.stop().await;
}

/// `options.request` is the body's text as mcpd sent it, byte for byte: its
/// spacing, its keys' order, its numbers and escapes as written, a key the
/// registrar does not know; the typed fields beside it are read from it.
#[tokio::test]
async fn the_request_reaches_the_provider_as_mcpd_wrote_it() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::connected(
    "model",
    vec![published(PROVIDER, Arc::clone(&provider))],
    roomy(),
  )
  .await;
  let sent = r#"{ "stream":false, "vendor_x": {"z": 1, "a": [1.50, 1e2]}, "temperature": 0.50,
    "messages": [ {"content": "hi é", "role": "user"} ], "model": "virtual-name" }"#;
  rig.fake.push(format!(
    "event: task\ndata: {{\"taskId\":\"t-raw\",\"provider\":\"{PROVIDER}\",\"body\":{}}}\n\n",
    sent.replace('\n', " ")
  ));
  rig.fake.result("t-raw").await;
  let text = provider.options_text(0);
  let expected_tail = format!(r#""request":{}}}"#, sent.replace('\n', " "));
  assert!(text.ends_with(&expected_tail), "{text}");
  let options = provider.call(0).options;
  assert_eq!(options["temperature"], json!(0.5));
  assert_eq!(
    options["messages"],
    json!([{ "role": "user", "content": "hi é" }])
  );
  rig.stop().await;
}

/// start() resolves once the channel is open, so a task sent right after it
/// is run, even when the first connect failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_resolves_once_the_channel_is_open() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::idle_one("startopen", &provider).await;
  rig.fake.script(Route::Stream, [Answer::Status(503)]);
  rig.registrar.start().await.expect("start");
  assert_eq!(rig.registrar.status().state, RegistrarState::Connected);
  rig.fake.send_task("t-1", PROVIDER, false, chat(false));
  assert_eq!(rig.fake.result("t-1").await.body["status"], json!(200));
  assert_eq!(
    rig
      .fake
      .of(Route::Stream)
      .iter()
      .map(|s| s.status)
      .collect::<Vec<_>>(),
    [503, 200]
  );
  rig.stop().await;
}

// ---------------------------------------------------------------- update

fn names_of(value: &Value) -> Vec<String> {
  value
    .as_array()
    .expect("a provider list")
    .iter()
    .map(|p| p["name"].as_str().expect("a name").to_owned())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_registers_the_whole_set_under_the_same_session_id_with_the_channel_open() {
  let first = MockProvider::answering(hello());
  let rig = Rig::one("update-add", &first, roomy()).await;
  let fake = &rig.fake;
  let id = rig.registrar.status().provider_session_id.expect("an id");
  let second = MockProvider::answering(json!({ "content": "from second" }));
  rig
    .registrar
    .update(vec![
      published(PROVIDER, Arc::clone(&first)),
      published("second", Arc::clone(&second)),
    ])
    .await
    .expect("update");

  let registers = fake.of(Route::Register);
  assert_eq!(registers.len(), 2);
  let last = &registers[1];
  assert_eq!(last.body["providerSessionId"], json!(id));
  assert_eq!(last.header("x-mcpctl-provider-session"), Some(id.as_str()));
  assert_eq!(names_of(&last.body["providers"]), [PROVIDER, "second"]);
  assert_eq!(last.body["providers"][1]["model"], json!(MODEL));
  let status = rig.registrar.status();
  assert_eq!(status.providers, [PROVIDER, "second"]);
  assert_eq!(status.provider_session_id.as_deref(), Some(id.as_str()));
  assert_eq!(status.state, RegistrarState::Connected);
  assert_eq!(fake.streams_opened(), 1, "the channel stayed open");

  fake.send_task("t-new", "second", false, chat(false));
  let answer = fake.result("t-new").await;
  assert_eq!(answer.body["status"], json!(200));
  assert_eq!(
    answer.body["body"]["choices"][0]["message"]["content"],
    json!("from second")
  );
  assert_eq!(second.calls(), ["t-new"]);
  // The heartbeat reports the new set from then on.
  let both = |beat: &Request| names_of(&beat.body["providers"]) == [PROVIDER, "second"];
  wait_for("a heartbeat with both providers", WAIT, || {
    fake.of(Route::Heartbeat).iter().any(both)
  })
  .await;
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_left_finishes_its_task_and_later_ones_are_404() {
  let leaving = MockProvider::gated(hello());
  let staying = MockProvider::answering(hello());
  let rig = Rig::connected(
    "update-remove",
    vec![
      published("leaving", Arc::clone(&leaving)),
      published("staying", Arc::clone(&staying)),
    ],
    roomy(),
  )
  .await;
  let fake = &rig.fake;
  fake.send_task("t-1", "leaving", false, chat(false));
  wait_for("the call in flight", WAIT, || leaving.calls().len() == 1).await;
  rig
    .registrar
    .update(vec![published("staying", Arc::clone(&staying))])
    .await
    .expect("update");
  assert_eq!(rig.registrar.status().providers, ["staying"]);
  assert_eq!(rig.registrar.status().in_flight, 1);

  // A task for it that was already on its way when mcpd changed the set.
  fake.send_task("t-2", "leaving", false, chat(false));
  let refused = fake.result("t-2").await;
  assert_eq!(
    error_of(&refused),
    (
      404,
      "invalid_request_error".into(),
      "model_not_found".into()
    )
  );
  assert_eq!(leaving.calls(), ["t-1"], "not run");

  leaving.release(1);
  let done = fake.result("t-1").await;
  assert_eq!(done.body["status"], json!(200));
  assert!(leaving.aborts().is_empty(), "{:?}", leaving.aborts());
  let fresh = |beat: &Request| names_of(&beat.body["providers"]) == ["staying"];
  wait_for("a heartbeat without the provider that left", WAIT, || {
    fake.of(Route::Heartbeat).iter().any(fresh)
  })
  .await;
  // The fake has the result when it is posted; the task counts as completed once
  // the POST is answered, a moment later.
  let counters = || {
    let status = rig.registrar.status();
    (
      status.completed,
      status.failed,
      status.in_flight,
      status.queued,
    )
  };
  wait_for("the task counted as completed", WAIT, || {
    counters() == (1, 1, 0, 0)
  })
  .await;
  rig.stop().await;
}

/// A kept name keeps its lane: its slots stay shared with the tasks in flight,
/// and later tasks run with its new entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_name_keeps_its_slots_and_takes_its_new_entry() {
  let old = MockProvider::gated(hello());
  let rig = Rig::connected(
    "update-keep",
    vec![published(PROVIDER, Arc::clone(&old))],
    dispatch(1, 4, Duration::from_secs(10)),
  )
  .await;
  let fake = &rig.fake;
  fake.send_task("t-1", PROVIDER, false, chat(false));
  wait_for("the call in flight", WAIT, || old.calls().len() == 1).await;
  let new = MockProvider::answering(hello());
  let mut entry = published(PROVIDER, Arc::clone(&new));
  entry.descriptor.model = Some("new-model".to_owned());
  rig.registrar.update(vec![entry]).await.expect("update");
  // One slot, still held by t-1: t-2 waits in the same queue.
  fake.send_task("t-2", PROVIDER, false, chat(false));
  wait_for("t-2 queued", WAIT, || rig.registrar.status().queued == 1).await;
  assert!(new.calls().is_empty());
  old.release(1);
  assert_eq!(fake.result("t-1").await.body["status"], json!(200));
  assert_eq!(fake.result("t-2").await.body["status"], json!(200));
  assert_eq!(new.calls(), ["t-2"]);
  assert_eq!(new.call(0).options["model"], json!("new-model"));
  rig.stop().await;
}

/// A failed update register is retried with backoff; the old set stays
/// published and served meanwhile. Real time: with real sockets a paused
/// clock runs ahead while I/O is pending, so only lower bounds are checked
/// (load can only make the gaps longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_update_register_is_retried_with_backoff_and_the_old_set_served() {
  let fake = FakeMcpd::start().await;
  let dir = TempDir::new("update-retry");
  let first = MockProvider::answering(hello());
  let providers = vec![published(PROVIDER, Arc::clone(&first))];
  let config = RegistrarConfig {
    backoff: BackoffPolicy {
      initial: Duration::from_millis(200),
      max: Duration::from_secs(60),
    },
    dispatch: roomy(),
    ..registrar_config(&fake.url, TOKEN, providers, dir.path())
  };
  let registrar =
    Arc::new(Registrar::new(config, None, tracing::Span::none()).expect("valid config"));
  registrar.start().await.expect("start");
  fake.wait_stream(1).await;
  fake.script(Route::Register, [Answer::Status(503), Answer::Status(503)]);
  let second = MockProvider::answering(hello());
  let started = Instant::now();
  let updating = tokio::spawn({
    let registrar = Arc::clone(&registrar);
    let set = vec![
      published(PROVIDER, Arc::clone(&first)),
      published("second", Arc::clone(&second)),
    ];
    async move { registrar.update(set).await }
  });
  // The fake counts a register as it answers it; the registrar records the 503 after.
  wait_for("the first update register's 503", WAIT, || {
    registrar
      .status()
      .last_error
      .is_some_and(|e| e.contains("503"))
  })
  .await;
  // Meanwhile the old set is what status reports and what is served.
  let status = registrar.status();
  assert_eq!(status.providers, [PROVIDER]);
  assert_eq!(status.state, RegistrarState::Connected);
  fake.send_task("t-old", PROVIDER, false, chat(false));
  assert_eq!(fake.result("t-old").await.body["status"], json!(200));

  updating.await.expect("joined").expect("update");
  let took = started.elapsed();
  // Two failures: 200 ms then 400 ms, each jittered by at most 10%.
  assert!(took >= Duration::from_millis(540), "took {took:?}");
  let registers = fake.of(Route::Register);
  assert_eq!(
    registers.iter().map(|r| r.status).collect::<Vec<_>>(),
    [201, 503, 503, 201]
  );
  for register in &registers[1..] {
    assert_eq!(names_of(&register.body["providers"]), [PROVIDER, "second"]);
  }
  assert_eq!(registrar.status().providers, [PROVIDER, "second"]);
  assert_eq!(fake.streams_opened(), 1);
  registrar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_before_start_replaces_the_set_start_registers() {
  let old = MockProvider::answering(hello());
  let new = MockProvider::answering(hello());
  let rig = Rig::idle(
    "update-idle",
    vec![published("old", Arc::clone(&old))],
    roomy(),
  )
  .await;
  rig
    .registrar
    .update(vec![published("new", Arc::clone(&new))])
    .await
    .expect("update");
  assert_eq!(rig.fake.count(Route::Register), 0);
  assert_eq!(rig.registrar.status().providers, ["new"]);
  rig.registrar.start().await.expect("start");
  let register = rig.fake.of(Route::Register).remove(0);
  assert_eq!(names_of(&register.body["providers"]), ["new"]);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_the_last_wins_and_all_resolve() {
  let a = MockProvider::answering(hello());
  let rig = Rig::one("update-race", &a, roomy()).await;
  rig.fake.delay(Route::Register, Duration::from_millis(100));
  let set = |extra: &str| {
    vec![
      published(PROVIDER, Arc::clone(&a)),
      published(extra, MockProvider::answering(hello())),
    ]
  };
  let (first, second) = tokio::join!(
    rig.registrar.update(set("b")),
    rig.registrar.update(set("c"))
  );
  first.expect("the earlier update resolves");
  second.expect("the last update resolves");
  assert_eq!(rig.registrar.status().providers, [PROVIDER, "c"]);
  let last = rig.fake.of(Route::Register).pop().unwrap();
  assert_eq!(names_of(&last.body["providers"]), [PROVIDER, "c"]);
  rig.fake.send_task("t-b", "b", false, chat(false));
  assert_eq!(error_of(&rig.fake.result("t-b").await).0, 404);
  rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_refuses_bad_sets_and_stops_with_the_registrar() {
  let a = MockProvider::answering(hello());
  let rig = Rig::one("update-refuse", &a, roomy()).await;
  let empty = rig.registrar.update(Vec::new()).await.unwrap_err();
  assert!(
    matches!(empty, mcpctl_registrar::error::Error::InvalidInput(_)),
    "{empty}"
  );
  let twice = rig
    .registrar
    .update(vec![
      published("x", Arc::clone(&a)),
      published("x", Arc::clone(&a)),
    ])
    .await
    .unwrap_err();
  assert!(twice.to_string().contains("listed twice"), "{twice}");
  assert_eq!(rig.fake.count(Route::Register), 1, "nothing registered");

  // stop() while an update waits for mcpd ends it with Stopped.
  rig.fake.always(Route::Register, 503);
  let registrar = &rig.registrar;
  let waiting = registrar.update(vec![published("y", Arc::clone(&a))]);
  let stopping = async {
    wait_for("an update register", WAIT, || {
      rig.fake.count(Route::Register) >= 2
    })
    .await;
    registrar.stop().await;
  };
  let (waited, ()) = tokio::join!(waiting, stopping);
  assert!(
    matches!(waited, Err(mcpctl_registrar::error::Error::Stopped)),
    "{waited:?}"
  );
  assert_eq!(registrar.status().providers, [PROVIDER]);
  let after = registrar.update(vec![published("z", Arc::clone(&a))]).await;
  assert!(matches!(
    after,
    Err(mcpctl_registrar::error::Error::Stopped)
  ));
}

/// mcpd forgot the session by the time an update registers: the new id is
/// adopted and persisted, and the channel reopened under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_answered_with_a_new_session_id_reopens_the_channel_under_it() {
  let a = MockProvider::answering(hello());
  let rig = Rig::one("update-moved", &a, roomy()).await;
  let fake = &rig.fake;
  fake.next_session_id("ps-moved");
  rig
    .registrar
    .update(vec![
      published(PROVIDER, Arc::clone(&a)),
      published("b", MockProvider::answering(hello())),
    ])
    .await
    .expect("update");
  fake.wait_stream(2).await;
  let streams = fake.of(Route::Stream);
  assert_eq!(
    streams
      .last()
      .unwrap()
      .query
      .get("providerSessionId")
      .map(String::as_str),
    Some("ps-moved")
  );
  rig.wait_state(RegistrarState::Connected).await;
  let status = rig.registrar.status();
  assert_eq!(status.provider_session_id.as_deref(), Some("ps-moved"));
  assert_eq!(status.providers, [PROVIDER, "b"]);
  let stored = std::fs::read_to_string(rig.dir.path().join("provider-session")).unwrap();
  assert!(stored.contains("ps-moved"), "{stored}");
  fake.send_task("t-b", "b", false, chat(false));
  assert_eq!(fake.result("t-b").await.body["status"], json!(200));
  rig.stop().await;
}

// ------------------------------------------------ task ids on the wire

/// A server under `/mcpd` that answers every request with `answer` and reports
/// each request line it received.
async fn request_lines(
  answer: Response,
) -> (McpdServer, tokio::sync::mpsc::UnboundedReceiver<String>) {
  let (lines, received) = tokio::sync::mpsc::unbounded_channel();
  let server = McpdServer::start("/mcpd", move |request| {
    let _ = lines.send(request.line);
    std::future::ready(Reply::Respond(answer.clone()))
  })
  .await;
  (server, received)
}

#[tokio::test]
async fn task_ids_reach_mcpd_as_exactly_one_segment() {
  let (server, mut received) = request_lines(Response::empty(200)).await;
  let client = McpdClient::new(&server.url, Secret::new("sk-unit-token"), false).unwrap();
  let edge_ascii = "x".repeat(256);
  let edge_utf8 = "é".repeat(128);
  assert_eq!(edge_utf8.len(), 256);
  let cases: Vec<(&str, String)> = vec![
    ("t-1_a.b~c", "t-1_a.b~c".into()),
    ("a/b", "a%2Fb".into()),
    ("/", "%2F".into()),
    ("a\\b", "a%5Cb".into()),
    ("a?b=c", "a%3Fb%3Dc".into()),
    ("a#b", "a%23b".into()),
    ("../result", "..%2Fresult".into()),
    ("..\\x", "..%5Cx".into()),
    ("...", "...".into()),
    (".a", ".a".into()),
    ("a.", "a.".into()),
    ("%2E%2E", "%252E%252E".into()),
    ("%2e.", "%252e.".into()),
    ("50%", "50%25".into()),
    ("%", "%25".into()),
    ("a\r\nx-injected: 1", "a%0D%0Ax-injected%3A%201".into()),
    ("tab\there", "tab%09here".into()),
    (
      "sp ace+plus;semi@at:colon",
      "sp%20ace%2Bplus%3Bsemi%40at%3Acolon".into(),
    ),
    ("é", "%C3%A9".into()),
    ("日本", "%E6%97%A5%E6%9C%AC".into()),
    ("\u{1F600}", "%F0%9F%98%80".into()),
    (&edge_ascii, edge_ascii.clone()),
    (&edge_utf8, "%C3%A9".repeat(128)),
  ];
  for (id, encoded) in &cases {
    for endpoint in ["result", "chunks"] {
      let posted = match endpoint {
        "result" => client.post_result(id, 200, &json!({})).await,
        _ => client.post_chunks(id, 0, &[]).await,
      };
      posted.unwrap_or_else(|failure| panic!("{id:?}: {}", failure.error));
      assert_eq!(
        received.recv().await.unwrap(),
        format!("POST /mcpd/api/v1/llms/_provider-tasks/{encoded}/{endpoint} HTTP/1.1"),
        "{id:?}"
      );
    }
  }
  // Ids that cannot be one segment are never sent anywhere, even if they got
  // past the dispatcher: a URL parser would turn them into another endpoint.
  for id in [".", "..", ""] {
    let failure = client.post_result(id, 200, &json!({})).await.unwrap_err();
    assert!(
      failure
        .error
        .to_string()
        .contains("not a usable mcpd endpoint path"),
      "{id:?}: {}",
      failure.error
    );
  }
  // Proof that nothing was posted for them: the next request is the next line.
  client.set_session_id(Some("ps-1".to_owned()));
  client.heartbeat(&[]).await.unwrap();
  assert_eq!(
    received.recv().await.unwrap(),
    "POST /mcpd/api/v1/llms/_provider-heartbeat HTTP/1.1"
  );
}

/// A result or chunk POST answered with a redirect whose Location holds the
/// token fails naming only the target's origin; nothing follows it.
#[tokio::test]
async fn task_posts_refuse_redirects_without_leaking_the_token() {
  let token = "sk-unit-redirect/7";
  let redirect = Response::empty(307).header(
    "location",
    "http://elsewhere.invalid:81/r?t=sk-unit-redirect%2F7",
  );
  let (server, mut received) = request_lines(redirect).await;
  let client = McpdClient::new(&server.url, Secret::new(token), false).unwrap();
  for endpoint in ["result", "chunks"] {
    let posted = match endpoint {
      "result" => client.post_result("t-1", 200, &json!({})).await,
      _ => client.post_chunks("t-1", 0, &[]).await,
    };
    let error = posted.unwrap_err().error;
    let text = describe(&error);
    assert_eq!(error.status(), Some(307));
    assert!(
      text.contains("a redirect to another origin (http://elsewhere.invalid:81)"),
      "{text}"
    );
    assert!(!text.contains("sk-unit-redirect"), "{text}");
    assert!(received.recv().await.unwrap().contains(endpoint));
  }
}

// ---------------------------------------------------------------- trace context

/// mcpd's `traceparent` in a task frame (docs/protocol.md, "Trace context"): the
/// provider gets it as `options.trace`, and every result and chunk POST of the task
/// carries it as a header (no span is recorded by a Rust provider). A malformed one is
/// ignored: the task runs, with neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcpds_traceparent_reaches_the_provider_and_every_post_of_its_task() {
  const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("trace", &provider, roomy()).await;
  let task = |id: &str, stream: bool, traceparent: &str| {
    json!({
      "taskId": id, "provider": PROVIDER, "stream": stream, "body": chat(stream),
      "traceparent": traceparent, "tracestate": "vendor=value",
    })
  };

  rig.fake.send("task", &task("t-1", false, TRACEPARENT));
  let result = rig.fake.result("t-1").await;
  assert_eq!(result.body["status"], json!(200));
  assert_eq!(result.header("traceparent"), Some(TRACEPARENT));
  assert_eq!(
    result.header("tracestate"),
    None,
    "only traceparent is sent"
  );
  assert_eq!(
    provider.call(0).options["trace"],
    json!({ "traceparent": TRACEPARENT, "tracestate": "vendor=value" })
  );

  rig.fake.send("task", &task("t-2", true, TRACEPARENT));
  rig.fake.done("t-2").await;
  let posts = rig.fake.for_task(Route::Chunks, "t-2");
  assert!(!posts.is_empty());
  for post in &posts {
    assert_eq!(post.header("traceparent"), Some(TRACEPARENT));
  }

  let upper = TRACEPARENT.to_uppercase();
  rig.fake.send("task", &task("t-3", false, &upper));
  let result = rig.fake.result("t-3").await;
  assert_eq!(result.body["status"], json!(200), "never refused for it");
  assert_eq!(result.header("traceparent"), None);
  assert_eq!(provider.call(2).options.get("trace"), None);
  rig.stop().await;
}
