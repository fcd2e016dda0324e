//! The one training pipeline, shared by `train`, active-learning jobs and
//! `predict`: approved plugins loaded as a chain, records run through it,
//! and a fitted model registered with its lineage.
//!
//! ```text
//! load_chain ─▶ featurize_dataset (or run_chain on a caller's records)
//!            ─▶ train::fit ─▶ register_model
//! ```

use std::collections::HashMap;

use crate::datasets::{self, DatasetVersion, Split, StoredRecord};
use crate::digest::Digest;
use crate::feature_cache::{self, FeatureCache, KeyPlugin};
use crate::models::{Lineage, ModelManifest, Release};
use crate::registry::PluginEntry;
use crate::runtime::LoadedPlugin;
use crate::train::disclosure::{self, Evidence};
use crate::train::{Fitted, Template, eval::Evaluation};
use crate::types::{DataRecord, PluginKind, SparseBatch};
use crate::users::User;

use super::{Cloister, ServiceError};

/// A plugin's configuration: `(key, value)` pairs.
pub(crate) type Config = Vec<(String, String)>;

/// Approved plugins of one run, loaded (each load authorized and audited
/// as `run_plugin`): preprocessors in order, then the featurizer.
#[derive(Debug)]
pub(crate) struct Chain {
    pub(crate) preprocess: Vec<(PluginEntry, LoadedPlugin, Config)>,
    pub(crate) features: (PluginEntry, LoadedPlugin, Config),
}

impl Chain {
    /// The lineage of a model trained on this chain's output.
    pub(crate) fn lineage(
        &self,
        dataset: &DatasetVersion,
        split_seed: u64,
        job: Option<String>,
    ) -> Lineage {
        Lineage {
            dataset: dataset.reference(),
            dataset_digest: dataset.digest.clone(),
            preprocess: self
                .preprocess
                .iter()
                .map(|(e, _, _)| e.digest.clone())
                .collect(),
            features: self.features.0.digest.clone(),
            preprocess_config: if self.preprocess.iter().all(|(_, _, c)| c.is_empty()) {
                Vec::new()
            } else {
                self.preprocess.iter().map(|(_, _, c)| c.clone()).collect()
            },
            features_config: self.features.2.clone(),
            split_seed,
            job,
        }
    }
}

/// A dataset run through a chain: one row per record the plugins kept, in
/// their output order, with its split and what the caller kept for it.
#[derive(Debug)]
pub(crate) struct Featurized<T> {
    pub(crate) rows: Vec<(String, Split, T)>,
    pub(crate) x: SparseBatch,
    pub(crate) dim: usize,
}

/// A fitted model to register: everything but what registration derives
/// (the weights' digest, the time, the release state).
#[derive(Debug)]
pub(crate) struct NewModel<'a> {
    pub(crate) id: String,
    pub(crate) template: &'a Template,
    pub(crate) classes: Vec<String>,
    pub(crate) dim: usize,
    pub(crate) lineage: Lineage,
    pub(crate) evaluation: Evaluation,
    pub(crate) fitted: &'a Fitted,
    pub(crate) split_sizes: [u64; 3],
    pub(crate) created_by: String,
    /// What the model saw: for the disclosure check.
    pub(crate) evidence: Evidence<'a>,
}

impl Cloister {
    /// Loads the approved plugins of a run, checking each is of the kind
    /// its place needs.
    pub(crate) fn load_chain(
        &self,
        who: &User,
        preprocess: &[(String, Config)],
        features: &(String, Config),
    ) -> Result<Chain, ServiceError> {
        let mut pre = Vec::with_capacity(preprocess.len());
        for (digest, config) in preprocess {
            let (entry, loaded) = self.load_approved(who, digest, PluginKind::Preprocessor)?;
            pre.push((entry, loaded, config.clone()));
        }
        let (entry, loaded) = self.load_approved(who, &features.0, PluginKind::Featurizer)?;
        Ok(Chain {
            preprocess: pre,
            features: (entry, loaded, features.1.clone()),
        })
    }

    /// Loads a model's own chain from its lineage, each plugin with the
    /// configuration it was trained with.
    pub(crate) fn lineage_chain(&self, who: &User, l: &Lineage) -> Result<Chain, ServiceError> {
        let preprocess: Vec<_> = l
            .preprocess
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let config = l.preprocess_config.get(i).cloned().unwrap_or_default();
                (d.clone(), config)
            })
            .collect();
        self.load_chain(
            who,
            &preprocess,
            &(l.features.clone(), l.features_config.clone()),
        )
    }

    /// Runs records through a chain, every stage audited (see
    /// [`Cloister::plugin_stage`]): the records the preprocessors kept, their
    /// features and the featurizer's dimension.
    pub(crate) fn run_chain(
        &self,
        who: &User,
        purpose: &str,
        mut records: Vec<DataRecord>,
        chain: &Chain,
        stage: &mut dyn FnMut(&'static str, usize),
    ) -> Result<(Vec<DataRecord>, SparseBatch, usize), ServiceError> {
        for (_, plugin, config) in &chain.preprocess {
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
        let (_, featurizer, config) = &chain.features;
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

    /// Runs a dataset version through a chain. `keep` sees each stored
    /// record (with its labels) and says what to remember of it, or `None`
    /// to leave it out before any plugin sees it; splits are decided on
    /// the stored record with `split_seed`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn featurize_dataset<T>(
        &self,
        who: &User,
        purpose: &str,
        version: &DatasetVersion,
        chain: &Chain,
        split_seed: u64,
        mut keep: impl FnMut(&StoredRecord) -> Option<T>,
        stage: &mut dyn FnMut(&'static str, usize),
    ) -> Result<Featurized<T>, ServiceError> {
        let mut records = Vec::new();
        let mut meta: HashMap<String, (Split, T)> = HashMap::new();
        for r in datasets::records(&self.env, version) {
            let r = r?;
            if let Some(kept) = keep(&r) {
                let split = datasets::split_of(&r.record, split_seed);
                meta.insert(r.record.id.clone(), (split, kept));
                records.push(r.record);
            }
        }
        stage("records", records.len());
        let (ids, x, dim) = self.features_of(who, purpose, version, chain, records, stage)?;
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            // The runtime holds a preprocessor's output to a subsequence
            // of its input, so each stored id comes back at most once.
            let (split, kept) = meta.remove(&id).ok_or_else(|| {
                ServiceError::BadRequest(
                    "a preprocessor returned a record id it was not given".into(),
                )
            })?;
            rows.push((id, split, kept));
        }
        Ok(Featurized { rows, x, dim })
    }

    /// The chain's output on stored records of `version`: from the
    /// feature cache when the same version, chain, configuration, limits
    /// and records were featurized before (each plugin's stage audited as
    /// a `plugin_call` with code `cached`), else by running the chain and
    /// keeping the result. A cache that cannot be written costs the next
    /// run its reuse, not this run its result.
    fn features_of(
        &self,
        who: &User,
        purpose: &str,
        version: &DatasetVersion,
        chain: &Chain,
        records: Vec<DataRecord>,
        stage: &mut dyn FnMut(&'static str, usize),
    ) -> Result<(Vec<String>, SparseBatch, usize), ServiceError> {
        let limit = self.env.limits().feature_cache_bytes();
        let cache = if limit == 0 {
            None
        } else {
            match FeatureCache::open(self.env.dir(), self.env.cache_secret(), limit) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "feature cache unavailable");
                    None
                }
            }
        };
        let plugins: Vec<(&crate::runtime::LoadedPlugin, &Config)> = chain
            .preprocess
            .iter()
            .map(|(_, p, c)| (p, c))
            .chain(std::iter::once((&chain.features.1, &chain.features.2)))
            .collect();
        let hexes: Vec<String> = plugins.iter().map(|(p, _)| p.digest.to_hex()).collect();
        let limits = format!("{:?}", self.env.limits().plugin_call_limits());
        let key = feature_cache::key(
            &version.digest,
            hexes
                .iter()
                .zip(&plugins)
                .map(|(digest, (_, config))| KeyPlugin {
                    digest,
                    config: config.as_slice(),
                })
                .chain(std::iter::once(KeyPlugin {
                    digest: &limits,
                    config: &[],
                })),
            records.iter().map(|r| r.id.as_str()),
        );
        if let Some(hit) = cache.as_ref().and_then(|c| c.get(&key)) {
            for (plugin, _) in &plugins {
                self.audit_cached_stage(who, purpose, plugin, records.len(), hit.ids.len())?;
            }
            stage("features from the cache", hit.ids.len());
            return Ok((hit.ids, hit.x, hit.dim));
        }
        let (records, x, dim) = self.run_chain(who, purpose, records, chain, stage)?;
        let entry = feature_cache::Entry {
            ids: records.into_iter().map(|r| r.id).collect(),
            x,
            dim,
        };
        if let Some(c) = &cache
            && let Err(e) = c.put(&key, &entry)
        {
            tracing::warn!(error = %e, "feature cache: entry not stored");
        }
        Ok((entry.ids, entry.x, entry.dim))
    }

    /// Stores a fitted model: its weights as safetensors in the
    /// environment directory, the copy to release (the input rows the
    /// disclosure check found disclosive zeroed), and its manifest with
    /// both digests and the disclosure report.
    pub(crate) fn register_model(&self, m: NewModel<'_>) -> Result<ModelManifest, ServiceError> {
        let weights = m.fitted.model.to_safetensors()?;
        let seed = model_seed(&m.id);
        let (report, released) = disclosure::check(
            &m.fitted.model,
            m.template.kind,
            m.evidence,
            &self.env.limits().disclosure(),
            seed,
        )?;
        let release_weights = released.to_safetensors()?;
        let manifest = ModelManifest {
            id: m.id,
            template: m.template.name.clone(),
            kind: m.template.kind,
            hyper: m.template.hyper.clone(),
            classes: m.classes,
            dim: m.dim,
            lineage: m.lineage,
            evaluation: m.evaluation,
            curve: m.fitted.curve.clone(),
            best_epoch: m.fitted.best_epoch,
            train_seconds: m.fitted.seconds,
            split_sizes: m.split_sizes,
            weights_sha256: Digest::of(&weights).to_hex(),
            created_by: m.created_by,
            created_ms: crate::time::now_ms(),
            release: Release::default(),
            disclosure: Some(report),
            release_weights_sha256: Some(Digest::of(&release_weights).to_hex()),
        };
        crate::models::save(
            self.env.store().as_ref(),
            self.env.dir(),
            &manifest,
            &weights,
            Some(&release_weights),
        )?;
        Ok(manifest)
    }
}

/// The seed of a model's disclosure measurements: from its id, so a
/// report can be recomputed.
pub(crate) fn model_seed(id: &str) -> u64 {
    u64::from_le_bytes(
        Digest::of(id.as_bytes()).0[..8]
            .try_into()
            .unwrap_or([0; 8]),
    )
}
