//! Counting in how many records each term key occurs, by sorting and
//! merging instead of hashing.
//!
//! A fit over 9,000 posts of 20 Newsgroups names about 2.7 million keys,
//! of which several hundred thousand are distinct. Counted in a hash map,
//! every key is a random access into a table of tens of megabytes that
//! keeps growing (and rehashing into freshly faulted pages): that was
//! three quarters of the fit stage's time. Here a worker appends each
//! record's keys to a buffer; when the buffer is full it is sorted and
//! merged into the sorted run of `(key, count)` pairs held so far — two
//! sequential passes. The buffer holds at least [`MIN_PENDING`] keys and at
//! least as many as the run, so the merges cost amortized constant time per
//! key, and memory stays within a small multiple of the distinct keys
//! (plus the buffer): the distinct-key cap is checked at every merge.
//!
//! The keys come from a plugin, so nothing here depends on their values
//! being spread out (no hashing for an adversary to collide) and every
//! count saturates instead of overflowing.

/// Keys a counter buffers, at least, before it sorts them into its run.
pub(crate) const MIN_PENDING: usize = 1 << 20;

/// More distinct keys than the cap allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooMany;

/// Counts of `u64` keys: a sorted run of distinct keys with their counts,
/// and a buffer of keys not yet merged into it.
#[derive(Debug, Default)]
pub(crate) struct KeyCounter {
    keys: Vec<u64>,
    counts: Vec<u32>,
    pending: Vec<u64>,
}

impl KeyCounter {
    /// Counts one occurrence of each of `keys`; fails when a merge finds
    /// more than `max_distinct` distinct keys.
    pub(crate) fn add(&mut self, keys: &[u64], max_distinct: usize) -> Result<(), TooMany> {
        self.pending.extend_from_slice(keys);
        if self.pending.len() >= MIN_PENDING.max(self.keys.len()) {
            self.flush(max_distinct)?;
        }
        Ok(())
    }

    /// Merges the buffer into the run.
    pub(crate) fn flush(&mut self, max_distinct: usize) -> Result<(), TooMany> {
        if self.pending.is_empty() {
            return self.check(max_distinct);
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_unstable();
        let (keys, counts) = merge(
            (&self.keys, &self.counts),
            runs(&pending).map(|(key, n)| (key, saturate(n))),
        );
        self.keys = keys;
        self.counts = counts;
        pending.clear();
        self.pending = pending;
        self.check(max_distinct)
    }

    /// Adds `other`'s counts to these (a sum, so the order in which
    /// counters are merged does not change the result).
    pub(crate) fn absorb(
        &mut self,
        mut other: KeyCounter,
        max_distinct: usize,
    ) -> Result<(), TooMany> {
        self.flush(max_distinct)?;
        other.flush(max_distinct)?;
        let (keys, counts) = merge(
            (&self.keys, &self.counts),
            other.keys.iter().copied().zip(other.counts.iter().copied()),
        );
        self.keys = keys;
        self.counts = counts;
        self.check(max_distinct)
    }

    /// The counts, sorted by key, after merging what is buffered.
    pub(crate) fn into_sorted(mut self, max_distinct: usize) -> Result<Vec<(u64, u32)>, TooMany> {
        self.flush(max_distinct)?;
        Ok(self.keys.into_iter().zip(self.counts).collect())
    }

    fn check(&self, max_distinct: usize) -> Result<(), TooMany> {
        if self.keys.len() > max_distinct {
            Err(TooMany)
        } else {
            Ok(())
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The runs of equal keys in sorted `keys`: each key once, with how many
/// times it occurs.
fn runs(keys: &[u64]) -> impl Iterator<Item = (u64, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let &key = keys.get(at)?;
        let start = at;
        while keys.get(at) == Some(&key) {
            at += 1;
        }
        Some((key, at - start))
    })
}

/// Merges a sorted run of distinct keys with their counts and a sorted
/// stream of distinct `(key, count)` pairs into one run, summing the
/// counts of keys in both.
fn merge(
    (keys, counts): (&[u64], &[u32]),
    other: impl Iterator<Item = (u64, u32)>,
) -> (Vec<u64>, Vec<u32>) {
    let mut out_keys = Vec::with_capacity(keys.len() + 1024);
    let mut out_counts = Vec::with_capacity(keys.len() + 1024);
    let mut at = 0;
    for (key, n) in other {
        while at < keys.len() && keys[at] < key {
            out_keys.push(keys[at]);
            out_counts.push(counts[at]);
            at += 1;
        }
        if at < keys.len() && keys[at] == key {
            out_keys.push(key);
            out_counts.push(counts[at].saturating_add(n));
            at += 1;
        } else {
            out_keys.push(key);
            out_counts.push(n);
        }
    }
    out_keys.extend_from_slice(&keys[at..]);
    out_counts.extend_from_slice(&counts[at..]);
    (out_keys, out_counts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A small deterministic generator (no dependency for a test).
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn counts_match_a_map_across_flushes_and_merges() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut expected: BTreeMap<u64, u32> = BTreeMap::new();
        let mut workers = [KeyCounter::default(), KeyCounter::default()];
        // Enough keys for several flushes per worker, from a small range so
        // that most keys repeat, and a few from the whole range.
        for record in 0..12_000 {
            let mut keys: Vec<u64> = (0..300)
                .map(|i| {
                    let r = next(&mut state);
                    if i % 50 == 0 { r } else { r % 200_000 }
                })
                .collect();
            keys.sort_unstable();
            keys.dedup();
            for &k in &keys {
                *expected.entry(k).or_insert(0) += 1;
            }
            workers[record % 2].add(&keys, usize::MAX).unwrap();
        }
        let [mut a, b] = workers;
        a.absorb(b, usize::MAX).unwrap();
        let got = a.into_sorted(usize::MAX).unwrap();
        let want: Vec<(u64, u32)> = expected.into_iter().collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the counts differ from a map's");
    }

    #[test]
    fn the_distinct_cap_holds_at_the_end_and_in_a_merge() {
        let mut c = KeyCounter::default();
        c.add(&(0..100).collect::<Vec<_>>(), 100).unwrap();
        c.add(&[5, 7], 100).unwrap();
        c.add(&[1_000], 100).unwrap();
        assert_eq!(c.into_sorted(100), Err(TooMany));

        let mut a = KeyCounter::default();
        a.add(&(0..60).collect::<Vec<_>>(), 100).unwrap();
        let mut b = KeyCounter::default();
        b.add(&(50..110).collect::<Vec<_>>(), 100).unwrap();
        assert_eq!(a.absorb(b, 100), Err(TooMany));

        // Exactly at the cap is allowed, and repeated keys count once.
        let mut c = KeyCounter::default();
        c.add(&(0..100).collect::<Vec<_>>(), 100).unwrap();
        c.add(&(0..100).collect::<Vec<_>>(), 100).unwrap();
        let sorted = c.into_sorted(100).unwrap();
        assert_eq!(sorted.len(), 100);
        assert!(sorted.iter().all(|&(_, n)| n == 2));
    }

    #[test]
    fn a_full_buffer_is_merged_and_checked_before_it_grows() {
        let mut c = KeyCounter::default();
        let keys: Vec<u64> = (0..MIN_PENDING as u64).collect();
        // One flush at MIN_PENDING keys: over a cap below that it fails
        // while adding, not only at the end.
        assert_eq!(c.add(&keys, 1_000), Err(TooMany));
        assert!(c.pending.is_empty());
    }
}
