//! The in-process baseline of the serving benchmark (issue 20,
//! `bench/serve.sh`): a deployment's `predict` called directly on a
//! `Cloister`, without HTTP, from T threads for S seconds, with R records
//! per request drawn from a JSONL file. The same work the console's
//! `POST /api/deployments/{name}/predict` does — authorization, the
//! durable audit append, the plugin chain in the sandbox, the model, the
//! metrics — minus the HTTP and JSON of the request.
//!
//! `serve-bench --env DIR --token CLT --deployment NAME --input F.jsonl
//! [--records 1] [--threads 2] [--seconds 10]`

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use cloister_host::service::Cloister;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// The environment.
    #[arg(long)]
    env: PathBuf,
    /// A client token of the deployment.
    #[arg(long)]
    token: String,
    /// The deployment.
    #[arg(long)]
    deployment: String,
    /// Records to send (JSONL), cycled.
    #[arg(long)]
    input: PathBuf,
    /// Records per request.
    #[arg(long, default_value_t = 1)]
    records: usize,
    /// Threads calling at once.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// How long.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn main() -> Result<()> {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    // As the `cloister` binary does (candle's thread count read once).
    #[allow(unsafe_code)]
    unsafe {
        cloister_host::train::model::settle_thread_count()
    };
    let a = Args::parse();
    let c = Arc::new(Cloister::open(&a.env, "console").context("open the environment")?);
    let who = c.authenticate(&a.token)?;
    let records = cloister_host::records::read_file(&a.input, Default::default())?;
    anyhow::ensure!(!records.is_empty(), "no records in {}", a.input.display());
    // One warm-up request loads the model and its chain.
    c.predict_deployed(
        &who,
        &a.deployment,
        None,
        &records[..a.records.min(records.len())],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(records);
    let started = Instant::now();
    let handles: Vec<_> = (0..a.threads)
        .map(|t| {
            let (c, who, stop, records) = (c.clone(), who.clone(), stop.clone(), records.clone());
            let (name, per) = (a.deployment.clone(), a.records);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut i = t * 7919;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<_> = (0..per)
                        .map(|j| records[(i + j) % records.len()].clone())
                        .collect();
                    i += per;
                    let key = format!("k{i}");
                    let t0 = Instant::now();
                    if c.predict_deployed(&who, &name, Some(&key), &batch).is_err() {
                        errors += 1;
                    }
                    lat.push(t0.elapsed());
                }
                (lat, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.join().map_err(|_| anyhow::anyhow!("a thread panicked"))?;
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "in-process: {} requests of {} record(s) in {secs:.1} s from {} threads: {:.0} requests/s ({:.0} records/s), p50 {:.2} ms, p99 {:.2} ms, errors {errors}",
        lat.len(),
        a.records,
        a.threads,
        lat.len() as f64 / secs,
        (lat.len() * a.records) as f64 / secs,
        q(0.50),
        q(0.99),
    );
    Ok(())
}
