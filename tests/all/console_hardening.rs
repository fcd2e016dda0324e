//! The console under abuse: login floods and races, lockout as a weapon,
//! cross-site posts, refusals that must leave a trace, session lifetimes
//! and cookie attributes. Each test has its own small environment (the
//! throttle and sessions are per console), driven without a port.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use cloister_console::{Console, ConsoleConfig};
use cloister_host::audit::{AuditFilter, Decision};
use cloister_host::policy::Role;
use cloister_host::service::{Cloister, ImportOptions, ServiceError};
use http_body_util::BodyExt;
use tower::ServiceExt;

const PASSWORD: &str = "a long enough password";

struct Fx {
    _dir: tempfile::TempDir,
    console: Arc<Console>,
    rt: tokio::runtime::Runtime,
    users: std::collections::HashMap<&'static str, cloister_host::users::User>,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
    /// `name=value` of the Set-Cookie named `name`.
    fn cookie(&self, name: &str) -> String {
        self.cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} cookie in {:?}", self.cookies()))
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// An environment with users `ana` (scientist), `lab1`, `lab2` (labelers),
/// `rev` (reviewer), all with console passwords, and a console with
/// `config`.
fn fx(config: ConsoleConfig) -> Fx {
    fx_with(config, None)
}

/// [`fx`], with one more policy file in the environment.
fn fx_with(config: ConsoleConfig, policy: Option<&str>) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let (c, root) = Cloister::init(&dir.path().join("env"), "root").unwrap();
    if let Some(text) = policy {
        std::fs::write(dir.path().join("env/policies/extra.cedar"), text).unwrap();
    }
    let admin = c.authenticate(&root).unwrap();
    let mut users = std::collections::HashMap::new();
    for (name, role) in [
        ("ana", Role::Scientist),
        ("lab1", Role::Labeler),
        ("lab2", Role::Labeler),
        ("rev", Role::Reviewer),
    ] {
        users.insert(name, c.add_user(&admin, name, &[role]).unwrap().0);
        c.set_password(&admin, name, PASSWORD).unwrap();
    }
    drop(c);
    let c = Cloister::open(&dir.path().join("env"), "console").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    Fx {
        _dir: dir,
        console: Console::new(c, config),
        rt,
        users,
    }
}

impl Fx {
    fn send(&self, req: Request<Body>) -> Reply {
        let app = cloister_console::router(Arc::clone(&self.console));
        self.rt
            .block_on(async move { collect(app.oneshot(req).await.unwrap()).await })
    }

    fn denials(&self, action: &str) -> Vec<cloister_host::audit::AuditEntry> {
        self.console
            .cloister()
            .env()
            .audit()
            .query(&AuditFilter {
                action: Some(action.into()),
                decision: Some(Decision::Deny),
                ..AuditFilter::default()
            })
            .unwrap()
    }
}

async fn collect(r: axum::response::Response) -> Reply {
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

fn login_req(
    user: &str,
    password: &str,
    extra: &[(&str, &str)],
    from: Option<IpAddr>,
) -> Request<Body> {
    let mut b = Request::post("/api/login").header(header::CONTENT_TYPE, "application/json");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let mut req = b
        .body(Body::from(
            serde_json::json!({"user": user, "password": password}).to_string(),
        ))
        .unwrap();
    if let Some(ip) = from {
        // What `serve` attaches for a real connection.
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(ip, 40000)));
    }
    req
}

#[test]
fn a_burst_of_parallel_guesses_is_throttled_like_sequential_ones() {
    let f = fx(ConsoleConfig::default());
    let statuses: Vec<StatusCode> = f.rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let app = cloister_console::router(Arc::clone(&f.console));
            tasks.push(tokio::spawn(async move {
                let r = app
                    .oneshot(login_req("ana", "wrong password!!", &[], None))
                    .await
                    .unwrap();
                r.status()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let evaluated = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    // Three free attempts and the one that starts the lockout, no more.
    assert_eq!(evaluated, 4, "{statuses:?}");
    assert_eq!(throttled, 60, "{statuses:?}");
    // Every throttled attempt is in the audit log, naming the user.
    let throttled_entries: Vec<_> = f
        .denials("login")
        .into_iter()
        .filter(|e| e.record.policies == ["throttled"])
        .collect();
    assert_eq!(throttled_entries.len(), 60);
    assert!(throttled_entries.iter().all(|e| e.record.actor == "ana"));
}

#[test]
fn the_throttle_table_stays_bounded_under_a_flood_of_names() {
    let f = fx(ConsoleConfig {
        max_tracked: 50,
        ..ConsoleConfig::default()
    });
    // Names over the user-name rule are refused before any work and never
    // become keys; each refusal is audited as an anonymous one.
    let huge = "n".repeat(100_000);
    for i in 0..20 {
        let r = f.send(login_req(&format!("{huge}{i}"), "x", &[], None));
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(f.console.tracked_logins().unwrap().0, 0);
    let malformed = f.denials("login");
    assert_eq!(malformed.len(), 20);
    assert!(
        malformed
            .iter()
            .all(|e| e.record.actor == "-" && e.record.policies == ["malformed-user-name"])
    );
    // Distinct well-formed names: the table keeps its cap.
    for i in 0..300 {
        f.send(login_req(
            &format!("ghost{i}"),
            "wrong password!!",
            &[],
            None,
        ));
        assert!(f.console.tracked_logins().unwrap().0 <= 50);
    }
    // A huge password is refused unhashed too.
    let r = f.send(login_req("ana", &"p".repeat(5000), &[], None));
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[test]
fn one_address_guessing_many_names_is_throttled_too() {
    let f = fx(ConsoleConfig {
        client_free_failures: 5,
        ..ConsoleConfig::default()
    });
    let attacker: IpAddr = "10.9.8.7".parse().unwrap();
    let other: IpAddr = "10.1.1.1".parse().unwrap();
    for i in 0..6 {
        let r = f.send(login_req(
            &format!("guess{i}"),
            "wrong password!!",
            &[],
            Some(attacker),
        ));
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    // A fresh name from the same address waits; another address does not.
    let r = f.send(login_req("ana", PASSWORD, &[], Some(attacker)));
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let r = f.send(login_req("ana", PASSWORD, &[], Some(other)));
    assert_eq!(r.status, StatusCode::OK);
}

#[test]
fn a_stranger_cannot_lock_a_user_out_of_a_browser_they_logged_in_from() {
    let f = fx(ConsoleConfig::default());
    let first = f.send(login_req("ana", PASSWORD, &[], None));
    assert_eq!(first.status, StatusCode::OK);
    let device = first.cookie("cloister_device");
    // A stranger guesses until the name is locked.
    for _ in 0..6 {
        f.send(login_req("ana", "wrong password!!", &[], None));
    }
    let r = f.send(login_req("ana", PASSWORD, &[], None));
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a new browser waits"
    );
    // Ana's own browser is counted apart and gets in.
    let r = f.send(login_req("ana", PASSWORD, &[("cookie", &device)], None));
    assert_eq!(r.status, StatusCode::OK);
    // The device has its own budget: guessing with it locks it as well.
    for _ in 0..4 {
        let r = f.send(login_req(
            "ana",
            "wrong password!!",
            &[("cookie", &device)],
            None,
        ));
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = f.send(login_req("ana", PASSWORD, &[("cookie", &device)], None));
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Another user's device cookie gives no pass for ana's name.
    let lab = f.send(login_req("lab1", PASSWORD, &[], None));
    let r = f.send(login_req(
        "ana",
        PASSWORD,
        &[("cookie", &lab.cookie("cloister_device"))],
        None,
    ));
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn cross_site_posts_and_bad_csrf_tokens_are_refused_and_audited() {
    let f = fx(ConsoleConfig::default());
    // Login CSRF: a form posted from another site never reaches the login.
    let r = f.send(login_req(
        "ana",
        PASSWORD,
        &[("host", "console.test"), ("origin", "https://evil.example")],
        None,
    ));
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.cookies().is_empty());
    let r = f.send(login_req(
        "ana",
        PASSWORD,
        &[("host", "console.test"), ("sec-fetch-site", "cross-site")],
        None,
    ));
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // `Origin: null` (what browsers send under no-referrer) counts as
    // cross-site unless the browser says the post is same-origin.
    let r = f.send(login_req("ana", PASSWORD, &[("origin", "null")], None));
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(f.denials("cross_site_request").len(), 3);
    let r = f.send(login_req(
        "ana",
        "wrong password!!",
        &[("origin", "null"), ("sec-fetch-site", "same-origin")],
        None,
    ));
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The same origin (and clients that send none) go through.
    let r = f.send(login_req(
        "ana",
        PASSWORD,
        &[("host", "console.test"), ("origin", "http://console.test")],
        None,
    ));
    assert_eq!(r.status, StatusCode::OK);
    let cookie = r.cookie("cloister_session");
    // A write without the session's CSRF token: refused, and on the record.
    let r = f.send(
        Request::post("/api/logout")
            .header(header::COOKIE, &cookie)
            .header("x-csrf-token", "0123")
            .body(Body::empty())
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let csrf = f.denials("csrf");
    assert_eq!(csrf.len(), 1);
    assert_eq!(csrf[0].record.actor, "ana");
    assert_eq!(csrf[0].record.policies, ["bad-csrf-token"]);
}

#[test]
fn sessions_end_at_their_absolute_lifetime_and_at_the_next_login() {
    let f = fx(ConsoleConfig {
        session_max: Duration::from_secs(2),
        ..ConsoleConfig::default()
    });
    let me = |cookie: &str| {
        f.send(
            Request::get("/api/me")
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .status
    };
    let a = f
        .send(login_req("ana", PASSWORD, &[], None))
        .cookie("cloister_session");
    assert_eq!(me(&a), StatusCode::OK);
    let b = f
        .send(login_req("ana", PASSWORD, &[], None))
        .cookie("cloister_session");
    assert_eq!(
        me(&a),
        StatusCode::UNAUTHORIZED,
        "a new login ends the older session"
    );
    assert_eq!(me(&b), StatusCode::OK);
    // Used all along, the session still ends at its absolute lifetime.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        let _ = me(&b);
    }
    assert_eq!(me(&b), StatusCode::UNAUTHORIZED);
}

#[test]
fn with_secure_cookies_every_cookie_is_secure_logout_included() {
    let f = fx(ConsoleConfig {
        secure_cookies: true,
        ..ConsoleConfig::default()
    });
    let r = f.send(login_req("ana", PASSWORD, &[], None));
    assert_eq!(r.cookies().len(), 2, "{:?}", r.cookies());
    for c in r.cookies() {
        assert!(c.contains("; Secure") && c.contains("HttpOnly"), "{c}");
    }
    let csrf = r.json()["csrf"].as_str().unwrap().to_string();
    let r = f.send(
        Request::post("/api/logout")
            .header(header::COOKIE, r.cookie("cloister_session"))
            .header("x-csrf-token", csrf)
            .body(Body::empty())
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let c = &r.cookies()[0];
    assert!(c.contains("Max-Age=0") && c.contains("; Secure"), "{c}");
}

#[test]
fn the_upload_form_keeps_the_csrf_token_out_of_urls() {
    let f = fx(ConsoleConfig::default());
    let r = f.send(login_req("ana", PASSWORD, &[], None));
    let cookie = r.cookie("cloister_session");
    let csrf = r.json()["csrf"].as_str().unwrap().to_string();
    let page = f.send(
        Request::get("/plugins")
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap(),
    );
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(html.contains("enctype=\"multipart/form-data\""), "{html}");
    assert!(!html.contains("?csrf="), "no token in any URL");
    assert!(html.contains(&format!("name=\"csrf\" value=\"{csrf}\"")));
    // Sent as the form's first field, it is accepted.
    let boundary = "XyZ";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"component\"; filename=\"p.wasm\"\r\nContent-Type: application/wasm\r\n\r\n"
    );
    let mut bytes = body.into_bytes();
    bytes.extend_from_slice(cloister_bundled_plugins::get("entropy").unwrap());
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let upload = |token_in_url: bool, bytes: Vec<u8>| {
        let uri = if token_in_url {
            format!("/plugins?csrf={csrf}")
        } else {
            "/plugins".into()
        };
        f.send(
            Request::post(uri)
                .header(header::COOKIE, &cookie)
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(Body::from(bytes))
                .unwrap(),
        )
    };
    let r = upload(false, bytes.clone());
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // The token in the URL alone is no longer read.
    let without_field: Vec<u8> = {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let cut = text
            .find(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"component\""
            ))
            .unwrap();
        bytes[cut..].to_vec()
    };
    assert_eq!(upload(true, without_field).status, StatusCode::FORBIDDEN);
}

#[test]
fn labeling_someone_elses_item_is_an_audited_denial_and_labelers_are_no_user_oracle() {
    let f = fx(ConsoleConfig::default());
    let c = f.console.cloister();
    let (ana, lab1, lab2) = (&f.users["ana"], &f.users["lab1"], &f.users["lab2"]);
    let ngrams = c
        .add_plugin(ana, cloister_bundled_plugins::get("hashed-ngrams").unwrap())
        .unwrap();
    c.approve_plugin(&f.users["rev"], &ngrams.digest).unwrap();
    let data = c.env().path().parent().unwrap().join("d.jsonl");
    let mut lines = String::new();
    for i in 0..120 {
        let label = if i % 3 != 0 {
            "null".to_string()
        } else if i % 2 == 0 {
            "\"ham\"".to_string()
        } else {
            "\"spam\"".to_string()
        };
        let words = if i % 2 == 0 { "lunch" } else { "prize" };
        lines.push_str(&format!(
            "{{\"id\":\"r{i}\",\"text\":\"{words} {i}\",\"label\":{label}}}\n"
        ));
    }
    std::fs::write(&data, lines).unwrap();
    c.import_dataset(ana, "d", &data, &ImportOptions::default())
        .unwrap();
    let spec = |labelers: &str| {
        format!(
            "name = \"q\"\ndataset = \"d\"\nsplit_seed = 0\nlabelers = {labelers}\nfeatures = {{ plugin = \"hashed-ngrams\", config = {{ bits = 10 }} }}\n\n[[model]]\ntemplate = \"logreg\"\n\n[[model]]\ntemplate = \"logreg\"\nset = {{ seed = 3 }}\n\n[selector]\nbuiltin = \"random\"\n\n[loop]\nseed_labels = 6\nper_round = 4\nmax_rounds = 2\nbudget = 20\n"
        )
    };
    // Which names exist is not for a spec to tell.
    let missing = c
        .start_job(ana, "q.toml", &spec("[\"nobody\"]"), None)
        .unwrap_err()
        .to_string();
    let not_labeler = c
        .start_job(ana, "q.toml", &spec("[\"rev\"]"), None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        missing.replace("nobody", "NAME"),
        not_labeler.replace("rev", "NAME"),
        "{missing} / {not_labeler}"
    );
    assert!(missing.contains("is not an active labeler"), "{missing}");

    // Seed items go to lab1 and lab2 in turn.
    let job = c
        .start_job(ana, "q.toml", &spec("[\"lab1\", \"lab2\"]"), None)
        .unwrap();
    c.run_job(ana, &job.id, &mut |_| {}).unwrap();
    let theirs = c.next_label_item(lab1).unwrap().unwrap().item.record;
    // lab2 labels lab1's item: an authorization decision, denied, audited.
    let r = c.label_item(lab2, &theirs, "ham", None);
    assert!(matches!(r, Err(ServiceError::Denied { .. })), "{r:?}");
    // A record queued for nobody: denied and audited as well.
    let r = c.label_item(lab2, "no-such-record", "ham", None);
    assert!(matches!(r, Err(ServiceError::Denied { .. })), "{r:?}");
    let denied = f.denials("label_record");
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(denied.iter().all(|e| e.record.actor == "lab2"));
    // Both decided by the records policy (a resource the schema does not
    // allow for `label_record` would be an evaluation error instead, with
    // no deciding policy).
    assert!(
        denied
            .iter()
            .all(|e| e.record.policies == ["records-only-for-their-labeler"]),
        "{denied:?}"
    );
    // And over HTTP it is a 403, not a 400.
    let login = f.send(login_req("lab2", PASSWORD, &[], None));
    let csrf = login.json()["csrf"].as_str().unwrap().to_string();
    let r = f.send(
        Request::post("/api/labels")
            .header(header::COOKIE, login.cookie("cloister_session"))
            .header("x-csrf-token", csrf)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                serde_json::json!({"id": theirs, "label": "ham"}).to_string(),
            ))
            .unwrap(),
    );
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[test]
fn pages_show_what_the_policies_allow_and_follow_a_policy_change() {
    let links = |f: &Fx, user: &str| -> Vec<String> {
        let cookie = f
            .send(login_req(user, PASSWORD, &[], None))
            .cookie("cloister_session");
        let page = f.send(
            Request::get("/")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        );
        assert_eq!(page.status, StatusCode::OK);
        let html = String::from_utf8_lossy(&page.body).into_owned();
        let nav = html
            .split("<nav>")
            .nth(1)
            .unwrap()
            .split("</nav>")
            .next()
            .unwrap();
        ["/plugins", "/train", "/jobs", "/models", "/label", "/audit"]
            .iter()
            .filter(|h| nav.contains(&format!("href=\"{h}\"")))
            .map(|h| h.to_string())
            .collect()
    };
    let f = fx(ConsoleConfig::default());
    assert_eq!(links(&f, "ana"), ["/plugins", "/train", "/jobs", "/models"]);
    assert_eq!(links(&f, "lab1"), ["/label"]);
    // The default policies give reviewers plugins and jobs, not models.
    assert_eq!(links(&f, "rev"), ["/plugins", "/jobs"]);
    // Asking what to show is not an operation: the policies refused rev
    // `view_model` for the navigation, and no audit entry says so.
    assert!(f.denials("view_model").is_empty());
    assert!(f.denials("train_model").is_empty());

    // A policy that lets reviewers read models brings the link with it.
    let f = fx_with(
        ConsoleConfig::default(),
        Some(
            "@id(\"reviewers-read-models\")\npermit (principal in Role::\"reviewer\", action == Action::\"view_model\", resource);\n",
        ),
    );
    assert_eq!(links(&f, "rev"), ["/plugins", "/jobs", "/models"]);
}

#[test]
fn a_refused_training_request_says_nothing_about_what_exists_and_is_audited() {
    let f = fx(ConsoleConfig::default());
    let r = f.send(login_req("lab1", PASSWORD, &[], None));
    let cookie = r.cookie("cloister_session");
    let csrf = r.json()["csrf"].as_str().unwrap().to_string();
    let train = |dataset: &str| {
        let body = format!(
            "{{\"dataset\": \"{dataset}\", \"features\": \"{}\", \"template\": \"logreg\"}}",
            "ab".repeat(32)
        );
        let r = f.send(
            Request::post("/api/train")
                .header(header::COOKIE, &cookie)
                .header("x-csrf-token", &csrf)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap(),
        );
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    // No dataset `spam` exists and none `nope`: the answers are the same
    // denial, decided before anything was looked up.
    let a = train("spam");
    let b = train("nope");
    assert_eq!(a.0, StatusCode::FORBIDDEN, "{}", a.1);
    assert_eq!(a, b);
    let denied = f.denials("train_model");
    assert_eq!(denied.len(), 2);
    assert!(denied.iter().all(|e| e.record.actor == "lab1"));
}
