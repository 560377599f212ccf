//! The executor contract, run against the local executor (the Kubernetes
//! executor runs it in `tests/kube.rs`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use decap_contract_tests::{RecordedExits, executor_suite};
use decap_embedded::{LocalExecutor, LocalExecutorConfig, SandboxMode};

async fn local(sandbox: SandboxMode, warm: usize) {
    let dir = tempfile::tempdir().unwrap();
    let exits = Arc::new(RecordedExits::default());
    let executor = LocalExecutor::new(
        LocalExecutorConfig {
            work_root: dir.path().join("work"),
            hide: Vec::new(),
            bctool: vec![env!("CARGO_BIN_EXE_bctool").into()],
            sandbox,
            kill_grace: Duration::from_secs(1),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            warm,
        },
        exits.clone(),
    )
    .unwrap();
    executor_suite(Arc::new(executor), exits, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_executor_keeps_the_executor_contract() {
    local(SandboxMode::None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_executor_with_warm_bctools_in_bubblewrap_keeps_the_executor_contract() {
    local(SandboxMode::Auto, 2).await;
}
