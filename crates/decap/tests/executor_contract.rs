//! The executor contract, run against the local executor (the Kubernetes
//! executor runs it in `tests/kube.rs`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use decap_contract_tests::{RecordedExits, executor_suite};
use decap_embedded::sandbox::SandboxDir;
use decap_embedded::{LocalExecutor, LocalExecutorConfig, NetworkMode, SandboxMode};

async fn local(sandbox: SandboxMode, warm: usize) {
    let dir = tempfile::tempdir().unwrap();
    let exits = Arc::new(RecordedExits::default());
    let sandbox_dir = SandboxDir::for_data_dir(dir.path()).unwrap();
    // The sandbox reaches the server through its socket; the suite's builds
    // report to nowhere, so a listener that answers nothing does.
    let _socket = std::os::unix::net::UnixListener::bind(sandbox_dir.socket()).unwrap();
    let executor = LocalExecutor::new(
        LocalExecutorConfig {
            dir: sandbox_dir,
            hide: Vec::new(),
            bctool: vec![env!("CARGO_BIN_EXE_bctool").into()],
            runner: Some(env!("CARGO_BIN_EXE_decap-runner").into()),
            sandbox,
            network: NetworkMode::Slirp4netns,
            uid_base: 1_900_000_000,
            url_port: 9,
            kill_grace: Duration::from_secs(1),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            warm,
            defaults: Default::default(),
        },
        exits.clone(),
    )
    .await
    .unwrap();
    executor_suite(Arc::new(executor), exits, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_executor_keeps_the_executor_contract() {
    local(SandboxMode::None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_executor_with_warm_bctools_in_bubblewrap_keeps_the_executor_contract() {
    local(SandboxMode::Bubblewrap, 2).await;
}
