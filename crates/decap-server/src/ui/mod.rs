//! The web UI: server-rendered pages (askama templates under `templates/`,
//! escaped by default) over the same controller calls as the JSON API, htmx
//! for actions and navigation, server-sent events for live updates. Every
//! asset is vendored and compiled into the binary; nothing is fetched at run
//! time.
//!
//! Reading needs no login (like the API's reads). Every action needs a
//! login: the login form checks the API token and starts a session
//! ([`crate::session`]: the `HttpOnly`, `SameSite=Strict` cookie holds a
//! random id, never the token), and actions also refuse a cross-site
//! `Origin`. With `--insecure-local`, this machine's own browser acts without
//! logging in (see [`crate::auth::local_request`]: a loopback client, a
//! loopback `Host`, no other site's `Origin`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use decap_core::build::{Build, BuildStatus};
use time::OffsetDateTime;

use crate::AppState;
use crate::error::ApiError;

mod actions;
mod build;
mod dashboard;
mod login;
mod pipelines;
mod projects;
mod queue;

pub use actions::*;
pub use build::*;
pub use dashboard::*;
pub use login::*;
pub use pipelines::{approve_stage, rerun_stage};
pub use projects::*;
pub use queue::*;

/// The cookie earlier versions kept the API token itself in: never read,
/// cleared at login and logout.
const OLD_TOKEN_COOKIE: &str = "decap_token";
const HTMX: &str = include_str!("../../assets/htmx-2.0.11.min.js");
const CSS: &str = include_str!("../../assets/decap.css");
const JS: &str = include_str!("../../assets/decap.js");

/// `GET /assets/{name}`: the vendored scripts and the style sheet, cached
/// for a day (their names change with their content's version).
pub async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "htmx-2.0.11.min.js" => (HTMX, "text/javascript; charset=utf-8"),
        "decap.css" => (CSS, "text/css; charset=utf-8"),
        "decap.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return not_found_page("no such asset"),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------- helpers

/// A status as words and a symbol, so that colour never tells it alone.
pub struct StatusView {
    /// `succeeded`, `failed`, …
    pub name: &'static str,
    /// ✓, ✗, …
    pub symbol: &'static str,
}

fn status_view(s: BuildStatus) -> StatusView {
    let symbol = match s {
        BuildStatus::Queued => "○",
        BuildStatus::Deferred => "◷",
        BuildStatus::Running => "▶",
        BuildStatus::Succeeded => "✓",
        BuildStatus::Failed => "✗",
        BuildStatus::Errored => "!",
        BuildStatus::TimedOut => "⧖",
        BuildStatus::Cancelled => "⊘",
    };
    StatusView {
        name: s.as_str(),
        symbol,
    }
}

/// A moment: exact (RFC 3339, for hover and scripts) and relative.
pub struct When {
    /// RFC 3339.
    pub exact: String,
    /// "3 min ago".
    pub relative: String,
}

fn when(t: OffsetDateTime) -> When {
    let exact = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let secs = (OffsetDateTime::now_utc() - t).whole_seconds();
    let ahead = -secs;
    let relative = match secs {
        _ if ahead >= 60 * 60 => format!("in {} h", ahead / 3600),
        _ if ahead >= 60 => format!("in {} min", ahead / 60),
        _ if ahead >= 5 => format!("in {ahead} s"),
        s if s < 5 => "just now".to_owned(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    };
    When { exact, relative }
}

fn duration_text(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms} ms"),
        s if s < 60 => format!("{}.{} s", s, (ms % 1000) / 100),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn short(commit: &Option<String>) -> String {
    commit
        .as_deref()
        .map(|c| c.chars().take(10).collect())
        .unwrap_or_default()
}

/// A build as a row.
pub struct BuildRow {
    /// Its id.
    pub id: String,
    /// `team/project`.
    pub project: String,
    /// Its branch.
    pub branch: String,
    /// Its commit, shortened.
    pub commit: String,
    /// Its status.
    pub status: StatusView,
    /// How it was started.
    pub trigger: &'static str,
    /// When it was asked for.
    pub queued: When,
    /// How long it ran (or has been running).
    pub duration: String,
    /// Why it waits or how it ended.
    pub message: String,
    /// The stage of a pipeline it is an attempt of (empty without one).
    pub stage: String,
}

fn row(b: &Build) -> BuildRow {
    let duration = match (b.start_time, b.end_time) {
        (Some(s), Some(e)) => duration_text((e - s).whole_milliseconds() as i64),
        (Some(s), None) => {
            duration_text((OffsetDateTime::now_utc() - s).whole_milliseconds() as i64)
        }
        _ => String::new(),
    };
    BuildRow {
        id: b.id.to_string(),
        project: b.project.to_string(),
        branch: b.branch.clone(),
        commit: short(&b.commit),
        status: status_view(b.status),
        trigger: b.trigger.as_str(),
        queued: when(b.queued_at),
        duration,
        message: b.message.clone().unwrap_or_default(),
        stage: b
            .stage
            .as_ref()
            .map(|s| format!("{} (attempt {})", s.name, s.attempt))
            .unwrap_or_default(),
    }
}

/// With `private_reads`, lets a request through only with the token (as a
/// bearer), a login session, or from this machine's own browser or CLI
/// under `--insecure-local`; browsers are sent to the login page, programs
/// get a 401.
pub async fn guard_reads(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !app.auth.private_reads {
        return next.run(req).await;
    }
    let path = req.uri().path();
    let open = matches!(path, "/login" | "/logout" | "/healthz" | "/readyz" | "/metrics")
        || path.starts_with("/assets/")
        || path.starts_with("/hooks/")
        // bctool's calls carry their own build token, checked by their handlers
        || (req.method() != axum::http::Method::GET && path.starts_with("/api/v1/"));
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| app.auth.token_matches(t.trim()));
    let peer = crate::auth::peer(&req);
    let open = open || path.starts_with("/login/github");
    let v = viewer(&app, headers, peer).await;
    if open || bearer || v.can_act || v.logged_in {
        return next.run(req).await;
    }
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        Redirect::to("/login").into_response()
    } else {
        let why = app.auth.local_refusal_note(headers, peer);
        ApiError::unauthorized(format!(
            "reading needs the API token here: send Authorization: Bearer <DECAP_API_TOKEN>{why}"
        ))
        .into_response()
    }
}

/// Who is looking: may they act?
pub struct Viewer {
    /// May build, rerun and cancel: logged in with the token, or a GitHub
    /// user who may build (or this machine's own browser under
    /// `--insecure-local`).
    pub can_act: bool,
    /// May also unlock and run the queue.
    pub can_unlock: bool,
    /// Logged in (with the token or with GitHub).
    pub logged_in: bool,
    /// The GitHub user, when logged in with GitHub.
    pub user: String,
    /// Builds run with no sandbox (`--sandbox none`): every page says so.
    pub unsandboxed: bool,
    /// Decap's version and commit, in every page's footer.
    pub version: String,
}

async fn viewer(app: &AppState, headers: &HeaderMap, peer: Option<SocketAddr>) -> Viewer {
    let local = app.auth.is_local(headers, peer);
    let session = app.sessions.get(headers).await;
    let (can_build, can_unlock) = session
        .as_ref()
        .map_or((false, false), |s| (s.can_build, s.can_unlock));
    Viewer {
        can_act: local || can_build,
        can_unlock: local || can_unlock,
        logged_in: session.is_some(),
        user: session
            .as_ref()
            .and_then(|s| s.github_login())
            .unwrap_or_default()
            .to_owned(),
        unsandboxed: app.controller.ports.executor.sandbox() == "none",
        version: format!("{} ({})", app.version.version, app.version.commit),
    }
}

/// Checks an action on locks or the queue: [`refuse_action`], then the
/// right to unlock.
async fn refuse_unlock(
    app: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<Response> {
    if let Some(r) = refuse_action(app, headers, peer).await {
        return Some(r);
    }
    (!viewer(app, headers, peer).await.can_unlock).then(|| {
        error_page(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "Unlocking and running the queue are for those Decap lets unlock.",
        )
    })
}

/// Checks an action: a login session (or this machine's own browser under
/// `--insecure-local`) and a same-site `Origin` when the browser sends one;
/// the answer to give when refused.
async fn refuse_action(
    app: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<Response> {
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or(origin);
        if origin_host != host {
            return Some(error_page(
                StatusCode::FORBIDDEN,
                "Refused",
                "This action came from another site.",
            ));
        }
    }
    if viewer(app, headers, peer).await.can_act {
        None
    } else {
        Some(Redirect::to("/login").into_response())
    }
}

fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
    viewer: Viewer,
}

pub(crate) fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let mut r = render(&ErrorPage {
        title,
        message,
        viewer: Viewer {
            can_act: false,
            can_unlock: false,
            logged_in: false,
            user: String::new(),
            unsandboxed: false,
            version: String::new(),
        },
    });
    *r.status_mut() = status;
    r
}

/// The friendly 404 page.
pub fn not_found_page(message: &str) -> Response {
    error_page(StatusCode::NOT_FOUND, "Not found", message)
}

fn api_error_page(e: ApiError) -> Response {
    let title = match e.status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::BAD_REQUEST => "That does not look right",
        StatusCode::CONFLICT => "Not now",
        _ => "Something went wrong",
    };
    error_page(e.status, title, &e.message)
}

fn core_error_page(e: decap_core::Error) -> Response {
    api_error_page(ApiError::from(e))
}

fn query(q: &Option<String>) -> HashMap<String, String> {
    q.as_deref()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .map(|pairs| pairs.into_iter().collect())
        .unwrap_or_default()
}

/// The client's address, when the request came over TCP (never for one
/// from the build socket: see [`crate::auth::peer`]).
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(crate::auth::peer_of(&parts.extensions)))
    }
}

// -------------------------------------------------------------- dashboard
