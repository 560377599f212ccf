//! Artifacts: the listing and single files.

use super::{load, only_flag};
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use decap_core::ports::BlobKind;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

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
