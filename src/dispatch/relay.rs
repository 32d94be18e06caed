//! The chunk relay of one streaming task: POSTs its payloads in order, one
//! POST at a time, `seq` the index of each POST's first payload; payloads that
//! arrive while a POST is in flight go together in the next one.
//!
//! Shape: an [`Outbox`] shared by the task's producer and an async function,
//! [`relay_chunks`]. The outbox is the next chunk POST's body, built as the
//! payloads are made: each payload is escaped into it at once, so nothing is
//! kept per payload and the relay only adds the closing brackets. The
//! producer waits while the body is full (the batch limits); the relay takes
//! the body whole for its next POST. The relay ends on `[DONE]`, when the
//! producer is gone, on mcpd's cancel, or when delivery gives up; then it
//! closes the outbox, which the producer sees as "relay gone".

use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::delivery::{deliver, Delivery, DeliverySignals};
use crate::error::describe;
use crate::mcpd::McpdClient;
use crate::openai::{PayloadForm, Payloads, DONE};
use crate::trace::TaskTrace;
use crate::wire::write_json_str;

/// The most payloads and bytes (of payloads as the body holds them) one chunk
/// POST carries; the producer waits while the next POST's body holds this much.
/// The byte bound is what bounds memory and a POST's size; the count is high
/// enough that a fast stream of short tokens (a payload of about 200 bytes as
/// the body holds it) fills about 800 KiB per POST rather than 200 KiB: a
/// quarter of the POSTs and of the relay's wake-ups (docs/benchmark.md,
/// "Fuller chunk POSTs"). Longer payloads reach the byte bound first.
const MAX_BATCH_PAYLOADS: usize = 4096;
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// How long a chunk POST after the first waits for more payloads to join it.
const BATCH_LINGER: Duration = Duration::from_millis(5);

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
  /// Everything up to `[DONE]` was delivered (or nothing was ever sent).
  Finished,
  /// mcpd cancelled the task.
  Cancelled,
  /// mcpd forgot the task, or delivery gave up.
  Undelivered,
}

/// The relay is gone: nothing more can be posted for the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayGone;

/// The next chunk POST of one task, as it is being built.
pub struct Outbox {
  state: Mutex<Building>,
  /// Wakes the relay: the first payload of a body, a full body, `[DONE]`, or
  /// the producer gone.
  relay_wake: Notify,
  /// Wakes a producer that waits for room.
  producer_wake: Notify,
  /// Cancelled when the relay ends.
  relay_gone: CancellationToken,
}

struct Building {
  /// `{"seq":N,"chunks":[` then the payloads so far, each as a JSON string.
  body: String,
  payloads: usize,
  /// The payloads' length as pushed, for the byte limit.
  bytes: usize,
  done: bool,
  producer_gone: bool,
  relay_gone: bool,
  relay_waits: bool,
  producer_waits: bool,
}

impl Building {
  fn full(&self) -> bool {
    self.payloads >= MAX_BATCH_PAYLOADS || self.bytes >= MAX_BATCH_BYTES
  }

  /// Whether the relay should post now rather than linger for more.
  fn ready(&self) -> bool {
    self.done || self.producer_gone || self.full()
  }
}

/// A chunk POST's body, ready to send (and to send again on a retry).
struct Batch {
  body: Bytes,
  payloads: usize,
  done: bool,
}

fn body_head(seq: u64, capacity: usize) -> String {
  let mut body = String::with_capacity(capacity.max(64));
  body.push_str(r#"{"seq":"#);
  body.push_str(&seq.to_string());
  body.push_str(r#","chunks":["#);
  body
}

impl Default for Outbox {
  fn default() -> Self {
    Self::new()
  }
}

impl Outbox {
  pub fn new() -> Self {
    Self {
      state: Mutex::new(Building {
        body: body_head(0, 0),
        payloads: 0,
        bytes: 0,
        done: false,
        producer_gone: false,
        relay_gone: false,
        relay_waits: false,
        producer_waits: false,
      }),
      relay_wake: Notify::new(),
      producer_wake: Notify::new(),
      relay_gone: CancellationToken::new(),
    }
  }

  /// Adds the payloads (JSON text) in order, emptying `payloads`, waiting
  /// while the next POST's body is full. (The registrar pushes escaped ones.)
  #[cfg(test)]
  pub async fn push(&self, payloads: &mut Vec<String>) -> Result<(), RelayGone> {
    let mut list: Payloads = payloads.drain(..).collect();
    self.push_in(&mut list, PayloadForm::Json).await
  }

  /// [`Outbox::push`] for payloads already escaped as the inside of a JSON
  /// string (`PayloadForm::JsonStringContent`): they are copied, not escaped.
  pub async fn push_escaped(&self, payloads: &mut Payloads) -> Result<(), RelayGone> {
    self.push_in(payloads, PayloadForm::JsonStringContent).await
  }

  async fn push_in(&self, payloads: &mut Payloads, form: PayloadForm) -> Result<(), RelayGone> {
    let mut at = 0;
    while at < payloads.len() {
      let wake_relay = {
        let mut state = self.state.lock();
        if state.relay_gone {
          payloads.clear();
          return Err(RelayGone);
        }
        let was_empty = state.payloads == 0;
        while at < payloads.len() && !state.full() {
          let payload = payloads.get(at);
          if state.payloads > 0 {
            state.body.push(',');
          }
          match form {
            PayloadForm::Json => write_json_str(&mut state.body, payload),
            PayloadForm::JsonStringContent => {
              state.body.push('"');
              state.body.push_str(payload);
              state.body.push('"');
            }
          }
          state.payloads += 1;
          state.bytes += payload.len();
          state.done |= payload == DONE;
          at += 1;
        }
        let wake = state.relay_waits && (was_empty || state.ready());
        if wake {
          state.relay_waits = false;
        }
        if at < payloads.len() {
          state.producer_waits = true;
        }
        wake
      };
      if wake_relay {
        self.relay_wake.notify_one();
      }
      if at < payloads.len() {
        // A permit stored by a take between the unlock and here is not lost.
        self.producer_wake.notified().await;
      }
    }
    payloads.clear();
    Ok(())
  }

  /// The producer is gone: the relay posts what is left and ends.
  pub fn close_producer(&self) {
    let wake = {
      let mut state = self.state.lock();
      state.producer_gone = true;
      std::mem::take(&mut state.relay_waits)
    };
    if wake {
      self.relay_wake.notify_one();
    }
  }

  /// Resolves once the relay has ended.
  pub async fn relay_gone(&self) {
    self.relay_gone.cancelled().await
  }

  fn close_relay(&self) {
    let wake = {
      let mut state = self.state.lock();
      state.relay_gone = true;
      state.body = String::new();
      std::mem::take(&mut state.producer_waits)
    };
    self.relay_gone.cancel();
    if wake {
      self.producer_wake.notify_one();
    }
  }

  /// Waits for a first payload (`None`: the producer is gone and nothing is
  /// left), then, when `linger`, up to BATCH_LINGER from that first payload
  /// for the body to fill; takes the body whole.
  async fn take(&self, seq: u64, linger: bool) -> Option<Batch> {
    let mut deadline = None;
    loop {
      {
        let mut state = self.state.lock();
        if state.payloads == 0 && state.producer_gone {
          return None;
        }
        if state.payloads > 0 && linger && deadline.is_none() {
          deadline = Some(tokio::time::Instant::now() + BATCH_LINGER);
        }
        let lingering = deadline.is_some_and(|at| tokio::time::Instant::now() < at);
        if state.payloads > 0 && (state.ready() || !lingering) {
          let next_seq = seq + state.payloads as u64;
          // The next body starts as large as this one (up to twice a full one's
          // bytes, whatever an outsized payload grew it to); after [DONE] there
          // is none.
          let capacity = if state.done {
            0
          } else {
            state.body.capacity().min(2 * MAX_BATCH_BYTES)
          };
          let mut body = std::mem::replace(&mut state.body, body_head(next_seq, capacity));
          body.push_str("]}");
          let batch = Batch {
            body: Bytes::from(body),
            payloads: std::mem::take(&mut state.payloads),
            done: std::mem::take(&mut state.done),
          };
          state.bytes = 0;
          let wake = std::mem::take(&mut state.producer_waits);
          drop(state);
          if wake {
            self.producer_wake.notify_one();
          }
          return Some(batch);
        }
        state.relay_waits = true;
      }
      match deadline {
        Some(at) => {
          let _ = tokio::time::timeout_at(at, self.relay_wake.notified()).await;
        }
        None => self.relay_wake.notified().await,
      }
    }
  }
}

/// Closes the relay's side of the outbox however the relay ends.
struct RelayEnd<'a>(&'a Outbox);

impl Drop for RelayEnd<'_> {
  fn drop(&mut self) {
    self.0.close_relay();
  }
}

pub async fn relay_chunks(
  client: &McpdClient,
  task_id: &str,
  outbox: &Outbox,
  signals: &DeliverySignals,
  trace: &TaskTrace,
) -> Relayed {
  let _end = RelayEnd(outbox);
  let mut seq = 0u64;
  loop {
    // The first POST goes at once (time to first token); later ones wait a
    // few milliseconds for company, so a fast provider is not relayed one
    // payload per POST when mcpd answers quickly.
    let batch = tokio::select! {
      biased;
      _ = signals.cancel.cancelled() => return Relayed::Cancelled,
      _ = signals.kill.cancelled() => return Relayed::Undelivered,
      batch = outbox.take(seq, seq > 0) => batch,
    };
    let Some(batch) = batch else {
      return Relayed::Finished;
    };
    match deliver(signals, || {
      // Read per POST: the registrar's span is recorded before the first chunk.
      client.post_chunk_body(task_id, batch.body.clone(), trace.header())
    })
    .await
    {
      Delivery::Delivered => {
        seq += batch.payloads as u64;
        if batch.done {
          return Relayed::Finished;
        }
      }
      Delivery::Cancelled => return Relayed::Cancelled,
      Delivery::Gone => {
        tracing::debug!(
          task_id,
          "mcpd no longer knows the task; dropping its stream"
        );
        return Relayed::Undelivered;
      }
      Delivery::Failed(error) => {
        tracing::warn!(task_id, error = %describe(&error), "could not deliver the task's chunks");
        return Relayed::Undelivered;
      }
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::wire::ChunkPost;
  use futures_util::FutureExt;

  fn payloads(from: usize, count: usize) -> Vec<String> {
    (from..from + count)
      .map(|i| format!(r#"{{"c":"{i} \"q\""}}"#))
      .collect()
  }

  fn text(batch: &Batch) -> &str {
    std::str::from_utf8(&batch.body).unwrap()
  }

  #[tokio::test]
  async fn bodies_are_chunk_posts_with_running_seqs() {
    let outbox = Outbox::new();
    outbox.push(&mut payloads(0, 3)).await.unwrap();
    let first = outbox.take(0, false).await.unwrap();
    assert_eq!(
      text(&first),
      serde_json::to_string(&ChunkPost {
        seq: 0,
        chunks: &payloads(0, 3)
      })
      .unwrap()
    );
    assert_eq!((first.payloads, first.done), (3, false));
    let mut last = payloads(3, 2);
    last.push(DONE.to_owned());
    outbox.push(&mut last.clone()).await.unwrap();
    let second = outbox.take(3, false).await.unwrap();
    assert_eq!(
      text(&second),
      serde_json::to_string(&ChunkPost {
        seq: 3,
        chunks: &last
      })
      .unwrap()
    );
    assert_eq!((second.payloads, second.done), (3, true));
    outbox.close_producer();
    assert!(outbox.take(6, false).await.is_none());
  }

  #[tokio::test]
  async fn an_outsized_payload_does_not_size_every_later_body() {
    let outbox = Outbox::new();
    outbox
      .push_escaped(
        &mut [format!("{{{}}}", "x".repeat(3 * MAX_BATCH_BYTES))]
          .into_iter()
          .collect(),
      )
      .await
      .unwrap();
    let batch = outbox.take(0, false).await.unwrap();
    assert!(batch.body.len() > 3 * MAX_BATCH_BYTES);
    let next = outbox.state.lock().body.capacity();
    assert!(
      (MAX_BATCH_BYTES..=2 * MAX_BATCH_BYTES).contains(&next),
      "{next}"
    );
  }

  #[tokio::test]
  async fn escaped_payloads_are_copied_into_the_same_body() {
    let plain = Outbox::new();
    let escaped = Outbox::new();
    let mut payloads = payloads(0, 3);
    payloads.push(DONE.to_owned());
    let mut inside: Payloads = payloads
      .iter()
      .map(|payload| {
        let quoted = serde_json::to_string(payload).unwrap();
        quoted[1..quoted.len() - 1].to_owned()
      })
      .collect();
    plain.push(&mut payloads.clone()).await.unwrap();
    escaped.push_escaped(&mut inside).await.unwrap();
    assert!(inside.is_empty());
    let (plain, escaped) = (
      plain.take(0, false).await.unwrap(),
      escaped.take(0, false).await.unwrap(),
    );
    assert_eq!(text(&plain), text(&escaped));
    assert!(escaped.done);
  }

  #[tokio::test]
  async fn a_full_body_holds_the_producer_until_the_relay_takes_it() {
    let outbox = Outbox::new();
    let mut many = payloads(0, MAX_BATCH_PAYLOADS + 10);
    let push = outbox.push(&mut many);
    tokio::pin!(push);
    assert!(push.as_mut().now_or_never().is_none(), "the producer waits");
    let batch = outbox.take(0, false).await.unwrap();
    assert_eq!(batch.payloads, MAX_BATCH_PAYLOADS);
    push.await.unwrap();
    let rest = outbox.take(MAX_BATCH_PAYLOADS as u64, false).await.unwrap();
    assert_eq!(rest.payloads, 10);
    let head = format!(
      r#"{{"seq":{0},"chunks":["{{\"c\":\"{0} "#,
      MAX_BATCH_PAYLOADS
    );
    assert!(text(&rest).starts_with(&head), "{}", text(&rest));
  }

  #[tokio::test(start_paused = true)]
  async fn a_later_post_lingers_for_company_then_goes() {
    let outbox = Outbox::new();
    outbox.push(&mut payloads(0, 1)).await.unwrap();
    let deadline = tokio::time::Instant::now() + BATCH_LINGER;
    let batch = outbox.take(5, true).await.unwrap();
    assert_eq!(batch.payloads, 1);
    assert_eq!(tokio::time::Instant::now(), deadline);
  }

  #[tokio::test]
  async fn a_gone_relay_refuses_payloads_and_frees_a_waiting_producer() {
    let outbox = Outbox::new();
    let mut many = payloads(0, MAX_BATCH_PAYLOADS + 1);
    let push = outbox.push(&mut many);
    tokio::pin!(push);
    assert!(push.as_mut().now_or_never().is_none());
    drop(RelayEnd(&outbox));
    assert_eq!(push.await, Err(RelayGone));
    outbox.relay_gone().await;
    assert_eq!(outbox.push(&mut payloads(0, 1)).await, Err(RelayGone));
  }
}
