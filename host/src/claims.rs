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
