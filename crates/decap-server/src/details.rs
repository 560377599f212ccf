//! Detail files of CI runs in Decap's own store, for `decapctl notify-pr`
//! with `store_api = decap`: uploaded with the API token, readable by link
//! until they expire.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use decap_core::ports::DetailPath;
use futures::StreamExt;
use time::OffsetDateTime;

use crate::AppState;
use crate::api::body_stream;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};

/// The largest detail file accepted.
pub const MAX_DETAIL_BYTES: u64 = 256 * 1024 * 1024;
/// Days a file is kept when the upload does not say.
const DEFAULT_DAYS: i64 = 7;

fn store(app: &AppState) -> ApiResult<&std::sync::Arc<dyn decap_core::ports::DetailStore>> {
    app.details
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this server keeps no detail files"))
}

/// `PUT /api/v1/details/{owner}/{repo}/{commit}/{*file}` with
/// `x-decap-expire-days` (1 to 365, default 7): `201 {bytes, url, expiresAt}`.
pub async fn put(
    State(app): State<AppState>,
    Path((owner, repo, commit, file)): Path<(String, String, String, String)>,
    req: Request,
) -> ApiResult<Response> {
    app.auth.authorize(req.headers(), peer(&req))?;
    let store = store(&app)?;
    let path = DetailPath::new(&owner, &repo, &commit, &file)?;
    let days = match req.headers().get("x-decap-expire-days") {
        None => DEFAULT_DAYS,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|d| (1..=365).contains(d))
            .ok_or_else(|| ApiError::bad_request("x-decap-expire-days must be 1 to 365"))?,
    };
    let too_big = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_DETAIL_BYTES);
    if too_big {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a detail file may be at most {MAX_DETAIL_BYTES} bytes"),
        ));
    }
    // Counted as it streams, for uploads without a length.
    let mut seen = 0u64;
    let data = body_stream(req.into_body()).map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > MAX_DETAIL_BYTES {
            return Err(std::io::Error::other("the detail file is too large"));
        }
        Ok(chunk)
    });
    let expires_at = OffsetDateTime::now_utc() + time::Duration::days(days);
    let bytes = store.put(&path, Box::pin(data), expires_at).await?;
    let url = format!(
        "{}/details/{}/{}/{}/{}",
        app.controller.config.public_url.trim_end_matches('/'),
        path.owner,
        path.repo,
        path.commit,
        path.file
    );
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "bytes": bytes,
            "url": url,
            "expiresAt": expires_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        })),
    )
        .into_response())
}

/// `GET /details/{owner}/{repo}/{commit}/{*file}`: the file, as plain text
/// or a download (never rendered as a page of this site).
pub async fn get(
    State(app): State<AppState>,
    Path((owner, repo, commit, file)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    let store = store(&app)?;
    let path = DetailPath::new(&owner, &repo, &commit, &file)?;
    let Some((size, stream)) = store.get(&path, OffsetDateTime::now_utc()).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no detail file {file} of {owner}/{repo}@{commit} (or it has expired)"),
        ));
    };
    let text = [".txt", ".log", ".out", ".md", ".json", ".xml", ".csv"]
        .iter()
        .any(|e| file.ends_with(e));
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if text {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        }),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    Ok(resp.into_response())
}
