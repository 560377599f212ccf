//! The Kubernetes executor, its secret store and the leader election. They
//! need the `kubernetes` feature (on by default); a `decap` built without it
//! refuses `--executor kubernetes` (and `--executor container`, whose
//! sidecars are Kubernetes containers) with a message that says why.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use decap_core::ports::{Executor, SecretStore};
use decap_server::{Controller, ExecutorEventsChannel};

use crate::ServeArgs;

/// Why a flag that needs Kubernetes is refused by a build without it.
pub(crate) const LEFT_OUT: &str = "this decap was built without Kubernetes (the cargo feature \
     `kubernetes`): build it with its default features, or with `--features kubernetes`";

pub(crate) use imp::{Kube, sidecar_check};

#[cfg(feature = "kubernetes")]
mod imp {
    use anyhow::Context;

    use super::*;

    /// A client of the cluster's API server.
    pub(crate) struct Kube {
        client: decap_kube::kube::Client,
    }

    /// This replica's part in the leader election.
    pub(crate) type Leader = decap_kube::leader::Leadership;

    /// Checks each project's sidecars as the scripts are read: they become
    /// Kubernetes containers (pods, or containers beside a build's).
    pub(crate) fn sidecar_check() -> Option<decap_scripts::ProjectCheck> {
        Some(Arc::new(|entry| decap_kube::pod::sidecars(entry).err()))
    }

    impl Kube {
        /// Connects with `--kubeconfig`, the default kubeconfig or the pod's
        /// service account.
        pub(crate) async fn connect(args: &ServeArgs) -> Result<Kube> {
            Ok(Kube {
                client: decap_kube::client(args.kube.kubeconfig.as_deref()).await?,
            })
        }

        /// Builds' secrets: Kubernetes Secrets in the build namespace.
        pub(crate) async fn secret_store(&self, namespace: &str) -> Result<Arc<dyn SecretStore>> {
            let store = decap_kube::KubeSecretStore::connect(self.client.clone(), namespace)
                .await
                .context("builds' secrets (Kubernetes Secrets in the build namespace)")?;
            Ok(Arc::new(store))
        }

        /// One pod per build.
        pub(crate) async fn executor(
            &self,
            args: &ServeArgs,
            events: Arc<ExecutorEventsChannel>,
        ) -> Result<Arc<dyn Executor>> {
            let k = &args.kube;
            let config = decap_kube::KubeExecutorConfig {
                namespace: k.kube_namespace.clone(),
                bctool_image: k.kube_bctool_image.clone(),
                bctool_command: vec![k.kube_bctool_path.clone()],
                service_account: k.kube_service_account.clone(),
                credentials_secret: k.kube_credentials_secret.clone(),
                default_cpu: k.kube_default_cpu.clone(),
                default_memory: k.kube_default_memory.clone(),
                kill_grace: Duration::from_secs(args.kill_grace_secs.max(1)),
                finished_pod_ttl: Duration::from_secs(k.kube_finished_pod_ttl_secs),
                image_pull_policy: k.kube_image_pull_policy.clone(),
            };
            Ok(Arc::new(
                decap_kube::KubeExecutor::new(self.client.clone(), config, events)
                    .await
                    .context("Kubernetes executor")?,
            ))
        }

        /// Joins the election among replicas; the controller launches only
        /// while this replica leads.
        pub(crate) async fn elect(
            &self,
            args: &ServeArgs,
            identity: &str,
            controller: &Controller,
        ) -> Result<Leader> {
            let leadership = decap_kube::leader::elect(
                self.client.clone(),
                &args.kube.kube_lease_namespace,
                &args.kube.kube_lease_name,
                identity,
                Duration::from_secs(15),
                Duration::from_secs(5),
            )
            .await
            .context("leader election")?;
            controller.set_leadership(leadership.leading.clone());
            Ok(leadership)
        }
    }
}

#[cfg(not(feature = "kubernetes"))]
mod imp {
    use anyhow::bail;

    use super::*;

    /// No cluster client exists in this build.
    pub(crate) enum Kube {}

    /// No election exists in this build.
    pub(crate) enum Leader {}

    impl Leader {
        pub(crate) async fn release(self, _: Duration) {
            match self {}
        }
    }

    /// Nothing to check: no executor of this build runs sidecars.
    pub(crate) fn sidecar_check() -> Option<decap_scripts::ProjectCheck> {
        None
    }

    impl Kube {
        pub(crate) async fn connect(_: &ServeArgs) -> Result<Kube> {
            bail!("{LEFT_OUT}")
        }

        pub(crate) async fn secret_store(&self, _: &str) -> Result<Arc<dyn SecretStore>> {
            match *self {}
        }

        pub(crate) async fn executor(
            &self,
            _: &ServeArgs,
            _: Arc<ExecutorEventsChannel>,
        ) -> Result<Arc<dyn Executor>> {
            match *self {}
        }

        pub(crate) async fn elect(&self, _: &ServeArgs, _: &str, _: &Controller) -> Result<Leader> {
            match *self {}
        }
    }
}
