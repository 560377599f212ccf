//! The sandbox a local build runs in: bubblewrap, with a user namespace,
//! outbound network through slirp4netns, cgroup limits and a workspace of a
//! fixed size.
//!
//! What a build sees:
//! * its own user, mount, PID, IPC, UTS, cgroup and network namespaces, no
//!   capabilities, `no_new_privs`, and no way to make further user
//!   namespaces (`--disable-userns`). When Decap runs as root, each running
//!   build has a user id of its own from an unprivileged range
//!   (`--sandbox-uid-base`, 100000 + slot by default), so that nothing a
//!   build does on the host is done as root, and two builds are two users;
//! * the host's system folders read-only (`/usr`, `/etc`, `/opt` and the
//!   merged-`/usr` links), a fresh `/dev`, `/proc` of its own processes, an
//!   empty `/run`: not the data dir, not other builds, not the host's
//!   processes, home folders or sockets;
//! * its workspace at `/decap/workspace` (`src`, `artifacts`, `home`,
//!   `tmp`, `scripts`), with `/tmp` the workspace's `tmp`, so that what a
//!   build writes counts against its disk limit, never against memory;
//! * the network through slirp4netns, a user-mode NAT: connections out
//!   (clones, package installs) work, the host's loopback is refused
//!   (`--disable-host-loopback`), DNS goes to slirp4netns' forwarder. With
//!   `"network": "none"` only loopback;
//! * Decap's own channel: the server's build socket at
//!   `/run/decap/decap.sock`, which bctool serves on the sandbox's own
//!   loopback at the port the build's `DECAP_URL` names, so scripts and
//!   bctool reach the API as before, and the server knows the request came
//!   from a build.
//!
//! bubblewrap sets the sandbox up as the build's user, so every host path it
//! binds must be reachable by that user: the workspaces, the build socket
//! and bctool live in a folder of their own (see [`SandboxDir`]), never
//! under a data dir that may sit in `/root`.

pub mod cgroup;
pub mod disk;
pub mod fds;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// The workspace inside the sandbox.
pub const WORKSPACE: &str = "/decap/workspace";
/// bctool inside the sandbox.
pub const BCTOOL: &str = "/decap/bin/bctool";
/// `decap-runner` inside the sandbox (what waits, warm, for a build).
pub const RUNNER: &str = "/decap/bin/decap-runner";
/// The folder of the server's build socket inside the sandbox (the host's
/// folder is bound, not the socket: a server that starts while the build
/// runs makes its socket anew there, and the build reaches it).
pub const SOCKET_DIR: &str = "/run/decap";
/// The server's build socket inside the sandbox.
pub const SOCKET: &str = "/run/decap/build.sock";

/// The host folders a build sees read-only (those that exist; a symbolic
/// link such as merged-`/usr`'s `/bin` stays a link).
pub const SYSTEM_DIRS: [&str; 11] = [
    "/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/nix", "/snap",
];

/// The folder holding what sandboxes bind: bctool, the build socket and
/// the workspaces. As root it is `/var/lib/decap/<instance>` (mode 0711,
/// reachable by build users, writable by root only); otherwise a folder in
/// the data dir (builds run as Decap's own user).
#[derive(Debug, Clone)]
pub struct SandboxDir(pub PathBuf);

impl SandboxDir {
    /// The folder for a server whose data dir is `data_dir`, made if needed.
    pub fn for_data_dir(data_dir: &Path) -> std::io::Result<SandboxDir> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = if nix::unistd::geteuid().is_root() {
            let base = Path::new("/var/lib/decap");
            let dir = base.join(instance(data_dir));
            for d in [base, dir.as_path()] {
                match std::fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("cannot create {}: {e}", d.display()),
                        ));
                    }
                }
                let m = std::fs::symlink_metadata(d)?;
                if !m.is_dir() || m.uid() != 0 {
                    return Err(std::io::Error::other(format!(
                        "{} must be a folder owned by root",
                        d.display()
                    )));
                }
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
            }
            dir
        } else {
            let dir = data_dir.join("sandbox");
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            dir
        };
        // The build socket's own folder: what builds get bound in.
        let run = dir.join("run");
        match std::fs::create_dir(&run) {
            Ok(()) => std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(SandboxDir(dir))
    }

    /// Takes this folder for this process: one server per data dir. The
    /// lock lasts as long as the file returned; it is how a later server
    /// tells a folder whose server is gone (see [`SandboxDir::sweep_dead`]).
    pub fn lock(&self) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&self.0)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.0.join(".lock"))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::other(format!(
                "another Decap server is using {} (the same data dir): stop it first",
                self.0.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Clears what servers that are gone (killed, crashed) left in the
    /// folders beside this one: their workspaces' filesystems stay mounted
    /// and their cgroups stay, which would pile up and slow every sandbox's
    /// start. A folder whose lock nobody holds (and which is not a minute
    /// old, so not a server still starting) belongs to no live server.
    pub fn sweep_dead(&self) {
        let Some(base) = self.0.parent() else {
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let Ok(rd) = std::fs::read_dir(base) else {
            return;
        };
        for e in rd.flatten() {
            let dir = e.path();
            if dir == self.0 || !dir.is_dir() {
                continue;
            }
            // A server takes its lock a moment after making its folder:
            // leave young folders alone.
            let young = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(60));
            if young {
                continue;
            }
            let other = SandboxDir(dir.clone());
            let Ok(lock) = other.lock() else {
                continue; // alive
            };
            let work = other.work_root();
            let records: Vec<_> = crate::record::EnvRecord::all(&work)
                .into_iter()
                .filter_map(|(_, r)| r)
                .collect();
            if records.iter().any(crate::record::EnvRecord::running_build) {
                // Its builds run on, for its server to adopt when it starts
                // again; what they leave is cleared after.
                continue;
            }
            tracing::info!(folder = %dir.display(), "clearing what a Decap server that is gone left");
            for r in &records {
                r.kill();
            }
            if work.exists() {
                crate::executor::clear_work_root(&work, &[]);
            }
            if let Ok(cg) = cgroup::Cgroups::detect(&instance(&dir)) {
                cg.sweep();
                cg.remove();
            }
            drop(lock);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// The build socket.
    pub fn socket(&self) -> PathBuf {
        self.0.join("run").join("build.sock")
    }

    /// The workspaces' folder.
    pub fn work_root(&self) -> PathBuf {
        self.0.join("work")
    }

    /// bctool as builds get it: a hard link to (or a copy of) `program`.
    pub fn stage_bctool(&self, program: &Path) -> std::io::Result<PathBuf> {
        self.stage(program, "bctool")
    }

    /// `decap-runner` as warm environments get it, staged as bctool is.
    pub fn stage_runner(&self, program: &Path) -> std::io::Result<PathBuf> {
        self.stage(program, "decap-runner")
    }

    fn stage(&self, program: &Path, name: &str) -> std::io::Result<PathBuf> {
        let to = self.0.join(name);
        let partial = self.0.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&partial);
        if std::fs::hard_link(program, &partial).is_err() {
            std::fs::copy(program, &partial)?;
        }
        std::fs::rename(&partial, &to)?;
        Ok(to)
    }
}

/// A short, stable name for a data dir.
pub fn instance(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// How builds reach the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxNetwork {
    /// A network namespace of its own, outbound through slirp4netns (its path).
    Slirp(PathBuf),
    /// A network namespace with loopback only, for every build.
    None,
}

/// How to make sandboxes.
#[derive(Debug)]
pub struct Sandbox {
    bwrap: PathBuf,
    network: SandboxNetwork,
    /// Build users, when Decap runs as root: `base + slot`.
    uids: Option<UidPool>,
    hide: Vec<PathBuf>,
    socket: PathBuf,
    /// The port bctool serves the build socket on inside the sandbox.
    pub url_port: u16,
    passwd: String,
    group: String,
}

/// What one sandbox runs.
pub struct Plan<'a> {
    /// The workspace (host folder).
    pub workspace: &'a Path,
    /// bctool on the host.
    pub bctool: &'a Path,
    /// `decap-runner` on the host, when the sandbox starts it (warm) rather
    /// than bctool; it becomes bctool (bound at [`BCTOOL`] all the same).
    pub runner: Option<&'a Path>,
    /// The arguments of bctool, or of the runner (after the program).
    pub args: Vec<String>,
    /// Its environment (the whole of it).
    pub env: Vec<(String, String)>,
    /// The build's user, from [`Sandbox::allocate_uid`].
    pub uid: Option<u32>,
    /// Whether the build reaches the network.
    pub network: bool,
    /// Whether bctool reads its launch on standard input (warm).
    pub stdin: bool,
    /// Where bubblewrap's and bctool's own messages go: a file of the
    /// environment's, not the server's standard error, which a build that
    /// outlives the server must not hold.
    pub stderr: &'a Path,
}

/// A started sandbox.
pub struct Started {
    /// bubblewrap.
    pub child: tokio::process::Child,
    /// The sandbox's first process (its PID 1), as the host sees it.
    pub init_pid: u32,
    /// The network helper, when the build has a network.
    pub slirp: Option<Slirp>,
}

/// slirp4netns serving one sandbox. It is not tied to the server's life
/// (the build outlives the server) but to the sandbox's: it exits when the
/// sandbox's processes are gone (they alone hold its `--exit-fd` open).
/// Whoever ends the build stops it too, this server or the next.
pub struct Slirp {
    pub(crate) id: crate::record::ProcId,
    child: Option<tokio::process::Child>,
}

impl Slirp {
    /// The helper of a build adopted after a restart.
    pub(crate) fn adopted(id: crate::record::ProcId) -> Slirp {
        Slirp { id, child: None }
    }

    /// Stops it and returns once it has exited: its tap device, and with
    /// it the sandbox's route out, is gone. For a warm sandbox taken by a
    /// build that must have no network: started before, the build could
    /// send into a tap device nothing reads any more, and wait there.
    pub async fn stop_and_wait(mut self) {
        self.id.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Stops it at once: killed, it forwards nothing more, and the
    /// sandbox's tap device goes with it. Its exit is awaited in the
    /// background: closing a tap device waits for the kernel's network
    /// grace period, 30 ms here, which no build's end need wait.
    pub fn stop(mut self) {
        self.id.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            tokio::spawn(async move {
                let _ = c.wait().await;
            });
        }
    }
}

/// User ids for builds, one per running build.
#[derive(Debug)]
pub struct UidPool {
    base: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl UidPool {
    fn allocate(&self) -> Option<u32> {
        let mut used = self.used.lock().ok()?;
        let slot = (0..65536u32).find(|s| !used.contains(s))?;
        used.insert(slot);
        Some(self.base + slot)
    }

    fn free(&self, uid: u32) {
        if let Ok(mut used) = self.used.lock() {
            used.remove(&(uid - self.base));
        }
    }
}

/// A pipe already holding `data` (bubblewrap reads it while setting up).
fn data_pipe(data: &[u8]) -> std::io::Result<OwnedFd> {
    let (r, mut w) = std::io::pipe()?;
    if data.len() > 60 * 1024 {
        return Err(std::io::Error::other("sandbox file data over 60 KiB"));
    }
    w.write_all(data)?;
    Ok(r.into())
}

impl Sandbox {
    /// A sandbox maker. `uid_base` is used when Decap runs as root;
    /// `socket` is the server's build socket; `url_port` the port builds'
    /// `DECAP_URL` names.
    pub fn new(
        bwrap: PathBuf,
        network: SandboxNetwork,
        uid_base: u32,
        hide: Vec<PathBuf>,
        socket: PathBuf,
        url_port: u16,
    ) -> Sandbox {
        let root = nix::unistd::geteuid().is_root();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Sandbox {
            bwrap,
            network,
            uids: root.then(|| UidPool {
                base: uid_base,
                used: Mutex::new(BTreeSet::new()),
            }),
            hide,
            socket,
            // A build may not bind ports under 1024 in its own network
            // namespace (it has no capabilities): a server on such a port is
            // served inside on another.
            url_port: if url_port < 1024 { 9090 } else { url_port },
            passwd,
            group,
        }
    }

    /// Whether builds get outbound network at all.
    pub fn has_network(&self) -> bool {
        matches!(self.network, SandboxNetwork::Slirp(_))
    }

    /// A user id for a new build (root only).
    pub fn allocate_uid(&self) -> Option<u32> {
        self.uids.as_ref().and_then(UidPool::allocate)
    }

    /// Marks a user id as taken by a build adopted after a restart.
    pub fn claim_uid(&self, uid: u32) {
        if let Some(pool) = &self.uids
            && uid >= pool.base
            && let Ok(mut used) = pool.used.lock()
        {
            used.insert(uid - pool.base);
        }
    }

    /// Gives a build's user id back.
    pub fn free_uid(&self, uid: Option<u32>) {
        if let (Some(pool), Some(uid)) = (&self.uids, uid) {
            pool.free(uid);
        }
    }

    /// bubblewrap's command line and the descriptors it reads, for a plan.
    fn command(
        &self,
        plan: &Plan<'_>,
    ) -> std::io::Result<(
        tokio::process::Command,
        Vec<OwnedFd>,
        OwnedFd,
        std::io::PipeWriter,
    )> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        const FIRST: i32 = 3;
        let fd_arg = |fd: OwnedFd, fds: &mut Vec<OwnedFd>| {
            fds.push(fd);
            (FIRST + fds.len() as i32 - 1).to_string()
        };
        let (info_r, info_w) = std::io::pipe()?;
        let (block_r, block_w) = std::io::pipe()?;
        let mut a: Vec<String> = vec![
            "--unshare-user".into(),
            "--unshare-pid".into(),
            "--unshare-ipc".into(),
            "--unshare-uts".into(),
            "--unshare-net".into(),
            "--unshare-cgroup-try".into(),
            "--disable-userns".into(),
            "--new-session".into(),
            "--hostname".into(),
            "decap-build".into(),
        ];
        let info = fd_arg(info_w.into(), &mut fds);
        a.extend(["--info-fd".into(), info]);
        let block = fd_arg(block_r.into(), &mut fds);
        a.extend(["--block-fd".into(), block]);
        for dir in SYSTEM_DIRS {
            let p = Path::new(dir);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p)?;
                    a.extend([
                        "--symlink".into(),
                        target.to_string_lossy().into_owned(),
                        dir.into(),
                    ]);
                }
                Ok(m) if m.is_dir() => {
                    a.extend(["--ro-bind".into(), dir.into(), dir.into()]);
                }
                _ => {}
            }
        }
        a.extend([
            "--dev".into(),
            "/dev".into(),
            "--proc".into(),
            "/proc".into(),
            "--tmpfs".into(),
            "/run".into(),
            "--tmpfs".into(),
            "/var".into(),
            "--dir".into(),
            "/var/tmp".into(),
        ]);
        for hidden in &self.hide {
            if SYSTEM_DIRS.iter().any(|d| hidden.starts_with(d)) && hidden.exists() {
                a.extend(["--tmpfs".into(), hidden.to_string_lossy().into_owned()]);
            }
        }
        let text = |p: &Path| p.to_string_lossy().into_owned();
        a.extend(["--bind".into(), text(plan.workspace), WORKSPACE.into()]);
        a.extend([
            "--bind".into(),
            text(&plan.workspace.join("tmp")),
            "/tmp".into(),
        ]);
        a.extend(["--ro-bind".into(), text(plan.bctool), BCTOOL.into()]);
        if let Some(runner) = plan.runner {
            a.extend(["--ro-bind".into(), text(runner), RUNNER.into()]);
        }
        let socket_dir = self.socket.parent().unwrap_or(&self.socket);
        a.extend(["--ro-bind".into(), text(socket_dir), SOCKET_DIR.into()]);
        if plan.network && self.has_network() {
            let fd = fd_arg(data_pipe(b"nameserver 10.0.2.3\n")?, &mut fds);
            a.extend(["--ro-bind-data".into(), fd, "/etc/resolv.conf".into()]);
        }
        if let Some(uid) = plan.uid {
            let home = format!("{WORKSPACE}/home");
            let mut passwd = self.passwd.clone();
            passwd.push_str(&format!(
                "decap-build:x:{uid}:{uid}:Decap build:{home}:/bin/sh\n"
            ));
            let mut group = self.group.clone();
            group.push_str(&format!("decap-build:x:{uid}:\n"));
            let fd = fd_arg(data_pipe(passwd.as_bytes())?, &mut fds);
            a.extend(["--ro-bind-data".into(), fd, "/etc/passwd".into()]);
            let fd = fd_arg(data_pipe(group.as_bytes())?, &mut fds);
            a.extend(["--ro-bind-data".into(), fd, "/etc/group".into()]);
        }
        if fds.len() > 16 {
            return Err(std::io::Error::other(
                "too many descriptors for the sandbox",
            ));
        }
        // The sandbox's own root (bubblewrap's tmpfs) is read-only too:
        // builds write only their workspace.
        a.extend([
            "--remount-ro".into(),
            "/".into(),
            "--chdir".into(),
            format!("{WORKSPACE}/src"),
            "--".into(),
            if plan.runner.is_some() {
                RUNNER
            } else {
                BCTOOL
            }
            .into(),
        ]);
        a.extend(plan.args.iter().cloned());
        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.args(&a)
            .env_clear()
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .stdin(if plan.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(messages_file(plan.stderr)?)
            .kill_on_drop(false);
        fds::own_session(&mut cmd);
        if let Some(uid) = plan.uid {
            cmd.uid(uid).gid(uid);
        }
        Ok((cmd, fds, info_r.into(), block_w))
    }

    /// Starts a sandbox: bubblewrap sets it up, stops before running
    /// bctool, the caller's `setup` gets the sandbox's first process (to put
    /// it in its cgroup), the network helper starts, and then bctool runs.
    /// `spawn` starts the command (on the executor's spawning thread).
    pub async fn start(
        &self,
        plan: &Plan<'_>,
        spawn: impl AsyncFnOnce(tokio::process::Command) -> std::io::Result<tokio::process::Child>,
        setup: impl FnOnce(&[u32]) -> std::io::Result<()>,
    ) -> std::io::Result<Started> {
        let (mut cmd, mut fds, info_r, block_w) = self.command(plan)?;
        // The network helper lives as long as the sandbox, whichever
        // server runs then: it exits when the write end of this pipe, held
        // by the sandbox's processes alone, closes.
        let slirp_exit = match (&self.network, plan.network) {
            (SandboxNetwork::Slirp(_), true) => {
                let (exit_r, exit_w) = std::io::pipe()?;
                fds.push(exit_w.into());
                Some(OwnedFd::from(exit_r))
            }
            _ => None,
        };
        fds::pass(&mut cmd, fds, 3);
        let mut child = spawn(cmd).await?;
        // Until the sandbox is up, a start that fails or is abandoned
        // (its server stopping) kills bubblewrap's whole group: killing the
        // outer bubblewrap alone left its child, the sandbox's init, waiting
        // forever for the user mapping its parent was to write.
        let mut group = GroupGuard(child.id().map(|p| p as i32));
        let stopped = async {
            let info = read_info(info_r).await?;
            // Only the sandbox goes in the build's cgroup: bubblewrap's own
            // process outside it must live to the end (its death ends the
            // sandbox), so a TERM to the cgroup reaches bctool and the
            // script, which stop gracefully.
            setup(&[info])?;
            let slirp = match (&self.network, slirp_exit) {
                (SandboxNetwork::Slirp(path), Some(exit)) => {
                    loopback_up(info).await;
                    Some(start_slirp(path, info, exit).await?)
                }
                _ => None,
            };
            Ok::<_, std::io::Error>((info, slirp))
        }
        .await;
        match stopped {
            Ok((init_pid, slirp)) => {
                let mut block_w = block_w;
                if let Err(e) = block_w.write_all(b"1") {
                    if let Some(s) = slirp {
                        s.stop();
                    }
                    group.kill();
                    let _ = child.wait().await;
                    return Err(e);
                }
                group.disarm();
                Ok(Started {
                    child,
                    init_pid,
                    slirp,
                })
            }
            Err(e) => {
                drop(block_w);
                group.kill();
                let status = child.wait().await;
                let said = messages(plan.stderr);
                Err(std::io::Error::other(format!(
                    "the sandbox could not start: {e} (bubblewrap: {}{}{said})",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    if said.is_empty() { "" } else { ": " },
                )))
            }
        }
    }
}

/// Kills a starting sandbox's process group (bubblewrap leads a session
/// of its own, and its child stays in its group until the sandbox is up)
/// when dropped, unless disarmed.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The file an environment's own messages go to, opened for appending.
pub(crate) fn messages_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// What an environment said in its messages file, the last 4 KiB at most,
/// trimmed.
pub(crate) fn messages(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail).trim().to_owned()
}

/// Reads bubblewrap's `--info-fd` JSON: the sandbox's first process.
async fn read_info(info: OwnedFd) -> std::io::Result<u32> {
    let file = std::fs::File::from(info);
    let mut rx = tokio::net::unix::pipe::Receiver::from_file(file)?;
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    let read = async {
        loop {
            let n = rx.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other(
                    "bubblewrap failed while setting up the sandbox",
                ));
            }
            text.extend_from_slice(&buf[..n]);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
                return v["child-pid"]
                    .as_u64()
                    .map(|p| p as u32)
                    .ok_or_else(|| std::io::Error::other("bubblewrap's info has no child-pid"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .map_err(|_| std::io::Error::other("bubblewrap did not set the sandbox up in 30 s"))?
}

/// Waits (50 ms at most) until bubblewrap has set the loopback of the
/// sandbox whose first process is `pid` up: slirp4netns configuring its
/// interface in the same namespace meanwhile made bubblewrap's set-up fail
/// now and then ("loopback: Failed RTM_NEWADDR"), and the build with it.
async fn loopback_up(pid: u32) {
    let routes = format!("/proc/{pid}/net/fib_trie");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
    while tokio::time::Instant::now() < deadline {
        match std::fs::read_to_string(&routes) {
            Ok(text) if text.contains("127.0.0.1") => return,
            Ok(_) => tokio::time::sleep(Duration::from_micros(200)).await,
            Err(_) => return, // gone, or not to be read here: go on
        }
    }
}

/// Starts slirp4netns on the sandbox's network namespace and waits until
/// its interface is up.
async fn start_slirp(slirp: &Path, pid: u32, exit: OwnedFd) -> std::io::Result<Slirp> {
    let netns = format!("/proc/{pid}/ns/net");
    let (ready_r, ready_w) = std::io::pipe()?;
    let passed: Vec<OwnedFd> = vec![ready_w.into(), exit];
    let mut cmd = tokio::process::Command::new(slirp);
    cmd.args([
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        "--netns-type=path",
        "--ready-fd=3",
        "--exit-fd=4",
    ]);
    if !nix::unistd::geteuid().is_root() {
        // The namespace belongs to the sandbox's user namespace, where only
        // the user is mapped: slirp4netns enters it before it runs (its own
        // --userns-path would want to become root there, and cannot).
        let ns = std::fs::File::open(&netns)?;
        fds::enter_userns(&mut cmd, fds::owning_userns(&ns)?);
    }
    cmd.arg(&netns)
        .arg("tap0")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(false);
    fds::pass(&mut cmd, passed, 3);
    fds::own_session(&mut cmd);
    let mut child = cmd.spawn()?;
    drop(cmd);
    let mut ready = std::fs::File::from(OwnedFd::from(ready_r));
    let waited = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 1];
        ready.read(&mut b)
    });
    match tokio::time::timeout(Duration::from_secs(10), waited).await {
        Ok(Ok(Ok(1))) => match child.id().and_then(crate::record::ProcId::of) {
            Some(id) => Ok(Slirp {
                id,
                child: Some(child),
            }),
            None => Err(std::io::Error::other("slirp4netns exited at once")),
        },
        _ => {
            let _ = child.start_kill();
            Err(std::io::Error::other(
                "slirp4netns could not give the sandbox its network",
            ))
        }
    }
}
