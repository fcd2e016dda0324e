//! `cloister demo`: the bundled plugins over the bundled datasets, in the
//! sandbox, with nothing written to disk.

use std::io::BufReader;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use cloister_host::records::{JsonlReader, Schema};
use cloister_host::runtime::{Limits, LoadedPlugin, Runtime, RuntimeConfig};
use cloister_host::types::DataRecord;

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
}

fn read_bundled(name: &str, gz: &'static [u8]) -> Result<Vec<DataRecord>> {
    let input = BufReader::new(flate2::read::GzDecoder::new(gz));
    JsonlReader::new(name, input, Schema::default())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bundled dataset {name}"))
}

fn load(runtime: &Runtime, name: &str) -> Result<LoadedPlugin> {
    let bytes =
        cloister_bundled_plugins::get(name).with_context(|| format!("no bundled plugin {name}"))?;
    Ok(runtime.load(bytes)?)
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("Cloister demo: the bundled plugins over the bundled data, in the sandbox.\n");
    println!("Plugins (compiled once, identified by SHA-256):");
    for (name, _) in cloister_bundled_plugins::ALL {
        let p = load(&runtime, name)?;
        println!(
            "  {:<17} {:<6} {:<12} sha256:{}",
            p.metadata.name,
            p.metadata.version,
            p.kind.to_string(),
            p.digest.short()
        );
    }

    // Text: normalize, then hashed n-grams.
    let emails = read_bundled("spamassassin.jsonl.gz", SPAMASSASSIN)?;
    let normalize = load(&runtime, "text-normalize")?;
    let ngrams = load(&runtime, "hashed-ngrams")?;
    let t = Instant::now();
    let normalized = normalize
        .runner(&runtime, &[], Limits::default())?
        .workers(workers)
        .batch_size(args.batch_size)
        .preprocess(&emails)?;
    let t_norm = t.elapsed();
    let t = Instant::now();
    let features = ngrams
        .runner(&runtime, &[], Limits::default())?
        .workers(workers)
        .batch_size(args.batch_size)
        .featurize(&normalized)?;
    let t_feat = t.elapsed();
    let nnz = features.indices.len();
    println!(
        "\nSpamAssassin ({} emails, labels withheld from plugins):",
        emails.len()
    );
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

    // Numeric: standardize with statistics of the data.
    let digits = read_bundled("digits.jsonl.gz", DIGITS)?;
    let (mean, std) = column_stats(&digits, "pixels")?;
    let join = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let standardize = load(&runtime, "standardize")?;
    let config = vec![
        ("fields".to_string(), "pixels".to_string()),
        ("mean".to_string(), join(&mean)),
        ("std".to_string(), join(&std)),
    ];
    let dense = standardize
        .runner(&runtime, &config, Limits::default())?
        .workers(workers)
        .batch_size(args.batch_size)
        .featurize(&digits)?;
    let n = dense.values.len() as f64;
    let m = dense.values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = dense
        .values
        .iter()
        .map(|&v| (f64::from(v) - m).powi(2))
        .sum::<f64>()
        / n;
    let constant = std.iter().filter(|s| **s == 0.0).count();
    println!("\nDigits ({} images of 8x8 pixels):", digits.len());
    println!(
        "  standardize     64 dense features per image; overall mean {m:+.4}, variance {var:.4} ({constant} constant pixels map to 0)"
    );
    println!(
        "\nDone in {:.1} s. Nothing was written to disk.",
        started.elapsed().as_secs_f64()
    );
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
