//! Active-learning jobs: a pipeline run round by round, persisted step by
//! step.
//!
//! A job is a small state machine kept in [`Space::Jobs`]:
//!
//! ```text
//! Select(0) ─seed─▶ Answer(0) ─▶ Select(1) ─▶ Answer(1) ─▶ … ─▶ Finish ─▶ End
//!                        ▲                 └─target/max rounds/pool empty─▶ Finish
//!                        └ real labelers: waits (AwaitingLabels) until every item is answered
//! ```
//!
//! Each step's whole effect — automatic labels with their provenance, queue
//! items, oracle answers, the round report and the next step — is written
//! in **one** store commit. A process killed at any point therefore resumes
//! at the first step that did not commit, and a redone step computes the
//! same result (plugins are deterministic, training is seeded), so no work
//! that committed is redone and no label is lost or doubled.
//!
//! Labels a job creates live in its own ledger (`Space::Jobs`), not among
//! the dataset's labels: automatic labels belong to the job that accepted
//! them, and oracle answers are a measurement device. Human labels given
//! with `cloister label set` are dataset labels (provenance `human`), usable
//! by every later job.

pub(crate) mod committee;
pub(crate) mod label_file;
pub mod precision;
pub mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::datasets::Split;
use crate::store::{Expect, Space, Storage, StoreError, WriteBatch};

pub use spec::{Metric, Oracle, PipelineSpec, SelectorUse};

/// What a running job reports.
#[derive(Debug)]
pub enum JobEvent<'a> {
    /// A stage of preparing the data finished.
    Stage(crate::types::Stage),
    /// A model of the committee is training.
    Training {
        /// Round.
        round: u32,
        /// Template.
        template: &'a str,
        /// Labeled training records.
        records: usize,
    },
    /// A model finished.
    Trained {
        /// Round.
        round: u32,
        /// Its scores.
        score: &'a ModelScore,
    },
    /// A round's select step committed.
    Round(&'a RoundReport),
    /// A round's answers committed.
    Answered {
        /// Round.
        round: u32,
        /// Answers collected.
        answered: u64,
    },
    /// The queue waits for labelers.
    Waiting {
        /// Open items.
        open: u64,
    },
    /// The job finished.
    Finished(&'a FinalReport),
}

/// What a labeler is shown: the queue item, the record, how many items
/// wait for them (this one included) and the labels to choose from.
#[derive(Debug, Clone)]
pub struct LabelTask {
    /// The queue item.
    pub item: QueueItem,
    /// The record with its text.
    pub record: crate::datasets::StoredRecord,
    /// Items waiting for this labeler.
    pub waiting: usize,
    /// The job's classes.
    pub classes: Vec<String>,
}

/// An answer its labeler can still change (its round has not collected
/// it), with the labels it can change to.
#[derive(Debug, Clone, Serialize)]
pub struct OwnAnswer {
    /// The answered queue item.
    pub item: QueueItem,
    /// The job's classes.
    pub classes: Vec<String>,
}

/// The round whose answers `job` has still to collect, if any: until it
/// does, those answers can change. A cancelled or finished job collects
/// nothing more.
pub fn collecting(job: &Job) -> Option<u32> {
    match (&job.state, job.next) {
        (
            JobState::Running | JobState::AwaitingLabels { .. } | JobState::Failed { .. },
            Step::Answer(round),
        ) => Some(round),
        _ => None,
    }
}

/// Errors of jobs.
#[derive(Debug, Error)]
pub enum JobError {
    /// The pipeline spec is malformed.
    #[error("{file}:{}{message}", line.map(|l| format!("{l}: ")).unwrap_or_else(|| " ".into()))]
    Spec {
        /// The spec file.
        file: String,
        /// The line, when known.
        line: Option<usize>,
        /// What is wrong, naming the key.
        message: String,
    },
    /// No such job.
    #[error("no job {0}")]
    Unknown(String),
    /// The job cannot do that in its state.
    #[error("job {id} is {state}: {what}")]
    State {
        /// Job id.
        id: String,
        /// Its state.
        state: String,
        /// What was refused.
        what: &'static str,
    },
    /// The job is already being driven by this process.
    #[error("job {0} is already running")]
    Running(String),
    /// Another process wrote the job while this one was running a step of
    /// it: this run stops without writing, and the other's state stands.
    #[error("job {0} was changed by another process while this one ran it; this run stops")]
    Moved(String),
    /// Nothing queued for this labeler.
    #[error("no queued item {0} for you")]
    NotQueued(String),
    /// An answer can no longer change: its round has collected it.
    #[error(
        "round {round} of job {job} has collected its answers, {record}'s among them; an answer can change only until its round collects it"
    )]
    Collected {
        /// Job id.
        job: String,
        /// The item's round.
        round: u32,
        /// The record.
        record: String,
    },
    /// The item is still open: it has no answer to change.
    #[error("{0} is not answered yet: label it instead of changing it")]
    NotAnswered(String),
    /// A commit's other precondition than the job itself no longer held
    /// (the round's answers changed while a step read them): the step is
    /// taken again from what is stored now.
    #[error("job {0}: the answers changed while a step read them")]
    Raced(String),
    /// A label file is malformed.
    #[error("{file}:{line}: {message}")]
    LabelFile {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Stored job data is damaged.
    #[error("stored job data is damaged: {0}")]
    Damaged(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum JobState {
    /// Steps remain and the job can run.
    Running,
    /// Queue items wait for human labelers.
    AwaitingLabels {
        /// Items not answered yet.
        open: u64,
    },
    /// Finished.
    Done {
        /// Why it stopped: `target`, `budget`, `max-rounds` or `pool-empty`.
        reason: String,
    },
    /// Stopped by a user.
    Cancelled {
        /// Who.
        by: String,
    },
    /// A step failed; `resume` retries it.
    Failed {
        /// The error, as the operator sees it.
        error: String,
    },
}

impl JobState {
    /// A short name.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::AwaitingLabels { .. } => "awaiting-labels",
            JobState::Done { .. } => "done",
            JobState::Cancelled { .. } => "cancelled",
            JobState::Failed { .. } => "failed",
        }
    }
}

/// The next step of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", content = "round", rename_all = "kebab-case")]
pub enum Step {
    /// Train the committee, evaluate, select (round 0: draw the seed).
    Select(u32),
    /// Collect the answers to the round's queue.
    Answer(u32),
    /// Train the final models on every label and register them.
    Finish,
    /// Nothing left.
    End,
}

/// Digests the job resolved its plugins to when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedPlugins {
    /// Preprocessors with their resolved config.
    pub preprocess: Vec<(String, Vec<(String, String)>)>,
    /// Featurizer with its resolved config.
    pub features: (String, Vec<(String, String)>),
    /// Selector plugin with its resolved config, if not the built-in.
    pub selector: Option<(String, Vec<(String, String)>)>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id (`j-…`).
    pub id: String,
    /// The spec file's name.
    pub file: String,
    /// The spec as given.
    pub spec_text: String,
    /// The parsed spec.
    pub spec: PipelineSpec,
    /// SHA-256 of the spec text.
    pub spec_digest: String,
    /// Who started it.
    pub started_by: String,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// Last change.
    pub updated_ms: u64,
    /// `name@version` of the dataset, fixed at start.
    pub dataset: String,
    /// Content digest of that version.
    pub dataset_digest: String,
    /// Plugins, fixed at start.
    pub plugins: ResolvedPlugins,
    /// Class names, fixed at start (sorted).
    pub classes: Vec<String>,
    /// State.
    pub state: JobState,
    /// The next step.
    pub next: Step,
    /// Unlabeled training records when the job started (the pool).
    pub pool_size: u64,
    /// One report per completed round.
    pub rounds: Vec<RoundReport>,
    /// The final result, once finished.
    pub result: Option<FinalReport>,
    /// Open items moved from one labeler to another while the job ran,
    /// oldest first (see [`Job::labelers`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reassigned: Vec<Reassignment>,
}

/// A labeler's open items given to another labeler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassignment {
    /// The labeler the items were assigned to.
    pub from: String,
    /// The labeler they are assigned to now.
    pub to: String,
    /// Who moved them.
    pub by: String,
    /// When, ms since the epoch.
    pub time_ms: u64,
    /// Open items moved.
    pub items: u64,
}

impl Job {
    /// Who labels the items of the rounds to come, in turn: the spec's
    /// labelers, with each reassignment's `to` in its `from`'s place (a
    /// labeler already in the list keeps their one place).
    pub fn labelers(&self) -> Vec<String> {
        let mut now = self.spec.labelers.clone();
        for r in &self.reassigned {
            let mut next: Vec<String> = Vec::with_capacity(now.len());
            for l in now {
                let l = if l == r.from { r.to.clone() } else { l };
                if !next.contains(&l) {
                    next.push(l);
                }
            }
            now = next;
        }
        now
    }
}

/// How a model of the committee scored in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelScore {
    /// Template.
    pub template: String,
    /// Validation accuracy.
    pub val_accuracy: f64,
    /// Validation macro F1.
    pub val_macro_f1: f64,
    /// Epoch kept.
    pub best_epoch: u32,
    /// Training seconds.
    pub seconds: f64,
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RoundReport {
    /// Round number (0 is the seed draw).
    pub round: u32,
    /// Training records with a manual label (human or oracle) this round
    /// trained on.
    pub train_manual: u64,
    /// Training records with an automatic label.
    pub train_auto: u64,
    /// Training records with another label (gold, outside oracle mode).
    pub train_other: u64,
    /// Per model.
    pub models: Vec<ModelScore>,
    /// Committee (mean probability) validation accuracy.
    pub val_accuracy: Option<f64>,
    /// Committee validation macro F1.
    pub val_macro_f1: Option<f64>,
    /// Committee test accuracy.
    pub test_accuracy: Option<f64>,
    /// Committee test macro F1.
    pub test_macro_f1: Option<f64>,
    /// Records labeled automatically this round.
    pub auto_accepted: u64,
    /// Records the selector would have labeled automatically beyond the
    /// round's cap (`max_auto_per_round`); they stay in the pool.
    #[serde(default)]
    pub auto_deferred: u64,
    /// Of those, records with a known gold label.
    pub auto_checked: u64,
    /// Of those, automatic labels equal to gold.
    pub auto_correct: u64,
    /// The precision gate's thresholds and estimate (with `[auto_label]`).
    #[serde(default)]
    pub gate: Option<precision::GateReport>,
    /// Pool records sent to humans this round.
    pub queued: u64,
    /// Automatic labels of this round sent to humans as spot checks.
    #[serde(default)]
    pub spot_checks: u64,
    /// Spot checks answered.
    #[serde(default)]
    pub spot_checked: u64,
    /// Of those, answers equal to the automatic label.
    #[serde(default)]
    pub spot_agreed: u64,
    /// Automatic labels of this round revoked because the spot checks
    /// showed their precision below the target (they return to the
    /// pool).
    #[serde(default)]
    pub revoked: u64,
    /// Validation badcases sent for review this round.
    pub badcases_queued: u64,
    /// Answers collected for this round's queue.
    pub answered: u64,
    /// Manual labels (seed and pool items) asked for so far, this round's
    /// included.
    pub manual_total: u64,
    /// Pool records left unlabeled after this round's selection.
    pub pool_left: u64,
    /// Committee badcases on validation this round.
    pub badcases: u64,
    /// Badcases of the previous round the new committee gets right (ids).
    pub fixed: Vec<String>,
    /// Badcases that are new this round (ids).
    pub appeared: Vec<String>,
    /// Why the loop stops after this round, if it does.
    pub stop: Option<String>,
    /// Wall seconds of the round's select step.
    pub seconds: f64,
    /// All badcase ids (to compare with the next round).
    #[serde(default)]
    pub badcase_ids: Vec<String>,
}

/// The result of a finished job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalReport {
    /// Registered model ids, one per committee member.
    pub models: Vec<String>,
    /// Committee test accuracy.
    pub test_accuracy: f64,
    /// Committee test macro F1.
    pub test_macro_f1: f64,
    /// Training records the final models used.
    pub train_records: u64,
}

/// Where a label in a job's ledger came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LedgerSource {
    /// The gold oracle answered a queue item.
    Oracle,
    /// The selector accepted it automatically.
    Auto {
        /// Selector plugin digest.
        selector: String,
        /// Templates of the models that agreed, with the round.
        models: Vec<String>,
        /// Each model's probability for the label.
        confidences: Vec<f32>,
    },
}

/// A label in a job's ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerLabel {
    /// The class.
    pub label: String,
    /// Where it came from.
    pub source: LedgerSource,
    /// The round that produced it.
    pub round: u32,
    /// The gold label, where the dataset has one (for precision only;
    /// never used for training).
    pub gold: Option<String>,
}

/// Why an item is in the human queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueReason {
    /// The random first labels.
    Seed,
    /// The selector sent it.
    Selected,
    /// A misclassified validation record, for review.
    Badcase,
    /// An automatic label sent to a person to check the precision gate
    /// (`[auto_label] spot_check`). The person does not see the automatic
    /// label; their answer replaces it.
    #[serde(rename = "spot_check")]
    SpotCheck,
}

/// An answer to a queue item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The label.
    pub label: String,
    /// Who (`oracle:gold` for the oracle).
    pub by: String,
    /// When.
    pub time_ms: u64,
}

/// One item of the human queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueItem {
    /// Job id.
    pub job: String,
    /// Record id.
    pub record: String,
    /// `name@version` of the record's dataset.
    pub dataset: String,
    /// Round that queued it.
    pub round: u32,
    /// Position in the queue of its round, 0 first. Only the order a
    /// selector proposed is kept: the scores it returned are plugin-chosen
    /// numbers and are never stored or shown.
    #[serde(default)]
    pub rank: u32,
    /// Why.
    pub reason: QueueReason,
    /// The labeler, when real people answer.
    pub assignee: Option<String>,
    /// The answer, once given.
    pub answer: Option<Answer>,
}

// ---------------------------------------------------------------- keys --

const JOB: u8 = b'j';
const LEDGER: u8 = b'l';
const QUEUE: u8 = b'q';
const BY_USER: u8 = b'u';
const CANCEL: u8 = b'c';
const ANSWERS: u8 = b'a';

fn key(tag: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![tag];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn prefix(tag: u8, job: &str) -> Vec<u8> {
    let mut k = key(tag, &[job]);
    k.push(0);
    k
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, JobError> {
    serde_json::to_vec(v).map_err(|e| JobError::Damaged(e.to_string()))
}

fn parse<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, JobError> {
    serde_json::from_slice(bytes).map_err(|_| JobError::Damaged(what.to_string()))
}

/// Writes `job` (in a batch).
pub fn put_job(batch: &mut WriteBatch, job: &Job) -> Result<(), JobError> {
    batch.put(Space::Jobs, key(JOB, &[&job.id]), json(job)?);
    Ok(())
}

/// Reads a job; its state says `cancelled` once a cancel was recorded.
pub fn get(store: &dyn Storage, id: &str) -> Result<Job, JobError> {
    get_read(store, id).map(|(job, _)| job)
}

/// A job from its stored bytes, as stored (no cancel applied).
pub fn decode(bytes: &[u8], id: &str) -> Result<Job, JobError> {
    parse(bytes, &format!("job {id}"))
}

/// [`get`], with the stored bytes the job was decoded from: what a
/// [`commit_job`] of its next state must find still there.
pub fn get_read(store: &dyn Storage, id: &str) -> Result<(Job, Vec<u8>), JobError> {
    let bytes = store
        .get(Space::Jobs, &key(JOB, &[id]))?
        .ok_or_else(|| JobError::Unknown(id.to_string()))?;
    let mut job: Job = parse(&bytes, &format!("job {id}"))?;
    if let Some(by) = store.get(Space::Jobs, &key(CANCEL, &[id]))?
        && !matches!(job.state, JobState::Done { .. })
    {
        job.state = JobState::Cancelled {
            by: String::from_utf8_lossy(&by).into_owned(),
        };
    }
    Ok((job, bytes))
}

/// Writes `job` with the rest of `batch`, durably, only if the stored job
/// is still `read` (the bytes this process read or last wrote), and then
/// makes `read` the new bytes. Two processes driving one job therefore
/// cannot write over each other's steps: the later one gets
/// [`JobError::Moved`] and stops. (A cancel is a key of its own, so it
/// never collides with a step.)
pub fn commit_job(
    store: &dyn Storage,
    batch: WriteBatch,
    job: &Job,
    read: &mut Vec<u8>,
) -> Result<(), JobError> {
    commit_job_if(store, batch, job, read, Vec::new())
}

/// [`commit_job`], also only if every one of `also` holds. When the job
/// is still `read` but one of `also` failed, the error is
/// [`JobError::Raced`] (take the step again), not [`JobError::Moved`].
pub fn commit_job_if(
    store: &dyn Storage,
    mut batch: WriteBatch,
    job: &Job,
    read: &mut Vec<u8>,
    also: Vec<Expect>,
) -> Result<(), JobError> {
    let k = key(JOB, &[&job.id]);
    let bytes = json(job)?;
    batch.put(Space::Jobs, k.clone(), bytes.clone());
    let mut expect = vec![Expect::new(Space::Jobs, k.clone(), Some(read.clone()))];
    let more = !also.is_empty();
    expect.extend(also);
    match store.commit_if(&expect, batch) {
        Ok(()) => {
            *read = bytes;
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => {
            if more && store.get(Space::Jobs, &k)?.as_deref() == Some(read.as_slice()) {
                Err(JobError::Raced(job.id.clone()))
            } else {
                Err(JobError::Moved(job.id.clone()))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Job `id` left as it is, in a batch that must not land if it changed:
/// writes `read` (the bytes it was decoded from, [`get_read`]) back, and
/// returns the expectation that they are still there (a commit guards
/// only keys it writes). The bytes stay the same, so whoever drives the
/// job sees no change.
pub fn keep_job(batch: &mut WriteBatch, id: &str, read: &[u8]) -> Expect {
    let k = key(JOB, &[id]);
    batch.put(Space::Jobs, k.clone(), read.to_vec());
    Expect::new(Space::Jobs, k, Some(read.to_vec()))
}

/// The job's answers token: what a step that collects a round's answers
/// must find unchanged when it commits (a changed answer writes a new
/// one), as an expectation on its present value. The commit must also
/// write the key ([`touch_answers`]).
pub fn answers_expectation(store: &dyn Storage, job: &str) -> Result<Expect, JobError> {
    let k = key(ANSWERS, &[job]);
    let now = store.get(Space::Jobs, &k)?;
    Ok(Expect::new(Space::Jobs, k, now))
}

/// Writes a fresh answers token for `job` (in a batch): `token` is random,
/// so no later value repeats an earlier one.
pub fn touch_answers(batch: &mut WriteBatch, job: &str, token: Vec<u8>) {
    batch.put(Space::Jobs, key(ANSWERS, &[job]), token);
}

/// One queue item with the stored bytes it was decoded from (what a
/// change of it must find still there), if `record` is queued by `job`.
pub fn queue_item_read(
    store: &dyn Storage,
    job: &str,
    record: &str,
) -> Result<Option<(QueueItem, Expect)>, JobError> {
    let k = key(QUEUE, &[job, record]);
    let Some(bytes) = store.get(Space::Jobs, &k)? else {
        return Ok(None);
    };
    let item: QueueItem = parse(&bytes, "a queue item")?;
    Ok(Some((item, Expect::new(Space::Jobs, k, Some(bytes)))))
}

/// Every job, oldest first.
pub fn list(store: &dyn Storage) -> Result<Vec<Job>, JobError> {
    let mut ids = Vec::new();
    for item in store.scan(Space::Jobs, &[JOB]) {
        let (k, _) = item?;
        ids.push(String::from_utf8_lossy(&k[1..]).into_owned());
    }
    let mut jobs = ids
        .iter()
        .map(|id| get(store, id))
        .collect::<Result<Vec<_>, _>>()?;
    jobs.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
    Ok(jobs)
}

/// Records a cancellation (takes effect at the next step boundary).
pub fn cancel(store: &dyn Storage, id: &str, by: &str) -> Result<(), JobError> {
    let mut b = WriteBatch::new();
    b.put(Space::Jobs, key(CANCEL, &[id]), by.as_bytes().to_vec());
    Ok(store.commit(b)?)
}

/// The job's ledger, by record id.
pub fn ledger(store: &dyn Storage, job: &str) -> Result<BTreeMap<String, LedgerLabel>, JobError> {
    let p = prefix(LEDGER, job);
    let mut out = BTreeMap::new();
    for item in store.scan(Space::Jobs, &p) {
        let (k, v) = item?;
        let id = String::from_utf8_lossy(&k[p.len()..]).into_owned();
        out.insert(id, parse(&v, "a ledger label")?);
    }
    Ok(out)
}

/// Adds a ledger label (in a batch).
pub fn put_ledger(
    batch: &mut WriteBatch,
    job: &str,
    record: &str,
    label: &LedgerLabel,
) -> Result<(), JobError> {
    batch.put(Space::Jobs, key(LEDGER, &[job, record]), json(label)?);
    Ok(())
}

/// Removes a record's label from a job's ledger (a revoked automatic
/// label: the record returns to the pool).
pub fn delete_ledger(batch: &mut WriteBatch, job: &str, record: &str) {
    batch.delete(Space::Jobs, key(LEDGER, &[job, record]));
}

/// The job's queue, by record id.
pub fn queue(store: &dyn Storage, job: &str) -> Result<BTreeMap<String, QueueItem>, JobError> {
    let p = prefix(QUEUE, job);
    let mut out = BTreeMap::new();
    for item in store.scan(Space::Jobs, &p) {
        let (_, v) = item?;
        let q: QueueItem = parse(&v, "a queue item")?;
        out.insert(q.record.clone(), q);
    }
    Ok(out)
}

/// Writes a queue item and its labeler index (in a batch).
/// The key that marks `item` open in its assignee's queue (present, empty,
/// while unanswered; [`put_queue`] deletes it with the answer). What a
/// labeling expects, so that an item is answered once.
pub fn open_marker(item: &QueueItem) -> Option<Vec<u8>> {
    item.assignee
        .as_ref()
        .map(|user| key(BY_USER, &[user, &item.job, &item.record]))
}

pub fn put_queue(batch: &mut WriteBatch, item: &QueueItem) -> Result<(), JobError> {
    batch.put(
        Space::Jobs,
        key(QUEUE, &[&item.job, &item.record]),
        json(item)?,
    );
    if let Some(user) = &item.assignee {
        let k = key(BY_USER, &[user, &item.job, &item.record]);
        if item.answer.is_none() {
            batch.put(Space::Jobs, k, Vec::new());
        } else {
            batch.delete(Space::Jobs, k);
        }
    }
    Ok(())
}

/// Whether job `id` was cancelled: its queue takes no more answers.
pub fn is_cancelled(store: &dyn Storage, id: &str) -> Result<bool, JobError> {
    Ok(store.get(Space::Jobs, &key(CANCEL, &[id]))?.is_some())
}

/// Moves an open item to another labeler (in a batch): its answer stays
/// none, its old labeler's index entry goes, the new one's comes. Returns
/// the old entry's expectation (still open), which the batch writes.
pub fn reassign_item(
    batch: &mut WriteBatch,
    item: &QueueItem,
    to: &str,
) -> Result<Option<Expect>, JobError> {
    let old = open_marker(item);
    if let Some(k) = &old {
        batch.delete(Space::Jobs, k.clone());
    }
    let mut moved = item.clone();
    moved.assignee = Some(to.to_string());
    put_queue(batch, &moved)?;
    Ok(old.map(|k| Expect::new(Space::Jobs, k, Some(Vec::new()))))
}

/// The open items assigned to `user`: earliest round first, then by rank.
/// Items of a cancelled job are left out: nobody will collect them.
pub fn open_items_for(store: &dyn Storage, user: &str) -> Result<Vec<QueueItem>, JobError> {
    let p = {
        let mut k = key(BY_USER, &[user]);
        k.push(0);
        k
    };
    let mut cancelled: HashMap<String, bool> = HashMap::new();
    let mut out = Vec::new();
    for item in store.scan(Space::Jobs, &p) {
        let (k, _) = item?;
        let rest = &k[p.len()..];
        let cut = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| JobError::Damaged("a labeler index key".into()))?;
        let job = String::from_utf8_lossy(&rest[..cut]).into_owned();
        let record = String::from_utf8_lossy(&rest[cut + 1..]).into_owned();
        let gone = match cancelled.get(&job) {
            Some(&c) => c,
            None => {
                let c = is_cancelled(store, &job)?;
                cancelled.insert(job.clone(), c);
                c
            }
        };
        if gone {
            continue;
        }
        if let Some(v) = store.get(Space::Jobs, &key(QUEUE, &[&job, &record]))? {
            let q: QueueItem = parse(&v, "a queue item")?;
            if q.answer.is_none() {
                out.push(q);
            }
        }
    }
    out.sort_by(|a, b| {
        a.round
            .cmp(&b.round)
            .then_with(|| a.rank.cmp(&b.rank))
            .then_with(|| a.job.cmp(&b.job))
            .then_with(|| a.record.cmp(&b.record))
    });
    Ok(out)
}

// --------------------------------------------------------- statistics --

/// What `cloister job stats` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStats {
    /// Job id.
    pub job: String,
    /// State name.
    pub state: String,
    /// Rounds with training.
    pub rounds: u32,
    /// Unlabeled training records when the job started.
    pub pool_size: u64,
    /// Manual labels asked for (seed and selected pool records).
    pub manual_requested: u64,
    /// Manual labels given.
    pub manual_used: u64,
    /// Badcase reviews asked for.
    pub reviews_requested: u64,
    /// Badcase reviews given.
    pub reviews_done: u64,
    /// Labels accepted automatically.
    pub auto_accepted: u64,
    /// Automatic labels whose record has a gold label.
    pub auto_checked: u64,
    /// Automatic labels equal to gold.
    pub auto_correct: u64,
    /// `auto_correct / auto_checked`, when any were checked.
    pub auto_precision: Option<f64>,
    /// Spot checks answered (automatic labels checked by a person).
    #[serde(default)]
    pub spot_checked: u64,
    /// Of those, automatic labels the person confirmed.
    #[serde(default)]
    pub spot_agreed: u64,
    /// Automatic labels revoked after failed spot checks.
    #[serde(default)]
    pub revoked: u64,
    /// The precision gate's estimate of the automatic labels' precision,
    /// without gold: each round's estimate weighted by the labels it
    /// accepted (rounds run with `[auto_label]` only).
    #[serde(default)]
    pub auto_estimate: Option<f64>,
    /// The lowest lower end of those rounds' intervals.
    #[serde(default)]
    pub auto_estimate_low: Option<f64>,
    /// The highest upper end.
    #[serde(default)]
    pub auto_estimate_high: Option<f64>,
    /// Share of the labels obtained (manual, automatic, reviews) that are
    /// training labels.
    pub label_utilization: Option<f64>,
    /// Records labeled by two or more people.
    pub double_labeled: u64,
    /// Of those, records where everyone agreed.
    pub agreeing: u64,
    /// Price of one manual label.
    pub price_per_label: f64,
    /// Spent on manual labels and reviews.
    pub cost_spent: f64,
    /// What labeling the whole pool by hand would cost.
    pub cost_full_pool: f64,
    /// `cost_full_pool - cost_spent`.
    pub cost_saved: f64,
    /// Share of the pool labeled by hand.
    pub manual_share: Option<f64>,
    /// Committee test accuracy at the end (or the last round).
    pub test_accuracy: Option<f64>,
    /// Per labeler, the items of the round the job waits for (empty when
    /// it waits for none): who holds the job up.
    #[serde(default)]
    pub labelers: Vec<LabelerProgress>,
}

/// One labeler's items of the round a job is collecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelerProgress {
    /// The labeler.
    pub labeler: String,
    /// Items still open.
    pub open: u64,
    /// Items answered.
    pub answered: u64,
    /// Whether the account can answer them now: `false` when it was
    /// disabled or lost the labeler role (or is gone) after the round
    /// began, so the items wait for a reassignment. Filled in by the
    /// service, which reads the accounts ([`stats`] leaves it `true`).
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// Computes [`JobStats`]. `human_labels` maps record ids to the
/// `(user, label)` pairs of human labels in the dataset (for agreement).
pub fn stats(
    job: &Job,
    ledger: &BTreeMap<String, LedgerLabel>,
    queue: &BTreeMap<String, QueueItem>,
    human_labels: &HashMap<String, Vec<(String, String)>>,
) -> JobStats {
    let mut s = JobStats {
        job: job.id.clone(),
        state: job.state.name().to_string(),
        rounds: job.rounds.iter().filter(|r| !r.models.is_empty()).count() as u32,
        pool_size: job.pool_size,
        manual_requested: 0,
        manual_used: 0,
        reviews_requested: 0,
        reviews_done: 0,
        auto_accepted: 0,
        auto_checked: 0,
        auto_correct: 0,
        auto_precision: None,
        spot_checked: job.rounds.iter().map(|r| r.spot_checked).sum(),
        spot_agreed: job.rounds.iter().map(|r| r.spot_agreed).sum(),
        revoked: job.rounds.iter().map(|r| r.revoked).sum(),
        auto_estimate: None,
        auto_estimate_low: None,
        auto_estimate_high: None,
        label_utilization: None,
        double_labeled: 0,
        agreeing: 0,
        price_per_label: job.spec.settings.price_per_label,
        cost_spent: 0.0,
        cost_full_pool: 0.0,
        cost_saved: 0.0,
        manual_share: None,
        test_accuracy: job
            .result
            .as_ref()
            .map(|r| r.test_accuracy)
            .or_else(|| job.rounds.iter().rev().find_map(|r| r.test_accuracy)),
        labelers: Vec::new(),
    };
    if let Some(round) = collecting(job) {
        let mut by: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for q in queue.values().filter(|q| q.round == round) {
            if let Some(who) = &q.assignee {
                let e = by.entry(who).or_default();
                if q.answer.is_some() {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
            }
        }
        s.labelers = by
            .into_iter()
            .map(|(labeler, (open, answered))| LabelerProgress {
                labeler: labeler.to_string(),
                open,
                answered,
                active: true,
            })
            .collect();
    }
    for q in queue.values() {
        let done = q.answer.is_some();
        match q.reason {
            QueueReason::Badcase => {
                s.reviews_requested += 1;
                s.reviews_done += u64::from(done);
            }
            QueueReason::Seed | QueueReason::Selected | QueueReason::SpotCheck => {
                s.manual_requested += 1;
                s.manual_used += u64::from(done);
            }
        }
    }
    for l in ledger.values() {
        if let LedgerSource::Auto { .. } = l.source {
            s.auto_accepted += 1;
            if let Some(g) = &l.gold {
                s.auto_checked += 1;
                s.auto_correct += u64::from(*g == l.label);
            }
        }
    }
    if s.auto_checked > 0 {
        s.auto_precision = Some(s.auto_correct as f64 / s.auto_checked as f64);
    }
    let (mut weight, mut sum) = (0u64, 0.0f64);
    for r in &job.rounds {
        if let Some(g) = &r.gate
            && r.auto_accepted > r.revoked
            && let (Some(e), Some((lo, hi))) = (g.estimate, g.interval)
        {
            let kept = r.auto_accepted - r.revoked;
            weight += kept;
            sum += e * kept as f64;
            s.auto_estimate_low = Some(s.auto_estimate_low.map_or(lo, |v: f64| v.min(lo)));
            s.auto_estimate_high = Some(s.auto_estimate_high.map_or(hi, |v: f64| v.max(hi)));
        }
    }
    if weight > 0 {
        s.auto_estimate = Some(sum / weight as f64);
    }
    let obtained = s.manual_used + s.auto_accepted + s.reviews_done;
    if obtained > 0 {
        s.label_utilization = Some((s.manual_used + s.auto_accepted) as f64 / obtained as f64);
    }
    for labels in human_labels.values() {
        let users: HashSet<&str> = labels.iter().map(|(u, _)| u.as_str()).collect();
        if users.len() >= 2 {
            s.double_labeled += 1;
            let first = &labels[0].1;
            s.agreeing += u64::from(labels.iter().all(|(_, l)| l == first));
        }
    }
    let price = s.price_per_label;
    s.cost_spent = price * (s.manual_used + s.reviews_done) as f64;
    s.cost_full_pool = price * s.pool_size as f64;
    s.cost_saved = s.cost_full_pool - s.cost_spent;
    if s.pool_size > 0 {
        s.manual_share = Some(s.manual_used as f64 / s.pool_size as f64);
    }
    s
}

// ------------------------------------------------------------- labels --

/// The label the committee trains on for one record, and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    /// Human or oracle.
    Manual,
    /// Accepted automatically.
    Auto,
    /// Gold (outside oracle mode) or another source.
    Other,
}

/// One record of the prepared data.
#[derive(Debug, Clone)]
pub struct PreparedRow {
    /// Record id.
    pub id: String,
    /// Split.
    pub split: Split,
    /// Gold label.
    pub gold: Option<String>,
    /// The latest human label in the dataset.
    pub human: Option<String>,
}

/// The visible label of `row` for a job, with its kind. In oracle mode
/// gold labels of training records are hidden (the oracle reveals them).
pub fn visible_label<'a>(
    row: &'a PreparedRow,
    ledger: Option<&'a LedgerLabel>,
    oracle: bool,
) -> Option<(&'a str, LabelKind)> {
    if let Some(h) = &row.human {
        return Some((h, LabelKind::Manual));
    }
    if let Some(l) = ledger {
        let kind = match l.source {
            LedgerSource::Oracle => LabelKind::Manual,
            LedgerSource::Auto { .. } => LabelKind::Auto,
        };
        return Some((&l.label, kind));
    }
    match (&row.gold, oracle && row.split == Split::Train) {
        (Some(g), false) => Some((g, LabelKind::Other)),
        _ => None,
    }
}

/// A deterministic sample of `k` items of `from`.
pub fn sample<T: Clone>(from: &[T], k: usize, seed: u64) -> Vec<T> {
    let mut v = from.to_vec();
    let mut rng = crate::train::model::Rng::new(seed);
    rng.shuffle(&mut v);
    v.truncate(k);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(split: Split, gold: Option<&str>, human: Option<&str>) -> PreparedRow {
        PreparedRow {
            id: "r".into(),
            split,
            gold: gold.map(str::to_string),
            human: human.map(str::to_string),
        }
    }

    #[test]
    fn oracle_mode_hides_training_gold_but_not_evaluation_gold() {
        let train = row(Split::Train, Some("spam"), None);
        assert_eq!(visible_label(&train, None, true), None);
        assert_eq!(
            visible_label(&train, None, false),
            Some(("spam", LabelKind::Other))
        );
        let val = row(Split::Validation, Some("ham"), None);
        assert_eq!(
            visible_label(&val, None, true),
            Some(("ham", LabelKind::Other))
        );
        let oracle = LedgerLabel {
            label: "spam".into(),
            source: LedgerSource::Oracle,
            round: 0,
            gold: Some("spam".into()),
        };
        assert_eq!(
            visible_label(&train, Some(&oracle), true),
            Some(("spam", LabelKind::Manual))
        );
        let human = row(Split::Train, Some("spam"), Some("ham"));
        assert_eq!(
            visible_label(&human, Some(&oracle), true),
            Some(("ham", LabelKind::Manual))
        );
    }

    #[test]
    fn keys_of_one_job_do_not_prefix_another() {
        assert!(!key(QUEUE, &["j-1", "a"]).starts_with(&prefix(QUEUE, "j-12")));
        assert!(key(QUEUE, &["j-1", "a"]).starts_with(&prefix(QUEUE, "j-1")));
    }

    #[test]
    fn samples_are_deterministic_and_distinct() {
        let v: Vec<u32> = (0..100).collect();
        let a = sample(&v, 10, 7);
        assert_eq!(a, sample(&v, 10, 7));
        assert_ne!(a, sample(&v, 10, 8));
        let set: HashSet<u32> = a.iter().copied().collect();
        assert_eq!(set.len(), 10);
    }

    /// A job of `spec` on `d@1` (classes a and b), about to start.
    fn a_job(spec: PipelineSpec) -> Job {
        Job {
            id: "j-1".into(),
            file: "p.toml".into(),
            spec_text: String::new(),
            spec,
            spec_digest: String::new(),
            started_by: "u".into(),
            created_ms: 0,
            updated_ms: 0,
            dataset: "d@1".into(),
            dataset_digest: String::new(),
            plugins: ResolvedPlugins {
                preprocess: vec![],
                features: (String::new(), vec![]),
                selector: None,
            },
            classes: vec!["a".into(), "b".into()],
            state: JobState::Running,
            next: Step::Select(0),
            pool_size: 0,
            rounds: vec![],
            result: None,
            reassigned: Vec::new(),
        }
    }

    #[test]
    fn stats_count_savings_and_precision() {
        let spec = PipelineSpec::parse(
            "p.toml",
            "name='x'\ndataset='d'\nfeatures='f'\n[[model]]\ntemplate='logreg'\n[[model]]\ntemplate='mlp'\n[selector]\nbuiltin='random'\n[loop]\nper_round=1\nmax_rounds=1\nbudget=10\nprice_per_label=2.0\n",
        )
        .unwrap();
        let job = Job {
            pool_size: 100,
            ..a_job(spec)
        };
        let item = |r: &str, reason, answered: bool| QueueItem {
            job: "j-1".into(),
            record: r.into(),
            dataset: "d@1".into(),
            round: 0,
            rank: 0,
            reason,
            assignee: None,
            answer: answered.then(|| Answer {
                label: "a".into(),
                by: "x".into(),
                time_ms: 0,
            }),
        };
        let queue = BTreeMap::from([
            ("1".to_string(), item("1", QueueReason::Seed, true)),
            ("2".to_string(), item("2", QueueReason::Selected, false)),
            ("3".to_string(), item("3", QueueReason::Badcase, true)),
        ]);
        let auto = |label: &str, gold: &str| LedgerLabel {
            label: label.into(),
            source: LedgerSource::Auto {
                selector: "s".into(),
                models: vec![],
                confidences: vec![],
            },
            round: 1,
            gold: Some(gold.into()),
        };
        let ledger = BTreeMap::from([
            ("4".to_string(), auto("a", "a")),
            ("5".to_string(), auto("a", "b")),
        ]);
        let humans = HashMap::from([(
            "9".to_string(),
            vec![("x".into(), "a".into()), ("y".into(), "b".into())],
        )]);
        let s = stats(&job, &ledger, &queue, &humans);
        assert_eq!((s.manual_requested, s.manual_used), (2, 1));
        assert_eq!((s.reviews_requested, s.reviews_done), (1, 1));
        assert_eq!(s.auto_precision, Some(0.5));
        assert_eq!(s.label_utilization, Some(3.0 / 4.0));
        assert_eq!((s.double_labeled, s.agreeing), (1, 0));
        assert_eq!(s.cost_spent, 4.0);
        assert_eq!(s.cost_saved, 196.0);
        assert_eq!(s.manual_share, Some(0.01));
        // Not collecting a round: no labelers to wait for.
        assert!(s.labelers.is_empty());

        // Collecting round 0: who holds which items.
        let mut job = job;
        job.state = JobState::AwaitingLabels { open: 1 };
        job.next = Step::Answer(0);
        assert_eq!(collecting(&job), Some(0));
        let mut queue = queue;
        for (q, who) in queue.values_mut().zip(["lea", "leo", "lea"]) {
            q.assignee = Some(who.into());
        }
        let s = stats(&job, &ledger, &queue, &humans);
        let got: Vec<(&str, u64, u64)> = s
            .labelers
            .iter()
            .map(|l| (l.labeler.as_str(), l.open, l.answered))
            .collect();
        assert_eq!(got, [("lea", 0, 2), ("leo", 1, 0)]);
        job.state = JobState::Cancelled { by: "u".into() };
        assert_eq!(collecting(&job), None);
    }

    #[test]
    fn reassignments_give_places_in_the_rotation() {
        let spec = PipelineSpec::parse(
            "p.toml",
            "name='p'\ndataset='d'\nlabelers=['a','b','c']\nfeatures='f'\n[[model]]\ntemplate='logreg'\n[[model]]\ntemplate='mlp'\n[selector]\nbuiltin='random'\n[loop]\nper_round=1\nmax_rounds=1\nbudget=1\n",
        )
        .unwrap();
        let mut job = Job {
            state: JobState::AwaitingLabels { open: 1 },
            next: Step::Answer(1),
            ..a_job(spec)
        };
        let moved = |from: &str, to: &str| Reassignment {
            from: from.into(),
            to: to.into(),
            by: "u".into(),
            time_ms: 0,
            items: 0,
        };
        assert_eq!(job.labelers(), ["a", "b", "c"]);
        // A newcomer takes the place; someone already in keeps one place.
        job.reassigned.push(moved("b", "d"));
        assert_eq!(job.labelers(), ["a", "d", "c"]);
        job.reassigned.push(moved("c", "a"));
        assert_eq!(job.labelers(), ["a", "d"]);
        // Later reassignments apply to the list as it then stood.
        job.reassigned.push(moved("d", "b"));
        assert_eq!(job.labelers(), ["a", "b"]);
        assert_eq!(job.spec.labelers, ["a", "b", "c"]);
        // Stored without the field when there is none (a job's bytes do
        // not change by this field's existence), read back with it.
        let bytes = json(&job).unwrap();
        let back: Job = parse(&bytes, "job").unwrap();
        assert_eq!(back.reassigned.len(), 3);
        job.reassigned.clear();
        let bytes = json(&job).unwrap();
        assert!(!String::from_utf8(bytes).unwrap().contains("reassigned"));
    }
}
