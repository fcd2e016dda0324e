//! Cloister's integration suite: one test binary, many modules (fast to link
//! on a small machine). Run with `cargo test`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
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
