//! Plugins: submission, review, loading and running them in the sandbox
//! with every stage audited.

use crate::audit::{AuditRecord, Decision, PluginOutcome};
use crate::digest::Digest;
use crate::env::EnvError;
use crate::plugin_log::{self, PluginLogEntry};
use crate::policy::{Action, Resource};
use crate::registry::{self, PluginEntry};
use crate::runtime::{ArtifactCache, LoadedPlugin, Runner, Runtime, RuntimeConfig, RuntimeError};
use crate::types::{DataRecord, PluginKind};
use crate::users::User;
use crate::workers::{Stage, StageOp, StageOutput, StageRun, run_here, stage_here};

use super::{Cloister, ServiceError, params_digest};

impl Cloister {
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
            cache: ArtifactCache::on_disk(
                dir,
                self.env.cache_secret(),
                self.env.limits().artifact_cache_bytes(),
            ),
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
        let (batch, entry) = registry::add(
            self.env.store().as_ref(),
            self.env.objects(),
            &inspection,
            bytes,
            &who.name,
        )?;
        // Of two registrations of one component at once, one is refused.
        let absent = [crate::store::Expect::new(
            crate::store::Space::Plugins,
            entry.digest.as_bytes(),
            None,
        )];
        match self.env.store().commit_if(&absent, batch) {
            Err(crate::store::StoreError::Conflict { .. }) => {
                Err(registry::RegistryError::Exists(entry.digest).into())
            }
            done => done.map(|()| entry).map_err(Into::into),
        }
    }

    /// Approves a plugin digest (a reviewer who did not add it).
    pub fn approve_plugin(&self, who: &User, digest: &str) -> Result<PluginEntry, ServiceError> {
        let entry = self.plugin_for(who, Action::ApprovePlugin, digest, None)?;
        Ok(registry::approve(
            self.env.store().as_ref(),
            &entry.digest,
            &who.name,
        )?)
    }

    /// Withdraws a plugin's approval (reviewers and admins): from then on
    /// it runs nowhere — no training, no job step (a job's next step is
    /// denied, the job kept as it was), no prediction; a deployment serving
    /// a model that uses it stops at its next request (a serving process
    /// uses a loaded chain only while the plugins' registry entries are as
    /// they were), and no model that uses it is released, exported or
    /// deployed — until a reviewer approves the digest again. The
    /// withdrawal stays in the plugin's history.
    pub fn withdraw_approval(&self, who: &User, digest: &str) -> Result<PluginEntry, ServiceError> {
        let entry = self.plugin_for(who, Action::WithdrawApproval, digest, None)?;
        Ok(registry::withdraw(
            self.env.store().as_ref(),
            &entry.digest,
            &who.name,
        )?)
    }

    /// A plugin looked up and authorized for `action` (see
    /// [`Cloister::found`]: an unknown digest is decided on a new plugin's
    /// attributes first).
    fn plugin_for(
        &self,
        who: &User,
        action: Action,
        digest: &str,
        kind: Option<PluginKind>,
    ) -> Result<PluginEntry, ServiceError> {
        let store = self.env.store();
        let looked_up = match action {
            Action::RunPlugin => registry::find(store.as_ref(), digest, kind),
            _ => registry::get(store.as_ref(), digest),
        };
        // A name that fits no approved plugin of the kind, or several, is
        // told as such to whoever may list the plugins (the list shows the
        // names); to anyone else it is a run of an unknown plugin, and
        // denied so.
        let looked_up = match looked_up {
            Err(e) if registry::is_name_error(&e) => {
                self.may_list_plugins(who, digest)?;
                return Err(e.into());
            }
            other => other,
        };
        let entry = self.found(
            looked_up,
            who,
            action,
            || Resource::Plugin {
                digest: digest.into(),
                approved: false,
                added_by: String::new(),
            },
            &digest,
        )?;
        self.guard(&who.principal(), action, &entry.resource(), &entry.digest)?;
        Ok(entry)
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

    /// One registered plugin by digest, unique prefix (at least 8 hex
    /// digits) or the name of one approved plugin: what `list_plugins`
    /// shows of it, so the same permission.
    pub fn show_plugin(&self, who: &User, digest: &str) -> Result<PluginEntry, ServiceError> {
        self.may_list_plugins(who, digest)?;
        Ok(registry::find(self.env.store().as_ref(), digest, None)?)
    }

    /// `list_plugins` authorized (and audited) for `who`, the plugin as
    /// they named it (`reference`) recorded with the decision.
    fn may_list_plugins(&self, who: &User, reference: &str) -> Result<(), ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListPlugins,
            &Resource::Environment,
            &reference,
        )
    }

    /// Authorizes running a plugin — by digest, unique prefix, or the name
    /// of one approved plugin of `kind` (see [`registry::find`]) — and
    /// returns its verified bytes.
    pub fn plugin_for_run(
        &self,
        who: &User,
        digest: &str,
        kind: Option<PluginKind>,
    ) -> Result<(PluginEntry, Vec<u8>), ServiceError> {
        let entry = self.plugin_for(who, Action::RunPlugin, digest, kind)?;
        let bytes = registry::bytes(self.env.store().as_ref(), self.env.objects(), &entry)?;
        Ok((entry, bytes))
    }

    // ------------------------------------------------------------ models --

    pub(crate) fn load_approved(
        &self,
        who: &User,
        digest: &str,
        kind: crate::types::PluginKind,
    ) -> Result<(PluginEntry, crate::runtime::LoadedPlugin), ServiceError> {
        let (entry, bytes) = self.plugin_for_run(who, digest, Some(kind))?;
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
    /// The `plugin_call` entry of one stage.
    fn audit_plugin_call(
        &self,
        who: &User,
        digest: &str,
        outcome: PluginOutcome,
    ) -> Result<u64, ServiceError> {
        Ok(self.env.audit().append(AuditRecord {
            actor: who.name.clone(),
            action: crate::audit::events::PLUGIN_CALL.into(),
            resource: Resource::Plugin {
                digest: digest.into(),
                approved: true,
                added_by: String::new(),
            }
            .uid_text(),
            decision: Decision::Allow,
            policies: Vec::new(),
            params: params_digest(&(&outcome.purpose, &outcome.stage, outcome.records_in)),
            outcome: Some(outcome),
            serving: None,
            account: None,
        })?)
    }

    /// The `plugin_call` entry of a stage whose output came from the
    /// feature cache: code `cached`, the chain's records in and out, no
    /// resources used.
    pub(crate) fn audit_cached_stage(
        &self,
        who: &User,
        purpose: &str,
        plugin: &LoadedPlugin,
        records_in: usize,
        records_out: usize,
        fit: bool,
    ) -> Result<(), ServiceError> {
        let stage = match plugin.kind {
            _ if fit => "fit",
            PluginKind::Preprocessor => "preprocess",
            PluginKind::Featurizer => "featurize",
            PluginKind::Selector => "select",
        };
        self.audit_plugin_call(
            who,
            &plugin.digest.to_hex(),
            PluginOutcome {
                stage: stage.into(),
                purpose: purpose.into(),
                code: "cached".into(),
                records_in: records_in as u64,
                records_out: records_out as u64,
                fuel: 0,
                peak_memory_bytes: 0,
                wall_ms: 0,
            },
        )?;
        Ok(())
    }

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
        self.plugin_stage_with(
            who,
            purpose,
            plugin,
            config,
            StageSetup::default(),
            records_in,
            run,
            count,
        )
    }

    /// [`Cloister::plugin_stage`] for a fitted featurizer: its fit (the
    /// stage audited as `fit`), or its featurizing instances loaded with
    /// the vocabulary.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plugin_stage_with<T>(
        &self,
        who: &User,
        purpose: &str,
        plugin: &LoadedPlugin,
        config: &[(String, String)],
        setup: StageSetup,
        records_in: usize,
        run: impl FnOnce(&Runner<'_>) -> Result<T, RuntimeError>,
        count: impl Fn(&T) -> usize,
    ) -> Result<(T, u32), ServiceError> {
        let limits = self.env.limits().plugin_call_limits();
        let run = run_here(
            self.runtime()?,
            plugin,
            config,
            &limits,
            setup.vocabulary.as_ref(),
            run,
        );
        self.record_stage(who, purpose, plugin, &setup, records_in, run, count)
    }

    /// A stage of a chain over `records` (preprocessing, a fitted
    /// featurizer's fit, featurizing): on the environment's workers when
    /// `[workers]` is enabled — cut into shards that run at once, with the
    /// result one run here would give — and in this process otherwise,
    /// or for a deployment's request. Recorded the same way either way
    /// ([`Cloister::plugin_stage_with`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn chain_stage(
        &self,
        who: &User,
        purpose: &str,
        plugin: &LoadedPlugin,
        config: &[(String, String)],
        setup: StageSetup,
        op: StageOp,
        records: &[DataRecord],
    ) -> Result<(StageOutput, u32), ServiceError> {
        let limits = self.env.limits().plugin_call_limits();
        let stage = Stage {
            plugin,
            config,
            limits: &limits,
            op,
            vocabulary: setup.vocabulary.as_ref(),
        };
        let run = match (self.env.workers(), self.env.objects()) {
            (Some(workers), Some(objects)) if !setup.quiet => {
                // The component travels by digest: an object already when
                // it was registered with the object store.
                let digest = plugin.digest.to_hex();
                if !objects.contains(&digest)? {
                    let store = self.env.store();
                    let entry = registry::get(store.as_ref(), &digest)?;
                    objects.put_bytes(
                        registry::bytes(store.as_ref(), Some(objects), &entry)?,
                        true,
                    )?;
                }
                let vocabulary = setup
                    .vocabulary
                    .as_ref()
                    .map(|v| workers.share(objects, crate::fitted::encode(v)))
                    .transpose()?;
                workers.run_stage(objects, stage, vocabulary.as_deref(), records)?
            }
            _ => stage_here(self.runtime()?, stage, records),
        };
        self.record_stage(
            who,
            purpose,
            plugin,
            &setup,
            records.len(),
            run,
            StageOutput::count,
        )
    }

    /// Records a stage's outcome: one `plugin_call` audit entry (the
    /// code, the counts, coarse resource figures) and, when the stage
    /// failed or the plugin wrote anything, an entry of the
    /// administrators' plugin log with the full detail.
    #[allow(clippy::too_many_arguments)]
    fn record_stage<T>(
        &self,
        who: &User,
        purpose: &str,
        plugin: &LoadedPlugin,
        setup: &StageSetup,
        records_in: usize,
        run: StageRun<T>,
        count: impl Fn(&T) -> usize,
    ) -> Result<(T, u32), ServiceError> {
        let StageRun {
            result,
            usage,
            log,
            dimension,
        } = run;
        let stage = match plugin.kind {
            _ if setup.fit => "fit",
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
        let (output, dropped) = log;
        if setup.quiet && result.is_ok() && output.is_empty() && dropped == 0 {
            return Ok((result?, dimension));
        }
        let seq = self.audit_plugin_call(
            who,
            &digest,
            PluginOutcome {
                stage: stage.into(),
                purpose: purpose.into(),
                code: code.into(),
                records_in: records_in as u64,
                records_out: records_out as u64,
                fuel: pow2(usage.fuel),
                peak_memory_bytes: pow2(usage.peak_memory_bytes),
                wall_ms: pow2(usage.wall_ms),
            },
        )?;
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
}

/// How a plugin stage runs beyond its plugin and configuration.
#[derive(Debug, Default)]
pub(crate) struct StageSetup {
    /// The stage is a fitted featurizer's fit (audited as `fit`).
    pub(crate) fit: bool,
    /// A fitted featurizer's vocabulary, loaded into every instance.
    pub(crate) vocabulary: Option<std::sync::Arc<crate::types::Vocabulary>>,
    /// A deployment's stage: a success is covered by the request's
    /// `predict` audit entry (written before the chain ran, naming the
    /// model whose lineage names every plugin and configuration), so only
    /// a failure gets its own `plugin_call` entry. Plugin output and
    /// failures go to the plugin log as always.
    pub(crate) quiet: bool,
}
