//! The dashboard: running builds, recent commits, what waits, and its live updates.

use super::{
    BuildRow, Peer, Viewer, When, core_error_page, duration_text, render, row, viewer, when,
};
use crate::AppState;
use askama::Template;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use decap_core::build::{Build, BuildStatus};
use decap_core::names::ProjectKey;
use decap_core::ports::BuildQuery;
use futures::Stream;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use time::OffsetDateTime;

/// A running build with its progress.
pub struct RunningRow {
    /// The build.
    pub build: BuildRow,
    /// Percent done by the project's average (0–99), when there is one.
    pub percent: Option<i64>,
    /// "about 2 min left" or "running longer than usual".
    pub estimate: String,
}

/// A commit with a box per build (a box per stage attempt for a
/// pipeline), labelled with every ref built at it.
pub struct CommitRow {
    /// `team/project`.
    pub project: String,
    /// The refs its builds were of (branches, tags, pull requests).
    pub refs: String,
    /// The commit, shortened.
    pub commit: String,
    /// Its builds, oldest first.
    pub builds: Vec<BuildRow>,
}

/// A deferred build.
pub struct WaitingRow {
    /// The build.
    pub id: String,
    /// `team/project`.
    pub project: String,
    /// The branch.
    pub branch: String,
    /// Why it waits.
    pub reason: String,
    /// Since when.
    pub since: When,
}

/// The deferred builds, oldest first.
pub(super) async fn waiting_rows(app: &AppState) -> decap_core::Result<Vec<WaitingRow>> {
    Ok(app
        .controller
        .ports
        .queue
        .list()
        .await?
        .into_iter()
        .map(|e| WaitingRow {
            id: e.build_id.to_string(),
            project: e.project.to_string(),
            branch: e.branch,
            reason: e.reason,
            since: when(e.deferred_at),
        })
        .collect())
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    viewer: Viewer,
    running: Vec<RunningRow>,
    waiting: Vec<WaitingRow>,
    latest: Vec<BuildRow>,
    commits: Vec<CommitRow>,
    queue_open: bool,
    /// Other CI servers' builds (the CI status hub).
    hub: Vec<crate::hub::ProjectState>,
}

/// `GET /` — what runs, what waits and why, the latest results, and recent
/// commits with a box per build.
pub async fn dashboard(State(app): State<AppState>, headers: HeaderMap, ci: Peer) -> Response {
    let ports = &app.controller.ports;
    let running = match ports
        .builds
        .list(&BuildQuery {
            statuses: vec![BuildStatus::Running],
            limit: 100,
            ..BuildQuery::default()
        })
        .await
    {
        Ok(p) => p.builds,
        Err(e) => return core_error_page(e),
    };
    let mut averages: HashMap<ProjectKey, Option<i64>> = HashMap::new();
    let mut running_rows = Vec::new();
    for b in &running {
        if !averages.contains_key(&b.project) {
            let avg = ports
                .builds
                .stats(&b.project, None, 20)
                .await
                .ok()
                .and_then(|s| s.average_duration_ms);
            averages.insert(b.project.clone(), avg);
        }
        let avg = averages.get(&b.project).copied().flatten();
        let elapsed = b
            .start_time
            .map(|s| (OffsetDateTime::now_utc() - s).whole_milliseconds() as i64)
            .unwrap_or(0);
        let (percent, estimate) = match avg {
            Some(avg) if avg > 0 => {
                let pct = (elapsed * 100 / avg).clamp(0, 99);
                let left = avg - elapsed;
                let text = if left > 0 {
                    format!("about {} left", duration_text(left))
                } else {
                    "running longer than usual".to_owned()
                };
                (Some(pct), text)
            }
            _ => (None, "no estimate yet".to_owned()),
        };
        running_rows.push(RunningRow {
            build: row(b),
            percent,
            estimate,
        });
    }
    let waiting = match waiting_rows(&app).await {
        Ok(rows) => rows,
        Err(e) => return core_error_page(e),
    };
    let recent = match ports
        .builds
        .list(&BuildQuery {
            limit: 200,
            ..BuildQuery::default()
        })
        .await
    {
        Ok(p) => p.builds,
        Err(e) => return core_error_page(e),
    };
    let latest = recent
        .iter()
        .filter(|b| b.status.is_final())
        .take(15)
        .map(row)
        .collect();
    // Commits, newest first, each with its builds oldest first.
    let mut order: Vec<(ProjectKey, String)> = Vec::new();
    let mut by_commit: HashMap<(ProjectKey, String), Vec<&Build>> = HashMap::new();
    for b in &recent {
        let key = (
            b.project.clone(),
            b.commit
                .clone()
                .unwrap_or_else(|| format!("ref {}", b.git_ref)),
        );
        if !by_commit.contains_key(&key) {
            order.push(key.clone());
        }
        by_commit.entry(key).or_default().push(b);
    }
    let commits = order
        .into_iter()
        .take(12)
        .filter_map(|key| {
            let mut builds = by_commit.remove(&key)?;
            builds.reverse();
            let first = builds.first()?;
            let mut refs: Vec<&str> = builds.iter().map(|b| b.branch.as_str()).collect();
            refs.sort_unstable();
            refs.dedup();
            Some(CommitRow {
                project: key.0.to_string(),
                refs: refs.join(", "),
                commit: first
                    .commit
                    .as_deref()
                    .map(|c| c.chars().take(10).collect())
                    .unwrap_or_default(),
                builds: builds.into_iter().map(row).collect(),
            })
        })
        .collect();
    render(&Dashboard {
        viewer: viewer(&app, &headers, ci.0).await,
        running: running_rows,
        waiting,
        latest,
        commits,
        queue_open: app.controller.queue_open().await,
        hub: match &app.hub {
            Some(hub) => hub.states().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the CI status hub");
                Vec::new()
            }),
            None => Vec::new(),
        },
    })
}

/// `GET /ui/events` — a server-sent event each time a build changes, so
/// pages refresh when something happened rather than on a timer.
pub async fn events(
    State(app): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    use futures::StreamExt;
    let stream =
        tokio_stream::wrappers::BroadcastStream::new(app.controller.subscribe()).map(|changed| {
            let data = match changed {
                Ok(b) => format!("{} {}", b.id, b.status.as_str()),
                Err(_) => "lagged".to_owned(), // some were missed: refresh anyway
            };
            Ok(Event::default().event("build").data(data))
        });
    let stream = crate::streams::until_stopping(stream, app.controller.stopping());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

// --------------------------------------------------------------- projects
