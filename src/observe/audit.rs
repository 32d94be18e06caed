//! The audit log (the `audit` option): one JSON line per task that reached the
//! registrar, written when it ended (API.md `AuditRecord`). No prompt or answer
//! text unless `content: true`; never the token.
//!
//! A task only hands its record to a bounded queue (`try_send`; bounded in
//! lines, and with content in text bytes: a full queue drops the line and counts
//! it); one writer thread per registrar encodes, redacts and appends, so a slow
//! or full disk never slows a task. `close()` (from `stop()`)
//! lets the writer drain the queue and sync the file, waiting a bounded time.

mod file;

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

pub use self::file::{AuditSink, RotatingFile};
use crate::error::describe;
use crate::observe::{TaskObserver, TaskRecord};
use crate::owner::usage::iso_time;
use crate::secret::Secret;

/// The file's name in the config dir when `audit.path` is not given.
pub const DEFAULT_FILE_NAME: &str = "audit.jsonl";
/// `audit.maxBytes`'s default: 10 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// `audit.keep`'s default.
pub const DEFAULT_KEEP: u32 = 5;
/// Lines waiting for the writer. A record is small without content.
pub const QUEUE_LINES: usize = 1024;
/// With content a record holds the request's messages, which may be large: the
/// text waiting for the writer is bounded too (counted as the strings' bytes).
pub const QUEUE_TEXT_BYTES: usize = 64 * 1024 * 1024;

/// How much may wait for the writer before lines are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBounds {
  pub lines: usize,
  /// The bytes of the strings in the records' messages and content.
  pub text_bytes: usize,
}

impl Default for QueueBounds {
  fn default() -> Self {
    Self {
      lines: QUEUE_LINES,
      text_bytes: QUEUE_TEXT_BYTES,
    }
  }
}
/// How long `close()` waits for the writer to drain the queue and sync the file.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// At most one warning about dropped lines this often (plus one at close for
/// any not yet reported).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The `audit` option, checked and with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
  pub path: PathBuf,
  pub max_bytes: u64,
  pub keep: u32,
  /// Whether lines carry the request's messages and the answer's text.
  pub content: bool,
}

/// One line of the audit log (camelCase; times in ms, `time` as ISO 8601). No line
/// for a refused task id or a replay. The package may add fields.
#[napi(object, object_from_js = false, object_to_js = false)]
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
  /// When the task ended (`Date.prototype.toISOString`'s form).
  pub time: String,
  pub task_id: String,
  /// The served provider's name, or "(unknown)".
  pub provider: String,
  /// mcpd's id for the caller, when it sent one.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub caller_id: Option<String>,
  /// The OpenAI request's `model`.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub request_model: Option<String>,
  /// The model the provider's answer named.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub response_model: Option<String>,
  pub stream: bool,
  #[napi(ts_type = "'completed' | 'failed' | 'cancelled'")]
  pub outcome: &'static str,
  /// The HTTP status posted to mcpd (200 for a stream that began); 0 when none was.
  pub status: u16,
  /// Why the owner's controls refused the task (`usage().refused`'s names).
  #[serde(skip_serializing_if = "Option::is_none")]
  pub refused: Option<&'static str>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub prompt_tokens: Option<u64>,
  #[napi(ts_type = "number")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub completion_tokens: Option<u64>,
  /// Time in the provider's queue.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub queue_ms: Option<f64>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub time_to_first_token_ms: Option<f64>,
  /// From the task's arrival at the registrar to its end.
  pub duration_ms: f64,
  /// The W3C trace id of mcpd's `traceparent`, when it sent a valid one.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub trace_id: Option<String>,
  /// The request's messages: only with `audit: { content: true }`.
  #[napi(ts_type = "unknown")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub messages: Option<Value>,
  /// The answer's text (null when it had none): only with `audit: { content: true }`.
  #[napi(ts_type = "string | null")]
  #[serde(skip_serializing_if = "Option::is_none")]
  pub content: Option<Option<String>>,
}

/// Milliseconds, to the microsecond.
fn millis(duration: Duration) -> f64 {
  duration.as_micros() as f64 / 1000.0
}

impl AuditRecord {
  /// The line for `record`; `content` adds its messages and text.
  pub fn new(record: &TaskRecord, content: bool) -> Self {
    Self {
      time: iso_time(record.time),
      task_id: record.task_id.clone(),
      provider: record.provider.clone(),
      caller_id: record.caller_id.clone(),
      request_model: record.request_model.clone(),
      response_model: record.response_model.clone(),
      stream: record.stream,
      outcome: record.outcome.as_str(),
      status: record.status,
      refused: record.refused.map(|reason| reason.as_str()),
      prompt_tokens: record.prompt_tokens,
      completion_tokens: record.completion_tokens,
      queue_ms: record.queue.map(millis),
      time_to_first_token_ms: record.time_to_first_token.map(millis),
      duration_ms: millis(record.duration),
      trace_id: record.trace_id.clone(),
      messages: if content {
        Some(record.messages.clone().unwrap_or(Value::Null))
      } else {
        None
      },
      content: content.then(|| record.content.clone()),
    }
  }

  /// The line, redacted, with its `\n`. Every string that is not the package's
  /// own (keys of `messages` too) is redacted before encoding rather than the
  /// encoded line after: redacting JSON text could cut through an escape (`\"`)
  /// and leave a line that no longer parses, and a token holding `"` or `\`
  /// would not be found in its escaped form.
  pub fn encode(mut self, token: Option<&Secret>, out: &mut Vec<u8>) -> serde_json::Result<()> {
    let redact = |text: &mut String| {
      let clean = match token {
        Some(token) => token.redact(text),
        None => crate::secret::redact(text),
      };
      if clean != *text {
        *text = clean;
      }
    };
    for text in [&mut self.task_id, &mut self.provider]
      .into_iter()
      .chain(self.caller_id.as_mut())
      .chain(self.request_model.as_mut())
      .chain(self.response_model.as_mut())
      .chain(self.trace_id.as_mut())
      .chain(self.content.as_mut().and_then(Option::as_mut))
    {
      redact(text);
    }
    if let Some(messages) = self.messages.as_mut() {
      redact_strings(messages, &redact);
    }
    serde_json::to_writer(&mut *out, &self)?;
    out.push(b'\n');
    Ok(())
  }
}

fn redact_strings(value: &mut Value, redact: &dyn Fn(&mut String)) {
  match value {
    Value::String(text) => redact(text),
    Value::Array(items) => items
      .iter_mut()
      .for_each(|item| redact_strings(item, redact)),
    Value::Object(map) => {
      let keys_clean = map.keys().all(|key| {
        let mut copy = key.clone();
        redact(&mut copy);
        copy == *key
      });
      if keys_clean {
        map
          .values_mut()
          .for_each(|item| redact_strings(item, redact));
      } else {
        for (mut key, mut item) in std::mem::take(map) {
          redact(&mut key);
          redact_strings(&mut item, redact);
          map.insert(key, item);
        }
      }
    }
    Value::Null | Value::Bool(_) | Value::Number(_) => {}
  }
}

/// Counts dropped lines and warns about them, at most once per `WARN_EVERY`.
struct DropReport {
  dropped: Arc<AtomicU64>,
  /// The count at the last warning.
  reported: AtomicU64,
  /// Why the last line was dropped, for the next warning.
  last_reason: Mutex<Cow<'static, str>>,
  last_warning: Mutex<Option<Instant>>,
  span: tracing::Span,
}

impl DropReport {
  fn drop_line(&self, why: Cow<'static, str>) {
    self.dropped.fetch_add(1, Ordering::Relaxed);
    *self.last_reason.lock() = why;
    self.warn_if_due(false);
  }

  /// Warns about the lines dropped since the last warning, when there are any
  /// and the last warning is old enough (or `now`). Never waits for the lock: a
  /// task that drops a line must not wait for another's warning.
  fn warn_if_due(&self, now: bool) {
    let total = self.dropped.load(Ordering::Relaxed);
    if total == self.reported.load(Ordering::Relaxed) {
      return;
    }
    let Some(mut last) = self.last_warning.try_lock() else {
      return;
    };
    let at = Instant::now();
    if !now && last.is_some_and(|last| at.duration_since(last) < WARN_EVERY) {
      return;
    }
    *last = Some(at);
    let since = total - self.reported.swap(total, Ordering::Relaxed);
    let why = self.last_reason.lock().clone();
    self.span.in_scope(|| {
      tracing::warn!(
        dropped = since,
        dropped_total = total,
        "audit log: {since} line(s) dropped, the last because {why}"
      )
    });
  }
}

/// What the writer thread is told: a record and the text bytes it holds.
struct Line {
  record: Box<AuditRecord>,
  text_bytes: usize,
}

/// The bytes of every string in `value` (keys too): what a record with content
/// holds beyond its fixed fields.
fn text_bytes(value: &Value) -> usize {
  match value {
    Value::String(text) => text.len(),
    Value::Array(items) => items.iter().map(text_bytes).sum(),
    Value::Object(map) => map
      .iter()
      .map(|(key, item)| key.len() + text_bytes(item))
      .sum(),
    Value::Null | Value::Bool(_) | Value::Number(_) => 0,
  }
}

/// The audit log: a `TaskObserver` that queues each ended task's line for its
/// writer thread.
pub struct AuditLog {
  content: bool,
  /// `None` once closed.
  queue: Mutex<Option<SyncSender<Line>>>,
  /// Text bytes queued (`text_budget` at most); the writer takes off what it wrote.
  queued_text: Arc<AtomicUsize>,
  text_budget: usize,
  /// The writer's "drained and synced", taken by `close()`.
  finished: Mutex<Option<Receiver<()>>>,
  report: Arc<DropReport>,
}

impl AuditLog {
  /// Opens the file (see `RotatingFile::open`) and starts the writer. When the
  /// file cannot be had (a symlink, a directory, an unwritable directory) it warns
  /// in `span` and answers `None`: no audit, and the registrar serves on.
  /// `dropped` counts the lines that never reached the file.
  pub fn open(
    config: &AuditConfig,
    token: Option<Secret>,
    dropped: Arc<AtomicU64>,
    span: tracing::Span,
  ) -> Option<Self> {
    match RotatingFile::open(&config.path, config.max_bytes, config.keep) {
      Ok(file) => Some(Self::with_sink(
        Box::new(file),
        config.content,
        QueueBounds::default(),
        token,
        dropped,
        span,
      )),
      Err(error) => {
        span.in_scope(|| {
          tracing::warn!(
            path = %config.path.display(),
            error = %describe(&error),
            "audit log disabled: cannot write the audit file; the registrar serves on without it"
          )
        });
        None
      }
    }
  }

  /// The audit log over any sink (tests inject a full or a slow disk), with a
  /// queue within `bounds`.
  pub fn with_sink(
    sink: Box<dyn AuditSink>,
    content: bool,
    bounds: QueueBounds,
    token: Option<Secret>,
    dropped: Arc<AtomicU64>,
    span: tracing::Span,
  ) -> Self {
    let report = Arc::new(DropReport {
      dropped,
      reported: AtomicU64::new(0),
      last_reason: Mutex::new(Cow::Borrowed("")),
      last_warning: Mutex::new(None),
      span,
    });
    report
      .reported
      .store(report.dropped.load(Ordering::Relaxed), Ordering::Relaxed);
    let (queue, lines) = mpsc::sync_channel::<Line>(bounds.lines);
    let (done, finished) = mpsc::channel();
    let queued_text = Arc::new(AtomicUsize::new(0));
    let writer = Writer {
      sink,
      token,
      report: Arc::clone(&report),
      queued_text: Arc::clone(&queued_text),
    };
    let spawned = std::thread::Builder::new()
      .name("mcpctl-audit".to_owned())
      .spawn(move || writer.run(lines, done));
    let queue = match spawned {
      Ok(_) => Some(queue),
      Err(error) => {
        report.span.in_scope(
          || tracing::warn!(error = %error, "audit log disabled: cannot start its writer thread"),
        );
        None
      }
    };
    Self {
      content,
      queue: Mutex::new(queue),
      queued_text,
      text_budget: bounds.text_bytes,
      finished: Mutex::new(Some(finished)),
      report,
    }
  }

  /// Lets the writer write what is queued and sync the file, waiting at most
  /// `CLOSE_GRACE` (on a blocking thread, so the runtime is never held, and in
  /// real time, as a disk is). Later records are dropped. Idempotent.
  pub async fn close(&self) {
    drop(self.queue.lock().take());
    let Some(finished) = self.finished.lock().take() else {
      return;
    };
    let waited =
      tokio::task::spawn_blocking(move || finished.recv_timeout(CLOSE_GRACE).is_ok()).await;
    if !matches!(waited, Ok(true)) {
      self.report.span.in_scope(|| {
        tracing::warn!(
          "audit log: the writer did not finish within {} s; its last lines may be missing",
          CLOSE_GRACE.as_secs()
        )
      });
    }
  }
}

impl AuditLog {
  /// Queues `record`'s line, or says why not. The text is measured (a walk, no
  /// copy) before the record is copied, so a line over the budget costs little.
  fn enqueue(&self, record: &TaskRecord) -> Result<(), &'static str> {
    let text = if self.content {
      record.messages.as_ref().map_or(0, text_bytes)
        + record.content.as_ref().map_or(0, String::len)
    } else {
      0
    };
    let queue = self.queue.lock();
    let Some(queue) = queue.as_ref() else {
      return Err("the audit log was closed");
    };
    if text > 0 {
      let before = self.queued_text.fetch_add(text, Ordering::Relaxed);
      if before + text > self.text_budget {
        self.queued_text.fetch_sub(text, Ordering::Relaxed);
        return Err("the text waiting for the writer was over its bound");
      }
    }
    let line = Line {
      record: Box::new(AuditRecord::new(record, self.content)),
      text_bytes: text,
    };
    queue.try_send(line).map_err(|error| {
      self.queued_text.fetch_sub(text, Ordering::Relaxed);
      match error {
        TrySendError::Full(_) => "the writer's queue was full",
        TrySendError::Disconnected(_) => "the writer had stopped",
      }
    })
  }
}

impl TaskObserver for AuditLog {
  fn wants_content(&self) -> bool {
    self.content
  }

  fn task_ended(&self, record: &TaskRecord) {
    if let Err(why) = self.enqueue(record) {
      self.report.drop_line(Cow::Borrowed(why));
    }
  }
}

/// The writer thread's state.
struct Writer {
  sink: Box<dyn AuditSink>,
  /// The registrar's token, redacted even when the registrar is gone before
  /// its last lines are written.
  token: Option<Secret>,
  report: Arc<DropReport>,
  /// The log's count of queued text bytes, which the writer takes down.
  queued_text: Arc<AtomicUsize>,
}

/// The most lines, and about the most bytes, one write takes.
const BATCH_LINES: usize = 256;
const BATCH_BYTES: usize = 256 * 1024;
/// How long the writer lets lines gather after a write: a line reaches the file
/// at most this late, and at load the writer wakes once per this, not per line.
const LINGER: Duration = Duration::from_millis(5);

impl Writer {
  /// Encodes one line after those in `batch`, or counts it dropped.
  fn take(&mut self, line: Line, batch: &mut Vec<u8>, ends: &mut Vec<usize>) {
    let Line { record, text_bytes } = line;
    let start = batch.len();
    let encoded = record.encode(self.token.as_ref(), batch);
    self.queued_text.fetch_sub(text_bytes, Ordering::Relaxed);
    match encoded {
      Ok(()) => ends.push(batch.len()),
      Err(error) => {
        batch.truncate(start);
        self
          .report
          .drop_line(Cow::Owned(format!("it could not be encoded: {error}")));
      }
    }
  }

  /// Writes every line until the queue is closed and empty, then syncs. The
  /// lines queued while it wrote or lingered go in one write: at load, one
  /// write and one wake-up for many lines, not one each.
  fn run(mut self, lines: Receiver<Line>, done: mpsc::Sender<()>) {
    let mut batch = Vec::with_capacity(BATCH_BYTES + 1024);
    let mut ends = Vec::with_capacity(BATCH_LINES);
    while let Ok(first) = lines.recv() {
      batch.clear();
      ends.clear();
      self.take(first, &mut batch, &mut ends);
      while ends.len() < BATCH_LINES && batch.len() < BATCH_BYTES {
        match lines.try_recv() {
          Ok(line) => self.take(line, &mut batch, &mut ends),
          Err(_) => break,
        }
      }
      if ends.is_empty() {
        continue;
      }
      let report = &self.report;
      let mut failures = 0;
      self.sink.append_lines(&batch, &ends, &mut |error| {
        failures += 1;
        report.drop_line(Cow::Owned(format!("a write failed: {}", describe(error))));
      });
      if failures < ends.len() {
        report.warn_if_due(false);
      }
      // Let the next lines gather (a task never waits on this thread).
      std::thread::sleep(LINGER);
    }
    if let Err(error) = self.sink.close() {
      self.report.span.in_scope(
        || tracing::warn!(error = %describe(&error), "audit log: cannot sync the file at close"),
      );
    }
    self.report.warn_if_due(true);
    let _ = done.send(());
  }
}

#[cfg(test)]
mod tests;
