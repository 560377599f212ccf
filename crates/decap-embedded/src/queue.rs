//! The deferral queue in SQLite.

use async_trait::async_trait;
use decap_core::Result;
use decap_core::build::BuildId;
use decap_core::names::ProjectKey;
use decap_core::ports::{DeferralQueue, DeferredEntry, PushOutcome, Received};
use rusqlite::{OptionalExtension, params};

use crate::db::{SqliteDb, exec, query_row};
use crate::{from_nanos, nanos};

/// [`DeferralQueue`] on [`SqliteDb`]: FIFO by an autoincrement sequence; a
/// unique index on team/project/branch/commit keeps a commit from waiting twice.
#[derive(Clone)]
pub struct SqliteDeferralQueue {
    db: SqliteDb,
}

impl SqliteDeferralQueue {
    /// A queue on `db`.
    pub fn new(db: SqliteDb) -> Self {
        SqliteDeferralQueue { db }
    }
}

fn conversion(e: decap_core::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

#[async_trait]
impl DeferralQueue for SqliteDeferralQueue {
    async fn push(&self, entry: &DeferredEntry) -> Result<PushOutcome> {
        let e = entry.clone();
        self.db
            .write(move |c| {
                let commit = e.commit.clone().unwrap_or_default();
                let waiting: Option<String> = query_row(c,
                        "SELECT build_id FROM deferred
                         WHERE team = ?1 AND project = ?2 AND branch = ?3 AND commit_sha = ?4",
                        params![e.project.team, e.project.project, e.branch, commit],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(id) = waiting {
                    let id = BuildId::parse(&id).map_err(conversion)?;
                    return Ok(PushOutcome::AlreadyWaiting(id));
                }
                exec(c,
                    "INSERT INTO deferred (build_id, team, project, branch, git_ref, commit_sha, deferred_at, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (build_id) DO UPDATE SET reason = excluded.reason",
                    params![
                        e.build_id.to_string(),
                        e.project.team,
                        e.project.project,
                        e.branch,
                        e.git_ref,
                        commit,
                        nanos(e.deferred_at),
                        e.reason
                    ],
                )?;
                Ok(PushOutcome::Added)
            })
            .await
    }

    async fn list(&self) -> Result<Vec<DeferredEntry>> {
        self.db
            .read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT build_id, team, project, branch, git_ref, commit_sha, deferred_at, reason
                     FROM deferred ORDER BY seq",
                )?;
                let rows = stmt.query_map([], |r| {
                    let id: String = r.get(0)?;
                    let team: String = r.get(1)?;
                    let project: String = r.get(2)?;
                    let commit: String = r.get(5)?;
                    Ok(DeferredEntry {
                        build_id: BuildId::parse(&id).map_err(conversion)?,
                        project: ProjectKey::new(&team, &project).map_err(conversion)?,
                        branch: r.get(3)?,
                        git_ref: r.get(4)?,
                        commit: (!commit.is_empty()).then_some(commit),
                        deferred_at: from_nanos(r.get(6)?),
                        reason: r.get(7)?,
                    })
                })?;
                rows.collect()
            })
            .await
    }

    async fn remove(&self, build_id: BuildId) -> Result<bool> {
        self.db
            .write(move |c| {
                let n = exec(
                    c,
                    "DELETE FROM deferred WHERE build_id = ?1",
                    [build_id.to_string()],
                )?;
                Ok(n == 1)
            })
            .await
    }

    async fn receive_heads(&self, max: usize) -> Result<Vec<Received>> {
        // One process owns this queue, so taking needs no lease: the
        // controller decides about the heads under its scheduling mutex.
        let mut seen = std::collections::HashSet::new();
        let mut heads = Vec::new();
        for entry in self.list().await? {
            if heads.len() >= max {
                break;
            }
            if seen.insert(entry.lock_key()) {
                let receipt = entry.build_id.to_string();
                heads.push(Received { entry, receipt });
            }
        }
        Ok(heads)
    }

    async fn ack(&self, received: &Received) -> Result<()> {
        self.remove(received.entry.build_id).await.map(|_| ())
    }

    async fn release(&self, _received: &Received) -> Result<()> {
        Ok(())
    }

    async fn is_open(&self) -> Result<bool> {
        Ok(self.db.setting("queue_state").await?.as_deref() != Some("closed"))
    }

    async fn set_open(&self, open: bool) -> Result<()> {
        let value = if open { "open" } else { "closed" };
        self.db.set_setting("queue_state", value.to_owned()).await
    }

    async fn set_reason(&self, build_id: BuildId, reason: &str) -> Result<()> {
        let reason = reason.to_owned();
        self.db
            .write(move |c| {
                exec(
                    c,
                    "UPDATE deferred SET reason = ?1 WHERE build_id = ?2",
                    params![reason, build_id.to_string()],
                )
                .map(|_| ())
            })
            .await
    }
}
