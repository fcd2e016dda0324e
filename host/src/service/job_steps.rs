//! The steps of a job: prepare the data, train the committee, select,
//! answer, finish. Each step commits its whole effect at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use crate::datasets::{self, DatasetVersion, Provenance, Split};
use crate::jobs::committee::{
    balance_by_class, final_model_id, mean_probs, model_label, predicted_class,
};
use crate::jobs::{
    Answer, FinalReport, Job, JobEvent, JobState, LabelKind, LedgerLabel, LedgerSource, ModelScore,
    PreparedRow, QueueItem, QueueReason, RoundReport, Step, precision,
};
use crate::policy::{Action, Resource};
use crate::registry::PluginEntry;
use crate::runtime::LoadedPlugin;
use crate::store::WriteBatch;
use crate::train::{self, Template};
use crate::types::{self, PluginKind, PredictionSet, SparseBatch};
use crate::users::User;

/// What a running job reports.
use super::pipeline::NewModel;
use super::{Cloister, ServiceError};

/// An approved plugin loaded for a job, with its resolved config.
pub(super) type Resolved = (PluginEntry, LoadedPlugin, Vec<(String, String)>);

/// The data of a job, run through its plugins.
pub(super) struct Prepared {
    version: DatasetVersion,
    rows: Vec<PreparedRow>,
    index: HashMap<String, usize>,
    x: SparseBatch,
    dim: usize,
    selector: Option<Resolved>,
    /// The lineage of the models trained on these rows.
    lineage: crate::models::Lineage,
    /// The committee of a select step that stopped the loop, with the
    /// labels it trained on: the finish step reuses it when nothing changed.
    stopped: Option<(Vec<(usize, usize)>, Committee)>,
}

/// The labels a step trains and evaluates on.
pub(super) struct Labels {
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
pub(super) struct Committee {
    scores: Vec<ModelScore>,
    fitted: Vec<train::Fitted>,
    /// Mean of the models' validation probabilities (computed once, while
    /// scoring each model).
    val_mean: Vec<f32>,
}

impl Cloister {
    /// Loads the plugins the job fixed, runs the dataset through them.
    pub(super) fn prepare(
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
        let mut chain = self.load_chain(who, &job.plugins.preprocess, &job.plugins.features)?;
        let selector = match &job.plugins.selector {
            Some((d, c)) => {
                let (e, l) = self.load_approved(who, d, PluginKind::Selector)?;
                Some((e, l, c.clone()))
            }
            None => None,
        };
        let gold = |r: &crate::datasets::StoredRecord| {
            Some(
                r.labels
                    .iter()
                    .find(|l| l.provenance == Provenance::Gold)
                    .map(|l| l.label.clone()),
            )
        };
        let data = self.featurize_dataset(
            who,
            &format!("job {}", job.id),
            &version,
            &mut chain,
            job.spec.split_seed,
            gold,
            &mut |s| progress(JobEvent::Stage(s)),
        )?;
        let lineage = chain.lineage(&version, job.spec.split_seed, Some(job.id.clone()));
        let (x, dim) = (data.x, data.dim);
        let mut rows = Vec::with_capacity(data.rows.len());
        let mut index = HashMap::with_capacity(data.rows.len());
        for (id, split, gold) in data.rows {
            index.insert(id.clone(), rows.len());
            rows.push(PreparedRow {
                id,
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
            lineage,
            stopped: None,
        })
    }

    /// Current labels of every prepared row, as the job sees them.
    pub(super) fn labels(
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
            match crate::jobs::visible_label(row, ledger.get(&row.id), oracle) {
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

    pub(super) fn train_committee(
        &self,
        job: &Job,
        round: u32,
        prep: &Prepared,
        labels: &Labels,
        for_release: bool,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Committee, ServiceError> {
        let budget = self.env().limits().training_budget_bytes();
        let mut templates = Vec::with_capacity(job.spec.models.len());
        for m in &job.spec.models {
            let mut t = train::template(&m.template, &m.sets)?;
            // A round's committee never leaves the environment: only the
            // final models (trained by `step_finish` with the template's
            // `min_support`) can be released. Dropping rare features in the
            // rounds would starve the early ones, which have few labels.
            if !for_release {
                t.hyper.min_support = 0;
            }
            templates.push(t);
        }
        let fit_one = |template: &Template| -> Result<(train::Fitted, Vec<f32>), ServiceError> {
            self.fit(
                template,
                train::TrainingSet {
                    x: &prep.x,
                    dim: prep.dim,
                    y: &labels.y,
                    classes: job.classes.len(),
                    train: &labels.train,
                    val: &labels.val,
                    budget_bytes: budget,
                },
                &labels.val,
                &mut |_| {},
            )
        };
        for m in &job.spec.models {
            progress(JobEvent::Training {
                round,
                template: &m.template,
                records: labels.train.len(),
            });
        }
        // The members train at the same time when their states fit the
        // memory budget together (each is deterministic, so the result is
        // the one sequential training gives); otherwise one after another.
        let together: u64 = templates
            .iter()
            .map(|t| train::state_bytes(t.kind, prep.dim, job.classes.len(), &t.hyper))
            .fold(0u64, u64::saturating_add);
        // On workers the fits run elsewhere, so they are always submitted
        // together.
        let remote = self.env().workers().is_some();
        let results: Vec<Result<(train::Fitted, Vec<f32>), ServiceError>> = if templates.len() > 1
            && (together <= budget || remote)
        {
            std::thread::scope(|s| {
                let handles: Vec<_> = templates.iter().map(|t| s.spawn(|| fit_one(t))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        } else {
            templates.iter().map(fit_one).collect()
        };
        let mut scores = Vec::new();
        let mut fitted = Vec::new();
        let mut val_probs = Vec::new();
        for (m, result) in job.spec.models.iter().zip(results) {
            let (f, probs) = result?;
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

    pub(super) fn evaluate_rows(
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

    pub(super) fn committee_probs(
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

    /// The committee's predictions on `rows`, as the selector receives
    /// them.
    fn prediction_sets(
        committee: &Committee,
        prep: &Prepared,
        rows: &[usize],
        k: usize,
    ) -> Result<Vec<PredictionSet>, ServiceError> {
        let (per_model, _) = Self::committee_probs(committee, prep, rows)?;
        Ok(rows
            .iter()
            .enumerate()
            .map(|(j, &i)| PredictionSet {
                id: prep.rows[i].id.clone(),
                models: per_model
                    .iter()
                    .map(|p| p[j * k..(j + 1) * k].to_vec())
                    .collect(),
            })
            .collect())
    }

    /// Train, evaluate, select. Returns whether to go on.
    pub(super) fn step_select(
        &self,
        who: &User,
        job: &mut Job,
        read: &mut Vec<u8>,
        round: u32,
        prep: &mut Prepared,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<bool, ServiceError> {
        let started = Instant::now();
        let store = self.env().store();
        let ledger = crate::jobs::ledger(store.as_ref(), &job.id)?;
        let queue = crate::jobs::queue(store.as_ref(), &job.id)?;
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
                for (k, i) in crate::jobs::sample(&labels.pool, settings.seed_labels, seed)
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
            let committee = self.train_committee(job, round, prep, &labels, false, progress)?;
            let val = self.evaluate_round(job, prep, &labels, &committee, &mut report)?;
            let stop = stop_reason(&settings, &val, round, manual_so_far, &labels);
            if let Some(reason) = stop {
                report.stop = Some(reason.to_string());
                job.next = Step::Finish;
                prep.stopped = Some((train_signature(&labels), committee));
            } else {
                let take = settings
                    .per_round
                    .min(settings.budget.saturating_sub(manual_so_far));
                let mut spot = Vec::new();
                let chosen: Vec<(f32, usize)> = match &prep.selector {
                    None => crate::jobs::sample(&labels.pool, take, seed)
                        .into_iter()
                        .enumerate()
                        .map(|(k, i)| ((take - k) as f32, i))
                        .collect(),
                    Some(selector) => self.select_with_plugin(
                        who,
                        job,
                        round,
                        prep,
                        selector,
                        &labels,
                        &committee,
                        take,
                        manual_so_far,
                        &mut report,
                        &mut batch,
                        &mut spot,
                    )?,
                };
                for (k, (_, i)) in chosen.into_iter().enumerate() {
                    new_items.push(self.queue_item(job, prep, round, i, QueueReason::Selected, k));
                }
                let mut n = new_items.len();
                for i in spot {
                    new_items.push(self.queue_item(job, prep, round, i, QueueReason::SpotCheck, n));
                    n += 1;
                }
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
        self.assign_items(job, &mut new_items)?;
        for item in &new_items {
            match item.reason {
                QueueReason::Badcase => report.badcases_queued += 1,
                QueueReason::SpotCheck => report.spot_checks += 1,
                QueueReason::Seed | QueueReason::Selected => report.queued += 1,
            }
            crate::jobs::put_queue(&mut batch, item)?;
            if let Some(user) = &item.assignee {
                batch.extend(datasets::assign(
                    self.env(),
                    &prep.version,
                    &item.record,
                    user,
                )?);
            }
        }
        report.manual_total = (manual_so_far as u64) + report.queued + report.spot_checks;
        report.pool_left =
            (labels.pool.len() as u64).saturating_sub(report.queued + report.auto_accepted);
        report.seconds = started.elapsed().as_secs_f64();
        job.rounds.push(report);
        job.state = JobState::Running;
        job.updated_ms = crate::time::now_ms();
        crate::jobs::commit_job(store.as_ref(), batch, job, read)?;
        if let Some(r) = job.rounds.last() {
            progress(JobEvent::Round(r));
        }
        Ok(true)
    }

    /// Scores a round's committee on the validation split (and the test
    /// split, for the report) and records which badcases were fixed or
    /// appeared since the last trained round.
    fn evaluate_round(
        &self,
        job: &Job,
        prep: &Prepared,
        labels: &Labels,
        committee: &Committee,
        report: &mut RoundReport,
    ) -> Result<train::eval::Evaluation, ServiceError> {
        report.models = committee.scores.clone();
        let val = self.evaluate_rows(job, prep, labels, &labels.val, &committee.val_mean);
        report.val_accuracy = Some(val.accuracy);
        report.val_macro_f1 = Some(val.macro_f1);
        if !labels.test.is_empty() {
            let (_, test_probs) = Self::committee_probs(committee, prep, &labels.test)?;
            let test = self.evaluate_rows(job, prep, labels, &labels.test, &test_probs);
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
        Ok(val)
    }

    /// Runs the selector plugin over the pool's committee predictions:
    /// writes the automatic labels it proposes (most confident first, up
    /// to the per-round cap) into the job's ledger in `batch`, and returns
    /// up to `take` records for people, most urgent first, as
    /// (priority, row).
    #[allow(clippy::too_many_arguments)]
    fn select_with_plugin(
        &self,
        who: &User,
        job: &Job,
        round: u32,
        prep: &Prepared,
        (entry, plugin, config): &Resolved,
        labels: &Labels,
        committee: &Committee,
        take: usize,
        manual_so_far: usize,
        report: &mut RoundReport,
        batch: &mut WriteBatch,
        spot: &mut Vec<usize>,
    ) -> Result<Vec<(f32, usize)>, ServiceError> {
        let settings = &job.spec.settings;
        let sets = Self::prediction_sets(committee, prep, &labels.pool, job.classes.len())?;
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
                ServiceError::BadRequest("a selector answered for an unknown record".into())
            })?;
            match d.action {
                types::Action::AutoAccept(c) => {
                    let c = c as usize;
                    auto.push((least_confidence(set, c), i, c, n));
                }
                types::Action::HumanReview => {
                    review.push((d.priority, i, predicted_class(&set.models)));
                }
                types::Action::Skip => {}
            }
        }
        if let Some(target) = &settings.auto_label {
            let mut gate = self.precision_gate(
                who, job, round, prep, plugin, config, labels, committee, target,
            )?;
            let before = auto.len();
            auto.retain(|&(score, _, c, _)| precision::accepts(&gate.groups, c, score));
            gate.held_back = (before - auto.len()) as u64;
            report.gate = Some(gate);
        }
        // Most confident first; beyond the cap, records stay in the pool
        // for the next round's models.
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
            crate::jobs::put_ledger(batch, &job.id, &row.id, &ledger_label)?;
        }
        // Spot checks: a share of this round's automatic labels, drawn at
        // random, go to people too (within the budget).
        if let Some(target) = &settings.auto_label
            && target.spot_check > 0.0
            && !auto.is_empty()
        {
            let want = (target.spot_check * auto.len() as f64).ceil() as usize;
            let room = settings
                .budget
                .saturating_sub(manual_so_far + take.min(review.len()));
            let rows: Vec<usize> = auto.iter().map(|a| a.1).collect();
            let seed = job.spec.split_seed ^ 0x5107_c4ec ^ u64::from(round);
            spot.extend(crate::jobs::sample(&rows, want.min(room), seed));
        }
        review.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| prep.rows[a.1].id.cmp(&prep.rows[b.1].id))
        });
        Ok(if settings.balance_classes {
            balance_by_class(&review, take)
        } else {
            review
                .into_iter()
                .take(take)
                .map(|(p, i, _)| (p, i))
                .collect()
        })
    }

    /// Runs the selector over the committee's predictions on the labeled
    /// validation records and certifies, per class (or overall), the
    /// lowest confidence at which its automatic labels reach the target
    /// precision (see [`crate::jobs::precision`]). The selector sees the
    /// same prediction sets it sees for the pool, never a label.
    #[allow(clippy::too_many_arguments)]
    fn precision_gate(
        &self,
        who: &User,
        job: &Job,
        round: u32,
        prep: &Prepared,
        plugin: &LoadedPlugin,
        config: &[(String, String)],
        labels: &Labels,
        committee: &Committee,
        target: &precision::PrecisionTarget,
    ) -> Result<precision::GateReport, ServiceError> {
        let k = job.classes.len();
        // The validation records mirror the pool: those an earlier round's
        // gate passed are left out, as the pool records it passed left the
        // pool (otherwise later rounds would calibrate on the confident
        // records the pool no longer has, and overestimate).
        let mirrored: HashSet<&str> = job
            .rounds
            .iter()
            .filter_map(|r| r.gate.as_ref())
            .flat_map(|g| g.mirrored.iter().map(String::as_str))
            .collect();
        let rows: Vec<usize> = labels
            .val
            .iter()
            .copied()
            .filter(|&i| !mirrored.contains(prep.rows[i].id.as_str()))
            .collect();
        let sets = Self::prediction_sets(committee, prep, &rows, k)?;
        let decisions = if sets.is_empty() {
            Vec::new()
        } else {
            self.plugin_stage(
                who,
                &format!("job {} round {round} calibration", job.id),
                plugin,
                config,
                sets.len(),
                |r| r.select(&job.classes, &sets),
                Vec::len,
            )?
            .0
        };
        // (row, calibration record)
        let mut cal = Vec::new();
        for (d, (set, &i)) in decisions.iter().zip(sets.iter().zip(&rows)) {
            if let types::Action::AutoAccept(c) = d.action {
                let c = c as usize;
                cal.push((
                    i,
                    precision::Calibration {
                        score: least_confidence(set, c),
                        class: c,
                        correct: labels.y[i] == c,
                    },
                ));
            }
        }
        let records: Vec<precision::Calibration> = cal.iter().map(|(_, c)| *c).collect();
        let mut groups = precision::gate(target, k, &records);
        for r in job.rounds.iter().filter(|r| r.revoked > 0) {
            if let Some(old) = &r.gate {
                precision::raise(&mut groups, &old.groups);
            }
        }
        let mut report = precision::GateReport::new(target, rows.len() as u64, groups);
        report.mirrored = cal
            .iter()
            .filter(|(_, c)| precision::accepts(&report.groups, c.class, c.score))
            .map(|(i, _)| prep.rows[*i].id.clone())
            .collect();
        Ok(report)
    }

    /// Gives each new item of a round its labeler, in turn by rank, among
    /// the job's labelers who are active labelers now: a disabled account
    /// or a labeler role taken away is passed over, so that no item waits
    /// for someone who cannot answer it. With none active the step fails,
    /// saying what to do.
    fn assign_items(&self, job: &Job, items: &mut [QueueItem]) -> Result<(), ServiceError> {
        if job.spec.oracle.is_some() || items.is_empty() {
            return Ok(());
        }
        let store = self.env().store();
        let all = job.labelers();
        let active: Vec<&String> = all
            .iter()
            .filter(|name| crate::users::is_active_labeler(store.as_ref(), name))
            .collect();
        if active.is_empty() {
            return Err(ServiceError::BadRequest(format!(
                "none of job {}'s labelers ({}) is an active labeler now: give their place to one with `cloister job reassign {} --from NAME --to LABELER`, then resume",
                job.id,
                all.join(", "),
                job.id
            )));
        }
        for item in items {
            item.assignee = Some(active[item.rank as usize % active.len()].clone());
        }
        Ok(())
    }

    /// The queue item for `row`, the `k`-th queued this round (its rank);
    /// [`Cloister::assign_items`] gives it its labeler.
    pub(super) fn queue_item(
        &self,
        job: &Job,
        prep: &Prepared,
        round: u32,
        row: usize,
        reason: QueueReason,
        k: usize,
    ) -> QueueItem {
        let assignee = None;
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
    pub(super) fn step_answer(
        &self,
        who: &User,
        job: &mut Job,
        read: &mut Vec<u8>,
        round: u32,
        prep: &Prepared,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<bool, ServiceError> {
        let store = self.env().store();
        // Read before the queue: an answer changed after this read makes
        // the commit below fail, and the step is taken again.
        let unchanged = crate::jobs::answers_expectation(store.as_ref(), &job.id)?;
        let queue = crate::jobs::queue(store.as_ref(), &job.id)?;
        let mut batch = WriteBatch::new();
        let mut answered = 0u64;
        // (record, answer) of this round's spot checks
        let mut spot_answers: Vec<(String, String)> = queue
            .values()
            .filter(|q| q.round == round && q.reason == QueueReason::SpotCheck)
            .filter_map(|q| {
                q.answer
                    .as_ref()
                    .map(|a| (q.record.clone(), a.label.clone()))
            })
            .collect();
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
                crate::jobs::put_queue(&mut batch, &done)?;
                if item.reason == QueueReason::SpotCheck && item.round == round {
                    spot_answers.push((row.id.clone(), gold.clone()));
                }
                if item.reason != QueueReason::Badcase {
                    crate::jobs::put_ledger(
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
                crate::jobs::commit_job(store.as_ref(), batch, job, read)?;
            }
            progress(JobEvent::Waiting { open: n });
            return Ok(false);
        } else {
            answered = queue
                .values()
                .filter(|q| q.round == round && q.answer.is_some())
                .count() as u64;
        }
        let revoked = if spot_answers.is_empty() {
            None
        } else {
            Some(self.check_spots(who, job, round, &spot_answers, &mut batch)?)
        };
        let manual = queue
            .values()
            .filter(|q| q.reason != QueueReason::Badcase)
            .count();
        if let Some(r) = job.rounds.iter_mut().rev().find(|r| r.round == round) {
            r.answered = answered;
            if let Some((checked, agreed, revoked)) = revoked {
                r.spot_checked = checked;
                r.spot_agreed = agreed;
                r.revoked = revoked;
            }
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
        crate::jobs::touch_answers(&mut batch, &job.id, crate::env::random_bytes(16)?);
        match crate::jobs::commit_job_if(store.as_ref(), batch, job, read, vec![unchanged]) {
            // An answer changed while this step read the queue: nothing
            // was written; the drive loop takes the step again.
            Err(crate::jobs::JobError::Raced(_)) => return Ok(true),
            done => done?,
        }
        progress(JobEvent::Answered { round, answered });
        Ok(true)
    }

    /// Compares a round's spot-check answers with the automatic labels
    /// they checked. When the answers show, at the gate's confidence, that
    /// the round's precision is below the target (the one-sided upper
    /// bound on it is below the target), every automatic label of the
    /// round is revoked: removed from the ledger in `batch`, so the
    /// records return to the pool, and the next rounds accept only above
    /// this round's thresholds. Returns (checked, agreed, revoked); the
    /// revocation is audited before it takes effect.
    fn check_spots(
        &self,
        who: &User,
        job: &Job,
        round: u32,
        answers: &[(String, String)],
        batch: &mut WriteBatch,
    ) -> Result<(u64, u64, u64), ServiceError> {
        let ledger = crate::jobs::ledger(self.env().store().as_ref(), &job.id)?;
        let auto_label = |record: &str| {
            ledger.get(record).and_then(|l| match l.source {
                LedgerSource::Auto { .. } if l.round == round => Some(l.label.as_str()),
                _ => None,
            })
        };
        let checked: Vec<(&str, bool)> = answers
            .iter()
            .filter_map(|(record, answer)| {
                auto_label(record).map(|auto| (record.as_str(), auto == answer))
            })
            .collect();
        let n = checked.len() as u64;
        let agreed = checked.iter().filter(|(_, ok)| *ok).count() as u64;
        let Some(target) = &job.spec.settings.auto_label else {
            return Ok((n, agreed, 0));
        };
        let upper = precision::clopper_pearson_upper(agreed, n, 1.0 - target.confidence);
        if n == 0 || upper >= target.target_precision {
            return Ok((n, agreed, 0));
        }
        let checked_ids: HashSet<&str> = checked.iter().map(|(r, _)| *r).collect();
        let revoke: Vec<&String> = ledger
            .iter()
            .filter(|(id, l)| {
                l.round == round
                    && matches!(l.source, LedgerSource::Auto { .. })
                    && !checked_ids.contains(id.as_str())
            })
            .map(|(id, _)| id)
            .collect();
        self.env().audit().append(crate::audit::AuditRecord {
            actor: who.name.clone(),
            action: crate::audit::events::REVOKE_AUTO_LABELS.into(),
            resource: Self::dataset_resource(job).uid_text(),
            decision: crate::audit::Decision::Allow,
            policies: Vec::new(),
            params: super::params_digest(&(&job.id, round, n, agreed, revoke.len())),
            outcome: None,
            serving: None,
            account: None,
        })?;
        for id in &revoke {
            crate::jobs::delete_ledger(batch, &job.id, id);
        }
        Ok((n, agreed, revoke.len() as u64))
    }

    /// Trains the final committee on every label and registers its models.
    pub(super) fn step_finish(
        &self,
        who: &User,
        job: &mut Job,
        read: &mut Vec<u8>,
        prep: &mut Prepared,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<bool, ServiceError> {
        let store = self.env().store();
        let ledger = crate::jobs::ledger(store.as_ref(), &job.id)?;
        let queue = crate::jobs::queue(store.as_ref(), &job.id)?;
        let labels = self.labels(job, prep, &ledger, &queue)?;
        let ids: Vec<String> = (0..job.spec.models.len())
            .map(|k| final_model_id(&job.id, k))
            .collect();
        for id in &ids {
            self.guard(
                &who.principal(),
                Action::TrainModel,
                &Resource::bare_model(id),
                &(&job.id, id),
            )?;
        }
        let round = job.rounds.last().map_or(0, |r| r.round) + 1;
        // The committee of a stopping round is the final one when it saw the
        // same labels and trained as release models do (no `min_support`).
        let same_training =
            job.spec.models.iter().all(|m| {
                train::template(&m.template, &m.sets).is_ok_and(|t| t.hyper.min_support <= 1)
            });
        let committee = match prep.stopped.take() {
            Some((sig, c)) if sig == train_signature(&labels) && same_training => c,
            _ => self.train_committee(job, round, prep, &labels, true, progress)?,
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
            self.register_model(NewModel {
                id: id.clone(),
                template: &template,
                classes: job.classes.clone(),
                dim: prep.dim,
                lineage: crate::models::Lineage {
                    dataset: job.dataset.clone(),
                    ..prep.lineage.clone()
                },
                evaluation: self.evaluate_rows(job, prep, &labels, &labels.test, &per_model[k]),
                fitted: f,
                split_sizes: [
                    labels.train.len() as u64,
                    labels.val.len() as u64,
                    labels.test.len() as u64,
                ],
                created_by: job.started_by.clone(),
                evidence: crate::train::disclosure::Evidence {
                    x: &prep.x,
                    y: &labels.y,
                    train: &labels.train,
                    test: &labels.test,
                    classes: &job.classes,
                },
            })?;
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
        let b = WriteBatch::new();
        crate::jobs::commit_job(store.as_ref(), b, job, read)?;
        if let Some(r) = &job.result {
            progress(JobEvent::Finished(r));
        }
        Ok(false)
    }
}

/// The least confident model's probability for class `c`: the score
/// automatic labels are ranked and gated by.
fn least_confidence(set: &PredictionSet, c: usize) -> f32 {
    set.models
        .iter()
        .map(|p| p.get(c).copied().unwrap_or(0.0))
        .fold(f32::INFINITY, f32::min)
}

fn train_signature(l: &Labels) -> Vec<(usize, usize)> {
    l.train.iter().map(|&r| (r, l.y[r])).collect()
}

/// Why the loop stops after this round, if it does: the target reached on
/// the validation split, the rounds or the budget spent, or the pool
/// empty.
fn stop_reason(
    settings: &crate::jobs::spec::LoopSettings,
    val: &train::eval::Evaluation,
    round: u32,
    manual_so_far: usize,
    labels: &Labels,
) -> Option<&'static str> {
    let reached = settings.target.is_some_and(|(metric, value)| {
        let got = match metric {
            crate::jobs::Metric::Accuracy => val.accuracy,
            crate::jobs::Metric::MacroF1 => val.macro_f1,
        };
        got >= value
    });
    if reached {
        Some("target")
    } else if round > settings.max_rounds {
        Some("max-rounds")
    } else if manual_so_far >= settings.budget {
        Some("budget")
    } else if labels.pool.is_empty() {
        Some("pool-empty")
    } else {
        None
    }
}
