//! Scheduling decisions: run now or defer, and which deferred build runs next.
//!
//! The server keeps a [`RunningSet`] of what runs on this controller and asks
//! [`admit`] about each new request and [`next_candidate`] about the deferral
//! queue whenever room frees. The lock store still has the last word on a lock
//! key (another replica or a script may hold it); these functions only decide
//! what is worth trying, never what is safe.

use std::collections::{HashMap, HashSet};
use std::fmt;

use time::OffsetDateTime;

use crate::build::BuildId;
use crate::names::{LockKey, ProjectKey};

/// Concurrency caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Builds running at once, over all projects.
    pub global: usize,
    /// Builds running at once for one project.
    pub per_project: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            global: 8,
            per_project: 4,
        }
    }
}

/// Why a build waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferReason {
    /// The queue is closed for maintenance.
    QueueClosed,
    /// The global cap is reached.
    GlobalCap(usize),
    /// The project's cap is reached.
    ProjectCap(usize),
    /// Another build holds the lock key.
    LockHeld(Option<BuildId>),
    /// An earlier request for the same lock key waits already (FIFO per key).
    BehindEarlier,
    /// The executor cannot launch builds now; the reason in words.
    ExecutorUnavailable(String),
}

impl fmt::Display for DeferReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeferReason::QueueClosed => f.write_str("the queue is closed for maintenance"),
            DeferReason::GlobalCap(cap) => write!(f, "{cap} builds are running (the global cap)"),
            DeferReason::ProjectCap(cap) => {
                write!(
                    f,
                    "{cap} builds of this project are running (the project cap)"
                )
            }
            DeferReason::LockHeld(Some(id)) => write!(f, "the branch is locked by build {id}"),
            DeferReason::LockHeld(None) => f.write_str("the branch is locked"),
            DeferReason::BehindEarlier => f.write_str("an earlier build of this branch is waiting"),
            DeferReason::ExecutorUnavailable(why) => f.write_str(why),
        }
    }
}

/// What runs on this controller now.
#[derive(Debug, Clone, Default)]
pub struct RunningSet {
    builds: HashMap<BuildId, (ProjectKey, Option<LockKey>)>,
    by_project: HashMap<ProjectKey, usize>,
    keys: HashMap<LockKey, BuildId>,
}

impl RunningSet {
    /// Builds running.
    pub fn len(&self) -> usize {
        self.builds.len()
    }

    /// Whether nothing runs.
    pub fn is_empty(&self) -> bool {
        self.builds.is_empty()
    }

    /// Builds of one project running.
    pub fn of_project(&self, project: &ProjectKey) -> usize {
        self.by_project.get(project).copied().unwrap_or(0)
    }

    /// The build holding a key, if one runs here.
    pub fn holder(&self, key: &LockKey) -> Option<BuildId> {
        self.keys.get(key).copied()
    }

    /// Whether a build runs here.
    pub fn contains(&self, id: BuildId) -> bool {
        self.builds.contains_key(&id)
    }

    /// The ids running.
    pub fn ids(&self) -> impl Iterator<Item = BuildId> + '_ {
        self.builds.keys().copied()
    }

    /// Whether caps allow one more build of `project` (ignoring locks).
    pub fn room_for(&self, project: &ProjectKey, caps: Caps) -> Result<(), DeferReason> {
        if self.len() >= caps.global {
            return Err(DeferReason::GlobalCap(caps.global));
        }
        if self.of_project(project) >= caps.per_project {
            return Err(DeferReason::ProjectCap(caps.per_project));
        }
        Ok(())
    }

    /// Records a build as running. Returns false (and changes nothing) if the
    /// id or the key is already running: the caller has a bug or lost a race.
    pub fn start(&mut self, id: BuildId, project: ProjectKey, key: LockKey) -> bool {
        if self.builds.contains_key(&id) || self.keys.contains_key(&key) {
            return false;
        }
        *self.by_project.entry(project.clone()).or_default() += 1;
        self.keys.insert(key.clone(), id);
        self.builds.insert(id, (project, Some(key)));
        true
    }

    /// Lets another build of a running build's key start (the build released
    /// its lock early, as the original `unlock` allowed); the build still
    /// counts against the caps until it finishes.
    pub fn release_key(&mut self, id: BuildId) -> bool {
        let Some((_, key)) = self.builds.get_mut(&id) else {
            return false;
        };
        match key.take() {
            Some(k) => {
                self.keys.remove(&k);
                true
            }
            None => false,
        }
    }

    /// Forgets a build. Returns whether it was running.
    pub fn finish(&mut self, id: BuildId) -> bool {
        let Some((project, key)) = self.builds.remove(&id) else {
            return false;
        };
        if let Some(n) = self.by_project.get_mut(&project) {
            *n -= 1;
            if *n == 0 {
                self.by_project.remove(&project);
            }
        }
        if let Some(key) = key
            && self.keys.get(&key) == Some(&id)
        {
            self.keys.remove(&key);
        }
        true
    }
}

/// What to do with a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try to take the lock and launch.
    TryLaunch,
    /// Defer it, for this reason.
    Defer(DeferReason),
}

/// Decides about a new request. `key_waiting` tells whether an earlier
/// request for the same lock key waits in the deferral queue: a new one
/// queues behind it rather than overtaking it.
pub fn admit(
    running: &RunningSet,
    caps: Caps,
    queue_open: bool,
    project: &ProjectKey,
    key: &LockKey,
    key_waiting: bool,
) -> Decision {
    if !queue_open {
        return Decision::Defer(DeferReason::QueueClosed);
    }
    if key_waiting {
        return Decision::Defer(DeferReason::BehindEarlier);
    }
    if let Some(holder) = running.holder(key) {
        return Decision::Defer(DeferReason::LockHeld(Some(holder)));
    }
    match running.room_for(project, caps) {
        Ok(()) => Decision::TryLaunch,
        Err(reason) => Decision::Defer(reason),
    }
}

/// A deferred request, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The deferred build.
    pub build_id: BuildId,
    /// Its project.
    pub project: ProjectKey,
    /// Its lock key.
    pub lock_key: LockKey,
    /// When it was deferred (FIFO order).
    pub deferred_at: OffsetDateTime,
}

/// Picks the next deferred build to try, or none.
///
/// `waiting` is the queue in FIFO order. Only the first waiting request of each
/// lock key is eligible (FIFO per key); a key that runs here or is in `blocked`
/// (the lock store refused it) is skipped. Among the eligible, projects take
/// turns: the project with the fewest builds running goes first, and between
/// equals, the one whose request has waited longest.
pub fn next_candidate(
    waiting: &[Waiting],
    running: &RunningSet,
    caps: Caps,
    queue_open: bool,
    blocked: &HashSet<LockKey>,
) -> Option<usize> {
    if !queue_open || running.len() >= caps.global {
        return None;
    }
    let mut seen_keys: HashSet<&LockKey> = HashSet::new();
    let mut seen_projects: HashSet<&ProjectKey> = HashSet::new();
    let mut best: Option<(usize, usize)> = None; // (running of project, index)
    for (i, w) in waiting.iter().enumerate() {
        if !seen_keys.insert(&w.lock_key) {
            continue; // an earlier request of this key comes first
        }
        if blocked.contains(&w.lock_key) || running.holder(&w.lock_key).is_some() {
            continue;
        }
        if !seen_projects.insert(&w.project) {
            continue; // this project's earliest eligible request is already considered
        }
        let load = running.of_project(&w.project);
        if load >= caps.per_project {
            continue;
        }
        if best.is_none_or(|(best_load, _)| load < best_load) {
            best = Some((load, i));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pk(p: usize) -> ProjectKey {
        ProjectKey::new("team", &format!("p{p}")).expect("valid")
    }

    fn waiting(p: usize, branch: usize, at: i64) -> Waiting {
        let project = pk(p);
        Waiting {
            build_id: BuildId::new(),
            lock_key: project.lock_key(&format!("b{branch}")),
            project,
            deferred_at: OffsetDateTime::from_unix_timestamp(at).expect("valid"),
        }
    }

    #[test]
    fn admit_defers_for_each_reason() {
        let caps = Caps {
            global: 2,
            per_project: 1,
        };
        let mut running = RunningSet::default();
        let p0 = pk(0);
        let key = p0.lock_key("main");
        assert_eq!(
            admit(&running, caps, false, &p0, &key, false),
            Decision::Defer(DeferReason::QueueClosed)
        );
        assert_eq!(
            admit(&running, caps, true, &p0, &key, true),
            Decision::Defer(DeferReason::BehindEarlier)
        );
        assert_eq!(
            admit(&running, caps, true, &p0, &key, false),
            Decision::TryLaunch
        );
        let id = BuildId::new();
        assert!(running.start(id, p0.clone(), key.clone()));
        assert_eq!(
            admit(&running, caps, true, &p0, &key, false),
            Decision::Defer(DeferReason::LockHeld(Some(id)))
        );
        assert_eq!(
            admit(&running, caps, true, &p0, &p0.lock_key("dev"), false),
            Decision::Defer(DeferReason::ProjectCap(1))
        );
        let p1 = pk(1);
        assert!(running.start(BuildId::new(), p1.clone(), p1.lock_key("main")));
        assert_eq!(
            admit(&running, caps, true, &pk(2), &pk(2).lock_key("main"), false),
            Decision::Defer(DeferReason::GlobalCap(2))
        );
    }

    #[test]
    fn projects_take_turns() {
        let caps = Caps {
            global: 8,
            per_project: 8,
        };
        let mut running = RunningSet::default();
        // project 0 floods the queue first, project 1 asks later
        let mut queue: Vec<Waiting> = (0..5).map(|b| waiting(0, b, b as i64)).collect();
        queue.push(waiting(1, 0, 100));
        let first = next_candidate(&queue, &running, caps, true, &HashSet::new()).expect("one");
        assert_eq!(first, 0);
        let w = queue.remove(first);
        running.start(w.build_id, w.project, w.lock_key);
        let second = next_candidate(&queue, &running, caps, true, &HashSet::new()).expect("one");
        assert_eq!(queue[second].project, pk(1), "the idle project goes next");
    }

    #[test]
    fn only_the_first_request_of_a_key_is_eligible() {
        let caps = Caps::default();
        let running = RunningSet::default();
        let a = waiting(0, 0, 1);
        let b = waiting(0, 0, 2);
        let mut blocked = HashSet::new();
        blocked.insert(a.lock_key.clone());
        assert_eq!(
            next_candidate(&[a, b], &running, caps, true, &blocked),
            None
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit { project: usize, branch: usize },
        Finish(usize),
        Toggle,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..5, 0usize..3).prop_map(|(project, branch)| Op::Submit { project, branch }),
            3 => (0usize..16).prop_map(Op::Finish),
            1 => Just(Op::Toggle),
        ]
    }

    /// A model of the server's scheduler: the same decisions, an in-memory lock table.
    struct Model {
        caps: Caps,
        open: bool,
        running: RunningSet,
        locks: HashMap<LockKey, BuildId>,
        queue: Vec<Waiting>,
        finished: usize,
        accepted: usize,
        clock: i64,
    }

    impl Model {
        fn launch(&mut self, w: Waiting) {
            assert!(!self.locks.contains_key(&w.lock_key), "lock taken twice");
            self.locks.insert(w.lock_key.clone(), w.build_id);
            assert!(self.running.start(w.build_id, w.project, w.lock_key));
            self.check();
        }
        fn check(&self) {
            assert!(
                self.running.len() <= self.caps.global,
                "global cap exceeded"
            );
            for n in self.running.by_project.values() {
                assert!(*n <= self.caps.per_project, "project cap exceeded");
            }
            assert_eq!(
                self.running.keys.len(),
                self.running.len(),
                "two builds of one key"
            );
        }
        fn submit(&mut self, w: Waiting) {
            self.accepted += 1;
            let key_waiting = self.queue.iter().any(|q| q.lock_key == w.lock_key);
            match admit(
                &self.running,
                self.caps,
                self.open,
                &w.project,
                &w.lock_key,
                key_waiting,
            ) {
                Decision::TryLaunch if !self.locks.contains_key(&w.lock_key) => self.launch(w),
                _ => self.queue.push(w),
            }
        }
        fn drain(&mut self) {
            let blocked = HashSet::new();
            while let Some(i) =
                next_candidate(&self.queue, &self.running, self.caps, self.open, &blocked)
            {
                let w = self.queue.remove(i);
                self.launch(w);
            }
        }
        fn finish(&mut self, id: BuildId) {
            let key = self
                .running
                .builds
                .get(&id)
                .and_then(|(_, k)| k.clone())
                .expect("running");
            self.running.finish(id);
            self.locks.remove(&key);
            self.finished += 1;
            self.drain();
        }
    }

    proptest! {
        #[test]
        fn scheduling_never_breaks_caps_or_locks_and_everything_ends(
            ops in proptest::collection::vec(op(), 1..200),
            global in 1usize..6,
            per_project in 1usize..4,
        ) {
            let mut m = Model {
                caps: Caps { global, per_project },
                open: true,
                running: RunningSet::default(),
                locks: HashMap::new(),
                queue: Vec::new(),
                finished: 0,
                accepted: 0,
                clock: 0,
            };
            for op in ops {
                m.clock += 1;
                match op {
                    Op::Submit { project, branch } => {
                        let w = waiting(project, branch, m.clock);
                        m.submit(w);
                    }
                    Op::Finish(n) => {
                        let ids: Vec<BuildId> = m.running.ids().collect();
                        if !ids.is_empty() {
                            let id = ids[n % ids.len()];
                            m.finish(id);
                        }
                    }
                    Op::Toggle => {
                        m.open = !m.open;
                        m.drain();
                    }
                }
                m.check();
            }
            // Open the queue and let everything run out: every accepted request ends.
            m.open = true;
            m.drain();
            loop {
                let next = m.running.ids().next();
                let Some(id) = next else { break };
                m.finish(id);
            }
            prop_assert!(m.queue.is_empty(), "{} requests never ran", m.queue.len());
            prop_assert_eq!(m.finished, m.accepted);
        }
    }
}
