//! Containment, tried as an attacker would: the real `decap` binary with its
//! sandbox (bubblewrap, a user namespace, slirp4netns, cgroups), run as root
//! in CI. Each test is one attack of the containment issue.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Decap, eventually, project};
use reqwest::Method;

const MINUTE: Duration = Duration::from_secs(60);

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    let data = dir.path().join("data");
    (dir, scripts, data)
}

fn sandboxed(data: &std::path::Path, scripts: &std::path::Path, extra: &[&str]) -> Decap {
    let mut args = vec!["--sandbox", "auto"];
    args.extend_from_slice(extra);
    Decap::start(data, scripts, &args)
}

async fn log_of(api: &common::Api, id: &str) -> String {
    api.get(&format!("/api/v1/logs/{id}"))
        .await
        .text()
        .await
        .unwrap()
}

/// The machine's own non-loopback IPv4 address (where a service bound to
/// every address answers).
fn host_address() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9").unwrap();
    s.local_addr().unwrap().ip()
}

#[tokio::test]
async fn a_build_cannot_take_the_host_see_the_data_dir_or_reach_the_hosts_loopback() {
    let (_dir, scripts, data) = dirs();
    // A service only the host may use, on its loopback.
    let private = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let private_port = private.local_addr().unwrap().port();
    // A service on the network: outbound connections reach it.
    let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let public_port = public.local_addr().unwrap().port();
    let marker = format!("/decap-escape-{}", std::process::id());
    let descriptor = format!(
        r#"{{"buildImage": "x", "env": {{"DATA": "{}", "PRIVATE": "{private_port}", "PUBLIC": "{}:{public_port}", "MARKER": "{marker}"}}}}"#,
        data.display(),
        host_address()
    );
    project(
        &scripts,
        "acme/probe",
        &descriptor,
        r#"#!/bin/bash
echo "id: $(id -u)"
grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status
grep NoNewPrivs /proc/self/status
mount -o remount,bind,rw / 2>/dev/null && echo REMOUNTED || echo remount-refused
touch "$MARKER" 2>/dev/null && echo WROTE-ROOT || echo root-read-only
mkdir -p /tmp/x; mount --bind / /tmp/x 2>/dev/null && echo BIND-MOUNTED || echo bind-refused
unshare -U true 2>/dev/null && echo USERNS || echo no-nested-userns
cat "$DATA/decap.db" >/dev/null 2>&1 && echo DATA-VISIBLE || echo data-hidden
ls /work /root /home 2>/dev/null | head -1 | grep -q . && echo HOST-FILES || echo host-hidden
echo "processes: $(ls /proc | grep -c '^[0-9]')"
cat /proc/*/environ 2>/dev/null | tr '\0' '\n' | grep -c DECAP_API_TOKEN= | sed 's/^/server-env-lines: /'
(exec 3<>"/dev/tcp/127.0.0.1/$PRIVATE") 2>/dev/null && echo LOOPBACK-REACHED || echo loopback-refused
(exec 3<>"/dev/tcp/10.0.2.2/$PRIVATE") 2>/dev/null && echo GATEWAY-REACHED || echo gateway-refused
(exec 3<>"/dev/tcp/${PUBLIC%:*}/${PUBLIC#*:}") 2>/dev/null && echo outbound-ok || echo OUTBOUND-FAILED
code=$(curl -s -o /dev/null -w '%{http_code}' "$DECAP_URL/healthz")
echo "decap-channel: $code"
"#,
    );
    let decap = sandboxed(&data, &scripts, &[]);
    let api = decap.api();
    let ids = api.request("acme/probe", &["main"]).await;
    let b = api.finished(&ids[0], MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["sandbox"], "bubblewrap");
    let log = log_of(&api, &ids[0]).await;
    let uid: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        uid >= 1_000_000,
        "the build runs as an unprivileged id: {log}"
    );
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            log.contains(&format!("{cap}:\t0000000000000000")),
            "{cap} is empty: {log}"
        );
    }
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    for expected in [
        "remount-refused",
        "root-read-only",
        "bind-refused",
        "no-nested-userns",
        "data-hidden",
        "host-hidden",
        "server-env-lines: 0",
        "loopback-refused",
        "gateway-refused",
        "outbound-ok",
        "decap-channel: 200",
    ] {
        assert!(log.contains(expected), "{expected}: {log}");
    }
    let processes: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("processes: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        processes < 10,
        "the build sees only its own processes: {log}"
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "nothing was written on the host"
    );
    drop(private);
    drop(public);
}

#[tokio::test]
async fn a_build_with_no_network_still_reaches_decap() {
    let (_dir, scripts, data) = dirs();
    let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let descriptor = format!(
        r#"{{"buildImage": "x", "network": "none", "env": {{"PUBLIC": "{}:{}"}}}}"#,
        host_address(),
        public.local_addr().unwrap().port()
    );
    project(
        &scripts,
        "acme/offline",
        &descriptor,
        r#"#!/bin/bash
(exec 3<>"/dev/tcp/${PUBLIC%:*}/${PUBLIC#*:}") 2>/dev/null && echo NETWORK || echo no-network
echo "decap-channel: $(curl -s -o /dev/null -w '%{http_code}' "$DECAP_URL/healthz")"
"#,
    );
    // One warm environment: the build takes it and its network goes.
    let decap = sandboxed(&data, &scripts, &["--warm-standbys", "1"]);
    let api = decap.api();
    for _ in 0..2 {
        let ids = api.request("acme/offline", &["main"]).await;
        let b = api.finished(&ids[0], MINUTE).await;
        assert_eq!(b["status"], "succeeded", "{b}");
        let log = log_of(&api, &ids[0]).await;
        assert!(log.contains("no-network"), "{log}");
        assert!(log.contains("decap-channel: 200"), "{log}");
    }
}

#[tokio::test]
async fn limits_hold_each_named_and_other_builds_run_on() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/forkbomb",
        r#"{"buildImage": "x", "resources": {"pids": 64}}"#,
        "#!/bin/bash\necho bombing\nb() { b | b & }; b\nsleep 300\n",
    );
    project(
        &scripts,
        "acme/filler",
        r#"{"buildImage": "x", "resources": {"disk": "64Mi"}}"#,
        "#!/bin/bash\necho filling\ndd if=/dev/zero of=/tmp/big bs=1M count=2048\ndd if=/dev/zero of=big bs=1M count=2048\nsleep 300\n",
    );
    project(
        &scripts,
        "acme/hog",
        r#"{"buildImage": "x", "resources": {"memory": "64Mi"}}"#,
        "#!/bin/bash\necho hogging\nhead -c 1G /dev/zero | tail\nsleep 300\n",
    );
    project(
        &scripts,
        "acme/calm",
        r#"{"buildImage": "x"}"#,
        "#!/bin/bash\nfor i in $(seq 1 30); do echo tick $i; sleep 0.1; done\n",
    );
    let decap = sandboxed(&data, &scripts, &[]);
    let api = decap.api();
    let started = Instant::now();
    let bomb = api.request("acme/forkbomb", &["main"]).await;
    let filler = api.request("acme/filler", &["main"]).await;
    let hog = api.request("acme/hog", &["main"]).await;
    let calm = api.request("acme/calm", &["main"]).await;
    for (ids, named) in [
        (&bomb, "limit of 64 processes"),
        (&filler, "workspace reached its limit of 64 MiB"),
        (&hog, "memory limit of 64 MiB"),
    ] {
        let b = api.finished(&ids[0], MINUTE).await;
        assert_eq!(b["status"], "failed", "{b}");
        assert!(
            b["message"].as_str().unwrap_or_default().contains(named),
            "{named}: {b}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "a build past a limit is stopped, not left to its timeout"
    );
    let b = api.finished(&calm[0], MINUTE).await;
    assert_eq!(b["status"], "succeeded", "the other builds run on: {b}");
    assert!(log_of(&api, &calm[0]).await.contains("tick 30"));
    // Nothing was written past the limit on the host's disk: the workspace
    // was a filesystem of its own, and it is gone.
    let leftovers: Vec<_> = std::fs::read_dir("/var/lib/decap")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| std::fs::read_dir(d.path().join("work")).ok())
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(filler[0].as_str())
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Processes whose environment names this build.
fn processes_of(build: &str) -> usize {
    let needle = format!("BUILD_ID={build}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test]
async fn a_reported_result_ends_the_builds_processes_before_its_lock_and_place_are_freed() {
    let (_dir, scripts, data) = dirs();
    // The script reports success, then goes on (with a child of its own).
    project(
        &scripts,
        "acme/lingers",
        r#"{"buildImage": "x"}"#,
        "#!/bin/bash\necho start\nsleep 300 &\nbctool record-build-metadata --exit-code 0\necho reported\nwhile true; do sleep 0.1; done\n",
    );
    let decap = sandboxed(&data, &scripts, &["--max-builds", "1"]);
    let api = decap.api();
    let first = api.request("acme/lingers", &["main"]).await;
    eventually("the first build to run", MINUTE, || async {
        (processes_of(&first[0]) > 0).then_some(())
    })
    .await;
    // A second build of the same branch, and a third of another: the cap
    // and the lock hold them until the first is gone.
    let second = api.request("acme/lingers", &["main"]).await;
    let third = api.request("acme/lingers", &["other"]).await;
    let b = api.finished(&first[0], MINUTE).await;
    assert_eq!(b["status"], "succeeded", "its reported result: {b}");
    assert_eq!(
        processes_of(&first[0]),
        0,
        "no process of an ended build is left"
    );
    let mut ended = b["endTime"].as_str().unwrap().to_owned();
    // One at a time, each after the one before it has ended.
    let mut waiting = vec![second[0].clone(), third[0].clone()];
    while !waiting.is_empty() {
        let (i, b) = eventually("the next build to start", MINUTE, || async {
            for (i, id) in waiting.iter().enumerate() {
                let b = api.build(id).await;
                if b["startTime"].is_string() {
                    return Some((i, b));
                }
            }
            None
        })
        .await;
        let id = waiting.remove(i);
        assert!(
            b["startTime"].as_str().unwrap() >= ended.as_str(),
            "{} started before the build before it ended ({ended})",
            b["startTime"]
        );
        eventually("the build to report", MINUTE, || async {
            let text = api
                .get(&format!("/api/v1/logs/{id}"))
                .await
                .text()
                .await
                .unwrap();
            text.contains("reported").then_some(())
        })
        .await;
        api.send(Method::DELETE, &format!("/api/v1/build/{id}"))
            .await;
        let b = api.finished(&id, MINUTE).await;
        // It reported success before its leftovers were stopped: the first
        // outcome reported is the build's.
        assert_eq!(b["status"], "succeeded", "{b}");
        assert_eq!(processes_of(&id), 0, "a cancel leaves no process");
        ended = b["endTime"].as_str().unwrap().to_owned();
    }
}

#[tokio::test]
async fn a_builds_token_is_masked_in_its_log_and_refused_once_it_has_ended() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/leaky",
        r#"{"buildImage": "x"}"#,
        r#"#!/bin/bash
echo "plain: $DECAP_BUILD_TOKEN"
env | grep DECAP_BUILD_TOKEN
printf '%s' "split: ${DECAP_BUILD_TOKEN:0:10}"; printf '%s\n' "${DECAP_BUILD_TOKEN:10}"
echo -n "$DECAP_BUILD_TOKEN" | base64
echo "$DECAP_BUILD_TOKEN" | base64
set -x
: "$DECAP_BUILD_TOKEN"
set +x
printf '%s' "$DECAP_BUILD_TOKEN" > "$ARTIFACTS_DIR/stolen"
"#,
    );
    let decap = sandboxed(&data, &scripts, &[]);
    let api = decap.api();
    let ids = api.request("acme/leaky", &["main"]).await;
    let id = &ids[0];
    let b = api.finished(id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    let token = api
        .get(&format!("/api/v1/artifacts/{id}/stolen"))
        .await
        .text()
        .await
        .unwrap();
    assert!(token.len() >= 32, "{token:?}");
    let log = log_of(&api, id).await;
    use base64::Engine;
    for leak in [
        token.clone(),
        token[..20].to_owned(),
        base64::engine::general_purpose::STANDARD.encode(&token)[4..30].to_owned(),
        base64::engine::general_purpose::STANDARD.encode(format!("{token}\n"))[4..30].to_owned(),
    ] {
        assert!(!log.contains(&leak), "{leak} leaked: {log}");
    }
    assert!(log.contains("plain: ***"), "{log}");
    // The stream that followers read is the same masked text.
    let events = api
        .get(&format!("/api/v1/logs/{id}/events"))
        .await
        .text()
        .await
        .unwrap();
    assert!(!events.contains(&token));
    // The build is over: its token is worth nothing.
    for path in [
        format!("/api/v1/artifacts/{id}"),
        format!("/api/v1/logs/{id}"),
    ] {
        let r = api
            .http
            .put(format!("{}{path}", decap.url))
            .bearer_auth(&token)
            .body("backdoored release binary")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = api
        .http
        .post(format!("{}/api/v1/build/{id}/result", decap.url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"exitCode": 1, "timedOut": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(api.build(id).await["status"], "succeeded");
}

#[tokio::test]
async fn warm_sandboxes_outlive_the_threads_that_made_them() {
    // Warm environments are made in the background, on whichever thread:
    // none is tied to the thread that forked it (one made on a short-lived
    // thread used to be killed when that thread retired).
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/slow",
        r#"{"buildImage": "x"}"#,
        "#!/bin/bash\necho started; sleep 25; echo done\n",
    );
    project(
        &scripts,
        "acme/quick",
        r#"{"buildImage": "x"}"#,
        "#!/bin/bash\necho started; sleep 1.5; echo done\n",
    );
    let decap = sandboxed(&data, &scripts, &[]);
    let api = decap.api();
    let slow = api.request("acme/slow", &["main"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let quick = api.request("acme/quick", &["a", "b", "c"]).await;
    // Idle long enough for a runtime's blocking threads to retire.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let late = api.request("acme/quick", &["d"]).await;
    for id in slow.iter().chain(&quick).chain(&late) {
        let b = api.finished(id, MINUTE).await;
        assert_eq!(b["status"], "succeeded", "{b}");
        assert!(log_of(&api, id).await.contains("done"));
    }
}

#[tokio::test]
async fn without_a_sandbox_decap_refuses_to_start_unless_told_and_then_says_so() {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/x", r#"{"buildImage": "x"}"#, "true\n");
    // A PATH without bubblewrap: no sandbox can be made.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_decap"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--scripts")
        .arg(&scripts)
        .env("PATH", empty.path())
        .env("DECAP_BCTOOL", env!("CARGO_BIN_EXE_bctool"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no sandbox can be made"), "{err}");
    assert!(err.contains("--sandbox none"), "{err}");
    let decap = Decap::start(&data, &scripts, &["--sandbox", "none"]);
    let ready = decap.api().get("/readyz").await.text().await.unwrap();
    assert!(ready.contains("no sandbox"), "{ready}");
}

#[tokio::test]
async fn held_bodies_and_idle_connections_cannot_exhaust_the_server() {
    let (_dir, scripts, data) = dirs();
    project(&scripts, "acme/x", r#"{"buildImage": "x"}"#, "true\n");
    let decap = Decap::start(&data, &scripts, &["--sandbox", "none"]);
    let addr = decap.url.trim_start_matches("http://").to_owned();
    let pid = decap.child.id();
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    // 40 unsigned bodies that claim 20 MiB each and send 4 MiB of it.
    let chunk = vec![b' '; 1 << 20];
    let mut held = Vec::new();
    for i in 0..40 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: held-{i}\r\nX-Hub-Signature-256: sha256={}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            "0".repeat(64),
            20 << 20
        )
        .unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for _ in 0..4 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        held.push(s);
    }
    // And a thousand idle connections, some with half a header.
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
        }
        idle.push(s);
    }
    let t = Instant::now();
    let r = decap.api().get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(5));
    let used = rss();
    assert!(used < 128 << 20, "the server holds {used} bytes");
    // Past the header and body timeouts (10 s), the server lets them all
    // go: each is answered or closed within 30 s (other tests load the
    // machine meanwhile).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut open: Vec<_> = idle.into_iter().chain(held).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !open.is_empty() && Instant::now() < deadline {
        open.retain_mut(|s| {
            s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            let mut buf = [0u8; 512];
            s.read(&mut buf).is_err()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        1040 - open.len(),
        1040,
        "every held connection was answered or closed"
    );
}

async fn set_secret(api: &common::Api, path: &str, value: &str) {
    let r = api
        .http
        .put(format!("{}/api/v1/{path}", api.base))
        .bearer_auth(common::TOKEN)
        .body(value.to_owned())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
}

#[tokio::test]
async fn secrets_reach_builds_masked_however_printed_and_never_a_forks_build() {
    let (_dir, scripts, data) = dirs();
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x"}"#,
        r#"#!/bin/bash
echo "plain: $DEPLOY_KEY and $REGISTRY"
test -n "$DEPLOY_KEY" && echo has-deploy-key || echo no-deploy-key
printf '%s' "split: ${DEPLOY_KEY:0:9}"; printf '%s\n' "${DEPLOY_KEY:9}"
echo -n "$DEPLOY_KEY" | base64
echo -n "user:$DEPLOY_KEY" | base64
set -x
: "$REGISTRY"
set +x
env | grep -c -e DEPLOY_KEY= -e REGISTRY=
printf '%s' "$DEPLOY_KEY" | md5sum > "$ARTIFACTS_DIR/deploy-key.md5"
"#,
    );
    let decap = sandboxed(&data, &scripts, &[]);
    let api = decap.api();
    let deploy = "dk-9f8e7d6c5b4a39281706";
    let registry = "reg-project-0a1b2c3d4e";
    set_secret(&api, "secrets/acme/widgets/DEPLOY_KEY", deploy).await;
    set_secret(
        &api,
        "team-secrets/acme/REGISTRY",
        "reg-team-value-overridden",
    )
    .await;
    set_secret(&api, "secrets/acme/widgets/REGISTRY", registry).await;
    let names = api.send(Method::GET, "/api/v1/secrets/acme/widgets").await;
    let names = names.text().await.unwrap();
    assert!(
        !names.contains(deploy) && names.contains("DEPLOY_KEY"),
        "{names}"
    );

    let ids = api.request("acme/widgets", &["main"]).await;
    let b = api.finished(&ids[0], MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    let log = log_of(&api, &ids[0]).await;
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for leak in [
        deploy.to_owned(),
        registry.to_owned(),
        deploy[..12].to_owned(),
        b64(deploy)[..20].to_owned(),
        b64(&format!("user:{deploy}"))[8..24].to_owned(),
    ] {
        assert!(!log.contains(&leak), "{leak} leaked: {log}");
    }
    assert!(log.contains("plain: *** and ***"), "{log}");
    assert!(log.contains("has-deploy-key"), "{log}");
    // The build got the real value (the project's REGISTRY over the team's).
    let md5 = api
        .get(&format!("/api/v1/artifacts/{}/deploy-key.md5", ids[0]))
        .await
        .text()
        .await
        .unwrap();
    let expected = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s' '{deploy}' | md5sum"))
        .output()
        .unwrap();
    assert_eq!(md5, String::from_utf8_lossy(&expected.stdout));

    // A pull request from a fork: built, with the names and no values.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/github/pull_request-opened.payload.json");
    let mut pr: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    pr["pull_request"]["base"]["repo"]["name"] = "widgets".into();
    pr["pull_request"]["base"]["repo"]["owner"]["login"] = "acme".into();
    pr["pull_request"]["base"]["repo"]["full_name"] = "acme/widgets".into();
    pr["pull_request"]["head"]["repo"]["full_name"] = "mallory/widgets".into();
    let body = serde_json::to_vec(&pr).unwrap();
    let r = api.webhook("pull_request", "fork-1", &body).await;
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();
    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["fromFork"], true);
    let log = log_of(&api, &id).await;
    assert!(log.contains("no-deploy-key"), "{log}");
    assert!(
        log.contains("pull request from a fork, so it gets no secrets: DEPLOY_KEY, REGISTRY"),
        "{log}"
    );
}

/// `decap serve` as a user without root (`nobody`): it started until now.
fn serve_as_nobody(base: &std::path::Path) -> (std::process::Child, common::Api) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(base.join("decap"))
        .args(["serve", "--listen", "127.0.0.1:0", "--sandbox", "auto"])
        .args(["--kill-grace-secs", "1"])
        .arg("--data-dir")
        .arg(base.join("data"))
        .arg("--scripts")
        .arg(base.join("scripts"))
        .env_clear()
        .env("HOME", base)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("DECAP_API_TOKEN", common::TOKEN)
        .env("DECAP_LOG", "warn")
        .env("DECAP_BCTOOL", base.join("bctool"))
        .env("DECAP_SECRETS_KEY_FILE", base.join("secrets.key"))
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::relay_stderr(&mut child);
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(u) = l.strip_prefix("decap: serving ") {
                    break u.to_owned();
                }
            }
            _ => panic!("decap (as nobody) exited before serving"),
        }
    };
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url,
    };
    (child, api)
}

#[tokio::test]
async fn without_root_the_sandbox_has_its_network_and_its_builds_outlive_a_killed_server() {
    if !nix::unistd::geteuid().is_root() {
        // Becoming `nobody` takes root; CI runs as root.
        eprintln!("skipped: run as root to try the sandbox as another user");
        return;
    }
    let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let target = format!("{}/{}", host_address(), public.local_addr().unwrap().port());
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("decap");
    std::fs::create_dir(&base).unwrap();
    for (from, to) in [
        (env!("CARGO_BIN_EXE_decap"), "decap"),
        (env!("CARGO_BIN_EXE_bctool"), "bctool"),
    ] {
        std::fs::copy(from, base.join(to)).unwrap();
    }
    project(
        &base.join("scripts"),
        "acme/reach",
        r#"{"buildImage": "x"}"#,
        &format!(
            "#!/bin/bash\necho \"user $(id -u)\"\n(exec 3<>/dev/tcp/{target}) && echo OUTBOUND-OK || echo outbound-failed\n\
             for i in $(seq 1 40); do echo \"line $i\"; sleep 0.05; done\nexit 3\n"
        ),
    );
    let status = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let (mut first, api) = serve_as_nobody(&base);
    let id = api.request("acme/reach", &["main"]).await.remove(0);
    let log = eventually("the build to stream", MINUTE, || async {
        let log = log_of(&api, &id).await;
        log.contains("line 2").then_some(log)
    })
    .await;
    assert!(log.contains("user 65534"), "{log}");
    assert!(log.contains("OUTBOUND-OK"), "{log}");
    let _ = first.kill();
    let _ = first.wait();
    let (mut second, api) = serve_as_nobody(&base);
    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(b["exitCode"], 3, "{b}");
    assert_eq!(b["sandbox"], "bubblewrap", "{b}");
    let log = log_of(&api, &id).await;
    for l in 1..=40 {
        assert_eq!(log.matches(&format!("line {l}\n")).count(), 1, "{log}");
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = second.wait();
}

/// The warm processes named `name` under `root`, with their resident KiB.
fn descendants_named(root: u32, name: &str) -> Vec<(u32, u64)> {
    let mut parents = std::collections::HashMap::new();
    let mut comms = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[stat.find('(').unwrap() + 1..close].to_owned();
        let ppid: u32 = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        parents.insert(pid, ppid);
        comms.insert(pid, comm);
    }
    let under = |mut p: u32| {
        while let Some(&pp) = parents.get(&p) {
            if pp == root {
                return true;
            }
            if pp <= 1 {
                return false;
            }
            p = pp;
        }
        false
    };
    comms
        .iter()
        .filter(|(pid, c)| c.as_str() == name && under(**pid))
        .map(|(pid, _)| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            (*pid, rss)
        })
        .collect()
}

#[tokio::test]
async fn builds_start_through_the_small_runner_warm_or_cold_which_then_becomes_bctool() {
    let (_dir, scripts, data) = dirs();
    // The script reaches Decap at once: the runner listened before the
    // script started, so bctool serves that connection once it has become
    // bctool; and `bctool` itself runs in the build.
    project(
        &scripts,
        "acme/eager",
        r#"{"buildImage": "x"}"#,
        "#!/bin/bash\necho \"first: $(curl -s -o /dev/null -w '%{http_code}' \"$DECAP_URL/healthz\")\"\nbctool unlock\necho done\n",
    );
    project(
        &scripts,
        "acme/long",
        r#"{"buildImage": "x"}"#,
        "#!/bin/bash\necho started\nsleep 30\n",
    );
    let decap = sandboxed(&data, &scripts, &["--warm-standbys", "2"]);
    let server = decap.child.id();
    let runners = eventually("two warm runners", MINUTE, || async {
        let r = descendants_named(server, "decap-runner");
        (r.len() == 2).then_some(r)
    })
    .await;
    assert!(
        descendants_named(server, "bctool").is_empty(),
        "no whole bctool waits"
    );
    for (pid, rss) in &runners {
        // A whole bctool waited at 8 MiB; the runner is a small program.
        assert!(*rss < 4 * 1024, "runner {pid} holds {rss} KiB");
    }
    eager_and_cancelled(&decap.api()).await;
    drop(decap);
    // Cold, the runner starts with the sandbox and is handed the build at
    // once: the same holds.
    let (_dir2, _, data2) = dirs();
    let decap = sandboxed(&data2, &scripts, &["--warm-standbys", "0"]);
    eager_and_cancelled(&decap.api()).await;
}

/// Three builds that reach Decap at once, then three cancelled as soon as
/// they are asked for.
async fn eager_and_cancelled(api: &common::Api) {
    for _ in 0..3 {
        let ids = api.request("acme/eager", &["main"]).await;
        let b = api.finished(&ids[0], MINUTE).await;
        assert_eq!(b["status"], "succeeded", "{b}");
        let log = log_of(api, &ids[0]).await;
        assert!(log.contains("first: 200"), "{log}");
        assert!(log.contains("lock released"), "{log}");
        assert!(log.contains("done"), "{log}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A cancel that comes while the runner is becoming bctool waits for
    // bctool's handlers: the build stops gracefully and says so.
    for _ in 0..3 {
        let ids = api.request("acme/long", &["main"]).await;
        api.send(Method::DELETE, &format!("/api/v1/build/{}", ids[0]))
            .await;
        let b = api.finished(&ids[0], MINUTE).await;
        assert_eq!(b["status"], "cancelled", "{b}");
        assert_eq!(processes_of(&ids[0]), 0, "a cancel leaves no process");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test]
async fn a_sandbox_that_fails_while_it_starts_leaves_no_process_behind() {
    // The server could not put the sandbox in its cgroup (its server was
    // stopping and removed it): bubblewrap and the child it had made go.
    use decap_embedded::sandbox::disk::{DiskQuota, Workspace};
    use decap_embedded::sandbox::{Plan, Sandbox, SandboxDir, SandboxNetwork};
    let tmp = tempfile::tempdir().unwrap();
    let dir = SandboxDir::for_data_dir(tmp.path()).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(dir.socket()).unwrap();
    let ws = dir.0.join("failing-start");
    let uid = nix::unistd::geteuid()
        .is_root()
        .then_some(1_900_000_000u32 + 61_000);
    Workspace::create(&ws, DiskQuota::Measured, None, uid).unwrap();
    let bwrap = ["/usr/bin/bwrap", "/bin/bwrap"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("bubblewrap is installed for the containment tests");
    let sandbox = Sandbox::new(
        bwrap,
        SandboxNetwork::None,
        1_900_000_000,
        Vec::new(),
        dir.socket(),
        9,
    );
    let messages = dir.0.join("failing-start.err");
    for _ in 0..10 {
        let plan = Plan {
            workspace: &ws,
            bctool: std::path::Path::new("/bin/true"),
            runner: None,
            args: Vec::new(),
            env: Vec::new(),
            uid,
            network: false,
            stdin: false,
            stderr: &messages,
        };
        let started = sandbox
            .start(
                &plan,
                async |mut cmd| cmd.spawn(),
                |_| Err(std::io::Error::other("the cgroup is gone")),
            )
            .await;
        let err = started.err().expect("the start fails").to_string();
        assert!(err.contains("the cgroup is gone"), "{err}");
        let needle = ws.to_string_lossy().into_owned();
        eventually(
            "the failed sandbox's processes to be gone",
            MINUTE,
            || async { processes_naming(&needle).is_empty().then_some(()) },
        )
        .await;
    }
}
