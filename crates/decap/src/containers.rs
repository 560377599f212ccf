//! The container executor: one container per build on Podman or Docker,
//! its sidecars beside it. It needs the `containers` feature (on by
//! default); a `decap` built without it refuses `--executor container` with
//! a message that says why.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use decap_core::ports::Executor;
use decap_server::ExecutorEventsChannel;

use crate::ServeArgs;

/// Why `--executor container` is refused by a build without it.
pub(crate) const LEFT_OUT: &str = "this decap was built without the container executor (the \
     cargo feature `containers`): build it with its default features, or with `--features containers`";

pub(crate) use imp::executor;

#[cfg(feature = "containers")]
mod imp {
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::Context;

    use super::*;
    use crate::{bctool_command, default_limits};

    /// The executor, on `--container-socket` or the engine found.
    pub(crate) async fn executor(
        args: &ServeArgs,
        data_dir: &Path,
        build_socket: &Path,
        events: Arc<ExecutorEventsChannel>,
    ) -> Result<Arc<dyn Executor>> {
        let engine = match &args.container.container_socket {
            Some(p) => p.clone(),
            None => decap_container::find_engine().map_err(anyhow::Error::msg)?,
        };
        let bctool = bctool_command(args.bctool.clone())?
            .into_iter()
            .next()
            .map(PathBuf::from)
            .context("no bctool binary")?;
        let executor = decap_container::ContainerExecutor::new(
            decap_container::ContainerExecutorConfig {
                engine,
                instance: decap_embedded::sandbox::instance(data_dir),
                build_socket: build_socket.to_owned(),
                bctool,
                url_port: 9090,
                kill_grace: Duration::from_secs(args.kill_grace_secs.max(1)),
                defaults: default_limits(args)?,
                keep_failed: Duration::from_secs(args.container.keep_failed_containers_secs),
                network: args.container.container_network.clone(),
            },
            events,
        )
        .await?;
        tracing::info!(executor = %executor.describe(), "container executor ready");
        Ok(Arc::new(executor))
    }
}

#[cfg(not(feature = "containers"))]
mod imp {
    use super::*;

    /// Refused: this build has no container executor.
    pub(crate) async fn executor(
        _: &ServeArgs,
        _: &Path,
        _: &Path,
        _: Arc<ExecutorEventsChannel>,
    ) -> Result<Arc<dyn Executor>> {
        anyhow::bail!("{LEFT_OUT}")
    }
}
