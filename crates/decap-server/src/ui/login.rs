//! Signing in and out.

use super::{OLD_TOKEN_COOKIE, Peer, Viewer, error_page, render, viewer};
use crate::AppState;
use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    viewer: Viewer,
    error: String,
    configured: bool,
    github: bool,
    /// Why `--insecure-local` does not let this browser act, when it is on.
    local_note: String,
}

async fn login_page(
    app: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    error: &str,
) -> Response {
    render(&LoginPage {
        viewer: viewer(app, headers, peer).await,
        error: error.to_owned(),
        configured: app.auth.api_token.is_some(),
        github: app.oauth.is_some(),
        // Said to browsers on this machine only: others are never local.
        local_note: peer
            .filter(|p| p.ip().to_canonical().is_loopback())
            .and_then(|_| app.auth.local_refusal(headers, peer))
            .unwrap_or_default(),
    })
}

/// `GET /login`.
pub async fn login_form(State(app): State<AppState>, headers: HeaderMap, ci: Peer) -> Response {
    login_page(&app, &headers, ci.0, "").await
}

/// The login form.
#[derive(Deserialize)]
pub struct LoginForm {
    /// The API token.
    pub token: String,
}

fn clear_cookie(r: &mut Response, name: &str, same_site: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{name}=; Path=/; HttpOnly; SameSite={same_site}; Max-Age=0"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// `POST /login` — checks the token and starts a session; the cookie holds
/// the session's random id, never the token.
pub async fn login(
    State(app): State<AppState>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<LoginForm>,
) -> Response {
    if !app.auth.token_matches(form.token.trim()) {
        let mut r = login_page(&app, &headers, ci.0, "That is not the API token.").await;
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    // A fresh id at each login, whatever session the browser had.
    app.sessions.end(&headers).await;
    let id = match app
        .sessions
        .start(crate::session::Holder::ApiToken, true, true)
        .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "cannot store a login session");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot log in now",
                "Decap cannot store login sessions at the moment; try again shortly.",
            );
        }
    };
    let secure = app.controller.config.public_url.starts_with("https://");
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&crate::session::set_cookie(&id, "Strict", secure)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    clear_cookie(&mut r, OLD_TOKEN_COOKIE, "Strict");
    r
}

/// `POST /logout` — ends the session, here and in the browser.
pub async fn logout(State(app): State<AppState>, headers: HeaderMap) -> Response {
    app.sessions.end(&headers).await;
    let mut r = Redirect::to("/").into_response();
    clear_cookie(&mut r, crate::session::COOKIE, "Lax");
    clear_cookie(&mut r, OLD_TOKEN_COOKIE, "Strict");
    r
}
