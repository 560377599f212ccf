//! The wire format of Decap's HTTP API (`../shared/API.md` is the contract).
//!
//! The server serialises these types and decapctl and bctool deserialise them,
//! so the format has one definition. Field names are camelCase and times are
//! RFC 3339, as the API document says.
#![deny(missing_docs)]

use decap_core::build::Build;
use decap_core::ports::{DeferredEntry, Lock};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A build, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildView {
    /// The build id.
    pub id: String,
    /// The pipeline run the build belongs to.
    pub pipeline_run_id: String,
    /// The stage of the run it is an attempt of (`build` for a project
    /// without `pipeline.json`).
    #[serde(default = "default_stage")]
    pub stage: String,
    /// Which attempt of its stage (1-based).
    #[serde(default = "one")]
    pub attempt: u32,
    /// The team.
    pub team: String,
    /// The project.
    pub project: String,
    /// `team/project`.
    pub project_key: String,
    /// The branch or tag (short name).
    pub branch: String,
    /// The full ref.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit, when known.
    pub commit: Option<String>,
    /// `webhook`, `manual`, `api` or `rerun`.
    pub trigger: String,
    /// The status.
    pub status: String,
    /// The script's exit code.
    pub exit_code: Option<i32>,
    /// When it was accepted.
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    /// When it started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub start_time: Option<OffsetDateTime>,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339::option")]
    pub end_time: Option<OffsetDateTime>,
    /// How long it ran.
    pub duration_ms: Option<i64>,
    /// The build-scripts commit pinned at launch.
    pub scripts_commit: Option<String>,
    /// `local` or `kubernetes`.
    pub executor: Option<String>,
    /// The sandbox (`bubblewrap`, `none`).
    pub sandbox: Option<String>,
    /// Why it waits or how it ended.
    pub message: Option<String>,
    /// The build this one reruns.
    pub rerun_of: Option<String>,
    /// The build is of a pull request from a fork: it got no secrets.
    #[serde(default)]
    pub from_fork: bool,
    /// How each phase of a preset build went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<decap_core::preset::PhaseRecord>,
    /// The build's page.
    pub url: String,
}

impl BuildView {
    /// The view of a build, with `base_url` the server's public URL.
    pub fn from_build(b: &Build, base_url: &str) -> Self {
        BuildView {
            id: b.id.to_string(),
            pipeline_run_id: b.pipeline_run_id.to_string(),
            stage: b.stage_name().to_owned(),
            attempt: b.attempt(),
            team: b.project.team.clone(),
            project: b.project.project.clone(),
            project_key: b.project.to_string(),
            branch: b.branch.clone(),
            git_ref: b.git_ref.clone(),
            commit: b.commit.clone(),
            trigger: b.trigger.as_str().to_owned(),
            status: b.status.as_str().to_owned(),
            exit_code: b.exit_code,
            queued_at: b.queued_at,
            start_time: b.start_time,
            end_time: b.end_time,
            duration_ms: b.duration_ms(),
            scripts_commit: b.scripts_commit.clone(),
            executor: b.executor.clone(),
            sandbox: b.sandbox.clone(),
            message: b.message.clone(),
            rerun_of: b.rerun_of.map(|id| id.to_string()),
            from_fork: b.from_fork,
            phases: b.phases.clone(),
            url: format!("{}/builds/{}", base_url.trim_end_matches('/'), b.id),
        }
    }

    /// Whether the build has ended.
    pub fn is_final(&self) -> bool {
        self.status
            .parse::<decap_core::BuildStatus>()
            .map(|s| s.is_final())
            .unwrap_or(false)
    }
}

fn default_stage() -> String {
    decap_core::pipeline::DEFAULT_STAGE.to_owned()
}

fn one() -> u32 {
    1
}

/// One stage of a pipeline run, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageView {
    /// The stage's name.
    pub name: String,
    /// `pending`, `waiting` (a manual stage, for Promote), `skipped`, or
    /// the status of its current attempt.
    pub status: String,
    /// The stages it needs.
    pub needs: Vec<String>,
    /// It waits for Promote.
    pub manual: bool,
    /// Its attempts, oldest first.
    pub attempts: Vec<BuildView>,
}

/// `GET /api/v1/pipeline-runs/{id}`: a run with every stage of its
/// pipeline, those not yet run among them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRunView {
    /// The run id.
    pub id: String,
    /// `team/project`.
    pub project: String,
    /// The branch or tag (short name).
    pub branch: String,
    /// The full ref.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit, when known.
    pub commit: Option<String>,
    /// The build-scripts commit the pipeline was read at.
    pub scripts_commit: String,
    /// What asked for it.
    pub trigger: String,
    /// When it was asked for.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `running`, `waiting`, `succeeded`, or how its first stage that did
    /// not succeed ended.
    pub status: String,
    /// Every stage, in the definition's order.
    pub stages: Vec<StageView>,
}

impl PipelineRunView {
    /// The view of a run as it stands.
    pub fn new(
        run: &decap_core::pipeline::PipelineRun,
        plan: &decap_core::pipeline::Plan,
        base_url: &str,
    ) -> Self {
        PipelineRunView {
            id: run.id.to_string(),
            project: run.project.to_string(),
            branch: run.branch.clone(),
            git_ref: run.git_ref.clone(),
            commit: run.commit.clone(),
            scripts_commit: run.scripts_commit.clone(),
            trigger: run.trigger.as_str().to_owned(),
            created_at: run.created_at,
            status: plan.status.to_owned(),
            stages: plan
                .stages
                .iter()
                .map(|s| StageView {
                    name: s.name.clone(),
                    status: s.status.as_str().to_owned(),
                    needs: s.needs.clone(),
                    manual: s.manual,
                    attempts: s
                        .attempts
                        .iter()
                        .map(|b| BuildView::from_build(b, base_url))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/pipelines/{team}/{project}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRunsPage {
    /// Newest first.
    pub runs: Vec<PipelineRunView>,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/builds/{team}/{project}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildsPage {
    /// Newest first.
    pub builds: Vec<BuildView>,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/stats/{team}/{project}`: figures over recent finished builds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatsView {
    /// `team/project`.
    pub project: String,
    /// The branch, when the figures are for one.
    pub branch: Option<String>,
    /// Finished builds counted (at most `last`).
    pub builds: usize,
    /// Of them, succeeded.
    pub succeeded: usize,
    /// Failed.
    pub failed: usize,
    /// Errored.
    pub errored: usize,
    /// Timed out.
    pub timed_out: usize,
    /// Cancelled (in no rate).
    pub cancelled: usize,
    /// (failed + errored + timed out) / (builds − cancelled); null without any.
    pub failure_rate: Option<f64>,
    /// Mean duration of the green builds (else of all that ran), in ms.
    pub average_duration_ms: Option<i64>,
    /// The builds, oldest first, for a chart.
    pub durations: Vec<DurationPoint>,
    /// Per stage of the project's pipeline (one stage, `build`, without
    /// `pipeline.json`), over its last `last` runs (at most 100).
    pub pipeline: PipelineStatsView,
}

/// Figures of a project's pipeline in [`ProjectStatsView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatsView {
    /// Runs counted, each stage's duration p50 and p90 and failure rate,
    /// and the time from a run's request to its last stage's success.
    #[serde(flatten)]
    pub figures: decap_core::pipeline::PipelineStats,
    /// The running runs among them, with about how long each has left.
    pub running: Vec<RunEstimate>,
}

/// A running run and about how long it has left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunEstimate {
    /// The run id.
    pub id: String,
    /// By its stages' medians, in ms.
    pub estimated_left_ms: i64,
}

/// One finished build in [`ProjectStatsView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DurationPoint {
    /// The build.
    pub id: String,
    /// How it ended.
    pub status: String,
    /// How long it ran.
    pub duration_ms: Option<i64>,
}

/// `POST /api/v1/builds/{team}/{project}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildsCreated {
    /// The builds started: one per requested branch, or, for a project
    /// with a pipeline, the first stages of each branch's run.
    pub builds: Vec<BuildView>,
    /// The pipeline run of the (first) requested branch.
    #[serde(default)]
    pub pipeline_run: Option<String>,
    /// The pipeline run of each requested branch, in order.
    #[serde(default)]
    pub pipeline_runs: Vec<String>,
}

/// The answer to a webhook.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookAnswer {
    /// `X-GitHub-Delivery`.
    pub delivery: String,
    /// The builds it started (or started the first time it was delivered).
    pub builds: Vec<String>,
    /// The pipeline run it made, for a project with a pipeline.
    #[serde(
        default,
        rename = "pipelineRun",
        skip_serializing_if = "Option::is_none"
    )]
    pub pipeline_run: Option<String>,
    /// Why nothing was built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
}

/// `GET /api/v1/version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    /// The release.
    pub version: String,
    /// The source commit, when known.
    pub commit: String,
}

/// A team.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Team {
    /// Its name.
    pub name: String,
}

/// `GET /api/v1/teams`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Teams {
    /// Sorted, unique.
    pub teams: Vec<Team>,
}

/// A project's descriptor fields, as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DescriptorView {
    /// The build image (empty for a project with a `language` that names
    /// none: its preset's image is used).
    pub build_image: String,
    /// The language whose preset the project builds with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// The repository manager.
    pub repo_manager: Option<String>,
    /// The repository URL.
    pub repo_url: Option<String>,
    /// The description.
    pub repo_description: Option<String>,
    /// The managed ref regex.
    pub managed_ref_regex: Option<String>,
    /// The build timeout.
    pub build_timeout_seconds: u64,
}

/// A project.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectView {
    /// The team.
    pub team: String,
    /// The project.
    pub project: String,
    /// The descriptor, when valid.
    pub descriptor: Option<DescriptorView>,
    /// The sidecar container specs.
    pub sidecars: Vec<serde_json::Value>,
    /// Why the project cannot build; null when it can.
    pub error: Option<String>,
}

/// `GET /api/v1/projects`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Projects {
    /// Sorted by key.
    pub projects: Vec<ProjectView>,
    /// The build-scripts commit the list was read at.
    pub scripts_commit: String,
}

/// A ref of a project.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefView {
    /// Short name.
    #[serde(rename = "ref")]
    pub name: String,
    /// `branch` or `tag`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// `GET /api/v1/projects/{team}/{project}/refs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refs {
    /// Branches, then tags.
    pub refs: Vec<RefView>,
}

/// A deferred build.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeferredView {
    /// The build id.
    pub id: String,
    /// The team.
    pub team: String,
    /// The project.
    pub project: String,
    /// The branch or tag.
    pub branch: String,
    /// The full ref.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit, when known.
    pub commit: Option<String>,
    /// When it was deferred.
    #[serde(with = "time::serde::rfc3339")]
    pub deferred_at: OffsetDateTime,
    /// Why it waits.
    pub reason: String,
}

impl From<&DeferredEntry> for DeferredView {
    fn from(e: &DeferredEntry) -> Self {
        DeferredView {
            id: e.build_id.to_string(),
            team: e.project.team.clone(),
            project: e.project.project.clone(),
            branch: e.branch.clone(),
            git_ref: e.git_ref.clone(),
            commit: e.commit.clone(),
            deferred_at: e.deferred_at,
            reason: e.reason.clone(),
        }
    }
}

/// `GET /api/v1/deferred`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeferredList {
    /// Oldest first.
    pub deferred: Vec<DeferredView>,
}

/// A held lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockView {
    /// `team/project/branch`.
    pub key: String,
    /// The build holding it.
    pub build_id: String,
    /// The fencing token.
    pub fencing_token: u64,
    /// When it was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub acquired_at: OffsetDateTime,
    /// When it lapses.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl From<&Lock> for LockView {
    fn from(l: &Lock) -> Self {
        LockView {
            key: l.key.to_string(),
            build_id: l.owner.to_string(),
            fencing_token: l.fencing_token,
            acquired_at: l.acquired_at,
            expires_at: l.expires_at,
        }
    }
}

/// `GET /api/v1/locks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Locks {
    /// Sorted by key.
    pub locks: Vec<LockView>,
}

/// `GET /api/v1/secrets/{team}/{project}` and `GET
/// /api/v1/team-secrets/{team}`: the names of a scope's secrets. Values are
/// never answered, by any route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretNames {
    /// Sorted.
    pub secrets: Vec<String>,
}

/// `GET`/`PUT /api/v1/queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Open or closed.
    pub state: QueueOpen,
}

/// Whether the queue takes new builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueOpen {
    /// Builds run as usual.
    Open,
    /// Every new build is deferred until opened.
    Closed,
}

/// `PUT /api/v1/loglevel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLevel {
    /// A level (`info`) or a filter (`decap_server=debug,info`).
    pub level: String,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

/// `POST /api/v1/build/{id}/result`, from bctool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildResult {
    /// The script's exit code (128 + signal when it was killed).
    pub exit_code: i32,
    /// Whether bctool stopped the script at its timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// Notes (upload failures, truncated log) to keep on the build.
    #[serde(default)]
    pub message: Option<String>,
    /// The memory limit, in bytes, when a process of the build was killed
    /// for going past it (bctool sees this in a container's cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_hit: Option<u64>,
    /// How each phase of a preset build went (`bctool phases`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<decap_core::preset::PhaseRecord>,
    /// Whether the build was stopped from outside (bctool was sent TERM or
    /// INT, as a pod deleted or drained is, or lost the process that
    /// started it) rather than ended by its script: it ends `errored`, not
    /// `failed`, since its code did not fail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

impl BuildResult {
    /// How the build ended, as the record keeps it: its status from the
    /// exit code (timed out, or errored when stopped from outside), the
    /// limit it hit named, its phases.
    pub fn outcome(&self) -> decap_core::build::Outcome {
        let limits: Vec<decap_core::limits::LimitHit> = self
            .memory_limit_hit
            .map(decap_core::limits::LimitHit::Memory)
            .into_iter()
            .collect();
        let mut outcome = decap_core::lifecycle::with_limits(
            decap_core::lifecycle::outcome_of_result(
                self.exit_code,
                self.timed_out,
                self.message.clone(),
            ),
            &limits,
        );
        if self.stopped
            && !self.timed_out
            && outcome.status != decap_core::build::BuildStatus::Succeeded
        {
            outcome.status = decap_core::build::BuildStatus::Errored;
        }
        outcome.phases = decap_core::preset::bounded(self.phases.clone());
        outcome
    }
}

/// The name of the header bctool sends to resume a live log stream.
pub const LOG_OFFSET_HEADER: &str = "x-decap-log-offset";

/// Set to `1` in bctool's environment by an executor whose environment's
/// `TMPDIR` is thrown away with it (a local build's workspace): bctool then
/// leaves its private folder there, rather than delete a large console file
/// before it can exit.
pub const TMPDIR_DISCARDED_VAR: &str = "DECAP_TMPDIR_DISCARDED";

/// What the local executor sends a warm bctool (`bctool standby`) on its
/// standard input, as one JSON line, to start a build. Sent over a pipe, so
/// the token never shows in a process listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StandbyLaunch {
    /// The Decap server.
    pub server: String,
    /// The build.
    pub build_id: String,
    /// The build's own token.
    pub token: String,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    /// The command's working directory.
    pub cwd: String,
    /// Files left here become the artifacts.
    pub artifacts_dir: String,
    /// Stop the command after this many seconds.
    pub timeout_secs: u64,
    /// Seconds between TERM and KILL.
    pub kill_grace_secs: u64,
    /// The console log is kept up to this many bytes.
    pub max_log_bytes: u64,
    /// bctool's own settings (not the script's): the direct path to AWS.
    #[serde(default)]
    pub bctool_env: Vec<(String, String)>,
    /// Variables of `env` whose values are masked in the console (the
    /// build's token and secrets).
    #[serde(default)]
    pub masked: Vec<String>,
}
