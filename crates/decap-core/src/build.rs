//! The build record and its state machine.
//!
//! ```text
//!   queued ──► running ──► succeeded | failed | errored | cancelled | timed_out
//!     │  ▲                                 ▲
//!     ▼  │                                 │
//!   deferred ───────────────────────────► cancelled
//! ```
//!
//! A build is created `queued` (durably, before the request is answered),
//! becomes `deferred` when it may not run yet and `queued` again when it is
//! resubmitted, `running` once its executor has it, and ends in exactly one
//! final state. Final states never change.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::names::{LockKey, ProjectKey};

/// A build id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuildId(pub Uuid);

impl BuildId {
    /// A new id for a build created now.
    pub fn new() -> Self {
        BuildId(Uuid::now_v7())
    }

    /// Parses an id from a URL or a command line.
    pub fn parse(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(BuildId)
            .map_err(|_| Error::invalid("build id", format!("{s:?} is not a build id (a UUID)")))
    }
}

impl Default for BuildId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Accepted and durable, not yet scheduled.
    Queued,
    /// Waiting in the deferral queue.
    Deferred,
    /// Handed to an executor.
    Running,
    /// The script exited 0.
    Succeeded,
    /// The script exited non-zero.
    Failed,
    /// Decap or the build environment failed (not the script).
    Errored,
    /// Cancelled by a person or a script.
    Cancelled,
    /// Stopped after its timeout.
    TimedOut,
}

impl BuildStatus {
    /// Every status, in life order.
    pub const ALL: [BuildStatus; 8] = [
        BuildStatus::Queued,
        BuildStatus::Deferred,
        BuildStatus::Running,
        BuildStatus::Succeeded,
        BuildStatus::Failed,
        BuildStatus::Errored,
        BuildStatus::Cancelled,
        BuildStatus::TimedOut,
    ];

    /// Whether the status is final.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            BuildStatus::Queued | BuildStatus::Deferred | BuildStatus::Running
        )
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: BuildStatus) -> bool {
        use BuildStatus::*;
        match self {
            Queued => matches!(next, Deferred | Running | Cancelled | Errored),
            Deferred => matches!(next, Queued | Cancelled | Errored),
            Running => next.is_final(),
            _ => false,
        }
    }

    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Deferred => "deferred",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Errored => "errored",
            BuildStatus::Cancelled => "cancelled",
            BuildStatus::TimedOut => "timed_out",
        }
    }

    /// The final status for a script's exit code.
    pub fn from_exit_code(code: i32) -> Self {
        if code == 0 {
            BuildStatus::Succeeded
        } else {
            BuildStatus::Failed
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BuildStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        BuildStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "status",
                    format!(
                        "{s:?} is not one of queued, deferred, running, succeeded, failed, errored, cancelled, timed_out"
                    ),
                )
            })
    }
}

/// What asked for a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A GitHub webhook.
    Webhook,
    /// A person, from the web UI or decapctl.
    Manual,
    /// A script, through the API.
    Api,
    /// A rerun of an earlier build.
    Rerun,
}

impl Trigger {
    /// The trigger as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Webhook => "webhook",
            Trigger::Manual => "manual",
            Trigger::Api => "api",
            Trigger::Rerun => "rerun",
        }
    }
}

impl FromStr for Trigger {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "webhook" => Ok(Trigger::Webhook),
            "manual" => Ok(Trigger::Manual),
            "api" => Ok(Trigger::Api),
            "rerun" => Ok(Trigger::Rerun),
            _ => Err(Error::invalid("trigger", format!("{s:?} is unknown"))),
        }
    }
}

/// One build of one ref of one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// The build id.
    pub id: BuildId,
    /// The pipeline run this build is a stage of; today every build is the one
    /// stage of its own run, so this equals `id` unless a pipeline sets it.
    pub pipeline_run_id: Uuid,
    /// The project.
    pub project: ProjectKey,
    /// The short ref name (branch or tag) that is built.
    pub branch: String,
    /// The full ref (`refs/heads/main`).
    pub git_ref: String,
    /// The commit, when known (webhooks know it; a manual build of a branch may not).
    pub commit: Option<String>,
    /// What asked for the build.
    pub trigger: Trigger,
    /// Where the build is in its life.
    pub status: BuildStatus,
    /// The script's exit code, once it has one.
    pub exit_code: Option<i32>,
    /// When the request was accepted.
    pub queued_at: OffsetDateTime,
    /// When the executor started the build.
    pub start_time: Option<OffsetDateTime>,
    /// When the build reached its final state.
    pub end_time: Option<OffsetDateTime>,
    /// The build-scripts commit pinned at launch.
    pub scripts_commit: Option<String>,
    /// Which executor ran it (`local`, `kubernetes`).
    pub executor: Option<String>,
    /// The sandbox the executor used (`bubblewrap`, `none`).
    pub sandbox: Option<String>,
    /// Why the build waits (deferred) or why it ended as it did (errored,
    /// cancelled, upload failures noted by bctool).
    pub message: Option<String>,
    /// The webhook delivery that asked for it.
    pub delivery: Option<String>,
    /// The build this one reruns.
    pub rerun_of: Option<BuildId>,
    /// The fencing token of the lock the build ran under.
    pub fencing_token: Option<u64>,
    /// SHA-256 (hex) of the per-build token given to the build environment.
    pub token_sha256: Option<String>,
    /// How the build ended, as reported (by bctool, a cancel, a timeout)
    /// while its environment was still stopping: the build stays `running`,
    /// holding its lock and its place under the caps, until no process of it
    /// is left; then it takes this outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Outcome>,
    /// The build is of a pull request from a fork: it gets no secrets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_fork: bool,
    /// How each phase of a preset build went (see [`crate::preset`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::preset::PhaseRecord>,
    /// The stage of a pipeline run this build is an attempt of; none for a
    /// project without `pipeline.json` (its one stage, `build`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<crate::pipeline::StageRef>,
}

/// How a build ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// The final status.
    pub status: BuildStatus,
    /// The script's exit code, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How each phase of a preset build went, as bctool reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::preset::PhaseRecord>,
}

impl Build {
    /// A new build, `queued` now.
    pub fn new(
        project: ProjectKey,
        git_ref: &crate::refs::GitRef,
        commit: Option<String>,
        trigger: Trigger,
        now: OffsetDateTime,
    ) -> Self {
        Build::of_ref(
            project,
            git_ref.name.clone(),
            git_ref.full(),
            commit,
            trigger,
            now,
        )
    }

    /// [`Build::new`] from a ref already split into its short name and
    /// its full form (a pipeline run keeps both).
    pub(crate) fn of_ref(
        project: ProjectKey,
        branch: String,
        git_ref: String,
        commit: Option<String>,
        trigger: Trigger,
        now: OffsetDateTime,
    ) -> Self {
        let id = BuildId::new();
        Build {
            id,
            pipeline_run_id: id.0,
            project,
            branch,
            git_ref,
            commit,
            trigger,
            status: BuildStatus::Queued,
            exit_code: None,
            queued_at: now,
            start_time: None,
            end_time: None,
            scripts_commit: None,
            executor: None,
            sandbox: None,
            message: None,
            delivery: None,
            rerun_of: None,
            fencing_token: None,
            token_sha256: None,
            reported: None,
            from_fork: false,
            phases: Vec::new(),
            stage: None,
        }
    }

    /// The key this build locks while it runs: its branch's
    /// (`team/project/branch`); for a stage of a pipeline, the stage's on
    /// that branch (`team/project/branch:stage`), or the lock the stage
    /// shares across branches (`team/project/:lock`). `:` is in no branch
    /// name, so none of these is another branch's key.
    pub fn lock_key(&self) -> LockKey {
        self.project.lock_key(&self.queue_branch())
    }

    /// What stands for the branch in the build's lock key and deferral
    /// queue entry (see [`Build::lock_key`]).
    pub fn queue_branch(&self) -> String {
        match &self.stage {
            None => self.branch.clone(),
            Some(s) => match &s.lock {
                Some(lock) => format!(":{lock}"),
                None => format!("{}:{}", self.branch, s.name),
            },
        }
    }

    /// The stage's name (`build` for a project without `pipeline.json`).
    pub fn stage_name(&self) -> &str {
        self.stage
            .as_ref()
            .map_or(crate::pipeline::DEFAULT_STAGE, |s| s.name.as_str())
    }

    /// The attempt number of its stage (1-based).
    pub fn attempt(&self) -> u32 {
        self.stage.as_ref().map_or(1, |s| s.attempt)
    }

    /// Moves the build to `next`, refusing what the state machine forbids.
    pub fn transition(&mut self, next: BuildStatus, now: OffsetDateTime) -> Result<()> {
        if !self.status.can_become(next) {
            return Err(Error::Conflict(format!(
                "build {} is {} and cannot become {}",
                self.id, self.status, next
            )));
        }
        self.status = next;
        if next == BuildStatus::Running {
            self.start_time = Some(now);
        }
        if next.is_final() {
            self.end_time = Some(now);
        }
        Ok(())
    }

    /// How long it ran, once finished.
    pub fn duration_ms(&self) -> Option<i64> {
        match (self.start_time, self.end_time) {
            (Some(s), Some(e)) => Some((e - s).whole_milliseconds() as i64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::GitRef;

    fn build() -> Build {
        Build::new(
            ProjectKey::new("acme", "widgets").expect("valid"),
            &GitRef::branch("main").expect("valid"),
            Some("abc".into()),
            Trigger::Manual,
            OffsetDateTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn the_state_machine_allows_only_forward_moves() {
        let mut b = build();
        b.transition(BuildStatus::Deferred, OffsetDateTime::UNIX_EPOCH)
            .expect("ok");
        b.transition(BuildStatus::Queued, OffsetDateTime::UNIX_EPOCH)
            .expect("ok");
        b.transition(BuildStatus::Running, OffsetDateTime::UNIX_EPOCH)
            .expect("ok");
        assert!(b.start_time.is_some());
        assert!(
            b.transition(BuildStatus::Queued, OffsetDateTime::UNIX_EPOCH)
                .is_err()
        );
        b.transition(BuildStatus::Succeeded, OffsetDateTime::UNIX_EPOCH)
            .expect("ok");
        for next in BuildStatus::ALL {
            assert!(!b.status.can_become(next), "final states never change");
        }
        assert_eq!(b.duration_ms(), Some(0));
    }

    #[test]
    fn statuses_round_trip_through_text() {
        for st in BuildStatus::ALL {
            assert_eq!(st.as_str().parse::<BuildStatus>().expect("parses"), st);
            assert_eq!(
                serde_json::to_string(&st).expect("json"),
                format!("\"{st}\"")
            );
        }
        assert!("done".parse::<BuildStatus>().is_err());
    }

    #[test]
    fn a_new_build_is_its_own_pipeline_run() {
        let b = build();
        assert_eq!(b.pipeline_run_id, b.id.0);
        assert_eq!(b.lock_key().as_str(), "acme/widgets/main");
    }
}
