//! The build-scripts repo: `team/project/{build.sh, project.json, *-sidecar.json}`.
//!
//! [`FsScriptsRepo`] reads a local folder, or a git clone that it keeps under
//! the data dir, into an immutable [`Catalog`]. Every file of a project's
//! folder is held in memory, so a build launched from a catalog runs exactly
//! the scripts of the commit it records, even if the repo moves on meanwhile.
//!
//! A broken project (bad JSON, bad regex, a missing field, an unsafe name) is
//! listed with its error; it never hides or breaks the others.

pub mod source;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use decap_core::catalog::{Catalog, ProjectEntry, ScriptFile};
use decap_core::descriptor::ProjectDescriptor;
use decap_core::names::{ProjectKey, validate_name};
use decap_core::ports::ScriptsRepo;
use decap_core::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The largest file a project folder may hold.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The most a project folder may hold in all.
pub const MAX_PROJECT_BYTES: u64 = 8 << 20;
/// How deep a project folder is read.
const MAX_DEPTH: usize = 4;
/// How long a git command may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the build scripts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptsSource {
    /// A local folder, read in place.
    Folder(PathBuf),
    /// A git repository, cloned into `checkout` and fetched on refresh.
    Git {
        /// The URL (anything `git clone` takes).
        url: String,
        /// The branch to follow.
        branch: String,
        /// Where the clone lives (under the data dir).
        checkout: PathBuf,
    },
}

impl ScriptsSource {
    /// Tells a git URL from a folder: URLs with a scheme, `user@host:path`
    /// and paths ending in `.git` are git; the rest are folders.
    pub fn parse(spec: &str, branch: &str, data_dir: &Path) -> Result<Self> {
        let looks_git = spec.contains("://")
            || spec.ends_with(".git")
            || (spec.contains('@') && spec.contains(':') && !spec.starts_with('/'));
        if looks_git {
            if spec.starts_with('-') {
                return Err(Error::invalid(
                    "scripts",
                    "a git URL must not start with '-'",
                ));
            }
            decap_core::names::validate_branch(branch)?;
            Ok(ScriptsSource::Git {
                url: spec.to_owned(),
                branch: branch.to_owned(),
                checkout: data_dir.join("scripts-repo"),
            })
        } else {
            Ok(ScriptsSource::Folder(PathBuf::from(spec)))
        }
    }
}

/// A check the executor makes of each project when the scripts are read
/// (e.g. the Kubernetes executor parses the sidecars as Containers): the
/// problem in words, which the project then shows and which keeps it from
/// building.
pub type ProjectCheck = Arc<dyn Fn(&ProjectEntry) -> Option<String> + Send + Sync>;

/// The build-scripts repo on the local file system.
pub struct FsScriptsRepo {
    source: ScriptsSource,
    current: RwLock<Arc<Catalog>>,
    refreshing: tokio::sync::Mutex<()>,
    check: Option<ProjectCheck>,
}

impl FsScriptsRepo {
    /// Opens the repo (cloning it if it is remote) and reads the first catalog.
    pub async fn open(source: ScriptsSource) -> Result<Self> {
        Self::open_checked(source, None).await
    }

    /// Opens the repo; every project read is also put to `check`.
    pub async fn open_checked(source: ScriptsSource, check: Option<ProjectCheck>) -> Result<Self> {
        let repo = FsScriptsRepo {
            source,
            current: RwLock::new(Arc::new(Catalog::default())),
            refreshing: tokio::sync::Mutex::new(()),
            check,
        };
        repo.refresh().await?;
        Ok(repo)
    }

    /// Where the scripts come from.
    pub fn source(&self) -> &ScriptsSource {
        &self.source
    }
}

#[async_trait]
impl ScriptsRepo for FsScriptsRepo {
    fn catalog(&self) -> Arc<Catalog> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn refresh(&self) -> Result<Arc<Catalog>> {
        let _one_at_a_time = self.refreshing.lock().await;
        let (root, commit) = match &self.source {
            ScriptsSource::Folder(path) => {
                if !path.is_dir() {
                    return Err(Error::invalid(
                        "scripts",
                        format!("{} is not a folder", path.display()),
                    ));
                }
                (path.clone(), None)
            }
            ScriptsSource::Git {
                url,
                branch,
                checkout,
            } => {
                let commit = sync_git(url, branch, checkout).await?;
                (checkout.clone(), Some(commit))
            }
        };
        let mut catalog = tokio::task::spawn_blocking(move || load_catalog(&root, commit))
            .await
            .map_err(|e| Error::backend("scripts", e))??;
        if let Some(check) = &self.check {
            for entry in catalog.projects.values_mut() {
                if entry.error.is_none()
                    && let Some(problem) = check(entry)
                {
                    entry.error = Some(problem);
                }
            }
        }
        let catalog = Arc::new(catalog);
        let invalid: Vec<String> = catalog
            .projects
            .values()
            .filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.key)))
            .collect();
        tracing::info!(
            commit = %catalog.commit,
            projects = catalog.projects.len(),
            invalid = invalid.len(),
            problems = catalog.problems.len(),
            "build scripts read"
        );
        // Which projects cannot build, and why: at start-up and whenever
        // the scripts change (they are on the projects page too).
        if self.catalog().commit != catalog.commit {
            for problem in invalid.iter().chain(&catalog.problems) {
                tracing::warn!("build scripts: {problem}");
            }
        }
        match self.current.write() {
            Ok(mut c) => *c = catalog.clone(),
            Err(poisoned) => *poisoned.into_inner() = catalog.clone(),
        }
        Ok(catalog)
    }
}

async fn git(args: &[&str], cwd: Option<&Path>) -> Result<String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| Error::backend("git", format!("git {} took over {GIT_TIMEOUT:?}", args[0])))?
        .map_err(|e| Error::backend("git", format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(Error::backend(
            "git",
            format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Clones or fast-forwards the checkout to the branch's tip; returns its commit.
async fn sync_git(url: &str, branch: &str, checkout: &Path) -> Result<String> {
    if checkout.join(".git").is_dir() {
        git(
            &["fetch", "--quiet", "--depth", "1", "origin", branch],
            Some(checkout),
        )
        .await?;
        git(
            &["reset", "--quiet", "--hard", "FETCH_HEAD"],
            Some(checkout),
        )
        .await?;
    } else {
        if checkout.exists() {
            std::fs::remove_dir_all(checkout).map_err(|e| Error::backend("scripts", e))?;
        }
        let dest = checkout.to_string_lossy().into_owned();
        git(
            &[
                "clone",
                "--quiet",
                "--depth",
                "1",
                "--single-branch",
                "--branch",
                branch,
                "--",
                url,
                &dest,
            ],
            None,
        )
        .await?;
    }
    git(&["rev-parse", "HEAD"], Some(checkout)).await
}

/// Reads a scripts tree into a catalog. `commit` is the git commit when the
/// tree is a checkout; a plain folder gets a hash of its content instead.
pub fn load_catalog(root: &Path, commit: Option<String>) -> Result<Catalog> {
    let mut catalog = Catalog::default();
    let mut hasher = Sha256::new();
    let teams = sorted_dir(root)
        .map_err(|e| Error::backend("scripts", format!("cannot read {}: {e}", root.display())))?;
    for (team, team_path) in teams {
        if team.starts_with('.') || !team_path.is_dir() || is_symlink(&team_path) {
            continue;
        }
        if let Err(e) = validate_name("team", &team) {
            catalog.problems.push(format!("folder {team:?}: {e}"));
            continue;
        }
        let projects = match sorted_dir(&team_path) {
            Ok(p) => p,
            Err(e) => {
                catalog.problems.push(format!("folder {team}: {e}"));
                continue;
            }
        };
        for (project, project_path) in projects {
            if project.starts_with('.') || !project_path.is_dir() || is_symlink(&project_path) {
                continue;
            }
            let key = match ProjectKey::new(&team, &project) {
                Ok(k) => k,
                Err(e) => {
                    catalog
                        .problems
                        .push(format!("folder {team}/{project:?}: {e}"));
                    continue;
                }
            };
            if let Some(entry) = load_project(key, &project_path) {
                hasher.update(entry.key.to_string().as_bytes());
                for f in &entry.files {
                    hasher.update((f.path.len() as u64).to_le_bytes());
                    hasher.update(f.path.as_bytes());
                    hasher.update([u8::from(f.executable)]);
                    hasher.update((f.content.len() as u64).to_le_bytes());
                    hasher.update(&f.content);
                }
                catalog.projects.insert(entry.key.clone(), entry);
            }
        }
    }
    catalog.commit = commit.unwrap_or_else(|| {
        let digest = hasher.finalize();
        format!("sha256:{}", hex::encode(&digest[..16]))
    });
    Ok(catalog)
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn sorted_dir(path: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        // Names that are not UTF-8 cannot be team or project names.
        if let Ok(name) = entry.file_name().into_string() {
            entries.push((name, entry.path()));
        }
    }
    entries.sort();
    Ok(entries)
}

/// Reads one project folder; `None` when it is not a project at all (neither
/// `project.json` nor `build.sh`), which the original Decap ignored too.
fn load_project(key: ProjectKey, dir: &Path) -> Option<ProjectEntry> {
    let has_descriptor = dir.join("project.json").is_file();
    let has_script = dir.join("build.sh").is_file();
    if !has_descriptor && !has_script {
        return None;
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    let unreadable = read_files(dir, "", 0, &mut files, &mut total).err();
    Some(project_of(key, files, unreadable))
}

/// A project entry made from its folder's files (`unreadable`: why some of
/// them could not be read).
fn project_of(key: ProjectKey, files: Vec<ScriptFile>, unreadable: Option<String>) -> ProjectEntry {
    let mut entry = ProjectEntry {
        key,
        descriptor: None,
        sidecars: Vec::new(),
        files,
        error: None,
        pipeline: None,
    };
    let mut errors: Vec<String> = unreadable.into_iter().collect();
    let by_path: BTreeMap<&str, &ScriptFile> =
        entry.files.iter().map(|f| (f.path.as_str(), f)).collect();
    match by_path.get("project.json") {
        None => errors.push("project.json is missing".to_owned()),
        Some(f) => match ProjectDescriptor::parse(&f.content) {
            Ok(d) => entry.descriptor = Some(d),
            Err(e) => errors.push(e.to_string()),
        },
    }
    let language = entry
        .descriptor
        .as_ref()
        .and_then(|d| d.descriptor.language);
    if let Some(f) = by_path.get(decap_core::pipeline::PIPELINE_FILE) {
        let paths: std::collections::BTreeSet<&str> = by_path.keys().copied().collect();
        let names: Vec<String> = by_path
            .iter()
            .filter(|(p, _)| !p.contains('/') && p.ends_with("-sidecar.json"))
            .filter_map(|(_, f)| parse_sidecar(&f.content).ok())
            .filter_map(|s| s.get("name").and_then(|n| n.as_str()).map(str::to_owned))
            .collect::<Vec<String>>();
        let sidecars: Vec<&str> = names.iter().map(String::as_str).collect();
        match decap_core::pipeline::PipelineDef::parse(&f.content, &paths, &sidecars) {
            Ok(p) => entry.pipeline = Some(p),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !by_path.contains_key("build.sh")
        && entry.pipeline.is_none()
        && !by_path.contains_key(decap_core::pipeline::PIPELINE_FILE)
    {
        match (language, &entry.descriptor) {
            // A preset project: Decap writes its build.sh at launch.
            (Some(_), Some(d)) if d.descriptor.repo_url.as_deref().is_some_and(|u| !u.trim().is_empty()) => {}
            (Some(l), Some(_)) => errors.push(format!(
                "a {l} project with no build.sh needs its repoUrl: Decap checks the repository out for the {l} preset"
            )),
            _ => errors.push("build.sh is missing (or name a language in project.json to build with its preset)".to_owned()),
        }
    }
    if by_path.contains_key(decap_core::preset::PLAN_FILE)
        && language.is_some()
        && !by_path.contains_key("build.sh")
    {
        errors.push(format!(
            "{} is a name Decap keeps for the preset it writes",
            decap_core::preset::PLAN_FILE
        ));
    }
    for (path, f) in &by_path {
        if path.contains('/') || !path.ends_with("-sidecar.json") {
            continue;
        }
        match parse_sidecar(&f.content) {
            Ok(spec) => entry.sidecars.push(spec),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    if !errors.is_empty() {
        entry.error = Some(errors.join("; "));
    }
    entry
}

/// One project folder as read at one scripts commit, kept beside a
/// pipeline run so that its later stages run the scripts it was pinned to
/// even after the server that read them has stopped.
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    project: String,
    commit: String,
    files: Vec<SnapshotFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    executable: bool,
    /// base64.
    content: String,
}

/// The files of `entry`, as read at `commit`, in the form
/// [`restore_project`] reads back (JSON).
pub fn snapshot_project(entry: &ProjectEntry, commit: &str) -> Vec<u8> {
    use base64::Engine as _;
    let snapshot = Snapshot {
        project: entry.key.to_string(),
        commit: commit.to_owned(),
        files: entry
            .files
            .iter()
            .map(|f| SnapshotFile {
                path: f.path.clone(),
                executable: f.executable,
                content: base64::engine::general_purpose::STANDARD.encode(&f.content),
            })
            .collect(),
    };
    serde_json::to_vec(&snapshot).unwrap_or_default()
}

/// The project `key` from a snapshot made by [`snapshot_project`] at
/// `commit`, parsed as the folder was then; an error when the snapshot is of
/// another project or commit, or damaged.
pub fn restore_project(key: &ProjectKey, commit: &str, bytes: &[u8]) -> Result<ProjectEntry> {
    use base64::Engine as _;
    let damaged = |why: String| {
        Error::backend(
            "scripts",
            format!("the build scripts of {key} kept for commit {commit} are damaged: {why}"),
        )
    };
    let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|e| damaged(e.to_string()))?;
    if snapshot.project != key.to_string() || snapshot.commit != commit {
        return Err(damaged(format!(
            "they are of {} at {}",
            snapshot.project, snapshot.commit
        )));
    }
    let mut files = Vec::with_capacity(snapshot.files.len());
    for f in snapshot.files {
        let content = base64::engine::general_purpose::STANDARD
            .decode(f.content.as_bytes())
            .map_err(|e| damaged(format!("{}: {e}", f.path)))?;
        if f.path.is_empty()
            || f.path.starts_with('/')
            || f.path
                .split('/')
                .any(|p| p == ".." || p == "." || p.is_empty())
        {
            return Err(damaged(format!(
                "{:?} is not a path inside the project",
                f.path
            )));
        }
        files.push(ScriptFile {
            path: f.path,
            executable: f.executable,
            content: content.into(),
        });
    }
    Ok(project_of(key.clone(), files, None))
}

/// A sidecar file is one Kubernetes `Container`: a JSON object with at least
/// a DNS-label `name` and an `image`. The Kubernetes executor checks the rest.
fn parse_sidecar(content: &[u8]) -> std::result::Result<serde_json::Value, String> {
    let spec: serde_json::Value =
        serde_json::from_slice(content).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = spec
        .as_object()
        .ok_or("a sidecar must be a JSON object (a Kubernetes Container)")?;
    let name = obj
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or("a sidecar needs a string \"name\"")?;
    let dns_label = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !dns_label {
        return Err(format!(
            "sidecar name {name:?} must be a DNS label (lowercase letters, digits, '-', at most 63)"
        ));
    }
    if obj
        .get("image")
        .and_then(|v| v.as_str())
        .is_none_or(str::is_empty)
    {
        return Err("a sidecar needs a string \"image\"".to_owned());
    }
    Ok(spec)
}

fn read_files(
    dir: &Path,
    prefix: &str,
    depth: usize,
    out: &mut Vec<ScriptFile>,
    total: &mut u64,
) -> std::result::Result<(), String> {
    let entries = sorted_dir(dir).map_err(|e| format!("cannot read {prefix:?}: {e}"))?;
    for (name, path) in entries {
        if name.starts_with('.') {
            continue;
        }
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{rel}: {e}"))?;
        if meta.file_type().is_symlink() {
            // A link could point anywhere on the controller's disk; scripts
            // must be plain files.
            return Err(format!(
                "{rel} is a symbolic link, which build scripts may not contain"
            ));
        }
        if meta.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                return Err(format!("{rel} is nested deeper than {MAX_DEPTH} folders"));
            }
            read_files(&path, &rel, depth + 1, out, total)?;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!("{rel} is larger than {MAX_FILE_BYTES} bytes"));
        }
        *total += meta.len();
        if *total > MAX_PROJECT_BYTES {
            return Err(format!(
                "the project folder holds more than {MAX_PROJECT_BYTES} bytes"
            ));
        }
        let content = std::fs::read(&path).map_err(|e| format!("{rel}: {e}"))?;
        out.push(ScriptFile {
            path: rel,
            executable: meta.permissions().mode() & 0o111 != 0,
            content: content.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }

    #[test]
    fn a_snapshot_gives_back_the_project_as_it_was_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(root, "acme/app/project.json", r#"{"buildImage": "img"}"#);
        write(root, "acme/app/compile.sh", "echo compile\n");
        write(root, "acme/app/lib/common.sh", "X=1\n");
        write(
            root,
            "acme/app/pipeline.json",
            r#"{"stages": [{"name": "compile", "script": "compile.sh"}]}"#,
        );
        std::fs::set_permissions(
            root.join("acme/app/compile.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        let catalog = load_catalog(root, Some("c1".into())).expect("loads");
        let key = ProjectKey::new("acme", "app").expect("key");
        let entry = catalog.project(&key).expect("the project");
        assert_eq!(entry.error, None);
        let bytes = snapshot_project(entry, "c1");
        let back = restore_project(&key, "c1", &bytes).expect("restores");
        assert_eq!(back.error, None);
        let files = |e: &ProjectEntry| {
            e.files
                .iter()
                .map(|f| (f.path.clone(), f.executable, f.content.to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(files(&back), files(entry));
        assert_eq!(back.pipeline, entry.pipeline);
        assert!(
            back.files
                .iter()
                .any(|f| f.path == "compile.sh" && f.executable)
        );

        let other = ProjectKey::new("acme", "other").expect("key");
        let e = restore_project(&other, "c1", &bytes).expect_err("another project");
        assert!(e.to_string().contains("acme/app at c1"), "{e}");
        let e = restore_project(&key, "c2", &bytes).expect_err("another commit");
        assert!(e.to_string().contains("damaged"), "{e}");
        let e = restore_project(&key, "c1", b"{").expect_err("damaged");
        assert!(e.to_string().contains("damaged"), "{e}");
        let escaping = String::from_utf8(bytes)
            .expect("json")
            .replace("lib/common.sh", "../common.sh");
        let e = restore_project(&key, "c1", escaping.as_bytes()).expect_err("outside");
        assert!(e.to_string().contains("not a path inside"), "{e}");
    }

    #[test]
    fn broken_projects_are_listed_with_their_error_and_never_hide_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(root, "acme/good/project.json", r#"{"buildImage": "img"}"#);
        write(root, "acme/good/build.sh", "echo hi\n");
        write(
            root,
            "acme/good/mysql-sidecar.json",
            r#"{"name": "mysql", "image": "mysql:8"}"#,
        );
        write(root, "acme/badjson/project.json", "{");
        write(root, "acme/badjson/build.sh", "true\n");
        write(
            root,
            "acme/badregex/project.json",
            r#"{"buildImage": "i", "managedRefRegex": "("}"#,
        );
        write(root, "acme/badregex/build.sh", "true\n");
        write(root, "acme/noimage/project.json", r#"{"repoUrl": "x"}"#);
        write(root, "acme/noimage/build.sh", "true\n");
        write(root, "acme/noscript/project.json", r#"{"buildImage": "i"}"#);
        write(
            root,
            "acme/badsidecar/project.json",
            r#"{"buildImage": "i"}"#,
        );
        write(root, "acme/badsidecar/build.sh", "true\n");
        write(
            root,
            "acme/badsidecar/redis-sidecar.json",
            r#"{"image": "redis"}"#,
        );
        write(root, "acme/not-a-project/README.md", "docs");
        write(root, "bad team/x/project.json", r#"{"buildImage": "i"}"#);
        let catalog = load_catalog(root, None).expect("loads");
        let error = |p: &str| {
            catalog
                .project(&ProjectKey::new("acme", p).expect("valid"))
                .unwrap_or_else(|| panic!("{p} listed"))
                .error
                .clone()
        };
        assert_eq!(error("good"), None);
        let good = catalog
            .project(&ProjectKey::new("acme", "good").expect("valid"))
            .expect("listed");
        assert_eq!(good.sidecars.len(), 1);
        assert!(error("badjson").expect("error").contains("project.json"));
        assert!(
            error("badregex")
                .expect("error")
                .contains("managedRefRegex")
        );
        assert!(error("noimage").expect("error").contains("buildImage"));
        assert!(
            error("noscript")
                .expect("error")
                .contains("build.sh is missing")
        );
        assert!(
            error("badsidecar")
                .expect("error")
                .contains("redis-sidecar.json")
        );
        assert!(
            catalog
                .project(&ProjectKey::new("acme", "not-a-project").expect("valid"))
                .is_none()
        );
        assert_eq!(catalog.problems.len(), 1, "{:?}", catalog.problems);
        assert!(catalog.commit.starts_with("sha256:"));
        assert_eq!(catalog.teams(), vec!["acme".to_owned()]);
    }

    #[test]
    fn the_content_hash_changes_with_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a/b/project.json", r#"{"buildImage": "i"}"#);
        write(dir.path(), "a/b/build.sh", "echo 1\n");
        let first = load_catalog(dir.path(), None).expect("loads").commit;
        assert_eq!(first, load_catalog(dir.path(), None).expect("loads").commit);
        write(dir.path(), "a/b/build.sh", "echo 2\n");
        assert_ne!(first, load_catalog(dir.path(), None).expect("loads").commit);
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a/b/project.json", r#"{"buildImage": "i"}"#);
        write(dir.path(), "a/b/build.sh", "true\n");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("a/b/passwd")).expect("link");
        let catalog = load_catalog(dir.path(), None).expect("loads");
        let entry = catalog
            .project(&ProjectKey::new("a", "b").expect("valid"))
            .expect("listed");
        assert!(
            entry
                .error
                .as_deref()
                .expect("error")
                .contains("symbolic link")
        );
    }

    #[tokio::test]
    async fn a_git_repo_is_cloned_and_refreshed_to_its_new_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = dir.path().join("origin");
        write(&origin, "acme/app/project.json", r#"{"buildImage": "i"}"#);
        write(&origin, "acme/app/build.sh", "echo one\n");
        let run = |args: &[&str]| {
            let st = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .current_dir(&origin)
                .status()
                .expect("git runs");
            assert!(st.success(), "git {args:?}");
        };
        run(&["init", "--quiet", "--initial-branch", "main"]);
        run(&["add", "."]);
        run(&["commit", "--quiet", "-m", "one"]);
        let url = format!("file://{}", origin.display());
        let source = ScriptsSource::parse(&url, "main", &dir.path().join("data")).expect("parses");
        assert!(matches!(source, ScriptsSource::Git { .. }));
        let repo = FsScriptsRepo::open(source).await.expect("clones");
        let first = repo.catalog();
        assert_eq!(first.commit.len(), 40, "a git commit id");
        write(&origin, "acme/app/build.sh", "echo two\n");
        run(&["commit", "--quiet", "-am", "two"]);
        let second = repo.refresh().await.expect("refreshes");
        assert_ne!(first.commit, second.commit);
        let key = ProjectKey::new("acme", "app").expect("valid");
        let script = |c: &Catalog| {
            c.project(&key)
                .expect("listed")
                .files
                .iter()
                .find(|f| f.path == "build.sh")
                .expect("script")
                .content
                .clone()
        };
        assert_eq!(
            &*script(&first),
            b"echo one\n",
            "the old catalog keeps its scripts"
        );
        assert_eq!(&*script(&second), b"echo two\n");
    }
}
