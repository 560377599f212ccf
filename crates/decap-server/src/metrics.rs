//! Prometheus metrics.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label with one value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The value.
    pub status: String,
}

/// A webhook outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `built`, `ignored`, `duplicate`, `unauthorized`, `malformed`, ...
    pub outcome: String,
}

/// Decap's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Builds by status (set at scrape time from the build store).
    pub builds: Family<StatusLabel, Gauge>,
    /// Builds finished, by final status.
    pub builds_finished: Family<StatusLabel, Counter>,
    /// Deferred builds waiting.
    pub queue_depth: Gauge,
    /// Locks held.
    pub locks_held: Gauge,
    /// Builds running on this controller.
    pub running: Gauge,
    /// Webhooks by outcome.
    pub webhooks: Family<OutcomeLabel, Counter>,
    /// Time to answer a webhook.
    pub webhook_seconds: Histogram,
    /// Time from acceptance to launch.
    pub launch_seconds: Histogram,
    /// Build durations.
    pub build_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("decap")),
            builds: Family::default(),
            builds_finished: Family::default(),
            queue_depth: Gauge::default(),
            locks_held: Gauge::default(),
            running: Gauge::default(),
            webhooks: Family::default(),
            webhook_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            launch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 20)),
            build_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 22)),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register("builds", "Builds by status", m.builds.clone());
            r.register(
                "builds_finished",
                "Builds finished, by final status",
                m.builds_finished.clone(),
            );
            r.register(
                "queue_depth",
                "Deferred builds waiting",
                m.queue_depth.clone(),
            );
            r.register("locks_held", "Branch locks held", m.locks_held.clone());
            r.register(
                "running_builds",
                "Builds running on this controller",
                m.running.clone(),
            );
            r.register("webhooks", "GitHub webhooks by outcome", m.webhooks.clone());
            r.register(
                "webhook_duration_seconds",
                "Time to accept a webhook",
                m.webhook_seconds.clone(),
            );
            r.register(
                "launch_delay_seconds",
                "Time from acceptance to launch",
                m.launch_seconds.clone(),
            );
            r.register(
                "build_duration_seconds",
                "Build run time",
                m.build_seconds.clone(),
            );
        }
        m
    }
}

impl Metrics {
    /// Counts a webhook outcome.
    pub fn webhook(&self, outcome: &str) {
        self.webhooks
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
