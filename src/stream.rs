//! A provider's stream, from whoever produces its chunks to the task that
//! relays them: the producer pushes batches of chunk JSON texts into a
//! [`StreamWindow`] with plain synchronous calls, and the task reads them,
//! typed, in runs through a [`ChunkReader`].
//!
//! A credit window, in chunks and bytes, bounds what waits here: credit goes
//! back as the reader takes chunks, and a producer that used it all is woken
//! once, when half the window is free again. Nothing here knows napi: the
//! JavaScript loop (binding/provider_bridge.js) is one producer, a Rust
//! [`ChunkWriter`] another, and waking the producer is a callback.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::Notify;

use crate::openai::{parse_chunk, CompletionChunk, RawContent};
use crate::provider::ProviderFailure;

/// How much may wait between a stream's producer and its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
  /// Chunks pushed and not yet read.
  pub chunks: u32,
  /// Bytes of chunk JSON pushed and not yet read.
  pub bytes: usize,
}

/// 2,048 chunks or 1 MiB of chunk JSON, whichever fills first: the bytes bound
/// memory; the count is high enough that a full window of short tokens costs
/// the JavaScript loop one wake-up per 1,024 chunks, not per 256.
pub const WINDOW: Window = Window {
  chunks: 2048,
  bytes: 1024 * 1024,
};

/// The most chunk JSON the JavaScript loop gathers before it pushes, whatever
/// credit remains (provider_bridge.js reads it): a push may overshoot the
/// byte credit by at most this plus one chunk.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// How many chunks the reader takes before it gives their credit back.
const GIVE_BACK_EVERY: u32 = 64;

/// The most chunks one [`ChunkReader::next_chunks`] hands over: the relay gets
/// payloads in runs of this many at most, however large the push was.
const CHUNKS_PER_RUN: usize = 128;

/// What [`StreamWindow::push`] answers the producer: chunks it may push before
/// it must wait (0: wait for the wake-up), or [`CLOSED`].
pub type Credit = i64;

/// Nobody reads the stream any more: the producer should stop.
pub const CLOSED: Credit = -1;

/// Wakes a producer that waits for credit, with its new credit (or [`CLOSED`]).
pub type WakeProducer = Arc<dyn Fn(Credit) + Send + Sync>;

/// The chunks pushed in one call: a JSON array, one item per chunk, each a
/// `CompletionChunk` object or a string (a chunk with only `content`, which
/// provider_bridge.js sends so: one `JSON.stringify` a batch, not one a chunk).
#[derive(Debug)]
struct Batch {
  text: String,
  at: usize,
}

impl Batch {
  /// The next item's JSON text, and the bytes of the batch it accounts for:
  /// its separator before it, and the closing `]` after the last one, so the
  /// items of a batch account for exactly its length (the window's byte credit
  /// comes back whole). A batch that is not such an array hands the rest of it
  /// over as one item, which then fails to parse as a chunk.
  fn next_item(&mut self) -> Option<(&str, usize)> {
    let rest = self.text.get(self.at..).filter(|rest| !rest.is_empty())?;
    let skip = usize::from(matches!(rest.as_bytes()[0], b'[' | b','));
    let body = &rest[skip..];
    let mut items = serde_json::Deserializer::from_str(body).into_iter::<&RawValue>();
    let (start, len, used) = match items.next() {
      Some(Ok(item)) => {
        let end = skip + items.byte_offset();
        let at_end = rest[end..].trim_start() == "]";
        let start = item.get().as_ptr() as usize - self.text.as_ptr() as usize;
        (
          start,
          item.get().len(),
          if at_end { rest.len() } else { end },
        )
      }
      _ => (self.at + skip, body.len(), rest.len()),
    };
    self.at += used;
    Some((&self.text[start..start + len], used))
  }
}

/// How the producer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
  /// The provider's iterator ended.
  Done,
  /// The provider threw, or yielded something unusable: why.
  Failed(String),
}

/// What the reader gets next.
#[derive(Debug)]
enum Taken {
  Batch(Batch),
  End(End),
}

#[derive(Debug)]
struct State {
  batches: VecDeque<Batch>,
  chunk_credit: i64,
  byte_credit: i64,
  end: Option<End>,
  reader_gone: bool,
  producer_waits: bool,
}

/// One stream's window, shared by the producer (push, finish) and the
/// stream's [`ChunkReader`] (take, give back, close).
pub struct StreamWindow {
  window: Window,
  state: Mutex<State>,
  data: Notify,
  wake_producer: WakeProducer,
}

impl StreamWindow {
  /// An empty window whose producer is woken through `wake_producer`.
  pub fn new(window: Window, wake_producer: WakeProducer) -> Self {
    Self {
      window,
      state: Mutex::new(State {
        batches: VecDeque::new(),
        chunk_credit: i64::from(window.chunks),
        byte_credit: window.bytes as i64,
        end: None,
        reader_gone: false,
        producer_waits: false,
      }),
      data: Notify::new(),
      wake_producer,
    }
  }

  /// The credit a new stream starts with.
  pub fn initial_credit(&self) -> Credit {
    i64::from(self.window.chunks)
  }

  /// `count` chunks in one JSON array (see [`Batch`]), from the producer. Answers the
  /// chunks it may still push; at 0 it must wait for the wake-up.
  pub fn push(&self, text: String, count: u32) -> Credit {
    let mut state = self.state.lock();
    if state.reader_gone || state.end.is_some() {
      return CLOSED;
    }
    if count > 0 {
      state.chunk_credit -= i64::from(count);
      state.byte_credit -= text.len() as i64;
      state.batches.push_back(Batch { text, at: 0 });
      self.data.notify_one();
    }
    let credit = remaining(&state);
    if credit == 0 {
      state.producer_waits = true;
    }
    credit
  }

  /// The producer ended; what it pushed before is still read first. Only
  /// the first ending counts.
  pub fn finish(&self, end: End) {
    let mut state = self.state.lock();
    if state.end.is_none() {
      state.end = Some(end);
      self.data.notify_one();
    }
  }

  /// The next batch, or how the stream ended once every batch was taken.
  async fn take(&self) -> Taken {
    loop {
      {
        let mut state = self.state.lock();
        if let Some(batch) = state.batches.pop_front() {
          return Taken::Batch(batch);
        }
        if let Some(end) = state.end.clone() {
          return Taken::End(end);
        }
      }
      // One reader: a push between the check and here leaves a permit.
      self.data.notified().await;
    }
  }

  /// Credit for chunks the reader took; wakes a waiting producer once half
  /// the window is free.
  fn give_back(&self, chunks: u32, bytes: usize) {
    let wake = {
      let mut state = self.state.lock();
      state.chunk_credit += i64::from(chunks);
      state.byte_credit += bytes as i64;
      let half_free = state.chunk_credit >= i64::from(self.window.chunks / 2)
        && state.byte_credit >= (self.window.bytes / 2) as i64;
      if state.producer_waits && half_free && !state.reader_gone {
        state.producer_waits = false;
        Some(remaining(&state))
      } else {
        None
      }
    };
    if let Some(credit) = wake {
      (self.wake_producer)(credit);
    }
  }

  /// The reader is gone (the task ended): later pushes answer `CLOSED`, and
  /// a waiting producer is woken with it.
  fn close(&self) {
    let wake = {
      let mut state = self.state.lock();
      state.reader_gone = true;
      state.batches.clear();
      std::mem::take(&mut state.producer_waits)
    };
    if wake {
      (self.wake_producer)(CLOSED);
    }
  }
}

fn remaining(state: &State) -> Credit {
  if state.byte_credit <= 0 {
    0
  } else {
    state.chunk_credit.max(0)
  }
}

/// A chunk's JSON text straight into the typed chunk. Anything the typed
/// parse refuses goes the `Value` way, so errors read as they always did
/// (`parse_chunk`'s messages), and a non-object is never read as a sequence.
fn parse_chunk_text(text: &str) -> Result<CompletionChunk, ProviderFailure> {
  if text.starts_with('{') {
    if let Ok(chunk) = serde_json::from_str::<CompletionChunk>(text) {
      return Ok(chunk);
    }
  } else if text.starts_with('"') {
    if let Ok(content) = serde_json::from_str::<String>(text) {
      return Ok(content_chunk(content));
    }
  }
  // A lone surrogate from JavaScript becomes U+FFFD (docs/protocol.md, "Streaming");
  // the text repaired has none left, so this recurses once at most.
  if let Some(repaired) = crate::wire::replace_lone_surrogates(text) {
    return parse_chunk_text(&repaired);
  }
  match serde_json::from_str::<Value>(text) {
    Ok(Value::String(content)) => Ok(content_chunk(content)),
    Ok(value) => parse_chunk(value).map_err(ProviderFailure),
    Err(error) => Err(ProviderFailure(format!(
      "provider.stream: unreadable chunk: {error}"
    ))),
  }
}

/// One chunk of a run, as [`ChunkReader::next_items`] hands it over.
#[derive(Debug)]
pub enum ChunkItem<'a> {
  /// A chunk with only content (a batch's string item), as the JSON string
  /// the batch holds: nearly every chunk of a stream.
  Content(RawContent<'a>),
  /// Any other chunk, typed.
  Chunk(CompletionChunk),
}

impl ChunkItem<'_> {
  /// The chunk, typed.
  pub fn into_chunk(self) -> CompletionChunk {
    match self {
      ChunkItem::Content(content) => content.into_chunk(),
      ChunkItem::Chunk(chunk) => chunk,
    }
  }
}

/// An item's JSON text as a chunk: a string written as the registrar writes
/// one as it is, anything else typed ([`parse_chunk_text`]).
fn read_item(text: &str) -> Result<ChunkItem<'_>, ProviderFailure> {
  match RawContent::new(text) {
    Some(content) => Ok(ChunkItem::Content(content)),
    None => parse_chunk_text(text).map(ChunkItem::Chunk),
  }
}

/// A batch's string item: a chunk with only `content`.
fn content_chunk(content: String) -> CompletionChunk {
  CompletionChunk {
    content: Some(content),
    ..CompletionChunk::default()
  }
}

/// The task's side of a stream: `Provider::stream` answers one, and the task
/// reads the chunks through it. Dropping it closes the window, so the
/// producer stops at its next push (or is woken, if it waits for credit).
pub struct ChunkReader {
  window: Arc<StreamWindow>,
  current: Option<Batch>,
  taken_chunks: u32,
  taken_bytes: usize,
  /// A bad chunk met in a run, reported once the chunks before it went out.
  failure: Option<ProviderFailure>,
}

impl ChunkReader {
  /// Reads what the producer pushes into `window`.
  pub fn new(window: Arc<StreamWindow>) -> Self {
    Self {
      window,
      current: None,
      taken_chunks: 0,
      taken_bytes: 0,
      failure: None,
    }
  }

  /// The next chunks: waits for one, then hands it and as many more of the
  /// same push as are there (at most 128) to `each`, a content-only one as the
  /// JSON string the batch holds (borrowed from it, so nothing is allocated
  /// for it), any other typed; `false` at the end. A chunk that is not a valid
  /// `CompletionChunk` is a failure, reported after the valid chunks before
  /// it. One await for many chunks.
  pub async fn next_items(
    &mut self,
    mut each: impl FnMut(ChunkItem<'_>),
  ) -> Result<bool, ProviderFailure> {
    if let Some(failure) = self.failure.take() {
      return Err(failure);
    }
    let mut failure = None;
    let mut parsed = 0;
    let run = self
      .next_run(CHUNKS_PER_RUN, |text| match read_item(text) {
        Ok(item) => {
          each(item);
          parsed += 1;
          true
        }
        Err(error) => {
          failure = Some(error);
          false
        }
      })
      .await;
    match run {
      Ok(_) => match failure {
        // The chunks before the bad one go out first.
        Some(failure) if parsed == 0 => Err(failure),
        Some(failure) => {
          self.failure = Some(failure);
          Ok(true)
        }
        None => Ok(true),
      },
      Err(End::Done) => Ok(false),
      Err(End::Failed(message)) => Err(ProviderFailure(message)),
    }
  }

  /// Up to `max` chunk texts of the batch in hand (waiting for a batch when
  /// there is none), each handed to `each`, which answers `false` to stop
  /// after it; or how the stream ended once every batch was taken. Answers how
  /// many texts were handed over (at least one).
  async fn next_run(
    &mut self,
    max: usize,
    mut each: impl FnMut(&str) -> bool,
  ) -> Result<usize, End> {
    loop {
      if let Some(batch) = self.current.as_mut() {
        let mut handed = 0;
        while handed < max {
          let Some((text, bytes)) = batch.next_item() else {
            break;
          };
          handed += 1;
          self.taken_chunks += 1;
          self.taken_bytes += bytes;
          let more = each(text);
          if self.taken_chunks >= GIVE_BACK_EVERY {
            self.window.give_back(self.taken_chunks, self.taken_bytes);
            self.taken_chunks = 0;
            self.taken_bytes = 0;
          }
          if !more {
            break;
          }
        }
        if handed > 0 {
          return Ok(handed);
        }
        self.current = None;
      }
      self.give_back();
      match self.window.take().await {
        Taken::Batch(batch) => self.current = Some(batch),
        Taken::End(end) => return Err(end),
      }
    }
  }

  fn give_back(&mut self) {
    if self.taken_chunks > 0 {
      self.window.give_back(self.taken_chunks, self.taken_bytes);
      self.taken_chunks = 0;
      self.taken_bytes = 0;
    }
  }
}

impl Drop for ChunkReader {
  fn drop(&mut self) {
    self.window.close();
  }
}

/// The reader went away: the producer may stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A producer written in Rust: one chunk at a time, waiting while the window
/// is full. Dropped without [`ChunkWriter::finish`], the stream fails.
pub struct ChunkWriter {
  window: Arc<StreamWindow>,
  credit: Credit,
  /// The credit a wake-up brought, taken by the next wait.
  woken: Arc<(Mutex<Option<Credit>>, Notify)>,
  finished: bool,
}

/// A stream whose chunks a Rust task writes: the writer for the producer, the
/// reader for `Provider::stream`'s answer.
pub fn chunk_channel(window: Window) -> (ChunkWriter, ChunkReader) {
  let woken = Arc::new((Mutex::new(None), Notify::new()));
  let wake: WakeProducer = {
    let woken = Arc::clone(&woken);
    Arc::new(move |credit| {
      *woken.0.lock() = Some(credit);
      woken.1.notify_one();
    })
  };
  let window = Arc::new(StreamWindow::new(window, wake));
  let writer = ChunkWriter {
    credit: window.initial_credit(),
    window: Arc::clone(&window),
    woken,
    finished: false,
  };
  (writer, ChunkReader::new(window))
}

impl ChunkWriter {
  /// Pushes one chunk (a `CompletionChunk` as JSON), first waiting for credit
  /// if the window is full; `Closed` once the reader is gone.
  pub async fn send(&mut self, chunk: &Value) -> Result<(), Closed> {
    // The window wakes a producer only after a push answered it 0, so the
    // wake-up this waits for cannot have come and gone before.
    while self.credit == 0 {
      self.woken.1.notified().await;
      if let Some(credit) = self.woken.0.lock().take() {
        self.credit = credit;
      }
    }
    if self.credit < 0 {
      return Err(Closed);
    }
    self.credit = self.window.push(format!("[{chunk}]"), 1);
    if self.credit < 0 {
      Err(Closed)
    } else {
      Ok(())
    }
  }

  /// Ends the stream; the chunks sent before are read first.
  pub fn finish(mut self, end: End) {
    self.finished = true;
    self.window.finish(end);
  }
}

impl Drop for ChunkWriter {
  fn drop(&mut self) {
    if !self.finished {
      self.window.finish(End::Failed(
        "the stream's producer went away before it finished".to_owned(),
      ));
    }
  }
}

#[cfg(test)]
mod tests {
  use std::sync::atomic::{AtomicUsize, Ordering};

  use serde_json::json;

  use super::*;

  fn window(chunks: u32, bytes: usize) -> (Arc<StreamWindow>, Arc<Mutex<Vec<Credit>>>) {
    let woken = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&woken);
    let wake: WakeProducer = Arc::new(move |credit| log.lock().push(credit));
    (
      Arc::new(StreamWindow::new(Window { chunks, bytes }, wake)),
      woken,
    )
  }

  /// A batch of `count` chunks, as provider_bridge.js pushes them: a JSON
  /// array, each chunk an object or (every third) a bare content string.
  fn texts(from: usize, count: usize) -> String {
    let items: Vec<_> = (from..from + count)
      .map(|i| {
        if i % 3 == 0 {
          format!("\"{i}\"")
        } else {
          format!("{{\"content\":\"{i}\"}}")
        }
      })
      .collect();
    format!("[{}]", items.join(","))
  }

  /// Reads the stream to its end: every chunk's content, and how it ended.
  impl ChunkReader {
    /// [`ChunkReader::next_items`], each chunk typed, appended to `out`.
    async fn next_chunks(
      &mut self,
      out: &mut Vec<CompletionChunk>,
    ) -> Result<bool, ProviderFailure> {
      self.next_items(|item| out.push(item.into_chunk())).await
    }
  }

  async fn read_all(reader: &mut ChunkReader) -> (Vec<String>, Result<(), ProviderFailure>) {
    let mut seen = Vec::new();
    let mut chunks = Vec::new();
    loop {
      match reader.next_chunks(&mut chunks).await {
        Ok(true) => seen.extend(
          chunks
            .drain(..)
            .map(|chunk| chunk.content.unwrap_or_default()),
        ),
        Ok(false) => return (seen, Ok(())),
        Err(failure) => return (seen, Err(failure)),
      }
    }
  }

  /// Reads `count` chunks, one run at a time.
  async fn read(reader: &mut ChunkReader, count: usize) {
    let mut chunks = Vec::new();
    while chunks.len() < count {
      assert!(reader.next_chunks(&mut chunks).await.unwrap());
    }
    assert_eq!(chunks.len(), count, "read past {count}");
  }

  fn numbers(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
  }

  #[tokio::test]
  async fn chunks_arrive_in_order_across_batches_then_the_end() {
    let (window, _) = window(16, 1 << 20);
    assert_eq!(window.push(texts(0, 3), 3), 13);
    assert_eq!(window.push(texts(3, 2), 2), 11);
    window.finish(End::Done);
    let mut reader = ChunkReader::new(Arc::clone(&window));
    assert_eq!(read_all(&mut reader).await, (numbers(0..5), Ok(())));
  }

  #[tokio::test]
  async fn runs_hold_at_most_128_chunks_never_across_batches() {
    let (window, woken) = window(512, 1 << 20);
    assert_eq!(window.push(texts(0, 300), 300), 212);
    assert_eq!(window.push(texts(300, 212), 212), 0, "the window is full");
    window.finish(End::Done);
    let mut reader = ChunkReader::new(Arc::clone(&window));
    let mut runs = Vec::new();
    let mut chunks = Vec::new();
    while reader.next_chunks(&mut chunks).await.unwrap() {
      runs.push(chunks.len() - runs.iter().sum::<usize>());
    }
    assert_eq!(runs, vec![128, 128, 44, 128, 84]);
    let contents: Vec<_> = chunks.into_iter().map(|c| c.content.unwrap()).collect();
    assert_eq!(contents, numbers(0..512));
    assert_eq!(
      woken.lock().first(),
      Some(&256),
      "credit went back while the runs were read"
    );
  }

  #[tokio::test]
  async fn a_bad_chunk_fails_the_stream_after_the_good_ones_before_it() {
    let (window, _) = window(16, 1 << 20);
    window.push(
      r#"[{"content":"0"},"1",{"content":5},{"content":"2"}]"#.to_owned(),
      4,
    );
    let mut reader = ChunkReader::new(Arc::clone(&window));
    let (seen, end) = read_all(&mut reader).await;
    assert_eq!(seen, numbers(0..2));
    assert_eq!(
      end.unwrap_err().0,
      parse_chunk(json!({ "content": 5 })).unwrap_err()
    );
  }

  #[tokio::test]
  async fn a_failure_comes_after_what_was_pushed_before_it() {
    let (window, _) = window(16, 1 << 20);
    window.push(texts(0, 1), 1);
    window.finish(End::Failed("boom".to_owned()));
    let mut reader = ChunkReader::new(Arc::clone(&window));
    assert_eq!(
      read_all(&mut reader).await,
      (numbers(0..1), Err(ProviderFailure("boom".to_owned())))
    );
  }

  #[tokio::test]
  async fn a_full_window_wakes_the_producer_once_when_half_is_free() {
    let (window, woken) = window(256, 1 << 20);
    for i in 0..4 {
      window.push(texts(i * 64, 64), 64);
    }
    let mut reader = ChunkReader::new(Arc::clone(&window));
    read(&mut reader, 64).await;
    assert!(
      woken.lock().is_empty(),
      "64 read: a quarter free, no wake-up"
    );
    read(&mut reader, 64).await;
    assert_eq!(*woken.lock(), vec![128], "half free: one wake-up");
    read(&mut reader, 128).await;
    assert_eq!(woken.lock().len(), 1, "no wake-up per run");
  }

  /// The registrar's own window: a stream of short tokens (as provider_bridge.js
  /// pushes them, bare strings) fills its 2,048 chunks long before its bytes, and
  /// its loop, once full, is woken once for 1,024 of them.
  #[tokio::test]
  async fn the_window_takes_2048_short_tokens_and_wakes_the_loop_at_1024() {
    let (window, woken) = window(WINDOW.chunks, WINDOW.bytes);
    let batch = format!("[{}]", vec![r#""tok ""#; 2048].join(","));
    assert_eq!(window.push(batch, 2048), 0, "full after 2,048 chunks");
    assert!(
      window.state.lock().byte_credit > (WINDOW.bytes / 2) as i64,
      "by their count, not their bytes"
    );
    let mut reader = ChunkReader::new(Arc::clone(&window));
    read(&mut reader, 896).await;
    assert!(woken.lock().is_empty(), "less than half free: no wake-up");
    read(&mut reader, 128).await;
    assert_eq!(*woken.lock(), vec![1024], "half free: one wake-up");
  }

  #[tokio::test]
  async fn the_byte_credit_also_stops_the_producer() {
    let (window, _) = window(1000, 100);
    let big = format!("{{\"content\":\"{}\"}}", "x".repeat(120));
    assert_eq!(window.push(big, 1), 0, "over the byte window");
  }

  /// Every byte pushed comes back as credit once read, to the byte, however
  /// the batches are split: a credit that leaked a byte a batch would, over a
  /// long stream, stall it.
  #[tokio::test]
  async fn the_byte_credit_comes_back_whole() {
    let (window, _) = window(512, 1 << 20);
    let mut reader = ChunkReader::new(Arc::clone(&window));
    let mut next = 0;
    for count in [1, 2, 3, 7, 64, 65, 200] {
      window.push(texts(next, count), count as u32);
      next += count;
      read(&mut reader, count).await;
      // Runs of 64 give credit back on their own; the rest goes at the next wait.
      reader.give_back();
      let state = window.state.lock();
      assert_eq!(state.byte_credit, 1 << 20, "after {count} chunks");
      assert_eq!(state.chunk_credit, 512);
    }
  }

  #[tokio::test]
  async fn string_items_are_content_chunks_and_a_lone_surrogate_becomes_u_fffd() {
    let (window, _) = window(16, 1 << 20);
    window.push(
      r#"["a\"b\n,]","\ud800x",{"content":"c","finishReason":"stop"}]"#.to_owned(),
      3,
    );
    window.finish(End::Done);
    let mut reader = ChunkReader::new(Arc::clone(&window));
    let mut chunks = Vec::new();
    assert!(reader.next_chunks(&mut chunks).await.unwrap());
    let contents: Vec<_> = chunks.iter().map(|c| c.content.clone().unwrap()).collect();
    assert_eq!(contents, ["a\"b\n,]", "\u{fffd}x", "c"]);
    assert_eq!(chunks[0].finish_reason, None);
    assert_eq!(chunks[2].finish_reason.as_deref(), Some("stop"));
  }

  #[tokio::test]
  async fn a_string_item_as_written_is_handed_over_as_it_is_and_any_other_typed() {
    let (window, _) = window(16, 1 << 20);
    window.push(
      r#"["a\"b\n,]","\/","\ud800x","",{"content":"c"},"\u0041"]"#.to_owned(),
      6,
    );
    window.finish(End::Done);
    let mut reader = ChunkReader::new(Arc::clone(&window));
    let mut items = Vec::new();
    assert!(reader
      .next_items(|item| items.push(match item {
        ChunkItem::Content(content) => (true, content.json().to_owned(), content.decode()),
        ChunkItem::Chunk(chunk) => (false, String::new(), chunk.content.unwrap()),
      }))
      .await
      .unwrap());
    let expected = [
      (true, r#""a\"b\n,]""#, "a\"b\n,]"),
      (false, "", "/"),
      (false, "", "\u{fffd}x"),
      (false, "", ""),
      (false, "", "c"),
      (false, "", "A"),
    ];
    assert_eq!(items.len(), expected.len());
    for (item, (raw, json, content)) in items.iter().zip(expected) {
      assert_eq!(
        (item.0, item.1.as_str(), item.2.as_str()),
        (raw, json, content)
      );
    }
    assert!(!reader.next_items(|_| panic!("no more")).await.unwrap());
  }

  #[tokio::test]
  async fn a_batch_that_is_not_an_array_of_chunks_fails_the_stream() {
    for text in [
      "{\"content\":\"x\"}\n{",
      "[{\"content\":\"x\"},nul]",
      "[1]",
      "not json",
    ] {
      let (window, _) = window(16, 1 << 20);
      window.push(text.to_owned(), 2);
      window.finish(End::Done);
      let mut reader = ChunkReader::new(Arc::clone(&window));
      let (_, end) = read_all(&mut reader).await;
      assert!(end.is_err(), "{text} was read as chunks");
    }
  }

  #[test]
  fn a_closed_window_refuses_pushes_and_wakes_a_waiting_producer() {
    let (window, woken) = window(2, 1 << 20);
    assert_eq!(window.push(texts(0, 2), 2), 0);
    drop(ChunkReader::new(Arc::clone(&window)));
    assert_eq!(*woken.lock(), vec![CLOSED]);
    assert_eq!(window.push(texts(2, 1), 1), CLOSED);
  }

  /// However fast the producer pushes, what waits never exceeds the window.
  #[tokio::test]
  async fn what_waits_stays_within_the_window() {
    let (window, _) = window(64, 1 << 20);
    let waiting = AtomicUsize::new(0);
    let mut max = 0;
    let mut reader = ChunkReader::new(Arc::clone(&window));
    let mut next = 0;
    let mut chunks = Vec::new();
    for _ in 0..50 {
      // The producer pushes all its credit allows, in batches of 7.
      loop {
        let credit = window.push(String::new(), 0);
        if credit <= 0 {
          break;
        }
        let count = credit.min(7) as usize;
        window.push(texts(next, count), count as u32);
        next += count;
        waiting.fetch_add(count, Ordering::SeqCst);
      }
      max = max.max(waiting.load(Ordering::SeqCst));
      chunks.clear();
      while chunks.len() < 20 {
        reader.next_chunks(&mut chunks).await.unwrap();
      }
      waiting.fetch_sub(chunks.len(), Ordering::SeqCst);
    }
    assert!(max <= 64, "{max} chunks waited");
    assert!(next >= 1000, "the producer kept going: {next}");
  }

  #[tokio::test]
  async fn a_writer_waits_for_credit_and_stops_once_the_reader_is_gone() {
    let (mut writer, mut reader) = chunk_channel(Window {
      chunks: 4,
      bytes: 1 << 20,
    });
    let producer = tokio::spawn(async move {
      let mut sent = 0;
      while writer
        .send(&json!({ "content": sent.to_string() }))
        .await
        .is_ok()
      {
        sent += 1;
      }
      sent
    });
    read(&mut reader, 8).await;
    drop(reader);
    let sent = producer.await.unwrap();
    assert!((8..=12).contains(&sent), "{sent} sent for 8 read");
  }

  #[tokio::test]
  async fn a_writer_dropped_unfinished_fails_the_stream() {
    let (mut writer, mut reader) = chunk_channel(WINDOW);
    writer.send(&json!({ "content": "0" })).await.unwrap();
    drop(writer);
    let (seen, end) = read_all(&mut reader).await;
    assert_eq!(seen, numbers(0..1));
    assert!(end.unwrap_err().0.contains("went away"));
  }

  #[test]
  fn chunk_text_parses_typed_and_bad_chunks_read_as_before() {
    let chunk = parse_chunk_text(r#"{"content":"tok \"q\"","finishReason":"stop","usage":{"promptTokens":1,"completionTokens":2}}"#).unwrap();
    assert_eq!(chunk.content.as_deref(), Some("tok \"q\""));
    assert_eq!(chunk.finish_reason.as_deref(), Some("stop"));
    assert_eq!(chunk.usage.map(|usage| usage.completion_tokens), Some(2));
    // A duplicate key (which the typed parse refuses) reads as a Value does: last wins.
    let chunk = parse_chunk_text(r#"{"content":"a","content":"b"}"#).unwrap();
    assert_eq!(chunk.content.as_deref(), Some("b"));
    // A sequence is not read as the struct's fields.
    assert_eq!(
      parse_chunk_text(r#"["x"]"#).unwrap_err().0,
      parse_chunk(json!(["x"])).unwrap_err()
    );
    assert_eq!(
      parse_chunk_text(r#"{"content":5}"#).unwrap_err().0,
      parse_chunk(json!({ "content": 5 })).unwrap_err()
    );
    assert!(parse_chunk_text("{")
      .unwrap_err()
      .0
      .starts_with("provider.stream: unreadable chunk: "));
  }

  /// Found by the Node sample of the encoder's Unicode property
  /// (__test__/unicode.test.mjs, through the openai client): a JavaScript
  /// string with a lone surrogate failed the whole stream ("unexpected end of
  /// hex escape"); it now reads as String.prototype.toWellFormed() would.
  #[test]
  fn a_lone_surrogate_from_javascript_reads_as_u_fffd() {
    let chunk =
      parse_chunk_text(r#"{"content":"lone high \ud800! pair \ud83d\ude00 low \uDC00"}"#).unwrap();
    assert_eq!(
      chunk.content.as_deref(),
      Some("lone high \u{FFFD}! pair 😀 low \u{FFFD}")
    );
    // An escaped backslash before "ud800" is text, not an escape.
    let chunk = parse_chunk_text(r#"{"content":"\\ud800"}"#).unwrap();
    assert_eq!(chunk.content.as_deref(), Some("\\ud800"));
  }
}
