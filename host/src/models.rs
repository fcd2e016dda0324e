//! The model registry: manifests in the store, weights as safetensors files
//! in the environment's `models/` directory, the release state, and signed
//! bundles.

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::Digest;
use crate::store::objects::Objects;
use crate::store::{Space, Storage, StoreError, WriteBatch};
use crate::train::eval::Evaluation;
use crate::train::{EpochStats, Hyper, Kind};

/// Errors of the model registry.
#[derive(Debug, Error)]
pub enum ModelError {
    /// No such model.
    #[error("no model `{0}`")]
    Unknown(String),
    /// A release step is out of order.
    #[error("{0}")]
    Release(String),
    /// A file of the environment.
    #[error("{file}: {source}")]
    File {
        /// File.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// Stored data is damaged.
    #[error("model data is damaged: {0}")]
    Damaged(String),
    /// A bundle is malformed or its signature does not verify.
    #[error("bundle: {0}")]
    Bundle(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a model came from: everything needed to reproduce it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// `name@version` of the dataset.
    pub dataset: String,
    /// Content digest of that version.
    pub dataset_digest: String,
    /// Preprocessor digests, in order.
    pub preprocess: Vec<String>,
    /// Featurizer digest.
    pub features: String,
    /// Each preprocessor's configuration, in order (empty: every one ran
    /// with its defaults).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preprocess_config: Vec<Vec<(String, String)>>,
    /// The featurizer's configuration (empty: its defaults).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features_config: Vec<(String, String)>,
    /// A fitted featurizer's state (its vocabulary), by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features_state: Option<String>,
    /// Seed of the train/validation/test split.
    pub split_seed: u64,
    /// The active-learning job that trained it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// The release state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Who requested it.
    pub requested_by: Option<String>,
    /// Why (the requester's words).
    pub reason: Option<String>,
    /// `approved` or `rejected`, once decided.
    pub decision: Option<String>,
    /// Who decided.
    pub decided_by: Option<String>,
}

impl Release {
    /// The state in words: `not requested`, `requested by R`, or the
    /// decision with who requested and who decided.
    pub fn describe(&self) -> String {
        match (&self.requested_by, &self.decision) {
            (None, _) => "not requested".into(),
            (Some(r), None) => format!("requested by {r}"),
            (Some(r), Some(d)) => format!(
                "{d} (requested by {r}, decided by {})",
                self.decided_by.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// A model's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Id (`m-…`).
    pub id: String,
    /// Template name.
    pub template: String,
    /// Model family.
    pub kind: Kind,
    /// Hyper-parameters used.
    pub hyper: Hyper,
    /// Class names, in output order.
    pub classes: Vec<String>,
    /// Input dimension.
    pub dim: usize,
    /// Lineage.
    pub lineage: Lineage,
    /// Test-split evaluation.
    pub evaluation: Evaluation,
    /// Training curve.
    pub curve: Vec<EpochStats>,
    /// Epoch whose weights were kept.
    pub best_epoch: u32,
    /// Training wall time, seconds.
    pub train_seconds: f64,
    /// Records per split: train, validation, test.
    pub split_sizes: [u64; 3],
    /// SHA-256 of the safetensors file.
    pub weights_sha256: String,
    /// Who trained it.
    pub created_by: String,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// Release state.
    pub release: Release,
    /// The disclosure report computed when the model was trained (absent
    /// on models trained before the check existed: they cannot be
    /// released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disclosure: Option<crate::train::disclosure::Report>,
    /// SHA-256 of the released copy's weights (`models/ID.release.safetensors`:
    /// the input rows the disclosure check found disclosive zeroed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_weights_sha256: Option<String>,
}

impl ModelManifest {
    /// The policy resource for this model.
    pub fn resource(&self) -> crate::policy::Resource {
        crate::policy::Resource::Model {
            id: self.id.clone(),
            release_requested: self.release.requested_by.is_some(),
            release_approved: self.release.decision.as_deref() == Some("approved"),
            requested_by: self.release.requested_by.clone(),
            disclosure: match &self.disclosure {
                None => crate::policy::DisclosureFacts::none(),
                Some(r) => crate::policy::DisclosureFacts {
                    verdict: r.verdict.as_str().into(),
                    membership_flagged: r.membership_flagged,
                    membership_auc_milli: (r.membership.mean_auc * 1000.0).round() as i64,
                    disclosive_rows: i64::try_from(r.features.disclosive).unwrap_or(i64::MAX),
                },
            },
        }
    }

    /// The disclosure verdict as the policies read it: `pass`,
    /// `pass-after-pruning`, `fail`, or `none` when there is no report.
    pub fn disclosure_verdict(&self) -> &'static str {
        self.disclosure
            .as_ref()
            .map_or("none", |r| r.verdict.as_str())
    }

    /// The manifest as it leaves the environment in a bundle: record ids
    /// (badcases, false positives) removed, and every count below the
    /// disclosure threshold `k` (confusion cells, class supports,
    /// reliability bins, split sizes) suppressed to 0, so no figure in a
    /// bundle describes fewer than `k` records.
    pub fn released(&self) -> ModelManifest {
        let k = self
            .disclosure
            .as_ref()
            .map_or(crate::train::disclosure::Thresholds::default().k, |r| {
                r.thresholds.k
            });
        let small = |n: &mut u64| {
            if *n < u64::from(k) {
                *n = 0;
            }
        };
        let mut m = self.clone();
        m.evaluation.badcases.clear();
        m.evaluation.false_positives.clear();
        m.evaluation.confusion.iter_mut().flatten().for_each(small);
        m.evaluation
            .per_class
            .iter_mut()
            .for_each(|c| small(&mut c.support));
        m.evaluation
            .reliability
            .iter_mut()
            .for_each(|b| small(&mut b.count));
        m.split_sizes.iter_mut().for_each(small);
        small(&mut m.evaluation.records);
        // The released weights are the pruned copy.
        if let Some(d) = &m.release_weights_sha256 {
            m.weights_sha256 = d.clone();
        }
        m.release_weights_sha256 = None;
        m
    }
}

fn weights_name(id: &str) -> String {
    format!("{id}.safetensors")
}

fn release_weights_name(id: &str) -> String {
    format!("{id}.release.safetensors")
}

fn models_dir(dir: &Dir) -> Result<Dir, ModelError> {
    dir.create_dir_all("models")
        .map_err(|source| ModelError::File {
            file: "models".into(),
            source,
        })?;
    dir.open_dir("models").map_err(|source| ModelError::File {
        file: "models".into(),
        source,
    })
}

/// Stores weights (and the released copy's, when there is one) and the
/// manifest: weights first, synced; the manifest makes the model visible.
///
/// With an object store, both files are copied there (by digest) before
/// the manifest is committed.
pub fn save(
    store: &dyn Storage,
    dir: &Dir,
    objects: Option<&Objects>,
    manifest: &ModelManifest,
    weights: &[u8],
    release_weights: Option<&[u8]>,
) -> Result<(), ModelError> {
    let mdir = models_dir(dir)?;
    let name = weights_name(&manifest.id);
    write_synced(&mdir, &name, weights)?;
    if let Some(o) = objects {
        o.put_file(&mdir, &name, &manifest.weights_sha256)?;
    }
    if let Some(bytes) = release_weights {
        let name = release_weights_name(&manifest.id);
        write_synced(&mdir, &name, bytes)?;
        if let (Some(o), Some(sha)) = (objects, &manifest.release_weights_sha256) {
            o.put_file(&mdir, &name, sha)?;
        }
    }
    put(store, manifest)
}

/// Writes a file of `models/` whole: to a new temporary name, synced,
/// renamed into place, the directory synced.
fn write_synced(mdir: &Dir, name: &str, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = format!("{name}.tmp");
    let err = |file: &str| {
        let file = format!("models/{file}");
        move |source| ModelError::File { file, source }
    };
    // A temporary file left by a process killed mid-write (nothing else
    // writes here: the store's lock keeps one process per environment).
    match mdir.remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&tmp)(e)),
        _ => {}
    }
    {
        use std::io::Write;
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let mut f = mdir.open_with(&tmp, &opts).map_err(err(&tmp))?;
        f.write_all(bytes).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
    }
    mdir.rename(&tmp, mdir, name).map_err(err(name))?;
    mdir.open(".").and_then(|d| d.sync_all()).map_err(err("."))
}

/// Rewrites a manifest (release state changes).
pub fn put(store: &dyn Storage, manifest: &ModelManifest) -> Result<(), ModelError> {
    let mut b = WriteBatch::new();
    b.put(
        Space::Models,
        manifest.id.as_bytes().to_vec(),
        serde_json::to_vec(manifest).map_err(|e| ModelError::Damaged(e.to_string()))?,
    );
    Ok(store.commit(b)?)
}

/// Changes a stored manifest with `change`, which sees the manifest as it
/// is stored at that moment and may refuse; a concurrent change to the same
/// model makes it run again on the newer manifest rather than be lost.
pub fn update(
    store: &dyn Storage,
    id: &str,
    mut change: impl FnMut(&mut ModelManifest) -> Result<(), ModelError>,
) -> Result<ModelManifest, ModelError> {
    crate::store::update(store, &[(Space::Models, id.as_bytes())], |values| {
        let bytes = values
            .first()
            .and_then(|v| v.as_deref())
            .ok_or_else(|| ModelError::Unknown(id.to_string()))?;
        let mut m: ModelManifest = serde_json::from_slice(bytes)
            .map_err(|_| ModelError::Damaged(format!("manifest of {id}")))?;
        change(&mut m)?;
        let mut b = WriteBatch::new();
        b.put(
            Space::Models,
            id.as_bytes().to_vec(),
            serde_json::to_vec(&m).map_err(|e| ModelError::Damaged(e.to_string()))?,
        );
        Ok((b, m))
    })
}

/// Reads a manifest.
pub fn get(store: &dyn Storage, id: &str) -> Result<ModelManifest, ModelError> {
    let v = store
        .get(Space::Models, id.as_bytes())?
        .ok_or_else(|| ModelError::Unknown(id.to_string()))?;
    serde_json::from_slice(&v).map_err(|_| ModelError::Damaged(format!("manifest of {id}")))
}

/// Every model, by id.
pub fn list(store: &dyn Storage) -> Result<Vec<ModelManifest>, ModelError> {
    store
        .scan(Space::Models, b"")
        .map(|item| {
            let (k, v) = item?;
            serde_json::from_slice(&v)
                .map_err(|_| ModelError::Damaged(String::from_utf8_lossy(&k).into_owned()))
        })
        .collect()
}

/// Reads the weights, checked against the manifest's digest.
pub fn weights(
    dir: &Dir,
    objects: Option<&Objects>,
    manifest: &ModelManifest,
) -> Result<Vec<u8>, ModelError> {
    read_checked(
        dir,
        objects,
        &weights_name(&manifest.id),
        &manifest.weights_sha256,
    )
}

/// The released copy's weights (checked against the manifest): what a
/// bundle carries.
pub fn release_weights(
    dir: &Dir,
    objects: Option<&Objects>,
    manifest: &ModelManifest,
) -> Result<Vec<u8>, ModelError> {
    let digest = manifest.release_weights_sha256.as_deref().ok_or_else(|| {
        ModelError::Release(format!(
            "{} has no released copy (it was trained before disclosure checks)",
            manifest.id
        ))
    })?;
    read_checked(dir, objects, &release_weights_name(&manifest.id), digest)
}

/// Reads file `name` of `models/` and checks its digest; a file missing
/// here is fetched from the object store first (verified as it arrives).
fn read_checked(
    dir: &Dir,
    objects: Option<&Objects>,
    name: &str,
    sha256: &str,
) -> Result<Vec<u8>, ModelError> {
    let mdir = models_dir(dir)?;
    if let Some(o) = objects
        && !mdir.exists(name)
    {
        o.fetch_to(sha256, &mdir, name)?;
    }
    let bytes = mdir.read(name).map_err(|source| ModelError::File {
        file: format!("models/{name}"),
        source,
    })?;
    if Digest::of(&bytes).to_hex() != sha256 {
        return Err(ModelError::Damaged(format!(
            "models/{name} does not match its manifest"
        )));
    }
    Ok(bytes)
}

const BUNDLE_MAGIC: &str = "cloister-model-bundle v1";
/// A bundle that also carries a fitted featurizer's state.
const BUNDLE_MAGIC_V2: &str = "cloister-model-bundle v2";

fn signed_message(manifest: &[u8], state: Option<&[u8]>, weights: &[u8]) -> Vec<u8> {
    let magic = if state.is_some() {
        BUNDLE_MAGIC_V2
    } else {
        BUNDLE_MAGIC
    };
    let mut m = format!("{magic}\n").into_bytes();
    m.extend_from_slice(&Digest::of(manifest).0);
    if let Some(state) = state {
        m.extend_from_slice(&Digest::of(state).0);
    }
    m.extend_from_slice(&Digest::of(weights).0);
    m
}

/// A signed bundle: the manifest, a fitted featurizer's state when the
/// model has one, the weights, and an Ed25519 signature over all of them,
/// with the signing key.
///
/// ```text
/// cloister-model-bundle v1\n
/// key <hex>\n signature <hex>\n manifest <len>\n <manifest JSON> weights <len>\n <safetensors>
/// ```
///
/// With a state the first line says `v2` and `state <len>\n <vocabulary>`
/// comes before `weights` (its digest is the manifest's
/// `lineage.features_state`).
pub fn bundle(
    manifest: &ModelManifest,
    state: Option<&[u8]>,
    weights: &[u8],
    sign: &dyn Fn(&[u8]) -> Vec<u8>,
    key: [u8; 32],
) -> Result<Vec<u8>, ModelError> {
    let m = serde_json::to_vec_pretty(manifest).map_err(|e| ModelError::Damaged(e.to_string()))?;
    let sig = sign(&signed_message(&m, state, weights));
    let magic = if state.is_some() {
        BUNDLE_MAGIC_V2
    } else {
        BUNDLE_MAGIC
    };
    let mut out = format!(
        "{magic}\nkey {}\nsignature {}\nmanifest {}\n",
        hex::encode(key),
        hex::encode(sig),
        m.len()
    )
    .into_bytes();
    out.extend_from_slice(&m);
    if let Some(state) = state {
        out.extend_from_slice(format!("state {}\n", state.len()).as_bytes());
        out.extend_from_slice(state);
    }
    out.extend_from_slice(format!("weights {}\n", weights.len()).as_bytes());
    out.extend_from_slice(weights);
    Ok(out)
}

/// Reads a bundle's `NAME LEN\n` line off the front of `rest`: the length.
fn section(rest: &mut &[u8], name: &str) -> Result<usize, ModelError> {
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| ModelError::Bundle("truncated".into()))?;
    let n = std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(|l| l.strip_prefix(name))
        .and_then(|l| l.strip_prefix(' '))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ModelError::Bundle(format!("expected `{name} LEN`")))?;
    *rest = &rest[end + 1..];
    Ok(n)
}

/// What a verified bundle holds.
#[derive(Debug)]
pub struct VerifiedBundle {
    /// The signing key.
    pub key: [u8; 32],
    /// The manifest.
    pub manifest: ModelManifest,
    /// The weights.
    pub weights: Vec<u8>,
    /// A fitted featurizer's state (an encoded vocabulary), checked
    /// against the manifest's lineage.
    pub state: Option<Vec<u8>>,
}

/// Verifies a bundle offline. With `expected_key`, the bundle must be signed
/// by that key; without, the key inside is reported for the caller to
/// compare. Any modified byte fails.
pub fn verify_bundle(
    bytes: &[u8],
    expected_key: Option<&[u8; 32]>,
) -> Result<VerifiedBundle, ModelError> {
    let bad = |m: &str| ModelError::Bundle(m.to_string());
    let mut rest = bytes;
    let mut line = || -> Result<&str, ModelError> {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("truncated header"))?;
        let l = std::str::from_utf8(&rest[..end]).map_err(|_| bad("header is not text"))?;
        rest = &rest[end + 1..];
        Ok(l)
    };
    let v2 = match line()? {
        BUNDLE_MAGIC => false,
        BUNDLE_MAGIC_V2 => true,
        _ => return Err(bad("not a cloister model bundle")),
    };
    let key_hex = line()?
        .strip_prefix("key ")
        .ok_or_else(|| bad("expected `key`"))?
        .to_string();
    let sig_hex = line()?
        .strip_prefix("signature ")
        .ok_or_else(|| bad("expected `signature`"))?
        .to_string();
    let mlen: usize = line()?
        .strip_prefix("manifest ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad("expected `manifest LEN`"))?;
    if rest.len() < mlen {
        return Err(bad("truncated manifest"));
    }
    let (m, after) = rest.split_at(mlen);
    rest = after;
    let state = if v2 {
        let slen = section(&mut rest, "state")?;
        if rest.len() < slen {
            return Err(bad("truncated state"));
        }
        let (st, after) = rest.split_at(slen);
        rest = after;
        Some(st)
    } else {
        None
    };
    let wlen = section(&mut rest, "weights")?;
    if rest.len() != wlen {
        return Err(bad("the weights are truncated or followed by extra bytes"));
    }
    let key: [u8; 32] = hex::decode(&key_hex)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| bad("key is not 32 hex bytes"))?;
    if let Some(expected) = expected_key
        && expected != &key
    {
        return Err(bad("signed by a different key than expected"));
    }
    let sig = hex::decode(&sig_hex).map_err(|_| bad("signature is not hex"))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed_message(m, state, rest), &sig)
        .map_err(|_| bad("the signature does not verify: the bundle was modified"))?;
    let manifest: ModelManifest =
        serde_json::from_slice(m).map_err(|e| ModelError::Bundle(format!("manifest: {e}")))?;
    if Digest::of(rest).to_hex() != manifest.weights_sha256 {
        return Err(bad("the weights do not match the manifest"));
    }
    if state.map(|s| Digest::of(s).to_hex()) != manifest.lineage.features_state {
        return Err(bad(
            "the fitted state does not match the manifest's lineage",
        ));
    }
    Ok(VerifiedBundle {
        key,
        manifest,
        weights: rest.to_vec(),
        state: state.map(<[u8]>::to_vec),
    })
}
