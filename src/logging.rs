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

/// A span's own fields, added to every event inside it.
struct SpanFields(Map<String, Value>);

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
    let mut visitor = Fields::default();
    attributes.record(&mut visitor);
    let mut extensions = span.extensions_mut();
    if attributes.metadata().name() == SPAN_NAME {
      if let Some(registrar) = visitor.fields.remove(SPAN_FIELD).and_then(|id| id.as_u64()) {
        extensions.insert(RegistrarId(registrar));
      }
    }
    extensions.insert(SpanFields(visitor.fields));
  }

  fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
    let Some(span) = ctx.span(id) else {
      return;
    };
    let mut visitor = Fields::default();
    values.record(&mut visitor);
    let mut extensions = span.extensions_mut();
    if let Some(fields) = extensions.get_mut::<SpanFields>() {
      fields.0.extend(visitor.fields);
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
          span_fields.extend(fields.0.clone());
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
    match route.and_then(|route| route.sink.clone()) {
      Some(sink) => {
        drop(routes);
        sink(level, message, fields);
      }
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
