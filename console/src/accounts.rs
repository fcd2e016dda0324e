//! Accounts: the page at `/users` and the routes under `/api/users`, over
//! the same `Cloister` account operations as `cloister user …` (each one
//! decided and audited there, on `Account::"NAME"`).
//!
//! A new token is shown once, in the response that made it, and nowhere
//! else: the page that shows it is not a redirect target and, like every
//! console response, is sent `Cache-Control: no-store`.

// A page handler answers either a page or an error page: both are
// responses, and axum takes either by value.
#![allow(clippy::result_large_err)]

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use cloister_host::policy::{Action, Resource, Role};
use cloister_host::users::User;

use crate::api::{Out, reader, to_json, writer};
use crate::html::{button, csrf, esc, table};
use crate::pages::{CsrfForm, Page, error_page, ok, poster, run, who};
use crate::{ApiError, Console, blocking};

type S = State<Arc<Console>>;

pub(crate) fn page_routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/users", get(users_page).post(add_from_form))
        .route("/users/{name}/roles", post(roles_from_form))
        .route("/users/{name}/{change}", post(change_from_form))
}

pub(crate) fn api_routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/api/users", get(list).post(add))
        .route("/api/users/{name}/roles", post(change_roles))
        .route("/api/users/{name}/disable", post(disable))
        .route("/api/users/{name}/enable", post(enable))
        .route("/api/users/{name}/token", post(token))
}

/// An account as the console shows it: no token digest.
fn account(u: &User) -> serde_json::Value {
    json!({
        "name": u.name,
        "roles": u.roles,
        "disabled": u.disabled,
        "created_ms": u.created_ms,
    })
}

/// Roles named in a form or a request body, each one checked.
fn roles_of<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<Role>, ApiError> {
    let roles = names
        .into_iter()
        .map(|n| {
            if n.trim().is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "role: choose one of {}",
                    Role::ALL.map(Role::as_str).join(", ")
                )));
            }
            n.trim().parse::<Role>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "role `{}`: not a role (one of {})",
                    n.trim(),
                    Role::ALL.map(Role::as_str).join(", ")
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if roles.is_empty() {
        return Err(ApiError::BadRequest("roles: name at least one role".into()));
    }
    Ok(roles)
}

// ------------------------------------------------------------- pages --

async fn users_page(State(k): S, h: HeaderMap) -> Page {
    let c = who(&k, &h).await?;
    let u = c.user.clone();
    let list = run(&k, &c, move |x| x.list_users(&u)).await?;
    let x = k.cloister();
    let may = |a: Action, name: &str| {
        x.can(
            &c.user,
            a,
            &Resource::Account {
                name: name.to_string(),
            },
        )
    };
    // No role is preselected: an account made an admin by a missed
    // choice would be a quiet escalation.
    let role_options: String =
        std::iter::once("<option value=\"\" selected disabled>role…</option>".to_string())
            .chain(
                Role::ALL
                    .iter()
                    .map(|r| format!("<option value=\"{0}\">{0}</option>", r.as_str())),
            )
            .collect();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|u| {
            let mut actions = String::new();
            let path = format!("/users/{}", u.name);
            if u.disabled {
                if may(Action::EnableUser, &u.name) {
                    actions.push_str(&button(&c, &format!("{path}/enable"), "Enable"));
                }
            } else {
                if may(Action::DisableUser, &u.name) {
                    actions.push_str(&button(&c, &format!("{path}/disable"), "Disable"));
                }
                if may(Action::RotateToken, &u.name) {
                    actions.push_str(&button(&c, &format!("{path}/token"), "New token"));
                }
                if may(Action::ChangeRoles, &u.name) {
                    let _ = write!(
                        actions,
                        "<form class=\"inline\" method=\"post\" action=\"{}/roles\">{}<select name=\"change\" aria-label=\"grant or revoke for {}\"><option value=\"grant\">grant</option><option value=\"revoke\">revoke</option></select> <select name=\"role\" required aria-label=\"role for {}\">{role_options}</select> <button>Change role</button></form>",
                        esc(&path),
                        csrf(&c),
                        esc(&u.name),
                        esc(&u.name)
                    );
                }
            }
            vec![
                esc(&u.name),
                esc(&u.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")),
                if u.disabled { "disabled".into() } else { "active".into() },
                esc(&cloister_host::time::rfc3339(u.created_ms)),
                actions,
            ]
        })
        .collect();
    let mut body = format!(
        "<p>{} account{}. Every change here is decided by the policies and recorded in the audit log as an operation on <code>Account::\"NAME\"</code>; the environment always keeps an active admin.</p>",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
    body.push_str(&table(
        &["name", "roles", "state", "created", "actions"],
        &rows,
    ));
    if may(Action::AddUser, "*") {
        let _ = write!(
            body,
            "<h2>Add an account</h2><form method=\"post\" action=\"/users\" class=\"stack\">{}<label>Name <input name=\"name\" required autocomplete=\"off\"></label><label>Role <select name=\"role\" required>{role_options}</select></label><label>Console password (optional, 12 to 256 characters; without one, the account uses its API token only) <input name=\"password\" type=\"password\" autocomplete=\"new-password\"></label><button>Add</button></form><p>The new account's API token is shown once, on the next page. More roles: <em>Change role</em> in its row.</p>",
            csrf(&c)
        );
    }
    ok(&c, "Accounts", &body)
}

/// The page that shows a token made just now, once.
fn token_page(c: &crate::auth::Caller, name: &str, token: &str, what: &str) -> Page {
    let body = format!(
        "<p>{what}</p><p>The API token of <strong>{}</strong>, shown this once (Cloister keeps only its hash): give it to them over a channel you trust.</p><pre class=\"token\">{}</pre><p><a href=\"/users\">Back to the accounts</a></p>",
        esc(name),
        esc(token)
    );
    ok(c, "New token", &body)
}

#[derive(Deserialize)]
struct AddForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    password: String,
}

async fn add_from_form(State(k): S, h: HeaderMap, Form(f): Form<AddForm>) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let roles = roles_of([f.role.as_str()]).map_err(|e| error_page(Some(&c), e))?;
    let (u, name) = (c.user.clone(), f.name.trim().to_string());
    let password = (!f.password.is_empty()).then_some(f.password);
    let (added, token) = run(&k, &c, move |x| {
        x.add_account(&u, &name, &roles, password.as_deref())
    })
    .await?;
    token_page(
        &c,
        &added.name,
        &token,
        &format!(
            "Added <strong>{}</strong> ({}).",
            esc(&added.name),
            esc(&added
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", "))
        ),
    )
}

#[derive(Deserialize)]
struct RolesForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    change: String,
    #[serde(default)]
    role: String,
}

async fn roles_from_form(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<RolesForm>,
) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let grant = grant_or_revoke(&f.change).map_err(|e| error_page(Some(&c), e))?;
    let roles = roles_of([f.role.as_str()]).map_err(|e| error_page(Some(&c), e))?;
    let u = c.user.clone();
    run(&k, &c, move |x| x.change_roles(&u, &name, grant, &roles)).await?;
    Ok(Redirect::to("/users").into_response())
}

fn grant_or_revoke(change: &str) -> Result<bool, ApiError> {
    match change {
        "grant" => Ok(true),
        "revoke" => Ok(false),
        other => Err(ApiError::BadRequest(format!(
            "change `{other}`: `grant` or `revoke`"
        ))),
    }
}

async fn change_from_form(
    State(k): S,
    h: HeaderMap,
    Path((name, change)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Page {
    let c = poster(&k, &h, &f.csrf).await?;
    let u = c.user.clone();
    match change.as_str() {
        "disable" => {
            run(&k, &c, move |x| x.disable_user(&u, &name)).await?;
            Ok(Redirect::to("/users").into_response())
        }
        "enable" => {
            let n = name.clone();
            let (_, token) = run(&k, &c, move |x| x.enable_user(&u, &n)).await?;
            token_page(
                &c,
                &name,
                &token,
                &format!(
                    "Enabled <strong>{}</strong> with a new token; the old one stays revoked.",
                    esc(&name)
                ),
            )
        }
        "token" => {
            let n = name.clone();
            let token = run(&k, &c, move |x| x.rotate_token(&u, &n)).await?;
            token_page(
                &c,
                &name,
                &token,
                &format!(
                    "A new token for <strong>{}</strong>; the old one no longer works.",
                    esc(&name)
                ),
            )
        }
        other => Err(error_page(
            Some(&c),
            ApiError::BadRequest(format!(
                "unknown account change `{other}` (disable, enable, token or roles)"
            )),
        )),
    }
}

// --------------------------------------------------------------- API --

async fn list(State(k): S, h: HeaderMap) -> Out {
    let u = reader(&k, &h).await?.user;
    let users = blocking(&k, move |c| c.list_users(&u)).await?;
    to_json(users.iter().map(account).collect::<Vec<_>>())
}

#[derive(Deserialize)]
pub(crate) struct AddBody {
    name: String,
    roles: Vec<String>,
    #[serde(default)]
    password: Option<String>,
}

async fn add(State(k): S, h: HeaderMap, Json(b): Json<AddBody>) -> Out {
    let u = writer(&k, &h).await?.user;
    let roles = roles_of(b.roles.iter().map(String::as_str))?;
    let (added, token) = blocking(&k, move |c| {
        c.add_account(&u, b.name.trim(), &roles, b.password.as_deref())
    })
    .await?;
    to_json(json!({"user": account(&added), "token": token}))
}

#[derive(Deserialize)]
pub(crate) struct RolesBody {
    #[serde(default)]
    grant: Vec<String>,
    #[serde(default)]
    revoke: Vec<String>,
}

async fn change_roles(
    State(k): S,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<RolesBody>,
) -> Out {
    let u = writer(&k, &h).await?.user;
    let (grant, names) = match (b.grant.is_empty(), b.revoke.is_empty()) {
        (false, true) => (true, b.grant),
        (true, false) => (false, b.revoke),
        _ => {
            return Err(ApiError::BadRequest(
                "name roles in `grant` or in `revoke`, not both".into(),
            ));
        }
    };
    let roles = roles_of(names.iter().map(String::as_str))?;
    let changed = blocking(&k, move |c| c.change_roles(&u, &name, grant, &roles)).await?;
    to_json(account(&changed))
}

async fn disable(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    let n = name.clone();
    blocking(&k, move |c| c.disable_user(&u, &n)).await?;
    to_json(json!({"name": name, "disabled": true}))
}

async fn enable(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    let (enabled, token) = blocking(&k, move |c| c.enable_user(&u, &name)).await?;
    to_json(json!({"user": account(&enabled), "token": token}))
}

async fn token(State(k): S, h: HeaderMap, Path(name): Path<String>) -> Out {
    let u = writer(&k, &h).await?.user;
    let n = name.clone();
    let token = blocking(&k, move |c| c.rotate_token(&u, &n)).await?;
    to_json(json!({"name": name, "token": token}))
}
