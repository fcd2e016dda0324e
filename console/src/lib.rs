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

mod api;
mod auth;
mod html;
mod openapi;
mod pages;
mod tasks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    /// Failed logins of one user name before the backoff starts.
    pub free_failures: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            secure_cookies: false,
            session_ttl: Duration::from_secs(8 * 3600),
            free_failures: 3,
        }
    }
}

/// The console's state: the environment and the browser sessions.
pub struct Console {
    c: Cloister,
    config: ConsoleConfig,
    sessions: Mutex<HashMap<String, auth::Session>>,
    failures: Mutex<HashMap<String, auth::Failures>>,
    tasks: tasks::Tasks,
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
        Arc::new(Self {
            c,
            config,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            tasks: tasks::Tasks::default(),
        })
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
            | ServiceError::Job(JobError::Store(_) | JobError::Damaged(_)) => {
                tracing::error!(error = %e, "console request failed");
                ApiError::Internal
            }
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

/// The whole application.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(pages::routes())
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

/// Serves the console on `addr` until the process ends.
pub async fn serve(console: Arc<Console>, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "console listening");
    axum::serve(listener, router(console)).await
}
