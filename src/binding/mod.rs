//! The napi layer: thin glue between JavaScript and the core.

mod contract;
mod error;
mod options;
mod provider_bridge;
mod registrar;
