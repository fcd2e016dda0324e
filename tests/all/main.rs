//! Cloister's integration suite: one test binary, many modules (fast to link
//! on a small machine). Run with `cargo test`.

// The suite's own diagnostics and the crash child's protocol lines are not
// the CLI's output for people, so the CLI crate's rule that such output goes
// through `say!`/`tell!` (cli/clippy.toml) does not apply to them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_macros
)]

mod support;

mod active_learning;
mod boundary;
mod browser;
mod cli;
mod closed_env;
mod console;
mod console_hardening;
mod crash;
mod deployment;
mod disclosure;
mod example_plugins;
mod fitted;
mod hostile;
mod house;
mod objects;
mod policy_matrix;
mod postgres;
mod python;
mod runtime;
mod training;
mod workers;
