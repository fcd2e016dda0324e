//! Jobs: starting, listing, cancelling and driving active-learning jobs.
//! Every step of a job is authorized (and so audited) again before it
//! takes effect; the steps themselves are in `job_steps`.

use std::collections::HashSet;

use crate::datasets::{self};
use crate::digest::Digest;
use crate::jobs::spec::PluginUse;
use crate::jobs::{
    Job, JobError, JobEvent, JobState, JobStats, Oracle, PipelineSpec, QueueItem, ResolvedPlugins,
    SelectorUse, Step,
};
use crate::policy::{Action, Resource};
use crate::registry;
use crate::store::WriteBatch;
use crate::train::{self};
use crate::types::PluginKind;
use crate::users::User;

/// What a running job reports.
use super::job_steps::Resolved;
use super::{Cloister, ServiceError};

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

/// The claim kind of a job being driven ([`crate::claims`]).
const JOB_CLAIM: &str = "job";

/// How many times in a row a job is taken over at one step before it is
/// marked failed instead ([`Cloister::take_over_job`]).
pub const MAX_TAKEOVERS: u32 = 3;

/// A job whose driving process ended while it drove it
/// ([`Cloister::orphaned_jobs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedJob {
    /// The job's id.
    pub id: String,
    /// The holder id of the process that ended.
    pub holder: u64,
}

/// Where the takeovers of job `id` are counted: beside the claims, as
/// the count (4 bytes) and the step it was taken over at.
fn takeover_key(id: &str) -> Vec<u8> {
    let mut k = b"job-takeovers\0".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

impl Cloister {
    pub(super) fn job_resource(job: &Job) -> Resource {
        Resource::Job {
            id: job.id.clone(),
            started_by: job.started_by.clone(),
        }
    }

    pub(super) fn dataset_resource(job: &Job) -> Resource {
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
    pub(super) fn resolve_plugin(
        &self,
        who: &User,
        spec: (&str, &str),
        section: &str,
        use_: &PluginUse,
        kind: PluginKind,
    ) -> Result<Resolved, ServiceError> {
        let (file, text) = spec;
        let bad = |m: String| spec_err(file, text, &use_.plugin, format!("{section}: {m}"));
        let entry = registry::find(self.env().store().as_ref(), &use_.plugin, Some(kind))
            .map_err(|e| bad(e.to_string()))?;
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
                if !crate::users::is_active_labeler(self.env().store().as_ref(), name) {
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
            reassigned: Vec::new(),
        };
        let mut b = WriteBatch::new();
        crate::jobs::put_job(&mut b, &job)?;
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
        let all = crate::jobs::list(self.env().store().as_ref())?;
        Ok(all
            .into_iter()
            .filter(|j| self.allows(&who.principal(), Action::ViewJob, &Self::job_resource(j)))
            .collect())
    }

    /// A job looked up and authorized for `action` (see
    /// [`Cloister::found`]: an unknown id is decided on a stand-in first).
    fn job_for(&self, who: &User, action: Action, id: &str) -> Result<Job, ServiceError> {
        let job = self.found(
            crate::jobs::get(self.env().store().as_ref(), id),
            who,
            action,
            || Resource::Job {
                id: id.into(),
                started_by: String::new(),
            },
            &id,
        )?;
        self.guard(&who.principal(), action, &Self::job_resource(&job), &id)?;
        Ok(job)
    }

    /// One job.
    pub fn show_job(&self, who: &User, id: &str) -> Result<Job, ServiceError> {
        let job = self.job_for(who, Action::ViewJob, id)?;
        Ok(job)
    }

    /// Statistics of a job.
    pub fn job_stats(&self, who: &User, id: &str) -> Result<JobStats, ServiceError> {
        let job = self.show_job(who, id)?;
        let store = self.env().store();
        let ledger = crate::jobs::ledger(store.as_ref(), id)?;
        let queue = crate::jobs::queue(store.as_ref(), id)?;
        let version = datasets::resolve(self.env(), &job.dataset)?;
        let mut humans = datasets::human_labels(self.env(), &version)?;
        humans.retain(|k, _| queue.contains_key(k));
        let mut stats = crate::jobs::stats(&job, &ledger, &queue, &humans);
        // Whether each labeler the round waits for can still answer: one
        // answer for disabled, no longer a labeler or gone, as the spec's
        // check gives.
        for l in &mut stats.labelers {
            l.active = crate::users::is_active_labeler(store.as_ref(), &l.labeler);
        }
        Ok(stats)
    }

    /// Cancels a job; it stops at its next step boundary.
    pub fn cancel_job(&self, who: &User, id: &str) -> Result<Job, ServiceError> {
        let job = self.job_for(who, Action::CancelJob, id)?;
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
        crate::jobs::cancel(self.env().store().as_ref(), id, &who.name)?;
        Ok(crate::jobs::get(self.env().store().as_ref(), id)?)
    }

    /// Moves `from`'s open items of job `id` to the labeler `to`, and
    /// gives `to` `from`'s place in the rounds to come: for a labeler who
    /// is away or whose account was disabled, so that the job does not
    /// wait for them. Answers already given stay theirs. Authorized as
    /// `reassign_labels` on the job (its owner and admins), audited;
    /// `to` must be an active labeler. Items and records move together
    /// (the queue, the labelers' indexes, the records' assignee, the
    /// job's list of reassignments), all or nothing. Returns the job and
    /// the number of items moved.
    pub fn reassign_labels(
        &self,
        who: &User,
        id: &str,
        from: &str,
        to: &str,
    ) -> Result<(Job, u64), ServiceError> {
        self.job_for(who, Action::ReassignLabels, id)?;
        let store = self.env().store();
        let (mut job, mut read) = crate::jobs::get_read(store.as_ref(), id)?;
        // Only while it waits for people, or has failed (for want of an
        // active labeler, say): a running step's commit would find the job
        // changed under it and stop.
        if !matches!(
            job.state,
            JobState::AwaitingLabels { .. } | JobState::Failed { .. }
        ) {
            return Err(JobError::State {
                id: id.into(),
                state: job.state.name().into(),
                what: "its labelers change only while it waits for labels or has failed",
            }
            .into());
        }
        if job.spec.oracle.is_some() {
            return Err(ServiceError::BadRequest(format!(
                "job {id} is answered by the oracle: it has no labelers"
            )));
        }
        if from == to {
            return Err(ServiceError::BadRequest(format!(
                "`{from}` would be reassigned to themselves"
            )));
        }
        // As when a job starts: one answer whether the user is missing,
        // disabled or not a labeler.
        if !crate::users::is_active_labeler(store.as_ref(), to) {
            return Err(ServiceError::BadRequest(format!(
                "`{to}` is not an active labeler"
            )));
        }
        let open: Vec<QueueItem> = crate::jobs::queue(store.as_ref(), id)?
            .into_values()
            .filter(|q| q.answer.is_none() && q.assignee.as_deref() == Some(from))
            .collect();
        if open.is_empty() && !job.labelers().iter().any(|l| l == from) {
            return Err(ServiceError::BadRequest(format!(
                "`{from}` is not a labeler of job {id} and holds none of its items"
            )));
        }
        let version = datasets::resolve(self.env(), &job.dataset)?;
        let mut batch = WriteBatch::new();
        let mut still_open = Vec::new();
        for item in &open {
            still_open.extend(crate::jobs::reassign_item(&mut batch, item, to)?);
            batch.extend(datasets::assign(self.env(), &version, &item.record, to)?);
        }
        let moved = open.len() as u64;
        job.reassigned.push(crate::jobs::Reassignment {
            from: from.to_string(),
            to: to.to_string(),
            by: who.name.clone(),
            time_ms: crate::time::now_ms(),
            items: moved,
        });
        job.updated_ms = crate::time::now_ms();
        match crate::jobs::commit_job_if(store.as_ref(), batch, &job, &mut read, still_open) {
            Ok(()) => Ok((job, moved)),
            Err(JobError::Raced(_)) => Err(ServiceError::BadRequest(format!(
                "an item of `{from}`'s was answered while this request moved it; nothing was written: try again"
            ))),
            Err(JobError::Moved(_)) => Err(ServiceError::BadRequest(format!(
                "job {id} changed while this request moved its items; nothing was written: try again"
            ))),
            Err(e) => Err(e.into()),
        }
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
        let job = self.found(
            crate::jobs::get(self.env().store().as_ref(), id),
            who,
            Action::RunJob,
            || Resource::Dataset {
                name: String::new(),
            },
            &(id, "run"),
        )?;
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
        let claim = self.claim_job(id)?;
        // A person runs it now: the count of takeovers starts again.
        self.forget_takeovers(id)?;
        self.drive_job(who, id, claim, progress)
    }

    /// Drives job `id` under `claim` (this process's, taken by the
    /// caller) with `who`'s authority: every step is authorized for `who`
    /// and audited before it takes effect.
    fn drive_job(
        &self,
        who: &User,
        id: &str,
        _claim: super::JobClaim<'_>,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Job, ServiceError> {
        // What the job's next write must find stored: another process's
        // step in between stops this run (JobError::Moved).
        let (job, mut read) = crate::jobs::get_read(self.env().store().as_ref(), id)?;
        let mut prep = match self.prepare(who, &job, progress) {
            Ok(p) => p,
            Err(e) => return Err(self.fail(job, &mut read, e)),
        };
        loop {
            let (mut job, now) = crate::jobs::get_read(self.env().store().as_ref(), id)?;
            if now != read {
                return Err(JobError::Moved(id.to_string()).into());
            }
            if matches!(job.state, JobState::Cancelled { .. }) {
                return Ok(job);
            }
            let step = job.next;
            let r = &mut read;
            let result = self
                .guard(
                    &who.principal(),
                    Action::RunJob,
                    &Self::dataset_resource(&job),
                    &(id, step),
                )
                .and_then(|()| match step {
                    Step::Select(n) => self.step_select(who, &mut job, r, n, &mut prep, progress),
                    Step::Answer(n) => self.step_answer(who, &mut job, r, n, &prep, progress),
                    Step::Finish => self.step_finish(who, &mut job, r, &mut prep, progress),
                    Step::End => Ok(false),
                });
            match result {
                Ok(true) => {}
                Ok(false) => return Ok(job),
                Err(e) => return Err(self.fail(job, &mut read, e)),
            }
        }
    }

    /// Jobs a process was driving when it ended (killed, crashed, its
    /// machine lost): their claim is still stored and names a holder that
    /// is no longer alive. Housekeeping that shows no person anything, so
    /// not audited; taking one over ([`Cloister::take_over_job`]) is.
    pub fn orphaned_jobs(&self) -> Result<Vec<OrphanedJob>, ServiceError> {
        Ok(crate::claims::dead(self.env().store().as_ref(), JOB_CLAIM)?
            .into_iter()
            .map(|(id, holder)| OrphanedJob { id, holder })
            .collect())
    }

    /// Takes over an orphaned job and drives it on, as `cloister job
    /// resume` would, with the authority of the user who started it: this
    /// process claims it only if the claim still names the ended process
    /// (so of several processes one takes it, and a job resumed or
    /// finished meanwhile is left alone), records the takeover in the
    /// audit log as the host's own act, then authorizes the run and every
    /// step for that user as it stands now (disabled, or refused by the
    /// policies: the job is not run). A job taken over
    /// [`MAX_TAKEOVERS`] times at the same step is marked failed instead,
    /// so that a job that brings its process down does not bring down
    /// one replica after another; the count starts again when the job
    /// moves on, when a takeover's run returns, and when a person resumes
    /// it. `None` when there was nothing to take over.
    pub fn take_over_job(
        &self,
        orphan: &OrphanedJob,
        progress: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Option<Job>, ServiceError> {
        let Some(claim) = self.claim_dead_job(&orphan.id, orphan.holder)? else {
            return Ok(None);
        };
        let store = self.env().store();
        let (mut job, mut read) = match crate::jobs::get_read(store.as_ref(), &orphan.id) {
            Ok(j) => j,
            // A claim without its job: released when `claim` drops.
            Err(JobError::Unknown(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !matches!(
            job.state,
            JobState::Running | JobState::AwaitingLabels { .. }
        ) {
            // Failed, cancelled or done: there is no run to continue.
            return Ok(None);
        }
        let times = self.count_takeover(&job)?;
        self.env().audit().append(crate::audit::AuditRecord {
            actor: "cloister".into(),
            action: crate::audit::events::TAKE_OVER_JOB.into(),
            resource: Self::job_resource(&job).uid_text(),
            decision: crate::audit::Decision::Allow,
            policies: vec!["host".into()],
            params: super::params_digest(&(&job.id, orphan.holder, &job.started_by, times)),
            outcome: None,
            serving: None,
            account: None,
        })?;
        let step = serde_json::to_string(&job.next).unwrap_or_default();
        if times > MAX_TAKEOVERS {
            job.state = JobState::Failed {
                error: format!(
                    "it was taken over {MAX_TAKEOVERS} times in a row at step {step} and its process ended each time; \
                     it is not taken over again: find out why, then resume it (`cloister job resume {}`)",
                    job.id
                ),
            };
            job.updated_ms = crate::time::now_ms();
            crate::jobs::commit_job(store.as_ref(), WriteBatch::new(), &job, &mut read)?;
            return Ok(Some(job));
        }
        let owner = match crate::users::get(store.as_ref(), &job.started_by) {
            Ok(u) if !u.disabled => u,
            _ => {
                job.state = JobState::Failed {
                    error: format!(
                        "its process ended, and the user who started it (`{}`) can no longer run it: \
                         another user must resume it",
                        job.started_by
                    ),
                };
                job.updated_ms = crate::time::now_ms();
                crate::jobs::commit_job(store.as_ref(), WriteBatch::new(), &job, &mut read)?;
                return Ok(Some(job));
            }
        };
        self.guard(
            &owner.principal(),
            Action::RunJob,
            &Self::dataset_resource(&job),
            &(&job.id, "take over", orphan.holder),
        )?;
        let out = self.drive_job(&owner, &orphan.id, claim, progress);
        // This process lived through the run (whatever its outcome): the
        // count of takeovers in a row starts again.
        if let Err(e) = self.forget_takeovers(&orphan.id) {
            tracing::warn!(job = %orphan.id, error = %e, "the count of takeovers was not reset");
        }
        out.map(Some)
    }

    /// Counts one more takeover of `job` at its current step (the count
    /// starts again when the job has moved on) and returns the count.
    fn count_takeover(&self, job: &Job) -> Result<u32, ServiceError> {
        let step = serde_json::to_vec(&job.next).map_err(|e| JobError::Damaged(e.to_string()))?;
        let key = takeover_key(&job.id);
        let store = self.env().store();
        let n = crate::store::update(
            store.as_ref(),
            &[(crate::store::Space::Claims, &key)],
            |stored| {
                let before = stored[0]
                    .as_deref()
                    .filter(|v| v.len() >= 4 && v[4..] == step[..])
                    .map_or(0, |v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                let n = before.saturating_add(1);
                let mut value = n.to_be_bytes().to_vec();
                value.extend_from_slice(&step);
                let mut b = WriteBatch::new();
                b.put(crate::store::Space::Claims, key.clone(), value);
                Ok::<_, crate::store::StoreError>((b, n))
            },
        )?;
        Ok(n)
    }

    /// Forgets the takeovers counted for job `id` (a person runs it).
    fn forget_takeovers(&self, id: &str) -> Result<(), ServiceError> {
        let store = self.env().store();
        let key = takeover_key(id);
        if store.get(crate::store::Space::Claims, &key)?.is_some() {
            let mut b = WriteBatch::new();
            b.delete(crate::store::Space::Claims, key);
            store.commit(b)?;
        }
        Ok(())
    }

    /// Records a failed step (best effort, and only over the job as this
    /// run last read or wrote it) and passes the error on.
    pub(super) fn fail(&self, job: Job, read: &mut Vec<u8>, e: ServiceError) -> ServiceError {
        if matches!(
            e,
            ServiceError::Denied { .. } | ServiceError::Job(JobError::Moved(_))
        ) {
            return e;
        }
        // The failure is recorded on the job as last committed (`read`),
        // not on `job`, which the failed step may have changed in part
        // (its next step set, a round's figures filled in): a failure
        // never stores half a step, and a resume takes the whole step again.
        let mut job = crate::jobs::decode(read, &job.id).unwrap_or(job);
        job.state = JobState::Failed {
            error: e.to_string(),
        };
        job.updated_ms = crate::time::now_ms();
        let store = self.env().store();
        if let Err(store_err) =
            crate::jobs::commit_job(store.as_ref(), WriteBatch::new(), &job, read)
        {
            tracing::warn!(job = %job.id, error = %store_err, "could not record the failure");
        }
        e
    }
}
