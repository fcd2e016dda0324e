//! Who is asking: a session cookie (after a password login) or an API
//! token; CSRF tokens for sessions; throttling of failed logins.
//!
//! Sessions live in memory only (a restart logs everyone out). The cookie
//! holds a random session id; the server keeps only its SHA-256, with the
//! user name, a per-session CSRF token, an idle expiry that each use renews
//! and an absolute one that nothing renews. A new login ends the user's
//! older sessions (when `one_session_per_user` is set, the default). The
//! user is read from the store on every request, so disabling a user ends
//! their sessions at once.
//!
//! Failed logins are throttled per user name, per client address and per
//! known device ([`crate::throttle`]). A successful login also sets a
//! long-lived device cookie: a later login from that browser is counted
//! against the device, not the name, so a stranger who locks a name out
//! by guessing does not lock out its owner's own browsers. The trade-off:
//! a browser without such a cookie (new, cleared, or after a console
//! restart, since devices are kept in memory) waits out the name's lockout
//! like anyone else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use cloister_host::Digest;
use cloister_host::users::User;

use crate::{ApiError, Console, blocking};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "cloister_session";

/// The device cookie's name.
pub(crate) const DEVICE_COOKIE: &str = "cloister_device";

/// How long a device cookie is remembered by the browser.
const DEVICE_MAX_AGE: Duration = Duration::from_secs(180 * 24 * 3600);

/// The longest password accepted (longer ones are refused unhashed).
const MAX_PASSWORD_BYTES: usize = 1024;

pub(crate) struct Session {
    user: String,
    csrf: String,
    expires: Instant,
    created: Instant,
}

/// Devices that logged in successfully: SHA-256 of the device cookie →
/// (user name, last login). Bounded like the throttle table.
#[derive(Default)]
pub(crate) struct Devices {
    known: HashMap<String, (String, Instant)>,
}

impl Devices {
    fn owner(&self, key: &str) -> Option<&str> {
        self.known.get(key).map(|(u, _)| u.as_str())
    }

    fn remember(&mut self, key: String, user: String, now: Instant, cap: usize) {
        if !self.known.contains_key(&key)
            && self.known.len() >= cap.max(1)
            && let Some(oldest) = self
                .known
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
        {
            self.known.remove(&oldest);
        }
        self.known.insert(key, (user, now));
    }

    pub(crate) fn len(&self) -> usize {
        self.known.len()
    }
}

/// A successful login: the user, the `Set-Cookie` values, the CSRF token.
pub(crate) struct LoggedIn {
    pub user: User,
    pub cookies: Vec<String>,
    pub csrf: String,
}

/// The caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub user: User,
    /// The session's CSRF token; `None` for API-token callers (no cookie,
    /// so no cross-site forgery to fear).
    pub csrf: Option<String>,
    /// The console's sections the policies let this caller use, as
    /// `(href, text)`: filled for pages (see `pages::who`), empty for API
    /// calls.
    pub nav: Vec<(&'static str, &'static str)>,
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

fn named_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    named_cookie(headers, COOKIE)
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
    /// `; Secure` when cookies are marked secure.
    fn secure(&self) -> &'static str {
        if self.config.secure_cookies {
            "; Secure"
        } else {
            ""
        }
    }

    /// Logs in with a password. The name is checked against the user-name
    /// rule and the password's length bounded before any work; the attempt
    /// is counted against the client address and the name (or the known
    /// device) before the password is checked; a refused attempt is
    /// audited.
    pub(crate) async fn login(
        self: &Arc<Self>,
        name: String,
        password: String,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<LoggedIn, ApiError> {
        if cloister_host::users::check_name(&name).is_err() || password.len() > MAX_PASSWORD_BYTES {
            let reason = if password.len() > MAX_PASSWORD_BYTES {
                "password-too-long"
            } else {
                "malformed-user-name"
            };
            self.refuse(&name, "login", reason).await?;
            return Err(ApiError::Unauthorized);
        }
        let name_key = format!("user:{}", name.to_ascii_lowercase());
        let device = named_cookie(headers, DEVICE_COOKIE).map(|d| session_key(&d));
        let client_key = client.map(|ip| format!("client:{ip}"));
        let now = Instant::now();
        let throttled = {
            let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            let own_device = device
                .as_ref()
                .filter(|d| {
                    devices
                        .owner(d)
                        .is_some_and(|u| u.eq_ignore_ascii_case(&name))
                })
                .map(|d| format!("device:{d}"));
            drop(devices);
            let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            let by_client = match &client_key {
                Some(k) => t.attempt(k, self.config.client_free_failures, now),
                None => Ok(()),
            };
            let key = own_device.unwrap_or(name_key.clone());
            by_client
                .and_then(|()| t.attempt(&key, self.config.free_failures, now))
                .map(|()| key)
        };
        let key = match throttled {
            Ok(key) => key,
            Err(left) => {
                self.refuse(&name, "login", "throttled").await?;
                return Err(ApiError::TooMany(left.as_secs() + 1));
            }
        };
        let checked = name.clone();
        let user = match blocking(self, move |c| c.login(&checked, &password)).await {
            Ok(u) => u,
            Err(ApiError::Internal) => return Err(ApiError::Internal),
            Err(_) => return Err(ApiError::Unauthorized),
        };
        {
            let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            // The password is proven: the name's (or device's) failures are
            // forgotten. The client's count only loses this attempt, so
            // logging into one's own account between guesses at others
            // does not reset it.
            t.success(&key);
            if let Some(k) = &client_key {
                t.refund(k);
            }
        }
        self.start_session(user, device, now)
    }

    /// A new session for `user` (and the device cookie): the login's result.
    fn start_session(
        &self,
        user: User,
        device: Option<String>,
        now: Instant,
    ) -> Result<LoggedIn, ApiError> {
        let sid = random_hex(32)?;
        let csrf = random_hex(32)?;
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let max = self.config.session_max;
            sessions.retain(|_, s| {
                s.expires > now
                    && s.created + max > now
                    && !(self.config.one_session_per_user && s.user == user.name)
            });
            sessions.insert(
                session_key(&sid),
                Session {
                    user: user.name.clone(),
                    csrf: csrf.clone(),
                    expires: now + self.config.session_ttl,
                    created: now,
                },
            );
        }
        let mut cookies = vec![format!(
            "{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.config
                .session_ttl
                .min(self.config.session_max)
                .as_secs(),
            self.secure()
        )];
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let known = device
            .as_ref()
            .is_some_and(|d| devices.owner(d).is_some_and(|u| u == user.name));
        match device.filter(|_| known) {
            Some(d) => devices.remember(d, user.name.clone(), now, self.config.max_tracked),
            None => {
                let id = random_hex(32)?;
                devices.remember(
                    session_key(&id),
                    user.name.clone(),
                    now,
                    self.config.max_tracked,
                );
                cookies.push(format!(
                    "{DEVICE_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
                    DEVICE_MAX_AGE.as_secs(),
                    self.secure()
                ));
            }
        }
        Ok(LoggedIn {
            user,
            cookies,
            csrf,
        })
    }

    /// Audits a request refused before it reached an operation.
    pub(crate) async fn refuse(
        self: &Arc<Self>,
        actor: &str,
        action: &'static str,
        reason: &'static str,
    ) -> Result<(), ApiError> {
        let actor = actor.to_string();
        blocking(self, move |c| c.record_refusal(&actor, action, reason)).await
    }

    /// A state-changing request from a session must carry its CSRF token
    /// (`X-CSRF-Token` header or a `csrf` form field); a missing or wrong
    /// one is refused and audited.
    pub(crate) async fn check_csrf(
        self: &Arc<Self>,
        caller: &Caller,
        headers: &HeaderMap,
        form: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(expected) = &caller.csrf else {
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
            self.refuse(&caller.user.name, "csrf", "bad-csrf-token")
                .await?;
            Err(ApiError::Forbidden)
        }
    }

    /// Ends the caller's session; the cookie value that clears it.
    pub(crate) fn logout(&self, headers: &HeaderMap) -> String {
        if let Some(sid) = cookie_value(headers) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session_key(&sid));
        }
        format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            self.secure()
        )
    }

    /// The caller, from an API token or a live session.
    pub(crate) async fn caller(self: &Arc<Self>, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if let Some(token) = bearer(headers) {
            // A valid token costs one hash and two reads of small, hot
            // trees that sled serves from memory: checked in place, sparing
            // a hand-off to the blocking pool. On a database server the two
            // reads are round trips, which must not hold a runtime thread:
            // there the check runs on the blocking pool too. A bad token is
            // audited, which waits for a durable write, so that half always
            // runs off the runtime.
            let checked = if self.c.store_location().reads_in_process() {
                self.c.check_token(&token)
            } else {
                let k = Arc::clone(self);
                let t = token.clone();
                tokio::task::spawn_blocking(move || k.c.check_token(&t))
                    .await
                    .map_err(|_| ApiError::Internal)?
            };
            return match checked {
                Ok(user) => Ok(Caller {
                    user,
                    csrf: None,
                    nav: Vec::new(),
                }),
                Err(why) => blocking(self, move |c| Err(c.reject_token(&token, why)))
                    .await
                    .map(|user| Caller {
                        user,
                        csrf: None,
                        nav: Vec::new(),
                    }),
            };
        }
        let sid = cookie_value(headers).ok_or(ApiError::Unauthorized)?;
        let (name, csrf) = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let key = session_key(&sid);
            let now = Instant::now();
            let max = self.config.session_max;
            match sessions.get_mut(&key) {
                Some(s) if s.expires > now && s.created + max > now => {
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
        let user = self
            .c
            .session_user(&name)
            .map_err(|_| ApiError::Unauthorized)?;
        if user.disabled {
            return Err(ApiError::Unauthorized);
        }
        Ok(Caller {
            user,
            csrf: Some(csrf),
            nav: Vec::new(),
        })
    }
}
