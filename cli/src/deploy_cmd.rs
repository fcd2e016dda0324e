//! `cloister deploy …`: serve released models inside the environment.

use crate::output::say;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;

use cloister_host::deployments::Shadow;
use cloister_host::service::{DeploymentChange, DeploymentStatus};

use crate::session::EnvArgs;

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Create a deployment serving a released model (its champion) to the
    /// named client accounts.
    Create {
        /// The deployment's name (the endpoint is
        /// /api/deployments/NAME/predict).
        name: String,
        /// The champion: a model whose release was approved.
        #[arg(long)]
        model: String,
        /// A client account it serves (repeatable).
        #[arg(long = "client", value_name = "USER")]
        clients: Vec<String>,
    },
    /// List the deployments.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A deployment's variants, weights and metrics.
    Status {
        /// The deployment.
        name: String,
        /// Metrics over the last this many minutes.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a candidate's share of the traffic (adding it when new).
    SetWeight {
        /// The deployment.
        name: String,
        /// The candidate model (released).
        model: String,
        /// Its share: a percentage such as `5` or `0.5`, or `0`.
        percent: f64,
    },
    /// Remove a candidate.
    Remove {
        /// The deployment.
        name: String,
        /// The candidate model.
        model: String,
    },
    /// Copy a sampled share of requests to a shadow model (its answers are
    /// compared with the champion's, never returned); `--off` removes it.
    Shadow {
        /// The deployment.
        name: String,
        /// The shadow model (released).
        model: Option<String>,
        /// Share of requests copied, in percent.
        #[arg(long, default_value_t = 100.0)]
        percent: f64,
        /// Remove the shadow.
        #[arg(long, conflicts_with = "model")]
        off: bool,
    },
    /// Make a candidate the champion.
    Promote {
        /// The deployment.
        name: String,
        /// The candidate.
        model: String,
    },
    /// Return to the previous champion; every candidate's traffic goes to
    /// zero.
    Rollback {
        /// The deployment.
        name: String,
    },
    /// Ramp a candidate up step by step: each step is held for its bake
    /// time and at least `--min-requests` candidate requests, judged by the
    /// guards on the candidate's figures over the step; a breach rolls it
    /// back to 0% (recording the values), the last step promotes it. The
    /// host advances the ramp as requests arrive.
    Ramp {
        /// The deployment.
        name: String,
        /// The candidate (released).
        model: String,
        /// Its share at each step, in percent, increasing.
        #[arg(long, value_delimiter = ',', default_value = "1,5,25,50,100")]
        steps: Vec<f64>,
        /// How long each step is held, in minutes.
        #[arg(long, default_value_t = 10.0)]
        bake_minutes: f64,
        /// Candidate requests each step needs before it can end.
        #[arg(long, default_value_t = 100)]
        min_requests: u64,
        /// Roll back above this error rate (a share, e.g. 0.01).
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// Roll back above this p99 latency, in ms.
        #[arg(long)]
        max_p99_ms: Option<f64>,
        /// Roll back below this agreement with the champion (a share).
        #[arg(long)]
        min_agreement: Option<f64>,
        /// Roll back when the candidate's online accuracy (labels from
        /// feedback) falls more than this below the champion's on the same
        /// records (a share, e.g. 0.02).
        #[arg(long)]
        max_accuracy_drop: Option<f64>,
        /// Labeled candidate records a step needs before the accuracy guard
        /// is judged.
        #[arg(long, default_value_t = 30)]
        min_labels: u64,
    },
    /// The regression gate: test a candidate against the champion on the
    /// freshest labeled data (the capture dataset's newest versions, or
    /// `--dataset`); the signed report is stored, and the policies hold a
    /// candidate at 5% or less of the traffic until it passes.
    Test {
        /// The deployment.
        name: String,
        /// The candidate model (released).
        #[arg(long)]
        candidate: String,
        /// A labeled dataset to test on instead (`NAME` or `NAME@VERSION`).
        #[arg(long)]
        dataset: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Capture a sampled share of the requests into a dataset inside the
    /// environment (new versions of `--batch` records each); `--off`
    /// stops, `--write` writes the waiting records as a version now.
    Capture {
        /// The deployment.
        name: String,
        /// The dataset (new, or one this deployment captured into before).
        #[arg(long, required_unless_present_any = ["off", "write"])]
        dataset: Option<String>,
        /// Share of requests captured, in percent.
        #[arg(long, default_value_t = 10.0)]
        percent: f64,
        /// Records per version.
        #[arg(long, default_value_t = 1000)]
        batch: u32,
        /// Stop capturing (waiting records stay until `--write`).
        #[arg(long, conflicts_with_all = ["dataset", "write"])]
        off: bool,
        /// Write the waiting records as the next version now.
        #[arg(long, conflicts_with = "dataset")]
        write: bool,
    },
    /// How many recent answers the deployment keeps for feedback (0 turns
    /// feedback off).
    KeepAnswers {
        /// The deployment.
        name: String,
        /// Answers kept.
        count: u64,
    },
    /// Send true labels as the deployment's client: JSONL lines
    /// `{"id": …, "label": …}` for records predicted before.
    Feedback {
        /// The deployment.
        name: String,
        /// The labels (JSONL).
        #[arg(long)]
        input: PathBuf,
    },
    /// Stop a running ramp where it is (the candidate keeps its share).
    StopRamp {
        /// The deployment.
        name: String,
    },
    /// Stop routing changes (it keeps serving); `resume` allows them again.
    Pause {
        /// The deployment.
        name: String,
    },
    /// Allow routing changes again.
    Resume {
        /// The deployment.
        name: String,
    },
    /// Replace the client accounts a deployment serves.
    Clients {
        /// The deployment.
        name: String,
        /// A client account (repeatable; none: nobody may call it).
        #[arg(long = "client", value_name = "USER")]
        clients: Vec<String>,
    },
    /// Delete a deployment and its metrics.
    Delete {
        /// The deployment.
        name: String,
    },
    /// Call a deployment as its client: records (JSONL) in, one JSON line
    /// per prediction out.
    Predict {
        /// The deployment.
        name: String,
        /// Records (JSONL).
        #[arg(long)]
        input: PathBuf,
        /// The routing key (default: the caller's account).
        #[arg(long)]
        key: Option<String>,
    },
}

/// A percentage as basis points, checked.
fn basis_points(percent: f64) -> Result<u32> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        bail!("a share is a percentage from 0 to 100, not {percent}");
    }
    let bp = (percent * 100.0).round();
    if (bp - percent * 100.0).abs() > 1e-6 {
        bail!("a share has at most two decimals (basis points), not {percent}");
    }
    Ok(bp as u32)
}

pub fn run(env: &EnvArgs, cmd: DeployCommand) -> Result<ExitCode> {
    let change = |name: &str, change: DeploymentChange| -> Result<ExitCode> {
        let s = env.session()?;
        let d = s.cloister.change_deployment(&s.user, name, change)?;
        say!(
            "{}: champion {} ({:.2}%){}{}{}",
            d.name,
            d.champion,
            f64::from(d.champion_weight()) / 100.0,
            d.candidates
                .iter()
                .map(|c| format!(", {} {:.2}%", c.model, f64::from(c.weight) / 100.0))
                .collect::<String>(),
            d.shadow
                .as_ref()
                .map(|s| format!(", shadow {} {:.2}%", s.model, f64::from(s.sample) / 100.0))
                .unwrap_or_default(),
            if d.paused { " [paused]" } else { "" }
        );
        Ok(ExitCode::SUCCESS)
    };
    match cmd {
        DeployCommand::Create {
            name,
            model,
            clients,
        } => {
            let s = env.session()?;
            let d = s
                .cloister
                .create_deployment(&s.user, &name, &model, &clients)?;
            say!(
                "created deployment {} serving {} to {}",
                d.name,
                d.champion,
                if d.clients.is_empty() {
                    "no client yet".to_string()
                } else {
                    d.clients.join(", ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::List { json } => {
            let s = env.reading_session()?;
            let all = s.cloister.list_deployments(&s.user)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                say!("no deployments");
            } else {
                for d in all {
                    say!(
                        "{:<20} champion {:<16} candidates {:<3} shadow {:<3} clients {}{}",
                        d.name,
                        d.champion,
                        d.candidates.len(),
                        if d.shadow.is_some() { "yes" } else { "no" },
                        d.clients.len(),
                        if d.paused { "  [paused]" } else { "" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Status {
            name,
            minutes,
            json,
        } => {
            let s = env.session()?;
            let since =
                cloister_host::time::now_ms().saturating_sub(minutes.saturating_mul(60_000));
            let st = s.cloister.deployment_status(&s.user, &name, since)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&st)?);
            } else {
                print_status(&st, minutes);
            }
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::SetWeight {
            name,
            model,
            percent,
        } => change(
            &name,
            DeploymentChange::SetWeight {
                model,
                weight: basis_points(percent)?,
            },
        ),
        DeployCommand::Remove { name, model } => {
            change(&name, DeploymentChange::RemoveCandidate(model))
        }
        DeployCommand::Shadow {
            name,
            model,
            percent,
            off,
        } => {
            let shadow = match (model, off) {
                (_, true) => None,
                (Some(model), false) => Some(Shadow {
                    model,
                    sample: basis_points(percent)?,
                }),
                (None, false) => bail!("name the shadow model, or pass --off"),
            };
            change(&name, DeploymentChange::Shadow(shadow))
        }
        DeployCommand::Promote { name, model } => change(&name, DeploymentChange::Promote(model)),
        DeployCommand::Rollback { name } => change(&name, DeploymentChange::Rollback),
        DeployCommand::Ramp {
            name,
            model,
            steps,
            bake_minutes,
            min_requests,
            max_error_rate,
            max_p99_ms,
            min_agreement,
            max_accuracy_drop,
            min_labels,
        } => {
            if !bake_minutes.is_finite() || bake_minutes < 0.0 {
                bail!("--bake-minutes is a number of minutes >= 0, not {bake_minutes}");
            }
            let steps = steps
                .into_iter()
                .map(basis_points)
                .collect::<Result<Vec<_>>>()?;
            change(
                &name,
                DeploymentChange::Ramp {
                    model,
                    steps,
                    bake_ms: (bake_minutes * 60_000.0).round() as u64,
                    guards: cloister_host::deployments::Guards {
                        max_error_rate,
                        max_p99_ms,
                        min_agreement,
                        min_requests,
                        max_accuracy_drop,
                        min_labels,
                    },
                },
            )
        }
        DeployCommand::Test {
            name,
            candidate,
            dataset,
            json,
        } => {
            let s = env.session()?;
            let r = s
                .cloister
                .test_candidate(&s.user, &name, &candidate, dataset.as_deref())?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&r)?);
            } else {
                print_report(&r);
            }
            Ok(if r.verdict == "pass" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::session::EXIT_FAILED_CHECK)
            })
        }
        DeployCommand::Capture {
            name,
            dataset,
            percent,
            batch,
            off,
            write,
        } => {
            if write {
                let s = env.session()?;
                let w = s.cloister.write_capture(&s.user, &name)?;
                match &w.version {
                    Some(v) => say!(
                        "wrote {v}: {} records, {} labeled by feedback",
                        w.records,
                        w.labeled
                    ),
                    None => say!("no captured record was waiting"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let spec = match (off, dataset) {
                (true, _) => None,
                (false, Some(dataset)) => Some(cloister_host::service::CaptureSpec {
                    dataset,
                    sample: basis_points(percent)?,
                    batch,
                }),
                (false, None) => bail!("name the dataset with --dataset, or pass --off or --write"),
            };
            change(&name, DeploymentChange::Capture(spec))
        }
        DeployCommand::KeepAnswers { name, count } => {
            change(&name, DeploymentChange::KeepAnswers(count))
        }
        DeployCommand::Feedback { name, input } => {
            let items = read_feedback(&input)?;
            let s = env.session()?;
            let o = s.cloister.send_feedback(&s.user, &name, &items)?;
            say!(
                "scored {} labels ({} stored with captured records); {} ids unknown, {} repeated",
                o.scored,
                o.labeled_captures,
                o.unknown,
                o.repeated
            );
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::StopRamp { name } => change(&name, DeploymentChange::StopRamp),
        DeployCommand::Pause { name } => change(&name, DeploymentChange::Pause),
        DeployCommand::Resume { name } => change(&name, DeploymentChange::Resume),
        DeployCommand::Clients { name, clients } => {
            change(&name, DeploymentChange::Clients(clients))
        }
        DeployCommand::Delete { name } => {
            let s = env.session()?;
            s.cloister.delete_deployment(&s.user, &name)?;
            say!("deleted deployment {name}");
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Predict { name, input, key } => {
            let records = cloister_host::records::read_file(&input, Default::default())?;
            let s = env.session()?;
            let p = s
                .cloister
                .predict_deployed(&s.user, &name, key.as_deref(), &records)?;
            for a in &p.predictions {
                say!(
                    "{}",
                    serde_json::json!({
                        "id": a.id,
                        "label": a.label,
                        "confidence": a.confidence,
                        "probabilities": a.probabilities,
                        "model": p.model,
                        "variant": p.variant,
                    })
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads feedback lines `{"id", "label"}`, naming the line at fault.
fn read_feedback(path: &std::path::Path) -> Result<Vec<cloister_host::service::Feedback>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        let field = |f: &str| -> Result<String> {
            match v.get(f) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) if f == "id" => Ok(n.to_string()),
                _ => bail!(
                    "{}:{}: field `{f}`: a string is required",
                    path.display(),
                    i + 1
                ),
            }
        };
        out.push(cloister_host::service::Feedback {
            id: field("id")?,
            label: field("label")?,
        });
    }
    Ok(out)
}

fn print_report(r: &cloister_host::regression::RegressionReport) {
    say!(
        "regression test of {} against {} on {} ({} labeled, {} unlabeled records): {}",
        r.candidate.model,
        r.champion.model,
        r.datasets.join(", "),
        r.labeled,
        r.unlabeled,
        r.verdict.to_uppercase()
    );
    say!(
        "  {:<10} {:>9} {:>9} {:>7} {:>7}",
        "",
        "accuracy",
        "macro-F1",
        "ECE",
        "Brier"
    );
    for (who, f) in [("candidate", &r.candidate), ("champion", &r.champion)] {
        say!(
            "  {:<10} {:>9.4} {:>9.4} {:>7.4} {:>7.4}",
            who,
            f.accuracy,
            f.macro_f1,
            f.ece,
            f.brier
        );
    }
    say!(
        "  accuracy difference {:+.4} (95% bootstrap interval {:+.4} to {:+.4}); McNemar p = {:.4} ({} only the champion got right, {} only the candidate)",
        r.accuracy_delta,
        r.accuracy_delta_ci.0,
        r.accuracy_delta_ci.1,
        r.mcnemar.p_value,
        r.mcnemar.champion_only,
        r.mcnemar.candidate_only
    );
    for (class, n) in &r.support {
        say!(
            "  recall {:<16} {:>7.4} vs {:>7.4} ({n} records)",
            class,
            r.candidate.recall.get(class).copied().unwrap_or(0.0),
            r.champion.recall.get(class).copied().unwrap_or(0.0)
        );
    }
    if let Some(p) = r.psi {
        say!("  prediction drift (PSI) {p:.4}");
    }
    for reason in &r.reasons {
        say!("  fail: {reason}");
    }
}

fn print_status(st: &DeploymentStatus, minutes: u64) {
    let d = &st.deployment;
    say!(
        "deployment {}{} — clients: {}",
        d.name,
        if d.paused { " [paused]" } else { "" },
        if d.clients.is_empty() {
            "none".to_string()
        } else {
            d.clients.join(", ")
        }
    );
    say!("last {minutes} min:");
    // One row per variant: role, model, then the host's columns; every
    // column but the last (classes) padded to its widest cell.
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["role".to_string(), "model".to_string()];
    for v in &st.variants {
        let cols = v.columns();
        if rows.is_empty() {
            head.extend(cols.iter().map(|(h, _)| h.to_string()));
        }
        let mut row = vec![v.role.clone(), v.model.clone()];
        row.extend(cols.into_iter().map(|(_, c)| c));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            std::iter::once(&head)
                .chain(&rows)
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&head).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == row.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        say!("  {}", cells.join("  "));
    }
    if let Some(r) = &d.ramp {
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|w| format!("{:.2}%", f64::from(*w) / 100.0))
            .collect();
        say!(
            "ramp of {} [{}]: step {} of {} ({}), {} requests this step{}",
            r.model,
            r.state,
            (r.step + 1).min(r.steps.len()),
            r.steps.len(),
            steps.join(" → "),
            r.counters.requests,
            r.reason
                .as_ref()
                .map(|w| format!("; rolled back: {w}"))
                .unwrap_or_default()
        );
    }
    for r in &st.reports {
        say!(
            "regression report of {}: {} (accuracy {:+.4} on {} labeled records of {})",
            r.report.candidate.model,
            r.standing,
            r.report.accuracy_delta,
            r.report.labeled,
            r.report.datasets.join(", ")
        );
    }
    if let Some(c) = &d.capture {
        say!(
            "capture: {:.2}% of requests into {} (versions of {} records; {} waiting)",
            f64::from(c.sample) / 100.0,
            c.dataset,
            c.batch,
            st.captured_waiting
        );
    }
    if let Some(last) = d.history.last() {
        say!(
            "last change: {} by {} (champion {})",
            last.what,
            last.by,
            last.champion
        );
    }
}
