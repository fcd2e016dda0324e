//! A small map that keeps the entries used last: the bound on what a
//! long-running process holds of things it can load again (compiled
//! components, models loaded for serving).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// At most `capacity` entries; inserting past that drops the entry used
/// least recently (a [`Lru::get`] counts as a use). Eviction scans the
/// entries, so it is meant for tens of entries, not thousands.
#[derive(Debug)]
pub struct Lru<K, V> {
    entries: HashMap<K, (V, u64)>,
    clock: u64,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> Lru<K, V> {
    /// An empty map that holds at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
            capacity: capacity.max(1),
        }
    }

    /// The value under `key` (any borrowed form of the key, as for
    /// `HashMap::get`: a `&str` for `String` keys), now the entry used last.
    pub fn get<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(v, used)| {
            *used = now;
            v.clone()
        })
    }

    /// Holds `value` under `key` (replacing what was there), dropping the
    /// entry used least recently if the map is full.
    pub fn insert(&mut self, key: K, value: V) {
        self.clock += 1;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, (value, self.clock));
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_used_least_recently_goes_first() {
        let mut m = Lru::new(3);
        for k in 0..3 {
            m.insert(k, k * 10);
        }
        // 0 is used again, so 1 is now the oldest.
        assert_eq!(m.get(&0), Some(0));
        m.insert(7, 70);
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(&1), None);
        assert_eq!(
            (m.get(&0), m.get(&2), m.get(&7)),
            (Some(0), Some(20), Some(70))
        );
        // Replacing a key held drops nothing.
        m.insert(2, 21);
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(&2), Some(21));
        assert!(!m.is_empty());
    }

    #[test]
    fn string_keys_are_looked_up_by_str() {
        let mut m = Lru::new(1);
        m.insert("m-1".to_string(), 1);
        assert_eq!(m.get("m-1"), Some(1));
        m.insert("m-2".to_string(), 2);
        assert_eq!((m.get("m-1"), m.get("m-2")), (None, Some(2)));
    }
}
