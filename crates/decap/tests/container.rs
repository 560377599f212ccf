//! The container executor against a real engine: Podman's Docker-compatible
//! service, with images made without a registry (`tests/bed/podman.sh`,
//! which `tests/run` starts: it sets `DECAP_TEST_CONTAINER_SOCKET`,
//! `DECAP_TEST_BUILD_IMAGE` and `DECAP_TEST_REDIS_IMAGE`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Decap, eventually, project};
use decap_contract_tests::{RecordedExits, executor_suite_in};

const MINUTE: Duration = Duration::from_secs(60);

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through tests/run, which starts the container engine \
             (or `eval \"$(tests/bed/podman.sh start)\"`)"
        )
    })
}

fn engine() -> PathBuf {
    PathBuf::from(var("DECAP_TEST_CONTAINER_SOCKET"))
}

fn image() -> String {
    var("DECAP_TEST_BUILD_IMAGE")
}

fn redis() -> String {
    var("DECAP_TEST_REDIS_IMAGE")
}

fn sidecar(scripts: &Path, key: &str, file: &str, json: &serde_json::Value) {
    std::fs::write(scripts.join(key).join(file), json.to_string()).unwrap();
}

/// A project of the bed's base image running `script`.
fn plain(scripts: &Path, key: &str, script: &str) {
    project(
        scripts,
        key,
        &descriptor(&image(), serde_json::json!({})),
        script,
    );
}

fn descriptor(image: &str, extra: serde_json::Value) -> String {
    let mut d = serde_json::json!({ "buildImage": image });
    if let (Some(d), Some(extra)) = (d.as_object_mut(), extra.as_object()) {
        d.extend(extra.clone());
    }
    d.to_string()
}

/// The containers of a build, as the engine lists them.
fn containers_of(build: &str) -> Vec<String> {
    let out = Command::new("podman")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=decap.build-id={build}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the engine has no container of the build left.
async fn containers_removed(build: &str) {
    eventually("the build's containers to be removed", MINUTE, || async {
        containers_of(build).is_empty().then_some(())
    })
    .await;
}

fn start(dir: &Path, engine: &Path, extra: &[&str], env: &[(&str, &str)]) -> Decap {
    let mut args = vec![
        "--executor",
        "container",
        "--container-socket",
        engine.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Decap::start_with_env(&dir.join("data"), &dir.join("scripts"), &args, env)
}

async fn log_of(decap: &Decap, id: &str) -> String {
    decap
        .api()
        .get(&format!("/api/v1/logs/{id}"))
        .await
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_executor_keeps_the_executor_contract() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let socket = run.join("build.sock");
    // The suite's builds report to nowhere: a listener that answers nothing.
    let _socket = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let exits = Arc::new(RecordedExits::default());
    let executor = decap_container::ContainerExecutor::new(
        decap_container::ContainerExecutorConfig {
            engine: engine(),
            instance: format!("contract-{}", std::process::id()),
            build_socket: socket,
            bctool: PathBuf::from(env!("CARGO_BIN_EXE_bctool")),
            url_port: 9090,
            kill_grace: Duration::from_secs(1),
            defaults: Default::default(),
            keep_failed: Duration::ZERO,
            network: "bridge".into(),
        },
        exits.clone(),
    )
    .await
    .unwrap();
    executor_suite_in(Arc::new(executor), exits, MINUTE, &image()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_runs_in_its_image_as_a_user_with_its_redis_sidecar_on_localhost_and_leaves_no_container()
 {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/cache",
        &descriptor(
            &redis(),
            serde_json::json!({"resources": {"memory": "256Mi"}}),
        ),
        "#!/bin/sh\nset -e\necho \"user $(id -u) in $(pwd) on Debian $(cat /etc/debian_version)\"\n\
         redis-cli -h 127.0.0.1 set greeting hello >/dev/null\necho \"redis says $(redis-cli get greeting)\"\n\
         echo kept > \"$ARTIFACTS_DIR/out.txt\"\n",
    );
    sidecar(
        &scripts,
        "acme/cache",
        "redis-sidecar.json",
        &serde_json::json!({
            "name": "redis",
            "image": redis(),
            // Probed at its address, as a kubelet probes a pod's: it
            // listens beyond its own loopback.
            "args": ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", ""],
            "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 1, "failureThreshold": 20}
        }),
    );
    let decap = start(dir.path(), &engine(), &[], &[]);
    let api = decap.api();
    let id = api.request("acme/cache", &["main"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    let log = log_of(&decap, &id).await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert_eq!(b["executor"], "container", "{b}");
    assert!(
        log.contains("user 1000 in /decap/workspace/src on Debian 12"),
        "{log}"
    );
    assert!(log.contains("redis says hello"), "{log}");
    assert!(
        log.starts_with("[decap: sidecar redis passed its readinessProbe at "),
        "the console says when the sidecar was ready: {log}"
    );
    assert_eq!(
        log.matches("[decap:").count(),
        1,
        "nothing to warn of: {log}"
    );
    let files = api.artifact_names(&id).await;
    assert!(files.contains("out.txt"), "{files}");
    containers_removed(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_goes_wrong_in_a_container_build_is_its_error_named() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    let waits = "#!/bin/sh\necho started\nsleep 60\n";
    project(
        &scripts,
        "acme/noimage",
        &descriptor("localhost/decap-no-such-image:1", serde_json::json!({})),
        waits,
    );
    plain(&scripts, "acme/neverready", waits);
    sidecar(
        &scripts,
        "acme/neverready",
        "db-sidecar.json",
        &serde_json::json!({
            "name": "db", "image": image(), "command": ["sleep", "300"],
            "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}
        }),
    );
    plain(&scripts, "acme/sidecarexits", waits);
    sidecar(
        &scripts,
        "acme/sidecarexits",
        "queue-sidecar.json",
        &serde_json::json!({"name": "queue", "image": image(), "command": ["sh", "-c", "sleep 2; exit 7"]}),
    );
    project(
        &scripts,
        "acme/hungry",
        &descriptor(
            &image(),
            serde_json::json!({"resources": {"memory": "64Mi"}}),
        ),
        "#!/bin/sh\necho eating\nhead -c 400000000 /dev/zero | tail > /dev/null\necho \"tail: $?\"\n",
    );
    let decap = start(dir.path(), &engine(), &[], &[]);
    let api = decap.api();
    let cases = [
        ("acme/noimage", "errored", "localhost/decap-no-such-image:1"),
        (
            "acme/neverready",
            "errored",
            "sidecar db did not pass its readinessProbe within 2 s",
        ),
        (
            "acme/sidecarexits",
            "errored",
            "sidecar queue exited with code 7 while the build ran",
        ),
        ("acme/hungry", "failed", "memory"),
    ];
    let mut ids = Vec::new();
    for (key, _, _) in &cases {
        ids.push(api.request(key, &["main"]).await.remove(0));
    }
    for ((key, status, words), id) in cases.iter().zip(&ids) {
        let b = api.finished(id, MINUTE).await;
        assert_eq!(
            b["status"],
            *status,
            "{key}: {b}\n{}",
            log_of(&decap, id).await
        );
        let message = b["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(words),
            "{key}: {message:?} should say {words:?}"
        );
    }
    for id in &ids {
        containers_removed(id).await;
    }
    let locks = api.json("/api/v1/locks").await;
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_container_builds_running_when_decap_is_killed_finish_with_their_true_results() {
    let dir = tempfile::tempdir().unwrap();
    plain(
        &dir.path().join("scripts"),
        "acme/many",
        "#!/bin/sh\necho \"started $BRANCH_TO_BUILD\"\nsleep 8\necho \"finished $BRANCH_TO_BUILD\"\n\
         case \"$BRANCH_TO_BUILD\" in fail-*) exit 3;; esac\n",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let env = [("DECAP_LISTEN", listen.as_str())];
    let extra = ["--max-builds-per-project", "8"];
    let mut decap = start(dir.path(), &engine(), &extra, &env);
    let api = decap.api();
    let branches = ["ok-1", "fail-2", "ok-3", "fail-4", "ok-5"];
    let ids = api.request("acme/many", &branches).await;
    for id in &ids {
        eventually("the build to print its first line", MINUTE, || async {
            log_of(&decap, id).await.contains("started").then_some(())
        })
        .await;
    }
    decap.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let decap = start(dir.path(), &engine(), &extra, &env);
    let api = decap.api();
    for (id, branch) in ids.iter().zip(branches) {
        let b = api.finished(id, MINUTE).await;
        let log = log_of(&decap, id).await;
        let (status, code) = if branch.starts_with("ok-") {
            ("succeeded", 0)
        } else {
            ("failed", 3)
        };
        assert_eq!(b["status"], status, "{b}\n{log}");
        assert_eq!(b["exitCode"], code, "{b}");
        assert!(log.contains(&format!("finished {branch}")), "{log}");
    }
    let locks = api.json("/api/v1/locks").await;
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Podman API service of this test's own, to take away and bring back.
struct Service {
    socket: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn start(socket: &Path) -> Service {
        let mut s = Service {
            socket: socket.to_owned(),
            child: None,
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "podman system service did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_wait_deferred_while_the_engine_is_away_and_resume_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    plain(
        &dir.path().join("scripts"),
        "acme/widgets",
        "#!/bin/sh\necho \"built $BRANCH_TO_BUILD\"\n",
    );
    plain(
        &dir.path().join("scripts"),
        "acme/long",
        "#!/bin/sh\necho started\nsleep 4\necho \"finished while the engine was away\"\n",
    );
    let socket = dir.path().join("engine.sock");
    let mut service = Service::start(&socket);
    let decap = start(dir.path(), &socket, &[], &[]);
    let api = decap.api();
    let first = api.request("acme/widgets", &["before"]).await.remove(0);
    assert_eq!(api.finished(&first, MINUTE).await["status"], "succeeded");
    // A build running when the engine goes away goes on (its containers
    // do not need the API service) and keeps its true result.
    let long = api.request("acme/long", &["main"]).await.remove(0);
    eventually("the long build to start", MINUTE, || async {
        log_of(&decap, &long)
            .await
            .contains("started")
            .then_some(())
    })
    .await;

    service.stop();
    let (ids, b) = api.request_until_deferred("acme/widgets", "during").await;
    let message = b["message"].as_str().unwrap_or_default();
    assert!(message.contains("container engine"), "{b}");

    service.restart();
    // Those launched before Decap noticed start once the engine is back;
    // those deferred run then.
    for id in &ids {
        let b = api.finished(id, MINUTE).await;
        assert_eq!(b["status"], "succeeded", "{b}");
    }
    let b = api.finished(&long, MINUTE).await;
    let log = log_of(&decap, &long).await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(log.contains("finished while the engine was away"), "{log}");
    containers_removed(&long).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_executor_says_what_of_a_project_it_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/cache",
        r#"{"buildImage": "example/builder:1"}"#,
        "#!/bin/sh\necho building\n",
    );
    sidecar(
        &scripts,
        "acme/cache",
        "redis-sidecar.json",
        &serde_json::json!({"name": "redis", "image": "redis:7"}),
    );
    let decap = Decap::start(&dir.path().join("data"), &scripts, &[]);
    let api = decap.api();
    let id = api.request("acme/cache", &["main"]).await.remove(0);
    assert_eq!(api.finished(&id, MINUTE).await["status"], "succeeded");
    let log = log_of(&decap, &id).await;
    let first: Vec<&str> = log.lines().take(2).collect();
    assert!(
        first[0].contains("not in its buildImage example/builder:1"),
        "{log}"
    );
    assert!(first[1].contains("sidecars (redis) do not run"), "{log}");
    let page = api.get("/projects/acme/cache").await.text().await.unwrap();
    assert!(
        page.contains("sidecars (redis) do not run under the local executor"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_examples_run_in_the_base_build_image() {
    // The bed builds build-container/Dockerfile as decap-build-base, the
    // image the examples name.
    assert!(!var("DECAP_TEST_BUILD_BASE_IMAGE").is_empty());
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/build-scripts");
    let engine = engine();
    let decap = Decap::start(
        &dir.path().join("data"),
        &examples,
        &[
            "--executor",
            "container",
            "--container-socket",
            engine.to_str().unwrap(),
        ],
    );
    let api = decap.api();
    for (key, status, words) in [
        ("examples/hello-world", "succeeded", "hello from build"),
        ("examples/live-and-artifacts", "succeeded", "step 5 of 5"),
        ("examples/always-fails", "failed", ""),
        (
            "examples/from-a-repository",
            "succeeded",
            "the greeter says: Hello, Decap!",
        ),
    ] {
        let id = api.request(key, &["main"]).await.remove(0);
        let b = api.finished(&id, MINUTE).await;
        let log = log_of(&decap, &id).await;
        assert_eq!(b["status"], status, "{key}: {b}\n{log}");
        assert!(log.contains(words), "{key}: {log}");
        assert!(!log.contains("[decap:"), "{key}: nothing to warn of: {log}");
    }
}

/// `decap serve` run as a user, builds on that user's rootless Podman.
struct AsUser {
    child: Child,
    url: String,
}

impl Drop for AsUser {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootless_podman_runs_builds_with_their_sidecars_as_rootful_does() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let user = var("DECAP_TEST_ROOTLESS_USER");
    let runtime = var("DECAP_TEST_ROOTLESS_RUNTIME_DIR");
    let pw = nix::unistd::User::from_name(&user).unwrap().unwrap();
    // Everything the user's Decap reads or writes is the user's: the
    // binaries (the build's are under root's home), scripts and data.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("decap");
    std::fs::create_dir(&base).unwrap();
    for (from, to) in [
        (env!("CARGO_BIN_EXE_decap"), "decap"),
        (env!("CARGO_BIN_EXE_bctool"), "bctool"),
    ] {
        std::fs::copy(from, base.join(to)).unwrap();
    }
    let scripts = base.join("scripts");
    project(
        &scripts,
        "acme/cache",
        &descriptor(
            &redis(),
            serde_json::json!({"resources": {"memory": "256Mi"}}),
        ),
        "#!/bin/sh\nset -e\necho \"user $(id -u)\"\nredis-cli -h 127.0.0.1 set k rootless >/dev/null\necho \"redis says $(redis-cli get k)\"\n",
    );
    sidecar(
        &scripts,
        "acme/cache",
        "redis-sidecar.json",
        &serde_json::json!({
            "name": "redis", "image": redis(),
            "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 1, "failureThreshold": 20}
        }),
    );
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", pw.uid, pw.gid))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    // No --container-socket: found where rootless clients look.
    let mut child = Command::new(base.join("decap"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--executor",
            "container",
            "--kill-grace-secs",
            "1",
        ])
        .arg("--data-dir")
        .arg(base.join("data"))
        .arg("--scripts")
        .arg(&scripts)
        .env_clear()
        .env("HOME", &pw.dir)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("DECAP_API_TOKEN", common::TOKEN)
        .env("DECAP_LOG", "warn")
        .env("DECAP_BCTOOL", base.join("bctool"))
        .env("DECAP_SECRETS_KEY_FILE", base.join("secrets.key"))
        .uid(pw.uid.as_raw())
        .gid(pw.gid.as_raw())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::relay_stderr(&mut child);
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(u) = l.strip_prefix("decap: serving ") {
                    break u.to_owned();
                }
            }
            _ => panic!("decap (as {user}) exited before serving"),
        }
    };
    let server = AsUser { child, url };
    let api = common::Api {
        http: reqwest::Client::new(),
        base: server.url.clone(),
    };
    let id = api.request("acme/cache", &["main"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    let log = api
        .get(&format!("/api/v1/logs/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(log.contains("user 1000"), "{log}");
    assert!(log.contains("redis says rootless"), "{log}");
    // cgroup v1 rootless: the engine cannot limit, and the build is told.
    assert!(
        log.contains("rootless on cgroup v1 and cannot limit a build"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_missing_here_is_pulled_with_the_pull_in_the_console() {
    let registry = var("DECAP_TEST_REGISTRY");
    // The base image, in the bed's registry under a name not present here.
    let name = format!("{registry}/decap/pulled:{}", std::process::id());
    let run = |args: &[&str]| {
        let out = Command::new("podman").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["tag", &image(), &name]);
    run(&["push", "--tls-verify=false", &name]);
    run(&["rmi", &name]);
    let dir = tempfile::tempdir().unwrap();
    project(
        &dir.path().join("scripts"),
        "acme/pulled",
        &descriptor(&name, serde_json::json!({})),
        "#!/bin/sh\necho \"running in the pulled image\"\n",
    );
    let decap = start(dir.path(), &engine(), &[], &[]);
    let api = decap.api();
    let id = api.request("acme/pulled", &["main"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    let log = log_of(&decap, &id).await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(
        log.starts_with(&format!(
            "[decap: image {name} is not present here: pulling it]"
        )),
        "{log}"
    );
    assert!(log.contains(&format!("[decap: pulled {name} in ")), "{log}");
    assert!(log.contains("running in the pulled image"), "{log}");
    let _ = Command::new("podman").args(["rmi", &name]).output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_keeps_its_containers_for_a_look_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    plain(
        &dir.path().join("scripts"),
        "acme/broken",
        "#!/bin/sh\necho \"about to fail\"\nexit 2\n",
    );
    plain(
        &dir.path().join("scripts"),
        "acme/fine",
        "#!/bin/sh\necho fine\n",
    );
    let decap = start(
        dir.path(),
        &engine(),
        &["--keep-failed-containers-secs", "3"],
        &[],
    );
    let api = decap.api();
    let broken = api.request("acme/broken", &["main"]).await.remove(0);
    let fine = api.request("acme/fine", &["main"]).await.remove(0);
    assert_eq!(api.finished(&broken, MINUTE).await["status"], "failed");
    assert_eq!(api.finished(&fine, MINUTE).await["status"], "succeeded");
    containers_removed(&fine).await;
    // The failed one is still there to look at, then goes.
    let kept = containers_of(&broken);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let out = Command::new("podman")
        .args(["logs", &kept[0]])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("about to fail"));
    containers_removed(&broken).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decap_starts_before_its_engine_and_builds_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    plain(
        &dir.path().join("scripts"),
        "acme/early",
        "#!/bin/sh\necho \"built once the engine came\"\n",
    );
    let socket = dir.path().join("engine.sock");
    let decap = start(dir.path(), &socket, &[], &[]);
    let api = decap.api();
    let id = api.request("acme/early", &["main"]).await.remove(0);
    let b = eventually("the build to wait deferred", MINUTE, || async {
        let b = api.build(&id).await;
        (b["status"] == "deferred").then_some(b)
    })
    .await;
    assert!(
        b["message"]
            .as_str()
            .unwrap_or_default()
            .contains("container engine"),
        "{b}"
    );
    let _service = Service::start(&socket);
    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert!(
        log_of(&decap, &id)
            .await
            .contains("built once the engine came")
    );
}

/// A `shell` preset project whose repository names the `redis` service in
/// its `.decap.json`: the build runs in the preset's image (the operator's
/// choice here: the bed's redis image, which has redis-cli) with the
/// catalog's redis sidecar (of the operator's image), reached at
/// `REDIS_URL`, its tree fetched from the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_build_runs_in_its_image_with_a_service_of_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("test.sh"),
        "set -e\nredis-cli -u \"$REDIS_URL\" set greeting hi >/dev/null\n\
         echo \"redis says $(redis-cli -u \"$REDIS_URL\" get greeting) to user $(id -u) in $(pwd)\"\n",
    )
    .unwrap();
    std::fs::write(repo.join(".decap.json"), r#"{"services": ["redis"]}"#).unwrap();
    let git = Command::new("sh")
        .args([
            "-ec",
            "git init -q -b main . && git add -A && git -c user.name=Dev -c user.email=dev@example.com commit -qm one",
        ])
        .current_dir(&repo)
        .status()
        .unwrap();
    assert!(git.success());
    let scripts = dir.path().join("scripts/acme/preset");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(
        scripts.join("project.json"),
        serde_json::json!({"language": "shell", "repoUrl": repo.to_string_lossy()}).to_string(),
    )
    .unwrap();
    let shell_image = format!("shell={}", redis());
    let redis_image = format!("redis={}", redis());
    let decap = start(
        dir.path(),
        &engine(),
        &[
            "--preset-image",
            &shell_image,
            "--service-image",
            &redis_image,
        ],
        &[],
    );
    let api = decap.api();
    let id = api.request("acme/preset", &["main"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    let log = log_of(&decap, &id).await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(
        log.contains("redis says hi to user 1000 in /decap/workspace/src"),
        "{log}"
    );
    assert!(
        log.contains("REDIS_URL=redis://127.0.0.1:6379/0 (redis)"),
        "{log}"
    );
    assert!(
        log.contains("[decap: sidecar redis passed its readinessProbe at "),
        "{log}"
    );
    assert!(log.contains("── phase test: passed in "), "{log}");
    let phases = common::presets::phase_exit_codes(&b);
    assert_eq!(phases, [0, 0, 0], "{b}");
    containers_removed(&id).await;
}

/// Makes a project's repository in a folder.
type Maker = fn(&Path);

/// The python, node, go and rust presets in containers, in the bed's image
/// with those toolchains (`--preset-image`; the presets' own images are in
/// registries these machines cannot reach).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_node_go_and_rust_presets_build_in_containers() {
    use common::presets::{go_project, node_project, python_project, rust_project};
    let dir = tempfile::tempdir().unwrap();
    let image = var("DECAP_TEST_PRESETS_IMAGE");
    let makers: [(&str, Maker); 4] = [
        ("python", python_project),
        ("node", node_project),
        ("go", go_project),
        ("rust", rust_project),
    ];
    let mut flags = Vec::new();
    for (language, make) in makers {
        let repo = dir.path().join("repos").join(language);
        make(&repo);
        let project = dir.path().join("scripts/langs").join(language);
        std::fs::create_dir_all(&project).unwrap();
        std::fs::write(
            project.join("project.json"),
            serde_json::json!({"language": language, "repoUrl": repo.to_string_lossy()})
                .to_string(),
        )
        .unwrap();
        flags.push(format!("{language}={image}"));
    }
    let images = flags.join(",");
    let decap = start(dir.path(), &engine(), &["--preset-image", &images], &[]);
    let api = decap.api();
    for (language, _) in makers {
        let id = api
            .request(&format!("langs/{language}"), &["main"])
            .await
            .remove(0);
        let b = api.finished(&id, 3 * MINUTE).await;
        let log = log_of(&decap, &id).await;
        assert_eq!(b["status"], "succeeded", "{language}: {b}\n{log}");
        assert_eq!(b["executor"], "container", "{b}");
        let phases = common::presets::phase_exit_codes(&b);
        assert_eq!(phases, [0, 0, 0], "{language}: {b}");
        assert!(
            log.contains(&format!("[decap: the {language} preset, at commit ")),
            "{log}"
        );
        containers_removed(&id).await;
    }
}
