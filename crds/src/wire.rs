//! What clusterd serves on its admin port at `/status`.
//!
//! This is the only channel through which the operator learns per-worker
//! health, so the app container needs no Kubernetes credentials. Both sides
//! compile against these types; fields are only ever added, with defaults,
//! so an older operator can read a newer clusterd and vice versa.

use serde::{Deserialize, Serialize};

/// Path of the status document on clusterd's admin port.
pub const STATUS_PATH: &str = "/status";

/// A `/status` request header: "tell me when your status changes". Its value
/// is a port of the asker; clusterd then sends `POST` [`CHANGED_PATH`] to the
/// asker's own address at that port whenever what [`ClusterdStatus::settled`]
/// keeps changes, until a later ask names another. A change is then learnt
/// at once, and a settled pod need hardly be asked at all. Only the asker's
/// address: a request to the admin port cannot send clusterd elsewhere.
pub const NOTIFY_PORT_HEADER: &str = "clustered-notify-port";

/// Where clusterd says that its status changed (an empty `POST`; the asker
/// knows the pod by the request's source address, and asks it again).
pub const CHANGED_PATH: &str = "/v1/clusterd-changed";

/// The query of clusterd's first word to a new asker ([`CHANGED_PATH`]`?hello`):
/// nothing changed, it only checks that words arrive. Until one has,
/// [`ClusterdStatus::notifies`] stays empty.
pub const HELLO_QUERY: &str = "hello";

/// The status document of one clusterd (one pod).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterdStatus {
    /// clusterd's version.
    pub version: String,
    /// clusterd's own pid (1 when it is the container's init).
    pub pid: u32,
    /// The CPU limit clusterd sees and where it came from.
    pub cpu: CpuLimit,
    /// Workers the policy asks for at the current CPU limit.
    pub desired_workers: u32,
    /// Workers currently ready to serve.
    pub ready_workers: u32,
    /// `proxy`, `inherit`, `reuseport` or `node` (`auto` resolved).
    pub port_mode: String,
    /// Why that mode: the flag given, or what `auto` saw.
    pub port_mode_reason: String,
    /// The shared port.
    pub port: u16,
    /// When clusterd started (RFC 3339).
    pub started_at: String,
    /// True once a shutdown has begun.
    pub draining: bool,
    /// One entry per worker slot, ordered by id; then one per process that
    /// left its slot (reload, recycle, scale-down) and still finishes its
    /// requests, as `Draining`, under the id of the slot it served.
    pub workers: Vec<WorkerStatus>,
    /// Request queues of the route pools (proxy mode with `--max-concurrency`).
    pub pools: Vec<PoolStatus>,
    /// Where clusterd says that its status changed (`ip:port`, see
    /// [`NOTIFY_PORT_HEADER`]), while its words arrive there; absent when
    /// nobody asked, when the last word did not arrive, and from a clusterd
    /// older than this channel: then it must be asked often.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notifies: Option<String>,
}

impl ClusterdStatus {
    /// The document without the figures that move at every request or
    /// sample (in-flight and served counts, CPU and memory, the pools'
    /// queues): a change to what is left is worth telling.
    pub fn settled(mut self) -> ClusterdStatus {
        for w in &mut self.workers {
            (w.in_flight, w.requests, w.connections) = (0, 0, 0);
            (w.cpu_cores, w.memory_bytes) = (None, None);
        }
        ClusterdStatus { pools: Vec::new(), notifies: None, ..self }
    }
}

/// A route pool's admission queue (`--max-concurrency`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolStatus {
    /// `default` or the route's pool name.
    pub name: String,
    /// Requests waiting for a worker right now.
    pub queued: u64,
    /// Requests that waited in the queue and were then served.
    pub waited: u64,
    /// Their total time in the queue, in milliseconds (mean = this / `waited`).
    pub wait_millis: u64,
    /// Requests answered `503` because the queue was full or they waited
    /// `--queue-timeout`.
    pub rejected: u64,
}

/// The CPU limit as clusterd detected it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CpuLimit {
    /// Cores available (quota / period), `None` when unlimited.
    pub cores: Option<f64>,
    /// Where the number came from: `cgroup-v2`, `cgroup-v1`, `affinity` or `override`.
    pub source: String,
}

/// How [`WorkerStatus::last_exit`] starts for a worker the kernel's OOM
/// killer stopped.
pub const OOM_KILLED: &str = "OOM killed";

/// One worker slot. The id is stable across restarts of the slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkerStatus {
    pub id: u32,
    /// Pid of the current process, if one is running.
    pub pid: Option<u32>,
    pub state: WorkerState,
    /// How many times this slot's process has been replaced after it
    /// crashed (any exit but a clean one).
    pub restarts: u32,
    /// Clean exits: status 0 after the process was Ready (e.g. an app that
    /// exits after N requests). Restarted at once, without backoff, and not
    /// counted in `restarts`.
    pub clean_exits: u32,
    /// How the previous process ended, e.g. `exit code 1`, `killed by
    /// SIGKILL`, or starting with [`OOM_KILLED`] when the kernel killed it
    /// at the container's memory limit.
    pub last_exit: Option<String>,
    /// When the worker entered its current state (RFC 3339).
    pub since: Option<String>,
    /// Route pool the worker serves (`default` for everything else).
    pub pool: Option<String>,
    /// Private port of the worker (proxy mode).
    pub port: Option<u16>,
    /// Requests being served right now (proxy mode).
    pub in_flight: u64,
    /// Requests served by the current process (proxy mode).
    pub requests: u64,
    /// Upgraded connections (e.g. WebSocket) open to the current process
    /// (proxy mode, `http` protocol).
    pub connections: u64,
    /// When the current process started (RFC 3339): its uptime.
    pub started_at: Option<String>,
    /// CPU used by the process and every process it started (its
    /// descendants and its process group, as readiness sees them), in
    /// cores over the last sample interval (2 s): `1.0` is one core busy
    /// the whole time. Absent until two samples were taken (and from a
    /// clusterd older than these figures).
    pub cpu_cores: Option<f64>,
    /// Resident memory (RSS) of the same processes, in bytes; the figure
    /// `--max-memory-mib` recycles on.
    pub memory_bytes: Option<u64>,
}

/// Lifecycle of a worker slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[serde(rename_all = "PascalCase")]
pub enum WorkerState {
    /// Spawned, not yet answering health checks.
    #[default]
    Starting,
    /// Answering health checks and in rotation.
    Ready,
    /// Failing health checks; out of rotation, killed if it stays hung.
    Unhealthy,
    /// Finishing in-flight requests before it stops.
    Draining,
    /// Exited; waiting out the restart backoff.
    Backoff,
    /// Exited too often in a short time; restarted at the maximum backoff.
    CrashLoop,
    /// Not running and not going to be restarted.
    Stopped,
    /// A state this side does not know: a newer clusterd's. Read as not
    /// ready, so an older operator still reads the rest of the document.
    #[serde(other)]
    Unknown,
}

impl WorkerState {
    pub fn is_ready(self) -> bool {
        self == WorkerState::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_fields_are_tolerated() {
        let doc = r#"{"version":"9.9.9","workers":[{"id":2,"state":"Ready","futureField":1}]}"#;
        let status: ClusterdStatus = serde_json::from_str(doc).expect("tolerant parse");
        assert_eq!(status.version, "9.9.9");
        assert_eq!(status.workers[0].id, 2);
        assert!(status.workers[0].state.is_ready());
        assert_eq!(status.workers[0].restarts, 0);
    }

    /// `WorkerStatus` as clusterd and the operator knew it before the usage
    /// figures: what an older reader deserializes into.
    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    struct WorkerStatusBeforeUsage {
        id: u32,
        pid: Option<u32>,
        state: WorkerState,
        restarts: u32,
        requests: u64,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    struct ClusterdStatusBeforeUsage {
        version: String,
        workers: Vec<WorkerStatusBeforeUsage>,
    }

    #[test]
    fn an_older_reader_reads_a_document_with_usage_figures() {
        let new = ClusterdStatus {
            version: "0.2.0".into(),
            workers: vec![WorkerStatus {
                id: 1,
                pid: Some(42),
                state: WorkerState::Ready,
                restarts: 2,
                requests: 7,
                started_at: Some("2026-12-07T08:00:00Z".into()),
                cpu_cores: Some(0.98),
                memory_bytes: Some(50 << 20),
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&new).expect("serialize");
        assert!(json.contains("\"cpuCores\":0.98") && json.contains("\"memoryBytes\":52428800"), "{json}");
        let old: ClusterdStatusBeforeUsage = serde_json::from_str(&json).expect("an older reader parses it");
        assert_eq!(old.version, "0.2.0");
        let w = &old.workers[0];
        assert_eq!((w.id, w.pid, w.state, w.restarts, w.requests), (1, Some(42), WorkerState::Ready, 2, 7));
    }

    #[test]
    fn a_document_without_usage_figures_reads_as_unknown_figures() {
        // What a clusterd older than the figures serves.
        let old = r#"{"version":"0.1.0","pid":1,"workers":[{"id":0,"pid":42,"state":"Ready","restarts":1,
            "cleanExits":0,"lastExit":null,"since":"2026-12-07T08:00:00Z","pool":"default","port":40000,
            "inFlight":0,"requests":3,"connections":0}],"pools":[]}"#;
        let status: ClusterdStatus = serde_json::from_str(old).expect("parse");
        let w = &status.workers[0];
        assert_eq!((w.pid, w.restarts, w.requests), (Some(42), 1, 3));
        assert_eq!((w.started_at.as_deref(), w.cpu_cores, w.memory_bytes), (None, None, None));
    }

    /// What the previous release's clusterd served (captured from a real
    /// run in proxy mode with a route pool): this operator reads all of it.
    #[test]
    fn the_previous_releases_document_is_read_whole() {
        let doc = include_str!("../tests/fixtures/wire/clusterd-0.1.0-status.json");
        let status: ClusterdStatus = serde_json::from_str(doc).expect("the 0.1.0 document parses");
        assert_eq!((status.version.as_str(), status.port_mode.as_str()), ("0.1.0", "proxy"));
        assert_eq!((status.desired_workers, status.ready_workers, status.workers.len()), (2, 2, 2));
        assert!(status.workers.iter().all(|w| w.state.is_ready() && w.pid.is_some() && w.memory_bytes.is_some()));
        assert_eq!(status.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["=/heavy", "default"]);
        // Nothing in it is lost: written back, it is the same document.
        let reread: serde_json::Value = serde_json::to_value(&status).expect("serialize");
        let original: serde_json::Value = serde_json::from_str(doc).expect("json");
        assert_eq!(reread, original);
    }

    /// A newer clusterd adds fields anywhere and may know worker states
    /// this release does not: the document is still read, the unknown
    /// state as not ready.
    #[test]
    fn a_newer_document_with_unknown_fields_and_states_is_read() {
        let doc = include_str!("../tests/fixtures/wire/clusterd-newer-status.json");
        let status: ClusterdStatus = serde_json::from_str(doc).expect("the newer document parses");
        assert_eq!(status.version, "0.2.0");
        assert_eq!(status.workers.len(), 2);
        assert_eq!(status.workers[0].state, WorkerState::Ready);
        assert_eq!(status.workers[1].state, WorkerState::Unknown);
        assert!(!status.workers[1].state.is_ready());
        assert_eq!(status.workers[1].requests, 1);
    }

    #[test]
    fn field_names_are_camel_case() {
        let w = WorkerStatus { last_exit: Some("exit code 1".into()), in_flight: 3, ..Default::default() };
        let json = serde_json::to_value(&w).expect("serialize");
        assert_eq!(json["lastExit"], "exit code 1");
        assert_eq!(json["inFlight"], 3);
        assert_eq!(json["state"], "Starting");
    }

    #[test]
    fn settled_leaves_out_what_moves_at_every_request_but_not_a_crash() {
        let worker = WorkerStatus { id: 0, pid: Some(7), state: WorkerState::Ready, ..Default::default() };
        let before = ClusterdStatus { workers: vec![worker.clone()], ..Default::default() };
        let busy = ClusterdStatus {
            workers: vec![WorkerStatus {
                in_flight: 3,
                requests: 90,
                connections: 1,
                cpu_cores: Some(0.7),
                memory_bytes: Some(1 << 20),
                ..worker.clone()
            }],
            pools: vec![PoolStatus { name: "default".into(), queued: 4, ..Default::default() }],
            notifies: Some("10.0.0.1:8080".into()),
            ..before.clone()
        };
        assert_eq!(busy.settled(), before.clone().settled());
        let crashed = ClusterdStatus {
            workers: vec![WorkerStatus { state: WorkerState::Backoff, restarts: 1, pid: None, ..worker }],
            ..before.clone()
        };
        assert_ne!(crashed.settled(), before.settled());
    }
}
