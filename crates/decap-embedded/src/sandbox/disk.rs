//! A build's workspace with a size limit.
//!
//! As root, with loop devices, the workspace is a filesystem of its own: a
//! sparse ext4 image of the limit's size, mounted `nosuid,nodev` on the
//! workspace folder. Writes past the limit fail with "No space left on
//! device" and the host's disk never fills. Otherwise (a user without
//! privileges, a container without loop devices) the workspace is a plain
//! folder whose size is measured every few seconds, and a build past its
//! limit is stopped: the limit holds within a few seconds' writing, as a
//! kubelet's `ephemeral-storage` limit does.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use decap_core::limits::LimitHit;

/// How workspace sizes are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskQuota {
    /// A loop-mounted filesystem per workspace.
    Loop,
    /// A folder, measured.
    Measured,
}

impl DiskQuota {
    /// The best this machine offers: loop filesystems as root when loop
    /// devices, `mkfs.ext4` and `mount` are there.
    pub fn detect() -> DiskQuota {
        let root = nix::unistd::geteuid().is_root();
        let tools = ["mkfs.ext4", "mount", "umount"]
            .iter()
            .all(|t| crate::executor::find_in_path(t).is_some());
        if root && tools && Path::new("/dev/loop-control").exists() {
            DiskQuota::Loop
        } else {
            DiskQuota::Measured
        }
    }
}

/// A workspace folder, possibly a filesystem of its own.
#[derive(Debug)]
pub struct Workspace {
    /// The folder.
    pub dir: PathBuf,
    image: Option<PathBuf>,
    limit: Option<u64>,
}

/// A tool as found where [`crate::executor::find_in_path`] looks (which is
/// where [`DiskQuota::detect`] found it).
pub(crate) fn tool(name: &str) -> PathBuf {
    crate::executor::find_in_path(name).unwrap_or_else(|| PathBuf::from(name))
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{:?}: {e}", cmd.get_program())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The folders a build writes, owned by the build's user.
pub const WRITABLE: [&str; 4] = ["src", "artifacts", "home", "tmp"];

impl Workspace {
    /// Makes a fresh, empty workspace at `dir` holding at most `limit`
    /// bytes, its folders owned by `owner` (the build's user) when given.
    pub fn create(
        dir: &Path,
        quota: DiskQuota,
        limit: Option<u64>,
        owner: Option<u32>,
    ) -> io::Result<Workspace> {
        if dir.exists() {
            Workspace::unmount(dir);
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let mut ws = Workspace {
            dir: dir.to_owned(),
            image: None,
            limit,
        };
        if let (DiskQuota::Loop, Some(bytes)) = (quota, limit) {
            let image = dir.with_extension("img");
            let made = (|| {
                let f = std::fs::File::create(&image)?;
                f.set_len(bytes)?;
                drop(f);
                let mut mkfs = Command::new(tool("mkfs.ext4"));
                mkfs.args(["-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode"])
                    .args(["-E", "lazy_itable_init=1,nodiscard"]);
                if let Some(uid) = owner {
                    mkfs.args(["-E", &format!("root_owner={uid}:{uid}")]);
                }
                run(mkfs.arg(&image))?;
                run(Command::new(tool("mount"))
                    .args(["-o", "loop,nosuid,nodev,noatime"])
                    .arg(&image)
                    .arg(dir))
            })();
            if let Err(e) = made {
                let _ = std::fs::remove_file(&image);
                return Err(e);
            }
            ws.image = Some(image);
            let _ = std::fs::remove_dir(dir.join("lost+found"));
        }
        for sub in WRITABLE.iter().chain(["scripts"].iter()) {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        if let Some(uid) = owner {
            let id = Some(nix::unistd::Uid::from_raw(uid));
            let gid = Some(nix::unistd::Gid::from_raw(uid));
            for sub in WRITABLE {
                nix::unistd::chown(&dir.join(sub), id, gid).map_err(io::Error::from)?;
            }
        }
        Ok(ws)
    }

    /// The workspace at `dir` that a build an earlier server started runs
    /// in (its filesystem, if it has one, is still mounted).
    pub fn adopt(dir: &Path, limit: Option<u64>) -> Workspace {
        let image = dir.with_extension("img");
        Workspace {
            dir: dir.to_owned(),
            image: image.exists().then_some(image),
            limit,
        }
    }

    fn unmount(dir: &Path) {
        if dir.with_extension("img").exists() {
            let _ = run(Command::new(tool("umount")).arg("-l").arg(dir));
        }
    }

    /// Whether the workspace reached its limit.
    pub fn full(&self) -> Option<LimitHit> {
        let limit = self.limit?;
        if self.image.is_some() {
            let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
            let free = st.blocks_available() as u64 * st.fragment_size() as u64;
            // Full: less than 2 % or 16 MiB left, whichever is less (ext4
            // keeps a little for itself).
            (free < (limit / 50).min(16 << 20)).then_some(LimitHit::Disk(limit))
        } else {
            (usage(&self.dir) > limit).then_some(LimitHit::Disk(limit))
        }
    }

    /// Removes the workspace (and its filesystem), and then its
    /// environment's record.
    pub fn remove(&self) {
        if let Some(image) = &self.image {
            // Emptied while mounted: deleting a file drops its pages not yet
            // written, where unmounting would first write them all into the
            // image that goes next.
            if let Ok(entries) = std::fs::read_dir(&self.dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let _ = match e.file_type() {
                        Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                        _ => std::fs::remove_file(&p),
                    };
                }
            }
            if run(Command::new(tool("umount")).arg(&self.dir)).is_err() {
                // Still busy (a process of the sandbox not yet gone):
                // detached now, unmounted by the kernel once free. Left
                // mounted, it would outlive its image, which is deleted
                // next, and keep its folder.
                let _ = run(Command::new(tool("umount")).arg("-l").arg(&self.dir));
            }
            let _ = std::fs::remove_file(image);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(crate::record::EnvRecord::messages_path(&self.dir));
        let _ = std::fs::remove_file(crate::record::EnvRecord::path(&self.dir));
    }
}

/// The mount points under `root` (not `root` itself), from
/// `/proc/self/mountinfo`, deepest first.
pub(crate) fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(root) && p != root)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash in octal (`\040`).
fn unescape_mount_path(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let (b'\\', Some(v)) = (bytes[i], octal) {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bytes a folder's files take on disk (symbolic links not followed).
pub fn usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measured_workspace_is_full_past_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = Workspace::create(
            &dir.path().join("w"),
            DiskQuota::Measured,
            Some(64 << 10),
            None,
        )
        .expect("workspace");
        for sub in WRITABLE {
            assert!(ws.dir.join(sub).is_dir());
        }
        assert_eq!(ws.full(), None);
        std::fs::write(ws.dir.join("src/big"), vec![1u8; 128 << 10]).expect("write");
        assert_eq!(ws.full(), Some(LimitHit::Disk(64 << 10)));
        ws.remove();
        assert!(!dir.path().join("w").exists());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mount_path("/plain/path"), "/plain/path");
        assert_eq!(unescape_mount_path("/odd\\9xy\\"), "/odd\\9xy\\");
    }
}
