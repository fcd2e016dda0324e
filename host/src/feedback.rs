//! What a deployment keeps of its requests for later: the answers it gave
//! (so that true labels arriving through feedback can be scored against
//! them) and the captured records waiting to become a dataset version
//! (docs/deployment.md).
//!
//! **Answers** live in [`Space::ServingAnswers`] in generations per
//! deployment: `deployment \0 g generation client \0 record id` →
//! [`KeptAnswer`] (no input, only ids, models and labels), so feedback
//! finds the answer a client was given for its record id with a few point
//! reads (a client's ids are its own: another client's feedback never
//! reaches them), and a request costs one write per record. About
//! [`crate::deployments::Deployment::keep_answers`] are kept; the oldest
//! generation goes whole ([`keep`]).
//!
//! **Captures** live in [`Space::Captures`]: `deployment \0 client \0
//! record id` → [`Captured`], the record as JSON with its id made
//! `client/id`, until a batch is written as a dataset version (a record
//! sent again under the same id replaces the waiting one).

use serde::{Deserialize, Serialize};

use crate::store::{Expect, Space, Storage, StoreError, WriteBatch};

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

/// Answers are kept in generations of `keep / GENERATIONS` answers; the
/// current one and the `GENERATIONS` before it are kept, older ones are
/// deleted whole.
pub const GENERATIONS: u32 = 4;

/// Where a deployment's answers stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Ring {
    /// The generation new answers go to.
    generation: u32,
    /// Answers in it.
    count: u64,
    /// Generations below this one are deleted.
    kept_from: u32,
}

fn meta_key(deployment: &str) -> Vec<u8> {
    let mut k = deployment.as_bytes().to_vec();
    k.extend_from_slice(b"\0m");
    k
}

fn generation_prefix(deployment: &str, generation: u32) -> Vec<u8> {
    let mut k = deployment.as_bytes().to_vec();
    k.extend_from_slice(b"\0g");
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn answer_key(deployment: &str, generation: u32, client: &str, id: &str) -> Vec<u8> {
    let mut k = generation_prefix(deployment, generation);
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn damaged(what: &str) -> StoreError {
    StoreError::Corrupted(format!("a kept {what} does not decode"))
}

/// The deployment's ring of kept answers, and the bytes it was read from.
fn ring(store: &dyn Storage, deployment: &str) -> Result<(Ring, Option<Vec<u8>>), StoreError> {
    let read = store.get(Space::ServingAnswers, &meta_key(deployment))?;
    let r = match &read {
        Some(v) => serde_json::from_slice(v).map_err(|_| damaged("answer ring"))?,
        None => Ring::default(),
    };
    Ok((r, read))
}

/// Adds `answers` to the deployment's kept answers (to `batch`, which the
/// caller stages): one write per answer; a generation that falls out of
/// the newest [`GENERATIONS`] + 1 is deleted whole, so between `keep` and
/// `keep · (1 + 1/GENERATIONS)` recent answers are kept. A record id
/// answered again is found at its newest answer. Returns what the write
/// must expect — the ring as it was read — so that two processes keeping
/// answers of one deployment cannot both advance it from the same state
/// (see [`Storage::stage_if`]).
pub fn keep(
    store: &dyn Storage,
    batch: &mut WriteBatch,
    deployment: &str,
    answers: &[KeptAnswer],
    keep: u64,
) -> Result<Option<Expect>, StoreError> {
    if keep == 0 || answers.is_empty() {
        return Ok(None);
    }
    let per_generation = keep.div_ceil(u64::from(GENERATIONS)).max(1);
    let (mut r, read) = ring(store, deployment)?;
    // Generations after this one hold nothing stored yet.
    let stored_up_to = r.generation;
    let mut placed = Vec::with_capacity(answers.len());
    for a in answers {
        if r.count >= per_generation {
            r.generation += 1;
            r.count = 0;
        }
        placed.push((r.generation, a));
        r.count += 1;
    }
    let oldest = r.generation.saturating_sub(GENERATIONS);
    // (Answers of this very batch that already fall out are not written.)
    for (generation, a) in placed.into_iter().filter(|(g, _)| *g >= oldest) {
        let v = serde_json::to_vec(a).map_err(|_| damaged("answer"))?;
        batch.put(
            Space::ServingAnswers,
            answer_key(deployment, generation, &a.client, &a.id),
            v,
        );
    }
    while r.kept_from < oldest.min(stored_up_to + 1) {
        for item in store.scan(
            Space::ServingAnswers,
            &generation_prefix(deployment, r.kept_from),
        ) {
            let (k, _) = item?;
            batch.delete(Space::ServingAnswers, k);
        }
        r.kept_from += 1;
    }
    r.kept_from = r.kept_from.max(oldest);
    batch.put(
        Space::ServingAnswers,
        meta_key(deployment),
        serde_json::to_vec(&r).map_err(|_| damaged("answer ring"))?,
    );
    Ok(Some(Expect::new(
        Space::ServingAnswers,
        meta_key(deployment),
        read,
    )))
}

/// The answer `client` was last given for record `id`, with the
/// generation it is kept in and what a write of it must expect (the key
/// holding the bytes just read: see [`Storage::commit_if`]).
pub fn find(
    store: &dyn Storage,
    deployment: &str,
    client: &str,
    id: &str,
) -> Result<Option<(u32, KeptAnswer, Expect)>, StoreError> {
    let (r, _) = ring(store, deployment)?;
    for generation in (r.kept_from..=r.generation).rev() {
        let key = answer_key(deployment, generation, client, id);
        if let Some(v) = store.get(Space::ServingAnswers, &key)? {
            let a = serde_json::from_slice(&v).map_err(|_| damaged("answer"))?;
            return Ok(Some((
                generation,
                a,
                Expect::new(Space::ServingAnswers, key, Some(v)),
            )));
        }
    }
    Ok(None)
}

/// The write that stores an answer again (with its true label).
pub fn update(
    batch: &mut WriteBatch,
    deployment: &str,
    generation: u32,
    a: &KeptAnswer,
) -> Result<(), StoreError> {
    let v = serde_json::to_vec(a).map_err(|_| damaged("answer"))?;
    batch.put(
        Space::ServingAnswers,
        answer_key(deployment, generation, &a.client, &a.id),
        v,
    );
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
        crate::store::delete_prefixed(store, batch, space, &capture_prefix(deployment))?;
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
    fn the_newest_answers_are_kept_per_client_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStorage::open(dir.path(), true).unwrap();
        let put = |answers: &[KeptAnswer]| {
            let mut b = WriteBatch::new();
            keep(&store, &mut b, "d", answers, 8).unwrap();
            store.commit(b).unwrap();
        };
        // keep 8: generations of 2, the current and 4 before it.
        for i in 0..20 {
            put(&[answer("app", &format!("r{i}"), "spam")]);
        }
        let kept = store.scan(Space::ServingAnswers, b"d\0g").count();
        assert!((8..=10).contains(&kept), "{kept}");
        assert!(find(&store, "d", "app", "r0").unwrap().is_none());
        assert!(find(&store, "d", "app", "r9").unwrap().is_none());
        let (_, a, _) = find(&store, "d", "app", "r19").unwrap().unwrap();
        assert_eq!(a.id, "r19");
        assert!(find(&store, "d", "app", "r12").unwrap().is_some());
        assert!(find(&store, "d", "other", "r19").unwrap().is_none());
        // The same id answered again is found at its new answer, and an
        // update lands where it was found.
        put(&[answer("app", "r12", "ham")]);
        let (g, mut a, _) = find(&store, "d", "app", "r12").unwrap().unwrap();
        assert_eq!(a.label, "ham");
        a.truth = Some("spam".into());
        let mut b = WriteBatch::new();
        update(&mut b, "d", g, &a).unwrap();
        store.commit(b).unwrap();
        assert_eq!(
            find(&store, "d", "app", "r12")
                .unwrap()
                .unwrap()
                .1
                .truth
                .as_deref(),
            Some("spam")
        );
        // A batch larger than the ring keeps about the ring's worth.
        let many: Vec<KeptAnswer> = (0..25)
            .map(|i| answer("app", &format!("x{i}"), "a"))
            .collect();
        put(&many);
        let kept = store.scan(Space::ServingAnswers, b"d\0g").count();
        assert!((8..=10).contains(&kept), "{kept}");
        assert!(find(&store, "d", "app", "x24").unwrap().is_some());
        assert!(find(&store, "d", "app", "x0").unwrap().is_none());
        let mut b = WriteBatch::new();
        delete_all(&store, &mut b, "d").unwrap();
        store.commit(b).unwrap();
        assert_eq!(store.scan(Space::ServingAnswers, b"d\0").count(), 0);
    }
}
