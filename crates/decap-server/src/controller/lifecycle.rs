//! The controller's side of a build's life: it carries out the steps that
//! [`decap_core::lifecycle::decide`] takes. Every end of a build (a result
//! reported, a cancel, an environment gone, a failed launch, a restart)
//! goes through [`Controller::apply_locked`].

use std::collections::HashSet;
use std::sync::Arc;

use decap_core::build::{Build, BuildId, BuildStatus};
use decap_core::lifecycle::{self, Effect, Event, Gone, Step};
use decap_core::ports::{BlobKind, EnvironmentExit};
use decap_core::{Error, Result};

use super::{Controller, Finish, Sched, now};
use crate::livelog::gzip_file;
use crate::metrics::StatusLabel;

/// How many times an event is decided again when its write loses to
/// another writer, before it gives up.
const TRIES: usize = 5;

/// What applying an event came to.
#[derive(Debug)]
pub(super) struct Applied {
    /// The build as it stands now.
    pub build: Build,
    /// Whether this event wrote the record.
    pub wrote: bool,
    /// Effects that wait on the build's environment, done once the
    /// scheduling mutex is released.
    pub later: Vec<Effect>,
    /// Room was freed: deferred builds are to be resubmitted.
    pub drain: bool,
    /// Whether a lock was released.
    pub released: bool,
}

impl Applied {
    /// Nothing done yet to `build`, as read.
    fn read(build: Build) -> Applied {
        Applied {
            build,
            wrote: false,
            later: Vec::new(),
            drain: false,
            released: false,
        }
    }
}

impl Controller {
    /// Applies `event` to build `id`: decides on the record as it stands,
    /// writes it (a compare-and-set on the status read) and does the step's
    /// effects. A write that loses to another writer is decided again on
    /// what that writer left, so the effects always follow the record.
    pub(super) async fn apply_locked(
        &self,
        s: &mut Sched,
        id: BuildId,
        event: Event,
    ) -> Result<Applied> {
        for _ in 0..TRIES {
            let b = self.build(id).await?;
            let Step {
                write,
                with_write,
                then,
            } = lifecycle::decide(&b, s.running.contains(id), event.clone(), now())?;
            let mut applied = Applied::read(b);
            match write {
                Some(next) => {
                    let prev = applied.build.status;
                    let (updated, with) = tokio::join!(
                        self.ports.builds.update(&next, prev),
                        self.effects_with_write(&applied.build, &with_write)
                    );
                    applied.released = with?;
                    if !updated? {
                        continue;
                    }
                    applied.build = next;
                    applied.wrote = true;
                }
                None => {
                    applied.released = self.effects_with_write(&applied.build, &with_write).await?
                }
            }
            for effect in then {
                self.effect(s, effect, &mut applied).await?;
            }
            return Ok(applied);
        }
        Err(Error::Conflict(format!(
            "build {id} kept changing while it was updated; try again"
        )))
    }

    /// Applies `event` under the scheduling mutex, resubmits deferred builds
    /// if room was freed, and answers what is left to do outside the mutex.
    /// A result reported or a running build cancelled changes only the
    /// record: it does not wait for the mutex, which launches hold while
    /// environments start (bctool waits for the answer before it exits).
    async fn apply_here(&self, id: BuildId, event: Event) -> Result<Applied> {
        if matches!(event, Event::Report(_) | Event::Cancel)
            && let Some(applied) = self.apply_unlocked(id, &event).await?
        {
            return Ok(applied);
        }
        let mut s = self.sched.lock().await;
        let applied = self.apply_locked(&mut s, id, event).await?;
        if applied.drain {
            self.drain_locked(&mut s).await?;
        }
        Ok(applied)
    }

    /// Applies an event that does not depend on what this controller holds
    /// (`held` only matters to an environment gone) without the mutex, when
    /// its step changes only the record and the environment; `None` when it
    /// needs the mutex after all.
    async fn apply_unlocked(&self, id: BuildId, event: &Event) -> Result<Option<Applied>> {
        for _ in 0..TRIES {
            let b = self.build(id).await?;
            let step = lifecycle::decide(&b, false, event.clone(), now())?;
            if !step.only_record_and_environment() {
                return Ok(None);
            }
            let mut applied = Applied::read(b);
            if let Some(next) = step.write {
                if !self
                    .ports
                    .builds
                    .update(&next, applied.build.status)
                    .await?
                {
                    continue;
                }
                applied.build = next;
                applied.wrote = true;
            }
            for effect in step.then {
                match effect {
                    Effect::Publish => self.publish(&applied.build),
                    other => applied.later.push(other),
                }
            }
            return Ok(Some(applied));
        }
        Ok(None)
    }

    /// Applies `event`, then does what waits on the build's environment.
    async fn apply(self: &Arc<Self>, id: BuildId, event: Event) -> Result<Applied> {
        let applied = self.apply_here(id, event).await?;
        for effect in &applied.later {
            self.follow_up(id, *effect).await?;
        }
        Ok(applied)
    }

    /// The effects done together with a write: answers whether a lock was
    /// released.
    async fn effects_with_write(&self, b: &Build, effects: &[Effect]) -> Result<bool> {
        let mut released = false;
        for effect in effects {
            match effect {
                Effect::ReleaseLock => {
                    released |= self.ports.locks.release(&b.lock_key(), b.id).await?;
                }
                other => return Err(not_here(*other)),
            }
        }
        Ok(released)
    }

    async fn effect(&self, s: &mut Sched, effect: Effect, applied: &mut Applied) -> Result<()> {
        let b = &applied.build;
        match effect {
            Effect::Dequeue => {
                if self.ports.queue.remove(b.id).await? {
                    s.key_removed(&b.lock_key());
                }
            }
            Effect::ReleaseLock => {
                applied.released |= self.ports.locks.release(&b.lock_key(), b.id).await?;
            }
            Effect::LeaveCaps => {
                s.running.finish(b.id);
                self.metrics.running.set(s.running.len() as i64);
            }
            Effect::LeaveKey => {
                s.running.release_key(b.id);
            }
            Effect::KeepLog => self.keep_log(b.id).await,
            Effect::CountFinished => {
                tracing::info!(build_id = %b.id, status = %b.status, exit_code = ?b.exit_code, "build finished");
                self.count_finished(b);
                self.stage_ended(b);
            }
            Effect::Publish => self.publish(b),
            Effect::Drain => applied.drain = true,
            Effect::StopEnvironment | Effect::StopAfterGrace => applied.later.push(effect),
            Effect::Enqueue | Effect::Hold | Effect::StartEnvironment => {
                return Err(not_here(effect));
            }
        }
        Ok(())
    }

    /// Does what waits on a build's environment: stopping it, then ending
    /// the build.
    async fn follow_up(self: &Arc<Self>, id: BuildId, effect: Effect) -> Result<()> {
        match effect {
            Effect::StopEnvironment => {
                if let Err(e) = self.ports.executor.cancel(id).await {
                    tracing::warn!(build_id = %id, error = %e, "stopping the build environment failed");
                }
                self.apply_here(id, Event::exited("stopped")).await?;
            }
            Effect::StopAfterGrace => {
                let live = self.ports.executor.live().await?.contains(&id);
                if !live {
                    // No environment here to wait for (it ended already, or
                    // another replica launched it): end it now.
                    self.apply_here(id, Event::exited("no environment")).await?;
                    return Ok(());
                }
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
                        if let Err(e) = this.apply_here(id, Event::exited("stopped")).await {
                            tracing::error!(build_id = %id, error = %e, "cannot finish a build");
                        }
                    }
                });
            }
            other => return Err(not_here(other)),
        }
        Ok(())
    }

    /// Level-triggered: a build running here whose environment was gone at
    /// two looks in a row ends, even if its executor's exit event never
    /// came (a lost watch, an executor that restarted). `missing` carries
    /// what the previous look found gone. Two looks, so that an exit event
    /// on its way (which names the limits the build ran into) comes first.
    pub(super) async fn reconcile_running(&self, missing: &mut HashSet<BuildId>) -> Result<()> {
        if self.sched.lock().await.running.is_empty() {
            missing.clear();
            return Ok(());
        }
        // Listed before the mutex is taken (the executor may be remote): a
        // build launched meanwhile looks gone once, and is live at the next
        // look.
        let live: HashSet<BuildId> = self.ports.executor.live().await?.into_iter().collect();
        let mut s = self.sched.lock().await;
        let gone: Vec<BuildId> = s.running.ids().filter(|id| !live.contains(id)).collect();
        let mut still_missing = HashSet::new();
        let mut drain = false;
        for id in gone {
            if !missing.contains(&id) {
                still_missing.insert(id);
                continue;
            }
            tracing::warn!(build_id = %id, "the build's environment is gone but its end never arrived; ending the build");
            let event = Event::exited("its environment is gone (its end was not reported)");
            drain |= self.apply_locked(&mut s, id, event).await?.drain;
        }
        *missing = still_missing;
        if drain {
            self.drain_locked(&mut s).await?;
        }
        Ok(())
    }

    pub(super) fn count_finished(&self, b: &Build) {
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
    pub(super) async fn keep_log(&self, id: BuildId) {
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

    /// Waits, up to `limit`, until every build this controller ran has
    /// ended and what ending it does (its record, lock, log) is done: a
    /// server that stopped its builds waits for this before it exits.
    pub async fn quiesce(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Taken under the mutex that ending a build holds throughout.
            if self.sched.lock().await.running.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Cancels a queued, deferred or running build. A running build's
    /// environment is stopped (TERM, the grace period, KILL) before the
    /// build ends, so its lock and its place under the caps are freed only
    /// once none of its processes is left. A build that reported how it
    /// ended before the cancel keeps that outcome.
    pub async fn cancel(self: &Arc<Self>, id: BuildId) -> Result<Build> {
        self.apply(id, Event::Cancel).await?;
        self.build(id).await
    }

    /// bctool (or the script, with `record-build-metadata`) reports how the
    /// build ended. The outcome is kept on the record at once; the build
    /// ends when its environment is gone, which bctool's exit brings about
    /// immediately. An environment still there after the grace period (the
    /// script reported and went on) is stopped.
    pub async fn report(self: &Arc<Self>, id: BuildId, outcome: Finish) -> Result<Build> {
        let applied = self.apply(id, Event::Report(outcome)).await?;
        if applied.later.is_empty() {
            return Ok(applied.build);
        }
        self.build(id).await
    }

    /// Removes a deferred build from the queue (it ends cancelled).
    pub async fn remove_deferred(self: &Arc<Self>, id: BuildId) -> Result<()> {
        let b = self.build(id).await?;
        if b.status != BuildStatus::Deferred {
            return Err(Error::NotFound(format!("deferred build {id}")));
        }
        self.cancel(id).await.map(|_| ())
    }

    /// A running build's script released its lock early (bctool `unlock`).
    /// Answers whether a lock was released.
    pub async fn release_own_lock(&self, id: BuildId) -> Result<bool> {
        Ok(self.apply_here(id, Event::Unlock).await?.released)
    }

    /// An executor saw a build's environment end: the build ends with the
    /// outcome it reported, or as errored.
    pub(super) async fn environment_exited(&self, exit: EnvironmentExit) {
        let id = exit.build_id;
        let gone = Event::EnvironmentGone(Gone::Exited {
            reason: exit.reason.clone(),
            limits: exit.limits,
        });
        match self.apply_here(id, gone).await {
            Ok(a) if a.wrote && a.build.reported.is_none() => {
                tracing::warn!(build_id = %id, reason = %exit.reason, status = %a.build.status, "build environment ended without a result")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(build_id = %id, error = %e, "cannot finish a build whose environment ended")
            }
        }
    }
}

/// An effect that the step's caller carries out itself (deferring and
/// launching do), met where it cannot be.
fn not_here(effect: Effect) -> Error {
    Error::backend(
        "controller",
        format!("{effect:?} is not carried out here (a defect in Decap)"),
    )
}
