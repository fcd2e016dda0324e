//! Deployments: named prediction endpoints that serve released models
//! inside the environment (docs/deployment.md).
//!
//! A deployment has one **champion** and any number of **candidates**,
//! each a model with a traffic weight in basis points (1/100 of a
//! percent); the champion takes whatever the candidates do not. An
//! optional **shadow** model receives a copy of a sampled share of the
//! requests; its answers are compared with the champion's and never
//! returned. Routing is **sticky** ([`Deployment::route`]): a request's
//! key maps to a variant through a salted hash, so a key stays on its
//! variant while weights change, and raising a candidate's weight only
//! moves keys toward that candidate.
//!
//! Stored in [`Space::Deployments`] by name, with every change appended to
//! the deployment's own history (the audit log has the authorization of
//! each change). Metrics live in [`crate::serving`].

use serde::{Deserialize, Serialize};

use crate::serving::Counters;
use crate::store::{Space, Storage, StoreError, WriteBatch};

/// Traffic weights are in basis points: 10,000 is all of it.
pub const ALL_TRAFFIC: u32 = 10_000;
/// The most candidates one deployment routes to.
pub const MAX_CANDIDATES: usize = 8;
/// The most client accounts one deployment serves.
pub const MAX_CLIENTS: usize = 64;
/// The most entries a deployment's history keeps (the oldest go first;
/// the audit log keeps every change regardless).
pub const MAX_HISTORY: usize = 200;

/// What went wrong with a deployment.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    /// The name does not follow the rules.
    #[error(
        "invalid deployment name `{0}`: use 1–64 of a-z 0-9 . _ - starting with a letter or digit"
    )]
    BadName(String),
    /// No deployment of that name.
    #[error("no deployment `{0}`")]
    Unknown(String),
    /// A deployment of that name exists.
    #[error("deployment `{0}` already exists")]
    Exists(String),
    /// A change that the deployment's state does not allow.
    #[error("{0}")]
    Invalid(String),
    /// A stored deployment is damaged.
    #[error("the stored deployment `{0}` is damaged")]
    Damaged(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One model a deployment routes traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// The model id.
    pub model: String,
    /// Its share of the traffic in basis points (the champion's is what
    /// the candidates leave).
    pub weight: u32,
}

/// The shadow: a model that sees a copy of a sampled share of requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    /// The model id.
    pub model: String,
    /// The share of requests copied to it, in basis points.
    pub sample: u32,
}

/// One change to a deployment, as its history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// When, in ms since the epoch.
    pub time_ms: u64,
    /// Who made it.
    pub by: String,
    /// What it was, e.g. `set-weight m-… 500`, `promote m-…`.
    pub what: String,
    /// The champion after the change.
    pub champion: String,
}

/// A deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Its name (the endpoint is `/api/deployments/{name}/predict`).
    pub name: String,
    /// The model that answers unless a candidate takes the request.
    pub champion: String,
    /// Candidates, in the order they were added.
    pub candidates: Vec<Variant>,
    /// The shadow, if any.
    pub shadow: Option<Shadow>,
    /// The client accounts it serves.
    pub clients: Vec<String>,
    /// A paused deployment keeps serving but takes no routing change
    /// except `resume` and `rollback`.
    pub paused: bool,
    /// The champions before the current one, oldest first (what
    /// `rollback` returns to).
    pub previous: Vec<String>,
    /// The routing salt (hex): keys are hashed with it.
    pub salt: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_ms: u64,
    /// Every change, oldest first (at most [`MAX_HISTORY`]).
    pub history: Vec<Change>,
    /// The ramp in progress or last run, if any.
    #[serde(default)]
    pub ramp: Option<Ramp>,
    /// Where sampled requests are captured, if anywhere.
    #[serde(default)]
    pub capture: Option<Capture>,
    /// How many of its most recent answered records are kept for feedback
    /// (0: none, and feedback is refused).
    #[serde(default = "default_keep_answers")]
    pub keep_answers: u64,
}

/// The default of [`Deployment::keep_answers`].
pub const DEFAULT_KEEP_ANSWERS: u64 = 100_000;
/// The most answers a deployment may keep.
pub const MAX_KEEP_ANSWERS: u64 = 10_000_000;

fn default_keep_answers() -> u64 {
    DEFAULT_KEEP_ANSWERS
}

/// Fresh-data capture: a sampled share of a deployment's requests becomes
/// new versions of a dataset inside the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    /// The dataset the captured records go to.
    pub dataset: String,
    /// The share of requests captured, in basis points.
    pub sample: u32,
    /// A new version is written once this many records wait.
    pub batch: u32,
    /// Who set it up (the versions are imported in the host's name, on
    /// this user's authorization).
    pub by: String,
}

/// The most records one capture version holds.
pub const MAX_CAPTURE_BATCH: u32 = 100_000;

/// When a ramp stops a step and rolls back: thresholds on the candidate's
/// figures over the current step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guards {
    /// Roll back when the candidate's error rate exceeds this.
    pub max_error_rate: Option<f64>,
    /// Roll back when the candidate's p99 latency (ms) exceeds this.
    pub max_p99_ms: Option<f64>,
    /// Roll back when the candidate agrees with the champion on less than
    /// this share of the records both predicted.
    pub min_agreement: Option<f64>,
    /// A step ends only after this many candidate requests (and its bake
    /// time); the guards are judged from the first request on.
    pub min_requests: u64,
    /// Roll back when the candidate's online accuracy (true labels from
    /// feedback) is more than this below the champion's on the same
    /// records.
    #[serde(default)]
    pub max_accuracy_drop: Option<f64>,
    /// The accuracy guard is judged once this many of the candidate's
    /// records in the step have feedback.
    #[serde(default = "default_min_labels")]
    pub min_labels: u64,
}

fn default_min_labels() -> u64 {
    30
}

impl Guards {
    /// No guard, no minimum.
    pub fn none() -> Self {
        Guards {
            max_error_rate: None,
            max_p99_ms: None,
            min_agreement: None,
            min_requests: 0,
            max_accuracy_drop: None,
            min_labels: default_min_labels(),
        }
    }
}

/// A ramp: a candidate's traffic raised step by step, each step held for
/// its bake time and judged by the guards; a step of 100% promotes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ramp {
    /// The candidate.
    pub model: String,
    /// Its weight at each step, in basis points, increasing; a step of
    /// 10,000 promotes it, and a ramp whose last step is lower ends with
    /// the candidate holding that share.
    pub steps: Vec<u32>,
    /// The current step's index.
    pub step: usize,
    /// When it started, ms since the epoch.
    pub step_started_ms: u64,
    /// How long each step is held, in ms.
    pub bake_ms: u64,
    /// When to roll back.
    pub guards: Guards,
    /// The candidate's figures over the current step.
    pub counters: Counters,
    /// Who started it.
    pub started_by: String,
    /// `running`, `done` (promoted), `rolled-back` or `stopped`.
    pub state: String,
    /// Why it rolled back: the guard and the values that breached it.
    pub reason: Option<String>,
}

/// What judging a ramp did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RampEvent {
    /// The next step began: the candidate's new weight.
    Advanced(u32),
    /// The last step passed: the candidate is the champion.
    Promoted,
    /// The last step, below 100%, passed: the ramp is done and the
    /// candidate keeps that share.
    Held,
    /// A guard was breached: the candidate's traffic went to 0.
    RolledBack(String),
}

/// Which variant serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The champion.
    Champion,
    /// The candidate at this index of [`Deployment::candidates`].
    Candidate(usize),
}

impl Deployment {
    /// A new deployment serving `champion` to `clients`.
    pub fn new(
        name: &str,
        champion: &str,
        clients: Vec<String>,
        salt: [u8; 16],
        by: &str,
        now_ms: u64,
    ) -> Result<Self, DeploymentError> {
        check_name(name)?;
        let mut d = Deployment {
            name: name.to_string(),
            champion: champion.to_string(),
            candidates: Vec::new(),
            shadow: None,
            clients: Vec::new(),
            paused: false,
            previous: Vec::new(),
            salt: hex::encode(salt),
            created_by: by.to_string(),
            created_ms: now_ms,
            history: Vec::new(),
            ramp: None,
            capture: None,
            keep_answers: DEFAULT_KEEP_ANSWERS,
        };
        d.set_clients(clients)?;
        d.record(by, now_ms, format!("create {champion}"));
        Ok(d)
    }

    /// Replaces the client list (deduplicated, at most [`MAX_CLIENTS`]).
    pub fn set_clients(&mut self, mut clients: Vec<String>) -> Result<(), DeploymentError> {
        clients.sort();
        clients.dedup();
        if clients.len() > MAX_CLIENTS {
            return Err(DeploymentError::Invalid(format!(
                "at most {MAX_CLIENTS} clients per deployment"
            )));
        }
        self.clients = clients;
        Ok(())
    }

    /// Appends a change to the history.
    pub fn record(&mut self, by: &str, now_ms: u64, what: String) {
        self.history.push(Change {
            time_ms: now_ms,
            by: by.to_string(),
            what,
            champion: self.champion.clone(),
        });
        if self.history.len() > MAX_HISTORY {
            let extra = self.history.len() - MAX_HISTORY;
            self.history.drain(..extra);
        }
    }

    /// The champion's share: what the candidates leave, in basis points.
    pub fn champion_weight(&self) -> u32 {
        ALL_TRAFFIC.saturating_sub(self.candidates.iter().map(|c| c.weight).sum())
    }

    /// Every model the deployment serves or shadows.
    pub fn models(&self) -> Vec<String> {
        let mut m = vec![self.champion.clone()];
        m.extend(self.candidates.iter().map(|c| c.model.clone()));
        m.extend(self.shadow.iter().map(|s| s.model.clone()));
        m
    }

    fn refuse_when_paused(&self, what: &str) -> Result<(), DeploymentError> {
        if self.paused {
            Err(DeploymentError::Invalid(format!(
                "deployment `{}` is paused: resume it before you {what}",
                self.name
            )))
        } else {
            Ok(())
        }
    }

    /// Sets `model`'s traffic weight, adding it as a candidate when it is
    /// not one yet (0 keeps it as a candidate with no traffic). The
    /// candidates' weights may not exceed all the traffic.
    pub fn set_weight(&mut self, model: &str, weight: u32) -> Result<(), DeploymentError> {
        self.refuse_when_paused("change weights")?;
        if model == self.champion {
            return Err(DeploymentError::Invalid(format!(
                "`{model}` is the champion: its weight is what the candidates leave"
            )));
        }
        if weight > ALL_TRAFFIC {
            return Err(DeploymentError::Invalid(format!(
                "a weight is at most {ALL_TRAFFIC} basis points (100%), not {weight}"
            )));
        }
        let others: u32 = self
            .candidates
            .iter()
            .filter(|c| c.model != model)
            .map(|c| c.weight)
            .sum();
        if others + weight > ALL_TRAFFIC {
            return Err(DeploymentError::Invalid(format!(
                "the candidates would take {} basis points, more than all the traffic",
                others + weight
            )));
        }
        match self.candidates.iter_mut().find(|c| c.model == model) {
            Some(c) => c.weight = weight,
            None => {
                if self.candidates.len() >= MAX_CANDIDATES {
                    return Err(DeploymentError::Invalid(format!(
                        "at most {MAX_CANDIDATES} candidates per deployment"
                    )));
                }
                self.candidates.push(Variant {
                    model: model.to_string(),
                    weight,
                });
            }
        }
        Ok(())
    }

    /// Removes a candidate.
    pub fn remove_candidate(&mut self, model: &str) -> Result<(), DeploymentError> {
        self.refuse_when_paused("remove candidates")?;
        let before = self.candidates.len();
        self.candidates.retain(|c| c.model != model);
        if self.candidates.len() == before {
            return Err(DeploymentError::Invalid(format!(
                "`{model}` is not a candidate of `{}`",
                self.name
            )));
        }
        Ok(())
    }

    /// Sets (or with `None`, removes) the shadow.
    pub fn set_shadow(&mut self, shadow: Option<Shadow>) -> Result<(), DeploymentError> {
        self.refuse_when_paused("change the shadow")?;
        if let Some(s) = &shadow {
            if s.sample == 0 || s.sample > ALL_TRAFFIC {
                return Err(DeploymentError::Invalid(format!(
                    "a shadow's sample is 1..={ALL_TRAFFIC} basis points, not {}",
                    s.sample
                )));
            }
            if s.model == self.champion {
                return Err(DeploymentError::Invalid(format!(
                    "`{}` is the champion; a shadow is another model",
                    s.model
                )));
            }
        }
        self.shadow = shadow;
        Ok(())
    }

    /// Makes `model` (a candidate) the champion; the old champion is
    /// remembered for [`Deployment::rollback`] and leaves the candidates.
    pub fn promote(&mut self, model: &str) -> Result<(), DeploymentError> {
        self.refuse_when_paused("promote")?;
        let Some(i) = self.candidates.iter().position(|c| c.model == model) else {
            return Err(DeploymentError::Invalid(format!(
                "`{model}` is not a candidate of `{}`: add it with a weight first",
                self.name
            )));
        };
        self.candidates.remove(i);
        let old = std::mem::replace(&mut self.champion, model.to_string());
        self.previous.push(old);
        Ok(())
    }

    /// Returns to the previous champion and takes every candidate's
    /// traffic away (they stay, at weight 0). Allowed while paused.
    pub fn rollback(&mut self) -> Result<String, DeploymentError> {
        if let Some(r) = &mut self.ramp
            && r.state == "running"
        {
            r.state = "stopped".into();
        }
        let Some(back) = self.previous.pop() else {
            for c in &mut self.candidates {
                c.weight = 0;
            }
            return Ok(self.champion.clone());
        };
        let demoted = std::mem::replace(&mut self.champion, back);
        for c in &mut self.candidates {
            c.weight = 0;
        }
        self.candidates.retain(|c| c.model != self.champion);
        if !self.candidates.iter().any(|c| c.model == demoted) {
            self.candidates.push(Variant {
                model: demoted,
                weight: 0,
            });
        }
        Ok(self.champion.clone())
    }

    /// Starts a ramp of `model` (a released model, checked by the caller):
    /// its weight becomes the first step's.
    pub fn start_ramp(
        &mut self,
        model: &str,
        steps: Vec<u32>,
        bake_ms: u64,
        guards: Guards,
        by: &str,
        now_ms: u64,
    ) -> Result<(), DeploymentError> {
        self.refuse_when_paused("start a ramp")?;
        if self.ramp.as_ref().is_some_and(|r| r.state == "running") {
            return Err(DeploymentError::Invalid(format!(
                "deployment `{}` is already ramping; stop it first",
                self.name
            )));
        }
        if steps.is_empty()
            || steps.windows(2).any(|w| w[0] >= w[1])
            || steps.iter().any(|&w| w == 0 || w > ALL_TRAFFIC)
        {
            return Err(DeploymentError::Invalid(
                "ramp steps are increasing shares above 0% and at most 100%".into(),
            ));
        }
        for (what, v) in [
            ("max error rate", guards.max_error_rate),
            ("min agreement", guards.min_agreement),
            ("max accuracy drop", guards.max_accuracy_drop),
        ] {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                return Err(DeploymentError::Invalid(format!(
                    "the {what} is a share from 0 to 1"
                )));
            }
        }
        if guards
            .max_p99_ms
            .is_some_and(|v| !v.is_finite() || v <= 0.0)
        {
            return Err(DeploymentError::Invalid(
                "the p99 latency limit is a positive number of ms".into(),
            ));
        }
        self.set_weight(model, steps[0])?;
        self.ramp = Some(Ramp {
            model: model.to_string(),
            steps,
            step: 0,
            step_started_ms: now_ms,
            bake_ms,
            guards,
            counters: Counters::default(),
            started_by: by.to_string(),
            state: "running".into(),
            reason: None,
        });
        Ok(())
    }

    /// Stops a running ramp where it is (the candidate keeps its weight).
    pub fn stop_ramp(&mut self) -> Result<(), DeploymentError> {
        match &mut self.ramp {
            Some(r) if r.state == "running" => {
                r.state = "stopped".into();
                Ok(())
            }
            _ => Err(DeploymentError::Invalid(format!(
                "deployment `{}` is not ramping",
                self.name
            ))),
        }
    }

    /// Adds one request's figures for `model` to a running ramp of it and
    /// judges the step: a breached guard rolls the candidate back to 0; a
    /// step held for its bake time with enough requests advances (the
    /// last one promotes the candidate). A paused deployment still rolls
    /// back, but does not advance.
    pub fn judge_ramp(
        &mut self,
        model: &str,
        o: &crate::serving::Observation,
        now_ms: u64,
    ) -> Option<RampEvent> {
        let ramp = self.ramp.as_mut()?;
        if ramp.state != "running" || ramp.model != model {
            return None;
        }
        ramp.counters.add(o);
        self.judge_step(now_ms, true)
    }

    /// Adds feedback on one of `model`'s answers (whether it and the
    /// champion were right) to a running ramp of it and judges the guards
    /// (a step does not advance on feedback alone).
    pub fn judge_feedback(
        &mut self,
        model: &str,
        correct: bool,
        champion_correct: bool,
        now_ms: u64,
    ) -> Option<RampEvent> {
        let ramp = self.ramp.as_mut()?;
        if ramp.state != "running" || ramp.model != model {
            return None;
        }
        ramp.counters.add_feedback(correct, champion_correct);
        self.judge_step(now_ms, false)
    }

    /// The first guard the ramp's counters breach, with the values.
    fn breach(ramp: &Ramp) -> Option<String> {
        let c = &ramp.counters;
        let g = &ramp.guards;
        let error_rate = c.errors as f64 / c.requests.max(1) as f64;
        if let Some(max) = g.max_error_rate
            && error_rate > max
        {
            return Some(format!(
                "error rate {error_rate:.4} > {max} over {} requests",
                c.requests
            ));
        }
        if let (Some(max), Some(p99)) = (g.max_p99_ms, c.latency_ms(0.99))
            && p99 > max
        {
            return Some(format!(
                "p99 latency {p99:.2} ms > {max} ms over {} requests",
                c.requests
            ));
        }
        if let Some(min) = g.min_agreement
            && c.compared > 0
        {
            let a = c.agreed as f64 / c.compared as f64;
            if a < min {
                return Some(format!(
                    "agreement with the champion {a:.4} < {min} over {} records",
                    c.compared
                ));
            }
        }
        if let (Some(max), Some((acc, champ))) = (g.max_accuracy_drop, c.accuracy())
            && c.labeled >= g.min_labels.max(1)
            && champ - acc > max
        {
            return Some(format!(
                "online accuracy {acc:.4} against the champion's {champ:.4} on the same {} labeled records: a drop of {:.4} > {max}",
                c.labeled,
                champ - acc
            ));
        }
        None
    }

    fn judge_step(&mut self, now_ms: u64, may_advance: bool) -> Option<RampEvent> {
        let paused = self.paused;
        let ramp = self.ramp.as_mut()?;
        if let Some(reason) = Self::breach(ramp) {
            ramp.state = "rolled-back".into();
            ramp.reason = Some(reason.clone());
            let model = ramp.model.clone();
            if let Some(c) = self.candidates.iter_mut().find(|c| c.model == model) {
                c.weight = 0;
            }
            return Some(RampEvent::RolledBack(reason));
        }
        if !may_advance
            || paused
            || ramp.counters.requests < ramp.guards.min_requests
            || now_ms.saturating_sub(ramp.step_started_ms) < ramp.bake_ms
        {
            return None;
        }
        ramp.step += 1;
        ramp.step_started_ms = now_ms;
        ramp.counters = Counters::default();
        let model = ramp.model.clone();
        match ramp.steps.get(ramp.step).copied() {
            Some(w) if w < ALL_TRAFFIC => {
                if let Some(c) = self.candidates.iter_mut().find(|c| c.model == model) {
                    c.weight = w;
                }
                Some(RampEvent::Advanced(w))
            }
            None => {
                // The last step was below 100%: the ramp ends there, the
                // candidate keeping its share (an A/B split).
                ramp.state = "done".into();
                ramp.step = ramp.steps.len() - 1;
                Some(RampEvent::Held)
            }
            Some(_) => {
                ramp.state = "done".into();
                if let Some(i) = self.candidates.iter().position(|c| c.model == model) {
                    self.candidates.remove(i);
                    let old = std::mem::replace(&mut self.champion, model);
                    self.previous.push(old);
                }
                Some(RampEvent::Promoted)
            }
        }
    }

    /// Sets (or with `None`, stops) fresh-data capture.
    pub fn set_capture(&mut self, capture: Option<Capture>) -> Result<(), DeploymentError> {
        if let Some(c) = &capture {
            if c.sample == 0 || c.sample > ALL_TRAFFIC {
                return Err(DeploymentError::Invalid(format!(
                    "a capture's sample is 1..={ALL_TRAFFIC} basis points, not {}",
                    c.sample
                )));
            }
            if c.batch == 0 || c.batch > MAX_CAPTURE_BATCH {
                return Err(DeploymentError::Invalid(format!(
                    "a capture's batch is 1..={MAX_CAPTURE_BATCH} records, not {}",
                    c.batch
                )));
            }
        }
        self.capture = capture;
        Ok(())
    }

    /// Whether a request with routing key `key` is captured.
    pub fn captured(&self, key: &str) -> bool {
        self.capture.as_ref().is_some_and(|c| {
            self.uniform(key, "capture") < f64::from(c.sample) / f64::from(ALL_TRAFFIC)
        })
    }

    /// The variant that serves requests with routing key `key`.
    ///
    /// Each candidate `c` draws its own uniform number `u_c` from
    /// SHA-256(salt ‖ key ‖ model); the key is eligible for `c` when
    /// `u_c < w_c` (its weight as a share), and goes to the eligible
    /// candidate with the smallest `u_c / w_c`, else to the champion. So a
    /// key's variant depends only on the key, the salt and the weights;
    /// raising `w_c` can only make keys eligible for `c` and lower `c`'s
    /// ratio, so keys move only toward `c`; lowering it only away. With
    /// one candidate its share is exactly its weight; with several, two
    /// candidates both eligible share the overlap, so each gets slightly
    /// less than its weight (at most half the product of the weights).
    pub fn route(&self, key: &str) -> Route {
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in self.candidates.iter().enumerate() {
            if c.weight == 0 {
                continue;
            }
            let share = f64::from(c.weight) / f64::from(ALL_TRAFFIC);
            let u = self.uniform(key, &c.model);
            if u < share {
                let ratio = u / share;
                if best.is_none_or(|(_, r)| ratio < r) {
                    best = Some((i, ratio));
                }
            }
        }
        best.map_or(Route::Champion, |(i, _)| Route::Candidate(i))
    }

    /// Whether a request with routing key `key` is copied to the shadow.
    pub fn shadowed(&self, key: &str) -> bool {
        self.shadow.as_ref().is_some_and(|s| {
            self.uniform(key, &format!("shadow\0{}", s.model))
                < f64::from(s.sample) / f64::from(ALL_TRAFFIC)
        })
    }

    /// The model a route names.
    pub fn model_of(&self, route: Route) -> &str {
        match route {
            Route::Champion => &self.champion,
            Route::Candidate(i) => &self.candidates[i].model,
        }
    }

    /// A uniform number in [0, 1) from the salt, the key and `what`.
    fn uniform(&self, key: &str, what: &str) -> f64 {
        let mut buf = Vec::with_capacity(self.salt.len() + key.len() + what.len() + 2);
        buf.extend_from_slice(self.salt.as_bytes());
        buf.push(0);
        buf.extend_from_slice(key.as_bytes());
        buf.push(0);
        buf.extend_from_slice(what.as_bytes());
        let d = ring::digest::digest(&ring::digest::SHA256, &buf);
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        // 53 bits: exactly representable.
        (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Deployment names: as user names.
pub fn check_name(name: &str) -> Result<(), DeploymentError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(DeploymentError::BadName(name.chars().take(80).collect()))
    }
}

/// The write of a deployment.
pub fn put(batch: &mut WriteBatch, d: &Deployment) -> Result<(), DeploymentError> {
    let bytes = serde_json::to_vec(d).map_err(|_| DeploymentError::Damaged(d.name.clone()))?;
    batch.put(Space::Deployments, d.name.as_bytes().to_vec(), bytes);
    Ok(())
}

/// The delete of a deployment.
pub fn delete(batch: &mut WriteBatch, name: &str) {
    batch.delete(Space::Deployments, name.as_bytes().to_vec());
}

/// Reads a deployment.
pub fn get(store: &dyn Storage, name: &str) -> Result<Deployment, DeploymentError> {
    let v = store.get(Space::Deployments, name.as_bytes())?;
    decode(name, v.as_deref())
}

/// A deployment from its stored bytes (`None`: there is none).
pub fn decode(name: &str, bytes: Option<&[u8]>) -> Result<Deployment, DeploymentError> {
    let v = bytes.ok_or_else(|| DeploymentError::Unknown(name.chars().take(80).collect()))?;
    serde_json::from_slice(v).map_err(|_| DeploymentError::Damaged(name.to_string()))
}

/// Whether a deployment of that name exists.
pub fn exists(store: &dyn Storage, name: &str) -> Result<bool, DeploymentError> {
    Ok(store.get(Space::Deployments, name.as_bytes())?.is_some())
}

/// Every deployment, by name.
pub fn list(store: &dyn Storage) -> Result<Vec<Deployment>, DeploymentError> {
    store
        .scan(Space::Deployments, b"")
        .map(|item| {
            let (k, v) = item?;
            serde_json::from_slice(&v)
                .map_err(|_| DeploymentError::Damaged(String::from_utf8_lossy(&k).into_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep() -> Deployment {
        Deployment::new("d", "champ", vec!["c".into()], [7; 16], "op", 0).unwrap()
    }

    fn routes(d: &Deployment, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| d.model_of(d.route(&format!("key-{i}"))).to_string())
            .collect()
    }

    #[test]
    fn a_single_candidate_gets_its_weight_and_keys_only_move_toward_it() {
        let mut d = dep();
        let n = 100_000;
        let mut before = routes(&d, n);
        assert!(before.iter().all(|m| m == "champ"));
        for w in [100, 500, 2_500, 5_000, 10_000] {
            d.set_weight("cand", w).unwrap();
            let after = routes(&d, n);
            let share = after.iter().filter(|m| *m == "cand").count() as f64 / n as f64;
            let want = f64::from(w) / 1e4;
            assert!((share - want).abs() < 0.01, "{w}: {share}");
            for (b, a) in before.iter().zip(&after) {
                assert!(b == a || a == "cand", "a key moved from {b} to {a}");
            }
            before = after;
        }
        // The same key, the same variant: sticky.
        assert_eq!(routes(&d, 100), routes(&d, 100));
    }

    #[test]
    fn with_several_candidates_raising_one_moves_keys_only_to_it() {
        let mut d = dep();
        // Small weights, as ramps start: each share within a point of its
        // weight over 100,000 keys.
        d.set_weight("a", 500).unwrap();
        d.set_weight("b", 1_000).unwrap();
        let n = 100_000;
        let small = routes(&d, n);
        for (m, w) in [("a", 0.05), ("b", 0.10)] {
            let share = small.iter().filter(|x| *x == m).count() as f64 / n as f64;
            assert!((share - w).abs() < 0.01, "{m}: {share}");
        }
        d.set_weight("a", 1_000).unwrap();
        d.set_weight("b", 2_000).unwrap();
        let n = 20_000;
        let before = routes(&d, n);
        d.set_weight("a", 3_000).unwrap();
        let after = routes(&d, n);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(a, "a", "a key moved from {b} to {a}");
                moved += 1;
            }
        }
        assert!(moved > n / 10, "{moved}");
        let share = |m: &str| after.iter().filter(|x| *x == m).count() as f64 / n as f64;
        // Shares are within half the product of the weights of each weight.
        assert!((share("a") - 0.3).abs() < 0.3 * 0.2 / 2.0 + 0.01);
        assert!((share("b") - 0.2).abs() < 0.3 * 0.2 / 2.0 + 0.01);
        // A new salt routes differently.
        let mut other = d.clone();
        other.salt = hex::encode([8u8; 16]);
        assert_ne!(routes(&other, 200), routes(&d, 200));
    }

    #[test]
    fn weights_promotion_rollback_and_pause_follow_the_rules() {
        let mut d = dep();
        assert!(d.set_weight("champ", 10).is_err());
        assert!(d.set_weight("a", 10_001).is_err());
        d.set_weight("a", 6_000).unwrap();
        assert!(d.set_weight("b", 5_000).is_err(), "over all the traffic");
        assert_eq!(d.champion_weight(), 4_000);
        d.promote("a").unwrap();
        assert_eq!(d.champion, "a");
        assert!(d.candidates.is_empty());
        assert_eq!(d.previous, ["champ"]);
        d.set_weight("b", 500).unwrap();
        d.paused = true;
        assert!(d.set_weight("b", 600).is_err());
        assert!(d.promote("b").is_err());
        // Rollback works while paused: back to the old champion, every
        // candidate at 0, the demoted one kept as a candidate.
        assert_eq!(d.rollback().unwrap(), "champ");
        assert_eq!(d.champion, "champ");
        assert!(d.candidates.iter().all(|c| c.weight == 0));
        assert!(d.candidates.iter().any(|c| c.model == "a"));
        assert!(routes(&d, 1000).iter().all(|m| m == "champ"));
        assert!(check_name("Bad Name").is_err());
        assert!(check_name("fraud-v2").is_ok());
    }

    fn seen(latency_us: u64, classes: &[&str], agreed: u64) -> crate::serving::Observation {
        crate::serving::Observation {
            error: false,
            latency_us,
            classes: classes.iter().map(|c| c.to_string()).collect(),
            confidences: vec![0.9; classes.len()],
            agreement: Some((classes.len() as u64, agreed)),
        }
    }

    #[test]
    fn a_ramp_advances_after_its_bake_time_and_promotes_at_the_end() {
        let mut d = dep();
        let guards = Guards {
            max_error_rate: Some(0.1),
            max_p99_ms: Some(100.0),
            min_agreement: Some(0.5),
            min_requests: 2,
            ..Guards::none()
        };
        d.start_ramp("cand", vec![500, 5_000, 10_000], 1_000, guards, "op", 0)
            .unwrap();
        assert_eq!(d.candidates[0].weight, 500);
        // Too early, then too few requests.
        assert_eq!(d.judge_ramp("cand", &seen(1_000, &["a"], 1), 10), None);
        assert_eq!(d.judge_ramp("other", &seen(1_000, &["a"], 1), 2_000), None);
        assert_eq!(
            d.judge_ramp("cand", &seen(1_000, &["a"], 1), 2_000),
            Some(RampEvent::Advanced(5_000))
        );
        assert_eq!(d.candidates[0].weight, 5_000);
        d.judge_ramp("cand", &seen(1_000, &["a"], 1), 2_500);
        // Paused: no step forward.
        d.paused = true;
        assert_eq!(d.judge_ramp("cand", &seen(1_000, &["a"], 1), 9_000), None);
        d.paused = false;
        assert_eq!(
            d.judge_ramp("cand", &seen(1_000, &["a"], 1), 9_000),
            Some(RampEvent::Promoted)
        );
        assert_eq!(d.champion, "cand");
        assert_eq!(d.previous, ["champ"]);
        assert_eq!(d.ramp.as_ref().unwrap().state, "done");
    }

    #[test]
    fn a_breached_guard_rolls_the_candidate_back_with_its_values() {
        for (o, guard) in [
            (seen(500_000, &["a"], 1), "p99 latency"),
            (seen(1_000, &["a", "b", "c", "d"], 1), "agreement"),
            (
                crate::serving::Observation {
                    error: true,
                    latency_us: 1_000,
                    ..Default::default()
                },
                "error rate",
            ),
        ] {
            let mut d = dep();
            let guards = Guards {
                max_error_rate: Some(0.0),
                max_p99_ms: Some(100.0),
                min_agreement: Some(0.5),
                min_requests: 100,
                ..Guards::none()
            };
            d.start_ramp("cand", vec![1_000, 10_000], 0, guards, "op", 0)
                .unwrap();
            d.paused = true;
            match d.judge_ramp("cand", &o, 1) {
                Some(RampEvent::RolledBack(reason)) => {
                    assert!(reason.starts_with(guard), "{reason}")
                }
                other => panic!("{guard}: {other:?}"),
            }
            assert_eq!(d.candidates[0].weight, 0);
            assert_eq!(d.champion, "champ");
            assert_eq!(d.ramp.as_ref().unwrap().state, "rolled-back");
        }
        let mut d = dep();
        let g = Guards::none();
        assert!(
            d.start_ramp("cand", vec![500, 400], 0, g.clone(), "op", 0)
                .is_err()
        );
        assert!(d.start_ramp("cand", vec![], 0, g.clone(), "op", 0).is_err());
        d.start_ramp("cand", vec![500], 0, g.clone(), "op", 0)
            .unwrap();
        assert!(
            d.start_ramp("cand", vec![600], 0, g, "op", 0).is_err(),
            "one at a time"
        );
    }

    #[test]
    fn a_ramp_below_all_traffic_holds_and_the_accuracy_guard_reads_feedback() {
        let mut d = dep();
        d.start_ramp("cand", vec![500, 2_000], 0, Guards::none(), "op", 0)
            .unwrap();
        assert_eq!(
            d.judge_ramp("cand", &seen(1_000, &["a"], 1), 1),
            Some(RampEvent::Advanced(2_000))
        );
        assert_eq!(
            d.judge_ramp("cand", &seen(1_000, &["a"], 1), 2),
            Some(RampEvent::Held)
        );
        assert_eq!(d.champion, "champ");
        assert_eq!(d.candidates[0].weight, 2_000);
        assert_eq!(d.ramp.as_ref().unwrap().state, "done");

        let mut d = dep();
        let guards = Guards {
            max_accuracy_drop: Some(0.1),
            min_labels: 10,
            ..Guards::none()
        };
        d.start_ramp("cand", vec![500, 10_000], 60_000, guards, "op", 0)
            .unwrap();
        // Feedback alone never advances a step; under `min_labels` the
        // guard waits.
        for _ in 0..9 {
            assert_eq!(d.judge_feedback("cand", false, true, 100_000), None);
        }
        assert_eq!(d.judge_feedback("other", false, true, 100_000), None);
        match d.judge_feedback("cand", false, true, 100_000) {
            Some(RampEvent::RolledBack(reason)) => {
                assert!(reason.starts_with("online accuracy 0.0000"), "{reason}");
                assert!(reason.contains("10 labeled records"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.candidates[0].weight, 0);
        // Equal accuracy passes.
        let mut d = dep();
        let guards = Guards {
            max_accuracy_drop: Some(0.0),
            min_labels: 1,
            ..Guards::none()
        };
        d.start_ramp("cand", vec![500], 60_000, guards, "op", 0)
            .unwrap();
        for _ in 0..20 {
            assert_eq!(d.judge_feedback("cand", true, true, 1), None);
            assert_eq!(d.judge_feedback("cand", false, false, 1), None);
        }
    }

    #[test]
    fn the_shadow_sees_its_sample() {
        let mut d = dep();
        d.set_shadow(Some(Shadow {
            model: "s".into(),
            sample: 2_500,
        }))
        .unwrap();
        let n = 20_000;
        let seen = (0..n).filter(|i| d.shadowed(&format!("k{i}"))).count();
        assert!((seen as f64 / n as f64 - 0.25).abs() < 0.01, "{seen}");
        assert!(
            d.set_shadow(Some(Shadow {
                model: "champ".into(),
                sample: 1
            }))
            .is_err()
        );
    }
}
