//! The commit `decap --version`, `decapctl --version` and `/api/v1/version`
//! name: `DECAP_GIT_COMMIT` when set (an image built without `.git`), else
//! the checkout's `HEAD`, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=DECAP_GIT_COMMIT");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        // Built again when the checkout moves to another commit.
        for f in ["HEAD", "refs/heads", "packed-refs"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
    }
    let commit = std::env::var("DECAP_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DECAP_GIT_COMMIT={commit}");
}
