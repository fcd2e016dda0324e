//! The one training pipeline, shared by `train`, active-learning jobs and
//! `predict`: approved plugins loaded as a chain, records run through it,
//! and a fitted model registered with its lineage.
//!
//! ```text
//! load_chain ─▶ featurize_dataset (or run_chain on a caller's records)
//!            ─▶ train::fit ─▶ register_model
//! ```
//!
//! A fitted featurizer first fits on the training split's preprocessed
//! records (`fit`: terms in the sandbox, counted by the host, the
//! vocabulary stored by digest); the chain then carries that state, the
//! lineage names it, and `lineage_chain` loads it back for `predict`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::datasets::{self, DatasetVersion, Split, StoredRecord};
use crate::digest::Digest;
use crate::feature_cache::{self, FeatureCache, KeyPlugin};
use crate::models::{Lineage, ModelManifest, Release};
use crate::registry::PluginEntry;
use crate::runtime::LoadedPlugin;
use crate::train::disclosure::{self, Evidence};
use crate::train::{Fitted, Template, eval::Evaluation};
use crate::types::{DataRecord, PluginKind, SparseBatch, Stage, Vocabulary};
use crate::users::User;

use crate::workers::{StageOp, StageOutput};

use super::plugins::StageSetup;
use super::{Cloister, ServiceError};

/// A stage's output of another kind than its operation gives (a bug, not
/// a plugin's doing: the output's kind is the host's choice).
fn wrong_output() -> ServiceError {
    ServiceError::BadRequest("internal error: a plugin stage gave output of another kind".into())
}

/// A plugin's configuration: `(key, value)` pairs.
pub(crate) type Config = Vec<(String, String)>;

/// Approved plugins of one run, loaded (each load authorized and audited
/// as `run_plugin`): preprocessors in order, then the featurizer.
#[derive(Debug)]
pub(crate) struct Chain {
    pub(crate) preprocess: Vec<(PluginEntry, LoadedPlugin, Config)>,
    pub(crate) features: (PluginEntry, LoadedPlugin, Config),
    /// A fitted featurizer's vocabulary, once fitted (or loaded from a
    /// model's lineage); `None` for other featurizers.
    pub(crate) state: Option<FittedState>,
    /// A deployed model's chain: its successful stages are audited by the
    /// request's `predict` entry (see [`StageSetup::quiet`]).
    pub(crate) serving: bool,
}

/// How a chain's plugins are looked up and authorized: a digest and the
/// kind it must be, to the registry entry and the loaded component.
type PluginLoader<'a> =
    dyn Fn(&str, PluginKind) -> Result<(PluginEntry, LoadedPlugin), ServiceError> + 'a;

/// Records a caller supplies, without their labels: features never see
/// the target (`predict` on mock data, a deployment's requests).
pub(crate) fn unlabeled(records: &[DataRecord]) -> Vec<DataRecord> {
    records
        .iter()
        .map(|r| DataRecord {
            label: None,
            ..r.clone()
        })
        .collect()
}

/// What went wrong with a chain on stored records (`what`: a plugin's
/// sealed failure, or that the preprocessors kept nothing), told more
/// precisely when the chain's configuration names a field the dataset does
/// not have — the commonest mistake with a new dataset (`field=text` on
/// data whose text is in `review`). By convention a key named `field` or
/// `fields` holds record field names (comma-separated; `*` for all), as in
/// every bundled plugin. Only the user's own setting (or the plugin's
/// registered default) and the dataset's name are repeated; the dataset's
/// field list is left to `dataset stats`, which has its own permission.
fn missing_field(what: String, version: &DatasetVersion, chain: &Chain) -> Option<ServiceError> {
    let places = chain
        .preprocess
        .iter()
        .enumerate()
        .map(|(i, (entry, _, config))| (format!("preprocessor {}", i + 1), entry, config))
        .chain(std::iter::once((
            "the featurizer".to_string(),
            &chain.features.0,
            &chain.features.2,
        )));
    for (place, entry, config) in places {
        for key in ["field", "fields"] {
            let value = config
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .or_else(|| {
                    entry
                        .config
                        .iter()
                        .find(|c| c.name == key)
                        .map(|c| c.default_value.as_str())
                });
            let Some(value) = value else { continue };
            let missing = value
                .split(',')
                .map(str::trim)
                .find(|f| !f.is_empty() && *f != "*" && !version.stats.fields.contains_key(*f));
            if let Some(field) = missing {
                let dataset = version.reference();
                return Some(ServiceError::FieldNotInDataset(format!(
                    "{what}; {place}'s `{key}` is `{field}`, and dataset {dataset} has no field \
                     `{field}` (`cloister dataset stats {dataset}` lists its fields)"
                )));
            }
        }
    }
    None
}

/// What a fitted featurizer learnt, by digest.
#[derive(Debug, Clone)]
pub(crate) struct FittedState {
    pub(crate) digest: Digest,
    pub(crate) vocabulary: Arc<Vocabulary>,
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
            features_state: self.state.as_ref().map(|s| s.digest.to_hex()),
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
        self.load_chain_with(preprocess, features, &|digest, kind| {
            self.load_approved(who, digest, kind)
        })
    }

    /// [`Cloister::load_chain`] with `load` deciding how each plugin is
    /// looked up and authorized.
    fn load_chain_with(
        &self,
        preprocess: &[(String, Config)],
        features: &(String, Config),
        load: &PluginLoader<'_>,
    ) -> Result<Chain, ServiceError> {
        let mut pre = Vec::with_capacity(preprocess.len());
        for (digest, config) in preprocess {
            let (entry, loaded) = load(digest, PluginKind::Preprocessor)?;
            pre.push((entry, loaded, config.clone()));
        }
        let (entry, loaded) = load(&features.0, PluginKind::Featurizer)?;
        Ok(Chain {
            preprocess: pre,
            features: (entry, loaded, features.1.clone()),
            state: None,
            serving: false,
        })
    }

    /// Loads a model's own chain from its lineage, each plugin with the
    /// configuration it was trained with.
    pub(crate) fn lineage_chain(&self, who: &User, l: &Lineage) -> Result<Chain, ServiceError> {
        self.lineage_chain_with(l, &|digest, kind| self.load_approved(who, digest, kind))
    }

    /// A deployed model's chain. The request was authorized as `predict`
    /// on the deployment, and the model as `deploy_model` when it was
    /// added; each plugin must still be approved in the registry, exactly
    /// this digest, or nothing runs.
    pub(crate) fn serving_chain(&self, l: &Lineage) -> Result<Chain, ServiceError> {
        let mut chain = self.lineage_chain_with(l, &|digest, kind| {
            let store = self.env.store();
            let entry = crate::registry::get(store.as_ref(), digest)?;
            if entry.approval.is_none() {
                return Err(ServiceError::BadRequest(format!(
                    "plugin {} of the deployed model is not approved",
                    &digest[..digest.len().min(16)]
                )));
            }
            let bytes = crate::registry::bytes(store.as_ref(), self.env.objects(), &entry)?;
            let loaded = self.runtime()?.load(&bytes)?;
            loaded.require(kind)?;
            Ok((entry, loaded))
        })?;
        chain.serving = true;
        Ok(chain)
    }

    fn lineage_chain_with(
        &self,
        l: &Lineage,
        load: &PluginLoader<'_>,
    ) -> Result<Chain, ServiceError> {
        let preprocess: Vec<_> = l
            .preprocess
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let config = l.preprocess_config.get(i).cloned().unwrap_or_default();
                (d.clone(), config)
            })
            .collect();
        let mut chain = self.load_chain_with(
            &preprocess,
            &(l.features.clone(), l.features_config.clone()),
            load,
        )?;
        match (&l.features_state, chain.features.1.fitted) {
            (Some(hex), true) => {
                let digest: Digest = hex.parse().map_err(|_| {
                    ServiceError::BadRequest(format!(
                        "the lineage names a fitted state that is not a digest: {hex}"
                    ))
                })?;
                let vocabulary = crate::fitted::get(self.env.store().as_ref(), &digest)?;
                chain.state = Some(FittedState {
                    digest,
                    vocabulary: Arc::new(vocabulary),
                });
            }
            (None, false) => {}
            (None, true) => {
                return Err(ServiceError::BadRequest(
                    "the model's featurizer is fitted but its lineage names no fitted state".into(),
                ));
            }
            (Some(_), false) => {
                return Err(ServiceError::BadRequest(
                    "the model's lineage names a fitted state but its featurizer is not fitted"
                        .into(),
                ));
            }
        }
        Ok(chain)
    }

    /// Runs records through a chain, every stage audited (see
    /// [`Cloister::plugin_stage`]): the records the preprocessors kept, their
    /// features and the featurizer's dimension.
    pub(crate) fn run_chain(
        &self,
        who: &User,
        purpose: &str,
        records: Vec<DataRecord>,
        chain: &Chain,
        stage: &mut dyn FnMut(Stage),
    ) -> Result<(Vec<DataRecord>, SparseBatch, usize), ServiceError> {
        let records = self.preprocess_records(who, purpose, records, chain, stage)?;
        let (x, dim) = self.featurize_records(who, purpose, &records, chain, stage)?;
        Ok((records, x, dim))
    }

    /// The chain's preprocessors over `records`, in order, each stage
    /// audited: the records they kept.
    fn preprocess_records(
        &self,
        who: &User,
        purpose: &str,
        mut records: Vec<DataRecord>,
        chain: &Chain,
        stage: &mut dyn FnMut(Stage),
    ) -> Result<Vec<DataRecord>, ServiceError> {
        for (_, plugin, config) in &chain.preprocess {
            let (out, _) = self.chain_stage(
                who,
                purpose,
                plugin,
                config,
                StageSetup {
                    quiet: chain.serving,
                    ..StageSetup::default()
                },
                StageOp::Preprocess,
                &records,
            )?;
            let StageOutput::Records(kept) = out else {
                return Err(wrong_output());
            };
            records = kept;
            stage(Stage::records("preprocessed", records.len()));
        }
        Ok(records)
    }

    /// The chain's featurizer over preprocessed `records` (a fitted one
    /// loaded with the chain's state, which it must have), audited: the
    /// features and the dimension.
    fn featurize_records(
        &self,
        who: &User,
        purpose: &str,
        records: &[DataRecord],
        chain: &Chain,
        stage: &mut dyn FnMut(Stage),
    ) -> Result<(SparseBatch, usize), ServiceError> {
        let (_, featurizer, config) = &chain.features;
        let vocabulary = match (&chain.state, featurizer.fitted) {
            (Some(s), true) => Some(s.vocabulary.clone()),
            (None, false) => None,
            _ => {
                return Err(ServiceError::BadRequest(
                    "a fitted featurizer runs only after its fit, with its state".into(),
                ));
            }
        };
        let (out, dim) = self.chain_stage(
            who,
            purpose,
            featurizer,
            config,
            StageSetup {
                fit: false,
                vocabulary,
                quiet: chain.serving,
            },
            StageOp::Featurize,
            records,
        )?;
        let StageOutput::Features(x) = out else {
            return Err(wrong_output());
        };
        stage(Stage::records("featurized", x.rows()));
        Ok((x, dim as usize))
    }

    /// Fits the chain's featurizer on `train` (preprocessed training
    /// records): each record's term keys from a fresh sandboxed instance
    /// (audited as the `fit` stage), counted into a vocabulary of the keys
    /// at least k of them contain, stored by digest with `fit_key`.
    fn fit_featurizer(
        &self,
        who: &User,
        purpose: &str,
        train: &[DataRecord],
        chain: &mut Chain,
        fit_key: &Digest,
        stage: &mut dyn FnMut(Stage),
    ) -> Result<(), ServiceError> {
        let (_, featurizer, config) = &chain.features;
        let (out, _) = self.chain_stage(
            who,
            purpose,
            featurizer,
            config,
            StageSetup {
                fit: true,
                ..StageSetup::default()
            },
            StageOp::Terms {
                max_distinct: crate::fitted::MAX_DISTINCT,
            },
            train,
        )?;
        let StageOutput::Terms(terms) = out else {
            return Err(wrong_output());
        };
        let limits = self.env.limits();
        let cap =
            (limits.plugin_call_limits().max_dimension as usize).min(crate::fitted::MAX_TERMS);
        let vocabulary =
            crate::fitted::vocabulary(terms.documents, terms.counts, limits.disclosure().k, cap)?;
        let mut batch = crate::store::WriteBatch::new();
        let digest = crate::fitted::put(&mut batch, Some(fit_key), &vocabulary);
        self.env.store().commit(batch)?;
        stage(Stage::terms("fitted vocabulary", vocabulary.keys.len()));
        chain.state = Some(FittedState {
            digest,
            vocabulary: Arc::new(vocabulary),
        });
        Ok(())
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
        chain: &mut Chain,
        split_seed: u64,
        mut keep: impl FnMut(&StoredRecord) -> Option<T>,
        stage: &mut dyn FnMut(Stage),
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
        stage(Stage::records("read", records.len()));
        let in_fit = |id: &str| meta.get(id).is_some_and(|(s, _)| *s == Split::Train);
        let given = records.len();
        let (ids, x, dim) = self
            .features_of(who, purpose, version, chain, records, &in_fit, stage)
            .map_err(|e| match e {
                ServiceError::Runtime(r) if r.code() == "plugin-error" => {
                    missing_field(r.to_string(), version, chain).unwrap_or(ServiceError::Runtime(r))
                }
                // A fit with nothing to learn from: the preprocessors may
                // have dropped every record.
                ServiceError::Fit(f @ crate::fitted::FitError::Empty { .. }) => {
                    missing_field(f.to_string(), version, chain).unwrap_or(ServiceError::Fit(f))
                }
                other => other,
            })?;
        if ids.is_empty()
            && given > 0
            && let Some(e) = missing_field(
                format!("the preprocessors kept none of the {given} records"),
                version,
                chain,
            )
        {
            return Err(e);
        }
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
    ///
    /// A fitted featurizer without a state is fitted on the records
    /// `in_fit` accepts (the training split), after preprocessing — or
    /// takes the state an identical fit stored before (audited as a
    /// `cached` fit) — and the state's digest joins the cache key.
    #[allow(clippy::too_many_arguments)]
    fn features_of(
        &self,
        who: &User,
        purpose: &str,
        version: &DatasetVersion,
        chain: &mut Chain,
        records: Vec<DataRecord>,
        in_fit: &dyn Fn(&str) -> bool,
        stage: &mut dyn FnMut(Stage),
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
        let fitted = chain.features.1.fitted;
        let limits = format!("{:?}", self.env.limits().plugin_call_limits());
        // Everything a fit depends on: the chain, the limits, the minimum
        // count and the training records' ids.
        let fit_key = fitted.then(|| {
            let floor = format!(
                "fit k={} max_terms={}",
                self.env.limits().disclosure().k,
                crate::fitted::MAX_TERMS
            );
            let mut fit_ids: Vec<&str> = records
                .iter()
                .map(|r| r.id.as_str())
                .filter(|id| in_fit(id))
                .collect();
            fit_ids.sort_unstable();
            chain_key(version, chain, &[&limits, &floor], fit_ids.into_iter())
        });
        if let (Some(fit_key), None) = (&fit_key, &chain.state)
            && let Some(digest) = crate::fitted::lookup(self.env.store().as_ref(), fit_key)?
        {
            let vocabulary = crate::fitted::get(self.env.store().as_ref(), &digest)?;
            self.audit_cached_stage(
                who,
                purpose,
                &chain.features.1,
                vocabulary.documents as usize,
                vocabulary.documents as usize,
                true,
            )?;
            stage(Stage::terms(
                "fitted vocabulary from the store",
                vocabulary.keys.len(),
            ));
            chain.state = Some(FittedState {
                digest,
                vocabulary: Arc::new(vocabulary),
            });
        }
        // The cache key names the input records (before preprocessing)
        // and, for a fitted featurizer, its state.
        let input_ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let key_of = |chain: &Chain| {
            let state = chain
                .state
                .as_ref()
                .map(|s| format!("state {}", s.digest.to_hex()))
                .unwrap_or_default();
            chain_key(
                version,
                chain,
                &[&limits, &state],
                input_ids.iter().map(String::as_str),
            )
        };
        if !fitted || chain.state.is_some() {
            let key = key_of(chain);
            if let Some(hit) = cache.as_ref().and_then(|c| c.get(&key)) {
                for plugin in chain_plugins(chain).map(|(p, _)| p) {
                    self.audit_cached_stage(
                        who,
                        purpose,
                        plugin,
                        records.len(),
                        hit.ids.len(),
                        false,
                    )?;
                }
                stage(Stage::records("features from the cache", hit.ids.len()));
                return Ok((hit.ids, hit.x, hit.dim));
            }
        }
        let records = self.preprocess_records(who, purpose, records, chain, stage)?;
        if let (Some(fit_key), None) = (&fit_key, &chain.state) {
            let train: Vec<DataRecord> =
                records.iter().filter(|r| in_fit(&r.id)).cloned().collect();
            self.fit_featurizer(who, purpose, &train, chain, fit_key, stage)?;
        }
        let key = key_of(chain);
        let (x, dim) = self.featurize_records(who, purpose, &records, chain, stage)?;
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
        let (mut report, released) = disclosure::check(
            &m.fitted.model,
            m.template.kind,
            m.evidence,
            &self.env.limits().disclosure(),
            seed,
        )?;
        if let Some(hex) = &m.lineage.features_state {
            let digest: Digest = hex.parse().map_err(|_| {
                ServiceError::BadRequest(format!("fitted state {hex} is not a digest"))
            })?;
            let v = crate::fitted::get(self.env.store().as_ref(), &digest)?;
            report.add_vocabulary(disclosure::VocabularySupport {
                terms: v.keys.len() as u64,
                documents: u64::from(v.documents),
                min_records: u64::from(crate::fitted::df_range(&v).0),
            });
        }
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
            self.env.objects(),
            &manifest,
            &weights,
            Some(&release_weights),
        )?;
        Ok(manifest)
    }
}

/// The chain's plugins with their configurations: preprocessors in order,
/// then the featurizer.
fn chain_plugins(chain: &Chain) -> impl Iterator<Item = (&LoadedPlugin, &Config)> {
    chain
        .preprocess
        .iter()
        .map(|(_, p, c)| (p, c))
        .chain(std::iter::once((&chain.features.1, &chain.features.2)))
}

/// The digest of everything a chain's output on `ids` of `version`
/// depends on: the dataset, each plugin with its configuration, and
/// `extra` (the limits, a fit's floor, a state's digest).
fn chain_key<'a>(
    version: &DatasetVersion,
    chain: &Chain,
    extra: &[&str],
    ids: impl Iterator<Item = &'a str>,
) -> Digest {
    let plugins: Vec<(String, &Config)> = chain_plugins(chain)
        .map(|(p, c)| (p.digest.to_hex(), c))
        .collect();
    feature_cache::key(
        &version.digest,
        plugins
            .iter()
            .map(|(digest, config)| KeyPlugin {
                digest,
                config: config.as_slice(),
            })
            .chain(extra.iter().filter(|e| !e.is_empty()).map(|e| KeyPlugin {
                digest: e,
                config: &[],
            })),
        ids,
    )
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
