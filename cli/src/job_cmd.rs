//! `cloister run`, `cloister job …` and `cloister label …`.

use crate::output::{say, tell};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use cloister_host::jobs::{Job, JobEvent, JobState, JobStats, Oracle};
use cloister_host::service::Cloister;
use cloister_host::users::User;

use crate::session::EnvArgs;

/// `cloister run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline spec (TOML).
    pub pipeline: PathBuf,
    /// Answer the human queue from the dataset's gold labels (hidden from
    /// training until "labeled"), to measure label efficiency.
    #[arg(long, value_enum)]
    pub oracle: Option<OracleArg>,
}

/// Oracles.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OracleArg {
    /// The dataset's gold labels.
    Gold,
}

/// `cloister job …`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List jobs.
    List {
        /// Print JSON: an array of objects (see docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Show a job: state, per-round table, result.
    Show {
        /// Job id.
        id: String,
        /// Print the stored job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Label statistics: manual labels, automatic labels and their
    /// precision, utilization, agreement, cost saved.
    Stats {
        /// Job id.
        id: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Continue a job from its last completed step.
    Resume {
        /// Job id.
        id: String,
    },
    /// Cancel a job (it stops at its next step boundary).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Move a labeler's open items to another labeler, who also takes
    /// their place in the rounds to come (someone away, an account
    /// disabled). Answers already given stay theirs.
    Reassign {
        /// Job id.
        id: String,
        /// The labeler whose items move.
        #[arg(long)]
        from: String,
        /// The labeler who takes them (an active labeler).
        #[arg(long)]
        to: String,
    },
}

/// `cloister label …`.
#[derive(Debug, Subcommand)]
pub enum LabelCommand {
    /// Show the next record queued for you (the only place record text is
    /// shown; each view is audited).
    Next {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Label a record queued for you.
    Set {
        /// Record id.
        id: String,
        /// The label (one of the job's classes).
        label: String,
        /// The job, when the record is queued for you by several.
        #[arg(long)]
        job: Option<String>,
    },
    /// Import labels for records queued for you: JSONL (`id`, `label`,
    /// optional `job`) or CSV with a header. All or nothing.
    Import {
        /// The file.
        file: PathBuf,
    },
    /// List your answers that can still change (their round has not
    /// collected them yet), the latest first.
    Answers {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change your answer to a record until its round collects it.
    Change {
        /// Record id.
        id: String,
        /// The new label (one of the job's classes).
        label: String,
        /// The job, when you answered the record for several.
        #[arg(long)]
        job: Option<String>,
    },
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

/// A live progress printer for a running job.
pub fn progress_printer() -> impl FnMut(JobEvent<'_>) {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    move |e: JobEvent<'_>| {
        let t = started.elapsed().as_secs_f64();
        match e {
            JobEvent::Stage(s) => tell!("[{t:6.1}s] {s}"),
            JobEvent::Training {
                round,
                template,
                records,
            } => {
                if tty {
                    crate::output::redraw(format_args!(
                        "[{t:6.1}s] round {round}: training {template} on {records} labels…"
                    ));
                } else {
                    tell!("[{t:6.1}s] round {round}: training {template} on {records} labels");
                }
            }
            JobEvent::Trained { round, score } => {
                if tty {
                    crate::output::clear_line();
                }
                tell!(
                    "[{t:6.1}s] round {round}: {} val acc {:.4} (epoch {}, {:.1}s)",
                    score.template,
                    score.val_accuracy,
                    score.best_epoch,
                    score.seconds
                );
            }
            JobEvent::Round(r) => {
                if r.models.is_empty() {
                    tell!(
                        "[{t:6.1}s] round {}: {} seed records queued",
                        r.round,
                        r.queued
                    );
                } else {
                    tell!(
                        "[{t:6.1}s] round {}: committee val acc {} test acc {}; {} auto-labeled, {} queued, {} badcases for review{}",
                        r.round,
                        fmt_opt(r.val_accuracy),
                        fmt_opt(r.test_accuracy),
                        r.auto_accepted,
                        r.queued,
                        r.badcases_queued,
                        r.stop
                            .as_deref()
                            .map(|s| format!("; stop: {s}"))
                            .unwrap_or_default()
                    );
                }
            }
            JobEvent::Answered { round, answered } => {
                tell!("[{t:6.1}s] round {round}: {answered} answers");
            }
            JobEvent::Waiting { open } => {
                tell!(
                    "[{t:6.1}s] waiting for labelers: {open} open items (`cloister label next`), then `cloister job resume`"
                );
            }
            JobEvent::Finished(f) => {
                tell!(
                    "[{t:6.1}s] finished: test accuracy {:.4}, models {}",
                    f.test_accuracy,
                    f.models.join(", ")
                );
            }
        }
    }
}

/// The per-round table.
pub fn print_rounds(job: &Job) {
    say!(
        "{:>5} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>9}",
        "round",
        "manual",
        "auto",
        "val acc",
        "test acc",
        "+auto",
        "prec",
        "queued",
        "fixed",
        "new bad",
        "pool left"
    );
    for r in &job.rounds {
        if r.models.is_empty() {
            say!(
                "{:>5} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>9}",
                r.round,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                r.queued,
                "-",
                "-",
                r.pool_left
            );
            continue;
        }
        let prec = if r.auto_checked > 0 {
            format!("{:.3}", r.auto_correct as f64 / r.auto_checked as f64)
        } else {
            "-".into()
        };
        say!(
            "{:>5} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>9}",
            r.round,
            r.train_manual,
            r.train_auto,
            fmt_opt(r.val_accuracy),
            fmt_opt(r.test_accuracy),
            r.auto_accepted,
            prec,
            r.queued + r.badcases_queued,
            r.fixed.len(),
            r.appeared.len(),
            r.pool_left
        );
    }
    for r in &job.rounds {
        if let Some(g) = &r.gate {
            say!("round {}: {}", r.round, g.summary(&job.classes));
            if r.spot_checks > 0 {
                say!(
                    "round {}: {} spot checks, {} answered, {} confirmed{}",
                    r.round,
                    r.spot_checks,
                    r.spot_checked,
                    r.spot_agreed,
                    if r.revoked > 0 {
                        format!(
                            "; precision below the target: {} automatic labels revoked",
                            r.revoked
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
}

/// The label statistics.
pub fn print_stats(s: &JobStats) {
    let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0));
    say!("pool (unlabeled training records): {}", s.pool_size);
    if !s.labelers.is_empty() {
        let each: Vec<String> = s
            .labelers
            .iter()
            .map(|l| {
                format!(
                    "{} {} open, {} answered{}",
                    l.labeler,
                    l.open,
                    l.answered,
                    if l.active {
                        ""
                    } else {
                        " (not an active labeler now: reassign their open items)"
                    }
                )
            })
            .collect();
        say!("waiting for labelers: {}", each.join("; "));
    }
    say!(
        "manual labels: {} used of {} requested ({} of the pool)",
        s.manual_used,
        s.manual_requested,
        pct(s.manual_share)
    );
    say!(
        "automatic labels: {} (precision against gold {} on {} checked)",
        s.auto_accepted,
        pct(s.auto_precision),
        s.auto_checked
    );
    if s.spot_checked > 0 {
        say!(
            "spot checks: {} automatic labels checked by people, {} confirmed ({}); {} revoked",
            s.spot_checked,
            s.spot_agreed,
            pct(Some(s.spot_agreed as f64 / s.spot_checked as f64)),
            s.revoked
        );
    }
    if let (Some(e), Some(lo), Some(hi)) =
        (s.auto_estimate, s.auto_estimate_low, s.auto_estimate_high)
    {
        say!(
            "estimated precision without gold: {} (rounds' intervals {} to {})",
            pct(Some(e)),
            pct(Some(lo)),
            pct(Some(hi))
        );
    }
    say!(
        "badcase reviews: {} of {} requested",
        s.reviews_done,
        s.reviews_requested
    );
    say!("label utilization: {}", pct(s.label_utilization));
    if s.double_labeled > 0 {
        say!(
            "labeler agreement: {} of {} records labeled twice",
            s.agreeing,
            s.double_labeled
        );
    }
    say!(
        "cost: {:.2} spent at {:.2} per label; labeling the whole pool: {:.2}; saved {:.2}",
        s.cost_spent,
        s.price_per_label,
        s.cost_full_pool,
        s.cost_saved
    );
    say!("test accuracy: {}", fmt_opt(s.test_accuracy));
}

fn print_outcome(job: &Job) -> ExitCode {
    match &job.state {
        JobState::Done { reason } => say!("job {} done ({reason})", job.id),
        JobState::AwaitingLabels { open } => say!(
            "job {} waits for labelers: {open} open items; resume with `cloister job resume {}`",
            job.id,
            job.id
        ),
        JobState::Cancelled { by } => say!("job {} cancelled by {by}", job.id),
        JobState::Failed { error } => say!("job {} failed: {error}", job.id),
        JobState::Running => say!("job {} is running", job.id),
    }
    ExitCode::SUCCESS
}

/// Drives a job and prints its table and statistics.
pub fn drive(c: &Cloister, who: &User, id: &str) -> Result<Job> {
    let mut progress = progress_printer();
    let job = c.run_job(who, id, &mut progress)?;
    say!();
    print_rounds(&job);
    if let Some(r) = &job.result {
        say!(
            "\nfinal committee: test accuracy {:.4}, macro F1 {:.4}, {} training labels; models {}",
            r.test_accuracy,
            r.test_macro_f1,
            r.train_records,
            r.models.join(", ")
        );
    }
    say!();
    print_stats(&c.job_stats(who, id)?);
    Ok(job)
}

pub fn run(env: &EnvArgs, args: RunArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.pipeline)
        .with_context(|| format!("cannot read {}", args.pipeline.display()))?;
    let s = env.session()?;
    let file = args.pipeline.display().to_string();
    let oracle = args.oracle.map(|OracleArg::Gold| Oracle::Gold);
    let job = s.cloister.start_job(&s.user, &file, &text, oracle)?;
    tell!(
        "job {} started (resume it with `cloister job resume {}`)",
        job.id,
        job.id
    );
    let job = drive(&s.cloister, &s.user, &job.id)?;
    Ok(print_outcome(&job))
}

pub fn job(env: &EnvArgs, cmd: JobCommand) -> Result<ExitCode> {
    let s = if matches!(
        cmd,
        JobCommand::List { .. } | JobCommand::Show { .. } | JobCommand::Stats { .. }
    ) {
        env.reading_session()?
    } else {
        env.session()?
    };
    let (c, who) = (&s.cloister, &s.user);
    match cmd {
        JobCommand::List { json } => {
            let jobs = c.list_jobs(who)?;
            if json {
                let rows: Vec<serde_json::Value> = jobs
                    .iter()
                    .map(|j| {
                        serde_json::json!({
                            "id": j.id, "name": j.spec.name, "dataset": j.dataset,
                            "state": j.state.name(),
                            "rounds": j.rounds.iter().filter(|r| !r.models.is_empty()).count(),
                            "started_by": j.started_by, "created_ms": j.created_ms,
                            "updated_ms": j.updated_ms,
                        })
                    })
                    .collect();
                crate::output::json(&serde_json::to_string_pretty(&rows)?);
                return Ok(ExitCode::SUCCESS);
            }
            say!(
                "{:<16} {:<18} {:<16} {:<14} {:>6}  by",
                "id",
                "name",
                "dataset",
                "state",
                "rounds"
            );
            for j in jobs {
                say!(
                    "{:<16} {:<18} {:<16} {:<14} {:>6}  {}",
                    j.id,
                    j.spec.name,
                    j.dataset,
                    j.state.name(),
                    j.rounds.iter().filter(|r| !r.models.is_empty()).count(),
                    j.started_by
                );
            }
        }
        JobCommand::Show { id, json } => {
            let j = c.show_job(who, &id)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&j)?);
            } else {
                say!("job {} `{}` by {}", j.id, j.spec.name, j.started_by);
                say!("dataset {} ({})", j.dataset, &j.dataset_digest[..12]);
                say!("state {}; next {:?}", j.state.name(), j.next);
                if let JobState::Failed { error } = &j.state {
                    say!("error: {error}");
                }
                for r in &j.reassigned {
                    say!(
                        "reassigned: {} open item{} from {} to {} by {}",
                        r.items,
                        if r.items == 1 { "" } else { "s" },
                        r.from,
                        r.to,
                        r.by
                    );
                }
                say!();
                print_rounds(&j);
                if let Some(r) = &j.result {
                    say!(
                        "\nfinal committee: test accuracy {:.4}, macro F1 {:.4}; models {}",
                        r.test_accuracy,
                        r.test_macro_f1,
                        r.models.join(", ")
                    );
                }
            }
        }
        JobCommand::Stats { id, json } => {
            let st = c.job_stats(who, &id)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&st)?);
            } else {
                print_stats(&st);
            }
        }
        JobCommand::Resume { id } => {
            let j = drive(c, who, &id)?;
            return Ok(print_outcome(&j));
        }
        JobCommand::Cancel { id } => {
            let j = c.cancel_job(who, &id)?;
            return Ok(print_outcome(&j));
        }
        JobCommand::Reassign { id, from, to } => {
            let (j, moved) = c.reassign_labels(who, &id, &from, &to)?;
            say!(
                "moved {moved} open item{} of job {} from {from} to {to}; the rounds to come ask {}",
                if moved == 1 { "" } else { "s" },
                j.id,
                j.labelers().join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn label(env: &EnvArgs, cmd: LabelCommand) -> Result<ExitCode> {
    let s = env.session()?;
    let (c, who) = (&s.cloister, &s.user);
    match cmd {
        LabelCommand::Next { json } => match c.next_label_item(who)? {
            None => say!("nothing is queued for you"),
            Some(task) => {
                let (item, record, waiting) = (task.item, task.record, task.waiting);
                if json {
                    let texts: serde_json::Map<String, serde_json::Value> = record
                        .record
                        .texts
                        .iter()
                        .map(|t| (t.name.clone(), t.value.clone().into()))
                        .collect();
                    say!(
                        "{}",
                        serde_json::json!({
                            "job": item.job, "id": item.record, "dataset": item.dataset,
                            "reason": item.reason, "rank": item.rank,
                            "texts": texts, "waiting": waiting, "classes": task.classes,
                        })
                    );
                } else {
                    say!(
                        "record {} of {} (job {}, {:?}, {} waiting for you)",
                        item.record,
                        item.dataset,
                        item.job,
                        item.reason,
                        waiting
                    );
                    say!("classes: {}", task.classes.join(", "));
                    for t in &record.record.texts {
                        say!("--- {} ---\n{}", t.name, t.value);
                    }
                    for n in &record.record.numerics {
                        say!("--- {} ---\n{:?}", n.name, n.value.as_slice());
                    }
                    say!(
                        "---\nlabel it with `cloister label set {} LABEL`",
                        item.record
                    );
                }
            }
        },
        LabelCommand::Set { id, label, job } => {
            let item = c.label_item(who, &id, &label, job.as_deref())?;
            say!("labeled {} as {label} (job {})", item.record, item.job);
        }
        LabelCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let n = c.import_labels(who, &file.display().to_string(), &text)?;
            say!("imported {n} labels");
        }
        LabelCommand::Answers { json } => {
            let answers = c.changeable_answers(who)?;
            if json {
                say!("{}", serde_json::to_string(&answers)?);
            } else if answers.is_empty() {
                say!("none of your answers can change now");
            } else {
                say!(
                    "{:<24} {:<16} {:>5} {:<10} {:<16} changeable to",
                    "record",
                    "job",
                    "round",
                    "reason",
                    "answer"
                );
                for a in &answers {
                    let (item, answer) = (&a.item, a.item.answer.as_ref());
                    say!(
                        "{:<24} {:<16} {:>5} {:<10} {:<16} {}",
                        item.record,
                        item.job,
                        item.round,
                        format!("{:?}", item.reason),
                        answer.map_or("-", |a| a.label.as_str()),
                        a.classes.join(", ")
                    );
                }
                say!("change one with `cloister label change RECORD LABEL`");
            }
        }
        LabelCommand::Change { id, label, job } => {
            let item = c.change_label_item(who, &id, &label, job.as_deref())?;
            say!(
                "changed the answer to {} to {label} (job {}, round {})",
                item.record,
                item.job,
                item.round
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
