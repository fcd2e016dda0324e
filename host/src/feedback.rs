//! What a deployment keeps of its requests for later: the answers it gave
//! (so that true labels arriving through feedback can be scored against
//! them) and the captured records waiting to become a dataset version
//! (docs/deployment.md).
//!
//! **Answers** live in [`Space::ServingAnswers`] as a ring per deployment:
//! `deployment \0 a seq` → [`KeptAnswer`] (no input, only ids, models and
//! labels), and an index `deployment \0 i client \0 record id` → seq, so
//! feedback finds the answer a client was given for its record id (a
//! client's ids are its own: another client's feedback never reaches
//! them). At most [`crate::deployments::Deployment::keep_answers`] are
//! kept; the oldest go first.
//!
//! **Captures** live in [`Space::Captures`]: `deployment \0 client \0
//! record id` → [`Captured`], the record as JSON with its id made
//! `client/id`, until a batch is written as a dataset version (a record
//! sent again under the same id replaces the waiting one).

use serde::{Deserialize, Serialize};

use crate::store::{Space, Storage, StoreError, WriteBatch};

/// One record's answer, as kept for feedback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptAnswer {
    /// The client account that asked.
    pub client: String,
    /// The record id it sent.
    pub id: String,
    /// When, ms since the epoch.
    pub time_ms: u64,
    /// `champion` or `candidate`.
    pub role: String,
    /// The model that answered.
    pub model: String,
    /// Its label.
    pub label: String,
    /// The champion's label for the same record when a candidate answered
    /// (the champion runs alongside for the comparison).
    pub champion: Option<String>,
    /// The shadow model and its label, when the request was shadowed.
    pub shadow: Option<(String, String)>,
    /// The dataset the record was captured into, if it was (feedback then
    /// labels it there too).
    pub captured: Option<String>,
    /// The true label, once feedback gave it.
    pub truth: Option<String>,
}

/// A captured record waiting for its dataset version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    /// The record as a JSON line (id `client/id`, no label).
    pub line: String,
    /// When it was captured.
    pub time_ms: u64,
    /// The true label from feedback, if it came before the version was
    /// written: `(label, client, time_ms)`.
    pub truth: Option<(String, String, u64)>,
}

fn ring_prefix(deployment: &str) -> Vec<u8> {
    let mut k = deployment.as_bytes().to_vec();
    k.extend_from_slice(b"\0a");
    k
}

fn ring_key(deployment: &str, seq: u64) -> Vec<u8> {
    let mut k = ring_prefix(deployment);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn index_key(deployment: &str, client: &str, id: &str) -> Vec<u8> {
    let mut k = deployment.as_bytes().to_vec();
    k.extend_from_slice(b"\0i");
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn seq_of(key: &[u8], prefix_len: usize) -> Option<u64> {
    key.get(prefix_len..)
        .and_then(|m| <[u8; 8]>::try_from(m).ok())
        .map(u64::from_be_bytes)
}

fn damaged(what: &str) -> StoreError {
    StoreError::Corrupted(format!("a kept {what} does not decode"))
}

/// Adds `answers` to the deployment's ring (stage the batch), evicting the
/// oldest beyond `keep`. A record id answered again points at its newest
/// answer.
pub fn keep(
    store: &dyn Storage,
    batch: &mut WriteBatch,
    deployment: &str,
    answers: &[KeptAnswer],
    keep: u64,
) -> Result<(), StoreError> {
    if keep == 0 || answers.is_empty() {
        return Ok(());
    }
    let p = ring_prefix(deployment);
    let next = match store.last(Space::ServingAnswers, &p)? {
        Some((k, _)) => seq_of(&k, p.len()).map_or(0, |s| s + 1),
        None => 0,
    };
    let mut seq = next;
    for a in answers {
        let v = serde_json::to_vec(a).map_err(|_| damaged("answer"))?;
        batch.put(Space::ServingAnswers, ring_key(deployment, seq), v);
        batch.put(
            Space::ServingAnswers,
            index_key(deployment, &a.client, &a.id),
            seq.to_be_bytes().to_vec(),
        );
        seq += 1;
    }
    let cutoff = seq.saturating_sub(keep);
    if cutoff == 0 {
        return Ok(());
    }
    // Index entries this batch writes must survive the evictions below
    // (writes apply in order, and a delete after the put would win).
    let fresh: std::collections::HashSet<(&str, &str)> = answers
        .iter()
        .enumerate()
        .filter(|(i, _)| next + *i as u64 >= cutoff)
        .map(|(_, a)| (a.client.as_str(), a.id.as_str()))
        .collect();
    let in_batch: std::collections::HashSet<(&str, &str)> = answers
        .iter()
        .map(|a| (a.client.as_str(), a.id.as_str()))
        .collect();
    for item in store.scan(Space::ServingAnswers, &p) {
        let (k, v) = item?;
        let Some(s) = seq_of(&k, p.len()) else {
            continue;
        };
        if s >= cutoff {
            break;
        }
        batch.delete(Space::ServingAnswers, k);
        if let Ok(old) = serde_json::from_slice::<KeptAnswer>(&v)
            && !in_batch.contains(&(old.client.as_str(), old.id.as_str()))
        {
            let ik = index_key(deployment, &old.client, &old.id);
            if store.get(Space::ServingAnswers, &ik)?.as_deref() == Some(&s.to_be_bytes()[..]) {
                batch.delete(Space::ServingAnswers, ik);
            }
        }
    }
    // Answers of this very batch beyond `keep` (a batch larger than the
    // ring): drop them again.
    for s in next..cutoff.min(seq) {
        batch.delete(Space::ServingAnswers, ring_key(deployment, s));
        let a = &answers[(s - next) as usize];
        if !fresh.contains(&(a.client.as_str(), a.id.as_str())) {
            batch.delete(
                Space::ServingAnswers,
                index_key(deployment, &a.client, &a.id),
            );
        }
    }
    Ok(())
}

/// The answer `client` was last given for record `id`, with its seq.
pub fn find(
    store: &dyn Storage,
    deployment: &str,
    client: &str,
    id: &str,
) -> Result<Option<(u64, KeptAnswer)>, StoreError> {
    let Some(seq) = store.get(Space::ServingAnswers, &index_key(deployment, client, id))? else {
        return Ok(None);
    };
    let seq = <[u8; 8]>::try_from(seq.as_slice())
        .map(u64::from_be_bytes)
        .map_err(|_| damaged("answer index"))?;
    let Some(v) = store.get(Space::ServingAnswers, &ring_key(deployment, seq))? else {
        return Ok(None);
    };
    let a: KeptAnswer = serde_json::from_slice(&v).map_err(|_| damaged("answer"))?;
    // An evicted slot reused by another record is not this record's answer.
    Ok((a.client == client && a.id == id).then_some((seq, a)))
}

/// The write that stores an answer again (with its true label).
pub fn update(
    batch: &mut WriteBatch,
    deployment: &str,
    seq: u64,
    a: &KeptAnswer,
) -> Result<(), StoreError> {
    let v = serde_json::to_vec(a).map_err(|_| damaged("answer"))?;
    batch.put(Space::ServingAnswers, ring_key(deployment, seq), v);
    Ok(())
}

fn capture_key(deployment: &str, client: &str, id: &str) -> Vec<u8> {
    let mut k = capture_prefix(deployment);
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn capture_prefix(deployment: &str) -> Vec<u8> {
    let mut k = deployment.as_bytes().to_vec();
    k.push(0);
    k
}

/// The id a captured record has in the capture dataset.
pub fn captured_id(client: &str, id: &str) -> String {
    format!("{client}/{id}")
}

/// The capture-dataset id of a waiting capture's key.
pub fn captured_id_of_key(deployment: &str, key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(capture_prefix(deployment).as_slice())?;
    let at = rest.iter().position(|&b| b == 0)?;
    let client = std::str::from_utf8(&rest[..at]).ok()?;
    let id = std::str::from_utf8(&rest[at + 1..]).ok()?;
    Some(captured_id(client, id))
}

/// The write that captures one record of `client`.
pub fn capture(
    batch: &mut WriteBatch,
    deployment: &str,
    client: &str,
    id: &str,
    c: &Captured,
) -> Result<(), StoreError> {
    let v = serde_json::to_vec(c).map_err(|_| damaged("capture"))?;
    batch.put(Space::Captures, capture_key(deployment, client, id), v);
    Ok(())
}

/// A waiting captured record.
pub fn find_capture(
    store: &dyn Storage,
    deployment: &str,
    client: &str,
    id: &str,
) -> Result<Option<Captured>, StoreError> {
    store
        .get(Space::Captures, &capture_key(deployment, client, id))?
        .map(|v| serde_json::from_slice(&v).map_err(|_| damaged("capture")))
        .transpose()
}

/// Every waiting captured record of a deployment with its key, in key
/// order.
pub fn pending_captures(
    store: &dyn Storage,
    deployment: &str,
) -> Result<Vec<(Vec<u8>, Captured)>, StoreError> {
    store
        .scan(Space::Captures, &capture_prefix(deployment))
        .map(|item| {
            let (k, v) = item?;
            Ok((
                k,
                serde_json::from_slice(&v).map_err(|_| damaged("capture"))?,
            ))
        })
        .collect()
}

/// How many captured records wait (counting stops at `limit`).
pub fn count_captures(
    store: &dyn Storage,
    deployment: &str,
    limit: u64,
) -> Result<u64, StoreError> {
    let mut n = 0;
    for item in store.scan(Space::Captures, &capture_prefix(deployment)) {
        item?;
        n += 1;
        if n >= limit {
            break;
        }
    }
    Ok(n)
}

/// The deletes of everything a deployment kept.
pub fn delete_all(
    store: &dyn Storage,
    batch: &mut WriteBatch,
    deployment: &str,
) -> Result<(), StoreError> {
    for space in [Space::ServingAnswers, Space::Captures] {
        crate::deployments::delete_under(store, batch, space, deployment)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStorage;

    fn answer(client: &str, id: &str, label: &str) -> KeptAnswer {
        KeptAnswer {
            client: client.into(),
            id: id.into(),
            time_ms: 1,
            role: "champion".into(),
            model: "m".into(),
            label: label.into(),
            champion: None,
            shadow: None,
            captured: None,
            truth: None,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_answers_per_client_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStorage::open(dir.path(), true).unwrap();
        for round in 0..5 {
            let answers: Vec<KeptAnswer> = (0..4)
                .map(|i| answer("app", &format!("r{}", round * 4 + i), "spam"))
                .collect();
            let mut b = WriteBatch::new();
            keep(&store, &mut b, "d", &answers, 10).unwrap();
            store.commit(b).unwrap();
        }
        // 20 answers, 10 kept: the oldest ten are gone with their index.
        assert!(find(&store, "d", "app", "r9").unwrap().is_none());
        let (_, a) = find(&store, "d", "app", "r10").unwrap().unwrap();
        assert_eq!(a.id, "r10");
        assert!(find(&store, "d", "other", "r10").unwrap().is_none());
        let kept = store.scan(Space::ServingAnswers, b"d\0a").count();
        assert_eq!(kept, 10);
        // The same id answered again points at the new answer; the old
        // slot's eviction leaves the new index alone.
        let mut b = WriteBatch::new();
        keep(&store, &mut b, "d", &[answer("app", "r19", "ham")], 10).unwrap();
        store.commit(b).unwrap();
        assert_eq!(
            find(&store, "d", "app", "r19").unwrap().unwrap().1.label,
            "ham"
        );
        // A batch larger than the ring keeps only its newest.
        let many: Vec<KeptAnswer> = (0..25)
            .map(|i| answer("app", &format!("x{i}"), "a"))
            .collect();
        let mut b = WriteBatch::new();
        keep(&store, &mut b, "d", &many, 10).unwrap();
        store.commit(b).unwrap();
        assert_eq!(store.scan(Space::ServingAnswers, b"d\0a").count(), 10);
        assert!(find(&store, "d", "app", "x14").unwrap().is_none());
        assert!(find(&store, "d", "app", "x15").unwrap().is_some());
        let mut b = WriteBatch::new();
        delete_all(&store, &mut b, "d").unwrap();
        store.commit(b).unwrap();
        assert_eq!(store.scan(Space::ServingAnswers, b"d\0").count(), 0);
    }
}
