//! The registrar against a hostile mcpd: the shared fake (tests/support) answering
//! one endpoint with an endless body (fast, or trickling), or with a redirect whose
//! `Location` holds the token. Memory must stay flat, the token must never show,
//! and the registrar must go on working.

mod support;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use support::{wait_for, FakeMcpd, Mode, Pace, Route as Endpoint};

use mcpctl_registrar::backoff::BackoffPolicy;
use mcpctl_registrar::dispatch::{DispatchSettings, PublishedProvider};
use mcpctl_registrar::error::describe;
use mcpctl_registrar::logging::LogRoute;
use mcpctl_registrar::mcpd::McpdClient;
use mcpctl_registrar::provider::{AbortReason, BoxFuture, Provider, ProviderCall, ProviderFailure};
use mcpctl_registrar::registrar::{Registrar, RegistrarConfig, RegistrarState};
use mcpctl_registrar::secret::Secret;
use mcpctl_registrar::stream::{chunk_channel, ChunkReader, End, WINDOW};
use mcpctl_registrar::wire::ProviderDescriptor;

const TOKEN: &str = "sk-hostile-token/42";
const PROVIDER: &str = "local-qwen";
/// How long any one awaited event may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);
/// The most a hostile phase may add to the peak RSS.
const RSS_BUDGET_KIB: u64 = 10 * 1024;

// ---------------------------------------------------------------- the server

/// The shared fake mcpd under a path prefix, set hostile per endpoint with `set`.
async fn hostile_mcpd() -> FakeMcpd {
  let server = FakeMcpd::start_under("/mcpd").await;
  server.heartbeat_interval_ms(Some(100));
  server
}

/// Sends a task for the `Hello` provider into the open control channel.
fn send_task(server: &FakeMcpd, task_id: &str, stream: bool) {
  let body =
    json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }], "stream": stream });
  server.send_task(task_id, PROVIDER, stream, body);
}

// ---------------------------------------------------------------- the registrar

/// Answers every call with "hello"; streams "hel", "lo".
struct Hello;

impl Provider for Hello {
  fn can_stream(&self) -> bool {
    true
  }

  fn complete(&self, _call: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    Box::pin(async { Ok(json!({ "content": "hello", "finishReason": "stop" })) })
  }

  fn stream(
    &self,
    _call: ProviderCall,
  ) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
    Box::pin(async {
      let (mut writer, reader) = chunk_channel(WINDOW);
      for chunk in [
        json!({ "content": "hel" }),
        json!({ "content": "lo", "finishReason": "stop" }),
      ] {
        writer
          .send(&chunk)
          .await
          .expect("the window has room for two");
      }
      writer.finish(End::Done);
      Ok(reader)
    })
  }

  fn abort(&self, _task_id: &str, _reason: AbortReason) {}
}

fn registrar(url: &str, dir: &tempfile::TempDir) -> Registrar {
  registrar_logging_to(url, dir, tracing::Span::none())
}

fn registrar_logging_to(url: &str, dir: &tempfile::TempDir, span: tracing::Span) -> Registrar {
  let config = RegistrarConfig {
    mcpd_url: url.to_owned(),
    token: Secret::new(TOKEN),
    providers: vec![PublishedProvider {
      descriptor: ProviderDescriptor {
        name: PROVIDER.to_owned(),
        kind: "ollama".to_owned(),
        model: Some("m".to_owned()),
        description: None,
        context_window: None,
      },
      provider: Arc::new(Hello),
      policy: Default::default(),
    }],
    config_dir: dir.path().to_owned(),
    heartbeat_interval: Duration::from_millis(100),
    idle_timeout: None,
    backoff: BackoffPolicy {
      initial: Duration::from_millis(20),
      max: Duration::from_millis(100),
    },
    dispatch: DispatchSettings::default(),
    allow_insecure_http: false,
  };
  Registrar::new(config, None, span).expect("valid config")
}

async fn wait_state(registrar: &Registrar, state: RegistrarState) {
  let deadline = tokio::time::Instant::now() + WAIT;
  while registrar.status().state != state {
    assert!(
      tokio::time::Instant::now() < deadline,
      "timed out waiting for state {state:?}: {:?}",
      registrar.status()
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
  }
}

/// Sends a task and waits for its answer: a result, or chunks ending in `[DONE]`.
async fn task_is_answered(server: &FakeMcpd, task_id: &str, stream: bool) {
  send_task(server, task_id, stream);
  wait_for(&format!("the answer to {task_id}"), WAIT, || match stream {
    false => server
      .for_task(Endpoint::Result, task_id)
      .iter()
      .any(|post| post.status == 200),
    true => server
      .payloads(task_id)
      .iter()
      .any(|chunk| chunk == "[DONE]"),
  })
  .await;
}

// ---------------------------------------------------------------- memory

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
  let status = std::fs::read_to_string("/proc/self/status").unwrap();
  status
    .lines()
    .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
    .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets the peak RSS (VmHWM) to the current RSS. Panics where the kernel
/// cannot: a test that measured the final RSS instead of the peak would pass
/// while a transient spike went unseen.
fn reset_peak_rss() {
  if let Err(error) = std::fs::write("/proc/self/clear_refs", "5") {
    panic!(
      "cannot reset the peak RSS through /proc/self/clear_refs ({error}); \
       these tests measure the peak (VmHWM) and have no honest fallback"
    );
  }
}

/// The cases share one process and its RSS, so every test of this binary
/// takes this lock: none runs beside an RSS-measuring one.
fn serial() -> parking_lot::MutexGuard<'static, ()> {
  static LOCK: Mutex<()> = parking_lot::const_mutex(());
  LOCK.lock()
}

/// What `#[tokio::test]` builds, for the tests that take `serial()` first.
fn current_thread() -> tokio::runtime::Runtime {
  tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
  tokio::runtime::Builder::new_multi_thread()
    .worker_threads(2)
    .enable_all()
    .build()
    .unwrap()
}

// ---------------------------------------------------------------- endless bodies

const ERROR_PREFIX: &str = r#"{"error":{"message":"#;
const REGISTER_PREFIX: &str = r#"{"providerSessionId":"ps-hostile","pad":""#;

/// One endless-body case: `endpoint` answers `status` with a body that never
/// ends, at `pace`, until the registrar dropped it `DROPS` times; the peak RSS
/// over that phase stays within 10 MiB of where it started, and once the
/// endpoint behaves the registrar works as before.
fn endless_case(endpoint: Endpoint, status: u16, pace: Pace) {
  const DROPS: u32 = 3;
  let _serial = serial();
  runtime().block_on(async move {
    let server = hostile_mcpd().await;
    let dir = tempfile::tempdir().unwrap();
    let registrar = registrar(&server.url, &dir);
    let prefix = if endpoint == Endpoint::Register && status == 200 {
      REGISTER_PREFIX
    } else {
      ERROR_PREFIX
    };
    let hostile = Mode::Endless {
      status,
      pace,
      prefix,
    };
    // Warm up: a full round of every endpoint, so that the baseline includes
    // the runtime, the connection pool and the first allocations.
    registrar.start().await.expect("start");
    wait_state(&registrar, RegistrarState::Connected).await;
    task_is_answered(&server, "warm-1", false).await;
    task_is_answered(&server, "warm-2", true).await;
    wait_for("a heartbeat", WAIT, || server.count(Endpoint::Heartbeat) >= 2).await;
    if endpoint == Endpoint::Register {
      registrar.stop().await;
    }
    let baseline = status_kib("VmRSS");
    reset_peak_rss();
    let beats_before = server.count(Endpoint::Heartbeat);

    server.set(endpoint, hostile);
    let answers_later = (endpoint == Endpoint::Result || endpoint == Endpoint::Chunks) && status != 200;
    let registrar = match endpoint {
      Endpoint::Register => {
        // A fresh registrar (a stopped one stays stopped) whose every start fails.
        let registrar = self::registrar(&server.url, &dir);
        for _ in 0..DROPS {
          let error = describe(&registrar.start().await.unwrap_err());
          if status == 200 {
            assert!(error.contains("over 1048576 bytes"), "{error}");
          } else {
            assert!(
              error.contains(&format!("mcpd answered HTTP {status}")),
              "{error}"
            );
            assert!(error.len() < 700, "{error}");
          }
          assert!(!error.contains(TOKEN), "{error}");
        }
        registrar
      }
      Endpoint::Stream => {
        // mcpd ends the channel: every reconnect meets the endless error body.
        server.drop_stream();
        registrar
      }
      Endpoint::Heartbeat | Endpoint::Other => registrar,
      Endpoint::Result | Endpoint::Chunks => {
        for index in 0..DROPS {
          send_task(&server, &format!("hostile-{index}"), endpoint == Endpoint::Chunks);
        }
        registrar
      }
    };
    let what = format!("{DROPS} dropped {endpoint:?} bodies");
    wait_for(&what, WAIT, || server.dropped(endpoint) >= DROPS).await;
    let after = status_kib("VmRSS");
    let peak = status_kib("VmHWM");
    eprintln!(
      "RSS {endpoint:?} {status} {pace:?}: baseline {baseline} KiB, peak {peak} KiB (+{} KiB), after {after} KiB; \
       most body bytes the server got out before the drop: {}",
      peak.saturating_sub(baseline),
      server.most_bytes_out()
    );
    assert!(
      peak <= baseline + RSS_BUDGET_KIB,
      "RSS grew by {} KiB (baseline {baseline}, peak {peak})",
      peak - baseline
    );

    // The registrar went on working: heartbeats kept coming (unless it is the
    // register that fails), and once the endpoint behaves, tasks are answered.
    if endpoint != Endpoint::Register {
      wait_for("heartbeats during the hostile phase", WAIT, || {
        server.count(Endpoint::Heartbeat) >= beats_before + 2
      })
      .await;
    }
    server.set(endpoint, Mode::Normal);
    match endpoint {
      Endpoint::Register => {
        registrar.start().await.expect("start once register behaves");
      }
      _ if answers_later => {
        // The tasks whose answers met the endless body are answered on a retry.
        for index in 0..DROPS {
          let task = format!("hostile-{index}");
          wait_for(&format!("the retried answer to {task}"), WAIT, || {
            server.posts_for(&task).iter().any(|post| post.status == 200)
          })
          .await;
        }
      }
      _ => {}
    }
    wait_state(&registrar, RegistrarState::Connected).await;
    task_is_answered(&server, "after-1", false).await;
    task_is_answered(&server, "after-2", true).await;
    registrar.stop().await;
  });
}

macro_rules! endless {
  ($($name:ident: $endpoint:ident $status:literal $pace:ident;)*) => {$(
    #[test]
    fn $name() {
      endless_case(Endpoint::$endpoint, $status, Pace::$pace);
    }
  )*};
}

endless! {
  endless_register_answer_fast: Register 200 Fast;
  endless_register_answer_slow: Register 200 Slow;
  endless_register_error_fast: Register 500 Fast;
  endless_register_error_slow: Register 500 Slow;
  endless_stream_connect_error_fast: Stream 500 Fast;
  endless_stream_connect_error_slow: Stream 500 Slow;
  endless_heartbeat_error_fast: Heartbeat 500 Fast;
  endless_heartbeat_error_slow: Heartbeat 500 Slow;
  endless_heartbeat_answer_fast: Heartbeat 200 Fast;
  endless_heartbeat_answer_slow: Heartbeat 200 Slow;
  endless_result_error_fast: Result 503 Fast;
  endless_result_error_slow: Result 503 Slow;
  endless_result_answer_fast: Result 200 Fast;
  endless_result_answer_slow: Result 200 Slow;
  endless_chunks_answer_fast: Chunks 200 Fast;
  endless_chunks_error_fast: Chunks 500 Fast;
  endless_chunks_error_slow: Chunks 500 Slow;
}

// ---------------------------------------------------------------- timeouts

fn client(server: &FakeMcpd) -> McpdClient {
  let client = McpdClient::new(&server.url, Secret::new(TOKEN), false).unwrap();
  client.set_session_id(Some("ps-hostile".to_owned()));
  client
}

/// A body that trickles one byte every 100 ms never reaches a bound: the 30 s
/// request timeout of register and heartbeat still ends it (the bytes do not
/// restart the clock). Paused clock: the 30 s pass at once.
/// Serial like every test here (see `serial()`): the lock is held outside the
/// runtime, never across an await.
#[test]
fn request_timeouts_bound_a_trickling_body() {
  let _serial = serial();
  tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .start_paused(true)
    .build()
    .unwrap()
    .block_on(trickling_body_case());
}

async fn trickling_body_case() {
  let server = hostile_mcpd().await;
  let client = client(&server);
  let cases = [
    (Endpoint::Register, 200, REGISTER_PREFIX),
    (Endpoint::Register, 500, ERROR_PREFIX),
    (Endpoint::Heartbeat, 200, ""),
    (Endpoint::Heartbeat, 500, ERROR_PREFIX),
  ];
  for (endpoint, status, prefix) in cases {
    server.set(
      endpoint,
      Mode::Endless {
        status,
        pace: Pace::Trickle,
        prefix,
      },
    );
    let started = tokio::time::Instant::now();
    let outcome = match endpoint {
      Endpoint::Register => client.register(&[]).await.map(drop),
      _ => client.heartbeat(&[]).await,
    };
    let took = started.elapsed();
    assert!(
      took >= Duration::from_secs(30) && took < Duration::from_secs(31),
      "{endpoint:?} {status}: took {took:?}"
    );
    match (endpoint, status) {
      // The status said it all; the rest of the body is not waited for longer.
      (Endpoint::Heartbeat, 200) => outcome.unwrap(),
      (_, 500) => {
        let error = outcome.unwrap_err();
        assert_eq!(error.status(), Some(500), "{error}");
      }
      _ => {
        let error = describe(&outcome.unwrap_err());
        assert!(error.contains("register failed"), "{error}");
      }
    }
    wait_for("the trickle dropped", WAIT, || {
      server.dropped(endpoint) >= 1
    })
    .await;
    server.set(endpoint, Mode::Normal);
    server.clear_dropped();
  }
}

// ---------------------------------------------------------------- redirects

/// A listener that counts the connections made to it: where a redirect points.
async fn elsewhere() -> (String, Arc<std::sync::atomic::AtomicU32>) {
  let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
  let origin = format!("http://{}", listener.local_addr().unwrap());
  let count = Arc::new(std::sync::atomic::AtomicU32::new(0));
  let counting = Arc::clone(&count);
  tokio::spawn(async move {
    while let Ok((_socket, _)) = listener.accept().await {
      counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
  });
  (origin, count)
}

/// Every way the token could be written into a `Location`.
fn token_forms() -> Vec<String> {
  vec![
    TOKEN.to_owned(),
    TOKEN.replace('/', "%2F"),
    TOKEN.replace('/', "%2f").replace('-', "%2D"),
    TOKEN.replace('/', "%252F"),
  ]
}

/// A redirect to another origin, and a redirect loop within mcpd's own, each with
/// the token in its `Location`: start() rejects naming the origin, and no
/// message, status or log field carries the token; nothing is sent elsewhere.
#[test]
fn redirects_are_refused_and_never_leak_the_token() {
  let _serial = serial();
  current_thread().block_on(redirects_case());
}

async fn redirects_case() {
  let server = hostile_mcpd().await;
  let (other, connections) = elsewhere().await;
  let dir = tempfile::tempdir().unwrap();
  for form in token_forms() {
    let cases = [
      (
        format!("{other}/steal?token={form}&x=1#{form}"),
        format!("a redirect to another origin ({other})"),
      ),
      (
        format!(
          "http://user:{}@{}/x",
          form.replace('/', "%2F"),
          other.trim_start_matches("http://")
        ),
        format!("a redirect to another origin ({other})"),
      ),
      (
        format!("{{origin}}/mcpd/api/v1/llms/_provider-register?t={form}"),
        "a redirect within mcpd's origin".to_owned(),
      ),
      (
        format!("/mcpd/{form}/api/v1/llms/_provider-register"),
        "a redirect within mcpd's origin".to_owned(),
      ),
    ];
    for (location, expected) in cases {
      server.set(Endpoint::Register, Mode::Redirect(location.clone()));
      let lines: Arc<Mutex<Vec<String>>> = Arc::default();
      let captured = Arc::clone(&lines);
      let route = LogRoute::register(
        Some(Arc::new(move |_, message, fields| {
          captured
            .lock()
            .push(format!("{message} {}", Value::Object(fields)))
        })),
        Some(Secret::new(TOKEN)),
      );
      let registrar = registrar_logging_to(&server.url, &dir, route.span());
      let error = registrar.start().await.unwrap_err();
      let text = describe(&error);
      assert_eq!(error.status(), Some(302), "{text}");
      assert!(text.contains(&expected), "{location}: {text}");
      assert!(text.contains("not followed"), "{text}");
      let status = serde_json::to_string(&registrar.status()).unwrap();
      let logged = lines.lock().join("\n");
      assert!(logged.contains("register failed"), "{logged}");
      for leak in token_forms() {
        assert!(!text.contains(&leak), "{location}: {text}");
        assert!(!status.contains(&leak), "{location}: {status}");
        assert!(!logged.contains(&leak), "{location}: {logged}");
      }
      // The other endpoints refuse the same way.
      server.set(Endpoint::Register, Mode::Normal);
      server.set(Endpoint::Heartbeat, Mode::Redirect(location.clone()));
      server.set(Endpoint::Stream, Mode::Redirect(location.clone()));
      let client = client(&server);
      let heartbeat = describe(&client.heartbeat(&[]).await.unwrap_err());
      let stream = client.open_stream(None).await.unwrap();
      assert_eq!(stream.status().as_u16(), 302);
      let stream = describe(&client.status_error("stream connect", stream).await);
      for text in [&heartbeat, &stream] {
        assert!(text.contains(&expected), "{location}: {text}");
        for leak in token_forms() {
          assert!(!text.contains(&leak), "{location}: {text}");
        }
      }
      server.set(Endpoint::Heartbeat, Mode::Normal);
      server.set(Endpoint::Stream, Mode::Normal);
    }
  }
  // One request per redirect, none followed, none sent to the other origin.
  assert_eq!(server.count(Endpoint::Register), 16);
  assert_eq!(server.count(Endpoint::Heartbeat), 16);
  assert_eq!(server.count(Endpoint::Stream), 16);
  assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// A transport error names the URL it failed on; when that URL holds the token
/// (here in mcpdUrl's path prefix, as is and percent-encoded), the text the
/// error becomes does not.
#[test]
fn transport_errors_are_redacted() {
  let _serial = serial();
  current_thread().block_on(transport_errors_case());
}

async fn transport_errors_case() {
  let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
  let address = listener.local_addr().unwrap();
  drop(listener);
  let encoded = TOKEN.replace('/', "%2F");
  let client = McpdClient::new(
    &format!("http://{address}/{encoded}/mcpd"),
    Secret::new(TOKEN),
    false,
  )
  .unwrap();
  client.set_session_id(Some("ps-1".to_owned()));
  let error = describe(&client.heartbeat(&[]).await.unwrap_err());
  assert!(error.contains("heartbeat failed"), "{error}");
  assert!(
    error.contains(&format!("http://{address}/***/mcpd")),
    "{error}"
  );
  for leak in token_forms() {
    assert!(!error.contains(&leak), "{error}");
  }
}
