//! Fitted featurizers: the fit on the training split (terms in fresh
//! sandboxed instances, counted by the host), the vocabulary by digest in a
//! model's lineage, reused by a second run, loaded for predict, carried in
//! the bundle, checked on every read — and a featurizer that tries to
//! smuggle a record out through its vocabulary.

use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError, TrainProgress, TrainRequest};
use cloister_host::store::{Space, WriteBatch};
use cloister_host::users::User;

use crate::support::{cfg, load, runtime, spamassassin, text};

struct Env {
    _dir: tempfile::TempDir,
    c: Cloister,
    admin: User,
    sci: User,
    appr: User,
    rev: User,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    let add = |n: &str, r: Role| c.add_user(&admin, n, &[r]).unwrap().0;
    let (sci, rev, appr) = (
        add("sci", Role::Scientist),
        add("rev", Role::Reviewer),
        add("appr", Role::Approver),
    );
    Env {
        _dir: dir,
        c,
        admin,
        sci,
        appr,
        rev,
    }
}

fn approve(e: &Env, bytes: &[u8]) -> String {
    let p = e.c.add_plugin(&e.sci, bytes).unwrap();
    e.c.approve_plugin(&e.rev, &p.digest).unwrap();
    p.digest
}

/// (stage, code) of every plugin call audited after the first `skip`.
fn stages(e: &Env, skip: usize) -> Vec<(String, String)> {
    crate::support::plugin_calls(&e.c, &e.admin)
        .into_iter()
        .skip(skip)
        .map(|o| (o.stage, o.code))
        .collect()
}

/// SpamAssassin imported as `spam`, and `text-normalize` and `tfidf`
/// approved: their digests.
fn spam_with_tfidf(e: &Env) -> (String, String) {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/spamassassin/spamassassin.jsonl.gz");
    e.c.import_dataset(&e.sci, "spam", &data, &ImportOptions::default())
        .unwrap();
    (
        approve(e, cloister_bundled_plugins::get("text-normalize").unwrap()),
        approve(e, cloister_bundled_plugins::get("tfidf").unwrap()),
    )
}

fn vocabulary(e: &Env, hex: &str) -> cloister_host::types::Vocabulary {
    cloister_host::fitted::get(e.c.env().store().as_ref(), &hex.parse().unwrap()).unwrap()
}

#[test]
fn tfidf_fits_on_the_training_split_and_its_vocabulary_travels_with_the_model() {
    let e = env();
    let (normalize, tfidf) = spam_with_tfidf(&e);
    let req = TrainRequest {
        dataset: "spam".into(),
        preprocess: vec![normalize],
        preprocess_config: Vec::new(),
        features: tfidf,
        features_config: Vec::new(),
        template: "logreg".into(),
        sets: vec![],
        split_seed: None,
    };
    let m = e.c.train_model(&e.sci, &req, &mut |_| {}).unwrap();
    assert_eq!(
        stages(&e, 0),
        [
            ("preprocess".into(), "ok".into()),
            ("fit".into(), "ok".into()),
            ("featurize".into(), "ok".into()),
        ]
    );
    let state = m.lineage.features_state.clone().expect("a fitted state");
    let v = vocabulary(&e, &state);
    // Counted over the training records only, every term shared by at
    // least k = 10 of them; the features are exactly the vocabulary.
    assert_eq!(u64::from(v.documents), m.split_sizes[0]);
    assert!(v.document_frequencies.iter().all(|&n| n >= 10));
    assert_eq!(m.dim, v.keys.len());
    assert!(m.evaluation.accuracy > 0.96, "{}", m.evaluation.accuracy);
    let report = m.disclosure.as_ref().unwrap();
    let support = report.vocabulary.expect("the vocabulary in the report");
    assert_eq!(support.terms, v.keys.len() as u64);
    assert!(support.min_records >= 10);

    // A second run fits nothing and featurizes nothing: the same state,
    // the same weights.
    let before = stages(&e, 0).len();
    let mut seen = Vec::new();
    let again =
        e.c.train_model(&e.sci, &req, &mut |p| {
            if let TrainProgress::Stage(s) = p {
                seen.push(s.what.to_string());
            }
        })
        .unwrap();
    assert_eq!(
        stages(&e, before),
        [
            ("fit".into(), "cached".into()),
            ("preprocess".into(), "cached".into()),
            ("featurize".into(), "cached".into()),
        ]
    );
    assert!(
        seen.iter().any(|s| s == "features from the cache"),
        "{seen:?}"
    );
    assert_eq!(again.lineage.features_state, m.lineage.features_state);
    assert_eq!(again.weights_sha256, m.weights_sha256);

    // Predict loads the state from the lineage: a spam-like text scores
    // as spam.
    let p =
        e.c.predict(
            &e.sci,
            &m.id,
            &[
                text(
                    "a",
                    "Meeting notes for tomorrow: the agenda and last week's minutes",
                ),
                text(
                    "b",
                    "CLICK HERE for your FREE prize!!! Limited time offer, unsubscribe below",
                ),
            ],
        )
        .unwrap();
    assert_eq!(p.classes, ["ham", "spam"]);
    assert!(p.probs[3] > p.probs[1], "{:?}", p.probs);

    // The bundle carries the state, signed; any changed byte of it fails.
    e.c.request_release(&e.sci, &m.id, "ship it").unwrap();
    e.c.decide_release(&e.appr, &m.id, true).unwrap();
    let bundle = e.c.export_model(&e.sci, &m.id).unwrap();
    let key = e.c.env().audit().public_key();
    let b = cloister_host::models::verify_bundle(&bundle, Some(&key)).unwrap();
    let carried = b.state.expect("the state in the bundle");
    assert_eq!(cloister_host::fitted::decode(&carried).unwrap(), v);
    let at = bundle
        .windows(b"CLVOCAB1".len())
        .position(|w| w == b"CLVOCAB1")
        .unwrap();
    let mut bad = bundle.clone();
    bad[at + 40] ^= 1;
    assert!(cloister_host::models::verify_bundle(&bad, Some(&key)).is_err());

    // A stored state that no longer matches its digest is refused, never
    // used.
    let digest: cloister_host::Digest = state.parse().unwrap();
    let mut k = b"s".to_vec();
    k.extend_from_slice(&digest.0);
    let mut stored = e.c.env().store().get(Space::Fitted, &k).unwrap().unwrap();
    let last = stored.len() - 1;
    stored[last] ^= 1;
    let mut w = WriteBatch::new();
    w.put(Space::Fitted, k, stored);
    e.c.env().store().commit(w).unwrap();
    let r = e.c.predict(&e.sci, &m.id, &[text("a", "hello there")]);
    assert!(
        matches!(
            r,
            Err(ServiceError::Fit(
                cloister_host::fitted::FitError::Damaged { .. }
            ))
        ),
        "{r:?}"
    );
}

/// `train` configures the featurizer (`--features-config`): the lineage
/// records the configuration and predict featurizes with it; `tfidf`'s
/// character n-grams are a block of their own keys, each as supported by
/// k records as the words; an unknown key is refused naming it, a bad
/// value in the boundary's words, and no model is registered.
#[test]
fn the_featurizers_configuration_is_the_models_and_a_bad_one_names_its_key() {
    let e = env();
    let (normalize, tfidf) = spam_with_tfidf(&e);
    let req = |config: &[(&str, &str)]| logreg_on_spam(&normalize, &tfidf, config, &[]);
    let m =
        e.c.train_model(&e.sci, &req(&[("char_ngrams", "2-5")]), &mut |_| {})
            .unwrap();
    assert_eq!(m.lineage.features_config, cfg(&[("char_ngrams", "2-5")]));
    let v = vocabulary(&e, m.lineage.features_state.as_ref().unwrap());
    assert!(v.document_frequencies.iter().all(|&n| n >= 10));
    let grams = v.keys.iter().filter(|&&k| k & 1 == 1).count();
    assert!(
        grams > 1000 && v.keys.len() - grams > 1000,
        "{grams} character n-grams of {} terms",
        v.keys.len()
    );
    assert!(m.evaluation.accuracy > 0.96, "{}", m.evaluation.accuracy);
    let p =
        e.c.predict(
            &e.sci,
            &m.id,
            &[
                text("a", "Meeting notes for tomorrow: the agenda and minutes"),
                text("b", "CLICK HERE for your FREE prize!!! Limited time offer"),
            ],
        )
        .unwrap();
    assert!(p.probs[3] > p.probs[1], "{:?}", p.probs);

    let models = e.c.list_models(&e.sci).unwrap().len();
    // The host names a key the plugin does not declare; a value the
    // plugin refuses gets the boundary's fixed sentence (the plugin's own
    // words, and the key it names, go to the plugin log only).
    for (key, value, said) in [
        ("no_such_key", "1", "no_such_key"),
        ("char_ngrams", "9-2", "the plugin refused its configuration"),
    ] {
        let err =
            e.c.train_model(&e.sci, &req(&[(key, value)]), &mut |_| {})
                .unwrap_err()
                .to_string();
        assert!(err.contains(said), "{key}={value}: {err}");
    }
    assert_eq!(e.c.list_models(&e.sci).unwrap().len(), models);
}

/// `logreg` on "spam" through `normalize` and `tfidf` configured with
/// `config`, the template's settings `sets`.
fn logreg_on_spam(
    normalize: &str,
    tfidf: &str,
    config: &[(&str, &str)],
    sets: &[(&str, &str)],
) -> TrainRequest {
    TrainRequest {
        dataset: "spam".into(),
        preprocess: vec![normalize.into()],
        preprocess_config: Vec::new(),
        features: tfidf.into(),
        features_config: cfg(config),
        template: "logreg".into(),
        sets: cfg(sets),
        split_seed: None,
    }
}

/// `tfidf`'s `tail_buckets`: the words and bigrams outside the vocabulary
/// are hashed into buckets after its columns. A template with its default
/// `min_support` learns only the buckets at least k training records
/// reach, so the model as trained is the released copy; with
/// `min_support = 0` the check finds the buckets fewer records reach and
/// zeroes them in the released copy, like any other row.
#[test]
fn tail_buckets_are_learned_only_where_k_training_records_reach_them() {
    use cloister_host::train::{Kind, Network, Trained};
    let e = env();
    let (normalize, tfidf) = spam_with_tfidf(&e);
    let req = |sets: &[(&str, &str)]| {
        logreg_on_spam(&normalize, &tfidf, &[("tail_buckets", "65536")], sets)
    };
    // Rows from `first` on (the tail's buckets) with a non-zero weight.
    let tail_rows = |weights: Vec<u8>, first: usize| {
        let t = Trained::from_safetensors(Kind::Logreg, &weights).unwrap();
        let Network::Logreg(l) = &t.net else {
            panic!("not a logreg")
        };
        (first..l.dim)
            .filter(|r| l.w[r * l.out..(r + 1) * l.out].iter().any(|w| *w != 0.0))
            .count()
    };
    let dir = e.c.env().dir();
    let m = e.c.train_model(&e.sci, &req(&[]), &mut |_| {}).unwrap();
    let v = vocabulary(&e, m.lineage.features_state.as_ref().unwrap());
    assert_eq!(m.dim, v.keys.len() + 65536);
    let report = m.disclosure.as_ref().unwrap();
    assert_eq!(report.verdict.as_str(), "pass");
    assert_eq!(report.features.disclosive, 0);
    let learned = tail_rows(
        cloister_host::models::weights(dir, None, &m).unwrap(),
        v.keys.len(),
    );
    assert!(
        (100..65536).contains(&learned),
        "{learned} tail buckets learned"
    );
    assert!(m.evaluation.accuracy > 0.96, "{}", m.evaluation.accuracy);

    let all =
        e.c.train_model(&e.sci, &req(&[("min_support", "0")]), &mut |_| {})
            .unwrap();
    let report = all.disclosure.as_ref().unwrap();
    assert_eq!(report.verdict.as_str(), "pass-after-pruning");
    assert!(report.features.disclosive > 0);
    // As trained, buckets fewer than k records reach were learned too; the
    // released copy keeps only the ones k records reach.
    let trained = tail_rows(
        cloister_host::models::weights(dir, None, &all).unwrap(),
        v.keys.len(),
    );
    let released = tail_rows(
        cloister_host::models::release_weights(dir, None, &all).unwrap(),
        v.keys.len(),
    );
    assert!(
        released < trained,
        "{released} of {trained} buckets released"
    );
    assert!(
        released <= learned + learned / 10,
        "{released} vs {learned}"
    );
}

/// Positional byte keys, as the hostile plugin makes them.
fn byte_keys(s: &str) -> Vec<u64> {
    s.bytes()
        .take(64)
        .enumerate()
        .map(|(i, b)| ((i as u64) << 8) | u64::from(b))
        .collect()
}

#[test]
fn a_featurizer_cannot_copy_one_record_into_the_vocabulary() {
    const SECRET: &str = "QXZJ#7741-QXZJ#7741 launch code";
    let mut records = spamassassin();
    records.truncate(400);
    records[0].texts[0].value = SECRET.into();
    let secret_keys = byte_keys(SECRET);

    // The attack is real: one instance that sees many records names the
    // first one's bytes for all of them, so every secret key would be
    // "shared" by every record.
    let hostile = load(cloister_test_plugins::HOSTILE_FIT);
    let limits = cloister_host::runtime::Limits::default();
    let mut one = hostile
        .instantiate_fitted(runtime(), &cfg(&[("attack", "copy")]), &limits, None)
        .unwrap();
    let shared: Vec<Vec<u64>> = records[..20]
        .iter()
        .map(|r| one.terms(r).unwrap())
        .collect();
    let as_if_shared = cloister_host::fitted::count(&shared, 10, 1 << 20).unwrap();
    assert!(
        secret_keys
            .iter()
            .all(|k| as_if_shared.keys.binary_search(k).is_ok())
    );
    // And an instance refuses to featurize before it is loaded.
    assert!(one.featurize(&records[..1]).is_err());
    // The host holds at most so many distinct keys while it counts: past
    // the cap the fit stops with a limit, not with the host's memory.
    let runner = hostile
        .runner(runtime(), &cfg(&[("attack", "none")]), limits.clone())
        .unwrap();
    let counts = runner.term_counts(&records[..50], 1 << 20).unwrap();
    assert_eq!(counts.documents, 50);
    assert!(counts.counts.len() > 100);
    let capped = runner.term_counts(&records[..50], 100);
    assert_eq!(crate::support::code(capped), "limit-terms");

    // Inside an environment every training record is named by a fresh
    // instance: only what k records share alone survives the count.
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("planted.jsonl");
    let mut lines = String::new();
    for r in &records {
        lines.push_str(
            &serde_json::json!({
                "id": r.id,
                "text": r.texts[0].value,
                "label": r.label,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&path, lines).unwrap();
    e.c.import_dataset(&e.sci, "planted", &path, &ImportOptions::default())
        .unwrap();
    let features = approve(&e, cloister_test_plugins::HOSTILE_FIT);
    // The secret record must be in the training split for the test to
    // mean anything: try split seeds until it is.
    let split_of = |seed: u64| {
        let r = cloister_host::types::DataRecord {
            label: None,
            ..records[0].clone()
        };
        cloister_host::datasets::split_of(&r, seed)
    };
    let seed = (0..64)
        .find(|&s| split_of(s) == cloister_host::datasets::Split::Train)
        .unwrap();
    let m =
        e.c.train_model(
            &e.sci,
            &TrainRequest {
                dataset: "planted".into(),
                preprocess: vec![],
                preprocess_config: Vec::new(),
                features,
                features_config: Vec::new(),
                template: "logreg".into(),
                sets: vec![],
                split_seed: Some(seed),
            },
            &mut |_| {},
        )
        .unwrap();
    let v = vocabulary(&e, m.lineage.features_state.as_deref().unwrap());
    assert!(v.document_frequencies.iter().all(|&n| n >= 10));
    let leaked: Vec<&u64> = secret_keys
        .iter()
        .filter(|k| v.keys.binary_search(k).is_ok())
        .collect();
    // "QXZJ#7741" at the start of a text is this record's alone.
    assert!(
        secret_keys[..9].iter().all(|k| !leaked.contains(&k)),
        "secret bytes in the vocabulary: {leaked:?}"
    );
}
