//! Shared helpers of the `decap` tests: a scripts folder, signed webhooks and
//! a real `decap serve` process.
#![allow(dead_code, clippy::unwrap_used)]

pub mod app;
#[cfg(feature = "aws")]
pub mod aws;
pub mod presets;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-webhook-secret";
pub const TOKEN: &str = "test-api-token";

/// Writes a project into a scripts folder.
pub fn project(root: &Path, key: &str, descriptor: &str, script: &str) {
    let dir = root.join(key);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("project.json"), descriptor).unwrap();
    std::fs::write(dir.join("build.sh"), script).unwrap();
}

/// A push payload from the real GitHub fixture, rewritten to `team/project`,
/// `ref` and `after`.
pub fn push_payload(team: &str, project: &str, git_ref: &str, after: &str) -> Vec<u8> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/github/push-with-new-branch.payload.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    v["ref"] = git_ref.into();
    v["after"] = after.into();
    v["deleted"] = false.into();
    v["repository"]["name"] = project.into();
    v["repository"]["owner"]["login"] = team.into();
    v["repository"]["owner"]["name"] = team.into();
    serde_json::to_vec(&v).unwrap()
}

/// `sha256=<hex>` of the body.
pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A log without the local executor's note that it runs builds on the
/// host rather than in their `buildImage` (every local build's first line).
pub fn script_lines(log: &str) -> String {
    log.split_inclusive('\n')
        .filter(|l| !l.starts_with("[decap: builds of this project run on the host"))
        .collect()
}

/// A running `decap serve`, killed on drop.
pub struct Decap {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub scripts: PathBuf,
}

impl Decap {
    pub fn start(data_dir: &Path, scripts: &Path, extra: &[&str]) -> Decap {
        Decap::start_with_env(data_dir, scripts, extra, &[])
    }

    pub fn start_with_env(
        data_dir: &Path,
        scripts: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Decap {
        let sandbox: &[&str] = if extra.contains(&"--sandbox") {
            &[]
        } else {
            &["--sandbox", "none"]
        };
        // A test that restarts the server on the same address passes
        // DECAP_LISTEN.
        let listen: &[&str] = if env.iter().any(|(k, _)| *k == "DECAP_LISTEN") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_decap"))
            .arg("serve")
            .args(listen)
            .args(["--kill-grace-secs", "1"])
            .args(sandbox)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--scripts")
            .arg(scripts)
            .args(extra)
            .env("DECAP_GITHUB_WEBHOOK_SECRET", SECRET)
            .env("DECAP_API_TOKEN", TOKEN)
            .env("DECAP_LOG", "warn")
            // A test's builds end with its server (a test that restarts it
            // under running builds says DECAP_STOP_BUILDS_ON_EXIT=false).
            .env("DECAP_STOP_BUILDS_ON_EXIT", "true")
            // A build of a server that is gone for good stops trying soon.
            .env("DECAP_BCTOOL_RETRY_SECS", "30")
            .env("DECAP_BCTOOL", env!("CARGO_BIN_EXE_bctool"))
            // Beside the data dir, not in the user's ~/.config.
            .env(
                "DECAP_SECRETS_KEY_FILE",
                data_dir
                    .parent()
                    .unwrap_or(data_dir)
                    .join("secrets-key/secrets.key"),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("decap starts");
        relay_stderr(&mut child);
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("decap: serving ") {
                        break url.to_owned();
                    }
                }
                _ => panic!("decap exited before serving"),
            }
        };
        Decap {
            child,
            url,
            data_dir: data_dir.to_owned(),
            scripts: scripts.to_owned(),
        }
    }

    pub fn api(&self) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: self.url.clone(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        // A server that stops leaves nothing behind (its builds' mounts and
        // cgroups); one that is killed leaves them to the next start.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

/// Copies a server's standard error into the test's own output, which the
/// test harness shows only for a test that fails: the warnings and errors
/// that tests of failures bring about on purpose stay out of a green run.
/// Call from the test's thread (the reader thread inherits its capture).
pub fn relay_stderr(child: &mut std::process::Child) {
    if let Some(err) = child.stderr.take() {
        relay(err);
    }
}

/// [`relay_stderr`] for a process started with tokio.
pub fn relay_stderr_async(child: &mut tokio::process::Child) {
    if let Some(err) = child.stderr.take()
        && let Ok(fd) = err.into_owned_fd()
    {
        // tokio left it non-blocking; the reader thread blocks.
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        if let Ok(flags) = fcntl(&fd, FcntlArg::F_GETFL) {
            let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
            let _ = fcntl(&fd, FcntlArg::F_SETFL(flags));
        }
        relay(std::fs::File::from(fd));
    }
}

fn relay(from: impl std::io::Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
}

/// Polls `f` until it returns Some or the time is up.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A small HTTP helper for the tests.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    pub async fn json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn send(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn webhook(&self, event: &str, delivery: &str, body: &[u8]) -> reqwest::Response {
        self.http
            .post(format!("{}/hooks/github", self.base))
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sign(SECRET, body))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    pub async fn build(&self, id: &str) -> serde_json::Value {
        self.json(&format!("/api/v1/build/{id}")).await
    }

    /// Waits for a build to reach a final status and returns it.
    pub async fn finished(&self, id: &str, limit: Duration) -> serde_json::Value {
        let api = self.clone();
        let id = id.to_owned();
        eventually(&format!("build {id} to finish"), limit, move || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let b = api.build(&id).await;
                let st = b["status"].as_str().unwrap().to_owned();
                (!matches!(st.as_str(), "queued" | "deferred" | "running")).then_some(b)
            }
        })
        .await
    }

    /// A build's console log as it stands (live, or stored once ended).
    pub async fn log(&self, id: &str) -> String {
        self.get(&format!("/api/v1/logs/{id}"))
            .await
            .text()
            .await
            .unwrap()
    }

    /// The names of a build's artifacts, one per line.
    pub async fn artifact_names(&self, id: &str) -> String {
        self.http
            .get(format!("{}/api/v1/artifacts/{id}", self.base))
            .header("accept", "text/plain")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Requests a build of a new branch `PREFIX-n` of `project` every
    /// 300 ms until one waits deferred (the executor was seen to be away);
    /// returns every id requested and that build.
    pub async fn request_until_deferred(
        &self,
        project: &str,
        prefix: &str,
    ) -> (Vec<String>, serde_json::Value) {
        let mut ids = Vec::new();
        for n in 0..60 {
            let id = self
                .request(project, &[&format!("{prefix}-{n}")])
                .await
                .remove(0);
            ids.push(id.clone());
            tokio::time::sleep(Duration::from_millis(300)).await;
            let b = self.build(&id).await;
            if b["status"] == "deferred" {
                return (ids, b);
            }
        }
        panic!("no build of {project} waited deferred");
    }

    /// Requests manual builds; returns their ids.
    pub async fn request(&self, project: &str, branches: &[&str]) -> Vec<String> {
        let q: Vec<String> = branches.iter().map(|b| format!("branch={b}")).collect();
        let r = self
            .send(
                reqwest::Method::POST,
                &format!("/api/v1/builds/{project}?{}", q.join("&")),
            )
            .await;
        assert_eq!(r.status(), 202, "requesting builds of {project}");
        let v: serde_json::Value = r.json().await.unwrap();
        v["builds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_owned())
            .collect()
    }
}
