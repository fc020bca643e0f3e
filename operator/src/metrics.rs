//! The operator's own Prometheus metrics.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

pub struct Metrics {
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    pub reconcile_duration: Histogram,
    /// Reconciles running now: the depth of the work queue being worked
    /// (the controller runs every due reconcile at once).
    pub reconciles_in_flight: Gauge,
    pub status_writes: Counter,
    /// Child objects created, replaced or deleted (desired changes and drift repairs).
    pub child_writes: Counter,
    pub status_probes: Counter,
    pub status_probe_failures: Counter,
    /// Words from clusterd that its status changed (`wire::CHANGED_PATH`).
    pub status_changes_told: Counter,
    pub leader: Gauge,
    /// ClusteredServices this process keeps per-object bookkeeping for.
    pub tracked_objects: Gauge,
    /// The clusterd update's wave: services `waiting`, `rolling`, and
    /// `stopped` (1 while a failed rollout holds the wave).
    pub clusterd_updates: Family<StateLabel, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            reconciles_in_flight: Gauge::default(),
            status_writes: Counter::default(),
            child_writes: Counter::default(),
            status_probes: Counter::default(),
            status_probe_failures: Counter::default(),
            status_changes_told: Counter::default(),
            leader: Gauge::default(),
            tracked_objects: Gauge::default(),
            clusterd_updates: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("clustered_operator");
        r.register("reconciles", "Reconciles by result", metrics.reconciles.clone());
        r.register("reconcile_errors", "Failed reconciles by error kind", metrics.reconcile_errors.clone());
        r.register("reconcile_duration_seconds", "Time per reconcile", metrics.reconcile_duration.clone());
        r.register("reconciles_in_flight", "Reconciles running now", metrics.reconciles_in_flight.clone());
        r.register("status_writes", "Status updates written to the API server", metrics.status_writes.clone());
        r.register(
            "child_writes",
            "Child objects created, replaced or deleted (spec changes and drift repairs)",
            metrics.child_writes.clone(),
        );
        r.register("status_probes", "clusterd /status requests", metrics.status_probes.clone());
        r.register(
            "status_changes_told",
            "Words from clusterd that its status changed (each makes its service's pods asked again)",
            metrics.status_changes_told.clone(),
        );
        r.register(
            "status_probe_failures",
            "clusterd /status requests that failed",
            metrics.status_probe_failures.clone(),
        );
        r.register("leader", "1 while this replica holds the leader lease", metrics.leader.clone());
        r.register(
            "tracked_objects",
            "ClusteredServices with in-memory bookkeeping (write coalescing, backoff)",
            metrics.tracked_objects.clone(),
        );
        r.register(
            "clusterd_updates",
            "Services waiting for and rolling onto the operator's clusterd; stopped is 1 while a failed rollout holds the update",
            metrics.clusterd_updates.clone(),
        );
        metrics
    }

    /// Publishes the clusterd update's wave.
    pub fn observe_wave(&self, wave: &crate::updates::Wave) {
        let set = |state, n: usize| {
            self.clusterd_updates.get_or_create(&StateLabel { state }).set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("waiting", wave.waiting.len());
        set("rolling", wave.rolling.len());
        set("stopped", usize::from(wave.failed.is_some()));
    }

    pub fn observe_duration(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }
}
