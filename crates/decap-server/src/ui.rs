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
use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::BuildQuery;
use futures::Stream;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::AppState;
use crate::error::ApiError;

/// The cookie earlier versions kept the API token itself in: never read,
/// cleared at login and logout.
const OLD_TOKEN_COOKIE: &str = "decap_token";
const HTMX: &str = include_str!("../assets/htmx-2.0.11.min.js");
const CSS: &str = include_str!("../assets/decap.css");
const JS: &str = include_str!("../assets/decap.js");

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
    let v = viewer(&app, headers, peer);
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
}

fn viewer(app: &AppState, headers: &HeaderMap, peer: Option<SocketAddr>) -> Viewer {
    let local = app.auth.is_local(headers, peer);
    let session = app.sessions.get(headers);
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
    }
}

/// Checks an action on locks or the queue: [`refuse_action`], then the
/// right to unlock.
fn refuse_unlock(
    app: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<Response> {
    if let Some(r) = refuse_action(app, headers, peer) {
        return Some(r);
    }
    (!viewer(app, headers, peer).can_unlock).then(|| {
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
fn refuse_action(
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
    if viewer(app, headers, peer).can_act {
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

/// A running build with its progress.
pub struct RunningRow {
    /// The build.
    pub build: BuildRow,
    /// Percent done by the project's average (0–99), when there is one.
    pub percent: Option<i64>,
    /// "about 2 min left" or "running longer than usual".
    pub estimate: String,
}

/// A commit with a box per build.
pub struct CommitRow {
    /// `team/project`.
    pub project: String,
    /// Its branch.
    pub branch: String,
    /// The commit, shortened.
    pub commit: String,
    /// Its builds, oldest first.
    pub builds: Vec<BuildRow>,
}

/// A deferred build.
pub struct WaitingRow {
    /// The build.
    pub id: String,
    /// `team/project`.
    pub project: String,
    /// The branch.
    pub branch: String,
    /// Why it waits.
    pub reason: String,
    /// Since when.
    pub since: When,
}

/// The deferred builds, oldest first.
async fn waiting_rows(app: &AppState) -> decap_core::Result<Vec<WaitingRow>> {
    Ok(app
        .controller
        .ports
        .queue
        .list()
        .await?
        .into_iter()
        .map(|e| WaitingRow {
            id: e.build_id.to_string(),
            project: e.project.to_string(),
            branch: e.branch,
            reason: e.reason,
            since: when(e.deferred_at),
        })
        .collect())
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    viewer: Viewer,
    running: Vec<RunningRow>,
    waiting: Vec<WaitingRow>,
    latest: Vec<BuildRow>,
    commits: Vec<CommitRow>,
    queue_open: bool,
    /// Other CI servers' builds (the CI status hub).
    hub: Vec<crate::hub::ProjectState>,
}

/// `GET /` — what runs, what waits and why, the latest results, and recent
/// commits with a box per build.
pub async fn dashboard(State(app): State<AppState>, headers: HeaderMap, ci: Peer) -> Response {
    let ports = &app.controller.ports;
    let running = match ports
        .builds
        .list(&BuildQuery {
            statuses: vec![BuildStatus::Running],
            limit: 100,
            ..BuildQuery::default()
        })
        .await
    {
        Ok(p) => p.builds,
        Err(e) => return core_error_page(e),
    };
    let mut averages: HashMap<ProjectKey, Option<i64>> = HashMap::new();
    let mut running_rows = Vec::new();
    for b in &running {
        if !averages.contains_key(&b.project) {
            let avg = ports
                .builds
                .stats(&b.project, None, 20)
                .await
                .ok()
                .and_then(|s| s.average_duration_ms);
            averages.insert(b.project.clone(), avg);
        }
        let avg = averages.get(&b.project).copied().flatten();
        let elapsed = b
            .start_time
            .map(|s| (OffsetDateTime::now_utc() - s).whole_milliseconds() as i64)
            .unwrap_or(0);
        let (percent, estimate) = match avg {
            Some(avg) if avg > 0 => {
                let pct = (elapsed * 100 / avg).clamp(0, 99);
                let left = avg - elapsed;
                let text = if left > 0 {
                    format!("about {} left", duration_text(left))
                } else {
                    "running longer than usual".to_owned()
                };
                (Some(pct), text)
            }
            _ => (None, "no estimate yet".to_owned()),
        };
        running_rows.push(RunningRow {
            build: row(b),
            percent,
            estimate,
        });
    }
    let waiting = match waiting_rows(&app).await {
        Ok(rows) => rows,
        Err(e) => return core_error_page(e),
    };
    let recent = match ports
        .builds
        .list(&BuildQuery {
            limit: 200,
            ..BuildQuery::default()
        })
        .await
    {
        Ok(p) => p.builds,
        Err(e) => return core_error_page(e),
    };
    let latest = recent
        .iter()
        .filter(|b| b.status.is_final())
        .take(15)
        .map(row)
        .collect();
    // Commits, newest first, each with its builds oldest first.
    let mut order: Vec<(ProjectKey, String)> = Vec::new();
    let mut by_commit: HashMap<(ProjectKey, String), Vec<&Build>> = HashMap::new();
    for b in &recent {
        let key = (
            b.project.clone(),
            b.commit
                .clone()
                .unwrap_or_else(|| format!("ref {}", b.git_ref)),
        );
        if !by_commit.contains_key(&key) {
            order.push(key.clone());
        }
        by_commit.entry(key).or_default().push(b);
    }
    let commits = order
        .into_iter()
        .take(12)
        .filter_map(|key| {
            let mut builds = by_commit.remove(&key)?;
            builds.reverse();
            let first = builds.first()?;
            Some(CommitRow {
                project: key.0.to_string(),
                branch: first.branch.clone(),
                commit: first
                    .commit
                    .as_deref()
                    .map(|c| c.chars().take(10).collect())
                    .unwrap_or_else(|| "(no commit)".to_owned()),
                builds: builds.into_iter().map(row).collect(),
            })
        })
        .collect();
    render(&Dashboard {
        viewer: viewer(&app, &headers, ci.0),
        running: running_rows,
        waiting,
        latest,
        commits,
        queue_open: app.controller.queue_open().await,
        hub: match &app.hub {
            Some(hub) => hub.states().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the CI status hub");
                Vec::new()
            }),
            None => Vec::new(),
        },
    })
}

/// `GET /ui/events` — a server-sent event each time a build changes, so
/// pages refresh when something happened rather than on a timer.
pub async fn events(
    State(app): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    use futures::StreamExt;
    let stream =
        tokio_stream::wrappers::BroadcastStream::new(app.controller.subscribe()).map(|changed| {
            let data = match changed {
                Ok(b) => format!("{} {}", b.id, b.status.as_str()),
                Err(_) => "lagged".to_owned(), // some were missed: refresh anyway
            };
            Ok(Event::default().event("build").data(data))
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

// --------------------------------------------------------------- projects

/// A project in the list.
pub struct ProjectRow {
    /// Team.
    pub team: String,
    /// Project.
    pub project: String,
    /// Its description.
    pub description: String,
    /// Its repository.
    pub repo_url: String,
    /// Why its files are invalid.
    pub error: String,
    /// Its last finished build.
    pub last: Option<BuildRow>,
}

#[derive(Template)]
#[template(path = "projects.html")]
struct Projects {
    viewer: Viewer,
    teams: Vec<(String, Vec<ProjectRow>)>,
    scripts_commit: String,
}

/// `GET /projects` — every project of the build scripts, by team.
pub async fn projects(State(app): State<AppState>, headers: HeaderMap, ci: Peer) -> Response {
    let catalog = app.controller.ports.scripts.catalog();
    let mut teams: Vec<(String, Vec<ProjectRow>)> = Vec::new();
    for p in catalog.projects.values() {
        let last = app
            .controller
            .ports
            .builds
            .list(&BuildQuery {
                project: Some(p.key.clone()),
                statuses: decap_core::stats::FINAL.to_vec(),
                limit: 1,
                ..BuildQuery::default()
            })
            .await
            .ok()
            .and_then(|page| page.builds.first().map(row));
        let d = p.descriptor.as_ref().map(|d| &d.descriptor);
        let project = ProjectRow {
            team: p.key.team.clone(),
            project: p.key.project.clone(),
            description: d
                .and_then(|d| d.repo_description.clone())
                .unwrap_or_default(),
            repo_url: d
                .and_then(|d| d.repo_url.clone())
                .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
                .unwrap_or_default(),
            error: p.error.clone().unwrap_or_default(),
            last,
        };
        match teams.iter_mut().find(|(t, _)| *t == p.key.team) {
            Some((_, list)) => list.push(project),
            None => teams.push((p.key.team.clone(), vec![project])),
        }
    }
    render(&Projects {
        viewer: viewer(&app, &headers, ci.0),
        teams,
        scripts_commit: catalog.commit.clone(),
    })
}

/// A bar of the durations chart.
pub struct Bar {
    /// x of its left edge.
    pub x: usize,
    /// Its height (of 60).
    pub height: i64,
    /// y of its top.
    pub y: i64,
    /// Its status (the fill).
    pub status: &'static str,
    /// Its tooltip.
    pub title: String,
    /// Its build.
    pub id: String,
}

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    viewer: Viewer,
    team: String,
    project: String,
    description: String,
    repo_url: String,
    error: String,
    branches: Vec<String>,
    builds: Vec<BuildRow>,
    next_cursor: String,
    filter_branch: String,
    filter_status: String,
    statuses: Vec<&'static str>,
    builds_counted: usize,
    failure_rate: String,
    average: String,
    bars: Vec<Bar>,
    /// Whether the Subscribe button shows (GitHub is configured).
    can_subscribe: bool,
}

/// `GET /projects/{team}/{project}` — branches with a Build button, the
/// history (paginated, filtered by branch and status), and figures with a
/// chart of durations.
pub async fn project(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    let key = match ProjectKey::new(&team, &project) {
        Ok(k) => k,
        Err(e) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Not a project name",
                &e.to_string(),
            );
        }
    };
    let entry = app.controller.project(&key).ok();
    let params = query(&q);
    let filter_branch = params.get("branch").cloned().unwrap_or_default();
    let filter_status = params.get("status").cloned().unwrap_or_default();
    let mut history = BuildQuery {
        project: Some(key.clone()),
        limit: 25,
        cursor: params.get("cursor").cloned().filter(|c| !c.is_empty()),
        ..BuildQuery::default()
    };
    if !filter_branch.is_empty() {
        if let Err(e) = decap_core::names::validate_branch(&filter_branch) {
            return error_page(StatusCode::BAD_REQUEST, "Not a branch name", &e.to_string());
        }
        history.branch = Some(filter_branch.clone());
    }
    if !filter_status.is_empty() {
        match filter_status.parse::<BuildStatus>() {
            Ok(s) => history.statuses = vec![s],
            Err(e) => return error_page(StatusCode::BAD_REQUEST, "Not a status", &e.to_string()),
        }
    }
    let page = match app.controller.ports.builds.list(&history).await {
        Ok(p) => p,
        Err(e) => return core_error_page(e),
    };
    if entry.is_none() && page.builds.is_empty() && history.cursor.is_none() {
        return not_found_page(&format!("There is no project {key}."));
    }
    // Branches: those built lately (the plain list); the repository's own
    // refs load into the page from /ui/refs when it can list them.
    let mut branches: Vec<String> = Vec::new();
    if let Ok(recent) = app
        .controller
        .ports
        .builds
        .list(&BuildQuery {
            project: Some(key.clone()),
            limit: 200,
            ..BuildQuery::default()
        })
        .await
    {
        for b in recent.builds {
            if !branches.contains(&b.branch) {
                branches.push(b.branch);
            }
        }
    }
    let stats = app
        .controller
        .ports
        .builds
        .stats(&key, history.branch.as_deref(), 30)
        .await
        .unwrap_or_default();
    let longest = stats
        .points
        .iter()
        .filter_map(|p| p.duration_ms)
        .max()
        .unwrap_or(1)
        .max(1);
    let bars = stats
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ms = p.duration_ms.unwrap_or(0);
            let height = (ms * 60 / longest).max(2);
            Bar {
                x: i * 10,
                height,
                y: 60 - height,
                status: p.status.as_str(),
                title: format!(
                    "{}: {}",
                    p.status.as_str(),
                    p.duration_ms
                        .map(duration_text)
                        .unwrap_or_else(|| "did not run".into())
                ),
                id: p.id.to_string(),
            }
        })
        .collect();
    let d = entry
        .as_ref()
        .and_then(|e| e.descriptor.as_ref())
        .map(|d| &d.descriptor);
    render(&ProjectPage {
        viewer: viewer(&app, &headers, ci.0),
        team: key.team.clone(),
        project: key.project.clone(),
        description: d
            .and_then(|d| d.repo_description.clone())
            .unwrap_or_default(),
        repo_url: d
            .and_then(|d| d.repo_url.clone())
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .unwrap_or_default(),
        error: match &entry {
            None => "This project is no longer in the build scripts.".to_owned(),
            Some(e) => e.error.clone().unwrap_or_default(),
        },
        branches,
        builds: page.builds.iter().map(row).collect(),
        next_cursor: page.next_cursor.unwrap_or_default(),
        filter_branch,
        filter_status,
        statuses: vec![
            "queued",
            "deferred",
            "running",
            "succeeded",
            "failed",
            "errored",
            "timed_out",
            "cancelled",
        ],
        builds_counted: stats.builds,
        failure_rate: stats
            .failure_rate
            .map(|r| format!("{:.0} %", r * 100.0))
            .unwrap_or_else(|| "—".to_owned()),
        average: stats
            .average_duration_ms
            .map(duration_text)
            .unwrap_or_else(|| "—".to_owned()),
        bars,
        can_subscribe: app.github_hooks.is_some(),
    })
}

#[derive(Template)]
#[template(path = "refs.html")]
struct RefsFragment {
    team: String,
    project: String,
    refs: Vec<(String, String)>,
    error: String,
    can_act: bool,
}

/// `GET /ui/refs/{team}/{project}` — the repository's branches and tags,
/// each with a Build button (an htmx fragment of the project page).
pub async fn refs_fragment(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    let can_act = viewer(&app, &headers, ci.0).can_act;
    let (refs, error) =
        match crate::api::refs(State(app), Path((team.clone(), project.clone()))).await {
            Ok(axum::Json(r)) => (
                r.refs.into_iter().map(|r| (r.name, r.kind)).collect(),
                String::new(),
            ),
            Err(e) => (Vec::new(), e.message),
        };
    render(&RefsFragment {
        team,
        project,
        refs,
        error,
        can_act,
    })
}

// ------------------------------------------------------------------ build

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    viewer: Viewer,
    b: BuildRow,
    git_ref: String,
    full_commit: String,
    team: String,
    project: String,
    started: Option<When>,
    ended: Option<When>,
    exit_code: String,
    scripts_commit: String,
    executor: String,
    rerun_of: String,
    is_final: bool,
    can_cancel: bool,
    artifacts: Vec<String>,
    artifacts_error: String,
}

/// `GET /builds/{id}` — one build: its facts, its console (live while it
/// runs), its artifacts, Rerun and Cancel.
pub async fn build(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    let Ok(id) = BuildId::parse(&id) else {
        return not_found_page("That is not a build id.");
    };
    let b = match app.controller.build(id).await {
        Ok(b) => b,
        Err(decap_core::Error::NotFound(_)) => {
            return not_found_page("There is no such build (it may have been removed).");
        }
        Err(e) => return core_error_page(e),
    };
    let (artifacts, artifacts_error) = if b.status.is_final() {
        artifact_names(&app, b.id).await
    } else {
        (Vec::new(), String::new())
    };
    render(&BuildPage {
        viewer: viewer(&app, &headers, ci.0),
        b: row(&b),
        git_ref: b.git_ref.clone(),
        full_commit: b.commit.clone().unwrap_or_default(),
        team: b.project.team.clone(),
        project: b.project.project.clone(),
        started: b.start_time.map(when),
        ended: b.end_time.map(when),
        exit_code: b.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        scripts_commit: b.scripts_commit.clone().unwrap_or_default(),
        executor: match (&b.executor, &b.sandbox) {
            (Some(e), Some(s)) => format!("{e} (sandbox: {s})"),
            (Some(e), None) => e.clone(),
            _ => String::new(),
        },
        rerun_of: b.rerun_of.map(|r| r.to_string()).unwrap_or_default(),
        is_final: b.status.is_final(),
        can_cancel: matches!(
            b.status,
            BuildStatus::Running | BuildStatus::Deferred | BuildStatus::Queued
        ),
        artifacts,
        artifacts_error,
    })
}

/// The files of a build's artifacts, from their index (made once).
async fn artifact_names(app: &AppState, id: BuildId) -> (Vec<String>, String) {
    match crate::uploads::index(app, id).await {
        Ok(Some(index)) => (
            index.files.into_iter().take(1000).map(|f| f.path).collect(),
            String::new(),
        ),
        Ok(None) => (Vec::new(), String::new()),
        Err(e) => (
            Vec::new(),
            format!("the artifacts cannot be read: {}", e.message),
        ),
    }
}

// ------------------------------------------------------------ queue, locks

/// A held lock.
pub struct LockRow {
    /// `team/project/branch`.
    pub key: String,
    /// The build holding it.
    pub owner: String,
    /// Since.
    pub acquired: When,
    /// Lapses at.
    pub expires: When,
}

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage {
    viewer: Viewer,
    open: bool,
    waiting: Vec<WaitingRow>,
    locks: Vec<LockRow>,
}

/// `GET /queue` — deferred builds and held locks, with Remove and Unlock,
/// and the queue's open/closed switch.
pub async fn queue(State(app): State<AppState>, headers: HeaderMap, ci: Peer) -> Response {
    let ports = &app.controller.ports;
    let waiting = match waiting_rows(&app).await {
        Ok(rows) => rows,
        Err(e) => return core_error_page(e),
    };
    let locks = match ports.locks.list().await {
        Ok(locks) => locks
            .into_iter()
            .map(|l| LockRow {
                key: l.key.to_string(),
                owner: l.owner.to_string(),
                acquired: when(l.acquired_at),
                expires: when(l.expires_at),
            })
            .collect(),
        Err(e) => return core_error_page(e),
    };
    render(&QueuePage {
        viewer: viewer(&app, &headers, ci.0),
        open: app.controller.queue_open().await,
        waiting,
        locks,
    })
}

// ---------------------------------------------------------------- actions

/// The Build button's form.
#[derive(Deserialize)]
pub struct BuildForm {
    /// The branch or tag.
    pub branch: String,
}

/// `POST /ui/projects/{team}/{project}/build` — builds a branch, then shows
/// the build.
pub async fn build_branch(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<BuildForm>,
) -> Response {
    if let Some(r) = refuse_action(&app, &headers, ci.0) {
        return r;
    }
    let key = match ProjectKey::new(&team, &project) {
        Ok(k) => k,
        Err(e) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Not a project name",
                &e.to_string(),
            );
        }
    };
    let branch = form.branch.trim().to_owned();
    match app
        .controller
        .request_builds(&key, &[branch], Trigger::Manual)
        .await
    {
        Ok(builds) => match builds.first() {
            Some(b) => go(&headers, &format!("/builds/{}", b.id)),
            None => go(&headers, &format!("/projects/{team}/{project}")),
        },
        Err(e) => core_error_page(e),
    }
}

/// `POST /ui/projects/{team}/{project}/subscribe` — registers Decap's
/// webhook on the project's GitHub repository, then shows the project.
pub async fn subscribe(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    if let Some(r) = refuse_action(&app, &headers, ci.0) {
        return r;
    }
    match crate::github::subscribe(&app, &team, &project).await {
        Ok(_) => go(
            &headers,
            &format!("/projects/{team}/{project}?subscribed=1"),
        ),
        Err(e) => error_page(e.status, "GitHub did not take the webhook", &e.message),
    }
}

/// The common part of an action on one build: the check, the id, the
/// answer.
async fn on_build<F, Fut>(
    app: &AppState,
    id: &str,
    headers: &HeaderMap,
    ci: Peer,
    act: F,
) -> Response
where
    F: FnOnce(std::sync::Arc<crate::Controller>, BuildId) -> Fut,
    Fut: std::future::Future<Output = decap_core::Result<String>>,
{
    if let Some(r) = refuse_action(app, headers, ci.0) {
        return r;
    }
    let Ok(id) = BuildId::parse(id) else {
        return not_found_page("That is not a build id.");
    };
    match act(app.controller.clone(), id).await {
        Ok(to) => go(headers, &to),
        Err(e) => core_error_page(e),
    }
}

/// `POST /ui/builds/{id}/rerun`.
pub async fn rerun(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_build(&app, &id, &headers, ci, |c, id| async move {
        Ok(format!("/builds/{}", c.rerun(id).await?.id))
    })
    .await
}

/// `POST /ui/builds/{id}/cancel`.
pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_build(&app, &id, &headers, ci, |c, id| async move {
        Ok(format!("/builds/{}", c.cancel(id).await?.id))
    })
    .await
}

/// `POST /ui/deferred/{id}/remove`.
pub async fn remove_deferred(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_build(&app, &id, &headers, ci, |c, id| async move {
        c.remove_deferred(id).await?;
        Ok("/queue".to_owned())
    })
    .await
}

/// The Unlock button's form.
#[derive(Deserialize)]
pub struct UnlockForm {
    /// `team/project/branch`.
    pub key: String,
}

/// `POST /ui/locks/unlock`.
pub async fn unlock(
    State(app): State<AppState>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<UnlockForm>,
) -> Response {
    if let Some(r) = refuse_unlock(&app, &headers, ci.0) {
        return r;
    }
    let key = match LockKey::parse(&form.key) {
        Ok(k) => k,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, "Not a lock key", &e.to_string()),
    };
    match app.controller.force_unlock(&key).await {
        Ok(_) => go(&headers, "/queue"),
        Err(e) => core_error_page(e),
    }
}

/// The queue switch's form.
#[derive(Deserialize)]
pub struct QueueForm {
    /// `open` or `closed`.
    pub state: String,
}

/// `POST /ui/queue`.
pub async fn set_queue(
    State(app): State<AppState>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<QueueForm>,
) -> Response {
    if let Some(r) = refuse_unlock(&app, &headers, ci.0) {
        return r;
    }
    let open = match form.state.as_str() {
        "open" => true,
        "closed" => false,
        other => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Not a queue state",
                &format!("{other:?} is neither open nor closed"),
            );
        }
    };
    match app.controller.set_queue_open(open).await {
        Ok(()) => go(&headers, "/queue"),
        Err(e) => core_error_page(e),
    }
}

/// After an action: htmx follows `HX-Location`, a plain form a 303.
fn go(headers: &HeaderMap, to: &str) -> Response {
    if headers.contains_key("hx-request") {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(to) {
            r.headers_mut().insert("hx-location", v);
        }
        r
    } else {
        Redirect::to(to).into_response()
    }
}

// ------------------------------------------------------------------ login

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

fn login_page(
    app: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    error: &str,
) -> Response {
    render(&LoginPage {
        viewer: viewer(app, headers, peer),
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
    login_page(&app, &headers, ci.0, "")
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
        let mut r = login_page(&app, &headers, ci.0, "That is not the API token.");
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    // A fresh id at each login, whatever session the browser had.
    app.sessions.end(&headers);
    let id = app
        .sessions
        .start(crate::session::Holder::ApiToken, true, true);
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
    app.sessions.end(&headers);
    let mut r = Redirect::to("/").into_response();
    clear_cookie(&mut r, crate::session::COOKIE, "Lax");
    clear_cookie(&mut r, OLD_TOKEN_COOKIE, "Strict");
    r
}
