//! Reads and checks the JavaScript options object (API.md `RegistrarOptions`)
//! into the core's configuration; every bad option is a clear ERR_INVALID_OPTION,
//! and so is an unknown option name, with the nearest known one.

use std::collections::HashSet;
use std::time::Duration;

use napi::bindgen_prelude::{FromNapiValue, Function, JsValue, Object, Unknown};
use napi::{sys, ValueType};

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

/// The names `new VirtualLlmRegistrar(options)` knows (API.md `RegistrarOptions`).
pub const REGISTRAR_OPTIONS: &[&str] = &[
  "mcpdUrl",
  "token",
  "providers",
  "configDir",
  "heartbeatIntervalMs",
  "idleTimeoutMs",
  "backoff",
  "taskTimeoutMs",
  "maxConcurrency",
  "maxQueue",
  "allowInsecureHttp",
  "logger",
  "onStateChange",
];
const BACKOFF_OPTIONS: &[&str] = &["initialMs", "maxMs"];
/// The fields of a provider entry the registrar reads (`LlmProviderFileEntry`
/// and `provider`).
const ENTRY_FIELDS: &[&str] = &[
  "name",
  "type",
  "model",
  "publish",
  "description",
  "contextWindow",
  "provider",
];

/// The object's own enumerable string keys (`Object.keys`).
fn own_keys(object: &Object) -> Result<Vec<String>> {
  let value = object.value();
  let mut names = std::ptr::null_mut();
  // SAFETY: a live object of this environment; the filter is napi's bit set
  // (enumerable, no symbols), which napi's `KeyFilter` enum cannot combine.
  let status = unsafe {
    sys::napi_get_all_property_names(
      value.env,
      value.value,
      sys::KeyCollectionMode::own_only,
      sys::KeyFilter::enumerable | sys::KeyFilter::skip_symbols,
      sys::KeyConversion::numbers_to_strings,
      &mut names,
    )
  };
  if status != sys::Status::napi_ok {
    return Err(invalid("cannot list the options' names".to_owned()));
  }
  // SAFETY: napi answered an array of strings.
  unsafe { Vec::<String>::from_napi_value(value.env, names) }
    .map_err(|error| invalid(format!("cannot list the options' names: {}", error.reason)))
}

/// Refuses a name that is not in `known`, naming the nearest known one.
/// `path` prefixes the names in the message (`backoff.`).
pub fn check_names(object: &Object, known: &[&str], path: &str) -> Result<()> {
  for key in own_keys(object)? {
    if known.contains(&key.as_str()) {
      continue;
    }
    let hint = match nearest(&key, known) {
      Some((name, _)) => format!("did you mean `{path}{name}`?"),
      None => format!("known options: {}", known.join(", ")),
    };
    return Err(invalid(format!("unknown option `{path}{key}`: {hint}")));
  }
  Ok(())
}

/// Provider entries are mcplocal's config entries, which carry fields of their
/// own (`url`, `apiKey`...): only a near miss of a field the registrar reads
/// (`modle`, `Publish`, `context_window`) is refused, since it would be
/// silently ignored.
pub fn check_entry_names(entry: &Object, path: &str) -> Result<()> {
  for key in own_keys(entry)? {
    if ENTRY_FIELDS.contains(&key.as_str()) {
      continue;
    }
    if let Some((name, distance)) = nearest(&key, ENTRY_FIELDS) {
      if distance <= 1 {
        return Err(invalid(format!(
          "unknown field `{path}{key}`: did you mean `{path}{name}`?"
        )));
      }
    }
  }
  Ok(())
}

/// The known name closest to `key` and its distance, when close enough to be
/// a typo: case, `-` and `_` are ignored, a transposition counts once.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<(&'a str, usize)> {
  let fold = |text: &str| -> Vec<char> {
    text
      .chars()
      .filter(|c| *c != '_' && *c != '-')
      .flat_map(char::to_lowercase)
      .collect()
  };
  let key_folded = fold(key);
  known
    .iter()
    .map(|name| {
      let folded = fold(name);
      let mut distance = edit_distance(&key_folded, &folded);
      // `taskTimeout` for `taskTimeoutMs`: a missing unit suffix.
      if folded.starts_with(&key_folded) && key_folded.len() >= 4 {
        distance = distance.min(1);
      }
      (*name, distance)
    })
    .filter(|(name, distance)| *distance <= 2.max(name.len() / 4))
    .min_by_key(|(_, distance)| *distance)
}

/// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
fn edit_distance(a: &[char], b: &[char]) -> usize {
  let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
  for (i, row) in rows.iter_mut().enumerate() {
    row[0] = i;
  }
  for (j, cell) in rows[0].iter_mut().enumerate() {
    *cell = j;
  }
  for i in 1..=a.len() {
    for j in 1..=b.len() {
      let cost = usize::from(a[i - 1] != b[j - 1]);
      let mut best = (rows[i - 1][j] + 1)
        .min(rows[i][j - 1] + 1)
        .min(rows[i - 1][j - 1] + cost);
      if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
        best = best.min(rows[i - 2][j - 2] + 1);
      }
      rows[i][j] = best;
    }
  }
  rows[a.len()][b.len()]
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
    check_names(&limits, BACKOFF_OPTIONS, "backoff.")?;
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
  check_entry_names(entry, path)?;
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

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn the_nearest_known_name_is_suggested() {
    let cases = [
      ("mcpdURL", Some("mcpdUrl")),
      ("mcpdurl", Some("mcpdUrl")),
      ("taskTimeout", Some("taskTimeoutMs")),
      ("heartbeatInterval", Some("heartbeatIntervalMs")),
      ("maxConcurency", Some("maxConcurrency")),
      ("allow_insecure_http", Some("allowInsecureHttp")),
      ("tokne", Some("token")),
      ("providrs", Some("providers")),
      ("somethingElse", None),
      ("url", None),
    ];
    for (key, expected) in cases {
      assert_eq!(
        nearest(key, REGISTRAR_OPTIONS).map(|(name, _)| name),
        expected,
        "{key}"
      );
    }
  }

  #[test]
  fn entry_fields_refuse_only_near_misses() {
    let near = |key: &str| nearest(key, ENTRY_FIELDS).filter(|(_, d)| *d <= 1);
    assert_eq!(near("modle").map(|(n, _)| n), Some("model"));
    assert_eq!(near("Publish").map(|(n, _)| n), Some("publish"));
    assert_eq!(
      near("context_window").map(|(n, _)| n),
      Some("contextWindow")
    );
    for own in ["url", "apiKey", "baseUrl", "binaryPath", "temperature"] {
      assert_eq!(near(own), None, "{own}");
    }
  }
}
