//! Pipelines: a three-stage pipeline of trivial stages end to end against
//! three trivial builds run one after the other (the overhead per stage),
//! and the project page and per-stage figures over 10,000 runs of three
//! stages.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use decap_bench::{start, write_project};

use crate::summary;

const PIPELINE: &str = r#"{"stages": [
    {"name": "build", "script": "build.sh"},
    {"name": "test", "script": "test.sh"},
    {"name": "deploy", "script": "deploy.sh"}
]}"#;

/// A project of three trivial stages, `bench/flow`, and a one-stage
/// project with the same trivial script, `bench/single`.
fn projects(root: &Path) -> Result<()> {
    write_project(root, "bench/flow", r#"{"buildImage": "x"}"#, "true\n")?;
    let dir = root.join("bench/flow");
    std::fs::write(dir.join("pipeline.json"), PIPELINE)?;
    std::fs::write(dir.join("test.sh"), "true\n")?;
    std::fs::write(dir.join("deploy.sh"), "true\n")?;
    write_project(root, "bench/single", r#"{"buildImage": "x"}"#, "true\n")
}

/// Asks for a run of `branches`; their run ids.
async fn request_runs(
    http: &reqwest::Client,
    url: &str,
    project: &str,
    branches: &[String],
) -> Result<Vec<String>> {
    let v = decap_bench::request(http, url, project, branches).await?;
    let runs: Vec<String> = v["pipelineRuns"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if runs.len() != branches.len() {
        bail!("{} runs asked, answered {v}", branches.len());
    }
    Ok(runs)
}

/// Waits until a run has ended; its status.
async fn run_ended(http: &reqwest::Client, url: &str, id: &str) -> Result<String> {
    let start = Instant::now();
    loop {
        let v: serde_json::Value = http
            .get(format!("{url}/api/v1/pipeline-runs/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let status = v["status"].as_str().unwrap_or("").to_owned();
        if !matches!(status.as_str(), "running" | "pending" | "") {
            return Ok(status);
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("run {id} did not end: {v}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

pub async fn pipelines() -> Result<()> {
    let server = start(
        projects,
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
    let url = &server.url;
    // Interleaved: a three-stage run, then three one-stage builds one
    // after the other, each request → its end recorded.
    let (mut runs, mut singles) = (Vec::new(), Vec::new());
    for i in 0..60 {
        let t = Instant::now();
        let id = request_runs(&http, url, "bench/flow", &[format!("r{i}")]).await?;
        let status = run_ended(&http, url, &id[0]).await?;
        if status != "succeeded" {
            bail!("run {} ended {status}", id[0]);
        }
        runs.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        for s in 0..3 {
            let ids =
                decap_bench::request_builds(&http, url, "bench/single", &[format!("s{i}-{s}")])
                    .await?;
            let b = crate::wait_final(&http, url, &ids[0]).await?;
            if b["status"] != "succeeded" {
                bail!("build {} ended {}", ids[0], b["status"]);
            }
        }
        singles.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Ten warm-up rounds left out.
    let (r50, r99) = summary("three-stage pipeline end to end", runs.split_off(10));
    let (s50, s99) = summary(
        "three one-stage builds one after the other",
        singles.split_off(10),
    );
    println!(
        "  overhead per stage: p50 {:.2} ms, p99 {:.2} ms",
        (r50 - s50) / 3.0,
        (r99 - s99) / 3.0
    );

    // 10,000 runs of three stages, 50 at a time.
    let t = Instant::now();
    for batch in 0..200 {
        let branches: Vec<String> = (0..50).map(|b| format!("b{b}")).collect();
        let ids = request_runs(&http, url, "bench/flow", &branches).await?;
        for id in &ids {
            let status = run_ended(&http, url, id).await?;
            if status != "succeeded" {
                bail!("batch {batch}: run {id} ended {status}");
            }
        }
    }
    println!(
        "10,000 runs of three stages run in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for (what, path) in [
        (
            "project page with 10,000 pipeline runs",
            "/projects/bench/flow",
        ),
        (
            "per-stage figures over them (GET /api/v1/stats)",
            "/api/v1/stats/bench/flow",
        ),
    ] {
        let ms = crate::get_times(&http, &format!("{url}{path}"), 1000).await?;
        summary(what, ms);
    }
    Ok(())
}
