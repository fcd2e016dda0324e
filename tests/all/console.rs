//! The web console without a port: every API route × role, sessions, CSRF,
//! login backoff, security headers, the OpenAPI document against the
//! router, bad inputs (never a 5xx), and export-shaped requests denied and
//! audited.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use cloister_console::{Console, ConsoleConfig};
use cloister_host::audit::{AuditFilter, Decision};
use cloister_host::jobs::Oracle;
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, TrainRequest};
use http_body_util::BodyExt;
use tower::ServiceExt;

const PASSWORD: &str = "a long enough password";

struct Fixture {
    _dir: tempfile::TempDir,
    console: Arc<Console>,
    rt: tokio::runtime::Runtime,
    /// role name → API token
    tokens: HashMap<&'static str, String>,
    model: String,
    approved_model: String,
    job: String,
    plugin: String,
    /// The approved `hashed-ngrams` featurizer's digest.
    ngrams: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = crate::support::fixture_dir();
        let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
        let c = {
            drop(c);
            Cloister::open(&dir.path().join("env"), "console").unwrap()
        };
        let admin = c.authenticate(&root).unwrap();
        c.set_password(&admin, "root", PASSWORD).unwrap();
        let mut tokens = HashMap::from([("admin", root.clone())]);
        let mut users = HashMap::new();
        for (name, role) in [
            ("scientist", Role::Scientist),
            ("scientist2", Role::Scientist),
            ("labeler", Role::Labeler),
            ("reviewer", Role::Reviewer),
            ("approver", Role::Approver),
            ("auditor", Role::Auditor),
            ("victim", Role::Approver),
            // Its own user: a login ends the user's older sessions, and
            // the page walk logs in as every role at the same time.
            ("session-auditor", Role::Auditor),
            ("operator", Role::Operator),
            ("client", Role::Client),
        ] {
            let (u, t) = c.add_user(&admin, name, &[role]).unwrap();
            c.set_password(&admin, name, PASSWORD).unwrap();
            tokens.insert(name, t);
            users.insert(name, u);
        }
        let sci = &users["scientist"];
        // A small labeled corpus.
        let all = crate::support::spamassassin();
        let path = dir.path().join("d.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        for r in all.iter().step_by(6) {
            let v = serde_json::json!({"id": r.id, "text": r.text("text").unwrap(), "label": r.label.clone().unwrap()});
            writeln!(f, "{v}").unwrap();
        }
        drop(f);
        c.import_dataset(sci, "spam", &path, &ImportOptions::default())
            .unwrap();
        let mut digests = HashMap::new();
        for name in ["hashed-ngrams", "dual-agree"] {
            let e = c
                .add_plugin(sci, cloister_bundled_plugins::get(name).unwrap())
                .unwrap();
            c.approve_plugin(&users["reviewer"], &e.digest).unwrap();
            digests.insert(name, e.digest);
        }
        let unapproved = c
            .add_plugin(sci, cloister_bundled_plugins::get("entropy").unwrap())
            .unwrap()
            .digest;
        let train = |c: &Cloister| {
            c.train_model(
                sci,
                &TrainRequest {
                    dataset: "spam".into(),
                    preprocess: vec![],
                    preprocess_config: Vec::new(),
                    features: digests["hashed-ngrams"].clone(),
                    features_config: Vec::new(),
                    template: "logreg".into(),
                    sets: vec![("epochs".into(), "3".into())],
                    split_seed: None,
                },
                &mut |_| {},
            )
            .unwrap()
            .id
        };
        let model = train(&c);
        let approved_model = train(&c);
        c.request_release(sci, &approved_model, "ship it").unwrap();
        c.decide_release(&users["approver"], &approved_model, true)
            .unwrap();
        let spec = "name = \"t\"\ndataset = \"spam\"\nfeatures = { plugin = \"hashed-ngrams\", config = { bits = 14 } }\n[[model]]\ntemplate = \"logreg\"\n[[model]]\ntemplate = \"logreg\"\nset = { seed = 3 }\n[selector]\nplugin = \"dual-agree\"\n[loop]\nseed_labels = 20\nper_round = 20\nmax_rounds = 1\nbudget = 40\n";
        let job = c
            .start_job(sci, "t.toml", spec, Some(Oracle::Gold))
            .unwrap()
            .id;
        c.run_job(sci, &job, &mut |_| {}).unwrap();
        c.create_deployment(
            &users["operator"],
            "spam",
            &approved_model,
            &["client".to_string()],
        )
        .unwrap();
        let console = Console::new(c, ConsoleConfig::default());
        Fixture {
            _dir: dir,
            console,
            rt: tokio::runtime::Runtime::new().unwrap(),
            tokens,
            model,
            approved_model,
            job,
            plugin: unapproved,
            ngrams: digests["hashed-ngrams"].clone(),
        }
    })
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn send(req: Request<Body>) -> Reply {
    let f = fixture();
    let app = cloister_console::router(f.console.clone());
    f.rt.block_on(async {
        let r = app.oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
        Reply {
            status,
            headers,
            body,
        }
    })
}

fn as_role(role: &str, method: &str, uri: &str, body: Option<serde_json::Value>) -> Reply {
    with_token(&fixture().tokens[role], method, uri, body)
}

/// A request with `token` as its bearer token.
fn with_token(token: &str, method: &str, uri: &str, body: Option<serde_json::Value>) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    send(b.body(body).unwrap())
}

#[test]
fn a_training_started_through_the_api_is_followed_by_its_owner_alone() {
    let f = fixture();
    let r = as_role(
        "scientist",
        "POST",
        "/api/train",
        Some(serde_json::json!({
            "dataset": "spam", "features": f.ngrams, "template": "logreg",
            "sets": {"epochs": "2"}
        })),
    );
    let (uri, t) = task_end(&r);
    assert_eq!(t["state"], "done", "{t}");
    assert_eq!(t["kind"], "train");
    assert!(
        t["result"].as_str().is_some_and(|m| m.starts_with("m-")),
        "{t}"
    );
    assert!(t["started_ms"].as_u64().is_some_and(|ms| ms > 0), "{t}");
    assert!(
        t.get("holder").is_none(),
        "the running process's holder id is not shown: {t}"
    );
    // Another user, even of the same role, hears of no such task.
    let other = as_role("scientist2", "GET", &uri, None);
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{}", other.text());
    // Preprocessor settings go by position; one for a preprocessor that
    // is not there is refused before anything runs.
    let r = as_role(
        "scientist",
        "POST",
        "/api/train",
        Some(serde_json::json!({
            "dataset": "spam", "features": f.ngrams, "template": "logreg",
            "preprocess_config": [{"fields": "body"}]
        })),
    );
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        r.text()
            .contains("configuration for preprocessor 1 given, but there are 0 preprocessors"),
        "{}",
        r.text()
    );
    // A plugin that fails: its sealed sentence, and where its reason is.
    let r = as_role(
        "scientist",
        "POST",
        "/api/train",
        Some(serde_json::json!({
            "dataset": "spam", "features": f.ngrams, "template": "logreg",
            "features_config": {"bits": "99"}
        })),
    );
    let (_, t) = task_end(&r);
    assert_eq!(t["state"], "failed", "{t}");
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.ends_with(
            "(the plugin's own reason is in the administrators' plugin log, /plugin-log)"
        ) && !error.contains("between 4 and 28"),
        "{t}"
    );
}

/// Follows the scientist's task that `started` (a `POST /api/train`
/// answer) names until it ends: its URI and last state.
fn task_end(started: &Reply) -> (String, serde_json::Value) {
    assert_eq!(started.status, StatusCode::OK, "{}", started.text());
    let task = started.json()["task"].as_str().unwrap().to_string();
    let uri = format!("/api/tasks/{task}");
    let begun = std::time::Instant::now();
    loop {
        let r = as_role("scientist", "GET", &uri, None);
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let t = r.json();
        if t["state"] != "running" {
            return (uri, t);
        }
        assert!(begun.elapsed().as_secs() < 300, "still running: {t}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

const ROLES: [&str; 8] = [
    "admin",
    "scientist",
    "labeler",
    "reviewer",
    "approver",
    "auditor",
    "operator",
    "client",
];

#[test]
fn every_read_route_answers_each_role_as_the_policy_says() {
    let f = fixture();
    let m = &f.model;
    let j = &f.job;
    let all: &[&str] = &ROLES;
    // A client account calls its deployments and nothing else; what it
    // may read otherwise is who it is, the product's template list and its
    // (always empty) labeling queue.
    let no_client: &[&str] = &ROLES[..7];
    let no_labeler: &[&str] = &["admin", "scientist", "reviewer", "approver", "auditor"];
    // Operators read a dataset's aggregate statistics (the regression gate
    // runs on fresh data they capture).
    let stats: &[&str] = &[
        "admin",
        "scientist",
        "reviewer",
        "approver",
        "auditor",
        "operator",
    ];
    let project: &[&str] = &["admin", "scientist", "approver", "auditor", "operator"];
    let cases: Vec<(String, &[&str])> = vec![
        ("/api/me".into(), all),
        ("/api/datasets".into(), no_client),
        ("/api/datasets/spam".into(), stats),
        ("/api/plugins".into(), &["admin", "scientist", "reviewer"]),
        ("/api/templates".into(), all),
        ("/api/jobs".into(), no_labeler),
        (format!("/api/jobs/{j}"), no_labeler),
        (format!("/api/jobs/{j}/stats"), no_labeler),
        ("/api/models".into(), &["scientist", "approver"]),
        (format!("/api/models/{m}"), &["scientist", "approver"]),
        (
            format!("/api/models/{}/bundle", f.approved_model),
            &["scientist", "approver"],
        ),
        (format!("/api/models/{m}/bundle"), &[]),
        // (An empty queue for anyone with no assignment: a client is never
        // assigned a record.)
        ("/api/labels/next".into(), all),
        ("/api/labels/answers".into(), all),
        ("/api/deployments".into(), project),
        ("/api/deployments/spam".into(), project),
        ("/api/audit".into(), &["admin", "auditor"]),
        ("/api/audit/verify".into(), &["admin", "auditor"]),
        ("/api/audit/checkpoint".into(), &["admin", "auditor"]),
        ("/api/plugin-log".into(), &["admin"]),
        ("/api/datasets/spam/export".into(), &[]),
    ];
    for (uri, allowed) in &cases {
        for role in ROLES {
            let r = as_role(role, "GET", uri, None);
            let want = if allowed.contains(&role) {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(r.status, want, "{role} GET {uri}: {}", r.text());
            if r.status == StatusCode::FORBIDDEN {
                assert_eq!(r.json()["error"], "forbidden", "a denial carries no detail");
            }
        }
    }
    // No credentials at all: 401 everywhere under /api but the open ones.
    for (uri, _) in &cases {
        let r = send(Request::get(uri.as_str()).body(Body::empty()).unwrap());
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
    }
}

#[test]
fn writes_follow_the_policy_too() {
    let f = fixture();
    // Approving a plugin: not by a scientist, not by the one who added it.
    let uri = format!("/api/plugins/{}/approve", f.plugin);
    assert_eq!(
        as_role("scientist", "POST", &uri, None).status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        as_role("labeler", "POST", &uri, None).status,
        StatusCode::FORBIDDEN
    );
    // Withdrawing an approval: reviewers and admins only, and only one
    // that is there.
    let uri = format!("/api/plugins/{}/withdraw", f.plugin);
    for role in ["scientist", "labeler", "auditor"] {
        let r = as_role(role, "POST", &uri, None);
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{role}");
    }
    let r = as_role("reviewer", "POST", &uri, None);
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        r.text()
            .contains("is not approved: there is no approval to withdraw"),
        "{}",
        r.text()
    );
    // A release can be requested by a scientist, approved only by another
    // person who is an approver.
    let uri = format!("/api/models/{}/approve-release", f.model);
    assert_eq!(
        as_role("approver", "POST", &uri, None).status,
        StatusCode::FORBIDDEN,
        "nothing requested yet"
    );
    let uri = format!("/api/models/{}/request-release", f.model);
    let r = as_role(
        "approver",
        "POST",
        &uri,
        Some(serde_json::json!({"reason": "x"})),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A labeler cannot start a job; a job of another scientist cannot be
    // cancelled by a second scientist.
    let r = as_role(
        "labeler",
        "POST",
        "/api/jobs",
        Some(serde_json::json!({"spec": "x"})),
    );
    assert_ne!(r.status, StatusCode::OK);
    let r = as_role(
        "scientist2",
        "POST",
        &format!("/api/jobs/{}/cancel", f.job),
        None,
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Moving a job's labelers is its owner's (or an admin's): another
    // scientist is refused; the owner hears why this finished job's
    // labelers stay.
    let body = serde_json::json!({"from": "labeler", "to": "labeler"});
    let uri = format!("/api/jobs/{}/reassign", f.job);
    let r = as_role("scientist2", "POST", &uri, Some(body.clone()));
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = as_role("scientist", "POST", &uri, Some(body));
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        r.text()
            .contains("its labelers change only while it waits for labels"),
        "{}",
        r.text()
    );
}

fn login(user: &str, password: &str) -> Reply {
    send(
        Request::post("/api/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                serde_json::json!({"user": user, "password": password}).to_string(),
            ))
            .unwrap(),
    )
}

fn cookie_of(r: &Reply) -> String {
    let set = r.headers[header::SET_COOKIE].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

#[test]
fn sessions_need_csrf_tokens_for_writes_and_end_at_logout() {
    let r = login("session-auditor", PASSWORD);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let set = r.headers[header::SET_COOKIE].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "not behind TLS in this test");
    let cookie = cookie_of(&r);
    let csrf = r.json()["csrf"].as_str().unwrap().to_string();
    let with = |method: &str, uri: &str, token: Option<&str>| {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::COOKIE, &cookie);
        if let Some(t) = token {
            b = b.header("x-csrf-token", t);
        }
        send(b.body(Body::empty()).unwrap())
    };
    assert_eq!(
        with("GET", "/api/audit/verify", None).status,
        StatusCode::OK
    );
    assert_eq!(
        with("GET", "/api/me", None).json()["user"],
        "session-auditor"
    );
    // A write without the token, or with a wrong one, is refused.
    assert_eq!(
        with("POST", "/api/logout", None).status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        with("POST", "/api/logout", Some("00")).status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        with("POST", "/api/logout", Some(&csrf)).status,
        StatusCode::NO_CONTENT
    );
    // The session is gone.
    assert_eq!(
        with("GET", "/api/me", None).status,
        StatusCode::UNAUTHORIZED
    );
    // A forged cookie gets nothing.
    let r = send(
        Request::get("/api/me")
            .header(header::COOKIE, "cloister_session=deadbeef")
            .body(Body::empty())
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[test]
fn repeated_failed_logins_back_off_and_are_audited() {
    let f = fixture();
    for _ in 0..3 {
        assert_eq!(
            login("victim", "wrong password!!").status,
            StatusCode::UNAUTHORIZED
        );
    }
    // The fourth failure starts the backoff; then even the right password
    // waits.
    assert_eq!(
        login("victim", "wrong password!!").status,
        StatusCode::UNAUTHORIZED
    );
    let r = login("victim", PASSWORD);
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    // Failures are in the audit log, as denied logins of that user.
    let denied = f
        .console
        .cloister()
        .env()
        .audit()
        .query(&AuditFilter {
            actor: Some("victim".into()),
            action: Some("login".into()),
            decision: Some(Decision::Deny),
            ..AuditFilter::default()
        })
        .unwrap();
    assert!(denied.len() >= 4, "{}", denied.len());
}

#[test]
fn every_response_carries_the_security_headers() {
    for r in [
        send(Request::get("/login").body(Body::empty()).unwrap()),
        as_role("auditor", "GET", "/api/audit", None),
        as_role("labeler", "GET", "/api/audit", None),
    ] {
        let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(r.headers[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
    // No inline script in any page.
    let page = send(Request::get("/login").body(Body::empty()).unwrap()).text();
    assert!(!page.contains("<script>") && page.contains("<script src=\"/static/app.js\""));
}

#[test]
fn the_openapi_document_matches_the_router() {
    let f = fixture();
    let doc = send(
        Request::get("/api/openapi.json")
            .body(Body::empty())
            .unwrap(),
    )
    .json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 25);
    for (path, ops) in paths {
        for (method, _) in ops.as_object().unwrap() {
            let uri = path
                .replace("{name}", "spam")
                .replace("{digest}", &f.plugin)
                .replace("{id}", "does-not-exist");
            let r = as_role("admin", &method.to_uppercase(), &uri, None);
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                r.status != StatusCode::NOT_FOUND
                    || r.json()["error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("no ")),
                "{method} {path} is documented but not routed"
            );
        }
    }
    // Nothing undocumented answers under /api.
    for uri in [
        "/api/users/root/password",
        "/api/records/1",
        "/api/datasets/spam/rows",
        "/api/admin",
    ] {
        assert_eq!(
            as_role("admin", "GET", uri, None).status,
            StatusCode::NOT_FOUND,
            "{uri}"
        );
    }
}

#[test]
fn bad_inputs_never_get_a_server_error() {
    let bodies = [
        "",
        "{",
        "null",
        "[]",
        "{\"dataset\": 5}",
        "{\"spec\": 1}",
        "{\"spec\": \"[[[\"}",
        "{\"spec\": \"name = 'x'\"}",
        "{\"id\": \"\", \"label\": \"\"}",
        "{\"id\": \"x\", \"label\": \"spam\", \"job\": \"j-nope\"}",
        "{\"reason\": \"\"}",
        "{\"dataset\": \"spam\", \"features\": \"ffff\", \"template\": \"nope\"}",
        "{\"dataset\": \"spam\", \"features\": \"ffff\", \"template\": \"logreg\", \"features_config\": {\"a\": 1}}",
        "{\"dataset\": \"spam\", \"features\": \"ffff\", \"template\": \"logreg\", \"features_config\": [\"a=1\"]}",
    ];
    let long = format!("{{\"dataset\": \"{}\"}}", "a".repeat(100_000));
    let posts = [
        "/api/train",
        "/api/jobs",
        "/api/labels",
        "/api/labels/change",
        "/api/jobs/j-nope/reassign",
        "/api/login",
        "/api/plugins",
        "/api/models/x/request-release",
    ];
    for role in ["scientist", "labeler"] {
        for uri in posts {
            for body in bodies.iter().copied().chain([long.as_str()]) {
                let f = fixture();
                let r = send(
                    Request::post(uri)
                        .header(header::AUTHORIZATION, format!("Bearer {}", f.tokens[role]))
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(body.to_string()))
                        .unwrap(),
                );
                assert!(
                    r.status.is_client_error(),
                    "{role} {uri} {body:.40}: {} {}",
                    r.status,
                    r.text()
                );
            }
        }
    }
    for q in [
        "limit=abc",
        "decision=maybe",
        "from=-1",
        "limit=99999999999999999999",
        "action=export_datset",
    ] {
        let r = as_role("auditor", "GET", &format!("/api/audit?{q}"), None);
        assert!(r.status.is_client_error(), "{q}: {}", r.status);
    }
    for uri in [
        "/api/datasets/%00",
        "/api/models/..%2F..%2Fkeys",
        "/api/jobs/%ff",
    ] {
        let r = as_role("admin", "GET", uri, None);
        assert!(r.status.is_client_error(), "{uri}: {}", r.status);
    }
}

#[test]
fn export_shaped_requests_are_denied_and_audited() {
    let f = fixture();
    for role in ROLES {
        let r = as_role(role, "GET", "/api/datasets/spam/export", None);
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{role}");
        let r = as_role(
            role,
            "GET",
            &format!("/api/models/{}/bundle", f.model),
            None,
        );
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{role}: unapproved model");
    }
    let denied = f
        .console
        .cloister()
        .env()
        .audit()
        .query(&AuditFilter {
            action: Some("export_dataset".into()),
            decision: Some(Decision::Deny),
            ..AuditFilter::default()
        })
        .unwrap();
    assert!(denied.len() >= ROLES.len());
    // The approved bundle verifies offline.
    let r = as_role(
        "approver",
        "GET",
        &format!("/api/models/{}/bundle", f.approved_model),
        None,
    );
    assert_eq!(r.status, StatusCode::OK);
    let key = f.console.cloister().env().audit().public_key();
    cloister_host::models::verify_bundle(&r.body, Some(&key)).unwrap();
}

#[test]
fn pages_render_for_each_role_without_server_errors() {
    let f = fixture();
    let pages = [
        "/".to_string(),
        "/datasets".into(),
        "/datasets/spam".into(),
        "/plugins".into(),
        "/train".into(),
        "/jobs".into(),
        format!("/jobs/{}", f.job),
        "/models".into(),
        format!("/models/{}", f.model),
        "/label".into(),
        "/audit".into(),
        "/deployments".into(),
        "/deployments/spam".into(),
    ];
    for role in ROLES {
        let r = login(role_user(role), PASSWORD);
        assert_eq!(r.status, StatusCode::OK, "{role} login: {}", r.text());
        let cookie = cookie_of(&r);
        for p in &pages {
            let r = send(
                Request::get(p.as_str())
                    .header(header::COOKIE, &cookie)
                    .body(Body::empty())
                    .unwrap(),
            );
            assert!(
                r.status == StatusCode::OK || r.status == StatusCode::FORBIDDEN,
                "{role} {p}: {}",
                r.status
            );
            let html = r.text();
            assert!(html.starts_with("<!doctype html>"), "{role} {p}");
            assert!(
                !html.contains("Subject:"),
                "{role} {p}: no record text outside the queue"
            );
        }
    }
    // The deployment page: figures for the project, buttons for operators.
    let page_as = |role: &str, p: &str| {
        let cookie = cookie_of(&login(role_user(role), PASSWORD));
        send(
            Request::get(p)
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
    };
    // The plugin log: administrators only. A stage that fails (a
    // featurizer configured with a field the records lack, named in markup)
    // is there with the host's account and the plugin's words, escaped.
    let c = fixture().console.cloister();
    let sci = c.authenticate(&fixture().tokens["scientist"]).unwrap();
    let req = TrainRequest {
        dataset: "spam".into(),
        preprocess: Vec::new(),
        preprocess_config: Vec::new(),
        features: fixture().ngrams.clone(),
        features_config: vec![("field".into(), "<b>body</b>".into())],
        template: "logreg".into(),
        sets: Vec::new(),
        split_seed: Some(0),
    };
    assert!(c.train_model(&sci, &req, &mut |_| {}).is_err());
    let log = page_as(
        "admin",
        &format!("/plugin-log?digest={}&limit=5", &fixture().ngrams[..12]),
    );
    assert_eq!(log.status, StatusCode::OK);
    let html = log.text();
    assert!(
        html.contains("<h3>#") && html.contains("peak memory") && html.contains("Host: "),
        "{html}"
    );
    assert!(
        html.contains("&lt;b&gt;body") && !html.contains("<b>body"),
        "{html}"
    );
    assert!(
        page_as("admin", "/plugins")
            .text()
            .contains("href=\"/plugin-log\"")
    );
    for role in ["scientist", "reviewer", "auditor", "labeler"] {
        assert_eq!(
            page_as(role, "/plugin-log").status,
            StatusCode::FORBIDDEN,
            "{role}"
        );
        assert!(
            !page_as(role, "/plugins").text().contains("/plugin-log"),
            "{role}"
        );
    }
    // The model page: the plugins it was trained with, each with its
    // review state now.
    let model = page_as("approver", &format!("/models/{}", f.model)).text();
    assert!(
        model.contains("<h2>Plugins</h2>")
            && model.contains("<td>hashed-ngrams</td>")
            && model.contains("<td>approved by reviewer</td>"),
        "{model}"
    );
    let op = page_as("operator", "/deployments/spam");
    assert_eq!(op.status, StatusCode::OK);
    let html = op.text();
    assert!(
        html.contains("Roll back") && html.contains("Pause"),
        "{html}"
    );
    assert!(html.contains("href=\"/deployments\""), "the nav links it");
    let aud = page_as("auditor", "/deployments/spam").text();
    assert!(
        aud.contains("champion") && !aud.contains("Roll back"),
        "{aud}"
    );
    assert!(
        !page_as("labeler", "/")
            .text()
            .contains("href=\"/deployments\"")
    );
    assert_eq!(
        page_as("client", "/deployments").status,
        StatusCode::FORBIDDEN
    );
    // Without a session, pages send you to the login form.
    let r = send(Request::get("/models").body(Body::empty()).unwrap());
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.headers[header::LOCATION], "/login");
}

fn role_user(role: &str) -> &str {
    if role == "admin" { "root" } else { role }
}

#[test]
fn a_bad_api_token_is_refused_and_audited() {
    let authentications = || {
        let r = as_role(
            "auditor",
            "GET",
            "/api/audit?action=authenticate&decision=deny&limit=10000",
            None,
        );
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.json().as_array().map_or(0, Vec::len)
    };
    let before = authentications();
    for token in [
        // Well formed, but no user has it.
        format!("clt_{}", "0".repeat(64)),
        // Malformed.
        "clt_short".to_string(),
    ] {
        let r = send(
            Request::get("/api/datasets")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        );
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(authentications(), before + 2);
}

#[test]
fn every_dataset_listing_is_on_disk_in_the_audit_log_before_its_answer() {
    // GET /api/datasets waits for its audit record without a thread
    // (`Cloister::guard_async`); the record must still be durable and
    // visible by the time the answer arrives, one per request.
    let listings = || {
        let r = as_role(
            "auditor",
            "GET",
            "/api/audit?action=list_datasets&actor=scientist&decision=allow&limit=100000",
            None,
        );
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.json().as_array().map_or(0, Vec::len)
    };
    let before = listings();
    for n in 1..=5 {
        let r = as_role("scientist", "GET", "/api/datasets", None);
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(r.text().contains("\"spam\""), "{}", r.text());
        // At least: other tests of this binary list datasets as the same
        // user at the same time.
        assert!(listings() >= before + n);
    }
}

#[test]
fn a_deployment_answers_its_client_over_the_api_and_no_one_else() {
    let uri = "/api/deployments/spam/predict";
    let body = serde_json::json!({
        "key": "customer-7",
        "records": [
            {"id": "a", "text": "WIN a FREE prize, click now to claim your cash"},
            {"id": "b", "text": "lunch at noon? the report is attached"}
        ]
    });
    let r = as_role("client", "POST", uri, Some(body.clone()));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["deployment"], "spam");
    assert_eq!(v["variant"], "champion");
    let p = v["predictions"].as_array().unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0]["id"], "a");
    let probs = p[0]["probabilities"].as_object().unwrap();
    let total: f64 = probs.values().map(|x| x.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{v}");
    for role in ROLES.iter().filter(|r| **r != "client") {
        let r = as_role(role, "POST", uri, Some(body.clone()));
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{role}: {}", r.text());
    }
    // A deployment that does not exist: the same answer as one that does
    // not name the caller.
    let r = as_role(
        "client",
        "POST",
        "/api/deployments/nope/predict",
        Some(body.clone()),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Bad records are named by their place; too many are refused.
    let r = as_role(
        "client",
        "POST",
        uri,
        Some(serde_json::json!({"records": [{"id": "a", "text": "x"}, {"text": "no id"}]})),
    );
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("request body"), "{}", r.text());
    let many: Vec<serde_json::Value> = (0..1001)
        .map(|i| serde_json::json!({"id": format!("r{i}"), "text": "x"}))
        .collect();
    let r = as_role(
        "client",
        "POST",
        uri,
        Some(serde_json::json!({ "records": many })),
    );
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Operators change the routing over the API; no one else does, and an
    // unreleased model cannot be brought in.
    let f = fixture();
    let change = "/api/deployments/spam/change";
    let r = as_role(
        "operator",
        "POST",
        change,
        Some(serde_json::json!({"action": "set-weight", "model": f.model, "weight": 100})),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    for role in ["scientist", "approver", "admin", "client"] {
        let r = as_role(
            role,
            "POST",
            change,
            Some(serde_json::json!({"action": "pause"})),
        );
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{role}");
    }
    for action in ["pause", "resume"] {
        let r = as_role(
            "operator",
            "POST",
            change,
            Some(serde_json::json!({ "action": action })),
        );
        assert_eq!(r.status, StatusCode::OK, "{action}: {}", r.text());
        assert_eq!(r.json()["paused"], action == "pause");
    }
    let r = as_role(
        "operator",
        "POST",
        change,
        Some(serde_json::json!({"action": "explode"})),
    );
    assert!(r.status.is_client_error(), "{}", r.status);
    // The status shows the request on the champion.
    let r = as_role("operator", "GET", "/api/deployments/spam?minutes=5", None);
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert!(v["variants"][0]["requests"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn accounts_are_administered_over_the_api_and_on_the_page() {
    let bearer = with_token;
    let me = |token: &str| bearer(token, "GET", "/api/me", None).status;
    // Who may read the accounts: admins and auditors.
    for (role, status) in [
        ("admin", StatusCode::OK),
        ("auditor", StatusCode::OK),
        ("scientist", StatusCode::FORBIDDEN),
        ("labeler", StatusCode::FORBIDDEN),
    ] {
        assert_eq!(
            as_role(role, "GET", "/api/users", None).status,
            status,
            "{role}"
        );
    }
    let listed = as_role("auditor", "GET", "/api/users", None);
    assert!(
        !listed.text().contains("token"),
        "no token digests: {}",
        listed.text()
    );
    let root = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "root")
        .cloned()
        .unwrap();
    assert_eq!(root["roles"], serde_json::json!(["admin"]));
    assert_eq!(root["disabled"], false);

    // Only admins add accounts; bad input is named and writes nothing.
    let add = |role: &str, body: serde_json::Value| as_role(role, "POST", "/api/users", Some(body));
    let nia = |extra: serde_json::Value| {
        let mut b = serde_json::json!({"name": "nia", "roles": ["labeler"]});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    assert_eq!(
        add("auditor", nia(serde_json::json!({}))).status,
        StatusCode::FORBIDDEN
    );
    for (body, said) in [
        (
            nia(serde_json::json!({"password": "short"})),
            "a password needs 12 to 256 characters",
        ),
        (
            nia(serde_json::json!({"roles": ["nope"]})),
            "role `nope`: not a role (one of admin, scientist",
        ),
        (
            nia(serde_json::json!({"roles": []})),
            "roles: name at least one role",
        ),
    ] {
        let r = add("admin", body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains(said),
            "{}",
            r.text()
        );
    }
    let names = || {
        as_role("admin", "GET", "/api/users", None)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(!names().contains(&"nia".to_string()), "nothing written");
    let r = add("admin", nia(serde_json::json!({"password": PASSWORD})));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["user"]["roles"], serde_json::json!(["labeler"]));
    let first = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(me(&first), StatusCode::OK);
    assert_eq!(login("nia", PASSWORD).status, StatusCode::OK);

    // Roles: one list at a time, each role checked.
    let roles =
        |body: serde_json::Value| as_role("admin", "POST", "/api/users/nia/roles", Some(body));
    let r = roles(serde_json::json!({"grant": ["reviewer"]}));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["roles"],
        serde_json::json!(["labeler", "reviewer"])
    );
    for body in [
        serde_json::json!({"grant": ["reviewer"]}),
        serde_json::json!({"grant": ["auditor"], "revoke": ["labeler"]}),
        serde_json::json!({}),
        serde_json::json!({"revoke": ["wizard"]}),
    ] {
        assert_eq!(
            roles(body.clone()).status,
            StatusCode::BAD_REQUEST,
            "{body}"
        );
    }
    assert_eq!(
        as_role(
            "auditor",
            "POST",
            "/api/users/nia/roles",
            Some(serde_json::json!({"revoke": ["labeler"]}))
        )
        .status,
        StatusCode::FORBIDDEN
    );

    // A new token stops the old one at once; a user may replace their own.
    let r = as_role("admin", "POST", "/api/users/nia/token", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let second = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(me(&first), StatusCode::UNAUTHORIZED);
    let r = bearer(&second, "POST", "/api/users/nia/token", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let third = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(me(&second), StatusCode::UNAUTHORIZED);
    assert_eq!(
        bearer(&third, "POST", "/api/users/root/token", None).status,
        StatusCode::FORBIDDEN,
        "not someone else's"
    );

    // Disabled: the token stops; enabled again with a new one.
    assert_eq!(
        as_role("admin", "POST", "/api/users/nia/disable", None).status,
        StatusCode::OK
    );
    assert_eq!(me(&third), StatusCode::UNAUTHORIZED);
    let r = as_role("admin", "POST", "/api/users/nia/disable", None);
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = as_role("admin", "POST", "/api/users/nia/enable", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(me(&third), StatusCode::UNAUTHORIZED, "never the old token");
    assert_eq!(me(r.json()["token"].as_str().unwrap()), StatusCode::OK);

    // The page, as an admin of its own (a login ends the user's other
    // sessions, and other tests hold root's).
    let r = add(
        "admin",
        serde_json::json!({"name": "page-admin", "roles": ["admin"], "password": PASSWORD}),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = login("page-admin", PASSWORD);
    let cookie = cookie_of(&r);
    let csrf = r.json()["csrf"].as_str().unwrap().to_string();
    let get = |cookie: &str| {
        send(
            Request::get("/users")
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .unwrap(),
        )
    };
    let html = get(&cookie).text();
    for part in [
        "<h2>Add an account</h2>",
        "action=\"/users/nia/disable\"",
        "action=\"/users/nia/token\"",
        "action=\"/users/nia/roles\"",
        "<a href=\"/users\">Accounts</a>",
    ] {
        assert!(html.contains(part), "{part}: {html}");
    }
    let form = |uri: &str, body: String| {
        send(
            Request::post(uri)
                .header(header::COOKIE, &cookie)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
    };
    let r = form(
        "/users",
        format!("csrf={csrf}&name=noa&role=scientist&password="),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let shown = r.text();
    let token = shown
        .split("<pre class=\"token\">")
        .nth(1)
        .and_then(|t| t.split("</pre>").next())
        .unwrap()
        .to_string();
    assert_eq!(me(&token), StatusCode::OK, "the token shown works");
    let r = form(
        "/users/noa/roles",
        format!("csrf={csrf}&change=grant&role=wizard"),
    );
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = form(
        "/users/noa/roles",
        format!("csrf={csrf}&change=grant&role=labeler"),
    );
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
    let r = form("/users/noa/disable", "csrf=wrong".into());
    assert_eq!(r.status, StatusCode::FORBIDDEN, "the CSRF token is checked");
    let r = form("/users/noa/disable", format!("csrf={csrf}"));
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(me(&token), StatusCode::UNAUTHORIZED);
    let html = get(&cookie).text();
    assert!(html.contains("action=\"/users/noa/enable\""), "{html}");
    // An auditor reads the page with one form, for their own token; a
    // scientist is refused. (Accounts of their own: a login ends the
    // user's other sessions, which other tests hold.)
    for (name, role) in [("page-auditor", "auditor"), ("page-scientist", "scientist")] {
        let r = add(
            "admin",
            serde_json::json!({"name": name, "roles": [role], "password": PASSWORD}),
        );
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let auditor = cookie_of(&login("page-auditor", PASSWORD));
    let html = get(&auditor).text();
    assert!(html.contains("<td>noa</td>"), "{html}");
    assert_eq!(
        html.matches("<form class=\"inline\" method=\"post\" action=\"/users")
            .count(),
        1,
        "{html}"
    );
    assert!(
        html.contains("action=\"/users/page-auditor/token\""),
        "{html}"
    );
    let r = login("page-scientist", PASSWORD);
    let (sci, sci_csrf) = (
        cookie_of(&r),
        r.json()["csrf"].as_str().unwrap().to_string(),
    );
    assert_eq!(get(&sci).status, StatusCode::FORBIDDEN);
    // ... but replaces their own token from the home page.
    let home = send(
        Request::get("/")
            .header(header::COOKIE, &sci)
            .body(Body::empty())
            .unwrap(),
    )
    .text();
    assert!(
        home.contains("action=\"/users/page-scientist/token\""),
        "{home}"
    );
    let r = send(
        Request::post("/users/page-scientist/token")
            .header(header::COOKIE, &sci)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={sci_csrf}")))
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let own = r.text();
    let own = own
        .split("<pre class=\"token\">")
        .nth(1)
        .and_then(|t| t.split("</pre>").next())
        .unwrap();
    assert_eq!(me(own), StatusCode::OK);
    let r = send(
        Request::post("/users/nia/token")
            .header(header::COOKIE, &sci)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={sci_csrf}")))
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN, "not someone else's");

    // Every change is on Account::"nia" in the log.
    let log = as_role(
        "auditor",
        "GET",
        "/api/audit?resource=account:nia&limit=1000",
        None,
    );
    let actions: Vec<String> = log
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for a in [
        "add_user",
        "change_roles",
        "rotate_token",
        "disable_user",
        "enable_user",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a}: {actions:?}");
    }
}
