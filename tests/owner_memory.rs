//! A hostile mcpd sending 100,000 distinct caller ids: the registrar's memory stays
//! bounded (at most 10,000 callers tracked per provider and in usage()). Its own test
//! binary, so that the process's peak RSS (VmHWM) is this test's alone; its mcpd
//! keeps no record of the requests, so that the fake's memory does not hide ours.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use mcpctl_registrar::backoff::BackoffPolicy;
use mcpctl_registrar::dispatch::{DispatchSettings, PublishedProvider};
use mcpctl_registrar::owner::usage::OTHER_CALLERS;
use mcpctl_registrar::owner::{OwnerPolicy, PublishLimits, RateLimits, MAX_CALLERS};
use mcpctl_registrar::provider::{AbortReason, BoxFuture, Provider, ProviderCall, ProviderFailure};
use mcpctl_registrar::registrar::{Registrar, RegistrarConfig};
use mcpctl_registrar::stream::ChunkReader;
use mcpctl_registrar::wire::ProviderDescriptor;

use support::mcpd::{McpdServer, Reply, Response, Route};
use support::{registrar_config, wait_for, TempDir};

/// 100,000 distinct callers; 30,000 in a debug build (three times the bound, about a
/// minute on a busy 2-core machine), unless `MCPCTL_HOSTILE_CALLERS` says how many.
fn tasks() -> u64 {
  std::env::var("MCPCTL_HOSTILE_CALLERS")
    .ok()
    .and_then(|n| n.parse().ok())
    .unwrap_or(if cfg!(debug_assertions) {
      30_000
    } else {
      100_000
    })
}
const BATCH: u64 = 5_000;

/// Answers at once and records nothing (the shared mock keeps every call).
struct Quiet;

impl Provider for Quiet {
  fn can_stream(&self) -> bool {
    false
  }
  fn complete(&self, _: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    Box::pin(std::future::ready(Ok(json!({ "content": "ok" }))))
  }
  fn stream(&self, _: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
    Box::pin(std::future::ready(Err(ProviderFailure(
      "no stream".to_owned(),
    ))))
  }
  fn abort(&self, _: &str, _: AbortReason) {}
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
  let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
  status
    .lines()
    .find_map(|line| line.strip_prefix("VmHWM:"))
    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_mcpd_sending_100000_caller_ids_grows_no_memory_past_the_bound() {
  let results = Arc::new(AtomicU64::new(0));
  let channel: Arc<Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>> = Arc::default();
  let (frames, receiver) = mpsc::unbounded_channel();
  *channel.lock() = Some(receiver);
  let counted = Arc::clone(&results);
  let server = McpdServer::start("", move |request| {
    let reply = match request.route {
      Route::Register => Reply::Respond(Response::json(
        200,
        r#"{"providerSessionId":"s-1","llms":[]}"#,
      )),
      Route::Stream => match channel.lock().take() {
        Some(frames) => Reply::EventStream {
          frames,
          coalesce: true,
        },
        None => Reply::Respond(Response::empty(503)),
      },
      Route::Result => {
        counted.fetch_add(1, Ordering::SeqCst);
        Reply::Respond(Response::empty(200))
      }
      _ => Reply::Respond(Response::empty(200)),
    };
    std::future::ready(reply)
  })
  .await;
  let dir = TempDir::new("owner-memory");
  let total = tasks();
  let policy = OwnerPolicy {
    allow_callers: None,
    limits: PublishLimits {
      per_caller: RateLimits {
        requests_per_minute: Some(5),
        tokens_per_minute: Some(10_000),
        tokens_per_day: Some(100_000),
      },
      ..PublishLimits::default()
    },
    ..OwnerPolicy::default()
  };
  let providers = vec![PublishedProvider {
    descriptor: ProviderDescriptor {
      name: "p".to_owned(),
      kind: "t".to_owned(),
      model: None,
      description: None,
      context_window: None,
    },
    provider: Arc::new(Quiet),
    policy: Arc::new(policy),
  }];
  let config = RegistrarConfig {
    backoff: BackoffPolicy::default(),
    dispatch: DispatchSettings {
      task_timeout: Duration::from_secs(30),
      max_concurrency: 64,
      max_queue: BATCH as u32,
    },
    ..registrar_config(&server.url, "sk-owner", providers, dir.path())
  };
  let registrar = Registrar::new(config, None, tracing::Span::none()).unwrap();
  registrar.start().await.unwrap();

  let mut warm = 0;
  for batch in 0..total / BATCH {
    let mut bytes = Vec::new();
    for n in batch * BATCH..(batch + 1) * BATCH {
      let task = json!({
        "taskId": format!("t-{n}"), "provider": "p", "stream": false,
        "body": { "messages": [{ "role": "user", "content": "hi" }] },
        "caller": { "id": format!("hostile-{n:06}"), "name": format!("caller {n}"), "groups": ["g"] },
      });
      bytes.extend_from_slice(format!("event: task\ndata: {task}\n\n").as_bytes());
    }
    frames.send(bytes).unwrap();
    let end = (batch + 1) * BATCH;
    wait_for("the batch's results", Duration::from_secs(120), || {
      results.load(Ordering::SeqCst) == end
    })
    .await;
    if end == 2 * MAX_CALLERS as u64 {
      // Both bounds are reached by now: what follows must not grow.
      warm = peak_rss_kib();
    }
  }
  wait_for("every task settled", Duration::from_secs(30), || {
    registrar.status().completed == total
  })
  .await;
  let peak = peak_rss_kib();
  let usage = registrar.usage();
  assert_eq!(usage.callers.len(), MAX_CALLERS + 1);
  assert_eq!(
    usage.callers[OTHER_CALLERS].tasks,
    total - MAX_CALLERS as u64
  );
  assert_eq!(usage.providers["p"].tasks, total);
  eprintln!(
    "peak RSS after {} tasks: {warm} KiB; after {total}: {peak} KiB (+{} KiB)",
    2 * MAX_CALLERS,
    peak - warm
  );
  // The replay guard remembers task ids for 10 minutes (bounded on its own, in
  // count and bytes): part of the growth is it, not the callers.
  assert!(
    peak - warm < 32 * 1024,
    "memory grew {} KiB past the callers' bound",
    peak - warm
  );
  registrar.stop().await;
}
