//! Delivery: a result or chunk POST, retried on connection errors, 429 and 5xx
//! for about 30 s in all, honouring `Retry-After` within that bound
//! (docs/protocol.md section 4); 404/410 ends it quietly.
//!
//! Shape: one async function over a single-attempt closure (`McpdClient`'s
//! `post_result`/`post_chunks`), so the policy is tested on tokio's paused
//! clock without a server. It stops at once on mcpd's cancel for the task and
//! on the hard stop; once the registrar is stopping it makes no new attempt.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::mcpd::PostOutcome;

/// How long a POST is retried in all.
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// How a POST ended.
#[derive(Debug)]
pub enum Delivery {
  Delivered,
  /// mcpd answered 404/410: it no longer knows the task.
  Gone,
  /// mcpd cancelled the task meanwhile: nothing more is posted for it.
  Cancelled,
  /// Retries ran out, mcpd refused the POST for good, or the registrar stopped.
  Failed(Error),
}

/// What ends a delivery from outside.
#[derive(Clone)]
pub struct DeliverySignals {
  /// mcpd's cancel for this task.
  pub cancel: CancellationToken,
  /// The registrar is stopping: no new attempt.
  pub stop: CancellationToken,
  /// The stop's grace ran out: the attempt in flight is dropped.
  pub kill: CancellationToken,
}

/// POSTs with `attempt` until it is delivered, gone, or the bounds end it.
pub async fn deliver<F, Fut>(signals: &DeliverySignals, mut attempt: F) -> Delivery
where
  F: FnMut() -> Fut,
  Fut: Future<Output = PostOutcome>,
{
  let deadline = Instant::now() + DELIVERY_DEADLINE;
  let mut pause = FIRST_PAUSE;
  loop {
    // Order: mcpd's cancel, the hard stop, then the attempt.
    let outcome = tokio::select! {
      biased;
      _ = signals.cancel.cancelled() => return Delivery::Cancelled,
      _ = signals.kill.cancelled() => return Delivery::Failed(Error::Stopped),
      outcome = attempt() => outcome,
    };
    let failure = match outcome {
      Ok(()) => return Delivery::Delivered,
      Err(failure) => failure,
    };
    let retryable = match failure.error.status() {
      Some(404 | 410) => return Delivery::Gone,
      Some(status) => status == 429 || status >= 500,
      None => matches!(failure.error, Error::Transport { .. }),
    };
    let wait = crate::backoff::jitter(pause).max(failure.retry_after.unwrap_or_default());
    if !retryable || signals.stop.is_cancelled() || Instant::now() + wait > deadline {
      return Delivery::Failed(failure.error);
    }
    tracing::debug!(error = %crate::error::describe(&failure.error), ?wait, "retrying");
    tokio::select! {
      biased;
      _ = signals.cancel.cancelled() => return Delivery::Cancelled,
      _ = signals.stop.cancelled() => return Delivery::Failed(failure.error),
      _ = tokio::time::sleep(wait) => {}
    }
    pause = (pause * 2).min(MAX_PAUSE);
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::mcpd::PostFailure;
  use std::sync::{Arc, Mutex};

  fn signals() -> DeliverySignals {
    DeliverySignals {
      cancel: CancellationToken::new(),
      stop: CancellationToken::new(),
      kill: CancellationToken::new(),
    }
  }

  fn status(status: u16, retry_after: Option<u64>) -> PostFailure {
    PostFailure {
      error: Error::Status {
        operation: "result POST",
        status,
        message: "scripted".into(),
      },
      retry_after: retry_after.map(Duration::from_secs),
    }
  }

  /// Runs `deliver` against scripted answers; returns the outcome and the
  /// attempt times since the start.
  async fn run(signals: &DeliverySignals, answers: Vec<PostOutcome>) -> (Delivery, Vec<Duration>) {
    let start = Instant::now();
    let answers = Arc::new(Mutex::new(answers.into_iter()));
    let times = Arc::new(Mutex::new(Vec::new()));
    let delivery = deliver(signals, || {
      let (answers, times) = (Arc::clone(&answers), Arc::clone(&times));
      // Like a request future: nothing happens until it is polled.
      async move {
        times.lock().unwrap().push(start.elapsed());
        let next = answers.lock().unwrap().next();
        next.unwrap_or_else(|| Err(status(503, None)))
      }
    })
    .await;
    let times = times.lock().unwrap().clone();
    (delivery, times)
  }

  #[tokio::test(start_paused = true)]
  async fn retries_5xx_with_growing_pauses_for_about_30_s() {
    let (delivery, times) = run(&signals(), vec![]).await;
    assert!(matches!(delivery, Delivery::Failed(_)), "{delivery:?}");
    let last = *times.last().unwrap();
    assert!(last <= DELIVERY_DEADLINE, "{last:?}");
    assert!(last >= Duration::from_secs(20), "{last:?}");
    for pair in times.windows(2) {
      assert!(pair[1] - pair[0] >= Duration::from_millis(180), "{times:?}");
      assert!(
        pair[1] - pair[0] <= Duration::from_millis(5500),
        "{times:?}"
      );
    }
  }

  #[tokio::test(start_paused = true)]
  async fn honours_retry_after_within_the_bound() {
    let answers = vec![Err(status(429, Some(3))), Ok(())];
    let (delivery, times) = run(&signals(), answers).await;
    assert!(matches!(delivery, Delivery::Delivered));
    assert_eq!(times.len(), 2);
    assert!(times[1] >= Duration::from_secs(3), "{times:?}");
    // A Retry-After beyond the 30 s bound ends the delivery at once.
    let (delivery, times) = run(&signals(), vec![Err(status(503, Some(60)))]).await;
    assert!(matches!(delivery, Delivery::Failed(_)));
    assert_eq!(times, [Duration::ZERO]);
  }

  #[tokio::test(start_paused = true)]
  async fn gone_and_client_errors_end_at_once() {
    let (delivery, times) = run(&signals(), vec![Err(status(410, None))]).await;
    assert!(matches!(delivery, Delivery::Gone));
    assert_eq!(times.len(), 1);
    let (delivery, times) = run(&signals(), vec![Err(status(400, None))]).await;
    assert!(matches!(delivery, Delivery::Failed(_)));
    assert_eq!(times.len(), 1);
  }

  #[tokio::test(start_paused = true)]
  async fn stop_ends_the_retries_and_cancel_wins() {
    let signals = signals();
    let stop = signals.stop.clone();
    let stopper = tokio::spawn(async move {
      tokio::time::sleep(Duration::from_secs(1)).await;
      stop.cancel();
    });
    let (delivery, times) = run(&signals, vec![]).await;
    stopper.await.unwrap();
    assert!(matches!(delivery, Delivery::Failed(_)));
    assert!(
      times.iter().all(|at| *at <= Duration::from_secs(1)),
      "{times:?}"
    );

    let signals = self::signals();
    signals.cancel.cancel();
    signals.stop.cancel();
    let (delivery, times) = run(&signals, vec![]).await;
    assert!(matches!(delivery, Delivery::Cancelled));
    assert!(times.is_empty());
  }
}
