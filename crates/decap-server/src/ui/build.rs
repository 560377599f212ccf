//! A build's page.

use super::{
    BuildRow, Peer, Viewer, When, core_error_page, not_found_page, render, row, viewer, when,
};
use crate::AppState;
use askama::Template;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use decap_core::build::{BuildId, BuildStatus};

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    viewer: Viewer,
    b: BuildRow,
    git_ref: String,
    full_commit: String,
    team: String,
    project: String,
    started: Option<When>,
    ended: Option<When>,
    /// When a running build started (RFC 3339), so that the page counts
    /// how long it has been running; empty otherwise.
    running_since: String,
    exit_code: String,
    scripts_commit: String,
    executor: String,
    rerun_of: String,
    is_final: bool,
    can_cancel: bool,
    artifacts: Vec<String>,
    artifacts_error: String,
    phases: Vec<PhaseRow>,
}

/// A phase of a preset build, as the build page shows it.
pub(crate) struct PhaseRow {
    pub(crate) name: &'static str,
    /// `passed`, `failed (exit code N)` or `not run`.
    pub(crate) outcome: String,
    pub(crate) ok: bool,
    pub(crate) took: String,
    /// Each command and where it came from (`default`, `.decap.json`).
    pub(crate) commands: Vec<(String, &'static str)>,
}

/// The rows of a build's phases.
pub(crate) fn phase_rows(phases: &[decap_core::preset::PhaseRecord]) -> Vec<PhaseRow> {
    phases
        .iter()
        .map(|p| PhaseRow {
            name: p.name.name(),
            outcome: match p.exit_code {
                None => "not run".into(),
                Some(0) => "passed".into(),
                Some(c) => format!("failed (exit code {c})"),
            },
            ok: p.exit_code == Some(0),
            took: match p.exit_code {
                None => String::new(),
                Some(_) => format!("{:.2} s", p.duration_ms as f64 / 1000.0),
            },
            commands: p
                .commands
                .iter()
                .map(|c| {
                    (
                        c.run.clone(),
                        match c.from {
                            decap_core::preset::CommandSource::Default => "default",
                            decap_core::preset::CommandSource::Override => ".decap.json",
                        },
                    )
                })
                .collect(),
        })
        .collect()
}

/// `GET /builds/{id}` — one build: its facts, its console (live while it
/// runs), its artifacts, Rerun and Cancel.
pub async fn build(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    let Ok(id) = BuildId::parse(&id) else {
        return not_found_page("That is not a build id.");
    };
    let b = match app.controller.build(id).await {
        Ok(b) => b,
        Err(decap_core::Error::NotFound(_)) => {
            return not_found_page("There is no such build (it may have been removed).");
        }
        Err(e) => return core_error_page(e),
    };
    let (artifacts, artifacts_error) = if b.status.is_final() {
        artifact_names(&app, b.id).await
    } else {
        (Vec::new(), String::new())
    };
    render(&BuildPage {
        viewer: viewer(&app, &headers, ci.0).await,
        b: row(&b),
        git_ref: b.git_ref.clone(),
        full_commit: b.commit.clone().unwrap_or_default(),
        team: b.project.team.clone(),
        project: b.project.project.clone(),
        started: b.start_time.map(when),
        ended: b.end_time.map(when),
        running_since: match (b.status, b.start_time) {
            (BuildStatus::Running, Some(t)) => when(t).exact,
            _ => String::new(),
        },
        exit_code: b.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        scripts_commit: b.scripts_commit.clone().unwrap_or_default(),
        executor: match (&b.executor, &b.sandbox) {
            (Some(e), Some(s)) => format!("{e} (sandbox: {s})"),
            (Some(e), None) => e.clone(),
            _ => String::new(),
        },
        rerun_of: b.rerun_of.map(|r| r.to_string()).unwrap_or_default(),
        is_final: b.status.is_final(),
        can_cancel: matches!(
            b.status,
            BuildStatus::Running | BuildStatus::Deferred | BuildStatus::Queued
        ),
        artifacts,
        artifacts_error,
        phases: phase_rows(&b.phases),
    })
}

/// The files of a build's artifacts, from their index (made once).
async fn artifact_names(app: &AppState, id: BuildId) -> (Vec<String>, String) {
    match crate::uploads::index(app, id).await {
        Ok(Some(index)) => (
            index.files.into_iter().take(1000).map(|f| f.path).collect(),
            String::new(),
        ),
        Ok(None) => (Vec::new(), String::new()),
        Err(e) => (
            Vec::new(),
            format!("the artifacts cannot be read: {}", e.message),
        ),
    }
}

// ------------------------------------------------------------ queue, locks
