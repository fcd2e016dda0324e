//! The labeling queue: the one place record contents are shown to
//! labelers, and label imports.

use std::collections::HashSet;

use crate::datasets::{self};
use crate::digest::Digest;
use crate::jobs::label_file::parse_label_file;
use crate::jobs::{Answer, JobError, LabelTask, QueueItem};
use crate::policy::{Action, Resource};
use crate::store::WriteBatch;
use crate::users::User;

/// What a running job reports.
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
            |_| 0,
        )?;
        done.pop()
            .ok_or_else(|| JobError::NotQueued(record.to_string()).into())
    }

    /// Labels many queued records all-or-nothing. `line` maps an entry's
    /// index to its line in a file (for errors).
    pub(super) fn label_items(
        &self,
        who: &User,
        entries: &[(String, String, Option<String>)],
        line: impl Fn(usize) -> usize,
    ) -> Result<Vec<QueueItem>, ServiceError> {
        let open = crate::jobs::open_items_for(self.env().store().as_ref(), &who.name)?;
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
            human_label(who, label)?;
            let job = crate::jobs::get(self.env().store().as_ref(), &item.job)?;
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
        // Each item is answered once: the batch lands only while every
        // item is still open in the caller's queue.
        let expect: Vec<crate::store::Expect> = chosen
            .iter()
            .filter_map(|(item, _)| crate::jobs::open_marker(item))
            .map(|k| crate::store::Expect::new(crate::store::Space::Jobs, k, Some(Vec::new())))
            .collect();
        for (item, label) in chosen {
            let (v, resource) = self.lookup_record(&item.dataset, &item.record)?;
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
            let entry = human_label(who, &label)?;
            batch.extend(datasets::set_label(self.env(), &v, &item.record, &entry)?);
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
        line: usize,
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
