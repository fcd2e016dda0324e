//! Opening an environment and authenticating the caller.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use cloister_host::service::{Cloister, ServiceError};
use cloister_host::users::User;

/// Where a new environment keeps its state (`init`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct StoreArg {
    /// Where the state lives: `sled` (embedded, in the environment
    /// directory) or a postgres:// URL naming an empty database
    /// (docs/SCALING.md). Prefer the variable when the URL holds a
    /// password.
    #[arg(
        long,
        env = "CLOISTER_STORE",
        hide_env_values = true,
        default_value = "sled",
        value_name = "URL"
    )]
    pub store: String,
}

/// Where the environment is and who is acting.
#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// The environment directory.
    #[arg(
        long = "env",
        global = true,
        env = "CLOISTER_ENV",
        default_value = ".cloister",
        value_name = "DIR"
    )]
    pub env: PathBuf,
    /// Your API token (prefer the CLOISTER_TOKEN variable: command lines
    /// are visible to other local users).
    #[arg(
        long,
        global = true,
        env = "CLOISTER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
}

/// An open environment and the authenticated user.
pub struct Session {
    pub cloister: Cloister,
    pub user: User,
}

impl EnvArgs {
    /// Opens the environment and authenticates the token.
    pub fn session(&self) -> Result<Session> {
        let cloister = Cloister::open(&self.env, "cli")
            .with_context(|| format!("cannot open the environment {}", self.env.display()))?;
        self.authenticated(cloister)
    }

    /// Opens the environment to read it, beside a `serve` or job that has
    /// it open when the store is PostgreSQL (see
    /// `Cloister::open_reader`), and authenticates the token. For commands
    /// that change nothing but the audit log.
    pub fn reading_session(&self) -> Result<Session> {
        let cloister = Cloister::open_reader(&self.env, "cli")
            .with_context(|| format!("cannot open the environment {}", self.env.display()))?;
        self.authenticated(cloister)
    }

    fn authenticated(&self, cloister: Cloister) -> Result<Session> {
        let token = self
            .token
            .as_deref()
            .context("no token: set CLOISTER_TOKEN (or pass --token) to the token `cloister init` or `cloister user add` printed")?;
        let user = cloister.authenticate(token)?;
        Ok(Session { cloister, user })
    }
}

/// Exit code for a policy denial.
pub const EXIT_DENIED: u8 = 3;
/// Exit code for a failed audit verification.
pub const EXIT_TAMPERED: u8 = 4;
/// A check ran and its verdict is `fail` (`deploy test`).
pub const EXIT_FAILED_CHECK: u8 = 5;

/// Maps an error to an exit code: denials get their own.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ServiceError>() {
        Some(ServiceError::Denied { .. }) | Some(ServiceError::NoSuchOperation(_)) => EXIT_DENIED,
        _ => 1,
    }
}
