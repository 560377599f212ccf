//! Decap's functional core.
//!
//! Everything in this crate is a pure decision or a plain data type: it does no
//! IO and knows no SDK (no tokio networking, no kube, no AWS, no axum). The
//! adapters around it (the embedded SQLite/file/process backends, the cloud
//! backends) implement the port traits in [`ports`]; the server wires them
//! together and asks this crate what to do.
//!
//! * [`names`] validates the names that end up in paths, lock keys and labels.
//! * [`refs`] parses git refs and [`descriptor`] parses `project.json` and
//!   matches refs against `managedRefRegex`.
//! * [`build`] holds the build record and its state machine; [`lifecycle`]
//!   decides what each event does to a build (the record written and the
//!   effects around it).
//! * [`schedule`] decides whether a request runs now or is deferred, and which
//!   deferred build runs next.
//! * [`limits`] parses resource quantities and resolves a build's limits.
//! * [`catalog`] is the in-memory view of the build-scripts repo.
//! * [`hub`] derives what the CI status hub shows of other CI servers' builds.
//! * [`secrets`] checks the names and values of builds' secrets and says
//!   whose builds get them.
//! * [`pipeline`] reads `pipeline.json` and derives where a run's stages
//!   stand and which start next.
//! * [`ports`] declares the traits the adapters implement.
#![deny(missing_docs)]

pub mod build;
pub mod catalog;
pub mod descriptor;
pub mod error;
pub mod hub;
pub mod lifecycle;
pub mod limits;
pub mod names;
pub mod pipeline;
pub mod ports;
pub mod preset;
pub mod refs;
pub mod schedule;
pub mod secrets;
pub mod stats;

pub use build::{Build, BuildId, BuildStatus, Trigger};
pub use error::{Error, Result};
pub use names::{LockKey, ProjectKey};
