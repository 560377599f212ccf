//! The REST API, `/api/v1`, per the API document.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use decap_api_types::{
    BuildResult, BuildView, BuildsCreated, BuildsPage, DeferredList, DeferredView, DescriptorView,
    LockView, Locks, LogLevel, ProjectView, Projects, QueueOpen, QueueState, RefView, Refs, Team,
    Teams, Version,
};
use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{BlobKind, BuildQuery, ByteStream};
use futures::{Stream, StreamExt, TryStreamExt};
use time::OffsetDateTime;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::auth::peer;
use crate::controller::Finish;
use crate::error::{ApiError, ApiResult};
use crate::livelog::LineSplitter;

fn view(app: &AppState, b: &Build) -> BuildView {
    BuildView::from_build(b, &app.controller.config.public_url)
}

fn build_id(s: &str) -> ApiResult<BuildId> {
    BuildId::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn load(app: &AppState, id: &str) -> ApiResult<Build> {
    let id = build_id(id)?;
    Ok(app.controller.build(id).await?)
}

/// Loads a build for a call from its own bctool (or an operator).
async fn load_as_build(
    app: &AppState,
    id: &str,
    headers: HeaderMap,
    from: Option<std::net::SocketAddr>,
) -> ApiResult<Build> {
    let b = load(app, id).await?;
    let token = app.controller.build_token_hash(&b).await;
    let caller = app.auth.authorize_build(&headers, from, token.as_deref())?;
    if b.status.is_final() {
        // A build's token dies with its build; and what an ended build left
        // (its log, artifacts and result) is final for everyone.
        return Err(match caller {
            crate::auth::Caller::Build => ApiError::unauthorized(format!(
                "this build token expired when build {} ended",
                b.id
            )),
            crate::auth::Caller::Operator => ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "build {} has ended ({}); its log, artifacts and result are final",
                    b.id, b.status
                ),
            ),
        });
    }
    Ok(b)
}

fn query_pairs(raw: &Option<String>) -> ApiResult<Vec<(String, String)>> {
    match raw {
        None => Ok(vec![]),
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::bad_request(format!("bad query string: {e}"))),
    }
}

/// A query string holding at most one boolean parameter, `name`.
fn only_flag(raw: &Option<String>, name: &str) -> ApiResult<bool> {
    let mut value = false;
    for (k, v) in query_pairs(raw)? {
        if k != name {
            return Err(unknown_param(&k, &[name]));
        }
        value = v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid {name}: true or false")))?;
    }
    Ok(value)
}

fn unknown_param(name: &str, allowed: &[&str]) -> ApiError {
    ApiError::bad_request(format!(
        "unknown query parameter {name:?}; allowed: {}",
        allowed.join(", ")
    ))
}

pub async fn version(State(app): State<AppState>) -> Json<Version> {
    Json(app.version.clone())
}

pub async fn teams(State(app): State<AppState>) -> Json<Teams> {
    let catalog = app.controller.ports.scripts.catalog();
    Json(Teams {
        teams: catalog
            .teams()
            .into_iter()
            .map(|name| Team { name })
            .collect(),
    })
}

pub async fn projects(
    State(app): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Projects>> {
    let mut team = None;
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "team" => {
                decap_core::names::validate_name("team", &v)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                team = Some(v);
            }
            other => return Err(unknown_param(other, &["team"])),
        }
    }
    let catalog = app.controller.ports.scripts.catalog();
    let projects = catalog
        .projects
        .values()
        .filter(|p| team.as_ref().is_none_or(|t| &p.key.team == t))
        .map(|p| ProjectView {
            team: p.key.team.clone(),
            project: p.key.project.clone(),
            descriptor: p.descriptor.as_ref().map(|d| DescriptorView {
                build_image: d.descriptor.build_image.clone(),
                repo_manager: d.descriptor.repo_manager.clone(),
                repo_url: d.descriptor.repo_url.clone(),
                repo_description: d.descriptor.repo_description.clone(),
                managed_ref_regex: d.descriptor.managed_ref_regex.clone(),
                build_timeout_seconds: d.timeout().as_secs(),
            }),
            sidecars: p.sidecars.clone(),
            error: p.error.clone(),
        })
        .collect();
    Ok(Json(Projects {
        projects,
        scripts_commit: catalog.commit.clone(),
    }))
}

fn project_key(team: &str, project: &str) -> ApiResult<ProjectKey> {
    ProjectKey::new(team, project).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Branches and tags of a project's repository: from GitHub's API (ETag-cached) when Decap has a GitHub token, else from `git ls-remote`.
pub async fn refs(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
) -> ApiResult<Json<Refs>> {
    let key = project_key(&team, &project)?;
    let entry = app.controller.project(&key)?;
    let descriptor = entry.descriptor.as_ref().map(|d| &d.descriptor);
    let on_github = descriptor.is_some_and(|d| {
        d.repo_manager.as_deref() == Some("github")
            || d.repo_url.as_deref().is_none_or(|u| u.contains("github"))
    });
    // GitHub's API, conditionally on ETags, when Decap has a token; the
    // repository is the project's key, as for commit statuses.
    if let (Some(gh), true) = (&app.github_refs, on_github) {
        match gh.refs(&key.team, &key.project).await {
            Ok(found) => {
                let mut refs: Vec<RefView> = found
                    .into_iter()
                    .map(|(kind, name)| RefView { name, kind })
                    .collect();
                refs.sort_by(|a, b| {
                    (a.kind.as_str(), a.name.as_str()).cmp(&(b.kind.as_str(), b.name.as_str()))
                });
                return Ok(Json(Refs { refs }));
            }
            Err(e) => {
                tracing::warn!(project = %key, error = %e, "cannot list refs on GitHub; trying git");
            }
        }
    }
    let url = descriptor.and_then(|d| d.repo_url.clone()).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("project {key} has no repoUrl"),
        )
    })?;
    if url.starts_with('-') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "repoUrl must not start with '-'",
        ));
    }
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(["ls-remote", "--heads", "--tags", "--", &url])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("{url} did not answer within 15 s"),
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot list the refs of {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let mut refs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((_, name)) = line.split_once('\t') else {
            continue;
        };
        if name.ends_with("^{}") {
            continue;
        }
        if let Some(b) = name.strip_prefix("refs/heads/") {
            refs.push(RefView {
                name: b.to_owned(),
                kind: "branch".into(),
            });
        } else if let Some(t) = name.strip_prefix("refs/tags/") {
            refs.push(RefView {
                name: t.to_owned(),
                kind: "tag".into(),
            });
        }
    }
    refs.sort_by(|a, b| {
        (a.kind.as_str(), a.name.as_str()).cmp(&(b.kind.as_str(), b.name.as_str()))
    });
    Ok(Json(Refs { refs }))
}

pub async fn list_builds(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<BuildsPage>> {
    let key = project_key(&team, &project)?;
    let mut query = BuildQuery {
        project: Some(key),
        limit: 50,
        ..Default::default()
    };
    const ALLOWED: &[&str] = &["branch", "status", "since", "limit", "cursor"];
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "branch" => {
                decap_core::names::validate_branch(&v)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                query.branch = Some(v);
            }
            "status" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    query.statuses.push(
                        s.parse::<BuildStatus>()
                            .map_err(|e| ApiError::bad_request(e.to_string()))?,
                    );
                }
            }
            "since" => {
                let t = OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                    ApiError::bad_request(format!("invalid since: {v:?} is not an RFC 3339 time"))
                })?;
                query.since = Some(t);
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid limit: {v:?} is not a number"))
                })?;
                if !(1..=500).contains(&n) {
                    return Err(ApiError::bad_request(
                        "invalid limit: must be between 1 and 500",
                    ));
                }
                query.limit = n;
            }
            "cursor" => query.cursor = Some(v),
            other => return Err(unknown_param(other, ALLOWED)),
        }
    }
    // History outlives a project's removal from the scripts: only names
    // that are neither in the scripts nor in the history are unknown.
    let exists_in_scripts = query
        .project
        .as_ref()
        .is_some_and(|k| app.controller.project(k).is_ok());
    let page = app.controller.ports.builds.list(&query).await?;
    if page.builds.is_empty() && query.cursor.is_none() && !exists_in_scripts {
        return Err(ApiError::not_found(format!("project {team}/{project}")));
    }
    Ok(Json(BuildsPage {
        builds: page.builds.iter().map(|b| view(&app, b)).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// `GET /api/v1/stats/{team}/{project}?branch=&last=` — figures over the
/// last `last` (default 50, at most 1,000) finished builds.
pub async fn project_stats(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<decap_api_types::ProjectStatsView>> {
    let key = project_key(&team, &project)?;
    let mut branch = None;
    let mut last = 50usize;
    const ALLOWED: &[&str] = &["branch", "last"];
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "branch" => {
                decap_core::names::validate_branch(&v)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                branch = Some(v);
            }
            "last" => {
                last = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "invalid last: {v:?} is not a number between 1 and 1000"
                        ))
                    })?;
            }
            other => return Err(unknown_param(other, ALLOWED)),
        }
    }
    let stats = app
        .controller
        .ports
        .builds
        .stats(&key, branch.as_deref(), last)
        .await?;
    if stats.builds == 0 && app.controller.project(&key).is_err() {
        return Err(ApiError::not_found(format!("project {team}/{project}")));
    }
    Ok(Json(decap_api_types::ProjectStatsView {
        project: key.to_string(),
        branch,
        builds: stats.builds,
        succeeded: stats.succeeded,
        failed: stats.failed,
        errored: stats.errored,
        timed_out: stats.timed_out,
        cancelled: stats.cancelled,
        failure_rate: stats.failure_rate,
        average_duration_ms: stats.average_duration_ms,
        durations: stats
            .points
            .iter()
            .map(|p| decap_api_types::DurationPoint {
                id: p.id.to_string(),
                status: p.status.as_str().to_owned(),
                duration_ms: p.duration_ms,
            })
            .collect(),
    }))
}

pub async fn create_builds(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    req: Request,
) -> ApiResult<Response> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let key = project_key(&team, &project)?;
    let mut branches = Vec::new();
    let mut trigger = Trigger::Manual;
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "branch" | "ref" => branches.push(v),
            "trigger" => {
                trigger = match v.as_str() {
                    "manual" => Trigger::Manual,
                    "api" => Trigger::Api,
                    _ => return Err(ApiError::bad_request("invalid trigger: manual or api")),
                }
            }
            other => return Err(unknown_param(other, &["branch", "trigger"])),
        }
    }
    if branches.len() > 64 {
        return Err(ApiError::bad_request("at most 64 branches per request"));
    }
    let builds = app
        .controller
        .request_builds(&key, &branches, trigger)
        .await?;
    let body = BuildsCreated {
        builds: builds.iter().map(|b| view(&app, b)).collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

pub async fn get_build(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    let b = load(&app, &id).await?;
    Ok(Json(view(&app, &b)))
}

pub async fn cancel_build(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let id = build_id(&id)?;
    let b = app.controller.cancel(id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&app, &b))).into_response())
}

pub async fn rerun_build(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let id = build_id(&id)?;
    let b = app.controller.rerun(id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&app, &b))).into_response())
}

/// Where a build's log can be read from.
enum LogSource {
    Live(crate::livelog::LiveReader),
    Stored(ByteStream),
    None,
}

async fn log_source(app: &AppState, id: BuildId) -> ApiResult<LogSource> {
    if let Some(live) = app.controller.live.reader(id) {
        return Ok(LogSource::Live(live));
    }
    match app.controller.ports.blobs.get(id, BlobKind::LogGz).await? {
        Some((_, gz)) => Ok(LogSource::Stored(crate::uploads::gunzip_bounded(
            gz,
            app.controller.config.upload_caps.log_bytes,
        ))),
        None => Ok(LogSource::None),
    }
}

/// Waits until a queued or deferred build has a log to follow (or ends).
async fn wait_for_log(app: &AppState, id: BuildId) -> ApiResult<LogSource> {
    let mut changes = app.controller.subscribe();
    loop {
        match log_source(app, id).await? {
            LogSource::None => {}
            found => return Ok(found),
        }
        let b = app.controller.build(id).await?;
        if b.status.is_final() {
            return log_source(app, id).await;
        }
        // Wake on any status change, or after a while in case one was missed.
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.recv()).await;
    }
}

fn log_gone(b: &Build) -> ApiError {
    if b.status.is_final() {
        ApiError::not_found(format!(
            "the console log of build {} (it is gone or was never stored)",
            b.id
        ))
    } else {
        ApiError::not_found(format!(
            "a console log for build {} yet (it is {})",
            b.id, b.status
        ))
    }
}

pub async fn get_log(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let b = load(&app, &id).await?;
    let follow = only_flag(&q, "follow")?;
    let source = if follow && !b.status.is_final() {
        wait_for_log(&app, b.id).await?
    } else {
        log_source(&app, b.id).await?
    };
    let body = match source {
        LogSource::None => return Err(log_gone(&b)),
        LogSource::Stored(s) => Body::from_stream(s),
        LogSource::Live(live) if follow => Body::from_stream(live.follow(0)),
        LogSource::Live(live) => {
            // A snapshot of what has arrived so far.
            let bytes = tokio::task::spawn_blocking(move || live.snapshot())
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            Body::from(bytes)
        }
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff")
        .body(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn status_event(app: &AppState, b: &Build) -> Event {
    Event::default()
        .event("status")
        .data(serde_json::to_string(&view(app, b)).unwrap_or_default())
}

/// `text/event-stream` of `status`, `log` (one line each, `id` = byte offset
/// after the line, for `Last-Event-ID` resumption) and a final `end`.
pub async fn log_events(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let b = load(&app, &id).await?;
    let resume: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    let app2 = app.clone();
    tokio::spawn(async move {
        if tx.send(status_event(&app2, &b)).await.is_err() {
            return;
        }
        let source = match wait_for_log(&app2, b.id).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx
                    .send(Event::default().event("error").data(e.message))
                    .await;
                return;
            }
        };
        let mut splitter = LineSplitter::at(resume);
        let mut stream: ByteStream = match source {
            LogSource::Live(live) => Box::pin(live.follow(resume)),
            LogSource::Stored(s) => skip_bytes(s, resume),
            LogSource::None => {
                let _ = tx
                    .send(
                        Event::default()
                            .event("error")
                            .data("the console log is gone"),
                    )
                    .await;
                Box::pin(futures::stream::empty())
            }
        };
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            for (offset, line) in splitter.push(&chunk) {
                if tx
                    .send(
                        Event::default()
                            .event("log")
                            .id(offset.to_string())
                            .data(line),
                    )
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        if let Some((offset, line)) = splitter.finish() {
            let _ = tx
                .send(
                    Event::default()
                        .event("log")
                        .id(offset.to_string())
                        .data(line),
                )
                .await;
        }
        // The log ends when the build does; report where it ended.
        let mut changes = app2.controller.subscribe();
        let final_build = loop {
            match app2.controller.build(b.id).await {
                Ok(now) if now.status.is_final() => break Some(now),
                Ok(_) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), changes.recv()).await;
                }
                Err(_) => break None,
            }
        };
        if let Some(fb) = final_build {
            let _ = tx.send(status_event(&app2, &fb)).await;
        }
        let _ = tx.send(Event::default().event("end").data("end")).await;
    });
    let stream = ReceiverStream::new(rx).map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn skip_bytes(s: ByteStream, mut skip: u64) -> ByteStream {
    if skip == 0 {
        return s;
    }
    Box::pin(s.filter_map(move |chunk| {
        let out = match chunk {
            Err(e) => Some(Err(e)),
            Ok(c) => {
                let n = c.len() as u64;
                if skip >= n {
                    skip -= n;
                    None
                } else {
                    let rest = c.slice(skip as usize..);
                    skip = 0;
                    Some(Ok(rest))
                }
            }
        };
        async move { out }
    }))
}

pub(crate) fn body_stream(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

/// `POST /api/v1/build/{id}/log/stream` — bctool streams the console; the
/// `x-decap-log-offset` header says where this request's bytes start.
pub async fn stream_log(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let b = load_as_build(&app, &id, req.headers().clone(), peer(&req)).await?;
    let offset: u64 = req
        .headers()
        .get(decap_api_types::LOG_OFFSET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request("invalid x-decap-log-offset"))
        })
        .transpose()?
        .unwrap_or(0);
    let live = app.controller.live.get(b.id).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("build {} is not running ({})", b.id, b.status),
        )
    })?;
    let mut at = offset;
    let mut body = req.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the log stream broke: {e}")))?;
        at = live
            .append_at(at, &chunk)
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    }
    Ok(Json(serde_json::json!({ "received": live.received() })).into_response())
}

/// `PUT /api/v1/logs/{id}` — the gzipped console log.
pub async fn put_log(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    put_blob(app, id, req, BlobKind::LogGz).await
}

/// `PUT /api/v1/artifacts/{id}` — the artifacts tar.gz.
pub async fn put_artifacts(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    put_blob(app, id, req, BlobKind::ArtifactsTarGz).await
}

async fn put_blob(app: AppState, id: String, req: Request, kind: BlobKind) -> ApiResult<Response> {
    let b = load_as_build(&app, &id, req.headers().clone(), peer(&req)).await?;
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let size = crate::uploads::store(&app, b.id, kind, length, req.into_body()).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "bytes": size })),
    )
        .into_response())
}

/// `POST /api/v1/build/{id}/result` — bctool records how the build ended.
pub async fn put_result(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Json<BuildView>> {
    let b = load_as_build(&app, &id, req.headers().clone(), peer(&req)).await?;
    let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "a result is at most 64 KiB"))?;
    let result: BuildResult = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed result: {e}")))?;
    let status = if result.timed_out {
        BuildStatus::TimedOut
    } else {
        BuildStatus::from_exit_code(result.exit_code)
    };
    // The build ends once its environment is gone; the record keeps the
    // outcome meanwhile. In a task of its own, so that the answer reaching
    // a client that went away (bctool exits at once) cancels nothing.
    let controller = app.controller.clone();
    let outcome = Finish {
        status,
        exit_code: Some(result.exit_code),
        message: result.message,
    };
    let now = tokio::spawn(async move { controller.report(b.id, outcome).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(view(&app, &now)))
}

/// `POST /api/v1/build/{id}/unlock` — the script releases its lock early.
pub async fn unlock_build(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let b = load_as_build(&app, &id, req.headers().clone(), peer(&req)).await?;
    let released = app.controller.release_own_lock(b.id).await?;
    Ok(Json(serde_json::json!({ "released": released })).into_response())
}

/// `POST /api/v1/build/{id}/metadata` — a script records its exit code
/// itself (the original `record-build-metadata`); the same as a result.
pub use put_result as record_metadata;

fn safe_artifact_path(path: &str) -> ApiResult<String> {
    let p = path.trim_start_matches("./");
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c == ".." || c == "." || c.is_empty())
        || p.chars().any(|c| c.is_control())
    {
        return Err(ApiError::bad_request(format!(
            "invalid artifact path {path:?}"
        )));
    }
    Ok(p.to_owned())
}

pub async fn get_artifacts(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let b = load(&app, &id).await?;
    let presigned = only_flag(&q, "presigned")?;
    let Some((size, stream)) = app
        .controller
        .ports
        .blobs
        .get(b.id, BlobKind::ArtifactsTarGz)
        .await?
    else {
        return Err(ApiError::not_found(format!("artifacts of build {}", b.id)));
    };
    let wants_names = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/plain"));
    if presigned && !wants_names {
        // Large downloads can go straight to the object store, when it can
        // sign a URL; otherwise they stream through here as usual.
        let url = app
            .controller
            .ports
            .blobs
            .presigned_url(b.id, BlobKind::ArtifactsTarGz, Duration::from_secs(15 * 60))
            .await?;
        if let Some(url) = url {
            drop(stream);
            return Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, url)
                .body(Body::empty())
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        }
    }
    if !wants_names {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/gzip")
            .header(header::CONTENT_LENGTH, size)
            .header(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&format!(
                    "attachment; filename=\"{}-artifacts.tar.gz\"",
                    b.id
                ))
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
            )
            .body(Body::from_stream(stream))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    }
    drop(stream);
    let names: Vec<String> = crate::uploads::index(&app, b.id)
        .await?
        .map(|i| i.files.into_iter().map(|f| f.path).collect())
        .unwrap_or_default();
    let mut text = names.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

pub async fn get_artifact_file(
    State(app): State<AppState>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let b = load(&app, &id).await?;
    let wanted = safe_artifact_path(&path)?;
    let Some((_, stream)) = app
        .controller
        .ports
        .blobs
        .get(b.id, BlobKind::ArtifactsTarGz)
        .await?
    else {
        return Err(ApiError::not_found(format!("artifacts of build {}", b.id)));
    };
    let (found_tx, found_rx) = tokio::sync::oneshot::channel::<Result<u64, ApiError>>();
    let (data_tx, data_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let wanted2 = wanted.clone();
    let cap = app.controller.config.upload_caps.artifacts_bytes;
    tokio::task::spawn_blocking(move || {
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        crate::uploads::extract_file(reader, &wanted2, cap, found_tx, data_tx);
    });
    let size = found_rx.await.map_err(|_| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "artifact reader failed")
    })??;
    let file_name = wanted
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .replace('"', "");
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\""))
                .unwrap_or(HeaderValue::from_static("attachment")),
        )
        .body(Body::from_stream(ReceiverStream::new(data_rx)))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

pub async fn list_deferred(State(app): State<AppState>) -> ApiResult<Json<DeferredList>> {
    let entries = app.controller.ports.queue.list().await?;
    Ok(Json(DeferredList {
        deferred: entries.iter().map(DeferredView::from).collect(),
    }))
}

pub async fn remove_deferred(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<StatusCode> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let id = build_id(&id)?;
    app.controller.remove_deferred(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_locks(State(app): State<AppState>) -> ApiResult<Json<Locks>> {
    let locks = app.controller.ports.locks.list().await?;
    Ok(Json(Locks {
        locks: locks.iter().map(LockView::from).collect(),
    }))
}

pub async fn unlock(
    State(app): State<AppState>,
    RawQuery(q): RawQuery,
    req: Request,
) -> ApiResult<StatusCode> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let mut key = None;
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "key" => {
                key = Some(LockKey::parse(&v).map_err(|e| ApiError::bad_request(e.to_string()))?)
            }
            other => return Err(unknown_param(other, &["key"])),
        }
    }
    let key = key.ok_or_else(|| ApiError::bad_request("missing key=team/project/branch"))?;
    match app.controller.force_unlock(&key).await? {
        Some(lock) => {
            tracing::warn!(key = %key, owner = %lock.owner, "lock released by an operator");
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::not_found(format!("lock {key}"))),
    }
}

pub async fn get_queue(State(app): State<AppState>) -> Json<QueueState> {
    let open = app.controller.queue_open().await;
    Json(QueueState {
        state: if open {
            QueueOpen::Open
        } else {
            QueueOpen::Closed
        },
    })
}

pub async fn put_queue(State(app): State<AppState>, req: Request) -> ApiResult<Json<QueueState>> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let body = axum::body::to_bytes(req.into_body(), 4096)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))?;
    let state: QueueState = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("expected {{\"state\": \"open\"|\"closed\"}}: {e}"))
    })?;
    app.controller
        .set_queue_open(state.state == QueueOpen::Open)
        .await?;
    Ok(Json(state))
}

pub async fn put_loglevel(State(app): State<AppState>, req: Request) -> ApiResult<Json<LogLevel>> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let body = axum::body::to_bytes(req.into_body(), 4096)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))?;
    let level: LogLevel = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"level\": \"info\"}}: {e}")))?;
    match &app.set_log_level {
        None => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server was started without a reloadable log filter",
        )),
        Some(set) => {
            set(&level.level).map_err(|e| ApiError::bad_request(format!("invalid level: {e}")))?;
            tracing::info!(level = %level.level, "log level changed");
            Ok(Json(level))
        }
    }
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(app): State<AppState>) -> ApiResult<&'static str> {
    app.controller.ports.builds.count_by_status().await?;
    if app.controller.ports.executor.sandbox() == "none" {
        return Ok(
            "ready; builds run with no sandbox (--sandbox none): they act as Decap's own user and see the host\n",
        );
    }
    Ok("ready\n")
}

pub async fn metrics(State(app): State<AppState>) -> ApiResult<Response> {
    let m = &app.controller.metrics;
    let counts = app.controller.ports.builds.count_by_status().await?;
    for status in BuildStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        m.builds
            .get_or_create(&crate::metrics::StatusLabel {
                status: status.as_str().to_owned(),
            })
            .set(n as i64);
    }
    m.queue_depth
        .set(app.controller.waiting_count().await as i64);
    m.locks_held
        .set(app.controller.ports.locks.list().await?.len() as i64);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response())
}
