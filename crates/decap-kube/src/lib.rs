//! Decap's Kubernetes executor: one pod per build, in the build namespace.
//!
//! This is the only crate that imports `kube` and `k8s-openapi`. It holds
//! the executor ([`KubeExecutor`]), the rendering of build pods ([`pod`]),
//! label sanitizing ([`labels`]), leader election over a `coordination.k8s.io`
//! Lease ([`leader`]), builds' secrets as Kubernetes Secrets
//! ([`KubeSecretStore`]), and the test node the test bed runs pods on
//! ([`testnode`]).

use std::path::Path;
use std::time::Duration;

pub mod executor;
pub mod labels;
pub mod leader;
pub mod pod;
pub mod secrets;
pub mod testnode;

pub use executor::KubeExecutor;
pub use secrets::{KubeSecretStore, secret_name_for};
/// The client crates, for tests and tools built on this crate.
pub use {k8s_openapi, kube};

/// How build pods are made.
#[derive(Debug, Clone)]
pub struct KubeExecutorConfig {
    /// The namespace build pods run in (`decap`).
    pub namespace: String,
    /// The image the `decap-bctool` init container runs (the Decap image).
    pub bctool_image: String,
    /// bctool's path in that image (`/usr/local/bin/bctool`).
    pub bctool_command: Vec<String>,
    /// The service account of build pods (its token is not mounted).
    pub service_account: String,
    /// The Secret mounted at `/decap/credentials`, when it exists.
    pub credentials_secret: String,
    /// CPU requested when `project.json` names none.
    pub default_cpu: String,
    /// Memory requested (and its limit) when `project.json` names none.
    pub default_memory: String,
    /// Time between TERM and KILL when a build is stopped.
    pub kill_grace: Duration,
    /// How long a finished pod is kept (for `kubectl logs`) before it is deleted.
    pub finished_pod_ttl: Duration,
    /// The image pull policy of build pods' containers, when set.
    pub image_pull_policy: Option<String>,
}

impl Default for KubeExecutorConfig {
    fn default() -> Self {
        KubeExecutorConfig {
            namespace: "decap".into(),
            bctool_image: "decap:latest".into(),
            bctool_command: vec!["/usr/local/bin/bctool".into()],
            service_account: "decap-build".into(),
            credentials_secret: "decap-credentials".into(),
            default_cpu: "500m".into(),
            default_memory: "1Gi".into(),
            kill_grace: Duration::from_secs(10),
            finished_pod_ttl: Duration::from_secs(300),
            image_pull_policy: None,
        }
    }
}

/// A client from a kubeconfig file, or else the usual inference (the
/// `KUBECONFIG` variable, `~/.kube/config`, the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> decap_core::Result<kube::Client> {
    // kube's rustls needs a process-wide crypto provider; another crate may
    // have installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let err = |e: String| decap_core::Error::backend("kubernetes", e);
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| err(format!("cannot read kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(format!("invalid kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| err(format!("no Kubernetes configuration found: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| err(format!("cannot make a Kubernetes client: {e}")))
}
