//! The sealed plugin boundary: nothing a plugin chooses — numbers, keys,
//! counts, priorities, its declared dimension, its self-description —
//! reaches anyone but the administrators (through the plugin log); no
//! declared value takes the host down; every plugin stage is audited.
//!
//! The leaking plugins (`tests/plugins/hostile-leak`, `hostile-select`,
//! `hostile-meta`) are built from source. Each puts the first four bytes of
//! a record's text ("ZQXJ") into the value it chooses; the tests then search
//! everything a non-admin can see — the CLI's stdout and stderr, the stored
//! job state, the JSON API and the console's HTML — for those bytes in every
//! form a message could print them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, header};
use cloister_console::{Console, ConsoleConfig};
use cloister_host::audit::AuditFilter;
use cloister_host::policy::Role;
use cloister_host::runtime::{Limits, RuntimeError};
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use cloister_test_plugins::{HOSTILE_LEAK, HOSTILE_META, HOSTILE_SELECT};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::support::{cfg, code, runtime, text};

/// "ZQXJ" read as the little-endian u32 a leaking plugin returns.
const WINDOW: u32 = u32::from_le_bytes(*b"ZQXJ");

/// Every form in which the leaked window could be printed.
fn markers() -> Vec<String> {
    vec![
        WINDOW.to_string(),
        format!("{WINDOW:x}"),
        format!("{WINDOW:X}"),
        format!("{WINDOW:#x}"),
        "ZQXJ".into(),
        // The key a plugin named in an error, as messages quoted keys. (The
        // declared keys themselves are reviewed metadata, listed with the
        // job's resolved configuration.)
        "key `leakkey".into(),
        // The selector's priority, 31337.25, however a float is printed
        // (never as bare digits: hex digests are full of those).
        "31337.".into(),
    ]
}

fn assert_clean(what: &str, text: &str) {
    for m in markers() {
        assert!(
            !text.contains(&m),
            "{what} carries the plugin-chosen value {m:?}:\n{text}"
        );
    }
}

pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) tokens: std::collections::HashMap<&'static str, String>,
}

impl Env {
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("env")
    }

    pub(crate) fn cli(&self, role: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cloister"))
            .args(args)
            .env("CLOISTER_ENV", self.path())
            .env("CLOISTER_TOKEN", &self.tokens[role])
            .output()
            .expect("run cloister")
    }

    /// stdout and stderr of a CLI call, together.
    pub(crate) fn cli_text(&self, role: &str, args: &[&str]) -> String {
        let o = self.cli(role, args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// [`Env::cli_text`], checked clean of every marker.
    pub(crate) fn cli_clean(&self, role: &str, args: &[&str]) -> String {
        let all = self.cli_text(role, args);
        assert_clean(&format!("`cloister {}` as {role}", args.join(" ")), &all);
        all
    }

    pub(crate) fn open(&self) -> Cloister {
        Cloister::open(&self.path(), "console").unwrap()
    }

    /// GET `uri` from the console (API or page) as `role`; the body.
    pub(crate) fn console_get(&self, role: &str, uri: &str) -> String {
        let console = Console::new(self.open(), ConsoleConfig::default());
        let app = cloister_console::router(Arc::clone(&console));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let body = rt.block_on(async {
            let r = app
                .oneshot(
                    Request::get(uri)
                        .header(
                            header::AUTHORIZATION,
                            format!("Bearer {}", self.tokens[role]),
                        )
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert!(!r.status().is_server_error(), "{uri}: {}", r.status());
            r.into_body().collect().await.unwrap().to_bytes().to_vec()
        });
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// An environment with a scientist, reviewer, labeler, auditor; a small
/// text dataset `d` whose every text starts with "ZQXJ", every record
/// labeled; the bundled featurizer and the hostile plugins added and
/// approved.
fn env() -> Env {
    env_with(80, 1)
}

/// [`env`] with `records` records of which every `labeled_every`-th carries
/// a label (the rest are the pool a job sends to people).
fn env_with(records: usize, labeled_every: usize) -> Env {
    env_with_plugins(
        records,
        labeled_every,
        &[
            HOSTILE_LEAK,
            HOSTILE_SELECT,
            cloister_bundled_plugins::get("hashed-ngrams").unwrap(),
        ],
    )
}

/// [`env_with`] with these plugins added and approved instead.
pub(crate) fn env_with_plugins(records: usize, labeled_every: usize, plugins: &[&[u8]]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    let mut tokens = std::collections::HashMap::from([("admin", root)]);
    let mut users = std::collections::HashMap::new();
    for (name, role) in [
        ("sci", Role::Scientist),
        ("rev", Role::Reviewer),
        ("lab", Role::Labeler),
        ("aud", Role::Auditor),
    ] {
        let (u, t) = c.add_user(&admin, name, &[role]).unwrap();
        tokens.insert(name, t);
        users.insert(name, u);
    }
    let data = dir.path().join("d.jsonl");
    let mut lines = String::new();
    for i in 0..records {
        let label = if i % 2 == 0 { "ham" } else { "spam" };
        let label = if i % labeled_every == 0 {
            format!("\"{label}\"")
        } else {
            "null".to_string()
        };
        let words = if i % 2 == 0 {
            "meeting lunch"
        } else {
            "winner prize"
        };
        lines.push_str(&format!(
            "{{\"id\":\"r{i}\",\"text\":\"ZQXJ {words} {}\",\"label\":{label}}}\n",
            "x".repeat(i % 7)
        ));
    }
    std::fs::write(&data, lines).unwrap();
    c.import_dataset(&users["sci"], "d", &data, &ImportOptions::default())
        .unwrap();
    for &bytes in plugins {
        let e = c.add_plugin(&users["sci"], bytes).unwrap();
        c.approve_plugin(&users["rev"], &e.digest).unwrap();
    }
    drop(c);
    Env { dir, tokens }
}

pub(crate) fn digest_of(e: &Env, name: &str) -> String {
    let c = e.open();
    let admin = c.authenticate(&e.tokens["admin"]).unwrap();
    c.list_plugins(&admin)
        .unwrap()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap()
        .digest
}

fn pipeline(dir: &Path, name: &str, features: &str, selector: &str, humans: &str) -> String {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\ndataset = \"d\"\nsplit_seed = 0\n{humans}\nfeatures = {features}\n\n[[model]]\ntemplate = \"logreg\"\n\n[[model]]\ntemplate = \"mlp\"\nset = {{ hidden = [8] }}\n\n{selector}\n[loop]\nseed_labels = 10\nper_round = 5\nmax_rounds = 2\nbudget = 30\nbadcases_per_round = 0\n"
        ),
    )
    .unwrap();
    p.display().to_string()
}

/// The ids of the jobs, newest last.
fn job_ids(e: &Env) -> Vec<String> {
    let c = e.open();
    let sci = c.authenticate(&e.tokens["sci"]).unwrap();
    let mut jobs = c.list_jobs(&sci).unwrap();
    jobs.sort_by_key(|j| j.created_ms);
    jobs.into_iter().map(|j| j.id).collect()
}

#[test]
fn featurizer_numbers_keys_counts_and_details_reach_no_one_but_admins() {
    featurizer_channels_are_sealed(
        &env(),
        "hostile-leak",
        &["leak-index", "leak-key", "leak-detail", "leak-count"],
    );
}

/// Runs the leaking featurizer `name` (hostile-leak's channels, by the
/// same `attack` names) through `train` and through a job per attack, then
/// searches everything a non-admin sees for the leaked bytes; only the
/// administrators' plugin log may carry them.
pub(crate) fn featurizer_channels_are_sealed(e: &Env, name: &str, attacks: &[&str]) {
    let leak = digest_of(e, name);

    // `cloister train` configures nothing: the plugin's default attack
    // returns the window as a feature index out of its declared range.
    let out = e.cli_clean(
        "sci",
        &[
            "train",
            "--dataset",
            "d",
            "--features",
            &leak,
            "--template",
            "logreg",
        ],
    );
    assert!(
        out.contains("[invalid-output]") || out.contains("breaks the plugin interface"),
        "{out}"
    );

    for &attack in attacks {
        let spec = pipeline(
            e.dir.path(),
            attack,
            &format!("{{ plugin = \"{name}\", config = {{ attack = \"{attack}\" }} }}"),
            "[selector]\nbuiltin = \"random\"\n",
            "",
        );
        let out = e.cli_clean("sci", &["run", &spec, "--oracle", "gold"]);
        assert!(out.contains("error"), "{attack}: {out}");
        let id = job_ids(e).pop().unwrap();
        // The stored state: a fixed sentence, no number the plugin chose.
        let shown = e.cli_clean("sci", &["job", "show", &id, "--json"]);
        let job: serde_json::Value = serde_json::from_str(&shown).unwrap();
        let error = job["state"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!error.is_empty(), "{attack}: {shown}");
        assert!(
            !error.chars().any(|c| c.is_ascii_digit()),
            "{attack}: {error}"
        );
        assert!(!error.contains("leakkey"), "{attack}: {error}");
        let run_error = out
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect::<String>();
        assert!(!run_error.contains("leakkey"), "{attack}: {run_error}");
        e.cli_clean("sci", &["job", "show", &id]);
        for (role, uri) in [
            ("sci", format!("/api/jobs/{id}")),
            ("sci", "/api/jobs".to_string()),
            ("sci", format!("/jobs/{id}")),
            ("aud", format!("/api/jobs/{id}")),
            ("aud", "/api/audit".to_string()),
            ("aud", "/audit".to_string()),
        ] {
            assert_clean(&format!("{uri} as {role}"), &e.console_get(role, &uri));
        }
    }

    // Every stage was audited with its outcome code, coarse figures only.
    let audit = e.cli_clean(
        "aud",
        &["audit", "log", "--action", "plugin_call", "--json"],
    );
    let codes: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            let o = &v["outcome"];
            for k in ["fuel", "peak_memory_bytes", "wall_ms"] {
                let n = o[k].as_u64().unwrap();
                assert!(n == 0 || n.is_power_of_two(), "{k} = {n} is rounded");
            }
            o["code"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        codes.iter().filter(|c| *c == "invalid-output").count() >= 3,
        "{codes:?}"
    );
    assert!(codes.iter().any(|c| c == "plugin-error"), "{codes:?}");

    // The administrators' plugin log has the detail; nobody else reads it.
    let o = e.cli("admin", &["plugin", "log", "--limit", "0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stdout);
    assert!(
        log.contains(&WINDOW.to_string()),
        "the index is in the admin log"
    );
    assert!(log.contains("leakkey"), "the key is in the admin log");
    for role in ["sci", "aud", "rev", "lab"] {
        let o = e.cli(role, &["plugin", "log"]);
        assert!(!o.status.success(), "{role} reads the plugin log");
        assert_clean(role, &String::from_utf8_lossy(&o.stdout));
        assert!(String::from_utf8_lossy(&o.stderr).contains("denied"));
    }
    let c = e.open();
    let aud = c.authenticate(&e.tokens["aud"]).unwrap();
    let denials = c
        .audit_log(
            &aud,
            &AuditFilter {
                action: Some("read_plugin_log".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    assert_eq!(denials.len(), 5, "every read of the plugin log is audited");
}

#[test]
fn selector_priorities_are_stored_and_shown_as_ranks_only() {
    selector_priorities_are_sealed(&env_with(300, 3), "hostile-select");
}

/// Runs a job whose selector `name` scores every pool item 31337.25
/// (`attack = "leak-priority"`) and checks that the labeling queue, the
/// job and the API show ranks, never the number. `e` holds 300 records,
/// every third labeled, and the approved `hashed-ngrams`.
pub(crate) fn selector_priorities_are_sealed(e: &Env, name: &str) {
    let spec = pipeline(
        e.dir.path(),
        "prio",
        "{ plugin = \"hashed-ngrams\", config = { bits = 10 } }",
        &format!("[selector]\nplugin = \"{name}\"\nconfig = {{ attack = \"leak-priority\" }}\n"),
        "labelers = [\"lab\"]",
    );
    // Seed labels go to the labeler first; answer them from the CLI.
    e.cli_clean("sci", &["run", &spec]);
    let id = job_ids(e).pop().unwrap();
    for _ in 0..10 {
        let next = e.cli_text("lab", &["label", "next", "--json"]);
        let v: serde_json::Value = serde_json::from_str(next.trim()).unwrap();
        let label = if v["texts"]["text"].as_str().unwrap().contains("prize") {
            "spam"
        } else {
            "ham"
        };
        let rec = v["id"].as_str().unwrap().to_string();
        e.cli_text("lab", &["label", "set", &rec, label]);
    }
    // Round 1: the selector scores every pool item 31337.25.
    e.cli_clean("sci", &["job", "resume", &id]);
    // (The labeler sees the record's text: that is what labeling is. The
    // selector's number is what must not show.)
    let no_priority = |what: &str, text: &str| {
        assert!(
            !text.contains("31337."),
            "{what} shows the priority:\n{text}"
        );
    };
    let next = e.cli_text("lab", &["label", "next", "--json"]);
    no_priority("label next", &next);
    let v: serde_json::Value = serde_json::from_str(next.trim()).unwrap();
    assert_eq!(v["reason"], "selected", "{next}");
    assert!(v["rank"].is_u64() && v.get("priority").is_none(), "{next}");
    let api = e.console_get("lab", "/api/labels/next");
    no_priority("/api/labels/next", &api);
    assert!(api.contains("\"rank\""), "{api}");
    no_priority("/label", &e.console_get("lab", "/label"));
    // Answered, the item is listed among the answers that can change,
    // still with its rank only; changing it from the CLI is a label.
    let rec = v["id"].as_str().unwrap().to_string();
    e.cli_text("lab", &["label", "set", &rec, "spam"]);
    let answers = e.cli_text("lab", &["label", "answers", "--json"]);
    no_priority("label answers", &answers);
    let listed: serde_json::Value = serde_json::from_str(answers.trim()).unwrap();
    assert_eq!(listed[0]["item"]["record"], rec.as_str(), "{answers}");
    assert_eq!(listed[0]["item"]["answer"]["label"], "spam", "{answers}");
    assert!(listed[0]["item"].get("priority").is_none(), "{answers}");
    let api = e.console_get("lab", "/api/labels/answers");
    no_priority("/api/labels/answers", &api);
    no_priority("/label", &e.console_get("lab", "/label"));
    let out = e.cli_text("lab", &["label", "change", &rec, "ham"]);
    assert!(
        out.contains(&format!("changed the answer to {rec} to ham")),
        "{out}"
    );
    let answers = e.cli_text("lab", &["label", "answers"]);
    assert!(
        answers.contains(&rec) && answers.contains(" ham "),
        "{answers}"
    );
    assert_clean(
        "job show",
        &e.cli_clean("sci", &["job", "show", &id, "--json"]),
    );
    assert_clean(
        "/api/jobs/{id}",
        &e.console_get("sci", &format!("/api/jobs/{id}")),
    );
}

#[test]
fn declared_dimensions_are_capped_before_anything_is_sized_by_them() {
    // In the runtime: u32::MAX is refused when the instance is configured.
    let p = runtime().load(HOSTILE_LEAK).unwrap();
    let r = p.instantiate(
        runtime(),
        &cfg(&[("attack", "huge-dimension")]),
        &Limits::default(),
    );
    let e = r.unwrap_err();
    assert_eq!(e.code(), "limit-dimension");
    assert!(!e.to_string().contains(&u32::MAX.to_string()), "{e}");
    assert!(e.admin_detail().contains(&u32::MAX.to_string()));
    // 2^24 is within the default cap; a lower cap refuses it too.
    let capped = Limits {
        max_dimension: 1000,
        ..Limits::default()
    };
    let ok = p.instantiate(
        runtime(),
        &cfg(&[("attack", "big-dimension")]),
        &Limits::default(),
    );
    assert_eq!(ok.unwrap().dimension(), 1 << 24);
    assert_eq!(
        code(p.instantiate(runtime(), &cfg(&[("attack", "big-dimension")]), &capped)),
        "limit-dimension"
    );
    let mut fine = p
        .instantiate(runtime(), &cfg(&[("attack", "none")]), &Limits::default())
        .unwrap();
    assert_eq!(fine.featurize(&[text("a", "ZQXJ ok")]).unwrap().rows(), 1);

    // In an environment: a job is refused at start; training on 2^24
    // inputs with a wide hidden layer is refused by the memory budget
    // before it allocates; the process lives on.
    let e = env();
    let c = e.open();
    let sci = c.authenticate(&e.tokens["sci"]).unwrap();
    let spec = |attack: &str, template: &str| {
        format!(
            "name = \"dim\"\ndataset = \"d\"\nsplit_seed = 0\nfeatures = {{ plugin = \"hostile-leak\", config = {{ attack = \"{attack}\" }} }}\n\n[[model]]\ntemplate = \"{template}\"\n\n[[model]]\ntemplate = \"{template}\"\nset = {{ seed = 7 }}\n\n[selector]\nbuiltin = \"random\"\n\n[loop]\nseed_labels = 10\nper_round = 5\nmax_rounds = 1\nbudget = 20\n"
        )
    };
    let oracle = Some(cloister_host::jobs::Oracle::Gold);
    let err = c
        .start_job(&sci, "dim.toml", &spec("huge-dimension", "logreg"), oracle)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("feature dimension outside 1..=16777216"),
        "{err}"
    );
    assert!(!err.to_string().contains(&u32::MAX.to_string()), "{err}");

    let job = c
        .start_job(&sci, "dim.toml", &spec("big-dimension", "mlp"), oracle)
        .unwrap();
    let err = c.run_job(&sci, &job.id, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("training budget of 4096 MiB"),
        "{err}"
    );
    assert!(!err.to_string().contains("16777216"), "{err}");
    drop(c);

    // An administrator's lower cap in limits.toml applies to every stage.
    std::fs::write(
        e.path().join("limits.toml"),
        "[plugins]\nmax_feature_dimension = 4096\n",
    )
    .unwrap();
    let c = e.open();
    let sci = c.authenticate(&e.tokens["sci"]).unwrap();
    let err = c
        .start_job(&sci, "dim.toml", &spec("big-dimension", "logreg"), oracle)
        .unwrap_err();
    assert!(err.to_string().contains("1..=4096"), "{err}");
    drop(c);
    // A malformed limits file stops the environment from opening, naming
    // the file, line and field.
    std::fs::write(e.path().join("limits.toml"), "[plugins]\nmax_dim = 3\n").unwrap();
    let err = Cloister::open(&e.path(), "cli").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("limits.toml") && text.contains("line 2") && text.contains("max_dim"),
        "{text}"
    );
}

#[test]
fn metadata_that_reads_differently_is_refused_at_add() {
    match runtime().load(HOSTILE_META) {
        Err(e @ RuntimeError::BadMetadata { .. }) => {
            assert!(e.to_string().contains("`description`"), "{e}");
            assert!(!e.to_string().contains('\u{202E}'));
        }
        other => panic!("{other:?}"),
    }
    let e = env();
    let file = e.dir.path().join("meta.wasm");
    std::fs::write(&file, HOSTILE_META).unwrap();
    let file = file.display().to_string();
    let o = e.cli("sci", &["plugin", "add", &file]);
    assert!(!o.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        all.contains("bad-metadata") || all.contains("metadata field `description`"),
        "{all}"
    );
    assert!(!all.contains('\u{202E}'), "{all}");
    let o = e.cli("sci", &["plugin", "inspect", &file]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&o.stdout).contains('\u{202E}'));
    let listed =
        String::from_utf8_lossy(&e.cli("rev", &["plugin", "list", "--json"]).stdout).into_owned();
    assert!(
        !listed.contains("hostile-meta"),
        "nothing was stored: {listed}"
    );
}

#[test]
fn successful_stages_are_audited_with_counts_and_rounded_figures() {
    let e = env();
    let ngrams = digest_of(&e, "hashed-ngrams");
    let o = e.cli("sci", &["train", "--dataset", "d", "--features", &ngrams]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = e.open();
    let aud = c.authenticate(&e.tokens["aud"]).unwrap();
    let calls = c
        .audit_log(
            &aud,
            &AuditFilter {
                action: Some("plugin_call".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let o = calls[0].record.outcome.as_ref().unwrap();
    assert_eq!((o.stage.as_str(), o.code.as_str()), ("featurize", "ok"));
    assert!(o.purpose.starts_with("train m-"), "{}", o.purpose);
    assert_eq!((o.records_in, o.records_out), (80, 80));
    assert!(o.fuel.is_power_of_two() && o.peak_memory_bytes.is_power_of_two());
    assert!(calls[0].record.resource.contains(&ngrams));
    // A stage that wrote nothing and succeeded leaves no plugin-log entry.
    let admin = c.authenticate(&e.tokens["admin"]).unwrap();
    assert!(c.plugin_log(&admin, None, 0).unwrap().is_empty());
    // Denied to a scientist, and the denial is audited.
    let sci = c.authenticate(&e.tokens["sci"]).unwrap();
    assert!(matches!(
        c.plugin_log(&sci, None, 0),
        Err(ServiceError::Denied { .. })
    ));
}
