//! The compiled-artifact cache.
//!
//! Compiling a component with Cranelift takes tens to hundreds of
//! milliseconds; loading a compiled artifact takes well under one. Artifacts
//! are keyed by SHA-256 over the component's digest and the engine's
//! fingerprint (wasmtime version, target, every setting that affects code),
//! so a change of engine configuration never reuses stale code.
//!
//! The disk tier lives in a directory handle (cap-std) and stores each
//! artifact with an HMAC-SHA256 tag under a secret only the host holds. An
//! artifact is deserialized only when its tag verifies: a file that the host
//! did not write itself — planted, swapped between names or corrupted — is
//! ignored and recompiled. A user can never hand the host precompiled code.
//!
//! Both tiers are bounded. Memory keeps the [`MEMORY_ENTRIES`] components
//! used last (a CPython component compiles to tens of MB); the disk keeps
//! artifacts up to a size in bytes, the least recently used removed first
//! (an artifact's modification time is its last use: a hit touches it).
//! Artifacts of an engine that is no longer used (an upgrade) are never
//! hit again and age out that way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cap_std::fs::Dir;
use ring::hmac;
use wasmtime::Engine;
use wasmtime::component::Component;

use cloister_types::digest::Digest;
use cloister_types::lru::Lru;

const TAG_LEN: usize = 32;
const DOMAIN: &[u8] = b"cloister-artifact-v1\0";

/// The cache key of a component under an engine.
pub(crate) fn cache_key(component: &Digest, engine: &Digest) -> Digest {
    let mut h = Digest::hasher();
    h.update(DOMAIN);
    h.update(&component.0);
    h.update(&engine.0);
    h.finish()
}

/// Compiled components a cache keeps in memory at most; past that, the
/// one used least recently is dropped (it stays on disk, if the cache has
/// a disk).
pub const MEMORY_ENTRIES: usize = 32;

/// Compiled components by cache key: in memory, and optionally on disk.
#[derive(Clone)]
pub struct ArtifactCache {
    inner: Arc<Inner>,
}

struct Inner {
    memory: Mutex<Lru<Digest, Component>>,
    disk: Option<Disk>,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Disk {
    dir: Dir,
    key: hmac::Key,
    /// Bytes the directory may hold.
    limit_bytes: u64,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("disk", &self.inner.disk.is_some())
            .field("hits", &self.inner.hits.load(Ordering::Relaxed))
            .field("misses", &self.inner.misses.load(Ordering::Relaxed))
            .finish()
    }
}

impl ArtifactCache {
    fn with_disk(disk: Option<Disk>) -> Self {
        ArtifactCache {
            inner: Arc::new(Inner {
                memory: Mutex::new(Lru::new(MEMORY_ENTRIES)),
                disk,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            }),
        }
    }

    /// A cache that lives as long as the process.
    pub fn in_memory() -> Self {
        Self::with_disk(None)
    }

    /// A cache backed by `dir`, authenticated with `secret` (at least 32
    /// bytes of the environment's secret material), holding at most
    /// `limit_bytes` there (0: nothing is written to disk).
    pub fn on_disk(dir: Dir, secret: &[u8], limit_bytes: u64) -> Self {
        Self::with_disk(Some(Disk {
            dir,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            limit_bytes,
        }))
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.inner.hits.load(Ordering::Relaxed),
            self.inner.misses.load(Ordering::Relaxed),
        )
    }

    fn file_name(key: &Digest) -> String {
        format!("{}.cwasm", key.to_hex())
    }

    fn tag(disk: &Disk, key: &Digest, payload: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&disk.key);
        ctx.update(DOMAIN);
        ctx.update(&key.0);
        ctx.update(payload);
        ctx.sign()
    }

    pub(crate) fn get(&self, engine: &Engine, key: &Digest) -> Option<Component> {
        let found = self
            .inner
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key);
        let found = found.or_else(|| self.get_from_disk(engine, key));
        match &found {
            Some(_) => self.inner.hits.fetch_add(1, Ordering::Relaxed),
            None => self.inner.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    #[allow(unsafe_code)]
    fn get_from_disk(&self, engine: &Engine, key: &Digest) -> Option<Component> {
        let disk = self.inner.disk.as_ref()?;
        let bytes = disk.dir.read(Self::file_name(key)).ok()?;
        if bytes.len() < TAG_LEN {
            return None;
        }
        let (tag, payload) = bytes.split_at(TAG_LEN);
        if hmac::verify(&disk.key, &[DOMAIN, &key.0[..], payload].concat(), tag).is_err() {
            tracing::warn!(artifact = %key.short(), "ignoring a cached artifact whose tag does not verify");
            return None;
        }
        // SAFETY: `payload` is authenticated: its HMAC-SHA256 tag, under a
        // secret only this host holds, verified just above, and tags are only
        // ever computed in `put` over the output of `Component::serialize` of
        // this host's own engine. The key binds the tag to this cache key,
        // whose hash covers the engine fingerprint, so the artifact was
        // compiled by an engine with this exact configuration; wasmtime
        // checks the compatibility header again during deserialization.
        let component = unsafe { Component::deserialize(engine, payload) };
        let component = component.ok()?;
        // Its last use, for the eviction order: a failed touch only makes
        // it look older.
        if let Ok(f) = disk.dir.open_with(
            Self::file_name(key),
            cap_std::fs::OpenOptions::new().write(true),
        ) {
            let _ = f.into_std().set_modified(SystemTime::now());
        }
        self.inner
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*key, component.clone());
        Some(component)
    }

    pub(crate) fn put(&self, key: &Digest, component: &Component) {
        self.inner
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*key, component.clone());
        let Some(disk) = &self.inner.disk else { return };
        if disk.limit_bytes == 0 {
            return;
        }
        let payload = match component.serialize() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialize a compiled component; not caching it on disk");
                return;
            }
        };
        let tag = Self::tag(disk, key, &payload);
        if (TAG_LEN + payload.len()) as u64 > disk.limit_bytes {
            return;
        }
        let mut file = Vec::with_capacity(TAG_LEN + payload.len());
        file.extend_from_slice(tag.as_ref());
        file.extend_from_slice(&payload);
        let name = Self::file_name(key);
        let tmp = format!("{name}.tmp-{}", std::process::id());
        let written = disk
            .dir
            .write(&tmp, &file)
            .and_then(|()| disk.dir.rename(&tmp, &disk.dir, &name));
        if let Err(e) = written {
            let _ = disk.dir.remove_file(&tmp);
            tracing::warn!(error = %e, "cannot write a compiled artifact to the cache");
        }
        if let Err(e) = Self::evict(disk) {
            tracing::warn!(error = %e, "cannot trim the compiled-artifact cache");
        }
    }

    /// Removes the files used least recently until the directory fits its
    /// limit (temporary files of a writer that died count, and go first
    /// once they are old).
    fn evict(disk: &Disk) -> std::io::Result<()> {
        let mut files = Vec::new();
        let mut total = 0u64;
        for e in disk.dir.entries()? {
            let e = e?;
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            total += meta.len();
            let used = meta.modified().ok().map(|t| t.into_std());
            files.push((used, e.file_name(), meta.len()));
        }
        if total <= disk.limit_bytes {
            return Ok(());
        }
        files.sort();
        for (_, name, len) in files {
            if total <= disk.limit_bytes {
                break;
            }
            match disk.dir.remove_file(&name) {
                Ok(()) => total -= len,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
