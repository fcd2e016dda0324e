//! Policies: checking them and explaining a decision.

use crate::env::EnvError;
use crate::policy::{Action, Authorization, Resource};
use crate::registry::{self};
use crate::users::{self, User};

use super::{Cloister, ServiceError};

/// What `policy explain` reports.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The decision and the deciding policy ids.
    pub authorization: Authorization,
    /// `(id, text)` of each deciding policy.
    pub policies: Vec<(String, String)>,
    /// The resource as the policy engine saw it.
    pub resource: Resource,
}

impl Cloister {
    /// Validates the environment's policy directory as it is on disk now.
    pub fn policy_check(&self, who: &User) -> Result<usize, ServiceError> {
        self.guard(
            &who.principal(),
            Action::CheckPolicy,
            &Resource::Environment,
            &(),
        )?;
        let pdir = self
            .env
            .dir()
            .open_dir("policies")
            .map_err(|error| EnvError::File {
                file: "policies".into(),
                error,
            })?;
        Ok(crate::env::load_policy_dir(&pdir, "policies/")?.len())
    }

    /// Explains how the active policies decide `action` on `resource` for
    /// user `as_user`. Resource syntax: `env`, `audit`, `account:NAME`,
    /// `dataset:NAME`,
    /// `record:DATASET/ID`, `plugin:DIGEST`, `model:ID`, `job:ID`,
    /// `deployment:NAME`; a stored plugin, model, job or deployment is
    /// explained with its stored facts (its approval, release state and
    /// disclosure verdict, owner, clients), as the operation would see it.
    /// An action asked of a kind of resource it does not apply to is
    /// refused with the kinds it does apply to.
    pub fn policy_explain(
        &self,
        who: &User,
        as_user: &str,
        action: &str,
        resource: &str,
    ) -> Result<Explanation, ServiceError> {
        let action: Action = action.parse().map_err(ServiceError::BadRequest)?;
        self.guard(
            &who.principal(),
            Action::ExplainPolicy,
            &Resource::Environment,
            &(as_user, action.as_str(), resource),
        )?;
        let subject = users::get(self.env.store().as_ref(), as_user)?;
        let resource = self.parse_resource(resource)?;
        let applies = self.env.policy().resource_types(action);
        let kind = resource.type_name();
        if !applies.iter().any(|t| t == kind) {
            let syntax: Vec<&str> = applies.iter().map(|t| resource_syntax(t)).collect();
            return Err(ServiceError::BadRequest(format!(
                "`{}` does not apply to {}; it applies to {}",
                action.as_str(),
                resource_syntax(kind),
                syntax.join(", ")
            )));
        }
        let authorization =
            self.env
                .policy()
                .authorize(&subject.principal(), action, &resource, self.channel);
        let policies = authorization
            .policies
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    self.env
                        .policy()
                        .policy_text(id)
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        Ok(Explanation {
            authorization,
            policies,
            resource,
        })
    }

    pub(super) fn parse_resource(&self, text: &str) -> Result<Resource, ServiceError> {
        let bad = || {
            ServiceError::BadRequest(format!(
                "`{text}` is not a resource (use env, audit, account:NAME, dataset:NAME, record:DATASET/ID, plugin:DIGEST, model:ID, job:ID or deployment:NAME)"
            ))
        };
        let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
        let store = self.env.store().as_ref();
        Ok(match (kind, rest) {
            ("env", "") => Resource::Environment,
            ("account", name) if !name.is_empty() => {
                users::check_name(name)?;
                Resource::Account { name: name.into() }
            }
            ("audit", "") => Resource::AuditLog,
            ("dataset", name) if !name.is_empty() => Resource::Dataset { name: name.into() },
            ("record", r) => {
                let (ds, id) = r.split_once('/').ok_or_else(bad)?;
                let (_, res) = self.lookup_record(ds, id)?;
                res
            }
            ("plugin", d) => registry::get(store, d)?.resource(),
            ("model", id) if !id.is_empty() => crate::models::get(store, id)?.resource(),
            ("job", id) if !id.is_empty() => Self::job_resource(&crate::jobs::get(store, id)?),
            ("deployment", name) if !name.is_empty() => {
                super::deployments::resource(&crate::deployments::get(store, name)?)
            }
            _ => return Err(bad()),
        })
    }
}

/// How `policy explain` names resources of the schema's entity type `ty`.
fn resource_syntax(ty: &str) -> &'static str {
    match ty {
        "Environment" => "env",
        "Account" => "account:NAME",
        "AuditLog" => "audit",
        "Dataset" => "dataset:NAME",
        "Record" => "record:DATASET/ID",
        "Plugin" => "plugin:DIGEST",
        "Model" => "model:ID",
        "Job" => "job:ID",
        "Deployment" => "deployment:NAME",
        "Traffic" => {
            "a routing change's traffic (decided when the change is asked; not explained here)"
        }
        _ => "a resource this version does not name",
    }
}
