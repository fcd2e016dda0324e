//! # Cloister's shared vocabulary
//!
//! What every other crate of the host speaks, and nothing that acts:
//!
//! - [`types`]: the data exchanged with plugins, mirroring
//!   `plugin-sdk/wit/plugin.wit` (with the wasmtime derives behind the
//!   `component` feature, which only the runtime turns on);
//! - [`codec`]: the compact binary form of a record (stored in dataset
//!   segments, and sent to workers);
//! - [`digest`]: SHA-256 identities;
//! - [`time`]: timestamps (RFC 3339);
//! - [`text`]: neutralizing deceptive characters in text shown to people;
//! - [`lru`]: a bounded map of the entries used last;
//! - [`toml_problem`]: a TOML file's parse error on one line, naming the
//!   line and the key or table.

pub mod codec;
pub mod digest;
pub mod lru;
pub mod text;
pub mod time;
pub mod toml_problem;
pub mod types;

pub use digest::Digest;
