//! An environment on disk: one directory, opened once as a cap-std [`Dir`];
//! every file inside is reached through that handle, so no crafted name can
//! step outside it.
//!
//! ```text
//! DIR/                 0700
//!   cloister.toml      0600; the environment id and its store (`env_config`)
//!   store/             the sled database (opened by path: sled needs one);
//!                      absent when the store is a PostgreSQL database
//!   keys/              0700; each key file 0600
//!     audit-signing.pk8    Ed25519 key for checkpoints (PKCS#8)
//!     audit-mac.key        HMAC secret for audit entries
//!     cache.key            HMAC secret for compiled-plugin artifacts
//!     store-mac.key        HMAC secret for the rows of a PostgreSQL store
//!   policies/          the active Cedar schema and policy set
//!   limits.toml        resource limits set by an administrator (optional)
//!   cache/             compiled plugin artifacts
//!   datasets/          one segment file per dataset version (0600)
//!   tmp/               scratch files of imports in progress
//! ```
//!
//! `init` builds the whole tree in a sibling temporary directory and renames
//! it into place, so a failed `init` leaves nothing behind.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, DirBuilder, DirBuilderExt, OpenOptions, OpenOptionsExt};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use crate::audit::{AuditError, AuditKeys, AuditLog};
use crate::env_config::{
    CONFIG_FILE, EnvConfig, InitOptions, STORE_CA_FILE, StoreLocation, WORK_KEY_FILE,
};
use crate::limits::{DEFAULT_LIMITS_TOML, EnvLimits, LIMITS_FILE};
use crate::policy::{DEFAULT_POLICIES, DEFAULT_SCHEMA, PolicyEngine, PolicyError, SCHEMA_FILE};
use crate::store::objects::Objects;
use crate::store::{PgStorage, SledStorage, Space, Storage, StoreError, WriteBatch};

/// On-disk format version of an environment.
pub const FORMAT_VERSION: &str = "cloister-env 1";
const FORMAT_KEY: &[u8] = b"format";
const ID_KEY: &[u8] = b"env-id";
const SIGNING_KEY_FILE: &str = "keys/audit-signing.pk8";
const MAC_KEY_FILE: &str = "keys/audit-mac.key";
const CACHE_KEY_FILE: &str = "keys/cache.key";
const STORE_KEY_FILE: &str = "keys/store-mac.key";

/// A signed checkpoint is stored every this many audit entries.
pub const CHECKPOINT_EVERY: u64 = 1024;

/// Errors opening or creating an environment.
#[derive(Debug, Error)]
pub enum EnvError {
    /// `init` refuses to touch an existing path.
    #[error("{0} already exists; `cloister init` only creates new environments")]
    Exists(PathBuf),
    /// There is no environment at the path.
    #[error("{0} is not a cloister environment (create one with `cloister init`)")]
    NotAnEnvironment(PathBuf),
    /// The environment is of another format version.
    #[error(
        "{path}: unsupported environment format `{found}` (this build reads `{FORMAT_VERSION}`)"
    )]
    Format {
        /// The environment.
        path: PathBuf,
        /// What it says.
        found: String,
    },
    /// A file of the environment could not be read or written. (The I/O
    /// error is part of the message, not a separate source, so a chain of
    /// errors prints it once.)
    #[error("{file}: {error}")]
    File {
        /// Path relative to the environment (or, while creating one, the
        /// path given).
        file: String,
        /// The error.
        error: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The active policies do not load.
    #[error("the environment's policies are invalid: {0}")]
    Policy(#[from] PolicyError),
    /// Creating the first admin failed.
    #[error(transparent)]
    User(#[from] crate::users::UserError),
    /// The system random source failed.
    #[error("the system random number generator failed")]
    Random,
    /// `cloister.toml` is malformed, or names another environment's store.
    #[error("{CONFIG_FILE}: {0}")]
    Config(String),
    /// `limits.toml` is malformed.
    #[error("{file}: {message}")]
    Limits {
        /// The file, relative to the environment.
        file: &'static str,
        /// What is wrong, with line and field.
        message: String,
    },
}

fn file_err(file: &str) -> impl FnOnce(std::io::Error) -> EnvError + '_ {
    move |error| EnvError::File {
        file: file.to_string(),
        error,
    }
}

/// `n` random bytes from the system source.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, EnvError> {
    let mut buf = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| EnvError::Random)?;
    Ok(buf)
}

/// An open environment.
#[derive(Debug)]
pub struct Environment {
    path: PathBuf,
    dir: Dir,
    id: String,
    store: Arc<dyn Storage>,
    audit: AuditLog,
    policy: PolicyEngine,
    /// Whether opening rewrote the schema's reference copy (audited by
    /// `Cloister::open`).
    schema_refreshed: bool,
    cache_secret: Vec<u8>,
    limits: EnvLimits,
    location: StoreLocation,
    objects: Option<Objects>,
    workers: Option<crate::workers::Workers>,
}

/// The work-queue secret: read, or made on first use (an environment
/// created before workers existed, or whose `[workers]` was enabled
/// later).
pub(crate) fn work_key(dir: &Dir) -> Result<Vec<u8>, EnvError> {
    match dir.read(WORK_KEY_FILE) {
        Ok(k) => Ok(k),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = random_bytes(32)?;
            write_secret(dir, WORK_KEY_FILE, &k)?;
            Ok(k)
        }
        Err(e) => Err(file_err(WORK_KEY_FILE)(e)),
    }
}

fn write_secret(dir: &Dir, name: &str, bytes: &[u8]) -> Result<(), EnvError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true).mode(0o600);
    let mut f = dir.open_with(name, &opts).map_err(file_err(name))?;
    f.write_all(bytes).map_err(file_err(name))?;
    f.sync_all().map_err(file_err(name))?;
    Ok(())
}

/// `cloister.toml`, or `None` for an environment made before it existed
/// (sled).
fn read_config(dir: &Dir) -> Result<Option<EnvConfig>, EnvError> {
    EnvConfig::read(dir).map_err(EnvError::Config)
}

fn sync_dir(dir: &Dir, name: &str) -> Result<(), EnvError> {
    dir.open(name)
        .and_then(|f| f.sync_all())
        .map_err(file_err(name))
}

impl Environment {
    /// Creates a new environment at `path` and returns it open, together
    /// with the first admin's API token (shown once; only its hash is kept).
    pub fn init(path: &Path, admin: &str) -> Result<(Self, String), EnvError> {
        Self::init_with(path, admin, "sled")
    }

    /// [`Environment::init`] with its store: `sled` (embedded, in
    /// `DIR/store`) or a `postgres://` URL naming an empty database.
    pub fn init_with(path: &Path, admin: &str, store: &str) -> Result<(Self, String), EnvError> {
        Self::init_with_options(
            path,
            admin,
            &InitOptions {
                store: store.to_string(),
                ..InitOptions::default()
            },
        )
    }

    /// [`Environment::init`] with its storage set up as `options` say: the
    /// store, the CA trusted for a database server (copied into the
    /// environment as `store-ca.pem`), an object store for bulk bytes.
    pub fn init_with_options(
        path: &Path,
        admin: &str,
        options: &InitOptions,
    ) -> Result<(Self, String), EnvError> {
        let store = options.store.as_str();
        let ca_pem = options.store_ca.as_deref();
        if options.workers && (options.objects.is_none() || !store.starts_with("postgres")) {
            return Err(EnvError::Config(
                "--workers needs a postgres store (--store) and an object store (--objects)".into(),
            ));
        }
        if let Some(url) = &options.objects {
            Objects::open(url)?;
        }
        let mut location = StoreLocation::parse(store)?;
        if let (StoreLocation::Postgres(url), Some(pem)) = (&mut location, ca_pem) {
            **url = (**url).clone().with_ca(pem)?;
        }
        if path.exists() {
            return Err(EnvError::Exists(path.to_path_buf()));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| EnvError::NotAnEnvironment(path.to_path_buf()))?
            .to_string_lossy()
            .into_owned();
        if !parent.is_dir() {
            return Err(EnvError::File {
                file: path.display().to_string(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("the parent directory {} does not exist", parent.display()),
                ),
            });
        }
        let staging = parent.join(format!(".{name}.init-{}", hex::encode(random_bytes(6)?)));
        let result = Self::build(&staging, admin, &location, options);
        let token = match result {
            Ok(token) => token,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let shown = path.display().to_string();
        std::fs::rename(&staging, path).map_err(file_err(&shown))?;
        let parent_shown = parent.display().to_string();
        std::fs::File::open(&parent)
            .and_then(|f| f.sync_all())
            .map_err(file_err(&parent_shown))?;
        Ok((Self::open(path)?, token))
    }

    fn build(
        staging: &Path,
        admin: &str,
        location: &StoreLocation,
        options: &InitOptions,
    ) -> Result<String, EnvError> {
        let ca_pem = options.store_ca.as_deref();
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(staging)
                .map_err(file_err(&staging.display().to_string()))?;
        }
        let dir = Dir::open_ambient_dir(staging, ambient_authority()).map_err(file_err("."))?;
        let mut private = DirBuilder::new();
        private.mode(0o700);
        for d in ["keys", "policies", "cache", "datasets", "tmp"] {
            dir.create_dir_with(d, &private).map_err(file_err(d))?;
        }
        let rng = SystemRandom::new();
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| EnvError::Random)?;
        write_secret(&dir, SIGNING_KEY_FILE, pkcs8.as_ref())?;
        write_secret(&dir, MAC_KEY_FILE, &random_bytes(32)?)?;
        write_secret(&dir, CACHE_KEY_FILE, &random_bytes(32)?)?;
        let store_secret = random_bytes(32)?;
        write_secret(&dir, STORE_KEY_FILE, &store_secret)?;
        write_secret(&dir, WORK_KEY_FILE, &random_bytes(32)?)?;
        dir.write(format!("policies/{SCHEMA_FILE}"), DEFAULT_SCHEMA)
            .map_err(file_err("policies"))?;
        dir.write("policies/default.cedar", DEFAULT_POLICIES)
            .map_err(file_err("policies"))?;
        dir.write(LIMITS_FILE, DEFAULT_LIMITS_TOML)
            .map_err(file_err(LIMITS_FILE))?;
        for d in ["keys", "policies", "cache", "datasets", "tmp"] {
            sync_dir(&dir, d)?;
        }
        let id = format!("env-{}", hex::encode(random_bytes(8)?));
        if let Some(pem) = ca_pem {
            write_secret(&dir, STORE_CA_FILE, pem)?;
        }
        let config = EnvConfig::render(
            &id,
            &options.store,
            ca_pem.map(|_| STORE_CA_FILE),
            options.objects.as_deref(),
            options
                .workers
                .then(crate::env_config::WorkersConfig::enabled)
                .as_ref(),
        );
        write_secret(&dir, CONFIG_FILE, config.as_bytes())?;
        let store: Box<dyn Storage> = match location {
            StoreLocation::Sled => Box::new(SledStorage::open(&staging.join("store"), true)?),
            StoreLocation::Postgres(url) => Box::new(PgStorage::open(url, true, &store_secret)?),
        };
        let mut b = WriteBatch::new();
        b.put(
            Space::Meta,
            FORMAT_KEY.to_vec(),
            FORMAT_VERSION.as_bytes().to_vec(),
        );
        b.put(Space::Meta, ID_KEY.to_vec(), id.into_bytes());
        let token = crate::users::bootstrap_admin_batch(&*store, admin, &mut b)?;
        // One commit: a database is either empty or holds a whole
        // environment, so a failed `init` can be run again.
        store.commit(b)?;
        drop(store);
        sync_dir(&dir, ".")?;
        Ok(token)
    }

    /// Opens an existing environment.
    pub fn open(path: &Path) -> Result<Self, EnvError> {
        Self::open_as(path, false)
    }

    /// Opens an existing environment to read it beside the process that has
    /// it open (a `serve`, a job): on PostgreSQL, as a reader of the
    /// database, whose only writes are audit appends (every operation is
    /// recorded, reads too); anything else it tries to write is refused.
    /// A sled store admits one process, so there this opens it as
    /// [`Environment::open`] does, with the same restriction. Opening to
    /// read changes nothing: the schema copy in `policies/` is left as it
    /// is, for the writer to refresh.
    pub fn open_reader(path: &Path) -> Result<Self, EnvError> {
        Self::open_as(path, true)
    }

    fn open_as(path: &Path, reader: bool) -> Result<Self, EnvError> {
        let dir = Dir::open_ambient_dir(path, ambient_authority())
            .map_err(|_| EnvError::NotAnEnvironment(path.to_path_buf()))?;
        let config = read_config(&dir)?;
        let mut location = config
            .as_ref()
            .map_or(StoreLocation::Sled, |c| c.store.clone());
        if let (StoreLocation::Postgres(url), Some(name)) = (
            &mut location,
            config.as_ref().and_then(|c| c.ca_file.as_deref()),
        ) {
            let pem = dir.read(name).map_err(file_err(name))?;
            **url = (**url).clone().with_ca(&pem)?;
        }
        let has_store = match location {
            StoreLocation::Sled => dir.exists("store"),
            StoreLocation::Postgres(_) => true,
        };
        if !has_store || !dir.exists("keys") {
            return Err(EnvError::NotAnEnvironment(path.to_path_buf()));
        }
        let pkcs8 = dir
            .read(SIGNING_KEY_FILE)
            .map_err(file_err(SIGNING_KEY_FILE))?;
        let mac = dir.read(MAC_KEY_FILE).map_err(file_err(MAC_KEY_FILE))?;
        let cache_secret = dir.read(CACHE_KEY_FILE).map_err(file_err(CACHE_KEY_FILE))?;
        let keys = Arc::new(AuditKeys::new(&pkcs8, &mac)?);
        let policy = Self::load_policies(&dir)?;
        let limits = Self::load_limits(&dir)?;
        let objects = config
            .as_ref()
            .and_then(|c| c.objects.as_deref())
            .map(Objects::open)
            .transpose()?;
        let workers = match (&location, &config, &objects) {
            _ if reader => None,
            (StoreLocation::Postgres(url), Some(c), Some(_)) => match c.workers.clone() {
                Some(w) => Some(crate::workers::Workers::connect(url, w, &work_key(&dir)?)?),
                None => None,
            },
            _ => None,
        };
        let store: Arc<dyn Storage> = match &location {
            StoreLocation::Sled => Arc::new(SledStorage::open(&path.join("store"), false)?),
            StoreLocation::Postgres(url) => {
                let secret = dir.read(STORE_KEY_FILE).map_err(file_err(STORE_KEY_FILE))?;
                if reader {
                    Arc::new(PgStorage::open_reader(url, &secret)?)
                } else {
                    Arc::new(PgStorage::open(url, false, &secret)?)
                }
            }
        };
        let store = if reader {
            Arc::new(crate::audit::AuditOnly::new(store))
        } else {
            store
        };
        // Several processes may open at once (on PostgreSQL): each writes
        // its own temporary file, and the rename is atomic.
        let schema_refreshed = !reader && refresh_schema(&dir)?;
        let format = match (store.get(Space::Meta, FORMAT_KEY), &config) {
            (Err(StoreError::Corrupted(_)), Some(config)) => {
                return Err(EnvError::Config(format!(
                    "this directory is environment {}, but its store ({location}) does not carry its tags: the database belongs to another environment, or its rows were changed outside Cloister",
                    config.environment
                )));
            }
            (read, _) => read?.unwrap_or_default(),
        };
        if format != FORMAT_VERSION.as_bytes() {
            return Err(EnvError::Format {
                path: path.to_path_buf(),
                found: String::from_utf8_lossy(&format).into_owned(),
            });
        }
        let id = String::from_utf8_lossy(&store.get(Space::Meta, ID_KEY)?.unwrap_or_default())
            .into_owned();
        if let Some(config) = &config
            && config.environment != id
        {
            return Err(EnvError::Config(format!(
                "this directory is environment {}, but its store ({location}) holds environment {id}",
                config.environment
            )));
        }
        let audit = AuditLog::open(Arc::clone(&store), keys, &id, CHECKPOINT_EVERY)?;
        let env = Self {
            path: path.to_path_buf(),
            dir,
            id,
            store,
            audit,
            policy,
            cache_secret,
            limits,
            schema_refreshed,
            location,
            objects,
            workers,
        };
        Ok(env)
    }

    /// Applies the store's missing schema migrations (PostgreSQL; a sled
    /// store has none) and returns the versions applied. Refused while a
    /// process has the environment open.
    pub fn migrate(path: &Path) -> Result<Vec<i32>, EnvError> {
        let dir = Dir::open_ambient_dir(path, ambient_authority())
            .map_err(|_| EnvError::NotAnEnvironment(path.to_path_buf()))?;
        match read_config(&dir)?.map(|c| c.store) {
            None | Some(StoreLocation::Sled) => Ok(Vec::new()),
            Some(StoreLocation::Postgres(url)) => Ok(PgStorage::migrate(&url)?),
        }
    }

    /// Moves an environment's state from its sled store to an empty
    /// PostgreSQL database (`cloister move-store`), with the environment
    /// closed. Everything is copied in one transaction and compared entry
    /// by entry before `cloister.toml` is switched to the database; the
    /// sled store is then renamed `store.moved` (kept until the operator
    /// deletes it). A failure before the switch leaves the environment on
    /// sled as it was; the database stays empty unless the copy committed
    /// and then differed (a fault, left for inspection). Returns the
    /// entries copied.
    pub fn move_to_postgres(
        path: &Path,
        url_text: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<u64, EnvError> {
        let dir = Dir::open_ambient_dir(path, ambient_authority())
            .map_err(|_| EnvError::NotAnEnvironment(path.to_path_buf()))?;
        let config = read_config(&dir)?;
        if let Some(StoreLocation::Postgres(url)) = config.as_ref().map(|c| &c.store) {
            return Err(EnvError::Config(format!(
                "the environment's store is already a PostgreSQL database ({url})"
            )));
        }
        let StoreLocation::Postgres(mut url) = StoreLocation::parse(url_text)? else {
            return Err(EnvError::Config(
                "move-store moves to a postgres:// database".into(),
            ));
        };
        if let Some(pem) = ca_pem {
            *url = (*url).clone().with_ca(pem)?;
        }
        if !dir.exists("store") {
            return Err(EnvError::NotAnEnvironment(path.to_path_buf()));
        }
        let source = SledStorage::open(&path.join("store"), false)?;
        let id = String::from_utf8_lossy(&source.get(Space::Meta, ID_KEY)?.unwrap_or_default())
            .into_owned();
        let secret = match dir.read(STORE_KEY_FILE) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = random_bytes(32)?;
                write_secret(&dir, STORE_KEY_FILE, &s)?;
                s
            }
            Err(e) => return Err(file_err(STORE_KEY_FILE)(e)),
        };
        let target = PgStorage::open(&url, true, &secret)?;
        let mut batch = WriteBatch::new();
        for space in Space::ALL {
            for item in source.scan(space, b"") {
                let (k, v) = item?;
                batch.put(space, k, v);
            }
        }
        let copied = batch.len() as u64;
        target.commit(batch)?;
        for space in Space::ALL {
            let mut theirs = target.scan(space, b"");
            for mine in source.scan(space, b"") {
                let mine = mine?;
                match theirs.next().transpose()? {
                    Some(t) if t == mine => {}
                    _ => {
                        return Err(EnvError::Config(format!(
                            "the copy in {url} differs from the sled store in space {space:?}; the environment stays on sled"
                        )));
                    }
                }
            }
            if theirs.next().is_some() {
                return Err(EnvError::Config(format!(
                    "the copy in {url} has more entries than the sled store in space {space:?}; the environment stays on sled"
                )));
            }
        }
        drop(target);
        drop(source);
        // The switch: the CA file, then the new config by rename.
        if let Some(pem) = ca_pem {
            let _ = dir.remove_file(STORE_CA_FILE);
            write_secret(&dir, STORE_CA_FILE, pem)?;
        }
        let text = EnvConfig::render(
            &id,
            url_text,
            ca_pem.map(|_| STORE_CA_FILE),
            config.as_ref().and_then(|c| c.objects.as_deref()),
            config.as_ref().and_then(|c| c.workers.as_ref()),
        );
        let tmp = format!("{CONFIG_FILE}.tmp");
        let _ = dir.remove_file(&tmp);
        write_secret(&dir, &tmp, text.as_bytes())?;
        dir.rename(&tmp, &dir, CONFIG_FILE)
            .map_err(file_err(CONFIG_FILE))?;
        dir.rename("store", &dir, "store.moved")
            .map_err(file_err("store"))?;
        sync_dir(&dir, ".")?;
        Ok(copied)
    }

    /// Loads the schema and every `*.cedar` file of `dir/policies`.
    fn load_policies(dir: &Dir) -> Result<PolicyEngine, EnvError> {
        let pdir = dir.open_dir("policies").map_err(file_err("policies"))?;
        load_policy_dir(&pdir, "policies/")
    }

    /// Reads `limits.toml` (defaults when it is absent).
    fn load_limits(dir: &Dir) -> Result<EnvLimits, EnvError> {
        match dir.read_to_string(LIMITS_FILE) {
            Ok(text) => EnvLimits::parse(&text).map_err(|message| EnvError::Limits {
                file: LIMITS_FILE,
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EnvLimits::default()),
            Err(e) => Err(file_err(LIMITS_FILE)(e)),
        }
    }

    /// The resource limits an administrator set (`limits.toml`).
    pub fn limits(&self) -> &EnvLimits {
        &self.limits
    }

    /// The environment's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the environment keeps its state (`sled`, or the PostgreSQL
    /// URL without its password).
    pub fn store_location(&self) -> &StoreLocation {
        &self.location
    }

    /// The environment id (the audit log's origin).
    pub fn id(&self) -> &str {
        &self.id
    }

    wall! {
        /// The directory handle.
        fn dir(&self) -> &Dir {
            &self.dir
        }
    }

    wall! {
        /// The store.
        fn store(&self) -> &Arc<dyn Storage> {
            &self.store
        }
    }

    wall! {
        /// The object store for bulk bytes, when the environment names one.
        fn objects(&self) -> Option<&Objects> {
            self.objects.as_ref()
        }
    }

    /// The work queue's client, when `[workers]` is enabled.
    pub(crate) fn workers(&self) -> Option<&crate::workers::Workers> {
        self.workers.as_ref()
    }

    wall! {
        /// The audit log.
        fn audit(&self) -> &AuditLog {
            &self.audit
        }
    }

    /// The active policies.
    pub fn policy(&self) -> &PolicyEngine {
        &self.policy
    }

    /// Whether opening rewrote `policies/cloister.cedarschema` to this
    /// host's schema.
    pub(crate) fn schema_refreshed(&self) -> bool {
        self.schema_refreshed
    }

    wall! {
        /// The secret that tags compiled-plugin artifacts.
        fn cache_secret(&self) -> &[u8] {
            &self.cache_secret
        }
    }
}

/// Loads every `*.cedar` file of a policy directory handle and validates
/// them against the schema built into this host; `label` prefixes file
/// names in errors. The schema describes the entities and attributes this
/// host fills in, so it is the host's, not the directory's: a
/// `cloister.cedarschema` there is a reference copy ([`refresh_schema`]).
pub fn load_policy_dir(pdir: &Dir, label: &str) -> Result<PolicyEngine, EnvError> {
    let mut files = Vec::new();
    for entry in pdir.entries().map_err(file_err(label))? {
        let entry = entry.map_err(file_err(label))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".cedar") {
            let text = pdir.read_to_string(&name).map_err(file_err(&name))?;
            files.push((format!("{label}{name}"), text));
        }
    }
    files.sort();
    Ok(PolicyEngine::load(DEFAULT_SCHEMA, &files)?)
}

/// Rewrites the reference copy of the schema in `policies/` when it is not
/// this host's (an environment made by an earlier version, whose entities
/// had fewer attributes); returns whether it did. Written to a temporary
/// file and renamed, so a crash leaves the old or the new copy.
pub fn refresh_schema(dir: &Dir) -> Result<bool, EnvError> {
    let name = format!("policies/{SCHEMA_FILE}");
    match dir.read_to_string(&name) {
        Ok(text) if text == DEFAULT_SCHEMA => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err(SCHEMA_FILE)(e)),
    }
    let tmp = format!("{name}.{}.tmp", hex::encode(random_bytes(6)?));
    dir.write(&tmp, DEFAULT_SCHEMA)
        .map_err(file_err(SCHEMA_FILE))?;
    dir.rename(&tmp, dir, &name)
        .map_err(file_err(SCHEMA_FILE))?;
    Ok(true)
}
