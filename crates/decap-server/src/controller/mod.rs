//! The controller: drives the ports through the core's decisions.
//!
//! Every change to what runs (launch, finish, defer, drain) happens under one
//! async mutex, so this process never double-books a cap or a lock key; the
//! lock store still arbitrates between processes. Requests are made durable
//! before they are answered; everything after that (scheduling, launching)
//! can be redone from the stores by [`Controller::recover`] after a crash.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::catalog::ProjectEntry;
use decap_core::descriptor::DEFAULT_BUILD_TIMEOUT;
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{
    BlobKind, BlobStore, BuildStore, DeferralQueue, DeferredEntry, EnvironmentExit, Executor,
    ExecutorEvents, LaunchSpec, Lock, LockStore, PushOutcome, Received, ScriptsRepo,
};
use decap_core::refs::GitRef;
use decap_core::schedule::{
    Caps, Decision, DeferReason, RunningSet, Waiting, admit, next_candidate,
};
use decap_core::{Error, Result};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{Mutex, broadcast, mpsc};

use crate::livelog::{LiveLogs, gzip_file};
use crate::metrics::{Metrics, StatusLabel};

/// How many deferred builds one drain considers at most.
const MAX_HEADS: usize = 1000;

/// The adapters the controller drives.
#[derive(Clone)]
pub struct Ports {
    /// Build records and webhook deliveries.
    pub builds: Arc<dyn BuildStore>,
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
    /// (catches locks that lapsed or were freed by another replica).
    pub drain_interval: Duration,
}

/// How a build ends.
pub type Finish = decap_core::build::Outcome;

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
    status_tx: broadcast::Sender<Build>,
    pending_tokens: std::sync::Mutex<HashMap<BuildId, String>>,
    /// Set when several replicas elect a leader: only the leader launches.
    leadership: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// Whether this replica launches builds (always, without an election).
    leading: std::sync::atomic::AtomicBool,
    /// Builds' secrets, when a store is set.
    secrets: std::sync::OnceLock<Arc<dyn decap_core::ports::SecretStore>>,
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
            status_tx,
            pending_tokens: std::sync::Mutex::new(HashMap::new()),
            leadership: std::sync::OnceLock::new(),
            leading: std::sync::atomic::AtomicBool::new(true),
            secrets: std::sync::OnceLock::new(),
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

    /// Gives builds their project's (and team's) secrets from `store`.
    pub fn set_secrets(&self, store: Arc<dyn decap_core::ports::SecretStore>) {
        let _ = self.secrets.set(store);
    }

    /// The secrets a build gets, as variables: its project's and team's,
    /// or, for a pull request from a fork, their names with empty values.
    async fn secrets_for(&self, b: &Build) -> Result<Vec<(String, String)>> {
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
        if self.is_leading() {
            self.recover().await?;
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
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { break };
                if !this.is_leading() {
                    continue;
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

    /// Status changes of every build, for live views.
    pub fn subscribe(&self) -> broadcast::Receiver<Build> {
        self.status_tx.subscribe()
    }

    fn publish(&self, build: &Build) {
        let _ = self.status_tx.send(build.clone());
    }

    fn timeout_of(&self, project: &ProjectKey) -> Duration {
        self.ports
            .scripts
            .catalog()
            .project(project)
            .and_then(|p| p.valid_descriptor().map(|d| d.timeout()))
            .unwrap_or(DEFAULT_BUILD_TIMEOUT)
    }

    fn lock_ttl(&self, project: &ProjectKey) -> Duration {
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
        let builds: Vec<Build> = parsed
            .iter()
            .map(|r| Build::new(project.clone(), r, None, trigger, at))
            .collect();
        for b in &builds {
            self.ports.builds.insert(b).await?;
        }
        self.schedule_ids(builds.iter().map(|b| b.id).collect())
            .await;
        let mut out = Vec::with_capacity(builds.len());
        for b in builds {
            out.push(self.build(b.id).await?);
        }
        Ok(out)
    }

    /// A new build of the same ref and commit as `id`.
    pub async fn rerun(self: &Arc<Self>, id: BuildId) -> Result<Build> {
        let old = self.build(id).await?;
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

    /// Schedules builds that other replicas accepted (they stay queued in the
    /// store): those queued longer than `age` ago.
    async fn adopt_queued(self: &Arc<Self>, age: Duration) {
        let builds = match self.ports.builds.with_status(&[BuildStatus::Queued]).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list queued builds");
                return;
            }
        };
        let cutoff = now() - age;
        let ids: Vec<BuildId> = builds
            .into_iter()
            .filter(|b| b.queued_at < cutoff)
            .map(|b| b.id)
            .collect();
        if !ids.is_empty() {
            tracing::info!(
                count = ids.len(),
                "scheduling builds accepted by another replica"
            );
            self.schedule_ids(ids).await;
        }
    }

    /// Schedules accepted builds in the background (webhooks call this after
    /// answering). A follower leaves them queued for the leader.
    pub fn schedule_soon(self: &Arc<Self>, builds: Vec<Build>) {
        if !self.is_leading() {
            return;
        }
        match self.schedule_tx.get() {
            Some(tx) => {
                for b in builds {
                    let _ = tx.send(b);
                }
            }
            None => {
                let this = self.clone();
                tokio::spawn(async move {
                    let failed = this.schedule_batch(builds).await;
                    if !failed.is_empty() {
                        this.schedule_ids(failed).await;
                    }
                });
            }
        }
    }

    /// Schedules builds that are stored `queued`. A build whose scheduling fails (a store is down) is tried
    /// again a few seconds later, until it is scheduled.
    pub async fn schedule_ids(self: &Arc<Self>, ids: Vec<BuildId>) {
        let failed = self.schedule_once(ids).await;
        if !failed.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                let mut failed = failed;
                while !failed.is_empty() {
                    tokio::time::sleep(this.config.drain_interval).await;
                    failed = this.schedule_once(failed).await;
                }
            });
        }
    }

    /// Schedules what it can; returns the ids whose scheduling failed.
    ///
    /// Decisions are taken one build at a time in memory; the deferrals they
    /// lead to are then written concurrently, so that a burst of webhooks is
    /// deferred in a few group commits rather than one commit per build.
    async fn schedule_once(&self, ids: Vec<BuildId>) -> Vec<BuildId> {
        let reads =
            futures::future::join_all(ids.iter().map(|id| self.ports.builds.get(*id))).await;
        let mut failed = Vec::new();
        let mut builds = Vec::new();
        for (id, read) in ids.into_iter().zip(reads) {
            match read {
                Ok(Some(b)) => builds.push(b),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(build_id = %id, error = %e, "scheduling failed; trying again shortly");
                    failed.push(id);
                }
            }
        }
        failed.extend(self.schedule_batch(builds).await);
        failed
    }

    /// Schedules builds as read from the store (or just stored); a copy that
    /// is stale does no harm, since every write is a compare-and-set on the
    /// status. Returns the ids whose scheduling failed.
    async fn schedule_batch(&self, builds: Vec<Build>) -> Vec<BuildId> {
        let mut failed = Vec::new();
        let mut s = self.sched.lock().await;
        let mut deferrals = Vec::new();
        for b in builds {
            let id = b.id;
            if b.status != BuildStatus::Queued || s.running.contains(id) {
                continue;
            }
            let key = b.lock_key();
            let key_waiting = s.waiting_keys.contains_key(&key);
            let reason = match self.admit(&s, &b.project, &key, key_waiting) {
                Decision::Defer(reason) => reason,
                Decision::TryLaunch => {
                    let ttl = self.lock_ttl(&b.project);
                    let launched = match self.ports.locks.acquire(&key, b.id, ttl, now()).await {
                        Ok(Ok(lock)) => self
                            .launch_locked(&mut s, b, lock, BuildStatus::Queued)
                            .await
                            .map(|()| None),
                        Ok(Err(held)) => Ok(Some((b, DeferReason::LockHeld(Some(held.owner))))),
                        Err(e) => Err(e),
                    };
                    match launched {
                        Ok(None) => continue,
                        Ok(Some((build, reason))) => {
                            s.key_added(key.clone());
                            deferrals.push((build, reason));
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(build_id = %id, error = %e, "scheduling failed; trying again shortly");
                            failed.push(id);
                            continue;
                        }
                    }
                }
            };
            // Counted as waiting at once, so later builds of the batch queue behind it.
            s.key_added(key);
            deferrals.push((b, reason));
        }
        let keys: Vec<(BuildId, LockKey)> = deferrals
            .iter()
            .map(|(b, _)| (b.id, b.lock_key()))
            .collect();
        let results = futures::future::join_all(
            deferrals
                .into_iter()
                .map(|(b, reason)| self.record_deferral(b, reason)),
        )
        .await;
        for ((id, key), result) in keys.into_iter().zip(results) {
            match result {
                Ok(true) => {}
                Ok(false) => s.key_removed(&key),
                Err(e) => {
                    s.key_removed(&key);
                    tracing::error!(build_id = %id, error = %e, "deferring failed; trying again shortly");
                    failed.push(id);
                }
            }
        }
        failed
    }

    /// Whether a build may try to launch now: the executor must be able to
    /// launch, then the caps, the queue and the lock decide.
    fn admit(&self, s: &Sched, project: &ProjectKey, key: &LockKey, key_waiting: bool) -> Decision {
        if let Some(why) = self.ports.executor.unavailable() {
            return Decision::Defer(DeferReason::ExecutorUnavailable(why));
        }
        admit(
            &s.running,
            self.config.caps,
            s.open,
            project,
            key,
            key_waiting,
        )
    }

    async fn schedule_locked(&self, s: &mut Sched, b: Build) -> Result<()> {
        let key = b.lock_key();
        let key_waiting = s.waiting_keys.contains_key(&key);
        match self.admit(s, &b.project, &key, key_waiting) {
            Decision::Defer(reason) => self.defer_locked(s, b, reason).await,
            Decision::TryLaunch => {
                let ttl = self.lock_ttl(&b.project);
                match self.ports.locks.acquire(&key, b.id, ttl, now()).await? {
                    Ok(lock) => self.launch_locked(s, b, lock, BuildStatus::Queued).await,
                    Err(held) => {
                        self.defer_locked(s, b, DeferReason::LockHeld(Some(held.owner)))
                            .await
                    }
                }
            }
        }
    }

    async fn defer_locked(&self, s: &mut Sched, b: Build, reason: DeferReason) -> Result<()> {
        let key = b.lock_key();
        s.key_added(key.clone());
        match self.record_deferral(b, reason).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                s.key_removed(&key);
                Ok(())
            }
            Err(e) => {
                s.key_removed(&key);
                Err(e)
            }
        }
    }

    /// Puts a queued build on the deferral queue and records it deferred.
    /// Returns whether it waits now (false: the same commit already waited,
    /// so it ended cancelled, or it changed meanwhile). The caller has
    /// counted its key as waiting and uncounts it on false or an error.
    async fn record_deferral(&self, mut b: Build, reason: DeferReason) -> Result<bool> {
        let at = now();
        let entry = DeferredEntry {
            build_id: b.id,
            project: b.project.clone(),
            branch: b.branch.clone(),
            git_ref: b.git_ref.clone(),
            commit: b.commit.clone(),
            deferred_at: at,
            reason: reason.to_string(),
        };
        // The queue entry and the record are written together (one group
        // commit); in the rare case the commit already waited, the record
        // is corrected after.
        let queued = b.clone();
        b.transition(BuildStatus::Deferred, at)?;
        b.message = Some(entry.reason.clone());
        let (pushed, updated) = tokio::join!(
            self.ports.queue.push(&entry),
            self.ports.builds.update(&b, BuildStatus::Queued)
        );
        match (pushed?, updated?) {
            (PushOutcome::Added, true) => {
                tracing::debug!(build_id = %b.id, reason = %entry.reason, "build deferred");
                self.publish(&b);
                Ok(true)
            }
            (PushOutcome::Added, false) => {
                // The build changed meanwhile (cancelled): it does not wait.
                self.ports.queue.remove(b.id).await?;
                Ok(false)
            }
            (PushOutcome::AlreadyWaiting(other), updated) => {
                let mut dup = queued;
                dup.transition(BuildStatus::Cancelled, at)?;
                dup.message = Some(format!(
                    "not queued: the same branch and commit already waits as build {other}"
                ));
                let from = if updated {
                    BuildStatus::Deferred
                } else {
                    BuildStatus::Queued
                };
                if self.ports.builds.update(&dup, from).await? {
                    self.publish(&dup);
                }
                Ok(false)
            }
        }
    }

    async fn launch_locked(
        &self,
        s: &mut Sched,
        mut b: Build,
        lock: Lock,
        expected: BuildStatus,
    ) -> Result<()> {
        let at = now();
        let catalog = self.ports.scripts.catalog();
        let entry = catalog.project(&b.project).cloned();
        let problem = match &entry {
            None => Some(format!(
                "project {} is no longer in the build scripts",
                b.project
            )),
            Some(e) => e
                .error
                .as_ref()
                .map(|err| format!("project {} cannot build: {err}", b.project)),
        };
        let (Some(entry), None) = (entry, problem.clone()) else {
            self.ports.locks.release(&lock.key, b.id).await?;
            let message = problem.unwrap_or_default();
            b.transition(BuildStatus::Errored, at)?;
            b.message = Some(message);
            if self.ports.builds.update(&b, expected).await? {
                self.count_finished(&b);
                self.publish(&b);
            }
            return Ok(());
        };
        let timeout = entry
            .valid_descriptor()
            .map(|d| d.timeout())
            .unwrap_or(DEFAULT_BUILD_TIMEOUT);
        let secrets = match self.secrets_for(&b).await {
            Ok(s) => s,
            Err(e) => {
                // Without its secrets the build would run wrong: it waits
                // for the store instead (the lock goes back, the queue
                // keeps it).
                self.ports.locks.release(&lock.key, b.id).await?;
                return Err(e);
            }
        };
        let mut bctool_env = self.config.bctool_env.clone();
        if b.from_fork && !secrets.is_empty() {
            let names: Vec<&str> = secrets.iter().map(|(k, _)| k.as_str()).collect();
            bctool_env.push(("DECAP_SECRETS_WITHHELD".into(), names.join(",")));
        }
        let token = new_build_token();
        if b.status == BuildStatus::Deferred {
            b.transition(BuildStatus::Queued, at)?;
        }
        b.transition(BuildStatus::Running, at)?;
        b.scripts_commit = Some(catalog.commit.clone());
        b.executor = Some(self.ports.executor.name().to_owned());
        b.sandbox = Some(self.ports.executor.sandbox().to_owned());
        b.fencing_token = Some(lock.fencing_token);
        b.token_sha256 = Some(token_hash(&token));
        b.message = None;
        // The record moves to running while the environment starts. Both
        // happen under the scheduling mutex, so nothing in this process can
        // cancel the build in between; the token is known in memory
        // meanwhile, so bctool's first calls are accepted even if they beat
        // the commit.
        s.running.start(b.id, b.project.clone(), lock.key.clone());
        self.metrics.running.set(s.running.len() as i64);
        if let Err(e) = self.live.open(b.id) {
            tracing::warn!(build_id = %b.id, error = %e, "cannot open the live log spool");
        }
        let waited = (at - b.queued_at).as_seconds_f64().max(0.0);
        self.metrics.launch_seconds.observe(waited);
        if let Ok(mut pending) = self.pending_tokens.lock() {
            pending.insert(b.id, token_hash(&token));
        }
        let spec = LaunchSpec {
            build: b.clone(),
            project: entry,
            build_token: token,
            decap_url: self.config.decap_url.clone(),
            timeout,
            max_log_bytes: self.config.max_log_bytes,
            bctool_env,
            secrets,
        };
        tracing::info!(build_id = %b.id, project = %b.project, branch = %b.branch, "launching build");
        let (updated, launched) = tokio::join!(
            self.ports.builds.update(&b, expected),
            self.ports.executor.launch(spec)
        );
        if let Ok(mut pending) = self.pending_tokens.lock() {
            pending.remove(&b.id);
        }
        if !matches!(updated, Ok(true)) {
            // The record did not move (it was changed elsewhere, or the store
            // failed): take the launch back, unless another launch of this
            // build won the record. An environment is named by its build, so
            // the executor adopted that launch's environment rather than
            // making one, and cancelling would stop the build that won.
            let won_elsewhere = matches!(
                self.ports.builds.get(b.id).await,
                Ok(Some(current)) if current.status == BuildStatus::Running
            );
            if launched.is_ok() && !won_elsewhere {
                let executor = self.ports.executor.clone();
                let id = b.id;
                tokio::spawn(async move {
                    let _ = executor.cancel(id).await;
                });
            }
            s.running.finish(b.id);
            self.metrics.running.set(s.running.len() as i64);
            self.live.remove(b.id);
            self.ports.locks.release(&lock.key, b.id).await?;
            return updated.map(|_| ());
        }
        self.publish(&b);
        if let Err(e) = launched {
            tracing::error!(build_id = %b.id, error = %e, "launch failed");
            self.finish_locked(
                s,
                b.id,
                Finish {
                    status: BuildStatus::Errored,
                    exit_code: None,
                    message: Some(format!("the executor could not start the build: {e}")),
                },
            )
            .await?;
        }
        Ok(())
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

    /// Finishes a build (idempotent: a final build stays as it is and `None`
    /// is returned), releases its lock and resubmits deferred builds at once.
    pub async fn finish(&self, id: BuildId, f: Finish) -> Result<Option<Build>> {
        let mut s = self.sched.lock().await;
        let done = self.finish_locked(&mut s, id, f).await?;
        if done.is_some() {
            self.drain_locked(&mut s).await?;
        }
        Ok(done)
    }

    async fn finish_locked(&self, s: &mut Sched, id: BuildId, f: Finish) -> Result<Option<Build>> {
        let mut b = self.build(id).await?;
        if b.status.is_final() {
            return Ok(None);
        }
        let prev = b.status;
        b.transition(f.status, now())?;
        if f.exit_code.is_some() {
            b.exit_code = f.exit_code;
        }
        b.message = f.message.or(if prev == BuildStatus::Deferred {
            None
        } else {
            b.message.take()
        });
        if prev == BuildStatus::Running {
            // The record and the lock are written together (one group
            // commit). If the record was finished by someone else first, they
            // released the lock too.
            let key = b.lock_key();
            let (updated, released) = tokio::join!(
                self.ports.builds.update(&b, prev),
                self.ports.locks.release(&key, id)
            );
            released?;
            if !updated? {
                return Ok(None);
            }
        } else if !self.ports.builds.update(&b, prev).await? {
            return Ok(None); // someone else finished it first
        }
        match prev {
            BuildStatus::Running => {
                s.running.finish(id);
                self.metrics.running.set(s.running.len() as i64);
                self.keep_log(id).await;
            }
            BuildStatus::Deferred if self.ports.queue.remove(id).await? => {
                s.key_removed(&b.lock_key());
            }
            _ => {}
        }
        tracing::info!(build_id = %id, status = %b.status, exit_code = ?b.exit_code, "build finished");
        self.count_finished(&b);
        self.publish(&b);
        Ok(Some(b))
    }

    fn count_finished(&self, b: &Build) {
        self.metrics
            .builds_finished
            .get_or_create(&StatusLabel {
                status: b.status.as_str().to_owned(),
            })
            .inc();
        if let Some(ms) = b.duration_ms() {
            self.metrics.build_seconds.observe(ms as f64 / 1000.0);
        }
    }

    /// Stores the spool as the build's log when bctool did not upload one
    /// (the environment died), then drops the spool.
    async fn keep_log(&self, id: BuildId) {
        let spool = self
            .live
            .get(id)
            .map(|l| l.path().to_owned())
            .or_else(|| self.live.leftover(id));
        if let Some(path) = spool {
            let stored = matches!(self.ports.blobs.get(id, BlobKind::LogGz).await, Ok(Some(_)));
            if !stored {
                match tokio::task::spawn_blocking(move || gzip_file(&path)).await {
                    Ok(Ok(gz)) => {
                        let stream: decap_core::ports::ByteStream = Box::pin(
                            futures::stream::once(async move { Ok(bytes::Bytes::from(gz)) }),
                        );
                        if let Err(e) = self.ports.blobs.put(id, BlobKind::LogGz, stream).await {
                            tracing::warn!(build_id = %id, error = %e, "cannot store the console log");
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(build_id = %id, error = %e, "cannot read the spool")
                    }
                    Err(e) => tracing::warn!(build_id = %id, error = %e, "spool task failed"),
                }
            }
        }
        self.live.remove(id);
    }

    /// Resubmits deferred builds while there is room.
    pub async fn drain(&self) -> Result<()> {
        let mut s = self.sched.lock().await;
        self.drain_locked(&mut s).await
    }

    async fn drain_locked(&self, s: &mut Sched) -> Result<()> {
        if !self.is_leading()
            || !s.open
            || s.waiting_keys.is_empty()
            || self.ports.executor.unavailable().is_some()
        {
            return Ok(());
        }
        // The oldest entry of each waiting key, held for this decision; what
        // is not launched is released at the end, so a crash in between
        // loses nothing.
        let mut heads = self.ports.queue.receive_heads(MAX_HEADS).await?;
        let result = self.launch_heads(s, &mut heads).await;
        for h in &heads {
            if let Err(e) = self.ports.queue.release(h).await {
                tracing::warn!(build_id = %h.entry.build_id, error = %e, "cannot release a deferred build; it returns when its lease lapses");
            }
        }
        result
    }

    /// Launches what the caps and locks allow among `heads`, removing each
    /// launched (or stale) one from `heads`.
    async fn launch_heads(&self, s: &mut Sched, heads: &mut Vec<Received>) -> Result<()> {
        let mut waiting: Vec<Waiting> = heads
            .iter()
            .map(|h| Waiting {
                build_id: h.entry.build_id,
                project: h.entry.project.clone(),
                lock_key: h.entry.lock_key(),
                deferred_at: h.entry.deferred_at,
            })
            .collect();
        let mut blocked = HashSet::new();
        while let Some(i) = next_candidate(&waiting, &s.running, self.config.caps, s.open, &blocked)
        {
            let w = waiting.remove(i);
            let head = heads.remove(i);
            let b = match self.ports.builds.get(w.build_id).await? {
                Some(b) if b.status == BuildStatus::Deferred => b,
                _ => {
                    // A leftover of a crash between launch and removal, or a
                    // build that ended meanwhile: drop it.
                    tracing::info!(build_id = %w.build_id, "dropping a queue entry whose build no longer waits");
                    self.ports.queue.ack(&head).await?;
                    s.key_removed(&w.lock_key);
                    continue;
                }
            };
            let ttl = self.lock_ttl(&b.project);
            match self
                .ports
                .locks
                .acquire(&w.lock_key, b.id, ttl, now())
                .await
            {
                Ok(Err(held)) => {
                    blocked.insert(w.lock_key.clone());
                    let reason = DeferReason::LockHeld(Some(held.owner)).to_string();
                    let update = if head.entry.reason != reason {
                        self.ports.queue.set_reason(b.id, &reason).await
                    } else {
                        Ok(())
                    };
                    heads.insert(i.min(heads.len()), head);
                    waiting.insert(i.min(waiting.len()), w);
                    update?;
                }
                Ok(Ok(lock)) => {
                    self.launch_locked(s, b, lock, BuildStatus::Deferred)
                        .await?;
                    self.ports.queue.ack(&head).await?;
                    s.key_removed(&w.lock_key);
                }
                Err(e) => {
                    heads.insert(i.min(heads.len()), head);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Cancels a queued, deferred or running build. A running build's
    /// environment is stopped (TERM, the grace period, KILL) before the
    /// build ends, so its lock and its place under the caps are freed only
    /// once none of its processes is left.
    pub async fn cancel(&self, id: BuildId) -> Result<Build> {
        let b = self.build(id).await?;
        if b.status.is_final() {
            return Err(Error::Conflict(format!(
                "build {id} has already ended ({})",
                b.status
            )));
        }
        let cancelled = Finish {
            status: BuildStatus::Cancelled,
            exit_code: None,
            message: Some("cancelled".into()),
        };
        let done = if b.status == BuildStatus::Running {
            let outcome = self.keep_reported(b, cancelled).await?;
            if let Err(e) = self.ports.executor.cancel(id).await {
                tracing::warn!(build_id = %id, error = %e, "stopping the build environment failed");
            }
            self.finish(id, outcome).await?
        } else {
            self.finish(id, cancelled).await?
        };
        match done {
            Some(b) => Ok(b),
            None => self.build(id).await,
        }
    }

    /// Keeps how a running build ended on its record while its environment
    /// stops; the first outcome reported wins. Answers the outcome kept.
    async fn keep_reported(&self, mut b: Build, outcome: Finish) -> Result<Finish> {
        if let Some(kept) = &b.reported {
            return Ok(kept.clone());
        }
        b.reported = Some(outcome.clone());
        if self.ports.builds.update(&b, BuildStatus::Running).await? {
            return Ok(outcome);
        }
        // Changed meanwhile: what is recorded now wins.
        Ok(self.build(b.id).await?.reported.unwrap_or(outcome))
    }

    /// bctool (or the script, with `record-build-metadata`) reports how the
    /// build ended. The outcome is kept on the record at once; the build
    /// ends when its environment is gone, which bctool's exit brings about
    /// immediately. An environment still there after the grace period (the
    /// script reported and went on) is stopped.
    pub async fn report(self: &Arc<Self>, id: BuildId, outcome: Finish) -> Result<Build> {
        let b = self.build(id).await?;
        if b.status != BuildStatus::Running {
            return Ok(b);
        }
        self.keep_reported(b, outcome).await?;
        let live = self.ports.executor.live().await?.contains(&id);
        if !live {
            // No environment here to wait for (it ended already, or another
            // replica launched it): end it now.
            self.finish_reported(id, Vec::new(), "no environment")
                .await?;
        } else {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(this.config.kill_grace).await;
                let still = this
                    .ports
                    .executor
                    .live()
                    .await
                    .is_ok_and(|l| l.contains(&id));
                if still {
                    tracing::info!(build_id = %id, "the build reported its result but its processes go on; stopping them");
                    if let Err(e) = this.ports.executor.cancel(id).await {
                        tracing::warn!(build_id = %id, error = %e, "stopping the build environment failed");
                    }
                    if let Err(e) = this.finish_reported(id, Vec::new(), "stopped").await {
                        tracing::error!(build_id = %id, error = %e, "cannot finish a build");
                    }
                }
            });
        }
        self.build(id).await
    }

    /// Ends a running build whose environment is gone: with the outcome it
    /// reported, or as errored; limits it ran into are named first.
    async fn finish_reported(
        &self,
        id: BuildId,
        limits: Vec<decap_core::limits::LimitHit>,
        why: &str,
    ) -> Result<Option<Build>> {
        let b = self.build(id).await?;
        let mut outcome = b.reported.clone().unwrap_or(Finish {
            status: BuildStatus::Errored,
            exit_code: None,
            message: Some(format!(
                "the build environment ended without reporting a result: {why}"
            )),
        });
        if !limits.is_empty() {
            let named: Vec<String> = limits.iter().map(ToString::to_string).collect();
            outcome.message = Some(match outcome.message.take() {
                Some(m) => format!("{}; {m}", named.join("; ")),
                None => named.join("; "),
            });
            if matches!(
                outcome.status,
                BuildStatus::Errored | BuildStatus::Succeeded
            ) {
                outcome.status = BuildStatus::Failed;
            }
        }
        self.finish(id, outcome).await
    }

    /// Removes a deferred build from the queue (it ends cancelled).
    pub async fn remove_deferred(&self, id: BuildId) -> Result<()> {
        let b = self.build(id).await?;
        if b.status != BuildStatus::Deferred {
            return Err(Error::NotFound(format!("deferred build {id}")));
        }
        self.cancel(id).await.map(|_| ())
    }

    /// A build's script released its lock early (bctool `unlock`).
    pub async fn release_own_lock(&self, id: BuildId) -> Result<bool> {
        let b = self.build(id).await?;
        let mut s = self.sched.lock().await;
        let released = self.ports.locks.release(&b.lock_key(), id).await?;
        s.running.release_key(id);
        self.drain_locked(&mut s).await?;
        Ok(released)
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

    async fn environment_exited(&self, exit: EnvironmentExit) {
        let reported = match self.build(exit.build_id).await {
            Ok(b) => b.reported.is_some(),
            Err(e) => {
                tracing::error!(build_id = %exit.build_id, error = %e, "cannot read a build whose environment ended");
                return;
            }
        };
        let result = self
            .finish_reported(exit.build_id, exit.limits.clone(), &exit.reason)
            .await;
        match result {
            Ok(Some(b)) if !reported => {
                tracing::warn!(build_id = %exit.build_id, reason = %exit.reason, status = %b.status, "build environment ended without a result")
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Err(e) = self.settle(exit.build_id).await {
                    tracing::error!(build_id = %exit.build_id, error = %e, "cannot settle a finished build");
                }
            }
            Err(e) => {
                tracing::error!(build_id = %exit.build_id, error = %e, "cannot finish a build whose environment ended")
            }
        }
    }

    /// Catches up with a build that ended without this process finishing it:
    /// bctool recorded its result straight in the build store (its direct
    /// path to AWS). The build leaves the running set, its lock goes (bctool
    /// released it; releasing is idempotent), its spool is kept as the log if
    /// bctool stored none, and deferred builds are resubmitted.
    async fn settle(&self, id: BuildId) -> Result<()> {
        let mut s = self.sched.lock().await;
        if !s.running.contains(id) {
            return Ok(());
        }
        let b = self.build(id).await?;
        if !b.status.is_final() {
            return Ok(());
        }
        self.ports.locks.release(&b.lock_key(), id).await?;
        s.running.finish(id);
        self.metrics.running.set(s.running.len() as i64);
        self.keep_log(id).await;
        tracing::info!(build_id = %id, status = %b.status, exit_code = ?b.exit_code, "build finished (recorded by bctool)");
        self.count_finished(&b);
        self.publish(&b);
        self.drain_locked(&mut s).await
    }

    /// Rebuilds the controller's state from the stores after a start or a
    /// crash: running builds whose environment is gone end as errored (lock
    /// released, log kept), builds accepted but never scheduled are scheduled,
    /// the queue is reconciled with the build records, stale locks are freed,
    /// and deferred builds resume.
    pub async fn recover(&self) -> Result<()> {
        let mut s = self.sched.lock().await;
        s.open = self.ports.queue.is_open().await?;
        let live: HashSet<BuildId> = self.ports.executor.live().await?.into_iter().collect();
        for b in self
            .ports
            .builds
            .with_status(&[BuildStatus::Running])
            .await?
        {
            if live.contains(&b.id) {
                s.running.start(b.id, b.project.clone(), b.lock_key());
                let _ = self.live.open(b.id);
            } else {
                let outcome = match b.reported.clone() {
                    Some(reported) => reported,
                    None => {
                        tracing::warn!(build_id = %b.id, "build was running when Decap stopped; finishing it as errored");
                        Finish {
                            status: BuildStatus::Errored,
                            exit_code: None,
                            message: Some(
                                "Decap stopped while this build ran; its build environment is gone"
                                    .into(),
                            ),
                        }
                    }
                };
                self.finish_locked(&mut s, b.id, outcome).await?;
            }
        }
        let entries = self.ports.queue.list().await?;
        let mut queued_ids = HashSet::new();
        for e in entries {
            match self.ports.builds.get(e.build_id).await? {
                Some(b) if b.status == BuildStatus::Deferred => {
                    queued_ids.insert(e.build_id);
                    s.key_added(e.lock_key());
                }
                _ => {
                    self.ports.queue.remove(e.build_id).await?;
                }
            }
        }
        for b in self
            .ports
            .builds
            .with_status(&[BuildStatus::Deferred])
            .await?
        {
            if !queued_ids.contains(&b.id) {
                // Deferred in the record but not in the queue: put it back.
                let entry = DeferredEntry {
                    build_id: b.id,
                    project: b.project.clone(),
                    branch: b.branch.clone(),
                    git_ref: b.git_ref.clone(),
                    commit: b.commit.clone(),
                    deferred_at: now(),
                    reason: b
                        .message
                        .clone()
                        .unwrap_or_else(|| "resubmitted after a restart".into()),
                };
                if self.ports.queue.push(&entry).await? == PushOutcome::Added {
                    s.key_added(entry.lock_key());
                }
            }
        }
        for lock in self.ports.locks.list().await? {
            if s.running.contains(lock.owner) {
                continue;
            }
            let stale = match self.ports.builds.get(lock.owner).await? {
                None => true,
                Some(b) => b.status.is_final(),
            };
            if stale {
                tracing::warn!(key = %lock.key, owner = %lock.owner, "releasing a lock left by an ended build");
                self.ports.locks.release(&lock.key, lock.owner).await?;
            }
        }
        for b in self
            .ports
            .builds
            .with_status(&[BuildStatus::Queued])
            .await?
        {
            self.schedule_locked(&mut s, b).await?;
        }
        self.drain_locked(&mut s).await?;
        self.metrics.running.set(s.running.len() as i64);
        Ok(())
    }
}
