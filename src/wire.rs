//! The JSON bodies that cross the wire between mcpd and the registrar
//! (docs/protocol.md sections 1-4), as serde types.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::openai::Caller;

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
  /// Paused by its owner (docs/protocol.md section 6); left out when not.
  #[serde(skip_serializing_if = "std::ops::Not::not")]
  pub paused: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest<'a> {
  pub provider_session_id: &'a str,
  pub providers: &'a [ProviderLoad],
}

/// A `task` event's data. `body` stays raw text: parsing it is the
/// dispatcher's job, so that a body that cannot be parsed (too deep, wrong
/// shape) is answered 400 with its task id rather than dropped.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEvent {
  pub task_id: String,
  #[serde(default)]
  pub provider: Option<String>,
  #[serde(default)]
  pub stream: Option<bool>,
  #[serde(default)]
  pub body: Option<Box<RawValue>>,
  /// Who asked mcpd (docs/protocol.md section 6); kept raw so that a malformed one
  /// is dropped by [`parse_caller`] instead of failing the frame.
  #[serde(default)]
  pub caller: Option<Box<RawValue>>,
  /// mcpd's W3C trace context (docs/protocol.md section 5); kept raw so that a
  /// malformed one is dropped by [`crate::trace::TraceContext::from_frame`].
  #[serde(default)]
  pub traceparent: Option<Box<RawValue>>,
  #[serde(default)]
  pub tracestate: Option<Box<RawValue>>,
}

/// Only the `taskId` of a task event, for a frame that does not parse as a whole.
#[derive(Deserialize)]
struct TaskIdOnly {
  #[serde(rename = "taskId")]
  task_id: String,
}

/// A `task` frame that does not parse; `task_id` when it can still be read.
#[derive(Debug)]
pub struct MalformedTask {
  pub task_id: Option<String>,
  pub error: String,
}

/// Parses a `task` frame. Never recurses on nesting outside `body`'s own
/// parse (serde_json skips raw values and ignored fields iteratively, and its
/// recursion limit of 128 bounds everything else), so a frame nested 10,000
/// deep costs no stack.
pub fn parse_task(data: &str) -> Result<TaskEvent, MalformedTask> {
  serde_json::from_str::<TaskEvent>(data).map_err(|error| MalformedTask {
    task_id: serde_json::from_str::<TaskIdOnly>(data)
      .ok()
      .map(|only| only.task_id),
    error: error.to_string(),
  })
}

/// The most bytes of a caller's `id`, `name` and each group (docs/protocol.md section 6).
pub const MAX_CALLER_BYTES: usize = 256;
/// The most groups a caller may list.
pub const MAX_CALLER_GROUPS: usize = 64;

/// A task frame's `caller`, checked as docs/protocol.md section 6 says: `id` a
/// non-empty string of at most 256 bytes; `name` (at most 256 bytes) and `groups`
/// (at most 64 strings of at most 256 bytes) optional (`null` is absent); other keys
/// ignored. Anything else is malformed: the error says why, and the task runs
/// as if it carried no caller.
pub fn parse_caller(raw: &RawValue) -> Result<Caller, &'static str> {
  #[derive(Deserialize)]
  struct Loose<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    name: Option<&'a RawValue>,
    #[serde(default, borrow)]
    groups: Option<&'a RawValue>,
  }
  let loose: Loose = serde_json::from_str(raw.get()).map_err(|_| "the caller is not an object")?;
  let text = |raw: Option<&RawValue>, what: &'static str| -> Result<Option<String>, &'static str> {
    match raw.map(|raw| serde_json::from_str::<Option<String>>(raw.get())) {
      None | Some(Ok(None)) => Ok(None),
      Some(Ok(Some(text))) if text.len() <= MAX_CALLER_BYTES => Ok(Some(text)),
      Some(Ok(Some(_))) => Err(what),
      Some(Err(_)) => Err(what),
    }
  };
  let id = text(
    loose.id,
    "the caller's id is not a string of at most 256 bytes",
  )?
  .filter(|id| !id.is_empty())
  .ok_or("the caller has no id")?;
  let name = text(
    loose.name,
    "the caller's name is not a string of at most 256 bytes",
  )?;
  let groups = match loose
    .groups
    .map(|raw| serde_json::from_str::<Option<Vec<String>>>(raw.get()))
  {
    None | Some(Ok(None)) => None,
    Some(Ok(Some(groups)))
      if groups.len() <= MAX_CALLER_GROUPS
        && groups.iter().all(|group| group.len() <= MAX_CALLER_BYTES) =>
    {
      Some(groups)
    }
    Some(_) => return Err("the caller's groups are not at most 64 strings of at most 256 bytes"),
  };
  Ok(Caller { id, name, groups })
}

/// The longest task id accepted, in bytes (docs/protocol.md section 4).
pub const MAX_TASK_ID_BYTES: usize = 256;

/// Why a task id is refused: empty, a dot segment, or over 256 bytes
/// (docs/protocol.md section 4). Valid UTF-8 is guaranteed by `str`.
pub fn refuse_task_id(task_id: &str) -> Option<&'static str> {
  match task_id {
    "" => Some("the task id is empty"),
    "." | ".." => Some("the task id is a dot segment"),
    id if id.len() > MAX_TASK_ID_BYTES => Some("the task id is over 256 bytes"),
    _ => None,
  }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelEvent {
  pub task_id: String,
}

/// A result POST's body; `body` is any serializable answer (a typed
/// `chat.completion`, an error's `Value`).
#[derive(Serialize)]
pub struct ResultPost<'a, B: ?Sized = Value> {
  pub status: u16,
  pub body: &'a B,
  /// Response headers for mcpd to relay (`retry-after`); left out when none.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub headers: Option<&'a Value>,
}

#[derive(Serialize)]
pub struct ChunkPost<'a> {
  pub seq: u64,
  pub chunks: &'a [String],
}

impl ChunkPost<'_> {
  /// The body as JSON text, the bytes serde_json writes for it, built in one
  /// pass into one buffer (each payload is JSON text escaped as a JSON string).
  pub fn to_json(&self) -> String {
    let escaped: usize = self.chunks.iter().map(|chunk| chunk.len() + 2).sum();
    let mut body = String::with_capacity(32 + escaped + escaped / 4);
    body.push_str(r#"{"seq":"#);
    body.push_str(&self.seq.to_string());
    body.push_str(r#","chunks":["#);
    for (index, chunk) in self.chunks.iter().enumerate() {
      if index > 0 {
        body.push(',');
      }
      write_json_str(&mut body, chunk);
    }
    body.push_str("]}");
    body
  }
}

/// Appends `text` as a JSON string, quotes included, escaped exactly as
/// serde_json escapes it (`\"`, `\\`, the short forms `\b \t \n \f \r`, other
/// control characters as `\u00xx`; everything else as it is).
pub fn write_json_str(out: &mut String, text: &str) {
  out.push('"');
  write_json_str_content(out, text);
  out.push('"');
}

/// What [`write_json_str`] writes between the quotes.
pub fn write_json_str_content(out: &mut String, text: &str) {
  const HEX: &[u8; 16] = b"0123456789abcdef";
  let bytes = text.as_bytes();
  let mut run = 0;
  for (at, &byte) in bytes.iter().enumerate() {
    let short = match byte {
      b'"' => "\\\"",
      b'\\' => "\\\\",
      b'\n' => "\\n",
      b'\r' => "\\r",
      b'\t' => "\\t",
      0x08 => "\\b",
      0x0c => "\\f",
      0x00..=0x1f => "",
      _ => continue,
    };
    // Every byte escaped is ASCII, so `run..at` lies on char boundaries.
    out.push_str(&text[run..at]);
    if short.is_empty() {
      out.push_str("\\u00");
      out.push(char::from(HEX[usize::from(byte >> 4)]));
      out.push(char::from(HEX[usize::from(byte & 0xf)]));
    } else {
      out.push_str(short);
    }
    run = at + 1;
  }
  out.push_str(&text[run..]);
}

/// The characters `json` stands for, when it is a JSON string (quotes
/// included, already known to be valid JSON) written exactly as
/// [`write_json_str`] writes its value: every escape one that it writes (`\"`,
/// `\\`, the short forms, `\u00xx` in lower case for the other control
/// characters), nothing else escaped. `JSON.stringify` writes strings so, but
/// for a lone surrogate. `None` for any other text: `\/`, `\u0041`, upper-case
/// hex, a surrogate escape, a non-string.
pub fn written_json_str_chars(json: &str) -> Option<u64> {
  let inner = json.strip_prefix('"')?.strip_suffix('"')?;
  let bytes = inner.as_bytes();
  // A char per byte that does not continue a UTF-8 sequence, less what the
  // escapes take beyond their one character.
  let mut chars = bytes.iter().filter(|&&byte| byte & 0xc0 != 0x80).count() as u64;
  let mut at = 0;
  while let Some(found) = bytes[at..].iter().position(|&byte| byte == b'\\') {
    let escape = at + found;
    let taken: usize = match bytes.get(escape + 1)? {
      b'"' | b'\\' | b'n' | b'r' | b't' | b'b' | b'f' => 2,
      b'u' => {
        let digits = bytes.get(escape + 2..escape + 6)?;
        let lower_hex = |byte: &u8| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte);
        if digits[..2] != *b"00" || !digits.iter().all(lower_hex) {
          return None;
        }
        let unit = u8::from_str_radix(std::str::from_utf8(&digits[2..]).ok()?, 16).ok()?;
        if unit >= 0x20 || matches!(unit, b'\n' | b'\r' | b'\t' | 0x08 | 0x0c) {
          return None;
        }
        6
      }
      _ => return None,
    };
    chars -= (taken - 1) as u64;
    at = escape + taken;
  }
  Some(chars)
}

/// `text` (JSON) with every `\u` escape of a lone UTF-16 surrogate replaced by
/// `\ufffd`; `None` when it has none. A JavaScript string may hold a lone
/// surrogate, and `JSON.stringify` writes it as such an escape, which no JSON
/// parser turns into a Rust string (serde_json refuses it): this is
/// `String.prototype.toWellFormed()` done on the JSON text, run only after a
/// parse failed. Escapes are found by scanning backslashes, so `\\ud800` (an
/// escaped backslash and then text) is left alone.
pub fn replace_lone_surrogates(text: &str) -> Option<String> {
  let bytes = text.as_bytes();
  let unit_at = |at: usize| -> Option<u16> {
    if bytes.get(at) != Some(&b'\\') || bytes.get(at + 1) != Some(&b'u') {
      return None;
    }
    let digits = text.get(at + 2..at + 6)?;
    if !digits.bytes().all(|byte| byte.is_ascii_hexdigit()) {
      return None;
    }
    u16::from_str_radix(digits, 16).ok()
  };
  let mut out = String::new();
  let mut copied = 0;
  let mut at = 0;
  while at < bytes.len() {
    if bytes[at] != b'\\' {
      at += 1;
      continue;
    }
    let lone = match unit_at(at) {
      None => {
        // Another escape (`\"`, `\\`...): its second byte is never the start of one.
        at += 2;
        continue;
      }
      Some(0xD800..=0xDBFF) if matches!(unit_at(at + 6), Some(0xDC00..=0xDFFF)) => {
        at += 12;
        continue;
      }
      Some(unit) => (0xD800..=0xDFFF).contains(&unit),
    };
    if lone {
      // `at` is a backslash, so a char boundary.
      out.push_str(&text[copied..at]);
      out.push_str("\\ufffd");
      copied = at + 6;
    }
    at += 6;
  }
  if copied == 0 {
    return None;
  }
  out.push_str(&text[copied..]);
  Some(out)
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn json_strings_are_escaped_as_serde_json_escapes_them() {
    let mut every_ascii = String::new();
    for byte in 0u8..0x80 {
      every_ascii.push(char::from(byte));
    }
    for text in [
      "",
      "tok ",
      every_ascii.as_str(),
      "é ü 雪 🦀 \u{2028}\u{2029}",
      "\"\\\"\\",
      "end\u{1f}",
      "\u{7f}\u{0}x",
      "\\u0041",
    ] {
      let mut ours = String::new();
      write_json_str(&mut ours, text);
      assert_eq!(ours, serde_json::to_string(text).unwrap(), "{text:?}");
      // What it writes is taken back as written, with its count of chars.
      assert_eq!(
        written_json_str_chars(&ours),
        Some(text.chars().count() as u64),
        "{ours}"
      );
    }
  }

  #[test]
  fn a_json_string_written_otherwise_and_any_other_json_give_none() {
    // Valid JSON strings of the same text, written otherwise, and non-strings.
    for other in [
      r#""\/""#,
      r#""\u0041""#,
      r#""\u001F""#,
      r#""\u000a""#,
      r#""\u0009""#,
      r#""\u007f""#,
      r#""\ud800""#,
      r#""\ud83e\udd80""#,
      r#""a\u00e9""#,
      "1",
      "{}",
      "null",
      r#"["a"]"#,
    ] {
      assert_eq!(written_json_str_chars(other), None, "{other}");
    }
  }

  /// A JSON string as a JSON writer may spell it: each piece a character
  /// either as it is or escaped in one of the ways JSON allows.
  fn spelled_json_string() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let piece = prop_oneof![
      any::<char>()
        .prop_filter("unescaped", |c| *c >= ' ' && *c != '"' && *c != '\\')
        .prop_map(String::from),
      prop::sample::select(vec![
        r#"\""#, r#"\\"#, r#"\/"#, r#"\n"#, r#"\r"#, r#"\t"#, r#"\b"#, r#"\f"#,
      ])
      .prop_map(str::to_owned),
      (0u32..0x80, any::<bool>()).prop_map(|(unit, upper)| if upper {
        format!("\\u{unit:04X}")
      } else {
        format!("\\u{unit:04x}")
      }),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
  }

  proptest::proptest! {
    #![proptest_config(crate::proptest_config(3000))]

    /// Every string as written is taken, with its count of chars; a spelling is
    /// taken only when it is exactly that writing.
    #[test]
    fn only_the_written_spelling_is_taken(text in ".*", spelled in spelled_json_string()) {
      let mut written = String::new();
      write_json_str(&mut written, &text);
      proptest::prop_assert_eq!(
        written_json_str_chars(&written),
        Some(text.chars().count() as u64)
      );
      let decoded: String = serde_json::from_str(&spelled).unwrap();
      let mut canonical = String::new();
      write_json_str(&mut canonical, &decoded);
      let taken = written_json_str_chars(&spelled);
      if spelled == canonical {
        proptest::prop_assert_eq!(taken, Some(decoded.chars().count() as u64));
      } else {
        proptest::prop_assert_eq!(taken, None, "{} is written {}", spelled, canonical);
      }
    }
  }

  #[test]
  fn chunk_post_body_is_byte_for_byte_serde_json() {
    let chunks: Vec<String> = vec![
      r#"{"choices":[{"delta":{"content":"a \"q\" \\ \n é"},"finish_reason":null}]}"#.into(),
      "[DONE]".into(),
    ];
    for (seq, chunks) in [(0, &chunks[..]), (u64::MAX, &chunks[..1]), (7, &[][..])] {
      let post = ChunkPost { seq, chunks };
      assert_eq!(post.to_json(), serde_json::to_string(&post).unwrap());
    }
  }

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
    let event = parse_task(
      r#"{"taskId":"t-1","provider":"p","stream":true,"body":{"messages":[]},"extra":1}"#,
    )
    .unwrap();
    assert_eq!(event.task_id, "t-1");
    assert_eq!(event.stream, Some(true));
    assert_eq!(event.body.unwrap().get(), r#"{"messages":[]}"#);
  }

  #[test]
  fn a_frame_nested_10000_deep_parses_without_recursion() {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let frame = format!(r#"{{"taskId":"t-deep","provider":"p","body":{deep}}}"#);
    let event = parse_task(&frame).expect("the frame parses; the body stays raw");
    assert_eq!(event.task_id, "t-deep");
    let body = event.body.unwrap();
    assert!(
      serde_json::from_str::<Value>(body.get()).is_err(),
      "too deep for a Value"
    );
    // Deep nesting in another field: the frame is malformed, its id still read.
    let frame = format!(r#"{{"stream":{deep},"taskId":"t-x"}}"#);
    let malformed = parse_task(&frame).unwrap_err();
    assert_eq!(malformed.task_id.as_deref(), Some("t-x"));
    let malformed = parse_task(&format!(r#"{{"taskId":{deep}}}"#)).unwrap_err();
    assert_eq!(malformed.task_id, None);
    assert_eq!(parse_task("not json").unwrap_err().task_id, None);
  }

  #[test]
  fn callers_are_read_as_the_protocol_says_and_malformed_ones_dropped() {
    let caller = |text: &str| {
      let frame = format!(r#"{{"taskId":"t","caller":{text}}}"#);
      let event = parse_task(&frame).expect("a caller never fails the frame");
      event.caller.as_deref().map(parse_caller)
    };
    let full =
      caller(r#"{"id":"u-42","name":"alice@example.com","groups":["ml-team"],"role":"x"}"#);
    assert_eq!(
      full,
      Some(Ok(Caller {
        id: "u-42".into(),
        name: Some("alice@example.com".into()),
        groups: Some(vec!["ml-team".into()]),
      }))
    );
    assert_eq!(caller("null"), None);
    let bare = caller(r#"{"id":"u","name":null,"groups":null}"#)
      .unwrap()
      .unwrap();
    assert_eq!((bare.name, bare.groups), (None, None));
    let edge = "é".repeat(128);
    assert!(caller(&format!(r#"{{"id":"{edge}","name":"{edge}"}}"#))
      .unwrap()
      .is_ok());
    let groups: Vec<String> = (0..64).map(|n| format!("\"g{n}\"")).collect();
    assert!(
      caller(&format!(r#"{{"id":"u","groups":[{}]}}"#, groups.join(",")))
        .unwrap()
        .is_ok()
    );
    let too_many: Vec<String> = (0..65).map(|n| format!("\"g{n}\"")).collect();
    for malformed in [
      "1".to_owned(),
      r#""u-1""#.to_owned(),
      r#"{}"#.to_owned(),
      r#"{"id":""}"#.to_owned(),
      r#"{"id":7}"#.to_owned(),
      format!(r#"{{"id":"{edge}a"}}"#),
      format!(r#"{{"id":"u","name":"{edge}a"}}"#),
      r#"{"id":"u","name":5}"#.to_owned(),
      r#"{"id":"u","groups":"ml"}"#.to_owned(),
      r#"{"id":"u","groups":[1]}"#.to_owned(),
      format!(r#"{{"id":"u","groups":["{edge}a"]}}"#),
      format!(r#"{{"id":"u","groups":[{}]}}"#, too_many.join(",")),
    ] {
      assert!(caller(&malformed).unwrap().is_err(), "{malformed}");
    }
  }

  #[test]
  fn task_ids_are_refused_as_the_protocol_says() {
    assert!(refuse_task_id("").is_some());
    assert!(refuse_task_id(".").is_some());
    assert!(refuse_task_id("..").is_some());
    assert!(refuse_task_id(&"a".repeat(257)).is_some());
    // 256 bytes of multi-byte characters: at the edge, accepted.
    assert!(refuse_task_id(&"é".repeat(128)).is_none());
    assert!(refuse_task_id(&format!("{}a", "é".repeat(128))).is_some());
    for fine in ["...", "a/b", "%2e", "t\r\n", "ü", "t-1"] {
      assert!(refuse_task_id(fine).is_none(), "{fine}");
    }
  }
}
