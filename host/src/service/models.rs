//! Models: listing, the two-person release gate and the signed export.

use crate::digest::Digest;
use crate::policy::{Action, Resource};
use crate::users::User;

use super::{Cloister, ServiceError};

impl Cloister {
    /// Lists models the caller may view.
    pub fn list_models(
        &self,
        who: &User,
    ) -> Result<Vec<crate::models::ModelManifest>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ViewModel,
            &Resource::bare_model("*"),
            &"list",
        )?;
        Ok(crate::models::list(self.env.store().as_ref())?)
    }

    /// One model's manifest.
    pub fn show_model(
        &self,
        who: &User,
        id: &str,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        let m = self.model_for(who, Action::ViewModel, id, &id)?;
        Ok(m)
    }

    /// One model's manifest with the review state of its lineage's plugins
    /// now: what an approver needs to see before deciding its release (a
    /// plugin whose approval was withdrawn after training blocks it). One
    /// `view_model` decision, as for [`Cloister::show_model`].
    pub fn model_detail(&self, who: &User, id: &str) -> Result<ModelDetail, ServiceError> {
        let manifest = self.model_for(who, Action::ViewModel, id, &id)?;
        let plugins = self.lineage_plugins(&manifest)?;
        Ok(ModelDetail { manifest, plugins })
    }

    /// The plugins of `m`'s lineage, preprocessors in order then the
    /// featurizer, each with its review state now.
    fn lineage_plugins(
        &self,
        m: &crate::models::ModelManifest,
    ) -> Result<Vec<LineagePlugin>, ServiceError> {
        let store = self.env.store();
        let stages = m
            .lineage
            .preprocess
            .iter()
            .map(|d| (PluginStage::Preprocess, d))
            .chain([(PluginStage::Features, &m.lineage.features)]);
        stages
            .map(|(stage, digest)| {
                let e = crate::registry::get(store.as_ref(), digest)?;
                Ok(LineagePlugin {
                    stage,
                    approved_by: e.approval.as_ref().map(|a| a.by.clone()),
                    withdrawn_by: match e.approval {
                        Some(_) => None,
                        None => e.withdrawn.last().map(|w| w.by.clone()),
                    },
                    digest: e.digest,
                    name: e.name,
                    version: e.version,
                })
            })
            .collect()
    }

    /// Requests the release of a model.
    pub fn request_release(
        &self,
        who: &User,
        id: &str,
        reason: &str,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        self.model_for(
            who,
            Action::RequestRelease,
            id,
            &(id, Digest::of(reason.as_bytes()).to_hex()),
        )?;
        // Checked and changed in one step: of two concurrent requests, one
        // is refused.
        let m = crate::models::update(self.env.store().as_ref(), id, |m| {
            if m.release.requested_by.is_some() {
                return Err(crate::models::ModelError::Release(format!(
                    "a release of {id} was already requested"
                )));
            }
            m.release = crate::models::Release {
                requested_by: Some(who.name.clone()),
                reason: Some(reason.to_string()),
                decision: None,
                decided_by: None,
            };
            Ok(())
        })?;
        Ok(m)
    }

    /// Approves (`true`) or rejects a requested release.
    pub fn decide_release(
        &self,
        who: &User,
        id: &str,
        approve: bool,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        let action = if approve {
            Action::ApproveRelease
        } else {
            Action::RejectRelease
        };
        let authorized = self.model_for(who, action, id, &id)?;
        if approve {
            self.lineage_approved(&authorized)?;
        }
        // Checked and changed in one step, on the release that was
        // authorized: of an approval and a rejection at once, one is
        // refused, and neither lands on a release requested again since.
        let m = crate::models::update(self.env.store().as_ref(), id, |m| {
            if m.release.decision.is_some() {
                return Err(crate::models::ModelError::Release(format!(
                    "the release of {id} was already decided"
                )));
            }
            if m.release.requested_by != authorized.release.requested_by {
                return Err(crate::models::ModelError::Release(format!(
                    "the release request of {id} changed while it was being decided"
                )));
            }
            m.release.decision = Some(if approve { "approved" } else { "rejected" }.into());
            m.release.decided_by = Some(who.name.clone());
            Ok(())
        })?;
        Ok(m)
    }

    /// Refuses a model one of whose plugins is not approved now (its
    /// approval withdrawn after training): it is not released, exported or
    /// deployed until a reviewer approves that digest again.
    pub(super) fn lineage_approved(
        &self,
        m: &crate::models::ModelManifest,
    ) -> Result<(), ServiceError> {
        match self
            .lineage_plugins(m)?
            .into_iter()
            .find(|p| p.approved_by.is_none())
        {
            Some(p) => Err(ServiceError::BadRequest(format!(
                "model {}: its plugin {} {} is not approved{}; a reviewer must approve that digest again first",
                m.id,
                p.name,
                &p.digest[..p.digest.len().min(16)],
                p.withdrawn_by
                    .map(|by| format!(" (its approval was withdrawn by {by})"))
                    .unwrap_or_default(),
            ))),
            None => Ok(()),
        }
    }

    /// The signed bundle of an approved model: the only way model bytes
    /// leave the environment.
    pub fn export_model(&self, who: &User, id: &str) -> Result<Vec<u8>, ServiceError> {
        let m = self.model_for(who, Action::ExportModel, id, &id)?;
        self.lineage_approved(&m)?;
        // What leaves is the released copy: the weights with disclosive
        // input rows zeroed, and the manifest without record ids or counts
        // below k.
        let weights = crate::models::release_weights(self.env.dir(), self.env.objects(), &m)?;
        // A fitted featurizer's vocabulary travels with the model: keys
        // and counts of at least k, checked against its digest on read.
        let state = match &m.lineage.features_state {
            Some(hex) => {
                let digest: crate::digest::Digest = hex.parse().map_err(|_| {
                    ServiceError::BadRequest(format!(
                        "model {id}: its lineage names a fitted state that is not a digest"
                    ))
                })?;
                let v = crate::fitted::get(self.env.store().as_ref(), &digest)?;
                Some(crate::fitted::encode(&v))
            }
            None => None,
        };
        let audit = self.env.audit();
        Ok(crate::models::bundle(
            &m.released(),
            state.as_deref(),
            &weights,
            &|msg| audit.sign_bytes(msg),
            audit.public_key(),
        )?)
    }

    /// A model looked up and authorized for `action` (see
    /// [`Cloister::found`]: an unknown id is decided on a new model's
    /// attributes first).
    pub(super) fn model_for(
        &self,
        who: &User,
        action: Action,
        id: &str,
        params: &impl serde::Serialize,
    ) -> Result<crate::models::ModelManifest, ServiceError> {
        let m = self.found(
            crate::models::get(self.env.store().as_ref(), id),
            who,
            action,
            || Resource::bare_model(id),
            params,
        )?;
        self.guard(&who.principal(), action, &m.resource(), params)?;
        Ok(m)
    }
}

/// A model's manifest and the review state of its lineage's plugins
/// ([`Cloister::model_detail`]). In JSON, the manifest's fields and
/// `plugins`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelDetail {
    /// The manifest.
    #[serde(flatten)]
    pub manifest: crate::models::ModelManifest,
    /// The lineage's plugins, preprocessors in order then the featurizer.
    pub plugins: Vec<LineagePlugin>,
}

impl ModelDetail {
    /// The first lineage plugin that is not approved now, if any: the
    /// model's release cannot be approved, nor the model exported or
    /// deployed, until a reviewer approves it again.
    pub fn unapproved(&self) -> Option<&LineagePlugin> {
        self.plugins.iter().find(|p| p.approved_by.is_none())
    }
}

/// Where a plugin ran in a model's lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginStage {
    /// A preprocessor.
    Preprocess,
    /// The featurizer.
    Features,
}

/// A plugin of a model's lineage and its review state now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineagePlugin {
    /// Where it ran.
    pub stage: PluginStage,
    /// Its digest (hex SHA-256 of the component).
    pub digest: String,
    /// The name it declares.
    pub name: String,
    /// The version it declares.
    pub version: String,
    /// The reviewer whose approval stands, while it is approved.
    pub approved_by: Option<String>,
    /// Who withdrew its last approval, while it is not approved.
    pub withdrawn_by: Option<String>,
}

impl LineagePlugin {
    /// `approved by rev`, or `NOT APPROVED (withdrawn by rev)`.
    pub fn review_state(&self) -> String {
        match (&self.approved_by, &self.withdrawn_by) {
            (Some(by), _) => format!("approved by {by}"),
            (None, Some(by)) => format!("NOT APPROVED (approval withdrawn by {by})"),
            (None, None) => "NOT APPROVED".to_string(),
        }
    }
}
