//! Users, roles and API tokens.
//!
//! A token is 32 random bytes, shown once when the user is created; the store
//! keeps only its SHA-256, so a copy of the store does not yield credentials.
//! The CLI reads the token from `CLOISTER_TOKEN` or `--token`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::Digest;
use crate::policy::{Principal, Role};
use crate::store::{Space, Storage, StoreError, WriteBatch};

/// Prefix that makes tokens recognizable (e.g. by secret scanners).
pub const TOKEN_PREFIX: &str = "clt_";

/// Errors of user management.
#[derive(Debug, Error)]
pub enum UserError {
    /// The name does not follow the rules.
    #[error("invalid user name `{0}`: use 1–64 of a-z 0-9 . _ - starting with a letter or digit")]
    BadName(String),
    /// A user of that name exists.
    #[error("user `{0}` already exists")]
    Exists(String),
    /// No such user.
    #[error("no user `{0}`")]
    Unknown(String),
    /// A user needs at least one role.
    #[error("a user needs at least one role")]
    NoRoles,
    /// The `client` role is a service account's only role.
    #[error(
        "the `client` role cannot be combined with other roles: a client account only calls `predict`"
    )]
    ClientWithOtherRoles,
    /// The token is not valid (unknown, malformed or of a disabled user).
    #[error("authentication failed: the token is not valid")]
    BadToken,
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Randomness failure.
    #[error("the system random number generator failed")]
    Random,
    /// A stored user record is damaged.
    #[error("the stored record of user `{0}` is damaged")]
    Damaged(String),
    /// The name or password is wrong (or the user is disabled or has no
    /// password): one error for all, so it tells an attacker nothing.
    #[error("authentication failed: wrong user name or password")]
    BadPassword,
    /// A new password does not meet the rules.
    #[error("a password needs 12 to 256 characters")]
    WeakPassword,
    /// The change would leave the environment without an active admin.
    #[error(
        "`{0}` is the environment's only active admin: add or enable another admin first, so that somebody can still administer it"
    )]
    LastAdmin(String),
    /// A role granted that the user holds already.
    #[error("`{user}` already has the `{role}` role")]
    HasRole {
        /// The user.
        user: String,
        /// The role.
        role: &'static str,
    },
    /// A role revoked that the user does not hold.
    #[error("`{user}` does not have the `{role}` role")]
    LacksRole {
        /// The user.
        user: String,
        /// The role.
        role: &'static str,
    },
    /// Revoking every role a user holds.
    #[error(
        "that would leave `{0}` without a role; to stop an account, use `user disable` (its history stays)"
    )]
    LastRole(String),
    /// A disabled account's token asked for.
    #[error("`{0}` is disabled: `user enable` gives the account a new token")]
    Disabled(String),
    /// The account is disabled already.
    #[error("`{0}` is already disabled")]
    AlreadyDisabled(String),
    /// Enabling an account that is not disabled.
    #[error("`{0}` is not disabled")]
    NotDisabled(String),
    /// A client account named to become an admin.
    #[error("`{0}` is a client account, which can be nothing else: name another account")]
    ClientAccount(String),
}

/// A change to an existing account ([`change`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AccountChange {
    /// Add these roles (each one the user must not hold yet).
    Grant(Vec<Role>),
    /// Take these roles away (each one the user must hold; at least one
    /// must remain).
    Revoke(Vec<Role>),
    /// Disable the account and revoke its token.
    Disable,
    /// Enable a disabled account with the token of this SHA-256.
    Enable(String),
    /// Replace an active account's token by the one of this SHA-256: the
    /// old one stops working at once.
    RotateToken(String),
}

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Unique name.
    pub name: String,
    /// Roles held.
    pub roles: Vec<Role>,
    /// Disabled users can do nothing.
    pub disabled: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Hex SHA-256 of the current token.
    pub token_sha256: String,
}

impl User {
    /// The principal this user acts as.
    pub fn principal(&self) -> Principal {
        Principal {
            name: self.name.clone(),
            roles: self.roles.clone(),
            disabled: self.disabled,
        }
    }
}

/// Checks a user name.
pub fn check_name(name: &str) -> Result<(), UserError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(UserError::BadName(name.to_string()))
    }
}

fn new_token() -> Result<(String, String), UserError> {
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| UserError::Random)?;
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(raw));
    let hash = Digest::of(token.as_bytes()).to_hex();
    Ok((token, hash))
}

/// Creates a user; returns them with the token. Of two creations of one
/// name at once, one is refused as existing.
pub(crate) fn add(
    store: &dyn Storage,
    name: &str,
    roles: &[Role],
) -> Result<(User, String), UserError> {
    let (batch, user, token) = create(store, name, roles)?;
    let absent = [crate::store::Expect::new(
        Space::Users,
        name.as_bytes(),
        None,
    )];
    match store.commit_if(&absent, batch) {
        Ok(()) => Ok((user, token)),
        Err(StoreError::Conflict { .. }) => Err(UserError::Exists(name.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Writes for a new user; returns them with the token.
fn create(
    store: &dyn Storage,
    name: &str,
    roles: &[Role],
) -> Result<(WriteBatch, User, String), UserError> {
    check_name(name)?;
    if roles.is_empty() {
        return Err(UserError::NoRoles);
    }
    if roles.contains(&Role::Client) && roles.iter().any(|r| *r != Role::Client) {
        return Err(UserError::ClientWithOtherRoles);
    }
    if store.get(Space::Users, name.as_bytes())?.is_some() {
        return Err(UserError::Exists(name.to_string()));
    }
    let (token, hash) = new_token()?;
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    let user = User {
        name: name.to_string(),
        roles,
        disabled: false,
        created_ms: crate::time::now_ms(),
        token_sha256: hash.clone(),
    };
    let mut b = WriteBatch::new();
    b.put(Space::Users, name.as_bytes().to_vec(), encode(&user)?);
    b.put(Space::Tokens, hash.into_bytes(), name.as_bytes().to_vec());
    Ok((b, user, token))
}

fn encode(user: &User) -> Result<Vec<u8>, UserError> {
    serde_json::to_vec(user).map_err(|_| UserError::Damaged(user.name.clone()))
}

/// Creates the first admin of a new environment (no authorization: there
/// is nobody to authorize yet).
/// Adds to `batch` the writes that create the first admin; returns the
/// admin's token.
pub(crate) fn bootstrap_admin_batch(
    store: &dyn Storage,
    name: &str,
    batch: &mut WriteBatch,
) -> Result<String, UserError> {
    let (b, _, token) = create(store, name, &[Role::Admin])?;
    batch.extend(b);
    Ok(token)
}

/// Reads a user.
pub fn get(store: &dyn Storage, name: &str) -> Result<User, UserError> {
    let bytes = store
        .get(Space::Users, name.as_bytes())?
        .ok_or_else(|| UserError::Unknown(name.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|_| UserError::Damaged(name.to_string()))
}

/// Whether `name` is a user who can answer a labeling queue now: an
/// account with the labeler role, not disabled. (A store error reads as
/// no: nobody is asked to label through a failure.)
pub fn is_active_labeler(store: &dyn Storage, name: &str) -> bool {
    get(store, name).is_ok_and(|u| u.roles.contains(&Role::Labeler) && !u.disabled)
}

/// Every user, by name.
pub fn list(store: &dyn Storage) -> Result<Vec<User>, UserError> {
    let mut out = Vec::new();
    for item in store.scan(Space::Users, b"") {
        let (k, v) = item?;
        out.push(
            serde_json::from_slice(&v)
                .map_err(|_| UserError::Damaged(String::from_utf8_lossy(&k).into_owned()))?,
        );
    }
    Ok(out)
}

/// Disables a user and revokes their token ([`AccountChange::Disable`]).
pub(crate) fn disable(store: &dyn Storage, name: &str) -> Result<(), UserError> {
    change(store, name, &AccountChange::Disable).map(|_| ())
}

/// Enables a disabled user with a new token; returns the user and the
/// token (shown once).
pub(crate) fn enable(store: &dyn Storage, name: &str) -> Result<(User, String), UserError> {
    let (token, hash) = new_token()?;
    Ok((change(store, name, &AccountChange::Enable(hash))?, token))
}

/// Makes `name` an active admin with a new token, whatever the account's
/// state: created if absent, enabled if disabled, given the admin role if
/// it lacks it, its old token revoked. Returns the user and the token
/// (shown once). A client account is refused (a client does nothing but
/// predict). The host's recovery for an environment whose admins are all
/// locked out; no policy decides it ([`crate::service::Cloister::recover_admin`]).
pub(crate) fn recover_admin(store: &dyn Storage, name: &str) -> Result<(User, String), UserError> {
    check_name(name)?;
    let (token, hash) = new_token()?;
    let user = crate::store::update(store, &[(Space::Users, name.as_bytes())], |values| {
        let mut b = WriteBatch::new();
        let user = match values.first().and_then(|v| v.as_deref()) {
            Some(bytes) => {
                let mut user: User = serde_json::from_slice(bytes)
                    .map_err(|_| UserError::Damaged(name.to_string()))?;
                if user.roles.contains(&Role::Client) {
                    return Err(UserError::ClientAccount(name.to_string()));
                }
                if !user.roles.contains(&Role::Admin) {
                    user.roles.push(Role::Admin);
                    user.roles.sort();
                }
                user.disabled = false;
                b.delete(Space::Tokens, user.token_sha256.clone().into_bytes());
                user.token_sha256 = hash.clone();
                user
            }
            None => User {
                name: name.to_string(),
                roles: vec![Role::Admin],
                disabled: false,
                created_ms: crate::time::now_ms(),
                token_sha256: hash.clone(),
            },
        };
        b.put(
            Space::Tokens,
            hash.clone().into_bytes(),
            name.as_bytes().to_vec(),
        );
        b.put(Space::Users, name.as_bytes().to_vec(), encode(&user)?);
        Ok((b, user))
    })?;
    Ok((user, token))
}

/// Gives an active user a new token, revoking the old one; returns the
/// token (shown once).
pub(crate) fn rotate_token(store: &dyn Storage, name: &str) -> Result<String, UserError> {
    let (token, hash) = new_token()?;
    change(store, name, &AccountChange::RotateToken(hash))?;
    Ok(token)
}

fn is_active_admin(user: &User) -> bool {
    !user.disabled && user.roles.contains(&Role::Admin)
}

/// Applies `what` to user `name`; returns the user as changed. Refused, writing nothing, when the change does not
/// apply (a role held already or not held, the last role, an account
/// disabled or not), and when it would leave the environment without an
/// active admin.
///
/// The whole change commits only if the user's row and the row of every
/// user who was an active admin are still as read: two admins disabling
/// each other at the same moment cannot both succeed, and a concurrent
/// change to the user cannot bring an old token back.
pub(crate) fn change(
    store: &dyn Storage,
    name: &str,
    what: &AccountChange,
) -> Result<User, UserError> {
    crate::store::update_reading(store, || {
        let mut read = Vec::new();
        let mut target = None;
        let mut admins = Vec::new();
        for item in store.scan(Space::Users, b"") {
            let (k, v) = item?;
            let user: User = serde_json::from_slice(&v)
                .map_err(|_| UserError::Damaged(String::from_utf8_lossy(&k).into_owned()))?;
            if user.name == name {
                target = Some((user.clone(), v.clone()));
            } else if is_active_admin(&user) {
                admins.push(user.name.clone());
            } else {
                continue;
            }
            read.push((k, v));
        }
        let (before, _) = target.ok_or_else(|| UserError::Unknown(name.to_string()))?;
        let mut user = before.clone();
        let mut token = None;
        match what {
            AccountChange::Grant(roles) => {
                for &role in roles {
                    if user.roles.contains(&role) {
                        return Err(UserError::HasRole {
                            user: name.to_string(),
                            role: role.as_str(),
                        });
                    }
                    user.roles.push(role);
                }
                if user.roles.contains(&Role::Client) && user.roles.len() > 1 {
                    return Err(UserError::ClientWithOtherRoles);
                }
                user.roles.sort();
                user.roles.dedup();
            }
            AccountChange::Revoke(roles) => {
                for &role in roles {
                    if !user.roles.contains(&role) {
                        return Err(UserError::LacksRole {
                            user: name.to_string(),
                            role: role.as_str(),
                        });
                    }
                    user.roles.retain(|r| *r != role);
                }
                if user.roles.is_empty() {
                    return Err(UserError::LastRole(name.to_string()));
                }
            }
            AccountChange::Disable => {
                if user.disabled {
                    return Err(UserError::AlreadyDisabled(name.to_string()));
                }
                user.disabled = true;
            }
            AccountChange::Enable(hash) => {
                if !user.disabled {
                    return Err(UserError::NotDisabled(name.to_string()));
                }
                user.disabled = false;
                token = Some(hash);
            }
            AccountChange::RotateToken(hash) => {
                if user.disabled {
                    return Err(UserError::Disabled(name.to_string()));
                }
                token = Some(hash);
            }
        }
        if is_active_admin(&before) && !is_active_admin(&user) && admins.is_empty() {
            return Err(UserError::LastAdmin(name.to_string()));
        }
        let mut b = WriteBatch::new();
        let mut expect = Vec::with_capacity(read.len());
        for (k, v) in read {
            if k != name.as_bytes() {
                // Unchanged, written back: the engines guard a key by the
                // write (`Storage::commit_if`).
                b.put(Space::Users, k.clone(), v.clone());
            }
            expect.push(crate::store::Expect::new(Space::Users, k, Some(v)));
        }
        if user.disabled || token.is_some() {
            b.delete(Space::Tokens, before.token_sha256.clone().into_bytes());
        }
        if let Some(hash) = token {
            user.token_sha256 = hash.clone();
            b.put(
                Space::Tokens,
                hash.clone().into_bytes(),
                name.as_bytes().to_vec(),
            );
        }
        b.put(Space::Users, name.as_bytes().to_vec(), encode(&user)?);
        Ok((expect, b, user))
    })
}

/// The user a token belongs to. Unknown, malformed and disabled-user tokens
/// all fail the same way.
pub fn authenticate(store: &dyn Storage, token: &str) -> Result<User, UserError> {
    if !token.starts_with(TOKEN_PREFIX) || token.len() != TOKEN_PREFIX.len() + 64 {
        return Err(UserError::BadToken);
    }
    let hash = Digest::of(token.as_bytes()).to_hex();
    let name = store
        .get(Space::Tokens, hash.as_bytes())?
        .ok_or(UserError::BadToken)?;
    let user = get(store, &String::from_utf8_lossy(&name)).map_err(|_| UserError::BadToken)?;
    if user.disabled || user.token_sha256 != hash {
        return Err(UserError::BadToken);
    }
    Ok(user)
}

/// Argon2id with the parameters OWASP recommends for interactive logins
/// (19 MiB, two passes, one lane).
fn argon2() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// Writes that set a user's password (an Argon2id hash with a random salt;
/// the password itself is never stored).
/// Whether `password` meets the rules for a console password (12 to 256
/// characters).
pub fn password_rules(password: &str) -> Result<(), UserError> {
    if (12..=256).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(UserError::WeakPassword)
    }
}

pub(crate) fn set_password(
    store: &dyn Storage,
    name: &str,
    password: &str,
) -> Result<WriteBatch, UserError> {
    use argon2::PasswordHasher;
    password_rules(password)?;
    get(store, name)?;
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| UserError::Random)?;
    let salt =
        argon2::password_hash::SaltString::encode_b64(&salt).map_err(|_| UserError::Random)?;
    let phc = argon2()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|_| UserError::Random)?
        .to_string();
    let mut b = WriteBatch::new();
    b.put(Space::Passwords, name.as_bytes().to_vec(), phc.into_bytes());
    Ok(b)
}

/// The user a name and password belong to. Unknown users, users without a
/// password, disabled users and wrong passwords fail alike (and take the
/// time of one hash, so timing tells nothing either).
pub fn check_password(store: &dyn Storage, name: &str, password: &str) -> Result<User, UserError> {
    use argon2::PasswordVerifier;
    // A hash to verify against when the user has none, so every failure
    // costs the same.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let stored = store.get(Space::Passwords, name.as_bytes())?;
    let phc_text = match stored.as_deref() {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => DUMMY
            .get_or_init(|| {
                use argon2::PasswordHasher;
                argon2::password_hash::SaltString::encode_b64(b"cloister-no-user")
                    .ok()
                    .and_then(|salt| {
                        argon2()
                            .hash_password(b"no such user", &salt)
                            .ok()
                            .map(|h| h.to_string())
                    })
                    .unwrap_or_default()
            })
            .clone(),
    };
    let ok = argon2::PasswordHash::new(&phc_text)
        .map(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false);
    if !ok || stored.is_none() || password.len() > 1024 {
        return Err(UserError::BadPassword);
    }
    let user = get(store, name).map_err(|_| UserError::BadPassword)?;
    if user.disabled {
        return Err(UserError::BadPassword);
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Creating one name from several threads at once: one user, one
    /// valid token, the others refused as existing. Disabling revokes the
    /// token that is stored, whoever wrote it.
    #[test]
    fn one_name_created_at_once_makes_one_user_and_disabling_revokes_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStorage::open(&dir.path().join("s"), true).unwrap();
        let made: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| add(&store, "bob", &[Role::Scientist])))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let tokens: Vec<&String> = made
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|(_, t)| t)
            .collect();
        assert_eq!(tokens.len(), 1);
        assert!(
            made.iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, UserError::Exists(n) if n == "bob"))
        );
        assert_eq!(authenticate(&store, tokens[0]).unwrap().name, "bob");
        disable(&store, "bob").unwrap();
        assert!(authenticate(&store, tokens[0]).is_err());
        assert!(get(&store, "bob").unwrap().disabled);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["alice", "a", "bob.smith", "x-1_2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alice", "-x", "a b", "ä", &"a".repeat(65), "../x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_hashed_and_every_failure_looks_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStorage::open(dir.path(), true).unwrap();
        let (b, _, _) = create(&store, "ana", &[Role::Scientist]).unwrap();
        store.commit(b).unwrap();
        assert!(matches!(
            set_password(&store, "ana", "short"),
            Err(UserError::WeakPassword)
        ));
        store
            .commit(set_password(&store, "ana", "correct horse battery").unwrap())
            .unwrap();
        let stored = store.get(Space::Passwords, b"ana").unwrap().unwrap();
        assert!(String::from_utf8_lossy(&stored).starts_with("$argon2id$"));
        assert!(!String::from_utf8_lossy(&stored).contains("horse"));
        assert_eq!(
            check_password(&store, "ana", "correct horse battery")
                .unwrap()
                .name,
            "ana"
        );
        for (name, pw) in [
            ("ana", "wrong horse battery"),
            ("bob", "correct horse battery"),
            ("ana", ""),
        ] {
            let e = check_password(&store, name, pw).unwrap_err();
            assert_eq!(e.to_string(), UserError::BadPassword.to_string());
        }
    }
}
