//! The one fake mcpd server of the Rust tests and the bench: HTTP/1.1 on 127.0.0.1, each
//! request routed (docs/protocol.md's endpoints) and handed to the caller's handler, whose `Reply`
//! is an answer, a dropped connection, the SSE control channel, or a hostile endless body.
//!
//! Used by tests/support/mod.rs (`FakeMcpd`, the recording fake of tests/core.rs), tests/hostile.rs
//! (endless bodies, redirects) and bench/mcpd, which compiles this very file with
//! `#[path = "../../../tests/support/mcpd.rs"] mod mcpd;`.
//!
//! Why httparse and raw writes, not a hyper server: hyper reads requests well, but it frames every
//! answer whose length it does not know as `transfer-encoding: chunked` (close-delimited only for an
//! HTTP/1.0 peer), and it gives a handler the socket only on a 101 or CONNECT upgrade. The control
//! channel and the hostile bodies are close-delimited bytes written as they come (the registrar's
//! EOF-delimited body path is what the tests exercise), so the answers stay raw here; the request head
//! is parsed by httparse (hyper's own parser), and only the framing loop (content-length bodies,
//! keep-alive) is ours.
//!
//! Why bench/mcpd compiles this file instead of a crate of its own: the file needs only tokio,
//! httparse, percent-encoding and form_urlencoded (no serde, no hyper, not the addon), so bench/mcpd
//! stays a small tokio crate outside the addon's workspace, and the tests need no second manifest.
//! The cost, measured back to back from clean target dirs under the same shared load (2 cores,
//! load average 11): `cargo build --release` of bench/mcpd took 50.3 s wall / 16.7 s CPU with tokio
//! alone, 65.6 s wall / 24.2 s CPU now (these three crates, and serde_json for its chunk POSTs).
//!
//! Why the routes and bodies are read from the protocol's literals (docs/protocol.md) here, not with src/wire.rs's
//! types: a fake that decoded with the client's own types and paths would agree with any mistake
//! in them; the tests check the client's wire against this independent reading.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

/// docs/protocol.md section 1, under mcpd's URL (as are the other paths).
pub const REGISTER_PATH: &str = "/api/v1/llms/_provider-register";
/// Section 2: the SSE control channel.
pub const STREAM_PATH: &str = "/api/v1/llms/_provider-stream";
/// Section 3.
pub const HEARTBEAT_PATH: &str = "/api/v1/llms/_provider-heartbeat";
/// The task endpoints are `<TASKS_PATH><task id>/result` and `.../chunks`.
pub const TASKS_PATH: &str = "/api/v1/llms/_provider-tasks/";

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
  /// `POST` register.
  Register,
  /// `GET` the control channel.
  Stream,
  /// `POST` heartbeat.
  Heartbeat,
  /// `POST` a task's result.
  Result,
  /// `POST` a task's chunks.
  Chunks,
  /// Anything else (another method or path).
  Other,
}

/// One request as the server read it.
#[derive(Debug, Clone)]
pub struct Request {
  /// The endpoint the method and path name.
  pub route: Route,
  /// The request line as it came, e.g. `POST /mcpd/api/v1/llms/_provider-heartbeat HTTP/1.1`.
  pub line: String,
  /// `GET`, `POST`, ...
  pub method: String,
  /// The path as sent (still percent-encoded, the server's prefix included), without the query.
  pub path: String,
  /// The query's pairs, decoded.
  pub query: HashMap<String, String>,
  /// Lower-case names.
  pub headers: HashMap<String, String>,
  /// The content-length body, as it came.
  pub body: Vec<u8>,
  /// The task id of a result or chunk POST, percent-decoded.
  pub task_id: Option<String>,
  /// When the whole request had been read.
  pub at: std::time::Instant,
}

/// A complete answer; written as `HTTP/1.1 <status> <reason>`, the headers, then the body.
#[derive(Debug, Clone)]
pub struct Response {
  /// The status code; the reason phrase is the usual one where the tests meet it.
  pub status: u16,
  /// Written in this order, before the `content-length`.
  pub headers: Vec<(&'static str, String)>,
  /// Sent with a `content-length`; `None` sends the status line and headers only.
  pub body: Option<Vec<u8>>,
}

impl Response {
  /// A JSON body.
  pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
    Self {
      status,
      headers: vec![("content-type", "application/json".to_owned())],
      body: Some(body.into()),
    }
  }

  /// `content-length: 0`.
  pub fn empty(status: u16) -> Self {
    Self {
      status,
      headers: Vec::new(),
      body: Some(Vec::new()),
    }
  }

  /// The status line alone (a 204's answer).
  pub fn bare(status: u16) -> Self {
    Self {
      status,
      headers: Vec::new(),
      body: None,
    }
  }

  /// This answer with one more header.
  pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
    self.headers.push((name, value.into()));
    self
  }

  fn to_bytes(&self) -> Vec<u8> {
    let reason = match self.status {
      200 => "OK",
      201 => "Created",
      204 => "No Content",
      302 => "Found",
      307 => "Temporary Redirect",
      404 => "Not Found",
      _ => "Scripted",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", self.status);
    for (name, value) in &self.headers {
      out.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = &self.body {
      out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(self.body.as_deref().unwrap_or_default());
    out
  }
}

/// How fast an endless body comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
  /// 64 KiB writes, as fast as the socket takes them.
  Fast,
  /// 2 KiB every 2 ms (about 1 MiB/s): many small reads.
  Slow,
  /// One byte every 100 ms: never reaches a bound, only a timeout ends it.
  Trickle,
}

/// A hostile answer: `status`, then a close-delimited body of `prefix` and `x`s that never ends.
pub struct Endless {
  /// The answer's status.
  pub status: u16,
  /// How fast the `x`s come.
  pub pace: Pace,
  /// What the body starts with (the head of a JSON answer, say).
  pub prefix: &'static str,
  /// Told how many body bytes got out once the reader went away.
  pub gone: Box<dyn FnOnce(u64) + Send>,
}

/// What the handler makes of one request.
pub enum Reply {
  /// Answer and keep the connection for the next request.
  Respond(Response),
  /// Close the connection without answering.
  Drop,
  /// `200 text/event-stream`, then every write sent into `frames` until its sender is dropped,
  /// which closes the stream cleanly after the queued bytes. `frames` is dropped when the client
  /// goes away, so the sender sees it closed. With `coalesce` (the bench's), the writes queued
  /// together go out in one socket write; without (the tests'), each in a write of its own.
  EventStream {
    /// What to write, in order.
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    /// Queued writes go out as one.
    coalesce: bool,
  },
  /// A body without end, until the client drops the connection.
  Endless(Endless),
}

type Handler = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// The listening server; dropping it ends the accept loop and every connection.
pub struct McpdServer {
  /// `http://127.0.0.1:<port>`.
  pub origin: String,
  /// The origin and the path prefix mcpd's endpoints are served under.
  pub url: String,
  connections: Arc<AtomicU64>,
  accept: AbortHandle,
}

impl Drop for McpdServer {
  fn drop(&mut self) {
    self.accept.abort();
  }
}

impl McpdServer {
  /// Listens on 127.0.0.1 and serves the endpoints under `prefix` (`""` or e.g. `"/mcpd"`).
  pub async fn start<F, Fut>(prefix: &str, handler: F) -> Self
  where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
  {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("local addr"));
    let url = format!("{origin}{prefix}");
    let handler: Handler = Arc::new(move |request| Box::pin(handler(request)));
    let connections = Arc::new(AtomicU64::new(0));
    let prefix: Arc<str> = prefix.into();
    let counted = Arc::clone(&connections);
    let accept = tokio::spawn(async move {
      // Owned here, so aborting the accept loop aborts every connection with it.
      let mut served = JoinSet::new();
      loop {
        tokio::select! {
          accepted = listener.accept() => {
            let Ok((socket, _)) = accepted else { return };
            counted.fetch_add(1, Ordering::Relaxed);
            let _ = socket.set_nodelay(true);
            served.spawn(serve(socket, Arc::clone(&prefix), Arc::clone(&handler)));
          }
          Some(_) = served.join_next(), if !served.is_empty() => {}
        }
      }
    });
    Self {
      origin,
      url,
      connections,
      accept: accept.abort_handle(),
    }
  }

  /// TCP connections accepted so far.
  pub fn connections(&self) -> u64 {
    self.connections.load(Ordering::Relaxed)
  }
}

/// One connection: requests in a row (keep-alive) until the client closes it, or until a reply
/// that owns the connection to its end (a drop, the control channel, an endless body).
async fn serve(mut socket: TcpStream, prefix: Arc<str>, handler: Handler) {
  let mut buffer = Vec::with_capacity(16 * 1024);
  loop {
    let request = match read_request(&mut socket, &mut buffer, &prefix).await {
      Ok(Some(request)) => request,
      Ok(None) => return,
      Err(Unsupported) => {
        // The registrar (reqwest) and undici send content-length bodies; nothing else is read.
        let refusal = Response::empty(411).header("connection", "close");
        let _ = socket.write_all(&refusal.to_bytes()).await;
        return;
      }
    };
    match handler(request).await {
      Reply::Respond(response) => {
        if socket.write_all(&response.to_bytes()).await.is_err() {
          return;
        }
      }
      Reply::Drop => return,
      Reply::EventStream { frames, coalesce } => {
        return event_stream(socket, frames, coalesce).await
      }
      Reply::Endless(endless) => return self::endless(socket, endless).await,
    }
  }
}

/// A request whose body is not content-length framed.
struct Unsupported;

/// Reads one request (head and content-length body) off the connection; `None` at its end or
/// on a head that does not parse.
async fn read_request(
  socket: &mut TcpStream,
  buffer: &mut Vec<u8>,
  prefix: &str,
) -> Result<Option<Request>, Unsupported> {
  let (head_len, line, method, target, headers) = loop {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut slots);
    match head.parse(buffer) {
      Ok(httparse::Status::Complete(head_len)) => {
        let line_end = buffer.iter().position(|&b| b == b'\r' || b == b'\n');
        let line = String::from_utf8_lossy(&buffer[..line_end.unwrap_or(0)]).into_owned();
        let headers: HashMap<String, String> = head
          .headers
          .iter()
          .map(|header| {
            let value = String::from_utf8_lossy(header.value).trim().to_owned();
            (header.name.to_ascii_lowercase(), value)
          })
          .collect();
        let method = head.method.unwrap_or_default().to_owned();
        let target = head.path.unwrap_or_default().to_owned();
        break (head_len, line, method, target, headers);
      }
      Ok(httparse::Status::Partial) => {
        if !read_more(socket, buffer).await {
          return Ok(None);
        }
      }
      Err(_) => return Ok(None),
    }
  };
  if headers.contains_key("transfer-encoding") {
    return Err(Unsupported);
  }
  let length: usize = match headers.get("content-length") {
    Some(length) => length.parse().map_err(|_| Unsupported)?,
    None => 0,
  };
  while buffer.len() < head_len + length {
    if !read_more(socket, buffer).await {
      return Ok(None);
    }
  }
  let body = buffer[head_len..head_len + length].to_vec();
  buffer.drain(..head_len + length);
  let (path, query) = target.split_once('?').unwrap_or((&target, ""));
  let query = form_urlencoded::parse(query.as_bytes())
    .into_owned()
    .collect();
  let (route, task_id) = route_of(&method, path.strip_prefix(prefix).unwrap_or(""));
  Ok(Some(Request {
    route,
    line,
    method,
    path: path.to_owned(),
    query,
    headers,
    body,
    task_id,
    at: std::time::Instant::now(),
  }))
}

async fn read_more(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
  buffer.reserve(16 * 1024);
  matches!(socket.read_buf(buffer).await, Ok(read) if read > 0)
}

/// The endpoint of `path` (the server's prefix already taken off), and a task POST's decoded id.
fn route_of(method: &str, path: &str) -> (Route, Option<String>) {
  match (method, path) {
    ("POST", REGISTER_PATH) => (Route::Register, None),
    ("GET", STREAM_PATH) => (Route::Stream, None),
    ("POST", HEARTBEAT_PATH) => (Route::Heartbeat, None),
    ("POST", _) => {
      let task = path
        .strip_prefix(TASKS_PATH)
        .and_then(|rest| rest.rsplit_once('/'))
        .filter(|(task, _)| !task.contains('/'));
      let decode = |task: &str| {
        percent_encoding::percent_decode_str(task)
          .decode_utf8_lossy()
          .into_owned()
      };
      match task {
        Some((task, "result")) => (Route::Result, Some(decode(task))),
        Some((task, "chunks")) => (Route::Chunks, Some(decode(task))),
        _ => (Route::Other, None),
      }
    }
    _ => (Route::Other, None),
  }
}

/// Serves `text/event-stream` until the sender is dropped or the client goes away; the end
/// is a clean close, so the client reads every byte first.
async fn event_stream(
  socket: TcpStream,
  mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
  coalesce: bool,
) {
  let (mut reader, mut writer) = socket.into_split();
  let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
  let mut open = writer.write_all(head.as_bytes()).await.is_ok();
  let mut out = Vec::with_capacity(64 * 1024);
  let mut scratch = [0u8; 512];
  while open {
    open = tokio::select! {
      frame = frames.recv() => match frame {
        Some(frame) => {
          out.clear();
          out.extend_from_slice(&frame);
          if coalesce {
            while let Ok(frame) = frames.try_recv() {
              out.extend_from_slice(&frame);
            }
          }
          writer.write_all(&out).await.is_ok()
        }
        None => false,
      },
      read = reader.read(&mut scratch) => matches!(read, Ok(n) if n > 0),
    };
  }
  // Closed before the shutdown, so a sender sees the channel gone as soon as it is.
  drop(frames);
  let _ = writer.shutdown().await;
}

/// Writes the endless body until the reader goes away, then says how much got out.
async fn endless(mut socket: TcpStream, endless: Endless) {
  let Endless {
    status,
    pace,
    prefix,
    gone,
  } = endless;
  let head = format!(
    "HTTP/1.1 {status} Hostile\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{prefix}"
  );
  if socket.write_all(head.as_bytes()).await.is_err() {
    return;
  }
  let (size, pause) = match pace {
    Pace::Fast => (64 * 1024, None),
    Pace::Slow => (2048, Some(Duration::from_millis(2))),
    Pace::Trickle => (1, Some(Duration::from_millis(100))),
  };
  let block = vec![b'x'; size];
  let mut out = 0u64;
  while socket.write_all(&block).await.is_ok() {
    out += block.len() as u64;
    if let Some(pause) = pause {
      tokio::time::sleep(pause).await;
    }
  }
  gone(out);
}
