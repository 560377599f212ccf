//! The core's error type, shared by the port traits so that every adapter
//! reports failures in the same vocabulary.

use std::fmt;

/// Errors of the core and of the adapters behind its ports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, ref or value supplied from outside the process is not acceptable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which input was rejected (`team`, `branch`, `cursor`, ...).
        what: &'static str,
        /// Why it was rejected, in words a user can act on.
        reason: String,
    },
    /// The thing asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the current state (e.g. cancelling a finished build).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A backend (database, file system, object store, process) failed.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend failed (`sqlite`, `files`, `executor`, ...).
        backend: &'static str,
        /// The failure, with its cause chain flattened into words.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::Invalid {
            what,
            reason: reason.to_string(),
        }
    }

    /// Shorthand for [`Error::Backend`], flattening the cause into text.
    pub fn backend(backend: &'static str, err: impl fmt::Display) -> Self {
        Error::Backend {
            backend,
            message: err.to_string(),
        }
    }
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
