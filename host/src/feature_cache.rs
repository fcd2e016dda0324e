//! The feature cache: a dataset version's records run through a plugin
//! chain, kept so that the next `train`, job or resume on the same inputs
//! skips the sandbox.
//!
//! An entry is named by the digest of everything its content depends on
//! ([`key`]): the dataset version's digest, each plugin's digest and
//! configuration in order, and the ids of the records given to the chain.
//! Plugins see no labels, no clock and no randomness, so the same inputs
//! give the same features; a changed input is a different name, and an
//! entry is never updated in place. Entries live in the environment's
//! `feature-cache/` directory, each file tagged with an HMAC under the
//! environment's cache secret over its name and content: a file that was
//! damaged, truncated, renamed or written by anyone without the secret is
//! a miss (and removed), never data. Writes go to a temporary file that is
//! renamed into place. When the directory grows past its limit the oldest
//! entries are removed.

use std::io::ErrorKind;

use cap_std::fs::Dir;
use ring::hmac;
use thiserror::Error;

use crate::digest::Digest;
use crate::types::SparseBatch;

/// The directory, at the environment's root.
pub const DIR: &str = "feature-cache";

const MAGIC: &[u8] = b"CLOISTER-FEATURES-1\n";

/// A failure to store an entry (reading never fails: a bad entry is a
/// miss).
#[derive(Debug, Error)]
pub enum CacheError {
    /// A file of the cache could not be written.
    #[error("feature cache: {file}: {error}")]
    Io {
        /// The file, relative to the environment.
        file: String,
        /// The underlying error.
        error: std::io::Error,
    },
}

/// What the chain produced: the ids of the records it kept, in order, and
/// their features.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Record ids, one per row of `x`.
    pub ids: Vec<String>,
    /// Features.
    pub x: SparseBatch,
    /// The featurizer's dimension.
    pub dim: usize,
}

/// One plugin of a chain as the key sees it.
#[derive(Debug, Clone, Copy)]
pub struct KeyPlugin<'a> {
    /// The plugin's digest (hex).
    pub digest: &'a str,
    /// Its configuration.
    pub config: &'a [(String, String)],
}

/// The name of the entry for a dataset version (`dataset_digest`), a chain
/// (preprocessors then the featurizer) and the records given to it, in
/// order.
pub fn key<'a, 'b>(
    dataset_digest: &str,
    chain: impl IntoIterator<Item = KeyPlugin<'a>>,
    ids: impl IntoIterator<Item = &'b str>,
) -> Digest {
    // Length-prefixed fields: no two inputs encode alike.
    let mut buf = Vec::new();
    let mut field = |b: &[u8]| {
        buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
        buf.extend_from_slice(b);
    };
    field(b"feature-cache-v1");
    field(dataset_digest.as_bytes());
    for p in chain {
        field(b"plugin");
        field(p.digest.as_bytes());
        for (k, v) in p.config {
            field(k.as_bytes());
            field(v.as_bytes());
        }
    }
    field(b"records");
    let mut ids_digest = Vec::new();
    for id in ids {
        ids_digest.extend_from_slice(&(id.len() as u64).to_le_bytes());
        ids_digest.extend_from_slice(id.as_bytes());
    }
    field(&Digest::of(&ids_digest).0);
    Digest::of(&buf)
}

/// The cache of one environment.
pub struct FeatureCache {
    dir: Dir,
    key: hmac::Key,
    limit_bytes: u64,
}

impl std::fmt::Debug for FeatureCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureCache")
            .field("limit_bytes", &self.limit_bytes)
            .finish_non_exhaustive()
    }
}

fn io(file: &str) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |error| CacheError::Io {
        file: format!("{DIR}/{file}"),
        error,
    }
}

impl FeatureCache {
    /// Opens (creating it if needed) `feature-cache/` under `env_dir`.
    /// `secret` tags the entries; `limit_bytes` bounds the directory.
    pub fn open(env_dir: &Dir, secret: &[u8], limit_bytes: u64) -> Result<Self, CacheError> {
        match env_dir.create_dir(DIR) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(CacheError::Io {
                    file: DIR.into(),
                    error,
                });
            }
        }
        let dir = env_dir.open_dir(DIR).map_err(|error| CacheError::Io {
            file: DIR.into(),
            error,
        })?;
        Ok(Self {
            dir,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            limit_bytes,
        })
    }

    fn tag(&self, name: &str, body: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(name.as_bytes());
        ctx.update(body);
        ctx.sign()
    }

    /// The entry named `key`, or `None` when there is none or it does not
    /// verify (a file that does not verify is removed).
    pub fn get(&self, key: &Digest) -> Option<Entry> {
        let name = key.to_hex();
        let bytes = self.dir.read(&name).ok()?;
        let entry = (bytes.len() >= 32)
            .then(|| bytes.split_at(bytes.len() - 32))
            .filter(|(body, tag)| {
                hmac::verify(&self.key, &[name.as_bytes(), body].concat(), tag).is_ok()
            })
            .and_then(|(body, _)| decode(body));
        if entry.is_none() {
            tracing::warn!(entry = %name, "feature cache: an entry did not verify; removed");
            let _ = self.dir.remove_file(&name);
        }
        entry
    }

    /// Stores `entry` under `key`, then removes the oldest entries while
    /// the directory is larger than its limit. An entry larger than the
    /// limit is not stored.
    pub fn put(&self, key: &Digest, entry: &Entry) -> Result<(), CacheError> {
        let name = key.to_hex();
        let mut body = encode(entry);
        if body.len() as u64 + 32 > self.limit_bytes {
            return Ok(());
        }
        let tag = self.tag(&name, &body);
        body.extend_from_slice(tag.as_ref());
        let tmp = format!("{name}.tmp");
        self.dir.write(&tmp, &body).map_err(io(&tmp))?;
        self.dir.rename(&tmp, &self.dir, &name).map_err(io(&name))?;
        self.evict()
    }

    /// Removes the oldest entries until the directory fits its limit.
    fn evict(&self) -> Result<(), CacheError> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        for e in self.dir.entries().map_err(io(""))? {
            let e = e.map_err(io(""))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            total += meta.len();
            let modified = meta.modified().ok().map(|t| t.into_std());
            entries.push((modified, name, meta.len()));
        }
        entries.sort();
        for (_, name, len) in entries {
            if total <= self.limit_bytes {
                break;
            }
            match self.dir.remove_file(&name) {
                Ok(()) => total -= len,
                Err(e) if e.kind() == ErrorKind::NotFound => total -= len,
                Err(error) => return Err(io(&name)(error)),
            }
        }
        Ok(())
    }
}

fn encode(e: &Entry) -> Vec<u8> {
    let x = &e.x;
    let mut out = Vec::with_capacity(
        MAGIC.len()
            + 24
            + e.ids.iter().map(|i| i.len() + 4).sum::<usize>()
            + x.offsets.len() * 4
            + x.indices.len() * 8,
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(e.dim as u64).to_le_bytes());
    out.extend_from_slice(&(e.ids.len() as u64).to_le_bytes());
    out.extend_from_slice(&(x.indices.len() as u64).to_le_bytes());
    for id in &e.ids {
        out.extend_from_slice(&(id.len() as u32).to_le_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    for o in &x.offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    for i in &x.indices {
        out.extend_from_slice(&i.to_le_bytes());
    }
    for v in &x.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn usize(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }
}

/// The inverse of [`encode`], checking every length against what is left
/// and the sparse matrix's shape.
fn decode(body: &[u8]) -> Option<Entry> {
    let mut r = Reader(body);
    if r.take(MAGIC.len())? != MAGIC {
        return None;
    }
    let dim = r.usize()?;
    let rows = r.usize()?;
    let nnz = r.usize()?;
    // Each row needs at least its id length and its offset.
    if rows > r.0.len() / 8 || nnz > r.0.len() / 8 {
        return None;
    }
    let mut ids = Vec::with_capacity(rows);
    for _ in 0..rows {
        let n = r.u32()? as usize;
        ids.push(String::from_utf8(r.take(n)?.to_vec()).ok()?);
    }
    let mut x = SparseBatch {
        offsets: Vec::with_capacity(rows + 1),
        indices: Vec::with_capacity(nnz),
        values: Vec::with_capacity(nnz),
    };
    for _ in 0..=rows {
        x.offsets.push(r.u32()?);
    }
    for _ in 0..nnz {
        x.indices.push(r.u32()?);
    }
    for _ in 0..nnz {
        x.values.push(f32::from_bits(r.u32()?));
    }
    let shaped = r.0.is_empty()
        && x.offsets.first() == Some(&0)
        && x.offsets.last().map(|&o| o as usize) == Some(nnz)
        && x.offsets.windows(2).all(|w| w[0] <= w[1])
        && x.indices.iter().all(|&i| (i as usize) < dim);
    shaped.then_some(Entry { ids, x, dim })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            ids: vec!["a".into(), "bé".into(), String::new()],
            x: SparseBatch {
                offsets: vec![0, 2, 2, 3],
                indices: vec![1, 7, 3],
                values: vec![0.5, -1.0, 2.0],
            },
            dim: 8,
        }
    }

    fn cache(limit: u64) -> (tempfile::TempDir, Dir, FeatureCache) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_ambient_dir(t.path(), cap_std::ambient_authority()).unwrap();
        let c = FeatureCache::open(&d, b"secret", limit).unwrap();
        (t, d, c)
    }

    #[test]
    fn entries_round_trip_and_keys_separate_their_inputs() {
        let (_t, _d, c) = cache(1 << 20);
        let cfg = [("bits".to_string(), "16".to_string())];
        let p = |config| KeyPlugin {
            digest: "ab",
            config,
        };
        let k = key("v1", [p(&cfg[..])], ["a", "b"]);
        assert_ne!(k, key("v2", [p(&cfg[..])], ["a", "b"]));
        assert_ne!(k, key("v1", [p(&[])], ["a", "b"]));
        assert_ne!(k, key("v1", [p(&cfg[..])], ["a", "b", "c"]));
        assert_ne!(k, key("v1", [p(&cfg[..])], ["ab"]));
        assert_eq!(k, key("v1", [p(&cfg[..])], ["a", "b"]));
        assert_eq!(c.get(&k), None);
        c.put(&k, &entry()).unwrap();
        assert_eq!(c.get(&k), Some(entry()));
    }

    #[test]
    fn a_damaged_renamed_or_forged_entry_is_a_miss_and_is_removed() {
        let (_t, d, c) = cache(1 << 20);
        let (k1, k2) = (Digest::of(b"1"), Digest::of(b"2"));
        c.put(&k1, &entry()).unwrap();
        let path = format!("{DIR}/{}", k1.to_hex());
        let good = d.read(&path).unwrap();
        // One flipped bit.
        let mut bad = good.clone();
        bad[MAGIC.len() + 30] ^= 1;
        d.write(&path, &bad).unwrap();
        assert_eq!(c.get(&k1), None);
        assert!(!d.exists(&path), "the damaged file is removed");
        // Renamed to another key.
        d.write(format!("{DIR}/{}", k2.to_hex()), &good).unwrap();
        assert_eq!(c.get(&k2), None);
        // Truncated.
        d.write(&path, &good[..good.len() - 1]).unwrap();
        assert_eq!(c.get(&k1), None);
        // Tagged under another secret.
        let other = FeatureCache::open(&d, b"other", 1 << 20).unwrap();
        other.put(&k1, &entry()).unwrap();
        assert_eq!(c.get(&k1), None);
    }

    #[test]
    fn the_oldest_entries_go_when_the_cache_is_full() {
        let size = encode(&entry()).len() as u64 + 32;
        let (_t, _d, c) = cache(2 * size + size / 2);
        let keys: Vec<Digest> = (0..4u8).map(|i| Digest::of(&[i])).collect();
        for k in &keys {
            c.put(k, &entry()).unwrap();
            // Distinct modification times on coarse file systems.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let kept: Vec<bool> = keys.iter().map(|k| c.get(k).is_some()).collect();
        assert_eq!(kept, [false, false, true, true]);
        // Larger than the whole cache: not stored.
        let (_t, _d, tiny) = cache(size - 1);
        tiny.put(&keys[0], &entry()).unwrap();
        assert_eq!(tiny.get(&keys[0]), None);
    }
}
