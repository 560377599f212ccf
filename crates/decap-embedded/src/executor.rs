//! Builds as local child processes, each in a sandbox of its own.

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
use decap_core::descriptor::Network;
use decap_core::limits::{DefaultLimits, LimitHit, Limits};
use decap_core::ports::{EnvironmentExit, Executor, ExecutorEvents, LaunchSpec};
use decap_core::{Error, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::record::{EnvRecord, ProcId, unix_now};
use crate::sandbox::cgroup::{BuildCgroup, Cgroups};
use crate::sandbox::disk::{DiskQuota, Workspace};
use crate::sandbox::{Plan, Sandbox, SandboxDir, SandboxNetwork, WORKSPACE};

/// Whether builds run in a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// The sandbox (bubblewrap, slirp4netns); the executor refuses to start
    /// when it cannot be made here.
    Bubblewrap,
    /// No sandbox: builds run as the server's user with the host's view.
    None,
}

/// How the sandboxed builds reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// Outbound through slirp4netns (required).
    Slirp4netns,
    /// No network for any build.
    None,
}

/// How the local executor runs builds.
#[derive(Debug, Clone)]
pub struct LocalExecutorConfig {
    /// Where the workspaces, the build socket and bctool (as builds get it)
    /// are. The workspaces' folder is emptied at start-up: what is left there
    /// belongs to builds of an earlier run, which are gone.
    pub dir: SandboxDir,
    /// Host folders the sandbox hides from builds even where it shows the
    /// host (the data dir, the secrets key's folder).
    pub hide: Vec<PathBuf>,
    /// How to run bctool: a program and its leading arguments (`[bctool]`,
    /// or `[decap, bctool]` when the controller binary carries it).
    pub bctool: Vec<OsString>,
    /// `decap-runner`, which waits in warm environments instead of a whole
    /// bctool and becomes bctool when a build arrives (a tenth of its
    /// memory). Without it, warm environments hold `bctool standby`.
    pub runner: Option<PathBuf>,
    /// Sandboxing.
    pub sandbox: SandboxMode,
    /// The network of sandboxed builds.
    pub network: NetworkMode,
    /// As root, build `n` runs as user `uid_base + n`.
    pub uid_base: u32,
    /// The port builds' `DECAP_URL` names inside the sandbox.
    pub url_port: u16,
    /// How long a stopped build gets between TERM and KILL.
    pub kill_grace: Duration,
    /// `PATH` inside builds.
    pub path: String,
    /// How many warm bctools (each in its own fresh workspace and sandbox)
    /// wait for the next builds, so that a launch does not pay for starting
    /// bctool and the sandbox. 0 starts every build cold.
    pub warm: usize,
    /// Limits for what `project.json` does not set.
    pub defaults: DefaultLimits,
}

/// [`Executor`] that runs each build under bctool in a sandbox (see
/// [`crate::sandbox`]) with a fresh workspace, removed when the build ends.
///
/// The environment is cleared: a build sees the documented variables, the
/// descriptor's `env`, `PATH`, `HOME` and `TMPDIR`, and none of the server's
/// own secrets.
///
/// A small pool of warm bctools (`bctool standby`) waits, each already in
/// its workspace and sandbox; a launch writes the scripts into a warm
/// workspace, sets the build's limits on its cgroup and hands bctool the
/// build over its standard input. With the pool empty, a launch starts
/// bctool cold; both paths run the same bctool.
///
/// A build's environment ends when bctool does: the sandbox's PID namespace
/// takes every process of the build with it, and its cgroup is emptied
/// before the end is reported, so that an ended build has no processes.
///
/// Builds outlive the server: bubblewrap and the network helper run in a
/// session of their own, each environment keeps a record beside its
/// workspace ([`crate::record`]), and the next server on the same data dir
/// adopts the builds still running (bctool reaches it on the socket it
/// makes anew in the folder the sandbox has bound) and clears up the rest.
pub struct LocalExecutor {
    inner: Arc<Inner>,
}

struct Inner {
    config: LocalExecutorConfig,
    /// The workspaces' folder.
    work_root: PathBuf,
    /// bctool as the sandbox binds it (staged in the sandbox dir).
    bctool: PathBuf,
    /// `decap-runner` (staged in the sandbox dir when sandboxing).
    runner: Option<PathBuf>,
    /// This server's hold on its sandbox dir.
    _lock: std::fs::File,
    sandbox: Option<Sandbox>,
    cgroups: Option<Cgroups>,
    quota: DiskQuota,
    running: Mutex<HashMap<BuildId, Arc<Running>>>,
    warm: Mutex<Vec<Env>>,
    /// Prepared slots (a user, a workspace, a cgroup) for cold starts.
    slots: Mutex<Vec<Slot>>,
    /// Set at shutdown: what is prepared after it is thrown away.
    closed: std::sync::atomic::AtomicBool,
    /// The removal of the start-up probe's environment, under way in the
    /// background; a release waits for it.
    probe_cleanup: Mutex<Option<tokio::task::JoinHandle<()>>>,
    events: Arc<dyn ExecutorEvents>,
}

/// What an environment stands on, made ahead of time: a build user, a
/// workspace (with its filesystem) and a cgroup. Making them takes tens of
/// milliseconds (a filesystem is made and mounted), so a few wait ready and
/// a build that starts cold does not pay for them.
struct Slot {
    ws: Workspace,
    uid: Option<u32>,
    cgroup: Option<BuildCgroup>,
    disk: Option<u64>,
}

/// What an environment starts: bctool with these arguments, or
/// `decap-runner` with these (a warm one).
enum Entry {
    Bctool(Vec<String>),
    Runner(Vec<String>),
}

/// How many prepared slots wait for cold starts.
const PREPARED_SLOTS: usize = 2;

/// How long after a cold start its slot is replaced.
const SLOT_REFILL_DELAY: Duration = Duration::from_millis(100);

/// A prepared environment: a workspace, a cgroup and a sandbox with bctool
/// in it.
struct Env {
    ws: Arc<Workspace>,
    uid: Option<u32>,
    cgroup: Option<Arc<BuildCgroup>>,
    child: Proc,
    stdin: Option<tokio::process::ChildStdin>,
    /// The sandbox's first process (host pid).
    init_pid: Option<u32>,
    slirp: Option<crate::sandbox::Slirp>,
    pgid: Pid,
    disk: Option<u64>,
}

/// The process an environment lasts as long as: bubblewrap (or bctool,
/// unsandboxed), started by this server or adopted from an earlier one.
enum Proc {
    Child(tokio::process::Child),
    Adopted(ProcId),
}

impl Proc {
    /// Waits for it to exit; answers how, in words, and whether it is
    /// known to have succeeded.
    async fn wait(&mut self) -> (String, bool) {
        match self {
            Proc::Child(c) => match c.wait().await {
                Ok(s) => (format!("the build process exited ({s})"), s.success()),
                Err(e) => (
                    format!("the build process could not be awaited: {e}"),
                    false,
                ),
            },
            Proc::Adopted(p) => {
                // Not this process's child: its exit is seen, not awaited.
                while p.alive() {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                (
                    "the build process exited (it ran on while Decap restarted)".into(),
                    false,
                )
            }
        }
    }

    /// Kills it (its group, when started here).
    fn kill(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.start_kill();
            }
            Proc::Adopted(p) => p.signal(Signal::SIGKILL),
        }
    }

    fn id(&self) -> Option<ProcId> {
        match self {
            Proc::Child(c) => c.id().and_then(ProcId::of),
            Proc::Adopted(p) => Some(*p),
        }
    }
}

/// How often an adopted build's process is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// What a running build's controls need.
struct Running {
    pgid: Pid,
    init_pid: Option<u32>,
    cgroup: Option<Arc<BuildCgroup>>,
    /// Turns true when the environment is gone.
    gone: watch::Receiver<bool>,
}

impl Running {
    /// Sends `signal` to the build's processes: every one in its cgroup,
    /// else bctool (the sandbox's init's child), else bctool's group.
    fn signal(&self, signal: Signal) {
        if let Some(cg) = &self.cgroup {
            cg.signal(signal);
            return;
        }
        if let Some(init) = self.init_pid {
            let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
                .unwrap_or_default();
            for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
            if signal == Signal::SIGKILL {
                let _ = nix::sys::signal::kill(Pid::from_raw(init as i32), signal);
            }
            return;
        }
        let _ = killpg(self.pgid, signal);
    }
}

fn exec_err(e: impl std::fmt::Display) -> Error {
    Error::backend("executor", e)
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            // Administrators' tools (mkfs.ext4) even when PATH lacks them.
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
}

/// Whether bubblewrap is installed (the sandbox may still fail to start:
/// [`LocalExecutor::new`] tries it).
pub fn bubblewrap_works() -> bool {
    find_in_path("bwrap").is_some()
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
    /// Makes an executor and starts its warm pool. With the sandbox, it
    /// first starts one to be sure it works here, and refuses (with the
    /// reason and the fix) when it does not.
    pub async fn new(config: LocalExecutorConfig, events: Arc<dyn ExecutorEvents>) -> Result<Self> {
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
        let lock = config
            .dir
            .lock()
            .map_err(|e| Error::invalid("data dir", e.to_string()))?;
        config.dir.sweep_dead();
        let work_root = config.dir.work_root();
        // Builds an earlier server on this data dir left running, and the
        // environments of its that are over (warm ones, builds that ended
        // while no server ran): those are cleared below.
        let (left, over): (Vec<_>, Vec<_>) = EnvRecord::all(&work_root)
            .into_iter()
            .filter_map(|(ws, r)| Some((ws, r?)))
            .partition(|(_, r)| r.running_build());
        if let Some(r) = &config.runner
            && !r.is_file()
        {
            return Err(Error::invalid(
                "runner",
                format!("{} does not exist", r.display()),
            ));
        }
        let (sandbox, cgroups, bctool, runner) = match config.sandbox {
            SandboxMode::None => (None, None, PathBuf::from(program), config.runner.clone()),
            SandboxMode::Bubblewrap => {
                let (s, c) = Self::sandbox_for(&config).inspect_err(|_| {
                    // A server that cannot start leaves no folder behind
                    // (unless builds still run in it).
                    if left.is_empty() {
                        let _ = std::fs::remove_dir_all(&config.dir.0);
                    }
                })?;
                let staged = config
                    .dir
                    .stage_bctool(Path::new(program))
                    .map_err(|e| exec_err(format!("cannot stage bctool for the sandbox: {e}")))?;
                let runner = match &config.runner {
                    Some(r) => Some(config.dir.stage_runner(r).map_err(|e| {
                        exec_err(format!("cannot stage decap-runner for the sandbox: {e}"))
                    })?),
                    None => None,
                };
                (Some(s), c, staged, runner)
            }
        };
        let quota = if sandbox.is_some() {
            DiskQuota::detect()
        } else {
            DiskQuota::Measured
        };
        // What is not adopted is cleared: environments that were warm or
        // whose build ended while no server ran, and their helpers.
        let keep: Vec<String> = left
            .iter()
            .filter_map(|(ws, _)| Some(ws.file_name()?.to_string_lossy().into_owned()))
            .collect();
        for (_, r) in &over {
            r.kill();
        }
        if let Some(c) = &cgroups {
            c.sweep_except(&keep);
        }
        if work_root.exists() {
            clear_work_root(&work_root, &keep);
        }
        std::fs::create_dir_all(&work_root).map_err(exec_err)?;
        let inner = Arc::new(Inner {
            config,
            work_root,
            bctool,
            runner,
            _lock: lock,
            sandbox,
            cgroups,
            quota,
            running: Mutex::new(HashMap::new()),
            warm: Mutex::new(Vec::new()),
            slots: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            probe_cleanup: Mutex::new(None),
            events,
        });
        tracing::debug!("local executor: folders cleared, tools staged");
        if inner.sandbox.is_some()
            && let Err(e) = inner.try_sandbox().await
        {
            // Nothing of a server that could not start is left behind.
            LocalExecutor { inner }.shutdown().await;
            return Err(e);
        }
        tracing::debug!("local executor: the sandbox works");
        for (ws, record) in left {
            inner.adopt(ws, record);
        }
        inner.refill_slots();
        // Warmed in the background: the server serves meanwhile (what
        // arrives in the first moments starts cold), so that a restart or
        // an upgrade keeps webhooks waiting in the backlog no longer.
        for _ in 0..inner.config.warm {
            inner.replenish();
        }
        Ok(LocalExecutor { inner })
    }

    fn sandbox_for(config: &LocalExecutorConfig) -> Result<(Sandbox, Option<Cgroups>)> {
        let fix = "install bubblewrap and slirp4netns (apt-get install bubblewrap slirp4netns), or pass --sandbox none to run builds unsandboxed";
        let bwrap = find_in_path("bwrap").ok_or_else(|| {
            Error::invalid(
                "sandbox",
                format!("no sandbox can be made: bubblewrap (bwrap) is not installed; {fix}"),
            )
        })?;
        let network = match config.network {
            NetworkMode::None => SandboxNetwork::None,
            NetworkMode::Slirp4netns => SandboxNetwork::Slirp(find_in_path("slirp4netns").ok_or_else(|| {
                Error::invalid(
                    "sandbox",
                    format!("builds would have no network: slirp4netns is not installed; {fix}, or --sandbox-network none to give builds no network"),
                )
            })?),
        };
        let sandbox = Sandbox::new(
            bwrap,
            network,
            config.uid_base,
            config.hide.clone(),
            config.dir.socket(),
            config.url_port,
        );
        let cgroups = match Cgroups::detect(&crate::sandbox::instance(&config.dir.0)) {
            Ok(c) => Some(c),
            Err(why) => {
                tracing::warn!(%why, "memory, CPU and process limits are not enforced: no cgroup can be made for builds");
                None
            }
        };
        Ok((sandbox, cgroups))
    }

    /// The limits builds get here, in words, for the start-up log.
    pub fn describe(&self) -> String {
        let i = &self.inner;
        match &i.sandbox {
            None => "no sandbox: builds run as the server's user and see the host".into(),
            Some(s) => format!(
                "bubblewrap sandbox, network {}, cgroup limits {}, workspace size {}",
                if s.has_network() {
                    "outbound (slirp4netns)"
                } else {
                    "none"
                },
                if i.cgroups.is_some() {
                    "on"
                } else {
                    "off (no writable cgroup)"
                },
                match i.quota {
                    DiskQuota::Loop => "held by a filesystem per workspace",
                    DiskQuota::Measured => "measured",
                }
            ),
        }
    }
}

/// Empties the work root but for the workspaces named in `keep` (with
/// their filesystems and records), unmounting workspaces an earlier run
/// left mounted.
pub(crate) fn clear_work_root(root: &Path, keep: &[String]) {
    let kept = |p: &Path| {
        p.file_stem()
            .is_some_and(|s| keep.iter().any(|k| s.to_string_lossy() == *k))
    };
    // Whatever is still mounted there (also a workspace whose image is
    // already gone) is detached first: a mount point cannot be removed.
    for mount in crate::sandbox::disk::mounts_under(root) {
        let workspace = mount
            .strip_prefix(root)
            .ok()
            .and_then(|rel| rel.components().next())
            .map(|c| root.join(c));
        if workspace.is_some_and(|ws| !kept(&ws)) {
            let _ = std::process::Command::new(crate::sandbox::disk::tool("umount"))
                .arg("-l")
                .arg(&mount)
                .stderr(Stdio::null())
                .status();
        }
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "img") && !kept(&p) {
                let ws = p.with_extension("");
                let _ = std::process::Command::new(crate::sandbox::disk::tool("umount"))
                    .arg("-l")
                    .arg(&ws)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if keep.is_empty() {
        let _ = std::fs::remove_dir_all(root);
        return;
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            // `x.json.partial` is not kept: its stem is `x.json`.
            if kept(&p) {
                continue;
            }
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

impl Inner {
    fn program(&self) -> &Path {
        &self.bctool
    }

    /// Where the workspace is as the build sees it.
    fn inside(&self, ws: &Path) -> PathBuf {
        if self.sandbox.is_some() {
            PathBuf::from(WORKSPACE)
        } else {
            ws.to_owned()
        }
    }

    /// `DECAP_URL` as the build sees it.
    fn url(&self, spec: &LaunchSpec) -> String {
        match &self.sandbox {
            Some(s) => format!("http://127.0.0.1:{}", s.url_port),
            None => spec.decap_url.clone(),
        }
    }

    /// The leading arguments of every bctool command. In the sandbox the
    /// binary is called `bctool` whatever it is on the host (the `decap`
    /// binary answers to that name), so it needs no leading arguments.
    fn bctool_args(&self, sub: &[&str]) -> Vec<String> {
        let lead = if self.sandbox.is_some() {
            &[][..]
        } else {
            &self.config.bctool[1..]
        };
        let mut args: Vec<String> = lead
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.extend(sub.iter().map(|s| (*s).to_owned()));
        if let Some(s) = &self.sandbox {
            args.extend([
                "--serve-socket".into(),
                crate::sandbox::SOCKET.into(),
                "--serve-port".into(),
                s.url_port.to_string(),
            ]);
        }
        args
    }

    /// The arguments of `decap-runner` in a warm environment: what it
    /// serves, and the bctool it becomes.
    fn runner_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(s) = &self.sandbox {
            args.extend(["--serve-port".into(), s.url_port.to_string()]);
        }
        args.push("--".into());
        args.push(match &self.sandbox {
            Some(_) => crate::sandbox::BCTOOL.into(),
            None => self.bctool.to_string_lossy().into_owned(),
        });
        args.extend(self.bctool_args(&[]));
        args
    }

    /// The environment bctool starts with (the build's comes later for a
    /// warm one).
    fn base_env(&self, ws: &Path) -> Vec<(String, String)> {
        let inside = self.inside(ws);
        let tmp = if self.sandbox.is_some() {
            PathBuf::from("/tmp")
        } else {
            inside.join("tmp")
        };
        let text = |p: PathBuf| p.to_string_lossy().into_owned();
        let path = match &self.sandbox {
            // bctool is on the build's PATH, for `bctool unlock` and the like.
            Some(_) => format!("/decap/bin:{}", self.config.path),
            None => format!(
                "{}:{}",
                inside.join("bin").to_string_lossy(),
                self.config.path
            ),
        };
        vec![
            ("PATH".into(), path),
            ("HOME".into(), text(inside.join("home"))),
            ("TMPDIR".into(), text(tmp)),
            ("LANG".into(), "C.UTF-8".into()),
            // TMPDIR is in the workspace, removed with the environment.
            (decap_api_types::TMPDIR_DISCARDED_VAR.into(), "1".into()),
        ]
    }

    /// The build's environment: cleared, then the documented variables.
    fn build_env(&self, spec: &LaunchSpec, ws: &Path) -> Vec<(String, String)> {
        let build = &spec.build;
        let inside = self.inside(ws);
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut env = self.base_env(ws);
        if let Some(d) = &spec.project.descriptor {
            env.extend(d.descriptor.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        env.extend(spec.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend([
            ("BUILD_ID".into(), build.id.to_string()),
            ("PROJECT_KEY".into(), build.project.to_string()),
            ("BRANCH_TO_BUILD".into(), build.branch.clone()),
            ("BUILD_LOCK_KEY".into(), build.lock_key().to_string()),
            (
                "COMMIT_SHA".into(),
                build.commit.clone().unwrap_or_default(),
            ),
            ("ARTIFACTS_DIR".into(), path(inside.join("artifacts"))),
            ("DECAP_URL".into(), self.url(spec)),
            ("DECAP_BUILD_TOKEN".into(), spec.build_token.clone()),
            (
                "DECAP_SCRIPTS_COMMIT".into(),
                build.scripts_commit.clone().unwrap_or_default(),
            ),
            ("DECAP_BUILD_SCRIPTS".into(), path(inside.join("scripts"))),
        ]);
        env
    }

    /// The names of the variables whose values bctool masks in the console.
    fn masked(spec: &LaunchSpec) -> Vec<String> {
        let mut names: Vec<String> = spec.secrets.iter().map(|(k, _)| k.clone()).collect();
        names.push("DECAP_BUILD_TOKEN".into());
        names
    }

    /// The script's command line: run directly when it has a shebang, with
    /// `sh` otherwise.
    fn script_command(&self, spec: &LaunchSpec, ws: &Path) -> Vec<String> {
        let shebang = spec
            .project
            .files
            .iter()
            .find(|f| f.path == "build.sh")
            .is_some_and(|f| f.content.starts_with(b"#!"));
        let script = self
            .inside(ws)
            .join("scripts/build.sh")
            .to_string_lossy()
            .into_owned();
        if shebang {
            vec![script]
        } else {
            vec!["/bin/sh".into(), script]
        }
    }

    /// Makes an environment: workspace, cgroup (with `limits` when known),
    /// sandbox, bctool running `args`.
    async fn make_env(
        &self,
        name: String,
        entry: Entry,
        env: Vec<(String, String)>,
        limits: Option<&Limits>,
        stdin: bool,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Env> {
        let disk = limits.map_or(self.config.defaults.disk_bytes, |l| l.disk_bytes);
        // Prepared slots are for builds starting cold (those with their
        // limits known); warm environments are made ahead anyway.
        let taken = limits.and_then(|_| {
            self.slots.lock().ok().and_then(|mut pool| {
                let i = pool.iter().position(|s| s.disk == disk)?;
                Some(pool.swap_remove(i))
            })
        });
        let slot = match taken {
            Some(slot) => slot,
            None => self.make_slot(name, disk).await?,
        };
        let slot_uid = slot.uid;
        let made = self
            .make_env_in(slot, entry, env, limits, stdin, prepare)
            .await;
        if made.is_err()
            && let Some(s) = &self.sandbox
        {
            s.free_uid(slot_uid);
        }
        made
    }

    /// Makes a slot: a user, a workspace of `disk` bytes, a cgroup.
    async fn make_slot(&self, name: String, disk: Option<u64>) -> Result<Slot> {
        let uid = self.sandbox.as_ref().and_then(Sandbox::allocate_uid);
        let dir = self.work_root.join(&name);
        let quota = self.quota;
        let ws = tokio::task::spawn_blocking(move || Workspace::create(&dir, quota, disk, uid))
            .await
            .map_err(exec_err)?;
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) => {
                if let Some(s) = &self.sandbox {
                    s.free_uid(uid);
                }
                return Err(exec_err(format!("cannot make the workspace: {e}")));
            }
        };
        if self.sandbox.is_none() {
            // Unsandboxed, `bctool` on the build's PATH is this one (the
            // `decap` binary answers to that name too).
            let bin = ws.dir.join("bin");
            let program = std::fs::canonicalize(&self.bctool).unwrap_or(self.bctool.clone());
            let linked = std::fs::create_dir_all(&bin)
                .and_then(|()| std::os::unix::fs::symlink(&program, bin.join("bctool")));
            if let Err(e) = linked {
                ws.remove();
                return Err(exec_err(format!("cannot put bctool in the workspace: {e}")));
            }
        }
        let cgroup = match &self.cgroups {
            Some(c) => match c.create(&name) {
                Ok(cg) => Some(cg),
                Err(e) => {
                    ws.remove();
                    if let Some(s) = &self.sandbox {
                        s.free_uid(uid);
                    }
                    return Err(exec_err(format!("cannot make the build's cgroup: {e}")));
                }
            },
            None => None,
        };
        Ok(Slot {
            ws,
            uid,
            cgroup,
            disk,
        })
    }

    /// Keeps [`PREPARED_SLOTS`] slots of the default size ready, in the
    /// background.
    fn refill_slots(self: &Arc<Self>) {
        let missing = self
            .slots
            .lock()
            .map(|p| PREPARED_SLOTS.saturating_sub(p.len()))
            .unwrap_or(0);
        if missing == 0 || self.sandbox.is_none() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            // Making a slot (mkfs, mount) takes tens of milliseconds of CPU:
            // not while the build that took one is starting on it.
            tokio::time::sleep(SLOT_REFILL_DELAY).await;
            for _ in 0..missing {
                let disk = this.config.defaults.disk_bytes;
                match this
                    .make_slot(format!("slot-{}", uuid::Uuid::now_v7()), disk)
                    .await
                {
                    Ok(slot) => {
                        if this.is_closed() {
                            dispose_slot(slot);
                            return;
                        }
                        if let Ok(mut pool) = this.slots.lock() {
                            pool.push(slot);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prepare a workspace for cold starts");
                        return;
                    }
                }
            }
        });
    }

    async fn make_env_in(
        &self,
        slot: Slot,
        entry: Entry,
        env: Vec<(String, String)>,
        limits: Option<&Limits>,
        stdin: bool,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Env> {
        let Slot {
            ws,
            uid,
            cgroup,
            disk,
        } = slot;
        let (runner, args) = match entry {
            Entry::Bctool(args) => (false, args),
            Entry::Runner(args) => (true, args),
        };
        let cgroup = cgroup.map(Arc::new);
        let fail = |ws: &Workspace, e: Error| {
            if let Some(cg) = &cgroup {
                cg.remove();
            }
            ws.remove();
            e
        };
        if let Err(e) = prepare(&ws.dir) {
            return Err(fail(&ws, e));
        }
        if let (Some(cg), Some(l)) = (&cgroup, limits)
            && let Err(e) = cg.set_limits(l)
        {
            return Err(fail(
                &ws,
                exec_err(format!("cannot set the build's limits: {e}")),
            ));
        }
        let messages = EnvRecord::messages_path(&ws.dir);
        let started = match &self.sandbox {
            Some(sandbox) => {
                let network = limits.is_none_or(|l| l.network == Network::Outbound);
                let plan = Plan {
                    workspace: &ws.dir,
                    bctool: self.program(),
                    runner: self.runner.as_deref().filter(|_| runner),
                    args,
                    env,
                    uid,
                    network,
                    stdin,
                    stderr: &messages,
                };
                // bubblewrap sets the sandbox's loopback up while
                // slirp4netns configures its interface: once in a few
                // hundred starts the kernel refuses one of the two, and the
                // sandbox is not made. That is tried again, twice.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let started = sandbox
                        .start(
                            &plan,
                            async |mut cmd| cmd.spawn(),
                            |pids| match &cgroup {
                                Some(cg) => pids.iter().try_for_each(|p| cg.add(*p)),
                                None => Ok(()),
                            },
                        )
                        .await;
                    match started {
                        Err(e) if attempt < 3 => {
                            tracing::debug!(error = %e, attempt, "the sandbox did not start; trying again");
                            if let Some(cg) = &cgroup {
                                cg.kill_all();
                            }
                        }
                        other => break other.map(|s| (s.child, Some(s.init_pid), s.slirp)),
                    }
                }
            }
            None => match crate::sandbox::messages_file(&messages) {
                Ok(stderr) => {
                    let program = match &self.runner {
                        Some(r) if runner => r.as_path(),
                        _ => self.program(),
                    };
                    let mut cmd = tokio::process::Command::new(program);
                    cmd.args(&args)
                        .env_clear()
                        .envs(env)
                        .current_dir(ws.dir.join("src"))
                        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                        .stdout(Stdio::null())
                        .stderr(stderr)
                        .kill_on_drop(false);
                    crate::sandbox::fds::own_session(&mut cmd);
                    cmd.spawn().map(|c| (c, None, None))
                }
                Err(e) => Err(e),
            },
        };
        let (mut child, init_pid, slirp) = match started {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.kill_all();
                    cg.remove();
                }
                return Err(fail(&ws, exec_err(format!("cannot start bctool: {e}"))));
            }
        };
        let stdin = if stdin { child.stdin.take() } else { None };
        let Some(pid) = child.id() else {
            if let Some(s) = slirp {
                s.stop();
            }
            if let Some(cg) = &cgroup {
                cg.remove();
            }
            return Err(fail(&ws, exec_err("bctool exited at once")));
        };
        let env = Env {
            ws: Arc::new(ws),
            uid,
            cgroup,
            child: Proc::Child(child),
            stdin,
            init_pid,
            slirp,
            pgid: Pid::from_raw(pid as i32),
            disk,
        };
        // Recorded at once: a server that dies now leaves nothing the next
        // one does not know of.
        if let Err(e) = self.record(&env, None, limits) {
            tracing::warn!(error = %e, "cannot record an environment for the next server");
        }
        Ok(env)
    }

    /// Starts the sandbox once, running the runner (or `bctool --version`),
    /// so that a sandbox that cannot work here is known at start-up.
    async fn try_sandbox(self: &Arc<Self>) -> Result<()> {
        // The runner, when there is one, is the quicker probe: with nothing
        // on its standard input it binds the build socket's port and exits.
        let entry = match &self.runner {
            Some(_) => Entry::Runner(self.runner_args()),
            None => Entry::Bctool(self.bctool_args(&["--version"])),
        };
        let began = std::time::Instant::now();
        let probe = self
            .make_env(format!("probe-{}", uuid::Uuid::now_v7()), entry, Vec::new(), None, false, |_| Ok(()))
            .await
            .map_err(|e| {
                Error::invalid(
                    "sandbox",
                    format!("no sandbox can be made here: {e}; pass --sandbox none to run builds unsandboxed"),
                )
            })?;
        let mut probe = probe;
        let status = match &mut probe.child {
            Proc::Child(c) => c.wait().await.map_err(exec_err)?,
            Proc::Adopted(_) => return Err(exec_err("the sandbox probe was not started here")),
        };
        let said = crate::sandbox::messages(&EnvRecord::messages_path(&probe.ws.dir));
        tracing::debug!(
            ms = began.elapsed().as_millis() as u64,
            "the sandbox probe ran"
        );
        if !status.success() {
            self.dispose(probe).await;
            let said = if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            };
            return Err(Error::invalid(
                "sandbox",
                format!(
                    "no sandbox can be made here: bctool (or decap-runner) did not run in it ({status}{said}); pass --sandbox none to run builds unsandboxed"
                ),
            ));
        }
        // What it leaves (its cgroup, its workspace's filesystem) goes in
        // the background: the server need not wait for it to serve.
        let this = self.clone();
        let cleanup = tokio::spawn(async move { this.dispose(probe).await });
        if let Ok(mut c) = self.probe_cleanup.lock() {
            *c = Some(cleanup);
        }
        Ok(())
    }

    async fn start_warm(&self) -> Result<Env> {
        let name = format!("warm-{}", uuid::Uuid::now_v7());
        let dir = self.work_root.join(&name);
        // A warm bctool exits when its standard input closes (the server is
        // gone); one handed a build runs it to its end.
        let entry = match &self.runner {
            Some(_) => Entry::Runner(self.runner_args()),
            None => Entry::Bctool(self.bctool_args(&["standby"])),
        };
        let env = self
            .make_env(name, entry, self.base_env(&dir), None, true, |_| Ok(()))
            .await?;
        // Most builds take the default limits: set them now, so that a
        // launch writes only what differs.
        if let Some(cg) = &env.cgroup {
            let defaults = Limits::resolve(None, self.config.defaults);
            if let Err(e) = cg.set_limits(&defaults) {
                tracing::warn!(error = %e, "cannot set a warm environment's limits");
            }
        }
        Ok(env)
    }

    fn park(&self, warm: Env) {
        if self.is_closed() {
            dispose_warm(warm);
            return;
        }
        if let Ok(mut pool) = self.warm.lock() {
            pool.push(warm);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts a warm bctool in the background to replace one taken; one
    /// that fails to start is tried again a little later, so the pool does
    /// not shrink for good.
    fn replenish(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            // Not at the same instant as the build it replaces is starting:
            // the two would compete for the CPU.
            let mut delay = Duration::from_millis(20);
            for attempt in 0..5 {
                tokio::time::sleep(delay).await;
                match this.start_warm().await {
                    Ok(w) => {
                        this.park(w);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "cannot start a warm bctool; trying again")
                    }
                }
                delay = Duration::from_millis(500) * (attempt + 1);
            }
        });
    }

    /// Hands a build to a warm bctool; `None` when none could take it.
    async fn launch_warm(
        self: &Arc<Self>,
        spec: &LaunchSpec,
        limits: &Limits,
    ) -> Result<Option<Env>> {
        loop {
            let taken = self.warm.lock().ok().and_then(|mut pool| {
                let i = pool.iter().position(|w| w.disk == limits.disk_bytes)?;
                Some(pool.swap_remove(i))
            });
            let Some(mut warm) = taken else {
                return Ok(None);
            };
            self.replenish();
            if let Some(cg) = &warm.cgroup
                && let Err(e) = cg.set_limits(limits)
            {
                tracing::warn!(error = %e, "cannot set a warm environment's limits");
                self.dispose(warm).await;
                continue;
            }
            if limits.network == Network::None
                && let Some(slirp) = warm.slirp.take()
            {
                // The tap device goes with its helper (loopback only),
                // before the build starts.
                slirp.stop_and_wait().await;
            }
            if let Err(e) = write_scripts(spec, &warm.ws.dir) {
                self.dispose(warm).await;
                return Err(e);
            }
            let line = self.standby_launch(spec, &warm.ws.dir)?;
            let Some(mut stdin) = warm.stdin.take() else {
                self.dispose(warm).await;
                continue;
            };
            let sent = async {
                stdin.write_all(&line).await?;
                stdin.flush().await
            }
            .await;
            match sent {
                Ok(()) => return Ok(Some(warm)),
                Err(e) => {
                    // That one died while waiting; try the next.
                    let said = crate::sandbox::messages(&EnvRecord::messages_path(&warm.ws.dir));
                    tracing::warn!(error = %e, said = %said, "a warm bctool was gone");
                    self.dispose(warm).await;
                }
            }
        }
    }

    /// The launch line a waiting runner (or `bctool standby`) is handed.
    fn standby_launch(&self, spec: &LaunchSpec, ws: &Path) -> Result<Vec<u8>> {
        let inside = self.inside(ws);
        let launch = StandbyLaunch {
            server: self.url(spec),
            build_id: spec.build.id.to_string(),
            token: spec.build_token.clone(),
            command: self.script_command(spec, ws),
            env: self.build_env(spec, ws),
            cwd: inside.join("src").to_string_lossy().into_owned(),
            artifacts_dir: inside.join("artifacts").to_string_lossy().into_owned(),
            timeout_secs: spec.timeout.as_secs().max(1),
            kill_grace_secs: self.config.kill_grace.as_secs().max(1),
            max_log_bytes: spec.max_log_bytes,
            bctool_env: spec.bctool_env.clone(),
            masked: Self::masked(spec),
        };
        let mut line = serde_json::to_vec(&launch).map_err(exec_err)?;
        line.push(b'\n');
        Ok(line)
    }

    async fn launch_cold(&self, spec: &LaunchSpec, limits: &Limits) -> Result<Env> {
        let name = spec.build.id.to_string();
        let dir = self.work_root.join(&name);
        if self.runner.is_some() {
            // Cold, the runner starts too: it is handed the build the
            // moment it is up, so the script waits for no bctool start.
            let mut env = self
                .make_env(
                    name,
                    Entry::Runner(self.runner_args()),
                    self.base_env(&dir),
                    Some(limits),
                    true,
                    |ws| write_scripts(spec, ws),
                )
                .await?;
            let handed = match (self.standby_launch(spec, &env.ws.dir), env.stdin.take()) {
                (Ok(line), Some(mut stdin)) => async {
                    stdin.write_all(&line).await?;
                    stdin.flush().await
                }
                .await
                .map_err(|e| exec_err(format!("cannot hand the build to its runner: {e}"))),
                (Err(e), _) => Err(e),
                (Ok(_), None) => Err(exec_err("the runner has no standard input")),
            };
            if let Err(e) = handed {
                let said = crate::sandbox::messages(&EnvRecord::messages_path(&env.ws.dir));
                self.dispose(env).await;
                return Err(if said.is_empty() {
                    e
                } else {
                    exec_err(format!("{e} ({said})"))
                });
            }
            return Ok(env);
        }
        let mut sub: Vec<String> = vec![
            "run".into(),
            "--echo".into(),
            "false".into(),
            "--timeout-secs".into(),
            spec.timeout.as_secs().max(1).to_string(),
            "--kill-grace-secs".into(),
            self.config.kill_grace.as_secs().max(1).to_string(),
            "--max-log-bytes".into(),
            spec.max_log_bytes.to_string(),
        ];
        for m in Self::masked(spec) {
            sub.extend(["--mask-env".into(), m]);
        }
        let mut args = self.bctool_args(&sub.iter().map(String::as_str).collect::<Vec<_>>());
        args.push("--".into());
        args.extend(self.script_command(spec, &dir));
        // bctool passes its own environment on to the script, less its own
        // settings.
        let mut env = self.build_env(spec, &dir);
        env.extend(spec.bctool_env.iter().cloned());
        self.make_env(name, Entry::Bctool(args), env, Some(limits), false, |ws| {
            write_scripts(spec, ws)
        })
        .await
    }

    /// Writes an environment's record beside its workspace, with its build
    /// once it has one.
    fn record(
        &self,
        env: &Env,
        build: Option<(BuildId, Duration)>,
        limits: Option<&Limits>,
    ) -> Result<()> {
        let Some(process) = env.child.id() else {
            return Ok(()); // gone already: nothing to adopt
        };
        EnvRecord {
            build_id: build.map(|(id, _)| id.to_string()),
            process,
            init_pid: env.init_pid,
            slirp: env.slirp.as_ref().map(|s| s.id),
            uid: env.uid,
            disk: env.disk,
            limits: limits.copied(),
            deadline: build.map(|(_, backstop)| unix_now() + backstop.as_secs()),
        }
        .write(&env.ws.dir)
        .map_err(exec_err)
    }

    /// How long a build may run before it is killed whatever bctool says:
    /// its own timeout plus grace plus a minute.
    fn backstop(&self, timeout: Duration) -> Duration {
        timeout + self.config.kill_grace * 2 + Duration::from_secs(60)
    }

    /// Follows a build an earlier server started (its record in `ws`'s
    /// folder), as though this server had started it.
    fn adopt(self: &Arc<Self>, ws: PathBuf, record: EnvRecord) {
        let Some(id) = record
            .build_id
            .as_deref()
            .and_then(|b| BuildId::parse(b).ok())
        else {
            return;
        };
        let name = ws
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup = self
            .cgroups
            .as_ref()
            .and_then(|c| c.create(&name).ok())
            .map(|cg| {
                if let Some(l) = &record.limits {
                    // The same values again: the group learns what they are,
                    // to name one the build runs into.
                    let _ = cg.set_limits(l);
                }
                Arc::new(cg)
            });
        if let (Some(s), Some(uid)) = (&self.sandbox, record.uid) {
            s.claim_uid(uid);
        }
        let backstop = record.deadline.map_or(Duration::from_secs(60), |d| {
            Duration::from_secs(d.saturating_sub(unix_now()))
        });
        let env = Env {
            ws: Arc::new(Workspace::adopt(&ws, record.disk)),
            uid: record.uid,
            cgroup,
            child: Proc::Adopted(record.process),
            stdin: None,
            init_pid: record.init_pid,
            slirp: record.slirp.map(crate::sandbox::Slirp::adopted),
            pgid: Pid::from_raw(record.process.pid as i32),
            disk: record.disk,
        };
        tracing::info!(build_id = %id, "adopting a build that ran on while Decap restarted");
        self.run(id, env, backstop);
    }

    /// Registers a running build and follows it.
    fn run(self: &Arc<Self>, id: BuildId, env: Env, backstop: Duration) {
        let (gone_tx, gone_rx) = watch::channel(false);
        let running = Arc::new(Running {
            pgid: env.pgid,
            init_pid: env.init_pid,
            cgroup: env.cgroup.clone(),
            gone: gone_rx,
        });
        if let Ok(mut r) = self.running.lock() {
            r.insert(id, running);
        }
        tokio::spawn(self.clone().follow(id, env, backstop, gone_tx));
    }

    /// Stops an environment that never ran a build and removes it.
    async fn dispose(&self, mut env: Env) {
        let _ = killpg(env.pgid, Signal::SIGKILL);
        if let Some(init) = env.init_pid {
            let _ = nix::sys::signal::kill(Pid::from_raw(init as i32), Signal::SIGKILL);
        }
        let _ = env.child.wait().await;
        if let Some(s) = env.slirp.take() {
            s.stop();
        }
        let cgroup = env.cgroup.take();
        let ws = env.ws.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(cg) = cgroup {
                cg.kill_all();
                cg.remove();
            }
            ws.remove();
        })
        .await;
        if let Some(s) = &self.sandbox {
            s.free_uid(env.uid);
        }
    }

    fn running(&self, build: BuildId) -> Option<Arc<Running>> {
        self.running
            .lock()
            .ok()
            .and_then(|r| r.get(&build).cloned())
    }

    /// Follows a running build until its environment is gone, stopping it
    /// when it outlives its timeout or runs into a limit; then clears it up
    /// and reports its end.
    async fn follow(
        self: Arc<Self>,
        id: BuildId,
        mut env: Env,
        backstop: Duration,
        gone: watch::Sender<bool>,
    ) {
        // A backstop in case bctool itself hangs (see [`Inner::backstop`]):
        // then everything is killed.
        let backstop = tokio::time::sleep(backstop);
        tokio::pin!(backstop);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut hits: Vec<LimitHit> = Vec::new();
        let mut stopping = false;
        let (status, succeeded) = loop {
            tokio::select! {
                status = env.child.wait() => break status,
                () = &mut backstop, if !stopping => {
                    tracing::warn!(build_id = %id, "bctool outlived its timeout; killing the build");
                    self.kill_now(id, &mut env);
                    stopping = true;
                }
                _ = tick.tick(), if !stopping => {
                    ticks += 1;
                    let mut now = env.cgroup.as_ref().map(|c| c.hits()).unwrap_or_default();
                    // A loop filesystem is asked every second (one statvfs);
                    // a measured folder is walked every five.
                    if self.quota == DiskQuota::Loop || ticks.is_multiple_of(5) {
                        let ws = env.ws.clone();
                        if let Ok(Some(h)) = tokio::task::spawn_blocking(move || ws.full()).await {
                            now.push(h);
                        }
                    }
                    if !now.is_empty() {
                        tracing::info!(build_id = %id, limits = ?now, "the build ran into a limit; stopping it");
                        hits = now;
                        let this = self.clone();
                        tokio::spawn(async move { this.stop(id).await });
                        stopping = true;
                    }
                }
            }
        };
        // Whatever is left of the build goes too, before its end is told.
        self.kill_now(id, &mut env);
        if let Some(s) = env.slirp.take() {
            s.stop();
        }
        // What bctool said on the way (a server it could not reach, an
        // upload that failed) goes to the server's log.
        let said = crate::sandbox::messages(&EnvRecord::messages_path(&env.ws.dir));
        if !said.is_empty() {
            if succeeded {
                tracing::info!(build_id = %id, messages = %said, "the build's bctool said");
            } else {
                tracing::warn!(build_id = %id, messages = %said, how = %status, "the build's environment said");
            }
        }
        let ws = env.ws.clone();
        let cgroup = env.cgroup.clone();
        let left = tokio::task::spawn_blocking(move || {
            let mut left: Vec<LimitHit> = Vec::new();
            if let Some(cg) = &cgroup {
                cg.kill_all();
                left.extend(cg.hits());
                cg.remove();
            }
            left.extend(ws.full());
            left
        })
        .await
        .unwrap_or_default();
        for h in left {
            if !hits.contains(&h) {
                hits.push(h);
            }
        }
        if let Ok(mut r) = self.running.lock() {
            r.remove(&id);
        }
        let _ = gone.send(true);
        self.events.environment_exited(EnvironmentExit {
            build_id: id,
            reason: status,
            limits: hits,
        });
        // Nothing of the build runs any more (its cgroup is empty and
        // gone), so its end is told before its workspace goes: emptying a
        // workspace that holds a large log takes tens of milliseconds. The
        // build's user is free again only once its files are gone.
        let ws = env.ws.clone();
        let _ = tokio::task::spawn_blocking(move || ws.remove()).await;
        if let Some(s) = &self.sandbox {
            s.free_uid(env.uid);
        }
    }

    /// SIGKILL to everything of a build, at once.
    fn kill_now(&self, id: BuildId, env: &mut Env) {
        if let Some(r) = self.running(id) {
            r.signal(Signal::SIGKILL);
        }
        env.child.kill();
        let _ = killpg(env.pgid, Signal::SIGKILL);
        if let Some(init) = env.init_pid {
            let _ = nix::sys::signal::kill(Pid::from_raw(init as i32), Signal::SIGKILL);
        }
    }

    /// TERM to the build's processes, the grace period, then KILL; returns
    /// once the environment is gone.
    async fn stop(&self, build: BuildId) {
        let Some(r) = self.running(build) else {
            return;
        };
        let mut gone = r.gone.clone();
        if *gone.borrow() {
            return;
        }
        r.signal(Signal::SIGTERM);
        let ended = tokio::time::timeout(self.config.kill_grace, gone.wait_for(|g| *g))
            .await
            .is_ok();
        if !ended {
            r.signal(Signal::SIGKILL);
            let _ = killpg(r.pgid, Signal::SIGKILL);
            let mut gone = r.gone.clone();
            let _ = gone.wait_for(|g| *g).await;
        }
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn sandbox(&self) -> &'static str {
        if self.inner.sandbox.is_some() {
            "bubblewrap"
        } else {
            "none"
        }
    }

    async fn launch(&self, mut spec: LaunchSpec) -> Result<()> {
        let inner = &self.inner;
        let id = spec.build.id;
        // What this executor cannot honour is said at the top of the
        // build's console.
        let notices = spec.project.not_honoured_on_the_host();
        if !notices.is_empty() {
            spec.bctool_env
                .push(("DECAP_NOTICES".into(), notices.join("\n")));
        }
        if inner.running.lock().map_err(exec_err)?.contains_key(&id) {
            return Ok(()); // already running: adopt, never duplicate
        }
        let limits = Limits::resolve(spec.project.valid_descriptor(), inner.config.defaults);
        let env = match inner.launch_warm(&spec, &limits).await? {
            Some(env) => env,
            None => {
                let env = inner.launch_cold(&spec, &limits).await?;
                inner.refill_slots();
                env
            }
        };
        let backstop = inner.backstop(spec.timeout);
        if let Err(e) = inner.record(&env, Some((id, backstop)), Some(&limits)) {
            tracing::warn!(build_id = %id, error = %e, "cannot record the build for the next server: a restart ends it");
        }
        inner.run(id, env, backstop);
        Ok(())
    }

    async fn cancel(&self, build: BuildId) -> Result<()> {
        self.inner.stop(build).await;
        Ok(())
    }

    async fn live(&self) -> Result<Vec<BuildId>> {
        Ok(self
            .inner
            .running
            .lock()
            .map_err(exec_err)?
            .keys()
            .copied()
            .collect())
    }
}

impl LocalExecutor {
    /// Lets go of what this executor made before the server exits. Running
    /// builds go on (the next server on this data dir adopts them; see
    /// [`LocalExecutor`]); the warm environments and prepared slots are
    /// removed. With no build running, nothing of this server is left: its
    /// cgroups, workspaces and folder go. Answers how many builds go on.
    pub async fn shutdown(&self) -> usize {
        self.release().await
    }

    /// Kills every running build (they end as stopped by the server), then
    /// lets go as [`LocalExecutor::shutdown`] does. Waits a few seconds at
    /// most for them to be gone.
    pub async fn stop_all(&self) -> usize {
        let running: Vec<Arc<Running>> = self
            .inner
            .running
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        for r in &running {
            r.signal(Signal::SIGKILL);
            let _ = killpg(r.pgid, Signal::SIGKILL);
        }
        let gone = async {
            for r in &running {
                let mut g = r.gone.clone();
                let _ = g.wait_for(|g| *g).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .is_err()
        {
            tracing::warn!("some builds' processes outlived the stop");
        }
        self.release().await
    }

    async fn release(&self) -> usize {
        let probe = self
            .inner
            .probe_cleanup
            .lock()
            .ok()
            .and_then(|mut c| c.take());
        if let Some(cleanup) = probe {
            let _ = cleanup.await;
        }
        self.clear_pools();
        tracing::debug!("local executor: warm environments and slots gone");
        let running = self.inner.running.lock().map(|r| r.len()).unwrap_or(0);
        if running > 0 {
            return running;
        }
        // The lock is held until the process exits, so no other server can
        // be using the folder meanwhile.
        if let Some(c) = &self.inner.cgroups {
            c.remove();
        }
        clear_work_root(&self.inner.work_root, &[]);
        let _ = std::fs::remove_dir_all(&self.inner.config.dir.0);
        0
    }

    fn clear_pools(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let slots = take_all(&self.inner.slots);
        let warm = take_all(&self.inner.warm);
        // Each waits on processes and an unmount for a few milliseconds:
        // side by side, a stop (or an upgrade's switch) waits for the
        // slowest rather than for all of them in turn.
        std::thread::scope(|scope| {
            for slot in slots {
                scope.spawn(move || dispose_slot(slot));
            }
            for env in warm {
                scope.spawn(move || dispose_warm(env));
            }
        });
    }
}

/// Everything in a pool, leaving it empty.
fn take_all<T>(pool: &Mutex<Vec<T>>) -> Vec<T> {
    pool.lock()
        .map(|mut pool| std::mem::take(&mut *pool))
        .unwrap_or_default()
}

fn dispose_slot(slot: Slot) {
    if let Some(cg) = slot.cgroup {
        cg.remove();
    }
    slot.ws.remove();
}

/// Warm bctools see their standard input close and exit; make sure.
fn dispose_warm(mut w: Env) {
    let _ = killpg(w.pgid, Signal::SIGKILL);
    w.child.kill();
    if let Some(s) = w.slirp.take() {
        // Not tied to the server's life: stopped here.
        s.id.signal(Signal::SIGKILL);
    }
    if let Some(init) = w.init_pid {
        let _ = nix::sys::signal::kill(Pid::from_raw(init as i32), Signal::SIGKILL);
    }
    if let Some(cg) = w.cgroup.take() {
        cg.kill_all();
        cg.remove();
    }
    w.ws.remove();
}

impl Drop for LocalExecutor {
    fn drop(&mut self) {
        self.clear_pools();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace left mounted after its image went (an unmount that
    /// failed while a sandbox's process still held it) does not keep the
    /// work root from being cleared.
    #[test]
    fn a_workspace_left_mounted_without_its_image_is_cleared() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("work");
        let orphan = root.join("warm-orphan");
        let kept = root.join("build-kept");
        std::fs::create_dir_all(&orphan).expect("mkdir");
        std::fs::create_dir_all(&kept).expect("mkdir");
        for d in [&orphan, &kept] {
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
                .arg(d)
                .status()
                .expect("mount");
            assert!(st.success());
        }
        std::fs::write(orphan.join("left"), b"x").expect("write");
        clear_work_root(&root, &["build-kept".to_owned()]);
        let mounted = crate::sandbox::disk::mounts_under(&root);
        assert_eq!(
            mounted,
            vec![kept.clone()],
            "only the kept one stays mounted"
        );
        assert!(!orphan.exists());
        clear_work_root(&root, &[]);
        assert!(crate::sandbox::disk::mounts_under(&root).is_empty());
        assert!(!root.exists());
    }
}
