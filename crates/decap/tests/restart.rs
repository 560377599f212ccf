//! Restarts and upgrades drop no webhook: the real `decap serve` upgraded
//! in place (`SIGUSR2`) and restarted under socket activation while signed
//! pushes arrive at 50/s; a stop that does not wait on viewers.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{SECRET, TOKEN, eventually, project, push_payload, sign};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

const RATE: u32 = 50;

/// `decap serve` on `data` and `scripts`, with the listening socket `fd`
/// passed as socket activation does when given, and `--listen` otherwise.
fn serve(
    data: &Path,
    scripts: &Path,
    fd: Option<&std::net::TcpListener>,
) -> tokio::process::Command {
    serve_in(data, scripts, fd, "none")
}

/// [`serve`] with the sandbox `sandbox` (`none`, `auto`).
fn serve_in(
    data: &Path,
    scripts: &Path,
    fd: Option<&std::net::TcpListener>,
    sandbox: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_decap"));
    cmd.arg("serve")
        .args(["--kill-grace-secs", "1", "--sandbox", sandbox])
        .arg("--data-dir")
        .arg(data)
        .arg("--scripts")
        .arg(scripts)
        .env("DECAP_GITHUB_WEBHOOK_SECRET", SECRET)
        .env("DECAP_API_TOKEN", TOKEN)
        .env("DECAP_LOG", "warn")
        // A build of a server that is gone for good stops trying soon.
        .env("DECAP_BCTOOL_RETRY_SECS", "30")
        .env("DECAP_BCTOOL", env!("CARGO_BIN_EXE_bctool"))
        .env(
            "DECAP_SECRETS_KEY_FILE",
            data.parent().unwrap().join("secrets-key/secrets.key"),
        )
        .env_remove("LISTEN_PID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match fd {
        Some(l) => {
            cmd.env("LISTEN_FDS", "1");
            let owned = l.as_fd().try_clone_to_owned().unwrap();
            decap_embedded::sandbox::fds::pass(&mut cmd, vec![owned], 3);
        }
        None => {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
    }
    cmd
}

/// Starts `cmd` and answers the process and the URL it serves.
async fn started(mut cmd: tokio::process::Command) -> (tokio::process::Child, String) {
    let mut child = cmd.spawn().unwrap();
    common::relay_stderr_async(&mut child);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        match lines.next_line().await.unwrap() {
            Some(line) => {
                if let Some(url) = line.strip_prefix("decap: serving ") {
                    break url.to_owned();
                }
            }
            None => panic!("decap exited before serving"),
        }
    };
    // Keep reading what it prints, so that nothing it writes is refused.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x"}"#,
        "echo built\n",
    );
    let data = dir.path().join("data");
    (dir, data, scripts)
}

/// One webhook sent: its commit, and its answer's status or why none came.
struct Sent {
    commit: String,
    answer: Result<u16, String>,
    took: Duration,
}

/// Sends `n` signed pushes (each its own commit) at 50/s, each on a new
/// connection, as GitHub does; `at(i)` runs before the `i`th.
async fn pushes(url: &str, n: u32, mut at: impl FnMut(u32)) -> Vec<Sent> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs(1) * i / RATE).await;
        at(i);
        let http = http.clone();
        let url = url.to_owned();
        let commit = format!("{:040x}", 0xdeca_0000_u64 + u64::from(i));
        tasks.push(tokio::spawn(async move {
            let body = push_payload("acme", "widgets", "refs/heads/main", &commit);
            let t0 = Instant::now();
            let answer = http
                .post(format!("{url}/hooks/github"))
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("restart-{commit}"))
                .header("x-hub-signature-256", sign(SECRET, &body))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| format!("{e:?}"));
            Sent {
                commit,
                answer,
                took: t0.elapsed(),
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Every push was answered 202 and built exactly once, and succeeded (a
/// build running at the switch runs on, and the new process records its
/// end); answers the builds.
async fn each_built_once(url: &str, sent: &[Sent]) -> Vec<serde_json::Value> {
    let refused: Vec<String> = sent
        .iter()
        .filter(|s| s.answer != Ok(202))
        .map(|s| format!("{}: {:?}", s.commit, s.answer))
        .collect();
    assert!(refused.is_empty(), "pushes not accepted: {refused:#?}");
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url.to_owned(),
    };
    let builds = eventually("every build to end", Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            let v = api
                .json("/api/v1/builds/acme/widgets?branch=main&limit=500")
                .await;
            let builds = v["builds"].as_array().unwrap().clone();
            let done = builds.iter().all(|b| {
                !matches!(
                    b["status"].as_str().unwrap(),
                    "queued" | "deferred" | "running"
                )
            });
            (builds.len() >= sent.len() && done).then_some(builds)
        }
    })
    .await;
    for s in sent {
        let of: Vec<&serde_json::Value> = builds
            .iter()
            .filter(|b| b["commit"].as_str() == Some(s.commit.as_str()))
            .collect();
        assert_eq!(of.len(), 1, "commit {} built {} times", s.commit, of.len());
    }
    let failed: Vec<&serde_json::Value> = builds
        .iter()
        .filter(|b| b["status"] != "succeeded")
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    builds
}

fn pid_file(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("decap.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Stops whatever decap serves `data` when dropped: the new process of an
/// upgrade outlives its parent, and a test that fails must not leave it
/// running.
struct StopsServerOf(PathBuf);

impl Drop for StopsServerOf {
    fn drop(&mut self) {
        if let Some(pid) = pid_file(&self.0) {
            stop(pid);
        }
    }
}

/// Stops the process `pid` (a grandchild: this test reaps it as its
/// subreaper) and waits until it is gone.
fn stop(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
}

#[tokio::test]
async fn an_upgrade_in_place_refuses_no_webhook_and_builds_each_once() {
    // The new decap outlives the old one, its parent: it becomes this
    // test's child, to be stopped and reaped here.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let (_dir, data, scripts) = dirs();
    let _cleanup = StopsServerOf(data.clone());
    let (mut old, url) = started(serve(&data, &scripts, None)).await;
    let old_pid = old.id().unwrap() as i32;
    assert_eq!(pid_file(&data), Some(old_pid));
    let sent = pushes(&url, 3 * RATE, |i| {
        if i == RATE {
            kill(Pid::from_raw(old_pid), Signal::SIGUSR2).unwrap();
        }
    })
    .await;
    let status = tokio::time::timeout(Duration::from_secs(30), old.wait())
        .await
        .expect("the old decap stops once the new one takes over")
        .unwrap();
    assert!(status.success(), "{status}");
    let new_pid = pid_file(&data).expect("the new decap writes its pid");
    assert_ne!(new_pid, old_pid);
    each_built_once(&url, &sent).await;
    let slowest = sent.iter().map(|s| s.took).max().unwrap();
    eprintln!("slowest answer across the upgrade: {slowest:?}");
    stop(new_pid);
    assert_eq!(pid_file(&data), None, "a clean stop removes its pid file");
}

#[tokio::test]
async fn an_upgrade_to_a_binary_that_cannot_start_keeps_the_old_one_serving() {
    let (dir, data, scripts) = dirs();
    // Started from a copy of the binary, which is then replaced by one
    // that fails at once: the upgrade runs what is at the path now.
    let exe = dir.path().join("decap");
    std::fs::copy(env!("CARGO_BIN_EXE_decap"), &exe).unwrap();
    let mut cmd = serve(&data, &scripts, None);
    let std_cmd = cmd.as_std_mut();
    let args: Vec<std::ffi::OsString> = std_cmd.get_args().map(ToOwned::to_owned).collect();
    let mut from_copy = tokio::process::Command::new(&exe);
    from_copy
        .args(args)
        .envs(
            std_cmd
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (mut old, url) = started(from_copy).await;
    let old_pid = old.id().unwrap() as i32;
    let broken = dir.path().join("decap.new");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'this decap cannot start' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &exe).unwrap();
    kill(Pid::from_raw(old_pid), Signal::SIGUSR2).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let exited = old.try_wait().unwrap();
    assert!(exited.is_none(), "the old decap serves on ({exited:?})");
    let sent = pushes(&url, 5, |_| {}).await;
    assert!(sent.iter().all(|s| s.answer == Ok(202)));
    assert_eq!(pid_file(&data), Some(old_pid));
    kill(Pid::from_raw(old_pid), Signal::SIGTERM).unwrap();
    assert!(old.wait().await.unwrap().success());
}

#[tokio::test]
async fn a_socket_activated_restart_refuses_no_webhook() {
    let (_dir, data, scripts) = dirs();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (first, url) = started(serve(&data, &scripts, Some(&listener))).await;
    assert_eq!(url, format!("http://{}", listener.local_addr().unwrap()));
    let first_pid = first.id().unwrap() as i32;
    let (restarted_tx, mut restarted_rx) = tokio::sync::mpsc::unbounded_channel();
    let restarter = {
        let data = data.clone();
        let scripts = scripts.clone();
        let listener = listener.try_clone().unwrap();
        tokio::spawn(async move {
            let mut first = first;
            // Stopped as systemd stops a service, then started again on
            // the same socket, which it holds meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
            kill(Pid::from_raw(first_pid), Signal::SIGTERM).unwrap();
            let t0 = Instant::now();
            let status = first.wait().await.unwrap();
            let stopped_in = t0.elapsed();
            assert!(status.success(), "{status}");
            let (second, _) = started(serve(&data, &scripts, Some(&listener))).await;
            let _ = restarted_tx.send(stopped_in);
            second
        })
    };
    let sent = pushes(&url, 3 * RATE, |_| {}).await;
    let stopped_in = restarted_rx.recv().await.unwrap();
    eprintln!("stopped in {stopped_in:?}");
    let mut second = restarter.await.unwrap();
    each_built_once(&url, &sent).await;
    let second_pid = second.id().unwrap() as i32;
    kill(Pid::from_raw(second_pid), Signal::SIGTERM).unwrap();
    let _ = second.wait().await;
}

/// A socket-activated decap running one build that prints a line every
/// `pause` seconds, `lines` times.
struct Streaming {
    _dir: tempfile::TempDir,
    data: PathBuf,
    scripts: PathBuf,
    listener: std::net::TcpListener,
    first: tokio::process::Child,
    url: String,
    api: common::Api,
    id: String,
}

async fn streaming(lines: u32, pause: &str) -> Streaming {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x"}"#,
        &format!("for i in $(seq 1 {lines}); do echo line $i; sleep {pause}; done\n"),
    );
    let data = dir.path().join("data");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (first, url) = started(serve(&data, &scripts, Some(&listener))).await;
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url.clone(),
    };
    let id = api.request("acme/widgets", &["main"]).await.remove(0);
    Streaming {
        _dir: dir,
        data,
        scripts,
        listener,
        first,
        url,
        api,
        id,
    }
}

#[tokio::test]
async fn a_stop_does_not_wait_for_viewers_and_tells_them_to_reconnect() {
    let Streaming {
        _dir,
        data,
        scripts,
        listener,
        mut first,
        url,
        api,
        id,
    } = streaming(150, "0.02").await;
    // Five builds streaming, 200 viewers of their live logs and of the
    // pages' live updates.
    let mut ids = vec![id];
    ids.extend(api.request("acme/widgets", &["b1", "b2", "b3", "b4"]).await);
    let mut viewers = Vec::new();
    for i in 0..200 {
        let path = if i % 2 == 0 {
            format!("{url}/api/v1/logs/{}/events", ids[i % ids.len()])
        } else {
            format!("{url}/ui/events")
        };
        let r = reqwest::get(&path).await.unwrap();
        assert_eq!(r.status(), 200);
        viewers.push(r);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    kill(Pid::from_raw(first.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    first.wait().await.unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the stop waited for its viewers ({took:?})"
    );
    // Each event stream ended with a hint to reconnect.
    for v in viewers {
        let text = v.text().await.unwrap_or_default();
        assert!(text.contains("event: reconnect"), "{text}");
    }
    // The builds ran on; the next start records their ends and whole logs.
    let (mut second, _) = started(serve(&data, &scripts, Some(&listener))).await;
    for id in &ids {
        let b = api.finished(id, Duration::from_secs(60)).await;
        assert_eq!(b["status"], "succeeded", "{b}");
        let log = api.log(id).await;
        for l in 1..=150 {
            assert_eq!(log.matches(&format!("line {l}\n")).count(), 1, "{log}");
        }
    }
    kill(Pid::from_raw(second.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    second.wait().await.unwrap();
}

#[tokio::test]
async fn a_log_follow_resumes_across_a_restart_without_repeats() {
    let Streaming {
        _dir,
        data,
        scripts,
        listener,
        mut first,
        url,
        api,
        id,
    } = streaming(300, "0.01").await;
    let follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["builds", "logs", "--follow", &id])
        .env("DECAP_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    kill(Pid::from_raw(first.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    first.wait().await.unwrap();
    let (mut second, _) = started(serve(&data, &scripts, Some(&listener))).await;
    let out = tokio::time::timeout(Duration::from_secs(60), follow.wait_with_output())
        .await
        .expect("decapctl follows to the end")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming at byte"), "{stderr}");
    let stored = api.log(&id).await;
    assert!(stored.contains("line 1\n"), "{stored}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        stored,
        "what decapctl showed is the log, once"
    );
    let tail = api
        .get(&format!("/api/v1/logs/{id}?offset=7"))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(tail, stored[7..]);
    let bad = api.get(&format!("/api/v1/logs/{id}?offset=x")).await;
    assert_eq!(bad.status(), 400);
    kill(Pid::from_raw(second.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let _ = second.wait().await;
}

/// Kill -9 of the server with five sandboxed builds running, then a start:
/// each ends with its true result, its whole log (each line once) and its
/// artifacts, one of them having ended while no server ran; nothing of
/// them is left after.
#[tokio::test]
async fn builds_outlive_a_killed_server_and_end_with_their_true_result() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x"}"#,
        r#"#!/bin/bash
n=$([ "$BRANCH_TO_BUILD" = b0 ] && echo 20 || echo 80)
for i in $(seq 1 $n); do echo "$BRANCH_TO_BUILD line $i"; sleep 0.05; done
echo "$BRANCH_TO_BUILD" > "$ARTIFACTS_DIR/branch.txt"
exit ${BRANCH_TO_BUILD#b}
"#,
    );
    let data = dir.path().join("data");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut first, url) = started(serve_in(&data, &scripts, Some(&listener), "auto")).await;
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url.clone(),
    };
    let ids = api
        .request("acme/widgets", &["b0", "b1", "b2", "b3", "b4"])
        .await;
    for (i, id) in ids.iter().enumerate() {
        let api = api.clone();
        let line = format!("b{i} line 2\n");
        eventually("each build to stream", Duration::from_secs(60), || {
            let api = api.clone();
            let path = format!("/api/v1/logs/{id}");
            let line = line.clone();
            async move {
                api.get(&path)
                    .await
                    .text()
                    .await
                    .ok()?
                    .contains(&line)
                    .then_some(())
            }
        })
        .await;
    }
    kill(Pid::from_raw(first.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    first.wait().await.unwrap();
    // b0 ends while no server runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut second, _) = started(serve_in(&data, &scripts, Some(&listener), "auto")).await;
    for (i, id) in ids.iter().enumerate() {
        let b = api.finished(id, Duration::from_secs(60)).await;
        assert_eq!(b["exitCode"], i as u64, "{b}");
        let status = if i == 0 { "succeeded" } else { "failed" };
        assert_eq!(b["status"], status, "{b}");
        let log = api.log(id).await;
        let lines = if i == 0 { 20 } else { 80 };
        for l in 1..=lines {
            let line = format!("b{i} line {l}\n");
            assert_eq!(log.matches(&line).count(), 1, "{line:?} once in\n{log}");
        }
        assert!(
            api.artifact_names(id).await.contains("branch.txt"),
            "the artifacts of b{i}"
        );
    }
    // Nothing of the builds is left: no workspace, record or process (a
    // workspace goes just after its build's end is recorded).
    let work = Path::new("/var/lib/decap")
        .join(decap_embedded::sandbox::instance(&data))
        .join("work");
    let left = || -> Vec<String> {
        std::fs::read_dir(&work)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| ids.iter().any(|id| n.starts_with(id.as_str())))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !left().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left().is_empty(), "{:?}", left());
    kill(Pid::from_raw(second.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    second.wait().await.unwrap();
}

#[tokio::test]
async fn a_build_whose_server_never_comes_back_gives_up_after_the_retry_time() {
    let (dir, data, scripts) = dirs();
    project(
        &scripts,
        "acme/slow",
        r#"{"buildImage": "x"}"#,
        "echo started\nsleep 1\necho done\n",
    );
    let mut cmd = serve(&data, &scripts, None);
    cmd.arg("--bctool-retry-secs").arg("2");
    let (mut server, url) = started(cmd).await;
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url,
    };
    let id = api.request("acme/slow", &["main"]).await.remove(0);
    let record = {
        let work = decap_embedded::sandbox::SandboxDir::for_data_dir(&data)
            .unwrap()
            .work_root();
        let id = id.clone();
        eventually("the build's record", Duration::from_secs(30), move || {
            let work = work.clone();
            let id = id.clone();
            async move {
                std::fs::read_dir(&work).ok()?.flatten().find_map(|e| {
                    let text = std::fs::read_to_string(e.path()).ok()?;
                    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                    (v["buildId"] == id.as_str()).then_some(v)
                })
            }
        })
        .await
    };
    let pid = record["process"]["pid"].as_i64().unwrap() as i32;
    // Gone for good: the build finishes its script, tries to ship its log
    // and result for two seconds, and ends.
    kill(Pid::from_raw(server.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    server.wait().await.unwrap();
    let t0 = Instant::now();
    while kill(Pid::from_raw(pid), None).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "bctool still runs {:?} after its server was killed",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(dir);
}
