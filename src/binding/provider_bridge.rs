//! The JavaScript side of the registrar: `ProviderBridge` implements the core's
//! `Provider` trait over an `LlmProvider`, and the logger and `onStateChange`
//! callbacks are reached the same way, all through threadsafe functions into
//! the functions of provider_bridge.js: the two per task (`complete`,
//! `openStream`) with positional arguments, the others with one object of
//! named fields. Provider calls answer, and a stream's chunks come, the other way:
//! plain synchronous calls into `native` below, the chunks in batches into the
//! core's stream window (src/stream.rs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use napi::bindgen_prelude::{
  Either3, FnArgs, Function, FunctionRef, JsObjectValue, JsValuesTupleIntoVec, Null, Object,
  ToNapiValue, Unknown,
};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{sys, Env, Status};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::contract::RegistrarStatus as JsStatus;
use crate::logging::LogSink;
use crate::openai::CompletionChunk;
use crate::provider::{AbortReason, BoxFuture, Provider, ProviderCall, ProviderFailure};
use crate::registrar::{RegistrarStatus, StatusObserver};
use crate::shape::Shape;
use crate::stream::{
  ChunkReader, Credit, End, StreamWindow, WakeProducer, CLOSED, FLUSH_BYTES, WINDOW,
};
use crate::trace::{Recorded, SpanEnd, TaskTrace};

const SOURCE: &str = include_str!("provider_bridge.js");
/// The task spans, handed to provider_bridge.js (spans.js says why it is apart).
const SPANS: &str = include_str!("spans.js");

/// A struct handed to JavaScript as a plain object with these named fields.
/// Written out rather than `#[napi(object)]`, which would publish the bridge's
/// private shapes in index.d.ts.
macro_rules! js_object {
  ($(#[$doc:meta])* struct $name:ident { $($(#[$field_doc:meta])* $field:ident: $ty:ty = $js:literal,)* }) => {
    $(#[$doc])*
    struct $name { $($(#[$field_doc])* $field: $ty,)* }

    impl ToNapiValue for $name {
      unsafe fn to_napi_value(env: sys::napi_env, value: Self) -> napi::Result<sys::napi_value> {
        let env = Env::from_raw(env);
        let mut object = Object::new(&env)?;
        $(object.set($js, value.$field)?;)*
        unsafe { Object::to_napi_value(env.raw(), object) }
      }
    }
  };
}

/// `complete(provider, taskId, optionsJson, callId, arrivedAt)`: one provider
/// call, its fields positional: an object would cost the main thread a key
/// string and a property store per field, each call (as `native.push`'s do).
/// - `provider`: the provider's published name;
/// - `taskId`;
/// - `optionsJson`: `CompletionOptions` as JSON text (`JSON.parse` builds the
///   whole request, however deep, in one call, where napi would take one call
///   per property);
/// - `callId`: what `native.settle` names when it answers;
/// - `arrivedAt`: when the task reached the registrar (ms since the epoch), the
///   span's start, or undefined.
type CallArgs = FnArgs<(String, String, String, u32, Option<f64>)>;

/// `openStream(provider, taskId, optionsJson, callId, arrivedAt, streamId,
/// credit)`: `complete`'s arguments, then the stream's id in `native.push` and
/// the chunks its loop may push before it must wait.
type StreamCallArgs = FnArgs<(String, String, String, u32, Option<f64>, u32, Credit)>;

js_object! {
  /// `credit(grant)`: wakes a stream's loop that waits for credit.
  struct CreditGrant {
    stream_id: u32 = "streamId",
    /// Chunks it may push, or -1: the stream's reader is gone.
    credit: Credit = "credit",
  }
}

js_object! {
  /// `abort(abort)`: fires a task's `AbortSignal`.
  struct Abort {
    task_id: String = "taskId",
    /// The `DOMException`'s message.
    reason: String = "reason",
    /// A `TimeoutError` rather than an `AbortError`.
    timed_out: bool = "timedOut",
  }
}

js_object! {
  /// `endSpan(ended)`: how a task whose span was recorded ended.
  struct SpanEnded {
    task_id: String = "taskId",
    /// src/trace.rs `SpanEnd` as JSON.
    end_json: String = "endJson",
  }
}

js_object! {
  /// `log(line)`: one line for the `logger`, pino's order.
  struct LogLine {
    level: String = "level",
    message: String = "message",
    /// The fields as JSON text (parsed once, on the JavaScript side).
    fields_json: String = "fieldsJson",
  }
}

/// `complete(...)`: the provider's answer comes back through `native.settle`.
type CompleteFn = ThreadsafeFunction<CallArgs, Unknown<'static>, CallArgs, Status, false, true>;
/// `openStream(...)`: settled once the provider's iterator is open; its loop
/// then pushes the chunks.
type OpenStreamFn =
  ThreadsafeFunction<StreamCallArgs, Unknown<'static>, StreamCallArgs, Status, false, true>;
/// `credit(grant)`.
type CreditFn = ThreadsafeFunction<CreditGrant, Unknown<'static>, CreditGrant, Status, false, true>;
/// `abort(abort)`.
type AbortFn = ThreadsafeFunction<Abort, Unknown<'static>, Abort, Status, false, true>;
/// `endSpan(ended)`.
type EndSpanFn = ThreadsafeFunction<SpanEnded, Unknown<'static>, SpanEnded, Status, false, true>;
/// `log(line)`.
type LogFn = ThreadsafeFunction<LogLine, Unknown<'static>, LogLine, Status, false, true>;
/// `stateChange(status)`.
type StateFn = ThreadsafeFunction<JsStatus, Unknown<'static>, JsStatus, Status, false, true>;
/// A strong reference that keeps Node's event loop alive while the registrar runs.
pub type KeepAlive = ThreadsafeFunction<(), Unknown<'static>, (), Status, false, false>;
pub type KeepAliveSource = FunctionRef<(), Unknown<'static>>;
/// provider_bridge.js evaluates to `createProviderBridge(logger, onStateChange, native, spans)`.
type BridgeFactory<'env> = Function<
  'env,
  FnArgs<(
    Option<Object<'env>>,
    Option<Function<'env>>,
    Object<'env>,
    Object<'env>,
  )>,
  Object<'env>,
>;
/// spans.js evaluates to `createTaskSpans(addonUrl, native)`.
type SpansFactory<'env> = Function<'env, FnArgs<(Option<String>, Object<'env>)>, Object<'env>>;

/// How a provider call settled, as `native.settle` reports it.
type Settled = Result<Option<String>, String>;

/// A waiting call: where its reply goes, and its task's trace, where
/// `native.traced` records the task's span.
type Waiting = (oneshot::Sender<Settled>, Arc<TaskTrace>);

/// Provider calls waiting for their JavaScript reply, by call id. The reply
/// comes back through `native.settle(callId, value, error)`, a plain
/// synchronous call, rather than as a Promise handed back through the
/// threadsafe function (which costs an extra wake-up of the runtime and a pair
/// of callbacks per call).
#[derive(Default)]
struct PendingCalls {
  next_id: AtomicU32,
  waiting: Mutex<HashMap<u32, Waiting>>,
}

impl PendingCalls {
  fn open(self: &Arc<Self>, trace: Arc<TaskTrace>) -> PendingCall {
    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
    let (sender, receiver) = oneshot::channel();
    self.waiting.lock().insert(id, (sender, trace));
    PendingCall {
      id,
      receiver,
      calls: Arc::clone(self),
    }
  }

  fn settle(&self, id: u32, settled: Settled) {
    if let Some((sender, _)) = self.waiting.lock().remove(&id) {
      let _ = sender.send(settled);
    }
  }

  /// `native.traced(callId, traceparent, tracestate)`: records the span
  /// spans.js made for a call's task. Answers null (live: `endSpan` will
  /// come), a `SpanEnd`'s JSON (the task already ended: end it now, so), or
  /// false (refused: not a valid traceparent).
  fn traced(
    &self,
    id: u32,
    traceparent: &str,
    tracestate: Option<&str>,
  ) -> Either3<Null, String, bool> {
    let trace = self
      .waiting
      .lock()
      .get(&id)
      .map(|(_, trace)| Arc::clone(trace));
    let Some(trace) = trace else {
      // The task let go of its call: it ended before the provider began.
      let end = SpanEnd {
        error_type: Some("_OTHER"),
        ..SpanEnd::default()
      };
      return Either3::B(serde_json::to_string(&end).unwrap_or_default());
    };
    match trace.record_span(traceparent, tracestate) {
      Recorded::Live => Either3::A(Null),
      Recorded::AlreadyEnded(end) => Either3::B(serde_json::to_string(&end).unwrap_or_default()),
      Recorded::Refused => Either3::C(false),
    }
  }
}

/// One call's wait for its reply; forgotten when dropped (the task ended first).
struct PendingCall {
  id: u32,
  receiver: oneshot::Receiver<Settled>,
  calls: Arc<PendingCalls>,
}

impl Drop for PendingCall {
  fn drop(&mut self) {
    self.calls.waiting.lock().remove(&self.id);
  }
}

/// The windows of the streams whose JavaScript loop runs, by the id it pushes
/// to. Weak: the task's `ChunkReader` owns the window, so a window whose task
/// ended is gone even before its loop says it stopped.
#[derive(Default)]
struct StreamTable {
  next_id: AtomicU32,
  open: Mutex<HashMap<u32, Weak<StreamWindow>>>,
}

impl StreamTable {
  fn insert(&self, window: &Arc<StreamWindow>) -> u32 {
    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
    self.open.lock().insert(id, Arc::downgrade(window));
    id
  }

  fn get(&self, id: u32) -> Option<Arc<StreamWindow>> {
    self.open.lock().get(&id).and_then(Weak::upgrade)
  }

  fn remove(&self, id: u32) -> Option<Arc<StreamWindow>> {
    self
      .open
      .lock()
      .remove(&id)
      .and_then(|window| window.upgrade())
  }

  /// `native`: `push(streamId, text, count)` answers the credit left,
  /// `end(streamId, failure)` says the loop stopped (once, however it
  /// stopped), and `settle(callId, value, error)` answers a provider call;
  /// `chunkIsValid(chunk)` is the check generated from `CompletionChunk`
  /// (src/shape.rs).
  /// Plain synchronous calls on the JavaScript thread: a lock and a copy, no
  /// wake-up of their own. `push` and `settle` take positional arguments: they
  /// are called per batch and per task, and an object would cost a lookup per field.
  fn native<'env>(
    self: &Arc<Self>,
    calls: &Arc<PendingCalls>,
    env: &'env Env,
  ) -> napi::Result<Object<'env>> {
    let mut native = Object::new(env)?;
    let pending = Arc::clone(calls);
    let settle = env
      .create_function_from_closure::<FnArgs<(u32, Option<String>, Option<String>)>, _, _>(
        "settle",
        move |call| {
          let (id, value, error): (u32, Option<String>, Option<String>) = call.args()?;
          pending.settle(id, error.map_or(Ok(value), Err));
          Ok(())
        },
      )?;
    native.set_named_property("settle", settle)?;
    let pending = Arc::clone(calls);
    let traced = env.create_function_from_closure::<FnArgs<(u32, String, Option<String>)>, _, _>(
      "traced",
      move |call| {
        let (id, traceparent, tracestate): (u32, String, Option<String>) = call.args()?;
        Ok(pending.traced(id, &traceparent, tracestate.as_deref()))
      },
    )?;
    native.set_named_property("traced", traced)?;
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
    let end = env.create_function_from_closure::<FnArgs<(u32, Option<String>)>, _, _>(
      "end",
      move |call| {
        let (id, failure): (u32, Option<String>) = call.args()?;
        if let Some(window) = table.remove(id) {
          window.finish(failure.map_or(End::Done, End::Failed));
        }
        Ok(())
      },
    )?;
    native.set_named_property("end", end)?;
    native.set_named_property("flushBytes", FLUSH_BYTES as u32)?;
    // What provider_bridge.js checks each yielded chunk with, compiled once.
    let shape = Shape::of::<CompletionChunk>()
      .map_err(|error| napi::Error::from_reason(format!("CompletionChunk's shape: {error}")))?;
    let check: Unknown = env.run_script(shape.js_check())?;
    native.set_named_property("chunkIsValid", check)?;
    Ok(native)
  }
}

/// The threadsafe functions of one registrar's bridge. All are weak: they
/// never keep Node alive by themselves (the `KeepAlive` does, while started).
pub struct JsBridge {
  complete: CompleteFn,
  open_stream: OpenStreamFn,
  credit: Arc<CreditFn>,
  streams: Arc<StreamTable>,
  calls: Arc<PendingCalls>,
  abort: AbortFn,
  end_span: EndSpanFn,
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
    let spans_factory: SpansFactory = env.run_script(SPANS)?;
    // Where `@opentelemetry/api` is looked for first (spans.js); absent on a
    // Node that cannot say, which then falls back to the main module and cwd.
    let addon_url = env
      .get_module_file_name()
      .ok()
      .filter(|url| !url.is_empty());
    // `Object` is a handle (Copy): both halves get the same `native`.
    let spans = spans_factory.call(FnArgs::from((addon_url, native)))?;
    let object = factory.call(FnArgs::from((logger, on_state_change, native, spans)))?;
    let bridge = JsBridge {
      complete: weak_function(&object, "complete")?,
      open_stream: weak_function(&object, "openStream")?,
      credit: Arc::new(weak_function(&object, "credit")?),
      streams,
      calls,
      abort: weak_function(&object, "abort")?,
      end_span: weak_function(&object, "endSpan")?,
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
      let line = LogLine {
        level,
        message,
        fields_json: Value::Object(fields).to_string(),
      };
      bridge
        .log
        .call(line, ThreadsafeFunctionCallMode::NonBlocking);
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

  /// Calls `function` (`complete` or `openStream`) with the call `make`
  /// builds for a fresh call id, and waits for its `settle`: the value's JSON
  /// text, if it has one.
  async fn call_provider<T: 'static + JsValuesTupleIntoVec>(
    &self,
    function: &ThreadsafeFunction<T, Unknown<'static>, T, Status, false, true>,
    what: &str,
    trace: Arc<TaskTrace>,
    make: impl FnOnce(u32) -> T,
  ) -> Result<Option<String>, ProviderFailure> {
    let mut pending = self.calls.open(trace);
    let status = function.call(make(pending.id), ThreadsafeFunctionCallMode::NonBlocking);
    if status != Status::Ok {
      return Err(ProviderFailure(format!(
        "provider.{what}: cannot call into JavaScript: {status}"
      )));
    }
    let settled = (&mut pending.receiver).await.map_err(|_| {
      ProviderFailure(format!(
        "provider.{what}: the JavaScript side went away without answering"
      ))
    })?;
    settled.map_err(ProviderFailure)
  }

  /// A window for a stream whose loop runs in JavaScript: its wake-ups are
  /// `credit` calls, and `native.push` finds it by the id answered.
  fn open_window(&self) -> (u32, Arc<StreamWindow>) {
    let credit = Arc::clone(&self.credit);
    let id_cell = Arc::new(AtomicU32::new(u32::MAX));
    let id_for_wake = Arc::clone(&id_cell);
    let wake: WakeProducer = Arc::new(move |value| {
      let grant = CreditGrant {
        stream_id: id_for_wake.load(Ordering::Relaxed),
        credit: value,
      };
      credit.call(grant, ThreadsafeFunctionCallMode::NonBlocking);
    });
    let window = Arc::new(StreamWindow::new(WINDOW, wake));
    let id = self.streams.insert(&window);
    id_cell.store(id, Ordering::Relaxed);
    (id, window)
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
    let provider = self.name.clone();
    let arrived_at = call.trace.arrived_ms();
    Box::pin(async move {
      let text = bridge
        .call_provider(&bridge.complete, "complete", call.trace, |call_id| {
          FnArgs::from((provider, call.task_id, call.options, call_id, arrived_at))
        })
        .await?
        .ok_or_else(|| ProviderFailure("provider.complete: no value".to_owned()))?;
      // A lone surrogate from JavaScript becomes U+FFFD, as in a streamed chunk.
      serde_json::from_str(&text)
        .or_else(|error| match crate::wire::replace_lone_surrogates(&text) {
          Some(repaired) => serde_json::from_str(&repaired),
          None => Err(error),
        })
        .map_err(|error| ProviderFailure(format!("provider.complete: unreadable value: {error}")))
    })
  }

  fn stream(&self, call: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
    let bridge = Arc::clone(&self.bridge);
    let provider = self.name.clone();
    let arrived_at = call.trace.arrived_ms();
    Box::pin(async move {
      let (stream_id, window) = bridge.open_window();
      let credit = window.initial_credit();
      // The reader owns the window from here: a failed open drops it.
      let reader = ChunkReader::new(window);
      let opened = bridge
        .call_provider(&bridge.open_stream, "stream", call.trace, |call_id| {
          FnArgs::from((
            provider,
            call.task_id,
            call.options,
            call_id,
            arrived_at,
            stream_id,
            credit,
          ))
        })
        .await;
      if opened.is_err() {
        bridge.streams.remove(stream_id);
      }
      opened.map(|_| reader)
    })
  }

  fn abort(&self, task_id: &str, reason: AbortReason) {
    let abort = Abort {
      task_id: task_id.to_owned(),
      reason: reason.describe().to_owned(),
      timed_out: reason == AbortReason::TimedOut,
    };
    self
      .bridge
      .abort
      .call(abort, ThreadsafeFunctionCallMode::NonBlocking);
  }

  fn span_ended(&self, task_id: &str, end: SpanEnd) {
    let Ok(end_json) = serde_json::to_string(&end) else {
      return;
    };
    let ended = SpanEnded {
      task_id: task_id.to_owned(),
      end_json,
    };
    self
      .bridge
      .end_span
      .call(ended, ThreadsafeFunctionCallMode::NonBlocking);
  }
}
