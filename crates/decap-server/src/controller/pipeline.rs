//! Pipelines: a request makes a run with every stage of the project's
//! `pipeline.json`; its stages start as their needs succeed
//! ([`decap_core::pipeline::plan`] decides), each as a build of its own.
//! Every new attempt is claimed in the run store before its build is
//! stored, so a stage starts once however many ask (two replicas, a
//! restart between two stages, a rerun asked twice).

use std::sync::Arc;
use std::time::Duration;

use decap_core::build::{Build, BuildId, Trigger};
use decap_core::catalog::{ProjectEntry, ScriptFile};
use decap_core::names::ProjectKey;
use decap_core::pipeline::{
    self, PipelineRun, PipelineStats, Plan, StageClaim, StageDef, StageStart,
};
use decap_core::ports::BlobKind;
use decap_core::{Error, Result};
use uuid::Uuid;

use super::{Controller, now};

/// How far back a start looks for runs that may have a stage to start.
pub(super) const RECOVER_RUNS: Duration = Duration::from_secs(7 * 24 * 3600);

/// How old a claim whose build is missing must be before the build is
/// stored from it (its claimer stores it right after claiming).
const REPAIR_AFTER: Duration = Duration::from_secs(30);

/// The largest kept snapshot of a project's build scripts read back (the
/// project folder's cap, in base64, with room for the names).
const MAX_SNAPSHOT_BYTES: u64 = decap_scripts::MAX_PROJECT_BYTES / 3 * 4 + (1 << 20);

/// The variable naming the stages whose artifacts a stage gets (bctool's
/// `inputs` reads it).
pub const INPUT_STAGES_VAR: &str = "DECAP_INPUT_STAGES";

/// What a request for `template`'s ref makes: for a project with
/// `pipeline.json`, a run (pinned to `scripts_commit`) and the first
/// attempts of the stages that start at once; otherwise `template` alone.
pub fn builds_for(
    entry: &ProjectEntry,
    template: Build,
    scripts_commit: &str,
) -> (Option<PipelineRun>, Vec<Build>) {
    let Some(def) = &entry.pipeline else {
        return (None, vec![template]);
    };
    let run = PipelineRun::new(&template, scripts_commit.to_owned(), def.clone());
    let builds = pipeline::plan(&run, &[])
        .start
        .iter()
        .map(|s| run.attempt(s, template.trigger, template.queued_at))
        .collect();
    (Some(run), builds)
}

/// The cursor of a page of a project's runs, where the last page ended:
/// among its stored runs (a run id), among the builds from before them
/// (`older.<nanos>.<build cursor>`), or among its builds (`builds.…`, a
/// project without a pipeline now).
#[derive(Debug, Clone, Copy)]
enum ListCursor<'a> {
    Runs(Uuid),
    Older {
        before: Option<time::OffsetDateTime>,
        cursor: Option<&'a str>,
    },
    Builds(&'a str),
}

const OLDER_CURSOR: &str = "older.";
const BUILDS_CURSOR: &str = "builds.";

impl<'a> ListCursor<'a> {
    fn parse(c: &'a str) -> Result<Self> {
        let bad = || Error::invalid("cursor", "not a cursor from this server");
        if let Some(rest) = c.strip_prefix(BUILDS_CURSOR) {
            return Ok(ListCursor::Builds(rest));
        }
        if let Some(rest) = c.strip_prefix(OLDER_CURSOR) {
            let (nanos, cursor) = rest.split_once('.').unwrap_or((rest, ""));
            let before = match nanos {
                "" => None,
                n => {
                    let n: i128 = n.parse().map_err(|_| bad())?;
                    Some(time::OffsetDateTime::from_unix_timestamp_nanos(n).map_err(|_| bad())?)
                }
            };
            let cursor = (!cursor.is_empty()).then_some(cursor);
            return Ok(ListCursor::Older { before, cursor });
        }
        Uuid::parse_str(c).map(ListCursor::Runs).map_err(|_| bad())
    }

    fn older(before: Option<time::OffsetDateTime>, cursor: Option<&str>) -> String {
        let nanos = before
            .map(|t| t.unix_timestamp_nanos().to_string())
            .unwrap_or_default();
        format!("{OLDER_CURSOR}{nanos}.{}", cursor.unwrap_or_default())
    }
}

/// A pipeline run as it stands.
#[derive(Debug, Clone)]
pub struct RunView {
    /// The run.
    pub run: PipelineRun,
    /// Its stages and status.
    pub plan: Plan,
    /// It is a build of no stored run, shown as a one-stage run (a
    /// project's builds from before it had a pipeline).
    pub single: bool,
}

impl RunView {
    /// `run` as its attempts `builds` leave it.
    fn of(run: PipelineRun, builds: &[Build]) -> Self {
        let plan = pipeline::plan(&run, builds);
        RunView {
            run,
            plan,
            single: false,
        }
    }

    /// A build that belongs to no stored run, as the one stage of its own.
    fn single(b: &Build) -> Self {
        let (run, builds) = pipeline::single_run(b);
        RunView {
            single: true,
            ..RunView::of(run, &builds)
        }
    }
}

/// The `build.sh` of a stage that needs others: it fetches their
/// artifacts into `$DECAP_INPUTS`, then runs the stage's script.
fn driver(stage: &StageDef, script: &ScriptFile) -> String {
    let path = stage.script.trim_start_matches("./");
    let interpreter = script
        .content
        .strip_prefix(b"#!")
        .and_then(|rest| rest.split(|&c| c == b'\n').next())
        .map(|line| String::from_utf8_lossy(line).trim().to_owned())
        .filter(|line| !line.is_empty())
        .unwrap_or_else(|| "/bin/sh".to_owned());
    format!(
        "#!/bin/sh\n\
         # Written by Decap: stage {name} of this project's pipeline. The\n\
         # artifacts of the stages it needs are fetched into $DECAP_INPUTS,\n\
         # then its script runs.\n\
         DECAP_INPUTS=\"${{ARTIFACTS_DIR%/*}}/inputs\"\n\
         export DECAP_INPUTS\n\
         bctool inputs \"$DECAP_INPUTS\" || exit $?\n\
         exec {interpreter} \"$DECAP_BUILD_SCRIPTS/{path}\"\n",
        name = stage.name,
    )
}

/// The project's folder as one stage of it runs: its `build.sh` is the
/// stage's script (or a driver that fetches its inputs first), and its
/// image, sidecars, resources and timeout are the stage's where it sets
/// them.
pub fn stage_entry(
    mut entry: ProjectEntry,
    run: &PipelineRun,
    build: &Build,
    scripts_commit: &str,
) -> std::result::Result<ProjectEntry, String> {
    let Some(stage_ref) = &build.stage else {
        return Ok(entry);
    };
    let Some(stage) = run.definition.stage(&stage_ref.name) else {
        return Err(format!(
            "stage {:?} is not in the pipeline of run {}",
            stage_ref.name, run.id
        ));
    };
    let path = stage.script.trim_start_matches("./");
    let Some(script) = entry.files.iter().find(|f| f.path == path).cloned() else {
        let pinned = if scripts_commit == run.scripts_commit {
            String::new()
        } else {
            format!(
                " (the run was pinned to {}, which this server no longer holds)",
                run.scripts_commit
            )
        };
        return Err(format!(
            "stage {}: its script {path} is missing from the build scripts at {scripts_commit}{pinned}",
            stage.name
        ));
    };
    let build_sh = if stage_ref.inputs.is_empty() {
        ScriptFile {
            path: "build.sh".into(),
            executable: true,
            content: script.content.clone(),
        }
    } else {
        ScriptFile {
            path: "build.sh".into(),
            executable: true,
            content: Arc::from(driver(stage, &script).into_bytes()),
        }
    };
    entry.files.retain(|f| f.path != "build.sh");
    entry.files.push(build_sh);
    if let Some(names) = &stage.sidecars {
        entry.sidecars.retain(|s| {
            s.get("name")
                .and_then(|n| n.as_str())
                .is_some_and(|n| names.iter().any(|w| w == n))
        });
    }
    if let Some(d) = entry.descriptor.as_mut() {
        if let Some(image) = &stage.image {
            d.descriptor.build_image = image.clone();
        }
        if let Some(r) = &stage.resources {
            d.descriptor.resources = Some(r.clone());
        }
        if let Some(t) = stage.timeout {
            d.descriptor.build_timeout_seconds = Some(t);
        }
        if !stage_ref.inputs.is_empty() {
            let names: Vec<&str> = stage_ref.inputs.keys().map(String::as_str).collect();
            d.descriptor
                .env
                .insert(INPUT_STAGES_VAR.into(), names.join(","));
        }
    }
    Ok(entry)
}

/// Gives a build the variables that say which run, stage and attempt it is.
pub fn stage_env(entry: &mut ProjectEntry, build: &Build) {
    if let Some(d) = entry.descriptor.as_mut() {
        d.descriptor.env.extend([
            (
                "DECAP_PIPELINE_RUN_ID".to_owned(),
                build.pipeline_run_id.to_string(),
            ),
            ("DECAP_STAGE".to_owned(), build.stage_name().to_owned()),
            ("DECAP_ATTEMPT".to_owned(), build.attempt().to_string()),
        ]);
    }
}

impl Controller {
    /// Stores the runs of builds just stored, each with the claims of its
    /// first attempts (a run that fails to be stored here is made again
    /// from its builds when one of them launches or ends).
    pub async fn record_runs(&self, runs: &[PipelineRun], builds: &[Build]) -> Result<()> {
        for run in runs {
            self.keep_scripts(run).await;
            match self.ports.runs.insert(run).await {
                Ok(()) | Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
            for b in builds.iter().filter(|b| b.pipeline_run_id == run.id) {
                if let Some(claim) = StageClaim::of(b) {
                    self.ports.runs.claim(&claim).await?;
                }
            }
        }
        Ok(())
    }

    /// Keeps the scripts of `run`'s project as the run is pinned to them,
    /// beside the run, for its stages that start after this process has
    /// stopped. Without them (the blob store down) such a stage runs the
    /// scripts current then, and its record says which.
    async fn keep_scripts(&self, run: &PipelineRun) {
        let Some(entry) = self
            .catalog_at(&run.scripts_commit)
            .and_then(|c| c.project(&run.project).cloned())
        else {
            return;
        };
        let bytes =
            bytes::Bytes::from(decap_scripts::snapshot_project(&entry, &run.scripts_commit));
        let stream: decap_core::ports::ByteStream =
            Box::pin(futures::stream::once(async move { Ok(bytes) }));
        if let Err(e) = self
            .ports
            .blobs
            .put(BuildId(run.id), BlobKind::Scripts, stream)
            .await
        {
            tracing::warn!(run = %run.id, error = %e, "cannot keep the build scripts of a pipeline run");
        }
    }

    /// The project of `run` as its scripts commit has it: from the
    /// catalogs this process still holds, else from the scripts kept
    /// beside the run; `None` when neither has it.
    pub(super) async fn pinned_project(&self, run: &PipelineRun) -> Option<ProjectEntry> {
        if let Some(entry) = self
            .catalog_at(&run.scripts_commit)
            .and_then(|c| c.project(&run.project).cloned())
        {
            return Some(entry);
        }
        let read = async {
            let Some((size, mut stream)) = self
                .ports
                .blobs
                .get(BuildId(run.id), BlobKind::Scripts)
                .await?
            else {
                return Ok(None);
            };
            let cap = MAX_SNAPSHOT_BYTES;
            if size > cap {
                return Err(Error::backend(
                    "scripts",
                    format!("the kept build scripts are {size} bytes, more than {cap}"),
                ));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
                let chunk = chunk.map_err(|e| Error::backend("blobs", e))?;
                if (bytes.len() + chunk.len()) as u64 > cap {
                    return Err(Error::backend(
                        "scripts",
                        "the kept build scripts grew past their size",
                    ));
                }
                bytes.extend_from_slice(&chunk);
            }
            decap_scripts::restore_project(&run.project, &run.scripts_commit, &bytes).map(Some)
        };
        match read.await {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(run = %run.id, error = %e, "cannot read the build scripts kept for a pipeline run");
                None
            }
        }
    }

    /// The run of a stage's build; made again from the build and the
    /// project's current definition if it was never stored (a failure
    /// between storing a request's builds and its run).
    pub(super) async fn run_of(&self, build: &Build) -> Result<PipelineRun> {
        if let Some(run) = self.ports.runs.get(build.pipeline_run_id).await? {
            return Ok(run);
        }
        let catalog = self.ports.scripts.catalog();
        let def = catalog
            .project(&build.project)
            .and_then(|p| p.pipeline.clone())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "pipeline run {} (and {} has no pipeline.json now)",
                    build.pipeline_run_id, build.project
                ))
            })?;
        let mut run = PipelineRun::new(build, catalog.commit.clone(), def);
        run.id = build.pipeline_run_id;
        tracing::warn!(run = %run.id, "a pipeline run was never stored; storing it from its builds");
        self.record_runs(std::slice::from_ref(&run), std::slice::from_ref(build))
            .await?;
        Ok(self.ports.runs.get(run.id).await?.unwrap_or(run))
    }

    /// The builds of a run, by its claims. With `repair`, a claimed
    /// attempt whose build was never stored (a stop between the two; a
    /// claim younger than [`REPAIR_AFTER`] is still being stored by its
    /// claimer) is stored now, queued, and answered among those to
    /// schedule.
    async fn attempts(
        &self,
        run: &PipelineRun,
        repair: bool,
    ) -> Result<(Vec<Build>, Vec<BuildId>)> {
        let claims = self.ports.runs.claims(run.id).await?;
        let reads =
            futures::future::join_all(claims.iter().map(|c| self.ports.builds.get(c.build))).await;
        let mut builds = Vec::with_capacity(claims.len());
        let mut stored = Vec::new();
        for (claim, read) in claims.iter().zip(reads) {
            if let Some(b) = read? {
                builds.push(b);
                continue;
            }
            let claimed_at = claim
                .build
                .0
                .get_timestamp()
                .map(|t| t.to_unix())
                .map(|(s, n)| std::time::UNIX_EPOCH + Duration::new(s, n));
            let old = claimed_at.is_some_and(|t| {
                std::time::SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age > REPAIR_AFTER)
            });
            if !repair || !old {
                continue;
            }
            let mut b = run.attempt(&claim.start(), claim.trigger, now());
            b.id = claim.build;
            match self.ports.builds.insert(&b).await {
                Ok(()) => {
                    tracing::info!(build_id = %b.id, run = %run.id, stage = %claim.stage, "storing a claimed stage attempt that was never stored");
                    stored.push(b.id);
                    builds.push(b);
                }
                Err(Error::Conflict(_)) => {
                    if let Some(b) = self.ports.builds.get(claim.build).await? {
                        builds.push(b);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok((builds, stored))
    }

    /// A run as it stands. A build that belongs to no stored run (every
    /// build of a project without `pipeline.json`, and those made before
    /// pipelines) is read as the one stage of its own run.
    pub async fn pipeline_run(&self, id: Uuid) -> Result<RunView> {
        if let Some(run) = self.ports.runs.get(id).await? {
            let (builds, _) = self.attempts(&run, false).await?;
            return Ok(RunView::of(run, &builds));
        }
        match self.ports.builds.get(BuildId(id)).await? {
            Some(b) if b.stage.is_none() => Ok(RunView::single(&b)),
            _ => Err(Error::NotFound(format!("pipeline run {id}"))),
        }
    }

    /// A project's runs, newest first: its stored runs when it has a
    /// pipeline, else its builds, each read as a one-stage run. `cursor`
    /// continues a listing; the answer carries the next one.
    pub async fn pipeline_runs(
        &self,
        project: &ProjectKey,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<RunView>, Option<String>)> {
        let limit = limit.clamp(1, 100);
        let has_pipeline = self
            .ports
            .scripts
            .catalog()
            .project(project)
            .is_some_and(|p| p.pipeline.is_some());
        let cursor = cursor.map(ListCursor::parse).transpose()?;
        if !has_pipeline && cursor.is_none_or(|c| matches!(c, ListCursor::Builds(_))) {
            // Its builds, each a one-stage run, or a stage of a run it
            // stored while it had a pipeline.
            let page = self
                .ports
                .builds
                .list(&decap_core::ports::BuildQuery {
                    project: Some(project.clone()),
                    limit,
                    cursor: match cursor {
                        Some(ListCursor::Builds(c)) => Some(c.to_owned()),
                        _ => None,
                    },
                    ..Default::default()
                })
                .await?;
            let views = self.runs_of_builds(page.builds).await?;
            let next = page.next_cursor.map(|c| format!("{BUILDS_CURSOR}{c}"));
            return Ok((views, next));
        }
        if let Some(ListCursor::Older { before, cursor }) = cursor {
            let (views, next) = self
                .singles_before(project, before, cursor.map(str::to_owned), limit)
                .await?;
            return Ok((views, next));
        }
        let before = match cursor {
            Some(ListCursor::Runs(id)) => Some(id),
            _ => None,
        };
        let mut runs = self.ports.runs.list(project, before, limit + 1).await?;
        let more_runs = runs.len() > limit;
        runs.truncate(limit);
        // Two reads for the page: the runs' claims, then their builds.
        let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
        let claims = self.ports.runs.claims_of(&ids).await?;
        let build_ids: Vec<BuildId> = claims.iter().map(|c| c.build).collect();
        let mut by_run: std::collections::HashMap<Uuid, Vec<Build>> =
            std::collections::HashMap::new();
        for b in self.ports.builds.get_many(&build_ids).await? {
            by_run.entry(b.pipeline_run_id).or_default().push(b);
        }
        let oldest = runs.last().map(|r| r.created_at);
        let mut views: Vec<RunView> = runs
            .into_iter()
            .map(|run| {
                let builds = by_run.remove(&run.id).unwrap_or_default();
                RunView::of(run, &builds)
            })
            .collect();
        if more_runs {
            let next = views.last().map(|v| v.run.id.to_string());
            return Ok((views, next));
        }
        // The stored runs end here; the project's builds from before its
        // first stored run (before it had a pipeline) follow, each a
        // one-stage run.
        let room = limit - views.len();
        let (older, next) = self
            .singles_before(project, oldest, None, room.max(1))
            .await?;
        let next = if room == 0 {
            (!older.is_empty()).then(|| ListCursor::older(oldest, None))
        } else {
            views.extend(older);
            next
        };
        Ok((views, next))
    }

    /// Up to `limit` of the project's builds queued before `before` that
    /// belong to no stored run, each a one-stage run; and the cursor past
    /// the builds read.
    async fn singles_before(
        &self,
        project: &ProjectKey,
        before: Option<time::OffsetDateTime>,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<(Vec<RunView>, Option<String>)> {
        let page = self
            .ports
            .builds
            .list(&decap_core::ports::BuildQuery {
                project: Some(project.clone()),
                before,
                limit,
                cursor,
                ..Default::default()
            })
            .await?;
        let views = page
            .builds
            .iter()
            .filter(|b| b.stage.is_none())
            .map(RunView::single)
            .collect();
        let next = page
            .next_cursor
            .map(|c| ListCursor::older(before, Some(&c)));
        Ok((views, next))
    }

    /// A page of builds as runs, newest first: a build of no stored run as
    /// a one-stage run of its own, the stages of a stored run as that run
    /// (once, where its newest attempt on the page stands).
    async fn runs_of_builds(&self, builds: Vec<Build>) -> Result<Vec<RunView>> {
        let mut views = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for b in &builds {
            if b.stage.is_none() {
                views.push(RunView::single(b));
                continue;
            }
            if !seen.insert(b.pipeline_run_id) {
                continue;
            }
            match self.ports.runs.get(b.pipeline_run_id).await? {
                Some(run) => {
                    let (attempts, _) = self.attempts(&run, false).await?;
                    views.push(RunView::of(run, &attempts));
                }
                None => views.push(RunView::single(b)),
            }
        }
        Ok(views)
    }

    /// Per-stage figures over the project's last `last` runs (of `branch`
    /// when given; at most ten times `last` runs are looked through for
    /// it), and the time left of each running run among them, by run.
    pub async fn pipeline_stats(
        &self,
        project: &ProjectKey,
        branch: Option<&str>,
        last: usize,
    ) -> Result<(PipelineStats, Vec<(Uuid, i64)>)> {
        let defined = self.project(project).ok().and_then(|e| e.pipeline);
        // A project with a pipeline counts its runs, not the builds from
        // before it had one.
        let counts = |v: &RunView| defined.is_none() || !v.single;
        let def = defined
            .clone()
            .unwrap_or_else(pipeline::PipelineDef::single);
        let mut views = Vec::new();
        let mut cursor: Option<String> = None;
        let mut scanned = 0usize;
        while views.len() < last && scanned < last.saturating_mul(10) {
            let want = if branch.is_some() {
                100
            } else {
                last - views.len()
            };
            let (page, next) = self
                .pipeline_runs(project, cursor.as_deref(), want.clamp(1, 100))
                .await?;
            scanned += page.len();
            // Builds from before the pipeline come after all its runs.
            let past_runs = defined.is_some() && page.iter().any(|v| v.single);
            views.extend(
                page.into_iter()
                    .filter(|v| counts(v) && branch.is_none_or(|b| v.run.branch == b)),
            );
            match next {
                Some(c) if !past_runs => cursor = Some(c),
                _ => break,
            }
        }
        views.truncate(last);
        let pairs: Vec<(&PipelineRun, &Plan)> = views.iter().map(|v| (&v.run, &v.plan)).collect();
        let stats = pipeline::stats(&def, &pairs);
        let at = now();
        let left = views
            .iter()
            .filter_map(|v| Some((v.run.id, pipeline::time_left(&v.plan, &stats, at)?)))
            .collect();
        Ok((stats, left))
    }

    /// Starts the stages of a run whose needs have succeeded. Level
    /// triggered: whoever calls it (a stage's end, a restart, an operator)
    /// gets the same stages started once.
    pub async fn advance_run(self: &Arc<Self>, id: Uuid) -> Result<Vec<Build>> {
        let Some(run) = self.ports.runs.get(id).await? else {
            return Ok(Vec::new());
        };
        let (builds, mut to_schedule) = self.attempts(&run, true).await?;
        let plan = pipeline::plan(&run, &builds);
        let mut started = Vec::new();
        for s in &plan.start {
            if let Some(b) = self.start_attempt(&run, s, run.trigger, None).await? {
                to_schedule.push(b.id);
                started.push(b);
            }
        }
        if !to_schedule.is_empty() {
            self.schedule_ids(to_schedule).await;
        }
        Ok(started)
    }

    /// Claims and stores one attempt; `None` when another caller's claim
    /// won (that one starts it).
    async fn start_attempt(
        &self,
        run: &PipelineRun,
        start: &StageStart,
        trigger: Trigger,
        rerun_of: Option<BuildId>,
    ) -> Result<Option<Build>> {
        let mut b = run.attempt(start, trigger, now());
        b.rerun_of = rerun_of;
        let Some(claim) = StageClaim::of(&b) else {
            return Ok(None);
        };
        if self.ports.runs.claim(&claim).await?.is_some() {
            return Ok(None);
        }
        self.ports.builds.insert(&b).await?;
        tracing::info!(build_id = %b.id, run = %run.id, stage = %start.stage, attempt = start.attempt, "starting a pipeline stage");
        Ok(Some(b))
    }

    /// Runs a stage again, and after it the stages that need it, reusing
    /// the attempts of the stages before it. Refused while a stage of the
    /// run is under way, when a stage it needs has not succeeded, and when
    /// the artifacts it needs are no longer stored.
    pub async fn rerun_stage(self: &Arc<Self>, id: Uuid, stage: &str) -> Result<Build> {
        self.new_attempt(id, stage, false).await
    }

    /// Promotes a manual stage that waits for it.
    pub async fn approve_stage(self: &Arc<Self>, id: Uuid, stage: &str) -> Result<Build> {
        self.new_attempt(id, stage, true).await
    }

    async fn new_attempt(self: &Arc<Self>, id: Uuid, stage: &str, approve: bool) -> Result<Build> {
        let Some(run) = self.ports.runs.get(id).await? else {
            // A one-stage run of a project without pipeline.json: its
            // rerun is the build's.
            if !approve
                && stage == pipeline::DEFAULT_STAGE
                && let Some(b) = self.ports.builds.get(BuildId(id)).await?
                && b.stage.is_none()
            {
                if !b.status.is_final() {
                    return Err(Error::Conflict(format!(
                        "stage {stage:?} of this run is still {}: rerun once it has ended",
                        b.status
                    )));
                }
                return self.rerun_single(b).await;
            }
            return Err(Error::NotFound(format!("pipeline run {id}")));
        };
        let (builds, _) = self.attempts(&run, false).await?;
        let start = if approve {
            pipeline::approve(&run, &builds, stage)?
        } else {
            pipeline::rerun(&run, &builds, stage)?
        };
        for (need, input) in &start.inputs {
            self.check_input(*input, need).await?;
        }
        let previous = builds
            .iter()
            .filter(|b| b.stage.as_ref().is_some_and(|s| s.name == stage))
            .max_by_key(|b| b.attempt())
            .map(|b| b.id);
        let trigger = if approve {
            Trigger::Manual
        } else {
            Trigger::Rerun
        };
        match self
            .start_attempt(&run, &start, trigger, previous.filter(|_| !approve))
            .await?
        {
            Some(b) => {
                self.schedule_ids(vec![b.id]).await;
                self.build(b.id).await
            }
            None => Err(Error::Conflict(format!(
                "attempt {} of stage {stage:?} has just been started by another request",
                start.attempt
            ))),
        }
    }

    /// Refuses to start a stage whose input (the artifacts of `build`, an
    /// attempt of stage `need`) was stored and is gone.
    async fn check_input(&self, build: BuildId, need: &str) -> Result<()> {
        let blobs = &self.ports.blobs;
        let had = blobs.get(build, BlobKind::ArtifactsIndex).await?.is_some();
        let has = blobs.get(build, BlobKind::ArtifactsTarGz).await?.is_some();
        if had && !has {
            return Err(Error::Conflict(format!(
                "the artifacts of stage {need:?} (build {build}) are no longer stored: rerun from {need:?}"
            )));
        }
        Ok(())
    }

    /// Starts what every recent run has to start (after a restart, or on
    /// taking the lead): a stage that ended just before a stop has its
    /// next stages started now, once.
    pub(super) async fn advance_recent_runs(self: &Arc<Self>) -> Result<()> {
        let since = now() - RECOVER_RUNS;
        let runs = self.ports.runs.since(since).await?;
        let mut started = 0usize;
        for run in runs {
            match self.advance_run(run.id).await {
                Ok(b) => started += b.len(),
                Err(e) => {
                    tracing::warn!(run = %run.id, error = %e, "cannot advance a pipeline run")
                }
            }
        }
        if started > 0 {
            tracing::info!(started, "pipeline stages started after a restart");
        }
        Ok(())
    }
}
