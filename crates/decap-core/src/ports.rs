//! The ports: traits shaped by the domain that the adapters implement.
//!
//! Every port has one contract suite (crate `decap-contract-tests`) that every
//! adapter passes; the embedded adapters are the reference. Adapters are held
//! as `Arc<dyn Port>` and must be safe to call from many tasks at once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use time::OffsetDateTime;

use crate::build::{Build, BuildId, BuildStatus};
use crate::catalog::Catalog;
use crate::error::Result;
use crate::names::{LockKey, ProjectKey};

/// A stream of bytes, for logs and artifacts, so that no adapter has to hold a
/// whole file in memory.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A query over build history. Results are newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildQuery {
    /// Only this project.
    pub project: Option<ProjectKey>,
    /// Only this branch (needs `project`).
    pub branch: Option<String>,
    /// Only these statuses (any when empty).
    pub statuses: Vec<BuildStatus>,
    /// Only builds queued at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// Only builds queued before this instant.
    pub before: Option<OffsetDateTime>,
    /// At most this many (the adapter may cap it).
    pub limit: usize,
    /// Continue after this cursor (from a previous page).
    pub cursor: Option<String>,
}

/// A page of builds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildPage {
    /// The builds, newest first.
    pub builds: Vec<Build>,
    /// The cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// The outcome of recording a webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// First time seen: the delivery and its builds were stored.
    New,
    /// Seen before: nothing was stored; these are the first delivery's builds.
    Duplicate(Vec<BuildId>),
}

/// A webhook delivery to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `X-GitHub-Delivery`.
    pub id: String,
    /// `X-GitHub-Event`.
    pub event: String,
    /// What Decap did with it (`built`, `ignored: <reason>`).
    pub outcome: String,
    /// When it arrived.
    pub received_at: OffsetDateTime,
}

/// Build records and webhook deliveries.
///
/// Contract: every write returns only once it is durable. `insert` of an
/// existing id and `update` of a missing id are errors. `update` is a
/// compare-and-set on the status, so two writers racing to finish a build
/// cannot both win.
#[async_trait]
pub trait BuildStore: Send + Sync {
    /// Stores a new build.
    async fn insert(&self, build: &Build) -> Result<()>;
    /// Records a delivery and its builds atomically, unless the delivery id
    /// was seen before (then stores nothing).
    async fn insert_delivery(
        &self,
        delivery: &Delivery,
        builds: &[Build],
    ) -> Result<DeliveryOutcome>;
    /// A build by id.
    async fn get(&self, id: BuildId) -> Result<Option<Build>>;
    /// The builds of `ids` that exist, in any order (one read where the
    /// store can).
    async fn get_many(&self, ids: &[BuildId]) -> Result<Vec<Build>> {
        let reads = futures::future::join_all(ids.iter().map(|id| self.get(*id))).await;
        let mut out = Vec::with_capacity(ids.len());
        for r in reads {
            out.extend(r?);
        }
        Ok(out)
    }
    /// Replaces a build if its stored status is `expected`; returns whether it did.
    async fn update(&self, build: &Build, expected: BuildStatus) -> Result<bool>;
    /// History, newest first, paginated.
    async fn list(&self, query: &BuildQuery) -> Result<BuildPage>;
    /// Every build in one of these statuses (for recovery at start-up), oldest first.
    async fn with_status(&self, statuses: &[BuildStatus]) -> Result<Vec<Build>>;
    /// How many builds are in each status (for metrics).
    async fn count_by_status(&self) -> Result<Vec<(BuildStatus, u64)>>;
    /// Figures over the project's (or its branch's) last `last` finished
    /// builds: one history query of the final statuses, read page by page.
    async fn stats(
        &self,
        project: &ProjectKey,
        branch: Option<&str>,
        last: usize,
    ) -> Result<crate::stats::ProjectStats> {
        let mut builds = Vec::new();
        let mut cursor = None;
        while builds.len() < last {
            let page = self
                .list(&BuildQuery {
                    project: Some(project.clone()),
                    branch: branch.map(str::to_owned),
                    statuses: crate::stats::FINAL.to_vec(),
                    limit: last - builds.len(),
                    cursor: cursor.take(),
                    ..BuildQuery::default()
                })
                .await?;
            builds.extend(page.builds);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        builds.truncate(last);
        Ok(crate::stats::ProjectStats::of(&builds))
    }
}

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// The lock key.
    pub key: LockKey,
    /// The build holding it.
    pub owner: BuildId,
    /// A number that grows with every acquisition of the key, so that a
    /// writer can tell a stale holder from the current one.
    pub fencing_token: u64,
    /// When it was taken.
    pub acquired_at: OffsetDateTime,
    /// When it lapses if not released or renewed.
    pub expires_at: OffsetDateTime,
}

/// Pipeline runs and the claims of their stages' attempts.
///
/// Contract: a run is stored once and never changes (`insert` of an id
/// that exists is a `Conflict`); `list` gives a project's runs newest
/// first, `before` (a run id) paging; `claim` of a stage attempt is
/// granted to one caller only: the others get the claim that won, so a
/// stage attempt is started once however many ask at once; `claims` gives
/// a run's claims (any order).
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Stores a new run.
    async fn insert(&self, run: &crate::pipeline::PipelineRun) -> Result<()>;
    /// A run by id.
    async fn get(&self, id: uuid::Uuid) -> Result<Option<crate::pipeline::PipelineRun>>;
    /// A project's runs, newest first, older than `before` when given.
    async fn list(
        &self,
        project: &ProjectKey,
        before: Option<uuid::Uuid>,
        limit: usize,
    ) -> Result<Vec<crate::pipeline::PipelineRun>>;
    /// Runs created at or after `since`, of every project (recovery).
    async fn since(&self, since: OffsetDateTime) -> Result<Vec<crate::pipeline::PipelineRun>>;
    /// Claims a stage attempt: `None` when this claim won, else the claim
    /// that did.
    async fn claim(
        &self,
        claim: &crate::pipeline::StageClaim,
    ) -> Result<Option<crate::pipeline::StageClaim>>;
    /// A run's claims.
    async fn claims(&self, run: uuid::Uuid) -> Result<Vec<crate::pipeline::StageClaim>>;
    /// The claims of several runs, in any order (one read where the store
    /// can).
    async fn claims_of(&self, runs: &[uuid::Uuid]) -> Result<Vec<crate::pipeline::StageClaim>> {
        let reads = futures::future::join_all(runs.iter().map(|r| self.claims(*r))).await;
        let mut out = Vec::new();
        for r in reads {
            out.extend(r?);
        }
        Ok(out)
    }
}

/// Locks per `team/project/branch`.
///
/// Contract: at most one unexpired lock per key at any instant; an expired
/// lock can be taken by anyone; only the owner releases or renews; the fencing
/// token of each successful acquisition of a key is greater than every token
/// handed out for that key before. `now` is passed in so that expiry is
/// testable.
#[async_trait]
pub trait LockStore: Send + Sync {
    /// Takes the lock, or returns the current holder's lock.
    async fn acquire(
        &self,
        key: &LockKey,
        owner: BuildId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Result<Lock, Lock>>;
    /// Releases the lock if `owner` holds it; returns whether it did.
    async fn release(&self, key: &LockKey, owner: BuildId) -> Result<bool>;
    /// Extends the owner's lock; returns false if it is not the owner's.
    async fn renew(
        &self,
        key: &LockKey,
        owner: BuildId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<bool>;
    /// Releases whatever holds the key (operators); returns what was released.
    async fn force_release(&self, key: &LockKey) -> Result<Option<Lock>>;
    /// The locks held (expired ones included until taken over).
    async fn list(&self) -> Result<Vec<Lock>>;
}

/// A deferred build in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredEntry {
    /// The build.
    pub build_id: BuildId,
    /// Its project.
    pub project: ProjectKey,
    /// Its branch; for a pipeline's stage, what stands for it in the lock
    /// key (`branch:stage`, or `:lock` for a lock shared across branches;
    /// see [`Build::lock_key`]), so that each stage waits on its own.
    pub branch: String,
    /// Its full ref.
    pub git_ref: String,
    /// Its commit, when known.
    pub commit: Option<String>,
    /// When it was deferred.
    pub deferred_at: OffsetDateTime,
    /// Why it waits.
    pub reason: String,
}

impl DeferredEntry {
    /// The entry of `build`, deferred at `at` for `reason`.
    pub fn of(build: &Build, reason: String, at: OffsetDateTime) -> Self {
        DeferredEntry {
            build_id: build.id,
            project: build.project.clone(),
            branch: build.queue_branch(),
            git_ref: build.git_ref.clone(),
            commit: build.commit.clone(),
            deferred_at: at,
            reason,
        }
    }

    /// Its lock key.
    pub fn lock_key(&self) -> LockKey {
        self.project.lock_key(&self.branch)
    }
}

/// A deferred entry taken from the queue so that the controller can decide
/// about it; it stays in the queue until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The entry.
    pub entry: DeferredEntry,
    /// What acknowledges or releases it (an SQS receipt handle, a row id).
    pub receipt: String,
}

/// The outcome of deferring a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued.
    Added,
    /// The same team/project/branch/commit already waits as this build.
    AlreadyWaiting(BuildId),
}

/// The durable FIFO deferral queue.
///
/// Contract: entries come back in the order they were pushed; a push is
/// durable when it returns; the same project, branch and commit never waits
/// twice (a build without a commit counts as one commit); `remove` of a
/// missing entry returns false.
#[async_trait]
pub trait DeferralQueue: Send + Sync {
    /// Adds an entry at the back, unless its project/branch/commit waits already.
    async fn push(&self, entry: &DeferredEntry) -> Result<PushOutcome>;
    /// Every waiting entry, oldest first.
    async fn list(&self) -> Result<Vec<DeferredEntry>>;
    /// Removes one entry; returns whether it was there.
    async fn remove(&self, build_id: BuildId) -> Result<bool>;
    /// Updates the reason an entry waits (shown to users).
    async fn set_reason(&self, build_id: BuildId, reason: &str) -> Result<()>;
    /// Takes the oldest waiting entry of each lock key, at most `max`, oldest
    /// first. A taken entry stays queued until [`DeferralQueue::ack`]; if the
    /// taker dies first it is offered again (on SQS, once its visibility
    /// timeout lapses), so a crash between taking and launching loses
    /// nothing. Entries removed meanwhile are not offered.
    async fn receive_heads(&self, max: usize) -> Result<Vec<Received>>;
    /// The taken entry was launched (or is stale): removes it for good.
    async fn ack(&self, received: &Received) -> Result<()>;
    /// The taken entry was not launched: offers it again at once, in its place.
    async fn release(&self, received: &Received) -> Result<()>;
    /// Whether the queue is open; a closed queue (maintenance) defers every
    /// new build. The state is durable. A new queue is open.
    async fn is_open(&self) -> Result<bool>;
    /// Opens or closes the queue.
    async fn set_open(&self, open: bool) -> Result<()>;
    /// Sends again the entries still waiting whose message the queue has
    /// lost (on SQS: past its retention, moved to the dead-letter queue,
    /// deleted by hand), so that no deferred build waits forever; answers
    /// them. An entry counts as lost once a [`DeferralQueue::receive_heads`]
    /// that took every message on offer, begun well after any taker's hold
    /// on it lapsed, did not see it although it was the oldest of its lock
    /// key. A queue whose entries are its messages (SQLite) loses none.
    async fn requeue_lost(&self) -> Result<Vec<BuildId>> {
        Ok(Vec::new())
    }
}

/// Which blob of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// The console log, gzip-compressed.
    LogGz,
    /// The artifacts, a gzip-compressed tar.
    ArtifactsTarGz,
    /// The artifacts' file list (JSON), written beside them so that a view
    /// never decompresses the tarball.
    ArtifactsIndex,
    /// The build scripts of a pipeline run's project as the run was pinned
    /// to them (JSON), keyed by the run's id: its later stages run them
    /// even after the server that read them has restarted.
    Scripts,
}

impl BlobKind {
    /// A file-name-like name for the blob.
    pub fn file_name(self) -> &'static str {
        match self {
            BlobKind::LogGz => "console.log.gz",
            BlobKind::ArtifactsTarGz => "artifacts.tar.gz",
            BlobKind::ArtifactsIndex => "artifacts.index.json",
            BlobKind::Scripts => "scripts.json",
        }
    }
}

/// Logs and artifacts.
///
/// Contract: `put` replaces the blob atomically (a reader sees the old or the
/// new one, never a part); `get` of a missing blob is `Ok(None)`; nothing is
/// held whole in memory.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores a blob from a stream; returns its size in bytes.
    async fn put(&self, build: BuildId, kind: BlobKind, data: ByteStream) -> Result<u64>;
    /// Reads a blob, with its size.
    async fn get(&self, build: BuildId, kind: BlobKind) -> Result<Option<(u64, ByteStream)>>;
    /// Deletes a blob; returns whether it existed.
    async fn delete(&self, build: BuildId, kind: BlobKind) -> Result<bool>;
    /// A URL that lets anyone holding it download the blob directly for
    /// `valid_for`, when the store can make one (S3 presigned URLs); `None`
    /// when it cannot, and clients download through the server.
    async fn presigned_url(
        &self,
        build: BuildId,
        kind: BlobKind,
        valid_for: Duration,
    ) -> Result<Option<String>> {
        let _ = (build, kind, valid_for);
        Ok(None)
    }
}

/// What an executor needs to start a build.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The build (status `running`, fencing token set).
    pub build: Build,
    /// The project's folder at the pinned scripts commit.
    pub project: crate::catalog::ProjectEntry,
    /// The per-build token for bctool (secret: never logged).
    pub build_token: String,
    /// How bctool reaches the server.
    pub decap_url: String,
    /// The build timeout.
    pub timeout: Duration,
    /// The console log is kept up to this many bytes.
    pub max_log_bytes: u64,
    /// Settings for bctool itself, never for the script (they may hold
    /// credentials): its direct path to AWS.
    pub bctool_env: Vec<(String, String)>,
    /// The project's secrets, as variables of the build (masked in its
    /// console). Values are empty for a build that gets none (a pull
    /// request from a fork).
    pub secrets: Vec<(String, String)>,
}

/// How a build environment ended, as its executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentExit {
    /// The build.
    pub build_id: BuildId,
    /// Why it ended, in words.
    pub reason: String,
    /// The limits the build ran into, if any.
    pub limits: Vec<crate::limits::LimitHit>,
}

/// Receives what executors see happen to build environments.
pub trait ExecutorEvents: Send + Sync {
    /// A build's environment is gone. If the build has not recorded a result,
    /// the controller finishes it as errored with this reason.
    fn environment_exited(&self, exit: EnvironmentExit);
}

/// Runs builds.
///
/// Contract: `launch` returns once the environment exists (it does not wait
/// for the build); launching an id that is already live adopts it instead of
/// starting a second one; `cancel` stops the environment (TERM, the grace
/// period, then KILL) and returns once no process of it is left, and is a
/// no-op for an unknown id; every environment that ends is reported once
/// through [`ExecutorEvents`], after its last process is gone: a build's
/// lock and its place under the caps are freed only then.
#[async_trait]
pub trait Executor: Send + Sync {
    /// The executor's name, recorded on builds (`local`, `kubernetes`).
    fn name(&self) -> &'static str;
    /// The isolation builds get (`bubblewrap`, `none`, `pod`), recorded on each build.
    fn sandbox(&self) -> &'static str;
    /// Starts a build.
    async fn launch(&self, spec: LaunchSpec) -> Result<()>;
    /// Stops a build's environment.
    async fn cancel(&self, build: BuildId) -> Result<()>;
    /// The builds whose environments are alive.
    async fn live(&self) -> Result<Vec<BuildId>>;
    /// Why builds cannot be launched now (e.g. the Kubernetes API server is
    /// unreachable), or `None` when they can. Cheap: the scheduler asks before
    /// every launch and defers builds meanwhile.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// The build-scripts repo.
#[async_trait]
pub trait ScriptsRepo: Send + Sync {
    /// The current catalog.
    fn catalog(&self) -> Arc<Catalog>;
    /// Reads the repo again (fetching it first when it is remote) and swaps in
    /// the new catalog. A failed refresh keeps the previous catalog.
    async fn refresh(&self) -> Result<Arc<Catalog>>;
}

/// The state of a commit status, as GitHub names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommitState {
    /// Accepted, waiting or running.
    Pending,
    /// Succeeded.
    Success,
    /// The script failed.
    Failure,
    /// Decap or the environment failed, the build ran out of time or was
    /// cancelled.
    Error,
}

impl CommitState {
    /// The state of a build.
    pub fn of(status: BuildStatus) -> Self {
        match status {
            BuildStatus::Queued | BuildStatus::Deferred | BuildStatus::Running => {
                CommitState::Pending
            }
            BuildStatus::Succeeded => CommitState::Success,
            BuildStatus::Failed => CommitState::Failure,
            BuildStatus::Errored | BuildStatus::TimedOut | BuildStatus::Cancelled => {
                CommitState::Error
            }
        }
    }

    /// As GitHub spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            CommitState::Pending => "pending",
            CommitState::Success => "success",
            CommitState::Failure => "failure",
            CommitState::Error => "error",
        }
    }
}

/// A commit status to set on the repository host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    /// The repository's owner.
    pub owner: String,
    /// The repository.
    pub repo: String,
    /// The commit.
    pub sha: String,
    /// Which check this is (`decap/team/project`, `decap/all`).
    pub context: String,
    /// Its state.
    pub state: CommitState,
    /// Where to look (the build page).
    pub target_url: String,
    /// A line for people (GitHub keeps 140 characters).
    pub description: String,
}

impl CommitStatus {
    /// The ledger's key for this status: repository, commit and context.
    pub fn ledger_key(&self) -> String {
        format!("{}/{}@{}#{}", self.owner, self.repo, self.sha, self.context)
    }
}

/// Sets commit statuses on the repository host (GitHub).
#[async_trait]
pub trait CommitStatuses: Send + Sync {
    /// Sets one status; retried by the adapter on rate limits.
    async fn set(&self, status: &CommitStatus) -> Result<()>;
}

/// A comment on a pull request: one per pull request and project, edited
/// in place as later builds finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestComment {
    /// The repository's owner.
    pub owner: String,
    /// The repository.
    pub repo: String,
    /// The pull request's number.
    pub number: u64,
    /// The comment (Markdown).
    pub body: String,
}

/// Comments on pull requests at the repository host (GitHub).
#[async_trait]
pub trait PullRequestComments: Send + Sync {
    /// Edits the comment posted before (`previous`, its id) to `comment`, or
    /// posts it when there is none or it is gone (deleted by hand); answers
    /// the comment's id. Retried by the adapter on rate limits.
    async fn upsert(&self, comment: &PullRequestComment, previous: Option<u64>) -> Result<u64>;
}

/// How a repository's webhook subscription ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// A new webhook was registered (its id).
    Created(u64),
    /// Decap's webhook was there already; its events and secret were brought
    /// up to date (its id).
    Updated(u64),
}

/// Webhook subscriptions at the repository host (GitHub).
#[async_trait]
pub trait RepositoryHooks: Send + Sync {
    /// Registers (or brings up to date) the webhook that sends `events` of
    /// `owner/repo` to `url`, signed with `secret`.
    async fn subscribe(
        &self,
        owner: &str,
        repo: &str,
        url: &str,
        secret: &str,
        events: &[&str],
    ) -> Result<Subscribed>;
}

/// Branches and tags of repositories at their host (GitHub), for the Build
/// buttons.
#[async_trait]
pub trait RepositoryRefs: Send + Sync {
    /// The repository's branches and tags, as `("branch" | "tag", name)`.
    async fn refs(&self, owner: &str, repo: &str) -> Result<Vec<(String, String)>>;
}

/// What the status reporter told the host, kept durably so that a state is
/// reported once per (repository, commit, context), also across restarts;
/// and which comment holds each pull request's results.
///
/// Contract: `reported` answers the last state recorded for the key (none at
/// first); `record` replaces it. `comment` answers the comment id recorded
/// for a key (none at first); `record_comment` replaces it.
#[async_trait]
pub trait StatusLedger: Send + Sync {
    /// The last state recorded for a key.
    async fn reported(&self, key: &str) -> Result<Option<CommitState>>;
    /// Records the state last told for a key.
    async fn record(&self, key: &str, state: CommitState) -> Result<()>;
    /// The comment recorded for a key.
    async fn comment(&self, key: &str) -> Result<Option<u64>>;
    /// Records the comment for a key.
    async fn record_comment(&self, key: &str, id: u64) -> Result<()>;
}

/// The CI status hub's records: builds of other CI servers, and the locks
/// they take to serialise deploys.
#[async_trait]
pub trait StatusHub: Send + Sync {
    /// Records a build's status, replacing the last of the same project,
    /// revision and name. A revision keeps the time it was first reported.
    async fn record(&self, build: &crate::hub::ExternalBuild) -> Result<()>;
    /// A project's builds of its `revisions` most recently first-reported
    /// revisions.
    async fn latest(
        &self,
        project: &str,
        revisions: usize,
    ) -> Result<Vec<crate::hub::ExternalBuild>>;
    /// The projects with reports, sorted.
    async fn projects(&self) -> Result<Vec<String>>;
    /// Removes a project's history and locks; `false` when it had none.
    async fn remove_project(&self, project: &str) -> Result<bool>;
    /// Takes the lock of a project's build `name` for `revision`, unless
    /// another revision holds it unexpired; answers the revision holding it
    /// afterwards. Taking it again for the holder renews it.
    async fn lock(
        &self,
        project: &str,
        name: &str,
        revision: &str,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<String>;
    /// Releases the lock if `revision` holds it; whether it did.
    async fn unlock(&self, project: &str, name: &str, revision: &str) -> Result<bool>;
}

/// Where a detail file of a CI run is kept: `owner/repo/commit/file`, each
/// part checked, so that it can name a path or a key safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetailPath {
    /// The repository's owner.
    pub owner: String,
    /// The repository.
    pub repo: String,
    /// The commit (lower-case hex).
    pub commit: String,
    /// The file, relative, `/`-separated.
    pub file: String,
}

impl DetailPath {
    /// Checks each part.
    pub fn new(owner: &str, repo: &str, commit: &str, file: &str) -> Result<Self> {
        use crate::error::Error;
        let name_ok = |v: &str| {
            !v.is_empty()
                && v.len() <= 100
                && v != "."
                && v != ".."
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(owner) || !name_ok(repo) {
            return Err(Error::invalid(
                "repository",
                format!("{owner}/{repo} is not owner/repo"),
            ));
        }
        let commit = commit.to_ascii_lowercase();
        if !(7..=64).contains(&commit.len()) || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "commit",
                format!("{commit:?} is not a commit id"),
            ));
        }
        let parts: Vec<&str> = file.split('/').collect();
        let file_ok = file.len() <= 1024
            && parts.len() <= 32
            && parts.iter().all(|p| {
                !p.is_empty()
                    && *p != "."
                    && *p != ".."
                    && !p.starts_with(".decap")
                    && !p.chars().any(|c| c.is_control() || c == '\\')
            });
        if !file_ok {
            return Err(Error::invalid(
                "file",
                format!("{file:?} is not a relative path of plain names"),
            ));
        }
        Ok(DetailPath {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            commit,
            file: file.to_owned(),
        })
    }
}

/// Detail files of CI runs (`decapctl notify-pr` with the embedded store),
/// each commit's files kept until they expire.
#[async_trait]
pub trait DetailStore: Send + Sync {
    /// Stores a file; its commit's files are kept at least until
    /// `expires_at`. Answers the bytes stored.
    async fn put(
        &self,
        path: &DetailPath,
        data: ByteStream,
        expires_at: OffsetDateTime,
    ) -> Result<u64>;
    /// A stored file, unless it is unknown or expired.
    async fn get(
        &self,
        path: &DetailPath,
        now: OffsetDateTime,
    ) -> Result<Option<(u64, ByteStream)>>;
    /// Removes what has expired; answers how many commits' files went.
    async fn sweep(&self, now: OffsetDateTime) -> Result<usize>;
}

/// The secrets of builds: set by operators, given to builds as environment
/// variables, never shown again.
///
/// Contract:
/// * `set` creates or replaces a value; once it returns, the value is
///   durable and every later call sees it.
/// * `names` answers the names set in exactly that scope, sorted, each once:
///   a team's scope lists the team's secrets only, a project's scope the
///   project's only.
/// * `remove` deletes a name from exactly that scope and answers whether it
///   was there; removing a missing name is `false`, not an error.
/// * `for_build` answers what a build of the project gets: the team's
///   secrets and the project's, the project's winning on a shared name,
///   sorted by name. It is the only call that answers values; the server
///   calls it at launch and nowhere else.
/// * Scopes are apart: nothing set for one project reaches another
///   project's builds, nor another team's.
/// * Names and values are checked by their types ([`SecretName`],
///   [`SecretValue`]), so an adapter never stores one a build could not use.
/// * An adapter keeps values where a copy of Decap's database alone does
///   not reveal them (the embedded adapter encrypts them with a key kept in
///   a file of its own; on Kubernetes they are Kubernetes Secrets), and
///   never writes a value to a log or an error.
///
/// Concurrency: calls from many tasks (and, for shared adapters, many
/// replicas) at once are safe; concurrent `set`s of different names in one
/// scope all take effect.
///
/// [`SecretName`]: crate::secrets::SecretName
/// [`SecretValue`]: crate::secrets::SecretValue
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Creates or replaces a secret.
    async fn set(
        &self,
        scope: &crate::secrets::SecretScope,
        name: &crate::secrets::SecretName,
        value: &crate::secrets::SecretValue,
    ) -> Result<()>;
    /// The names of a scope's secrets, sorted; never their values.
    async fn names(&self, scope: &crate::secrets::SecretScope) -> Result<Vec<String>>;
    /// Removes a secret; whether it was there.
    async fn remove(
        &self,
        scope: &crate::secrets::SecretScope,
        name: &crate::secrets::SecretName,
    ) -> Result<bool>;
    /// What a build of `project` gets: its team's secrets merged with its
    /// own, its own winning, sorted by name.
    async fn for_build(
        &self,
        project: &ProjectKey,
    ) -> Result<Vec<(String, crate::secrets::SecretValue)>>;
}

/// A login session of the web UI, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The GitHub login, when it logged in with GitHub; none for the API
    /// token.
    pub github_login: Option<String>,
    /// May build, rerun and cancel.
    pub can_build: bool,
    /// May also unlock and run the queue.
    pub can_unlock: bool,
    /// When it ends.
    pub expires_at: OffsetDateTime,
}

/// The web UI's login sessions, by key: the SHA-256 of the session's id in
/// hex (the id itself, what the browser's cookie holds, is never stored).
///
/// Contract: once `put` returns, every `get` of the key (from any replica,
/// for a shared adapter) answers the session until its `expires_at`, and
/// nothing after; `put` of a key replaces its session; `remove` ends it
/// (removing a missing key is no error); keys are apart.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores a session.
    async fn put(&self, key: &str, session: &StoredSession) -> Result<()>;
    /// The session of `key`, unless unknown or ended by `now`.
    async fn get(&self, key: &str, now: OffsetDateTime) -> Result<Option<StoredSession>>;
    /// Ends a session.
    async fn remove(&self, key: &str) -> Result<()>;
}
