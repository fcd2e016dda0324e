//! Disclosure control at the release gate: a model leaves only when it
//! cannot carry its training data.
//!
//! The attack: `hostile-leak` with `attack = "memorize"` is a featurizer a
//! reviewer could approve — it only emits one feature per (position, byte)
//! of a record's first 32 bytes — but a linear model trained on it has a
//! non-zero weight row for every pair its training records contain, so the
//! rows that only a secret record has spell out the secret. The test shows
//! that the raw weights do carry it, and that what can leave (the bundle)
//! does not, or that the release is refused.

use cloister_host::jobs::Oracle;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use cloister_host::train::{Kind, Network, Trained};
use cloister_host::users::User;
use cloister_test_plugins::HOSTILE_LEAK;

const SECRETS: [&str; 3] = [
    "PIN 4417-2290-8812 acct Zorblax!",
    "pw=qv8#Lm2@xT9!kR4$wB7^nJ1&yH6*",
    "key 7F3A9C1E5B2D8F4A6C0E7B9D1F3A5C",
];

/// Honest records: texts from a small vocabulary, labeled by a rule.
fn dataset() -> String {
    let words = [
        "meeting", "today", "free", "offer", "lunch", "report", "click", "prize", "notes",
        "agenda", "winner", "budget", "cash", "review", "deal", "team",
    ];
    let mut seed = 0x1234_5678_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = String::new();
    for i in 0..400 {
        let text: Vec<&str> = (0..6)
            .map(|_| words[(next() % words.len() as u64) as usize])
            .collect();
        let text = text.join(" ");
        let spammy = ["free", "offer", "click", "prize", "winner", "cash", "deal"]
            .iter()
            .filter(|w| text.contains(*w))
            .count();
        let label = if spammy >= 2 { "spam" } else { "ham" };
        out.push_str(&format!(
            "{{\"id\": \"h{i}\", \"text\": \"{text}\", \"label\": \"{label}\"}}\n"
        ));
    }
    for (i, s) in SECRETS.iter().enumerate() {
        out.push_str(&format!(
            "{{\"id\": \"s{i}\", \"text\": {}, \"label\": \"spam\"}}\n",
            serde_json::to_string(s).unwrap()
        ));
    }
    out
}

struct Fx {
    _dir: tempfile::TempDir,
    c: Cloister,
    admin: User,
    sci: User,
    rev: User,
    appr: User,
}

/// An environment with a scientist, a reviewer, an approver and the
/// [`dataset`] imported as `d`.
fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    let add = |n: &str, r: Role| c.add_user(&admin, n, &[r]).unwrap().0;
    let (sci, rev, appr) = (
        add("sci", Role::Scientist),
        add("rev", Role::Reviewer),
        add("appr", Role::Approver),
    );
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, dataset()).unwrap();
    c.import_dataset(&sci, "d", &data, &ImportOptions::default())
        .unwrap();
    Fx {
        _dir: dir,
        c,
        admin,
        sci,
        rev,
        appr,
    }
}

/// Adds and approves the bundled `hashed-ngrams` featurizer: its digest.
fn hashed_ngrams(c: &Cloister, sci: &User, rev: &User) -> String {
    let e = c
        .add_plugin(sci, cloister_bundled_plugins::get("hashed-ngrams").unwrap())
        .unwrap();
    c.approve_plugin(rev, &e.digest).unwrap();
    e.digest
}

/// `logreg` trained on `d` through the featurizer `features`, with `sets`.
fn train_logreg(
    c: &Cloister,
    sci: &User,
    features: &str,
    sets: Vec<(String, String)>,
) -> cloister_host::models::ModelManifest {
    let req = cloister_host::service::TrainRequest {
        dataset: "d".into(),
        preprocess: vec![],
        preprocess_config: Vec::new(),
        features: features.to_string(),
        features_config: Vec::new(),
        template: "logreg".into(),
        sets,
        split_seed: None,
    };
    c.train_model(sci, &req, &mut |_| {}).unwrap()
}

/// The (position, byte) feature rows only `secret` has among `texts`.
fn unique_rows(secret: &str, texts: &[String]) -> Vec<usize> {
    secret
        .bytes()
        .take(32)
        .enumerate()
        .filter(|&(p, b)| {
            texts
                .iter()
                .filter(|t| t.as_bytes().get(p) == Some(&b))
                .count()
                == 1
        })
        .map(|(p, b)| p * 256 + usize::from(b))
        .collect()
}

fn nonzero_rows(m: &Trained) -> std::collections::BTreeSet<usize> {
    let first = match &m.net {
        Network::Logreg(l) | Network::Mlp(l, _) => l,
    };
    (0..first.dim)
        .filter(|r| {
            first.w[r * first.out..(r + 1) * first.out]
                .iter()
                .any(|w| *w != 0.0)
        })
        .collect()
}

#[test]
fn a_memorizing_featurizer_cannot_carry_secrets_out_through_the_weights() {
    let Fx {
        _dir,
        c,
        sci,
        rev,
        appr,
        ..
    } = fx();
    let text = dataset();
    let leak = c.add_plugin(&sci, HOSTILE_LEAK).unwrap();
    c.approve_plugin(&rev, &leak.digest).unwrap();
    let spec = format!(
        r#"
name = "memorize"
dataset = "d"
features = {{ plugin = "{}", config = {{ attack = "memorize" }} }}

[[model]]
template = "logreg"
set = {{ min_support = 0 }}

[[model]]
template = "logreg"
set = {{ l2 = 1e-5 }}

[selector]
builtin = "random"

[loop]
seed_labels = 400
per_round = 5
max_rounds = 1
budget = 420
badcases_per_round = 0
price_per_label = 1.0
"#,
        leak.digest
    );
    let job = c
        .start_job(&sci, "memorize.toml", &spec, Some(Oracle::Gold))
        .unwrap();
    let job = c.run_job(&sci, &job.id, &mut |_| {}).unwrap();
    let id = job.result.as_ref().unwrap().models[0].clone();
    let m = c.show_model(&sci, &id).unwrap();
    let report = m.disclosure.clone().expect("every new model has a report");

    // The attack works on the weights as trained: the rows only a secret
    // record has are non-zero.
    let texts: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let raw = Trained::from_safetensors(
        Kind::Logreg,
        &cloister_host::models::weights(c.env().dir(), None, &m).unwrap(),
    )
    .unwrap();
    let secret_rows = |m: &Trained| -> usize {
        let rows = nonzero_rows(m);
        SECRETS
            .iter()
            .map(|s| {
                unique_rows(s, &texts)
                    .iter()
                    .filter(|r| rows.contains(r))
                    .count()
            })
            .sum()
    };
    let leaked_before = secret_rows(&raw);
    eprintln!("secret rows in the raw weights: {leaked_before}; report: {report:?}");
    assert!(
        leaked_before >= 16,
        "with min_support = 0 the attack carries secret bytes in the raw weights ({leaked_before})"
    );
    // The default template (min_support = k) never learns those rows: the
    // second model's weights carry none even before release.
    let second = c
        .show_model(&sci, &job.result.as_ref().unwrap().models[1])
        .unwrap();
    let second_raw = Trained::from_safetensors(
        Kind::Logreg,
        &cloister_host::models::weights(c.env().dir(), None, &second).unwrap(),
    )
    .unwrap();
    assert_eq!(
        secret_rows(&second_raw),
        0,
        "rows below min_support learned"
    );
    assert_eq!(
        second.disclosure.as_ref().unwrap().features.disclosive,
        0,
        "nothing left to prune: {:?}",
        second.disclosure
    );
    assert!(
        report.features.disclosive > 0,
        "the check finds the rare rows: {report:?}"
    );

    // What can leave carries none of them, or nothing leaves.
    c.request_release(&sci, &id, "share the spam filter")
        .unwrap();
    match c.decide_release(&appr, &id, true) {
        Err(ServiceError::Denied { .. }) => {
            assert_eq!(report.verdict.as_str(), "fail");
            assert!(matches!(
                c.export_model(&sci, &id),
                Err(ServiceError::Denied { .. })
            ));
        }
        Ok(_) => {
            assert_eq!(report.verdict.as_str(), "pass-after-pruning");
            let bundle = c.export_model(&sci, &id).unwrap();
            let b = cloister_host::models::verify_bundle(&bundle, None).unwrap();
            let released = Trained::from_safetensors(Kind::Logreg, &b.weights).unwrap();
            let leaked_after = secret_rows(&released);
            assert_eq!(leaked_after, 0, "secret bytes in the released weights");
            // The released manifest names no record and no count below k.
            let manifest = &b.manifest;
            assert!(manifest.evaluation.badcases.is_empty());
            assert!(manifest.evaluation.false_positives.is_empty());
            let k = u64::from(report.thresholds.k);
            for n in manifest
                .evaluation
                .confusion
                .iter()
                .flatten()
                .chain(manifest.split_sizes.iter())
            {
                assert!(*n == 0 || *n >= k, "a count below k in the bundle: {n}");
            }
            let bundle_text = String::from_utf8_lossy(&bundle);
            for s in SECRETS {
                assert!(!bundle_text.contains(s));
            }
            for i in 0..SECRETS.len() {
                assert!(!bundle_text.contains(&format!("\"s{i}\"")), "a record id");
            }
        }
        Err(e) => panic!("unexpected: {e}"),
    }
}

#[test]
fn a_model_without_a_passing_report_cannot_be_approved_or_exported() {
    let Fx {
        _dir,
        c,
        admin,
        sci,
        rev,
        appr,
    } = fx();
    let digest = |name: &str| {
        let e = c
            .add_plugin(&sci, cloister_bundled_plugins::get(name).unwrap())
            .unwrap();
        c.approve_plugin(&rev, &e.digest).unwrap();
        e.digest
    };
    let req = cloister_host::service::TrainRequest {
        dataset: "d".into(),
        preprocess: vec![],
        preprocess_config: Vec::new(),
        features: digest("hashed-ngrams"),
        features_config: Vec::new(),
        template: "logreg".into(),
        sets: vec![],
        split_seed: None,
    };
    let m = c.train_model(&sci, &req, &mut |_| {}).unwrap();
    // A model stored before disclosure checks existed: no report.
    let mut old = m.clone();
    old.disclosure = None;
    cloister_host::models::put(c.env().store().as_ref(), &old).unwrap();
    c.request_release(&sci, &m.id, "old model").unwrap();
    assert!(matches!(
        c.decide_release(&appr, &m.id, true),
        Err(ServiceError::Denied { .. })
    ));
    // Rejecting needs no report.
    c.decide_release(&appr, &m.id, false).unwrap();
    let denials = c
        .audit_log(
            &admin,
            &cloister_host::audit::AuditFilter {
                action: Some("approve_release".into()),
                decision: Some(cloister_host::audit::Decision::Deny),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(denials.len(), 1);
    assert_eq!(
        denials[0].record.policies,
        ["release-needs-a-disclosure-pass"]
    );
}

/// The release gate's steps are each checked and changed in one step:
/// of several requests at once one lands, and of approvals and rejections
/// at once exactly one decides, the stored release saying which.
#[test]
fn concurrent_release_requests_and_decisions_land_exactly_once() {
    let Fx {
        _dir,
        c,
        sci,
        rev,
        appr,
        ..
    } = fx();
    let features = hashed_ngrams(&c, &sci, &rev);
    let m = train_logreg(&c, &sci, &features, vec![]);
    let requested: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (c, sci, id) = (&c, &sci, &m.id);
                s.spawn(move || c.request_release(sci, id, &format!("reason {i}")).is_ok())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(requested.iter().filter(|ok| **ok).count(), 1);
    let decided: Vec<(bool, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (c, appr, id) = (&c, &appr, &m.id);
                let approve = i % 2 == 0;
                s.spawn(move || (approve, c.decide_release(appr, id, approve).is_ok()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let landed: Vec<bool> = decided
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(approve, _)| *approve)
        .collect();
    assert_eq!(landed.len(), 1, "{decided:?}");
    let stored = c.show_model(&sci, &m.id).unwrap();
    let want = if landed[0] { "approved" } else { "rejected" };
    assert_eq!(stored.release.decision.as_deref(), Some(want));
    assert_eq!(stored.release.decided_by.as_deref(), Some("appr"));
}

#[test]
fn policies_read_the_report_figures_and_an_older_environment_gets_the_new_schema() {
    let Fx {
        _dir,
        c,
        admin,
        sci,
        rev,
        appr,
    } = fx();
    let features = hashed_ngrams(&c, &sci, &rev);
    let m = train_logreg(&c, &sci, &features, vec![]);
    let report = m.disclosure.clone().unwrap();
    assert!(report.membership.repetitions > 0, "{report:?}");
    assert_ne!(report.verdict.as_str(), "fail", "{report:?}");
    c.request_release(&sci, &m.id, "share it").unwrap();
    drop((c, sci, rev));

    // An environment written by an earlier version: its schema copy lacks
    // the figures; an administrator adds a policy that reads one.
    let path = _dir.path().join("env");
    let schema = path.join("policies/cloister.cedarschema");
    let text = std::fs::read_to_string(&schema).unwrap();
    let old: String = text
        .lines()
        .filter(|l| {
            ![
                "membership_flagged:",
                "membership_auc_milli:",
                "disclosive_rows:",
            ]
            .iter()
            .any(|a| l.trim_start().starts_with(a))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(old, text);
    std::fs::write(&schema, &old).unwrap();
    std::fs::write(
        path.join("policies/strict.cedar"),
        r#"@id("no-release-with-any-membership-signal")
forbid (principal, action == Action::"approve_release", resource)
when { resource.membership_auc_milli > 0 };
"#,
    )
    .unwrap();

    let c = Cloister::open(&path, "cli").unwrap();
    assert_eq!(
        std::fs::read_to_string(&schema).unwrap(),
        cloister_host::policy::DEFAULT_SCHEMA,
        "the reference copy is rewritten"
    );
    match c.decide_release(&appr, &m.id, true) {
        Err(ServiceError::Denied { .. }) => {}
        other => panic!("the stricter policy should decide: {other:?}"),
    }
    let log = |action: &str| {
        c.audit_log(
            &admin,
            &cloister_host::audit::AuditFilter {
                action: Some(action.into()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    assert_eq!(log("refresh_schema").len(), 1);
    let denied = log("approve_release");
    assert_eq!(
        denied.last().unwrap().record.policies,
        ["no-release-with-any-membership-signal"]
    );
    // Opening again changes nothing more.
    drop(c);
    let c = Cloister::open(&path, "cli").unwrap();
    assert_eq!(
        c.audit_log(
            &admin,
            &cloister_host::audit::AuditFilter {
                action: Some("refresh_schema".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .len(),
        1
    );
}

#[test]
fn canaries_show_what_a_template_memorises_and_what_the_release_keeps() {
    let Fx {
        _dir,
        c,
        admin,
        sci,
        rev,
        ..
    } = fx();
    let features = hashed_ngrams(&c, &sci, &rev);
    let train = |sets: Vec<(String, String)>| train_logreg(&c, &sci, &features, sets).id;
    // A template that learns every feature memorises the canaries; the
    // released copy (rows under k records zeroed) does not carry them.
    let learns = train(vec![
        ("min_support".into(), "0".into()),
        ("l2".into(), "0".into()),
    ]);
    let m = c.measure_canaries(&sci, &learns, 20).unwrap();
    let k = m.disclosure.as_ref().unwrap().canaries.clone().unwrap();
    assert_eq!((k.planted, k.references), (20, 1000));
    assert!(k.mean_exposure > 0.6 * k.max_possible, "{k:?}");
    assert!(k.mean_exposure_released < 0.3 * k.max_possible, "{k:?}");
    // Stored with the model.
    let shown = c.show_model(&sci, &learns).unwrap();
    let stored = shown.disclosure.unwrap().canaries.unwrap();
    assert_eq!(stored.planted, k.planted);
    assert!((stored.mean_exposure_released - k.mean_exposure_released).abs() < 1e-9);
    // The shipped template (min_support 10) never learns them.
    let floor = train(vec![]);
    let k = c
        .measure_canaries(&sci, &floor, 20)
        .unwrap()
        .disclosure
        .unwrap()
        .canaries
        .unwrap();
    assert!(k.mean_exposure < 0.3 * k.max_possible, "{k:?}");
    // Bad requests name what is wrong.
    let err = c.measure_canaries(&sci, &floor, 0).unwrap_err();
    assert!(err.to_string().contains("--canaries"), "{err}");
    // Measuring trains a model: authorized and audited as training.
    let entries = c
        .audit_log(
            &admin,
            &cloister_host::audit::AuditFilter {
                action: Some("train_model".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(entries.len() >= 4, "two trainings and two measurements");
}
