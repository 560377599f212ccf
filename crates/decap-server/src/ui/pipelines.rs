//! The project page's pipeline: its stages drawn before they run, each
//! recent run as a row of stage boxes (those not run yet shown as such),
//! with Rerun-from-here and Promote.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use decap_core::names::ProjectKey;
use decap_core::pipeline::StageStatus;

use super::actions::act_on;
use super::{Peer, StatusView, When, duration_text, status_view, when};
use crate::AppState;
use crate::controller::RunView;

/// A stage of the definition, as the page draws it.
pub struct StageHead {
    /// Its name.
    pub name: String,
    /// What it needs, in words (`after build, lint`).
    pub needs: String,
    /// It waits for Promote.
    pub manual: bool,
}

/// One stage of one run.
pub struct StageBox {
    /// The stage.
    pub name: String,
    /// `pending`, `waiting`, `skipped` or the build's status.
    pub status: String,
    /// Its symbol for a build status, else empty.
    pub symbol: &'static str,
    /// Its current (latest) attempt, if any.
    pub build: String,
    /// How many attempts it had.
    pub attempts: usize,
    /// Promote shows.
    pub can_approve: bool,
    /// Rerun-from-here shows.
    pub can_rerun: bool,
}

/// One run, a row of boxes.
pub struct RunRow {
    /// The run id.
    pub id: String,
    /// Its branch.
    pub branch: String,
    /// Its commit, shortened.
    pub commit: String,
    /// Its status.
    pub status: String,
    /// When it was asked for.
    pub created: When,
    /// About how long a running run has left (else empty).
    pub left: String,
    /// Its stages.
    pub stages: Vec<StageBox>,
}

/// A stage's figures, as the page shows them.
pub struct StageFigures {
    /// The stage.
    pub name: String,
    /// The runs in which it ended, and its attempts when reruns add to
    /// them.
    pub ended: String,
    /// Its failure rate.
    pub failure_rate: String,
    /// Median duration.
    pub p50: String,
    /// 90th percentile duration.
    pub p90: String,
}

/// The pipeline part of a project page.
pub struct PipelineSection {
    /// The recent runs.
    pub runs: Vec<RunRow>,
    /// Each stage's figures over the last runs.
    pub figures: Vec<StageFigures>,
    /// How many runs the figures are over, in words.
    pub counted: String,
    /// From request to the last stage's success, median (or a dash).
    pub lead_time: String,
}

/// The pipeline's stages, for the heading of the runs table.
pub fn heads(def: &decap_core::pipeline::PipelineDef) -> Vec<StageHead> {
    let needs = def.needs();
    def.stages
        .iter()
        .map(|s| StageHead {
            name: s.name.clone(),
            needs: needs[s.name.as_str()].join(", "),
            manual: s.manual,
        })
        .collect()
}

/// A run as a row of boxes; `left` is about how long it has left, in ms.
pub fn row(v: &RunView, left: Option<i64>) -> RunRow {
    let active = v.plan.status == "running";
    RunRow {
        id: v.run.id.to_string(),
        branch: v.run.branch.clone(),
        commit: v
            .run
            .commit
            .as_deref()
            .map(|c| c.chars().take(10).collect())
            .unwrap_or_default(),
        status: v.plan.status.to_owned(),
        created: when(v.run.created_at),
        left: left
            .map(|ms| format!("about {} left", duration_text(ms)))
            .unwrap_or_default(),
        stages: v
            .plan
            .stages
            .iter()
            .map(|s| {
                let (status, symbol) = match s.status {
                    StageStatus::Build(b) => {
                        let StatusView { name, symbol } = status_view(b);
                        (name.to_owned(), symbol)
                    }
                    other => (other.as_str().to_owned(), ""),
                };
                StageBox {
                    name: s.name.clone(),
                    status,
                    symbol,
                    build: s
                        .attempts
                        .last()
                        .map(|b| b.id.to_string())
                        .unwrap_or_default(),
                    attempts: s.attempts.len(),
                    can_approve: s.status == StageStatus::Waiting,
                    can_rerun: !active && matches!(s.status, StageStatus::Build(b) if b.is_final()),
                }
            })
            .collect(),
    }
}

/// How many recent runs the project page shows.
const SHOWN: usize = 10;
/// How many recent runs its figures are over.
const COUNTED: usize = 50;

/// The recent runs of a project with a pipeline, and its stages' figures.
pub async fn section(
    app: &AppState,
    key: &ProjectKey,
    def: &decap_core::pipeline::PipelineDef,
) -> PipelineSection {
    let views = match app.controller.pipeline_runs(key, None, COUNTED).await {
        Ok((views, _)) => views,
        Err(e) => {
            tracing::warn!(project = %key, error = %e, "cannot list pipeline runs");
            Vec::new()
        }
    };
    let pairs: Vec<_> = views.iter().map(|v| (&v.run, &v.plan)).collect();
    let st = decap_core::pipeline::stats(def, &pairs);
    let now = time::OffsetDateTime::now_utc();
    let dash = || "—".to_owned();
    let ms = |v: Option<i64>| v.map(duration_text).unwrap_or_else(dash);
    PipelineSection {
        runs: views
            .iter()
            .take(SHOWN)
            .map(|v| row(v, decap_core::pipeline::time_left(&v.plan, &st, now)))
            .collect(),
        figures: st
            .stages
            .iter()
            .map(|s| StageFigures {
                name: s.name.clone(),
                ended: if s.attempts > s.runs {
                    format!(
                        "{}, {}",
                        count(s.runs, "run", "runs"),
                        count(s.attempts, "attempt", "attempts")
                    )
                } else {
                    count(s.runs, "run", "runs")
                },
                failure_rate: s
                    .failure_rate
                    .map(|r| format!("{:.0} %", r * 100.0))
                    .unwrap_or_else(dash),
                p50: ms(s.p50_ms),
                p90: ms(s.p90_ms),
            })
            .collect(),
        counted: count(st.runs, "run", "runs"),
        lead_time: ms(st.lead_time_p50_ms),
    }
}

/// `POST /ui/pipeline-runs/{id}/stages/{stage}/rerun`.
pub async fn rerun_stage(
    State(app): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_run(&app, &id, stage, &headers, ci, false).await
}

/// `POST /ui/pipeline-runs/{id}/stages/{stage}/approve`.
pub async fn approve_stage(
    State(app): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_run(&app, &id, stage, &headers, ci, true).await
}

async fn on_run(
    app: &AppState,
    id: &str,
    stage: String,
    headers: &HeaderMap,
    ci: Peer,
    approve: bool,
) -> Response {
    let id = uuid::Uuid::parse_str(id).ok();
    act_on(app, headers, ci, |c| async move {
        let Some(id) = id else {
            return Err(decap_core::Error::NotFound("that pipeline run".into()));
        };
        let b = if approve {
            c.approve_stage(id, &stage).await?
        } else {
            c.rerun_stage(id, &stage).await?
        };
        Ok(format!("/builds/{}", b.id))
    })
    .await
}

/// `n` and the noun it counts, singular for one.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
