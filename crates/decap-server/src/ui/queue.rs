//! The queue page: what waits and the locks held.

use super::dashboard::waiting_rows;
use super::{Peer, Viewer, WaitingRow, When, core_error_page, render, viewer, when};
use crate::AppState;
use askama::Template;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

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
        viewer: viewer(&app, &headers, ci.0).await,
        open: app.controller.queue_open().await,
        waiting,
        locks,
    })
}

// ---------------------------------------------------------------- actions
