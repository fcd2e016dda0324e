//! Plugins written in Python: componentize-py components built with
//! `cloister plugin build` from the Python SDK (`plugin-sdk/python`) run in
//! the same sandbox as the Rust plugins, decide and featurize as their
//! Rust twins do, meet the same limits when they attack, and say nothing a
//! person may not see.
//!
//! Building needs `componentize-py` (PyPI). `.ci/run` installs it and sets
//! `CLOISTER_REQUIRE_PYTHON=1`, so there the tests fail if it is missing;
//! elsewhere they say they skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use cloister_host::runtime::{Limits, Runtime, RuntimeConfig};

use crate::boundary::{
    digest_of, env_with_plugins, featurizer_channels_are_sealed, selector_priorities_are_sealed,
};
use crate::support::text;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether componentize-py runs here (a failure under
/// `CLOISTER_REQUIRE_PYTHON`).
fn python_available() -> bool {
    let ok = Command::new("componentize-py")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CLOISTER_REQUIRE_PYTHON").is_none(),
            "componentize-py is required (pip install componentize-py==0.25.1)"
        );
        eprintln!("SKIPPED: componentize-py is not installed");
    }
    ok
}

/// A scratch directory for the whole test binary's builds.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(crate::support::fixture_dir).path()
}

/// `cloister plugin build DIR --world WORLD`: the component's bytes, built
/// once per test binary; `None` when componentize-py is not installed.
pub(crate) fn build(dir: &str, world: &str) -> Option<Vec<u8>> {
    static BUILT: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    if !python_available() {
        return None;
    }
    let built = BUILT.get_or_init(Default::default);
    // One build at a time: each is CPU-heavy, and a second test asking
    // for the same plugin waits for the first one's bytes.
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bytes) = built.get(dir) {
        return Some(bytes.clone());
    }
    let out = scratch().join(format!("{}.wasm", dir.replace('/', "_")));
    let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .args(["plugin", "build"])
        .arg(root().join(dir))
        .args(["--world", world, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cloister plugin build {dir}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    built.insert(dir.to_string(), bytes.clone());
    Some(bytes)
}

#[test]
fn a_componentize_py_preprocessor_runs_in_the_sandbox() {
    let Some(bytes) = build("plugins/python/lowercase", "preprocessor") else {
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
    let Some(bytes) = build("tests/plugins/python-hostile", "preprocessor") else {
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
    let Some(bytes) = build("plugins/python/least-confidence", "selector") else {
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
    let Some(bytes) = build("plugins/python/standardize", "featurizer") else {
        return;
    };
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let py = rt.load(&bytes).unwrap();
    let rust = rt
        .load(cloister_bundled_plugins::get("standardize").unwrap())
        .unwrap();
    let (records, stats) = digits();
    // With statistics, and without (the values as they are).
    let raw = crate::support::cfg(&[("fields", "pixels"), ("width", "64")]);
    let every = crate::support::cfg(&[("fields", "*"), ("width", "64")]);
    for config in [&stats, &raw, &every] {
        let run = |p: &cloister_host::runtime::LoadedPlugin| {
            p.runner(&rt, config, Limits::default())
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
    }
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
            Some("std".into())
        )
    );
}

/// `cloister` as `role` in the boundary environment `e`; (success,
/// stdout + stderr).
fn cli(e: &crate::boundary::Env, role: &str, args: &[&str]) -> (bool, String) {
    let o = e.cli(role, args);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `python3 ARGS…` natively (no component) with the Python SDK on its
/// path, from the repository root, `input` on its standard input; `None`
/// where python3 is not installed (a failure under
/// `CLOISTER_REQUIRE_PYTHON`).
fn sdk_python(args: &[&str], input: &str) -> Option<std::process::Output> {
    use std::io::Write;
    let child = Command::new("python3")
        .args(args)
        .current_dir(root())
        .env("PYTHONPATH", root().join("plugin-sdk/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::env::var_os("CLOISTER_REQUIRE_PYTHON").is_none() =>
        {
            eprintln!("SKIPPED: python3 is not installed");
            return None;
        }
        Err(e) => panic!("python3: {e}"),
    };
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    Some(o)
}

/// `script` run by [`sdk_python`] with `input` (JSON) on its standard
/// input; what it printed, as JSON.
fn sdk_python_json(script: &str, input: &str) -> Option<serde_json::Value> {
    let o = sdk_python(&["-c", script], input)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

#[test]
fn the_python_testing_harness_passes_its_own_tests() {
    // plugin-sdk/python/tests: the examples pass the harness, and every
    // rule a plugin can break is refused with its name. The tutorial's
    // example carries its own native tests, as the tutorial shows.
    // And the tutorial's snippet of it runs as printed, beside the
    // example's `app.py`.
    let doc = std::fs::read_to_string(root().join("docs/plugin-authoring.md")).unwrap();
    let snippet = crate::cli::doc_block(&doc, "`hashed-words/test_app.py`:");
    let tutorial = tempfile::tempdir().unwrap();
    std::fs::copy(
        root().join("plugins/python/hashed-words/app.py"),
        tutorial.path().join("app.py"),
    )
    .unwrap();
    let indent = snippet.len() - snippet.trim_start().len();
    let unindented: String = snippet
        .lines()
        .map(|l| format!("{}\n", l.get(indent.min(l.len())..).unwrap_or("")))
        .collect();
    std::fs::write(tutorial.path().join("test_app.py"), unindented).unwrap();
    let tutorial_dir = tutorial.path().to_str().unwrap();
    for dir in [
        "plugin-sdk/python/tests",
        "plugins/python/hashed-words",
        tutorial_dir,
    ] {
        let Some(o) = sdk_python(&["-m", "unittest", "discover", "-s", dir], "") else {
            return;
        };
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{dir}: {said}");
        assert!(
            said.contains("\nOK") && !said.contains("Ran 0 tests"),
            "{dir}: {said}"
        );
    }
}

#[test]
fn the_python_testing_harness_refuses_the_metadata_the_host_refuses() {
    // The harness restates `plugin add`'s metadata rules in Python; they
    // must agree with the Rust SDK's (which the sandbox's own check is
    // pinned to) on every case below and on every character's verdict.
    use cloister_plugin_sdk::{ConfigKey, Metadata, PluginKind, testing};
    let key = |name: &str, default: &str, description: &str| ConfigKey {
        name: name.into(),
        default_value: default.into(),
        description: description.into(),
    };
    let meta = |name: &str, version: &str, description: &str, config: Vec<ConfigKey>| Metadata {
        name: name.into(),
        version: version.into(),
        kind: PluginKind::Featurizer,
        description: description.into(),
        config,
    };
    let long_default = "x".repeat(65_537);
    let many: Vec<ConfigKey> = (0..65).map(|i| key(&format!("k{i}"), "", "")).collect();
    let cases = vec![
        meta("words", "0.1.0", "Counts words", vec![]),
        meta("a.b_c-1", "1.2.3-rc.1+build.5", "naïve 日本語", vec![]),
        meta("", "0.1.0", "", vec![]),
        meta("Words", "0.1.0", "", vec![]),
        meta("-words", "0.1.0", "", vec![]),
        meta("9lives", "0.1.0", "", vec![]),
        meta(&"w".repeat(64), "0.1.0", "", vec![]),
        meta(&"w".repeat(65), "0.1.0", "", vec![]),
        meta("wörds", "0.1.0", "", vec![]),
        meta("words", "1.0", "", vec![]),
        meta("words", "v1.0.0", "", vec![]),
        meta("words", "1.0.0.0", "", vec![]),
        meta("words", "1.0.x", "", vec![]),
        meta("words", "1.0.0-", "", vec![]),
        meta("words", "01.0.0+ü", "", vec![]),
        meta("words", "0.1.0", "safe \u{202E}gnp.exe", vec![]),
        meta("words", "0.1.0", &"d".repeat(1000), vec![]),
        meta("words", "0.1.0", &"d".repeat(1001), vec![]),
        meta("words", "0.1.0", &"é".repeat(1000), vec![]),
        meta("words", "0.1.0", "tab\there", vec![]),
        meta(
            "words",
            "0.1.0",
            "",
            vec![key("a", "", ""), key("a", "", "")],
        ),
        meta("words", "0.1.0", "", vec![key("A", "", "")]),
        meta("words", "0.1.0", "", vec![key("a", "x\u{1b}[2J", "")]),
        meta("words", "0.1.0", "", vec![key("a", &long_default, "")]),
        meta(
            "words",
            "0.1.0",
            "",
            vec![key("a", "", "zero\u{200B}width")],
        ),
        meta("words", "0.1.0", "", many),
    ];
    let rust: Vec<Option<&str>> = cases
        .iter()
        .map(|m| match testing::check_metadata_of(m) {
            Ok(()) => None,
            Err(testing::Refused::Metadata { field, .. }) => Some(field),
            Err(other) => panic!("{other}"),
        })
        .collect();
    assert!(rust.iter().filter(|f| f.is_none()).count() >= 2, "{rust:?}");
    let as_json: Vec<serde_json::Value> = cases
        .iter()
        .map(|m| {
            serde_json::json!([
                m.name,
                m.version,
                m.description,
                m.config
                    .iter()
                    .map(|k| [&k.name, &k.default_value, &k.description])
                    .collect::<Vec<_>>()
            ])
        })
        .collect();
    let chars: Vec<u32> = (0..0x3100)
        .chain(0xFE00..0x10000)
        .chain(0xE0000..0xE0100)
        .filter(|&c| char::from_u32(c).is_some())
        .collect();
    let script = r#"
import json, sys
from cloister_plugin import ConfigKey, Featurizer, testing
cases, chars = json.load(sys.stdin)
fields = []
for name, version, description, keys in cases:
    cls = type("M", (Featurizer,), {"NAME": name, "VERSION": version, "DESCRIPTION": description,
                                    "CONFIG": [ConfigKey(*k) for k in keys]})
    try:
        testing.check_metadata(cls)
        fields.append(None)
    except testing.Refused as e:
        fields.append(e.field)
print(json.dumps([fields, [c for c in chars if testing.is_deceptive(chr(c))]]))
"#;
    let arg = serde_json::to_string(&(as_json, &chars)).unwrap();
    let Some(v) = sdk_python_json(script, &arg) else {
        return;
    };
    assert_eq!(
        v[0],
        serde_json::json!(rust),
        "fields refused, case by case"
    );
    let deceptive: Vec<u32> = chars
        .iter()
        .copied()
        .filter(|&c| char::from_u32(c).is_some_and(testing::is_deceptive))
        .collect();
    assert_eq!(v[1], serde_json::json!(deceptive));
}

#[test]
fn the_python_sdk_agrees_with_the_rust_sdk_natively() {
    // Everything but `export` is plain Python: run it with python3, no
    // component involved, and compare with the Rust SDK.
    let terms = ["spam", "new york", "naïve", "", "日本語", "a b  c"];
    let script = r#"
import json, sys
from cloister_plugin import *
terms = json.load(sys.stdin)
out = {"keys": [str(term_key(t)) for t in terms],
       "parts": str(term_key_parts(["new", "york"]))}
f = Features()
f.push(5, 1.0); f.push(2, 2.0); f.push(5, 0.5); f.end_row(); f.end_row()
out["features"] = [f.offsets, f.indices, f.values]
errors = []
for keys, pairs, get in [
    ([ConfigKey("bits", "18")], [("bitz", "1")], None),
    ([ConfigKey("bits", "18")], [("bits", "1"), ("bits", "2")], None),
    ([ConfigKey("bits", "x")], [], lambda c: c.get_int("bits")),
    ([ConfigKey("bits", "30")], [], lambda c: c.get_int("bits", 1, 24)),
    ([ConfigKey("mean", "1,inf")], [], lambda c: c.get_list("mean", float)),
    ([ConfigKey("flag", "maybe")], [], lambda c: c.get_bool("flag")),
]:
    try:
        c = Config(keys, pairs)
        get(c)
        errors.append(None)
    except PluginError as e:
        errors.append([e.code, e.key])
out["errors"] = errors
c = Config([ConfigKey("bits", "18"), ConfigKey("on", "yes")], [("bits", " 12 ")])
out["config"] = [c.get_int("bits"), c.get_bool("on"), c.get_list("bits", int)]
print(json.dumps(out))
"#;
    let Some(v) = sdk_python_json(script, &serde_json::to_string(&terms).unwrap()) else {
        return;
    };
    for (t, k) in terms.iter().zip(v["keys"].as_array().unwrap()) {
        assert_eq!(
            k.as_str().unwrap(),
            cloister_plugin_sdk::term_key(t).to_string(),
            "term_key({t:?})"
        );
    }
    assert_eq!(
        v["parts"].as_str().unwrap(),
        cloister_plugin_sdk::term_key_parts(&["new", "york"]).to_string()
    );
    // Rows sorted, repeats summed, an empty row kept: as the Rust Features.
    assert_eq!(
        v["features"],
        serde_json::json!([[0, 2, 2], [2, 5], [2.0, 1.5]])
    );
    assert_eq!(
        v["errors"],
        serde_json::json!([
            ["invalid-config", "bitz"],
            ["invalid-config", "bits"],
            ["invalid-config", "bits"],
            ["invalid-config", "bits"],
            ["invalid-config", "mean"],
            ["invalid-config", "flag"],
        ])
    );
    assert_eq!(v["config"], serde_json::json!([12, true, [12]]));
}

#[test]
fn python_featurizer_channels_reach_no_one_but_admins() {
    let Some(leak) = build("tests/plugins/python-hostile-leak", "featurizer") else {
        return;
    };
    let e = env_with_plugins(
        80,
        1,
        &[
            &leak,
            cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
        ],
    );
    // hostile-leak's channels, and Python's own: an exception whose
    // message (and so its traceback) carries the text.
    featurizer_channels_are_sealed(
        &e,
        "py-hostile-leak",
        &[
            "leak-index",
            "leak-key",
            "leak-detail",
            "leak-exception",
            "leak-count",
        ],
    );
    // The traceback reached the administrators' log, whole.
    let (ok, log) = cli(&e, "admin", &["plugin", "log", "--limit", "0", "--json"]);
    assert!(ok, "{log}");
    assert!(log.contains("KeyError") && log.contains("ZQXJ"), "{log}");
}

#[test]
fn python_metadata_that_reads_differently_is_refused_by_build_and_add() {
    if !python_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `cloister plugin build` inspects what it built and keeps nothing
    // the sandbox refuses.
    let out = dir.path().join("meta.wasm");
    let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .args(["plugin", "build"])
        .arg(root().join("tests/plugins/python-hostile-meta"))
        .args(["--world", "preprocessor", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{said}");
    assert!(said.contains("[bad-metadata]"), "{said}");
    assert!(!said.contains('\u{202E}'), "{said}");
    assert!(!out.exists(), "nothing is written");
    // Built by hand, as an attacker would, it is refused at add.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("cloister_plugin")).unwrap();
    std::fs::copy(
        root().join("tests/plugins/python-hostile-meta/app.py"),
        src.join("app.py"),
    )
    .unwrap();
    std::fs::copy(
        root().join("plugin-sdk/python/cloister_plugin/__init__.py"),
        src.join("cloister_plugin/__init__.py"),
    )
    .unwrap();
    let status = Command::new("componentize-py")
        .arg("-q")
        .arg("-d")
        .arg(root().join("plugin-sdk/wit"))
        .args([
            "-w",
            "preprocessor",
            "componentize",
            "--stub-wasi",
            "app",
            "-o",
        ])
        .arg(&out)
        .current_dir(&src)
        .status()
        .unwrap();
    assert!(status.success());
    let e = env_with_plugins(4, 1, &[]);
    let (ok, said) = cli(&e, "sci", &["plugin", "add", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        said.contains("bad-metadata") || said.contains("metadata field `description`"),
        "{said}"
    );
    assert!(!said.contains('\u{202E}'), "{said}");
    let (_, listed) = cli(&e, "rev", &["plugin", "list", "--json"]);
    assert!(!listed.contains("py-hostile-meta"), "{listed}");
}

#[test]
fn a_python_plugin_goes_from_source_to_train_and_a_pipeline() {
    // docs/plugin-authoring.md, "Plugins in Python", step by step.
    let (Some(words), Some(selector)) = (
        build("plugins/python/hashed-words", "featurizer"),
        build("plugins/python/least-confidence", "selector"),
    ) else {
        return;
    };
    let e = env_with_plugins(200, 1, &[]);
    let dir = e.dir.path();
    let (words_file, selector_file) = (dir.join("words.wasm"), dir.join("lc.wasm"));
    std::fs::write(&words_file, &words).unwrap();
    std::fs::write(&selector_file, &selector).unwrap();

    // Run on mock data: no environment involved.
    let mock = dir.join("mock.jsonl");
    std::fs::write(
        &mock,
        "{\"id\": \"m1\", \"text\": \"FREE money, free!\"}\n{\"id\": \"m2\", \"text\": \"see you at lunch\"}\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .args(["plugin", "run", words_file.to_str().unwrap(), "--input"])
        .arg(&mock)
        .args(["--config", "bits=8"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    // "free" twice and "money" once: two buckets, the first weighted
    // 1 + ln 2 before the row is scaled to unit length.
    let values: Vec<f64> = rows[0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let free = cloister_plugin_sdk::term_key("free") % 256;
    let money = cloister_plugin_sdk::term_key("money") % 256;
    assert_eq!(
        rows[0]["indices"],
        serde_json::json!([free.min(money), free.max(money)])
    );
    let norm: f64 = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-6, "{values:?}");
    let (big, small) = (1.0 + 2f64.ln(), 1.0);
    let want = |x: f64| x / (big * big + small * small).sqrt();
    let by_index = |k: u64| {
        if k == free.min(money) {
            values[0]
        } else {
            values[1]
        }
    };
    assert!((by_index(free) - want(big)).abs() < 1e-6, "{values:?}");
    assert!((by_index(money) - want(small)).abs() < 1e-6, "{values:?}");

    // Add (a scientist), approve (a reviewer), train with it.
    let mut digests = HashMap::new();
    for file in [&words_file, &selector_file] {
        let (ok, said) = cli(&e, "sci", &["plugin", "add", file.to_str().unwrap()]);
        assert!(ok, "{said}");
        let name = said.split_whitespace().nth(1).unwrap().to_string();
        let digest = said
            .split_whitespace()
            .find_map(|w| w.strip_prefix("sha256:"))
            .unwrap()
            .to_string();
        let (ok, said) = cli(&e, "rev", &["plugin", "approve", &digest]);
        assert!(ok, "{said}");
        digests.insert(name, digest);
    }
    assert_eq!(digests["py-hashed-words"], digest_of(&e, "py-hashed-words"));
    let (ok, said) = cli(
        &e,
        "sci",
        &[
            "train",
            "--dataset",
            "d",
            "--features",
            &digests["py-hashed-words"],
            "--template",
            "logreg",
        ],
    );
    assert!(ok, "{said}");
    let accuracy: f64 = said
        .split("accuracy ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    // "meeting lunch" against "winner prize": separable by its words.
    assert!(accuracy > 0.95, "{said}");

    // And in an active-learning pipeline, with the Python selector.
    let spec = dir.join("py.toml");
    std::fs::write(
        &spec,
        "name = \"py\"\ndataset = \"d\"\nsplit_seed = 0\nfeatures = { plugin = \"py-hashed-words\", config = { bits = 12 } }\n\n[[model]]\ntemplate = \"logreg\"\n\n[[model]]\ntemplate = \"mlp\"\nset = { hidden = [8] }\n\n[selector]\nplugin = \"py-least-confidence\"\n\n[loop]\nseed_labels = 20\nper_round = 10\nmax_rounds = 2\nbudget = 60\nbadcases_per_round = 0\n",
    )
    .unwrap();
    let (ok, said) = cli(
        &e,
        "sci",
        &["run", spec.to_str().unwrap(), "--oracle", "gold"],
    );
    assert!(ok, "{said}");
    let c = e.open();
    let sci = c.authenticate(&e.tokens["sci"]).unwrap();
    let jobs = c.list_jobs(&sci).unwrap();
    assert_eq!(jobs.len(), 1);
    let job = c.show_job(&sci, &jobs[0].id).unwrap();
    assert!(
        matches!(job.state, cloister_host::jobs::JobState::Done { .. }),
        "{:?}",
        job.state
    );
    // Both Python plugins served the job's rounds, audited like any other.
    let aud = c.authenticate(&e.tokens["aud"]).unwrap();
    let calls = c
        .audit_log(
            &aud,
            &cloister_host::audit::AuditFilter {
                action: Some("plugin_call".into()),
                ..Default::default()
            },
        )
        .unwrap();
    for (stage, name) in [
        ("featurize", "py-hashed-words"),
        ("select", "py-least-confidence"),
    ] {
        let ran = calls.iter().any(|entry| {
            entry.record.resource.contains(&digests[name])
                && entry.record.outcome.as_ref().is_some_and(|o| {
                    o.stage == stage && o.code == "ok" && o.purpose.starts_with("job ")
                })
        });
        assert!(ran, "{name} ran its `{stage}` stage in the job");
    }
}

#[test]
fn a_python_fitted_featurizer_gives_its_rust_twins_features() {
    let Some(py) = build("plugins/python/tfidf", "fitted-featurizer") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let py_file = dir.path().join("py-tfidf.wasm");
    let rust_file = dir.path().join("tfidf.wasm");
    std::fs::write(&py_file, &py).unwrap();
    std::fs::write(&rust_file, cloister_bundled_plugins::get("tfidf").unwrap()).unwrap();
    // 120 texts over a small vocabulary, with repeats, punctuation,
    // capitals, non-ASCII letters and one-letter words.
    let words = "free money lunch meeting prize winner see you at the office today now click here Über naïve x_y a1 b"
        .split(' ')
        .collect::<Vec<_>>();
    let mut rng = cloister_host::train::model::Rng::new(3);
    let mut lines = String::new();
    for i in 0..120 {
        let text: Vec<&str> = (0..12)
            .map(|_| words[(rng.unit() * words.len() as f32) as usize % words.len()])
            .collect();
        let tail = if i % 3 == 0 { " Free-MONEY!" } else { "" };
        lines.push_str(&format!(
            "{{\"id\":\"r{i}\",\"text\":\"{}{tail}\"}}\n",
            text.join(" ")
        ));
    }
    let input = dir.path().join("t.jsonl");
    std::fs::write(&input, lines).unwrap();
    // Each fits on the same records (the host counts, keeping terms at
    // least 5 records contain), then featurizes them: at the defaults, and
    // with character n-grams and buckets for the words outside the
    // vocabulary (which a floor of 5 leaves plenty of here).
    let run = |file: &Path, config: &[&str]| -> Vec<serde_json::Value> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloister"));
        cmd.args(["plugin", "run"])
            .arg(file)
            .arg("--input")
            .arg(&input)
            .args(["--fit-min-records", "5"]);
        for c in config {
            cmd.args(["--config", c]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let defaults = same_features(&run(&py_file, &[]), &run(&rust_file, &[]), &[]);
    for config in [
        &["char_ngrams=2-4", "tail_buckets=64"][..],
        &["tail_buckets=7"],
    ] {
        let more = same_features(&run(&py_file, config), &run(&rust_file, config), config);
        // The rare words went to buckets (and the n-grams to their block)
        // rather than nowhere.
        assert!(
            more > defaults,
            "{config:?}: {more} weights, {defaults} at the defaults"
        );
    }
}

/// Two featurizers' outputs for the same 120 records: the same indices,
/// and values equal to f32 rounding (Python computes in f64, Rust in f32).
/// Returns how many weights the rows hold.
fn same_features(a: &[serde_json::Value], b: &[serde_json::Value], config: &[&str]) -> usize {
    assert_eq!(a.len(), 120, "{config:?}");
    assert_eq!(a.len(), b.len());
    let mut nonzero = 0;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["id"], y["id"]);
        assert_eq!(x["indices"], y["indices"], "{x} {y}");
        let values = |v: &serde_json::Value| -> Vec<f64> {
            v["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        for (p, r) in values(x).iter().zip(values(y)) {
            assert!((p - r).abs() < 1e-6, "{config:?}: {x} {y}");
            nonzero += 1;
        }
    }
    assert!(nonzero > 120 * 5, "{config:?}: {nonzero} weights");
    nonzero
}

#[test]
fn python_selector_priorities_are_shown_as_ranks_only() {
    let Some(select) = build("tests/plugins/python-hostile-select", "selector") else {
        return;
    };
    let e = env_with_plugins(
        300,
        3,
        &[
            &select,
            cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
        ],
    );
    selector_priorities_are_sealed(&e, "py-hostile-select");
    // The rules the host checks hold for Python as for Rust: a class that
    // does not exist and a priority that is not a number are refused.
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let p = rt.load(&select).unwrap();
    let classes: Vec<String> = ["ham", "spam"].map(String::from).to_vec();
    let items = [cloister_host::types::PredictionSet {
        id: "x".into(),
        models: vec![vec![0.9, 0.1], vec![0.8, 0.2]],
    }];
    for attack in ["bad-class", "nan-priority"] {
        let mut inst = p
            .instantiate(
                &rt,
                &crate::support::cfg(&[("attack", attack)]),
                &Limits::default(),
            )
            .unwrap();
        assert_eq!(
            crate::support::code(inst.select(&classes, &items)),
            "invalid-output",
            "{attack}"
        );
    }
}
