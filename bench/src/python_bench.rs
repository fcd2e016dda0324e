//! What a plugin author pays for writing in Python (issue 22): the
//! `standardize` featurizer as a componentize-py component
//! (`plugins/python/standardize`) against the same logic in Rust, in the
//! sandbox and natively, in one run: component size, load cold (Cranelift)
//! and cached (authenticated artifact), configured instantiation median and
//! p99, and records/s on the bundled digits.
//!
//! `python-bench --component py-standardize.wasm [--records N]`; built and
//! run by `bench/python.sh`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloister_host::records::{self, Schema};
use cloister_host::runtime::{ArtifactCache, Limits, LoadedPlugin, Runtime, RuntimeConfig};
use cloister_host::types::DataRecord;
use cloister_plugin_sdk::{Config, Features, Featurizer, Plugin};
use standardize::Standardize;

#[derive(Debug, clap::Parser)]
#[command(name = "python-bench")]
struct Args {
    /// The Python component (py-standardize.wasm).
    #[arg(long)]
    component: PathBuf,
    /// Records to featurize (the digits, cycled with fresh ids).
    #[arg(long, default_value_t = 50_000)]
    records: usize,
}

/// A plugin configuration: `(key, value)` pairs.
type PluginConfig = Vec<(String, String)>;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The digits, cycled to `n` records, and the per-pixel mean and standard
/// deviation as configuration.
fn digits(n: usize) -> Result<(Vec<DataRecord>, PluginConfig)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits/digits.jsonl.gz");
    let base = records::read_file(&path, Schema::default())?;
    let px = |r: &DataRecord| -> Vec<f64> {
        r.numerics
            .iter()
            .find(|f| f.name == "pixels")
            .map(|f| f.value.as_slice().to_vec())
            .unwrap_or_default()
    };
    let count = base.len() as f64;
    let mut mean = vec![0f64; 64];
    let mut sq = vec![0f64; 64];
    for r in &base {
        for (j, x) in px(r).into_iter().enumerate() {
            mean[j] += x / count;
            sq[j] += x * x / count;
        }
    }
    let std: Vec<f64> = mean
        .iter()
        .zip(&sq)
        .map(|(m, s)| (s - m * m).max(0.0).sqrt())
        .collect();
    let join = |v: &[f64]| v.iter().map(f64::to_string).collect::<Vec<_>>().join(",");
    let config = vec![
        ("fields".to_string(), "pixels".to_string()),
        ("mean".to_string(), join(&mean)),
        ("std".to_string(), join(&std)),
    ];
    let records = (0..n)
        .map(|i| DataRecord {
            id: format!("r{i}"),
            label: None,
            ..base[i % base.len()].clone()
        })
        .collect();
    Ok((records, config))
}

fn disk_runtime(dir: &Path) -> Result<Runtime> {
    let handle = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())?;
    Ok(Runtime::new(RuntimeConfig {
        cache: ArtifactCache::on_disk(handle, &[7u8; 32], u64::MAX),
        max_instances: 8,
        ..RuntimeConfig::default()
    })?)
}

/// Load time cold and cached (median of `reps`).
fn load_times(bytes: &[u8], reps: usize) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let mut cold = Vec::new();
    for _ in 0..reps {
        let rt = Runtime::new(RuntimeConfig {
            max_instances: 8,
            ..RuntimeConfig::default()
        })?;
        let t = Instant::now();
        rt.load(bytes)?;
        cold.push(t.elapsed());
    }
    disk_runtime(dir.path())?.load(bytes)?;
    let mut cached = Vec::new();
    for _ in 0..reps {
        let rt = disk_runtime(dir.path())?;
        let t = Instant::now();
        rt.load(bytes)?;
        cached.push(t.elapsed());
        if rt.config().cache.stats().0 != 1 {
            bail!("expected a cache hit");
        }
    }
    Ok((median(cold), median(cached)))
}

/// Configured instantiation: median and p99 over `n` (after 20 to warm).
fn instantiation(
    rt: &Runtime,
    p: &LoadedPlugin,
    config: &[(String, String)],
    n: usize,
) -> Result<(Duration, Duration)> {
    let mut times = Vec::with_capacity(n + 20);
    for _ in 0..n + 20 {
        let t = Instant::now();
        let inst = p.instantiate(rt, config, &Limits::default())?;
        times.push(t.elapsed());
        drop(inst);
    }
    let mut times = times.split_off(20);
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// Records/s through the sandbox, one worker, batches of 256 (best of 3).
fn sandbox_rate(
    rt: &Runtime,
    p: &LoadedPlugin,
    config: &[(String, String)],
    records: &[DataRecord],
) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let runner = p
            .runner(rt, config, Limits::default())?
            .workers(1)
            .batch_size(256);
        let t = Instant::now();
        let out = runner.featurize(records)?;
        best = best.min(t.elapsed().as_secs_f64());
        if out.rows() != records.len() {
            bail!("wrong row count");
        }
    }
    Ok(records.len() as f64 / best)
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let py_bytes = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let rust_bytes = cloister_bundled_plugins::get("standardize").context("bundled standardize")?;
    let (records, config) = digits(args.records)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "machine: {cpus} CPUs; {} digit records (8x8 pixels), standardize in Rust and in Python\n",
        records.len()
    );

    println!("| | Rust component | Python component | Python / Rust |");
    println!("|---|---:|---:|---:|");
    println!(
        "| size | {:.2} MB | {:.2} MB | {:.0}x |",
        rust_bytes.len() as f64 / 1e6,
        py_bytes.len() as f64 / 1e6,
        py_bytes.len() as f64 / rust_bytes.len() as f64
    );
    let (rc, rh) = load_times(rust_bytes, 3)?;
    let (pc, ph) = load_times(&py_bytes, 3)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| load, cold (Cranelift) | {:.1} ms | {:.1} ms | {:.0}x |",
        ms(rc),
        ms(pc),
        ms(pc) / ms(rc)
    );
    println!(
        "| load, cached artifact | {:.2} ms | {:.2} ms | {:.0}x |",
        ms(rh),
        ms(ph),
        ms(ph) / ms(rh)
    );
    let rt = Runtime::new(RuntimeConfig::default())?;
    let rust = rt.load(rust_bytes)?;
    let py = rt.load(&py_bytes)?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (rm, r99) = instantiation(&rt, &rust, &config, 500)?;
    let (pm, p99) = instantiation(&rt, &py, &config, 500)?;
    println!(
        "| instantiate + configure, median | {:.1} µs | {:.1} µs | {:.0}x |",
        us(rm),
        us(pm),
        us(pm) / us(rm)
    );
    println!(
        "| instantiate + configure, p99 | {:.1} µs | {:.1} µs | {:.0}x |",
        us(r99),
        us(p99),
        us(p99) / us(r99)
    );
    let rr = sandbox_rate(&rt, &rust, &config, &records)?;
    let pr = sandbox_rate(&rt, &py, &config, &records)?;
    // The same Rust code, natively.
    let native = {
        let mut plugin = Standardize::configure(
            &Config::new(&Standardize::config_keys(), config.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let sdk_records: Vec<cloister_plugin_sdk::Record> = records
            .iter()
            .map(|r| cloister_plugin_sdk::Record {
                id: r.id.clone(),
                texts: Vec::new(),
                numerics: r
                    .numerics
                    .iter()
                    .map(|f| cloister_plugin_sdk::NumericField {
                        name: f.name.clone(),
                        value: cloister_plugin_sdk::Numeric::Vector(f.value.as_slice().to_vec()),
                    })
                    .collect(),
                label: None,
            })
            .collect();
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for chunk in sdk_records.chunks(256) {
                let mut out = Features::with_capacity(chunk.len(), 64);
                plugin
                    .featurize_batch(chunk, &mut out)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                std::hint::black_box(out.into_batch());
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        records.len() as f64 / best
    };
    println!(
        "| records/s in the sandbox (1 worker, batches of 256) | {rr:.0} | {pr:.0} | {:.2}x |",
        pr / rr
    );
    println!(
        "| records/s natively (the Rust code, no sandbox) | {native:.0} | – | {:.3}x |",
        pr / native
    );
    Ok(())
}
