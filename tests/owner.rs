//! The owner's controls against the fake mcpd (docs/protocol.md, "Callers and the
//! owner's limits"): the caller handed to the provider, every refusal on the wire
//! (status, type, code, param, headers), the order of the checks, the limits'
//! windows, pause and drain, and usage().

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use mcpctl_registrar::dispatch::{DispatchSettings, PublishedProvider};
use mcpctl_registrar::error::Error;
use mcpctl_registrar::owner::{OwnerPolicy, PublishLimits, RateLimits};
use mcpctl_registrar::registrar::{Registrar, RegistrarConfig};
use mcpctl_registrar::wire::ProviderDescriptor;

use support::provider::{Behavior, MockProvider};
use support::{registrar_config, wait_for, FakeMcpd, Request, Route, TempDir, WAIT};

const PROVIDER: &str = "local-qwen";

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

fn hello() -> Value {
  json!({ "content": "hello", "finishReason": "stop", "usage": { "promptTokens": 3, "completionTokens": 2 } })
}

fn chat() -> Value {
  json!({ "model": PROVIDER, "messages": [{ "role": "user", "content": "hi" }] })
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
    max_concurrency: u32,
    max_queue: u32,
  ) -> Self {
    let fake = FakeMcpd::start().await;
    let dir = TempDir::new(name);
    let config = RegistrarConfig {
      dispatch: DispatchSettings {
        task_timeout: Duration::from_secs(30),
        max_concurrency,
        max_queue,
      },
      ..registrar_config(&fake.url, "sk-owner", providers, dir.path())
    };
    let registrar = Registrar::new(config, None, tracing::Span::none()).expect("valid config");
    registrar.start().await.expect("start");
    fake.wait_stream(1).await;
    Self {
      fake,
      _dir: dir,
      registrar,
    }
  }

  async fn one(name: &str, provider: &Arc<MockProvider>, policy: OwnerPolicy) -> Self {
    Self::connected(name, vec![published(PROVIDER, provider, policy)], 4, 16).await
  }

  /// Sends a task, with `caller` when given (any JSON), and waits for its result POST.
  async fn ask(&self, task_id: &str, caller: Option<Value>, body: Value) -> Request {
    self.send(task_id, caller, body);
    self.fake.result(task_id).await
  }

  /// Waits until `n` tasks have ended (their books are settled once they have).
  async fn ended(&self, n: u64) {
    wait_for("tasks ended", WAIT, || {
      let status = self.registrar.status();
      status.completed + status.failed + status.cancelled == n
    })
    .await;
  }

  fn send(&self, task_id: &str, caller: Option<Value>, body: Value) {
    let mut task =
      json!({ "taskId": task_id, "provider": PROVIDER, "stream": false, "body": body });
    if let Some(caller) = caller {
      task["caller"] = caller;
    }
    self.fake.send("task", &task);
  }
}

/// The refusal's status, body and headers as posted.
fn refusal(post: &Request) -> (u64, &str, &str, Option<&str>, Option<&Value>) {
  let error = &post.body["body"]["error"];
  (
    post.body["status"].as_u64().unwrap(),
    error["type"].as_str().unwrap(),
    error["code"].as_str().unwrap(),
    error["param"].as_str(),
    post.body.get("headers"),
  )
}

fn limits(limits: PublishLimits) -> OwnerPolicy {
  OwnerPolicy {
    allow_callers: None,
    limits,
    ..OwnerPolicy::default()
  }
}

fn rpm(all: Option<u64>) -> RateLimits {
  RateLimits {
    requests_per_minute: all,
    ..RateLimits::default()
  }
}

#[tokio::test]
async fn the_caller_reaches_the_provider_and_a_malformed_one_is_dropped() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("caller", &provider, OwnerPolicy::default()).await;
  let caller =
    json!({ "id": "u-42", "name": "alice@example.com", "groups": ["ml-team"], "extra": 1 });
  let post = rig.ask("t-1", Some(caller), chat()).await;
  assert_eq!(post.body["status"], 200);
  assert!(!post.body.to_string().contains("u-42"), "never sent back");
  assert_eq!(
    provider.call(0).options["caller"],
    json!({ "id": "u-42", "name": "alice@example.com", "groups": ["ml-team"] })
  );
  // Over a bound, or of the wrong type: the task runs as if it had no caller.
  let long = "x".repeat(257);
  for (n, malformed) in [
    json!({ "id": "" }),
    json!({ "id": "u", "name": long }),
    json!({ "id": "u", "groups": "ml-team" }),
    json!("u-42"),
  ]
  .into_iter()
  .enumerate()
  {
    let task_id = format!("t-bad-{n}");
    let post = rig.ask(&task_id, Some(malformed), chat()).await;
    assert_eq!(post.body["status"], 200, "{task_id}");
    assert!(provider.call(n + 1).options.get("caller").is_none());
  }
  rig.registrar.stop().await;
}

#[tokio::test]
async fn every_refusal_is_posted_as_the_protocol_says_and_never_reaches_the_provider() {
  let provider = MockProvider::answering(hello());
  let policy = OwnerPolicy {
    allow_callers: Some(vec!["ml-team".to_owned(), "bob".to_owned()]),
    limits: PublishLimits {
      max_output_tokens: Some(100),
      max_request_bytes: Some(200),
      all: rpm(Some(2)),
      ..PublishLimits::default()
    },
    ..OwnerPolicy::default()
  };
  let rig = Rig::one("refusals", &provider, policy).await;
  let alice = || Some(json!({ "id": "u-1", "groups": ["ml-team"] }));

  let none = rig.ask("t-none", None, chat()).await;
  assert_eq!(
    refusal(&none),
    (403, "permission_denied", "caller_not_allowed", None, None)
  );
  let eve = rig.ask("t-eve", Some(json!({ "id": "eve" })), chat()).await;
  assert_eq!(refusal(&eve).2, "caller_not_allowed");
  assert_eq!(
    eve.body["body"]["error"]["message"],
    "the caller 'eve' is not allowed to use the model 'local-qwen'"
  );

  let mut big = chat();
  big["messages"][0]["content"] = json!("x".repeat(200));
  let large = rig.ask("t-large", alice(), big).await;
  assert_eq!(
    refusal(&large),
    (
      400,
      "invalid_request_error",
      "request_too_large",
      None,
      None
    )
  );

  let mut many = chat();
  many["max_tokens"] = json!(101);
  let over = rig.ask("t-max", alice(), many.clone()).await;
  assert_eq!(
    refusal(&over),
    (
      400,
      "invalid_request_error",
      "max_tokens_exceeded",
      Some("max_tokens"),
      None
    )
  );
  // max_completion_tokens is the one checked when both are sent.
  many["max_tokens"] = json!(50);
  many["max_completion_tokens"] = json!(150);
  let both = rig.ask("t-both", alice(), many).await;
  assert_eq!(refusal(&both).3, Some("max_completion_tokens"));
  assert!(
    provider.calls().is_empty(),
    "no refused task reached the provider"
  );

  // Two requests a minute: the third is refused with retry-after.
  for n in 0..2 {
    let post = rig.ask(&format!("t-ok-{n}"), alice(), chat()).await;
    assert_eq!(post.body["status"], 200);
  }
  // A request asking for no max_tokens got the owner's cap, in both places.
  let options = &provider.call(0).options;
  assert_eq!(options["maxTokens"], 100);
  assert_eq!(options["request"]["max_tokens"], 100);
  let limited = rig.ask("t-429", alice(), chat()).await;
  let (status, kind, code, param, headers) = refusal(&limited);
  assert_eq!(
    (status, kind, code, param),
    (429, "rate_limit_exceeded", "requests_per_minute", None)
  );
  let retry: u64 = headers.expect("retry-after")["retry-after"]
    .as_str()
    .unwrap()
    .parse()
    .unwrap();
  assert!((1..=60).contains(&retry), "{retry}");
  assert_eq!(provider.calls().len(), 2);

  // Paused: 503, no retry-after.
  rig.registrar.pause(None, false).await.unwrap();
  let paused = rig.ask("t-paused", alice(), chat()).await;
  assert_eq!(
    refusal(&paused),
    (503, "unavailable", "provider_paused", None, None)
  );

  rig.ended(9).await;
  let status = rig.registrar.status();
  assert_eq!((status.completed, status.failed), (2, 7));
  let usage = rig.registrar.usage();
  let tally = usage.providers[PROVIDER];
  assert_eq!(
    (tally.tasks, tally.prompt_tokens, tally.completion_tokens),
    (2, 6, 4)
  );
  let refused: Vec<(&str, u64)> = tally.refusals().filter(|(_, n)| *n > 0).collect();
  assert_eq!(
    refused,
    [
      ("caller_not_allowed", 2),
      ("requests_per_minute", 1),
      ("max_tokens_exceeded", 2),
      ("request_too_large", 1),
      ("provider_paused", 1),
    ]
  );
  assert_eq!(usage.callers["u-1"].tasks, 2);
  assert_eq!(usage.callers["eve"].refused[0], 1);
  rig.registrar.stop().await;
}

#[tokio::test]
async fn the_checks_run_in_the_protocols_order() {
  let provider = MockProvider::answering(hello());
  let policy = OwnerPolicy {
    allow_callers: Some(vec!["alice".to_owned()]),
    limits: PublishLimits {
      max_output_tokens: Some(10),
      max_request_bytes: Some(150),
      all: rpm(Some(1)),
      ..PublishLimits::default()
    },
    ..OwnerPolicy::default()
  };
  // One slot, no queue: the concurrency check comes last.
  let rig = Rig::connected("order", vec![published(PROVIDER, &provider, policy)], 1, 0).await;
  let alice = || Some(json!({ "id": "alice" }));
  let huge = json!({ "messages": "x".repeat(200), "max_tokens": 500 });
  let code = |post: Request| {
    post.body["body"]["error"]["code"]
      .as_str()
      .unwrap()
      .to_owned()
  };
  // Unknown provider first, whatever else is wrong.
  rig.fake.send(
    "task",
    &json!({ "taskId": "t-404", "provider": "nope", "body": huge }),
  );
  assert_eq!(code(rig.fake.result("t-404").await), "model_not_found");
  rig.registrar.pause(None, false).await.unwrap();
  assert_eq!(
    code(rig.ask("t-a", None, huge.clone()).await),
    "caller_not_allowed"
  );
  assert_eq!(
    code(rig.ask("t-b", alice(), huge.clone()).await),
    "provider_paused"
  );
  rig.registrar.resume(None).unwrap();
  assert_eq!(
    code(rig.ask("t-c", alice(), huge).await),
    "request_too_large"
  );
  let invalid = json!({ "messages": "not a list", "max_tokens": 500 });
  assert_eq!(
    code(rig.ask("t-d", alice(), invalid).await),
    "invalid_request"
  );
  let mut asks_much = chat();
  asks_much["max_tokens"] = json!(11);
  assert_eq!(
    code(rig.ask("t-e", alice(), asks_much).await),
    "max_tokens_exceeded"
  );
  assert_eq!(rig.ask("t-f", alice(), chat()).await.body["status"], 200);
  assert_eq!(
    code(rig.ask("t-g", alice(), chat()).await),
    "requests_per_minute"
  );
  assert_eq!(provider.calls().len(), 1);
  rig.registrar.stop().await;
}

#[tokio::test]
async fn tokens_are_charged_when_the_task_ends_from_usage_or_the_estimate() {
  // Reports 3 + 2 tokens; then none: "hello" (5 chars) → 2, "hi" (2 chars) → 1.
  let provider = MockProvider::new(
    false,
    vec![
      Behavior::Answer(hello()),
      Behavior::Answer(json!({ "content": "hello" })),
    ],
  );
  let policy = limits(PublishLimits {
    all: RateLimits {
      tokens_per_minute: Some(8),
      ..RateLimits::default()
    },
    ..PublishLimits::default()
  });
  let rig = Rig::one("tokens", &provider, policy).await;
  assert_eq!(rig.ask("t-1", None, chat()).await.body["status"], 200);
  assert_eq!(rig.ask("t-2", None, chat()).await.body["status"], 200);
  rig.ended(2).await;
  let usage = rig.registrar.usage().providers[PROVIDER];
  assert_eq!(
    (usage.prompt_tokens, usage.completion_tokens),
    (3 + 1, 2 + 2)
  );
  // 5 + 3 = 8 tokens in the minute: full.
  let post = rig.ask("t-3", None, chat()).await;
  assert_eq!(refusal(&post).2, "tokens_per_minute");
  assert_eq!(provider.calls().len(), 2);
  rig.registrar.stop().await;
}

#[tokio::test]
async fn per_caller_limits_apply_to_each_caller_and_only_to_tasks_with_one() {
  let provider = MockProvider::answering(hello());
  let policy = limits(PublishLimits {
    per_caller: RateLimits {
      requests_per_minute: Some(1),
      ..RateLimits::default()
    },
    ..PublishLimits::default()
  });
  let rig = Rig::one("per-caller", &provider, policy).await;
  let who = |id: &str| Some(json!({ "id": id }));
  assert_eq!(rig.ask("t-a1", who("a"), chat()).await.body["status"], 200);
  assert_eq!(rig.ask("t-b1", who("b"), chat()).await.body["status"], 200);
  let again = rig.ask("t-a2", who("a"), chat()).await;
  assert_eq!(refusal(&again).2, "requests_per_minute");
  assert!(again.body["headers"]["retry-after"].is_string());
  for n in 0..3 {
    let post = rig.ask(&format!("t-anon-{n}"), None, chat()).await;
    assert_eq!(post.body["status"], 200);
  }
  rig.registrar.stop().await;
}

#[tokio::test]
async fn a_drain_resolves_once_the_two_running_and_three_queued_ended_and_later_tasks_get_503() {
  let provider = MockProvider::gated(hello());
  let rig = Rig::connected(
    "drain",
    vec![published(PROVIDER, &provider, OwnerPolicy::default())],
    2,
    3,
  )
  .await;
  for n in 0..5 {
    rig.send(&format!("t-{n}"), None, chat());
  }
  wait_for("2 running, 3 queued", WAIT, || {
    let status = rig.registrar.status();
    (status.in_flight, status.queued) == (2, 3)
  })
  .await;
  let drain = tokio::spawn(rig.registrar.pause(Some(PROVIDER.to_owned()), true));
  let paused = rig.ask("t-late", None, chat()).await;
  assert_eq!(refusal(&paused).2, "provider_paused");
  assert_eq!(rig.registrar.status().paused, [PROVIDER]);
  // The queued tasks still run once slots free up.
  provider.release(4);
  wait_for("4 results and t-late's", WAIT, || {
    rig.fake.count(Route::Result) == 5
  })
  .await;
  assert!(!drain.is_finished(), "one task is still running");
  provider.release(1);
  tokio::time::timeout(WAIT, drain)
    .await
    .expect("drained")
    .unwrap()
    .unwrap();
  for n in 0..5 {
    let post = rig.fake.result(&format!("t-{n}")).await;
    assert_eq!(post.body["status"], 200);
  }
  assert_eq!(provider.calls().len(), 5);
  rig.registrar.stop().await;
}

#[tokio::test]
async fn stop_rejects_a_drain_with_stopped() {
  let provider = MockProvider::hanging();
  let rig = Rig::one("drain-stop", &provider, OwnerPolicy::default()).await;
  rig.send("t-1", None, chat());
  wait_for("running", WAIT, || provider.calls().len() == 1).await;
  let drain = tokio::spawn(rig.registrar.pause(None, true));
  tokio::task::yield_now().await;
  rig.registrar.stop().await;
  let drained = tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
  assert!(matches!(drained, Err(Error::Stopped)), "{drained:?}");
}

#[tokio::test]
async fn pause_and_resume_send_a_heartbeat_at_once_with_paused() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::connected(
    "beat",
    vec![
      published("a", &provider, OwnerPolicy::default()),
      published("b", &provider, OwnerPolicy::default()),
    ],
    4,
    4,
  )
  .await;
  let beats = |rig: &Rig| rig.fake.of(Route::Heartbeat);
  let before = beats(&rig).len();
  rig
    .registrar
    .pause(Some("a".to_owned()), false)
    .await
    .unwrap();
  wait_for("a beat", WAIT, || beats(&rig).len() > before).await;
  let beat = beats(&rig).last().unwrap().body["providers"].clone();
  assert_eq!(beat[0]["name"], "a");
  assert_eq!(beat[0]["paused"], true);
  assert!(beat[1].get("paused").is_none());
  let unknown = rig.registrar.pause(Some("c".to_owned()), false).await;
  assert!(matches!(unknown, Err(Error::InvalidInput(_))));
  let before = beats(&rig).len();
  rig.registrar.resume(Some("a")).unwrap();
  wait_for("a beat", WAIT, || beats(&rig).len() > before).await;
  let beat = beats(&rig).last().unwrap().body["providers"].clone();
  assert!(beat[0].get("paused").is_none());
  rig.registrar.stop().await;
}

#[tokio::test]
async fn usage_totals_equal_the_sum_of_1000_tasks_from_3_callers() {
  // Each task reports its own usage: prompt n % 7, completion n % 5.
  let script: Vec<Behavior> = (0..1000)
    .map(|n| {
      Behavior::Answer(json!({
        "content": "ok",
        "usage": { "promptTokens": n % 7, "completionTokens": n % 5 },
      }))
    })
    .collect();
  let provider = MockProvider::new(false, script);
  let rig = Rig::connected(
    "usage",
    vec![published(PROVIDER, &provider, OwnerPolicy::default())],
    8,
    1000,
  )
  .await;
  let callers = ["alice", "bob", "carol"];
  for n in 0..1000 {
    rig.send(
      &format!("t-{n}"),
      Some(json!({ "id": callers[n % 3] })),
      chat(),
    );
  }
  wait_for("1000 results", Duration::from_secs(60), || {
    rig.fake.count(Route::Result) == 1000
  })
  .await;
  wait_for("1000 completed", WAIT, || {
    rig.registrar.status().completed == 1000
  })
  .await;
  let usage = rig.registrar.usage();
  // The provider answered in call order; the n-th call got the n-th script entry.
  let prompt: u64 = (0..1000).map(|n| n % 7).sum();
  let completion: u64 = (0..1000).map(|n| n % 5).sum();
  let all = usage.providers[PROVIDER];
  assert_eq!(
    (all.tasks, all.prompt_tokens, all.completion_tokens),
    (1000, prompt, completion)
  );
  let tasks: u64 = callers.iter().map(|id| usage.callers[*id].tasks).sum();
  let prompts: u64 = callers
    .iter()
    .map(|id| usage.callers[*id].prompt_tokens)
    .sum();
  let completions: u64 = callers
    .iter()
    .map(|id| usage.callers[*id].completion_tokens)
    .sum();
  assert_eq!((tasks, prompts, completions), (1000, prompt, completion));
  assert_eq!(usage.callers["alice"].tasks, 334);
  assert_eq!(usage.callers.len(), 3);
  rig.registrar.stop().await;
}

#[tokio::test]
async fn a_task_cancelled_while_queued_is_not_charged() {
  let provider = MockProvider::gated(hello());
  let policy = limits(PublishLimits {
    all: rpm(Some(2)),
    ..PublishLimits::default()
  });
  let rig = Rig::connected("refund", vec![published(PROVIDER, &provider, policy)], 1, 1).await;
  rig.send("t-1", None, chat());
  rig.send("t-2", None, chat());
  wait_for("1 running, 1 queued", WAIT, || {
    let status = rig.registrar.status();
    (status.in_flight, status.queued) == (1, 1)
  })
  .await;
  rig.fake.cancel("t-2");
  wait_for("t-2 cancelled", WAIT, || {
    rig.registrar.status().cancelled == 1
  })
  .await;
  // t-2's request was taken back: t-3 is the second of the minute, and queued.
  rig.send("t-3", None, chat());
  wait_for("t-3 queued", WAIT, || rig.registrar.status().queued == 1).await;
  let refused = rig.ask("t-4", None, chat()).await;
  assert_eq!(refusal(&refused).2, "requests_per_minute");
  provider.release(2);
  assert_eq!(rig.fake.result("t-3").await.body["status"], 200);
  assert_eq!(provider.calls(), ["t-1", "t-3"]);
  rig.registrar.stop().await;
}

#[tokio::test]
async fn update_changes_limits_live_and_the_windows_carry_over() {
  let provider = MockProvider::answering(hello());
  let policy = |n| {
    limits(PublishLimits {
      all: rpm(Some(n)),
      ..PublishLimits::default()
    })
  };
  let rig = Rig::connected(
    "update",
    vec![published(PROVIDER, &provider, policy(1))],
    4,
    4,
  )
  .await;
  assert_eq!(rig.ask("t-1", None, chat()).await.body["status"], 200);
  assert_eq!(
    refusal(&rig.ask("t-2", None, chat()).await).2,
    "requests_per_minute"
  );
  rig
    .registrar
    .update(vec![published(PROVIDER, &provider, policy(2))])
    .await
    .unwrap();
  // The minute still holds t-1: one more is admitted, not two.
  assert_eq!(rig.ask("t-3", None, chat()).await.body["status"], 200);
  assert_eq!(
    refusal(&rig.ask("t-4", None, chat()).await).2,
    "requests_per_minute"
  );
  // An allowCallers set by update() applies at once, to the same lane.
  let closed = OwnerPolicy {
    allow_callers: Some(Vec::new()),
    ..policy(100)
  };
  rig
    .registrar
    .update(vec![published(PROVIDER, &provider, closed)])
    .await
    .unwrap();
  assert_eq!(
    refusal(&rig.ask("t-5", None, chat()).await).2,
    "caller_not_allowed"
  );
  rig.registrar.stop().await;
}

#[tokio::test]
async fn a_streaming_task_is_refused_with_a_result_post_and_its_stream_is_charged() {
  // "c0 c1 c2 " is 9 characters: 3 tokens; the prompt "hi" 1.
  let provider = MockProvider::streaming(3, Duration::ZERO, None);
  let policy = limits(PublishLimits {
    all: RateLimits {
      tokens_per_minute: Some(4),
      ..RateLimits::default()
    },
    ..PublishLimits::default()
  });
  let rig = Rig::one("stream", &provider, policy).await;
  let stream = |task_id: &str| {
    let mut body = chat();
    body["stream"] = json!(true);
    rig.fake.send(
      "task",
      &json!({ "taskId": task_id, "provider": PROVIDER, "stream": true, "body": body }),
    );
  };
  stream("t-1");
  rig.fake.done("t-1").await;
  rig.ended(1).await;
  let usage = rig.registrar.usage().providers[PROVIDER];
  assert_eq!((usage.prompt_tokens, usage.completion_tokens), (1, 3));
  stream("t-2");
  let post = rig.fake.result("t-2").await;
  assert_eq!(refusal(&post).2, "tokens_per_minute");
  assert!(rig.fake.for_task(Route::Chunks, "t-2").is_empty());
  rig.registrar.pause(None, false).await.unwrap();
  stream("t-3");
  assert_eq!(refusal(&rig.fake.result("t-3").await).2, "provider_paused");
  rig.registrar.stop().await;
}

#[tokio::test]
async fn a_whole_pause_covers_providers_added_while_it_lasts() {
  let provider = MockProvider::answering(hello());
  let rig = Rig::one("whole", &provider, OwnerPolicy::default()).await;
  rig.registrar.pause(None, false).await.unwrap();
  rig
    .registrar
    .update(vec![
      published(PROVIDER, &provider, OwnerPolicy::default()),
      published("joined", &provider, OwnerPolicy::default()),
    ])
    .await
    .unwrap();
  assert_eq!(rig.registrar.status().paused, [PROVIDER, "joined"]);
  rig.fake.send(
    "task",
    &json!({ "taskId": "t-j", "provider": "joined", "body": chat() }),
  );
  assert_eq!(refusal(&rig.fake.result("t-j").await).2, "provider_paused");
  // resume({ provider }) does not lift a whole pause; resume() does.
  rig.registrar.resume(Some("joined")).unwrap();
  assert_eq!(rig.registrar.status().paused.len(), 2);
  rig.registrar.resume(None).unwrap();
  assert!(rig.registrar.status().paused.is_empty());
  assert_eq!(rig.ask("t-ok", None, chat()).await.body["status"], 200);
  rig.registrar.stop().await;
}
