//! `RegistrarError`, the JavaScript class of every error the package throws or
//! rejects with, and the one conversion from the core's `Error` to it.

use std::cell::Cell;
use std::ptr;

use napi::bindgen_prelude::{
  FnArgs, Function, JsObjectValue, JsValue, Object, ToNapiValue, Unknown,
};
use napi::{sys, Env};

use crate::error::{describe, Error};
use crate::secret::Secret;

const SOURCE: &str = include_str!("registrar_error.js");

/// The class of every error the package throws or rejects with: `instanceof
/// Error`, with a stable `code`, `status` when mcpd answered an HTTP error, and
/// `cause` where another error lies beneath.
// A const, not a `#[napi]` class, because a napi class cannot extend `Error`;
// its value is built from registrar_error.js when the module loads.
#[allow(non_upper_case_globals)]
#[napi]
pub const RegistrarError: RegistrarErrorConstructor = RegistrarErrorConstructor;

/// The value of the `RegistrarError` export: the class of this environment.
pub struct RegistrarErrorConstructor;

impl ToNapiValue for RegistrarErrorConstructor {
  unsafe fn to_napi_value(env: sys::napi_env, _: Self) -> napi::Result<sys::napi_value> {
    // napi calls this on the JavaScript thread with a live `env`.
    let env = Env::from_raw(env);
    Ok(class(&env)?.raw())
  }
}

type ErrorClass<'env> = Function<'env, FnArgs<(String, Object<'env>)>, Unknown<'env>>;

thread_local! {
  /// This thread's environment and a reference to its class. Each JavaScript
  /// environment (the main thread, each worker) has its own thread; the
  /// reference is never released, like the module's own exports.
  static CLASS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// The class of `env`, evaluated on first use (the module's load).
fn class(env: &Env) -> napi::Result<ErrorClass<'_>> {
  let (owner, reference) = CLASS.with(Cell::get);
  if owner == env.raw() as usize && reference != 0 {
    let mut value = ptr::null_mut();
    // SAFETY: the reference was made in this environment and is never deleted.
    let status =
      unsafe { sys::napi_get_reference_value(env.raw(), reference as sys::napi_ref, &mut value) };
    if status == sys::Status::napi_ok && !value.is_null() {
      // SAFETY: the value is the function made below.
      return unsafe { napi::bindgen_prelude::FromNapiValue::from_napi_value(env.raw(), value) };
    }
  }
  let class: ErrorClass = env.run_script(SOURCE)?;
  let mut reference = ptr::null_mut();
  // SAFETY: a strong reference to a live value of this environment.
  let status = unsafe { sys::napi_create_reference(env.raw(), class.raw(), 1, &mut reference) };
  if status == sys::Status::napi_ok {
    CLASS.with(|cell| cell.set((env.raw() as usize, reference as usize)));
  }
  Ok(class)
}

/// `error` as a `RegistrarError` to throw or reject with: the message with its
/// causes (lancedb's "…: caused by …" lines), `code`, `status` when mcpd
/// answered an HTTP error, and `cause` (an `Error`) where a source lies beneath.
/// `token`, when known, is replaced by `***` wherever mcpd echoed it.
pub fn to_js(env: &Env, error: Error, token: Option<&Secret>) -> napi::Error {
  match build(env, &error, token) {
    Ok(value) => napi::Error::from(value),
    // Building failed (the environment is going away): a plain error still says it.
    Err(_) => napi::Error::from_reason(redact(describe(&error), token)),
  }
}

fn redact(text: String, token: Option<&Secret>) -> String {
  match token {
    Some(token) => token.redact(&text),
    None => text,
  }
}

fn build<'env>(
  env: &'env Env,
  error: &Error,
  token: Option<&Secret>,
) -> napi::Result<Unknown<'env>> {
  let mut options = Object::new(env)?;
  options.set_named_property("code", error.code())?;
  if let Some(status) = error.status() {
    options.set_named_property("status", u32::from(status))?;
  }
  if let Some(cause) = error.cause() {
    let cause = napi::Error::from_reason(redact(cause, token));
    options.set_named_property("cause", env.create_error(cause)?)?;
  }
  let message = redact(describe(error), token);
  class(env)?.new_instance((message, options).into())
}

/// The conversion for results: `result.map_err(js(&env, Some(&token)))`.
pub fn js<'a>(env: &'a Env, token: Option<&'a Secret>) -> impl Fn(Error) -> napi::Error + 'a {
  move |error| to_js(env, error, token)
}
