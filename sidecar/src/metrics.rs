//! Prometheus metrics served at `/metrics` on the admin port.

use std::sync::atomic::AtomicU64;

use clustered_api::wire::{ClusterdStatus, WorkerState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

/// A worker slot's id: bounded by the worker count, unlike a pid.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub pool: String,
    pub worker: String,
}

const ALL_STATES: [WorkerState; 7] = [
    WorkerState::Starting,
    WorkerState::Ready,
    WorkerState::Unhealthy,
    WorkerState::Draining,
    WorkerState::Backoff,
    WorkerState::CrashLoop,
    WorkerState::Stopped,
];

pub struct Metrics {
    registry: Registry,
    pub workers: Family<StateLabels, Gauge>,
    pub restarts: Counter,
    pub clean_exits: Counter,
    pub requests: Family<RequestLabels, Counter>,
    pub connections: Family<RequestLabels, Gauge>,
    pub in_flight: Gauge,
    pub queue_depth: Family<PoolLabels, Gauge>,
    pub queue_wait: Family<PoolLabels, Histogram, fn() -> Histogram>,
    pub rejected: Family<PoolLabels, Counter>,
    pub proxy_errors: Counter,
    pub retries: Counter,
    pub cpu_limit: Gauge<f64, AtomicU64>,
    pub desired_workers: Gauge,
    pub log_lines_dropped: Counter,
    pub worker_cpu: Family<WorkerLabels, Counter<f64, AtomicU64>>,
    pub worker_memory: Family<WorkerLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("clusterd");
        let workers = Family::<StateLabels, Gauge>::default();
        let restarts = Counter::default();
        let clean_exits = Counter::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let connections = Family::<RequestLabels, Gauge>::default();
        let in_flight = Gauge::default();
        let queue_depth = Family::<PoolLabels, Gauge>::default();
        let queue_wait = Family::<PoolLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        });
        let rejected = Family::<PoolLabels, Counter>::default();
        let proxy_errors = Counter::default();
        let retries = Counter::default();
        let cpu_limit = Gauge::<f64, AtomicU64>::default();
        let desired_workers = Gauge::default();
        let log_lines_dropped = Counter::default();
        let worker_cpu = Family::<WorkerLabels, Counter<f64, AtomicU64>>::default();
        let worker_memory = Family::<WorkerLabels, Gauge>::default();
        registry.register("workers", "Worker slots by state", workers.clone());
        registry.register("worker_restarts", "Worker processes restarted after a crash", restarts.clone());
        registry.register(
            "worker_clean_exits",
            "Workers that exited with status 0 after they were Ready, restarted at once without backoff",
            clean_exits.clone(),
        );
        registry.register("requests", "Requests proxied, by pool and worker id", requests.clone());
        registry.register(
            "upgraded_connections",
            "Upgraded (e.g. WebSocket) connections open, by pool and worker id",
            connections.clone(),
        );
        registry.register("in_flight_requests", "Requests (or TCP connections) being proxied", in_flight.clone());
        registry.register(
            "queue_depth",
            "Requests waiting for a worker, by pool (--max-concurrency)",
            queue_depth.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time admitted requests waited for a worker, by pool (--max-concurrency)",
            queue_wait.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests answered 503 because the queue was full or they waited --queue-timeout, by pool",
            rejected.clone(),
        );
        registry.register("proxy_errors", "Failed attempts to reach a worker", proxy_errors.clone());
        registry.register("proxy_retries", "Requests retried on another worker", retries.clone());
        registry.register("cpu_limit_cores", "CPU limit clusterd sees", cpu_limit.clone());
        registry.register("desired_workers", "Workers the policy asks for", desired_workers.clone());
        registry.register(
            "log_lines_dropped",
            "Output lines (clusterd's or its workers') dropped because stdout/stderr was not read",
            log_lines_dropped.clone(),
        );
        registry.register_with_unit(
            "worker_cpu",
            "CPU time used by each worker slot: the worker and the processes it started, across its restarts",
            Unit::Seconds,
            worker_cpu.clone(),
        );
        registry.register_with_unit(
            "worker_resident_memory",
            "Resident memory (RSS) of each worker slot's processes (the worker and what it started)",
            Unit::Bytes,
            worker_memory.clone(),
        );
        Metrics {
            registry,
            workers,
            restarts,
            clean_exits,
            requests,
            connections,
            in_flight,
            queue_depth,
            queue_wait,
            rejected,
            proxy_errors,
            retries,
            cpu_limit,
            desired_workers,
            log_lines_dropped,
            worker_cpu,
            worker_memory,
        }
    }

    /// Adds CPU time to a worker slot's counter.
    pub fn add_worker_cpu(&self, worker: u32, seconds: f64) {
        self.worker_cpu.get_or_create(&WorkerLabels { worker: worker.to_string() }).inc_by(seconds);
    }

    /// Sets the resident memory of each slot in `bytes`, and drops the
    /// series of slots no longer measured (removed by a scale-down).
    pub fn set_worker_memory(&self, bytes: &std::collections::BTreeMap<u32, u64>, before: &[u32]) {
        for gone in before.iter().filter(|id| !bytes.contains_key(id)) {
            self.worker_memory.remove(&WorkerLabels { worker: gone.to_string() });
        }
        for (id, bytes) in bytes {
            let bytes = i64::try_from(*bytes).unwrap_or(i64::MAX);
            self.worker_memory.get_or_create(&WorkerLabels { worker: id.to_string() }).set(bytes);
        }
    }

    /// The requests counter of one worker slot.
    pub fn requests_of(&self, pool: &str, worker: u32) -> Counter {
        self.requests.get_or_create(&RequestLabels { pool: pool.to_string(), worker: worker.to_string() }).clone()
    }

    /// The upgraded connections gauge of one worker slot.
    pub fn connections_of(&self, pool: &str, worker: u32) -> Gauge {
        self.connections.get_or_create(&RequestLabels { pool: pool.to_string(), worker: worker.to_string() }).clone()
    }

    /// The queue figures of one pool: depth, wait time, rejections.
    pub fn queue_of(&self, pool: &str) -> (Gauge, Histogram, Counter) {
        let labels = PoolLabels { pool: pool.to_string() };
        (
            self.queue_depth.get_or_create(&labels).clone(),
            self.queue_wait.get_or_create(&labels).clone(),
            self.rejected.get_or_create(&labels).clone(),
        )
    }

    /// Encodes the registry after refreshing the gauges that mirror `status`.
    pub fn render(&self, status: &ClusterdStatus) -> String {
        for state in ALL_STATES {
            let count = status.workers.iter().filter(|w| w.state == state).count();
            self.workers.get_or_create(&StateLabels { state: format!("{state:?}") }).set(count as i64);
        }
        self.desired_workers.set(i64::from(status.desired_workers));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}
