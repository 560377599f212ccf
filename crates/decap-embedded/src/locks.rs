//! Locks per `team/project/branch` in SQLite.

use std::time::Duration;

use async_trait::async_trait;
use decap_core::Result;
use decap_core::build::BuildId;
use decap_core::names::LockKey;
use decap_core::ports::{Lock, LockStore};
use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::db::{SqliteDb, exec, query_row};
use crate::{from_nanos, nanos};

/// [`LockStore`] on [`SqliteDb`]. Acquisition is a read-check-write inside the
/// single writer's transaction, so it is atomic; fencing tokens come from one
/// counter row.
#[derive(Clone)]
pub struct SqliteLockStore {
    db: SqliteDb,
}

impl SqliteLockStore {
    /// A store on `db`.
    pub fn new(db: SqliteDb) -> Self {
        SqliteLockStore { db }
    }
}

fn row_to_lock(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lock> {
    let owner: String = r.get(1)?;
    let owner = BuildId::parse(&owner).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Lock {
        key: LockKey(r.get(0)?),
        owner,
        fencing_token: r.get::<_, i64>(2)? as u64,
        acquired_at: from_nanos(r.get(3)?),
        expires_at: from_nanos(r.get(4)?),
    })
}

fn current(c: &Connection, key: &str) -> rusqlite::Result<Option<Lock>> {
    query_row(
        c,
        "SELECT key, owner, token, acquired_at, expires_at FROM locks WHERE key = ?1",
        [key],
        row_to_lock,
    )
    .optional()
}

fn expiry(now: OffsetDateTime, ttl: Duration) -> OffsetDateTime {
    now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(365))
}

#[async_trait]
impl LockStore for SqliteLockStore {
    async fn acquire(
        &self,
        key: &LockKey,
        owner: BuildId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Result<Lock, Lock>> {
        let key = key.clone();
        self.db
            .write(move |c| {
                if let Some(held) = current(c, key.as_str())? {
                    if held.owner == owner {
                        return Ok(Ok(held));
                    }
                    if held.expires_at > now {
                        return Ok(Err(held));
                    }
                }
                let token: i64 = query_row(
                    c,
                    "UPDATE fencing SET last = last + 1 WHERE id = 1 RETURNING last",
                    [],
                    |r| r.get(0),
                )?;
                let lock = Lock {
                    key: key.clone(),
                    owner,
                    fencing_token: token as u64,
                    acquired_at: now,
                    expires_at: expiry(now, ttl),
                };
                exec(
                    c,
                    "INSERT INTO locks (key, owner, token, acquired_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, token = excluded.token,
                       acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                    params![
                        lock.key.as_str(),
                        owner.to_string(),
                        token,
                        nanos(lock.acquired_at),
                        nanos(lock.expires_at)
                    ],
                )?;
                Ok(Ok(lock))
            })
            .await
    }

    async fn release(&self, key: &LockKey, owner: BuildId) -> Result<bool> {
        let key = key.clone();
        self.db
            .write(move |c| {
                let n = exec(
                    c,
                    "DELETE FROM locks WHERE key = ?1 AND owner = ?2",
                    params![key.as_str(), owner.to_string()],
                )?;
                Ok(n == 1)
            })
            .await
    }

    async fn renew(
        &self,
        key: &LockKey,
        owner: BuildId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let key = key.clone();
        self.db
            .write(move |c| {
                let n = exec(
                    c,
                    "UPDATE locks SET expires_at = ?1 WHERE key = ?2 AND owner = ?3",
                    params![nanos(expiry(now, ttl)), key.as_str(), owner.to_string()],
                )?;
                Ok(n == 1)
            })
            .await
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<Lock>> {
        let key = key.clone();
        self.db
            .write(move |c| {
                let held = current(c, key.as_str())?;
                exec(c, "DELETE FROM locks WHERE key = ?1", [key.as_str()])?;
                Ok(held)
            })
            .await
    }

    async fn list(&self) -> Result<Vec<Lock>> {
        self.db
            .read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT key, owner, token, acquired_at, expires_at FROM locks ORDER BY key",
                )?;
                let rows = stmt.query_map([], row_to_lock)?;
                rows.collect()
            })
            .await
    }
}
