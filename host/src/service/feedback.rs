//! Feedback and fresh-data capture (docs/deployment.md).
//!
//! A client sends the true labels of records it had predicted
//! (`send_feedback` on the deployment, audited). Each is matched with the
//! answer the deployment kept for that client and record id, scored into
//! the answering variant's online accuracy (and the shadow's), judged by a
//! running ramp's accuracy guard, and, when the record was captured,
//! stored as its label in the capture dataset with `feedback` provenance.
//!
//! Captured records wait in the store until a batch is full (or an
//! operator writes it), then become the next version of the capture
//! dataset, imported in the host's name with a `capture` audit entry
//! before it takes effect.

use serde::Serialize;

use super::deployments::RampInput;
use super::{Cloister, ServiceError};
use crate::audit::{AuditRecord, Decision};
use crate::datasets::{self, LabelEntry, Provenance};
use crate::deployments::{self, DeploymentError};
use crate::feedback;
use crate::policy::{Action, Resource};
use crate::serving;
use crate::store::WriteBatch;
use crate::users::User;

/// The most labels one feedback request may carry.
pub const MAX_FEEDBACK: usize = 1_000;

/// One true label sent as feedback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct Feedback {
    /// The record id, as sent with the prediction request.
    pub id: String,
    /// Its true class.
    pub label: String,
}

/// What a feedback request did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FeedbackOutcome {
    /// Labels matched with a kept answer and scored.
    pub scored: u64,
    /// Of those, labels also stored in the capture dataset (or with the
    /// captured record waiting for its version).
    pub labeled_captures: u64,
    /// Ids with no kept answer for this client (never predicted, or
    /// evicted from the kept answers).
    pub unknown: u64,
    /// Ids that already had feedback (the first label stands).
    pub repeated: u64,
}

/// A capture written as a dataset version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureWritten {
    /// `name@version`, or `None` when nothing was waiting.
    pub version: Option<String>,
    /// Records in it.
    pub records: u64,
    /// Of those, records with a label from feedback.
    pub labeled: u64,
}

impl Cloister {
    /// Scores true labels a client sends for records it had predicted.
    pub fn send_feedback(
        &self,
        who: &User,
        name: &str,
        items: &[Feedback],
    ) -> Result<FeedbackOutcome, ServiceError> {
        let looked_up = self.deployment_cached(name);
        let d = self.found(
            looked_up,
            who,
            Action::SendFeedback,
            || Resource::Deployment {
                name: name.to_string(),
                clients: Vec::new(),
            },
            &(name, items),
        )?;
        self.guard(
            &who.principal(),
            Action::SendFeedback,
            &Resource::Deployment {
                name: d.name.clone(),
                clients: d.clients.clone(),
            },
            &(name, items),
        )?;
        if items.is_empty() || items.len() > MAX_FEEDBACK {
            return Err(ServiceError::BadRequest(format!(
                "a feedback request carries 1 to {MAX_FEEDBACK} labels, not {}",
                items.len()
            )));
        }
        if d.keep_answers == 0 {
            return Err(DeploymentError::Invalid(format!(
                "deployment `{}` keeps no answers, so it cannot take feedback (an operator can turn it on with `cloister deploy keep-answers`)",
                d.name
            ))
            .into());
        }
        let classes = self.deployment_classes(&d)?;
        for (i, f) in items.iter().enumerate() {
            if !classes.contains(&f.label) {
                return Err(ServiceError::BadRequest(format!(
                    "feedback {i} (record `{}`): `{}` is not a class of the deployment's models ({})",
                    shown(&f.id),
                    shown(&f.label),
                    classes.join(", ")
                )));
            }
        }
        // Answers given in the last second may still be in memory.
        self.flush_metrics()?;
        let store = self.env.store();
        let now = crate::time::now_ms();
        let minute = serving::minute(now);
        // Each answer is scored once: the batch commits only if every
        // answer it marks still holds the bytes read (no truth yet), so of
        // two requests labeling one answer at the same time one lands and
        // the other, read again, finds it answered.
        let (out, scores) = crate::store::update_reading(store.as_ref(), || {
            let mut out = FeedbackOutcome::default();
            let mut b = WriteBatch::new();
            let mut expect = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut scores = Vec::new();
            for f in items {
                if !seen.insert(f.id.as_str()) {
                    out.repeated += 1;
                    continue;
                }
                let Some((generation, mut a, read)) =
                    feedback::find(store.as_ref(), &d.name, &who.name, &f.id)?
                else {
                    out.unknown += 1;
                    continue;
                };
                if a.truth.is_some() {
                    out.repeated += 1;
                    continue;
                }
                let champion_label = if a.role == "champion" {
                    Some(a.label.clone())
                } else {
                    a.champion.clone()
                };
                let champion_correct = champion_label.as_deref() == Some(f.label.as_str());
                let correct = a.label == f.label;
                scores.push((a.role.clone(), a.model.clone(), correct, champion_correct));
                if let Some((m, l)) = &a.shadow {
                    scores.push(("shadow".into(), m.clone(), *l == f.label, champion_correct));
                }
                if let Some(dataset) = &a.captured
                    && self
                        .label_capture(&mut b, &d.name, dataset, &who.name, &f.id, &f.label, now)?
                {
                    out.labeled_captures += 1;
                }
                a.truth = Some(f.label.clone());
                feedback::update(&mut b, &d.name, generation, &a)?;
                expect.push(read);
                out.scored += 1;
            }
            // The labels are data: durable before the request is answered.
            Ok::<_, ServiceError>((expect, b, (out, scores)))
        })?;
        let mut pending = self
            .serving
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (role, model, correct, champion_correct) in &scores {
            pending
                .counters
                .entry((d.name.clone(), role.clone(), model.clone(), minute))
                .or_default()
                .add_feedback(*correct, *champion_correct);
        }
        if d.ramp.as_ref().is_some_and(|r| r.state == "running") {
            for (role, model, correct, champion_correct) in &scores {
                if role == "candidate" {
                    self.judge_ramp(
                        &d.name,
                        model,
                        RampInput::Feedback {
                            correct: *correct,
                            champion_correct: *champion_correct,
                        },
                        now,
                    )?;
                }
            }
        }
        let taken = pending.take(now);
        drop(pending);
        self.write_metrics(taken)?;
        Ok(out)
    }

    /// Every class the deployment's models predict.
    fn deployment_classes(
        &self,
        d: &crate::deployments::Deployment,
    ) -> Result<Vec<String>, ServiceError> {
        let mut classes = Vec::new();
        for m in d.models() {
            for c in crate::models::get(self.env.store().as_ref(), &m)?.classes {
                if !classes.contains(&c) {
                    classes.push(c);
                }
            }
        }
        classes.sort();
        Ok(classes)
    }

    /// Stores a feedback label for a captured record: on the waiting
    /// capture, or in the newest capture version that holds the record.
    #[allow(clippy::too_many_arguments)]
    fn label_capture(
        &self,
        b: &mut WriteBatch,
        deployment: &str,
        dataset: &str,
        client: &str,
        id: &str,
        label: &str,
        now: u64,
    ) -> Result<bool, ServiceError> {
        let store = self.env.store();
        if let Some(mut c) = feedback::find_capture(store.as_ref(), deployment, client, id)? {
            c.truth = Some((label.to_string(), client.to_string(), now));
            feedback::capture(b, deployment, client, id, &c)?;
            return Ok(true);
        }
        let captured_id = feedback::captured_id(client, id);
        for v in datasets::versions(&self.env, dataset)?
            .iter()
            .rev()
            .take(64)
        {
            let entry = LabelEntry {
                label: label.to_string(),
                provenance: Provenance::Feedback {
                    deployment: deployment.to_string(),
                    client: client.to_string(),
                },
                time_ms: now,
            };
            match datasets::set_label(&self.env, v, &captured_id, &entry) {
                Ok(w) => {
                    b.extend(w);
                    return Ok(true);
                }
                Err(datasets::DatasetError::UnknownRecord { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Writes the captured records of deployment `name` as the next
    /// version of its capture dataset now (`manage_deployment`).
    pub fn write_capture(&self, who: &User, name: &str) -> Result<CaptureWritten, ServiceError> {
        let d = self.deployment_for(who, Action::ManageDeployment, name, &("capture", name))?;
        if d.capture.is_none() {
            return Err(DeploymentError::Invalid(format!(
                "deployment `{}` captures nothing (set it up with `cloister deploy capture`)",
                d.name
            ))
            .into());
        }
        self.flush_metrics()?;
        self.roll_capture(&d.name)
    }

    /// A capture written on the request path: a failure does not fail the
    /// request that filled the batch (its answer is already given); it is
    /// put in the deployment's history, and the records keep waiting.
    pub(super) fn roll_capture_noting_failure(&self, name: &str) {
        if let Err(e) = self.roll_capture(name) {
            let _ = self.note(name, &format!("capture not written: {e}"));
        }
    }

    /// Appends a host note to a deployment's history.
    fn note(&self, name: &str, what: &str) -> Result<(), ServiceError> {
        let store = self.env.store();
        // Over the deployment as read: a change another process made
        // meanwhile is kept.
        crate::store::update(
            store.as_ref(),
            &[(crate::store::Space::Deployments, name.as_bytes())],
            |stored| {
                let mut d = deployments::decode(name, stored[0].as_deref())?;
                d.record("cloister", crate::time::now_ms(), what.to_string());
                let mut b = WriteBatch::new();
                deployments::put(&mut b, &d)?;
                Ok::<_, ServiceError>((b, ()))
            },
        )?;
        Ok(())
    }

    /// Turns every waiting captured record of deployment `name` into the
    /// next version of its capture dataset, with the feedback labels that
    /// arrived meanwhile. The host's `capture` audit entry comes first.
    pub(super) fn roll_capture(&self, name: &str) -> Result<CaptureWritten, ServiceError> {
        let _one = self
            .serving
            .capture_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let store = self.env.store();
        // One process at a time turns a deployment's captures into a
        // version; another that is doing it now will take these too.
        let _claim = match crate::claims::take(store, "capture", name) {
            Ok(c) => c,
            Err(crate::claims::ClaimError::Held) => {
                return Ok(CaptureWritten {
                    version: None,
                    records: 0,
                    labeled: 0,
                });
            }
            Err(crate::claims::ClaimError::Store(e)) => return Err(e.into()),
        };
        let d = deployments::get(store.as_ref(), name)?;
        let Some(capture) = &d.capture else {
            return Ok(CaptureWritten {
                version: None,
                records: 0,
                labeled: 0,
            });
        };
        let waiting = feedback::pending_captures(store.as_ref(), name)?;
        if waiting.is_empty() {
            return Ok(CaptureWritten {
                version: None,
                records: 0,
                labeled: 0,
            });
        }
        let mut lines = Vec::new();
        for (_, c) in &waiting {
            lines.extend_from_slice(c.line.as_bytes());
            lines.push(b'\n');
        }
        let dataset = Resource::Dataset {
            name: capture.dataset.clone(),
        };
        self.env.audit().append(AuditRecord {
            actor: "cloister".into(),
            action: crate::audit::events::CAPTURE.into(),
            resource: dataset.uid_text(),
            decision: Decision::Allow,
            policies: vec!["host".into()],
            params: super::params_digest(&(
                name,
                &capture.by,
                waiting.len(),
                crate::digest::Digest::of(&lines).to_hex(),
            )),
            outcome: None,
            serving: None,
            account: None,
        })?;
        let file = capture_file(name);
        let mut source = crate::records::JsonlReader::new(
            file.clone(),
            std::io::Cursor::new(lines),
            crate::records::Schema::default(),
        );
        let version = datasets::import(&self.env, &capture.dataset, &mut source, "id", "cloister")?;
        let mut b = WriteBatch::new();
        let mut labeled = 0;
        for (key, c) in &waiting {
            if let Some((label, client, time_ms)) = &c.truth {
                let Some(id) = feedback::captured_id_of_key(name, key) else {
                    continue;
                };
                let entry = LabelEntry {
                    label: label.clone(),
                    provenance: Provenance::Feedback {
                        deployment: name.to_string(),
                        client: client.clone(),
                    },
                    time_ms: *time_ms,
                };
                b.extend(datasets::set_label(&self.env, &version, &id, &entry)?);
                labeled += 1;
            }
            b.delete(crate::store::Space::Captures, key.clone());
        }
        store.commit(b)?;
        Ok(CaptureWritten {
            version: Some(version.reference()),
            records: waiting.len() as u64,
            labeled,
        })
    }

    /// A capture dataset holds captures of one deployment only: every
    /// existing version must have come from it.
    pub(super) fn check_capture_dataset(
        &self,
        dataset: &str,
        deployment: &str,
    ) -> Result<(), ServiceError> {
        let file = capture_file(deployment);
        for v in datasets::versions(&self.env, dataset)? {
            if v.source != file {
                return Err(DeploymentError::Invalid(format!(
                    "dataset `{}` holds other data ({} came from `{}`): capture into a new dataset",
                    dataset,
                    v.reference(),
                    shown(&v.source)
                ))
                .into());
            }
        }
        Ok(())
    }
}

/// A caller-supplied string as an error message shows it: neutralized,
/// at most 80 characters.
fn shown(s: &str) -> String {
    crate::text::neutralize(s).chars().take(80).collect()
}

/// The source name capture versions carry.
fn capture_file(deployment: &str) -> String {
    format!("capture-{deployment}.jsonl")
}
