//! Training on `cloister worker` processes.
//!
//! With `[workers] enabled = true` in `cloister.toml` (a PostgreSQL store
//! and an object store), the process that runs an operation — `train`, an
//! active-learning job's rounds — does everything as before (authorizes,
//! audits, runs the plugins, evaluates, stores) except the model fits,
//! which it hands to the environment's workers through the work queue
//! ([`crate::store::work`]):
//!
//! 1. The features (a sparse matrix) go to the object store under their
//!    digest, once for all the fits that share them; a small task object
//!    (template, labels, splits, the memory budget) goes
//!    next to them; the queue gets a row naming the task's digest, tagged
//!    with HMAC-SHA256 under `keys/work.key`.
//! 2. A worker claims the row (`FOR UPDATE SKIP LOCKED`, a lease it renews
//!    while it fits), checks the tag, fetches both objects (verified by
//!    digest), fits with the same code a local fit runs, and stores the
//!    result — the model's weights and its training curve — as an object
//!    whose digest it records with its own tag over the task's and the
//!    result's digests.
//! 3. The operation's process checks that tag, fetches and decodes the
//!    result, deletes the row, computes the predictions it needs from the
//!    weights itself (so an evaluation is always of the weights that are
//!    stored), and goes on.
//!
//! A worker that dies (or loses the database) stops renewing its lease;
//! when the lease runs out another worker claims the task and fits it
//! again. A fit is deterministic for its inputs, so the result is the one
//! the first worker would have given (tested: a worker killed with SIGKILL
//! mid-fit). Attempts are limited (`max_attempts`); a fit that fails for a
//! reason another attempt would repeat (over the memory budget, too few
//! rows) fails the operation at once with the worker's message.
//!
//! What workers hold: `cloister.toml` (the database and object-store URLs),
//! `keys/work.key`, and the CA file if one is named — not the audit keys,
//! not the row-tag key. They never touch the key–value store or the audit
//! log: the operation's process audits the operation, as without workers.
//! Work-queue rows are not audit records; they are deleted once taken.
//!
//! Objects that fits and stages share (the features, a fitted
//! vocabulary) are kept by time, not by count: the operation that sends
//! one records, with its tag, until when it is needed, and renews that
//! while it waits ([`Workers::share`]); idle workers delete what no one
//! needs any more, and the rows and objects of tasks whose submitter died
//! ([`collect`]). A row without the environment's tag names nothing to
//! delete.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::env_config::{CONFIG_FILE, EnvConfig, StoreLocation, WORK_KEY_FILE, WorkersConfig};
use crate::runtime::{
    LoadedPlugin, Runner, Runtime, RuntimeConfig, RuntimeError, TermCounts, Usage,
};
use crate::store::objects::Objects;
use crate::store::work::{Collected, Due, Task, TaskState, WorkQueue};
use crate::store::{PgUrl, StoreError};
use crate::train::{self, Fitted, Template, TrainError, Trained, TrainingSet};
use crate::types::{DataRecord, SparseBatch, Vocabulary};

/// The longest pause between two looks at a task's row (a primary-key
/// read), and so the most a finished fit waits to be noticed.
const POLL: Duration = Duration::from_millis(50);

/// The kind of task that fits a model.
const FIT: &str = "fit";

/// The kind of task that runs one plugin stage over a shard of records.
const STAGE: &str = "stage";

/// The records of one stage task are a multiple of this: the runner's
/// batch, so that the shards' batches are the batches one run over all
/// the records would make (plugins may not keep state between batches,
/// and a fit counts each record alone).
const SHARD_ALIGN: usize = 256;

/// Bytes a task or result object may have when fetched (the features of
/// a large dataset are the biggest).
const OBJECT_LIMIT: u64 = 16 << 30;

/// Work-queue failures.
#[derive(Debug, Error)]
pub enum WorkError {
    /// The queue or the object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The worker's directory: `cloister.toml`, the work key, the CA file.
    #[error("{file}: {message}")]
    Setup {
        /// The file (or directory).
        file: String,
        /// What is wrong with it.
        message: String,
    },
    /// The system random source failed.
    #[error("the system random number generator failed")]
    Random,
    /// The fit itself failed (in this process or on a worker).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A task or result object does not decode.
    #[error("work queue: {0}")]
    Format(String),
    /// A row's tag does not match: written by something without the
    /// environment's work key.
    #[error(
        "work queue: task {task}'s {what} does not carry the environment's tag (the row was written or changed outside Cloister); not used"
    )]
    Tag {
        /// The task.
        task: i64,
        /// `task` or `result`.
        what: &'static str,
    },
    /// An approved plugin does not load in this worker's runtime (a
    /// worker of another version, say). The text carries the runtime's code
    /// only: the runtime's own message can name what the component holds
    /// (its imports), which is the plugin's choice, and this text travels
    /// to the person who ran the operation. The full diagnosis goes to the
    /// worker's log ([`WorkerEvent::Failed`]'s `detail`).
    #[error(
        "the plugin {digest} does not load in this worker's runtime ({}); the worker's log has the runtime's diagnosis",
        .error.code()
    )]
    PluginLoad {
        /// The component's digest.
        digest: String,
        /// What the runtime said.
        error: RuntimeError,
    },
    /// A worker reported a failure another attempt would repeat.
    #[error("the fit failed on worker {owner}: {error}")]
    Failed {
        /// The worker.
        owner: String,
        /// Its message.
        error: String,
    },
    /// No worker took the task in time.
    #[error(
        "work queue: no worker took task {task} within {seconds} s (start `cloister worker` for this environment, or raise workers.claim_timeout_seconds)"
    )]
    NoWorker {
        /// The task.
        task: i64,
        /// The timeout.
        seconds: u64,
    },
    /// Every allowed claim of the task ended with its worker's lease
    /// running out.
    #[error("work queue: task {task} was claimed {attempts} times and no worker finished it")]
    AttemptsSpent {
        /// The task.
        task: i64,
        /// Claims made.
        attempts: i32,
    },
}

fn tag_key(secret: &[u8]) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)
}

/// How often a worker reports its progress at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A worker's progress report on the task `input`: the epoch's figures as
/// JSON, a space, and the hex HMAC over the task and the JSON, so that a
/// report written into the queue by anyone without the work key is not
/// shown as the fit's.
fn progress_text(
    key: &ring::hmac::Key,
    input: &str,
    stats: &train::EpochStats,
) -> Result<String, WorkError> {
    let json = serde_json::to_string(stats).map_err(|e| WorkError::Format(e.to_string()))?;
    let tag = ring::hmac::sign(key, &progress_message(input, &json));
    Ok(format!("{json} {}", hex::encode(tag.as_ref())))
}

fn progress_message(input: &str, json: &str) -> Vec<u8> {
    let mut m = b"cloister-work-progress\0".to_vec();
    m.extend_from_slice(input.as_bytes());
    m.push(0);
    m.extend_from_slice(json.as_bytes());
    m
}

/// The epoch figures of a progress report, if its tag is this
/// environment's for this task.
fn read_progress(key: &ring::hmac::Key, input: &str, text: &str) -> Option<train::EpochStats> {
    let (json, tag) = text.rsplit_once(' ')?;
    let tag = hex::decode(tag).ok()?;
    ring::hmac::verify(key, &progress_message(input, json), &tag).ok()?;
    serde_json::from_str(json).ok()
}

fn task_message(kind: &str, input: &str) -> Vec<u8> {
    [
        b"cloister work task\0".as_slice(),
        kind.as_bytes(),
        b"\0",
        input.as_bytes(),
    ]
    .concat()
}

/// What the tag of a shared object's keep row covers.
fn keep_message(digest: &str) -> Vec<u8> {
    [b"cloister work object\0".as_slice(), digest.as_bytes()].concat()
}

/// How often an idle worker looks for objects and tasks to delete.
const COLLECT_EVERY: Duration = Duration::from_secs(60);

/// Deletes, of what `queue` offers, the objects whose rows carry the
/// environment's tag: shared objects no one keeps any more, and the task
/// and result objects of tasks abandoned for `abandoned`. The rows go
/// either way (a row without the tag is not Cloister's and names nothing
/// to delete; it is counted apart, as a sign that someone wrote to the
/// database).
fn collect(
    queue: &WorkQueue,
    key: &ring::hmac::Key,
    objects: &Objects,
    abandoned: Duration,
) -> Result<Collected, StoreError> {
    let signed = |message: Vec<u8>, tag: &[u8]| ring::hmac::verify(key, &message, tag).is_ok();
    queue.collect(abandoned, &mut |due| match due {
        Due::Object { digest, tag } => {
            let trusted = signed(keep_message(digest), tag);
            if trusted {
                objects.delete(digest)?;
            }
            Ok(trusted)
        }
        Due::Task {
            kind,
            input,
            tag,
            result,
            result_tag,
        } => {
            if !signed(task_message(kind, input), tag) {
                return Ok(false);
            }
            objects.delete(input)?;
            if let (Some(result), Some(result_tag)) = (result, result_tag)
                && signed(result_message(input, result), result_tag)
            {
                objects.delete(result)?;
            }
            Ok(true)
        }
    })
}

fn result_message(input: &str, result: &str) -> Vec<u8> {
    [
        b"cloister work result\0".as_slice(),
        input.as_bytes(),
        b"\0",
        result.as_bytes(),
    ]
    .concat()
}

// ------------------------------------------------------------- encoding --

const FEATURES_MAGIC: &[u8; 8] = b"CLFEAT1\n";
const RESULT_MAGIC: &[u8; 8] = b"CLFRES1\n";

/// The features, as stored: magic, rows + 1 and non-zeros (u64 LE), then
/// the offsets and indices (u32 LE) and values (f32 LE).
fn encode_features(x: &SparseBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + 4 * (x.offsets.len() + 2 * x.indices.len()));
    out.extend_from_slice(FEATURES_MAGIC);
    out.extend_from_slice(&(x.offsets.len() as u64).to_le_bytes());
    out.extend_from_slice(&(x.indices.len() as u64).to_le_bytes());
    for v in &x.offsets {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in &x.indices {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in &x.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads little-endian words off the front of a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WorkError> {
        if self.bytes.len() < n {
            return Err(WorkError::Format(format!(
                "the {} object is truncated",
                self.what
            )));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, WorkError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }

    fn u64(&mut self) -> Result<u64, WorkError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn len(&mut self, per: usize) -> Result<usize, WorkError> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| n.checked_mul(per).is_some_and(|b| b <= self.bytes.len()))
            .ok_or_else(|| {
                WorkError::Format(format!(
                    "the {} object announces more than it holds",
                    self.what
                ))
            })
    }

    fn words(&mut self, n: usize) -> Result<impl Iterator<Item = [u8; 4]> + 'a, WorkError> {
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]]))
    }

    fn magic(&mut self, want: &[u8; 8]) -> Result<(), WorkError> {
        if self.take(8)? != want {
            return Err(WorkError::Format(format!("not a {} object", self.what)));
        }
        Ok(())
    }

    fn end(&self) -> Result<(), WorkError> {
        if !self.bytes.is_empty() {
            return Err(WorkError::Format(format!(
                "the {} object has bytes after its end",
                self.what
            )));
        }
        Ok(())
    }
}

fn decode_features(bytes: &[u8]) -> Result<SparseBatch, WorkError> {
    let mut r = Reader {
        bytes,
        what: "features",
    };
    r.magic(FEATURES_MAGIC)?;
    let rows = usize::try_from(r.u64()?).map_err(|_| WorkError::Format("too many rows".into()))?;
    let nnz = usize::try_from(r.u64()?).map_err(|_| WorkError::Format("too many values".into()))?;
    if rows
        .checked_add(nnz.saturating_mul(2))
        .and_then(|w| w.checked_mul(4))
        != Some(r.bytes.len())
    {
        return Err(WorkError::Format(
            "the features object's size does not match its header".into(),
        ));
    }
    let offsets: Vec<u32> = r.words(rows)?.map(u32::from_le_bytes).collect();
    let indices: Vec<u32> = r.words(nnz)?.map(u32::from_le_bytes).collect();
    let values: Vec<f32> = r.words(nnz)?.map(f32::from_le_bytes).collect();
    r.end()?;
    let ordered = offsets.first() == Some(&0)
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && offsets.last().is_some_and(|&l| l as usize == nnz);
    if !ordered {
        return Err(WorkError::Format(
            "the features object's row offsets are not in order".into(),
        ));
    }
    Ok(SparseBatch {
        offsets,
        indices,
        values,
    })
}

/// A fit, as a worker receives it (JSON, next to the features).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FitTask {
    /// Random: makes every task's digest (and so its result's) its own,
    /// so both objects can be deleted once taken.
    nonce: String,
    template: Template,
    /// Digest of the features object.
    features: String,
    dim: usize,
    classes: usize,
    y: Vec<usize>,
    train: Vec<usize>,
    val: Vec<usize>,
    budget_bytes: u64,
}

impl FitTask {
    /// The same checks a local fit's inputs pass by construction.
    fn check(&self, x: &SparseBatch) -> Result<(), WorkError> {
        let rows = x.rows();
        let in_range = |v: &[usize]| v.iter().all(|&r| r < rows);
        if self.y.len() != rows
            || !in_range(&self.train)
            || !in_range(&self.val)
            || self.y.iter().any(|&c| c >= self.classes)
            || x.indices.iter().any(|&i| i as usize >= self.dim)
        {
            return Err(WorkError::Format(
                "the task's rows, labels or features are out of range".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultHead {
    curve: Vec<train::EpochStats>,
    best_epoch: u32,
    seconds: f64,
    weights_len: u64,
    worker: String,
    /// The task's digest (so that each result object is its task's own).
    task: String,
}

/// Magic, the JSON head's length (u64 LE) and the head, the weights
/// (safetensors).
fn encode_result(f: &Fitted, worker: &str, task: &str) -> Result<Vec<u8>, WorkError> {
    let weights = f.model.to_safetensors()?;
    let head = serde_json::to_vec(&ResultHead {
        curve: f.curve.clone(),
        best_epoch: f.best_epoch,
        seconds: f.seconds,
        weights_len: weights.len() as u64,
        worker: worker.to_string(),
        task: task.to_string(),
    })
    .map_err(|e| WorkError::Format(e.to_string()))?;
    let mut out = Vec::with_capacity(16 + head.len() + weights.len());
    out.extend_from_slice(RESULT_MAGIC);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&weights);
    Ok(out)
}

fn decode_result(
    bytes: &[u8],
    template: &Template,
    dim: usize,
    classes: usize,
) -> Result<Fitted, WorkError> {
    let mut r = Reader {
        bytes,
        what: "result",
    };
    r.magic(RESULT_MAGIC)?;
    let n = r.len(1)?;
    let head: ResultHead = serde_json::from_slice(r.take(n)?)
        .map_err(|e| WorkError::Format(format!("the result's head: {e}")))?;
    let weights_len = usize::try_from(head.weights_len)
        .map_err(|_| WorkError::Format("the result's weights are too large".into()))?;
    let weights = r.take(weights_len)?;
    r.end()?;
    let model = Trained::from_safetensors(template.kind, weights)?;
    if model.dim != dim || model.classes != classes {
        return Err(WorkError::Format(format!(
            "the result's model is {}×{}, the task was {dim}×{classes}",
            model.dim, model.classes
        )));
    }
    Ok(Fitted {
        model,
        curve: head.curve,
        best_epoch: head.best_epoch,
        seconds: head.seconds,
    })
}

// ------------------------------------------------------- plugin stages --

const STAGE_TASK_MAGIC: &[u8; 8] = b"CLSTSK1\n";
const STAGE_RESULT_MAGIC: &[u8; 8] = b"CLSRES1\n";

/// What a plugin stage does with its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum StageOp {
    /// A preprocessor: the records it keeps.
    Preprocess,
    /// A featurizer: one row of features per record.
    Featurize,
    /// A fitted featurizer's fit: in how many records each term key
    /// occurs, at most `max_distinct` keys.
    Terms {
        /// The cap on distinct keys.
        max_distinct: usize,
    },
}

/// What a plugin stage gave.
#[derive(Debug)]
pub(crate) enum StageOutput {
    /// A preprocessor's records.
    Records(Vec<DataRecord>),
    /// A featurizer's rows.
    Features(SparseBatch),
    /// A fit's term counts.
    Terms(TermCounts),
}

impl StageOutput {
    /// The results the stage accepted: records kept, rows, or records
    /// counted.
    pub(crate) fn count(&self) -> usize {
        match self {
            StageOutput::Records(r) => r.len(),
            StageOutput::Features(x) => x.rows(),
            StageOutput::Terms(t) => t.documents,
        }
    }
}

/// A plugin stage's run, in this process or on workers: its output (or
/// the error), what the plugin's instances used, what they wrote (with
/// the bytes dropped over the cap) and the dimension a featurizer
/// declared.
#[derive(Debug)]
pub(crate) struct StageRun<T = StageOutput> {
    pub(crate) result: Result<T, RuntimeError>,
    pub(crate) usage: Usage,
    pub(crate) log: (Vec<u8>, usize),
    pub(crate) dimension: u32,
}

/// A plugin stage as it is run: the plugin and its configuration, the
/// limits, the operation and, for a fitted featurizer's featurizing, its
/// vocabulary.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stage<'a> {
    pub(crate) plugin: &'a LoadedPlugin,
    pub(crate) config: &'a [(String, String)],
    pub(crate) limits: &'a crate::runtime::Limits,
    pub(crate) op: StageOp,
    pub(crate) vocabulary: Option<&'a Arc<Vocabulary>>,
}

/// Runs `stage` over `records` with this process's runtime: what an
/// operation does without workers, and what a worker does with a shard.
pub(crate) fn stage_here(rt: &Runtime, stage: Stage<'_>, records: &[DataRecord]) -> StageRun {
    run_here(
        rt,
        stage.plugin,
        stage.config,
        stage.limits,
        stage.vocabulary,
        |runner| run_op(runner, stage.op, records),
    )
}

/// Runs `run` on a runner of `plugin` (configured, with the limits and,
/// for a fitted featurizer's featurizing, the vocabulary) and collects
/// what its instances used and wrote: every plugin call of the host goes
/// through here.
pub(crate) fn run_here<T>(
    rt: &Runtime,
    plugin: &LoadedPlugin,
    config: &[(String, String)],
    limits: &crate::runtime::Limits,
    vocabulary: Option<&Arc<Vocabulary>>,
    run: impl FnOnce(&Runner<'_>) -> Result<T, RuntimeError>,
) -> StageRun<T> {
    let runner = match plugin.runner(rt, config, limits.clone()) {
        Ok(r) => r,
        Err(e) => {
            return StageRun {
                result: Err(e),
                usage: Usage::default(),
                log: (Vec::new(), 0),
                dimension: 0,
            };
        }
    };
    let runner = match vocabulary {
        Some(v) => runner.vocabulary(Arc::clone(v)),
        None => runner,
    };
    let result = run(&runner);
    StageRun {
        result,
        usage: runner.usage(),
        log: runner.take_log(),
        dimension: runner.dimension(),
    }
}

fn run_op(
    runner: &Runner<'_>,
    op: StageOp,
    records: &[DataRecord],
) -> Result<StageOutput, RuntimeError> {
    match op {
        StageOp::Preprocess => runner.preprocess(records).map(StageOutput::Records),
        StageOp::Featurize => runner.featurize(records).map(StageOutput::Features),
        StageOp::Terms { max_distinct } => runner
            .term_counts(records, max_distinct)
            .map(StageOutput::Terms),
    }
}

/// Records as a stage task carries them: the count (u64 LE), then each
/// record's id and body (the stored form, [`crate::codec`]),
/// each with its length (u32 LE). Labels are not part of it: plugins
/// never see them, and workers are not sent them.
fn encode_records(records: &[DataRecord], out: &mut Vec<u8>) {
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    let mut body = Vec::new();
    for r in records {
        out.extend_from_slice(&(r.id.len() as u32).to_le_bytes());
        out.extend_from_slice(r.id.as_bytes());
        body.clear();
        crate::codec::encode(r, &mut body);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
}

fn decode_records(r: &mut Reader<'_>) -> Result<Vec<DataRecord>, WorkError> {
    let n = r.len(8)?;
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u32()? as usize;
        let id = String::from_utf8(r.take(len)?.to_vec())
            .map_err(|_| WorkError::Format(format!("a record id in the {} object", r.what)))?;
        let len = r.u32()? as usize;
        let record = crate::codec::decode(id, r.take(len)?).ok_or_else(|| {
            WorkError::Format(format!("a record in the {} object is damaged", r.what))
        })?;
        records.push(record);
    }
    Ok(records)
}

/// A stage task's head (JSON, before its records).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageTask {
    /// Random: every task (and so its result) is its own object.
    nonce: String,
    /// The plugin component's digest (an object).
    plugin: String,
    config: Vec<(String, String)>,
    limits: crate::runtime::Limits,
    op: StageOp,
    /// Digest of the vocabulary object ([`crate::fitted::encode`]).
    vocabulary: Option<String>,
}

/// How a stage ended on the worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
enum StageOutcome {
    /// The kept records follow the head.
    Records,
    /// The features follow the head.
    Features,
    /// The term counts.
    Terms {
        documents: u64,
        counts: Vec<(u64, u32)>,
    },
    /// The plugin (or its configuration) failed: the runtime error's code,
    /// message and administrators' detail.
    Failed {
        code: String,
        message: String,
        detail: String,
    },
}

/// A stage result's head (JSON, before the records or features).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageResultHead {
    /// The task's digest.
    task: String,
    worker: String,
    usage: Usage,
    /// What the plugin wrote (hex), for the administrators' plugin log.
    log: String,
    log_dropped: u64,
    dimension: u32,
    outcome: StageOutcome,
}

fn framed(magic: &[u8; 8], head: &impl Serialize, body: &[u8]) -> Result<Vec<u8>, WorkError> {
    let head = serde_json::to_vec(head).map_err(|e| WorkError::Format(e.to_string()))?;
    let mut out = Vec::with_capacity(16 + head.len() + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    Ok(out)
}

fn unframe<'a, T: serde::de::DeserializeOwned>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    what: &'static str,
) -> Result<(T, Reader<'a>), WorkError> {
    let mut r = Reader { bytes, what };
    r.magic(magic)?;
    let n = r.len(1)?;
    let head = serde_json::from_slice(r.take(n)?)
        .map_err(|e| WorkError::Format(format!("the {what}'s head: {e}")))?;
    Ok((head, r))
}

fn encode_stage_result(run: &StageRun, worker: &str, task: &str) -> Result<Vec<u8>, WorkError> {
    let mut body = Vec::new();
    let outcome = match &run.result {
        Ok(StageOutput::Records(records)) => {
            encode_records(records, &mut body);
            StageOutcome::Records
        }
        Ok(StageOutput::Features(x)) => {
            body = encode_features(x);
            StageOutcome::Features
        }
        Ok(StageOutput::Terms(t)) => StageOutcome::Terms {
            documents: t.documents as u64,
            counts: t.counts.clone(),
        },
        Err(e) => StageOutcome::Failed {
            code: e.code().to_string(),
            message: e.to_string(),
            detail: e.admin_detail(),
        },
    };
    let head = StageResultHead {
        task: task.to_string(),
        worker: worker.to_string(),
        usage: run.usage,
        log: hex::encode(&run.log.0),
        log_dropped: run.log.1 as u64,
        dimension: run.dimension,
        outcome,
    };
    framed(STAGE_RESULT_MAGIC, &head, &body)
}

/// A stage result, checked against its task: the records a preprocessor
/// kept are a subsequence of the shard's (the worker's runtime checked
/// that too), a featurizer's rows are one per record.
fn decode_stage_result(
    bytes: &[u8],
    task: &str,
    op: StageOp,
    shard: &[DataRecord],
) -> Result<StageRun, WorkError> {
    let (head, mut r): (StageResultHead, _) = unframe(bytes, STAGE_RESULT_MAGIC, "stage result")?;
    if head.task != task {
        return Err(WorkError::Format(
            "the stage result is another task's".into(),
        ));
    }
    let mismatch = || WorkError::Format("the stage result does not match its task".into());
    let result = match (head.outcome, op) {
        (StageOutcome::Records, StageOp::Preprocess) => {
            let kept = decode_records(&mut r)?;
            let mut ids = shard.iter().map(|s| &s.id);
            if !kept.iter().all(|k| ids.any(|id| *id == k.id)) {
                return Err(mismatch());
            }
            Ok(StageOutput::Records(kept))
        }
        (StageOutcome::Features, StageOp::Featurize) => {
            let x = decode_features(r.take(r.bytes.len())?)?;
            if x.rows() != shard.len() {
                return Err(mismatch());
            }
            Ok(StageOutput::Features(x))
        }
        (StageOutcome::Terms { documents, counts }, StageOp::Terms { max_distinct }) => {
            if documents != shard.len() as u64
                || counts.len() > max_distinct
                || !counts.windows(2).all(|w| w[0].0 < w[1].0)
            {
                return Err(mismatch());
            }
            Ok(StageOutput::Terms(TermCounts {
                documents: shard.len(),
                counts,
            }))
        }
        (
            StageOutcome::Failed {
                code,
                message,
                detail,
            },
            _,
        ) => Err(RuntimeError::on_worker(&code, message, detail)),
        _ => return Err(mismatch()),
    };
    r.end()?;
    let log = hex::decode(&head.log)
        .map_err(|_| WorkError::Format("the stage result's log is not hex".into()))?;
    Ok(StageRun {
        result,
        usage: head.usage,
        log: (log, usize::try_from(head.log_dropped).unwrap_or(usize::MAX)),
        dimension: head.dimension,
    })
}

/// The shards' runs as one run over all their records, in order: usage
/// summed, logs joined, outputs joined (a fit's counts summed), and the
/// earliest shard's error if any failed — as one run in this process
/// reports the earliest failing batch. Shards whose featurizer declared
/// different dimensions fail like a run whose instances did.
fn merge_stage_runs(op: StageOp, parts: Vec<StageRun>) -> StageRun {
    let mut usage = Usage::default();
    let mut log = Vec::new();
    let mut dropped = 0usize;
    let mut dimension = 0u32;
    let mut error = None;
    let mut outputs = Vec::with_capacity(parts.len());
    for part in parts {
        usage.add(&part.usage);
        log.extend_from_slice(&part.log.0);
        dropped = dropped.saturating_add(part.log.1);
        if part.dimension != 0 {
            if dimension == 0 {
                dimension = part.dimension;
            } else if dimension != part.dimension && error.is_none() {
                error = Some(RuntimeError::inconsistent_dimension());
            }
        }
        match part.result {
            Ok(o) => outputs.push(o),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    let result = match error {
        Some(e) => Err(e),
        None => join_outputs(op, outputs),
    };
    StageRun {
        result,
        usage,
        log: (log, dropped),
        dimension,
    }
}

fn join_outputs(op: StageOp, outputs: Vec<StageOutput>) -> Result<StageOutput, RuntimeError> {
    let internal =
        || RuntimeError::on_worker("internal", "internal runtime error".into(), String::new());
    match op {
        StageOp::Preprocess => {
            let mut all = Vec::new();
            for o in outputs {
                let StageOutput::Records(r) = o else {
                    return Err(internal());
                };
                all.extend(r);
            }
            Ok(StageOutput::Records(all))
        }
        StageOp::Featurize => {
            let mut all = SparseBatch {
                offsets: vec![0],
                ..SparseBatch::default()
            };
            for o in outputs {
                let StageOutput::Features(x) = o else {
                    return Err(internal());
                };
                all.extend(&x);
            }
            Ok(StageOutput::Features(all))
        }
        StageOp::Terms { max_distinct } => {
            let mut parts = Vec::with_capacity(outputs.len());
            for o in outputs {
                let StageOutput::Terms(t) = o else {
                    return Err(internal());
                };
                parts.push(t);
            }
            TermCounts::merge(parts, max_distinct).map(StageOutput::Terms)
        }
    }
}

// ------------------------------------------------------------ submitter --

/// The work queue as the operation's process uses it.
pub(crate) struct Workers {
    queue: WorkQueue,
    key: ring::hmac::Key,
    config: WorkersConfig,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workers({:?})", self.queue)
    }
}

impl Workers {
    pub(crate) fn connect(
        url: &PgUrl,
        config: WorkersConfig,
        secret: &[u8],
    ) -> Result<Self, StoreError> {
        Ok(Self {
            queue: WorkQueue::connect(url)?,
            key: tag_key(secret),
            config,
        })
    }

    /// How long a shared object is kept after the last operation that
    /// sent it stopped waiting on it.
    fn keep_period(&self) -> Duration {
        Duration::from_secs(self.config.keep_objects_seconds)
    }

    /// Asks that shared object `digest` be kept for the keep period from
    /// now.
    fn keep(&self, digest: &str) -> Result<(), StoreError> {
        let tag = ring::hmac::sign(&self.key, &keep_message(digest));
        self.queue.keep(digest, tag.as_ref(), self.keep_period())
    }

    /// Asks again that the `shared` objects be kept, when a third of the
    /// keep period has passed since `kept`.
    fn renew(&self, shared: &[&str], kept: &mut Instant) -> Result<(), WorkError> {
        if kept.elapsed() >= self.keep_period() / 3 {
            for digest in shared {
                self.keep(digest)?;
            }
            *kept = Instant::now();
        }
        Ok(())
    }

    /// Stores `bytes`, content that several tasks may share (features, a
    /// fitted vocabulary), as an object kept for the keep period; returns
    /// its digest. Kept first, written next: a collector that deleted it
    /// a moment before has removed its row too, and the write puts it
    /// back.
    pub(crate) fn share(&self, objects: &Objects, bytes: Vec<u8>) -> Result<String, WorkError> {
        // Not synced: lost in a crash, the operation is run again.
        Ok(objects.put_bytes_after(bytes, false, &mut |digest| self.keep(digest))?)
    }

    /// Fits `template` on `set` on a worker and returns the model with its
    /// class probabilities for `predict` (rows of `set.x`) — what
    /// [`fit_here`] returns in this process.
    pub(crate) fn fit(
        &self,
        objects: &Objects,
        template: &Template,
        set: &TrainingSet<'_>,
        predict: &[usize],
        progress: &mut dyn FnMut(&train::EpochStats),
    ) -> Result<(Fitted, Vec<f32>), WorkError> {
        let features = self.share(objects, encode_features(set.x))?;
        let mut kept = Instant::now();
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| WorkError::Random)?;
        let task = FitTask {
            nonce: hex::encode(nonce),
            template: template.clone(),
            features: features.clone(),
            dim: set.dim,
            classes: set.classes,
            y: set.y.to_vec(),
            train: set.train.to_vec(),
            val: set.val.to_vec(),
            budget_bytes: set.budget_bytes,
        };
        let body = serde_json::to_vec(&task).map_err(|e| WorkError::Format(e.to_string()))?;
        let input = objects.put_bytes(body, false)?;
        let tag = ring::hmac::sign(&self.key, &task_message(FIT, &input));
        let max = i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX);
        let id = self.queue.submit(FIT, &input, tag.as_ref(), max)?;
        let outcome = self
            .wait(id, &input, (&[&features], &mut kept), progress)
            .and_then(|result| {
                let fitted = objects
                    .get_bytes(&result, OBJECT_LIMIT)
                    .map_err(WorkError::from)
                    .and_then(|bytes| decode_result(&bytes, template, set.dim, set.classes));
                let _ = objects.delete(&result);
                fitted
            });
        // The row and the task's own objects have done their job either
        // way (a failure is reported to the caller, and the operation's
        // audit record stands for it). The features stay: other fits share
        // them, and idle workers delete them once no one keeps them.
        let _ = self.queue.remove(id);
        let _ = objects.delete(&input);
        let fitted = outcome?;
        // Predicted here, from the weights that will be stored.
        let probs = fitted.model.predict(set.x, predict)?;
        Ok((fitted, probs))
    }

    /// Runs a plugin stage over `records` on the workers: the records cut
    /// into shards of `stage_records` (a multiple of the runner's batch),
    /// one task each, all queued at once so that every free worker takes
    /// one; the results joined in order into what one run over all the
    /// records in this process gives ([`merge_stage_runs`]). The plugin's
    /// component and the vocabulary (`vocabulary`, its object's digest)
    /// must be objects already.
    pub(crate) fn run_stage(
        &self,
        objects: &Objects,
        stage: Stage<'_>,
        vocabulary: Option<&str>,
        records: &[DataRecord],
    ) -> Result<StageRun, WorkError> {
        let size = self.config.stage_records.max(1).div_ceil(SHARD_ALIGN) * SHARD_ALIGN;
        let mut shards: Vec<&[DataRecord]> = records.chunks(size).collect();
        if shards.is_empty() {
            shards.push(&[]);
        }
        let max = i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX);
        let mut tasks: Vec<(i64, String)> = Vec::with_capacity(shards.len());
        // The vocabulary, shared just before this call, is kept for as
        // long as shards are queued and waited on.
        let shared: Vec<&str> = vocabulary.into_iter().collect();
        let mut kept = Instant::now();
        let mut outcome = (|| {
            for shard in &shards {
                self.renew(&shared, &mut kept)?;
                let mut nonce = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
                    .map_err(|_| WorkError::Random)?;
                let head = StageTask {
                    nonce: hex::encode(nonce),
                    plugin: stage.plugin.digest.to_hex(),
                    config: stage.config.to_vec(),
                    limits: stage.limits.clone(),
                    op: stage.op,
                    vocabulary: vocabulary.map(str::to_string),
                };
                let mut body = Vec::new();
                encode_records(shard, &mut body);
                // Not synced: lost in a crash, the stage is run again.
                let input = objects.put_bytes(framed(STAGE_TASK_MAGIC, &head, &body)?, false)?;
                let tag = ring::hmac::sign(&self.key, &task_message(STAGE, &input));
                match self.queue.submit(STAGE, &input, tag.as_ref(), max) {
                    Ok(id) => tasks.push((id, input)),
                    Err(e) => {
                        let _ = objects.delete(&input);
                        return Err(e.into());
                    }
                }
            }
            Ok::<_, WorkError>(())
        })();
        let mut parts = Vec::with_capacity(shards.len());
        if outcome.is_ok() {
            for ((id, input), shard) in tasks.iter().zip(&shards) {
                let part = self
                    .wait(*id, input, (&shared, &mut kept), &mut |_| {})
                    .and_then(|result| {
                        let run = objects
                            .get_bytes(&result, OBJECT_LIMIT)
                            .map_err(WorkError::from)
                            .and_then(|bytes| decode_stage_result(&bytes, input, stage.op, shard));
                        let _ = objects.delete(&result);
                        run
                    });
                match part {
                    Ok(run) => parts.push(run),
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
        }
        // Every row and task object has done its job (or is abandoned with
        // the operation): a worker still running a removed task finds it
        // gone and drops its result.
        for (id, input) in &tasks {
            let _ = self.queue.remove(*id);
            let _ = objects.delete(input);
        }
        outcome?;
        Ok(merge_stage_runs(stage.op, parts))
    }

    /// Waits for task `id` (on `input`) to end and returns its result's
    /// digest, once its tag is checked; relays the worker's progress
    /// reports that carry the environment's tag, each epoch once; keeps the
    /// `shared` objects the task needs (last kept at `kept`) for as long as
    /// it waits.
    fn wait(
        &self,
        id: i64,
        input: &str,
        (shared, kept): (&[&str], &mut Instant),
        progress: &mut dyn FnMut(&train::EpochStats),
    ) -> Result<String, WorkError> {
        let mut shown = 0u32;
        let timeout = Duration::from_secs(self.config.claim_timeout_seconds);
        // Since when no live worker has held the task.
        let mut unheld = Some(Instant::now());
        let mut pause = Duration::from_millis(5);
        loop {
            match self.queue.state(id)? {
                TaskState::Done {
                    result, result_tag, ..
                } => {
                    ring::hmac::verify(&self.key, &result_message(input, &result), &result_tag)
                        .map_err(|_| WorkError::Tag {
                            task: id,
                            what: "result",
                        })?;
                    return Ok(result);
                }
                TaskState::Failed { owner, error } => {
                    return Err(WorkError::Failed { owner, error });
                }
                TaskState::Missing => {
                    return Err(WorkError::Format(format!(
                        "task {id} was removed from the queue before it finished"
                    )));
                }
                TaskState::Running {
                    attempts,
                    max_attempts,
                    expired: true,
                    ..
                } if attempts >= max_attempts => {
                    self.queue
                        .give_up(id, "every allowed claim ran out of lease")?;
                    return Err(WorkError::AttemptsSpent { task: id, attempts });
                }
                TaskState::Running {
                    expired: false,
                    progress: report,
                    ..
                } => {
                    unheld = None;
                    // A later attempt starts again from epoch 1; its
                    // reports are shown from where the last one got to.
                    if let Some(stats) = report
                        .as_deref()
                        .and_then(|text| read_progress(&self.key, input, text))
                        && stats.epoch > shown
                    {
                        shown = stats.epoch;
                        progress(&stats);
                    }
                }
                TaskState::Queued | TaskState::Running { .. } => {
                    let since = *unheld.get_or_insert_with(Instant::now);
                    if since.elapsed() >= timeout {
                        self.queue.give_up(id, "no worker took it in time")?;
                        return Err(WorkError::NoWorker {
                            task: id,
                            seconds: timeout.as_secs(),
                        });
                    }
                }
            }
            self.renew(shared, kept)?;
            std::thread::sleep(pause);
            pause = (pause * 2).min(POLL);
        }
    }
}

/// Fits in this process and predicts the `predict` rows: what an
/// operation runs when the environment has no workers (a worker runs the
/// same `train::fit`).
pub(crate) fn fit_here(
    template: &Template,
    set: TrainingSet<'_>,
    predict: &[usize],
    progress: &mut dyn FnMut(&train::EpochStats),
) -> Result<(Fitted, Vec<f32>), TrainError> {
    let x = set.x;
    let fitted = train::fit(template, set, progress)?;
    let probs = fitted.model.predict(x, predict)?;
    Ok((fitted, probs))
}

// --------------------------------------------------------------- worker --

/// How `cloister worker` runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The name this worker claims tasks under (unique per process).
    pub name: String,
    /// The lease each claim takes and each heartbeat renews.
    pub lease: Duration,
    /// How long to wait between looks at an empty queue.
    pub idle: Duration,
    /// Stop after this many tasks (`None`: run until stopped).
    pub max_tasks: Option<u64>,
}

/// What a worker did with one task.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// Claimed task `id` (attempt `attempt`).
    Claimed {
        /// The task.
        id: i64,
        /// Its kind: `fit` or `stage`.
        kind: String,
        /// Which claim of the task this is.
        attempt: i32,
    },
    /// Finished it in `seconds`.
    Finished {
        /// The task.
        id: i64,
        /// Its kind: `fit` or `stage`.
        kind: String,
        /// Wall time of the fit.
        seconds: f64,
    },
    /// The task failed; it is failed with this message.
    Failed {
        /// The task.
        id: i64,
        /// The message recorded (what the operation's caller is told).
        error: String,
        /// More for the worker's own log (its administrators), when there
        /// is more: the runtime's full diagnosis of a plugin that did not
        /// load. Never recorded in the queue.
        detail: Option<String>,
    },
    /// Another worker holds the task now (this one's lease ran out); its
    /// result was dropped.
    Lost {
        /// The task.
        id: i64,
    },
    /// While idle, the worker deleted shared objects no one keeps any
    /// more and tasks their submitters abandoned (with their objects).
    Collected {
        /// Shared objects deleted.
        objects: usize,
        /// Abandoned task rows deleted.
        tasks: usize,
        /// Rows without the environment's tag removed, nothing they named
        /// deleted: someone wrote them with access to the database only.
        untagged: usize,
    },
    /// Looking for what to delete failed (the database or the object store
    /// is away); the worker tries again later.
    CollectFailed {
        /// The error.
        error: String,
    },
    /// The queue could not be read (the database is away); the worker
    /// tries again after a pause.
    Unreachable {
        /// The error.
        error: String,
    },
}

/// A worker's connection to its environment: read from the environment
/// directory's `cloister.toml` and `keys/work.key`, without opening the
/// environment (no store lock, no audit keys).
struct WorkerContext {
    queue: WorkQueue,
    key: ring::hmac::Key,
    /// A task row untouched for this long was abandoned by its submitter.
    abandoned: Duration,
    /// What a task's work fetches and prepares. A separate part so that
    /// the work can borrow it while the lease's heartbeat borrows the
    /// queue: every step of a claimed task runs under its lease.
    inputs: Inputs,
}

/// The object store and what a worker keeps from one task to the next.
struct Inputs {
    objects: Objects,
    /// The last features fetched (rounds of a job share them).
    features: Option<(String, Arc<SparseBatch>)>,
    /// The plugin runtime, made when the first stage task comes.
    runtime: Option<Runtime>,
    /// Plugins compiled so far, by component digest.
    plugins: std::collections::HashMap<String, LoadedPlugin>,
    /// The last vocabulary fetched.
    vocabulary: Option<(String, Arc<Vocabulary>)>,
}

impl WorkerContext {
    fn open(path: &Path) -> Result<Self, WorkError> {
        use cap_std::ambient_authority;
        let setup = |file: &str, message: String| WorkError::Setup {
            file: file.to_string(),
            message,
        };
        let dir = cap_std::fs::Dir::open_ambient_dir(path, ambient_authority())
            .map_err(|e| setup(&path.display().to_string(), e.to_string()))?;
        let config = match EnvConfig::read(&dir) {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(setup(
                    CONFIG_FILE,
                    "missing: workers need an environment on a postgres store".into(),
                ));
            }
            Err(e) => return Err(setup(CONFIG_FILE, e)),
        };
        let Some(workers) = config.workers.as_ref() else {
            return Err(setup(
                CONFIG_FILE,
                "workers.enabled is not set: this environment fits in its own process".into(),
            ));
        };
        let abandoned = Duration::from_secs(workers.abandoned_task_seconds);
        let StoreLocation::Postgres(mut url) = config.store else {
            return Err(setup(CONFIG_FILE, "workers need a postgres store".into()));
        };
        if let Some(name) = config.ca_file.as_deref() {
            let pem = dir.read(name).map_err(|e| setup(name, e.to_string()))?;
            *url = (*url).clone().with_ca(&pem)?;
        }
        let objects = Objects::open(config.objects.as_deref().unwrap_or_default())?;
        // Read only: a worker that made its own key would tag results the
        // environment refuses.
        let secret = dir.read(WORK_KEY_FILE).map_err(|e| {
            setup(
                WORK_KEY_FILE,
                format!("{e} (copy it from the environment's directory)"),
            )
        })?;
        Ok(Self {
            queue: WorkQueue::connect(&url)?,
            key: tag_key(&secret),
            abandoned,
            inputs: Inputs {
                objects,
                features: None,
                runtime: None,
                plugins: std::collections::HashMap::new(),
                vocabulary: None,
            },
        })
    }

    /// Runs one claimed task to its end. Everything after the claim —
    /// fetching its objects, compiling its plugin, the work itself — runs
    /// under the task's lease, so that a slow preparation (a large
    /// component compiled cold, a large feature object) is not taken for
    /// a dead worker.
    fn run(
        &mut self,
        task: &Task,
        options: &WorkerOptions,
        log: &mut dyn FnMut(WorkerEvent),
    ) -> Result<(), WorkError> {
        let id = task.id;
        if ![FIT, STAGE].contains(&task.kind.as_str())
            || ring::hmac::verify(&self.key, &task_message(&task.kind, &task.input), &task.tag)
                .is_err()
        {
            return self.fail(
                id,
                options,
                WorkError::Tag {
                    task: id,
                    what: "task",
                }
                .to_string(),
                None,
                log,
            );
        }
        let epoch: std::sync::Mutex<Option<train::EpochStats>> = std::sync::Mutex::new(None);
        let reports = (task.kind == FIT).then_some(&epoch);
        let inputs = &mut self.inputs;
        let done = with_lease(&self.queue, &self.key, task, options, reports, || {
            if task.kind == STAGE {
                inputs.stage(&task.input, &options.name)
            } else {
                inputs.fit(&task.input, &options.name, &epoch)
            }
        });
        match done {
            Ok((bytes, seconds)) => self.hand_back(task, options, bytes, seconds, log),
            Err(e) => {
                let detail = match &e {
                    WorkError::PluginLoad { error, .. } => Some(error.admin_detail()),
                    _ => None,
                };
                self.fail(id, options, e.to_string(), detail, log)
            }
        }
    }

    /// Fails task `id` with `error` (a failure another attempt would
    /// repeat), and says so, with `detail` for the worker's own log only.
    fn fail(
        &self,
        id: i64,
        options: &WorkerOptions,
        error: String,
        detail: Option<String>,
        log: &mut dyn FnMut(WorkerEvent),
    ) -> Result<(), WorkError> {
        self.queue.fail(id, &options.name, &error)?;
        log(WorkerEvent::Failed { id, error, detail });
        Ok(())
    }

    /// Stores a task's result and records it as the task's, if the task
    /// is still this worker's.
    fn hand_back(
        &self,
        task: &Task,
        options: &WorkerOptions,
        bytes: Vec<u8>,
        seconds: f64,
        log: &mut dyn FnMut(WorkerEvent),
    ) -> Result<(), WorkError> {
        let id = task.id;
        let objects = &self.inputs.objects;
        let result = objects.put_bytes(bytes, false)?;
        let tag = ring::hmac::sign(&self.key, &result_message(&task.input, &result));
        if !self
            .queue
            .finish(id, &options.name, &result, tag.as_ref())?
        {
            // Another worker's result is the one recorded (its head names
            // that worker, so the bytes differ), or the task was given up;
            // this one is nobody's.
            let _ = objects.delete(&result);
            log(WorkerEvent::Lost { id });
            return Ok(());
        }
        log(WorkerEvent::Finished {
            id,
            kind: task.kind.clone(),
            seconds,
        });
        Ok(())
    }
}

impl Inputs {
    /// Runs the fit task whose object is `input`: its features fetched
    /// and checked against it, the model fitted as in the operation's
    /// process, each finished epoch left in `epoch` for the heartbeat to
    /// report. The encoded result and the fit's seconds.
    fn fit(
        &mut self,
        input: &str,
        worker: &str,
        epoch: &std::sync::Mutex<Option<train::EpochStats>>,
    ) -> Result<(Vec<u8>, f64), WorkError> {
        let body = self.objects.get_bytes(input, OBJECT_LIMIT)?;
        let spec: FitTask = serde_json::from_slice(&body)
            .map_err(|e| WorkError::Format(format!("the task object: {e}")))?;
        let x = self.features(&spec.features)?;
        spec.check(&x)?;
        let fitted = train::fit(
            &spec.template,
            TrainingSet {
                x: &x,
                dim: spec.dim,
                y: &spec.y,
                classes: spec.classes,
                train: &spec.train,
                val: &spec.val,
                budget_bytes: spec.budget_bytes,
            },
            &mut |stats| {
                if let Ok(mut e) = epoch.lock() {
                    *e = Some(stats.clone());
                }
            },
        )?;
        Ok((encode_result(&fitted, worker, input)?, fitted.seconds))
    }

    /// Runs the plugin-stage task whose object is `input`: the plugin over
    /// the task's records in this worker's sandbox, under the task's
    /// limits. A plugin that fails is a result like any other (its error
    /// goes back to the operation, which audits it); a task that cannot be
    /// read fails. The encoded result and the stage's seconds.
    fn stage(&mut self, input: &str, worker: &str) -> Result<(Vec<u8>, f64), WorkError> {
        let body = self.objects.get_bytes(input, OBJECT_LIMIT)?;
        let (head, mut r): (StageTask, _) = unframe(&body, STAGE_TASK_MAGIC, "stage task")?;
        let records = decode_records(&mut r)?;
        r.end()?;
        let plugin = self.plugin(&head.plugin)?;
        let vocabulary = head
            .vocabulary
            .as_deref()
            .map(|d| self.vocabulary(d))
            .transpose()?;
        let rt = runtime(&mut self.runtime)?;
        let started = Instant::now();
        let run = stage_here(
            rt,
            Stage {
                plugin: &plugin,
                config: &head.config,
                limits: &head.limits,
                op: head.op,
                vocabulary: vocabulary.as_ref(),
            },
            &records,
        );
        let seconds = started.elapsed().as_secs_f64();
        Ok((encode_stage_result(&run, worker, input)?, seconds))
    }

    fn features(&mut self, digest: &str) -> Result<Arc<SparseBatch>, WorkError> {
        if let Some((d, x)) = &self.features
            && d == digest
        {
            return Ok(Arc::clone(x));
        }
        self.features = None;
        let x = Arc::new(decode_features(
            &self.objects.get_bytes(digest, OBJECT_LIMIT)?,
        )?);
        self.features = Some((digest.to_string(), Arc::clone(&x)));
        Ok(x)
    }

    /// The plugin with component digest `digest`, compiled by this
    /// worker's runtime (once: kept for the tasks that follow).
    fn plugin(&mut self, digest: &str) -> Result<LoadedPlugin, WorkError> {
        if let Some(p) = self.plugins.get(digest) {
            return Ok(p.clone());
        }
        let rt = runtime(&mut self.runtime)?;
        // Verified against its digest as it is read; the runtime digests
        // it again and must agree.
        let bytes = self.objects.get_bytes(digest, COMPONENT_LIMIT)?;
        let loaded = rt.load(&bytes).map_err(|error| WorkError::PluginLoad {
            digest: digest.to_string(),
            error,
        })?;
        if loaded.digest.to_hex() != digest {
            return Err(WorkError::Format(format!(
                "the plugin object {digest} holds another component"
            )));
        }
        if self.plugins.len() >= PLUGINS_KEPT {
            self.plugins.clear();
        }
        self.plugins.insert(digest.to_string(), loaded.clone());
        Ok(loaded)
    }

    fn vocabulary(&mut self, digest: &str) -> Result<Arc<Vocabulary>, WorkError> {
        if let Some((d, v)) = &self.vocabulary
            && d == digest
        {
            return Ok(Arc::clone(v));
        }
        self.vocabulary = None;
        let v = crate::fitted::decode(&self.objects.get_bytes(digest, OBJECT_LIMIT)?)
            .map(Arc::new)
            .map_err(|e| WorkError::Format(format!("the vocabulary object: {e}")))?;
        self.vocabulary = Some((digest.to_string(), Arc::clone(&v)));
        Ok(v)
    }
}

/// The worker's plugin runtime, made at its first use.
fn runtime(slot: &mut Option<Runtime>) -> Result<&Runtime, WorkError> {
    let rt = match slot.take() {
        Some(rt) => rt,
        None => Runtime::new(RuntimeConfig::default())
            .map_err(|e| WorkError::Format(format!("the plugin runtime: {}", e.admin_detail())))?,
    };
    Ok(slot.insert(rt))
}

/// Plugins a worker keeps compiled.
const PLUGINS_KEPT: usize = 16;

/// Bytes a plugin component object may have.
const COMPONENT_LIMIT: u64 = 256 << 20;

/// Runs `work` while a heartbeat renews the task's lease at a third of
/// its length. A renewal refused means another worker has the task (or
/// it was given up); the work cannot be stopped half-way, and handing
/// back its result then records nothing. With `epoch`, the heartbeat also
/// reports the last finished epoch, at most every [`PROGRESS_EVERY`],
/// tagged, for the operation's progress display.
fn with_lease<T>(
    queue: &WorkQueue,
    key: &ring::hmac::Key,
    task: &Task,
    options: &WorkerOptions,
    epoch: Option<&std::sync::Mutex<Option<train::EpochStats>>>,
    work: impl FnOnce() -> T,
) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let step = options.lease / 3;
            let mut last = Instant::now();
            let mut reported: Option<(u32, Instant)> = None;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50).min(step));
                let latest = epoch.and_then(|e| e.lock().ok().and_then(|e| e.clone()));
                if let Some(stats) = latest
                    && reported
                        .is_none_or(|(n, at)| n != stats.epoch && at.elapsed() >= PROGRESS_EVERY)
                    && let Ok(text) = progress_text(key, &task.input, &stats)
                {
                    reported = Some((stats.epoch, Instant::now()));
                    let _ = queue.report(task.id, &options.name, &text);
                }
                if last.elapsed() < step {
                    continue;
                }
                last = Instant::now();
                let _ = queue.renew(task.id, &options.name, options.lease);
            }
        });
        let out = work();
        done.store(true, Ordering::Release);
        out
    })
}

/// How long a worker waits before it asks an unreachable queue again.
const UNREACHABLE_PAUSE: Duration = Duration::from_secs(2);

/// `cloister worker`: claims and runs fit tasks of the environment at
/// `path` until `stop` is set (checked between tasks and while the queue
/// is empty) or `options.max_tasks` are done. Returns the tasks done.
pub fn run_worker(
    path: &Path,
    options: &WorkerOptions,
    stop: &AtomicBool,
    log: &mut dyn FnMut(WorkerEvent),
) -> Result<u64, WorkError> {
    let mut ctx = WorkerContext::open(path)?;
    let mut done = 0u64;
    let mut collected: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) && options.max_tasks.is_none_or(|m| done < m) {
        let task = match ctx.queue.claim(&options.name, options.lease) {
            Ok(Some(task)) => task,
            Ok(None) => {
                // Idle: time to delete what no one needs any more.
                if collected.is_none_or(|t| t.elapsed() >= COLLECT_EVERY) {
                    collected = Some(Instant::now());
                    match collect(&ctx.queue, &ctx.key, &ctx.inputs.objects, ctx.abandoned) {
                        Ok(Collected {
                            objects: 0,
                            tasks: 0,
                            untagged: 0,
                        }) => {}
                        Ok(c) => log(WorkerEvent::Collected {
                            objects: c.objects,
                            tasks: c.tasks,
                            untagged: c.untagged,
                        }),
                        Err(e) => log(WorkerEvent::CollectFailed {
                            error: e.to_string(),
                        }),
                    }
                }
                std::thread::sleep(options.idle);
                continue;
            }
            // A database restart or failover is waited out: the queue's
            // client reconnects on its next call.
            Err(e) => {
                log(WorkerEvent::Unreachable {
                    error: e.to_string(),
                });
                std::thread::sleep(UNREACHABLE_PAUSE);
                continue;
            }
        };
        log(WorkerEvent::Claimed {
            id: task.id,
            kind: task.kind.clone(),
            attempt: task.attempts,
        });
        // The task could not be ended (the database or the object store
        // went away): its lease runs out and a worker takes it again.
        if let Err(e) = ctx.run(&task, options, log) {
            log(WorkerEvent::Unreachable {
                error: e.to_string(),
            });
            std::thread::sleep(UNREACHABLE_PAUSE);
        }
        done += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component this worker's runtime refuses (here for its imports: a
    /// worker of another version could refuse an approved plugin) fails
    /// the task with a text that names the runtime's code and not what the
    /// component holds; the diagnosis stays for the worker's own log.
    #[test]
    fn a_plugin_that_does_not_load_on_a_worker_is_told_by_its_code_only() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("a private directory");
        let objects =
            Objects::open(&format!("file://{}", dir.path().display())).expect("object store");
        let digest = objects
            .put_bytes(cloister_test_plugins::HOSTILE_NET.to_vec(), false)
            .expect("stored");
        let mut inputs = Inputs {
            objects,
            features: None,
            runtime: None,
            plugins: std::collections::HashMap::new(),
            vocabulary: None,
        };
        let Err(err) = inputs.plugin(&digest) else {
            panic!("a component importing sockets loaded");
        };
        let WorkError::PluginLoad { error, .. } = &err else {
            panic!("not a load failure: {err}");
        };
        assert_eq!(error.code(), "forbidden-imports");
        let detail = error.admin_detail();
        assert!(detail.contains("wasi:sockets"), "{detail}");
        let told = err.to_string();
        assert!(
            told.contains(&digest) && told.contains("(forbidden-imports)"),
            "{told}"
        );
        assert!(!told.contains("wasi:"), "{told}");
        assert!(inputs.plugins.is_empty(), "a refused plugin was kept");
    }

    #[test]
    fn progress_reports_are_read_only_with_the_environments_tag() {
        let key = tag_key(&[3; 32]);
        let stats = train::EpochStats {
            epoch: 4,
            train_loss: 0.5,
            val_loss: 0.6,
            val_accuracy: 0.9,
            samples_per_s: 1000.0,
            elapsed_s: 1.5,
        };
        let text = progress_text(&key, "task", &stats).expect("text");
        assert_eq!(read_progress(&key, "task", &text), Some(stats));
        assert_eq!(read_progress(&key, "another task", &text), None);
        assert_eq!(read_progress(&tag_key(&[4; 32]), "task", &text), None);
        let forged = text.replace("\"epoch\":4", "\"epoch\":40");
        assert_ne!(forged, text);
        assert_eq!(read_progress(&key, "task", &forged), None);
        assert_eq!(read_progress(&key, "task", "no tag at all"), None);
    }

    #[test]
    fn features_round_trip_and_bad_bytes_are_refused() {
        let x = SparseBatch {
            offsets: vec![0, 2, 2, 3],
            indices: vec![1, 7, 3],
            values: vec![0.5, -1.0, 2.0],
        };
        let bytes = encode_features(&x);
        assert_eq!(decode_features(&bytes).expect("decodes"), x);
        assert!(decode_features(&bytes[..bytes.len() - 1]).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode_features(&extra).is_err());
        let mut disordered = bytes.clone();
        // offsets[1] = 4 > nnz
        disordered[24 + 4] = 4;
        assert!(decode_features(&disordered).is_err());
        assert!(decode_features(b"CLFEAT1\n").is_err());
        assert!(decode_features(b"garbage").is_err());
    }

    fn record(id: &str, text: &str) -> DataRecord {
        DataRecord {
            id: id.into(),
            texts: vec![crate::types::TextField {
                name: "text".into(),
                value: text.into(),
            }],
            numerics: Vec::new(),
            label: Some("spam".into()),
        }
    }

    fn run_of(result: Result<StageOutput, RuntimeError>, dimension: u32, log: &[u8]) -> StageRun {
        StageRun {
            result,
            usage: Usage {
                calls: 2,
                fuel: 10,
                peak_memory_bytes: 64,
                wall_ms: 3,
            },
            log: (log.to_vec(), 1),
            dimension,
        }
    }

    #[test]
    fn stage_results_round_trip_and_are_held_to_their_task() {
        let shard = vec![record("a", "x"), record("b", "y"), record("c", "z")];
        // Records travel without their labels.
        let mut bytes = Vec::new();
        encode_records(&shard, &mut bytes);
        let back = decode_records(&mut Reader {
            bytes: &bytes,
            what: "test",
        })
        .expect("decodes");
        assert_eq!(back.len(), 3);
        assert!(back.iter().all(|r| r.label.is_none()));
        assert_eq!(back[1].text("text"), Some("y"));

        let kept = run_of(
            Ok(StageOutput::Records(vec![
                shard[0].clone(),
                shard[2].clone(),
            ])),
            0,
            b"hello",
        );
        let bytes = encode_stage_result(&kept, "w1", "task-1").expect("encodes");
        let got = decode_stage_result(&bytes, "task-1", StageOp::Preprocess, &shard).expect("ok");
        let Ok(StageOutput::Records(r)) = &got.result else {
            panic!("records expected")
        };
        assert_eq!(
            r.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!((got.log.0.as_slice(), got.log.1), (b"hello".as_slice(), 1));
        assert_eq!(got.usage, kept.usage);
        // Another task's result, or a result for another operation, is
        // refused.
        assert!(decode_stage_result(&bytes, "task-2", StageOp::Preprocess, &shard).is_err());
        assert!(decode_stage_result(&bytes, "task-1", StageOp::Featurize, &shard).is_err());
        // Records out of order, or not from the shard, are refused.
        for ids in [["c", "a"], ["a", "q"]] {
            let odd = run_of(
                Ok(StageOutput::Records(
                    ids.iter().map(|id| record(id, "x")).collect(),
                )),
                0,
                b"",
            );
            let bytes = encode_stage_result(&odd, "w1", "task-1").expect("encodes");
            assert!(decode_stage_result(&bytes, "task-1", StageOp::Preprocess, &shard).is_err());
        }
        // A featurizer's rows are one per record.
        let x = SparseBatch {
            offsets: vec![0, 1, 1],
            indices: vec![4],
            values: vec![1.0],
        };
        let two = encode_stage_result(&run_of(Ok(StageOutput::Features(x)), 8, b""), "w", "t")
            .expect("encodes");
        assert!(decode_stage_result(&two, "t", StageOp::Featurize, &shard).is_err());
        assert!(decode_stage_result(&two, "t", StageOp::Featurize, &shard[..2]).is_ok());
        // A failure comes back with its code, message and sealed detail.
        let failed = run_of(
            Err(RuntimeError::on_worker(
                "trap",
                "the plugin crashed".into(),
                "panic".into(),
            )),
            0,
            b"",
        );
        let bytes = encode_stage_result(&failed, "w", "t").expect("encodes");
        let got = decode_stage_result(&bytes, "t", StageOp::Featurize, &shard).expect("decodes");
        let err = got.result.expect_err("the failure");
        assert_eq!(
            (err.code(), err.to_string()),
            ("trap", "the plugin crashed".into())
        );
        assert_eq!(err.admin_detail(), "panic");
        // Truncated or padded bytes are refused.
        assert!(
            decode_stage_result(&bytes[..bytes.len() - 1], "t", StageOp::Featurize, &shard)
                .is_err()
        );
    }

    #[test]
    fn shards_join_in_order_and_the_earliest_failure_wins() {
        let rows = |index: u32| SparseBatch {
            offsets: vec![0, 1],
            indices: vec![index],
            values: vec![1.0],
        };
        let joined = merge_stage_runs(
            StageOp::Featurize,
            vec![
                run_of(Ok(StageOutput::Features(rows(1))), 8, b"a"),
                run_of(Ok(StageOutput::Features(rows(2))), 8, b"b"),
            ],
        );
        let Ok(StageOutput::Features(x)) = &joined.result else {
            panic!("features expected")
        };
        assert_eq!(
            (x.offsets.as_slice(), x.indices.as_slice()),
            ([0, 1, 2].as_slice(), [1, 2].as_slice())
        );
        assert_eq!(joined.dimension, 8);
        assert_eq!(
            (joined.log.0.as_slice(), joined.log.1),
            (b"ab".as_slice(), 2)
        );
        assert_eq!(
            (
                joined.usage.calls,
                joined.usage.fuel,
                joined.usage.peak_memory_bytes
            ),
            (4, 20, 64)
        );
        // Two dimensions: the run fails as one whose instances disagreed.
        let split = merge_stage_runs(
            StageOp::Featurize,
            vec![
                run_of(Ok(StageOutput::Features(rows(1))), 8, b""),
                run_of(Ok(StageOutput::Features(rows(2))), 9, b""),
            ],
        );
        assert_eq!(
            split.result.expect_err("dimensions differ").code(),
            "invalid-output"
        );
        // The earliest shard's failure is the run's.
        let failed = merge_stage_runs(
            StageOp::Featurize,
            vec![
                run_of(Ok(StageOutput::Features(rows(1))), 8, b""),
                run_of(
                    Err(RuntimeError::on_worker("trap", "t".into(), String::new())),
                    8,
                    b"",
                ),
                run_of(
                    Err(RuntimeError::on_worker(
                        "limit-fuel",
                        "f".into(),
                        String::new(),
                    )),
                    8,
                    b"",
                ),
            ],
        );
        assert_eq!(failed.result.expect_err("failed").code(), "trap");
        // A fit's counts are summed across shards.
        let terms = |counts: Vec<(u64, u32)>, documents| {
            run_of(
                Ok(StageOutput::Terms(TermCounts { documents, counts })),
                0,
                b"",
            )
        };
        let fit = merge_stage_runs(
            StageOp::Terms { max_distinct: 10 },
            vec![terms(vec![(1, 1), (3, 2)], 2), terms(vec![(3, 1)], 1)],
        );
        let Ok(StageOutput::Terms(t)) = fit.result else {
            panic!("terms expected")
        };
        assert_eq!((t.documents, t.counts), (3, vec![(1, 1), (3, 3)]));
    }

    #[test]
    fn tags_bind_the_result_to_its_task() {
        let key = tag_key(&[7u8; 32]);
        let t = ring::hmac::sign(&key, &result_message("a", "b"));
        assert!(ring::hmac::verify(&key, &result_message("a", "b"), t.as_ref()).is_ok());
        assert!(ring::hmac::verify(&key, &result_message("a", "c"), t.as_ref()).is_err());
        assert!(ring::hmac::verify(&key, &result_message("x", "b"), t.as_ref()).is_err());
        assert!(ring::hmac::verify(&key, &task_message(FIT, "a"), t.as_ref()).is_err());
        let fit = ring::hmac::sign(&key, &task_message(FIT, "a"));
        assert!(ring::hmac::verify(&key, &task_message(STAGE, "a"), fit.as_ref()).is_err());
    }
}
