//! Projects: the list, a project's page and its refs.

use super::{
    BuildRow, Peer, Viewer, core_error_page, duration_text, error_page, not_found_page, query,
    render, row, viewer,
};
use crate::AppState;
use askama::Template;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use decap_core::build::BuildStatus;
use decap_core::names::ProjectKey;
use decap_core::ports::BuildQuery;

/// A project in the list.
pub struct ProjectRow {
    /// Team.
    pub team: String,
    /// Project.
    pub project: String,
    /// Its description.
    pub description: String,
    /// Its repository.
    pub repo_url: String,
    /// Why its files are invalid.
    pub error: String,
    /// Its last finished build.
    pub last: Option<BuildRow>,
}

#[derive(Template)]
#[template(path = "projects.html")]
struct Projects {
    viewer: Viewer,
    teams: Vec<(String, Vec<ProjectRow>)>,
    scripts_commit: String,
}

/// `GET /projects` — every project of the build scripts, by team.
pub async fn projects(State(app): State<AppState>, headers: HeaderMap, ci: Peer) -> Response {
    let catalog = app.controller.ports.scripts.catalog();
    let mut teams: Vec<(String, Vec<ProjectRow>)> = Vec::new();
    for p in catalog.projects.values() {
        let last = app
            .controller
            .ports
            .builds
            .list(&BuildQuery {
                project: Some(p.key.clone()),
                statuses: decap_core::stats::FINAL.to_vec(),
                limit: 1,
                ..BuildQuery::default()
            })
            .await
            .ok()
            .and_then(|page| page.builds.first().map(row));
        let d = p.descriptor.as_ref().map(|d| &d.descriptor);
        let project = ProjectRow {
            team: p.key.team.clone(),
            project: p.key.project.clone(),
            description: d
                .and_then(|d| d.repo_description.clone())
                .unwrap_or_default(),
            repo_url: d
                .and_then(|d| d.repo_url.clone())
                .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
                .unwrap_or_default(),
            error: p.error.clone().unwrap_or_default(),
            last,
        };
        match teams.iter_mut().find(|(t, _)| *t == p.key.team) {
            Some((_, list)) => list.push(project),
            None => teams.push((p.key.team.clone(), vec![project])),
        }
    }
    render(&Projects {
        viewer: viewer(&app, &headers, ci.0).await,
        teams,
        scripts_commit: catalog.commit.clone(),
    })
}

/// The durations chart: bars on a scale from 0 to the longest build.
pub struct Chart {
    /// The bars, oldest first.
    pub bars: Vec<Bar>,
    /// The drawing's width (the scale's labels, then a bar per build).
    pub width: usize,
    /// The top of the scale (the longest build) and its middle, in words.
    pub top: String,
    /// The middle of the scale, in words.
    pub middle: String,
}

/// Where the bars start, right of the scale's labels.
const CHART_LEFT: usize = 48;
/// The bars' baseline (0), with [`CHART_HEIGHT`] above it.
const CHART_BASE: i64 = 66;
/// The tallest bar.
const CHART_HEIGHT: i64 = 60;

/// A bar of the durations chart.
pub struct Bar {
    /// x of its left edge.
    pub x: usize,
    /// Its height (of [`CHART_HEIGHT`]).
    pub height: i64,
    /// y of its top.
    pub y: i64,
    /// Its status (the fill).
    pub status: &'static str,
    /// Its tooltip.
    pub title: String,
    /// Its build.
    pub id: String,
}

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    viewer: Viewer,
    team: String,
    project: String,
    description: String,
    repo_url: String,
    error: String,
    /// What this server's executor cannot honour of the project.
    warnings: Vec<String>,
    /// Whether the project names its repository (whose refs the page
    /// then asks for).
    has_repo: bool,
    branches: Vec<String>,
    builds: Vec<BuildRow>,
    next_cursor: String,
    filter_branch: String,
    filter_status: String,
    statuses: Vec<&'static str>,
    builds_counted: usize,
    failure_rate: String,
    average: String,
    chart: Chart,
    /// Whether the Subscribe button shows (GitHub is configured).
    can_subscribe: bool,
    /// The language of a project that builds with its preset; empty
    /// otherwise.
    language: String,
    /// Where `phases` come from: the latest build that ran them, or the
    /// preset with the defaults.
    phases_from: String,
    phases: Vec<super::build::PhaseRow>,
    /// The stages of the project's pipeline (empty without `pipeline.json`).
    stages: Vec<super::pipelines::StageHead>,
    /// Its recent runs and its stages' figures.
    pipeline: Option<super::pipelines::PipelineSection>,
}

/// `GET /projects/{team}/{project}` — branches with a Build button, the
/// history (paginated, filtered by branch and status), and figures with a
/// chart of durations.
pub async fn project(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    let key = match ProjectKey::new(&team, &project) {
        Ok(k) => k,
        Err(e) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Not a project name",
                &e.to_string(),
            );
        }
    };
    let entry = app.controller.project(&key).ok();
    let params = query(&q);
    let filter_branch = params.get("branch").cloned().unwrap_or_default();
    let filter_status = params.get("status").cloned().unwrap_or_default();
    let mut history = BuildQuery {
        project: Some(key.clone()),
        limit: 25,
        cursor: params.get("cursor").cloned().filter(|c| !c.is_empty()),
        ..BuildQuery::default()
    };
    if !filter_branch.is_empty() {
        if let Err(e) = decap_core::names::validate_branch(&filter_branch) {
            return error_page(StatusCode::BAD_REQUEST, "Not a branch name", &e.to_string());
        }
        history.branch = Some(filter_branch.clone());
    }
    if !filter_status.is_empty() {
        match filter_status.parse::<BuildStatus>() {
            Ok(s) => history.statuses = vec![s],
            Err(e) => return error_page(StatusCode::BAD_REQUEST, "Not a status", &e.to_string()),
        }
    }
    let page = match app.controller.ports.builds.list(&history).await {
        Ok(p) => p,
        Err(e) => return core_error_page(e),
    };
    if entry.is_none() && page.builds.is_empty() && history.cursor.is_none() {
        return not_found_page(&format!("There is no project {key}."));
    }
    // Branches: those built lately (the plain list); the repository's
    // other refs load into the page from /ui/refs when it can list them.
    let branches = recent_branches(&app, &key).await;
    let stats = app
        .controller
        .ports
        .builds
        .stats(&key, history.branch.as_deref(), 30)
        .await
        .unwrap_or_default();
    let longest = stats
        .points
        .iter()
        .filter_map(|p| p.duration_ms)
        .max()
        .unwrap_or(1)
        .max(1);
    let bars: Vec<Bar> = stats
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ms = p.duration_ms.unwrap_or(0);
            let height = (ms * CHART_HEIGHT / longest).max(2);
            Bar {
                x: CHART_LEFT + 1 + i * 10,
                height,
                y: CHART_BASE - height,
                status: p.status.as_str(),
                title: format!(
                    "{}: {}",
                    p.status.as_str(),
                    p.duration_ms
                        .map(duration_text)
                        .unwrap_or_else(|| "did not run".into())
                ),
                id: p.id.to_string(),
            }
        })
        .collect();
    let d = entry
        .as_ref()
        .and_then(|e| e.descriptor.as_ref())
        .map(|d| &d.descriptor);
    let language = entry.as_ref().and_then(crate::controller::preset_language);
    let (phases_from, phases) = match language {
        None => (String::new(), Vec::new()),
        Some(l) => match page.builds.iter().find(|b| !b.phases.is_empty()) {
            Some(b) => (b.id.to_string(), super::build::phase_rows(&b.phases)),
            None => (
                String::new(),
                decap_core::preset::plan(l, None)
                    .map(|plan| {
                        plan.phases
                            .into_iter()
                            .map(|p| decap_core::preset::PhaseRecord {
                                name: p.name,
                                duration_ms: 0,
                                exit_code: None,
                                commands: p.commands,
                            })
                            .collect::<Vec<_>>()
                    })
                    .map(|r| super::build::phase_rows(&r))
                    .unwrap_or_default(),
            ),
        },
    };
    let (stages, pipeline) = match entry.as_ref().and_then(|e| e.pipeline.as_ref()) {
        Some(def) => (
            super::pipelines::heads(def),
            Some(super::pipelines::section(&app, &key, def).await),
        ),
        None => (Vec::new(), None),
    };
    render(&ProjectPage {
        stages,
        pipeline,
        language: language.map(|l| l.name().to_owned()).unwrap_or_default(),
        phases_from,
        phases,
        viewer: viewer(&app, &headers, ci.0).await,
        team: key.team.clone(),
        project: key.project.clone(),
        description: d
            .and_then(|d| d.repo_description.clone())
            .unwrap_or_default(),
        repo_url: d
            .and_then(|d| d.repo_url.clone())
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .unwrap_or_default(),
        error: match &entry {
            None => "This project is no longer in the build scripts.".to_owned(),
            Some(e) => e.error.clone().unwrap_or_default(),
        },
        has_repo: d.is_some_and(|d| d.repo_url.as_deref().is_some_and(|u| !u.trim().is_empty())),
        warnings: match &entry {
            Some(e) if app.controller.ports.executor.name() == "local" => {
                e.not_honoured_on_the_host()
            }
            _ => Vec::new(),
        },
        branches,
        builds: page.builds.iter().map(row).collect(),
        next_cursor: page.next_cursor.unwrap_or_default(),
        filter_branch,
        filter_status,
        statuses: vec![
            "queued",
            "deferred",
            "running",
            "succeeded",
            "failed",
            "errored",
            "timed_out",
            "cancelled",
        ],
        builds_counted: stats.builds,
        failure_rate: stats
            .failure_rate
            .map(|r| format!("{:.0} %", r * 100.0))
            .unwrap_or_else(|| "—".to_owned()),
        average: stats
            .average_duration_ms
            .map(duration_text)
            .unwrap_or_else(|| "—".to_owned()),
        chart: Chart {
            width: CHART_LEFT + (bars.len() * 10).max(100),
            bars,
            top: duration_text(longest),
            middle: duration_text(longest / 2),
        },
        can_subscribe: app.github_hooks.is_some(),
    })
}

#[derive(Template)]
#[template(path = "refs.html")]
struct RefsFragment {
    team: String,
    project: String,
    refs: Vec<(String, String)>,
    error: String,
    can_act: bool,
}

/// `GET /ui/refs/{team}/{project}` — the repository's branches and tags,
/// each with a Build button (an htmx fragment of the project page).
/// The branches of a project's latest 200 builds, newest first, once each.
async fn recent_branches(app: &AppState, key: &ProjectKey) -> Vec<String> {
    let mut branches: Vec<String> = Vec::new();
    if let Ok(recent) = app
        .controller
        .ports
        .builds
        .list(&BuildQuery {
            project: Some(key.clone()),
            limit: 200,
            ..BuildQuery::default()
        })
        .await
    {
        for b in recent.builds {
            if !branches.contains(&b.branch) {
                branches.push(b.branch);
            }
        }
    }
    branches
}

pub async fn refs_fragment(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    let can_act = viewer(&app, &headers, ci.0).await.can_act;
    // The branches built lately are on the page already, each with its
    // Build button: the repository adds the others.
    let shown = match ProjectKey::new(&team, &project) {
        Ok(key) => recent_branches(&app, &key).await,
        Err(_) => Vec::new(),
    };
    let (refs, error) =
        match crate::api::refs(State(app), Path((team.clone(), project.clone()))).await {
            Ok(axum::Json(r)) => (
                r.refs
                    .into_iter()
                    .filter(|r| !shown.contains(&r.name))
                    .map(|r| (r.name, r.kind))
                    .collect(),
                String::new(),
            ),
            Err(e) => (Vec::new(), e.message),
        };
    render(&RefsFragment {
        team,
        project,
        refs,
        error,
        can_act,
    })
}

// ------------------------------------------------------------------ build
