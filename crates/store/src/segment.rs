//! Segment files: the bulk, immutable part of a dataset version (record
//! chunks, gold-label chunks and the id index), written once, sequentially,
//! and read by offset. The key–value store keeps only the small manifest
//! that makes a segment visible.
//!
//! ```text
//! [chunk 0 records][chunk 0 gold] … [bucket 0] … [bucket B-1]
//! [chunk table: (records off u64, len u32, gold off u64, len u32) × C]
//! [bucket table: (off u64, len u32) × B]
//! [footer: magic, C u32, B u32, chunk table off u64, bucket table off u64]
//! ```
//!
//! Files live in the environment's `datasets/` directory and are reached
//! through its cap-std handle. A segment is written under a temporary name,
//! synced, then renamed into place; only then does the manifest that
//! references it get committed.

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use cloister_types::digest::{Digest, Hasher};

const MAGIC: &[u8; 8] = b"CLSEG1\0\0";
const FOOTER: usize = 8 + 4 + 4 + 8 + 8;

/// Errors of segment files.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// I/O on the named file.
    #[error("{file}: {source}")]
    Io {
        /// File, relative to the environment.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a complete segment.
    #[error("{0}: not a valid segment file (damaged or truncated)")]
    Damaged(String),
}

fn io(file: &str) -> impl FnOnce(std::io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        file: file.to_string(),
        source,
    }
}

/// The file name of a segment.
pub fn segment_name(import_id: u64) -> String {
    format!("{import_id:016x}.seg")
}

#[derive(Debug, Clone, Copy)]
struct ChunkRef {
    rec_off: u64,
    rec_len: u32,
    gold_off: u64,
    gold_len: u32,
}

/// Writes one segment sequentially.
#[derive(Debug)]
pub struct SegmentWriter {
    name: String,
    tmp: String,
    out: BufWriter<std::fs::File>,
    pos: u64,
    hasher: HashWriter,
    chunks: Vec<ChunkRef>,
    buckets: Vec<(u64, u32)>,
}

struct HashWriter(Hasher);

impl std::fmt::Debug for HashWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashWriter")
    }
}

impl SegmentWriter {
    /// Starts segment `name` in `dir` (under a temporary name).
    pub fn create(dir: &Dir, name: &str) -> Result<Self, SegmentError> {
        let tmp = format!("{name}.tmp");
        let _ = dir.remove_file(&tmp);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let file = dir.open_with(&tmp, &opts).map_err(io(&tmp))?.into_std();
        Ok(Self {
            name: name.to_string(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            hasher: HashWriter(Digest::hasher()),
            chunks: Vec::new(),
            buckets: Vec::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<u64, SegmentError> {
        let at = self.pos;
        self.out.write_all(bytes).map_err(io(&self.tmp))?;
        self.hasher.0.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(at)
    }

    fn len32(&self, n: usize) -> Result<u32, SegmentError> {
        u32::try_from(n)
            .map_err(|_| SegmentError::Damaged(format!("{}: a block over 4 GiB", self.tmp)))
    }

    /// Appends chunk number `chunks()` (records and their gold labels).
    pub fn add_chunk(&mut self, records: &[u8], gold: &[u8]) -> Result<(), SegmentError> {
        let (rec_len, gold_len) = (self.len32(records.len())?, self.len32(gold.len())?);
        let rec_off = self.write(records)?;
        let gold_off = self.write(gold)?;
        self.chunks.push(ChunkRef {
            rec_off,
            rec_len,
            gold_off,
            gold_len,
        });
        Ok(())
    }

    /// Number of chunks so far.
    pub fn chunks(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Appends index bucket number `buckets()`.
    pub fn add_bucket(&mut self, bytes: &[u8]) -> Result<(), SegmentError> {
        let len = self.len32(bytes.len())?;
        let off = self.write(bytes)?;
        self.buckets.push((off, len));
        Ok(())
    }

    /// Number of buckets so far.
    pub fn buckets(&self) -> u32 {
        self.buckets.len() as u32
    }

    /// Writes the tables and footer, syncs, and renames the file into place.
    /// Returns the SHA-256 of the whole file.
    pub fn finish(mut self, dir: &Dir) -> Result<Digest, SegmentError> {
        let mut table = Vec::with_capacity(self.chunks.len() * 24);
        for c in &self.chunks {
            table.extend_from_slice(&c.rec_off.to_le_bytes());
            table.extend_from_slice(&c.rec_len.to_le_bytes());
            table.extend_from_slice(&c.gold_off.to_le_bytes());
            table.extend_from_slice(&c.gold_len.to_le_bytes());
        }
        let chunk_table = self.write(&table)?;
        let mut table = Vec::with_capacity(self.buckets.len() * 12);
        for (off, len) in &self.buckets {
            table.extend_from_slice(&off.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
        }
        let bucket_table = self.write(&table)?;
        let mut footer = MAGIC.to_vec();
        footer.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        footer.extend_from_slice(&(self.buckets.len() as u32).to_le_bytes());
        footer.extend_from_slice(&chunk_table.to_le_bytes());
        footer.extend_from_slice(&bucket_table.to_le_bytes());
        self.write(&footer)?;
        let file = self.out.into_inner().map_err(|e| SegmentError::Io {
            file: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&self.tmp))?;
        dir.rename(&self.tmp, dir, &self.name)
            .map_err(io(&self.name))?;
        dir.open(".").and_then(|d| d.sync_all()).map_err(io("."))?;
        Ok(self.hasher.0.finish())
    }
}

/// An open segment.
#[derive(Debug)]
pub struct Segment {
    name: String,
    file: std::fs::File,
    chunks: Vec<ChunkRef>,
    buckets: Vec<(u64, u32)>,
}

impl Segment {
    /// Opens segment `name` in `dir` and reads its tables.
    pub fn open(dir: &Dir, name: &str) -> Result<Self, SegmentError> {
        let file = dir.open(name).map_err(io(name))?.into_std();
        let damaged = || SegmentError::Damaged(name.to_string());
        let size = file.metadata().map_err(io(name))?.len();
        if size < FOOTER as u64 {
            return Err(damaged());
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, size - FOOTER as u64)
            .map_err(io(name))?;
        if &footer[..8] != MAGIC {
            return Err(damaged());
        }
        let n_chunks = u32::from_le_bytes(footer[8..12].try_into().map_err(|_| damaged())?) as u64;
        let n_buckets =
            u32::from_le_bytes(footer[12..16].try_into().map_err(|_| damaged())?) as u64;
        let chunk_table = u64::from_le_bytes(footer[16..24].try_into().map_err(|_| damaged())?);
        let bucket_table = u64::from_le_bytes(footer[24..32].try_into().map_err(|_| damaged())?);
        if chunk_table + n_chunks * 24 != bucket_table
            || bucket_table + n_buckets * 12 != size - FOOTER as u64
        {
            return Err(damaged());
        }
        let mut t = vec![0u8; (n_chunks * 24) as usize];
        file.read_exact_at(&mut t, chunk_table).map_err(io(name))?;
        let le64 = |b: &[u8]| b.try_into().map(u64::from_le_bytes).map_err(|_| damaged());
        let le32 = |b: &[u8]| b.try_into().map(u32::from_le_bytes).map_err(|_| damaged());
        let mut chunks = Vec::with_capacity(n_chunks as usize);
        for c in t.chunks_exact(24) {
            let r = ChunkRef {
                rec_off: le64(&c[..8])?,
                rec_len: le32(&c[8..12])?,
                gold_off: le64(&c[12..20])?,
                gold_len: le32(&c[20..24])?,
            };
            if r.rec_off + u64::from(r.rec_len) > chunk_table
                || r.gold_off + u64::from(r.gold_len) > chunk_table
            {
                return Err(damaged());
            }
            chunks.push(r);
        }
        let mut t = vec![0u8; (n_buckets * 12) as usize];
        file.read_exact_at(&mut t, bucket_table).map_err(io(name))?;
        let mut buckets = Vec::with_capacity(n_buckets as usize);
        for b in t.chunks_exact(12) {
            let (off, len) = (le64(&b[..8])?, le32(&b[8..12])?);
            if off + u64::from(len) > chunk_table {
                return Err(damaged());
            }
            buckets.push((off, len));
        }
        Ok(Self {
            name: name.to_string(),
            file,
            chunks,
            buckets,
        })
    }

    fn read(&self, off: u64, len: u32) -> Result<Vec<u8>, SegmentError> {
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(io(&self.name))?;
        Ok(buf)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Number of index buckets.
    pub fn bucket_count(&self) -> u32 {
        self.buckets.len() as u32
    }

    /// Chunk `i`: (records, gold labels).
    pub fn chunk(&self, i: u32) -> Result<(Vec<u8>, Vec<u8>), SegmentError> {
        let c = self
            .chunks
            .get(i as usize)
            .ok_or_else(|| SegmentError::Damaged(self.name.clone()))?;
        Ok((
            self.read(c.rec_off, c.rec_len)?,
            self.read(c.gold_off, c.gold_len)?,
        ))
    }

    /// Index bucket `b`.
    pub fn bucket(&self, b: u32) -> Result<Vec<u8>, SegmentError> {
        let &(off, len) = self
            .buckets
            .get(b as usize)
            .ok_or_else(|| SegmentError::Damaged(self.name.clone()))?;
        self.read(off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_round_trips_and_truncation_is_detected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).expect("dir");
        let mut w = SegmentWriter::create(&dir, "a.seg").expect("create");
        w.add_chunk(b"records-0", b"gold-0").expect("chunk");
        w.add_chunk(b"records-1", b"").expect("chunk");
        w.add_bucket(b"bucket-0").expect("bucket");
        let digest = w.finish(&dir).expect("finish");
        assert!(!dir.exists("a.seg.tmp"));
        let bytes = dir.read("a.seg").expect("read");
        assert_eq!(Digest::of(&bytes), digest);
        let s = Segment::open(&dir, "a.seg").expect("open");
        assert_eq!((s.chunk_count(), s.bucket_count()), (2, 1));
        assert_eq!(
            s.chunk(1).expect("chunk"),
            (b"records-1".to_vec(), Vec::new())
        );
        assert_eq!(s.bucket(0).expect("bucket"), b"bucket-0".to_vec());
        assert!(s.chunk(2).is_err());
        for cut in [1, 10, bytes.len() - 1] {
            dir.write("b.seg", &bytes[..bytes.len() - cut])
                .expect("write");
            assert!(Segment::open(&dir, "b.seg").is_err(), "cut {cut}");
        }
    }
}
