//! How a dataset version is laid out, so that an import runs at hundreds of
//! thousands of records per second in constant memory.
//!
//! - Records are written to the version's segment file
//!   ([`crate::store::segment`]) in **chunks** of [`CHUNK_RECORDS`]
//!   consecutive input records, gold labels in parallel chunks.
//! - Record ids go into bounded, sorted **runs** in a scratch file while the
//!   input streams; at the end the runs are merged, which finds duplicate ids
//!   (exact comparison) and writes the **id index**: buckets of
//!   `(id, chunk)` pairs chosen by a hash of the id, about [`BUCKET_TARGET`]
//!   ids per bucket.
//!
//! Memory is bounded by one chunk, one run, a 256 KiB window per run during
//! the merge and the segment's tables (36 bytes per 512 records), whatever
//! the file size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;

use crate::store::segment::{Segment, SegmentError, SegmentWriter};

/// Records per chunk.
pub const CHUNK_RECORDS: usize = 512;
/// Ids per sorted run.
pub const RUN_ENTRIES: usize = 262_144;
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

fn encode_entry(e: &IdEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.hash.to_le_bytes());
    out.extend_from_slice(&e.line.to_le_bytes());
    out.extend_from_slice(&e.chunk.to_le_bytes());
    put_str(out, &e.id);
}

/// What can go wrong collecting and merging ids.
#[derive(Debug)]
pub enum MergeError {
    /// An id occurs twice: (id, first line, second line).
    Duplicate(String, u64, u64),
    /// Scratch data is damaged.
    Damaged,
    /// I/O on the scratch file.
    Io(std::io::Error),
    /// Writing the segment failed.
    Segment(SegmentError),
}

impl From<std::io::Error> for MergeError {
    fn from(e: std::io::Error) -> Self {
        MergeError::Io(e)
    }
}

impl From<SegmentError> for MergeError {
    fn from(e: SegmentError) -> Self {
        MergeError::Segment(e)
    }
}

/// Collects ids into sorted runs in one scratch file.
#[derive(Debug)]
pub struct RunWriter {
    file: std::fs::File,
    out: BufWriter<std::fs::File>,
    pos: u64,
    buf: Vec<IdEntry>,
    runs: Vec<(u64, u64)>,
    run_entries: usize,
    scratch: Vec<u8>,
}

impl RunWriter {
    /// A writer over a new, empty scratch file.
    pub fn new(file: std::fs::File) -> Result<Self, MergeError> {
        Self::with_run_size(file, RUN_ENTRIES)
    }

    /// A writer that spills every `run_entries` ids.
    pub fn with_run_size(file: std::fs::File, run_entries: usize) -> Result<Self, MergeError> {
        let out = BufWriter::with_capacity(1 << 20, file.try_clone()?);
        Ok(Self {
            file,
            out,
            pos: 0,
            buf: Vec::new(),
            runs: Vec::new(),
            run_entries: run_entries.max(1),
            scratch: Vec::new(),
        })
    }

    /// Adds an id; spills a sorted run when the buffer is full.
    pub fn push(&mut self, e: IdEntry) -> Result<(), MergeError> {
        self.buf.push(e);
        if self.buf.len() >= self.run_entries {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), MergeError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.buf.sort_unstable();
        let start = self.pos;
        for e in &self.buf {
            self.scratch.clear();
            encode_entry(e, &mut self.scratch);
            self.out.write_all(&self.scratch)?;
            self.pos += self.scratch.len() as u64;
        }
        self.runs.push((start, self.pos - start));
        self.buf.clear();
        Ok(())
    }

    /// Spills what is left and merges the runs: checks that ids are unique
    /// (exact comparison) and writes `buckets` index buckets to `segment`.
    pub fn merge_into(
        mut self,
        segment: &mut SegmentWriter,
        buckets: u32,
    ) -> Result<(), MergeError> {
        self.spill()?;
        self.out.flush()?;
        let mut readers: Vec<RunReader<'_>> = self
            .runs
            .iter()
            .map(|&(start, len)| RunReader {
                file: &self.file,
                pos: start,
                end: start + len,
                buf: Vec::new(),
                at: 0,
            })
            .collect();
        let mut heap = BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            if let Some(e) = r.next()? {
                heap.push(Reverse((e, i)));
            }
        }
        let mut bucket_value: Vec<u8> = Vec::new();
        let mut bucket = 0u32;
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
            while bucket < b {
                segment.add_bucket(&bucket_value)?;
                bucket_value.clear();
                bucket += 1;
            }
            put_str(&mut bucket_value, &e.id);
            bucket_value.extend_from_slice(&e.chunk.to_le_bytes());
            if let Some(n) = readers[i].next()? {
                heap.push(Reverse((n, i)));
            }
            previous = Some(e);
        }
        while bucket < buckets {
            segment.add_bucket(&bucket_value)?;
            bucket_value.clear();
            bucket += 1;
        }
        Ok(())
    }
}

/// Streams one run back from the scratch file, 256 KiB at a time.
struct RunReader<'a> {
    file: &'a std::fs::File,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
}

impl RunReader<'_> {
    fn next(&mut self) -> Result<Option<IdEntry>, MergeError> {
        loop {
            let mut r = Reader(&self.buf[self.at..]);
            let parsed = (|| {
                let hash = r.u64()?;
                let line = r.u64()?;
                let chunk = r.u32()?;
                let id = r.str()?.to_string();
                Some(IdEntry {
                    hash,
                    id,
                    line,
                    chunk,
                })
            })();
            if let Some(e) = parsed {
                self.at = self.buf.len() - r.0.len();
                return Ok(Some(e));
            }
            // Not a whole entry left in the buffer: refill.
            if self.pos >= self.end {
                return if self.at == self.buf.len() {
                    Ok(None)
                } else {
                    Err(MergeError::Damaged)
                };
            }
            let keep = self.buf.split_off(self.at);
            let n = (self.end - self.pos).min(256 * 1024) as usize;
            let mut more = vec![0u8; n];
            self.file.read_exact_at(&mut more, self.pos)?;
            self.pos += n as u64;
            self.buf = keep;
            self.buf.extend_from_slice(&more);
            self.at = 0;
        }
    }
}

/// The chunk holding record `id`, from the segment's index.
pub fn find_chunk(segment: &Segment, id: &str) -> Result<Option<u32>, SegmentError> {
    let buckets = segment.bucket_count();
    if buckets == 0 {
        return Ok(None);
    }
    let v = segment.bucket(bucket_of(id_hash(id), buckets))?;
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
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = cap_std::fs::Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority())
            .expect("dir");
        let mut w =
            RunWriter::with_run_size(tempfile::tempfile().expect("file"), 7).expect("writer");
        for i in 0..100 {
            w.push(entry(&format!("id{i}"), i + 1)).expect("push");
        }
        let mut seg = SegmentWriter::create(&dir, "a.seg").expect("segment");
        w.merge_into(&mut seg, 5).expect("merge");
        assert_eq!(seg.buckets(), 5);
        seg.finish(&dir).expect("finish");
        let seg = Segment::open(&dir, "a.seg").expect("open");
        for i in 0..100 {
            assert_eq!(
                find_chunk(&seg, &format!("id{i}")).expect("find"),
                Some(((i + 1) / 10) as u32)
            );
        }
        assert_eq!(find_chunk(&seg, "nope").expect("find"), None);

        let mut w =
            RunWriter::with_run_size(tempfile::tempfile().expect("file"), 7).expect("writer");
        for i in 0..50 {
            w.push(entry(&format!("id{i}"), i + 1)).expect("push");
        }
        w.push(entry("id3", 51)).expect("push");
        let mut seg = SegmentWriter::create(&dir, "b.seg").expect("segment");
        match w.merge_into(&mut seg, 1) {
            Err(MergeError::Duplicate(id, first, second)) => {
                assert_eq!((id.as_str(), first, second), ("id3", 4, 51))
            }
            other => panic!("expected a duplicate, got {other:?}"),
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
