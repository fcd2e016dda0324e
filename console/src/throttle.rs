//! Login throttling that an anonymous client cannot grow or race.
//!
//! Failed logins are counted per key — a user name, a client address, a
//! known device — in a table whose size is capped: keys are user names that
//! passed the name rule (at most 64 bytes) or fixed-size digests, and when
//! the table is full the entry seen longest ago is evicted. An attempt is
//! counted *before* the password is checked, so a burst of parallel guesses
//! meets the same lockout as guesses one after another: once a key has used
//! its free attempts, each further attempt starts an exponential lockout
//! (2 s, 4 s, … 512 s) during which attempts are refused without being
//! evaluated. A success clears the key. Entries idle for longer than the
//! longest lockout are forgotten.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest lockout.
const MAX_LOCK: Duration = Duration::from_secs(512);

#[derive(Debug)]
struct Entry {
    count: u32,
    until: Option<Instant>,
    seen: Instant,
}

/// Counts of failed (and in-flight) logins per key, bounded.
#[derive(Debug)]
pub(crate) struct Throttle {
    entries: HashMap<String, Entry>,
    cap: usize,
}

impl Throttle {
    /// A table of at most `cap` keys.
    pub(crate) fn new(cap: usize) -> Self {
        Throttle {
            entries: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Keys tracked now.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The lockout left on `key`, if any, without counting an attempt.
    pub(crate) fn locked(&self, key: &str, now: Instant) -> Option<Duration> {
        self.entries
            .get(key)
            .and_then(|e| e.until)
            .filter(|u| *u > now)
            .map(|u| u - now)
    }

    /// Counts an attempt on `key` before it is evaluated: `Err` with the
    /// time left when the key is locked (the attempt is refused); else the
    /// attempt goes ahead, and if it is beyond the `free` ones it locks the
    /// key for the attempts that follow.
    pub(crate) fn attempt(&mut self, key: &str, free: u32, now: Instant) -> Result<(), Duration> {
        if let Some(left) = self.locked(key, now) {
            if let Some(e) = self.entries.get_mut(key) {
                e.seen = now;
            }
            return Err(left);
        }
        if !self.entries.contains_key(key) {
            self.make_room(now);
        }
        let e = self.entries.entry(key.to_string()).or_insert(Entry {
            count: 0,
            until: None,
            seen: now,
        });
        e.count = e.count.saturating_add(1);
        e.seen = now;
        if e.count > free {
            let exp = (e.count - free).min(9);
            e.until = Some(now + Duration::from_secs(1 << exp));
        }
        Ok(())
    }

    /// Takes back one counted attempt on `key` (it succeeded) without
    /// lifting a lock.
    pub(crate) fn refund(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            e.count = e.count.saturating_sub(1);
        }
    }

    /// A successful login on `key`: forget its failures.
    pub(crate) fn success(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Drops entries idle past the longest lockout; if the table is still
    /// full, the one seen longest ago.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.cap {
            return;
        }
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.seen) <= MAX_LOCK);
        while self.entries.len() >= self.cap {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_before_they_are_evaluated() {
        let mut t = Throttle::new(10);
        let now = Instant::now();
        // Three free attempts, a fourth that locks, then refusals.
        for _ in 0..4 {
            assert_eq!(t.attempt("ana", 3, now), Ok(()));
        }
        assert_eq!(t.attempt("ana", 3, now), Err(Duration::from_secs(2)));
        assert!(t.locked("ana", now + Duration::from_secs(3)).is_none());
        // The next failure after the lock doubles it.
        let later = now + Duration::from_secs(3);
        assert_eq!(t.attempt("ana", 3, later), Ok(()));
        assert_eq!(t.locked("ana", later), Some(Duration::from_secs(4)));
        t.success("ana");
        assert_eq!(t.attempt("ana", 3, later), Ok(()));
        assert!(t.locked("ana", later).is_none());
    }

    #[test]
    fn the_table_never_grows_past_its_cap() {
        let mut t = Throttle::new(100);
        let now = Instant::now();
        for i in 0..10_000 {
            let _ = t.attempt(&format!("user{i}"), 3, now + Duration::from_millis(i));
            assert!(t.len() <= 100);
        }
        // The newest keys are the ones kept.
        assert!(t.entries.contains_key("user9999"));
        assert!(!t.entries.contains_key("user0"));
    }
}
