//! Training: one model from a template, and predictions through a
//! model's own plugin chain.

use serde::Serialize;

use crate::datasets::{self, DatasetVersion, Provenance, Split, StoredRecord};
use crate::models::ModelManifest;
use crate::policy::{Action, Resource};
use crate::train::Template;
use crate::types::DataRecord;
use crate::users::User;

use super::pipeline::{Chain, NewModel};
use super::{Cloister, ServiceError};
use crate::train::disclosure::Evidence;
use crate::types::Stage;

/// What `cloister train` asks for.
#[derive(Debug, Clone, Serialize)]
pub struct TrainRequest {
    /// `NAME` or `NAME@VERSION`.
    pub dataset: String,
    /// Approved preprocessors (digest, prefix or name), applied in order.
    pub preprocess: Vec<String>,
    /// Each preprocessor's configuration over its defaults, by position
    /// (absent or empty: the defaults); recorded in the lineage.
    pub preprocess_config: Vec<Vec<(String, String)>>,
    /// Approved featurizer digest.
    pub features: String,
    /// The featurizer's configuration, `(key, value)` pairs over its
    /// defaults (recorded in the model's lineage, so prediction and
    /// deployment featurize the same way).
    pub features_config: Vec<(String, String)>,
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
    /// A pipeline stage finished.
    Stage(Stage),
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

/// A training request that passed the authorization point, its template
/// parsed, its dataset version fixed and its plugins loaded: what
/// [`Cloister::run_training`] consumes. Only [`Cloister::plan_training`]
/// makes one, so holding a plan proves those checks passed (and were
/// audited) — a caller that trains in the background plans first and
/// refuses a bad request at once.
#[derive(Debug)]
pub struct TrainingPlan {
    who: User,
    id: String,
    template: Template,
    version: DatasetVersion,
    chain: Chain,
    split_seed: u64,
}

impl TrainingPlan {
    /// The id the model will have.
    pub fn model_id(&self) -> &str {
        &self.id
    }
}

/// The label a model trains on: a person's over a deployment client's
/// feedback over gold over an automatic one, the latest of each kind.
pub(crate) fn training_label(r: &StoredRecord) -> Option<String> {
    let pick = |f: &dyn Fn(&Provenance) -> bool| {
        r.labels
            .iter()
            .rev()
            .find(|l| f(&l.provenance))
            .map(|l| l.label.clone())
    };
    pick(&|p| matches!(p, Provenance::Human { .. }))
        .or_else(|| pick(&|p| matches!(p, Provenance::Feedback { .. })))
        .or_else(|| pick(&|p| matches!(p, Provenance::Gold)))
        .or_else(|| pick(&|p| matches!(p, Provenance::Auto { .. })))
}

impl Cloister {
    /// Authorizes a training request (`train_model`, audited), checks its
    /// template and settings, fixes the dataset version and loads its
    /// approved plugins (each `run_plugin`, audited). Nothing runs yet.
    pub fn plan_training(
        &self,
        who: &User,
        req: &TrainRequest,
    ) -> Result<TrainingPlan, ServiceError> {
        let template = crate::train::template(&req.template, &req.sets)?;
        let id = format!("m-{}", hex::encode(crate::env::random_bytes(6)?));
        let resource = Resource::bare_model(&id);
        // Authorized before anything is looked up, so a caller the
        // policies refuse learns nothing about which datasets or plugins
        // exist.
        self.guard(&who.principal(), Action::TrainModel, &resource, req)?;
        let version = datasets::resolve(&self.env, &req.dataset)?;
        if req.preprocess_config.len() > req.preprocess.len() {
            return Err(ServiceError::BadRequest(format!(
                "configuration for preprocessor {} given, but there {} {} preprocessor{}",
                req.preprocess_config.len(),
                if req.preprocess.len() == 1 {
                    "is"
                } else {
                    "are"
                },
                req.preprocess.len(),
                if req.preprocess.len() == 1 { "" } else { "s" },
            )));
        }
        let preprocess: Vec<_> = req
            .preprocess
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    d.clone(),
                    req.preprocess_config.get(i).cloned().unwrap_or_default(),
                )
            })
            .collect();
        let chain = self.load_chain(
            who,
            &preprocess,
            &(req.features.clone(), req.features_config.clone()),
        )?;
        let split_seed = req.split_seed.unwrap_or(template.hyper.seed);
        Ok(TrainingPlan {
            who: who.clone(),
            id,
            template,
            version,
            chain,
            split_seed,
        })
    }

    /// Runs a plan: the labeled records through the plugins in the
    /// sandbox, a model fitted from the template, evaluated on the test
    /// split and stored.
    pub fn run_training(
        &self,
        plan: TrainingPlan,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<ModelManifest, ServiceError> {
        let TrainingPlan {
            who,
            id,
            template,
            version,
            mut chain,
            split_seed,
        } = plan;
        let data = self.featurize_dataset(
            &who,
            &format!("train {id}"),
            &version,
            &mut chain,
            split_seed,
            training_label,
            &mut |stage| {
                // Training reads the labeled records only.
                let stage = if stage.what == "read" {
                    Stage {
                        what: "labeled",
                        ..stage
                    }
                } else {
                    stage
                };
                progress(TrainProgress::Stage(stage))
            },
        )?;
        let labels: Vec<String> = data.rows.iter().map(|(_, _, l)| l.clone()).collect();
        let (classes, index) = crate::train::class_index(&labels);
        let mut y = Vec::with_capacity(data.rows.len());
        let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
        for (row, (_, split, label)) in data.rows.iter().enumerate() {
            y.push(index[label]);
            match split {
                Split::Train => train.push(row),
                Split::Validation => val.push(row),
                Split::Test => test.push(row),
            }
        }
        let epochs = template.hyper.epochs;
        let (fitted, probs) = self.fit(
            &template,
            crate::train::TrainingSet {
                x: &data.x,
                dim: data.dim,
                y: &y,
                classes: classes.len(),
                train: &train,
                val: &val,
                budget_bytes: self.env.limits().training_budget_bytes(),
            },
            &test,
            &mut |e| progress(TrainProgress::Epoch(e.clone(), epochs)),
        )?;
        let ids: Vec<String> = test.iter().map(|&r| data.rows[r].0.clone()).collect();
        let truth: Vec<usize> = test.iter().map(|&r| y[r]).collect();
        let evaluation = crate::train::eval::evaluate(&classes, &ids, &truth, &probs);
        self.register_model(NewModel {
            id,
            template: &template,
            classes: classes.clone(),
            dim: data.dim,
            lineage: chain.lineage(&version, split_seed, None),
            evaluation,
            fitted: &fitted,
            split_sizes: [train.len() as u64, val.len() as u64, test.len() as u64],
            created_by: who.name.clone(),
            evidence: Evidence {
                x: &data.x,
                y: &y,
                train: &train,
                test: &test,
                classes: &classes,
            },
        })
    }

    /// Fits `template` and predicts the `predict` rows: on the
    /// environment's workers when `[workers]` is enabled (epochs are not
    /// reported then), in this process otherwise.
    pub(super) fn fit(
        &self,
        template: &crate::train::Template,
        set: crate::train::TrainingSet<'_>,
        predict: &[usize],
        progress: &mut dyn FnMut(&crate::train::EpochStats),
    ) -> Result<(crate::train::Fitted, Vec<f32>), ServiceError> {
        match (self.env.workers(), self.env.objects()) {
            (Some(workers), Some(objects)) => {
                Ok(workers.fit(objects, template, &set, predict, progress)?)
            }
            _ => Ok(crate::workers::fit_here(template, set, predict, progress)?),
        }
    }

    /// Runs approved plugins over a dataset in the sandbox, trains a model
    /// from a template, evaluates it on the test split and stores it:
    /// [`Cloister::plan_training`] then [`Cloister::run_training`].
    pub fn train_model(
        &self,
        who: &User,
        req: &TrainRequest,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<ModelManifest, ServiceError> {
        let plan = self.plan_training(who, req)?;
        self.run_training(plan, progress)
    }

    /// Measures canary exposure for a model trained by `train`
    /// ([`crate::train::disclosure::canary_exposure`]): its dataset
    /// version run again through its own chain (the feature cache makes
    /// that cheap), `planted` canaries added to the training split, the
    /// template retrained, and the exposure stored in the model's
    /// disclosure report. Authorized as training (it trains a model) on
    /// the model, and audited before it runs.
    pub fn measure_canaries(
        &self,
        who: &User,
        id: &str,
        planted: u32,
    ) -> Result<ModelManifest, ServiceError> {
        if !(1..=1000).contains(&planted) {
            return Err(ServiceError::BadRequest(format!(
                "--canaries: expected 1 to 1000 canaries, got {planted}"
            )));
        }
        let m = self.model_for(who, Action::TrainModel, id, &(id, "canaries", planted))?;
        let l = m.lineage.clone();
        if m.disclosure.is_none() {
            return Err(ServiceError::BadRequest(format!(
                "model {id} has no disclosure report to add the canaries to (it predates \
                 disclosure control): retrain it"
            )));
        }
        if l.job.is_some() {
            return Err(ServiceError::BadRequest(format!(
                "model {id} was trained by job {}: canary exposure needs the labels of a \
                 `cloister train` model (retrain it with `cloister train` to measure)",
                l.job.as_deref().unwrap_or("-")
            )));
        }
        let version = datasets::resolve(&self.env, &l.dataset)?;
        if version.digest != l.dataset_digest {
            return Err(ServiceError::BadRequest(format!(
                "dataset {} no longer matches the model's lineage",
                l.dataset
            )));
        }
        let mut chain = self.lineage_chain(who, &l)?;
        let data = self.featurize_dataset(
            who,
            &format!("canaries {id}"),
            &version,
            &mut chain,
            l.split_seed,
            training_label,
            &mut |_| {},
        )?;
        let class: std::collections::HashMap<&str, usize> = m
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut y = vec![0usize; data.rows.len()];
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (row, (_, split, label)) in data.rows.iter().enumerate() {
            let Some(&c) = class.get(label.as_str()) else {
                continue;
            };
            y[row] = c;
            match split {
                Split::Train => train.push(row),
                Split::Validation => val.push(row),
                Split::Test => {}
            }
        }
        let template = Template {
            name: m.template.clone(),
            kind: m.kind,
            description: String::new(),
            hyper: m.hyper.clone(),
        };
        let seed = super::pipeline::model_seed(id);
        let canaries = crate::train::disclosure::canary_exposure(
            &template,
            crate::train::TrainingSet {
                x: &data.x,
                dim: data.dim,
                y: &y,
                classes: m.classes.len(),
                train: &train,
                val: &val,
                budget_bytes: self.env.limits().training_budget_bytes(),
            },
            planted,
            1000,
            self.env.limits().disclosure().k,
            seed,
        )?;
        // On the manifest as stored now: a release decision made meanwhile
        // (in this process or another) is kept.
        Ok(crate::models::update(
            self.env.store().as_ref(),
            &m.id,
            |stored| {
                if let Some(report) = &mut stored.disclosure {
                    report.canaries = Some(canaries.clone());
                }
                Ok(())
            },
        )?)
    }

    /// Predicts on records the caller supplies (a plugin author's mock
    /// data), through the model's own plugin chain.
    pub fn predict(
        &self,
        who: &User,
        id: &str,
        records: &[DataRecord],
    ) -> Result<Predictions, ServiceError> {
        let m = self.model_for(who, Action::ViewModel, id, &(id, records.len()))?;
        let input = super::pipeline::unlabeled(records);
        let chain = self.lineage_chain(who, &m.lineage)?;
        let (input, x, _) =
            self.run_chain(who, &format!("predict {id}"), input, &chain, &mut |_| {})?;
        let model = crate::train::Trained::from_safetensors(
            m.kind,
            &crate::models::weights(self.env.dir(), self.env.objects(), &m)?,
        )?;
        let rows: Vec<usize> = (0..x.rows()).collect();
        let probs = model.predict(&x, &rows)?;
        Ok(Predictions {
            ids: input.into_iter().map(|r| r.id).collect(),
            classes: m.classes,
            probs,
        })
    }
}
