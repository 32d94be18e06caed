//! The mcpd stand-in of `npm run bench`: just enough of docs/protocol.md (register,
//! the SSE channel, heartbeat, result and chunk POSTs) on one tokio thread, with
//! the scenarios driven and timed here, so neither the bench's Node process nor
//! this server is in the measured path more than one loopback hop.
//!
//! Commands arrive on stdin, one a line, and each answers one JSON line on stdout:
//! - `run <tasks> <in-flight> <tokens> [<rate>]`: sends `tasks` task events keeping at
//!   most `in-flight` unanswered (and, with `rate`, at most `rate` a second); `tokens` 0
//!   is a non-streaming task, otherwise a streaming one whose `max_tokens` tells the
//!   bench provider how many to yield. Answers the elapsed time, per-task latency
//!   percentiles, payload and token counts, and this server's own CPU time over the run.
//!
//! Every answer is checked, not only counted: a result must be `200` with the bench
//! provider's content; a stream must carry exactly the `tokens` content deltas the
//! provider yielded (each `"tok "`), exactly one finish_reason, and end in `[DONE]`.
//! A mismatch is an error of the run (the bench and its smoke mode fail on it), so a
//! registrar cannot look fast by dropping or inventing tokens.
//! - `stats`: connections and requests served so far.
//!
//! The HTTP side is the Rust tests' fake mcpd server (tests/support/mcpd.rs), compiled in here.

#[path = "../../../tests/support/mcpd.rs"]
mod mcpd;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
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
  /// Content deltas received per task, checked against `tokens` at `[DONE]`.
  received: Vec<u64>,
  /// finish_reasons received per task: exactly one.
  finishes: Vec<u32>,
  /// The content tokens each streaming task's provider yields (`max_tokens`).
  tokens: u64,
  /// Content deltas received in all.
  tokens_received: u64,
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
      ["run", tasks, in_flight, tokens, rest @ ..] if rest.len() <= 1 => {
        let parse = |word: &str| word.parse::<usize>().unwrap_or(1).max(1);
        let tokens = tokens.parse::<usize>().unwrap_or(0);
        let rate = rest
          .first()
          .and_then(|rate| rate.parse::<f64>().ok())
          .filter(|rate| *rate > 0.0);
        drive(&state, parse(tasks), parse(in_flight), tokens, rate).await
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
async fn drive(
  state: &Shared,
  tasks: usize,
  in_flight: usize,
  tokens: usize,
  rate: Option<f64>,
) -> String {
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
      received: vec![0; tasks],
      finishes: vec![0; tasks],
      tokens: tokens as u64,
      tokens_received: 0,
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
  let cpu_before = own_cpu_ns();
  let started = Instant::now();
  for index in 0..tasks {
    if let Some(rate) = rate {
      // Paced: task `index` goes no sooner than index / rate after the start.
      let due = started + Duration::from_secs_f64(index as f64 / rate);
      tokio::time::sleep_until(due.into()).await;
    }
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
  let cpu_ns = own_cpu_ns().saturating_sub(cpu_before);
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
    "{{\"tasks\":{tasks},\"finished\":{},\"elapsedNs\":{},\"p50Ns\":{},\"p99Ns\":{},\"payloads\":{payloads},\"tokens\":{},\"posts\":{},\"mcpdCpuNs\":{cpu_ns},\"errors\":{}{first_error}}}",
    run.finished,
    elapsed.as_nanos(),
    percentile(0.5),
    percentile(0.99),
    run.tokens_received,
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
      let answer = serde_json::from_slice::<Value>(body).ok();
      let status = answer.as_ref().map(|body| body["status"].clone());
      let content = answer
        .as_ref()
        .map(|body| body["body"]["choices"][0]["message"]["content"].clone());
      if status != Some(Value::from(200)) || content != Some(Value::from(RESULT_CONTENT)) {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        run.error(format!("result for {task}: {text}"));
      }
      run.finish(index);
    }
    _ => match chunk_post(body) {
      Ok(post) => {
        if post.seq != run.payloads[index] {
          run.error(format!(
            "{task}: seq {}, expected {}",
            post.seq, run.payloads[index]
          ));
        }
        run.payloads[index] = post.seq + post.payloads;
        run.received[index] += post.tokens;
        run.tokens_received += post.tokens;
        run.finishes[index] += post.finishes;
        if let Some(problem) = post.problem {
          run.error(format!("{task}: {problem}"));
        }
        if post.done {
          let (received, finishes) = (run.received[index], run.finishes[index]);
          if received != run.tokens {
            run.error(format!(
              "{task}: {received} content tokens arrived, the provider yielded {}",
              run.tokens
            ));
          }
          if finishes != 1 {
            run.error(format!("{task}: {finishes} finish_reasons (one expected)"));
          }
          run.finish(index);
        }
      }
      Err(problem) => run.error(format!("{task}: unreadable chunk POST: {problem}")),
    },
  }
}

/// What the bench provider's `complete()` answers (bench/child.mjs).
const RESULT_CONTENT: &str = "ok";
/// Each content token the bench provider's `stream()` yields (bench/child.mjs).
const TOKEN: &str = "tok ";

/// One chunk POST as read: each payload as its JSON string token, escapes and all, so that
/// checking every payload costs this single-threaded server little (it must not become the
/// cap): see [`chunk_post`].
#[derive(Deserialize)]
struct ChunkPostBody<'a> {
  seq: u64,
  #[serde(borrow)]
  chunks: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Payload<'a> {
  #[serde(borrow, default)]
  choices: Vec<Choice<'a>>,
  #[serde(default)]
  error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
  #[serde(borrow)]
  delta: Delta<'a>,
  #[serde(borrow, default)]
  finish_reason: Option<&'a str>,
}

#[derive(Deserialize)]
struct Delta<'a> {
  #[serde(borrow, default)]
  content: Option<std::borrow::Cow<'a, str>>,
}

/// A chunk POST's counts, and the first thing wrong in it.
struct ChunkCounts {
  seq: u64,
  payloads: u64,
  /// Non-empty content deltas.
  tokens: u64,
  finishes: u32,
  done: bool,
  problem: Option<String>,
}

/// One payload's counts (not `[DONE]`).
#[derive(Clone, Copy, Default)]
struct PayloadCounts {
  tokens: u64,
  finishes: u32,
}

/// `{"seq":N,"chunks":["…",…]}`: the seq, the payloads, and each payload read for its
/// content deltas and finish_reasons. A payload byte for byte the same as the one before
/// it (as its JSON string token: a stream of one repeated token is nearly all such) has
/// the same counts and is not read again: every payload is still checked, by that
/// comparison or by reading it.
fn chunk_post(body: &[u8]) -> Result<ChunkCounts, String> {
  let body: ChunkPostBody = serde_json::from_slice(body).map_err(|error| error.to_string())?;
  let mut counts = ChunkCounts {
    seq: body.seq,
    payloads: body.chunks.len() as u64,
    tokens: 0,
    finishes: 0,
    done: false,
    problem: None,
  };
  let mut last: Option<(&str, PayloadCounts)> = None;
  for (at, raw) in body.chunks.iter().enumerate() {
    let raw = raw.get();
    // Only as both registrars write it: an escaped spelling (`"[DONE\u005d"`) is a payload
    // that does not parse, so the run fails on it rather than ending the stream.
    if raw == r#""[DONE]""# {
      counts.done = true;
      if at + 1 != body.chunks.len() {
        counts.problem = Some("payloads after [DONE]".to_owned());
      }
      continue;
    }
    let payload = match last {
      Some((before, payload)) if before == raw => payload,
      _ => {
        let payload = payload_counts(raw, at, &mut counts.problem);
        last = Some((raw, payload));
        payload
      }
    };
    counts.tokens += payload.tokens;
    counts.finishes += payload.finishes;
  }
  Ok(counts)
}

/// One payload (its JSON string token) read: its counts, and the first thing wrong with it
/// kept in `problem` (if nothing was wrong before it).
fn payload_counts(raw: &str, at: usize, problem: &mut Option<String>) -> PayloadCounts {
  let mut counts = PayloadCounts::default();
  let text: String = match serde_json::from_str(raw) {
    Ok(text) => text,
    Err(error) => {
      problem.get_or_insert(format!("payload {at} is not a JSON string: {error}"));
      return counts;
    }
  };
  let payload: Payload = match serde_json::from_str(&text) {
    Ok(payload) => payload,
    Err(error) => {
      problem.get_or_insert(format!("payload {at}: {error}"));
      return counts;
    }
  };
  if payload.error.is_some() {
    problem.get_or_insert(format!("an error payload: {text}"));
  }
  for choice in payload.choices {
    match choice.delta.content.as_deref() {
      None | Some("") => {}
      Some(TOKEN) => counts.tokens += 1,
      Some(other) => {
        problem.get_or_insert(format!("content {other:?}, not {TOKEN:?}"));
      }
    }
    counts.finishes += u32::from(choice.finish_reason.is_some());
  }
  counts
}

/// This thread's CPU time in ns (the server's one runtime thread): the first field of its
/// schedstat; 0 where there is none.
fn own_cpu_ns() -> u64 {
  std::fs::read_to_string("/proc/thread-self/schedstat")
    .ok()
    .and_then(|text| text.split_whitespace().next()?.parse().ok())
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
  use super::*;

  /// A content payload as a chunk POST holds it: a JSON string of the chunk's JSON text.
  fn content(token: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_owned(), |reason| format!("{reason:?}"));
    let chunk = format!(
      r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":{token:?}}},"finish_reason":{finish}}}]}}"#
    );
    serde_json::to_string(&chunk).unwrap()
  }

  fn post(seq: u64, payloads: &[String]) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"chunks":[{}]}}"#, payloads.join(",")).into_bytes()
  }

  #[test]
  fn repeated_payloads_are_counted_each_time() {
    let mut payloads = vec![content(TOKEN, None); 5];
    payloads.push(content("", Some("stop")));
    payloads.push(r#""[DONE]""#.to_owned());
    let counts = chunk_post(&post(7, &payloads)).unwrap();
    assert_eq!(counts.seq, 7);
    assert_eq!(counts.payloads, 7);
    assert_eq!(counts.tokens, 5);
    assert_eq!(counts.finishes, 1);
    assert!(counts.done);
    assert_eq!(counts.problem, None);
  }

  #[test]
  fn a_payload_unlike_the_one_before_it_is_read() {
    // The same token after a different one is read again, not taken for the first.
    let payloads = [
      content(TOKEN, None),
      content(TOKEN, None),
      content("tok!", None),
      content(TOKEN, None),
    ];
    let counts = chunk_post(&post(0, &payloads)).unwrap();
    assert_eq!(counts.tokens, 3);
    assert_eq!(
      counts.problem.as_deref(),
      Some(r#"content "tok!", not "tok ""#)
    );
  }

  #[test]
  fn a_payload_that_is_not_a_string_or_not_a_chunk_is_a_problem() {
    let counts = chunk_post(&post(0, &[content(TOKEN, None), "{}".to_owned()])).unwrap();
    assert_eq!(counts.tokens, 1);
    assert!(counts
      .problem
      .unwrap()
      .starts_with("payload 1 is not a JSON string"));
    let counts = chunk_post(&post(0, &[r#""{""#.to_owned()])).unwrap();
    assert!(counts.problem.unwrap().starts_with("payload 0: "));
    let error = serde_json::to_string(r#"{"error":{"message":"boom"}}"#).unwrap();
    let counts = chunk_post(&post(0, &[error.clone(), error])).unwrap();
    assert_eq!(
      counts.problem.as_deref(),
      Some(r#"an error payload: {"error":{"message":"boom"}}"#)
    );
  }

  #[test]
  fn payloads_after_done_are_a_problem() {
    let payloads = [r#""[DONE]""#.to_owned(), content(TOKEN, None)];
    let counts = chunk_post(&post(0, &payloads)).unwrap();
    assert!(counts.done);
    assert_eq!(counts.problem.as_deref(), Some("payloads after [DONE]"));
    assert!(chunk_post(b"{\"seq\":0}").is_err());
  }
}
