//! The OpenAPI 3.1 document of `/api`, served at `/api/openapi.json`. The
//! route table below is the one list of API routes the documentation is
//! built from; the router tests call every entry and check that the router
//! answers it (and that nothing else under `/api` answers).

use serde_json::{Value, json};

/// (method, path, summary, request body schema, success status).
pub(crate) const ROUTES: &[(&str, &str, &str, Option<&str>, u16)] = &[
    ("get", "/api/openapi.json", "This document", None, 200),
    (
        "post",
        "/api/login",
        "Log in with a password; sets the session cookie and returns the CSRF token",
        Some("Login"),
        200,
    ),
    ("post", "/api/logout", "End the session", None, 204),
    (
        "get",
        "/api/me",
        "The caller, their roles and (for sessions) the CSRF token",
        None,
        200,
    ),
    ("get", "/api/datasets", "Dataset versions", None, 200),
    (
        "get",
        "/api/datasets/{name}",
        "Aggregate statistics of a dataset (never rows); `seed` adds split counts",
        None,
        200,
    ),
    (
        "get",
        "/api/datasets/{name}/export",
        "Dataset export: always denied and audited",
        None,
        403,
    ),
    ("get", "/api/plugins", "Registered plugins", None, 200),
    (
        "post",
        "/api/plugins",
        "Add a component (request body: the .wasm bytes); it is inspected and registered unapproved",
        Some("Wasm"),
        200,
    ),
    (
        "post",
        "/api/plugins/{digest}/approve",
        "Approve a plugin digest (a reviewer who did not add it)",
        None,
        200,
    ),
    (
        "post",
        "/api/plugins/{digest}/withdraw",
        "Withdraw a plugin digest's approval (reviewers and admins): it runs nowhere until approved again",
        None,
        200,
    ),
    ("get", "/api/templates", "Training templates", None, 200),
    (
        "post",
        "/api/train",
        "Train a model in the background; returns the task id",
        Some("Train"),
        200,
    ),
    (
        "get",
        "/api/tasks/{id}",
        "A background task of the caller: state, progress lines, result",
        None,
        200,
    ),
    ("get", "/api/jobs", "Active-learning jobs", None, 200),
    (
        "post",
        "/api/jobs",
        "Start an active-learning pipeline (TOML spec) and run it in the background",
        Some("Job"),
        200,
    ),
    (
        "get",
        "/api/jobs/{id}",
        "A job: state, rounds, result",
        None,
        200,
    ),
    (
        "get",
        "/api/jobs/{id}/stats",
        "A job's label statistics and cost saved",
        None,
        200,
    ),
    (
        "post",
        "/api/jobs/{id}/resume",
        "Resume a job in the background",
        None,
        200,
    ),
    (
        "post",
        "/api/jobs/{id}/cancel",
        "Cancel a job (owner or admin)",
        None,
        200,
    ),
    (
        "post",
        "/api/jobs/{id}/reassign",
        "Move a labeler's open items to another labeler, who also takes their place in later rounds (owner or admin)",
        Some("Reassign"),
        200,
    ),
    (
        "get",
        "/api/models",
        "Models the caller may view",
        None,
        200,
    ),
    (
        "get",
        "/api/models/{id}",
        "A model: metrics, evaluation, curve, lineage, release state",
        None,
        200,
    ),
    (
        "post",
        "/api/models/{id}/request-release",
        "Request a release",
        Some("Reason"),
        200,
    ),
    (
        "post",
        "/api/models/{id}/approve-release",
        "Approve a requested release (not the requester)",
        None,
        200,
    ),
    (
        "post",
        "/api/models/{id}/reject-release",
        "Reject a requested release",
        None,
        200,
    ),
    (
        "get",
        "/api/models/{id}/bundle",
        "The signed bundle of an approved model",
        None,
        200,
    ),
    (
        "get",
        "/api/deployments",
        "Deployments the caller may view",
        None,
        200,
    ),
    (
        "post",
        "/api/deployments",
        "Create a deployment serving a released model to client accounts (operators)",
        Some("CreateDeployment"),
        200,
    ),
    (
        "post",
        "/api/deployments/{name}/change",
        "Change a deployment: set-weight, remove, shadow, promote, rollback, pause, resume, clients, ramp, stop-ramp, capture, keep-answers (operators; a weight above 5% needs a passing regression report)",
        Some("DeploymentChange"),
        200,
    ),
    (
        "get",
        "/api/deployments/{name}",
        "A deployment: champion, candidates, shadow, clients, history, and each variant's metrics over the last `minutes` (60)",
        None,
        200,
    ),
    (
        "post",
        "/api/deployments/{name}/predict",
        "Predict with a deployment (its client accounts only): records in, label and class probabilities out",
        Some("Predict"),
        200,
    ),
    (
        "post",
        "/api/deployments/{name}/feedback",
        "True labels for records the caller had predicted (the deployment's client accounts only): scored into online accuracy, and stored as labels of captured records",
        Some("Feedback"),
        200,
    ),
    (
        "post",
        "/api/deployments/{name}/test",
        "The regression gate: test a candidate against the champion on the freshest labeled data (or `dataset`); returns the signed report (operators)",
        Some("RegressionTest"),
        200,
    ),
    (
        "post",
        "/api/deployments/{name}/capture",
        "Write the deployment's waiting captured records as the next version of its capture dataset (operators)",
        None,
        200,
    ),
    (
        "get",
        "/api/labels/next",
        "The caller's next queued record with its text (audited per view)",
        None,
        200,
    ),
    (
        "post",
        "/api/labels",
        "Label a record queued for the caller",
        Some("Label"),
        200,
    ),
    (
        "get",
        "/api/labels/answers",
        "The caller's answers that can still change (their round has not collected them), the latest first",
        None,
        200,
    ),
    (
        "post",
        "/api/labels/change",
        "Change the caller's answer to a record until its round collects it (audited as a label)",
        Some("Label"),
        200,
    ),
    (
        "get",
        "/api/users",
        "Accounts: name, roles, disabled, created_ms (admins and auditors)",
        None,
        200,
    ),
    (
        "post",
        "/api/users",
        "Add an account (admins); returns it and its API token, shown once",
        Some("AddUser"),
        200,
    ),
    (
        "post",
        "/api/users/{name}/roles",
        "Grant or revoke roles (admins); the environment always keeps an active admin",
        Some("Roles"),
        200,
    ),
    (
        "post",
        "/api/users/{name}/disable",
        "Disable an account (admins); its token and sessions stop at once",
        None,
        200,
    ),
    (
        "post",
        "/api/users/{name}/enable",
        "Enable a disabled account with a new token, shown once (admins)",
        None,
        200,
    ),
    (
        "post",
        "/api/users/{name}/token",
        "A new API token, shown once; the old one stops at once (admins, and every user for themselves)",
        None,
        200,
    ),
    (
        "get",
        "/api/audit",
        "Audit entries, filtered (actor, action, decision) and paginated (from, limit)",
        None,
        200,
    ),
    (
        "get",
        "/api/audit/verify",
        "Verify the whole audit chain",
        None,
        200,
    ),
    (
        "get",
        "/api/audit/checkpoint",
        "A signed checkpoint of the audit log (text)",
        None,
        200,
    ),
    (
        "get",
        "/api/plugin-log",
        "The administrators' plugin log, newest first (admins only): what plugins wrote and the full detail of failed stages; `digest` filters by digest prefix, `limit` (default 50)",
        None,
        200,
    ),
];

fn schemas() -> Value {
    let s = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": true});
    json!({
        "Login": s(json!({"user": {"type": "string"}, "password": {"type": "string"}}), &["user", "password"]),
        "Train": s(json!({
            "dataset": {"type": "string"},
            "preprocess": {"type": "array", "items": {"type": "string"}},
            "features": {"type": "string"},
            "features_config": {"type": "object", "additionalProperties": {"type": "string"}},
            "template": {"type": "string"},
            "sets": {"type": "object", "additionalProperties": {"type": "string"}}
        }), &["dataset", "features", "template"]),
        "Job": s(json!({"spec": {"type": "string"}, "oracle": {"type": "string", "enum": ["gold", "none"]}}), &["spec"]),
        "Reason": s(json!({"reason": {"type": "string"}}), &["reason"]),
        "Label": s(json!({"id": {"type": "string"}, "label": {"type": "string"}, "job": {"type": "string"}}), &["id", "label"]),
        "AddUser": s(json!({
            "name": {"type": "string"},
            "roles": {"type": "array", "items": {"type": "string", "enum": ["admin", "scientist", "labeler", "reviewer", "approver", "auditor", "operator", "client"]}},
            "password": {"type": "string", "description": "console password, 12 to 256 characters (absent: API token only)"}
        }), &["name", "roles"]),
        "Roles": s(json!({
            "grant": {"type": "array", "items": {"type": "string"}},
            "revoke": {"type": "array", "items": {"type": "string"}}
        }), &[]),
        "Reassign": s(json!({"from": {"type": "string"}, "to": {"type": "string"}}), &["from", "to"]),
        "Error": s(json!({"error": {"type": "string"}}), &["error"]),
        "CreateDeployment": s(json!({
            "name": {"type": "string"},
            "model": {"type": "string"},
            "clients": {"type": "array", "items": {"type": "string"}}
        }), &["name", "model"]),
        "DeploymentChange": s(json!({
            "action": {"type": "string", "enum": ["set-weight", "remove", "shadow", "promote", "rollback", "pause", "resume", "clients", "ramp", "stop-ramp", "capture", "keep-answers"]},
            "dataset": {"type": "string", "description": "capture: the dataset (absent: stop capturing)"},
            "batch": {"type": "integer", "description": "capture: records per version"},
            "count": {"type": "integer", "description": "keep-answers: answers kept for feedback"},
            "model": {"type": "string"},
            "weight": {"type": "integer", "description": "basis points (1/100 %)"},
            "sample": {"type": "integer", "description": "basis points"},
            "clients": {"type": "array", "items": {"type": "string"}},
            "steps": {"type": "array", "items": {"type": "integer"}},
            "bake_ms": {"type": "integer"},
            "guards": {"type": "object", "properties": {
                "max_error_rate": {"type": "number"},
                "max_p99_ms": {"type": "number"},
                "min_agreement": {"type": "number"},
                "min_requests": {"type": "integer"},
                "max_accuracy_drop": {"type": "number"},
                "min_labels": {"type": "integer"}
            }}
        }), &["action"]),
        "Predict": s(json!({
            "key": {"type": "string"},
            "records": {"type": "array", "maxItems": 1000, "items": {"type": "object"}}
        }), &["records"]),
        "Feedback": s(json!({
            "labels": {"type": "array", "maxItems": 1000, "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "label": {"type": "string"}
            }, "required": ["id", "label"]}}
        }), &["labels"]),
        "RegressionTest": s(json!({
            "candidate": {"type": "string"},
            "dataset": {"type": "string"}
        }), &["candidate"]),
    })
}

fn params(path: &str) -> Vec<Value> {
    let mut out: Vec<Value> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    let query: &[(&str, &str)] = match path {
        "/api/datasets/{name}" => &[("seed", "integer")],
        "/api/deployments/{name}" => &[("minutes", "integer")],
        "/api/audit" => &[
            ("actor", "string"),
            ("action", "string"),
            ("decision", "string"),
            ("from", "integer"),
            ("limit", "integer"),
        ],
        _ => &[],
    };
    for (name, ty) in query {
        out.push(json!({"name": name, "in": "query", "required": false, "schema": {"type": ty}}));
    }
    out
}

/// The document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, body, status) in ROUTES {
        let mut op = json!({
            "summary": summary,
            "parameters": params(path),
            "responses": {
                status.to_string(): {"description": "success"},
                "400": {"description": "bad input (the message names what was wrong)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "401": {"description": "not authenticated"},
                "403": {"description": "denied by policy (audited), or a missing CSRF token"},
                "404": {"description": "no such object"},
            },
        });
        if *path != "/api/login" && *path != "/api/openapi.json" {
            op["security"] = json!([{"session": []}, {"token": []}]);
        }
        if let Some(b) = body {
            op["requestBody"] = if *b == "Wasm" {
                json!({"required": true, "content": {"application/wasm": {"schema": {"type": "string", "format": "binary"}}}})
            } else {
                json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}})
            };
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Cloister console API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Approved operations of a Cloister environment. Every request is authorized by the environment's policies and recorded in its audit log. Sessions (cookie) must send the CSRF token in X-CSRF-Token on POST; API tokens go in `Authorization: Bearer`."
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": crate::auth::COOKIE},
                "token": {"type": "http", "scheme": "bearer"}
            }
        }
    })
}
