use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use serde_json::json;
use tracing::Level;

use super::*;
use crate::dispatch::Outcome;
use crate::logging::LogRoute;
use crate::owner::Refusal;

/// Warnings logged in a registrar's span, and that span.
struct Warnings {
  route: LogRoute,
  lines: Arc<Mutex<Vec<String>>>,
}

impl Warnings {
  fn new() -> Self {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let captured = Arc::clone(&lines);
    let route = LogRoute::register(
      Some(Arc::new(move |level, message, _fields| {
        if level == Level::WARN {
          captured.lock().push(message)
        }
      })),
      None,
    );
    Self { route, lines }
  }

  fn span(&self) -> tracing::Span {
    self.route.span()
  }

  fn all(&self) -> Vec<String> {
    self.lines.lock().clone()
  }
}

fn record(n: usize) -> TaskRecord {
  TaskRecord {
    time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_620_748_123),
    task_id: format!("task-{n}"),
    provider: "local".to_owned(),
    caller_id: Some("alice".to_owned()),
    request_model: Some("local".to_owned()),
    response_model: Some("llama3".to_owned()),
    stream: n.is_multiple_of(2),
    outcome: Outcome::Completed,
    status: 200,
    refused: None,
    prompt_tokens: Some(12),
    completion_tokens: Some(34),
    queue: Some(Duration::from_micros(1_500)),
    time_to_first_token: Some(Duration::from_millis(20)),
    duration: Duration::from_millis(250),
    trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned()),
    messages: Some(json!([{ "role": "user", "content": "PROMPT-CANARY" }])),
    content: Some("ANSWER-CANARY".to_owned()),
  }
}

fn config(path: &Path, max_bytes: u64, keep: u32) -> AuditConfig {
  AuditConfig {
    path: path.to_owned(),
    max_bytes,
    keep,
    content: false,
  }
}

fn lines_of(path: &Path) -> Vec<Value> {
  fs::read_to_string(path)
    .unwrap()
    .lines()
    .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
    .collect()
}

#[test]
fn a_line_is_the_api_record_and_carries_content_only_when_asked() {
  let without = AuditRecord::new(&record(1), false);
  let mut out = Vec::new();
  without.encode(None, &mut out).unwrap();
  let text = String::from_utf8(out).unwrap();
  assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
  assert!(!text.contains("CANARY"), "{text}");
  let line: Value = serde_json::from_str(&text).unwrap();
  assert_eq!(
    line,
    json!({
      "time": "2026-12-07T05:19:08.123Z",
      "taskId": "task-1",
      "provider": "local",
      "callerId": "alice",
      "requestModel": "local",
      "responseModel": "llama3",
      "stream": false,
      "outcome": "completed",
      "status": 200,
      "promptTokens": 12,
      "completionTokens": 34,
      "queueMs": 1.5,
      "timeToFirstTokenMs": 20.0,
      "durationMs": 250.0,
      "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
    })
  );

  let mut refused = record(2);
  refused.outcome = Outcome::Failed;
  refused.status = 429;
  refused.refused = Some(Refusal::TokensPerMinute);
  refused.content = None;
  let mut out = Vec::new();
  AuditRecord::new(&refused, true)
    .encode(None, &mut out)
    .unwrap();
  let line: Value = serde_json::from_slice(&out).unwrap();
  assert_eq!(line["outcome"], "failed");
  assert_eq!(line["refused"], "tokens_per_minute");
  assert_eq!(line["messages"][0]["content"], "PROMPT-CANARY");
  assert_eq!(line["content"], Value::Null);
  assert!(line.as_object().unwrap().contains_key("content"));
}

#[test]
fn the_token_is_never_written_and_every_line_still_parses() {
  let token = Secret::new("tok\"en\\-audit-7");
  let plain = Secret::new("sk-audit-plain-42");
  let mut echoed = record(3);
  echoed.task_id = "id-sk-audit-plain-42".to_owned();
  echoed.content = Some(format!(
    "echo {} and {} and Authorization: \"Bearer xyz\" end",
    token.expose(),
    plain.expose()
  ));
  echoed.messages = Some(json!([{
    "role": "user",
    "content": format!("use {} please", plain.expose()),
    plain.expose(): "key",
    "tool": { "arguments": format!("{{\"auth\":\"Bearer {}\"}}", plain.expose()) },
  }]));
  let mut out = Vec::new();
  AuditRecord::new(&echoed, true)
    .encode(Some(&token), &mut out)
    .unwrap();
  let text = String::from_utf8(out).unwrap();
  assert!(!text.contains("sk-audit-plain-42"), "{text}");
  assert!(!text.contains("audit-7"), "{text}");
  assert!(!text.contains("xyz"), "{text}");
  let line: Value = serde_json::from_str(&text).unwrap();
  assert_eq!(line["taskId"], "id-***");
  assert_eq!(line["messages"][0]["content"], "use *** please");
  assert_eq!(line["messages"][0]["***"], "key");
  drop(plain);
}

#[test]
fn rotation_keeps_keep_files_each_below_max_bytes() {
  let dir = tempfile::tempdir().unwrap();
  let path = dir.path().join("audit.jsonl");
  let mut file = RotatingFile::open(&path, 300, 3).unwrap();
  // Right-aligned in spaces (JSON allows them; leading zeros it does not): 99 bytes.
  let line = |n: usize| format!("{{\"n\":{n:3},\"pad\":\"{}\"}}\n", "x".repeat(80));
  for n in 0..40 {
    file.append(line(n).as_bytes()).unwrap();
  }
  file.close().unwrap();
  let names: Vec<String> = {
    let mut names: Vec<String> = fs::read_dir(dir.path())
      .unwrap()
      .map(|entry| entry.unwrap().file_name().into_string().unwrap())
      .collect();
    names.sort();
    names
  };
  assert_eq!(
    names,
    [
      "audit.jsonl",
      "audit.jsonl.1",
      "audit.jsonl.2",
      "audit.jsonl.3"
    ]
  );
  // 3 lines of 99 bytes per file, from line 0: .3 holds 30..=32, .2 33..=35,
  // .1 36..=38 and the file the newest, 39; older ones are gone.
  let mut seen = Vec::new();
  for name in names.iter().rev() {
    let file = dir.path().join(name);
    assert!(fs::metadata(&file).unwrap().len() <= 300, "{name}");
    seen.extend(
      lines_of(&file)
        .iter()
        .map(|line| line["n"].as_u64().unwrap()),
    );
  }
  assert_eq!(seen, (30..40).collect::<Vec<u64>>());
}

#[test]
fn lines_written_in_batches_rotate_exactly_as_one_at_a_time() {
  // Lines of varied sizes (one longer than max_bytes), in batches of varied
  // sizes: the files are the same bytes as when each line is appended alone.
  let line = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}\n", "x".repeat((n * 37) % 120));
  let (one, batched) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
  let mut alone = RotatingFile::open(&one.path().join("audit.jsonl"), 300, 4).unwrap();
  let mut many = RotatingFile::open(&batched.path().join("audit.jsonl"), 300, 4).unwrap();
  let mut n = 0;
  for size in [1, 5, 2, 9, 1, 13, 3] {
    let (mut batch, mut ends) = (Vec::new(), Vec::new());
    for _ in 0..size {
      let text = if n == 17 {
        format!("{{\"long\":\"{}\"}}\n", "y".repeat(400))
      } else {
        line(n)
      };
      alone.append(text.as_bytes()).unwrap();
      batch.extend_from_slice(text.as_bytes());
      ends.push(batch.len());
      n += 1;
    }
    many.append_lines(&batch, &ends, &mut |error| panic!("{error}"));
  }
  alone.close().unwrap();
  many.close().unwrap();
  for name in [
    "audit.jsonl",
    "audit.jsonl.1",
    "audit.jsonl.2",
    "audit.jsonl.3",
    "audit.jsonl.4",
  ] {
    assert_eq!(
      fs::read(one.path().join(name)).unwrap(),
      fs::read(batched.path().join(name)).unwrap(),
      "{name}"
    );
  }
}

#[test]
fn keep_zero_keeps_only_the_current_file() {
  let dir = tempfile::tempdir().unwrap();
  let path = dir.path().join("audit.jsonl");
  let mut file = RotatingFile::open(&path, 10, 0).unwrap();
  for n in 0..5 {
    file.append(format!("{{\"n\":{n}}}\n").as_bytes()).unwrap();
  }
  assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
  assert_eq!(fs::read_to_string(&path).unwrap(), "{\"n\":4}\n");
}

#[test]
fn appends_to_an_existing_file_and_counts_it_towards_max_bytes() {
  let dir = tempfile::tempdir().unwrap();
  let path = dir.path().join("audit.jsonl");
  fs::write(&path, "{\"old\":1}\n").unwrap();
  let mut file = RotatingFile::open(&path, 15, 1).unwrap();
  file.append(b"{\"new\":1}\n").unwrap();
  assert_eq!(fs::read_to_string(&path).unwrap(), "{\"new\":1}\n");
  assert_eq!(
    fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap(),
    "{\"old\":1}\n"
  );
}

#[cfg(unix)]
#[test]
fn files_are_created_0600_in_a_0700_directory() {
  use std::os::unix::fs::PermissionsExt;
  let dir = tempfile::tempdir().unwrap();
  let path = dir.path().join("new-config").join("audit.jsonl");
  let mut file = RotatingFile::open(&path, 20, 2).unwrap();
  for _ in 0..3 {
    file.append(b"{\"line\":\"abc\"}\n").unwrap();
  }
  let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
  assert_eq!(mode(path.parent().unwrap()), 0o700);
  assert_eq!(mode(&path), 0o600);
  assert_eq!(mode(&dir.path().join("new-config/audit.jsonl.1")), 0o600);
}

#[cfg(unix)]
#[test]
fn a_symlink_is_refused_with_a_warning_and_its_target_untouched() {
  let dir = tempfile::tempdir().unwrap();
  let target = dir.path().join("elsewhere");
  fs::write(&target, "precious\n").unwrap();
  let path = dir.path().join("audit.jsonl");
  std::os::unix::fs::symlink(&target, &path).unwrap();
  let warnings = Warnings::new();
  let dropped = Arc::new(AtomicU64::new(0));
  let log = AuditLog::open(&config(&path, 1000, 1), None, dropped, warnings.span());
  assert!(log.is_none());
  let all = warnings.all();
  assert_eq!(all.len(), 1, "{all:?}");
  assert!(all[0].starts_with("audit log disabled"), "{all:?}");
  let error = RotatingFile::open(&path, 1000, 1).err().unwrap();
  assert!(error.to_string().contains("symbolic link"), "{error}");
  // A dangling one too: nothing is created at its target.
  let dangling = dir.path().join("dangling.jsonl");
  std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
  assert!(RotatingFile::open(&dangling, 1000, 1).is_err());
  assert!(!dir.path().join("nowhere").exists());
  assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
}

#[test]
fn a_directory_or_an_unwritable_place_is_refused_with_a_warning() {
  let dir = tempfile::tempdir().unwrap();
  let warnings = Warnings::new();
  let dropped = Arc::new(AtomicU64::new(0));
  let as_directory = dir.path().join("is-a-dir");
  fs::create_dir(&as_directory).unwrap();
  let error = RotatingFile::open(&as_directory, 1000, 1).err().unwrap();
  assert!(error.to_string().contains("is a directory"), "{error}");
  // A parent that is a file cannot hold the audit file.
  let file = dir.path().join("plain-file");
  fs::write(&file, "").unwrap();
  let under_file = file.join("audit.jsonl");
  assert!(RotatingFile::open(&under_file, 1000, 1).is_err());
  for path in [&as_directory, &under_file] {
    let log = AuditLog::open(
      &config(path, 1000, 1),
      None,
      Arc::clone(&dropped),
      warnings.span(),
    );
    assert!(log.is_none());
  }
  assert_eq!(warnings.all().len(), 2, "{:?}", warnings.all());
}

#[cfg(unix)]
#[test]
fn a_directory_without_write_permission_is_refused() {
  use std::os::unix::fs::PermissionsExt;
  let dir = tempfile::tempdir().unwrap();
  let locked = dir.path().join("locked");
  fs::create_dir(&locked).unwrap();
  fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
  // root writes anyway: nothing to check there.
  if fs::write(locked.join("probe"), "").is_ok() {
    return;
  }
  let error = RotatingFile::open(&locked.join("audit.jsonl"), 1000, 1)
    .err()
    .unwrap();
  assert!(error.to_string().contains("permission denied"), "{error}");
}

/// A sink whose `append` waits until released, and says when it started waiting.
struct SlowDisk {
  entered: mpsc::Sender<()>,
  release: Receiver<()>,
  written: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AuditSink for SlowDisk {
  fn append(&mut self, line: &[u8]) -> io::Result<()> {
    let _ = self.entered.send(());
    let _ = self.release.recv_timeout(Duration::from_secs(10));
    self.written.lock().push(line.to_owned());
    Ok(())
  }

  fn close(&mut self) -> io::Result<()> {
    Ok(())
  }
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_waiting() {
  let (entered, entered_rx) = mpsc::channel();
  let (release, release_rx) = mpsc::channel();
  let written = Arc::new(Mutex::new(Vec::new()));
  let disk = SlowDisk {
    entered,
    release: release_rx,
    written: Arc::clone(&written),
  };
  let warnings = Warnings::new();
  let dropped = Arc::new(AtomicU64::new(0));
  let log = AuditLog::with_sink(
    Box::new(disk),
    false,
    QueueBounds {
      lines: 2,
      ..QueueBounds::default()
    },
    None,
    Arc::clone(&dropped),
    warnings.span(),
  );
  log.task_ended(&record(0));
  // The writer holds line 0 in its (stuck) write: the queue has room for 2 more.
  entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
  for n in 1..=10 {
    log.task_ended(&record(n));
  }
  assert_eq!(dropped.load(Ordering::Relaxed), 8);
  // One warning at once, not one per line.
  let all = warnings.all();
  assert_eq!(all.len(), 1, "{all:?}");
  assert!(
    all[0].contains("1 line(s) dropped") && all[0].contains("queue was full"),
    "{all:?}"
  );
  for _ in 0..3 {
    release.send(()).unwrap();
  }
  log.close().await;
  let written = written.lock();
  assert_eq!(written.len(), 3);
  let ids: Vec<String> = written
    .iter()
    .map(|line| serde_json::from_slice::<Value>(line).unwrap()["taskId"].to_string())
    .collect();
  assert_eq!(ids, ["\"task-0\"", "\"task-1\"", "\"task-2\""]);
  // The 7 not yet reported are, at close.
  let all = warnings.all();
  assert_eq!(all.len(), 2, "{all:?}");
  assert!(all[1].contains("7 line(s) dropped"), "{all:?}");
  // After close, a line is dropped and counted.
  log.task_ended(&record(11));
  assert_eq!(dropped.load(Ordering::Relaxed), 9);
}

#[tokio::test]
async fn with_content_the_queued_text_is_bounded_too() {
  let (entered, entered_rx) = mpsc::channel();
  let (release, release_rx) = mpsc::channel();
  let written = Arc::new(Mutex::new(Vec::new()));
  let disk = SlowDisk {
    entered,
    release: release_rx,
    written: Arc::clone(&written),
  };
  let warnings = Warnings::new();
  let dropped = Arc::new(AtomicU64::new(0));
  // record(n)'s text: "role", "user", "content", "PROMPT-CANARY" in its
  // messages (28 bytes) and "ANSWER-CANARY" (13): 41 bytes a line.
  let log = AuditLog::with_sink(
    Box::new(disk),
    true,
    QueueBounds {
      lines: 100,
      text_bytes: 100,
    },
    None,
    Arc::clone(&dropped),
    warnings.span(),
  );
  let wait_for_a_write = || entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
  log.task_ended(&record(0));
  // Line 0 is encoded (its text off the count) and stuck in its write: two
  // more fit (82 bytes), a third would make 123.
  wait_for_a_write();
  for n in 1..=5 {
    log.task_ended(&record(n));
  }
  assert_eq!(dropped.load(Ordering::Relaxed), 3);
  assert!(
    warnings.all()[0].contains("the text waiting for the writer was over its bound"),
    "{:?}",
    warnings.all()
  );
  // Line 0 written; lines 1 and 2 taken in one batch (their text off the
  // count), line 1 stuck in its write: room for two more, not a third.
  release.send(()).unwrap();
  wait_for_a_write();
  log.task_ended(&record(6));
  log.task_ended(&record(7));
  log.task_ended(&record(8));
  assert_eq!(dropped.load(Ordering::Relaxed), 4);
  for _ in 0..4 {
    release.send(()).unwrap();
  }
  log.close().await;
  let ids: Vec<String> = written
    .lock()
    .iter()
    .map(|line| serde_json::from_slice::<Value>(line).unwrap()["taskId"].to_string())
    .collect();
  assert_eq!(
    ids,
    [
      "\"task-0\"",
      "\"task-1\"",
      "\"task-2\"",
      "\"task-6\"",
      "\"task-7\""
    ]
  );
}

/// A disk that is full: every write fails.
struct FullDisk {
  attempts: Arc<AtomicU64>,
}

impl AuditSink for FullDisk {
  fn append(&mut self, _line: &[u8]) -> io::Result<()> {
    self.attempts.fetch_add(1, Ordering::Relaxed);
    Err(io::Error::new(
      io::ErrorKind::StorageFull,
      "No space left on device",
    ))
  }

  fn close(&mut self) -> io::Result<()> {
    Ok(())
  }
}

#[tokio::test]
async fn a_failing_write_drops_and_counts_each_line() {
  let attempts = Arc::new(AtomicU64::new(0));
  let warnings = Warnings::new();
  let dropped = Arc::new(AtomicU64::new(0));
  let log = AuditLog::with_sink(
    Box::new(FullDisk {
      attempts: Arc::clone(&attempts),
    }),
    true,
    QueueBounds::default(),
    None,
    Arc::clone(&dropped),
    warnings.span(),
  );
  for n in 0..100 {
    log.task_ended(&record(n));
  }
  log.close().await;
  // Every line reached the writer (none was dropped at the queue) and failed there.
  assert_eq!(attempts.load(Ordering::Relaxed), 100);
  assert_eq!(dropped.load(Ordering::Relaxed), 100);
  let all = warnings.all();
  assert!(
    (1..=2).contains(&all.len())
      && all
        .iter()
        .all(|line| line.contains("No space left on device")),
    "{all:?}"
  );
  let reported: u64 = all
    .iter()
    .map(|line| {
      line
        .strip_prefix("audit log: ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .parse::<u64>()
        .unwrap()
    })
    .sum();
  assert_eq!(reported, 100);
}

#[tokio::test]
async fn close_leaves_every_queued_line_on_disk() {
  let dir = tempfile::tempdir().unwrap();
  let path = dir.path().join("audit.jsonl");
  let warnings = Warnings::new();
  let dropped = Arc::new(AtomicU64::new(0));
  let log = AuditLog::open(
    &config(&path, DEFAULT_MAX_BYTES, DEFAULT_KEEP),
    None,
    Arc::clone(&dropped),
    warnings.span(),
  )
  .unwrap();
  assert!(!log.wants_content());
  for n in 0..500 {
    log.task_ended(&record(n));
  }
  log.close().await;
  log.close().await;
  let lines = lines_of(&path);
  assert_eq!(lines.len() as u64 + dropped.load(Ordering::Relaxed), 500);
  // The queue holds 1,024 lines: none was dropped.
  assert_eq!(lines.len(), 500);
  assert_eq!(lines[499]["taskId"], "task-499");
  assert!(warnings.all().is_empty(), "{:?}", warnings.all());
}

/// The registrar's side: `open_audit` opens the file at once (0600, empty), a
/// second call changes nothing, and lines dropped into the registrar's counter
/// are the count `metrics()` shows.
#[tokio::test]
async fn a_registrars_audit_log_counts_its_drops_into_metrics() {
  let dir = tempfile::tempdir().unwrap();
  // Nobody listens there; the registrar is never started.
  let url = "http://127.0.0.1:9".to_owned();
  let warnings = Warnings::new();
  let registrar = crate::registrar::Registrar::new(
    crate::registrar::tests::config(url, dir.path()),
    None,
    warnings.span(),
  )
  .unwrap();
  let path = dir.path().join("audit.jsonl");
  let audit = config(&path, DEFAULT_MAX_BYTES, DEFAULT_KEEP);
  registrar.open_audit(&audit, Secret::new("sk-unit-token"));
  assert_eq!(fs::read_to_string(&path).unwrap(), "");
  #[cfg(unix)]
  {
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
      fs::metadata(&path).unwrap().permissions().mode() & 0o777,
      0o600
    );
  }
  registrar.open_audit(
    &config(&dir.path().join("other.jsonl"), 1, 1),
    Secret::new("x"),
  );
  assert!(!dir.path().join("other.jsonl").exists());

  // A second log on a full disk, counting into the registrar's counter.
  let full = AuditLog::with_sink(
    Box::new(FullDisk {
      attempts: Arc::default(),
    }),
    false,
    QueueBounds::default(),
    None,
    registrar.audit_lines_dropped(),
    warnings.span(),
  );
  for n in 0..3 {
    full.task_ended(&record(n));
  }
  full.close().await;
  let text = registrar.metrics();
  assert!(
    text
      .lines()
      .any(|line| line == "mcpctl_registrar_audit_lines_dropped_total 3"),
    "{text}"
  );
  registrar.stop().await;
  assert!(warnings
    .all()
    .iter()
    .any(|line| line.contains("3 line(s) dropped")));
}
