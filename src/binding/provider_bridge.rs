//! The JavaScript side of the registrar: `ProviderBridge` implements the core's
//! `Provider` trait over an `LlmProvider`, and the logger and `onStateChange`
//! callbacks are reached the same way, all through threadsafe functions into
//! the functions of provider_bridge.js. A stream's chunks come the other way,
//! in batches, through plain synchronous calls (`native` below, stream_window.rs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use napi::bindgen_prelude::{FnArgs, Function, FunctionRef, JsObjectValue, Object, Unknown};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::contract::RegistrarStatus as JsStatus;
use super::stream_window::{
  Credit, End, StreamWindow, WakeProducer, WindowReader, CLOSED, FLUSH_BYTES, WINDOW,
};
use crate::logging::LogSink;
use crate::openai::{parse_chunk, CompletionChunk};
use crate::provider::{
  AbortReason, BoxFuture, ChunkSource, Provider, ProviderCall, ProviderFailure,
};
use crate::registrar::{RegistrarStatus, StatusObserver};

const SOURCE: &str = include_str!("provider_bridge.js");

type TaskArgs = FnArgs<(String, String, String, u32)>;
type StreamArgs = FnArgs<(String, String, String, u32, u32, Credit)>;
type CreditArgs = FnArgs<(u32, Credit)>;
type AbortArgs = FnArgs<(String, String, bool)>;
type LogArgs = FnArgs<(String, String, String)>;
/// `complete(name, taskId, optionsJson, callId)`: settles the call with a JSON reply.
type TaskFn = ThreadsafeFunction<TaskArgs, Unknown<'static>, TaskArgs, Status, false, true>;
/// `openStream(name, taskId, optionsJson, callId, streamId, credit)`: settles the
/// call with a JSON reply once the provider's iterator is open; its loop then
/// pushes the chunks.
type StreamFn = ThreadsafeFunction<StreamArgs, Unknown<'static>, StreamArgs, Status, false, true>;
/// `credit(streamId, credit)`: wakes a stream's loop that waits for credit.
type CreditFn = ThreadsafeFunction<CreditArgs, Unknown<'static>, CreditArgs, Status, false, true>;
/// `abort(taskId, reason, timedOut)`.
type AbortFn = ThreadsafeFunction<AbortArgs, Unknown<'static>, AbortArgs, Status, false, true>;
/// `log(level, message, fieldsJson)`.
type LogFn = ThreadsafeFunction<LogArgs, Unknown<'static>, LogArgs, Status, false, true>;
/// `stateChange(status)`.
type StateFn = ThreadsafeFunction<JsStatus, Unknown<'static>, JsStatus, Status, false, true>;
/// A strong reference that keeps Node's event loop alive while the registrar runs.
pub type KeepAlive = ThreadsafeFunction<(), Unknown<'static>, (), Status, false, false>;
pub type KeepAliveSource = FunctionRef<(), Unknown<'static>>;
/// provider_bridge.js evaluates to `createProviderBridge(logger, onStateChange, native)`.
type BridgeFactory<'env> = Function<
  'env,
  FnArgs<(Option<Object<'env>>, Option<Function<'env>>, Object<'env>)>,
  Object<'env>,
>;

/// Provider calls waiting for their JavaScript reply, by call id. The reply
/// comes back through `native.settle(callId, replyJson)`, a plain synchronous
/// call, rather than as a Promise handed back through the threadsafe function
/// (which costs an extra wake-up of the runtime and a pair of callbacks per call).
#[derive(Default)]
struct PendingCalls {
  next_id: AtomicU32,
  waiting: Mutex<HashMap<u32, oneshot::Sender<String>>>,
}

impl PendingCalls {
  fn open(self: &Arc<Self>) -> PendingCall {
    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
    let (sender, receiver) = oneshot::channel();
    self.waiting.lock().insert(id, sender);
    PendingCall {
      id,
      receiver,
      calls: Arc::clone(self),
    }
  }

  fn settle(&self, id: u32, reply: String) {
    if let Some(sender) = self.waiting.lock().remove(&id) {
      let _ = sender.send(reply);
    }
  }
}

/// One call's wait for its reply; forgotten when dropped (the task ended first).
struct PendingCall {
  id: u32,
  receiver: oneshot::Receiver<String>,
  calls: Arc<PendingCalls>,
}

impl Drop for PendingCall {
  fn drop(&mut self) {
    self.calls.waiting.lock().remove(&self.id);
  }
}

/// The open streams of one bridge, by the id their JavaScript loop pushes to.
#[derive(Default)]
struct StreamTable {
  next_id: AtomicU32,
  open: Mutex<HashMap<u32, Arc<StreamWindow>>>,
}

impl StreamTable {
  fn insert(&self, window: Arc<StreamWindow>) -> u32 {
    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
    self.open.lock().insert(id, window);
    id
  }

  fn get(&self, id: u32) -> Option<Arc<StreamWindow>> {
    self.open.lock().get(&id).cloned()
  }

  fn remove(&self, id: u32) {
    self.open.lock().remove(&id);
  }

  /// `native`: `push(streamId, text, count)` answers the credit left,
  /// `end(streamId)` and `fail(streamId, message)` end the stream, and
  /// `settle(callId, replyJson)` answers a provider call. Plain synchronous
  /// calls on the JavaScript thread: a lock and a copy, no wake-up of their own.
  fn native<'env>(
    self: &Arc<Self>,
    calls: &Arc<PendingCalls>,
    env: &'env Env,
  ) -> napi::Result<Object<'env>> {
    let mut native = Object::new(env)?;
    let pending = Arc::clone(calls);
    let settle =
      env.create_function_from_closure::<FnArgs<(u32, String)>, _, _>("settle", move |call| {
        let (id, reply): (u32, String) = call.args()?;
        pending.settle(id, reply);
        Ok(())
      })?;
    native.set_named_property("settle", settle)?;
    let table = Arc::clone(self);
    let push = env.create_function_from_closure::<FnArgs<(u32, String, u32)>, _, _>(
      "push",
      move |call| {
        let (id, text, count): (u32, String, u32) = call.args()?;
        Ok(match table.get(id) {
          Some(window) => window.push(text, count),
          None => CLOSED,
        })
      },
    )?;
    native.set_named_property("push", push)?;
    let table = Arc::clone(self);
    let end = env.create_function_from_closure::<FnArgs<(u32,)>, _, _>("end", move |call| {
      let id: u32 = call.get(0)?;
      if let Some(window) = table.get(id) {
        window.finish(End::Done);
      }
      Ok(())
    })?;
    native.set_named_property("end", end)?;
    let table = Arc::clone(self);
    let fail =
      env.create_function_from_closure::<FnArgs<(u32, String)>, _, _>("fail", move |call| {
        let (id, message): (u32, String) = call.args()?;
        if let Some(window) = table.get(id) {
          window.finish(End::Failed(message));
        }
        Ok(())
      })?;
    native.set_named_property("fail", fail)?;
    native.set_named_property("flushBytes", FLUSH_BYTES as u32)?;
    Ok(native)
  }
}

/// The threadsafe functions of one registrar's bridge. All are weak: they
/// never keep Node alive by themselves (the `KeepAlive` does, while started).
pub struct JsBridge {
  complete: TaskFn,
  open_stream: StreamFn,
  credit: Arc<CreditFn>,
  streams: Arc<StreamTable>,
  calls: Arc<PendingCalls>,
  abort: AbortFn,
  log: LogFn,
  state_change: StateFn,
  /// The session id of the last status seen, added to every log line.
  session_id: parking_lot::Mutex<Option<String>>,
}

/// What building a bridge gives the binding: the shared functions, the object
/// to publish providers on, and the source of the keep-alive reference.
pub struct BridgeParts<'env> {
  pub bridge: Arc<JsBridge>,
  pub object: Object<'env>,
  pub keep_alive: KeepAliveSource,
}

impl JsBridge {
  pub fn create<'env>(
    env: &'env Env,
    logger: Option<Object<'env>>,
    on_state_change: Option<Function<'env>>,
  ) -> napi::Result<BridgeParts<'env>> {
    let factory: BridgeFactory = env.run_script(SOURCE)?;
    let streams = Arc::new(StreamTable::default());
    let calls = Arc::new(PendingCalls::default());
    let native = streams.native(&calls, env)?;
    let object = factory.call(FnArgs::from((logger, on_state_change, native)))?;
    let bridge = JsBridge {
      complete: weak_function(&object, "complete")?,
      open_stream: weak_function(&object, "openStream")?,
      credit: Arc::new(weak_function(&object, "credit")?),
      streams,
      calls,
      abort: weak_function(&object, "abort")?,
      log: weak_function(&object, "log")?,
      state_change: weak_function(&object, "stateChange")?,
      session_id: parking_lot::Mutex::new(None),
    };
    let keep_alive: Function<(), Unknown> = object.get_named_property("keepAlive")?;
    Ok(BridgeParts {
      bridge: Arc::new(bridge),
      keep_alive: keep_alive.create_ref()?,
      object,
    })
  }

  /// Where the registrar's log lines go when a `logger` was given: its fields
  /// (with the session id once known; never the token) and message, in pino's order.
  pub fn log_sink(self: &Arc<Self>) -> LogSink {
    let bridge = Arc::clone(self);
    Arc::new(move |level, message, fields: Map<String, Value>| {
      let level = level.as_str().to_ascii_lowercase();
      let level = if level == "trace" {
        "debug".to_owned()
      } else {
        level
      };
      let mut fields = fields;
      if let Some(id) = bridge.session_id.lock().clone() {
        fields
          .entry("providerSessionId")
          .or_insert(Value::String(id));
      }
      let fields = Value::Object(fields).to_string();
      bridge.log.call(
        FnArgs::from((level, message, fields)),
        ThreadsafeFunctionCallMode::NonBlocking,
      );
    })
  }

  pub fn status_observer(self: &Arc<Self>) -> StatusObserver {
    let bridge = Arc::clone(self);
    Arc::new(move |status: RegistrarStatus| {
      bridge
        .session_id
        .lock()
        .clone_from(&status.provider_session_id);
      bridge
        .state_change
        .call(status.into(), ThreadsafeFunctionCallMode::NonBlocking);
    })
  }

  /// Calls `function` with a fresh call id and waits for its `settle`.
  async fn call_task<Args: 'static + napi::bindgen_prelude::JsValuesTupleIntoVec>(
    &self,
    function: &ThreadsafeFunction<Args, Unknown<'static>, Args, Status, false, true>,
    what: &str,
    args: impl FnOnce(u32) -> Args,
  ) -> Result<Reply, ProviderFailure> {
    let mut call = self.calls.open();
    let status = function.call(args(call.id), ThreadsafeFunctionCallMode::NonBlocking);
    if status != Status::Ok {
      return Err(ProviderFailure(format!(
        "provider.{what}: cannot call into JavaScript: {status}"
      )));
    }
    let text = (&mut call.receiver).await.map_err(|_| {
      ProviderFailure(format!(
        "provider.{what}: the JavaScript side went away without answering"
      ))
    })?;
    Reply::decode(&text, what)
  }
}

fn weak_function<T, Return>(
  object: &Object,
  name: &str,
) -> napi::Result<ThreadsafeFunction<T, Return, T, Status, false, true>>
where
  T: 'static + napi::bindgen_prelude::JsValuesTupleIntoVec,
  Return: 'static + napi::bindgen_prelude::FromNapiValue,
{
  let function: Function<T, Return> = object.get_named_property(name)?;
  function
    .build_threadsafe_function()
    .callee_handled::<false>()
    .weak::<true>()
    .build()
}

/// The JSON text every bridge function answers.
#[derive(Deserialize)]
struct Reply {
  ok: bool,
  #[serde(default)]
  value: Value,
  #[serde(default)]
  message: String,
}

impl Reply {
  fn decode(text: &str, what: &str) -> Result<Self, ProviderFailure> {
    let reply: Reply = serde_json::from_str(text).map_err(|error| {
      ProviderFailure(format!("provider.{what}: unreadable bridge reply: {error}"))
    })?;
    if reply.ok {
      Ok(reply)
    } else {
      Err(ProviderFailure(reply.message))
    }
  }
}

/// One `LlmProvider` published under `name`.
pub struct ProviderBridge {
  pub name: String,
  pub can_stream: bool,
  pub bridge: Arc<JsBridge>,
}

impl Provider for ProviderBridge {
  fn can_stream(&self) -> bool {
    self.can_stream
  }

  fn complete(&self, call: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    let bridge = Arc::clone(&self.bridge);
    let args = (self.name.clone(), call.task_id, call.options.to_string());
    Box::pin(async move {
      let reply = bridge
        .call_task(&bridge.complete, "complete", |id| {
          FnArgs::from((args.0, args.1, args.2, id))
        })
        .await?;
      Ok(reply.value)
    })
  }

  fn stream(
    &self,
    call: ProviderCall,
  ) -> BoxFuture<'static, Result<Box<dyn ChunkSource>, ProviderFailure>> {
    let bridge = Arc::clone(&self.bridge);
    let name = self.name.clone();
    Box::pin(async move {
      let source = JsChunkSource::open(&bridge);
      let (stream_id, credit) = (source.id, source.initial_credit);
      let options = call.options.to_string();
      // A failed open drops `source`, which forgets the stream.
      bridge
        .call_task(&bridge.open_stream, "stream", |id| {
          FnArgs::from((name, call.task_id, options, id, stream_id, credit))
        })
        .await?;
      Ok(Box::new(source) as Box<dyn ChunkSource>)
    })
  }

  fn abort(&self, task_id: &str, reason: AbortReason) {
    let args = (
      task_id.to_owned(),
      reason.describe().to_owned(),
      reason == AbortReason::TimedOut,
    );
    self
      .bridge
      .abort
      .call(FnArgs::from(args), ThreadsafeFunctionCallMode::NonBlocking);
  }
}

/// A stream's chunks as the JavaScript loop pushed them, read through the
/// stream's credit window.
struct JsChunkSource {
  id: u32,
  initial_credit: Credit,
  reader: WindowReader,
  streams: Arc<StreamTable>,
  /// A bad chunk met in a run, reported once the chunks before it went out.
  failure: Option<ProviderFailure>,
}

/// The most chunks one `next_chunks` hands over: the relay gets payloads in
/// runs of this many at most, however large the JavaScript push was.
const CHUNKS_PER_RUN: usize = 128;

/// A chunk's JSON text straight into the typed chunk. Anything the typed
/// parse refuses goes the `Value` way, so errors read as they always did
/// (`parse_chunk`'s messages), and a non-object is never read as a sequence.
fn parse_chunk_text(text: &str) -> Result<CompletionChunk, ProviderFailure> {
  if text.starts_with('{') {
    if let Ok(chunk) = serde_json::from_str::<CompletionChunk>(text) {
      return Ok(chunk);
    }
  }
  match serde_json::from_str::<Value>(text) {
    Ok(value) => parse_chunk(value).map_err(ProviderFailure),
    Err(error) => Err(ProviderFailure(format!(
      "provider.stream: unreadable chunk: {error}"
    ))),
  }
}

impl JsChunkSource {
  fn open(bridge: &JsBridge) -> Self {
    let credit = Arc::clone(&bridge.credit);
    let id_cell = Arc::new(AtomicU32::new(u32::MAX));
    let id_for_wake = Arc::clone(&id_cell);
    let wake: WakeProducer = Arc::new(move |value| {
      let id = id_for_wake.load(Ordering::Relaxed);
      credit.call(
        FnArgs::from((id, value)),
        ThreadsafeFunctionCallMode::NonBlocking,
      );
    });
    let window = Arc::new(StreamWindow::new(WINDOW, wake));
    let initial_credit = window.initial_credit();
    let id = bridge.streams.insert(Arc::clone(&window));
    id_cell.store(id, Ordering::Relaxed);
    Self {
      id,
      initial_credit,
      reader: WindowReader::new(window),
      streams: Arc::clone(&bridge.streams),
      failure: None,
    }
  }
}

impl Drop for JsChunkSource {
  fn drop(&mut self) {
    // The reader's own drop then closes the window, waking a waiting loop.
    self.streams.remove(self.id);
  }
}

impl ChunkSource for JsChunkSource {
  fn next_chunks<'a>(
    &'a mut self,
    out: &'a mut Vec<CompletionChunk>,
  ) -> BoxFuture<'a, Result<bool, ProviderFailure>> {
    Box::pin(async move {
      if let Some(failure) = self.failure.take() {
        return Err(failure);
      }
      let mut failure = None;
      let mut parsed = 0;
      let run = self
        .reader
        .next_run(CHUNKS_PER_RUN, |text| match parse_chunk_text(text) {
          Ok(chunk) => {
            out.push(chunk);
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
    })
  }

  fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Value>, ProviderFailure>> {
    Box::pin(async move {
      match self
        .reader
        .next(|text: &str| serde_json::from_str::<Value>(text))
        .await
      {
        Ok(Ok(value)) => Ok(Some(value)),
        Ok(Err(error)) => Err(ProviderFailure(format!(
          "provider.stream: unreadable chunk: {error}"
        ))),
        Err(End::Done) => Ok(None),
        Err(End::Failed(message)) => Err(ProviderFailure(message)),
      }
    })
  }
}

#[cfg(test)]
mod tests {
  use super::*;

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
      parse_chunk(serde_json::json!(["x"])).unwrap_err()
    );
    assert_eq!(
      parse_chunk_text(r#"{"content":5}"#).unwrap_err().0,
      parse_chunk(serde_json::json!({ "content": 5 })).unwrap_err()
    );
    assert!(parse_chunk_text("{")
      .unwrap_err()
      .0
      .starts_with("provider.stream: unreadable chunk: "));
  }
}
