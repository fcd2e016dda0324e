//! The sled engine behind [`Storage`]. The only module that names sled.

use std::path::Path;

use std::sync::Mutex;

use super::{
    Entry, Expect, Space, Storage, StoreError, Write, WriteBatch, check_expectations, prefix_end,
};

/// [`Storage`] over one sled tree; each [`Space`] is a one-byte key prefix,
/// so one `apply_batch` is atomic across spaces.
///
/// Only one process opens a sled store, so [`Storage::commit_if`] needs
/// only this process's writers to wait: every batch is applied under
/// `apply` (an in-memory step), and the flush that makes it durable runs
/// outside it, shared by concurrent committers as before.
#[derive(Debug)]
pub struct SledStorage {
    db: sled::Db,
    apply: Mutex<()>,
    /// See [`Storage::holder`]: only this open has the store, so it is the
    /// only holder alive.
    holder: u64,
}

/// Cache size for sled's page cache. Imports stream through the store, so
/// the cache, not the data set, bounds memory.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl SledStorage {
    /// Opens (or creates, when `create` is set) the database in directory
    /// `path`. Opening an existing store never creates one: a missing store
    /// is an error, so a typo cannot silently start an empty environment.
    pub fn open(path: &Path, create: bool) -> Result<Self, StoreError> {
        if !create && !path.join("conf").exists() {
            return Err(StoreError::Engine(format!(
                "no store at {}",
                path.display()
            )));
        }
        let db = open_waiting(path)?;
        let me = Self {
            db,
            apply: Mutex::new(()),
            holder: super::random_holder()?,
        };
        if create {
            me.sync()?;
            fsync_dir(path)?;
            if let Some(parent) = path.parent() {
                fsync_dir(parent)?;
            }
        }
        Ok(me)
    }

    fn full_key(space: Space, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(space.prefix());
        k.extend_from_slice(key);
        k
    }

    fn to_sled(batch: WriteBatch) -> sled::Batch {
        let mut b = sled::Batch::default();
        for w in batch.writes {
            match w {
                Write::Put(space, key, value) => b.insert(Self::full_key(space, &key), value),
                Write::Delete(space, key) => b.remove(Self::full_key(space, &key)),
            }
        }
        b
    }

    fn iter_out(
        iter: sled::Iter,
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + 'static> {
        Box::new(iter.map(|r| {
            r.map(|(k, v)| (k[1..].to_vec(), v.to_vec()))
                .map_err(map_err)
        }))
    }
}

/// How long `open` waits for a lock that is about to be released.
///
/// sled's background I/O threads keep the store's file (and so its lock)
/// for a few milliseconds after the last handle is dropped, so a process
/// that closes and reopens its store, or a command started right after
/// another one ended, can find it briefly locked. A store held by a live
/// process (`cloister serve`) stays locked past this and is reported
/// `Busy`.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_waiting(path: &Path) -> Result<sled::Db, StoreError> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(500))
            .open()
            .map_err(map_err);
        match opened {
            Err(StoreError::Busy) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn poisoned() -> StoreError {
    StoreError::Engine("the sled apply lock is poisoned".into())
}

fn map_err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Busy
        }
        sled::Error::Io(io) => StoreError::Io(io),
        sled::Error::Corruption { at, .. } => {
            StoreError::Corrupted(format!("damaged data at {at:?}"))
        }
        other => StoreError::Engine(other.to_string()),
    }
}

impl Storage for SledStorage {
    fn holder(&self) -> u64 {
        self.holder
    }

    fn holder_alive(&self, holder: u64) -> Result<bool, StoreError> {
        // sled's file lock admits one open at a time: any other holder
        // named in the store belongs to an open that has ended.
        Ok(holder == self.holder)
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(Self::full_key(space, key))
            .map_err(map_err)?
            .map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_> {
        Self::iter_out(self.db.scan_prefix(Self::full_key(space, prefix)))
    }

    fn scan_from(
        &self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_> {
        let start = Self::full_key(space, from);
        let iter = match prefix_end(&[space.prefix()]) {
            Some(end) => self.db.range(start..end),
            None => self.db.range(start..),
        };
        Self::iter_out(iter)
    }

    fn last(&self, space: Space, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        let start = Self::full_key(space, prefix);
        let found = match prefix_end(&start) {
            Some(end) => self.db.range(start..end).next_back(),
            None => self.db.range(start..).next_back(),
        };
        match found {
            None => Ok(None),
            Some(r) => {
                let (k, v) = r.map_err(map_err)?;
                Ok(Some((k[1..].to_vec(), v.to_vec())))
            }
        }
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.stage(batch)?;
        self.sync()
    }

    fn commit_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError> {
        self.stage_if(expect, batch)?;
        self.sync()
    }

    fn stage_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError> {
        check_expectations(expect, &batch)?;
        let _applying = self.apply.lock().map_err(|_| poisoned())?;
        for e in expect {
            let now = self
                .db
                .get(Self::full_key(e.space, &e.key))
                .map_err(map_err)?;
            if now.as_deref() != e.value.as_deref() {
                return Err(e.conflict());
            }
        }
        self.db.apply_batch(Self::to_sled(batch)).map_err(map_err)
    }

    fn stage(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let _applying = self.apply.lock().map_err(|_| poisoned())?;
        self.db.apply_batch(Self::to_sled(batch)).map_err(map_err)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_do_not_see_each_other_and_batches_are_applied() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let s = SledStorage::open(&dir.path().join("store"), true)?;
        let mut b = WriteBatch::new();
        b.put(Space::Users, b"alice".to_vec(), b"1".to_vec());
        b.put(Space::Tokens, b"alice".to_vec(), b"2".to_vec());
        b.put(Space::Users, b"bob".to_vec(), b"3".to_vec());
        s.commit(b)?;
        assert_eq!(s.get(Space::Users, b"alice")?, Some(b"1".to_vec()));
        assert_eq!(s.get(Space::Tokens, b"alice")?, Some(b"2".to_vec()));
        let users: Vec<_> = s.scan(Space::Users, b"").collect::<Result<_, _>>()?;
        assert_eq!(users.len(), 2);
        assert_eq!(
            s.last(Space::Users, b"")?.map(|e| e.0),
            Some(b"bob".to_vec())
        );
        assert_eq!(s.last(Space::Datasets, b"")?, None);
        let from: Vec<_> = s.scan_from(Space::Users, b"b").collect::<Result<_, _>>()?;
        assert_eq!(from.len(), 1);
        let mut d = WriteBatch::new();
        d.delete(Space::Users, b"alice".to_vec());
        s.commit(d)?;
        assert_eq!(s.get(Space::Users, b"alice")?, None);
        Ok(())
    }

    #[test]
    fn commit_if_writes_only_what_it_expected_and_counts_exactly_under_threads()
    -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let s = std::sync::Arc::new(SledStorage::open(&dir.path().join("store"), true)?);
        let mut b = WriteBatch::new();
        b.put(Space::Meta, b"n".to_vec(), b"x".to_vec());
        let stale = [Expect::new(Space::Meta, b"n".to_vec(), Some(b"y".to_vec()))];
        assert!(matches!(
            s.commit_if(&stale, b),
            Err(StoreError::Conflict {
                space: Space::Meta,
                ..
            })
        ));
        assert_eq!(s.get(Space::Meta, b"n")?, None);
        let unwritten = [Expect::new(Space::Meta, b"other".to_vec(), None)];
        assert!(matches!(
            s.commit_if(&unwritten, WriteBatch::new()),
            Err(StoreError::Engine(_))
        ));
        // Four threads each add 1 fifty times by read-modify-write.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = std::sync::Arc::clone(&s);
                std::thread::spawn(move || -> Result<u32, StoreError> {
                    let mut conflicts = 0;
                    for _ in 0..50 {
                        loop {
                            let seen = s.get(Space::Meta, b"n")?;
                            let n = seen
                                .as_deref()
                                .map_or(0, |v| u32::from_be_bytes(v.try_into().unwrap_or([0; 4])));
                            let mut b = WriteBatch::new();
                            b.put(Space::Meta, b"n".to_vec(), (n + 1).to_be_bytes().to_vec());
                            match s.commit_if(&[Expect::new(Space::Meta, b"n".to_vec(), seen)], b) {
                                Ok(()) => break,
                                Err(StoreError::Conflict { .. }) => conflicts += 1,
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Ok(conflicts)
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| StoreError::Engine("thread panicked".into()))??;
        }
        assert_eq!(
            s.get(Space::Meta, b"n")?,
            Some(200u32.to_be_bytes().to_vec())
        );
        Ok(())
    }

    #[test]
    fn a_second_open_is_refused_as_busy_and_a_missing_store_is_not_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        assert!(SledStorage::open(&path, false).is_err());
        assert!(!path.exists());
        let _first = SledStorage::open(&path, true).expect("open");
        assert!(matches!(
            SledStorage::open(&path, false),
            Err(StoreError::Busy)
        ));
    }
}
