//! The CI status hub's records in SQLite.

use std::time::Duration;

use async_trait::async_trait;
use decap_core::Result;
use decap_core::hub::{ExternalBuild, Reported};
use decap_core::ports::StatusHub;
use rusqlite::OptionalExtension;
use time::OffsetDateTime;

use crate::db::{SqliteDb, exec, query_row};
use crate::{from_nanos, nanos};

/// [`StatusHub`] on [`SqliteDb`].
#[derive(Clone)]
pub struct SqliteStatusHub {
    db: SqliteDb,
}

impl SqliteStatusHub {
    /// A hub on `db`.
    pub fn new(db: SqliteDb) -> Self {
        SqliteStatusHub { db }
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ExternalBuild> {
    let status: String = r.get(4)?;
    Ok(ExternalBuild {
        project: r.get(0)?,
        repository: r.get(1)?,
        revision: r.get(2)?,
        name: r.get(3)?,
        status: Reported::parse(&status).unwrap_or(Reported::Failed),
        status_url: r.get(5)?,
        revision_seen_at: from_nanos(r.get(6)?),
        updated_at: from_nanos(r.get(7)?),
    })
}

#[async_trait]
impl StatusHub for SqliteStatusHub {
    async fn record(&self, b: &ExternalBuild) -> Result<()> {
        let b = b.clone();
        self.db
            .write(move |c| {
                // The revision keeps the time it was first seen.
                let seen: Option<i64> = query_row(
                    c,
                    "SELECT MIN(revision_seen_at) FROM hub_builds WHERE project = ?1 AND revision = ?2",
                    rusqlite::params![b.project, b.revision],
                    |r| r.get(0),
                )?;
                exec(
                    c,
                    "INSERT INTO hub_builds (project, repository, revision, name, status, status_url, revision_seen_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (project, revision, name) DO UPDATE SET
                       repository = excluded.repository, status = excluded.status,
                       status_url = excluded.status_url, updated_at = excluded.updated_at",
                    rusqlite::params![
                        b.project,
                        b.repository,
                        b.revision,
                        b.name,
                        b.status.as_str(),
                        b.status_url,
                        seen.unwrap_or_else(|| nanos(b.revision_seen_at)),
                        nanos(b.updated_at)
                    ],
                )
                .map(|_| ())
            })
            .await
    }

    async fn latest(&self, project: &str, revisions: usize) -> Result<Vec<ExternalBuild>> {
        let project = project.to_owned();
        let limit = i64::try_from(revisions).unwrap_or(i64::MAX);
        self.db
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT project, repository, revision, name, status, status_url, revision_seen_at, updated_at
                     FROM hub_builds
                     WHERE project = ?1 AND revision IN (
                       SELECT revision FROM hub_builds WHERE project = ?1
                       GROUP BY revision ORDER BY MIN(revision_seen_at) DESC, revision DESC LIMIT ?2)
                     ORDER BY revision_seen_at DESC, revision DESC, name",
                )?;
                let rows = stmt.query_map(rusqlite::params![project, limit], row)?;
                rows.collect()
            })
            .await
    }

    async fn projects(&self) -> Result<Vec<String>> {
        self.db
            .read(|c| {
                let mut stmt =
                    c.prepare_cached("SELECT DISTINCT project FROM hub_builds ORDER BY project")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
    }

    async fn remove_project(&self, project: &str) -> Result<bool> {
        let project = project.to_owned();
        self.db
            .write(move |c| {
                let builds = exec(c, "DELETE FROM hub_builds WHERE project = ?1", [&project])?;
                let locks = exec(c, "DELETE FROM hub_locks WHERE project = ?1", [&project])?;
                Ok(builds + locks > 0)
            })
            .await
    }

    async fn lock(
        &self,
        project: &str,
        name: &str,
        revision: &str,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<String> {
        let (project, name, revision) = (project.to_owned(), name.to_owned(), revision.to_owned());
        let expires = nanos(now + ttl);
        let now = nanos(now);
        self.db
            .write(move |c| {
                // Taken when free, expired, or already this revision's.
                exec(
                    c,
                    "INSERT INTO hub_locks (project, name, revision, expires_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (project, name) DO UPDATE SET
                       revision = excluded.revision, expires_at = excluded.expires_at
                     WHERE hub_locks.expires_at <= ?5 OR hub_locks.revision = excluded.revision",
                    rusqlite::params![project, name, revision, expires, now],
                )?;
                let holder: Option<String> = query_row(
                    c,
                    "SELECT revision FROM hub_locks WHERE project = ?1 AND name = ?2",
                    rusqlite::params![project, name],
                    |r| r.get(0),
                )
                .optional()?;
                Ok(holder.unwrap_or(revision))
            })
            .await
    }

    async fn unlock(&self, project: &str, name: &str, revision: &str) -> Result<bool> {
        let (project, name, revision) = (project.to_owned(), name.to_owned(), revision.to_owned());
        self.db
            .write(move |c| {
                let n = exec(
                    c,
                    "DELETE FROM hub_locks WHERE project = ?1 AND name = ?2 AND revision = ?3",
                    rusqlite::params![project, name, revision],
                )?;
                Ok(n > 0)
            })
            .await
    }
}
