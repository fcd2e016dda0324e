//! Store and audit benchmarks (issue 3).
//!
//! `store-bench import --records N`: generates N short JSONL records, then
//! measures (a) the JSONL reader alone — the parse-only baseline — and (b) a
//! full `cloister dataset import` through the authorization point into a
//! fresh environment: records/s, and the process's peak resident memory.
//! Run it in separate processes for different N to see that memory does
//! not grow with the file.
//!
//! `store-bench audit --writers W --appends N`: durable audit appends from W
//! concurrent threads (group commit), against one writer in the same run:
//! appends/s and latency percentiles.
//!
//! `store-bench processes --store URL --processes 1,2,4`: durable audit
//! appends into one PostgreSQL environment from several processes at once
//! (each opens it as a reader, whose writes are audit appends, and appends
//! from its own threads), against one process on sled in the same run:
//! what a log shared by several processes costs.

#![allow(clippy::print_stdout)]

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use cloister_host::audit::{AuditRecord, Decision};
use cloister_host::policy::Role;
use cloister_host::records::{RecordSource, Schema};
use cloister_host::service::{Cloister, ImportOptions};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn generate(path: &Path, n: u64) -> Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    const WORDS: [&str; 8] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    ];
    for i in 0..n {
        let a = WORDS[(i % 8) as usize];
        let b = WORDS[((i / 8) % 8) as usize];
        if i % 4 == 0 {
            writeln!(w, "{{\"id\":\"r{i}\",\"text\":\"{a} {b} message {i}\"}}")?;
        } else {
            writeln!(
                w,
                "{{\"id\":\"r{i}\",\"text\":\"{a} {b} message {i}\",\"label\":\"{}\"}}",
                if i % 3 == 0 { "spam" } else { "ham" }
            )?;
        }
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

fn import(records: u64, keep: bool, store: &str, objects: Option<String>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("records.jsonl");
    let bytes = generate(&file, records)?;
    println!(
        "input: {records} records, {:.1} MiB ({} bytes/record)",
        bytes as f64 / 1048576.0,
        bytes / records.max(1)
    );

    let t = Instant::now();
    let mut reader =
        cloister_host::records::open(&file, Schema::default())?.without_duplicate_check();
    let mut n = 0u64;
    for r in reader.by_ref() {
        r?;
        n += 1;
    }
    let parse_s = t.elapsed().as_secs_f64();
    let _ = reader.line();
    println!(
        "baseline, parse only: {n} records in {parse_s:.2} s = {:.0} records/s",
        n as f64 / parse_s
    );

    let options = cloister_host::env_config::InitOptions {
        store: store.to_string(),
        store_ca: None,
        objects,
        workers: false,
    };
    let (c, root) = Cloister::init_with_options(&dir.path().join("env"), "root", &options)?;
    println!(
        "store: {}; objects: {}",
        c.store_location(),
        options.objects.as_deref().unwrap_or("none")
    );
    let admin = c.authenticate(&root)?;
    let (sci, _) = c.add_user(&admin, "sci", &[Role::Scientist])?;
    let rss_before = peak_rss_mib();
    let t = Instant::now();
    let v = c.import_dataset(&sci, "bench", &file, &ImportOptions::default())?;
    let import_s = t.elapsed().as_secs_f64();
    if v.stats.records != records {
        bail!("imported {} of {records} records", v.stats.records);
    }
    let rate = records as f64 / import_s;
    println!(
        "import (durable, atomic): {records} records in {import_s:.2} s = {rate:.0} records/s ({:.2}x of parse-only)",
        rate / (n as f64 / parse_s)
    );
    println!(
        "peak RSS: {:.0} MiB (before the import: {rss_before:.0} MiB)",
        peak_rss_mib()
    );
    if keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn audit_run(c: &Cloister, writers: usize, per_writer: usize) -> Result<(f64, Vec<Duration>)> {
    let t = Instant::now();
    let lat = std::thread::scope(|s| -> Result<Vec<Duration>> {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut lat = Vec::with_capacity(per_writer);
                    for n in 0..per_writer {
                        let t = Instant::now();
                        c.env()
                            .audit()
                            .append(bench_record(&format!("writer{w}"), n))?;
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??);
        }
        Ok(all)
    })?;
    let secs = t.elapsed().as_secs_f64();
    let mut lat = lat;
    lat.sort();
    Ok(((writers * per_writer) as f64 / secs, lat))
}

fn audit(writers: usize, appends: usize, store: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (c, root) = Cloister::init_with(&dir.path().join("env"), "root", store)?;
    println!("store: {}", c.store_location());
    let admin = c.authenticate(&root)?;
    let report = |label: &str, rate: f64, lat: &[Duration]| {
        println!(
            "{label}: {rate:.0} appends/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            percentile(lat, 1.0)
        );
    };
    let (base, lat1) = audit_run(&c, 1, (appends / 4).max(100))?;
    report("baseline, 1 writer (one flush per append)", base, &lat1);
    let (rate, lat) = audit_run(&c, writers, appends / writers)?;
    report(
        &format!("{writers} concurrent writers (group commit)"),
        rate,
        &lat,
    );
    println!("ratio concurrent/baseline: {:.1}x", rate / base);

    // The whole authorization point: policy evaluation + durable append.
    let t = Instant::now();
    let ops = 2000;
    std::thread::scope(|s| {
        for _ in 0..writers {
            s.spawn(|| {
                for _ in 0..ops / writers {
                    let _ = c.list_datasets(&admin);
                }
            });
        }
    });
    println!(
        "authorized + audited operations ({writers} threads): {:.0} ops/s",
        ops as f64 / t.elapsed().as_secs_f64()
    );
    match c.env().audit().verify(None)? {
        cloister_host::audit::Verdict::Intact { size, .. } => {
            println!("log verifies: {size} entries")
        }
        v => bail!("the log does not verify after the benchmark: {v:?}"),
    }
    Ok(())
}

fn bench_record(who: &str, n: usize) -> AuditRecord {
    AuditRecord {
        actor: who.to_string(),
        action: "bench".into(),
        resource: format!("Dataset::\"d{n}\""),
        decision: Decision::Allow,
        policies: vec!["bench".into()],
        params: "0".repeat(64),
        outcome: None,
        serving: None,
        account: None,
    }
}

/// One appending process of `processes`: opens the environment for
/// writing beside the others (as a CLI command beside `serve` does), says
/// `ready`, waits for `go` on stdin, appends from `writers` threads, and
/// prints its latencies in microseconds.
fn append_child(env: &Path, writers: usize, appends: usize) -> Result<()> {
    let c = Cloister::open(env, "cli")?;
    let who = format!("process{}", std::process::id());
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let lat = std::thread::scope(|s| -> Result<Vec<Duration>> {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                let who = &who;
                let c = &c;
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut lat = Vec::new();
                    for n in 0..appends / writers {
                        let t = Instant::now();
                        c.env().audit().append(bench_record(who, n))?;
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??);
        }
        Ok(all)
    })?;
    let text: Vec<String> = lat.iter().map(|d| d.as_micros().to_string()).collect();
    println!("{}", text.join(" "));
    Ok(())
}

/// `processes` appending processes into the environment at `env`: the
/// rate over the wall time from `go` to the last one's end, and every
/// append's latency.
fn processes_run(
    env: &Path,
    processes: usize,
    writers: usize,
    appends: usize,
) -> Result<(f64, Vec<Duration>)> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let me = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..processes {
        let mut child = Command::new(&me)
            .args(["append-child", "--env"])
            .arg(env)
            .args(["--writers", &writers.to_string()])
            .args(["--appends", &(appends / processes).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
        );
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("an appending process did not start: {line}");
        }
        children.push((child, out));
    }
    let t = Instant::now();
    for (child, _) in &mut children {
        let stdin = child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
    }
    let mut lat = Vec::new();
    for (mut child, mut out) in children {
        let mut line = String::new();
        out.read_line(&mut line)?;
        if !child.wait()?.success() {
            bail!("an appending process failed");
        }
        for us in line.split_whitespace() {
            lat.push(Duration::from_micros(us.parse()?));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    lat.sort();
    Ok((lat.len() as f64 / secs, lat))
}

fn processes(store: &str, counts: &[usize], writers: usize, appends: usize) -> Result<()> {
    let report = |label: &str, rate: f64, lat: &[Duration]| {
        println!(
            "{label}: {rate:.0} appends/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            percentile(lat, 1.0)
        );
    };
    let dir = tempfile::tempdir()?;
    let sled_env = dir.path().join("sled");
    drop(Cloister::init(&sled_env, "root")?);
    let (sled_rate, lat) = processes_run(&sled_env, 1, writers, appends)?;
    report(
        &format!("sled, 1 process x {writers} threads"),
        sled_rate,
        &lat,
    );
    let pg_env = dir.path().join("pg");
    let (c, _) = Cloister::init_with(&pg_env, "root", store)?;
    println!("store: {}", c.store_location());
    drop(c);
    let mut first = None;
    for &p in counts {
        let (rate, lat) = processes_run(&pg_env, p, writers, appends)?;
        let base = *first.get_or_insert(rate);
        report(
            &format!(
                "PostgreSQL, {p} process(es) x {writers} threads ({:.2}x 1 process, {:.2}x sled)",
                rate / base,
                rate / sled_rate
            ),
            rate,
            &lat,
        );
    }
    let c = Cloister::open(&pg_env, "cli")?;
    match c.env().audit().verify(None)? {
        cloister_host::audit::Verdict::Intact { size, .. } => {
            println!("the shared log verifies: {size} entries")
        }
        v => bail!("the shared log does not verify after the benchmark: {v:?}"),
    }
    Ok(())
}

/// Store and audit benchmarks.
#[derive(Debug, clap::Parser)]
#[command(name = "store-bench")]
enum Bench {
    /// Generated JSONL records: the reader alone, then a full import.
    Import {
        /// Records to generate.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Keep the generated file and environment.
        #[arg(long)]
        keep: bool,
        /// The store: `sled` or a postgres:// URL naming an empty database.
        #[arg(long, default_value = "sled")]
        store: String,
        /// An object store for the segment (file:///PATH).
        #[arg(long)]
        objects: Option<String>,
    },
    /// Durable audit appends from several writers.
    Audit {
        /// Writer threads.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Appends in all.
        #[arg(long, default_value_t = 20_000)]
        appends: usize,
        /// The store: `sled` or a postgres:// URL naming an empty database.
        #[arg(long, default_value = "sled")]
        store: String,
    },
    /// Durable audit appends from several processes sharing one
    /// PostgreSQL environment, against one process on sled.
    Processes {
        /// A postgres:// URL naming an empty database.
        #[arg(long)]
        store: String,
        /// How many processes, one run each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        processes: Vec<usize>,
        /// Appending threads in each process.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Appends in all, per run.
        #[arg(long, default_value_t = 8000)]
        appends: usize,
    },
    /// One process of `processes` (started by it).
    #[command(hide = true)]
    AppendChild {
        #[arg(long)]
        env: std::path::PathBuf,
        #[arg(long)]
        writers: usize,
        #[arg(long)]
        appends: usize,
    },
}

fn main() -> Result<()> {
    match <Bench as clap::Parser>::parse() {
        Bench::Import {
            records,
            keep,
            store,
            objects,
        } => import(records, keep, &store, objects),
        Bench::Audit {
            writers,
            appends,
            store,
        } => audit(writers, appends, &store),
        Bench::Processes {
            store,
            processes: counts,
            writers,
            appends,
        } => processes(&store, &counts, writers, appends),
        Bench::AppendChild {
            env,
            writers,
            appends,
        } => append_child(&env, writers, appends),
    }
}
