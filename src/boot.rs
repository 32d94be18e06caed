//! mcplocal's boot policy (index.d.ts `maybeStartVirtualLlmRegistrar`): which
//! providers to publish, where the mcpd credentials come from, and how long the
//! boot waits for mcpd. It never fails: every way out is a warning and `None`.
//!
//! The registry lives in JavaScript, so the boot takes it as a [`Registry`];
//! the binding only converts the hook's options and implements that trait.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{resolve_config_dir, Credentials};
use crate::dispatch::PublishedProvider;
use crate::error::{describe, Error, Result};
use crate::owner::OwnerPolicy;
use crate::registrar::{Registrar, RunningHold};
use crate::secret::Secret;
use crate::wire::ProviderDescriptor;

/// How long mcplocal's boot waits for the first register (and the channel's
/// opening) before it goes on and lets the registrar finish in the background.
pub const BOOT_WAIT: Duration = Duration::from_secs(3);

/// One entry of the config's provider list (index.d.ts `LlmProviderFileEntry`),
/// without its provider.
pub struct FileEntry {
  /// What mcpd is told about the provider.
  pub descriptor: ProviderDescriptor,
  /// `publish: true`: the owner opted in. Absent or false: not published.
  pub publish: bool,
  /// The owner's `allowCallers` and `limits` (an entry whose were bad never gets
  /// here: it is an `Err`, left out with a warning, never published without them).
  pub policy: OwnerPolicy,
}

/// mcplocal's provider registry: where the boot finds the `LlmProvider` of an
/// opted-in entry. A closure `FnMut(usize, FileEntry) -> Result<Option<_>>` is one.
pub trait Registry {
  /// The provider of entry `index`, looked up under its name and wrapped for
  /// the core; `Ok(None)` when the registry has none by that name. An error
  /// (the registry threw, the provider has no `complete`) leaves the entry
  /// out, after a warning.
  fn provider(&mut self, index: usize, entry: FileEntry) -> Result<Option<PublishedProvider>>;
}

impl<F> Registry for F
where
  F: FnMut(usize, FileEntry) -> Result<Option<PublishedProvider>>,
{
  fn provider(&mut self, index: usize, entry: FileEntry) -> Result<Option<PublishedProvider>> {
    self(index, entry)
  }
}

/// What the hook's options say besides the providers and the registry.
#[derive(Debug, Default, Clone)]
pub struct BootOptions {
  /// With `token`, used instead of `<configDir>/credentials`.
  pub mcpd_url: Option<String>,
  /// With `mcpd_url`, used instead of `<configDir>/credentials`.
  pub token: Option<String>,
  /// `configDir`; else `$MCPCTL_HOME`, else `~/.mcpctl`.
  pub config_dir: Option<String>,
}

/// What the boot publishes, and to which mcpd.
pub struct BootPlan {
  /// The opted-in providers found in the registry, in the list's order.
  pub providers: Vec<PublishedProvider>,
  /// The options' when both are given, else the credentials file's.
  pub credentials: Credentials,
  /// Where the credentials file was looked for, and the session id is kept.
  pub config_dir: PathBuf,
}

/// Decides what to publish and where. `None`, after a warning, when no entry
/// is opted in, none of the opted-in ones is in the registry, one is listed
/// twice, or there are no usable credentials. An entry that is not one, or whose provider cannot be
/// had, is left out with a warning; the others are still published.
pub fn plan(
  entries: Vec<Result<FileEntry>>,
  registry: &mut impl Registry,
  options: BootOptions,
) -> Option<BootPlan> {
  let providers = providers(entries, registry)?;
  let config_dir = match resolve_config_dir(options.config_dir.as_deref()) {
    Ok(dir) => dir,
    Err(error) => {
      tracing::warn!(error = %describe(&error), "virtual LLM registrar not started");
      return None;
    }
  };
  let credentials = credentials(options.mcpd_url, options.token, &config_dir)?;
  Some(BootPlan {
    providers,
    credentials,
    config_dir,
  })
}

/// The opted-in entries found in the registry (the `None` cases of [`plan`]).
fn providers(
  entries: Vec<Result<FileEntry>>,
  registry: &mut impl Registry,
) -> Option<Vec<PublishedProvider>> {
  let mut providers: Vec<PublishedProvider> = Vec::new();
  let mut opted_in = 0;
  for (index, entry) in entries.into_iter().enumerate() {
    let entry = match entry {
      Ok(entry) => entry,
      Err(error) => {
        tracing::warn!(index, error = %error, "skipping an invalid provider entry");
        continue;
      }
    };
    if !entry.publish {
      continue;
    }
    opted_in += 1;
    let name = entry.descriptor.name.clone();
    match registry.provider(index, entry) {
      Ok(Some(published)) => providers.push(published),
      Ok(None) => {
        tracing::warn!(provider = %name, "provider is opted in (publish: true) but not in the registry")
      }
      Err(error) => tracing::warn!(provider = %name, error = %error, "not publishing provider"),
    }
  }
  if opted_in == 0 {
    tracing::warn!("no provider has publish: true; virtual LLM registrar not started");
    return None;
  }
  if providers.is_empty() {
    tracing::warn!(
      "none of the opted-in providers is in the registry; virtual LLM registrar not started"
    );
    return None;
  }
  // mcpd routes by name: two entries under one name are a config to fix.
  let mut seen = std::collections::HashSet::new();
  if let Some(twice) = providers.iter().find(|p| !seen.insert(&p.descriptor.name)) {
    tracing::warn!(provider = %twice.descriptor.name, "provider is listed twice; virtual LLM registrar not started");
    return None;
  }
  Some(providers)
}

/// The options' mcpd address and token when both are given, else
/// `<configDir>/credentials`; `None` after a warning (which never quotes the
/// file) when that is missing or unreadable.
fn credentials(
  mcpd_url: Option<String>,
  token: Option<String>,
  config_dir: &Path,
) -> Option<Credentials> {
  match (mcpd_url, token) {
    (Some(mcpd_url), Some(token)) if !token.is_empty() => Some(Credentials {
      mcpd_url,
      token: Secret::new(token),
    }),
    _ => match Credentials::read(config_dir) {
      Ok(credentials) => Some(credentials),
      Err(error) => {
        tracing::warn!(error = %describe(&error), "no usable mcpd credentials; virtual LLM registrar not started");
        None
      }
    },
  }
}

/// Starts `registrar` (holding `hold` while it runs) and waits for its first
/// register and the channel's opening, at most [`BOOT_WAIT`]: a failed first
/// register is retried in the background with backoff, and a slow mcpd is
/// waited for in the background, so the boot goes on either way. The start is
/// claimed when this is called.
pub fn start(
  registrar: &Registrar,
  hold: Option<RunningHold>,
) -> impl Future<Output = ()> + Send + 'static {
  wait_for_first(registrar.start_in_background(hold))
}

/// Waits for `first` at most [`BOOT_WAIT`], and says at debug level why it
/// did not succeed (the register's own failure was a warning already).
async fn wait_for_first(first: impl Future<Output = Result<()>>) {
  match tokio::time::timeout(BOOT_WAIT, first).await {
    Ok(Ok(())) => {}
    Ok(Err(Error::Stopped)) => tracing::debug!("stopped during the boot"),
    Ok(Err(error)) => {
      tracing::debug!(error = %describe(&error), "first register failed; retrying in the background")
    }
    Err(_) => tracing::debug!("mcpd is slow to answer; registering in the background"),
  }
}

#[cfg(test)]
mod tests {
  use std::sync::Arc;

  use parking_lot::Mutex;
  use serde_json::{Map, Value};
  use tokio::time::Instant;

  use super::*;
  use crate::logging::LogRoute;
  use crate::registrar::tests::{config, unused};
  use crate::registrar::RegistrarState;

  const TOKEN: &str = "sk-boot-secret";

  fn descriptor(name: &str) -> ProviderDescriptor {
    ProviderDescriptor {
      name: name.to_owned(),
      kind: "ollama".to_owned(),
      model: None,
      description: None,
      context_window: None,
    }
  }

  fn entry(name: &str, publish: bool) -> Result<FileEntry> {
    Ok(FileEntry {
      descriptor: descriptor(name),
      publish,
      policy: OwnerPolicy::default(),
    })
  }

  fn published(entry: FileEntry) -> PublishedProvider {
    unused(entry.descriptor)
  }

  /// A registry holding `names`; records which names were looked up.
  struct Holding {
    names: &'static [&'static str],
    asked: Vec<String>,
  }

  impl Registry for Holding {
    fn provider(&mut self, _: usize, entry: FileEntry) -> Result<Option<PublishedProvider>> {
      self.asked.push(entry.descriptor.name.clone());
      Ok(
        self
          .names
          .contains(&entry.descriptor.name.as_str())
          .then(|| published(entry)),
      )
    }
  }

  fn registry(names: &'static [&'static str]) -> Holding {
    Holding {
      names,
      asked: Vec::new(),
    }
  }

  type Line = (String, String, Map<String, Value>);

  /// Runs `f` with the registrar's log route, returning what it logged.
  fn logged<T>(f: impl FnOnce() -> T) -> (T, Vec<Line>) {
    let lines: Arc<Mutex<Vec<Line>>> = Arc::default();
    let sink = Arc::clone(&lines);
    let route = LogRoute::register(
      Some(Arc::new(move |level: tracing::Level, message, fields| {
        sink.lock().push((level.to_string(), message, fields))
      })),
      Some(Secret::new(TOKEN)),
    );
    let out = route.span().in_scope(f);
    let lines = lines.lock().clone();
    (out, lines)
  }

  fn warned(lines: &[Line], pattern: &str) -> bool {
    lines.iter().any(|(level, message, fields)| {
      level == "WARN"
        && (message.contains(pattern) || Value::from(fields.clone()).to_string().contains(pattern))
    })
  }

  fn with_credentials(dir: &Path) -> BootOptions {
    std::fs::write(
      dir.join("credentials"),
      format!("{{\"mcpdUrl\": \"http://127.0.0.1:1\", \"token\": \"{TOKEN}\"}}"),
    )
    .unwrap();
    BootOptions {
      config_dir: Some(dir.to_str().unwrap().to_owned()),
      ..BootOptions::default()
    }
  }

  #[test]
  fn nothing_opted_in_is_none_after_a_warning_and_no_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let mut lookup = registry(&["local"]);
    let entries = vec![entry("local", false), entry("other", false)];
    let (plan, lines) = logged(|| plan(entries, &mut lookup, with_credentials(dir.path())));
    assert!(plan.is_none());
    assert!(warned(&lines, "publish: true"), "{lines:?}");
    assert!(lookup.asked.is_empty());
  }

  #[test]
  fn opted_in_but_missing_from_the_registry_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut lookup = registry(&[]);
    let (plan, lines) = logged(|| {
      plan(
        vec![entry("ghost", true)],
        &mut lookup,
        with_credentials(dir.path()),
      )
    });
    assert!(plan.is_none());
    assert!(warned(&lines, "ghost"), "{lines:?}");
    assert!(warned(
      &lines,
      "none of the opted-in providers is in the registry"
    ));
    assert_eq!(lookup.asked, ["ghost"]);
  }

  #[test]
  fn publishes_the_opted_in_entries_found_and_skips_the_rest_with_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let mut found = registry(&["local", "private", "later"]);
    let mut lookup = |index: usize, entry: FileEntry| {
      if entry.descriptor.name == "broken" {
        return Err(Error::InvalidInput(
          "registry.get threw: registry exploded".to_owned(),
        ));
      }
      found.provider(index, entry)
    };
    let entries = vec![
      entry("local", true),
      entry("private", false),
      Err(Error::InvalidInput(
        "providers[2] must be an object".to_owned(),
      )),
      entry("missing", true),
      entry("broken", true),
      entry("later", true),
    ];
    let (plan, lines) = logged(|| plan(entries, &mut lookup, with_credentials(dir.path())));
    let plan = plan.expect("a plan");
    let names: Vec<_> = plan
      .providers
      .iter()
      .map(|p| p.descriptor.name.as_str())
      .collect();
    assert_eq!(names, ["local", "later"]);
    assert!(
      warned(&lines, "providers[2] must be an object"),
      "{lines:?}"
    );
    assert!(warned(&lines, "missing"));
    assert!(warned(&lines, "registry exploded"));
    assert_eq!(plan.credentials.mcpd_url, "http://127.0.0.1:1");
    assert_eq!(plan.config_dir, dir.path());
  }

  #[test]
  fn a_name_listed_twice_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut lookup = registry(&["local"]);
    let entries = vec![entry("local", true), entry("local", true)];
    let (plan, lines) = logged(|| plan(entries, &mut lookup, with_credentials(dir.path())));
    assert!(plan.is_none());
    assert!(warned(&lines, "listed twice"), "{lines:?}");
  }

  #[test]
  fn the_options_credentials_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut lookup = registry(&["local"]);
    let options = BootOptions {
      mcpd_url: Some("http://127.0.0.1:2".to_owned()),
      token: Some("sk-other".to_owned()),
      ..with_credentials(dir.path())
    };
    let given = plan(vec![entry("local", true)], &mut lookup, options).expect("a plan");
    assert_eq!(given.credentials.mcpd_url, "http://127.0.0.1:2");
    assert_eq!(given.credentials.token.expose(), "sk-other");
    // One of the two is not enough: the file is read.
    let mut lookup = registry(&["local"]);
    let options = BootOptions {
      mcpd_url: Some("http://127.0.0.1:2".to_owned()),
      ..with_credentials(dir.path())
    };
    let read = plan(vec![entry("local", true)], &mut lookup, options).expect("a plan");
    assert_eq!(read.credentials.mcpd_url, "http://127.0.0.1:1");
  }

  #[test]
  fn missing_or_broken_credentials_are_none_without_leaking_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let options = BootOptions {
      config_dir: Some(dir.path().to_str().unwrap().to_owned()),
      ..BootOptions::default()
    };
    let mut lookup = registry(&["local"]);
    let (missing, lines) =
      logged(|| plan(vec![entry("local", true)], &mut lookup, options.clone()));
    assert!(missing.is_none());
    assert!(warned(&lines, "credentials"), "{lines:?}");

    std::fs::write(
      dir.path().join("credentials"),
      format!("{{\"mcpdUrl\": \"http://127.0.0.1:1\", \"token\": \"{TOKEN}\""),
    )
    .unwrap();
    let mut lookup = registry(&["local"]);
    let (broken, lines) = logged(|| plan(vec![entry("local", true)], &mut lookup, options));
    assert!(broken.is_none());
    assert!(warned(&lines, "credentials"), "{lines:?}");
    assert!(!format!("{lines:?}").contains(TOKEN));
  }

  #[tokio::test(start_paused = true)]
  async fn the_wait_ends_after_three_seconds_or_at_the_first_failure() {
    let started = Instant::now();
    wait_for_first(std::future::pending()).await;
    assert_eq!(started.elapsed(), BOOT_WAIT);

    let started = Instant::now();
    wait_for_first(async { Err(Error::InvalidInput("refused".to_owned())) }).await;
    assert_eq!(started.elapsed(), Duration::ZERO);

    let started = Instant::now();
    wait_for_first(async {
      tokio::time::sleep(Duration::from_secs(1)).await;
      Ok(())
    })
    .await;
    assert_eq!(started.elapsed(), Duration::from_secs(1));
  }

  /// An mcpd that accepts connections and never answers: the boot goes on
  /// after exactly `BOOT_WAIT`, the registrar still registering.
  #[tokio::test(start_paused = true)]
  async fn a_silent_mcpd_holds_the_boot_three_seconds_and_no_longer() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
      format!("http://{}", silent.local_addr().unwrap()),
      dir.path(),
    );
    let registrar = Registrar::new(config, None, tracing::Span::none()).unwrap();
    let held = Arc::new(());
    let started = Instant::now();
    start(&registrar, Some(Box::new(Arc::clone(&held)))).await;
    assert_eq!(started.elapsed(), BOOT_WAIT);
    assert_eq!(registrar.status().state, RegistrarState::Registering);
    assert!(registrar.is_started());
    assert_eq!(Arc::strong_count(&held), 2, "held while it runs");
    registrar.stop().await;
    assert_eq!(registrar.status().state, RegistrarState::Stopped);
    assert_eq!(Arc::strong_count(&held), 1, "released by stop()");
  }
}
