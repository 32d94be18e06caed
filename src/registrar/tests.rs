//! The handle's own rules, without an mcpd: one started state, one supervisor
//! that outlives a failed start, and nothing left running by a registrar
//! dropped unstarted. (tests/core.rs runs the whole life against a fake mcpd.)

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::provider::{AbortReason, BoxFuture, Provider, ProviderCall, ProviderFailure};
use crate::stream::ChunkReader;
use crate::wire::ProviderDescriptor;

/// A provider to publish; never called by these tests.
struct Unused;

impl Provider for Unused {
  fn can_stream(&self) -> bool {
    false
  }
  fn complete(&self, _: ProviderCall) -> BoxFuture<'static, Result<Value, ProviderFailure>> {
    Box::pin(async { Err(ProviderFailure("unused".to_owned())) })
  }
  fn stream(&self, _: ProviderCall) -> BoxFuture<'static, Result<ChunkReader, ProviderFailure>> {
    Box::pin(async { Err(ProviderFailure("unused".to_owned())) })
  }
  fn abort(&self, _: &str, _: AbortReason) {}
}

/// `descriptor` published with a provider that is never called.
pub(crate) fn unused(descriptor: ProviderDescriptor) -> PublishedProvider {
  PublishedProvider {
    descriptor,
    provider: Arc::new(Unused),
    policy: Default::default(),
  }
}

fn published(name: &str) -> PublishedProvider {
  unused(ProviderDescriptor {
    name: name.to_owned(),
    kind: "ollama".to_owned(),
    model: None,
    description: None,
    context_window: None,
  })
}

/// A registrar for mcpd at `url`, publishing "local", its session file in `dir`.
pub(crate) fn config(url: String, dir: &std::path::Path) -> RegistrarConfig {
  RegistrarConfig {
    mcpd_url: url,
    token: Secret::new("sk-unit-token"),
    providers: vec![published("local")],
    config_dir: dir.to_owned(),
    heartbeat_interval: Duration::from_secs(30),
    idle_timeout: None,
    backoff: BackoffPolicy {
      initial: Duration::from_millis(50),
      max: Duration::from_millis(100),
    },
    dispatch: DispatchSettings::default(),
    allow_insecure_http: false,
  }
}

/// A loopback address where nothing listens: every connect is refused.
fn refusing() -> String {
  let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
  format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test]
async fn a_start_is_claimed_once_and_given_back_with_its_hold_when_it_fails() {
  let dir = tempfile::tempdir().unwrap();
  let registrar =
    Registrar::new(config(refusing(), dir.path()), None, tracing::Span::none()).unwrap();
  let held = Arc::new(());
  let first = registrar.start_holding(Box::new(Arc::clone(&held)));
  assert!(
    registrar.is_started(),
    "claimed when called, not when polled"
  );
  // The second is refused at once, and its hold dropped; the first keeps its own.
  let second = registrar.start_holding(Box::new(Arc::clone(&held)));
  assert_eq!(Arc::strong_count(&held), 2);
  assert!(matches!(second.await, Err(Error::AlreadyStarted)));

  let failed = first.await.unwrap_err();
  assert!(describe(&failed).contains("register"), "{failed}");
  assert!(!registrar.is_started());
  assert_eq!(
    Arc::strong_count(&held),
    1,
    "the failed start dropped its hold"
  );
  assert_eq!(registrar.status().state, RegistrarState::Idle);

  // The same supervisor answers the next start, and updates meanwhile.
  registrar
    .update(vec![published("other")])
    .await
    .expect("an update while idle resolves at once");
  assert_eq!(registrar.status().providers, ["other"]);
  let again = registrar.start().await.unwrap_err();
  assert!(
    !matches!(again, Error::Stopped | Error::AlreadyStarted),
    "{again}"
  );

  registrar.stop().await;
  assert_eq!(registrar.status().state, RegistrarState::Stopped);
  assert!(matches!(registrar.start().await, Err(Error::Stopped)));
  assert!(matches!(
    registrar.update(vec![published("late")]).await,
    Err(Error::Stopped)
  ));
}

#[tokio::test(start_paused = true)]
async fn a_registrar_dropped_unstarted_leaves_nothing_running() {
  let dir = tempfile::tempdir().unwrap();
  let registrar =
    Registrar::new(config(refusing(), dir.path()), None, tracing::Span::none()).unwrap();
  let core = Arc::clone(&registrar.core);
  drop(registrar);
  core.owners.tracker.close();
  // The supervisor ends once its handle is gone: nothing could start it.
  tokio::time::timeout(Duration::from_secs(1), core.owners.tracker.wait())
    .await
    .expect("the supervisor ended");
  assert_eq!(Arc::strong_count(&core), 1);
}

#[test]
fn a_registrar_is_made_inside_a_tokio_runtime() {
  let dir = tempfile::tempdir().unwrap();
  let outside = Registrar::new(config(refusing(), dir.path()), None, tracing::Span::none());
  assert!(matches!(outside, Err(Error::InvalidInput(_))));
}
