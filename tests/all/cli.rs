//! The real `cloister` binary, driven as a user would.

use std::path::Path;
use std::process::{Command, Output};

fn cloister(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloister"))
        .args(args)
        .output()
        .expect("run cloister")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_plugin(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(format!("{name}.wasm"));
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn inspect_garbage_is_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("empty", &b""[..]),
        ("garbage", &b"hello"[..]),
        ("core", &b"\0asm\x01\0\0\0"[..]),
    ] {
        let f = write_plugin(dir.path(), name, bytes);
        let o = cloister(&["plugin", "inspect", &f]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    let o = cloister(&["plugin", "inspect", "/nonexistent/x.wasm"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn inspect_names_forbidden_imports_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_plugin(dir.path(), "net", cloister_test_plugins::HOSTILE_NET);
    let o = cloister(&["plugin", "inspect", &f]);
    assert_eq!(o.status.code(), Some(2));
    let out = stdout(&o);
    assert!(out.contains("REFUSED [forbidden-imports]"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("wasi:sockets/tcp@0.2") && l.contains("FORBIDDEN")),
        "{out}"
    );

    let f = write_plugin(
        dir.path(),
        "ok",
        cloister_bundled_plugins::get("dual-agree").unwrap(),
    );
    let o = cloister(&["plugin", "inspect", "--json", &f]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["loadable"], true);
    assert_eq!(v["metadata"]["kind"], "selector");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn plugin_run_over_mock_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = write_plugin(
        dir.path(),
        "ngrams",
        cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
    );
    let input = dir.path().join("mock.jsonl");
    std::fs::write(&input, "{\"id\": \"m1\", \"text\": \"buy cheap pills\"}\n\n{\"id\": \"m2\", \"text\": \"meeting at noon\", \"label\": \"ham\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let o = cloister(&[
        "plugin",
        "run",
        &plugin,
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--config",
        "bits=10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], "m1");
    assert_eq!(lines[0]["indices"].as_array().unwrap().len(), 5);
    assert!(
        lines[0]["indices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i.as_u64().unwrap() < 1024)
    );
}

#[test]
fn plugin_run_fits_a_fitted_featurizer_on_mock_data_first() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = write_plugin(
        dir.path(),
        "tfidf",
        cloister_bundled_plugins::get("tfidf").unwrap(),
    );
    let o = cloister(&["plugin", "inspect", &plugin]);
    assert!(
        stdout(&o).contains("kind:        featurizer (fitted"),
        "{}",
        stdout(&o)
    );
    // "free" is in 12 records, "pills" in 3, "noon" in 1.
    let mut mock = String::new();
    for i in 0..12 {
        let extra = if i < 3 { " pills" } else { "" };
        mock.push_str(&format!(
            "{{\"id\": \"m{i}\", \"text\": \"free offer{extra}\"}}\n"
        ));
    }
    mock.push_str("{\"id\": \"n\", \"text\": \"meeting at noon\"}\n");
    let input = dir.path().join("mock.jsonl");
    std::fs::write(&input, mock).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "run",
            &plugin,
            "--input",
            input.to_str().unwrap(),
            "--config",
            "ngrams=1",
        ];
        args.extend_from_slice(extra);
        cloister(&args)
    };
    // Terms at least 10 records share: "free" and "offer".
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("fitted on 13 records: 2 terms at least 10 of them contain"),
        "{}",
        stderr(&o)
    );
    let rows: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 13);
    assert_eq!(rows[0]["indices"].as_array().unwrap().len(), 2);
    assert_eq!(rows[12]["indices"].as_array().unwrap().len(), 0);
    // With a floor of 3, "pills" joins.
    let o = run(&["--fit-min-records", "3"]);
    assert!(stderr(&o).contains("3 terms"), "{}", stderr(&o));
    // A floor nothing reaches is a clear error.
    let o = run(&["--fit-min-records", "20"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no term that at least 20 of the 13 training records contain"),
        "{}",
        stderr(&o)
    );
    // --fit-on is for fitted featurizers only.
    let ngrams = write_plugin(
        dir.path(),
        "ngrams",
        cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
    );
    let o = cloister(&[
        "plugin",
        "run",
        &ngrams,
        "--input",
        input.to_str().unwrap(),
        "--fit-on",
        input.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("only for fitted featurizers"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn plugin_run_errors_name_line_key_or_limit_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = write_plugin(
        dir.path(),
        "ngrams",
        cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"text\": \n",
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let o = cloister(&[
        "plugin",
        "run",
        &plugin,
        "--input",
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.jsonl:2: invalid JSON"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());

    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, "{\"id\": \"a\", \"text\": \"x\"}\n").unwrap();
    let o = cloister(&[
        "plugin",
        "run",
        &plugin,
        "--input",
        good.to_str().unwrap(),
        "--config",
        "bits=99",
    ]);
    assert_eq!(o.status.code(), Some(1));
    // The fixed sentence, and where the author finds the detail.
    assert!(
        stderr(&o).contains("the plugin refused its configuration [plugin-error]")
            && stderr(&o).contains("--show-plugin-log"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("`bits`"), "{}", stderr(&o));
    let o = cloister(&[
        "plugin",
        "run",
        &plugin,
        "--input",
        good.to_str().unwrap(),
        "--config",
        "bits=99",
        "--show-plugin-log",
    ]);
    assert!(
        stderr(&o).contains("plugin error invalid-config (key `bits`)"),
        "{}",
        stderr(&o)
    );
    let o = cloister(&[
        "plugin",
        "run",
        &plugin,
        "--input",
        good.to_str().unwrap(),
        "--config",
        "nonsense",
    ]);
    assert!(stderr(&o).contains("expected KEY=VALUE"), "{}", stderr(&o));

    let hostile = write_plugin(dir.path(), "hostile", cloister_test_plugins::HOSTILE);
    let o = cloister(&[
        "plugin",
        "run",
        &hostile,
        "--input",
        good.to_str().unwrap(),
        "--config",
        "attack=loop",
        "--fuel",
        "100000000",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("limit exceeded: CPU budget of 100000000 fuel units"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "no partial output");

    let o = cloister(&[
        "plugin",
        "run",
        &hostile,
        "--input",
        good.to_str().unwrap(),
        "--config",
        "attack=panic",
    ]);
    assert!(
        !stderr(&o).contains("on purpose"),
        "plugin text hidden by default"
    );
    let o = cloister(&[
        "plugin",
        "run",
        &hostile,
        "--input",
        good.to_str().unwrap(),
        "--config",
        "attack=panic",
        "--show-plugin-log",
    ]);
    assert!(
        stderr(&o).contains("on purpose"),
        "author asked for the plugin log"
    );
    // What a plugin writes reaches the author's terminal shown, never
    // obeyed: its error quotes a record whose text clears the screen and
    // turns the line right to left.
    let escaping = dir.path().join("escaping.jsonl");
    std::fs::write(
        &escaping,
        "{\"id\": \"a\", \"text\": \"x\\u001b[2J\\u202ey\"}\n",
    )
    .unwrap();
    let o = cloister(&[
        "plugin",
        "run",
        &hostile,
        "--input",
        escaping.to_str().unwrap(),
        "--config",
        "attack=error-with-secret",
        "--show-plugin-log",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("leaking record text: x\\u{001B}[2J\\u{202E}y"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains('\u{1b}') && !stderr(&o).contains('\u{202e}'),
        "{:?}",
        stderr(&o)
    );
}

#[test]
fn plugin_run_selector_needs_classes() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = write_plugin(
        dir.path(),
        "dual",
        cloister_bundled_plugins::get("dual-agree").unwrap(),
    );
    let input = dir.path().join("p.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"x\", \"models\": [[0.01, 0.99], [0.02, 0.98]]}\n",
    )
    .unwrap();
    let o = cloister(&["plugin", "run", &plugin, "--input", input.to_str().unwrap()]);
    assert!(stderr(&o).contains("--classes"), "{}", stderr(&o));
    let o = cloister(&[
        "plugin",
        "run",
        &plugin,
        "--input",
        input.to_str().unwrap(),
        "--classes",
        "ham,spam",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["action"], "auto-accept");
    assert_eq!(v["label"], "spam");
}

#[test]
fn demo_runs_in_a_throwaway_environment_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("spamassassin@1 (6046 records"), "{out}");
    // The active-learning table and the savings.
    assert!(out.contains("round  manual"), "{out}");
    assert!(out.contains("Result: test accuracy"), "{out}");
    assert!(out.contains("automatic labels at"), "{out}");
    assert!(out.contains("denied: ana may not export_dataset"), "{out}");
    assert!(out.contains("chain and signed head verify"), "{out}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}

/// The code block of a document that follows the first line containing
/// `marker`.
pub(crate) fn doc_block(doc: &str, marker: &str) -> String {
    let start = doc
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in the tutorial"));
    let rest = &doc[start..];
    let open = rest.find("```").unwrap();
    let body_start = open + rest[open..].find('\n').unwrap() + 1;
    let close = body_start + rest[body_start..].find("```").unwrap();
    rest[body_start..close].to_string()
}

#[test]
fn the_plugin_tutorial_builds_and_prints_what_the_docs_say() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/plugin-authoring.md")).unwrap();
    let manifest_extra = doc_block(&doc, "**2. `Cargo.toml`**");
    let lib = doc_block(&doc, "**3. `src/lib.rs`**");
    let unit_tests = doc_block(&doc, "**7. Unit-test natively.**");
    let mock = doc_block(&doc, "**6. Run it on your own mock data.**");
    let mock_lines: String = mock
        .lines()
        .skip(1)
        .take_while(|l| *l != "JSONL")
        .map(|l| format!("{l}\n"))
        .collect();
    let after_run = &doc[doc.find("**6. Run it on your own mock data.**").unwrap()..];
    let out_start = after_run.find("```\n{\"id\"").unwrap() + 4;
    let expected = &after_run[out_start..out_start + after_run[out_start..].find("```").unwrap()];

    let dir = tempfile::tempdir().unwrap();
    let sdk = root.join("plugin-sdk").canonicalize().unwrap();
    let manifest = format!(
        "[package]\nname = \"text-shape\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n\n{}",
        manifest_extra.replace("../cloister/plugin-sdk", &sdk.display().to_string())
    );
    std::fs::write(dir.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(
        dir.path().join("src/lib.rs"),
        format!("{lib}\n{unit_tests}"),
    )
    .unwrap();
    let target = root.join("target/tutorial-check");
    let built = cloister_wasm_build::plugin_cargo()
        .current_dir(dir.path())
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );

    let component = target.join("wasm32-wasip2/release/text_shape.wasm");
    let input = dir.path().join("mock.jsonl");
    std::fs::write(&input, mock_lines).unwrap();
    let o = cloister(&[
        "plugin",
        "run",
        component.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), expected, "the tutorial's documented output");

    let o = cloister(&["plugin", "inspect", component.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("verdict:     loadable"));

    // Step 7: the unit tests pass natively, through the SDK's harness.
    let tested = cloister_wasm_build::plugin_cargo()
        .current_dir(dir.path())
        .args(["test", "--target-dir"])
        .arg(&target)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tested.stdout);
    assert!(
        tested.status.success() && said.contains("test tests::length_and_capitals ... ok"),
        "{said}{}",
        String::from_utf8_lossy(&tested.stderr)
    );
}

// ------------------------------------------------------ environments --

struct EnvCli {
    dir: tempfile::TempDir,
}

impl EnvCli {
    fn env(&self) -> String {
        self.dir.path().join("env").display().to_string()
    }

    fn run(&self, token: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cloister"))
            .args(args)
            .env("CLOISTER_ENV", self.env())
            .env("CLOISTER_TOKEN", token)
            .output()
            .expect("run cloister")
    }
}

fn token_in(o: &Output) -> String {
    let out = stdout(o);
    out.split_whitespace()
        .find(|w| w.starts_with("clt_"))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_string()
}

#[test]
fn an_environment_from_init_to_a_denied_export_and_a_verified_audit_log() {
    use std::os::unix::fs::PermissionsExt;
    let e = EnvCli {
        dir: tempfile::tempdir().unwrap(),
    };
    let o = cloister(&["init", &e.env()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let root = token_in(&o);
    for (path, mode) in [
        ("", 0o700),
        ("keys", 0o700),
        ("keys/audit-signing.pk8", 0o600),
        ("keys/audit-mac.key", 0o600),
        ("keys/cache.key", 0o600),
    ] {
        let meta = std::fs::metadata(Path::new(&e.env()).join(path)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{path}");
    }
    assert_eq!(
        cloister(&["init", &e.env()]).status.code(),
        Some(1),
        "init never reuses a directory"
    );

    let sci = token_in(&e.run(&root, &["user", "add", "sci", "--role", "scientist"]));
    let aud = token_in(&e.run(&root, &["user", "add", "aud", "--role", "auditor"]));
    let o = e.run(&root, &["user", "add", "x", "--role", "wizard"]);
    assert_eq!(o.status.code(), Some(2), "clap rejects unknown roles");

    let data = e.dir.path().join("mails.jsonl");
    std::fs::write(&data, "{\"id\": \"a\", \"text\": \"secret words\", \"label\": \"spam\"}\n{\"id\": \"b\", \"text\": \"more secret words\"}\n").unwrap();
    let o = e.run(
        &sci,
        &["dataset", "import", "mails", data.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("imported 2 records as mails@1"),
        "{}",
        stdout(&o)
    );

    let o = e.run(&sci, &["dataset", "stats", "mails", "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("records 2   labeled 1   unlabeled 1"), "{out}");
    assert!(!out.contains("secret"), "statistics print no texts: {out}");

    let o = e.run(&sci, &["dataset", "export", "mails"]);
    assert_eq!(o.status.code(), Some(3), "denied exits 3");
    assert!(stderr(&o).contains("denied"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("secret"));
    let o = e.run(&root, &["dataset", "export", "mails"]);
    assert_eq!(o.status.code(), Some(3), "admins too");

    let o = e.run(
        &aud,
        &[
            "policy",
            "explain",
            "--as",
            "admin",
            "export_dataset",
            "dataset:mails",
        ],
    );
    let out = stdout(&o);
    assert!(out.starts_with("decision: DENY"), "{out} {}", stderr(&o));
    assert!(out.contains("no-dataset-export"), "{out}");

    let o = e.run(
        &aud,
        &[
            "audit",
            "log",
            "--action",
            "export_dataset",
            "--decision",
            "deny",
        ],
    );
    assert_eq!(stdout(&o).lines().count(), 2, "{}", stdout(&o));
    // A filter that can never match is a mistake, and says which names
    // exist; an event the host records but has not yet is no mistake.
    let o = e.run(&aud, &["audit", "log", "--action", "export_datset"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("action `export_datset`: no entry has it")
            && err.contains("export_dataset, ")
            && err.contains("plugin_call"),
        "{err}"
    );
    let o = e.run(&aud, &["audit", "log", "--action", "move_store"]);
    assert!(
        o.status.success() && stdout(&o).is_empty(),
        "{}",
        stderr(&o)
    );
    let o = e.run(&sci, &["audit", "log"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "scientists do not read the audit log"
    );

    let o = e.run(&aud, &["audit", "verify"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("audit log OK"), "{}", stdout(&o));
    let cp = e.dir.path().join("cp.txt");
    let o = e.run(
        &aud,
        &["audit", "checkpoint", "--out", cp.to_str().unwrap()],
    );
    assert!(o.status.success());
    let o = e.run(
        &aud,
        &["audit", "verify", "--checkpoint", cp.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stdout(&o));
    let proof = e.dir.path().join("proof.json");
    let o = e.run(&aud, &["audit", "prove", "2"]);
    std::fs::write(&proof, &o.stdout).unwrap();
    let o = e.run(
        &aud,
        &["audit", "verify", "--proof", proof.to_str().unwrap()],
    );
    assert!(
        stdout(&o).starts_with("proof OK: entry 2"),
        "{}",
        stdout(&o)
    );
    let forged = std::fs::read_to_string(&proof)
        .unwrap()
        .replacen("add_user", "add_usex", 1);
    std::fs::write(&proof, forged).unwrap();
    let o = e.run(
        &aud,
        &["audit", "verify", "--proof", proof.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stdout(&o));

    let o = e.run("clt_wrong", &["dataset", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("authentication failed"));
    let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .args(["dataset", "list", "--env", &e.env()])
        .env_remove("CLOISTER_TOKEN")
        .output()
        .unwrap();
    assert!(stderr(&o).contains("no token"), "{}", stderr(&o));
}

#[test]
fn train_show_release_export_and_verify_a_bundle_from_the_command_line() {
    let e = EnvCli {
        dir: tempfile::tempdir().unwrap(),
    };
    let root = token_in(&cloister(&["init", &e.env()]));
    let sci = token_in(&e.run(&root, &["user", "add", "sci", "--role", "scientist"]));
    let rev = token_in(&e.run(&root, &["user", "add", "rev", "--role", "reviewer"]));
    let appr = token_in(&e.run(&root, &["user", "add", "appr", "--role", "approver"]));
    let plugins = e.dir.path().join("plugins");
    assert!(
        cloister(&["plugin", "bundled", "--write", plugins.to_str().unwrap()])
            .status
            .success()
    );
    let data =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/spamassassin/spamassassin.jsonl.gz");
    assert!(
        e.run(&sci, &["dataset", "import", "spam", data.to_str().unwrap()])
            .status
            .success()
    );
    let mut digests = Vec::new();
    for name in ["text-normalize", "hashed-ngrams"] {
        let o = e.run(
            &sci,
            &[
                "plugin",
                "add",
                plugins.join(format!("{name}.wasm")).to_str().unwrap(),
            ],
        );
        let digest = stdout(&o)
            .split("sha256:")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        assert!(
            e.run(&rev, &["plugin", "approve", &digest])
                .status
                .success()
        );
        digests.push(digest);
    }
    let o = e.run(
        &sci,
        &[
            "train",
            "--dataset",
            "spam",
            "--preprocess",
            "text-normalize",
            "--features",
            "hashed-ngrams",
            "--template",
            "logreg",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("epoch   1/30"),
        "plain progress lines off a terminal: {}",
        stderr(&o)
    );
    let out = stdout(&o);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert!(id.starts_with("m-"), "{out}");

    let o = e.run(&sci, &["model", "show", &id]);
    let shown = stdout(&o);
    for part in [
        "test accuracy",
        "confusion",
        "reliability",
        "training curve",
        "badcases",
        "false positives per class",
        "lineage: dataset spam@1",
    ] {
        assert!(shown.contains(part), "{part}: {shown}");
    }
    assert!(!shown.contains("Subject"), "no texts in model show");
    // Each plugin of the lineage with its review state now.
    for (stage, digest, name) in [
        ("preprocess", &digests[0], "text-normalize"),
        ("features  ", &digests[1], "hashed-ngrams"),
    ] {
        let line = format!("         {stage} {digest} ({name} 0.1.0, approved by rev)");
        assert!(shown.lines().any(|l| l == line), "{line}\n{shown}");
    }
    // The plugins were named; the lineage holds their full digests.
    let o = e.run(&sci, &["model", "show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lineage"]["preprocess"][0], digests[0].as_str());
    assert_eq!(v["lineage"]["features"], digests[1].as_str());
    let o = e.run(
        &sci,
        &["train", "--dataset", "spam", "--features", "text-normalize"],
    );
    assert_eq!(
        stderr(&o).trim_end(),
        "error: plugin `text-normalize` is a preprocessor, not a featurizer"
    );

    let bundle = e.dir.path().join("spam.bundle");
    let export = |token: &str| {
        e.run(
            token,
            &["model", "export", &id, "--out", bundle.to_str().unwrap()],
        )
    };
    assert_eq!(
        export(&sci).status.code(),
        Some(3),
        "unapproved export is denied"
    );
    assert!(
        e.run(
            &sci,
            &["model", "request-release", &id, "--reason", "ship it"]
        )
        .status
        .success()
    );
    assert_eq!(
        e.run(&sci, &["model", "approve-release", &id])
            .status
            .code(),
        Some(3)
    );
    assert!(
        e.run(&appr, &["model", "approve-release", &id])
            .status
            .success()
    );
    let o = export(&sci);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = stdout(&o).rsplit(' ').next().unwrap().trim().to_string();
    let o = cloister(&["verify-bundle", bundle.to_str().unwrap(), "--key", &key]);
    assert!(o.status.success(), "{}", stdout(&o));
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&bundle, &bytes).unwrap();
    let o = cloister(&["verify-bundle", bundle.to_str().unwrap(), "--key", &key]);
    assert_eq!(o.status.code(), Some(4), "{}", stdout(&o));

    // `train` with the featurizer and one more flag and its value.
    let train_with = |flag: &str, value: &str| {
        e.run(
            &sci,
            &[
                "train",
                "--dataset",
                "spam",
                "--features",
                &digests[1],
                flag,
                value,
            ],
        )
    };
    let o = train_with("--set", "bogus=1");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown hyper-parameter `bogus`"),
        "{}",
        stderr(&o)
    );

    // A registered plugin by a digest prefix: what it declares, who added
    // and approved it (the train help sends users here for config keys).
    let o = e.run(&sci, &["plugin", "show", &digests[1][..12]]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for part in [
        format!("digest:      sha256:{}", digests[1]).as_str(),
        "name:        hashed-ngrams",
        "kind:        featurizer",
        "config keys:\n  field = \"text\"",
        "added:       by sci at ",
        "approved:    by rev at ",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
    let o = e.run(&sci, &["plugin", "show", &digests[1][..12], "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["digest"], digests[1].as_str());
    assert_eq!(v["approval"]["by"], "rev");
    let o = e.run(&sci, &["plugin", "show", "00000000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no plugin with digest 00000000"),
        "{}",
        stderr(&o)
    );

    // A plugin's failure stays a fixed sentence; the hint after it is the
    // host's and says where the reason is.
    let o = train_with("--features-config", "bits=99");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(
            "error: the plugin refused its configuration\nhint: `cloister plugin show DIGEST` lists"
        ),
        "{err}"
    );
    // A field the dataset does not have is named as the likely cause.
    let o = train_with("--features-config", "field=subject_line");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("error: the plugin reported an error on a batch; the featurizer's `field` is `subject_line`, and dataset spam@1 has no field `subject_line`"),
        "{err}"
    );
    // One that only some records have leaves the plugin's failure as it
    // is, with the host's hint.
    let partial = e.dir.path().join("partial.jsonl");
    let lines: String = (0..40)
        .map(|i| {
            let note = if i % 2 == 0 {
                ", \"note\": \"see above\""
            } else {
                ""
            };
            format!(
                "{{\"id\": \"p{i}\", \"text\": \"word {i}\", \"label\": \"{}\"{note}}}\n",
                i % 2
            )
        })
        .collect();
    std::fs::write(&partial, lines).unwrap();
    assert!(
        e.run(
            &sci,
            &["dataset", "import", "partial", partial.to_str().unwrap()]
        )
        .status
        .success()
    );
    let o = e.run(
        &sci,
        &[
            "train",
            "--dataset",
            "partial",
            "--features",
            &digests[1],
            "--features-config",
            "field=note",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("error: the plugin reported an error on a batch\nhint: the plugin's own reason is in the administrators' plugin log"),
        "{err}"
    );
}

#[test]
fn lists_speak_json_errors_name_files_and_a_closed_pipe_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    // `init` under a missing parent names the path and the parent, once.
    let missing = dir.path().join("no/such/env");
    let o = cloister(&["init", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("parent directory"), "{err}");
    assert_eq!(err.matches("No such file").count(), 0, "{err}");

    let o = cloister(&["template", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["name"], "logreg", "{v}");

    let e = EnvCli {
        dir: tempfile::tempdir().unwrap(),
    };
    let o = cloister(&["init", &e.env()]);
    let root = token_in(&o);
    let sci = token_in(&e.run(&root, &["user", "add", "ana", "--role", "scientist"]));
    for (token, args) in [
        (&root, &["user", "list", "--json"][..]),
        (&sci, &["job", "list", "--json"]),
        (&sci, &["model", "list", "--json"]),
        (&root, &["plugin", "list", "--json"]),
        (&root, &["dataset", "list", "--json"]),
    ] {
        let o = e.run(token, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|err| panic!("{args:?}: {err}: {}", stdout(&o)));
        assert!(v.is_array(), "{args:?}: {v}");
    }
    let o = e.run(&root, &["user", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let admin = v
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["roles"][0] == "admin")
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        admin["name"].is_string() && admin["disabled"] == false,
        "{v}"
    );

    // `cloister … | head` where head has already gone: no panic, no noise.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloister"))
        .args(["template", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        o.status.success() || o.status.code() == Some(141),
        "{:?} {err}",
        o.status
    );
}

#[test]
fn serve_refuses_a_take_over_interval_out_of_range_before_opening_anything() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    for bad in ["0", "3601", "soon"] {
        let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
            .env("CLOISTER_ENV", &env)
            .args(["serve", "--addr", "127.0.0.1:0", "--take-over-jobs", bad])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--take-over-jobs"),
            "{bad}: {}",
            stderr(&o)
        );
        assert!(!env.exists(), "nothing is created");
    }
}

/// A new environment with a scientist and a reviewer, and the bundled
/// plugins written out: (environment, scientist's token, reviewer's
/// token, the plugins' directory).
fn scientist_env() -> (EnvCli, String, String, String) {
    let e = EnvCli {
        dir: tempfile::tempdir().unwrap(),
    };
    let root = token_in(&cloister(&["init", &e.env()]));
    let sci = token_in(&e.run(&root, &["user", "add", "sci", "--role", "scientist"]));
    let rev = token_in(&e.run(&root, &["user", "add", "rev", "--role", "reviewer"]));
    let plugins = e.dir.path().join("plugins").display().to_string();
    assert!(
        cloister(&["plugin", "bundled", "--write", &plugins])
            .status
            .success()
    );
    (e, sci, rev, plugins)
}

/// Adds the bundled plugin `name` from `plugins` as `token`; its digest.
fn add_bundled(e: &EnvCli, token: &str, plugins: &str, name: &str) -> String {
    let o = e.run(token, &["plugin", "add", &format!("{plugins}/{name}.wasm")]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .split("sha256:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest in {}", stdout(&o)))
        .to_string()
}

#[test]
fn a_numeric_csv_trains_by_plugin_names_with_no_statistics_given() {
    // Three columns at scales 1e4, 1e-3 and 1; the class shows in the
    // first two. Nobody computes a mean or a deviation: the template
    // standardizes on the training split and folds it into the weights,
    // so the stored model is evaluated on the raw values.
    let (e, sci, rev, plugins) = scientist_env();
    let plugins = plugins.as_str();
    add_bundled(&e, &sci, plugins, "standardize");
    let o = e.run(&rev, &["plugin", "approve", "standardize"]);
    assert_eq!(o.status.code(), Some(1), "approval takes a digest");
    let digest = stdout(&e.run(&sci, &["plugin", "show", "standardize", "--json"]));
    assert!(digest.is_empty(), "not approved: no name lookup");
    let listed = stdout(&e.run(&sci, &["plugin", "list"]));
    let prefix = listed.split_whitespace().next().unwrap().to_string();
    assert!(
        e.run(&rev, &["plugin", "approve", &prefix])
            .status
            .success()
    );

    let mut csv = String::from("id,label,big,tiny,plain\n");
    let mut seed = 12345u64;
    let mut unit = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    for i in 0..600 {
        let (label, sign) = if i % 2 == 0 {
            ("lo", -1.0)
        } else {
            ("hi", 1.0)
        };
        let big = 1e4 * (5.0 + 0.8 * sign + unit());
        let tiny = 1e-3 * (5.0 + 0.8 * sign + unit());
        let plain = unit();
        csv.push_str(&format!("r{i},{label},{big},{tiny},{plain}\n"));
    }
    let file = e.dir.path().join("scaled.csv");
    std::fs::write(&file, csv).unwrap();
    // Imported as CSV's default, text, the numbers are pointed out.
    let o = e.run(
        &sci,
        &["dataset", "import", "as-text", file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with(
            "note: 3 columns held only numbers and went in as text: big, tiny, plain.\n  \
             To import them as numbers, import again with --numeric-field '*'\n"
        ),
        "{}",
        stdout(&o)
    );
    let o = e.run(
        &sci,
        &[
            "dataset",
            "import",
            "scaled",
            file.to_str().unwrap(),
            "--numeric-field",
            "*",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let train = |setting: &str| {
        let o = e.run(
            &sci,
            &[
                "train",
                "--dataset",
                "scaled",
                "--features",
                "standardize",
                "--features-config",
                "fields=*",
                "--features-config",
                "width=3",
                "--set",
                &format!("standardize={setting}"),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let accuracy = out
            .split("test: accuracy ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{out}"));
        (accuracy, out.split_whitespace().nth(1).unwrap().to_string())
    };
    let ((auto, auto_model), (off, _)) = (train("auto"), train("off"));
    assert!(auto >= 0.9, "standardized: {auto}");
    assert!(auto > off, "standardized {auto}, raw {off}");

    // `predict` on JSON records, whose keys arrive in another order than
    // the CSV's columns: `fields=*` orders by name, so the positions are
    // the ones training saw.
    let mock = e.dir.path().join("mock.jsonl");
    std::fs::write(
        &mock,
        "{\"id\": \"h\", \"tiny\": 0.0058, \"plain\": 0.0, \"big\": 58000}\n\
         {\"id\": \"l\", \"plain\": 0.0, \"big\": 42000, \"tiny\": 0.0042}\n",
    )
    .unwrap();
    let o = e.run(
        &sci,
        &["predict", &auto_model, "--input", mock.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let labels: Vec<String> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].to_string())
        .collect();
    assert_eq!(labels, ["\"hi\"", "\"lo\""]);
}

#[test]
fn a_field_the_dataset_lacks_is_named_and_preprocessors_take_settings() {
    // The SpamAssassin emails with their text under `review`: the bundled
    // plugins' default `text` names no field of this dataset.
    let (e, sci, rev, plugins) = scientist_env();
    let plugins = plugins.as_str();
    for name in ["text-normalize", "hashed-ngrams"] {
        let digest = add_bundled(&e, &sci, plugins, name);
        assert!(
            e.run(&rev, &["plugin", "approve", &digest])
                .status
                .success()
        );
    }
    let data =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/spamassassin/spamassassin.jsonl.gz");
    let text = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(data).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    let mut jsonl = String::new();
    for line in text.lines().take(400) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let o = v.as_object_mut().unwrap();
        let t = o.remove("text").unwrap();
        o.insert("review".into(), t);
        jsonl.push_str(&format!("{v}\n"));
    }
    let file = e.dir.path().join("reviews.jsonl");
    std::fs::write(&file, jsonl).unwrap();
    assert!(
        e.run(&sci, &["dataset", "import", "rev", file.to_str().unwrap()])
            .status
            .success()
    );
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--dataset", "rev"];
        args.extend_from_slice(extra);
        e.run(&sci, &args)
    };
    let last = |o: &Output| stderr(o).lines().last().unwrap_or_default().to_string();
    let hint = "(`cloister dataset stats rev@1` lists its fields)";
    let o = train(&["--features", "hashed-ngrams"]);
    assert_eq!(
        last(&o),
        format!(
            "error: the plugin reported an error on a batch; the featurizer's `field` is `text`, and dataset rev@1 has no field `text` {hint}"
        )
    );
    let o = train(&[
        "--preprocess",
        "text-normalize",
        "--features",
        "hashed-ngrams",
        "--features-config",
        "field=review",
    ]);
    assert_eq!(
        last(&o),
        format!(
            "error: the preprocessors kept none of the 400 records; preprocessor 1's `fields` is `text`, and dataset rev@1 has no field `text` {hint}"
        )
    );
    let o = train(&[
        "--preprocess",
        "text-normalize",
        "--preprocess-config",
        "2:fields=review",
        "--features",
        "hashed-ngrams",
    ]);
    assert_eq!(
        last(&o),
        "error: --preprocess-config \"2:fields=review\": there is no preprocessor 2 (there is 1)"
    );
    let o = train(&[
        "--preprocess",
        "text-normalize",
        "--preprocess-config",
        "fields=review",
        "--features",
        "hashed-ngrams",
        "--features-config",
        "field=review",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).split_whitespace().nth(1).unwrap().to_string();
    let o = e.run(&sci, &["model", "show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["lineage"]["preprocess_config"],
        serde_json::json!([[["fields", "review"]]])
    );
}

#[test]
fn text_someone_else_wrote_reaches_no_terminal_as_control_characters() {
    let (e, sci, _rev, _plugins) = scientist_env();
    // Names and labels are checked at import: an escape sequence or a
    // bidirectional override in one is refused, and the refusal shows it.
    let bad = e.dir.path().join("bad.jsonl");
    for (line, said) in [
        (
            "{\"id\": \"a\", \"t\\u001b[8mx\": \"hidden\"}\n",
            "bad.jsonl:1: field `t\\u{001B}[8mx`: the field name holds a control",
        ),
        (
            "{\"id\": \"a\", \"\": \"no name\"}\n",
            "bad.jsonl:1: a stored field needs a name",
        ),
        (
            "{\"id\": \"a\", \"text\": \"x\", \"label\": \"sp\\u202eam\"}\n",
            "bad.jsonl:1: field `label`: the label holds a control, bidirectional",
        ),
    ] {
        std::fs::write(&bad, line).unwrap();
        let o = e.run(&sci, &["dataset", "import", "bad", bad.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{line}");
        assert!(stderr(&o).contains(said), "{line}: {}", stderr(&o));
        assert!(!stderr(&o).contains('\u{1b}'), "{}", stderr(&o));
    }
    // What is not a name is shown, never obeyed: the importer's file name
    // (kept as the dataset's source) carries a screen-clearing sequence
    // and a right-to-left override.
    let name = "mails\u{1b}[2J\u{202e}lmth.jsonl";
    let data = e.dir.path().join(name);
    std::fs::write(
        &data,
        "{\"id\": \"a\", \"text\": \"hi\", \"label\": \"ham\"}\n",
    )
    .unwrap();
    let o = e.run(
        &sci,
        &["dataset", "import", "mails", data.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = e.run(&sci, &["dataset", "stats", "mails"]);
    let shown = stdout(&o);
    assert!(
        shown.contains("from mails\\u{001B}[2J\\u{202E}lmth.jsonl"),
        "{shown}"
    );
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{202e}'),
        "{shown:?}"
    );
    // JSON for machines keeps the exact value.
    let o = e.run(&sci, &["dataset", "stats", "mails", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["source"], name, "{v}");
}

#[test]
fn the_csv_note_names_only_the_columns_that_held_only_numbers() {
    // One reading of the user's file decides, per column, as the importer
    // reads numbers: `code` turns text in its last row, `blank` is empty,
    // `note` is words; only `count` and `ratio` held only numbers.
    let (e, sci, _, _) = scientist_env();
    let mut csv = String::from("id,label,note,count,code,blank,ratio\n");
    for i in 0..300 {
        let code = if i == 299 {
            "A7".to_string()
        } else {
            i.to_string()
        };
        let ratio = if i % 7 == 0 {
            String::new()
        } else {
            format!(" {:.3} ", f64::from(i) / 300.0)
        };
        csv.push_str(&format!("r{i},l{},word {i},{i},{code},,{ratio}\n", i % 2));
    }
    let file = e.dir.path().join("mixed.csv");
    std::fs::write(&file, csv).unwrap();
    let path = file.to_str().unwrap();
    let o = e.run(&sci, &["dataset", "import", "mixed", path]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with(
            "note: 2 columns held only numbers and went in as text: count, ratio.\n  \
             To import them as numbers, import again with --numeric-field '*'\n"
        ),
        "{}",
        stdout(&o)
    );
    // Listed text columns are text by choice and leave the rest out.
    let o = e.run(
        &sci,
        &["dataset", "import", "mixed", path, "--text-field", "note"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with(
            "note: 2 columns held only numbers and were left out: count, ratio.\n  \
             To import them as numbers, import again with --numeric-field '*' --text-field note\n"
        ),
        "{}",
        stdout(&o)
    );
    // What the note suggests imports, with both as numbers.
    let o = e.run(
        &sci,
        &[
            "dataset",
            "import",
            "mixed",
            path,
            "--numeric-field",
            "count",
            "--numeric-field",
            "ratio",
            "--text-field",
            "note",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("note:"), "{}", stdout(&o));
}

/// An administrator's account commands as printed: a new token for a
/// lost one, roles granted and revoked, an account disabled and enabled
/// again, and the refusals (the last admin, a role not held, another
/// user asking) with their exit codes.
#[test]
fn accounts_are_administered_from_the_command_line() {
    let e = EnvCli {
        dir: tempfile::tempdir().unwrap(),
    };
    let root = token_in(&cloister(&["init", &e.env()]));
    let old = token_in(&e.run(&root, &["user", "add", "ana", "--role", "labeler"]));

    let o = e.run(&root, &["user", "token", "ana"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("new token for ana; the old one no longer works\n"));
    let new = token_in(&o);
    assert_eq!(e.run(&old, &["dataset", "list"]).status.code(), Some(1));
    assert!(e.run(&new, &["dataset", "list"]).status.success());

    let o = e.run(
        &root,
        &[
            "user",
            "grant",
            "ana",
            "--role",
            "scientist",
            "--role",
            "auditor",
        ],
    );
    assert_eq!(
        stdout(&o),
        "granted scientist,auditor: ana now has scientist,labeler,auditor\n",
        "{}",
        stderr(&o)
    );
    let o = e.run(&root, &["user", "revoke", "ana", "--role", "reviewer"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: `ana` does not have the `reviewer` role\n"
    );
    let o = e.run(&root, &["user", "revoke", "ana", "--role", "labeler"]);
    assert_eq!(
        stdout(&o),
        "revoked labeler: ana now has scientist,auditor\n"
    );

    let o = e.run(&new, &["user", "grant", "ana", "--role", "admin"]);
    assert_eq!(o.status.code(), Some(3), "denied: {}", stderr(&o));
    // Her own token, replaced by herself.
    let o = e.run(&new, &["user", "token"]);
    assert!(
        stdout(&o).starts_with("new token for ana;"),
        "{}",
        stderr(&o)
    );
    let mine = token_in(&o);
    assert_eq!(e.run(&new, &["dataset", "list"]).status.code(), Some(1));
    let new = mine;
    let o = e.run(&root, &["audit", "log", "--action", "change_roles"]);
    let log = stdout(&o);
    assert!(
        log.contains(
            "admin        allow change_roles     Account::\"ana\" +scientist +auditor params="
        ),
        "{log}"
    );
    assert!(log.contains("Account::\"ana\" -labeler params="), "{log}");
    // Everything that happened to her account, and nothing else.
    let o = e.run(&root, &["audit", "log", "--resource", "account:ana"]);
    let out = stdout(&o);
    let actions: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(4).unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "add_user",
            "rotate_token",
            "change_roles",
            "change_roles",
            "change_roles",
            "change_roles",
            "rotate_token"
        ],
        "{}",
        stdout(&o)
    );
    let o = e.run(&root, &["audit", "log", "--resource", "acount:ana"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: resource `acount:ana`: use env, audit, account:NAME,"),
        "{}",
        stderr(&o)
    );

    let o = e.run(&root, &["user", "disable", "admin"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("`admin` is the environment's only active admin"));
    assert!(e.run(&root, &["user", "list"]).status.success());

    assert!(e.run(&root, &["user", "disable", "ana"]).status.success());
    let o = e.run(&root, &["user", "enable", "ana"]);
    assert!(
        stdout(&o).starts_with("enabled ana (scientist,auditor)\n"),
        "{}",
        stdout(&o)
    );
    let again = token_in(&o);
    assert_eq!(e.run(&new, &["dataset", "list"]).status.code(), Some(1));
    assert!(e.run(&again, &["dataset", "list"]).status.success());
    let o = e.run(&root, &["user", "list"]);
    assert!(
        stdout(&o).contains("ana                      active    scientist,auditor"),
        "{}",
        stdout(&o)
    );

    // The only admin's token lost: the environment's owner, without a
    // token, makes an admin again.
    assert!(e.run(&root, &["user", "token"]).status.success());
    assert_eq!(e.run(&root, &["user", "list"]).status.code(), Some(1));
    let o = e.run("", &["recover-admin", "admin"]);
    assert!(
        stdout(&o).starts_with(&format!("admin is an active admin of {}\n", e.env())),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let root = token_in(&o);
    let o = e.run(&root, &["audit", "log", "--action", "recover_admin"]);
    assert!(
        stdout(&o)
            .contains("cloister     allow recover_admin    Account::\"admin\" +admin params="),
        "{}",
        stdout(&o)
    );
}
