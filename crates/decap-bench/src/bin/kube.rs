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
}

fn start(kubeconfig: &Path, ns: &str, cap: usize) -> Result<Server> {
    let cap = cap.to_string();
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    decap_bench::start(
        |scripts| {
            write_project(
                scripts,
                "bench/kube",
                r#"{"buildImage": "debian:bookworm-slim"}"#,
                "echo hello\n",
            )
        },
        &[
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
        ],
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let client = decap_kube::client(Some(&cli.kubeconfig)).await?;
    let ns = format!("bench-{}", std::process::id());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &n)
        .await?;
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("decap-build".into());
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await?;
    let seen = watch_pods(client.clone(), &ns);
    let total = cli.sequential + cli.burst + cli.tracked;
    let server = start(&cli.kubeconfig, &ns, total)?;
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
