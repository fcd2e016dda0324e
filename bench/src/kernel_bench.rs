//! Training-kernel benchmark (issue 23): samples per second of the `logreg`
//! and `mlp` templates by class count, on synthetic sparse data shaped like
//! hashed text features, next to the machine's own limits measured in the
//! same run (a dense f32 matrix product through candle, and memory copy
//! bandwidth).
//!
//! `kernel-bench [--records N] [--nnz K] [--classes 2,5,8,20] [--epochs E]
//! [--set KEY=VALUE …]`
//!
//! The data: `N` records of `K` distinct features each out of 2^18, drawn
//! from a Zipf-like law (a few features common, most rare, as in text), a
//! value of 1/sqrt(K) each, labelled by a random sparse linear teacher so
//! that training has something to learn. Each template trains `E` epochs
//! (no early stopping) on 80% and validates on 20%; the figure is the
//! median of the epochs' samples/s. Beside it: the share of the dense
//! limit its multiply-adds reach, and the share of the copy bandwidth its
//! sparse update's memory traffic reaches (distinct input rows a batch
//! touches × each row's weights and optimizer state, read and written).
//! Neither share is the binding limit today: halving the bytes per row
//! (bf16 state) did not make the kernels faster, because their time goes
//! to reaching each touched row at a random place (docs/BENCHMARKS.md).

#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::{Context, Result};

use cloister_host::train::{self, TrainingSet, model::Rng};
use cloister_host::types::SparseBatch;

const DIM: usize = 1 << 18;

/// The allocator of the `cloister` binary, so the kernels run on the memory
/// they get there: mimalloc backs large blocks such as the sparse tables
/// with transparent huge pages, which the C library's allocator does not ask
/// for on kernels set to `madvise` (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, clap::Parser)]
#[command(name = "kernel-bench")]
struct Args {
    /// Synthetic records.
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    /// Non-zero features per record.
    #[arg(long, default_value_t = 300)]
    nnz: usize,
    /// Class counts to measure, comma-separated.
    #[arg(long, default_value = "2,5,8,20")]
    classes: String,
    /// Epochs per fit.
    #[arg(long, default_value_t = 3)]
    epochs: u32,
    /// Templates to measure, comma-separated.
    #[arg(long, default_value = "logreg,mlp")]
    templates: String,
    /// Override a hyper-parameter of every template, KEY=VALUE.
    #[arg(long = "set", value_parser = parse_set)]
    sets: Vec<(String, String)>,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("--set {s}: expected KEY=VALUE"))
}

/// A feature index from a Zipf-like law over `DIM` (inverse-CDF of a
/// continuous 1/x law), scrambled so that common features are not
/// neighbours in memory.
fn feature(rng: &mut Rng) -> u32 {
    let u = rng.unit() as f64;
    let rank = ((DIM as f64).powf(u) - 1.0) as u64;
    (rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 46) as u32 % DIM as u32
}

fn synthetic(records: usize, nnz: usize, classes: usize) -> (SparseBatch, Vec<usize>) {
    let mut rng = Rng::new(7);
    // The teacher: each class weights 2,000 random features.
    let mut teacher = vec![0f32; DIM * classes];
    for c in 0..classes {
        for _ in 0..2000 {
            let f = feature(&mut rng) as usize;
            teacher[f * classes + c] += rng.unit() * 2.0 - 0.5;
        }
    }
    let mut x = SparseBatch {
        offsets: vec![0],
        indices: Vec::with_capacity(records * nnz),
        values: Vec::with_capacity(records * nnz),
    };
    let mut y = Vec::with_capacity(records);
    let value = 1.0 / (nnz as f32).sqrt();
    let mut row = Vec::with_capacity(nnz);
    for _ in 0..records {
        row.clear();
        while row.len() < nnz {
            let f = feature(&mut rng);
            if !row.contains(&f) {
                row.push(f);
            }
        }
        row.sort_unstable();
        let mut score = vec![0f32; classes];
        for &f in &row {
            for (c, s) in score.iter_mut().enumerate() {
                *s += teacher[f as usize * classes + c];
            }
        }
        let best = (0..classes)
            .max_by(|&a, &b| score[a].total_cmp(&score[b]))
            .unwrap_or(0);
        x.indices.extend_from_slice(&row);
        x.values.extend(std::iter::repeat_n(value, nnz));
        x.offsets.push(x.indices.len() as u32);
        y.push(best);
    }
    (x, y)
}

/// GB/s of copying a 256 MiB buffer (read + write counted), best of three.
fn copy_gbps() -> f64 {
    let n = 64 << 20;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * 4) as f64 / best / 1e9
}

/// Distinct input rows that a mini-batch of `batch` training records
/// touches, per record: each such row's weights and optimizer state are
/// read and written once per step, so this sets the sparse layer's memory
/// traffic. Batches are cut from a shuffled order, as training cuts them;
/// the figure hardly depends on the order.
fn rows_per_record(x: &SparseBatch, train: &[usize], batch: usize) -> f64 {
    let mut order = train.to_vec();
    Rng::new(11).shuffle(&mut order);
    let mut seen_in = vec![usize::MAX; DIM];
    let mut distinct = 0usize;
    for (b, rows) in order.chunks(batch.max(1)).enumerate() {
        for &r in rows {
            for &i in x.row(r).0 {
                if let Some(seen) = seen_in.get_mut(i as usize)
                    && *seen != b
                {
                    *seen = b;
                    distinct += 1;
                }
            }
        }
    }
    distinct as f64 / order.len().max(1) as f64
}

/// Bytes moved between memory and cache for one touched row of a sparse
/// layer `width` outputs wide: its weights (`width` floats) and its partial
/// row-wise Adam state (`width + 1` floats), each read and written once, in
/// whole 64-byte lines. Rows of `n` bytes laid end to end from a
/// line-aligned start (mimalloc, this benchmark's allocator, puts tables
/// this large on page boundaries) begin at every multiple of `g = gcd(n, 64)` within a
/// line equally often, and so span `(n + 64 − g) / 64` lines on average:
/// exactly `n / 64` when rows are whole lines (the `mlp`'s 512-byte
/// weight rows), up to `(n + 60) / 64` when they are merely 4-byte aligned.
fn bytes_per_row(width: usize) -> f64 {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let lines = |floats: usize| {
        let n = floats * 4;
        (n + 64 - gcd(n, 64)) as f64 / 64.0
    };
    2.0 * 64.0 * (lines(width) + lines(width + 1))
}

fn main() -> Result<()> {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    // As the `cloister` binary does, so that candle's products cost here
    // what they cost in the product.
    #[allow(unsafe_code)]
    unsafe {
        train::model::settle_thread_count()
    };
    let args = <Args as clap::Parser>::parse();
    let gflops = train::model::dense_matmul_gflops(1024)?;
    let gbps = copy_gbps();
    println!(
        "machine: {} CPUs; dense f32 matmul {gflops:.1} GFLOP/s (candle, 1024^3); memory copy {gbps:.1} GB/s",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "data: {} synthetic records, {} features each of 2^18, {} epochs",
        args.records, args.nnz, args.epochs
    );
    println!(
        "\n| template | classes | samples/s (median epoch) | multiply-adds per sample | GFLOP/s | share of dense matmul | input rows updated per sample | memory traffic per sample | GB/s | share of memory copy | val. accuracy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for classes in args.classes.split(',') {
        let classes: usize = classes.trim().parse().context("--classes")?;
        let (x, y) = synthetic(args.records, args.nnz, classes);
        let cut = args.records * 4 / 5;
        let train: Vec<usize> = (0..cut).collect();
        let val: Vec<usize> = (cut..args.records).collect();
        for name in args.templates.split(',') {
            let mut sets = args.sets.clone();
            sets.push(("epochs".into(), args.epochs.to_string()));
            sets.push(("patience".into(), "1000".into()));
            sets.push(("min_support".into(), "0".into()));
            let t = train::template(name.trim(), &sets)?;
            let width = match t.kind {
                train::Kind::Logreg => classes,
                train::Kind::Mlp => t.hyper.hidden.first().copied().unwrap_or(0),
            };
            let fitted = train::fit(
                &t,
                TrainingSet {
                    x: &x,
                    dim: DIM,
                    y: &y,
                    classes,
                    train: &train,
                    val: &val,
                    budget_bytes: u64::MAX,
                },
                &mut |_| {},
            )?;
            let mut rates: Vec<f64> = fitted.curve.iter().map(|c| c.samples_per_s).collect();
            rates.sort_by(f64::total_cmp);
            let rate = rates[rates.len() / 2];
            // Forward, backward into the input layer and its update: about
            // three multiply-adds per non-zero and output unit (the dense
            // layers of the MLP come on top).
            let madds = 3 * args.nnz * width;
            let gf = rate * 2.0 * madds as f64 / 1e9;
            // The sparse layer's update: the traffic to memory that the
            // kernel cannot avoid (the batch's rows can stay in the cache
            // between the forward pass and the update, so reading them
            // there is not counted; the MLP's dense layers fit in cache).
            let rows = rows_per_record(&x, &train, t.hyper.batch_size);
            let traffic = rows * bytes_per_row(width);
            let mem = rate * traffic / 1e9;
            println!(
                "| {name} | {classes} | {rate:.0} | {madds} | {gf:.2} | {:.1}% | {rows:.0} | {:.0} KB | {mem:.1} | {:.0}% | {:.3} |",
                100.0 * gf / gflops,
                traffic / 1e3,
                100.0 * mem / gbps,
                fitted.curve.last().map_or(f64::NAN, |c| c.val_accuracy)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_span_the_lines_their_stride_gives() {
        // logreg at 20 classes: 80-byte weight rows span 2 lines on
        // average (starts at 0, 16, 32, 48), 84-byte state rows 2.25.
        assert_eq!(super::bytes_per_row(20), 128.0 * (2.0 + 2.25));
        // mlp: 512-byte weight rows are 8 whole lines; 516-byte state rows
        // start at every multiple of 4 and span 9 on average.
        assert_eq!(super::bytes_per_row(128), 128.0 * (8.0 + 9.0));
    }
}
