//! Benchmarks of the Kubernetes executor against a real kube-apiserver
//! (the test bed's: `tests/bed/kube.sh start`, then pass its kubeconfig).
//!
//! ```text
//! cargo build --release -p decap -p decap-bench
//! eval "$(DECAP_TEST_BED_DIR=/tmp/bed tests/bed/kube.sh start)"
//! target/release/decap-bench-kube --kubeconfig "$DECAP_TEST_KUBECONFIG"
//! ```
//!
//! No node runs the pods: what is measured is Decap's side, from a signed
//! webhook to the pod accepted by the API server (seen by a watcher of the
//! bench's own), and the controller's memory as it tracks many pods.
//!
//! With `--real-node NODE` it measures instead what nodes add: a signed
//! webhook to the build pod `Running`, and 50 builds asked for at once
//! until all their pods run, on the stand-in node (`decap-test-node`,
//! started in this process) and then on the bed's real node (kubelet,
//! containerd; `tests/bed/node.sh start`, `cluster` and `image`), in one
//! run:
//!
//! ```text
//! target/release/decap-bench-kube --kubeconfig "$DECAP_TEST_KUBECONFIG" \
//!     --real-node "$DECAP_TEST_REAL_NODE" --node-ip "$DECAP_TEST_NODE_IP" \
//!     --bctool-image "$DECAP_TEST_DECAP_IMAGE" --build-image "$DECAP_TEST_NODE_BUILD_IMAGE"
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use decap_bench::{SECRET, Server, percentile, write_project};
use decap_kube::k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use decap_kube::kube::api::{DeleteParams, ListParams, PostParams};
use decap_kube::kube::runtime::watcher;
use decap_kube::kube::{Api, Client};
use futures::StreamExt;

#[derive(Parser)]
#[command(about = "Decap's Kubernetes executor benchmarks")]
struct Cli {
    /// The kubeconfig of the API server (system:masters).
    #[arg(long, env = "DECAP_TEST_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Sequential webhooks for the latency figure.
    #[arg(long, default_value_t = 300)]
    sequential: usize,
    /// Builds requested at once.
    #[arg(long, default_value_t = 200)]
    burst: usize,
    /// Build pods tracked when memory is measured.
    #[arg(long, default_value_t = 1000)]
    tracked: usize,
    /// Measure pods that run: on the stand-in node, then on this real
    /// node (its Node's name).
    #[arg(long, requires_all = ["node_ip", "bctool_image", "build_image"])]
    real_node: Option<String>,
    /// The node's address, where build pods reach Decap.
    #[arg(long)]
    node_ip: Option<String>,
    /// The image with bctool (Decap's own) on the real node.
    #[arg(long)]
    bctool_image: Option<String>,
    /// The build image on the real node.
    #[arg(long)]
    build_image: Option<String>,
    /// Builds one at a time on each node, for the webhook → Running figure.
    #[arg(long, default_value_t = 40)]
    node_sequential: usize,
    /// Builds asked for at once on each node.
    #[arg(long, default_value_t = 50)]
    node_burst: usize,
}

/// `decap serve` with the Kubernetes executor in `ns`, a cap of `cap`
/// builds, a project `bench/kube` of `descriptor` running `script`, and
/// more flags.
fn start(
    kubeconfig: &Path,
    ns: &str,
    cap: usize,
    descriptor: &str,
    script: &str,
    extra: &[&str],
) -> Result<Server> {
    let cap = cap.to_string();
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let mut args = vec![
        "--executor",
        "kubernetes",
        "--kube-namespace",
        ns,
        "--kubeconfig",
        &kubeconfig,
        "--max-builds",
        &cap,
        "--max-builds-per-project",
        &cap,
    ];
    args.extend_from_slice(extra);
    decap_bench::start(
        |scripts| write_project(scripts, "bench/kube", descriptor, script),
        &args,
    )
}

fn push_body(branch: &str, n: usize) -> Vec<u8> {
    let v = serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000000",
        "after": format!("{:040x}", n + 1),
        "created": false, "deleted": false, "forced": false,
        "commits": [],
        "repository": {"name": "kube", "full_name": "bench/kube", "owner": {"login": "bench", "name": "bench"}},
        "pusher": {"name": "bench"}, "sender": {"login": "bench"}
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Sends one signed push; returns the build id.
async fn push(http: &reqwest::Client, url: &str, branch: &str, n: usize) -> Result<String> {
    let body = push_body(branch, n);
    let r = http
        .post(format!("{url}/hooks/github"))
        .header("x-github-event", "push")
        .header("x-github-delivery", format!("kube-{n}"))
        .header(
            "x-hub-signature-256",
            decap_server::auth::sign(SECRET, &body),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let v: serde_json::Value = r.json().await?;
    Ok(v["builds"][0]
        .as_str()
        .context("no build started")?
        .to_owned())
}

type Seen = Arc<Mutex<HashMap<String, (Instant, Option<String>)>>>;

/// Records when each pod of `ns` is first seen, with its lock-key annotation.
fn watch_pods(client: Client, ns: &str) -> Seen {
    let seen: Seen = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let out = seen.clone();
    tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev {
                let now = Instant::now();
                let Some(name) = p.metadata.name.clone() else {
                    continue;
                };
                let key = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("decap.io/lock-key").cloned());
                if let Ok(mut s) = out.lock() {
                    s.entry(name).or_insert((now, key));
                }
            }
        }
    });
    seen
}

fn seen_at(seen: &Seen, id: &str) -> Option<Instant> {
    seen.lock().ok()?.get(id).map(|(t, _)| *t)
}

async fn wait_for(seen: &Seen, ids: &[String], limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let missing = ids.iter().filter(|id| seen_at(seen, id).is_none()).count();
        if missing == 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("{missing} pods still missing after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// A namespace with the build service account.
async fn namespace(client: &Client, ns: &str) -> Result<()> {
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.to_owned());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &n)
        .await?;
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("decap-build".into());
    sa.automount_service_account_token = Some(false);
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await?;
    Ok(())
}

/// When each pod of `ns` was first seen running (its phase `Running`, or
/// past it), and the most that ran at once.
#[derive(Default)]
struct Runs {
    first: HashMap<String, Instant>,
    running: std::collections::HashSet<String>,
    peak: usize,
}

fn watch_running(client: Client, ns: &str) -> Arc<Mutex<Runs>> {
    let runs: Arc<Mutex<Runs>> = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let out = runs.clone();
    tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev else {
                continue;
            };
            let now = Instant::now();
            let (Some(name), Some(phase)) = (
                p.metadata.name.clone(),
                p.status.as_ref().and_then(|s| s.phase.clone()),
            ) else {
                continue;
            };
            let Ok(mut r) = out.lock() else { return };
            match phase.as_str() {
                "Running" => {
                    r.first.entry(name.clone()).or_insert(now);
                    r.running.insert(name);
                    r.peak = r.peak.max(r.running.len());
                }
                "Succeeded" | "Failed" => {
                    r.first.entry(name.clone()).or_insert(now);
                    r.running.remove(&name);
                }
                _ => {}
            }
        }
    });
    runs
}

async fn wait_running(runs: &Arc<Mutex<Runs>>, ids: &[String], limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let missing = {
            let r = runs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            ids.iter().filter(|id| !r.first.contains_key(*id)).count()
        };
        if missing == 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("{missing} build pods not running after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Webhook → build pod running, one at a time, then a burst at once, on
/// whichever node takes the pods of `ns`.
async fn on_node(cli: &Cli, client: &Client, label: &str, ns: &str, extra: &[&str]) -> Result<()> {
    let runs = watch_running(client.clone(), ns);
    let image = cli.build_image.clone().unwrap_or_default();
    let listen = format!("{}:0", cli.node_ip.clone().unwrap_or_default());
    let mut args = vec!["--listen", &listen, "--kube-finished-pod-ttl-secs", "1"];
    args.extend_from_slice(extra);
    // Each build runs a moment, so that it is seen running.
    let server = start(
        &cli.kubeconfig,
        ns,
        cli.node_burst,
        &format!(r#"{{"buildImage": "{image}"}}"#),
        "echo hello\nsleep 2\n",
        &args,
    )?;
    let http = reqwest::Client::new();
    let mut ms = Vec::new();
    for i in 0..cli.node_sequential {
        let sent = Instant::now();
        let id = push(&http, &server.url, &format!("seq-{i}"), i).await?;
        wait_running(&runs, std::slice::from_ref(&id), Duration::from_secs(60)).await?;
        let at = runs
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .first
            .get(&id)
            .copied()
            .context("seen")?;
        ms.push(at.duration_since(sent).as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{label}: webhook → build pod Running: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
    // The one-at-a-time builds end before the burst.
    tokio::time::sleep(Duration::from_secs(5)).await;
    if let Ok(mut r) = runs.lock() {
        r.peak = r.running.len();
    }
    let start_burst = Instant::now();
    let tasks: Vec<_> = (0..cli.node_burst)
        .map(|i| {
            let (http, url) = (http.clone(), server.url.clone());
            let n = cli.node_sequential + i;
            tokio::spawn(async move { push(&http, &url, &format!("burst-{i}"), n).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await??);
    }
    wait_running(&runs, &ids, Duration::from_secs(300)).await?;
    let (last, peak) = {
        let r = runs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let last = ids.iter().filter_map(|id| r.first.get(id)).max().copied();
        (last.context("no pods")?, r.peak)
    };
    println!(
        "{label}: {} builds at once: all running {:.2} s after the first was asked for; at most {peak} running at once (cap {})",
        cli.node_burst,
        last.duration_since(start_burst).as_secs_f64(),
        cli.node_burst,
    );
    // Every build ends, so the node is quiet for what follows.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(180) {
        let left = pods.list(&ListParams::default()).await?.items.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(server);
    Ok(())
}

/// The stand-in node and the real node, one after the other in one run.
async fn nodes(cli: &Cli, client: &Client) -> Result<()> {
    let real = cli.real_node.clone().unwrap_or_default();
    let bctool_image = cli.bctool_image.clone().unwrap_or_default();
    let bctool = decap_bench::target_dir()?.join("bctool");
    let bctool = bctool.to_string_lossy().into_owned();
    let tag = std::process::id();

    // The stand-in binds the pods of its namespace itself; the real node
    // is tainted meanwhile, so that the scheduler leaves them to it.
    let standin_ns = format!("bench-standin-{tag}");
    namespace(client, &standin_ns).await?;
    let taint = |on: bool| {
        let arg = if on {
            "decap-bench=standin:NoSchedule".to_owned()
        } else {
            "decap-bench=standin:NoSchedule-".to_owned()
        };
        std::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .arg("--kubeconfig")
            .arg(&cli.kubeconfig)
            .args(["taint", "node", &real, &arg])
            .output()
    };
    taint(true)?;
    let node = decap_kube::testnode::start(
        client.clone(),
        decap_kube::testnode::TestNodeConfig {
            node_name: format!("node-{standin_ns}"),
            namespaces: vec![standin_ns.clone()],
        },
    )
    .await?;
    let standin = on_node(
        cli,
        client,
        "stand-in node",
        &standin_ns,
        &[
            "--kube-bctool-image",
            "decap:bench",
            "--kube-bctool-path",
            &bctool,
        ],
    )
    .await;
    node.shutdown().await;
    // Its Node goes too, or the scheduler would place the real node's pods
    // on it.
    let _ = Api::<decap_kube::k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(&format!("node-{standin_ns}"), &DeleteParams::default())
        .await;
    taint(false)?;
    standin?;

    let real_ns = format!("bench-real-{tag}");
    namespace(client, &real_ns).await?;
    on_node(
        cli,
        client,
        "real node",
        &real_ns,
        &["--kube-bctool-image", &bctool_image],
    )
    .await?;
    for ns in [standin_ns, real_ns] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let client = decap_kube::client(Some(&cli.kubeconfig)).await?;
    if cli.real_node.is_some() {
        return nodes(&cli, &client).await;
    }
    let ns = format!("bench-{}", std::process::id());
    namespace(&client, &ns).await?;
    let seen = watch_pods(client.clone(), &ns);
    let total = cli.sequential + cli.burst + cli.tracked;
    let server = start(
        &cli.kubeconfig,
        &ns,
        total,
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "echo hello\n",
        &[],
    )?;
    let http = reqwest::Client::new();
    let mut count = 0usize;

    // Webhook accepted → pod created, one at a time.
    let mut ms = Vec::new();
    for i in 0..cli.sequential {
        let sent = Instant::now();
        let id = push(&http, &server.url, &format!("seq-{i}"), count).await?;
        count += 1;
        wait_for(&seen, std::slice::from_ref(&id), Duration::from_secs(10)).await?;
        let at = seen_at(&seen, &id).context("seen")?;
        ms.push(at.duration_since(sent).as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "webhook → pod created: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );

    // Many at once.
    let start_burst = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..cli.burst {
        let (http, url) = (http.clone(), server.url.clone());
        let n = count + i;
        tasks.push(tokio::spawn(async move {
            push(&http, &url, &format!("burst-{i}"), n).await
        }));
    }
    count += cli.burst;
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await??);
    }
    wait_for(&seen, &ids, Duration::from_secs(60)).await?;
    let last = ids
        .iter()
        .filter_map(|id| seen_at(&seen, id))
        .max()
        .context("no pods")?;
    let keys: Vec<Option<String>> = {
        let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        ids.iter()
            .map(|id| s.get(id).and_then(|(_, k)| k.clone()))
            .collect()
    };
    let distinct: std::collections::HashSet<_> = keys.iter().flatten().collect();
    let lock_violations = keys.len() - distinct.len();
    let live = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("type=decap-build"))
        .await?
        .items
        .len();
    println!(
        "{} builds at once: all pods created in {:.2} s; {} pods live (cap {total}); lock violations {lock_violations}",
        cli.burst,
        last.duration_since(start_burst).as_secs_f64(),
        live,
    );

    // Memory while tracking many pods.
    let mut more = Vec::new();
    while count < total {
        let batch: Vec<_> = (0..50.min(total - count))
            .map(|i| {
                let (http, url) = (http.clone(), server.url.clone());
                let n = count + i;
                tokio::spawn(async move { push(&http, &url, &format!("track-{n}"), n).await })
            })
            .collect();
        count += batch.len();
        for t in batch {
            more.push(t.await??);
        }
    }
    wait_for(&seen, &more, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("type=decap-build"))
        .await?
        .items
        .len();
    println!(
        "controller resident memory with {pods} tracked build pods: {:.1} MiB",
        rss_mib(server.child.id())?
    );

    drop(server);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let _ = pods
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    Ok(())
}
