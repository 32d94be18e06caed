//! W3C Trace Context (level 1) as mcpd sends it in a task frame (docs/protocol.md
//! section 5), and what one task carries of it: mcpd's context as received, and the
//! registrar's own span once the JavaScript side records one.
//!
//! Parsed by hand: the rules are a few lines of the W3C text, and the standard
//! crate for them (`opentelemetry`'s `TraceContextPropagator`) would bring the
//! whole OpenTelemetry SDK into an addon that records its spans in JavaScript.

use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use reqwest::header::HeaderValue;
use serde::Serialize;
use serde_json::value::RawValue;

/// The most bytes of a `tracestate` accepted (docs/protocol.md section 5).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// The most list-members of a `tracestate` (W3C Trace Context level 1, 3.3.1.1).
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// `00-` + 32 + `-` + 16 + `-` + 2.
const TRACEPARENT_LEN: usize = 55;

/// A valid W3C `traceparent`, with its `tracestate` when that was valid too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
  /// Always version 00: a higher version is restated as the four fields read from it.
  traceparent: String,
  tracestate: Option<String>,
}

fn is_lower_hex(text: &str) -> bool {
  text
    .bytes()
    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
  /// Parses a `traceparent` as W3C Trace Context level 1 says: lower-case hex
  /// only; version `ff` invalid; version 00 exactly 55 characters; a higher
  /// version read by its first four fields (what follows must start with `-`);
  /// trace id and parent id not all zero. A `tracestate` that is not valid (over
  /// 512 bytes, over 32 members, not visible ASCII) is dropped, the traceparent kept.
  pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, &'static str> {
    // Checked first so that the slicing below stays on character boundaries.
    if !traceparent.is_ascii() {
      return Err("the traceparent is not ASCII");
    }
    let bytes = traceparent.as_bytes();
    if bytes.len() < TRACEPARENT_LEN {
      return Err("the traceparent is too short");
    }
    let version = &traceparent[..2];
    if !is_lower_hex(version) {
      return Err("the traceparent's version is not two lower-case hex digits");
    }
    if version == "ff" {
      return Err("the traceparent's version ff is invalid");
    }
    if version == "00" && bytes.len() != TRACEPARENT_LEN {
      return Err("a version 00 traceparent is not 55 characters");
    }
    if bytes.len() > TRACEPARENT_LEN && bytes[TRACEPARENT_LEN] != b'-' {
      return Err("the traceparent's fields are not separated by '-'");
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
      return Err("the traceparent's fields are not separated by '-'");
    }
    let (trace_id, parent_id, flags) = (
      &traceparent[3..35],
      &traceparent[36..52],
      &traceparent[53..55],
    );
    if !(is_lower_hex(trace_id) && is_lower_hex(parent_id) && is_lower_hex(flags)) {
      return Err("the traceparent is not lower-case hex");
    }
    if trace_id.bytes().all(|b| b == b'0') {
      return Err("the traceparent's trace id is all zero");
    }
    if parent_id.bytes().all(|b| b == b'0') {
      return Err("the traceparent's parent id is all zero");
    }
    let tracestate = tracestate.filter(|state| valid_tracestate(state));
    Ok(Self {
      traceparent: format!("00-{trace_id}-{parent_id}-{flags}"),
      tracestate: tracestate.map(str::to_owned),
    })
  }

  /// A task frame's two optional fields, kept raw there so that a value of the
  /// wrong type drops the context instead of failing the frame. `Ok(None)` when
  /// mcpd sent none; an error says why it is ignored.
  pub fn from_frame(
    traceparent: Option<&RawValue>,
    tracestate: Option<&RawValue>,
  ) -> Result<Option<Self>, &'static str> {
    let text =
      |raw: Option<&RawValue>| raw.map(|raw| serde_json::from_str::<Option<String>>(raw.get()));
    let traceparent = match text(traceparent) {
      None | Some(Ok(None)) => return Ok(None),
      Some(Ok(Some(traceparent))) => traceparent,
      Some(Err(_)) => return Err("the traceparent is not a string"),
    };
    let tracestate = match text(tracestate) {
      Some(Ok(state)) => state,
      // A tracestate of the wrong type is dropped on its own, like an invalid one.
      None | Some(Err(_)) => None,
    };
    Self::parse(&traceparent, tracestate.as_deref()).map(Some)
  }

  /// The `traceparent` header value (version 00).
  pub fn traceparent(&self) -> &str {
    &self.traceparent
  }

  /// The `tracestate`, when mcpd sent a valid one.
  pub fn tracestate(&self) -> Option<&str> {
    self.tracestate.as_deref()
  }

  /// The trace id: 32 lower-case hex digits.
  pub fn trace_id(&self) -> &str {
    &self.traceparent[3..35]
  }

  /// The id of the span this context names: 16 lower-case hex digits.
  pub fn parent_id(&self) -> &str {
    &self.traceparent[36..52]
  }
}

/// At most 512 bytes, at most 32 list-members (empty ones, and spaces and tabs
/// around members, allowed), each a valid `key=value` (W3C Trace Context level 1,
/// 3.3.1), no key twice. Anything else drops the whole tracestate, as the spec says.
fn valid_tracestate(state: &str) -> bool {
  if state.is_empty() || state.len() > MAX_TRACESTATE_BYTES {
    return false;
  }
  let members: Vec<&str> = state
    .split(',')
    .map(|member| member.trim_matches([' ', '\t']))
    .filter(|member| !member.is_empty())
    .collect();
  if members.is_empty() || members.len() > MAX_TRACESTATE_MEMBERS {
    return false;
  }
  let mut keys = Vec::with_capacity(members.len());
  for member in members {
    let Some((key, value)) = member.split_once('=') else {
      return false;
    };
    if !(valid_tracestate_key(key) && valid_tracestate_value(value)) || keys.contains(&key) {
      return false;
    }
    keys.push(key);
  }
  true
}

/// `simple-key` (lcalpha, then up to 255 of lcalpha, digits, `_-*/`), or
/// `tenant@system` (tenant: lcalpha or digit, then up to 240; system: lcalpha,
/// then up to 13).
fn valid_tracestate_key(key: &str) -> bool {
  let part = |text: &str, first_digit: bool, most: usize| match text.as_bytes().split_first() {
    Some((first, rest)) => {
      (first.is_ascii_lowercase() || (first_digit && first.is_ascii_digit()))
        && rest.len() <= most
        && rest
          .iter()
          .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/".contains(b))
    }
    None => false,
  };
  match key.split_once('@') {
    None => part(key, false, 255),
    Some((tenant, system)) => part(tenant, true, 240) && part(system, false, 13),
  }
}

/// Up to 256 printable ASCII characters but `,` and `=`, not ending in a space.
fn valid_tracestate_value(value: &str) -> bool {
  !value.is_empty()
    && value.len() <= 256
    && !value.ends_with(' ')
    && value
      .bytes()
      .all(|b| (b' '..=b'~').contains(&b) && b != b',' && b != b'=')
}

/// How a task whose span was recorded ended, for the span's last attributes
/// (camelCase JSON, read by src/binding/spans.js).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpanEnd {
  /// `error.type`: the OpenAI error type the task was answered with
  /// (`provider_error`, `timeout`, `unavailable`), `cancelled` for mcpd's
  /// cancel, `_OTHER` when its answer could not be delivered; none when it completed.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub error_type: Option<&'static str>,
  /// `gen_ai.response.model`: the model the answer names.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub response_model: Option<String>,
  /// `gen_ai.response.finish_reasons`: the answer's one choice's reason.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub finish_reason: Option<&'static str>,
  /// `gen_ai.usage.input_tokens` / `output_tokens`, as the provider reported them.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub input_tokens: Option<u64>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub output_tokens: Option<u64>,
}

/// The registrar's span for a task, as the JavaScript side recorded it.
#[derive(Debug)]
struct RecordedSpan {
  context: TraceContext,
  header: HeaderValue,
}

/// Where a task's span stands. Recording (JavaScript thread) and the task's end
/// (a runtime thread) can come in either order: the lock makes one of them see
/// the other, so a span recorded after its task ended is ended at once.
#[derive(Debug, Default)]
struct SpanSlot {
  recorded: Option<RecordedSpan>,
  ended: Option<SpanEnd>,
}

/// What recording a span answers the JavaScript side.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
  /// The task's POSTs now carry it; [`TaskTrace::end`] will say how it ended.
  Live,
  /// The task had already ended: end the span now, so.
  AlreadyEnded(SpanEnd),
  /// Not a valid traceparent, or a second span for the task: ignored.
  Refused,
}

/// What one task carries of tracing: mcpd's context as received, and the
/// registrar's span once recorded (from the provider bridge, before the
/// provider is called). Shared by the task and its provider call.
#[derive(Debug, Default)]
pub struct TaskTrace {
  /// When the task reached the registrar: the span starts there, so it shows
  /// the time spent queued.
  arrived: Option<SystemTime>,
  received: Option<TraceContext>,
  received_header: Option<HeaderValue>,
  span: Mutex<SpanSlot>,
}

impl TaskTrace {
  pub fn new(received: Option<TraceContext>) -> Self {
    let received_header = received
      .as_ref()
      .and_then(|context| HeaderValue::from_str(context.traceparent()).ok());
    Self {
      arrived: Some(SystemTime::now()),
      received,
      received_header,
      span: Mutex::default(),
    }
  }

  /// When the task reached the registrar, in milliseconds since the Unix
  /// epoch (what OpenTelemetry's JavaScript API takes as a start time).
  pub fn arrived_ms(&self) -> Option<f64> {
    let since = self.arrived?.duration_since(UNIX_EPOCH).ok()?;
    Some(since.as_secs_f64() * 1000.0)
  }

  /// mcpd's context as received (valid), if it sent one.
  pub fn received(&self) -> Option<&TraceContext> {
    self.received.as_ref()
  }

  /// Records the registrar's span for this task (its `traceparent`, as the
  /// JavaScript side formatted it).
  pub fn record_span(&self, traceparent: &str, tracestate: Option<&str>) -> Recorded {
    let Ok(context) = TraceContext::parse(traceparent, tracestate) else {
      return Recorded::Refused;
    };
    let Ok(header) = HeaderValue::from_str(context.traceparent()) else {
      return Recorded::Refused;
    };
    let mut slot = self.span.lock();
    if slot.recorded.is_some() {
      return Recorded::Refused;
    }
    slot.recorded = Some(RecordedSpan { context, header });
    match &slot.ended {
      Some(end) => Recorded::AlreadyEnded(end.clone()),
      None => Recorded::Live,
    }
  }

  /// The registrar's span's context, once recorded.
  pub fn span(&self) -> Option<TraceContext> {
    self
      .span
      .lock()
      .recorded
      .as_ref()
      .map(|span| span.context.clone())
  }

  /// The task ended. Answers `Some(end)` when a span was recorded, to be
  /// ended with it; `end` is only built then (a task without a span pays for
  /// nothing). Otherwise remembers `early` for a span recorded later.
  pub fn end(&self, early: SpanEnd, end: impl FnOnce() -> SpanEnd) -> Option<SpanEnd> {
    let mut slot = self.span.lock();
    if slot.ended.is_some() {
      return None;
    }
    if slot.recorded.is_some() {
      let end = end();
      slot.ended = Some(end.clone());
      Some(end)
    } else {
      slot.ended = Some(early);
      None
    }
  }

  /// The `traceparent` header of the task's result and chunk POSTs: the
  /// registrar's span when one is recorded, else mcpd's as received, else none.
  pub fn header(&self) -> Option<HeaderValue> {
    if let Some(span) = &self.span.lock().recorded {
      return Some(span.header.clone());
    }
    self.received_header.clone()
  }

  /// The W3C trace id of mcpd's traceparent, when it sent a valid one (the
  /// per-task record's `trace_id`; the registrar's span, when recorded, is in
  /// the same trace).
  pub fn trace_id(&self) -> Option<&str> {
    self.received.as_ref().map(TraceContext::trace_id)
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

  #[test]
  fn a_valid_traceparent_is_read() {
    let context = TraceContext::parse(VALID, Some("vendor=value")).unwrap();
    assert_eq!(context.traceparent(), VALID);
    assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(context.parent_id(), "00f067aa0ba902b7");
    assert_eq!(context.tracestate(), Some("vendor=value"));
  }

  #[test]
  fn malformed_traceparents_are_refused() {
    let cases = [
      ("", "empty"),
      (&VALID[..54], "short"),
      (
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "version ff",
      ),
      (
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "upper-case trace id",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
        "upper-case parent id",
      ),
      (
        "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "upper-case version",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0F",
        "upper-case flags",
      ),
      (
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "zero trace id",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "zero parent id",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "version 00 too long",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "version 00 too long",
      ),
      (
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "separator",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
        "separator",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "not hex",
      ),
      (
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "higher version, no dash",
      ),
      (
        "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "not ascii",
      ),
      (
        "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "not ascii, mid-character",
      ),
      (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
        "not ascii at the end",
      ),
    ];
    for (traceparent, why) in cases {
      assert!(
        TraceContext::parse(traceparent, None).is_err(),
        "{why}: {traceparent}"
      );
    }
  }

  #[test]
  fn a_higher_version_is_read_by_its_first_four_fields() {
    let higher = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
    let context = TraceContext::parse(higher, None).unwrap();
    assert_eq!(context.traceparent(), VALID);
    let exact = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(
      TraceContext::parse(exact, None).unwrap().traceparent(),
      VALID
    );
  }

  #[test]
  fn tracestate_over_512_bytes_or_malformed_is_dropped_alone() {
    // At 512 bytes: two members, each value at most 256 characters.
    let at_limit = format!("a={},b={}", "v".repeat(254), "v".repeat(253));
    let over = format!("a={},b={}", "v".repeat(254), "v".repeat(254));
    assert_eq!(at_limit.len(), MAX_TRACESTATE_BYTES);
    let many = (0..33)
      .map(|i| format!("k{i}=v"))
      .collect::<Vec<_>>()
      .join(",");
    let long_value = format!("k={}", "v".repeat(257));
    let parse = |state: &str| TraceContext::parse(VALID, Some(state)).unwrap();
    let valid = [
      at_limit.as_str(),
      "a=1, b=2",
      "a=1,,b=2",
      "t3n@sys=x y",
      "k_-*/9=v!",
      "0tenant@s=1",
      "t@s234567890abcd=1",
    ];
    for good in valid {
      assert_eq!(parse(good).tracestate(), Some(good), "{good:?}");
    }
    let invalid = [
      over.as_str(),
      many.as_str(),
      long_value.as_str(),
      "",
      "novalue",
      "a=1\n",
      "=x",
      "ä=1",
      "A=1",
      "1a=1",
      "a=1,a=2",
      "a=x=y",
      "a=x\ty",
      "@sys=1",
      "t@Sys=1",
      "t@s234567890abcde=1",
    ];
    for bad in invalid {
      let context = parse(bad);
      assert_eq!(context.tracestate(), None, "{bad:?}");
      assert_eq!(context.traceparent(), VALID);
    }
  }

  #[test]
  fn frame_fields_of_the_wrong_type_are_ignored() {
    let raw = |text: &str| RawValue::from_string(text.to_owned()).unwrap();
    assert_eq!(TraceContext::from_frame(None, None), Ok(None));
    assert_eq!(TraceContext::from_frame(Some(&raw("null")), None), Ok(None));
    assert!(TraceContext::from_frame(Some(&raw("42")), None).is_err());
    let parent = raw(&format!("\"{VALID}\""));
    let context = TraceContext::from_frame(Some(&parent), Some(&raw("[1]")))
      .unwrap()
      .unwrap();
    assert_eq!((context.traceparent(), context.tracestate()), (VALID, None));
  }

  #[test]
  fn the_header_is_the_span_then_mcpds_then_none() {
    assert!(TaskTrace::new(None).header().is_none());
    assert_eq!(TaskTrace::new(None).trace_id(), None);
    let trace = TaskTrace::new(Some(TraceContext::parse(VALID, None).unwrap()));
    assert_eq!(trace.header().unwrap(), VALID);
    assert_eq!(trace.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    let span = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
    assert_eq!(trace.record_span("00-garbage", None), Recorded::Refused);
    assert_eq!(trace.record_span(span, None), Recorded::Live);
    assert_eq!(
      trace.record_span(VALID, None),
      Recorded::Refused,
      "recorded once"
    );
    assert_eq!(trace.header().unwrap(), span);
    assert_eq!(trace.span().unwrap().parent_id(), "1111111111111111");
  }

  #[test]
  fn a_span_ends_once_whichever_of_record_and_end_comes_first() {
    let span = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
    let done = || SpanEnd {
      response_model: Some("m".into()),
      ..SpanEnd::default()
    };
    let early = || SpanEnd {
      error_type: Some("cancelled"),
      ..SpanEnd::default()
    };
    // Recorded first: the end is built and handed on, once.
    let trace = TaskTrace::default();
    assert_eq!(trace.record_span(span, None), Recorded::Live);
    assert_eq!(trace.end(early(), done), Some(done()));
    assert_eq!(trace.end(early(), done), None);
    // Ended first: nothing is built; the late span is told how the task ended.
    let trace = TaskTrace::default();
    assert_eq!(
      trace.end(early(), || unreachable!("no span, no end to build")),
      None
    );
    assert_eq!(
      trace.record_span(span, None),
      Recorded::AlreadyEnded(early())
    );
  }
}
