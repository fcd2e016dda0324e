//! Deployments: serve released models to client accounts
//! (docs/deployment.md).
//!
//! Managing a deployment is `manage_deployment` on it, and every model it
//! is to serve is first checked with `deploy_model` (the shipped policies
//! forbid it unless the release was approved by a second person with a
//! passing disclosure report). A prediction is `predict` on the
//! deployment, which the policies allow only to the client accounts the
//! deployment names; it is audited before it runs, with the variant, the
//! record count and the input's digest — never the input. The variants'
//! plugin chains then run as any chain does, each stage audited as a
//! `plugin_call` of the client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cloister_types::lru::Lru;
use serde::Serialize;

use super::{Cloister, ServiceError};
use crate::audit::{AuditRecord, ServingFacts};
use crate::deployments::{
    self, Capture, Deployment, DeploymentError, Guards, RampEvent, Route, Shadow,
};
use crate::feedback::{self, Captured, KeptAnswer};
use crate::policy::{Action, Resource, Role};
use crate::serving::{self, Observation, Summary};
use crate::store::{StoreError, WriteBatch};
use crate::types::DataRecord;
use crate::users::User;

/// The most records one prediction request may carry.
pub const MAX_PREDICT_RECORDS: usize = 1_000;

/// A model loaded for serving: its plugin chain and its released weights.
#[derive(Debug)]
pub(crate) struct Served {
    chain: super::pipeline::Chain,
    model: crate::train::Trained,
    classes: Vec<String>,
    /// Each plugin of the chain with its registry entry's bytes as read
    /// before the chain was checked for approval: the chain is used only
    /// while the registry still holds exactly these, so a withdrawn
    /// approval stops it at the next request.
    entries: Vec<RegistryEntry>,
}

/// A plugin's digest and its registry entry's bytes as read (`None`: no
/// entry).
type RegistryEntry = (String, Option<Vec<u8>>);

/// The serving state of one process: loaded models, and the metrics not
/// yet written to the store.
#[derive(Debug)]
pub(crate) struct ServingState {
    /// The models used last (a model's weights can be hundreds of MB; one
    /// that is deployed again after eviction is loaded again).
    loaded: Mutex<Lru<String, Arc<Served>>>,
    pub(super) metrics: Mutex<PendingMetrics>,
    /// How many taken batches of [`PendingMetrics`] are written; held while
    /// one is written (writes are serialized, requests are not).
    written: Mutex<u64>,
    /// Signalled after each batch is written.
    written_cv: std::sync::Condvar,
    /// Held while captured records become a dataset version.
    pub(super) capture_lock: Mutex<()>,
    /// Deployments as last parsed, with the stored bytes they were parsed
    /// from, for the request path: an entry is used only while the store
    /// still holds exactly those bytes, so a change made by any process
    /// (a rollback, a ramp step) takes effect at the next request.
    deployments: Mutex<HashMap<String, ParsedDeployment>>,
}

/// Models a process keeps loaded for serving at most.
const MODELS_LOADED: usize = 16;

impl Default for ServingState {
    fn default() -> Self {
        Self {
            loaded: Mutex::new(Lru::new(MODELS_LOADED)),
            metrics: Mutex::default(),
            written: Mutex::default(),
            written_cv: std::sync::Condvar::default(),
            capture_lock: Mutex::default(),
            deployments: Mutex::default(),
        }
    }
}

/// A deployment's stored bytes and what they parsed to.
type ParsedDeployment = (Vec<u8>, Arc<Deployment>);

/// Counters added since the last write, by (deployment, role, model,
/// minute). Written at most once a second, and before any status is read,
/// so a request costs a map update instead of a store write.
#[derive(Debug, Default)]
pub(crate) struct PendingMetrics {
    pub(super) counters: HashMap<(String, String, String, u64), serving::Counters>,
    written_ms: u64,
    /// Answers to keep for feedback, by deployment, with how many the
    /// deployment keeps.
    answers: HashMap<String, (u64, Vec<KeptAnswer>)>,
    /// Captured records: (deployment, client, record id, capture).
    captures: Vec<(String, String, String, Captured)>,
    /// Batches taken so far.
    taken: u64,
}

/// What was pending, taken to be written outside the lock, with its
/// number.
#[derive(Debug)]
pub(super) struct TakenMetrics {
    number: u64,
    pending: PendingMetrics,
}

impl PendingMetrics {
    /// Takes everything pending (the caller holds the lock; the writing
    /// happens after it is released).
    pub(super) fn take(&mut self, now: u64) -> TakenMetrics {
        self.taken += 1;
        self.written_ms = now;
        TakenMetrics {
            number: self.taken,
            pending: PendingMetrics {
                counters: std::mem::take(&mut self.counters),
                written_ms: now,
                answers: std::mem::take(&mut self.answers),
                captures: std::mem::take(&mut self.captures),
                taken: 0,
            },
        }
    }

    /// Whether a write is due.
    fn due(&self, now: u64) -> bool {
        now.saturating_sub(self.written_ms) >= METRICS_EVERY_MS
    }
}

/// How often pending metrics are written, at most.
const METRICS_EVERY_MS: u64 = 1_000;

/// One record's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// The record's id, as sent.
    pub id: String,
    /// The predicted class.
    pub label: String,
    /// Its probability.
    pub confidence: f32,
    /// Every class's probability.
    pub probabilities: std::collections::BTreeMap<String, f32>,
}

/// What a deployment answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeployedPredictions {
    /// The deployment.
    pub deployment: String,
    /// The model that answered.
    pub model: String,
    /// `champion` or `candidate`.
    pub variant: &'static str,
    /// One answer per record kept by the chain, in order.
    pub predictions: Vec<Answer>,
}

/// A deployment with its variants' figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentStatus {
    /// The deployment.
    pub deployment: Deployment,
    /// The figures of every variant over the window.
    pub variants: Vec<Summary>,
    /// The window's start, ms since the epoch.
    pub since_ms: u64,
    /// Every variant's figures per minute over the window.
    pub series: Vec<VariantSeries>,
    /// The candidates' last regression reports.
    pub reports: Vec<ReportStanding>,
    /// Captured records waiting for their dataset version.
    pub captured_waiting: u64,
}

/// A variant's figures per minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantSeries {
    /// The model.
    pub model: String,
    /// `champion`, `candidate` or `shadow`.
    pub role: String,
    /// One point per minute with traffic or feedback, oldest first.
    pub points: Vec<SeriesPoint>,
}

/// One minute of a variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// The minute's start, ms since the epoch.
    pub minute_ms: u64,
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// p99 latency in ms.
    pub p99_ms: Option<f64>,
    /// Records labeled by feedback in that minute.
    pub labeled: u64,
    /// Online accuracy on them.
    pub accuracy: Option<f64>,
}

/// A stored regression report and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportStanding {
    /// The report.
    pub report: crate::regression::RegressionReport,
    /// `pass`, `fail`, `stale` (run against another champion) or
    /// `damaged` (its signature does not verify).
    pub standing: String,
}

/// One change to a deployment's routing.
#[derive(Debug, Clone, PartialEq)]
pub enum DeploymentChange {
    /// Set a candidate's weight (basis points), adding it if new.
    SetWeight {
        /// The model.
        model: String,
        /// Its weight.
        weight: u32,
    },
    /// Remove a candidate.
    RemoveCandidate(String),
    /// Set the shadow (`None` removes it).
    Shadow(Option<Shadow>),
    /// Make a candidate the champion.
    Promote(String),
    /// Back to the previous champion, every candidate at weight 0.
    Rollback,
    /// Stop routing changes (serving goes on).
    Pause,
    /// Allow routing changes again.
    Resume,
    /// Replace the client accounts.
    Clients(Vec<String>),
    /// Ramp a candidate up step by step (weights in basis points), each
    /// step held `bake_ms` and judged by `guards`; the last promotes it.
    Ramp {
        /// The candidate.
        model: String,
        /// Its weight at each step.
        steps: Vec<u32>,
        /// How long each step is held.
        bake_ms: u64,
        /// When to roll back.
        guards: Guards,
    },
    /// Stop a running ramp where it is.
    StopRamp,
    /// Capture a sampled share of requests into a dataset (`None` stops).
    Capture(Option<CaptureSpec>),
    /// Keep this many recent answers for feedback (0: none).
    KeepAnswers(u64),
}

/// Where and how much to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// The dataset (created by the first version if new).
    pub dataset: String,
    /// The share of requests, in basis points.
    pub sample: u32,
    /// Records per version.
    pub batch: u32,
}

impl DeploymentChange {
    fn describe(&self) -> String {
        match self {
            DeploymentChange::SetWeight { model, weight } => format!("set-weight {model} {weight}"),
            DeploymentChange::RemoveCandidate(m) => format!("remove {m}"),
            DeploymentChange::Shadow(Some(s)) => format!("shadow {} {}", s.model, s.sample),
            DeploymentChange::Shadow(None) => "shadow off".into(),
            DeploymentChange::Promote(m) => format!("promote {m}"),
            DeploymentChange::Rollback => "rollback".into(),
            DeploymentChange::Pause => "pause".into(),
            DeploymentChange::Resume => "resume".into(),
            DeploymentChange::Clients(c) => format!("clients {}", c.join(",")),
            DeploymentChange::Ramp {
                model,
                steps,
                bake_ms,
                guards,
            } => format!(
                "ramp {model} steps {} bake {} s, guards: error rate {}, p99 {} ms, agreement {}, {} requests a step",
                steps
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                bake_ms / 1000,
                guards.max_error_rate.map_or("-".into(), |v| v.to_string()),
                guards.max_p99_ms.map_or("-".into(), |v| v.to_string()),
                guards.min_agreement.map_or("-".into(), |v| v.to_string()),
                guards.min_requests
            ),
            DeploymentChange::StopRamp => "stop ramp".into(),
            DeploymentChange::Capture(Some(c)) => format!(
                "capture {} bp into {} in versions of {} records",
                c.sample, c.dataset, c.batch
            ),
            DeploymentChange::Capture(None) => "capture off".into(),
            DeploymentChange::KeepAnswers(n) => format!("keep {n} answers"),
        }
    }

    /// The model the change brings into service, if any.
    fn new_model(&self) -> Option<&str> {
        match self {
            DeploymentChange::SetWeight { model, .. }
            | DeploymentChange::Promote(model)
            | DeploymentChange::Ramp { model, .. } => Some(model),
            DeploymentChange::Shadow(Some(s)) => Some(&s.model),
            _ => None,
        }
    }
}

pub(super) fn resource(d: &Deployment) -> Resource {
    Resource::Deployment {
        name: d.name.clone(),
        clients: d.clients.clone(),
    }
}

fn stand_in(name: &str) -> Resource {
    Resource::Deployment {
        name: name.to_string(),
        clients: Vec::new(),
    }
}

impl Cloister {
    /// Creates deployment `name` serving model `champion` to `clients`
    /// (accounts with the `client` role).
    pub fn create_deployment(
        &self,
        who: &User,
        name: &str,
        champion: &str,
        clients: &[String],
    ) -> Result<Deployment, ServiceError> {
        let params = ("create", name, champion, clients);
        let candidate = Resource::Deployment {
            name: name.to_string(),
            clients: clients.to_vec(),
        };
        self.guard(
            &who.principal(),
            Action::ManageDeployment,
            &candidate,
            &params,
        )?;
        deployments::check_name(name)?;
        self.check_clients(clients)?;
        let m = self.model_for(who, Action::DeployModel, champion, &params)?;
        self.lineage_approved(&m)?;
        let store = self.env.store();
        if deployments::exists(store.as_ref(), name)? {
            return Err(DeploymentError::Exists(name.to_string()).into());
        }
        let d = Deployment::new(
            name,
            champion,
            clients.to_vec(),
            random_salt()?,
            &who.name,
            crate::time::now_ms(),
        )?;
        let mut b = WriteBatch::new();
        deployments::put(&mut b, &d)?;
        // Created only if still absent: of two processes creating one name
        // at once, the second is refused instead of replacing the first.
        let absent = [crate::store::Expect::new(
            crate::store::Space::Deployments,
            name.as_bytes().to_vec(),
            None,
        )];
        match store.commit_if(&absent, b) {
            Ok(()) => Ok(d),
            Err(crate::store::StoreError::Conflict { .. }) => {
                Err(DeploymentError::Exists(name.to_string()).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every deployment.
    pub fn list_deployments(&self, who: &User) -> Result<Vec<Deployment>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListDeployments,
            &Resource::Environment,
            &"deployments",
        )?;
        Ok(deployments::list(self.env.store().as_ref())?)
    }

    /// A deployment with its variants' figures since `since_ms`.
    pub fn deployment_status(
        &self,
        who: &User,
        name: &str,
        since_ms: u64,
    ) -> Result<DeploymentStatus, ServiceError> {
        let d = self.deployment_for(who, Action::ViewDeployment, name, &(name, since_ms))?;
        self.flush_metrics()?;
        let store = self.env.store();
        let mut variants = Vec::new();
        let mut series = Vec::new();
        let mut add = |model: &str, role: &str, weight: u32| -> Result<(), ServiceError> {
            let points = serving::series(store.as_ref(), &d.name, role, model, since_ms)?;
            let mut c = serving::Counters::default();
            for (_, p) in &points {
                c.merge(p);
            }
            variants.push(Summary::of(model, role, weight, &c));
            series.push(VariantSeries {
                model: model.to_string(),
                role: role.to_string(),
                points: points
                    .into_iter()
                    .map(|(minute, p)| SeriesPoint {
                        minute_ms: minute * 60_000,
                        requests: p.requests,
                        errors: p.errors,
                        p99_ms: p.latency_ms(0.99),
                        labeled: p.labeled,
                        accuracy: p.accuracy().map(|a| a.0),
                    })
                    .collect(),
            });
            Ok(())
        };
        add(&d.champion, "champion", d.champion_weight())?;
        for c in &d.candidates {
            add(&c.model, "candidate", c.weight)?;
        }
        if let Some(s) = &d.shadow {
            add(&s.model, "shadow", s.sample)?;
        }
        let reports = self.report_standings(&d)?;
        let captured_waiting = feedback::count_captures(
            store.as_ref(),
            &d.name,
            u64::from(deployments::MAX_CAPTURE_BATCH),
        )?;
        Ok(DeploymentStatus {
            deployment: d,
            variants,
            since_ms,
            series,
            reports,
            captured_waiting,
        })
    }

    /// Applies one routing change. Every model it brings into service is
    /// checked with `deploy_model` first.
    pub fn change_deployment(
        &self,
        who: &User,
        name: &str,
        change: DeploymentChange,
    ) -> Result<Deployment, ServiceError> {
        let what = change.describe();
        // The deployment as stored before anything is decided on it: the
        // change lands only on that (see the end).
        let before = self
            .env
            .store()
            .get(crate::store::Space::Deployments, name.as_bytes())?;
        let mut d = self.deployment_for(who, Action::ManageDeployment, name, &(name, &what))?;
        if let Some(model) = change.new_model()
            && !d.models().iter().any(|m| m == model)
        {
            let m = self.model_for(who, Action::DeployModel, model, &(name, &what))?;
            self.lineage_approved(&m)?;
        }
        let traffic = match &change {
            DeploymentChange::SetWeight { model, weight } if *weight > 0 => {
                Some((model.as_str(), *weight))
            }
            // A ramp gives its largest step, decided now: the host advances
            // it later without asking again.
            DeploymentChange::Ramp { model, steps, .. } => {
                steps.iter().max().map(|w| (model.as_str(), *w))
            }
            DeploymentChange::Promote(model) => Some((model.as_str(), deployments::ALL_TRAFFIC)),
            _ => None,
        };
        if let Some((model, weight)) = traffic {
            let r = self.traffic(&d, model, weight)?;
            self.guard(&who.principal(), Action::RouteTraffic, &r, &(name, &what))?;
        }
        if matches!(change, DeploymentChange::Capture(_)) && d.capture.is_some() {
            // Records captured under the old setting go where it said,
            // before it changes.
            self.flush_metrics()?;
            self.roll_capture(&d.name)?;
        }
        match change {
            DeploymentChange::SetWeight { model, weight } => d.set_weight(&model, weight)?,
            DeploymentChange::RemoveCandidate(model) => d.remove_candidate(&model)?,
            DeploymentChange::Shadow(s) => d.set_shadow(s)?,
            DeploymentChange::Promote(model) => d.promote(&model)?,
            DeploymentChange::Rollback => {
                d.rollback()?;
            }
            DeploymentChange::Pause => d.paused = true,
            DeploymentChange::Resume => d.paused = false,
            DeploymentChange::Clients(clients) => {
                self.check_clients(&clients)?;
                d.set_clients(clients)?;
            }
            DeploymentChange::Ramp {
                model,
                steps,
                bake_ms,
                guards,
            } => d.start_ramp(
                &model,
                steps,
                bake_ms,
                guards,
                &who.name,
                crate::time::now_ms(),
            )?,
            DeploymentChange::StopRamp => d.stop_ramp()?,
            DeploymentChange::Capture(Some(spec)) => {
                crate::datasets::check_name(&spec.dataset)?;
                self.guard(
                    &who.principal(),
                    Action::CaptureData,
                    &Resource::Dataset {
                        name: spec.dataset.clone(),
                    },
                    &(name, &what),
                )?;
                self.check_capture_dataset(&spec.dataset, &d.name)?;
                d.set_capture(Some(Capture {
                    dataset: spec.dataset,
                    sample: spec.sample,
                    batch: spec.batch,
                    by: who.name.clone(),
                }))?;
            }
            DeploymentChange::Capture(None) => d.set_capture(None)?,
            DeploymentChange::KeepAnswers(n) => {
                if n > deployments::MAX_KEEP_ANSWERS {
                    return Err(DeploymentError::Invalid(format!(
                        "a deployment keeps at most {} answers, not {n}",
                        deployments::MAX_KEEP_ANSWERS
                    ))
                    .into());
                }
                d.keep_answers = n;
            }
        }
        d.record(&who.name, crate::time::now_ms(), what);
        let mut b = WriteBatch::new();
        deployments::put(&mut b, &d)?;
        {
            // Everything above was decided on `before`; if the host judged
            // a ramp step (which it does under this lock) or another
            // operator changed the deployment meanwhile, this change is
            // refused rather than written over theirs.
            let _serving = self
                .serving
                .metrics
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let expect = [crate::store::Expect::new(
                crate::store::Space::Deployments,
                d.name.as_bytes(),
                before,
            )];
            match self.env.store().commit_if(&expect, b) {
                Err(crate::store::StoreError::Conflict { .. }) => {
                    return Err(DeploymentError::Invalid(format!(
                        "deployment `{}` changed while this change was being made (a ramp step, or another operator); nothing was changed: look at it again and retry",
                        d.name
                    ))
                    .into());
                }
                done => done?,
            }
        }
        Ok(d)
    }

    /// Deletes a deployment and its metrics.
    pub fn delete_deployment(&self, who: &User, name: &str) -> Result<(), ServiceError> {
        let d = self.deployment_for(who, Action::ManageDeployment, name, &("delete", name))?;
        self.flush_metrics()?;
        // Captured records are data: they become their version first.
        self.roll_capture(&d.name)?;
        let store = self.env.store();
        let mut b = WriteBatch::new();
        serving::delete_all(store.as_ref(), &mut b, &d.name)?;
        feedback::delete_all(store.as_ref(), &mut b, &d.name)?;
        crate::regression::delete_all(store.as_ref(), &mut b, &d.name)?;
        deployments::delete(&mut b, &d.name);
        store.commit(b)?;
        Ok(())
    }

    /// Predicts `records` with deployment `name` for a client. `key` routes
    /// the request (a caller-chosen id: the same key, the same variant);
    /// without one, the caller's account is the key. The request is
    /// authorized and audited first; a candidate's request also runs the
    /// champion, and a sampled request the shadow, for the comparison
    /// metrics — their answers are never returned.
    pub fn predict_deployed(
        &self,
        who: &User,
        name: &str,
        key: Option<&str>,
        records: &[DataRecord],
    ) -> Result<DeployedPredictions, ServiceError> {
        let started = Instant::now();
        let looked_up = self.deployment_cached(name);
        let d = self.found(looked_up, who, Action::Predict, || stand_in(name), &name)?;
        let key = key.unwrap_or(&who.name);
        let route = d.route(key);
        let model = d.model_of(route).to_string();
        let input = input_digest(records);
        let shadow = d
            .shadowed(key)
            .then(|| d.shadow.as_ref().map(|s| s.model.clone()))
            .flatten();
        let facts = ServingFacts {
            deployment: d.name.clone(),
            model: model.clone(),
            variant: match route {
                Route::Champion => "champion".into(),
                Route::Candidate(_) => "candidate".into(),
            },
            records: records.len() as u64,
            input_sha256: input,
            shadow: shadow.clone(),
        };
        self.guard_serving(who, &d, facts)?;
        if records.is_empty() || records.len() > MAX_PREDICT_RECORDS {
            return Err(ServiceError::BadRequest(format!(
                "a prediction request carries 1 to {MAX_PREDICT_RECORDS} records, not {}",
                records.len()
            )));
        }
        let input = super::pipeline::unlabeled(records);
        let purpose = format!("deploy {}", d.name);
        let served = self.serve(who, &purpose, &model, input.clone());
        let served_us = started.elapsed().as_micros() as u64;
        // The champion's answer, for the agreement of a candidate and the
        // shadow (not returned).
        let champion = match route {
            Route::Champion => served.as_ref().ok().cloned(),
            Route::Candidate(_) => self.serve(who, &purpose, &d.champion, input.clone()).ok(),
        };
        let now = crate::time::now_ms();
        let variant = match route {
            Route::Champion => "champion",
            Route::Candidate(_) => "candidate",
        };
        let compare = match route {
            Route::Champion => None,
            Route::Candidate(_) => champion.as_ref(),
        };
        let mut observed = vec![(
            variant,
            model.clone(),
            observation(&served, served_us, compare),
        )];
        let mut shadow_answer = None;
        if let Some(shadow_model) = shadow {
            let t = Instant::now();
            let result = self.serve(who, &format!("{purpose} shadow"), &shadow_model, input);
            let latency = t.elapsed().as_micros() as u64;
            observed.push((
                "shadow",
                shadow_model.clone(),
                observation(&result, latency, champion.as_ref()),
            ));
            shadow_answer = result.ok().map(|a| (shadow_model, a));
        }
        let captured = d.captured(key);
        let kept = match (&served, d.keep_answers) {
            (Ok(a), keep) if keep > 0 => kept_answers(
                &who.name,
                now,
                variant,
                &model,
                a,
                compare,
                shadow_answer.as_ref(),
                d.capture.as_ref().filter(|_| captured),
            ),
            _ => Vec::new(),
        };
        let captures = match (&d.capture, served.is_ok() && captured) {
            (Some(_), true) => captured_records(&who.name, now, records),
            _ => Vec::new(),
        };
        let mut taken = None;
        {
            let mut pending = self
                .serving
                .metrics
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (role, m, o) in &observed {
                pending
                    .counters
                    .entry((
                        d.name.clone(),
                        role.to_string(),
                        m.clone(),
                        serving::minute(now),
                    ))
                    .or_default()
                    .add(o);
            }
            if !kept.is_empty() {
                let e = pending
                    .answers
                    .entry(d.name.clone())
                    .or_insert_with(|| (d.keep_answers, Vec::new()));
                e.0 = d.keep_answers;
                e.1.extend(kept);
            }
            for (client, id, c) in captures {
                pending.captures.push((d.name.clone(), client, id, c));
            }
            if pending.due(now) {
                taken = Some(pending.take(now));
            }
            if d.ramp.as_ref().is_some_and(|r| r.state == "running") {
                for (role, m, o) in &observed {
                    if *role == "candidate" {
                        self.judge_ramp(&d.name, m, RampInput::Request(o), now)?;
                    }
                }
            }
        }
        // Written after the lock is released: requests go on meanwhile.
        let roll = match taken {
            Some(t) => self.write_metrics(t)?,
            None => Vec::new(),
        };
        for name in roll {
            self.roll_capture_noting_failure(&name);
        }
        let answer = served?;
        Ok(DeployedPredictions {
            deployment: d.name.clone(),
            model,
            variant,
            predictions: answer.answers,
        })
    }

    /// A deployment for the request path: read from the store every time
    /// (another process may have changed it), parsed only when its bytes
    /// differ from those last parsed.
    pub(super) fn deployment_cached(&self, name: &str) -> Result<Arc<Deployment>, DeploymentError> {
        let stored = self
            .env
            .store()
            .get(crate::store::Space::Deployments, name.as_bytes())?;
        let mut cache = self
            .serving
            .deployments
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let (Some(bytes), Some((seen, d))) = (&stored, cache.get(name))
            && bytes == seen
        {
            return Ok(Arc::clone(d));
        }
        let d = Arc::new(deployments::decode(name, stored.as_deref())?);
        if cache.len() >= 1024 {
            cache.clear();
        }
        if let Some(bytes) = stored {
            cache.insert(name.to_string(), (bytes, Arc::clone(&d)));
        }
        Ok(d)
    }

    /// Writes a taken batch of metrics, kept answers and captured records
    /// without waiting for the disk, one batch at a time. Returns the
    /// deployments with a full batch of captured records waiting.
    pub(super) fn write_metrics(&self, t: TakenMetrics) -> Result<Vec<String>, ServiceError> {
        let mut written = self
            .serving
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let result = self.write_taken(t.pending);
        // Counted whether or not it failed, so no flush waits forever.
        *written += 1;
        self.serving.written_cv.notify_all();
        result
    }

    fn write_taken(&self, mut pending: PendingMetrics) -> Result<Vec<String>, ServiceError> {
        let store = self.env.store();
        for ((dep, role, model, minute), c) in pending.counters.drain() {
            serving::add(store.as_ref(), &dep, &role, &model, minute, &c)?;
        }
        let answers = std::mem::take(&mut pending.answers);
        let captures = std::mem::take(&mut pending.captures);
        if !answers.is_empty() || !captures.is_empty() {
            // The rings are read again if another process advanced one.
            crate::store::stage_update_reading(store.as_ref(), || {
                let mut b = WriteBatch::new();
                let mut expect = Vec::new();
                for (dep, (keep, kept)) in &answers {
                    expect.extend(feedback::keep(store.as_ref(), &mut b, dep, kept, *keep)?);
                }
                for (dep, client, id, c) in &captures {
                    feedback::capture(&mut b, dep, client, id, c)?;
                }
                Ok::<_, StoreError>((expect, b, ()))
            })?;
        }
        let mut captured: Vec<String> = Vec::new();
        for (dep, _, _, _) in captures {
            if !captured.contains(&dep) {
                captured.push(dep);
            }
        }
        let mut due = Vec::new();
        for dep in captured {
            let Ok(d) = self.deployment_cached(&dep) else {
                continue;
            };
            if let Some(c) = &d.capture
                && feedback::count_captures(store.as_ref(), &dep, u64::from(c.batch))?
                    >= u64::from(c.batch)
            {
                due.push(dep);
            }
        }
        Ok(due)
    }

    /// Writes what serving keeps in memory, durably, when there is any
    /// (when the environment is closed).
    pub(super) fn write_pending_on_close(&self) {
        let taken = {
            let mut pending = self
                .serving
                .metrics
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if pending.counters.is_empty()
                && pending.answers.is_empty()
                && pending.captures.is_empty()
            {
                return;
            }
            pending.take(crate::time::now_ms())
        };
        if self.write_metrics(taken).is_ok() {
            let _ = self.env.store().sync();
        }
    }

    /// Writes everything pending now, and waits until every batch taken
    /// before it is written too (before a status is read, feedback is
    /// matched or a capture is written).
    pub(super) fn flush_metrics(&self) -> Result<(), ServiceError> {
        let taken = self
            .serving
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(crate::time::now_ms());
        let number = taken.number;
        self.write_metrics(taken)?;
        let mut written = self
            .serving
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while *written < number {
            written = self
                .serving
                .written_cv
                .wait(written)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Judges a running ramp of `model` on one more request or one more
    /// labeled record (the caller holds the metrics lock): the deployment
    /// is read again, the ramp's counters updated, and a step, a promotion
    /// or a rollback written with its history entry and a `ramp` audit
    /// entry of the host.
    pub(super) fn judge_ramp(
        &self,
        name: &str,
        model: &str,
        input: RampInput<'_>,
        now: u64,
    ) -> Result<(), ServiceError> {
        let store = self.env.store();
        let key = name.as_bytes();
        // Over the deployment as read: if another process changed it
        // meanwhile (an operator's rollback), this judgement is made again
        // on the new one rather than written over it.
        for attempt in 0..crate::store::UPDATE_TRIES {
            if attempt > 0 {
                // A conflict: come back at a random time, as
                // `store::update` does, rather than at once into the same
                // collision.
                std::thread::sleep(crate::store::backoff(attempt));
            }
            let stored = store.get(crate::store::Space::Deployments, key)?;
            let mut d = deployments::decode(name, stored.as_deref())?;
            let expect = [crate::store::Expect::new(
                crate::store::Space::Deployments,
                key.to_vec(),
                stored,
            )];
            let judged = match &input {
                RampInput::Request(o) => d.judge_ramp(model, o, now),
                RampInput::Feedback {
                    correct,
                    champion_correct,
                } => d.judge_feedback(model, *correct, *champion_correct, now),
            };
            let Some(event) = judged else {
                if !d
                    .ramp
                    .as_ref()
                    .is_some_and(|r| r.state == "running" && r.model == model)
                {
                    return Ok(());
                }
                // The step's counters: like the metrics, not waited for.
                let mut b = WriteBatch::new();
                deployments::put(&mut b, &d)?;
                match store.stage_if(&expect, b) {
                    Ok(()) => return Ok(()),
                    Err(crate::store::StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let what = match &event {
                RampEvent::Advanced(w) => format!("ramp {model}: step to {w}"),
                RampEvent::Promoted => format!("ramp {model}: promoted"),
                RampEvent::Held => format!("ramp {model}: done, holding its share"),
                RampEvent::RolledBack(reason) => format!("ramp {model}: rolled back: {reason}"),
            };
            // The host's own action, on the record before it takes effect.
            self.env.audit().append(AuditRecord {
                actor: "cloister".into(),
                action: crate::audit::events::RAMP.into(),
                resource: resource(&d).uid_text(),
                decision: crate::audit::Decision::Allow,
                policies: vec!["host".into()],
                params: super::params_digest(&(name, &what)),
                outcome: None,
                serving: None,
                account: None,
            })?;
            d.record("cloister", now, what);
            let mut b = WriteBatch::new();
            deployments::put(&mut b, &d)?;
            // A change that landed since the read fails this step (after
            // its audited decision, like any operation that fails); the
            // next request judges the ramp again.
            store.commit_if(&expect, b)?;
            return Ok(());
        }
        Err(crate::store::StoreError::Conflict {
            space: crate::store::Space::Deployments,
            key: crate::store::printable_key(key),
        }
        .into())
    }

    /// Runs one model on `input` through its chain.
    pub(super) fn serve(
        &self,
        who: &User,
        purpose: &str,
        model: &str,
        input: Vec<DataRecord>,
    ) -> Result<DeployedAnswer, ServiceError> {
        let s = self.served(model)?;
        let (kept, x, _) = self.run_chain(who, purpose, input, &s.chain, &mut |_| {})?;
        let rows: Vec<usize> = (0..x.rows()).collect();
        let probs = s.model.predict(&x, &rows)?;
        let k = s.classes.len().max(1);
        let answers = kept
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let p = &probs[i * k..(i + 1) * k];
                let (best, conf) = crate::train::eval::top_class(p);
                Answer {
                    id: r.id,
                    label: s.classes.get(best).cloned().unwrap_or_default(),
                    confidence: conf,
                    probabilities: s.classes.iter().cloned().zip(p.iter().copied()).collect(),
                }
            })
            .collect();
        Ok(DeployedAnswer { answers })
    }

    /// A model loaded for serving: its chain (the plugins must still be
    /// approved) and its released weights, loaded once per process.
    fn served(&self, id: &str) -> Result<Arc<Served>, ServiceError> {
        let cached = self
            .serving
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id);
        // Used while every plugin's entry is as it was; after a change (an
        // approval withdrawn, or given again) the chain is loaded and
        // checked anew.
        if let Some(s) = cached
            && self.registry_entries(s.entries.iter().map(|(d, _)| d.as_str()))? == s.entries
        {
            return Ok(s);
        }
        let m = crate::models::get(self.env.store().as_ref(), id)?;
        let digests = m.lineage.preprocess.iter().chain([&m.lineage.features]);
        let entries = self.registry_entries(digests.map(String::as_str))?;
        let chain = self.serving_chain(&m.lineage)?;
        let model = crate::train::Trained::from_safetensors(
            m.kind,
            &crate::models::release_weights(self.env.dir(), self.env.objects(), &m)?,
        )?;
        let s = Arc::new(Served {
            chain,
            model,
            classes: m.classes,
            entries,
        });
        self.serving
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Arc::clone(&s));
        Ok(s)
    }

    /// The registry entries of `digests` as stored now, with the digests.
    fn registry_entries<'a>(
        &self,
        digests: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<RegistryEntry>, ServiceError> {
        let store = self.env.store();
        digests
            .map(|d| {
                let bytes = store.get(crate::store::Space::Plugins, d.as_bytes())?;
                Ok((d.to_string(), bytes))
            })
            .collect()
    }

    pub(super) fn deployment_for(
        &self,
        who: &User,
        action: Action,
        name: &str,
        params: &impl Serialize,
    ) -> Result<Deployment, ServiceError> {
        let looked_up = deployments::get(self.env.store().as_ref(), name);
        let d = self.found(looked_up, who, action, || stand_in(name), params)?;
        self.guard(&who.principal(), action, &resource(&d), params)?;
        Ok(d)
    }

    /// The authorization point for a prediction: the same decision as
    /// `guard`, with the request's facts on the audit record.
    fn guard_serving(
        &self,
        who: &User,
        d: &Deployment,
        facts: ServingFacts,
    ) -> Result<(), ServiceError> {
        let principal = who.principal();
        let r = resource(d);
        let (allowed, mut record): (bool, AuditRecord) =
            self.decide(&principal, Action::Predict, &r, &facts);
        record.serving = Some(facts);
        self.env.audit().append(record)?;
        Self::verdict(allowed, &principal, Action::Predict, &r)
    }

    /// Every name must be an account with the `client` role.
    fn check_clients(&self, clients: &[String]) -> Result<(), ServiceError> {
        for c in clients {
            let u = crate::users::get(self.env.store().as_ref(), c)?;
            if !u.roles.contains(&Role::Client) {
                return Err(DeploymentError::Invalid(format!(
                    "user `{c}` is not a client account (create one with `cloister user add NAME --role client`)"
                ))
                .into());
            }
        }
        Ok(())
    }
}

/// What a ramp is judged on.
#[derive(Debug, Clone, Copy)]
pub(super) enum RampInput<'a> {
    /// One more request of the candidate.
    Request(&'a Observation),
    /// One more labeled record the candidate answered.
    Feedback {
        /// Whether the candidate was right.
        correct: bool,
        /// Whether the champion was, on the same record.
        champion_correct: bool,
    },
}

/// A model's answers to one request.
#[derive(Debug, Clone)]
pub(super) struct DeployedAnswer {
    pub(super) answers: Vec<Answer>,
}

/// The answers of one request as kept for feedback.
#[allow(clippy::too_many_arguments)]
fn kept_answers(
    client: &str,
    now: u64,
    role: &str,
    model: &str,
    answer: &DeployedAnswer,
    champion: Option<&DeployedAnswer>,
    shadow: Option<&(String, DeployedAnswer)>,
    capture: Option<&Capture>,
) -> Vec<KeptAnswer> {
    let by_id = |a: &DeployedAnswer| -> HashMap<String, String> {
        a.answers
            .iter()
            .map(|x| (x.id.clone(), x.label.clone()))
            .collect()
    };
    let champion = champion.map(by_id);
    let shadow = shadow.map(|(m, a)| (m.clone(), by_id(a)));
    answer
        .answers
        .iter()
        .map(|x| KeptAnswer {
            client: client.to_string(),
            id: x.id.clone(),
            time_ms: now,
            role: role.to_string(),
            model: model.to_string(),
            label: x.label.clone(),
            champion: champion.as_ref().and_then(|c| c.get(&x.id).cloned()),
            shadow: shadow
                .as_ref()
                .and_then(|(m, s)| s.get(&x.id).map(|l| (m.clone(), l.clone()))),
            captured: capture
                .filter(|_| captured_fits(client, &x.id))
                .map(|c| c.dataset.clone()),
            truth: None,
        })
        .collect()
}

/// Whether a record's capture id fits the dataset id rules.
fn captured_fits(client: &str, id: &str) -> bool {
    feedback::captured_id(client, id).len() <= 256
}

/// The records of one request as captured: JSON lines with their ids made
/// `client/id` and no label (records whose id would grow past 256 bytes
/// are not captured).
fn captured_records(
    client: &str,
    now: u64,
    records: &[DataRecord],
) -> Vec<(String, String, Captured)> {
    records
        .iter()
        .filter(|r| captured_fits(client, &r.id))
        .map(|r| {
            let mut r = r.clone();
            let new_id = feedback::captured_id(client, &r.id);
            let id = std::mem::replace(&mut r.id, new_id);
            r.label = None;
            (
                client.to_string(),
                id,
                Captured {
                    line: crate::records::record_to_json(&r).to_string(),
                    time_ms: now,
                    truth: None,
                },
            )
        })
        .collect()
}

fn observation(
    result: &Result<DeployedAnswer, ServiceError>,
    latency_us: u64,
    compare: Option<&DeployedAnswer>,
) -> Observation {
    match result {
        Err(_) => Observation {
            error: true,
            latency_us,
            ..Observation::default()
        },
        Ok(a) => Observation {
            error: false,
            latency_us,
            classes: a.answers.iter().map(|x| x.label.clone()).collect(),
            confidences: a.answers.iter().map(|x| x.confidence).collect(),
            agreement: compare.map(|c| {
                let theirs: HashMap<&str, &str> = c
                    .answers
                    .iter()
                    .map(|x| (x.id.as_str(), x.label.as_str()))
                    .collect();
                let mut compared = 0;
                let mut agreed = 0;
                for x in &a.answers {
                    if let Some(l) = theirs.get(x.id.as_str()) {
                        compared += 1;
                        agreed += u64::from(*l == x.label);
                    }
                }
                (compared, agreed)
            }),
        },
    }
}

/// SHA-256 of the records as sent, over a length-prefixed encoding of
/// every id, field name and value (numbers by their bits), so two
/// different inputs never share an encoding.
fn input_digest(records: &[DataRecord]) -> String {
    fn put(buf: &mut Vec<u8>, b: &[u8]) {
        buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
        buf.extend_from_slice(b);
    }
    let mut buf = Vec::new();
    put(&mut buf, &(records.len() as u64).to_le_bytes());
    for r in records {
        put(&mut buf, r.id.as_bytes());
        put(&mut buf, &(r.texts.len() as u64).to_le_bytes());
        for t in &r.texts {
            put(&mut buf, t.name.as_bytes());
            put(&mut buf, t.value.as_bytes());
        }
        put(&mut buf, &(r.numerics.len() as u64).to_le_bytes());
        for n in &r.numerics {
            put(&mut buf, n.name.as_bytes());
            let values: Vec<u8> = n
                .value
                .as_slice()
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect();
            let tag: &[u8] = match n.value {
                crate::types::Numeric::Scalar(_) => b"s",
                crate::types::Numeric::Vector(_) => b"v",
            };
            put(&mut buf, tag);
            put(&mut buf, &values);
        }
    }
    crate::digest::Digest::of(&buf).to_hex()
}

fn random_salt() -> Result<[u8; 16], ServiceError> {
    use ring::rand::SecureRandom;
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| {
            ServiceError::BadRequest("the system random number generator failed".into())
        })?;
    Ok(salt)
}
