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
    /// Ends the relay, whose end releases the Lease.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Leadership {
    /// Gives the Lease up (a replica that stops): the next replica leads at
    /// once instead of after the Lease's duration. Waits up to `limit` for
    /// the Kubernetes API to take it.
    pub async fn release(mut self, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && tokio::time::timeout(limit, task).await.is_err()
        {
            tracing::warn!("the Lease was not released in time; it lapses instead");
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Competes for the Lease `name` in `namespace` as `identity` (the pod's
/// name): held for `duration`, renewed `grace` before it expires. Whoever
/// holds it leads; a leader that stops renewing (killed, partitioned) loses
/// it once `duration` has passed, and one that stops cleanly gives it up
/// ([`Leadership::release`]).
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
    // The manager releases the Lease once its channel has no receiver: the
    // only one is the relay's, and the controller gets the relay's copy.
    let (mut from_manager, handle) = manager.watch().await;
    let (tx, rx) = watch::channel(*from_manager.borrow());
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let identity = identity.to_owned();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = from_manager.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let leading = *from_manager.borrow_and_update();
                    tracing::info!(identity = %identity, leading, "leadership changed");
                    tx.send_replace(leading);
                }
                _ = &mut stopped => {
                    drop(from_manager);
                    tx.send_replace(false);
                    match handle.await {
                        Ok(Ok(_)) => tracing::info!(identity = %identity, "released the Lease"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease failed; it lapses instead"),
                        Err(_) => {}
                    }
                    return;
                }
            }
        }
        if let Ok(Err(e)) = handle.await {
            tracing::error!(error = %e, "leader election stopped");
        }
    });
    Ok(Leadership {
        leading: rx,
        stop: Some(stop),
        task: Some(task),
    })
}
