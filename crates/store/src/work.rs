//! The work queue: tasks that `cloister worker` processes claim from the
//! environment's PostgreSQL database (table `cloister_work`, migration 2).
//!
//! A task names its input by content (the SHA-256 of an object in the
//! object store) and carries a tag the submitter computed over it; the
//! queue stores both as given and knows nothing of what they mean. The
//! life of a task:
//!
//! - [`WorkQueue::submit`] inserts it `queued`, with a limit on attempts.
//! - [`WorkQueue::claim`] hands the oldest claimable task to one worker:
//!   one `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)`, so
//!   concurrent workers never get the same task and never wait on each
//!   other. Claimable: `queued`, or `running` with its lease run out (the
//!   worker died or lost the database) and attempts left. Each claim counts
//!   an attempt and sets a lease of the database's clock.
//! - [`WorkQueue::renew`] extends the lease (the worker's heartbeat); it
//!   answers `false` once the task is no longer this worker's.
//! - [`WorkQueue::finish`] / [`WorkQueue::fail`] record the outcome, again
//!   only for the worker that holds the task.
//! - The submitter polls [`WorkQueue::state`], takes the result, and
//!   [`WorkQueue::remove`]s the row; [`WorkQueue::give_up`] ends a task whose
//!   attempts are spent.
//!
//! Times are the database server's (`now()`), so workers on machines with
//! different clocks agree on when a lease ran out.
//!
//! Objects that several tasks share (the features of a fit, a fitted
//! vocabulary) are not a task's to delete. Whoever sends one first says
//! how long it is needed ([`WorkQueue::keep`], table
//! `cloister_work_objects`, migration 4), before it writes the object, and
//! says it again while it waits; [`WorkQueue::collect`] deletes the
//! objects no one has asked to keep past now, and the rows and objects of
//! tasks their submitter abandoned (it died before it took the outcome).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::pg_backend::{connect, current_version, describe};
use super::{PgUrl, StoreError, schema_version};

/// A task as a worker claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The queue's id.
    pub id: i64,
    /// What kind of work (`fit`, …), as submitted.
    pub kind: String,
    /// The input's digest, as submitted.
    pub input: String,
    /// The submitter's tag, as submitted.
    pub tag: Vec<u8>,
    /// Which attempt this claim is (1 for the first).
    pub attempts: i32,
}

/// Where a task stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting for a worker.
    Queued,
    /// Claimed by `owner`; `expired` when its lease ran out.
    Running {
        /// The worker's name.
        owner: String,
        /// Attempts so far.
        attempts: i32,
        /// Attempts allowed.
        max_attempts: i32,
        /// Whether the lease has run out.
        expired: bool,
        /// What the worker last reported of its progress (see
        /// [`WorkQueue::report`]), as it wrote it.
        progress: Option<String>,
    },
    /// Finished by `owner` with the result's digest and tag.
    Done {
        /// The worker's name.
        owner: String,
        /// The result's digest.
        result: String,
        /// The worker's tag over it.
        result_tag: Vec<u8>,
    },
    /// Ended without a result.
    Failed {
        /// The worker that last held it (empty if none did).
        owner: String,
        /// Why, as the worker or the submitter said.
        error: String,
    },
    /// No such task (removed, or never submitted).
    Missing,
}

/// What one [`WorkQueue::collect`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Shared objects whose keep time had passed.
    pub objects: usize,
    /// Abandoned task rows (their task and result objects with them).
    pub tasks: usize,
    /// Rows of either kind that the sweep did not trust (not written with
    /// the environment's key): removed, and nothing they named deleted.
    pub untagged: usize,
}

/// What [`WorkQueue::collect`] offers to be deleted, as the rows hold it
/// (written by whoever could write the table: check the tags).
#[derive(Debug, Clone, Copy)]
pub enum Due<'a> {
    /// A shared object whose keep time has passed.
    Object {
        /// Its digest.
        digest: &'a str,
        /// The tag `keep` was given.
        tag: &'a [u8],
    },
    /// A task its submitter abandoned.
    Task {
        /// Its kind.
        kind: &'a str,
        /// Its input's digest.
        input: &'a str,
        /// The submitter's tag.
        tag: &'a [u8],
        /// Its result's digest, if a worker finished it.
        result: Option<&'a str>,
        /// The worker's tag over the result.
        result_tag: Option<&'a [u8]>,
    },
}

/// The most rows one [`WorkQueue::collect`] removes of each kind: a
/// backlog is worked off over several calls.
const COLLECT_BATCH: i64 = 1000;

/// A connection to the work queue of one environment's database.
pub struct WorkQueue {
    rt: Option<tokio::runtime::Runtime>,
    url: PgUrl,
    client: std::sync::Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkQueue({})", self.url)
    }
}

impl Drop for WorkQueue {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn queue_err(url: &PgUrl) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
    move |e| StoreError::Engine(format!("work queue at {url}: {}", describe(&e)))
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64().max(1.0)
}

impl WorkQueue {
    /// Connects to the database at `url`, whose schema must be this
    /// build's (the queue's table comes with migration 2).
    pub fn connect(url: &PgUrl) -> Result<Self, StoreError> {
        let q = Self {
            rt: Some(super::client_runtime("cloister-work", 1)?),
            url: url.clone(),
            client: std::sync::Mutex::new(None),
        };
        let url = q.url.clone();
        q.run(move |c| async move {
            let have = current_version(&c, &url).await?;
            if have != schema_version() {
                return Err(StoreError::Engine(format!(
                    "the store at {url} has schema version {have}, this build needs {}; run `cloister migrate`",
                    schema_version()
                )));
            }
            Ok(())
        })?;
        Ok(q)
    }

    /// The connection, opened again if the last one was lost.
    fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().map_err(|_| {
            StoreError::Engine("the work queue's connection lock was poisoned".into())
        })?;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Engine("the work queue's client stopped".into()))?;
        let url = self.url.clone();
        let c = Arc::new(super::wait_on(rt, async move { connect(&url).await })?);
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    fn run<T, F>(&self, f: impl FnOnce(Arc<Client>) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let client = self.client()?;
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Engine("the work queue's client stopped".into()))?;
        super::wait_on(rt, f(client))
    }

    /// Queues a task; returns its id.
    pub fn submit(
        &self,
        kind: &str,
        input: &str,
        tag: &[u8],
        max_attempts: i32,
    ) -> Result<i64, StoreError> {
        let (kind, input, tag) = (kind.to_string(), input.to_string(), tag.to_vec());
        let url = self.url.clone();
        self.run(move |c| async move {
            let row = c
                .query_one(
                    "INSERT INTO cloister_work (kind, input, tag, state, max_attempts)
                     VALUES ($1, $2, $3, 'queued', $4) RETURNING id",
                    &[&kind, &input, &tag, &max_attempts.max(1)],
                )
                .await
                .map_err(queue_err(&url))?;
            Ok(row.get(0))
        })
    }

    /// Claims the oldest claimable task for `owner` with a lease of `lease`
    /// (at least a second), or `None` when there is none.
    pub fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Task>, StoreError> {
        let owner = owner.to_string();
        let url = self.url.clone();
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "UPDATE cloister_work
                        SET state = 'running', owner = $1, attempts = attempts + 1,
                            lease_until = now() + make_interval(secs => $2),
                            progress = NULL
                      WHERE id = (
                            SELECT id FROM cloister_work
                             WHERE (state = 'queued'
                                    OR (state = 'running' AND lease_until < now()))
                               AND attempts < max_attempts
                             ORDER BY id
                             FOR UPDATE SKIP LOCKED
                             LIMIT 1)
                  RETURNING id, kind, input, tag, attempts",
                    &[&owner, &seconds(lease)],
                )
                .await
                .map_err(queue_err(&url))?;
            Ok(row.map(|r| Task {
                id: r.get(0),
                kind: r.get(1),
                input: r.get(2),
                tag: r.get(3),
                attempts: r.get(4),
            }))
        })
    }

    /// Extends `owner`'s lease on task `id` to `lease` from now; `false`
    /// when the task is no longer running under `owner`.
    pub fn renew(&self, id: i64, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let owner = owner.to_string();
        let url = self.url.clone();
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE cloister_work SET lease_until = now() + make_interval(secs => $3)
                      WHERE id = $1 AND owner = $2 AND state = 'running'",
                    &[&id, &owner, &seconds(lease)],
                )
                .await
                .map_err(queue_err(&url))?;
            Ok(n == 1)
        })
    }

    /// Records what `owner` reports of its progress on task `id` (the
    /// worker's own text, tagged by it: the queue does not read it);
    /// `false` when the task is no longer running under `owner`.
    pub fn report(&self, id: i64, owner: &str, progress: &str) -> Result<bool, StoreError> {
        let (owner, progress) = (owner.to_string(), progress.to_string());
        let url = self.url.clone();
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE cloister_work SET progress = $3
                      WHERE id = $1 AND owner = $2 AND state = 'running'",
                    &[&id, &owner, &progress],
                )
                .await
                .map_err(queue_err(&url))?;
            Ok(n == 1)
        })
    }

    /// Records `owner`'s result for task `id`; `false` (nothing recorded)
    /// when the task is no longer running under `owner`.
    pub fn finish(
        &self,
        id: i64,
        owner: &str,
        result: &str,
        result_tag: &[u8],
    ) -> Result<bool, StoreError> {
        let (owner, result, tag) = (owner.to_string(), result.to_string(), result_tag.to_vec());
        let url = self.url.clone();
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE cloister_work
                        SET state = 'done', result = $3, result_tag = $4, finished = now()
                      WHERE id = $1 AND owner = $2 AND state = 'running'",
                    &[&id, &owner, &result, &tag],
                )
                .await
                .map_err(queue_err(&url))?;
            Ok(n == 1)
        })
    }

    /// Records that task `id` failed under `owner` in a way another attempt
    /// would repeat; `false` when it is no longer `owner`'s.
    pub fn fail(&self, id: i64, owner: &str, error: &str) -> Result<bool, StoreError> {
        let (owner, error) = (owner.to_string(), error.to_string());
        let url = self.url.clone();
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE cloister_work SET state = 'failed', error = $3, finished = now()
                      WHERE id = $1 AND owner = $2 AND state = 'running'",
                    &[&id, &owner, &error],
                )
                .await
                .map_err(queue_err(&url))?;
            Ok(n == 1)
        })
    }

    /// Ends task `id` as failed, whoever holds it (the submitter giving
    /// up: attempts spent, or no worker came).
    pub fn give_up(&self, id: i64, error: &str) -> Result<(), StoreError> {
        let error = error.to_string();
        let url = self.url.clone();
        self.run(move |c| async move {
            c.execute(
                "UPDATE cloister_work SET state = 'failed', error = $2, finished = now()
                  WHERE id = $1 AND state IN ('queued', 'running')",
                &[&id, &error],
            )
            .await
            .map_err(queue_err(&url))?;
            Ok(())
        })
    }

    /// Where task `id` stands.
    pub fn state(&self, id: i64) -> Result<TaskState, StoreError> {
        let url = self.url.clone();
        self.run(move |c| async move {
            let Some(r) = c
                .query_opt(
                    "SELECT state, owner, attempts, max_attempts, lease_until < now(),
                            result, result_tag, error, progress
                       FROM cloister_work WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(queue_err(&url))?
            else {
                return Ok(TaskState::Missing);
            };
            let state: String = r.get(0);
            let owner = || r.get::<_, Option<String>>(1).unwrap_or_default();
            Ok(match state.as_str() {
                "queued" => TaskState::Queued,
                "running" => TaskState::Running {
                    owner: owner(),
                    attempts: r.get(2),
                    max_attempts: r.get(3),
                    expired: r.get::<_, Option<bool>>(4).unwrap_or(true),
                    progress: r.get::<_, Option<String>>(8),
                },
                "done" => TaskState::Done {
                    owner: owner(),
                    result: r.get::<_, Option<String>>(5).unwrap_or_default(),
                    result_tag: r.get::<_, Option<Vec<u8>>>(6).unwrap_or_default(),
                },
                _ => TaskState::Failed {
                    owner: owner(),
                    error: r
                        .get::<_, Option<String>>(7)
                        .unwrap_or_else(|| "no reason recorded".into()),
                },
            })
        })
    }

    /// Records that object `digest` is needed for `period` from now (or
    /// longer, if someone asked for longer), with the submitter's `tag`
    /// over the digest (which the collector checks before it deletes
    /// anything: a row written without the key names no object to
    /// delete). Call it before the object is written, and again before the
    /// period runs out for as long as it is needed:
    /// [`WorkQueue::collect`] offers only objects whose period has passed,
    /// and a `keep` that waits while a collector holds the row finds the
    /// row gone afterwards and must write the object again.
    pub fn keep(&self, digest: &str, tag: &[u8], period: Duration) -> Result<(), StoreError> {
        let (digest, tag) = (digest.to_string(), tag.to_vec());
        let url = self.url.clone();
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO cloister_work_objects (digest, tag, keep_until)
                 VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (digest) DO UPDATE
                    SET tag = EXCLUDED.tag,
                        keep_until = greatest(cloister_work_objects.keep_until,
                                              EXCLUDED.keep_until)",
                &[&digest, &tag, &seconds(period)],
            )
            .await
            .map_err(queue_err(&url))?;
            Ok(())
        })
    }

    /// Offers to `sweep` every shared object whose keep time has passed
    /// ([`WorkQueue::keep`]), then every task its submitter abandoned: a
    /// row untouched for `abandoned` (queued since, its lease out since,
    /// or ended since, and its outcome never taken). `sweep` deletes what
    /// it trusts of each (checking the tags) and says whether it trusted
    /// the row; the row goes once it returns `Ok`, in the same
    /// transaction, and stays for a later call if it fails. An object's row stays locked while `sweep` deletes the
    /// object, so a `keep` of the same digest waits for the deletion and
    /// then asks anew. At most a thousand rows of each kind per call.
    ///
    /// Runs on a connection of its own, opened for the call, so that its
    /// transactions do not mix with the statements of a lease's heartbeat.
    pub fn collect(
        &self,
        abandoned: Duration,
        sweep: &mut dyn FnMut(Due<'_>) -> Result<bool, StoreError>,
    ) -> Result<Collected, StoreError> {
        type Param = Box<dyn tokio_postgres::types::ToSql + Send + Sync>;
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Engine("the work queue's client stopped".into()))?;
        let url = self.url.clone();
        let client = Arc::new(super::wait_on(rt, async move { connect(&url).await })?);
        // One statement on the collector's connection.
        let step = |sql: &'static str, params: Vec<Param>| {
            let (c, url) = (Arc::clone(&client), self.url.clone());
            super::wait_on(rt, async move {
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                c.query(sql, &refs).await.map_err(queue_err(&url))
            })
        };
        let mut done = Collected::default();
        // Shared objects, one row at a time: its lock is held across the
        // object's deletion.
        while ((done.objects + done.untagged) as i64) < COLLECT_BATCH {
            step("BEGIN", vec![])?;
            let due = step(
                "SELECT digest, tag FROM cloister_work_objects
                  WHERE keep_until < now()
                  ORDER BY keep_until
                  LIMIT 1
                    FOR UPDATE SKIP LOCKED",
                vec![],
            )?;
            let Some(row) = due.first() else {
                step("ROLLBACK", vec![])?;
                break;
            };
            let (digest, tag): (String, Vec<u8>) = (row.get(0), row.get(1));
            let trusted = match sweep(Due::Object {
                digest: &digest,
                tag: &tag,
            }) {
                Ok(t) => t,
                Err(e) => {
                    let _ = step("ROLLBACK", vec![]);
                    return Err(e);
                }
            };
            step(
                "DELETE FROM cloister_work_objects WHERE digest = $1",
                vec![Box::new(digest)],
            )?;
            step("COMMIT", vec![])?;
            if trusted {
                done.objects += 1;
            } else {
                done.untagged += 1;
            }
        }
        // Abandoned tasks: the rows go in the transaction that deletes
        // their objects, so a failed deletion leaves them to a later call.
        step("BEGIN", vec![])?;
        let rows = step(
            "DELETE FROM cloister_work WHERE id IN (
                 SELECT id FROM cloister_work
                  WHERE CASE state
                          WHEN 'queued' THEN created
                          WHEN 'running' THEN lease_until
                          ELSE coalesce(finished, created)
                        END < now() - make_interval(secs => $1)
                  ORDER BY id
                  LIMIT $2
                    FOR UPDATE SKIP LOCKED)
             RETURNING kind, input, tag, result, result_tag",
            vec![Box::new(seconds(abandoned)), Box::new(COLLECT_BATCH)],
        )?;
        for r in &rows {
            let due = Due::Task {
                kind: r.get(0),
                input: r.get(1),
                tag: r.get(2),
                result: r.get(3),
                result_tag: r.get(4),
            };
            match sweep(due) {
                Ok(true) => done.tasks += 1,
                Ok(false) => done.untagged += 1,
                Err(e) => {
                    let _ = step("ROLLBACK", vec![]);
                    return Err(e);
                }
            }
        }
        step("COMMIT", vec![])?;
        Ok(done)
    }

    /// Deletes task `id` (its submitter has taken the outcome).
    pub fn remove(&self, id: i64) -> Result<(), StoreError> {
        let url = self.url.clone();
        self.run(move |c| async move {
            c.execute("DELETE FROM cloister_work WHERE id = $1", &[&id])
                .await
                .map_err(queue_err(&url))?;
            Ok(())
        })
    }
}
