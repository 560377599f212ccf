//! Builds as local child processes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use decap_api_types::StandbyLaunch;
use decap_core::build::BuildId;
use decap_core::ports::{EnvironmentExit, Executor, ExecutorEvents, LaunchSpec};
use decap_core::{Error, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;

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
    /// Where each build's fresh workspace is made. Emptied at start-up: what
    /// is left there belongs to builds of an earlier run, which are gone.
    pub work_root: PathBuf,
    /// Folders the sandbox hides from builds (the data dir: other builds'
    /// logs, the database).
    pub hide: Vec<PathBuf>,
    /// How to run bctool: a program and its leading arguments (`[bctool]`,
    /// or `[decap, bctool]` when the controller binary carries it).
    pub bctool: Vec<OsString>,
    /// Sandboxing.
    pub sandbox: SandboxMode,
    /// How long a stopped build gets between TERM and KILL.
    pub kill_grace: Duration,
    /// `PATH` inside builds.
    pub path: String,
    /// How many warm bctools (each in its own fresh workspace and sandbox)
    /// wait for the next builds, so that a launch does not pay for starting
    /// bctool and the sandbox. 0 starts every build cold.
    pub warm: usize,
}

/// [`Executor`] that runs each build under bctool as a child process in its
/// own process group and fresh workspace, removed when the build ends.
///
/// The environment is cleared: a build sees the documented variables, the
/// descriptor's `env`, `PATH`, `HOME` and `TMPDIR`, and none of the server's
/// own secrets.
///
/// A small pool of warm bctools (`bctool standby`) waits, each already in
/// its workspace and sandbox; a launch writes the scripts into a warm
/// workspace and hands bctool the build over its standard input. With the
/// pool empty, a launch starts bctool cold; both paths run the same bctool.
pub struct LocalExecutor {
    inner: Arc<Inner>,
}

struct Inner {
    config: LocalExecutorConfig,
    bwrap: Option<PathBuf>,
    children: Mutex<HashMap<BuildId, Pid>>,
    warm: Mutex<Vec<Warm>>,
    events: Arc<dyn ExecutorEvents>,
}

/// A bctool waiting for a build.
struct Warm {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    ws: PathBuf,
    pgid: Pid,
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

/// Whether bubblewrap is installed and can make a sandbox here.
pub fn bubblewrap_works() -> bool {
    probe_bwrap().is_some()
}

/// Where bubblewrap is, if it is installed and can make a sandbox here (it
/// needs user namespaces or setuid, which some containers refuse).
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

/// Makes a fresh, empty workspace.
fn make_workspace(ws: &Path) -> Result<()> {
    if ws.exists() {
        std::fs::remove_dir_all(ws).map_err(exec_err)?;
    }
    for sub in ["scripts", "src", "artifacts", "home", "tmp"] {
        std::fs::create_dir_all(ws.join(sub)).map_err(exec_err)?;
    }
    Ok(())
}

/// Writes the project's files (at the pinned scripts commit) into `ws/scripts`.
fn write_scripts(spec: &LaunchSpec, ws: &Path) -> Result<()> {
    for file in &spec.project.files {
        // Paths come from the catalog, which only holds plain relative paths
        // read from the scripts folder; check again all the same.
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
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(exec_err)?;
    }
    Ok(())
}

impl LocalExecutor {
    /// Makes an executor, probing for bubblewrap as `config.sandbox` asks,
    /// and starts the warm pool.
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
        if config.work_root.exists() {
            std::fs::remove_dir_all(&config.work_root).map_err(exec_err)?;
        }
        std::fs::create_dir_all(&config.work_root).map_err(exec_err)?;
        let inner = Arc::new(Inner {
            config,
            bwrap,
            children: Mutex::new(HashMap::new()),
            warm: Mutex::new(Vec::new()),
            events,
        });
        for _ in 0..inner.config.warm {
            match inner.start_warm() {
                Ok(w) => inner.park(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a warm bctool; builds start cold");
                    break;
                }
            }
        }
        Ok(LocalExecutor { inner })
    }
}

impl Inner {
    /// bctool's command line, wrapped in bubblewrap when sandboxing.
    fn bctool_command(&self, ws: &Path, bctool_args: &[String]) -> tokio::process::Command {
        let program = &self.config.bctool[0];
        let lead = &self.config.bctool[1..];
        let mut cmd = match &self.bwrap {
            None => {
                let mut c = tokio::process::Command::new(program);
                c.args(lead).args(bctool_args);
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
                c.arg("--").arg(program).args(lead).args(bctool_args);
                c
            }
        };
        cmd.env_clear()
            .current_dir(ws.join("src"))
            .env("PATH", &self.config.path)
            .env("HOME", ws.join("home"))
            .env("TMPDIR", ws.join("tmp"))
            .env("LANG", "C.UTF-8")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false);
        cmd
    }

    /// The build's environment: cleared, then the documented variables.
    fn build_env(&self, spec: &LaunchSpec, ws: &Path) -> Vec<(String, String)> {
        let build = &spec.build;
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), self.config.path.clone()),
            ("HOME".into(), path(ws.join("home"))),
            ("TMPDIR".into(), path(ws.join("tmp"))),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        if let Some(d) = &spec.project.descriptor {
            env.extend(d.descriptor.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        env.extend([
            ("BUILD_ID".into(), build.id.to_string()),
            ("PROJECT_KEY".into(), build.project.to_string()),
            ("BRANCH_TO_BUILD".into(), build.branch.clone()),
            ("BUILD_LOCK_KEY".into(), build.lock_key().to_string()),
            (
                "COMMIT_SHA".into(),
                build.commit.clone().unwrap_or_default(),
            ),
            ("ARTIFACTS_DIR".into(), path(ws.join("artifacts"))),
            ("DECAP_URL".into(), spec.decap_url.clone()),
            ("DECAP_BUILD_TOKEN".into(), spec.build_token.clone()),
            (
                "DECAP_SCRIPTS_COMMIT".into(),
                build.scripts_commit.clone().unwrap_or_default(),
            ),
            ("DECAP_BUILD_SCRIPTS".into(), path(ws.join("scripts"))),
        ]);
        env
    }

    /// The script's command line: run directly when it has a shebang, with
    /// `sh` otherwise.
    fn script_command(spec: &LaunchSpec, ws: &Path) -> Vec<String> {
        let shebang = spec
            .project
            .files
            .iter()
            .find(|f| f.path == "build.sh")
            .is_some_and(|f| f.content.starts_with(b"#!"));
        let script = ws.join("scripts/build.sh").to_string_lossy().into_owned();
        if shebang {
            vec![script]
        } else {
            vec!["/bin/sh".into(), script]
        }
    }

    fn start_warm(&self) -> Result<Warm> {
        let ws = self
            .config
            .work_root
            .join(format!("warm-{}", uuid::Uuid::now_v7()));
        make_workspace(&ws)?;
        let mut cmd = self.bctool_command(&ws, &["standby".into(), "--exit-with-parent".into()]);
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&ws);
            exec_err(format!("cannot start bctool: {e}"))
        })?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| exec_err("bctool has no stdin"))?;
        let pid = child
            .id()
            .ok_or_else(|| exec_err("bctool exited at once"))?;
        Ok(Warm {
            child,
            stdin,
            ws,
            pgid: Pid::from_raw(pid as i32),
        })
    }

    fn park(&self, warm: Warm) {
        if let Ok(mut pool) = self.warm.lock() {
            pool.push(warm);
        }
    }

    /// Starts a warm bctool in the background to replace one taken.
    fn replenish(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            // Not at the same instant as the build it replaces is starting:
            // the two would compete for the CPU.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tokio::task::spawn_blocking(move || match this.start_warm() {
                Ok(w) => this.park(w),
                Err(e) => tracing::warn!(error = %e, "cannot start a warm bctool"),
            })
            .await;
        });
    }

    /// Hands a build to a warm bctool; gives the spec back when none could take it.
    async fn launch_warm(
        self: &Arc<Self>,
        spec: &LaunchSpec,
    ) -> Result<Option<(tokio::process::Child, Pid, PathBuf)>> {
        loop {
            let Some(mut warm) = self.warm.lock().ok().and_then(|mut p| p.pop()) else {
                return Ok(None);
            };
            self.replenish();
            write_scripts(spec, &warm.ws)?;
            let launch = StandbyLaunch {
                server: spec.decap_url.clone(),
                build_id: spec.build.id.to_string(),
                token: spec.build_token.clone(),
                command: Self::script_command(spec, &warm.ws),
                env: self.build_env(spec, &warm.ws),
                cwd: warm.ws.join("src").to_string_lossy().into_owned(),
                artifacts_dir: warm.ws.join("artifacts").to_string_lossy().into_owned(),
                timeout_secs: spec.timeout.as_secs().max(1),
                kill_grace_secs: self.config.kill_grace.as_secs().max(1),
                max_log_bytes: spec.max_log_bytes,
                bctool_env: spec.bctool_env.clone(),
            };
            let mut line = serde_json::to_vec(&launch).map_err(exec_err)?;
            line.push(b'\n');
            let sent = async {
                warm.stdin.write_all(&line).await?;
                warm.stdin.flush().await
            }
            .await;
            match sent {
                Ok(()) => {
                    drop(warm.stdin);
                    return Ok(Some((warm.child, warm.pgid, warm.ws)));
                }
                Err(e) => {
                    // That one died while waiting; try the next.
                    tracing::warn!(error = %e, "a warm bctool was gone");
                    let _ = killpg(warm.pgid, Signal::SIGKILL);
                    let _ = warm.child.wait().await;
                    let _ = std::fs::remove_dir_all(&warm.ws);
                }
            }
        }
    }

    fn launch_cold(&self, spec: &LaunchSpec) -> Result<(tokio::process::Child, Pid, PathBuf)> {
        let ws = self.config.work_root.join(spec.build.id.to_string());
        make_workspace(&ws)?;
        write_scripts(spec, &ws)?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--exit-with-parent".into(),
            "--echo".into(),
            "false".into(),
            "--timeout-secs".into(),
            spec.timeout.as_secs().max(1).to_string(),
            "--kill-grace-secs".into(),
            self.config.kill_grace.as_secs().max(1).to_string(),
            "--max-log-bytes".into(),
            spec.max_log_bytes.to_string(),
            "--".into(),
        ];
        args.extend(Self::script_command(spec, &ws));
        let mut cmd = self.bctool_command(&ws, &args);
        cmd.stdin(Stdio::null());
        // bctool passes its own environment on to the script, less its own
        // settings.
        cmd.env_clear()
            .envs(self.build_env(spec, &ws))
            .envs(spec.bctool_env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&ws);
            exec_err(format!("cannot start bctool: {e}"))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| exec_err("bctool exited at once"))?;
        Ok((child, Pid::from_raw(pid as i32), ws))
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
        if self.inner.bwrap.is_some() {
            "bubblewrap"
        } else {
            "none"
        }
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<()> {
        let inner = &self.inner;
        let id = spec.build.id;
        if inner.children.lock().map_err(exec_err)?.contains_key(&id) {
            return Ok(()); // already running: adopt, never duplicate
        }
        let (mut child, pgid, ws) = match inner.launch_warm(&spec).await? {
            Some(started) => started,
            None => inner.launch_cold(&spec)?,
        };
        inner.children.lock().map_err(exec_err)?.insert(id, pgid);

        // A backstop in case bctool itself hangs: its own timeout plus grace
        // plus a minute, then the whole process group is killed.
        let backstop = spec.timeout + inner.config.kill_grace * 2 + Duration::from_secs(60);
        let inner = inner.clone();
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
            if let Ok(mut c) = inner.children.lock() {
                c.remove(&id);
            }
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&ws)).await;
            let reason = match status {
                Ok(s) => format!("the build process exited ({s})"),
                Err(e) => format!("the build process could not be awaited: {e}"),
            };
            inner.events.environment_exited(EnvironmentExit {
                build_id: id,
                reason,
            });
        });
        Ok(())
    }

    async fn cancel(&self, build: BuildId) -> Result<()> {
        let inner = &self.inner;
        if !inner.signal(build, Signal::SIGTERM) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + inner.config.kill_grace;
        while tokio::time::Instant::now() < deadline {
            let alive = inner
                .children
                .lock()
                .map_err(exec_err)?
                .contains_key(&build);
            if !alive {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        inner.signal(build, Signal::SIGKILL);
        Ok(())
    }

    async fn live(&self) -> Result<Vec<BuildId>> {
        Ok(self
            .inner
            .children
            .lock()
            .map_err(exec_err)?
            .keys()
            .copied()
            .collect())
    }
}

impl Drop for LocalExecutor {
    fn drop(&mut self) {
        // Warm bctools see their standard input close and exit; make sure.
        if let Ok(mut pool) = self.inner.warm.lock() {
            for w in pool.drain(..) {
                let _ = killpg(w.pgid, Signal::SIGKILL);
                let _ = std::fs::remove_dir_all(&w.ws);
            }
        }
    }
}
