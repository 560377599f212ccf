//! Preset builds (a project with a `language` and no `build.sh`): the
//! project's repository is fetched into a mirror before the build's
//! environment starts, its `.decap.json` read, and the launch carries the
//! plan (`decap-preset.json`), a `build.sh` that runs it (`bctool phases`),
//! the services' sidecars and the preset's image. The build fetches its
//! tree from the server (`GET /api/v1/build/{id}/source`), so the
//! repository's credentials never enter it.

use std::collections::BTreeMap;
use std::sync::Arc;

use decap_core::build::Build;
use decap_core::catalog::{ProjectEntry, ScriptFile};
use decap_core::preset::{self, Language, PLAN_FILE, Plan};
use decap_scripts::source::{Sources, TOKEN_SECRET, Want};

use super::Controller;

/// What preset builds need.
pub(crate) struct Presets {
    pub(crate) sources: Arc<Sources>,
    pub(crate) images: BTreeMap<Language, String>,
    /// The operator's images for the services, by name.
    pub(crate) service_images: BTreeMap<String, String>,
    /// Trees made at launch, while the build's environment starts, for
    /// bctool's first request (the most recent [`MAX_PREPARED`]).
    pub(crate) prepared: std::sync::Mutex<std::collections::VecDeque<Prepared>>,
}

/// A tree made at launch: the build, its commit, and the `tar.gz` once
/// made (`None` inside when it is too large to hold: then it is streamed).
pub(crate) struct Prepared {
    build: decap_core::build::BuildId,
    commit: String,
    tree: tokio::sync::watch::Receiver<Option<Option<bytes::Bytes>>>,
}

/// How many prepared trees are kept, and the largest kept in memory.
const MAX_PREPARED: usize = 16;
const MAX_PREPARED_BYTES: usize = 4 * 1024 * 1024;

/// The `build.sh` of a preset build.
const DRIVER: &str = "#!/bin/sh\n# Written by Decap: this project builds with its language's preset.\nexec bctool phases \"${DECAP_BUILD_SCRIPTS}/decap-preset.json\"\n";

/// The language of a project that builds with its preset (no `build.sh`).
pub fn preset_language(entry: &ProjectEntry) -> Option<Language> {
    let language = entry.valid_descriptor()?.descriptor.language?;
    (!entry.files.iter().any(|f| f.path == "build.sh")).then_some(language)
}

impl Controller {
    /// Where preset builds' repositories are mirrored, when set.
    pub fn sources(&self) -> Option<Arc<Sources>> {
        self.presets.get().map(|p| p.sources.clone())
    }

    /// Fetches the repositories of the preset builds among `builds` (outside
    /// the scheduling lock, so that a slow remote holds up nothing else);
    /// their launch then finds the commit in the mirror.
    pub(super) async fn prefetch(&self, builds: &[Build]) {
        let Some(presets) = self.presets.get() else {
            return;
        };
        let catalog = self.ports.scripts.catalog();
        let mut fetches = Vec::new();
        for b in builds {
            let Some(entry) = catalog.project(&b.project) else {
                continue;
            };
            if preset_language(entry).is_none() {
                continue;
            }
            let Some(url) = entry
                .valid_descriptor()
                .and_then(|d| d.descriptor.repo_url.clone())
            else {
                continue;
            };
            // A repository on this machine is read in place at launch.
            if decap_scripts::source::is_local(&url) {
                continue;
            }
            fetches.push(async move {
                let token = self.repo_token(b).await;
                let want = Want {
                    git_ref: &b.git_ref,
                    commit: b.commit.as_deref(),
                };
                if let Err(e) = presets.sources.fetch(&url, want, token.as_deref()).await {
                    tracing::info!(build_id = %b.id, error = %e, "cannot fetch the project's repository yet");
                }
            });
        }
        futures::future::join_all(fetches).await;
    }

    /// Makes the build's tree in the background, so that it is ready when
    /// bctool asks.
    fn prepare_tree(
        &self,
        presets: &Presets,
        build: decap_core::build::BuildId,
        url: &str,
        commit: &str,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        if let Ok(mut prepared) = presets.prepared.lock() {
            prepared.push_back(Prepared {
                build,
                commit: commit.to_owned(),
                tree: rx,
            });
            while prepared.len() > MAX_PREPARED {
                prepared.pop_front();
            }
        }
        let child = presets.sources.archive(url, commit);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let made = async {
                let mut child = child.ok()?;
                let mut out = Vec::new();
                child
                    .stdout
                    .take()?
                    .take(MAX_PREPARED_BYTES as u64 + 1)
                    .read_to_end(&mut out)
                    .await
                    .ok()?;
                if out.len() > MAX_PREPARED_BYTES {
                    // Too large to hold: served as a stream on request. The
                    // child, no longer read, would wait on its pipe forever.
                    let _ = child.kill().await;
                    return None;
                }
                let done = child.wait().await.ok()?;
                done.success().then(|| bytes::Bytes::from(out))
            };
            let _ = tx.send(Some(made.await));
        });
    }

    /// The tree made at launch for `build` at `commit`, once; `None` when
    /// there is none (it is then made on request).
    pub async fn prepared_tree(
        &self,
        build: decap_core::build::BuildId,
        commit: &str,
    ) -> Option<bytes::Bytes> {
        let presets = self.presets.get()?;
        let mut tree = {
            let mut prepared = presets.prepared.lock().ok()?;
            let i = prepared
                .iter()
                .position(|p| p.build == build && p.commit == commit)?;
            prepared.remove(i)?.tree
        };
        let made = tree.wait_for(Option::is_some).await.ok()?.clone();
        made.flatten()
    }

    /// The project's (or team's) `REPO_TOKEN` secret, if it has one. Also
    /// for a pull request from a fork: the token is Decap's to fetch with
    /// and never reaches the build.
    pub async fn repo_token(&self, b: &Build) -> Option<String> {
        let store = self.secrets.get()?;
        let secrets = store.for_build(&b.project).await.ok()?;
        secrets
            .into_iter()
            .find(|(k, _)| k == TOKEN_SECRET)
            .map(|(_, v)| v.expose().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The entry a launch carries: for a preset build, the plan, its
    /// driver, the services' sidecars and the image; the preset's image for
    /// a project with a `language` and its own `build.sh`. The repository's
    /// token leaves `secrets`. An error is why the build cannot start (its
    /// repository cannot be fetched).
    pub(super) async fn with_preset(
        &self,
        b: &Build,
        mut entry: ProjectEntry,
        secrets: &mut Vec<(String, String)>,
    ) -> Result<ProjectEntry, String> {
        let Some(d) = entry.valid_descriptor().map(|d| d.descriptor.clone()) else {
            return Ok(entry);
        };
        let Some(language) = d.language else {
            return Ok(entry);
        };
        let images = self.presets.get().map(|p| &p.images);
        if d.build_image.trim().is_empty() {
            let image = images
                .and_then(|i| i.get(&language).cloned())
                .unwrap_or_else(|| language.preset().image.to_owned());
            if let Some(pd) = entry.descriptor.as_mut() {
                pd.descriptor.build_image = image;
            }
        }
        if preset_language(&entry).is_none() {
            return Ok(entry);
        }
        let Some(presets) = self.presets.get() else {
            return Err("this server runs no preset builds (it has no folder for sources)".into());
        };
        let token = secrets
            .iter()
            .position(|(k, _)| k == TOKEN_SECRET)
            .map(|i| secrets.remove(i).1)
            .filter(|v| !v.is_empty());
        // A fork's build gets no secrets, but its repository is fetched
        // here, with the token, which the build never sees.
        let token = match token {
            None if b.from_fork => self.repo_token(b).await,
            token => token,
        };
        let url = d.repo_url.clone().unwrap_or_default();
        let want = Want {
            git_ref: &b.git_ref,
            commit: b.commit.as_deref(),
        };
        let (commit, file) = presets
            .sources
            .checkout(&url, want, token.as_deref(), preset::OVERRIDE_FILE)
            .await
            .map_err(|e| format!("the repository could not be checked out: {e}"))?;
        let plan = file.and_then(|f| preset::plan(language, f.as_deref()));
        let plan = match plan {
            Ok(mut plan) => {
                plan.commit = commit;
                plan
            }
            Err(error) => Plan {
                language,
                phases: Vec::new(),
                env: Vec::new(),
                services: Vec::new(),
                override_file: true,
                commit,
                error: Some(error),
            },
        };
        for s in &plan.services {
            if let Some(service) = preset::Service::named(s) {
                let image = presets.service_images.get(service.name).map(String::as_str);
                entry.sidecars.push(service.sidecar(image));
            }
        }
        if plan.error.is_none() {
            self.prepare_tree(presets, b.id, &url, &plan.commit);
        }
        let json = serde_json::to_vec_pretty(&plan).map_err(|e| e.to_string())?;
        entry.files.push(ScriptFile {
            path: "build.sh".into(),
            executable: true,
            content: Arc::from(DRIVER.as_bytes()),
        });
        entry.files.push(ScriptFile {
            path: PLAN_FILE.into(),
            executable: false,
            content: Arc::from(json),
        });
        Ok(entry)
    }
}
