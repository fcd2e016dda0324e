//! Who is asking: a session cookie (after a password login) or an API
//! token; CSRF tokens for sessions; backoff after failed logins.
//!
//! Sessions live in memory only (a restart logs everyone out). The cookie
//! holds a random session id; the server keeps only its SHA-256, with the
//! user name, a per-session CSRF token and an expiry that each use renews.
//! The user is read from the store on every request, so disabling a user
//! ends their sessions at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use cloister_host::Digest;
use cloister_host::users::User;

use crate::{ApiError, Console, blocking};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "cloister_session";

pub(crate) struct Session {
    user: String,
    csrf: String,
    expires: Instant,
}

#[derive(Default)]
pub(crate) struct Failures {
    count: u32,
    until: Option<Instant>,
}

/// The caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub user: User,
    /// The session's CSRF token; `None` for API-token callers (no cookie,
    /// so no cross-site forgery to fear).
    pub csrf: Option<String>,
}

fn random_hex(n: usize) -> Result<String, ApiError> {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| ApiError::Internal)?;
    Ok(hex::encode(b))
}

fn session_key(sid: &str) -> String {
    Digest::of(sid.as_bytes()).to_hex()
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
}

/// Equal in constant time.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Console {
    /// Logs in with a password: the `Set-Cookie` value and the CSRF token.
    pub(crate) async fn login(
        self: &Arc<Self>,
        name: String,
        password: String,
    ) -> Result<(User, String, String), ApiError> {
        let key = name.to_ascii_lowercase();
        {
            let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = f.get(&key).and_then(|x| x.until) {
                let now = Instant::now();
                if until > now {
                    return Err(ApiError::TooMany((until - now).as_secs() + 1));
                }
            }
        }
        let result = blocking(self, move |c| c.login(&name, &password)).await;
        let user = match result {
            Ok(u) => u,
            Err(e) => {
                let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                let entry = f.entry(key).or_default();
                entry.count += 1;
                if entry.count > self.config.free_failures {
                    let exp = (entry.count - self.config.free_failures).min(9);
                    entry.until = Some(Instant::now() + Duration::from_secs(1 << exp));
                }
                return Err(match e {
                    ApiError::Internal => ApiError::Internal,
                    _ => ApiError::Unauthorized,
                });
            }
        };
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let sid = random_hex(32)?;
        let csrf = random_hex(32)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            session_key(&sid),
            Session {
                user: user.name.clone(),
                csrf: csrf.clone(),
                expires: now + self.config.session_ttl,
            },
        );
        let cookie = format!(
            "{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.config.session_ttl.as_secs(),
            if self.config.secure_cookies {
                "; Secure"
            } else {
                ""
            }
        );
        Ok((user, cookie, csrf))
    }

    /// Ends the caller's session; the cookie value that clears it.
    pub(crate) fn logout(&self, headers: &HeaderMap) -> String {
        if let Some(sid) = cookie_value(headers) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session_key(&sid));
        }
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    /// The caller, from an API token or a live session.
    pub(crate) async fn caller(self: &Arc<Self>, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if let Some(token) = bearer(headers) {
            // A valid token costs one hash and two reads of small, hot
            // trees that sled serves from memory: checked in place, sparing
            // a hand-off to the blocking pool. A bad token is audited, which
            // waits for a durable write, so that half runs off the runtime.
            return match self.c.check_token(&token) {
                Ok(user) => Ok(Caller { user, csrf: None }),
                Err(why) => blocking(self, move |c| Err(c.reject_token(&token, why)))
                    .await
                    .map(|user| Caller { user, csrf: None }),
            };
        }
        let sid = cookie_value(headers).ok_or(ApiError::Unauthorized)?;
        let (name, csrf) = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let key = session_key(&sid);
            let now = Instant::now();
            match sessions.get_mut(&key) {
                Some(s) if s.expires > now => {
                    s.expires = now + self.config.session_ttl;
                    (s.user.clone(), s.csrf.clone())
                }
                Some(_) => {
                    sessions.remove(&key);
                    return Err(ApiError::Unauthorized);
                }
                None => return Err(ApiError::Unauthorized),
            }
        };
        // One read of a small, hot tree (see the token path above).
        let user = cloister_host::users::get(self.c.env().store().as_ref(), &name)
            .map_err(|_| ApiError::Unauthorized)?;
        if user.disabled {
            return Err(ApiError::Unauthorized);
        }
        Ok(Caller {
            user,
            csrf: Some(csrf),
        })
    }
}

impl Caller {
    /// A state-changing request from a session must carry its CSRF token
    /// (`X-CSRF-Token` header or a `csrf` form field).
    pub(crate) fn check_csrf(
        &self,
        headers: &HeaderMap,
        form: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(expected) = &self.csrf else {
            return Ok(());
        };
        let given = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .or(form)
            .unwrap_or("");
        if same(given, expected) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}
