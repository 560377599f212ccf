//! Restarts and upgrades under load: signed pushes at 50/s for 10 s, each
//! on a new connection as GitHub sends them, across an upgrade in place
//! (`SIGUSR2`) and across a restart under socket activation; and the time
//! a `SIGTERM` takes with 200 live viewers and 5 running builds.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use decap_bench::{SECRET, TOKEN, percentile, request_builds, target_dir, write_project};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

const RATE: u32 = 50;
const SECS: u32 = 10;

fn decap(
    data: &Path,
    scripts: &Path,
    fd: Option<&std::net::TcpListener>,
    extra: &[&str],
) -> Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(target_dir()?.join("decap"));
    cmd.args(["serve", "--log-level", "error"])
        .arg("--data-dir")
        .arg(data)
        .arg("--scripts")
        .arg(scripts)
        .args(extra)
        .env("DECAP_GITHUB_WEBHOOK_SECRET", SECRET)
        .env("DECAP_API_TOKEN", TOKEN)
        .env_remove("LISTEN_PID")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    match fd {
        Some(l) => {
            cmd.env("LISTEN_FDS", "1");
            decap_embedded::sandbox::fds::pass(&mut cmd, vec![l.as_fd().try_clone_to_owned()?], 3);
        }
        None => {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
    }
    Ok(cmd)
}

async fn started(mut cmd: tokio::process::Command) -> Result<(tokio::process::Child, String)> {
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let url = loop {
        match lines.next_line().await? {
            Some(l) => {
                if let Some(u) = l.strip_prefix("decap: serving ") {
                    break u.to_owned();
                }
            }
            None => bail!("decap exited before serving"),
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

fn scripts_dir(dir: &Path, script: &str) -> Result<PathBuf> {
    let scripts = dir.join("scripts");
    write_project(&scripts, "bench/restarts", r#"{"buildImage": "x"}"#, script)?;
    Ok(scripts)
}

/// Pushes at 50/s for 10 s; `at(i)` runs before the `i`th. Answers each
/// push's status (or the error) and its answer time.
async fn pushes(url: &str, mut at: impl FnMut(u32)) -> Vec<(Result<u16, String>, f64)> {
    let http = match reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(h) => h,
        Err(e) => return vec![(Err(e.to_string()), 0.0)],
    };
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..RATE * SECS {
        tokio::time::sleep_until(start + Duration::from_secs(1) * i / RATE).await;
        at(i);
        let http = http.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let commit = format!("{:040x}", 0xbe_0000_u64 + u64::from(i));
            let body = crate::push_body("bench", "restarts", "main", &commit);
            let sig = decap_server::auth::sign(SECRET, &body);
            let t0 = Instant::now();
            let r = http
                .post(format!("{url}/hooks/github"))
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("restart-{i}"))
                .header("x-hub-signature-256", sig)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string());
            (r, t0.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or((Err("task failed".into()), 0.0)));
    }
    out
}

fn report(name: &str, sent: &[(Result<u16, String>, f64)]) {
    let failed = sent.iter().filter(|(r, _)| *r != Ok(202)).count();
    let mut ms: Vec<f64> = sent.iter().map(|(_, t)| *t).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: {} pushes at {RATE}/s, refused or failed {failed}; answer p50 {:.2} ms, p99 {:.2} ms, longest {:.2} ms",
        sent.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
    if let Some((r, _)) = sent.iter().find(|(r, _)| *r != Ok(202)) {
        println!("  first failure: {r:?}");
    }
}

/// How the builds of the pushes ended: waits (a minute at most) until each
/// of `n` has ended, then says how many succeeded and how many did not.
async fn outcomes(url: &str, n: usize) -> String {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: serde_json::Value = match http
            .get(format!(
                "{url}/api/v1/builds/bench/restarts?branch=main&limit=500"
            ))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(e) => return format!("builds unknown: {e}"),
        };
        let builds = v["builds"].as_array().cloned().unwrap_or_default();
        let status = |b: &serde_json::Value| b["status"].as_str().unwrap_or("").to_owned();
        let ended = builds
            .iter()
            .filter(|b| !matches!(status(b).as_str(), "queued" | "deferred" | "running"))
            .count();
        if (builds.len() >= n && ended == builds.len()) || Instant::now() > deadline {
            let ok = builds.iter().filter(|b| status(b) == "succeeded").count();
            return format!(
                "{} builds of {n} pushes: {ok} succeeded, {} did not, {} not ended",
                builds.len(),
                ended - ok,
                builds.len() - ended
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pid_of(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("decap.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Stops `pid` (a process this one reaps as subreaper) and waits for it.
fn stop_pid(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
}

pub async fn restarts() -> Result<()> {
    // The upgraded decap outlives its parent: it is reaped here.
    nix::sys::prctl::set_child_subreaper(true)?;
    let builds = "echo built\n";

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let scripts = scripts_dir(dir.path(), builds)?;
    let (mut old, url) = started(decap(&data, &scripts, None, &[])?).await?;
    let old_pid = old.id().context("no pid")? as i32;
    let sent = pushes(&url, |i| {
        if i == 3 * RATE {
            let _ = kill(Pid::from_raw(old_pid), Signal::SIGUSR2);
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(30), old.wait()).await;
    report("upgrade in place (SIGUSR2 at 3 s)", &sent);
    println!("  {}", outcomes(&url, sent.len()).await);
    match pid_of(&data) {
        Some(p) if p != old_pid => stop_pid(p),
        _ => println!("  the upgrade did not take place"),
    }

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let scripts = scripts_dir(dir.path(), builds)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let (first, url) = started(decap(&data, &scripts, Some(&listener), &[])?).await?;
    let restart = {
        let (data, scripts) = (data.clone(), scripts.clone());
        let listener = listener.try_clone()?;
        tokio::spawn(async move {
            let mut first = first;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let t0 = Instant::now();
            if let Some(pid) = first.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            let _ = first.wait().await;
            let stopped = t0.elapsed();
            let (second, _) = started(decap(&data, &scripts, Some(&listener), &[])?).await?;
            Ok::<_, anyhow::Error>((second, stopped, t0.elapsed()))
        })
    };
    let sent = pushes(&url, |_| {}).await;
    let (mut second, stopped, serving) = restart.await??;
    report(
        "restart under socket activation (SIGTERM at 3 s, then a new start)",
        &sent,
    );
    println!(
        "  stopped in {:.0} ms, the new one served {:.0} ms after the SIGTERM",
        stopped.as_secs_f64() * 1000.0,
        serving.as_secs_f64() * 1000.0
    );
    println!("  {}", outcomes(&url, sent.len()).await);
    if let Some(pid) = second.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    let _ = second.wait().await;

    // SIGTERM with 200 viewers and 5 builds streaming their consoles.
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let scripts = scripts_dir(
        dir.path(),
        "for i in $(seq 1 3000); do echo line $i; sleep 0.05; done\n",
    )?;
    let (mut server, url) = started(decap(&data, &scripts, None, &["--max-builds", "5"])?).await?;
    let http = reqwest::Client::new();
    let branches: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    let ids = request_builds(&http, &url, "bench/restarts", &branches).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut viewers = Vec::new();
    for i in 0..200 {
        let path = if i % 2 == 0 {
            format!("{url}/api/v1/logs/{}/events", ids[i % ids.len()])
        } else {
            format!("{url}/ui/events")
        };
        viewers.push(http.get(path).send().await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    if let Some(pid) = server.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    let _ = server.wait().await;
    println!(
        "SIGTERM with 200 live viewers and 5 running builds: exited in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    drop(viewers);
    // The builds ran on: the next start adopts them (then they are
    // cancelled, not left to run their 150 s).
    let (mut server, url) = started(decap(&data, &scripts, None, &["--max-builds", "5"])?).await?;
    let mut running = 0;
    for id in &ids {
        let b: serde_json::Value = http
            .get(format!("{url}/api/v1/build/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if b["status"] == "running" {
            running += 1;
        }
        http.delete(format!("{url}/api/v1/build/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
    }
    println!("  the next start found {running} of the 5 builds running on, and adopted them");
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(pid) = server.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    let _ = server.wait().await;
    Ok(())
}
