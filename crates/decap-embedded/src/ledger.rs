//! The commit statuses told to the repository host, in SQLite.

use async_trait::async_trait;
use decap_core::Result;
use decap_core::ports::{CommitState, StatusLedger};
use rusqlite::OptionalExtension;

use crate::db::{SqliteDb, exec, query_row};

/// [`StatusLedger`] on [`SqliteDb`].
#[derive(Clone)]
pub struct SqliteStatusLedger {
    db: SqliteDb,
}

impl SqliteStatusLedger {
    /// A ledger on `db`.
    pub fn new(db: SqliteDb) -> Self {
        SqliteStatusLedger { db }
    }
}

fn parse(s: &str) -> Option<CommitState> {
    [
        CommitState::Pending,
        CommitState::Success,
        CommitState::Failure,
        CommitState::Error,
    ]
    .into_iter()
    .find(|c| c.as_str() == s)
}

#[async_trait]
impl StatusLedger for SqliteStatusLedger {
    async fn reported(&self, key: &str) -> Result<Option<CommitState>> {
        let key = key.to_owned();
        let state: Option<String> = self
            .db
            .read(move |c| {
                query_row(
                    c,
                    "SELECT state FROM status_ledger WHERE key = ?1",
                    [&key],
                    |r| r.get(0),
                )
                .optional()
            })
            .await?;
        Ok(state.as_deref().and_then(parse))
    }

    async fn record(&self, key: &str, state: CommitState) -> Result<()> {
        let key = key.to_owned();
        self.db
            .write(move |c| {
                exec(
                    c,
                    "INSERT INTO status_ledger (key, state) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET state = excluded.state",
                    rusqlite::params![key, state.as_str()],
                )
                .map(|_| ())
            })
            .await
    }

    async fn comment(&self, key: &str) -> Result<Option<u64>> {
        let key = key.to_owned();
        let id: Option<i64> = self
            .db
            .read(move |c| {
                query_row(
                    c,
                    "SELECT comment_id FROM comment_ledger WHERE key = ?1",
                    [&key],
                    |r| r.get(0),
                )
                .optional()
            })
            .await?;
        Ok(id.and_then(|i| u64::try_from(i).ok()))
    }

    async fn record_comment(&self, key: &str, id: u64) -> Result<()> {
        let key = key.to_owned();
        let id = i64::try_from(id).map_err(|_| {
            decap_core::Error::invalid("comment id", format!("{id} is out of range"))
        })?;
        self.db
            .write(move |c| {
                exec(
                    c,
                    "INSERT INTO comment_ledger (key, comment_id) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET comment_id = excluded.comment_id",
                    rusqlite::params![key, id],
                )
                .map(|_| ())
            })
            .await
    }
}
