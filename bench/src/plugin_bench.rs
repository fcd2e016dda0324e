//! Plugin-runtime benchmark: `hashed-ngrams` through the sandbox versus the
//! same Rust code compiled natively, in the same run; instantiation latency
//! with the pooling allocator; compile time cold versus cached.
//!
//! Run with `bench/run.sh` (release build). Prints a Markdown report and
//! writes JSON next to it when `--json FILE` is given.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloister_host::records::{self, Schema};
use cloister_host::runtime::{ArtifactCache, Limits, Runtime, RuntimeConfig};
use cloister_host::types::DataRecord;
use cloister_plugin_sdk::{Config, Features, Featurizer, Plugin};
use hashed_ngrams::HashedNgrams;

/// hashed-ngrams through the sandbox versus natively, instantiation
/// latency, compile time cold versus cached.
#[derive(Debug, clap::Parser)]
#[command(name = "plugin-bench")]
struct Args {
    /// Records to featurize (the input is cycled with fresh ids).
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Input records (JSONL, optionally gzipped).
    #[arg(long, default_value_os_t = default_input())]
    input: PathBuf,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024,4096")]
    batches: Vec<usize>,
    /// Worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure this component instead of the bundled hashed-ngrams.
    #[arg(long)]
    plugin: Option<PathBuf>,
}

fn default_input() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/spamassassin/spamassassin.jsonl.gz")
}

fn parse_args() -> Result<Args> {
    Ok(<Args as clap::Parser>::parse())
}

/// At least `n` records, cycling the input with fresh ids.
fn load_records(path: &Path, n: usize) -> Result<Vec<DataRecord>> {
    let base = records::read_file(path, Schema::default())?;
    if base.is_empty() {
        bail!("{} has no records", path.display());
    }
    let mut out = Vec::with_capacity(n.max(base.len()));
    let mut round = 0;
    while out.len() < n {
        for r in &base {
            out.push(DataRecord {
                id: format!("{}#{round}", r.id),
                label: None,
                ..r.clone()
            });
        }
        round += 1;
    }
    Ok(out)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The same featurizer code, compiled natively, on `workers` threads.
fn native_run(recs: &[cloister_plugin_sdk::Record], batch: usize, workers: usize) -> Result<usize> {
    let keys = HashedNgrams::config_keys();
    let chunks: Vec<&[cloister_plugin_sdk::Record]> = recs.chunks(batch).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let nnz = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..workers {
            handles.push(s.spawn(|| -> Result<()> {
                let cfg = Config::new(&keys, vec![]).map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut f = HashedNgrams::configure(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
                loop {
                    let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(chunk) = chunks.get(at) else { break };
                    let mut out = Features::with_capacity(chunk.len(), 0);
                    f.featurize_batch(chunk, &mut out)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let b = std::hint::black_box(out.into_batch());
                    nnz.fetch_add(b.indices.len(), std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("native worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(nnz.into_inner())
}

fn to_sdk(r: &DataRecord) -> cloister_plugin_sdk::Record {
    cloister_plugin_sdk::Record {
        id: r.id.clone(),
        texts: r
            .texts
            .iter()
            .map(|t| cloister_plugin_sdk::TextField {
                name: t.name.clone(),
                value: t.value.clone(),
            })
            .collect(),
        numerics: vec![],
        label: None,
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let records = load_records(&args.input, args.records)?;
    let sdk_records: Vec<_> = records.iter().map(to_sdk).collect();
    let bytes_in: usize = records
        .iter()
        .flat_map(|r| &r.texts)
        .map(|t| t.value.len())
        .sum();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# Plugin runtime benchmark\n");
    println!(
        "input: {} ({} records, {:.1} MB of text), {} logical CPUs, {} repetitions (median)\n",
        args.input.display(),
        records.len(),
        bytes_in as f64 / 1e6,
        cpus,
        args.reps
    );

    // The bundled hashed-ngrams, or (for experiments with build settings) a
    // component built from the same source elsewhere.
    let from_file = match &args.plugin {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let ngrams: &[u8] = match &from_file {
        Some(b) => b,
        None => cloister_bundled_plugins::get("hashed-ngrams").context("bundled hashed-ngrams")?,
    };
    let fuel_rt = Runtime::new(RuntimeConfig::default())?;
    let nofuel_rt = Runtime::new(RuntimeConfig {
        fuel: false,
        ..RuntimeConfig::default()
    })?;
    let fuel_plugin = fuel_rt.load(ngrams)?;
    let nofuel_plugin = nofuel_rt.load(ngrams)?;
    let limits = Limits {
        fuel: u64::MAX / 2,
        ..Limits::default()
    };

    let mut rows = Vec::new();
    println!("## hashed-ngrams: records/s, sandbox vs native (same code, same run)\n");
    println!(
        "| workers | batch | native rec/s | sandbox, fuel+epoch rec/s | ratio | sandbox, epoch only rec/s | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &workers in &args.workers {
        for &batch in &args.batches {
            let mut native = Vec::new();
            let mut fuel = Vec::new();
            let mut nofuel = Vec::new();
            for _ in 0..args.reps {
                let t = Instant::now();
                let native_nnz = native_run(&sdk_records, batch, workers)?;
                native.push(t.elapsed());
                for (rt, p, out) in [
                    (&fuel_rt, &fuel_plugin, &mut fuel),
                    (&nofuel_rt, &nofuel_plugin, &mut nofuel),
                ] {
                    let runner = p
                        .runner(rt, &[], limits.clone())?
                        .workers(workers)
                        .batch_size(batch);
                    let t = Instant::now();
                    let b = runner.featurize(&records)?;
                    out.push(t.elapsed());
                    if b.indices.len() != native_nnz {
                        bail!(
                            "sandbox and native disagree: {} vs {native_nnz} non-zeros",
                            b.indices.len()
                        );
                    }
                }
            }
            let rate = |d: Duration| records.len() as f64 / d.as_secs_f64();
            let (n, f, e) = (
                rate(median(native)),
                rate(median(fuel)),
                rate(median(nofuel)),
            );
            println!(
                "| {workers} | {batch} | {n:.0} | {f:.0} | {:.2} | {e:.0} | {:.2} |",
                f / n,
                e / n
            );
            rows.push(serde_json::json!({"workers": workers, "batch": batch, "native": n, "fuel": f, "epoch_only": e}));
        }
    }

    // Instantiation with the pooling allocator: bare, and with configure.
    println!("\n## Instantiation (pooling allocator)\n");
    println!(
        "bare: store + sandbox + instance; configured: bare + the plugin's configure call (and dimension for featurizers).\n"
    );
    println!("| plugin | what | runs | median | p99 | mean cycle incl. drop |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut inst_rows = Vec::new();
    for name in ["entropy", "hashed-ngrams"] {
        let p = fuel_rt.load(cloister_bundled_plugins::get(name).context("bundled")?)?;
        for configured in [false, true] {
            let mut times = Vec::with_capacity(5200);
            let cycle_start = Instant::now();
            for _ in 0..5200 {
                let t = Instant::now();
                if configured {
                    let inst = p.instantiate(&fuel_rt, &[], &Limits::default())?;
                    times.push(t.elapsed());
                    drop(inst);
                } else {
                    let inst = p.instantiate_bare(&fuel_rt, &Limits::default())?;
                    times.push(t.elapsed());
                    drop(inst);
                }
            }
            let cycle = cycle_start.elapsed() / 5200;
            // The first 200 runs warm the pool.
            let mut times = times.split_off(200);
            times.sort();
            let (med, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
            let what = if configured { "configured" } else { "bare" };
            println!(
                "| {name} | {what} | {} | {:.1} µs | {:.1} µs | {:.1} µs |",
                times.len(),
                med.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                cycle.as_secs_f64() * 1e6
            );
            inst_rows.push(serde_json::json!({"plugin": name, "what": what, "median_us": med.as_secs_f64() * 1e6, "p99_us": p99.as_secs_f64() * 1e6, "cycle_us": cycle.as_secs_f64() * 1e6}));
        }
    }

    // Compile: cold (Cranelift) vs cached (authenticated artifact from disk).
    println!("\n## Loading hashed-ngrams: compile cold vs cached artifact\n");
    let dir = tempfile::tempdir()?;
    let secret = [42u8; 32];
    let disk_rt = || -> Result<Runtime> {
        let handle = cap_std::fs::Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority())?;
        Ok(Runtime::new(RuntimeConfig {
            cache: ArtifactCache::on_disk(handle, &secret, u64::MAX),
            max_instances: 4,
            ..RuntimeConfig::default()
        })?)
    };
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..5 {
        let rt = Runtime::new(RuntimeConfig {
            max_instances: 4,
            ..RuntimeConfig::default()
        })?;
        let t = Instant::now();
        rt.load(ngrams)?;
        cold.push(t.elapsed());
    }
    disk_rt()?.load(ngrams)?;
    for _ in 0..5 {
        let rt = disk_rt()?;
        let t = Instant::now();
        rt.load(ngrams)?;
        cached.push(t.elapsed());
        if rt.config().cache.stats().0 != 1 {
            bail!("expected a cache hit");
        }
    }
    let (c, h) = (median(cold), median(cached));
    println!("| load | median of 5 |\n|---|---:|");
    println!(
        "| cold (compile with Cranelift) | {:.1} ms |",
        c.as_secs_f64() * 1e3
    );
    println!(
        "| cached (verify tag + deserialize) | {:.2} ms |",
        h.as_secs_f64() * 1e3
    );
    println!("\nBoth include reading the plugin's metadata in a fresh instance.");

    if let Some(path) = args.json {
        let doc = serde_json::json!({
            "records": records.len(), "cpus": cpus, "throughput": rows, "instantiation": inst_rows,
            "load_cold_ms": c.as_secs_f64() * 1e3, "load_cached_ms": h.as_secs_f64() * 1e3,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}
