//! The audit log and the plugin log: reading, verifying, proving.

use crate::audit::{AuditEntry, AuditFilter, Checkpoint, InclusionProof, Verdict};
use crate::plugin_log::{self, PluginLogEntry};
use crate::policy::{Action, Resource};
use crate::users::User;

use super::{Cloister, ServiceError};

/// Every action an audit entry can name, sorted: the policy schema's
/// actions and the host's own events ([`crate::audit::events`]).
pub fn audited_actions() -> &'static [&'static str] {
    static ALL: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        let mut all: Vec<&'static str> = Action::ALL
            .iter()
            .map(|a| a.as_str())
            .chain(crate::audit::events::ALL)
            .collect();
        all.sort_unstable();
        all
    })
}

impl Cloister {
    /// Reads audit entries.
    pub fn audit_log(
        &self,
        who: &User,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditEntry>, ServiceError> {
        let params = (
            &filter.actor,
            &filter.action,
            filter.since_ms,
            filter.decision,
            filter.from_seq,
            filter.limit,
            &filter.resource,
        );
        self.guard(
            &who.principal(),
            Action::ReadAudit,
            &Resource::AuditLog,
            &params,
        )?;
        let entries = self.env.audit().query(filter)?;
        // A filter on an action that no entry has and that Cloister never
        // records (a typo, a policy's wording) would match nothing, ever:
        // say so instead of answering with an empty log. A name entries do
        // have is always accepted (logs written by other versions).
        if let Some(action) = &filter.action
            && entries.is_empty()
            && !audited_actions().contains(&action.as_str())
        {
            return Err(ServiceError::BadRequest(format!(
                "action `{}`: no entry has it and Cloister never records it; the actions are {}",
                cloister_types::text::neutralize(action),
                audited_actions().join(", ")
            )));
        }
        Ok(entries)
    }

    /// The administrators' plugin log, newest first: what plugins wrote and
    /// the host's full account of each failed stage, plugin-chosen values
    /// included — which is why only the `read_plugin_log` action (admins
    /// in the default policies) reaches it. `digest` keeps the entries of
    /// digests starting with it; `limit` 0 means all.
    pub fn plugin_log(
        &self,
        who: &User,
        digest: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PluginLogEntry>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ReadPluginLog,
            &Resource::Environment,
            &(digest, limit),
        )?;
        Ok(plugin_log::list(self.env.store().as_ref(), digest, limit)?)
    }

    /// Verifies the audit log (the verification request is itself logged
    /// first, and is covered by the verification).
    pub fn audit_verify(
        &self,
        who: &User,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Verdict, ServiceError> {
        let params = checkpoint.map(|c| (c.size, hex::encode(c.root)));
        self.guard(
            &who.principal(),
            Action::VerifyAudit,
            &Resource::AuditLog,
            &params,
        )?;
        Ok(self.env.audit().verify(checkpoint)?)
    }

    /// Signs a checkpoint of the log (covering this request's own entry).
    pub fn audit_checkpoint(&self, who: &User) -> Result<Checkpoint, ServiceError> {
        self.guard(
            &who.principal(),
            Action::CheckpointAudit,
            &Resource::AuditLog,
            &(),
        )?;
        Ok(self.env.audit().checkpoint()?)
    }

    /// An inclusion proof for entry `seq`.
    pub fn audit_prove(&self, who: &User, seq: u64) -> Result<InclusionProof, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ReadAudit,
            &Resource::AuditLog,
            &seq,
        )?;
        Ok(self.env.audit().prove(seq)?)
    }
}
