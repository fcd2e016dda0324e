//! What fitted featurizers learn: vocabularies the host counts, stored by
//! digest.
//!
//! A fitted featurizer (the `fitted-featurizer` world) names the term keys
//! of each training record, one record per fresh instance
//! (`Runner::terms`); [`count`] keeps the keys that at least `k` records
//! contain — `k` is the environment's minimum cell size, the same as the
//! disclosure check's — at most `cap` of them, and that [`Vocabulary`] is
//! what every featurizing instance is loaded with. It holds 64-bit keys and
//! counts of at least `k`, never text, and is part of the lineage of every
//! model trained on it (`Lineage::features_state`).
//!
//! In the store ([`Space::Fitted`]): `s ‖ digest` → the encoded vocabulary
//! ([`encode`], checked against its digest on every read), and `f ‖ fit
//! key` → the digest a fit with exactly those inputs produced, so a second
//! run on the same data, chain and split reuses it instead of fitting again.

use std::collections::HashMap;

use crate::digest::Digest;
use crate::store::{Space, Storage, StoreError, WriteBatch};
use crate::types::Vocabulary;

/// Most terms a vocabulary may hold, whatever the dimension cap allows.
pub const MAX_TERMS: usize = 1 << 20;

/// Most distinct term keys a fit may produce before counting stops (their
/// counts are held in memory, as sorted runs: about 130 MB at the cap while
/// a worker merges its buffer into its run).
pub const MAX_DISTINCT: usize = 1 << 22;

const MAGIC: &[u8; 8] = b"CLVOCAB1";

/// What went wrong with a fit or a stored vocabulary.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// No term is shared by enough training records.
    #[error(
        "the fit found no term that at least {k} of the {documents} training records contain: \
         the featurizer has nothing to learn from this split"
    )]
    Empty {
        /// The minimum count.
        k: u32,
        /// Records counted.
        documents: u32,
    },
    /// Stored bytes that do not decode, or do not match their digest.
    #[error("fitted state {digest}: {problem}")]
    Damaged {
        /// The state's digest.
        digest: String,
        /// What is wrong.
        problem: String,
    },
    /// A state the store does not hold.
    #[error("fitted state {0} is not in this environment")]
    Missing(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counts the records each key occurs in (`terms[i]` holds record `i`'s
/// keys, sorted and distinct, as `PluginInstance::terms` returns them) and
/// makes the [`vocabulary`] of them.
pub fn count(terms: &[Vec<u64>], k: u32, cap: usize) -> Result<Vocabulary, FitError> {
    let mut df: HashMap<u64, u32> = HashMap::new();
    for keys in terms {
        for &key in keys {
            *df.entry(key).or_insert(0) += 1;
        }
    }
    vocabulary(terms.len(), df, k, cap)
}

/// The vocabulary of a fit over `documents` records whose keys occur in
/// `df` records each: the keys at least `k` records contain; past `cap`,
/// the most frequent (ties: the smaller key). Deterministic.
pub fn vocabulary(
    documents: usize,
    df: impl IntoIterator<Item = (u64, u32)>,
    k: u32,
    cap: usize,
) -> Result<Vocabulary, FitError> {
    let documents = u32::try_from(documents).unwrap_or(u32::MAX);
    let k = k.max(1);
    let mut kept: Vec<(u64, u32)> = df.into_iter().filter(|&(_, n)| n >= k).collect();
    if kept.is_empty() {
        return Err(FitError::Empty { k, documents });
    }
    let cap = cap.clamp(1, MAX_TERMS);
    if kept.len() > cap {
        kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        kept.truncate(cap);
    }
    kept.sort_unstable_by_key(|&(key, _)| key);
    Ok(Vocabulary {
        documents,
        keys: kept.iter().map(|&(key, _)| key).collect(),
        document_frequencies: kept.iter().map(|&(_, n)| n).collect(),
    })
}

/// The canonical bytes of a vocabulary: `CLVOCAB1`, documents and term
/// count (u32 LE), then each key (u64 LE) with its count (u32 LE).
pub fn encode(v: &Vocabulary) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 12 * v.keys.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&v.documents.to_le_bytes());
    out.extend_from_slice(&(v.keys.len() as u32).to_le_bytes());
    for (key, df) in v.keys.iter().zip(&v.document_frequencies) {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&df.to_le_bytes());
    }
    out
}

/// Decodes [`encode`]'s bytes, checking the shape (keys strictly
/// increasing, counts between 1 and the documents).
pub fn decode(bytes: &[u8]) -> Result<Vocabulary, String> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a vocabulary")?;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(rest.get(at..at + 4)?.try_into().ok()?))
    };
    let documents = u32_at(0).ok_or("truncated")?;
    let n = u32_at(4).ok_or("truncated")? as usize;
    let body = &rest[8..];
    if body.len() != n.checked_mul(12).ok_or("too long")? {
        return Err("the term count does not match the length".into());
    }
    let mut v = Vocabulary {
        documents,
        keys: Vec::with_capacity(n),
        document_frequencies: Vec::with_capacity(n),
    };
    for e in body.chunks_exact(12) {
        let key = u64::from_le_bytes(e[..8].try_into().map_err(|_| "truncated")?);
        let df = u32::from_le_bytes(e[8..].try_into().map_err(|_| "truncated")?);
        if v.keys.last().is_some_and(|&last| last >= key) {
            return Err("keys are not strictly increasing".into());
        }
        if df == 0 || df > documents {
            return Err("a count is 0 or above the documents".into());
        }
        v.keys.push(key);
        v.document_frequencies.push(df);
    }
    Ok(v)
}

/// The digest that names a vocabulary: SHA-256 of [`encode`].
pub fn digest(v: &Vocabulary) -> Digest {
    Digest::of(&encode(v))
}

fn state_key(digest: &Digest) -> Vec<u8> {
    let mut k = b"s".to_vec();
    k.extend_from_slice(&digest.0);
    k
}

fn fit_key(key: &Digest) -> Vec<u8> {
    let mut k = b"f".to_vec();
    k.extend_from_slice(&key.0);
    k
}

/// Adds a vocabulary, and the fit that produced it, to `batch`; its
/// digest.
pub fn put(batch: &mut WriteBatch, fit: Option<&Digest>, v: &Vocabulary) -> Digest {
    let bytes = encode(v);
    let d = Digest::of(&bytes);
    batch.put(Space::Fitted, state_key(&d), bytes);
    if let Some(fit) = fit {
        batch.put(Space::Fitted, fit_key(fit), d.0.to_vec());
    }
    d
}

/// The vocabulary named `digest`, checked against it.
pub fn get(store: &dyn Storage, digest: &Digest) -> Result<Vocabulary, FitError> {
    let hex = digest.to_hex();
    let bytes = store
        .get(Space::Fitted, &state_key(digest))?
        .ok_or_else(|| FitError::Missing(hex.clone()))?;
    if Digest::of(&bytes) != *digest {
        return Err(FitError::Damaged {
            digest: hex,
            problem: "the stored bytes do not match the digest".into(),
        });
    }
    decode(&bytes).map_err(|problem| FitError::Damaged {
        digest: hex,
        problem,
    })
}

/// The state a fit with key `fit` produced before, if the store still has
/// both.
pub fn lookup(store: &dyn Storage, fit: &Digest) -> Result<Option<Digest>, FitError> {
    let Some(bytes) = store.get(Space::Fitted, &fit_key(fit))? else {
        return Ok(None);
    };
    let Ok(d) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        return Ok(None);
    };
    let d = Digest(d);
    Ok(store.get(Space::Fitted, &state_key(&d))?.map(|_| d))
}

/// The smallest and largest document frequency of a vocabulary (0, 0
/// when empty).
pub fn df_range(v: &Vocabulary) -> (u32, u32) {
    let min = v.document_frequencies.iter().copied().min().unwrap_or(0);
    let max = v.document_frequencies.iter().copied().max().unwrap_or(0);
    (min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_keys_k_records_share_and_caps_by_frequency() {
        // Key 7 in 3 records, key 5 in 2, key 9 in 1.
        let terms = vec![vec![5, 7, 9], vec![5, 7], vec![7]];
        let v = count(&terms, 2, 10).unwrap();
        assert_eq!(v.documents, 3);
        assert_eq!(v.keys, vec![5, 7]);
        assert_eq!(v.document_frequencies, vec![2, 3]);
        let capped = count(&terms, 1, 1).unwrap();
        assert_eq!(capped.keys, vec![7]);
        assert!(matches!(
            count(&terms, 4, 10),
            Err(FitError::Empty { k: 4, .. })
        ));
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let v = count(&[vec![1, 2], vec![1, 2], vec![2, 3]], 1, 100).unwrap();
        let bytes = encode(&v);
        assert_eq!(decode(&bytes).unwrap(), v);
        let mut bad = bytes.clone();
        bad.pop();
        assert!(decode(&bad).is_err());
        // Swap the first two keys: no longer increasing.
        let mut swapped = bytes.clone();
        let (a, b) = (16..24, 28..36);
        let first: Vec<u8> = swapped[a.clone()].to_vec();
        let second: Vec<u8> = swapped[b.clone()].to_vec();
        swapped[a].copy_from_slice(&second);
        swapped[b].copy_from_slice(&first);
        assert!(decode(&swapped).is_err());
        assert_ne!(digest(&v), Digest::of(&swapped));
    }
}
