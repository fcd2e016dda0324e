//! Datasets: atomic streaming import, versions, statistics, splits, labels.
//!
//! An import streams records into a new segment file under a fresh *import
//! id* ([`layout`] describes the format; memory does not grow with the
//! file), syncs it, and makes the version visible with one durable commit of
//! its manifest to the store. Until then the segment is reachable from
//! nowhere; an import that fails removes it, and one interrupted by a crash
//! is cleaned up by [`recover`] the next time the environment opens (an
//! import marker in the store says what to remove). So a version is either
//! complete or absent.
//!
//! Labels are stored apart from records, each with its [`Provenance`].

pub mod layout;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use crate::digest::{Digest, Hasher};
use crate::env::Environment;
use crate::records::{RecordError, RecordSource};
use crate::store::segment::{Segment, SegmentError, SegmentWriter, segment_name};
use crate::store::{Expect, Space, Storage, StoreError, WriteBatch, key2};
use crate::types::{DataRecord, Numeric};

const NEXT_IMPORT_KEY: &[u8] = b"next-import";
/// Keys deleted per batch when discarding an import.
const DELETE_BATCH: usize = 4096;
/// Most distinct labels a dataset may have.
pub const MAX_LABELS: usize = 10_000;
/// Most distinct field names a dataset may have.
pub const MAX_FIELDS: usize = 1_000;

/// Errors of dataset operations. Input errors name file, line and field.
#[derive(Debug, Error)]
pub enum DatasetError {
    /// The dataset name does not follow the rules.
    #[error(
        "invalid dataset name `{0}`: use 1–64 of A-Z a-z 0-9 . _ - starting with a letter or digit"
    )]
    BadName(String),
    /// A line of the input is wrong.
    #[error(transparent)]
    Input(#[from] RecordError),
    /// An id occurs twice.
    #[error(
        "{file}:{line}: field `{field}`: duplicate id {id:?} (first at line {first}; ids must be unique within an import)"
    )]
    Duplicate {
        /// File.
        file: String,
        /// Line of the second occurrence.
        line: u64,
        /// The id field's name.
        field: String,
        /// The id.
        id: String,
        /// Line of the first occurrence.
        first: u64,
    },
    /// A limit on distinct labels or fields was exceeded.
    #[error("{file}:{line}: {what}")]
    Limit {
        /// File.
        file: String,
        /// Line.
        line: u64,
        /// Which limit.
        what: String,
    },
    /// The input holds no records.
    #[error("{0}: no records (an empty import creates no version)")]
    Empty(String),
    /// No such dataset or version.
    #[error("no dataset `{0}`")]
    Unknown(String),
    /// No such record.
    #[error("no record `{id}` in dataset `{dataset}`")]
    UnknownRecord {
        /// Dataset reference.
        dataset: String,
        /// Record id.
        id: String,
    },
    /// A reference like `name@3` is malformed.
    #[error("`{0}` is not a dataset reference (use NAME or NAME@VERSION)")]
    BadReference(String),
    /// Stored data is damaged.
    #[error("stored dataset data is damaged: {0}")]
    Damaged(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Segment file failure.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A file of the environment.
    #[error("{file}: {source}")]
    File {
        /// File, relative to the environment.
        file: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Where a label came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Provenance {
    /// Imported with the data.
    Gold,
    /// Given by a human labeler.
    Human {
        /// The labeler's user name.
        user: String,
    },
    /// Accepted automatically by a selector plugin.
    Auto {
        /// Digest of the selector plugin.
        selector: String,
        /// Ids of the models whose predictions agreed.
        models: Vec<String>,
        /// The confidence the selector acted on.
        confidence: f64,
    },
    /// Sent by a deployment's client as the true outcome of a captured
    /// request (`POST /api/deployments/{name}/feedback`).
    Feedback {
        /// The deployment that captured the record.
        deployment: String,
        /// The client account that sent the label.
        client: String,
    },
}

impl Provenance {
    /// The key suffix that keeps one label per source.
    fn source_key(&self) -> String {
        match self {
            Provenance::Gold => "gold".into(),
            Provenance::Human { user } => format!("human:{user}"),
            Provenance::Auto { selector, .. } => format!("auto:{selector}"),
            Provenance::Feedback { deployment, client } => {
                format!("feedback:{deployment}:{client}")
            }
        }
    }
}

/// A label with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelEntry {
    /// The class.
    pub label: String,
    /// Where it came from.
    pub provenance: Provenance,
    /// When it was stored, ms since the epoch.
    pub time_ms: u64,
}

/// Per-field statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldStats {
    /// "text" or "numeric".
    pub kind: String,
    /// Records where the field is present.
    pub present: u64,
}

/// Distribution of text lengths (characters, summed over a record's text
/// fields), as power-of-two buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    /// Shortest.
    pub min: u64,
    /// Longest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// `(upper bound exclusive, count)`: bucket `i` counts lengths in
    /// `[2^(i-1), 2^i)`, bucket 0 counts empty texts.
    pub buckets: Vec<(u64, u64)>,
}

/// Aggregate statistics of one version. Never rows or texts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Records.
    pub records: u64,
    /// Records with an imported label.
    pub labeled: u64,
    /// Records without (the active-learning pool).
    pub unlabeled: u64,
    /// Count per label.
    pub labels: BTreeMap<String, u64>,
    /// Completeness per field.
    pub fields: BTreeMap<String, FieldStats>,
    /// Text length distribution.
    pub text_length: LengthStats,
}

/// The manifest of one dataset version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetVersion {
    /// Dataset name.
    pub name: String,
    /// Version, from 1.
    pub version: u32,
    /// Where its records are stored.
    pub import_id: u64,
    /// Number of record chunks in its segment.
    pub chunks: u32,
    /// Number of id-index buckets in its segment.
    pub buckets: u32,
    /// SHA-256 of its segment file.
    pub segment_sha256: String,
    /// SHA-256 over the records' canonical encoding, in input order: the
    /// version's content address.
    pub digest: String,
    /// File name of the source (no directories).
    pub source: String,
    /// Who imported it.
    pub created_by: String,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// Statistics.
    pub stats: DatasetStats,
}

impl DatasetVersion {
    /// `name@version`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Checks a dataset name.
pub fn check_name(name: &str) -> Result<(), DatasetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(DatasetError::BadName(name.to_string()))
    }
}

fn version_key(name: &str, version: u32) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Per-record key (later labels, assignments).
fn record_key(import_id: u64, id: &str) -> Vec<u8> {
    key2(&import_id.to_be_bytes(), id.as_bytes())
}

fn label_key(import_id: u64, id: &str, source: &str) -> Vec<u8> {
    let mut k = record_key(import_id, id);
    k.push(0);
    k.extend_from_slice(source.as_bytes());
    k
}

struct StatsBuilder {
    stats: DatasetStats,
    length_sum: u128,
    buckets: Vec<u64>,
}

impl StatsBuilder {
    fn new() -> Self {
        Self {
            stats: DatasetStats::default(),
            length_sum: 0,
            buckets: vec![0; 65],
        }
    }

    fn add(&mut self, r: &DataRecord) -> Result<(), String> {
        let s = &mut self.stats;
        s.records += 1;
        match &r.label {
            Some(l) => {
                s.labeled += 1;
                if let Some(c) = s.labels.get_mut(l) {
                    *c += 1;
                } else {
                    if s.labels.len() >= MAX_LABELS {
                        return Err(format!("more than {MAX_LABELS} distinct labels"));
                    }
                    s.labels.insert(l.clone(), 1);
                }
            }
            None => s.unlabeled += 1,
        }
        let mut length = 0u64;
        let fields = r
            .texts
            .iter()
            .map(|t| (&t.name, "text"))
            .chain(r.numerics.iter().map(|n| (&n.name, "numeric")));
        for (name, kind) in fields {
            if let Some(f) = s.fields.get_mut(name) {
                f.present += 1;
            } else {
                if s.fields.len() >= MAX_FIELDS {
                    return Err(format!("more than {MAX_FIELDS} distinct fields"));
                }
                s.fields.insert(
                    name.clone(),
                    FieldStats {
                        kind: kind.into(),
                        present: 1,
                    },
                );
            }
        }
        for t in &r.texts {
            length += t.value.chars().count() as u64;
        }
        if s.records == 1 {
            s.text_length.min = length;
        }
        s.text_length.min = s.text_length.min.min(length);
        s.text_length.max = s.text_length.max.max(length);
        self.length_sum += u128::from(length);
        let bucket = (64 - length.leading_zeros()) as usize;
        self.buckets[bucket] += 1;
        Ok(())
    }

    fn finish(mut self) -> DatasetStats {
        let s = &mut self.stats;
        if s.records > 0 {
            s.text_length.mean = self.length_sum as f64 / s.records as f64;
        }
        let last = self.buckets.iter().rposition(|&c| c > 0).unwrap_or(0);
        s.text_length.buckets = (0..=last)
            .map(|i| (if i == 0 { 1 } else { 1u64 << i.min(63) }, self.buckets[i]))
            .collect();
        self.stats
    }
}

fn hash_record(h: &mut Hasher, r: &DataRecord, encoded: &[u8]) {
    h.update(&(r.id.len() as u32).to_le_bytes());
    h.update(r.id.as_bytes());
    h.update(&(encoded.len() as u32).to_le_bytes());
    h.update(encoded);
    match &r.label {
        Some(l) => {
            h.update(&[1]);
            h.update(&(l.len() as u32).to_le_bytes());
            h.update(l.as_bytes());
        }
        None => h.update(&[0]),
    }
}

/// The import id the counter's stored bytes say is next.
fn import_counter(stored: Option<&[u8]>) -> Result<u64, DatasetError> {
    Ok(match stored {
        Some(b) => u64::from_be_bytes(
            b.try_into()
                .map_err(|_| DatasetError::Damaged("import counter".into()))?,
        ),
        None => 1,
    })
}

/// The version number after the last stored version of `name`.
fn next_version(store: &dyn Storage, name: &str) -> Result<u32, DatasetError> {
    Ok(
        match store.last(Space::Datasets, &key2(name.as_bytes(), &[0]))? {
            Some((k, _)) => {
                let tail: [u8; 4] = k[k.len() - 4..]
                    .try_into()
                    .map_err(|_| DatasetError::Damaged("version key".into()))?;
                u32::from_be_bytes(tail) + 1
            }
            None => 1,
        },
    )
}

fn env_file_err(file: String) -> impl FnOnce(std::io::Error) -> DatasetError {
    move |source| DatasetError::File { file, source }
}

fn runs_name(import_id: u64) -> String {
    format!("{import_id:016x}.runs")
}

fn datasets_dir(env: &Environment) -> Result<Dir, DatasetError> {
    env.dir()
        .open_dir("datasets")
        .map_err(env_file_err("datasets".into()))
}

/// Imports `source` as the next version of dataset `name`. See the module
/// docs for the atomicity argument. `id_field` names the id in errors.
pub fn import(
    env: &Environment,
    name: &str,
    source: &mut dyn RecordSource,
    id_field: &str,
    by: &str,
) -> Result<DatasetVersion, DatasetError> {
    check_name(name)?;
    let store = env.store().as_ref();
    // The id comes from the counter by compare-and-set, so imports running
    // at the same time (threads or processes) never share one.
    let import_id = crate::store::update(store, &[(Space::Meta, NEXT_IMPORT_KEY)], |stored| {
        let id = import_counter(stored[0].as_deref())?;
        let mut start = WriteBatch::new();
        start.put(
            Space::Meta,
            NEXT_IMPORT_KEY.to_vec(),
            (id + 1).to_be_bytes().to_vec(),
        );
        start.put(
            Space::Imports,
            id.to_be_bytes().to_vec(),
            import_marker(store.holder(), name),
        );
        Ok::<_, DatasetError>((start, id))
    })?;
    let result = stream_in(env, name, import_id, source, id_field, by);
    if result.is_err() {
        // Best effort: whatever is left is removed by `recover` at the next
        // open, because the import marker stays until then.
        if discard_import(env, import_id).is_ok() {
            let mut b = WriteBatch::new();
            b.delete(Space::Imports, import_id.to_be_bytes().to_vec());
            let _ = store.commit(b);
        }
    }
    result
}

fn stream_in(
    env: &Environment,
    name: &str,
    import_id: u64,
    source: &mut dyn RecordSource,
    id_field: &str,
    by: &str,
) -> Result<DatasetVersion, DatasetError> {
    use layout::{CHUNK_RECORDS, IdEntry, RunWriter, put_str};
    let store = env.store().as_ref();
    let file_name = |s: &dyn RecordSource| s.file().display().to_string();
    let ddir = datasets_dir(env)?;
    let seg_name = segment_name(import_id);
    let mut segment = SegmentWriter::create(&ddir, &seg_name)?;
    let tmp = env
        .dir()
        .open_dir("tmp")
        .map_err(env_file_err("tmp".into()))?;
    let runs_file = {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(true).mode(0o600);
        let name = runs_name(import_id);
        let f = tmp
            .open_with(&name, &opts)
            .map_err(env_file_err(format!("tmp/{name}")))?;
        // The scratch file only needs to live as long as this import.
        let _ = tmp.remove_file(&name);
        f.into_std()
    };
    let mut runs = RunWriter::new(runs_file).map_err(merge_err(&file_name(source), id_field))?;
    let mut stats = StatsBuilder::new();
    let mut hasher = Digest::hasher();
    let mut encoded = Vec::new();
    let mut chunk = Vec::new();
    let mut gold = Vec::new();
    let mut in_chunk = 0u32;
    let flush = |chunk: &mut Vec<u8>,
                 gold: &mut Vec<u8>,
                 n: &mut u32,
                 segment: &mut SegmentWriter|
     -> Result<(), DatasetError> {
        let mut c = n.to_le_bytes().to_vec();
        c.append(chunk);
        let mut g = n.to_le_bytes().to_vec();
        g.append(gold);
        segment.add_chunk(&c, &g)?;
        *n = 0;
        Ok(())
    };
    while let Some(item) = source.next() {
        let record = item?;
        stats.add(&record).map_err(|what| DatasetError::Limit {
            file: file_name(source),
            line: source.line(),
            what,
        })?;
        encoded.clear();
        crate::codec::encode(&record, &mut encoded);
        hash_record(&mut hasher, &record, &encoded);
        put_str(&mut chunk, &record.id);
        chunk.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        chunk.extend_from_slice(&encoded);
        put_str(&mut gold, &record.id);
        match &record.label {
            Some(l) => {
                gold.push(1);
                put_str(&mut gold, l);
            }
            None => gold.push(0),
        }
        let entry = IdEntry {
            hash: layout::id_hash(&record.id),
            id: record.id,
            line: source.line(),
            chunk: segment.chunks(),
        };
        runs.push(entry)
            .map_err(merge_err(&file_name(source), id_field))?;
        in_chunk += 1;
        if in_chunk as usize == CHUNK_RECORDS {
            flush(&mut chunk, &mut gold, &mut in_chunk, &mut segment)?;
        }
    }
    let stats = stats.finish();
    if stats.records == 0 {
        return Err(DatasetError::Empty(file_name(source)));
    }
    if in_chunk > 0 {
        flush(&mut chunk, &mut gold, &mut in_chunk, &mut segment)?;
    }
    let buckets = layout::bucket_count(stats.records);
    runs.merge_into(&mut segment, buckets)
        .map_err(merge_err(&file_name(source), id_field))?;
    let chunks = segment.chunks();
    let segment_digest = segment.finish(&ddir)?;
    // The object store's copy is durable before the manifest that names it.
    if let Some(objects) = env.objects() {
        objects.put_file(&ddir, &seg_name, &segment_digest.to_hex())?;
    }
    // The version number is claimed by creating its key: the commit
    // expects the key absent, so of two imports finishing at the same time
    // one gets the number and the other takes the next.
    let source_name = source
        .file()
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let digest = hasher.finish().to_hex();
    crate::store::update_reading(store, || {
        let version = next_version(store, name)?;
        let manifest = DatasetVersion {
            name: name.to_string(),
            version,
            import_id,
            chunks,
            buckets,
            segment_sha256: segment_digest.to_hex(),
            digest: digest.clone(),
            source: source_name.clone(),
            created_by: by.to_string(),
            created_ms: crate::time::now_ms(),
            stats: stats.clone(),
        };
        let key = version_key(name, version);
        let mut commit = WriteBatch::new();
        commit.put(
            Space::Datasets,
            key.clone(),
            serde_json::to_vec(&manifest).map_err(|e| DatasetError::Damaged(e.to_string()))?,
        );
        commit.delete(Space::Imports, import_id.to_be_bytes().to_vec());
        Ok::<_, DatasetError>((
            vec![
                Expect::new(Space::Datasets, key, None),
                // The marker is still this import's: if another process
                // judged it dead and removed its files, nothing commits.
                Expect::new(
                    Space::Imports,
                    import_id.to_be_bytes().to_vec(),
                    Some(import_marker(store.holder(), name)),
                ),
            ],
            commit,
            manifest,
        ))
    })
}

fn merge_err<'a>(
    file: &'a str,
    id_field: &'a str,
) -> impl FnOnce(layout::MergeError) -> DatasetError + 'a {
    move |e| match e {
        layout::MergeError::Duplicate(id, first, second) => DatasetError::Duplicate {
            file: file.to_string(),
            line: second,
            field: id_field.to_string(),
            id,
            first,
        },
        layout::MergeError::Damaged => DatasetError::Damaged("import scratch data".into()),
        layout::MergeError::Io(source) => DatasetError::File {
            file: "tmp (import scratch)".into(),
            source,
        },
        layout::MergeError::Segment(e) => DatasetError::Segment(e),
    }
}

fn delete_prefix(store: &dyn Storage, space: Space, prefix: &[u8]) -> Result<(), StoreError> {
    loop {
        let mut b = WriteBatch::new();
        for item in store.scan(space, prefix).take(DELETE_BATCH) {
            let (k, _) = item?;
            b.delete(space, k);
        }
        if b.is_empty() {
            return Ok(());
        }
        store.stage(b)?;
    }
}

/// Removes everything written for `import_id`.
fn discard_import(env: &Environment, import_id: u64) -> Result<(), DatasetError> {
    let store = env.store().as_ref();
    let ddir = datasets_dir(env)?;
    let seg = segment_name(import_id);
    for name in [format!("{seg}.tmp"), seg] {
        match ddir.remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatasetError::File {
                    file: format!("datasets/{name}"),
                    source,
                });
            }
        }
    }
    if let Ok(tmp) = env.dir().open_dir("tmp") {
        let _ = tmp.remove_file(runs_name(import_id));
    }
    let prefix = import_id.to_be_bytes();
    for space in [Space::Labels, Space::Assignments] {
        delete_prefix(store, space, &prefix)?;
    }
    store.sync()?;
    Ok(())
}

/// An import marker's value: a tag byte, the holder id of the store's open
/// that runs the import ([`Storage::holder`]), and the dataset's name.
/// Markers written before holders existed hold the name alone.
fn import_marker(holder: u64, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + name.len());
    v.push(MARKER_WITH_HOLDER);
    v.extend_from_slice(&holder.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The first byte of a marker that names its holder (no dataset name
/// starts with it: names are ASCII).
const MARKER_WITH_HOLDER: u8 = 0xff;

/// A marker's holder (if it names one) and dataset name.
fn parse_marker(value: &[u8]) -> (Option<u64>, &[u8]) {
    match value.split_first() {
        Some((&MARKER_WITH_HOLDER, rest)) if rest.len() >= 8 => {
            let (holder, name) = rest.split_at(8);
            let holder = <[u8; 8]>::try_from(holder).ok().map(u64::from_be_bytes);
            (holder, name)
        }
        _ => (None, value),
    }
}

/// Removes the remains of imports that never committed (after a crash or a
/// failed cleanup): every import whose marker names no live holder, so an
/// import another process is running right now is left alone.
/// [`crate::service::Cloister::open`] runs it before the environment
/// serves anything. Returns how many were removed.
pub fn recover(env: &Environment) -> Result<usize, DatasetError> {
    let store = env.store().as_ref();
    let markers: Vec<_> = store.scan(Space::Imports, b"").collect::<Result<_, _>>()?;
    let mut removed = 0;
    for (k, v) in &markers {
        let (holder, name) = parse_marker(v);
        if let Some(holder) = holder
            && store.holder_alive(holder)?
        {
            continue;
        }
        // The marker is taken over first, conditionally: if its import
        // committed or another process took it meanwhile, there is nothing
        // to do here; once it names this open, that import can no longer
        // commit (its commit expects its own marker), so removing its
        // files is safe, and a crash during the removal leaves a marker of
        // a dead holder for the next open to finish.
        let mine = import_marker(store.holder(), &String::from_utf8_lossy(name));
        let mut take = WriteBatch::new();
        take.put(Space::Imports, k.clone(), mine.clone());
        match store.commit_if(
            &[Expect::new(Space::Imports, k.clone(), Some(v.clone()))],
            take,
        ) {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
        if let Ok(id) = <[u8; 8]>::try_from(k.as_slice()) {
            discard_import(env, u64::from_be_bytes(id))?;
        }
        let mut b = WriteBatch::new();
        b.delete(Space::Imports, k.clone());
        store.commit_if(&[Expect::new(Space::Imports, k.clone(), Some(mine))], b)?;
        removed += 1;
    }
    Ok(removed)
}

/// Every version of every dataset, by name then version.
pub fn list(env: &Environment, cache: &ManifestCache) -> Result<Vec<DatasetVersion>, DatasetError> {
    env.store()
        .scan(Space::Datasets, b"")
        .map(|item| {
            let (key, bytes) = item?;
            cache.parse(key, bytes)
        })
        .collect()
}

/// Every version of dataset `name`, oldest first.
pub fn versions(env: &Environment, name: &str) -> Result<Vec<DatasetVersion>, DatasetError> {
    check_name(name)?;
    let mut prefix = name.as_bytes().to_vec();
    prefix.push(0);
    env.store()
        .scan(Space::Datasets, &prefix)
        .map(|item| {
            let (_, bytes) = item?;
            serde_json::from_slice(&bytes)
                .map_err(|_| DatasetError::Damaged("a version manifest".into()))
        })
        .collect()
}

/// Parsed version manifests, so that listing datasets (the console's most
/// frequent read) does not parse every manifest's JSON on every request.
///
/// An entry is used only when the stored bytes are byte-for-byte those it
/// was parsed from, so the cache can never answer with a manifest the store
/// no longer holds; it is cleared when it reaches [`ManifestCache::CAPACITY`]
/// entries, so its memory stays bounded.
#[derive(Debug, Default)]
pub struct ManifestCache {
    map: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Parsed>>,
}

/// A manifest's stored bytes and what they parsed to.
type Parsed = (Vec<u8>, DatasetVersion);

impl ManifestCache {
    /// Entries kept before the cache starts over.
    pub const CAPACITY: usize = 4096;

    /// The manifest stored as `bytes` under `key`.
    fn parse(&self, key: Vec<u8>, bytes: Vec<u8>) -> Result<DatasetVersion, DatasetError> {
        if let Ok(map) = self.map.lock()
            && let Some((cached, v)) = map.get(&key)
            && *cached == bytes
        {
            return Ok(v.clone());
        }
        let v: DatasetVersion = serde_json::from_slice(&bytes)
            .map_err(|_| DatasetError::Damaged("a version manifest".into()))?;
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= Self::CAPACITY {
                map.clear();
            }
            map.insert(key, (bytes, v.clone()));
        }
        Ok(v)
    }
}

/// Resolves `NAME` (latest version) or `NAME@VERSION`.
pub fn resolve(env: &Environment, reference: &str) -> Result<DatasetVersion, DatasetError> {
    let store = env.store();
    let (name, version) = match reference.split_once('@') {
        Some((n, v)) => (
            n,
            Some(
                v.parse::<u32>()
                    .map_err(|_| DatasetError::BadReference(reference.into()))?,
            ),
        ),
        None => (reference, None),
    };
    check_name(name)?;
    let found = match version {
        Some(v) => store.get(Space::Datasets, &version_key(name, v))?,
        None => store
            .last(Space::Datasets, &key2(name.as_bytes(), &[0]))?
            .map(|(_, v)| v),
    };
    let bytes = found.ok_or_else(|| DatasetError::Unknown(reference.to_string()))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| DatasetError::Damaged(format!("manifest of {reference}")))
}

/// Opens the segment of a version.
pub fn open_segment(env: &Environment, version: &DatasetVersion) -> Result<Segment, DatasetError> {
    let ddir = datasets_dir(env)?;
    let name = segment_name(version.import_id);
    // Another process sharing the object store wrote it: fetch it by its
    // digest (verified as it arrives).
    if let Some(objects) = env.objects()
        && !ddir.exists(&name)
    {
        objects.fetch_to(&version.segment_sha256, &ddir, &name)?;
    }
    let seg = Segment::open(&ddir, &name)?;
    if seg.chunk_count() != version.chunks || seg.bucket_count() != version.buckets {
        return Err(DatasetError::Damaged(format!(
            "the segment of {} does not match its manifest",
            version.reference()
        )));
    }
    Ok(seg)
}

/// The three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// 80% of groups.
    Train,
    /// 10%.
    Validation,
    /// 10%.
    Test,
}

/// The split of a record for `seed`. Records with identical texts fall in
/// the same split (duplicates would otherwise leak test data into training);
/// records without text are split by id.
pub fn split_of(record: &DataRecord, seed: u64) -> Split {
    let mut h = Digest::hasher();
    h.update(b"cloister-split-v1");
    h.update(&seed.to_le_bytes());
    if record.texts.is_empty() {
        h.update(b"id");
        h.update(record.id.as_bytes());
    } else {
        for t in &record.texts {
            h.update(&(t.value.len() as u64).to_le_bytes());
            h.update(t.value.as_bytes());
        }
        for n in &record.numerics {
            if let Numeric::Vector(v) = &n.value {
                for x in v {
                    h.update(&x.to_le_bytes());
                }
            }
        }
    }
    let d = h.finish();
    let x = u16::from_le_bytes([d.0[0], d.0[1]]) as u32 * 1000 / 65536;
    match x {
        0..800 => Split::Train,
        800..900 => Split::Validation,
        _ => Split::Test,
    }
}

/// One record as the pipeline sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// The record (its `label` field unset: see `labels`).
    pub record: DataRecord,
    /// Every label it has, with provenance.
    pub labels: Vec<LabelEntry>,
}

/// Decodes a record chunk and its gold-label chunk.
fn decode_chunk(
    records: &[u8],
    gold: &[u8],
) -> Result<Vec<(DataRecord, Option<String>)>, DatasetError> {
    let bad = || DatasetError::Damaged("a record chunk".into());
    let mut r = layout::Reader(records);
    let mut g = layout::Reader(gold);
    let n = r.u32().ok_or_else(bad)?;
    if g.u32() != Some(n) {
        return Err(bad());
    }
    let mut out = Vec::with_capacity((n as usize).min(layout::CHUNK_RECORDS));
    for _ in 0..n {
        let id = r.str().ok_or_else(bad)?.to_string();
        let payload = r.bytes().ok_or_else(bad)?;
        let record = crate::codec::decode(id, payload).ok_or_else(bad)?;
        if g.str() != Some(record.id.as_str()) {
            return Err(bad());
        }
        let label = match g.take(1).ok_or_else(bad)?[0] {
            0 => None,
            _ => Some(g.str().ok_or_else(bad)?.to_string()),
        };
        out.push((record, label));
    }
    if !r.done() || !g.done() {
        return Err(bad());
    }
    Ok(out)
}

fn with_labels(
    record: DataRecord,
    gold: Option<String>,
    gold_time: u64,
    later: Vec<LabelEntry>,
) -> StoredRecord {
    let mut labels: Vec<LabelEntry> = gold
        .map(|label| LabelEntry {
            label,
            provenance: Provenance::Gold,
            time_ms: gold_time,
        })
        .into_iter()
        .collect();
    labels.extend(later);
    StoredRecord { record, labels }
}

/// Streams every record of a version with its labels, in input order.
pub fn records(
    env: &Environment,
    version: &DatasetVersion,
) -> impl Iterator<Item = Result<StoredRecord, DatasetError>> + use<> {
    let gold_time = version.created_ms;
    let opened = open_segment(env, version)
        .and_then(|seg| Ok((seg, later_labels(env.store().as_ref(), version.import_id)?)));
    let (segment, mut later, mut failed) = match opened {
        Ok((seg, map)) => (Some(seg), map, None),
        Err(e) => (None, std::collections::HashMap::new(), Some(e)),
    };
    let mut next_chunk = 0u32;
    let mut pending: std::vec::IntoIter<(DataRecord, Option<String>)> = Vec::new().into_iter();
    std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            return Some(Err(e));
        }
        let segment = segment.as_ref()?;
        loop {
            if let Some((record, gold)) = pending.next() {
                let extra = later.remove(&record.id).unwrap_or_default();
                return Some(Ok(with_labels(record, gold, gold_time, extra)));
            }
            if next_chunk >= segment.chunk_count() {
                return None;
            }
            let decoded = segment
                .chunk(next_chunk)
                .map_err(DatasetError::from)
                .and_then(|(r, g)| decode_chunk(&r, &g));
            next_chunk += 1;
            match decoded {
                Ok(list) => pending = list.into_iter(),
                Err(e) => {
                    next_chunk = u32::MAX;
                    return Some(Err(e));
                }
            }
        }
    })
}

/// The non-gold labels of one record.
fn labels_of(
    store: &dyn Storage,
    import_id: u64,
    id: &str,
) -> Result<Vec<LabelEntry>, DatasetError> {
    let mut prefix = record_key(import_id, id);
    prefix.push(0);
    store
        .scan(Space::Labels, &prefix)
        .map(|item| {
            let (_, v) = item?;
            serde_json::from_slice(&v).map_err(|_| DatasetError::Damaged("a label".into()))
        })
        .collect()
}

/// Every non-gold label of an import, by record id.
fn later_labels(
    store: &dyn Storage,
    import_id: u64,
) -> Result<std::collections::HashMap<String, Vec<LabelEntry>>, DatasetError> {
    let mut map: std::collections::HashMap<String, Vec<LabelEntry>> =
        std::collections::HashMap::new();
    for item in store.scan(Space::Labels, &import_id.to_be_bytes()) {
        let (k, v) = item?;
        let rest = &k[8..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DatasetError::Damaged("a label key".into()))?;
        let id = String::from_utf8(rest[..end].to_vec())
            .map_err(|_| DatasetError::Damaged("a label key".into()))?;
        let entry =
            serde_json::from_slice(&v).map_err(|_| DatasetError::Damaged("a label".into()))?;
        map.entry(id).or_default().push(entry);
    }
    Ok(map)
}

/// The human labels of a version, by record id: `(user, label)` in the
/// order they were stored.
pub fn human_labels(
    env: &Environment,
    version: &DatasetVersion,
) -> Result<std::collections::HashMap<String, Vec<(String, String)>>, DatasetError> {
    let mut out = std::collections::HashMap::new();
    for (id, entries) in later_labels(env.store().as_ref(), version.import_id)? {
        let mut humans: Vec<(u64, String, String)> = entries
            .into_iter()
            .filter_map(|e| match e.provenance {
                Provenance::Human { user } => Some((e.time_ms, user, e.label)),
                _ => None,
            })
            .collect();
        if !humans.is_empty() {
            humans.sort();
            out.insert(id, humans.into_iter().map(|(_, u, l)| (u, l)).collect());
        }
    }
    Ok(out)
}

/// Counts per split, labeled and unlabeled, for a seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    /// Seed used.
    pub seed: u64,
    /// `(labeled, unlabeled)` per split.
    pub counts: BTreeMap<Split, (u64, u64)>,
}

/// Computes [`SplitCounts`] by streaming the version.
pub fn split_counts(
    env: &Environment,
    version: &DatasetVersion,
    seed: u64,
) -> Result<SplitCounts, DatasetError> {
    let mut out = SplitCounts {
        seed,
        counts: BTreeMap::new(),
    };
    for r in records(env, version) {
        let r = r?;
        let e = out.counts.entry(split_of(&r.record, seed)).or_default();
        if r.labels.is_empty() {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
    }
    Ok(out)
}

/// Reads one record of a version (for the policy-checked views only).
pub fn get_record(
    env: &Environment,
    version: &DatasetVersion,
    id: &str,
) -> Result<StoredRecord, DatasetError> {
    let unknown = || DatasetError::UnknownRecord {
        dataset: version.reference(),
        id: id.to_string(),
    };
    let segment = open_segment(env, version)?;
    let chunk = layout::find_chunk(&segment, id)?.ok_or_else(unknown)?;
    let (r, g) = segment.chunk(chunk)?;
    let (record, label) = decode_chunk(&r, &g)?
        .into_iter()
        .find(|(r, _)| r.id == id)
        .ok_or_else(|| DatasetError::Damaged("the id index points to the wrong chunk".into()))?;
    let later = labels_of(env.store().as_ref(), version.import_id, id)?;
    Ok(with_labels(record, label, version.created_ms, later))
}

fn require_record(
    env: &Environment,
    version: &DatasetVersion,
    id: &str,
) -> Result<(), DatasetError> {
    let segment = open_segment(env, version)?;
    match layout::find_chunk(&segment, id)? {
        Some(_) => Ok(()),
        None => Err(DatasetError::UnknownRecord {
            dataset: version.reference(),
            id: id.to_string(),
        }),
    }
}

/// The labeler a record is assigned to.
pub fn assignee(
    env: &Environment,
    version: &DatasetVersion,
    id: &str,
) -> Result<Option<String>, DatasetError> {
    Ok(env
        .store()
        .get(Space::Assignments, &record_key(version.import_id, id))?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Writes that assign a record to a labeler.
pub fn assign(
    env: &Environment,
    version: &DatasetVersion,
    id: &str,
    user: &str,
) -> Result<WriteBatch, DatasetError> {
    require_record(env, version, id)?;
    let mut b = WriteBatch::new();
    b.put(
        Space::Assignments,
        record_key(version.import_id, id),
        user.as_bytes().to_vec(),
    );
    Ok(b)
}

/// Writes that store a label for a record (one per provenance source; a
/// later label from the same source replaces the earlier one).
pub fn set_label(
    env: &Environment,
    version: &DatasetVersion,
    id: &str,
    entry: &LabelEntry,
) -> Result<WriteBatch, DatasetError> {
    require_record(env, version, id)?;
    let mut b = WriteBatch::new();
    let value = serde_json::to_vec(entry).map_err(|e| DatasetError::Damaged(e.to_string()))?;
    b.put(
        Space::Labels,
        label_key(version.import_id, id, &entry.provenance.source_key()),
        value,
    );
    Ok(b)
}

/// Opens `path` as JSONL (optionally `.gz`) or CSV, by `format` or, when
/// `None`, by extension (`.csv`/`.csv.gz` is CSV, everything else JSONL).
pub fn open_source(
    path: &Path,
    format: Option<&str>,
    schema: crate::records::Schema,
) -> Result<Box<dyn RecordSource>, DatasetError> {
    let name = path.to_string_lossy().to_lowercase();
    let is_csv = match format {
        Some("csv") => true,
        Some("jsonl") => false,
        Some(other) => {
            return Err(DatasetError::Input(RecordError::Line {
                file: path.to_path_buf(),
                line: 0,
                field: None,
                problem: format!("unknown format `{other}` (use jsonl or csv)"),
            }));
        }
        None => name.ends_with(".csv") || name.ends_with(".csv.gz"),
    };
    let file = std::fs::File::open(path).map_err(|source| RecordError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let input: Box<dyn std::io::BufRead + Send> = if name.ends_with(".gz") {
        Box::new(std::io::BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(file),
        ))
    } else {
        Box::new(std::io::BufReader::with_capacity(1 << 16, file))
    };
    if is_csv {
        Ok(Box::new(crate::csv_records::CsvReader::new(
            path, input, &schema,
        )?))
    } else {
        Ok(Box::new(
            crate::records::JsonlReader::new(path, input, schema).without_duplicate_check(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: u32) -> DatasetVersion {
        DatasetVersion {
            name: "d".into(),
            version,
            import_id: 1,
            chunks: 1,
            buckets: 1,
            segment_sha256: String::new(),
            digest: format!("sha256:{version}"),
            source: "d.jsonl".into(),
            created_by: "ana".into(),
            created_ms: 0,
            stats: DatasetStats::default(),
        }
    }

    #[test]
    fn the_manifest_cache_answers_only_for_the_bytes_it_parsed() -> Result<(), DatasetError> {
        let cache = ManifestCache::default();
        let key = b"d\0\0\0\0\x01".to_vec();
        let one =
            serde_json::to_vec(&manifest(1)).map_err(|_| DatasetError::Damaged("t".into()))?;
        let two =
            serde_json::to_vec(&manifest(2)).map_err(|_| DatasetError::Damaged("t".into()))?;
        assert_eq!(cache.parse(key.clone(), one.clone())?, manifest(1));
        assert_eq!(cache.parse(key.clone(), one)?, manifest(1));
        // Same key, other bytes: parsed afresh, never the cached manifest.
        assert_eq!(cache.parse(key.clone(), two)?, manifest(2));
        assert!(matches!(
            cache.parse(key, b"{not json".to_vec()),
            Err(DatasetError::Damaged(_))
        ));
        for n in 0..ManifestCache::CAPACITY + 10 {
            let bytes = serde_json::to_vec(&manifest(n as u32))
                .map_err(|_| DatasetError::Damaged("t".into()))?;
            cache.parse(n.to_be_bytes().to_vec(), bytes)?;
        }
        let len = cache.map.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert!(len <= ManifestCache::CAPACITY, "{len} entries");
        Ok(())
    }
}
