//! The labeling queue: the one place record contents are shown to
//! labelers, and label imports.

use std::collections::HashSet;

use crate::datasets::{self, LabelEntry};
use crate::digest::Digest;
use crate::jobs::label_file::parse_label_file;
use crate::jobs::{Answer, JobError, JobState, LabelTask, OwnAnswer, QueueItem};
use crate::policy::{Action, Resource};
use crate::store::WriteBatch;
use crate::users::User;

use super::datasets::human_label;
use super::{Cloister, ServiceError};

impl Cloister {
    /// The next queued item for `who` with its record: the one place record
    /// contents are shown, authorized and audited per view.
    pub fn next_label_item(&self, who: &User) -> Result<Option<LabelTask>, ServiceError> {
        let open = crate::jobs::open_items_for(self.env().store().as_ref(), &who.name)?;
        let Some(item) = open.first().cloned() else {
            return Ok(None);
        };
        let record = self.view_record(who, &item.dataset, &item.record)?;
        let classes = crate::jobs::get(self.env().store().as_ref(), &item.job)?.classes;
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
            |_| None,
        )?;
        done.pop()
            .ok_or_else(|| JobError::NotQueued(record.to_string()).into())
    }

    /// Labels many queued records all-or-nothing. `place` maps an entry's
    /// index to where it came from (`file:line`, for errors), if anywhere.
    pub(super) fn label_items(
        &self,
        who: &User,
        entries: &[(String, String, Option<String>)],
        place: impl Fn(usize) -> Option<String>,
    ) -> Result<Vec<QueueItem>, ServiceError> {
        let open = crate::jobs::open_items_for(self.env().store().as_ref(), &who.name)?;
        let mut chosen: Vec<(QueueItem, String)> = Vec::new();
        let mut seen = HashSet::new();
        for (n, (record, label, job)) in entries.iter().enumerate() {
            let Some(item) = open
                .iter()
                .find(|q| q.record == *record && job.as_ref().is_none_or(|j| *j == q.job))
            else {
                return Err(self.not_queued_for(who, record, job.as_deref(), place(n)));
            };
            if !seen.insert((item.job.clone(), record.clone())) {
                return Err(ServiceError::BadRequest(format!(
                    "{}: {record} is labeled twice in one request",
                    place(n).unwrap_or_else(|| format!("entry {}", n + 1))
                )));
            }
            chosen.push((item.clone(), label.clone()));
        }
        for (item, label) in &chosen {
            human_label(who, label)?;
            let job = crate::jobs::get(self.env().store().as_ref(), &item.job)?;
            one_of_the_classes(&job, label)?;
        }
        let mut batch = WriteBatch::new();
        let mut out = Vec::new();
        // Each item is answered once: the batch lands only while every
        // item is still open in the caller's queue.
        let expect: Vec<crate::store::Expect> = chosen
            .iter()
            .filter_map(|(item, _)| crate::jobs::open_marker(item))
            .map(|k| crate::store::Expect::new(crate::store::Space::Jobs, k, Some(Vec::new())))
            .collect();
        for (item, label) in chosen {
            let (writes, entry) = self.authorize_label(who, &item, &label, None)?;
            batch.extend(writes);
            let mut done = item;
            done.answer = Some(Answer {
                label,
                by: who.name.clone(),
                time_ms: entry.time_ms,
            });
            crate::jobs::put_queue(&mut batch, &done)?;
            out.push(done);
        }
        match self.env().store().commit_if(&expect, batch) {
            Err(crate::store::StoreError::Conflict { .. }) => Err(ServiceError::BadRequest(
                "a record of this request was labeled meanwhile (by another request); nothing was written".into(),
            )),
            done => done.map(|()| out).map_err(Into::into),
        }
    }

    /// The answer to labeling a record that is not in the caller's open
    /// queue, decided by the authorization point like any label: when the
    /// record is queued for someone else, `label_record` on it (which the
    /// policies refuse to anyone but its assignee); when it is queued for
    /// nobody, `label_record` on a record of that id assigned to nobody
    /// (dataset `-`: which the same policy refuses to everyone, as a
    /// decision, not a schema error). Either way the attempt is audited and
    /// reads the same; only a caller the policy allows (their own item,
    /// already answered) hears that it is not queued.
    pub(super) fn not_queued_for(
        &self,
        who: &User,
        record: &str,
        job: Option<&str>,
        place: Option<String>,
    ) -> ServiceError {
        let store = self.env().store();
        let queued = crate::jobs::list(store.as_ref()).ok().and_then(|jobs| {
            jobs.iter()
                .filter(|j| job.is_none_or(|id| id == j.id))
                .find_map(|j| {
                    crate::jobs::queue(store.as_ref(), &j.id)
                        .ok()
                        .and_then(|q| q.get(record).cloned())
                })
        });
        let resource = match &queued {
            Some(item) => match self.lookup_record(&item.dataset, &item.record) {
                Ok((_, r)) => r,
                Err(e) => return e,
            },
            None => Resource::Record {
                dataset: "-".into(),
                id: record.into(),
                assignee: None,
            },
        };
        match self.guard(
            &who.principal(),
            Action::LabelRecord,
            &resource,
            &(record, job, "not-queued"),
        ) {
            Err(e) => e,
            Ok(()) => match self.open_in_cancelled_job(who, record, job) {
                Some(id) => JobError::State {
                    id,
                    state: "cancelled".into(),
                    what: "its queue takes no more labels",
                }
                .into(),
                None => JobError::NotQueued(match place {
                    Some(p) => format!("{record} ({p})"),
                    None => record.to_string(),
                })
                .into(),
            },
        }
    }

    /// The cancelled job (among `job`, if named) in which `record` is
    /// still an open item of `who`'s, if any: why it is not queued.
    fn open_in_cancelled_job(&self, who: &User, record: &str, job: Option<&str>) -> Option<String> {
        let store = self.env().store();
        let jobs = crate::jobs::list(store.as_ref()).ok()?;
        jobs.into_iter()
            .filter(|j| job.is_none_or(|id| id == j.id))
            .filter(|j| matches!(j.state, JobState::Cancelled { .. }))
            .find(|j| {
                crate::jobs::queue_item_read(store.as_ref(), &j.id, record)
                    .ok()
                    .flatten()
                    .is_some_and(|(item, _)| {
                        item.answer.is_none() && item.assignee.as_deref() == Some(who.name.as_str())
                    })
            })
            .map(|j| j.id)
    }

    /// Imports labels for queued items from a file: JSONL objects with
    /// `id` and `label` (and optionally `job`), or CSV with a header naming
    /// `id` and `label` columns. All-or-nothing.
    pub fn import_labels(&self, who: &User, file: &str, text: &str) -> Result<usize, ServiceError> {
        let entries = parse_label_file(file, text)?;
        let lines: Vec<usize> = entries.iter().map(|e| e.0).collect();
        let items: Vec<(String, String, Option<String>)> =
            entries.into_iter().map(|(_, r, l, j)| (r, l, j)).collect();
        let done = self.label_items(who, &items, |n| {
            lines.get(n).map(|line| format!("{file}:{line}"))
        })?;
        Ok(done.len())
    }

    /// The answers `who` gave that can still change: those of rounds
    /// their jobs have not collected yet, the latest first. Only the
    /// caller's own answers (record ids and labels they gave), like the
    /// count of their open items; no record content.
    pub fn changeable_answers(&self, who: &User) -> Result<Vec<OwnAnswer>, ServiceError> {
        let store = self.env().store();
        let mut out = Vec::new();
        for job in crate::jobs::list(store.as_ref())? {
            if !job.spec.labelers.contains(&who.name)
                && !job.reassigned.iter().any(|r| r.to == who.name)
            {
                continue;
            }
            let Some(round) = crate::jobs::collecting(&job) else {
                continue;
            };
            for item in crate::jobs::queue(store.as_ref(), &job.id)?.into_values() {
                if item.round == round
                    && item.answer.is_some()
                    && item.assignee.as_deref() == Some(who.name.as_str())
                {
                    out.push(OwnAnswer {
                        item,
                        classes: job.classes.clone(),
                    });
                }
            }
        }
        let time = |a: &OwnAnswer| a.item.answer.as_ref().map_or(0, |a| a.time_ms);
        out.sort_by(|a, b| {
            time(b)
                .cmp(&time(a))
                .then_with(|| a.item.job.cmp(&b.item.job))
                .then_with(|| a.item.record.cmp(&b.item.record))
        });
        Ok(out)
    }

    /// Changes `who`'s answer to a queue item (by record id; `job` picks
    /// among several) while its round has not collected it: the dataset
    /// label and the item's answer change together, authorized and
    /// audited as a label. Once the round has collected its answers (the
    /// job trained on them and checked its spot checks with them), the
    /// answer is final and the change is refused; nothing is written.
    pub fn change_label_item(
        &self,
        who: &User,
        record: &str,
        label: &str,
        job: Option<&str>,
    ) -> Result<QueueItem, ServiceError> {
        let store = self.env().store();
        // The caller's items for this record: one that can change first,
        // then one already collected, then one still open.
        let mut mine = Vec::new();
        for j in crate::jobs::list(store.as_ref())? {
            if job.is_some_and(|id| id != j.id) {
                continue;
            }
            if let Some((item, expect)) =
                crate::jobs::queue_item_read(store.as_ref(), &j.id, record)?
                && item.assignee.as_deref() == Some(who.name.as_str())
            {
                let rank = match (&item.answer, crate::jobs::collecting(&j)) {
                    (Some(_), Some(r)) if r == item.round => 0,
                    (Some(_), _) => 1,
                    (None, _) => 2,
                };
                mine.push((rank, item, expect));
            }
        }
        mine.sort_by_key(|m| m.0);
        let Some((_, item, item_read)) = mine.into_iter().next() else {
            return Err(self.not_queued_for(who, record, job, None));
        };
        human_label(who, label)?;
        let (current, job_read) = crate::jobs::get_read(store.as_ref(), &item.job)?;
        one_of_the_classes(&current, label)?;
        let (mut batch, entry) = self.authorize_label(who, &item, label, Some("change"))?;
        if item.answer.is_none() {
            return Err(JobError::NotAnswered(item.record).into());
        }
        let collected = || JobError::Collected {
            job: item.job.clone(),
            round: item.round,
            record: item.record.clone(),
        };
        if let JobState::Cancelled { .. } = current.state {
            return Err(JobError::State {
                id: item.job,
                state: "cancelled".into(),
                what: "its answers cannot change",
            }
            .into());
        }
        if crate::jobs::collecting(&current) != Some(item.round) {
            return Err(collected().into());
        }
        let mut done = item.clone();
        done.answer = Some(Answer {
            label: label.to_string(),
            by: who.name.clone(),
            time_ms: entry.time_ms,
        });
        crate::jobs::put_queue(&mut batch, &done)?;
        // A step collecting this round's answers that read them before
        // this change finds the token changed and reads them again.
        crate::jobs::touch_answers(&mut batch, &item.job, crate::env::random_bytes(16)?);
        let expect = [
            crate::jobs::keep_job(&mut batch, &item.job, &job_read),
            item_read,
        ];
        match store.commit_if(&expect, batch) {
            Ok(()) => Ok(done),
            Err(crate::store::StoreError::Conflict { .. }) => {
                let now = crate::jobs::get(store.as_ref(), &item.job)?;
                if crate::jobs::collecting(&now) == Some(item.round) {
                    Err(ServiceError::BadRequest(format!(
                        "job {} or its answer to {} changed while this change was written (another request); nothing was written: try again",
                        item.job, item.record
                    )))
                } else {
                    Err(collected().into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The one authorization of a person's label on a queue item's record
    /// (`label_record`, audited; `how` marks a change in the audited
    /// parameters), and the writes that store it in the dataset.
    fn authorize_label(
        &self,
        who: &User,
        item: &QueueItem,
        label: &str,
        how: Option<&str>,
    ) -> Result<(WriteBatch, LabelEntry), ServiceError> {
        let (v, resource) = self.lookup_record(&item.dataset, &item.record)?;
        self.guard(
            &who.principal(),
            Action::LabelRecord,
            &resource,
            &(
                &item.dataset,
                &item.record,
                Digest::of(label.as_bytes()).to_hex(),
                how,
            ),
        )?;
        let entry = human_label(who, label)?;
        let writes = datasets::set_label(self.env(), &v, &item.record, &entry)?;
        Ok((writes, entry))
    }
}

/// `label` is one of `job`'s classes, or the error naming them.
fn one_of_the_classes(job: &crate::jobs::Job, label: &str) -> Result<(), ServiceError> {
    if job.classes.iter().any(|c| c == label) {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "`{label}` is not a class of job {} (classes: {})",
            job.id,
            job.classes.join(", ")
        )))
    }
}
