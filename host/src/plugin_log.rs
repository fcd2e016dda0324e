//! The administrators' plugin log.
//!
//! What a plugin wrote to stdout and stderr, the detail of the errors it
//! returned, and the host's full account of every failure (the index it
//! returned out of range, the trap it hit, the dimension it declared) are
//! plugin-chosen: they never reach a user's output, a stored job state or
//! the console. They are kept here instead, one entry per plugin stage
//! that failed or wrote anything, keyed by the sequence number of the
//! stage's `plugin_call` audit entry, and read only through
//! `Cloister::plugin_log` (the `read_plugin_log` action, administrators
//! only, audited).
//!
//! The log is bounded: at most [`MAX_ENTRIES`] entries of at most
//! [`MAX_OUTPUT_BYTES`] of captured output each; the oldest go first.

use serde::{Deserialize, Serialize};

use crate::runtime::Usage;
use crate::store::{Space, Storage, StoreError, WriteBatch};

/// Entries kept; older ones are removed as new ones arrive.
pub const MAX_ENTRIES: usize = 1000;

/// Captured plugin output kept per entry, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// One plugin stage's record for the administrators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginLogEntry {
    /// Sequence number of the stage's `plugin_call` audit entry.
    pub seq: u64,
    /// When, ms since the epoch.
    pub time_ms: u64,
    /// Who ran the stage.
    pub actor: String,
    /// The plugin's digest.
    pub digest: String,
    /// `preprocess`, `featurize` or `select`.
    pub stage: String,
    /// What the stage served (`train m-…`, `job j-… round N`, …).
    pub purpose: String,
    /// `ok` or the runtime's error code.
    pub code: String,
    /// The host's full account of the failure, plugin-chosen values included.
    pub detail: Option<String>,
    /// Exact resource use.
    pub usage: Usage,
    /// What the plugin wrote (stdout, stderr, its error details), lossily
    /// decoded, at most [`MAX_OUTPUT_BYTES`].
    pub output: String,
    /// Output bytes dropped over the caps.
    pub dropped_bytes: u64,
}

fn decode(bytes: &[u8], what: &str) -> Result<PluginLogEntry, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Engine(format!("a damaged plugin log entry ({what}): {e}")))
}

/// The writes that add `entry` (its output cut to the cap) and remove the
/// oldest entries beyond [`MAX_ENTRIES`].
pub(crate) fn put(
    store: &dyn Storage,
    mut entry: PluginLogEntry,
) -> Result<WriteBatch, StoreError> {
    if entry.output.len() > MAX_OUTPUT_BYTES {
        let mut cut = MAX_OUTPUT_BYTES;
        while !entry.output.is_char_boundary(cut) {
            cut -= 1;
        }
        entry.dropped_bytes += (entry.output.len() - cut) as u64;
        entry.output.truncate(cut);
    }
    let mut b = WriteBatch::new();
    let value = serde_json::to_vec(&entry)
        .map_err(|e| StoreError::Engine(format!("cannot encode a plugin log entry: {e}")))?;
    b.put(Space::PluginLog, entry.seq.to_be_bytes().to_vec(), value);
    let keys: Vec<Vec<u8>> = store
        .scan(Space::PluginLog, b"")
        .map(|e| e.map(|(k, _)| k))
        .collect::<Result<_, _>>()?;
    let excess = (keys.len() + 1).saturating_sub(MAX_ENTRIES);
    for k in keys.into_iter().take(excess) {
        b.delete(Space::PluginLog, k);
    }
    Ok(b)
}

/// Entries, newest first, optionally only those of digests starting with
/// `digest`; at most `limit` (0: all).
pub(crate) fn list(
    store: &dyn Storage,
    digest: Option<&str>,
    limit: usize,
) -> Result<Vec<PluginLogEntry>, StoreError> {
    let mut out = Vec::new();
    for item in store.scan(Space::PluginLog, b"") {
        let (k, v) = item?;
        let entry = decode(&v, &hex::encode(k))?;
        if digest.is_none_or(|d| entry.digest.starts_with(d)) {
            out.push(entry);
        }
    }
    out.reverse();
    if limit > 0 {
        out.truncate(limit);
    }
    Ok(out)
}
