//! Console logs: stored, live (server-sent events) and followed.

use super::{load, load_as_build, query_pairs, unknown_param, view};
use crate::AppState;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};
use crate::livelog::LineSplitter;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use decap_core::build::{Build, BuildId};
use decap_core::ports::{BlobKind, ByteStream};
use futures::{Stream, StreamExt, TryStreamExt};
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

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
    let mut follow = false;
    let mut offset: u64 = 0;
    for (k, v) in query_pairs(&q)? {
        match k.as_str() {
            "follow" => {
                follow = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("invalid follow: true or false"))?
            }
            "offset" => {
                offset = v.parse().map_err(|_| {
                    ApiError::bad_request("invalid offset: a byte offset into the log")
                })?
            }
            other => return Err(unknown_param(other, &["follow", "offset"])),
        }
    }
    let source = if follow && !b.status.is_final() {
        wait_for_log(&app, b.id).await?
    } else {
        log_source(&app, b.id).await?
    };
    let body = match source {
        LogSource::None => return Err(log_gone(&b)),
        LogSource::Stored(s) => Body::from_stream(skip_bytes(s, offset)),
        LogSource::Live(live) if follow => {
            // Cut (not ended) when the server stops, so that the client
            // sees the break and resumes from its offset.
            Body::from_stream(crate::streams::cut_when_stopping(
                live.follow(offset),
                app.controller.stopping(),
                Err(std::io::Error::other(
                    "Decap is restarting; resume from your offset",
                )),
            ))
        }
        LogSource::Live(live) => {
            // A snapshot of what has arrived so far.
            let mut bytes = tokio::task::spawn_blocking(move || live.snapshot())
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            let from = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            bytes.drain(..from);
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
    let stream =
        crate::streams::until_stopping(ReceiverStream::new(rx).map(Ok), app.controller.stopping());
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
    // Cut when the server stops, so that the stop does not wait on the
    // build; bctool resumes the stream (the spool ignores what it has).
    let mut stopping = app.controller.stopping();
    loop {
        let next = tokio::select! {
            next = body.next() => next,
            _ = stopping.wait_for(|s| *s) => {
                // The connection closes with this answer rather than
                // reading the rest of a body that does not end.
                let mut cut = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("Decap is restarting; {} bytes received, resume the stream", live.received()),
                )
                .into_response();
                cut.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(cut);
            }
        };
        let Some(chunk) = next else { break };
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the log stream broke: {e}")))?;
        at = live
            .append_at(at, &chunk)
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    }
    Ok(Json(serde_json::json!({ "received": live.received() })).into_response())
}
