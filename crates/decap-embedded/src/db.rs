//! One SQLite database with a group-committing writer thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use decap_core::{Error, Result};
use rusqlite::Connection;

type Finisher = Box<dyn FnOnce(Option<&str>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Finisher + Send>;

/// How many writers' jobs one transaction may carry.
const MAX_GROUP: usize = 512;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    branch TEXT NOT NULL,
    status TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_by_project ON builds (team, project, id);
CREATE INDEX IF NOT EXISTS builds_by_status ON builds (status, id);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    builds TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    token INTEGER NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fencing (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT OR IGNORE INTO fencing (id, last) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS deferred (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id TEXT NOT NULL UNIQUE,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    branch TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    deferred_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    UNIQUE (team, project, branch, commit_sha)
);
CREATE TABLE IF NOT EXISTS pipeline_runs (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pipeline_runs_by_project ON pipeline_runs (team, project, id);
CREATE INDEX IF NOT EXISTS pipeline_runs_by_time ON pipeline_runs (created_at);
CREATE TABLE IF NOT EXISTS stage_claims (
    run_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, stage, attempt)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS status_ledger (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS comment_ledger (
    key TEXT PRIMARY KEY,
    comment_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS hub_builds (
    project TEXT NOT NULL,
    repository TEXT NOT NULL,
    revision TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    status_url TEXT,
    revision_seen_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (project, revision, name)
);
CREATE INDEX IF NOT EXISTS hub_builds_by_seen ON hub_builds (project, revision_seen_at);
CREATE TABLE IF NOT EXISTS hub_locks (
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    revision TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (project, name)
);
CREATE TABLE IF NOT EXISTS secrets (
    team TEXT NOT NULL,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (team, project, name)
);
"#;

/// A SQLite database shared by the embedded stores.
///
/// Writes go to one thread, which takes every job waiting, runs each in its
/// own savepoint (so one failing job does not undo the others) inside one
/// transaction, commits with a full sync, and only then answers each writer.
/// Reads use a small pool of connections and never wait for the writer (WAL).
#[derive(Clone)]
pub struct SqliteDb {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<mpsc::Sender<Job>>,
    readers: Mutex<Vec<Connection>>,
}

fn sql_err(e: rusqlite::Error) -> Error {
    Error::backend("sqlite", e)
}

/// The schema's version, kept in `PRAGMA user_version`. A database of an
/// earlier version is brought up to this one when opened; 0 is the schema
/// of the releases before versions were kept (0.0.0), which this one
/// extends only with tables and indexes created if missing (the records
/// are JSON whose new fields have defaults).
pub const SCHEMA_VERSION: i64 = 1;

/// Each step from version `n` to `n + 1`, applied in one transaction with
/// the version bump.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: nothing to change; the version starts being kept.
    "",
];

/// Creates what is missing and migrates an older schema; refuses a newer one
/// (written by a later Decap, which this one could damage).
fn migrate(conn: &Connection, path: &Path) -> Result<()> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err)?;
    if found > SCHEMA_VERSION {
        return Err(Error::backend(
            "sqlite",
            format!(
                "{} was written by a newer Decap (schema {found}; this one knows up to {SCHEMA_VERSION}): run that Decap, or a newer one",
                path.display()
            ),
        ));
    }
    conn.execute_batch(SCHEMA).map_err(sql_err)?;
    for (from, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let to = from as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {step}; PRAGMA user_version = {to}; COMMIT;"
        ))
        .map_err(|e| {
            Error::backend(
                "sqlite",
                format!(
                    "migrating {} from schema {from} to {to}: {e}",
                    path.display()
                ),
            )
        })?;
        tracing::info!(from, to, db = %path.display(), "database schema migrated");
    }
    Ok(())
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

impl SqliteDb {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::backend("sqlite", format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let conn = open_connection(path).map_err(|e| {
            Error::backend("sqlite", format!("cannot open {}: {e}", path.display()))
        })?;
        migrate(&conn, path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("decap-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| Error::backend("sqlite", e))?;
        Ok(SqliteDb {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(tx),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `f` in the writer's transaction; returns once it is committed.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |conn: &Connection| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit_error: Option<&str>| {
                let answer = match (commit_error, result) {
                    (Some(e), _) => Err(Error::backend("sqlite", format!("commit failed: {e}"))),
                    (None, r) => r.map_err(sql_err),
                };
                let _ = tx.send(answer);
            })
        });
        {
            let sender = self
                .inner
                .writer
                .lock()
                .map_err(|_| Error::backend("sqlite", "writer lock poisoned"))?;
            sender
                .send(job)
                .map_err(|_| Error::backend("sqlite", "the writer thread has stopped"))?;
        }
        rx.await
            .map_err(|_| Error::backend("sqlite", "the writer thread dropped a job"))?
    }

    /// Runs `f` on a reader connection, off the async runtime.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().ok().and_then(|mut pool| pool.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&inner.path).map_err(sql_err)?,
            };
            let result = f(&conn).map_err(sql_err);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < 8
            {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| Error::backend("sqlite", e))?
    }

    /// Reads a setting.
    pub async fn setting(&self, key: &'static str) -> Result<Option<String>> {
        self.read(move |c| {
            use rusqlite::OptionalExtension;
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
        })
        .await
    }

    /// Writes a setting.
    pub async fn set_setting(&self, key: &'static str, value: String) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                rusqlite::params![key, value],
            )
            .map(|_| ())
        })
        .await
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    match f(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            tracing::error!(error = %msg, "sqlite: cannot begin a transaction");
            for job in jobs {
                // Run nothing; answer every writer with the failure.
                let finisher = job_failed(job, &conn);
                finisher(Some(&msg));
            }
            continue;
        }
        let finishers: Vec<Finisher> = jobs.into_iter().map(|job| job(&conn)).collect();
        let commit = conn.execute_batch("COMMIT");
        let error = commit.as_ref().err().map(|e| e.to_string());
        if let Some(e) = &error {
            tracing::error!(error = %e, "sqlite: commit failed");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for finish in finishers {
            finish(error.as_deref());
        }
    }
}

/// Answers a job that could not run because its transaction did not start.
/// The job still has to be consumed to reach its reply channel; it runs
/// against the connection outside a transaction only to build its finisher,
/// and its result is discarded in favour of the error.
fn job_failed(job: Job, conn: &Connection) -> Finisher {
    // Without a transaction, the savepoint the job opens is its own
    // transaction; roll it back by failing the job's finisher with the error.
    let _ = conn.execute_batch("BEGIN");
    let finisher = job(conn);
    let _ = conn.execute_batch("ROLLBACK");
    finisher
}

/// `Connection::execute` through the statement cache.
pub(crate) fn exec<P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    params: P,
) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(params)
}

/// `Connection::query_row` through the statement cache.
pub(crate) fn query_row<T, P, F>(c: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
{
    c.prepare_cached(sql)?.query_row(params, f)
}
