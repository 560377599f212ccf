//! Pipelines: a project's stages, a run of them, and what runs next.
//!
//! A project's `pipeline.json` (in its folder of the build-scripts repo)
//! lists its stages; a project with only `build.sh` is a one-stage
//! pipeline whose stage is `build`. A [`PipelineRun`] is made per request
//! with the whole definition, pinned to one commit and one scripts
//! commit, and never changes afterwards. Each stage runs as a build of its
//! own (an *attempt*); [`plan`] derives, from the run and its attempts,
//! every stage's state and which stages are to start now. It is level
//! triggered: whoever asks again after a crash gets the same answer, and
//! each new attempt is claimed once in the store ([`StageClaim`]), so no
//! stage starts twice.
//!
//! An attempt records the attempts of the stages it needed (its inputs).
//! When one of those is run again, the attempts that used the old one are
//! out of date: the stage counts as pending again and runs once its needs
//! have succeeded anew. That is how a rerun from a stage restarts the
//! stages after it while reusing the ones before.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::build::{Build, BuildId, BuildStatus, Trigger};
use crate::descriptor::{MAX_BUILD_TIMEOUT, Resources, compile_ref_regex};
use crate::error::{Error, Result};
use crate::names::{ProjectKey, validate_name};

/// The file that defines a project's pipeline.
pub const PIPELINE_FILE: &str = "pipeline.json";
/// The one stage of a project without `pipeline.json`.
pub const DEFAULT_STAGE: &str = "build";
/// The most stages a pipeline may have.
pub const MAX_STAGES: usize = 64;

/// One stage as `pipeline.json` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StageDef {
    /// The stage's name (letters, digits, `.`, `-`, `_`).
    pub name: String,
    /// The script it runs: a file of the project's folder.
    pub script: String,
    /// The stages it waits for; absent means the one before (none for the
    /// first), `[]` means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Vec<String>>,
    /// It waits for a person to approve it (Promote).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
    /// It runs only for refs whose short name matches (anchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The image it runs in, in place of the project's `buildImage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The project's sidecars it runs with, by name; all of them when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<Vec<String>>,
    /// What it may use, in place of the project's `resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Its timeout in seconds, in place of the project's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// A lock shared by every branch of the project (one deploy at a time);
    /// without it the stage locks per branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
}

impl StageDef {
    /// The stages it waits for, with the default (the one before) applied.
    pub fn needs<'a>(&'a self, before: Option<&'a StageDef>) -> Vec<&'a str> {
        match &self.needs {
            Some(n) => n.iter().map(String::as_str).collect(),
            None => before.map(|b| vec![b.name.as_str()]).unwrap_or_default(),
        }
    }

    /// Whether the stage runs for `branch` (its `when`).
    pub fn runs_for(&self, branch: &str) -> bool {
        match &self.when {
            None => true,
            // Checked when the definition was read.
            Some(re) => compile_ref_regex(re).is_ok_and(|r| r.is_match(branch)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    stages: Vec<StageDef>,
}

/// A project's pipeline: its stages in the order written, each with its
/// needs resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineDef {
    /// The stages, as written.
    pub stages: Vec<StageDef>,
}

impl PipelineDef {
    /// The pipeline of a project with only `build.sh`.
    pub fn single() -> Self {
        PipelineDef {
            stages: vec![StageDef {
                name: DEFAULT_STAGE.into(),
                script: "build.sh".into(),
                needs: Some(Vec::new()),
                manual: false,
                when: None,
                image: None,
                sidecars: None,
                resources: None,
                timeout: None,
                lock: None,
            }],
        }
    }

    /// Parses `pipeline.json` and checks it against the project's files
    /// (`files`: paths in its folder) and sidecars (`sidecars`: names).
    /// The error says what is wrong, for the project's page.
    pub fn parse(bytes: &[u8], files: &BTreeSet<&str>, sidecars: &[&str]) -> Result<Self> {
        let what = PIPELINE_FILE;
        let raw: RawPipeline = serde_json::from_slice(bytes).map_err(|e| {
            Error::invalid(
                what,
                format!("line {}, column {}: {e}", e.line(), e.column()),
            )
        })?;
        let def = PipelineDef { stages: raw.stages };
        def.check(files, sidecars)?;
        Ok(def)
    }

    fn check(&self, files: &BTreeSet<&str>, sidecars: &[&str]) -> Result<()> {
        let what = PIPELINE_FILE;
        if self.stages.is_empty() {
            return Err(Error::invalid(what, "\"stages\" is empty"));
        }
        if self.stages.len() > MAX_STAGES {
            return Err(Error::invalid(
                what,
                format!("more than {MAX_STAGES} stages"),
            ));
        }
        let mut names = BTreeSet::new();
        for s in &self.stages {
            validate_name("stage name", &s.name)
                .map_err(|e| Error::invalid(what, e.to_string()))?;
            if s.name.len() > 40 {
                return Err(Error::invalid(
                    what,
                    format!("stage name {:?} is longer than 40 characters", s.name),
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(Error::invalid(
                    what,
                    format!("stage {:?} is defined twice", s.name),
                ));
            }
            let script = s.script.trim_start_matches("./");
            if script.is_empty() || script.contains("..") || script.starts_with('/') {
                return Err(Error::invalid(
                    what,
                    format!(
                        "stage {:?}: script {:?} is not a file of the project's folder",
                        s.name, s.script
                    ),
                ));
            }
            if !files.contains(script) {
                return Err(Error::invalid(
                    what,
                    format!(
                        "stage {:?}: its script {:?} is missing from the project's folder",
                        s.name, s.script
                    ),
                ));
            }
            if let Some(re) = &s.when {
                compile_ref_regex(re)
                    .map_err(|e| Error::invalid(what, format!("stage {:?}: when: {e}", s.name)))?;
            }
            if let Some(t) = s.timeout
                && (t == 0 || t > MAX_BUILD_TIMEOUT.as_secs())
            {
                return Err(Error::invalid(
                    what,
                    format!(
                        "stage {:?}: timeout must be 1 to {} seconds",
                        s.name,
                        MAX_BUILD_TIMEOUT.as_secs()
                    ),
                ));
            }
            if let Some(lock) = &s.lock {
                validate_name("lock", lock)
                    .map_err(|e| Error::invalid(what, format!("stage {:?}: {e}", s.name)))?;
            }
            if let Some(r) = &s.resources {
                crate::limits::check_resources(r)
                    .map_err(|e| Error::invalid(what, format!("stage {:?}: {e}", s.name)))?;
            }
            for wanted in s.sidecars.iter().flatten() {
                if !sidecars.contains(&wanted.as_str()) {
                    return Err(Error::invalid(
                        what,
                        format!(
                            "stage {:?}: no sidecar named {wanted:?} in the project's folder",
                            s.name
                        ),
                    ));
                }
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            for n in s.needs(i.checked_sub(1).map(|j| &self.stages[j])) {
                if !names.contains(n) {
                    return Err(Error::invalid(
                        what,
                        format!("stage {:?} needs {n:?}, which is not a stage", s.name),
                    ));
                }
                if n == s.name {
                    return Err(Error::invalid(
                        what,
                        format!("stage {:?} needs itself", s.name),
                    ));
                }
            }
        }
        if let Some(cycle) = self.cycle() {
            return Err(Error::invalid(
                what,
                format!("the stages' needs make a cycle: {}", cycle.join(" → ")),
            ));
        }
        Ok(())
    }

    /// The needs of every stage, by name, with defaults applied.
    pub fn needs(&self) -> BTreeMap<&str, Vec<&str>> {
        self.stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.name.as_str(),
                    s.needs(i.checked_sub(1).map(|j| &self.stages[j])),
                )
            })
            .collect()
    }

    /// A cycle of needs, if there is one, as the stages along it.
    fn cycle(&self) -> Option<Vec<String>> {
        let needs = self.needs();
        // 0: unseen, 1: on the path, 2: done.
        let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
        fn visit<'a>(
            n: &'a str,
            needs: &BTreeMap<&'a str, Vec<&'a str>>,
            mark: &mut BTreeMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match mark.get(n) {
                Some(2) => return None,
                Some(1) => {
                    let from = path.iter().position(|p| *p == n).unwrap_or(0);
                    let mut c: Vec<String> = path[from..].iter().map(|s| s.to_string()).collect();
                    c.push(n.to_owned());
                    return Some(c);
                }
                _ => {}
            }
            mark.insert(n, 1);
            path.push(n);
            for m in needs.get(n).into_iter().flatten() {
                if let Some(c) = visit(m, needs, mark, path) {
                    return Some(c);
                }
            }
            path.pop();
            mark.insert(n, 2);
            None
        }
        for s in &self.stages {
            let mut path = Vec::new();
            if let Some(c) = visit(&s.name, &needs, &mut mark, &mut path) {
                return Some(c);
            }
        }
        None
    }

    /// A stage by name.
    pub fn stage(&self, name: &str) -> Option<&StageDef> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stages that wait, directly or not, for `name`.
    pub fn after(&self, name: &str) -> BTreeSet<String> {
        let needs = self.needs();
        let mut out = BTreeSet::new();
        let mut changed = true;
        while changed {
            changed = false;
            for (s, n) in &needs {
                if !out.contains(*s) && n.iter().any(|m| *m == name || out.contains(*m)) {
                    out.insert((*s).to_owned());
                    changed = true;
                }
            }
        }
        out
    }
}

/// A pipeline run: one request, every stage of the definition, one commit.
/// It never changes once stored; its stages' attempts are builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRun {
    /// The run id (time-ordered).
    pub id: Uuid,
    /// The project.
    pub project: ProjectKey,
    /// The short ref name.
    pub branch: String,
    /// The full ref.
    pub git_ref: String,
    /// The commit, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// What asked for it.
    pub trigger: Trigger,
    /// When it was asked for.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The build-scripts commit its definition was read at.
    pub scripts_commit: String,
    /// The definition, as it was then.
    pub definition: PipelineDef,
    /// The webhook delivery that asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// It is of a pull request from a fork (no secrets).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_fork: bool,
}

impl PipelineRun {
    /// A new run of `definition` for the ref of `template` (a build as
    /// [`Build::new`] makes it: project, ref, commit, trigger, time).
    pub fn new(template: &Build, scripts_commit: String, definition: PipelineDef) -> Self {
        PipelineRun {
            id: Uuid::now_v7(),
            project: template.project.clone(),
            branch: template.branch.clone(),
            git_ref: template.git_ref.clone(),
            commit: template.commit.clone(),
            trigger: template.trigger,
            created_at: template.queued_at,
            scripts_commit,
            definition,
            delivery: template.delivery.clone(),
            from_fork: template.from_fork,
        }
    }

    /// The build of one attempt of one stage, `queued` at `now`.
    pub fn attempt(&self, start: &StageStart, trigger: Trigger, now: OffsetDateTime) -> Build {
        let mut b = Build::of_ref(
            self.project.clone(),
            self.branch.clone(),
            self.git_ref.clone(),
            self.commit.clone(),
            trigger,
            now,
        );
        b.pipeline_run_id = self.id;
        b.delivery = self.delivery.clone();
        b.from_fork = self.from_fork;
        b.stage = Some(StageRef {
            name: start.stage.clone(),
            attempt: start.attempt,
            inputs: start.inputs.clone(),
            lock: self
                .definition
                .stage(&start.stage)
                .and_then(|s| s.lock.clone()),
        });
        b
    }
}

/// What a build knows of the stage it is an attempt of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRef {
    /// The stage's name.
    pub name: String,
    /// Which attempt (1-based).
    pub attempt: u32,
    /// The attempts of the stages it needed, by stage: their artifacts are
    /// its inputs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, BuildId>,
    /// The lock shared by the project's branches, when the stage has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
}

/// A stage attempt claimed in the store: the claim is what makes an
/// attempt start once, however many ask at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageClaim {
    /// The run.
    pub run: Uuid,
    /// The stage.
    pub stage: String,
    /// The attempt (1-based).
    pub attempt: u32,
    /// The build that is the attempt.
    pub build: BuildId,
    /// What asked for it.
    pub trigger: Trigger,
    /// The attempts of the stages it needs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, BuildId>,
}

impl StageClaim {
    /// The claim of `build`, an attempt of a stage of `run`.
    pub fn of(build: &Build) -> Option<Self> {
        let s = build.stage.as_ref()?;
        Some(StageClaim {
            run: build.pipeline_run_id,
            stage: s.name.clone(),
            attempt: s.attempt,
            build: build.id,
            trigger: build.trigger,
            inputs: s.inputs.clone(),
        })
    }

    /// What starts again from the claim (its build was never stored).
    pub fn start(&self) -> StageStart {
        StageStart {
            stage: self.stage.clone(),
            attempt: self.attempt,
            inputs: self.inputs.clone(),
        }
    }
}

/// A stage attempt to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageStart {
    /// The stage.
    pub stage: String,
    /// Its attempt number (1-based).
    pub attempt: u32,
    /// The attempts of its needs.
    pub inputs: BTreeMap<String, BuildId>,
}

/// Where a stage stands in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Not started: its needs have not all succeeded.
    Pending,
    /// A manual stage whose needs have succeeded, waiting for Promote.
    Waiting,
    /// Not run for this ref (`when`), or after a stage that was not.
    Skipped,
    /// Its current attempt, by the build's status.
    Build(BuildStatus),
}

impl StageStatus {
    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Waiting => "waiting",
            StageStatus::Skipped => "skipped",
            StageStatus::Build(b) => b.as_str(),
        }
    }
}

/// One stage of a run, as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageState {
    /// The stage's name.
    pub name: String,
    /// Where it stands.
    pub status: StageStatus,
    /// Its attempts, oldest first.
    pub attempts: Vec<Build>,
    /// The stages it needs.
    pub needs: Vec<String>,
    /// It waits for Promote once its needs have succeeded.
    pub manual: bool,
}

/// A run as it stands, and what is to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The run's status: `running` while a stage is under way or about to
    /// start, `waiting` for a manual stage, else the first stage that did
    /// not succeed, else `succeeded`.
    pub status: &'static str,
    /// Every stage, in the definition's order.
    pub stages: Vec<StageState>,
    /// The stages to start now.
    pub start: Vec<StageStart>,
}

/// Derives where each stage of `run` stands from its attempts (`builds`:
/// the run's builds, in any order) and which stages are to start now.
pub fn plan(run: &PipelineRun, builds: &[Build]) -> Plan {
    let def = &run.definition;
    let needs = def.needs();
    let mut by_stage: BTreeMap<&str, Vec<&Build>> = BTreeMap::new();
    for b in builds {
        if let Some(s) = &b.stage
            && b.pipeline_run_id == run.id
        {
            by_stage.entry(s.name.as_str()).or_default().push(b);
        }
    }
    for v in by_stage.values_mut() {
        v.sort_by_key(|b| b.stage.as_ref().map_or(0, |s| s.attempt));
    }
    // The current attempt of each stage (None: pending, waiting or
    // skipped), decided in dependency order.
    let mut current: BTreeMap<&str, Option<&Build>> = BTreeMap::new();
    let mut status: BTreeMap<&str, StageStatus> = BTreeMap::new();
    let mut start = Vec::new();
    let mut order: Vec<&StageDef> = Vec::new();
    {
        let mut placed: BTreeSet<&str> = BTreeSet::new();
        while order.len() < def.stages.len() {
            let before = order.len();
            for s in &def.stages {
                if !placed.contains(s.name.as_str())
                    && needs[s.name.as_str()].iter().all(|n| placed.contains(n))
                {
                    placed.insert(&s.name);
                    order.push(s);
                }
            }
            if order.len() == before {
                // A cycle (refused when read): leave the rest pending.
                break;
            }
        }
    }
    for s in &order {
        let name = s.name.as_str();
        let my_needs = &needs[name];
        let skipped = !s.runs_for(&run.branch)
            || my_needs
                .iter()
                .any(|n| status.get(n) == Some(&StageStatus::Skipped));
        if skipped {
            status.insert(name, StageStatus::Skipped);
            current.insert(name, None);
            continue;
        }
        let inputs: Option<BTreeMap<String, BuildId>> = my_needs
            .iter()
            .map(|n| {
                current
                    .get(n)
                    .copied()
                    .flatten()
                    .map(|b| ((*n).to_owned(), b.id))
            })
            .collect();
        let latest = by_stage.get(name).and_then(|v| v.last().copied());
        let up_to_date = |b: &&Build| {
            inputs
                .as_ref()
                .is_some_and(|i| b.stage.as_ref().is_some_and(|s| &s.inputs == i))
        };
        if let Some(b) = latest.filter(up_to_date) {
            status.insert(name, StageStatus::Build(b.status));
            current.insert(name, Some(b));
            continue;
        }
        current.insert(name, None);
        let needs_met = my_needs.iter().all(|n| {
            current
                .get(n)
                .copied()
                .flatten()
                .is_some_and(|b| b.status == BuildStatus::Succeeded)
        });
        if !needs_met {
            status.insert(name, StageStatus::Pending);
        } else if s.manual {
            status.insert(name, StageStatus::Waiting);
        } else {
            status.insert(name, StageStatus::Pending);
            start.push(StageStart {
                stage: name.to_owned(),
                attempt: latest
                    .and_then(|b| b.stage.as_ref())
                    .map_or(1, |s| s.attempt + 1),
                inputs: inputs.unwrap_or_default(),
            });
        }
    }
    let stages: Vec<StageState> = def
        .stages
        .iter()
        .map(|s| StageState {
            name: s.name.clone(),
            status: status
                .get(s.name.as_str())
                .copied()
                .unwrap_or(StageStatus::Pending),
            attempts: by_stage
                .get(s.name.as_str())
                .map(|v| v.iter().map(|b| (*b).clone()).collect())
                .unwrap_or_default(),
            needs: needs[s.name.as_str()]
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
            manual: s.manual,
        })
        .collect();
    let active = stages
        .iter()
        .any(|s| matches!(s.status, StageStatus::Build(b) if !b.is_final()));
    let status = if active || !start.is_empty() {
        "running"
    } else if let Some(bad) = stages.iter().find_map(|s| match s.status {
        StageStatus::Build(b) if b.is_final() && b != BuildStatus::Succeeded => Some(b),
        _ => None,
    }) {
        bad.as_str()
    } else if stages.iter().any(|s| s.status == StageStatus::Waiting) {
        "waiting"
    } else if stages.iter().all(|s| {
        matches!(
            s.status,
            StageStatus::Skipped | StageStatus::Build(BuildStatus::Succeeded)
        )
    }) {
        "succeeded"
    } else {
        "pending"
    };
    Plan {
        status,
        stages,
        start,
    }
}

/// Why a stage cannot be started again or approved now, or the attempt
/// that would start.
pub fn rerun(run: &PipelineRun, builds: &[Build], stage: &str) -> Result<StageStart> {
    let p = plan(run, builds);
    let state = stage_of(run, &p, stage)?;
    rerun_in(run, &p, state)
}

/// A stage of a plan, or `NotFound`.
fn stage_of<'a>(run: &PipelineRun, p: &'a Plan, stage: &str) -> Result<&'a StageState> {
    p.stages
        .iter()
        .find(|s| s.name == stage)
        .ok_or_else(|| Error::NotFound(format!("stage {stage:?} of run {}", run.id)))
}

/// [`rerun`] on a plan already made.
fn rerun_in(run: &PipelineRun, p: &Plan, state: &StageState) -> Result<StageStart> {
    let stage = state.name.as_str();
    if let Some(busy) = p
        .stages
        .iter()
        .find(|s| matches!(s.status, StageStatus::Build(b) if !b.is_final()))
    {
        return Err(Error::Conflict(format!(
            "stage {:?} of this run is still {}: rerun once it has ended",
            busy.name,
            busy.status.as_str()
        )));
    }
    if state.status == StageStatus::Skipped {
        return Err(Error::Conflict(format!(
            "stage {stage:?} does not run for {}",
            run.branch
        )));
    }
    let current = |n: &str| {
        p.stages
            .iter()
            .find(|s| s.name == n)
            .filter(|s| s.status == StageStatus::Build(BuildStatus::Succeeded))
            .and_then(|s| s.attempts.last())
    };
    let mut inputs = BTreeMap::new();
    for n in &state.needs {
        match current(n) {
            Some(b) => {
                inputs.insert(n.clone(), b.id);
            }
            None => {
                return Err(Error::Conflict(format!(
                    "stage {stage:?} needs {n:?}, which has not succeeded: rerun from {n:?}"
                )));
            }
        }
    }
    Ok(StageStart {
        stage: stage.to_owned(),
        attempt: state
            .attempts
            .last()
            .and_then(|b| b.stage.as_ref())
            .map_or(1, |s| s.attempt + 1),
        inputs,
    })
}

/// The attempt a Promote starts: only a stage that is `waiting` may be
/// approved.
pub fn approve(run: &PipelineRun, builds: &[Build], stage: &str) -> Result<StageStart> {
    let p = plan(run, builds);
    let state = stage_of(run, &p, stage)?;
    if state.status != StageStatus::Waiting {
        return Err(Error::Conflict(format!(
            "stage {stage:?} is {}, not waiting for approval",
            state.status.as_str()
        )));
    }
    rerun_in(run, &p, state)
}

/// A build that belongs to no stored run (every build before pipelines,
/// and every build of a project without `pipeline.json`) read as the one
/// stage of its own run.
pub fn single_run(build: &Build) -> (PipelineRun, Vec<Build>) {
    let mut b = build.clone();
    b.stage = Some(StageRef {
        name: DEFAULT_STAGE.into(),
        attempt: 1,
        inputs: BTreeMap::new(),
        lock: None,
    });
    b.pipeline_run_id = build.pipeline_run_id;
    let run = PipelineRun {
        id: build.pipeline_run_id,
        project: build.project.clone(),
        branch: build.branch.clone(),
        git_ref: build.git_ref.clone(),
        commit: build.commit.clone(),
        trigger: build.trigger,
        created_at: build.queued_at,
        scripts_commit: build.scripts_commit.clone().unwrap_or_default(),
        definition: PipelineDef::single(),
        delivery: build.delivery.clone(),
        from_fork: build.from_fork,
    };
    (run, vec![b])
}

/// Figures of one stage over a project's recent runs (its current
/// attempt in each run that got to it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageStats {
    /// The stage.
    pub name: String,
    /// Runs in which it ended (not counting those cancelled).
    pub runs: usize,
    /// Of them, succeeded.
    pub succeeded: usize,
    /// Its attempts that ended (not counting those cancelled), reruns
    /// among them.
    #[serde(default)]
    pub attempts: usize,
    /// (failed + errored + timed out) / attempts; none without attempts.
    pub failure_rate: Option<f64>,
    /// Median duration of the attempts that ended, in ms.
    pub p50_ms: Option<i64>,
    /// 90th percentile duration, in ms.
    pub p90_ms: Option<i64>,
}

/// Figures of a project's pipeline over its recent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStats {
    /// Runs looked at.
    pub runs: usize,
    /// Each stage of the current definition, in its order.
    pub stages: Vec<StageStats>,
    /// From a run's request (its commit pushed) to its last stage's
    /// success, median over the runs that succeeded, in ms.
    pub lead_time_p50_ms: Option<i64>,
    /// The same, 90th percentile.
    pub lead_time_p90_ms: Option<i64>,
}

/// The `p`th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Per-stage figures over `runs` (each with its plan), for the stages of
/// `def` (stages a run had that the definition no longer has are left
/// out).
pub fn stats(def: &PipelineDef, runs: &[(&PipelineRun, &Plan)]) -> PipelineStats {
    let mut stages = Vec::with_capacity(def.stages.len());
    for s in &def.stages {
        let mut durations = Vec::new();
        let (mut ran, mut succeeded) = (0usize, 0usize);
        let (mut attempts, mut bad) = (0usize, 0usize);
        for (_, plan) in runs {
            let Some(state) = plan.stages.iter().find(|x| x.name == s.name) else {
                continue;
            };
            // Every attempt that ended counts: a stage that failed, then
            // passed when run again, failed once.
            for a in &state.attempts {
                if !a.status.is_final() || a.status == BuildStatus::Cancelled {
                    continue;
                }
                attempts += 1;
                if a.status != BuildStatus::Succeeded {
                    bad += 1;
                }
                if let Some(ms) = a.duration_ms() {
                    durations.push(ms);
                }
            }
            let StageStatus::Build(status) = state.status else {
                continue;
            };
            if !status.is_final() || status == BuildStatus::Cancelled {
                continue;
            }
            ran += 1;
            if status == BuildStatus::Succeeded {
                succeeded += 1;
            }
        }
        durations.sort_unstable();
        stages.push(StageStats {
            name: s.name.clone(),
            runs: ran,
            succeeded,
            attempts,
            failure_rate: (attempts > 0).then(|| bad as f64 / attempts as f64),
            p50_ms: percentile(&durations, 50.0),
            p90_ms: percentile(&durations, 90.0),
        });
    }
    let mut lead: Vec<i64> = runs
        .iter()
        .filter(|(_, p)| p.status == "succeeded")
        .filter_map(|(run, p)| {
            let done = p
                .stages
                .iter()
                .filter_map(|s| s.attempts.last().and_then(|b| b.end_time))
                .max()?;
            Some((done - run.created_at).whole_milliseconds() as i64)
        })
        .collect();
    lead.sort_unstable();
    PipelineStats {
        runs: runs.len(),
        stages,
        lead_time_p50_ms: percentile(&lead, 50.0),
        lead_time_p90_ms: percentile(&lead, 90.0),
    }
}

/// About how long a running run has left, in ms, by its stages' medians:
/// each stage still to run counts its median, a running one what is left
/// of it (at least nothing). Stages waiting for a person, and those that
/// will not run (skipped, or after one that failed), do not count. `None`
/// when the run is not running or a stage to run has no median yet.
pub fn time_left(plan: &Plan, stats: &PipelineStats, now: OffsetDateTime) -> Option<i64> {
    if plan.status != "running" {
        return None;
    }
    let mut left = 0i64;
    for s in &plan.stages {
        let median = || stats.stages.iter().find(|x| x.name == s.name)?.p50_ms;
        match s.status {
            StageStatus::Build(b) if b.is_final() => {}
            StageStatus::Skipped | StageStatus::Waiting => {}
            StageStatus::Build(BuildStatus::Running) => {
                let started = s.attempts.last().and_then(|b| b.start_time);
                let ran = started.map_or(0, |t| (now - t).whole_milliseconds() as i64);
                left += (median()? - ran).max(0);
            }
            StageStatus::Build(_) => left += median()?,
            StageStatus::Pending => {
                if !s.manual && !blocked(plan, &s.name) {
                    left += median()?;
                }
            }
        }
    }
    Some(left)
}

/// Whether a pending stage will not run in this run: something it needs,
/// directly or not, ended without succeeding, or waits for a person.
fn blocked(plan: &Plan, name: &str) -> bool {
    let Some(s) = plan.stages.iter().find(|x| x.name == name) else {
        return true;
    };
    s.needs.iter().any(|n| {
        plan.stages
            .iter()
            .find(|x| &x.name == n)
            .is_none_or(|x| match x.status {
                StageStatus::Build(b) => b.is_final() && b != BuildStatus::Succeeded,
                StageStatus::Waiting | StageStatus::Skipped => true,
                StageStatus::Pending => x.manual || blocked(plan, &x.name),
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::GitRef;
    use proptest::prelude::*;

    fn files() -> BTreeSet<&'static str> {
        ["build.sh", "test.sh", "deploy.sh", "project.json"]
            .into_iter()
            .collect()
    }

    fn def(json: &str) -> Result<PipelineDef> {
        PipelineDef::parse(json.as_bytes(), &files(), &["db"])
    }

    fn three() -> PipelineDef {
        def(r#"{"stages": [
            {"name": "build", "script": "build.sh"},
            {"name": "test", "script": "test.sh"},
            {"name": "deploy", "script": "deploy.sh", "manual": true, "when": "main", "lock": "production"}
        ]}"#)
        .expect("valid")
    }

    fn run_of(d: PipelineDef, branch: &str) -> PipelineRun {
        let key = ProjectKey::new("acme", "app").expect("valid");
        let r = GitRef::parse(branch).expect("valid");
        let t = Build::new(
            key,
            &r,
            Some("abc".into()),
            Trigger::Webhook,
            OffsetDateTime::UNIX_EPOCH,
        );
        PipelineRun::new(&t, "s1".into(), d)
    }

    fn start(run: &PipelineRun, builds: &mut Vec<Build>) -> Vec<String> {
        let p = plan(run, builds);
        let names: Vec<String> = p.start.iter().map(|s| s.stage.clone()).collect();
        for s in p.start {
            builds.push(run.attempt(&s, Trigger::Webhook, OffsetDateTime::UNIX_EPOCH));
        }
        names
    }

    fn end(builds: &mut [Build], stage: &str, status: BuildStatus) {
        let b = builds
            .iter_mut()
            .rev()
            .find(|b| b.stage.as_ref().is_some_and(|s| s.name == stage))
            .expect("an attempt");
        b.status = status;
    }

    fn statuses(run: &PipelineRun, builds: &[Build]) -> Vec<&'static str> {
        plan(run, builds)
            .stages
            .iter()
            .map(|s| s.status.as_str())
            .collect()
    }

    #[test]
    fn definitions_are_checked() {
        let cases = [
            (r#"{"stages": []}"#, "empty"),
            (
                r#"{"stages": [{"name": "a", "script": "nope.sh"}]}"#,
                "missing",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "needs": ["b"]}]}"#,
                "not a stage",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "needs": ["b"]}, {"name": "b", "script": "test.sh", "needs": ["a"]}]}"#,
                "cycle",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh"}, {"name": "a", "script": "test.sh"}]}"#,
                "twice",
            ),
            (
                r#"{"stages": [{"name": "a b", "script": "build.sh"}]}"#,
                "contains",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "../x"}]}"#,
                "not a file",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "when": "("}]}"#,
                "when",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "timeout": 0}]}"#,
                "timeout",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "sidecars": ["redis"]}]}"#,
                "sidecar",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "needs": ["a"]}]}"#,
                "itself",
            ),
            (
                r#"{"stages": [{"name": "a", "script": "build.sh", "colour": 1}]}"#,
                "unknown field",
            ),
            (r#"{"stages": [{"name": "a""#, "line 1"),
        ];
        for (json, want) in cases {
            let err = def(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err} should say {want}");
        }
        let d = three();
        assert_eq!(d.needs()["test"], vec!["build"]);
        assert_eq!(d.needs()["build"], Vec::<&str>::new());
        assert_eq!(
            d.after("build"),
            ["deploy", "test"].into_iter().map(String::from).collect()
        );
    }

    #[test]
    fn a_run_flows_through_its_stages() {
        let run = run_of(three(), "main");
        let mut builds = Vec::new();
        assert_eq!(statuses(&run, &builds), ["pending", "pending", "pending"]);
        assert_eq!(start(&run, &mut builds), ["build"]);
        assert_eq!(plan(&run, &builds).status, "running");
        assert!(start(&run, &mut builds).is_empty(), "never started twice");
        end(&mut builds, "build", BuildStatus::Succeeded);
        assert_eq!(start(&run, &mut builds), ["test"]);
        end(&mut builds, "test", BuildStatus::Succeeded);
        assert!(start(&run, &mut builds).is_empty(), "deploy is manual");
        assert_eq!(
            statuses(&run, &builds),
            ["succeeded", "succeeded", "waiting"]
        );
        assert_eq!(plan(&run, &builds).status, "waiting");
        let s = approve(&run, &builds, "deploy").expect("waiting");
        assert_eq!(s.attempt, 1);
        assert_eq!(s.inputs.keys().collect::<Vec<_>>(), ["test"]);
        builds.push(run.attempt(&s, Trigger::Manual, OffsetDateTime::UNIX_EPOCH));
        assert!(matches!(
            approve(&run, &builds, "deploy"),
            Err(Error::Conflict(_))
        ));
        assert_eq!(builds[2].lock_key().as_str(), "acme/app/:production");
        assert_eq!(builds[1].lock_key().as_str(), "acme/app/main:test");
        end(&mut builds, "deploy", BuildStatus::Succeeded);
        assert_eq!(plan(&run, &builds).status, "succeeded");
    }

    #[test]
    fn when_skips_a_stage_and_the_ones_after_it() {
        let d = def(r#"{"stages": [
            {"name": "build", "script": "build.sh"},
            {"name": "deploy", "script": "deploy.sh", "when": "main"},
            {"name": "smoke", "script": "test.sh"}
        ]}"#)
        .expect("valid");
        let run = run_of(d, "feature/x");
        let mut builds = Vec::new();
        start(&run, &mut builds);
        end(&mut builds, "build", BuildStatus::Succeeded);
        assert!(start(&run, &mut builds).is_empty());
        assert_eq!(statuses(&run, &builds), ["succeeded", "skipped", "skipped"]);
        assert_eq!(plan(&run, &builds).status, "succeeded");
    }

    #[test]
    fn a_failed_stage_stops_the_run_and_a_rerun_starts_again_from_it() {
        let run = run_of(three(), "feature");
        let mut builds = Vec::new();
        start(&run, &mut builds);
        end(&mut builds, "build", BuildStatus::Succeeded);
        start(&run, &mut builds);
        end(&mut builds, "test", BuildStatus::Failed);
        assert!(start(&run, &mut builds).is_empty());
        assert_eq!(plan(&run, &builds).status, "failed");
        // The first stage again: the later ones are pending once more.
        let s = rerun(&run, &builds, "build").expect("ended");
        assert_eq!(s.attempt, 2);
        builds.push(run.attempt(&s, Trigger::Rerun, OffsetDateTime::UNIX_EPOCH));
        assert_eq!(statuses(&run, &builds), ["queued", "pending", "skipped"]);
        assert!(matches!(
            rerun(&run, &builds, "test"),
            Err(Error::Conflict(_))
        ));
        end(&mut builds, "build", BuildStatus::Succeeded);
        let started = plan(&run, &builds).start;
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].attempt, 2, "test's second attempt");
        assert_eq!(plan(&run, &builds).stages[1].attempts.len(), 1);
    }

    #[test]
    fn a_rerun_of_a_later_stage_reuses_the_earlier_ones() {
        let run = run_of(three(), "feature");
        let mut builds = Vec::new();
        start(&run, &mut builds);
        end(&mut builds, "build", BuildStatus::Succeeded);
        start(&run, &mut builds);
        end(&mut builds, "test", BuildStatus::Failed);
        let s = rerun(&run, &builds, "test").expect("ended");
        assert_eq!((s.attempt, s.inputs["build"]), (2, builds[0].id));
        assert!(matches!(
            rerun(&run, &builds, "nope"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn a_build_without_a_run_is_a_one_stage_run() {
        let key = ProjectKey::new("acme", "app").expect("valid");
        let b = Build::new(
            key,
            &GitRef::parse("main").expect("valid"),
            None,
            Trigger::Manual,
            OffsetDateTime::UNIX_EPOCH,
        );
        let (run, builds) = single_run(&b);
        assert_eq!(run.id, b.id.0);
        let p = plan(&run, &builds);
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].status, StageStatus::Build(BuildStatus::Queued));
        assert!(p.start.is_empty());
    }

    #[test]
    fn stage_figures_and_time_left_come_from_recent_runs() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let ms = time::Duration::milliseconds;
        let mut runs = Vec::new();
        // Ten runs: build takes 100·i ms and succeeds; test takes 1 s and
        // fails in runs 0 and 1; deploy (manual) never runs.
        for i in 0..10i64 {
            let run = run_of(three(), "main");
            let mut builds = Vec::new();
            start(&run, &mut builds);
            let b = &mut builds[0];
            b.status = BuildStatus::Succeeded;
            b.start_time = Some(t0);
            b.end_time = Some(t0 + ms(100 * (i + 1)));
            start(&run, &mut builds);
            let b = &mut builds[1];
            b.status = if i < 2 {
                BuildStatus::Failed
            } else {
                BuildStatus::Succeeded
            };
            b.start_time = Some(t0);
            b.end_time = Some(t0 + ms(1000));
            if i == 1 {
                // Run again, test passes in 2 s.
                let again = rerun(&run, &builds, "test").expect("a failed stage reruns");
                let mut b = run.attempt(&again, Trigger::Api, OffsetDateTime::UNIX_EPOCH);
                b.status = BuildStatus::Succeeded;
                b.start_time = Some(t0);
                b.end_time = Some(t0 + ms(2000));
                builds.push(b);
            }
            let p = plan(&run, &builds);
            runs.push((run, p));
        }
        let pairs: Vec<(&PipelineRun, &Plan)> = runs.iter().map(|(r, p)| (r, p)).collect();
        let st = stats(&three(), &pairs);
        assert_eq!(st.runs, 10);
        assert_eq!(st.stages[0].p50_ms, Some(500));
        assert_eq!(st.stages[0].p90_ms, Some(900));
        assert_eq!(st.stages[0].failure_rate, Some(0.0));
        // Eleven attempts of test ended, two of them failed; nine runs
        // got through it (one by its rerun).
        assert_eq!(st.stages[1].attempts, 11);
        assert_eq!(st.stages[1].failure_rate, Some(2.0 / 11.0));
        assert_eq!(st.stages[1].succeeded, 9);
        assert_eq!(st.stages[1].runs, 10);
        assert_eq!(st.stages[1].p90_ms, Some(1000));
        assert_eq!(st.stages[2].runs, 0);
        assert_eq!(st.stages[2].p50_ms, None);
        assert_eq!(st.lead_time_p50_ms, None, "no run got through deploy");
        // A run whose build has run 200 ms: 300 ms of it left, then test's
        // second; deploy waits for a person and does not count.
        let run = run_of(three(), "main");
        let mut builds = Vec::new();
        start(&run, &mut builds);
        builds[0].status = BuildStatus::Running;
        builds[0].start_time = Some(t0);
        let p = plan(&run, &builds);
        assert_eq!(time_left(&p, &st, t0 + ms(200)), Some(300 + 1000));
        assert_eq!(
            time_left(&p, &st, t0 + ms(5000)),
            Some(1000),
            "never below nothing"
        );
        assert_eq!(time_left(&runs[0].1, &st, t0), None, "an ended run");
    }

    proptest! {
        /// Whatever the stages end as, in whatever order: no stage is ever
        /// started while an attempt of it is current, a stage starts only
        /// after all its needs succeeded, and the run ends.
        #[test]
        fn runs_always_end_and_never_start_a_stage_twice(
            ends in proptest::collection::vec(0u8..4, 1..20),
            manual in any::<bool>(),
        ) {
            let mut d = def(r#"{"stages": [
                {"name": "build", "script": "build.sh"},
                {"name": "unit", "script": "test.sh", "needs": ["build"]},
                {"name": "lint", "script": "test.sh", "needs": ["build"]},
                {"name": "deploy", "script": "deploy.sh", "needs": ["unit", "lint"]}
            ]}"#).expect("valid");
            d.stages[3].manual = manual;
            let run = run_of(d, "main");
            let mut builds: Vec<Build> = Vec::new();
            let mut ends = ends.into_iter().cycle();
            for _ in 0..40 {
                let p = plan(&run, &builds);
                for s in &p.start {
                    let state = p.stages.iter().find(|x| x.name == s.stage).expect("a stage");
                    prop_assert!(!matches!(state.status, StageStatus::Build(_)));
                    for n in &state.needs {
                        let need = p.stages.iter().find(|x| &x.name == n).expect("a stage");
                        prop_assert_eq!(need.status, StageStatus::Build(BuildStatus::Succeeded));
                    }
                }
                start(&run, &mut builds);
                let Some(open) = builds.iter_mut().find(|b| !b.status.is_final()) else { break };
                open.status = match ends.next().unwrap_or(0) {
                    0 | 1 => BuildStatus::Succeeded,
                    2 => BuildStatus::Failed,
                    _ => BuildStatus::Cancelled,
                };
            }
            let p = plan(&run, &builds);
            prop_assert!(p.start.is_empty());
            prop_assert!(p.status != "running");
            let mut seen = BTreeSet::new();
            for b in &builds {
                let s = b.stage.as_ref().expect("a stage");
                prop_assert!(seen.insert((s.name.clone(), s.attempt)));
            }
        }
    }
}
