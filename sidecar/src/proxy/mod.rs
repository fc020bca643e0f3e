//! Proxy mode: clusterd owns the shared port and balances over the workers'
//! private loopback ports.
//!
//! The supervisor decides which workers are in rotation and publishes them
//! per pool; the proxy only reads those lists and the per-worker counters.

pub mod choice;
pub mod http;
mod request;
mod router;
pub mod tcp;

pub use router::Router;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ::http::uri::Authority;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Takes the connections already queued in the listener's backlog when
/// shutdown begins: closing the listener would reset them.
pub fn drain_backlog(listener: tokio::net::TcpListener) -> Vec<(tokio::net::TcpStream, SocketAddr)> {
    let Ok(listener) = listener.into_std() else {
        return Vec::new();
    };
    let mut queued = Vec::new();
    // The listener is non-blocking: accept until WouldBlock.
    while let Ok((stream, peer)) = listener.accept() {
        let stream = stream.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            queued.push((stream, peer));
        }
    }
    queued
}

/// One worker process as the proxy sees it.
#[derive(Debug)]
pub struct Backend {
    pub worker_id: u32,
    pub pid: u32,
    pub addr: SocketAddr,
    /// `addr` parsed once, for the URI of every proxied request.
    pub authority: Authority,
    pub pool: Arc<str>,
    pub in_flight: AtomicU64,
    /// Upgraded connections (WebSocket...) joined to this process. They are
    /// not requests: see [`Pool::pick`] for how they weigh in balancing.
    pub connections: AtomicU64,
    /// Requests served by this process (recycling counts these).
    pub requests: AtomicU64,
    /// Requests that came back from it (answered or failed): its progress,
    /// which tells a busy worker from a hung one.
    pub finished: AtomicU64,
    /// The slot's `clusterd_requests{pool, worker}` counter, looked up once
    /// rather than per request.
    requests_metric: Counter,
    /// The slot's `clusterd_upgraded_connections{pool, worker}` gauge.
    connections_metric: Gauge,
    /// Opaque name of this process for sticky sessions: a cookie holding
    /// it (or a header hashed with it) leads back here while it lives.
    pub sticky_token: Box<str>,
}

impl Backend {
    pub fn new(worker_id: u32, pid: u32, addr: SocketAddr, pool: Arc<str>, metrics: &Metrics) -> Backend {
        let authority = Authority::try_from(addr.to_string()).expect("a socket address is a valid authority");
        Backend {
            worker_id,
            pid,
            addr,
            authority,
            sticky_token: sticky_token(pid, addr),
            requests_metric: metrics.requests_of(&pool, worker_id),
            connections_metric: metrics.connections_of(&pool, worker_id),
            pool,
            in_flight: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// No request in flight and no upgraded connection open.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.connections.load(Ordering::Relaxed) == 0
    }

    /// Counts one request (or TCP connection) handed to this worker.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.requests_metric.inc();
    }
}

/// A name for a worker process that does not reveal its pid and differs
/// between clusterd runs (random hash keys), so a stale cookie from another
/// pod or an earlier process matches nothing.
fn sticky_token(pid: u32, addr: SocketAddr) -> Box<str> {
    use std::hash::{BuildHasher, RandomState};
    thread_local! { static KEYS: RandomState = RandomState::new(); }
    let hash = KEYS.with(|keys| keys.hash_one((pid, addr)));
    format!("{hash:016x}").into()
}

/// Counts a request (or TCP connection) against a backend while it lives.
pub struct InFlight {
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    /// Under admission control: the pool whose queue is told when this
    /// request frees its place.
    admitted_in: Option<Arc<Pool>>,
}

impl InFlight {
    pub fn start(backend: Arc<Backend>, metrics: Arc<Metrics>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        metrics.in_flight.inc();
        InFlight { backend, metrics, admitted_in: None }
    }

    /// Starts the request only if `backend` has fewer than `limit` in flight.
    pub fn try_start(backend: Arc<Backend>, metrics: &Arc<Metrics>, limit: u64, pool: &Arc<Pool>) -> Option<InFlight> {
        backend.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)).ok()?;
        metrics.in_flight.inc();
        Some(InFlight { backend, metrics: Arc::clone(metrics), admitted_in: Some(Arc::clone(pool)) })
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.finished.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.dec();
        if let Some(pool) = &self.admitted_in {
            // The first waiter (if any) takes the freed place.
            pool.queue.freed.notify_one();
        }
    }
}

/// Counts an upgraded connection against a backend while it is open.
pub struct UpgradedConnection {
    backend: Arc<Backend>,
}

impl UpgradedConnection {
    pub fn start(backend: Arc<Backend>) -> UpgradedConnection {
        backend.connections.fetch_add(1, Ordering::Relaxed);
        backend.connections_metric.inc();
        UpgradedConnection { backend }
    }
}

impl Drop for UpgradedConnection {
    fn drop(&mut self) {
        self.backend.connections.fetch_sub(1, Ordering::Relaxed);
        self.backend.connections_metric.dec();
    }
}

/// The workers in rotation for one pool.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    members: RwLock<Arc<[Arc<Backend>]>>,
    next: AtomicUsize,
    /// A worker of the pool is on its way into rotation (see
    /// `Machine::back_soon`): a request that finds no member waits for it.
    back_soon: AtomicBool,
    /// Requests waiting for a worker (admission control only).
    pub queue: Queue,
}

/// A pool's admission queue and its figures (`--max-concurrency`).
#[derive(Debug)]
pub struct Queue {
    /// Told when a request frees its place, workers join or leave, or the
    /// pool stops expecting one back soon.
    pub freed: Notify,
    /// Requests waiting now (`clusterd_queue_depth{pool}`).
    depth: Gauge,
    /// Requests that waited and were then served, and their total wait.
    waited: AtomicU64,
    wait_micros: AtomicU64,
    wait_seconds: Histogram,
    /// Requests answered 503 (queue full or timed out).
    rejected: Counter,
}

/// A request's place in a pool's queue; leaves it when dropped.
pub struct Waiting<'a> {
    queue: &'a Queue,
    since: std::time::Instant,
}

impl Waiting<'_> {
    /// The request got a worker: records its wait.
    pub fn admitted(self) {
        let waited = self.since.elapsed();
        self.queue.waited.fetch_add(1, Ordering::Relaxed);
        self.queue.wait_micros.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.queue.wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn since(&self) -> std::time::Instant {
        self.since
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.queue.depth.dec();
    }
}

impl Queue {
    fn new(name: &str, metrics: &Metrics) -> Queue {
        let (depth, wait_seconds, rejected) = metrics.queue_of(name);
        Queue {
            freed: Notify::new(),
            depth,
            waited: AtomicU64::new(0),
            wait_micros: AtomicU64::new(0),
            wait_seconds,
            rejected,
        }
    }

    /// A place in the queue, unless `max` requests already wait.
    pub fn enter(&self, max: usize) -> Option<Waiting<'_>> {
        if self.depth.inc() as usize >= max {
            self.depth.dec();
            return None;
        }
        Some(Waiting { queue: self, since: std::time::Instant::now() })
    }

    pub fn reject(&self) {
        self.rejected.inc();
    }
}

impl Pool {
    pub fn new(name: &str, metrics: &Metrics) -> Pool {
        Pool {
            name: name.into(),
            members: RwLock::new(Arc::from(Vec::new())),
            next: AtomicUsize::new(0),
            back_soon: AtomicBool::new(false),
            queue: Queue::new(name, metrics),
        }
    }

    pub fn set_members(&self, members: Vec<Arc<Backend>>) {
        let mut guard = self.members.write().unwrap_or_else(|e| e.into_inner());
        let changed = guard.len() != members.len() || guard.iter().zip(&members).any(|(a, b)| a.pid != b.pid);
        *guard = Arc::from(members);
        drop(guard);
        if changed {
            // New workers have room: queued requests look again.
            self.queue.freed.notify_waiters();
        }
    }

    pub fn set_back_soon(&self, back_soon: bool) {
        if self.back_soon.swap(back_soon, Ordering::SeqCst) && !back_soon {
            // Requests held for that worker stop waiting.
            self.queue.freed.notify_waiters();
        }
    }

    pub fn back_soon(&self) -> bool {
        self.back_soon.load(Ordering::SeqCst)
    }

    /// The member whose sticky token is `token`, if it is still in rotation.
    pub fn by_token(&self, token: &str) -> Option<Arc<Backend>> {
        self.members().iter().find(|b| &*b.sticky_token == token).cloned()
    }

    /// The member `key` hashes to (rendezvous hashing: the highest
    /// hash(key, member) wins, so when a member leaves only its keys move).
    /// Keyed on the worker slot, not the process: a restarted worker gets
    /// its own keys back, and the other workers' keys never move.
    pub fn by_hash(&self, key: &[u8]) -> Option<Arc<Backend>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        self.members().iter().max_by_key(|b| hasher.hash_one((key, b.worker_id))).cloned()
    }

    /// The queue's figures for /status.
    pub fn status(&self) -> clustered_api::wire::PoolStatus {
        let queue = &self.queue;
        clustered_api::wire::PoolStatus {
            name: self.name.to_string(),
            queued: queue.depth.get().max(0) as u64,
            waited: queue.waited.load(Ordering::Relaxed),
            wait_millis: queue.wait_micros.load(Ordering::Relaxed) / 1000,
            rejected: queue.rejected.get(),
        }
    }

    fn members(&self) -> Arc<[Arc<Backend>]> {
        self.members.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The member with the fewest outstanding requests, skipping `tried`
    /// pids; among those, the one with the fewest upgraded connections.
    /// Scanning from a rotating start makes remaining ties round robin.
    ///
    /// Upgraded connections are only a tie-breaker: a WebSocket is mostly
    /// idle, so counting it like a request would keep request traffic off a
    /// worker that holds many quiet sockets while it has CPU to spare. In
    /// flight requests still measure what a worker is busy with now; when
    /// they tie (at low load, and for the upgrade requests themselves),
    /// new connections spread evenly over the workers.
    pub fn pick(&self, tried: &[u32]) -> Option<Arc<Backend>> {
        let members = self.members();
        if members.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(&Arc<Backend>, (u64, u64))> = None;
        for offset in 0..members.len() {
            let candidate = &members[(start + offset) % members.len()];
            if tried.contains(&candidate.pid) {
                continue;
            }
            let load = (candidate.in_flight.load(Ordering::Relaxed), candidate.connections.load(Ordering::Relaxed));
            if best.is_none_or(|(_, best_load)| load < best_load) {
                best = Some((candidate, load));
            }
        }
        best.map(|(backend, _)| Arc::clone(backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: u32, in_flight: u64) -> Arc<Backend> {
        with_connections(id, in_flight, 0)
    }

    fn with_connections(id: u32, in_flight: u64, connections: u64) -> Arc<Backend> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + id as u16));
        let b = Backend::new(id, 100 + id, addr, "default".into(), &Metrics::new());
        b.in_flight.store(in_flight, Ordering::Relaxed);
        b.connections.store(connections, Ordering::Relaxed);
        Arc::new(b)
    }

    #[test]
    fn upgraded_connections_break_ties_only() {
        let pool = Pool::new("default", &Metrics::new());
        pool.set_members(vec![with_connections(0, 0, 5), with_connections(1, 0, 2), with_connections(2, 1, 0)]);
        for _ in 0..5 {
            assert_eq!(pool.pick(&[]).map(|b| b.worker_id), Some(1));
        }
    }

    #[test]
    fn picks_least_outstanding() {
        let pool = Pool::new("default", &Metrics::new());
        pool.set_members(vec![backend(0, 3), backend(1, 1), backend(2, 2)]);
        for _ in 0..5 {
            assert_eq!(pool.pick(&[]).map(|b| b.worker_id), Some(1));
        }
    }

    #[test]
    fn ties_are_round_robin() {
        let pool = Pool::new("default", &Metrics::new());
        pool.set_members(vec![backend(0, 0), backend(1, 0), backend(2, 0)]);
        let mut seen: Vec<u32> = (0..6).filter_map(|_| pool.pick(&[])).map(|b| b.worker_id).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn tried_backends_are_skipped() {
        let pool = Pool::new("default", &Metrics::new());
        pool.set_members(vec![backend(0, 0), backend(1, 5)]);
        assert_eq!(pool.pick(&[100]).map(|b| b.worker_id), Some(1));
        assert!(pool.pick(&[100, 101]).is_none());
        assert!(Pool::new("empty", &Metrics::new()).pick(&[]).is_none());
    }

    #[test]
    fn sticky_lookups_follow_live_members_only() {
        let pool = Pool::new("default", &Metrics::new());
        let (a, b) = (backend(0, 0), backend(1, 0));
        pool.set_members(vec![Arc::clone(&a), Arc::clone(&b)]);
        assert_eq!(pool.by_token(&b.sticky_token).map(|m| m.worker_id), Some(1));
        assert!(pool.by_token("nope").is_none());
        // A key stays on its member; when that member leaves, only its keys move.
        let keys: Vec<String> = (0..50).map(|i| format!("session-{i}")).collect();
        let before: Vec<u32> = keys.iter().filter_map(|k| pool.by_hash(k.as_bytes())).map(|m| m.worker_id).collect();
        assert!(before.contains(&0) && before.contains(&1), "keys spread: {before:?}");
        pool.set_members(vec![Arc::clone(&a), Arc::clone(&b), backend(2, 0)]);
        let after: Vec<u32> = keys.iter().filter_map(|k| pool.by_hash(k.as_bytes())).map(|m| m.worker_id).collect();
        assert!(before.iter().zip(&after).all(|(x, y)| x == y || *y == 2), "only moves to the new member");
        pool.set_members(vec![Arc::clone(&b)]);
        assert!(pool.by_token(&a.sticky_token).is_none(), "a gone member's clients move on");
    }

    #[test]
    fn a_restarted_worker_moves_no_other_workers_hashed_sessions() {
        let pool = Pool::new("default", &Metrics::new());
        let (a, b, c) = (backend(0, 0), backend(1, 0), backend(2, 0));
        pool.set_members(vec![Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)]);
        let keys: Vec<String> = (0..200).map(|i| format!("session-{i}")).collect();
        let owners = |pool: &Pool| -> Vec<u32> {
            keys.iter().filter_map(|k| pool.by_hash(k.as_bytes())).map(|m| m.worker_id).collect()
        };
        let before = owners(&pool);
        // Worker 1 restarts: out of rotation, then back as a new process
        // (another pid and port).
        pool.set_members(vec![Arc::clone(&a), Arc::clone(&c)]);
        let during = owners(&pool);
        assert!(before.iter().zip(&during).all(|(x, y)| x == y || *x == 1), "only worker 1's keys move");
        let restarted =
            Arc::new(Backend::new(1, 999, "127.0.0.1:45999".parse().expect("addr"), "default".into(), &Metrics::new()));
        pool.set_members(vec![Arc::clone(&a), restarted, Arc::clone(&c)]);
        assert_eq!(owners(&pool), before, "every session back where it was");
    }

    #[test]
    fn try_start_respects_the_limit_and_frees_its_place() {
        let metrics = Arc::new(Metrics::new());
        let pool = Arc::new(Pool::new("default", &metrics));
        let b = backend(0, 0);
        let first = InFlight::try_start(Arc::clone(&b), &metrics, 1, &pool).expect("room for one");
        assert!(InFlight::try_start(Arc::clone(&b), &metrics, 1, &pool).is_none(), "limit 1 reached");
        drop(first);
        assert!(InFlight::try_start(b, &metrics, 1, &pool).is_some(), "its place was freed");
    }

    #[test]
    fn the_queue_is_bounded() {
        let pool = Pool::new("default", &Metrics::new());
        let a = pool.queue.enter(2).expect("first");
        let _b = pool.queue.enter(2).expect("second");
        assert!(pool.queue.enter(2).is_none(), "full at 2");
        a.admitted();
        assert!(pool.queue.enter(2).is_some(), "a place left");
        assert_eq!(pool.status().waited, 1);
        assert!(Pool::new("x", &Metrics::new()).queue.enter(0).is_none(), "no queue");
    }
}
