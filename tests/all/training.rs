//! Training from templates over approved plugins, evaluation, the model
//! registry and the release gate with signed bundles.

use std::sync::OnceLock;

use cloister_host::models::verify_bundle;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError, TrainRequest};
use cloister_host::users::User;

struct Trained {
    _dir: tempfile::TempDir,
    c: Cloister,
    admin: User,
    sci: User,
    appr: User,
    lab: User,
    normalize: String,
    ngrams: String,
    model: String,
}

/// One environment with SpamAssassin and a logreg model, shared by the
/// tests of this module (training takes a few seconds).
fn trained() -> &'static std::sync::Mutex<Trained> {
    static T: OnceLock<std::sync::Mutex<Trained>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = crate::support::fixture_dir();
        let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
        let admin = c.authenticate(&root).unwrap();
        let add = |n: &str, r: Role| c.add_user(&admin, n, &[r]).unwrap().0;
        let (sci, rev, appr, lab) = (
            add("sci", Role::Scientist),
            add("rev", Role::Reviewer),
            add("appr", Role::Approver),
            add("lab", Role::Labeler),
        );
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/spamassassin/spamassassin.jsonl.gz");
        c.import_dataset(&sci, "spam", &data, &ImportOptions::default())
            .unwrap();
        let digest = |name: &str| {
            let e = c
                .add_plugin(&sci, cloister_bundled_plugins::get(name).unwrap())
                .unwrap();
            c.approve_plugin(&rev, &e.digest).unwrap();
            e.digest
        };
        let normalize = digest("text-normalize");
        let ngrams = digest("hashed-ngrams");
        let req = TrainRequest {
            dataset: "spam".into(),
            preprocess: vec![normalize.clone()],
            preprocess_config: Vec::new(),
            features: ngrams.clone(),
            features_config: Vec::new(),
            template: "logreg".into(),
            sets: vec![],
            split_seed: None,
        };
        let m = c.train_model(&sci, &req, &mut |_| {}).unwrap();
        std::sync::Mutex::new(Trained {
            _dir: dir,
            c,
            admin,
            sci,
            appr,
            lab,
            normalize,
            ngrams,
            model: m.id,
        })
    })
}

fn denied<T: std::fmt::Debug>(r: Result<T, ServiceError>) {
    assert!(
        matches!(r, Err(ServiceError::Denied { .. })),
        "expected a denial, got {r:?}"
    );
}

#[test]
fn logreg_on_spamassassin_is_accurate_and_fully_described() {
    let t = trained().lock().unwrap();
    let m = t.c.show_model(&t.sci, &t.model).unwrap();
    let e = &m.evaluation;
    assert!(e.accuracy > 0.95, "test accuracy {}", e.accuracy);
    assert!(e.macro_f1 > 0.93, "macro F1 {}", e.macro_f1);
    assert_eq!(m.classes, ["ham", "spam"]);
    assert_eq!(
        e.per_class.iter().map(|c| c.support).sum::<u64>(),
        e.records
    );
    assert_eq!(e.confusion.iter().flatten().sum::<u64>(), e.records);
    assert_eq!(
        e.badcases.len() as u64,
        e.records - (e.accuracy * e.records as f64).round() as u64
    );
    // Every badcase is a false positive of the class it was predicted as.
    assert_eq!(
        e.false_positives.values().map(Vec::len).sum::<usize>(),
        e.badcases.len()
    );
    for b in &e.badcases {
        assert!(e.false_positives[&b.predicted].contains(&b.id));
    }
    assert!(m.split_sizes[0] > 4 * m.split_sizes[2]);
    assert!(!m.curve.is_empty() && m.best_epoch >= 1);
    assert_eq!(m.lineage.preprocess, std::slice::from_ref(&t.normalize));
    assert_eq!(m.lineage.features, t.ngrams);
    assert!(e.ece < 0.1, "ECE {}", e.ece);
    denied(t.c.show_model(&t.lab, &t.model));

    // An honest model passes the disclosure check, at most after pruning
    // rare input rows, for at most half a point of test accuracy.
    let r = m.disclosure.as_ref().unwrap();
    eprintln!("disclosure report of the honest spam model: {r:?}");
    assert_ne!(r.verdict.as_str(), "fail", "{r:?}");
    assert_eq!(r.features.test_accuracy, e.accuracy);
    assert!(
        r.features.test_accuracy - r.features.test_accuracy_pruned <= 0.005,
        "{r:?}"
    );
    assert!(
        r.membership.repetitions > 0 && r.membership.mean_auc < 0.65,
        "{r:?}"
    );
}

#[test]
fn the_release_gate_needs_a_second_person_and_bundles_are_tamper_evident() {
    let t = trained().lock().unwrap();
    denied(t.c.export_model(&t.sci, &t.model));
    denied(t.c.decide_release(&t.appr, &t.model, true)); // nothing requested yet
    t.c.request_release(&t.sci, &t.model, "ship the spam filter")
        .unwrap();
    denied(t.c.decide_release(&t.sci, &t.model, true)); // not an approver
    denied(t.c.export_model(&t.sci, &t.model)); // not approved yet
    t.c.decide_release(&t.appr, &t.model, true).unwrap();
    let bundle = t.c.export_model(&t.sci, &t.model).unwrap();
    let key = t.c.env().audit().public_key();
    let ok = verify_bundle(&bundle, Some(&key)).unwrap();
    assert_eq!(ok.manifest.id, t.model);
    // Any modified byte fails: header, manifest, weights.
    for at in [30, 200, bundle.len() / 2, bundle.len() - 1] {
        let mut bad = bundle.clone();
        bad[at] ^= 0x01;
        assert!(verify_bundle(&bad, Some(&key)).is_err(), "byte {at}");
    }
    assert!(verify_bundle(&bundle[..bundle.len() - 1], Some(&key)).is_err());
    assert!(
        verify_bundle(&bundle, Some(&[7u8; 32])).is_err(),
        "another key"
    );
}

#[test]
fn predict_runs_the_models_plugin_chain_on_mock_records() {
    let t = trained().lock().unwrap();
    let mock = [
        cloister_host::types::DataRecord {
            id: "a".into(),
            texts: vec![cloister_host::types::TextField {
                name: "text".into(),
                value: "Meeting notes for tomorrow: agenda and the minutes from last week".into(),
            }],
            numerics: vec![],
            label: None,
        },
        cloister_host::types::DataRecord {
            id: "b".into(),
            texts: vec![cloister_host::types::TextField {
                name: "text".into(),
                value:
                    "CLICK HERE to claim your FREE prize!!! Limited offer, remove me from the list"
                        .into(),
            }],
            numerics: vec![],
            label: None,
        },
    ];
    let cloister_host::service::Predictions {
        ids,
        classes,
        probs,
    } = t.c.predict(&t.sci, &t.model, &mock).unwrap();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(classes, ["ham", "spam"]);
    assert_eq!(probs.len(), 4);
    for row in probs.chunks(2) {
        assert!((row[0] + row[1] - 1.0).abs() < 1e-5);
    }
}

#[test]
fn training_validates_its_request_and_the_mlp_template_trains_too() {
    let t = trained().lock().unwrap();
    let req = |template: &str, sets: &[(&str, &str)]| TrainRequest {
        dataset: "spam".into(),
        preprocess: vec![t.normalize.clone()],
        preprocess_config: Vec::new(),
        features: t.ngrams.clone(),
        features_config: Vec::new(),
        template: template.into(),
        sets: sets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        split_seed: Some(1),
    };
    let err =
        t.c.train_model(
            &t.sci,
            &req("logreg", &[("learning_rte", "0.1")]),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown hyper-parameter `learning_rte`"),
        "{err}"
    );
    let mut wrong_kind = req("logreg", &[]);
    wrong_kind.features = t.normalize.clone();
    assert!(t.c.train_model(&t.sci, &wrong_kind, &mut |_| {}).is_err());
    denied(t.c.train_model(&t.lab, &req("logreg", &[]), &mut |_| {}));
    let m =
        t.c.train_model(
            &t.sci,
            &req("mlp", &[("hidden", "16"), ("epochs", "4")]),
            &mut |_| {},
        )
        .unwrap();
    assert!(
        m.evaluation.accuracy > 0.9,
        "mlp accuracy {}",
        m.evaluation.accuracy
    );
    assert_eq!(m.hyper.hidden, [16]);
}

#[test]
fn a_second_train_on_the_same_inputs_takes_its_features_from_the_cache() {
    let t = trained().lock().unwrap_or_else(|p| p.into_inner());
    let first = t.c.show_model(&t.sci, &t.model).unwrap();
    let calls = |t: &Trained| crate::support::plugin_calls(&t.c, &t.admin);
    let before = calls(&t).len();
    let req = TrainRequest {
        dataset: "spam".into(),
        preprocess: vec![t.normalize.clone()],
        preprocess_config: Vec::new(),
        features: t.ngrams.clone(),
        features_config: Vec::new(),
        template: "logreg".into(),
        sets: vec![],
        split_seed: None,
    };
    let mut stages = Vec::new();
    let again =
        t.c.train_model(&t.sci, &req, &mut |p| {
            if let cloister_host::service::TrainProgress::Stage(s) = p {
                stages.push(s.what.to_string());
            }
        })
        .unwrap();
    assert!(
        stages.iter().any(|s| s == "features from the cache"),
        "{stages:?}"
    );
    // Both plugins' stages are on the record as served from the cache.
    let new: Vec<_> = calls(&t).into_iter().skip(before).collect();
    let codes: Vec<(&str, &str)> = new
        .iter()
        .map(|o| (o.stage.as_str(), o.code.as_str()))
        .collect();
    assert_eq!(codes, [("preprocess", "cached"), ("featurize", "cached")]);
    // The same features give the same weights.
    assert_eq!(again.weights_sha256, first.weights_sha256);
    assert_eq!(again.evaluation.accuracy, first.evaluation.accuracy);

    // Another chain is another entry: the plugins run.
    let other = TrainRequest {
        preprocess: vec![],
        preprocess_config: Vec::new(),
        ..req
    };
    let before = calls(&t).len();
    t.c.train_model(&t.sci, &other, &mut |_| {}).unwrap();
    let new: Vec<_> = calls(&t).into_iter().skip(before).collect();
    assert_eq!(new.len(), 1);
    assert_eq!(
        (new[0].stage.as_str(), new[0].code.as_str()),
        ("featurize", "ok")
    );
}
