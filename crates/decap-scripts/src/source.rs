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
/// git's fetch, marked for [`run`], which adds the settings that keep a
/// mirror's fetch to the fetch (no automatic housekeeping after it).
const FETCH: &str = "fetch";

/// How long a local git command may take.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);

/// A file of a commit: its content, none when the commit has no such file,
/// or why it cannot be read (too large).
pub type FileAt = std::result::Result<Option<Vec<u8>>, String>;

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
        if let Some(local) = local_repository(url) {
            return local;
        }
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
        if let Some(local) = local_repository(url) {
            // A repository on this machine is read in place: nothing to copy.
            let rev = want.commit.unwrap_or(want.git_ref);
            return self
                .resolve(&local, rev)
                .await
                .map_err(|e| cannot_fetch(url, rev, e));
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
            &[
                FETCH,
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--",
                url,
                &refspec,
            ],
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
                    &[
                        FETCH,
                        "--quiet",
                        "--no-tags",
                        "--no-write-fetch-head",
                        "--",
                        url,
                        c,
                    ],
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

    /// The commit `git_ref` (a full ref) points at now in the repository
    /// at `url`, asked with `git ls-remote` (nothing is fetched; a
    /// repository on this machine is read in place), within `within`.
    pub async fn head(
        &self,
        url: &str,
        git_ref: &str,
        token: Option<&str>,
        within: Duration,
    ) -> Result<String> {
        check_url(url)?;
        if !git_ref.starts_with("refs/") || git_ref.contains("..") {
            return Err(Error::invalid(
                "ref",
                format!("{git_ref:?} is not a full ref"),
            ));
        }
        if let Some(local) = local_repository(url) {
            return self
                .resolve(&local, git_ref)
                .await
                .map_err(|e| cannot_fetch(url, git_ref, e));
        }
        let out = run(&["ls-remote", "--", url, git_ref], None, token, within)
            .await
            .map_err(|e| cannot_fetch(url, git_ref, e))?;
        String::from_utf8_lossy(&out)
            .lines()
            .find_map(|l| {
                let (sha, name) = l.split_once('\t')?;
                (name == git_ref).then(|| sha.to_owned())
            })
            .ok_or_else(|| Error::NotFound(format!("{git_ref} in {}", redact(url))))
    }

    /// The commit a launch builds, from the mirror when it holds it (the
    /// build's commit, or its ref as last fetched), fetched otherwise.
    pub async fn pinned(&self, url: &str, want: Want<'_>, token: Option<&str>) -> Result<String> {
        let mirror = self.mirror(url);
        if local_repository(url).is_none() && mirror.join("HEAD").is_file() {
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

    /// The commit a launch builds and the file at `path` in it (the
    /// override file), from the mirror when it holds the commit (the
    /// build's, or its ref's as last fetched), fetched first otherwise: one
    /// `git cat-file` when nothing is fetched.
    pub async fn checkout(
        &self,
        url: &str,
        want: Want<'_>,
        token: Option<&str>,
        path: &str,
    ) -> Result<(String, FileAt)> {
        let local = local_repository(url);
        let mirror = self.mirror(url);
        let rev = match (want.commit, &local) {
            (Some(c), _) => c.to_owned(),
            (None, Some(_)) => want.git_ref.to_owned(),
            (None, None) => local_ref(want.git_ref),
        };
        if (local.is_some() || mirror.join("HEAD").is_file())
            && let Some(found) = self.inspect(&mirror, &rev, path).await?
        {
            return Ok(found);
        }
        let commit = self.fetch(url, want, token).await?;
        self.inspect(&mirror, &commit, path).await?.ok_or_else(|| {
            Error::backend(
                "source",
                format!("{commit} is not in the mirror after its fetch"),
            )
        })
    }

    /// One `git cat-file --batch` in `repo`: the commit `rev` names and the
    /// file at `path` in it (none when there is no such file); `None` when
    /// `rev` names no commit there.
    async fn inspect(
        &self,
        repo: &Path,
        rev: &str,
        path: &str,
    ) -> Result<Option<(String, FileAt)>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let plain =
            |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if !plain(rev) || rev.starts_with('-') || !plain(path) {
            return Err(Error::invalid("revision", format!("{rev:?}:{path:?}")));
        }
        let mut child = tokio::process::Command::new("git")
            .args(["cat-file", "--batch"])
            .current_dir(repo)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::backend("git", format!("cannot run git: {e}")))?;
        let ask = format!("{rev}^{{commit}}\n{rev}:{path}\n");
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::backend("git", "no stdin"))?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::backend("git", "no stdout"))?;
        let read = async {
            stdin.write_all(ask.as_bytes()).await?;
            drop(stdin);
            // A commit object and the file, bounded: a larger file is refused
            // from its size alone.
            let mut out = Vec::new();
            (&mut stdout)
                .take(MAX_OVERRIDE_BYTES + 64 * 1024)
                .read_to_end(&mut out)
                .await?;
            Ok::<_, std::io::Error>(out)
        };
        let out = tokio::time::timeout(LOCAL_TIMEOUT, read)
            .await
            .map_err(|_| Error::backend("git", "git cat-file took too long"))?
            .map_err(|e| Error::backend("git", format!("git cat-file: {e}")))?;
        let _ = child.kill().await;
        let (commit, rest) = match batch_entry(&out) {
            Some((oid, "commit", _, rest)) => (oid.to_owned(), rest),
            _ => return Ok(None),
        };
        let file = match batch_entry(rest) {
            Some((_, "blob", body, _)) if body.len() as u64 > MAX_OVERRIDE_BYTES => Err(format!(
                "{path} is larger than {MAX_OVERRIDE_BYTES} bytes, the most Decap reads"
            )),
            Some((_, "blob", body, _)) => Ok(Some(body.to_vec())),
            Some((_, _, _, _)) => Ok(None),
            None if rest.ends_with(b" missing\n") => Ok(None),
            None => Err(format!(
                "{path} is larger than {MAX_OVERRIDE_BYTES} bytes, the most Decap reads"
            )),
        };
        Ok(Some((commit, file)))
    }

    async fn resolve(&self, mirror: &Path, rev: &str) -> Result<String> {
        let spec = format!("{rev}^{{commit}}");
        git_out(&["rev-parse", "--verify", "--quiet", &spec], mirror).await
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

/// Whether `url` is a repository on this machine, read in place.
pub fn is_local(url: &str) -> bool {
    local_repository(url).is_some()
}

/// The folder of a repository on this machine named by its path (not a
/// URL: `file://` ones are mirrored like any other), which is read in
/// place rather than mirrored.
fn local_repository(url: &str) -> Option<PathBuf> {
    let path = url;
    if !path.starts_with('/') {
        return None;
    }
    let path = Path::new(path);
    (path.join(".git").exists() || path.join("HEAD").is_file()).then(|| path.to_owned())
}

/// One entry of `git cat-file --batch`'s output: its object id, type and
/// content, and what follows; `None` for a `missing` line or an entry cut
/// short.
fn batch_entry(out: &[u8]) -> Option<(&str, &str, &[u8], &[u8])> {
    let eol = out.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&out[..eol]).ok()?;
    let mut words = header.split(' ');
    let (oid, kind, size) = (words.next()?, words.next()?, words.next()?);
    let size: usize = size.parse().ok()?;
    let body = out.get(eol + 1..eol + 1 + size)?;
    let rest = out.get(eol + 2 + size..).unwrap_or_default();
    Some((oid, kind, body, rest))
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
    if args.first() == Some(&FETCH) {
        cmd.args(["-c", "gc.auto=0", "-c", "maintenance.auto=false"]);
    }
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
        // A URL, so mirrored (a plain path is read in place: see below).
        let url = format!("file://{}", repo.display());
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
        let want = Want {
            git_ref: "refs/heads/main",
            commit: Some(&tip),
        };
        assert_eq!(
            sources
                .checkout(&url, want, None, ".decap.json")
                .await
                .expect("read"),
            (tip.clone(), Ok(Some(b"{}\n".to_vec())))
        );
        assert_eq!(
            sources
                .checkout(&url, want, None, "missing")
                .await
                .expect("read"),
            (tip.clone(), Ok(None))
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
        assert!(
            tmp.path().join("data/sources").is_dir(),
            "the URL was mirrored"
        );

        // A path is read in place: the commit of the ref as it stands now,
        // with no mirror made.
        let in_place = Sources::new(&tmp.path().join("data2"));
        let path = repo.to_string_lossy().into_owned();
        let (commit, file) = in_place
            .checkout(
                &path,
                Want {
                    git_ref: "refs/heads/main",
                    commit: None,
                },
                None,
                ".decap.json",
            )
            .await
            .expect("read in place");
        assert_eq!(commit, second);
        assert_eq!(file, Ok(Some(b"{}\n".to_vec())));
        assert!(!tmp.path().join("data2/sources").exists());
        let missing = in_place
            .checkout(
                &path,
                Want {
                    git_ref: "refs/heads/main",
                    commit: Some("0123456789012345678901234567890123456789"),
                },
                None,
                ".decap.json",
            )
            .await
            .expect_err("no such commit")
            .to_string();
        assert!(missing.contains("cannot fetch 0123456789"), "{missing}");
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
