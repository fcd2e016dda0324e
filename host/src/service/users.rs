//! Users: accounts, tokens, console passwords and logins.

use crate::audit::{AccountFacts, AuditRecord, Decision};
use crate::policy::{Action, Resource, Role};
use crate::users::{self, User, UserError};

use super::{Cloister, ServiceError, params_digest};

impl Cloister {
    /// Adds a user; returns the user and their token (shown once).
    pub fn add_user(
        &self,
        who: &User,
        name: &str,
        roles: &[Role],
    ) -> Result<(User, String), ServiceError> {
        self.guard_account(
            who,
            Action::AddUser,
            name,
            &(name, roles),
            Some((roles, &[])),
        )?;
        Ok(users::add(self.env.store().as_ref(), name, roles)?)
    }

    /// Adds a user as [`Cloister::add_user`] does and, with `password`,
    /// sets their console password too (a second decision, as `user
    /// passwd` makes it). A password that does not meet the rules is
    /// refused before anything is decided or written.
    pub fn add_account(
        &self,
        who: &User,
        name: &str,
        roles: &[Role],
        password: Option<&str>,
    ) -> Result<(User, String), ServiceError> {
        if let Some(p) = password {
            users::password_rules(p)?;
        }
        let added = self.add_user(who, name, roles)?;
        if let Some(p) = password {
            self.set_password(who, name, p)?;
        }
        Ok(added)
    }

    /// Sets a user's console password (admins).
    pub fn set_password(&self, who: &User, name: &str, password: &str) -> Result<(), ServiceError> {
        self.guard_account(who, Action::AddUser, name, &("password", name), None)?;
        let batch = users::set_password(self.env.store().as_ref(), name, password)?;
        self.env.store().commit(batch)?;
        Ok(())
    }

    /// The current state of a user who already logged in: how the console
    /// revalidates a session on each request, so a disabled account loses
    /// its open sessions at once. Unaudited like
    /// [`Cloister::check_token`]: the login that created the session was
    /// audited, and the name comes from the console's own session table,
    /// never from a request, so this answers no question a person asked.
    pub fn session_user(&self, name: &str) -> Result<User, UserError> {
        users::get(self.env.store().as_ref(), name)
    }

    /// The user a name and password belong to (console login). A failure
    /// is audited, naming the user it claimed to be.
    pub fn login(&self, name: &str, password: &str) -> Result<User, ServiceError> {
        match users::check_password(self.env.store().as_ref(), name, password) {
            Ok(u) => {
                self.env.audit().append(AuditRecord {
                    actor: u.name.clone(),
                    action: crate::audit::events::LOGIN.into(),
                    resource: Resource::Environment.uid_text(),
                    decision: Decision::Allow,
                    policies: Vec::new(),
                    params: params_digest(&self.channel),
                    outcome: None,
                    serving: None,
                    account: None,
                })?;
                Ok(u)
            }
            Err(e) => {
                let claimed = if users::check_name(name).is_ok() {
                    name
                } else {
                    "-"
                };
                self.env.audit().append(AuditRecord {
                    actor: claimed.to_string(),
                    action: crate::audit::events::LOGIN.into(),
                    resource: Resource::Environment.uid_text(),
                    decision: Decision::Deny,
                    policies: Vec::new(),
                    params: params_digest(&self.channel),
                    outcome: None,
                    serving: None,
                    account: None,
                })?;
                Err(ServiceError::Auth(e))
            }
        }
    }

    /// Audits a request refused before it reached an operation — a
    /// throttled or malformed login, a missing or wrong CSRF token, a
    /// cross-site request: a `deny` entry for `action` whose deciding policy
    /// is the fixed `reason`. `actor` is kept only when it is a well-formed
    /// user name (else `-`), so a client cannot write text of its choosing
    /// into the log.
    pub fn record_refusal(
        &self,
        actor: &str,
        action: &'static str,
        reason: &'static str,
    ) -> Result<(), ServiceError> {
        let actor = if users::check_name(actor).is_ok() {
            actor
        } else {
            "-"
        };
        self.env.audit().append(AuditRecord {
            actor: actor.to_string(),
            action: action.into(),
            resource: Resource::Environment.uid_text(),
            decision: Decision::Deny,
            policies: vec![reason.into()],
            params: params_digest(&(self.channel, reason)),
            outcome: None,
            serving: None,
            account: None,
        })?;
        Ok(())
    }

    /// The authorization point for account administration: `guard` on
    /// the account `name` (`Account::"-"` for a name that is not one, so
    /// that no malformed text reaches the log), with the roles given and
    /// taken away on the audit record.
    fn guard_account(
        &self,
        who: &User,
        action: Action,
        name: &str,
        params: &impl serde::Serialize,
        roles: Option<(&[Role], &[Role])>,
    ) -> Result<(), ServiceError> {
        let name = if users::check_name(name).is_ok() {
            name
        } else {
            "-"
        };
        let principal = who.principal();
        let resource = Resource::Account { name: name.into() };
        let (allowed, mut record) = self.decide(&principal, action, &resource, params);
        record.account = roles.map(|(granted, revoked)| AccountFacts {
            granted: granted.iter().map(|r| r.as_str().to_string()).collect(),
            revoked: revoked.iter().map(|r| r.as_str().to_string()).collect(),
        });
        self.env.audit().append(record)?;
        Self::verdict(allowed, &principal, action, &resource)
    }

    /// Lists users.
    pub fn list_users(&self, who: &User) -> Result<Vec<User>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListUsers,
            &Resource::Environment,
            &(),
        )?;
        Ok(users::list(self.env.store().as_ref())?)
    }

    /// Disables a user and revokes their token; refused for an account
    /// disabled already, and for the environment's last active admin.
    pub fn disable_user(&self, who: &User, name: &str) -> Result<(), ServiceError> {
        self.guard_account(who, Action::DisableUser, name, &name, None)?;
        users::disable(self.env.store().as_ref(), name)?;
        Ok(())
    }

    /// Enables a disabled user with a new token (their old one was revoked
    /// when they were disabled); returns the user and the token, shown
    /// once.
    pub fn enable_user(&self, who: &User, name: &str) -> Result<(User, String), ServiceError> {
        self.guard_account(who, Action::EnableUser, name, &name, None)?;
        Ok(users::enable(self.env.store().as_ref(), name)?)
    }

    /// Gives an active user a new token; the old one stops working at
    /// once (a token lost or seen by someone else). Returns it, shown once.
    pub fn rotate_token(&self, who: &User, name: &str) -> Result<String, ServiceError> {
        self.guard_account(who, Action::RotateToken, name, &name, None)?;
        Ok(users::rotate_token(self.env.store().as_ref(), name)?)
    }

    /// Grants roles to a user (`grant`) or takes them away; returns the
    /// user as changed. Refused, writing nothing, for a role granted that
    /// the user holds or revoked that they do not, for the last role, for
    /// `client` beside another role, and for the admin role of the
    /// environment's last active admin. Takes effect at the user's next
    /// request, console sessions included.
    pub fn change_roles(
        &self,
        who: &User,
        name: &str,
        grant: bool,
        roles: &[Role],
    ) -> Result<User, ServiceError> {
        let verb = if grant { "grant" } else { "revoke" };
        let facts = if grant {
            (roles, &[][..])
        } else {
            (&[][..], roles)
        };
        self.guard_account(
            who,
            Action::ChangeRoles,
            name,
            &(verb, name, roles),
            Some(facts),
        )?;
        let what = if grant {
            users::AccountChange::Grant(roles.to_vec())
        } else {
            users::AccountChange::Revoke(roles.to_vec())
        };
        Ok(users::change(self.env.store().as_ref(), name, &what)?)
    }
}
