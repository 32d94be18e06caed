//! The OpenAI chat-completions wire format on both sides of a provider call:
//! a request body becomes `CompletionOptions`; a `CompletionResult` becomes a
//! `chat.completion`, and `CompletionChunk`s become `chat.completion.chunk` payloads.
//! The JavaScript side's types are declared here, as serde types (they cross as JSON
//! text); their `#[napi(object)]` attributes only generate index.d.ts (both
//! conversions off), so nothing here calls napi.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Number, Value};

use crate::owner::Refusal;
use crate::wire::{write_json_str, write_json_str_content};

/// An OpenAI error answer: the HTTP status plus `{ "error": { message, type, code } }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
  pub status: u16,
  pub kind: &'static str,
  pub code: &'static str,
  pub message: String,
  /// The request field at fault (`max_tokens`), as OpenAI's `error.param`.
  pub param: Option<&'static str>,
  /// Seconds for the result POST's `retry-after` header (docs/protocol.md section 6).
  pub retry_after: Option<u64>,
}

impl ErrorReply {
  pub fn model_not_found(provider: &str) -> Self {
    Self {
      status: 404,
      kind: "invalid_request_error",
      code: "model_not_found",
      message: format!("the model '{provider}' is not published by this registrar"),
      param: None,
      retry_after: None,
    }
  }

  pub fn invalid_request(message: impl Into<String>) -> Self {
    Self {
      status: 400,
      kind: "invalid_request_error",
      code: "invalid_request",
      message: message.into(),
      param: None,
      retry_after: None,
    }
  }

  pub fn provider_error(message: impl Into<String>) -> Self {
    Self {
      status: 502,
      kind: "provider_error",
      code: "provider_error",
      message: message.into(),
      param: None,
      retry_after: None,
    }
  }

  pub fn timeout(timeout_ms: u64) -> Self {
    Self {
      status: 504,
      kind: "timeout",
      code: "timeout",
      message: format!("the provider did not finish within {timeout_ms} ms"),
      param: None,
      retry_after: None,
    }
  }

  pub fn rate_limited(provider: &str) -> Self {
    Self {
      status: 429,
      kind: "rate_limit_exceeded",
      code: "rate_limit_exceeded",
      message: format!(
        "the provider '{provider}' is busy: its concurrency and queue limits are reached"
      ),
      param: None,
      retry_after: None,
    }
  }

  pub fn unavailable() -> Self {
    Self {
      status: 503,
      kind: "unavailable",
      code: "unavailable",
      message: "the registrar is stopping".to_owned(),
      param: None,
      retry_after: None,
    }
  }

  /// The owner refused the task (docs/protocol.md section 6): 403, 400, 429 or 503.
  pub fn refused(refusal: Refusal, message: String) -> Self {
    let (status, kind) = match refusal {
      Refusal::CallerNotAllowed => (403, "permission_denied"),
      Refusal::MaxTokensExceeded | Refusal::RequestTooLarge => (400, "invalid_request_error"),
      Refusal::ProviderPaused => (503, "unavailable"),
      Refusal::RequestsPerMinute
      | Refusal::TokensPerMinute
      | Refusal::TokensPerDay
      | Refusal::QueueFull => (429, "rate_limit_exceeded"),
    };
    Self {
      status,
      kind,
      code: refusal.as_str(),
      message,
      param: None,
      retry_after: None,
    }
  }

  pub fn body(&self) -> Value {
    match self.param {
      None => json!({ "error": { "message": self.message, "type": self.kind, "code": self.code } }),
      Some(param) => json!({ "error": {
        "message": self.message, "type": self.kind, "code": self.code, "param": param
      } }),
    }
  }

  /// The result POST's `headers`: `retry-after` when there is one.
  pub fn headers(&self) -> Option<Value> {
    self
      .retry_after
      .map(|secs| json!({ "retry-after": secs.to_string() }))
  }
}

/// A validated chat request: the provider's `CompletionOptions` (without
/// `signal`, which the JavaScript side adds) and what the answer needs to know.
#[derive(Debug, Clone)]
pub struct ChatRequest {
  /// Boxed: a task's decision moves it around, and it is a few hundred bytes.
  pub options: Box<CompletionOptions>,
  /// The OpenAI request's `model`: the virtual LLM's name mcpd routed by.
  pub model: Option<String>,
  pub include_usage: bool,
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];
const TOOL_CHOICES: [&str; 3] = ["auto", "none", "required"];
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "tool_calls", "content_filter"];

/// `string | null` in TypeScript: a field that is always there, possibly null.
/// Not spelled `Option`, which napi declares optional (`?:`).
pub type Nullable<T> = Option<T>;

/// What `LlmProvider.complete()` and `stream()` are called with (its `signal` is
/// added by the JavaScript side: src/binding/types.d.ts). It crosses to JavaScript
/// as JSON text, parsed once there: the fields are camelCase, an absent one is left
/// out (`content: null` stays).
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionOptions {
  pub messages: Vec<ChatMessage>,
  /// The entry's configured model (`LlmProviderFileEntry.model`), absent when it
  /// has none: never the virtual LLM's name, which stays in `request.model`.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub model: Option<String>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub temperature: Option<Number>,
  /// `max_completion_tokens`, else `max_tokens`.
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub max_tokens: Option<u64>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub top_p: Option<Number>,
  /// A single `stop` string comes as a list of one.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub stop: Option<Vec<String>>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub tools: Option<Vec<ToolDefinition>>,
  #[napi(
    ts_type = "'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } }"
  )]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub tool_choice: Option<ToolChoice>,
  #[napi(ts_type = "Record<string, unknown>")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub response_format: Option<Map<String, Value>>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub seed: Option<i64>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub presence_penalty: Option<Number>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub frequency_penalty: Option<Number>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub user: Option<String>,
  /// Who sent the request to mcpd, as mcpd authenticated them (docs/protocol.md
  /// section 6). Absent when mcpd sent no caller, or a malformed one.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub caller: Option<Caller>,
  /// W3C trace context for the provider's own outgoing calls (docs/protocol.md,
  /// "Trace context"): a child of the registrar's span for this task when spans
  /// are recorded (mcplocal has `@opentelemetry/api` and a tracer provider), else
  /// mcpd's context as sent; absent when mcpd sent none (or a malformed one) and
  /// no span is recorded. A provider whose HTTP client is instrumented needs
  /// none of it: its calls already nest under the span, which is active while
  /// `complete()` or `stream()` runs.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub trace: Option<CompletionTrace>,
  /// The OpenAI request as mcpd sent it, every field included, for providers
  /// that forward it as is. When the entry has `maxOutputTokens` and the request
  /// sets neither `max_tokens` nor `max_completion_tokens`, `max_tokens` is set
  /// to it.
  #[napi(ts_type = "Record<string, unknown>")]
  pub request: Box<RawValue>,
}

impl CompletionOptions {
  /// The options' JSON text, as JavaScript parses them.
  pub fn to_json(&self) -> String {
    serde_json::to_string(self).expect("options serialize: string keys, finite numbers")
  }
}

/// A W3C trace context, as `CompletionOptions.trace` hands it to a provider: the
/// values of the `traceparent` and `tracestate` headers to send on its own calls.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompletionTrace {
  /// A valid version 00 `traceparent`: `00-{trace id}-{span id}-{flags}`.
  pub traceparent: String,
  /// Present when there is a valid `tracestate` (at most 512 bytes).
  #[serde(skip_serializing_if = "Option::is_none")]
  pub tracestate: Option<String>,
}

impl From<&crate::trace::TraceContext> for CompletionTrace {
  fn from(context: &crate::trace::TraceContext) -> Self {
    Self {
      traceparent: context.traceparent().to_owned(),
      tracestate: context.tracestate().map(str::to_owned),
    }
  }
}

/// Who sent the request to mcpd (docs/protocol.md section 6), when mcpd says so.
/// Never sent back to mcpd.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
  /// mcpd's id for the caller: 1 to 256 bytes.
  pub id: String,
  /// At most 256 bytes.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub name: Option<String>,
  /// At most 64, each at most 256 bytes.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub groups: Option<Vec<String>>,
}

/// The characters (Unicode scalar values) of a conversation's text: string
/// contents, text parts and tool calls' arguments, for the token estimate.
pub fn text_chars(messages: &[ChatMessage]) -> u64 {
  let chars = |text: &str| text.chars().count() as u64;
  messages
    .iter()
    .map(|message| {
      let content = match &message.content {
        None => 0,
        Some(MessageContent::Text(text)) => chars(text),
        Some(MessageContent::Parts(parts)) => parts
          .iter()
          .map(|part| match part {
            ContentPart::Text { text } => chars(text),
            ContentPart::ImageUrl { .. } => 0,
          })
          .sum(),
      };
      let calls: u64 = message
        .tool_calls
        .iter()
        .flatten()
        .map(|call| chars(&call.function.arguments))
        .sum();
      content + calls
    })
    .sum()
}

/// The characters of a result's text (content and tool calls' arguments).
pub fn result_chars(result: &CompletionResult) -> u64 {
  let content = result
    .content
    .as_deref()
    .map_or(0, |text| text.chars().count());
  let calls: usize = result
    .tool_calls
    .iter()
    .flatten()
    .map(|call| call.function.arguments.chars().count())
    .sum();
  (content + calls) as u64
}

/// One message of the conversation.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatMessage {
  #[napi(ts_type = "'system' | 'user' | 'assistant' | 'tool' | 'developer'")]
  pub role: String,
  #[napi(ts_type = "string | ContentPart[] | null")]
  pub content: Nullable<MessageContent>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub name: Option<String>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub tool_call_id: Option<String>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub tool_calls: Option<Vec<ToolCall>>,
}

/// A message's content: text, or parts (text and images).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
  Text(String),
  Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[napi(
  discriminant = "type",
  discriminant_case = "snake_case",
  object_from_js = false,
  object_to_js = false
)]
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
  Text {
    text: String,
  },
  ImageUrl {
    #[serde(rename = "imageUrl")]
    image_url: ImageUrl,
  },
}

/// An image part's address (a URL or a `data:` URL) and OpenAI's `detail`.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize)]
pub struct ImageUrl {
  pub url: String,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub detail: Option<String>,
}

/// `type: 'function'`, the one kind of tool OpenAI has. Written as "function";
/// whatever a provider sends there is ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionKind;

impl Serialize for FunctionKind {
  fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("function")
  }
}

impl<'de> Deserialize<'de> for FunctionKind {
  fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
    serde::de::IgnoredAny::deserialize(deserializer).map(|_| FunctionKind)
  }
}

/// A tool the model may call.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize)]
pub struct ToolDefinition {
  #[napi(ts_type = "'function'")]
  pub r#type: FunctionKind,
  pub function: FunctionDefinition,
}

/// A function tool: its name, and what it does and takes.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize)]
pub struct FunctionDefinition {
  pub name: String,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub description: Option<String>,
  /// A JSON Schema.
  #[napi(ts_type = "Record<string, unknown>")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub parameters: Option<Map<String, Value>>,
}

/// `tool_choice`: a mode, or one function by name.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ToolChoice {
  Mode(String),
  Function {
    r#type: FunctionKind,
    function: FunctionName,
  },
}

/// A function named in `tool_choice`.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionName {
  pub name: String,
}

type Invalid = ErrorReply;

/// Turns an OpenAI `POST /v1/chat/completions` body, parsed, into
/// `CompletionOptions`; `sent` is the same body as text, kept as mcpd sent it.
pub fn to_completion_options(body: &Value, sent: Box<RawValue>) -> Result<ChatRequest, Invalid> {
  let request = body
    .as_object()
    .ok_or_else(|| ErrorReply::invalid_request("the request body must be a JSON object"))?;
  let messages = match present(request, "messages") {
    Some(Value::Array(messages)) if !messages.is_empty() => messages,
    Some(Value::Array(_)) => {
      return Err(ErrorReply::invalid_request("'messages' must not be empty"))
    }
    _ => {
      return Err(ErrorReply::invalid_request(
        "'messages' must be an array of messages",
      ))
    }
  };
  let messages = messages
    .iter()
    .enumerate()
    .map(|(index, message)| convert_message(index, message))
    .collect::<Result<Vec<_>, _>>()?;
  let model = optional_string(request, "model")?;
  let number = |wire: &str| -> Result<Option<Number>, Invalid> {
    match present(request, wire) {
      None => Ok(None),
      Some(Value::Number(number)) => Ok(Some(number.clone())),
      Some(_) => Err(ErrorReply::invalid_request(format!(
        "'{wire}' must be a number"
      ))),
    }
  };
  let temperature = number("temperature")?;
  let top_p = number("top_p")?;
  let presence_penalty = number("presence_penalty")?;
  let frequency_penalty = number("frequency_penalty")?;
  let max_tokens = match present(request, "max_completion_tokens") {
    Some(value) => Some(("max_completion_tokens", value)),
    None => present(request, "max_tokens").map(|value| ("max_tokens", value)),
  };
  let max_tokens = match max_tokens {
    None => None,
    Some((wire, value)) => Some(value.as_u64().ok_or_else(|| {
      ErrorReply::invalid_request(format!("'{wire}' must be a non-negative integer"))
    })?),
  };
  let seed = match present(request, "seed") {
    None => None,
    Some(value) => Some(
      value
        .as_i64()
        .ok_or_else(|| ErrorReply::invalid_request("'seed' must be an integer"))?,
    ),
  };
  let stop = match present(request, "stop") {
    None => None,
    Some(Value::String(stop)) => Some(vec![stop.clone()]),
    Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => Some(
      stops
        .iter()
        .filter_map(|stop| stop.as_str().map(str::to_owned))
        .collect(),
    ),
    Some(_) => {
      return Err(ErrorReply::invalid_request(
        "'stop' must be a string or an array of strings",
      ))
    }
  };
  let tools = present(request, "tools").map(convert_tools).transpose()?;
  let tool_choice = present(request, "tool_choice")
    .map(convert_tool_choice)
    .transpose()?;
  let response_format = match present(request, "response_format") {
    None => None,
    Some(Value::Object(format)) => Some(format.clone()),
    Some(_) => {
      return Err(ErrorReply::invalid_request(
        "'response_format' must be an object",
      ))
    }
  };
  let user = optional_string(request, "user")?;
  let include_usage = match present(request, "stream_options") {
    None => false,
    Some(Value::Object(stream_options)) => match present(stream_options, "include_usage") {
      None => false,
      Some(Value::Bool(include)) => *include,
      Some(_) => {
        return Err(ErrorReply::invalid_request(
          "'stream_options.include_usage' must be a boolean",
        ))
      }
    },
    Some(_) => {
      return Err(ErrorReply::invalid_request(
        "'stream_options' must be an object",
      ))
    }
  };
  Ok(ChatRequest {
    options: Box::new(CompletionOptions {
      messages,
      model: model.clone(),
      temperature,
      max_tokens,
      top_p,
      stop,
      tools,
      tool_choice,
      response_format,
      seed,
      presence_penalty,
      frequency_penalty,
      user,
      caller: None,
      trace: None,
      request: sent,
    }),
    model,
    include_usage,
  })
}

/// A field that is there and not `null` (OpenAI treats `null` as absent).
fn present<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
  object.get(key).filter(|value| !value.is_null())
}

fn optional_string(object: &Map<String, Value>, key: &str) -> Result<Option<String>, Invalid> {
  match present(object, key) {
    None => Ok(None),
    Some(Value::String(text)) => Ok(Some(text.clone())),
    Some(_) => Err(ErrorReply::invalid_request(format!(
      "'{key}' must be a string"
    ))),
  }
}

fn convert_message(index: usize, message: &Value) -> Result<ChatMessage, Invalid> {
  let at = |what: &str| ErrorReply::invalid_request(format!("messages[{index}]: {what}"));
  let message = message.as_object().ok_or_else(|| at("must be an object"))?;
  let role = match present(message, "role") {
    Some(Value::String(role)) if ROLES.contains(&role.as_str()) => role.clone(),
    Some(Value::String(role)) => return Err(at(&format!("unsupported role '{role}'"))),
    _ => return Err(at("'role' must be a string")),
  };
  let content = match present(message, "content") {
    None => None,
    Some(Value::String(text)) => Some(MessageContent::Text(text.clone())),
    Some(Value::Array(parts)) => Some(MessageContent::Parts(
      parts
        .iter()
        .enumerate()
        .map(|(part_index, part)| convert_part(index, part_index, part))
        .collect::<Result<_, _>>()?,
    )),
    Some(_) => return Err(at("'content' must be a string, an array of parts or null")),
  };
  let name = optional_string(message, "name").map_err(|e| at(&e.message))?;
  let tool_call_id = optional_string(message, "tool_call_id").map_err(|e| at(&e.message))?;
  let tool_calls = match present(message, "tool_calls") {
    None => None,
    Some(calls) => Some(
      calls
        .as_array()
        .ok_or_else(|| at("'tool_calls' must be an array"))?
        .iter()
        .map(|call| {
          convert_tool_call(call).ok_or_else(|| {
            at("each tool call needs an id and a function with a name and string arguments")
          })
        })
        .collect::<Result<Vec<_>, _>>()?,
    ),
  };
  Ok(ChatMessage {
    role,
    content,
    name,
    tool_call_id,
    tool_calls,
  })
}

fn convert_part(index: usize, part_index: usize, part: &Value) -> Result<ContentPart, Invalid> {
  let at = |what: &str| {
    ErrorReply::invalid_request(format!("messages[{index}].content[{part_index}]: {what}"))
  };
  let part = part.as_object().ok_or_else(|| at("must be an object"))?;
  match present(part, "type").and_then(Value::as_str) {
    Some("text") => match present(part, "text") {
      Some(Value::String(text)) => Ok(ContentPart::Text { text: text.clone() }),
      _ => Err(at("a text part needs a string 'text'")),
    },
    Some("image_url") => {
      let (url, detail) = match present(part, "image_url") {
        Some(Value::String(url)) => (url.clone(), None),
        Some(Value::Object(image)) => match present(image, "url") {
          Some(Value::String(url)) => (
            url.clone(),
            present(image, "detail")
              .and_then(Value::as_str)
              .map(str::to_owned),
          ),
          _ => return Err(at("an image_url part needs 'image_url.url'")),
        },
        _ => return Err(at("an image_url part needs 'image_url.url'")),
      };
      Ok(ContentPart::ImageUrl {
        image_url: ImageUrl { url, detail },
      })
    }
    Some(other) => Err(at(&format!("unsupported content part type '{other}'"))),
    None => Err(at("a content part needs a 'type'")),
  }
}

fn convert_tool_call(call: &Value) -> Option<ToolCall> {
  let call = call.as_object()?;
  let id = present(call, "id")?.as_str()?;
  let function = present(call, "function")?.as_object()?;
  let name = present(function, "name")?.as_str()?;
  let arguments = present(function, "arguments").map_or(Some(""), Value::as_str)?;
  Some(ToolCall {
    id: id.to_owned(),
    r#type: FunctionKind,
    function: FunctionCall {
      name: name.to_owned(),
      arguments: arguments.to_owned(),
    },
  })
}

fn convert_tools(tools: &Value) -> Result<Vec<ToolDefinition>, Invalid> {
  let invalid = || {
    ErrorReply::invalid_request("'tools' must be an array of { type: 'function', function: { name, description?, parameters? } }")
  };
  let tools = tools.as_array().ok_or_else(invalid)?;
  tools
    .iter()
    .map(|tool| {
      let tool = tool.as_object().ok_or_else(invalid)?;
      if present(tool, "type").and_then(Value::as_str) != Some("function") {
        return Err(invalid());
      }
      let function = present(tool, "function")
        .and_then(Value::as_object)
        .ok_or_else(invalid)?;
      let name = present(function, "name")
        .and_then(Value::as_str)
        .ok_or_else(invalid)?;
      let description = match present(function, "description") {
        None => None,
        Some(description) => Some(description.as_str().ok_or_else(invalid)?.to_owned()),
      };
      let parameters = match present(function, "parameters") {
        None => None,
        Some(Value::Object(parameters)) => Some(parameters.clone()),
        Some(_) => return Err(invalid()),
      };
      Ok(ToolDefinition {
        r#type: FunctionKind,
        function: FunctionDefinition {
          name: name.to_owned(),
          description,
          parameters,
        },
      })
    })
    .collect()
}

fn convert_tool_choice(choice: &Value) -> Result<ToolChoice, Invalid> {
  match choice {
    Value::String(mode) if TOOL_CHOICES.contains(&mode.as_str()) => {
      Ok(ToolChoice::Mode(mode.clone()))
    }
    Value::Object(choice) => {
      let name = (present(choice, "type").and_then(Value::as_str) == Some("function"))
        .then(|| present(choice, "function").and_then(Value::as_object))
        .flatten()
        .and_then(|function| present(function, "name"))
        .and_then(Value::as_str);
      match name {
        Some(name) => Ok(ToolChoice::Function {
          r#type: FunctionKind,
          function: FunctionName {
            name: name.to_owned(),
          },
        }),
        None => Err(ErrorReply::invalid_request(
          "'tool_choice' object must be { type: 'function', function: { name } }",
        )),
      }
    }
    _ => Err(ErrorReply::invalid_request(
      "'tool_choice' must be 'auto', 'none', 'required' or a function choice",
    )),
  }
}

/// Token counts as providers report them.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
  #[napi(ts_type = "number")]
  pub prompt_tokens: u64,
  #[napi(ts_type = "number")]
  pub completion_tokens: u64,
  /// `promptTokens + completionTokens` when absent.
  #[napi(ts_type = "number")]
  #[serde(default)]
  pub total_tokens: Option<u64>,
}

impl Usage {
  fn wire_typed(&self) -> UsageWire {
    UsageWire {
      completion_tokens: self.completion_tokens,
      prompt_tokens: self.prompt_tokens,
      total_tokens: self
        .total_tokens
        .unwrap_or(self.prompt_tokens.saturating_add(self.completion_tokens)),
    }
  }

  fn wire(&self) -> Value {
    json!({
      "prompt_tokens": self.prompt_tokens,
      "completion_tokens": self.completion_tokens,
      "total_tokens": self.total_tokens.unwrap_or(self.prompt_tokens.saturating_add(self.completion_tokens)),
    })
  }
}

/// The function a tool call calls, and its arguments as JSON text.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionCall {
  pub name: String,
  /// JSON text (an object from a provider is written as text).
  #[serde(default, deserialize_with = "arguments_text")]
  pub arguments: String,
}

/// A call of a tool, by the model.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCall {
  pub id: String,
  #[napi(ts_type = "'function'")]
  #[serde(default)]
  pub r#type: FunctionKind,
  pub function: FunctionCall,
}

/// What `LlmProvider.complete()` resolves to.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionResult {
  #[napi(ts_type = "string | null")]
  #[serde(default)]
  pub content: Nullable<String>,
  #[serde(default)]
  pub tool_calls: Option<Vec<ToolCall>>,
  /// Other names a backend uses (`end_turn`, `max_tokens`...) are mapped onto these.
  #[napi(ts_type = "'stop' | 'length' | 'tool_calls' | 'content_filter'")]
  #[serde(default)]
  pub finish_reason: Option<String>,
  #[serde(default)]
  pub usage: Option<Usage>,
  /// The model that answered; the answer's `model` is the request's otherwise.
  #[serde(default)]
  pub model: Option<String>,
}

/// A streamed tool call's function: its name once, then pieces of its arguments.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FunctionDelta {
  #[serde(default)]
  pub name: Option<String>,
  #[serde(default, deserialize_with = "optional_arguments_text")]
  pub arguments: Option<String>,
}

/// A piece of a streamed tool call; `index` says which call it continues.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallDelta {
  pub index: u32,
  #[serde(default)]
  pub id: Option<String>,
  #[serde(default)]
  pub function: Option<FunctionDelta>,
}

/// One item of `LlmProvider.stream()`.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionChunk {
  #[serde(default)]
  pub content: Option<String>,
  #[serde(default)]
  pub tool_calls: Option<Vec<ToolCallDelta>>,
  #[napi(ts_type = "'stop' | 'length' | 'tool_calls' | 'content_filter'")]
  #[serde(default)]
  pub finish_reason: Option<String>,
  #[serde(default)]
  pub usage: Option<Usage>,
}

/// A chunk's non-empty content as the JSON string that carried it (quotes
/// included), when that string is written exactly as the registrar writes one
/// ([`crate::wire::written_json_str_chars`]): a payload can take it as it is.
/// `JSON.stringify` writes every string so but one holding a lone surrogate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawContent<'a> {
  json: &'a str,
  /// The characters it stands for (the token estimate counts them).
  chars: u64,
}

impl<'a> RawContent<'a> {
  /// `json` (valid JSON) as a content, or `None`: not a string, an empty one,
  /// or one written otherwise (which the typed parse then reads).
  pub fn new(json: &'a str) -> Option<Self> {
    let chars = crate::wire::written_json_str_chars(json).filter(|&chars| chars > 0)?;
    Some(Self { json, chars })
  }

  pub fn json(&self) -> &'a str {
    self.json
  }

  /// The content itself.
  pub fn decode(&self) -> String {
    // Valid JSON and a string (`new` checked both), so this parse succeeds.
    serde_json::from_str(self.json).unwrap_or_default()
  }

  /// The chunk it is, typed.
  pub fn into_chunk(self) -> CompletionChunk {
    CompletionChunk {
      content: Some(self.decode()),
      ..CompletionChunk::default()
    }
  }
}

/// Providers sometimes hand arguments over as an object; the wire wants JSON text.
fn arguments_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
  Ok(optional_arguments_text(deserializer)?.unwrap_or_default())
}

fn optional_arguments_text<'de, D: serde::Deserializer<'de>>(
  deserializer: D,
) -> Result<Option<String>, D::Error> {
  Ok(match Value::deserialize(deserializer)? {
    Value::Null => None,
    Value::String(text) => Some(text),
    other => Some(other.to_string()),
  })
}

pub fn parse_result(value: Value) -> Result<CompletionResult, String> {
  if !value.is_object() {
    return Err(
      "the provider's complete() did not resolve to a CompletionResult object".to_owned(),
    );
  }
  serde_json::from_value(value)
    .map_err(|error| format!("the provider returned an invalid CompletionResult: {error}"))
}

pub fn parse_chunk(value: Value) -> Result<CompletionChunk, String> {
  if !value.is_object() {
    return Err(
      "the provider's stream() yielded something that is not a CompletionChunk object".to_owned(),
    );
  }
  serde_json::from_value(value)
    .map_err(|error| format!("the provider yielded an invalid CompletionChunk: {error}"))
}

/// Maps a provider's finish reason onto the four OpenAI allows; `None` when it
/// gave none. Native names of common backends are translated, anything else is "stop".
pub fn normalize_finish_reason(reason: Option<&str>) -> Option<&'static str> {
  Some(match reason? {
    "stop" | "end_turn" | "stop_sequence" | "eos" => "stop",
    "length" | "max_tokens" => "length",
    "tool_calls" | "tool_use" | "function_call" => "tool_calls",
    "content_filter" => "content_filter",
    _ => "stop",
  })
}

/// What every object of one answer shares: `id`, integer `created` and `model`.
#[derive(Debug, Clone)]
pub struct AnswerIdentity {
  pub id: String,
  pub created: u64,
  pub model: String,
}

impl AnswerIdentity {
  pub fn new(task_id: &str, model: String) -> Self {
    let created = std::time::SystemTime::now()
      .duration_since(std::time::UNIX_EPOCH)
      .map_or(0, |elapsed| elapsed.as_secs());
    Self {
      id: format!("chatcmpl-{task_id}"),
      created,
      model,
    }
  }
}

/// A result's finish reason as its answer states it: the provider's, mapped
/// onto OpenAI's four, else "tool_calls" when it called tools, else "stop".
pub fn result_finish_reason(result: &CompletionResult) -> &'static str {
  let called = result
    .tool_calls
    .as_deref()
    .is_some_and(|calls| !calls.is_empty());
  normalize_finish_reason(result.finish_reason.as_deref()).unwrap_or(if called {
    "tool_calls"
  } else {
    "stop"
  })
}

/// The `chat.completion` object for a non-streaming answer, as a `Value`
/// (its JSON text is [`ChatCompletion`]'s, which the result POST writes).
pub fn chat_completion(identity: &AnswerIdentity, result: &CompletionResult) -> Value {
  serde_json::to_value(ChatCompletion::new(identity, result)).expect("a chat.completion serializes")
}

/// The `chat.completion` object for a non-streaming answer, written straight
/// to JSON by serde: no `Value` is built and then walked again (this runs once
/// per task). The fields are declared in the order serde_json's `Value` prints
/// its keys (sorted), so the bytes are those of the `json!`-built object this
/// replaced (a unit test compares them).
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
  choices: [CompletionChoice<'a>; 1],
  created: u64,
  id: &'a str,
  model: &'a str,
  object: &'static str,
  #[serde(skip_serializing_if = "Option::is_none")]
  usage: Option<UsageWire>,
}

#[derive(Debug, Serialize)]
struct CompletionChoice<'a> {
  finish_reason: &'static str,
  index: u32,
  /// Always `null`.
  logprobs: (),
  message: CompletionMessage<'a>,
}

#[derive(Debug, Serialize)]
struct CompletionMessage<'a> {
  content: Option<&'a str>,
  /// Always `null`.
  refusal: (),
  role: &'static str,
  #[serde(skip_serializing_if = "<[ToolCallWire<'a>]>::is_empty")]
  tool_calls: Vec<ToolCallWire<'a>>,
}

#[derive(Debug, Serialize)]
struct ToolCallWire<'a> {
  function: FunctionWire<'a>,
  id: &'a str,
  r#type: &'static str,
}

#[derive(Debug, Serialize)]
struct FunctionWire<'a> {
  arguments: &'a str,
  name: &'a str,
}

/// Usage as OpenAI names it (snake_case), `total_tokens` always present.
#[derive(Debug, Clone, Copy, Serialize)]
struct UsageWire {
  completion_tokens: u64,
  prompt_tokens: u64,
  total_tokens: u64,
}

impl<'a> ChatCompletion<'a> {
  pub fn new(identity: &'a AnswerIdentity, result: &'a CompletionResult) -> Self {
    let tool_calls: Vec<ToolCallWire<'a>> = result
      .tool_calls
      .as_deref()
      .unwrap_or_default()
      .iter()
      .map(|call| ToolCallWire {
        function: FunctionWire {
          arguments: &call.function.arguments,
          name: &call.function.name,
        },
        id: &call.id,
        r#type: "function",
      })
      .collect();
    let finish_reason = result_finish_reason(result);
    Self {
      choices: [CompletionChoice {
        finish_reason,
        index: 0,
        logprobs: (),
        message: CompletionMessage {
          content: result.content.as_deref(),
          refusal: (),
          role: "assistant",
          tool_calls,
        },
      }],
      created: identity.created,
      id: &identity.id,
      model: result.model.as_deref().unwrap_or(&identity.model),
      object: "chat.completion",
      usage: result.usage.map(|usage| usage.wire_typed()),
    }
  }
}

/// Turns provider chunks into the payloads of an OpenAI stream, keeping the
/// rules real clients check: the role first, each tool call introduced once
/// with its id and name, exactly one finish_reason, usage last, then `[DONE]`.
///
/// A payload is written straight as JSON text, keys in the order serde_json's
/// `Value` prints them (sorted), so the bytes are those of the
/// `json!`-built object: `{"choices":[{"delta":…,"finish_reason":…,"index":0,
/// "logprobs":null}],` then a tail shared by every chunk of the task (`created`,
/// `id`, `model`, `object`, `usage: null` with include_usage), made once. No
/// `Value` is built for a content chunk (this runs once per streamed token).
pub struct StreamEncoder {
  identity: AnswerIdentity,
  include_usage: bool,
  started: bool,
  tool_indices: BTreeSet<u32>,
  finish_reason: Option<&'static str>,
  usage: Option<Usage>,
  /// The characters of the content and tool-call arguments written, for the
  /// token estimate when the provider reports no usage.
  text_chars: u64,
  form: PayloadForm,
  /// `"created":…,"id":…,"model":…,"object":…[,"usage":null]}`.
  tail: String,
  /// A content chunk's payload up to the content's JSON string, in `form`.
  content_head: String,
  /// A content chunk's payload after the content's JSON string, in `form`.
  content_end: String,
  /// The content as a JSON string, before it is escaped again (reused).
  scratch: String,
}

/// How a [`StreamEncoder`] writes its payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadForm {
  /// JSON text, exactly what follows `data: ` in an OpenAI stream.
  Json,
  /// That JSON text already escaped as the inside of a JSON string (no
  /// quotes): what a chunk POST's `chunks` array holds, so the relay copies
  /// the payload instead of escaping it. `[DONE]` is the same in both forms.
  JsonStringContent,
}

pub const DONE: &str = "[DONE]";

/// Where a [`StreamEncoder`] puts its payloads: a list of strings (the tests',
/// one allocation per payload) or [`Payloads`] (the registrar's, none).
pub trait PayloadSink {
  /// Adds one payload, which `write` writes (about `capacity` bytes) at the
  /// end of a text it must only append to.
  fn write_payload(&mut self, capacity: usize, write: impl FnOnce(&mut String));

  /// Adds one payload made elsewhere.
  fn push_payload(&mut self, payload: String) {
    self.write_payload(payload.len(), |text| text.push_str(&payload));
  }
}

impl PayloadSink for Vec<String> {
  fn write_payload(&mut self, capacity: usize, write: impl FnOnce(&mut String)) {
    let mut payload = String::with_capacity(capacity);
    write(&mut payload);
    self.push(payload);
  }

  fn push_payload(&mut self, payload: String) {
    self.push(payload);
  }
}

/// Payloads written one after another into one text, each one's end kept: a
/// streamed token's payload costs no allocation of its own (the text and the
/// ends grow to a run's size once and are reused, run after run; room above
/// [`Payloads::KEPT_ROOM`], left by an outsized chunk, is given back).
#[derive(Debug, Default)]
pub struct Payloads {
  text: String,
  ends: Vec<usize>,
}

impl Payloads {
  /// The most room [`Payloads::clear`] keeps: a run of 128 ordinary tokens'
  /// payloads takes a tenth of it.
  pub const KEPT_ROOM: usize = 256 * 1024;

  pub fn len(&self) -> usize {
    self.ends.len()
  }

  pub fn is_empty(&self) -> bool {
    self.ends.is_empty()
  }

  /// The `index`th payload.
  pub fn get(&self, index: usize) -> &str {
    let start = index.checked_sub(1).map_or(0, |before| self.ends[before]);
    &self.text[start..self.ends[index]]
  }

  pub fn iter(&self) -> impl Iterator<Item = &str> {
    (0..self.len()).map(|index| self.get(index))
  }

  /// Empties the list, keeping its room up to [`Payloads::KEPT_ROOM`].
  pub fn clear(&mut self) {
    self.text.clear();
    self.ends.clear();
    self.text.shrink_to(Self::KEPT_ROOM);
  }
}

impl PayloadSink for Payloads {
  fn write_payload(&mut self, capacity: usize, write: impl FnOnce(&mut String)) {
    self.text.reserve(capacity);
    write(&mut self.text);
    self.ends.push(self.text.len());
  }
}

impl<S: AsRef<str>> FromIterator<S> for Payloads {
  fn from_iter<I: IntoIterator<Item = S>>(payloads: I) -> Self {
    let mut list = Payloads::default();
    for payload in payloads {
      list.write_payload(0, |text| text.push_str(payload.as_ref()));
    }
    list
  }
}

/// What every chunk payload starts with, up to its delta.
const CHUNK_HEAD: &str = r#"{"choices":[{"delta":"#;
/// A chunk's end after its delta, when it has no finish reason.
const CHUNK_OPEN_END: &str = r#","finish_reason":null,"index":0,"logprobs":null}"#;

impl StreamEncoder {
  pub fn new(identity: AnswerIdentity, include_usage: bool) -> Self {
    Self::with_form(identity, include_usage, PayloadForm::Json)
  }

  pub fn with_form(identity: AnswerIdentity, include_usage: bool, form: PayloadForm) -> Self {
    let mut tail = String::with_capacity(96 + identity.id.len() + identity.model.len());
    tail.push_str(r#"],"created":"#);
    tail.push_str(&identity.created.to_string());
    tail.push_str(r#","id":"#);
    write_json_str(&mut tail, &identity.id);
    tail.push_str(r#","model":"#);
    write_json_str(&mut tail, &identity.model);
    tail.push_str(r#","object":"chat.completion.chunk""#);
    if include_usage {
      tail.push_str(r#","usage":null"#);
    }
    tail.push('}');
    let in_form = |json: &str| {
      let mut text = String::with_capacity(json.len() + json.len() / 4);
      match form {
        PayloadForm::Json => text.push_str(json),
        PayloadForm::JsonStringContent => write_json_str_content(&mut text, json),
      }
      text
    };
    let content_head = in_form(&format!(r#"{CHUNK_HEAD}{{"content":"#));
    let content_end = in_form(&format!("}}{CHUNK_OPEN_END}{tail}"));
    Self {
      identity,
      include_usage,
      started: false,
      tool_indices: BTreeSet::new(),
      finish_reason: None,
      usage: None,
      text_chars: 0,
      form,
      tail,
      content_head,
      content_end,
      scratch: String::new(),
    }
  }

  /// This encoder writing `form` instead, before it has written anything.
  pub fn into_form(self, form: PayloadForm) -> Self {
    debug_assert!(!self.started, "the form is chosen before the first payload");
    Self::with_form(self.identity, self.include_usage, form)
  }

  /// Whether any payload has been produced (errors then go in-band).
  pub fn started(&self) -> bool {
    self.started
  }

  /// One chunk payload: `delta` (JSON text of an object) and the finish reason.
  fn payload(&self, delta: &str, finish_reason: Option<&str>) -> String {
    let mut payload = String::with_capacity(CHUNK_HEAD.len() + delta.len() + 56 + self.tail.len());
    payload.push_str(CHUNK_HEAD);
    payload.push_str(delta);
    payload.push_str(r#","finish_reason":"#);
    match finish_reason {
      Some(reason) => write_json_str(&mut payload, reason),
      None => payload.push_str("null"),
    }
    payload.push_str(r#","index":0,"logprobs":null}"#);
    payload.push_str(&self.tail);
    payload
  }

  /// A payload built as JSON text, in the encoder's form.
  fn emit(&self, json: String) -> String {
    match self.form {
      PayloadForm::Json => json,
      PayloadForm::JsonStringContent => {
        let mut text = String::with_capacity(json.len() + json.len() / 4);
        write_json_str_content(&mut text, &json);
        text
      }
    }
  }

  /// The payload of a chunk with only content: the one made per token, from
  /// the parts made once, without building the JSON text first.
  fn content_payload(&mut self, content: &str, out: &mut impl PayloadSink) {
    let mut json = std::mem::take(&mut self.scratch);
    json.clear();
    write_json_str(&mut json, content);
    self.content_json_payload(&json, out);
    self.scratch = json;
  }

  /// [`Self::content_payload`] from the content's JSON string (quotes
  /// included), as [`write_json_str`] writes it, written into `out`.
  fn content_json_payload(&self, json: &str, out: &mut impl PayloadSink) {
    let capacity = self.content_head.len() + json.len() + json.len() / 4 + self.content_end.len();
    out.write_payload(capacity, |payload| {
      payload.push_str(&self.content_head);
      match self.form {
        PayloadForm::Json => payload.push_str(json),
        PayloadForm::JsonStringContent => write_json_str_content(payload, json),
      }
      payload.push_str(&self.content_end);
    });
  }

  /// [`Self::push`] for a chunk with only content, handed over as its JSON
  /// string: the same payload, made without decoding the content or escaping
  /// it twice (the path of nearly every streamed token).
  pub fn push_content(&mut self, content: RawContent<'_>, out: &mut impl PayloadSink) {
    self.start(out);
    self.text_chars += content.chars;
    self.content_json_payload(content.json, out);
  }

  fn start(&mut self, out: &mut impl PayloadSink) {
    if !self.started {
      self.started = true;
      out.push_payload(self.emit(self.payload(r#"{"content":"","role":"assistant"}"#, None)));
    }
  }

  pub fn push(&mut self, chunk: CompletionChunk, out: &mut impl PayloadSink) {
    self.start(out);
    if let Some(reason) = normalize_finish_reason(chunk.finish_reason.as_deref()) {
      self.finish_reason = Some(reason);
    }
    if chunk.usage.is_some() {
      self.usage = chunk.usage;
    }
    let content = chunk.content.filter(|content| !content.is_empty());
    if let Some(content) = &content {
      self.text_chars += content.chars().count() as u64;
    }
    let calls: Vec<Value> = match chunk.tool_calls {
      Some(calls) => calls
        .into_iter()
        .filter_map(|call| self.tool_call_delta(call))
        .collect(),
      None => Vec::new(),
    };
    if calls.is_empty() {
      if let Some(content) = content {
        self.content_payload(&content, out);
      }
      return;
    }
    // The delta's keys in sorted order: content, tool_calls.
    let mut delta = String::with_capacity(16 + content.as_ref().map_or(0, String::len));
    delta.push('{');
    if let Some(content) = &content {
      delta.push_str(r#""content":"#);
      write_json_str(&mut delta, content);
    }
    if !calls.is_empty() {
      if content.is_some() {
        delta.push(',');
      }
      delta.push_str(r#""tool_calls":"#);
      delta.push_str(&Value::Array(calls).to_string());
    }
    delta.push('}');
    out.push_payload(self.emit(self.payload(&delta, None)));
  }

  /// The usage the provider reported, if any, and the characters of the text
  /// written (content and tool-call arguments).
  pub fn spent(&self) -> (Option<Usage>, u64) {
    (self.usage, self.text_chars)
  }

  /// The model the chunks name, and the finish reason the last one carries
  /// (once finished), for the task's span.
  pub fn answer(&self) -> (&str, Option<&'static str>) {
    let reason = self.finish_reason.or_else(|| {
      self.started.then_some(if self.tool_indices.is_empty() {
        "stop"
      } else {
        "tool_calls"
      })
    });
    (&self.identity.model, reason)
  }

  fn tool_call_delta(&mut self, call: ToolCallDelta) -> Option<Value> {
    let function = call.function.unwrap_or_default();
    if let Some(arguments) = &function.arguments {
      self.text_chars += arguments.chars().count() as u64;
    }
    if self.tool_indices.insert(call.index) {
      // First sight of this index: the delta must introduce the call fully.
      let id = call
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| format!("call_{}_{}", self.identity.id, call.index));
      return Some(json!({
        "index": call.index,
        "id": id,
        "type": "function",
        "function": { "name": function.name.unwrap_or_default(), "arguments": function.arguments.unwrap_or_default() },
      }));
    }
    let arguments = function
      .arguments
      .filter(|arguments| !arguments.is_empty())?;
    Some(json!({ "index": call.index, "function": { "arguments": arguments } }))
  }

  /// The v1 answer of a provider without `stream()`: its whole result as one delta.
  pub fn push_result(&mut self, result: CompletionResult, out: &mut impl PayloadSink) {
    let tool_calls = result.tool_calls.map(|calls| {
      calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| ToolCallDelta {
          index: index as u32,
          id: Some(call.id),
          function: Some(FunctionDelta {
            name: Some(call.function.name),
            arguments: Some(call.function.arguments),
          }),
        })
        .collect()
    });
    self.push(
      CompletionChunk {
        content: result.content,
        tool_calls,
        finish_reason: result.finish_reason,
        usage: result.usage,
      },
      out,
    );
  }

  /// The finish chunk, the usage chunk when asked for, and `[DONE]`.
  pub fn finish(&mut self, out: &mut impl PayloadSink) {
    self.start(out);
    let reason = self
      .finish_reason
      .unwrap_or(if self.tool_indices.is_empty() {
        "stop"
      } else {
        "tool_calls"
      });
    out.push_payload(self.emit(self.payload("{}", Some(reason))));
    if self.include_usage {
      let usage = self.usage.unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: None,
      });
      let chunk = json!({
        "id": self.identity.id,
        "object": "chat.completion.chunk",
        "created": self.identity.created,
        "model": self.identity.model,
        "choices": [],
        "usage": usage.wire(),
      });
      out.push_payload(self.emit(chunk.to_string()));
    }
    out.write_payload(DONE.len(), |text| text.push_str(DONE));
  }

  /// An error after payloads went out: `{"error":{…}}` in-band, then `[DONE]`.
  pub fn fail(&mut self, error: &ErrorReply, out: &mut impl PayloadSink) {
    out.push_payload(self.emit(error.body().to_string()));
    out.write_payload(DONE.len(), |text| text.push_str(DONE));
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  /// `to_completion_options` of a body sent as `serde_json` prints it.
  fn convert(body: &Value) -> Result<ChatRequest, Invalid> {
    to_completion_options(body, serde_json::value::to_raw_value(body).unwrap())
  }

  /// The options as JavaScript parses them.
  fn parsed(options: &CompletionOptions) -> Value {
    serde_json::from_str(&options.to_json()).unwrap()
  }

  fn identity() -> AnswerIdentity {
    AnswerIdentity {
      id: "chatcmpl-t-1".into(),
      created: 1_700_000_000,
      model: "qwen".into(),
    }
  }

  #[test]
  fn converts_a_full_request_to_camel_case_options() {
    let body = json!({
      "model": "local-qwen",
      "messages": [
        { "role": "system", "content": "be brief" },
        { "role": "user", "content": [ { "type": "text", "text": "hi" }, { "type": "image_url", "image_url": { "url": "data:x", "detail": "low" } } ] },
        { "role": "assistant", "content": null, "tool_calls": [ { "id": "c1", "type": "function", "function": { "name": "f", "arguments": "{}" } } ] },
        { "role": "tool", "tool_call_id": "c1", "content": "42" }
      ],
      "temperature": 0.2, "max_completion_tokens": 64, "max_tokens": 10, "top_p": 0.9, "stop": "END",
      "tools": [ { "type": "function", "function": { "name": "f", "parameters": { "type": "object" } } } ],
      "tool_choice": { "type": "function", "function": { "name": "f" } },
      "response_format": { "type": "json_object" }, "seed": 7, "presence_penalty": 0.1, "frequency_penalty": 0.3,
      "user": "u1", "stream": true, "stream_options": { "include_usage": true }, "vendor_extra": 1
    });
    let request = convert(&body).unwrap();
    assert!(request.include_usage);
    assert_eq!(request.model.as_deref(), Some("local-qwen"));
    let options = &parsed(&request.options);
    assert_eq!(options["maxTokens"], json!(64));
    assert_eq!(options["stop"], json!(["END"]));
    assert_eq!(options["topP"], json!(0.9));
    assert_eq!(options["seed"], json!(7));
    assert_eq!(options["presencePenalty"], json!(0.1));
    assert_eq!(options["frequencyPenalty"], json!(0.3));
    assert_eq!(
      options["toolChoice"],
      json!({ "type": "function", "function": { "name": "f" } })
    );
    assert_eq!(options["responseFormat"], json!({ "type": "json_object" }));
    assert_eq!(
      options["messages"][1]["content"][1],
      json!({ "type": "image_url", "imageUrl": { "url": "data:x", "detail": "low" } })
    );
    assert_eq!(
      options["messages"][2]["toolCalls"][0]["function"]["name"],
      json!("f")
    );
    assert_eq!(options["messages"][3]["toolCallId"], json!("c1"));
    assert_eq!(options["request"], body);
    assert!(options.get("signal").is_none());
  }

  /// A typed number reads as `JSON.parse` reads it, so it agrees with the same
  /// number in `request` (serde_json's default float parsing can be one unit in
  /// the last place off).
  #[test]
  fn typed_numbers_read_as_javascript_reads_them() {
    for literal in [
      "7.038531e-26",
      "2.2250738585072011e-308",
      "0.1",
      "1e2",
      "0.30000000000000004",
    ] {
      let sent =
        format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"temperature":{literal}}}"#);
      let body: Value = serde_json::from_str(&sent).unwrap();
      let options = to_completion_options(&body, RawValue::from_string(sent).unwrap())
        .unwrap()
        .options;
      let exact: f64 = literal.parse().unwrap();
      let typed = parsed(&options)["temperature"].as_f64().unwrap();
      assert_eq!(typed.to_bits(), exact.to_bits(), "{literal}");
    }
  }

  #[test]
  fn max_tokens_alone_is_used() {
    let request = convert(&json!({ "messages": [{ "role": "user", "content": "x" }], "max_tokens": 5, "temperature": null })).unwrap();
    assert!(!request.include_usage);
    let options = parsed(&request.options);
    assert_eq!(options["maxTokens"], json!(5));
    assert!(options.get("temperature").is_none());
  }

  /// The text a provider's options are parsed from: the fields in the order
  /// `CompletionOptions` declares them, absent ones left out, numbers as read
  /// (`1` stays `1`, `0.50` is `0.5`, `1e2` is `100.0`), `content: null` kept,
  /// `model` the request's here (the task sets the entry's), and `request` the
  /// body's text as mcpd sent it, byte for byte.
  #[test]
  fn options_text_is_these_exact_bytes() {
    let sent = concat!(
      r#"{ "model": "m", "messages": ["#,
      r#"{ "role": "system", "content": "be brief", "name": "sys" },"#,
      r#"{ "role": "user", "content": [ { "type": "text", "text": "hi" }, { "type": "image_url", "image_url": "data:x" }, { "type": "image_url", "image_url": { "url": "u", "detail": 3 } } ] },"#,
      r#"{ "role": "assistant", "content": null, "tool_calls": [ { "id": "c1", "type": "function", "function": { "name": "f" } } ] },"#,
      r#"{ "role": "tool", "tool_call_id": "c1", "content": "42" } ],"#,
      r#" "temperature": 1, "top_p": 0.50, "max_tokens": 7, "seed": -3, "stop": ["a", "b"],"#,
      r#" "presence_penalty": 0, "frequency_penalty": 1e2,"#,
      r#" "tools": [ { "type": "function", "function": { "name": "f", "description": "d", "parameters": { "type": "object", "b": 1, "a": 2 } } }, { "type": "function", "function": { "name": "g" } } ],"#,
      r#" "tool_choice": "auto", "response_format": { "type": "text" }, "user": "u\u0031" }"#
    );
    let body: Value = serde_json::from_str(sent).unwrap();
    let raw = RawValue::from_string(sent.to_owned()).unwrap();
    let options = to_completion_options(&body, raw).unwrap().options;
    assert_eq!(
      options.to_json(),
      format!(
        concat!(
          r#"{{"messages":["#,
          r#"{{"role":"system","content":"be brief","name":"sys"}},"#,
          r#"{{"role":"user","content":[{{"type":"text","text":"hi"}},{{"type":"image_url","imageUrl":{{"url":"data:x"}}}},{{"type":"image_url","imageUrl":{{"url":"u"}}}}]}},"#,
          r#"{{"role":"assistant","content":null,"toolCalls":[{{"id":"c1","type":"function","function":{{"name":"f","arguments":""}}}}]}},"#,
          r#"{{"role":"tool","content":"42","toolCallId":"c1"}}],"#,
          r#""model":"m","temperature":1,"maxTokens":7,"topP":0.5,"stop":["a","b"],"#,
          r#""tools":[{{"type":"function","function":{{"name":"f","description":"d","parameters":{{"a":2,"b":1,"type":"object"}}}}}},{{"type":"function","function":{{"name":"g"}}}}],"#,
          r#""toolChoice":"auto","responseFormat":{{"type":"text"}},"seed":-3,"presencePenalty":0,"frequencyPenalty":100.0,"user":"u1","#,
          r#""request":{sent}}}"#
        ),
        sent = sent
      )
    );
    let choice = convert(&json!({ "messages": [{ "role": "user", "content": "x" }], "tool_choice": { "type": "function", "function": { "name": "f" } } })).unwrap();
    let text = choice.options.to_json();
    assert!(
      text.contains(r#""toolChoice":{"type":"function","function":{"name":"f"}}"#),
      "{text}"
    );
  }

  #[test]
  fn rejects_invalid_requests_with_a_named_field() {
    for (body, needle) in [
      (json!([]), "JSON object"),
      (json!({}), "'messages'"),
      (json!({ "messages": [] }), "must not be empty"),
      (
        json!({ "messages": [{ "role": "robot", "content": "x" }] }),
        "messages[0]: unsupported role 'robot'",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": 5 }] }),
        "messages[0]",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": [{ "type": "audio" }] }] }),
        "unsupported content part type 'audio'",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": "x" }], "temperature": "hot" }),
        "'temperature'",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": "x" }], "max_tokens": -1 }),
        "'max_tokens'",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": "x" }], "stop": [1] }),
        "'stop'",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": "x" }], "tools": [{ "type": "retrieval" }] }),
        "'tools'",
      ),
      (
        json!({ "messages": [{ "role": "user", "content": "x" }], "tool_choice": "always" }),
        "'tool_choice'",
      ),
    ] {
      let error = convert(&body).unwrap_err();
      assert_eq!(error.status, 400);
      assert_eq!(error.kind, "invalid_request_error");
      assert!(
        error.message.contains(needle),
        "{} lacks {needle}",
        error.message
      );
    }
  }

  #[test]
  fn chat_completion_has_integer_created_and_snake_case_usage() {
    let result = parse_result(json!({
      "content": null,
      "toolCalls": [{ "id": "c1", "type": "function", "function": { "name": "f", "arguments": { "a": 1 } } }],
      "usage": { "promptTokens": 3, "completionTokens": 4 }
    }))
    .unwrap();
    let completion = chat_completion(&identity(), &result);
    assert_eq!(completion["object"], json!("chat.completion"));
    assert_eq!(completion["created"], json!(1_700_000_000u64));
    assert_eq!(
      completion["usage"],
      json!({ "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7 })
    );
    assert_eq!(
      completion["choices"][0]["finish_reason"],
      json!("tool_calls")
    );
    assert_eq!(
      completion["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
      json!("{\"a\":1}")
    );
  }

  /// The `json!`-built `chat.completion` that [`ChatCompletion`] replaced,
  /// kept as the reference its bytes are compared with.
  fn chat_completion_by_json_macro(identity: &AnswerIdentity, result: &CompletionResult) -> Value {
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert("content".into(), json!(result.content));
    message.insert("refusal".into(), Value::Null);
    let tool_calls = result.tool_calls.as_deref().unwrap_or_default();
    if !tool_calls.is_empty() {
      let calls: Vec<Value> = tool_calls
        .iter()
        .map(|call| json!({ "id": call.id, "type": "function", "function": { "name": call.function.name, "arguments": call.function.arguments } }))
        .collect();
      message.insert("tool_calls".into(), Value::Array(calls));
    }
    let finish_reason = normalize_finish_reason(result.finish_reason.as_deref()).unwrap_or(
      if tool_calls.is_empty() {
        "stop"
      } else {
        "tool_calls"
      },
    );
    let mut completion = json!({
      "id": identity.id,
      "object": "chat.completion",
      "created": identity.created,
      "model": result.model.as_deref().unwrap_or(&identity.model),
      "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason }],
    });
    if let Some(usage) = result.usage {
      completion["usage"] = usage.wire();
    }
    completion
  }

  #[test]
  fn chat_completion_bytes_are_the_json_macros() {
    let results = [
      json!({ "content": "hello \"world\"\n\u{1F600} </script>" }),
      json!({ "content": null }),
      json!({}),
      json!({ "content": "x", "finishReason": "max_tokens", "model": "other-model" }),
      json!({ "content": "x", "usage": { "promptTokens": 3, "completionTokens": 4 } }),
      json!({ "content": "x", "usage": { "promptTokens": 3, "completionTokens": 4, "totalTokens": 9 } }),
      json!({ "content": "", "toolCalls": [] }),
      json!({
        "content": null,
        "toolCalls": [
          { "id": "c1", "type": "function", "function": { "name": "f", "arguments": { "a": [1, "\u{0}"] } } },
          { "id": "c2", "function": { "name": "g\"", "arguments": "{}" } }
        ],
        "finishReason": "end_turn",
        "usage": { "promptTokens": 0, "completionTokens": 18446744073709551615u64 }
      }),
    ];
    for result in results {
      let result = parse_result(result).unwrap();
      let typed = serde_json::to_vec(&ChatCompletion::new(&identity(), &result)).unwrap();
      let reference =
        serde_json::to_vec(&chat_completion_by_json_macro(&identity(), &result)).unwrap();
      assert_eq!(
        String::from_utf8(typed).unwrap(),
        String::from_utf8(reference).unwrap(),
        "{result:?}"
      );
      assert_eq!(
        chat_completion(&identity(), &result),
        chat_completion_by_json_macro(&identity(), &result)
      );
    }
  }

  #[test]
  fn invalid_results_are_named() {
    assert!(parse_result(json!("text")).is_err());
    assert!(parse_result(json!({ "content": 5 }))
      .unwrap_err()
      .contains("invalid CompletionResult"));
    assert!(parse_result(
      json!({ "content": "x", "usage": { "promptTokens": -1, "completionTokens": 1 } })
    )
    .is_err());
  }

  #[test]
  fn stream_encoder_follows_the_openai_rules() {
    let mut encoder = StreamEncoder::new(identity(), true);
    let mut out = Vec::new();
    assert!(!encoder.started());
    encoder.push(parse_chunk(json!({ "content": "Hel" })).unwrap(), &mut out);
    encoder.push(parse_chunk(json!({ "toolCalls": [{ "index": 0, "function": { "name": "f", "arguments": "{\"a\"" } }] })).unwrap(), &mut out);
    encoder.push(parse_chunk(json!({ "toolCalls": [{ "index": 0, "id": "ignored", "function": { "name": "again", "arguments": ":1}" } }] })).unwrap(), &mut out);
    encoder.push(parse_chunk(json!({ "finishReason": "tool_use", "usage": { "promptTokens": 1, "completionTokens": 2, "totalTokens": 3 } })).unwrap(), &mut out);
    encoder.finish(&mut out);
    let chunks: Vec<Value> = out[..out.len() - 1]
      .iter()
      .map(|p| serde_json::from_str(p).unwrap())
      .collect();
    assert_eq!(out.last().unwrap(), DONE);
    assert_eq!(
      chunks[0]["choices"][0]["delta"],
      json!({ "role": "assistant", "content": "" })
    );
    assert_eq!(
      chunks[1]["choices"][0]["delta"],
      json!({ "content": "Hel" })
    );
    assert_eq!(
      chunks[2]["choices"][0]["delta"]["tool_calls"][0],
      json!({ "index": 0, "id": "call_chatcmpl-t-1_0", "type": "function", "function": { "name": "f", "arguments": "{\"a\"" } })
    );
    assert_eq!(
      chunks[3]["choices"][0]["delta"]["tool_calls"][0],
      json!({ "index": 0, "function": { "arguments": ":1}" } })
    );
    assert_eq!(
      chunks[4]["choices"][0]["finish_reason"],
      json!("tool_calls")
    );
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(
      chunks[5]["usage"],
      json!({ "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3 })
    );
    for chunk in &chunks {
      assert_eq!(chunk["id"], json!("chatcmpl-t-1"));
      assert_eq!(chunk["created"], json!(1_700_000_000u64));
      assert_eq!(chunk["model"], json!("qwen"));
      assert!(chunk.get("usage").is_some());
    }
    let finishes = chunks
      .iter()
      .filter(|c| {
        !c["choices"][0]["finish_reason"].is_null()
          && c["choices"].as_array().is_some_and(|a| !a.is_empty())
      })
      .count();
    assert_eq!(finishes, 1);
  }

  #[test]
  fn stream_without_usage_has_no_usage_field() {
    let mut encoder = StreamEncoder::new(identity(), false);
    let mut out = Vec::new();
    encoder.push_result(
      parse_result(json!({ "content": "hi", "finishReason": "length" })).unwrap(),
      &mut out,
    );
    encoder.finish(&mut out);
    assert_eq!(out.len(), 4);
    let last: Value = serde_json::from_str(&out[2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], json!("length"));
    assert!(last.get("usage").is_none());
  }

  /// The payload as it was built before the direct writer: a `json!` object.
  fn json_built_payload(
    identity: &AnswerIdentity,
    include_usage: bool,
    delta: Value,
    finish_reason: Option<&str>,
  ) -> String {
    let mut chunk = json!({
      "id": identity.id,
      "object": "chat.completion.chunk",
      "created": identity.created,
      "model": identity.model,
      "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
    });
    if include_usage {
      chunk["usage"] = Value::Null;
    }
    chunk.to_string()
  }

  #[test]
  fn stream_payloads_are_these_exact_bytes() {
    let mut encoder = StreamEncoder::new(identity(), true);
    let mut out = Vec::new();
    encoder.push(
      parse_chunk(json!({ "content": "tok \"q\"\n" })).unwrap(),
      &mut out,
    );
    encoder.push(parse_chunk(json!({ "content": "x", "toolCalls": [{ "index": 1, "id": "c9", "function": { "name": "f", "arguments": { "a": 1 } } }] })).unwrap(), &mut out);
    encoder.push(parse_chunk(json!({ "toolCalls": [{ "index": 1, "function": { "arguments": "}" } }], "usage": { "promptTokens": 2, "completionTokens": 5 } })).unwrap(), &mut out);
    encoder.finish(&mut out);
    let tail = r#""created":1700000000,"id":"chatcmpl-t-1","model":"qwen","object":"chat.completion.chunk","usage":null}"#;
    let expected = [
      format!(r#"{{"choices":[{{"delta":{{"content":"","role":"assistant"}},"finish_reason":null,"index":0,"logprobs":null}}],{tail}"#),
      format!(r#"{{"choices":[{{"delta":{{"content":"tok \"q\"\n"}},"finish_reason":null,"index":0,"logprobs":null}}],{tail}"#),
      format!(r#"{{"choices":[{{"delta":{{"content":"x","tool_calls":[{{"function":{{"arguments":"{{\"a\":1}}","name":"f"}},"id":"c9","index":1,"type":"function"}}]}},"finish_reason":null,"index":0,"logprobs":null}}],{tail}"#),
      format!(r#"{{"choices":[{{"delta":{{"tool_calls":[{{"function":{{"arguments":"}}"}},"index":1}}]}},"finish_reason":null,"index":0,"logprobs":null}}],{tail}"#),
      format!(r#"{{"choices":[{{"delta":{{}},"finish_reason":"tool_calls","index":0,"logprobs":null}}],{tail}"#),
      r#"{"choices":[],"created":1700000000,"id":"chatcmpl-t-1","model":"qwen","object":"chat.completion.chunk","usage":{"completion_tokens":5,"prompt_tokens":2,"total_tokens":7}}"#.to_owned(),
      DONE.to_owned(),
    ];
    assert_eq!(out, expected);
  }

  #[test]
  fn direct_payloads_are_the_bytes_of_the_json_built_object() {
    let awkward = AnswerIdentity {
      id: "chatcmpl-t \"1\"\\é".into(),
      created: 0,
      model: "m\u{1}\t雪".into(),
    };
    let mut every_ascii = String::new();
    for byte in 1u8..0x80 {
      every_ascii.push(char::from(byte));
    }
    for include_usage in [false, true] {
      let mut encoder = StreamEncoder::new(awkward.clone(), include_usage);
      let mut out = Vec::new();
      for content in ["tok ", every_ascii.as_str(), "🦀 \u{2028}", "\u{0}"] {
        encoder.push(
          parse_chunk(json!({ "content": content })).unwrap(),
          &mut out,
        );
      }
      encoder.push(
        parse_chunk(json!({ "finishReason": "length" })).unwrap(),
        &mut out,
      );
      encoder.finish(&mut out);
      let mut expected = vec![json_built_payload(
        &awkward,
        include_usage,
        json!({ "role": "assistant", "content": "" }),
        None,
      )];
      for content in ["tok ", every_ascii.as_str(), "🦀 \u{2028}", "\u{0}"] {
        expected.push(json_built_payload(
          &awkward,
          include_usage,
          json!({ "content": content }),
          None,
        ));
      }
      expected.push(json_built_payload(
        &awkward,
        include_usage,
        json!({}),
        Some("length"),
      ));
      assert_eq!(
        out[..expected.len()],
        expected[..],
        "include_usage {include_usage}"
      );
    }
  }

  #[test]
  fn the_chunk_post_form_is_the_json_form_escaped() {
    let awkward = AnswerIdentity {
      id: "chatcmpl-t \"1\"\\".into(),
      created: 7,
      model: "m\u{1}\t雪".into(),
    };
    for include_usage in [false, true] {
      let mut json = StreamEncoder::new(awkward.clone(), include_usage);
      let mut escaped = StreamEncoder::with_form(
        awkward.clone(),
        include_usage,
        PayloadForm::JsonStringContent,
      );
      let (mut plain, mut inside) = (Vec::new(), Vec::new());
      for encoder_out in [(&mut json, &mut plain), (&mut escaped, &mut inside)] {
        let (encoder, out) = encoder_out;
        for chunk in [
          json!({ "content": "tok \"q\" \\ \n 🦀 \u{1f}" }),
          json!({ "content": "x", "toolCalls": [{ "index": 0, "function": { "name": "f", "arguments": "{\"a\"" } }] }),
          json!({ "content": "" }),
          json!({ "finishReason": "length", "usage": { "promptTokens": 1, "completionTokens": 2 } }),
        ] {
          encoder.push(parse_chunk(chunk).unwrap(), out);
        }
        encoder.finish(out);
        encoder.fail(&ErrorReply::provider_error("b\"oom"), out);
      }
      assert_eq!(plain.len(), inside.len());
      for (plain, inside) in plain.iter().zip(&inside) {
        let quoted = serde_json::to_string(plain).unwrap();
        assert_eq!(&quoted[1..quoted.len() - 1], inside);
      }
    }
  }

  #[test]
  fn a_content_pushed_as_its_json_string_makes_the_payloads_the_typed_chunk_makes() {
    let contents = [
      "tok ",
      "tok \"q\" \\ \n\r\t\u{8}\u{c} 🦀 \u{1f}\u{7f} é",
      "\\u0041",
      "a",
    ];
    for form in [PayloadForm::Json, PayloadForm::JsonStringContent] {
      let (mut typed, mut raw) = (
        StreamEncoder::with_form(identity(), true, form),
        StreamEncoder::with_form(identity(), true, form),
      );
      // The registrar's sink on the raw path, a list of strings on the typed.
      let (mut typed_out, mut raw_out) = (Vec::new(), Payloads::default());
      for content in contents {
        typed.push(
          CompletionChunk {
            content: Some(content.into()),
            ..CompletionChunk::default()
          },
          &mut typed_out,
        );
        let json = serde_json::to_string(content).unwrap();
        let text = RawContent::new(&json).expect("serde_json's writing is taken");
        assert_eq!(text.decode(), content);
        raw.push_content(text, &mut raw_out);
      }
      typed.finish(&mut typed_out);
      raw.finish(&mut raw_out);
      assert_eq!(raw_out.iter().collect::<Vec<_>>(), typed_out, "{form:?}");
      assert_eq!(raw.spent(), typed.spent(), "{form:?}");
      assert_eq!(raw.answer(), typed.answer());
    }
    // Neither an empty content nor another writing is taken as it is.
    for json in [r#""""#, r#""\/""#, r#""\ud800""#, "7"] {
      assert_eq!(RawContent::new(json), None, "{json}");
    }
  }

  #[test]
  fn payloads_keep_each_one_whole_and_their_room_when_cleared() {
    let mut list: Payloads = ["a", "", "bc"].into_iter().collect();
    list.write_payload(4, |text| text.push_str("déf"));
    assert_eq!(list.len(), 4);
    assert_eq!(list.get(1), "");
    assert_eq!(list.get(3), "déf");
    assert_eq!(list.iter().collect::<Vec<_>>(), ["a", "", "bc", "déf"]);
    let room = (list.text.capacity(), list.ends.capacity());
    list.clear();
    assert!(list.is_empty());
    assert_eq!((list.text.capacity(), list.ends.capacity()), room);
    list.push_payload("x".into());
    assert_eq!(list.iter().collect::<Vec<_>>(), ["x"]);
    // An outsized payload's room is given back, down to what a list keeps.
    list.push_payload("\"".repeat(4 * Payloads::KEPT_ROOM));
    assert!(list.text.capacity() >= 4 * Payloads::KEPT_ROOM);
    list.clear();
    assert!(list.text.capacity() <= Payloads::KEPT_ROOM);
    assert!(list.text.capacity() >= room.0.min(Payloads::KEPT_ROOM));
  }

  #[test]
  fn in_band_error_then_done() {
    let mut encoder = StreamEncoder::new(identity(), false);
    let mut out = Vec::new();
    encoder.push(parse_chunk(json!({ "content": "x" })).unwrap(), &mut out);
    encoder.fail(&ErrorReply::provider_error("boom"), &mut out);
    assert_eq!(
      out[out.len() - 2],
      r#"{"error":{"code":"provider_error","message":"boom","type":"provider_error"}}"#
    );
    assert_eq!(out[out.len() - 1], DONE);
  }
}
