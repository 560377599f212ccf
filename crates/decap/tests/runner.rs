//! `decap-runner` on bad input: it says what is wrong and starts nothing.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

fn runner(args: &[&str], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_decap-runner"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The runner may refuse its arguments before reading: a closed pipe is
    // then no error of the test's.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_runner_refuses_a_command_line_it_does_not_know() {
    let (code, err) = runner(&[], b"");
    assert_eq!(code, 2);
    assert!(err.contains("no bctool to become"), "{err}");
    let (code, err) = runner(&["--serve-port", "many", "--", "bctool"], b"");
    assert_eq!(code, 2);
    assert!(err.contains("\"many\" is not a port"), "{err}");
}

#[test]
fn the_runner_leaves_quietly_when_the_executor_goes_without_a_build() {
    let (code, err) = runner(&["--", env!("CARGO_BIN_EXE_bctool")], b"");
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn the_runner_starts_nothing_on_a_launch_it_cannot_read() {
    let marker = tempfile::tempdir().unwrap();
    let touched = marker.path().join("ran");
    for bad in [
        b"not json\n".to_vec(),
        br#"{"command": [], "env": [], "cwd": "/"}"#.to_vec(),
        format!(
            r#"{{"command": ["/bin/touch", "{}"], "env": "wrong", "cwd": "/"}}"#,
            touched.display()
        )
        .into_bytes(),
    ] {
        let (code, err) = runner(&["--", env!("CARGO_BIN_EXE_bctool")], &bad);
        assert_eq!(code, 1, "{err}");
        assert!(err.starts_with("decap-runner: the standby launch"), "{err}");
    }
    assert!(!touched.exists());
}

/// A launch whose command writes its pid to `pid_file`, then sleeps.
fn sleeper(pid_file: &std::path::Path) -> Vec<u8> {
    let launch = serde_json::json!({
        "command": ["/bin/sh", "-c", format!("echo $$ > {}; exec sleep 30", pid_file.display())],
        "env": [["PATH", "/usr/bin:/bin"]],
        "cwd": "/",
    });
    let mut line = serde_json::to_vec(&launch).unwrap();
    line.push(b'\n');
    line
}

/// Whatever of the command had started is gone (or a zombie not yet reaped).
fn command_gone(pid_file: &std::path::Path) {
    std::thread::sleep(std::time::Duration::from_millis(200));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Ok(pid) = std::fs::read_to_string(pid_file) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the command still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_runner_that_cannot_become_bctool_stops_the_command_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let line = sleeper(&pid_file);
    let (code, err) = runner(&["--", "/nonexistent/bctool"], &line);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot start bctool (/nonexistent/bctool)"),
        "{err}"
    );
    command_gone(&pid_file);
}

#[test]
fn a_launch_bctool_cannot_carry_on_stops_the_command_the_runner_started() {
    // Enough for the runner (a command), not for bctool (no server, no
    // build): bctool says so and kills what the runner started.
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let line = sleeper(&pid_file);
    let (code, err) = runner(&["--", env!("CARGO_BIN_EXE_bctool")], &line);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("the standby launch is not valid JSON"),
        "{err}"
    );
    command_gone(&pid_file);
}

#[test]
fn the_runner_names_the_phases_file_as_bctool_reads_it() {
    // The runner cannot link bctool (that is its point), so it keeps its
    // own copy of the variable's name: the two must not drift apart.
    assert_eq!(decap_runner::PHASES_VAR, decap_bctool::phases::PHASES_VAR);
}
