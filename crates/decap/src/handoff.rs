//! Keeping the port open across restarts and upgrades.
//!
//! * **Socket activation:** a listening socket passed in `LISTEN_FDS` (a
//!   systemd `.socket` unit) is served instead of binding `--listen`, so
//!   the port stays open while the service restarts: connections wait in
//!   the socket's backlog, none is refused.
//! * **Upgrade in place:** on `SIGUSR2`, `decap serve` starts its binary
//!   again (from the path it was started from: the new one if it was
//!   replaced) with the same arguments, handing it the listening socket. The
//!   new process reads its configuration and the build scripts while the
//!   old one serves on; when it is ready to take over it says so, the old
//!   one stops (as on `SIGTERM`) and the new one opens the data dir once the
//!   old one has exited. Connections arriving in between wait in the
//!   backlog. A new process that fails before taking over changes nothing:
//!   the old one serves on and says why.
//!
//! The two processes meet on a Unix socket in the data dir
//! (`upgrade.sock`): the new one connects and writes `taking-over`; the old
//! one keeps its end open until it exits, which is how the new one learns
//! that the data dir is free.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The variable naming the old process's rendezvous socket.
const UPGRADE_VAR: &str = "DECAP_UPGRADE_FROM";
/// What the new process says when it takes over.
const TAKING_OVER: &str = "taking-over";
/// How long a new process may take to read its configuration and the
/// build scripts (a clone of a large repo) before the upgrade is given up.
const START_LIMIT: Duration = Duration::from_secs(300);

/// What this process was given when it started.
pub struct Inherited {
    /// A listening socket (socket activation, or the old process of an
    /// upgrade).
    pub listener: Option<std::net::TcpListener>,
    /// The old process to take over from, when this is an upgrade.
    pub predecessor: Option<PathBuf>,
}

impl Inherited {
    /// Reads `LISTEN_FDS` (and clears it, so that nothing started later
    /// takes the socket for its own). Call before any thread starts.
    pub fn take() -> Result<Inherited> {
        let mut fds = listenfd::ListenFd::from_env();
        let listener = if fds.len() > 0 {
            let l = fds
                .take_tcp_listener(0)
                .context("the socket passed in LISTEN_FDS is not a listening TCP socket")?;
            if fds.len() > 1 {
                bail!(
                    "{} sockets were passed in LISTEN_FDS; decap serves one (its HTTP port)",
                    fds.len()
                );
            }
            l
        } else {
            None
        };
        let predecessor = std::env::var_os(UPGRADE_VAR).map(PathBuf::from);
        if predecessor.is_some() && listener.is_none() {
            bail!("{UPGRADE_VAR} is set but no listening socket was passed (LISTEN_FDS)");
        }
        Ok(Inherited {
            listener,
            predecessor,
        })
    }
}

/// Takes over from the old process at `rendezvous`: tells it to stop, then
/// waits until it has exited (its data dir, locks and builds are free).
pub async fn take_over(rendezvous: &Path) -> Result<()> {
    let mut conn = UnixStream::connect(rendezvous).await.with_context(|| {
        format!(
            "cannot reach the decap being upgraded at {}",
            rendezvous.display()
        )
    })?;
    conn.write_all(format!("{TAKING_OVER}\n").as_bytes())
        .await
        .context("cannot tell the old decap to stop")?;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => tracing::info!(
                waited_secs = started.elapsed().as_secs(),
                "waiting for the old decap to stop"
            ),
        }
    }
    tracing::info!(
        waited_ms = started.elapsed().as_millis() as u64,
        "the old decap has stopped; taking over"
    );
    Ok(())
}

/// How this process starts its successor.
#[derive(Debug, Clone)]
pub struct Upgrade {
    /// The binary this process was started from.
    exe: PathBuf,
    /// Its arguments (without the program name).
    args: Vec<OsString>,
    /// Where the two processes meet.
    rendezvous: PathBuf,
}

/// A new process that has taken over. Its connection stays open until this
/// process exits.
pub struct Successor {
    /// Its process id.
    pub pid: u32,
    _conn: UnixStream,
}

impl Upgrade {
    /// Captures the binary and the arguments now, before the binary can be
    /// replaced on disk.
    pub fn capture(data_dir: &Path) -> Result<Upgrade> {
        let exe = std::env::current_exe().context("cannot tell which binary runs")?;
        Ok(Upgrade {
            exe,
            args: std::env::args_os().skip(1).collect(),
            rendezvous: data_dir.join("upgrade.sock"),
        })
    }

    /// Starts the successor with the listening socket `listener`, and waits
    /// until it takes over (`Ok`) or fails to (`Err`, saying why; it is
    /// stopped if it still runs).
    pub async fn start(&self, listener: &impl AsFd) -> Result<Successor> {
        let _ = std::fs::remove_file(&self.rendezvous);
        let meet = UnixListener::bind(&self.rendezvous)
            .with_context(|| format!("cannot listen on {}", self.rendezvous.display()))?;
        let result = self.spawn_and_meet(listener, &meet).await;
        let _ = std::fs::remove_file(&self.rendezvous);
        result
    }

    async fn spawn_and_meet(&self, listener: &impl AsFd, meet: &UnixListener) -> Result<Successor> {
        let fd: OwnedFd = listener
            .as_fd()
            .try_clone_to_owned()
            .context("cannot share the listening socket")?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&self.args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS_FIRST_FD")
            .env(UPGRADE_VAR, &self.rendezvous)
            .kill_on_drop(false);
        decap_embedded::sandbox::fds::pass(&mut cmd, vec![fd], 3);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, exe = %self.exe.display(), "upgrade: started the new decap");
        let outcome = tokio::select! {
            met = async {
                let (conn, _) = meet.accept().await.context("the new decap did not connect")?;
                // Only the process started here may say it takes over.
                let peer = conn.peer_cred().ok().and_then(|c| c.pid());
                if peer != i32::try_from(pid).ok() {
                    bail!("process {peer:?}, not the new decap ({pid}), connected to {}", self.rendezvous.display());
                }
                let mut lines = BufReader::new(conn);
                let mut line = String::new();
                lines.read_line(&mut line).await.context("the new decap did not say it takes over")?;
                if line.trim() != TAKING_OVER {
                    bail!("the new decap said {line:?} instead of taking over");
                }
                Ok(lines.into_inner())
            } => met,
            exited = child.wait() => match exited {
                Ok(status) => Err(anyhow::anyhow!("the new decap exited ({status}) before taking over; see its output above")),
                Err(e) => Err(anyhow::anyhow!("cannot watch the new decap: {e}")),
            },
            _ = tokio::time::sleep(START_LIMIT) => Err(anyhow::anyhow!(
                "the new decap did not take over within {} s", START_LIMIT.as_secs()
            )),
        };
        match outcome {
            Ok(conn) => Ok(Successor { pid, _conn: conn }),
            Err(e) => {
                let _ = child.start_kill();
                Err(e)
            }
        }
    }
}
