//! The mcpd stand-in of `npm run bench`: just enough of PROTOCOL.md (register,
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
//! HTTP/1.1 only, keep-alive, `content-length` bodies (what reqwest and undici send).

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};

const SESSION: &str = "bench-session";

#[derive(Default)]
struct State {
  /// Frames for the current SSE connection (the latest one wins).
  sse: Option<mpsc::UnboundedSender<Vec<u8>>>,
  run: Option<Run>,
  run_number: u64,
  connections: u64,
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
  window: Rc<Semaphore>,
  finished: usize,
  done: Rc<Notify>,
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

type Shared = Rc<RefCell<State>>;

fn main() {
  let runtime = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .expect("runtime");
  let local = tokio::task::LocalSet::new();
  local.block_on(&runtime, async_main());
}

async fn async_main() {
  let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
  let port = listener.local_addr().expect("address").port();
  println!("{{\"port\":{port}}}");
  let state: Shared = Rc::default();
  let sse_ready = Rc::new(Notify::new());
  {
    let state = Rc::clone(&state);
    let sse_ready = Rc::clone(&sse_ready);
    tokio::task::spawn_local(async move {
      while let Ok((stream, _)) = listener.accept().await {
        state.borrow_mut().connections += 1;
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(serve(stream, Rc::clone(&state), Rc::clone(&sse_ready)));
      }
    });
  }
  let mut lines = BufReader::new(tokio::io::stdin()).lines();
  while let Ok(Some(line)) = lines.next_line().await {
    let words: Vec<&str> = line.split_whitespace().collect();
    let answer = match words.as_slice() {
      ["run", tasks, in_flight, tokens] => {
        let parse = |word: &str| word.parse::<usize>().unwrap_or(1).max(1);
        let tokens = tokens.parse::<usize>().unwrap_or(0);
        drive(&state, &sse_ready, parse(tasks), parse(in_flight), tokens).await
      }
      ["stats"] => {
        let state = state.borrow();
        format!(
          "{{\"connections\":{},\"requests\":{}}}",
          state.connections, state.requests
        )
      }
      ["quit"] | [] => break,
      _ => format!("{{\"error\":\"unknown command {line:?}\"}}"),
    };
    println!("{answer}");
  }
}

/// Sends the run's task events, at most `in_flight` unanswered, and waits for every answer.
async fn drive(
  state: &Shared,
  sse_ready: &Rc<Notify>,
  tasks: usize,
  in_flight: usize,
  tokens: usize,
) -> String {
  let sender = loop {
    let ready = sse_ready.notified();
    if let Some(sender) = state.borrow().sse.clone() {
      break sender;
    }
    ready.await;
  };
  let window = Rc::new(Semaphore::new(in_flight));
  let done = Rc::new(Notify::new());
  let number = {
    let mut state = state.borrow_mut();
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
      window: Rc::clone(&window),
      finished: 0,
      done: Rc::clone(&done),
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
    if let Some(run) = state.borrow_mut().run.as_mut() {
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
      .borrow()
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
  let mut run = state.borrow_mut().run.take().expect("run");
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

/// One keep-alive connection: requests in order, or the SSE channel.
async fn serve(mut stream: TcpStream, state: Shared, sse_ready: Rc<Notify>) {
  let mut buffer: Vec<u8> = Vec::with_capacity(16 * 1024);
  loop {
    let head_end = loop {
      if let Some(at) = find(&buffer, b"\r\n\r\n") {
        break at;
      }
      if !read_more(&mut stream, &mut buffer).await {
        return;
      }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    for line in lines {
      if let Some((name, value)) = line.split_once(':') {
        if name.eq_ignore_ascii_case("content-length") {
          length = value.trim().parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
          let _ = stream
            .write_all(
              b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
          return;
        }
      }
    }
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
      if !read_more(&mut stream, &mut buffer).await {
        return;
      }
    }
    state.borrow_mut().requests += 1;
    if method == "GET" && path.starts_with("/api/v1/llms/_provider-stream") {
      return sse(stream, state, sse_ready).await;
    }
    let body = &buffer[body_start..body_start + length];
    let reply = route(&state, &path, body);
    if stream.write_all(&reply).await.is_err() {
      return;
    }
    buffer.drain(..body_start + length);
  }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
  buffer.reserve(16 * 1024);
  matches!(stream.read_buf(buffer).await, Ok(read) if read > 0)
}

const OK_EMPTY: &[u8] =
  b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";

fn route(state: &Shared, path: &str, body: &[u8]) -> Cow<'static, [u8]> {
  if path.starts_with("/api/v1/llms/_provider-register") {
    let body = format!(
      "{{\"providerSessionId\":\"{SESSION}\",\"llms\":[{{\"name\":\"bench\",\"kind\":\"virtual\",\"status\":\"active\"}}],\"heartbeatIntervalMs\":30000}}"
    );
    let reply = format!(
      "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
      body.len()
    );
    return Cow::Owned(reply.into_bytes());
  }
  if let Some(rest) = path.strip_prefix("/api/v1/llms/_provider-tasks/") {
    let Some((task, kind)) = rest.split_once('/') else {
      return Cow::Borrowed(NOT_FOUND);
    };
    task_post(state, task, kind, body);
  }
  Cow::Borrowed(OK_EMPTY)
}

/// A result or chunk POST for task `b<run>-<index>`.
fn task_post(state: &Shared, task: &str, kind: &str, body: &[u8]) {
  let mut state = state.borrow_mut();
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
  match kind {
    "result" => {
      if find(body, b"\"status\":200").is_none() {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        run.error(format!("result for {task}: {text}"));
      }
      run.finish(index);
    }
    "chunks" => match chunk_post(body) {
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
    _ => run.error(format!("{task}: unexpected endpoint {kind}")),
  }
}

/// `{"seq":N,"chunks":["…",…]}`: the seq, how many payloads, and whether the last is `[DONE]`.
fn chunk_post(body: &[u8]) -> Option<(u64, u64, bool)> {
  let seq_at = find(body, b"\"seq\":")? + 6;
  let digits = body[seq_at..]
    .iter()
    .take_while(|b| b.is_ascii_digit())
    .count();
  let seq = std::str::from_utf8(&body[seq_at..seq_at + digits])
    .ok()?
    .parse()
    .ok()?;
  let mut at = find(body, b"\"chunks\":[")? + 10;
  let mut count = 0;
  let mut last = (0, 0);
  loop {
    match body.get(at)? {
      b']' => break,
      b',' | b' ' | b'\n' => at += 1,
      b'"' => {
        let start = at + 1;
        at = start;
        loop {
          match body.get(at)? {
            b'\\' => at += 2,
            b'"' => break,
            _ => at += 1,
          }
        }
        last = (start, at);
        count += 1;
        at += 1;
      }
      _ => return None,
    }
  }
  Some((seq, count, &body[last.0..last.1] == b"[DONE]"))
}

/// The SSE channel: every frame queued since the last write goes in one write.
async fn sse(mut stream: TcpStream, state: Shared, sse_ready: Rc<Notify>) {
  let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n: open\n\n";
  if stream.write_all(head).await.is_err() {
    return;
  }
  let (sender, mut receiver) = mpsc::unbounded_channel::<Vec<u8>>();
  state.borrow_mut().sse = Some(sender);
  sse_ready.notify_waiters();
  let mut out = Vec::with_capacity(64 * 1024);
  while let Some(frame) = receiver.recv().await {
    out.clear();
    out.extend_from_slice(&frame);
    while let Ok(frame) = receiver.try_recv() {
      out.extend_from_slice(&frame);
    }
    if stream.write_all(&out).await.is_err() {
      break;
    }
  }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
  haystack
    .windows(needle.len())
    .position(|window| window == needle)
}
