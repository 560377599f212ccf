//! Logging in to the web UI with GitHub (OAuth web flow), as an option
//! beside the API token. GitHub users are mapped to what they may do: build
//! (build, rerun, cancel) and unlock (locks, the queue, deferred builds);
//! any other GitHub user who logs in may read.
//!
//! Sessions live in memory: a restart logs everyone out, which costs one
//! click on "Log in with GitHub".

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::AppState;

/// The session cookie.
pub const SESSION_COOKIE: &str = "decap_session";
/// The state cookie of a login under way.
const STATE_COOKIE: &str = "decap_oauth_state";
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The GitHub OAuth App and who may do what.
#[derive(Clone)]
pub struct OAuthConfig {
    /// The OAuth App's client id.
    pub client_id: String,
    /// Its secret (never printed).
    pub client_secret: String,
    /// GitHub's web address (`https://github.com`, or GitHub Enterprise's).
    pub web_url: String,
    /// GitHub's API (`https://api.github.com`, or `https://HOST/api/v3`).
    pub api_url: String,
    /// Logins that may build, rerun and cancel.
    pub builders: HashSet<String>,
    /// Logins that may also unlock, and open or close the queue.
    pub unlockers: HashSet<String>,
}

impl std::fmt::Debug for OAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthConfig")
            .field("client_id", &self.client_id)
            .field("web_url", &self.web_url)
            .finish_non_exhaustive()
    }
}

/// A logged-in GitHub user.
#[derive(Debug, Clone)]
pub struct Session {
    /// The GitHub login.
    pub login: String,
    /// May build, rerun and cancel.
    pub can_build: bool,
    /// May unlock and run the queue.
    pub can_unlock: bool,
    expires: Instant,
}

/// GitHub login: the configuration and the sessions.
pub struct GitHubLogin {
    config: OAuthConfig,
    http: reqwest::Client,
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
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

impl GitHubLogin {
    /// GitHub login with `config`.
    pub fn new(config: OAuthConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .user_agent("decap")
            .build()
            .unwrap_or_default();
        GitHubLogin {
            config,
            http,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The session the request carries, if it is live.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self.sessions.lock().ok()?;
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(&id).cloned()
    }

    fn start_session(&self, login: &str) -> String {
        let id = random_token();
        let key = login.to_ascii_lowercase();
        let session = Session {
            login: login.to_owned(),
            can_build: self.config.builders.contains(&key) || self.config.unlockers.contains(&key),
            can_unlock: self.config.unlockers.contains(&key),
            expires: Instant::now() + SESSION_TTL,
        };
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(id.clone(), session);
        }
        id
    }

    fn end_session(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut s)) = (cookie(headers, SESSION_COOKIE), self.sessions.lock()) {
            s.remove(&id);
        }
    }

    /// Trades the code GitHub sent back for the user's login.
    async fn login_of(&self, code: &str, redirect_uri: &str) -> Result<String, String> {
        let c = &self.config;
        let answer: serde_json::Value = self
            .http
            .post(format!(
                "{}/login/oauth/access_token",
                c.web_url.trim_end_matches('/')
            ))
            .header(header::ACCEPT, "application/json")
            .form(&[
                ("client_id", c.client_id.as_str()),
                ("client_secret", c.client_secret.as_str()),
                ("code", code),
                ("redirect_uri", redirect_uri),
            ])
            .send()
            .await
            .map_err(|e| format!("GitHub could not be reached: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GitHub's answer was not JSON: {e}"))?;
        let Some(token) = answer["access_token"].as_str() else {
            return Err(format!(
                "GitHub refused the login: {}",
                answer["error_description"]
                    .as_str()
                    .or(answer["error"].as_str())
                    .unwrap_or("no reason given")
            ));
        };
        let user: serde_json::Value = self
            .http
            .get(format!("{}/user", c.api_url.trim_end_matches('/')))
            .bearer_auth(token)
            .header(header::ACCEPT, "application/vnd.github+json")
            .send()
            .await
            .map_err(|e| format!("GitHub could not be reached: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GitHub's user was not JSON: {e}"))?;
        user["login"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "GitHub named no user".to_owned())
    }
}

fn redirect_uri(app: &AppState) -> String {
    format!(
        "{}/login/github/callback",
        app.controller.config.public_url.trim_end_matches('/')
    )
}

fn secure(app: &AppState) -> &'static str {
    if app.controller.config.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

fn with_cookie(mut r: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// `GET /login/github`: off to GitHub, with a state that comes back.
pub async fn start(State(app): State<AppState>) -> Response {
    let Some(gh) = &app.oauth else {
        return crate::ui::not_found_page("Logging in with GitHub is not set up here.");
    };
    let state = random_token();
    let mut url = reqwest::Url::parse(&format!(
        "{}/login/oauth/authorize",
        gh.config.web_url.trim_end_matches('/')
    ))
    .unwrap_or_else(|_| {
        reqwest::Url::parse("https://github.com/login/oauth/authorize").expect("a valid URL")
    });
    url.query_pairs_mut()
        .append_pair("client_id", &gh.config.client_id)
        .append_pair("redirect_uri", &redirect_uri(&app))
        .append_pair("state", &state)
        .append_pair("scope", "read:user");
    // Lax: the cookie must come back on GitHub's redirect to us.
    with_cookie(
        Redirect::to(url.as_str()).into_response(),
        &format!(
            "{STATE_COOKIE}={state}; Path=/login/github; HttpOnly; SameSite=Lax; Max-Age=600{}",
            secure(&app)
        ),
    )
}

/// GitHub's redirect back.
#[derive(Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /login/github/callback`: checks the state, trades the code for the
/// user, starts a session.
pub async fn callback(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let Some(gh) = &app.oauth else {
        return crate::ui::not_found_page("Logging in with GitHub is not set up here.");
    };
    let refuse = |why: &str| crate::ui::error_page(StatusCode::BAD_REQUEST, "Login failed", why);
    if let Some(e) = q.error {
        return refuse(&format!("GitHub said: {e}"));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return refuse("GitHub's answer lacks the code or the state.");
    };
    let expected = cookie(&headers, STATE_COOKIE);
    let same = expected
        .as_deref()
        .is_some_and(|e| subtle::ConstantTimeEq::ct_eq(e.as_bytes(), state.as_bytes()).into());
    if !same {
        return refuse("This login did not start here (its state does not match). Try again.");
    }
    let login = match gh.login_of(&code, &redirect_uri(&app)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "GitHub login failed");
            return crate::ui::error_page(StatusCode::BAD_GATEWAY, "Login failed", &e);
        }
    };
    let id = gh.start_session(&login);
    tracing::info!(login = %login, "logged in with GitHub");
    let r = with_cookie(
        Redirect::to("/").into_response(),
        &format!(
            "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
            SESSION_TTL.as_secs(),
            secure(&app)
        ),
    );
    with_cookie(
        r,
        &format!("{STATE_COOKIE}=; Path=/login/github; HttpOnly; SameSite=Lax; Max-Age=0"),
    )
}

/// Ends the GitHub session of the request, if any.
pub fn logout(app: &AppState, headers: &HeaderMap) {
    if let Some(gh) = &app.oauth {
        gh.end_session(headers);
    }
}
