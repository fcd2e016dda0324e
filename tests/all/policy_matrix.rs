//! Role × action × resource against the expected decision, for the default
//! policy set.

use cloister_host::policy::{Action, DisclosureFacts, PolicyEngine, Principal, Resource, Role};

fn principal(role: Role) -> Principal {
    Principal {
        name: format!("u-{}", role.as_str()),
        roles: vec![role],
        disabled: false,
    }
}

fn plugin(approved: bool, added_by: &str) -> Resource {
    Resource::Plugin {
        digest: "ab".repeat(32),
        approved,
        added_by: added_by.into(),
    }
}

fn model(requested: bool, approved: bool, by: Option<&str>) -> Resource {
    model_checked(requested, approved, by, "pass")
}

fn model_checked(requested: bool, approved: bool, by: Option<&str>, disclosure: &str) -> Resource {
    Resource::Model {
        id: "m1".into(),
        release_requested: requested,
        release_approved: approved,
        requested_by: by.map(str::to_string),
        disclosure: DisclosureFacts {
            verdict: disclosure.into(),
            membership_flagged: false,
            membership_auc_milli: 520,
            disclosive_rows: 0,
        },
    }
}

fn record(assignee: Option<&str>) -> Resource {
    Resource::Record {
        dataset: "ds".into(),
        id: "r1".into(),
        assignee: assignee.map(str::to_string),
    }
}

fn deployment(clients: &[&str]) -> Resource {
    Resource::Deployment {
        name: "d1".into(),
        clients: clients.iter().map(|c| c.to_string()).collect(),
    }
}

fn account(name: &str) -> Resource {
    Resource::Account { name: name.into() }
}

fn job(started_by: &str) -> Resource {
    Resource::Job {
        id: "j-1".into(),
        started_by: started_by.into(),
    }
}

/// (action, resource for principal `me`, roles expected to be allowed)
fn cases(me: &str) -> Vec<(Action, Resource, &'static [Role])> {
    use Action as A;
    use Role::*;
    let ds = || Resource::Dataset { name: "ds".into() };
    vec![
        (A::AddUser, account("someone-else"), &[Admin]),
        (A::DisableUser, account("someone-else"), &[Admin]),
        (A::DisableUser, account(me), &[Admin]),
        (A::EnableUser, account("someone-else"), &[Admin]),
        (A::ChangeRoles, account("someone-else"), &[Admin]),
        (A::ChangeRoles, account(me), &[Admin]),
        (A::RotateToken, account("someone-else"), &[Admin]),
        (
            A::RotateToken,
            account(me),
            &[
                Admin, Scientist, Labeler, Reviewer, Approver, Auditor, Operator,
            ],
        ),
        (A::ListUsers, Resource::Environment, &[Admin, Auditor]),
        (A::CheckPolicy, Resource::Environment, &[Admin, Auditor]),
        (A::ExplainPolicy, Resource::Environment, &[Admin, Auditor]),
        (
            A::ListDatasets,
            Resource::Environment,
            &[
                Admin, Scientist, Labeler, Reviewer, Approver, Auditor, Operator,
            ],
        ),
        (
            A::ListPlugins,
            Resource::Environment,
            &[Admin, Scientist, Reviewer],
        ),
        (A::AddPlugin, Resource::Environment, &[Scientist, Reviewer]),
        (A::ImportDataset, ds(), &[Scientist]),
        (
            A::ViewStats,
            ds(),
            &[Admin, Scientist, Reviewer, Approver, Auditor, Operator],
        ),
        (A::ExportDataset, ds(), &[]),
        (A::ViewRecord, record(Some(me)), &[Labeler]),
        (A::LabelRecord, record(Some(me)), &[Labeler]),
        (A::ViewRecord, record(Some("someone-else")), &[]),
        (A::ViewRecord, record(None), &[]),
        (A::LabelRecord, record(None), &[]),
        (A::ApprovePlugin, plugin(false, "someone-else"), &[Reviewer]),
        (A::ApprovePlugin, plugin(false, me), &[]),
        (
            A::WithdrawApproval,
            plugin(true, "someone-else"),
            &[Admin, Reviewer],
        ),
        (A::WithdrawApproval, plugin(true, me), &[Admin, Reviewer]),
        (A::RunPlugin, plugin(true, "someone-else"), &[Scientist]),
        (A::RunPlugin, plugin(false, me), &[]),
        (A::TrainModel, model(false, false, None), &[Scientist]),
        (
            A::ViewModel,
            model(false, false, None),
            &[Scientist, Approver],
        ),
        (A::RequestRelease, model(false, false, None), &[Scientist]),
        (
            A::ApproveRelease,
            model(true, false, Some("someone-else")),
            &[Approver],
        ),
        (A::ApproveRelease, model(true, false, Some(me)), &[]),
        (A::ApproveRelease, model(false, false, None), &[]),
        (A::RejectRelease, model(true, false, Some(me)), &[Approver]),
        (A::RejectRelease, model(false, false, None), &[]),
        (
            A::ExportModel,
            model(true, true, Some("someone-else")),
            &[Scientist, Approver],
        ),
        (
            A::ExportModel,
            model(true, false, Some("someone-else")),
            &[],
        ),
        // The disclosure gate: approval and export need a passing report;
        // rejecting does not.
        (
            A::ApproveRelease,
            model_checked(true, false, Some("someone-else"), "pass-after-pruning"),
            &[Approver],
        ),
        (
            A::ApproveRelease,
            model_checked(true, false, Some("someone-else"), "fail"),
            &[],
        ),
        (
            A::ApproveRelease,
            model_checked(true, false, Some("someone-else"), "none"),
            &[],
        ),
        (
            A::RejectRelease,
            model_checked(true, false, Some("someone-else"), "fail"),
            &[Approver],
        ),
        (
            A::ExportModel,
            model_checked(true, true, Some("someone-else"), "fail"),
            &[],
        ),
        (
            A::ExportModel,
            model_checked(true, true, Some("someone-else"), "none"),
            &[],
        ),
        (A::RunJob, ds(), &[Scientist]),
        (
            A::ListJobs,
            Resource::Environment,
            &[Admin, Scientist, Reviewer, Approver, Auditor],
        ),
        (
            A::ViewJob,
            job("someone-else"),
            &[Admin, Scientist, Reviewer, Approver, Auditor],
        ),
        (
            A::CancelJob,
            job(me),
            &[
                Admin, Scientist, Labeler, Reviewer, Approver, Auditor, Operator,
            ],
        ),
        (A::CancelJob, job("someone-else"), &[Admin]),
        (
            A::ReassignLabels,
            job(me),
            &[
                Admin, Scientist, Labeler, Reviewer, Approver, Auditor, Operator,
            ],
        ),
        (A::ReassignLabels, job("someone-else"), &[Admin]),
        (A::ReadAudit, Resource::AuditLog, &[Admin, Auditor]),
        (A::VerifyAudit, Resource::AuditLog, &[Admin, Auditor]),
        (A::CheckpointAudit, Resource::AuditLog, &[Admin, Auditor]),
        (A::ReadPluginLog, Resource::Environment, &[Admin]),
        // Deployments: operators run them, the project sees them, a client
        // calls the deployments that name it and does nothing else.
        (
            A::ListDeployments,
            Resource::Environment,
            &[Admin, Scientist, Approver, Auditor, Operator],
        ),
        (
            A::ViewDeployment,
            deployment(&[]),
            &[Admin, Scientist, Approver, Auditor, Operator],
        ),
        (A::ManageDeployment, deployment(&[me]), &[Operator]),
        (
            A::DeployModel,
            model(true, true, Some("someone-else")),
            &[Operator],
        ),
        (
            A::DeployModel,
            model_checked(true, true, Some("someone-else"), "pass-after-pruning"),
            &[Operator],
        ),
        (
            A::DeployModel,
            model(true, false, Some("someone-else")),
            &[],
        ),
        (
            A::DeployModel,
            model_checked(true, true, Some("someone-else"), "fail"),
            &[],
        ),
        (A::Predict, deployment(&[me]), &[Client]),
        (A::Predict, deployment(&["someone-else"]), &[]),
        (A::Predict, deployment(&[]), &[]),
        (A::SendFeedback, deployment(&[me]), &[Client]),
        (A::SendFeedback, deployment(&["someone-else"]), &[]),
        (A::CaptureData, ds(), &[Operator]),
        // More than 5% of the traffic only with a passing regression
        // report against the current champion.
        (A::RouteTraffic, traffic(500, "none"), &[Operator]),
        (A::RouteTraffic, traffic(501, "pass"), &[Operator]),
        (A::RouteTraffic, traffic(10_000, "pass"), &[Operator]),
        (A::RouteTraffic, traffic(501, "none"), &[]),
        (A::RouteTraffic, traffic(2_500, "fail"), &[]),
        (A::RouteTraffic, traffic(2_500, "stale"), &[]),
        (A::RouteTraffic, traffic(10_000, "damaged"), &[]),
    ]
}

fn traffic(weight: i64, regression: &str) -> Resource {
    Resource::Traffic {
        deployment: "d1".into(),
        model: "m2".into(),
        weight,
        regression: regression.into(),
    }
}

#[test]
fn every_role_action_and_resource_gets_the_expected_decision() {
    let engine = PolicyEngine::builtin().unwrap();
    let mut covered = std::collections::HashSet::new();
    let mut checked = 0;
    for role in Role::ALL {
        let p = principal(role);
        for (action, resource, allowed) in cases(&p.name) {
            covered.insert(action);
            let got = engine.authorize(&p, action, &resource, "cli");
            assert!(
                got.errors.is_empty(),
                "{role:?} {action:?}: {:?}",
                got.errors
            );
            assert_eq!(
                got.allowed,
                allowed.contains(&role),
                "{} {} {} → {:?}",
                role.as_str(),
                action.as_str(),
                resource.uid_text(),
                got.policies
            );
            checked += 1;
        }
    }
    assert_eq!(
        covered.len(),
        Action::ALL.len(),
        "every action is in the matrix"
    );
    assert_eq!(checked, Role::ALL.len() * cases("x").len());
}

#[test]
fn no_role_combination_exports_a_dataset_and_disabled_users_do_nothing() {
    let engine = PolicyEngine::builtin().unwrap();
    // Every role but `client`, which a user cannot combine with others.
    let everything = Principal {
        name: "boss".into(),
        roles: Role::ALL
            .into_iter()
            .filter(|r| *r != Role::Client)
            .collect(),
        disabled: false,
    };
    // Were it combined anyway, the account could only call `predict` and
    // send feedback.
    let client_too = Principal {
        roles: Role::ALL.to_vec(),
        ..everything.clone()
    };
    for action in Action::ALL {
        if action == Action::Predict || action == Action::SendFeedback {
            continue;
        }
        for resource in [
            Resource::Environment,
            Resource::Dataset { name: "ds".into() },
            Resource::AuditLog,
            deployment(&["boss"]),
        ] {
            let got = engine.authorize(&client_too, action, &resource, "cli");
            assert!(!got.allowed, "{action:?} {resource:?}");
        }
    }
    assert!(
        engine
            .authorize(&client_too, Action::Predict, &deployment(&["boss"]), "cli")
            .allowed
    );
    let ds = Resource::Dataset { name: "ds".into() };
    let got = engine.authorize(&everything, Action::ExportDataset, &ds, "console");
    assert!(!got.allowed);
    assert_eq!(got.policies, ["no-dataset-export"]);

    let disabled = Principal {
        disabled: true,
        ..everything
    };
    for action in Action::ALL {
        for resource in [Resource::Environment, ds.clone(), Resource::AuditLog] {
            assert!(
                !engine
                    .authorize(&disabled, action, &resource, "cli")
                    .allowed,
                "{action:?}"
            );
        }
    }
}

#[test]
fn a_permit_added_for_export_cannot_override_the_forbid() {
    let extra = "@id(\"let-admins-export\")\npermit (principal in Role::\"admin\", action == Action::\"export_dataset\", resource);\n";
    let engine = PolicyEngine::load(
        cloister_host::policy::DEFAULT_SCHEMA,
        &[
            (
                "default.cedar".into(),
                cloister_host::policy::DEFAULT_POLICIES.into(),
            ),
            ("local.cedar".into(), extra.into()),
        ],
    )
    .unwrap();
    let got = engine.authorize(
        &principal(Role::Admin),
        Action::ExportDataset,
        &Resource::Dataset { name: "ds".into() },
        "cli",
    );
    assert!(!got.allowed);
    assert_eq!(got.policies, ["no-dataset-export"]);
}
