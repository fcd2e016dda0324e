//! Starting and driving jobs, and the human queue: the operations behind
//! `cloister run`, `cloister job …` and `cloister label …`. Every one
//! passes [`Cloister::guard`]; every step of a job is authorized (and so
//! audited) again before it takes effect.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use super::spec::{ModelUse, PluginUse};
use super::{
    Answer, FinalReport, Job, JobError, JobState, JobStats, LabelKind, LedgerLabel, LedgerSource,
    ModelScore, Oracle, PipelineSpec, PreparedRow, QueueItem, QueueReason, ResolvedPlugins,
    RoundReport, SelectorUse, Step,
};
use crate::datasets::{self, DatasetVersion, LabelEntry, Provenance, Split, StoredRecord};
use crate::digest::Digest;
use crate::policy::{Action, Resource, Role};
use crate::registry::{self, PluginEntry};
use crate::runtime::LoadedPlugin;
use crate::service::{Cloister, ServiceError};
use crate::store::WriteBatch;
use crate::train::{self, Template};
use crate::types::{self, PluginKind, PredictionSet, SparseBatch};
use crate::users::User;

/// What a running job reports.
#[derive(Debug)]
pub enum JobEvent<'a> {
    /// A stage of preparing the data finished: (stage, records out).
    Stage(&'static str, usize),
    /// A model of the committee is training.
    Training {
        /// Round.
        round: u32,
        /// Template.
        template: &'a str,
        /// Labeled training records.
        records: usize,
    },
    /// A model finished.
    Trained {
        /// Round.
        round: u32,
        /// Its scores.
        score: &'a ModelScore,
    },
    /// A round's select step committed.
    Round(&'a RoundReport),
    /// A round's answers committed.
    Answered {
        /// Round.
        round: u32,
        /// Answers collected.
        answered: u64,
    },
    /// The queue waits for labelers.
    Waiting {
        /// Open items.
        open: u64,
    },
    /// The job finished.
    Finished(&'a FinalReport),
}

/// An approved plugin loaded for a job, with its resolved config.
type Resolved = (PluginEntry, LoadedPlugin, Vec<(String, String)>);

/// One entry of a label file: (line, record id, label, job).
type LabelLine = (usize, String, String, Option<String>);

/// What a labeler is shown: the queue item, the record, how many items
/// wait for them (this one included) and the labels to choose from.
#[derive(Debug, Clone)]
pub struct LabelTask {
    /// The queue item.
    pub item: QueueItem,
    /// The record with its text.
    pub record: StoredRecord,
    /// Items waiting for this labeler.
    pub waiting: usize,
    /// The job's classes.
    pub classes: Vec<String>,
}

/// The data of a job, run through its plugins.
struct Prepared {
    version: DatasetVersion,
    rows: Vec<PreparedRow>,
    index: HashMap<String, usize>,
    x: SparseBatch,
    dim: usize,
    selector: Option<Resolved>,
    /// The committee of a select step that stopped the loop, with the
    /// labels it trained on: the finish step reuses it when nothing changed.
    stopped: Option<(Vec<(usize, usize)>, Committee)>,
}

/// The labels a step trains and evaluates on.
struct Labels {
    y: Vec<usize>,
    train: Vec<usize>,
    val: Vec<usize>,
    test: Vec<usize>,
    pool: Vec<usize>,
    manual: u64,
    auto: u64,
    other: u64,
}

/// A committee's predictions: per model, row-major probabilities over
/// `rows`.
struct Committee {
    scores: Vec<ModelScore>,
    fitted: Vec<train::Fitted>,
    /// Mean of the models' validation probabilities (computed once, while
    /// scoring each model).
    val_mean: Vec<f32>,
}

fn spec_err(job_file: &str, spec_text: &str, key: &str, message: String) -> ServiceError {
    let line = spec_text
        .lines()
        .position(|l| l.contains(key))
        .map(|i| i + 1);
    JobError::Spec {
        file: job_file.to_string(),
        line,
        message,
    }
    .into()
}

fn mean_probs(per_model: &[Vec<f32>]) -> Vec<f32> {
    let n = per_model.len().max(1) as f32;
    let mut out = vec![0f32; per_model.first().map_or(0, Vec::len)];
    for p in per_model {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v / n;
        }
    }
    out
}

/// The committee's prediction for one record: the class with the highest
/// mean probability over the models, the first on ties.
fn predicted_class(models: &[Vec<f32>]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (c, p) in mean_probs(models).into_iter().enumerate() {
        if p > best.1 {
            best = (c, p);
        }
    }
    best.0
}

/// Up to `take` of `review` (sorted most urgent first; entries are
/// priority, row, predicted class), spread over the predicted classes: one
/// from each class in turn, classes in the order of their most urgent
/// record, and within a class most urgent first.
fn balance_by_class(review: &[(f32, usize, usize)], take: usize) -> Vec<(f32, usize)> {
    let mut order: Vec<usize> = Vec::new();
    let mut by_class: HashMap<usize, Vec<(f32, usize)>> = HashMap::new();
    for &(p, i, c) in review {
        let group = by_class.entry(c).or_insert_with(|| {
            order.push(c);
            Vec::new()
        });
        group.push((p, i));
    }
    let want = take.min(review.len());
    let mut out = Vec::with_capacity(want);
    let mut rank = 0;
    while out.len() < want {
        for c in &order {
            if out.len() == want {
                break;
            }
            if let Some(&item) = by_class.get(c).and_then(|g| g.get(rank)) {
                out.push(item);
            }
        }
        rank += 1;
    }
    out
}

/// Deterministic model ids for a job's final models, so a finish step that
/// is redone after a crash finds the models it already saved.
fn final_model_id(job: &str, k: usize) -> String {
    let d = Digest::of(format!("{job}/final/{k}").as_bytes()).to_hex();
    format!("m-{}", &d[..12])
}

impl Cloister {
    fn job_resource(job: &Job) -> Resource {
        Resource::Job {
            id: job.id.clone(),
            started_by: job.started_by.clone(),
        }
    }

    fn dataset_resource(job: &Job) -> Resource {
        Resource::Dataset {
            name: job
                .dataset
                .split('@')
                .next()
                .unwrap_or(&job.dataset)
                .to_string(),
        }
    }

    /// Finds the one approved plugin of `kind` named (or digest-prefixed)
    /// `name`, authorizes running it and loads it.
    fn resolve_plugin(
        &self,
        who: &User,
        spec: (&str, &str),
        section: &str,
        use_: &PluginUse,
        kind: PluginKind,
    ) -> Result<Resolved, ServiceError> {
        let (file, text) = spec;
        let all = registry::list(self.env().store().as_ref())?;
        let named: Vec<&PluginEntry> = all
            .iter()
            .filter(|e| e.name == use_.plugin || e.digest.starts_with(&use_.plugin))
            .collect();
        let bad = |m: String| spec_err(file, text, &use_.plugin, format!("{section}: {m}"));
        if named.is_empty() {
            return Err(bad(format!(
                "no registered plugin is named `{}` (see `cloister plugin list`)",
                use_.plugin
            )));
        }
        let of_kind: Vec<&PluginEntry> = named.iter().copied().filter(|e| e.kind == kind).collect();
        if of_kind.is_empty() {
            return Err(bad(format!(
                "plugin `{}` is a {}, not a {}",
                use_.plugin,
                named[0].kind.as_str(),
                kind.as_str()
            )));
        }
        let approved: Vec<&PluginEntry> = of_kind
            .iter()
            .copied()
            .filter(|e| e.approval.is_some())
            .collect();
        let entry = match approved.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(bad(format!(
                    "plugin `{}` is not approved (a reviewer must approve its digest {})",
                    use_.plugin,
                    &of_kind[0].digest[..12]
                )));
            }
            many => {
                let digests: Vec<&str> = many.iter().map(|e| &e.digest[..12]).collect();
                return Err(bad(format!(
                    "`{}` names several approved plugins ({}): give a digest prefix",
                    use_.plugin,
                    digests.join(", ")
                )));
            }
        };
        let (entry, loaded) = self.load_approved(who, &entry.digest, kind)?;
        let config = loaded
            .resolve_config(&use_.config)
            .map_err(|e| bad(format!("plugin `{}`: {e}", use_.plugin)))?;
        // Configure one instance now (audited like every plugin stage): a
        // bad value fails before anything runs.
        match self.plugin_stage(
            who,
            &format!("start job ({section} configuration check)"),
            &loaded,
            &config,
            0,
            |r| r.check_configuration(),
            |_| 0,
        ) {
            Ok(_) => {}
            Err(ServiceError::Runtime(e)) => {
                // The keys the user gave are host-side context; which of them
                // the plugin objected to is its choice, so it is not said.
                let given: Vec<&str> = use_.config.iter().map(|(k, _)| k.as_str()).collect();
                let context = if given.is_empty() {
                    String::new()
                } else {
                    format!(" (configuration given: {})", given.join(", "))
                };
                return Err(bad(format!("plugin `{}`: {e}{context}", use_.plugin)));
            }
            Err(e) => return Err(e),
        }
        Ok((entry, loaded, config))
    }

    /// Validates a pipeline spec against the environment and records a new
    /// job (nothing runs yet: see [`Cloister::run_job`]). `oracle`
    /// overrides the spec's `oracle`.
    pub fn start_job(
        &self,
        who: &User,
        file: &str,
        text: &str,
        oracle: Option<Oracle>,
    ) -> Result<Job, ServiceError> {
        let mut spec = PipelineSpec::parse(file, text)?;
        if oracle.is_some() {
            spec.oracle = oracle;
        }
        let version = datasets::resolve(self.env(), &spec.dataset)
            .map_err(|e| spec_err(file, text, "dataset", format!("dataset: {e}")))?;
        let spec_digest = Digest::of(text.as_bytes()).to_hex();
        self.guard(
            &who.principal(),
            Action::RunJob,
            &Resource::Dataset {
                name: version.name.clone(),
            },
            &(&spec_digest, version.reference()),
        )?;
        let at = (file, text);
        let mut preprocess = Vec::new();
        for p in &spec.preprocess {
            let (e, _, c) =
                self.resolve_plugin(who, at, "preprocess", p, PluginKind::Preprocessor)?;
            preprocess.push((e.digest, c));
        }
        let (fe, _, fc) =
            self.resolve_plugin(who, at, "features", &spec.features, PluginKind::Featurizer)?;
        let selector = match &spec.selector {
            SelectorUse::Plugin(p) => {
                let (e, _, c) =
                    self.resolve_plugin(who, at, "[selector]", p, PluginKind::Selector)?;
                Some((e.digest, c))
            }
            SelectorUse::Random => None,
        };
        for m in &spec.models {
            train::template(&m.template, &m.sets).map_err(|e| {
                spec_err(
                    file,
                    text,
                    &m.template,
                    format!("[[model]] template `{}`: {e}", m.template),
                )
            })?;
        }
        if spec.oracle.is_none() {
            if spec.labelers.is_empty() {
                return Err(spec_err(
                    file,
                    text,
                    "labelers",
                    "labelers: name at least one labeler (or run with the gold oracle)".into(),
                ));
            }
            // One answer whether the user is missing, disabled or not a
            // labeler: a spec is no way to learn which names exist. (The
            // request itself was authorized and audited above, with the
            // spec's digest.)
            for name in &spec.labelers {
                let active = crate::users::get(self.env().store().as_ref(), name)
                    .is_ok_and(|u| u.roles.contains(&Role::Labeler) && !u.disabled);
                if !active {
                    return Err(spec_err(
                        file,
                        text,
                        name,
                        format!("labelers: `{name}` is not an active labeler"),
                    ));
                }
            }
        }
        let mut classes: HashSet<String> = version.stats.labels.keys().cloned().collect();
        for labels in datasets::human_labels(self.env(), &version)?.values() {
            classes.extend(labels.iter().map(|(_, l)| l.clone()));
        }
        let mut classes: Vec<String> = classes.into_iter().collect();
        classes.sort();
        if classes.len() < 2 {
            return Err(spec_err(
                file,
                text,
                "dataset",
                format!(
                    "dataset: {} has {} class(es) among its labels; the committee needs at least two",
                    version.reference(),
                    classes.len()
                ),
            ));
        }
        let now = crate::time::now_ms();
        let job = Job {
            id: format!("j-{}", hex::encode(crate::env::random_bytes(6)?)),
            file: file.to_string(),
            spec_text: text.to_string(),
            spec,
            spec_digest,
            started_by: who.name.clone(),
            created_ms: now,
            updated_ms: now,
            dataset: version.reference(),
            dataset_digest: version.digest.clone(),
            plugins: ResolvedPlugins {
                preprocess,
                features: (fe.digest, fc),
                selector,
            },
            classes,
            state: JobState::Running,
            next: Step::Select(0),
            pool_size: 0,
            rounds: Vec::new(),
            result: None,
        };
        let mut b = WriteBatch::new();
        super::put_job(&mut b, &job)?;
        self.env().store().commit(b)?;
        Ok(job)
    }

    /// Lists jobs.
    pub fn list_jobs(&self, who: &User) -> Result<Vec<Job>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListJobs,
            &Resource::Environment,
            &(),
        )?;
        let all = super::list(self.env().store().as_ref())?;
        Ok(all
            .into_iter()
            .filter(|j| self.allows(&who.principal(), Action::ViewJob, &Self::job_resource(j)))
            .collect())
    }

    /// One job.
    pub fn show_job(&self, who: &User, id: &str) -> Result<Job, ServiceError> {
        let job = super::get(self.env().store().as_ref(), id)?;
        self.guard(
            &who.principal(),
            Action::ViewJob,
            &Self::job_resource(&job),
            &id,
        )?;
        Ok(job)
    }

    /// Statistics of a job.
    pub fn job_stats(&self, who: &User, id: &str) -> Result<JobStats, ServiceError> {
        let job = self.show_job(who, id)?;
        let store = self.env().store();
        let ledger = super::ledger(store.as_ref(), id)?;
        let queue = super::queue(store.as_ref(), id)?;
        let version = datasets::resolve(self.env(), &job.dataset)?;
        let mut humans = datasets::human_labels(self.env(), &version)?;
        humans.retain(|k, _| queue.contains_key(k));
        Ok(super::stats(&job, &ledger, &queue, &humans))
    }

    /// Cancels a job; it stops at its next step boundary.
    pub fn cancel_job(&self, who: &User, id: &str) -> Result<Job, ServiceError> {
        let job = super::get(self.env().store().as_ref(), id)?;
        self.guard(
            &who.principal(),
            Action::CancelJob,
            &Self::job_resource(&job),
            &id,
        )?;
        if matches!(
            job.state,
            JobState::Done { .. } | JobState::Cancelled { .. }
        ) {
            return Err(JobError::State {
                id: id.into(),
                state: job.state.name().into(),
                what: "it cannot be cancelled",
            }
            .into());
        }
        super::cancel(self.env().store().as_ref(), id, &who.name)?;
        Ok(super::get(self.env().store().as_ref(), id)?)
    }

    /// Runs (or resumes) a job until it finishes, waits for labelers, is
    /// cancelled or fails. A failed step is recorded (`failed`) and can be
    /// retried with another call.
    pub fn run_job(
        &self,
        who: &User,
        id: &str,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Job, ServiceError> {
        let job = super::get(self.env().store().as_ref(), id)?;
        self.guard(
            &who.principal(),
            Action::RunJob,
            &Self::dataset_resource(&job),
            &(id, "run"),
        )?;
        match &job.state {
            JobState::Done { .. } | JobState::Cancelled { .. } => {
                return Err(JobError::State {
                    id: id.into(),
                    state: job.state.name().into(),
                    what: "there is nothing to run",
                }
                .into());
            }
            _ => {}
        }
        let _claim = self.claim_job(id)?;
        let mut prep = match self.prepare(who, &job, progress) {
            Ok(p) => p,
            Err(e) => return Err(self.fail(job, e)),
        };
        loop {
            let mut job = super::get(self.env().store().as_ref(), id)?;
            if matches!(job.state, JobState::Cancelled { .. }) {
                return Ok(job);
            }
            let step = job.next;
            let result = self
                .guard(
                    &who.principal(),
                    Action::RunJob,
                    &Self::dataset_resource(&job),
                    &(id, step),
                )
                .and_then(|()| match step {
                    Step::Select(r) => self.step_select(who, &mut job, r, &mut prep, progress),
                    Step::Answer(r) => self.step_answer(&mut job, r, &prep, progress),
                    Step::Finish => self.step_finish(who, &mut job, &mut prep, progress),
                    Step::End => Ok(false),
                });
            match result {
                Ok(true) => {}
                Ok(false) => return Ok(job),
                Err(e) => return Err(self.fail(job, e)),
            }
        }
    }

    /// Records a failed step (best effort) and passes the error on.
    fn fail(&self, mut job: Job, e: ServiceError) -> ServiceError {
        if matches!(e, ServiceError::Denied { .. }) {
            return e;
        }
        job.state = JobState::Failed {
            error: e.to_string(),
        };
        job.updated_ms = crate::time::now_ms();
        let mut b = WriteBatch::new();
        if super::put_job(&mut b, &job).is_ok()
            && let Err(store_err) = self.env().store().commit(b)
        {
            tracing::warn!(job = %job.id, error = %store_err, "could not record the failure");
        }
        e
    }

    /// Loads the plugins the job fixed, runs the dataset through them.
    fn prepare(
        &self,
        who: &User,
        job: &Job,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Prepared, ServiceError> {
        let version = datasets::resolve(self.env(), &job.dataset)?;
        if version.digest != job.dataset_digest {
            return Err(ServiceError::BadRequest(format!(
                "dataset {} changed since the job started",
                job.dataset
            )));
        }
        let mut pre = Vec::new();
        for (d, c) in &job.plugins.preprocess {
            pre.push((
                self.load_approved(who, d, PluginKind::Preprocessor)?.1,
                c.clone(),
            ));
        }
        let (fd, fc) = &job.plugins.features;
        let (_, featurizer) = self.load_approved(who, fd, PluginKind::Featurizer)?;
        let selector = match &job.plugins.selector {
            Some((d, c)) => {
                let (e, l) = self.load_approved(who, d, PluginKind::Selector)?;
                Some((e, l, c.clone()))
            }
            None => None,
        };
        let seed = job.spec.split_seed;
        let mut records = Vec::new();
        let mut meta: HashMap<String, (Split, Option<String>)> = HashMap::new();
        for r in datasets::records(self.env(), &version) {
            let r = r?;
            let gold = r
                .labels
                .iter()
                .find(|l| l.provenance == Provenance::Gold)
                .map(|l| l.label.clone());
            meta.insert(
                r.record.id.clone(),
                (datasets::split_of(&r.record, seed), gold),
            );
            records.push(r.record);
        }
        progress(JobEvent::Stage("records", records.len()));
        let chain: Vec<(&LoadedPlugin, Vec<(String, String)>)> =
            pre.iter().map(|(p, c)| (p, c.clone())).collect();
        let (records, x, dim) = self.run_chain(
            who,
            &format!("job {}", job.id),
            records,
            &chain,
            (&featurizer, fc),
            &mut |s, n| progress(JobEvent::Stage(s, n)),
        )?;
        let mut rows = Vec::with_capacity(records.len());
        let mut index = HashMap::with_capacity(records.len());
        for r in &records {
            let (split, gold) = meta.get(&r.id).cloned().ok_or_else(|| {
                ServiceError::BadRequest(
                    "a preprocessor returned a record id it was not given".into(),
                )
            })?;
            index.insert(r.id.clone(), rows.len());
            rows.push(PreparedRow {
                id: r.id.clone(),
                split,
                gold,
                human: None,
            });
        }
        Ok(Prepared {
            version,
            rows,
            index,
            x,
            dim,
            selector,
            stopped: None,
        })
    }

    /// Current labels of every prepared row, as the job sees them.
    fn labels(
        &self,
        job: &Job,
        prep: &mut Prepared,
        ledger: &BTreeMap<String, LedgerLabel>,
        queue: &BTreeMap<String, QueueItem>,
    ) -> Result<Labels, ServiceError> {
        let humans = datasets::human_labels(self.env(), &prep.version)?;
        for row in &mut prep.rows {
            row.human = humans
                .get(&row.id)
                .and_then(|v| v.last())
                .map(|(_, l)| l.clone());
        }
        let class: HashMap<&str, usize> = job
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let oracle = job.spec.oracle.is_some();
        let mut l = Labels {
            y: vec![0; prep.rows.len()],
            train: Vec::new(),
            val: Vec::new(),
            test: Vec::new(),
            pool: Vec::new(),
            manual: 0,
            auto: 0,
            other: 0,
        };
        for (i, row) in prep.rows.iter().enumerate() {
            match super::visible_label(row, ledger.get(&row.id), oracle) {
                Some((label, kind)) => {
                    // A label outside the job's classes (added after it
                    // started) is left out.
                    let Some(&c) = class.get(label) else { continue };
                    l.y[i] = c;
                    match row.split {
                        Split::Train => {
                            l.train.push(i);
                            match kind {
                                LabelKind::Manual => l.manual += 1,
                                LabelKind::Auto => l.auto += 1,
                                LabelKind::Other => l.other += 1,
                            }
                        }
                        Split::Validation => l.val.push(i),
                        Split::Test => l.test.push(i),
                    }
                }
                None => {
                    if row.split == Split::Train && !queue.contains_key(&row.id) {
                        l.pool.push(i);
                    }
                }
            }
        }
        Ok(l)
    }

    fn train_committee(
        &self,
        job: &Job,
        round: u32,
        prep: &Prepared,
        labels: &Labels,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Committee, ServiceError> {
        let mut scores = Vec::new();
        let mut fitted = Vec::new();
        let mut val_probs = Vec::new();
        for m in &job.spec.models {
            let template: Template = train::template(&m.template, &m.sets)?;
            progress(JobEvent::Training {
                round,
                template: &m.template,
                records: labels.train.len(),
            });
            let f = train::fit(
                &template,
                train::TrainingSet {
                    x: &prep.x,
                    dim: prep.dim,
                    y: &labels.y,
                    classes: job.classes.len(),
                    train: &labels.train,
                    val: &labels.val,
                    budget_bytes: self.env().limits().training_budget_bytes(),
                },
                &mut |_| {},
            )?;
            let probs = f.model.predict(&prep.x, &labels.val)?;
            let e = self.evaluate_rows(job, prep, labels, &labels.val, &probs);
            let score = ModelScore {
                template: model_label(m),
                val_accuracy: e.accuracy,
                val_macro_f1: e.macro_f1,
                best_epoch: f.best_epoch,
                seconds: f.seconds,
            };
            progress(JobEvent::Trained {
                round,
                score: &score,
            });
            scores.push(score);
            fitted.push(f);
            val_probs.push(probs);
        }
        Ok(Committee {
            scores,
            fitted,
            val_mean: mean_probs(&val_probs),
        })
    }

    fn evaluate_rows(
        &self,
        job: &Job,
        prep: &Prepared,
        labels: &Labels,
        rows: &[usize],
        probs: &[f32],
    ) -> train::eval::Evaluation {
        let ids: Vec<String> = rows.iter().map(|&r| prep.rows[r].id.clone()).collect();
        let truth: Vec<usize> = rows.iter().map(|&r| labels.y[r]).collect();
        train::eval::evaluate(&job.classes, &ids, &truth, probs)
    }

    fn committee_probs(
        c: &Committee,
        prep: &Prepared,
        rows: &[usize],
    ) -> Result<(Vec<Vec<f32>>, Vec<f32>), ServiceError> {
        let per_model = c
            .fitted
            .iter()
            .map(|f| f.model.predict(&prep.x, rows))
            .collect::<Result<Vec<_>, _>>()?;
        let mean = mean_probs(&per_model);
        Ok((per_model, mean))
    }

    /// Train, evaluate, select. Returns whether to go on.
    fn step_select(
        &self,
        who: &User,
        job: &mut Job,
        round: u32,
        prep: &mut Prepared,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<bool, ServiceError> {
        let started = Instant::now();
        let store = self.env().store();
        let ledger = super::ledger(store.as_ref(), &job.id)?;
        let queue = super::queue(store.as_ref(), &job.id)?;
        let labels = self.labels(job, prep, &ledger, &queue)?;
        let settings = job.spec.settings.clone();
        let manual_so_far = queue
            .values()
            .filter(|q| q.reason != QueueReason::Badcase)
            .count();
        let seed = job.spec.split_seed ^ u64::from(round).wrapping_mul(0x9e37_79b9);
        let mut report = RoundReport {
            round,
            train_manual: labels.manual,
            train_auto: labels.auto,
            train_other: labels.other,
            ..RoundReport::default()
        };
        let mut batch = WriteBatch::new();
        let mut new_items: Vec<QueueItem> = Vec::new();
        if round == 0 {
            job.pool_size = labels.pool.len() as u64;
            if settings.seed_labels > 0 {
                for (k, i) in super::sample(&labels.pool, settings.seed_labels, seed)
                    .into_iter()
                    .enumerate()
                {
                    new_items.push(self.queue_item(job, prep, 0, i, QueueReason::Seed, k));
                }
                job.next = Step::Answer(0);
            } else {
                job.next = Step::Select(1);
            }
        } else {
            let committee = self.train_committee(job, round, prep, &labels, progress)?;
            report.models = committee.scores.clone();
            let val_probs = committee.val_mean.clone();
            let val = self.evaluate_rows(job, prep, &labels, &labels.val, &val_probs);
            report.val_accuracy = Some(val.accuracy);
            report.val_macro_f1 = Some(val.macro_f1);
            if !labels.test.is_empty() {
                let (_, test_probs) = Self::committee_probs(&committee, prep, &labels.test)?;
                let test = self.evaluate_rows(job, prep, &labels, &labels.test, &test_probs);
                report.test_accuracy = Some(test.accuracy);
                report.test_macro_f1 = Some(test.macro_f1);
            }
            report.badcases = val.badcases.len() as u64;
            report.badcase_ids = val.badcases.iter().map(|b| b.id.clone()).collect();
            let previous: HashSet<&String> = job
                .rounds
                .iter()
                .rev()
                .find(|r| !r.models.is_empty())
                .map(|r| r.badcase_ids.iter().collect())
                .unwrap_or_default();
            let now: HashSet<&String> = report.badcase_ids.iter().collect();
            report.fixed = previous.difference(&now).map(|s| (*s).clone()).collect();
            report.appeared = now.difference(&previous).map(|s| (*s).clone()).collect();
            report.fixed.sort();
            report.appeared.sort();

            let reached = settings.target.is_some_and(|(metric, value)| {
                let got = match metric {
                    super::Metric::Accuracy => val.accuracy,
                    super::Metric::MacroF1 => val.macro_f1,
                };
                got >= value
            });
            let stop = if reached {
                Some("target")
            } else if round > settings.max_rounds {
                Some("max-rounds")
            } else if manual_so_far >= settings.budget {
                Some("budget")
            } else if labels.pool.is_empty() {
                Some("pool-empty")
            } else {
                None
            };
            if let Some(reason) = stop {
                report.stop = Some(reason.to_string());
                job.next = Step::Finish;
                prep.stopped = Some((train_signature(&labels), committee));
            } else {
                let take = settings.per_round.min(settings.budget - manual_so_far);
                let chosen: Vec<(f32, usize)> = match &prep.selector {
                    None => super::sample(&labels.pool, take, seed)
                        .into_iter()
                        .enumerate()
                        .map(|(k, i)| ((take - k) as f32, i))
                        .collect(),
                    Some((entry, plugin, config)) => {
                        let (per_model, _) = Self::committee_probs(&committee, prep, &labels.pool)?;
                        let k = job.classes.len();
                        let sets: Vec<PredictionSet> = labels
                            .pool
                            .iter()
                            .enumerate()
                            .map(|(j, &i)| PredictionSet {
                                id: prep.rows[i].id.clone(),
                                models: per_model
                                    .iter()
                                    .map(|p| p[j * k..(j + 1) * k].to_vec())
                                    .collect(),
                            })
                            .collect();
                        let (decisions, _) = self.plugin_stage(
                            who,
                            &format!("job {} round {round}", job.id),
                            plugin,
                            config,
                            sets.len(),
                            |r| r.select(&job.classes, &sets),
                            Vec::len,
                        )?;
                        // (priority, row, the committee's predicted class)
                        let mut review: Vec<(f32, usize, usize)> = Vec::new();
                        // (least model confidence in the label, row, class, set)
                        let mut auto: Vec<(f32, usize, usize, usize)> = Vec::new();
                        for (n, (d, set)) in decisions.iter().zip(&sets).enumerate() {
                            let i = prep.index.get(&set.id).copied().ok_or_else(|| {
                                ServiceError::BadRequest(
                                    "a selector answered for an unknown record".into(),
                                )
                            })?;
                            match d.action {
                                types::Action::AutoAccept(c) => {
                                    let c = c as usize;
                                    let least = set
                                        .models
                                        .iter()
                                        .map(|p| p.get(c).copied().unwrap_or(0.0))
                                        .fold(f32::INFINITY, f32::min);
                                    auto.push((least, i, c, n));
                                }
                                types::Action::HumanReview => {
                                    review.push((d.priority, i, predicted_class(&set.models)));
                                }
                                types::Action::Skip => {}
                            }
                        }
                        // Most confident first; beyond the cap, records stay
                        // in the pool for the next round's models.
                        auto.sort_by(|a, b| {
                            b.0.total_cmp(&a.0)
                                .then_with(|| prep.rows[a.1].id.cmp(&prep.rows[b.1].id))
                        });
                        if let Some(cap) = settings.max_auto_per_round
                            && auto.len() > cap
                        {
                            report.auto_deferred = (auto.len() - cap) as u64;
                            auto.truncate(cap);
                        }
                        let models: Vec<String> = committee
                            .scores
                            .iter()
                            .map(|s| format!("{}@round{round}", s.template))
                            .collect();
                        for &(_, i, c, n) in &auto {
                            let label = job.classes[c].clone();
                            let row = &prep.rows[i];
                            report.auto_accepted += 1;
                            if let Some(g) = &row.gold {
                                report.auto_checked += 1;
                                report.auto_correct += u64::from(*g == label);
                            }
                            let source = LedgerSource::Auto {
                                selector: entry.digest.clone(),
                                models: models.clone(),
                                confidences: sets[n]
                                    .models
                                    .iter()
                                    .map(|p| p.get(c).copied().unwrap_or(0.0))
                                    .collect(),
                            };
                            let ledger_label = LedgerLabel {
                                label,
                                source,
                                round,
                                gold: row.gold.clone(),
                            };
                            super::put_ledger(&mut batch, &job.id, &row.id, &ledger_label)?;
                        }
                        review.sort_by(|a, b| {
                            b.0.total_cmp(&a.0)
                                .then_with(|| prep.rows[a.1].id.cmp(&prep.rows[b.1].id))
                        });
                        if settings.balance_classes {
                            balance_by_class(&review, take)
                        } else {
                            review
                                .into_iter()
                                .take(take)
                                .map(|(p, i, _)| (p, i))
                                .collect()
                        }
                    }
                };
                for (k, (_, i)) in chosen.into_iter().enumerate() {
                    new_items.push(self.queue_item(job, prep, round, i, QueueReason::Selected, k));
                }
                let mut n = new_items.len();
                for b in val
                    .badcases
                    .iter()
                    .filter(|b| !queue.contains_key(&b.id))
                    .take(settings.badcases_per_round)
                {
                    if let Some(&i) = prep.index.get(&b.id) {
                        new_items.push(self.queue_item(
                            job,
                            prep,
                            round,
                            i,
                            QueueReason::Badcase,
                            n,
                        ));
                        n += 1;
                    }
                }
                job.next = Step::Answer(round);
            }
        }
        for item in &new_items {
            match item.reason {
                QueueReason::Badcase => report.badcases_queued += 1,
                _ => report.queued += 1,
            }
            super::put_queue(&mut batch, item)?;
            if let Some(user) = &item.assignee {
                batch.extend(datasets::assign(
                    self.env(),
                    &prep.version,
                    &item.record,
                    user,
                )?);
            }
        }
        report.manual_total = (manual_so_far as u64) + report.queued;
        report.pool_left =
            (labels.pool.len() as u64).saturating_sub(report.queued + report.auto_accepted);
        report.seconds = started.elapsed().as_secs_f64();
        job.rounds.push(report);
        job.state = JobState::Running;
        job.updated_ms = crate::time::now_ms();
        super::put_job(&mut batch, job)?;
        store.commit(batch)?;
        if let Some(r) = job.rounds.last() {
            progress(JobEvent::Round(r));
        }
        Ok(true)
    }

    /// The queue item for `row`, the `k`-th queued this round (its rank).
    fn queue_item(
        &self,
        job: &Job,
        prep: &Prepared,
        round: u32,
        row: usize,
        reason: QueueReason,
        k: usize,
    ) -> QueueItem {
        let assignee = if job.spec.oracle.is_some() || job.spec.labelers.is_empty() {
            None
        } else {
            Some(job.spec.labelers[k % job.spec.labelers.len()].clone())
        };
        QueueItem {
            job: job.id.clone(),
            record: prep.rows[row].id.clone(),
            dataset: prep.version.reference(),
            round,
            rank: u32::try_from(k).unwrap_or(u32::MAX),
            reason,
            assignee,
            answer: None,
        }
    }

    /// Collects answers: the oracle's at once, people's when all are in.
    fn step_answer(
        &self,
        job: &mut Job,
        round: u32,
        prep: &Prepared,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<bool, ServiceError> {
        let store = self.env().store();
        let queue = super::queue(store.as_ref(), &job.id)?;
        let mut batch = WriteBatch::new();
        let mut answered = 0u64;
        let open: Vec<&QueueItem> = queue.values().filter(|q| q.answer.is_none()).collect();
        if job.spec.oracle.is_some() {
            for item in open {
                let Some(&i) = prep.index.get(&item.record) else {
                    continue;
                };
                let row = &prep.rows[i];
                let Some(gold) = &row.gold else { continue };
                let mut done = item.clone();
                done.answer = Some(Answer {
                    label: gold.clone(),
                    by: "oracle:gold".into(),
                    time_ms: crate::time::now_ms(),
                });
                super::put_queue(&mut batch, &done)?;
                if item.reason != QueueReason::Badcase {
                    super::put_ledger(
                        &mut batch,
                        &job.id,
                        &row.id,
                        &LedgerLabel {
                            label: gold.clone(),
                            source: LedgerSource::Oracle,
                            round,
                            gold: Some(gold.clone()),
                        },
                    )?;
                }
                answered += 1;
            }
        } else if !open.is_empty() {
            let n = open.len() as u64;
            if job.state != (JobState::AwaitingLabels { open: n }) {
                job.state = JobState::AwaitingLabels { open: n };
                job.updated_ms = crate::time::now_ms();
                super::put_job(&mut batch, job)?;
                store.commit(batch)?;
            }
            progress(JobEvent::Waiting { open: n });
            return Ok(false);
        } else {
            answered = queue
                .values()
                .filter(|q| q.round == round && q.answer.is_some())
                .count() as u64;
        }
        let manual = queue
            .values()
            .filter(|q| q.reason != QueueReason::Badcase)
            .count();
        if let Some(r) = job.rounds.iter_mut().rev().find(|r| r.round == round) {
            r.answered = answered;
            if manual >= job.spec.settings.budget {
                r.stop = Some("budget".into());
            }
        }
        job.next = if manual >= job.spec.settings.budget {
            Step::Finish
        } else {
            Step::Select(round + 1)
        };
        job.state = JobState::Running;
        job.updated_ms = crate::time::now_ms();
        super::put_job(&mut batch, job)?;
        store.commit(batch)?;
        progress(JobEvent::Answered { round, answered });
        Ok(true)
    }

    /// Trains the final committee on every label and registers its models.
    fn step_finish(
        &self,
        who: &User,
        job: &mut Job,
        prep: &mut Prepared,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<bool, ServiceError> {
        let store = self.env().store();
        let ledger = super::ledger(store.as_ref(), &job.id)?;
        let queue = super::queue(store.as_ref(), &job.id)?;
        let labels = self.labels(job, prep, &ledger, &queue)?;
        let ids: Vec<String> = (0..job.spec.models.len())
            .map(|k| final_model_id(&job.id, k))
            .collect();
        for id in &ids {
            self.guard(
                &who.principal(),
                Action::TrainModel,
                &Resource::Model {
                    id: id.clone(),
                    release_requested: false,
                    release_approved: false,
                    requested_by: None,
                },
                &(&job.id, id),
            )?;
        }
        let round = job.rounds.last().map_or(0, |r| r.round) + 1;
        let committee = match prep.stopped.take() {
            Some((sig, c)) if sig == train_signature(&labels) => c,
            _ => self.train_committee(job, round, prep, &labels, progress)?,
        };
        let (per_model, mean) = Self::committee_probs(&committee, prep, &labels.test)?;
        let test = self.evaluate_rows(job, prep, &labels, &labels.test, &mean);
        for (k, ((f, m), id)) in committee
            .fitted
            .iter()
            .zip(&job.spec.models)
            .zip(&ids)
            .enumerate()
        {
            if crate::models::get(store.as_ref(), id).is_ok() {
                continue; // saved by an earlier attempt of this step
            }
            let template = train::template(&m.template, &m.sets)?;
            let weights = f.model.to_safetensors()?;
            let manifest = crate::models::ModelManifest {
                id: id.clone(),
                template: template.name.clone(),
                kind: template.kind,
                hyper: template.hyper.clone(),
                classes: job.classes.clone(),
                dim: prep.dim,
                lineage: crate::models::Lineage {
                    dataset: job.dataset.clone(),
                    dataset_digest: job.dataset_digest.clone(),
                    preprocess: job.plugins.preprocess.iter().map(|p| p.0.clone()).collect(),
                    features: job.plugins.features.0.clone(),
                    split_seed: job.spec.split_seed,
                    job: Some(job.id.clone()),
                },
                evaluation: self.evaluate_rows(job, prep, &labels, &labels.test, &per_model[k]),
                curve: f.curve.clone(),
                best_epoch: f.best_epoch,
                train_seconds: f.seconds,
                split_sizes: [
                    labels.train.len() as u64,
                    labels.val.len() as u64,
                    labels.test.len() as u64,
                ],
                weights_sha256: Digest::of(&weights).to_hex(),
                created_by: job.started_by.clone(),
                created_ms: crate::time::now_ms(),
                release: crate::models::Release::default(),
            };
            crate::models::save(store.as_ref(), self.env().dir(), &manifest, &weights)?;
        }
        let result = FinalReport {
            models: ids,
            test_accuracy: test.accuracy,
            test_macro_f1: test.macro_f1,
            train_records: labels.train.len() as u64,
        };
        let reason = job
            .rounds
            .last()
            .and_then(|r| r.stop.clone())
            .unwrap_or_else(|| "budget".into());
        job.result = Some(result);
        job.state = JobState::Done { reason };
        job.next = Step::End;
        job.updated_ms = crate::time::now_ms();
        let mut b = WriteBatch::new();
        super::put_job(&mut b, job)?;
        store.commit(b)?;
        if let Some(r) = &job.result {
            progress(JobEvent::Finished(r));
        }
        Ok(false)
    }

    // ------------------------------------------------------------ labels --

    /// The next queued item for `who` with its record: the one place record
    /// contents are shown, authorized and audited per view.
    pub fn next_label_item(&self, who: &User) -> Result<Option<LabelTask>, ServiceError> {
        let open = super::open_items_for(self.env().store().as_ref(), &who.name)?;
        let Some(item) = open.first().cloned() else {
            return Ok(None);
        };
        let record = self.view_record(who, &item.dataset, &item.record)?;
        let classes = super::get(self.env().store().as_ref(), &item.job)?.classes;
        Ok(Some(LabelTask {
            item,
            record,
            waiting: open.len(),
            classes,
        }))
    }

    /// Labels a queued record (by record id; `job` picks among several).
    pub fn label_item(
        &self,
        who: &User,
        record: &str,
        label: &str,
        job: Option<&str>,
    ) -> Result<QueueItem, ServiceError> {
        let mut done = self.label_items(
            who,
            &[(
                record.to_string(),
                label.to_string(),
                job.map(str::to_string),
            )],
            |_| 0,
        )?;
        done.pop()
            .ok_or_else(|| JobError::NotQueued(record.to_string()).into())
    }

    /// Labels many queued records all-or-nothing. `line` maps an entry's
    /// index to its line in a file (for errors).
    fn label_items(
        &self,
        who: &User,
        entries: &[(String, String, Option<String>)],
        line: impl Fn(usize) -> usize,
    ) -> Result<Vec<QueueItem>, ServiceError> {
        let open = super::open_items_for(self.env().store().as_ref(), &who.name)?;
        let mut chosen: Vec<(QueueItem, String)> = Vec::new();
        let mut seen = HashSet::new();
        for (n, (record, label, job)) in entries.iter().enumerate() {
            let Some(item) = open
                .iter()
                .find(|q| q.record == *record && job.as_ref().is_none_or(|j| *j == q.job))
            else {
                return Err(self.not_queued_for(who, record, job.as_deref(), line(n)));
            };
            if !seen.insert((item.job.clone(), record.clone())) {
                return Err(ServiceError::BadRequest(format!(
                    "entry {}: {record} is labeled twice in one request",
                    line(n)
                )));
            }
            chosen.push((item.clone(), label.clone()));
        }
        for (item, label) in &chosen {
            if label.is_empty() || label.len() > 256 || label.chars().any(char::is_control) {
                return Err(ServiceError::BadRequest(
                    "a label is 1 to 256 bytes without control characters".into(),
                ));
            }
            let job = super::get(self.env().store().as_ref(), &item.job)?;
            if !job.classes.contains(label) {
                return Err(ServiceError::BadRequest(format!(
                    "`{label}` is not a class of job {} (classes: {})",
                    item.job,
                    job.classes.join(", ")
                )));
            }
        }
        let mut batch = WriteBatch::new();
        let mut out = Vec::new();
        for (item, label) in chosen {
            let (v, resource) = self.record_resource(&item.dataset, &item.record)?;
            self.guard(
                &who.principal(),
                Action::LabelRecord,
                &resource,
                &(
                    &item.dataset,
                    &item.record,
                    Digest::of(label.as_bytes()).to_hex(),
                ),
            )?;
            let entry = LabelEntry {
                label: label.clone(),
                provenance: Provenance::Human {
                    user: who.name.clone(),
                },
                time_ms: crate::time::now_ms(),
            };
            batch.extend(datasets::set_label(self.env(), &v, &item.record, &entry)?);
            let mut done = item;
            done.answer = Some(Answer {
                label,
                by: who.name.clone(),
                time_ms: entry.time_ms,
            });
            super::put_queue(&mut batch, &done)?;
            out.push(done);
        }
        self.env().store().commit(batch)?;
        Ok(out)
    }

    /// The answer to labeling a record that is not in the caller's open
    /// queue, decided by the authorization point like any label: when the
    /// record is queued for someone else, `label_record` on it (which the
    /// policies refuse to anyone but its assignee); when it is queued for
    /// nobody, `label_record` on the environment (which no policy allows).
    /// Either way the attempt is audited; only a caller the policy allows
    /// (their own item, already answered) hears that it is not queued.
    fn not_queued_for(
        &self,
        who: &User,
        record: &str,
        job: Option<&str>,
        line: usize,
    ) -> ServiceError {
        let store = self.env().store();
        let queued = super::list(store.as_ref()).ok().and_then(|jobs| {
            jobs.iter()
                .filter(|j| job.is_none_or(|id| id == j.id))
                .find_map(|j| {
                    super::queue(store.as_ref(), &j.id)
                        .ok()
                        .and_then(|q| q.get(record).cloned())
                })
        });
        let resource = match &queued {
            Some(item) => match self.record_resource(&item.dataset, &item.record) {
                Ok((_, r)) => r,
                Err(e) => return e,
            },
            None => Resource::Environment,
        };
        match self.guard(
            &who.principal(),
            Action::LabelRecord,
            &resource,
            &(record, job, "not-queued"),
        ) {
            Err(e) => e,
            Ok(()) => JobError::NotQueued(format!("{record} (entry {line})")).into(),
        }
    }

    /// Imports labels for queued items from a file: JSONL objects with
    /// `id` and `label` (and optionally `job`), or CSV with a header naming
    /// `id` and `label` columns. All-or-nothing.
    pub fn import_labels(&self, who: &User, file: &str, text: &str) -> Result<usize, ServiceError> {
        let entries = parse_label_file(file, text)?;
        let lines: Vec<usize> = entries.iter().map(|e| e.0).collect();
        let items: Vec<(String, String, Option<String>)> =
            entries.into_iter().map(|(_, r, l, j)| (r, l, j)).collect();
        let done = self.label_items(who, &items, |n| lines.get(n).copied().unwrap_or(0))?;
        Ok(done.len())
    }
}

fn train_signature(l: &Labels) -> Vec<(usize, usize)> {
    l.train.iter().map(|&r| (r, l.y[r])).collect()
}

fn model_label(m: &ModelUse) -> String {
    if m.sets.is_empty() {
        m.template.clone()
    } else {
        let sets: Vec<String> = m.sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}({})", m.template, sets.join(","))
    }
}

/// Parses a label file: `(line, record id, label, job)`.
fn parse_label_file(file: &str, text: &str) -> Result<Vec<LabelLine>, JobError> {
    let err = |line: usize, message: String| JobError::LabelFile {
        file: file.to_string(),
        line,
        message,
    };
    let mut out = Vec::new();
    let is_csv = file.to_ascii_lowercase().ends_with(".csv");
    if is_csv {
        // RFC 4180 through the csv crate: quoted fields may hold commas,
        // quotes and newlines; errors name the line the record starts on.
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(text.as_bytes());
        let line_of = |e: &csv::Error| {
            e.position()
                .map_or(1, |p| usize::try_from(p.line()).unwrap_or(usize::MAX))
        };
        let cols: Vec<String> = reader
            .headers()
            .map_err(|e| err(line_of(&e), format!("unreadable header: {e}")))?
            .iter()
            .map(str::to_string)
            .collect();
        if cols.iter().all(String::is_empty) {
            return Err(err(
                1,
                "empty file: expected a header with `id` and `label`".into(),
            ));
        }
        let find = |name: &str| {
            cols.iter()
                .position(|c| c == name)
                .ok_or_else(|| err(1, format!("the header has no `{name}` column")))
        };
        let (ci, cl) = (find("id")?, find("label")?);
        let cj = cols.iter().position(|c| c == "job");
        for record in reader.records() {
            let record = record.map_err(|e| err(line_of(&e), format!("unreadable CSV: {e}")))?;
            let n = record
                .position()
                .map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
            if record.iter().all(str::is_empty) {
                continue;
            }
            let get = |c: usize, name: &str| {
                record
                    .get(c)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| err(n, format!("field `{name}` is missing")))
            };
            out.push((
                n,
                get(ci, "id")?,
                get(cl, "label")?,
                cj.and_then(|c| record.get(c).filter(|v| !v.is_empty()).map(str::to_string)),
            ));
        }
    } else {
        for (n, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| err(n + 1, format!("not a JSON object: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| err(n + 1, "not a JSON object".into()))?;
            let get = |name: &str| -> Result<Option<String>, JobError> {
                match obj.get(name) {
                    None => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(err(n + 1, format!("field `{name}` must be a string"))),
                }
            };
            for k in obj.keys() {
                if !["id", "label", "job"].contains(&k.as_str()) {
                    return Err(err(n + 1, format!("unknown field `{k}`")));
                }
            }
            let id = get("id")?.ok_or_else(|| err(n + 1, "field `id` is missing".into()))?;
            let label =
                get("label")?.ok_or_else(|| err(n + 1, "field `label` is missing".into()))?;
            out.push((n + 1, id, label, get("job")?));
        }
    }
    if out.is_empty() {
        return Err(err(1, "no labels in the file".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_files_name_the_line_and_field() {
        let ok = "{\"id\":\"a\",\"label\":\"spam\"}\n\n{\"id\":\"b\",\"label\":\"ham\",\"job\":\"j-1\"}\n";
        let got = parse_label_file("l.jsonl", ok).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], (3, "b".into(), "ham".into(), Some("j-1".into())));
        let e = parse_label_file("l.jsonl", "{\"id\":\"a\"}\n").unwrap_err();
        assert_eq!(e.to_string(), "l.jsonl:1: field `label` is missing");
        let e = parse_label_file("l.jsonl", "{\"id\":\"a\",\"label\":1}\n").unwrap_err();
        assert!(e.to_string().contains("`label` must be a string"), "{e}");
        let e = parse_label_file("l.csv", "id,label\na,spam\nb\n").unwrap_err();
        assert_eq!(e.to_string(), "l.csv:3: field `label` is missing");
        // Quoted fields keep their commas (and quotes); lines are the
        // record's first line.
        let ok = parse_label_file(
            "q.csv",
            "id,label\n\"a,1\",\"spam, really\"\n\"b\"\"2\",ham\n",
        )
        .expect("quoted CSV");
        assert_eq!(
            ok,
            vec![
                (2, "a,1".to_string(), "spam, really".to_string(), None),
                (3, "b\"2".to_string(), "ham".to_string(), None)
            ]
        );
        let e = parse_label_file("l.csv", "record,label\n").unwrap_err();
        assert!(e.to_string().contains("no `id` column"), "{e}");
        assert_eq!(
            parse_label_file("l.csv", "id,label\na,x\n").unwrap().len(),
            1
        );
    }

    #[test]
    fn balanced_picks_take_one_per_predicted_class_in_turn() {
        // Sorted most urgent first: class 3 dominates the top.
        let review = [
            (0.9, 10, 3),
            (0.8, 11, 3),
            (0.7, 12, 3),
            (0.6, 20, 1),
            (0.5, 13, 3),
            (0.4, 30, 2),
            (0.3, 21, 1),
        ];
        let rows = |v: Vec<(f32, usize)>| v.into_iter().map(|(_, i)| i).collect::<Vec<_>>();
        assert_eq!(rows(balance_by_class(&review, 4)), [10, 20, 30, 11]);
        assert_eq!(
            rows(balance_by_class(&review, 7)),
            [10, 20, 30, 11, 21, 12, 13]
        );
        assert_eq!(balance_by_class(&review, 100).len(), 7);
        assert!(balance_by_class(&review, 0).is_empty());
        assert!(balance_by_class(&[], 5).is_empty());
        assert_eq!(
            predicted_class(&[vec![0.2, 0.5, 0.3], vec![0.1, 0.3, 0.6]]),
            2
        );
    }

    #[test]
    fn final_model_ids_are_stable() {
        assert_eq!(final_model_id("j-1", 0), final_model_id("j-1", 0));
        assert_ne!(final_model_id("j-1", 0), final_model_id("j-1", 1));
        assert_eq!(final_model_id("j-1", 0).len(), 14);
    }
}
