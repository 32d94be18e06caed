//! The JSON bodies that cross the wire between mcpd and the registrar
//! (PROTOCOL.md sections 1-4), as serde types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const CLIENT_NAME: &str = "mcplocal-registrar";

/// One published provider, as the register request describes it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderDescriptor {
  pub name: String,
  #[serde(rename = "type")]
  pub kind: String,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub model: Option<String>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub description: Option<String>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub context_window: Option<u32>,
}

#[derive(Serialize)]
pub struct ClientInfo<'a> {
  pub name: &'a str,
  pub version: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest<'a> {
  #[serde(skip_serializing_if = "Option::is_none")]
  pub provider_session_id: Option<&'a str>,
  pub client: ClientInfo<'a>,
  pub providers: &'a [ProviderDescriptor],
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
  pub provider_session_id: String,
  /// Kept raw: a value that is not a positive number is ignored, not fatal.
  #[serde(default)]
  pub heartbeat_interval_ms: Option<Value>,
}

/// Load figures of one provider, sent with every heartbeat.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderLoad {
  pub name: String,
  pub in_flight: u32,
  pub queued: u32,
  pub max_concurrency: u32,
  pub completed: u64,
  pub failed: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest<'a> {
  pub provider_session_id: &'a str,
  pub providers: &'a [ProviderLoad],
}

/// A `task` event's data. `body` stays a raw value: validating it is the
/// dispatcher's job, so that a bad body is answered 400 rather than dropped.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEvent {
  pub task_id: String,
  #[serde(default)]
  pub provider: Option<String>,
  #[serde(default)]
  pub stream: Option<bool>,
  #[serde(default)]
  pub body: Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelEvent {
  pub task_id: String,
}

#[derive(Serialize)]
pub struct ResultPost<'a> {
  pub status: u16,
  pub body: &'a Value,
}

#[derive(Serialize)]
pub struct ChunkPost<'a> {
  pub seq: u64,
  pub chunks: &'a [String],
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn register_request_matches_the_protocol() {
    let providers = [ProviderDescriptor {
      name: "local-qwen".into(),
      kind: "ollama".into(),
      model: Some("qwen2.5:7b".into()),
      description: None,
      context_window: Some(32768),
    }];
    let request = RegisterRequest {
      provider_session_id: None,
      client: ClientInfo {
        name: CLIENT_NAME,
        version: "0.1.0",
      },
      providers: &providers,
    };
    assert_eq!(
      serde_json::to_string(&request).unwrap(),
      r#"{"client":{"name":"mcplocal-registrar","version":"0.1.0"},"providers":[{"name":"local-qwen","type":"ollama","model":"qwen2.5:7b","contextWindow":32768}]}"#
    );
  }

  #[test]
  fn task_event_keeps_the_body_raw() {
    let event: TaskEvent = serde_json::from_str(
      r#"{"taskId":"t-1","provider":"p","stream":true,"body":{"messages":[]},"extra":1}"#,
    )
    .unwrap();
    assert_eq!(event.task_id, "t-1");
    assert_eq!(event.stream, Some(true));
    assert_eq!(event.body["messages"], serde_json::json!([]));
  }
}
