//! The in-memory view of the build-scripts repo at one commit.
//!
//! A catalog is immutable: a refresh builds a new one and swaps it in, so a
//! build launched from a catalog runs exactly the scripts of the commit it
//! recorded, whatever happens to the repo meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::descriptor::ProjectDescriptor;
use crate::names::ProjectKey;

/// One file of a project's folder, kept in memory (scripts are small).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptFile {
    /// Path relative to the project folder, `/`-separated, validated.
    pub path: String,
    /// Whether the file is executable.
    pub executable: bool,
    /// The content.
    pub content: Arc<[u8]>,
}

/// One `team/project` folder of the build-scripts repo.
#[derive(Debug, Clone)]
pub struct ProjectEntry {
    /// The project key (folder names).
    pub key: ProjectKey,
    /// The parsed descriptor, when `project.json` is valid.
    pub descriptor: Option<ProjectDescriptor>,
    /// The sidecar specs (`*-sidecar.json`), each a Kubernetes `Container`.
    pub sidecars: Vec<serde_json::Value>,
    /// The folder's files, `build.sh` among them.
    pub files: Vec<ScriptFile>,
    /// The pipeline, when the folder has a valid `pipeline.json`; `None`
    /// for a project with only `build.sh` (one stage, `build`).
    pub pipeline: Option<crate::pipeline::PipelineDef>,
    /// Why the project cannot build, when its files are invalid.
    pub error: Option<String>,
}

impl ProjectEntry {
    /// The descriptor of a valid project.
    pub fn valid_descriptor(&self) -> Option<&ProjectDescriptor> {
        if self.error.is_some() {
            None
        } else {
            self.descriptor.as_ref()
        }
    }

    /// The project's pipeline: its `pipeline.json`, or the one stage of a
    /// project with only `build.sh`.
    pub fn pipeline(&self) -> crate::pipeline::PipelineDef {
        self.pipeline
            .clone()
            .unwrap_or_else(crate::pipeline::PipelineDef::single)
    }

    /// What of this project an executor that runs builds on the host (the
    /// local executor) cannot honour, in words for the build's console
    /// and the project's page: its `buildImage` and its sidecars.
    pub fn not_honoured_on_the_host(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(d) = self.valid_descriptor() {
            let image = d.descriptor.build_image.trim();
            if !image.is_empty() {
                out.push(format!(
                    "builds of this project run on the host, not in its buildImage {image} (the local executor uses no images: run Decap with --executor container for that)"
                ));
            }
        }
        if !self.sidecars.is_empty() {
            let names: Vec<String> = self
                .sidecars
                .iter()
                .map(|s| {
                    s.get("name")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("unnamed")
                        .to_owned()
                })
                .collect();
            out.push(format!(
                "this project's sidecars ({}) do not run under the local executor: its builds run without them (run Decap with --executor container for that)",
                names.join(", ")
            ));
        }
        out
    }
}

/// The build-scripts repo at one commit.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// The commit (git) or content hash (`sha256:…`, plain folders) it was read at.
    pub commit: String,
    /// Projects by key.
    pub projects: BTreeMap<ProjectKey, ProjectEntry>,
    /// Problems with the repo as a whole (e.g. a folder that is not a valid
    /// team name), listed so operators see them.
    pub problems: Vec<String>,
}

impl Catalog {
    /// The team names, sorted and unique.
    pub fn teams(&self) -> Vec<String> {
        let mut teams: Vec<String> = self.projects.keys().map(|k| k.team.clone()).collect();
        teams.dedup();
        teams
    }

    /// A project by key.
    pub fn project(&self, key: &ProjectKey) -> Option<&ProjectEntry> {
        self.projects.get(key)
    }
}
