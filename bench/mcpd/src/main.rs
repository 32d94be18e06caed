//! The mcpd stand-in of `npm run bench`: just enough of docs/protocol.md (register,
//! the SSE channel, heartbeat, result and chunk POSTs) on one tokio thread, with
//! the scenarios driven and timed here, so neither the bench's Node process nor
//! this server is in the measured path more than one loopback hop.
//!
//! Commands arrive on stdin, one a line, and each answers one JSON line on stdout:
//! - `run <tasks> <in-flight> <tokens>`: sends `tasks` task events keeping at most
//!   `in-flight` unanswered; `tokens` 0 is a non-streaming task, otherwise a
//!   streaming one whose `max_tokens` tells the bench provider how many to yield.
//!   Answers the elapsed time, per-task latency percentiles and payload counts.
//! - `stats`: connections and requests served so far.
//!
//! The HTTP side is the Rust tests' fake mcpd server (tests/support/mcpd.rs), compiled in here.

#[path = "../../../tests/support/mcpd.rs"]
mod mcpd;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, Notify, Semaphore};

use mcpd::{McpdServer, Reply, Request, Response, Route};

const SESSION: &str = "bench-session";

#[derive(Default)]
struct State {
  /// Frames for the current SSE connection (the latest one wins).
  sse: Option<mpsc::UnboundedSender<Vec<u8>>>,
  run: Option<Run>,
  run_number: u64,
  requests: u64,
}

struct Run {
  number: u64,
  tasks: usize,
  sent: Vec<Option<Instant>>,
  latencies: Vec<Duration>,
  /// Payloads received per task (for streams), checked against each POST's `seq`.
  payloads: Vec<u64>,
  posts: u64,
  errors: u64,
  first_error: Option<String>,
  window: Arc<Semaphore>,
  finished: usize,
  done: Arc<Notify>,
}

impl Run {
  fn error(&mut self, message: String) {
    self.errors += 1;
    if self.first_error.is_none() {
      self.first_error = Some(message);
    }
  }

  fn finish(&mut self, index: usize) {
    if let Some(sent) = self.sent[index].take() {
      self.latencies.push(sent.elapsed());
      self.finished += 1;
      self.window.add_permits(1);
      if self.finished == self.tasks {
        self.done.notify_one();
      }
    }
  }
}

/// Shared by the server's handler and the command loop, all on the one runtime thread
/// (the server is `Send`, so this is an `Arc<Mutex>` where an `Rc<RefCell>` once was).
#[derive(Clone, Default)]
struct Shared {
  state: Arc<Mutex<State>>,
  /// Told when a control channel opens.
  sse_ready: Arc<Notify>,
}

impl Shared {
  /// Never held across an await: the runtime has one thread.
  fn lock(&self) -> MutexGuard<'_, State> {
    self.state.lock().expect("state")
  }
}

fn main() {
  let runtime = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .expect("runtime");
  runtime.block_on(async_main());
}

async fn async_main() {
  let state = Shared::default();
  let answering = state.clone();
  let server = McpdServer::start("", move |request| {
    std::future::ready(answer(&answering, request))
  })
  .await;
  let port = server.origin.rsplit(':').next().expect("port");
  println!("{{\"port\":{port}}}");
  let mut lines = BufReader::new(tokio::io::stdin()).lines();
  while let Ok(Some(line)) = lines.next_line().await {
    let words: Vec<&str> = line.split_whitespace().collect();
    let answer = match words.as_slice() {
      ["run", tasks, in_flight, tokens] => {
        let parse = |word: &str| word.parse::<usize>().unwrap_or(1).max(1);
        let tokens = tokens.parse::<usize>().unwrap_or(0);
        drive(&state, parse(tasks), parse(in_flight), tokens).await
      }
      ["stats"] => format!(
        "{{\"connections\":{},\"requests\":{}}}",
        server.connections(),
        state.lock().requests
      ),
      ["quit"] | [] => break,
      _ => format!("{{\"error\":\"unknown command {line:?}\"}}"),
    };
    println!("{answer}");
  }
}

/// Sends the run's task events, at most `in_flight` unanswered, and waits for every answer.
async fn drive(state: &Shared, tasks: usize, in_flight: usize, tokens: usize) -> String {
  let sender = loop {
    let ready = state.sse_ready.notified();
    if let Some(sender) = state.lock().sse.clone() {
      break sender;
    }
    ready.await;
  };
  let window = Arc::new(Semaphore::new(in_flight));
  let done = Arc::new(Notify::new());
  let number = {
    let mut state = state.lock();
    state.run_number += 1;
    state.run = Some(Run {
      number: state.run_number,
      tasks,
      sent: vec![None; tasks],
      latencies: Vec::with_capacity(tasks),
      payloads: vec![0; tasks],
      posts: 0,
      errors: 0,
      first_error: None,
      window: Arc::clone(&window),
      finished: 0,
      done: Arc::clone(&done),
    });
    state.run_number
  };
  let (stream, body) = if tokens == 0 {
    ("false", String::new())
  } else {
    ("true", format!(",\"max_tokens\":{tokens}"))
  };
  let started = Instant::now();
  for index in 0..tasks {
    window.acquire().await.expect("window").forget();
    let frame = format!(
      "event: task\ndata: {{\"taskId\":\"b{number}-{index}\",\"provider\":\"bench\",\"stream\":{stream},\"body\":{{\"model\":\"bench\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":{stream}{body}}}}}\n\n"
    );
    if let Some(run) = state.lock().run.as_mut() {
      run.sent[index] = Some(Instant::now());
    }
    if sender.send(frame.into_bytes()).is_err() {
      return "{\"error\":\"the SSE connection closed\"}".to_owned();
    }
  }
  let deadline = tokio::time::sleep(Duration::from_secs(600));
  tokio::pin!(deadline);
  loop {
    let finished = done.notified();
    if state
      .lock()
      .run
      .as_ref()
      .is_some_and(|run| run.finished == run.tasks)
    {
      break;
    }
    tokio::select! {
      _ = finished => {}
      _ = &mut deadline => break,
    }
  }
  let elapsed = started.elapsed();
  let mut run = state.lock().run.take().expect("run");
  run.latencies.sort_unstable();
  let percentile = |p: f64| {
    let latencies = &run.latencies;
    if latencies.is_empty() {
      return 0;
    }
    let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[index].as_nanos()
  };
  let payloads: u64 = run.payloads.iter().sum();
  let first_error = run
    .first_error
    .as_deref()
    .map(|error| format!(",\"firstError\":{:?}", error))
    .unwrap_or_default();
  format!(
    "{{\"tasks\":{tasks},\"finished\":{},\"elapsedNs\":{},\"p50Ns\":{},\"p99Ns\":{},\"payloads\":{payloads},\"posts\":{},\"errors\":{}{first_error}}}",
    run.finished,
    elapsed.as_nanos(),
    percentile(0.5),
    percentile(0.99),
    run.posts,
    run.errors,
  )
}

/// Every request: the SSE channel (the latest one wins), register, the task POSTs; anything
/// else (the heartbeat, the bench's own `/floor`) is answered `200 {}`.
fn answer(state: &Shared, request: Request) -> Reply {
  state.lock().requests += 1;
  match request.route {
    Route::Stream => {
      let (sender, frames) = mpsc::unbounded_channel();
      let _ = sender.send(b": open\n\n".to_vec());
      state.lock().sse = Some(sender);
      state.sse_ready.notify_waiters();
      Reply::EventStream {
            frames,
            coalesce: true,
          }
    }
    Route::Register => Reply::Respond(Response::json(
      200,
      format!(
        "{{\"providerSessionId\":\"{SESSION}\",\"llms\":[{{\"name\":\"bench\",\"kind\":\"virtual\",\"status\":\"active\"}}],\"heartbeatIntervalMs\":30000}}"
      ),
    )),
    Route::Result | Route::Chunks => {
      let task = request.task_id.as_deref().unwrap_or_default();
      task_post(state, task, request.route, &request.body);
      Reply::Respond(Response::json(200, "{}"))
    }
    _ => Reply::Respond(Response::json(200, "{}")),
  }
}

/// A result or chunk POST for task `b<run>-<index>`.
fn task_post(state: &Shared, task: &str, route: Route, body: &[u8]) {
  let mut state = state.lock();
  let Some(run) = state.run.as_mut() else {
    return;
  };
  let parsed = task
    .strip_prefix('b')
    .and_then(|rest| rest.split_once('-'))
    .and_then(|(number, index)| Some((number.parse::<u64>().ok()?, index.parse::<usize>().ok()?)));
  let Some((number, index)) = parsed else {
    return run.error(format!("unexpected task id {task}"));
  };
  if number != run.number || index >= run.tasks {
    return;
  }
  run.posts += 1;
  match route {
    Route::Result => {
      let status = serde_json::from_slice::<Value>(body)
        .ok()
        .map(|body| body["status"].clone());
      if status != Some(Value::from(200)) {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        run.error(format!("result for {task}: {text}"));
      }
      run.finish(index);
    }
    _ => match chunk_post(body) {
      Some((seq, count, done)) => {
        if seq != run.payloads[index] {
          run.error(format!(
            "{task}: seq {seq}, expected {}",
            run.payloads[index]
          ));
        }
        run.payloads[index] = seq + count;
        if done {
          run.finish(index);
        }
      }
      None => run.error(format!("{task}: unreadable chunk POST")),
    },
  }
}

/// `{"seq":N,"chunks":["…",…]}`: the seq, how many payloads, and whether the last is `[DONE]`.
fn chunk_post(body: &[u8]) -> Option<(u64, u64, bool)> {
  let body: Value = serde_json::from_slice(body).ok()?;
  let chunks = body["chunks"].as_array()?;
  let done = chunks.last().and_then(Value::as_str) == Some("[DONE]");
  Some((body["seq"].as_u64()?, chunks.len() as u64, done))
}
