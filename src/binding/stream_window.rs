//! The hand-over of a streaming task's chunks from JavaScript to the core. The
//! JavaScript half runs the provider's `for await` loop and pushes batches of
//! chunk texts with plain synchronous calls; the core pulls them one at a time
//! through `ChunkSource::next_chunk`. A credit window, in chunks and bytes,
//! bounds what waits here: credit goes back as the core takes chunks, and a
//! producer that used it all is woken once, when half the window is free again.
//! Nothing here knows napi: waking the producer is a callback.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// How much may wait between the JavaScript loop and the core, per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
  pub chunks: u32,
  pub bytes: usize,
}

/// 512 chunks or 1 MiB of chunk JSON, whichever fills first.
pub const WINDOW: Window = Window {
  chunks: 512,
  bytes: 1024 * 1024,
};

/// The most chunk JSON the JavaScript loop gathers before it pushes, whatever
/// credit remains (provider_bridge.js's FLUSH_BYTES): a push may overshoot the
/// byte credit by at most this plus one chunk.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// How many chunks the consumer takes before it gives their credit back.
const GIVE_BACK_EVERY: u32 = 64;

/// What `push` answers the JavaScript loop: chunks it may push before it must
/// wait (0: wait for the wake-up), or -1: nobody reads the stream any more.
pub type Credit = i64;
pub const CLOSED: Credit = -1;

/// Wakes the JavaScript loop with its new credit (or `CLOSED`).
pub type WakeProducer = Arc<dyn Fn(Credit) + Send + Sync>;

/// Chunk texts pushed in one call, separated by "\n" (which JSON text never
/// contains unescaped).
#[derive(Debug)]
pub struct Batch {
  text: String,
  at: usize,
}

impl Batch {
  /// The next chunk's JSON text.
  pub fn next_text(&mut self) -> Option<&str> {
    if self.at >= self.text.len() {
      return None;
    }
    let rest = &self.text[self.at..];
    let end = rest.find('\n').unwrap_or(rest.len());
    self.at += end + 1;
    Some(&rest[..end])
  }
}

/// How the JavaScript loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
  Done,
  Failed(String),
}

/// What the consumer gets next.
#[derive(Debug)]
pub enum Taken {
  Batch(Batch),
  End(End),
}

#[derive(Debug)]
struct State {
  batches: VecDeque<Batch>,
  chunk_credit: i64,
  byte_credit: i64,
  end: Option<End>,
  consumer_gone: bool,
  producer_waits: bool,
}

/// One stream's window, shared by the JavaScript side (push, finish) and the
/// core's `ChunkSource` (take, give back, close).
pub struct StreamWindow {
  window: Window,
  state: Mutex<State>,
  data: Notify,
  wake_producer: WakeProducer,
}

impl StreamWindow {
  pub fn new(window: Window, wake_producer: WakeProducer) -> Self {
    Self {
      window,
      state: Mutex::new(State {
        batches: VecDeque::new(),
        chunk_credit: i64::from(window.chunks),
        byte_credit: window.bytes as i64,
        end: None,
        consumer_gone: false,
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

  /// `count` chunk texts joined by "\n", from the JavaScript loop. Answers the
  /// chunks it may still push; at 0 it must wait for the wake-up.
  pub fn push(&self, text: String, count: u32) -> Credit {
    let mut state = self.state.lock();
    if state.consumer_gone || state.end.is_some() {
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

  /// The JavaScript loop ended; what was pushed before is still delivered first.
  pub fn finish(&self, end: End) {
    let mut state = self.state.lock();
    if state.end.is_none() {
      state.end = Some(end);
      self.data.notify_one();
    }
  }

  /// The next batch, or how the stream ended once every batch was taken.
  pub async fn take(&self) -> Taken {
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
      // One consumer: a push between the check and here leaves a permit.
      self.data.notified().await;
    }
  }

  /// Credit for chunks the consumer took; wakes a waiting producer once half
  /// the window is free.
  pub fn give_back(&self, chunks: u32, bytes: usize) {
    let wake = {
      let mut state = self.state.lock();
      state.chunk_credit += i64::from(chunks);
      state.byte_credit += bytes as i64;
      let half_free = state.chunk_credit >= i64::from(self.window.chunks / 2)
        && state.byte_credit >= (self.window.bytes / 2) as i64;
      if state.producer_waits && half_free && !state.consumer_gone {
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

  /// The consumer is gone (the task ended): later pushes answer `CLOSED`, and
  /// a waiting producer is woken with it.
  pub fn close(&self) {
    let wake = {
      let mut state = self.state.lock();
      state.consumer_gone = true;
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

/// The consumer's side: a batch in hand, chunks taken since credit last went back.
pub struct WindowReader {
  window: Arc<StreamWindow>,
  current: Option<Batch>,
  taken_chunks: u32,
  taken_bytes: usize,
}

impl WindowReader {
  pub fn new(window: Arc<StreamWindow>) -> Self {
    Self {
      window,
      current: None,
      taken_chunks: 0,
      taken_bytes: 0,
    }
  }

  /// The next chunk's JSON text (handed to `parse`), or how the stream ended.
  pub async fn next<T>(&mut self, parse: impl Fn(&str) -> T) -> Result<T, End> {
    loop {
      if let Some(batch) = self.current.as_mut() {
        if let Some(text) = batch.next_text() {
          self.taken_chunks += 1;
          self.taken_bytes += text.len() + 1;
          let parsed = parse(text);
          if self.taken_chunks >= GIVE_BACK_EVERY {
            self.give_back();
          }
          return Ok(parsed);
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

  /// Up to `max` chunk texts of the batch in hand (waiting for a batch when
  /// there is none), each handed to `each`, which answers `false` to stop
  /// after it; or how the stream ended once every batch was taken. Answers how
  /// many texts were handed over (at least one). One await for many chunks.
  pub async fn next_run(
    &mut self,
    max: usize,
    mut each: impl FnMut(&str) -> bool,
  ) -> Result<usize, End> {
    loop {
      if let Some(batch) = self.current.as_mut() {
        let mut handed = 0;
        while handed < max {
          let Some(text) = batch.next_text() else {
            break;
          };
          handed += 1;
          self.taken_chunks += 1;
          self.taken_bytes += text.len() + 1;
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

impl Drop for WindowReader {
  fn drop(&mut self) {
    self.window.close();
  }
}

#[cfg(test)]
mod tests {
  use std::sync::atomic::{AtomicUsize, Ordering};

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

  fn texts(from: usize, count: usize) -> String {
    (from..from + count)
      .map(|i| format!("{{\"content\":\"{i}\"}}"))
      .collect::<Vec<_>>()
      .join("\n")
  }

  #[tokio::test]
  async fn chunks_arrive_in_order_across_batches_then_the_end() {
    let (window, _) = window(16, 1 << 20);
    assert_eq!(window.push(texts(0, 3), 3), 13);
    assert_eq!(window.push(texts(3, 2), 2), 11);
    window.finish(End::Done);
    let mut reader = WindowReader::new(Arc::clone(&window));
    let mut seen = Vec::new();
    let end = loop {
      match reader.next(str::to_owned).await {
        Ok(text) => seen.push(text),
        Err(end) => break end,
      }
    };
    assert_eq!(seen.join("\n"), texts(0, 5));
    assert_eq!(end, End::Done);
  }

  #[tokio::test]
  async fn runs_hand_over_a_batch_at_a_time_in_order() {
    let (window, woken) = window(128, 1 << 20);
    assert_eq!(window.push(texts(0, 100), 100), 28);
    assert_eq!(window.push(texts(100, 28), 28), 0, "the window is full");
    window.finish(End::Done);
    let mut reader = WindowReader::new(Arc::clone(&window));
    let mut seen = Vec::new();
    let mut runs = Vec::new();
    let end = loop {
      match reader
        .next_run(30, |text| {
          seen.push(text.to_owned());
          true
        })
        .await
      {
        Ok(count) => runs.push(count),
        Err(end) => break end,
      }
    };
    assert_eq!(
      runs,
      vec![30, 30, 30, 10, 28],
      "at most 30, never across batches"
    );
    assert_eq!(seen.join("\n"), texts(0, 128));
    assert_eq!(end, End::Done);
    assert_eq!(
      *woken.lock(),
      vec![64],
      "credit went back while the runs were read"
    );
  }

  #[tokio::test]
  async fn a_run_stops_where_its_reader_says() {
    let (window, _) = window(16, 1 << 20);
    window.push(texts(0, 3), 3);
    let mut reader = WindowReader::new(Arc::clone(&window));
    let mut seen = Vec::new();
    let count = reader
      .next_run(10, |text| {
        seen.push(text.to_owned());
        seen.len() < 2
      })
      .await;
    assert_eq!(count, Ok(2));
    assert_eq!(reader.next(str::to_owned).await, Ok(texts(2, 1)));
  }

  #[tokio::test]
  async fn a_failure_comes_after_what_was_pushed_before_it() {
    let (window, _) = window(16, 1 << 20);
    window.push(texts(0, 1), 1);
    window.finish(End::Failed("boom".to_owned()));
    let mut reader = WindowReader::new(Arc::clone(&window));
    assert_eq!(reader.next(str::to_owned).await, Ok(texts(0, 1)));
    assert_eq!(
      reader.next(str::to_owned).await,
      Err(End::Failed("boom".to_owned()))
    );
  }

  #[tokio::test]
  async fn a_full_window_wakes_the_producer_once_when_half_is_free() {
    let (window, woken) = window(128, 1 << 20);
    assert_eq!(window.push(texts(0, 128), 128), 0, "the window is full");
    let mut reader = WindowReader::new(Arc::clone(&window));
    for _ in 0..63 {
      reader.next(|_| ()).await.unwrap();
    }
    assert!(woken.lock().is_empty(), "63 taken: no credit back yet");
    reader.next(|_| ()).await.unwrap();
    assert_eq!(*woken.lock(), vec![64], "half free: one wake-up");
    for _ in 0..64 {
      reader.next(|_| ()).await.unwrap();
    }
    assert_eq!(woken.lock().len(), 1, "no wake-up per chunk");
  }

  #[tokio::test]
  async fn the_byte_credit_also_stops_the_producer() {
    let (window, _) = window(1000, 100);
    let big = format!("{{\"content\":\"{}\"}}", "x".repeat(120));
    assert_eq!(window.push(big, 1), 0, "over the byte window");
  }

  #[test]
  fn a_closed_window_refuses_pushes_and_wakes_a_waiting_producer() {
    let (window, woken) = window(2, 1 << 20);
    assert_eq!(window.push(texts(0, 2), 2), 0);
    drop(WindowReader::new(Arc::clone(&window)));
    assert_eq!(*woken.lock(), vec![CLOSED]);
    assert_eq!(window.push(texts(2, 1), 1), CLOSED);
  }

  /// However fast the producer pushes, what waits never exceeds the window.
  #[tokio::test]
  async fn what_waits_stays_within_the_window() {
    let (window, _) = window(64, 1 << 20);
    let waiting = AtomicUsize::new(0);
    let mut max = 0;
    let mut reader = WindowReader::new(Arc::clone(&window));
    let mut next = 0;
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
      for _ in 0..20 {
        reader.next(|_| ()).await.unwrap();
        waiting.fetch_sub(1, Ordering::SeqCst);
      }
    }
    assert!(max <= 64, "{max} chunks waited");
    assert!(next >= 1000, "the producer kept going: {next}");
  }
}
