//! Reads and checks the JavaScript options object (API.md `RegistrarOptions`)
//! into the core's configuration; every bad option is a clear `InvalidArg`.

use std::collections::HashSet;
use std::time::Duration;

use napi::bindgen_prelude::{FromNapiValue, Function, Object, Unknown};
use napi::ValueType;

use crate::backoff::BackoffPolicy;
use crate::dispatch::DispatchSettings;
use crate::error::{Error, Result};
use crate::wire::ProviderDescriptor;

/// The largest duration an option may ask for (about 24 days, a JS timer's limit).
const MAX_MS: f64 = 2_147_483_647.0;

/// The options other than the providers and the callbacks.
pub struct Settings {
  pub mcpd_url: Option<String>,
  pub token: Option<String>,
  pub config_dir: Option<String>,
  pub heartbeat_interval: Duration,
  pub idle_timeout: Option<Duration>,
  pub backoff: BackoffPolicy,
  pub dispatch: DispatchSettings,
  pub allow_insecure_http: bool,
}

/// One provider entry (API.md `LlmProviderFileEntry`), without its `LlmProvider`.
pub struct ProviderEntry {
  pub descriptor: ProviderDescriptor,
  pub publish: Option<bool>,
}

fn invalid(message: String) -> Error {
  Error::InvalidInput(message)
}

/// The property, or `None` when it is `undefined` or `null`.
fn field<'env>(object: &Object<'env>, key: &str) -> Result<Option<Unknown<'env>>> {
  let value: Option<Unknown> = object
    .get(key)
    .map_err(|error| invalid(format!("cannot read option '{key}': {}", error.reason)))?;
  Ok(value.filter(|value| !matches!(value.get_type(), Ok(ValueType::Null | ValueType::Undefined))))
}

fn type_of(value: &Unknown) -> ValueType {
  value.get_type().unwrap_or(ValueType::Unknown)
}

/// The property as `T` when its JavaScript type is `expected`; `what` names
/// that type in the error ("a string").
fn typed<'env, T: FromNapiValue>(
  object: &Object<'env>,
  key: &str,
  path: &str,
  expected: ValueType,
  what: &str,
) -> Result<Option<T>> {
  match field(object, key)? {
    None => Ok(None),
    Some(value) if type_of(&value) == expected => {
      // SAFETY: the JavaScript type was checked just above.
      let value: T = unsafe { value.cast() }.map_err(|e| invalid(e.reason))?;
      Ok(Some(value))
    }
    Some(_) => Err(invalid(format!("{path}{key} must be {what}"))),
  }
}

pub fn string(object: &Object, key: &str, path: &str) -> Result<Option<String>> {
  typed(object, key, path, ValueType::String, "a string")
}

fn number(object: &Object, key: &str, path: &str) -> Result<Option<f64>> {
  match typed::<f64>(object, key, path, ValueType::Number, "a number")? {
    Some(number) if !number.is_finite() => {
      Err(invalid(format!("{path}{key} must be a finite number")))
    }
    number => Ok(number),
  }
}

pub fn boolean(object: &Object, key: &str, path: &str) -> Result<Option<bool>> {
  typed(object, key, path, ValueType::Boolean, "a boolean")
}

pub fn object<'env>(object: &Object<'env>, key: &str, path: &str) -> Result<Option<Object<'env>>> {
  typed(object, key, path, ValueType::Object, "an object")
}

pub fn function<'env>(
  object: &Object<'env>,
  key: &str,
  path: &str,
) -> Result<Option<Function<'env>>> {
  typed(object, key, path, ValueType::Function, "a function")
}

/// Whether `object[key]` is a function (for `provider.stream`).
pub fn has_function(object: &Object, key: &str) -> Result<bool> {
  Ok(field(object, key)?.is_some_and(|value| type_of(&value) == ValueType::Function))
}

/// Milliseconds as a duration; `allow_zero` for the options where 0 means "off".
fn millis(object: &Object, key: &str, path: &str, allow_zero: bool) -> Result<Option<Duration>> {
  let Some(ms) = number(object, key, path)? else {
    return Ok(None);
  };
  let floor = if allow_zero { 0.0 } else { 1.0 };
  if !(floor..=MAX_MS).contains(&ms) {
    let lower = if allow_zero { "0" } else { "1" };
    return Err(invalid(format!(
      "{path}{key} must be between {lower} and {MAX_MS} ms"
    )));
  }
  Ok(Some(Duration::from_millis(ms as u64)))
}

fn count(object: &Object, key: &str, minimum: u32) -> Result<Option<u32>> {
  let Some(value) = number(object, key, "")? else {
    return Ok(None);
  };
  if value.fract() != 0.0 || value < f64::from(minimum) || value > 1_000_000.0 {
    return Err(invalid(format!(
      "{key} must be an integer from {minimum} to 1000000"
    )));
  }
  Ok(Some(value as u32))
}

pub fn settings(options: &Object) -> Result<Settings> {
  let mut backoff = BackoffPolicy::default();
  if let Some(limits) = object(options, "backoff", "")? {
    if let Some(initial) = millis(&limits, "initialMs", "backoff.", false)? {
      backoff.initial = initial;
    }
    if let Some(max) = millis(&limits, "maxMs", "backoff.", false)? {
      backoff.max = max;
    }
    if backoff.max < backoff.initial {
      return Err(invalid(
        "backoff.maxMs must not be below backoff.initialMs".to_owned(),
      ));
    }
  }
  let mut dispatch = DispatchSettings::default();
  if let Some(timeout) = millis(options, "taskTimeoutMs", "", false)? {
    dispatch.task_timeout = timeout;
  }
  if let Some(limit) = count(options, "maxConcurrency", 1)? {
    dispatch.max_concurrency = limit;
  }
  if let Some(limit) = count(options, "maxQueue", 0)? {
    dispatch.max_queue = limit;
  }
  let idle_timeout = match millis(options, "idleTimeoutMs", "", true)? {
    None => Some(Duration::from_secs(60)),
    Some(Duration::ZERO) => None,
    Some(idle) => Some(idle),
  };
  Ok(Settings {
    mcpd_url: string(options, "mcpdUrl", "")?,
    token: string(options, "token", "")?,
    config_dir: string(options, "configDir", "")?,
    heartbeat_interval: millis(options, "heartbeatIntervalMs", "", false)?
      .unwrap_or(Duration::from_secs(30)),
    idle_timeout,
    backoff,
    dispatch,
    allow_insecure_http: boolean(options, "allowInsecureHttp", "")?.unwrap_or(false),
  })
}

/// One `LlmProviderFileEntry`; `path` names it in errors (`providers[2].`).
pub fn provider_entry(entry: &Object, path: &str) -> Result<ProviderEntry> {
  let name = string(entry, "name", path)?
    .filter(|name| !name.trim().is_empty())
    .ok_or_else(|| invalid(format!("{path}name must be a non-empty string")))?;
  let kind =
    string(entry, "type", path)?.ok_or_else(|| invalid(format!("{path}type must be a string")))?;
  let context_window = match number(entry, "contextWindow", path)? {
    None => None,
    Some(window) if window.fract() == 0.0 && window >= 1.0 && window <= f64::from(u32::MAX) => {
      Some(window as u32)
    }
    Some(_) => {
      return Err(invalid(format!(
        "{path}contextWindow must be a positive integer"
      )))
    }
  };
  Ok(ProviderEntry {
    descriptor: ProviderDescriptor {
      name,
      kind,
      model: string(entry, "model", path)?,
      description: string(entry, "description", path)?,
      context_window,
    },
    publish: boolean(entry, "publish", path)?,
  })
}

/// Names must be unique: mcpd routes by name.
pub fn check_unique<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<()> {
  let mut seen = HashSet::new();
  for name in names {
    if !seen.insert(name) {
      return Err(invalid(format!("provider '{name}' is listed twice")));
    }
  }
  Ok(())
}
