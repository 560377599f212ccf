//! End to end: the real `decap` binary, real HTTP, real child processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Decap, eventually, project, push_payload};
use reqwest::Method;

const SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";
const MINUTE: Duration = Duration::from_secs(60);

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    let data = dir.path().join("data");
    (dir, scripts, data)
}

#[tokio::test]
async fn a_signed_push_runs_a_build_whose_log_artifacts_and_result_are_kept() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x", "managedRefRegex": "main"}"#,
        "#!/bin/sh\necho \"building $PROJECT_KEY $BRANCH_TO_BUILD $COMMIT_SHA\"\necho to-stderr >&2\nmkdir -p \"$ARTIFACTS_DIR/sub\"\necho report > \"$ARTIFACTS_DIR/sub/report.txt\"\necho \"lock=$BUILD_LOCK_KEY url=$DECAP_URL id=$BUILD_ID\"\ntest -z \"$DECAP_API_TOKEN\" && echo no-api-token-here\n",
    );
    let decap = Decap::start(&data, &scripts, &[]);
    let api = decap.api();
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let resp = api.webhook("push", "e2e-1", &body).await;
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();

    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["exitCode"], 0);
    assert_eq!(b["executor"], "local");
    assert_eq!(b["sandbox"], "none");
    assert!(b["scriptsCommit"].as_str().unwrap().starts_with("sha256:"));
    assert!(b["durationMs"].as_i64().is_some());

    let log = api.log(&id).await;
    assert!(
        log.contains(&format!("building acme/widgets main {SHA}")),
        "{log}"
    );
    assert!(log.contains("to-stderr"), "stderr is in the log");
    assert!(
        log.contains(&format!("lock=acme/widgets/main url={} id={id}", decap.url)),
        "{log}"
    );
    assert!(
        log.contains("no-api-token-here"),
        "the server's secrets do not reach builds"
    );

    let names = api.artifact_names(&id).await;
    assert_eq!(names.trim(), "sub/report.txt");
    let file = api
        .get(&format!("/api/v1/artifacts/{id}/sub/report.txt"))
        .await;
    assert_eq!(file.status(), 200);
    assert_eq!(file.text().await.unwrap(), "report\n");
    assert_eq!(
        api.get(&format!("/api/v1/artifacts/{id}/sub/../../etc/passwd"))
            .await
            .status(),
        400
    );
    assert_eq!(
        api.get(&format!("/api/v1/artifacts/{id}/nope.txt"))
            .await
            .status(),
        404
    );
    let tarball = api
        .get(&format!("/api/v1/artifacts/{id}"))
        .await
        .bytes()
        .await
        .unwrap();
    let fallback = api
        .get(&format!("/api/v1/artifacts/{id}?presigned=true"))
        .await;
    assert_eq!(
        fallback.status(),
        200,
        "files cannot presign: the download streams as usual"
    );
    assert_eq!(fallback.bytes().await.unwrap(), tarball);
    assert_eq!(
        api.get(&format!("/api/v1/artifacts/{id}?presigned=maybe"))
            .await
            .status(),
        400
    );
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&tarball[..]));
    let mut found = false;
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        if e.path().unwrap().ends_with("sub/report.txt") {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            found = s == "report\n";
        }
    }
    assert!(found, "the tarball holds the artifact");

    let history = api.json("/api/v1/builds/acme/widgets").await;
    assert_eq!(history["builds"][0]["id"], id.as_str());
    let locks = api.json("/api/v1/locks").await;
    assert!(
        locks["locks"].as_array().unwrap().is_empty(),
        "the lock is released"
    );

    // SSE replays the stored log with offsets and ends
    let sse = api
        .get(&format!("/api/v1/logs/{id}/events"))
        .await
        .text()
        .await
        .unwrap();
    assert!(sse.contains("event: status"));
    assert!(sse.contains(&format!("data: building acme/widgets main {SHA}")));
    assert!(sse.contains("event: end"));
    // a viewer that reconnects with Last-Event-ID resumes after the lines it had
    // (the event of the script's first line: the local executor's note
    // about the build image comes before it)
    let first_id: u64 = sse
        .split("\n\n")
        .find(|event| event.contains("data: building"))
        .and_then(|event| event.lines().find_map(|l| l.strip_prefix("id: ")))
        .unwrap()
        .parse()
        .unwrap();
    let resumed = api
        .http
        .get(format!("{}/api/v1/logs/{id}/events", decap.url))
        .header("last-event-id", first_id.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !resumed.contains("data: building"),
        "no line is sent twice: {resumed}"
    );
    assert!(
        resumed.contains("data: to-stderr"),
        "the rest follows: {resumed}"
    );

    // what an ended build left is final: even the API token cannot replace it
    let put = api
        .http
        .put(format!("{}/api/v1/artifacts/{id}", decap.url))
        .bearer_auth(common::TOKEN)
        .body("a replacement")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 409);
    assert!(put.text().await.unwrap().contains("final"));
    assert_eq!(api.get("/healthz").await.status(), 200);

    // rerun: same ref and commit
    let r = api
        .send(Method::POST, &format!("/api/v1/build/{id}/rerun"))
        .await;
    assert_eq!(r.status(), 202);
    let rerun: serde_json::Value = r.json().await.unwrap();
    let again = api.finished(rerun["id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(
        (
            again["commit"].as_str(),
            again["trigger"].as_str(),
            again["rerunOf"].as_str()
        ),
        (Some(SHA), Some("rerun"), Some(id.as_str()))
    );
    assert_eq!(again["status"], "succeeded");
}

#[tokio::test]
async fn failures_timeouts_and_cancels_end_as_they_should() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/fails",
        r#"{"buildImage": "x"}"#,
        "echo about to fail\nexit 3\n",
    );
    project(
        &scripts,
        "acme/hangs",
        r#"{"buildImage": "x", "buildTimeoutSeconds": 1}"#,
        "echo started\nsleep 600\n",
    );
    project(
        &scripts,
        "acme/long",
        r#"{"buildImage": "x"}"#,
        "echo started\nsleep 600\n",
    );
    project(
        &scripts,
        "acme/stubborn",
        r#"{"buildImage": "x", "buildTimeoutSeconds": 1}"#,
        "trap '' TERM\necho ignoring TERM\nwhile true; do sleep 0.1; done\n",
    );
    let decap = Decap::start(&data, &scripts, &[]);
    let api = decap.api();

    let failed = api.request("acme/fails", &["main"]).await;
    let b = api.finished(&failed[0], MINUTE).await;
    assert_eq!(
        (b["status"].as_str(), b["exitCode"].as_i64()),
        (Some("failed"), Some(3))
    );

    let hung = api.request("acme/hangs", &["main"]).await;
    let b = api.finished(&hung[0], MINUTE).await;
    assert_eq!(b["status"], "timed_out", "{b}");
    let log = api
        .get(&format!("/api/v1/logs/{}", hung[0]))
        .await
        .text()
        .await
        .unwrap();
    assert!(log.contains("started"));

    // a script that ignores TERM is killed after the grace period
    let stubborn = api.request("acme/stubborn", &["main"]).await;
    let b = api.finished(&stubborn[0], MINUTE).await;
    assert_eq!(b["status"], "timed_out", "{b}");

    let long = api.request("acme/long", &["main"]).await;
    let id = &long[0];
    eventually("the long build to print", MINUTE, || async {
        let text = api.log(id).await;
        text.contains("started").then_some(())
    })
    .await;
    let r = api
        .send(Method::DELETE, &format!("/api/v1/build/{id}"))
        .await;
    assert_eq!(r.status(), 202);
    let b = api.build(id).await;
    assert_eq!(b["status"], "cancelled");
    // the environment goes: no sleep of this build survives
    // No process of the cancelled build is left (it ended only once none was).
    let needle = format!("BUILD_ID={id}");
    let alive = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(alive, 0, "a process of the cancelled build is left");
    assert!(
        api.json("/api/v1/locks").await["locks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_flood_of_output_is_capped_and_the_server_stays_responsive() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/flood",
        r#"{"buildImage": "x"}"#,
        "head -c 20000000 /dev/zero | tr '\\0' 'x'\necho\necho done\n",
    );
    // With no warm bctools, every build starts cold: that path is tested here.
    let decap = Decap::start(
        &data,
        &scripts,
        &["--max-log-bytes", "1000000", "--warm-standbys", "0"],
    );
    let api = decap.api();
    let ids = api.request("acme/flood", &["main"]).await;
    let mut worst = Duration::ZERO;
    loop {
        let t = Instant::now();
        assert_eq!(api.get("/healthz").await.status(), 200);
        worst = worst.max(t.elapsed());
        let b = api.build(&ids[0]).await;
        if b["status"] != "running" && b["status"] != "queued" {
            assert_eq!(b["status"], "succeeded");
            assert!(
                b["message"].as_str().unwrap_or("").contains("truncated"),
                "{b}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        worst < Duration::from_secs(2),
        "healthz took {worst:?} during the flood"
    );
    let log = api
        .get(&format!("/api/v1/logs/{}", ids[0]))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        log.len() < 1_100_000,
        "the log is capped ({} bytes)",
        log.len()
    );
    assert!(
        log.contains("[decap: the console log reached its cap"),
        "with a clear marker"
    );
}

#[tokio::test]
async fn caps_defer_builds_and_finishing_builds_resubmit_them_at_once() {
    let (_dir, scripts, data) = dirs();
    for p in ["a", "b", "c"] {
        project(
            &scripts,
            &format!("acme/{p}"),
            r#"{"buildImage": "x"}"#,
            "sleep 0.3\necho ran\n",
        );
    }
    let decap = Decap::start(&data, &scripts, &["--max-builds", "1"]);
    let api = decap.api();
    let mut ids = Vec::new();
    for p in ["a", "b", "c"] {
        ids.extend(api.request(&format!("acme/{p}"), &["main"]).await);
    }
    let deferred = api.json("/api/v1/deferred").await;
    let waiting = deferred["deferred"].as_array().unwrap();
    assert_eq!(waiting.len(), 2, "{deferred}");
    assert!(
        waiting[0]["reason"]
            .as_str()
            .unwrap()
            .contains("global cap")
    );
    let mut spans = Vec::new();
    for id in &ids {
        let b = api.finished(id, MINUTE).await;
        assert_eq!(b["status"], "succeeded");
        spans.push((
            b["startTime"].as_str().unwrap().to_owned(),
            b["endTime"].as_str().unwrap().to_owned(),
        ));
    }
    let stats = api.json("/api/v1/stats/acme/a").await;
    assert_eq!(stats["builds"], 1, "{stats}");
    assert_eq!(stats["succeeded"], 1, "{stats}");
    assert_eq!(stats["failureRate"], 0.0, "{stats}");
    assert!(
        stats["averageDurationMs"].as_i64().unwrap() >= 300,
        "{stats}"
    );
    assert_eq!(stats["durations"].as_array().unwrap().len(), 1, "{stats}");
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "builds overlapped under a cap of one: {spans:?}"
        );
    }

    // the queue closed for maintenance defers, and opening it resumes
    let close = api
        .http
        .put(format!("{}/api/v1/queue", decap.url))
        .bearer_auth(common::TOKEN)
        .json(&serde_json::json!({"state": "closed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(close.status(), 200);
    let held = api.request("acme/a", &["main"]).await;
    assert_eq!(api.build(&held[0]).await["status"], "deferred");
    let open = api
        .http
        .put(format!("{}/api/v1/queue", decap.url))
        .bearer_auth(common::TOKEN)
        .json(&serde_json::json!({"state": "open"}))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    assert_eq!(api.finished(&held[0], MINUTE).await["status"], "succeeded");
}

#[tokio::test]
async fn a_killed_server_adopts_its_running_builds_on_restart_and_resumes_the_queue() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/slow",
        r#"{"buildImage": "x"}"#,
        "echo first line\nsleep 600\n",
    );
    project(
        &scripts,
        "acme/quick",
        r#"{"buildImage": "x"}"#,
        "echo quick\n",
    );
    // Unsandboxed builds reach the server at its address: the same after
    // the restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("DECAP_LISTEN", listen.as_str())];
    let mut decap = Decap::start_with_env(&data, &scripts, &[], &env);
    let api = decap.api();
    let slow = api.request("acme/slow", &["main"]).await;
    eventually("the slow build to print", MINUTE, || async {
        let text = api
            .get(&format!("/api/v1/logs/{}", slow[0]))
            .await
            .text()
            .await
            .unwrap();
        text.contains("first line").then_some(())
    })
    .await;
    // a second build of the same branch waits behind the lock
    let waiting = api.request("acme/slow", &["main"]).await;
    assert_eq!(api.build(&waiting[0]).await["status"], "deferred");
    decap.kill();

    // The build ran on: the new server adopts it, with its lock and log.
    let decap = Decap::start_with_env(&data, &scripts, &[], &env);
    let api = decap.api();
    let b = api.build(&slow[0]).await;
    assert_eq!(b["status"], "running", "{b}");
    assert_eq!(api.build(&waiting[0]).await["status"], "deferred");
    let log = api
        .get(&format!("/api/v1/logs/{}", slow[0]))
        .await
        .text()
        .await
        .unwrap();
    assert!(log.contains("first line"), "the live log was kept: {log}");
    assert_eq!(
        api.send(Method::DELETE, &format!("/api/v1/build/{}", slow[0]))
            .await
            .status(),
        202
    );
    assert_eq!(api.finished(&slow[0], MINUTE).await["status"], "cancelled");
    // the deferred build resumed: it runs (and would run 600 s), so cancel it
    eventually("the deferred build to resume", MINUTE, || async {
        (api.build(&waiting[0]).await["status"] == "running").then_some(())
    })
    .await;
    let locks = api.json("/api/v1/locks").await;
    assert_eq!(
        locks["locks"][0]["buildId"],
        waiting[0].as_str(),
        "the adopted build's lock was released and taken by the next build"
    );
    assert_eq!(
        api.send(Method::DELETE, &format!("/api/v1/build/{}", waiting[0]))
            .await
            .status(),
        202
    );
    let quick = api.request("acme/quick", &["main"]).await;
    assert_eq!(api.finished(&quick[0], MINUTE).await["status"], "succeeded");
}

#[tokio::test]
async fn live_logs_stream_while_the_build_runs() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/live",
        r#"{"buildImage": "x"}"#,
        "echo one\nsleep 1\necho two\n",
    );
    let decap = Decap::start(&data, &scripts, &[]);
    let api = decap.api();
    let ids = api.request("acme/live", &["main"]).await;
    let mut resp = api
        .get(&format!("/api/v1/logs/{}?follow=true", ids[0]))
        .await;
    let mut text = String::new();
    let mut saw_one_while_running = false;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("one") && !text.contains("two") {
            saw_one_while_running = api.build(&ids[0]).await["status"] == "running";
        }
    }
    assert!(
        saw_one_while_running,
        "the first line arrived while the build ran"
    );
    assert_eq!(common::script_lines(&text), "one\ntwo\n");
}

#[tokio::test]
async fn decapctl_talks_to_the_server_and_explains_when_it_is_down() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/ctl",
        r#"{"buildImage": "x"}"#,
        "echo from-ctl\necho made by ctl > \"$ARTIFACTS_DIR/ctl.txt\"\n",
    );
    let decap = Decap::start(&data, &scripts, &[]);
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
            .args(["--server", &decap.url, "--token", common::TOKEN])
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["--json", "build", "acme/ctl", "main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["builds"][0]["id"].as_str().unwrap().to_owned();
    let out = ctl(&["builds", "logs", "--follow", &id]);
    assert!(out.status.success());
    assert_eq!(
        common::script_lines(&String::from_utf8_lossy(&out.stdout)),
        "from-ctl\n"
    );
    let out = ctl(&["builds", "list", "acme/ctl"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("succeeded"));
    let out = ctl(&["builds", "artifacts", &id, "--list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ctl.txt\n");
    let target = data.join("ctl-download.txt");
    let out = ctl(&[
        "builds",
        "artifacts",
        &id,
        "ctl.txt",
        "-o",
        target.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "made by ctl\n");
    let tarball = data.join("all.tar.gz");
    let out = ctl(&["builds", "artifacts", &id, "-o", tarball.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(std::fs::metadata(&tarball).unwrap().len() > 0);
    let out = ctl(&["loglevel", "debug"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["loglevel", "no such level=="]);
    assert!(!out.status.success(), "an invalid level is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid level"));
    let out = ctl(&["--json", "queue", "close"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("closed"));
    let out = ctl(&["queue", "open"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "queue is open\n");
    let no_token = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["--server", &decap.url, "cancel", &id])
        .env_remove("DECAP_API_TOKEN")
        .output()
        .unwrap();
    assert!(!no_token.status.success());
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("HTTP 401"));
    let out = ctl(&["builds", "show", "00000000-0000-0000-0000-000000000000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let down = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["--server", "http://127.0.0.1:9", "locks", "list"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        err.contains("cannot reach Decap at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(err.contains("decap serve"), "{err}");
}

#[tokio::test]
async fn a_sandboxed_build_cannot_see_the_data_dir_and_says_it_was_sandboxed() {
    let usable = decap_embedded::bubblewrap_works();
    assert!(
        usable,
        "bubblewrap is needed for this test: apt-get install bubblewrap (tests/run installs it)"
    );
    let (_dir, scripts, data) = dirs();
    let descriptor = format!(
        r#"{{"buildImage": "x", "env": {{"DATA": "{}"}}}}"#,
        data.display()
    );
    project(
        &scripts,
        "acme/boxed",
        &descriptor,
        "#!/bin/sh
if ls \"$DATA/decap.db\" >/dev/null 2>&1; then echo data-visible; else echo data-hidden; fi
echo pid=$$
echo boxed > \"$ARTIFACTS_DIR/out.txt\"
",
    );
    let decap = Decap::start(&data, &scripts, &["--sandbox", "bubblewrap"]);
    let api = decap.api();
    let ids = api.request("acme/boxed", &["main"]).await;
    let b = api.finished(&ids[0], MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(
        b["sandbox"], "bubblewrap",
        "the record says the build was sandboxed"
    );
    let log = api
        .get(&format!("/api/v1/logs/{}", ids[0]))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("data-hidden"),
        "the data dir is hidden from builds: {log}"
    );
    let pid: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(pid < 10, "the build has its own PID namespace (pid {pid})");
    let file = api
        .get(&format!("/api/v1/artifacts/{}/out.txt", ids[0]))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(file, "boxed\n");
}

#[tokio::test]
async fn the_build_scripts_are_read_again_on_request() {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/first", r#"{"buildImage": "x"}"#, "true\n");
    let decap = Decap::start(&data, &scripts, &[]);
    let api = decap.api();
    let names = |v: serde_json::Value| -> Vec<String> {
        v["projects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["project"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(api.json("/api/v1/projects").await), vec!["first"]);
    project(&scripts, "acme/second", r#"{"buildImage": "x"}"#, "true\n");
    let unauthenticated = api
        .http
        .post(format!("{}/hooks/buildscripts", decap.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        unauthenticated.status(),
        401,
        "a refresh needs a signature or the token"
    );
    let r = api.send(Method::POST, "/hooks/buildscripts").await;
    assert_eq!(r.status(), 202);
    eventually("the new project to be listed", MINUTE, || async {
        (names(api.json("/api/v1/projects").await) == vec!["first", "second"]).then_some(())
    })
    .await;
    // a refresh that breaks one project lists its error and keeps the others
    std::fs::write(scripts.join("acme/first/project.json"), "{ broken").unwrap();
    api.send(Method::POST, "/hooks/buildscripts").await;
    eventually("the broken project to show its error", MINUTE, || async {
        let v = api.json("/api/v1/projects").await;
        let first = v["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["project"] == "first")
            .cloned()
            .unwrap();
        first["error"].is_string().then_some(())
    })
    .await;
    let ids = api.request("acme/second", &["main"]).await;
    assert_eq!(api.finished(&ids[0], MINUTE).await["status"], "succeeded");
}

#[tokio::test]
async fn a_deferred_build_of_a_project_that_left_the_build_scripts_ends_errored_and_frees_its_place()
 {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/busy", r#"{"buildImage": "x"}"#, "sleep 1\n");
    project(&scripts, "acme/gone", r#"{"buildImage": "x"}"#, "true\n");
    let decap = Decap::start(&data, &scripts, &["--max-builds", "1"]);
    let api = decap.api();
    let busy = api.request("acme/busy", &["main"]).await;
    let gone = api.request("acme/gone", &["main"]).await;
    assert_eq!(api.build(&gone[0]).await["status"], "deferred");

    // The project leaves the build scripts while its build waits.
    std::fs::remove_dir_all(scripts.join("acme/gone")).unwrap();
    assert_eq!(
        api.send(Method::POST, "/hooks/buildscripts").await.status(),
        202
    );
    eventually("the project to leave the catalog", MINUTE, || async {
        let v = api.json("/api/v1/projects").await;
        let names: Vec<&str> = v["projects"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["project"].as_str())
            .collect();
        (!names.contains(&"gone")).then_some(())
    })
    .await;

    assert_eq!(api.finished(&busy[0], MINUTE).await["status"], "succeeded");
    let b = api.finished(&gone[0], MINUTE).await;
    assert_eq!(b["status"], "errored", "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("no longer in the build scripts"),
        "{b}"
    );
    // Its queue entry goes right after its end is stored.
    eventually("the queue to let it go", MINUTE, || async {
        api.json("/api/v1/deferred").await["deferred"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    eventually("no lock left behind", MINUTE, || async {
        api.json("/api/v1/locks").await["locks"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
}

/// A receiver of project status webhooks: records each post's `payload`
/// and, when `hang` is set, never answers.
async fn status_receiver(
    hang: bool,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    use axum::extract::{Form, State};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route(
            "/status",
            axum::routing::post(
                move |State(tx): State<tokio::sync::mpsc::UnboundedSender<serde_json::Value>>,
                      Form(form): Form<std::collections::HashMap<String, String>>| async move {
                    let payload: serde_json::Value =
                        serde_json::from_str(form.get("payload").unwrap()).unwrap();
                    tx.send(payload).unwrap();
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    "ok"
                },
            ),
        )
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/status", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

#[tokio::test]
async fn each_change_of_a_project_is_posted_to_its_status_webhooks_without_status_urls() {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/widgets", r#"{"buildImage": "x"}"#, "true\n");
    let (url, mut received) = status_receiver(false).await;
    let (hanging, mut hung) = status_receiver(true).await;
    let hooks = format!("{hanging},{url}");
    let decap = Decap::start_with_env(&data, &scripts, &[], &[("DECAP_HUB_WEBHOOKS", &hooks)]);
    let api = decap.api();
    let post = |status: &'static str| {
        let api = api.clone();
        async move {
            api.http
                .post(format!("{}/api/build_status", api.base))
                .form(&[
                    ("token", common::TOKEN),
                    ("name", "tests"),
                    ("repository", "https://github.com/acme/pipeline.git"),
                    ("revision", "ea75a9c817757f1ebe09be035c807b7fe23499a0"),
                    ("status_url", "https://ci.example.com/secret-console/1"),
                    ("status", status),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    // The first webhook never answers: the API answers all the same, and the
    // second webhook is still told (after the first's 10-second limit).
    let r = post("building").await;
    assert_eq!(r.status(), 200);
    let first = hung.recv().await.unwrap();
    assert_eq!(first["project_name"], "pipeline");
    let payload = tokio::time::timeout(MINUTE, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payload["project_removed"], false);
    let rev = &payload["latest_revisions"][0];
    assert_eq!(rev["hash"], "ea75a9c817757f1ebe09be035c807b7fe23499a0");
    assert_eq!(rev["short_name"], "ea75a9");
    assert_eq!(rev["builds"][0]["name"], "tests");
    assert_eq!(rev["builds"][0]["status"], "building");
    assert!(
        !payload.to_string().contains("secret-console"),
        "status URLs never reach webhooks: {payload}"
    );

    // Removing the project is a change too.
    let r = api
        .http
        .delete(format!("{}/api/projects/pipeline", api.base))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let payload = tokio::time::timeout(MINUTE, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payload["project_removed"], true);
    assert_eq!(payload["latest_revisions"], serde_json::json!([]));
}

#[tokio::test]
async fn the_binaries_and_the_api_name_the_same_version_and_commit() {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/widgets", r#"{"buildImage": "x"}"#, "true\n");
    let decap = Decap::start(&data, &scripts, &[]);
    let v = decap.api().json("/api/v1/version").await;
    let (version, commit) = (
        v["version"].as_str().unwrap(),
        v["commit"].as_str().unwrap(),
    );
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert_ne!(commit, "", "{v}");
    let expected = format!("{version} ({commit})");
    for (bin, name) in [
        (env!("CARGO_BIN_EXE_decap"), "decap"),
        (env!("CARGO_BIN_EXE_decapctl"), "decapctl"),
    ] {
        let out = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {expected}")
        );
    }
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["version", "--server", &decap.url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ctl.stdout).trim(),
        format!("decap {expected}")
    );
}

#[test]
fn decapctl_prints_completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_decapctl()"),
        ("zsh", "#compdef decapctl"),
        ("fish", "complete -c decapctl"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("builds") && script.contains("secrets"),
            "{shell}"
        );
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
}

#[tokio::test]
async fn a_data_dir_of_the_previous_release_is_kept_and_goes_on() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x"}"#,
        "echo \"building $BRANCH_TO_BUILD\"\n",
    );
    // The database as decap 0.0.0 left it (tests/fixtures/sqlite).
    std::fs::create_dir_all(&data).unwrap();
    let dump = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/sqlite/decap-0.0.0.sql"),
    )
    .unwrap();
    rusqlite::Connection::open(data.join("decap.db"))
        .unwrap()
        .execute_batch(&dump)
        .unwrap();
    let decap = Decap::start(&data, &scripts, &[]);
    let api = decap.api();
    let status_of = |v: &serde_json::Value, branch: &str| {
        v["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["branch"] == branch)
            .map(|b| b["status"].as_str().unwrap().to_owned())
    };
    let v = api.json("/api/v1/builds/acme/widgets").await;
    assert_eq!(status_of(&v, "main").as_deref(), Some("succeeded"), "{v}");
    assert_eq!(status_of(&v, "fails").as_deref(), Some("failed"), "{v}");
    assert_eq!(status_of(&v, "waits").as_deref(), Some("deferred"), "{v}");
    // Its queue was closed, and stays closed; opened, the build that
    // waited runs.
    assert_eq!(api.json("/api/v1/queue").await["state"], "closed");
    let opened = api
        .http
        .put(format!("{}/api/v1/queue", api.base))
        .bearer_auth(common::TOKEN)
        .json(&serde_json::json!({"state": "open"}))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), 200);
    let waits = v["builds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["branch"] == "waits")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = api.finished(&waits, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    drop(decap);
    let version: i64 = rusqlite::Connection::open(data.join("decap.db"))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, decap_embedded::SCHEMA_VERSION);
}

#[test]
fn a_data_dir_of_a_newer_release_is_refused_untouched() {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/widgets", r#"{"buildImage": "x"}"#, "true\n");
    std::fs::create_dir_all(&data).unwrap();
    let db = rusqlite::Connection::open(data.join("decap.db")).unwrap();
    db.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
        .unwrap();
    drop(db);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_decap"))
        .args(["serve", "--listen", "127.0.0.1:0", "--sandbox", "none"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--scripts")
        .arg(&scripts)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("written by a newer Decap (schema 99"), "{err}");
    let tables: i64 = rusqlite::Connection::open(data.join("decap.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 1, "nothing was created in it");
}

#[tokio::test]
async fn the_project_page_offers_each_branch_once_built_ones_first_then_the_repositorys_others() {
    let (dir, scripts, data) = dirs();
    // A real repository, local: main and feature/x.
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["commit", "-q", "--allow-empty", "-m", "first"]);
    git(&["branch", "feature/x"]);
    project(
        &scripts,
        "acme/repo",
        &serde_json::json!({"buildImage": "x", "repoUrl": repo.to_str().unwrap()}).to_string(),
        "true\n",
    );
    let decap = Decap::start(&data, &scripts, &[]);
    let api = decap.api();
    let id = api.request("acme/repo", &["main"]).await.remove(0);
    api.finished(&id, Duration::from_secs(60)).await;
    let page = api.get("/projects/acme/repo").await.text().await.unwrap();
    assert!(
        page.contains("<span>main</span>"),
        "main, built lately, is listed: {page}"
    );
    // The durations chart has its scale (0 to the longest build) and says
    // which end is the oldest.
    for label in [
        r#"text-anchor="end">0</text>"#,
        ">oldest</text>",
        ">newest</text>",
        "on a scale up to ",
    ] {
        assert!(page.contains(label), "{label} on the chart: {page}");
    }
    assert!(
        page.contains("/ui/refs/acme/repo"),
        "the page asks for the repository's refs"
    );
    let refs = api.get("/ui/refs/acme/repo").await.text().await.unwrap();
    assert!(refs.contains("<span>feature/x</span>"), "{refs}");
    assert!(
        !refs.contains("<span>main</span>"),
        "main is not offered twice: {refs}"
    );
}

/// The shipped example that builds a real git repository, in the sandbox
/// as `decap serve` runs it by default: each branch is cloned from the
/// repository and its own tests decide the result.
#[tokio::test]
async fn the_shipped_repository_example_builds_each_branch_from_its_repository() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/build-scripts");
    let decap = Decap::start(&dir.path().join("data"), &examples, &["--sandbox", "auto"]);
    let api = decap.api();
    let ids = api
        .request(
            "examples/from-a-repository",
            &["main", "feature/shout", "feature/typo"],
        )
        .await;
    for (id, (status, words)) in ids.iter().zip([
        (
            "succeeded",
            "building main at 1ad8c8e: A greeter and its tests",
        ),
        (
            "succeeded",
            "building feature/shout at a1b4253: Shout when asked",
        ),
        ("failed", "FAIL: greet 'Ada' says 'Helo, Ada!'"),
    ]) {
        let b = api.finished(id, MINUTE).await;
        let log = api.log(id).await;
        assert_eq!(b["status"], status, "{b}\n{log}");
        assert!(log.contains(words), "{log}");
        if status == "succeeded" {
            assert!(api.artifact_names(id).await.contains("greet.sh"));
        }
    }
}
