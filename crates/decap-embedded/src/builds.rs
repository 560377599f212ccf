//! Build records and webhook deliveries in SQLite.

use async_trait::async_trait;
use decap_core::build::{Build, BuildId, BuildStatus};
use decap_core::ports::{BuildPage, BuildQuery, BuildStore, Delivery, DeliveryOutcome};
use decap_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::{SqliteDb, exec, query_row};
use crate::nanos;

/// The most builds one page returns.
pub const MAX_PAGE: usize = 500;

/// [`BuildStore`] on [`SqliteDb`]. Each build is one row: indexed columns for
/// the queries plus the whole record as JSON.
#[derive(Clone)]
pub struct SqliteBuildStore {
    db: SqliteDb,
}

impl SqliteBuildStore {
    /// A store on `db`.
    pub fn new(db: SqliteDb) -> Self {
        SqliteBuildStore { db }
    }
}

fn to_json(build: &Build) -> rusqlite::Result<String> {
    serde_json::to_string(build).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn from_json(text: &str) -> rusqlite::Result<Build> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn insert_row(c: &Connection, b: &Build) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT INTO builds (id, team, project, branch, status, queued_at, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            b.id.to_string(),
            b.project.team,
            b.project.project,
            b.branch,
            b.status.as_str(),
            nanos(b.queued_at),
            to_json(b)?
        ],
    )?;
    Ok(())
}

#[async_trait]
impl BuildStore for SqliteBuildStore {
    async fn insert(&self, build: &Build) -> Result<()> {
        let b = build.clone();
        let id = b.id;
        let inserted = self
            .db
            .write(move |c| {
                let exists: Option<i64> = query_row(
                    c,
                    "SELECT 1 FROM builds WHERE id = ?1",
                    [b.id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
                if exists.is_some() {
                    return Ok(false);
                }
                insert_row(c, &b)?;
                Ok(true)
            })
            .await?;
        if !inserted {
            return Err(Error::Conflict(format!("build {id} exists already")));
        }
        Ok(())
    }

    async fn insert_delivery(
        &self,
        delivery: &Delivery,
        builds: &[Build],
    ) -> Result<DeliveryOutcome> {
        let d = delivery.clone();
        let builds = builds.to_vec();
        self.db
            .write(move |c| {
                let seen: Option<String> = query_row(
                    c,
                    "SELECT builds FROM deliveries WHERE id = ?1",
                    [&d.id],
                    |r| r.get(0),
                )
                .optional()?;
                if let Some(json) = seen {
                    let ids: Vec<BuildId> = serde_json::from_str(&json).unwrap_or_default();
                    return Ok(DeliveryOutcome::Duplicate(ids));
                }
                let ids: Vec<BuildId> = builds.iter().map(|b| b.id).collect();
                let ids_json = serde_json::to_string(&ids)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                exec(
                    c,
                    "INSERT INTO deliveries (id, event, outcome, received_at, builds)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![d.id, d.event, d.outcome, nanos(d.received_at), ids_json],
                )?;
                for b in &builds {
                    insert_row(c, b)?;
                }
                Ok(DeliveryOutcome::New)
            })
            .await
    }

    async fn get(&self, id: BuildId) -> Result<Option<Build>> {
        self.db
            .read(move |c| {
                let text: Option<String> = query_row(
                    c,
                    "SELECT record FROM builds WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
                text.map(|t| from_json(&t)).transpose()
            })
            .await
    }

    async fn get_many(&self, ids: &[BuildId]) -> Result<Vec<Build>> {
        let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        self.db
            .read(move |c| {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(500) {
                    let marks = vec!["?"; chunk.len()].join(",");
                    let mut stmt =
                        c.prepare(&format!("SELECT record FROM builds WHERE id IN ({marks})"))?;
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

    async fn update(&self, build: &Build, expected: BuildStatus) -> Result<bool> {
        let b = build.clone();
        self.db
            .write(move |c| {
                let n = exec(
                    c,
                    "UPDATE builds SET status = ?1, record = ?2 WHERE id = ?3 AND status = ?4",
                    params![
                        b.status.as_str(),
                        to_json(&b)?,
                        b.id.to_string(),
                        expected.as_str()
                    ],
                )?;
                Ok(n == 1)
            })
            .await
    }

    async fn list(&self, query: &BuildQuery) -> Result<BuildPage> {
        let q = query.clone();
        if q.branch.is_some() && q.project.is_none() {
            return Err(Error::invalid("branch", "a branch filter needs a project"));
        }
        let cursor = match &q.cursor {
            Some(c) => Some(
                BuildId::parse(c)
                    .map_err(|_| Error::invalid("cursor", "not a cursor from this server"))?,
            ),
            None => None,
        };
        let limit = q.limit.clamp(1, MAX_PAGE);
        self.db
            .read(move |c| {
                let mut sql = String::from("SELECT record FROM builds WHERE 1 = 1");
                let mut args: Vec<rusqlite::types::Value> = Vec::new();
                if let Some(p) = &q.project {
                    sql.push_str(" AND team = ? AND project = ?");
                    args.push(p.team.clone().into());
                    args.push(p.project.clone().into());
                }
                if let Some(b) = &q.branch {
                    sql.push_str(" AND branch = ?");
                    args.push(b.clone().into());
                }
                if !q.statuses.is_empty() {
                    sql.push_str(" AND status IN (");
                    for (i, s) in q.statuses.iter().enumerate() {
                        sql.push_str(if i == 0 { "?" } else { ", ?" });
                        args.push(s.as_str().to_owned().into());
                    }
                    sql.push(')');
                }
                if let Some(since) = q.since {
                    sql.push_str(" AND queued_at >= ?");
                    args.push(nanos(since).into());
                }
                if let Some(before) = q.before {
                    sql.push_str(" AND queued_at < ?");
                    args.push(nanos(before).into());
                }
                if let Some(cur) = cursor {
                    sql.push_str(" AND id < ?");
                    args.push(cur.to_string().into());
                }
                sql.push_str(" ORDER BY id DESC LIMIT ?");
                args.push(((limit + 1) as i64).into());
                let mut stmt = c.prepare_cached(&sql)?;
                let rows =
                    stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))?;
                let mut builds = Vec::new();
                for row in rows {
                    builds.push(from_json(&row?)?);
                }
                let next_cursor = if builds.len() > limit {
                    builds.truncate(limit);
                    builds.last().map(|b| b.id.to_string())
                } else {
                    None
                };
                Ok(BuildPage {
                    builds,
                    next_cursor,
                })
            })
            .await
    }

    async fn with_status(&self, statuses: &[BuildStatus]) -> Result<Vec<Build>> {
        let statuses: Vec<&'static str> = statuses.iter().map(|s| s.as_str()).collect();
        self.db
            .read(move |c| {
                let mut out = Vec::new();
                let mut stmt =
                    c.prepare_cached("SELECT record FROM builds WHERE status = ?1 ORDER BY id")?;
                for s in statuses {
                    for row in stmt.query_map([s], |r| r.get::<_, String>(0))? {
                        out.push(from_json(&row?)?);
                    }
                }
                out.sort_by_key(|b: &Build| b.id);
                Ok(out)
            })
            .await
    }

    async fn count_by_status(&self) -> Result<Vec<(BuildStatus, u64)>> {
        self.db
            .read(|c| {
                let mut stmt =
                    c.prepare_cached("SELECT status, COUNT(*) FROM builds GROUP BY status")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                let mut out = Vec::new();
                for row in rows {
                    let (status, n) = row?;
                    if let Ok(st) = status.parse::<BuildStatus>() {
                        out.push((st, n as u64));
                    }
                }
                Ok(out)
            })
            .await
    }
}
