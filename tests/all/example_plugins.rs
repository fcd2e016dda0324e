//! The example plugins on real inputs, with exact expected outputs.

use crate::support::*;
use cloister_host::runtime::{CallStage, Limits};
use cloister_host::types::{Action, ErrorCode, PredictionSet};

#[test]
fn text_normalize_exact_output_and_drops_empty() {
    let p = bundled("text-normalize");
    let mut inst = p.instantiate(runtime(), &[], &Limits::default()).unwrap();
    let input = vec![
        text("a", "  Ｈｅｌｌｏ\t\n ＷＯＲＬＤ  "),
        text("b", " \u{00A0}\t "),
        text("c", "Ünïcödé ﬁne  Straße"),
    ];
    let out = inst.preprocess(&input).unwrap();
    let got: Vec<(&str, &str)> = out
        .iter()
        .map(|r| (r.id.as_str(), r.text("text").unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![("a", "hello world"), ("c", "ünïcödé fine straße")]
    );
}

#[test]
fn text_normalize_keeps_other_fields_and_can_keep_empty() {
    let p = bundled("text-normalize");
    let mut inst = p
        .instantiate(
            runtime(),
            &cfg(&[("drop_empty", "false"), ("lowercase", "false")]),
            &Limits::default(),
        )
        .unwrap();
    let mut r = text("x", "  A  B ");
    r.numerics = numeric("x", "n", &[1.5]).numerics;
    let out = inst.preprocess(&[r, text("y", "   ")]).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].text("text"), Some("A B"));
    assert_eq!(out[0].numerics, numeric("x", "n", &[1.5]).numerics);
    assert_eq!(out[1].text("text"), Some(""));
}

#[test]
fn hashed_ngrams_hand_checked_values() {
    let p = bundled("hashed-ngrams");
    let raw = cfg(&[
        ("ngrams", "1"),
        ("sublinear_tf", "false"),
        ("l2_normalize", "false"),
    ]);
    let mut inst = p.instantiate(runtime(), &raw, &Limits::default()).unwrap();
    assert_eq!(inst.dimension(), 1 << 18);
    let b = inst
        .featurize(&[text("a", "Spam spam SPAM"), text("b", "")])
        .unwrap();
    assert_eq!(b.offsets, vec![0, 1, 1]);
    assert_eq!(b.values[0].abs(), 3.0);

    let mut inst = p
        .instantiate(
            runtime(),
            &cfg(&[("ngrams", "1"), ("l2_normalize", "false")]),
            &Limits::default(),
        )
        .unwrap();
    let b = inst.featurize(&[text("a", "spam spam spam")]).unwrap();
    assert!((b.values[0].abs() - (1.0 + 3f32.ln())).abs() < 1e-6);

    let mut inst = p.instantiate(runtime(), &[], &Limits::default()).unwrap();
    let b = inst
        .featurize(&[text("a", "free money free money now")])
        .unwrap();
    // free, money, now + bigrams "free money" (x2), "money free", "money now".
    assert_eq!(b.offsets, vec![0, 6]);
    let norm: f32 = b.values.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn hashed_ngrams_wasm_matches_native_build_on_the_whole_corpus() {
    let records = spamassassin();
    let p = bundled("hashed-ngrams");
    let wasm = p
        .runner(runtime(), &[], Limits::default())
        .unwrap()
        .featurize(&records)
        .unwrap();

    use cloister_plugin_sdk::{Config, Features, Featurizer, Plugin};
    let mut native = hashed_ngrams::HashedNgrams::configure(
        &Config::new(&hashed_ngrams::HashedNgrams::config_keys(), vec![]).unwrap(),
    )
    .unwrap();
    let sdk_records: Vec<cloister_plugin_sdk::Record> = records
        .iter()
        .map(|r| cloister_plugin_sdk::Record {
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
        })
        .collect();
    let mut out = Features::with_capacity(records.len(), 400);
    native.featurize_batch(&sdk_records, &mut out).unwrap();
    let native = out.into_batch();
    assert_eq!(wasm.offsets, native.offsets);
    assert_eq!(wasm.indices, native.indices);
    assert_eq!(
        wasm.values, native.values,
        "bit-identical values in wasm and native"
    );
    assert!(wasm.indices.len() > 1_000_000);
}

#[test]
fn hashed_ngrams_config_and_input_errors_are_typed() {
    let p = bundled("hashed-ngrams");
    assert_eq!(
        plugin_error(p.instantiate(runtime(), &cfg(&[("bits", "40")]), &Limits::default())),
        (
            CallStage::Configure,
            ErrorCode::InvalidConfig,
            Some("bits".into())
        )
    );
    assert_eq!(
        code(p.instantiate(runtime(), &cfg(&[("colour", "blue")]), &Limits::default())),
        "unknown-config-key"
    );
    assert_eq!(
        code(p.instantiate(
            runtime(),
            &cfg(&[("bits", "8"), ("bits", "9")]),
            &Limits::default()
        )),
        "duplicate-config-key"
    );
    let mut inst = p
        .instantiate(runtime(), &cfg(&[("field", "body")]), &Limits::default())
        .unwrap();
    assert_eq!(
        plugin_error(inst.featurize(&[text("a", "x")])),
        (CallStage::Batch, ErrorCode::InvalidInput, None)
    );
    // A plugin error leaves the instance usable.
    let mut inst2 = p
        .instantiate(runtime(), &cfg(&[("field", "text")]), &Limits::default())
        .unwrap();
    assert!(inst2.featurize(&[text("a", "hello there")]).is_ok());
    assert!(!inst.is_discarded());
}

#[test]
fn standardize_exact_dense_values() {
    let p = bundled("standardize");
    let c = cfg(&[("fields", "a,b"), ("mean", "1,2,3"), ("std", "2,0,0.5")]);
    let mut inst = p.instantiate(runtime(), &c, &Limits::default()).unwrap();
    assert_eq!(inst.dimension(), 3);
    let mut r = numeric("r", "a", &[5.0, 7.0]);
    r.numerics.extend(numeric("r", "b", &[2.0]).numerics);
    let out = inst.featurize(&[r]).unwrap();
    assert_eq!(out.offsets, vec![0, 3]);
    assert_eq!(out.indices, vec![0, 1, 2]);
    assert_eq!(out.values, vec![2.0, 0.0, -2.0]);
    assert_eq!(
        code(inst.featurize(&[numeric("s", "a", &[1.0])])),
        "plugin-error"
    );
    let refused = |pairs: &[(&str, &str)]| {
        plugin_error(p.instantiate(runtime(), &cfg(pairs), &Limits::default()))
    };
    let config_error = |key: &str| {
        (
            CallStage::Configure,
            ErrorCode::InvalidConfig,
            Some(key.into()),
        )
    };
    assert_eq!(refused(&[("std", "1")]), config_error("std"));
    assert_eq!(
        refused(&[("fields", "a"), ("width", "0")]),
        config_error("width")
    );
    assert_eq!(
        refused(&[
            ("fields", "a"),
            ("mean", "0,0"),
            ("std", "1,1"),
            ("width", "3")
        ]),
        config_error("width")
    );

    // Without statistics the values go through as they are (the templates
    // standardize them on the training split): one position per field, or
    // `width` for vector fields.
    let mut raw = p
        .instantiate(runtime(), &cfg(&[("fields", "b,a")]), &Limits::default())
        .unwrap();
    assert_eq!(raw.dimension(), 2);
    let mut r = numeric("r", "a", &[5.5]);
    r.numerics.extend(numeric("r", "b", &[-2.0]).numerics);
    let out = raw.featurize(std::slice::from_ref(&r)).unwrap();
    assert_eq!((out.indices, out.values), (vec![0, 1], vec![-2.0, 5.5]));
    assert_eq!(
        code(raw.featurize(&[numeric("v", "a", &[1.0, 2.0])])),
        "plugin-error"
    );
    let mut wide = p
        .instantiate(
            runtime(),
            &cfg(&[("fields", "a"), ("width", "2")]),
            &Limits::default(),
        )
        .unwrap();
    assert_eq!(wide.dimension(), 2);
    let out = wide.featurize(&[numeric("v", "a", &[1.0, 2.0])]).unwrap();
    assert_eq!(out.values, vec![1.0, 2.0]);
    // `*`: every numeric field of the record, in its order; `width` says
    // how many positions that must make.
    assert_eq!(refused(&[("fields", "*")]), config_error("width"));
    assert_eq!(
        refused(&[("fields", "*,a"), ("width", "2")]),
        config_error("fields")
    );
    let mut every = p
        .instantiate(
            runtime(),
            &cfg(&[("fields", "*"), ("width", "2")]),
            &Limits::default(),
        )
        .unwrap();
    let out = every.featurize(std::slice::from_ref(&r)).unwrap();
    assert_eq!(out.values, vec![5.5, -2.0]);
    // By name, whatever order the record holds them in (a CSV's columns,
    // a JSON object's keys): training and `predict` see the same positions.
    let mut swapped = numeric("s", "b", &[-2.0]);
    swapped.numerics.extend(numeric("s", "a", &[5.5]).numerics);
    let out = every.featurize(&[swapped]).unwrap();
    assert_eq!(out.values, vec![5.5, -2.0]);
    assert_eq!(
        code(every.featurize(&[numeric("v", "a", &[1.0])])),
        "plugin-error"
    );
    // A value single precision cannot hold is the record's error, never an
    // infinite feature.
    assert_eq!(
        code(wide.featurize(&[numeric("v", "a", &[1e300, 2.0])])),
        "plugin-error"
    );
}

fn ps(id: &str, models: &[&[f32]]) -> PredictionSet {
    PredictionSet {
        id: id.into(),
        models: models.iter().map(|m| m.to_vec()).collect(),
    }
}

#[test]
fn dual_agree_rule() {
    let p = bundled("dual-agree");
    let mut inst = p
        .instantiate(
            runtime(),
            &cfg(&[("threshold", "0.95")]),
            &Limits::default(),
        )
        .unwrap();
    let classes = vec!["ham".to_string(), "spam".to_string()];
    let d = inst
        .select(
            &classes,
            &[
                ps("agree", &[&[0.01, 0.99], &[0.03, 0.97]]),
                ps("unsure", &[&[0.1, 0.9], &[0.03, 0.97]]),
                ps("disagree", &[&[0.8, 0.2], &[0.1, 0.9]]),
            ],
        )
        .unwrap();
    assert_eq!(d[0].action, Action::AutoAccept(1));
    assert_eq!(d[0].priority, 0.0);
    assert_eq!(d[1].action, Action::HumanReview);
    assert!((d[1].priority - 0.065).abs() < 1e-6, "{}", d[1].priority);
    assert_eq!(d[2].action, Action::HumanReview);
    assert!((d[2].priority - 1.15).abs() < 1e-6, "{}", d[2].priority);
    assert!(d[2].priority > d[1].priority);
    // One model is not enough for an agreement rule.
    assert_eq!(
        code(inst.select(&classes, &[ps("one", &[&[0.0, 1.0]])])),
        "plugin-error"
    );
}

#[test]
fn dual_agree_margin_rank() {
    let p = bundled("dual-agree");
    let mut inst = p
        .instantiate(
            runtime(),
            &cfg(&[("threshold", "0.95"), ("rank", "margin")]),
            &Limits::default(),
        )
        .unwrap();
    let classes: Vec<String> = ["a", "b", "c", "d"].iter().map(|c| c.to_string()).collect();
    let d = inst
        .select(
            &classes,
            &[
                // Flat over four classes: low top probability, wide margin
                // relative to its rivals (0.4 - 0.2).
                ps("flat", &[&[0.4, 0.2, 0.2, 0.2], &[0.4, 0.2, 0.2, 0.2]]),
                // A two-way confusion: higher top probability, tiny margin.
                ps("torn", &[&[0.5, 0.45, 0.05, 0.0], &[0.5, 0.45, 0.05, 0.0]]),
                // Disagreement still ranks first; the mean is [0.45, 0.45, ..].
                ps("split", &[&[0.8, 0.1, 0.1, 0.0], &[0.1, 0.8, 0.1, 0.0]]),
                ps("sure", &[&[0.0, 0.0, 0.99, 0.01], &[0.0, 0.0, 0.98, 0.02]]),
            ],
        )
        .unwrap();
    assert!((d[0].priority - 0.8).abs() < 1e-6, "{}", d[0].priority);
    assert!((d[1].priority - 0.95).abs() < 1e-6, "{}", d[1].priority);
    assert!((d[2].priority - 2.0).abs() < 1e-6, "{}", d[2].priority);
    assert_eq!(d[3].action, Action::AutoAccept(2));
    // With the default rank the flat record would come first (1 - 0.4 > 1 - 0.5).
    let mut conf = p
        .instantiate(
            runtime(),
            &cfg(&[("threshold", "0.95")]),
            &Limits::default(),
        )
        .unwrap();
    let c = conf
        .select(
            &classes,
            &[
                ps("flat", &[&[0.4, 0.2, 0.2, 0.2], &[0.4, 0.2, 0.2, 0.2]]),
                ps("torn", &[&[0.5, 0.45, 0.05, 0.0], &[0.5, 0.45, 0.05, 0.0]]),
            ],
        )
        .unwrap();
    assert!(c[0].priority > c[1].priority);
    assert_eq!(
        plugin_error(p.instantiate(runtime(), &cfg(&[("rank", "entropy")]), &Limits::default())),
        (
            CallStage::Configure,
            ErrorCode::InvalidConfig,
            Some("rank".into())
        )
    );
}

#[test]
fn uncertainty_selectors_order_by_uncertainty() {
    let classes = vec!["a".to_string(), "b".to_string()];
    let items = [
        ps("sure", &[&[1.0, 0.0], &[0.9, 0.1]]),
        ps("coin", &[&[0.5, 0.5], &[0.5, 0.5]]),
    ];
    let mut lc = bundled("least-confidence")
        .instantiate(runtime(), &[], &Limits::default())
        .unwrap();
    let d = lc.select(&classes, &items).unwrap();
    assert!(d.iter().all(|d| d.action == Action::HumanReview));
    assert!((d[0].priority - 0.05).abs() < 1e-6);
    assert!((d[1].priority - 0.5).abs() < 1e-6);
    let mut en = bundled("entropy")
        .instantiate(runtime(), &[], &Limits::default())
        .unwrap();
    let d = en.select(&classes, &items).unwrap();
    assert!((d[1].priority - 1.0).abs() < 1e-6);
    // Mean [0.95, 0.05]: -(0.95 ln 0.95 + 0.05 ln 0.05) / ln 2 = 0.2864.
    assert!((d[0].priority - 0.2864).abs() < 1e-3, "{}", d[0].priority);
}

#[test]
fn selector_input_is_checked_by_the_host() {
    let mut inst = bundled("entropy")
        .instantiate(runtime(), &[], &Limits::default())
        .unwrap();
    let classes = vec!["a".to_string(), "b".to_string()];
    assert_eq!(
        code(inst.select(&classes, &[ps("x", &[&[0.5, 0.3, 0.2]])])),
        "invalid-input"
    );
    assert_eq!(
        code(inst.select(&classes, &[ps("x", &[&[f32::NAN, 0.5]])])),
        "invalid-input"
    );
    assert_eq!(
        code(inst.select(&["a".into(), "a".into()], &[ps("x", &[&[0.5, 0.5]])])),
        "invalid-input"
    );
    assert_eq!(
        code(inst.select(
            &classes,
            &[ps("x", &[&[0.5, 0.5]]), ps("x", &[&[0.5, 0.5]])]
        )),
        "invalid-input"
    );
}

#[test]
fn wrong_kind_is_a_typed_error() {
    let p = bundled("entropy");
    assert_eq!(
        code(
            p.runner(runtime(), &[], Limits::default())
                .unwrap()
                .featurize(&[text("a", "b")])
        ),
        "wrong-kind"
    );
}

#[test]
fn parallel_runs_equal_sequential_runs() {
    let records: Vec<_> = spamassassin().into_iter().take(1500).collect();
    let p = bundled("hashed-ngrams");
    let one = p
        .runner(runtime(), &[], Limits::default())
        .unwrap()
        .workers(1)
        .batch_size(100)
        .featurize(&records)
        .unwrap();
    let four = p
        .runner(runtime(), &[], Limits::default())
        .unwrap()
        .workers(4)
        .batch_size(37)
        .featurize(&records)
        .unwrap();
    assert_eq!(one, four);
    let pre = bundled("text-normalize");
    let a = pre
        .runner(runtime(), &[], Limits::default())
        .unwrap()
        .workers(1)
        .preprocess(&records)
        .unwrap();
    let b = pre
        .runner(runtime(), &[], Limits::default())
        .unwrap()
        .workers(3)
        .batch_size(50)
        .preprocess(&records)
        .unwrap();
    assert_eq!(a, b);
}
