//! Scheduling: requests are admitted or deferred, deferred builds are
//! resubmitted as room frees, and admitted builds are launched.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use decap_core::Result;
use decap_core::build::{Build, BuildId, BuildStatus};
use decap_core::descriptor::DEFAULT_BUILD_TIMEOUT;
use decap_core::lifecycle::{self, Effect, Event, Launch};
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{DeferredEntry, LaunchSpec, Lock, PushOutcome, Received};
use decap_core::schedule::{Decision, DeferReason, Waiting, admit, next_candidate};

use super::{Controller, MAX_HEADS, Sched, new_build_token, now, token_hash};

impl Controller {
    /// Schedules builds that other replicas accepted (they stay queued in the
    /// store): those queued longer than `age` ago.
    pub(super) async fn adopt_queued(self: &Arc<Self>, age: Duration) {
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
    pub(super) async fn schedule_batch(&self, builds: Vec<Build>) -> Vec<BuildId> {
        let mut failed = Vec::new();
        self.prefetch(&builds).await;
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
                        Ok(Ok(lock)) => self.launch_locked(&mut s, b, lock).await.map(|()| None),
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
        if *self.stopping.borrow() {
            // What arrives while this process stops waits for the next one.
            return Decision::Defer(DeferReason::ExecutorUnavailable(
                "Decap is restarting".into(),
            ));
        }
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

    pub(super) async fn schedule_locked(&self, s: &mut Sched, b: Build) -> Result<()> {
        let key = b.lock_key();
        let key_waiting = s.waiting_keys.contains_key(&key);
        match self.admit(s, &b.project, &key, key_waiting) {
            Decision::Defer(reason) => self.defer_locked(s, b, reason).await,
            Decision::TryLaunch => {
                let ttl = self.lock_ttl(&b.project);
                match self.ports.locks.acquire(&key, b.id, ttl, now()).await? {
                    Ok(lock) => self.launch_locked(s, b, lock).await,
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
    async fn record_deferral(&self, b: Build, reason: DeferReason) -> Result<bool> {
        let at = now();
        let step = lifecycle::decide(
            &b,
            false,
            Event::Defer {
                reason: reason.to_string(),
            },
            at,
        )?;
        let Some(deferred) = step.write else {
            return Ok(false);
        };
        debug_assert!(step.with_write.contains(&Effect::Enqueue));
        let entry = DeferredEntry::of(&b, reason.to_string(), at);
        // The queue entry and the record are written together (one group
        // commit); in the rare case the commit already waited, the record
        // is corrected after.
        let (pushed, updated) = tokio::join!(
            self.ports.queue.push(&entry),
            self.ports.builds.update(&deferred, b.status)
        );
        match (pushed?, updated?) {
            (PushOutcome::Added, true) => {
                tracing::debug!(build_id = %b.id, reason = %entry.reason, "build deferred");
                self.publish(&deferred);
                Ok(true)
            }
            (PushOutcome::Added, false) => {
                // The build changed meanwhile (cancelled): it does not wait.
                self.ports.queue.remove(b.id).await?;
                Ok(false)
            }
            // Its own entry, put back meanwhile: it waits, once.
            (PushOutcome::AlreadyWaiting(other), true) if other == b.id => {
                self.publish(&deferred);
                Ok(true)
            }
            (PushOutcome::AlreadyWaiting(other), updated) => {
                let current = if updated { deferred } else { b };
                let step = lifecycle::decide(&current, false, Event::AlreadyWaiting { other }, at)?;
                if let Some(dup) = step.write
                    && self.ports.builds.update(&dup, current.status).await?
                {
                    self.publish(&dup);
                }
                Ok(false)
            }
        }
    }

    /// Launches a waiting build (queued or deferred, as read) whose lock it
    /// holds: the record moves to running while the environment starts.
    async fn launch_locked(&self, s: &mut Sched, b: Build, lock: Lock) -> Result<()> {
        let at = now();
        let catalog = self.ports.scripts.catalog();
        self.remember_catalog(&catalog);
        let mut scripts_commit = catalog.commit.clone();
        let mut pinned = None;
        // A pipeline's stage runs the scripts its run was pinned to.
        let run = if b.stage.is_some() {
            match self.run_of(&b).await {
                Ok(run) => {
                    if let Some(entry) = self.pinned_project(&run).await {
                        scripts_commit = run.scripts_commit.clone();
                        pinned = Some(entry);
                    }
                    Ok(run)
                }
                Err(decap_core::Error::NotFound(m)) => Err(m),
                Err(e) => {
                    self.ports.locks.release(&lock.key, b.id).await?;
                    return Err(e);
                }
            }
            .map(Some)
        } else {
            Ok(None)
        };
        let entry = pinned.or_else(|| catalog.project(&b.project).cloned());
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
            let message = problem.unwrap_or_default();
            self.apply_locked(s, b.id, Event::Refuse { message })
                .await?;
            return Ok(());
        };
        // A pipeline's stage runs its own script, with its own settings.
        let staged = match run {
            Ok(Some(run)) => super::stage_entry(entry, &run, &b, &scripts_commit),
            Ok(None) => Ok(entry),
            Err(m) => Err(m),
        };
        let mut entry = match staged {
            Ok(entry) => entry,
            Err(message) => {
                self.apply_locked(s, b.id, Event::Refuse { message })
                    .await?;
                return Ok(());
            }
        };
        super::pipeline::stage_env(&mut entry, &b);
        let timeout = entry
            .valid_descriptor()
            .map(|d| d.timeout())
            .unwrap_or(DEFAULT_BUILD_TIMEOUT);
        let mut secrets = match self.secrets_for(&b).await {
            Ok(s) => s,
            Err(e) => {
                // Without its secrets the build would run wrong: it waits
                // for the store instead (the lock goes back, the queue
                // keeps it).
                self.ports.locks.release(&lock.key, b.id).await?;
                return Err(e);
            }
        };
        let entry = match self.with_preset(&b, entry, &mut secrets).await {
            Ok(entry) => entry,
            Err(message) => {
                self.apply_locked(s, b.id, Event::Refuse { message })
                    .await?;
                return Ok(());
            }
        };
        let mut bctool_env = self.config.bctool_env.clone();
        if b.from_fork && !secrets.is_empty() {
            let names: Vec<&str> = secrets.iter().map(|(k, _)| k.as_str()).collect();
            bctool_env.push(("DECAP_SECRETS_WITHHELD".into(), names.join(",")));
        }
        let token = new_build_token();
        let step = lifecycle::decide(
            &b,
            s.running.contains(b.id),
            Event::Launch(Launch {
                fencing_token: lock.fencing_token,
                token_sha256: token_hash(&token),
                scripts_commit,
                executor: self.ports.executor.name().to_owned(),
                sandbox: self.ports.executor.sandbox().to_owned(),
            }),
            at,
        );
        let running = match step.map(|step| step.write) {
            Ok(Some(running)) => running,
            Ok(None) | Err(_) => {
                // It no longer waits (the copy read is stale): the lock
                // taken for it goes back.
                self.ports.locks.release(&lock.key, b.id).await?;
                return Ok(());
            }
        };
        // The record moves to running while the environment starts (the
        // step's `Hold` and `StartEnvironment`). Both happen under the
        // scheduling mutex, so nothing in this process can cancel the build
        // in between; the token is known in memory meanwhile, so bctool's
        // first calls are accepted even if they beat the commit.
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
            build: running.clone(),
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
            self.ports.builds.update(&running, b.status),
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
        self.publish(&running);
        if let Err(e) = launched {
            tracing::error!(build_id = %b.id, error = %e, "launch failed");
            self.apply_locked(
                s,
                b.id,
                Event::LaunchFailed {
                    error: e.to_string(),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Resubmits deferred builds while there is room.
    pub async fn drain(&self) -> Result<()> {
        let mut s = self.sched.lock().await;
        self.drain_locked(&mut s).await
    }

    pub(super) async fn drain_locked(&self, s: &mut Sched) -> Result<()> {
        if !self.is_leading()
            || *self.stopping.borrow()
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
                    self.launch_locked(s, b, lock).await?;
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
}
