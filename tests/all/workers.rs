//! Plugin stages and model fits on `cloister worker` processes (issue
//! 21): the work queue in PostgreSQL, tasks and results through the
//! object store, leases that hand a dead worker's task to another, and
//! the same features, audit entries and model as a run in the process.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use cloister_host::env_config::InitOptions;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError, TrainRequest};
use cloister_host::users::User;

use crate::postgres::{PgServer, failed_with};

/// An environment: its path, an administrator, a scientist, a reviewer,
/// the approved featurizer and preprocessor.
struct Env {
    path: PathBuf,
    cloister: Cloister,
    admin: User,
    sci: User,
    /// The scientist's token, for the command line.
    sci_token: String,
    rev: User,
    features: String,
    normalize: String,
}

/// SpamAssassin, one record in `step`, as JSONL in `dir`.
fn data(dir: &Path, step: usize) -> PathBuf {
    let path = dir.join(format!("spam-{step}.jsonl"));
    let mut f = std::fs::File::create(&path).unwrap();
    for r in crate::support::spamassassin().iter().step_by(step) {
        let v = serde_json::json!({"id": r.id, "text": r.text("text").unwrap(), "label": r.label.clone().unwrap()});
        writeln!(f, "{v}").unwrap();
    }
    path
}

fn setup(dir: &Path, name: &str, options: &InitOptions, step: usize) -> Env {
    let path = dir.join(name);
    let (c, root) = Cloister::init_with_options(&path, "root", options).unwrap();
    let admin = c.authenticate(&root).unwrap();
    let (sci, sci_token) = c.add_user(&admin, "sci", &[Role::Scientist]).unwrap();
    let rev = c.add_user(&admin, "rev", &[Role::Reviewer]).unwrap().0;
    c.import_dataset(&sci, "spam", &data(dir, step), &ImportOptions::default())
        .unwrap();
    let mut digests = Vec::new();
    for name in ["hashed-ngrams", "text-normalize", "dual-agree"] {
        let e = c
            .add_plugin(&sci, cloister_bundled_plugins::get(name).unwrap())
            .unwrap();
        c.approve_plugin(&rev, &e.digest).unwrap();
        digests.push(e.digest);
    }
    Env {
        path,
        cloister: c,
        admin,
        sci,
        sci_token,
        rev,
        normalize: digests.swap_remove(1),
        features: digests.swap_remove(0),
    }
}

impl Env {
    /// Registers and approves a plugin; its digest.
    fn approved(&self, bytes: &[u8]) -> String {
        let p = self.cloister.add_plugin(&self.sci, bytes).unwrap();
        self.cloister.approve_plugin(&self.rev, &p.digest).unwrap();
        p.digest
    }

    /// (stage, code, records in, records out) of every plugin call audited.
    fn plugin_calls(&self) -> Vec<(String, String, u64, u64)> {
        crate::support::plugin_calls(&self.cloister, &self.admin)
            .into_iter()
            .map(|o| (o.stage, o.code, o.records_in, o.records_out))
            .collect()
    }
}

/// Records per stage task in the environments on workers (the smallest
/// shard: the 756 records of `step` 8 are three tasks).
const SHARD: u64 = 256;

/// An environment on `pg` whose plugin stages and fits go to workers,
/// with its own private object store directory, and stage tasks of
/// [`SHARD`] records.
fn on_workers(pg: &PgServer, dir: &Path, step: usize) -> Env {
    let objects = dir.join("objects");
    std::fs::create_dir(&objects).unwrap();
    std::fs::set_permissions(
        &objects,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let options = InitOptions {
        store: pg.database("work"),
        objects: Some(format!("file://{}", objects.display())),
        workers: true,
        ..InitOptions::default()
    };
    let mut e = setup(dir, "env", &options, step);
    let toml = e.path.join("cloister.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("stage_records = 2048"), "{text}");
    std::fs::write(
        &toml,
        text.replace("stage_records = 2048", &format!("stage_records = {SHARD}")),
    )
    .unwrap();
    drop(e.cloister);
    e.cloister = Cloister::open(&e.path, "cli").unwrap();
    e
}

fn request(features: &str, template: &str, epochs: u32) -> TrainRequest {
    TrainRequest {
        dataset: "spam".into(),
        preprocess: vec![],
        preprocess_config: Vec::new(),
        features: features.into(),
        features_config: Vec::new(),
        template: template.into(),
        sets: vec![
            ("epochs".into(), epochs.to_string()),
            ("patience".into(), epochs.to_string()),
        ],
        split_seed: Some(7),
    }
}

fn try_train(e: &Env, req: &TrainRequest) -> Result<(String, f64), ServiceError> {
    let m = e.cloister.train_model(&e.sci, req, &mut |_| {})?;
    Ok((m.weights_sha256, m.evaluation.accuracy))
}

/// `cloister worker` for the environment at `env`, its output piped.
fn worker(env: &Path, name: &str, lease: u64, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cloister"))
        .env("CLOISTER_ENV", env)
        .args(["worker", "--name", name])
        .args(["--lease-seconds", &lease.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A worker that takes one task (or fails to start), run to its end.
fn run_once(env: &Path, name: &str) -> std::process::Output {
    worker(env, name, 3, &["--max-tasks", "1"])
        .wait_with_output()
        .unwrap()
}

/// Stops a worker and returns what it printed.
fn stop(mut w: Child) -> String {
    let _ = w.kill();
    let out = w.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The same data in an environment on workers (two of them running) and
/// in one that fits in its own process (sled).
fn remote_and_here(pg: &PgServer, dir: &Path) -> (Env, Env, [Child; 2]) {
    let remote = on_workers(pg, dir, 8);
    let here = setup(dir, "here", &InitOptions::default(), 8);
    let workers = [
        worker(&remote.path, "w1", 10, &[]),
        worker(&remote.path, "w2", 10, &[]),
    ];
    (remote, here, workers)
}

#[test]
fn stages_and_fits_on_two_workers_give_the_features_audit_and_models_of_the_process() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (remote, here, workers) = remote_and_here(&pg, dir.path());
    for template in ["logreg", "mlp"] {
        let req = request(&remote.features, template, 4);
        let got = try_train(&remote, &req).unwrap();
        let want = try_train(&here, &request(&here.features, template, 4)).unwrap();
        assert_eq!(got, want, "{template}: weights digest and accuracy");
    }
    // A preprocessor and a fitted featurizer: preprocessing, the fit's term
    // counts and featurizing each run in shards on the workers; joined,
    // they are what one run in the process gives — the same vocabulary
    // (its digest) and the same model.
    let tfidf = cloister_bundled_plugins::get("tfidf").unwrap();
    let chained = |e: &Env| {
        let req = TrainRequest {
            preprocess: vec![e.normalize.clone()],
            preprocess_config: Vec::new(),
            ..request(&e.approved(tfidf), "logreg", 4)
        };
        let m = e.cloister.train_model(&e.sci, &req, &mut |_| {}).unwrap();
        (
            m.weights_sha256,
            m.evaluation.accuracy,
            m.lineage.features_state.expect("a fitted state"),
        )
    };
    assert_eq!(chained(&remote), chained(&here));
    // The audit says the same of every stage: its code and its records in
    // and out, whichever process ran it.
    let calls = remote.plugin_calls();
    assert_eq!(calls, here.plugin_calls());
    let printed: String = workers.into_iter().map(stop).collect();
    assert_eq!(printed.matches("(fit): done in").count(), 3, "{printed}");
    // Every stage that ran (not from the cache) was cut into tasks of
    // SHARD records, each done by a worker.
    let tasks: u64 = calls
        .iter()
        .filter(|(_, code, _, _)| code == "ok")
        .map(|(_, _, records_in, _)| records_in.div_ceil(SHARD).max(1))
        .sum();
    assert!(tasks >= 3 + 3 + 2 + 3, "{calls:?}");
    assert_eq!(
        printed.matches("(stage): done in").count() as u64,
        tasks,
        "{printed}"
    );
    // The rows are gone once taken, and so are the tasks' and results' own
    // objects; the features stay for the next fit that shares them.
    assert_eq!(pg.psql("work", "SELECT count(*) FROM cloister_work"), "0");
    let mut heads = Vec::new();
    for shard in std::fs::read_dir(dir.path().join("objects/sha256")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            heads.push(bytes[..bytes.len().min(10)].to_vec());
        }
    }
    assert!(heads.iter().any(|h| h.starts_with(b"CLFEAT1\n")));
    assert!(
        !heads.iter().any(|h| h.starts_with(b"CLFRES1\n")
            || h.starts_with(b"{\"nonce\"")
            || h.starts_with(b"CLSTSK1\n")
            || h.starts_with(b"CLSRES1\n")),
        "a task or result object was left behind"
    );
}

#[test]
fn a_plugin_that_breaks_its_rules_on_a_worker_fails_as_it_does_in_the_process() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (remote, here, workers) = remote_and_here(&pg, dir.path());
    let run = |e: &Env| {
        let hostile = e.approved(cloister_test_plugins::HOSTILE);
        let req = TrainRequest {
            features_config: vec![("attack".into(), "out-of-range".into())],
            ..request(&hostile, "logreg", 2)
        };
        let err = try_train(e, &req).unwrap_err().to_string();
        let log = e.cloister.plugin_log(&e.admin, None, 0).unwrap();
        let newest = log.first().expect("a plugin log entry").clone();
        (err, newest.code, newest.detail, e.plugin_calls())
    };
    let (err, code, detail, calls) = run(&remote);
    assert_eq!(
        (err.clone(), code.clone(), detail.clone(), calls.clone()),
        run(&here)
    );
    // The user is told what the host says of the output; the index the
    // plugin chose is in the administrators' log only.
    assert!(err.contains("breaks the plugin interface's rules"), "{err}");
    assert!(!err.contains("1048576"), "{err}");
    assert_eq!(code, "invalid-output");
    let detail = detail.expect("the failure's detail");
    assert!(
        detail.contains("feature index 1048576 is out of range"),
        "{detail}"
    );
    assert_eq!(calls.last().map(|c| c.1.as_str()), Some("invalid-output"));
    let printed: String = workers.into_iter().map(stop).collect();
    assert!(printed.contains("(stage): done in"), "{printed}");
    assert!(!printed.contains("(fit)"), "nothing was fitted: {printed}");
}

#[test]
fn a_worker_killed_mid_stage_leaves_its_shard_to_another_and_the_model_is_the_same() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let remote = on_workers(&pg, dir.path(), 8);
    let here = setup(dir.path(), "here", &InitOptions::default(), 8);
    let want = try_train(&here, &request(&here.features, "logreg", 4)).unwrap();
    let mut first = worker(&remote.path, "first", 3, &[]);
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let got = std::thread::scope(|s| {
        let training = s.spawn(|| try_train(&remote, &request(&remote.features, "logreg", 4)));
        // The first worker claims a shard of the featurizing stage (its
        // first task: it compiles the plugin before it runs it) and dies.
        let claimed = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.contains("(stage): claimed"));
        assert!(claimed.is_some(), "the first worker never claimed a stage");
        first.kill().unwrap();
        first.wait().unwrap();
        // A second worker takes the other shards at once, and the dead
        // worker's shard once its lease has run out; then the fit.
        let second = worker(&remote.path, "second", 3, &[]);
        let got = training.join().unwrap();
        let printed = stop(second);
        assert!(
            printed.contains("(stage): claimed (attempt 2)"),
            "{printed}"
        );
        assert!(printed.contains("(fit): done in"), "{printed}");
        got
    });
    assert_eq!(got.unwrap(), want, "the same model as in the process");
    // One audit entry for the stage, as in the process: not one per attempt.
    assert_eq!(remote.plugin_calls(), here.plugin_calls());
}

#[test]
fn a_worker_killed_mid_fit_leaves_its_task_to_another_and_the_model_is_the_same() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let remote = on_workers(&pg, dir.path(), 2);
    let here = setup(dir.path(), "here", &InitOptions::default(), 2);
    // Long enough that the kill lands while the first worker fits.
    let epochs = 40;
    let want = try_train(&here, &request(&here.features, "mlp", epochs)).unwrap();

    let mut first = worker(&remote.path, "first", 3, &[]);
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let got = std::thread::scope(|s| {
        let training = s.spawn(|| try_train(&remote, &request(&remote.features, "mlp", epochs)));
        // The first worker runs the plugin stages, then claims the fit; it
        // dies at once, mid-fit.
        let claimed = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.contains("(fit): claimed"));
        assert!(claimed.is_some(), "the first worker never claimed the task");
        first.kill().unwrap();
        first.wait().unwrap();
        let state = pg.psql("work", "SELECT state, attempts, owner FROM cloister_work");
        assert_eq!(
            state, "running|1|first",
            "the dead worker still holds the task"
        );
        // A second worker takes it once the lease has run out.
        let second = worker(&remote.path, "second", 3, &["--max-tasks", "1"]);
        let got = training.join().unwrap();
        let out = second.wait_with_output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(printed.contains("claimed (attempt 2)"), "{printed}");
        assert!(printed.contains("done in"), "{printed}");
        assert!(out.status.success(), "{printed}");
        got
    });
    assert_eq!(got.unwrap(), want, "the same model as a fit in the process");

    // A worker told to stop (SIGTERM, as Kubernetes does) while it fits
    // finishes the fit, records it and exits: attempt 1, nobody waits for
    // a lease to run out.
    let mut polite = worker(&remote.path, "polite", 3, &[]);
    let mut lines = BufReader::new(polite.stdout.take().unwrap()).lines();
    let mut shown = Vec::new();
    let got = std::thread::scope(|s| {
        let training = s.spawn(|| {
            let req = request(&remote.features, "mlp", epochs);
            let m = remote.cloister.train_model(&remote.sci, &req, &mut |p| {
                if let cloister_host::service::TrainProgress::Epoch(stats, _) = p {
                    shown.push(stats.epoch);
                }
            })?;
            Ok::<_, ServiceError>((m.weights_sha256, m.evaluation.accuracy))
        });
        // The features come from the cache: the fit is the only task.
        let claimed = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.contains("claimed"))
            .expect("the worker never claimed the task");
        assert!(claimed.contains("(fit)"), "{claimed}");
        assert!(claimed.contains("(attempt 1)"), "{claimed}");
        let signalled = Command::new("kill")
            .args(["-TERM", &polite.id().to_string()])
            .status()
            .unwrap();
        assert!(signalled.success());
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        let status = polite.wait().unwrap();
        assert!(status.success(), "{rest:?}");
        assert!(rest.iter().any(|l| l.starts_with("stopping")), "{rest:?}");
        assert!(rest.iter().any(|l| l.contains("done in")), "{rest:?}");
        assert!(
            rest.iter().any(|l| l.ends_with(": 1 tasks done")),
            "{rest:?}"
        );
        training.join().unwrap()
    });
    assert_eq!(got.unwrap(), want, "the same model as a fit in the process");
    // The worker's epochs reached the operation while it fitted: some of
    // them (reports are at most every 250 ms), in order, none made up.
    assert!(!shown.is_empty(), "no epoch was shown");
    assert!(shown.windows(2).all(|w| w[0] < w[1]), "{shown:?}");
    assert!(shown.iter().all(|e| (1..=epochs).contains(e)), "{shown:?}");
}

/// A worker whose printed lines are collected as they come, each with
/// the time it came; [`stop_timed`] ends it.
fn timed_worker(
    env: &Path,
    name: &str,
    lease: u64,
) -> (Child, std::thread::JoinHandle<Vec<(Instant, String)>>) {
    let mut child = worker(env, name, lease, &[]);
    let out = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .map(|l| (Instant::now(), l))
            .collect()
    });
    (child, lines)
}

fn stop_timed(
    (mut child, lines): (Child, std::thread::JoinHandle<Vec<(Instant, String)>>),
) -> Vec<(Instant, String)> {
    let _ = child.kill();
    let _ = child.wait();
    lines.join().unwrap()
}

#[test]
fn a_plugin_slower_to_compile_than_the_lease_is_still_one_claim_per_task() {
    // A worker compiles a plugin the first time a task needs it; a
    // CPython component takes longer to compile than a 3-second lease.
    // The lease is renewed from the claim on, through the fetch and the
    // compile, so no other worker takes the task meanwhile.
    let Some(pg) = PgServer::start() else { return };
    let Some(words) = crate::python::build("plugins/python/hashed-words", "featurizer") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let remote = on_workers(&pg, dir.path(), 8);
    let words = remote.approved(&words);
    let lease = 3;
    let workers = [
        timed_worker(&remote.path, "w1", lease),
        timed_worker(&remote.path, "w2", lease),
    ];
    let req = TrainRequest {
        features_config: vec![("bits".into(), "12".into())],
        ..request(&words, "logreg", 2)
    };
    let trained = try_train(&remote, &req);
    let printed: Vec<Vec<(Instant, String)>> = workers.into_iter().map(stop_timed).collect();
    let all: Vec<&str> = printed.iter().flatten().map(|(_, l)| l.as_str()).collect();
    trained.unwrap_or_else(|e| panic!("{e}: {all:#?}"));
    assert!(
        all.iter().any(|l| l.contains("(stage): done in")),
        "{all:#?}"
    );
    assert!(
        !all.iter().any(|l| l.contains("(attempt 2)")),
        "a task was claimed again while its first worker prepared it: {all:#?}"
    );
    // Whether this run exercised what it is about: a first stage task
    // that took its worker longer than the lease from claim to done.
    let slowest = printed
        .iter()
        .filter_map(|lines| {
            let claimed = lines
                .iter()
                .find(|(_, l)| l.contains("(stage): claimed"))?
                .0;
            let done = lines
                .iter()
                .find(|(_, l)| l.contains("(stage): done in"))?
                .0;
            Some(done.duration_since(claimed))
        })
        .max();
    eprintln!("the slowest first stage task, claim to done: {slowest:?} (lease {lease} s)");
}

#[test]
fn a_fit_no_worker_takes_fails_in_time_and_forged_tasks_are_refused() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut e = on_workers(&pg, dir.path(), 8);
    let toml = e.path.join("cloister.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("[workers]"), "{text}");
    std::fs::write(
        &toml,
        text.replace("claim_timeout_seconds = 300", "claim_timeout_seconds = 1"),
    )
    .unwrap();
    drop(e.cloister);
    e.cloister = Cloister::open(&e.path, "cli").unwrap();
    let err = try_train(&e, &request(&e.features, "logreg", 2)).unwrap_err();
    assert!(
        err.to_string().contains("no worker took task")
            && err.to_string().contains("cloister worker"),
        "{err}"
    );
    assert_eq!(
        pg.psql("work", "SELECT count(*) FROM cloister_work"),
        "0",
        "the abandoned task is not left behind"
    );

    // A task row written without the environment's key: the worker
    // refuses it, and says why.
    let input = "ab".repeat(32);
    pg.psql(
        "work",
        &format!(
            "INSERT INTO cloister_work (kind, input, tag, state, max_attempts)
             VALUES ('fit', '{input}', '\\x00', 'queued', 3)"
        ),
    );
    let out = run_once(&e.path, "w");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("failed") && printed.contains("does not carry the environment's tag"),
        "{printed}"
    );
    assert_eq!(pg.psql("work", "SELECT state FROM cloister_work"), "failed");

    // A fit that fails on the worker for a reason another attempt would
    // repeat (over the memory budget) fails the operation at once, naming
    // the worker.
    drop(e.cloister);
    std::fs::write(&toml, &text).unwrap();
    let limits = e.path.join("limits.toml");
    let l = std::fs::read_to_string(&limits).unwrap();
    assert!(l.contains("memory_budget_mb = 4096"), "{l}");
    std::fs::write(
        &limits,
        l.replace("memory_budget_mb = 4096", "memory_budget_mb = 1"),
    )
    .unwrap();
    e.cloister = Cloister::open(&e.path, "cli").unwrap();
    let w = worker(&e.path, "small", 3, &[]);
    let err = try_train(&e, &request(&e.features, "mlp", 2)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the fit failed on worker small:")
            && err.to_string().contains("budget"),
        "{err}"
    );
    let printed = stop(w);
    assert!(printed.contains("(stage): done in"), "{printed}");
    std::fs::write(&limits, l).unwrap();

    // A worker given the configuration without the work key does not
    // make one of its own (its results would be refused): it stops.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(&toml, bare.join("cloister.toml")).unwrap();
    let out = run_once(&bare, "w");
    let said = failed_with(&out, "keys/work.key: ");
    assert!(said.contains("copy it from the environment's"), "{said}");
    assert!(!bare.join("keys").exists());

    // Workers are refused for an environment without [workers].
    drop(e.cloister);
    std::fs::write(&toml, text.replace("enabled = true", "enabled = false")).unwrap();
    let out = run_once(&e.path, "w");
    failed_with(&out, "workers.enabled is not set");
}

#[test]
fn an_active_learning_job_on_workers_ends_as_the_job_in_the_process() {
    use cloister_host::jobs::Oracle;
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (remote, here, workers) = remote_and_here(&pg, dir.path());
    let spec = crate::active_learning::SPEC;
    let run = |e: &Env| {
        let job = e
            .cloister
            .start_job(&e.sci, "t.toml", spec, Some(Oracle::Gold))
            .unwrap();
        e.cloister.run_job(&e.sci, &job.id, &mut |_| {}).unwrap();
        crate::active_learning::outcome(&e.cloister, &e.sci, &job.id)
    };
    let got = run(&remote);
    let want = run(&here);
    assert_eq!(got, want);
    let printed: String = workers.into_iter().map(stop).collect();
    // Two members per round, every round and the final models; the
    // plugin stages as well.
    assert!(printed.contains("(stage): done in"), "{printed}");
    let fits = printed.matches("(fit): done in").count();
    assert!(fits >= 2 * (got.0.len() - 1), "{fits} fits\n{printed}");
    for w in ["w1", "w2"] {
        assert!(
            printed.contains(&format!("worker {w}: waiting")),
            "{printed}"
        );
    }
}

/// The objects in an environment's object store directory whose content
/// starts with `head`, by digest.
fn objects_starting(dir: &Path, head: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(dir.join("objects/sha256")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let f = f.unwrap();
            if std::fs::read(f.path()).unwrap().starts_with(head) {
                found.push(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

fn object_exists(dir: &Path, digest: &str) -> bool {
    dir.join("objects/sha256")
        .join(&digest[..2])
        .join(digest)
        .exists()
}

#[test]
fn shared_objects_no_one_keeps_and_abandoned_tasks_are_collected_by_idle_workers() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let e = on_workers(&pg, dir.path(), 8);
    let w = worker(&e.path, "w1", 10, &[]);
    let first = try_train(&e, &request(&e.features, "logreg", 2)).unwrap();
    stop(w);
    // The features stay, kept by a row with the environment's tag, until
    // the keep time (an hour by default) after the operation's last wait.
    let features = objects_starting(dir.path(), b"CLFEAT1\n");
    assert_eq!(features.len(), 1, "{features:?}");
    assert_eq!(
        pg.psql(
            "work",
            "SELECT digest, keep_until > now() + interval '50 minutes' FROM cloister_work_objects"
        ),
        format!("{}|t", features[0])
    );

    // An operation whose process dies while its fit waits for a worker
    // (none runs): its task row and task object stay behind.
    let mut cli = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .env("CLOISTER_ENV", &e.path)
        .env("CLOISTER_TOKEN", &e.sci_token)
        .args(["train", "--dataset", "spam", "--features", &e.features])
        .args(["--template", "mlp", "--split-seed", "7"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while pg.psql(
        "work",
        "SELECT count(*) FROM cloister_work WHERE kind = 'fit'",
    ) != "1"
    {
        assert!(started.elapsed().as_secs() < 120, "no fit was queued");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cli.kill().unwrap();
    cli.wait().unwrap();
    let abandoned = objects_starting(dir.path(), b"{\"nonce\"");
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    // Time passes: a day, in which its last worker died too (the row is
    // out of claims), and the hour of the features' keep.
    pg.psql(
        "work",
        "UPDATE cloister_work SET state = 'running', owner = 'gone', attempts = max_attempts,
                lease_until = now() - interval '2 days';
         UPDATE cloister_work_objects SET keep_until = now() - interval '1 second'",
    );
    // Rows written by someone with the database and not the work key, to
    // make the collector delete what is not a work object: a plugin's
    // component, named as a shared object and as a task's input and
    // result.
    let segment = objects_starting(dir.path(), b"\0asm")
        .into_iter()
        .next()
        .expect("a plugin's component in the object store");
    pg.psql(
        "work",
        &format!(
            "INSERT INTO cloister_work_objects (digest, tag, keep_until)
             VALUES ('{segment}', '\\x00', now() - interval '1 day');
             INSERT INTO cloister_work (kind, input, tag, state, max_attempts, result, result_tag, finished)
             VALUES ('fit', '{segment}', '\\x00', 'done', 3, '{segment}', '\\x00', now() - interval '2 days')"
        ),
    );

    // An idle worker collects: the features and the abandoned task's
    // object go, the forged rows go without their objects.
    let mut w = worker(&e.path, "w2", 10, &[]);
    let mut lines = BufReader::new(w.stdout.take().unwrap()).lines();
    let said = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("collected"))
        .expect("the worker never collected");
    assert_eq!(
        said,
        "collected: 1 shared objects no longer kept, 1 abandoned tasks"
    );
    assert!(!object_exists(dir.path(), &features[0]));
    assert!(!object_exists(dir.path(), &abandoned[0]));
    assert!(
        object_exists(dir.path(), &segment),
        "a forged row deleted an object"
    );
    assert_eq!(pg.psql("work", "SELECT count(*) FROM cloister_work"), "0");
    assert_eq!(
        pg.psql("work", "SELECT count(*) FROM cloister_work_objects"),
        "0"
    );
    // The forged rows are named to the worker's administrators.
    let _ = w.kill();
    let out = w.wait_with_output().unwrap();
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("warning: 2 work-queue rows did not carry the environment's tag"),
        "{warned}"
    );
    let w = worker(&e.path, "w3", 10, &[]);

    // The next operation on the same data sends the features again.
    assert_eq!(
        try_train(&e, &request(&e.features, "logreg", 2)).unwrap(),
        first
    );
    assert!(object_exists(dir.path(), &features[0]));
    assert_eq!(
        pg.psql("work", "SELECT digest FROM cloister_work_objects"),
        features[0]
    );
    stop(w);
}
