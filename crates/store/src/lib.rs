//! The closed store.
//!
//! Everything Cloister keeps lives in one ordered key–value space, divided
//! into [`Space`]s by a one-byte key prefix. The [`Storage`] trait is the
//! whole contract a storage engine must meet. [`SledStorage`] implements it
//! over sled 0.34.7 (the embedded default) and [`PgStorage`] over a
//! PostgreSQL database; they are the **only** code in the workspace that
//! touches sled or a PostgreSQL client (an invariant in
//! `docs/ARCHITECTURE.md`).
//!
//! The contract:
//! - [`Storage::commit`] applies a [`WriteBatch`] atomically and durably:
//!   when it returns `Ok`, every write of the batch survives a process crash,
//!   and after a crash either all or none of them are visible.
//! - [`Storage::stage`] applies a batch atomically but without waiting for
//!   durability. Bulk writers (dataset import) stage their data and make it
//!   reachable with one final `commit`; see `cloister_host::datasets`.
//! - Reads see every write that returned before them.

pub mod objects;
mod pg_backend;
mod pg_tls;
pub mod segment;
mod sled_backend;
pub mod work;

pub use pg_backend::{MIGRATIONS, PgStorage, PgUrl, schema_version};
pub use sled_backend::SledStorage;

use thiserror::Error;

/// A named region of the key space. The discriminant is the key prefix byte
/// and is part of the on-disk format: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Space {
    /// Environment metadata: format version, environment id, audit head.
    Meta = 1,
    /// Users by name.
    Users = 2,
    /// API-token hashes → user name.
    Tokens = 3,
    /// Dataset versions: `name \0 version(u32 BE)` → version manifest.
    Datasets = 4,
    /// Imports in progress: `import id (u64 BE)` → marker. Anything left
    /// here at open time belongs to an import that never committed. (The
    /// records themselves live in segment files: [`segment`].)
    Imports = 5,
    /// Labels given after import (human, automatic):
    /// `import id ‖ record id \0 source`
    /// → label with provenance.
    Labels = 6,
    /// Labeling assignments: `import id ‖ record id` → user name.
    Assignments = 7,
    /// Plugin registry: digest → registry entry.
    Plugins = 8,
    /// Plugin component bytes: digest → bytes.
    PluginBlobs = 9,
    /// Audit entries: `seq (u64 BE)` → canonical entry bytes.
    Audit = 10,
    /// Signed audit checkpoints: `size (u64 BE)` → checkpoint.
    Checkpoints = 11,
    /// Model manifests: model id → manifest.
    Models = 12,
    /// Active-learning jobs, their label ledgers and human queues
    /// (see `cloister_host::jobs`).
    Jobs = 13,
    /// Console passwords: user name → Argon2id PHC string.
    Passwords = 14,
    /// The administrators' plugin log: `audit seq (u64 BE)` → entry
    /// (see `cloister_host::plugin_log`).
    PluginLog = 15,
    /// Fitted featurizer state: `s ‖ digest` → vocabulary bytes, and the
    /// fits already made: `f ‖ fit key` → state digest.
    Fitted = 16,
    /// Deployments: name → deployment (see `cloister_host::deployments`).
    Deployments = 17,
    /// Serving metrics: `deployment \0 model \0 minute (u64 BE)` →
    /// the variant's counters for that minute.
    ServingMetrics = 18,
    /// The answers a deployment gave, kept for feedback: `deployment \0 a
    /// seq (u64 BE)` → answer, and `deployment \0 i client \0 record id`
    /// → seq (see `cloister_host::feedback`).
    ServingAnswers = 19,
    /// Requests captured by a deployment and not yet in a dataset version:
    /// `deployment \0 client \0 record id` → captured record.
    Captures = 20,
    /// Signed regression reports: `deployment \0 candidate` → report.
    RegressionReports = 21,
    /// Work one open store does that no other may do at the same time:
    /// `kind \0 name` → the claiming open's holder id (u64 BE); see
    /// [`Storage::holder`].
    Claims = 22,
    /// The console's login sessions: SHA-256 of the session cookie (hex)
    /// → session (see `cloister_host::console_state`).
    Sessions = 23,
    /// The console's login throttle: key (`user:…`, `client:…`,
    /// `device:…`) → failed-attempt count and lockout.
    Throttle = 24,
    /// Devices that logged in to the console: SHA-256 of the device
    /// cookie (hex) → user and last login.
    Devices = 25,
    /// The console's background tasks: task id → state and progress.
    Tasks = 26,
}

impl Space {
    /// Every space, in prefix order.
    pub const ALL: [Space; 26] = [
        Space::Meta,
        Space::Users,
        Space::Tokens,
        Space::Datasets,
        Space::Imports,
        Space::Labels,
        Space::Assignments,
        Space::Plugins,
        Space::PluginBlobs,
        Space::Audit,
        Space::Checkpoints,
        Space::Models,
        Space::Jobs,
        Space::Passwords,
        Space::PluginLog,
        Space::Fitted,
        Space::Deployments,
        Space::ServingMetrics,
        Space::ServingAnswers,
        Space::Captures,
        Space::RegressionReports,
        Space::Claims,
        Space::Sessions,
        Space::Throttle,
        Space::Devices,
        Space::Tasks,
    ];

    /// The key prefix byte.
    pub fn prefix(self) -> u8 {
        self as u8
    }
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set `key` to `value`.
    Put(Space, Vec<u8>, Vec<u8>),
    /// Remove `key` (no error if absent).
    Delete(Space, Vec<u8>),
}

/// An ordered set of writes applied all-or-nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    writes: Vec<Write>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, space: Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes
            .push(Write::Put(space, key.into(), value.into()));
    }

    /// Adds a delete.
    pub fn delete(&mut self, space: Space, key: impl Into<Vec<u8>>) {
        self.writes.push(Write::Delete(space, key.into()));
    }

    /// The writes, in order.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Appends another batch's writes.
    pub fn extend(&mut self, other: WriteBatch) {
        self.writes.extend(other.writes);
    }
}

/// A key and its value, as read from a space (the space prefix removed).
pub type Entry = (Vec<u8>, Vec<u8>);

/// Errors of the storage layer.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another process holds the store open.
    #[error(
        "the store is in use by another process (an embedded store admits one process at a time; on PostgreSQL, `init` and `migrate` need the database to themselves)"
    )]
    Busy,
    /// The engine found damaged data. The store fails closed: nothing more
    /// is read or written.
    #[error("the store is corrupted: {0}")]
    Corrupted(String),
    /// An I/O error from the engine.
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Any other engine error.
    #[error("store error: {0}")]
    Engine(String),
    /// A [`Storage::commit_if`] found a key changed since it was read (by
    /// another thread or another process); nothing was written. The caller
    /// re-reads and tries again.
    #[error("a concurrent write changed {space:?} key {key} first; nothing was written")]
    Conflict {
        /// The space of the key that changed.
        space: Space,
        /// The key, printable ASCII as is, anything else as hex.
        key: String,
    },
}

/// What [`Storage::commit_if`] expects a key to hold when it commits:
/// `Some(value)`, or `None` for "absent".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The key's space.
    pub space: Space,
    /// The key.
    pub key: Vec<u8>,
    /// The value it must hold, or `None` if it must be absent.
    pub value: Option<Vec<u8>>,
}

impl Expect {
    /// `key` of `space` must hold `value` (`None`: must be absent).
    pub fn new(space: Space, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) -> Self {
        Self {
            space,
            key: key.into(),
            value,
        }
    }

    /// The [`StoreError::Conflict`] naming this key.
    pub fn conflict(&self) -> StoreError {
        StoreError::Conflict {
            space: self.space,
            key: printable_key(&self.key),
        }
    }
}

/// A key for messages: printable ASCII as is, anything else as hex.
pub fn printable_key(key: &[u8]) -> String {
    if key.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(key).into_owned()
    } else {
        key.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Checks the rule of [`Storage::commit_if`] that every expected key is
/// also written by the batch.
pub(crate) fn check_expectations(expect: &[Expect], batch: &WriteBatch) -> Result<(), StoreError> {
    for e in expect {
        let written = batch.writes().iter().any(|w| match w {
            Write::Put(s, k, _) | Write::Delete(s, k) => *s == e.space && *k == e.key,
        });
        if !written {
            return Err(StoreError::Engine(format!(
                "commit_if expects {:?} key {} without writing it",
                e.space,
                printable_key(&e.key)
            )));
        }
    }
    Ok(())
}

/// Most tries of [`update`] before it reports the last conflict.
pub const UPDATE_TRIES: usize = 64;

/// A read-modify-write of `keys` that no concurrent writer can undo: reads
/// their values, lets `build` make a batch from them (the batch must write
/// every key read; see [`Storage::commit_if`]) and a result, and commits it
/// only if the keys still hold what was read. On a conflict it reads and
/// builds again, so `build` must be a function of the values alone (it
/// re-checks whatever it checked), at most [`UPDATE_TRIES`] times.
pub fn update<T, E: From<StoreError>>(
    store: &dyn Storage,
    keys: &[(Space, &[u8])],
    build: impl FnMut(&[Option<Vec<u8>>]) -> Result<(WriteBatch, T), E>,
) -> Result<T, E> {
    retry_keys(store, Durability::Commit, keys, build)
}

/// [`update`] for a read-modify-write whose keys are known only while
/// reading: `build` reads what it needs and returns what it read (as
/// [`Expect`]s), the batch and a result; the batch commits only if every
/// expectation still holds, else `build` runs again, at most
/// [`UPDATE_TRIES`] times.
pub fn update_reading<T, E: From<StoreError>>(
    store: &dyn Storage,
    build: impl FnMut() -> Result<(Vec<Expect>, WriteBatch, T), E>,
) -> Result<T, E> {
    retry(store, Durability::Commit, build)
}

/// [`update`] that stages its batch ([`Storage::stage_if`]) instead of
/// waiting for durability: for counters written often, whose last staged
/// writes a crash may lose but no concurrent writer may undo.
pub fn stage_update<T, E: From<StoreError>>(
    store: &dyn Storage,
    keys: &[(Space, &[u8])],
    build: impl FnMut(&[Option<Vec<u8>>]) -> Result<(WriteBatch, T), E>,
) -> Result<T, E> {
    retry_keys(store, Durability::Stage, keys, build)
}

/// [`update_reading`] that stages its batch ([`Storage::stage_if`]).
pub fn stage_update_reading<T, E: From<StoreError>>(
    store: &dyn Storage,
    build: impl FnMut() -> Result<(Vec<Expect>, WriteBatch, T), E>,
) -> Result<T, E> {
    retry(store, Durability::Stage, build)
}

/// Whether a conditional batch waits for the disk.
#[derive(Debug, Clone, Copy)]
enum Durability {
    Commit,
    Stage,
}

fn retry_keys<T, E: From<StoreError>>(
    store: &dyn Storage,
    durability: Durability,
    keys: &[(Space, &[u8])],
    mut build: impl FnMut(&[Option<Vec<u8>>]) -> Result<(WriteBatch, T), E>,
) -> Result<T, E> {
    retry(store, durability, || {
        let values = keys
            .iter()
            .map(|(space, key)| store.get(*space, key))
            .collect::<Result<Vec<_>, _>>()?;
        let (batch, out) = build(&values)?;
        let expect = keys
            .iter()
            .zip(values)
            .map(|((space, key), value)| Expect::new(*space, key.to_vec(), value))
            .collect();
        Ok((expect, batch, out))
    })
}

fn retry<T, E: From<StoreError>>(
    store: &dyn Storage,
    durability: Durability,
    mut build: impl FnMut() -> Result<(Vec<Expect>, WriteBatch, T), E>,
) -> Result<T, E> {
    let mut last = None;
    for attempt in 0..UPDATE_TRIES {
        if last.is_some() {
            std::thread::sleep(backoff(attempt));
        }
        let (expect, batch, out) = build()?;
        let written = match durability {
            Durability::Commit => store.commit_if(&expect, batch),
            Durability::Stage => store.stage_if(&expect, batch),
        };
        match written {
            Ok(()) => return Ok(out),
            Err(e @ StoreError::Conflict { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last
        .unwrap_or_else(|| StoreError::Engine("update made no try".into()))
        .into())
}

/// Shortest and longest ceiling of the wait between two tries of a
/// conflicted [`update`].
const BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_micros(200);
const BACKOFF_MOST: std::time::Duration = std::time::Duration::from_millis(25);

/// How long to wait before try `attempt` (from 1) after a conflict: a
/// uniformly random time below a ceiling that doubles with every conflict
/// from [`BACKOFF_FIRST`] up to [`BACKOFF_MOST`] ("full jitter"). Writers
/// that conflicted on one key then come back at different times instead of
/// reading the same value and colliding again, so none starves however the
/// engine orders their commits (PostgreSQL's single writer connection
/// grouped them so that one thread lost 64 times in a row). The worst case
/// over all tries stays under `UPDATE_TRIES * BACKOFF_MOST` (1.6 s).
/// Public for the callers that run their own conditional loop.
pub fn backoff(attempt: usize) -> std::time::Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    let ceiling = BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MOST);
    let mut noise = [0u8; 4];
    // Without randomness the wait is the ceiling itself: still a backoff,
    // only a less spread one.
    let fraction =
        match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut noise) {
            Ok(()) => f64::from(u32::from_le_bytes(noise)) / f64::from(u32::MAX),
            Err(_) => 1.0,
        };
    ceiling.mul_f64(fraction)
}

/// A fresh random holder id (see [`Storage::holder`]).
pub(crate) fn random_holder() -> Result<u64, StoreError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| StoreError::Engine("no randomness for the store's holder id".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Adds to `batch` the delete of every key of `space` that starts with
/// `prefix`.
pub fn delete_prefixed(
    store: &dyn Storage,
    batch: &mut WriteBatch,
    space: Space,
    prefix: &[u8],
) -> Result<(), StoreError> {
    for item in store.scan(space, prefix) {
        let (k, _) = item?;
        batch.delete(space, k);
    }
    Ok(())
}

/// The contract of a storage engine. See the module docs.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads one key.
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// All entries of `space` whose key starts with `prefix`, in key order.
    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_>;

    /// Entries of `space` with key ≥ `from`, in key order.
    fn scan_from(
        &self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_>;

    /// The entry of `space` with the greatest key starting with `prefix`.
    fn last(&self, space: Space, prefix: &[u8]) -> Result<Option<Entry>, StoreError>;

    /// Applies `batch` atomically and durably (see the module docs).
    fn commit(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Applies `batch` atomically and durably if, at that moment, every key
    /// of `expect` holds its expected value; otherwise writes nothing and
    /// returns [`StoreError::Conflict`]. This is the one read-modify-write
    /// primitive, and it holds across processes sharing a store (the
    /// PostgreSQL engine checks inside the transaction that writes). Every
    /// expected key must also be written by `batch`: a key that is only
    /// read is an error, since engines guard a key by the write.
    fn commit_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError>;

    /// Runs `f` holding the lock `name`, which excludes every other holder
    /// of that name in any process sharing the store, and returns what `f`
    /// returned. Not reentrant. [`Storage::commit_if`] is what keeps a
    /// read-modify-write correct; this lock only spares the work that
    /// collisions cost when several processes update the same keys at
    /// once, so an engine only one process opens (sled) runs `f` at once.
    fn exclusive(
        &self,
        name: &str,
        f: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _ = name;
        f()
    }

    /// Applies `batch` atomically, without waiting for durability.
    fn stage(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// [`Storage::commit_if`] without waiting for durability: the check
    /// and the write are as atomic, across processes too, but a crash may
    /// lose the write like any staged one.
    fn stage_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError>;

    /// Makes every staged write durable.
    fn sync(&self) -> Result<(), StoreError>;

    /// This open's holder id: a random number chosen when the store was
    /// opened, which every process sharing the store can ask about with
    /// [`Storage::holder_alive`]. Work that must not run twice at once (a
    /// job's rounds, an import in progress) is marked in the store with the
    /// holder that does it, so that another open can tell a live holder's
    /// work from a dead one's.
    fn holder(&self) -> u64;

    /// Whether the open with holder id `holder` still has the store open,
    /// in this process or any other. On PostgreSQL a holder is a session
    /// lock on the connection every write goes through, so a process that
    /// died (or lost that connection, and with it any right to write) is
    /// not alive; an engine only one process opens (sled) knows only its
    /// own holder.
    fn holder_alive(&self, holder: u64) -> Result<bool, StoreError>;

    /// Whether the engine can still read and write (for a health probe).
    /// The default reads one key.
    fn health(&self) -> Result<(), StoreError> {
        self.get(Space::Meta, b"format").map(|_| ())
    }
}

/// Runs `fut` on `rt` and waits for it on a channel: unlike
/// `Runtime::block_on`, callable from inside another runtime (the
/// console's), which is how the engines' async clients serve the
/// synchronous contract.
/// The small Tokio runtime each of the store's async clients (PostgreSQL,
/// the object store, the work queue) runs on, apart from any runtime of
/// its callers.
pub(crate) fn client_runtime(
    name: &'static str,
    threads: usize,
) -> Result<tokio::runtime::Runtime, StoreError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(StoreError::Io)
}

pub(crate) fn wait_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Engine("the store's client runtime stopped".into()))?
}

/// Key helper: `a ‖ b`.
pub fn key2(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len());
    k.extend_from_slice(a);
    k.extend_from_slice(b);
    k
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// if there is none (all bytes 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn the_wait_after_a_conflict_is_random_below_a_doubling_capped_ceiling() {
        for attempt in 1..UPDATE_TRIES {
            let ceiling = BACKOFF_FIRST
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(BACKOFF_MOST);
            let waits: Vec<_> = (0..32).map(|_| backoff(attempt)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "{attempt}: {waits:?}");
            // Spread, not one fixed wait: 32 draws are not all equal.
            assert!(waits.iter().any(|w| *w != waits[0]), "{attempt}: {waits:?}");
        }
        assert!(backoff(UPDATE_TRIES) <= BACKOFF_MOST);
    }

    #[test]
    fn space_prefixes_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for s in Space::ALL {
            assert!(seen.insert(s.prefix()));
        }
    }
}
