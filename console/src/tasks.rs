//! Long operations (training, active-learning runs) started from the
//! console run on their own threads of the process that took the request;
//! their state, progress lines and result are kept in the store
//! ([`cloister_host::console_state`]), so their owner can follow them from
//! any `serve` process over the environment.

use std::sync::Arc;

use crate::{ApiError, Console};

/// One background task as its owner sees it.
pub(crate) use cloister_host::console_state::Task;

/// The task `id` if `user` owns it (store reads: run off the runtime).
pub(crate) async fn get(
    console: &Arc<Console>,
    id: String,
    user: &str,
) -> Result<Option<Task>, ApiError> {
    let k = Arc::clone(console);
    let found = tokio::task::spawn_blocking(move || k.c.console_state().task(&id))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| {
            tracing::error!(error = %e, "reading a console task failed");
            ApiError::Internal
        })?;
    Ok(found.filter(|t| t.owner == user))
}

/// Progress handle passed to a task's body.
pub(crate) struct Progress {
    console: Arc<Console>,
    id: String,
}

impl Progress {
    pub(crate) fn line(&self, line: String) {
        // A progress line that cannot be stored is lost, not fatal: the
        // task's end is what must land.
        if let Err(e) = self.console.c.console_state().task_line(&self.id, line) {
            tracing::warn!(error = %e, "a task's progress line was not stored");
        }
    }
}

/// Starts `body` on its own thread; returns the task id.
pub(crate) async fn spawn(
    console: &Arc<Console>,
    kind: &'static str,
    owner: &str,
    body: impl FnOnce(&Console, &Progress) -> Result<String, cloister_host::service::ServiceError>
    + Send
    + 'static,
) -> Result<String, ApiError> {
    let mut raw = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| ApiError::Internal)?;
    let id = format!("t-{}", hex::encode(raw));
    let (k, task, who) = (Arc::clone(console), id.clone(), owner.to_string());
    tokio::task::spawn_blocking(move || {
        k.c.console_state()
            .start_task(&task, kind, &who, cloister_host::console_state::now_ms())
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(|e| {
        tracing::error!(error = %e, "storing a console task failed");
        ApiError::Internal
    })?;
    let progress = Progress {
        console: console.clone(),
        id: id.clone(),
    };
    std::thread::Builder::new()
        .name(format!("console-{kind}"))
        .spawn(move || {
            let out = body(&progress.console, &progress).map_err(|e| ApiError::from(e).to_string());
            if let Err(e) = progress
                .console
                .c
                .console_state()
                .finish_task(&progress.id, out)
            {
                tracing::error!(error = %e, "a task's end was not stored");
            }
        })
        .map_err(|_| ApiError::Internal)?;
    Ok(id)
}
