//! Logging in to the web UI with GitHub (OAuth web flow), as an option
//! beside the API token. GitHub users are mapped to what they may do: build
//! (build, rerun, cancel) and unlock (locks, the queue, deferred builds);
//! any other GitHub user who logs in may read.
//!
//! Sessions are [`crate::session`]'s, shared with logging in with the API
//! token: in memory, so a restart logs everyone out, which costs one click
//! on "Log in with GitHub".

use std::collections::HashSet;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::AppState;
use crate::session::{Holder, cookie, random_id};

/// The state cookie of a login under way.
const STATE_COOKIE: &str = "decap_oauth_state";

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

/// GitHub login: the OAuth App and an HTTP client for GitHub.
pub struct GitHubLogin {
    config: OAuthConfig,
    http: reqwest::Client,
}

impl GitHubLogin {
    /// GitHub login with `config`.
    pub fn new(config: OAuthConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .user_agent("decap")
            .build()
            .unwrap_or_default();
        GitHubLogin { config, http }
    }

    /// What a GitHub login may do: build (and rerun, cancel), and unlock
    /// (and run the queue).
    pub fn rights(&self, login: &str) -> (bool, bool) {
        let key = login.to_ascii_lowercase();
        let can_unlock = self.config.unlockers.contains(&key);
        (
            self.config.builders.contains(&key) || can_unlock,
            can_unlock,
        )
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
    let state = random_id();
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
    let (can_build, can_unlock) = gh.rights(&login);
    // A fresh id at each login, whatever session the browser had.
    app.sessions.end(&headers).await;
    let id = match app
        .sessions
        .start(Holder::GitHub(login.clone()), can_build, can_unlock)
        .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "cannot store a login session");
            return crate::ui::error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot log in now",
                "Decap cannot store login sessions at the moment; try again shortly.",
            );
        }
    };
    tracing::info!(login = %login, "logged in with GitHub");
    // Lax: the cookie must come along on this redirect, which GitHub's
    // (another site's) redirect to us started.
    let r = with_cookie(
        Redirect::to("/").into_response(),
        &crate::session::set_cookie(&id, "Lax", !secure(&app).is_empty()),
    );
    with_cookie(
        r,
        &format!("{STATE_COOKIE}=; Path=/login/github; HttpOnly; SameSite=Lax; Max-Age=0"),
    )
}
