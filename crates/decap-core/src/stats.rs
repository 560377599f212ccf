//! Figures over a project's recent finished builds: how many ended which
//! way, the failure rate, the average duration, and the durations themselves
//! for a small chart.

use crate::build::{Build, BuildId, BuildStatus};

/// The statuses a build ends in.
pub const FINAL: [BuildStatus; 5] = [
    BuildStatus::Succeeded,
    BuildStatus::Failed,
    BuildStatus::Errored,
    BuildStatus::TimedOut,
    BuildStatus::Cancelled,
];

/// One finished build, for the chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// The build.
    pub id: BuildId,
    /// How it ended.
    pub status: BuildStatus,
    /// How long it ran, when it ran at all.
    pub duration_ms: Option<i64>,
}

/// Figures over recent finished builds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectStats {
    /// Finished builds counted.
    pub builds: usize,
    /// Of them, succeeded.
    pub succeeded: usize,
    /// Failed (the script exited non-zero).
    pub failed: usize,
    /// Errored (Decap or the environment failed).
    pub errored: usize,
    /// Ran out of time.
    pub timed_out: usize,
    /// Cancelled (counted, but in no rate).
    pub cancelled: usize,
    /// Failed, errored and timed out over every build that was not cancelled;
    /// `None` when there is none.
    pub failure_rate: Option<f64>,
    /// The mean duration of the builds that succeeded (the time a green build
    /// takes, what a progress estimate wants), else of every build that ran.
    pub average_duration_ms: Option<i64>,
    /// The builds, oldest first.
    pub points: Vec<Point>,
}

impl ProjectStats {
    /// The figures of these builds (any order; unfinished ones are skipped).
    pub fn of(builds: &[Build]) -> ProjectStats {
        let mut finished: Vec<&Build> = builds.iter().filter(|b| b.status.is_final()).collect();
        finished.sort_by_key(|b| (b.queued_at, b.id.to_string()));
        let mut s = ProjectStats {
            builds: finished.len(),
            ..ProjectStats::default()
        };
        for b in &finished {
            match b.status {
                BuildStatus::Succeeded => s.succeeded += 1,
                BuildStatus::Failed => s.failed += 1,
                BuildStatus::Errored => s.errored += 1,
                BuildStatus::TimedOut => s.timed_out += 1,
                BuildStatus::Cancelled => s.cancelled += 1,
                _ => {}
            }
        }
        let rated = s.builds - s.cancelled;
        if rated > 0 {
            s.failure_rate = Some((s.failed + s.errored + s.timed_out) as f64 / rated as f64);
        }
        let mean = |v: Vec<i64>| (!v.is_empty()).then(|| v.iter().sum::<i64>() / v.len() as i64);
        let green: Vec<i64> = finished
            .iter()
            .filter(|b| b.status == BuildStatus::Succeeded)
            .filter_map(|b| b.duration_ms())
            .collect();
        s.average_duration_ms =
            mean(green).or_else(|| mean(finished.iter().filter_map(|b| b.duration_ms()).collect()));
        s.points = finished
            .iter()
            .map(|b| Point {
                id: b.id,
                status: b.status,
                duration_ms: b.duration_ms(),
            })
            .collect();
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::build::Trigger;
    use crate::names::ProjectKey;
    use crate::refs::GitRef;
    use time::{Duration, OffsetDateTime};

    fn finished(status: BuildStatus, secs: i64, at: i64) -> Build {
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::hours(at);
        let mut b = Build::new(
            ProjectKey::new("acme", "app").unwrap(),
            &GitRef::branch("main").unwrap(),
            None,
            Trigger::Manual,
            t0,
        );
        if status != BuildStatus::Cancelled {
            b.transition(BuildStatus::Running, t0).unwrap();
        }
        b.transition(status, t0 + Duration::seconds(secs)).unwrap();
        b
    }

    #[test]
    fn rates_and_averages_leave_out_what_they_should() {
        let builds = vec![
            finished(BuildStatus::Succeeded, 10, 3),
            finished(BuildStatus::Failed, 100, 1),
            finished(BuildStatus::Succeeded, 20, 2),
            finished(BuildStatus::Cancelled, 0, 4),
            finished(BuildStatus::TimedOut, 300, 5),
        ];
        let s = ProjectStats::of(&builds);
        assert_eq!(s.builds, 5);
        assert_eq!(
            (s.succeeded, s.failed, s.timed_out, s.cancelled),
            (2, 1, 1, 1)
        );
        assert_eq!(
            s.failure_rate,
            Some(0.5),
            "2 of the 4 that were not cancelled"
        );
        assert_eq!(
            s.average_duration_ms,
            Some(15_000),
            "the green builds' mean"
        );
        let order: Vec<Option<i64>> = s.points.iter().map(|p| p.duration_ms).collect();
        assert_eq!(
            order,
            vec![
                Some(100_000),
                Some(20_000),
                Some(10_000),
                None,
                Some(300_000)
            ],
            "oldest first"
        );
    }

    #[test]
    fn no_builds_no_figures() {
        let s = ProjectStats::of(&[]);
        assert_eq!(s.failure_rate, None);
        assert_eq!(s.average_duration_ms, None);
        let red = ProjectStats::of(&[finished(BuildStatus::Failed, 7, 1)]);
        assert_eq!(
            red.average_duration_ms,
            Some(7_000),
            "no green build: every build's mean"
        );
        assert_eq!(red.failure_rate, Some(1.0));
    }
}
