//! A fake mcpd for the integration tests: plain HTTP/1.1 on 127.0.0.1, which
//! records every request, answers as PROTOCOL.md says unless a test scripted
//! otherwise, and lets a test write raw SSE bytes into the open control channel.
#![allow(dead_code)]

pub mod provider;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

/// Polls `cond` every 5 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
  let deadline = tokio::time::Instant::now() + timeout;
  while !cond() {
    assert!(
      tokio::time::Instant::now() < deadline,
      "timed out after {timeout:?} waiting for {what}"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
  }
}

/// A config dir of its own under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
  pub fn new(name: &str) -> Self {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
      "mcpctl-registrar-it-{name}-{}-{}",
      std::process::id(),
      NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&path);
    Self(path)
  }

  pub fn path(&self) -> &Path {
    &self.0
  }
}

impl Drop for TempDir {
  fn drop(&mut self) {
    let _ = std::fs::remove_dir_all(&self.0);
  }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
  Register,
  Stream,
  Heartbeat,
  Result,
  Chunks,
  Other,
}

/// A scripted answer to the next request of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
  /// This status with an OpenAI-style error body (or the normal answer for 2xx).
  Status(u16),
  /// Close the connection without answering.
  Drop,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Request {
  pub route: Route,
  pub method: String,
  pub path: String,
  pub query: HashMap<String, String>,
  /// Lower-case names.
  pub headers: HashMap<String, String>,
  /// The JSON body, `Null` when there was none.
  pub body: Value,
  /// The task id of a result or chunk POST, percent-decoded.
  pub task_id: Option<String>,
  /// What the fake answered; 0 when it dropped the connection.
  pub status: u16,
  /// When the fake had read the whole request.
  pub at: std::time::Instant,
}

impl Request {
  pub fn header(&self, name: &str) -> Option<&str> {
    self.headers.get(name).map(String::as_str)
  }
}

#[derive(Default)]
struct State {
  requests: Vec<Request>,
  scripts: HashMap<Route, VecDeque<Answer>>,
  delays: HashMap<Route, Duration>,
  /// Every request of the route answered with this status, after any script.
  always: HashMap<Route, u16>,
  /// Every control channel answered 200, in order; `None` once closed.
  streams: Vec<Option<mpsc::UnboundedSender<Vec<u8>>>>,
  sessions: u32,
  next_session_id: Option<String>,
  heartbeat_interval_ms: Option<u64>,
  in_flight: HashMap<String, u32>,
  max_in_flight: HashMap<String, u32>,
}

pub struct FakeMcpd {
  pub url: String,
  state: Arc<Mutex<State>>,
  tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Drop for FakeMcpd {
  fn drop(&mut self) {
    self.state.lock().streams.clear();
    for task in self.tasks.lock().drain(..) {
      task.abort();
    }
  }
}

impl FakeMcpd {
  pub async fn start() -> Self {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    let state = Arc::new(Mutex::new(State::default()));
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let accept = {
      let state = Arc::clone(&state);
      let tasks = Arc::clone(&tasks);
      tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
          let connection = tokio::spawn(serve(socket, Arc::clone(&state)));
          tasks.lock().push(connection.abort_handle());
        }
      })
    };
    tasks.lock().push(accept.abort_handle());
    Self { url, state, tasks }
  }

  /// The next answers of `route`, used up one per request before the defaults resume.
  pub fn script(&self, route: Route, answers: impl IntoIterator<Item = Answer>) {
    let mut state = self.state.lock();
    state.scripts.entry(route).or_default().extend(answers);
  }

  /// Every request of `route` (once its script is used up) is answered `status`.
  pub fn always(&self, route: Route, status: u16) {
    self.state.lock().always.insert(route, status);
  }

  /// Every request of `route` is answered only after `delay`.
  pub fn delay(&self, route: Route, delay: Duration) {
    self.state.lock().delays.insert(route, delay);
  }

  /// The id the next register is answered with, whatever it asked for.
  pub fn next_session_id(&self, id: &str) {
    self.state.lock().next_session_id = Some(id.to_owned());
  }

  pub fn heartbeat_interval_ms(&self, ms: Option<u64>) {
    self.state.lock().heartbeat_interval_ms = ms;
  }

  pub fn requests(&self) -> Vec<Request> {
    self.state.lock().requests.clone()
  }

  pub fn of(&self, route: Route) -> Vec<Request> {
    let state = self.state.lock();
    state
      .requests
      .iter()
      .filter(|request| request.route == route)
      .cloned()
      .collect()
  }

  pub fn count(&self, route: Route) -> usize {
    let state = self.state.lock();
    state.requests.iter().filter(|r| r.route == route).count()
  }

  /// The result or chunk POSTs of one task, in arrival order.
  pub fn for_task(&self, route: Route, task_id: &str) -> Vec<Request> {
    let state = self.state.lock();
    state
      .requests
      .iter()
      .filter(|r| r.route == route && r.task_id.as_deref() == Some(task_id))
      .cloned()
      .collect()
  }

  /// Every request mentioning the task, result or chunks.
  pub fn posts_for(&self, task_id: &str) -> Vec<Request> {
    let state = self.state.lock();
    state
      .requests
      .iter()
      .filter(|r| r.task_id.as_deref() == Some(task_id))
      .cloned()
      .collect()
  }

  /// Waits for the task's first result POST and returns it.
  pub async fn result(&self, task_id: &str) -> Request {
    let what = format!("a result POST for {task_id}");
    wait_for(&what, WAIT, || {
      !self.for_task(Route::Result, task_id).is_empty()
    })
    .await;
    self.for_task(Route::Result, task_id).remove(0)
  }

  /// The payloads of the task's delivered chunk POSTs, joined in order.
  pub fn payloads(&self, task_id: &str) -> Vec<String> {
    self
      .for_task(Route::Chunks, task_id)
      .iter()
      .filter(|post| post.status == 200)
      .flat_map(chunks_of)
      .collect()
  }

  /// Waits until the task's delivered payloads end with `[DONE]`.
  pub async fn done(&self, task_id: &str) -> Vec<String> {
    let what = format!("[DONE] for {task_id}");
    wait_for(&what, WAIT, || {
      self.payloads(task_id).last().map(String::as_str) == Some("[DONE]")
    })
    .await;
    self.payloads(task_id)
  }

  /// The most requests to `path` the fake was handling at once.
  pub fn max_in_flight(&self, path: &str) -> u32 {
    self
      .state
      .lock()
      .max_in_flight
      .get(path)
      .copied()
      .unwrap_or(0)
  }

  /// How many control channels were answered 200.
  pub fn streams_opened(&self) -> usize {
    self.state.lock().streams.len()
  }

  pub fn stream_is_open(&self, index: usize) -> bool {
    matches!(self.state.lock().streams.get(index), Some(Some(_)))
  }

  /// Waits until the `n`th control channel (from 1) is open.
  pub async fn wait_stream(&self, n: usize) {
    let what = format!("control channel #{n}");
    wait_for(&what, WAIT, || self.stream_is_open(n - 1)).await;
  }

  /// Writes raw bytes into the newest control channel.
  pub fn push(&self, bytes: impl Into<Vec<u8>>) {
    let state = self.state.lock();
    let stream = state.streams.last().and_then(Option::as_ref);
    let stream = stream.expect("no open control channel to push into");
    stream.send(bytes.into()).expect("control channel closed");
  }

  pub fn send(&self, event: &str, data: &Value) {
    self.push(format!("event: {event}\ndata: {data}\n\n"));
  }

  pub fn send_task(&self, task_id: &str, provider: &str, stream: bool, body: Value) {
    let task = json!({ "taskId": task_id, "provider": provider, "stream": stream, "body": body });
    self.send("task", &task);
  }

  pub fn cancel(&self, task_id: &str) {
    self.send("cancel", &json!({ "taskId": task_id }));
  }

  /// Ends the newest control channel after what was pushed into it.
  pub fn drop_stream(&self) {
    let mut state = self.state.lock();
    if let Some(stream) = state.streams.last_mut() {
      stream.take();
    }
  }
}

pub fn chunks_of(post: &Request) -> Vec<String> {
  let chunks = post.body["chunks"].as_array().expect("chunks array");
  chunks
    .iter()
    .map(|chunk| chunk.as_str().expect("string payload").to_owned())
    .collect()
}

/// One connection: requests in a row (keep-alive) until the client closes it,
/// a scripted drop, or a control channel, which owns it to the end.
async fn serve(mut socket: TcpStream, state: Arc<Mutex<State>>) {
  let mut buffer = Vec::new();
  while let Some(request) = read_request(&mut socket, &mut buffer).await {
    let (answer, delay, body) = decide(&state, request.clone());
    let path = request.path.clone();
    if let Some(delay) = delay {
      tokio::time::sleep(delay).await;
    }
    {
      // Counted down before the answer leaves, so a client that waits for it
      // can never be seen overlapping with itself.
      let mut state = state.lock();
      if let Some(count) = state.in_flight.get_mut(&path) {
        *count -= 1;
      }
    }
    let status = match answer {
      Answer::Drop => return,
      Answer::Status(status) => status,
    };
    if request.route == Route::Stream && status == 200 {
      return control_channel(socket, state).await;
    }
    if respond(&mut socket, status, body).await.is_err() {
      return;
    }
  }
}

/// Records the request and picks its answer (and the body of a 2xx).
fn decide(state: &Mutex<State>, mut request: Request) -> (Answer, Option<Duration>, Option<Value>) {
  let mut state = state.lock();
  let count = state.in_flight.entry(request.path.clone()).or_default();
  *count += 1;
  let now = *count;
  let max = state.max_in_flight.entry(request.path.clone()).or_default();
  *max = (*max).max(now);
  let scripted = state
    .scripts
    .get_mut(&request.route)
    .and_then(VecDeque::pop_front);
  let always = state
    .always
    .get(&request.route)
    .copied()
    .map(Answer::Status);
  let answer = scripted
    .or(always)
    .unwrap_or(Answer::Status(match request.route {
      Route::Register => 201,
      Route::Stream | Route::Result | Route::Chunks => 200,
      Route::Heartbeat => 204,
      Route::Other => 404,
    }));
  let body = match answer {
    Answer::Status(status) if (200..300).contains(&status) => match request.route {
      Route::Register => Some(register_answer(&mut state, &request.body)),
      Route::Heartbeat => None,
      _ => Some(json!({})),
    },
    Answer::Status(status) => Some(json!({
      "error": { "message": format!("scripted {status}"), "type": "scripted", "code": "scripted" }
    })),
    Answer::Drop => None,
  };
  request.status = match answer {
    Answer::Status(status) => status,
    Answer::Drop => 0,
  };
  let delay = state.delays.get(&request.route).copied();
  state.requests.push(request);
  (answer, delay, body)
}

/// Echoes a sticky id, else hands out `ps-<n>`, unless a test forced the next id.
fn register_answer(state: &mut State, body: &Value) -> Value {
  state.sessions += 1;
  let asked = body["providerSessionId"].as_str().map(str::to_owned);
  let id = state
    .next_session_id
    .take()
    .or(asked)
    .unwrap_or_else(|| format!("ps-{}", state.sessions));
  let llms: Vec<Value> = body["providers"]
    .as_array()
    .into_iter()
    .flatten()
    .map(|p| json!({ "name": p["name"], "kind": "virtual", "status": "active" }))
    .collect();
  let mut answer = json!({ "providerSessionId": id, "llms": llms });
  if let Some(ms) = state.heartbeat_interval_ms {
    answer["heartbeatIntervalMs"] = json!(ms);
  }
  answer
}

async fn respond(socket: &mut TcpStream, status: u16, body: Option<Value>) -> std::io::Result<()> {
  let head = match (status, body) {
    (204, _) | (_, None) => format!("HTTP/1.1 {status} {}\r\n\r\n", reason(status)),
    (_, Some(body)) => {
      let body = body.to_string();
      format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        reason(status),
        body.len()
      )
    }
  };
  socket.write_all(head.as_bytes()).await
}

fn reason(status: u16) -> &'static str {
  match status {
    200 => "OK",
    201 => "Created",
    204 => "No Content",
    404 => "Not Found",
    _ => "Scripted",
  }
}

/// Serves `text/event-stream` until the test drops the stream or the client
/// goes away; the end is a clean close, so the client reads every byte first.
async fn control_channel(socket: TcpStream, state: Arc<Mutex<State>>) {
  let (sender, mut receiver) = mpsc::unbounded_channel::<Vec<u8>>();
  let index = {
    let mut state = state.lock();
    state.streams.push(Some(sender));
    state.streams.len() - 1
  };
  let (mut reader, mut writer) = socket.into_split();
  let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
  let mut open = writer.write_all(head.as_bytes()).await.is_ok();
  let mut scratch = [0u8; 512];
  while open {
    open = tokio::select! {
      bytes = receiver.recv() => match bytes {
        Some(bytes) => writer.write_all(&bytes).await.is_ok(),
        None => false,
      },
      read = reader.read(&mut scratch) => matches!(read, Ok(n) if n > 0),
    };
  }
  let _ = writer.shutdown().await;
  if let Some(stream) = state.lock().streams.get_mut(index) {
    stream.take();
  }
}

/// Reads one request (head and Content-Length body); `None` at the end of the connection.
async fn read_request(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Request> {
  let head_end = loop {
    if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
      break at + 4;
    }
    read_more(socket, buffer).await?;
  };
  let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
  let mut lines = head.split("\r\n");
  let mut first = lines.next()?.split(' ');
  let method = first.next()?.to_owned();
  let target = first.next()?.to_owned();
  let headers: HashMap<String, String> = lines
    .filter_map(|line| line.split_once(':'))
    .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
    .collect();
  let length: usize = headers
    .get("content-length")
    .and_then(|length| length.parse().ok())
    .unwrap_or(0);
  while buffer.len() < head_end + length {
    read_more(socket, buffer).await?;
  }
  let raw: Vec<u8> = buffer.drain(..head_end + length).skip(head_end).collect();
  let body = match raw.is_empty() {
    true => Value::Null,
    false => serde_json::from_slice(&raw)
      .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned())),
  };
  let (path, query) = target.split_once('?').unwrap_or((&target, ""));
  let query = query
    .split('&')
    .filter_map(|pair| pair.split_once('='))
    .map(|(name, value)| (decode(name), decode(value)))
    .collect();
  let (route, task_id) = route_of(&method, path);
  Some(Request {
    route,
    method,
    path: path.to_owned(),
    query,
    headers,
    body,
    task_id,
    status: 0,
    at: std::time::Instant::now(),
  })
}

async fn read_more(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<()> {
  let mut chunk = [0u8; 16 * 1024];
  match socket.read(&mut chunk).await {
    Ok(0) | Err(_) => None,
    Ok(n) => {
      buffer.extend_from_slice(&chunk[..n]);
      Some(())
    }
  }
}

fn route_of(method: &str, path: &str) -> (Route, Option<String>) {
  const TASKS: &str = "/api/v1/llms/_provider-tasks/";
  match (method, path) {
    ("POST", "/api/v1/llms/_provider-register") => (Route::Register, None),
    ("GET", "/api/v1/llms/_provider-stream") => (Route::Stream, None),
    ("POST", "/api/v1/llms/_provider-heartbeat") => (Route::Heartbeat, None),
    ("POST", _) if path.starts_with(TASKS) => {
      let rest = &path[TASKS.len()..];
      match rest.rsplit_once('/') {
        Some((task, "result")) if !task.contains('/') => (Route::Result, Some(decode(task))),
        Some((task, "chunks")) if !task.contains('/') => (Route::Chunks, Some(decode(task))),
        _ => (Route::Other, None),
      }
    }
    _ => (Route::Other, None),
  }
}

/// Percent-decoding, enough for task and session ids.
fn decode(text: &str) -> String {
  let bytes = text.as_bytes();
  let mut out = Vec::with_capacity(bytes.len());
  let mut i = 0;
  while i < bytes.len() {
    let hex = bytes
      .get(i + 1..i + 3)
      .and_then(|hex| std::str::from_utf8(hex).ok())
      .and_then(|hex| u8::from_str_radix(hex, 16).ok());
    match (bytes[i], hex) {
      (b'%', Some(byte)) => {
        out.push(byte);
        i += 3;
      }
      (b'+', _) => {
        out.push(b' ');
        i += 1;
      }
      (byte, _) => {
        out.push(byte);
        i += 1;
      }
    }
  }
  String::from_utf8_lossy(&out).into_owned()
}
