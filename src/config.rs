//! The files the registrar reads and writes under the config dir
//! (`$MCPCTL_HOME` or `~/.mcpctl`): `credentials` and `provider-session`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::secret::Secret;

const SESSION_FILE: &str = "provider-session";
const CREDENTIALS_FILE: &str = "credentials";
/// A session id longer than this, or with control characters, is not an id.
const MAX_SESSION_ID_BYTES: usize = 512;
/// A session file larger than this is not read (an id plus its JSON wrapper is far less).
const MAX_SESSION_FILE_BYTES: usize = 4096;
/// The temp files a save writes through are `.provider-session-<12 letters or digits>.tmp`.
/// A save killed mid-write leaves one behind; the next start removes names of exactly this
/// shape, and nothing else in the config dir (which mcplocal and others share).
const TEMP_PREFIX: &str = ".provider-session-";
const TEMP_SUFFIX: &str = ".tmp";
const TEMP_RANDOM_CHARS: usize = 12;

/// The config dir: the option when given, else `$MCPCTL_HOME`, else `~/.mcpctl`.
pub fn resolve_config_dir(option: Option<&str>) -> Result<PathBuf> {
  if let Some(dir) = option.filter(|dir| !dir.is_empty()) {
    return Ok(PathBuf::from(dir));
  }
  if let Some(dir) = std::env::var_os("MCPCTL_HOME").filter(|dir| !dir.is_empty()) {
    return Ok(PathBuf::from(dir));
  }
  dirs::home_dir()
    .map(|home| home.join(".mcpctl"))
    .ok_or_else(|| {
      Error::InvalidInput(
        "cannot find the home directory: set configDir or $MCPCTL_HOME".to_owned(),
      )
    })
}

/// `<configDir>/credentials`: where mcplocal keeps the mcpd address and bearer token.
pub struct Credentials {
  pub mcpd_url: String,
  pub token: Secret,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CredentialsFile {
  mcpd_url: String,
  token: String,
}

impl Credentials {
  pub fn read(config_dir: &Path) -> Result<Self> {
    let path = config_dir.join(CREDENTIALS_FILE);
    let text = fs::read_to_string(&path)
      .map_err(|source| Error::io(format!("cannot read {}", path.display()), source))?;
    // The serde error names the line and column only, never the file's content,
    // so the token cannot leak through it.
    let file: CredentialsFile = serde_json::from_str(&text).map_err(|error| {
      Error::InvalidInput(format!(
        "{} is not {{ \"mcpdUrl\": string, \"token\": string }}: {error}",
        path.display()
      ))
    })?;
    if file.mcpd_url.trim().is_empty() || file.token.trim().is_empty() {
      return Err(Error::InvalidInput(format!(
        "{} has an empty mcpdUrl or token",
        path.display()
      )));
    }
    Ok(Self {
      mcpd_url: file.mcpd_url.trim().to_owned(),
      token: Secret::new(file.token.trim()),
    })
  }
}

/// `<configDir>/provider-session`: the sticky session id, so that a restarted
/// registrar revives the same virtual LLMs in mcpd.
#[derive(Debug, Clone)]
pub struct SessionStore {
  dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionFile {
  provider_session_id: String,
}

impl SessionStore {
  pub fn new(config_dir: PathBuf) -> Self {
    Self { dir: config_dir }
  }

  pub fn path(&self) -> PathBuf {
    self.dir.join(SESSION_FILE)
  }

  /// The persisted id: JSON `{ "providerSessionId": "…" }`, or the plain-text id
  /// an older version wrote. `Ok(None)` when there is no file; an error when the
  /// file exists but holds no usable id, or is not a regular file (a symlink is
  /// never followed): the caller logs it and starts afresh.
  pub fn load(&self) -> Result<Option<String>> {
    let path = self.path();
    let text = match read_regular_file(&path, MAX_SESSION_FILE_BYTES) {
      Ok(text) => text,
      Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
      Err(source) => return Err(Error::io(format!("cannot read {}", path.display()), source)),
    };
    let trimmed = text.trim();
    let id = if trimmed.starts_with('{') {
      serde_json::from_str::<SessionFile>(trimmed)
        .map(|file| file.provider_session_id)
        .map_err(|error| {
          Error::InvalidInput(format!("{} is not a session file: {error}", path.display()))
        })?
    } else {
      trimmed.to_owned()
    };
    if !is_session_id(&id) {
      return Err(Error::InvalidInput(format!(
        "{} does not hold a usable session id",
        path.display()
      )));
    }
    Ok(Some(id))
  }

  /// What a registrar does with the file when it is made: removes the temp files
  /// saves killed mid-write left ([`SessionStore::sweep_temp_files`]), then
  /// [`SessionStore::load`]s the id. A sweep that fails is logged, never fatal.
  pub fn recover(&self) -> Result<Option<String>> {
    match self.sweep_temp_files() {
      Ok(0) => {}
      Ok(removed) => tracing::debug!(removed, "removed temp files of interrupted session saves"),
      Err(error) => {
        tracing::warn!(dir = %self.dir.display(), %error, "cannot look for temp files of interrupted session saves")
      }
    }
    self.load()
  }

  /// Removes the temp files a killed save left: regular files (never a symlink)
  /// whose name has the exact shape a save gives its temp file (`TEMP_PREFIX`),
  /// and that no live save holds. A save holds an exclusive `flock` on its temp
  /// file while it writes (a killed one's lock died with it), so a registrar
  /// starting beside another on the same config dir leaves that one's save alone.
  /// Answers how many were removed.
  pub fn sweep_temp_files(&self) -> std::io::Result<usize> {
    let entries = match fs::read_dir(&self.dir) {
      Ok(entries) => entries,
      Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
      Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
      let entry = entry?;
      let name = entry.file_name();
      if !name.to_str().is_some_and(is_temp_name) {
        continue;
      }
      let path = entry.path();
      // Skipped quietly: whatever it is (a link, a directory), it is not ours.
      if !fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_file()) {
        continue;
      }
      if temp_file_is_abandoned(&path) && fs::remove_file(&path).is_ok() {
        removed += 1;
      }
    }
    Ok(removed)
  }

  /// [`SessionStore::save`] on tokio's blocking pool, in the caller's span: a save
  /// creates, locks, fsyncs and renames a file, and a slow disk must not hold the
  /// registrar's one runtime worker (src/lib.rs), which reads the control channel
  /// and posts every task's answers.
  pub async fn save_off_runtime(&self, id: &str) -> Result<()> {
    let store = self.clone();
    let id = id.to_owned();
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(|| store.save(&id))).await {
      Ok(saved) => saved,
      Err(error) => Err(Error::io(
        format!("cannot write {}", self.path().display()),
        std::io::Error::other(error),
      )),
    }
  }

  /// Writes the id atomically with mode 0600: a temp file with a random name,
  /// created with `O_EXCL` in the config dir (so a planted symlink is never
  /// written through), fsynced, then renamed over the session file. The rename
  /// replaces a symlink itself, never its target. A kill at any point leaves
  /// the old file or the new one (tests/session_kill.rs), and at most the temp
  /// file, which the next start sweeps.
  pub fn save(&self, id: &str) -> Result<()> {
    let path = self.path();
    create_private_dir(&self.dir)?;
    let body = serde_json::to_string(&SessionFile {
      provider_session_id: id.to_owned(),
    })
    .map_err(|error| Error::Protocol(format!("cannot encode the session file: {error}")))?;
    if fs::symlink_metadata(&path).is_ok_and(|meta| meta.file_type().is_symlink()) {
      tracing::warn!(path = %path.display(), "the session file is a symbolic link; replacing it with a regular file");
    }
    let write = || -> std::io::Result<()> {
      let mut temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .rand_bytes(TEMP_RANDOM_CHARS)
        .tempfile_in(&self.dir)?;
      // Held until the file is renamed (or dropped): a sweep by another registrar
      // starting now leaves the file alone (see `sweep_temp_files`).
      #[cfg(unix)]
      lock_exclusive(temp.as_file(), true)?;
      #[cfg(unix)]
      {
        use std::os::unix::fs::PermissionsExt;
        temp
          .as_file()
          .set_permissions(fs::Permissions::from_mode(0o600))?;
      }
      temp.write_all(body.as_bytes())?;
      temp.write_all(b"\n")?;
      temp.as_file().sync_all()?;
      // On failure the temp file is removed when `PersistError` drops it.
      temp.persist(&path).map(drop).map_err(|error| error.error)
    };
    // A sweep can remove the temp file in the moment between its creation and its
    // lock (two registrars on one config dir, one starting): the rename then finds
    // no file, and the save is made again once under a new name.
    let written = match write() {
      Err(error) if error.kind() == std::io::ErrorKind::NotFound && self.dir.is_dir() => write(),
      written => written,
    };
    written.map_err(|source| Error::io(format!("cannot write {}", path.display()), source))
  }
}

/// Whether `name` has the exact shape of a save's temp file.
fn is_temp_name(name: &str) -> bool {
  name
    .strip_prefix(TEMP_PREFIX)
    .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
    .is_some_and(|random| {
      random.len() == TEMP_RANDOM_CHARS && random.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Takes (or, not `wait`ing, tries to take) an exclusive `flock` on `file`.
#[cfg(unix)]
fn lock_exclusive(file: &fs::File, wait: bool) -> std::io::Result<()> {
  use std::os::unix::io::AsRawFd;
  let operation = if wait {
    libc::LOCK_EX
  } else {
    libc::LOCK_EX | libc::LOCK_NB
  };
  loop {
    // SAFETY: flock on a descriptor `file` owns and keeps open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
      return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.kind() != std::io::ErrorKind::Interrupted {
      return Err(error);
    }
  }
}

/// Whether no live save holds the temp file at `path` (its writer was killed).
/// Opened without following a link; elsewhere than on unix there is no lock to
/// ask, and a file of the temp files' shape is taken as abandoned.
fn temp_file_is_abandoned(path: &Path) -> bool {
  #[cfg(unix)]
  {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
      .read(true)
      .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
      .open(path);
    // Taking the lock proves no save holds it now; a save that creates its file
    // and is about to lock it may lose the file, and `save` then writes again.
    file.is_ok_and(|file| lock_exclusive(&file, false).is_ok())
  }
  #[cfg(not(unix))]
  {
    let _ = path;
    true
  }
}

/// mcpd's ids are opaque, but one is visible ASCII (it travels in a header) and short.
pub fn is_session_id(id: &str) -> bool {
  !id.is_empty() && id.len() <= MAX_SESSION_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

fn create_private_dir(dir: &Path) -> Result<()> {
  make_private_dir(dir)
    .map_err(|source| Error::io(format!("cannot create {}", dir.display()), source))
}

/// Creates `dir` and its missing parents, mode 0700 on Unix; nothing when it
/// is a directory already. (The session file's and the audit log's.)
pub fn make_private_dir(dir: &Path) -> std::io::Result<()> {
  if dir.is_dir() {
    return Ok(());
  }
  let mut builder = fs::DirBuilder::new();
  builder.recursive(true);
  #[cfg(unix)]
  {
    use std::os::unix::fs::DirBuilderExt;
    builder.mode(0o700);
  }
  builder.create(dir)
}

/// Reads a small regular file without following a symlink at `path` (checked
/// first, and refused again by `O_NOFOLLOW` at open, so a swap in between
/// cannot win), and at most `limit` bytes of it.
fn read_regular_file(path: &Path, limit: usize) -> std::io::Result<String> {
  use std::io::{Error as IoError, ErrorKind, Read};
  let meta = fs::symlink_metadata(path)?;
  if meta.file_type().is_symlink() {
    return Err(IoError::other("it is a symbolic link; not following it"));
  }
  if !meta.is_file() {
    return Err(IoError::other("it is not a regular file"));
  }
  let mut options = fs::OpenOptions::new();
  options.read(true);
  #[cfg(unix)]
  {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
  }
  let file = options.open(path)?;
  if !file.metadata()?.is_file() {
    return Err(IoError::other("it is not a regular file"));
  }
  let mut bytes = Vec::new();
  file.take(limit as u64 + 1).read_to_end(&mut bytes)?;
  if bytes.len() > limit {
    return Err(IoError::new(
      ErrorKind::InvalidData,
      format!("it is over {limit} bytes"),
    ));
  }
  String::from_utf8(bytes).map_err(|_| IoError::new(ErrorKind::InvalidData, "it is not UTF-8"))
}

#[cfg(test)]
mod tests {
  use super::*;

  use tempfile::TempDir;

  fn temp_dir() -> TempDir {
    tempfile::tempdir().unwrap()
  }

  #[test]
  fn session_id_round_trips_with_mode_0600() {
    let temp = temp_dir();
    let dir = temp.path().to_path_buf();
    let store = SessionStore::new(dir.join("nested"));
    assert_eq!(store.load().unwrap(), None);
    store.save("ps-123").unwrap();
    assert_eq!(store.load().unwrap().as_deref(), Some("ps-123"));
    store.save("ps-456").unwrap();
    assert_eq!(store.load().unwrap().as_deref(), Some("ps-456"));
    let text = fs::read_to_string(store.path()).unwrap();
    assert_eq!(text, "{\"providerSessionId\":\"ps-456\"}\n");
    #[cfg(unix)]
    {
      use std::os::unix::fs::PermissionsExt;
      let mode = fs::metadata(store.path()).unwrap().permissions().mode();
      assert_eq!(mode & 0o777, 0o600);
    }
    // No temp file is left behind.
    let names: Vec<_> = fs::read_dir(dir.join("nested"))
      .unwrap()
      .map(|entry| entry.unwrap().file_name())
      .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(SESSION_FILE)]);
  }

  #[test]
  fn reads_the_legacy_plain_text_file() {
    let temp = temp_dir();
    let dir = temp.path().to_path_buf();
    fs::write(dir.join(SESSION_FILE), "legacy-id-9\n").unwrap();
    let store = SessionStore::new(dir.clone());
    assert_eq!(store.load().unwrap().as_deref(), Some("legacy-id-9"));
  }

  #[test]
  fn rejects_a_corrupt_session_file() {
    let temp = temp_dir();
    let dir = temp.path().to_path_buf();
    fs::write(dir.join(SESSION_FILE), "{\"providerSessionId\": 12}").unwrap();
    assert!(SessionStore::new(dir.clone()).load().is_err());
    fs::write(dir.join(SESSION_FILE), "line one\nline two").unwrap();
    assert!(SessionStore::new(dir.clone()).load().is_err());
    fs::write(dir.join(SESSION_FILE), "  \n").unwrap();
    assert!(SessionStore::new(dir.clone()).load().is_err());
  }

  /// A symlink planted at the temp name the old code used (`.provider-session.<pid>.tmp`)
  /// is left alone: the write goes through a fresh random name and never
  /// touches the symlink's target.
  #[cfg(unix)]
  #[test]
  fn a_planted_temp_file_symlink_is_never_written_through() {
    let temp = temp_dir();
    let dir = temp.path().join("config");
    let outside = temp.path().join("outside");
    fs::create_dir_all(&dir).unwrap();
    fs::write(&outside, "precious").unwrap();
    let planted = dir.join(format!(".{SESSION_FILE}.{}.tmp", std::process::id()));
    std::os::unix::fs::symlink(&outside, &planted).unwrap();
    let store = SessionStore::new(dir.clone());
    store.save("ps-1").unwrap();
    assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
    assert!(fs::symlink_metadata(&planted)
      .unwrap()
      .file_type()
      .is_symlink());
    assert_eq!(store.load().unwrap().as_deref(), Some("ps-1"));
    let mut names: Vec<_> = fs::read_dir(&dir)
      .unwrap()
      .map(|entry| entry.unwrap().file_name().into_string().unwrap())
      .collect();
    names.sort();
    assert_eq!(
      names,
      vec![planted.file_name().unwrap().to_str().unwrap(), SESSION_FILE]
    );
  }

  /// A session file that is a symlink is not read (treated as absent, with the
  /// reason for the warning), and a save replaces the link with a regular file
  /// instead of writing through it.
  #[cfg(unix)]
  #[test]
  fn a_symlinked_session_file_is_neither_read_nor_written_through() {
    use std::os::unix::fs::PermissionsExt;
    let temp = temp_dir();
    let dir = temp.path().join("config");
    let outside = temp.path().join("outside");
    fs::create_dir_all(&dir).unwrap();
    fs::write(&outside, "ps-outside\n").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join(SESSION_FILE)).unwrap();
    let store = SessionStore::new(dir.clone());
    let error = crate::error::describe(&store.load().unwrap_err());
    assert!(error.contains("symbolic link"), "{error}");
    store.save("ps-2").unwrap();
    assert_eq!(fs::read_to_string(&outside).unwrap(), "ps-outside\n");
    assert_eq!(
      fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
      0o644
    );
    let meta = fs::symlink_metadata(store.path()).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(store.load().unwrap().as_deref(), Some("ps-2"));
    // A dangling link is no session either, and is replaced the same way.
    fs::remove_file(store.path()).unwrap();
    std::os::unix::fs::symlink(temp.path().join("nowhere"), store.path()).unwrap();
    assert!(store.load().is_err());
    store.save("ps-3").unwrap();
    assert!(!temp.path().join("nowhere").exists());
    assert_eq!(store.load().unwrap().as_deref(), Some("ps-3"));
  }

  /// A save made on the runtime runs on tokio's blocking pool, not on the runtime's
  /// thread (the registrar has one worker), and in the caller's span: its warning
  /// reaches the caller's registrar's logger.
  #[cfg(unix)]
  #[test]
  fn a_save_from_the_runtime_runs_off_its_thread_in_the_callers_span() {
    use std::sync::Arc;
    use std::thread::ThreadId;
    let temp = temp_dir();
    let store = SessionStore::new(temp.path().to_path_buf());
    std::os::unix::fs::symlink(temp.path().join("nowhere"), store.path()).unwrap();
    let seen: Arc<parking_lot::Mutex<Vec<(String, ThreadId)>>> = Arc::default();
    let captured = Arc::clone(&seen);
    let route = crate::logging::LogRoute::register(
      Some(Arc::new(move |_, message, _| {
        captured.lock().push((message, std::thread::current().id()))
      })),
      None,
    );
    // A current-thread runtime runs its tasks on the thread that blocks on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
      .build()
      .unwrap();
    let runtime_thread = std::thread::current().id();
    route
      .span()
      .in_scope(|| runtime.block_on(store.save_off_runtime("ps-7")))
      .unwrap();
    assert_eq!(store.load().unwrap().as_deref(), Some("ps-7"));
    let seen = seen.lock();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].0.contains("symbolic link"), "{seen:?}");
    assert_ne!(
      seen[0].1, runtime_thread,
      "the save ran on the runtime's thread"
    );
  }

  /// The sweep at start removes an abandoned temp file of a save, but not one a live
  /// save holds (another registrar on the same config dir), nor names of another shape.
  #[cfg(unix)]
  #[test]
  fn the_sweep_removes_only_abandoned_temp_files_of_saves() {
    let temp = temp_dir();
    let dir = temp.path().to_path_buf();
    let store = SessionStore::new(dir.clone());
    store.save("ps-1").unwrap();
    let held = dir.join(".provider-session-HeldByASave0.tmp");
    let abandoned = dir.join(".provider-session-Abandoned000.tmp");
    let foreign = dir.join(".tmpXyZ123");
    for path in [&held, &abandoned, &foreign] {
      fs::write(path, "{\"providerSessionId\":\"ps-").unwrap();
    }
    let holder = fs::File::open(&held).unwrap();
    lock_exclusive(&holder, true).unwrap();
    assert_eq!(store.recover().unwrap().as_deref(), Some("ps-1"));
    assert!(held.exists() && foreign.exists());
    assert!(!abandoned.exists());
    drop(holder);
    assert_eq!(store.sweep_temp_files().unwrap(), 1);
    assert!(!held.exists() && foreign.exists());
    assert!(is_temp_name(".provider-session-abcDEF012345.tmp"));
    for name in [
      ".provider-session-abcDEF01234.tmp",
      ".provider-session-abcDEF0123456.tmp",
      ".provider-session-abcDEF01234-.tmp",
      ".provider-session.1234.tmp",
      "provider-session",
    ] {
      assert!(!is_temp_name(name), "{name}");
    }
  }

  #[test]
  fn an_oversized_session_file_is_not_read() {
    let temp = temp_dir();
    fs::write(temp.path().join(SESSION_FILE), "x".repeat(1 << 20)).unwrap();
    let error = crate::error::describe(
      &SessionStore::new(temp.path().to_path_buf())
        .load()
        .unwrap_err(),
    );
    assert!(error.contains("over 4096 bytes"), "{error}");
  }

  #[test]
  fn credentials_errors_never_show_the_token() {
    let temp = temp_dir();
    let dir = temp.path().to_path_buf();
    fs::write(
      dir.join(CREDENTIALS_FILE),
      "{\"mcpdUrl\": \"https://mcpd.example\", \"token\": 42, \"x\": \"sk-secret\"}",
    )
    .unwrap();
    let error = Credentials::read(&dir).err().unwrap().to_string();
    assert!(!error.contains("sk-secret"), "{error}");
    assert!(error.contains("credentials"), "{error}");
    fs::write(
      dir.join(CREDENTIALS_FILE),
      "{\"mcpdUrl\": \" https://mcpd.example \", \"token\": \"sk-secret\"}",
    )
    .unwrap();
    let credentials = Credentials::read(&dir).unwrap();
    assert_eq!(credentials.mcpd_url, "https://mcpd.example");
    assert_eq!(credentials.token.expose(), "sk-secret");
  }

  #[test]
  fn config_dir_prefers_the_option() {
    assert_eq!(
      resolve_config_dir(Some("/tmp/x")).unwrap(),
      PathBuf::from("/tmp/x")
    );
  }
}
