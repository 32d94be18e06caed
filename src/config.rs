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
  /// file exists but holds no usable id (the caller logs it and starts afresh).
  pub fn load(&self) -> Result<Option<String>> {
    let path = self.path();
    let text = match fs::read_to_string(&path) {
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

  /// Writes the id atomically (temp file, fsync, rename) with mode 0600.
  pub fn save(&self, id: &str) -> Result<()> {
    let path = self.path();
    create_private_dir(&self.dir)?;
    let body = serde_json::to_string(&SessionFile {
      provider_session_id: id.to_owned(),
    })
    .map_err(|error| Error::Protocol(format!("cannot encode the session file: {error}")))?;
    let temp = self
      .dir
      .join(format!(".{SESSION_FILE}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
      let mut file = open_private(&temp)?;
      file.write_all(body.as_bytes())?;
      file.write_all(b"\n")?;
      file.sync_all()?;
      fs::rename(&temp, &path)
    };
    write().map_err(|source| {
      let _ = fs::remove_file(&temp);
      Error::io(format!("cannot write {}", path.display()), source)
    })
  }
}

/// mcpd's ids are opaque, but one is visible ASCII (it travels in a header) and short.
pub fn is_session_id(id: &str) -> bool {
  !id.is_empty() && id.len() <= MAX_SESSION_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

fn create_private_dir(dir: &Path) -> Result<()> {
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
  builder
    .create(dir)
    .map_err(|source| Error::io(format!("cannot create {}", dir.display()), source))
}

fn open_private(path: &Path) -> std::io::Result<fs::File> {
  let mut options = fs::OpenOptions::new();
  options.write(true).create(true).truncate(true);
  #[cfg(unix)]
  {
    use std::os::unix::fs::OpenOptionsExt;
    options.mode(0o600);
  }
  options.open(path)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
      "mcpctl-registrar-config-{name}-{}",
      std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    dir
  }

  #[test]
  fn session_id_round_trips_with_mode_0600() {
    let dir = temp_dir("roundtrip");
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
    fs::remove_dir_all(dir).unwrap();
  }

  #[test]
  fn reads_the_legacy_plain_text_file() {
    let dir = temp_dir("legacy");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(SESSION_FILE), "legacy-id-9\n").unwrap();
    let store = SessionStore::new(dir.clone());
    assert_eq!(store.load().unwrap().as_deref(), Some("legacy-id-9"));
    fs::remove_dir_all(dir).unwrap();
  }

  #[test]
  fn rejects_a_corrupt_session_file() {
    let dir = temp_dir("corrupt");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(SESSION_FILE), "{\"providerSessionId\": 12}").unwrap();
    assert!(SessionStore::new(dir.clone()).load().is_err());
    fs::write(dir.join(SESSION_FILE), "line one\nline two").unwrap();
    assert!(SessionStore::new(dir.clone()).load().is_err());
    fs::write(dir.join(SESSION_FILE), "  \n").unwrap();
    assert!(SessionStore::new(dir.clone()).load().is_err());
    fs::remove_dir_all(dir).unwrap();
  }

  #[test]
  fn credentials_errors_never_show_the_token() {
    let dir = temp_dir("credentials");
    fs::create_dir_all(&dir).unwrap();
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
    fs::remove_dir_all(dir).unwrap();
  }

  #[test]
  fn config_dir_prefers_the_option() {
    assert_eq!(
      resolve_config_dir(Some("/tmp/x")).unwrap(),
      PathBuf::from("/tmp/x")
    );
  }
}
