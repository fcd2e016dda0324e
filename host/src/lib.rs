//! # Cloister host library
//!
//! The closed environment's engine room. This crate holds everything the
//! `cloister` binary and the web console call:
//!
//! - [`runtime`]: the sandboxed WebAssembly plugin runtime (wasmtime);
//! - [`types`]: the data types exchanged with plugins (mirroring the WIT);
//! - [`records`]: reading and writing records as JSONL;
//! - [`digest`]: SHA-256 identities;
//! - [`store`]: the storage trait and its sled engine (the only sled user);
//! - [`env`]: an environment directory, opened once as a cap-std `Dir`;
//! - [`policy`]: Cedar policies and the authorization decision;
//! - [`audit`]: the tamper-evident audit log;
//! - [`users`], [`datasets`], [`registry`]: what the store holds;
//! - [`service`]: every operation, behind one authorization point;
//! - [`text`]: neutralizing deceptive characters in text shown to people.
//!
//! See `docs/ARCHITECTURE.md` for the map and the invariants.

pub mod audit;
pub mod csv_records;
pub mod datasets;
pub mod digest;
pub mod env;
pub mod jobs;
pub mod limits;
pub mod models;
pub mod plugin_log;
pub mod policy;
pub mod records;
pub mod registry;
pub mod runtime;
pub mod service;
pub mod store;
pub mod text;
pub mod time;
pub mod train;
pub mod types;
pub mod users;

pub use digest::Digest;
