//! `cloister demo`: active learning on the bundled SpamAssassin data in a
//! throwaway environment. A scientist imports the corpus, a reviewer
//! approves the bundled plugins, and the pipeline in
//! `pipelines/spam-active-learning.toml` runs with the gold oracle: the
//! corpus's labels stay hidden from training until the loop asks a "human"
//! for one. Then the savings, a denied export, and a verified audit log.

use crate::output::say;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use cloister_host::audit::{AuditFilter, Decision, Verdict};
use cloister_host::datasets::DatasetVersion;
use cloister_host::jobs::Oracle;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use cloister_host::users::User;

use crate::job_cmd;

/// The SpamAssassin corpus as derived by data/spamassassin/prepare.py.
const SPAMASSASSIN: &[u8] = include_bytes!("../../data/spamassassin/spamassassin.jsonl.gz");
/// The demo's pipeline.
const PIPELINE: &str = include_str!("../../pipelines/spam-active-learning.toml");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the environment in DIR (a new directory) instead of deleting it.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    #[command(flatten)]
    store: crate::session::StoreArg,
}

fn import_bundled(
    c: &Cloister,
    who: &User,
    tmp: &Path,
    name: &str,
    gz: &[u8],
) -> Result<DatasetVersion> {
    let file = tmp.join(format!("{name}.jsonl.gz"));
    std::fs::write(&file, gz).with_context(|| format!("cannot write {}", file.display()))?;
    let v = c.import_dataset(who, name, &file, &ImportOptions::default())?;
    std::fs::remove_file(&file).ok();
    Ok(v)
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let scratch = tempfile::tempdir()?;
    let env_path = match &args.keep {
        Some(dir) => dir.clone(),
        None => scratch.path().join("env"),
    };
    say!(
        "Cloister demo: active learning in a closed environment, on the bundled SpamAssassin corpus.\n"
    );
    let (c, root) = Cloister::init_with(&env_path, "admin", &args.store.store)?;
    let admin = c.authenticate(&root)?;
    let add = |name: &str, role: Role| -> Result<User> { Ok(c.add_user(&admin, name, &[role])?.0) };
    let ana = add("ana", Role::Scientist)?;
    let rui = add("rui", Role::Reviewer)?;
    let ada = add("ada", Role::Auditor)?;
    say!(
        "Environment {} (store: {}) with users admin, ana (scientist), rui (reviewer), ada (auditor).",
        c.environment_id(),
        c.store_location()
    );

    let spam = import_bundled(&c, &ana, scratch.path(), "spamassassin", SPAMASSASSIN)?;
    let labels: Vec<String> = spam
        .stats
        .labels
        .iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect();
    say!(
        "\nana imported {} ({} records, sha256:{}, labels: {}).",
        spam.reference(),
        spam.stats.records,
        &spam.digest[..12],
        labels.join(", ")
    );
    say!(
        "The labels of the training split stay hidden from training: the gold oracle reveals one only when the loop asks a human."
    );

    say!("\nana added the bundled plugins; rui reviewed and approved each digest:");
    for (_, bytes) in cloister_bundled_plugins::ALL {
        let e = c.add_plugin(&ana, bytes)?;
        c.approve_plugin(&rui, &e.digest)?;
        say!(
            "  {:<17} {:<6} {:<12} sha256:{}",
            e.name,
            e.version,
            e.kind.as_str(),
            &e.digest[..12]
        );
    }

    say!(
        "\nana runs pipelines/spam-active-learning.toml: logreg + mlp, dual-agree proposes automatic labels where both agree with p >= 0.9,"
    );
    say!(
        "and the host accepts them only above thresholds certified >= 95% precise per class on validation labels (95% confidence);"
    );
    say!(
        "50 records per round to humans (answered by the gold oracle), at most 480 manual labels.\n"
    );
    let job = c.start_job(
        &ana,
        "spam-active-learning.toml",
        PIPELINE,
        Some(Oracle::Gold),
    )?;
    let job = job_cmd::drive(&c, &ana, &job.id)?;
    let stats = c.job_stats(&ana, &job.id)?;
    if let Some(r) = &job.result {
        say!(
            "\nResult: test accuracy {:.4} with {} manual labels ({:.1}% of the {}-record pool) and {} automatic labels at {:.2}% precision.",
            r.test_accuracy,
            stats.manual_used,
            100.0 * stats.manual_share.unwrap_or(0.0),
            stats.pool_size,
            stats.auto_accepted,
            100.0 * stats.auto_precision.unwrap_or(0.0)
        );
        if let (Some(est), Some(lo), Some(hi)) = (
            stats.auto_estimate,
            stats.auto_estimate_low,
            stats.auto_estimate_high,
        ) {
            say!(
                "Without gold labels the precision would read as {:.2}% (95% interval {:.2}-{:.2}%), estimated on validation labels.",
                100.0 * est,
                100.0 * lo,
                100.0 * hi
            );
        }
        say!(
            "Labeling the whole pool by hand would have taken {} labels: {} saved.",
            stats.pool_size,
            stats.pool_size.saturating_sub(stats.manual_used)
        );
    }

    // The environment is closed: nobody exports rows.
    say!("\nana tries to export the emails:");
    match c.export_dataset(&ana, "spamassassin") {
        Err(e @ ServiceError::Denied { .. }) => {
            say!("  {e} (forbidden by no-dataset-export, audited)")
        }
        other => anyhow::bail!("export was not denied: {other:?}"),
    }

    let entries = c.audit_log(&ada, &AuditFilter::default())?;
    let denied = entries
        .iter()
        .filter(|e| e.record.decision == Decision::Deny)
        .count();
    let verdict = c.audit_verify(&ada, None)?;
    say!("\nada (auditor) reads and verifies the audit log:");
    match verdict {
        Verdict::Intact { size, root, .. } => say!(
            "  {size} entries ({denied} denied), Merkle root {}…, chain and signed head verify",
            &hex::encode(root)[..16]
        ),
        Verdict::Tampered { first_bad, reason } => {
            anyhow::bail!("the audit log does not verify at entry {first_bad}: {reason}")
        }
    }

    drop(c);
    match &args.keep {
        Some(dir) => say!(
            "\nDone in {:.1} s. The environment is kept in {} (admin token: {root}).",
            started.elapsed().as_secs_f64(),
            dir.display()
        ),
        None => say!(
            "\nDone in {:.1} s. The throwaway environment was deleted (keep it with --keep DIR).",
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
