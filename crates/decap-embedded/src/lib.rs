//! The embedded default: everything Decap needs on one machine, with no
//! configuration.
//!
//! * [`SqliteDb`] is one SQLite database (WAL, `synchronous=FULL`) with a
//!   single writer thread that commits many writers' work in one transaction
//!   (group commit), so that each accepted request is durable when answered
//!   without paying one fsync per request.
//! * [`SqliteBuildStore`], [`SqliteLockStore`] and [`SqliteDeferralQueue`]
//!   implement the core's ports on it; [`SqliteSecretStore`] keeps builds'
//!   secrets there, sealed with a [`SecretKey`] kept in a file apart.
//! * [`FileBlobStore`] keeps logs and artifacts under the data dir.
//! * [`LocalExecutor`] runs each build under bctool as a child process in a
//!   fresh workspace, in the [`sandbox`] (bubblewrap, a user namespace,
//!   slirp4netns, cgroup limits, a workspace of fixed size).
#![deny(missing_docs)]

mod blobs;
mod builds;
mod db;
mod details;
mod executor;
mod hub;
mod ledger;
mod locks;
mod queue;
mod record;
mod runs;
pub mod sandbox;
mod secrets;

pub use blobs::FileBlobStore;
pub use builds::SqliteBuildStore;
pub use db::{SCHEMA_VERSION, SqliteDb};
pub use details::FileDetailStore;
pub use executor::{
    LocalExecutor, LocalExecutorConfig, NetworkMode, SandboxMode, bubblewrap_works,
};
pub use hub::SqliteStatusHub;
pub use ledger::SqliteStatusLedger;
pub use locks::SqliteLockStore;
pub use queue::SqliteDeferralQueue;
pub use runs::SqliteRunStore;
pub use secrets::{SECRET_KEY_LEN, SecretKey, SqliteSecretStore};

pub(crate) fn nanos(t: time::OffsetDateTime) -> i64 {
    // i64 nanoseconds cover the years 1678 to 2262.
    t.unix_timestamp_nanos() as i64
}

pub(crate) fn from_nanos(n: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(n))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
