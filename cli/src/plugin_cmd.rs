//! `cloister plugin …`: inspect, build (Python), run locally, list the
//! bundled plugins; add, approve and list an environment's plugins.

use crate::output::{say, tell};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use cloister_host::records::{self, Schema};
use cloister_host::runtime::{Inspection, Limits, Runtime, RuntimeConfig, sandbox};
use cloister_host::types::PluginKind;

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Show a component's identity, metadata, imports and whether the
    /// sandbox accepts it. Exits non-zero when it is refused.
    Inspect {
        /// The component (.wasm).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one plugin locally over a mock JSONL file (never real data).
    Run(Box<RunArgs>),
    /// Build a Python plugin (written with the Cloister Python SDK) into
    /// a component with componentize-py, every WASI import stubbed; the
    /// result is inspected before it is written.
    Build(crate::python_build::BuildArgs),
    /// Add a component to the environment's registry (inspected, stored by
    /// digest, unapproved).
    Add {
        /// The component (.wasm).
        file: PathBuf,
    },
    /// Approve a registered digest for running (a reviewer who did not add
    /// it). Any other digest, even one byte different, stays unapproved.
    Approve {
        /// The digest (or a unique prefix of at least 8 hex digits).
        digest: String,
    },
    /// Withdraw a digest's approval (reviewers and admins): it runs nowhere
    /// from then on — no training, no job step, no prediction, no
    /// deployment — until a reviewer approves it again.
    Withdraw {
        /// The digest (or a unique prefix of at least 8 hex digits).
        digest: String,
    },
    /// Show one registered plugin: what it declares (kind, description,
    /// configuration keys with their defaults), its imports, who added and
    /// who approved it.
    Show {
        /// The digest (or a unique prefix of at least 8 hex digits), or the
        /// name of one approved plugin.
        digest: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the environment's registered plugins.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the administrators' plugin log, newest first: what plugins
    /// wrote and the full detail of every failed stage (admins only;
    /// reading it is audited).
    Log {
        /// Only plugins whose digest starts with this.
        #[arg(long)]
        digest: Option<String>,
        /// At most this many entries (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the plugins bundled with Cloister; optionally write them out.
    Bundled {
        /// Write each bundled component to DIR/NAME.wasm.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The component (.wasm).
    file: PathBuf,
    /// Input JSONL: records (preprocessor, featurizer) or
    /// {"id", "models": [[p, ...], ...]} lines (selector).
    #[arg(long)]
    input: PathBuf,
    /// A configuration value, KEY=VALUE (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Write results here (JSONL) instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Class names, comma-separated (selectors only).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Records per plugin call.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Parallel plugin instances (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// CPU budget per call, in fuel units.
    #[arg(long)]
    fuel: Option<u64>,
    /// Linear-memory cap per instance, MiB.
    #[arg(long)]
    memory_mb: Option<usize>,
    /// Wall-clock timeout per call, milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Output cap per call, bytes.
    #[arg(long)]
    output_bytes: Option<usize>,
    /// Print the plugin's captured stdout/stderr and error details (local
    /// runs only: inside an environment this log is for administrators).
    #[arg(long)]
    show_plugin_log: bool,
    /// A fitted featurizer's training records: it is fitted on these, as
    /// an environment fits it on its training split, before it featurizes
    /// `--input` (default: `--input` itself).
    #[arg(long, value_name = "JSONL")]
    fit_on: Option<PathBuf>,
    /// The fewest records a term must occur in to enter a fitted
    /// featurizer's vocabulary (an environment uses its minimum cell size,
    /// 10 by default).
    #[arg(long, default_value_t = 10)]
    fit_min_records: u32,
}

pub fn run(env: &crate::session::EnvArgs, cmd: PluginCommand) -> Result<ExitCode> {
    match cmd {
        PluginCommand::Add { file } => {
            let bytes = read_component(&file)?;
            let s = env.session()?;
            let e = s.cloister.add_plugin(&s.user, &bytes)?;
            say!(
                "added {} {} ({}) sha256:{}",
                e.name,
                e.version,
                e.kind.as_str(),
                e.digest
            );
            say!(
                "not approved yet: a reviewer runs `cloister plugin approve {}`",
                &e.digest[..16]
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Approve { digest } => {
            let s = env.session()?;
            let e = s.cloister.approve_plugin(&s.user, &digest)?;
            say!("approved {} {} sha256:{}", e.name, e.version, e.digest);
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Withdraw { digest } => {
            let s = env.session()?;
            let e = s.cloister.withdraw_approval(&s.user, &digest)?;
            say!(
                "withdrew the approval of {} {} sha256:{}: it runs nowhere until approved again",
                e.name,
                e.version,
                e.digest
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Show { digest, json } => {
            let s = env.reading_session()?;
            let e = s.cloister.show_plugin(&s.user, &digest)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&e)?);
            } else {
                print_entry(&e);
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::List { json } => {
            let s = env.reading_session()?;
            let all = s.cloister.list_plugins(&s.user)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                say!("no plugins (add one with `cloister plugin add FILE.wasm`)");
            } else {
                for e in &all {
                    let state = match (&e.approval, e.withdrawn.last()) {
                        (Some(a), _) => format!("approved by {}", a.by),
                        (None, Some(w)) => format!("NOT APPROVED (withdrawn by {})", w.by),
                        (None, None) => "NOT APPROVED".to_string(),
                    };
                    say!(
                        "{}  {:<20} {:<8} {:<12} added by {:<12} {}",
                        &e.digest[..16],
                        e.name,
                        e.version,
                        e.kind.as_str(),
                        e.added_by,
                        state
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Log {
            digest,
            limit,
            json,
        } => {
            let s = env.session()?;
            let entries = s.cloister.plugin_log(&s.user, digest.as_deref(), limit)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                say!("the plugin log is empty");
            } else {
                for e in &entries {
                    say!(
                        "#{} {} {} {} {} [{}] {} records, fuel {}, peak memory {} KiB, {} ms",
                        e.seq,
                        cloister_host::time::rfc3339(e.time_ms),
                        e.actor,
                        &e.digest[..16.min(e.digest.len())],
                        e.stage,
                        e.code,
                        e.purpose,
                        e.usage.fuel,
                        e.usage.peak_memory_bytes / 1024,
                        e.usage.wall_ms
                    );
                    if let Some(d) = &e.detail {
                        say!("  host: {}", cloister_host::text::neutralize(d));
                    }
                    for line in e.output.lines() {
                        say!("  | {}", cloister_host::text::neutralize(line));
                    }
                    if e.dropped_bytes > 0 {
                        say!("  ({} more bytes dropped)", e.dropped_bytes);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Inspect { file, json } => inspect(&file, json),
        PluginCommand::Run(args) => run_local(*args),
        PluginCommand::Build(args) => crate::python_build::build(args),
        PluginCommand::Bundled { write } => bundled(write.as_deref()),
    }
}

fn read_component(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn inspect(file: &Path, json: bool) -> Result<ExitCode> {
    let bytes = read_component(file)?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let report = runtime.inspect(&bytes);
    if let Err(e @ cloister_host::runtime::RuntimeError::NotAComponent(_)) = &report.verdict {
        bail!("{}: {e}", file.display());
    }
    if json {
        crate::output::json(&serde_json::to_string_pretty(&inspection_json(
            file, &report,
        ))?);
    } else {
        print_inspection(file, &report);
    }
    Ok(if report.verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn inspection_json(file: &Path, r: &Inspection) -> serde_json::Value {
    let imports: Vec<serde_json::Value> = r
        .imports
        .iter()
        .map(|i| {
            let allowed = sandbox::forbidden_imports([i.as_str()]).is_empty();
            serde_json::json!({"name": i, "allowed": allowed})
        })
        .collect();
    serde_json::json!({
        "file": file.display().to_string(),
        "digest": format!("sha256:{}", r.digest),
        "size": r.size,
        "loadable": r.verdict.is_ok(),
        "refusal": r.verdict.as_ref().err().map(|e| serde_json::json!({"code": e.code(), "message": e.to_string()})),
        "metadata": r.metadata,
        "fitted": r.fitted,
        "imports": imports,
        "exports": r.exports,
    })
}

fn print_entry(e: &cloister_host::registry::PluginEntry) {
    say!("digest:      sha256:{}", e.digest);
    say!("name:        {}", e.name);
    say!("version:     {}", e.version);
    say!("kind:        {}", e.kind.as_str());
    say!("description: {}", e.description);
    print_config_keys(&e.config);
    say!("imports:     {}", e.imports.len());
    for i in &e.imports {
        say!("  {i}");
    }
    say!("size:        {} bytes", e.size);
    say!(
        "added:       by {} at {}",
        e.added_by,
        cloister_host::time::rfc3339(e.added_ms)
    );
    match &e.approval {
        Some(a) => say!(
            "approved:    by {} at {}",
            a.by,
            cloister_host::time::rfc3339(a.time_ms)
        ),
        None => say!(
            "approved:    NOT APPROVED (a reviewer who did not add it runs `cloister plugin approve {}`)",
            &e.digest[..16]
        ),
    }
    for w in &e.withdrawn {
        say!(
            "withdrawn:   by {} at {} (approved by {} at {})",
            w.by,
            cloister_host::time::rfc3339(w.time_ms),
            w.approval.by,
            cloister_host::time::rfc3339(w.approval.time_ms)
        );
    }
}

fn print_config_keys(keys: &[cloister_host::types::ConfigKey]) {
    if keys.is_empty() {
        say!("config keys: (none)");
    } else {
        say!("config keys:");
        for k in keys {
            say!(
                "  {} = {:?}\n      {}",
                k.name,
                k.default_value,
                k.description
            );
        }
    }
}

fn print_inspection(file: &Path, r: &Inspection) {
    say!("file:        {}", file.display());
    say!("digest:      sha256:{}", r.digest);
    say!("size:        {} bytes", r.size);
    match &r.verdict {
        Ok(()) => say!("verdict:     loadable"),
        Err(e) => say!("verdict:     REFUSED [{}] {e}", e.code()),
    }
    if let Some(m) = &r.metadata {
        say!("name:        {}", m.name);
        say!("version:     {}", m.version);
        if r.fitted {
            say!(
                "kind:        {} (fitted: learns from the training split)",
                m.kind
            );
        } else {
            say!("kind:        {}", m.kind);
        }
        say!("description: {}", m.description);
        print_config_keys(&m.config);
    }
    say!("imports:");
    for i in &r.imports {
        let allowed = sandbox::forbidden_imports([i.as_str()]).is_empty();
        say!(
            "  {i:<40} {}",
            if allowed { "allowed" } else { "FORBIDDEN" }
        );
    }
}

fn parse_config(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => bail!("--config {p:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// Write `f`'s output to `path` atomically (temp file + rename), or stdout.
fn write_output(
    path: Option<&Path>,
    f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    match path {
        None => {
            let stdout = std::io::stdout();
            let mut lock = std::io::BufWriter::new(stdout.lock());
            f(&mut lock)?;
            lock.flush()?;
        }
        Some(path) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = path.file_name().context("--output needs a file name")?;
            let tmp = dir.join(format!(
                ".{}.tmp-{}",
                name.to_string_lossy(),
                std::process::id()
            ));
            let result = (|| -> std::io::Result<()> {
                let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
                f(&mut w)?;
                w.flush()?;
                w.get_ref().sync_all()?;
                std::fs::rename(&tmp, path)
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("cannot write {}", path.display()));
            }
        }
    }
    Ok(())
}

fn run_local(args: RunArgs) -> Result<ExitCode> {
    let bytes = read_component(&args.file)?;
    let config = parse_config(&args.config)?;
    let defaults = Limits::default();
    let limits = Limits {
        fuel: args.fuel.unwrap_or(defaults.fuel),
        memory_bytes: args
            .memory_mb
            .map_or(defaults.memory_bytes, |m| m.saturating_mul(1024 * 1024)),
        output_bytes: args.output_bytes.unwrap_or(defaults.output_bytes),
        timeout: args
            .timeout_ms
            .map_or(defaults.timeout, Duration::from_millis),
        ..defaults
    };
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let plugin = runtime
        .load(&bytes)
        .with_context(|| format!("{}", args.file.display()))?;
    let mut runner = plugin
        .runner(&runtime, &config, limits.clone())?
        .batch_size(args.batch_size);
    if let Some(w) = args.workers {
        runner = runner.workers(w);
    }
    let started = Instant::now();
    let (result, count) = match plugin.kind {
        PluginKind::Preprocessor | PluginKind::Featurizer => {
            if !args.classes.is_empty() {
                bail!(
                    "--classes is only for selectors; {} is a {}",
                    plugin.metadata.name,
                    plugin.kind
                );
            }
            let input = records::read_file(&args.input, Schema::default())?;
            let n = input.len();
            if plugin.fitted {
                let fit_records = match &args.fit_on {
                    Some(path) => records::read_file(path, Schema::default())?,
                    None => input.clone(),
                };
                let terms =
                    match runner.term_counts(&fit_records, cloister_host::fitted::MAX_DISTINCT) {
                        Ok(t) => t,
                        Err(e) => bail!(
                            "fitting on {} records: {} [{}]",
                            fit_records.len(),
                            e,
                            e.code()
                        ),
                    };
                let cap = (limits.max_dimension as usize).min(cloister_host::fitted::MAX_TERMS);
                let vocabulary = cloister_host::fitted::vocabulary(
                    terms.documents,
                    terms.counts,
                    args.fit_min_records,
                    cap,
                )?;
                tell!(
                    "fitted on {} records: {} terms at least {} of them contain",
                    fit_records.len(),
                    vocabulary.keys.len(),
                    args.fit_min_records.max(1)
                );
                runner = runner.vocabulary(std::sync::Arc::new(vocabulary));
            } else if args.fit_on.is_some() {
                bail!(
                    "--fit-on is only for fitted featurizers; {} is not one",
                    plugin.metadata.name
                );
            }
            let result = if plugin.kind == PluginKind::Preprocessor {
                runner.preprocess(&input).map(|out| {
                    write_output(args.output.as_deref(), |w| records::write_records(w, &out))
                })
            } else {
                runner.featurize(&input).map(|b| {
                    let ids: Vec<&str> = input.iter().map(|r| r.id.as_str()).collect();
                    write_output(args.output.as_deref(), |w| {
                        records::write_features(w, &ids, &b)
                    })
                })
            };
            (result, n)
        }
        PluginKind::Selector => {
            if args.classes.is_empty() {
                bail!("a selector needs --classes NAME,NAME,...");
            }
            let input = records::read_prediction_sets(&args.input)?;
            let n = input.len();
            let result = runner.select(&args.classes, &input).map(|d| {
                write_output(args.output.as_deref(), |w| {
                    records::write_decisions(w, &args.classes, &d)
                })
            });
            (result, n)
        }
    };
    let (log, dropped) = runner.take_log();
    if args.show_plugin_log && (!log.is_empty() || dropped > 0) {
        tell!(
            "--- plugin log ({} bytes{}) ---",
            log.len(),
            if dropped > 0 {
                format!(", {dropped} more dropped")
            } else {
                String::new()
            }
        );
        tell!("{}", String::from_utf8_lossy(&log).trim_end());
        tell!("--- end of plugin log ---");
    }
    match result {
        Ok(written) => written?,
        Err(e) => {
            let hint = if !args.show_plugin_log && !log.is_empty() {
                " (run with --show-plugin-log for the plugin's own output)"
            } else {
                ""
            };
            bail!("{} [{}]{hint}", e, e.code());
        }
    }
    tracing::info!(records = count, elapsed_ms = started.elapsed().as_millis() as u64, plugin = %plugin.digest.short(), "plugin run finished");
    Ok(ExitCode::SUCCESS)
}

fn bundled(write: Option<&Path>) -> Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    if let Some(dir) = write {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for (name, bytes) in cloister_bundled_plugins::ALL {
        let p = runtime
            .load(bytes)
            .with_context(|| format!("bundled plugin {name}"))?;
        say!(
            "{:<18} {:<8} {:<13} sha256:{}",
            p.metadata.name,
            p.metadata.version,
            p.kind.to_string(),
            p.digest
        );
        if let Some(dir) = write {
            let path = dir.join(format!("{name}.wasm"));
            std::fs::write(&path, bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
