//! Active-learning jobs: the loop with the gold oracle, resuming after
//! kill -9, human labelers working the queue, and specs refused before
//! anything runs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cloister_host::audit::AuditFilter;
use cloister_host::jobs::{self, JobState, LedgerSource, Oracle, QueueReason};
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use cloister_host::users::User;

struct Env {
    _dir: tempfile::TempDir,
    c: Cloister,
    sci: User,
    lea: User,
    leo: User,
    auditor: User,
    admin: User,
    /// A second scientist, whom a test disables.
    sid: User,
}

/// A quarter of SpamAssassin (every fourth email), as JSONL.
fn subset(dir: &Path) -> PathBuf {
    let all = crate::support::spamassassin();
    let path = dir.join("spam-subset.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for r in all.iter().step_by(4) {
        let line = serde_json::json!({
            "id": r.id, "text": r.text("text").unwrap(), "label": r.label.clone().unwrap()
        });
        writeln!(f, "{line}").unwrap();
    }
    path
}

/// One environment shared by this module's tests (plugins compile once).
fn env() -> &'static Mutex<Env> {
    static E: OnceLock<Mutex<Env>> = OnceLock::new();
    E.get_or_init(|| {
        let dir = crate::support::fixture_dir();
        let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
        let admin = c.authenticate(&root).unwrap();
        let add = |n: &str, r: Role| c.add_user(&admin, n, &[r]).unwrap();
        let sci = add("sci", Role::Scientist).0;
        let sid = add("sid", Role::Scientist).0;
        let rev = add("rev", Role::Reviewer).0;
        let lea = add("lea", Role::Labeler).0;
        let leo = add("leo", Role::Labeler).0;
        let auditor = add("aud", Role::Auditor).0;
        let data = subset(dir.path());
        c.import_dataset(&sci, "spam", &data, &ImportOptions::default())
            .unwrap();
        for name in [
            "text-normalize",
            "hashed-ngrams",
            "tfidf",
            "dual-agree",
            "least-confidence",
        ] {
            let e = c
                .add_plugin(&sci, cloister_bundled_plugins::get(name).unwrap())
                .unwrap();
            c.approve_plugin(&rev, &e.digest).unwrap();
        }
        // A registered but unapproved plugin.
        c.add_plugin(&sci, cloister_bundled_plugins::get("entropy").unwrap())
            .unwrap();
        Mutex::new(Env {
            _dir: dir,
            c,
            sci,
            lea,
            leo,
            auditor,
            admin,
            sid,
        })
    })
}

fn lock() -> std::sync::MutexGuard<'static, Env> {
    env().lock().unwrap_or_else(|p| p.into_inner())
}

pub const SPEC: &str = r#"
name = "t"
dataset = "spam"
preprocess = ["text-normalize"]
features = { plugin = "hashed-ngrams", config = { bits = 16 } }

[[model]]
template = "logreg"

[[model]]
template = "mlp"
set = { hidden = [16], epochs = 8 }

[selector]
plugin = "dual-agree"
config = { threshold = 0.9 }

[loop]
seed_labels = 30
per_round = 30
max_rounds = 3
budget = 120
badcases_per_round = 3
price_per_label = 1.0
"#;

#[test]
fn an_oracle_job_runs_to_the_end_with_every_label_accounted_for() {
    let e = lock();
    let job =
        e.c.start_job(&e.sci, "t.toml", SPEC, Some(Oracle::Gold))
            .unwrap();
    let mut events = 0;
    let job = e.c.run_job(&e.sci, &job.id, &mut |_| events += 1).unwrap();
    assert!(events > 10);
    assert!(
        matches!(job.state, JobState::Done { .. }),
        "{:?}",
        job.state
    );
    // Round 0 draws the seed; rounds 1..=3 select; round 4 trains and stops
    // (unless the budget ended the loop first).
    assert_eq!(job.rounds[0].queued, 30);
    assert!(job.rounds.len() >= 4, "{}", job.rounds.len());
    let result = job.result.clone().unwrap();
    assert!(result.test_accuracy > 0.85, "{}", result.test_accuracy);

    let store = e.c.env().store();
    let ledger = jobs::ledger(store.as_ref(), &job.id).unwrap();
    let queue = jobs::queue(store.as_ref(), &job.id).unwrap();
    let stats = e.c.job_stats(&e.sci, &job.id).unwrap();
    // Every manual label is an answered queue item, within the budget.
    let manual = queue
        .values()
        .filter(|q| q.reason != QueueReason::Badcase)
        .count() as u64;
    assert_eq!(stats.manual_used, manual);
    assert!(manual <= 120);
    assert!(queue.values().all(|q| q.answer.is_some()));
    // Automatic labels carry their provenance: the selector's digest and
    // every model's confidence, each at least the threshold.
    let mut autos = 0;
    for l in ledger.values() {
        if let LedgerSource::Auto {
            selector,
            models,
            confidences,
        } = &l.source
        {
            autos += 1;
            assert_eq!(selector.len(), 64);
            assert_eq!(models.len(), 2);
            assert!(confidences.iter().all(|&p| p >= 0.9), "{confidences:?}");
        }
    }
    assert_eq!(stats.auto_accepted, autos);
    assert_eq!(
        stats.auto_checked, autos,
        "every record has gold in this data"
    );
    let per_round: u64 = job.rounds.iter().map(|r| r.auto_accepted).sum();
    assert_eq!(per_round, autos);
    assert_eq!(
        stats.cost_spent,
        (stats.manual_used + stats.reviews_done) as f64
    );
    assert_eq!(stats.pool_size, job.rounds[0].pool_left + 30);

    // The final models are registered with the job in their lineage.
    // They predict through the job's own chain, each plugin with the
    // configuration the job gave it (here 2^16 features, not the
    // featurizer's default 2^18).
    let mock: Vec<_> = ["cheap pills, click now", "minutes of the meeting"]
        .iter()
        .enumerate()
        .map(|(i, t)| cloister_host::types::DataRecord {
            id: format!("mock{i}"),
            texts: vec![cloister_host::types::TextField {
                name: "text".into(),
                value: t.to_string(),
            }],
            numerics: Vec::new(),
            label: None,
        })
        .collect();
    for id in &result.models {
        let m = e.c.show_model(&e.sci, id).unwrap();
        assert_eq!(m.lineage.job.as_deref(), Some(job.id.as_str()));
        assert_eq!(m.dim, 1 << 16);
        // Resolved: every key, the job's value or the default.
        let config = &m.lineage.features_config;
        assert!(config.contains(&("bits".into(), "16".into())), "{config:?}");
        assert!(
            config.contains(&("ngrams".into(), "2".into())),
            "{config:?}"
        );
        let p = e.c.predict(&e.sci, id, &mock).unwrap();
        assert_eq!(p.ids, ["mock0", "mock1"]);
        assert_eq!(p.probs.len(), 2 * m.classes.len());
    }
    // Every step was authorized and audited.
    let steps =
        e.c.audit_log(
            &e.auditor,
            &AuditFilter {
                action: Some("run_job".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    let expected_steps = 2 * job.rounds.len(); // select + answer (or finish) per round
    assert!(
        steps.len() >= expected_steps,
        "{} < {expected_steps}",
        steps.len()
    );

    // A finished job cannot run again or be cancelled.
    let err = e.c.run_job(&e.sci, &job.id, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("done"), "{err}");
    assert!(e.c.cancel_job(&e.sci, &job.id).is_err());
}

/// Two processes driving one job cannot write over each other's steps:
/// when the stored job changes while this process runs a step (here,
/// written straight to the store during the round's training, as another
/// process would), the step's write is refused, the run stops with
/// "changed by another process" without recording a failure over the
/// other's state, and a later run resumes from what is stored.
#[test]
fn a_job_written_by_another_process_mid_step_stops_this_run_without_writing() {
    let e = lock();
    let job =
        e.c.start_job(&e.sci, "moved.toml", SPEC, Some(Oracle::Gold))
            .unwrap();
    let store = e.c.env().store();
    let mut theirs = None;
    let err =
        e.c.run_job(&e.sci, &job.id, &mut |ev| {
            if theirs.is_none() && matches!(ev, jobs::JobEvent::Training { .. }) {
                let mut other = jobs::get(store.as_ref(), &job.id).unwrap();
                other.updated_ms += 1;
                let mut b = cloister_host::store::WriteBatch::new();
                jobs::put_job(&mut b, &other).unwrap();
                store.commit(b).unwrap();
                theirs = Some(other);
            }
        })
        .unwrap_err();
    assert!(
        matches!(err, ServiceError::Job(jobs::JobError::Moved(_))),
        "{err}"
    );
    let theirs = theirs.expect("a round trained");
    let stored = jobs::get(store.as_ref(), &job.id).unwrap();
    assert_eq!(
        stored, theirs,
        "the other process's state stands, not a failure written over it"
    );
    let done = e.c.run_job(&e.sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(done.state, JobState::Done { .. }),
        "{:?}",
        done.state
    );
}

/// Starts `spec` with the gold oracle and runs it; it must end `Done`.
fn run_to_done(e: &Env, file: &str, spec: &str) -> jobs::Job {
    let job =
        e.c.start_job(&e.sci, file, spec, Some(Oracle::Gold))
            .unwrap();
    let job = e.c.run_job(&e.sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(job.state, JobState::Done { .. }),
        "{:?}",
        job.state
    );
    job
}

/// The rounds that trained a committee and selected records (not the
/// seed round, not the final one); at least one.
fn selecting_rounds(job: &jobs::Job) -> Vec<&jobs::RoundReport> {
    let rounds: Vec<_> = job
        .rounds
        .iter()
        .filter(|r| !r.models.is_empty() && r.stop.is_none())
        .collect();
    assert!(!rounds.is_empty());
    rounds
}

#[test]
fn a_job_fits_its_featurizer_on_the_training_split_once_and_its_models_carry_the_state() {
    let e = lock();
    let spec = SPEC
        .replace(
            r#"features = { plugin = "hashed-ngrams", config = { bits = 16 } }"#,
            r#"features = { plugin = "tfidf", config = { ngrams = 1 } }"#,
        )
        .replace("max_rounds = 3", "max_rounds = 2");
    let job = run_to_done(&e, "fitted.toml", &spec);
    let result = job.result.as_ref().unwrap();
    let states: Vec<String> = result
        .models
        .iter()
        .map(|id| {
            let m = e.c.show_model(&e.sci, id).unwrap();
            let support = m.disclosure.as_ref().unwrap().vocabulary.unwrap();
            assert!(support.min_records >= 10);
            assert_eq!(m.dim as u64, support.terms);
            m.lineage.features_state.expect("a fitted state")
        })
        .collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "{states:?}");
    // Fitted on the whole training split (labeled or not: texts only),
    // never on validation or test records: the pool, the seed labels and
    // the human answers are all training records.
    let digest: cloister_host::Digest = states[0].parse().unwrap();
    let v = cloister_host::fitted::get(e.c.env().store().as_ref(), &digest).unwrap();
    let (_, splits) =
        e.c.dataset_stats(&e.sci, "spam", Some(job.spec.split_seed))
            .unwrap();
    let (labeled, unlabeled) = splits.unwrap().counts[&cloister_host::datasets::Split::Train];
    assert_eq!(u64::from(v.documents), labeled + unlabeled);
}

#[test]
fn class_balanced_picks_fill_every_round_through_the_real_loop() {
    let e = lock();
    let spec = SPEC
        .replace("max_rounds = 3", "max_rounds = 2")
        .replace("budget = 120", "budget = 90\nbalance_classes = true");
    let job = run_to_done(&e, "balanced.toml", &spec);
    assert!(job.spec.settings.balance_classes);
    let selecting = selecting_rounds(&job);
    for r in &selecting {
        // Balancing reorders the review list; it never takes fewer records
        // than the round asks for while the selector offers enough.
        assert_eq!(r.queued, 30, "round {}", r.round);
    }
    let store = e.c.env().store();
    let queue = jobs::queue(store.as_ref(), &job.id).unwrap();
    let selected = queue
        .values()
        .filter(|q| q.reason == QueueReason::Selected)
        .count();
    let queued: u64 = job
        .rounds
        .iter()
        .filter(|r| r.round > 0)
        .map(|r| r.queued)
        .sum();
    assert_eq!(selected as u64, queued);
    assert_eq!(queued, 60, "two rounds of 30 within the budget of 90");
}

#[test]
fn a_cap_on_automatic_labels_holds_back_the_rest_for_later_rounds() {
    let e = lock();
    // More seed labels and a lower threshold, so that the committee
    // accepts more than the cap in a round.
    let spec = SPEC
        .replace("threshold = 0.9", "threshold = 0.7")
        .replace("seed_labels = 30", "seed_labels = 120")
        .replace("max_rounds = 3", "max_rounds = 2")
        .replace("budget = 120", "budget = 200\nmax_auto_per_round = 2");
    let job = run_to_done(&e, "capped.toml", &spec);
    let selecting = selecting_rounds(&job);
    for r in &selecting {
        assert!(
            r.auto_accepted <= 2,
            "round {}: {}",
            r.round,
            r.auto_accepted
        );
        // Deferred records stay in the pool.
        assert!(r.pool_left >= r.auto_deferred, "round {}", r.round);
    }
    assert!(
        selecting
            .iter()
            .any(|r| r.auto_accepted == 2 && r.auto_deferred > 0),
        "the cap never bit: {:?}",
        selecting
            .iter()
            .map(|r| (r.auto_accepted, r.auto_deferred))
            .collect::<Vec<_>>()
    );
    // The ledger holds exactly the accepted ones.
    let store = e.c.env().store();
    let ledger = jobs::ledger(store.as_ref(), &job.id).unwrap();
    let autos = ledger
        .values()
        .filter(|l| matches!(l.source, LedgerSource::Auto { .. }))
        .count() as u64;
    assert_eq!(
        autos,
        job.rounds.iter().map(|r| r.auto_accepted).sum::<u64>()
    );
}

#[test]
fn the_precision_gate_accepts_only_what_validation_certifies() {
    let e = lock();
    // A careless selector: it proposes every record both models give
    // more than 0.5.
    let lax = SPEC
        .replace("threshold = 0.9", "threshold = 0.5")
        .replace("seed_labels = 30", "seed_labels = 90")
        .replace("budget = 120", "budget = 180");
    let gated = format!("{lax}\n[auto_label]\ntarget_precision = 0.9\nper_class = false\n");
    let free = run_to_done(&e, "lax.toml", &lax);
    let job = run_to_done(&e, "gated.toml", &gated);
    let store = e.c.env().store();
    let ledger = jobs::ledger(store.as_ref(), &job.id).unwrap();
    let mut held_back = 0;
    for r in selecting_rounds(&job) {
        let g = r
            .gate
            .as_ref()
            .expect("every selecting round reports its gate");
        assert!(free.rounds.iter().all(|f| f.gate.is_none()));
        assert_eq!(g.groups.len(), 1);
        let t = &g.groups[0];
        assert!(g.calibration > 0 && t.covered <= g.calibration);
        held_back += g.held_back;
        match t.threshold {
            Some(threshold) => {
                // What was accepted clears the certified threshold, and the
                // certificate is what the report says.
                assert!(t.lower >= 0.9, "round {}: {t:?}", r.round);
                for l in ledger.values().filter(|l| l.round == r.round) {
                    if let LedgerSource::Auto { confidences, .. } = &l.source {
                        let least = confidences.iter().copied().fold(f32::INFINITY, f32::min);
                        assert!(
                            least >= threshold,
                            "round {}: {least} < {threshold}",
                            r.round
                        );
                    }
                }
                let (est, (lo, hi)) = g.estimate.zip(g.interval).expect("an estimate");
                assert!(lo <= est && est <= hi);
            }
            None => {
                assert_eq!(r.auto_accepted, 0, "round {}", r.round);
                assert!(g.closed_reason(&job.classes).is_some());
            }
        }
    }
    assert!(
        held_back > 0,
        "the gate never held back a proposal of the careless selector"
    );
    // Round 1 trains on the same seed labels in both jobs, so the selector
    // proposes the same records: the gate accepts some, holds back the rest.
    let (f1, g1) = (&free.rounds[1], &job.rounds[1]);
    assert_eq!(f1.round, 1);
    let scores = |r: &jobs::RoundReport| -> Vec<(f64, u32)> {
        r.models
            .iter()
            .map(|m| (m.val_accuracy, m.best_epoch))
            .collect()
    };
    assert_eq!(scores(f1), scores(g1));
    let held = g1.gate.as_ref().unwrap().held_back;
    assert_eq!(g1.auto_accepted + held, f1.auto_accepted);
    let gated_auto: u64 = job.rounds.iter().map(|r| r.auto_accepted).sum();
    let stats = e.c.job_stats(&e.sci, &job.id).unwrap();
    if gated_auto > 0 {
        assert!(stats.auto_estimate.is_some() && stats.auto_estimate_low.is_some());
    }

    // A target no validation split of this size can certify: no automatic
    // label at all, and each round says why.
    let strict = format!("{lax}\n[auto_label]\ntarget_precision = 0.999\n");
    let job = run_to_done(&e, "strict.toml", &strict);
    assert_eq!(job.rounds.iter().map(|r| r.auto_accepted).sum::<u64>(), 0);
    for r in selecting_rounds(&job) {
        let why = r
            .gate
            .as_ref()
            .unwrap()
            .closed_reason(&job.classes)
            .unwrap();
        assert!(why.contains("2995 are needed"), "{why}");
    }
}

#[test]
fn bad_specs_are_refused_before_anything_runs() {
    let e = lock();
    let before = e.c.list_jobs(&e.sci).unwrap().len();
    let refuse = |spec: &str| -> String {
        e.c.start_job(&e.sci, "p.toml", spec, Some(Oracle::Gold))
            .unwrap_err()
            .to_string()
    };
    let msg = refuse(&SPEC.replace("\"text-normalize\"", "\"text-normalise\""));
    assert!(msg.starts_with("p.toml:4: preprocess"), "{msg}");
    assert!(
        msg.contains("no registered plugin is named `text-normalise`"),
        "{msg}"
    );
    let msg = refuse(&SPEC.replace("plugin = \"dual-agree\"", "plugin = \"entropy\""));
    assert!(msg.contains("not approved"), "{msg}");
    let msg = refuse(&SPEC.replace("plugin = \"dual-agree\"", "plugin = \"hashed-ngrams\""));
    assert!(msg.contains("is a featurizer, not a selector"), "{msg}");
    let msg = refuse(&SPEC.replace("threshold = 0.9", "threshold = 2"));
    assert!(msg.contains("threshold"), "{msg}");
    let msg = refuse(&SPEC.replace("threshold = 0.9", "treshold = 0.9"));
    assert!(msg.contains("treshold"), "{msg}");
    let msg = refuse(&SPEC.replace("hidden = [16]", "hiden = [16]"));
    assert!(msg.contains("hiden"), "{msg}");
    let msg = refuse(&SPEC.replace("dataset = \"spam\"", "dataset = \"ham\""));
    assert!(msg.contains("p.toml:3: dataset"), "{msg}");
    let msg = refuse(&SPEC.replace("per_round = 30", "per_round = 30\nrounds = 2"));
    assert!(msg.contains("rounds"), "{msg}");
    // Without the oracle, labelers must be named and be labelers.
    let msg =
        e.c.start_job(&e.sci, "p.toml", SPEC, None)
            .unwrap_err()
            .to_string();
    assert!(msg.contains("labelers"), "{msg}");
    let with = format!("labelers = [\"sci\"]\n{SPEC}");
    let msg =
        e.c.start_job(&e.sci, "p.toml", &with, None)
            .unwrap_err()
            .to_string();
    assert!(msg.contains("`sci` is not an active labeler"), "{msg}");
    // A labeler may not start jobs: denied and audited.
    let denied = e.c.start_job(&e.lea, "p.toml", SPEC, Some(Oracle::Gold));
    assert!(
        matches!(denied, Err(ServiceError::Denied { .. })),
        "{denied:?}"
    );
    assert_eq!(e.c.list_jobs(&e.sci).unwrap().len(), before);
}

#[test]
fn a_fully_labeled_dataset_leaves_an_empty_pool_and_the_job_ends() {
    let e = lock();
    let spec = format!(
        "labelers = [\"lea\", \"leo\"]\n{}",
        SPEC.replace("seed_labels = 30", "seed_labels = 4")
    );
    let job = e.c.start_job(&e.sci, "h.toml", &spec, None).unwrap();
    // The pool is the unlabeled training records: none here, and without
    // the oracle gold labels are visible, so the job trains once and ends.
    let job = e.c.run_job(&e.sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(job.state, JobState::Done { .. }),
        "a fully labeled dataset has an empty pool: {:?}",
        job.state
    );
    assert_eq!(job.pool_size, 0);
    assert_eq!(
        job.rounds.last().unwrap().stop.as_deref(),
        Some("pool-empty")
    );
}

/// An environment with a dataset whose training records are mostly
/// unlabeled, worked by two labelers.
/// An environment where people label: users sci, rev, lea and leo, and
/// a dataset `mail` of every `step`-th SpamAssassin email, keeping the
/// label of those `labeled` picks by position; `plugins` approved.
struct People {
    _dir: tempfile::TempDir,
    c: Cloister,
    admin: User,
    sci: User,
    lea: User,
    leo: User,
}

fn people(step: usize, labeled: impl Fn(usize) -> bool, plugins: &[&str]) -> People {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    let add = |n: &str, r: Role| c.add_user(&admin, n, &[r]).unwrap().0;
    let (sci, rev, lea, leo) = (
        add("sci", Role::Scientist),
        add("rev", Role::Reviewer),
        add("lea", Role::Labeler),
        add("leo", Role::Labeler),
    );
    let all = crate::support::spamassassin();
    let path = dir.path().join("d.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for (i, r) in all.iter().step_by(step).enumerate() {
        let mut v = serde_json::json!({"id": r.id, "text": r.text("text").unwrap()});
        if labeled(i) {
            v["label"] = r.label.clone().unwrap().into();
        }
        writeln!(f, "{v}").unwrap();
    }
    drop(f);
    c.import_dataset(&sci, "mail", &path, &ImportOptions::default())
        .unwrap();
    for name in plugins {
        let en = c
            .add_plugin(&sci, cloister_bundled_plugins::get(name).unwrap())
            .unwrap();
        c.approve_plugin(&rev, &en.digest).unwrap();
    }
    People {
        _dir: dir,
        c,
        admin,
        sci,
        lea,
        leo,
    }
}

/// A job `name` on `mail` with one round of four items for lea and leo.
fn one_round_for_two(name: &str) -> String {
    format!(
        r#"
name = "{name}"
dataset = "mail"
features = {{ plugin = "hashed-ngrams", config = {{ bits = 14 }} }}
labelers = ["lea", "leo"]
[[model]]
template = "logreg"
[[model]]
template = "logreg"
set = {{ seed = 7 }}
[selector]
plugin = "least-confidence"
[loop]
per_round = 4
max_rounds = 1
budget = 4
badcases_per_round = 0
"#
    )
}

#[test]
fn labelers_see_only_their_items_and_labels_move_the_job_on() {
    // 400 emails; only validation/test-sized share keeps its label.
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let People {
        c,
        admin,
        sci,
        lea,
        leo,
        ..
    } = &p;
    let (c, admin, sci, lea, leo) = (c, admin, sci, lea, leo);
    let job = c
        .start_job(sci, "people.toml", &one_round_for_two("people"), None)
        .unwrap();
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(job.state, JobState::AwaitingLabels { open: 4 });

    // Each labeler sees only their own items, most uncertain first.
    let task = c.next_label_item(lea).unwrap().unwrap();
    let (item, record, waiting) = (task.item, task.record, task.waiting);
    assert_eq!(task.classes, ["ham", "spam"]);
    assert_eq!(waiting, 2);
    assert_eq!(item.assignee.as_deref(), Some("lea"));
    assert!(!record.record.texts.is_empty());
    let leos = jobs::open_items_for(c.env().store().as_ref(), "leo").unwrap();
    assert_eq!(leos.len(), 2);
    // Leo cannot label or view Lea's item: both are authorization
    // decisions (denied and audited).
    let err = c.label_item(leo, &item.record, "spam", None).unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
    let err = c.view_record(leo, "mail", &item.record).unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
    // A label outside the classes is refused.
    let err = c.label_item(lea, &item.record, "eggs", None).unwrap_err();
    assert!(err.to_string().contains("not a class"), "{err}");
    // The same item labeled from several requests at once: one answer
    // lands; the others are refused.
    let landed = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| c.label_item(lea, &item.record, "spam", None).is_ok()))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(landed, 1);
    let next = c.next_label_item(lea).unwrap().unwrap();
    let (second, waiting) = (next.item, next.waiting);
    assert_eq!(waiting, 1);
    c.label_item(lea, &second.record, "ham", None).unwrap();
    assert!(c.next_label_item(lea).unwrap().is_none());

    // Leo imports his labels; a bad line refuses the whole file.
    let bad = format!(
        "{{\"id\":\"{}\",\"label\":\"spam\"}}\n{{\"id\":\"{}\"}}\n",
        leos[0].record, leos[1].record
    );
    let err = c.import_labels(leo, "leo.jsonl", &bad).unwrap_err();
    assert_eq!(err.to_string(), "leo.jsonl:2: field `label` is missing");
    assert_eq!(
        jobs::open_items_for(c.env().store().as_ref(), "leo")
            .unwrap()
            .len(),
        2
    );
    let good = format!(
        "id,label\n{},spam\n{},ham\n",
        leos[0].record, leos[1].record
    );
    assert_eq!(c.import_labels(leo, "leo.csv", &good).unwrap(), 2);

    // The job moves on: the human labels are dataset labels now.
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(job.state, JobState::Done { .. }),
        "{:?}",
        job.state
    );
    let stats = c.job_stats(sci, &job.id).unwrap();
    assert_eq!(stats.manual_used, 4);
    let r1 = &job.rounds[1];
    assert_eq!(r1.train_manual, 0);
    assert_eq!(job.result.unwrap().train_records, r1.train_other + 4);
    // Labeler views were audited, one entry per view.
    let views = c
        .audit_log(
            admin,
            &AuditFilter {
                action: Some("view_record".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    assert_eq!(views.len(), 3, "lea twice, leo's denied try once");
}

#[test]
fn a_labeler_changes_an_answer_until_its_round_collects_it() {
    use cloister_host::datasets::{self, Provenance};
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let (c, admin, sci, lea, leo) = (&p.c, &p.admin, &p.sci, &p.lea, &p.leo);
    let job = c
        .start_job(sci, "fixing.toml", &one_round_for_two("fixing"), None)
        .unwrap();
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(job.state, JobState::AwaitingLabels { open: 4 });
    let store = c.env().store();
    let human_label = |record: &str| {
        let v = datasets::resolve(c.env(), "mail").unwrap();
        datasets::get_record(c.env(), &v, record)
            .unwrap()
            .labels
            .into_iter()
            .filter(|l| l.provenance == Provenance::Human { user: "lea".into() })
            .map(|l| l.label)
            .collect::<Vec<_>>()
    };
    let changes = || {
        c.audit_log(
            admin,
            &AuditFilter {
                action: Some("label_record".into()),
                actor: Some("lea".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap()
        .len()
    };

    assert!(c.changeable_answers(lea).unwrap().is_empty());
    let mine = jobs::open_items_for(store.as_ref(), "lea").unwrap();
    let (a, b) = (&mine[0].record, &mine[1].record);
    // An open item has no answer to change.
    let err = c.change_label_item(lea, a, "ham", None).unwrap_err();
    assert!(err.to_string().contains("not answered yet"), "{err}");

    c.label_item(lea, a, "spam", None).unwrap();
    // Answered, it is no longer queued: labeling it again is refused, by
    // record id alone from the command line, with file and line from a file.
    let err = c.label_item(lea, a, "ham", None).unwrap_err();
    assert_eq!(err.to_string(), format!("no queued item {a} for you"));
    let file = format!("id,label\n{b},ham\n{a},ham\n");
    let err = c.import_labels(lea, "lea.csv", &file).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("no queued item {a} (lea.csv:3) for you")
    );
    let file = format!("id,label\n{b},ham\n{b},spam\n");
    let err = c.import_labels(lea, "lea.csv", &file).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("lea.csv:3: {b} is labeled twice in one request")
    );
    let listed = c.changeable_answers(lea).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(&listed[0].item.record, a);
    assert_eq!(listed[0].item.answer.as_ref().unwrap().label, "spam");
    assert_eq!(listed[0].classes, ["ham", "spam"]);
    assert!(c.changeable_answers(leo).unwrap().is_empty());
    // Only the labeler it is assigned to may change it (a decision,
    // audited), and only to one of the job's classes.
    let err = c.change_label_item(leo, a, "ham", None).unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
    let err = c.change_label_item(lea, a, "eggs", None).unwrap_err();
    assert!(err.to_string().contains("not a class"), "{err}");
    assert_eq!(human_label(a), ["spam"]);

    // The change: the item's answer and the dataset label move together,
    // and a step that read the answers before it cannot commit.
    let (now, read) = jobs::get_read(store.as_ref(), &job.id).unwrap();
    let before = jobs::answers_expectation(store.as_ref(), &job.id).unwrap();
    let audited = changes();
    let item = c.change_label_item(lea, a, "ham", None).unwrap();
    assert_eq!(item.answer.as_ref().unwrap().label, "ham");
    assert_eq!(changes(), audited + 1);
    assert_eq!(human_label(a), ["ham"]);
    assert_eq!(
        jobs::queue(store.as_ref(), &job.id).unwrap()[a]
            .answer
            .as_ref()
            .unwrap()
            .label,
        "ham"
    );
    let mut batch = cloister_host::store::WriteBatch::new();
    jobs::touch_answers(&mut batch, &job.id, vec![1]);
    let err = jobs::commit_job_if(store.as_ref(), batch, &now, &mut read.clone(), vec![before])
        .unwrap_err();
    assert!(matches!(err, jobs::JobError::Raced(_)), "{err}");

    // Everything answered; the job collects round 1 and finishes.
    c.label_item(lea, b, "ham", None).unwrap();
    assert_eq!(c.changeable_answers(lea).unwrap().len(), 2);
    for item in jobs::open_items_for(store.as_ref(), "leo").unwrap() {
        c.label_item(leo, &item.record, "spam", None).unwrap();
    }
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(job.state, JobState::Done { .. }),
        "{:?}",
        job.state
    );
    // Collected: final. The refusal writes nothing.
    assert!(c.changeable_answers(lea).unwrap().is_empty());
    let err = c.change_label_item(lea, a, "spam", None).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "round 1 of job {} has collected its answers",
            job.id
        )),
        "{err}"
    );
    assert_eq!(human_label(a), ["ham"]);
    // A record never queued for her: the same denial as anyone's.
    let err = c
        .change_label_item(lea, "no-such-record", "ham", None)
        .unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
    crate::support::every_audited_action_is_known(c);
}

#[test]
fn a_cancelled_jobs_items_leave_the_labelers_queues() {
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let (c, sci, lea, leo) = (&p.c, &p.sci, &p.lea, &p.leo);
    let job = c
        .start_job(sci, "gone.toml", &one_round_for_two("gone"), None)
        .unwrap();
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(job.state, JobState::AwaitingLabels { open: 4 });
    let store = c.env().store();
    let mine = jobs::open_items_for(store.as_ref(), "lea").unwrap();
    let (a, b) = (&mine[0].record, &mine[1].record);
    c.label_item(lea, a, "spam", None).unwrap();
    c.cancel_job(sci, &job.id).unwrap();
    // Nobody will collect these answers: the queue shows none of its items
    // and takes no label for them, saying why.
    assert!(c.next_label_item(lea).unwrap().is_none());
    assert!(c.next_label_item(leo).unwrap().is_none());
    assert!(
        jobs::open_items_for(store.as_ref(), "lea")
            .unwrap()
            .is_empty()
    );
    let err = c.label_item(lea, b, "ham", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "job {} is cancelled: its queue takes no more labels",
            job.id
        )
    );
    assert!(c.changeable_answers(lea).unwrap().is_empty());
    let err = c.change_label_item(lea, a, "ham", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("job {} is cancelled: its answers cannot change", job.id)
    );
    // Another labeler's item of it is still a denial, not a hint.
    let err = c.label_item(leo, b, "ham", None).unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
}

/// An approval withdrawn while a job waits for its labelers: the job's
/// next step is denied the plugin, and the job stays where it was; once a
/// reviewer approves the digest again, a resume goes on.
#[test]
fn a_job_stops_at_a_withdrawn_approval_and_resumes_once_approved_again() {
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let (c, admin, sci, lea, leo) = (&p.c, &p.admin, &p.sci, &p.lea, &p.leo);
    let job = c
        .start_job(sci, "w.toml", &one_round_for_two("w"), None)
        .unwrap();
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(job.state, JobState::AwaitingLabels { open: 4 });
    let ngrams = c
        .list_plugins(admin)
        .unwrap()
        .into_iter()
        .find(|e| e.name == "hashed-ngrams")
        .unwrap()
        .digest;
    c.withdraw_approval(admin, &ngrams).unwrap();
    let store = c.env().store();
    for (who, name) in [(lea, "lea"), (leo, "leo")] {
        for item in jobs::open_items_for(store.as_ref(), name).unwrap() {
            c.label_item(who, &item.record, "spam", None).unwrap();
        }
    }
    let err = c.run_job(sci, &job.id, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            &err,
            ServiceError::Denied {
                action: "run_plugin",
                ..
            }
        ),
        "{err}"
    );
    // A denial is not the job's failure: it stays as last committed, none
    // of the step kept, and whoever may run it resumes it later.
    let stays = c.show_job(sci, &job.id).unwrap();
    assert_eq!((&stays.state, &stays.next), (&job.state, &job.next));
    assert_eq!(stays.rounds.len(), job.rounds.len());

    let rev = cloister_host::users::get(store.as_ref(), "rev").unwrap();
    c.approve_plugin(&rev, &ngrams).unwrap();
    let done = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(done.state, JobState::Done { .. }),
        "{:?}",
        done.state
    );
}

#[test]
fn an_away_labelers_open_items_move_to_another_and_the_job_moves_on() {
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let (c, admin, sci, lea, leo) = (&p.c, &p.admin, &p.sci, &p.lea, &p.leo);
    let spec = one_round_for_two("away")
        .replace("max_rounds = 1", "max_rounds = 2")
        .replace("budget = 4", "budget = 8");
    let job = c.start_job(sci, "away.toml", &spec, None).unwrap();
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(job.state, JobState::AwaitingLabels { open: 4 });
    let store = c.env().store();
    let progress = || {
        c.job_stats(sci, &job.id)
            .unwrap()
            .labelers
            .into_iter()
            .map(|l| (l.labeler, l.open, l.answered))
            .collect::<Vec<_>>()
    };
    assert_eq!(progress(), [("lea".into(), 2, 0), ("leo".into(), 2, 0)]);
    let leas = jobs::open_items_for(store.as_ref(), "lea").unwrap();
    c.label_item(lea, &leas[0].record, "spam", None).unwrap();
    // Lea leaves: her account is disabled, and one item of hers is open.
    c.disable_user(admin, "lea").unwrap();

    // Only the job's owner (or an admin) moves items, and only to an
    // active labeler other than the one they leave.
    let err = c.reassign_labels(leo, &job.id, "lea", "leo").unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
    let err = c.reassign_labels(sci, &job.id, "lea", "sci").unwrap_err();
    assert_eq!(err.to_string(), "`sci` is not an active labeler");
    let err = c.reassign_labels(sci, &job.id, "lea", "lea").unwrap_err();
    assert!(err.to_string().contains("to themselves"), "{err}");
    let err = c.reassign_labels(sci, &job.id, "rev", "leo").unwrap_err();
    assert!(err.to_string().contains("not a labeler of job"), "{err}");

    let (moved, n) = c.reassign_labels(sci, &job.id, "lea", "leo").unwrap();
    assert_eq!(n, 1);
    assert_eq!(moved.labelers(), ["leo"]);
    assert_eq!(
        moved.spec.labelers,
        ["lea", "leo"],
        "the spec stays as given"
    );
    // Her answer stays hers; her open item is Leo's now, record included.
    assert_eq!(progress(), [("lea".into(), 0, 1), ("leo".into(), 3, 0)]);
    let item = &leas[1].record;
    assert!(
        jobs::open_items_for(store.as_ref(), "leo")
            .unwrap()
            .iter()
            .any(|q| q.record == *item)
    );
    assert!(
        jobs::open_items_for(store.as_ref(), "lea")
            .unwrap()
            .is_empty()
    );
    c.view_record(leo, "mail", item).unwrap();
    for q in jobs::open_items_for(store.as_ref(), "leo").unwrap() {
        c.label_item(leo, &q.record, "ham", None).unwrap();
    }
    // Round 2 asks Leo alone.
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(job.state, JobState::AwaitingLabels { open: 4 });
    assert_eq!(progress(), [("leo".into(), 4, 0)]);
    // Once it is done (or while a step runs), its labelers stay.
    c.cancel_job(sci, &job.id).unwrap();
    let err = c.reassign_labels(sci, &job.id, "leo", "lea").unwrap_err();
    assert!(
        err.to_string()
            .contains("its labelers change only while it waits for labels or has failed"),
        "{err}"
    );
    assert_eq!(job.reassigned.len(), 1);
    assert_eq!(
        (job.reassigned[0].by.as_str(), job.reassigned[0].items),
        ("sci", 1)
    );
    let audited = c
        .audit_log(
            admin,
            &AuditFilter {
                action: Some("reassign_labels".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    assert_eq!(audited.len(), 6, "every attempt is decided and audited");
    crate::support::every_audited_action_is_known(c);
}

#[test]
fn a_round_passes_over_labelers_who_can_no_longer_answer() {
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let (c, admin, sci, lea, leo) = (&p.c, &p.admin, &p.sci, &p.lea, &p.leo);
    let spec = one_round_for_two("gaps")
        .replace("max_rounds = 1", "max_rounds = 3")
        .replace("budget = 4", "budget = 12");
    let job = c.start_job(sci, "gaps.toml", &spec, None).unwrap();
    c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    let store = c.env().store();
    let answer_all = |who: &User| {
        for q in jobs::open_items_for(store.as_ref(), &who.name).unwrap() {
            c.label_item(who, &q.record, "ham", None).unwrap();
        }
    };
    let held = |name: &str| jobs::open_items_for(store.as_ref(), name).unwrap().len();
    assert_eq!((held("lea"), held("leo")), (2, 2));
    answer_all(lea);
    answer_all(leo);
    // Leo's account is disabled: round 2 asks Lea for everything.
    c.disable_user(admin, "leo").unwrap();
    let j = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(j.state, JobState::AwaitingLabels { open: 4 });
    assert_eq!((held("lea"), held("leo")), (4, 0));
    answer_all(lea);
    // Lea's too: nobody can answer round 3, and the step says so.
    c.disable_user(admin, "lea").unwrap();
    let j = c.run_job(sci, &job.id, &mut |_| {}).unwrap_err();
    let msg = j.to_string();
    assert!(
        msg.contains(&format!(
            "none of job {}'s labelers (lea, leo) is an active labeler now",
            job.id
        )),
        "{msg}"
    );
    // The failure is recorded on the job as it was before the step: none
    // of the failed step is kept, and a resume takes it again.
    let failed = c.show_job(sci, &job.id).unwrap();
    assert!(matches!(failed.state, JobState::Failed { .. }));
    assert_eq!(failed.next, jobs::Step::Select(3));
    assert_eq!(failed.rounds.len(), 3, "rounds 0, 1 and 2");
    // A new labeler takes Lea's place; the job goes on.
    c.add_user(admin, "lou", &[Role::Labeler]).unwrap();
    let (_, moved) = c.reassign_labels(sci, &job.id, "lea", "lou").unwrap();
    assert_eq!(moved, 0);
    let j = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert_eq!(j.state, JobState::AwaitingLabels { open: 4 });
    assert_eq!(held("lou"), 4);
}

#[test]
fn the_job_shows_which_labelers_it_waits_for_can_no_longer_answer() {
    let p = people(15, |i| i % 3 == 0, &["hashed-ngrams", "least-confidence"]);
    let (c, admin, sci, lea) = (&p.c, &p.admin, &p.sci, &p.lea);
    let job = c
        .start_job(sci, "who.toml", &one_round_for_two("who"), None)
        .unwrap();
    c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    let waiting = |c: &cloister_host::service::Cloister| {
        c.job_stats(sci, &job.id)
            .unwrap()
            .labelers
            .into_iter()
            .map(|l| (l.labeler, l.open, l.answered, l.active))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        waiting(c),
        [("lea".into(), 2, 0, true), ("leo".into(), 2, 0, true)]
    );
    let store = c.env().store();
    for q in jobs::open_items_for(store.as_ref(), "lea").unwrap() {
        c.label_item(lea, &q.record, "ham", None).unwrap();
    }
    // Leo's account is disabled while he holds two items: the owner sees
    // that they wait for a reassignment, not for Leo.
    c.disable_user(admin, "leo").unwrap();
    assert_eq!(
        waiting(c),
        [("lea".into(), 0, 2, true), ("leo".into(), 2, 0, false)]
    );
    // Enabled again, he can answer them.
    c.enable_user(admin, "leo").unwrap();
    assert_eq!(waiting(c)[1], ("leo".into(), 2, 0, true));
}

#[test]
fn failed_spot_checks_revoke_a_rounds_automatic_labels_and_raise_the_gate() {
    // A third of SpamAssassin; two records in three keep their label.
    let p = people(3, |i| i % 3 != 0, &["hashed-ngrams", "dual-agree"]);
    let (c, admin, sci, lea) = (&p.c, &p.admin, &p.sci, &p.lea);
    let spec = r#"
name = "checked"
dataset = "mail"
features = { plugin = "hashed-ngrams", config = { bits = 14 } }
labelers = ["lea"]
[[model]]
template = "logreg"
[[model]]
template = "logreg"
set = { seed = 7 }
[selector]
plugin = "dual-agree"
config = { threshold = 0.5 }
[loop]
per_round = 2
max_rounds = 3
budget = 400
badcases_per_round = 0
[auto_label]
target_precision = 0.85
per_class = false
spot_check = 0.1
"#;
    let job = c.start_job(sci, "checked.toml", spec, None).unwrap();
    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(job.state, JobState::AwaitingLabels { .. }),
        "{:?}",
        job.state
    );
    let r1 = job.rounds.iter().find(|r| r.round == 1).unwrap().clone();
    let threshold = r1.gate.as_ref().unwrap().groups[0]
        .threshold
        .expect("the gate opens on this easy data");
    assert!(r1.auto_accepted > 0 && r1.spot_checks > 0, "{r1:?}");
    assert_eq!(
        r1.spot_checks,
        (r1.auto_accepted as f64 * 0.1).ceil() as u64
    );

    // The labeler contradicts every automatic label she is shown.
    let store = c.env().store();
    let ledger = jobs::ledger(store.as_ref(), &job.id).unwrap();
    let items = jobs::open_items_for(store.as_ref(), "lea").unwrap();
    let mut contradicted = 0;
    for item in &items {
        let answer = match (&item.reason, ledger.get(&item.record)) {
            (QueueReason::SpotCheck, Some(l)) => {
                contradicted += 1;
                if l.label == "spam" { "ham" } else { "spam" }
            }
            _ => "ham",
        };
        c.label_item(lea, &item.record, answer, None).unwrap();
    }
    assert_eq!(contradicted, r1.spot_checks);

    let job = c.run_job(sci, &job.id, &mut |_| {}).unwrap();
    let r1 = job.rounds.iter().find(|r| r.round == 1).unwrap();
    assert_eq!((r1.spot_checked, r1.spot_agreed), (r1.spot_checks, 0));
    assert_eq!(r1.revoked, r1.auto_accepted - r1.spot_checks);
    // The revoked labels are gone from the ledger: those records are back
    // in the pool.
    // (Spot-checked records keep their automatic label in the ledger as
    // provenance; the labeler's answer is the label they train with.)
    let ledger = jobs::ledger(store.as_ref(), &job.id).unwrap();
    let spot_checked: Vec<&str> = items
        .iter()
        .filter(|i| i.reason == QueueReason::SpotCheck)
        .map(|i| i.record.as_str())
        .collect();
    assert!(!ledger.iter().any(|(id, l)| l.round == 1
        && matches!(l.source, LedgerSource::Auto { .. })
        && !spot_checked.contains(&id.as_str())));
    // The next round accepts only above the revoked round's threshold.
    let r2 = job.rounds.iter().find(|r| r.round == 2).unwrap();
    let g2 = r2.gate.as_ref().unwrap();
    assert_eq!(g2.groups[0].floor, Some(threshold));
    for l in ledger.values().filter(|l| l.round == 2) {
        if let LedgerSource::Auto { confidences, .. } = &l.source {
            let least = confidences.iter().copied().fold(f32::INFINITY, f32::min);
            assert!(least > threshold, "{least} <= {threshold}");
        }
    }
    let stats = c.job_stats(sci, &job.id).unwrap();
    assert_eq!(stats.revoked, r1.revoked);
    assert_eq!(stats.spot_agreed, 0);
    // The revocation is in the audit log.
    let revocations = c
        .audit_log(
            admin,
            &AuditFilter {
                action: Some("revoke_auto_labels".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    assert_eq!(revocations.len(), 1);
    crate::support::every_audited_action_is_known(c);
}

#[test]
fn a_job_can_be_cancelled_only_by_its_owner_or_an_admin() {
    let e = lock();
    let job =
        e.c.start_job(&e.sci, "t.toml", SPEC, Some(Oracle::Gold))
            .unwrap();
    let err = e.c.cancel_job(&e.lea, &job.id).unwrap_err();
    assert!(matches!(err, ServiceError::Denied { .. }), "{err}");
    let j = e.c.cancel_job(&e.sci, &job.id).unwrap();
    assert!(matches!(j.state, JobState::Cancelled { .. }));
    let err = e.c.run_job(&e.sci, &job.id, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    let _ = &e.leo;
}

#[test]
fn an_orphaned_job_is_taken_over_as_its_owner_unless_it_keeps_ending_or_its_owner_is_disabled() {
    use cloister_host::service::MAX_TAKEOVERS;
    use cloister_host::store::{Space, WriteBatch};
    let e = lock();
    let store = e.c.env().store();
    // What a process that ended while driving a job leaves: its claim,
    // naming its holder (on sled every holder but this open's has ended).
    let orphan = |id: &str| {
        let mut key = b"job\0".to_vec();
        key.extend_from_slice(id.as_bytes());
        let dead = store.holder().wrapping_add(1);
        let mut b = WriteBatch::new();
        b.put(Space::Claims, key, dead.to_be_bytes().to_vec());
        store.commit(b).unwrap();
        let found = e.c.orphaned_jobs().unwrap();
        found
            .into_iter()
            .find(|o| o.id == id)
            .expect("the job is listed as orphaned")
    };
    let takeovers = || {
        e.c.audit_log(
            &e.admin,
            &AuditFilter {
                action: Some("take_over_job".into()),
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap()
        .len()
    };
    let before = takeovers();

    // Taken over and run to its end as the user who started it; once.
    let job =
        e.c.start_job(&e.sci, "t.toml", SPEC, Some(Oracle::Gold))
            .unwrap();
    let o = orphan(&job.id);
    let done = e.c.take_over_job(&o, &mut |_| {}).unwrap().unwrap();
    assert!(
        matches!(done.state, JobState::Done { .. }),
        "{:?}",
        done.state
    );
    assert!(e.c.take_over_job(&o, &mut |_| {}).unwrap().is_none());
    assert!(e.c.orphaned_jobs().unwrap().iter().all(|x| x.id != job.id));
    assert_eq!(takeovers(), before + 1);
    // Its process lived through the run: no count of takeovers is left.
    let count_key = [b"job-takeovers\0".as_slice(), job.id.as_bytes()].concat();
    assert!(store.get(Space::Claims, &count_key).unwrap().is_none());
    let run_as_owner =
        e.c.audit_log(
            &e.admin,
            &AuditFilter {
                actor: Some("sci".into()),
                action: Some("run_job".into()),
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        !run_as_owner.is_empty(),
        "the steps are authorized for the owner"
    );

    // A job whose run brings its process down at the same step each time:
    // taken over MAX_TAKEOVERS times, then failed instead.
    let job =
        e.c.start_job(&e.sci, "t.toml", SPEC, Some(Oracle::Gold))
            .unwrap();
    for n in 1..=MAX_TAKEOVERS {
        let o = orphan(&job.id);
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            e.c.take_over_job(&o, &mut |_| panic!("the process ends here"))
        }));
        assert!(ended.is_err(), "takeover {n} ran without an event");
        let stored = jobs::get(store.as_ref(), &job.id).unwrap();
        assert_eq!(stored.next, job.next, "takeover {n} moved the job on");
        assert_eq!(stored.state, JobState::Running);
    }
    let o = orphan(&job.id);
    let failed = e.c.take_over_job(&o, &mut |_| {}).unwrap().unwrap();
    match &failed.state {
        JobState::Failed { error } => {
            assert!(error.contains(&format!("{MAX_TAKEOVERS} times")), "{error}")
        }
        s => panic!("{s:?}"),
    }
    assert!(e.c.orphaned_jobs().unwrap().iter().all(|x| x.id != job.id));
    // A person resumes it: it runs, and the count starts again.
    let done = e.c.run_job(&e.sci, &job.id, &mut |_| {}).unwrap();
    assert!(
        matches!(done.state, JobState::Done { .. }),
        "{:?}",
        done.state
    );

    // The owner disabled: the job is not run under their name.
    let job =
        e.c.start_job(&e.sid, "t.toml", SPEC, Some(Oracle::Gold))
            .unwrap();
    e.c.disable_user(&e.admin, "sid").unwrap();
    let o = orphan(&job.id);
    let failed = e.c.take_over_job(&o, &mut |_| {}).unwrap().unwrap();
    match &failed.state {
        JobState::Failed { error } => assert!(error.contains("`sid`"), "{error}"),
        s => panic!("{s:?}"),
    }
    assert_eq!(failed.next, job.next, "no step ran");
    assert_eq!(takeovers(), before + 1 + MAX_TAKEOVERS as usize + 1 + 1);
    crate::support::every_audited_action_is_known(&e.c);
}

// ------------------------------------------------------------ kill -9 --

fn cloister(env: &Path, token: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cloister"));
    c.env("CLOISTER_ENV", env).env("CLOISTER_TOKEN", token);
    c
}

/// Per round (manual, auto, queued); the ledger's labels; the accuracy.
pub type Outcome = (Vec<(u64, u64, u64)>, BTreeMap<String, String>, String);

/// What a finished job amounts to: per round, the counts; the ledger's
/// labels; the final accuracy.
pub fn outcome(c: &Cloister, who: &User, id: &str) -> Outcome {
    let job = c.show_job(who, id).unwrap();
    let rounds = job
        .rounds
        .iter()
        .map(|r| (r.train_manual, r.auto_accepted, r.queued))
        .collect();
    let ledger = jobs::ledger(c.env().store().as_ref(), id)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.label))
        .collect();
    let acc = format!("{:.6}", job.result.unwrap().test_accuracy);
    (rounds, ledger, acc)
}

#[test]
fn a_job_killed_at_any_point_resumes_to_the_same_result() {
    killed_jobs_resume_to_the_same_result("sled", super::crash::trials().min(6), true);
}

/// Runs a job once uninterrupted in a new environment on `store`, then
/// `trials` times killed at a random point and resumed; every run must end
/// with the uninterrupted run's outcome, which is returned. With
/// `take_over`, the jobs the kill left orphaned (claimed by the dead
/// process) are brought to their end alternately by a `serve` process
/// that takes them over by itself (the first one) and by `job resume`;
/// without, all by `job resume`.
pub fn killed_jobs_resume_to_the_same_result(store: &str, trials: u64, take_over: bool) -> Outcome {
    // Its own environment: child processes need it unlocked.
    let dir = tempfile::tempdir().unwrap();
    let env_path = dir.path().join("env");
    let root_token;
    let token = {
        let (c, root) = Cloister::init_with(&env_path, "root", store).unwrap();
        root_token = root.clone();
        let admin = c.authenticate(&root).unwrap();
        let (sci, token) = c.add_user(&admin, "sci", &[Role::Scientist]).unwrap();
        let rev = c.add_user(&admin, "rev", &[Role::Reviewer]).unwrap().0;
        let data = subset(dir.path());
        c.import_dataset(&sci, "spam", &data, &ImportOptions::default())
            .unwrap();
        for name in ["text-normalize", "hashed-ngrams", "dual-agree"] {
            let e = c
                .add_plugin(&sci, cloister_bundled_plugins::get(name).unwrap())
                .unwrap();
            c.approve_plugin(&rev, &e.digest).unwrap();
        }
        token
    };
    let spec_path = dir.path().join("crash.toml");
    std::fs::write(&spec_path, SPEC.replace("max_rounds = 3", "max_rounds = 2")).unwrap();
    let run = || {
        cloister(&env_path, &token)
            .args(["run", spec_path.to_str().unwrap(), "--oracle", "gold"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let job_id = |stderr: &[u8]| -> Option<String> {
        String::from_utf8_lossy(stderr)
            .split_whitespace()
            .skip_while(|w| *w != "job")
            .nth(1)
            .filter(|w| w.starts_with("j-"))
            .map(str::to_string)
    };
    let state = |id: &str| {
        let c = Cloister::open(&env_path, "cli").unwrap();
        let sci = c.authenticate(&token).unwrap();
        let done = matches!(c.show_job(&sci, id).unwrap().state, JobState::Done { .. });
        (done, done.then(|| outcome(&c, &sci, id)))
    };

    // The reference: one uninterrupted run, timed.
    let t = std::time::Instant::now();
    let out = run().wait_with_output().unwrap();
    let run_ms = t.elapsed().as_millis() as u64;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = job_id(&out.stderr).unwrap();
    let want = state(&reference).1.unwrap();

    // The kill lands at a random point of the run. The first run also
    // compiled the plugins, so later runs are faster: a kill that finds the
    // job already done narrows the window for the next ones.
    let mut seed = 0x5eed_u64;
    let (mut started, mut interrupted) = (0, 0);
    let (mut by_serve, mut by_cli) = (0u64, 0u64);
    let lo = (run_ms / 20).max(1);
    let mut hi = (run_ms * 17 / 20).max(lo + 1);
    for trial in 0..trials * 2 {
        if interrupted == trials {
            break;
        }
        let delay = lo + super::crash::rand(&mut seed) % (hi - lo);
        let mut child = run();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let Some(id) = job_id(&out.stderr) else {
            continue; // killed before the job was recorded
        };
        started += 1;
        if state(&id).0 {
            hi = (delay * 2 / 3).max(lo + 1);
        } else {
            interrupted += 1;
        }
        // Resume: a kill can leave the job at any step.
        let orphaned = {
            let c = Cloister::open(&env_path, "cli").unwrap();
            c.orphaned_jobs().unwrap().iter().any(|o| o.id == id)
        };
        let stderr = if take_over && orphaned && by_serve <= by_cli {
            by_serve += 1;
            take_over_by_serve(&env_path, &token, &id)
        } else {
            by_cli += u64::from(orphaned);
            let o = cloister(&env_path, &token)
                .args(["job", "resume", &id])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stderr).into_owned()
        };
        let (done, got) = state(&id);
        assert!(
            done,
            "trial {trial} (kill after {delay} ms): not done after resume\n{stderr}"
        );
        assert_eq!(
            got.unwrap(),
            want,
            "trial {trial} (kill after {delay} ms) differs from the uninterrupted run"
        );
    }
    assert!(
        interrupted * 2 >= trials,
        "only {interrupted} of {started} kills hit a running job"
    );
    if take_over && trials > 0 {
        assert!(
            by_serve >= 1,
            "no kill left a job for serve to take over ({by_cli} resumed by hand)"
        );
        // Each takeover is on the record as the host's act, and nothing
        // else took one over.
        let c = Cloister::open(&env_path, "cli").unwrap();
        let root = c.authenticate(&root_token).unwrap();
        let log = c
            .audit_log(
                &root,
                &cloister_host::audit::AuditFilter {
                    action: Some("take_over_job".into()),
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(log.len() as u64, by_serve, "{log:?}");
        assert!(c.orphaned_jobs().unwrap().is_empty());
    }
    want
}

/// Starts `cloister serve --take-over-jobs 1` on the environment, waits
/// until it has driven job `id` to its end (read through the API), and
/// stops it; returns what it wrote to stderr.
fn take_over_by_serve(env_path: &Path, token: &str, id: &str) -> String {
    let port = crate::support::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut serve = cloister(env_path, token)
        .args([
            "serve",
            "--addr",
            &addr.to_string(),
            "--take-over-jobs",
            "1",
        ])
        .env("CLOISTER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let bearer = format!("Bearer {token}");
    let state = loop {
        assert!(
            serve.try_wait().unwrap().is_none(),
            "serve ended: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        if std::net::TcpStream::connect(addr).is_ok() {
            let (status, _, body) = crate::support::http(
                addr,
                "GET",
                &format!("/api/jobs/{id}"),
                &[("Authorization", &bearer)],
                None,
            );
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let job: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let state = job["state"]["state"].as_str().unwrap_or("").to_string();
            if state != "running" {
                break state;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "job {id} not taken over and finished in 300 s: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let status = serve.wait().unwrap();
    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(status.success(), "serve: {status}\n{text}");
    assert_eq!(state, "done", "{text}");
    assert!(
        text.contains("taken over"),
        "serve did not say it took the job over: {text}"
    );
    text
}
