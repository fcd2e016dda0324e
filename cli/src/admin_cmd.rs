//! `cloister init`, `cloister user …`, `cloister policy …`.

use crate::output::{say, tell};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Subcommand;

use cloister_host::policy::Role;
use cloister_host::service::Cloister;

use crate::session::EnvArgs;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user and print their token (shown once).
    Add {
        /// User name (a-z 0-9 . _ -).
        name: String,
        /// A role (repeatable): admin, scientist, labeler, reviewer, approver, auditor.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// List users and their roles.
    List {
        /// Print JSON: an array of objects (see docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Disable a user and revoke their token (refused for the last active
    /// admin). Their history stays; `user enable` brings the account back.
    Disable {
        /// User name.
        name: String,
    },
    /// Enable a disabled user and print their new token (shown once).
    Enable {
        /// User name.
        name: String,
    },
    /// Give a user a new token and print it (shown once); the old one
    /// stops working at once. For a token lost or seen by someone else:
    /// admins for anybody, every user for themselves.
    Token {
        /// User name (default: you).
        name: Option<String>,
    },
    /// Grant roles to a user; effective at their next request.
    Grant {
        /// User name.
        name: String,
        /// A role to grant (repeatable).
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// Take roles away from a user; effective at their next request (a
    /// user keeps at least one role, and the environment one active admin).
    Revoke {
        /// User name.
        name: String,
        /// A role to take away (repeatable).
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// Set a user's console password, read from the first line of standard
    /// input (12 to 256 characters; only an Argon2id hash is stored).
    Passwd {
        /// User name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the environment's policy files against the schema, or
    /// with --dir a policy directory before you install it (no environment
    /// or token needed).
    Check {
        /// A directory of *.cedar files (validated against the built-in schema).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show how the active policies decide a request, and which policies
    /// decided it.
    Explain {
        /// The user to evaluate for.
        #[arg(long = "as", value_name = "USER")]
        as_user: String,
        /// The action, e.g. export_dataset.
        action: String,
        /// env, audit, dataset:NAME, record:DATASET/ID, plugin:DIGEST, model:ID,
        /// job:ID or deployment:NAME (stored ones with their stored facts).
        resource: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

pub fn init(
    dir: PathBuf,
    admin: String,
    store: String,
    store_ca: Option<&std::path::Path>,
    objects: Option<String>,
    workers: bool,
) -> Result<ExitCode> {
    let store_ca = store_ca
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    let options = cloister_host::env_config::InitOptions {
        store,
        store_ca,
        objects,
        workers,
    };
    let (cloister, token) = Cloister::init_with_options(&dir, &admin, &options)?;
    say!(
        "created environment {} at {} (store: {})",
        cloister.environment_id(),
        dir.display(),
        cloister.store_location()
    );
    say!("admin user: {admin}");
    say!("admin token (shown once; keep it secret): {token}");
    say!();
    say!("  export CLOISTER_ENV={}", dir.display());
    say!("  export CLOISTER_TOKEN=<the token above>");
    Ok(ExitCode::SUCCESS)
}

/// `cloister worker`: runs stage and fit tasks until stopped (or
/// `max_tasks`), one line per task.
pub fn worker(
    env: &EnvArgs,
    name: Option<String>,
    lease_seconds: u64,
    max_tasks: Option<u64>,
) -> Result<ExitCode> {
    use cloister_host::workers::{WorkerEvent, WorkerOptions, run_worker};
    let name = name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let options = WorkerOptions {
        name: name.clone(),
        lease: std::time::Duration::from_secs(lease_seconds),
        idle: std::time::Duration::from_millis(50),
        max_tasks,
    };
    say!("worker {name}: waiting for tasks of {}", env.env.display());
    // SIGTERM (a Kubernetes pod stopping) or Ctrl-C: finish the task in
    // hand, record its result, claim no more. Without that, the task would
    // wait for its lease to run out before another worker took it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("worker-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut signal = std::pin::pin!(cloister_console::stop_signal());
                // The handlers are installed at the first poll; the worker
                // starts after that.
                let fired = tokio::select! {
                    biased;
                    () = &mut signal => true,
                    () = std::future::ready(()) => false,
                };
                let _ = ready_tx.send(());
                if !fired {
                    signal.await;
                }
            });
            flag.store(true, std::sync::atomic::Ordering::Release);
            say!("stopping: finishing the task in hand, claiming no more");
        })
        .context("cannot watch for the stop signal")?;
    let _ = ready.recv();
    let done = run_worker(&env.env, &options, &stop, &mut |e| match e {
        WorkerEvent::Claimed { id, kind, attempt } => {
            say!("task {id} ({kind}): claimed (attempt {attempt})")
        }
        WorkerEvent::Finished { id, kind, seconds } => {
            say!("task {id} ({kind}): done in {seconds:.2} s")
        }
        WorkerEvent::Failed { id, error, detail } => {
            say!("task {id}: failed: {error}");
            if let Some(detail) = detail {
                say!("task {id}: the runtime's diagnosis (this log only): {detail}");
            }
        }
        WorkerEvent::Lost { id } => {
            say!("task {id}: another worker holds it now; result dropped")
        }
        WorkerEvent::Collected {
            objects,
            tasks,
            untagged,
        } => {
            if untagged > 0 {
                tell!(
                    "warning: {untagged} work-queue rows did not carry the environment's tag (written by someone with access to the database only): removed, and nothing they named was deleted"
                );
            }
            say!("collected: {objects} shared objects no longer kept, {tasks} abandoned tasks");
        }
        WorkerEvent::CollectFailed { error } => {
            tell!("collecting unused work objects failed ({error}); trying again later")
        }
        WorkerEvent::Unreachable { error } => {
            tell!("the work queue is unreachable ({error}); trying again")
        }
    })
    .with_context(|| format!("worker {name} for {}", env.env.display()))?;
    say!("worker {name}: {done} tasks done");
    Ok(ExitCode::SUCCESS)
}

pub fn recover_admin(env: &EnvArgs, name: &str) -> Result<ExitCode> {
    let token = Cloister::recover_admin(&env.env, name)
        .with_context(|| format!("cannot recover an admin of {}", env.env.display()))?;
    say!("{name} is an active admin of {}", env.env.display());
    say!("token (shown once; keep it secret): {token}");
    Ok(ExitCode::SUCCESS)
}

pub fn migrate(env: &EnvArgs) -> Result<ExitCode> {
    let applied = Cloister::migrate(&env.env)
        .with_context(|| format!("cannot migrate the environment {}", env.env.display()))?;
    if applied.is_empty() {
        say!("the store's schema is up to date");
    } else {
        let list: Vec<String> = applied.iter().map(|v| v.to_string()).collect();
        say!("applied migrations {}", list.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn move_store(env: &EnvArgs, to: &str, store_ca: Option<&std::path::Path>) -> Result<ExitCode> {
    let ca = store_ca
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    let copied = Cloister::move_store(&env.env, to, ca.as_deref())
        .with_context(|| format!("cannot move the environment {}", env.env.display()))?;
    let c = Cloister::open(&env.env, "cli")?;
    say!(
        "moved {copied} entries to {}; the audit log verifies",
        c.store_location()
    );
    say!(
        "the sled store is kept as {}/store.moved: delete it once you no longer need to go back",
        env.env.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn user(env: &EnvArgs, cmd: UserCommand) -> Result<ExitCode> {
    let s = if matches!(cmd, UserCommand::List { .. }) {
        env.reading_session()?
    } else {
        env.session()?
    };
    match cmd {
        UserCommand::Add { name, roles } => {
            let (user, token) = s.cloister.add_user(&s.user, &name, &roles)?;
            say!("added {} ({})", user.name, roles_text(&user.roles));
            say!("token (shown once; keep it secret): {token}");
        }
        UserCommand::List { json } => {
            let users = s.cloister.list_users(&s.user)?;
            if json {
                let rows: Vec<serde_json::Value> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({"name": u.name, "roles": u.roles, "disabled": u.disabled})
                    })
                    .collect();
                crate::output::json(&serde_json::to_string_pretty(&rows)?);
                return Ok(ExitCode::SUCCESS);
            }
            for u in users {
                let state = if u.disabled { "disabled" } else { "active" };
                say!("{:<24} {:<9} {}", u.name, state, roles_text(&u.roles));
            }
        }
        UserCommand::Disable { name } => {
            s.cloister.disable_user(&s.user, &name)?;
            say!("disabled {name}; their token no longer works");
        }
        UserCommand::Enable { name } => {
            let (user, token) = s.cloister.enable_user(&s.user, &name)?;
            say!("enabled {} ({})", user.name, roles_text(&user.roles));
            say!("token (shown once; keep it secret): {token}");
        }
        UserCommand::Token { name } => {
            let name = name.unwrap_or_else(|| s.user.name.clone());
            let token = s.cloister.rotate_token(&s.user, &name)?;
            say!("new token for {name}; the old one no longer works");
            say!("token (shown once; keep it secret): {token}");
        }
        UserCommand::Grant { name, roles } => change_roles(&s, &name, true, &roles)?,
        UserCommand::Revoke { name, roles } => change_roles(&s, &name, false, &roles)?,
        UserCommand::Passwd { name } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.trim_end_matches(['\n', '\r']);
            s.cloister.set_password(&s.user, &name, password)?;
            say!("set the console password of {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `user grant` (`grant`) or `user revoke`, and what the account holds now.
fn change_roles(
    s: &crate::session::Session,
    name: &str,
    grant: bool,
    roles: &[Role],
) -> Result<()> {
    let user = s.cloister.change_roles(&s.user, name, grant, roles)?;
    say!(
        "{} {}: {} now has {}",
        if grant { "granted" } else { "revoked" },
        roles_text(roles),
        user.name,
        roles_text(&user.roles)
    );
    Ok(())
}

fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn policy(env: &EnvArgs, cmd: PolicyCommand) -> Result<ExitCode> {
    if let PolicyCommand::Check { dir: Some(dir) } = &cmd {
        let handle = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let label = format!("{}/", dir.display());
        let engine = cloister_host::env::load_policy_dir(&handle, &label)?;
        say!(
            "policies valid: {} policies checked against the schema",
            engine.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let s = env.session()?;
    match cmd {
        PolicyCommand::Check { .. } => {
            let n = s.cloister.policy_check(&s.user)?;
            say!("policies valid: {n} policies checked against the schema");
        }
        PolicyCommand::Explain {
            as_user,
            action,
            resource,
        } => {
            let e = s
                .cloister
                .policy_explain(&s.user, &as_user, &action, &resource)?;
            let a = &e.authorization;
            say!("decision: {}", if a.allowed { "ALLOW" } else { "DENY" });
            say!("request:  {as_user} {action} {}", e.resource.uid_text());
            if e.policies.is_empty() {
                say!("reason:   no policy permits this (deny by default)");
            } else if a.allowed {
                say!("permitted by:");
            } else {
                say!("forbidden by:");
            }
            for (id, text) in &e.policies {
                say!("  {id}");
                for line in text.lines() {
                    say!("    {line}");
                }
            }
            for err in &a.errors {
                say!("evaluation error (the policy was skipped): {err}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
