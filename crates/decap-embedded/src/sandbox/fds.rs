//! What the sandbox needs that the standard library does not offer safely:
//! handing chosen file descriptors to a child at chosen numbers, starting a
//! child in a session of its own or in a given user namespace, and finding
//! the user namespace that owns a network namespace.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Gives `fds` to the child of `cmd` as descriptors `first`, `first + 1`, …
/// (in order), open across `exec`.
#[allow(unsafe_code)]
pub fn pass(cmd: &mut tokio::process::Command, fds: Vec<OwnedFd>, first: RawFd) {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let n = raw.len() as RawFd;
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only fcntl and dup2, which are async-signal-safe; it allocates nothing
    // (`raw` was built before the fork). The descriptors stay open in the
    // parent until `fds` (moved into the closure) is dropped with the
    // command, after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            // First copy every source above the target range, so that no
            // dup2 below overwrites a source not yet moved.
            let mut high = [0 as RawFd; 16];
            for (i, fd) in raw.iter().enumerate().take(high.len()) {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, first + n);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().take(raw.len().min(16)).enumerate() {
                // dup2 leaves the new descriptor open across exec.
                if libc::dup2(*h, first + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The user namespace owning the network namespace open as `netns`
/// (`NS_GET_USERNS`).
#[allow(unsafe_code)]
pub fn owning_userns(netns: &std::fs::File) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor
    // (or -1), which is owned here and nowhere else.
    let fd = unsafe { libc::ioctl(netns.as_raw_fd(), NS_GET_USERNS as _) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor returned by the kernel above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Starts the child of `cmd` in a session (and process group) of its own,
/// apart from the server's: a build outlives the server, and a signal to
/// the server's group (a terminal's Ctrl-C) does not reach it.
#[allow(unsafe_code)]
pub fn own_session(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only setsid, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child of `cmd` enter the user namespace `userns` before it
/// runs: the network helper of a sandbox made without root, which may
/// configure the sandbox's network only from the namespace that owns it.
#[allow(unsafe_code)]
pub fn enter_userns(cmd: &mut tokio::process::Command, userns: OwnedFd) {
    let raw = userns.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, which has
    // one thread (as setns(CLONE_NEWUSER) requires), and calls only setns,
    // which is async-signal-safe. The descriptor stays open in the parent
    // until `userns` (moved into the closure) is dropped with the command.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &userns;
            if libc::setns(raw, libc::CLONE_NEWUSER) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
