//! What the benchmark binaries share: a real `decap serve` from the same
//! target folder, started on a free loopback port and stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// The webhook secret the benchmarks' servers take.
pub const SECRET: &str = "bench-secret";
/// The API token the benchmarks' servers take.
pub const TOKEN: &str = "bench-token";

/// The folder of the running benchmark binary, where `decap` is too.
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("no folder")?.to_owned())
}

/// A running `decap serve`, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Where it serves.
    pub url: String,
    _dir: tempfile::TempDir,
    /// Its build-scripts folder.
    pub scripts: PathBuf,
}

impl Drop for Server {
    /// Stops the server as an operator would (SIGTERM), so that it clears
    /// its builds' workspaces and cgroups: left mounted, they would slow the
    /// sandboxes of every later measurement. Killed after 15 s.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `team/project` into a scripts folder.
pub fn write_project(root: &Path, key: &str, descriptor: &str, script: &str) -> Result<()> {
    let dir = root.join(key);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("project.json"), descriptor)?;
    std::fs::write(dir.join("build.sh"), script)?;
    Ok(())
}

/// Starts `decap serve` on a free port over the scripts `setup` writes,
/// with `extra` flags.
pub fn start(setup: impl FnOnce(&Path) -> Result<()>, extra: &[&str]) -> Result<Server> {
    start_with_env(setup, extra, &[])
}

/// [`start`] with variables of its own in the server's environment.
pub fn start_with_env(
    setup: impl FnOnce(&Path) -> Result<()>,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts)?;
    setup(&scripts)?;
    let decap = target_dir()?.join("decap");
    if !decap.is_file() {
        bail!(
            "{} is missing: cargo build --release --bin decap",
            decap.display()
        );
    }
    // Loopback unless the caller says where.
    let listen: &[&str] = if extra.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(decap)
        .args(["serve", "--log-level", "warn"])
        .args(listen)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--scripts")
        .arg(&scripts)
        .args(extra)
        .envs(vars.iter().copied())
        .env("DECAP_GITHUB_WEBHOOK_SECRET", SECRET)
        .env("DECAP_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(u) = l.strip_prefix("decap: serving ") {
                    break u.to_owned();
                }
            }
            _ => bail!("decap exited before serving"),
        }
    };
    Ok(Server {
        child,
        url,
        _dir: dir,
        scripts,
    })
}

/// The `p` quantile of sorted figures.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Asks for `branches` of `project` (`team/name`) with the API token; the
/// answer.
pub async fn request(
    http: &reqwest::Client,
    url: &str,
    project: &str,
    branches: &[String],
) -> Result<serde_json::Value> {
    let q: Vec<String> = branches.iter().map(|b| format!("branch={b}")).collect();
    Ok(http
        .post(format!("{url}/api/v1/builds/{project}?{}", q.join("&")))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .json()
        .await?)
}

/// Requests manual builds of `branches` of `project` (`team/name`) with the
/// API token; returns their ids.
pub async fn request_builds(
    http: &reqwest::Client,
    url: &str,
    project: &str,
    branches: &[String],
) -> Result<Vec<String>> {
    let v = request(http, url, project, branches).await?;
    let ids: Vec<String> = v["builds"]
        .as_array()
        .with_context(|| format!("no builds in the answer: {v}"))?
        .iter()
        .filter_map(|b| b["id"].as_str().map(str::to_owned))
        .collect();
    if ids.len() != branches.len() {
        bail!(
            "{} builds asked, {} started: {v}",
            branches.len(),
            ids.len()
        );
    }
    Ok(ids)
}
