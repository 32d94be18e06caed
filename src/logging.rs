//! Logging: every registrar logs through `tracing` inside its own span; one
//! process-wide layer routes each event to that registrar's sink (the `logger`
//! option) or, only when it has none, to stderr, filtered by `MCPCTL_LOG` and
//! with the token redacted. A line's fields are its event's and its enclosing
//! spans', named in camelCase as JavaScript's logs name them (`task_id` is
//! `taskId`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::secret::Secret;

/// The span name and field that tie events to a registrar.
pub const SPAN_NAME: &str = "registrar";
const SPAN_FIELD: &str = "registrar";
const OWN_TARGET: &str = "mcpctl_registrar";

/// Where one registrar's log lines go: `(level, message, fields)`.
pub type LogSink = Arc<dyn Fn(Level, String, Map<String, Value>) + Send + Sync>;

struct Route {
  sink: Option<LogSink>,
  level: Level,
  token: Option<Secret>,
}

#[derive(Default)]
struct Routes {
  by_registrar: HashMap<u64, Route>,
}

/// The most verbose level any route (or, outside every registrar, `MCPCTL_LOG`
/// as read when the last registrar was made) takes, as `level_rank`: an event
/// below it is dropped at its call site, before its fields or its spans' are
/// gathered. Most events are `debug!`s on the task path that no route wants.
static MAX_EVENT_RANK: AtomicUsize = AtomicUsize::new(0);

/// 1 (error) to 5 (trace); 0 lets nothing through.
fn level_rank(level: Level) -> usize {
  match level {
    Level::ERROR => 1,
    Level::WARN => 2,
    Level::INFO => 3,
    Level::DEBUG => 4,
    Level::TRACE => 5,
  }
}

/// Recomputes [`MAX_EVENT_RANK`] from the routes (under their lock).
fn update_max_rank(routes: &Routes) {
  let unrouted = level_from_env(Some(Level::WARN)).map_or(0, level_rank);
  let max = routes
    .by_registrar
    .values()
    .map(|route| level_rank(route.level))
    .fold(unrouted, usize::max);
  MAX_EVENT_RANK.store(max, Ordering::Relaxed);
}

fn routes() -> &'static RwLock<Routes> {
  static ROUTES: OnceLock<RwLock<Routes>> = OnceLock::new();
  ROUTES.get_or_init(Default::default)
}

/// The level `MCPCTL_LOG` asks for (`error`, `warn`, `info`, `debug`, `trace`;
/// `off` mutes), else `default`.
pub fn level_from_env(default: Option<Level>) -> Option<Level> {
  match std::env::var("MCPCTL_LOG").ok().as_deref().map(str::trim) {
    Some(value) if value.eq_ignore_ascii_case("off") || value.eq_ignore_ascii_case("silent") => {
      None
    }
    Some(value) => value.parse::<Level>().ok().or(default),
    None => default,
  }
}

/// The registration of one registrar's route; dropping it removes the route.
pub struct LogRoute {
  id: u64,
  span: tracing::Span,
}

impl LogRoute {
  /// Installs the process-wide layer (once) and a route for a new registrar.
  /// Without a sink, warnings and errors go to stderr.
  pub fn register(sink: Option<LogSink>, token: Option<Secret>) -> Self {
    install();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let default = if sink.is_some() {
      Level::INFO
    } else {
      Level::WARN
    };
    // `None` from the env mutes the registrar: ERROR-only sink that is never called.
    let (level, sink) = match level_from_env(Some(default)) {
      Some(level) => (level, sink),
      None => (Level::ERROR, Some(Arc::new(|_, _, _| {}) as LogSink)),
    };
    {
      let mut routes = routes().write();
      routes.by_registrar.insert(id, Route { sink, level, token });
      update_max_rank(&routes);
    }
    let span = tracing::info_span!(target: "mcpctl_registrar", "registrar", registrar = id);
    Self { id, span }
  }

  pub fn span(&self) -> tracing::Span {
    self.span.clone()
  }

  /// Adds the token once it is known (after reading credentials).
  pub fn set_token(&self, token: Secret) {
    if let Some(route) = routes().write().by_registrar.get_mut(&self.id) {
      route.token = Some(token);
    }
  }
}

impl Drop for LogRoute {
  fn drop(&mut self) {
    let mut routes = routes().write();
    routes.by_registrar.remove(&self.id);
    update_max_rank(&routes);
  }
}

fn install() {
  static INSTALLED: OnceLock<()> = OnceLock::new();
  INSTALLED.get_or_init(|| {
    let subscriber = tracing_subscriber::registry().with(RouteLayer);
    // Another subscriber already installed (an embedding program's) keeps its place.
    let _ = tracing::subscriber::set_global_default(subscriber);
  });
}

/// Marks a span as a registrar's, with its route id.
struct RegistrarId(u64);

/// A span's own fields, added to every event inside it, in the order
/// recorded (a later record of a name replaces its value).
struct SpanFields(Vec<(&'static str, SpanValue)>);

/// A span field's value as recorded, turned into JSON only when an event in
/// the span is routed.
#[derive(Debug, Clone, PartialEq)]
enum SpanValue {
  Text(String),
  I64(i64),
  U64(u64),
  F64(f64),
  Bool(bool),
}

impl SpanValue {
  fn as_u64(&self) -> Option<u64> {
    match *self {
      SpanValue::U64(value) => Some(value),
      SpanValue::I64(value) => u64::try_from(value).ok(),
      _ => None,
    }
  }

  fn to_json(&self) -> Value {
    match self {
      SpanValue::Text(text) => Value::String(text.clone()),
      SpanValue::I64(value) => Value::from(*value),
      SpanValue::U64(value) => Value::from(*value),
      SpanValue::F64(value) => Value::from(*value),
      SpanValue::Bool(value) => Value::from(*value),
    }
  }
}

/// Records a span's fields as [`SpanValue`]s under their static names.
#[derive(Default)]
struct SpanVisitor {
  fields: Vec<(&'static str, SpanValue)>,
}

impl SpanVisitor {
  fn take(&mut self, name: &str) -> Option<SpanValue> {
    let index = self.fields.iter().position(|(known, _)| *known == name)?;
    Some(self.fields.remove(index).1)
  }

  fn record(&mut self, field: &Field, value: SpanValue) {
    let name = field.name();
    match self.fields.iter_mut().find(|(known, _)| *known == name) {
      Some(slot) => slot.1 = value,
      None => self.fields.push((name, value)),
    }
  }
}

impl Visit for SpanVisitor {
  fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
    self.record(field, SpanValue::Text(format!("{value:?}")));
  }

  fn record_str(&mut self, field: &Field, value: &str) {
    self.record(field, SpanValue::Text(value.to_owned()));
  }

  fn record_i64(&mut self, field: &Field, value: i64) {
    self.record(field, SpanValue::I64(value));
  }

  fn record_u64(&mut self, field: &Field, value: u64) {
    self.record(field, SpanValue::U64(value));
  }

  fn record_f64(&mut self, field: &Field, value: f64) {
    self.record(field, SpanValue::F64(value));
  }

  fn record_bool(&mut self, field: &Field, value: bool) {
    self.record(field, SpanValue::Bool(value));
  }
}

struct RouteLayer;

impl<S> Layer<S> for RouteLayer
where
  S: Subscriber + for<'a> LookupSpan<'a>,
{
  fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
    if !metadata.target().starts_with(OWN_TARGET) {
      Interest::never()
    } else if metadata.is_span() {
      // Spans are always kept: they carry the route and the fields of the events
      // inside them, whatever level those come at.
      Interest::always()
    } else {
      // Asked per event (`enabled` below), since the routes' levels change.
      Interest::sometimes()
    }
  }

  fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
    metadata.is_span() || level_rank(*metadata.level()) <= MAX_EVENT_RANK.load(Ordering::Relaxed)
  }

  fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
    let Some(span) = ctx.span(id) else {
      return;
    };
    // Runs for every task's span: the values are kept raw under their
    // callsite's `&'static` names; a `Map` (and camelCase) is built only for
    // an event a route takes.
    let mut visitor = SpanVisitor::default();
    attributes.record(&mut visitor);
    let mut extensions = span.extensions_mut();
    if attributes.metadata().name() == SPAN_NAME {
      if let Some(registrar) = visitor.take(SPAN_FIELD).and_then(|value| value.as_u64()) {
        extensions.insert(RegistrarId(registrar));
      }
    }
    if !visitor.fields.is_empty() {
      extensions.insert(SpanFields(visitor.fields));
    }
  }

  fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
    let Some(span) = ctx.span(id) else {
      return;
    };
    let mut visitor = SpanVisitor::default();
    values.record(&mut visitor);
    let mut extensions = span.extensions_mut();
    match extensions.get_mut::<SpanFields>() {
      Some(fields) => {
        for (name, value) in visitor.fields {
          match fields.0.iter_mut().find(|(known, _)| *known == name) {
            Some(slot) => slot.1 = value,
            None => fields.0.push((name, value)),
          }
        }
      }
      None if !visitor.fields.is_empty() => extensions.insert(SpanFields(visitor.fields)),
      None => {}
    }
  }

  fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
    // The registrar the event belongs to (the outermost registrar span), and
    // whether its route takes the event's level, before anything is copied.
    let registrar = ctx.event_scope(event).and_then(|scope| {
      scope
        .from_root()
        .find_map(|span| span.extensions().get::<RegistrarId>().map(|id| id.0))
    });
    let level = *event.metadata().level();
    let routes = routes().read();
    let route = registrar.and_then(|id| routes.by_registrar.get(&id));
    let enabled = route.map_or(
      level_from_env(Some(Level::WARN)).is_some_and(|max| level <= max),
      |route| level <= route.level,
    );
    if !enabled {
      return;
    }
    // The fields of the spans the event is in, outermost first, so that an
    // inner span's value wins.
    let mut span_fields = Map::new();
    if let Some(scope) = ctx.event_scope(event) {
      for span in scope.from_root() {
        if let Some(fields) = span.extensions().get::<SpanFields>() {
          for (name, value) in &fields.0 {
            span_fields.insert((*name).to_owned(), value.to_json());
          }
        }
      }
    }
    let mut visitor = Fields::default();
    event.record(&mut visitor);
    span_fields.extend(std::mem::take(&mut visitor.fields));
    visitor.fields = span_fields
      .into_iter()
      .map(|(key, value)| (camel_case(&key), value))
      .collect();
    let token = route.and_then(|route| route.token.as_ref());
    // The one redaction step (secret.rs) for every message and string field.
    let redact = |text: String| match token {
      Some(token) => token.redact(&text),
      None => crate::secret::redact(&text),
    };
    let message = redact(visitor.message);
    let fields: Map<String, Value> = visitor
      .fields
      .into_iter()
      .map(|(key, value)| match value {
        Value::String(text) => (key, Value::String(redact(text))),
        other => (key, other),
      })
      .collect();
    // The routes' lock is let go before the line is written: a JavaScript logger
    // or a full stderr pipe must not hold it while the main thread waits to add
    // or drop a route.
    let sink = route.and_then(|route| route.sink.clone());
    drop(routes);
    match sink {
      Some(sink) => sink(level, message, fields),
      None => eprintln!("{}", stderr_line(level, &message, &fields)),
    }
  }
}

/// `task_id` as `taskId`: the field names JavaScript's logs use.
fn camel_case(name: &str) -> String {
  let mut out = String::with_capacity(name.len());
  let mut upper = false;
  for c in name.chars() {
    if c == '_' {
      upper = !out.is_empty();
    } else if upper {
      out.extend(c.to_uppercase());
      upper = false;
    } else {
      out.push(c);
    }
  }
  out
}

fn stderr_line(level: Level, message: &str, fields: &Map<String, Value>) -> String {
  let mut line = format!("[mcpctl-registrar] {level} {message}");
  for (key, value) in fields {
    let _ = match value {
      Value::String(text) => write!(line, " {key}={text:?}"),
      other => write!(line, " {key}={other}"),
    };
  }
  line
}

#[derive(Default)]
struct Fields {
  message: String,
  fields: Map<String, Value>,
}

impl Visit for Fields {
  fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
    self.record_value(field, Value::String(format!("{value:?}")));
  }

  fn record_str(&mut self, field: &Field, value: &str) {
    self.record_value(field, Value::String(value.to_owned()));
  }

  fn record_i64(&mut self, field: &Field, value: i64) {
    self.record_value(field, Value::from(value));
  }

  fn record_u64(&mut self, field: &Field, value: u64) {
    self.record_value(field, Value::from(value));
  }

  fn record_f64(&mut self, field: &Field, value: f64) {
    self.record_value(field, Value::from(value));
  }

  fn record_bool(&mut self, field: &Field, value: bool) {
    self.record_value(field, Value::from(value));
  }
}

impl Fields {
  fn record_value(&mut self, field: &Field, value: Value) {
    if field.name() == "message" {
      self.message = match value {
        Value::String(text) => text,
        other => other.to_string(),
      };
    } else {
      self.fields.insert(field.name().to_owned(), value);
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use parking_lot::Mutex;

  #[test]
  fn routes_events_to_their_registrar_and_redacts_the_token() {
    type Line = (Level, String, Map<String, Value>);
    let seen: Arc<Mutex<Vec<Line>>> = Arc::default();
    let captured = Arc::clone(&seen);
    let route = LogRoute::register(
      Some(Arc::new(move |level, message, fields| {
        captured.lock().push((level, message, fields))
      })),
      Some(Secret::new("sk-live-123")),
    );
    route.span().in_scope(|| {
      tracing::info!(
        status = 401,
        body = "token sk-live-123 refused",
        url = "http://evil.example/?t=sk%2Dlive%2D123",
        sent = "authorization: Bearer anything-else",
        "register failed for sk-live-123"
      );
      tracing::trace!("below the level");
    });
    tracing::info!("outside any registrar");
    let seen = seen.lock();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (level, message, fields) = &seen[0];
    assert_eq!(*level, Level::INFO);
    assert_eq!(message, "register failed for ***");
    assert_eq!(fields["status"], Value::from(401));
    assert_eq!(fields["body"], Value::from("token *** refused"));
    assert_eq!(fields["url"], Value::from("http://evil.example/?t=***"));
    assert_eq!(fields["sent"], Value::from("authorization: ***"));
  }

  #[test]
  fn lines_carry_the_spans_fields_in_camel_case() {
    type Line = (String, Map<String, Value>);
    let seen: Arc<Mutex<Vec<Line>>> = Arc::default();
    let captured = Arc::clone(&seen);
    let route = LogRoute::register(
      Some(Arc::new(move |_, message, fields| {
        captured.lock().push((message, fields))
      })),
      None,
    );
    route.span().in_scope(|| {
      let task = tracing::info_span!(target: "mcpctl_registrar", "task", task_id = "t-1", provider = "local");
      task.in_scope(|| tracing::info!(duration_ms = 12, provider = "inner", "task answered"));
    });
    let seen = seen.lock();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (message, fields) = &seen[0];
    assert_eq!(message, "task answered");
    assert_eq!(fields["taskId"], Value::from("t-1"));
    assert_eq!(fields["durationMs"], Value::from(12));
    assert_eq!(fields["provider"], Value::from("inner"));
    assert!(!fields.contains_key("registrar"), "{fields:?}");
    assert!(!fields.contains_key("task_id"), "{fields:?}");
  }

  #[test]
  fn fields_recorded_on_a_span_later_reach_its_events() {
    type Line = (String, Map<String, Value>);
    let seen: Arc<Mutex<Vec<Line>>> = Arc::default();
    let captured = Arc::clone(&seen);
    let route = LogRoute::register(
      Some(Arc::new(move |_, message, fields| {
        captured.lock().push((message, fields))
      })),
      None,
    );
    route.span().in_scope(|| {
      let task = tracing::info_span!(
        target: "mcpctl_registrar",
        "task",
        task_id = "t-1",
        model_name = tracing::field::Empty,
        attempts = 1u64
      );
      task.in_scope(|| tracing::info!("before"));
      task.record("model_name", "qwen");
      task.record("attempts", 2u64);
      task.in_scope(|| tracing::info!(ok = true, ratio = 0.5, delta = -3i64, "after"));
    });
    let seen = seen.lock();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (message, before) = &seen[0];
    assert_eq!(message, "before");
    assert_eq!(before["taskId"], Value::from("t-1"));
    assert_eq!(before["attempts"], Value::from(1u64));
    assert!(!before.contains_key("modelName"), "{before:?}");
    let (message, after) = &seen[1];
    assert_eq!(message, "after");
    assert_eq!(after["taskId"], Value::from("t-1"));
    assert_eq!(after["modelName"], Value::from("qwen"));
    assert_eq!(after["attempts"], Value::from(2u64));
    assert_eq!(after["ok"], Value::from(true));
    assert_eq!(after["ratio"], Value::from(0.5));
    assert_eq!(after["delta"], Value::from(-3i64));
    assert!(!after.contains_key("registrar"), "{after:?}");
  }

  #[test]
  fn names_become_camel_case() {
    assert_eq!(camel_case("task_id"), "taskId");
    assert_eq!(camel_case("provider_session_id"), "providerSessionId");
    assert_eq!(camel_case("status"), "status");
    assert_eq!(camel_case("_private"), "private");
  }

  #[test]
  fn stderr_lines_carry_the_fields() {
    let mut fields = Map::new();
    fields.insert("status".into(), Value::from(503));
    fields.insert("error".into(), Value::from("down"));
    assert_eq!(
      stderr_line(Level::WARN, "register failed", &fields),
      "[mcpctl-registrar] WARN register failed error=\"down\" status=503"
    );
  }
}
