//! kill -9 at random points during imports and audit appends. The suite runs
//! `CLOISTER_CRASH_TRIALS` trials of each kind (default 12, so 24 in all);
//! `tests/crash-trials.sh N` runs more.
//!
//! The child is this very test binary, re-run with `CLOISTER_CRASH_CHILD`
//! set, so the work being killed is the real library code.
//!
//! The child reports its progress to the parent on standard output, one
//! protocol line at a time (tests/all/main.rs exempts these lines from the
//! CLI crate's rule that people's output goes through `say!`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cloister_host::audit::{AuditRecord, Decision, Verdict};
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions};
use cloister_host::store::Space;

const CHILD: &str = "CLOISTER_CRASH_CHILD";

pub(crate) fn trials() -> u64 {
    std::env::var("CLOISTER_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// A small deterministic generator, so a failing trial can be rerun.
pub(crate) fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The child's side: does nothing in a normal test run.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (mode, env, file) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap_or(""),
    );
    let c = Cloister::open(Path::new(env), "cli").unwrap();
    let user = c
        .authenticate(&std::env::var("CLOISTER_TOKEN").unwrap())
        .unwrap();
    match mode {
        "audit" => std::thread::scope(|s| {
            for t in 0..4 {
                let c = &c;
                s.spawn(move || {
                    for n in 0.. {
                        let seq = c
                            .env()
                            .audit()
                            .append(AuditRecord {
                                actor: format!("t{t}"),
                                action: format!("n{n}"),
                                resource: "AuditLog::\"main\"".into(),
                                decision: Decision::Allow,
                                policies: vec![],
                                params: String::new(),
                                outcome: None,
                                serving: None,
                                account: None,
                            })
                            .unwrap();
                        println!("ack {seq} t{t} n{n}");
                    }
                });
            }
        }),
        "import" => loop {
            let v = c
                .import_dataset(&user, "ds", Path::new(file), &ImportOptions::default())
                .unwrap();
            println!("committed {} {} {}", v.version, v.digest, v.stats.records);
        },
        other => panic!("unknown mode {other}"),
    }
}

/// Runs the child until it has acknowledged something, waits a random
/// while, kills it with SIGKILL and returns the acknowledgement lines.
fn run_and_kill(spec: &str, token: &str, seed: &mut u64, wait_first: bool) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash::crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, spec)
        .env("CLOISTER_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // libtest prints "test crash::crash_child ... " without a
            // newline before the test runs, so the child's first line
            // arrives behind it: look for the marker anywhere in the line.
            let at = ["ack ", "committed "]
                .iter()
                .filter_map(|m| line.find(m))
                .min();
            if let Some(at) = at {
                let _ = tx.send(());
                lines.push(line[at..].to_string());
            }
        }
        lines
    });
    if wait_first {
        // Wait for the first acknowledgement (the child is up and working)…
        let _ = rx.recv_timeout(Duration::from_secs(60));
    } else {
        std::thread::sleep(Duration::from_millis(50));
    }
    // …then kill it at a random point.
    std::thread::sleep(Duration::from_millis(rand(seed) % 400));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

#[test]
fn kill_9_during_audit_appends_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env");
    let (c, token) = Cloister::init(&path, "root").unwrap();
    drop(c);
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    for trial in 0..trials() {
        let acks = run_and_kill(
            &format!("audit|{}", path.display()),
            &token,
            &mut seed,
            true,
        );
        assert!(
            !acks.is_empty(),
            "trial {trial}: the child acknowledged nothing"
        );
        let c = Cloister::open(&path, "cli").unwrap();
        match c.env().audit().verify(None).unwrap() {
            Verdict::Intact { .. } => {}
            v => panic!("trial {trial}: {v:?}"),
        }
        for ack in &acks {
            let f: Vec<&str> = ack.split(' ').collect();
            let seq: u64 = f[1].parse().unwrap();
            let raw = c
                .env()
                .store()
                .get(Space::Audit, &seq.to_be_bytes())
                .unwrap();
            let raw = raw.unwrap_or_else(|| panic!("trial {trial}: acknowledged entry {seq} lost"));
            let entry: cloister_host::audit::AuditEntry =
                serde_json::from_slice(&raw[32..]).unwrap();
            assert_eq!(
                (entry.record.actor.as_str(), entry.record.action.as_str()),
                (f[2], f[3]),
                "trial {trial}"
            );
        }
        // The environment works after the crash.
        let admin = c.authenticate(&token).unwrap();
        c.list_users(&admin).unwrap();
    }
}

#[test]
fn kill_9_during_imports_leaves_only_whole_versions() {
    let dir = tempfile::tempdir().unwrap();
    let records = 5000;
    let text: String = (0..records).map(|i| format!("{{\"id\": \"r{i}\", \"text\": \"row {i} of the crash test\", \"label\": \"c{}\"}}\n", i % 2)).collect();
    let file = dir.path().join("data.jsonl");
    std::fs::write(&file, text).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1d;
    for trial in 0..trials() {
        let path = dir.path().join(format!("env{trial}"));
        let (c, root) = Cloister::init(&path, "root").unwrap();
        let admin = c.authenticate(&root).unwrap();
        let (_, token) = c.add_user(&admin, "sci", &[Role::Scientist]).unwrap();
        drop(c);
        // Odd trials may die inside the very first import.
        let acks = run_and_kill(
            &format!("import|{}|{}", path.display(), file.display()),
            &token,
            &mut seed,
            trial % 2 == 0,
        );
        if trial % 2 == 0 {
            // The kill came after the first acknowledgement, so it was read.
            assert!(
                acks.first().is_some_and(|a| a.starts_with("committed 1 ")),
                "trial {trial}: {acks:?}"
            );
        }
        let c = Cloister::open(&path, "cli").unwrap();
        let sci = c.authenticate(&token).unwrap();
        let versions = c.list_datasets(&sci).unwrap();
        for ack in &acks {
            let f: Vec<&str> = ack.split(' ').collect();
            let v: u32 = f[1].parse().unwrap();
            let found = versions
                .iter()
                .find(|x| x.version == v)
                .unwrap_or_else(|| panic!("trial {trial}: committed version {v} lost"));
            assert_eq!(found.digest, f[2], "trial {trial}");
        }
        // At most one version (the one being committed at the kill) may
        // lack an acknowledgement.
        assert!(
            versions.len() >= acks.len() && versions.len() <= acks.len() + 1,
            "trial {trial}: versions {:?}, acknowledged {acks:?}",
            versions.iter().map(|v| v.version).collect::<Vec<_>>()
        );
        for v in &versions {
            assert_eq!(
                v.stats.records, records,
                "trial {trial}: partial version {}",
                v.version
            );
            let n = cloister_host::datasets::records(c.env(), v).count() as u64;
            assert_eq!(
                n, records,
                "trial {trial}: version {} has {n} records",
                v.version
            );
        }
        let files = |dir: &str| -> Vec<String> {
            std::fs::read_dir(path.join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let segments = files("datasets");
        assert_eq!(
            segments.len(),
            versions.len(),
            "trial {trial}: leftovers of an unfinished import: {segments:?}"
        );
        assert!(
            segments.iter().all(|f| f.ends_with(".seg")),
            "trial {trial}: {segments:?}"
        );
        assert!(files("tmp").is_empty(), "trial {trial}: scratch files left");
        assert_eq!(
            c.env().store().scan(Space::Imports, b"").count(),
            0,
            "trial {trial}"
        );
        assert!(
            matches!(
                c.env().audit().verify(None).unwrap(),
                Verdict::Intact { .. }
            ),
            "trial {trial}"
        );
        // A new import works after the crash.
        c.import_dataset(&sci, "ds", &file, &ImportOptions::default())
            .unwrap();
    }
}
