//! Reads and checks the JavaScript options object (contract.rs `RegistrarOptions`)
//! into the core's configuration; every bad option is a clear ERR_INVALID_OPTION,
//! and so is an unknown option name, with the nearest known one.

use std::collections::HashSet;
use std::time::Duration;

use napi::bindgen_prelude::{Array, FromNapiValue, Function, JsValue, Object, Unknown};
use napi::{sys, ValueType};

use super::contract::{
  AuditChoice, AuditOptions, CallerLimits, LlmProviderFileEntry, PublishLimits, RegistrarOptions,
  DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_IDLE_TIMEOUT, PROVIDER,
};
use crate::backoff::BackoffPolicy;
use crate::dispatch::DispatchSettings;
use crate::error::{Error, Result};
use crate::owner::{self, ErrorDetail, OwnerPolicy, RateLimits};
use crate::wire::ProviderDescriptor;

/// The largest duration an option may ask for (about 24 days, a JS timer's limit).
const MAX_MS: f64 = 2_147_483_647.0;

/// The options other than the providers and the callbacks, checked.
pub struct Settings {
  pub mcpd_url: Option<String>,
  pub token: Option<String>,
  pub config_dir: Option<String>,
  pub heartbeat_interval: Duration,
  pub idle_timeout: Option<Duration>,
  pub backoff: BackoffPolicy,
  pub dispatch: DispatchSettings,
  pub allow_insecure_http: bool,
  /// The `audit` option, checked; `None` when off.
  pub audit: Option<AuditSettings>,
}

/// A field the class requires and the boot hook's `Partial<>` does not: read as
/// optional, declared required in TypeScript (with `ts_type`, since napi marks
/// every `Option` field optional).
#[derive(Debug, Default)]
pub struct Required<T>(pub Option<T>);

/// A value of one JavaScript property, read with an ERR_INVALID_OPTION that names
/// it (`name` is its full name: `backoff.maxMs`, `providers[2].model`).
pub trait JsField<'env>: Sized {
  /// `value` is `None` when the property is `undefined` or `null`.
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self>;
}

/// An object type declared with `js_object!`.
pub trait JsObject<'env>: Sized {
  /// Its JavaScript property names, as index.d.ts states them.
  fn fields() -> &'static [&'static str];
  /// Reads its fields from `object`; `path` prefixes their names in errors.
  fn read(object: &Object<'env>, path: &str) -> Result<Self>;
}

/// napi's name for a Rust field (`heartbeat_interval_ms` → `heartbeatIntervalMs`,
/// `r#type` → `type`), as `#[napi(object)]` derives it.
pub fn js_name(field: &str) -> String {
  let field = field.strip_prefix("r#").unwrap_or(field);
  let mut name = String::with_capacity(field.len());
  let mut upper = false;
  for c in field.chars() {
    if c == '_' {
      upper = true;
    } else if upper {
      name.extend(c.to_uppercase());
      upper = false;
    } else {
      name.push(c);
    }
  }
  name
}

/// Derives from a `#[napi(object)]` struct's fields (only its TypeScript is
/// generated, both conversions off) its field names for "did you mean" and its
/// reader, `JsObject::read`, whose errors name the option rather than napi's
/// conversion's. The reader builds the struct with every field named here, so a
/// field missing from the list (or one the struct lacks) does not compile.
/// (The struct itself cannot be declared inside this macro: napi-derive would then
/// print its doc comments as raw string tokens, `r" ..."`.)
macro_rules! js_object {
  ($name:ident $(<$env:lifetime>)? { $($field:ident),* $(,)? }) => {
    impl<'env> $crate::binding::options::JsObject<'env> for $name $(<$env>)? {
      fn fields() -> &'static [&'static str] {
        static FIELDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
        FIELDS.get_or_init(|| {
          vec![$(
            &*Box::leak($crate::binding::options::js_name(stringify!($field)).into_boxed_str())
          ),*]
        })
      }

      fn read(
        object: &napi::bindgen_prelude::Object<'env>,
        path: &str,
      ) -> $crate::error::Result<Self> {
        use $crate::binding::options::{field, JsField};
        let mut names = Self::fields().iter();
        Ok(Self {
          $($field: {
            let key = names.next().expect("one name per field");
            JsField::from_field(field(object, key)?, &format!("{path}{key}"))?
          },)*
        })
      }
    }

    impl<'env> $crate::binding::options::JsField<'env> for $name $(<$env>)? {
      fn from_field(
        value: Option<napi::bindgen_prelude::Unknown<'env>>,
        name: &str,
      ) -> $crate::error::Result<Self> {
        use $crate::binding::options::{check_names, JsField, JsObject};
        let object: napi::bindgen_prelude::Object<'env> = JsField::from_field(value, name)?;
        let path = format!("{name}.");
        check_names(&object, Self::fields(), &path)?;
        Self::read(&object, &path)
      }
    }
  };
}
pub(crate) use js_object;

impl<'env, T: JsField<'env>> JsField<'env> for Option<T> {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    match value {
      None => Ok(None),
      value => T::from_field(value, name).map(Some),
    }
  }
}

impl<'env, T: JsField<'env>> JsField<'env> for Required<T> {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    Option::<T>::from_field(value, name).map(Required)
  }
}

/// The value as `T` when its JavaScript type is `expected`; `what` names that
/// type in the error ("a string").
fn cast<T: FromNapiValue>(
  value: Option<Unknown>,
  name: &str,
  expected: ValueType,
  what: &str,
) -> Result<T> {
  match value {
    Some(value) if type_of(&value) == expected => {
      // SAFETY: the JavaScript type was checked just above.
      unsafe { value.cast() }.map_err(|e| invalid(e.reason))
    }
    _ => Err(invalid(format!("{name} must be {what}"))),
  }
}

impl<'env> JsField<'env> for String {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    cast(value, name, ValueType::String, "a string")
  }
}

impl<'env> JsField<'env> for bool {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    cast(value, name, ValueType::Boolean, "a boolean")
  }
}

impl<'env> JsField<'env> for f64 {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    let number: f64 = cast(value, name, ValueType::Number, "a number")?;
    if !number.is_finite() {
      return Err(invalid(format!("{name} must be a finite number")));
    }
    Ok(number)
  }
}

impl<'env> JsField<'env> for Object<'env> {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    cast(value, name, ValueType::Object, "an object")
  }
}

impl<'env> JsField<'env> for Function<'env> {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    cast(value, name, ValueType::Function, "a function")
  }
}

/// An array of strings (`allowCallers`); an element that is not one is named
/// (`allowCallers[2]`).
impl<'env> JsField<'env> for Vec<String> {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    let array: Array = match value {
      Some(value) if value.is_array().unwrap_or(false) => {
        // SAFETY: checked to be an array just above.
        unsafe { value.cast() }.map_err(|e| invalid(e.reason))?
      }
      _ => return Err(invalid(format!("{name} must be an array of strings"))),
    };
    (0..array.len())
      .map(|index| {
        let item = array
          .get::<Unknown>(index)
          .map_err(|e| invalid(e.reason))?
          .filter(|item| !matches!(item.get_type(), Ok(ValueType::Undefined)));
        String::from_field(item, &format!("{name}[{index}]"))
      })
      .collect()
  }
}

/// Taken as it is; what it must be is checked where it is used (`providers`).
impl<'env> JsField<'env> for Unknown<'env> {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    value.ok_or_else(|| invalid(format!("{name} is missing")))
  }
}

/// The names a provider entry may carry besides mcplocal's own: near misses of
/// these are refused.
fn entry_fields() -> &'static [&'static str] {
  static FIELDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
  FIELDS.get_or_init(|| {
    let mut fields = LlmProviderFileEntry::fields().to_vec();
    fields.push(PROVIDER);
    fields
  })
}

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
    if entry_fields().contains(&key.as_str()) {
      continue;
    }
    if let Some((name, distance)) = nearest(&key, entry_fields()) {
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

/// One provider entry (index.d.ts `LlmProviderFileEntry`), without its `LlmProvider`.
pub struct ProviderEntry {
  pub descriptor: ProviderDescriptor,
  pub publish: Option<bool>,
  /// `allowCallers` and `limits`, checked.
  pub policy: OwnerPolicy,
}

/// A limit: a positive integer (JavaScript's safe integers), or absent.
fn limit(value: Option<f64>, name: &str) -> Result<Option<u64>> {
  match value {
    None => Ok(None),
    Some(value) if value.fract() == 0.0 && (1.0..=9_007_199_254_740_991.0).contains(&value) => {
      Ok(Some(value as u64))
    }
    Some(value) => Err(invalid(format!(
      "{name} must be a positive integer; got {value}"
    ))),
  }
}

/// `limits`, checked; `path` names it (`providers[0].limits.`).
fn publish_limits(limits: Option<PublishLimits>, path: &str) -> Result<owner::PublishLimits> {
  let Some(limits) = limits else {
    return Ok(owner::PublishLimits::default());
  };
  let per_caller = match limits.per_caller {
    None => RateLimits::default(),
    Some(CallerLimits {
      requests_per_minute,
      tokens_per_minute,
      tokens_per_day,
    }) => RateLimits {
      requests_per_minute: limit(
        requests_per_minute,
        &format!("{path}perCaller.requestsPerMinute"),
      )?,
      tokens_per_minute: limit(
        tokens_per_minute,
        &format!("{path}perCaller.tokensPerMinute"),
      )?,
      tokens_per_day: limit(tokens_per_day, &format!("{path}perCaller.tokensPerDay"))?,
    },
  };
  Ok(owner::PublishLimits {
    max_output_tokens: limit(limits.max_output_tokens, &format!("{path}maxOutputTokens"))?,
    max_request_bytes: limit(limits.max_request_bytes, &format!("{path}maxRequestBytes"))?,
    all: RateLimits {
      requests_per_minute: limit(
        limits.requests_per_minute,
        &format!("{path}requestsPerMinute"),
      )?,
      tokens_per_minute: limit(limits.tokens_per_minute, &format!("{path}tokensPerMinute"))?,
      tokens_per_day: limit(limits.tokens_per_day, &format!("{path}tokensPerDay"))?,
    },
    per_caller,
  })
}

fn invalid(message: String) -> Error {
  Error::InvalidInput(message)
}

/// The property, or `None` when it is `undefined` or `null`.
pub fn field<'env>(object: &Object<'env>, key: &str) -> Result<Option<Unknown<'env>>> {
  let value: Option<Unknown> = object
    .get(key)
    .map_err(|error| invalid(format!("cannot read option '{key}': {}", error.reason)))?;
  Ok(value.filter(|value| !matches!(value.get_type(), Ok(ValueType::Null | ValueType::Undefined))))
}

fn type_of(value: &Unknown) -> ValueType {
  value.get_type().unwrap_or(ValueType::Unknown)
}

pub fn string(object: &Object, key: &str, path: &str) -> Result<Option<String>> {
  JsField::from_field(field(object, key)?, &format!("{path}{key}"))
}

pub fn object<'env>(object: &Object<'env>, key: &str, path: &str) -> Result<Option<Object<'env>>> {
  JsField::from_field(field(object, key)?, &format!("{path}{key}"))
}

/// Whether `object[key]` is a function (for `provider.stream`).
pub fn has_function(object: &Object, key: &str) -> Result<bool> {
  Ok(field(object, key)?.is_some_and(|value| type_of(&value) == ValueType::Function))
}

/// Milliseconds as a duration; `allow_zero` for the options where 0 means "off".
fn millis(ms: Option<f64>, name: &str, allow_zero: bool) -> Result<Option<Duration>> {
  let Some(ms) = ms else {
    return Ok(None);
  };
  let floor = if allow_zero { 0.0 } else { 1.0 };
  if !(floor..=MAX_MS).contains(&ms) {
    let lower = if allow_zero { "0" } else { "1" };
    return Err(invalid(format!(
      "{name} must be between {lower} and {MAX_MS} ms"
    )));
  }
  Ok(Some(Duration::from_millis(ms as u64)))
}

fn count(value: Option<f64>, name: &str, minimum: u32) -> Result<Option<u32>> {
  let Some(value) = value else {
    return Ok(None);
  };
  if value.fract() != 0.0 || value < f64::from(minimum) || value > 1_000_000.0 {
    return Err(invalid(format!(
      "{name} must be an integer from {minimum} to 1000000"
    )));
  }
  Ok(Some(value as u32))
}

/// The options checked, defaults filled in (contract.rs states them).
pub fn settings(options: &RegistrarOptions) -> Result<Settings> {
  let mut backoff = BackoffPolicy::default();
  if let Some(limits) = &options.backoff {
    if let Some(initial) = millis(limits.initial_ms, "backoff.initialMs", false)? {
      backoff.initial = initial;
    }
    if let Some(max) = millis(limits.max_ms, "backoff.maxMs", false)? {
      backoff.max = max;
    }
    if backoff.max < backoff.initial {
      return Err(invalid(
        "backoff.maxMs must not be below backoff.initialMs".to_owned(),
      ));
    }
  }
  let mut dispatch = DispatchSettings::default();
  if let Some(timeout) = millis(options.task_timeout_ms, "taskTimeoutMs", false)? {
    dispatch.task_timeout = timeout;
  }
  if let Some(limit) = count(options.max_concurrency, "maxConcurrency", 1)? {
    dispatch.max_concurrency = limit;
  }
  if let Some(limit) = count(options.max_queue, "maxQueue", 0)? {
    dispatch.max_queue = limit;
  }
  let idle_timeout = match millis(options.idle_timeout_ms, "idleTimeoutMs", true)? {
    None => Some(DEFAULT_IDLE_TIMEOUT),
    Some(Duration::ZERO) => None,
    Some(idle) => Some(idle),
  };
  Ok(Settings {
    mcpd_url: options.mcpd_url.0.clone(),
    token: options.token.0.clone(),
    config_dir: options.config_dir.clone(),
    heartbeat_interval: millis(options.heartbeat_interval_ms, "heartbeatIntervalMs", false)?
      .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL),
    idle_timeout,
    backoff,
    dispatch,
    allow_insecure_http: options.allow_insecure_http.unwrap_or(false),
    audit: audit_settings(options.audit.as_ref())?,
  })
}

/// One `LlmProviderFileEntry`; `path` names it in errors (`providers[2].`).
pub fn provider_entry(entry: &Object, path: &str) -> Result<ProviderEntry> {
  check_entry_names(entry, path)?;
  let read = LlmProviderFileEntry::read(entry, path)?;
  let name = read
    .name
    .0
    .filter(|name| !name.trim().is_empty())
    .ok_or_else(|| invalid(format!("{path}name must be a non-empty string")))?;
  let kind = read
    .r#type
    .0
    .ok_or_else(|| invalid(format!("{path}type must be a string")))?;
  let context_window = match read.context_window {
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
  if let Some(index) = read
    .allow_callers
    .iter()
    .flatten()
    .position(|entry| entry.is_empty())
  {
    return Err(invalid(format!(
      "{path}allowCallers[{index}] must be a non-empty string"
    )));
  }
  let policy = OwnerPolicy {
    allow_callers: read.allow_callers,
    limits: publish_limits(read.limits, &format!("{path}limits."))?,
    error_detail: error_detail(read.error_detail.as_deref(), path)?,
  };
  Ok(ProviderEntry {
    descriptor: ProviderDescriptor {
      name,
      kind,
      model: read.model,
      description: read.description,
      context_window,
    },
    publish: read.publish,
    policy,
  })
}

/// `errorDetail`, checked: absent is `'message'`.
fn error_detail(value: Option<&str>, path: &str) -> Result<ErrorDetail> {
  match value {
    None => Ok(ErrorDetail::default()),
    Some(name) => ErrorDetail::from_name(name).ok_or_else(|| {
      invalid(format!(
        "{path}errorDetail must be {}; got '{name}'",
        ErrorDetail::NAMES
          .map(|name| format!("'{name}'"))
          .join(" or ")
      ))
    }),
  }
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

/// The `audit` option, checked; the path is resolved once the config dir is
/// known (`AuditSettings::config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
  /// `None`: `<configDir>/audit.jsonl`.
  pub path: Option<std::path::PathBuf>,
  pub max_bytes: u64,
  pub keep: u32,
  pub content: bool,
}

impl AuditSettings {
  /// The audit log's configuration, its default path in `config_dir`.
  pub fn config(&self, config_dir: &std::path::Path) -> crate::observe::audit::AuditConfig {
    crate::observe::audit::AuditConfig {
      path: self
        .path
        .clone()
        .unwrap_or_else(|| config_dir.join(crate::observe::audit::DEFAULT_FILE_NAME)),
      max_bytes: self.max_bytes,
      keep: self.keep,
      content: self.content,
    }
  }
}

/// `audit: false` or `audit: { ... }`; `true` is refused (the contract's type is
/// `AuditOptions | false`), with the way to ask for the defaults.
impl<'env> JsField<'env> for AuditChoice {
  fn from_field(value: Option<Unknown<'env>>, name: &str) -> Result<Self> {
    match value.as_ref().map(type_of) {
      Some(ValueType::Boolean) => match bool::from_field(value, name)? {
        false => Ok(Self::Off),
        true => Err(invalid(format!(
          "{name} must be an object or false; for the defaults, pass {{}}"
        ))),
      },
      Some(ValueType::Object) => AuditOptions::from_field(value, name).map(Self::On),
      _ => Err(invalid(format!("{name} must be an object or false"))),
    }
  }
}

/// The `audit` option checked, defaults filled in (contract.rs `AuditOptions`).
fn audit_settings(choice: Option<&AuditChoice>) -> Result<Option<AuditSettings>> {
  use crate::observe::audit::{DEFAULT_KEEP, DEFAULT_MAX_BYTES};
  let Some(AuditChoice::On(options)) = choice else {
    return Ok(None);
  };
  let path = match options.path.as_deref() {
    None => None,
    Some(path) if path.trim().is_empty() => {
      return Err(invalid(
        "audit.path must be a non-empty file path".to_owned(),
      ))
    }
    Some(path) if path.contains('\0') => {
      return Err(invalid("audit.path must not contain a NUL byte".to_owned()))
    }
    Some(path) if path.ends_with('/') || path.ends_with(std::path::MAIN_SEPARATOR) => {
      return Err(invalid(format!(
        "audit.path must name a file, not a directory; got '{path}'"
      )))
    }
    Some(path) => Some(std::path::PathBuf::from(path)),
  };
  let max_bytes = limit(options.max_bytes, "audit.maxBytes")?.unwrap_or(DEFAULT_MAX_BYTES);
  let keep = match options.keep {
    None => DEFAULT_KEEP,
    Some(keep) if keep.fract() == 0.0 && (0.0..=1000.0).contains(&keep) => keep as u32,
    Some(keep) => {
      return Err(invalid(format!(
        "audit.keep must be an integer from 0 to 1000; got {keep}"
      )))
    }
  };
  Ok(Some(AuditSettings {
    path,
    max_bytes,
    keep,
    content: options.content.unwrap_or(false),
  }))
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
        nearest(key, RegistrarOptions::fields()).map(|(name, _)| name),
        expected,
        "{key}"
      );
    }
  }

  #[test]
  fn entry_fields_refuse_only_near_misses() {
    let near = |key: &str| nearest(key, entry_fields()).filter(|(_, d)| *d <= 1);
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
  #[test]
  fn audit_options_are_checked_and_defaulted() {
    use crate::observe::audit::{DEFAULT_KEEP, DEFAULT_MAX_BYTES};
    let on = |path: Option<&str>, max_bytes: Option<f64>, keep: Option<f64>| {
      audit_settings(Some(&AuditChoice::On(AuditOptions {
        path: path.map(str::to_owned),
        max_bytes,
        keep,
        content: None,
      })))
    };
    assert_eq!(audit_settings(None).unwrap(), None);
    assert_eq!(audit_settings(Some(&AuditChoice::Off)).unwrap(), None);
    let defaults = on(None, None, None).unwrap().unwrap();
    assert_eq!(
      defaults,
      AuditSettings {
        path: None,
        max_bytes: DEFAULT_MAX_BYTES,
        keep: DEFAULT_KEEP,
        content: false,
      }
    );
    let dir = std::path::Path::new("/cfg");
    assert_eq!(
      defaults.config(dir).path,
      std::path::Path::new("/cfg/audit.jsonl")
    );
    let given = on(Some("/var/log/a.jsonl"), Some(4096.0), Some(0.0))
      .unwrap()
      .unwrap();
    assert_eq!(
      (given.config(dir).path, given.max_bytes, given.keep),
      ("/var/log/a.jsonl".into(), 4096, 0)
    );
    let refused = |result: Result<Option<AuditSettings>>, wanted: &str| {
      let message = result.expect_err(wanted).to_string();
      assert!(message.contains(wanted), "{message}");
    };
    refused(on(Some(""), None, None), "audit.path must be a non-empty");
    refused(on(Some("  "), None, None), "audit.path must be a non-empty");
    refused(on(Some("/tmp/logs/"), None, None), "not a directory");
    refused(on(Some("a\0b"), None, None), "NUL");
    for bad in [0.0, -1.0, 1.5, 1e300] {
      refused(
        on(None, Some(bad), None),
        "audit.maxBytes must be a positive integer",
      );
    }
    for bad in [-1.0, 0.5, 1001.0] {
      refused(
        on(None, None, Some(bad)),
        "audit.keep must be an integer from 0 to 1000",
      );
    }
  }
}
