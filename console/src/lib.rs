//! # Cloister's web console
//!
//! Server-rendered HTML pages and a JSON API under `/api` (described by
//! `/api/openapi.json`), over the same [`Cloister`] façade — and so the same
//! single authorization point and audit log — as the command line. The
//! console adds only what a browser needs: password login with a session
//! cookie, CSRF protection, login backoff, security headers and background
//! tasks for long operations. It holds no logic of its own about who may do
//! what.
//!
//! - [`router`] builds the whole application (tests drive it without a
//!   port); [`serve`] binds it to an address.
//! - Every handler calls one `Cloister` method per operation, on a blocking
//!   thread. A denial is answered `403` with no detail (it is audited by the
//!   authorization point); no response carries a string a plugin chose,
//!   except plugin metadata shown for review, always HTML-escaped.

mod accounts;
mod api;
mod auth;
mod html;
mod openapi;
mod pages;
mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cloister_host::service::{Cloister, ServiceError};

pub use openapi::document as openapi_document;

/// Console settings.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Mark the session cookie `Secure` (set this behind TLS).
    pub secure_cookies: bool,
    /// How long a session lives without use.
    pub session_ttl: Duration,
    /// How long a session lives at most, however much it is used.
    pub session_max: Duration,
    /// A new login ends the user's older sessions.
    pub one_session_per_user: bool,
    /// Failed logins of one user name (or known device) before the backoff
    /// starts.
    pub free_failures: u32,
    /// Failed logins from one client address before its backoff starts.
    pub client_free_failures: u32,
    /// Keys the login throttle (and devices the console) keep at most.
    pub max_tracked: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            secure_cookies: false,
            session_ttl: Duration::from_secs(8 * 3600),
            session_max: Duration::from_secs(12 * 3600),
            one_session_per_user: true,
            free_failures: 3,
            client_free_failures: 20,
            max_tracked: 10_000,
        }
    }
}

/// The console: the environment and its settings. Sessions, known
/// devices, the login throttle and background tasks are kept in the
/// environment's store ([`cloister_host::console_state`]), so several
/// consoles (`serve` processes) over one environment act as one.
pub struct Console {
    c: Cloister,
    config: ConsoleConfig,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console over `c` (open it with channel `"console"`).
    pub fn new(c: Cloister, config: ConsoleConfig) -> Arc<Self> {
        Arc::new(Self { c, config })
    }

    /// How many keys the login throttle and the device table hold now
    /// (both bounded by `max_tracked`), for monitoring; a store failure
    /// is returned as is.
    pub fn tracked_logins(&self) -> Result<(usize, usize), cloister_host::store::StoreError> {
        let st = self.c.console_state();
        Ok((st.throttle_len()?, st.devices_len()?))
    }

    /// The environment.
    pub fn cloister(&self) -> &Cloister {
        &self.c
    }
}

/// Errors as the console answers them. Deliberately coarse: a denial says
/// only "forbidden", an internal failure only "internal error".
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("authentication required")]
    Unauthorized,
    #[error("forbidden")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("too many failed logins; try again in {0} s")]
    TooMany(u64),
    #[error("internal error")]
    Internal,
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use cloister_host::datasets::DatasetError;
        use cloister_host::jobs::JobError;
        use cloister_host::models::ModelError;
        use cloister_host::registry::RegistryError;
        match e {
            ServiceError::Denied { .. } | ServiceError::NoSuchOperation(_) => ApiError::Forbidden,
            ServiceError::Auth(_) => ApiError::Unauthorized,
            ServiceError::Dataset(
                DatasetError::Unknown(_) | DatasetError::UnknownRecord { .. },
            )
            | ServiceError::Registry(RegistryError::Unknown(_))
            | ServiceError::Model(ModelError::Unknown(_))
            | ServiceError::Job(JobError::Unknown(_)) => ApiError::NotFound(e.to_string()),
            ServiceError::Audit(_)
            | ServiceError::Env(_)
            | ServiceError::Store(_)
            | ServiceError::Policy(_)
            | ServiceError::Dataset(DatasetError::Store(_) | DatasetError::Damaged(_))
            | ServiceError::Model(ModelError::Store(_) | ModelError::File { .. })
            | ServiceError::Job(JobError::Store(_) | JobError::Damaged(_))
            | ServiceError::Fit(
                cloister_host::fitted::FitError::Store(_)
                | cloister_host::fitted::FitError::Damaged { .. }
                | cloister_host::fitted::FitError::Missing(_),
            ) => {
                tracing::error!(error = %e, "console request failed");
                ApiError::Internal
            }
            // A plugin's sealed failure: say where its reason is (the
            // administrators' plugin log), as the command line's hint does.
            ServiceError::Runtime(r) if r.reason_in_plugin_log() => ApiError::BadRequest(format!(
                "{r} (the plugin's own reason is in the administrators' plugin log, /plugin-log)"
            )),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status(),
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if let ApiError::TooMany(secs) = self
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// Runs `f` on a blocking thread (store and training calls block).
pub(crate) async fn blocking<T, F>(console: &Arc<Console>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Cloister) -> Result<T, ServiceError> + Send + 'static,
{
    let console = console.clone();
    tokio::task::spawn_blocking(move || f(&console.c))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(ApiError::from)
}

/// Security headers on every response; `no-store` everywhere (every page
/// may carry something sensitive).
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::CACHE_CONTROL, "no-store");
    set(
        h,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    r
}

/// The client's address, when the console is served over a socket (none
/// when a test drives the router directly).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub Option<std::net::IpAddr>);

/// Whether a request comes from another site: an `Origin` that is not this
/// host (or is `null`), or, without one, a browser's `Sec-Fetch-Site` other
/// than `same-origin` or `none`. Clients that send neither (the CLI, curl
/// with an API token) are not browsers and carry no ambient credentials.
fn cross_site(h: &axum::http::HeaderMap) -> bool {
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let fetch_site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if let Some(origin) = h.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if origin == "null" {
            // Browsers send `Origin: null` for form posts under our
            // `Referrer-Policy: no-referrer`; their `Sec-Fetch-Site` then
            // says where the request came from. Without it: refused.
            return fetch_site != Some("same-origin");
        }
        let authority = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        return match (authority, host) {
            (Some(a), Some(h)) => !a.eq_ignore_ascii_case(h),
            _ => true,
        };
    }
    fetch_site.is_some_and(|v| v != "same-origin" && v != "none")
}

/// Notes the client's address for the login throttle, and refuses (and
/// audits) every state-changing request that comes from another site —
/// the login form's included, so no site can log a browser into an
/// account of its choosing.
async fn request_guard(
    axum::extract::State(k): axum::extract::State<Arc<Console>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    req.extensions_mut().insert(ClientAddr(client));
    let safe = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !safe && cross_site(req.headers()) {
        if let Err(e) = k
            .refuse(
                "-",
                cloister_host::audit::events::CROSS_SITE_REQUEST,
                "cross-site",
            )
            .await
        {
            return e.into_response();
        }
        return ApiError::Forbidden.into_response();
    }
    next.run(req).await
}

/// The whole application.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(accounts::api_routes())
        .merge(pages::routes())
        .merge(accounts::page_routes())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&console),
            request_guard,
        ))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

/// Serves the console on `addr` until SIGINT (Ctrl-C) or SIGTERM: then it
/// takes no new connection, lets the requests in flight finish, and
/// returns, so that dropping the console writes what serving kept in
/// memory (metrics, answers kept for feedback, captured records).
pub async fn serve(console: Arc<Console>, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "console listening");
    axum::serve(
        listener,
        router(console).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        stop_signal().await;
        tracing::info!("stopping: finishing the requests in flight");
    })
    .await
}

/// Looks every `every` (at once first) for jobs whose driving process
/// ended ([`Cloister::orphaned_jobs`]) and takes each over on a thread of
/// its own ([`Cloister::take_over_job`]: one process of several gets it,
/// it runs with the authority of the user who started the job, and the
/// takeover is audited). The jobs' progress is in their stored state (the
/// job pages); the log says which job was taken over and how its run
/// ended, by id and state only. Runs until the runtime stops.
pub fn take_over_jobs(console: Arc<Console>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let k = Arc::clone(&console);
            let orphans = match tokio::task::spawn_blocking(move || k.c.orphaned_jobs()).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "looking for jobs to take over failed");
                    continue;
                }
                Err(_) => continue,
            };
            for orphan in orphans {
                let k = Arc::clone(&console);
                let spawned = std::thread::Builder::new()
                    .name("console-takeover".into())
                    .spawn(move || match k.c.take_over_job(&orphan, &mut |_| {}) {
                        Ok(Some(job)) => tracing::info!(
                            job = %job.id,
                            state = job.state.name(),
                            "a job whose process had ended was taken over and driven until it stopped"
                        ),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(
                            job = %orphan.id,
                            error = %e,
                            "a job taken over stopped"
                        ),
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "no thread to take over a job");
                }
            }
        }
    })
}

/// Resolves at the first SIGINT or SIGTERM this process receives (from
/// then on, those signals no longer end the process by themselves): how
/// `serve` and `cloister worker` stop gracefully.
pub async fn stop_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
