//! Operators: the deferral queue, locks and the queue's open state.

use super::{build_id, query_pairs, unknown_param};
use crate::AppState;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};
use axum::Json;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use decap_api_types::{DeferredList, DeferredView, LockView, Locks, QueueOpen, QueueState};
use decap_core::names::LockKey;

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
