//! Server-rendered pages. Forms post back with the session's CSRF token;
//! every page calls the same `Cloister` methods as the API.

// A page handler answers either a page or an error page: both are
// responses, and axum takes either by value.
#![allow(clippy::result_large_err)]

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form};
use serde::Deserialize;

use cloister_host::jobs::{Job, JobState};
use cloister_host::policy::{Action, Resource};
use cloister_host::service::Cloister;
use cloister_host::users::User;

use crate::api::{AuditQuery, JobBody, TrainBody};
use crate::auth::Caller;
use crate::html::{bars, button, csrf, esc, f4, heatmap, lines, opt4, page, table};
use crate::{ApiError, Console, blocking};

type S = State<Arc<Console>>;
pub(crate) type Page = Result<Response, Response>;

const STYLE: &str = include_str!("../static/style.css");
const SCRIPT: &str = include_str!("../static/app.js");
/// The demo pipeline, offered as the default spec on the jobs page.
const DEMO_PIPELINE: &str = include_str!("../../pipelines/spam-active-learning.toml");

pub(crate) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/static/style.css", get(style))
        .route("/static/app.js", get(script))
        .route("/healthz", get(healthz))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/", get(home))
        .route("/datasets", get(datasets))
        .route("/datasets/{name}", get(dataset))
        .route(
            "/plugins",
            get(plugins)
                .post(upload_plugin)
                .layer(DefaultBodyLimit::max(32 << 20)),
        )
        .route("/plugins/{digest}/approve", post(approve_plugin))
        .route("/plugins/{digest}/withdraw", post(withdraw_approval))
        .route("/plugin-log", get(plugin_log))
        .route("/train", get(train_form).post(train))
        .route("/tasks/{id}", get(task))
        .route("/jobs", get(jobs).post(start_job))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/resume", post(resume_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/reassign", post(reassign_labels))
        .route("/models", get(models))
        .route("/models/{id}", get(model))
        .route("/models/{id}/request", post(request_release))
        .route("/models/{id}/approve", post(approve_release))
        .route("/models/{id}/reject", post(reject_release))
        .route("/models/{id}/bundle", get(bundle))
        .route("/deployments", get(deployments))
        .route("/deployments/{name}", get(deployment))
        .route("/deployments/{name}/{action}", post(change_deployment))
        .route("/label", get(label_page).post(label))
        .route("/label/change", post(change_label))
        .route("/audit", get(audit))
        .route("/audit/verify", post(audit_verify))
        .route("/audit/checkpoint", get(audit_checkpoint))
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

/// The health probe: `200 ok` when the store answers and the audit log
/// accepts appends, else `503 unavailable` (the reason goes to the log,
/// not to the caller).
async fn healthz(State(k): State<Arc<Console>>) -> Response {
    let checked = tokio::task::spawn_blocking(move || k.c.health()).await;
    match checked {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n").into_response(),
    }
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub(crate) fn error_page(c: Option<&Caller>, e: ApiError) -> Response {
    if matches!(e, ApiError::Unauthorized) && c.is_none() {
        return Redirect::to("/login").into_response();
    }
    let status = e.status();
    let body = format!("<p class=\"error\">{}</p>", esc(&e.to_string()));
    (
        status,
        Html(page(status.canonical_reason().unwrap_or("Error"), c, &body)),
    )
        .into_response()
}

pub(crate) async fn who(k: &Arc<Console>, h: &HeaderMap) -> Result<Caller, Response> {
    let mut c = k.caller(h).await.map_err(|e| error_page(None, e))?;
    c.nav = nav(k.cloister(), &c.user);
    Ok(c)
}

/// The sections a user sees: each where the policies would allow its
/// first operation ([`Cloister::can`], unaudited; the operations
/// themselves still pass the authorization point).
fn nav(x: &Cloister, u: &User) -> Vec<(&'static str, &'static str)> {
    let any_model = Resource::bare_model("*");
    let own_item = Resource::Record {
        dataset: "*".into(),
        id: "*".into(),
        assignee: Some(u.name.clone()),
    };
    [
        (
            "/plugins",
            "Plugins",
            Action::ListPlugins,
            &Resource::Environment,
        ),
        ("/train", "Train", Action::TrainModel, &any_model),
        ("/jobs", "Jobs", Action::ListJobs, &Resource::Environment),
        ("/models", "Models", Action::ViewModel, &any_model),
        (
            "/deployments",
            "Deployments",
            Action::ListDeployments,
            &Resource::Environment,
        ),
        ("/label", "Label", Action::LabelRecord, &own_item),
        (
            "/users",
            "Accounts",
            Action::ListUsers,
            &Resource::Environment,
        ),
        (
            "/audit",
            "Audit log",
            Action::ReadAudit,
            &Resource::AuditLog,
        ),
    ]
    .into_iter()
    .filter(|(_, _, action, resource)| x.can(u, *action, resource))
    .map(|(href, text, _, _)| (href, text))
    .collect()
}

/// The caller of a form post, with its CSRF token checked.
pub(crate) async fn poster(
    k: &Arc<Console>,
    h: &HeaderMap,
    token: &str,
) -> Result<Caller, Response> {
    let c = who(k, h).await?;
    k.check_csrf(&c, h, Some(token))
        .await
        .map_err(|e| error_page(Some(&c), e))?;
    Ok(c)
}

pub(crate) fn ok(c: &Caller, title: &str, body: &str) -> Page {
    Ok(Html(page(title, Some(c), body)).into_response())
}

pub(crate) async fn run<T: Send + 'static>(
    k: &Arc<Console>,
    c: &Caller,
    f: impl FnOnce(&cloister_host::service::Cloister) -> Result<T, cloister_host::service::ServiceError>
    + Send
    + 'static,
) -> Result<T, Response> {
    blocking(k, f).await.map_err(|e| error_page(Some(c), e))
}

// ------------------------------------------------------------- login --

async fn login_form() -> Html<String> {
    Html(page(
        "Log in",
        None,
        "<form method=\"post\" action=\"/login\" class=\"stack\"><label>User <input name=\"user\" autocomplete=\"username\" required autofocus></label><label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label><button>Log in</button></form>",
    ))
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    State(k): S,
    Extension(client): Extension<crate::ClientAddr>,
    h: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    match k.login(f.user, f.password, &h, client.0).await {
        Ok(done) => {
            let mut r = Redirect::to("/").into_response();
            for cookie in &done.cookies {
                if let Ok(v) = HeaderValue::from_str(cookie) {
                    r.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            r
        }
        Err(e) => {
            let status = e.status();
            let body = format!(
                "<p class=\"error\">{}</p><p><a href=\"/login\">Try again</a></p>",
                esc(&e.to_string())
            );
            (status, Html(page("Log in", None, &body))).into_response()
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub(crate) csrf: String,
}

async fn logout(State(k): S, h: HeaderMap, Form(f): Form<CsrfForm>) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let cookie = k.logout(&h).await.map_err(|e| error_page(Some(&c), e))?;
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

async fn home(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let mut body = format!(
        "<p>Signed in as <strong>{}</strong> ({}). Everything you do here is authorized by the environment's policies and recorded in its audit log.</p>",
        esc(&c.user.name),
        esc(&crate::html::roles(&c))
    );
    // A token seen by someone else is replaced at once, without waiting
    // for an administrator (where the policies allow it).
    let own = Resource::Account {
        name: c.user.name.clone(),
    };
    if k.cloister().can(&c.user, Action::RotateToken, &own) {
        let _ = write!(
            body,
            "<h2>Your API token</h2><p>For the command line and the API. If it may have been seen by someone else, replace it: the old one stops working at once, and the new one is shown once.</p>{}",
            button(
                &c,
                &format!("/users/{}/token", c.user.name),
                "Replace my API token"
            )
        );
    }
    ok(&c, "Cloister", &body)
}

// ---------------------------------------------------------- datasets --

async fn datasets(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let list = run(&k, &c, move |x| x.list_datasets(&u)).await?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            vec![
                format!(
                    "<a href=\"/datasets/{}\">{}</a>",
                    esc(&v.reference()),
                    esc(&v.reference())
                ),
                v.stats.records.to_string(),
                v.stats.labeled.to_string(),
                esc(&v.digest[..12]),
                esc(&v.created_by),
            ]
        })
        .collect();
    ok(
        &c,
        "Datasets",
        &table(
            &["dataset", "records", "labeled", "sha256", "imported by"],
            &rows,
        ),
    )
}

async fn dataset(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let (v, splits) = run(&k, &c, move |x| x.dataset_stats(&u, &name, Some(0))).await?;
    let labels: Vec<(String, f64)> = v
        .stats
        .labels
        .iter()
        .map(|(l, n)| (l.clone(), *n as f64))
        .collect();
    let mut body = format!(
        "<p>{} records, {} labeled, {} unlabeled. Content sha256 {}. Only aggregates are shown: rows never leave the environment.</p>",
        v.stats.records,
        v.stats.labeled,
        v.stats.unlabeled,
        esc(&v.digest)
    );
    body.push_str(&bars("label distribution", &labels));
    if let Some(s) = splits {
        let rows: Vec<Vec<String>> = s
            .counts
            .iter()
            .map(|(split, (l, u))| {
                vec![
                    format!("{split:?}").to_lowercase(),
                    l.to_string(),
                    u.to_string(),
                ]
            })
            .collect();
        body.push_str("<h2>Splits (seed 0)</h2>");
        body.push_str(&table(&["split", "labeled", "unlabeled"], &rows));
    }
    let fields: Vec<Vec<String>> = v
        .stats
        .fields
        .iter()
        .map(|(n, f)| vec![esc(n), esc(&f.kind), f.present.to_string()])
        .collect();
    body.push_str("<h2>Fields</h2>");
    body.push_str(&table(&["field", "kind", "present"], &fields));
    ok(&c, &format!("Dataset {}", v.reference()), &body)
}

// ----------------------------------------------------------- plugins --

async fn plugins(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let list = run(&k, &c, move |x| x.list_plugins(&u)).await?;

    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let keys: Vec<String> = p
                .config
                .iter()
                .map(|k| format!("{}={}", esc(&k.name), esc(&k.default_value)))
                .collect();
            let may = |a: Action| k.cloister().can(&c.user, a, &p.resource());
            let withdrawn = p
                .withdrawn
                .last()
                .map(|w| format!("approval withdrawn by {}<br>", esc(&w.by)))
                .unwrap_or_default();
            let state = match &p.approval {
                Some(a) if may(Action::WithdrawApproval) => format!(
                    "approved by {}<br>{}",
                    esc(&a.by),
                    button(
                        &c,
                        &format!("/plugins/{}/withdraw", p.digest),
                        "Withdraw the approval"
                    )
                ),
                Some(a) => format!("approved by {}", esc(&a.by)),
                None if k
                    .cloister()
                    .can(&c.user, Action::ApprovePlugin, &p.resource()) =>
                {
                    withdrawn
                        + &button(
                            &c,
                            &format!("/plugins/{}/approve", p.digest),
                            "Approve this digest",
                        )
                }
                None => withdrawn + "awaiting review",
            };
            vec![
                esc(&p.name),
                esc(&p.version),
                esc(p.kind.as_str()),
                format!("<code>{}</code>", esc(&p.digest)),
                esc(&p.description),
                keys.join("<br>"),
                esc(&p.imports.join(", ")),
                esc(&p.added_by),
                state,
            ]
        })
        .collect();
    let mut body = table(
        &[
            "name",
            "version",
            "kind",
            "sha256",
            "description",
            "config",
            "imports",
            "added by",
            "review",
        ],
        &rows,
    );
    let _ = write!(
        body,
        "<h2>Add a plugin</h2><form method=\"post\" action=\"/plugins\" enctype=\"multipart/form-data\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"file\" name=\"component\" accept=\".wasm\" required> <button>Upload and inspect</button></form><p>The component is inspected (kind, digest, imports, config keys) and registered unapproved; a reviewer who did not add it approves that exact digest.</p>",
        esc(c.csrf.as_deref().unwrap_or(""))
    );
    if k.cloister()
        .can(&c.user, Action::ReadPluginLog, &Resource::Environment)
    {
        body.push_str("<p><a href=\"/plugin-log\">The plugin log</a>: every plugin stage with its outcome, resource use and what the plugin wrote (administrators only).</p>");
    }
    ok(&c, "Plugins", &body)
}

#[derive(Deserialize)]
struct PluginLogQuery {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// The administrators' plugin log: each stage's outcome, the host's full
/// account of a failure and what the plugin wrote — the plugin-chosen
/// text that users never see (escaped, with deceptive characters shown
/// as escapes, like every text on these pages).
async fn plugin_log(State(k): S, h: HeaderMap, Query(q): Query<PluginLogQuery>) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let digest = q.digest.filter(|d| !d.trim().is_empty());
    let filter = digest.clone();
    let entries = run(&k, &c, move |x| x.plugin_log(&u, filter.as_deref(), limit)).await?;
    let mut body = format!(
        "<form method=\"get\" action=\"/plugin-log\" class=\"row\"><input name=\"digest\" placeholder=\"plugin digest or prefix\" value=\"{}\"><input name=\"limit\" type=\"number\" min=\"1\" max=\"1000\" value=\"{limit}\"><button>Show</button></form>",
        esc(digest.as_deref().unwrap_or(""))
    );
    if entries.is_empty() {
        body.push_str("<p>No plugin stage recorded yet.</p>");
    }
    for e in &entries {
        let _ = write!(
            body,
            "<h3>#{} <code>{}</code> {} <strong>{}</strong></h3><p>{} by {}; {}; {} calls, fuel {}, peak memory {} KiB, {} ms.</p>",
            e.seq,
            esc(&e.digest[..e.digest.len().min(16)]),
            esc(&e.stage),
            esc(&e.code),
            esc(&cloister_host::time::rfc3339(e.time_ms)),
            esc(&e.actor),
            esc(&e.purpose),
            e.usage.calls,
            e.usage.fuel,
            e.usage.peak_memory_bytes / 1024,
            e.usage.wall_ms
        );
        if let Some(d) = &e.detail {
            let _ = write!(body, "<p>Host: {}</p>", esc(d));
        }
        if !e.output.is_empty() {
            let _ = write!(body, "<pre class=\"record\">{}</pre>", esc(&e.output));
        }
        if e.dropped_bytes > 0 {
            let _ = write!(body, "<p>({} more bytes dropped)</p>", e.dropped_bytes);
        }
    }
    ok(&c, "Plugin log", &body)
}

/// The upload form: the CSRF token travels as the form's first field (or
/// the `X-CSRF-Token` header), never in the URL, and is checked before the
/// component is read.
async fn upload_plugin(State(k): S, h: HeaderMap, mut form: Multipart) -> Page {
    let mut token = String::new();
    let mut bytes = None;
    let mut checked: Option<Caller> = None;
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("csrf") if checked.is_none() => {
                token = field.text().await.unwrap_or_default();
            }
            Some("component") => {
                if checked.is_none() {
                    checked = Some(poster(&k, &h, &token).await?);
                }
                bytes = field.bytes().await.ok();
            }
            _ => {}
        }
    }
    let c = match checked {
        Some(c) => c,
        None => poster(&k, &h, &token).await?,
    };
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        return Err(error_page(
            Some(&c),
            ApiError::BadRequest("choose a .wasm component to upload".into()),
        ));
    };
    let u = c.user.clone();
    let e = run(&k, &c, move |x| x.add_plugin(&u, &bytes)).await?;
    let body = format!(
        "<p>Registered <strong>{}</strong> {} ({}), sha256 <code>{}</code>, {} bytes; imports: {}. It awaits a reviewer's approval.</p><p><a href=\"/plugins\">Back to plugins</a></p>",
        esc(&e.name),
        esc(&e.version),
        esc(e.kind.as_str()),
        esc(&e.digest),
        e.size,
        esc(&e.imports.join(", "))
    );
    ok(&c, "Plugin inspected", &body)
}

async fn approve_plugin(
    State(k): S,
    h: HeaderMap,
    Path(d): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    review(&k, &h, d, f, Cloister::approve_plugin).await
}

async fn withdraw_approval(
    State(k): S,
    h: HeaderMap,
    Path(d): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    review(&k, &h, d, f, Cloister::withdraw_approval).await
}

/// A reviewer's decision on a plugin digest, then back to the plugins.
async fn review(
    k: &Arc<Console>,
    h: &HeaderMap,
    digest: String,
    f: CsrfForm,
    decide: fn(
        &Cloister,
        &User,
        &str,
    ) -> Result<
        cloister_host::registry::PluginEntry,
        cloister_host::service::ServiceError,
    >,
) -> Page {
    let c = poster(k, h, &f.csrf).await?;
    let u = c.user.clone();
    run(k, &c, move |x| decide(x, &u, &digest)).await?;
    Ok(Redirect::to("/plugins").into_response())
}

// ---------------------------------------------------------- training --

fn options(items: &[(String, String)], with_none: bool) -> String {
    let mut s = String::new();
    if with_none {
        s.push_str("<option value=\"\">(none)</option>");
    }
    for (v, t) in items {
        let _ = write!(s, "<option value=\"{}\">{}</option>", esc(v), esc(t));
    }
    s
}

async fn train_form(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let (u1, u2) = (c.user.clone(), c.user.clone());
    let ds = run(&k, &c, move |x| x.list_datasets(&u1)).await?;
    let plugins = run(&k, &c, move |x| x.list_plugins(&u2)).await?;
    let templates =
        cloister_host::train::templates().map_err(|_| error_page(Some(&c), ApiError::Internal))?;
    let of_kind = |kind: cloister_host::types::PluginKind| -> Vec<(String, String)> {
        plugins
            .iter()
            .filter(|p| p.kind == kind && p.approval.is_some())
            .map(|p| {
                (
                    p.digest.clone(),
                    format!("{} {} ({})", p.name, p.version, &p.digest[..12]),
                )
            })
            .collect()
    };
    let dsets: Vec<(String, String)> = ds.iter().map(|v| (v.reference(), v.reference())).collect();
    let tpl: Vec<(String, String)> = templates
        .iter()
        .map(|t| (t.name.clone(), format!("{} — {}", t.name, t.description)))
        .collect();
    let body = format!(
        "<form method=\"post\" action=\"/train\" class=\"stack\">{}<label>Dataset <select name=\"dataset\">{}</select></label><label>Preprocessor <select name=\"preprocess\">{}</select></label><label>Featurizer <select name=\"features\">{}</select></label><label>Template <select name=\"template\">{}</select></label><label>Preprocessor settings (key=value, comma-separated) <input name=\"preprocess_config\" placeholder=\"fields=review\"></label><label>Featurizer settings (key=value, comma-separated) <input name=\"features_config\" placeholder=\"char_ngrams=2-5\"></label><label>Settings (key=value, comma-separated) <input name=\"sets\" placeholder=\"epochs=10\"></label><button>Train</button></form><p>Only approved plugins are offered. Training runs the plugins in the sandbox, trains, evaluates on the test split and stores the model with its lineage.</p>",
        csrf(&c),
        options(&dsets, false),
        options(
            &of_kind(cloister_host::types::PluginKind::Preprocessor),
            true
        ),
        options(
            &of_kind(cloister_host::types::PluginKind::Featurizer),
            false
        ),
        options(&tpl, false)
    );
    ok(&c, "Train a model", &body)
}

#[derive(Deserialize)]
struct TrainForm {
    #[serde(default)]
    csrf: String,
    dataset: String,
    #[serde(default)]
    preprocess: String,
    features: String,
    template: String,
    #[serde(default)]
    features_config: String,
    #[serde(default)]
    preprocess_config: String,
    #[serde(default)]
    sets: String,
}

/// `key=value` pairs, comma-separated, from a form field. An item without
/// `=` continues the value before it (`fields=a,b, width=2` is `fields` =
/// `a,b` and `width` = `2`: list values hold commas); one with nothing
/// before it is refused naming the field and the item.
fn form_pairs(
    field: &str,
    text: &str,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let mut pairs = std::collections::BTreeMap::new();
    let mut last: Option<String> = None;
    for kv in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match (kv.split_once('='), &last) {
            (Some((key, v)), _) if !key.trim().is_empty() => {
                pairs.insert(key.trim().to_string(), v.trim().to_string());
                last = Some(key.trim().to_string());
            }
            (None, Some(key)) => {
                if let Some(v) = pairs.get_mut(key) {
                    v.push(',');
                    v.push_str(kv);
                }
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "{field}: `{kv}` is not key=value"
                )));
            }
        }
    }
    Ok(pairs)
}

async fn train(State(k): S, h: HeaderMap, Form(f): Form<TrainForm>) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let sets = form_pairs("settings", &f.sets).map_err(|e| error_page(Some(&c), e))?;
    let features_config = form_pairs("featurizer settings", &f.features_config)
        .map_err(|e| error_page(Some(&c), e))?;
    let preprocess_config = form_pairs("preprocessor settings", &f.preprocess_config)
        .map_err(|e| error_page(Some(&c), e))?;
    let body = TrainBody {
        preprocess_config: if f.preprocess.is_empty() || preprocess_config.is_empty() {
            vec![]
        } else {
            vec![preprocess_config]
        },
        dataset: f.dataset,
        preprocess: if f.preprocess.is_empty() {
            vec![]
        } else {
            vec![f.preprocess]
        },
        features: f.features,
        features_config,
        template: f.template,
        sets,
    };
    let id = crate::api::start_training(&k, &c.user, body)
        .await
        .map_err(|e| error_page(Some(&c), e))?;
    Ok(Redirect::to(&format!("/tasks/{id}")).into_response())
}

async fn task(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Page {
    let c = who(&k, &h).await?;
    let found = crate::tasks::get(&k, id.clone(), &c.user.name)
        .await
        .map_err(|e| error_page(Some(&c), e))?;
    let Some(t) = found else {
        return Err(error_page(
            Some(&c),
            ApiError::NotFound(format!("no task {id}")),
        ));
    };
    let mut body = String::new();
    if t.state == "running" {
        body.push_str("<p data-refresh=\"2\">Running… this page refreshes itself.</p>");
    }
    let _ = write!(body, "<p>State: <strong>{}</strong></p>", esc(&t.state));
    if let Some(r) = &t.result {
        let link = if t.kind == "train" {
            format!("/models/{r}")
        } else {
            format!("/jobs/{r}")
        };
        let _ = write!(
            body,
            "<p>Result: <a href=\"{}\">{}</a></p>",
            esc(&link),
            esc(r)
        );
    }
    if let Some(e) = &t.error {
        let _ = write!(body, "<p class=\"error\">{}</p>", esc(e));
    }
    body.push_str("<pre>");
    for l in &t.lines {
        body.push_str(&esc(l));
        body.push('\n');
    }
    body.push_str("</pre>");
    ok(&c, &format!("Task {} ({})", t.id, t.kind), &body)
}

// -------------------------------------------------------------- jobs --

async fn jobs(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let list = run(&k, &c, move |x| x.list_jobs(&u)).await?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|j| {
            vec![
                format!("<a href=\"/jobs/{}\">{}</a>", esc(&j.id), esc(&j.id)),
                esc(&j.spec.name),
                esc(&j.dataset),
                esc(j.state.name()),
                j.rounds
                    .iter()
                    .filter(|r| !r.models.is_empty())
                    .count()
                    .to_string(),
                esc(&j.started_by),
            ]
        })
        .collect();
    let mut body = table(
        &["job", "name", "dataset", "state", "rounds", "started by"],
        &rows,
    );
    let any_dataset = Resource::Dataset { name: "*".into() };
    if k.cloister().can(&c.user, Action::RunJob, &any_dataset) {
        let _ = write!(
            body,
            "<h2>Start an active-learning pipeline</h2><form method=\"post\" action=\"/jobs\" class=\"stack\">{}<textarea name=\"spec\" rows=\"22\" cols=\"90\">{}</textarea><label><input type=\"checkbox\" name=\"oracle\" value=\"gold\" checked> answer the queue from gold labels (the oracle, for measurement)</label><button>Start</button></form>",
            csrf(&c),
            esc(DEMO_PIPELINE)
        );
    }
    ok(&c, "Jobs", &body)
}

#[derive(Deserialize)]
struct JobForm {
    #[serde(default)]
    csrf: String,
    spec: String,
    #[serde(default)]
    oracle: Option<String>,
}

async fn start_job(State(k): S, h: HeaderMap, Form(f): Form<JobForm>) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let (job, _) = crate::api::create_job(
        &k,
        c.user.clone(),
        JobBody {
            spec: f.spec,
            oracle: f.oracle,
        },
    )
    .await
    .map_err(|e| error_page(Some(&c), e))?;
    Ok(Redirect::to(&format!("/jobs/{job}")).into_response())
}

/// Who the job waits for, and the form that moves a labeler's open items
/// to another (the policies decide who may: the owner and admins).
fn labelers_body(c: &Caller, j: &Job, stats: &cloister_host::jobs::JobStats) -> String {
    let rows: Vec<Vec<String>> = stats
        .labelers
        .iter()
        .map(|l| {
            vec![
                esc(&l.labeler),
                l.open.to_string(),
                l.answered.to_string(),
                if l.active {
                    "yes".into()
                } else {
                    "<strong>no</strong> (disabled or no longer a labeler: reassign their open items)".into()
                },
            ]
        })
        .collect();
    let mut b = String::from("<h2>Labelers of this round</h2>");
    b.push_str(&table(
        &["labeler", "open", "answered", "can answer"],
        &rows,
    ));
    for r in &j.reassigned {
        let _ = write!(
            b,
            "<p>{} open item{} moved from {} to {} by {}.</p>",
            r.items,
            if r.items == 1 { "" } else { "s" },
            esc(&r.from),
            esc(&r.to),
            esc(&r.by)
        );
    }
    let holding: Vec<&str> = stats
        .labelers
        .iter()
        .filter(|l| l.open > 0)
        .map(|l| l.labeler.as_str())
        .collect();
    if !holding.is_empty() {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/jobs/{}/reassign\" class=\"stack\" id=\"reassign\">{}<label>Move the open items of <select name=\"from\">",
            esc(&j.id),
            csrf(c)
        );
        for l in holding {
            let _ = write!(b, "<option value=\"{}\">{}</option>", esc(l), esc(l));
        }
        b.push_str("</select></label><label>to the labeler <input name=\"to\" required autocomplete=\"off\"></label><button>Reassign</button></form><p>For a labeler who is away: the other labeler also takes their place in the rounds to come; answers already given stay theirs.</p>");
    }
    b
}

fn job_body(c: &Caller, j: &Job, stats: &cloister_host::jobs::JobStats) -> String {
    let mut body = format!(
        "<p>Pipeline <strong>{}</strong> on {} by {}. State: <strong>{}</strong>.</p>",
        esc(&j.spec.name),
        esc(&j.dataset),
        esc(&j.started_by),
        esc(j.state.name())
    );
    if matches!(j.state, JobState::Running) {
        body.push_str("<p data-refresh=\"3\">This page refreshes itself while the job runs.</p>");
    }
    if let JobState::Failed { error } = &j.state {
        let _ = write!(body, "<p class=\"error\">{}</p>", esc(error));
    }
    let running = matches!(j.state, JobState::Running);
    if !matches!(j.state, JobState::Done { .. } | JobState::Cancelled { .. }) {
        if !running {
            body.push_str(&button(c, &format!("/jobs/{}/resume", j.id), "Resume"));
        }
        body.push_str(&button(c, &format!("/jobs/{}/cancel", j.id), "Cancel"));
    }
    if !stats.labelers.is_empty() {
        body.push_str(&labelers_body(c, j, stats));
    }
    let rows: Vec<Vec<String>> = j
        .rounds
        .iter()
        .map(|r| {
            let prec = if r.auto_checked > 0 {
                format!("{:.3}", r.auto_correct as f64 / r.auto_checked as f64)
            } else {
                "–".into()
            };
            vec![
                r.round.to_string(),
                r.train_manual.to_string(),
                r.train_auto.to_string(),
                opt4(r.val_accuracy),
                opt4(r.test_accuracy),
                r.auto_accepted.to_string(),
                r.gate
                    .as_ref()
                    .and_then(|g| g.estimate.zip(g.interval))
                    .map_or_else(
                        || "–".into(),
                        |(e, (lo, hi))| format!("{e:.3} [{lo:.3}, {hi:.3}]"),
                    ),
                prec,
                (r.queued + r.badcases_queued).to_string(),
                r.fixed.len().to_string(),
                r.appeared.len().to_string(),
            ]
        })
        .collect();
    body.push_str("<h2>Rounds</h2>");
    body.push_str(&table(
        &[
            "round",
            "manual",
            "auto",
            "val acc",
            "test acc",
            "+auto",
            "estimated precision",
            "precision against gold",
            "queued",
            "badcases fixed",
            "new badcases",
        ],
        &rows,
    ));
    let gates: Vec<String> = j
        .rounds
        .iter()
        .filter_map(|r| {
            r.gate.as_ref().map(|g| {
                let spots = if r.spot_checks > 0 {
                    format!(
                        "; {} spot checks, {} answered, {} confirmed{}",
                        r.spot_checks,
                        r.spot_checked,
                        r.spot_agreed,
                        if r.revoked > 0 {
                            format!(": {} automatic labels revoked", r.revoked)
                        } else {
                            String::new()
                        }
                    )
                } else {
                    String::new()
                };
                format!(
                    "<li>round {}: {}{}</li>",
                    r.round,
                    esc(&g.summary(&j.classes)),
                    esc(&spots)
                )
            })
        })
        .collect();
    if !gates.is_empty() {
        let _ = write!(
            body,
            "<h3>Precision gate</h3><p>Automatic labels are accepted only above thresholds \
             certified on labeled validation records.</p><ul>{}</ul>",
            gates.concat()
        );
    }
    let acc: Vec<(f64, f64)> = j
        .rounds
        .iter()
        .filter_map(|r| r.test_accuracy.map(|a| (r.train_manual as f64, a)))
        .collect();
    body.push_str(&lines(
        "test accuracy against manual labels",
        "manual labels",
        &[("committee", "#4a78b5", acc)],
    ));
    let autos: Vec<(String, f64)> = j
        .rounds
        .iter()
        .filter(|r| !r.models.is_empty())
        .map(|r| (format!("round {}", r.round), r.auto_accepted as f64))
        .collect();
    body.push_str(&bars("automatic labels per round", &autos));
    let spent: Vec<(f64, f64)> = j
        .rounds
        .iter()
        .map(|r| {
            (
                f64::from(r.round),
                r.manual_total as f64 * stats.price_per_label,
            )
        })
        .collect();
    body.push_str(&lines(
        "cost spent by round",
        "round",
        &[("spent", "#b5584a", spent)],
    ));
    let pct = |v: Option<f64>| v.map_or_else(|| "–".into(), |v| format!("{:.1}%", 100.0 * v));
    let _ = write!(
        body,
        "<h2>Labels and cost</h2><table><tbody><tr><th>pool</th><td>{}</td></tr><tr><th>manual labels used / requested</th><td>{} / {} ({} of the pool)</td></tr><tr><th>automatic labels</th><td>{} (precision against gold {} on {} checked; estimated without gold {})</td></tr><tr><th>badcase reviews</th><td>{} / {}</td></tr><tr><th>label utilization</th><td>{}</td></tr><tr><th>cost spent</th><td>{:.2}</td></tr><tr><th>cost saved</th><td>{:.2} (of {:.2} for the whole pool)</td></tr></tbody></table>",
        stats.pool_size,
        stats.manual_used,
        stats.manual_requested,
        pct(stats.manual_share),
        stats.auto_accepted,
        pct(stats.auto_precision),
        stats.auto_checked,
        match (
            stats.auto_estimate,
            stats.auto_estimate_low,
            stats.auto_estimate_high
        ) {
            (Some(e), Some(lo), Some(hi)) =>
                format!("{} [{} – {}]", pct(Some(e)), pct(Some(lo)), pct(Some(hi))),
            _ => "–".into(),
        },
        stats.reviews_done,
        stats.reviews_requested,
        pct(stats.label_utilization),
        stats.cost_spent,
        stats.cost_saved,
        stats.cost_full_pool
    );
    if let Some(r) = &j.result {
        let links: Vec<String> = r
            .models
            .iter()
            .map(|m| format!("<a href=\"/models/{}\">{}</a>", esc(m), esc(m)))
            .collect();
        let _ = write!(
            body,
            "<p>Final committee: test accuracy {}, macro F1 {}; models {}.</p>",
            f4(r.test_accuracy),
            f4(r.test_macro_f1),
            links.join(", ")
        );
    }
    body
}

async fn job(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let (j, s) = run(&k, &c, move |x| {
        Ok((x.show_job(&u, &id)?, x.job_stats(&u, &id)?))
    })
    .await?;
    ok(&c, &format!("Job {}", j.id), &job_body(&c, &j, &s))
}

async fn resume_job(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let (u, jid) = (c.user.clone(), id.clone());
    run(&k, &c, move |x| x.show_job(&u, &jid)).await?;
    crate::api::run_in_background(&k, &c.user, id.clone())
        .await
        .map_err(|e| error_page(Some(&c), e))?;
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

async fn cancel_job(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let (u, jid) = (c.user.clone(), id.clone());
    run(&k, &c, move |x| x.cancel_job(&u, &jid)).await?;
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

#[derive(Deserialize)]
struct ReassignForm {
    #[serde(default)]
    csrf: String,
    from: String,
    to: String,
}

async fn reassign_labels(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ReassignForm>,
) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let (u, jid) = (c.user.clone(), id.clone());
    run(&k, &c, move |x| x.reassign_labels(&u, &jid, &f.from, &f.to)).await?;
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

// ------------------------------------------------------- deployments --

fn share(bp: u32) -> String {
    format!("{:.2}%", f64::from(bp) / 100.0)
}

async fn deployments(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let list = run(&k, &c, move |x| x.list_deployments(&u)).await?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                format!(
                    "<a href=\"/deployments/{}\">{}</a>",
                    esc(&d.name),
                    esc(&d.name)
                ),
                format!("{} ({})", esc(&d.champion), share(d.champion_weight())),
                d.candidates
                    .iter()
                    .map(|v| format!("{} ({})", esc(&v.model), share(v.weight)))
                    .collect::<Vec<_>>()
                    .join(", "),
                d.shadow
                    .as_ref()
                    .map(|s| format!("{} ({})", esc(&s.model), share(s.sample)))
                    .unwrap_or_default(),
                d.ramp
                    .as_ref()
                    .map(|r| esc(&format!("{} {}", r.model, r.state)))
                    .unwrap_or_default(),
                if d.paused { "paused" } else { "" }.to_string(),
            ]
        })
        .collect();
    let body = if rows.is_empty() {
        "<p>No deployments yet. An operator creates one from a released model with <code>cloister deploy create</code>.</p>".to_string()
    } else {
        table(
            &["deployment", "champion", "candidates", "shadow", "ramp", ""],
            &rows,
        )
    };
    ok(&c, "Deployments", &body)
}

async fn deployment(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let since = cloister_host::time::now_ms().saturating_sub(60 * 60_000);
    let st = run(&k, &c, move |x| x.deployment_status(&u, &name, since)).await?;
    let d = &st.deployment;
    let opt = |v: Option<f64>, p: usize| v.map_or_else(|| "–".to_string(), |x| format!("{x:.p$}"));
    let mut head = vec!["role", "model"];
    let rows: Vec<Vec<String>> = st
        .variants
        .iter()
        .map(|v| {
            let cols = v.columns();
            if head.len() == 2 {
                head.extend(cols.iter().map(|(h, _)| *h));
            }
            let mut row = vec![
                esc(&v.role),
                format!(
                    "<a href=\"/models/{}\">{}</a>",
                    esc(&v.model),
                    esc(&v.model)
                ),
            ];
            row.extend(cols.into_iter().map(|(_, c)| esc(&c)));
            row
        })
        .collect();
    let mut body = format!(
        "<p>Serves {} to {}{}. The figures cover the last hour.</p>",
        esc(&d.champion),
        if d.clients.is_empty() {
            "no client yet".to_string()
        } else {
            esc(&d.clients.join(", "))
        },
        if d.paused {
            " — <strong>paused</strong>"
        } else {
            ""
        }
    );
    body.push_str(&table(&head, &rows));
    body.push_str(&series_charts(&st));
    let label = |v: &cloister_host::serving::Summary| format!("{} {}", v.role, v.model);
    body.push_str(&bars(
        "Requests in the last hour, per variant",
        &st.variants
            .iter()
            .map(|v| (label(v), v.requests as f64))
            .collect::<Vec<_>>(),
    ));
    body.push_str(&bars(
        "p99 latency (ms), per variant",
        &st.variants
            .iter()
            .map(|v| (label(v), v.p99_ms.unwrap_or(0.0)))
            .collect::<Vec<_>>(),
    ));
    if let Some(r) = &d.ramp {
        let _ = write!(
            body,
            "<h2>Ramp</h2><p>{} <strong>{}</strong>: step {} of {} ({}); {} requests this step.{}</p>",
            esc(&r.model),
            esc(&r.state),
            (r.step + 1).min(r.steps.len()),
            r.steps.len(),
            esc(&r
                .steps
                .iter()
                .map(|w| share(*w))
                .collect::<Vec<_>>()
                .join(" → ")),
            r.counters.requests,
            r.reason
                .as_ref()
                .map(|w| format!(" Rolled back: {}.", esc(w)))
                .unwrap_or_default()
        );
    }
    if let Some(cap) = &d.capture {
        let _ = write!(
            body,
            "<h2>Fresh data</h2><p>{} of the requests are captured into dataset <a href=\"/datasets/{}\">{}</a>, in versions of {} records; {} waiting.</p>",
            share(cap.sample),
            esc(&cap.dataset),
            esc(&cap.dataset),
            cap.batch,
            st.captured_waiting
        );
    }
    if !st.reports.is_empty() {
        body.push_str("<h2>Regression reports</h2><p>A candidate takes more than 5% of the traffic only with a passing report against the current champion.</p>");
        let rows: Vec<Vec<String>> = st
            .reports
            .iter()
            .map(|r| {
                let p = &r.report;
                vec![
                    esc(&p.candidate.model),
                    format!("<strong>{}</strong>", esc(&r.standing)),
                    esc(&p.champion.model),
                    esc(&p.datasets.join(", ")),
                    p.labeled.to_string(),
                    format!(
                        "{:+.2} [{:+.2}, {:+.2}]",
                        p.accuracy_delta * 100.0,
                        p.accuracy_delta_ci.0 * 100.0,
                        p.accuracy_delta_ci.1 * 100.0
                    ),
                    format!("{:+.2}", p.macro_f1_delta * 100.0),
                    format!("{:.4}", p.mcnemar.p_value),
                    format!("{:.3} / {:.3}", p.candidate.ece, p.champion.ece),
                    opt(p.psi, 3),
                    esc(&p.reasons.join("; ")),
                ]
            })
            .collect();
        body.push_str(&table(
            &[
                "candidate",
                "standing",
                "against",
                "data",
                "labeled",
                "accuracy Δ pt [95%]",
                "macro-F1 Δ pt",
                "McNemar p",
                "ECE cand / champ",
                "PSI",
                "why it failed",
            ],
            &rows,
        ));
    }
    let resource = Resource::Deployment {
        name: d.name.clone(),
        clients: d.clients.clone(),
    };
    if k.cloister()
        .can(&c.user, Action::ManageDeployment, &resource)
    {
        let base = format!("/deployments/{}", d.name);
        body.push_str("<h2>Actions</h2><p>");
        if d.paused {
            body.push_str(&button(&c, &format!("{base}/resume"), "Resume"));
        } else {
            body.push_str(&button(&c, &format!("{base}/pause"), "Pause"));
        }
        body.push_str(&button(&c, &format!("{base}/rollback"), "Roll back"));
        if !d.paused {
            for v in &d.candidates {
                body.push_str(&button(
                    &c,
                    &format!("{base}/promote?model={}", v.model),
                    &format!("Promote {}", v.model),
                ));
            }
        }
        if d.capture.is_some() {
            for v in &d.candidates {
                body.push_str(&button(
                    &c,
                    &format!("{base}/test?model={}", v.model),
                    &format!("Test {} on fresh data", v.model),
                ));
            }
            body.push_str(&button(
                &c,
                &format!("{base}/capture"),
                "Write captured records",
            ));
        }
        body.push_str("</p>");
    }
    let hist: Vec<Vec<String>> = d
        .history
        .iter()
        .rev()
        .take(30)
        .map(|h| {
            vec![
                esc(&cloister_host::time::rfc3339(h.time_ms)),
                esc(&h.by),
                esc(&h.what),
                esc(&h.champion),
            ]
        })
        .collect();
    body.push_str("<h2>History</h2>");
    body.push_str(&table(&["when", "by", "change", "champion after"], &hist));
    ok(&c, &format!("Deployment {}", d.name), &body)
}

/// Per-minute charts of a deployment's variants over the window: each
/// variant's share of the requests, its p99 latency, and its online
/// accuracy where feedback arrived.
fn series_charts(st: &cloister_host::service::DeploymentStatus) -> String {
    const COLOURS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let now = cloister_host::time::now_ms();
    // Minutes before now, as a negative x (0 is now, never "-0").
    let minutes_ago = |ms: u64| 0.0 - (now.saturating_sub(ms) as f64 / 60_000.0).round();
    let mut total: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for v in st.series.iter().filter(|v| v.role != "shadow") {
        for p in &v.points {
            *total.entry(p.minute_ms).or_default() += p.requests;
        }
    }
    let names: Vec<String> = st
        .series
        .iter()
        .map(|v| {
            format!(
                "{} {}",
                v.role,
                v.model.chars().take(10).collect::<String>()
            )
        })
        .collect();
    let mut share = Vec::new();
    let mut p99 = Vec::new();
    let mut accuracy = Vec::new();
    for (i, v) in st.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        if v.role != "shadow" {
            share.push((
                names[i].as_str(),
                colour,
                v.points
                    .iter()
                    .map(|p| {
                        let t = total.get(&p.minute_ms).copied().unwrap_or(0).max(1);
                        (
                            minutes_ago(p.minute_ms),
                            p.requests as f64 * 100.0 / t as f64,
                        )
                    })
                    .collect::<Vec<_>>(),
            ));
        }
        p99.push((
            names[i].as_str(),
            colour,
            v.points
                .iter()
                .filter_map(|p| p.p99_ms.map(|l| (minutes_ago(p.minute_ms), l)))
                .collect(),
        ));
        accuracy.push((
            names[i].as_str(),
            colour,
            v.points
                .iter()
                .filter_map(|p| p.accuracy.map(|a| (minutes_ago(p.minute_ms), a * 100.0)))
                .collect(),
        ));
    }
    let mut out = String::from("<div class=\"charts\">");
    out.push_str(&lines(
        "Share of requests per minute (%)",
        "minutes ago",
        &share,
    ));
    out.push_str(&lines("p99 latency per minute (ms)", "minutes ago", &p99));
    out.push_str(&lines(
        "Online accuracy per minute (%), from feedback",
        "minutes ago",
        &accuracy,
    ));
    out.push_str("</div>");
    out
}

#[derive(Deserialize)]
struct ModelQuery {
    model: Option<String>,
}

async fn change_deployment(
    State(k): S,
    h: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    Query(q): Query<ModelQuery>,
    Form(f): Form<CsrfForm>,
) -> Page {
    use cloister_host::service::DeploymentChange as C;
    let c = poster(&k, &h, &f.csrf).await?;
    match (action.as_str(), &q.model) {
        ("test", Some(m)) => {
            let (u, n, m) = (c.user.clone(), name.clone(), m.clone());
            run(&k, &c, move |x| x.test_candidate(&u, &n, &m, None)).await?;
            return Ok(Redirect::to(&format!("/deployments/{name}")).into_response());
        }
        ("capture", _) => {
            let (u, n) = (c.user.clone(), name.clone());
            run(&k, &c, move |x| x.write_capture(&u, &n)).await?;
            return Ok(Redirect::to(&format!("/deployments/{name}")).into_response());
        }
        _ => {}
    }
    let change = match (action.as_str(), q.model) {
        ("pause", _) => C::Pause,
        ("resume", _) => C::Resume,
        ("rollback", _) => C::Rollback,
        ("promote", Some(m)) => C::Promote(m),
        _ => {
            return Err(error_page(
                Some(&c),
                ApiError::BadRequest(format!("unknown deployment action `{action}`")),
            ));
        }
    };
    let (u, n) = (c.user.clone(), name.clone());
    run(&k, &c, move |x| x.change_deployment(&u, &n, change)).await?;
    Ok(Redirect::to(&format!("/deployments/{name}")).into_response())
}

// ------------------------------------------------------------ models --

async fn models(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let list = run(&k, &c, move |x| x.list_models(&u)).await?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                format!("<a href=\"/models/{}\">{}</a>", esc(&m.id), esc(&m.id)),
                esc(&m.template),
                esc(&m.lineage.dataset),
                f4(m.evaluation.accuracy),
                f4(m.evaluation.macro_f1),
                esc(&release_state(m)),
            ]
        })
        .collect();
    ok(
        &c,
        "Models",
        &table(
            &[
                "model",
                "template",
                "dataset",
                "test accuracy",
                "macro F1",
                "release",
            ],
            &rows,
        ),
    )
}

/// The plugins the model was trained with, each with its review state
/// now (the full digests are in the lineage table further down): what an
/// approver checks before deciding the release.
fn plugins_section(d: &cloister_host::service::ModelDetail) -> String {
    use cloister_host::service::PluginStage;
    let rows: Vec<Vec<String>> = d
        .plugins
        .iter()
        .map(|p| {
            vec![
                match p.stage {
                    PluginStage::Preprocess => "preprocess".into(),
                    PluginStage::Features => "features".into(),
                },
                esc(&p.name),
                esc(&p.version),
                format!("<code>{}</code>", esc(&p.digest[..p.digest.len().min(16)])),
                esc(&p.review_state()),
            ]
        })
        .collect();
    format!(
        "<h2>Plugins</h2>{}",
        table(
            &["stage", "plugin", "version", "digest", "review now"],
            &rows
        )
    )
}

fn release_state(m: &cloister_host::models::ModelManifest) -> String {
    m.release.describe()
}

async fn model(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let d = run(&k, &c, move |x| x.model_detail(&u, &id)).await?;
    let m = &d.manifest;
    let e = &m.evaluation;
    let mut body = format!(
        "<p>Template <strong>{}</strong>; test accuracy <strong>{}</strong>, macro F1 {}, ECE {} on {} records; kept epoch {} of {}; trained in {:.1} s by {}.</p>",
        esc(&m.template),
        f4(e.accuracy),
        f4(e.macro_f1),
        f4(e.ece),
        e.records,
        m.best_epoch,
        m.curve.len(),
        m.train_seconds,
        esc(&m.created_by)
    );
    body.push_str(&plugins_section(&d));
    let _ = write!(body, "<h2>Release</h2><p>{}</p>", esc(&release_state(m)));
    body.push_str(&disclosure_section(m));
    let may = |a: Action| k.cloister().can(&c.user, a, &m.resource());
    if m.release.requested_by.is_none() && may(Action::RequestRelease) {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/models/{}/request\">{}<input name=\"reason\" placeholder=\"why release it\" required> <button>Request release</button></form>",
            esc(&m.id),
            csrf(&c)
        );
    }
    if m.release.decision.is_none() {
        let blocked = d.unapproved();
        if let Some(p) = blocked {
            let _ = write!(
                body,
                "<p class=\"error\">The release cannot be approved while plugin <strong>{}</strong> is not approved: a reviewer must approve its digest again first.</p>",
                esc(&p.name)
            );
        }
        if blocked.is_none() && may(Action::ApproveRelease) {
            body.push_str(&button(
                &c,
                &format!("/models/{}/approve", m.id),
                "Approve release",
            ));
        }
        if may(Action::RejectRelease) {
            body.push_str(&button(
                &c,
                &format!("/models/{}/reject", m.id),
                "Reject release",
            ));
        }
    }
    if m.release.decision.as_deref() == Some("approved") {
        match d.unapproved() {
            // Released, but a plugin of its lineage lost its approval
            // since: the bundle is not exported until it is approved again.
            Some(p) => {
                let _ = write!(
                    body,
                    "<p class=\"error\">The bundle is not exported while plugin <strong>{}</strong> is not approved: a reviewer must approve its digest again first.</p>",
                    esc(&p.name)
                );
            }
            None => {
                let _ = write!(
                    body,
                    "<p><a href=\"/models/{}/bundle\" download>Download the signed bundle</a> (check it offline with <code>cloister verify-bundle</code>).</p>",
                    esc(&m.id)
                );
            }
        }
    }
    let per_class: Vec<Vec<String>> = e
        .per_class
        .iter()
        .map(|p| {
            vec![
                esc(&p.class),
                f4(p.precision),
                f4(p.recall),
                f4(p.f1),
                p.support.to_string(),
            ]
        })
        .collect();
    body.push_str("<h2>Per class</h2>");
    body.push_str(&table(
        &["class", "precision", "recall", "F1", "support"],
        &per_class,
    ));
    body.push_str(&heatmap(&m.classes, &e.confusion));
    let train: Vec<(f64, f64)> = m
        .curve
        .iter()
        .map(|c| (f64::from(c.epoch), c.train_loss))
        .collect();
    let val: Vec<(f64, f64)> = m
        .curve
        .iter()
        .map(|c| (f64::from(c.epoch), c.val_loss))
        .collect();
    let acc: Vec<(f64, f64)> = m
        .curve
        .iter()
        .map(|c| (f64::from(c.epoch), c.val_accuracy))
        .collect();
    body.push_str(&lines(
        "training curve: loss",
        "epoch",
        &[("train", "#4a78b5", train), ("validation", "#b5584a", val)],
    ));
    body.push_str(&lines(
        "validation accuracy",
        "epoch",
        &[("accuracy", "#3c8d4f", acc)],
    ));
    let rel: Vec<(f64, f64)> = e
        .reliability
        .iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.confidence, b.accuracy))
        .collect();
    body.push_str(&lines(
        "reliability: accuracy against confidence",
        "confidence",
        &[
            ("model", "#4a78b5", rel),
            ("perfect", "#aaa", vec![(0.5, 0.5), (1.0, 1.0)]),
        ],
    ));
    let bad: Vec<Vec<String>> = e
        .badcases
        .iter()
        .take(50)
        .map(|b| {
            vec![
                esc(&b.id),
                esc(&b.truth),
                esc(&b.predicted),
                format!("{:.3}", b.confidence),
            ]
        })
        .collect();
    let _ = write!(
        body,
        "<h2>Badcases</h2><p>{} misclassified test records (ids; record texts are shown only to the labeler a record is assigned to).</p>",
        e.badcases.len()
    );
    body.push_str(&table(
        &["record", "truth", "predicted", "confidence"],
        &bad,
    ));
    let fp: Vec<Vec<String>> = e
        .false_positives
        .iter()
        .map(|(class, ids)| {
            vec![
                esc(class),
                ids.len().to_string(),
                esc(&ids.iter().take(10).cloned().collect::<Vec<_>>().join(" ")),
            ]
        })
        .collect();
    body.push_str("<h2>False positives per class</h2>");
    body.push_str(&table(
        &["predicted class", "count", "records (most confident first)"],
        &fp,
    ));
    let l = &m.lineage;
    let _ = write!(
        body,
        "<h2>Lineage</h2><table><tbody><tr><th>dataset</th><td>{} ({})</td></tr><tr><th>preprocess</th><td>{}</td></tr><tr><th>features</th><td>{}</td></tr><tr><th>fitted state</th><td>{}</td></tr><tr><th>split seed</th><td>{}</td></tr><tr><th>job</th><td>{}</td></tr><tr><th>weights sha256</th><td>{}</td></tr></tbody></table>",
        esc(&l.dataset),
        esc(&l.dataset_digest),
        esc(&l.preprocess.join(", ")),
        esc(&l.features),
        esc(l.features_state.as_deref().unwrap_or("–")),
        l.split_seed,
        esc(l.job.as_deref().unwrap_or("–")),
        esc(&m.weights_sha256)
    );
    ok(&c, &format!("Model {}", m.id), &body)
}

#[derive(Deserialize)]
struct ReasonForm {
    #[serde(default)]
    csrf: String,
    reason: String,
}

async fn request_release(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ReasonForm>,
) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let (u, mid) = (c.user.clone(), id.clone());
    run(&k, &c, move |x| x.request_release(&u, &mid, &f.reason)).await?;
    Ok(Redirect::to(&format!("/models/{id}")).into_response())
}

async fn decide(k: Arc<Console>, h: HeaderMap, id: String, token: String, approve: bool) -> Page {
    let c = poster(&k, &h, &token).await?;
    let (u, mid) = (c.user.clone(), id.clone());
    run(&k, &c, move |x| x.decide_release(&u, &mid, approve)).await?;
    Ok(Redirect::to(&format!("/models/{id}")).into_response())
}

async fn approve_release(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    decide(k, h, id, f.csrf, true).await
}

async fn reject_release(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    decide(k, h, id, f.csrf, false).await
}

async fn bundle(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Page {
    let c = who(&k, &h).await?;
    crate::api::bundle_response(&k, c.user.clone(), id)
        .await
        .map_err(|e| error_page(Some(&c), e))
}

// ------------------------------------------------------------ labels --

async fn label_page(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let next = run(&k, &c, move |x| x.next_label_item(&u)).await?;
    let u = c.user.clone();
    let answers = run(&k, &c, move |x| x.changeable_answers(&u)).await?;
    let mut body = match next {
        None => "<p>Nothing is queued for you.</p>".to_string(),
        Some(task) => {
            let (item, record, waiting, classes) =
                (task.item, task.record, task.waiting, task.classes);
            let mut b = format!(
                "<p>Record <code>{}</code> of {} (job {}, {:?}); {} waiting for you. This view is recorded in the audit log.</p>",
                esc(&item.record),
                esc(&item.dataset),
                esc(&item.job),
                item.reason,
                waiting
            );
            for t in &record.record.texts {
                let _ = write!(
                    b,
                    "<h2>{}</h2><pre class=\"record\">{}</pre>",
                    esc(&t.name),
                    esc(&t.value)
                );
            }
            let _ = write!(
                b,
                "<form method=\"post\" action=\"/label\" id=\"label-form\">{}<input type=\"hidden\" name=\"id\" value=\"{}\"><input type=\"hidden\" name=\"job\" value=\"{}\">",
                csrf(&c),
                esc(&item.record),
                esc(&item.job)
            );
            for (i, cl) in classes.iter().enumerate() {
                let _ = write!(
                    b,
                    "<button name=\"label\" value=\"{}\" data-key=\"{}\">{} <kbd>{}</kbd></button> ",
                    esc(cl),
                    i + 1,
                    esc(cl),
                    i + 1
                );
            }
            b.push_str("</form><p>Keys 1–9 choose a label.</p>");
            b
        }
    };
    if !answers.is_empty() {
        body.push_str(&answers_to_change(&c, &answers));
    }
    ok(&c, "Labeling queue", &body)
}

/// The caller's answers that can still change, each with a form to
/// change it: only record ids and the labels the caller gave.
fn answers_to_change(c: &Caller, answers: &[cloister_host::jobs::OwnAnswer]) -> String {
    let mut b = String::from(
        "<h2>Your answers you can still change</h2><p>Until a round collects its answers (when the job runs on), an answer can change; after that it is final. Each change is recorded in the audit log.</p><table id=\"answers\"><thead><tr><th>record</th><th>job</th><th>round</th><th>answer</th><th>change to</th></tr></thead><tbody>",
    );
    for a in answers {
        let item = &a.item;
        let given = item.answer.as_ref().map_or("", |x| x.label.as_str());
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"answer\">{}</td><td><form method=\"post\" action=\"/label/change\" class=\"inline\">{}<input type=\"hidden\" name=\"id\" value=\"{}\"><input type=\"hidden\" name=\"job\" value=\"{}\"><select name=\"label\" aria-label=\"new label for {}\">",
            esc(&item.record),
            esc(&item.job),
            item.round,
            esc(given),
            csrf(c),
            esc(&item.record),
            esc(&item.job),
            esc(&item.record),
        );
        for cl in a.classes.iter().filter(|cl| cl.as_str() != given) {
            let _ = write!(b, "<option value=\"{}\">{}</option>", esc(cl), esc(cl));
        }
        b.push_str("</select> <button>Change</button></form></td></tr>");
    }
    b.push_str("</tbody></table>");
    b
}

async fn change_label(State(k): S, h: HeaderMap, Form(f): Form<LabelForm>) -> Page {
    answer(&k, &h, f, Cloister::change_label_item).await
}

#[derive(Deserialize)]
struct LabelForm {
    #[serde(default)]
    csrf: String,
    id: String,
    label: String,
    #[serde(default)]
    job: Option<String>,
}

async fn label(State(k): S, h: HeaderMap, Form(f): Form<LabelForm>) -> Page {
    answer(&k, &h, f, Cloister::label_item).await
}

/// [`Cloister::label_item`] or [`Cloister::change_label_item`]: (user,
/// record, label, job).
type Labeling = fn(
    &Cloister,
    &User,
    &str,
    &str,
    Option<&str>,
) -> Result<cloister_host::jobs::QueueItem, cloister_host::service::ServiceError>;

/// A labeling form posted: `how` answers (or changes an answer to) the
/// record, then back to the queue.
async fn answer(k: &Arc<Console>, h: &HeaderMap, f: LabelForm, how: Labeling) -> Page {
    let c = poster(k, h, &f.csrf).await?;
    let u = c.user.clone();
    run(k, &c, move |x| {
        how(
            x,
            &u,
            &f.id,
            &f.label,
            f.job.as_deref().filter(|j| !j.is_empty()),
        )
    })
    .await?;
    Ok(Redirect::to("/label").into_response())
}

// ------------------------------------------------------------- audit --

async fn audit(State(k): S, h: HeaderMap, Query(q): Query<AuditQuery>) -> Page {
    let c = who(&k, &h).await?;
    let f = q.filter().map_err(|e| error_page(Some(&c), e))?;
    let limit = f.limit;
    let from = f.from_seq;
    let u = c.user.clone();
    let entries = run(&k, &c, move |x| x.audit_log(&u, &f)).await?;
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                esc(&cloister_host::time::rfc3339(e.time_ms)),
                esc(&e.record.actor),
                esc(&e.record.action),
                match &e.record.account {
                    Some(a) => format!("{} {}", esc(&e.record.resource), esc(&a.text())),
                    None => esc(&e.record.resource),
                },
                format!("{:?}", e.record.decision).to_lowercase(),
                esc(&e.record.policies.join(", ")),
            ]
        })
        .collect();
    let val = |s: &Option<String>| esc(s.as_deref().unwrap_or(""));
    let mut body = format!(
        "<form method=\"get\" action=\"/audit\" class=\"row\"><input name=\"actor\" placeholder=\"actor\" value=\"{}\"><input name=\"action\" placeholder=\"action\" list=\"audit-actions\" value=\"{}\"><input name=\"resource\" placeholder=\"resource, e.g. account:ana\" value=\"{}\"><datalist id=\"audit-actions\">{}</datalist><select name=\"decision\"><option value=\"\">any decision</option><option value=\"allow\">allow</option><option value=\"deny\">deny</option></select><button>Filter</button></form>",
        val(&q.actor),
        val(&q.action),
        val(&q.resource),
        cloister_host::service::audited_actions()
            .iter()
            .map(|a| format!("<option value=\"{a}\">"))
            .collect::<String>()
    );
    body.push_str(&table(
        &[
            "seq", "time", "actor", "action", "resource", "decision", "policies",
        ],
        &rows,
    ));
    if let Some(last) = entries.last() {
        let mut next = format!("/audit?from={}&limit={limit}", last.seq + 1);
        for (k2, v) in [
            ("actor", &q.actor),
            ("action", &q.action),
            ("decision", &q.decision),
            ("resource", &q.resource),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                let _ = write!(next, "&{k2}={}", url_component(v));
            }
        }
        let _ = write!(body, "<p><a href=\"{}\">Next page</a>", esc(&next));
        if from > 0 {
            let _ = write!(body, " · <a href=\"/audit\">First page</a>");
        }
        body.push_str("</p>");
    }
    body.push_str(&button(&c, "/audit/verify", "Verify the whole chain"));
    body.push_str(" <a href=\"/audit/checkpoint\">Download a signed checkpoint</a>");
    ok(&c, "Audit log", &body)
}

fn url_component(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn audit_verify(State(k): S, h: HeaderMap, Form(f): Form<CsrfForm>) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let u = c.user.clone();
    let v = run(&k, &c, move |x| x.audit_verify(&u, None)).await?;
    let body = match v {
        cloister_host::audit::Verdict::Intact {
            size,
            root,
            checkpoints,
        } => format!(
            "<p class=\"ok\">Intact: {size} entries; Merkle root <code>{}</code>; {checkpoints} stored checkpoints match; the signed head verifies.</p>",
            hex::encode(root)
        ),
        cloister_host::audit::Verdict::Tampered { first_bad, reason } => format!(
            "<p class=\"error\">Tampered at entry {first_bad}: {}</p>",
            esc(&reason)
        ),
    };
    ok(
        &c,
        "Audit verification",
        &format!("{body}<p><a href=\"/audit\">Back to the log</a></p>"),
    )
}

async fn audit_checkpoint(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let cp = run(&k, &c, move |x| x.audit_checkpoint(&u)).await?;
    let mut r = (StatusCode::OK, cp.to_text()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"audit-checkpoint.txt\""),
    );
    Ok(r)
}

/// The disclosure report on a model's page: what an approver reads before
/// deciding (docs/disclosure.md).
fn disclosure_section(m: &cloister_host::models::ModelManifest) -> String {
    let Some(r) = &m.disclosure else {
        return "<h3>Disclosure check</h3><p class=\"error\">No report: this model was trained before disclosure checks existed and cannot be released. Retrain it.</p>".into();
    };
    let t = &r.thresholds;
    let fs = &r.features;
    let mi = &r.membership;
    let mut out = format!(
        "<h3>Disclosure check: <strong>{}</strong></h3><p>k = {}; checked in {:.2} s.</p>",
        esc(r.verdict.as_str()),
        t.k,
        r.seconds
    );
    if !r.findings.is_empty() {
        out.push_str("<ul>");
        for f in &r.findings {
            let _ = write!(out, "<li>{}</li>", esc(f));
        }
        out.push_str("</ul>");
    }
    let rows = vec![
        vec!["input rows used".into(), fs.supported.to_string()],
        vec![
            format!(
                "rows supported by fewer than {} records (zeroed for release)",
                t.k
            ),
            fs.disclosive.to_string(),
        ],
        vec![
            "test accuracy as trained / as released".into(),
            format!("{:.4} / {:.4}", fs.test_accuracy, fs.test_accuracy_pruned),
        ],
        vec![
            "membership inference: flagged".into(),
            (if r.membership_flagged { "yes" } else { "no" }).into(),
        ],
        vec![
            "membership inference: mean AUC (flag above)".into(),
            format!("{:.3} ({:.2})", mi.mean_auc, t.max_auc),
        ],
        vec![
            "repetitions significant at 0.05 (flag above)".into(),
            format!(
                "{:.0}% of {} ({:.0}%)",
                100.0 * mi.significant_share,
                mi.repetitions,
                100.0 * t.max_significant_share
            ),
        ],
        vec![
            "true-positive rate at FPR ≤ 1e-3 (fails above; chance)".into(),
            format!(
                "{:.4} ({:.2} and 3 × chance; {:.4})",
                mi.tpr_at_low_fpr, t.max_tpr_at_low_fpr, mi.chance_tpr_at_low_fpr
            ),
        ],
        vec![
            format!("classes with fewer than {} training records", t.k),
            esc(&r.small_classes.join(", ")),
        ],
        vec![
            "canary exposure, mean / max as trained; as released (of the maximum)".into(),
            r.canaries.as_ref().map_or_else(
                || "not measured (cloister model check-disclosure ID --canaries N)".into(),
                |c| {
                    format!(
                        "{:.2} / {:.2}; {:.2} / {:.2} (of {:.2}; {} canaries)",
                        c.mean_exposure,
                        c.max_exposure,
                        c.mean_exposure_released,
                        c.max_exposure_released,
                        c.max_possible,
                        c.planted
                    )
                },
            ),
        ],
        vec![
            "fitted vocabulary: terms, fewest records behind one".into(),
            r.vocabulary.map_or_else(
                || "– (the featurizer does not fit)".into(),
                |v| {
                    format!(
                        "{} terms counted over {} training records; the rarest in {} (at least {})",
                        v.terms, v.documents, v.min_records, t.k
                    )
                },
            ),
        ],
    ];
    out.push_str(&table(&["check", "result"], &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::form_pairs;

    #[test]
    fn form_pairs_keep_list_values_whole_and_name_a_bad_item() {
        let p = form_pairs("featurizer settings", "fields=a, b,c, width=3").expect("pairs");
        assert_eq!(p.get("fields").map(String::as_str), Some("a,b,c"));
        assert_eq!(p.get("width").map(String::as_str), Some("3"));
        assert!(form_pairs("settings", "").expect("empty").is_empty());
        let e = form_pairs("featurizer settings", "char_ngrams, bits=4").expect_err("bad");
        assert_eq!(
            e.to_string(),
            "featurizer settings: `char_ngrams` is not key=value"
        );
    }
}
