//! Who is logged in to the web UI: one store for both ways of logging in,
//! the API token (`POST /login`) and GitHub (`/login/github`).
//!
//! * The browser holds a random session id in [`COOKIE`], never a
//!   credential: two version-4 UUIDs from the operating system's random
//!   generator, 244 random bits. The store is keyed by the id's SHA-256, so
//!   what it holds cannot be replayed as a cookie.
//! * A session ends [`TTL`] (12 hours) after logging in, however active it
//!   is: a fixed lifetime, the same as the cookie's `Max-Age`, so a copied
//!   cookie is good for a working day at most.
//! * Logging out ends the session in the store, not only in the browser.
//! * Sessions live in a [`SessionStore`]: in memory by default (a restart
//!   logs everyone out, and so does a changed API token, which takes a
//!   restart; at most [`MAX_SESSIONS`] are kept, past that the one closest
//!   to its end goes first), or in DynamoDB beside the build records, so
//!   that every replica knows every login.
//! * A store that cannot be read logs no one in (and says why in the
//!   server's log); one that cannot be written refuses the login.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, header};
use decap_core::ports::{SessionStore, StoredSession};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The session cookie.
pub const COOKIE: &str = "decap_session";
/// How long a session lasts after logging in.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions the in-memory store keeps at once.
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
    pub expires: OffsetDateTime,
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

impl From<StoredSession> for Session {
    fn from(s: StoredSession) -> Self {
        Session {
            holder: s.github_login.map_or(Holder::ApiToken, Holder::GitHub),
            can_build: s.can_build,
            can_unlock: s.can_unlock,
            expires: s.expires_at,
        }
    }
}

/// [`SessionStore`] in this process's memory.
#[derive(Debug, Default)]
pub struct MemorySessionStore {
    live: Mutex<HashMap<String, StoredSession>>,
}

impl MemorySessionStore {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, StoredSession>> {
        // The map stays consistent whatever panicked while holding it.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many sessions are live at `now`.
    pub fn len(&self, now: OffsetDateTime) -> usize {
        self.live().values().filter(|s| s.expires_at > now).count()
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn put(&self, key: &str, session: &StoredSession) -> decap_core::Result<()> {
        let now = OffsetDateTime::now_utc();
        let mut live = self.live();
        live.retain(|_, s| s.expires_at > now);
        while live.len() >= MAX_SESSIONS && !live.contains_key(key) {
            let Some(first) = live
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            live.remove(&first);
        }
        live.insert(key.to_owned(), session.clone());
        Ok(())
    }

    async fn get(
        &self,
        key: &str,
        now: OffsetDateTime,
    ) -> decap_core::Result<Option<StoredSession>> {
        // Ended sessions go at the next login (`put`).
        Ok(self.live().get(key).filter(|s| s.expires_at > now).cloned())
    }

    async fn remove(&self, key: &str) -> decap_core::Result<()> {
        self.live().remove(key);
        Ok(())
    }
}

/// The live sessions, in a store keyed by the SHA-256 of their ids.
#[derive(Clone)]
pub struct Sessions {
    store: Arc<dyn SessionStore>,
}

impl Default for Sessions {
    /// In memory.
    fn default() -> Self {
        Sessions::new(Arc::new(MemorySessionStore::default()))
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

/// A fresh random id (244 bits from the operating system), as 64 hex digits.
pub(crate) fn random_id() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

/// What the store keys a session by: the SHA-256 of its id, in hex.
fn key(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
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
    /// Sessions in `store`.
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        Sessions { store }
    }

    /// Starts a session; answers its id, for the cookie.
    pub async fn start(
        &self,
        holder: Holder,
        can_build: bool,
        can_unlock: bool,
    ) -> decap_core::Result<String> {
        let id = random_id();
        let session = StoredSession {
            github_login: match holder {
                Holder::ApiToken => None,
                Holder::GitHub(login) => Some(login),
            },
            can_build,
            can_unlock,
            expires_at: OffsetDateTime::now_utc() + TTL,
        };
        self.store.put(&key(&id), &session).await?;
        Ok(id)
    }

    /// The live session whose id the request's cookie holds.
    pub async fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        // Only ids this server could have made are looked up.
        if id.len() != 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        match self.store.get(&key(&id), OffsetDateTime::now_utc()).await {
            Ok(s) => s.map(Session::from),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the login sessions: treating the request as logged out");
                None
            }
        }
    }

    /// Ends the session the request's cookie names, if any.
    pub async fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE)
            && let Err(e) = self.store.remove(&key(&id)).await
        {
            tracing::warn!(error = %e, "cannot end a login session in its store");
        }
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

    #[tokio::test]
    async fn a_session_is_found_by_its_id_only_until_it_ends() {
        let store = Arc::new(MemorySessionStore::default());
        let sessions = Sessions::new(store.clone());
        let id = sessions.start(Holder::ApiToken, true, true).await.unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        let h = with_cookie(&format!("other=1; {COOKIE}={id}"));
        let s = sessions.get(&h).await.unwrap();
        assert_eq!(s.holder, Holder::ApiToken);
        assert!(s.can_unlock);
        assert!(
            sessions
                .get(&with_cookie(&format!("{COOKIE}={}", random_id())))
                .await
                .is_none()
        );
        assert!(
            sessions
                .get(&with_cookie(&format!("{COOKIE}=x")))
                .await
                .is_none()
        );
        // Ids are not kept, only their hashes.
        assert!(!format!("{:?}", store).contains(&id));
        sessions.end(&h).await;
        assert!(sessions.get(&h).await.is_none());
        assert_eq!(store.len(OffsetDateTime::now_utc()), 0);
    }

    #[tokio::test]
    async fn ids_differ_and_ended_sessions_are_gone() {
        let store = Arc::new(MemorySessionStore::default());
        let sessions = Sessions::new(store.clone());
        let a = sessions
            .start(Holder::GitHub("octocat".into()), false, false)
            .await
            .unwrap();
        let b = sessions
            .start(Holder::GitHub("octocat".into()), false, false)
            .await
            .unwrap();
        assert_ne!(a, b);
        let now = OffsetDateTime::now_utc();
        assert_eq!(store.len(now), 2);
        if let Some(s) = store.live().get_mut(&key(&a)) {
            s.expires_at = now - time::Duration::seconds(1);
        }
        assert!(
            sessions
                .get(&with_cookie(&format!("{COOKIE}={a}")))
                .await
                .is_none()
        );
        let b = sessions
            .get(&with_cookie(&format!("{COOKIE}={b}")))
            .await
            .unwrap();
        assert_eq!(b.github_login(), Some("octocat"));
        assert_eq!(store.len(now), 1);
        // The ended one goes at the next login.
        sessions.start(Holder::ApiToken, true, true).await.unwrap();
        assert!(!store.live().contains_key(&key(&a)));
    }

    #[tokio::test]
    async fn the_memory_store_keeps_the_contract() {
        decap_contract_tests::session_store_suite(Arc::new(MemorySessionStore::default())).await;
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
