//! The REST API, `/api/v1`, per the API document.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use decap_api_types::{
    BuildView, DescriptorView, LogLevel, ProjectView, Projects, RefView, Refs, Team, Teams, Version,
};
use decap_core::build::{Build, BuildId, BuildStatus};
use decap_core::names::ProjectKey;

use crate::AppState;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};

mod artifacts;
mod bctool;
mod builds;
mod logs;
mod pipelines;
mod queue;

pub use artifacts::*;
pub use bctool::*;
pub use builds::*;
pub use logs::*;
pub use pipelines::*;
pub use queue::*;

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
                language: d.descriptor.language.map(|l| l.name().to_owned()),
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
    if *app.controller.stopping().borrow() {
        // Load balancers send no more requests to a server that stops.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping: Decap is restarting or being upgraded",
        ));
    }
    // The build store answers: one build asked for (counting them all
    // would read a whole index of a shared store on every probe).
    app.controller
        .ports
        .builds
        .list(&decap_core::ports::BuildQuery {
            limit: 1,
            ..Default::default()
        })
        .await?;
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
