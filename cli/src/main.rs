//! The `cloister` command line.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin_cmd;
mod audit_cmd;
mod dataset_cmd;
mod demo;
mod deploy_cmd;
mod job_cmd;
mod model_cmd;
mod output;
mod plugin_cmd;
mod python_build;
mod session;

use std::process::ExitCode;

/// mimalloc instead of the C library's allocator: the console's request
/// path allocates many small objects on several threads, and under load
/// glibc's arenas cost about a fifth of the throughput (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand, ValueEnum};

/// Cloister: a secure closed environment for ML training.
#[derive(Debug, Parser)]
#[command(name = "cloister", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    /// More log output (-v: info, -vv: debug). CLOISTER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(flatten)]
    env: session::EnvArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new environment: store, keys, policies and a first admin.
    Init {
        /// The directory to create.
        dir: std::path::PathBuf,
        /// Name of the first admin.
        #[arg(long, default_value = "admin")]
        admin: String,
        #[command(flatten)]
        store: session::StoreArg,
        /// A PEM file of CA certificates: trust only these for the database
        /// server's TLS certificate (default: the system's trust store).
        #[arg(long, value_name = "FILE")]
        store_ca: Option<std::path::PathBuf>,
        /// Also keep bulk bytes (dataset segments, model weights) in this
        /// object store, by content digest: file:///ABSOLUTE/PATH.
        #[arg(long, value_name = "URL")]
        objects: Option<String>,
        /// Run plugin stages and model fits on `cloister worker`
        /// processes (needs a postgres store and --objects; `[workers]` in
        /// cloister.toml).
        #[arg(long)]
        workers: bool,
    },
    /// Claim and run the environment's plugin stages and model fits from
    /// its work queue
    /// (`[workers]` in cloister.toml, docs/SCALING.md); any number of
    /// workers, on any machines that reach the database and the object
    /// store. SIGTERM or Ctrl-C stops it once the task in hand is done.
    Worker {
        /// The name this worker claims tasks under (default: host name and
        /// process id).
        #[arg(long)]
        name: Option<String>,
        /// Seconds of each claim's lease; the worker renews it every third
        /// of that while it works, and a task whose lease runs out goes to
        /// another worker.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
        lease_seconds: u64,
        /// Exit after this many tasks (default: run until stopped).
        #[arg(long)]
        max_tasks: Option<u64>,
    },
    /// Apply the store's missing schema migrations (PostgreSQL), with the
    /// environment closed; recorded in the audit log.
    Migrate,
    /// Make NAME an active admin with a new token (printed once), for an
    /// environment whose admins are all locked out. Needs no token, only
    /// the environment directory (its keys); recorded in the audit log
    /// before it takes effect
    RecoverAdmin {
        /// The account: created if absent, enabled and given the admin
        /// role if needed; its old token stops working.
        name: String,
    },
    /// Move the environment's state from its sled store to an empty
    /// PostgreSQL database, with the environment closed; recorded in the
    /// audit log (docs/SCALING.md).
    MoveStore {
        /// The database: a postgres:// URL (prefer the variable when it
        /// holds a password).
        #[arg(
            long,
            env = "CLOISTER_STORE",
            hide_env_values = true,
            value_name = "URL"
        )]
        to: String,
        /// A PEM file of CA certificates: trust only these for the
        /// database server's TLS certificate.
        #[arg(long, value_name = "FILE")]
        store_ca: Option<std::path::PathBuf>,
    },
    /// Manage users and their roles.
    #[command(subcommand)]
    User(admin_cmd::UserCommand),
    /// Check and explain the active policies.
    #[command(subcommand)]
    Policy(admin_cmd::PolicyCommand),
    /// Import datasets and view their statistics.
    #[command(subcommand)]
    Dataset(dataset_cmd::DatasetCommand),
    /// Read, verify, checkpoint and prove the audit log.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// List the training templates.
    #[command(subcommand)]
    Template(model_cmd::TemplateCommand),
    /// Train a model: approved plugins over a dataset, a template, the
    /// evaluation on the test split.
    Train(model_cmd::TrainArgs),
    /// Predict with a model on your own mock data (JSONL), through the
    /// model's plugin chain.
    Predict {
        /// Model id.
        model: String,
        /// Records (JSONL).
        #[arg(long)]
        input: std::path::PathBuf,
    },
    /// Inspect models and run the release gate.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Check a model bundle offline; fails on any modified byte.
    VerifyBundle {
        /// The bundle.
        file: std::path::PathBuf,
        /// The expected signing key (hex), e.g. from `model export`.
        #[arg(long)]
        key: Option<String>,
    },
    /// Inspect, run, add, approve and list plugins.
    #[command(subcommand)]
    Plugin(plugin_cmd::PluginCommand),
    /// Start an active-learning pipeline (a TOML spec) and run it.
    Run(job_cmd::RunArgs),
    /// List, show, resume and cancel active-learning jobs; their label
    /// statistics.
    #[command(subcommand)]
    Job(job_cmd::JobCommand),
    /// The human labeling queue: next item, set a label, import labels,
    /// change an answer until its round collects it.
    #[command(subcommand)]
    Label(job_cmd::LabelCommand),
    /// Deployments: serve released models to client accounts, with
    /// candidates, a shadow, promotion and rollback.
    #[command(subcommand)]
    Deploy(deploy_cmd::DeployCommand),
    /// Serve the web console (and its JSON API under /api).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Mark the session cookie Secure (when a TLS proxy is in front).
        #[arg(long)]
        secure_cookies: bool,
        /// Take over, looking every SECONDS (default 5), the jobs whose
        /// driving process ended (killed, crashed, its machine lost) and
        /// drive them on with the authority of the user who started them.
        /// One replica takes each; every takeover is audited.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "5",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        take_over_jobs: Option<u64>,
    },
    /// The active-learning demo on the bundled SpamAssassin data, in a
    /// throwaway environment.
    Demo(demo::DemoArgs),
}

fn serve(
    env: &session::EnvArgs,
    addr: std::net::SocketAddr,
    secure_cookies: bool,
    take_over_jobs: Option<u64>,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let c = cloister_host::service::Cloister::open(&env.env, "console")
        .with_context(|| format!("cannot open the environment {}", env.env.display()))?;
    let console = cloister_console::Console::new(
        c,
        cloister_console::ConsoleConfig {
            secure_cookies,
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    output::tell!("console on http://{addr} (Ctrl-C stops it)");
    rt.block_on(async {
        if let Some(every) = take_over_jobs {
            cloister_console::take_over_jobs(
                std::sync::Arc::clone(&console),
                std::time::Duration::from_secs(every),
            );
        }
        cloister_console::serve(console, addr).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging(format: LogFormat, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter =
        EnvFilter::try_from_env("CLOISTER_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A closed pipe (`cloister … | head`) ends the program quietly, as it does
/// for the usual Unix tools, instead of a panic: Rust ignores SIGPIPE, so
/// `println!` into a closed pipe panics with an EPIPE message, which this
/// hook turns into exit status 141 (128 + SIGPIPE) without a word.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    // SAFETY: the first statement of `main`: no other thread exists yet
    // (nothing runs before `main` in this binary that starts one).
    #[allow(unsafe_code)]
    unsafe {
        cloister_host::train::model::settle_thread_count()
    };
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.verbose);
    small_pages_only();
    let result = match cli.command {
        Command::Init {
            dir,
            admin,
            store,
            store_ca,
            objects,
            workers,
        } => admin_cmd::init(
            dir,
            admin,
            store.store,
            store_ca.as_deref(),
            objects,
            workers,
        ),
        Command::Worker {
            name,
            lease_seconds,
            max_tasks,
        } => admin_cmd::worker(&cli.env, name, lease_seconds, max_tasks),
        Command::Migrate => admin_cmd::migrate(&cli.env),
        Command::RecoverAdmin { name } => admin_cmd::recover_admin(&cli.env, &name),
        Command::MoveStore { to, store_ca } => {
            admin_cmd::move_store(&cli.env, &to, store_ca.as_deref())
        }
        Command::User(cmd) => admin_cmd::user(&cli.env, cmd),
        Command::Policy(cmd) => admin_cmd::policy(&cli.env, cmd),
        Command::Dataset(cmd) => dataset_cmd::run(&cli.env, cmd),
        Command::Audit(cmd) => audit_cmd::run(&cli.env, cmd),
        Command::Plugin(cmd) => plugin_cmd::run(&cli.env, cmd),
        Command::Deploy(cmd) => deploy_cmd::run(&cli.env, cmd),
        Command::Template(model_cmd::TemplateCommand::List { json }) => model_cmd::templates(json),
        Command::Train(args) => model_cmd::train(&cli.env, args),
        Command::Predict { model, input } => model_cmd::predict(&cli.env, &model, &input),
        Command::Model(cmd) => model_cmd::model(&cli.env, cmd),
        Command::VerifyBundle { file, key } => model_cmd::verify_bundle(&file, key.as_deref()),
        Command::Run(args) => job_cmd::run(&cli.env, args),
        Command::Job(cmd) => job_cmd::job(&cli.env, cmd),
        Command::Label(cmd) => job_cmd::label(&cli.env, cmd),
        Command::Serve {
            addr,
            secure_cookies,
            take_over_jobs,
        } => serve(&cli.env, addr, secure_cookies, take_over_jobs),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            output::tell!("error: {}", error_line(&e));
            if let Some(hint) = hint(&e) {
                output::tell!("hint: {hint}");
            }
            ExitCode::from(session::exit_code(&e))
        }
    }
}

/// Turns transparent huge pages off for this process (and what it starts).
/// With THP on (`always`, as on many distributions), memory the allocator
/// returns to the kernel and takes back is faulted in again as whole 2 MiB
/// pages, each zeroed: on 20 Newsgroups a `train` spent more system time
/// zeroing pages than training, and runs about 1.5× faster end to end with
/// small pages (docs/BENCHMARKS.md, "Huge pages off"). Best effort: a
/// kernel without the flag keeps its default.
fn small_pages_only() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!("transparent huge pages stay as the system sets them: {e}");
    }
}

/// An error and its causes on one line, `outer: cause: …`, leaving out a
/// cause whose text the line already ends with (a message that names its
/// source, such as `FILE: No such file or directory`, would otherwise say
/// it twice).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Where to look next, for errors whose message is deliberately short:
/// a plugin's failure inside an environment is sealed (the user sees a
/// fixed sentence, never the plugin's own words), so the hint names where
/// its reason is and how an author reproduces it on mock data. Host-written
/// text only.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use cloister_host::runtime::{CallStage, RuntimeError};
    use cloister_host::service::ServiceError;
    let runtime = e
        .chain()
        .find_map(|c| match c.downcast_ref::<ServiceError>() {
            Some(ServiceError::Runtime(r)) => Some(r),
            _ => c.downcast_ref::<RuntimeError>(),
        })?;
    match runtime {
        RuntimeError::Plugin {
            stage: CallStage::Configure,
            ..
        } => Some(
            "`cloister plugin show DIGEST` lists the plugin's configuration keys and their defaults; the plugin's own reason is in the administrators' plugin log (`cloister plugin log`)",
        ),
        r if r.reason_in_plugin_log() => Some(
            "the plugin's own reason is in the administrators' plugin log (`cloister plugin log`); its author can run it on mock data with `cloister plugin run FILE.wasm --input MOCK.jsonl --show-plugin-log`",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn a_cause_the_message_already_ends_with_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let named = anyhow::Error::new(io).context("data.jsonl: no such file");
        assert_eq!(error_line(&named), "data.jsonl: no such file");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let plain = anyhow::Error::new(io).context("reading data.jsonl");
        assert_eq!(error_line(&plain), "reading data.jsonl: no such file");
    }
}
