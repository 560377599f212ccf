//! Commit statuses back on the repository host: pending when a build is
//! accepted, then success, failure or error, with the build page as target,
//! one context per project (`decap/team/project`), or per stage of a
//! project's pipeline (`decap/team/project/stage`), and an aggregate
//! (`decap/all`) that is green only when every project's (and stage's)
//! latest build of the commit is and no pipeline run of it is still
//! under way.
//!
//! The reporter follows the controller's build broadcast in the background
//! (no call to GitHub is on a webhook's answer path) and keeps what it told
//! in a [`StatusLedger`], so that each state is told once per commit and
//! context, also across restarts: it records a state after GitHub took it,
//! so a crash in between tells it again rather than never. At start-up it
//! catches up with the recent builds.

use std::sync::Arc;

use decap_core::Result;
use decap_core::build::{Build, BuildStatus};
use decap_core::ports::{BuildQuery, CommitState, CommitStatus, CommitStatuses, StatusLedger};
use tokio::sync::broadcast::error::RecvError;

use crate::controller::Controller;

/// Hands every build change to `handle`, in the background: first the
/// recent builds (oldest first, so that a commit's changes go in order),
/// then each change as the controller broadcasts it, catching up again when
/// it fell behind. `what` names the follower in the logs.
pub fn follow_builds<F, Fut>(
    controller: Arc<Controller>,
    what: &'static str,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Build) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    // Subscribe before catching up, so that nothing falls in between.
    let mut rx = controller.subscribe();
    tokio::spawn(async move {
        let catch_up = || async {
            match controller
                .ports
                .builds
                .list(&BuildQuery {
                    limit: 200,
                    ..BuildQuery::default()
                })
                .await
            {
                Ok(page) => {
                    for b in page.builds.into_iter().rev() {
                        handle(b).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, what, "cannot read recent builds"),
            }
        };
        catch_up().await;
        loop {
            match rx.recv().await {
                Ok(b) => handle(b).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, what, "fell behind the builds; catching up");
                    catch_up().await;
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}

/// The aggregate context.
pub const ALL_CONTEXT: &str = "decap/all";

/// Tells the repository host how builds went.
pub struct StatusReporter {
    controller: Arc<Controller>,
    statuses: Arc<dyn CommitStatuses>,
    ledger: Arc<dyn StatusLedger>,
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The status context of a build: its project's, or its stage's.
fn context_of(b: &Build) -> String {
    match &b.stage {
        Some(s) => format!("decap/{}/{}", b.project, s.name),
        None => format!("decap/{}", b.project),
    }
}

fn describe(b: &Build) -> String {
    let took = b
        .duration_ms()
        .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
        .unwrap_or_default();
    let text = match b.status {
        BuildStatus::Queued => "queued".to_owned(),
        BuildStatus::Deferred => format!(
            "waiting: {}",
            b.message.as_deref().unwrap_or("for room to run")
        ),
        BuildStatus::Running => "running".to_owned(),
        BuildStatus::Succeeded => format!("succeeded{took}"),
        BuildStatus::Failed => format!(
            "failed (exit {}){took}",
            b.exit_code.map(|c| c.to_string()).unwrap_or_default()
        ),
        BuildStatus::TimedOut => format!("ran out of time{took}"),
        BuildStatus::Cancelled => "cancelled".to_owned(),
        BuildStatus::Errored => format!(
            "errored: {}",
            b.message
                .as_deref()
                .unwrap_or("the build environment failed")
        ),
    };
    text.chars().take(140).collect()
}

impl StatusReporter {
    /// A reporter; [`StatusReporter::spawn`] starts it.
    pub fn new(
        controller: Arc<Controller>,
        statuses: Arc<dyn CommitStatuses>,
        ledger: Arc<dyn StatusLedger>,
    ) -> Arc<Self> {
        Arc::new(StatusReporter {
            controller,
            statuses,
            ledger,
        })
    }

    /// Catches up with recent builds, then follows every change.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        follow_builds(self.controller.clone(), "statuses", move |b| {
            let me = me.clone();
            async move { me.report_logged(&b).await }
        })
    }

    async fn report_logged(&self, b: &Build) {
        if let Err(e) = self.report(b).await {
            tracing::warn!(build_id = %b.id, error = %e, "cannot set the commit status");
        }
    }

    /// Tells the host the build's state, and the commit's aggregate.
    pub async fn report(&self, b: &Build) -> Result<()> {
        let Some(sha) = b.commit.as_deref().filter(|c| is_sha(c)) else {
            return Ok(()); // nothing to hang a status on
        };
        let target_url = format!(
            "{}/builds/{}",
            self.controller.config.public_url.trim_end_matches('/'),
            b.id
        );
        let own = CommitStatus {
            owner: b.project.team.clone(),
            repo: b.project.project.clone(),
            sha: sha.to_owned(),
            context: context_of(b),
            state: CommitState::of(b.status),
            target_url: target_url.clone(),
            description: describe(b),
        };
        self.tell_once(&own).await?;
        let (state, description) = self.aggregate(b, sha).await?;
        self.tell_once(&CommitStatus {
            context: ALL_CONTEXT.to_owned(),
            state,
            description,
            ..own
        })
        .await
    }

    /// The commit's state over the latest build of each project of the
    /// repository: pending while any is, failure if any failed or errored,
    /// success when all succeeded.
    async fn aggregate(&self, b: &Build, sha: &str) -> Result<(CommitState, String)> {
        let builds = self
            .controller
            .ports
            .builds
            .list(&BuildQuery {
                project: Some(b.project.clone()),
                limit: 100,
                ..BuildQuery::default()
            })
            .await?;
        // The build as this event saw it (the store may be ahead of a
        // reporter that waited out a rate limit: each state is told in
        // order), then, newest first, the latest build of each other
        // project with this commit.
        let mut latest: Vec<&Build> = vec![b];
        for candidate in builds
            .builds
            .iter()
            .filter(|c| c.commit.as_deref() == Some(sha))
        {
            if !latest
                .iter()
                .any(|l| context_of(l) == context_of(candidate))
            {
                latest.push(candidate);
            }
        }
        let mut states: Vec<CommitState> =
            latest.iter().map(|l| CommitState::of(l.status)).collect();
        // A stage that ended while later ones are still to start leaves
        // the commit pending, not green.
        if b.stage.is_some()
            && b.status.is_final()
            && let Ok(run) = self.controller.pipeline_run(b.pipeline_run_id).await
            && run.plan.status == "running"
        {
            states.push(CommitState::Pending);
        }
        let total = latest.len();
        let green = states
            .iter()
            .filter(|s| **s == CommitState::Success)
            .count();
        let state = if states.contains(&CommitState::Pending) {
            CommitState::Pending
        } else if green == total {
            CommitState::Success
        } else {
            CommitState::Failure
        };
        Ok((state, format!("{green} of {total} Decap builds succeeded")))
    }

    async fn tell_once(&self, s: &CommitStatus) -> Result<()> {
        let key = s.ledger_key();
        if self.ledger.reported(&key).await? == Some(s.state) {
            return Ok(());
        }
        self.statuses.set(s).await?;
        self.ledger.record(&key, s.state).await
    }
}
