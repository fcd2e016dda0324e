//! The tamper-evident audit log.
//!
//! Every operation, allowed or denied, is appended here **before** it takes
//! effect (see [`crate::service`]). An entry records sequence number, time,
//! actor, action, resource, decision, the deciding policies and a SHA-256
//! digest of the parameters — never data values.
//!
//! Tamper evidence has three layers:
//! 1. each stored entry carries an HMAC tag under a secret of the environment
//!    and its own sequence number and the leaf hash of its predecessor, so
//!    [`AuditLog::verify`] names the first edited, moved or missing entry;
//! 2. an RFC 6962 Merkle tree over the entries ([`merkle`]), whose current
//!    root is signed with Ed25519 at every commit (the *head*) and kept as a
//!    [`Checkpoint`] every `checkpoint_every` entries, so a dropped tail is
//!    detected;
//! 3. checkpoints exported with `cloister audit checkpoint` and kept outside
//!    the environment detect truncation and rollback to an older copy of the
//!    whole store, which no inside check can.
//!
//! Appends use group commit: concurrent writers hand their entries to one
//! committer thread, which writes everything waiting as one atomic, durable
//! batch and then acknowledges each writer.
//!
//! Several processes may append to one log (a PostgreSQL store shared by
//! the environment's writer and its readers): each group is committed with
//! [`Storage::commit_if`], expecting the tree state it was built on. When
//! another process appended first, the committer catches up with the log
//! (re-reading and checking it as at open) under the store's lock on
//! appends and builds the group again after it, so the log keeps one
//! total order, one chain and one tree. The in-memory head is a cache of
//! the stored one.

pub mod checkpoint;
pub mod merkle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use checkpoint::{AuditKeys, Checkpoint};
use merkle::{Frontier, Hash};

use crate::store::{Expect, Space, Storage, StoreError, WriteBatch};

const HEAD_KEY: &[u8] = b"audit-head";
const FRONTIER_KEY: &[u8] = b"audit-frontier";
/// Most entries one group commit writes.
const MAX_GROUP: usize = 4096;
/// How often [`AuditLog::load_state`] re-reads a state that moved while it
/// was being read, before it judges what it has.
const LOAD_TRIES: usize = 100;
/// How often one group commit is rebuilt after other processes appended
/// first, before it gives up (without failing the log closed).
const COMMIT_TRIES: usize = 1000;
/// The name of the store's lock that appends of several processes take
/// once they collide (see [`Storage::exclusive`]).
const APPEND_LOCK: &str = "cloister-audit-append";
/// How long a process that collided keeps appending under that lock.
const CONTENDED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Errors of the audit log.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log failed an earlier write or its head does not match its
    /// entries; it accepts no more appends (fail closed).
    #[error("the audit log is unavailable ({0}); no operation can proceed until it is repaired")]
    Unavailable(String),
    /// Bad key material.
    #[error("audit keys: {0}")]
    Keys(String),
    /// A checkpoint or proof file is malformed or does not verify.
    #[error("checkpoint: {0}")]
    BadCheckpoint(String),
    /// A requested entry does not exist.
    #[error("there is no audit entry {0}")]
    NoSuchEntry(u64),
    /// A proof file is malformed.
    #[error("proof: {0}")]
    BadProof(String),
    /// Other processes appended so fast that this one could not read a
    /// consistent state of the log; nothing was written, and the log stays
    /// open (try again).
    #[error("the audit log is too busy ({0}); try again")]
    Busy(String),
}

/// Outcome of the authorization check, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The operation was allowed.
    Allow,
    /// The operation was denied.
    Deny,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        })
    }
}

/// The actions the host records on its own account, beside the policy
/// schema's actions (which every authorized operation records under its
/// own name): the environment's life, sign-ins and refused requests,
/// plugin stages, and the steps of jobs and deployments that no request
/// makes. Every entry's action is one of the two sets.
pub mod events {
    /// The environment was created.
    pub const INIT: &str = "init";
    /// The policy schema was rewritten to the running version's.
    pub const REFRESH_SCHEMA: &str = "refresh_schema";
    /// The store's layout was migrated.
    pub const MIGRATE_STORE: &str = "migrate_store";
    /// The store was moved to another backend.
    pub const MOVE_STORE: &str = "move_store";
    /// An admin account restored by the environment's owner, without a
    /// token (`cloister recover-admin`).
    pub const RECOVER_ADMIN: &str = "recover_admin";
    /// A console sign-in, allowed or refused.
    pub const LOGIN: &str = "login";
    /// A token was refused.
    pub const AUTHENTICATE: &str = "authenticate";
    /// A console request without its CSRF token.
    pub const CSRF: &str = "csrf";
    /// A cross-site request to the console.
    pub const CROSS_SITE_REQUEST: &str = "cross_site_request";
    /// One plugin stage, with its outcome.
    pub const PLUGIN_CALL: &str = "plugin_call";
    /// A deployment's captured request stored as data.
    pub const CAPTURE: &str = "capture";
    /// A job resumed by another process.
    pub const TAKE_OVER_JOB: &str = "take_over_job";
    /// A job's automatic labels withdrawn.
    pub const REVOKE_AUTO_LABELS: &str = "revoke_auto_labels";
    /// A deployment's traffic share stepped.
    pub const RAMP: &str = "ramp";

    /// All of them.
    pub const ALL: [&str; 14] = [
        INIT,
        REFRESH_SCHEMA,
        MIGRATE_STORE,
        RECOVER_ADMIN,
        MOVE_STORE,
        LOGIN,
        AUTHENTICATE,
        CSRF,
        CROSS_SITE_REQUEST,
        PLUGIN_CALL,
        CAPTURE,
        TAKE_OVER_JOB,
        REVOKE_AUTO_LABELS,
        RAMP,
    ];
}

/// What a caller asks to record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Who acted (a user name, or `-` when unauthenticated).
    pub actor: String,
    /// The action, as named in the policy schema.
    pub action: String,
    /// The resource, as a Cedar entity uid.
    pub resource: String,
    /// The decision.
    pub decision: Decision,
    /// Ids of the policies that decided.
    pub policies: Vec<String>,
    /// Hex SHA-256 of the operation's canonical parameters.
    pub params: String,
    /// For `plugin_call` entries: how one plugin stage ended and what it
    /// used. Absent from every other entry (and from entries written before
    /// it existed, whose canonical bytes are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<PluginOutcome>,
    /// For `predict` entries: what the request asked of the deployment.
    /// Absent from every other entry (and from entries written before it
    /// existed, whose canonical bytes are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingFacts>,
    /// For `add_user` and `change_roles` entries: the roles given and
    /// taken away. Absent from every other entry (and from entries written
    /// before it existed, whose canonical bytes are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountFacts>,
}

/// The roles an account entry asked to give and take away (`add_user`,
/// `change_roles`), so that the log says who was made what, not only that
/// an account changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountFacts {
    /// Roles given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted: Vec<String>,
    /// Roles taken away.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
}

impl AccountFacts {
    /// `+admin +reviewer -labeler`: how log readers show the change.
    pub fn text(&self) -> String {
        let given = self.granted.iter().map(|r| format!("+{r}"));
        let taken = self.revoked.iter().map(|r| format!("-{r}"));
        given.chain(taken).collect::<Vec<_>>().join(" ")
    }
}

/// What a prediction request asked (`predict` entries): host-chosen
/// facts and a digest of the input, never the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingFacts {
    /// The deployment.
    pub deployment: String,
    /// The model that answers.
    pub model: String,
    /// `champion` or `candidate`.
    pub variant: String,
    /// Records sent.
    pub records: u64,
    /// Hex SHA-256 of the records as sent (JSON).
    pub input_sha256: String,
    /// The shadow model that also receives the request, if sampled.
    pub shadow: Option<String>,
}

/// The outcome of one plugin stage of a run (`plugin_call` entries).
///
/// Everything here is host-chosen or coarse: the code is one of the
/// runtime's fixed codes, counts are what the host sent and kept, and the
/// resource figures are rounded up to a power of two, so that a plugin
/// cannot write exact numbers of its choosing into a log its auditors read
/// (the exact figures are in the administrators' plugin log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginOutcome {
    /// `preprocess`, `featurize` or `select`.
    pub stage: String,
    /// What the stage served: `train m-…`, `job j-… round N`, `predict m-…`.
    pub purpose: String,
    /// `ok`, or the runtime's error code (`invalid-output`, `limit-fuel`, …).
    pub code: String,
    /// Records (or prediction sets) the host sent.
    pub records_in: u64,
    /// Records (or rows, decisions) accepted from the plugin; 0 on failure.
    pub records_out: u64,
    /// Fuel consumed, rounded up to a power of two.
    pub fuel: u64,
    /// Largest linear memory of any instance in bytes, rounded up to a
    /// power of two.
    pub peak_memory_bytes: u64,
    /// Wall-clock time inside the plugin in ms, rounded up to a power of two.
    /// (The stage's plugin-log entry, if any, has this entry's sequence
    /// number.)
    pub wall_ms: u64,
}

/// A stored entry. Field order is the canonical serialization order:
/// `seq`, `time_ms`, the record's fields, `prev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// Append time, ms since the epoch.
    pub time_ms: u64,
    /// What was recorded.
    #[serde(flatten)]
    pub record: AuditRecord,
    /// Hex leaf hash of the previous entry (zeros for the first).
    pub prev: String,
}

/// Filters for [`AuditLog::query`].
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only entries at or after this time (ms).
    pub since_ms: Option<u64>,
    /// Only this decision.
    pub decision: Option<Decision>,
    /// Only entries on this resource, as a Cedar entity uid
    /// (`Account::"ana"`; see [`crate::policy::uid_of`]).
    pub resource: Option<String>,
    /// Skip entries before this sequence number.
    pub from_seq: u64,
    /// At most this many entries.
    pub limit: usize,
}

/// What [`AuditLog::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything checks out.
    Intact {
        /// Entries verified.
        size: u64,
        /// Their Merkle root.
        root: Hash,
        /// Stored checkpoints that matched.
        checkpoints: usize,
    },
    /// Tampering detected.
    Tampered {
        /// The first bad entry (or the first missing position).
        first_bad: u64,
        /// What is wrong, in words.
        reason: String,
    },
}

/// An inclusion proof in its portable (JSON) form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// The entry's sequence number (its leaf index).
    pub seq: u64,
    /// The entry's canonical bytes, as text.
    pub entry: String,
    /// Hex sibling hashes, leaf to root.
    pub path: Vec<String>,
    /// The signed checkpoint (text form) whose root the path leads to.
    pub checkpoint: String,
}

struct Job {
    record: AuditRecord,
    reply: Reply,
}

/// Where the committer reports a record's sequence number: a thread blocked
/// in [`AuditLog::append`], or a task awaiting [`AuditLog::submit`].
enum Reply {
    Blocking(SyncSender<Result<u64, AuditError>>),
    Async(tokio::sync::oneshot::Sender<Result<u64, AuditError>>),
}

impl Reply {
    fn send(self, result: Result<u64, AuditError>) {
        // A caller that went away (a dropped request) needs no answer; its
        // record is committed all the same.
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct State {
    frontier: Frontier,
    prev: Hash,
    /// The tree state's bytes as stored (`None` before the first append):
    /// what the next group commit expects to replace.
    stored: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Storage>,
    keys: Arc<AuditKeys>,
    origin: String,
    checkpoint_every: u64,
    state: Mutex<State>,
    failed: AtomicBool,
    failure: Mutex<String>,
}

/// The audit log of one environment. See the module docs.
#[derive(Debug)]
pub struct AuditLog {
    inner: Arc<Inner>,
    tx: Mutex<Option<Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("record", &self.record).finish()
    }
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Splits a stored value into (tag, entry bytes).
fn split_value(value: &[u8]) -> Option<(&[u8], &[u8])> {
    (value.len() > 32).then(|| value.split_at(32))
}

impl AuditLog {
    /// Opens the log over `store`. A head that does not match the stored
    /// entries leaves the log open for reading and verification but refuses
    /// appends, so every operation fails closed.
    pub fn open(
        store: Arc<dyn Storage>,
        keys: Arc<AuditKeys>,
        origin: &str,
        checkpoint_every: u64,
    ) -> Result<Self, AuditError> {
        let (state, problem) = Self::load_state(store.as_ref(), &keys)?;
        let inner = Arc::new(Inner {
            store,
            keys,
            origin: origin.to_string(),
            checkpoint_every: checkpoint_every.max(1),
            state: Mutex::new(state),
            failed: AtomicBool::new(problem.is_some()),
            failure: Mutex::new(problem.unwrap_or_default()),
        });
        let (tx, rx) = channel::<Job>();
        let worker_inner = Arc::clone(&inner);
        let worker = std::thread::Builder::new()
            .name("audit-commit".into())
            .spawn(move || committer(&worker_inner, &rx))
            .map_err(|e| AuditError::Unavailable(format!("cannot start the committer: {e}")))?;
        Ok(Self {
            inner,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Reads the tree state, the last entry and the signed head, and checks
    /// that they agree. Another process may append between these reads (a
    /// PostgreSQL store shared by several processes); every append changes
    /// the stored tree state in the same transaction as its entries and
    /// head, so the reads are repeated until the tree state read last is
    /// the one read first.
    fn load_state(
        store: &dyn Storage,
        keys: &AuditKeys,
    ) -> Result<(State, Option<String>), AuditError> {
        for _ in 0..LOAD_TRIES {
            let before = store.get(Space::Meta, FRONTIER_KEY)?;
            let loaded = Self::load_state_from(store, keys, before.clone())?;
            let after = store.get(Space::Meta, FRONTIER_KEY)?;
            if before == after {
                return Ok(loaded);
            }
        }
        // Not a finding about the log: it is not failed closed for this.
        Err(AuditError::Busy(format!(
            "the log moved {LOAD_TRIES} times while it was being read"
        )))
    }

    fn load_state_from(
        store: &dyn Storage,
        keys: &AuditKeys,
        stored: Option<Vec<u8>>,
    ) -> Result<(State, Option<String>), AuditError> {
        let frontier = match &stored {
            None => Frontier::new(),
            Some(b) => match Frontier::from_bytes(b) {
                Some(f) => f,
                None => {
                    return Ok((
                        State {
                            frontier: Frontier::new(),
                            prev: [0; 32],
                            stored,
                        },
                        Some("the stored tree state is malformed".into()),
                    ));
                }
            },
        };
        let size = frontier.size();
        let last = store.last(Space::Audit, b"")?;
        let mut problem = None;
        let prev = match &last {
            Some((k, v)) => {
                let expected = size.checked_sub(1).map(seq_key);
                if expected.as_ref().map(|e| e.as_slice()) != Some(k.as_slice()) {
                    problem = Some("the last entry does not match the tree head".to_string());
                }
                split_value(v)
                    .map(|(_, e)| merkle::leaf_hash(e))
                    .unwrap_or([0; 32])
            }
            None => {
                if size != 0 {
                    problem = Some("entries are missing".to_string());
                }
                [0; 32]
            }
        };
        if problem.is_none() {
            match store.get(Space::Meta, HEAD_KEY)? {
                Some(text) => {
                    let head = std::str::from_utf8(&text)
                        .map_err(|_| AuditError::BadCheckpoint("head is not text".into()))
                        .and_then(Checkpoint::parse);
                    match head {
                        Ok(h)
                            if h.verify_signature(&keys.public_key()).is_ok()
                                && h.size == size
                                && h.root == frontier.root() => {}
                        _ => problem = Some("the signed head does not match the entries".into()),
                    }
                }
                None if size > 0 => problem = Some("the signed head is missing".into()),
                None => {}
            }
        }
        Ok((
            State {
                frontier,
                prev,
                stored,
            },
            problem,
        ))
    }

    wall! {
        /// Appends one record durably and returns its sequence number. Blocks
        /// until the record is on disk; concurrent callers share one flush.
        fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
            let (reply, wait) = sync_channel(1);
            self.enqueue(record, Reply::Blocking(reply))?;
            wait.recv()
                .map_err(|_| AuditError::Unavailable("the committer stopped".into()))?
        }
    }

    /// Queues one record for the next group commit and returns a future of
    /// its sequence number, ready once the record is on disk: the
    /// `AuditLog::append` of async callers, which wait without holding a
    /// thread. The record's place in the log is fixed by this call; it is
    /// committed even if the future is dropped.
    pub fn submit(
        &self,
        record: AuditRecord,
    ) -> Result<impl Future<Output = Result<u64, AuditError>> + Send + 'static, AuditError> {
        let (reply, wait) = tokio::sync::oneshot::channel();
        self.enqueue(record, Reply::Async(reply))?;
        Ok(async move {
            wait.await
                .map_err(|_| AuditError::Unavailable("the committer stopped".into()))?
        })
    }

    fn enqueue(&self, record: AuditRecord, reply: Reply) -> Result<(), AuditError> {
        self.check_available()?;
        let tx = self.tx.lock().map_err(|_| poisoned())?;
        let tx = tx
            .as_ref()
            .ok_or_else(|| AuditError::Unavailable("the log is closed".into()))?;
        tx.send(Job { record, reply })
            .map_err(|_| AuditError::Unavailable("the committer stopped".into()))
    }

    fn check_available(&self) -> Result<(), AuditError> {
        if self.inner.failed.load(Ordering::SeqCst) {
            let why = self
                .inner
                .failure
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            return Err(AuditError::Unavailable(why));
        }
        Ok(())
    }

    /// Whether the log accepts appends (it has not failed closed).
    pub fn available(&self) -> bool {
        !self.inner.failed.load(Ordering::SeqCst)
    }

    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.inner
            .state
            .lock()
            .map(|s| s.frontier.size())
            .unwrap_or(0)
    }

    /// The environment id the log signs as.
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// The public key checkpoints are signed with.
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.keys.public_key()
    }

    wall! {
        /// Signs bytes with the environment key (see [`AuditKeys::sign_bytes`]).
        fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
            self.inner.keys.sign_bytes(message)
        }
    }

    /// Signs, stores and returns a checkpoint of the current state.
    pub fn checkpoint(&self) -> Result<Checkpoint, AuditError> {
        self.check_available()?;
        let state = self.inner.state.lock().map_err(|_| poisoned())?;
        let cp = self.inner.keys.sign(
            &self.inner.origin,
            state.frontier.size(),
            state.frontier.root(),
            crate::time::now_ms(),
        );
        let mut b = WriteBatch::new();
        b.put(
            Space::Checkpoints,
            cp.size.to_be_bytes().to_vec(),
            cp.to_text().into_bytes(),
        );
        self.inner.store.commit(b)?;
        Ok(cp)
    }

    /// Entries matching `filter`, oldest first. Stops at the first entry it
    /// cannot read and reports it: run `verify` for the full diagnosis.
    pub fn query(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, AuditError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .store
            .scan_from(Space::Audit, &seq_key(filter.from_seq))
        {
            let (k, v) = item?;
            let entry = split_value(&v)
                .and_then(|(_, e)| serde_json::from_slice::<AuditEntry>(e).ok())
                .ok_or_else(|| {
                    AuditError::Unavailable(format!(
                        "entry at key {} is unreadable; run `cloister audit verify`",
                        hex::encode(&k)
                    ))
                })?;
            let r = &entry.record;
            let keep = filter.actor.as_ref().is_none_or(|a| a == &r.actor)
                && filter.action.as_ref().is_none_or(|a| a == &r.action)
                && filter.decision.is_none_or(|d| d == r.decision)
                && filter.resource.as_ref().is_none_or(|x| x == &r.resource)
                && filter.since_ms.is_none_or(|t| entry.time_ms >= t);
            if keep {
                out.push(entry);
                if filter.limit > 0 && out.len() >= filter.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Re-reads the whole log and checks every layer of tamper evidence
    /// available inside the environment; with `external`, also checks that
    /// the log still extends that checkpoint (detecting truncation and
    /// rollback to an older copy of the store).
    pub fn verify(&self, external: Option<&Checkpoint>) -> Result<Verdict, AuditError> {
        let keys = &self.inner.keys;
        let store = &self.inner.store;
        let tampered = |first_bad: u64, reason: String| Ok(Verdict::Tampered { first_bad, reason });

        let mut stored_cps = Vec::new();
        for item in store.scan(Space::Checkpoints, b"") {
            let (k, v) = item?;
            let cp = std::str::from_utf8(&v)
                .map_err(|_| AuditError::BadCheckpoint("not text".into()))
                .and_then(Checkpoint::parse)
                .and_then(|cp| cp.verify_signature(&keys.public_key()).map(|()| cp));
            match cp {
                Ok(cp) if k.as_slice() == cp.size.to_be_bytes() => stored_cps.push(cp),
                _ => {
                    let at = k
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    return tampered(
                        at,
                        format!("the stored checkpoint at size {at} is forged or damaged"),
                    );
                }
            }
        }
        if let Some(ext) = external {
            ext.verify_signature(&keys.public_key())?;
            if ext.origin != self.inner.origin {
                return Err(AuditError::BadCheckpoint(format!(
                    "the checkpoint is for environment `{}`, this is `{}`",
                    ext.origin, self.inner.origin
                )));
            }
            stored_cps.push(ext.clone());
        }
        stored_cps.sort_by_key(|c| c.size);

        let mut walk = Walk {
            keys,
            frontier: Frontier::new(),
            prev: [0; 32],
            cps: stored_cps,
            next_cp: 0,
            matched: 0,
        };
        if let Some(bad) = walk.checkpoints_at_size()? {
            return Ok(bad);
        }
        if let Some(bad) = walk.entries(store.scan(Space::Audit, b""))? {
            return Ok(bad);
        }
        // The head is read after the entries: whatever it covers was
        // committed with it, before it was read. Another process may have
        // appended after the scan passed (a shared PostgreSQL store); such
        // entries are read and checked too, until the entries read are the
        // ones the head covers or a read finds nothing new.
        let head = loop {
            let head = match store.get(Space::Meta, HEAD_KEY)? {
                None => None,
                Some(text) => {
                    let head = std::str::from_utf8(&text)
                        .map_err(|_| AuditError::BadCheckpoint("not text".into()))
                        .and_then(Checkpoint::parse)
                        .and_then(|h| h.verify_signature(&keys.public_key()).map(|()| h));
                    match head {
                        Ok(h) => Some(h),
                        Err(_) => {
                            return tampered(
                                walk.frontier.size(),
                                "the signed head is forged or damaged".into(),
                            );
                        }
                    }
                }
            };
            let size = walk.frontier.size();
            match &head {
                Some(h) if h.size > size => {
                    let more = store.scan_from(Space::Audit, &seq_key(size));
                    if let Some(bad) = walk.entries(more)? {
                        return Ok(bad);
                    }
                    if walk.frontier.size() == size {
                        break head;
                    }
                }
                _ => break head,
            }
        };
        let frontier = &walk.frontier;
        let size = frontier.size();
        if let Some(cp) = walk.cps.get(walk.next_cp) {
            return tampered(
                size,
                format!(
                    "the log has {size} entries but a checkpoint signed at {} covers {}: entries from {size} on were removed (truncation or rollback to an older copy)",
                    crate::time::rfc3339(cp.time_ms),
                    cp.size
                ),
            );
        }
        match head {
            Some(h) if h.size > size => {
                return tampered(
                    size,
                    format!(
                        "the signed head covers {} entries but only {size} are stored: entries from {size} on were removed",
                        h.size
                    ),
                );
            }
            Some(h) if h.size < size => {
                return tampered(
                    h.size,
                    format!(
                        "entries from {} on are not covered by the signed head: they were added outside cloister",
                        h.size
                    ),
                );
            }
            Some(h) if h.root != frontier.root() => {
                return tampered(
                    size.saturating_sub(1),
                    "the entries do not match the signed head".into(),
                );
            }
            Some(_) => {}
            None if size > 0 => return tampered(0, "the signed head is missing".into()),
            None => {}
        }
        let matched = walk.matched;
        Ok(Verdict::Intact {
            size,
            root: frontier.root(),
            checkpoints: matched,
        })
    }

    /// An inclusion proof for entry `seq` against a fresh signed checkpoint.
    pub fn prove(&self, seq: u64) -> Result<InclusionProof, AuditError> {
        let mut leaves = Vec::new();
        let mut entry_text = None;
        for item in self.inner.store.scan(Space::Audit, b"") {
            let (_, v) = item?;
            let (_, bytes) = split_value(&v).ok_or_else(|| {
                AuditError::Unavailable("an entry is truncated; run `cloister audit verify`".into())
            })?;
            if leaves.len() as u64 == seq {
                entry_text = Some(String::from_utf8_lossy(bytes).into_owned());
            }
            leaves.push(merkle::leaf_hash(bytes));
        }
        let entry = entry_text.ok_or(AuditError::NoSuchEntry(seq))?;
        let index = usize::try_from(seq).map_err(|_| AuditError::NoSuchEntry(seq))?;
        let path = merkle::inclusion_proof(&leaves, index).ok_or(AuditError::NoSuchEntry(seq))?;
        let root = merkle::root(&leaves);
        let cp = self.inner.keys.sign(
            &self.inner.origin,
            leaves.len() as u64,
            root,
            crate::time::now_ms(),
        );
        Ok(InclusionProof {
            seq,
            entry,
            path: path.iter().map(hex::encode).collect(),
            checkpoint: cp.to_text(),
        })
    }

    /// Checks an inclusion proof against this environment's public key.
    /// Needs nothing else from the environment.
    pub fn check_proof(
        proof: &InclusionProof,
        trusted_key: &[u8; 32],
    ) -> Result<Checkpoint, AuditError> {
        let cp = Checkpoint::parse(&proof.checkpoint)?;
        cp.verify_signature(trusted_key)?;
        let mut path = Vec::with_capacity(proof.path.len());
        for (i, h) in proof.path.iter().enumerate() {
            let bytes = hex::decode(h)
                .map_err(|_| AuditError::BadProof(format!("path[{i}] is not hex")))?;
            let hash: Hash = bytes
                .try_into()
                .map_err(|_| AuditError::BadProof(format!("path[{i}] is not 32 bytes")))?;
            path.push(hash);
        }
        let entry: AuditEntry = serde_json::from_str(&proof.entry)
            .map_err(|e| AuditError::BadProof(format!("entry is not an audit entry: {e}")))?;
        if entry.seq != proof.seq {
            return Err(AuditError::BadProof(format!(
                "the entry is number {}, the proof claims {}",
                entry.seq, proof.seq
            )));
        }
        let leaf = merkle::leaf_hash(proof.entry.as_bytes());
        if merkle::verify_inclusion(proof.seq, cp.size, &leaf, &path, &cp.root) {
            Ok(cp)
        } else {
            Err(AuditError::BadProof(format!(
                "entry {} is not included in the checkpointed log",
                proof.seq
            )))
        }
    }
}

/// The state of [`AuditLog::verify`] as it reads the entries in order.
struct Walk<'a> {
    keys: &'a AuditKeys,
    frontier: Frontier,
    prev: Hash,
    /// Checkpoints to compare against, by size.
    cps: Vec<Checkpoint>,
    /// The first checkpoint not yet reached.
    next_cp: usize,
    matched: usize,
}

impl Walk<'_> {
    /// Compares the checkpoints of the tree's current size with its root.
    fn checkpoints_at_size(&mut self) -> Result<Option<Verdict>, AuditError> {
        while let Some(cp) = self.cps.get(self.next_cp) {
            if cp.size != self.frontier.size() {
                break;
            }
            if cp.root != self.frontier.root() {
                let reason = if cp.size == 0 {
                    "a checkpoint of the empty log has the wrong root".to_string()
                } else {
                    format!(
                        "the first {} entries do not match the checkpoint signed at {}: the log was rewritten or rolled back",
                        cp.size,
                        crate::time::rfc3339(cp.time_ms)
                    )
                };
                return Ok(Some(Verdict::Tampered {
                    first_bad: cp.size.saturating_sub(1),
                    reason,
                }));
            }
            self.next_cp += 1;
            self.matched += 1;
        }
        Ok(None)
    }

    /// Checks `entries` (stored entries, in key order, starting where the
    /// walk stands) and adds them to the tree.
    fn entries(
        &mut self,
        entries: impl Iterator<Item = Result<crate::store::Entry, StoreError>>,
    ) -> Result<Option<Verdict>, AuditError> {
        let tampered =
            |first_bad: u64, reason: String| Ok(Some(Verdict::Tampered { first_bad, reason }));
        for item in entries {
            let (k, v) = item?;
            let expect = self.frontier.size();
            let key_seq = k.as_slice().try_into().ok().map(u64::from_be_bytes);
            match key_seq {
                Some(s) if s == expect => {}
                Some(s) if s > expect => {
                    return tampered(
                        expect,
                        format!("entry {expect} is missing (the next stored entry is {s})"),
                    );
                }
                _ => {
                    return tampered(
                        expect,
                        format!(
                            "an entry is stored under a malformed key after entry {}",
                            expect.saturating_sub(1)
                        ),
                    );
                }
            }
            let Some((tag, bytes)) = split_value(&v) else {
                return tampered(expect, format!("entry {expect} is truncated"));
            };
            if !self.keys.mac_ok(bytes, tag) {
                return tampered(
                    expect,
                    format!("entry {expect} was modified (its authentication tag does not match)"),
                );
            }
            let entry: AuditEntry = match serde_json::from_slice(bytes) {
                Ok(e) => e,
                Err(_) => return tampered(expect, format!("entry {expect} is unreadable")),
            };
            if entry.seq != expect {
                return tampered(
                    expect,
                    format!(
                        "entry {expect} is out of place (it is entry {} of the original order)",
                        entry.seq
                    ),
                );
            }
            if entry.prev != hex::encode(self.prev) {
                return tampered(
                    expect,
                    format!(
                        "entry {expect} does not follow entry {} (the chain is broken: an entry was removed or replaced)",
                        expect.saturating_sub(1)
                    ),
                );
            }
            self.prev = merkle::leaf_hash(bytes);
            self.frontier.push(self.prev);
            if let Some(bad) = self.checkpoints_at_size()? {
                return Ok(Some(bad));
            }
        }
        Ok(None)
    }
}

/// A store through which only the audit log writes: its entries, its
/// checkpoints, its head and tree state. What an environment opened to
/// read ([`crate::env::Environment::open_reader`]) writes through, so that
/// a process beside the writer records what it does and changes nothing
/// else. Reads pass through.
#[derive(Debug)]
pub struct AuditOnly {
    inner: Arc<dyn Storage>,
}

impl AuditOnly {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner }
    }

    fn check(batch: &WriteBatch) -> Result<(), StoreError> {
        for w in batch.writes() {
            let (space, key) = match w {
                crate::store::Write::Put(s, k, _) | crate::store::Write::Delete(s, k) => (*s, k),
            };
            let audit = match space {
                Space::Audit | Space::Checkpoints => true,
                Space::Meta => key.as_slice() == HEAD_KEY || key.as_slice() == FRONTIER_KEY,
                _ => false,
            };
            if !audit {
                return Err(StoreError::Engine(format!(
                    "this process opened the environment to read beside its writer; it may append to the audit log and nothing else (refused a write to {space:?})"
                )));
            }
        }
        Ok(())
    }
}

impl Storage for AuditOnly {
    fn holder(&self) -> u64 {
        self.inner.holder()
    }

    fn holder_alive(&self, holder: u64) -> Result<bool, StoreError> {
        self.inner.holder_alive(holder)
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(space, key)
    }

    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<crate::store::Entry, StoreError>> + Send + '_> {
        self.inner.scan(space, prefix)
    }

    fn scan_from(
        &self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = Result<crate::store::Entry, StoreError>> + Send + '_> {
        self.inner.scan_from(space, from)
    }

    fn last(&self, space: Space, prefix: &[u8]) -> Result<Option<crate::store::Entry>, StoreError> {
        self.inner.last(space, prefix)
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        Self::check(&batch)?;
        self.inner.commit(batch)
    }

    fn commit_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError> {
        Self::check(&batch)?;
        self.inner.commit_if(expect, batch)
    }

    fn stage(&self, batch: WriteBatch) -> Result<(), StoreError> {
        Self::check(&batch)?;
        self.inner.stage(batch)
    }

    fn stage_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError> {
        Self::check(&batch)?;
        self.inner.stage_if(expect, batch)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync()
    }

    fn exclusive(
        &self,
        name: &str,
        f: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.inner.exclusive(name, f)
    }

    fn health(&self) -> Result<(), StoreError> {
        self.inner.health()
    }
}

fn poisoned() -> AuditError {
    AuditError::Unavailable("internal lock poisoned".into())
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.worker.lock()
            && let Some(handle) = w.take()
        {
            let _ = handle.join();
        }
    }
}

fn committer(inner: &Inner, rx: &Receiver<Job>) {
    // Until when this process appends under the store's lock (see
    // `commit_group`).
    let mut contended_until: Option<std::time::Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let result = commit_group(inner, &jobs, &mut contended_until);
        for (i, job) in jobs.into_iter().enumerate() {
            let reply = match &result {
                Ok(first_seq) => Ok(first_seq + i as u64),
                Err(GroupError::Closed(why)) => Err(AuditError::Unavailable(why.clone())),
                Err(GroupError::NotWritten(why)) => Err(AuditError::Busy(why.clone())),
            };
            job.reply.send(reply);
        }
    }
}

/// Why a group was not committed.
#[derive(Debug)]
enum GroupError {
    /// The log failed closed (it takes no more appends).
    Closed(String),
    /// Not this time (other processes kept appending first, or the lock on
    /// appends failed); the log stays open.
    NotWritten(String),
}

fn commit_group(
    inner: &Inner,
    jobs: &[Job],
    contended_until: &mut Option<std::time::Instant>,
) -> Result<u64, GroupError> {
    if inner.failed.load(Ordering::SeqCst) {
        return Err(GroupError::Closed(
            inner.failure.lock().map(|s| s.clone()).unwrap_or_default(),
        ));
    }
    let mut state = inner
        .state
        .lock()
        .map_err(|_| GroupError::Closed("internal lock poisoned".to_string()))?;
    // Alone on the log (always, on sled), the first try commits.
    let now = std::time::Instant::now();
    if contended_until.is_none_or(|until| now >= until)
        && let Some(first_seq) = try_commit(inner, &mut state, jobs)?
    {
        return Ok(first_seq);
    }
    // Another process appended first. Rather than race it again, append
    // under the store's lock on appends, as every process does for a while
    // once it has collided; under it, first catch up with the log.
    *contended_until = Some(now + CONTENDED_FOR);
    let mut outcome: Option<Result<u64, GroupError>> = None;
    let locked = inner.store.exclusive(APPEND_LOCK, &mut || {
        for _ in 0..COMMIT_TRIES {
            let step = follow(inner, &mut state).and_then(|caught_up| {
                if caught_up {
                    try_commit(inner, &mut state, jobs)
                } else {
                    Ok(None)
                }
            });
            match step {
                Ok(None) => continue,
                Ok(Some(first_seq)) => {
                    outcome = Some(Ok(first_seq));
                    break;
                }
                Err(e) => {
                    outcome = Some(Err(e));
                    break;
                }
            }
        }
        Ok(())
    });
    match (outcome, locked) {
        (Some(done), _) => done,
        (None, Err(e)) => Err(GroupError::NotWritten(format!(
            "the records were not written: the lock on appends failed: {e}"
        ))),
        (None, Ok(())) => Err(GroupError::NotWritten(format!(
            "other processes appended first {COMMIT_TRIES} times in a row; the records were not written"
        ))),
    }
}

/// Brings `state` up to the log as stored, if another process moved it
/// (checked as at open): `true` once it has, `false` if the log moved too
/// often while it was being read (try again). A disagreement fails the log
/// closed.
fn follow(inner: &Inner, state: &mut State) -> Result<bool, GroupError> {
    let stored = inner
        .store
        .get(Space::Meta, FRONTIER_KEY)
        .map_err(|e| fail_closed(inner, format!("an append failed: {e}")))?;
    if stored == state.stored {
        return Ok(true);
    }
    match AuditLog::load_state(inner.store.as_ref(), &inner.keys) {
        Ok((fresh, None)) => {
            *state = fresh;
            Ok(true)
        }
        Ok((_, Some(problem))) => Err(fail_closed(inner, problem)),
        Err(AuditError::Busy(_)) => Ok(false),
        Err(e) => Err(fail_closed(inner, format!("an append failed: {e}"))),
    }
}

/// One try at appending `jobs` after `state`: the first sequence number
/// if they are committed; `None` if another process appended first (the
/// caller catches up under the lock on appends).
fn try_commit(inner: &Inner, state: &mut State, jobs: &[Job]) -> Result<Option<u64>, GroupError> {
    let (batch, next) = build_group(inner, state, jobs).map_err(GroupError::NotWritten)?;
    let expect = [Expect::new(Space::Meta, FRONTIER_KEY, state.stored.clone())];
    match inner.store.commit_if(&expect, batch) {
        Ok(()) => {
            let first_seq = state.frontier.size();
            *state = next;
            Ok(Some(first_seq))
        }
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(e) => Err(fail_closed(inner, format!("an append failed: {e}"))),
    }
}

/// Marks the log failed (no more appends) and says why.
fn fail_closed(inner: &Inner, why: String) -> GroupError {
    inner.failed.store(true, Ordering::SeqCst);
    if let Ok(mut f) = inner.failure.lock() {
        *f = why.clone();
    }
    GroupError::Closed(why)
}

/// The batch that appends `jobs` after `from`, and the state after it.
fn build_group(inner: &Inner, from: &State, jobs: &[Job]) -> Result<(WriteBatch, State), String> {
    let mut state = from.clone();
    let now = crate::time::now_ms();
    let mut batch = WriteBatch::new();
    for job in jobs {
        let r = &job.record;
        let entry = AuditEntry {
            seq: state.frontier.size(),
            time_ms: now,
            record: r.clone(),
            prev: hex::encode(state.prev),
        };
        let bytes =
            serde_json::to_vec(&entry).map_err(|e| format!("cannot encode an entry: {e}"))?;
        let mut value = inner.keys.mac(&bytes).to_vec();
        value.extend_from_slice(&bytes);
        batch.put(Space::Audit, seq_key(entry.seq).to_vec(), value);
        state.prev = merkle::leaf_hash(&bytes);
        state.frontier.push(state.prev);
        if state.frontier.size().is_multiple_of(inner.checkpoint_every) {
            let cp = inner.keys.sign(
                &inner.origin,
                state.frontier.size(),
                state.frontier.root(),
                now,
            );
            batch.put(
                Space::Checkpoints,
                cp.size.to_be_bytes().to_vec(),
                cp.to_text().into_bytes(),
            );
        }
    }
    let head = inner.keys.sign(
        &inner.origin,
        state.frontier.size(),
        state.frontier.root(),
        now,
    );
    batch.put(Space::Meta, HEAD_KEY.to_vec(), head.to_text().into_bytes());
    let stored = state.frontier.to_bytes();
    batch.put(Space::Meta, FRONTIER_KEY.to_vec(), stored.clone());
    state.stored = Some(stored);
    Ok((batch, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStorage;

    fn keys() -> Arc<AuditKeys> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        Arc::new(AuditKeys::new(pkcs8.as_ref(), &[9; 32]).expect("keys"))
    }

    fn record(actor: &str) -> AuditRecord {
        AuditRecord {
            actor: actor.into(),
            action: "list_datasets".into(),
            resource: "Cloister::Environment::\"env\"".into(),
            decision: Decision::Allow,
            policies: vec![],
            params: String::new(),
            outcome: None,
            serving: None,
            account: None,
        }
    }

    /// Two logs over one store stand for two processes: each appends after
    /// the other's entries (re-reading the tree when its expectation
    /// fails), and the result is one log that verifies.
    #[test]
    fn two_logs_on_one_store_append_in_one_order_that_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Storage> =
            Arc::new(SledStorage::open(&dir.path().join("store"), true).expect("store"));
        let keys = keys();
        let a = AuditLog::open(Arc::clone(&store), Arc::clone(&keys), "env", 7).expect("a");
        let b = AuditLog::open(Arc::clone(&store), Arc::clone(&keys), "env", 7).expect("b");
        std::thread::scope(|s| {
            for (log, who) in [(&a, "a"), (&b, "b")] {
                for _ in 0..3 {
                    s.spawn(move || {
                        for _ in 0..30 {
                            log.append(record(who)).expect("append");
                        }
                    });
                }
            }
        });
        match a.verify(None).expect("verify") {
            Verdict::Intact {
                size, checkpoints, ..
            } => {
                assert_eq!(size, 180);
                assert_eq!(checkpoints, 25);
            }
            v => panic!("{v:?}"),
        }
        let all = b.query(&AuditFilter::default()).expect("query");
        assert_eq!(all.iter().filter(|e| e.record.actor == "a").count(), 90);
        assert_eq!(all.iter().filter(|e| e.record.actor == "b").count(), 90);
    }

    #[test]
    fn a_reader_store_writes_the_audit_log_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Storage> =
            Arc::new(SledStorage::open(&dir.path().join("store"), true).expect("store"));
        let reader: Arc<dyn Storage> = Arc::new(AuditOnly::new(Arc::clone(&inner)));
        let log = AuditLog::open(Arc::clone(&reader), keys(), "env", 2).expect("log");
        for _ in 0..3 {
            log.append(record("aud")).expect("append");
        }
        log.checkpoint().expect("checkpoint");
        for (space, key) in [
            (Space::Users, b"eve".as_slice()),
            (Space::Meta, b"format".as_slice()),
            (Space::Models, b"m-1".as_slice()),
        ] {
            let mut b = WriteBatch::new();
            b.put(space, key.to_vec(), b"x".to_vec());
            let err = reader.commit(b.clone()).expect_err("refused");
            assert!(err.to_string().contains("nothing else"), "{err}");
            assert!(reader.stage(b).is_err());
            assert_eq!(inner.get(space, key).expect("get"), None);
        }
        assert!(matches!(
            log.verify(None).expect("verify"),
            Verdict::Intact { size: 3, .. }
        ));
    }
}
