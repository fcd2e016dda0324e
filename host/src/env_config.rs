//! `cloister.toml`: which store an environment uses.
//!
//! `cloister init` writes the file into the environment directory (mode
//! 0600, the directory is 0700) and every open reads it:
//!
//! ```toml
//! environment = "env-0123456789abcdef"
//!
//! [store]
//! url = "sled"                     # the embedded store in DIR/store
//! # url = "postgres://cloister@db.internal:5432/cloister"
//! # ca_file = "store-ca.pem"       # trust only this CA for the server (a
//! #                                # file in DIR; default: the system's)
//!
//! [objects]                        # optional: bulk bytes also here
//! url = "file:///srv/cloister-objects"
//!
//! [workers]                        # optional: training on `cloister worker`s
//! enabled = true                   # needs a postgres store and [objects]
//! claim_timeout_seconds = 300      # no worker for this long: the run fails
//! max_attempts = 3                 # claims of one task before it fails
//! stage_records = 2048             # records per plugin-stage task
//! keep_objects_seconds = 3600      # shared task objects kept after last use
//! abandoned_task_seconds = 86400   # a task row untouched this long is swept
//! ```
//!
//! An environment made before the file existed has none and uses sled.
//! The environment id is repeated here so that a directory opened against
//! another environment's database is refused by name instead of failing
//! its audit checks. The URL may hold a password: it is never printed
//! (see [`crate::store::PgUrl`]).

use serde::{Deserialize, Serialize};

use crate::store::{PgUrl, StoreError};

/// The file's name in the environment directory.
pub const CONFIG_FILE: &str = "cloister.toml";

/// HMAC secret that tags work-queue tasks and results, in the environment
/// directory (shared with the environment's `cloister worker` processes).
pub const WORK_KEY_FILE: &str = "keys/work.key";

/// How `cloister init` sets up an environment's storage.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// `sled` or a `postgres://` URL naming an empty database.
    pub store: String,
    /// PEM CA certificates to trust (alone) for the database server.
    pub store_ca: Option<Vec<u8>>,
    /// An object store for bulk bytes (`file:///PATH`), if any.
    pub objects: Option<String>,
    /// Whether training runs go to `cloister worker` processes.
    pub workers: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            store: "sled".into(),
            store_ca: None,
            objects: None,
            workers: false,
        }
    }
}

/// `[workers]`: the plugin stages and model fits of training runs and
/// active-learning rounds are run by `cloister worker` processes that
/// claim them from the database's work queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Whether the queue is used (`false` fits in the process, as without
    /// the section).
    pub enabled: bool,
    /// A task no worker has claimed (or whose worker's lease ran out
    /// without another taking it) for this long fails the run.
    #[serde(default = "WorkersConfig::default_claim_timeout")]
    pub claim_timeout_seconds: u64,
    /// Claims of one task (a worker that dies loses its claim when the
    /// lease runs out) before the run fails.
    #[serde(default = "WorkersConfig::default_max_attempts")]
    pub max_attempts: u32,
    /// Records per task of a plugin stage (rounded up to a multiple of
    /// the runner's batch of 256): a stage over more records is cut into
    /// that many tasks, which free workers take at once.
    #[serde(default = "WorkersConfig::default_stage_records")]
    pub stage_records: usize,
    /// How long an object that several tasks share (the features of a
    /// fit, a fitted vocabulary) stays in the object store after the last
    /// operation that sent it stopped waiting on it; a later operation on
    /// the same data within this time does not send it again.
    #[serde(default = "WorkersConfig::default_keep_objects")]
    pub keep_objects_seconds: u64,
    /// A task row untouched for this long was abandoned by its submitter
    /// (the operation's process died before it took the outcome): the
    /// workers delete it with its objects. At least the claim timeout.
    #[serde(default = "WorkersConfig::default_abandoned_after")]
    pub abandoned_task_seconds: u64,
}

impl WorkersConfig {
    fn default_claim_timeout() -> u64 {
        300
    }

    fn default_max_attempts() -> u32 {
        3
    }

    fn default_stage_records() -> usize {
        2048
    }

    fn default_keep_objects() -> u64 {
        3600
    }

    fn default_abandoned_after() -> u64 {
        86_400
    }

    /// The section `init --workers` writes.
    pub fn enabled() -> Self {
        Self {
            enabled: true,
            claim_timeout_seconds: Self::default_claim_timeout(),
            max_attempts: Self::default_max_attempts(),
            stage_records: Self::default_stage_records(),
            keep_objects_seconds: Self::default_keep_objects(),
            abandoned_task_seconds: Self::default_abandoned_after(),
        }
    }
}

/// Where an environment keeps its state.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// The embedded sled database in `DIR/store` (the default).
    Sled,
    /// A PostgreSQL database, one environment per database.
    Postgres(Box<PgUrl>),
}

impl StoreLocation {
    /// Parses `sled` or a `postgres://` / `postgresql://` URL.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let t = text.trim();
        if t == "sled" {
            Ok(Self::Sled)
        } else if t.starts_with("postgres://") || t.starts_with("postgresql://") {
            Ok(Self::Postgres(Box::new(t.parse()?)))
        } else {
            Err(StoreError::Engine(
                "a store is `sled` or a postgres:// URL (postgres://USER@HOST:PORT/DB, or postgresql:///DB?host=/socket/dir for a Unix socket)"
                    .into(),
            ))
        }
    }
}

impl StoreLocation {
    /// Whether reads are answered in this process, from memory (sled's
    /// page cache), rather than by a round trip to a server: what decides
    /// if a read may run on an async runtime's thread.
    pub fn reads_in_process(&self) -> bool {
        matches!(self, Self::Sled)
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sled => f.write_str("sled"),
            Self::Postgres(url) => url.fmt(f),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
}

/// The name `init --store-ca` gives the CA file it copies into the
/// environment directory.
pub const STORE_CA_FILE: &str = "store-ca.pem";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileObjects {
    url: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    environment: String,
    store: FileStore,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    objects: Option<FileObjects>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workers: Option<WorkersConfig>,
}

/// What `cloister.toml` says.
#[derive(Debug, Clone)]
pub struct EnvConfig {
    /// The environment id the store must hold.
    pub environment: String,
    /// The store.
    pub store: StoreLocation,
    /// A file in the environment directory with the CA certificates that
    /// alone are trusted for the database server's certificate.
    pub ca_file: Option<String>,
    /// The object store for bulk bytes, if any (`file:///PATH`).
    pub objects: Option<String>,
    /// The work queue's settings, when `[workers]` is enabled.
    pub workers: Option<WorkersConfig>,
}

impl EnvConfig {
    /// Reads `cloister.toml` from an environment directory: `None` when
    /// there is none (an environment made before it existed, on sled); the
    /// error says what is wrong (the I/O error, or the line and field).
    pub fn read(dir: &cap_std::fs::Dir) -> Result<Option<Self>, String> {
        match dir.read_to_string(CONFIG_FILE) {
            Ok(text) => Self::parse(&text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Parses the file's text; errors name the line and field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text)
            .map_err(|e| cloister_types::toml_problem::TomlProblem::of(text, &e).to_string())?;
        let store = StoreLocation::parse(&file.store.url).map_err(|e| format!("store.url: {e}"))?;
        if let Some(name) = &file.store.ca_file
            && (name.is_empty() || name.contains('/') || name.starts_with('.'))
        {
            return Err(format!(
                "store.ca_file: `{name}` must be the name of a file in the environment directory"
            ));
        }
        let workers = file.workers.filter(|w| w.enabled);
        if let Some(w) = &workers {
            if !matches!(store, StoreLocation::Postgres(_)) {
                return Err(
                    "workers.enabled: workers need a postgres store (the work queue is in its database)"
                        .into(),
                );
            }
            if file.objects.is_none() {
                return Err(
                    "workers.enabled: workers need an [objects] store (tasks and results travel through it)"
                        .into(),
                );
            }
            if w.max_attempts == 0 {
                return Err("workers.max_attempts: must be at least 1".into());
            }
            if w.claim_timeout_seconds == 0 {
                return Err("workers.claim_timeout_seconds: must be at least 1".into());
            }
            if w.stage_records == 0 {
                return Err("workers.stage_records: must be at least 1".into());
            }
            if w.keep_objects_seconds < 60 {
                return Err("workers.keep_objects_seconds: must be at least 60".into());
            }
            if w.abandoned_task_seconds < w.claim_timeout_seconds.max(60) {
                return Err(format!(
                    "workers.abandoned_task_seconds: must be at least 60 and at least workers.claim_timeout_seconds ({})",
                    w.claim_timeout_seconds
                ));
            }
        }
        Ok(Self {
            environment: file.environment,
            store,
            ca_file: file.store.ca_file,
            objects: file.objects.map(|o| o.url),
            workers,
        })
    }

    /// The file's text. `url` is the store as given to `init` (with its
    /// password, if any: the file is the environment's secret, like its
    /// keys).
    pub fn render(
        environment: &str,
        url: &str,
        ca_file: Option<&str>,
        objects: Option<&str>,
        workers: Option<&WorkersConfig>,
    ) -> String {
        let body = toml::to_string(&File {
            environment: environment.to_string(),
            store: FileStore {
                url: url.to_string(),
                ca_file: ca_file.map(str::to_string),
            },
            objects: objects.map(|u| FileObjects { url: u.to_string() }),
            workers: workers.cloned(),
        })
        .unwrap_or_default();
        format!("# Written by `cloister init`; read at every open (see docs/SCALING.md).\n{body}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_bad_files_are_named() {
        let text = EnvConfig::render(
            "env-1",
            "postgres://a:pw@h:5/d",
            None,
            Some("file:///o"),
            Some(&WorkersConfig::enabled()),
        );
        let c = EnvConfig::parse(&text).expect("parses");
        assert_eq!(c.environment, "env-1");
        assert_eq!(c.objects.as_deref(), Some("file:///o"));
        assert!(matches!(c.store, StoreLocation::Postgres(_)));
        assert_eq!(c.workers, Some(WorkersConfig::enabled()));
        let w = WorkersConfig::enabled();
        for (url, objects) in [("postgres://h/d", None), ("sled", Some("file:///o"))] {
            let text = EnvConfig::render("env-1", url, None, objects, Some(&w));
            let e = EnvConfig::parse(&text).expect_err("refused");
            assert!(e.contains("workers.enabled"), "{e}");
        }
        let e = EnvConfig::parse(&text.replace("max_attempts = 3", "max_attempts = 0"))
            .expect_err("refused");
        assert!(e.contains("workers.max_attempts"), "{e}");
        let e = EnvConfig::parse(&text.replace("stage_records = 2048", "stage_records = 0"))
            .expect_err("refused");
        assert!(e.contains("workers.stage_records"), "{e}");
        let e = EnvConfig::parse(
            &text.replace("keep_objects_seconds = 3600", "keep_objects_seconds = 5"),
        )
        .expect_err("refused");
        assert!(e.contains("workers.keep_objects_seconds"), "{e}");
        // Parse errors are one line naming the line and the table or key;
        // a table the whole file lacks is not blamed on line 1.
        let sled = EnvConfig::render("env-1", "sled", None, None, None);
        let e =
            EnvConfig::parse(&sled.replace("[store]\nurl = \"sled\"\n", "")).expect_err("refused");
        assert_eq!(e, "missing field `store`");
        let e = EnvConfig::parse(&sled.replace("url = \"sled\"\n", "")).expect_err("refused");
        assert!(
            e.ends_with(": [store]: missing field `url`") && e.starts_with("line "),
            "{e}"
        );
        let e = EnvConfig::parse(&sled.replace("\"env-1\"", "1")).expect_err("refused");
        assert!(
            e.contains("`environment`: invalid type: integer `1`"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // A task is not swept while its submitter may still wait for a
        // worker to take it.
        let e = EnvConfig::parse(&text.replace(
            "abandoned_task_seconds = 86400",
            "abandoned_task_seconds = 200",
        ))
        .expect_err("refused");
        assert!(
            e.contains("workers.abandoned_task_seconds") && e.contains("(300)"),
            "{e}"
        );
        // A file written before these settings existed takes their
        // defaults.
        let older = EnvConfig::parse(
            &text
                .replace("stage_records = 2048\n", "")
                .replace("keep_objects_seconds = 3600\n", "")
                .replace("abandoned_task_seconds = 86400\n", ""),
        )
        .expect("parses")
        .workers
        .expect("workers");
        assert_eq!(
            (
                older.stage_records,
                older.keep_objects_seconds,
                older.abandoned_task_seconds
            ),
            (2048, 3600, 86_400)
        );
        assert_eq!(c.store.to_string(), "postgres://a@h:5/d");
        let text = EnvConfig::render("env-1", "sled", Some("ca.pem"), None, None);
        assert_eq!(
            EnvConfig::parse(&text).expect("parses").ca_file.as_deref(),
            Some("ca.pem")
        );
        let e = EnvConfig::parse(&text.replace("ca.pem", "../etc/ca.pem")).expect_err("refused");
        assert!(e.contains("store.ca_file"), "{e}");
        let e = EnvConfig::parse("environment = \"e\"\n[store]\nurl = \"mysql://x\"\n")
            .expect_err("refused");
        assert!(e.contains("store.url"), "{e}");
        let e = EnvConfig::parse("environment = \"e\"\n[store]\nurl = \"sled\"\nextra = 1\n")
            .expect_err("refused");
        assert!(e.contains("extra") && e.contains("line 4"), "{e}");
    }
}
