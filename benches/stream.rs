//! The core's per-token work for a streamed chunk, without the network or
//! JavaScript: `cargo bench --bench stream`. Each token arrives as the batch item
//! JavaScript sends for a content-only chunk, the JSON string `"tok "`. "before"
//! is the path as it was first (a `Value` for the chunk, a `json!` object per
//! payload, serde escaping the payloads into the chunk POST); "typed" is the path
//! until the item was taken as it is (the string decoded into a typed chunk, the
//! payload written ready escaped from parts made once per task, copied into the
//! POST body as it grows); "raw" is the path until the payloads shared one text
//! (the item's JSON string checked and escaped straight into its own payload
//! string, nothing decoded); "now" is the path the registrar takes (the same,
//! each payload written into one reused text, no allocation per token). Each
//! prints ns per token (best of 5) and the body bytes it made.

use std::time::{Duration, Instant};

use mcpctl_registrar::openai::{
  parse_chunk, AnswerIdentity, CompletionChunk, PayloadForm, PayloadSink, Payloads, RawContent,
  StreamEncoder, DONE,
};
use mcpctl_registrar::wire::ChunkPost;
use serde_json::{json, Value};

const TOKENS: usize = 200_000;
const BATCH: usize = 1024;

fn identity() -> AnswerIdentity {
  AnswerIdentity::new("b1-0", "bench".into())
}

fn texts() -> Vec<String> {
  (0..TOKENS).map(|_| r#""tok ""#.to_owned()).collect()
}

fn before(texts: &[String]) -> usize {
  let identity = identity();
  let mut batch = Vec::new();
  let mut bytes = 0;
  let flush = |batch: &mut Vec<String>, bytes: &mut usize| {
    let body = serde_json::to_vec(&ChunkPost {
      seq: 0,
      chunks: batch,
    })
    .unwrap();
    *bytes += body.len();
    batch.clear();
  };
  for text in texts {
    let content: String = serde_json::from_str(text).unwrap();
    let chunk = parse_chunk(json!({ "content": content })).unwrap();
    let mut delta = serde_json::Map::new();
    if let Some(content) = chunk.content {
      delta.insert("content".into(), json!(content));
    }
    let payload = json!({
      "id": identity.id,
      "object": "chat.completion.chunk",
      "created": identity.created,
      "model": identity.model,
      "choices": [{ "index": 0, "delta": Value::Object(delta), "logprobs": null, "finish_reason": null }],
    })
    .to_string();
    batch.push(payload);
    if batch.len() == BATCH {
      flush(&mut batch, &mut bytes);
    }
  }
  batch.push(DONE.to_owned());
  flush(&mut batch, &mut bytes);
  bytes
}

/// The outbox's work: the ready-escaped payloads copied into a chunk POST's body,
/// a body every BATCH payloads or at `[DONE]`; counts the bytes of the bodies.
#[derive(Default)]
struct Body {
  text: String,
  payloads: usize,
  bytes: usize,
}

impl Body {
  fn append<'a>(&mut self, payloads: impl IntoIterator<Item = &'a str>) {
    for payload in payloads {
      if self.payloads == 0 {
        self.text.clear();
        self.text.push_str(r#"{"seq":0,"chunks":["#);
      } else {
        self.text.push(',');
      }
      self.text.push('"');
      self.text.push_str(payload);
      self.text.push('"');
      self.payloads += 1;
      if self.payloads == BATCH || payload == DONE {
        self.text.push_str("]}");
        self.bytes += self.text.len();
        self.payloads = 0;
      }
    }
  }
}

fn typed(texts: &[String]) -> usize {
  let mut encoder = StreamEncoder::with_form(identity(), false, PayloadForm::JsonStringContent);
  let mut out = Vec::new();
  let mut chunks: Vec<CompletionChunk> = Vec::new();
  let mut body = Body::default();
  for run in texts.chunks(128) {
    for text in run {
      chunks.push(CompletionChunk {
        content: Some(serde_json::from_str(text).unwrap()),
        ..CompletionChunk::default()
      });
    }
    for chunk in chunks.drain(..) {
      encoder.push(chunk, &mut out);
    }
    body.append(out.iter().map(String::as_str));
    out.clear();
  }
  encoder.finish(&mut out);
  body.append(out.iter().map(String::as_str));
  body.bytes
}

/// A sink the bench can empty into a body: the payloads as strings ("raw") or in
/// one text ("now").
trait Emptied: PayloadSink + Default {
  fn empty_into(&mut self, body: &mut Body);
}

impl Emptied for Vec<String> {
  fn empty_into(&mut self, body: &mut Body) {
    body.append(self.iter().map(String::as_str));
    self.clear();
  }
}

impl Emptied for Payloads {
  fn empty_into(&mut self, body: &mut Body) {
    body.append(self.iter());
    self.clear();
  }
}

/// Each item taken as it is, its payload written into a sink of type `S`.
fn taken<S: Emptied>(texts: &[String]) -> usize {
  let mut encoder = StreamEncoder::with_form(identity(), false, PayloadForm::JsonStringContent);
  let mut out = S::default();
  let mut body = Body::default();
  for run in texts.chunks(128) {
    for text in run {
      encoder.push_content(RawContent::new(text).unwrap(), &mut out);
    }
    out.empty_into(&mut body);
  }
  encoder.finish(&mut out);
  out.empty_into(&mut body);
  body.bytes
}

fn report(name: &str, run: fn(&[String]) -> usize, texts: &[String]) {
  let mut best = Duration::MAX;
  let mut bytes = 0;
  for _ in 0..5 {
    let started = Instant::now();
    bytes = run(texts);
    best = best.min(started.elapsed());
  }
  println!(
    "{name}: {:.0} ns per token ({} body bytes)",
    best.as_nanos() as f64 / TOKENS as f64,
    bytes
  );
}

fn main() {
  let texts = texts();
  report("before", before, &texts);
  report("typed", typed, &texts);
  report("raw", taken::<Vec<String>>, &texts);
  report("now", taken::<Payloads>, &texts);
}
