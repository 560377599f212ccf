//! bctool's direct path: logs, artifacts and the result straight to S3 and
//! DynamoDB, without the server in between (see `decap_aws::direct`). It
//! needs the `aws` feature; a bctool built without it refuses a build that
//! asks for the direct path, with a message that says why, before the
//! script runs.

use std::sync::Arc;

use anyhow::Result;
use decap_core::ports::{BlobStore, BuildStore, LockStore};

/// bctool's stores on the direct path.
pub struct DirectStores {
    /// Logs and artifacts.
    pub blobs: Arc<dyn BlobStore>,
    /// Build records.
    pub builds: Arc<dyn BuildStore>,
    /// Branch locks.
    pub locks: Arc<dyn LockStore>,
}

#[cfg(feature = "aws")]
mod imp {
    use super::*;

    /// The direct path's settings.
    pub type Config = decap_aws::DirectConfig;

    /// Variables that hold bctool's own settings (credentials among them),
    /// which the script must not see.
    pub const VARS: &[&str] = decap_aws::direct::VARS;

    /// The settings from variables (`get` looks one up); `None` unless the
    /// build asks for the direct path.
    pub fn config(get: impl Fn(&str) -> Option<String>) -> Result<Option<Config>> {
        Config::from_vars(get).map_err(anyhow::Error::msg)
    }

    /// The stores, made without a network call.
    pub async fn stores(config: Config) -> DirectStores {
        let s = config.stores().await;
        DirectStores {
            blobs: Arc::new(s.blobs),
            builds: Arc::new(s.builds),
            locks: Arc::new(s.locks),
        }
    }
}

#[cfg(not(feature = "aws"))]
mod imp {
    use super::*;

    /// The variable that asks for the direct path.
    const DIRECT_VAR: &str = "DECAP_BCTOOL_DIRECT";

    /// No settings exist: this bctool has no direct path.
    pub enum Config {}

    /// Nothing to hide from the script: this bctool reads no credentials.
    pub const VARS: &[&str] = &[];

    /// `None`, unless the build asks for the direct path, which this bctool
    /// cannot take.
    pub fn config(get: impl Fn(&str) -> Option<String>) -> Result<Option<Config>> {
        match get(DIRECT_VAR).as_deref() {
            None | Some("" | "0" | "false") => Ok(None),
            Some(_) => anyhow::bail!(
                "the build asks for bctool's direct path to S3 and DynamoDB \
                 ({DIRECT_VAR}), but this bctool was built without it (the \
                 cargo feature `aws`): build Decap with its default features"
            ),
        }
    }

    /// Never called: no [`Config`] exists.
    pub async fn stores(config: Config) -> DirectStores {
        match config {}
    }
}

pub use imp::{Config, VARS, config, stores};
