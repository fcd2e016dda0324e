//! # Cloister host library
//!
//! The closed environment's engine room. This crate holds everything the
//! `cloister` binary and the web console call:
//!
//! - [`runtime`]: the sandboxed WebAssembly plugin runtime (wasmtime);
//! - [`types`]: the data types exchanged with plugins (mirroring the WIT);
//! - [`records`]: reading and writing records as JSONL;
//! - [`digest`]: SHA-256 identities.
//!
//! See `docs/ARCHITECTURE.md` for the map and the invariants.

pub mod digest;
pub mod records;
pub mod runtime;
pub mod types;

pub use digest::Digest;
