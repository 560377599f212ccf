//! `decap-test-node`: the scheduler and kubelet of one node for a
//! Kubernetes API server that has neither (Decap's test bed). It binds the
//! pods of the watched namespaces to itself and runs their containers as
//! local processes under bubblewrap, until SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use decap_kube::testnode::{self, TestNodeConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "decap-test-node",
    about = "Runs the pods of a test API server as local processes"
)]
struct Args {
    /// Kubeconfig file (else KUBECONFIG, ~/.kube/config or the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The Node's name.
    #[arg(long, default_value = "decap-test-node")]
    node_name: String,
    /// A namespace whose pods the node runs (repeatable).
    #[arg(long = "namespace", default_values_t = vec!["decap".to_owned()])]
    namespaces: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("decap-test-node: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let client = decap_kube::client(args.kubeconfig.as_deref()).await?;
    let mut term = signal(SignalKind::terminate())?;
    let node = testnode::start(
        client,
        TestNodeConfig {
            node_name: args.node_name,
            namespaces: args.namespaces,
        },
    )
    .await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    node.shutdown().await;
    Ok(())
}
