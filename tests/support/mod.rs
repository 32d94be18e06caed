//! The fake mcpd of the integration tests, on the shared server of mcpd.rs: it records
//! every request, answers as docs/protocol.md says unless a test scripted otherwise or set
//! the endpoint hostile, and lets a test write raw SSE bytes into the control channel.
#![allow(dead_code)]

pub mod mcpd;
pub mod provider;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub use mcpd::Pace;
pub use mcpd::Route;
use mcpd::{Endless, McpdServer, Reply, Response};

/// A registrar's config for these tests: mcpd at `url`, the session file in
/// `dir`, no heartbeat or idle timeout that could fire during a test, a quick
/// reconnect, and room for 4 tasks (16 queued) of up to 30 s. A test changes
/// what it needs with `RegistrarConfig { .., ..registrar_config(..) }`.
pub fn registrar_config(
  url: &str,
  token: &str,
  providers: Vec<mcpctl_registrar::dispatch::PublishedProvider>,
  dir: &Path,
) -> mcpctl_registrar::registrar::RegistrarConfig {
  mcpctl_registrar::registrar::RegistrarConfig {
    mcpd_url: url.to_owned(),
    token: mcpctl_registrar::secret::Secret::new(token),
    providers,
    config_dir: dir.to_owned(),
    heartbeat_interval: Duration::from_secs(3600),
    idle_timeout: None,
    backoff: mcpctl_registrar::backoff::BackoffPolicy {
      initial: Duration::from_millis(20),
      max: Duration::from_millis(100),
    },
    dispatch: mcpctl_registrar::dispatch::DispatchSettings {
      task_timeout: Duration::from_secs(30),
      max_concurrency: 4,
      max_queue: 16,
    },
    allow_insecure_http: false,
  }
}

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

/// A scripted answer to the next request of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
  /// This status with an OpenAI-style error body (or the normal answer for 2xx).
  Status(u16),
  /// Close the connection without answering.
  Drop,
}

/// How every request of a route is answered, whatever was scripted: as docs/protocol.md
/// says, or hostile (tests/hostile.rs).
#[derive(Debug, Clone)]
pub enum Mode {
  /// As docs/protocol.md says, or as scripted.
  Normal,
  /// This status, then a body that never ends; `prefix` starts it.
  Endless {
    status: u16,
    pace: Pace,
    prefix: &'static str,
  },
  /// 302 to this location, with the fake's origin put in for `{origin}`.
  Redirect(String),
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
  /// What the fake answered; 0 when it dropped the connection or never ended the body.
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
  /// The routes not answered normally (never `Mode::Normal`).
  modes: HashMap<Route, Mode>,
  /// Endless answers whose reader went away (the client dropped the connection).
  dropped: HashMap<Route, u32>,
  /// The most body bytes one endless answer got out before it was dropped.
  most_bytes_out: u64,
  origin: String,
}

pub struct FakeMcpd {
  /// The origin and the path prefix the endpoints are served under.
  pub url: String,
  /// `http://127.0.0.1:<port>`.
  pub origin: String,
  state: Arc<Mutex<State>>,
  /// Dropped with the fake, which ends every connection.
  _server: McpdServer,
}

impl Drop for FakeMcpd {
  fn drop(&mut self) {
    self.state.lock().streams.clear();
  }
}

impl FakeMcpd {
  pub async fn start() -> Self {
    Self::start_under("").await
  }

  /// A fake whose endpoints are under `prefix` (mcpdUrl's path, e.g. `/mcpd`).
  pub async fn start_under(prefix: &str) -> Self {
    let state = Arc::new(Mutex::new(State::default()));
    let answering = Arc::clone(&state);
    let server = McpdServer::start(prefix, move |request| {
      let state = Arc::clone(&answering);
      async move { answer(&state, request).await }
    })
    .await;
    state.lock().origin = server.origin.clone();
    Self {
      url: server.url.clone(),
      origin: server.origin.clone(),
      state,
      _server: server,
    }
  }

  /// Every request of `route` is answered so from now on, before any script.
  pub fn set(&self, route: Route, mode: Mode) {
    let mut state = self.state.lock();
    match mode {
      Mode::Normal => state.modes.remove(&route),
      mode => state.modes.insert(route, mode),
    };
  }

  /// How many endless answers of `route` the client dropped.
  pub fn dropped(&self, route: Route) -> u32 {
    self.state.lock().dropped.get(&route).copied().unwrap_or(0)
  }

  /// Forgets the endless answers dropped so far.
  pub fn clear_dropped(&self) {
    self.state.lock().dropped.clear();
  }

  /// The most body bytes one endless answer got out before it was dropped.
  pub fn most_bytes_out(&self) -> u64 {
    self.state.lock().most_bytes_out
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
    matches!(self.state.lock().streams.get(index), Some(Some(stream)) if !stream.is_closed())
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

/// Records the request, waits out any delay, and answers it: scripted, or as docs/protocol.md says.
async fn answer(state: &Arc<Mutex<State>>, request: mcpd::Request) -> Reply {
  let request = Request::from(request);
  if let Some(reply) = hostile(state, &request) {
    return reply;
  }
  let (answer, delay, body) = decide(state, request.clone());
  if let Some(delay) = delay {
    tokio::time::sleep(delay).await;
  }
  {
    // Counted down before the answer leaves, so a client that waits for it
    // can never be seen overlapping with itself.
    let mut state = state.lock();
    if let Some(count) = state.in_flight.get_mut(&request.path) {
      *count -= 1;
    }
  }
  let status = match answer {
    Answer::Drop => return Reply::Drop,
    Answer::Status(status) => status,
  };
  if request.route == Route::Stream && status == 200 {
    let (sender, receiver) = mpsc::unbounded_channel();
    state.lock().streams.push(Some(sender));
    return Reply::EventStream {
      frames: receiver,
      coalesce: false,
    };
  }
  Reply::Respond(match (status, body) {
    (204, _) | (_, None) => Response::bare(status),
    (_, Some(body)) => Response::json(status, body.to_string()),
  })
}

/// The answer of a route set hostile, the request recorded; `None` for a normal one.
fn hostile(state: &Arc<Mutex<State>>, request: &Request) -> Option<Reply> {
  let mut locked = state.lock();
  let mut request = request.clone();
  let reply = match locked.modes.get(&request.route)?.clone() {
    Mode::Normal => return None,
    Mode::Endless {
      status,
      pace,
      prefix,
    } => {
      let (state, route) = (Arc::clone(state), request.route);
      Reply::Endless(Endless {
        status,
        pace,
        prefix,
        gone: Box::new(move |out| {
          let mut state = state.lock();
          *state.dropped.entry(route).or_default() += 1;
          state.most_bytes_out = state.most_bytes_out.max(out);
        }),
      })
    }
    Mode::Redirect(location) => {
      request.status = 302;
      let location = location.replace("{origin}", &locked.origin);
      Reply::Respond(Response::empty(302).header("location", location))
    }
  };
  locked.requests.push(request);
  Some(reply)
}

impl From<mcpd::Request> for Request {
  fn from(request: mcpd::Request) -> Self {
    let body = match request.body.is_empty() {
      true => Value::Null,
      false => serde_json::from_slice(&request.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&request.body).into_owned())),
    };
    Self {
      route: request.route,
      method: request.method,
      path: request.path,
      query: request.query,
      headers: request.headers,
      body,
      task_id: request.task_id,
      status: 0,
      at: request.at,
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
