//! How a dataset version is laid out in the store, so that an import runs at
//! hundreds of thousands of records per second in constant memory.
//!
//! - Records are written in **chunks** of [`CHUNK_RECORDS`] consecutive input
//!   records (one store value each), gold labels in parallel chunks.
//! - Record ids go into bounded, sorted **runs** in the scratch space while
//!   the file streams; at the end the runs are merged, which finds duplicate
//!   ids (exact comparison) and builds the **id index**: buckets of
//!   `(id, chunk)` pairs keyed by a hash of the id, about
//!   [`BUCKET_TARGET`] ids per bucket.
//!
//! Memory is bounded by one chunk, one run and one decoded block per run
//! during the merge, whatever the file size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::store::{Space, Storage, StoreError, WriteBatch};

/// Records per chunk.
pub const CHUNK_RECORDS: usize = 512;
/// Ids per sorted run.
pub const RUN_ENTRIES: usize = 262_144;
/// Run entries per stored block.
const BLOCK_ENTRIES: usize = 4096;
/// Ids per index bucket, on average.
pub const BUCKET_TARGET: u64 = 64;

/// The id hash: FNV-1a, then the SplitMix64 finalizer. Part of the on-disk
/// format (the index is keyed by it): never change it.
pub fn id_hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The bucket of a hash among `buckets`: monotonic in the hash, so ids in
/// hash order arrive bucket by bucket.
pub fn bucket_of(hash: u64, buckets: u32) -> u32 {
    ((u128::from(hash) * u128::from(buckets)) >> 64) as u32
}

/// Number of index buckets for `records` ids.
pub fn bucket_count(records: u64) -> u32 {
    u32::try_from(records.div_ceil(BUCKET_TARGET).max(1)).unwrap_or(u32::MAX)
}

/// `import ‖ n` keys.
pub fn key(import_id: u64, n: u32) -> Vec<u8> {
    let mut k = import_id.to_be_bytes().to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// One id seen during an import.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdEntry {
    /// [`id_hash`] of the id.
    pub hash: u64,
    /// The id.
    pub id: String,
    /// 1-based input line.
    pub line: u64,
    /// Chunk holding the record.
    pub chunk: u32,
}

/// Collects ids into sorted runs in the scratch space.
#[derive(Debug)]
pub struct RunWriter {
    import_id: u64,
    buf: Vec<IdEntry>,
    runs: u32,
    run_entries: usize,
}

impl RunWriter {
    /// A writer for one import.
    pub fn new(import_id: u64) -> Self {
        Self::with_run_size(import_id, RUN_ENTRIES)
    }

    /// A writer that spills every `run_entries` ids.
    pub fn with_run_size(import_id: u64, run_entries: usize) -> Self {
        Self {
            import_id,
            buf: Vec::new(),
            runs: 0,
            run_entries: run_entries.max(1),
        }
    }

    /// Adds an id; spills a sorted run when the buffer is full.
    pub fn push(&mut self, store: &dyn Storage, e: IdEntry) -> Result<(), StoreError> {
        self.buf.push(e);
        if self.buf.len() >= self.run_entries {
            self.spill(store)?;
        }
        Ok(())
    }

    fn spill(&mut self, store: &dyn Storage) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.buf.sort_unstable();
        let mut batch = WriteBatch::new();
        for (block, entries) in self.buf.chunks(BLOCK_ENTRIES).enumerate() {
            let mut v = Vec::with_capacity(entries.len() * 32);
            for e in entries {
                v.extend_from_slice(&e.hash.to_le_bytes());
                v.extend_from_slice(&e.line.to_le_bytes());
                v.extend_from_slice(&e.chunk.to_le_bytes());
                put_str(&mut v, &e.id);
            }
            let mut k = key(self.import_id, self.runs);
            k.extend_from_slice(&(block as u32).to_be_bytes());
            batch.put(Space::Scratch, k, v);
        }
        store.stage(batch)?;
        self.buf.clear();
        self.runs += 1;
        Ok(())
    }

    /// Spills what is left; returns the number of runs.
    pub fn finish(mut self, store: &dyn Storage) -> Result<u32, StoreError> {
        self.spill(store)?;
        Ok(self.runs)
    }
}

/// Streams one run back, block by block.
struct RunReader<'a> {
    blocks: Box<dyn Iterator<Item = Result<crate::store::Entry, StoreError>> + Send + 'a>,
    current: std::vec::IntoIter<IdEntry>,
}

impl RunReader<'_> {
    fn next(&mut self) -> Result<Option<IdEntry>, MergeError> {
        loop {
            if let Some(e) = self.current.next() {
                return Ok(Some(e));
            }
            let Some(block) = self.blocks.next() else {
                return Ok(None);
            };
            let (_, v) = block?;
            let mut r = Reader(&v);
            let mut out = Vec::with_capacity(BLOCK_ENTRIES);
            while !r.done() {
                let hash = r.u64().ok_or(MergeError::Damaged)?;
                let line = r.u64().ok_or(MergeError::Damaged)?;
                let chunk = r.u32().ok_or(MergeError::Damaged)?;
                let id = r.str().ok_or(MergeError::Damaged)?.to_string();
                out.push(IdEntry {
                    hash,
                    id,
                    line,
                    chunk,
                });
            }
            self.current = out.into_iter();
        }
    }
}

/// What can go wrong in the merge.
#[derive(Debug)]
pub enum MergeError {
    /// An id occurs twice: (id, first line, second line).
    Duplicate(String, u64, u64),
    /// Scratch data is damaged.
    Damaged,
    /// Store failure.
    Store(StoreError),
}

impl From<StoreError> for MergeError {
    fn from(e: StoreError) -> Self {
        MergeError::Store(e)
    }
}

/// Merges the runs: checks ids are unique and writes the index buckets.
pub fn merge_and_index(
    store: &dyn Storage,
    import_id: u64,
    runs: u32,
    records: u64,
) -> Result<u32, MergeError> {
    let buckets = bucket_count(records);
    let mut readers = Vec::new();
    for run in 0..runs {
        readers.push(RunReader {
            blocks: store.scan(Space::Scratch, &key(import_id, run)),
            current: Vec::new().into_iter(),
        });
    }
    let mut heap = BinaryHeap::new();
    for (i, r) in readers.iter_mut().enumerate() {
        if let Some(e) = r.next()? {
            heap.push(Reverse((e, i)));
        }
    }
    let mut batch = WriteBatch::new();
    let mut bucket_value: Vec<u8> = Vec::new();
    let mut bucket: Option<u32> = None;
    let mut previous: Option<IdEntry> = None;
    while let Some(Reverse((e, i))) = heap.pop() {
        if let Some(p) = &previous
            && p.hash == e.hash
            && p.id == e.id
        {
            let (first, second) = if p.line < e.line {
                (p.line, e.line)
            } else {
                (e.line, p.line)
            };
            return Err(MergeError::Duplicate(e.id, first, second));
        }
        let b = bucket_of(e.hash, buckets);
        if bucket != Some(b) {
            if let Some(done) = bucket {
                batch.put(
                    Space::RecordIndex,
                    key(import_id, done),
                    std::mem::take(&mut bucket_value),
                );
                if batch.len() >= 1024 {
                    store.stage(std::mem::take(&mut batch))?;
                }
            }
            bucket = Some(b);
        }
        put_str(&mut bucket_value, &e.id);
        bucket_value.extend_from_slice(&e.chunk.to_le_bytes());
        if let Some(n) = readers[i].next()? {
            heap.push(Reverse((n, i)));
        }
        previous = Some(e);
    }
    if let Some(done) = bucket {
        batch.put(Space::RecordIndex, key(import_id, done), bucket_value);
    }
    store.stage(batch)?;
    Ok(buckets)
}

/// The chunk holding record `id`, from the index.
pub fn find_chunk(
    store: &dyn Storage,
    import_id: u64,
    buckets: u32,
    id: &str,
) -> Result<Option<u32>, StoreError> {
    let b = bucket_of(id_hash(id), buckets.max(1));
    let Some(v) = store.get(Space::RecordIndex, &key(import_id, b))? else {
        return Ok(None);
    };
    let mut r = Reader(&v);
    while !r.done() {
        let (Some(found), Some(chunk)) = (r.str(), r.u32()) else {
            return Ok(None);
        };
        if found == id {
            return Ok(Some(chunk));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_hash_is_stable() {
        // On-disk format: these values must never change.
        // (Reference values computed independently, in Python.)
        assert_eq!(id_hash(""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(id_hash("r1"), 0x15d7_ff2b_7619_7532);
    }

    fn entry(id: &str, line: u64) -> IdEntry {
        IdEntry {
            hash: id_hash(id),
            id: id.into(),
            line,
            chunk: (line / 10) as u32,
        }
    }

    #[test]
    fn runs_merge_into_an_index_and_duplicates_across_runs_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SledStorage::open(&dir.path().join("s"), true).expect("store");
        let mut w = RunWriter::with_run_size(1, 7);
        for i in 0..100 {
            w.push(&store, entry(&format!("id{i}"), i + 1))
                .expect("push");
        }
        let runs = w.finish(&store).expect("finish");
        assert_eq!(runs, 15);
        let buckets = merge_and_index(&store, 1, runs, 100).expect("merge");
        for i in 0..100 {
            assert_eq!(
                find_chunk(&store, 1, buckets, &format!("id{i}")).expect("find"),
                Some(((i + 1) / 10) as u32)
            );
        }
        assert_eq!(find_chunk(&store, 1, buckets, "nope").expect("find"), None);

        let mut w = RunWriter::with_run_size(2, 7);
        for i in 0..50 {
            w.push(&store, entry(&format!("id{i}"), i + 1))
                .expect("push");
        }
        w.push(&store, entry("id3", 51)).expect("push");
        let runs = w.finish(&store).expect("finish");
        match merge_and_index(&store, 2, runs, 51) {
            Err(MergeError::Duplicate(id, first, second)) => {
                assert_eq!((id.as_str(), first, second), ("id3", 4, 51))
            }
            other => panic!("expected a duplicate, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn buckets_are_monotonic_in_the_hash_and_in_range() {
        let mut last = 0;
        for h in (0..1000u64).map(|i| i * (u64::MAX / 1000)) {
            let b = bucket_of(h, 77);
            assert!(b < 77 && b >= last);
            last = b;
        }
        assert_eq!(bucket_of(u64::MAX, 1), 0);
    }
}
