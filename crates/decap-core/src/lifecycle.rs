//! A build's life, decided in one place.
//!
//! [`decide`] takes a build as it stands and one [`Event`], and answers with
//! a [`Step`]: the record to write (a compare-and-set on the status it was
//! read with) and the [`Effect`]s the controller carries out around the
//! write. It does no IO; the controller (and bctool on its direct path to
//! the stores) interprets the step. When the write loses to another writer,
//! the interpreter reads the record again and decides the same event again,
//! so what happens always follows the record as it is, not as it was.
//!
//! The rules a build lives by:
//! * A status only moves forward ([`BuildStatus::can_become`]); a final
//!   build never changes again.
//! * A running build ends only once its environment is gone, so its lock
//!   and its place under the caps are freed when none of its processes is
//!   left. How it ended may be reported earlier (bctool's result, a
//!   cancel): the outcome is kept on the record, the first one reported
//!   wins, and it is taken when the environment is gone.
//! * Whatever frees room (a build ends, a lock is released) asks for the
//!   deferred builds to be resubmitted.

use time::OffsetDateTime;

use crate::build::{Build, BuildId, BuildStatus, Outcome};
use crate::limits::LimitHit;
use crate::{Error, Result};

/// What happens to a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It must wait on the deferral queue, for `reason`.
    Defer {
        /// Why, in words (shown while it waits).
        reason: String,
    },
    /// The same branch and commit already waits as build `other`: this
    /// request does not wait beside it.
    AlreadyWaiting {
        /// The build that waits.
        other: BuildId,
    },
    /// Its lock was taken and it is handed to an executor.
    Launch(Launch),
    /// It cannot launch (its project left the build scripts or is invalid).
    Refuse {
        /// Why, in words.
        message: String,
    },
    /// The executor could not start its environment.
    LaunchFailed {
        /// The executor's error.
        error: String,
    },
    /// How it ended, reported while its environment may still run: bctool's
    /// result, or the script's `record-build-metadata`.
    Report(Outcome),
    /// A person (or the API) cancels it.
    Cancel,
    /// Its environment is gone.
    EnvironmentGone(Gone),
    /// Its script releases its lock before the build ends (`bctool unlock`).
    Unlock,
}

impl Event {
    /// The environment ended (exited or was stopped) for `reason`, running
    /// into no limit.
    pub fn exited(reason: impl Into<String>) -> Event {
        Event::EnvironmentGone(Gone::Exited {
            reason: reason.into(),
            limits: Vec::new(),
        })
    }
}

/// What a launch records on the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The fencing token of the lock it runs under.
    pub fencing_token: u64,
    /// SHA-256 (hex) of the token its bctool gets.
    pub token_sha256: String,
    /// The build-scripts commit it runs.
    pub scripts_commit: String,
    /// The executor's name.
    pub executor: String,
    /// The sandbox the executor uses.
    pub sandbox: String,
}

/// How an environment went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// It ended (the build's processes exited, or were stopped).
    Exited {
        /// Why, as the executor saw it.
        reason: String,
        /// The limits the build ran into.
        limits: Vec<LimitHit>,
    },
    /// Decap stopped while the build ran, and the environment was not there
    /// at the next start.
    LostInRestart,
}

/// Something the controller does for a step, besides writing the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Put the build on the deferral queue.
    Enqueue,
    /// Take the build off the deferral queue.
    Dequeue,
    /// Count the build under this controller's caps and open its live log.
    Hold,
    /// Start the build's environment.
    StartEnvironment,
    /// Stop the build's environment now (TERM, the grace period, KILL), then
    /// end the build ([`Event::EnvironmentGone`]).
    StopEnvironment,
    /// End the build at once if its environment is already gone; otherwise
    /// stop it if it is still there after the grace period (the script
    /// reported and went on).
    StopAfterGrace,
    /// Release the build's lock.
    ReleaseLock,
    /// The build no longer counts under this controller's caps, and its
    /// lock key is no longer taken here.
    LeaveCaps,
    /// Only its lock key is no longer taken here (it still counts under the
    /// caps).
    LeaveKey,
    /// Store the live console as the build's log if none was uploaded, and
    /// drop the spool.
    KeepLog,
    /// Count the build as finished in the metrics.
    CountFinished,
    /// Tell live views of the new record.
    Publish,
    /// Room was freed: resubmit deferred builds.
    Drain,
}

/// What to do for one event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// The record to write, a compare-and-set on the status the build was
    /// read with; `None` when the record stays as it is.
    pub write: Option<Build>,
    /// Done together with the write (concurrently), whether it wins or not:
    /// each is idempotent, and a writer that won instead does them too.
    pub with_write: Vec<Effect>,
    /// Done once the write has won, or at once when nothing is written.
    pub then: Vec<Effect>,
}

impl Step {
    fn nothing() -> Step {
        Step::default()
    }

    /// Every effect of the step, in order.
    pub fn effects(&self) -> impl Iterator<Item = Effect> + '_ {
        self.with_write.iter().chain(&self.then).copied()
    }

    /// Whether the step does `effect`.
    pub fn does(&self, effect: Effect) -> bool {
        self.effects().any(|e| e == effect)
    }

    /// Whether the step changes nothing but the record and the build's
    /// environment: no lock, no queue, no place under the caps. Such a step
    /// need not wait for the scheduling that launches builds.
    pub fn only_record_and_environment(&self) -> bool {
        self.effects().all(|e| {
            matches!(
                e,
                Effect::Publish | Effect::StopEnvironment | Effect::StopAfterGrace
            )
        })
    }
}

/// What ending a running build does besides writing it: the lock goes with
/// the write, then its place under the caps, its log, the metrics, the
/// views and the queue.
fn end_running(b: Build) -> Step {
    Step {
        write: Some(b),
        with_write: vec![Effect::ReleaseLock],
        then: vec![
            Effect::LeaveCaps,
            Effect::KeepLog,
            Effect::CountFinished,
            Effect::Publish,
            Effect::Drain,
        ],
    }
}

/// The outcome a running build takes when its environment is gone: the one
/// reported, or errored; limits it ran into are named first, and a build
/// that hit one did not succeed.
pub fn outcome_when_gone(b: &Build, gone: &Gone) -> Outcome {
    match gone {
        Gone::LostInRestart => b.reported.clone().unwrap_or(Outcome {
            status: BuildStatus::Errored,
            exit_code: None,
            message: Some(
                "Decap stopped while this build ran; its build environment is gone".into(),
            ),
            phases: Vec::new(),
        }),
        Gone::Exited { reason, limits } => {
            let outcome = b.reported.clone().unwrap_or(Outcome {
                status: BuildStatus::Errored,
                exit_code: None,
                message: Some(format!(
                    "the build environment ended without reporting a result: {reason}"
                )),
                phases: Vec::new(),
            });
            with_limits(outcome, limits)
        }
    }
}

/// An outcome with the limits the build ran into named first: a build
/// that hit one did not succeed.
pub fn with_limits(mut outcome: Outcome, limits: &[LimitHit]) -> Outcome {
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
    outcome
}

/// The outcome of a script's result: its exit code, or timed out.
pub fn outcome_of_result(exit_code: i32, timed_out: bool, message: Option<String>) -> Outcome {
    Outcome {
        status: if timed_out {
            BuildStatus::TimedOut
        } else {
            BuildStatus::from_exit_code(exit_code)
        },
        exit_code: Some(exit_code),
        message,
        phases: Vec::new(),
    }
}

/// `b` ended as `outcome`, written from its current status.
fn ended(mut b: Build, outcome: Outcome, now: OffsetDateTime) -> Result<Build> {
    let prev = b.status;
    b.transition(outcome.status, now)?;
    if outcome.exit_code.is_some() {
        b.exit_code = outcome.exit_code;
    }
    if !outcome.phases.is_empty() {
        b.phases = outcome.phases;
    }
    // A deferred build's message says why it waited: it no longer does.
    b.message = outcome.message.or(if prev == BuildStatus::Deferred {
        None
    } else {
        b.message.take()
    });
    Ok(b)
}

/// Decides what `event` does to `build`, as read from the store. `held` says
/// whether this controller counts the build as running (under its caps).
///
/// An event that makes no sense for the build's status is refused with
/// `Conflict` when a person asked for it (cancelling an ended build,
/// launching a running one) and is a no-op when it is news from the world
/// that arrived late (an environment gone, a result reported, after the
/// build ended).
pub fn decide(build: &Build, held: bool, event: Event, now: OffsetDateTime) -> Result<Step> {
    use BuildStatus::*;
    let b = build.clone();
    let status = b.status;
    match event {
        Event::Defer { reason } => {
            let mut b = b;
            b.transition(Deferred, now)?;
            b.message = Some(reason);
            Ok(Step {
                write: Some(b),
                with_write: vec![Effect::Enqueue],
                then: vec![Effect::Publish],
            })
        }
        Event::AlreadyWaiting { other } => {
            if !matches!(status, Queued | Deferred) {
                return Err(conflict(build, "does not wait"));
            }
            let b = ended(
                b,
                Outcome {
                    status: Cancelled,
                    exit_code: None,
                    message: Some(format!(
                        "not queued: the same branch and commit already waits as build {other}"
                    )),
                    phases: Vec::new(),
                },
                now,
            )?;
            Ok(Step {
                write: Some(b),
                with_write: vec![],
                then: vec![Effect::Publish],
            })
        }
        Event::Launch(l) => {
            let mut b = b;
            if status == Deferred {
                b.transition(Queued, now)?;
            }
            b.transition(Running, now)?;
            b.scripts_commit = Some(l.scripts_commit);
            b.executor = Some(l.executor);
            b.sandbox = Some(l.sandbox);
            b.fencing_token = Some(l.fencing_token);
            b.token_sha256 = Some(l.token_sha256);
            b.message = None;
            Ok(Step {
                write: Some(b),
                with_write: vec![Effect::Hold, Effect::StartEnvironment],
                then: vec![Effect::Publish],
            })
        }
        Event::Refuse { message } => {
            if !matches!(status, Queued | Deferred) {
                // It stopped waiting meanwhile (cancelled): only the lock
                // taken for it goes back.
                return Ok(Step {
                    write: None,
                    with_write: vec![Effect::ReleaseLock],
                    then: vec![],
                });
            }
            let b = ended(
                b,
                Outcome {
                    status: Errored,
                    exit_code: None,
                    message: Some(message),
                    phases: Vec::new(),
                },
                now,
            )?;
            Ok(Step {
                write: Some(b),
                with_write: vec![Effect::ReleaseLock],
                then: vec![Effect::CountFinished, Effect::Publish],
            })
        }
        Event::LaunchFailed { error } => {
            if status != Running {
                return Ok(Step::nothing());
            }
            // Reported meanwhile (cancelled while starting): that stands.
            let outcome = b.reported.clone().unwrap_or(Outcome {
                status: Errored,
                exit_code: None,
                message: Some(format!("the executor could not start the build: {error}")),
                phases: Vec::new(),
            });
            Ok(end_running(ended(b, outcome, now)?))
        }
        Event::Report(outcome) => {
            if status != Running {
                return Ok(Step::nothing());
            }
            if !outcome.status.is_final() {
                return Err(Error::invalid(
                    "status",
                    format!("a build cannot be reported {}", outcome.status),
                ));
            }
            let write = b.reported.is_none().then(|| {
                let mut b = b;
                b.reported = Some(outcome);
                b
            });
            Ok(Step {
                write,
                with_write: vec![],
                then: vec![Effect::StopAfterGrace],
            })
        }
        Event::Cancel => match status {
            Queued | Deferred => {
                let b = ended(
                    b,
                    Outcome {
                        status: Cancelled,
                        exit_code: None,
                        message: Some("cancelled".into()),
                        phases: Vec::new(),
                    },
                    now,
                )?;
                let mut then = Vec::new();
                if status == Deferred {
                    then.push(Effect::Dequeue);
                }
                then.extend([Effect::CountFinished, Effect::Publish, Effect::Drain]);
                Ok(Step {
                    write: Some(b),
                    with_write: vec![],
                    then,
                })
            }
            Running => {
                let write = b.reported.is_none().then(|| {
                    let mut b = b;
                    b.reported = Some(Outcome {
                        status: Cancelled,
                        exit_code: None,
                        message: Some("cancelled".into()),
                        phases: Vec::new(),
                    });
                    b
                });
                Ok(Step {
                    write,
                    with_write: vec![],
                    then: vec![Effect::StopEnvironment],
                })
            }
            _ => Err(Error::Conflict(format!(
                "build {} has already ended ({status})",
                build.id
            ))),
        },
        Event::EnvironmentGone(gone) => match status {
            Running => {
                let outcome = outcome_when_gone(&b, &gone);
                Ok(end_running(ended(b, outcome, now)?))
            }
            // Ended without this controller (bctool of an earlier release
            // recorded its result straight in the store, or another replica
            // finished it): what this controller holds for it goes.
            s if s.is_final() && held => Ok(Step {
                write: None,
                with_write: vec![],
                then: vec![
                    Effect::ReleaseLock,
                    Effect::LeaveCaps,
                    Effect::KeepLog,
                    Effect::CountFinished,
                    Effect::Publish,
                    Effect::Drain,
                ],
            }),
            _ => Ok(Step::nothing()),
        },
        Event::Unlock => {
            if status != Running {
                return Ok(Step::nothing());
            }
            Ok(Step {
                write: None,
                with_write: vec![],
                then: vec![Effect::ReleaseLock, Effect::LeaveKey, Effect::Drain],
            })
        }
    }
}

fn conflict(b: &Build, what: &str) -> Error {
    Error::Conflict(format!("build {} is {} and {what}", b.id, b.status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Trigger;
    use crate::names::ProjectKey;
    use crate::refs::GitRef;
    use BuildStatus::*;
    use proptest::prelude::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s)
    }

    fn queued() -> Build {
        Build::new(
            ProjectKey::new("acme", "widgets").expect("valid"),
            &GitRef::branch("main").expect("valid"),
            Some("abc".into()),
            Trigger::Webhook,
            t(0),
        )
    }

    fn launch() -> Event {
        Event::Launch(Launch {
            fencing_token: 7,
            token_sha256: "00".repeat(32),
            scripts_commit: "s1".into(),
            executor: "local".into(),
            sandbox: "bubblewrap".into(),
        })
    }

    fn exited(reason: &str) -> Event {
        Event::exited(reason)
    }

    fn succeeded() -> Outcome {
        outcome_of_result(0, false, None)
    }

    /// Applies a step as a store that took the write would.
    fn apply(b: &Build, step: &Step) -> Build {
        step.write.clone().unwrap_or_else(|| b.clone())
    }

    fn at(status: BuildStatus) -> Build {
        let mut b = queued();
        match status {
            Queued => {}
            Deferred => b.transition(Deferred, t(1)).expect("ok"),
            Running => b.transition(Running, t(1)).expect("ok"),
            s => {
                b.transition(Running, t(1)).expect("ok");
                b.transition(s, t(2)).expect("ok");
            }
        }
        b
    }

    #[test]
    fn the_state_machine_is_exactly_this_table() {
        // Every pair of statuses, spelled out: a move that is not listed
        // here is refused.
        let allowed = [
            (Queued, Deferred),
            (Queued, Running),
            (Queued, Cancelled),
            (Queued, Errored),
            (Deferred, Queued),
            (Deferred, Cancelled),
            (Deferred, Errored),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Errored),
            (Running, Cancelled),
            (Running, TimedOut),
        ];
        for from in BuildStatus::ALL {
            for to in BuildStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    /// One row: a build at `from` (reported or not, held here or not), an
    /// event, and the status written (`None`: nothing written), whether the
    /// outcome is kept as reported, and the effects.
    struct Row {
        from: BuildStatus,
        reported: bool,
        held: bool,
        event: Event,
        writes: Option<BuildStatus>,
        keeps_report: bool,
        effects: &'static [Effect],
    }

    #[test]
    fn what_each_event_does_in_each_state() {
        use Effect::*;
        let rows = [
            Row {
                from: Queued,
                reported: false,
                held: false,
                event: Event::Defer {
                    reason: "cap".into(),
                },
                writes: Some(Deferred),
                keeps_report: false,
                effects: &[Enqueue, Publish],
            },
            Row {
                from: Queued,
                reported: false,
                held: false,
                event: launch(),
                writes: Some(Running),
                keeps_report: false,
                effects: &[Hold, StartEnvironment, Publish],
            },
            Row {
                from: Deferred,
                reported: false,
                held: false,
                event: launch(),
                writes: Some(Running),
                keeps_report: false,
                effects: &[Hold, StartEnvironment, Publish],
            },
            Row {
                from: Deferred,
                reported: false,
                held: false,
                event: Event::Refuse {
                    message: "gone".into(),
                },
                writes: Some(Errored),
                keeps_report: false,
                effects: &[ReleaseLock, CountFinished, Publish],
            },
            Row {
                from: Cancelled,
                reported: false,
                held: false,
                event: Event::Refuse {
                    message: "gone".into(),
                },
                writes: None,
                keeps_report: false,
                effects: &[ReleaseLock],
            },
            Row {
                from: Queued,
                reported: false,
                held: false,
                event: Event::AlreadyWaiting {
                    other: BuildId::new(),
                },
                writes: Some(Cancelled),
                keeps_report: false,
                effects: &[Publish],
            },
            Row {
                from: Running,
                reported: false,
                held: true,
                event: Event::LaunchFailed { error: "no".into() },
                writes: Some(Errored),
                keeps_report: false,
                effects: &[
                    ReleaseLock,
                    LeaveCaps,
                    KeepLog,
                    CountFinished,
                    Publish,
                    Drain,
                ],
            },
            Row {
                from: Running,
                reported: false,
                held: true,
                event: Event::Report(succeeded()),
                writes: Some(Running),
                keeps_report: true,
                effects: &[StopAfterGrace],
            },
            Row {
                from: Running,
                reported: true,
                held: true,
                event: Event::Report(succeeded()),
                writes: None,
                keeps_report: true,
                effects: &[StopAfterGrace],
            },
            Row {
                from: Succeeded,
                reported: false,
                held: false,
                event: Event::Report(succeeded()),
                writes: None,
                keeps_report: false,
                effects: &[],
            },
            Row {
                from: Queued,
                reported: false,
                held: false,
                event: Event::Cancel,
                writes: Some(Cancelled),
                keeps_report: false,
                effects: &[CountFinished, Publish, Drain],
            },
            Row {
                from: Deferred,
                reported: false,
                held: false,
                event: Event::Cancel,
                writes: Some(Cancelled),
                keeps_report: false,
                effects: &[Dequeue, CountFinished, Publish, Drain],
            },
            Row {
                from: Running,
                reported: false,
                held: true,
                event: Event::Cancel,
                writes: Some(Running),
                keeps_report: true,
                effects: &[StopEnvironment],
            },
            Row {
                from: Running,
                reported: false,
                held: true,
                event: exited("exit 0"),
                writes: Some(Errored),
                keeps_report: false,
                effects: &[
                    ReleaseLock,
                    LeaveCaps,
                    KeepLog,
                    CountFinished,
                    Publish,
                    Drain,
                ],
            },
            Row {
                from: Running,
                reported: true,
                held: false,
                event: Event::EnvironmentGone(Gone::LostInRestart),
                writes: Some(Succeeded),
                keeps_report: true,
                effects: &[
                    ReleaseLock,
                    LeaveCaps,
                    KeepLog,
                    CountFinished,
                    Publish,
                    Drain,
                ],
            },
            Row {
                from: Failed,
                reported: false,
                held: true,
                event: exited("exit 1"),
                writes: None,
                keeps_report: false,
                effects: &[
                    ReleaseLock,
                    LeaveCaps,
                    KeepLog,
                    CountFinished,
                    Publish,
                    Drain,
                ],
            },
            Row {
                from: Failed,
                reported: false,
                held: false,
                event: exited("exit 1"),
                writes: None,
                keeps_report: false,
                effects: &[],
            },
            Row {
                from: Deferred,
                reported: false,
                held: false,
                event: exited("?"),
                writes: None,
                keeps_report: false,
                effects: &[],
            },
            Row {
                from: Running,
                reported: false,
                held: true,
                event: Event::Unlock,
                writes: None,
                keeps_report: false,
                effects: &[ReleaseLock, LeaveKey, Drain],
            },
            Row {
                from: Succeeded,
                reported: false,
                held: false,
                event: Event::Unlock,
                writes: None,
                keeps_report: false,
                effects: &[],
            },
        ];
        for (i, row) in rows.into_iter().enumerate() {
            let mut b = at(row.from);
            if row.reported {
                b.reported = Some(succeeded());
            }
            let step = decide(&b, row.held, row.event.clone(), t(5))
                .unwrap_or_else(|e| panic!("row {i} ({:?}): {e}", row.event));
            assert_eq!(
                step.write.as_ref().map(|w| w.status),
                row.writes,
                "row {i}: {:?}",
                row.event
            );
            if let Some(w) = &step.write {
                assert_eq!(w.reported.is_some(), row.keeps_report, "row {i}");
                assert_eq!(w.id, b.id, "row {i}");
            }
            let effects: Vec<Effect> = step.effects().collect();
            assert_eq!(effects, row.effects, "row {i}: {:?}", row.event);
            let only_record = matches!(row.event, Event::Report(_))
                || (matches!(row.event, Event::Cancel) && row.from == Running);
            assert_eq!(
                step.only_record_and_environment(),
                only_record || row.effects.iter().all(|e| *e == Publish),
                "row {i}"
            );
        }
    }

    #[test]
    fn what_a_person_cannot_ask_for_is_refused() {
        for s in [Succeeded, Failed, Errored, Cancelled, TimedOut] {
            let err = decide(&at(s), false, Event::Cancel, t(5)).expect_err("ended");
            assert!(matches!(err, Error::Conflict(_)), "{err}");
            assert!(decide(&at(s), false, launch(), t(5)).is_err());
            assert!(decide(&at(s), false, Event::Defer { reason: "x".into() }, t(5)).is_err());
        }
        assert!(decide(&at(Running), true, launch(), t(5)).is_err());
        assert!(
            decide(
                &at(Deferred),
                false,
                Event::Defer { reason: "x".into() },
                t(5)
            )
            .is_err()
        );
        let not_final = Outcome {
            status: Running,
            exit_code: None,
            message: None,
            phases: Vec::new(),
        };
        assert!(decide(&at(Running), true, Event::Report(not_final), t(5)).is_err());
    }

    #[test]
    fn a_report_is_taken_when_the_environment_is_gone_and_the_first_one_wins() {
        let mut b = at(Running);
        b.message = Some("upload failed".into());
        let failed = outcome_of_result(3, false, Some("exit 3".into()));
        b = apply(
            &b,
            &decide(&b, true, Event::Report(failed.clone()), t(3)).expect("ok"),
        );
        assert_eq!(
            b.status, Running,
            "still running: its processes may be there"
        );
        b = apply(&b, &decide(&b, true, Event::Cancel, t(4)).expect("ok"));
        b = apply(&b, &decide(&b, true, exited("stopped"), t(6)).expect("ok"));
        assert_eq!(b.status, Failed);
        assert_eq!(b.exit_code, Some(3));
        assert_eq!(b.message.as_deref(), Some("exit 3"));
        assert_eq!(
            b.end_time,
            Some(t(6)),
            "ended when its environment was gone"
        );
    }

    #[test]
    fn a_limit_hit_is_named_and_the_build_did_not_succeed() {
        let mut b = at(Running);
        b.reported = Some(succeeded());
        let gone = Event::EnvironmentGone(Gone::Exited {
            reason: "exit 0".into(),
            limits: vec![LimitHit::Pids(64)],
        });
        let b = apply(&b, &decide(&b, true, gone, t(3)).expect("ok"));
        assert_eq!(b.status, Failed);
        assert!(b.message.as_deref().unwrap_or("").contains("64"), "{b:?}");
        // A timeout stays a timeout.
        let mut t_out = at(Running);
        t_out.reported = Some(outcome_of_result(124, true, None));
        let gone = Event::EnvironmentGone(Gone::Exited {
            reason: "killed".into(),
            limits: vec![LimitHit::Memory(1 << 20)],
        });
        assert_eq!(
            apply(&t_out, &decide(&t_out, true, gone, t(3)).expect("ok")).status,
            TimedOut
        );
    }

    #[test]
    fn unreported_ends_say_why() {
        let b = at(Running);
        let lost = apply(
            &b,
            &decide(&b, false, Event::EnvironmentGone(Gone::LostInRestart), t(3)).expect("ok"),
        );
        assert_eq!(lost.status, Errored);
        assert!(lost.message.unwrap_or_default().contains("Decap stopped"));
        let gone = apply(&b, &decide(&b, true, exited("OOM"), t(3)).expect("ok"));
        assert_eq!(
            gone.message.as_deref(),
            Some("the build environment ended without reporting a result: OOM")
        );
        let failed = apply(
            &b,
            &decide(
                &b,
                true,
                Event::LaunchFailed {
                    error: "no image".into(),
                },
                t(3),
            )
            .expect("ok"),
        );
        assert_eq!(failed.status, Errored);
        assert_eq!(
            failed.message.as_deref(),
            Some("the executor could not start the build: no image")
        );
    }

    #[test]
    fn a_deferred_build_runs_through_queued_and_forgets_why_it_waited() {
        let mut b = queued();
        b = apply(
            &b,
            &decide(
                &b,
                false,
                Event::Defer {
                    reason: "cap".into(),
                },
                t(1),
            )
            .expect("ok"),
        );
        assert_eq!(b.message.as_deref(), Some("cap"));
        let cancelled = apply(&b, &decide(&b, false, Event::Cancel, t(2)).expect("ok"));
        assert_eq!(cancelled.message.as_deref(), Some("cancelled"));
        b = apply(&b, &decide(&b, false, launch(), t(2)).expect("ok"));
        assert_eq!(b.status, Running);
        assert_eq!(b.message, None);
        assert_eq!(b.start_time, Some(t(2)));
        assert_eq!(b.fencing_token, Some(7));
        assert_eq!(b.scripts_commit.as_deref(), Some("s1"));
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Defer {
                reason: "cap".into()
            }),
            Just(Event::AlreadyWaiting {
                other: BuildId::new()
            }),
            Just(launch()),
            Just(Event::Refuse {
                message: "gone".into()
            }),
            Just(Event::LaunchFailed { error: "no".into() }),
            (0i32..3, any::<bool>())
                .prop_map(|(c, t)| Event::Report(outcome_of_result(c, t, None))),
            Just(Event::Cancel),
            Just(exited("exit")),
            Just(Event::EnvironmentGone(Gone::LostInRestart)),
            Just(Event::EnvironmentGone(Gone::Exited {
                reason: "oom".into(),
                limits: vec![LimitHit::Memory(1)],
            })),
            Just(Event::Unlock),
        ]
    }

    proptest! {
        /// Whatever happens, in whatever order, with writes that win or lose
        /// to another writer: a build moves only forward, never leaves a final
        /// status, frees its lock and its place exactly when it stops
        /// running, takes the first outcome reported, and is counted
        /// finished once.
        #[test]
        fn any_history_keeps_the_rules(
            events in prop::collection::vec((any_event(), any::<bool>()), 0..24)
        ) {
            let mut b = queued();
            let mut held = false;
            let mut locked = false;
            let mut finished_counted = 0;
            let mut first_report: Option<Outcome> = None;
            for (i, (event, wins)) in events.into_iter().enumerate() {
                let before = b.clone();
                let Ok(step) = decide(&b, held, event.clone(), t(i as i64 + 1)) else {
                    // Refused: a person asked for what this state cannot do.
                    prop_assert!(matches!(event, Event::Cancel | Event::Launch(_)
                        | Event::Defer { .. } | Event::AlreadyWaiting { .. }),
                        "{event:?} refused at {}", b.status);
                    continue;
                };
                // A write that loses changes nothing here (the other writer's
                // change is not modelled; `wins` only drops ours).
                let won = step.write.is_none() || wins;
                if let Some(w) = step.write.as_ref().filter(|_| won) {
                    prop_assert!(w.status == before.status || before.status.can_become(w.status)
                        || (before.status == Deferred && w.status == Running),
                        "{} -> {}", before.status, w.status);
                    prop_assert!(!before.status.is_final(), "a final build was written");
                    if w.status == Running && before.status == Running {
                        prop_assert_eq!(&w.reported, &first_report.clone().or(w.reported.clone()));
                    }
                    b = w.clone();
                }
                if matches!(event, Event::Report(_) | Event::Cancel) && before.status == Running && won
                    && first_report.is_none()
                {
                    first_report = b.reported.clone();
                }
                for e in step.with_write.iter().chain(if won { &step.then[..] } else { &[][..] }) {
                    match e {
                        Effect::Hold => { prop_assert!(!held); held = true; locked = true; }
                        Effect::LeaveCaps => { held = false; }
                        Effect::ReleaseLock => { locked = false; }
                        Effect::CountFinished => {
                            prop_assert!(b.status.is_final());
                            finished_counted += 1;
                        }
                        Effect::StartEnvironment | Effect::StopEnvironment | Effect::StopAfterGrace => {
                            // Only a running build has an environment to start or stop.
                            let meant = step.write.as_ref().map_or(b.status, |w| w.status);
                            prop_assert_eq!(meant, Running);
                        }
                        _ => {}
                    }
                }
                if !won && step.does(Effect::Hold) {
                    // The launch lost: the interpreter takes it back.
                    held = false;
                    locked = false;
                }
                if b.status.is_final() {
                    prop_assert!(!locked, "an ended build keeps its lock ({event:?})");
                    prop_assert!(!held, "an ended build keeps its place ({event:?})");
                }
                if before.status == Running
                    && b.status.is_final()
                    && let Some(r) = &first_report
                {
                    let limited = matches!(&event,
                        Event::EnvironmentGone(Gone::Exited { limits, .. }) if !limits.is_empty());
                    let expect = if limited && matches!(r.status, Succeeded | Errored) {
                        Failed
                    } else {
                        r.status
                    };
                    prop_assert_eq!(b.status, expect, "the first outcome reported is taken");
                }
            }
            prop_assert!(finished_counted <= 1, "counted finished {finished_counted} times");
        }
    }
}
