//! The HTTP side of mcpd: register, heartbeat, the stream request, and the
//! result and chunk POSTs (one attempt each; `dispatch::delivery` retries them).
//! Every body read from mcpd goes through [`read_bounded`]; redirects are never followed.

use std::net::IpAddr;
use std::time::Duration;

use parking_lot::RwLock;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use reqwest::{Response, Url};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::wire::{
  ChunkPost, ClientInfo, HeartbeatRequest, ProviderDescriptor, ProviderLoad, RegisterRequest,
  RegisterResponse, ResultPost, CLIENT_NAME,
};

const SESSION_HEADER: &str = "x-mcpctl-provider-session";
/// The W3C Trace Context header on result and chunk POSTs (docs/protocol.md section 5).
const TRACEPARENT: &str = "traceparent";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Register, heartbeat, result and chunk requests; the stream has no total timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an error body (or of its `error.message`) an error message quotes.
const ERROR_BODY_BYTES: usize = 500;
/// The most of a register answer the registrar reads (docs/protocol.md section 4).
pub const REGISTER_BODY_LIMIT: usize = 1024 * 1024;
/// The most of any other body it reads: heartbeat, result and chunk answers,
/// error bodies (the stream connect's included).
pub const ANSWER_BODY_LIMIT: usize = 64 * 1024;
/// The fixed prefix of the task endpoints; the task id is the next segment.
const TASKS_PATH: &str = "/api/v1/llms/_provider-tasks/";

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct McpdClient {
  http: reqwest::Client,
  base: String,
  /// `base` parsed once: an endpoint's URL is this with its path set, so a POST
  /// does not parse the scheme and host again (the host's IDNA pass was about 1%
  /// of the runtime's CPU per task: docs/benchmark.md).
  base_url: Url,
  /// The path `base` carries (mcpd served under a prefix), without a trailing slash.
  base_path: String,
  /// The headers every request carries (Authorization, the session once known),
  /// built when the session changes rather than formatted for every POST.
  common_headers: RwLock<HeaderMap>,
  token: Secret,
  session: RwLock<Option<String>>,
}

/// Whether a path segment is `.` or `..` once `%2E`/`%2e` are decoded, as a
/// URL parser reads it. Checked per segment of every POST's path, so without
/// the two `replace` allocations a decode-then-compare would cost.
fn is_dot_segment(segment: &str) -> bool {
  let mut rest = segment.as_bytes();
  let mut dots = 0;
  while !rest.is_empty() && dots <= 2 {
    rest = match rest {
      [b'.', tail @ ..] => tail,
      [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
      _ => return false,
    };
    dots += 1;
  }
  rest.is_empty() && (dots == 1 || dots == 2)
}

impl McpdClient {
  /// `mcpd_url` may carry a path prefix; plain http is accepted for loopback
  /// hosts, and for others only with `allow_insecure_http`.
  pub fn new(mcpd_url: &str, token: Secret, allow_insecure_http: bool) -> Result<Self> {
    let base = validate_url(mcpd_url, allow_insecure_http)?;
    if token.expose().is_empty() || !token.expose().bytes().all(|b| b.is_ascii_graphic()) {
      return Err(Error::InvalidInput(
        "token must be visible ASCII without spaces (it goes in the Authorization header)"
          .to_owned(),
      ));
    }
    let mut builder = reqwest::Client::builder()
      // mcpd has no reason to redirect: a redirect is answered as an error that
      // names the target's origin (`status_error`), and nothing is sent there.
      .redirect(reqwest::redirect::Policy::none())
      .connect_timeout(CONNECT_TIMEOUT)
      .user_agent(format!("{CLIENT_NAME}/{VERSION}"))
      .tcp_keepalive(Duration::from_secs(30));
    for certificate in extra_ca_certificates() {
      builder = builder.add_root_certificate(certificate);
    }
    let http = builder
      .build()
      .map_err(|error| Error::InvalidInput(format!("cannot set up the HTTP client: {error}")))?;
    let base_url = Url::parse(&base)
      .map_err(|error| Error::InvalidInput(format!("mcpdUrl '{base}' is not a URL: {error}")))?;
    let base_path = base_url.path().trim_end_matches('/').to_owned();
    let common_headers = RwLock::new(common_headers(&token, None));
    Ok(Self {
      http,
      base,
      base_url,
      base_path,
      common_headers,
      token,
      session: RwLock::new(None),
    })
  }

  pub fn token(&self) -> &Secret {
    &self.token
  }

  pub fn session_id(&self) -> Option<String> {
    self.session.read().clone()
  }

  pub fn set_session_id(&self, id: Option<String>) {
    *self.common_headers.write() = common_headers(&self.token, id.as_deref());
    *self.session.write() = id;
  }

  /// The URL of `path` (already percent-encoded) under mcpd's URL, refused
  /// unless it keeps every segment exactly as given: a URL parser normalises
  /// dot segments (`.`, `..`, `%2E%2E` too) and drops empty ones' meaning, and
  /// a task id must never land on another endpoint that way.
  fn endpoint_url(&self, path: &str) -> Result<Url> {
    let raw = format!("{}{path}", self.base);
    let exact = |url: &Url| {
      url.as_str() == raw
        && path
          .split('/')
          .skip(1)
          .all(|segment| !segment.is_empty() && !is_dot_segment(segment))
    };
    let mut url = self.base_url.clone();
    url.set_path(&format!("{}{path}", self.base_path));
    if exact(&url) {
      Ok(url)
    } else {
      Err(Error::InvalidInput(format!(
        "'{path}' is not a usable mcpd endpoint path (an empty or dot segment)"
      )))
    }
  }

  fn headers(&self) -> HeaderMap {
    self.common_headers.read().clone()
  }

  /// Sends one JSON POST to `path` and hands back mcpd's answer, whatever its status.
  async fn send_json(
    &self,
    operation: &'static str,
    path: &str,
    body: impl Into<reqwest::Body>,
  ) -> Result<Response> {
    self.send_traced(operation, path, body, None).await
  }

  /// [`Self::send_json`] with a task's `traceparent` header, when it has one
  /// (docs/protocol.md section 5).
  async fn send_traced(
    &self,
    operation: &'static str,
    path: &str,
    body: impl Into<reqwest::Body>,
    traceparent: Option<HeaderValue>,
  ) -> Result<Response> {
    let mut request = self
      .http
      .post(self.endpoint_url(path)?)
      .headers(self.headers())
      .header(CONTENT_TYPE, "application/json");
    if let Some(traceparent) = traceparent {
      request = request.header(TRACEPARENT, traceparent);
    }
    request
      .timeout(REQUEST_TIMEOUT)
      .body(body)
      .send()
      .await
      .map_err(|source| Error::Transport { operation, source })
  }

  /// POSTs `body` as JSON; a 2xx answer's body is read up to
  /// [`ANSWER_BODY_LIMIT`] (so the connection can be reused) and otherwise ignored.
  async fn post_json<T: Serialize>(
    &self,
    operation: &'static str,
    path: &str,
    body: &T,
  ) -> Result<BoundedBody> {
    self
      .post_json_bounded(operation, path, body, ANSWER_BODY_LIMIT)
      .await
  }

  /// POSTs `body` as JSON and reads a 2xx answer's body up to `limit` bytes;
  /// a non-2xx answer is an error ([`McpdClient::status_error`]).
  async fn post_json_bounded<T: Serialize>(
    &self,
    operation: &'static str,
    path: &str,
    body: &T,
    limit: usize,
  ) -> Result<BoundedBody> {
    let response = self
      .send_json(operation, path, encode(operation, body)?)
      .await?;
    if response.status().is_success() {
      Ok(read_bounded(response, limit).await)
    } else {
      Err(self.status_error(operation, response).await)
    }
  }

  /// An error naming the status and the body's `error.message` (or its first
  /// 500 bytes). The body is read up to [`ANSWER_BODY_LIMIT`], then dropped
  /// with its connection; a redirect's body is not read at all.
  pub async fn status_error(&self, operation: &'static str, response: Response) -> Error {
    let status = response.status().as_u16();
    let message = if response.status().is_redirection() {
      redirect_message(&response)
    } else {
      let body = read_bounded(response, ANSWER_BODY_LIMIT).await;
      error_message(&body.bytes)
    };
    Error::Status {
      operation,
      status,
      message: self.token.redact(&message),
    }
  }

  pub async fn register(&self, providers: &[ProviderDescriptor]) -> Result<RegisterResponse> {
    let sticky = self.session_id();
    let request = RegisterRequest {
      provider_session_id: sticky.as_deref(),
      client: ClientInfo {
        name: CLIENT_NAME,
        version: VERSION,
      },
      providers,
    };
    let body = self
      .post_json_bounded(
        "register",
        "/api/v1/llms/_provider-register",
        &request,
        REGISTER_BODY_LIMIT,
      )
      .await?;
    match body.end {
      BodyEnd::Complete => {}
      BodyEnd::OverLimit => {
        return Err(Error::Protocol(format!(
          "register failed: mcpd's answer is over {REGISTER_BODY_LIMIT} bytes; not reading more of it"
        )))
      }
      BodyEnd::Failed(source) => {
        return Err(Error::Transport {
          operation: "register",
          source,
        })
      }
    }
    let answer: RegisterResponse = serde_json::from_slice(&body.bytes).map_err(|error| {
      Error::Protocol(format!(
        "register failed: mcpd's answer is not {{ providerSessionId, ... }}: {error}"
      ))
    })?;
    if !crate::config::is_session_id(&answer.provider_session_id) {
      return Err(Error::Protocol(
        "register failed: mcpd answered an unusable providerSessionId".to_owned(),
      ));
    }
    Ok(answer)
  }

  pub async fn heartbeat(&self, providers: &[ProviderLoad]) -> Result<()> {
    let Some(id) = self.session_id() else {
      return Err(Error::Protocol(
        "heartbeat skipped: no session yet".to_owned(),
      ));
    };
    let request = HeartbeatRequest {
      provider_session_id: &id,
      providers,
    };
    self
      .post_json("heartbeat", "/api/v1/llms/_provider-heartbeat", &request)
      .await
      .map(drop)
  }

  /// Opens the control channel; the caller judges the status.
  pub async fn open_stream(&self, last_event_id: Option<&str>) -> Result<Response> {
    let id = self.session_id().unwrap_or_default();
    let mut url = self.endpoint_url("/api/v1/llms/_provider-stream")?;
    url.query_pairs_mut().append_pair("providerSessionId", &id);
    let mut request = self
      .http
      .get(url)
      .headers(self.headers())
      .header(ACCEPT, "text/event-stream")
      .header(CACHE_CONTROL, "no-cache");
    if let Some(last) = last_event_id.and_then(|last| HeaderValue::from_str(last).ok()) {
      request = request.header("last-event-id", last);
    }
    request.send().await.map_err(|source| Error::Transport {
      operation: "stream connect",
      source,
    })
  }

  /// One result POST; the retries are the caller's (`dispatch::delivery`).
  pub async fn post_result<B: Serialize + ?Sized>(
    &self,
    task_id: &str,
    status: u16,
    body: &B,
  ) -> PostOutcome {
    self
      .post_result_with(task_id, status, body, None, None)
      .await
  }

  /// One result POST carrying response headers for mcpd to relay (`retry-after`)
  /// and the task's `traceparent` header.
  pub async fn post_result_with<B: Serialize + ?Sized>(
    &self,
    task_id: &str,
    status: u16,
    body: &B,
    headers: Option<&Value>,
    traceparent: Option<HeaderValue>,
  ) -> PostOutcome {
    let path = task_path(task_id, "result");
    let post = ResultPost {
      status,
      body,
      headers,
    };
    self
      .post_once("result POST", &path, &post, traceparent)
      .await
  }

  /// One chunk POST; the retries are the caller's (`dispatch::delivery`).
  pub async fn post_chunks(&self, task_id: &str, seq: u64, chunks: &[String]) -> PostOutcome {
    let path = task_path(task_id, "chunks");
    // Built by hand, not by serde: the payloads are escaped in one pass.
    let body = ChunkPost { seq, chunks }.to_json();
    self
      .post_once_encoded("chunk POST", &path, body.into_bytes(), None)
      .await
  }

  /// One attempt of a chunk POST whose body ([`ChunkPost`]'s JSON) is built,
  /// with the task's `traceparent` header.
  pub async fn post_chunk_body(
    &self,
    task_id: &str,
    body: bytes::Bytes,
    traceparent: Option<HeaderValue>,
  ) -> PostOutcome {
    let path = task_path(task_id, "chunks");
    self
      .post_once_encoded("chunk POST", &path, body, traceparent)
      .await
  }

  /// A single attempt; a failure carries mcpd's `Retry-After` when it sent one.
  async fn post_once<T: Serialize>(
    &self,
    operation: &'static str,
    path: &str,
    body: &T,
    traceparent: Option<HeaderValue>,
  ) -> PostOutcome {
    let fail = |error: Error| PostFailure {
      error,
      retry_after: None,
    };
    let body = encode(operation, body).map_err(fail)?;
    self
      .post_once_encoded(operation, path, body, traceparent)
      .await
  }

  /// [`Self::post_once`] with the body already encoded as JSON.
  async fn post_once_encoded(
    &self,
    operation: &'static str,
    path: &str,
    body: impl Into<reqwest::Body>,
    traceparent: Option<HeaderValue>,
  ) -> PostOutcome {
    let fail = |error: Error| PostFailure {
      error,
      retry_after: None,
    };
    let response = self
      .send_traced(operation, path, body, traceparent)
      .await
      .map_err(fail)?;
    if response.status().is_success() {
      // Read (bounded) so the connection can be reused; the status decides.
      read_bounded(response, ANSWER_BODY_LIMIT).await;
      return Ok(());
    }
    let retry_after = retry_after(response.headers());
    Err(PostFailure {
      error: self.status_error(operation, response).await,
      retry_after,
    })
  }
}

/// Authorization (marked sensitive) and, once known, the session header.
fn common_headers(token: &Secret, session: Option<&str>) -> HeaderMap {
  let mut headers = HeaderMap::new();
  if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
    value.set_sensitive(true);
    headers.insert(AUTHORIZATION, value);
  }
  if let Some(id) = session {
    if let Ok(value) = HeaderValue::from_str(id) {
      headers.insert(SESSION_HEADER, value);
    }
  }
  headers
}

/// A request body as JSON; an unencodable one is a protocol error naming `operation`.
fn encode<T: Serialize>(operation: &'static str, body: &T) -> Result<Vec<u8>> {
  serde_json::to_vec(body)
    .map_err(|error| Error::Protocol(format!("{operation}: cannot encode the body: {error}")))
}

/// What one result or chunk POST attempt gave.
pub type PostOutcome = std::result::Result<(), PostFailure>;

/// A failed POST attempt: the error, and how long mcpd asked us to wait.
#[derive(Debug)]
pub struct PostFailure {
  pub error: Error,
  pub retry_after: Option<Duration>,
}

/// `Retry-After` in delta-seconds (the form mcpd uses); an HTTP date is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
  let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
  let seconds: f64 = value.trim().parse().ok()?;
  (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}

/// What an error answer says: `error.message` from a JSON body, else its first 500 bytes.
pub fn error_message(body: &[u8]) -> String {
  if let Ok(value) = serde_json::from_slice::<Value>(body) {
    if let Some(message) = value
      .pointer("/error/message")
      .or_else(|| value.pointer("/message"))
      .or_else(|| value.get("error").filter(|error| error.is_string()))
      .and_then(Value::as_str)
    {
      return head_of(message, ERROR_BODY_BYTES).to_owned();
    }
  }
  let head = &body[..body.len().min(ERROR_BODY_BYTES)];
  let text = String::from_utf8_lossy(head);
  let text = text.trim_end_matches('\u{FFFD}').trim();
  if text.is_empty() {
    "(empty body)".to_owned()
  } else {
    text.to_owned()
  }
}

/// `text` cut to at most `limit` bytes, on a char boundary.
fn head_of(text: &str, limit: usize) -> &str {
  let mut end = text.len().min(limit);
  while !text.is_char_boundary(end) {
    end -= 1;
  }
  &text[..end]
}

/// How a bounded read of a body ended.
#[derive(Debug)]
pub enum BodyEnd {
  /// The whole body was read.
  Complete,
  /// More than the limit came: the rest was not read, and the connection was dropped.
  OverLimit,
  /// The connection failed (or the request timed out) before the body's end.
  Failed(reqwest::Error),
}

/// What [`read_bounded`] read: at most its limit of bytes.
#[derive(Debug)]
pub struct BoundedBody {
  pub bytes: Vec<u8>,
  pub end: BodyEnd,
}

/// The one reader for every body read from mcpd: reads up to `limit` bytes and
/// drops the response (closing its connection) as soon as more arrive, so an
/// endless or huge body costs at most `limit` bytes. How long it may take is
/// the request's timeout (or the caller's).
pub async fn read_bounded(mut response: Response, limit: usize) -> BoundedBody {
  let mut bytes = Vec::new();
  loop {
    match response.chunk().await {
      Ok(Some(chunk)) => {
        let room = limit - bytes.len();
        if chunk.len() > room {
          bytes.extend_from_slice(&chunk[..room]);
          return BoundedBody {
            bytes,
            end: BodyEnd::OverLimit,
          };
        }
        bytes.extend_from_slice(&chunk);
      }
      Ok(None) => {
        return BoundedBody {
          bytes,
          end: BodyEnd::Complete,
        }
      }
      Err(error) => {
        return BoundedBody {
          bytes,
          end: BodyEnd::Failed(error),
        }
      }
    }
  }
}

/// What a redirect answer says: where it points, as an origin only (the full
/// `Location` may carry anything, the token included).
fn redirect_message(response: &Response) -> String {
  let target = response
    .headers()
    .get(reqwest::header::LOCATION)
    .and_then(|value| value.to_str().ok())
    .and_then(|location| response.url().join(location).ok());
  match target {
    Some(target) if target.origin() == response.url().origin() => {
      "a redirect within mcpd's origin, which is not followed: mcpd must answer this endpoint itself"
        .to_owned()
    }
    Some(target) => format!(
      "a redirect to another origin ({}), which is not followed",
      target.origin().ascii_serialization()
    ),
    None => "a redirect without a usable Location, which is not followed".to_owned(),
  }
}

fn validate_url(mcpd_url: &str, allow_insecure_http: bool) -> Result<String> {
  let url = Url::parse(mcpd_url.trim())
    .map_err(|error| Error::InvalidInput(format!("mcpdUrl '{mcpd_url}' is not a URL: {error}")))?;
  if !url.username().is_empty() || url.password().is_some() {
    return Err(Error::InvalidInput(
      "mcpdUrl must not carry credentials; use the token option".to_owned(),
    ));
  }
  match url.scheme() {
    "https" => {}
    "http" if allow_insecure_http || is_loopback(&url) => {}
    "http" => {
      return Err(Error::InvalidInput(format!(
        "mcpdUrl '{url}' is plain http to a non-loopback host; use https or set allowInsecureHttp"
      )))
    }
    scheme => {
      return Err(Error::InvalidInput(format!(
        "mcpdUrl must be http or https, not '{scheme}'"
      )))
    }
  }
  if url.query().is_some() || url.fragment().is_some() {
    return Err(Error::InvalidInput(
      "mcpdUrl must not have a query or fragment".to_owned(),
    ));
  }
  Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn is_loopback(url: &Url) -> bool {
  let Some(host) = url.host_str() else {
    return false;
  };
  let bare = host.trim_start_matches('[').trim_end_matches(']');
  host.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The path of a task's endpoint, its id one percent-encoded segment. An id
/// that cannot be one segment (empty, `.`, `..`) gives a path that
/// `endpoint_url` refuses, so nothing is posted for it (the dispatcher refuses
/// such ids before they get here).
fn task_path(task_id: &str, endpoint: &str) -> String {
  format!("{TASKS_PATH}{}/{endpoint}", encode_segment(task_id))
}

/// Percent-encodes a task id as one path segment: every byte outside RFC 3986's
/// unreserved set becomes `%XX`, and so does a `.` when the whole segment is
/// `.` or `..`.
fn encode_segment(segment: &str) -> String {
  use std::fmt::Write as _;
  let dots_only = matches!(segment, "." | "..");
  let mut out = String::with_capacity(segment.len());
  for byte in segment.bytes() {
    if (byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)) && !dots_only {
      out.push(byte as char);
    } else {
      let _ = write!(out, "%{byte:02X}");
    }
  }
  out
}

/// The PEM bundle named by `NODE_EXTRA_CA_CERTS`, trusted on top of the OS
/// roots, as Node does; an unreadable file is reported and skipped.
fn extra_ca_certificates() -> Vec<reqwest::Certificate> {
  let Some(path) = std::env::var_os("NODE_EXTRA_CA_CERTS").filter(|path| !path.is_empty()) else {
    return Vec::new();
  };
  let loaded = std::fs::read(&path)
    .map_err(|error| error.to_string())
    .and_then(|pem| reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| error.to_string()));
  match loaded {
    Ok(certificates) => certificates,
    Err(error) => {
      tracing::warn!(path = %std::path::Path::new(&path).display(), %error, "ignoring NODE_EXTRA_CA_CERTS");
      Vec::new()
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn urls_keep_their_prefix_and_refuse_insecure_hosts() {
    assert_eq!(
      validate_url("https://host/mcpd/", false).unwrap(),
      "https://host/mcpd"
    );
    assert_eq!(
      validate_url("http://127.0.0.1:8080", false).unwrap(),
      "http://127.0.0.1:8080"
    );
    assert_eq!(
      validate_url("http://localhost:1", false).unwrap(),
      "http://localhost:1"
    );
    assert_eq!(
      validate_url("http://[::1]:1/x", false).unwrap(),
      "http://[::1]:1/x"
    );
    assert!(validate_url("http://mcpd.example", false)
      .unwrap_err()
      .to_string()
      .contains("allowInsecureHttp"));
    assert!(validate_url("http://mcpd.example", true).is_ok());
    assert!(validate_url("ftp://mcpd.example", true).is_err());
    assert!(validate_url("not a url", true).is_err());
    assert!(validate_url("https://user:pw@mcpd.example", true).is_err());
  }

  #[test]
  fn error_messages_prefer_error_message() {
    assert_eq!(
      error_message(br#"{"error":{"message":"bad token"}}"#),
      "bad token"
    );
    assert_eq!(error_message(br#"{"error":"nope"}"#), "nope");
    assert_eq!(error_message(b""), "(empty body)");
    let long = vec![b'x'; 2000];
    assert_eq!(error_message(&long).len(), 500);
    // A cut inside a UTF-8 sequence does not leave a replacement character.
    let mut text = vec![b'a'; 499];
    text.extend_from_slice("é".as_bytes());
    assert_eq!(error_message(&text), "a".repeat(499));
    // A long error.message is cut to 500 bytes too, on a char boundary.
    let long = serde_json::json!({ "error": { "message": "é".repeat(400) } }).to_string();
    assert_eq!(error_message(long.as_bytes()), "é".repeat(250));
  }

  /// `is_dot_segment` refuses exactly what the decode-then-compare it replaced did.
  #[test]
  fn dot_segments_are_those_a_decode_then_compare_finds() {
    let decoded = |segment: &str| {
      let text = segment.replace("%2E", ".").replace("%2e", ".");
      text == "." || text == ".."
    };
    for segment in [
      ".",
      "..",
      "...",
      "%2e",
      "%2E",
      "%2e%2E",
      ".%2e",
      "%2E.",
      "%2e.%2e",
      "%2",
      "%2x",
      "%",
      "a",
      ".a",
      "a.",
      "..%2",
      "%2e%2e%2e",
      "%%2E2e",
      "%2E%2e",
      "%2f",
      "",
    ] {
      assert_eq!(is_dot_segment(segment), decoded(segment), "{segment:?}");
    }
  }

  /// The URL is the base parsed once with the path set; what it refuses is the same
  /// as a whole parse of the joined text would be; the headers follow the session.
  #[test]
  fn endpoint_urls_keep_the_prefix_and_refuse_what_a_parser_would_change() {
    let client = McpdClient::new(
      "http://127.0.0.1:9/mcpd/",
      Secret::new("tok".to_owned()),
      false,
    )
    .unwrap();
    let task = task_path("a b/../c", "result");
    assert_eq!(
      client.endpoint_url(&task).unwrap().as_str(),
      format!("http://127.0.0.1:9/mcpd{task}")
    );
    for bad in ["/api//x", "/api/./x", "/api/../x", "/api/%2e%2E/x"] {
      assert!(client.endpoint_url(bad).is_err(), "{bad}");
    }
    assert_eq!(client.headers().get(SESSION_HEADER), None);
    assert_eq!(client.headers()[AUTHORIZATION], "Bearer tok");
    client.set_session_id(Some("ps-1".to_owned()));
    assert_eq!(client.headers()[SESSION_HEADER], "ps-1");
    client.set_session_id(None);
    assert_eq!(client.headers().get(SESSION_HEADER), None);
  }

  /// A segment of dots only is encoded whole, so no URL parser can take it for
  /// a dot segment; the ids that reach mcpd are checked on the wire in tests/core.rs.
  #[test]
  fn dot_segments_are_encoded() {
    assert_eq!(encode_segment("."), "%2E");
    assert_eq!(encode_segment(".."), "%2E%2E");
    assert_eq!(encode_segment("..."), "...");
  }

  /// Property test (proptest): whatever the task id mcpd sends, the URL a result
  /// or chunk POST goes to parses back (by the url crate, as reqwest sends it) to
  /// the prefix, the one segment that decodes to the id, and the endpoint; an
  /// id that cannot be one segment gives no URL at all.
  mod properties {
    use super::*;
    use proptest::prelude::*;

    fn task_id() -> impl Strategy<Value = String> {
      prop_oneof![
        // Any text at all (control characters, surrogate-free Unicode, `%`, `/`).
        any::<String>(),
        // Mostly URL syntax, where an encoder's mistakes would show.
        prop::collection::vec(
          prop::sample::select(vec![
            ".", "..", "/", "%", "%2e", "%2F", "?", "#", ";", "\\", " ", "+", "&", "=", "@", ":",
            "a", "Z", "9", "-", "_", "~", "é", "😀", "\u{0}", "\u{7f}", "[", "]",
          ]),
          0..12,
        )
        .prop_map(|pieces| pieces.concat()),
        "[.]{0,4}",
      ]
    }

    /// One client for every case: building one loads the OS's root certificates,
    /// which took about 40 ms a case here.
    static CLIENT: std::sync::LazyLock<McpdClient> = std::sync::LazyLock::new(|| {
      McpdClient::new(
        "http://127.0.0.1:9/mcpd/",
        Secret::new("tok".to_owned()),
        false,
      )
      .unwrap()
    });

    proptest! {
      #![proptest_config(crate::proptest_config(3000))]

      #[test]
      fn every_task_path_parses_back_to_its_one_segment(
        id in task_id(),
        endpoint in prop::sample::select(vec!["result", "chunks"]),
      ) {
        let built = CLIENT.endpoint_url(&task_path(&id, endpoint));
        if matches!(id.as_str(), "" | "." | "..") {
          prop_assert!(built.is_err(), "{id:?} gave {built:?}");
          return Ok(());
        }
        let built = built.unwrap();
        let parsed = Url::parse(built.as_str()).unwrap();
        prop_assert_eq!(&parsed, &built);
        let segments: Vec<&str> = parsed.path_segments().unwrap().collect();
        prop_assert_eq!(
          &segments[..5],
          &["mcpd", "api", "v1", "llms", "_provider-tasks"][..]
        );
        prop_assert_eq!(segments.len(), 7, "{:?}", segments);
        prop_assert_eq!(segments[6], endpoint);
        let decoded = percent_encoding::percent_decode_str(segments[5]).decode_utf8().unwrap();
        prop_assert_eq!(decoded, id.as_str());
        prop_assert_eq!(parsed.query(), None);
        prop_assert_eq!(parsed.fragment(), None);
      }
    }
  }
}
