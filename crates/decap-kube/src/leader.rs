//! Leader election over a `coordination.k8s.io` Lease, so that of several
//! Decap replicas only one launches builds.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder};
use tokio::sync::watch;

/// Which replica leads, as it changes.
pub struct Leadership {
    /// `true` while this replica holds the Lease.
    pub leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Competes for the Lease `name` in `namespace` as `identity` (the pod's
/// name): held for `duration`, renewed `grace` before it expires. Whoever
/// holds it leads; a leader that stops renewing (killed, partitioned) loses
/// it once `duration` has passed.
pub async fn elect(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    duration: Duration,
    grace: Duration,
) -> decap_core::Result<Leadership> {
    let manager = LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration.as_secs().max(2))
        .with_grace(grace.as_secs().max(1))
        .with_create_mode(LeaseCreateMode::AutoCreate)
        .build()
        .await
        .map_err(|e| {
            decap_core::Error::backend(
                "kubernetes",
                format!("cannot use the Lease {namespace}/{name} for leader election: {e}"),
            )
        })?;
    let (rx, handle) = manager.watch().await;
    let identity = identity.to_owned();
    let mut changes = rx.clone();
    let task = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let leading = *changes.borrow();
            tracing::info!(identity = %identity, leading, "leadership changed");
        }
        if let Ok(Err(e)) = handle.await {
            tracing::error!(error = %e, "leader election stopped");
        }
    });
    Ok(Leadership { leading: rx, task })
}
