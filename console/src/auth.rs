//! Who is asking: a session cookie (after a password login) or an API
//! token; CSRF tokens for sessions; throttling of failed logins.
//!
//! Sessions, known devices and the throttle's counts are kept in the
//! environment's store ([`cloister_host::console_state`]), so every
//! `cloister serve` process over one environment shares them: a session
//! is valid on any replica, a logout ends it on all, and failed logins are
//! counted across replicas. The cookie holds a random session id; the
//! store keeps only its SHA-256, with the user name, a per-session CSRF
//! token, an idle expiry that use renews and an absolute one that nothing
//! renews. A new login ends the user's older sessions (when
//! `one_session_per_user` is set, the default). The user is read from the
//! store on every request, so disabling a user ends their sessions at once.
//!
//! Failed logins are throttled per user name, per client address and per
//! known device ([`cloister_host::console_state::ConsoleState::attempt`]).
//! A successful login also sets a long-lived device cookie: a later login
//! from that browser is counted against the device, not the name, so a
//! stranger who locks a name out by guessing does not lock out its owner's
//! own browsers. The trade-off: a browser without such a cookie (new or
//! cleared) waits out the name's lockout like anyone else.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use cloister_host::Digest;
use cloister_host::audit::events;
use cloister_host::console_state::{ConsoleState, Session, now_ms};
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
            self.refuse(&name, events::LOGIN, reason).await?;
            return Err(ApiError::Unauthorized);
        }
        let name_key = format!("user:{}", name.to_ascii_lowercase());
        let device = named_cookie(headers, DEVICE_COOKIE).map(|d| session_key(&d));
        let client_key = client.map(|ip| format!("client:{ip}"));
        let (free, client_free, cap) = (
            self.config.free_failures,
            self.config.client_free_failures,
            self.config.max_tracked,
        );
        let (who, dev, ck) = (name.clone(), device.clone(), client_key.clone());
        let throttled = self
            .state(move |st| {
                let now = now_ms();
                let own_device = match &dev {
                    Some(d) => st
                        .device_owner(d)?
                        .filter(|u| u.eq_ignore_ascii_case(&who))
                        .map(|_| format!("device:{d}")),
                    None => None,
                };
                if let Some(k) = &ck
                    && let Err(left) = st.attempt(k, client_free, now, cap)?
                {
                    return Ok(Err(left));
                }
                let key = own_device.unwrap_or(name_key);
                Ok(st.attempt(&key, free, now, cap)?.map(|()| key))
            })
            .await?;
        let key = match throttled {
            Ok(key) => key,
            Err(left) => {
                self.refuse(&name, events::LOGIN, "throttled").await?;
                return Err(ApiError::TooMany(left.as_secs() + 1));
            }
        };
        let checked = name.clone();
        let user = match blocking(self, move |c| c.login(&checked, &password)).await {
            Ok(u) => u,
            Err(ApiError::Internal) => return Err(ApiError::Internal),
            Err(_) => return Err(ApiError::Unauthorized),
        };
        self.state(move |st| {
            // The password is proven: the name's (or device's) failures are
            // forgotten. The client's count only loses this attempt, so
            // logging into one's own account between guesses at others
            // does not reset it.
            st.forget(&key)?;
            if let Some(k) = &client_key {
                st.refund(k)?;
            }
            Ok(())
        })
        .await?;
        self.start_session(user, device).await
    }

    /// Runs `f` over the console's stored state on a blocking thread (the
    /// store blocks); a store failure is an internal error.
    pub(crate) async fn state<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(ConsoleState<'_>) -> Result<T, cloister_host::store::StoreError> + Send + 'static,
    {
        let k = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(k.c.console_state()))
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(|e| {
                tracing::error!(error = %e, "the console's stored state failed");
                ApiError::Internal
            })
    }

    /// A new session for `user` (and the device cookie): the login's result.
    async fn start_session(
        self: &Arc<Self>,
        user: User,
        device: Option<String>,
    ) -> Result<LoggedIn, ApiError> {
        let sid = random_hex(32)?;
        let csrf = random_hex(32)?;
        let new_device = random_hex(32)?;
        let (key, name, token) = (session_key(&sid), user.name.clone(), csrf.clone());
        let (ttl, max, one, cap) = (
            self.config.session_ttl,
            self.config.session_max,
            self.config.one_session_per_user,
            self.config.max_tracked,
        );
        let device_key = session_key(&new_device);
        let set_device = self
            .state(move |st| {
                let now = now_ms();
                st.start_session(
                    &key,
                    &Session {
                        user: name.clone(),
                        csrf: token,
                        expires_ms: now + ttl.as_millis() as u64,
                        created_ms: now,
                    },
                    one,
                    max,
                )?;
                let known = match &device {
                    Some(d) => st.device_owner(d)?.is_some_and(|u| u == name),
                    None => false,
                };
                match device.filter(|_| known) {
                    Some(d) => {
                        st.remember_device(&d, &name, now, cap)?;
                        Ok(false)
                    }
                    None => {
                        st.remember_device(&device_key, &name, now, cap)?;
                        Ok(true)
                    }
                }
            })
            .await?;
        let mut cookies = vec![format!(
            "{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.config
                .session_ttl
                .min(self.config.session_max)
                .as_secs(),
            self.secure()
        )];
        if set_device {
            cookies.push(format!(
                "{DEVICE_COOKIE}={new_device}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
                DEVICE_MAX_AGE.as_secs(),
                self.secure()
            ));
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
            self.refuse(&caller.user.name, events::CSRF, "bad-csrf-token")
                .await?;
            Err(ApiError::Forbidden)
        }
    }

    /// Ends the caller's session on every replica; the cookie value that
    /// clears it.
    pub(crate) async fn logout(self: &Arc<Self>, headers: &HeaderMap) -> Result<String, ApiError> {
        if let Some(sid) = cookie_value(headers) {
            let key = session_key(&sid);
            self.state(move |st| st.end_session(&key)).await?;
        }
        Ok(format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            self.secure()
        ))
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
        let key = session_key(&sid);
        let (ttl, max) = (self.config.session_ttl, self.config.session_max);
        // As for tokens: on sled a read (and, now and then, an unsynced
        // renewal) in place; on a database server, off the runtime.
        let session = if self.c.store_location().reads_in_process() {
            self.c
                .console_state()
                .session(&key, now_ms(), ttl, max)
                .map_err(|e| {
                    tracing::error!(error = %e, "reading a console session failed");
                    ApiError::Internal
                })?
        } else {
            self.state(move |st| st.session(&key, now_ms(), ttl, max))
                .await?
        };
        let Some(Session {
            user: name, csrf, ..
        }) = session
        else {
            return Err(ApiError::Unauthorized);
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
