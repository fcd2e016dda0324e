//! Long operations (training, active-learning runs) started from the
//! console run on their own threads; their progress lines and result are
//! kept here, visible to the user who started them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::Console;

/// One background task.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Task {
    pub id: String,
    pub kind: &'static str,
    pub owner: String,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// Progress lines (host-written; never plugin text).
    pub lines: Vec<String>,
    /// Where the result is: a model or job id.
    pub result: Option<String>,
    pub error: Option<String>,
}

#[derive(Default)]
pub(crate) struct Tasks {
    map: Mutex<HashMap<String, Task>>,
}

impl Tasks {
    pub(crate) fn get(&self, id: &str) -> Option<Task> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Task)) {
        if let Some(t) = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            f(t);
        }
    }
}

/// Progress handle passed to a task's body.
pub(crate) struct Progress {
    console: Arc<Console>,
    id: String,
}

impl Progress {
    pub(crate) fn line(&self, line: String) {
        self.console.tasks.update(&self.id, |t| {
            if t.lines.len() >= 500 {
                t.lines.remove(0);
            }
            t.lines.push(line);
        });
    }
}

/// Starts `body` on its own thread; returns the task id.
pub(crate) fn spawn(
    console: &Arc<Console>,
    kind: &'static str,
    owner: &str,
    body: impl FnOnce(&Console, &Progress) -> Result<String, cloister_host::service::ServiceError>
    + Send
    + 'static,
) -> Result<String, crate::ApiError> {
    let mut raw = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| crate::ApiError::Internal)?;
    let id = format!("t-{}", hex::encode(raw));
    console
        .tasks
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id.clone(),
            Task {
                id: id.clone(),
                kind,
                owner: owner.to_string(),
                state: "running",
                lines: Vec::new(),
                result: None,
                error: None,
            },
        );
    let progress = Progress {
        console: console.clone(),
        id: id.clone(),
    };
    std::thread::Builder::new()
        .name(format!("console-{kind}"))
        .spawn(move || {
            let out = body(&progress.console, &progress);
            progress.console.tasks.update(&progress.id, |t| match out {
                Ok(result) => {
                    t.state = "done";
                    t.result = Some(result);
                }
                Err(e) => {
                    t.state = "failed";
                    t.error = Some(crate::ApiError::from(e).to_string());
                }
            });
        })
        .map_err(|_| crate::ApiError::Internal)?;
    Ok(id)
}
