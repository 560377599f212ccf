//! One cgroup per build: its memory, CPU and process limits, what it ran
//! into, and a way to stop every process in it.
//!
//! Both hierarchies are supported. On cgroup v1 (a controller per mount, as
//! on this project's test machines) a build gets a group in each of the
//! memory, pids and cpu hierarchies. On cgroup v2 (one unified tree, most
//! current systems) the server's own group is made a parent: the server
//! moves into a leaf of its own (`decap-server`), the memory, pids and cpu
//! controllers are enabled for the children, and each build gets a sibling
//! leaf. That works for root and for a user whose session systemd delegated.
//!
//! Builds live under `decap-<instance>` (the instance is a hash of the
//! executor's work root), so that several Decap servers on one machine never
//! touch each other's builds.

use std::io;
use std::path::{Path, PathBuf};

use decap_core::limits::{LimitHit, Limits};

/// The cgroup hierarchy the builds' groups are made in.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v1: the parent folder in each controller's hierarchy.
    V1 {
        /// `…/memory/<own>/decap-<instance>`.
        memory: PathBuf,
        /// `…/pids/<own>/decap-<instance>`.
        pids: PathBuf,
        /// `…/cpu/<own>/decap-<instance>` (absent when the cpu controller is
        /// not mounted: CPU is then not limited).
        cpu: Option<PathBuf>,
    },
    /// cgroup v2: the parent of the builds' leaves.
    V2 {
        /// `/sys/fs/cgroup/<own>/decap-<instance>`.
        parent: PathBuf,
        /// Whether the cpu controller could be enabled.
        cpu: bool,
    },
}

/// A build's cgroup.
#[derive(Debug)]
pub struct BuildCgroup {
    /// The groups (one per v1 hierarchy, one leaf on v2).
    dirs: Vec<PathBuf>,
    version: Version,
    /// The limits written, to name them when hit.
    limits: std::sync::Mutex<Option<Limits>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The process's own group in a hierarchy, from `/proc/self/cgroup`:
/// the v2 line (`0::/path`) or the v1 line naming `controller`.
fn own_group(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        hit.then(|| path.to_owned())
    })
}

/// Where each v1 controller is mounted, from `/proc/self/mounts`.
fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
            .then(|| PathBuf::from(f[1]))
    })
}

fn join_group(mount: &Path, group: &str) -> PathBuf {
    mount.join(group.trim_start_matches('/'))
}

impl Cgroups {
    /// Finds a writable place for the builds' groups, named after
    /// `instance`; `Err` says why limits cannot be enforced here.
    pub fn detect(instance: &str) -> Result<Cgroups, String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("cannot read /proc/self/mounts: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let name = format!("decap-{instance}");
        let unified_root = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 3 && f[1] == "/sys/fs/cgroup" && f[2] == "cgroup2"
        });
        if unified_root {
            return Self::detect_v2(&own, &name);
        }
        let mount = |c: &str| {
            v1_mount(&mounts, c).ok_or_else(|| format!("the {c} cgroup controller is not mounted"))
        };
        let group = |c: &str| own_group(&own, Some(c)).unwrap_or_else(|| "/".into());
        let memory = join_group(&mount("memory")?, &group("memory")).join(&name);
        let pids = join_group(&mount("pids")?, &group("pids")).join(&name);
        let cpu = v1_mount(&mounts, "cpu").map(|m| join_group(&m, &group("cpu")).join(&name));
        for dir in [Some(&memory), Some(&pids), cpu.as_ref()]
            .into_iter()
            .flatten()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the cgroup {}: {e}", dir.display()))?;
        }
        Ok(Cgroups::V1 { memory, pids, cpu })
    }

    fn detect_v2(own: &str, name: &str) -> Result<Cgroups, String> {
        let root = Path::new("/sys/fs/cgroup");
        let group = own_group(own, None).ok_or("no cgroup v2 line in /proc/self/cgroup")?;
        let mine = join_group(root, &group);
        // The parent of the builds must have no processes of its own once
        // controllers are enabled below it: the server moves into a leaf.
        let parent = mine.join(name);
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot create the cgroup {}: {e}", parent.display()))?;
        let available =
            std::fs::read_to_string(mine.join("cgroup.controllers")).unwrap_or_default();
        for c in ["memory", "pids"] {
            if !available.split_whitespace().any(|a| a == c) {
                return Err(format!(
                    "the {c} controller is not available in {} (not delegated to this user?)",
                    mine.display()
                ));
            }
        }
        let enable =
            |dir: &Path, c: &str| write(&dir.join("cgroup.subtree_control"), &format!("+{c}"));
        if enable(&mine, "memory").is_err() {
            // Processes sit in our group: move ours into a leaf first.
            let leaf = mine.join("decap-server");
            std::fs::create_dir_all(&leaf)
                .map_err(|e| format!("cannot create the cgroup {}: {e}", leaf.display()))?;
            let procs = std::fs::read_to_string(mine.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = write(&leaf.join("cgroup.procs"), pid);
            }
            enable(&mine, "memory")
                .map_err(|e| format!("cannot enable the memory controller: {e}"))?;
        }
        enable(&mine, "pids").map_err(|e| format!("cannot enable the pids controller: {e}"))?;
        let cpu = available.split_whitespace().any(|a| a == "cpu") && enable(&mine, "cpu").is_ok();
        enable(&parent, "memory")
            .map_err(|e| format!("cannot enable the memory controller: {e}"))?;
        enable(&parent, "pids").map_err(|e| format!("cannot enable the pids controller: {e}"))?;
        let cpu = cpu && enable(&parent, "cpu").is_ok();
        Ok(Cgroups::V2 { parent, cpu })
    }

    /// The folders holding builds' groups.
    fn parents(&self) -> Vec<&Path> {
        match self {
            Cgroups::V1 { memory, pids, cpu } => {
                let mut v = vec![memory.as_path(), pids.as_path()];
                v.extend(cpu.as_deref());
                v
            }
            Cgroups::V2 { parent, .. } => vec![parent.as_path()],
        }
    }

    /// Makes the group of a build (or of a warm environment).
    pub fn create(&self, name: &str) -> io::Result<BuildCgroup> {
        let dirs: Vec<PathBuf> = self.parents().iter().map(|p| p.join(name)).collect();
        for d in &dirs {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
            }
        }
        let version = match self {
            Cgroups::V1 { .. } => Version::V1,
            Cgroups::V2 { .. } => Version::V2,
        };
        if version == Version::V1 {
            // Page cache and swap count too, so a limit means what it says.
            let _ = write(&dirs[0].join("memory.swappiness"), "0");
        }
        Ok(BuildCgroup {
            dirs,
            version,
            limits: std::sync::Mutex::new(None),
        })
    }

    /// Removes the groups a previous run of this server left behind, killing
    /// whatever still runs in them.
    pub fn sweep(&self) {
        self.sweep_except(&[]);
    }

    /// As [`Cgroups::sweep`], but for the groups named in `keep` (builds
    /// adopted after a restart).
    pub fn sweep_except(&self, keep: &[String]) {
        let mut names = std::collections::BTreeSet::new();
        for p in self.parents() {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        names.insert(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        for name in names.into_iter().filter(|n| !keep.contains(n)) {
            if let Ok(cg) = self.create(&name) {
                cg.kill_all();
                cg.remove();
            }
        }
    }
}

impl Cgroups {
    /// Removes the parents of the builds' groups (they must be empty).
    pub fn remove(&self) {
        for p in self.parents() {
            // A group just emptied may stay busy for a moment.
            for _ in 0..50 {
                match std::fs::remove_dir(p) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}

impl BuildCgroup {
    /// Writes the build's limits (again, for a warm environment handed a
    /// build). Unlimited values are written as such.
    pub fn set_limits(&self, limits: &Limits) -> io::Result<()> {
        if self.limits.lock().ok().and_then(|l| *l).as_ref() == Some(limits) {
            return Ok(());
        }
        let memory = limits.memory_bytes;
        let pids = limits.pids;
        let cpu = limits.cpu_millis;
        match self.version {
            Version::V1 => {
                let mem = &self.dirs[0];
                let value = memory.map_or("-1".to_owned(), |b| b.to_string());
                // memsw must stay at or above the limit: lower it after, raise
                // it before.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                let has_memsw = memsw.exists();
                if has_memsw {
                    let _ = write(&memsw, "-1");
                }
                write(&mem.join("memory.limit_in_bytes"), &value)?;
                if has_memsw {
                    write(&memsw, &value)?;
                }
                write(
                    &self.dirs[1].join("pids.max"),
                    &pids.map_or("max".to_owned(), |n| n.to_string()),
                )?;
                if let Some(dir) = self.dirs.get(2) {
                    write(&dir.join("cpu.cfs_period_us"), "100000")?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &cpu.map_or("-1".to_owned(), |m| (m * 100).to_string()),
                    )?;
                }
            }
            Version::V2 => {
                let dir = &self.dirs[0];
                write(
                    &dir.join("memory.max"),
                    &memory.map_or("max".to_owned(), |b| b.to_string()),
                )?;
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(
                    &dir.join("pids.max"),
                    &pids.map_or("max".to_owned(), |n| n.to_string()),
                )?;
                if dir.join("cpu.max").exists() {
                    write(
                        &dir.join("cpu.max"),
                        &cpu.map_or("max 100000".to_owned(), |m| format!("{} 100000", m * 100)),
                    )?;
                }
            }
        }
        if let Ok(mut l) = self.limits.lock() {
            *l = Some(*limits);
        }
        Ok(())
    }

    /// Moves a process (with its threads) into the group.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<i32> {
        // Every v1 group holds the same processes; the pids one is enough.
        let dir = match self.version {
            Version::V1 => &self.dirs[1],
            Version::V2 => &self.dirs[0],
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Sends `signal` to every process in the group.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Kills every process in the group, until none is left (a fork bomb
    /// races the kill, but its room is bounded by `pids.max`).
    pub fn kill_all(&self) {
        if self.version == Version::V2 && write(&self.dirs[0].join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The limits the build ran into so far.
    pub fn hits(&self) -> Vec<LimitHit> {
        let Some(limits) = self.limits.lock().ok().and_then(|l| *l) else {
            return Vec::new();
        };
        let count = |file: PathBuf, key: &str| -> u64 {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0)
        };
        let (oom, pids_max) = match self.version {
            Version::V1 => (
                count(self.dirs[0].join("memory.oom_control"), "oom_kill"),
                count(self.dirs[1].join("pids.events"), "max"),
            ),
            Version::V2 => (
                count(self.dirs[0].join("memory.events"), "oom_kill"),
                count(self.dirs[0].join("pids.events"), "max"),
            ),
        };
        let mut hits = Vec::new();
        if let (true, Some(b)) = (oom > 0, limits.memory_bytes) {
            hits.push(LimitHit::Memory(b));
        }
        if let (true, Some(n)) = (pids_max > 0, limits.pids) {
            hits.push(LimitHit::Pids(n));
        }
        hits
    }

    /// Removes the group (its processes must be gone).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_groups() {
        let text = "12:pids:/user.slice/x\n4:cpu,cpuacct:/a\n1:name=systemd:/s\n0::/unified/path\n";
        assert_eq!(
            own_group(text, Some("pids")).as_deref(),
            Some("/user.slice/x")
        );
        assert_eq!(own_group(text, Some("cpu")).as_deref(), Some("/a"));
        assert_eq!(own_group(text, None).as_deref(), Some("/unified/path"));
        assert_eq!(own_group(text, Some("memory")), None);
    }

    #[test]
    fn finds_v1_mounts() {
        let mounts = "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            v1_mount(mounts, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            v1_mount(mounts, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(v1_mount(mounts, "pids"), None);
    }

    #[test]
    fn v2_limits_and_hits_are_written_and_read_in_a_groups_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leaf = dir.path().join("b");
        std::fs::create_dir(&leaf).expect("mkdir");
        std::fs::write(leaf.join("cpu.max"), "max 100000").expect("write");
        let cg = BuildCgroup {
            dirs: vec![leaf.clone()],
            version: Version::V2,
            limits: std::sync::Mutex::new(None),
        };
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            pids: Some(32),
            disk_bytes: None,
            network: Default::default(),
        };
        cg.set_limits(&limits).expect("limits");
        let read = |f: &str| std::fs::read_to_string(leaf.join(f)).expect("read");
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert!(cg.hits().is_empty());
        std::fs::write(
            leaf.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .expect("write");
        std::fs::write(leaf.join("pids.events"), "max 7\n").expect("write");
        assert_eq!(
            cg.hits(),
            vec![LimitHit::Memory(64 << 20), LimitHit::Pids(32)]
        );
    }
}
