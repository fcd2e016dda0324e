//! The JSON API under `/api`. Each route is one `Cloister` call; the
//! OpenAPI document (`openapi.rs`) lists the same routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use cloister_host::audit::{AuditFilter, Decision, Verdict};
use cloister_host::jobs::Oracle;
use cloister_host::service::TrainRequest;

use crate::auth::Caller;
use crate::{ApiError, Console, blocking, tasks};

type S = State<Arc<Console>>;
pub(crate) type Out = Result<Response, ApiError>;

/// A JSON response, serialized straight to bytes.
pub(crate) fn to_json(v: impl serde::Serialize) -> Out {
    let body = serde_json::to_vec(&v).map_err(|_| ApiError::Internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// The caller of a read.
pub(crate) async fn reader(k: &Arc<Console>, h: &HeaderMap) -> Result<Caller, ApiError> {
    k.caller(h).await
}

/// The caller of a write: a session must present its CSRF token.
pub(crate) async fn writer(k: &Arc<Console>, h: &HeaderMap) -> Result<Caller, ApiError> {
    let c = k.caller(h).await?;
    k.check_csrf(&c, h, None).await?;
    Ok(c)
}

pub(crate) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/datasets", get(datasets))
        .route("/api/datasets/{name}", get(dataset))
        .route("/api/datasets/{name}/export", get(export_dataset))
        .route(
            "/api/plugins",
            get(plugins)
                .post(add_plugin)
                .layer(DefaultBodyLimit::max(32 << 20)),
        )
        .route("/api/plugins/{digest}/approve", post(approve_plugin))
        .route("/api/plugins/{digest}/withdraw", post(withdraw_approval))
        .route("/api/templates", get(templates))
        .route("/api/train", post(train))
        .route("/api/tasks/{id}", get(task))
        .route("/api/jobs", get(jobs).post(start_job))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/stats", get(job_stats))
        .route("/api/jobs/{id}/resume", post(resume_job))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/reassign", post(reassign_labels))
        .route("/api/models", get(models))
        .route("/api/models/{id}", get(model))
        .route("/api/models/{id}/request-release", post(request_release))
        .route("/api/models/{id}/approve-release", post(approve_release))
        .route("/api/models/{id}/reject-release", post(reject_release))
        .route("/api/models/{id}/bundle", get(bundle))
        .route("/api/labels/next", get(next_label))
        .route("/api/labels", post(set_label))
        .route("/api/labels/answers", get(changeable_answers))
        .route("/api/labels/change", post(change_label))
        .route("/api/audit", get(audit))
        .route("/api/audit/verify", get(audit_verify))
        .route("/api/audit/checkpoint", get(audit_checkpoint))
        .route("/api/plugin-log", get(plugin_log))
        .route("/api/deployments", get(deployments).post(create_deployment))
        .route("/api/deployments/{name}", get(deployment))
        .route("/api/deployments/{name}/change", post(change_deployment))
        .route("/api/deployments/{name}/predict", post(predict_deployed))
        .route("/api/deployments/{name}/feedback", post(send_feedback))
        .route("/api/deployments/{name}/test", post(test_candidate))
        .route("/api/deployments/{name}/capture", post(write_capture))
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

#[derive(Deserialize)]
pub(crate) struct LoginBody {
    pub user: String,
    pub password: String,
}

async fn login(
    State(k): S,
    Extension(client): Extension<crate::ClientAddr>,
    h: HeaderMap,
    Json(b): Json<LoginBody>,
) -> Result<Response, ApiError> {
    let done = k.login(b.user, b.password, &h, client.0).await?;
    let mut r = Json(json!({"user": done.user.name, "roles": done.user.roles, "csrf": done.csrf}))
        .into_response();
    for cookie in &done.cookies {
        r.headers_mut().append(
            header::SET_COOKIE,
            HeaderValue::from_str(cookie).map_err(|_| ApiError::Internal)?,
        );
    }
    Ok(r)
}

async fn logout(State(k): S, h: HeaderMap) -> Result<Response, ApiError> {
    writer(&k, &h).await?;
    let cookie = k.logout(&h).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| ApiError::Internal)?,
    );
    Ok(r)
}

async fn me(State(k): S, h: HeaderMap) -> Out {
    let c = reader(&k, &h).await?;
    to_json(json!({"user": c.user.name, "roles": c.user.roles, "csrf": c.csrf}))
}

async fn datasets(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(k.c.list_datasets_async(&u).await?)
}

#[derive(Deserialize)]
struct SeedQuery {
    seed: Option<u64>,
}

async fn dataset(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<SeedQuery>,
) -> Out {
    let u = reader(&k, &h).await?.user;
    let (v, splits) = blocking(&k, move |c| c.dataset_stats(&u, &name, q.seed)).await?;
    to_json(json!({"version": v, "splits": splits}))
}

/// Export-shaped: always denied (and audited) by the authorization point.
async fn export_dataset(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Out {
    let u = reader(&k, &h).await?.user;
    blocking(&k, move |c| c.export_dataset(&u, &name)).await?;
    Err(ApiError::Forbidden)
}

async fn plugins(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.list_plugins(&u)).await?)
}

async fn add_plugin(State(k): S, h: HeaderMap, body: Bytes) -> Out {
    let u = writer(&k, &h).await?.user;
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "send the component's bytes as the request body".into(),
        ));
    }
    to_json(blocking(&k, move |c| c.add_plugin(&u, &body)).await?)
}

async fn approve_plugin(State(k): S, h: HeaderMap, Path(d): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.approve_plugin(&u, &d)).await?)
}

async fn withdraw_approval(State(k): S, h: HeaderMap, Path(d): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.withdraw_approval(&u, &d)).await?)
}

async fn templates(State(k): S, h: HeaderMap) -> Out {
    reader(&k, &h).await?;
    let t = cloister_host::train::templates().map_err(|_| ApiError::Internal)?;
    to_json(t)
}

#[derive(Deserialize)]
pub(crate) struct TrainBody {
    pub dataset: String,
    #[serde(default)]
    pub preprocess: Vec<String>,
    /// Each preprocessor's configuration over its defaults, by position.
    #[serde(default)]
    pub preprocess_config: Vec<BTreeMap<String, String>>,
    pub features: String,
    /// The featurizer's configuration over its defaults.
    #[serde(default)]
    pub features_config: BTreeMap<String, String>,
    pub template: String,
    #[serde(default)]
    pub sets: BTreeMap<String, String>,
}

pub(crate) async fn start_training(
    k: &Arc<Console>,
    owner: &cloister_host::users::User,
    b: TrainBody,
) -> Result<String, ApiError> {
    let req = TrainRequest {
        dataset: b.dataset,
        preprocess: b.preprocess,
        preprocess_config: b
            .preprocess_config
            .into_iter()
            .map(|c| c.into_iter().collect())
            .collect(),
        features: b.features,
        features_config: b.features_config.into_iter().collect(),
        template: b.template,
        sets: b.sets.into_iter().collect(),
        split_seed: None,
    };
    // Authorized, audited and checked now, so a bad request is refused at
    // once; only the work runs in the background.
    let who = owner.clone();
    let plan = blocking(k, move |c| c.plan_training(&who, &req)).await?;
    tasks::spawn(k, "train", &owner.name, move |console, p| {
        let m = console.cloister().run_training(plan, &mut |e| match e {
            cloister_host::service::TrainProgress::Stage(s) => p.line(s.to_string()),
            cloister_host::service::TrainProgress::Epoch(e, max) => p.line(format!(
                "epoch {}/{max}: val accuracy {:.4}",
                e.epoch, e.val_accuracy
            )),
        })?;
        Ok(m.id)
    })
    .await
}

async fn train(State(k): S, h: HeaderMap, Json(b): Json<TrainBody>) -> Out {
    let u = writer(&k, &h).await?.user;
    let id = start_training(&k, &u, b).await?;
    to_json(json!({ "task": id }))
}

async fn task(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = reader(&k, &h).await?.user;
    match tasks::get(&k, id.clone(), &u.name).await? {
        Some(t) => to_json(t),
        None => Err(ApiError::NotFound(format!("no task {id}"))),
    }
}

async fn jobs(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.list_jobs(&u)).await?)
}

#[derive(Deserialize)]
pub(crate) struct JobBody {
    pub spec: String,
    #[serde(default)]
    pub oracle: Option<String>,
}

pub(crate) async fn run_in_background(
    k: &Arc<Console>,
    owner: &cloister_host::users::User,
    id: String,
) -> Result<String, ApiError> {
    let who = owner.clone();
    tasks::spawn(k, "job", &owner.name, move |console, p| {
        let job = console.cloister().run_job(&who, &id, &mut |e| {
            if let Some(line) = crate::html::job_event_line(&e) {
                p.line(line);
            }
        })?;
        Ok(job.id)
    })
    .await
}

pub(crate) async fn create_job(
    k: &Arc<Console>,
    u: cloister_host::users::User,
    b: JobBody,
) -> Result<(String, String), ApiError> {
    let oracle = match b.oracle.as_deref() {
        None | Some("") | Some("none") => None,
        Some("gold") => Some(Oracle::Gold),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "oracle: unknown `{other}` (the only one is `gold`)"
            )));
        }
    };
    let who = u.clone();
    let job = blocking(k, move |c| {
        c.start_job(&who, "console.toml", &b.spec, oracle)
    })
    .await?;
    let task = run_in_background(k, &u, job.id.clone()).await?;
    Ok((job.id, task))
}

async fn start_job(State(k): S, h: HeaderMap, Json(b): Json<JobBody>) -> Out {
    let u = writer(&k, &h).await?.user;
    let (job, task) = create_job(&k, u, b).await?;
    to_json(json!({"job": job, "task": task}))
}

async fn job(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.show_job(&u, &id)).await?)
}

async fn job_stats(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.job_stats(&u, &id)).await?)
}

async fn resume_job(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    // Authorize (and audit) now, so a denial is answered at once.
    let who = u.clone();
    let jid = id.clone();
    blocking(&k, move |c| c.show_job(&who, &jid)).await?;
    let task = run_in_background(&k, &u, id).await?;
    to_json(json!({ "task": task }))
}

async fn cancel_job(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.cancel_job(&u, &id)).await?)
}

#[derive(Deserialize)]
pub(crate) struct ReassignBody {
    pub from: String,
    pub to: String,
}

async fn reassign_labels(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<ReassignBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    let (job, moved) = blocking(&k, move |c| c.reassign_labels(&u, &id, &b.from, &b.to)).await?;
    to_json(json!({ "moved": moved, "labelers": job.labelers(), "job": job }))
}

async fn models(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.list_models(&u)).await?)
}

async fn model(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.model_detail(&u, &id)).await?)
}

async fn deployments(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.list_deployments(&u)).await?)
}

#[derive(Deserialize)]
struct CreateDeploymentBody {
    name: String,
    model: String,
    #[serde(default)]
    clients: Vec<String>,
}

async fn create_deployment(State(k): S, h: HeaderMap, Json(b): Json<CreateDeploymentBody>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(
        blocking(&k, move |c| {
            c.create_deployment(&u, &b.name, &b.model, &b.clients)
        })
        .await?,
    )
}

/// A routing change, as `cloister deploy …` makes them (weights and
/// samples in basis points).
#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
enum ChangeBody {
    SetWeight {
        model: String,
        weight: u32,
    },
    Remove {
        model: String,
    },
    Shadow {
        model: Option<String>,
        #[serde(default)]
        sample: u32,
    },
    Promote {
        model: String,
    },
    Rollback,
    Pause,
    Resume,
    Clients {
        clients: Vec<String>,
    },
    Ramp {
        model: String,
        steps: Vec<u32>,
        bake_ms: u64,
        guards: cloister_host::deployments::Guards,
    },
    StopRamp,
    Capture {
        /// The dataset; absent stops capturing.
        dataset: Option<String>,
        #[serde(default)]
        sample: u32,
        #[serde(default = "default_batch")]
        batch: u32,
    },
    KeepAnswers {
        count: u64,
    },
}

fn default_batch() -> u32 {
    1000
}

impl From<ChangeBody> for cloister_host::service::DeploymentChange {
    fn from(b: ChangeBody) -> Self {
        use cloister_host::service::DeploymentChange as C;
        match b {
            ChangeBody::SetWeight { model, weight } => C::SetWeight { model, weight },
            ChangeBody::Remove { model } => C::RemoveCandidate(model),
            ChangeBody::Shadow { model, sample } => {
                C::Shadow(model.map(|model| cloister_host::deployments::Shadow { model, sample }))
            }
            ChangeBody::Promote { model } => C::Promote(model),
            ChangeBody::Rollback => C::Rollback,
            ChangeBody::Pause => C::Pause,
            ChangeBody::Resume => C::Resume,
            ChangeBody::Clients { clients } => C::Clients(clients),
            ChangeBody::Ramp {
                model,
                steps,
                bake_ms,
                guards,
            } => C::Ramp {
                model,
                steps,
                bake_ms,
                guards,
            },
            ChangeBody::StopRamp => C::StopRamp,
            ChangeBody::Capture {
                dataset,
                sample,
                batch,
            } => C::Capture(dataset.map(|dataset| cloister_host::service::CaptureSpec {
                dataset,
                sample,
                batch,
            })),
            ChangeBody::KeepAnswers { count } => C::KeepAnswers(count),
        }
    }
}

async fn change_deployment(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<ChangeBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.change_deployment(&u, &name, b.into())).await?)
}

#[derive(Deserialize)]
struct WindowQuery {
    /// Metrics over the last this many minutes (default 60).
    minutes: Option<u64>,
}

async fn deployment(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<WindowQuery>,
) -> Out {
    let u = reader(&k, &h).await?.user;
    let minutes = q.minutes.unwrap_or(60).min(60 * 24 * 366);
    let since = cloister_host::time::now_ms().saturating_sub(minutes * 60_000);
    to_json(blocking(&k, move |c| c.deployment_status(&u, &name, since)).await?)
}

#[derive(Deserialize)]
struct PredictBody {
    /// Routes the request: the same key, the same variant (default: the
    /// caller's account).
    key: Option<String>,
    /// Records, each as one line of a JSONL dataset file would be.
    records: Vec<Value>,
}

async fn predict_deployed(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<PredictBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    if b.records.len() > cloister_host::service::MAX_PREDICT_RECORDS {
        return Err(ApiError::BadRequest(format!(
            "a prediction request carries at most {} records",
            cloister_host::service::MAX_PREDICT_RECORDS
        )));
    }
    // The records are read as the lines of a JSONL file would be, so a bad
    // one is named by its place ("request body:3").
    let mut lines = Vec::new();
    for r in &b.records {
        serde_json::to_writer(&mut lines, r).map_err(|_| ApiError::Internal)?;
        lines.push(b'\n');
    }
    let records = cloister_host::records::JsonlReader::new(
        "request body",
        std::io::Cursor::new(lines),
        cloister_host::records::Schema::default(),
    )
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    to_json(
        blocking(&k, move |c| {
            c.predict_deployed(&u, &name, b.key.as_deref(), &records)
        })
        .await?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    /// True labels: `{"id", "label"}` for records predicted before.
    labels: Vec<cloister_host::service::Feedback>,
}

async fn send_feedback(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<FeedbackBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    if b.labels.len() > cloister_host::service::MAX_FEEDBACK {
        return Err(ApiError::BadRequest(format!(
            "a feedback request carries at most {} labels",
            cloister_host::service::MAX_FEEDBACK
        )));
    }
    to_json(blocking(&k, move |c| c.send_feedback(&u, &name, &b.labels)).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestBody {
    candidate: String,
    /// A labeled dataset (`NAME` or `NAME@VERSION`) instead of the capture
    /// dataset's newest versions.
    dataset: Option<String>,
}

async fn test_candidate(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<TestBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(
        blocking(&k, move |c| {
            c.test_candidate(&u, &name, &b.candidate, b.dataset.as_deref())
        })
        .await?,
    )
}

async fn write_capture(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.write_capture(&u, &name)).await?)
}

#[derive(Deserialize)]
struct ReasonBody {
    reason: String,
}

async fn request_release(
    State(k): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<ReasonBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.request_release(&u, &id, &b.reason)).await?)
}

async fn approve_release(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.decide_release(&u, &id, true)).await?)
}

async fn reject_release(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.decide_release(&u, &id, false)).await?)
}

pub(crate) async fn bundle_response(
    k: &Arc<Console>,
    u: cloister_host::users::User,
    id: String,
) -> Result<Response, ApiError> {
    let name = format!("{id}.bundle");
    let bytes = blocking(k, move |c| c.export_model(&u, &id)).await?;
    let mut r = bytes.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

async fn bundle(State(k): S, h: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let u = reader(&k, &h).await?.user;
    bundle_response(&k, u, id).await
}

async fn next_label(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    let next = blocking(&k, move |c| c.next_label_item(&u)).await?;
    to_json(match next {
        None => json!({ "item": null }),
        Some(task) => {
            let texts: BTreeMap<String, String> = task
                .record
                .record
                .texts
                .iter()
                .map(|t| (t.name.clone(), t.value.clone()))
                .collect();
            json!({"item": task.item, "texts": texts, "waiting": task.waiting, "classes": task.classes})
        }
    })
}

#[derive(Deserialize)]
pub(crate) struct LabelBody {
    pub id: String,
    pub label: String,
    #[serde(default)]
    pub job: Option<String>,
}

async fn set_label(State(k): S, h: HeaderMap, Json(b): Json<LabelBody>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(
        blocking(&k, move |c| {
            c.label_item(&u, &b.id, &b.label, b.job.as_deref())
        })
        .await?,
    )
}

async fn changeable_answers(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    to_json(blocking(&k, move |c| c.changeable_answers(&u)).await?)
}

async fn change_label(State(k): S, h: HeaderMap, Json(b): Json<LabelBody>) -> Out {
    let u = writer(&k, &h).await?.user;
    to_json(
        blocking(&k, move |c| {
            c.change_label_item(&u, &b.id, &b.label, b.job.as_deref())
        })
        .await?,
    )
}

#[derive(Deserialize, Default)]
pub(crate) struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub decision: Option<String>,
    pub resource: Option<String>,
    pub from: Option<u64>,
    pub limit: Option<usize>,
}

impl AuditQuery {
    pub(crate) fn filter(&self) -> Result<AuditFilter, ApiError> {
        let decision = match self.decision.as_deref() {
            None | Some("") => None,
            Some("allow") => Some(Decision::Allow),
            Some("deny") => Some(Decision::Deny),
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "decision: `{other}` is neither allow nor deny"
                )));
            }
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|v| !v.is_empty());
        Ok(AuditFilter {
            actor: nonempty(&self.actor),
            action: nonempty(&self.action),
            since_ms: None,
            decision,
            resource: nonempty(&self.resource)
                .map(|r| cloister_host::policy::uid_of(&r))
                .transpose()
                .map_err(ApiError::BadRequest)?,
            from_seq: self.from.unwrap_or(0),
            limit: self.limit.unwrap_or(50).clamp(1, 1000),
        })
    }
}

async fn audit(State(k): S, h: HeaderMap, Query(q): Query<AuditQuery>) -> Out {
    let u = reader(&k, &h).await?.user;
    let f = q.filter()?;
    to_json(blocking(&k, move |c| c.audit_log(&u, &f)).await?)
}

#[derive(Deserialize)]
pub(crate) struct PluginLogQuery {
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn plugin_log(State(k): S, h: HeaderMap, Query(q): Query<PluginLogQuery>) -> Out {
    let u = reader(&k, &h).await?.user;
    let limit = q.limit.unwrap_or(50).min(1000);
    to_json(blocking(&k, move |c| c.plugin_log(&u, q.digest.as_deref(), limit)).await?)
}

async fn audit_verify(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    let v = blocking(&k, move |c| c.audit_verify(&u, None)).await?;
    to_json(match v {
        Verdict::Intact {
            size,
            root,
            checkpoints,
        } => {
            json!({"intact": true, "size": size, "root": hex::encode(root), "checkpoints": checkpoints})
        }
        Verdict::Tampered { first_bad, reason } => {
            json!({"intact": false, "first_bad": first_bad, "reason": reason})
        }
    })
}

async fn audit_checkpoint(State(k): S, h: HeaderMap) -> Result<Response, ApiError> {
    let u = reader(&k, &h).await?.user;
    let cp = blocking(&k, move |c| c.audit_checkpoint(&u)).await?;
    let mut r = cp.to_text().into_response();
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
