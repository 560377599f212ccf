//! What a local build's environment leaves beside its workspace, so that
//! the server that starts next (after a crash, a restart or an upgrade)
//! adopts a build still running and clears up one that is gone.
//!
//! Builds do not die with the server: bubblewrap runs in a session of its
//! own, and neither it nor slirp4netns is tied to the server's life. Each
//! environment writes `work/<name>.json` (its processes, user, limits and
//! build) when it starts and when it is handed a build; the file goes with
//! the workspace.

use std::path::{Path, PathBuf};

use decap_core::limits::Limits;
use serde::{Deserialize, Serialize};

/// A process as the host sees it, told apart from a later process that got
/// the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcId {
    pub pid: u32,
    /// Clock ticks after boot when it started (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl ProcId {
    /// The process `pid`, if it runs.
    pub fn of(pid: u32) -> Option<ProcId> {
        let (state, start) = stat(pid)?;
        (state != 'Z').then_some(ProcId { pid, start })
    }

    /// Whether this very process still runs (a zombie does not).
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| state != 'Z' && start == self.start)
    }

    /// Sends `signal` to it, if it is still this process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
        }
    }
}

/// A process's state letter and start time.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields that follow start after its last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The record of one environment (a warm one, or a build's).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvRecord {
    /// The build it runs, once handed one.
    #[serde(default)]
    pub build_id: Option<String>,
    /// bubblewrap (or bctool, unsandboxed): the environment lasts as long
    /// as it does.
    pub process: ProcId,
    /// The sandbox's first process.
    #[serde(default)]
    pub init_pid: Option<u32>,
    /// The network helper.
    #[serde(default)]
    pub slirp: Option<ProcId>,
    /// The build's user.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The workspace's size.
    #[serde(default)]
    pub disk: Option<u64>,
    /// The limits set on its cgroup.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// When the build must be over by (its timeout, the grace, a minute),
    /// in seconds since the epoch.
    #[serde(default)]
    pub deadline: Option<u64>,
}

impl EnvRecord {
    /// Where the record of the workspace `ws` is kept.
    pub fn path(ws: &Path) -> PathBuf {
        ws.with_extension("json")
    }

    /// Where the environment's own messages (bubblewrap's, bctool's) go.
    pub fn messages_path(ws: &Path) -> PathBuf {
        ws.with_extension("err")
    }

    /// Writes it (whole or not at all).
    pub fn write(&self, ws: &Path) -> std::io::Result<()> {
        let path = Self::path(ws);
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, serde_json::to_vec(self)?)?;
        std::fs::rename(&partial, &path)
    }

    /// Reads the record at `path`.
    pub fn read(path: &Path) -> Option<EnvRecord> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The records beside the workspaces in `root`, with their workspaces.
    pub fn all(root: &Path) -> Vec<(PathBuf, Option<EnvRecord>)> {
        let Ok(rd) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| (p.with_extension(""), EnvRecord::read(&p)))
            .collect()
    }

    /// Whether its build still runs (a warm environment without a build
    /// is not kept: the server that made it is gone).
    pub fn running_build(&self) -> bool {
        self.build_id.is_some() && self.process.alive()
    }

    /// Kills what is left of its processes outside the build's cgroup.
    pub fn kill(&self) {
        use nix::sys::signal::Signal;
        self.process.signal(Signal::SIGKILL);
        if let Some(s) = &self.slirp {
            s.signal(Signal::SIGKILL);
        }
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_live_process_from_one_gone_or_reused() {
        let me = ProcId::of(std::process::id()).expect("this process runs");
        assert!(me.alive());
        let other = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!other.alive(), "a pid reused by a later process is not it");
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        let seen = ProcId::of(pid);
        child.wait().expect("wait");
        assert!(ProcId::of(pid).is_none(), "a reaped process is gone");
        assert!(seen.is_none_or(|p| !p.alive()));
    }

    #[test]
    fn a_record_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("build-1");
        let rec = EnvRecord {
            build_id: Some("b".into()),
            process: ProcId::of(std::process::id()).expect("me"),
            init_pid: Some(7),
            slirp: None,
            uid: Some(100_001),
            disk: Some(1 << 30),
            limits: None,
            deadline: Some(1),
        };
        rec.write(&ws).expect("write");
        let all = EnvRecord::all(dir.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, ws);
        let back = all[0].1.clone().expect("readable");
        assert_eq!(back.uid, Some(100_001));
        assert!(back.running_build());
        std::fs::write(EnvRecord::path(&ws), "{not json").expect("write");
        assert!(EnvRecord::all(dir.path())[0].1.is_none());
    }
}
