//! The controller: drives the ports through the core's decisions.
//!
//! Every change to what runs (launch, finish, defer, drain) happens under one
//! async mutex, so this process never double-books a cap or a lock key; the
//! lock store still arbitrates between processes. Requests are made durable
//! before they are answered; everything after that (scheduling, launching)
//! can be redone from the stores by [`Controller::recover`] after a crash.
//!
//! What happens to a build is decided by the core
//! ([`decap_core::lifecycle::decide`]); [`lifecycle`] carries out its steps,
//! [`schedule`] admits, defers and launches, and [`recover`] rebuilds the
//! state from the stores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use decap_core::build::{Build, BuildId, Trigger};
use decap_core::catalog::ProjectEntry;
use decap_core::descriptor::DEFAULT_BUILD_TIMEOUT;
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{
    BlobStore, BuildStore, DeferralQueue, EnvironmentExit, Executor, ExecutorEvents, Lock,
    LockStore, ScriptsRepo,
};
use decap_core::refs::GitRef;
use decap_core::schedule::{Caps, RunningSet};
use decap_core::{Error, Result};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{Mutex, broadcast, mpsc};

use crate::livelog::LiveLogs;
use crate::metrics::Metrics;

mod lifecycle;
mod pipeline;
pub use pipeline::{INPUT_STAGES_VAR, RunView, builds_for, stage_entry};
mod preset;
pub use preset::preset_language;
mod recover;
mod schedule;

/// How many commits of the build scripts are kept for pipelines' later
/// stages.
const KEPT_CATALOGS: usize = 16;

/// How many deferred builds one drain considers at most.
const MAX_HEADS: usize = 1000;

/// The adapters the controller drives.
#[derive(Clone)]
pub struct Ports {
    /// Build records and webhook deliveries.
    pub builds: Arc<dyn BuildStore>,
    /// Pipeline runs and their stages' claims.
    pub runs: Arc<dyn decap_core::ports::RunStore>,
    /// Branch locks.
    pub locks: Arc<dyn LockStore>,
    /// The deferral queue.
    pub queue: Arc<dyn DeferralQueue>,
    /// Logs and artifacts.
    pub blobs: Arc<dyn BlobStore>,
    /// What runs builds.
    pub executor: Arc<dyn Executor>,
    /// The build-scripts repo.
    pub scripts: Arc<dyn ScriptsRepo>,
}

/// The controller's settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The server's public URL, for links to builds.
    pub public_url: String,
    /// How builds reach the server (`DECAP_URL` inside builds).
    pub decap_url: String,
    /// Concurrency caps.
    pub caps: Caps,
    /// How long a stopped build gets between TERM and KILL.
    pub kill_grace: Duration,
    /// How long a lock outlives its build's timeout before it lapses.
    pub lock_margin: Duration,
    /// The console log is kept up to this many bytes.
    pub max_log_bytes: u64,
    /// How large uploads may be once decompressed.
    pub upload_caps: crate::uploads::UploadCaps,
    /// Settings for bctool itself (not the script), e.g. its direct path to
    /// AWS; empty when bctool ships everything through the server.
    pub bctool_env: Vec<(String, String)>,
    /// How often the deferral queue is retried besides the moments room frees
    /// (catches locks that lapsed or were freed by another replica), and
    /// running builds' environments are looked at (catches an end whose
    /// exit event was lost).
    pub drain_interval: Duration,
}

/// How a build ends.
pub type Finish = decap_core::build::Outcome;

/// Every this many periodic drains (a minute at the default 5 s), the
/// leader compares the deferral queue with the build records.
const RECONCILE_EVERY: u32 = 12;

struct Sched {
    running: RunningSet,
    open: bool,
    /// How many deferred entries wait per lock key (mirrors the queue, so
    /// admitting a request does not have to list the queue).
    waiting_keys: HashMap<LockKey, usize>,
}

impl Sched {
    fn key_added(&mut self, key: LockKey) {
        *self.waiting_keys.entry(key).or_default() += 1;
    }

    fn key_removed(&mut self, key: &LockKey) {
        if let Some(n) = self.waiting_keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.waiting_keys.remove(key);
            }
        }
    }
}

/// The controller.
pub struct Controller {
    /// The adapters.
    pub ports: Ports,
    /// Settings.
    pub config: ControllerConfig,
    /// Live console logs.
    pub live: LiveLogs,
    /// Metrics.
    pub metrics: Metrics,
    sched: Mutex<Sched>,
    schedule_tx: std::sync::OnceLock<mpsc::UnboundedSender<Build>>,
    /// Pipeline runs one of whose stages ended: their next stages start.
    advance_tx: std::sync::OnceLock<mpsc::UnboundedSender<uuid::Uuid>>,
    /// The build scripts as they were at recent commits, newest last, so
    /// that a pipeline's later stages run the scripts their run was pinned
    /// to (kept in memory: after a restart, the current ones).
    catalogs: std::sync::Mutex<std::collections::VecDeque<Arc<decap_core::catalog::Catalog>>>,
    status_tx: broadcast::Sender<Build>,
    pending_tokens: std::sync::Mutex<HashMap<BuildId, String>>,
    /// Set when several replicas elect a leader: only the leader launches.
    leadership: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// Whether this replica launches builds (always, without an election).
    leading: std::sync::atomic::AtomicBool,
    /// Builds' secrets, when a store is set.
    secrets: std::sync::OnceLock<Arc<dyn decap_core::ports::SecretStore>>,
    /// Projects' own repositories and the presets' images, for preset builds.
    presets: std::sync::OnceLock<Arc<preset::Presets>>,
    /// Turns true when the server stops: live streams end, nothing more
    /// is launched.
    stopping: tokio::sync::watch::Sender<bool>,
}

/// Delivers executor events to the controller through a channel, so the
/// executor can be built before the controller exists.
pub struct ExecutorEventsChannel(mpsc::UnboundedSender<EnvironmentExit>);

impl ExecutorEventsChannel {
    /// A channel; give the receiver to [`Controller::start`].
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<EnvironmentExit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(ExecutorEventsChannel(tx)), rx)
    }
}

impl ExecutorEvents for ExecutorEventsChannel {
    fn environment_exited(&self, exit: EnvironmentExit) {
        let _ = self.0.send(exit);
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A new secret for a build's bctool: 32 random bytes (two v4 UUIDs, 244
/// random bits), base64url: 43 characters, short enough that `base64` of
/// it fits one line, which the console masking recognises.
fn new_build_token() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a token, hex; only the hash is stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Controller {
    /// A controller over `ports`. Call [`Controller::start`] before serving.
    pub fn new(ports: Ports, config: ControllerConfig, live: LiveLogs) -> Arc<Self> {
        let (status_tx, _) = broadcast::channel(1024);
        Arc::new(Controller {
            ports,
            config,
            live,
            metrics: Metrics::default(),
            sched: Mutex::new(Sched {
                running: RunningSet::default(),
                open: true,
                waiting_keys: HashMap::new(),
            }),
            schedule_tx: std::sync::OnceLock::new(),
            advance_tx: std::sync::OnceLock::new(),
            catalogs: std::sync::Mutex::new(std::collections::VecDeque::new()),
            status_tx,
            pending_tokens: std::sync::Mutex::new(HashMap::new()),
            leadership: std::sync::OnceLock::new(),
            leading: std::sync::atomic::AtomicBool::new(true),
            secrets: std::sync::OnceLock::new(),
            presets: std::sync::OnceLock::new(),
            stopping: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Makes this replica one of several: it launches builds only while
    /// `leading` says it holds the lease. Call before [`Controller::start`].
    /// A follower accepts webhooks and serves the API; the builds it accepts
    /// stay queued in the store until the leader picks them up.
    pub fn set_leadership(&self, leading: tokio::sync::watch::Receiver<bool>) {
        self.leading
            .store(*leading.borrow(), std::sync::atomic::Ordering::SeqCst);
        let _ = self.leadership.set(leading);
    }

    /// Runs preset projects (a `language` and no `build.sh`) from their
    /// repositories, mirrored in `sources`, with `images` in place of the
    /// presets' own and `service_images` in place of the services'.
    pub fn set_presets(
        &self,
        sources: Arc<decap_scripts::source::Sources>,
        images: std::collections::BTreeMap<decap_core::preset::Language, String>,
        service_images: std::collections::BTreeMap<String, String>,
    ) {
        let _ = self.presets.set(Arc::new(preset::Presets {
            sources,
            images,
            service_images,
            prepared: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }));
    }

    /// Gives builds their project's (and team's) secrets from `store`.
    pub fn set_secrets(&self, store: Arc<dyn decap_core::ports::SecretStore>) {
        let _ = self.secrets.set(store);
    }

    /// The secrets a build gets, as variables: its project's and team's,
    /// or, for a pull request from a fork, their names with empty values.
    pub(super) async fn secrets_for(&self, b: &Build) -> Result<Vec<(String, String)>> {
        let Some(store) = self.secrets.get() else {
            return Ok(Vec::new());
        };
        let secrets = store.for_build(&b.project).await?;
        Ok(secrets
            .into_iter()
            .map(|(name, value)| {
                let value = if b.from_fork {
                    String::new()
                } else {
                    value.expose().to_owned()
                };
                (name, value)
            })
            .collect())
    }

    /// Whether this replica launches builds now.
    pub fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Recovers from whatever the last run left, then starts the background
    /// tasks: executor events and the periodic queue drain.
    pub async fn start(
        self: &Arc<Self>,
        mut exits: mpsc::UnboundedReceiver<EnvironmentExit>,
    ) -> Result<()> {
        // A stage that ends starts the next ones, in the background.
        let (tx, mut rx) = mpsc::unbounded_channel::<uuid::Uuid>();
        let _ = self.advance_tx.set(tx);
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(run) = rx.recv().await {
                let Some(this) = this.upgrade() else { break };
                if !this.is_leading() {
                    continue;
                }
                if let Err(e) = this.advance_run(run).await {
                    tracing::warn!(run = %run, error = %e, "cannot start a pipeline run's next stages; trying again at the next start");
                }
            }
        });
        if self.is_leading() {
            self.recover().await?;
            // In the background: the server answers meanwhile.
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.advance_recent_runs().await {
                    tracing::error!(error = %e, "cannot look at recent pipeline runs");
                }
            });
        }
        if let Some(leadership) = self.leadership.get() {
            let mut changes = leadership.clone();
            let this = Arc::downgrade(self);
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let leading = *changes.borrow_and_update();
                    let Some(this) = this.upgrade() else { break };
                    let was = this
                        .leading
                        .swap(leading, std::sync::atomic::Ordering::SeqCst);
                    if leading && !was {
                        tracing::info!(
                            "leading: adopting running builds and scheduling the waiting ones"
                        );
                        if let Err(e) = this.recover().await {
                            tracing::error!(error = %e, "recovery after taking the lead failed");
                        }
                        if let Err(e) = this.advance_recent_runs().await {
                            tracing::error!(error = %e, "cannot look at recent pipeline runs");
                        }
                    } else if !leading && was {
                        tracing::warn!("no longer leading: launching stops here");
                    }
                }
            });
        }
        // One scheduler takes the ids webhooks accepted, many at a time.
        let (tx, mut rx) = mpsc::unbounded_channel::<Build>();
        let _ = self.schedule_tx.set(tx);
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut builds = vec![first];
                while builds.len() < 1024 {
                    match rx.try_recv() {
                        Ok(b) => builds.push(b),
                        Err(_) => break,
                    }
                }
                let failed = this.schedule_batch(builds).await;
                if !failed.is_empty() {
                    this.schedule_ids(failed).await;
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(exit) = exits.recv().await {
                this.environment_exited(exit).await;
            }
        });
        let this = Arc::downgrade(self);
        let every = self.config.drain_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut missing = std::collections::HashSet::new();
            let mut ticks = 0u32;
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { break };
                if !this.is_leading() {
                    missing.clear();
                    continue;
                }
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(RECONCILE_EVERY) {
                    let mut s = this.sched.lock().await;
                    if let Err(e) = this
                        .reconcile_queue_locked(&mut s, Some(every * RECONCILE_EVERY))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot compare the queue with the build records");
                    }
                }
                if let Err(e) = this.reconcile_running(&mut missing).await {
                    tracing::warn!(error = %e, "cannot look at running builds' environments");
                }
                if this.leadership.get().is_some() {
                    this.adopt_queued(every * 2).await;
                }
                if let Err(e) = this.drain().await {
                    tracing::warn!(error = %e, "periodic drain failed");
                }
            }
        });
        Ok(())
    }

    /// The server stops (or hands over to a new process): nothing is
    /// launched from now on (what arrives waits on the deferral queue for
    /// the next process), and every live stream (event streams and log
    /// follows) ends with a hint to reconnect.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Turns true when live streams must end.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Status changes of every build, for live views.
    pub fn subscribe(&self) -> broadcast::Receiver<Build> {
        self.status_tx.subscribe()
    }

    pub(super) fn publish(&self, build: &Build) {
        let _ = self.status_tx.send(build.clone());
    }

    /// The longest a build of the project may run: its timeout, or the
    /// longest of its stages'.
    pub(super) fn timeout_of(&self, project: &ProjectKey) -> Duration {
        let catalog = self.ports.scripts.catalog();
        let Some(p) = catalog.project(project) else {
            return DEFAULT_BUILD_TIMEOUT;
        };
        let timeout = p
            .valid_descriptor()
            .map(|d| d.timeout())
            .unwrap_or(DEFAULT_BUILD_TIMEOUT);
        p.pipeline
            .iter()
            .flat_map(|d| d.stages.iter().filter_map(|s| s.timeout))
            .map(Duration::from_secs)
            .fold(timeout, Duration::max)
    }

    /// Keeps `catalog` among the recent ones (at most
    /// [`KEPT_CATALOGS`] commits).
    pub fn remember_catalog(&self, catalog: &Arc<decap_core::catalog::Catalog>) {
        let Ok(mut kept) = self.catalogs.lock() else {
            return;
        };
        if kept.back().is_some_and(|c| c.commit == catalog.commit) {
            return;
        }
        kept.retain(|c| c.commit != catalog.commit);
        kept.push_back(catalog.clone());
        while kept.len() > KEPT_CATALOGS {
            kept.pop_front();
        }
    }

    /// The build scripts at `commit`, if this process still has them.
    pub(super) fn catalog_at(&self, commit: &str) -> Option<Arc<decap_core::catalog::Catalog>> {
        let current = self.ports.scripts.catalog();
        if current.commit == commit {
            return Some(current);
        }
        self.catalogs
            .lock()
            .ok()?
            .iter()
            .rev()
            .find(|c| c.commit == commit)
            .cloned()
    }

    /// A pipeline stage ended: its run's next stages start.
    pub(super) fn stage_ended(&self, b: &Build) {
        if b.stage.is_some()
            && let Some(tx) = self.advance_tx.get()
        {
            let _ = tx.send(b.pipeline_run_id);
        }
    }

    pub(super) fn lock_ttl(&self, project: &ProjectKey) -> Duration {
        self.timeout_of(project) + self.config.kill_grace + self.config.lock_margin
    }

    /// A build by id, or `NotFound`.
    pub async fn build(&self, id: BuildId) -> Result<Build> {
        self.ports
            .builds
            .get(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("build {id}")))
    }

    /// The project's catalog entry, or `NotFound`.
    pub fn project(&self, key: &ProjectKey) -> Result<ProjectEntry> {
        self.ports
            .scripts
            .catalog()
            .project(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("project {key}")))
    }

    /// Manual or API builds of some refs of a project: all are validated, then
    /// all stored durably, then scheduled. Returns them as they stand after
    /// scheduling.
    pub async fn request_builds(
        self: &Arc<Self>,
        project: &ProjectKey,
        refs: &[String],
        trigger: Trigger,
    ) -> Result<Vec<Build>> {
        Ok(self.request_runs(project, refs, trigger).await?.1)
    }

    /// [`Controller::request_builds`], answering also the pipeline run of
    /// each ref, in order.
    pub async fn request_runs(
        self: &Arc<Self>,
        project: &ProjectKey,
        refs: &[String],
        trigger: Trigger,
    ) -> Result<(Vec<uuid::Uuid>, Vec<Build>)> {
        let entry = self.project(project)?;
        if let Some(err) = &entry.error {
            return Err(Error::invalid(
                "project",
                format!("{project} cannot build: {err}"),
            ));
        }
        if refs.is_empty() {
            return Err(Error::invalid(
                "branch",
                "name at least one branch to build",
            ));
        }
        let parsed: Vec<GitRef> = refs
            .iter()
            .map(|r| GitRef::parse(r))
            .collect::<Result<_>>()?;
        let at = now();
        let catalog = self.ports.scripts.catalog();
        self.remember_catalog(&catalog);
        let scripts_commit = catalog.commit.clone();
        let mut runs = Vec::new();
        let mut run_ids = Vec::new();
        let mut builds = Vec::new();
        for r in &parsed {
            let mut template = Build::new(project.clone(), r, None, trigger, at);
            if entry.pipeline.is_some() {
                // A run is pinned to the commit its branch points at now.
                template.commit = self.head_commit(&entry, &template).await;
            }
            run_ids.push(template.pipeline_run_id);
            let (run, made) = builds_for(&entry, template, &scripts_commit);
            if let Some(run) = run {
                if let Some(last) = run_ids.last_mut() {
                    *last = run.id;
                }
                runs.push(run);
            }
            builds.extend(made);
        }
        for b in &builds {
            self.ports.builds.insert(b).await?;
        }
        self.record_runs(&runs, &builds).await?;
        self.schedule_ids(builds.iter().map(|b| b.id).collect())
            .await;
        let mut out = Vec::with_capacity(builds.len());
        for b in builds {
            out.push(self.build(b.id).await?);
        }
        Ok((run_ids, out))
    }

    /// The commit a branch of the project's repository (its `repoUrl`)
    /// points at now, when the repository answers within 10 s; `None`
    /// (the build runs whatever the branch holds when it starts) without
    /// a repository or an answer.
    async fn head_commit(&self, entry: &ProjectEntry, b: &Build) -> Option<String> {
        let url = entry
            .valid_descriptor()?
            .descriptor
            .repo_url
            .clone()
            .filter(|u| !u.trim().is_empty())?;
        let sources = self.sources()?;
        let token = self.repo_token(b).await;
        match sources
            .head(&url, &b.git_ref, token.as_deref(), Duration::from_secs(10))
            .await
        {
            Ok(commit) => Some(commit),
            Err(e) => {
                tracing::warn!(project = %b.project, git_ref = %b.git_ref, error = %e, "cannot ask the repository where the branch points; the run records no commit");
                None
            }
        }
    }

    /// A new build of the same ref and commit as `id`.
    /// A stage of a pipeline is run again with the stages after it
    /// ([`Controller::rerun_stage`]).
    pub async fn rerun(self: &Arc<Self>, id: BuildId) -> Result<Build> {
        let old = self.build(id).await?;
        if let Some(stage) = &old.stage {
            return self.rerun_stage(old.pipeline_run_id, &stage.name).await;
        }
        self.rerun_single(old).await
    }

    /// A new build of the same ref and commit as `old`, a build of a
    /// project without `pipeline.json`.
    pub(super) async fn rerun_single(self: &Arc<Self>, old: Build) -> Result<Build> {
        self.project(&old.project)?;
        let git_ref = GitRef::parse(&old.git_ref)?;
        let mut b = Build::new(
            old.project.clone(),
            &git_ref,
            old.commit.clone(),
            Trigger::Rerun,
            now(),
        );
        b.rerun_of = Some(old.id);
        // Code from a fork stays someone else's code when run again.
        b.from_fork = old.from_fork;
        self.ports.builds.insert(&b).await?;
        self.schedule_ids(vec![b.id]).await;
        self.build(b.id).await
    }

    /// The hash of a build's token: from its record, from memory while its
    /// launch is being recorded, or from the record again (the launch was
    /// recorded after `build` was read).
    pub async fn build_token_hash(&self, build: &Build) -> Option<String> {
        if let Some(h) = &build.token_sha256 {
            return Some(h.clone());
        }
        let pending = self
            .pending_tokens
            .lock()
            .ok()
            .and_then(|p| p.get(&build.id).cloned());
        if pending.is_some() {
            return pending;
        }
        self.ports
            .builds
            .get(build.id)
            .await
            .ok()
            .flatten()
            .and_then(|b| b.token_sha256)
    }

    /// Operators: releases a lock whoever holds it. A build still running on
    /// this controller keeps its key here until it ends, so this frees locks
    /// whose holder is gone (another replica, a lost environment).
    pub async fn force_unlock(&self, key: &LockKey) -> Result<Option<Lock>> {
        let mut s = self.sched.lock().await;
        let released = self.ports.locks.force_release(key).await?;
        self.drain_locked(&mut s).await?;
        Ok(released)
    }

    /// Whether new builds run (open) or wait (closed).
    pub async fn queue_open(&self) -> bool {
        self.sched.lock().await.open
    }

    /// Opens or closes the queue; opening resubmits what waits.
    pub async fn set_queue_open(&self, open: bool) -> Result<()> {
        let mut s = self.sched.lock().await;
        self.ports.queue.set_open(open).await?;
        s.open = open;
        tracing::info!(open, "queue state changed");
        self.drain_locked(&mut s).await
    }

    /// Deferred builds waiting (kept in memory beside the queue).
    pub async fn waiting_count(&self) -> usize {
        self.sched.lock().await.waiting_keys.values().sum()
    }
}
