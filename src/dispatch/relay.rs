//! The chunk relay of one streaming task: POSTs its payloads in order, one
//! POST at a time, `seq` the index of each POST's first payload; payloads that
//! arrive while a POST is in flight go together in the next one.
//!
//! Shape: an async function fed by a bounded `mpsc` channel (the task's
//! producer holds the sender). It ends on `[DONE]`, when the sender is
//! dropped, on mcpd's cancel, or when delivery gives up; then it drops the
//! receiver, which the producer sees as "relay gone".

use std::time::Duration;

use tokio::sync::mpsc;

use super::delivery::{deliver, Delivery, DeliverySignals};
use crate::error::describe;
use crate::mcpd::McpdClient;
use crate::openai::DONE;

/// Payloads a streaming task may have waiting for the relay; the provider's
/// iterator is not pulled while this is full.
pub const RELAY_BUFFER: usize = 256;
/// The most payloads and bytes one chunk POST carries.
const MAX_BATCH_PAYLOADS: usize = 1024;
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

pub async fn relay_chunks(
  client: &McpdClient,
  task_id: &str,
  mut receiver: mpsc::Receiver<String>,
  signals: &DeliverySignals,
) -> Relayed {
  let mut seq = 0u64;
  let mut batch: Vec<String> = Vec::new();
  loop {
    let first = tokio::select! {
      biased;
      _ = signals.cancel.cancelled() => return Relayed::Cancelled,
      _ = signals.kill.cancelled() => return Relayed::Undelivered,
      first = receiver.recv() => first,
    };
    let Some(first) = first else {
      return Relayed::Finished;
    };
    // The first POST goes at once (time to first token); later ones wait a
    // few milliseconds for company, so a fast provider is not relayed one
    // payload per POST when mcpd answers quickly.
    let linger = (seq > 0).then(|| tokio::time::Instant::now() + BATCH_LINGER);
    collect_batch(&mut receiver, &mut batch, first, linger).await;
    let done = batch.last().is_some_and(|payload| payload == DONE);
    match deliver(signals, || client.post_chunks(task_id, seq, &batch)).await {
      Delivery::Delivered => {
        seq += batch.len() as u64;
        batch.clear();
        if done {
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

/// Fills a batch: what is already waiting, then, until `linger`, what arrives,
/// up to the batch limits or `[DONE]`.
async fn collect_batch(
  receiver: &mut mpsc::Receiver<String>,
  batch: &mut Vec<String>,
  first: String,
  linger: Option<tokio::time::Instant>,
) {
  let mut bytes = first.len();
  let mut done = first == DONE;
  batch.push(first);
  while !done && batch.len() < MAX_BATCH_PAYLOADS && bytes < MAX_BATCH_BYTES {
    let next = match receiver.try_recv() {
      Ok(payload) => Some(payload),
      Err(mpsc::error::TryRecvError::Disconnected) => None,
      Err(mpsc::error::TryRecvError::Empty) => match linger {
        Some(deadline) => tokio::time::timeout_at(deadline, receiver.recv())
          .await
          .ok()
          .flatten(),
        None => None,
      },
    };
    let Some(payload) = next else {
      break;
    };
    bytes += payload.len();
    done = payload == DONE;
    batch.push(payload);
  }
}
