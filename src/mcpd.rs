//! The HTTP side of mcpd: register, heartbeat, the stream request, and the
//! result and chunk POSTs (one attempt each; `dispatch::delivery` retries them).

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
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Register, heartbeat, result and chunk requests; the stream has no total timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const ERROR_BODY_BYTES: usize = 500;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct McpdClient {
  http: reqwest::Client,
  base: String,
  token: Secret,
  session: RwLock<Option<String>>,
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
      .connect_timeout(CONNECT_TIMEOUT)
      .user_agent(format!("{CLIENT_NAME}/{VERSION}"))
      .tcp_keepalive(Duration::from_secs(30));
    for certificate in extra_ca_certificates() {
      builder = builder.add_root_certificate(certificate);
    }
    let http = builder
      .build()
      .map_err(|error| Error::InvalidInput(format!("cannot set up the HTTP client: {error}")))?;
    Ok(Self {
      http,
      base,
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
    *self.session.write() = id;
  }

  fn url(&self, path: &str) -> String {
    format!("{}{path}", self.base)
  }

  fn headers(&self) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", self.token.expose())) {
      value.set_sensitive(true);
      headers.insert(AUTHORIZATION, value);
    }
    if let Some(id) = self.session.read().as_deref() {
      if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert(SESSION_HEADER, value);
      }
    }
    headers
  }

  async fn post_json<T: Serialize>(
    &self,
    operation: &'static str,
    path: &str,
    body: &T,
  ) -> Result<Response> {
    let body = serde_json::to_vec(body)
      .map_err(|error| Error::Protocol(format!("{operation}: cannot encode the body: {error}")))?;
    let response = self
      .http
      .post(self.url(path))
      .headers(self.headers())
      .header(CONTENT_TYPE, "application/json")
      .timeout(REQUEST_TIMEOUT)
      .body(body)
      .send()
      .await
      .map_err(|source| Error::Transport { operation, source })?;
    if response.status().is_success() {
      Ok(response)
    } else {
      Err(self.status_error(operation, response).await)
    }
  }

  /// An error naming the status and the body's `error.message` (or its first 500 bytes).
  pub async fn status_error(&self, operation: &'static str, response: Response) -> Error {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    let message = error_message(&body);
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
    let response = self
      .post_json("register", "/api/v1/llms/_provider-register", &request)
      .await?;
    let body = response.bytes().await.map_err(|source| Error::Transport {
      operation: "register",
      source,
    })?;
    let answer: RegisterResponse = serde_json::from_slice(&body).map_err(|error| {
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
    let mut url = Url::parse(&self.url("/api/v1/llms/_provider-stream"))
      .map_err(|error| Error::InvalidInput(format!("invalid mcpdUrl: {error}")))?;
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
  pub async fn post_result(&self, task_id: &str, status: u16, body: &Value) -> PostOutcome {
    let path = task_path(task_id, "result");
    self
      .post_once("result POST", &path, &ResultPost { status, body })
      .await
  }

  /// One chunk POST; the retries are the caller's (`dispatch::delivery`).
  pub async fn post_chunks(&self, task_id: &str, seq: u64, chunks: &[String]) -> PostOutcome {
    let path = task_path(task_id, "chunks");
    self
      .post_once("chunk POST", &path, &ChunkPost { seq, chunks })
      .await
  }

  /// A single attempt; a failure carries mcpd's `Retry-After` when it sent one.
  async fn post_once<T: Serialize>(
    &self,
    operation: &'static str,
    path: &str,
    body: &T,
  ) -> PostOutcome {
    let body = serde_json::to_vec(body).map_err(|error| PostFailure {
      error: Error::Protocol(format!("{operation}: cannot encode the body: {error}")),
      retry_after: None,
    })?;
    let response = self
      .http
      .post(self.url(path))
      .headers(self.headers())
      .header(CONTENT_TYPE, "application/json")
      .timeout(REQUEST_TIMEOUT)
      .body(body)
      .send()
      .await
      .map_err(|source| PostFailure {
        error: Error::Transport { operation, source },
        retry_after: None,
      })?;
    if response.status().is_success() {
      return Ok(());
    }
    let retry_after = retry_after(response.headers());
    Err(PostFailure {
      error: self.status_error(operation, response).await,
      retry_after,
    })
  }
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
      return message.to_owned();
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

fn task_path(task_id: &str, endpoint: &str) -> String {
  format!(
    "/api/v1/llms/_provider-tasks/{}/{endpoint}",
    encode_segment(task_id)
  )
}

/// Percent-encodes a task id for use as one path segment.
fn encode_segment(segment: &str) -> String {
  let mut out = String::with_capacity(segment.len());
  for byte in segment.bytes() {
    if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
      out.push(byte as char);
    } else {
      out.push_str(&format!("%{byte:02X}"));
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
  }

  #[test]
  fn task_ids_are_encoded_as_one_segment() {
    assert_eq!(encode_segment("t-1_a.b~c"), "t-1_a.b~c");
    assert_eq!(encode_segment("a/b?c d"), "a%2Fb%3Fc%20d");
  }
}
