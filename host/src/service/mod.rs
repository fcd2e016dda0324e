//! [`Cloister`]: every operation on an environment, behind one
//! authorization point.
//!
//! Each public method names its action and resource and calls
//! `Cloister::guard` first. `guard` asks the policy engine, appends the
//! decision to the audit log (durably), and only then lets the operation
//! proceed — or returns [`ServiceError::Denied`]. If the append fails, the
//! operation fails. The CLI and the console call these methods and nothing
//! below them, so no path reaches data around a policy.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use thiserror::Error;

use crate::audit::{AuditError, AuditRecord, Decision};
use crate::datasets::DatasetError;
use crate::digest::Digest;
use crate::env::{EnvError, Environment};
use crate::policy::{Action, PolicyError, Principal, Resource};
use crate::registry::RegistryError;
use crate::runtime::{Runtime, RuntimeError};
use crate::store::StoreError;
use crate::users::{User, UserError};

mod audit;
mod datasets;
mod deployments;
mod feedback;
mod job_steps;
mod jobs;
mod labeling;
mod models;
mod pipeline;
mod plugins;
mod policy;
mod regression;
mod training;
mod users;

pub use crate::types::Stage;
pub use audit::audited_actions;
pub use datasets::ImportOptions;
pub use deployments::{
    Answer, CaptureSpec, DeployedPredictions, DeploymentChange, DeploymentStatus,
    MAX_PREDICT_RECORDS, ReportStanding, SeriesPoint, VariantSeries,
};
pub use feedback::{CaptureWritten, Feedback, FeedbackOutcome, MAX_FEEDBACK};
pub use jobs::{MAX_TAKEOVERS, OrphanedJob};
pub use models::{LineagePlugin, ModelDetail, PluginStage};
pub use policy::Explanation;
pub use training::{Predictions, TrainProgress, TrainRequest, TrainingPlan};

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
    /// The work queue (training on `cloister worker`s) failed.
    #[error(transparent)]
    Work(#[from] crate::workers::WorkError),
    /// The model registry failed.
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An active-learning job failed.
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    /// A fitted featurizer's fit or stored state failed.
    #[error(transparent)]
    Fit(#[from] crate::fitted::FitError),
    /// A plugin of the chain failed, or the preprocessors kept no record,
    /// while a `field`/`fields` setting of the chain names a field the
    /// dataset does not have: the likely cause, in host words (a plugin's
    /// own reason stays sealed). The message says what went wrong, which
    /// setting names which field, and where the dataset's fields are listed.
    #[error("{0}")]
    FieldNotInDataset(String),
    /// A request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A deployment could not be found, created or changed.
    #[error(transparent)]
    Deployment(#[from] crate::deployments::DeploymentError),
}

/// An open environment with its authorization point.
#[derive(Debug)]
pub struct Cloister {
    env: Environment,
    channel: &'static str,
    /// Parsed dataset version manifests (see [`crate::datasets::list`]).
    manifests: crate::datasets::ManifestCache,
    runtime: OnceLock<Runtime>,
    running: Mutex<std::collections::HashSet<String>>,
    /// Models loaded for serving, and the metrics lock.
    serving: deployments::ServingState,
}

/// Held while a job is being driven; releases the claim when dropped.
#[derive(Debug)]
pub(crate) struct JobClaim<'a> {
    c: &'a Cloister,
    id: String,
    /// The claim in the store, which other processes see; released before
    /// this process's own mark, so that a new claim of this process never
    /// meets the old one's release.
    stored: Option<crate::claims::Claim>,
}

impl Drop for Cloister {
    /// Closing the environment writes what serving still holds in memory
    /// (the last second of metrics, kept answers and captured records).
    fn drop(&mut self) {
        self.write_pending_on_close();
    }
}

impl Drop for JobClaim<'_> {
    fn drop(&mut self) {
        drop(self.stored.take());
        self.c
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The canonical parameter digest recorded in the audit log.
pub(super) fn params_digest(params: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(params).unwrap_or_default();
    Digest::of(&bytes).to_hex()
}

/// An audit record of the environment's own life (creation, schema and
/// store maintenance): allowed by `policy` (`bootstrap`, `host`) rather
/// than by a Cedar decision, on the environment.
fn host_entry(actor: &str, action: &str, policy: &str, params: String) -> AuditRecord {
    AuditRecord {
        actor: actor.to_string(),
        action: action.to_string(),
        resource: Resource::Environment.uid_text(),
        decision: Decision::Allow,
        policies: vec![policy.to_string()],
        params,
        outcome: None,
        serving: None,
        account: None,
    }
}

impl Cloister {
    /// Wraps an open environment; `channel` is "cli" or "console".
    fn new(env: Environment, channel: &'static str) -> Self {
        Self {
            env,
            channel,
            manifests: crate::datasets::ManifestCache::default(),
            runtime: OnceLock::new(),
            running: Mutex::new(std::collections::HashSet::new()),
            serving: deployments::ServingState::default(),
        }
    }

    /// Opens the environment at `path`.
    /// Imports a crash interrupted are cleaned up first.
    pub fn open(path: &Path, channel: &'static str) -> Result<Self, ServiceError> {
        let env = Environment::open(path)?;
        if env.schema_refreshed() {
            // The host's own maintenance, like recovery: on the record.
            env.audit().append(host_entry(
                "cloister",
                crate::audit::events::REFRESH_SCHEMA,
                "host",
                params_digest(&("refresh_schema", crate::policy::DEFAULT_SCHEMA)),
            ))?;
        }
        crate::datasets::recover(&env)?;
        Ok(Self::new(env, channel))
    }

    /// Opens the environment at `path` to read it beside the process that
    /// has it open (see [`Environment::open_reader`]): every operation is
    /// authorized and audited as always, and any operation that would
    /// change the environment fails (after its audit entry) with a store
    /// error. Nothing is recovered or refreshed; that is the writer's.
    pub fn open_reader(path: &Path, channel: &'static str) -> Result<Self, ServiceError> {
        Ok(Self::new(Environment::open_reader(path)?, channel))
    }

    /// Applies the store's missing schema migrations (`cloister migrate`),
    /// then opens the environment and records them in the audit log as the
    /// host's own maintenance. Returns the versions applied.
    pub fn migrate(path: &Path) -> Result<Vec<i32>, ServiceError> {
        let applied = Environment::migrate(path)?;
        let me = Self::open(path, "cli")?;
        if !applied.is_empty() {
            me.env.audit().append(host_entry(
                "cloister",
                crate::audit::events::MIGRATE_STORE,
                "host",
                params_digest(&("migrate_store", &applied)),
            ))?;
        }
        Ok(applied)
    }

    /// Restores an admin to the environment at `path` (`cloister
    /// recover-admin`): `name` becomes an active admin with a new token
    /// (created, enabled or given the role as needed; a client account is
    /// refused), returned to be shown once. No token
    /// is asked: this is for the environment's owner when every admin is
    /// locked out (a token lost, the last admins disabled by someone who
    /// held an admin's token). Whoever can run it can read the
    /// environment's keys and write its store directly anyway; the
    /// command makes the recovery an audited step instead — recorded
    /// (actor `cloister`, resource `Account::"NAME"`) before it takes
    /// effect.
    pub fn recover_admin(path: &Path, name: &str) -> Result<String, ServiceError> {
        crate::users::check_name(name)?;
        let me = Self::open(path, "cli")?;
        // Refused before anything is recorded; checked again as it is
        // written.
        match crate::users::get(me.env.store().as_ref(), name) {
            Ok(u) if u.roles.contains(&crate::policy::Role::Client) => {
                return Err(UserError::ClientAccount(name.to_string()).into());
            }
            Ok(_) | Err(UserError::Unknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let mut entry = host_entry(
            "cloister",
            crate::audit::events::RECOVER_ADMIN,
            "host",
            params_digest(&("recover_admin", name)),
        );
        entry.resource = Resource::Account { name: name.into() }.uid_text();
        entry.account = Some(crate::audit::AccountFacts {
            granted: vec![crate::policy::Role::Admin.as_str().to_string()],
            revoked: Vec::new(),
        });
        me.env.audit().append(entry)?;
        let (_, token) = crate::users::recover_admin(me.env.store().as_ref(), name)?;
        Ok(token)
    }

    /// Moves the environment at `path` from its sled store to an empty
    /// PostgreSQL database (`cloister move-store`), trusting only `ca_pem`
    /// for the server's certificate when given. The move is recorded in
    /// the audit log before it happens (and so is part of what is copied);
    /// the moved environment must verify. Returns the entries copied.
    pub fn move_store(path: &Path, url: &str, ca_pem: Option<&[u8]>) -> Result<u64, ServiceError> {
        let shown = crate::env_config::StoreLocation::parse(url)
            .map_err(crate::env::EnvError::from)?
            .to_string();
        {
            let me = Self::open(path, "cli")?;
            me.env.audit().append(host_entry(
                "cloister",
                crate::audit::events::MOVE_STORE,
                "host",
                params_digest(&("move_store", &shown)),
            ))?;
        }
        let copied = Environment::move_to_postgres(path, url, ca_pem)?;
        let moved = Self::open(path, "cli")?;
        match moved.env.audit().verify(None)? {
            crate::audit::Verdict::Intact { .. } => Ok(copied),
            v => Err(ServiceError::Audit(crate::audit::AuditError::Unavailable(
                format!("the moved audit log does not verify: {v:?}"),
            ))),
        }
    }

    /// Creates an environment at `path` with a first admin; returns it and
    /// the admin's token. The creation is the log's first entry.
    pub fn init(path: &Path, admin: &str) -> Result<(Self, String), ServiceError> {
        Self::init_with(path, admin, "sled")
    }

    /// [`Cloister::init`] with its store: `sled` or a `postgres://` URL
    /// naming an empty database (see [`crate::env_config`]).
    pub fn init_with(
        path: &Path,
        admin: &str,
        store: &str,
    ) -> Result<(Self, String), ServiceError> {
        Self::init_with_options(
            path,
            admin,
            &crate::env_config::InitOptions {
                store: store.to_string(),
                ..Default::default()
            },
        )
    }

    /// [`Cloister::init`] with its storage set up as `options` say (see
    /// [`crate::env_config::InitOptions`]).
    pub fn init_with_options(
        path: &Path,
        admin: &str,
        options: &crate::env_config::InitOptions,
    ) -> Result<(Self, String), ServiceError> {
        let (env, token) = Environment::init_with_options(path, admin, options)?;
        let me = Self::new(env, "cli");
        me.env.audit().append(host_entry(
            admin,
            crate::audit::events::INIT,
            "bootstrap",
            params_digest(&("init", admin)),
        ))?;
        Ok((me, token))
    }

    /// Marks job `id` as driven by this process until the guard drops: in
    /// this process's set, and in the store for every other process
    /// ([`crate::claims`]); a job a live process drives is refused as
    /// running.
    pub(crate) fn claim_job(&self, id: &str) -> Result<JobClaim<'_>, ServiceError> {
        let running = || crate::jobs::JobError::Running(id.to_string());
        let mut claim = self.mark_job(id).ok_or_else(running)?;
        claim.stored = Some(crate::claims::take(self.env.store(), "job", id).map_err(
            |e| match e {
                crate::claims::ClaimError::Held => running().into(),
                crate::claims::ClaimError::Store(e) => ServiceError::from(e),
            },
        )?);
        Ok(claim)
    }

    /// [`Cloister::claim_job`] for a job whose claim names `dead`, an
    /// ended process ([`crate::claims::take_over`]): `None` when another
    /// process (or this one) has taken it since, or it was released.
    pub(crate) fn claim_dead_job(
        &self,
        id: &str,
        dead: u64,
    ) -> Result<Option<JobClaim<'_>>, ServiceError> {
        let Some(mut claim) = self.mark_job(id) else {
            return Ok(None);
        };
        claim.stored = crate::claims::take_over(self.env.store(), "job", id, dead)?;
        Ok(claim.stored.is_some().then_some(claim))
    }

    /// Marks job `id` in this process's set: a guard without a stored
    /// claim yet, which unmarks it when dropped (so a claim that fails in
    /// the store leaves no mark), or `None` if this process drives it.
    fn mark_job(&self, id: &str) -> Option<JobClaim<'_>> {
        let fresh = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        fresh.then(|| JobClaim {
            c: self,
            id: id.to_string(),
            stored: None,
        })
    }

    /// The web console's sessions, known devices, login throttle and
    /// background tasks, kept in the store so that every `serve` process
    /// over this environment shares them (see
    /// [`crate::console_state`]). Console housekeeping: not audited.
    pub fn console_state(&self) -> crate::console_state::ConsoleState<'_> {
        crate::console_state::ConsoleState::new(self.env.store().as_ref())
    }

    /// How requests arrive here: "cli" or "console".
    pub fn channel(&self) -> &'static str {
        self.channel
    }

    wall! {
        /// The environment.
        fn env(&self) -> &Environment {
            &self.env
        }
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
        crate::users::authenticate(self.env.store().as_ref(), token)
    }

    /// The second half of [`Cloister::authenticate`]: audits a token that
    /// [`Cloister::check_token`] refused (waiting for the durable append)
    /// and returns the error to answer with.
    pub fn reject_token(&self, token: &str, why: UserError) -> ServiceError {
        let appended = self.env.audit().append(AuditRecord {
            actor: "-".into(),
            action: crate::audit::events::AUTHENTICATE.into(),
            resource: Resource::Environment.uid_text(),
            decision: Decision::Deny,
            policies: Vec::new(),
            params: params_digest(&Digest::of(token.as_bytes()).short()),
            outcome: None,
            serving: None,
            account: None,
        });
        match appended {
            Ok(_) => ServiceError::Auth(why),
            Err(e) => e.into(),
        }
    }

    /// Whether the policies would allow `who` to take `action` on
    /// `resource`: the same Cedar evaluation as `Cloister::guard`, with
    /// no side effect and no audit entry. For deciding what to *show* (a
    /// console link, a button); it lets nothing through: the operation
    /// itself still passes `guard`. It reads nothing from the store, so it
    /// tells the caller nothing about what exists.
    pub fn can(&self, who: &User, action: Action, resource: &Resource) -> bool {
        self.allows(&who.principal(), action, resource)
    }

    /// The environment's id (the audit log's origin).
    pub fn environment_id(&self) -> &str {
        self.env.id()
    }

    /// Whether the environment can work: the store answers (on
    /// PostgreSQL, on the connection that holds the environment lock) and
    /// the audit log accepts appends. For a health probe; it reads no
    /// data, returns no detail to the caller, and, being no operation on
    /// anything, is not audited (a probe every few seconds would fill the
    /// log with nothing).
    pub fn health(&self) -> Result<(), ServiceError> {
        self.env.store().health()?;
        if !self.env.audit().available() {
            return Err(ServiceError::Audit(crate::audit::AuditError::Unavailable(
                "the audit log has failed closed".into(),
            )));
        }
        Ok(())
    }

    /// Where the environment keeps its state (never with a password).
    pub fn store_location(&self) -> &crate::env_config::StoreLocation {
        self.env.store_location()
    }

    /// The public key the environment signs audit checkpoints and model
    /// bundles with.
    pub fn public_key(&self) -> [u8; 32] {
        self.env.audit().public_key()
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

    /// The answer to an operation on something looked up by name before it
    /// can be authorized (a model, a job, a plugin, a record): when the
    /// lookup failed, the authorization point still decides first, on a
    /// stand-in with the attributes the thing would have if it were new.
    /// A caller the policies refuse therefore gets the same audited denial
    /// whether or not the thing exists; only a caller they allow hears
    /// that it does not.
    pub(crate) fn found<T, E: Into<ServiceError>>(
        &self,
        looked_up: Result<T, E>,
        who: &User,
        action: Action,
        stand_in: impl FnOnce() -> Resource,
        params: &impl Serialize,
    ) -> Result<T, ServiceError> {
        match looked_up {
            Ok(t) => Ok(t),
            Err(e) => {
                self.guard(&who.principal(), action, &stand_in(), params)?;
                Err(e.into())
            }
        }
    }

    /// The authorization point: decide, audit, then allow or deny.
    pub(crate) fn guard(
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
    pub(crate) async fn guard_async(
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
            serving: None,
            account: None,
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
}
