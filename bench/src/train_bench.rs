//! Training benchmark (issue 4): Cloister's `logreg` template against
//! scikit-learn's `LogisticRegression` on the same features and splits.
//!
//! `train-bench --data FILE.jsonl[.gz] [--data FILE2 …] --out DIR`:
//! runs `text-normalize` and `hashed-ngrams` (the bundled plugins, in the
//! sandbox) over the records, splits them with Cloister's deterministic
//! split (seed 0), writes the features in svmlight format plus the split
//! (for `bench/sklearn_baseline.py`), then trains `logreg` and reports test
//! accuracy, wall time, samples/s per epoch and peak memory.

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use cloister_host::datasets::{Split, split_of};
use cloister_host::runtime::{Limits, Runtime, RuntimeConfig};
use cloister_host::train::{self, eval};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Cloister's logreg template against scikit-learn on the same features.
#[derive(Debug, clap::Parser)]
#[command(name = "train-bench")]
struct Args {
    /// Input records (JSONL, optionally gzipped); repeatable.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Where the features, splits and results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Repetitions of the fit (times reported are medians).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Override a hyper-parameter, KEY=VALUE (repeatable).
    #[arg(long = "set", value_parser = parse_set)]
    sets: Vec<(String, String)>,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("--set {s}: expected KEY=VALUE"))
}

fn main() -> Result<()> {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    // As the `cloister` binary does, so that candle's products cost here
    // what they cost in the product.
    #[allow(unsafe_code)]
    unsafe {
        train::model::settle_thread_count()
    };
    let Args {
        data,
        out,
        reps,
        sets,
    } = <Args as clap::Parser>::parse();
    let mut records = Vec::new();
    for f in &data {
        records.extend(cloister_host::records::read_file(f, Default::default())?);
    }
    let labels: Vec<String> = records
        .iter()
        .map(|r| r.label.clone().context("every record needs a label"))
        .collect::<Result<_>>()?;
    let splits: Vec<Split> = records.iter().map(|r| split_of(r, 0)).collect();
    for r in &mut records {
        r.label = None;
    }
    let rt = Runtime::new(RuntimeConfig::default())?;
    let t = Instant::now();
    let normalize = rt.load(cloister_bundled_plugins::get("text-normalize").context("bundled")?)?;
    let ngrams = rt.load(cloister_bundled_plugins::get("hashed-ngrams").context("bundled")?)?;
    let pre = normalize
        .runner(&rt, &[], Limits::default())?
        .preprocess(&records)?;
    if pre.len() != records.len() {
        bail!("the preprocessor dropped records");
    }
    let x = ngrams
        .runner(&rt, &[], Limits::default())?
        .featurize(&pre)?;
    let dim = ngrams
        .instantiate(&rt, &[], &Limits::default())?
        .dimension() as usize;
    println!(
        "features: {} records, dimension {dim}, {:.1} s in the sandbox",
        x.rows(),
        t.elapsed().as_secs_f64()
    );

    let (classes, index) = train::class_index(&labels);
    let y: Vec<usize> = labels.iter().map(|l| index[l]).collect();
    let (mut tr, mut va, mut te) = (Vec::new(), Vec::new(), Vec::new());
    for (row, s) in splits.iter().enumerate() {
        match s {
            Split::Train => tr.push(row),
            Split::Validation => va.push(row),
            Split::Test => te.push(row),
        }
    }
    std::fs::create_dir_all(&out)?;
    let mut svm = std::io::BufWriter::new(std::fs::File::create(out.join("features.svmlight"))?);
    for (row, label) in y.iter().enumerate() {
        write!(svm, "{label}")?;
        let (idx, val) = x.row(row);
        for (i, v) in idx.iter().zip(val) {
            write!(svm, " {}:{}", i + 1, v)?;
        }
        writeln!(svm)?;
    }
    svm.flush()?;
    let split_text: String = splits
        .iter()
        .map(|s| match s {
            Split::Train => "train\n",
            Split::Validation => "validation\n",
            Split::Test => "test\n",
        })
        .collect();
    std::fs::write(out.join("split.txt"), split_text)?;
    println!(
        "splits: train {} validation {} test {}; classes {}",
        tr.len(),
        va.len(),
        te.len(),
        classes.len()
    );

    let template = train::template("logreg", &sets)?;
    let data = train::TrainingSet {
        x: &x,
        dim,
        y: &y,
        classes: classes.len(),
        train: &tr,
        val: &va,
        budget_bytes: u64::MAX,
    };
    // Training is deterministic for a seed: every repetition must keep the
    // same epoch; the times reported are medians over the repetitions.
    let mut kept_times = Vec::new();
    let mut totals = Vec::new();
    let mut fitted = None;
    for _ in 0..reps.max(1) {
        let f = train::fit(&template, data, &mut |_| {})?;
        kept_times.push(
            f.curve
                .iter()
                .find(|c| c.epoch == f.best_epoch)
                .map_or(f64::NAN, |c| c.elapsed_s),
        );
        totals.push(f.seconds);
        if fitted
            .as_ref()
            .is_some_and(|prev: &train::Fitted| prev.best_epoch != f.best_epoch)
        {
            bail!("repetitions kept different epochs: training is not deterministic");
        }
        fitted = Some(f);
    }
    let fitted = fitted.context("no repetition ran")?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (kept_s, total_s) = (median(&mut kept_times), median(&mut totals));
    let probs = fitted.model.predict(&x, &te)?;
    let ids: Vec<String> = te.iter().map(|&r| records[r].id.clone()).collect();
    let truth: Vec<usize> = te.iter().map(|&r| y[r]).collect();
    let e = eval::evaluate(&classes, &ids, &truth, &probs);
    let per_epoch: Vec<String> = fitted
        .curve
        .iter()
        .map(|c| format!("{:.0}", c.samples_per_s))
        .collect();
    println!(
        "cloister logreg: test accuracy {:.4}, macro F1 {:.4}, time to the kept epoch {:.2} s, total with early stopping {:.2} s (median of {reps}; kept-epoch times {}), {} epochs, kept {}, samples/s per epoch [{}], peak RSS {:.0} MiB",
        e.accuracy,
        e.macro_f1,
        kept_s,
        total_s,
        kept_times
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        fitted.curve.len(),
        fitted.best_epoch,
        per_epoch.join(", "),
        peak_rss_mib()
    );
    Ok(())
}
