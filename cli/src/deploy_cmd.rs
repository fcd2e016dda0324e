//! `cloister deploy …`: serve released models inside the environment.

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
        println!(
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
            println!(
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
            let s = env.session()?;
            let all = s.cloister.list_deployments(&s.user)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no deployments");
            } else {
                for d in all {
                    println!(
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
                println!("{}", serde_json::to_string_pretty(&st)?);
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
                    },
                },
            )
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
            println!("deleted deployment {name}");
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Predict { name, input, key } => {
            let records = cloister_host::records::read_file(&input, Default::default())?;
            let s = env.session()?;
            let p = s
                .cloister
                .predict_deployed(&s.user, &name, key.as_deref(), &records)?;
            for a in &p.predictions {
                println!(
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

fn print_status(st: &DeploymentStatus, minutes: u64) {
    let d = &st.deployment;
    println!(
        "deployment {}{} — clients: {}",
        d.name,
        if d.paused { " [paused]" } else { "" },
        if d.clients.is_empty() {
            "none".to_string()
        } else {
            d.clients.join(", ")
        }
    );
    println!("last {minutes} min:");
    println!(
        "  {:<10} {:<16} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "role",
        "model",
        "share",
        "requests",
        "errors",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "confidence",
        "agreement"
    );
    let opt = |v: Option<f64>, p: usize| v.map_or_else(|| "–".to_string(), |x| format!("{x:.p$}"));
    for v in &st.variants {
        println!(
            "  {:<10} {:<16} {:>7.2}% {:>9} {:>7.2}% {:>8} {:>8} {:>8} {:>10} {:>9}",
            v.role,
            v.model,
            f64::from(v.weight) / 100.0,
            v.requests,
            v.error_rate * 100.0,
            opt(v.p50_ms, 1),
            opt(v.p95_ms, 1),
            opt(v.p99_ms, 1),
            opt(v.mean_confidence, 3),
            opt(v.agreement.map(|a| a * 100.0), 1),
        );
        if !v.classes.is_empty() {
            let classes: Vec<String> = v.classes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            println!("  {:<10} classes: {}", "", classes.join(", "));
        }
    }
    if let Some(r) = &d.ramp {
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|w| format!("{:.2}%", f64::from(*w) / 100.0))
            .collect();
        println!(
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
    if let Some(last) = d.history.last() {
        println!(
            "last change: {} by {} (champion {})",
            last.what, last.by, last.champion
        );
    }
}
