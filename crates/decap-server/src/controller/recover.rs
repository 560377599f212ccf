//! Recovery: the controller's state rebuilt from the stores after a start,
//! a crash or taking the lead.

use std::collections::HashSet;

use decap_core::Result;
use decap_core::build::{BuildId, BuildStatus};
use decap_core::lifecycle::{Event, Gone};
use decap_core::ports::{DeferredEntry, PushOutcome};

use super::{Controller, Sched, now};

impl Controller {
    /// Rebuilds the controller's state from the stores after a start or a
    /// crash: running builds whose environment is gone end with the outcome
    /// they reported, or as errored (lock released, log kept), builds accepted but never scheduled are scheduled,
    /// the queue is reconciled with the build records, stale locks are freed,
    /// and deferred builds resume.
    pub async fn recover(&self) -> Result<()> {
        let mut s = self.sched.lock().await;
        s.open = self.ports.queue.is_open().await?;
        // An executor that cannot say what runs (its engine is away) leaves
        // running builds running: the periodic look ends those whose
        // environment is gone once it can say.
        let live: Option<HashSet<BuildId>> = match self.ports.executor.live().await {
            Ok(ids) => Some(ids.into_iter().collect()),
            Err(e) => {
                tracing::warn!(error = %e, "the executor cannot say which builds run: running builds are kept until it can");
                None
            }
        };
        for b in self
            .ports
            .builds
            .with_status(&[BuildStatus::Running])
            .await?
        {
            if live.as_ref().is_none_or(|l| l.contains(&b.id)) {
                s.running.start(b.id, b.project.clone(), b.lock_key());
                let _ = self.live.open(b.id);
            } else {
                if b.reported.is_none() {
                    tracing::warn!(build_id = %b.id, "build was running when Decap stopped; finishing it as errored");
                }
                self.apply_locked(&mut s, b.id, Event::EnvironmentGone(Gone::LostInRestart))
                    .await?;
            }
        }
        // Spools an earlier run left of builds that ended meanwhile (it
        // stopped between ending a build and storing its log): kept as the
        // log when none is stored, then dropped.
        for id in self.live.spooled() {
            if s.running.contains(id) {
                continue;
            }
            match self.ports.builds.get(id).await? {
                Some(b) if !b.status.is_final() => {}
                Some(_) => self.keep_log(id).await,
                None => self.live.remove(id),
            }
        }
        self.reconcile_queue_locked(&mut s, None).await?;
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

    /// Compares the queue with the build records: an entry whose build is
    /// not deferred any more goes, and a build deferred in its record but
    /// missing from the queue is put back (a queue that lost it, a crash
    /// between the two writes). At recovery (`min_age` `None`) every entry
    /// not deferred goes. Periodically only those whose build has ended or
    /// is gone, and only builds accepted more than `min_age` ago are put
    /// back, so that no deferral under way is taken for a loss.
    pub(super) async fn reconcile_queue_locked(
        &self,
        s: &mut Sched,
        min_age: Option<std::time::Duration>,
    ) -> Result<()> {
        // The count of waiting entries per lock key is made again from
        // what the queue holds (no deferral is under way: the scheduling
        // lock is held).
        s.waiting_keys.clear();
        let entries = self.ports.queue.list().await?;
        let mut queued_ids = HashSet::new();
        for e in entries {
            let stale = match self.ports.builds.get(e.build_id).await? {
                Some(b) if b.status == BuildStatus::Deferred => {
                    queued_ids.insert(e.build_id);
                    s.key_added(e.lock_key());
                    false
                }
                Some(b) => min_age.is_none() || b.status.is_final(),
                None => true,
            };
            if stale {
                self.ports.queue.remove(e.build_id).await?;
            }
        }
        let cutoff = min_age.map(|age| now() - age);
        for b in self
            .ports
            .builds
            .with_status(&[BuildStatus::Deferred])
            .await?
        {
            if queued_ids.contains(&b.id) || cutoff.is_some_and(|c| b.queued_at >= c) {
                continue;
            }
            if min_age.is_some() {
                tracing::warn!(build_id = %b.id, "a deferred build was missing from the queue; putting it back");
            }
            let reason = b
                .message
                .clone()
                .unwrap_or_else(|| "resubmitted after a restart".into());
            let entry = DeferredEntry::of(&b, reason, now());
            if self.ports.queue.push(&entry).await? == PushOutcome::Added {
                s.key_added(entry.lock_key());
            }
        }
        // An entry the queue still lists whose message it lost (SQS).
        self.ports.queue.requeue_lost().await?;
        Ok(())
    }
}
