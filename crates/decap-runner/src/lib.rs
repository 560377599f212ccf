//! The runner that waits, warm, in a build's environment.
//!
//! A warm environment used to hold a whole bctool (its HTTP client, TLS
//! roots, async runtime and, in some builds, the AWS SDK: 8 MiB resident)
//! for as long as it waited. The runner is what waits instead: a small
//! program that binds the sandbox's end of the build socket, reads the
//! launch (one JSON line, [`decap_api_types::StandbyLaunch`] as the local
//! executor sends it) on its standard input, starts the build's command at
//! once with its console on a pipe, and then *becomes* bctool (`execve`):
//! the pid, the parent, the child, the pipe, the listening socket and the
//! signals that arrived meanwhile are all kept, and bctool's `adopt`
//! takes them over and carries the build to its end as `run` would.
//!
//! So the first line of a build waits for neither bctool's start nor its
//! runtime, and what waits weighs what this small program weighs.
//!
//! bctool reads the launch again from a memory file on its standard input
//! and then closes it. The build's script, started first and running as
//! the same user, could read that file in the meantime: the launch holds
//! nothing the script does not have (its own environment, its token)
//! except bctool's settings, so on bctool's direct path, whose settings
//! are AWS credentials, the executor uses no runner.
//!
//! Its command line (the executor's, not a person's):
//!
//! ```text
//! decap-runner [--exit-with-parent] [--serve-port PORT] -- BCTOOL [ARGS…]
//! ```
//!
//! `BCTOOL ARGS…` is how to start bctool (`/decap/bin/bctool`, or
//! `decap bctool`); the runner adds `adopt` and what it hands over.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

/// The variable through which a build's phases reach bctool (as bctool's
/// `phases::PHASES_VAR`).
pub const PHASES_VAR: &str = "DECAP_PHASES_FILE";

/// The largest launch line taken (the build's environment is in it).
const MAX_LAUNCH: usize = 4 * 1024 * 1024;

/// The parts of the launch the runner needs to start the command; bctool
/// reads the whole line again.
#[derive(serde::Deserialize)]
struct Launch {
    command: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
}

/// The runner's command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub exit_with_parent: bool,
    pub serve_port: Option<u16>,
    /// bctool and its leading arguments.
    pub bctool: Vec<String>,
}

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut it = args.into_iter();
        let mut parsed = Args {
            exit_with_parent: false,
            serve_port: None,
            bctool: Vec::new(),
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                "--exit-with-parent" => parsed.exit_with_parent = true,
                "--serve-port" => {
                    let v = it.next().ok_or("--serve-port needs a port")?;
                    let port = v
                        .parse()
                        .map_err(|_| format!("--serve-port: {v:?} is not a port"))?;
                    parsed.serve_port = Some(port);
                }
                "--" => {
                    parsed.bctool = it.collect();
                    break;
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if parsed.bctool.is_empty() {
            return Err("no bctool to become: pass -- BCTOOL [ARGS…]".into());
        }
        Ok(parsed)
    }
}

/// Runs the runner; returns only on failure (or when the executor goes
/// away without a build), with the exit code.
pub fn main(args: Args) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "decap-runner: {e}");
            1
        }
    }
}

fn run(args: Args) -> Result<i32, String> {
    // The build socket is listened on before the build starts, so that a
    // script reaching Decap at once waits in the backlog for bctool to
    // accept rather than being refused.
    let listener = match args.serve_port {
        Some(port) => Some(
            std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| format!("cannot serve Decap's socket on 127.0.0.1:{port}: {e}"))?,
        ),
        None => None,
    };
    let parent = std::os::unix::process::parent_id();
    let Some(line) = read_launch()? else {
        // The executor went away without a build for us.
        return Ok(0);
    };
    let launch: Launch = serde_json::from_slice(&line)
        .map_err(|e| format!("the standby launch is not valid JSON: {e}"))?;
    if launch.command.is_empty() {
        return Err("the standby launch has no command".into());
    }
    // From here to bctool's handlers a TERM or INT (a cancel) waits,
    // pending, instead of killing the runner; the command starts with no
    // signal blocked (the standard library clears the mask in the child).
    let mut stopping = SigSet::empty();
    stopping.add(Signal::SIGTERM);
    stopping.add(Signal::SIGINT);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&stopping), None)
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let work = work_dir()?;
    let (reader, writer) = console_pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let stderr = writer
        .try_clone()
        .map_err(|e| format!("cannot make a pipe: {e}"))?;
    let mut cmd = std::process::Command::new(&launch.command[0]);
    cmd.args(&launch.command[1..])
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env(PHASES_VAR, work.join("phases.json"))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .process_group(0);
    let spawned = spawn_when_free(|| cmd.spawn());
    drop(cmd); // closes the runner's copies of the pipe's write end

    let mut tail: Vec<String> = vec!["adopt".into()];
    let child = match &spawned {
        Ok(c) => {
            tail.extend(["--pid".into(), c.id().to_string()]);
            Some(c.id())
        }
        Err(e) => {
            tail.extend([
                "--spawn-error".into(),
                format!("bctool could not start {:?}: {e}", launch.command[0]),
            ]);
            None
        }
    };
    let give_up = |why: String| {
        if let Some(pid) = child {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        why
    };
    // bctool reads the launch again on its standard input: from memory,
    // never from a file the build could read.
    let memfd = nix::sys::memfd::memfd_create(c"launch", nix::sys::memfd::MFdFlags::empty())
        .map_err(|e| give_up(format!("cannot hold the launch: {e}")))?;
    let mut held = std::fs::File::from(memfd);
    held.write_all(&line)
        .and_then(|()| std::io::Seek::seek(&mut held, std::io::SeekFrom::Start(0)).map(|_| ()))
        .map_err(|e| give_up(format!("cannot hold the launch: {e}")))?;
    nix::unistd::dup2_stdin(&held)
        .map_err(|e| give_up(format!("cannot hand the launch on: {e}")))?;
    drop(held);

    keep_open(&reader).map_err(&give_up)?;
    tail.extend([
        "--console-fd".into(),
        reader.as_raw_fd().to_string(),
        "--work".into(),
        work.to_string_lossy().into_owned(),
        "--parent".into(),
        parent.to_string(),
    ]);
    if let Some(l) = &listener {
        keep_open(l).map_err(&give_up)?;
        tail.extend(["--listen-fd".into(), l.as_raw_fd().to_string()]);
    }
    if args.exit_with_parent {
        tail.push("--exit-with-parent".into());
    }
    let argv: Vec<CString> = args
        .bctool
        .iter()
        .chain(tail.iter())
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| give_up(format!("an argument holds a NUL byte: {e}")))?;
    // `execv`, not `Command::exec`: the signal mask (and the signals
    // pending on it) must carry over to bctool.
    let e = match nix::unistd::execv(&argv[0], &argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    Err(give_up(format!(
        "cannot start bctool ({}): {e}",
        args.bctool[0]
    )))
}

/// Reads the launch line; `None` when standard input closes first.
fn read_launch() -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Ok(Some(line)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read the launch: {e}")),
        };
        if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..end]);
            return Ok(Some(line));
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_LAUNCH {
            return Err(format!("the launch is over {MAX_LAUNCH} bytes"));
        }
    }
}

/// How much a console pipe holds: the most an unprivileged process may ask
/// for by default (`/proc/sys/fs/pipe-max-size`). With the kernel's 64 KiB
/// a script printing fast stalls on every read bctool makes.
pub const CONSOLE_PIPE_BYTES: i32 = 1 << 20;

/// The pipe a build's console goes through (its stdout and stderr), widened
/// to [`CONSOLE_PIPE_BYTES`] when the kernel allows it.
pub fn console_pipe() -> std::io::Result<(std::io::PipeReader, std::io::PipeWriter)> {
    let (reader, writer) = std::io::pipe()?;
    // Best effort: a narrower pipe only costs speed.
    let _ = fcntl(&reader, FcntlArg::F_SETPIPE_SZ(CONSOLE_PIPE_BYTES));
    Ok((reader, writer))
}

/// A private folder for the console file and the phases' records.
fn work_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    let pid = std::process::id();
    for n in 0..100u32 {
        let dir = base.join(format!(".bctool-{pid}-{n}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot make a folder in {}: {e}", base.display())),
        }
    }
    Err(format!("cannot make a folder in {}", base.display()))
}

/// Lets a descriptor survive the `execve` into bctool.
fn keep_open(fd: &impl AsFd) -> Result<(), String> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .map(|_| ())
        .map_err(|e| format!("cannot hand a descriptor to bctool: {e}"))
}

/// Spawns with `spawn`, again while the program is still open for writing
/// somewhere (`ETXTBSY`, for up to half a second): the server writes a
/// build's scripts just before they start, and a process it forks
/// meanwhile on another thread holds their file open until it execs.
pub fn spawn_when_free<T>(mut spawn: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut tries = 0;
    loop {
        match spawn() {
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) && tries < 500 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_still_open_for_writing_starts_once_it_is_closed() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("build.sh");
        let mut f = std::fs::File::create(&path).expect("creates");
        f.write_all(b"#!/bin/sh\nexit 0\n").expect("writes");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let busy = std::process::Command::new(&path).status();
        assert_eq!(
            busy.expect_err("busy").raw_os_error(),
            Some(nix::errno::Errno::ETXTBSY as i32)
        );
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(f);
        });
        let status = spawn_when_free(|| std::process::Command::new(&path).status()).expect("runs");
        assert!(status.success());
        closer.join().expect("joins");
    }

    #[test]
    fn parses_its_command_line() {
        let a = Args::parse(
            [
                "--exit-with-parent",
                "--serve-port",
                "9",
                "--",
                "/decap/bin/bctool",
                "--serve-socket",
                "/run/decap/decap.sock",
            ]
            .map(String::from),
        )
        .expect("valid");
        assert_eq!(
            a,
            Args {
                exit_with_parent: true,
                serve_port: Some(9),
                bctool: vec![
                    "/decap/bin/bctool".into(),
                    "--serve-socket".into(),
                    "/run/decap/decap.sock".into()
                ],
            }
        );
        assert!(Args::parse(["--".to_owned()]).is_err());
        assert!(Args::parse(["--serve-port", "x", "--", "b"].map(String::from)).is_err());
        assert!(Args::parse(["--what"].map(String::from)).is_err());
    }

    #[test]
    fn reads_the_launch_the_executor_sends() {
        let launch = decap_api_types::StandbyLaunch {
            server: "http://127.0.0.1:1".into(),
            build_id: "b".into(),
            token: "t".into(),
            command: vec!["/bin/sh".into(), "build.sh".into()],
            env: vec![("A".into(), "1".into())],
            cwd: "/w/src".into(),
            artifacts_dir: "/w/artifacts".into(),
            timeout_secs: 1,
            kill_grace_secs: 1,
            max_log_bytes: 1,
            bctool_env: Vec::new(),
            masked: Vec::new(),
        };
        let line = serde_json::to_vec(&launch).expect("serialises");
        let got: Launch = serde_json::from_slice(&line).expect("the runner reads it");
        assert_eq!(got.command, launch.command);
        assert_eq!(got.env, launch.env);
        assert_eq!(got.cwd, launch.cwd);
    }
}
