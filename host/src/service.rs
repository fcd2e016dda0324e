//! [`Cloister`]: every operation on an environment, behind one
//! authorization point.
//!
//! Each public method names its action and resource and calls
//! [`Cloister::guard`] first. `guard` asks the policy engine, appends the
//! decision to the audit log (durably), and only then lets the operation
//! proceed — or returns [`ServiceError::Denied`]. If the append fails, the
//! operation fails. The CLI and the console call these methods and nothing
//! below them, so no path reaches data around a policy.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use thiserror::Error;

use crate::audit::{
    AuditEntry, AuditError, AuditFilter, AuditRecord, Checkpoint, Decision, InclusionProof,
    PluginOutcome, Verdict,
};
use crate::datasets::{
    self, DatasetError, DatasetVersion, LabelEntry, Provenance, SplitCounts, StoredRecord,
};
use crate::digest::Digest;
use crate::env::{EnvError, Environment};
use crate::plugin_log::{self, PluginLogEntry};
use crate::policy::{Action, Authorization, PolicyError, Principal, Resource};
use crate::registry::{self, PluginEntry, RegistryError};
use crate::runtime::{ArtifactCache, LoadedPlugin, Runner, Runtime, RuntimeConfig, RuntimeError};
use crate::store::StoreError;
use crate::types::{DataRecord, PluginKind, SparseBatch};
use crate::users::{self, User, UserError};

/// Errors of operations. `Denied` deliberately carries no policy detail.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// The policy denied the operation (it was audited).
    #[error("denied: {actor} may not {action} on {resource}")]
    Denied {
        /// Who asked.
        actor: String,
        /// The action.
        action: &'static str,
        /// The resource.
        resource: String,
    },
    /// The operation does not exist in any form, whatever the policy says.
    #[error("{0}")]
    NoSuchOperation(&'static str),
    /// Authentication failed.
    #[error(transparent)]
    Auth(UserError),
    /// User management failed.
    #[error(transparent)]
    User(#[from] UserError),
    /// The audit log failed: the operation did not happen.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The environment failed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// A dataset operation failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// A registry operation failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The plugin runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Policies failed to load.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// The model registry failed.
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An active-learning job failed.
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    /// A request is malformed.
    #[error("{0}")]
    BadRequest(String),
}

/// Options of a dataset import.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportOptions {
    /// `jsonl` or `csv`; by extension when `None`.
    pub format: Option<String>,
    /// Field mapping.
    #[serde(skip)]
    pub schema: crate::records::Schema,
}

/// What `cloister train` asks for.
#[derive(Debug, Clone, Serialize)]
pub struct TrainRequest {
    /// `NAME` or `NAME@VERSION`.
    pub dataset: String,
    /// Approved preprocessor digests, applied in order.
    pub preprocess: Vec<String>,
    /// Approved featurizer digest.
    pub features: String,
    /// Template name.
    pub template: String,
    /// `--set key=value` overrides.
    pub sets: Vec<(String, String)>,
    /// Seed of the split (default: the template's seed).
    pub split_seed: Option<u64>,
}

/// Progress reported while training.
#[derive(Debug, Clone)]
pub enum TrainProgress {
    /// A pipeline stage finished: (stage, records out).
    Stage(&'static str, usize),
    /// An epoch finished.
    Epoch(crate::train::EpochStats, u32),
}

/// Predictions for records a caller supplied.
#[derive(Debug, Clone)]
pub struct Predictions {
    /// Record ids, in output order (a preprocessor may drop records).
    pub ids: Vec<String>,
    /// Class names.
    pub classes: Vec<String>,
    /// Probabilities, row-major `ids × classes`.
    pub probs: Vec<f32>,
}

/// What `policy explain` reports.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The decision and the deciding policy ids.
    pub authorization: Authorization,
    /// `(id, text)` of each deciding policy.
    pub policies: Vec<(String, String)>,
    /// The resource as the policy engine saw it.
    pub resource: Resource,
}

/// An open environment with its authorization point.
#[derive(Debug)]
pub struct Cloister {
    env: Environment,
    channel: &'static str,
    runtime: OnceLock<Runtime>,
    import_lock: Mutex<()>,
    running: Mutex<std::collections::HashSet<String>>,
}

/// Held while a job is being driven; releases the claim when dropped.
#[derive(Debug)]
pub(crate) struct JobClaim<'a> {
    c: &'a Cloister,
    id: String,
}

impl Drop for JobClaim<'_> {
    fn drop(&mut self) {
        self.c
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The canonical parameter digest recorded in the audit log.
fn params_digest(params: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(params).unwrap_or_default();
    Digest::of(&bytes).to_hex()
}

impl Cloister {
    /// Wraps an open environment; `channel` is "cli" or "console".
    pub fn new(env: Environment, channel: &'static str) -> Self {
        Self {
            env,
            channel,
            runtime: OnceLock::new(),
            import_lock: Mutex::new(()),
            running: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Opens the environment at `path`.
    pub fn open(path: &Path, channel: &'static str) -> Result<Self, ServiceError> {
        Ok(Self::new(Environment::open(path)?, channel))
    }

    /// Creates an environment at `path` with a first admin; returns it and
    /// the admin's token. The creation is the log's first entry.
    pub fn init(path: &Path, admin: &str) -> Result<(Self, String), ServiceError> {
        let (env, token) = Environment::init(path, admin)?;
        let me = Self::new(env, "cli");
        me.env.audit().append(AuditRecord {
            actor: admin.to_string(),
            action: "init".into(),
            resource: Resource::Environment.uid_text(),
            decision: Decision::Allow,
            policies: vec!["bootstrap".into()],
            params: params_digest(&("init", admin)),
            outcome: None,
        })?;
        Ok((me, token))
    }

    /// Marks job `id` as driven by this process until the guard drops.
    pub(crate) fn claim_job(&self, id: &str) -> Result<JobClaim<'_>, ServiceError> {
        let mut set = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(id.to_string()) {
            return Err(crate::jobs::JobError::Running(id.to_string()).into());
        }
        Ok(JobClaim {
            c: self,
            id: id.to_string(),
        })
    }

    /// How requests arrive here: "cli" or "console".
    pub fn channel(&self) -> &'static str {
        self.channel
    }

    /// The environment.
    pub fn env(&self) -> &Environment {
        &self.env
    }

    /// The user a token belongs to. A failure is audited.
    pub fn authenticate(&self, token: &str) -> Result<User, ServiceError> {
        self.check_token(token)
            .map_err(|e| self.reject_token(token, e))
    }

    /// The first half of [`Cloister::authenticate`]: the user a token
    /// belongs to, from memory-cached reads and without waiting for the
    /// audit log. A caller that gets an error must pass it to
    /// [`Cloister::reject_token`], which records the failure.
    pub fn check_token(&self, token: &str) -> Result<User, UserError> {
        users::authenticate(self.env.store().as_ref(), token)
    }

    /// The second half of [`Cloister::authenticate`]: audits a token that
    /// [`Cloister::check_token`] refused (waiting for the durable append)
    /// and returns the error to answer with.
    pub fn reject_token(&self, token: &str, why: UserError) -> ServiceError {
        let appended = self.env.audit().append(AuditRecord {
            actor: "-".into(),
            action: "authenticate".into(),
            resource: Resource::Environment.uid_text(),
            decision: Decision::Deny,
            policies: Vec::new(),
            params: params_digest(&Digest::of(token.as_bytes()).short()),
            outcome: None,
        });
        match appended {
            Ok(_) => ServiceError::Auth(why),
            Err(e) => e.into(),
        }
    }

    /// Whether the policy allows `action` on `resource`, without auditing:
    /// only for filtering the items of a listing whose request already
    /// passed [`Cloister::guard`] (and so is audited).
    pub(crate) fn allows(&self, who: &Principal, action: Action, resource: &Resource) -> bool {
        self.env
            .policy()
            .authorize(who, action, resource, self.channel)
            .allowed
    }

    /// The authorization point: decide, audit, then allow or deny.
    pub fn guard(
        &self,
        who: &Principal,
        action: Action,
        resource: &Resource,
        params: &impl Serialize,
    ) -> Result<(), ServiceError> {
        let (allowed, record) = self.decide(who, action, resource, params);
        self.env.audit().append(record)?;
        Self::verdict(allowed, who, action, resource)
    }

    /// [`Cloister::guard`] for async callers: the same decision and the
    /// same audit record, queued when the future is first polled, then
    /// awaited until it is on disk without holding a thread. Nothing is
    /// allowed before the record is durable.
    pub async fn guard_async(
        &self,
        who: &Principal,
        action: Action,
        resource: &Resource,
        params: &impl Serialize,
    ) -> Result<(), ServiceError> {
        let (allowed, record) = self.decide(who, action, resource, params);
        self.env.audit().submit(record)?.await?;
        Self::verdict(allowed, who, action, resource)
    }

    /// The policy decision on a request and the audit record of it.
    fn decide(
        &self,
        who: &Principal,
        action: Action,
        resource: &Resource,
        params: &impl Serialize,
    ) -> (bool, AuditRecord) {
        let decision = self
            .env
            .policy()
            .authorize(who, action, resource, self.channel);
        if !decision.errors.is_empty() {
            tracing::warn!(action = action.as_str(), errors = ?decision.errors, "policy evaluation errors (treated as non-matching)");
        }
        let record = AuditRecord {
            actor: who.name.clone(),
            action: action.as_str().to_string(),
            resource: resource.uid_text(),
            decision: if decision.allowed {
                Decision::Allow
            } else {
                Decision::Deny
            },
            policies: decision.policies,
            params: params_digest(params),
            outcome: None,
        };
        (decision.allowed, record)
    }

    fn verdict(
        allowed: bool,
        who: &Principal,
        action: Action,
        resource: &Resource,
    ) -> Result<(), ServiceError> {
        if allowed {
            Ok(())
        } else {
            Err(ServiceError::Denied {
                actor: who.name.clone(),
                action: action.as_str(),
                resource: resource.uid_text(),
            })
        }
    }

    // ------------------------------------------------------------- users --

    /// Adds a user; returns the user and their token (shown once).
    pub fn add_user(
        &self,
        who: &User,
        name: &str,
        roles: &[crate::policy::Role],
    ) -> Result<(User, String), ServiceError> {
        self.guard(
            &who.principal(),
            Action::AddUser,
            &Resource::Environment,
            &(name, roles),
        )?;
        let (batch, user, token) = users::create(self.env.store().as_ref(), name, roles)?;
        self.env.store().commit(batch)?;
        Ok((user, token))
    }

    /// Sets a user's console password (admins).
    pub fn set_password(&self, who: &User, name: &str, password: &str) -> Result<(), ServiceError> {
        self.guard(
            &who.principal(),
            Action::AddUser,
            &Resource::Environment,
            &("password", name),
        )?;
        let batch = users::set_password(self.env.store().as_ref(), name, password)?;
        self.env.store().commit(batch)?;
        Ok(())
    }

    /// The user a name and password belong to (console login). A failure
    /// is audited, naming the user it claimed to be.
    pub fn login(&self, name: &str, password: &str) -> Result<User, ServiceError> {
        match users::check_password(self.env.store().as_ref(), name, password) {
            Ok(u) => {
                self.env.audit().append(AuditRecord {
                    actor: u.name.clone(),
                    action: "login".into(),
                    resource: Resource::Environment.uid_text(),
                    decision: Decision::Allow,
                    policies: Vec::new(),
                    params: params_digest(&self.channel),
                    outcome: None,
                })?;
                Ok(u)
            }
            Err(e) => {
                let claimed = if users::check_name(name).is_ok() {
                    name
                } else {
                    "-"
                };
                self.env.audit().append(AuditRecord {
                    actor: claimed.to_string(),
                    action: "login".into(),
                    resource: Resource::Environment.uid_text(),
                    decision: Decision::Deny,
                    policies: Vec::new(),
                    params: params_digest(&self.channel),
                    outcome: None,
                })?;
                Err(ServiceError::Auth(e))
            }
        }
    }

    /// Audits a request refused before it reached an operation — a
    /// throttled or malformed login, a missing or wrong CSRF token, a
    /// cross-site request: a `deny` entry for `action` whose deciding policy
    /// is the fixed `reason`. `actor` is kept only when it is a well-formed
    /// user name (else `-`), so a client cannot write text of its choosing
    /// into the log.
    pub fn record_refusal(
        &self,
        actor: &str,
        action: &'static str,
        reason: &'static str,
    ) -> Result<(), ServiceError> {
        let actor = if users::check_name(actor).is_ok() {
            actor
        } else {
            "-"
        };
        self.env.audit().append(AuditRecord {
            actor: actor.to_string(),
            action: action.into(),
            resource: Resource::Environment.uid_text(),
            decision: Decision::Deny,
            policies: vec![reason.into()],
            params: params_digest(&(self.channel, reason)),
            outcome: None,
        })?;
        Ok(())
    }

    /// Lists users.
    pub fn list_users(&self, who: &User) -> Result<Vec<User>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListUsers,
            &Resource::Environment,
            &(),
        )?;
        Ok(users::list(self.env.store().as_ref())?)
    }

    /// Disables a user and revokes their token.
    pub fn disable_user(&self, who: &User, name: &str) -> Result<(), ServiceError> {
        self.guard(
            &who.principal(),
            Action::DisableUser,
            &Resource::Environment,
            &name,
        )?;
        let batch = users::disable(self.env.store().as_ref(), name)?;
        self.env.store().commit(batch)?;
        Ok(())
    }

    // ---------------------------------------------------------- datasets --

    /// Imports a file as the next version of dataset `name`.
    pub fn import_dataset(
        &self,
        who: &User,
        name: &str,
        file: &Path,
        options: &ImportOptions,
    ) -> Result<DatasetVersion, ServiceError> {
        datasets::check_name(name)?;
        let params = (
            name,
            file.file_name().map(|f| f.to_string_lossy().into_owned()),
            options,
            &options.schema.id_field,
            &options.schema.label_field,
        );
        self.guard(
            &who.principal(),
            Action::ImportDataset,
            &Resource::Dataset { name: name.into() },
            &params,
        )?;
        let mut source =
            datasets::open_source(file, options.format.as_deref(), options.schema.clone())?;
        let _one_at_a_time = self
            .import_lock
            .lock()
            .map_err(|_| ServiceError::BadRequest("an earlier import panicked".into()))?;
        Ok(datasets::import(
            &self.env,
            name,
            source.as_mut(),
            &options.schema.id_field,
            &who.name,
        )?)
    }

    /// Lists every version of every dataset.
    pub fn list_datasets(&self, who: &User) -> Result<Vec<DatasetVersion>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListDatasets,
            &Resource::Environment,
            &(),
        )?;
        Ok(datasets::list(&self.env)?)
    }

    /// [`Cloister::list_datasets`] for async callers (the console's most
    /// frequent read): the audit wait holds no thread, and the listing
    /// itself reads a few manifests from the store's cache.
    pub async fn list_datasets_async(
        &self,
        who: &User,
    ) -> Result<Vec<DatasetVersion>, ServiceError> {
        self.guard_async(
            &who.principal(),
            Action::ListDatasets,
            &Resource::Environment,
            &(),
        )
        .await?;
        Ok(datasets::list(&self.env)?)
    }

    /// Statistics of `NAME[@VERSION]`; with a seed, also split counts.
    pub fn dataset_stats(
        &self,
        who: &User,
        reference: &str,
        seed: Option<u64>,
    ) -> Result<(DatasetVersion, Option<SplitCounts>), ServiceError> {
        let name = reference.split('@').next().unwrap_or(reference);
        self.guard(
            &who.principal(),
            Action::ViewStats,
            &Resource::Dataset { name: name.into() },
            &(reference, seed),
        )?;
        let v = datasets::resolve(&self.env, reference)?;
        let splits = match seed {
            Some(s) => Some(datasets::split_counts(&self.env, &v, s)?),
            None => None,
        };
        Ok((v, splits))
    }

    /// Dataset export. Forbidden by policy for everyone; and were that policy
    /// removed, there is still no code that writes rows out.
    pub fn export_dataset(&self, who: &User, reference: &str) -> Result<(), ServiceError> {
        let name = reference.split('@').next().unwrap_or(reference);
        self.guard(
            &who.principal(),
            Action::ExportDataset,
            &Resource::Dataset { name: name.into() },
            &reference,
        )?;
        Err(ServiceError::NoSuchOperation(
            "datasets cannot be exported: raw data never leaves the environment",
        ))
    }

    pub(crate) fn record_resource(
        &self,
        reference: &str,
        id: &str,
    ) -> Result<(DatasetVersion, Resource), ServiceError> {
        let v = datasets::resolve(&self.env, reference)?;
        let assignee = datasets::assignee(&self.env, &v, id)?;
        Ok((
            v.clone(),
            Resource::Record {
                dataset: v.name.clone(),
                id: id.to_string(),
                assignee,
            },
        ))
    }

    /// Shows one record: only to the labeler it is assigned to.
    pub fn view_record(
        &self,
        who: &User,
        reference: &str,
        id: &str,
    ) -> Result<StoredRecord, ServiceError> {
        let (v, resource) = self.record_resource(reference, id)?;
        self.guard(
            &who.principal(),
            Action::ViewRecord,
            &resource,
            &(reference, id),
        )?;
        Ok(datasets::get_record(&self.env, &v, id)?)
    }

    /// Stores a human label for an assigned record.
    pub fn label_record(
        &self,
        who: &User,
        reference: &str,
        id: &str,
        label: &str,
    ) -> Result<(), ServiceError> {
        if label.is_empty() || label.len() > 256 || label.chars().any(char::is_control) {
            return Err(ServiceError::BadRequest(
                "a label is 1 to 256 bytes without control characters".into(),
            ));
        }
        let (v, resource) = self.record_resource(reference, id)?;
        self.guard(
            &who.principal(),
            Action::LabelRecord,
            &resource,
            &(reference, id, Digest::of(label.as_bytes()).to_hex()),
        )?;
        let entry = LabelEntry {
            label: label.into(),
            provenance: Provenance::Human {
                user: who.name.clone(),
            },
            time_ms: crate::time::now_ms(),
        };
        let batch = datasets::set_label(&self.env, &v, id, &entry)?;
        self.env.store().commit(batch)?;
        Ok(())
    }

    // ----------------------------------------------------------- plugins --

    /// The environment's plugin runtime (created on first use; compiled
    /// artifacts are cached in the environment's `cache/` directory).
    pub fn runtime(&self) -> Result<&Runtime, ServiceError> {
        if let Some(r) = self.runtime.get() {
            return Ok(r);
        }
        let dir = self
            .env
            .dir()
            .open_dir("cache")
            .map_err(|error| EnvError::File {
                file: "cache".into(),
                error,
            })?;
        let rt = Runtime::new(RuntimeConfig {
            cache: ArtifactCache::on_disk(dir, self.env.cache_secret()),
            ..RuntimeConfig::default()
        })?;
        Ok(self.runtime.get_or_init(|| rt))
    }

    /// Inspects and registers a component (unapproved).
    pub fn add_plugin(&self, who: &User, bytes: &[u8]) -> Result<PluginEntry, ServiceError> {
        let digest = Digest::of(bytes).to_hex();
        self.guard(
            &who.principal(),
            Action::AddPlugin,
            &Resource::Environment,
            &digest,
        )?;
        let inspection = self.runtime()?.inspect(bytes);
        let (batch, entry) =
            registry::add(self.env.store().as_ref(), &inspection, bytes, &who.name)?;
        self.env.store().commit(batch)?;
        Ok(entry)
    }

    fn plugin_resource(entry: &PluginEntry) -> Resource {
        Resource::Plugin {
            digest: entry.digest.clone(),
            approved: entry.approval.is_some(),
            added_by: entry.added_by.clone(),
        }
    }

    /// Approves a plugin digest (a reviewer who did not add it).
    pub fn approve_plugin(&self, who: &User, digest: &str) -> Result<PluginEntry, ServiceError> {
        let entry = registry::get(self.env.store().as_ref(), digest)?;
        self.guard(
            &who.principal(),
            Action::ApprovePlugin,
            &Self::plugin_resource(&entry),
            &entry.digest,
        )?;
        let batch = registry::approve(&entry, &who.name)?;
        self.env.store().commit(batch)?;
        Ok(registry::get(self.env.store().as_ref(), &entry.digest)?)
    }

    /// Lists registered plugins.
    pub fn list_plugins(&self, who: &User) -> Result<Vec<PluginEntry>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListPlugins,
            &Resource::Environment,
            &(),
        )?;
        Ok(registry::list(self.env.store().as_ref())?)
    }

    /// Authorizes running a plugin and returns its verified bytes.
    pub fn plugin_for_run(
        &self,
        who: &User,
        digest: &str,
    ) -> Result<(PluginEntry, Vec<u8>), ServiceError> {
        let entry = registry::get(self.env.store().as_ref(), digest)?;
        self.guard(
            &who.principal(),
            Action::RunPlugin,
            &Self::plugin_resource(&entry),
            &entry.digest,
        )?;
        let bytes = registry::bytes(self.env.store().as_ref(), &entry)?;
        Ok((entry, bytes))
    }

    // ------------------------------------------------------------ models --

    pub(crate) fn load_approved(
        &self,
        who: &User,
        digest: &str,
        kind: crate::types::PluginKind,
    ) -> Result<(PluginEntry, crate::runtime::LoadedPlugin), ServiceError> {
        let (entry, bytes) = self.plugin_for_run(who, digest)?;
        let loaded = self.runtime()?.load(&bytes)?;
        loaded.require(kind)?;
        Ok((entry, loaded))
    }

    /// Runs one plugin stage over `records_in` items through a [`Runner`]
    /// under the environment's limits, then records its outcome: one
    /// `plugin_call` audit entry (the code, the counts, coarse resource
    /// figures) and, when the stage failed or the plugin wrote anything, an
    /// entry of the administrators' plugin log with the full detail.
    /// `run` does the work; `count` says how many results it accepted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plugin_stage<T>(
        &self,
        who: &User,
        purpose: &str,
        plugin: &LoadedPlugin,
        config: &[(String, String)],
        records_in: usize,
        run: impl FnOnce(&Runner<'_>) -> Result<T, RuntimeError>,
        count: impl Fn(&T) -> usize,
    ) -> Result<(T, u32), ServiceError> {
        let limits = self.env.limits().plugin_call_limits();
        let rt = self.runtime()?;
        let (result, usage, log, dimension) = match plugin.runner(rt, config, limits) {
            Ok(runner) => {
                let result = run(&runner);
                (
                    result,
                    runner.usage(),
                    runner.take_log(),
                    runner.dimension(),
                )
            }
            Err(e) => (Err(e), Default::default(), (Vec::new(), 0), 0),
        };
        let stage = match plugin.kind {
            PluginKind::Preprocessor => "preprocess",
            PluginKind::Featurizer => "featurize",
            PluginKind::Selector => "select",
        };
        let code = result.as_ref().map_or_else(RuntimeError::code, |_| "ok");
        let records_out = result.as_ref().map_or(0, &count);
        let pow2 = |v: u64| {
            if v == 0 {
                0
            } else {
                v.checked_next_power_of_two().unwrap_or(u64::MAX)
            }
        };
        let digest = plugin.digest.to_hex();
        let seq = self.env.audit().append(AuditRecord {
            actor: who.name.clone(),
            action: "plugin_call".into(),
            resource: Resource::Plugin {
                digest: digest.clone(),
                approved: true,
                added_by: String::new(),
            }
            .uid_text(),
            decision: Decision::Allow,
            policies: Vec::new(),
            params: params_digest(&(purpose, stage, records_in)),
            outcome: Some(PluginOutcome {
                stage: stage.into(),
                purpose: purpose.into(),
                code: code.into(),
                records_in: records_in as u64,
                records_out: records_out as u64,
                fuel: pow2(usage.fuel),
                peak_memory_bytes: pow2(usage.peak_memory_bytes),
                wall_ms: pow2(usage.wall_ms),
            }),
        })?;
        let (output, dropped) = log;
        if result.is_err() || !output.is_empty() || dropped > 0 {
            let entry = PluginLogEntry {
                seq,
                time_ms: crate::time::now_ms(),
                actor: who.name.clone(),
                digest,
                stage: stage.into(),
                purpose: purpose.into(),
                code: code.into(),
                detail: result.as_ref().err().map(RuntimeError::admin_detail),
                usage,
                output: String::from_utf8_lossy(&output).into_owned(),
                dropped_bytes: dropped as u64,
            };
            let batch = plugin_log::put(self.env.store().as_ref(), entry)?;
            self.env.store().commit(batch)?;
        }
        Ok((result?, dimension))
    }

    /// Runs `records` through preprocessors and a featurizer (each with its
    /// config) in the sandbox, each stage audited ([`Cloister::plugin_stage`]):
    /// the kept records, their features and the feature dimension. `stage`
    /// hears each stage's output count.
    pub(crate) fn run_chain(
        &self,
        who: &User,
        purpose: &str,
        mut records: Vec<DataRecord>,
        preprocess: &[(&LoadedPlugin, Vec<(String, String)>)],
        features: (&LoadedPlugin, &[(String, String)]),
        stage: &mut dyn FnMut(&'static str, usize),
    ) -> Result<(Vec<DataRecord>, SparseBatch, usize), ServiceError> {
        for (plugin, config) in preprocess {
            let n = records.len();
            records = self
                .plugin_stage(
                    who,
                    purpose,
                    plugin,
                    config,
                    n,
                    |r| r.preprocess(&records),
                    Vec::len,
                )?
                .0;
            stage("preprocessed", records.len());
        }
        let (featurizer, config) = features;
        let (x, dim) = self.plugin_stage(
            who,
            purpose,
            featurizer,
            config,
            records.len(),
            |r| r.featurize(&records),
            SparseBatch::rows,
        )?;
        stage("featurized", x.rows());
        Ok((records, x, dim as usize))
    }

    /// Checks a training request's template, settings, dataset and plugins
    /// exist, without running or auditing anything (for callers that start
    /// training in the background and must refuse bad requests at once;
    /// [`Cloister::train_model`] authorizes and checks again).
    pub fn check_train_request(&self, req: &TrainRequest) -> Result<(), ServiceError> {
        crate::train::template(&req.template, &req.sets)?;
        datasets::resolve(&self.env, &req.dataset)?;
        for d in req.preprocess.iter().chain([&req.features]) {
            registry::get(self.env.store().as_ref(), d)?;
        }
        Ok(())
    }

    /// Runs approved plugins over a dataset in the sandbox, trains a model
    /// from a template, evaluates it on the test split and stores it.
    pub fn train_model(
        &self,
        who: &User,
        req: &TrainRequest,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        use crate::datasets::Split;
        let template = crate::train::template(&req.template, &req.sets)?;
        let version = datasets::resolve(&self.env, &req.dataset)?;
        let id = format!("m-{}", hex::encode(crate::env::random_bytes(6)?));
        let resource = Resource::Model {
            id: id.clone(),
            release_requested: false,
            release_approved: false,
            requested_by: None,
        };
        self.guard(&who.principal(), Action::TrainModel, &resource, req)?;
        let mut pre = Vec::new();
        for d in &req.preprocess {
            pre.push(self.load_approved(who, d, PluginKind::Preprocessor)?);
        }
        let (feat_entry, featurizer) =
            self.load_approved(who, &req.features, PluginKind::Featurizer)?;
        let split_seed = req.split_seed.unwrap_or(template.hyper.seed);

        // Labeled records, their label (a human's over gold over automatic)
        // and split, decided on the stored record.
        let mut records = Vec::new();
        let mut meta = std::collections::HashMap::new();
        for r in datasets::records(&self.env, &version) {
            let r = r?;
            let pick = |f: &dyn Fn(&Provenance) -> bool| {
                r.labels
                    .iter()
                    .rev()
                    .find(|l| f(&l.provenance))
                    .map(|l| l.label.clone())
            };
            let label = pick(&|p| matches!(p, Provenance::Human { .. }))
                .or_else(|| pick(&|p| matches!(p, Provenance::Gold)))
                .or_else(|| pick(&|p| matches!(p, Provenance::Auto { .. })));
            if let Some(label) = label {
                meta.insert(
                    r.record.id.clone(),
                    (label, datasets::split_of(&r.record, split_seed)),
                );
                records.push(r.record);
            }
        }
        progress(TrainProgress::Stage("labeled records", records.len()));
        let chain: Vec<(&crate::runtime::LoadedPlugin, Vec<(String, String)>)> =
            pre.iter().map(|(_, p)| (p, Vec::new())).collect();
        let (records, x, dim) = self.run_chain(
            who,
            &format!("train {id}"),
            records,
            &chain,
            (&featurizer, &[]),
            &mut |stage, n| progress(TrainProgress::Stage(stage, n)),
        )?;

        let labels: Vec<String> = records
            .iter()
            .filter_map(|r| meta.get(&r.id).map(|m| m.0.clone()))
            .collect();
        let (classes, index) = crate::train::class_index(&labels);
        let mut y = Vec::with_capacity(records.len());
        let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
        for (row, r) in records.iter().enumerate() {
            let (label, split) = meta.get(&r.id).ok_or_else(|| {
                ServiceError::BadRequest(
                    "a preprocessor returned a record id it was not given".into(),
                )
            })?;
            y.push(index[label]);
            match split {
                Split::Train => train.push(row),
                Split::Validation => val.push(row),
                Split::Test => test.push(row),
            }
        }
        let hyper_epochs = template.hyper.epochs;
        let data = crate::train::TrainingSet {
            x: &x,
            dim,
            y: &y,
            classes: classes.len(),
            train: &train,
            val: &val,
            budget_bytes: self.env.limits().training_budget_bytes(),
        };
        let fitted = crate::train::fit(&template, data, &mut |e| {
            progress(TrainProgress::Epoch(e.clone(), hyper_epochs))
        })?;
        let probs = fitted.model.predict(&x, &test)?;
        let ids: Vec<String> = test.iter().map(|&r| records[r].id.clone()).collect();
        let truth: Vec<usize> = test.iter().map(|&r| y[r]).collect();
        let evaluation = crate::train::eval::evaluate(&classes, &ids, &truth, &probs);
        let weights = fitted.model.to_safetensors()?;
        let manifest = crate::models::ModelManifest {
            id,
            template: template.name.clone(),
            kind: template.kind,
            hyper: template.hyper.clone(),
            classes,
            dim,
            lineage: crate::models::Lineage {
                dataset: version.reference(),
                dataset_digest: version.digest.clone(),
                preprocess: pre.iter().map(|(e, _)| e.digest.clone()).collect(),
                features: feat_entry.digest.clone(),
                split_seed,
                job: None,
            },
            evaluation,
            curve: fitted.curve,
            best_epoch: fitted.best_epoch,
            train_seconds: fitted.seconds,
            split_sizes: [train.len() as u64, val.len() as u64, test.len() as u64],
            weights_sha256: Digest::of(&weights).to_hex(),
            created_by: who.name.clone(),
            created_ms: crate::time::now_ms(),
            release: crate::models::Release::default(),
        };
        crate::models::save(
            self.env.store().as_ref(),
            self.env.dir(),
            &manifest,
            &weights,
        )?;
        Ok(manifest)
    }

    /// Lists models the caller may view.
    pub fn list_models(
        &self,
        who: &User,
    ) -> Result<Vec<crate::models::ModelManifest>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ViewModel,
            &Resource::Model {
                id: "*".into(),
                release_requested: false,
                release_approved: false,
                requested_by: None,
            },
            &"list",
        )?;
        Ok(crate::models::list(self.env.store().as_ref())?)
    }

    /// One model's manifest.
    pub fn show_model(
        &self,
        who: &User,
        id: &str,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        let m = crate::models::get(self.env.store().as_ref(), id)?;
        self.guard(&who.principal(), Action::ViewModel, &m.resource(), &id)?;
        Ok(m)
    }

    /// Requests the release of a model.
    pub fn request_release(
        &self,
        who: &User,
        id: &str,
        reason: &str,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        let mut m = crate::models::get(self.env.store().as_ref(), id)?;
        self.guard(
            &who.principal(),
            Action::RequestRelease,
            &m.resource(),
            &(id, Digest::of(reason.as_bytes()).to_hex()),
        )?;
        if m.release.requested_by.is_some() {
            return Err(crate::models::ModelError::Release(format!(
                "a release of {id} was already requested"
            ))
            .into());
        }
        m.release = crate::models::Release {
            requested_by: Some(who.name.clone()),
            reason: Some(reason.to_string()),
            decision: None,
            decided_by: None,
        };
        crate::models::put(self.env.store().as_ref(), &m)?;
        Ok(m)
    }

    /// Approves (`true`) or rejects a requested release.
    pub fn decide_release(
        &self,
        who: &User,
        id: &str,
        approve: bool,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        let mut m = crate::models::get(self.env.store().as_ref(), id)?;
        let action = if approve {
            Action::ApproveRelease
        } else {
            Action::RejectRelease
        };
        self.guard(&who.principal(), action, &m.resource(), &id)?;
        if m.release.decision.is_some() {
            return Err(crate::models::ModelError::Release(format!(
                "the release of {id} was already decided"
            ))
            .into());
        }
        m.release.decision = Some(if approve { "approved" } else { "rejected" }.into());
        m.release.decided_by = Some(who.name.clone());
        crate::models::put(self.env.store().as_ref(), &m)?;
        Ok(m)
    }

    /// The signed bundle of an approved model: the only way model bytes
    /// leave the environment.
    pub fn export_model(&self, who: &User, id: &str) -> Result<Vec<u8>, ServiceError> {
        let m = crate::models::get(self.env.store().as_ref(), id)?;
        self.guard(&who.principal(), Action::ExportModel, &m.resource(), &id)?;
        let weights = crate::models::weights(self.env.dir(), &m)?;
        let audit = self.env.audit();
        Ok(crate::models::bundle(
            &m,
            &weights,
            &|msg| audit.sign_bytes(msg),
            audit.public_key(),
        )?)
    }

    /// Predicts on records the caller supplies (a plugin author's mock
    /// data), through the model's own plugin chain.
    pub fn predict(
        &self,
        who: &User,
        id: &str,
        records: &[crate::types::DataRecord],
    ) -> Result<Predictions, ServiceError> {
        let m = crate::models::get(self.env.store().as_ref(), id)?;
        self.guard(
            &who.principal(),
            Action::ViewModel,
            &m.resource(),
            &(id, records.len()),
        )?;
        let input: Vec<DataRecord> = records
            .iter()
            .map(|r| DataRecord {
                label: None,
                ..r.clone()
            })
            .collect();
        let mut pre = Vec::new();
        for d in &m.lineage.preprocess {
            pre.push(self.load_approved(who, d, PluginKind::Preprocessor)?.1);
        }
        let (_, f) = self.load_approved(who, &m.lineage.features, PluginKind::Featurizer)?;
        let chain: Vec<(&LoadedPlugin, Vec<(String, String)>)> =
            pre.iter().map(|p| (p, Vec::new())).collect();
        let (input, x, _) = self.run_chain(
            who,
            &format!("predict {id}"),
            input,
            &chain,
            (&f, &[]),
            &mut |_, _| {},
        )?;
        let model = crate::train::Trained::from_safetensors(
            m.kind,
            &crate::models::weights(self.env.dir(), &m)?,
        )?;
        let rows: Vec<usize> = (0..x.rows()).collect();
        let probs = model.predict(&x, &rows)?;
        Ok(Predictions {
            ids: input.into_iter().map(|r| r.id).collect(),
            classes: m.classes,
            probs,
        })
    }

    // ------------------------------------------------------------- audit --

    /// Reads audit entries.
    pub fn audit_log(
        &self,
        who: &User,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditEntry>, ServiceError> {
        let params = (
            &filter.actor,
            &filter.action,
            filter.since_ms,
            filter.decision,
            filter.from_seq,
            filter.limit,
        );
        self.guard(
            &who.principal(),
            Action::ReadAudit,
            &Resource::AuditLog,
            &params,
        )?;
        Ok(self.env.audit().query(filter)?)
    }

    /// The administrators' plugin log, newest first: what plugins wrote and
    /// the host's full account of each failed stage, plugin-chosen values
    /// included — which is why only the `read_plugin_log` action (admins
    /// in the default policies) reaches it. `digest` keeps the entries of
    /// digests starting with it; `limit` 0 means all.
    pub fn plugin_log(
        &self,
        who: &User,
        digest: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PluginLogEntry>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ReadPluginLog,
            &Resource::Environment,
            &(digest, limit),
        )?;
        Ok(plugin_log::list(self.env.store().as_ref(), digest, limit)?)
    }

    /// Verifies the audit log (the verification request is itself logged
    /// first, and is covered by the verification).
    pub fn audit_verify(
        &self,
        who: &User,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Verdict, ServiceError> {
        let params = checkpoint.map(|c| (c.size, hex::encode(c.root)));
        self.guard(
            &who.principal(),
            Action::VerifyAudit,
            &Resource::AuditLog,
            &params,
        )?;
        Ok(self.env.audit().verify(checkpoint)?)
    }

    /// Signs a checkpoint of the log (covering this request's own entry).
    pub fn audit_checkpoint(&self, who: &User) -> Result<Checkpoint, ServiceError> {
        self.guard(
            &who.principal(),
            Action::CheckpointAudit,
            &Resource::AuditLog,
            &(),
        )?;
        Ok(self.env.audit().checkpoint()?)
    }

    /// An inclusion proof for entry `seq`.
    pub fn audit_prove(&self, who: &User, seq: u64) -> Result<InclusionProof, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ReadAudit,
            &Resource::AuditLog,
            &seq,
        )?;
        Ok(self.env.audit().prove(seq)?)
    }

    // ---------------------------------------------------------- policies --

    /// Validates the environment's policy directory as it is on disk now.
    pub fn policy_check(&self, who: &User) -> Result<usize, ServiceError> {
        self.guard(
            &who.principal(),
            Action::CheckPolicy,
            &Resource::Environment,
            &(),
        )?;
        let pdir = self
            .env
            .dir()
            .open_dir("policies")
            .map_err(|error| EnvError::File {
                file: "policies".into(),
                error,
            })?;
        Ok(crate::env::load_policy_dir(&pdir, "policies/")?.len())
    }

    /// Explains how the active policies decide `action` on `resource` for
    /// user `as_user`. Resource syntax: `env`, `audit`, `dataset:NAME`,
    /// `record:DATASET/ID`, `plugin:DIGEST`, `model:ID`.
    pub fn policy_explain(
        &self,
        who: &User,
        as_user: &str,
        action: &str,
        resource: &str,
    ) -> Result<Explanation, ServiceError> {
        let action: Action = action.parse().map_err(ServiceError::BadRequest)?;
        self.guard(
            &who.principal(),
            Action::ExplainPolicy,
            &Resource::Environment,
            &(as_user, action.as_str(), resource),
        )?;
        let subject = users::get(self.env.store().as_ref(), as_user)?;
        let resource = self.parse_resource(resource)?;
        let authorization =
            self.env
                .policy()
                .authorize(&subject.principal(), action, &resource, self.channel);
        let policies = authorization
            .policies
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    self.env
                        .policy()
                        .policy_text(id)
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        Ok(Explanation {
            authorization,
            policies,
            resource,
        })
    }

    fn parse_resource(&self, text: &str) -> Result<Resource, ServiceError> {
        let bad = || {
            ServiceError::BadRequest(format!(
                "`{text}` is not a resource (use env, audit, dataset:NAME, record:DATASET/ID, plugin:DIGEST or model:ID)"
            ))
        };
        let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
        let store = self.env.store().as_ref();
        Ok(match (kind, rest) {
            ("env", "") => Resource::Environment,
            ("audit", "") => Resource::AuditLog,
            ("dataset", name) if !name.is_empty() => Resource::Dataset { name: name.into() },
            ("record", r) => {
                let (ds, id) = r.split_once('/').ok_or_else(bad)?;
                let (_, res) = self.record_resource(ds, id)?;
                res
            }
            ("plugin", d) => Self::plugin_resource(&registry::get(store, d)?),
            ("model", id) if !id.is_empty() => Resource::Model {
                id: id.into(),
                release_requested: false,
                release_approved: false,
                requested_by: None,
            },
            _ => return Err(bad()),
        })
    }
}
