//! Pipelines: runs with every stage, reruns from a stage, Promote, and a
//! stage's inputs for its bctool.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use decap_api_types::{PipelineRunView, PipelineRunsPage};
use decap_core::ports::BlobKind;
use uuid::Uuid;

use super::{load_as_build, project_key, query_pairs, unknown_param, view};
use crate::AppState;
use crate::auth::peer;
use crate::controller::RunView;
use crate::error::{ApiError, ApiResult};

fn run_id(s: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(s)
        .map_err(|_| ApiError::bad_request(format!("{s:?} is not a pipeline run id (a UUID)")))
}

fn run_view(app: &AppState, v: &RunView) -> PipelineRunView {
    PipelineRunView::new(&v.run, &v.plan, &app.controller.config.public_url)
}

/// `GET /api/v1/pipeline-runs/{id}`.
pub async fn get_pipeline_run(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PipelineRunView>> {
    let v = app.controller.pipeline_run(run_id(&id)?).await?;
    Ok(Json(run_view(&app, &v)))
}

/// `GET /api/v1/pipelines/{team}/{project}?limit=&cursor=`.
pub async fn list_pipeline_runs(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<PipelineRunsPage>> {
    let key = project_key(&team, &project)?;
    app.controller.project(&key)?;
    let mut limit = 20usize;
    let mut cursor = None;
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("invalid limit: must be between 1 and 100")
                    })?;
            }
            "cursor" => cursor = Some(v),
            other => return Err(unknown_param(other, &["limit", "cursor"])),
        }
    }
    let (runs, next_cursor) = app
        .controller
        .pipeline_runs(&key, cursor.as_deref(), limit)
        .await?;
    Ok(Json(PipelineRunsPage {
        runs: runs.iter().map(|v| run_view(&app, v)).collect(),
        next_cursor,
    }))
}

/// `POST /api/v1/pipeline-runs/{id}/stages/{stage}/rerun`.
pub async fn rerun_stage(
    State(app): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let b = app.controller.rerun_stage(run_id(&id)?, &stage).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&app, &b))).into_response())
}

/// `POST /api/v1/pipeline-runs/{id}/stages/{stage}/approve`.
pub async fn approve_stage(
    State(app): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let b = app.controller.approve_stage(run_id(&id)?, &stage).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&app, &b))).into_response())
}

/// `GET /api/v1/build/{id}/inputs/{stage}`, for a stage's own bctool: the
/// artifacts of the attempt of `stage` it needs; `204` when that attempt
/// stored none, `410` when they were stored and are gone.
pub async fn get_input(
    State(app): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    let b = load_as_build(&app, &id, req.headers().clone(), peer(&req)).await?;
    let input = b
        .stage
        .as_ref()
        .and_then(|s| s.inputs.get(&stage).copied())
        .ok_or_else(|| {
            ApiError::not_found(format!("build {} does not need stage {stage:?}", b.id))
        })?;
    let blobs = &app.controller.ports.blobs;
    if let Some((size, stream)) = blobs.get(input, BlobKind::ArtifactsTarGz).await? {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/gzip")
            .header(header::CONTENT_LENGTH, size)
            .body(Body::from_stream(stream))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    }
    if blobs.get(input, BlobKind::ArtifactsIndex).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::GONE,
            format!(
                "the artifacts of stage {stage:?} (build {input}) are no longer stored: rerun the pipeline from {stage:?}"
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
