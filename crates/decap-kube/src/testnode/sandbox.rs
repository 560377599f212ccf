//! The processes of containers: bubblewrap sandboxes and their signals.

use std::collections::{HashMap, VecDeque};
use std::path::{Component, Path, PathBuf};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::{MESSAGE_TAIL, PRIVATE_ROOT_ENTRIES};

pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Parent pid of every process, from `/proc/*/stat`.
pub(super) fn parent_pids() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            out.insert(pid, ppid);
        }
    }
    out
}

/// The process tree under `root` (itself included), with each one's depth.
pub(super) fn process_tree(root: u32) -> Vec<(u32, usize)> {
    let parents = parent_pids();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = vec![(root, 0)];
    let mut i = 0;
    while i < out.len() {
        let (pid, depth) = out[i];
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            out.push((c, depth + 1));
        }
        i += 1;
    }
    out
}

pub(super) fn send(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// Signals a container whose bubblewrap process is `pid`.
///
/// bubblewrap runs as `bwrap` (outside) → `bwrap` (pid 1 of the sandbox) →
/// the command, which `--new-session` makes the leader of a process group
/// of its own. A TERM goes to that process group (the command and the
/// children it did not move elsewhere), so that it can exit cleanly and its
/// exit code comes back through bubblewrap; signalling bubblewrap itself
/// would tear the sandbox down at once. A KILL goes to the whole tree and
/// to bubblewrap's process group (the sandbox's pid 1 dying takes every
/// process of the sandbox with it).
pub(super) fn signal_container(pid: u32, sig: Signal) {
    let tree = process_tree(pid);
    let commands: Vec<u32> = tree
        .iter()
        .filter(|&&(_, d)| d == 2)
        .map(|&(p, _)| p)
        .collect();
    if sig == Signal::SIGKILL || commands.is_empty() {
        signal_group(pid, sig);
        for (p, _) in tree {
            send(p, sig);
        }
    } else {
        for p in commands {
            signal_group(p, sig);
            send(p, sig);
        }
    }
}

pub(super) fn signal_group(pgid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pgid) {
        let _ = killpg(Pid::from_raw(p), sig);
    }
}

/// An entry of the host's root folder, as a sandbox sees it.
#[derive(Debug, Clone)]
pub(super) enum RootEntry {
    /// Bound read-only.
    Bind(PathBuf),
    /// Recreated as a symlink (`/bin` → `usr/bin`).
    Symlink { path: PathBuf, target: PathBuf },
}

pub(super) fn host_root_entries() -> std::io::Result<Vec<RootEntry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/")? {
        let entry = entry?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| PRIVATE_ROOT_ENTRIES.contains(&n))
        {
            continue;
        }
        let path = Path::new("/").join(&name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&path) {
                out.push(RootEntry::Symlink { path, target });
            }
        } else {
            out.push(RootEntry::Bind(path));
        }
    }
    out.sort_by(|a, b| {
        let key = |e: &RootEntry| match e {
            RootEntry::Bind(p) | RootEntry::Symlink { path: p, .. } => p.clone(),
        };
        key(a).cmp(&key(b))
    });
    Ok(out)
}

/// The last [`MESSAGE_TAIL`] bytes of a log file.
pub(super) fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MESSAGE_TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an
/// undefined one is left as written, and `$$` is a literal `$`.
pub(super) fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where `path` leads in a sandbox: symlinks of the host folders a sandbox
/// shares are followed (`/var/run` → `/run`), since bubblewrap cannot mount
/// through them; the sandbox's private folders hold none.
pub(super) fn sandbox_path(path: &Path) -> PathBuf {
    let mut todo: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push_front = |todo: &mut VecDeque<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(n) => todo.push_front(n.to_owned()),
                Component::ParentDir => todo.push_front("..".into()),
                _ => {}
            }
        }
    };
    push_front(&mut todo, path);
    let mut cur = PathBuf::from("/");
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let private = next
            .components()
            .nth(1)
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|n| PRIVATE_ROOT_ENTRIES.contains(&n));
        if !private
            && hops < 40
            && let Ok(target) = std::fs::read_link(&next)
        {
            hops += 1;
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_front(&mut todo, &target);
            continue;
        }
        cur = next;
    }
    cur
}

/// A relative path that stays inside its folder.
pub(super) fn safe_relative(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    let ok = !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = HashMap::from([("A".to_owned(), "1".to_owned())]);
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$A $", &vars), "$A $");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn sandbox_paths_follow_shared_symlinks_only() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/usr", &link).unwrap();
        // Under /tmp (private to a sandbox): not followed.
        assert_eq!(sandbox_path(&link.join("x")), link.join("x"));
        assert_eq!(
            sandbox_path(Path::new("/decap/a/../b")),
            PathBuf::from("/decap/b")
        );
        if std::fs::read_link("/bin").is_ok_and(|t| t == Path::new("usr/bin")) {
            assert_eq!(
                sandbox_path(Path::new("/bin/decap-none")),
                PathBuf::from("/usr/bin/decap-none")
            );
        }
    }

    #[test]
    fn the_process_tree_includes_children() {
        let tree = process_tree(std::process::id());
        assert_eq!(tree[0], (std::process::id(), 0));
    }
}
