//! A scripted `Provider` for the integration tests: answers, rejects, hangs,
//! waits for the test to release it, or streams chunks; records its calls and
//! the aborts it receives.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use mcpctl_registrar::provider::{AbortReason, BoxFuture, Provider, ProviderCall, ProviderFailure};
use mcpctl_registrar::stream::{chunk_channel, ChunkReader, ChunkWriter, End, WINDOW};

/// What one provider call does.
#[derive(Debug, Clone)]
pub enum Behavior {
  /// Resolves at once with this `CompletionResult`.
  Answer(Value),
  /// Rejects with this message.
  Reject(String),
  /// Never settles.
  Hang,
  /// Resolves with this result once the test calls `release`.
  Gated(Value),
  /// `stream()` yields `{ "content": "c<i> " }` for i in 0..count, `delay`
  /// apart, then ends, or fails with `fail` when given.
  Stream {
    count: usize,
    delay: Duration,
    fail: Option<String>,
  },
  /// `stream()` yields `{ "content": "c<i> " }` for i in 0..count, each after
  /// the first only once the test calls `release`.
  GatedStream { count: usize },
}

/// A call as the provider saw it, its options parsed as JavaScript parses them.
#[derive(Debug, Clone)]
pub struct SeenCall {
  pub task_id: String,
  pub options: Value,
}

pub struct MockProvider {
  can_stream: bool,
  /// Used up front to back; the last one repeats.
  script: Mutex<VecDeque<Behavior>>,
  calls: Mutex<Vec<ProviderCall>>,
  aborts: Mutex<Vec<(String, AbortReason)>>,
  gate: Arc<Semaphore>,
}

impl MockProvider {
  pub fn new(can_stream: bool, script: Vec<Behavior>) -> Arc<Self> {
    assert!(!script.is_empty(), "a mock provider needs a behaviour");
    Arc::new(Self {
      can_stream,
      script: Mutex::new(script.into()),
      calls: Mutex::new(Vec::new()),
      aborts: Mutex::new(Vec::new()),
      gate: Arc::new(Semaphore::new(0)),
    })
  }

  pub fn answering(result: Value) -> Arc<Self> {
    Self::new(false, vec![Behavior::Answer(result)])
  }

  pub fn hanging() -> Arc<Self> {
    Self::new(false, vec![Behavior::Hang])
  }

  pub fn gated(result: Value) -> Arc<Self> {
    Self::new(false, vec![Behavior::Gated(result)])
  }

  pub fn rejecting(message: &str) -> Arc<Self> {
    Self::new(false, vec![Behavior::Reject(message.to_owned())])
  }

  pub fn streaming(count: usize, delay: Duration, fail: Option<&str>) -> Arc<Self> {
    let fail = fail.map(str::to_owned);
    Self::new(true, vec![Behavior::Stream { count, delay, fail }])
  }

  /// The task ids of every call, in call order.
  pub fn calls(&self) -> Vec<String> {
    self
      .calls
      .lock()
      .iter()
      .map(|c| c.task_id.clone())
      .collect()
  }

  /// The `index`th call's options, as the text JavaScript would parse.
  pub fn options_text(&self, index: usize) -> String {
    self.calls.lock()[index].options.clone()
  }

  /// The `index`th call; its options must be JSON text.
  pub fn call(&self, index: usize) -> SeenCall {
    let calls = self.calls.lock();
    let call = &calls[index];
    SeenCall {
      task_id: call.task_id.clone(),
      options: serde_json::from_str(&call.options).expect("the options are JSON text"),
    }
  }

  pub fn aborts(&self) -> Vec<(String, AbortReason)> {
    self.aborts.lock().clone()
  }

  /// Lets `n` gated calls resolve.
  pub fn release(&self, n: usize) {
    self.gate.add_permits(n);
  }

  fn next(&self, call: ProviderCall) -> Behavior {
    self.calls.lock().push(call);
    let mut script = self.script.lock();
    match script.len() {
      1 => script[0].clone(),
      _ => script.pop_front().expect("non-empty script"),
    }
  }

  fn settle(&self, behavior: Behavior) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    let gate = Arc::clone(&self.gate);
    Box::pin(async move {
      match behavior {
        Behavior::Answer(value) => Ok(value),
        Behavior::Reject(message) => Err(ProviderFailure(message)),
        Behavior::Hang => std::future::pending().await,
        Behavior::Gated(value) => {
          gate.acquire().await.expect("gate open").forget();
          Ok(value)
        }
        Behavior::Stream { .. } | Behavior::GatedStream { .. } => {
          Err(ProviderFailure("mock: a stream used as complete()".into()))
        }
      }
    })
  }
}

impl Provider for MockProvider {
  fn can_stream(&self) -> bool {
    self.can_stream
  }

  fn complete(&self, call: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    let behavior = self.next(call);
    self.settle(behavior)
  }

  fn stream(&self, call: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
    let behavior = self.next(call);
    let chunks = match behavior {
      Behavior::Stream { count, delay, fail } => Chunks {
        count,
        delay,
        fail,
        gate: None,
      },
      Behavior::GatedStream { count } => Chunks {
        count,
        delay: Duration::ZERO,
        fail: None,
        gate: Some(Arc::clone(&self.gate)),
      },
      other => {
        // A one-chunk stream of whatever `complete()` would have settled with.
        let settled = self.settle(other);
        return Box::pin(async move {
          let value = settled.await?;
          let (mut writer, reader) = chunk_channel(WINDOW);
          let _ = writer.send(&value).await;
          writer.finish(End::Done);
          Ok(reader)
        });
      }
    };
    // Like the JavaScript loop, the chunks are produced beside the task that
    // reads them, as far ahead as the window lets them.
    let (writer, reader) = chunk_channel(WINDOW);
    tokio::spawn(chunks.produce(writer));
    Box::pin(async move { Ok(reader) })
  }

  fn abort(&self, task_id: &str, reason: AbortReason) {
    self.aborts.lock().push((task_id.to_owned(), reason));
  }
}

/// A scripted stream's chunks: `{ "content": "c<i> " }` for i in 0..count.
struct Chunks {
  count: usize,
  delay: Duration,
  fail: Option<String>,
  gate: Option<Arc<Semaphore>>,
}

impl Chunks {
  /// Writes the chunks until the last or until the reader is gone.
  async fn produce(self, mut writer: ChunkWriter) {
    for i in 0..self.count {
      if !self.delay.is_zero() {
        tokio::time::sleep(self.delay).await;
      }
      if let (Some(gate), true) = (&self.gate, i > 0) {
        gate.acquire().await.expect("gate open").forget();
      }
      let chunk = json!({ "content": format!("c{i} ") });
      if writer.send(&chunk).await.is_err() {
        return;
      }
    }
    if !self.delay.is_zero() {
      tokio::time::sleep(self.delay).await;
    }
    if let (Some(gate), true) = (&self.gate, self.count > 0) {
      gate.acquire().await.expect("gate open").forget();
    }
    writer.finish(match self.fail {
      Some(message) => End::Failed(message),
      None => End::Done,
    });
  }
}
