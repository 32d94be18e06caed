//! Property tests (proptest) of the decoders and encoders on the public core: the
//! task frame (`parse_task`, `parse_caller`), the OpenAI request → `CompletionOptions`
//! conversion, the chunk encoder (`StreamEncoder`) checked against async-openai's
//! typed objects (as a typed client reads them), a JavaScript string's lone
//! surrogates, and drawn task frames through a registrar and the fake mcpd (each
//! answered exactly once). 700 cases each in `cargo test`; `PROPTEST_CASES` (set by
//! scripts/stress.sh) runs more.
//! The SSE parser's and the task-id encoder's properties need private access and
//! live beside them (src/sse.rs, src/mcpd.rs).

mod support;

use std::collections::BTreeMap;

use async_openai::types::chat::{
  CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason, Role,
};
use proptest::prelude::*;
use serde_json::{json, Map, Number, Value};

use mcpctl_registrar::openai::{
  chat_completion, to_completion_options, AnswerIdentity, CompletionChunk, CompletionResult,
  ErrorReply, FunctionCall, FunctionDelta, FunctionKind, PayloadForm, Payloads, StreamEncoder,
  ToolCall, ToolCallDelta, Usage, DONE,
};
use mcpctl_registrar::wire::{
  parse_caller, parse_task, replace_lone_surrogates, write_json_str, ChunkPost, MAX_CALLER_BYTES,
  MAX_CALLER_GROUPS,
};

/// `PROPTEST_CASES` when set, else `default`; no regression files (a shrunk
/// failure is kept as an example test instead).
fn config(default: u32) -> ProptestConfig {
  let cases = std::env::var("PROPTEST_CASES")
    .ok()
    .and_then(|cases| cases.parse().ok())
    .unwrap_or(default);
  ProptestConfig {
    cases,
    failure_persistence: None,
    ..ProptestConfig::default()
  }
}

/// `to_completion_options` of a body sent as `serde_json` prints it.
fn convert(body: &Value) -> Result<mcpctl_registrar::openai::ChatRequest, ErrorReply> {
  to_completion_options(body, serde_json::value::to_raw_value(body).unwrap())
}

// ---------------------------------------------------------------------------
// Arbitrary JSON, biased towards the names and values the decoders look at.

fn key() -> impl Strategy<Value = String> {
  prop_oneof![
    4 => prop::sample::select(vec![
      "taskId", "provider", "stream", "body", "caller", "id", "name", "groups", "messages",
      "role", "content", "type", "text", "image_url", "url", "detail", "tool_call_id",
      "tool_calls", "function", "arguments", "model", "temperature", "max_tokens",
      "max_completion_tokens", "top_p", "stop", "tools", "tool_choice", "parameters",
      "description", "response_format", "seed", "presence_penalty", "frequency_penalty", "user",
      "stream_options", "include_usage",
    ])
    .prop_map(str::to_owned),
    1 => any::<String>(),
  ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
  prop_oneof![
    Just(Value::Null),
    any::<bool>().prop_map(Value::Bool),
    any::<i64>().prop_map(Value::from),
    any::<u64>().prop_map(Value::from),
    any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    prop::sample::select(vec![
      "system",
      "user",
      "assistant",
      "tool",
      "developer",
      "function",
      "text",
      "image_url",
      "auto",
      "none",
      "required",
      "",
      ".",
      "..",
    ])
    .prop_map(Value::from),
    any::<String>().prop_map(Value::String),
  ]
}

fn json_value() -> impl Strategy<Value = Value> {
  json_leaf().prop_recursive(5, 96, 8, |inner| {
    prop_oneof![
      prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
      prop::collection::btree_map(key(), inner, 0..6)
        .prop_map(|fields| Value::Object(fields.into_iter().collect())),
    ]
  })
}

// ---------------------------------------------------------------------------
// Valid OpenAI requests, in the forms clients send them.

fn text() -> impl Strategy<Value = String> {
  prop_oneof![
    3 => "[a-z ]{0,12}",
    1 => any::<String>(),
  ]
}

fn number() -> impl Strategy<Value = Value> {
  prop_oneof![
    (0u32..200).prop_map(|n| json!(f64::from(n) / 100.0)),
    (0u32..3).prop_map(|n| json!(n)),
  ]
}

fn content_part() -> impl Strategy<Value = Value> {
  prop_oneof![
    text().prop_map(|text| json!({ "type": "text", "text": text })),
    (
      text(),
      prop::option::of(prop::sample::select(vec!["low", "high", "auto"]))
    )
      .prop_map(|(url, detail)| match detail {
        Some(detail) =>
          json!({ "type": "image_url", "image_url": { "url": url, "detail": detail } }),
        None => json!({ "type": "image_url", "image_url": { "url": url } }),
      }),
  ]
}

fn tool_call() -> impl Strategy<Value = Value> {
  (text(), text(), text()).prop_map(|(id, name, arguments)| {
    json!({ "id": id, "type": "function", "function": { "name": name, "arguments": arguments } })
  })
}

fn message() -> impl Strategy<Value = Value> {
  (
    prop::sample::select(vec!["system", "user", "assistant", "tool", "developer"]),
    prop_oneof![
      Just(None),
      Just(Some(Value::Null)),
      text().prop_map(|text| Some(Value::String(text))),
      prop::collection::vec(content_part(), 0..3).prop_map(|parts| Some(Value::Array(parts))),
    ],
    prop::option::of(text()),
    prop::option::of(text()),
    prop::option::of(prop::collection::vec(tool_call(), 0..3)),
  )
    .prop_map(|(role, content, name, tool_call_id, tool_calls)| {
      let mut message = Map::new();
      message.insert("role".into(), json!(role));
      if let Some(content) = content {
        message.insert("content".into(), content);
      }
      if let Some(name) = name {
        message.insert("name".into(), json!(name));
      }
      if let Some(id) = tool_call_id {
        message.insert("tool_call_id".into(), json!(id));
      }
      if let Some(calls) = tool_calls {
        message.insert("tool_calls".into(), Value::Array(calls));
      }
      Value::Object(message)
    })
}

fn tool() -> impl Strategy<Value = Value> {
  (text(), prop::option::of(text()), any::<bool>()).prop_map(|(name, description, parameters)| {
    let mut function = Map::new();
    function.insert("name".into(), json!(name));
    if let Some(description) = description {
      function.insert("description".into(), json!(description));
    }
    if parameters {
      function.insert(
        "parameters".into(),
        json!({ "type": "object", "properties": { "x": { "type": "string" } } }),
      );
    }
    json!({ "type": "function", "function": function })
  })
}

/// A valid request: `(name, value)` fields, each optional.
fn valid_request() -> impl Strategy<Value = Value> {
  let optional = (
    (
      prop::option::of(text().prop_map(Value::String)),
      prop::option::of(number()),
      prop::option::of(number()),
      prop::option::of(number()),
      prop::option::of(number()),
      prop::option::of((any::<bool>(), 0u64..1 << 53)),
      prop::option::of(any::<i64>()),
    ),
    (
      prop::option::of(prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(text(), 0..4).prop_map(|stops| json!(stops)),
      ]),
      prop::option::of(prop::collection::vec(tool(), 0..3)),
      prop::option::of(prop_oneof![
        prop::sample::select(vec!["auto", "none", "required"]).prop_map(Value::from),
        text().prop_map(|name| json!({ "type": "function", "function": { "name": name } })),
      ]),
      prop::option::of(prop::sample::select(vec!["text", "json_object"])),
      prop::option::of(text()),
      prop::option::of(prop::option::of(any::<bool>())),
      any::<bool>(),
    ),
  );
  (prop::collection::vec(message(), 1..4), optional).prop_map(
    |(
      messages,
      (
        (model, temperature, top_p, presence, frequency, max_tokens, seed),
        (stop, tools, tool_choice, format, user, stream_options, stream),
      ),
    )| {
      let mut request = Map::new();
      request.insert("messages".into(), Value::Array(messages));
      let mut put = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
          request.insert(name.into(), value);
        }
      };
      put("model", model);
      put("temperature", temperature);
      put("top_p", top_p);
      put("presence_penalty", presence);
      put("frequency_penalty", frequency);
      if let Some((completion, max)) = max_tokens {
        let name = if completion {
          "max_completion_tokens"
        } else {
          "max_tokens"
        };
        put(name, Some(json!(max)));
      }
      put("seed", seed.map(Value::from));
      put("stop", stop);
      put("tools", tools.map(Value::Array));
      put("tool_choice", tool_choice);
      put(
        "response_format",
        format.map(|kind| json!({ "type": kind })),
      );
      put("user", user.map(Value::String));
      put(
        "stream_options",
        stream_options.map(|include| match include {
          Some(include) => json!({ "include_usage": include }),
          None => json!({}),
        }),
      );
      put("stream", Some(json!(stream)));
      Value::Object(request)
    },
  )
}

/// What a request asks for, in OpenAI's field names, in one form: `stop` a list,
/// `max_tokens` whichever of the two names was used, an absent `content` null.
fn canonical(request: &Value) -> Value {
  let mut out = Map::new();
  let messages: Vec<Value> = request["messages"]
    .as_array()
    .unwrap()
    .iter()
    .map(|message| {
      let mut message = message.as_object().unwrap().clone();
      message.entry("content").or_insert(Value::Null);
      Value::Object(message)
    })
    .collect();
  out.insert("messages".into(), Value::Array(messages));
  for name in [
    "model",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
    "user",
  ] {
    if let Some(value) = request.get(name) {
      out.insert(name.into(), value.clone());
    }
  }
  if let Some(max) = request
    .get("max_completion_tokens")
    .or_else(|| request.get("max_tokens"))
  {
    out.insert("max_tokens".into(), max.clone());
  }
  match request.get("stop") {
    Some(Value::String(stop)) => {
      out.insert("stop".into(), json!([stop]));
    }
    Some(stops) => {
      out.insert("stop".into(), stops.clone());
    }
    None => {}
  }
  Value::Object(out)
}

/// `CompletionOptions` (as the provider gets them) back in OpenAI's field names.
fn back_to_openai(options: &Value) -> Value {
  let options = options.as_object().unwrap();
  let mut out = Map::new();
  let messages: Vec<Value> = options["messages"]
    .as_array()
    .unwrap()
    .iter()
    .map(|message| {
      let mut back = Map::new();
      back.insert("role".into(), message["role"].clone());
      let content = match &message["content"] {
        Value::Array(parts) => Value::Array(
          parts
            .iter()
            .map(|part| match part["type"].as_str().unwrap() {
              "text" => json!({ "type": "text", "text": part["text"] }),
              "image_url" => json!({ "type": "image_url", "image_url": part["imageUrl"] }),
              other => panic!("unknown part type {other}"),
            })
            .collect(),
        ),
        other => other.clone(),
      };
      back.insert("content".into(), content);
      for (from, to) in [
        ("name", "name"),
        ("toolCallId", "tool_call_id"),
        ("toolCalls", "tool_calls"),
      ] {
        if let Some(value) = message.get(from) {
          back.insert(to.into(), value.clone());
        }
      }
      Value::Object(back)
    })
    .collect();
  out.insert("messages".into(), Value::Array(messages));
  for (from, to) in [
    ("model", "model"),
    ("temperature", "temperature"),
    ("topP", "top_p"),
    ("presencePenalty", "presence_penalty"),
    ("frequencyPenalty", "frequency_penalty"),
    ("seed", "seed"),
    ("maxTokens", "max_tokens"),
    ("stop", "stop"),
    ("tools", "tools"),
    ("toolChoice", "tool_choice"),
    ("responseFormat", "response_format"),
    ("user", "user"),
  ] {
    if let Some(value) = options.get(from) {
      out.insert(to.into(), value.clone());
    }
  }
  Value::Object(out)
}

// ---------------------------------------------------------------------------
// Provider chunks, for the encoder.

fn usage() -> impl Strategy<Value = Usage> {
  // async-openai reads token counts as u32: a provider reporting more than 2^32
  // tokens would fail a typed Rust client (not a case seen in practice).
  (
    0u64..1 << 31,
    0u64..1 << 31,
    prop::option::of(0u64..1 << 31),
  )
    .prop_map(|(prompt_tokens, completion_tokens, total_tokens)| Usage {
      prompt_tokens,
      completion_tokens,
      total_tokens,
    })
}

fn finish_reason() -> impl Strategy<Value = String> {
  prop_oneof![
    3 => prop::sample::select(vec![
      "stop", "length", "tool_calls", "content_filter", "end_turn", "max_tokens", "tool_use",
      "function_call", "eos", "stop_sequence",
    ])
    .prop_map(str::to_owned),
    1 => any::<String>(),
  ]
}

fn chunk() -> impl Strategy<Value = CompletionChunk> {
  let delta = (
    0u32..3,
    prop::option::of(text()),
    prop::option::of(text()),
    prop::option::of(text()),
  )
    .prop_map(|(index, id, name, arguments)| ToolCallDelta {
      index,
      id,
      function: Some(FunctionDelta { name, arguments }),
    });
  (
    prop::option::of(any::<String>()),
    prop::option::of(prop::collection::vec(delta, 0..3)),
    prop::option::of(finish_reason()),
    prop::option::of(usage()),
  )
    .prop_map(
      |(content, tool_calls, finish_reason, usage)| CompletionChunk {
        content,
        tool_calls,
        finish_reason,
        usage,
      },
    )
}

fn identity() -> impl Strategy<Value = AnswerIdentity> {
  (text(), text(), 0u64..u64::from(u32::MAX)).prop_map(|(task, model, created)| AnswerIdentity {
    id: format!("chatcmpl-{task}"),
    created,
    model,
  })
}

/// What a typed client reads from a stream's payloads: the content and each tool
/// call (id, name, arguments) put together, the one finish reason and the usage.
#[derive(Debug, Default, PartialEq)]
struct Assembled {
  content: String,
  calls: BTreeMap<u32, (String, String, String)>,
  finish: Option<FinishReason>,
  usage: Option<(u32, u32, u32)>,
}

fn assemble(payloads: &[String], identity: &AnswerIdentity, include_usage: bool) -> Assembled {
  let (done, payloads) = payloads.split_last().expect("at least [DONE]");
  assert_eq!(done, DONE, "the stream ends with [DONE]");
  let mut assembled = Assembled::default();
  for (at, payload) in payloads.iter().enumerate() {
    assert_ne!(payload, DONE, "[DONE] only at the end");
    let chunk: CreateChatCompletionStreamResponse = serde_json::from_str(payload)
      .unwrap_or_else(|error| panic!("payload {at} is not a typed chunk ({error}): {payload}"));
    assert_eq!(chunk.object, "chat.completion.chunk");
    assert_eq!(chunk.id, identity.id);
    assert_eq!(chunk.model, identity.model);
    assert_eq!(u64::from(chunk.created), identity.created);
    if chunk.choices.is_empty() {
      assert!(
        include_usage && at == payloads.len() - 1,
        "usage comes last"
      );
      let usage = chunk.usage.expect("the usage chunk has usage");
      assembled.usage = Some((
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
      ));
      continue;
    }
    assert!(
      chunk.usage.is_none(),
      "usage is null before the usage chunk"
    );
    assert_eq!(chunk.choices.len(), 1);
    let choice = &chunk.choices[0];
    assert_eq!(choice.index, 0);
    assert!(assembled.finish.is_none(), "nothing after the finish chunk");
    if at == 0 {
      assert_eq!(
        choice.delta.role,
        Some(Role::Assistant),
        "the role comes first"
      );
    }
    if let Some(content) = &choice.delta.content {
      assembled.content.push_str(content);
    }
    for call in choice.delta.tool_calls.iter().flatten() {
      let function = call
        .function
        .as_ref()
        .expect("a tool call delta has a function");
      match assembled.calls.get_mut(&call.index) {
        None => {
          let id = call.id.clone().expect("a new tool call has an id");
          assert!(!id.is_empty());
          let name = function.name.clone().expect("a new tool call has a name");
          let arguments = function.arguments.clone().unwrap_or_default();
          assembled.calls.insert(call.index, (id, name, arguments));
        }
        Some((_, _, arguments)) => {
          assert!(
            call.id.is_none() && function.name.is_none(),
            "introduced once"
          );
          arguments.push_str(function.arguments.as_deref().unwrap_or_default());
        }
      }
    }
    assembled.finish = choice.finish_reason;
  }
  assert!(assembled.finish.is_some(), "exactly one finish reason");
  assert_eq!(assembled.usage.is_some(), include_usage);
  assembled
}

/// What the provider's chunks say, assembled the way the encoder promises.
fn expected(chunks: &[CompletionChunk], identity: &AnswerIdentity) -> Assembled {
  let mut assembled = Assembled::default();
  let mut reason = None;
  let mut usage = None;
  for chunk in chunks {
    assembled
      .content
      .push_str(chunk.content.as_deref().unwrap_or_default());
    for call in chunk.tool_calls.iter().flatten() {
      let function = call.function.clone().unwrap_or_default();
      let arguments = function.arguments.unwrap_or_default();
      assembled
        .calls
        .entry(call.index)
        .and_modify(|(_, _, all)| all.push_str(&arguments))
        .or_insert_with(|| {
          let id = call
            .id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("call_{}_{}", identity.id, call.index));
          (id, function.name.unwrap_or_default(), arguments.clone())
        });
    }
    if let Some(found) = &chunk.finish_reason {
      reason = Some(match found.as_str() {
        "length" | "max_tokens" => FinishReason::Length,
        "tool_calls" | "tool_use" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
      });
    }
    usage = chunk.usage.or(usage);
  }
  assembled.finish = Some(reason.unwrap_or(if assembled.calls.is_empty() {
    FinishReason::Stop
  } else {
    FinishReason::ToolCalls
  }));
  assembled.usage = usage.map(|usage| {
    (
      usage.prompt_tokens as u32,
      usage.completion_tokens as u32,
      usage
        .total_tokens
        .unwrap_or(usage.prompt_tokens + usage.completion_tokens) as u32,
    )
  });
  assembled
}

fn encode(
  chunks: &[CompletionChunk],
  identity: &AnswerIdentity,
  include_usage: bool,
  form: PayloadForm,
) -> Vec<String> {
  let mut encoder = StreamEncoder::with_form(identity.clone(), include_usage, form);
  let mut out = Vec::new();
  for chunk in chunks {
    encoder.push(chunk.clone(), &mut out);
  }
  encoder.finish(&mut out);
  // The registrar's sink, emptied and reused every few chunks as its runs
  // are, holds the same payloads.
  let mut encoder = StreamEncoder::with_form(identity.clone(), include_usage, form);
  let mut list = Payloads::default();
  let mut taken = Vec::new();
  let mut take = |list: &mut Payloads| {
    taken.extend(list.iter().map(str::to_owned));
    list.clear();
  };
  for (index, chunk) in chunks.iter().enumerate() {
    encoder.push(chunk.clone(), &mut list);
    if index % 3 == 2 {
      take(&mut list);
    }
  }
  encoder.finish(&mut list);
  take(&mut list);
  assert_eq!(taken, out);
  out
}

/// JSON text for a JavaScript string (UTF-16 code units) as `JSON.stringify`
/// writes it: a lone surrogate as a `\u` escape (lower-case hex, or upper when
/// `upper`), everything else as serde_json escapes it.
fn js_stringify(units: &[u16], upper: bool) -> String {
  let mut json = String::from("\"");
  for decoded in char::decode_utf16(units.iter().copied()) {
    match decoded {
      Ok(c) => {
        let escaped = serde_json::to_string(&c.to_string()).unwrap();
        json.push_str(&escaped[1..escaped.len() - 1]);
      }
      Err(lone) if upper => json.push_str(&format!("\\u{:04X}", lone.unpaired_surrogate())),
      Err(lone) => json.push_str(&format!("\\u{:04x}", lone.unpaired_surrogate())),
    }
  }
  json.push('"');
  json
}

/// JavaScript strings: any code units, surrogates (paired, lone, reversed) often.
fn js_string() -> impl Strategy<Value = Vec<u16>> {
  prop::collection::vec(
    prop_oneof![
      2 => any::<u16>(),
      1 => prop::sample::select(vec![0xD800u16, 0xDBFF, 0xDC00, 0xDFFF, 0xD83D, 0xDE00, 0x5C, 0x75, 0x22]),
    ],
    0..24,
  )
}

// 700 cases per test in `cargo test`: the file's tests take about 15 s in all in
// a debug build on this project's 2-core machine under the other builds' load
// (the JSON strategies are the cost).
proptest! {
  #![proptest_config(config(700))]

  /// Any JavaScript string a provider sends, lone surrogates included, reads as
  /// `toWellFormed()` of it: each lone surrogate U+FFFD, the rest as it was.
  #[test]
  fn any_javascript_string_reads_as_its_well_formed_self(
    units in js_string(),
    upper in any::<bool>(),
  ) {
    let text = format!(r#"{{"content":{}}}"#, js_stringify(&units, upper));
    let repaired = replace_lone_surrogates(&text);
    let read: CompletionChunk = serde_json::from_str(repaired.as_deref().unwrap_or(&text))
      .map_err(|error| TestCaseError::fail(format!("{error}: {text}")))?;
    prop_assert_eq!(read.content, Some(String::from_utf16_lossy(&units)));
    let lone = char::decode_utf16(units.iter().copied()).any(|decoded| decoded.is_err());
    prop_assert_eq!(repaired.is_some(), lone, "repaired only when needed");
  }

  /// Any frame text, and any JSON at all: no panic. A frame that is an object
  /// with a string `taskId` always yields that id, parsed or not, so the task
  /// can be answered (docs/protocol.md section 4).
  #[test]
  fn task_frames_never_panic_and_keep_their_task_id(
    garbage in any::<String>(),
    fields in prop::collection::btree_map(key(), json_value(), 0..6),
    task_id in any::<String>(),
  ) {
    let _ = parse_task(&garbage);
    let mut frame: Map<String, Value> = fields.into_iter().collect();
    let _ = parse_task(&Value::Object(frame.clone()).to_string());
    frame.insert("taskId".into(), Value::String(task_id.clone()));
    match parse_task(&Value::Object(frame).to_string()) {
      Ok(task) => prop_assert_eq!(task.task_id, task_id),
      Err(malformed) => prop_assert_eq!(malformed.task_id, Some(task_id)),
    }
  }

  /// Any `caller`: no panic; what is accepted keeps the documented bounds.
  #[test]
  fn callers_never_panic_and_stay_within_bounds(caller in json_value()) {
    let raw = serde_json::value::to_raw_value(&caller).unwrap();
    if let Ok(caller) = parse_caller(&raw) {
      prop_assert!(!caller.id.is_empty() && caller.id.len() <= MAX_CALLER_BYTES);
      prop_assert!(caller.name.iter().all(|name| name.len() <= MAX_CALLER_BYTES));
      let groups = caller.groups.unwrap_or_default();
      prop_assert!(groups.len() <= MAX_CALLER_GROUPS);
      prop_assert!(groups.iter().all(|group| group.len() <= MAX_CALLER_BYTES));
    }
  }

  /// Any JSON, or a valid request with one field replaced by any JSON: no panic,
  /// and a refusal is a 400 `invalid_request`.
  #[test]
  fn any_request_converts_or_is_refused_400(
    body in json_value(),
    valid in valid_request(),
    field in key(),
    replacement in json_value(),
  ) {
    for body in [body, {
      let mut changed = valid;
      changed[field.as_str()] = replacement;
      changed
    }] {
      if let Err(refused) = convert(&body) {
        prop_assert_eq!((refused.status, refused.code), (400, "invalid_request"));
      }
    }
  }

  /// A valid request becomes `CompletionOptions` that say the same in OpenAI's
  /// terms, keep the request as sent, and ask for usage as it did.
  #[test]
  fn a_valid_request_round_trips_through_completion_options(request in valid_request()) {
    let converted = convert(&request).map_err(|refused| {
      TestCaseError::fail(format!("refused: {}", refused.message))
    })?;
    prop_assert_eq!(
      converted.include_usage,
      request["stream_options"]["include_usage"] == json!(true)
    );
    prop_assert_eq!(converted.model.as_deref(), request["model"].as_str());
    let options: Value = serde_json::from_str(&converted.options.to_json()).unwrap();
    prop_assert_eq!(&options["request"], &request);
    prop_assert_eq!(back_to_openai(&options), canonical(&request));
  }

  /// Every payload of any stream is a chunk async-openai's typed client reads;
  /// put together, they say what the provider said (content byte for byte,
  /// every tool call once, one finish reason, usage last when asked for). The
  /// chunk POST's form is the same JSON escaped as a string.
  #[test]
  fn every_stream_payload_is_a_typed_chunk_that_says_what_the_provider_said(
    chunks in prop::collection::vec(chunk(), 0..8),
    identity in identity(),
    include_usage in any::<bool>(),
  ) {
    let payloads = encode(&chunks, &identity, include_usage, PayloadForm::Json);
    let assembled = assemble(&payloads, &identity, include_usage);
    let mut wanted = expected(&chunks, &identity);
    if !include_usage {
      wanted.usage = None;
    } else if wanted.usage.is_none() {
      wanted.usage = Some((0, 0, 0));
    }
    prop_assert_eq!(assembled, wanted);
    let escaped = encode(&chunks, &identity, include_usage, PayloadForm::JsonStringContent);
    prop_assert_eq!(escaped.len(), payloads.len());
    for (escaped, payload) in escaped.iter().zip(&payloads) {
      let unescaped: String = serde_json::from_str(&format!("\"{escaped}\"")).unwrap();
      prop_assert_eq!(&unescaped, payload);
    }
  }

  /// The chunk POST's body, built by hand in one pass, is the bytes serde_json
  /// writes for it, whatever the payloads hold.
  #[test]
  fn every_chunk_post_body_is_serde_jsons_bytes(
    seq in any::<u64>(),
    chunks in prop::collection::vec(any::<String>(), 0..6),
  ) {
    let post = ChunkPost { seq, chunks: &chunks };
    prop_assert_eq!(post.to_json(), serde_json::to_string(&post).unwrap());
    for chunk in &chunks {
      let mut ours = String::new();
      write_json_str(&mut ours, chunk);
      prop_assert_eq!(ours, serde_json::to_string(chunk).unwrap());
    }
  }

  /// An error after payloads went out is one JSON `{"error":…}` payload, then `[DONE]`.
  #[test]
  fn an_in_band_error_is_one_json_error_then_done(
    chunks in prop::collection::vec(chunk(), 1..4),
    identity in identity(),
    message in any::<String>(),
  ) {
    let mut encoder = StreamEncoder::new(identity, false);
    let mut out = Vec::new();
    for chunk in chunks {
      encoder.push(chunk, &mut out);
    }
    let before = out.len();
    encoder.fail(&ErrorReply::provider_error(message.clone()), &mut out);
    prop_assert_eq!(out.len(), before + 2);
    prop_assert_eq!(out[before + 1].as_str(), DONE);
    let error: Value = serde_json::from_str(&out[before]).unwrap();
    prop_assert_eq!(&error["error"]["message"], &json!(message));
    prop_assert_eq!(&error["error"]["code"], &json!("provider_error"));
  }

  /// A non-streaming answer is a chat.completion async-openai's typed client reads.
  #[test]
  fn every_completion_is_a_typed_chat_completion(
    content in prop::option::of(any::<String>()),
    calls in prop::collection::vec((text(), text(), text()), 0..3),
    finish in prop::option::of(finish_reason()),
    usage in prop::option::of(usage()),
    model in prop::option::of(text()),
    identity in identity(),
  ) {
    let result = CompletionResult {
      content: content.clone(),
      tool_calls: (!calls.is_empty()).then(|| {
        calls
          .iter()
          .map(|(id, name, arguments)| ToolCall {
            id: id.clone(),
            r#type: FunctionKind,
            function: FunctionCall { name: name.clone(), arguments: arguments.clone() },
          })
          .collect()
      }),
      finish_reason: finish,
      usage,
      model: model.clone(),
    };
    let body = chat_completion(&identity, &result).to_string();
    let typed: CreateChatCompletionResponse = serde_json::from_str(&body)
      .map_err(|error| TestCaseError::fail(format!("{error}: {body}")))?;
    prop_assert_eq!(typed.choices.len(), 1);
    prop_assert_eq!(&typed.choices[0].message.content, &content);
    prop_assert_eq!(typed.model, model.unwrap_or_else(|| identity.model.clone()));
    let typed_calls = typed.choices[0].message.tool_calls.clone().unwrap_or_default();
    prop_assert_eq!(typed_calls.len(), calls.len());
    prop_assert!(typed.choices[0].finish_reason.is_some());
  }
}

// ---------------------------------------------------------------------------
// Every task gets one answer: arbitrary task frames through a registrar.

const PROVIDER: &str = "local-qwen";

/// A task frame with `taskId` = `id` and everything else drawn: the provider
/// (the published one, another, or any JSON), `stream`, `body` (a valid request,
/// or any JSON), `caller` and extra fields, each present or not.
fn task_frame(id: String) -> impl Strategy<Value = Value> {
  // Mostly frames that reach the provider, so that every ending is drawn often.
  (
    prop_oneof![
      8 => Just(Some(json!(PROVIDER))),
      1 => Just(None),
      1 => Just(Some(json!("not-published"))),
      1 => json_value().prop_map(Some),
    ],
    prop_oneof![
      6 => any::<bool>().prop_map(|stream| Some(Value::Bool(stream))),
      1 => Just(None),
      1 => json_leaf().prop_map(Some),
    ],
    prop_oneof![
      6 => valid_request().prop_map(Some),
      1 => Just(None),
      1 => json_value().prop_map(Some),
    ],
    prop_oneof![4 => Just(None), 1 => json_value().prop_map(Some)],
    prop::collection::btree_map(key(), json_leaf(), 0..3),
  )
    .prop_map(move |(provider, stream, body, caller, extra)| {
      let mut frame: Map<String, Value> = extra.into_iter().collect();
      frame.insert("taskId".into(), json!(id));
      for (name, value) in [
        ("provider", provider),
        ("stream", stream),
        ("body", body),
        ("caller", caller),
      ] {
        match value {
          Some(value) => frame.insert(name.into(), value),
          None => frame.remove(name),
        };
      }
      Value::Object(frame)
    })
}

/// Every frame with a usable task id is answered exactly once: one result POST,
/// or chunk POSTs ending in `[DONE]`, never both (docs/protocol.md section 4),
/// whatever else the frame holds and however the provider ends; frames without a
/// readable id, in between, change nothing. The frames are drawn by proptest (no
/// shrinking: a failure prints the frame), half of `PROPTEST_CASES` (350 by
/// default), all through one registrar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_drawn_task_frame_is_answered_exactly_once() {
  use proptest::strategy::ValueTree;
  use proptest::test_runner::TestRunner;
  use support::provider::{Behavior, MockProvider};
  use support::{wait_for, FakeMcpd, Route, TempDir, WAIT};

  let count = (config(700).cases / 2).max(1) as usize;
  let mut runner = TestRunner::new(config(700));
  let mut draw =
    |strategy: BoxedStrategy<Value>| strategy.new_tree(&mut runner).expect("a value").current();
  let frames: Vec<(String, Value)> = (0..count)
    .map(|index| {
      let id = format!(
        "t{index}-{}",
        draw(text().prop_map(Value::String).boxed())
          .as_str()
          .unwrap()
      );
      let id: String = id.chars().take(64).collect();
      (id.clone(), draw(task_frame(id).boxed()))
    })
    .collect();

  let fake = FakeMcpd::start().await;
  let dir = TempDir::new("frames");
  // Every kind of ending, in turn: an answer, a rejection, a stream, a stream
  // that fails after its first chunks.
  let behaviors = [
    Behavior::Answer(json!({ "content": "hello", "finishReason": "stop" })),
    Behavior::Reject("boom".to_owned()),
    Behavior::Stream {
      count: 3,
      delay: std::time::Duration::ZERO,
      fail: None,
    },
    Behavior::Stream {
      count: 2,
      delay: std::time::Duration::ZERO,
      fail: Some("mid-stream".to_owned()),
    },
  ];
  let script = behaviors.iter().cycle().take(count + 1).cloned().collect();
  let provider = MockProvider::new(true, script);
  let registrar = mcpctl_registrar::registrar::Registrar::new(
    mcpctl_registrar::registrar::RegistrarConfig {
      mcpd_url: fake.url.clone(),
      token: mcpctl_registrar::secret::Secret::new("sk-frames-token"),
      providers: vec![mcpctl_registrar::dispatch::PublishedProvider {
        descriptor: mcpctl_registrar::wire::ProviderDescriptor {
          name: PROVIDER.to_owned(),
          kind: "ollama".to_owned(),
          model: None,
          description: None,
          context_window: None,
        },
        provider,
        policy: Default::default(),
      }],
      config_dir: dir.path().to_owned(),
      heartbeat_interval: std::time::Duration::from_secs(60),
      idle_timeout: None,
      backoff: mcpctl_registrar::backoff::BackoffPolicy::default(),
      dispatch: mcpctl_registrar::dispatch::DispatchSettings {
        task_timeout: std::time::Duration::from_secs(30),
        max_concurrency: 8,
        max_queue: 10_000,
      },
      allow_insecure_http: false,
    },
    None,
    tracing::Span::none(),
  )
  .expect("valid config");
  registrar.start().await.expect("start");
  fake.wait_stream(1).await;

  for (index, (_, frame)) in frames.iter().enumerate() {
    fake.send("task", frame);
    if index % 7 == 0 {
      // Frames without a usable task id: logged and dropped, nothing else.
      fake.push(format!(
        "event: task\ndata: {}\n\n",
        json!({ "taskId": index })
      ));
      fake.push("event: task\ndata: {\"taskId\n\n");
    }
  }
  let answered = |id: &str| {
    !fake.for_task(Route::Result, id).is_empty()
      || fake.payloads(id).last().map(String::as_str) == Some(DONE)
  };
  for (id, frame) in &frames {
    wait_for(&format!("an answer to {frame}"), WAIT * 4, || answered(id)).await;
  }
  // Every POST a task makes is made before its answer is complete (the result
  // POST is the last; `[DONE]` is the last payload), so once all are answered
  // the counts are final for these tasks.
  for (id, frame) in &frames {
    let results = fake.for_task(Route::Result, id);
    let payloads = fake.payloads(id);
    match (results.len(), payloads.is_empty()) {
      (1, true) => {}
      (0, false) => {
        assert_eq!(
          payloads.iter().filter(|p| p.as_str() == DONE).count(),
          1,
          "{frame}"
        );
      }
      _ => panic!(
        "{} result POSTs and {} payloads for {frame}",
        results.len(),
        payloads.len()
      ),
    }
  }
  registrar.stop().await;
}
