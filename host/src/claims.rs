//! Claims: work that one open of the environment does and no other may do
//! at the same time (driving a job's rounds), marked in the store with the
//! holder id of the open that does it ([`Storage::holder`]).
//!
//! A claim is taken with [`Storage::commit_if`], so two processes cannot
//! both take it; a claim whose holder is no longer alive
//! ([`Storage::holder_alive`]: on PostgreSQL, its writer connection has
//! ended, so it can write nothing more) is taken over at once. Within one
//! process the caller keeps its own set as well, because a claim whose
//! release failed (the store was unreachable) still names this process's
//! holder.

use std::sync::Arc;

use crate::store::{Expect, Space, Storage, StoreError, WriteBatch};

/// Why a claim was not taken.
#[derive(Debug)]
pub enum ClaimError {
    /// A live holder (another process's open) has it.
    Held,
    /// The store failed.
    Store(StoreError),
}

impl From<StoreError> for ClaimError {
    fn from(e: StoreError) -> Self {
        ClaimError::Store(e)
    }
}

/// A claim this open holds; released (if it is still this open's) when
/// dropped.
#[derive(Debug)]
pub struct Claim {
    store: Arc<dyn Storage>,
    key: Vec<u8>,
}

fn claim_key(kind: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(kind.len() + 1 + name.len());
    key.extend_from_slice(kind.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

fn decode(value: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(value).ok().map(u64::from_be_bytes)
}

/// Takes the claim `kind`/`name` for this open, unless a live holder other
/// than this open has it. A claim of this open's own holder is taken again
/// (the caller keeps what this process is doing; see the module docs).
pub fn take(store: &Arc<dyn Storage>, kind: &str, name: &str) -> Result<Claim, ClaimError> {
    let key = claim_key(kind, name);
    let me = store.holder();
    crate::store::update(store.as_ref(), &[(Space::Claims, &key)], |stored| {
        if let Some(value) = &stored[0] {
            match decode(value) {
                Some(h) if h != me && store.holder_alive(h)? => return Err(ClaimError::Held),
                // Its holder has ended (or the value is not a holder id):
                // a dead claim is taken over.
                _ => {}
            }
        }
        let mut batch = WriteBatch::new();
        batch.put(Space::Claims, key.clone(), me.to_be_bytes().to_vec());
        Ok((batch, ()))
    })?;
    Ok(Claim {
        store: Arc::clone(store),
        key,
    })
}

/// The holder id a claim names, if it is held by a live holder.
pub fn holder_of(store: &dyn Storage, kind: &str, name: &str) -> Result<Option<u64>, StoreError> {
    match store
        .get(Space::Claims, &claim_key(kind, name))?
        .as_deref()
        .and_then(decode)
    {
        Some(h) if store.holder_alive(h)? => Ok(Some(h)),
        _ => Ok(None),
    }
}

/// The claims of `kind` whose holder is no longer alive, as (name, holder
/// id): work a process was doing when it ended (killed, crashed, its
/// machine lost) without releasing it. Values that are not a holder id
/// are left out (they are taken like dead claims by [`take`], but name
/// no process).
pub fn dead(store: &dyn Storage, kind: &str) -> Result<Vec<(String, u64)>, StoreError> {
    let prefix = claim_key(kind, "");
    let mut out = Vec::new();
    for item in store.scan(Space::Claims, &prefix) {
        let (key, value) = item?;
        let Some(holder) = decode(&value) else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(&key[prefix.len()..]) else {
            continue;
        };
        if !store.holder_alive(holder)? {
            out.push((name.to_string(), holder));
        }
    }
    Ok(out)
}

/// Takes over the claim `kind`/`name` only if it still names `dead`, a
/// holder [`dead`] found ended: `None` when it changed meanwhile (another
/// process took it over first, or the work ended and released it), so
/// that a claim is never taken over twice and released work is not
/// started again.
pub fn take_over(
    store: &Arc<dyn Storage>,
    kind: &str,
    name: &str,
    dead: u64,
) -> Result<Option<Claim>, StoreError> {
    let key = claim_key(kind, name);
    if store.holder_alive(dead)? {
        return Ok(None);
    }
    let mut batch = WriteBatch::new();
    batch.put(
        Space::Claims,
        key.clone(),
        store.holder().to_be_bytes().to_vec(),
    );
    let expect = [Expect::new(
        Space::Claims,
        key.clone(),
        Some(dead.to_be_bytes().to_vec()),
    )];
    match store.commit_if(&expect, batch) {
        Ok(()) => Ok(Some(Claim {
            store: Arc::clone(store),
            key,
        })),
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Only if it is still ours; if the store cannot be reached the claim
        // stays, naming this open: other processes wait for it to end, and
        // this process takes it again (see the module docs).
        let mine = self.store.holder().to_be_bytes().to_vec();
        let mut batch = WriteBatch::new();
        batch.delete(Space::Claims, self.key.clone());
        let _ = self.store.commit_if(
            &[Expect::new(Space::Claims, self.key.clone(), Some(mine))],
            batch,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStorage;

    #[test]
    fn a_dead_claim_is_found_and_taken_over_once() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Storage> = Arc::new(SledStorage::open(&dir.path().join("s"), true)?);
        // An ended open's claim (on sled any holder but this open's is
        // ended), this open's own claim, and another kind's.
        let dead = store.holder().wrapping_add(1);
        let mut b = WriteBatch::new();
        b.put(
            Space::Claims,
            claim_key("job", "j-1"),
            dead.to_be_bytes().to_vec(),
        );
        b.put(
            Space::Claims,
            claim_key("capture", "d"),
            dead.to_be_bytes().to_vec(),
        );
        store.commit(b)?;
        let mine = take(&store, "job", "j-2").expect("a free claim is taken");
        assert_eq!(dead_claims(&store), vec![("j-1".to_string(), dead)]);

        // Taken over once: the second attempt finds it changed.
        let first = take_over(&store, "job", "j-1", dead)?;
        assert!(first.is_some());
        assert!(take_over(&store, "job", "j-1", dead)?.is_none());
        assert!(dead_claims(&store).is_empty());
        // Released work is not taken over again.
        drop(first);
        assert!(
            store
                .get(Space::Claims, &claim_key("job", "j-1"))?
                .is_none()
        );
        assert!(take_over(&store, "job", "j-1", dead)?.is_none());
        // A live holder's claim is not dead and not taken over.
        assert!(take_over(&store, "job", "j-2", store.holder())?.is_none());
        drop(mine);
        Ok(())
    }

    fn dead_claims(store: &Arc<dyn Storage>) -> Vec<(String, u64)> {
        dead(store.as_ref(), "job").unwrap_or_default()
    }
}
