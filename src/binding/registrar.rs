//! The JavaScript surface (index.d.ts): the `VirtualLlmRegistrar` class and
//! mcplocal's boot hook `maybeStartVirtualLlmRegistrar`. Thin glue over the core.

use std::sync::Arc;

use napi::bindgen_prelude::{
  Array, FnArgs, Function, FunctionRef, JsObjectValue, JsValue, Object, PromiseRaw, Unknown,
};
use napi::{Env, ValueType};
use tracing::Instrument;

use super::contract::{
  PauseOptions, RegistrarOptions, RegistrarStatus, ResumeOptions, UsageReport, PROVIDER, REGISTRY,
};
use super::error;
use super::options::{self, JsField, JsObject, ProviderEntry, Settings};
use super::provider_bridge::{JsBridge, KeepAlive, KeepAliveSource, ProviderBridge};
use crate::boot::{self, BootOptions, FileEntry, Registry};
use crate::config::{resolve_config_dir, Credentials};
use crate::dispatch::PublishedProvider;
use crate::error::{describe, Error, Result};
use crate::logging::LogRoute;
use crate::registrar::{Registrar, RegistrarConfig, RegistrarState, RunningHold};
use crate::secret::Secret;

/// Publishes local LLM providers to mcpd and serves the inference mcpd relays back.
#[napi]
pub struct VirtualLlmRegistrar {
  core: Arc<Registrar>,
  keep_alive_source: KeepAliveSource,
  /// The registrar's log span: what start() and stop() log goes to its logger.
  span: tracing::Span,
  /// To keep it out of error messages, should mcpd echo it.
  token: Secret,
  /// Publishes the providers of an `update()`.
  publisher: Publisher,
}

/// What both entry points read first: the callbacks, the bridge and the log route.
struct Setup<'env> {
  bridge: Arc<JsBridge>,
  bridge_object: Object<'env>,
  publisher: Publisher,
  keep_alive_source: KeepAliveSource,
  log_route: Arc<LogRoute>,
}

/// `publish(name, provider, type)` of provider_bridge.js; the provider is passed
/// as is, the entry's `type` names it on its spans.
type PublishFn = FunctionRef<FnArgs<(String, Unknown<'static>, String)>, Unknown<'static>>;

/// Hands providers to the JavaScript side of the bridge and wraps them for the
/// core: at construction, and again for each `update()`.
struct Publisher {
  bridge: Arc<JsBridge>,
  publish: PublishFn,
}

/// A provider entry checked, not yet handed to the JavaScript side.
struct Checked<'env> {
  entry: ProviderEntry,
  provider: Object<'env>,
  can_stream: bool,
}

impl Publisher {
  /// Checks one provider; `path` names its entry in errors (`providers[2].`).
  fn check<'env>(
    entry: ProviderEntry,
    provider: Object<'env>,
    path: &str,
  ) -> Result<Checked<'env>> {
    if !options::has_function(&provider, "complete")? {
      return Err(Error::InvalidInput(format!(
        "{path}provider.complete must be a function"
      )));
    }
    let can_stream = options::has_function(&provider, "stream")?;
    Ok(Checked {
      entry,
      provider,
      can_stream,
    })
  }

  /// Checks and publishes one provider.
  fn publish(
    &self,
    env: &Env,
    entry: ProviderEntry,
    provider: Object,
    path: &str,
  ) -> Result<PublishedProvider> {
    let checked = Self::check(entry, provider, path)?;
    self.hand_over(env, checked)
  }

  /// Hands a checked provider to the JavaScript side under its name (a
  /// provider published before under that name is replaced there for the
  /// calls that start from now on) and wraps it for the core.
  fn hand_over(&self, env: &Env, checked: Checked) -> Result<PublishedProvider> {
    let Checked {
      entry,
      provider,
      can_stream,
    } = checked;
    let publish = self.publish.borrow_back(env).map_err(napi_failure)?;
    // SAFETY: a live value of this environment, used within this call only.
    let provider = unsafe { Unknown::from_raw_unchecked(env.raw(), provider.raw()) };
    publish
      .call(
        (
          entry.descriptor.name.clone(),
          provider,
          entry.descriptor.kind.clone(),
        )
          .into(),
      )
      .map_err(napi_failure)?;
    Ok(PublishedProvider {
      provider: Arc::new(ProviderBridge {
        name: entry.descriptor.name.clone(),
        can_stream,
        bridge: Arc::clone(&self.bridge),
      }),
      descriptor: entry.descriptor,
      policy: Arc::new(entry.policy),
    })
  }

  /// The whole set of `RegistrarOptions['providers']` (the constructor's, and
  /// `update()`'s): a non-empty array of entries with their `provider`; entries
  /// with `publish: false` are left out (after a warning); names unique. Every
  /// entry is checked before any is handed over: bad input changes nothing.
  fn set(&self, env: &Env, entries: Option<Unknown>) -> Result<Vec<PublishedProvider>> {
    let entries: Array = entries
      .filter(|value| value.is_array().unwrap_or(false))
      // SAFETY: checked to be an array just above.
      .and_then(|value| unsafe { value.cast::<Array>() }.ok())
      .filter(|array| array.len() > 0)
      .ok_or_else(|| Error::InvalidInput("providers must be a non-empty array".to_owned()))?;
    let mut providers = Vec::new();
    for index in 0..entries.len() {
      let path = format!("providers[{index}].");
      let entry: Object = entries
        .get::<Unknown>(index)
        .ok()
        .flatten()
        .filter(|value| value.get_type().ok() == Some(ValueType::Object))
        // SAFETY: checked to be an object just above.
        .and_then(|value| unsafe { value.cast::<Object>() }.ok())
        .ok_or_else(|| Error::InvalidInput(format!("providers[{index}] must be an object")))?;
      let parsed = options::provider_entry(&entry, &path)?;
      if parsed.publish == Some(false) {
        tracing::warn!(provider = %parsed.descriptor.name, "not publishing a provider marked publish: false");
        continue;
      }
      let provider = options::object(&entry, PROVIDER, &path)?
        .ok_or_else(|| Error::InvalidInput(format!("{path}provider must be an LlmProvider")))?;
      providers.push(Self::check(parsed, provider, &path)?);
    }
    options::check_unique(providers.iter().map(|p| p.entry.descriptor.name.as_str()))?;
    if providers.is_empty() {
      return Err(Error::InvalidInput(
        "providers must name at least one provider to publish (every entry has publish: false)"
          .to_owned(),
      ));
    }
    providers
      .into_iter()
      .map(|checked| self.hand_over(env, checked))
      .collect()
  }
}

impl<'env> Setup<'env> {
  fn new(
    env: &'env Env,
    logger: Option<Object<'env>>,
    on_state_change: Option<Function<'env>>,
  ) -> Result<Self> {
    if let Some(logger) = &logger {
      for level in ["debug", "info", "warn", "error"] {
        if !options::has_function(logger, level)? {
          return Err(Error::InvalidInput(format!(
            "logger.{level} must be a function"
          )));
        }
      }
    }
    let has_logger = logger.is_some();
    let parts = JsBridge::create(env, logger, on_state_change).map_err(napi_failure)?;
    let sink = has_logger.then(|| parts.bridge.log_sink());
    let publish: Function<FnArgs<(String, Unknown<'static>, String)>, Unknown<'static>> = parts
      .object
      .get_named_property("publish")
      .map_err(napi_failure)?;
    Ok(Self {
      log_route: Arc::new(LogRoute::register(sink, None)),
      publisher: Publisher {
        bridge: Arc::clone(&parts.bridge),
        publish: publish.create_ref().map_err(napi_failure)?,
      },
      bridge: parts.bridge,
      bridge_object: parts.object,
      keep_alive_source: parts.keep_alive,
    })
  }

  /// `registry.get(name)`, called on the JavaScript side so that a throwing
  /// registry is an error here, not a JavaScript exception.
  fn lookup(&self, registry: Object<'env>, name: &str) -> Result<Option<Object<'env>>> {
    let lookup: Function<FnArgs<(Object, String)>, Object> = self
      .bridge_object
      .get_named_property("lookup")
      .map_err(napi_failure)?;
    let found = lookup
      .call((registry, name.to_owned()).into())
      .map_err(napi_failure)?;
    if let Some(error) = options::string(&found, "error", "")? {
      return Err(Error::InvalidInput(format!("registry.get threw: {error}")));
    }
    options::object(&found, "provider", "")
  }

  fn build(
    self,
    settings: Settings,
    credentials: Credentials,
    providers: Vec<PublishedProvider>,
  ) -> Result<VirtualLlmRegistrar> {
    self.log_route.set_token(credentials.token.clone());
    let token = credentials.token.clone();
    let config_dir = resolve_config_dir(settings.config_dir.as_deref())?;
    let audit = settings
      .audit
      .as_ref()
      .map(|audit| audit.config(&config_dir));
    let config = RegistrarConfig {
      mcpd_url: credentials.mcpd_url,
      token: credentials.token,
      providers,
      config_dir,
      heartbeat_interval: settings.heartbeat_interval,
      idle_timeout: settings.idle_timeout,
      backoff: settings.backoff,
      dispatch: settings.dispatch,
      allow_insecure_http: settings.allow_insecure_http,
    };
    // The registrar spawns its supervisor on the addon's runtime.
    let core = napi::bindgen_prelude::within_runtime_if_available(|| {
      Registrar::new(
        config,
        Some(self.bridge.status_observer()),
        self.log_route.span(),
      )
    })?;
    let span = self.log_route.span();
    if let Some(audit) = &audit {
      core.open_audit(audit, token.clone());
    }
    core.keep_for_life(Box::new(self.log_route));
    Ok(VirtualLlmRegistrar {
      core: Arc::new(core),
      keep_alive_source: self.keep_alive_source,
      span,
      token,
      publisher: self.publisher,
    })
  }
}

/// The options argument as an object; a clear error for none, `null` or a non-object.
fn options_object<'env>(options: Option<Unknown<'env>>, call: &str) -> Result<Object<'env>> {
  let what = options
    .as_ref()
    .and_then(|value| value.get_type().ok())
    .unwrap_or(ValueType::Undefined);
  match (options, what) {
    // SAFETY: the type was checked just above.
    (Some(options), ValueType::Object) => unsafe { options.cast() }.map_err(napi_failure),
    (_, ValueType::Undefined | ValueType::Null) => Err(Error::InvalidInput(format!(
      "{call} needs an options object ({{ mcpdUrl, token, providers, ... }})"
    ))),
    _ => Err(Error::InvalidInput(format!(
      "{call} needs an options object; got a {what}"
    ))),
  }
}

fn napi_failure(error: napi::Error) -> Error {
  Error::InvalidInput(error.reason.clone())
}

#[napi]
impl VirtualLlmRegistrar {
  /// Checks the options and reads the sticky session id; contacts nobody until `start()`.
  /// Throws a `RegistrarError` (`code` 'ERR_INVALID_OPTION', naming the option)
  /// for a missing, mistyped, misspelled or unknown option.
  #[napi(constructor, ts_args_type = "options: RegistrarOptions")]
  pub fn new(env: Env, options: Option<Unknown>) -> napi::Result<Self> {
    // Kept out of the message, should an option's text carry it.
    let token = options
      .as_ref()
      .filter(|value| value.get_type().ok() == Some(ValueType::Object))
      // SAFETY: the type was checked just above.
      .and_then(|value| unsafe { value.cast::<Object>() }.ok())
      .and_then(|object| options::string(&object, "token", "").ok().flatten())
      .filter(|token| !token.is_empty())
      .map(Secret::new);
    Self::from_options(&env, options).map_err(error::js(&env, token.as_ref()))
  }

  fn from_options(env: &Env, options: Option<Unknown>) -> Result<Self> {
    let options = options_object(options, "new VirtualLlmRegistrar(options)")?;
    options::check_names(&options, RegistrarOptions::fields(), "")?;
    let options = RegistrarOptions::read(&options, "")?;
    let setup = Setup::new(env, options.logger, options.on_state_change)?;
    let settings = options::settings(&options)?;
    let credentials = Credentials {
      mcpd_url: settings
        .mcpd_url
        .clone()
        .ok_or_else(|| Error::InvalidInput("mcpdUrl must be a string".to_owned()))?,
      token: Secret::new(
        settings
          .token
          .clone()
          .filter(|token| !token.is_empty())
          .ok_or_else(|| Error::InvalidInput("token must be a non-empty string".to_owned()))?,
      ),
    };
    let providers = setup
      .log_route
      .span()
      .in_scope(|| setup.publisher.set(env, options.providers.0))?;
    setup.build(settings, credentials, providers)
  }

  /// Registers, persists the session id, opens the channel, starts the heartbeat.
  /// Resolves once the channel is open (state `connected`), so a task that mcpd
  /// sends from then on is run; a stream connect that fails after a good register
  /// is retried with backoff while it waits.
  /// Rejects with a `RegistrarError` when the first register fails (`code`
  /// 'ERR_REGISTER_FAILED' or 'ERR_UNAUTHORIZED', with `status` when mcpd
  /// answered an HTTP error), after stop() ('ERR_STOPPED'), or when already
  /// started ('ERR_ALREADY_STARTED').
  #[napi(ts_return_type = "Promise<void>")]
  pub fn start<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
    let token = self.token.clone();
    // Claimed now, in the order of the JavaScript calls; a refused start, or
    // one that fails, drops the hold.
    let starting = self.core.start_holding(self.event_loop_hold(env)?);
    let span = self.span.clone();
    env.spawn_future_with_callback(
      async move { Ok(starting.instrument(span).await) },
      move |env, started| started.map_err(error::js(env, Some(&token))),
    )
  }

  /// Stops taking tasks, aborts in-flight ones (answered 503), closes the channel,
  /// clears timers. Idempotent. Afterwards nothing keeps the Node process alive.
  #[napi(ts_return_type = "Promise<void>")]
  pub fn stop<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
    let core = Arc::clone(&self.core);
    let span = self.span.clone();
    env.spawn_future(async move {
      core.stop().instrument(span).await;
      Ok(())
    })
  }

  /// A snapshot of the registrar's state and counters.
  #[napi]
  pub fn status(&self) -> RegistrarStatus {
    self.core.status().into()
  }

  /// A strong reference on Node's event loop, for the core to hold while the
  /// registrar runs (until stop(), or until the start fails).
  fn event_loop_hold(&self, env: &Env) -> napi::Result<RunningHold> {
    let source = self.keep_alive_source.borrow_back(env)?;
    let keep_alive: KeepAlive = source
      .build_threadsafe_function()
      .callee_handled::<false>()
      .weak::<false>()
      .build()?;
    Ok(Box::new(keep_alive))
  }
}

// update(providers) (index.d.ts; docs/protocol.md section 1, "Changing the set").
#[napi]
impl VirtualLlmRegistrar {
  /// Replaces the published set without a restart (docs/protocol.md section 1,
  /// "Changing the set"): re-registers under the same session id with the whole
  /// new set, the control channel left open. Resolves once mcpd has accepted it.
  ///
  /// - A failed register is retried with backoff (the `backoff` option); the
  ///   old set stays published and served until one succeeds.
  /// - Then: new names are served; a name that left gets 404 `model_not_found`
  ///   for later tasks, while its tasks in flight run to their end; the
  ///   heartbeat and `status().providers` show the new set.
  /// - A kept name keeps its load figures and counters; its new entry (`model`,
  ///   ...) applies once mcpd accepted the set, its new `provider` object to
  ///   the calls that start after `update()` was called.
  /// - Before `start()` (or after a failed one): replaces the set that `start()`
  ///   registers, and resolves at once.
  /// - Concurrent calls: the last set wins; every call still waiting resolves
  ///   when mcpd has accepted it (an earlier set may never be sent).
  /// - The set is checked like the constructor's `providers` (entries with
  ///   `publish: false` are left out); an empty set is bad input: to publish
  ///   nothing, call `stop()`.
  ///
  /// Rejects with a `RegistrarError` only for bad input ('ERR_INVALID_OPTION',
  /// nothing changed), or after or during `stop()` ('ERR_STOPPED').
  #[napi(
    ts_args_type = "providers: RegistrarOptions['providers']",
    ts_return_type = "Promise<void>"
  )]
  pub fn update<'env>(
    &self,
    env: &'env Env,
    providers: Option<Unknown>,
  ) -> napi::Result<PromiseRaw<'env, ()>> {
    let set = if self.core.status().state == RegistrarState::Stopped {
      Err(Error::Stopped)
    } else {
      self.span.in_scope(|| self.publisher.set(env, providers))
    };
    // The set goes to the supervisor now, in the order of the JavaScript calls.
    let updating = set.map(|providers| {
      let _entered = self.span.enter();
      self.core.update(providers)
    });
    let span = self.span.clone();
    let token = self.token.clone();
    env.spawn_future_with_callback(
      async move {
        Ok(match updating {
          Ok(updating) => updating.instrument(span).await,
          Err(error) => Err(error),
        })
      },
      move |env, updated| updated.map_err(error::js(env, Some(&token))),
    )
  }
}

/// The options object of `pause()`/`resume()`: absent (or `undefined`) is `{}`;
/// anything else must be an object of known names.
fn control_options<'env, T: JsObject<'env>>(
  env: &'env Env,
  options: Option<Unknown<'env>>,
  call: &str,
) -> Result<T> {
  let object = match options {
    None => None,
    Some(value) => match value.get_type().unwrap_or(ValueType::Unknown) {
      ValueType::Undefined => None,
      // SAFETY: the type was checked just above.
      ValueType::Object => Some(unsafe { value.cast::<Object>() }.map_err(napi_failure)?),
      other => {
        return Err(Error::InvalidInput(format!(
          "{call} takes an options object; got a {other}"
        )))
      }
    },
  };
  match object {
    Some(object) => {
      options::check_names(&object, T::fields(), "")?;
      T::read(&object, "")
    }
    None => T::read(&Object::new(env).map_err(napi_failure)?, ""),
  }
}

// pause(), resume(), usage(): the owner's controls (index.d.ts; docs/protocol.md,
// "Callers and the owner's limits").
#[napi]
impl VirtualLlmRegistrar {
  /// Stops admitting new tasks, for one provider or all: they are answered 503
  /// `provider_paused` (no `retry-after`: nobody knows when the owner resumes); tasks
  /// already admitted (running or queued) go on. A pause of the whole registrar
  /// covers providers added by `update()` while it lasts. The heartbeat says
  /// `paused: true` at once, and `status().paused` lists the paused names. With
  /// `drain: true` it resolves once the admitted tasks have ended. Not persisted:
  /// `publish: false` in the config is the lasting switch.
  ///
  /// Rejects with a `RegistrarError`: 'ERR_INVALID_OPTION' for a provider not
  /// published or a bad option (nothing paused), 'ERR_STOPPED' after `stop()` or
  /// when `stop()` comes while it drains.
  #[napi(
    ts_args_type = "options?: PauseOptions",
    ts_return_type = "Promise<void>"
  )]
  pub fn pause<'env>(
    &self,
    env: &'env Env,
    options: Option<Unknown>,
  ) -> napi::Result<PromiseRaw<'env, ()>> {
    let pausing = control_options::<PauseOptions>(env, options, "pause(options)").map(|options| {
      self
        .core
        .pause(options.provider, options.drain.unwrap_or(false))
    });
    let span = self.span.clone();
    let token = self.token.clone();
    env.spawn_future_with_callback(
      async move {
        Ok(match pausing {
          Ok(pausing) => pausing.instrument(span).await,
          Err(error) => Err(error),
        })
      },
      move |env, paused| paused.map_err(error::js(env, Some(&token))),
    )
  }

  /// Lifts the pause of one provider (a pause of the whole registrar stays), or,
  /// with no provider, every pause. The heartbeat says so at once. Throws a
  /// `RegistrarError` 'ERR_INVALID_OPTION' for a provider not published or a bad
  /// option.
  #[napi(ts_args_type = "options?: ResumeOptions")]
  pub fn resume(&self, env: Env, options: Option<Unknown>) -> napi::Result<()> {
    control_options::<ResumeOptions>(&env, options, "resume(options)")
      .and_then(|options| self.core.resume(options.provider.as_deref()))
      .map_err(error::js(&env, Some(&self.token)))
  }

  /// Tasks, tokens and refusals since the registrar was made, per provider and per
  /// caller id.
  #[napi]
  pub fn usage(&self) -> UsageReport {
    self.core.usage().into()
  }
}

/// mcplocal's boot hook. Resolves null (after a logger.warn) when no provider is
/// opted in, none of the opted-in ones is in the registry, or the credentials
/// file (<configDir>/credentials: { "mcpdUrl": string, "token": string }) is
/// missing or unreadable. Never rejects: a failed first register is logged and
/// retried in the background with backoff.
#[napi(
  ts_args_type = "options: { providers: LlmProviderFileEntry[]; registry: Map<string, LlmProvider> | { get(name: string): LlmProvider | undefined } } & Partial<Omit<RegistrarOptions, 'providers'>>",
  ts_return_type = "Promise<VirtualLlmRegistrar | null>"
)]
pub fn maybe_start_virtual_llm_registrar<'env>(
  env: &'env Env,
  options: Unknown<'env>,
) -> napi::Result<PromiseRaw<'env, Option<VirtualLlmRegistrar>>> {
  let registrar = match prepare_boot(env, options) {
    Ok(registrar) => registrar,
    Err(error) => {
      // Still never rejects: an unusable option is a warning at boot.
      tracing::warn!(target: "mcpctl_registrar", error = %describe(&error), "virtual LLM registrar not started");
      None
    }
  };
  let Some(registrar) = registrar else {
    return env.spawn_future_with_callback(async { Ok(()) }, |_, ()| Ok(None));
  };
  let booting = boot::start(&registrar.core, Some(registrar.event_loop_hold(env)?));
  let span = registrar.span.clone();
  env.spawn_future_with_callback(
    async move {
      booting.instrument(span).await;
      Ok(())
    },
    move |_, ()| Ok(Some(registrar)),
  )
}

/// `Ok(None)` for the cases index.d.ts says resolve null, after a warning.
fn prepare_boot(env: &Env, options: Unknown) -> Result<Option<VirtualLlmRegistrar>> {
  let options = options_object(Some(options), "maybeStartVirtualLlmRegistrar(options)")?;
  let read = RegistrarOptions::read(&options, "");
  let setup = match &read {
    Ok(read) => Setup::new(env, read.logger, read.on_state_change)?,
    // A mistyped option is still warned to the logger, when that one is usable
    // (contract.rs's tests keep `logger` among the option names).
    Err(_) => {
      let logger = JsField::from_field(options::field(&options, "logger")?, "logger");
      Setup::new(env, logger.ok().flatten(), None)?
    }
  };
  // From here on, warnings go to the caller's logger: the route outlives `setup`.
  let route = Arc::clone(&setup.log_route);
  let span = route.span();
  let _entered = span.enter();
  read
    .and_then(|read| boot(env, &options, read, setup))
    .or_else(|error| {
      tracing::warn!(error = %describe(&error), "virtual LLM registrar not started");
      Ok(None)
    })
}

/// The part of `prepare_boot` that runs with the caller's logger in place:
/// converts the options for the core's boot policy (crate::boot).
fn boot<'env>(
  env: &Env,
  options: &Object<'env>,
  read: RegistrarOptions<'env>,
  setup: Setup<'env>,
) -> Result<Option<VirtualLlmRegistrar>> {
  // The registrar's names, and `registry`.
  let known = [RegistrarOptions::fields(), &[REGISTRY]].concat();
  options::check_names(options, &known, "")?;
  let settings = options::settings(&read)?;
  let registry = options::object(options, REGISTRY, "")?.ok_or_else(|| {
    Error::InvalidInput("registry must be a Map or an object with get(name)".to_owned())
  })?;
  if !options::has_function(&registry, "get")? {
    return Err(Error::InvalidInput(
      "registry.get must be a function".to_owned(),
    ));
  }
  let entries: Array = read
    .providers
    .0
    .filter(|value| value.is_array().unwrap_or(false))
    // SAFETY: checked to be an array just above.
    .and_then(|value| unsafe { value.cast::<Array>() }.ok())
    .ok_or_else(|| Error::InvalidInput("providers must be an array".to_owned()))?;
  let entries = (0..entries.len())
    .map(|index| {
      let path = format!("providers[{index}].");
      let entry = entries
        .get::<Object>(index)
        .ok()
        .flatten()
        .ok_or_else(|| Error::InvalidInput(format!("providers[{index}] must be an object")))?;
      let parsed = options::provider_entry(&entry, &path)?;
      Ok(FileEntry {
        descriptor: parsed.descriptor,
        publish: parsed.publish == Some(true),
        policy: parsed.policy,
      })
    })
    .collect();
  let given = BootOptions {
    mcpd_url: settings.mcpd_url.clone(),
    token: settings.token.clone(),
    config_dir: settings.config_dir.clone(),
  };
  let mut registry = JsRegistry {
    env,
    setup: &setup,
    registry,
  };
  let Some(plan) = boot::plan(entries, &mut registry, given) else {
    return Ok(None);
  };
  setup
    .build(settings, plan.credentials, plan.providers)
    .map(Some)
}

/// mcplocal's registry (a `Map`, or an object with `get(name)`), for the boot.
struct JsRegistry<'a, 'env> {
  env: &'a Env,
  setup: &'a Setup<'env>,
  registry: Object<'env>,
}

impl Registry for JsRegistry<'_, '_> {
  fn provider(&mut self, index: usize, entry: FileEntry) -> Result<Option<PublishedProvider>> {
    let Some(provider) = self.setup.lookup(self.registry, &entry.descriptor.name)? else {
      return Ok(None);
    };
    let entry = ProviderEntry {
      descriptor: entry.descriptor,
      publish: Some(true),
      policy: entry.policy,
    };
    let path = format!("providers[{index}].");
    self
      .setup
      .publisher
      .publish(self.env, entry, provider, &path)
      .map(Some)
  }
}

// metrics(): issue 17, item 2 (observe/metrics.rs).
#[napi]
impl VirtualLlmRegistrar {
  /// This registrar's metrics, in the Prometheus text exposition format 0.0.4 (not
  /// OpenMetrics: no `# EOF`), for mcplocal to serve joined with its own
  /// (prom-client's) text on one route. Each registrar has its own registry.
  /// Meanings follow vLLM's; times are measured from a task's arrival at the
  /// registrar. Counts follow `status()`: every task that reached the registrar
  /// (not a refused task id or a replay), by outcome.
  ///
  /// Labelled `provider` (a published name; "(unknown)" for a task naming no
  /// provider this registrar serves, never mcpd's string):
  /// - `mcpctl_registrar_requests_running` (gauge): tasks holding a concurrency slot now.
  /// - `mcpctl_registrar_requests_waiting` (gauge): tasks in the provider's queue now.
  /// - `mcpctl_registrar_requests_total{outcome}` (counter): tasks ended, `outcome`
  ///   'completed' | 'failed' | 'cancelled'.
  /// - `mcpctl_registrar_requests_refused_total{reason}` (counter): refused by the
  ///   owner's controls, `reason` as in `usage()` ('caller_not_allowed',
  ///   'requests_per_minute', 'tokens_per_minute', 'tokens_per_day',
  ///   'max_tokens_exceeded', 'request_too_large', 'provider_paused', 'queue_full').
  /// - `mcpctl_registrar_request_queue_time_seconds` (histogram): arrival to slot.
  /// - `mcpctl_registrar_time_to_first_token_seconds` (histogram): arrival to first
  ///   content, one sample per streamed task that produced content.
  /// - `mcpctl_registrar_inter_token_latency_seconds` (histogram): gaps between a
  ///   stream's content reads.
  /// - `mcpctl_registrar_e2e_request_latency_seconds` (histogram): arrival to end,
  ///   per task that got a slot.
  /// - `mcpctl_registrar_prompt_tokens_total`, `mcpctl_registrar_generation_tokens_total`
  ///   (counters): tokens as `usage()` books them.
  ///
  /// Without a provider label:
  /// - `mcpctl_registrar_reconnects_total` (counter): `status().reconnects`.
  /// - `mcpctl_registrar_state{state}` (gauge): 1 for the current `RegistrarState`,
  ///   0 for the others.
  /// - `mcpctl_registrar_audit_lines_dropped_total` (counter): audit log lines dropped.
  #[napi]
  pub fn metrics(&self) -> String {
    self.core.metrics()
  }
}
