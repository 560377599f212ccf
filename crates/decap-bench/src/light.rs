//! How light and quick Decap is on a small machine: its start-up to
//! `/readyz`, the memory of an idle server with its warm environments (all
//! processes summed), the warm runner's own, and a burst of 200 builds on
//! distinct branches under a cap of 8. Each beside its floor, measured in
//! the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use decap_bench::{SECRET, TOKEN, request_builds, start, target_dir, write_project};

use crate::summary;

/// Resident memory of a process, from `smaps_rollup` (KiB): RSS counts
/// every page it maps (the C library's too, shared with every process);
/// PSS divides each shared page among the processes that map it, so that
/// PSS summed over processes is what they hold together.
#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    rss: u64,
    pss: u64,
}

fn mem_of(pid: u32) -> Option<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some(Mem {
        rss: field("Rss:")?,
        pss: field("Pss:")?,
    })
}

/// A process and every process under it: (pid, its name).
fn tree(root: u32) -> Vec<(u32, String)> {
    let mut all = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid …: comm may hold spaces and parentheses.
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let comm = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_owned();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            all.push((pid, ppid, comm));
        }
    }
    let mut found = vec![(root, String::new())];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i].0;
        for (pid, ppid, comm) in &all {
            if *ppid == Some(parent) && !found.iter().any(|(p, _)| p == pid) {
                found.push((*pid, comm.clone()));
            }
        }
        i += 1;
    }
    found
}

/// The memory of a server and every process under it, and of its largest
/// warm runner.
fn tree_memory(root: u32) -> (Mem, Mem, Option<Mem>, usize) {
    let mut total = Mem::default();
    let mut server = Mem::default();
    let mut runner: Option<Mem> = None;
    let procs = tree(root);
    for (pid, comm) in &procs {
        let Some(m) = mem_of(*pid) else { continue };
        total.rss += m.rss;
        total.pss += m.pss;
        if *pid == root {
            server = m;
        }
        if comm == "decap-runner" {
            runner = Some(runner.map_or(m, |r| if m.rss > r.rss { m } else { r }));
        }
    }
    (total, server, runner, procs.len())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_memory(label: &str, root: u32) {
    let (total, server, runner, n) = tree_memory(root);
    println!(
        "{label}: all {n} processes RSS {:.1} MiB (PSS {:.1} MiB); the server RSS {:.1} MiB (PSS {:.1}); {}",
        mib(total.rss),
        mib(total.pss),
        mib(server.rss),
        mib(server.pss),
        match runner {
            Some(r) => format!(
                "the largest warm runner RSS {:.2} MiB (PSS {:.2})",
                mib(r.rss),
                mib(r.pss)
            ),
            None => "no warm runner (decap-runner) running".to_owned(),
        }
    );
}

/// `fork` + `exec` of `/bin/true`, waited for: the floor of any start.
fn exec_floor(runs: usize) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        Command::new("/bin/true").status()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(v)
}

/// `decap serve` started on the embedded default (a fresh data dir, the
/// sandbox as `auto` finds it), timed from exec to its first `200` on
/// `/readyz`.
fn readyz(runs: usize, scripts: &Path) -> Result<Vec<f64>> {
    let decap = target_dir()?.join("decap");
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let t = Instant::now();
        let mut child = Command::new(&decap)
            .args(["serve", "--log-level", "warn", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--scripts")
            .arg(scripts)
            .env("DECAP_GITHUB_WEBHOOK_SECRET", SECRET)
            .env("DECAP_API_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let ready = loop {
            if ready_once(port) {
                break t.elapsed();
            }
            if let Some(status) = child.try_wait()? {
                bail!("decap serve exited before it was ready ({status})");
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("decap serve was not ready in 30 s");
            }
            std::thread::sleep(Duration::from_micros(250));
        };
        v.push(ready.as_secs_f64() * 1000.0);
        stop(&mut child)?;
    }
    Ok(v)
}

/// One plain HTTP/1.1 `GET /readyz`: whether it answered 200.
fn ready_once(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// SIGTERM, then wait: a server that stops cleanly leaves no mounts or
/// cgroups to slow the next one.
fn stop(child: &mut std::process::Child) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    child.wait()?;
    Ok(())
}

/// 200 builds on distinct branches, cap 8: from the request to the last
/// build's start (as recorded), and to the last one's end.
async fn burst(url: &str) -> Result<(f64, f64)> {
    let http = reqwest::Client::new();
    let branches: Vec<String> = (0..200).map(|i| format!("burst-{i}")).collect();
    let t0 = time::OffsetDateTime::now_utc();
    let clock = Instant::now();
    let mut ids = Vec::new();
    // One request names at most 50 branches.
    for chunk in branches.chunks(50) {
        ids.extend(request_builds(&http, url, "bench/light", chunk).await?);
    }
    let mut last_start = 0f64;
    loop {
        let v: serde_json::Value = http
            .get(format!("{url}/api/v1/builds/bench/light?limit=500"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let builds = v["builds"].as_array().context("no builds")?;
        let ended = builds
            .iter()
            .filter(|b| {
                ids.iter().any(|i| b["id"] == *i.as_str())
                    && matches!(
                        b["status"].as_str(),
                        Some("succeeded" | "failed" | "errored" | "cancelled" | "timed_out")
                    )
            })
            .count();
        if ended == ids.len() {
            for b in builds {
                if let Some(s) = b["startTime"].as_str().and_then(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .ok()
                }) {
                    last_start = last_start.max((s - t0).as_seconds_f64());
                }
                if b["status"] != "succeeded" {
                    bail!("a burst build did not succeed: {b}");
                }
            }
            break;
        }
        if clock.elapsed() > Duration::from_secs(300) {
            bail!(
                "the burst did not end in 300 s ({ended} of {} ended)",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((last_start, clock.elapsed().as_secs_f64()))
}

/// A wrk script that sends signed pushes of `branches` of `bench/app`
/// (each a fresh commit), every request with a delivery id of its own.
fn wrk_script(branches: &[String]) -> String {
    let mut lua = String::from("local reqs = {\n");
    for (i, b) in branches.iter().enumerate() {
        let body = crate::push_body("bench", "app", b, &format!("{:040x}", i + 1));
        let sig = decap_server::auth::sign(SECRET, &body);
        let body = String::from_utf8_lossy(&body);
        lua.push_str(&format!(
            "  {{ body = [==[{body}]==], sig = \"{sig}\" }},\n"
        ));
    }
    lua.push_str(
        r#"}
local n = #reqs
local i = 0
local sent = 0
local tid = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  i = (tid or 0) * 7919 % n
end
function request()
  i = i % n + 1
  sent = sent + 1
  local r = reqs[i]
  return wrk.format("POST", "/hooks/github", {
    ["x-github-event"] = "push",
    ["x-github-delivery"] = "wrk-" .. tostring(tid) .. "-" .. tostring(sent),
    ["x-hub-signature-256"] = r.sig,
    ["content-type"] = "application/json",
  }, r.body)
end
"#,
    );
    lua
}

/// Runs wrk against `url` with `script`: (requests per second, p50 ms,
/// p99 ms, non-2xx answers).
fn run_wrk(url: &str, script: &Path, connections: u32, secs: u32) -> Result<(f64, f64, f64, u64)> {
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &connections.to_string(), "-d"])
        .arg(format!("{secs}s"))
        .args(["--latency", "-s"])
        .arg(script)
        .arg(format!("{url}/hooks/github"))
        .output()
        .context("wrk is not installed: apt-get install wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let ms = |v: &str| -> Option<f64> {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| ms(v.trim()))
    };
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no rate in wrk's output: {text}"))?;
    let non2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((
        rate,
        pct("50%").context("no p50")?,
        pct("99%").context("no p99")?,
        non2xx,
    ))
}

/// The smallest durable SQLite commit on this disk (one small row, WAL,
/// `synchronous=FULL`, as Decap's store commits): the floor of a durable
/// answer.
fn sqlite_commit_floor(runs: usize) -> Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let db = rusqlite::Connection::open(dir.path().join("floor.db"))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute("CREATE TABLE t (x INTEGER)", [])?;
    let mut v = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        db.execute("INSERT INTO t (x) VALUES (?1)", [i as i64])?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(v)
}

/// Signed webhooks as fast as wrk sends them (one wrk thread, 32
/// connections, 10 s), durably recorded before each answer.
pub fn webhooks_wrk() -> Result<()> {
    let _ = summary(
        "floor: an empty SQLite commit, synchronous=FULL",
        sqlite_commit_floor(200)?,
    );
    let scripts = tempfile::tempdir()?;
    for (label, branch_of) in [
        ("ref not managed (recorded, no build)", "unmanaged"),
        ("a build each (queue closed: every build deferred)", "main"),
    ] {
        let branches: Vec<String> = (0..2000)
            .map(|i| match branch_of {
                "main" => format!("main-{i}"),
                _ => format!("unmanaged-{i}"),
            })
            .collect();
        let lua = scripts.path().join(format!("{branch_of}.lua"));
        std::fs::write(&lua, wrk_script(&branches))?;
        let server = start(
            |s| {
                write_project(
                    s,
                    "bench/app",
                    r#"{"buildImage": "x", "managedRefRegex": "main.*"}"#,
                    "true\n",
                )
            },
            &[],
        )?;
        if branch_of == "main" {
            let _ = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-X", "PUT", "-H"])
                .arg(format!("authorization: Bearer {TOKEN}"))
                .args([
                    "-H",
                    "content-type: application/json",
                    "-d",
                    r#"{"state": "closed"}"#,
                ])
                .arg(format!("{}/api/v1/queue", server.url))
                .status()?;
        }
        let (rate, p50, p99, bad) = run_wrk(&server.url, &lua, 32, 10)?;
        println!(
            "webhooks with wrk, {label}: {rate:.0}/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {bad} answers not 2xx"
        );
    }
    Ok(())
}

pub async fn light() -> Result<()> {
    let (floor, _) = summary("floor: fork+exec of /bin/true", exec_floor(200)?);

    let scripts = tempfile::tempdir()?;
    write_project(
        scripts.path(),
        "bench/light",
        r#"{"buildImage": "x"}"#,
        "true\n",
    )?;
    let (r50, _) = summary(
        "decap serve (embedded default, sandbox auto): exec → /readyz 200",
        readyz(20, scripts.path())?,
    );
    println!("  over the exec floor: {:.2} ms", r50 - floor);

    for (label, sandbox) in [("sandbox", "auto"), ("no sandbox", "none")] {
        let server = start(
            |s| write_project(s, "bench/light", r#"{"buildImage": "x"}"#, "true\n"),
            &["--sandbox", sandbox, "--max-builds", "8"],
        )?;
        let pid = server.child.id();
        std::thread::sleep(Duration::from_secs(3));
        print_memory(&format!("idle, {label}"), pid);
        let (started, ended) = burst(&server.url).await?;
        println!(
            "200 builds on distinct branches, cap 8, {label}: all started {started:.2} s after the request, all ended {ended:.2} s"
        );
        // The server hands freed memory back every 5 s.
        std::thread::sleep(Duration::from_secs(6));
        print_memory(&format!("idle after the burst, {label}"), pid);
        drop(server); // SIGTERM, waited for
    }
    Ok(())
}
