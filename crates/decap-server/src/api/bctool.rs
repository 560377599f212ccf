//! What a build's bctool calls with its own token: log and artifact uploads, its result, its lock.

use super::{load_as_build, view};
use crate::AppState;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use decap_api_types::{BuildResult, BuildView};
use decap_core::ports::BlobKind;

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
    // The build ends once its environment is gone; the record keeps the
    // outcome meanwhile. In a task of its own, so that the answer reaching
    // a client that went away (bctool exits at once) cancels nothing.
    let controller = app.controller.clone();
    let outcome = result.outcome();
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

/// The query of `GET /api/v1/build/{id}/source`.
#[derive(Debug, serde::Deserialize)]
pub struct SourceQuery {
    /// The commit the build's plan names.
    commit: String,
}

/// `GET /api/v1/build/{id}/source?commit=C` — a preset build's tree, as a
/// `tar.gz` of its project's repository at that commit (fetched into the
/// mirror first if this replica lacks it, with the project's token, which
/// never leaves the server).
pub async fn get_source(
    State(app): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<SourceQuery>,
    req: Request,
) -> ApiResult<Response> {
    let b = load_as_build(&app, &id, req.headers().clone(), peer(&req)).await?;
    let sources = app
        .controller
        .sources()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this server runs no preset builds"))?;
    let entry = app.controller.project(&b.project)?;
    let url = crate::controller::preset_language(&entry)
        .and_then(|_| entry.valid_descriptor()?.descriptor.repo_url.clone())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("project {} does not build with a preset", b.project),
            )
        })?;
    if q.commit.len() != 40 || !q.commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("commit must be a full commit id"));
    }
    if let Some(tree) = app.controller.prepared_tree(b.id, &q.commit).await {
        return Ok(([(header::CONTENT_TYPE, "application/gzip")], tree).into_response());
    }
    let token = app.controller.repo_token(&b).await;
    let commit = sources
        .pinned(
            &url,
            decap_scripts::source::Want {
                git_ref: &b.git_ref,
                commit: Some(&q.commit),
            },
            token.as_deref(),
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let mut child = sources.archive(&url, &commit)?;
    let stdout = child.stdout.take().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "git archive has no output",
        )
    })?;
    // The child lives as long as its output is read; dropping the body
    // kills it.
    let stream = futures::stream::unfold(
        (tokio_util::io::ReaderStream::new(stdout), child),
        |(mut out, mut child)| async move {
            use futures::StreamExt as _;
            match out.next().await {
                Some(chunk) => Some((chunk, (out, child))),
                None => {
                    let status = child.wait().await;
                    match status {
                        Ok(s) if s.success() => None,
                        Ok(s) => Some((
                            Err(std::io::Error::other(format!("git archive failed: {s}"))),
                            (out, child),
                        )),
                        Err(e) => Some((Err(e), (out, child))),
                    }
                }
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/gzip")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
