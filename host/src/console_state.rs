//! The web console's own state — login sessions, known devices, the login
//! throttle's counts and background tasks — kept in the store, so that
//! every `cloister serve` process over one environment acts as one console:
//! a session started on one replica is valid on the others, a logout on
//! one ends it everywhere, failed logins are counted across replicas (a
//! guesser gets no more tries by spreading them), and a task started on
//! one replica is visible from any.
//!
//! This is housekeeping of the console, not an operation of a person: it
//! is not audited (the logins, refusals and operations it serves are), and
//! nothing here is ever shown to anyone but the session's or the task's own
//! user. Session and device ids are stored only as SHA-256 digests of the
//! cookie values. Times are milliseconds since the Unix epoch, so replicas
//! on different machines share them (their clocks are assumed to agree to
//! within a second or so; a skew only moves an expiry or a lockout by as
//! much).
//!
//! Every read-modify-write goes through [`crate::store::update`] (or its
//! staged form) over the bytes read, so two replicas cannot lose each
//! other's counts, and a renewal cannot bring back a session that a logout
//! on another replica ended.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{self, Expect, Space, Storage, StoreError, WriteBatch};

/// The longest login lockout; a throttle entry idle for longer is
/// forgotten.
pub const MAX_LOCK: Duration = Duration::from_secs(512);

/// Progress lines a task keeps (the oldest are dropped).
const TASK_LINES: usize = 500;

/// Finished tasks are forgotten this long after they started.
const TASK_KEEP_MS: u64 = 7 * 24 * 3600 * 1000;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn damaged(what: &str) -> StoreError {
    StoreError::Corrupted(format!("a console {what} record does not decode"))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|_| damaged(what))
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|_| damaged(what))
}

/// Failed (and in-flight) logins on one throttle key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ThrottleEntry {
    count: u32,
    until_ms: Option<u64>,
    seen_ms: u64,
}

/// A login session, stored under the digest of its cookie value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Whose session it is.
    pub user: String,
    /// The session's CSRF token.
    pub csrf: String,
    /// When it ends unless used (renewed by use).
    pub expires_ms: u64,
    /// When it began (it ends `session_max` after this, however used).
    pub created_ms: u64,
}

/// A device that logged in successfully, under the digest of its cookie.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Device {
    user: String,
    last_ms: u64,
}

/// A long operation started from the console, visible to its owner from
/// any replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task id (`t-` and 16 hex digits).
    pub id: String,
    /// What it does: `train` or `job`.
    pub kind: String,
    /// Who started it; nobody else sees it.
    pub owner: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Progress lines (host-written; never plugin text), the latest 500.
    pub lines: Vec<String>,
    /// Where the result is: a model or job id.
    pub result: Option<String>,
    /// Why it failed, as the console words errors.
    pub error: Option<String>,
    /// When it started.
    pub started_ms: u64,
}

/// A task as stored: with the holder id of the process running it, so
/// that a running task whose process has ended is reported failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredTask {
    #[serde(flatten)]
    task: Task,
    holder: u64,
}

/// The console's state in one environment's store; see the module docs.
#[derive(Clone, Copy)]
pub struct ConsoleState<'a> {
    store: &'a dyn Storage,
}

impl std::fmt::Debug for ConsoleState<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleState").finish_non_exhaustive()
    }
}

/// A stored key and its value.
type Entry = (Vec<u8>, Vec<u8>);

/// The entries of `space`, for the sweeps below.
fn entries(store: &dyn Storage, space: Space) -> Result<Vec<Entry>, StoreError> {
    store.scan(space, b"").collect()
}

/// Deletes `key` if it still holds `value` (another replica's newer write
/// is kept).
fn delete_if_unchanged(
    store: &dyn Storage,
    space: Space,
    key: Vec<u8>,
    value: Vec<u8>,
) -> Result<(), StoreError> {
    let mut b = WriteBatch::new();
    b.delete(space, key.clone());
    match store.stage_if(&[Expect::new(space, key, Some(value))], b) {
        Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Keeps `space` under `cap` entries before a new key is added: entries
/// `stale` says are dead go, then the ones `age` says are oldest.
fn make_room<T: for<'de> Deserialize<'de>>(
    store: &dyn Storage,
    space: Space,
    cap: usize,
    stale: impl Fn(&T) -> bool,
    age: impl Fn(&T) -> u64,
) -> Result<(), StoreError> {
    let all = entries(store, space)?;
    if all.len() < cap.max(1) {
        return Ok(());
    }
    let mut live = Vec::with_capacity(all.len());
    for (k, v) in all {
        // An entry that does not decode is dropped like a stale one: it
        // holds nothing a login depends on.
        match serde_json::from_slice::<T>(&v) {
            Ok(e) if !stale(&e) => live.push((age(&e), k, v)),
            _ => delete_if_unchanged(store, space, k, v)?,
        }
    }
    if live.len() >= cap.max(1) {
        live.sort_by_key(|(t, _, _)| *t);
        let excess = live.len() + 1 - cap.max(1);
        for (_, k, v) in live.into_iter().take(excess) {
            delete_if_unchanged(store, space, k, v)?;
        }
    }
    Ok(())
}

impl<'a> ConsoleState<'a> {
    /// The console's state in `store`.
    pub fn new(store: &'a dyn Storage) -> Self {
        Self { store }
    }

    // --- the login throttle -------------------------------------------

    /// The lockout left on `key` at `now`, if any.
    pub fn locked(&self, key: &str, now: u64) -> Result<Option<Duration>, StoreError> {
        Ok(match self.store.get(Space::Throttle, key.as_bytes())? {
            Some(v) => decode::<ThrottleEntry>("throttle", &v)?
                .until_ms
                .filter(|u| *u > now)
                .map(|u| Duration::from_millis(u - now)),
            None => None,
        })
    }

    /// Counts a login attempt on `key` before it is evaluated, in every
    /// replica's count: `Ok(Err(left))` when the key is locked (the
    /// attempt is refused and not evaluated); else the attempt goes ahead,
    /// and if it is beyond the `free` ones it locks the key for 2, 4, …
    /// 512 s. A new key first makes room so that at most `cap` are kept.
    pub fn attempt(
        &self,
        key: &str,
        free: u32,
        now: u64,
        cap: usize,
    ) -> Result<Result<(), Duration>, StoreError> {
        if self.store.get(Space::Throttle, key.as_bytes())?.is_none() {
            make_room::<ThrottleEntry>(
                self.store,
                Space::Throttle,
                cap,
                |e| now.saturating_sub(e.seen_ms) > MAX_LOCK.as_millis() as u64,
                |e| e.seen_ms,
            )?;
        }
        let k = key.as_bytes();
        store::stage_update(self.store, &[(Space::Throttle, k)], |stored| {
            let mut e = match &stored[0] {
                Some(v) => decode::<ThrottleEntry>("throttle", v)?,
                None => ThrottleEntry {
                    count: 0,
                    until_ms: None,
                    seen_ms: now,
                },
            };
            e.seen_ms = now;
            let out = match e.until_ms.filter(|u| *u > now) {
                Some(u) => Err(Duration::from_millis(u - now)),
                None => {
                    e.count = e.count.saturating_add(1);
                    if e.count > free {
                        let exp = (e.count - free).min(9);
                        e.until_ms = Some(now + (1u64 << exp) * 1000);
                    }
                    Ok(())
                }
            };
            let mut b = WriteBatch::new();
            b.put(Space::Throttle, k.to_vec(), encode("throttle", &e)?);
            Ok::<_, StoreError>((b, out))
        })
    }

    /// Takes back one counted attempt on `key` (it succeeded) without
    /// lifting a lock.
    pub fn refund(&self, key: &str) -> Result<(), StoreError> {
        let k = key.as_bytes();
        store::stage_update(self.store, &[(Space::Throttle, k)], |stored| {
            let mut b = WriteBatch::new();
            if let Some(v) = &stored[0] {
                let mut e = decode::<ThrottleEntry>("throttle", v)?;
                e.count = e.count.saturating_sub(1);
                b.put(Space::Throttle, k.to_vec(), encode("throttle", &e)?);
            }
            Ok::<_, StoreError>((b, ()))
        })
    }

    /// A successful login on `key`: its failures are forgotten.
    pub fn forget(&self, key: &str) -> Result<(), StoreError> {
        let mut b = WriteBatch::new();
        b.delete(Space::Throttle, key.as_bytes().to_vec());
        self.store.stage(b)
    }

    /// Keys the throttle holds now.
    pub fn throttle_len(&self) -> Result<usize, StoreError> {
        Ok(entries(self.store, Space::Throttle)?.len())
    }

    // --- sessions -----------------------------------------------------

    /// Stores a new session under `key` (the digest of its cookie value).
    /// Expired sessions go; with `one_per_user`, so do the user's others,
    /// on every replica.
    pub fn start_session(
        &self,
        key: &str,
        session: &Session,
        one_per_user: bool,
        max: Duration,
    ) -> Result<(), StoreError> {
        let now = session.created_ms;
        let max = max.as_millis() as u64;
        let mut b = WriteBatch::new();
        for (k, v) in entries(self.store, Space::Sessions)? {
            let end = match serde_json::from_slice::<Session>(&v) {
                Ok(s) => {
                    s.expires_ms <= now
                        || s.created_ms.saturating_add(max) <= now
                        || (one_per_user && s.user == session.user)
                }
                Err(_) => true,
            };
            if end {
                b.delete(Space::Sessions, k);
            }
        }
        b.put(
            Space::Sessions,
            key.as_bytes().to_vec(),
            encode("session", session)?,
        );
        self.store.commit(b)
    }

    /// The live session under `key` at `now`, renewed to `now + ttl` (the
    /// renewal is written only once it would move the expiry by a tenth of
    /// `ttl`, at most a minute, sparing a write per request); an expired
    /// one is removed and `None` returned.
    pub fn session(
        &self,
        key: &str,
        now: u64,
        ttl: Duration,
        max: Duration,
    ) -> Result<Option<Session>, StoreError> {
        let k = key.as_bytes();
        let Some(v) = self.store.get(Space::Sessions, k)? else {
            return Ok(None);
        };
        let Ok(mut s) = serde_json::from_slice::<Session>(&v) else {
            delete_if_unchanged(self.store, Space::Sessions, k.to_vec(), v)?;
            return Ok(None);
        };
        if s.expires_ms <= now || s.created_ms.saturating_add(max.as_millis() as u64) <= now {
            delete_if_unchanged(self.store, Space::Sessions, k.to_vec(), v)?;
            return Ok(None);
        }
        let ttl = ttl.as_millis() as u64;
        let slack = (ttl / 10).min(60_000);
        if now + ttl > s.expires_ms.saturating_add(slack) {
            s.expires_ms = now + ttl;
            let mut b = WriteBatch::new();
            b.put(Space::Sessions, k.to_vec(), encode("session", &s)?);
            // Only over the bytes read: a logout on another replica since
            // then is not undone. Either way this request was made while
            // the session was live.
            match self
                .store
                .stage_if(&[Expect::new(Space::Sessions, k.to_vec(), Some(v))], b)
            {
                Ok(()) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(s))
    }

    /// Ends the session under `key` (durably: a logout is not undone by a
    /// crash).
    pub fn end_session(&self, key: &str) -> Result<(), StoreError> {
        let mut b = WriteBatch::new();
        b.delete(Space::Sessions, key.as_bytes().to_vec());
        self.store.commit(b)
    }

    // --- devices ------------------------------------------------------

    /// The user a known device (by the digest of its cookie) logged in as.
    pub fn device_owner(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(match self.store.get(Space::Devices, key.as_bytes())? {
            Some(v) => Some(decode::<Device>("device", &v)?.user),
            None => None,
        })
    }

    /// Remembers a device's successful login by `user`, keeping at most
    /// `cap` devices (the one seen longest ago goes first).
    pub fn remember_device(
        &self,
        key: &str,
        user: &str,
        now: u64,
        cap: usize,
    ) -> Result<(), StoreError> {
        if self.store.get(Space::Devices, key.as_bytes())?.is_none() {
            make_room::<Device>(self.store, Space::Devices, cap, |_| false, |d| d.last_ms)?;
        }
        let mut b = WriteBatch::new();
        b.put(
            Space::Devices,
            key.as_bytes().to_vec(),
            encode(
                "device",
                &Device {
                    user: user.to_string(),
                    last_ms: now,
                },
            )?,
        );
        self.store.stage(b)
    }

    /// Devices known now.
    pub fn devices_len(&self) -> Result<usize, StoreError> {
        Ok(entries(self.store, Space::Devices)?.len())
    }

    // --- background tasks ---------------------------------------------

    /// Records a new running task of `owner`, run by this process; tasks
    /// finished more than a week ago are forgotten.
    pub fn start_task(
        &self,
        id: &str,
        kind: &str,
        owner: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut b = WriteBatch::new();
        for (k, v) in entries(self.store, Space::Tasks)? {
            if let Ok(StoredTask { task: t, .. }) = serde_json::from_slice::<StoredTask>(&v)
                && t.state != "running"
                && now.saturating_sub(t.started_ms) > TASK_KEEP_MS
            {
                b.delete(Space::Tasks, k);
            }
        }
        let t = StoredTask {
            task: Task {
                id: id.to_string(),
                kind: kind.to_string(),
                owner: owner.to_string(),
                state: "running".into(),
                lines: Vec::new(),
                result: None,
                error: None,
                started_ms: now,
            },
            holder: self.store.holder(),
        };
        b.put(Space::Tasks, id.as_bytes().to_vec(), encode("task", &t)?);
        self.store.commit(b)
    }

    /// Changes a task (a progress line: staged; the end: committed).
    fn change_task(
        &self,
        id: &str,
        durable: bool,
        f: impl Fn(&mut Task),
    ) -> Result<(), StoreError> {
        let k = id.as_bytes();
        let build = |stored: &[Option<Vec<u8>>]| {
            let mut b = WriteBatch::new();
            if let Some(v) = &stored[0] {
                let mut t = decode::<StoredTask>("task", v)?;
                f(&mut t.task);
                b.put(Space::Tasks, k.to_vec(), encode("task", &t)?);
            }
            Ok::<_, StoreError>((b, ()))
        };
        if durable {
            store::update(self.store, &[(Space::Tasks, k)], build)
        } else {
            store::stage_update(self.store, &[(Space::Tasks, k)], build)
        }
    }

    /// Adds a progress line to a task.
    pub fn task_line(&self, id: &str, line: String) -> Result<(), StoreError> {
        self.change_task(id, false, |t| {
            if t.lines.len() >= TASK_LINES {
                t.lines.remove(0);
            }
            t.lines.push(line.clone());
        })
    }

    /// Ends a task: `Ok(result)` done, `Err(error)` failed.
    pub fn finish_task(&self, id: &str, out: Result<String, String>) -> Result<(), StoreError> {
        self.change_task(id, true, |t| match &out {
            Ok(r) => {
                t.state = "done".into();
                t.result = Some(r.clone());
            }
            Err(e) => {
                t.state = "failed".into();
                t.error = Some(e.clone());
            }
        })
    }

    /// A task as its owner sees it; one still marked running whose process
    /// has ended is shown failed.
    pub fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let Some(v) = self.store.get(Space::Tasks, id.as_bytes())? else {
            return Ok(None);
        };
        let StoredTask { mut task, holder } = decode::<StoredTask>("task", &v)?;
        if task.state == "running" && !self.store.holder_alive(holder)? {
            task.state = "failed".into();
            task.error =
                Some("the console process running this task ended before it finished".into());
        }
        Ok(Some(task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStorage;

    fn store() -> (tempfile::TempDir, SledStorage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStorage::open(&dir.path().join("store"), true).expect("store");
        (dir, s)
    }

    #[test]
    fn attempts_are_counted_before_they_are_evaluated() -> Result<(), StoreError> {
        let (_dir, s) = store();
        let st = ConsoleState::new(&s);
        let now = 1_000_000;
        // Three free attempts, a fourth that locks, then refusals.
        for _ in 0..4 {
            assert_eq!(st.attempt("ana", 3, now, 10)?, Ok(()));
        }
        assert_eq!(st.attempt("ana", 3, now, 10)?, Err(Duration::from_secs(2)));
        assert!(st.locked("ana", now + 3000)?.is_none());
        // The next failure after the lock doubles it.
        let later = now + 3000;
        assert_eq!(st.attempt("ana", 3, later, 10)?, Ok(()));
        assert_eq!(st.locked("ana", later)?, Some(Duration::from_secs(4)));
        // A refund takes one attempt back but lifts no lock.
        st.refund("ana")?;
        assert_eq!(st.locked("ana", later)?, Some(Duration::from_secs(4)));
        st.forget("ana")?;
        assert_eq!(st.attempt("ana", 3, later, 10)?, Ok(()));
        assert!(st.locked("ana", later)?.is_none());
        Ok(())
    }

    #[test]
    fn the_throttle_and_device_tables_never_grow_past_their_cap() -> Result<(), StoreError> {
        let (_dir, s) = store();
        let st = ConsoleState::new(&s);
        let now = 1_000_000;
        for i in 0..600u64 {
            let _ = st.attempt(&format!("user{i}"), 3, now + i, 100)?;
            st.remember_device(&format!("d{i}"), "ana", now + i, 50)?;
            assert!(st.throttle_len()? <= 100);
            assert!(st.devices_len()? <= 50);
        }
        // The newest keys are the ones kept.
        assert!(st.locked("user599", now)?.is_none());
        assert!(s.get(Space::Throttle, b"user599")?.is_some());
        assert!(s.get(Space::Throttle, b"user0")?.is_none());
        assert_eq!(st.device_owner("d599")?.as_deref(), Some("ana"));
        assert_eq!(st.device_owner("d0")?, None);
        Ok(())
    }

    #[test]
    fn sessions_expire_renew_and_end_and_one_login_ends_the_users_others() -> Result<(), StoreError>
    {
        let (_dir, s) = store();
        let st = ConsoleState::new(&s);
        let (ttl, max) = (Duration::from_secs(100), Duration::from_secs(300));
        let at = |created_ms: u64, user: &str| Session {
            user: user.into(),
            csrf: "c".into(),
            expires_ms: created_ms + 100_000,
            created_ms,
        };
        st.start_session("k1", &at(0, "ana"), true, max)?;
        st.start_session("k2", &at(0, "rui"), true, max)?;
        // Used within its idle time, it is renewed (once the renewal moves
        // the expiry by more than the slack).
        assert!(st.session("k1", 50_000, ttl, max)?.is_some());
        assert_eq!(
            st.session("k1", 90_000, ttl, max)?.map(|s| s.expires_ms),
            Some(190_000)
        );
        // Idle past its expiry, it is gone, and stays gone.
        assert!(st.session("k2", 100_000, ttl, max)?.is_none());
        assert!(s.get(Space::Sessions, b"k2")?.is_none());
        // However used, it ends at the absolute limit.
        for t in (180_000..300_000).step_by(60_000) {
            assert!(st.session("k1", t, ttl, max)?.is_some());
        }
        assert!(st.session("k1", 300_000, ttl, max)?.is_none());
        // A new login of the same user ends the older session.
        st.start_session("k3", &at(400_000, "ana"), true, max)?;
        st.start_session("k4", &at(400_000, "ana"), true, max)?;
        assert!(st.session("k3", 400_001, ttl, max)?.is_none());
        assert!(st.session("k4", 400_001, ttl, max)?.is_some());
        st.end_session("k4")?;
        assert!(st.session("k4", 400_002, ttl, max)?.is_none());
        Ok(())
    }

    #[test]
    fn a_renewal_does_not_bring_back_a_session_ended_meanwhile() -> Result<(), StoreError> {
        let (_dir, s) = store();
        let st = ConsoleState::new(&s);
        let max = Duration::from_secs(300);
        st.start_session(
            "k",
            &Session {
                user: "ana".into(),
                csrf: "c".into(),
                expires_ms: 100_000,
                created_ms: 0,
            },
            true,
            max,
        )?;
        // What a renewal on another replica would write, over bytes that a
        // logout has removed since.
        let read = s.get(Space::Sessions, b"k")?;
        st.end_session("k")?;
        let mut b = WriteBatch::new();
        b.put(Space::Sessions, b"k".to_vec(), b"{}".to_vec());
        assert!(matches!(
            s.stage_if(&[Expect::new(Space::Sessions, b"k".to_vec(), read)], b),
            Err(StoreError::Conflict { .. })
        ));
        assert!(st.session("k", 1, Duration::from_secs(100), max)?.is_none());
        Ok(())
    }

    #[test]
    fn tasks_keep_their_lines_and_end_and_a_dead_runners_task_reads_failed()
    -> Result<(), StoreError> {
        let (_dir, s) = store();
        let st = ConsoleState::new(&s);
        st.start_task("t-1", "train", "ana", 10)?;
        for i in 0..(TASK_LINES + 5) {
            st.task_line("t-1", format!("line {i}"))?;
        }
        let t = st.task("t-1")?.expect("stored");
        assert_eq!((t.state.as_str(), t.lines.len()), ("running", TASK_LINES));
        assert_eq!(t.lines[0], "line 5");
        st.finish_task("t-1", Ok("m-1".into()))?;
        let t = st.task("t-1")?.expect("stored");
        assert_eq!(
            (t.state.as_str(), t.result.as_deref()),
            ("done", Some("m-1"))
        );
        // A task marked running by an open that has ended (on sled: any
        // holder but this open's).
        let mut dead = StoredTask {
            task: st.task("t-1")?.expect("stored"),
            holder: s.holder().wrapping_add(1),
        };
        dead.task.state = "running".into();
        let mut b = WriteBatch::new();
        b.put(Space::Tasks, b"t-2".to_vec(), encode("task", &dead)?);
        s.commit(b)?;
        let t = st.task("t-2")?.expect("stored");
        assert_eq!(t.state, "failed");
        assert!(t.error.is_some_and(|e| e.contains("ended")));
        // Finished tasks older than a week are forgotten at the next start.
        st.start_task("t-3", "job", "ana", 10 + TASK_KEEP_MS + 1)?;
        assert!(st.task("t-1")?.is_none());
        assert!(st.task("t-2")?.is_some(), "a running one is kept");
        Ok(())
    }
}
