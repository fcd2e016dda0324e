//! The PostgreSQL store (issue 21), on a real server: each test starts a
//! throwaway PostgreSQL from the distribution's binaries (`initdb` +
//! `pg_ctl`, listening only on a Unix socket in a temporary directory) and
//! stops it when it ends. `initdb` refuses to run as root, so when the
//! tests run as root the server runs as the `postgres` (or `nobody`) user.
//!
//! Without the binaries the tests report that they skipped, unless
//! `CLOISTER_REQUIRE_POSTGRES` is set (`.ci/run` sets it and installs
//! PostgreSQL 15 where it is missing), in which case they fail.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cloister_host::audit::{Checkpoint, Verdict};
use cloister_host::service::{Cloister, ServiceError};
use cloister_host::store::{
    Expect, PgStorage, PgUrl, SledStorage, Space, Storage, StoreError, WriteBatch,
};

use crate::closed_env::{Env, env_with};

/// A running throwaway server. Dropping it stops the server and removes
/// its files.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    /// The TCP port on 127.0.0.1, when the server listens there too.
    tcp: Option<u16>,
    /// Whether the server offers TLS (a certificate for `localhost` from
    /// a test CA in `ca.pem`).
    tls: bool,
}

/// The directory with `initdb` and `pg_ctl`: on PATH, or Debian's
/// `/usr/lib/postgresql/N/bin` (newest N).
fn server_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("pg_ctl").is_file() {
                return Some(d);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// (uid, gid) of a user from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn am_root() -> bool {
    // The effective uid, as `id -u` prints it (no libc in this crate).
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Starts a server, or `None` (having said so) when PostgreSQL is not
    /// installed and not required.
    pub fn start() -> Option<Self> {
        Self::start_with(false, false)
    }

    /// A server that also listens on 127.0.0.1 (a free port), offering TLS
    /// or not.
    pub fn start_tcp(tls: bool) -> Option<Self> {
        Self::start_with(true, tls)
    }

    fn start_with(tcp: bool, tls: bool) -> Option<Self> {
        let Some(bin) = server_bin() else {
            assert!(
                std::env::var_os("CLOISTER_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL server binaries are required (apt-get install postgresql-15)"
            );
            eprintln!("SKIPPED: no PostgreSQL server binaries (apt-get install postgresql-15)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let owner = if am_root() {
            let ids = user_ids("postgres")
                .or_else(|| user_ids("nobody"))
                .expect("an unprivileged user (postgres or nobody) to run the server as");
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).unwrap();
            Some(ids)
        } else {
            None
        };
        let tcp = tcp.then(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let me = Self {
            dir,
            bin,
            owner,
            tcp,
            tls,
        };
        let out = me
            .command("initdb")
            .args([
                "-D",
                &me.data(),
                "-U",
                "cloister",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            // 1 MiB WAL segments: a throwaway server needs a few MiB of
            // WAL, not the 16 MiB segments of a real one.
            .args(["--no-sync", "--no-instructions", "--wal-segsize=1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tls {
            me.make_certificates();
        }
        std::fs::create_dir_all(me.socket_dir()).unwrap();
        if let Some((u, g)) = me.owner {
            std::os::unix::fs::chown(me.socket_dir(), Some(u), Some(g)).unwrap();
        }
        me.start_again();
        Some(me)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.stdin(Stdio::null());
        if let Some((u, g)) = self.owner {
            c.uid(u).gid(g).env("HOME", self.dir.path());
        }
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// A test CA (`ca.pem`) and a server certificate for `localhost` only
    /// (not for 127.0.0.1), in the data directory.
    fn make_certificates(&self) {
        let d = self.dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=cloister test CA",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        for f in ["server.pem", "server.key"] {
            let to = d.join("data").join(f);
            std::fs::copy(d.join(f), &to).unwrap();
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if let Some((u, g)) = self.owner {
                std::os::unix::fs::chown(&to, Some(u), Some(g)).unwrap();
            }
        }
    }

    /// The test CA's certificate (PEM).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.pem")).unwrap()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.tcp.expect("a server started with start_tcp")
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let mut opts = format!(
            "-k {} -c max_connections=200 -c min_wal_size=4MB -c max_wal_size=32MB",
            self.socket_dir().display()
        );
        match self.tcp {
            Some(port) => opts.push_str(&format!(" -c listen_addresses=127.0.0.1 -p {port}")),
            None => opts.push_str(" -c listen_addresses="),
        }
        if self.tls {
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key");
        }
        let log = self.dir.path().join("server.log").display().to_string();
        let out = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-l", &log, "-o", &opts, "-w", "start"])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server at once, as a crash would (no checkpoint; the WAL
    /// is replayed at the next start).
    pub fn crash(&self) {
        let out = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new empty database; returns its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql:///{db}?host={}&user=cloister{}",
            self.socket_dir().display(),
            self.tcp.map(|p| format!("&port={p}")).unwrap_or_default()
        )
    }

    /// Runs SQL with psql; returns what it printed (unaligned, tuples
    /// only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", &self.socket_dir().display().to_string()])
            .args(["-p", &self.tcp.unwrap_or(5432).to_string()])
            .args(["-U", "cloister", "-d", db, "-v", "ON_ERROR_STOP=1", "-At"])
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql `{sql}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------ contract --

/// The storage contract, as every module relies on it.
/// Two processes serving one deployment write its per-minute counters and
/// its kept answers at the same time (threads here, each writing straight
/// to the store as a process's metrics writer does): every request is
/// counted once, and the ring of kept answers stays within its documented
/// bound with the newest answers findable.
fn serving_writes_at_once(s: &dyn Storage) {
    use cloister_host::feedback::{self, GENERATIONS, KeptAnswer};
    use cloister_host::serving::{self, Counters, Observation};
    let keep = 40u64;
    // The two processes take their rounds together (both write each round
    // at once, then wait for each other), so that when both are done each
    // one's last answers are among the newest six, which the ring keeps.
    let together = std::sync::Barrier::new(2);
    let together = &together;
    std::thread::scope(|scope| {
        for process in 0..2 {
            scope.spawn(move || {
                for round in 0..30 {
                    together.wait();
                    let mut c = Counters::default();
                    c.add(&Observation {
                        error: false,
                        latency_us: 900,
                        classes: vec!["spam".into(), "ham".into()],
                        confidences: vec![0.9, 0.8],
                        agreement: None,
                    });
                    serving::add(s, "mail", "champion", "m-1", 7, &c).unwrap();
                    let answers: Vec<KeptAnswer> = (0..3)
                        .map(|i| KeptAnswer {
                            client: format!("p{process}"),
                            id: format!("r{round}-{i}"),
                            time_ms: 0,
                            role: "champion".into(),
                            model: "m-1".into(),
                            label: "spam".into(),
                            champion: None,
                            shadow: None,
                            captured: None,
                            truth: None,
                        })
                        .collect();
                    cloister_host::store::stage_update_reading(s, || {
                        let mut b = WriteBatch::new();
                        let expect: Vec<Expect> =
                            feedback::keep(s, &mut b, "mail", &answers, keep)?
                                .into_iter()
                                .collect();
                        Ok::<_, StoreError>((expect, b, ()))
                    })
                    .unwrap();
                }
            });
        }
    });
    s.sync().unwrap();
    let total = serving::window(s, "mail", "champion", "m-1", 0).unwrap();
    assert_eq!(total.requests, 60, "a request was counted twice or lost");
    assert_eq!(total.records, 120);
    let stored = s.scan(Space::ServingAnswers, b"mail\0g").count() as u64;
    let bound = keep + keep.div_ceil(u64::from(GENERATIONS));
    assert!(
        (keep..=bound).contains(&stored),
        "{stored} kept answers, outside {keep}..={bound}"
    );
    // The last answers of both processes are there to be scored (without
    // the rounds taken together, one process could finish so far ahead that
    // the other's later answers rightly push its last ones out).
    for process in 0..2 {
        let found = feedback::find(s, "mail", &format!("p{process}"), "r29-2").unwrap();
        assert!(found.is_some(), "process {process}'s newest answer is gone");
    }
}

fn contract(s: &dyn Storage) -> Result<(), StoreError> {
    // Byte order of keys, including 0x00 and 0xff and a prefix of another.
    let keys: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x00],
        vec![0x00, 0x00],
        vec![0x01],
        vec![0x7f],
        vec![0x80],
        vec![0xff],
        vec![0xff, 0xff],
    ];
    let mut b = WriteBatch::new();
    for (i, k) in keys.iter().enumerate() {
        b.put(Space::Users, k.clone(), vec![i as u8]);
    }
    b.put(Space::Tokens, vec![0x01], b"other space".to_vec());
    s.commit(b)?;
    let all: Vec<Vec<u8>> = s
        .scan(Space::Users, b"")
        .map(|e| e.map(|e| e.0))
        .collect::<Result<_, _>>()?;
    assert_eq!(all, keys, "keys in byte order, one space only");
    let ff: Vec<_> = s.scan(Space::Users, &[0xff]).collect::<Result<_, _>>()?;
    assert_eq!(ff.len(), 2, "a prefix of all 0xff bytes has no end key");
    assert_eq!(
        s.last(Space::Users, &[0xff])?.map(|e| e.0),
        Some(vec![0xff, 0xff])
    );
    assert_eq!(
        s.last(Space::Users, &[0x00])?.map(|e| e.0),
        Some(vec![0x00, 0x00])
    );
    assert_eq!(s.last(Space::Datasets, b"")?, None);
    let from: Vec<_> = s
        .scan_from(Space::Users, &[0x7f])
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(from.len(), 4);
    assert_eq!(s.get(Space::Users, &[])?, Some(vec![0]));
    assert_eq!(
        s.get(Space::Tokens, &[0x01])?,
        Some(b"other space".to_vec())
    );
    assert_eq!(s.get(Space::Tokens, &[0x02])?, None);

    // Within a batch the last write to a key wins, as applied in order.
    let mut b = WriteBatch::new();
    b.put(Space::Models, b"a".to_vec(), b"1".to_vec());
    b.delete(Space::Models, b"a".to_vec());
    b.delete(Space::Models, b"b".to_vec());
    b.put(Space::Models, b"b".to_vec(), b"2".to_vec());
    b.put(Space::Models, b"b".to_vec(), b"3".to_vec());
    b.put(Space::Models, b"empty".to_vec(), Vec::new());
    s.commit(b)?;
    assert_eq!(s.get(Space::Models, b"a")?, None);
    assert_eq!(s.get(Space::Models, b"b")?, Some(b"3".to_vec()));
    assert_eq!(s.get(Space::Models, b"empty")?, Some(Vec::new()));

    // Large batches and scans across many pages, staged then synced.
    let mut b = WriteBatch::new();
    for i in 0u32..5000 {
        b.put(
            Space::Labels,
            i.to_be_bytes().to_vec(),
            vec![7; (i % 300) as usize],
        );
    }
    s.stage(b)?;
    s.sync()?;
    let mut n = 0u32;
    for item in s.scan(Space::Labels, b"") {
        let (k, v) = item?;
        assert_eq!(k, n.to_be_bytes().to_vec());
        assert_eq!(v.len(), (n % 300) as usize);
        n += 1;
    }
    assert_eq!(n, 5000);
    let tail: Vec<_> = s
        .scan(Space::Labels, &[0, 0, 0x13])
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(tail.len(), 5000 - 0x1300);
    let mut b = WriteBatch::new();
    for i in (0u32..5000).step_by(2) {
        b.delete(Space::Labels, i.to_be_bytes().to_vec());
    }
    s.commit(b)?;
    assert_eq!(s.scan(Space::Labels, b"").count(), 2500);
    // Staged read-modify-writes from several threads, as several processes
    // would run them, lose no update; a stale expectation writes nothing.
    let mut b = WriteBatch::new();
    b.put(Space::Models, b"staged".to_vec(), b"x".to_vec());
    let stale = [Expect::new(
        Space::Models,
        b"staged".to_vec(),
        Some(b"y".to_vec()),
    )];
    assert!(matches!(
        s.stage_if(&stale, b),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(s.get(Space::Models, b"staged")?, None);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..25 {
                    cloister_host::store::stage_update(
                        s,
                        &[(Space::Models, b"staged".as_slice())],
                        |v| {
                            let n = v[0]
                                .as_deref()
                                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                                .map_or(0, u32::from_le_bytes);
                            let mut b = WriteBatch::new();
                            b.put(
                                Space::Models,
                                b"staged".to_vec(),
                                (n + 1).to_le_bytes().to_vec(),
                            );
                            Ok::<_, StoreError>((b, ()))
                        },
                    )
                    .unwrap();
                }
            });
        }
    });
    s.sync()?;
    assert_eq!(
        s.get(Space::Models, b"staged")?,
        Some(100u32.to_le_bytes().to_vec())
    );
    // A big value.
    let big = vec![0xa5u8; 3 << 20];
    let mut b = WriteBatch::new();
    b.put(Space::PluginBlobs, b"big".to_vec(), big.clone());
    s.commit(b)?;
    assert_eq!(s.get(Space::PluginBlobs, b"big")?, Some(big));
    Ok(())
}

#[test]
fn both_engines_keep_the_storage_contract() {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStorage::open(&dir.path().join("store"), true).unwrap();
    contract(&sled).unwrap();
    // One open of sled at a time: it is the only holder alive.
    assert!(sled.holder_alive(sled.holder()).unwrap());
    assert!(!sled.holder_alive(sled.holder() ^ 1).unwrap());
    serving_writes_at_once(&sled);
    let Some(pg) = PgServer::start() else { return };
    let url: PgUrl = pg.database("contract").parse().unwrap();
    let pg_store = PgStorage::open(&url, true, &[7; 32]).unwrap();
    contract(&pg_store).unwrap();
    serving_writes_at_once(&pg_store);
}

#[test]
fn writers_share_a_database_and_losing_the_connection_fails_closed() {
    let Some(pg) = PgServer::start() else { return };
    let url: PgUrl = pg.database("lock").parse().unwrap();
    let creating = PgStorage::open(&url, true, &[7; 32]).unwrap();
    // `init` has the database to itself while it makes the environment.
    assert!(matches!(
        PgStorage::open(&url, false, &[7; 32]),
        Err(StoreError::Busy)
    ));
    drop(creating);
    let first = PgStorage::open(&url, false, &[7; 32]).unwrap();
    // Writers share it; `migrate` and another `init` are refused.
    let beside = PgStorage::open(&url, false, &[7; 32]).unwrap();
    assert!(matches!(PgStorage::migrate(&url), Err(StoreError::Busy)));
    assert!(matches!(
        PgStorage::open(&url, true, &[7; 32]),
        Err(StoreError::Busy)
    ));
    let mut b = WriteBatch::new();
    b.put(Space::Users, b"b".to_vec(), b"2".to_vec());
    beside.commit(b).unwrap();
    assert_eq!(first.get(Space::Users, b"b").unwrap(), Some(b"2".to_vec()));
    drop(beside);
    let mut b = WriteBatch::new();
    b.put(Space::Users, b"a".to_vec(), b"1".to_vec());
    first.commit(b.clone()).unwrap();
    // The writer's connection goes away (an administrator, a failover):
    // the lock goes with it, so this handle must not write again.
    let killed = pg.psql(
        "lock",
        "SELECT count(pg_terminate_backend(pid)) FROM (SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory') AS l",
    );
    assert_eq!(killed, "1");
    let err = first.commit(b.clone()).unwrap_err();
    assert!(err.to_string().contains("must be reopened"), "{err}");
    // Another process may now open it and write.
    let second = PgStorage::open(&url, false, &[7; 32]).unwrap();
    second.commit(b).unwrap();
    assert!(first.commit(WriteBatch::new()).is_err());
    drop(second);
    drop(first);
}

/// Readers share a database with its writer, not with `migrate`; a
/// read-modify-write with `commit_if` from several handles (each with its
/// own connections, as separate processes have) loses no update.
#[test]
fn readers_share_the_database_and_commit_if_loses_no_update_between_them() {
    let Some(pg) = PgServer::start() else { return };
    let url: PgUrl = pg.database("shared").parse().unwrap();
    let writer = PgStorage::open(&url, true, &[7; 32]).unwrap();
    let readers: Vec<_> = (0..2)
        .map(|_| PgStorage::open_reader(&url, &[7; 32]).unwrap())
        .collect();
    assert!(matches!(PgStorage::migrate(&url), Err(StoreError::Busy)));
    let handles: Vec<&dyn Storage> = [&writer as &dyn Storage]
        .into_iter()
        .chain(readers.iter().map(|r| r as &dyn Storage))
        .collect();
    let conflicts = AtomicU64::new(0);
    std::thread::scope(|s| {
        for h in &handles {
            for _ in 0..2 {
                let conflicts = &conflicts;
                s.spawn(move || {
                    for _ in 0..40 {
                        loop {
                            let seen = h.get(Space::Meta, b"n").unwrap();
                            let n = seen
                                .as_deref()
                                .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                            let mut b = WriteBatch::new();
                            b.put(Space::Meta, b"n".to_vec(), (n + 1).to_be_bytes().to_vec());
                            match h.commit_if(&[Expect::new(Space::Meta, b"n".to_vec(), seen)], b) {
                                Ok(()) => break,
                                Err(StoreError::Conflict { space, .. }) => {
                                    assert_eq!(space, Space::Meta);
                                    conflicts.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                });
            }
        }
    });
    assert_eq!(
        writer.get(Space::Meta, b"n").unwrap(),
        Some(240u64.to_be_bytes().to_vec())
    );
    // Six threads on three connections collided (the count differs run to
    // run; that they collided at all shows the check is exercised).
    assert!(conflicts.load(Ordering::Relaxed) > 0);
    drop(readers);
    drop(writer);
    assert_eq!(PgStorage::migrate(&url).unwrap(), Vec::<i32>::new());
}

/// Each open of a database is a holder that every other open can see alive
/// until it ends; work claimed by a live holder is refused to others, and
/// a dead holder's claim is taken over at once.
#[test]
fn a_live_holders_claim_is_refused_and_a_dead_ones_is_taken_over() {
    use cloister_host::claims::{self, ClaimError};
    use std::sync::Arc;
    let Some(pg) = PgServer::start() else { return };
    let url: PgUrl = pg.database("holders").parse().unwrap();
    let writer: Arc<dyn Storage> = Arc::new(PgStorage::open(&url, true, &[7; 32]).unwrap());
    let other: Arc<dyn Storage> = Arc::new(PgStorage::open_reader(&url, &[7; 32]).unwrap());
    assert_ne!(writer.holder(), other.holder());
    assert!(writer.holder_alive(other.holder()).unwrap());
    assert!(other.holder_alive(writer.holder()).unwrap());
    assert!(!writer.holder_alive(other.holder() ^ 1).unwrap());

    let held = claims::take(&other, "job", "j1").unwrap();
    assert!(matches!(
        claims::take(&writer, "job", "j1"),
        Err(ClaimError::Held)
    ));
    assert_eq!(
        claims::holder_of(writer.as_ref(), "job", "j1").unwrap(),
        Some(other.holder())
    );
    // Released: free for the other open.
    drop(held);
    let mine = claims::take(&writer, "job", "j1").unwrap();
    assert!(matches!(
        claims::take(&other, "job", "j1"),
        Err(ClaimError::Held)
    ));
    drop(mine);

    // A holder that ends without releasing (a killed process): its claim
    // stays in the store, and is taken over once its connection is gone.
    let gone = other.holder();
    let mut b = WriteBatch::new();
    b.put(
        Space::Claims,
        b"job\0j2".to_vec(),
        gone.to_be_bytes().to_vec(),
    );
    other.commit(b).unwrap();
    assert_eq!(
        claims::holder_of(writer.as_ref(), "job", "j2").unwrap(),
        Some(gone)
    );
    assert!(matches!(
        claims::take(&writer, "job", "j2"),
        Err(ClaimError::Held)
    ));
    drop(other);
    let start = std::time::Instant::now();
    while writer.holder_alive(gone).unwrap() {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        claims::holder_of(writer.as_ref(), "job", "j2").unwrap(),
        None
    );
    let _taken = claims::take(&writer, "job", "j2").unwrap();
}

/// Recovery at open removes only the imports of holders that have ended:
/// an import another process is running is left alone.
#[test]
fn recovery_leaves_a_live_processs_import_alone() {
    let Some(pg) = PgServer::start() else { return };
    let e = env_with(&pg.database("recovery"));
    let store = e.c.env().store();
    let url: PgUrl = pg.url("recovery").parse().unwrap();
    let other = PgStorage::open_reader(&url, &[7; 32]).unwrap();
    let marker = |holder: u64| {
        let mut v = vec![0xff];
        v.extend_from_slice(&holder.to_be_bytes());
        v.extend_from_slice(b"ds");
        v
    };
    let mut b = WriteBatch::new();
    b.put(
        Space::Imports,
        900u64.to_be_bytes().to_vec(),
        marker(other.holder()),
    );
    b.put(
        Space::Imports,
        901u64.to_be_bytes().to_vec(),
        marker(other.holder() ^ 1),
    );
    // A marker from before holders were recorded: the name alone.
    b.put(
        Space::Imports,
        902u64.to_be_bytes().to_vec(),
        b"ds".to_vec(),
    );
    store.commit(b).unwrap();
    assert_eq!(cloister_host::datasets::recover(e.c.env()).unwrap(), 2);
    let left: Vec<_> = store
        .scan(Space::Imports, b"")
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(left, vec![900u64.to_be_bytes().to_vec()]);
    let gone = other.holder();
    drop(other);
    let start = std::time::Instant::now();
    while store.holder_alive(gone).unwrap() {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(cloister_host::datasets::recover(e.c.env()).unwrap(), 1);
    assert_eq!(store.scan(Space::Imports, b"").count(), 0);
}

// ---------------------------------------------------------- environment --

#[test]
fn init_refuses_a_used_database_and_open_refuses_another_environments_store() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database("env");
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = Cloister::init_with(&dir.path().join("a"), "root", &url).unwrap();
    let id = c.environment_id().to_string();
    assert!(
        c.store_location()
            .to_string()
            .starts_with("postgres://cloister@")
    );
    drop(c);
    // The directory holds no sled store and its config file is private.
    assert!(!dir.path().join("a/store").exists());
    let meta = std::fs::metadata(dir.path().join("a/cloister.toml")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );

    let err = Cloister::init_with(&dir.path().join("b"), "root", &url).unwrap_err();
    assert!(err.to_string().contains("already holds"), "{err}");
    assert!(
        !dir.path().join("b").exists(),
        "a failed init leaves nothing"
    );

    // A directory copied from another environment but pointed at this
    // database is refused by name.
    let (other, _) = Cloister::init(&dir.path().join("c"), "root").unwrap();
    let other_id = other.environment_id().to_string();
    drop(other);
    let toml = std::fs::read_to_string(dir.path().join("a/cloister.toml")).unwrap();
    std::fs::write(
        dir.path().join("c/cloister.toml"),
        toml.replace(&id, &other_id),
    )
    .unwrap();
    let err = Cloister::open(&dir.path().join("c"), "cli").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&other_id) && text.contains("another environment"),
        "{text}"
    );

    // A bad store URL is named.
    let err = Cloister::init_with(&dir.path().join("d"), "root", "mysql://x/y").unwrap_err();
    assert!(err.to_string().contains("postgres://"), "{err}");

    // A schema newer than this build's is refused with what to do.
    pg.psql(
        "env",
        "INSERT INTO cloister_migrations (version, name) VALUES (999, 'future')",
    );
    let err = Cloister::open(&dir.path().join("a"), "cli").unwrap_err();
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

#[test]
fn rows_changed_in_the_database_are_refused_not_used() {
    let Some(pg) = PgServer::start() else { return };
    let e = env_with(&pg.database("rows"));
    let users = Space::Users.prefix();
    // The scientist makes herself an admin by editing her row.
    pg.psql(
        "rows",
        &format!(
            "UPDATE cloister_kv SET value = convert_to(replace(convert_from(
                 substring(value FROM 1 FOR length(value) - 32), 'UTF8'), 'scientist', 'admin'), 'UTF8')
                 || substring(value FROM length(value) - 31)
             WHERE space = {users} AND key = 'sci'::bytea"
        ),
    );
    let err = cloister_host::users::get(e.c.env().store().as_ref(), "sci")
        .unwrap_err()
        .to_string();
    assert!(err.contains("Users/sci") && err.contains("tag"), "{err}");
    // Everything that looks the user up fails closed, audited or not.
    assert!(e.c.list_users(&e.admin).is_err());
    // A valid row copied under another key is refused too.
    pg.psql(
        "rows",
        &format!(
            "INSERT INTO cloister_kv SELECT space, 'eve'::bytea, value FROM cloister_kv
             WHERE space = {users} AND key = 'aud'::bytea"
        ),
    );
    let err = cloister_host::users::get(e.c.env().store().as_ref(), "eve").unwrap_err();
    assert!(err.to_string().contains("Users/eve"), "{err}");
    // Listing users meets both and fails closed.
    assert!(cloister_host::users::list(e.c.env().store().as_ref()).is_err());
}

// --------------------------------------------------------------- audit --

/// An environment on `db` with some traffic in its log.
fn busy(pg: &PgServer, db: &str) -> Env {
    let e = env_with(&pg.database(db));
    for _ in 0..10 {
        e.c.list_datasets(&e.sci).unwrap();
    }
    e
}

fn tampered(c: &Cloister) -> (u64, String) {
    match c.env().audit().verify(None).unwrap() {
        Verdict::Tampered { first_bad, reason } => (first_bad, reason),
        v => panic!("tampering not detected: {v:?}"),
    }
}

/// SQL naming audit entry `seq` (its key is the big-endian sequence
/// number).
fn entry(seq: u64) -> String {
    entry_in("cloister_kv", seq)
}

fn entry_in(table: &str, seq: u64) -> String {
    format!(
        "{table}.space = {} AND {table}.key = int8send({seq})",
        Space::Audit.prefix()
    )
}

#[test]
fn rows_edited_deleted_swapped_or_truncated_in_the_database_are_caught() {
    let Some(pg) = PgServer::start() else { return };

    let e = busy(&pg, "edit");
    pg.psql(
        "edit",
        &format!(
            "UPDATE cloister_kv SET value = set_byte(value, 40, get_byte(value, 40) # 1) WHERE {}",
            entry(9)
        ),
    );
    let (at, why) = tampered(&e.c);
    assert_eq!(at, 9, "{why}");

    let e = busy(&pg, "delete");
    pg.psql(
        "delete",
        &format!("DELETE FROM cloister_kv WHERE {}", entry(7)),
    );
    let (at, why) = tampered(&e.c);
    assert_eq!(at, 7, "{why}");
    assert!(why.contains("missing"), "{why}");

    let e = busy(&pg, "swap");
    pg.psql(
        "swap",
        &format!(
            "UPDATE cloister_kv a SET value = b.value FROM cloister_kv b
             WHERE ({} AND {}) OR ({} AND {})",
            entry_in("a", 4),
            entry_in("b", 5),
            entry_in("a", 5),
            entry_in("b", 4)
        ),
    );
    assert_eq!(tampered(&e.c).0, 4);

    let e = busy(&pg, "truncate");
    let size = e.c.env().audit().size();
    pg.psql(
        "truncate",
        &format!(
            "DELETE FROM cloister_kv WHERE space = {} AND key >= int8send({})",
            Space::Audit.prefix(),
            size - 3
        ),
    );
    let (at, why) = tampered(&e.c);
    assert_eq!(at, size - 3, "{why}");
    let (path, sci) = (e.path(), e.sci.clone());
    drop(e.c);
    let reopened = Cloister::open(&path, "cli").unwrap();
    let err = reopened.list_datasets(&sci).unwrap_err();
    assert!(matches!(err, ServiceError::Audit(_)), "fails closed: {err}");
}

#[test]
fn restoring_an_old_copy_of_the_tables_is_caught_by_a_saved_checkpoint() {
    let Some(pg) = PgServer::start() else { return };
    let e = busy(&pg, "rollback");
    let (path, sci, aud) = (e.path(), e.sci.clone(), e.aud.clone());
    drop(e.c);
    pg.psql(
        "rollback",
        "CREATE TABLE old_copy AS SELECT * FROM cloister_kv",
    );
    let c = Cloister::open(&path, "cli").unwrap();
    for _ in 0..5 {
        c.list_datasets(&sci).unwrap();
    }
    let saved = c.audit_checkpoint(&aud).unwrap().to_text();
    drop(c);
    pg.psql(
        "rollback",
        "BEGIN; DELETE FROM cloister_kv; INSERT INTO cloister_kv SELECT * FROM old_copy; COMMIT;",
    );
    let c = Cloister::open(&path, "cli").unwrap();
    assert!(matches!(
        c.env().audit().verify(None).unwrap(),
        Verdict::Intact { .. }
    ));
    let cp = Checkpoint::parse(&saved).unwrap();
    match c.env().audit().verify(Some(&cp)).unwrap() {
        Verdict::Tampered { reason, .. } => assert!(reason.contains("rollback"), "{reason}"),
        v => panic!("rollback not detected: {v:?}"),
    }
}

#[test]
fn accounts_on_postgres_keep_an_active_admin_under_concurrent_changes() {
    let Some(pg) = PgServer::start() else { return };
    crate::closed_env::accounts_change_roles_and_tokens_and_keep_an_active_admin(&env_with(
        &pg.database("accounts"),
    ));
}

#[test]
fn concurrent_appends_on_postgres_are_contiguous_and_verify() {
    let Some(pg) = PgServer::start() else { return };
    let e = env_with(&pg.database("concurrent"));
    let start = e.c.env().audit().size();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    e.c.list_datasets(&e.sci).unwrap();
                }
            });
        }
    });
    match e.c.env().audit().verify(None).unwrap() {
        Verdict::Intact { size, .. } => assert_eq!(size, start + 400),
        v => panic!("{v:?}"),
    }
    let rows = pg.psql(
        "concurrent",
        &format!(
            "SELECT count(*) FROM cloister_kv WHERE space = {}",
            Space::Audit.prefix()
        ),
    );
    assert_eq!(rows, (start + 400).to_string());
}

/// Several processes append to one log: two `cloister serve` replicas
/// answering requests on four connections, CLI writers adding users, and
/// `cloister audit verify` / `audit checkpoint` run beside them. The two
/// consoles act as one: a session started on one is valid on the other, a
/// logout on one ends it on both, and failed logins are counted across
/// them. Every verification passes, and afterwards the log holds every
/// entry of all of them, in one order that verifies.
#[test]
fn two_consoles_writers_and_audit_commands_share_sessions_and_append_to_one_log_that_verifies() {
    use cloister_host::policy::Role;
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    let (c, root) = Cloister::init_with(&env, "root", &pg.database("beside")).unwrap();
    let admin = c.authenticate(&root).unwrap();
    let (_, sci) = c.add_user(&admin, "sci", &[Role::Scientist]).unwrap();
    let (_, aud) = c.add_user(&admin, "aud", &[Role::Auditor]).unwrap();
    const PW: &str = "correct horse battery staple";
    c.set_password(&admin, "sci", PW).unwrap();
    c.set_password(&admin, "aud", PW).unwrap();
    drop(c);
    let mut serves = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let port = crate::support::free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        serves.push(
            cli(&env)
                .args(["serve", "--addr", &addr.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        addrs.push(addr);
    }
    let started = std::time::Instant::now();
    for addr in &addrs {
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(started.elapsed().as_secs() < 60, "serve did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let (a, b) = (addrs[0], addrs[1]);
    let login = |addr, user: &str, pw: &str| {
        let body = serde_json::json!({"user": user, "password": pw}).to_string();
        crate::support::http(
            addr,
            "POST",
            "/api/login",
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
    };
    // A session started on one console is valid on the other.
    let (status, head, body) = login(a, "sci", PW);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let sid = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                .and_then(|(_, v)| v.trim().strip_prefix("cloister_session="))
        })
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_string();
    let csrf = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let cookie = format!("cloister_session={sid}");
    for addr in [a, b] {
        let (status, _, _) =
            crate::support::http(addr, "GET", "/api/datasets", &[("Cookie", &cookie)], None);
        assert_eq!(status, 200);
    }
    // Failed logins are counted across consoles: with three free failures
    // per name, the fourth locks the name for 2 s (then 4, 8, …) on both,
    // so guesses spread over the two are refused from the fifth or sixth
    // on. (Counted per console, each would evaluate four, and the first
    // refusal would come at the ninth.)
    let mut guesses = 0;
    let locked_on = loop {
        let addr = [a, b][guesses % 2];
        let (status, _, _) = login(addr, "aud", "not the password");
        guesses += 1;
        match status {
            401 => assert!(guesses < 8, "{guesses} guesses evaluated"),
            429 => break addr,
            other => panic!("guess {guesses}: {other}"),
        }
    };
    let other = if locked_on == a { b } else { a };
    let (status, _, _) = login(other, "aud", PW);
    assert_eq!(status, 429, "the name is locked on the other console too");
    // A second writer runs beside the servers. Commands that only read
    // run beside them too (and are recorded like any).
    succeeded(
        &cli(&env)
            .args(["user", "add", "eve", "--role", "scientist"])
            .env("CLOISTER_TOKEN", &root)
            .output()
            .unwrap(),
    );
    for (token, args) in [
        (&sci, &["dataset", "list"][..]),
        (&sci, &["model", "list"]),
        (&sci, &["job", "list"]),
        (&sci, &["plugin", "list"]),
        (&root, &["user", "list"]),
    ] {
        succeeded(
            &cli(&env)
                .args(args)
                .env("CLOISTER_TOKEN", token)
                .output()
                .unwrap(),
        );
    }
    let bearer = format!("Bearer {sci}");
    let (verified, checkpoints) = std::thread::scope(|s| {
        for t in 0..4 {
            let addr = addrs[t % 2];
            let bearer = &bearer;
            s.spawn(move || {
                for _ in 0..40 {
                    let (status, _, body) = crate::support::http(
                        addr,
                        "GET",
                        "/api/datasets",
                        &[("Authorization", bearer)],
                        None,
                    );
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                }
            });
        }
        // Two more writing processes at once, each adding users while the
        // server answers and the auditors verify.
        for w in 0..2 {
            let (env, root) = (&env, &root);
            s.spawn(move || {
                for i in 0..3 {
                    succeeded(
                        &cli(env)
                            .args(["user", "add", &format!("w{w}u{i}"), "--role", "labeler"])
                            .env("CLOISTER_TOKEN", root)
                            .output()
                            .unwrap(),
                    );
                }
            });
        }
        let mut verified = 0;
        let mut checkpoints = 0;
        for round in 0..6 {
            let args: &[&str] = if round % 2 == 0 {
                &["audit", "verify"]
            } else {
                &["audit", "checkpoint"]
            };
            let out = cli(&env)
                .args(args)
                .env("CLOISTER_TOKEN", &aud)
                .output()
                .unwrap();
            let said = succeeded(&out);
            if round % 2 == 0 {
                assert!(said.starts_with("audit log OK: "), "{said}");
                verified += 1;
            } else {
                checkpoints += 1;
            }
        }
        (verified, checkpoints)
    });
    // A logout on one console ends the session on both.
    let (status, _, _) = crate::support::http(
        b,
        "POST",
        "/api/logout",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        None,
    );
    assert_eq!(status, 204);
    for addr in [a, b] {
        let (status, _, _) =
            crate::support::http(addr, "GET", "/api/datasets", &[("Cookie", &cookie)], None);
        assert_eq!(status, 401);
    }
    // Acknowledged entries are committed; a killed server loses none.
    for mut serve in serves {
        serve.kill().unwrap();
        serve.wait().unwrap();
    }
    let c = Cloister::open(&env, "cli").unwrap();
    let size = match c.env().audit().verify(None).unwrap() {
        Verdict::Intact { size, .. } => size,
        v => panic!("{v:?}"),
    };
    let all = c
        .env()
        .audit()
        .query(&cloister_host::audit::AuditFilter::default())
        .unwrap();
    assert_eq!(all.len() as u64, size);
    let count = |actor: &str, action: &str| {
        all.iter()
            .filter(|e| e.record.actor == actor && e.record.action == action)
            .count()
    };
    // 160 with the token, 2 with the session, 1 from the CLI.
    assert_eq!(count("sci", "list_datasets"), 163);
    assert_eq!(count("sci", "login"), 1);
    assert_eq!(count("sci", "view_model"), 1);
    assert_eq!(count("root", "list_users"), 1);
    // sci, aud, eve and the six users of the two writers, all stored, and
    // the two passwords set (audited under the same action).
    assert_eq!(count("root", "add_user"), 11);
    let users: Vec<String> = cloister_host::users::list(c.env().store().as_ref())
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    for w in 0..2 {
        for i in 0..3 {
            assert!(users.contains(&format!("w{w}u{i}")), "{users:?}");
        }
    }
    assert_eq!(count("aud", "verify_audit"), verified);
    assert_eq!(count("aud", "checkpoint_audit"), checkpoints);
}

#[test]
fn a_database_crash_during_appends_fails_closed_and_keeps_every_acknowledged_entry() {
    let Some(pg) = PgServer::start() else { return };
    let e = env_with(&pg.database("crash"));
    let before = e.c.env().audit().size();
    let (acked, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match e.c.list_datasets(&e.sci) {
                        Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(700));
        pg.crash();
        std::thread::sleep(std::time::Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    let acked = acked.load(Ordering::Relaxed);
    assert!(acked > 0, "nothing was appended before the crash");
    assert!(
        failed.load(Ordering::Relaxed) > 0,
        "operations went on without a database"
    );
    pg.start_again();
    // The process that lost its connection stays closed…
    assert!(
        e.c.list_datasets(&e.sci).is_err(),
        "must fail closed after a lost connection"
    );
    let (path, sci) = (e.path(), e.sci.clone());
    drop(e.c);
    // …and a reopened environment finds every acknowledged entry, intact.
    let c = Cloister::open(&path, "cli").unwrap();
    match c.env().audit().verify(None).unwrap() {
        Verdict::Intact { size, .. } => assert!(
            size >= before + acked,
            "{size} entries, but {before} + {acked} were acknowledged"
        ),
        v => panic!("{v:?}"),
    }
    c.list_datasets(&sci).unwrap();
}

// ----------------------------------------------------------------- CLI --

/// Asserts that a command succeeded; returns what it printed.
pub fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that a command failed and that its stderr says `want`;
/// returns the stderr.
pub fn failed_with(out: &std::process::Output, want: &str) -> String {
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it succeeded: {said}");
    assert!(said.contains(want), "{said}");
    said
}

/// The token a command printed after `label` (`admin token` for `init`,
/// `token` for `user add`).
pub fn printed_token(stdout: &str, label: &str) -> String {
    let prefix = format!("{label} (shown once; keep it secret): ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {label} in {stdout}"))
        .to_string()
}

fn cli(env: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cloister"));
    c.env("CLOISTER_ENV", env).env_remove("CLOISTER_STORE");
    c
}

#[test]
fn the_cli_creates_migrates_and_uses_an_environment_on_postgres() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database("cli");
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    let text = succeeded(
        &cli(&env)
            .args(["init", env.to_str().unwrap()])
            .env("CLOISTER_STORE", &url)
            .output()
            .unwrap(),
    );
    assert!(text.contains("(store: postgres://cloister@"), "{text}");
    let token = printed_token(&text, "admin token");
    let text = succeeded(&cli(&env).arg("migrate").output().unwrap());
    assert!(text.contains("up to date"), "{text}");
    succeeded(
        &cli(&env)
            .env("CLOISTER_TOKEN", &token)
            .args(["audit", "verify"])
            .output()
            .unwrap(),
    );
    // While one process has the environment open, another writes beside
    // it; `migrate` needs the database to itself.
    let held = Cloister::open(&env, "cli").unwrap();
    succeeded(
        &cli(&env)
            .env("CLOISTER_TOKEN", &token)
            .args(["user", "add", "eve", "--role", "scientist"])
            .output()
            .unwrap(),
    );
    failed_with(
        &cli(&env).args(["migrate"]).output().unwrap(),
        "in use by another process",
    );
    succeeded(
        &cli(&env)
            .env("CLOISTER_TOKEN", &token)
            .args(["audit", "verify"])
            .output()
            .unwrap(),
    );
    drop(held);
}

// ---------------------------------------------------------------- jobs --

#[test]
fn a_job_on_postgres_killed_and_resumed_ends_as_the_same_job_on_sled() {
    let Some(pg) = PgServer::start() else { return };
    let on_pg =
        crate::active_learning::killed_jobs_resume_to_the_same_result(&pg.database("job"), 2, true);
    let on_sled = crate::active_learning::killed_jobs_resume_to_the_same_result("sled", 0, false);
    assert_eq!(on_pg, on_sled, "the engine changed the job's result");
}

// ------------------------------------------------------------- console --

#[test]
fn the_console_answers_from_a_postgres_store_inside_its_runtime() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    let (c, root) = Cloister::init_with(&env, "root", &pg.database("console")).unwrap();
    let admin = c.authenticate(&root).unwrap();
    let (_, token) = c
        .add_user(&admin, "sci", &[cloister_host::policy::Role::Scientist])
        .unwrap();
    drop(c);
    let c = Cloister::open(&env, "console").unwrap();
    let console = cloister_console::Console::new(c, cloister_console::ConsoleConfig::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Token checks and some listings run on the runtime's own threads: the
    // store must answer there without blocking a runtime inside a runtime.
    let get = |token: &str| {
        let app = cloister_console::router(console.clone());
        let req = Request::builder()
            .uri("/api/datasets")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        rt.block_on(async {
            let r = app.oneshot(req).await.unwrap();
            let status = r.status();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    let (status, body) = get(&token);
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = get("not-a-token");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The health probe sees a lost writer connection (and so a lost
    // environment lock); it says one word either way.
    let health = || {
        let app = cloister_console::router(console.clone());
        let req = Request::builder()
            .uri("/healthz")
            .body(Body::empty())
            .unwrap();
        rt.block_on(async {
            let r = app.oneshot(req).await.unwrap();
            let status = r.status();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    assert_eq!(health(), (StatusCode::OK, "ok\n".to_string()));
    pg.psql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'",
    );
    assert_eq!(
        health(),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n".to_string())
    );
    drop(console);
    rt.shutdown_background();
}

// ----------------------------------------------------------------- TLS --

#[test]
fn over_tcp_the_store_talks_only_verified_tls_unless_told_otherwise() {
    let Some(pg) = PgServer::start_tcp(true) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = pg.port();
    pg.psql("postgres", "CREATE DATABASE tls");
    let by_name = format!("postgres://cloister@localhost:{port}/tls");
    let with_ca = |url: &str| cloister_host::env_config::InitOptions {
        store: url.to_string(),
        store_ca: Some(pg.ca_pem()),
        objects: None,
        workers: false,
    };

    // The system's trust store does not know the test CA: refused.
    let err = Cloister::init_with(&dir.path().join("a"), "root", &by_name).unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The right CA, but a name the certificate does not carry: refused.
    let by_ip = format!("postgres://cloister@127.0.0.1:{port}/tls");
    let err =
        Cloister::init_with_options(&dir.path().join("a"), "root", &with_ca(&by_ip)).unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
    // The CA and the name: TLS, and the environment keeps the CA.
    let (c, _) =
        Cloister::init_with_options(&dir.path().join("a"), "root", &with_ca(&by_name)).unwrap();
    assert!(!c.store_location().to_string().contains("without TLS"));
    let tls_connections = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE datname = 'tls' AND ssl",
    );
    assert_ne!(tls_connections, "0");
    let plain = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE datname = 'tls' AND NOT ssl",
    );
    assert_eq!(plain, "0");
    drop(c);
    let c = Cloister::open(&dir.path().join("a"), "cli").unwrap();
    drop(c);

    // A server without TLS: refused over TCP, even with sslmode=prefer…
    let Some(plain_server) = PgServer::start_tcp(false) else {
        return;
    };
    plain_server.psql("postgres", "CREATE DATABASE p");
    let url = format!(
        "postgres://cloister@localhost:{}/p?sslmode=prefer",
        plain_server.port()
    );
    let err = Cloister::init_with(&dir.path().join("b"), "root", &url).unwrap_err();
    assert!(
        err.to_string().contains("server does not support TLS"),
        "{err}"
    );
    // …and used in plain text only when the URL says so, which shows.
    let url = url.replace("sslmode=prefer", "sslmode=disable");
    let (c, _) = Cloister::init_with(&dir.path().join("b"), "root", &url).unwrap();
    assert!(c.store_location().to_string().ends_with("(without TLS)"));
}

// ---------------------------------------------------------- move-store --

#[test]
fn an_environment_moves_from_sled_to_postgres_whole_and_on_the_record() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    let token = printed_token(
        &succeeded(
            &cli(&env)
                .args(["init", env.to_str().unwrap()])
                .output()
                .unwrap(),
        ),
        "admin token",
    );
    // Some state: a user, a dataset, traffic in the log.
    let (datasets, size) = {
        let c = Cloister::open(&env, "cli").unwrap();
        let admin = c.authenticate(&token).unwrap();
        let (sci, _) = c
            .add_user(&admin, "sci", &[cloister_host::policy::Role::Scientist])
            .unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"id\":\"a\",\"text\":\"x\",\"label\":\"l\"}\n").unwrap();
        c.import_dataset(
            &sci,
            "d",
            &data,
            &cloister_host::service::ImportOptions::default(),
        )
        .unwrap();
        (c.list_datasets(&sci).unwrap().len(), c.env().audit().size())
    };

    // A used database is refused and the environment stays on sled.
    let used = pg.database("used");
    pg.psql("used", "SELECT 1");
    Cloister::init_with(&dir.path().join("other"), "root", &used).unwrap();
    let out = cli(&env)
        .args(["move-store", "--to", &used])
        .output()
        .unwrap();
    failed_with(&out, "already holds");
    assert!(env.join("store").is_dir());
    Cloister::open(&env, "cli").unwrap();

    let url = pg.database("moved");
    let text = succeeded(
        &cli(&env)
            .args(["move-store"])
            .env("CLOISTER_STORE", &url)
            .output()
            .unwrap(),
    );
    assert!(text.contains("the audit log verifies"), "{text}");
    assert!(!env.join("store").exists() && env.join("store.moved").is_dir());
    let c = Cloister::open(&env, "cli").unwrap();
    assert!(c.store_location().to_string().starts_with("postgres://"));
    let admin = c.authenticate(&token).unwrap();
    let sci = cloister_host::users::get(c.env().store().as_ref(), "sci").unwrap();
    assert_eq!(c.list_datasets(&sci).unwrap().len(), datasets);
    let log = c
        .audit_log(
            &admin,
            &cloister_host::audit::AuditFilter {
                action: Some("move_store".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        log.len(),
        2,
        "both attempts (the refused one too) are on the record"
    );
    assert!(c.env().audit().size() > size);
    match c.env().audit().verify(None).unwrap() {
        Verdict::Intact { .. } => {}
        v => panic!("{v:?}"),
    }
    drop(c);
    // Once on PostgreSQL, there is nothing to move.
    let out = cli(&env)
        .args(["move-store", "--to", &url])
        .output()
        .unwrap();
    failed_with(&out, "already a PostgreSQL database");
}
