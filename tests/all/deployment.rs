//! Deployments: released models served to client accounts inside the
//! environment, with sticky weighted routing, a shadow, promotion,
//! rollback, per-request authorization and audit, and per-variant metrics
//! (docs/deployment.md).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use cloister_host::audit::AuditFilter;
use cloister_host::deployments::Shadow;
use cloister_host::policy::Role;
use cloister_host::service::{
    Cloister, DeploymentChange, ImportOptions, ServiceError, TrainRequest,
};
use cloister_host::types::DataRecord;
use cloister_host::users::User;

struct Setup {
    dir: tempfile::TempDir,
    /// The environment, open in this process until [`Setup::close`] (the
    /// CLI needs it closed).
    open: Option<Cloister>,
    tokens: HashMap<&'static str, String>,
    users: HashMap<&'static str, User>,
    /// Two released models and one that never went through the gate.
    a: String,
    b: String,
    unreleased: String,
    /// A released model whose chain has no preprocessor: its featurizer
    /// refuses records without text, which the others' preprocessor drops.
    fragile: String,
}

impl Setup {
    fn env(&self) -> PathBuf {
        self.dir.path().join("env")
    }

    fn cli(&self, role: &str, args: &[&str]) -> (bool, String, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_cloister"))
            .args(args)
            .env("CLOISTER_ENV", self.env())
            .env("CLOISTER_TOKEN", &self.tokens[role])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn u(&self, name: &str) -> &User {
        &self.users[name]
    }

    fn c(&self) -> &Cloister {
        self.open.as_ref().expect("open")
    }

    fn close(&mut self) {
        self.open = None;
    }
}

/// SpamAssassin, its two plugins, two released `logreg` models (two seeds)
/// and an unreleased one; an operator, two clients and the usual roles.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    let admin = c.authenticate(&root).unwrap();
    let mut tokens = HashMap::from([("root", root)]);
    let mut users = HashMap::new();
    for (name, role) in [
        ("sci", Role::Scientist),
        ("rev", Role::Reviewer),
        ("appr", Role::Approver),
        ("op", Role::Operator),
        ("aud", Role::Auditor),
        ("app", Role::Client),
        ("other-app", Role::Client),
    ] {
        let (u, t) = c.add_user(&admin, name, &[role]).unwrap();
        tokens.insert(name, t);
        users.insert(name, u);
    }
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/spamassassin/spamassassin.jsonl.gz");
    c.import_dataset(&users["sci"], "spam", &data, &ImportOptions::default())
        .unwrap();
    let digest = |name: &str| {
        let e = c
            .add_plugin(&users["sci"], cloister_bundled_plugins::get(name).unwrap())
            .unwrap();
        c.approve_plugin(&users["rev"], &e.digest).unwrap();
        e.digest
    };
    let normalize = digest("text-normalize");
    let ngrams = digest("hashed-ngrams");
    let train_with = |seed: &str, preprocess: Vec<String>| {
        let req = TrainRequest {
            dataset: "spam".into(),
            preprocess,
            preprocess_config: Vec::new(),
            features: ngrams.clone(),
            features_config: Vec::new(),
            template: "logreg".into(),
            sets: vec![("seed".into(), seed.into())],
            split_seed: Some(0),
        };
        c.train_model(&users["sci"], &req, &mut |_| {}).unwrap().id
    };
    let train = |seed: &str| train_with(seed, vec![normalize.clone()]);
    let (a, b, unreleased) = (train("0"), train("1"), train("2"));
    let fragile = train_with("3", vec![]);
    for m in [&a, &b, &fragile] {
        c.request_release(&users["sci"], m, "serve it").unwrap();
        c.decide_release(&users["appr"], m, true).unwrap();
    }
    Setup {
        dir,
        open: Some(c),
        tokens,
        users,
        a,
        b,
        unreleased,
        fragile,
    }
}

/// The audit entries of `action`, read by the auditor.
fn audited(s: &Setup, action: &str) -> Vec<cloister_host::audit::AuditEntry> {
    s.c()
        .audit_log(
            s.u("aud"),
            &AuditFilter {
                action: Some(action.into()),
                ..AuditFilter::default()
            },
        )
        .unwrap()
}

/// Runs the regression gate for `model` on the bundled (gold-labeled)
/// data and requires a pass.
fn pass_gate(s: &Setup, model: &str) {
    let r = s
        .c()
        .test_candidate(s.u("op"), "spam", model, Some("spam"))
        .unwrap();
    assert_eq!(r.verdict, "pass", "{:?}", r.reasons);
}

fn denied<T: std::fmt::Debug>(r: Result<T, ServiceError>) {
    assert!(
        matches!(r, Err(ServiceError::Denied { .. })),
        "expected a denial, got {r:?}"
    );
}

fn mails() -> Vec<DataRecord> {
    [
        (
            "m1",
            "WIN a FREE prize now!!! click here to claim your cash",
        ),
        (
            "m2",
            "Hi team, the meeting moved to 3pm, see the agenda attached",
        ),
        ("m3", "cheap meds online, no prescription, best prices"),
    ]
    .iter()
    .map(|(id, t)| crate::support::text(id, t))
    .collect()
}

#[test]
fn deployments_serve_released_models_to_their_clients_only() {
    let mut s = setup();
    let (op, app, other, sci) = (s.u("op"), s.u("app"), s.u("other-app"), s.u("sci"));
    let clients = vec!["app".to_string()];
    // Only operators create; only released models are served; clients are
    // client accounts.
    denied(s.c().create_deployment(sci, "spam", &s.a, &clients));
    denied(s.c().create_deployment(op, "spam", &s.unreleased, &clients));
    let e = s
        .c()
        .create_deployment(op, "spam", &s.a, &["sci".into()])
        .unwrap_err();
    assert!(e.to_string().contains("not a client account"), "{e}");
    assert!(
        s.c()
            .create_deployment(op, "Bad Name", &s.a, &clients)
            .is_err()
    );
    let d = s.c().create_deployment(op, "spam", &s.a, &clients).unwrap();
    assert_eq!(
        (d.champion.as_str(), d.champion_weight()),
        (s.a.as_str(), 10_000)
    );

    // Its client gets the released model's answers, through its chain.
    let got = s.c().predict_deployed(app, "spam", None, &mails()).unwrap();
    assert_eq!(
        (got.model.as_str(), got.variant),
        (s.a.as_str(), "champion")
    );
    let direct = s.c().predict(sci, &s.a, &mails()).unwrap();
    assert_eq!(got.predictions.len(), 3);
    for (i, p) in got.predictions.iter().enumerate() {
        let row = &direct.probs[i * 2..i * 2 + 2];
        for (c, v) in direct.classes.iter().zip(row) {
            assert!((p.probabilities[c] - v).abs() < 1e-6, "{p:?} {row:?}");
        }
    }
    assert_eq!(got.predictions[0].label, "spam");
    assert_eq!(got.predictions[1].label, "ham");

    // No one else calls it: another client, a scientist, an operator; and
    // an unknown deployment is refused the same way.
    denied(s.c().predict_deployed(other, "spam", None, &mails()));
    denied(s.c().predict_deployed(sci, "spam", None, &mails()));
    denied(s.c().predict_deployed(op, "spam", None, &mails()));
    denied(s.c().predict_deployed(app, "nope", None, &mails()));
    // And a client does nothing but predict.
    denied(s.c().list_deployments(app));
    denied(s.c().list_models(app));
    let e = s
        .c()
        .add_user(
            &s.c().authenticate(&s.tokens["root"]).unwrap(),
            "mixed",
            &[Role::Client, Role::Scientist],
        )
        .unwrap_err();
    assert!(e.to_string().contains("cannot be combined"), "{e}");
    // Too many records, or none: refused after the audited decision.
    assert!(s.c().predict_deployed(app, "spam", None, &[]).is_err());

    // The audit log has every request: who, the deployment, the variant,
    // the record count and the input's digest; never a text.
    let aud = s.u("aud");
    let entries = s
        .c()
        .audit_log(
            aud,
            &AuditFilter {
                action: Some("predict".into()),
                ..AuditFilter::default()
            },
        )
        .unwrap();
    let allowed: Vec<_> = entries
        .iter()
        .filter(|e| e.record.decision == cloister_host::audit::Decision::Allow)
        .collect();
    assert_eq!(allowed.len(), 2, "the good request and the empty one");
    let facts = allowed[0].record.serving.as_ref().unwrap();
    assert_eq!(
        (
            facts.deployment.as_str(),
            facts.variant.as_str(),
            facts.records
        ),
        ("spam", "champion", 3)
    );
    assert_eq!(facts.input_sha256.len(), 64);
    assert!(entries.len() >= 6, "the denials are on the record too");

    // A change another process writes (here straight to the store, as its
    // commit lands) applies from the next request: the request path never
    // serves a parsed deployment the store no longer holds.
    let store = s.c().env().store();
    let mut d = cloister_host::deployments::get(store.as_ref(), "spam").unwrap();
    d.champion = s.b.clone();
    let mut batch = cloister_host::store::WriteBatch::new();
    cloister_host::deployments::put(&mut batch, &d).unwrap();
    store.commit(batch).unwrap();
    let got = s.c().predict_deployed(app, "spam", None, &mails()).unwrap();
    assert_eq!(got.model, s.b);
    s.close();
    let (ok, log, err) = s.cli("aud", &["audit", "log", "--json"]);
    assert!(ok, "{err}");
    for text in ["FREE prize", "meeting moved", "meds online"] {
        assert!(!log.contains(text), "the audit log carries a text");
    }
}

#[test]
fn routing_is_sticky_candidates_ramp_and_roll_back_and_metrics_are_kept() {
    let mut s = setup();
    let (op, app) = (s.u("op"), s.u("app"));
    s.c()
        .create_deployment(op, "spam", &s.a, &["app".into()])
        .unwrap();
    let keys: Vec<String> = (0..120).map(|i| format!("user-{i}")).collect();
    let record = [crate::support::text("r", "free cash prize, click now")];
    let route = |k: &str| {
        s.c()
            .predict_deployed(app, "spam", Some(k), &record)
            .unwrap()
            .model
    };
    // 25% to a candidate needs a passing regression report first.
    denied(s.c().change_deployment(
        op,
        "spam",
        DeploymentChange::SetWeight {
            model: s.b.clone(),
            weight: 2_500,
        },
    ));
    pass_gate(&s, &s.b);
    // 25% to a candidate: about a quarter of the keys move, sticky.
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::SetWeight {
                model: s.b.clone(),
                weight: 2_500,
            },
        )
        .unwrap();
    let at25: Vec<String> = keys.iter().map(|k| route(k)).collect();
    let to_b = at25.iter().filter(|m| **m == s.b).count();
    assert!(
        (15..=45).contains(&to_b),
        "{to_b} of 120 keys on the candidate"
    );
    assert_eq!(
        keys.iter().take(20).map(|k| route(k)).collect::<Vec<_>>(),
        at25[..20],
        "the same key, the same variant"
    );
    // Raising the weight moves keys only toward the candidate.
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::SetWeight {
                model: s.b.clone(),
                weight: 6_000,
            },
        )
        .unwrap();
    let at60: Vec<String> = keys.iter().map(|k| route(k)).collect();
    for (before, after) in at25.iter().zip(&at60) {
        assert!(before == after || *after == s.b, "{before} → {after}");
    }
    assert!(at60.iter().filter(|m| **m == s.b).count() > to_b);

    // The unreleased model cannot be brought in, as a candidate or shadow.
    denied(s.c().change_deployment(
        op,
        "spam",
        DeploymentChange::Shadow(Some(Shadow {
            model: s.unreleased.clone(),
            sample: 10_000,
        })),
    ));

    // The metrics: requests per variant, latency, classes, confidence, and
    // the candidate's agreement with the champion (it also ran).
    let st = s.c().deployment_status(s.u("aud"), "spam", 0).unwrap();
    let champion = &st.variants[0];
    let candidate = &st.variants[1];
    assert_eq!(champion.role, "champion");
    assert_eq!(candidate.role, "candidate");
    let on_b = |v: &[String]| v.iter().filter(|m| **m == s.b).count() as u64;
    assert_eq!(
        candidate.requests,
        on_b(&at25) + on_b(&at25[..20]) + on_b(&at60)
    );
    assert_eq!(
        champion.requests + candidate.requests,
        120 + 20 + 120,
        "every request is counted once, on the variant that answered"
    );
    assert_eq!(champion.error_rate, 0.0);
    assert!(champion.p50_ms.is_some() && champion.p99_ms >= champion.p50_ms);
    assert_eq!(champion.classes.values().sum::<u64>(), champion.records);
    assert!(candidate.agreement.is_some(), "{candidate:?}");
    assert!(champion.agreement.is_none());
    assert!(candidate.mean_confidence.unwrap() > 0.5);

    // Promote, then roll back: the old champion returns, candidates at 0.
    let d = s
        .c()
        .change_deployment(op, "spam", DeploymentChange::Promote(s.b.clone()))
        .unwrap();
    assert_eq!(d.champion, s.b);
    assert!(keys.iter().take(30).all(|k| route(k) == s.b));
    s.c()
        .change_deployment(op, "spam", DeploymentChange::Pause)
        .unwrap();
    assert!(
        s.c()
            .change_deployment(
                op,
                "spam",
                DeploymentChange::SetWeight {
                    model: s.a.clone(),
                    weight: 100
                }
            )
            .is_err()
    );
    let d = s
        .c()
        .change_deployment(op, "spam", DeploymentChange::Rollback)
        .unwrap();
    assert_eq!(d.champion, s.a);
    assert!(d.candidates.iter().all(|c| c.weight == 0));
    assert!(keys.iter().take(30).all(|k| route(k) == s.a));
    assert_eq!(
        d.history
            .iter()
            .map(|h| h.what.as_str())
            .collect::<Vec<_>>(),
        [
            format!("create {}", s.a).as_str(),
            &format!("test {} on spam@1: pass", s.b),
            &format!("set-weight {} 2500", s.b),
            &format!("set-weight {} 6000", s.b),
            &format!("promote {}", s.b),
            "pause",
            "rollback"
        ]
    );

    // A shadow sees its sample and is compared, never returned.
    s.c()
        .change_deployment(op, "spam", DeploymentChange::Resume)
        .unwrap();
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::Shadow(Some(Shadow {
                model: s.b.clone(),
                sample: 10_000,
            })),
        )
        .unwrap();
    for k in keys.iter().take(10) {
        let p = s
            .c()
            .predict_deployed(app, "spam", Some(k), &record)
            .unwrap();
        assert_eq!(p.model, s.a, "the shadow never answers");
    }
    let st = s.c().deployment_status(s.u("op"), "spam", 0).unwrap();
    let shadow = st.variants.iter().find(|v| v.role == "shadow").unwrap();
    assert_eq!(shadow.requests, 10);
    assert_eq!(shadow.agreement, Some(1.0), "{shadow:?}");

    // The CLI: status as an auditor, a client calls it, nobody else.
    s.close();
    let (ok, out, err) = s.cli("aud", &["deploy", "status", "spam"]);
    assert!(ok, "{err}");
    assert!(out.contains("champion") && out.contains("shadow"), "{out}");
    let mock = s.dir.path().join("mock.jsonl");
    std::fs::write(
        &mock,
        "{\"id\":\"x\",\"text\":\"claim your free prize money now\"}\n",
    )
    .unwrap();
    let mock = mock.to_str().unwrap();
    let (ok, out, err) = s.cli("app", &["deploy", "predict", "spam", "--input", mock]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["label"], "spam");
    assert_eq!(v["model"], s.a.as_str());
    let (ok, _, err) = s.cli("other-app", &["deploy", "predict", "spam", "--input", mock]);
    assert!(!ok && err.contains("denied"), "{err}");
    let (ok, _, err) = s.cli("app", &["deploy", "list"]);
    assert!(!ok && err.contains("denied"), "{err}");
    let (ok, out, err) = s.cli("op", &["deploy", "set-weight", "spam", &s.b, "12.5"]);
    assert!(ok, "{err}");
    assert!(out.contains("12.50%"), "{out}");
    let (ok, _, err) = s.cli("op", &["deploy", "set-weight", "spam", &s.b, "120"]);
    assert!(!ok && err.contains("0 to 100"), "{err}");
}

#[test]
fn a_ramp_advances_with_traffic_promotes_and_a_breach_rolls_back() {
    use cloister_host::deployments::Guards;
    let s = setup();
    let (op, app) = (s.u("op"), s.u("app"));
    s.c()
        .create_deployment(op, "spam", &s.a, &["app".into()])
        .unwrap();
    let record = [crate::support::text("r", "free cash prize, click now")];
    let mut sent = 0;
    let mut send = |n: usize| {
        for _ in 0..n {
            s.c()
                .predict_deployed(app, "spam", Some(&format!("k{sent}")), &record)
                .unwrap();
            sent += 1;
        }
    };
    // 20% → 60% → 100%, three candidate requests a step, no bake time;
    // the guards hold (the two seeds agree on this record).
    pass_gate(&s, &s.b);
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::Ramp {
                model: s.b.clone(),
                steps: vec![2_000, 6_000, 10_000],
                bake_ms: 0,
                guards: Guards {
                    max_error_rate: Some(0.0),
                    min_agreement: Some(0.5),
                    min_requests: 3,
                    ..Guards::none()
                },
            },
        )
        .unwrap();
    let weight = |s: &Setup| {
        let d = s.c().deployment_status(op, "spam", 0).unwrap().deployment;
        (d.champion.clone(), d.candidates.first().map(|c| c.weight))
    };
    assert_eq!(weight(&s), (s.a.clone(), Some(2_000)));
    let mut steps = vec![];
    for _ in 0..300 {
        send(1);
        let w = weight(&s);
        if steps.last() != Some(&w) {
            steps.push(w.clone());
        }
        if w.0 == s.b {
            break;
        }
    }
    assert_eq!(
        steps,
        [
            (s.a.clone(), Some(2_000)),
            (s.a.clone(), Some(6_000)),
            (s.b.clone(), None)
        ],
        "{sent} requests"
    );
    let d = s.c().deployment_status(op, "spam", 0).unwrap().deployment;
    let ramp = d.ramp.as_ref().unwrap();
    assert_eq!(ramp.state, "done");
    assert!(
        d.history
            .iter()
            .any(|h| h.by == "cloister" && h.what.ends_with("promoted")),
        "{:?}",
        d.history
    );

    // Now ramp the old champion back in with an impossible latency limit:
    // its first request breaches it, and it goes back to 0%.
    pass_gate(&s, &s.a);
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::Ramp {
                model: s.a.clone(),
                steps: vec![5_000, 10_000],
                bake_ms: 60_000,
                guards: Guards {
                    max_p99_ms: Some(0.001),
                    min_requests: 1,
                    ..Guards::none()
                },
            },
        )
        .unwrap();
    for _ in 0..100 {
        send(1);
        if weight(&s).1 == Some(0) {
            break;
        }
    }
    let d = s.c().deployment_status(op, "spam", 0).unwrap().deployment;
    assert_eq!(d.champion, s.b);
    assert_eq!(d.candidates[0].weight, 0);
    let ramp = d.ramp.as_ref().unwrap();
    assert_eq!(ramp.state, "rolled-back");
    let reason = ramp.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("p99 latency") && reason.contains("> 0.001 ms"),
        "{reason}"
    );
    // Each automatic step is on the record as the host's own action.
    let ramps = audited(&s, "ramp");
    assert_eq!(ramps.len(), 3, "two steps and a rollback");
    assert!(ramps.iter().all(|e| e.record.actor == "cloister"));

    // A candidate whose chain starts failing (records its featurizer
    // refuses, which the champion's preprocessor drops) is rolled back by
    // the error-rate guard.
    s.c()
        .change_deployment(
            op,
            "spam",
            // 5%, held: no regression report is needed that far.
            DeploymentChange::Ramp {
                model: s.fragile.clone(),
                steps: vec![500],
                bake_ms: 60_000,
                guards: Guards {
                    max_error_rate: Some(0.0),
                    min_requests: 1,
                    ..Guards::none()
                },
            },
        )
        .unwrap();
    let broken = [DataRecord {
        texts: vec![],
        ..crate::support::text("r", "")
    }];
    let mut failed = 0;
    for i in 0..600 {
        if s.c()
            .predict_deployed(app, "spam", Some(&format!("broken{i}")), &broken)
            .is_err()
        {
            failed += 1;
        }
        let d = s.c().deployment_status(op, "spam", 0).unwrap().deployment;
        if d.ramp.as_ref().unwrap().state != "running" {
            break;
        }
    }
    assert!(failed > 0);
    let d = s.c().deployment_status(op, "spam", 0).unwrap().deployment;
    let ramp = d.ramp.as_ref().unwrap();
    assert_eq!(ramp.state, "rolled-back");
    assert!(
        ramp.reason.as_deref().unwrap().starts_with("error rate"),
        "{:?}",
        ramp.reason
    );
    assert_eq!(d.champion, s.b);
    crate::support::every_audited_action_is_known(s.c());
}

#[test]
fn no_request_fails_while_weights_change_promote_and_roll_back_under_load() {
    let s = setup();
    let (op, app) = (s.u("op"), s.u("app"));
    s.c()
        .create_deployment(op, "spam", &s.a, &["app".into()])
        .unwrap();
    pass_gate(&s, &s.b);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let record = [crate::support::text(
        "r",
        "meeting at noon, agenda attached",
    )];
    let (served, failed) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|t| {
                let (s, stop, record) = (&s, &stop, &record);
                scope.spawn(move || {
                    let (mut ok, mut bad) = (0u64, 0u64);
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = format!("t{t}-{i}");
                        match s.c().predict_deployed(app, "spam", Some(&key), record) {
                            Ok(_) => ok += 1,
                            Err(_) => bad += 1,
                        }
                        i += 1;
                    }
                    (ok, bad)
                })
            })
            .collect();
        let changes = [
            DeploymentChange::SetWeight {
                model: s.b.clone(),
                weight: 2_500,
            },
            DeploymentChange::SetWeight {
                model: s.b.clone(),
                weight: 7_500,
            },
            DeploymentChange::Promote(s.b.clone()),
            DeploymentChange::Rollback,
            DeploymentChange::SetWeight {
                model: s.b.clone(),
                weight: 5_000,
            },
            DeploymentChange::Promote(s.b.clone()),
            DeploymentChange::Rollback,
        ];
        // The clients stop even when a change fails (the scope joins them
        // before the failure is reported).
        let mut changed = Ok(());
        for c in changes {
            std::thread::sleep(std::time::Duration::from_millis(150));
            if let Err(e) = s.c().change_deployment(op, "spam", c.clone()) {
                changed = Err(format!("{c:?}: {e}"));
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        changed.unwrap();
        clients
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    });
    assert_eq!(failed, 0, "{served} served");
    assert!(served > 20, "{served}");
    let st = s.c().deployment_status(op, "spam", 0).unwrap();
    let total: u64 = st
        .variants
        .iter()
        .filter(|v| v.role != "shadow")
        .map(|v| v.requests)
        .sum();
    assert!(total <= served, "only the current variants are listed");
    assert!(st.variants.iter().all(|v| v.error_rate == 0.0));
}

/// The bundled SpamAssassin records with their gold labels.
/// Operators changing one deployment at once: every change either lands
/// whole on the deployment it was decided on or is refused as overtaken;
/// none is written over another (the history keeps one entry per change
/// that landed).
#[test]
fn concurrent_changes_to_one_deployment_land_whole_or_are_refused() {
    use cloister_host::deployments::Guards;
    let s = setup();
    let (c, op) = (s.c(), s.u("op"));
    c.create_deployment(op, "d1", &s.a, &["app".to_string()])
        .unwrap();
    // A ramp that counts every candidate request (and never steps) runs
    // meanwhile: its counters are written on the request path, which must
    // not write over the operators' changes.
    let gate = c.test_candidate(op, "d1", &s.b, Some("spam")).unwrap();
    assert_eq!(gate.verdict, "pass", "{:?}", gate.reasons);
    c.change_deployment(
        op,
        "d1",
        DeploymentChange::Ramp {
            model: s.b.clone(),
            steps: vec![5_000],
            bake_ms: 0,
            guards: Guards {
                min_requests: 1_000_000,
                ..Guards::none()
            },
        },
    )
    .unwrap();
    let before = c.deployment_status(s.u("op"), "d1", 0).unwrap();
    let history = |st: &cloister_host::service::DeploymentStatus| st.deployment.history.len();
    let serving = std::sync::atomic::AtomicBool::new(true);
    let outcomes: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let (app, record, serving) = (s.u("app"), mails(), &serving);
        scope.spawn(move || {
            let mut n = 0;
            while serving.load(std::sync::atomic::Ordering::Relaxed) {
                c.predict_deployed(app, "d1", Some(&format!("k{n}")), &record[..1])
                    .unwrap();
                n += 1;
            }
        });
        let hs: Vec<_> = (0..4)
            .map(|t| {
                scope.spawn(move || {
                    (0..10)
                        .map(|i| {
                            let change = if (t + i) % 2 == 0 {
                                DeploymentChange::Pause
                            } else {
                                DeploymentChange::Resume
                            };
                            c.change_deployment(op, "d1", change)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        serving.store(false, std::sync::atomic::Ordering::Relaxed);
        all
    });
    let landed = outcomes.iter().filter(|o| o.is_ok()).count();
    assert!(landed > 0);
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert!(refused.contains("changed while this change"), "{refused}");
    }
    let after = c.deployment_status(s.u("op"), "d1", 0).unwrap();
    assert_eq!(history(&after), history(&before) + landed);
}

fn spam_records() -> Vec<DataRecord> {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/spamassassin/spamassassin.jsonl.gz");
    cloister_host::records::read_file(&data, Default::default()).unwrap()
}

/// Deployment `spam` of model `a` for `clients`, capturing every request
/// into dataset `spam-live` in versions of 1,000.
fn deploy_capturing(s: &Setup, clients: &[&str]) {
    use cloister_host::service::CaptureSpec;
    let op = s.u("op");
    let clients: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
    s.c().create_deployment(op, "spam", &s.a, &clients).unwrap();
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::Capture(Some(CaptureSpec {
                dataset: "spam-live".into(),
                sample: 10_000,
                batch: 1_000,
            })),
        )
        .unwrap();
}

#[test]
fn concurrent_feedback_on_one_answer_is_scored_once() {
    use cloister_host::service::Feedback;
    let s = setup();
    let app = s.u("app");
    deploy_capturing(&s, &["app"]);
    let sample: Vec<DataRecord> = spam_records().into_iter().take(20).collect();
    s.c()
        .predict_deployed(app, "spam", Some("k"), &sample)
        .unwrap();
    let items: Vec<Feedback> = sample
        .iter()
        .map(|r| Feedback {
            id: r.id.clone(),
            label: r.label.clone().unwrap(),
        })
        .collect();
    // Six clients' worth of the same labels at once: each answer is
    // scored (and its captured record labeled) by exactly one request.
    let outcomes = std::thread::scope(|t| {
        let handles: Vec<_> = (0..6)
            .map(|_| t.spawn(|| s.c().send_feedback(app, "spam", &items).unwrap()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let sum = |f: fn(&cloister_host::service::FeedbackOutcome) -> u64| -> u64 {
        outcomes.iter().map(f).sum()
    };
    assert_eq!(
        (
            sum(|o| o.scored),
            sum(|o| o.repeated),
            sum(|o| o.labeled_captures)
        ),
        (20, 100, 20),
        "{outcomes:?}"
    );
    let st = s.c().deployment_status(s.u("aud"), "spam", 0).unwrap();
    assert_eq!(st.variants[0].labeled, 20);
}

#[test]
fn feedback_scores_online_accuracy_labels_captures_and_the_accuracy_guard_rolls_back() {
    use cloister_host::datasets::Provenance;
    use cloister_host::deployments::Guards;
    use cloister_host::service::{CaptureSpec, Feedback};
    let s = setup();
    let (op, app) = (s.u("op"), s.u("app"));
    // Capture every request into a new dataset, versions of 1,000.
    deploy_capturing(&s, &["app", "other-app"]);
    // A dataset with other data is refused as a capture target.
    let capture = |dataset: &str, sample: u32, batch: u32| {
        s.c()
            .change_deployment(
                op,
                "spam",
                DeploymentChange::Capture(Some(CaptureSpec {
                    dataset: dataset.into(),
                    sample,
                    batch,
                })),
            )
            .unwrap_err()
            .to_string()
    };
    let e = capture("spam", 10_000, 10);
    assert!(e.contains("holds other data"), "{e}");
    let e = capture("spam-live", 0, 10);
    assert!(e.contains("sample is 1..=10000"), "{e}");
    let e = capture("spam-live", 10_000, 0);
    assert!(e.contains("batch is 1..=100000"), "{e}");
    let e = capture("Bad Name", 10_000, 10);
    assert!(e.contains("Bad Name"), "{e}");
    let e = s
        .c()
        .change_deployment(op, "spam", DeploymentChange::KeepAnswers(u64::MAX))
        .unwrap_err();
    assert!(e.to_string().contains("at most 10000000 answers"), "{e}");

    let all = spam_records();
    let truth: HashMap<String, String> = all
        .iter()
        .map(|r| (r.id.clone(), r.label.clone().unwrap()))
        .collect();
    let sample: Vec<DataRecord> = all.iter().take(60).cloned().collect();
    let answers = s
        .c()
        .predict_deployed(app, "spam", Some("k"), &sample)
        .unwrap();
    // The client sends the true labels of 50 of them, one id it never
    // sent, and one twice.
    let mut items: Vec<Feedback> = sample
        .iter()
        .take(50)
        .map(|r| Feedback {
            id: r.id.clone(),
            label: truth[&r.id].clone(),
        })
        .collect();
    items.push(Feedback {
        id: "never-sent".into(),
        label: "spam".into(),
    });
    items.push(items[0].clone());
    let o = s.c().send_feedback(app, "spam", &items).unwrap();
    assert_eq!((o.scored, o.unknown, o.repeated), (50, 1, 1), "{o:?}");
    assert_eq!(o.labeled_captures, 50);
    // Another client's ids are not this one's: nothing matches.
    let o = s
        .c()
        .send_feedback(s.u("other-app"), "spam", &items[..5])
        .unwrap();
    assert_eq!(o.unknown, 5);
    // Nobody else may send feedback, and a label must be a class.
    denied(s.c().send_feedback(op, "spam", &items[..1]));
    denied(s.c().send_feedback(s.u("sci"), "spam", &items[..1]));
    let e = s
        .c()
        .send_feedback(
            app,
            "spam",
            &[Feedback {
                id: sample[55].id.clone(),
                label: "eggs".into(),
            }],
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("feedback 0") && e.to_string().contains("`eggs`"),
        "{e}"
    );
    // Online accuracy: what the client was told, against the truth.
    let right = answers
        .predictions
        .iter()
        .take(50)
        .filter(|a| truth[&a.id] == a.label)
        .count() as f64;
    let st = s.c().deployment_status(s.u("aud"), "spam", 0).unwrap();
    let champion = &st.variants[0];
    assert_eq!(champion.labeled, 50);
    assert!((champion.accuracy.unwrap() - right / 50.0).abs() < 1e-9);
    assert_eq!(champion.champion_accuracy, champion.accuracy);
    assert_eq!(st.captured_waiting, 60);
    assert!(st.series[0].points.iter().map(|p| p.labeled).sum::<u64>() == 50);

    // The waiting records become spam-live@1, the feedback their labels.
    let w = s.c().write_capture(op, "spam").unwrap();
    assert_eq!(w.version.as_deref(), Some("spam-live@1"));
    assert_eq!((w.records, w.labeled), (60, 50));
    // Feedback after the version was written lands in it too.
    let late = Feedback {
        id: sample[50].id.clone(),
        label: truth[&sample[50].id].clone(),
    };
    assert_eq!(
        s.c()
            .send_feedback(app, "spam", &[late])
            .unwrap()
            .labeled_captures,
        1
    );
    let v = cloister_host::datasets::resolve(s.c().env(), "spam-live@1").unwrap();
    assert_eq!(v.created_by, "cloister");
    let stored: Vec<_> = cloister_host::datasets::records(s.c().env(), &v)
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored.len(), 60);
    let labeled: Vec<_> = stored.iter().filter(|r| !r.labels.is_empty()).collect();
    assert_eq!(labeled.len(), 51);
    for r in &labeled {
        let (client, id) = r.record.id.split_once('/').unwrap();
        assert_eq!(client, "app");
        assert_eq!(r.labels[0].label, truth[id]);
        assert!(matches!(
            &r.labels[0].provenance,
            Provenance::Feedback { deployment, client } if deployment == "spam" && client == "app"
        ));
        assert!(r.record.label.is_none());
    }
    // The capture is the host's act, on the record before it took effect.
    let captures = audited(&s, "capture");
    assert_eq!(captures.len(), 1);
    assert_eq!(captures[0].record.actor, "cloister");
    assert_eq!(captures[0].record.resource, "Dataset::\"spam-live\"");

    // The accuracy guard. Records the two models label differently,
    // found by serving them with each as champion…
    s.c()
        .create_deployment(op, "probe-a", &s.a, &["app".into()])
        .unwrap();
    s.c()
        .create_deployment(op, "probe-b", &s.b, &["app".into()])
        .unwrap();
    let mut differ = Vec::new();
    for chunk in all.chunks(1_000) {
        let pa = s.c().predict_deployed(app, "probe-a", None, chunk).unwrap();
        let pb = s.c().predict_deployed(app, "probe-b", None, chunk).unwrap();
        for (x, y) in pa.predictions.iter().zip(&pb.predictions) {
            assert_eq!(x.id, y.id);
            if x.label != y.label {
                differ.push((x.id.clone(), x.label.clone()));
            }
        }
    }
    assert!(differ.len() >= 3, "{} records differ", differ.len());
    // …sent with a key that routes to the candidate at 5%, with feedback
    // that proves the champion right: the ramp rolls back on accuracy.
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::Ramp {
                model: s.b.clone(),
                steps: vec![500],
                bake_ms: 3_600_000,
                guards: Guards {
                    max_accuracy_drop: Some(0.05),
                    min_labels: 3,
                    ..Guards::none()
                },
            },
        )
        .unwrap();
    let probe = [crate::support::text("p", "hello")];
    let key = (0..100_000)
        .map(|i| format!("key-{i}"))
        .find(|k| {
            s.c()
                .predict_deployed(app, "spam", Some(k), &probe)
                .unwrap()
                .variant
                == "candidate"
        })
        .unwrap();
    let by_id: HashMap<&str, &DataRecord> = all.iter().map(|r| (r.id.as_str(), r)).collect();
    let records: Vec<DataRecord> = differ
        .iter()
        .take(20)
        .map(|(id, _)| by_id[id.as_str()].clone())
        .collect();
    let p = s
        .c()
        .predict_deployed(app, "spam", Some(&key), &records)
        .unwrap();
    assert_eq!(p.model, s.b);
    let feedback: Vec<Feedback> = differ
        .iter()
        .take(20)
        .map(|(id, champion_label)| Feedback {
            id: id.clone(),
            label: champion_label.clone(),
        })
        .collect();
    s.c().send_feedback(app, "spam", &feedback).unwrap();
    let d = s.c().deployment_status(op, "spam", 0).unwrap();
    let ramp = d.deployment.ramp.as_ref().unwrap();
    assert_eq!(ramp.state, "rolled-back");
    let reason = ramp.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("online accuracy 0.0000 against the champion's 1.0000"),
        "{reason}"
    );
    assert_eq!(d.deployment.candidates[0].weight, 0);
    let cand = d.variants.iter().find(|v| v.role == "candidate").unwrap();
    assert_eq!(cand.accuracy, Some(0.0));
    assert_eq!(cand.champion_accuracy, Some(1.0));

    // Turning capture off first writes what waits (the probes and the
    // records above), so nothing captured is dropped.
    assert!(d.captured_waiting > 0);
    s.c()
        .change_deployment(op, "spam", DeploymentChange::Capture(None))
        .unwrap();
    let v2 = cloister_host::datasets::resolve(s.c().env(), "spam-live@2").unwrap();
    assert_eq!(v2.stats.records, d.captured_waiting);
    assert_eq!(
        s.c()
            .deployment_status(op, "spam", 0)
            .unwrap()
            .captured_waiting,
        0
    );
    crate::support::every_audited_action_is_known(s.c());
}

#[test]
fn the_regression_gate_holds_candidates_at_five_percent_until_a_signed_pass() {
    use cloister_host::service::{CaptureSpec, Feedback};
    use cloister_host::store::{Space, WriteBatch};
    let mut s = setup();
    let (op, app) = (s.u("op"), s.u("app"));
    s.c()
        .create_deployment(op, "spam", &s.a, &["app".into()])
        .unwrap();
    let set = |w: u32| {
        s.c().change_deployment(
            op,
            "spam",
            DeploymentChange::SetWeight {
                model: s.b.clone(),
                weight: w,
            },
        )
    };
    // 5% without a report; more is refused by the shipped policy.
    set(500).unwrap();
    match set(501) {
        Err(ServiceError::Denied { action, .. }) => assert_eq!(action, "route_traffic"),
        other => panic!("{other:?}"),
    }
    denied(
        s.c()
            .change_deployment(op, "spam", DeploymentChange::Promote(s.b.clone())),
    );
    // Without capture and without --dataset the test says what to do.
    let e = s.c().test_candidate(op, "spam", &s.b, None).unwrap_err();
    assert!(e.to_string().contains("--dataset"), "{e}");
    // On fresh data with too few labels: a signed fail.
    s.c()
        .change_deployment(
            op,
            "spam",
            DeploymentChange::Capture(Some(CaptureSpec {
                dataset: "fresh".into(),
                sample: 10_000,
                batch: 1_000,
            })),
        )
        .unwrap();
    let all = spam_records();
    let recent: Vec<DataRecord> = all.iter().skip(100).take(40).cloned().collect();
    s.c()
        .predict_deployed(app, "spam", Some("k"), &recent)
        .unwrap();
    let labels: Vec<Feedback> = recent
        .iter()
        .take(10)
        .map(|r| Feedback {
            id: r.id.clone(),
            label: r.label.clone().unwrap(),
        })
        .collect();
    s.c().send_feedback(app, "spam", &labels).unwrap();
    s.c().write_capture(op, "spam").unwrap();
    let r = s.c().test_candidate(op, "spam", &s.b, None).unwrap();
    assert_eq!(r.datasets, ["fresh@1"]);
    assert_eq!((r.labeled, r.unlabeled), (10, 30));
    assert_eq!(r.verdict, "fail");
    assert!(r.reasons[0].contains("only 10 labeled records"), "{r:?}");
    assert!(r.verifies(&s.c().public_key()));
    assert!(set(2_500).is_err());
    // Only operators run the gate; a client cannot.
    denied(s.c().test_candidate(app, "spam", &s.b, Some("spam")));
    denied(s.c().test_candidate(s.u("sci"), "spam", &s.b, Some("spam")));

    // On the labeled bundled data: a pass, and the traffic may go up.
    let r = s
        .c()
        .test_candidate(op, "spam", &s.b, Some("spam"))
        .unwrap();
    assert_eq!(r.verdict, "pass", "{:?}", r.reasons);
    assert!(r.labeled >= 1_000);
    assert!(r.accuracy_delta.abs() <= 0.01, "{r:?}");
    assert!(r.accuracy_delta_ci.0 <= r.accuracy_delta && r.accuracy_delta <= r.accuracy_delta_ci.1);
    assert!(r.candidate.ece < 0.2 && r.candidate.brier < 0.2, "{r:?}");
    set(2_500).unwrap();
    let st = s.c().deployment_status(op, "spam", 0).unwrap();
    assert_eq!(st.reports.len(), 1);
    assert_eq!(st.reports[0].standing, "pass");

    // A report changed in the store no longer verifies: it counts as none.
    let key = b"spam\0"
        .iter()
        .chain(s.b.as_bytes())
        .copied()
        .collect::<Vec<u8>>();
    let store = s.c().env().store();
    let stored = store.get(Space::RegressionReports, &key).unwrap().unwrap();
    let mut forged: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    let body = forged["body"]
        .as_str()
        .unwrap()
        .replace("\"labeled\":", "\"labeled\":1");
    forged["body"] = body.into();
    let mut b = WriteBatch::new();
    b.put(
        Space::RegressionReports,
        key.clone(),
        serde_json::to_vec(&forged).unwrap(),
    );
    store.commit(b).unwrap();
    match set(3_000) {
        Err(ServiceError::Denied { action, .. }) => assert_eq!(action, "route_traffic"),
        other => panic!("{other:?}"),
    }
    let st = s.c().deployment_status(op, "spam", 0).unwrap();
    assert_eq!(st.reports[0].standing, "damaged");
    let mut b = WriteBatch::new();
    b.put(Space::RegressionReports, key, stored);
    store.commit(b).unwrap();

    // Promotion with the pass; the report of the old champion's rival
    // then stands against another champion: stale.
    s.c()
        .test_candidate(op, "spam", &s.fragile, Some("spam"))
        .unwrap();
    s.c()
        .change_deployment(op, "spam", DeploymentChange::Promote(s.b.clone()))
        .unwrap();
    let st = s.c().deployment_status(op, "spam", 0).unwrap();
    let fragile = st
        .reports
        .iter()
        .find(|r| r.report.candidate.model == s.fragile)
        .unwrap();
    assert_eq!(fragile.standing, "stale");
    denied(s.c().change_deployment(
        op,
        "spam",
        DeploymentChange::SetWeight {
            model: s.fragile.clone(),
            weight: 1_000,
        },
    ));

    // The CLI: the report, and an exit code that says the verdict.
    // Answered just before the environment closes: what serving holds in
    // memory is written when it closes (a status read just before writes
    // everything earlier, so this answer is the one left in memory).
    s.c().deployment_status(op, "spam", 0).unwrap();
    s.c()
        .predict_deployed(
            app,
            "spam",
            Some("k"),
            &[crate::support::text("late-1", "hi")],
        )
        .unwrap();
    s.close();
    let (ok, out, err) = s.cli(
        "op",
        &[
            "deploy",
            "test",
            "spam",
            "--candidate",
            &s.a,
            "--dataset",
            "spam@1",
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("PASS") && out.contains("McNemar"), "{out}");
    let (ok, out, _) = s.cli(
        "op",
        &[
            "deploy",
            "test",
            "spam",
            "--candidate",
            &s.a,
            "--dataset",
            "fresh",
        ],
    );
    assert!(
        !ok && out.contains("FAIL") && out.contains("only 10 labeled"),
        "{out}"
    );
    let (ok, out, err) = s.cli("op", &["deploy", "status", "spam"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("regression report of") && out.contains("capture:"),
        "{out}"
    );
    // Feedback from a file as the client; a bad line is named, and
    // nothing of the file is scored.
    let labels = s.dir.path().join("labels.jsonl");
    std::fs::write(
        &labels,
        format!(
            "{{\"id\": \"{}\", \"label\": \"spam\"}}\n{{\"id\": \"x\"}}\n",
            recent[20].id
        ),
    )
    .unwrap();
    let (ok, _, err) = s.cli(
        "app",
        &[
            "deploy",
            "feedback",
            "spam",
            "--input",
            labels.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("labels.jsonl:2: field `label`"),
        "{err}"
    );
    std::fs::write(
        &labels,
        format!(
            "{{\"id\": \"{}\", \"label\": \"spam\"}}\n{{\"id\": \"late-1\", \"label\": \"ham\"}}\n",
            recent[20].id
        ),
    )
    .unwrap();
    let (ok, out, err) = s.cli(
        "app",
        &[
            "deploy",
            "feedback",
            "spam",
            "--input",
            labels.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("scored 2 labels"), "{out}");
}

#[test]
fn policy_explain_sees_stored_models_and_deployments_as_their_operations_do() {
    let s = setup();
    let (c, aud, op) = (s.c(), s.u("aud"), s.u("op"));
    let explain = |who: &str, action: &str, resource: &str| {
        c.policy_explain(aud, who, action, resource)
            .unwrap_or_else(|e| panic!("{action} {resource}: {e}"))
            .authorization
            .allowed
    };
    // The stored release state and disclosure verdict decide, as they do
    // when the operator deploys: a released model is allowed, an
    // unreleased one is not.
    assert!(explain("op", "deploy_model", &format!("model:{}", s.a)));
    assert!(!explain(
        "op",
        "deploy_model",
        &format!("model:{}", s.unreleased)
    ));
    // A deployment with its stored clients: the client it names may
    // predict, another may not.
    c.create_deployment(op, "spam", &s.a, &["app".into()])
        .unwrap();
    assert!(explain("app", "predict", "deployment:spam"));
    assert!(!explain("other-app", "predict", "deployment:spam"));
    // An action on a kind of resource it does not apply to is refused with
    // the kinds it applies to, before any policy is evaluated.
    let e = c
        .policy_explain(aud, "op", "manage_deployment", "env")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "`manage_deployment` does not apply to env; it applies to deployment:NAME"
    );
    let e = c
        .policy_explain(aud, "op", "predict", "deployment:nope")
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

/// A reviewer takes a plugin's approval back: from then on nothing runs
/// it — a deployment serving a model that uses it stops at the next
/// request (in a process that had it loaded), predicting and training
/// with it are denied, and a model that uses it is not released, exported
/// or deployed — until a reviewer approves the digest again. Only
/// reviewers and admins withdraw; the plugin keeps the withdrawal in its
/// history, and the log has every attempt.
#[test]
fn a_withdrawn_approval_stops_serving_predicting_and_training_until_approved_again() {
    let s = setup();
    let (op, app, sci, rev) = (s.u("op"), s.u("app"), s.u("sci"), s.u("rev"));
    let c = s.c();
    c.create_deployment(op, "spam", &s.a, &["app".into()])
        .unwrap();
    c.create_deployment(op, "plain", &s.fragile, &["app".into()])
        .unwrap();
    c.predict_deployed(app, "spam", None, &mails()).unwrap();
    let normalize = c
        .list_plugins(rev)
        .unwrap()
        .into_iter()
        .find(|p| p.name == "text-normalize")
        .unwrap()
        .digest;

    denied(c.withdraw_approval(sci, &normalize));
    denied(c.withdraw_approval(op, &normalize));
    let e = c.withdraw_approval(rev, &normalize[..12]).unwrap();
    assert!(e.approval.is_none());
    assert_eq!(e.withdrawn.len(), 1);
    assert_eq!(
        (
            e.withdrawn[0].by.as_str(),
            e.withdrawn[0].approval.by.as_str()
        ),
        ("rev", "rev")
    );
    let again = c.withdraw_approval(rev, &normalize).unwrap_err();
    assert_eq!(
        again.to_string(),
        format!("plugin {normalize} is not approved: there is no approval to withdraw")
    );

    // The loaded deployment stops at once; one whose model does not use
    // the plugin goes on.
    let stopped = c.predict_deployed(app, "spam", None, &mails()).unwrap_err();
    assert!(
        stopped
            .to_string()
            .contains("of the deployed model is not approved"),
        "{stopped}"
    );
    c.predict_deployed(app, "plain", None, &mails()).unwrap();
    denied(c.predict(sci, &s.a, &mails()));
    let req = TrainRequest {
        dataset: "spam".into(),
        preprocess: vec![normalize.clone()],
        preprocess_config: Vec::new(),
        features: c
            .list_plugins(rev)
            .unwrap()
            .into_iter()
            .find(|p| p.name == "hashed-ngrams")
            .unwrap()
            .digest,
        features_config: Vec::new(),
        template: "logreg".into(),
        sets: Vec::new(),
        split_seed: Some(0),
    };
    denied(c.train_model(sci, &req, &mut |_| {}));
    // A model that uses it is not released, exported or deployed either.
    let why = format!(
        "its plugin text-normalize {} is not approved (its approval was withdrawn by rev); a reviewer must approve that digest again first",
        &normalize[..16]
    );
    let appr = s.u("appr");
    c.request_release(sci, &s.unreleased, "now").unwrap();
    // The approver sees why before trying: the model's lineage with each
    // plugin's review state now.
    let d = c.model_detail(appr, &s.unreleased).unwrap();
    let states: Vec<_> = d
        .plugins
        .iter()
        .map(|p| (p.name.as_str(), p.review_state()))
        .collect();
    assert_eq!(
        states,
        [
            (
                "text-normalize",
                "NOT APPROVED (approval withdrawn by rev)".to_string()
            ),
            ("hashed-ngrams", "approved by rev".to_string())
        ]
    );
    assert_eq!(
        d.unapproved().map(|p| p.digest.as_str()),
        Some(normalize.as_str())
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(
        json["id"],
        s.unreleased.as_str(),
        "the manifest's fields, flattened"
    );
    assert_eq!(json["plugins"][0]["stage"], "preprocess");
    assert_eq!(json["plugins"][0]["withdrawn_by"], "rev");
    for err in [
        c.decide_release(appr, &s.unreleased, true).unwrap_err(),
        c.export_model(sci, &s.a).unwrap_err(),
        c.create_deployment(op, "again", &s.a, &["app".into()])
            .unwrap_err(),
    ] {
        assert!(err.to_string().ends_with(&why), "{err}");
    }

    // Approved again (a reviewer who did not add it): it all runs again.
    c.approve_plugin(rev, &normalize).unwrap();
    let d = c.model_detail(appr, &s.unreleased).unwrap();
    assert!(d.unapproved().is_none());
    assert_eq!(d.plugins[0].review_state(), "approved by rev");
    c.decide_release(appr, &s.unreleased, true).unwrap();
    c.export_model(sci, &s.a).unwrap();
    c.predict_deployed(app, "spam", None, &mails()).unwrap();
    c.predict(sci, &s.a, &mails()).unwrap();

    let log = audited(&s, "withdraw_approval");
    let decided: Vec<_> = log
        .iter()
        .map(|e| (e.record.actor.as_str(), e.record.decision.to_string()))
        .collect();
    assert_eq!(
        decided,
        [
            ("sci", "deny".to_string()),
            ("op", "deny".to_string()),
            ("rev", "allow".to_string()),
            ("rev", "allow".to_string())
        ]
    );
    assert_eq!(
        log[2].record.policies,
        ["reviewers-and-admins-withdraw-approvals"]
    );
}
