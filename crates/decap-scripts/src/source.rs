//! Projects' own repositories, for preset builds: a bare mirror per
//! repository in the data dir, fetched at launch (the build's commit, or its
//! ref's tip), from which the override file is read and the tree is served
//! to the build as a `tar.gz` (`git archive`). The credentials (a project's
//! `REPO_TOKEN` secret) are used here only: they never enter the build.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use decap_core::error::{Error, Result};
use sha2::{Digest, Sha256};

/// The secret whose value Decap clones a project's repository with (as an
/// HTTP token). It is never given to the build.
pub const TOKEN_SECRET: &str = "REPO_TOKEN";
/// The largest override file read.
pub const MAX_OVERRIDE_BYTES: u64 = 64 * 1024;
/// How long a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a local git command may take.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);

/// The mirrors, under `DATA_DIR/sources`.
#[derive(Debug)]
pub struct Sources {
    dir: PathBuf,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// What a build asks for: its commit when it has one, else its ref's tip.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// The full ref (`refs/heads/main`, `refs/pull/7/head`, `refs/tags/v1`).
    pub git_ref: &'a str,
    /// The commit, when the build names one.
    pub commit: Option<&'a str>,
}

impl Sources {
    /// Mirrors under `data_dir/sources`.
    pub fn new(data_dir: &Path) -> Sources {
        Sources {
            dir: data_dir.join("sources"),
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn mirror(&self, url: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(url.as_bytes()));
        self.dir.join(format!("{}.git", &hash[..24]))
    }

    fn lock(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(mirror.to_owned()).or_default().clone()
    }

    /// Fetches what the build asks for into the mirror of `url` and returns
    /// the commit. A commit the mirror already holds costs no fetch.
    pub async fn fetch(&self, url: &str, want: Want<'_>, token: Option<&str>) -> Result<String> {
        check_url(url)?;
        if let Some(c) = want.commit
            && !(c.len() >= 7 && c.len() <= 64 && c.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(Error::invalid(
                "commit",
                format!("{c:?} is not a commit id"),
            ));
        }
        if !want.git_ref.starts_with("refs/") || want.git_ref.contains("..") {
            return Err(Error::invalid(
                "ref",
                format!("{:?} is not a full ref", want.git_ref),
            ));
        }
        let mirror = self.mirror(url);
        let lock = self.lock(&mirror);
        let _held = lock.lock().await;
        if !mirror.join("HEAD").is_file() {
            std::fs::create_dir_all(&self.dir).map_err(|e| Error::backend("sources", e))?;
            let tmp = mirror.with_extension("init");
            let _ = std::fs::remove_dir_all(&tmp);
            let dest = tmp.to_string_lossy().into_owned();
            git(
                &["init", "--quiet", "--bare", &dest],
                None,
                None,
                LOCAL_TIMEOUT,
            )
            .await?;
            std::fs::rename(&tmp, &mirror).map_err(|e| Error::backend("sources", e))?;
        }
        if let Some(c) = want.commit
            && let Ok(full) = self.resolve(&mirror, c).await
        {
            return Ok(full);
        }
        let local = local_ref(want.git_ref);
        let refspec = format!("+{}:{local}", want.git_ref);
        let by_ref = git(
            &["fetch", "--quiet", "--no-tags", "--", url, &refspec],
            Some(&mirror),
            token,
            FETCH_TIMEOUT,
        )
        .await;
        match want.commit {
            None => {
                by_ref.map_err(|e| cannot_fetch(url, want.git_ref, e))?;
                self.resolve(&mirror, &local).await
            }
            Some(c) => {
                if let Ok(full) = self.resolve(&mirror, c).await {
                    return Ok(full);
                }
                // The ref has moved on (or never held it): ask for the commit.
                git(
                    &["fetch", "--quiet", "--no-tags", "--", url, c],
                    Some(&mirror),
                    token,
                    FETCH_TIMEOUT,
                )
                .await
                .map_err(|e| match by_ref {
                    Err(first) => cannot_fetch(url, want.git_ref, first),
                    Ok(()) => cannot_fetch(url, c, e),
                })?;
                self.resolve(&mirror, c).await
            }
        }
    }

    /// The commit a launch builds, from the mirror when it holds it (the
    /// build's commit, or its ref as last fetched), fetched otherwise.
    pub async fn pinned(&self, url: &str, want: Want<'_>, token: Option<&str>) -> Result<String> {
        let mirror = self.mirror(url);
        if mirror.join("HEAD").is_file() {
            let rev = match want.commit {
                Some(c) if c.chars().all(|c| c.is_ascii_hexdigit()) => c.to_owned(),
                Some(_) => String::new(),
                None => local_ref(want.git_ref),
            };
            if !rev.is_empty()
                && let Ok(full) = self.resolve(&mirror, &rev).await
            {
                return Ok(full);
            }
        }
        self.fetch(url, want, token).await
    }

    async fn resolve(&self, mirror: &Path, rev: &str) -> Result<String> {
        let spec = format!("{rev}^{{commit}}");
        git_out(&["rev-parse", "--verify", "--quiet", &spec], mirror).await
    }

    /// The file at `path` in `commit` of the mirror of `url`, when there is
    /// one (at most [`MAX_OVERRIDE_BYTES`]).
    pub async fn read_file(&self, url: &str, commit: &str, path: &str) -> Result<Option<Vec<u8>>> {
        let mirror = self.mirror(url);
        let listed = git_out(&["ls-tree", "--long", commit, "--", path], &mirror).await?;
        // `<mode> blob <oid> <size>\t<path>`
        let Some(fields) = listed.split('\t').next() else {
            return Ok(None);
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        if fields.len() != 4 || fields[1] != "blob" {
            return Ok(None);
        }
        let size: u64 = fields[3].parse().unwrap_or(u64::MAX);
        if size > MAX_OVERRIDE_BYTES {
            return Err(Error::invalid(
                "override file",
                format!("{path} is {size} bytes; at most {MAX_OVERRIDE_BYTES} are read"),
            ));
        }
        let out = run(
            &["cat-file", "blob", fields[2]],
            Some(&mirror),
            None,
            LOCAL_TIMEOUT,
        )
        .await?;
        Ok(Some(out))
    }

    /// The tree of `commit` as a `tar.gz`, written by `git archive` to the
    /// returned child's standard output. The commit must be in the mirror
    /// (fetch it first).
    pub fn archive(&self, url: &str, commit: &str) -> Result<tokio::process::Child> {
        if !commit.chars().all(|c| c.is_ascii_hexdigit()) || commit.is_empty() {
            return Err(Error::invalid(
                "commit",
                format!("{commit:?} is not a commit id"),
            ));
        }
        let mirror = self.mirror(url);
        tokio::process::Command::new("git")
            .args(["archive", "--format=tar.gz", commit])
            .current_dir(&mirror)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::backend("git", format!("cannot run git: {e}")))
    }
}

/// Where the mirror keeps a fetched ref (`refs/heads/main` →
/// `refs/decap/heads/main`).
fn local_ref(git_ref: &str) -> String {
    format!(
        "refs/decap/{}",
        git_ref.strip_prefix("refs/").unwrap_or(git_ref)
    )
}

fn cannot_fetch(url: &str, what: &str, e: Error) -> Error {
    Error::backend(
        "source",
        format!("cannot fetch {what} of {}: {e}", redact(url)),
    )
}

/// A URL as it may be shown: without a password in it.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Text with every `scheme://user:password@` in it redacted.
fn redact_all(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            out.push('…');
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

fn check_url(url: &str) -> Result<()> {
    if url.trim().is_empty() || url.starts_with('-') || url.contains('\0') {
        return Err(Error::invalid(
            "repoUrl",
            format!("{:?} cannot be cloned", redact(url)),
        ));
    }
    Ok(())
}

async fn git_out(args: &[&str], mirror: &Path) -> Result<String> {
    let out = run(args, Some(mirror), None, LOCAL_TIMEOUT).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

async fn git(
    args: &[&str],
    cwd: Option<&Path>,
    token: Option<&str>,
    within: Duration,
) -> Result<()> {
    run(args, cwd, token, within).await.map(|_| ())
}

async fn run(
    args: &[&str],
    cwd: Option<&Path>,
    token: Option<&str>,
    within: Duration,
) -> Result<Vec<u8>> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    if let Some(t) = token {
        // In the environment, never on the command line (which any local
        // user may read).
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{t}"));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            );
    }
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .map_err(|_| Error::backend("git", format!("git {} took over {within:?}", args[0])))?
        .map_err(|e| Error::backend("git", format!("cannot run git: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        return Err(Error::backend(
            "git",
            if err.is_empty() {
                format!("git {} failed ({})", args[0], out.status)
            } else {
                redact_all(&err.lines().take(4).collect::<Vec<_>>().join(" / "))
            },
        ));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) {
        let ok = std::process::Command::new("sh")
            .args(["-ec", script])
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .expect("sh")
            .success();
        assert!(ok, "{script}");
    }

    #[tokio::test]
    async fn fetches_a_branch_then_a_commit_reads_a_file_and_archives() {
        let tmp = tempfile::tempdir().expect("tmp");
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo).expect("mkdir");
        sh(
            &repo,
            "git init -q -b main . && echo '{}' > .decap.json && echo hi > a.txt && git add . && git commit -qm one",
        );
        let url = repo.to_string_lossy().into_owned();
        let sources = Sources::new(&tmp.path().join("data"));
        let tip = sources
            .fetch(
                &url,
                Want {
                    git_ref: "refs/heads/main",
                    commit: None,
                },
                None,
            )
            .await
            .expect("fetch");
        assert_eq!(tip.len(), 40);
        assert_eq!(
            sources
                .read_file(&url, &tip, ".decap.json")
                .await
                .expect("read"),
            Some(b"{}\n".to_vec())
        );
        assert_eq!(
            sources
                .read_file(&url, &tip, "missing")
                .await
                .expect("read"),
            None
        );
        // A later commit, named: fetched; the first, named: already there.
        sh(&repo, "echo two > a.txt && git commit -qam two");
        let second = String::from_utf8(
            std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(&repo)
                .output()
                .expect("git")
                .stdout,
        )
        .expect("utf8");
        let second = second.trim();
        let got = sources
            .fetch(
                &url,
                Want {
                    git_ref: "refs/heads/main",
                    commit: Some(second),
                },
                None,
            )
            .await
            .expect("fetch");
        assert_eq!(got, second);
        let short = &tip[..10];
        let got = sources
            .fetch(
                &url,
                Want {
                    git_ref: "refs/heads/gone",
                    commit: Some(short),
                },
                None,
            )
            .await
            .expect("a commit the mirror holds needs no fetch");
        assert_eq!(got, tip);
        let child = sources.archive(&url, second).expect("archive");
        let out = child.wait_with_output().await.expect("wait");
        let mut names = Vec::new();
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&out.stdout[..]));
        for e in tar.entries().expect("entries") {
            names.push(
                e.expect("entry")
                    .path()
                    .expect("path")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        assert!(names.contains(&"a.txt".to_owned()), "{names:?}");
    }

    #[tokio::test]
    async fn what_cannot_be_fetched_says_so_without_the_password() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sources = Sources::new(tmp.path());
        let err = sources
            .fetch(
                "https://user:hunter2@127.0.0.1:1/x.git",
                Want {
                    git_ref: "refs/heads/main",
                    commit: None,
                },
                Some("tok"),
            )
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("cannot fetch refs/heads/main of https://…@127.0.0.1:1/x.git"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        for bad in ["", "-uoops", "a\0b"] {
            assert!(
                sources
                    .fetch(
                        bad,
                        Want {
                            git_ref: "refs/heads/main",
                            commit: None
                        },
                        None
                    )
                    .await
                    .is_err()
            );
        }
        assert!(
            sources
                .fetch(
                    "/x",
                    Want {
                        git_ref: "refs/heads/main",
                        commit: Some("not-hex")
                    },
                    None
                )
                .await
                .is_err()
        );
    }
}
