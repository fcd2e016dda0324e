//! Plugins written in Python: a componentize-py component of the
//! `preprocessor` world, built from `plugins/python/lowercase`, loads and
//! runs in the same sandbox as the Rust plugins.
//!
//! Building needs `componentize-py` (PyPI). `.ci/run` installs it and sets
//! `CLOISTER_REQUIRE_PYTHON=1`, so there the test fails if it is missing;
//! elsewhere it says it skipped.

use std::path::Path;
use std::process::Command;

use cloister_host::runtime::{Limits, Runtime, RuntimeConfig};

use crate::support::text;

/// Builds `DIR/app.py` against `world`; `None` when componentize-py is
/// not installed.
fn build(dir: &str, world: &str, out: &Path) -> Option<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wit = root.join("plugin-sdk/wit");
    // Built from a copy, so that nothing the build writes (bytecode
    // caches) lands in the source tree.
    let src = out.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(root.join(dir).join("app.py"), src.join("app.py")).unwrap();
    let status = Command::new("componentize-py")
        .arg("-q")
        .arg("-d")
        .arg(&wit)
        .args(["-w", world, "componentize", "--stub-wasi", "app", "-o"])
        .arg(out)
        .current_dir(&src)
        .status();
    match status {
        Ok(s) => {
            assert!(s.success(), "componentize-py failed on {dir}");
            Some(std::fs::read(out).unwrap())
        }
        Err(_) => {
            assert!(
                std::env::var_os("CLOISTER_REQUIRE_PYTHON").is_none(),
                "componentize-py is required (pip install componentize-py==0.25.1)"
            );
            eprintln!("SKIPPED: componentize-py is not installed");
            None
        }
    }
}

#[test]
fn a_componentize_py_preprocessor_runs_in_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bytes) = build(
        "plugins/python/lowercase",
        "preprocessor",
        &dir.path().join("lc.wasm"),
    ) else {
        return;
    };
    // Its own runtime: the component's many core instances (CPython, its
    // libc, the stubs) are what the pooling limits must admit.
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let inspection = rt.inspect(&bytes);
    assert!(inspection.verdict.is_ok(), "{:?}", inspection.verdict);
    // `--stub-wasi`: nothing imported but the plugin types.
    assert_eq!(inspection.imports, ["cloister:plugin/types@0.1.0"]);
    let p = rt.load(&bytes).unwrap();
    assert_eq!(p.metadata.name, "py-lowercase");
    let out = p
        .runner(&rt, &[], Limits::default())
        .unwrap()
        .preprocess(&[text("a", "Hello WORLD"), text("b", "MiXeD Case")])
        .unwrap();
    let texts: Vec<&str> = out.iter().map(|r| r.texts[0].value.as_str()).collect();
    assert_eq!(texts, ["hello world", "mixed case"]);
}

#[test]
fn python_attacks_on_the_sandbox_end_in_limits_and_traps() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bytes) = build(
        "tests/plugins/python-hostile",
        "preprocessor",
        &dir.path().join("hostile.wasm"),
    ) else {
        return;
    };
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let p = rt.load(&bytes).unwrap();
    let tight = Limits {
        fuel: 2_000_000_000,
        memory_bytes: 128 << 20,
        output_bytes: 1 << 20,
        timeout: std::time::Duration::from_secs(5),
        ..Limits::default()
    };
    let batch = [text("a", "Hello"), text("b", "World")];
    let run = |attack: &str| {
        let mut inst = p
            .instantiate(&rt, &crate::support::cfg(&[("attack", attack)]), &tight)
            .unwrap();
        let r = inst.preprocess(&batch);
        (r, inst.is_discarded())
    };
    let (ok, _) = run("none");
    assert_eq!(ok.unwrap().len(), 2);
    for (attack, code) in [
        ("spin", "limit-fuel"),
        ("memory", "limit-memory"),
        ("recursion", "trap"),
        ("output", "limit-output"),
        ("stdout", "trap"),
        ("invent", "invalid-output"),
    ] {
        let (r, discarded) = run(attack);
        let got = crate::support::code(r);
        assert_eq!(got, code, "{attack}");
        assert!(discarded, "{attack}: the instance is discarded");
    }
}

#[test]
fn a_python_selector_decides_as_its_rust_twin_does() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bytes) = build(
        "plugins/python/least-confidence",
        "selector",
        &dir.path().join("lc.wasm"),
    ) else {
        return;
    };
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let py = rt.load(&bytes).unwrap();
    let rust = rt
        .load(cloister_bundled_plugins::get("least-confidence").unwrap())
        .unwrap();
    // 500 records, two models, three classes, random distributions.
    let mut rng = cloister_host::train::model::Rng::new(9);
    let mut dist = || {
        let v: Vec<f32> = (0..3).map(|_| rng.unit() + 0.01).collect();
        let s: f32 = v.iter().sum();
        v.into_iter().map(|x| x / s).collect::<Vec<f32>>()
    };
    let items: Vec<cloister_host::types::PredictionSet> = (0..500)
        .map(|i| cloister_host::types::PredictionSet {
            id: format!("r{i}"),
            models: vec![dist(), dist()],
        })
        .collect();
    let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let decide = |p: &cloister_host::runtime::LoadedPlugin| {
        p.runner(&rt, &[], Limits::default())
            .unwrap()
            .select(&classes, &items)
            .unwrap()
    };
    let (a, b) = (decide(&py), decide(&rust));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.id, &x.action), (&y.id, &y.action));
        // Python computes in f64, Rust in f32: the same priority to f32
        // rounding.
        assert!((x.priority - y.priority).abs() < 1e-6, "{x:?} {y:?}");
    }
    // Distributions over the wrong classes never reach it: the host's
    // input check refuses them, for Python as for Rust.
    let bad = [cloister_host::types::PredictionSet {
        id: "x".into(),
        models: vec![vec![0.5, 0.5], vec![0.5, 0.5]],
    }];
    let mut inst = py.instantiate(&rt, &[], &Limits::default()).unwrap();
    assert!(inst.select(&classes[..2], &bad).is_ok());
    assert_eq!(
        crate::support::code(inst.select(&classes, &bad)),
        "invalid-input"
    );
}

/// The bundled digits (8×8 pixels): records, and the per-pixel mean and
/// standard deviation as `standardize` configuration.
fn digits() -> (Vec<cloister_host::types::DataRecord>, Vec<(String, String)>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits/digits.jsonl.gz");
    let records = cloister_host::records::read_file(&path, Default::default()).unwrap();
    let n = records.len() as f64;
    let px =
        |r: &cloister_host::types::DataRecord| r.numeric("pixels").unwrap().as_slice().to_vec();
    let mut mean = vec![0f64; 64];
    for r in &records {
        for (m, x) in mean.iter_mut().zip(px(r)) {
            *m += x / n;
        }
    }
    let mut var = vec![0f64; 64];
    for r in &records {
        for ((v, m), x) in var.iter_mut().zip(&mean).zip(px(r)) {
            *v += (x - m) * (x - m) / n;
        }
    }
    let join = |v: &[f64]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let std: Vec<f64> = var.iter().map(|v| v.sqrt()).collect();
    let records = records
        .into_iter()
        .map(|r| cloister_host::types::DataRecord { label: None, ..r })
        .collect();
    (
        records,
        crate::support::cfg(&[
            ("fields", "pixels"),
            ("mean", &join(&mean)),
            ("std", &join(&std)),
        ]),
    )
}

#[test]
fn a_python_featurizer_gives_its_rust_twins_features_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bytes) = build(
        "plugins/python/standardize",
        "featurizer",
        &dir.path().join("std.wasm"),
    ) else {
        return;
    };
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let py = rt.load(&bytes).unwrap();
    let rust = rt
        .load(cloister_bundled_plugins::get("standardize").unwrap())
        .unwrap();
    let (records, config) = digits();
    let run = |p: &cloister_host::runtime::LoadedPlugin| {
        p.runner(&rt, &config, Limits::default())
            .unwrap()
            .featurize(&records)
            .unwrap()
    };
    let (a, b) = (run(&py), run(&rust));
    assert_eq!(a.offsets, b.offsets);
    assert_eq!(a.indices, b.indices);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.values), bits(&b.values), "bit for bit");
    assert_eq!(a.rows(), records.len());
    // Its configuration errors name the key, as the Rust one's do.
    let bad = py.instantiate(
        &rt,
        &crate::support::cfg(&[("std", "1")]),
        &Limits::default(),
    );
    assert_eq!(
        crate::support::plugin_error(bad),
        (
            cloister_host::runtime::CallStage::Configure,
            cloister_host::types::ErrorCode::InvalidConfig,
            Some("mean".into())
        )
    );
}
