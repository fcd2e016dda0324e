//! # Cloister host library
//!
//! The closed environment's engine room: the service the `cloister` binary
//! and the web console call, over crates that are its walls.
//!
//! Walls (each its own crate, re-exported here under its old path):
//! - [`runtime`] (`cloister-runtime`): the sandboxed WebAssembly plugin
//!   runtime, the only crate that depends on wasmtime;
//! - [`train`] (`cloister-train`): kernels, templates and evaluation on
//!   candle, depending on types alone;
//! - [`store`] (`cloister-store`): the storage trait and its sled engine,
//!   the only crate that depends on sled;
//! - [`types`], [`digest`], [`time`], [`text`] (`cloister-types`): the
//!   shared vocabulary.
//!
//! This crate:
//! - [`records`], [`csv_records`]: reading and writing records;
//! - [`env`](mod@env): an environment directory, opened once as a cap-std `Dir`;
//!   [`limits`]: its `limits.toml`;
//! - [`policy`]: Cedar policies and the authorization decision;
//! - [`audit`]: the tamper-evident audit log;
//! - [`users`], [`datasets`], [`registry`], [`models`], [`jobs`],
//!   [`plugin_log`], [`fitted`]: what the store holds;
//! - [`service`]: every operation, behind one authorization point.
//!
//! See `docs/ARCHITECTURE.md` for the map and the invariants.

/// Declares an accessor that is crate-private, and public only with the
/// `testing` feature (integration tests and benchmarks inspect the store
/// and the audit log through it). Code outside this crate that reaches
/// around the service therefore fails to compile in a normal build; CI
/// checks the CLI and the console build without the feature.
macro_rules! wall {
    ($(#[$m:meta])* fn $name:ident(&$self:ident $(, $arg:ident : $ty:ty)*) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[cfg(feature = "testing")]
        pub fn $name(&$self $(, $arg: $ty)*) -> $ret $body
        $(#[$m])*
        #[cfg(not(feature = "testing"))]
        pub(crate) fn $name(&$self $(, $arg: $ty)*) -> $ret $body
    };
}

pub mod audit;
pub mod claims;
pub mod console_state;
pub mod csv_records;
pub mod datasets;
pub mod deployments;
pub mod env;
pub mod env_config;
pub mod feature_cache;
pub mod feedback;
pub mod fitted;
pub mod jobs;
pub mod limits;
pub mod models;
pub mod plugin_log;
pub mod policy;
pub mod records;
pub mod registry;
pub mod regression;
pub mod service;
pub mod serving;
pub mod users;
pub mod workers;

pub use cloister_runtime as runtime;
pub use cloister_store as store;
pub use cloister_train as train;
pub use cloister_types::{Digest, codec, digest, text, time, types};
