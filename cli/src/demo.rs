//! `cloister demo`: a throwaway environment with the bundled data, the
//! bundled plugins approved by a reviewer, the sandboxed plugin chain over
//! the stored records, a denied export, and a verified audit log.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use cloister_host::audit::{AuditFilter, Decision, Verdict};
use cloister_host::datasets::{self, DatasetVersion};
use cloister_host::policy::Role;
use cloister_host::runtime::{Limits, LoadedPlugin};
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use cloister_host::types::DataRecord;
use cloister_host::users::User;

/// The SpamAssassin corpus as derived by data/spamassassin/prepare.py.
const SPAMASSASSIN: &[u8] = include_bytes!("../../data/spamassassin/spamassassin.jsonl.gz");
/// The UCI digits as derived by data/digits/prepare.py.
const DIGITS: &[u8] = include_bytes!("../../data/digits/digits.jsonl.gz");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Parallel plugin instances (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Records per plugin call.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Keep the environment in DIR (a new directory) instead of deleting it.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

struct Demo {
    c: Cloister,
    ana: User,
    workers: usize,
    batch_size: usize,
}

impl Demo {
    /// Authorizes the run (approved digest only) and loads the plugin.
    fn plugin(&self, digest: &str) -> Result<LoadedPlugin> {
        let (_, bytes) = self.c.plugin_for_run(&self.ana, digest)?;
        Ok(self.c.runtime()?.load(&bytes)?)
    }

    fn stored(&self, v: &DatasetVersion) -> Result<Vec<DataRecord>> {
        datasets::records(self.c.env(), v)
            .map(|r| r.map(|r| r.record).map_err(anyhow::Error::from))
            .collect()
    }
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
    println!("Cloister demo: a closed environment, the bundled data and plugins, the sandbox.\n");
    let (c, root) = Cloister::init(&env_path, "admin")?;
    let admin = c.authenticate(&root)?;
    let add = |name: &str, role: Role| -> Result<User> { Ok(c.add_user(&admin, name, &[role])?.0) };
    let ana = add("ana", Role::Scientist)?;
    let rui = add("rui", Role::Reviewer)?;
    let ada = add("ada", Role::Auditor)?;
    println!(
        "Environment {} with users admin, ana (scientist), rui (reviewer), ada (auditor).",
        c.env().id()
    );

    let spam = import_bundled(&c, &ana, scratch.path(), "spamassassin", SPAMASSASSIN)?;
    let digits = import_bundled(&c, &ana, scratch.path(), "digits", DIGITS)?;
    println!("\nana imported (atomic, content-addressed):");
    for v in [&spam, &digits] {
        let labels: Vec<String> = v
            .stats
            .labels
            .iter()
            .take(4)
            .map(|(l, n)| format!("{l} {n}"))
            .collect();
        println!(
            "  {:<16} {:>5} records  sha256:{}  labels: {}{}",
            v.reference(),
            v.stats.records,
            &v.digest[..12],
            labels.join(", "),
            if v.stats.labels.len() > 4 {
                ", …"
            } else {
                ""
            }
        );
    }

    println!("\nana added the bundled plugins; rui reviewed and approved each digest:");
    let mut digests = std::collections::BTreeMap::new();
    for (name, bytes) in cloister_bundled_plugins::ALL {
        let e = c.add_plugin(&ana, bytes)?;
        c.approve_plugin(&rui, &e.digest)?;
        println!(
            "  {:<17} {:<6} {:<12} sha256:{}",
            e.name,
            e.version,
            e.kind.as_str(),
            &e.digest[..12]
        );
        digests.insert(*name, e.digest);
    }
    let d = |name: &str| {
        digests
            .get(name)
            .cloned()
            .with_context(|| format!("no plugin {name}"))
    };

    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let demo = Demo {
        c,
        ana,
        workers,
        batch_size: args.batch_size,
    };

    // Text: normalize, then hashed n-grams, over the stored records.
    let emails = demo.stored(&spam)?;
    let normalize = demo.plugin(&d("text-normalize")?)?;
    let ngrams = demo.plugin(&d("hashed-ngrams")?)?;
    let rt = demo.c.runtime()?;
    let t = Instant::now();
    let normalized = normalize
        .runner(rt, &[], Limits::default())?
        .workers(demo.workers)
        .batch_size(demo.batch_size)
        .preprocess(&emails)?;
    let t_norm = t.elapsed();
    let t = Instant::now();
    let features = ngrams
        .runner(rt, &[], Limits::default())?
        .workers(demo.workers)
        .batch_size(demo.batch_size)
        .featurize(&normalized)?;
    let t_feat = t.elapsed();
    let nnz = features.indices.len();
    println!("\nSpamAssassin through the approved plugins (labels stay in the store):");
    println!(
        "  text-normalize  kept {} of {} records   {:>8.0} records/s",
        normalized.len(),
        emails.len(),
        emails.len() as f64 / t_norm.as_secs_f64()
    );
    println!(
        "  hashed-ngrams   2^18 dimensions, {:.0} non-zeros per email ({:.2}% dense)   {:>8.0} records/s",
        nnz as f64 / normalized.len().max(1) as f64,
        100.0 * nnz as f64 / (normalized.len().max(1) as f64 * f64::from(1u32 << 18)),
        normalized.len() as f64 / t_feat.as_secs_f64()
    );

    // Numeric: standardize with statistics of the stored data.
    let images = demo.stored(&digits)?;
    let (mean, std) = column_stats(&images, "pixels")?;
    let join = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let standardize = demo.plugin(&d("standardize")?)?;
    let config = vec![
        ("fields".to_string(), "pixels".to_string()),
        ("mean".to_string(), join(&mean)),
        ("std".to_string(), join(&std)),
    ];
    let dense = standardize
        .runner(rt, &config, Limits::default())?
        .workers(demo.workers)
        .batch_size(demo.batch_size)
        .featurize(&images)?;
    let n = dense.values.len() as f64;
    let m = dense.values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = dense
        .values
        .iter()
        .map(|&v| (f64::from(v) - m).powi(2))
        .sum::<f64>()
        / n;
    let constant = std.iter().filter(|s| **s == 0.0).count();
    println!("\nDigits ({} images of 8x8 pixels):", images.len());
    println!(
        "  standardize     64 dense features per image; overall mean {m:+.4}, variance {var:.4} ({constant} constant pixels map to 0)"
    );

    // The environment is closed: nobody exports rows.
    println!("\nana tries to export the emails:");
    match demo.c.export_dataset(&demo.ana, "spamassassin") {
        Err(e @ ServiceError::Denied { .. }) => {
            println!("  {e} (forbidden by no-dataset-export, audited)")
        }
        other => anyhow::bail!("export was not denied: {other:?}"),
    }

    let entries = demo.c.audit_log(&ada, &AuditFilter::default())?;
    let denied = entries
        .iter()
        .filter(|e| e.record.decision == Decision::Deny)
        .count();
    let verdict = demo.c.audit_verify(&ada, None)?;
    println!("\nada (auditor) reads and verifies the audit log:");
    match verdict {
        Verdict::Intact { size, root, .. } => println!(
            "  {size} entries ({denied} denied), Merkle root {}…, chain and signed head verify",
            &hex::encode(root)[..16]
        ),
        Verdict::Tampered { first_bad, reason } => {
            anyhow::bail!("the audit log does not verify at entry {first_bad}: {reason}")
        }
    }

    drop(demo);
    match &args.keep {
        Some(dir) => println!(
            "\nDone in {:.1} s. The environment is kept in {} (admin token: {root}).",
            started.elapsed().as_secs_f64(),
            dir.display()
        ),
        None => println!(
            "\nDone in {:.1} s. The throwaway environment was deleted (keep it with --keep DIR).",
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-position mean and (population) standard deviation of a vector field.
fn column_stats(records: &[DataRecord], field: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut sum: Vec<f64> = Vec::new();
    let mut sq: Vec<f64> = Vec::new();
    for r in records {
        let v = r
            .numeric(field)
            .with_context(|| format!("record {} lacks {field}", r.id))?
            .as_slice();
        if sum.is_empty() {
            sum = vec![0.0; v.len()];
            sq = vec![0.0; v.len()];
        }
        anyhow::ensure!(
            v.len() == sum.len(),
            "record {} has {} values in {field}, expected {}",
            r.id,
            v.len(),
            sum.len()
        );
        for (i, x) in v.iter().enumerate() {
            sum[i] += x;
            sq[i] += x * x;
        }
    }
    let n = records.len().max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| (q / n - m * m).max(0.0).sqrt())
        .collect();
    Ok((mean, std))
}
