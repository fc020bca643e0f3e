//! Proxy mode: clusterd owns the shared port and balances over the workers'
//! private loopback ports.
//!
//! The supervisor decides which workers are in rotation and publishes them
//! per pool; the proxy only reads those lists and the per-worker counters.

pub mod http;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ::http::uri::Authority;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::{RouteMatch, RouteSpec};
use crate::metrics::Metrics;
use crate::policy::DEFAULT_POOL;

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
    /// The slot's `clusterd_requests{pool, worker}` counter, looked up once
    /// rather than per request.
    requests_metric: Counter,
    /// The slot's `clusterd_upgraded_connections{pool, worker}` gauge.
    connections_metric: Gauge,
}

impl Backend {
    pub fn new(worker_id: u32, pid: u32, addr: SocketAddr, pool: Arc<str>, metrics: &Metrics) -> Backend {
        let authority = Authority::try_from(addr.to_string()).expect("a socket address is a valid authority");
        Backend {
            worker_id,
            pid,
            addr,
            authority,
            requests_metric: metrics.requests_of(&pool, worker_id),
            connections_metric: metrics.connections_of(&pool, worker_id),
            pool,
            in_flight: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
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

/// Counts a request (or TCP connection) against a backend while it lives.
pub struct InFlight {
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    pub fn start(backend: Arc<Backend>, metrics: Arc<Metrics>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        metrics.in_flight.inc();
        InFlight { backend, metrics }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.metrics.in_flight.dec();
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
}

impl Pool {
    pub fn new(name: &str) -> Pool {
        Pool { name: name.into(), members: RwLock::new(Arc::from(Vec::new())), next: AtomicUsize::new(0) }
    }

    pub fn set_members(&self, members: Vec<Arc<Backend>>) {
        let mut guard = self.members.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::from(members);
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

/// Request path → pool: an exact path route first, then the longest
/// matching prefix, else `default`.
#[derive(Debug)]
pub struct Router {
    exact: Vec<(String, Arc<Pool>)>,
    /// Sorted by prefix length, longest first.
    prefixes: Vec<(String, Arc<Pool>)>,
    default: Arc<Pool>,
}

impl Router {
    pub fn new(routes: &[RouteSpec]) -> Router {
        let (mut exact, mut prefixes) = (Vec::new(), Vec::new());
        for route in routes {
            let pool = Arc::new(Pool::new(&route.pool_name()));
            match &route.matcher {
                RouteMatch::Exact(path) => exact.push((path.clone(), pool)),
                RouteMatch::Prefix(prefix) => prefixes.push((prefix.clone(), pool)),
            }
        }
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Router { exact, prefixes, default: Arc::new(Pool::new(DEFAULT_POOL)) }
    }

    /// The pool for a request path (without the query).
    pub fn route(&self, path: &str) -> &Arc<Pool> {
        let exact = self.exact.iter().find(|(p, _)| p == path);
        let prefix = || self.prefixes.iter().find(|(p, _)| path.starts_with(p.as_str()));
        exact.or_else(prefix).map_or(&self.default, |(_, pool)| pool)
    }

    /// The pool named `name` (see [`RouteSpec::pool_name`]) or `default`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools().find(|pool| &*pool.name == name)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.exact.iter().chain(&self.prefixes).map(|(_, pool)| pool).chain(std::iter::once(&self.default))
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
        let pool = Pool::new("default");
        pool.set_members(vec![with_connections(0, 0, 5), with_connections(1, 0, 2), with_connections(2, 1, 0)]);
        for _ in 0..5 {
            assert_eq!(pool.pick(&[]).map(|b| b.worker_id), Some(1));
        }
    }

    #[test]
    fn picks_least_outstanding() {
        let pool = Pool::new("default");
        pool.set_members(vec![backend(0, 3), backend(1, 1), backend(2, 2)]);
        for _ in 0..5 {
            assert_eq!(pool.pick(&[]).map(|b| b.worker_id), Some(1));
        }
    }

    #[test]
    fn ties_are_round_robin() {
        let pool = Pool::new("default");
        pool.set_members(vec![backend(0, 0), backend(1, 0), backend(2, 0)]);
        let mut seen: Vec<u32> = (0..6).filter_map(|_| pool.pick(&[])).map(|b| b.worker_id).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn tried_backends_are_skipped() {
        let pool = Pool::new("default");
        pool.set_members(vec![backend(0, 0), backend(1, 5)]);
        assert_eq!(pool.pick(&[100]).map(|b| b.worker_id), Some(1));
        assert!(pool.pick(&[100, 101]).is_none());
        assert!(Pool::new("empty").pick(&[]).is_none());
    }

    fn routes(prefixes: &[&str], exact: &[&str]) -> Vec<RouteSpec> {
        let spec = |matcher| RouteSpec { matcher, workers: 1 };
        let prefixes = prefixes.iter().map(|p| spec(RouteMatch::Prefix(p.to_string())));
        prefixes.chain(exact.iter().map(|p| spec(RouteMatch::Exact(p.to_string())))).collect()
    }

    #[test]
    fn longest_prefix_wins() {
        let router = Router::new(&routes(&["/api", "/api/reports", "/report"], &[]));
        assert_eq!(&*router.route("/api/reports/1").name, "/api/reports");
        assert_eq!(&*router.route("/api/users").name, "/api");
        assert_eq!(&*router.route("/reports").name, "/report");
        assert_eq!(&*router.route("/light").name, "default");
        assert!(router.pool("default").is_some());
        assert!(router.pool("/nope").is_none());
    }

    #[test]
    fn exact_paths_win_over_prefixes() {
        let router = Router::new(&routes(&["/"], &["/", "/report"]));
        assert_eq!(&*router.route("/").name, "=/");
        assert_eq!(&*router.route("/report").name, "=/report");
        assert_eq!(&*router.route("/report/1").name, "/");
        assert!(router.pool("=/report").is_some());
    }
}
