//! `cloister template list`, `train`, `predict`, `model …`, `verify-bundle`.

use crate::output::{say, say_part, tell};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use cloister_host::models::ModelManifest;
use cloister_host::service::{ModelDetail, PluginStage, TrainProgress, TrainRequest};

use crate::session::EnvArgs;

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the training templates and their hyper-parameters.
    List {
        /// Print JSON: an array of objects (see docs/cli.md).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The dataset: NAME or NAME@VERSION.
    #[arg(long)]
    dataset: String,
    /// An approved preprocessor, by digest (or a unique prefix of at least
    /// 8 hex digits) or name (repeatable, applied in order).
    #[arg(long = "preprocess", value_name = "PLUGIN")]
    preprocess: Vec<String>,
    /// A configuration value of a preprocessor, KEY=VALUE, or N:KEY=VALUE
    /// for the Nth `--preprocess` when there are several (repeatable),
    /// e.g. `fields=review` for `text-normalize` on data whose text is in
    /// `review`.
    #[arg(long = "preprocess-config", value_name = "[N:]KEY=VALUE")]
    preprocess_config: Vec<String>,
    /// The approved featurizer, by digest (or a unique prefix of at least 8
    /// hex digits) or name, e.g. `tfidf`. A name must fit exactly one
    /// approved plugin; the model's lineage records the full digest.
    #[arg(long = "features", value_name = "PLUGIN")]
    features: String,
    /// A configuration value of the featurizer, KEY=VALUE (repeatable; see
    /// `cloister plugin show DIGEST` for its keys), e.g. `char_ngrams=2-5` for
    /// `tfidf`.
    #[arg(long = "features-config", value_name = "KEY=VALUE")]
    features_config: Vec<String>,
    /// Template: logreg or mlp.
    #[arg(long, default_value = "logreg")]
    template: String,
    /// Override a hyper-parameter, KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Seed of the train/validation/test split (default: the template seed).
    #[arg(long)]
    split_seed: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// List models.
    List {
        /// Print JSON: an array of objects (see docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Show a model: metrics, per-class scores, confusion matrix,
    /// calibration, training curve, lineage, release state.
    Show {
        /// Model id.
        id: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a model's disclosure report: whether its weights or figures
    /// could single out training records (docs/disclosure.md).
    CheckDisclosure {
        /// Model id.
        id: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also measure canary exposure: retrain the model's template with
        /// N planted canary records and report how far it singles them
        /// out (stored in the report).
        #[arg(long, value_name = "N")]
        canaries: Option<u32>,
    },
    /// Ask for a model to be released.
    RequestRelease {
        /// Model id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Approve a requested release (an approver other than the requester).
    ApproveRelease {
        /// Model id.
        id: String,
    },
    /// Reject a requested release.
    RejectRelease {
        /// Model id.
        id: String,
    },
    /// Write the signed bundle of an approved model.
    Export {
        /// Model id.
        id: String,
        /// The bundle file to create.
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_sets(sets: &[String]) -> Result<Vec<(String, String)>> {
    parse_pairs("--set", sets)
}

/// `--preprocess-config [N:]KEY=VALUE` values: the pairs of each
/// preprocessor by position (N is 1-based; without it, the only one).
fn preprocess_configs(
    pairs: &[String],
    preprocessors: usize,
) -> Result<Vec<Vec<(String, String)>>> {
    let mut out: Vec<Vec<(String, String)>> = vec![Vec::new(); preprocessors];
    for s in pairs {
        let (n, pair) = match s.split_once(':') {
            Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                (n.parse::<usize>().ok(), rest)
            }
            _ => (None, s.as_str()),
        };
        let n = match (n, preprocessors) {
            (Some(n), _) if (1..=preprocessors).contains(&n) => n,
            (Some(n), _) => anyhow::bail!(
                "--preprocess-config {s:?}: there is no preprocessor {n} (there {} {preprocessors})",
                if preprocessors == 1 { "is" } else { "are" }
            ),
            (None, 1) => 1,
            (None, 0) => anyhow::bail!("--preprocess-config {s:?}: no --preprocess to configure"),
            (None, _) => anyhow::bail!(
                "--preprocess-config {s:?}: there are {preprocessors} preprocessors; say which with N:KEY=VALUE"
            ),
        };
        out[n - 1].extend(parse_pairs("--preprocess-config", &[pair.to_string()])?);
    }
    while out.last().is_some_and(Vec::is_empty) {
        out.pop();
    }
    Ok(out)
}

fn parse_pairs(flag: &str, pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => anyhow::bail!("{flag} {s:?}: expected KEY=VALUE"),
        })
        .collect()
}

pub fn templates(json: bool) -> Result<ExitCode> {
    if json {
        let all: Vec<serde_json::Value> = cloister_host::train::templates()?
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "kind": t.kind, "description": t.description,
                    "hyper": t.hyper,
                })
            })
            .collect();
        crate::output::json(&serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for t in cloister_host::train::templates()? {
        say!("{:<8} {}", t.name, t.description);
        let h = &t.hyper;
        say_part!(
            "         epochs={} batch_size={} learning_rate={} l2={} class_weight={} patience={} seed={} min_support={} standardize={}",
            h.epochs,
            h.batch_size,
            h.learning_rate,
            h.l2,
            if h.class_weight { "balanced" } else { "none" },
            h.patience,
            h.seed,
            h.min_support,
            h.standardize.as_str()
        );
        if t.kind == cloister_host::train::Kind::Mlp {
            say_part!(" hidden={:?} dropout={}", h.hidden, h.dropout);
        }
        say!();
    }
    Ok(ExitCode::SUCCESS)
}

pub fn train(env: &EnvArgs, args: TrainArgs) -> Result<ExitCode> {
    let s = env.session()?;
    let req = TrainRequest {
        dataset: args.dataset,
        preprocess_config: preprocess_configs(&args.preprocess_config, args.preprocess.len())?,
        preprocess: args.preprocess,
        features: args.features,
        features_config: parse_pairs("--features-config", &args.features_config)?,
        template: args.template,
        sets: parse_sets(&args.sets)?,
        split_seed: args.split_seed,
    };
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut progress = |p: TrainProgress| match p {
        TrainProgress::Stage(s) => tell!("{s}"),
        TrainProgress::Epoch(e, max) => {
            let elapsed = started.elapsed().as_secs_f64();
            let eta = elapsed / f64::from(e.epoch) * f64::from(max.saturating_sub(e.epoch));
            let line = format!(
                "epoch {:>3}/{max}  train loss {:.4}  val loss {:.4}  val acc {:.4}  {:>8.0} samples/s  eta ≤{:.0}s",
                e.epoch, e.train_loss, e.val_loss, e.val_accuracy, e.samples_per_s, eta
            );
            if tty {
                let filled = (20 * e.epoch / max.max(1)) as usize;
                crate::output::redraw(format_args!(
                    "[{}{}] {line}",
                    "#".repeat(filled),
                    ".".repeat(20 - filled.min(20))
                ));
            } else {
                tell!("{line}");
            }
        }
    };
    let m = s.cloister.train_model(&s.user, &req, &mut progress)?;
    if tty {
        tell!();
    }
    say!(
        "trained {} ({}) in {:.1} s; kept epoch {}",
        m.id,
        m.template,
        m.train_seconds,
        m.best_epoch
    );
    say!(
        "test: accuracy {:.4}  macro F1 {:.4}  ECE {:.4}  ({} records)",
        m.evaluation.accuracy,
        m.evaluation.macro_f1,
        m.evaluation.ece,
        m.evaluation.records
    );
    say!("see `cloister model show {}`", m.id);
    Ok(ExitCode::SUCCESS)
}

pub fn predict(env: &EnvArgs, id: &str, input: &std::path::Path) -> Result<ExitCode> {
    let records = cloister_host::records::read_file(input, Default::default())?;
    let s = env.session()?;
    let cloister_host::service::Predictions {
        ids,
        classes,
        probs,
    } = s.cloister.predict(&s.user, id, &records)?;
    let k = classes.len().max(1);
    for (i, rid) in ids.iter().enumerate() {
        let p = &probs[i * k..(i + 1) * k];
        let (best, conf) = cloister_host::train::eval::top_class(p);
        let all: serde_json::Map<String, serde_json::Value> = classes
            .iter()
            .zip(p)
            .map(|(c, v)| (c.clone(), serde_json::json!(v)))
            .collect();
        say!(
            "{}",
            serde_json::json!({"id": rid, "label": classes[best], "confidence": conf, "probabilities": all})
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn release_state(m: &ModelManifest) -> String {
    m.release.describe()
}

fn show(d: &ModelDetail) {
    let m = &d.manifest;
    let e = &m.evaluation;
    say!("model {} (template {})", m.id, m.template);
    say!(
        "trained by {} at {}",
        m.created_by,
        cloister_host::time::rfc3339(m.created_ms)
    );
    say!(
        "lineage: dataset {} (sha256 {}), split seed {}",
        m.lineage.dataset,
        &m.lineage.dataset_digest[..16],
        m.lineage.split_seed
    );
    // Each plugin with its review state now: one whose approval was
    // withdrawn after training blocks the release.
    for p in &d.plugins {
        let stage = match p.stage {
            PluginStage::Preprocess => "preprocess",
            PluginStage::Features => "features  ",
        };
        say!(
            "         {stage} {} ({} {}, {})",
            p.digest,
            p.name,
            p.version,
            p.review_state()
        );
    }
    if let Some(state) = &m.lineage.features_state {
        say!("         fitted     {state} (vocabulary)");
    }
    say!(
        "weights: sha256 {}, input dimension {}",
        m.weights_sha256,
        m.dim
    );
    say!(
        "splits: train {} / validation {} / test {}",
        m.split_sizes[0],
        m.split_sizes[1],
        m.split_sizes[2]
    );
    say!("release: {}", release_state(m));
    if let Some(p) = d.unapproved()
        && m.release.decision.is_none()
    {
        say!(
            "         cannot be approved while plugin {} is not approved",
            p.name
        );
    }
    show_disclosure(m);
    say!();
    say!(
        "test accuracy {:.4}   macro F1 {:.4}   micro F1 {:.4}   ECE {:.4}",
        e.accuracy,
        e.macro_f1,
        e.micro_f1,
        e.ece
    );
    say!(
        "{:<20} {:>9} {:>9} {:>9} {:>8}",
        "class",
        "precision",
        "recall",
        "F1",
        "support"
    );
    for c in &e.per_class {
        say!(
            "{:<20} {:>9.4} {:>9.4} {:>9.4} {:>8}",
            c.class,
            c.precision,
            c.recall,
            c.f1,
            c.support
        );
    }
    say!("\nconfusion (rows: truth, columns: predicted)");
    say_part!("{:<20}", "");
    for c in &m.classes {
        say_part!(" {:>8}", truncate(c, 8));
    }
    say!();
    for (c, row) in m.classes.iter().zip(&e.confusion) {
        say_part!("{:<20}", truncate(c, 20));
        for n in row {
            say_part!(" {n:>8}");
        }
        say!();
    }
    say!("\nreliability (confidence bin: count, mean confidence, accuracy)");
    for b in e.reliability.iter().filter(|b| b.count > 0) {
        say!(
            "  [{:.1}, {:.1})  {:>6}  {:.3}  {:.3}",
            b.lower,
            b.upper,
            b.count,
            b.confidence,
            b.accuracy
        );
    }
    say!("\ntraining curve (epoch: train loss, val loss, val accuracy)");
    for c in &m.curve {
        say!(
            "  {:>3}{} {:.4} {:.4} {:.4}",
            c.epoch,
            if c.epoch == m.best_epoch { "*" } else { " " },
            c.train_loss,
            c.val_loss,
            c.val_accuracy
        );
    }
    say!(
        "\nbadcases: {} misclassified test records (ids only; texts are shown in the console to roles the policy allows)",
        e.badcases.len()
    );
    for b in e.badcases.iter().take(10) {
        say!(
            "  {:<24} truth {:<12} predicted {:<12} confidence {:.3}",
            b.id,
            truncate(&b.truth, 12),
            truncate(&b.predicted, 12),
            b.confidence
        );
    }
    if !e.false_positives.is_empty() {
        say!("\nfalse positives per class (most confident first; --json has them all):");
        for (class, ids) in &e.false_positives {
            let shown: Vec<&str> = ids.iter().take(5).map(String::as_str).collect();
            say!(
                "  {:<12} {:>4}  {}{}",
                truncate(class, 12),
                ids.len(),
                shown.join(" "),
                if ids.len() > 5 { " …" } else { "" }
            );
        }
    }
}

fn show_disclosure(m: &ModelManifest) {
    let Some(r) = &m.disclosure else {
        say!(
            "disclosure: no report (trained before disclosure checks existed): it cannot be released; retrain it"
        );
        return;
    };
    let t = &r.thresholds;
    say!(
        "disclosure: {} (k = {}, checked in {:.2} s)",
        r.verdict.as_str(),
        t.k,
        r.seconds
    );
    for f in &r.findings {
        say!("  - {f}");
    }
    let fs = &r.features;
    say!(
        "  feature support: {} input rows used, {} supported by fewer than {} records (zeroed in the released copy)",
        fs.supported,
        fs.disclosive,
        t.k
    );
    say!(
        "  test accuracy {:.4} as trained, {:.4} as released; {} non-zero input weights, residual degrees of freedom {}",
        fs.test_accuracy,
        fs.test_accuracy_pruned,
        fs.nonzero_parameters,
        fs.residual_degrees_of_freedom
    );
    let mi = &r.membership;
    if mi.repetitions == 0 {
        say!("  membership inference: not run (fewer than 10 records per side)");
    } else {
        say!(
            "  membership inference (loss threshold, {} x {} records per side): mean AUC {:.3} (flag above {:.2}), {:.0}% significant at 0.05 (flag above {:.0}%){}, TPR at FPR <= 1e-3: {:.4} (fails above {:.2} and 3x chance {:.4})",
            mi.repetitions,
            mi.sample,
            mi.mean_auc,
            t.max_auc,
            100.0 * mi.significant_share,
            100.0 * t.max_significant_share,
            if r.membership_flagged {
                ": FLAGGED"
            } else {
                ""
            },
            mi.tpr_at_low_fpr,
            t.max_tpr_at_low_fpr,
            mi.chance_tpr_at_low_fpr
        );
    }
    if !r.small_classes.is_empty() {
        say!(
            "  classes with fewer than {} training records: {}",
            t.k,
            r.small_classes.join(", ")
        );
    }
    if let Some(v) = &r.vocabulary {
        say!(
            "  fitted vocabulary: {} terms counted over {} training records, the rarest in {} \
             (at least {})",
            v.terms,
            v.documents,
            v.min_records,
            t.k
        );
    }
    if let Some(c) = &r.canaries {
        say!(
            "  canary exposure ({} planted records of {} random features, against {} references; \
             about 1.4 means not memorised, {:.2} fully): mean {:.2}, max {:.2} as trained; \
             mean {:.2}, max {:.2} as released ({:.1} s)",
            c.planted,
            c.features_each,
            c.references,
            c.max_possible,
            c.mean_exposure,
            c.max_exposure,
            c.mean_exposure_released,
            c.max_exposure_released,
            c.seconds
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

pub fn model(env: &EnvArgs, cmd: ModelCommand) -> Result<ExitCode> {
    let s = if matches!(cmd, ModelCommand::List { .. } | ModelCommand::Show { .. }) {
        env.reading_session()?
    } else {
        env.session()?
    };
    match cmd {
        ModelCommand::List { json } => {
            let all = s.cloister.list_models(&s.user)?;
            if json {
                let rows: Vec<serde_json::Value> = all
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "id": m.id, "template": m.template, "dataset": m.lineage.dataset,
                            "accuracy": m.evaluation.accuracy, "macro_f1": m.evaluation.macro_f1,
                            "release": release_state(m), "created_by": m.created_by,
                            "created_ms": m.created_ms,
                        })
                    })
                    .collect();
                crate::output::json(&serde_json::to_string_pretty(&rows)?);
                return Ok(ExitCode::SUCCESS);
            }
            if all.is_empty() {
                say!("no models (train one with `cloister train`)");
            }
            for m in &all {
                say!(
                    "{}  {:<7} {:<20} acc {:.4}  macro F1 {:.4}  {}",
                    m.id,
                    m.template,
                    m.lineage.dataset,
                    m.evaluation.accuracy,
                    m.evaluation.macro_f1,
                    release_state(m)
                );
            }
        }
        ModelCommand::Show { id, json } => {
            let d = s.cloister.model_detail(&s.user, &id)?;
            if json {
                crate::output::json(&serde_json::to_string_pretty(&d)?);
            } else {
                show(&d);
            }
        }
        ModelCommand::CheckDisclosure { id, json, canaries } => {
            let m = match canaries {
                Some(n) => s.cloister.measure_canaries(&s.user, &id, n)?,
                None => s.cloister.show_model(&s.user, &id)?,
            };
            if json {
                crate::output::json(&serde_json::to_string_pretty(&m.disclosure)?);
            } else {
                show_disclosure(&m);
            }
        }
        ModelCommand::RequestRelease { id, reason } => {
            let m = s.cloister.request_release(&s.user, &id, &reason)?;
            say!(
                "release of {} requested; an approver other than you decides",
                m.id
            );
        }
        ModelCommand::ApproveRelease { id } => {
            s.cloister.decide_release(&s.user, &id, true)?;
            say!("release of {id} approved");
        }
        ModelCommand::RejectRelease { id } => {
            s.cloister.decide_release(&s.user, &id, false)?;
            say!("release of {id} rejected");
        }
        ModelCommand::Export { id, out } => {
            let bytes = s.cloister.export_model(&s.user, &id)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            std::io::Write::write_all(&mut f, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            say!(
                "wrote {} ({} bytes), signed by key {}",
                out.display(),
                bytes.len(),
                hex::encode(s.cloister.public_key())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify_bundle(file: &std::path::Path, key: Option<&str>) -> Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let expected = key
        .map(|k| {
            hex::decode(k)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .context("--key: expected 64 hex digits")
        })
        .transpose()?;
    match cloister_host::models::verify_bundle(&bytes, expected.as_ref()) {
        Ok(b) => {
            say!(
                "bundle OK: model {} ({}), weights sha256 {}",
                b.manifest.id,
                b.manifest.template,
                b.manifest.weights_sha256
            );
            say!(
                "signed by key {}{}",
                hex::encode(b.key),
                if expected.is_some() {
                    " (as expected)"
                } else {
                    " (compare it with the environment's key)"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            say!("bundle INVALID: {e}");
            Ok(ExitCode::from(crate::session::EXIT_TAMPERED))
        }
    }
}
