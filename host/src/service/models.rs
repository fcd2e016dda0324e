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
        let store = self.env.store();
        for digest in m.lineage.preprocess.iter().chain([&m.lineage.features]) {
            let e = crate::registry::get(store.as_ref(), digest)?;
            if e.approval.is_none() {
                let why = e
                    .withdrawn
                    .last()
                    .map(|w| format!(" (its approval was withdrawn by {})", w.by))
                    .unwrap_or_default();
                return Err(ServiceError::BadRequest(format!(
                    "model {}: its plugin {} {} is not approved{why}; a reviewer must approve that digest again first",
                    m.id,
                    e.name,
                    &e.digest[..e.digest.len().min(16)]
                )));
            }
        }
        Ok(())
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
