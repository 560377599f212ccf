//! `decap-bench`: measures the figures of `docs/PERFORMANCE.md` against the
//! real `decap` binary (built in the same target folder), on loopback.
//!
//! `cargo run --release -p decap-bench -- all` runs every benchmark. Each
//! prints medians and p99s; the machine is shared, so compare ratios taken in
//! one run.

mod containers;
mod light;
mod pipelines;
mod restarts;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use decap_bench::{SECRET, TOKEN, percentile, start, write_project};

#[derive(Parser)]
#[command(about = "Decap benchmarks")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Clone, Copy)]
enum What {
    /// Signed push webhooks accepted per second, with latency percentiles.
    Webhooks,
    /// Webhook sent → first line of build.sh running.
    FirstLine,
    /// A trivial build end to end against `sh build.sh` alone.
    EndToEnd,
    /// 1,000 requests over 100 projects with a cap of 8.
    Drain,
    /// Resident memory of an idle `decap serve`.
    IdleMemory,
    /// The project page rendered with 10,000 builds in its history.
    ProjectPage,
    /// 100 viewers following one build's live log: server CPU, every line
    /// once, line latency.
    LiveViewers,
    /// 1,000 pushed commits built and reported to a stub of GitHub: webhook
    /// → pending status latency, and the calls counted.
    GithubStatuses,
    /// A build printing 200 MB with 20 secrets defined, against the same
    /// build with none: the console's shipping rate.
    Masking,
    /// 1,000 held unsigned webhook connections: the server's memory and
    /// /healthz's answer time.
    HeldConnections,
    /// Pushes at 50/s across an upgrade in place and a socket-activated
    /// restart; a SIGTERM with 200 live viewers and 5 running builds.
    Restarts,
    /// Builds in containers (Podman or Docker): a push to the first line
    /// against `podman run --rm IMAGE true`, the first line after a
    /// sidecar's readiness probe, 20 builds at once.
    Containers,
    /// A preset build (checkout, override file, three phases) against a
    /// build.sh running the same command, on one server, interleaved.
    Presets,
    /// How light and quick: exec → /readyz, idle memory of every process
    /// (server, warm environments), the warm runner's, 200 builds on
    /// distinct branches under a cap of 8; signed webhooks sent by wrk;
    /// each beside its floor.
    Light,
    /// A three-stage pipeline of trivial stages against three trivial
    /// builds one after the other; the project page and per-stage figures
    /// over 10,000 runs of three stages.
    Pipelines,
    /// Everything.
    All,
}

fn summary(name: &str, mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
    println!(
        "{name}: n={} p50={p50:.2} ms p99={p99:.2} ms max={:.2} ms",
        ms.len(),
        ms.last().copied().unwrap_or(f64::NAN)
    );
    (p50, p99)
}

fn push_body(team: &str, project: &str, branch: &str, commit: &str) -> Vec<u8> {
    // The shape of a real push payload, trimmed to what a large one carries.
    let v = serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000000",
        "after": commit,
        "created": false, "deleted": false, "forced": false,
        "compare": "https://github.com/x/y/compare/a...b",
        "commits": [{"id": commit, "message": "Update README.md", "author": {"name": "A", "email": "a@example.com"}}],
        "repository": {"name": project, "full_name": format!("{team}/{project}"), "owner": {"login": team, "name": team}},
        "pusher": {"name": team}, "sender": {"login": team}
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

async fn send_hook(
    http: &reqwest::Client,
    url: &str,
    delivery: &str,
    body: Vec<u8>,
) -> Result<reqwest::StatusCode> {
    let sig = decap_server::auth::sign(SECRET, &body);
    let r = http
        .post(format!("{url}/hooks/github"))
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    Ok(r.status())
}

/// Sends one signed push of `team/project` at `main` and returns the build it started.
async fn push_build(http: &reqwest::Client, url: &str, project: &str, n: usize) -> Result<String> {
    push_commit(
        http,
        url,
        project,
        &format!("{project}-{n}"),
        &format!("{:040x}", n + 1),
    )
    .await
}

/// Sends a signed push of `commit` to `bench/project`'s `main` as delivery
/// `delivery`; returns the build it started.
async fn push_commit(
    http: &reqwest::Client,
    url: &str,
    project: &str,
    delivery: &str,
    commit: &str,
) -> Result<String> {
    let body = push_body("bench", project, "main", commit);
    let resp = http
        .post(format!("{url}/hooks/github"))
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header(
            "x-hub-signature-256",
            decap_server::auth::sign(SECRET, &body),
        )
        .body(body)
        .send()
        .await?;
    let v: serde_json::Value = resp.json().await?;
    Ok(v["builds"][0]
        .as_str()
        .with_context(|| format!("push {delivery} started no build: {v}"))?
        .to_owned())
}

/// Sends signed pushes from `connections` workers for `duration`: as fast as
/// they are answered (`rate` None), or paced to `rate` per second in all with
/// each latency counted from the moment the request was due, so that a slow
/// answer cannot hide the requests it delayed.
async fn load(
    url: &str,
    branch: &'static str,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Result<(Vec<f64>, u64, f64)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let http = http.clone();
        let url = url.to_owned();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            let first = tokio::time::Instant::now()
                + interval
                    .map(|i| i.mul_f64(c as f64 / connections as f64))
                    .unwrap_or_default();
            let mut k = 0u32;
            loop {
                let due = match interval {
                    Some(i) => first + i * k,
                    None => tokio::time::Instant::now(),
                };
                if due >= deadline {
                    break;
                }
                if interval.is_some() {
                    tokio::time::sleep_until(due).await;
                }
                k += 1;
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let commit = format!("{:040x}", (c as u128) << 64 | n as u128);
                let body = push_body("bench", "app", branch, &commit);
                match send_hook(&http, &url, &format!("bench-{c}-{n}"), body).await {
                    Ok(s) if s.as_u16() == 202 => lat.push(due.elapsed().as_secs_f64() * 1000.0),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    Ok((all, errors, started.elapsed().as_secs_f64()))
}

async fn webhooks() -> Result<()> {
    for (label, branch) in [
        ("ref not managed (recorded, no build)", "unmanaged"),
        ("a build each (queue closed: every build deferred)", "main"),
    ] {
        for rate in [None, Some(5000.0)] {
            let server = start(
                |s| {
                    write_project(
                        s,
                        "bench/app",
                        r#"{"buildImage": "x", "managedRefRegex": "main"}"#,
                        "true\n",
                    )
                },
                &[],
            )?;
            let http = reqwest::Client::new();
            if branch == "main" {
                http.put(format!("{}/api/v1/queue", server.url))
                    .bearer_auth(TOKEN)
                    .json(&serde_json::json!({"state": "closed"}))
                    .send()
                    .await?;
            }
            let (all, errors, secs) =
                load(&server.url, branch, 32, Duration::from_secs(10), rate).await?;
            let accepted = all.len();
            let mode = match rate {
                None => "as fast as answered".to_owned(),
                Some(r) => format!("paced at {r:.0}/s"),
            };
            println!(
                "webhooks, {label}, {mode}: {accepted} accepted in {secs:.1} s = {:.0}/s, {errors} errors",
                accepted as f64 / secs
            );
            summary("  answer latency", all);
            if branch == "main" {
                // Scheduling runs behind the answers: time how long it takes
                // to catch up (every accepted build deferred, none queued).
                let caught_up = Instant::now();
                loop {
                    let metrics = http
                        .get(format!("{}/metrics", server.url))
                        .send()
                        .await?
                        .text()
                        .await?;
                    let queued = metrics
                        .lines()
                        .find(|l| l.starts_with("decap_builds{status=\"queued\"}"))
                        .and_then(|l| l.split_whitespace().last())
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                    if queued == 0 {
                        break;
                    }
                    if caught_up.elapsed() > Duration::from_secs(600) {
                        bail!("{queued} builds still queued after 10 minutes");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                println!(
                    "  every build deferred {:.1} s after the load stopped",
                    caught_up.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Between two pushes: the warm environment or prepared workspace a build
/// took is made again meanwhile (a workspace filesystem, a sandbox and
/// bctool: about 50 ms of work on two cores), as it is between pushes that
/// are not a burst.
const WARM_GAP_MS: u64 = 200;

async fn first_line(sandbox: &str, warm: usize, runs: usize) -> Result<(f64, f64)> {
    first_line_with(sandbox, warm, runs, &[]).await
}

async fn first_line_with(
    sandbox: &str,
    warm: usize,
    runs: usize,
    extra: &[&str],
) -> Result<(f64, f64)> {
    // The script's first line prints the wall clock as it runs; the log,
    // read back after the build, tells when that was.
    let script = "#!/bin/bash\necho \"$EPOCHREALTIME\"\n";
    let warm_arg = warm.to_string();
    let mut args = vec!["--sandbox", sandbox, "--warm-standbys", &warm_arg];
    args.extend(extra.iter().filter(|e| !e.starts_with("idle:")));
    let server = start(
        |s| write_project(s, "bench/first", r#"{"buildImage": "x"}"#, script),
        &args,
    )?;
    let expected = if sandbox == "none" {
        "none"
    } else {
        "bubblewrap"
    };
    let mut label = match (expected, warm) {
        ("none", _) => "no sandbox".to_owned(),
        (_, 0) => "sandbox, cold".to_owned(),
        _ => "sandbox, warm".to_owned(),
    };
    if !extra.is_empty() {
        label = format!("{label}, {}", extra.join(" "));
    }
    let http = reqwest::Client::new();
    let mut lat = Vec::new();
    let mut launch = Vec::new();
    // `idle:N` in `extra`'s place: each push comes after N seconds of quiet.
    let gap = match extra.first().and_then(|e| e.strip_prefix("idle:")) {
        Some(secs) => Duration::from_secs(secs.parse()?),
        None => Duration::from_millis(WARM_GAP_MS),
    };
    for i in 0..runs {
        // What a build took (a warm environment, a prepared workspace) is
        // made again after it: give that the moment it needs, as the time
        // between pushes that are not a burst would.
        tokio::time::sleep(gap).await;
        let t0 = epoch_ms();
        let id = push_build(&http, &server.url, "first", i).await?;
        let b = wait_final(&http, &server.url, &id).await?;
        if b["status"] != "succeeded" || b["sandbox"] != expected {
            bail!("build {id}: {b}");
        }
        let log = http
            .get(format!("{}/api/v1/logs/{id}", server.url))
            .send()
            .await?
            .text()
            .await?;
        let ran = containers::first_line_ms(&log)?;
        lat.push(ran - t0);
        let parse = |k: &str| {
            b[k].as_str()
                .and_then(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map(|t| t.unix_timestamp_nanos() as f64 / 1e6)
        };
        if let Some(start) = parse("startTime") {
            launch.push(start - t0);
        }
    }
    summary(
        &format!("  of which webhook → launch decided ({label})"),
        launch,
    );
    Ok(summary(
        &format!("webhook → first line of build.sh ({label})"),
        lat,
    ))
}

/// The sandbox Decap makes, started alone around `/bin/true` (as the
/// executor starts bctool): bubblewrap as the build's user with every
/// namespace, and slirp4netns when `network`; no server, workspace
/// filesystem or cgroup.
async fn sandbox_alone(runs: usize, network: bool) -> Result<Option<Vec<f64>>> {
    use decap_embedded::sandbox::{Plan, Sandbox, SandboxDir, SandboxNetwork};
    let Some(bwrap) = find("bwrap") else {
        return Ok(None);
    };
    let net = match (network, find("slirp4netns")) {
        (true, Some(slirp)) => SandboxNetwork::Slirp(slirp),
        (true, None) => return Ok(None),
        (false, _) => SandboxNetwork::None,
    };
    let tmp = tempfile::tempdir()?;
    let dir = SandboxDir::for_data_dir(tmp.path())?;
    let _socket = std::os::unix::net::UnixListener::bind(dir.socket())?;
    let ws = dir.0.join("ws");
    let uid = nix::unistd::geteuid()
        .is_root()
        .then_some(1_900_000_000u32 + 60_000);
    decap_embedded::sandbox::disk::Workspace::create(
        &ws,
        decap_embedded::sandbox::disk::DiskQuota::Measured,
        None,
        uid,
    )?;
    let sandbox = Sandbox::new(bwrap, net, 1_900_000_000, Vec::new(), dir.socket(), 9);
    let truth = Path::new("/bin/true");
    let messages = dir.0.join("ws.err");
    let mut v = Vec::new();
    for _ in 0..runs {
        let plan = Plan {
            workspace: &ws,
            bctool: truth,
            runner: None,
            args: Vec::new(),
            env: Vec::new(),
            uid,
            network,
            stdin: false,
            stderr: &messages,
        };
        let t = Instant::now();
        let mut started = sandbox
            .start(&plan, async |mut cmd| cmd.spawn(), |_| Ok(()))
            .await?;
        started.child.wait().await?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        if let Some(s) = started.slirp.take() {
            s.stop();
        }
    }
    let _ = std::fs::remove_dir_all(&dir.0);
    Ok(Some(v))
}

fn find(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A build printing `mb` MB of log lines with `secrets` secrets defined (as
/// project secrets through the API); the time from its start to its end,
/// with the shipped log's size checked.
async fn masked_build(secrets: usize, mb: usize) -> Result<f64> {
    let script = format!(
        "#!/bin/bash\nyes 'a line of build output that goes on for a while, as compilers print' | head -c {}\n",
        mb * 1_000_000
    );
    let max_log = (mb * 1_000_000 + (1 << 20)).to_string();
    let server = start(
        |s| write_project(s, "bench/mask", r#"{"buildImage": "x"}"#, &script),
        &["--sandbox", "auto", "--max-log-bytes", &max_log],
    )?;
    let http = reqwest::Client::new();
    for i in 0..secrets {
        let value = format!("s3cr3t-{i:02}-{}", "k".repeat(24 + i));
        let r = http
            .put(format!(
                "{}/api/v1/secrets/bench/mask/SECRET_{i}",
                server.url
            ))
            .bearer_auth(TOKEN)
            .body(value)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("setting a secret: {}", r.status());
        }
    }
    let id = push_build(&http, &server.url, "mask", 0).await?;
    let b = wait_final(&http, &server.url, &id).await?;
    if b["status"] != "succeeded" {
        bail!("build {id}: {b}");
    }
    let ms = b["durationMs"].as_f64().context("no duration")?;
    let log = http
        .get(format!("{}/api/v1/logs/{id}", server.url))
        .send()
        .await?
        .bytes()
        .await?;
    if log.len() < mb * 1_000_000 {
        bail!("the shipped log has {} bytes", log.len());
    }
    Ok(ms)
}

async fn masking() -> Result<()> {
    let mb = 200;
    let mut plain = Vec::new();
    let mut masked = Vec::new();
    for _ in 0..3 {
        plain.push(masked_build(0, mb).await?);
        masked.push(masked_build(20, mb).await?);
    }
    plain.sort_by(f64::total_cmp);
    masked.sort_by(f64::total_cmp);
    let rate = |ms: f64| mb as f64 / (ms / 1000.0);
    println!(
        "200 MB of log shipped, median of 3: no secrets {:.0} ms ({:.0} MB/s); 20 secrets {:.0} ms ({:.0} MB/s)",
        plain[1],
        rate(plain[1]),
        masked[1],
        rate(masked[1])
    );
    Ok(())
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .split_whitespace()
        .next()
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

async fn held_connections() -> Result<()> {
    use std::io::Write;
    let server = start(
        |s| write_project(s, "bench/x", r#"{"buildImage": "x"}"#, "true\n"),
        &["--sandbox", "none"],
    )?;
    let addr = server.url.trim_start_matches("http://").to_owned();
    let before = rss_bytes(server.child.id())?;
    let mut held = Vec::new();
    let chunk = vec![b' '; 64 << 10];
    for i in 0..1000 {
        let mut s = std::net::TcpStream::connect(&addr)?;
        write!(
            s,
            "POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: held-{i}\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\n\r\n",
            "0".repeat(64),
            25 << 20
        )?;
        // Some of the body, then nothing more.
        s.write_all(&chunk)?;
        held.push(s);
    }
    let http = reqwest::Client::new();
    let mut lat = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = http.get(format!("{}/healthz", server.url)).send().await?;
        if !r.status().is_success() {
            bail!("/healthz answered {}", r.status());
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = rss_bytes(server.child.id())?;
    summary("/healthz with 1,000 held unsigned webhook bodies", lat);
    println!(
        "  server RSS: {:.1} MiB before, {:.1} MiB while they are held",
        before as f64 / (1 << 20) as f64,
        during as f64 / (1 << 20) as f64
    );
    drop(held);
    Ok(())
}

async fn wait_final(http: &reqwest::Client, url: &str, id: &str) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let b: serde_json::Value = http
            .get(format!("{url}/api/v1/build/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if let Some(st) = b["status"].as_str()
            && !matches!(st, "queued" | "deferred" | "running")
        {
            return Ok(b);
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("build {id} did not finish");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

fn shell_alone(script: &Path, runs: usize) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let st = Command::new("sh")
            .arg(script)
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("the script failed");
        }
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(v)
}

fn bwrap_alone(runs: usize) -> Result<Option<Vec<f64>>> {
    if !decap_embedded::bubblewrap_works() {
        return Ok(None);
    }
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        Command::new("bwrap")
            .args([
                "--die-with-parent",
                "--new-session",
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
                "true",
            ])
            .status()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Some(v))
}

async fn end_to_end(runs: usize) -> Result<()> {
    let script = "echo hello\n";
    let server = start(
        |s| write_project(s, "bench/e2e", r#"{"buildImage": "x"}"#, script),
        &["--sandbox", "none"],
    )?;
    let http = reqwest::Client::new();
    let mut lat = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let id = push_build(&http, &server.url, "e2e", i).await?;
        let b = wait_final(&http, &server.url, &id).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        if b["status"] != "succeeded" {
            bail!("build {id} ended {}", b["status"]);
        }
    }
    let (e2e, e2e99) = summary(
        "trivial build end to end (webhook → log and result stored)",
        lat,
    );
    let sh = server.scripts.join("bench/e2e/build.sh");
    let (alone, alone99) = summary("sh build.sh alone", shell_alone(&sh, runs)?);
    println!(
        "  overhead over sh build.sh: p50 {:.2} ms, p99 {:.2} ms",
        e2e - alone,
        e2e99 - alone99
    );
    Ok(())
}

/// Runs `script` with `sh -ec` in `dir` as a committer; its output.
fn git_sh(dir: &Path, script: &str) -> Result<String> {
    let out = Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The preset's own cost: each round pushes a new commit of a local
/// repository and builds it twice, once as a `shell` preset project (the
/// server fetches the commit, reads `.decap.json`, bctool fetches the tree
/// and runs three phases) and once as a project whose `build.sh` runs the
/// same command; webhook → result stored, on the embedded default (the
/// sandbox when it can run here).
async fn presets(runs: usize) -> Result<()> {
    let repo_dir = tempfile::tempdir()?;
    let repo = repo_dir.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    std::fs::write(repo.join("test.sh"), "echo tests pass\n")?;
    std::fs::write(repo.join(".decap.json"), r#"{"test": {"custom": []}}"#)?;
    git_sh(
        &repo,
        "git init -q -b main . && git add -A && git commit -qm one",
    )?;
    git_sh(repo_dir.path(), "chmod -R a+rX .")?;
    let url = repo.to_string_lossy().into_owned();
    let server = start(
        |s| {
            let dir = s.join("bench/preset");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("project.json"),
                format!(r#"{{"language": "shell", "repoUrl": "{url}"}}"#),
            )?;
            // The same repository as a URL: mirrored, so each push is fetched.
            let dir = s.join("bench/mirrored");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("project.json"),
                format!(r#"{{"language": "shell", "repoUrl": "file://{url}"}}"#),
            )?;
            // The same command on the same file, from the scripts folder.
            write_project(
                s,
                "bench/script",
                r#"{"buildImage": "x"}"#,
                "sh \"$DECAP_BUILD_SCRIPTS/test.sh\"\n",
            )?;
            std::fs::write(s.join("bench/script/test.sh"), "echo tests pass\n")?;
            Ok(())
        },
        &[],
    )?;
    let http = reqwest::Client::new();
    let (mut preset, mut script, mut mirrored) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        std::fs::write(repo.join("round"), i.to_string())?;
        let commit = git_sh(
            &repo,
            "git add -A && git commit -qm round && git rev-parse HEAD",
        )?;
        for (project, into) in [
            ("preset", &mut preset),
            ("script", &mut script),
            ("mirrored", &mut mirrored),
        ] {
            let t = Instant::now();
            let id = push_commit(
                &http,
                &server.url,
                project,
                &format!("{project}-{i}"),
                &commit,
            )
            .await?;
            let b = wait_final(&http, &server.url, &id).await?;
            into.push(t.elapsed().as_secs_f64() * 1000.0);
            if b["status"] != "succeeded" {
                bail!("build {id} of {project} ended {}", b["status"]);
            }
        }
    }
    let (p50, p99) = summary(
        "shell preset, the repository a path read in place (commit and .decap.json, tree, three phases), push → result",
        preset,
    );
    let (s50, s99) = summary("the same command in a build.sh, push → result", script);
    println!(
        "  the preset's own overhead: p50 {:.2} ms, p99 {:.2} ms",
        p50 - s50,
        p99 - s99
    );
    let (m50, m99) = summary(
        "the same preset, the repository a file:// URL (each push fetched into the mirror), push → result",
        mirrored,
    );
    println!(
        "  with a fetch: p50 {:.2} ms, p99 {:.2} ms over the build.sh",
        m50 - s50,
        m99 - s99
    );
    Ok(())
}

async fn drain() -> Result<()> {
    let projects = 100;
    let requests = 1000;
    let server = start(
        |s| {
            for p in 0..projects {
                write_project(
                    s,
                    &format!("bench/p{p}"),
                    r#"{"buildImage": "x"}"#,
                    "true\n",
                )?;
            }
            Ok(())
        },
        &[
            "--sandbox",
            "none",
            "--max-builds",
            "8",
            "--max-builds-per-project",
            "8",
        ],
    )?;
    let http = reqwest::Client::new();
    let t = Instant::now();
    let mut ids = Vec::new();
    for i in 0..requests {
        let p = i % projects;
        let branch = format!("b{}", (i / projects) % 3);
        let r = http
            .post(format!(
                "{}/api/v1/builds/bench/p{p}?branch={branch}",
                server.url
            ))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        if r.status() != 202 {
            bail!("request {i}: {}", r.status());
        }
        let v: serde_json::Value = r.json().await?;
        ids.push(v["builds"][0]["id"].as_str().context("no id")?.to_owned());
    }
    let mut spans: Vec<(String, i128, i128)> = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    for id in &ids {
        let b = wait_final(&http, &server.url, id).await?;
        *statuses
            .entry(b["status"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
        let parse = |k: &str| {
            b[k].as_str()
                .and_then(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map(|t| t.unix_timestamp_nanos())
        };
        if let (Some(s), Some(e)) = (parse("startTime"), parse("endTime")) {
            spans.push((
                format!(
                    "{}/{}",
                    b["projectKey"].as_str().unwrap_or(""),
                    b["branch"].as_str().unwrap_or("")
                ),
                s,
                e,
            ));
        }
    }
    let elapsed = t.elapsed();
    // count violations from the recorded intervals
    let mut events: Vec<(i128, i32)> = spans
        .iter()
        .flat_map(|(_, s, e)| [(*s, 1), (*e, -1)])
        .collect();
    events.sort_by_key(|(t, d)| (*t, *d));
    let (mut now, mut peak) = (0, 0);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    let mut by_key: std::collections::HashMap<&str, Vec<(i128, i128)>> =
        std::collections::HashMap::new();
    for (k, s, e) in &spans {
        by_key.entry(k.as_str()).or_default().push((*s, *e));
    }
    let mut lock_violations = 0;
    for v in by_key.values_mut() {
        v.sort();
        lock_violations += v.windows(2).filter(|w| w[1].0 < w[0].1).count();
    }
    println!(
        "drain: {requests} requests over {projects} projects, cap 8: all ended in {:.1} s; statuses {statuses:?}; peak concurrency {peak} (cap violations {}); lock violations {lock_violations}",
        elapsed.as_secs_f64(),
        usize::from(peak > 8),
    );
    Ok(())
}

fn idle_memory() -> Result<()> {
    let server = start(
        |s| write_project(s, "bench/idle", r#"{"buildImage": "x"}"#, "true\n"),
        &[],
    )?;
    let _ = Command::new("curl")
        .args(["-s", "-o", "/dev/null", &format!("{}/healthz", server.url)])
        .status();
    std::thread::sleep(Duration::from_secs(3));
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?");
    println!(
        "idle decap serve: {}",
        rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// Runs 10,000 trivial builds of one project (50 branches, a batch of one
/// build per branch at a time), then times the project page.
async fn project_page() -> Result<()> {
    let server = start(
        |s| write_project(s, "bench/history", r#"{"buildImage": "x"}"#, "true\n"),
        &[
            "--sandbox",
            "none",
            "--max-builds",
            "8",
            "--max-builds-per-project",
            "8",
        ],
    )?;
    let http = reqwest::Client::new();
    let branches: Vec<String> = (0..50).map(|b| format!("branch=b{b}")).collect();
    let query = branches.join("&");
    let t = Instant::now();
    for batch in 0..100 {
        let r = http
            .post(format!(
                "{}/api/v1/builds/bench/history?{query}",
                server.url
            ))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("batch {batch}: {}", r.status());
        }
        let v: serde_json::Value = r.json().await?;
        let ids: Vec<String> = v["builds"]
            .as_array()
            .context("no builds")?
            .iter()
            .filter_map(|b| b["id"].as_str().map(str::to_owned))
            .collect();
        for id in &ids {
            wait_final(&http, &server.url, id).await?;
        }
    }
    println!(
        "10,000 builds of one project run in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let page = format!("{}/projects/bench/history", server.url);
    let ms = get_times(&http, &page, 1000).await?;
    summary(
        "project page with 10,000 builds, server render and answer",
        ms,
    );
    Ok(())
}

/// Times `n` GETs of `url` (each answered in full, a successful page of
/// at least 200 bytes), after 50 left out to warm up.
async fn get_times(http: &reqwest::Client, url: &str, n: usize) -> Result<Vec<f64>> {
    for _ in 0..50 {
        http.get(url).send().await?.bytes().await?;
    }
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = http.get(url).send().await?;
        let ok = r.status().is_success();
        let body = r.bytes().await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !ok || body.len() < 200 {
            bail!("{url} failed: {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(ms)
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// One viewer: follows the build's event stream, returns each log line
/// with the moment it arrived (ms since the epoch).
async fn viewer(url: String, id: String) -> Result<Vec<(String, f64)>> {
    use futures::StreamExt;
    let r = reqwest::get(format!("{url}/api/v1/logs/{id}/events")).await?;
    let mut body = r.bytes_stream();
    let mut buf = String::new();
    let mut lines = Vec::new();
    while let Some(chunk) = body.next().await {
        let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
        buf.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let mut kind = "";
            let mut data = String::new();
            for l in event.lines() {
                if let Some(k) = l.strip_prefix("event:") {
                    kind = k.trim();
                } else if let Some(d) = l.strip_prefix("data:") {
                    data = d.strip_prefix(' ').unwrap_or(d).to_owned();
                }
            }
            match kind {
                "log" => lines.push((data, at)),
                "end" => return Ok(lines),
                _ => {}
            }
        }
    }
    Ok(lines)
}

/// 100 viewers on one build printing 400 lines, one each 25 ms, each line
/// stamped with the moment it was printed.
async fn live_viewers() -> Result<()> {
    let lines = 400;
    let server = start(
        |s| {
            write_project(
                s,
                "bench/chatty",
                r#"{"buildImage": "x"}"#,
                &format!(
                    "sleep 2\ni=1\nwhile [ $i -le {lines} ]; do echo \"line $i $(date +%s%3N)\"; sleep 0.025; i=$((i+1)); done\n"
                ),
            )
        },
        &["--sandbox", "none"],
    )?;
    let http = reqwest::Client::new();
    let v: serde_json::Value = http
        .post(format!(
            "{}/api/v1/builds/bench/chatty?branch=main",
            server.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .json()
        .await?;
    let id = v["builds"][0]["id"]
        .as_str()
        .context("no build id")?
        .to_owned();
    let viewers: Vec<_> = (0..100)
        .map(|_| tokio::spawn(viewer(server.url.clone(), id.clone())))
        .collect();
    // The viewers connect during the build's first two seconds of silence.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = server.child.id();
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    let mut seen = Vec::new();
    for v in viewers {
        seen.push(v.await??);
    }
    let (cpu, wall) = (cpu_seconds(pid)? - cpu0, t0.elapsed().as_secs_f64());
    let expected: Vec<String> = (1..=lines).map(|i| format!("line {i}")).collect();
    let mut complete = 0;
    let mut latency = Vec::new();
    for got in &seen {
        let text: Vec<String> = got
            .iter()
            .map(|(l, _)| l.rsplit_once(' ').map(|x| x.0).unwrap_or(l).to_owned())
            .collect();
        if text == expected {
            complete += 1;
        }
        for (l, at) in got {
            if let Some(printed) = l.rsplit_once(' ').and_then(|x| x.1.parse::<f64>().ok()) {
                latency.push(at - printed);
            }
        }
    }
    println!(
        "100 viewers of one build ({lines} lines over {:.1} s): server CPU {:.1} % of one core; {complete} of 100 saw every line once, in order",
        wall,
        cpu / wall * 100.0
    );
    summary("line printed → received by a viewer (100 viewers)", latency);
    Ok(())
}

type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, Instant)>>>;

/// A stand-in for GitHub's statuses endpoint: records (sha, context, state)
/// with the moment it arrived, answers 201.
async fn github_stub(calls: Calls) -> Result<String> {
    async fn status(
        axum::extract::State(calls): axum::extract::State<Calls>,
        axum::extract::Path((_owner, _repo, sha)): axum::extract::Path<(String, String, String)>,
        axum::Json(body): axum::Json<serde_json::Value>,
    ) -> axum::http::StatusCode {
        let field = |k: &str| body[k].as_str().unwrap_or("").to_owned();
        if let Ok(mut c) = calls.lock() {
            c.push((sha, field("context"), field("state"), Instant::now()));
        }
        axum::http::StatusCode::CREATED
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route(
            "/repos/{owner}/{repo}/statuses/{sha}",
            axum::routing::post(status),
        )
        .with_state(calls);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn github_statuses() -> Result<()> {
    let calls: Calls = Calls::default();
    let stub = github_stub(calls.clone()).await?;
    let projects = 50;
    let server = start(
        |s| {
            for p in 0..projects {
                write_project(
                    s,
                    &format!("bench/p{p}"),
                    r#"{"buildImage": "x"}"#,
                    "true\n",
                )?;
            }
            Ok(())
        },
        &[
            "--sandbox",
            "none",
            "--max-builds",
            "8",
            "--max-builds-per-project",
            "8",
            "--github-token",
            "ghp_bench",
            "--github-api-url",
            &stub,
        ],
    )?;
    let http = reqwest::Client::new();
    let commits = 1000;
    let mut sent = std::collections::HashMap::new();
    let t = Instant::now();
    for i in 0..commits {
        let sha = format!("{:040x}", 0xdec0_0000_u64 + i as u64);
        let project = format!("p{}", i % projects);
        let body = push_body("bench", &project, &format!("b{}", i / projects), &sha);
        let at = Instant::now();
        let r = send_hook(&http, &server.url, &format!("gh-{i}"), body).await?;
        if r != reqwest::StatusCode::ACCEPTED {
            bail!("webhook {i}: {r}");
        }
        sent.insert(sha, at);
        // ~17 builds a second: 1,000 within a minute
        tokio::time::sleep(Duration::from_millis(55)).await;
    }
    // Every commit ends with success for its project and for decap/all.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = calls
            .lock()
            .map(|c| c.iter().filter(|x| x.2 == "success").count())
            .unwrap_or(0);
        if done >= 2 * commits {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} success statuses arrived");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await; // anything late shows
    let calls = calls.lock().map(|c| c.clone()).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut twice = 0;
    let mut latency = Vec::new();
    for (sha, context, state, at) in &calls {
        if !seen.insert((sha.clone(), context.clone(), state.clone())) {
            twice += 1;
        }
        if state == "pending"
            && context.starts_with("decap/bench/")
            && let Some(sent_at) = sent.get(sha)
        {
            latency.push(at.duration_since(*sent_at).as_secs_f64() * 1000.0);
        }
    }
    println!(
        "{commits} pushed commits built in {took:.1} s: {} GitHub calls for {} statuses needed (pending and success, own and decap/all); {twice} sent twice for the same state",
        calls.len(),
        4 * commits
    );
    summary("webhook accepted → pending status at GitHub", latency);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let all = matches!(cli.what, What::All);
    if all || matches!(cli.what, What::IdleMemory) {
        idle_memory()?;
    }
    if all || matches!(cli.what, What::FirstLine) {
        first_line("none", 2, 200).await?;
        let (w50, w99) = first_line("auto", 2, 200).await?;
        println!("  warm: p50 {w50:.2} ms, p99 {w99:.2} ms");
        // The same with a whole bctool waiting instead of decap-runner.
        let (b50, _) = first_line_with("auto", 2, 200, &["--runner", "none"]).await?;
        println!("  warm runner ÷ warm bctool, p50: {:.2}", w50 / b50);
        // After a minute of quiet (three pushes, 61 s apart).
        first_line_with("auto", 2, 3, &["idle:61"]).await?;
        let (c50, c99) = first_line("auto", 0, 100).await?;
        match sandbox_alone(100, true).await? {
            None => println!("the sandbox cannot be made here; its floor is not measured"),
            Some(v) => {
                let (b50, b99) = summary(
                    "the sandbox alone (bwrap + slirp4netns) starting /bin/true",
                    v,
                );
                println!(
                    "  cold over the sandbox alone: p50 {:.2} ms, p99 {:.2} ms",
                    c50 - b50,
                    c99 - b99
                );
            }
        }
        if let Some(v) = sandbox_alone(100, false).await? {
            summary("the sandbox alone without its network helper", v);
        }
        if let Some(v) = bwrap_alone(100)? {
            summary("bare bwrap (no user or network namespace) starting true", v);
        }
    }
    if all || matches!(cli.what, What::EndToEnd) {
        end_to_end(200).await?;
    }
    if all || matches!(cli.what, What::Drain) {
        drain().await?;
    }
    if all || matches!(cli.what, What::Presets) {
        presets(100).await?;
    }
    if all || matches!(cli.what, What::Webhooks) {
        webhooks().await?;
    }
    if all || matches!(cli.what, What::ProjectPage) {
        project_page().await?;
    }
    if all || matches!(cli.what, What::Pipelines) {
        pipelines::pipelines().await?;
    }
    if all || matches!(cli.what, What::LiveViewers) {
        live_viewers().await?;
    }
    if all || matches!(cli.what, What::GithubStatuses) {
        github_statuses().await?;
    }
    if all || matches!(cli.what, What::Masking) {
        masking().await?;
    }
    if all || matches!(cli.what, What::HeldConnections) {
        held_connections().await?;
    }
    if all || matches!(cli.what, What::Restarts) {
        restarts::restarts().await?;
    }
    if all || matches!(cli.what, What::Light) {
        light::light().await?;
        light::webhooks_wrk()?;
    }
    if all || matches!(cli.what, What::Containers) {
        containers::containers().await?;
    }
    Ok(())
}
