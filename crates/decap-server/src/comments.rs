//! Results on pull requests: when a build of a pull request's head
//! (`refs/pull/N/head`) finishes, its pull request gets a comment with a
//! short summary, the failing log's tail and links to the log and the
//! artifacts. There is one comment per pull request and project, edited in
//! place by later builds rather than posted again; which comment that is,
//! and which builds it told, the [`StatusLedger`] remembers across
//! restarts.

use std::io::Read;
use std::sync::Arc;

use decap_core::build::{Build, BuildStatus};
use decap_core::ports::{
    BlobKind, CommitState, PullRequestComment, PullRequestComments, StatusLedger,
};
use futures::StreamExt;

use crate::controller::Controller;

/// Lines of a failing build's log quoted in its comment.
const TAIL_LINES: usize = 30;
/// The most of a log read for its tail (compressed bytes).
const TAIL_READ_LIMIT: usize = 8 << 20;

/// Comments on pull requests as their builds finish.
pub struct PrCommenter {
    controller: Arc<Controller>,
    comments: Arc<dyn PullRequestComments>,
    ledger: Arc<dyn StatusLedger>,
}

/// The pull request a ref builds: `refs/pull/N/head` → N.
pub fn pull_request_number(git_ref: &str) -> Option<u64> {
    git_ref
        .strip_prefix("refs/pull/")?
        .strip_suffix("/head")?
        .parse()
        .ok()
}

/// The last `n` lines of a gzipped log, at most 4,000 characters.
fn tail(gz: &[u8], n: usize) -> String {
    let mut text = String::new();
    let _ = flate2::read::MultiGzDecoder::new(gz).read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut out = lines[from..].join("\n");
    if out.chars().count() > 4000 {
        out = out
            .chars()
            .rev()
            .take(4000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
    }
    // A fence inside the log must not close ours.
    out.replace("```", "ʼʼʼ")
}

impl PrCommenter {
    /// A commenter; [`PrCommenter::spawn`] starts it.
    pub fn new(
        controller: Arc<Controller>,
        comments: Arc<dyn PullRequestComments>,
        ledger: Arc<dyn StatusLedger>,
    ) -> Arc<Self> {
        Arc::new(PrCommenter {
            controller,
            comments,
            ledger,
        })
    }

    /// Catches up with recent builds, then follows every change.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        crate::statuses::follow_builds(self.controller.clone(), "comments", move |b| {
            let me = me.clone();
            async move { me.comment_logged(&b).await }
        })
    }

    async fn comment_logged(&self, b: &Build) {
        if let Err(e) = self.comment(b).await {
            tracing::warn!(build_id = %b.id, error = %e, "cannot comment on the pull request");
        }
    }

    /// The comment of a finished pull-request build, once per build.
    async fn comment(&self, b: &Build) -> decap_core::Result<()> {
        let Some(number) = pull_request_number(&b.git_ref) else {
            return Ok(());
        };
        if !b.status.is_final() || b.status == BuildStatus::Cancelled {
            return Ok(());
        }
        let told = format!("pr-comment-build:{}", b.id);
        if self.ledger.reported(&told).await?.is_some() {
            return Ok(());
        }
        let (owner, repo) = (b.project.team.clone(), b.project.project.clone());
        let key = format!("{owner}/{repo}#{number}:{}", b.project);
        let body = self.body(b).await;
        let previous = self.ledger.comment(&key).await?;
        let comment = PullRequestComment {
            owner,
            repo,
            number,
            body,
        };
        let id = self.comments.upsert(&comment, previous).await?;
        if previous != Some(id) {
            self.ledger.record_comment(&key, id).await?;
        }
        self.ledger.record(&told, CommitState::of(b.status)).await?;
        tracing::info!(build_id = %b.id, pull_request = number, comment = id, "pull request told");
        Ok(())
    }

    async fn body(&self, b: &Build) -> String {
        let base = self.controller.config.public_url.trim_end_matches('/');
        let (mark, word) = match b.status {
            BuildStatus::Succeeded => ("✅", "succeeded"),
            BuildStatus::Failed => ("❌", "failed"),
            BuildStatus::TimedOut => ("⏱️", "ran out of time"),
            BuildStatus::Errored => ("⚠️", "errored"),
            _ => ("•", b.status.as_str()),
        };
        let took = b
            .duration_ms()
            .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
            .unwrap_or_default();
        let commit = b
            .commit
            .as_deref()
            .map(|c| format!(" at `{}`", c.chars().take(10).collect::<String>()))
            .unwrap_or_default();
        let mut out = format!(
            "<!-- decap:{project} -->\n### {mark} Decap: {project} {word}{took}\n\n\
             Build [{id}]({base}/builds/{id}){commit}",
            project = b.project,
            id = b.id,
        );
        if let Some(code) = b.exit_code {
            out.push_str(&format!(", exit code {code}"));
        }
        out.push_str(".\n\n");
        if let Some(m) = &b.message {
            out.push_str(&format!("> {}\n\n", m.replace('\n', " ")));
        }
        out.push_str(&format!(
            "[Console log]({base}/api/v1/logs/{id}) · [Artifacts]({base}/api/v1/artifacts/{id})\n",
            id = b.id
        ));
        if matches!(
            b.status,
            BuildStatus::Failed | BuildStatus::TimedOut | BuildStatus::Errored
        ) && let Some(t) = self.log_tail(b).await
            && !t.trim().is_empty()
        {
            out.push_str(&format!(
                "\n<details open><summary>The last lines of the log</summary>\n\n```\n{t}\n```\n</details>\n"
            ));
        }
        out
    }

    async fn log_tail(&self, b: &Build) -> Option<String> {
        let (_, mut stream) = self
            .controller
            .ports
            .blobs
            .get(b.id, BlobKind::LogGz)
            .await
            .ok()??;
        let mut gz = Vec::new();
        while let Some(chunk) = stream.next().await {
            gz.extend_from_slice(&chunk.ok()?);
            if gz.len() > TAIL_READ_LIMIT {
                break;
            }
        }
        Some(tail(&gz, TAIL_LINES))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pull_request_refs_name_their_number() {
        assert_eq!(pull_request_number("refs/pull/2/head"), Some(2));
        assert_eq!(pull_request_number("refs/heads/main"), None);
        assert_eq!(pull_request_number("refs/pull/x/head"), None);
        assert_eq!(pull_request_number("refs/pull/2/merge"), None);
    }

    #[test]
    fn the_tail_is_the_last_lines_and_cannot_close_the_fence() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..100 {
            writeln!(gz, "line {i}").unwrap();
        }
        writeln!(gz, "```").unwrap();
        let bytes = gz.finish().unwrap();
        let t = tail(&bytes, 3);
        assert_eq!(t, "line 98\nline 99\nʼʼʼ");
    }
}
