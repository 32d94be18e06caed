//! The 100,000-task soak (issue 19 item 3): a mix of streamed, non-streamed, cancelled,
//! failed and refused tasks through one registrar; after a warm-up of 200,000 tasks (see
//! `warm_up`), its resident memory stays within +10 MiB over 100,000 more tasks, and its file descriptors and tokio tasks
//! come back to their idle counts. Run once per stress run by scripts/stress.sh (not in
//! `cargo test`: ignored), with `cargo test --test soak -- --ignored --nocapture`;
//! `MCPCTL_SOAK_TASKS` and `MCPCTL_SOAK_WARM_UP` run fewer or more.
//! Its own test binary, so the process's memory, descriptors and tasks are this test's
//! alone; its mcpd records nothing but counts, so that the fake's memory does not hide ours.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use mcpctl_registrar::backoff::BackoffPolicy;
use mcpctl_registrar::dispatch::{DispatchSettings, PublishedProvider, MAX_IDS};
use mcpctl_registrar::owner::OwnerPolicy;
use mcpctl_registrar::provider::{AbortReason, BoxFuture, Provider, ProviderCall, ProviderFailure};
use mcpctl_registrar::registrar::{Registrar, RegistrarConfig};
use mcpctl_registrar::stream::{chunk_channel, ChunkReader, End, WINDOW};
use mcpctl_registrar::wire::ProviderDescriptor;

use support::mcpd::{McpdServer, Reply, Response, Route};
use support::{registrar_config, wait_for, TempDir};

fn env_or(name: &str, default: u64) -> u64 {
  std::env::var(name)
    .ok()
    .and_then(|n| n.parse().ok())
    .unwrap_or(default)
}

/// The tasks measured, after the warm-up.
fn tasks() -> u64 {
  env_or("MCPCTL_SOAK_TASKS", 100_000)
}

/// The warm-up brings every bounded table to its steady size before the measurement
/// starts. The replay guard remembers every id for 10 minutes, up to MAX_IDS (100,000):
/// about 120 bytes an id, 12 MiB measured when the guard filled during the measured
/// tasks. Full, each new id evicts the oldest, and the removals leave tombstones in its
/// hash table (hashbrown) that use up the table's spare room; it then rebuilds once at
/// twice the size (+4-5 MiB, measured 40,000 tasks past the fill, where the RSS stepped
/// from 47 to 52 MiB and stayed level through 200,000 more), and rehashes in place from
/// then on, as it is less than half full. So the warm-up is twice MAX_IDS: the fill,
/// then a whole turn of evictions. The allocator's arenas and the connection pool reach
/// their working size long before.
fn warm_up() -> u64 {
  env_or("MCPCTL_SOAK_WARM_UP", 2 * MAX_IDS as u64)
}

/// Tasks are sent in batches of this many, each batch waited for to its end.
const BATCH: u64 = 1_000;
/// The RSS is noted every this many measured tasks, for the printed trend.
const TREND_EVERY: u64 = 10_000;
/// The bound on resident memory after the warm-up (issue 19).
const RSS_GROWTH_KIB: u64 = 10 * 1024;
/// Chunks of each streamed answer.
const STREAM_CHUNKS: usize = 8;

/// The five kinds of task, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
  Streamed,
  Answered,
  Cancelled,
  Failed,
  Refused,
}

const KINDS: [Kind; 5] = [
  Kind::Streamed,
  Kind::Answered,
  Kind::Cancelled,
  Kind::Failed,
  Kind::Refused,
];

/// Answers at once, streams `STREAM_CHUNKS` chunks, fails, or never settles (by name),
/// and records nothing (the shared mock keeps every call).
struct Soaker {
  behavior: Kind,
}

impl Provider for Soaker {
  fn can_stream(&self) -> bool {
    true
  }
  fn complete(&self, _: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    match self.behavior {
      Kind::Failed => Box::pin(std::future::ready(Err(ProviderFailure(
        "soak: the provider failed".to_owned(),
      )))),
      Kind::Cancelled => Box::pin(std::future::pending()),
      _ => Box::pin(std::future::ready(Ok(json!({ "content": "ok" })))),
    }
  }
  fn stream(&self, _: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
    let (mut writer, reader) = chunk_channel(WINDOW);
    // Produced beside the task that reads them, as the JavaScript bridge does.
    tokio::spawn(async move {
      for i in 0..STREAM_CHUNKS {
        if writer
          .send(&json!({ "content": format!("c{i} ") }))
          .await
          .is_err()
        {
          return;
        }
      }
      writer.finish(End::Done);
    });
    Box::pin(std::future::ready(Ok(reader)))
  }
  fn abort(&self, _: &str, _: AbortReason) {}
}

fn published(name: &str, behavior: Kind, policy: OwnerPolicy) -> PublishedProvider {
  PublishedProvider {
    descriptor: ProviderDescriptor {
      name: name.to_owned(),
      kind: "soak".to_owned(),
      model: None,
      description: None,
      context_window: None,
    },
    provider: Arc::new(Soaker { behavior }),
    policy: Arc::new(policy),
  }
}

/// The `task` (and, for a cancelled one, `cancel`) frames of task `n`.
fn frames(n: u64, out: &mut Vec<u8>) {
  let kind = KINDS[(n % KINDS.len() as u64) as usize];
  let task_id = format!("soak-{n}");
  let (provider, stream) = match kind {
    Kind::Streamed => ("answer", true),
    Kind::Answered => ("answer", false),
    Kind::Cancelled => ("hang", false),
    Kind::Failed => ("fail", false),
    Kind::Refused => ("guarded", false),
  };
  let task = json!({
    "taskId": task_id, "provider": provider, "stream": stream,
    "body": { "messages": [{ "role": "user", "content": format!("task {n}") }], "stream": stream },
  });
  out.extend_from_slice(format!("event: task\ndata: {task}\n\n").as_bytes());
  if kind == Kind::Cancelled {
    let cancel = json!({ "taskId": task_id });
    out.extend_from_slice(format!("event: cancel\ndata: {cancel}\n\n").as_bytes());
  }
}

/// What is measured at an idle moment: every task sent so far has ended.
#[derive(Debug, Clone, Copy)]
struct Idle {
  rss_kib: u64,
  peak_rss_kib: u64,
  sockets: usize,
  /// Descriptors that are not sockets (files, pipes, eventfds, epoll).
  other_fds: usize,
  tokio_tasks: usize,
  registrar_tasks: usize,
  remembered: usize,
}

impl Idle {
  /// Each pooled keep-alive connection is two sockets here (the registrar's and the
  /// fake's end) and two tokio tasks (hyper's connection task and the fake's), and how
  /// many the pool keeps depends on how many POSTs happened to overlap: the tasks other
  /// than those are what must come back to the idle count.
  fn tasks_besides_connections(&self) -> isize {
    self.tokio_tasks as isize - self.sockets as isize
  }
}

fn status_kib(field: &str) -> u64 {
  let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
  status
    .lines()
    .find_map(|line| line.strip_prefix(field))
    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn measure(registrar: &Registrar) -> Idle {
  let (mut sockets, mut other_fds) = (0, 0);
  for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
    // The directory's own descriptor is gone by the time it is read: skipped.
    let Ok(target) = std::fs::read_link(entry.unwrap().path()) else {
      continue;
    };
    if target.to_string_lossy().starts_with("socket:") {
      sockets += 1;
    } else {
      other_fds += 1;
    }
  }
  Idle {
    rss_kib: status_kib("VmRSS:"),
    peak_rss_kib: status_kib("VmHWM:"),
    sockets,
    // read_dir's own descriptor is counted here, at every measurement alike.
    other_fds,
    tokio_tasks: tokio::runtime::Handle::current()
      .metrics()
      .num_alive_tasks(),
    registrar_tasks: registrar.owned_tasks(),
    remembered: registrar.remembered_task_ids(),
  }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the 100,000-task soak: run once per stress run by scripts/stress.sh"]
async fn soak_of_100000_mixed_tasks_keeps_memory_descriptors_and_tasks_flat() {
  let results = Arc::new(AtomicU64::new(0));
  let streams_done = Arc::new(AtomicU64::new(0));
  let channel: Arc<Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>> = Arc::default();
  let (sender, receiver) = mpsc::unbounded_channel();
  *channel.lock() = Some(receiver);
  let (counted_results, counted_streams) = (Arc::clone(&results), Arc::clone(&streams_done));
  let server = McpdServer::start("", move |request| {
    let reply = match request.route {
      Route::Register => Reply::Respond(Response::json(
        200,
        r#"{"providerSessionId":"soak-1","llms":[]}"#,
      )),
      Route::Stream => match channel.lock().take() {
        Some(frames) => Reply::EventStream {
          frames,
          coalesce: true,
        },
        None => Reply::Respond(Response::empty(503)),
      },
      Route::Result => {
        counted_results.fetch_add(1, Ordering::SeqCst);
        Reply::Respond(Response::empty(200))
      }
      Route::Chunks => {
        // The last chunk POST of a stream carries its `[DONE]`.
        if request.body.windows(8).any(|w| w == b"\"[DONE]\"") {
          counted_streams.fetch_add(1, Ordering::SeqCst);
        }
        Reply::Respond(Response::empty(200))
      }
      _ => Reply::Respond(Response::empty(200)),
    };
    std::future::ready(reply)
  })
  .await;
  let dir = TempDir::new("soak");
  let guarded = OwnerPolicy {
    allow_callers: Some(vec!["someone-else".to_owned()]),
    ..OwnerPolicy::default()
  };
  let providers = vec![
    published("answer", Kind::Answered, OwnerPolicy::default()),
    published("hang", Kind::Cancelled, OwnerPolicy::default()),
    published("fail", Kind::Failed, OwnerPolicy::default()),
    published("guarded", Kind::Refused, guarded),
  ];
  let config = RegistrarConfig {
    backoff: BackoffPolicy::default(),
    dispatch: DispatchSettings {
      task_timeout: Duration::from_secs(60),
      max_concurrency: 64,
      // A whole batch may queue: no task is refused for a full queue.
      max_queue: BATCH as u32,
    },
    ..registrar_config(&server.url, "sk-soak", providers, dir.path())
  };
  let registrar = Registrar::new(config, None, tracing::Span::none()).unwrap();
  registrar.start().await.unwrap();

  let warm = warm_up();
  let total = warm + tasks();
  let started = Instant::now();
  let mut at_idle = (warm == 0).then(|| measure(&registrar));
  let mut sent = 0;
  // RSS along the measured tasks: a leak climbs, a settled process stays level.
  let mut trend = Vec::new();
  while sent < total {
    // A batch never straddles the warm-up's end, where the idle figures are taken.
    let end = (sent + BATCH).min(if sent < warm { warm } else { total });
    let mut bytes = Vec::new();
    for n in sent..end {
      frames(n, &mut bytes);
    }
    sender.send(bytes).unwrap();
    sent = end;
    // Every task sent has ended (its last POST included) once none is live and all are
    // counted: the barrier of tests/core.rs.
    wait_for("the batch's tasks to end", Duration::from_secs(120), || {
      let status = registrar.status();
      status.completed + status.failed + status.cancelled == sent && registrar.live_tasks() == 0
    })
    .await;
    if sent == warm {
      at_idle = Some(measure(&registrar));
    }
    if sent > warm && (sent - warm).is_multiple_of(TREND_EVERY) {
      trend.push(status_kib("VmRSS:"));
    }
  }
  let elapsed = started.elapsed();
  let idle = at_idle.expect("the warm-up ends on a batch's end");
  let remembered = registrar.remembered_task_ids();

  // Exact: one fifth of each kind (the kinds take turns), every answer delivered.
  let per = |kind: Kind| {
    (0..total)
      .filter(|n| KINDS[(n % KINDS.len() as u64) as usize] == kind)
      .count() as u64
  };
  let status = registrar.status();
  assert_eq!(status.completed, per(Kind::Streamed) + per(Kind::Answered));
  assert_eq!(status.failed, per(Kind::Failed) + per(Kind::Refused));
  assert_eq!(status.cancelled, per(Kind::Cancelled));
  assert_eq!(
    results.load(Ordering::SeqCst),
    per(Kind::Answered) + per(Kind::Failed) + per(Kind::Refused)
  );
  assert_eq!(streams_done.load(Ordering::SeqCst), per(Kind::Streamed));

  // Descriptors and tasks: back to the idle counts (the closing of a pooled connection
  // or a finished producer task may trail the tasks' end by a moment: waited for).
  let mut end = measure(&registrar);
  let back = Instant::now();
  while (end.other_fds != idle.other_fds
    || end.tasks_besides_connections() != idle.tasks_besides_connections()
    || end.registrar_tasks != idle.registrar_tasks)
    && back.elapsed() < Duration::from_secs(10)
  {
    tokio::time::sleep(Duration::from_millis(20)).await;
    end = measure(&registrar);
  }
  eprintln!(
    "soak: {total} tasks ({warm} warm-up, then {} measured) in {:.1} s ({:.0} tasks/s); \
     the replay guard remembers {} ids after the warm-up, {remembered} at the end",
    total - warm,
    elapsed.as_secs_f64(),
    total as f64 / elapsed.as_secs_f64(),
    idle.remembered
  );
  eprintln!(
    "soak: RSS after the warm-up {} KiB, at the end {} KiB ({:+} KiB); peak {} KiB",
    idle.rss_kib,
    end.rss_kib,
    end.rss_kib as i64 - idle.rss_kib as i64,
    end.peak_rss_kib
  );
  let trend: Vec<String> = trend.iter().map(|kib| format!("{}", kib / 1024)).collect();
  eprintln!(
    "soak: RSS every {TREND_EVERY} measured tasks (MiB): {}",
    trend.join(" ")
  );
  eprintln!(
    "soak: file descriptors idle {} (+{} sockets), end {} (+{} sockets); tokio tasks idle {}, end {}; \
     the registrar's own tasks idle {}, end {}",
    idle.other_fds,
    idle.sockets,
    end.other_fds,
    end.sockets,
    idle.tokio_tasks,
    end.tokio_tasks,
    idle.registrar_tasks,
    end.registrar_tasks
  );
  assert!(
    end.rss_kib <= idle.rss_kib + RSS_GROWTH_KIB,
    "RSS grew {} KiB after the warm-up",
    end.rss_kib - idle.rss_kib
  );
  assert_eq!(end.other_fds, idle.other_fds, "descriptors besides sockets");
  assert_eq!(
    end.tasks_besides_connections(),
    idle.tasks_besides_connections(),
    "tokio tasks besides the pooled connections' ({end:?}, idle {idle:?})"
  );
  assert_eq!(end.registrar_tasks, idle.registrar_tasks);
  registrar.stop().await;
  assert_eq!(registrar.owned_tasks(), 0);
}
