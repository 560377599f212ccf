//! Builds: listing, stats, requesting, reading, cancelling and rerunning.

use super::{build_id, load, project_key, query_pairs, unknown_param, view};
use crate::AppState;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};
use axum::Json;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use decap_api_types::{BuildView, BuildsCreated, BuildsPage};
use decap_core::build::{BuildStatus, Trigger};
use decap_core::ports::BuildQuery;
use time::OffsetDateTime;

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
    let (figures, left) = app
        .controller
        .pipeline_stats(&key, branch.as_deref(), last.min(100))
        .await?;
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
        pipeline: decap_api_types::PipelineStatsView {
            figures,
            running: left
                .into_iter()
                .map(|(id, ms)| decap_api_types::RunEstimate {
                    id: id.to_string(),
                    estimated_left_ms: ms,
                })
                .collect(),
        },
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
    let (runs, builds) = app
        .controller
        .request_runs(&key, &branches, trigger)
        .await?;
    let body = BuildsCreated {
        builds: builds.iter().map(|b| view(&app, b)).collect(),
        pipeline_run: runs.first().map(|r| r.to_string()),
        pipeline_runs: runs.iter().map(|r| r.to_string()).collect(),
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
