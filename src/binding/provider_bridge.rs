//! The JavaScript side of the registrar: `ProviderBridge` implements the core's
//! `Provider` trait over an `LlmProvider`, and the logger and `onStateChange`
//! callbacks are reached the same way, all through threadsafe functions into
//! the functions of provider_bridge.js.

use std::sync::Arc;

use napi::bindgen_prelude::{
  FnArgs, Function, FunctionRef, JsObjectValue, Object, Promise, Unknown,
};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::logging::LogSink;
use crate::provider::{
  AbortReason, BoxFuture, ChunkSource, Provider, ProviderCall, ProviderFailure,
};
use crate::registrar::{RegistrarStatus, StatusObserver};

const SOURCE: &str = include_str!("provider_bridge.js");

type TaskArgs = FnArgs<(String, String, String)>;
type AbortArgs = FnArgs<(String, String, bool)>;
type LogArgs = FnArgs<(String, String, String)>;
/// `complete(name, taskId, optionsJson)` and `openStream(…)`: resolve to a JSON reply.
type TaskFn = ThreadsafeFunction<TaskArgs, Promise<String>, TaskArgs, Status, false, true>;
/// `next(taskId)`: resolves to a JSON reply.
type NextFn = ThreadsafeFunction<String, Promise<String>, String, Status, false, true>;
/// `abort(taskId, reason, timedOut)`.
type AbortFn = ThreadsafeFunction<AbortArgs, Unknown<'static>, AbortArgs, Status, false, true>;
/// `log(level, message, fieldsJson)`.
type LogFn = ThreadsafeFunction<LogArgs, Unknown<'static>, LogArgs, Status, false, true>;
/// `stateChange(statusJson)`.
type StateFn = ThreadsafeFunction<String, Unknown<'static>, String, Status, false, true>;
/// A strong reference that keeps Node's event loop alive while the registrar runs.
pub type KeepAlive = ThreadsafeFunction<(), Unknown<'static>, (), Status, false, false>;
pub type KeepAliveSource = FunctionRef<(), Unknown<'static>>;
/// provider_bridge.js evaluates to `createProviderBridge(logger, onStateChange)`.
type BridgeFactory<'env> =
  Function<'env, FnArgs<(Option<Object<'env>>, Option<Function<'env>>)>, Object<'env>>;

/// The threadsafe functions of one registrar's bridge. All are weak: they
/// never keep Node alive by themselves (the `KeepAlive` does, while started).
pub struct JsBridge {
  complete: TaskFn,
  open_stream: TaskFn,
  next: NextFn,
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
    let object = factory.call(FnArgs::from((logger, on_state_change)))?;
    let bridge = JsBridge {
      complete: weak_function(&object, "complete")?,
      open_stream: weak_function(&object, "openStream")?,
      next: weak_function(&object, "next")?,
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
      if let Ok(json) = serde_json::to_string(&status) {
        bridge
          .state_change
          .call(json, ThreadsafeFunctionCallMode::NonBlocking);
      }
    })
  }

  async fn call_task(
    &self,
    function: &TaskFn,
    what: &str,
    args: (String, String, String),
  ) -> Result<Reply, ProviderFailure> {
    let context =
      |error: napi::Error| ProviderFailure(format!("provider.{what}: {}", error.reason));
    let promise = function
      .call_async_catch(FnArgs::from(args))
      .await
      .map_err(context)?;
    let text = promise.await.map_err(context)?;
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
  done: bool,
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
      let reply = bridge.call_task(&bridge.complete, "complete", args).await?;
      Ok(reply.value)
    })
  }

  fn stream(
    &self,
    call: ProviderCall,
  ) -> BoxFuture<'static, Result<Box<dyn ChunkSource>, ProviderFailure>> {
    let bridge = Arc::clone(&self.bridge);
    let task_id = call.task_id.clone();
    let args = (self.name.clone(), call.task_id, call.options.to_string());
    Box::pin(async move {
      bridge
        .call_task(&bridge.open_stream, "stream", args)
        .await?;
      Ok(Box::new(JsChunkSource { bridge, task_id }) as Box<dyn ChunkSource>)
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

struct JsChunkSource {
  bridge: Arc<JsBridge>,
  task_id: String,
}

impl ChunkSource for JsChunkSource {
  fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Value>, ProviderFailure>> {
    Box::pin(async move {
      let context =
        |error: napi::Error| ProviderFailure(format!("provider.stream: {}", error.reason));
      let promise = self
        .bridge
        .next
        .call_async_catch(self.task_id.clone())
        .await
        .map_err(context)?;
      let reply = Reply::decode(&promise.await.map_err(context)?, "stream")?;
      Ok((!reply.done).then_some(reply.value))
    })
  }
}
