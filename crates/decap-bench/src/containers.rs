//! The container executor against a real engine: a push to the first line
//! of `build.sh` in a container, against `podman run --rm IMAGE true` in
//! the same run; a build with a Redis sidecar and its readiness probe: the
//! build's first line after the probe passed; 20 builds at once under a cap
//! of 16: all finish, the cap and the branch locks hold, and the time to the
//! last first line.
//!
//! The engine: `DECAP_CONTAINER_SOCKET` (else found as Decap finds it); the
//! images: `DECAP_BENCH_IMAGE` and `DECAP_BENCH_REDIS_IMAGE` (default the
//! test bed's, `tests/bed/podman.sh install`).

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use decap_bench::{request_builds, start, write_project};

use crate::{WARM_GAP_MS, epoch_ms, push_build, summary, wait_final};

const RUNS: usize = 30;

fn descriptor(image: &str) -> String {
    serde_json::json!({ "buildImage": image, "managedRefRegex": ".*" }).to_string()
}

/// The first line of a log that is not one of Decap's notes, as epoch ms.
pub(crate) fn first_line_ms(log: &str) -> Result<f64> {
    let line = log
        .lines()
        .find(|l| !l.starts_with("[decap:"))
        .context("the build printed nothing")?;
    Ok(line.trim().replace(',', ".").parse::<f64>()? * 1000.0)
}

async fn log_of(http: &reqwest::Client, url: &str, id: &str) -> Result<String> {
    Ok(http
        .get(format!("{url}/api/v1/logs/{id}"))
        .send()
        .await?
        .text()
        .await?)
}

pub async fn containers() -> Result<()> {
    let engine = match std::env::var("DECAP_CONTAINER_SOCKET") {
        Ok(s) => s,
        Err(_) => decap_container::find_engine()
            .map_err(anyhow::Error::msg)?
            .to_string_lossy()
            .into_owned(),
    };
    let image = std::env::var("DECAP_BENCH_IMAGE")
        .unwrap_or_else(|_| "localhost/decap-debian:bookworm".into());
    let redis = std::env::var("DECAP_BENCH_REDIS_IMAGE")
        .unwrap_or_else(|_| "localhost/decap-redis:bookworm".into());
    let first = "#!/bin/bash\necho \"$EPOCHREALTIME\"\n";
    let (img, red) = (image.clone(), redis.clone());
    let server = start(
        move |s| {
            write_project(s, "bench/first", &descriptor(&img), first)?;
            write_project(s, "bench/cache", &descriptor(&red), first)?;
            std::fs::write(
                s.join("bench/cache/redis-sidecar.json"),
                serde_json::json!({
                    "name": "redis", "image": red,
                    "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 1, "failureThreshold": 30}
                })
                .to_string(),
            )?;
            write_project(
                s,
                "bench/many",
                &descriptor(&img),
                "#!/bin/bash\necho \"$EPOCHREALTIME\"\nsleep 2\n",
            )
        },
        &[
            "--executor",
            "container",
            "--container-socket",
            &engine,
            "--max-builds",
            "16",
            "--max-builds-per-project",
            "16",
        ],
    )?;
    let http = reqwest::Client::new();

    // 1. A push to the first line, against `podman run --rm IMAGE true`,
    // taken in turns.
    let mut lat = Vec::new();
    let mut bare = Vec::new();
    for i in 0..RUNS {
        tokio::time::sleep(Duration::from_millis(WARM_GAP_MS)).await;
        let t0 = epoch_ms();
        let id = push_build(&http, &server.url, "first", i).await?;
        let b = wait_final(&http, &server.url, &id).await?;
        if b["status"] != "succeeded" || b["executor"] != "container" {
            bail!("build {id}: {b}");
        }
        lat.push(first_line_ms(&log_of(&http, &server.url, &id).await?)? - t0);
        let t = Instant::now();
        let st = Command::new("podman")
            .args(["run", "--rm", &image, "true"])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("podman run --rm {image} true failed");
        }
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (a50, a99) = summary(
        "webhook → first line of build.sh in a container (image present)",
        lat,
    );
    let (b50, b99) = summary(&format!("podman run --rm {image} true"), bare);
    println!(
        "  overhead over podman run: p50 {:.2} ms, p99 {:.2} ms",
        a50 - b50,
        a99 - b99
    );

    // 2. With a sidecar: the build's first line after its probe passed.
    let mut after = Vec::new();
    for i in 0..10 {
        let id = push_build(&http, &server.url, "cache", i).await?;
        let b = wait_final(&http, &server.url, &id).await?;
        let log = log_of(&http, &server.url, &id).await?;
        if b["status"] != "succeeded" {
            bail!("build {id}: {b}\n{log}");
        }
        let passed = log
            .lines()
            .find_map(|l| {
                let at = l.split(" passed its readinessProbe at ").nth(1)?;
                let at = at.split(',').next()?;
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
            })
            .context("no readiness line in the log")?;
        let passed_ms = passed.unix_timestamp_nanos() as f64 / 1e6;
        after.push(first_line_ms(&log)? - passed_ms);
    }
    summary("readinessProbe passed → the build's first line", after);

    // 3. 20 builds at once, 16 at most running: the cap and the locks hold.
    let branches: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    let t0 = epoch_ms();
    let ids = request_builds(&http, &server.url, "bench/many", &branches).await?;
    let mut most = 0;
    let mut done: HashMap<String, serde_json::Value> = HashMap::new();
    let started = Instant::now();
    while done.len() < ids.len() {
        let mut running = HashSet::new();
        for id in &ids {
            if done.contains_key(id) {
                continue;
            }
            let b: serde_json::Value = http
                .get(format!("{}/api/v1/build/{id}", server.url))
                .send()
                .await?
                .json()
                .await?;
            match b["status"].as_str() {
                Some("running") => {
                    if !running.insert(b["branch"].as_str().unwrap_or_default().to_owned()) {
                        bail!("two builds of branch {} ran at once", b["branch"]);
                    }
                }
                Some("queued" | "deferred") => {}
                _ => {
                    done.insert(id.clone(), b);
                }
            }
        }
        most = most.max(running.len());
        if most > 16 {
            bail!("{most} builds ran at once under a cap of 16");
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the 20 builds did not finish in 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut last = 0f64;
    for (id, b) in &done {
        if b["status"] != "succeeded" {
            bail!("build {id}: {b}");
        }
        last = last.max(first_line_ms(&log_of(&http, &server.url, id).await?)? - t0);
    }
    println!(
        "20 container builds at once (cap 16): all succeeded, at most {most} running at once, no branch twice; last first line after {:.0} ms, all done after {:.1} s",
        last,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
