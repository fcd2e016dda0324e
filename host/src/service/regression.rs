//! The regression gate (docs/deployment.md): `cloister deploy test` runs a
//! candidate and the champion on the freshest labeled data, and the
//! signed report it stores is what the policies read before the candidate
//! takes more than a small share of the traffic.

use std::collections::BTreeMap;

use super::deployments::ReportStanding;
use super::{Cloister, ServiceError};
use crate::datasets::{self, DatasetVersion};
use crate::deployments::{Deployment, DeploymentError};
use crate::policy::{Action, Resource};
use crate::regression::{self, Inputs, Paired, RegressionReport};
use crate::store::WriteBatch;
use crate::types::DataRecord;
use crate::users::User;

/// The most labeled records a default (capture) test gathers, newest
/// versions first.
pub const GATE_LABELED: usize = 5_000;
/// The most unlabeled records the drift is measured on.
pub const GATE_UNLABELED: usize = 5_000;

impl Cloister {
    /// Tests `candidate` against deployment `name`'s champion on `dataset`
    /// (`NAME@VERSION` or `NAME` for its latest version) or, without one,
    /// on the newest versions of the deployment's capture dataset; signs
    /// and stores the report. Needs `manage_deployment` on the deployment,
    /// `deploy_model` on the candidate and `view_stats` on the dataset
    /// (the report holds aggregates only).
    pub fn test_candidate(
        &self,
        who: &User,
        name: &str,
        candidate: &str,
        dataset: Option<&str>,
    ) -> Result<RegressionReport, ServiceError> {
        let params = ("test", name, candidate, dataset);
        let d = self.deployment_for(who, Action::ManageDeployment, name, &params)?;
        self.model_for(who, Action::DeployModel, candidate, &params)?;
        if candidate == d.champion {
            return Err(DeploymentError::Invalid(format!(
                "`{candidate}` is the champion of `{}`: test another model against it",
                d.name
            ))
            .into());
        }
        let versions = self.gate_versions(&d, dataset)?;
        for v in &versions {
            self.guard(
                &who.principal(),
                Action::ViewStats,
                &Resource::Dataset {
                    name: v.name.clone(),
                },
                &params,
            )?;
        }
        let mut labeled: Vec<(DataRecord, String)> = Vec::new();
        let mut unlabeled: Vec<DataRecord> = Vec::new();
        for v in &versions {
            for r in datasets::records(&self.env, v) {
                let r = r?;
                match super::training::training_label(&r) {
                    Some(l) if labeled.len() < GATE_LABELED => labeled.push((r.record, l)),
                    None if unlabeled.len() < GATE_UNLABELED => unlabeled.push(r.record),
                    _ => {}
                }
            }
            if labeled.len() >= GATE_LABELED && dataset.is_none() {
                break;
            }
        }
        let purpose = format!("deploy test {}", d.name);
        let records: Vec<DataRecord> = labeled.iter().map(|(r, _)| r.clone()).collect();
        let cand = self.gate_predict(who, &purpose, candidate, &records)?;
        let champ = self.gate_predict(who, &purpose, &d.champion, &records)?;
        let pairs: Vec<Paired<'_>> = labeled
            .iter()
            .map(|(r, truth)| Paired {
                truth,
                candidate: cand.get(&r.id),
                champion: champ.get(&r.id),
            })
            .collect();
        let count = |m: &BTreeMap<String, BTreeMap<String, f32>>| {
            let mut out: BTreeMap<String, u64> = BTreeMap::new();
            for p in m.values() {
                if let Some((c, _)) = p.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
                    *out.entry(c.clone()).or_default() += 1;
                }
            }
            out
        };
        let (ucand, uchamp) = if unlabeled.is_empty() {
            (BTreeMap::new(), BTreeMap::new())
        } else {
            (
                count(&self.gate_predict(who, &purpose, candidate, &unlabeled)?),
                count(&self.gate_predict(who, &purpose, &d.champion, &unlabeled)?),
            )
        };
        let mut report = regression::evaluate(Inputs {
            deployment: &d.name,
            candidate,
            champion: &d.champion,
            datasets: versions.iter().map(DatasetVersion::reference).collect(),
            labeled: pairs,
            unlabeled: (ucand, uchamp),
            unlabeled_records: unlabeled.len() as u64,
            by: &who.name,
            now_ms: crate::time::now_ms(),
        });
        report.key = hex::encode(self.public_key());
        let body = report.body();
        report.signature = hex::encode(
            self.env
                .audit()
                .sign_bytes(&regression::signed_message(&body)),
        );
        // The report and a line in the deployment's history, written over
        // the deployment as it is read here: a ramp step or an operator's
        // change made meanwhile (in this process or another) is kept, and
        // the line is added to it.
        let store = self.env.store();
        let what = format!(
            "test {candidate} on {}: {}",
            report.datasets.join(", "),
            report.verdict
        );
        crate::store::update(
            store.as_ref(),
            &[(crate::store::Space::Deployments, d.name.as_bytes())],
            |values| {
                let mut changed = crate::deployments::decode(&d.name, values[0].as_deref())?;
                changed.record(&who.name, crate::time::now_ms(), what.clone());
                let mut b = WriteBatch::new();
                regression::put(&mut b, &report, body.clone());
                crate::deployments::put(&mut b, &changed)?;
                Ok::<_, ServiceError>((b, ()))
            },
        )?;
        Ok(report)
    }

    /// The dataset versions a test runs on.
    fn gate_versions(
        &self,
        d: &Deployment,
        dataset: Option<&str>,
    ) -> Result<Vec<DatasetVersion>, ServiceError> {
        if let Some(reference) = dataset {
            return Ok(vec![datasets::resolve(&self.env, reference)?]);
        }
        let Some(capture) = &d.capture else {
            return Err(DeploymentError::Invalid(format!(
                "deployment `{}` captures no data: name a labeled dataset with --dataset NAME@VERSION, or set up capture with `cloister deploy capture`",
                d.name
            ))
            .into());
        };
        let mut versions = datasets::versions(&self.env, &capture.dataset)?;
        if versions.is_empty() {
            return Err(DeploymentError::Invalid(format!(
                "the capture dataset `{}` has no version yet: write the waiting records with `cloister deploy capture {} --write`",
                capture.dataset, d.name
            ))
            .into());
        }
        versions.reverse();
        Ok(versions)
    }

    /// One model's class probabilities for `records`, by record id, in
    /// requests of at most [`super::MAX_PREDICT_RECORDS`] (a record its
    /// chain drops has none).
    fn gate_predict(
        &self,
        who: &User,
        purpose: &str,
        model: &str,
        records: &[DataRecord],
    ) -> Result<BTreeMap<String, BTreeMap<String, f32>>, ServiceError> {
        let mut out = BTreeMap::new();
        for chunk in records.chunks(super::MAX_PREDICT_RECORDS) {
            let input = super::pipeline::unlabeled(chunk);
            for a in self.serve(who, purpose, model, input)?.answers {
                out.insert(a.id, a.probabilities);
            }
        }
        Ok(out)
    }

    /// The policy resource of a routing change giving `model` up to
    /// `weight` basis points of deployment `d`'s traffic.
    pub(super) fn traffic(
        &self,
        d: &Deployment,
        model: &str,
        weight: u32,
    ) -> Result<Resource, ServiceError> {
        Ok(Resource::Traffic {
            deployment: d.name.clone(),
            model: model.to_string(),
            weight: i64::from(weight),
            regression: self.standing(d, model)?,
        })
    }

    /// Where `model`'s last report on `d` stands.
    fn standing(&self, d: &Deployment, model: &str) -> Result<String, ServiceError> {
        Ok(
            match regression::get(
                self.env.store().as_ref(),
                &d.name,
                model,
                &self.public_key(),
            ) {
                Ok(None) => "none".into(),
                Err(crate::store::StoreError::Corrupted(_)) => "damaged".into(),
                Err(e) => return Err(e.into()),
                Ok(Some((r, verified))) => standing_of(d, &r, verified),
            },
        )
    }

    /// The deployment's stored reports with where each stands.
    pub(super) fn report_standings(
        &self,
        d: &Deployment,
    ) -> Result<Vec<ReportStanding>, ServiceError> {
        Ok(
            regression::list(self.env.store().as_ref(), &d.name, &self.public_key())?
                .into_iter()
                .map(|(r, verified)| ReportStanding {
                    standing: standing_of(d, &r, verified),
                    report: r,
                })
                .collect(),
        )
    }
}

fn standing_of(d: &Deployment, r: &RegressionReport, verified: bool) -> String {
    if !verified || r.deployment != d.name {
        "damaged".into()
    } else if r.champion.model != d.champion {
        "stale".into()
    } else {
        r.verdict.clone()
    }
}
