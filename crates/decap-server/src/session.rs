//! Who is logged in to the web UI: one in-memory store for both ways of
//! logging in, the API token (`POST /login`) and GitHub (`/login/github`).
//!
//! * The browser holds a random session id in [`COOKIE`], never a
//!   credential: two version-4 UUIDs from the operating system's random
//!   generator, 244 random bits. The store is keyed by the id's SHA-256, so
//!   what it holds cannot be replayed as a cookie.
//! * A session ends [`TTL`] (12 hours) after logging in, however active it
//!   is: a fixed lifetime, the same as the cookie's `Max-Age`, so a copied
//!   cookie is good for a working day at most.
//! * Logging out ends the session here, not only in the browser.
//! * Sessions live in memory: a restart logs everyone out, and so does a
//!   changed API token (which takes a restart).
//! * At most [`MAX_SESSIONS`] are kept; past that, the one closest to its
//!   end goes first.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// The session cookie.
pub const COOKIE: &str = "decap_session";
/// How long a session lasts after logging in.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept at once.
pub const MAX_SESSIONS: usize = 10_000;

/// How a session logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// With the API token: may do everything the token may.
    ApiToken,
    /// With GitHub, as this login.
    GitHub(String),
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    /// How it logged in.
    pub holder: Holder,
    /// May build, rerun and cancel.
    pub can_build: bool,
    /// May also unlock and run the queue.
    pub can_unlock: bool,
    /// When it ends.
    pub expires: Instant,
}

impl Session {
    /// The GitHub login, when logged in with GitHub.
    pub fn github_login(&self) -> Option<&str> {
        match &self.holder {
            Holder::GitHub(login) => Some(login),
            Holder::ApiToken => None,
        }
    }
}

/// The live sessions, by the SHA-256 of their ids.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Session>>,
}

/// A fresh random id (244 bits from the operating system), as 64 hex digits.
pub(crate) fn random_id() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// A cookie's value from the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The `Set-Cookie` value that hands a session to the browser: `HttpOnly`,
/// `SameSite` as given (`Strict` for token logins; `Lax` for GitHub's, whose
/// cookie must come along on the redirect back from GitHub), `Secure` when
/// the server is reached over https.
pub fn set_cookie(id: &str, same_site: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite={same_site}; Max-Age={}{}",
        TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

impl Sessions {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // The map stays consistent whatever panicked while holding it.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a session; answers its id, for the cookie.
    pub fn start(&self, holder: Holder, can_build: bool, can_unlock: bool) -> String {
        let id = random_id();
        let now = Instant::now();
        let mut live = self.live();
        live.retain(|_, s| s.expires > now);
        while live.len() >= MAX_SESSIONS {
            let Some(first) = live.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) else {
                break;
            };
            live.remove(&first);
        }
        live.insert(
            key(&id),
            Session {
                holder,
                can_build,
                can_unlock,
                expires: now + TTL,
            },
        );
        id
    }

    /// The live session whose id the request's cookie holds.
    pub fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let k = key(&cookie(headers, COOKIE)?);
        let mut live = self.live();
        let session = live.get(&k)?;
        if session.expires > Instant::now() {
            return Some(session.clone());
        }
        live.remove(&k);
        None
    }

    /// Ends the session the request's cookie names, if any.
    pub fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.live().remove(&key(&id));
        }
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.live().values().filter(|s| s.expires > now).count()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::http::HeaderValue;

    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn a_session_is_found_by_its_id_only_until_it_ends() {
        let sessions = Sessions::default();
        let id = sessions.start(Holder::ApiToken, true, true);
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        let h = with_cookie(&format!("other=1; {COOKIE}={id}"));
        let s = sessions.get(&h).unwrap();
        assert_eq!(s.holder, Holder::ApiToken);
        assert!(s.can_unlock);
        assert!(
            sessions
                .get(&with_cookie(&format!("{COOKIE}={}", random_id())))
                .is_none()
        );
        assert!(sessions.get(&with_cookie(&format!("{COOKIE}=x"))).is_none());
        // Ids are not kept, only their hashes.
        assert!(!format!("{:?}", sessions).contains(&id));
        sessions.end(&h);
        assert!(sessions.get(&h).is_none());
        assert!(sessions.is_empty());
    }

    #[test]
    fn ids_differ_and_expired_sessions_are_gone() {
        let sessions = Sessions::default();
        let a = sessions.start(Holder::GitHub("octocat".into()), false, false);
        let b = sessions.start(Holder::GitHub("octocat".into()), false, false);
        assert_ne!(a, b);
        assert_eq!(sessions.len(), 2);
        if let Some(s) = sessions.live().get_mut(&key(&a)) {
            s.expires = Instant::now() - Duration::from_secs(1);
        }
        assert!(
            sessions
                .get(&with_cookie(&format!("{COOKIE}={a}")))
                .is_none()
        );
        let b = sessions
            .get(&with_cookie(&format!("{COOKIE}={b}")))
            .unwrap();
        assert_eq!(b.github_login(), Some("octocat"));
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn the_cookie_is_http_only_and_ends_with_the_session() {
        let c = set_cookie("abc", "Strict", true);
        assert_eq!(
            c,
            "decap_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200; Secure"
        );
        assert!(!set_cookie("abc", "Lax", false).contains("Secure"));
    }
}
