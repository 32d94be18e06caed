//! `@mcpctl/registrar`: publishes mcplocal's LLM providers to mcpd as virtual
//! LLMs and serves the inference mcpd relays back. The core (everything but
//! `binding`) knows nothing of napi at run time (openai.rs's JSON types carry
//! `#[napi(object)]` only to generate index.d.ts); `binding` is the JavaScript surface.
#![deny(clippy::all)]

#[macro_use]
extern crate napi_derive;

pub mod backoff;
pub mod boot;
// napi-derive registers the exports only outside test builds.
#[cfg_attr(test, allow(dead_code))]
mod binding;
pub mod channel;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod heartbeat;
pub mod logging;
pub mod mcpd;
pub mod observe;
pub mod openai;
pub mod owner;
pub mod provider;
pub mod registrar;
pub mod secret;
pub mod shape;
pub mod sse;
pub mod stream;
pub mod trace;
pub mod wire;

/// The property tests' settings: `PROPTEST_CASES` cases when set (scripts/stress.sh
/// sets it higher), else `default`; no regression files (a shrunk failure is kept
/// as an example test instead).
#[cfg(test)]
pub(crate) fn proptest_config(default: u32) -> proptest::test_runner::Config {
  let cases = std::env::var("PROPTEST_CASES")
    .ok()
    .and_then(|cases| cases.parse().ok())
    .unwrap_or(default);
  proptest::test_runner::Config {
    cases,
    failure_persistence: None,
    ..proptest::test_runner::Config::default()
  }
}

/// The registrar runs on its own small runtime with named threads, so that its
/// threads are recognisable in a profiler or a thread dump of mcplocal. One
/// worker: against two (`npm run bench`, docs/benchmark.md "One runtime worker")
/// it takes a fifth to a third less CPU per task at 64 in flight and 0.88-0.97x
/// the CPU per sequential task, with 3 wake-ups a back-to-back task instead of 4.5:
/// mcpd's answer and the next task's event are read in one wake-up, and no second
/// worker is woken to look for work. Measured on a quiet machine; at load 10-12 one
/// worker was no cheaper and streamed half as fast (the same document). Nothing may
/// block it: the session file is saved on `spawn_blocking`'s pool, and the audit log
/// writes on its own thread.
#[napi_derive::module_init]
fn init() {
  let runtime = tokio::runtime::Builder::new_multi_thread()
    .worker_threads(1)
    .thread_name("mcpctl-registrar")
    .enable_all()
    .build();
  match runtime {
    Ok(runtime) => napi::bindgen_prelude::create_custom_tokio_runtime(runtime),
    Err(error) => {
      eprintln!("[mcpctl-registrar] cannot build its runtime, using napi's default: {error}")
    }
  }
}
