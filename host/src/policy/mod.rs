//! The policy engine: Cedar policies over the schema in `policies/`, and
//! [`PolicyEngine::authorize`], the one function that decides every
//! operation. [`crate::service::Cloister`] is its only caller outside tests;
//! it records each decision in the audit log before acting on it.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The schema shipped with this build (`policies/cloister.cedarschema`).
pub const DEFAULT_SCHEMA: &str = include_str!("../../../policies/cloister.cedarschema");
/// The default policy set shipped with this build (`policies/default.cedar`).
pub const DEFAULT_POLICIES: &str = include_str!("../../../policies/default.cedar");
/// File name of the schema inside a policy directory.
pub const SCHEMA_FILE: &str = "cloister.cedarschema";

/// Errors loading or checking policies. Each names the file and, where the
/// problem has one, the line and column.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// A policy or schema file does not parse or does not validate.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// File name.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A problem with the set as a whole.
    #[error("{0}")]
    Set(String),
}

/// The six roles. Their names are `Role` entity ids in the policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages users.
    Admin,
    /// Imports data, adds and runs plugins, trains, requests releases.
    Scientist,
    /// Sees and labels the records assigned to them.
    Labeler,
    /// Approves plugin digests.
    Reviewer,
    /// Approves or rejects model releases.
    Approver,
    /// Reads and verifies the audit log.
    Auditor,
    /// Runs deployments: creates them, routes traffic between their
    /// models, promotes, rolls back and pauses them.
    Operator,
    /// A service account that calls `predict` on the deployments that name
    /// it, and does nothing else.
    Client,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 8] = [
        Role::Admin,
        Role::Scientist,
        Role::Labeler,
        Role::Reviewer,
        Role::Approver,
        Role::Auditor,
        Role::Operator,
        Role::Client,
    ];

    /// The name used in policies and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Scientist => "scientist",
            Role::Labeler => "labeler",
            Role::Reviewer => "reviewer",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::Client => "client",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role `{s}` (roles: {})",
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// User name.
    pub name: String,
    /// Roles held.
    pub roles: Vec<Role>,
    /// Whether the account is disabled.
    pub disabled: bool,
}

/// Every action of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Action {
    AddUser,
    DisableUser,
    EnableUser,
    ChangeRoles,
    RotateToken,
    ListUsers,
    CheckPolicy,
    ExplainPolicy,
    ListDatasets,
    ListPlugins,
    AddPlugin,
    ImportDataset,
    ViewStats,
    ExportDataset,
    ViewRecord,
    LabelRecord,
    ApprovePlugin,
    WithdrawApproval,
    RunPlugin,
    TrainModel,
    ViewModel,
    RequestRelease,
    ApproveRelease,
    RejectRelease,
    ExportModel,
    ReadAudit,
    VerifyAudit,
    CheckpointAudit,
    ReadPluginLog,
    RunJob,
    ListJobs,
    ViewJob,
    CancelJob,
    ReassignLabels,
    ListDeployments,
    ViewDeployment,
    ManageDeployment,
    DeployModel,
    Predict,
    SendFeedback,
    CaptureData,
    RouteTraffic,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 42] = [
        Action::AddUser,
        Action::DisableUser,
        Action::EnableUser,
        Action::ChangeRoles,
        Action::RotateToken,
        Action::ListUsers,
        Action::CheckPolicy,
        Action::ExplainPolicy,
        Action::ListDatasets,
        Action::ListPlugins,
        Action::AddPlugin,
        Action::ImportDataset,
        Action::ViewStats,
        Action::ExportDataset,
        Action::ViewRecord,
        Action::LabelRecord,
        Action::ApprovePlugin,
        Action::WithdrawApproval,
        Action::RunPlugin,
        Action::TrainModel,
        Action::ViewModel,
        Action::RequestRelease,
        Action::ApproveRelease,
        Action::RejectRelease,
        Action::ExportModel,
        Action::ReadAudit,
        Action::VerifyAudit,
        Action::CheckpointAudit,
        Action::ReadPluginLog,
        Action::RunJob,
        Action::ListJobs,
        Action::ViewJob,
        Action::CancelJob,
        Action::ReassignLabels,
        Action::ListDeployments,
        Action::ViewDeployment,
        Action::ManageDeployment,
        Action::DeployModel,
        Action::Predict,
        Action::SendFeedback,
        Action::CaptureData,
        Action::RouteTraffic,
    ];

    /// The action's id in the schema.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::AddUser => "add_user",
            Action::DisableUser => "disable_user",
            Action::EnableUser => "enable_user",
            Action::ChangeRoles => "change_roles",
            Action::RotateToken => "rotate_token",
            Action::ListUsers => "list_users",
            Action::CheckPolicy => "check_policy",
            Action::ExplainPolicy => "explain_policy",
            Action::ListDatasets => "list_datasets",
            Action::ListPlugins => "list_plugins",
            Action::AddPlugin => "add_plugin",
            Action::ImportDataset => "import_dataset",
            Action::ViewStats => "view_stats",
            Action::ExportDataset => "export_dataset",
            Action::ViewRecord => "view_record",
            Action::LabelRecord => "label_record",
            Action::ApprovePlugin => "approve_plugin",
            Action::WithdrawApproval => "withdraw_approval",
            Action::RunPlugin => "run_plugin",
            Action::TrainModel => "train_model",
            Action::ViewModel => "view_model",
            Action::RequestRelease => "request_release",
            Action::ApproveRelease => "approve_release",
            Action::RejectRelease => "reject_release",
            Action::ExportModel => "export_model",
            Action::ReadAudit => "read_audit",
            Action::VerifyAudit => "verify_audit",
            Action::CheckpointAudit => "checkpoint_audit",
            Action::ReadPluginLog => "read_plugin_log",
            Action::RunJob => "run_job",
            Action::ListJobs => "list_jobs",
            Action::ViewJob => "view_job",
            Action::CancelJob => "cancel_job",
            Action::ReassignLabels => "reassign_labels",
            Action::ListDeployments => "list_deployments",
            Action::ViewDeployment => "view_deployment",
            Action::ManageDeployment => "manage_deployment",
            Action::DeployModel => "deploy_model",
            Action::Predict => "predict",
            Action::SendFeedback => "send_feedback",
            Action::CaptureData => "capture_data",
            Action::RouteTraffic => "route_traffic",
        }
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action `{s}`"))
    }
}

/// What an operation acts on, with the attributes policies may test.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// The environment.
    Environment,
    /// A user's account (what account administration acts on), by user
    /// name.
    Account {
        /// The user's name.
        name: String,
    },
    /// A dataset by name.
    Dataset {
        /// Dataset name.
        name: String,
    },
    /// One record.
    Record {
        /// Its dataset.
        dataset: String,
        /// Its id.
        id: String,
        /// The labeler it is assigned to, if any.
        assignee: Option<String>,
    },
    /// A plugin by digest.
    Plugin {
        /// Hex SHA-256 of its bytes.
        digest: String,
        /// Whether a reviewer approved this digest.
        approved: bool,
        /// Who added it.
        added_by: String,
    },
    /// A model.
    Model {
        /// Model id.
        id: String,
        /// Whether a release was requested.
        release_requested: bool,
        /// Whether the release was approved.
        release_approved: bool,
        /// Who requested the release.
        requested_by: Option<String>,
        /// What the disclosure report found.
        disclosure: DisclosureFacts,
    },
    /// An active-learning job.
    Job {
        /// Job id.
        id: String,
        /// Who started it.
        started_by: String,
    },
    /// The audit log.
    AuditLog,
    /// A deployment (a named prediction endpoint).
    Deployment {
        /// Its name.
        name: String,
        /// The client accounts it serves.
        clients: Vec<String>,
    },
    /// Traffic a routing change gives a model of a deployment.
    Traffic {
        /// The deployment.
        deployment: String,
        /// The model.
        model: String,
        /// The largest share the change gives it, in basis points.
        weight: i64,
        /// Its regression report's standing against the current champion:
        /// `pass`, `fail`, `stale`, `damaged` or `none`.
        regression: String,
    },
}

/// What the policies read of a model's disclosure report
/// (docs/disclosure.md, docs/policies.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DisclosureFacts {
    /// The verdict: `pass`, `pass-after-pruning`, `fail`, or `none` when
    /// the model has no report.
    pub verdict: String,
    /// Whether the membership-inference attack crossed a flag threshold
    /// (mean AUC or share of significant repetitions), failing or not.
    pub membership_flagged: bool,
    /// The attack's mean AUC in thousandths (Cedar has integers only);
    /// 0 when there is no report.
    pub membership_auc_milli: i64,
    /// Input rows fewer than `k` training records support that held
    /// weights, zeroed in the released copy.
    pub disclosive_rows: i64,
}

impl DisclosureFacts {
    /// A model without a report (or one not known yet).
    pub fn none() -> Self {
        Self {
            verdict: "none".into(),
            membership_flagged: false,
            membership_auc_milli: 0,
            disclosive_rows: 0,
        }
    }
}

impl Resource {
    /// A model known by its id only (before it exists, or before its
    /// manifest is read): nothing requested, approved or checked.
    pub fn bare_model(id: &str) -> Self {
        Resource::Model {
            id: id.into(),
            release_requested: false,
            release_approved: false,
            requested_by: None,
            disclosure: DisclosureFacts::none(),
        }
    }

    /// The Cedar entity uid, as text (`Dataset::"spam"`), which is also how
    /// the audit log names the resource.
    pub fn uid_text(&self) -> String {
        let (ty, id) = self.type_and_id();
        format!("{ty}::{}", quote(&id))
    }

    /// The schema's entity type of this resource (`Dataset`, `Model`, …).
    pub fn type_name(&self) -> &'static str {
        self.type_and_id().0
    }

    fn type_and_id(&self) -> (&'static str, String) {
        match self {
            Resource::Environment => ("Environment", "main".into()),
            Resource::Account { name } => ("Account", name.clone()),
            Resource::Dataset { name } => ("Dataset", name.clone()),
            Resource::Record { dataset, id, .. } => ("Record", format!("{dataset}/{id}")),
            Resource::Plugin { digest, .. } => ("Plugin", digest.clone()),
            Resource::Model { id, .. } => ("Model", id.clone()),
            Resource::Job { id, .. } => ("Job", id.clone()),
            Resource::AuditLog => ("AuditLog", "main".into()),
            Resource::Deployment { name, .. } => ("Deployment", name.clone()),
            Resource::Traffic {
                deployment, model, ..
            } => ("Traffic", format!("{deployment}/{model}")),
        }
    }
}

/// The entity uid text (`Account::"ana"`, as audit entries name their
/// resource) of a resource written as the command line writes it:
/// `env`, `audit`, `account:NAME`, `dataset:NAME`, `record:DATASET/ID`,
/// `plugin:DIGEST`, `model:ID`, `job:ID`, `deployment:NAME`,
/// `traffic:DEPLOYMENT/MODEL`; a uid given as such (`Model::"m-1"`) is
/// taken as it is.
pub fn uid_of(text: &str) -> Result<String, String> {
    if let Some((ty, id)) = text.split_once("::")
        && ty.chars().all(|c| c.is_ascii_alphabetic())
        && id.len() >= 2
        && id.starts_with('"')
        && id.ends_with('"')
    {
        return Ok(text.to_string());
    }
    let (kind, id) = text.split_once(':').unwrap_or((text, ""));
    let ty = match (kind, id.is_empty()) {
        ("env", true) => return Ok(Resource::Environment.uid_text()),
        ("audit", true) => return Ok(Resource::AuditLog.uid_text()),
        ("account", false) => "Account",
        ("dataset", false) => "Dataset",
        ("record", false) => "Record",
        ("plugin", false) => "Plugin",
        ("model", false) => "Model",
        ("job", false) => "Job",
        ("deployment", false) => "Deployment",
        ("traffic", false) => "Traffic",
        _ => {
            return Err(format!(
                "resource `{}`: use env, audit, account:NAME, dataset:NAME, record:DATASET/ID, plugin:DIGEST, model:ID, job:ID, deployment:NAME or traffic:DEPLOYMENT/MODEL (or a uid such as Model::\"ID\")",
                crate::text::neutralize(text)
            ));
        }
    };
    Ok(format!("{ty}::{}", quote(id)))
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"?\"".into())
}

/// A decision with its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Ids of the policies that decided: the matching permits when allowed,
    /// the matching forbids when a forbid denied, empty when nothing
    /// permitted (deny by default).
    pub policies: Vec<String>,
    /// Evaluation errors (a policy that errored is skipped, which can only
    /// turn an allow into a deny).
    pub errors: Vec<String>,
}

/// A loaded, validated policy set with its schema.
#[derive(Debug)]
pub struct PolicyEngine {
    schema: Schema,
    policies: PolicySet,
    texts: HashMap<String, String>,
    authorizer: Authorizer,
    decisions: DecisionCache,
}

/// Everything a decision depends on. The policy set and schema are fixed
/// for the life of a [`PolicyEngine`], and [`PolicyEngine::authorize`]
/// builds its Cedar entities and context from these values alone (no time,
/// no store lookups), so equal keys always get equal decisions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    name: String,
    roles: Vec<Role>,
    disabled: bool,
    action: Action,
    resource: Resource,
    channel: String,
}

impl DecisionKey {
    fn new(principal: &Principal, action: Action, resource: &Resource, channel: &str) -> Self {
        let mut roles = principal.roles.clone();
        roles.sort();
        roles.dedup();
        Self {
            name: principal.name.clone(),
            roles,
            disabled: principal.disabled,
            action,
            resource: resource.clone(),
            channel: channel.to_string(),
        }
    }

    /// Bytes of text the key holds: keys built from long user-supplied
    /// names are not cached, so the cache's memory stays bounded.
    fn text_len(&self) -> usize {
        let r = match &self.resource {
            Resource::Environment | Resource::AuditLog => 0,
            Resource::Dataset { name } | Resource::Account { name } => name.len(),
            Resource::Record {
                dataset,
                id,
                assignee,
            } => dataset.len() + id.len() + assignee.as_ref().map_or(0, String::len),
            Resource::Plugin {
                digest, added_by, ..
            } => digest.len() + added_by.len(),
            Resource::Model {
                id,
                requested_by,
                disclosure,
                ..
            } => id.len() + requested_by.as_ref().map_or(0, String::len) + disclosure.verdict.len(),
            Resource::Job { id, started_by } => id.len() + started_by.len(),
            Resource::Deployment { name, clients } => {
                name.len() + clients.iter().map(String::len).sum::<usize>()
            }
            Resource::Traffic {
                deployment,
                model,
                regression,
                ..
            } => deployment.len() + model.len() + regression.len(),
        };
        self.name.len() + self.channel.len() + r
    }
}

/// Memoized decisions. Building the Cedar entities and evaluating every
/// policy costs tens of microseconds, and a console serves the same few
/// (user, action, resource) triples over and over. Bounded: at most
/// [`DecisionCache::CAPACITY`] entries of at most [`DecisionCache::MAX_KEY`]
/// bytes of text each; when full it starts over.
#[derive(Debug, Default)]
struct DecisionCache {
    map: Mutex<HashMap<DecisionKey, Authorization>>,
}

impl DecisionCache {
    const CAPACITY: usize = 4096;
    const MAX_KEY: usize = 512;

    fn get(&self, key: &DecisionKey) -> Option<Authorization> {
        self.map.lock().ok()?.get(key).cloned()
    }

    fn put(&self, key: DecisionKey, decision: &Authorization) {
        if key.text_len() > Self::MAX_KEY {
            return;
        }
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= Self::CAPACITY {
                map.clear();
            }
            map.insert(key, decision.clone());
        }
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let ty = EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let upto = &text[..offset.min(text.len())];
    let line = upto.matches('\n').count() + 1;
    let column = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn diag_error(file: &str, text: &str, d: &dyn Diagnostic, message: String) -> PolicyError {
    let offset = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .unwrap_or(0);
    let (line, column) = line_col(text, offset);
    let help = d.help().map(|h| format!(" ({h})")).unwrap_or_default();
    PolicyError::Invalid {
        file: file.to_string(),
        line,
        column,
        message: format!("{message}{help}"),
    }
}

impl PolicyEngine {
    /// The policies built into this binary.
    pub fn builtin() -> Result<Self, PolicyError> {
        Self::load(
            DEFAULT_SCHEMA,
            &[("default.cedar".into(), DEFAULT_POLICIES.into())],
        )
    }

    /// Parses the schema and every policy file and validates the set
    /// strictly against the schema. Every policy needs a unique `@id`.
    pub fn load(schema_text: &str, files: &[(String, String)]) -> Result<Self, PolicyError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(schema_text)
            .map_err(|e| diag_error(SCHEMA_FILE, schema_text, &e, e.to_string()))?;
        let mut set = PolicySet::new();
        let mut texts = HashMap::new();
        let mut origin: HashMap<String, String> = HashMap::new();
        for (file, text) in files {
            let parsed = PolicySet::from_str(text).map_err(|e| {
                let first = e.iter().next();
                match first {
                    Some(d) => diag_error(file, text, d, d.to_string()),
                    None => diag_error(file, text, &e, e.to_string()),
                }
            })?;
            for policy in parsed.policies() {
                let Some(id) = policy.annotation("id").map(str::to_string) else {
                    let offset = text.find(&policy.to_string()).unwrap_or(0);
                    let (line, column) = line_col(text, offset);
                    return Err(PolicyError::Invalid {
                        file: file.clone(),
                        line,
                        column,
                        message: "this policy has no @id(\"…\") annotation".into(),
                    });
                };
                if let Some(other) = origin.get(&id) {
                    return Err(PolicyError::Set(format!(
                        "{file}: policy id `{id}` is already used in {other}"
                    )));
                }
                texts.insert(id.clone(), policy.to_string());
                origin.insert(id.clone(), file.clone());
                set.add(policy.new_id(PolicyId::new(&id)))
                    .map_err(|e| PolicyError::Set(format!("{file}: {e}")))?;
            }
            if parsed.templates().next().is_some() {
                return Err(PolicyError::Set(format!(
                    "{file}: policy templates are not supported"
                )));
            }
        }
        let validator = Validator::new(schema.clone());
        let result = validator.validate(&set, ValidationMode::Strict);
        if let Some(err) = result.validation_errors().next() {
            let id = err.policy_id().to_string();
            let file = origin.get(&id).cloned().unwrap_or_default();
            let text = files
                .iter()
                .find(|(f, _)| f == &file)
                .map(|(_, t)| t.as_str())
                .unwrap_or("");
            return Err(diag_error(
                &file,
                text,
                err,
                format!("policy `{id}`: {err}"),
            ));
        }
        Ok(Self {
            schema,
            policies: set,
            texts,
            authorizer: Authorizer::new(),
            decisions: DecisionCache::default(),
        })
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether there are no policies (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The text of policy `id`.
    pub fn policy_text(&self, id: &str) -> Option<&str> {
        self.texts.get(id).map(String::as_str)
    }

    /// Decides whether `principal` may perform `action` on `resource`.
    /// `channel` is how the request arrived ("cli" or "console"). Any
    /// failure to build the request denies (fail closed).
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        channel: &str,
    ) -> Authorization {
        let key = DecisionKey::new(principal, action, resource, channel);
        if let Some(hit) = self.decisions.get(&key) {
            return hit;
        }
        let decision = self.decide(principal, action, resource, channel);
        self.decisions.put(key, &decision);
        decision
    }

    /// The entity types the schema lets `action` apply to (`Dataset`,
    /// `Environment`, …): a request on any other type is refused by the
    /// schema before any policy is evaluated.
    pub fn resource_types(&self, action: Action) -> Vec<String> {
        let Ok(action) = uid("Action", action.as_str()) else {
            return Vec::new();
        };
        let mut types: Vec<String> = self
            .schema
            .resources_for_action(&action)
            .map(|types| types.map(ToString::to_string).collect())
            .unwrap_or_default();
        types.sort();
        types
    }

    /// [`PolicyEngine::authorize`] without the cache: builds the entities
    /// and evaluates the policy set.
    fn decide(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        channel: &str,
    ) -> Authorization {
        match self.try_authorize(principal, action, resource, channel) {
            Ok(a) => a,
            Err(e) => Authorization {
                allowed: false,
                policies: Vec::new(),
                errors: vec![e],
            },
        }
    }

    fn try_authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        channel: &str,
    ) -> Result<Authorization, String> {
        let mut entities = Vec::new();
        let puid = uid("User", &principal.name)?;
        let mut roles = HashSet::new();
        for role in Role::ALL {
            let r = uid("Role", role.as_str())?;
            entities.push(Entity::new_no_attrs(r.clone(), HashSet::new()));
            if principal.roles.contains(&role) {
                roles.insert(r);
            }
        }
        let user_entity =
            |name: &str, parents: HashSet<EntityUid>, disabled: bool| -> Result<Entity, String> {
                Entity::new(
                    uid("User", name)?,
                    HashMap::from([(
                        "disabled".to_string(),
                        RestrictedExpression::new_bool(disabled),
                    )]),
                    parents,
                )
                .map_err(|e| e.to_string())
            };
        entities.push(user_entity(&principal.name, roles, principal.disabled)?);
        let mut others = HashSet::new();
        let mut user_ref =
            |name: &str, entities: &mut Vec<Entity>| -> Result<RestrictedExpression, String> {
                if name != principal.name && others.insert(name.to_string()) {
                    entities.push(user_entity(name, HashSet::new(), false)?);
                }
                Ok(RestrictedExpression::new_entity_uid(uid("User", name)?))
            };
        let (ty, id) = resource.type_and_id();
        let ruid = uid(ty, &id)?;
        let mut attrs = HashMap::new();
        let mut parents = HashSet::new();
        match resource {
            Resource::Record {
                dataset, assignee, ..
            } => {
                let d = uid("Dataset", dataset)?;
                entities.push(Entity::new_no_attrs(d.clone(), HashSet::new()));
                parents.insert(d);
                if let Some(a) = assignee {
                    attrs.insert("assignee".into(), user_ref(a, &mut entities)?);
                }
            }
            Resource::Plugin {
                approved, added_by, ..
            } => {
                attrs.insert("approved".into(), RestrictedExpression::new_bool(*approved));
                attrs.insert("added_by".into(), user_ref(added_by, &mut entities)?);
            }
            Resource::Model {
                release_requested,
                release_approved,
                requested_by,
                disclosure,
                ..
            } => {
                attrs.insert(
                    "disclosure".into(),
                    RestrictedExpression::new_string(disclosure.verdict.clone()),
                );
                attrs.insert(
                    "membership_flagged".into(),
                    RestrictedExpression::new_bool(disclosure.membership_flagged),
                );
                attrs.insert(
                    "membership_auc_milli".into(),
                    RestrictedExpression::new_long(disclosure.membership_auc_milli),
                );
                attrs.insert(
                    "disclosive_rows".into(),
                    RestrictedExpression::new_long(disclosure.disclosive_rows),
                );
                attrs.insert(
                    "release_requested".into(),
                    RestrictedExpression::new_bool(*release_requested),
                );
                attrs.insert(
                    "release_approved".into(),
                    RestrictedExpression::new_bool(*release_approved),
                );
                if let Some(r) = requested_by {
                    attrs.insert("requested_by".into(), user_ref(r, &mut entities)?);
                }
            }
            Resource::Job { started_by, .. } => {
                attrs.insert("started_by".into(), user_ref(started_by, &mut entities)?);
            }
            Resource::Account { name } => {
                attrs.insert("user".into(), user_ref(name, &mut entities)?);
            }
            Resource::Deployment { clients, .. } => {
                let mut set = Vec::with_capacity(clients.len());
                for c in clients {
                    set.push(user_ref(c, &mut entities)?);
                }
                attrs.insert("clients".into(), RestrictedExpression::new_set(set));
            }
            Resource::Traffic {
                deployment,
                weight,
                regression,
                ..
            } => {
                attrs.insert(
                    "deployment".into(),
                    RestrictedExpression::new_string(deployment.clone()),
                );
                attrs.insert("weight".into(), RestrictedExpression::new_long(*weight));
                attrs.insert(
                    "regression".into(),
                    RestrictedExpression::new_string(regression.clone()),
                );
            }
            Resource::Environment | Resource::Dataset { .. } | Resource::AuditLog => {}
        }
        entities.push(Entity::new(ruid.clone(), attrs, parents).map_err(|e| e.to_string())?);
        let entities =
            Entities::from_entities(entities, Some(&self.schema)).map_err(|e| e.to_string())?;
        let context = Context::from_pairs([(
            "channel".to_string(),
            RestrictedExpression::new_string(channel.to_string()),
        )])
        .map_err(|e| e.to_string())?;
        let auid = uid("Action", action.as_str())?;
        let request = Request::new(puid, auid, ruid, context, Some(&self.schema))
            .map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &entities);
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|p| p.to_string())
            .collect();
        policies.sort();
        let errors = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        Ok(Authorization {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            policies,
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_set_loads_and_validates() {
        let engine = PolicyEngine::builtin().expect("builtin policies validate");
        assert!(engine.len() > 10);
        assert!(engine.policy_text("no-dataset-export").is_some());
    }

    #[test]
    fn cached_decisions_equal_fresh_ones() {
        let engine = PolicyEngine::builtin().expect("builtin policies validate");
        let resources = [
            Resource::Environment,
            Resource::AuditLog,
            Resource::Dataset { name: "d".into() },
            Resource::Record {
                dataset: "d".into(),
                id: "1".into(),
                assignee: Some("ann".into()),
            },
            Resource::Plugin {
                digest: "ab".into(),
                approved: true,
                added_by: "bob".into(),
            },
            Resource::Plugin {
                digest: "ab".into(),
                approved: false,
                added_by: "ann".into(),
            },
            Resource::Model {
                id: "m".into(),
                release_requested: true,
                release_approved: false,
                requested_by: Some("ann".into()),
                disclosure: DisclosureFacts::none(),
            },
            Resource::Job {
                id: "j".into(),
                started_by: "ann".into(),
            },
            Resource::Account { name: "ann".into() },
            Resource::Account { name: "bob".into() },
        ];
        let mut allowed = 0;
        for role in Role::ALL {
            for disabled in [false, true] {
                let who = Principal {
                    name: "ann".into(),
                    roles: vec![role],
                    disabled,
                };
                for action in Action::ALL {
                    for resource in &resources {
                        for channel in ["cli", "console"] {
                            let fresh = engine.decide(&who, action, resource, channel);
                            // First call fills the cache, second reads it.
                            for _ in 0..2 {
                                let got = engine.authorize(&who, action, resource, channel);
                                assert_eq!(got, fresh, "{who:?} {action:?} {resource:?}");
                            }
                            allowed += usize::from(fresh.allowed);
                        }
                    }
                }
            }
        }
        // The matrix is not trivially all-deny.
        assert!(allowed > 20, "{allowed}");
        // A disabled user or another role is a different key.
        let admin = Principal {
            name: "ann".into(),
            roles: vec![Role::Admin],
            disabled: false,
        };
        let off = Principal {
            disabled: true,
            ..admin.clone()
        };
        let bob = Resource::Account { name: "bob".into() };
        let a = engine.authorize(&admin, Action::AddUser, &bob, "cli");
        let b = engine.authorize(&off, Action::AddUser, &bob, "cli");
        assert!(a.allowed && !b.allowed);
    }

    #[test]
    fn resources_written_as_on_the_command_line_are_the_logs_uids() {
        assert_eq!(uid_of("account:ana").unwrap(), "Account::\"ana\"");
        assert_eq!(uid_of("env").unwrap(), "Environment::\"main\"");
        assert_eq!(uid_of("record:spam/r1").unwrap(), "Record::\"spam/r1\"");
        assert_eq!(uid_of("Model::\"m-1\"").unwrap(), "Model::\"m-1\"");
        assert_eq!(
            uid_of("model:m-1").unwrap(),
            Resource::Model {
                id: "m-1".into(),
                release_requested: false,
                release_approved: false,
                requested_by: None,
                disclosure: DisclosureFacts::none(),
            }
            .uid_text()
        );
        for bad in ["", "account:", "env:x", "nope:x", "Model::m-1"] {
            assert!(uid_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_decision_cache_stays_bounded() {
        let engine = PolicyEngine::builtin().expect("builtin policies validate");
        let who = Principal {
            name: "ann".into(),
            roles: vec![Role::Scientist],
            disabled: false,
        };
        for i in 0..(DecisionCache::CAPACITY + 10) {
            let r = Resource::Dataset {
                name: format!("d{i}"),
            };
            engine.authorize(&who, Action::ViewStats, &r, "cli");
        }
        let long = Resource::Dataset {
            name: "x".repeat(DecisionCache::MAX_KEY + 1),
        };
        let d = engine.authorize(&who, Action::ViewStats, &long, "cli");
        assert_eq!(d, engine.decide(&who, Action::ViewStats, &long, "cli"));
        let len = engine.decisions.map.lock().map(|m| m.len()).unwrap_or(0);
        assert!(len <= DecisionCache::CAPACITY, "{len}");
        assert!(len > 0);
    }

    #[test]
    fn a_syntax_error_names_file_line_and_column() {
        let bad =
            "@id(\"x\")\npermit (principal, action, resource)\nwhen { principal.disabled == };\n";
        let err = PolicyEngine::load(DEFAULT_SCHEMA, &[("mine.cedar".into(), bad.into())])
            .expect_err("bad syntax");
        let text = err.to_string();
        assert!(text.starts_with("mine.cedar:3:"), "{text}");
    }

    #[test]
    fn a_policy_that_does_not_fit_the_schema_is_refused_with_its_place() {
        let bad = "@id(\"ok\")\npermit (principal, action == Action::\"list_users\", resource);\n\n@id(\"typo\")\npermit (principal, action == Action::\"view_stats\", resource)\nwhen { principal.is_boss };\n";
        let err = PolicyEngine::load(DEFAULT_SCHEMA, &[("mine.cedar".into(), bad.into())])
            .expect_err("invalid attribute");
        let text = err.to_string();
        assert!(text.starts_with("mine.cedar:6:"), "{text}");
        assert!(text.contains("typo"), "{text}");
    }

    #[test]
    fn policies_without_ids_or_with_duplicate_ids_are_refused() {
        let no_id = "permit (principal, action, resource);";
        let err = PolicyEngine::load(DEFAULT_SCHEMA, &[("a.cedar".into(), no_id.into())])
            .expect_err("no id");
        assert!(err.to_string().contains("a.cedar:1:1"), "{err}");
        let one = "@id(\"same\")\npermit (principal, action == Action::\"list_users\", resource);";
        let err = PolicyEngine::load(
            DEFAULT_SCHEMA,
            &[
                ("a.cedar".into(), one.into()),
                ("b.cedar".into(), one.into()),
            ],
        )
        .expect_err("duplicate");
        assert!(err.to_string().contains("already used in a.cedar"), "{err}");
    }
}
