//! The PostgreSQL engine behind [`Storage`]. The only module that names
//! tokio-postgres.
//!
//! Layout: one table, `cloister_kv (space smallint, key bytea, value
//! bytea, primary key (space, key))`. PostgreSQL orders `bytea` byte by
//! byte, as sled orders its keys, so every scan of the contract is one
//! range of the primary-key index and each module keeps its own key layout
//! whatever the engine. Schema changes are numbered migrations
//! ([`MIGRATIONS`]) recorded in `cloister_migrations`; [`PgStorage::migrate`]
//! applies the missing ones and [`PgStorage::open`] refuses a database
//! whose schema is not this build's.
//!
//! **Any number of writing processes per environment** (unlike sled):
//! opening takes the environment's session advisory lock *shared* on a
//! dedicated connection, and every write of that open goes through that
//! same connection. Everything the host reads, changes and writes back is
//! written with [`Storage::commit_if`], checked inside the writing
//! transaction, so writers of different processes cannot undo each other;
//! work that must not run twice is claimed by holder
//! ([`Storage::holder`], a session lock of its own on the same connection).
//! `init` (with `create`) holds the lock alone, and `migrate` excludes
//! every open, so either is refused as [`StoreError::Busy`] while another
//! process has the database open. If the connection is lost (the server
//! restarted, the network failed) its locks are lost with it, and every
//! later write of that open fails: the environment must be reopened, which
//! re-reads everything. Reads use a small pool of other connections.
//! Beside the writers, any number of *readers* ([`PgStorage::open_reader`])
//! may have the database open; what they may write is the caller's rule.
//!
//! **Row tags.** The database is administered apart from the environment's
//! directory (which holds the keys), so every value is stored with an
//! HMAC-SHA256 tag over its space, key and value under a secret of the
//! environment (`keys/store-mac.key`), and every read checks it: a row
//! edited, forged or moved to another key in the database is reported as
//! [`StoreError::Corrupted`] and not used. A tag cannot show that a row was
//! deleted or put back to an earlier value of the same key; the audit log
//! catches that for its own entries (see `docs/SCALING.md`). Audit entries
//! and checkpoints are stored without a row tag: they carry their own, and
//! the audit log's checks name the entry that was changed.
//!
//! Durability: [`Storage::commit`] is one transaction committed with
//! `synchronous_commit` on (the server's WAL is flushed before it returns);
//! [`Storage::stage`] commits with it off; [`Storage::sync`] commits a
//! one-row write synchronously, which flushes the WAL up to and including
//! every staged commit before it.
//!
//! The client runs on this store's own two-thread Tokio runtime, and
//! callers wait on a channel, so the synchronous contract can be called
//! from any thread, including one of another runtime's workers.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config};

use super::pg_tls::{MakeRustls, client_config};
use super::wait_on;

use super::{
    Entry, Expect, Space, Storage, StoreError, Write, WriteBatch, check_expectations, prefix_end,
    printable_key,
};

/// The advisory-lock key an open environment holds (`"cloister"` in
/// ASCII). Advisory locks are per database: one environment per database.
const ENV_LOCK: i64 = 0x636c_6f69_7374_6572;
/// A different key for migrations, so `migrate` and `open` exclude each
/// other through [`ENV_LOCK`] while two migrations also exclude each other.
const MIGRATE_LOCK: i64 = ENV_LOCK + 1;
/// Held shared by every open store, the writer's and readers' (see
/// [`PgStorage::open_reader`]), and exclusively by `migrate`, so that no
/// schema changes under a process that has the database open.
const OPEN_LOCK: i64 = ENV_LOCK + 2;
/// Rows per page of a scan.
const PAGE: i64 = 512;
/// Most rows one statement of a commit carries.
const CHUNK: usize = 2048;
/// Most pooled read connections.
const POOL: usize = 8;

/// The schema, one migration per entry: (version, name, SQL). Append only;
/// never edit a released migration.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "key-value spaces",
        "CREATE TABLE cloister_kv (
         space smallint NOT NULL,
         key bytea NOT NULL,
         value bytea NOT NULL,
         PRIMARY KEY (space, key)
     );
     CREATE TABLE cloister_sync (id integer PRIMARY KEY, n bigint NOT NULL);
     INSERT INTO cloister_sync VALUES (1, 0);",
    ),
    (
        2,
        "work queue",
        "CREATE TABLE cloister_work (
         id bigserial PRIMARY KEY,
         kind text NOT NULL,
         input text NOT NULL,
         tag bytea NOT NULL,
         state text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
         owner text,
         lease_until timestamptz,
         attempts integer NOT NULL DEFAULT 0,
         max_attempts integer NOT NULL CHECK (max_attempts > 0),
         result text,
         result_tag bytea,
         error text,
         created timestamptz NOT NULL DEFAULT now(),
         finished timestamptz
     );
     CREATE INDEX cloister_work_open ON cloister_work (id) WHERE state IN ('queued', 'running');",
    ),
    (
        3,
        "work progress",
        "ALTER TABLE cloister_work ADD COLUMN progress text;",
    ),
    (
        4,
        "work objects kept",
        "CREATE TABLE cloister_work_objects (
         digest text PRIMARY KEY,
         tag bytea NOT NULL,
         keep_until timestamptz NOT NULL
     );
     CREATE INDEX cloister_work_objects_due ON cloister_work_objects (keep_until);",
    ),
];

/// The schema version this build reads and writes.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// A PostgreSQL connection string, parsed and checked, that prints without
/// its password.
///
/// Over TCP the connection is TLS with the server's certificate and name
/// verified (against the system's trust store, or a CA given with
/// [`PgUrl::with_ca`]), whatever `sslmode` says, unless it says
/// `sslmode=disable`: a missing or unverifiable TLS fails the connection
/// instead of falling back to plain text. A Unix socket is used without
/// TLS.
#[derive(Clone)]
pub struct PgUrl {
    config: Config,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl PgUrl {
    /// Trusts the PEM certificates in `pem` (and only them) for the
    /// server's certificate.
    pub fn with_ca(mut self, pem: &[u8]) -> Result<Self, StoreError> {
        self.tls = client_config(Some(pem))?;
        Ok(self)
    }

    fn over_tcp(&self) -> bool {
        self.config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Tcp(_)))
    }

    /// Whether the connection goes over TCP without TLS
    /// (`sslmode=disable`).
    pub fn plaintext(&self) -> bool {
        self.over_tcp() && self.config.get_ssl_mode() == SslMode::Disable
    }
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgUrl({self})")
    }
}

impl std::fmt::Display for PgUrl {
    /// `postgres://USER@HOST:PORT/DB`, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = self.config.get_user().unwrap_or("");
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self.config.get_dbname().unwrap_or("");
        write!(f, "postgres://{user}@{host}:{port}/{db}")?;
        if self.plaintext() {
            f.write_str(" (without TLS)")?;
        }
        Ok(())
    }
}

impl FromStr for PgUrl {
    type Err = StoreError;

    /// Accepts `postgres://` / `postgresql://` URLs and `key=value`
    /// strings. The error never repeats the input (it may hold a
    /// password).
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let mut config = Config::from_str(s)
            .map_err(|e| StoreError::Engine(format!("not a PostgreSQL connection string: {e}")))?;
        if config.get_hosts().is_empty() {
            return Err(StoreError::Engine(
                "the PostgreSQL connection string names no host (give host=… or postgres://HOST/…)"
                    .into(),
            ));
        }
        if config.get_dbname().is_none() {
            return Err(StoreError::Engine(
                "the PostgreSQL connection string names no database (give dbname=… or postgres://HOST/DB)"
                    .into(),
            ));
        }
        let tcp = config.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
        match config.get_ssl_mode() {
            SslMode::Disable => {}
            // Never a silent fall-back to plain text over a network.
            _ if tcp => {
                config.ssl_mode(SslMode::Require);
            }
            _ => {
                config.ssl_mode(SslMode::Disable);
            }
        }
        Ok(Self {
            config,
            tls: client_config(None)?,
        })
    }
}

/// [`Storage`] over one PostgreSQL database. See the module docs.
pub struct PgStorage {
    /// `Some` until dropped: a runtime must not be dropped on another
    /// runtime's thread, so `Drop` shuts it down in the background.
    rt: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Closes every connection; the server releases the lock when
            // it sees the writer's connection end.
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStorage({})", self.inner.url)
    }
}

struct Inner {
    url: PgUrl,
    tags: RowTags,
    /// The connection holding the locks ([`ENV_LOCK`] for a writer,
    /// [`OPEN_LOCK`] shared); every write uses it.
    writer: tokio::sync::Mutex<Writer>,
    idle: Mutex<Vec<Client>>,
    permits: Arc<tokio::sync::Semaphore>,
    /// The connection that holds [`Storage::exclusive`] locks (connected
    /// at first use), and the in-process turn to use it.
    locker: Mutex<Option<Arc<Client>>>,
    /// This open's holder id ([`Storage::holder`]): the key of a session
    /// advisory lock the writer connection holds.
    holder: u64,
}

/// The writer's connection and its statements, prepared at the first
/// write and reused: a statement given as text is prepared again at every
/// call, which costs a round trip of its own.
struct Writer {
    client: Client,
    statements: Option<Statements>,
}

#[derive(Clone)]
struct Statements {
    select: tokio_postgres::Statement,
    delete: tokio_postgres::Statement,
    upsert: tokio_postgres::Statement,
}

impl Writer {
    async fn statements(&mut self) -> Result<Statements, tokio_postgres::Error> {
        if let Some(s) = &self.statements {
            return Ok(s.clone());
        }
        let s = Statements {
            select: self
                .client
                .prepare("SELECT value FROM cloister_kv WHERE space = $1 AND key = $2")
                .await?,
            delete: self
                .client
                .prepare("DELETE FROM cloister_kv WHERE space = $1 AND key = ANY($2)")
                .await?,
            upsert: self
                .client
                .prepare(
                    "INSERT INTO cloister_kv (space, key, value)
                     SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v)
                     ON CONFLICT (space, key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await?,
        };
        self.statements = Some(s.clone());
        Ok(s)
    }
}

pub(crate) fn pg_err(url: &PgUrl) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
    move |e| {
        // The server ending the session (an administrator, a shutdown)
        // arrives as an error on the next statement, before the client
        // sees the connection closed: the lock is gone either way.
        let ended = e
            .as_db_error()
            .is_some_and(|d| matches!(d.code().code(), "57P01" | "57P02" | "57P03"));
        if e.is_closed() || ended {
            StoreError::Engine(format!(
                "the connection to {url} was lost; the environment holds no lock any more and must be reopened"
            ))
        } else {
            StoreError::Engine(format!("PostgreSQL at {url}: {}", describe(&e)))
        }
    }
}

/// The server's message when there is one (tokio-postgres's own text is
/// often just "db error").
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

pub(crate) async fn connect(url: &PgUrl) -> Result<Client, StoreError> {
    let (client, conn) = url
        .config
        .connect(MakeRustls {
            config: Arc::clone(&url.tls),
        })
        .await
        .map_err(|e| StoreError::Engine(format!("cannot connect to {url}: {}", describe(&e))))?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the
        // client then reports itself closed.
        let _ = conn.await;
    });
    Ok(client)
}

/// Length of a row tag (HMAC-SHA256).
const TAG_LEN: usize = 32;

/// Tags values with their space and key; see the module docs.
struct RowTags {
    key: ring::hmac::Key,
}

impl RowTags {
    fn message(space: i16, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(24 + key.len() + value.len());
        m.extend_from_slice(b"cloister-row\0");
        m.extend_from_slice(&space.to_be_bytes());
        m.extend_from_slice(&(key.len() as u64).to_be_bytes());
        m.extend_from_slice(key);
        m.extend_from_slice(value);
        m
    }

    /// Audit entries carry their own tags (with their sequence number and
    /// predecessor) and checkpoints their own signatures; the audit log's
    /// checks name the entry that was changed, so these rows are stored as
    /// they are.
    fn untagged(space: i16) -> bool {
        space == i16::from(Space::Audit.prefix()) || space == i16::from(Space::Checkpoints.prefix())
    }

    /// `value ‖ tag`.
    fn seal(&self, space: i16, key: &[u8], mut value: Vec<u8>) -> Vec<u8> {
        if Self::untagged(space) {
            return value;
        }
        let tag = ring::hmac::sign(&self.key, &Self::message(space, key, &value));
        value.extend_from_slice(tag.as_ref());
        value
    }

    /// The value, if its tag is this environment's for this space and key.
    fn open(
        &self,
        url: &PgUrl,
        space: i16,
        key: &[u8],
        mut stored: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        if Self::untagged(space) {
            return Ok(stored);
        }
        let bad = || {
            StoreError::Corrupted(format!(
                "row {}/{} at {url} does not carry this environment's tag: it was changed outside Cloister, or the database belongs to another environment",
                space_name(space),
                printable_key(key)
            ))
        };
        if stored.len() < TAG_LEN {
            return Err(bad());
        }
        let tag = stored.split_off(stored.len() - TAG_LEN);
        ring::hmac::verify(&self.key, &Self::message(space, key, &stored), &tag)
            .map_err(|_| bad())?;
        Ok(stored)
    }
}

fn space_name(space: i16) -> String {
    Space::ALL
        .iter()
        .find(|s| i16::from(s.prefix()) == space)
        .map_or_else(|| space.to_string(), |s| format!("{s:?}"))
}

/// Takes a session advisory lock on a fresh random key on `client` (the
/// connection every write goes through) and returns the key as this open's
/// holder id: alive exactly as long as that connection ([`Storage::holder_alive`]
/// looks for the lock in `pg_locks`).
async fn take_holder(client: &Client, url: &PgUrl) -> Result<u64, StoreError> {
    for _ in 0..16 {
        let holder = super::random_holder()?;
        let key = holder_key(holder);
        if [ENV_LOCK, MIGRATE_LOCK, OPEN_LOCK].contains(&key) {
            continue;
        }
        let taken: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(pg_err(url))?
            .get(0);
        if taken {
            return Ok(holder);
        }
    }
    Err(StoreError::Engine(
        "could not take a holder lock: 16 random keys were all in use".into(),
    ))
}

/// The advisory-lock key of holder id `holder`.
fn holder_key(holder: u64) -> i64 {
    i64::from_be_bytes(holder.to_be_bytes())
}

/// How long `open` waits for the environment lock of a process that has
/// just ended (the server releases it when it notices the connection end).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the advisory lock `key` on `client`'s session (shared or
/// exclusive), waiting up to [`LOCK_WAIT`]; whether it was taken.
async fn try_lock(
    client: &Client,
    url: &PgUrl,
    key: i64,
    shared: bool,
) -> Result<bool, StoreError> {
    let sql = if shared {
        "SELECT pg_try_advisory_lock_shared($1)"
    } else {
        "SELECT pg_try_advisory_lock($1)"
    };
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        let locked: bool = client
            .query_one(sql, &[&key])
            .await
            .map_err(pg_err(url))?
            .get(0);
        if locked || start.elapsed() >= LOCK_WAIT {
            return Ok(locked);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(200));
    }
}

async fn apply_migrations(client: &mut Client, url: &PgUrl) -> Result<Vec<i32>, StoreError> {
    let err = pg_err(url);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(&err)?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS cloister_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(&err)?;
    let have = current_version(client, url).await?;
    if have > schema_version() {
        return Err(newer_schema(url, have));
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
        let tx = client.transaction().await.map_err(&err)?;
        tx.batch_execute(sql).await.map_err(&err)?;
        tx.execute(
            "INSERT INTO cloister_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        applied.push(*version);
    }
    Ok(applied)
}

/// The schema version recorded in the database (0 before any migration).
pub(crate) async fn current_version(client: &Client, url: &PgUrl) -> Result<i32, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('cloister_migrations') IS NOT NULL", &[])
        .await
        .map_err(pg_err(url))?
        .get::<_, bool>(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM cloister_migrations",
            &[],
        )
        .await
        .map_err(pg_err(url))?;
    Ok(row.get::<_, i32>(0))
}

impl PgStorage {
    fn runtime() -> Result<tokio::runtime::Runtime, StoreError> {
        super::client_runtime("cloister-pg", 2)
    }

    /// Applies every migration the database lacks, in order, each in its
    /// own transaction; returns the versions applied. Refused while an
    /// environment has the database open.
    pub fn migrate(url: &PgUrl) -> Result<Vec<i32>, StoreError> {
        let rt = Self::runtime()?;
        let url = url.clone();
        let out = wait_on(&rt, async move {
            let mut client = connect(&url).await?;
            if !try_lock(&client, &url, ENV_LOCK, false).await?
                || !try_lock(&client, &url, OPEN_LOCK, false).await?
            {
                let _ = client.execute("SELECT pg_advisory_unlock_all()", &[]).await;
                return Err(StoreError::Busy);
            }
            let out = apply_migrations(&mut client, &url).await;
            // Released now, not when the server notices the connection
            // end, so an `open` right after finds the lock free.
            let _ = client.execute("SELECT pg_advisory_unlock_all()", &[]).await;
            out
        });
        rt.shutdown_background();
        out
    }

    /// Opens the database. With `create`, the schema is migrated first and
    /// the database must hold no environment yet (an empty `cloister_kv`);
    /// without it, the schema must be exactly this build's. `row_secret`
    /// keys the row tags (at least 32 bytes).
    pub fn open(url: &PgUrl, create: bool, row_secret: &[u8]) -> Result<Self, StoreError> {
        Self::open_as(url, create, false, row_secret)
    }

    /// Opens the database beside the process that has it open for writing:
    /// a *reader* takes no write lock, only the shared lock that keeps
    /// `migrate` out, so any number of readers and one writer share the
    /// database. The store does not restrict what a reader writes; the
    /// caller does (the environment lets a reader append to the audit log
    /// and nothing else, through [`Storage::commit_if`], which is safe
    /// across processes).
    pub fn open_reader(url: &PgUrl, row_secret: &[u8]) -> Result<Self, StoreError> {
        Self::open_as(url, false, true, row_secret)
    }

    fn open_as(
        url: &PgUrl,
        create: bool,
        reader: bool,
        row_secret: &[u8],
    ) -> Result<Self, StoreError> {
        if row_secret.len() < 32 {
            return Err(StoreError::Engine(
                "the row-tag secret must be at least 32 bytes".into(),
            ));
        }
        if create {
            Self::migrate(url)?;
        }
        let rt = Self::runtime()?;
        let url2 = url.clone();
        let writer = wait_on(&rt, async move {
            let url = url2;
            let client = connect(&url).await?;
            // Writers share the environment lock (what one writer does is
            // safe from another: see the module docs); `init` holds it
            // alone, so that no process opens a half-made environment.
            let locked = (reader || try_lock(&client, &url, ENV_LOCK, !create).await?)
                && try_lock(&client, &url, OPEN_LOCK, true).await?;
            if !locked {
                return Err(StoreError::Busy);
            }
            let holder = take_holder(&client, &url).await?;
            let have = current_version(&client, &url).await?;
            if have == 0 {
                return Err(StoreError::Engine(format!(
                    "no store at {url} (the database has no Cloister schema; create an environment with `cloister init --store`)"
                )));
            }
            if have > schema_version() {
                return Err(newer_schema(&url, have));
            }
            if have < schema_version() {
                return Err(StoreError::Engine(format!(
                    "the store at {url} has schema version {have}, this build needs {}; run `cloister migrate`",
                    schema_version()
                )));
            }
            if create {
                let used: bool = client
                    .query_one("SELECT EXISTS (SELECT 1 FROM cloister_kv)", &[])
                    .await
                    .map_err(pg_err(&url))?
                    .get(0);
                if used {
                    return Err(StoreError::Engine(format!(
                        "the database at {url} already holds a Cloister environment; give `cloister init` an empty database"
                    )));
                }
            }
            Ok::<_, StoreError>((client, holder))
        });
        let (writer, holder) = match writer {
            Ok(w) => w,
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(Self {
            rt: Some(rt),
            inner: Arc::new(Inner {
                url: url.clone(),
                tags: RowTags {
                    key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, row_secret),
                },
                writer: tokio::sync::Mutex::new(Writer {
                    client: writer,
                    statements: None,
                }),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(POOL)),
                locker: Mutex::new(None),
                holder,
            }),
        })
    }

    /// Runs `f` on this store's runtime and waits for it. Safe to call from
    /// any thread, including another runtime's worker (the caller only
    /// blocks on a channel).
    fn run<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Engine("the PostgreSQL client stopped".into()))?;
        wait_on(rt, f(Arc::clone(&self.inner)))
    }

    /// A read query on a pooled connection.
    fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>, Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.run(move |inner| async move {
            let _permit = Arc::clone(&inner.permits)
                .acquire_owned()
                .await
                .map_err(|_| StoreError::Engine("the PostgreSQL pool is closed".into()))?;
            let pooled = inner.idle.lock().map_err(|_| poisoned())?.pop();
            let client = match pooled {
                Some(c) if !c.is_closed() => c,
                _ => connect(&inner.url).await?,
            };
            let client = Arc::new(client);
            let out = f(Arc::clone(&inner), Arc::clone(&client)).await;
            if let Ok(client) = Arc::try_unwrap(client)
                && !client.is_closed()
            {
                inner.idle.lock().map_err(|_| poisoned())?.push(client);
            }
            out
        })
    }

    /// Writes `batch` in one transaction on the lock-holding connection;
    /// with expectations, a `REPEATABLE READ` one that first checks them
    /// (see [`Storage::commit_if`]).
    ///
    /// Why that is enough across processes: every expected key is also
    /// written, and under `REPEATABLE READ` PostgreSQL refuses to update
    /// or upsert a row that another transaction changed after this one's
    /// snapshot (SQLSTATE 40001), so a write that lands between the check
    /// and the commit fails this transaction instead of being lost. Two
    /// inserts of a key expected absent collide on the primary key
    /// (23505). Both become [`StoreError::Conflict`].
    fn write(
        &self,
        batch: WriteBatch,
        durable: bool,
        expect: Vec<Expect>,
    ) -> Result<(), StoreError> {
        // The last write to a key wins, as it would applied in order; what
        // is left is disjoint puts and deletes per space.
        let mut last: BTreeMap<(u8, Vec<u8>), Option<Vec<u8>>> = BTreeMap::new();
        for w in batch.writes {
            match w {
                Write::Put(s, k, v) => last.insert((s.prefix(), k), Some(v)),
                Write::Delete(s, k) => last.insert((s.prefix(), k), None),
            };
        }
        let mut per_space: BTreeMap<i16, SpaceWrites> = BTreeMap::new();
        for ((space, key), value) in last {
            let space = i16::from(space);
            let slot = per_space.entry(space).or_default();
            match value {
                Some(v) => {
                    slot.1.push(self.inner.tags.seal(space, &key, v));
                    slot.0.push(key);
                }
                None => slot.2.push(key),
            }
        }
        self.run(move |inner| async move {
            let plain = pg_err(&inner.url);
            // A refused serialization names the first expected key.
            let first = expect.first();
            let err = |e: tokio_postgres::Error| {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                match (first, code.as_deref()) {
                    (Some(x), Some("40001" | "23505")) => x.conflict(),
                    _ => plain(e),
                }
            };
            let mut writer = inner.writer.lock().await;
            let statements = writer.statements().await.map_err(err)?;
            let tx = if expect.is_empty() {
                writer.client.transaction().await.map_err(err)?
            } else {
                writer
                    .client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .start()
                    .await
                    .map_err(err)?
            };
            for e in &expect {
                let space = i16::from(e.space.prefix());
                let row = tx
                    .query_opt(&statements.select, &[&space, &e.key])
                    .await
                    .map_err(err)?;
                let now = row
                    .map(|r| inner.tags.open(&inner.url, space, &e.key, r.get(0)))
                    .transpose()?;
                if now != e.value {
                    // Dropping the transaction rolls it back.
                    return Err(e.conflict());
                }
            }
            if !durable {
                tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
                    .await
                    .map_err(&err)?;
            }
            for (space, (put_keys, put_values, deletes)) in &per_space {
                for keys in deletes.chunks(CHUNK) {
                    tx.execute(&statements.delete, &[space, &keys])
                        .await
                        .map_err(&err)?;
                }
                for (keys, values) in put_keys.chunks(CHUNK).zip(put_values.chunks(CHUNK)) {
                    tx.execute(&statements.upsert, &[space, &keys, &values])
                        .await
                        .map_err(&err)?;
                }
            }
            tx.commit().await.map_err(&err)
        })
    }

    fn page(&self, space: Space, from: Vec<u8>, inclusive: bool, end: Option<Vec<u8>>) -> Page {
        let space = i16::from(space.prefix());
        let rows = self.read(move |inner, client| async move {
            let op = if inclusive { ">=" } else { ">" };
            let rows = match &end {
                Some(end) => {
                    client
                        .query(
                            &format!(
                                "SELECT key, value FROM cloister_kv WHERE space = $1 AND key {op} $2 AND key < $3 ORDER BY key LIMIT $4"
                            ),
                            &[&space, &from, end, &PAGE],
                        )
                        .await
                }
                None => {
                    client
                        .query(
                            &format!(
                                "SELECT key, value FROM cloister_kv WHERE space = $1 AND key {op} $2 ORDER BY key LIMIT $3"
                            ),
                            &[&space, &from, &PAGE],
                        )
                        .await
                }
            }
            .map_err(pg_err(&inner.url))?;
            rows.into_iter()
                .map(|r| {
                    let key: Vec<u8> = r.get(0);
                    let value = inner.tags.open(&inner.url, space, &key, r.get(1))?;
                    Ok((key, value))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        Page { rows }
    }

    fn scan_range(
        &self,
        space: Space,
        from: Vec<u8>,
        end: Option<Vec<u8>>,
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_> {
        Box::new(Scan {
            store: self,
            space,
            next_from: Some((from, true)),
            end,
            buffer: std::collections::VecDeque::new(),
        })
    }
}

fn newer_schema(url: &PgUrl, have: i32) -> StoreError {
    StoreError::Engine(format!(
        "the store at {url} has schema version {have}, newer than this build's {}; use a newer cloister",
        schema_version()
    ))
}

/// One space's share of a batch: put keys, their sealed values, deletes.
type SpaceWrites = (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Vec<u8>>);

fn poisoned() -> StoreError {
    StoreError::Engine("the PostgreSQL pool lock is poisoned".into())
}

struct Page {
    rows: Result<Vec<Entry>, StoreError>,
}

/// A scan read one page at a time; each page continues after the last key
/// of the one before.
struct Scan<'a> {
    store: &'a PgStorage,
    space: Space,
    next_from: Option<(Vec<u8>, bool)>,
    end: Option<Vec<u8>>,
    buffer: std::collections::VecDeque<Entry>,
}

impl Iterator for Scan<'_> {
    type Item = Result<Entry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.buffer.pop_front() {
            return Some(Ok(e));
        }
        let (from, inclusive) = self.next_from.take()?;
        match self
            .store
            .page(self.space, from, inclusive, self.end.clone())
            .rows
        {
            Err(e) => Some(Err(e)),
            Ok(rows) => {
                if rows.len() as i64 == PAGE
                    && let Some(last) = rows.last()
                {
                    self.next_from = Some((last.0.clone(), false));
                }
                self.buffer.extend(rows);
                self.buffer.pop_front().map(Ok)
            }
        }
    }
}

impl Storage for PgStorage {
    fn holder(&self) -> u64 {
        self.inner.holder
    }

    fn holder_alive(&self, holder: u64) -> Result<bool, StoreError> {
        if holder == self.inner.holder {
            return Ok(true);
        }
        // A bigint advisory key shows in pg_locks as its high and low 32
        // bits (classid, objid) with objsubid 1.
        let key = holder_key(holder).to_be_bytes();
        let high = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        let low = u32::from_be_bytes([key[4], key[5], key[6], key[7]]);
        self.read(move |inner, client| async move {
            let row = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks
                       WHERE locktype = 'advisory' AND granted AND objsubid = 1
                         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                         AND classid = $1 AND objid = $2)",
                    &[&high, &low],
                )
                .await
                .map_err(pg_err(&inner.url))?;
            Ok(row.get::<_, bool>(0))
        })
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let space = i16::from(space.prefix());
        let key = key.to_vec();
        self.read(move |inner, client| async move {
            let row = client
                .query_opt(
                    "SELECT value FROM cloister_kv WHERE space = $1 AND key = $2",
                    &[&space, &key],
                )
                .await
                .map_err(pg_err(&inner.url))?;
            row.map(|r| inner.tags.open(&inner.url, space, &key, r.get(0)))
                .transpose()
        })
    }

    fn scan(
        &self,
        space: Space,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_> {
        self.scan_range(space, prefix.to_vec(), prefix_end(prefix))
    }

    fn scan_from(
        &self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + Send + '_> {
        self.scan_range(space, from.to_vec(), None)
    }

    fn last(&self, space: Space, prefix: &[u8]) -> Result<Option<Entry>, StoreError> {
        let space = i16::from(space.prefix());
        let from = prefix.to_vec();
        let end = prefix_end(prefix);
        self.read(move |inner, client| async move {
            let row = match &end {
                Some(end) => {
                    client
                        .query_opt(
                            "SELECT key, value FROM cloister_kv WHERE space = $1 AND key >= $2 AND key < $3 ORDER BY key DESC LIMIT 1",
                            &[&space, &from, end],
                        )
                        .await
                }
                None => {
                    client
                        .query_opt(
                            "SELECT key, value FROM cloister_kv WHERE space = $1 AND key >= $2 ORDER BY key DESC LIMIT 1",
                            &[&space, &from],
                        )
                        .await
                }
            }
            .map_err(pg_err(&inner.url))?;
            row.map(|r| {
                let key: Vec<u8> = r.get(0);
                let value = inner.tags.open(&inner.url, space, &key, r.get(1))?;
                Ok((key, value))
            })
            .transpose()
        })
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write(batch, true, Vec::new())
    }

    fn commit_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError> {
        check_expectations(expect, &batch)?;
        self.write(batch, true, expect.to_vec())
    }

    /// A session advisory lock on a connection of its own (so that waiting
    /// for it holds up no other statement of this process), keyed by the
    /// first 8 bytes of the SHA-256 of `name`. If that connection is lost
    /// while `f` runs, the lock is lost with it; [`Storage::commit_if`]
    /// still keeps `f`'s writes correct.
    fn exclusive(
        &self,
        name: &str,
        f: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut turn = self.inner.locker.lock().map_err(|_| poisoned())?;
        let client = match turn.as_ref() {
            Some(c) if !c.is_closed() => Arc::clone(c),
            _ => {
                let c = Arc::new(self.run(|inner| async move { connect(&inner.url).await })?);
                *turn = Some(Arc::clone(&c));
                c
            }
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        let key = i64::from_be_bytes(first);
        let locking = Arc::clone(&client);
        self.run(move |inner| async move {
            locking
                .execute("SELECT pg_advisory_lock($1)", &[&key])
                .await
                .map_err(pg_err(&inner.url))
                .map(|_| ())
        })?;
        let out = f();
        let unlocked = self.run(move |inner| async move {
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&key])
                .await
                .map_err(pg_err(&inner.url))
                .map(|_| ())
        });
        drop(turn);
        out.and(unlocked)
    }

    fn stage(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write(batch, false, Vec::new())
    }

    fn stage_if(&self, expect: &[Expect], batch: WriteBatch) -> Result<(), StoreError> {
        check_expectations(expect, &batch)?;
        self.write(batch, false, expect.to_vec())
    }

    /// A round trip on the writer connection: fails once the connection
    /// (and with it the environment lock) is lost.
    fn health(&self) -> Result<(), StoreError> {
        self.run(|inner| async move {
            let writer = inner.writer.lock().await;
            writer
                .client
                .simple_query("SELECT 1")
                .await
                .map_err(pg_err(&inner.url))?;
            Ok(())
        })
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.run(|inner| async move {
            let err = pg_err(&inner.url);
            let writer = inner.writer.lock().await;
            writer
                .client
                .execute("UPDATE cloister_sync SET n = n + 1 WHERE id = 1", &[])
                .await
                .map_err(&err)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print_without_their_password() -> Result<(), StoreError> {
        let u: PgUrl = "postgres://ana:s3cret@db.example:6543/cloister".parse()?;
        assert_eq!(u.to_string(), "postgres://ana@db.example:6543/cloister");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u: PgUrl = "host=/run/pg user=x dbname=y password=hunter2".parse()?;
        assert_eq!(u.to_string(), "postgres://x@/run/pg:5432/y");
        let e = "postgres://a:hunter2@h".parse::<PgUrl>().unwrap_err();
        assert!(e.to_string().contains("no database"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        let e = "host=h dbname=d bogus=hunter2"
            .parse::<PgUrl>()
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        Ok(())
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let mut last = 0;
        for (v, _, _) in MIGRATIONS {
            assert_eq!(*v, last + 1);
            last = *v;
        }
        assert_eq!(schema_version(), last);
    }
}
