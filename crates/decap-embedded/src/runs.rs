//! Pipeline runs and their stages' claims in SQLite.

use async_trait::async_trait;
use decap_core::Result;
use decap_core::names::ProjectKey;
use decap_core::pipeline::{PipelineRun, StageClaim};
use decap_core::ports::RunStore;
use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::{SqliteDb, exec, query_row};
use crate::nanos;

/// The most runs one page returns.
pub const MAX_PAGE: usize = 500;

/// [`RunStore`] on [`SqliteDb`]: a row per run (its record as JSON) and a
/// row per claimed stage attempt, whose primary key makes a claim win once.
#[derive(Clone)]
pub struct SqliteRunStore {
    db: SqliteDb,
}

impl SqliteRunStore {
    /// A store on `db`.
    pub fn new(db: SqliteDb) -> Self {
        SqliteRunStore { db }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

#[async_trait]
impl RunStore for SqliteRunStore {
    async fn insert(&self, run: &PipelineRun) -> Result<()> {
        let run = run.clone();
        let id = run.id;
        let inserted = self
            .db
            .write(move |c| {
                exec(
                    c,
                    "INSERT OR IGNORE INTO pipeline_runs (id, team, project, created_at, record)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        run.id.to_string(),
                        run.project.team,
                        run.project.project,
                        nanos(run.created_at),
                        to_json(&run)?
                    ],
                )
            })
            .await?;
        if inserted == 0 {
            return Err(decap_core::Error::Conflict(format!(
                "pipeline run {id} exists already"
            )));
        }
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<PipelineRun>> {
        self.db
            .read(move |c| {
                let text: Option<String> = query_row(
                    c,
                    "SELECT record FROM pipeline_runs WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
                text.map(|t| from_json(&t)).transpose()
            })
            .await
    }

    async fn list(
        &self,
        project: &ProjectKey,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<PipelineRun>> {
        let project = project.clone();
        let limit = limit.clamp(1, MAX_PAGE) as i64;
        // Run ids are time-ordered (v7), and their text sorts as they do.
        let before = before.map_or_else(|| "~".to_owned(), |b| b.to_string());
        self.db
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT record FROM pipeline_runs
                     WHERE team = ?1 AND project = ?2 AND id < ?3
                     ORDER BY id DESC LIMIT ?4",
                )?;
                let rows = stmt
                    .query_map(params![project.team, project.project, before, limit], |r| {
                        r.get::<_, String>(0)
                    })?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(from_json(&row?)?);
                }
                Ok(out)
            })
            .await
    }

    async fn since(&self, since: OffsetDateTime) -> Result<Vec<PipelineRun>> {
        self.db
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT record FROM pipeline_runs WHERE created_at >= ?1 ORDER BY id",
                )?;
                let rows = stmt.query_map([nanos(since)], |r| r.get::<_, String>(0))?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(from_json(&row?)?);
                }
                Ok(out)
            })
            .await
    }

    async fn claim(&self, claim: &StageClaim) -> Result<Option<StageClaim>> {
        let claim = claim.clone();
        self.db
            .write(move |c| {
                let n = exec(
                    c,
                    "INSERT OR IGNORE INTO stage_claims (run_id, stage, attempt, record)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        claim.run.to_string(),
                        claim.stage,
                        claim.attempt,
                        to_json(&claim)?
                    ],
                )?;
                if n == 1 {
                    return Ok(None);
                }
                let text: String = query_row(
                    c,
                    "SELECT record FROM stage_claims WHERE run_id = ?1 AND stage = ?2 AND attempt = ?3",
                    params![claim.run.to_string(), claim.stage, claim.attempt],
                    |r| r.get(0),
                )?;
                Ok(Some(from_json(&text)?))
            })
            .await
    }

    async fn claims_of(&self, runs: &[Uuid]) -> Result<Vec<StageClaim>> {
        let runs: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
        self.db
            .read(move |c| {
                let mut out = Vec::new();
                for chunk in runs.chunks(500) {
                    let marks = vec!["?"; chunk.len()].join(",");
                    let mut stmt = c.prepare(&format!(
                        "SELECT record FROM stage_claims WHERE run_id IN ({marks})"
                    ))?;
                    let rows = stmt.query_map(rusqlite::params_from_iter(chunk.iter()), |r| {
                        r.get::<_, String>(0)
                    })?;
                    for row in rows {
                        out.push(from_json(&row?)?);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn claims(&self, run: Uuid) -> Result<Vec<StageClaim>> {
        self.db
            .read(move |c| {
                let mut stmt =
                    c.prepare_cached("SELECT record FROM stage_claims WHERE run_id = ?1")?;
                let rows = stmt.query_map([run.to_string()], |r| r.get::<_, String>(0))?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(from_json(&row?)?);
                }
                Ok(out)
            })
            .await
    }
}
