//! Builds as local child processes.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use decap_core::build::BuildId;
use decap_core::ports::{EnvironmentExit, Executor, ExecutorEvents, LaunchSpec};
use decap_core::{Error, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Whether builds run inside bubblewrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Use bubblewrap when it is installed and works; otherwise run unsandboxed.
    Auto,
    /// Require bubblewrap; refuse to start without it.
    Bubblewrap,
    /// Never sandbox.
    None,
}

/// How the local executor runs builds.
#[derive(Debug, Clone)]
pub struct LocalExecutorConfig {
    /// Where each build's fresh workspace is made (`ROOT/<build id>`).
    pub work_root: PathBuf,
    /// Folders the sandbox hides from builds (the data dir: other builds'
    /// logs, the database).
    pub hide: Vec<PathBuf>,
    /// How to run bctool: a program and its leading arguments (`[bctool]`,
    /// or `[decap, bctool]` when the controller binary carries it).
    pub bctool: Vec<std::ffi::OsString>,
    /// Sandboxing.
    pub sandbox: SandboxMode,
    /// How long a stopped build gets between TERM and KILL.
    pub kill_grace: Duration,
    /// `PATH` inside builds.
    pub path: String,
}

/// [`Executor`] that runs each build under bctool as a child process in its
/// own process group and fresh workspace, removed when the build ends.
///
/// The environment is cleared: a build sees the documented variables, the
/// descriptor's `env`, `PATH`, `HOME` and `TMPDIR`, and none of the server's
/// own secrets.
pub struct LocalExecutor {
    config: LocalExecutorConfig,
    bwrap: Option<PathBuf>,
    children: Arc<Mutex<HashMap<BuildId, Pid>>>,
    events: Arc<dyn ExecutorEvents>,
}

fn exec_err(e: impl std::fmt::Display) -> Error {
    Error::backend("executor", e)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether bubblewrap is installed and can make a sandbox here (it needs
/// user namespaces or setuid, which some containers refuse).
fn probe_bwrap() -> Option<PathBuf> {
    let bwrap = find_in_path("bwrap")?;
    let ok = std::process::Command::new(&bwrap)
        .args([
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--unshare-pid",
            "true",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bwrap)
}

impl LocalExecutor {
    /// Makes an executor, probing for bubblewrap as `config.sandbox` asks.
    pub fn new(config: LocalExecutorConfig, events: Arc<dyn ExecutorEvents>) -> Result<Self> {
        let Some(program) = config.bctool.first() else {
            return Err(Error::invalid("bctool", "no bctool command given"));
        };
        if !Path::new(program).is_file() {
            return Err(Error::invalid(
                "bctool",
                format!(
                    "{} does not exist; build it with `cargo build --bin bctool` or pass --bctool",
                    Path::new(program).display()
                ),
            ));
        }
        let bwrap = match config.sandbox {
            SandboxMode::None => None,
            SandboxMode::Auto => probe_bwrap(),
            SandboxMode::Bubblewrap => Some(probe_bwrap().ok_or_else(|| {
                Error::invalid(
                    "sandbox",
                    "bubblewrap was required but `bwrap` is not installed or cannot create a sandbox here",
                )
            })?),
        };
        std::fs::create_dir_all(&config.work_root).map_err(exec_err)?;
        Ok(LocalExecutor {
            config,
            bwrap,
            children: Arc::new(Mutex::new(HashMap::new())),
            events,
        })
    }

    fn write_workspace(&self, spec: &LaunchSpec, ws: &Path) -> Result<()> {
        if ws.exists() {
            std::fs::remove_dir_all(ws).map_err(exec_err)?;
        }
        for sub in ["scripts", "src", "artifacts", "home", "tmp"] {
            std::fs::create_dir_all(ws.join(sub)).map_err(exec_err)?;
        }
        for file in &spec.project.files {
            // Paths come from the catalog, which only holds plain relative
            // paths read from the scripts folder; check again all the same.
            if file
                .path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(exec_err(format!("unsafe script path {:?}", file.path)));
            }
            let path = ws.join("scripts").join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(exec_err)?;
            }
            std::fs::write(&path, &file.content).map_err(exec_err)?;
            let mode = if file.executable || file.path == "build.sh" {
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(exec_err)?;
        }
        Ok(())
    }

    fn command(&self, spec: &LaunchSpec, ws: &Path) -> tokio::process::Command {
        let build = &spec.build;
        let script = ws.join("scripts/build.sh");
        let shebang = spec
            .project
            .files
            .iter()
            .find(|f| f.path == "build.sh")
            .is_some_and(|f| f.content.starts_with(b"#!"));
        let mut bctool_args: Vec<String> = vec![
            "run".into(),
            "--exit-with-parent".into(),
            "--timeout-secs".into(),
            spec.timeout.as_secs().max(1).to_string(),
            "--kill-grace-secs".into(),
            self.config.kill_grace.as_secs().max(1).to_string(),
            "--max-log-bytes".into(),
            spec.max_log_bytes.to_string(),
            "--".into(),
        ];
        if !shebang {
            bctool_args.push("/bin/sh".into());
        }
        bctool_args.push(script.to_string_lossy().into_owned());

        let program = &self.config.bctool[0];
        let lead = &self.config.bctool[1..];
        let mut cmd = match &self.bwrap {
            None => {
                let mut c = tokio::process::Command::new(program);
                c.args(lead).args(&bctool_args);
                c
            }
            Some(bwrap) => {
                let mut c = tokio::process::Command::new(bwrap);
                c.args([
                    "--die-with-parent",
                    "--new-session",
                    "--unshare-pid",
                    "--unshare-ipc",
                    "--unshare-uts",
                ])
                .args([
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "--tmpfs",
                    "/tmp",
                ]);
                for hidden in &self.config.hide {
                    c.arg("--tmpfs").arg(hidden);
                }
                c.arg("--bind").arg(ws).arg(ws);
                c.arg("--ro-bind").arg(program).arg(program);
                c.arg("--chdir").arg(ws.join("src"));
                c.arg("--").arg(program).args(lead).args(&bctool_args);
                c
            }
        };
        cmd.env_clear()
            .current_dir(ws.join("src"))
            .env("PATH", &self.config.path)
            .env("HOME", ws.join("home"))
            .env("TMPDIR", ws.join("tmp"))
            .env("LANG", "C.UTF-8");
        for (k, v) in &spec
            .project
            .descriptor
            .as_ref()
            .map(|d| d.descriptor.env.clone())
            .unwrap_or_default()
        {
            cmd.env(k, v);
        }
        cmd.env("BUILD_ID", build.id.to_string())
            .env("PROJECT_KEY", build.project.to_string())
            .env("BRANCH_TO_BUILD", &build.branch)
            .env("BUILD_LOCK_KEY", build.lock_key().as_str())
            .env("COMMIT_SHA", build.commit.as_deref().unwrap_or(""))
            .env("ARTIFACTS_DIR", ws.join("artifacts"))
            .env("DECAP_URL", &spec.decap_url)
            .env("DECAP_BUILD_TOKEN", &spec.build_token)
            .env(
                "DECAP_SCRIPTS_COMMIT",
                build.scripts_commit.as_deref().unwrap_or(""),
            )
            .env("DECAP_BUILD_SCRIPTS", ws.join("scripts"));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false);
        cmd
    }

    fn signal(&self, build: BuildId, signal: Signal) -> bool {
        let pgid = self
            .children
            .lock()
            .ok()
            .and_then(|c| c.get(&build).copied());
        match pgid {
            Some(pgid) => killpg(pgid, signal).is_ok(),
            None => false,
        }
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn sandbox(&self) -> &'static str {
        if self.bwrap.is_some() {
            "bubblewrap"
        } else {
            "none"
        }
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<()> {
        let id = spec.build.id;
        if self.children.lock().map_err(exec_err)?.contains_key(&id) {
            return Ok(()); // already running: adopt, never duplicate
        }
        let ws = self.config.work_root.join(id.to_string());
        self.write_workspace(&spec, &ws)?;
        let mut child = self.command(&spec, &ws).spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&ws);
            exec_err(format!("cannot start bctool: {e}"))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| exec_err("bctool exited at once"))?;
        let pgid = Pid::from_raw(pid as i32);
        self.children.lock().map_err(exec_err)?.insert(id, pgid);

        // A backstop in case bctool itself hangs: its own timeout plus grace
        // plus a minute, then the whole process group is killed.
        let backstop = spec.timeout + self.config.kill_grace * 2 + Duration::from_secs(60);
        let children = self.children.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                () = tokio::time::sleep(backstop) => {
                    tracing::warn!(build_id = %id, "bctool outlived its timeout; killing the build");
                    let _ = killpg(pgid, Signal::SIGKILL);
                    child.wait().await
                }
            };
            // Whatever the script left behind in its group goes too.
            let _ = killpg(pgid, Signal::SIGKILL);
            if let Ok(mut c) = children.lock() {
                c.remove(&id);
            }
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&ws)).await;
            let reason = match status {
                Ok(s) => format!("the build process exited ({s})"),
                Err(e) => format!("the build process could not be awaited: {e}"),
            };
            events.environment_exited(EnvironmentExit {
                build_id: id,
                reason,
            });
        });
        Ok(())
    }

    async fn cancel(&self, build: BuildId) -> Result<()> {
        if !self.signal(build, Signal::SIGTERM) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.config.kill_grace;
        while tokio::time::Instant::now() < deadline {
            let alive = self.children.lock().map_err(exec_err)?.contains_key(&build);
            if !alive {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.signal(build, Signal::SIGKILL);
        Ok(())
    }

    async fn live(&self) -> Result<Vec<BuildId>> {
        Ok(self
            .children
            .lock()
            .map_err(exec_err)?
            .keys()
            .copied()
            .collect())
    }
}
