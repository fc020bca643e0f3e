//! The fleet simulator: one listener on `0.0.0.0:PORT` answers clusterd's
//! `/status` for every simulated pod. The whole of 127.0.0.0/8 belongs to
//! `lo`, so the operator's request to pod `127.64.3.7:PORT` arrives here,
//! and the address it was sent to (the connection's local address) says
//! which pod is asked. Every pod starts with its workers ready; the script
//! crashes, restarts and loads workers, and silences pods. As clusterd
//! does, a pod asked with `wire::NOTIFY_PORT_HEADER` tells the asker of
//! each change to its status, from its own address (a silent pod tells
//! nothing, and its answering again is no change).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustered_api::wire::{
    CHANGED_PATH, ClusterdStatus, CpuLimit, NOTIFY_PORT_HEADER, STATUS_PATH, WorkerState, WorkerStatus,
};
use http_body_util::{Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A silent pod holds each request this long (longer than the operator's
/// probe timeout), then answers 503: bounded, and never a valid status.
const SILENCE: Duration = Duration::from_secs(30);

/// One simulated clusterd.
#[derive(Clone, Debug)]
struct SimPod {
    workers: Vec<WorkerStatus>,
    silent: bool,
}

struct State {
    /// Pods the script touched; any other address answers as a fresh pod.
    pods: Mutex<HashMap<IpAddr, SimPod>>,
    /// Workers per pod.
    workers: u32,
    /// Restarts added to every worker's own (see [`Simulator::restart_all`]).
    epoch: AtomicU64,
    requests: AtomicU64,
    /// Who asked to be told of changes, and the pods it asked.
    told: Mutex<(Option<SocketAddr>, HashSet<IpAddr>)>,
    /// Words said (`wire::CHANGED_PATH`).
    words: AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl State {
    fn fresh(&self) -> SimPod {
        let workers = (0..self.workers)
            .map(|id| WorkerStatus {
                id,
                pid: Some(100 + id),
                state: WorkerState::Ready,
                since: Some("2026-01-01T00:00:00Z".into()),
                ..Default::default()
            })
            .collect();
        SimPod { workers, silent: false }
    }

    fn edit<T>(&self, ip: IpAddr, f: impl FnOnce(&mut SimPod) -> T) -> T {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let pod = pods.entry(ip).or_insert_with(|| self.fresh());
        f(pod)
    }

    /// The pod at `ip` says that its status changed, if it was asked to.
    fn tell(self: &Arc<Self>, ip: IpAddr) {
        let told = self.told.lock().unwrap_or_else(|p| p.into_inner());
        let Some(to) = told.0.filter(|_| told.1.contains(&ip)) else { return };
        drop(told);
        self.words.fetch_add(1, Ordering::Relaxed);
        self.runtime.spawn(async move {
            let mut connector = HttpConnector::new();
            connector.set_local_address(Some(ip));
            let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
            let request = hyper::Request::post(format!("http://{to}{CHANGED_PATH}")).body(Empty::new());
            if let Ok(request) = request {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.request(request)).await;
            }
        });
    }

    /// The pod's status document, or `None` while it is silent.
    fn status(&self, ip: IpAddr, port: u16) -> Option<ClusterdStatus> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let pod = pods.get(&ip).cloned().unwrap_or_else(|| self.fresh());
        drop(pods);
        if pod.silent {
            return None;
        }
        let epoch = self.epoch.load(Ordering::Relaxed) as u32;
        let mut workers = pod.workers;
        for w in &mut workers {
            w.restarts += epoch;
        }
        Some(ClusterdStatus {
            version: "fleet-sim".into(),
            pid: 1,
            cpu: CpuLimit { cores: Some(f64::from(self.workers)), source: "cgroup-v2".into() },
            desired_workers: self.workers,
            ready_workers: workers.iter().filter(|w| w.state.is_ready()).count() as u32,
            port_mode: "proxy".into(),
            port_mode_reason: "--port-mode=proxy".into(),
            port,
            started_at: "2026-01-01T00:00:00Z".into(),
            draining: false,
            workers,
            pools: Vec::new(),
            notifies: self.told.lock().unwrap_or_else(|p| p.into_inner()).0.map(|to| to.to_string()),
        })
    }
}

/// The running simulator. Dropping it stops the listener.
pub struct Simulator {
    /// The admin port every simulated pod answers on (the ClusteredServices'
    /// `spec.adminPort`).
    pub port: u16,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Simulator {
    /// Listens on `0.0.0.0:port` (0: any free port) for pods of `workers` workers each.
    pub async fn start(port: u16, workers: u32) -> anyhow::Result<Simulator> {
        let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            pods: Mutex::default(),
            workers,
            epoch: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            told: Mutex::default(),
            words: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(Simulator { port, state, task })
    }

    /// `/status` requests answered (or held, for silent pods) so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Words said so far that a pod's status changed.
    pub fn words(&self) -> u64 {
        self.state.words.load(Ordering::Relaxed)
    }

    /// Worker `id` of the pod at `ip` crashes for good: clusterd reports it
    /// in a crash loop, with one more restart and its last exit.
    pub fn crash(&self, ip: IpAddr, id: u32, at: &str) {
        self.state.edit(ip, |pod| {
            if let Some(w) = pod.workers.get_mut(id as usize) {
                w.state = WorkerState::CrashLoop;
                w.pid = None;
                w.restarts += 1;
                w.last_exit = Some("exit code 1".into());
                w.since = Some(at.into());
                w.in_flight = 0;
            }
        });
        self.state.tell(ip);
    }

    /// Worker `id` of the pod at `ip` runs again.
    pub fn recover(&self, ip: IpAddr, id: u32, at: &str) {
        self.state.edit(ip, |pod| {
            if let Some(w) = pod.workers.get_mut(id as usize) {
                w.state = WorkerState::Ready;
                w.pid = Some(200 + id);
                w.since = Some(at.into());
            }
        });
        self.state.tell(ip);
    }

    /// Requests in flight on worker `id` of the pod at `ip`.
    pub fn load(&self, ip: IpAddr, id: u32, in_flight: u64) {
        self.state.edit(ip, |pod| {
            if let Some(w) = pod.workers.get_mut(id as usize) {
                w.in_flight = in_flight;
            }
        });
    }

    /// The pod at `ip` stops answering (`true`) or answers again.
    pub fn silence(&self, ip: IpAddr, silent: bool) {
        self.state.edit(ip, |pod| pod.silent = silent);
    }

    /// Every pod answers again and every worker runs (restart counts stay).
    pub fn heal_all(&self, at: &str) {
        let mut pods = self.state.pods.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        for (ip, pod) in pods.iter_mut() {
            pod.silent = false;
            let mut healed = false;
            for w in pod.workers.iter_mut().filter(|w| w.state != WorkerState::Ready) {
                w.state = WorkerState::Ready;
                w.pid = Some(200 + w.id);
                w.since = Some(at.into());
                healed = true;
            }
            if healed {
                changed.push(*ip);
            }
        }
        drop(pods);
        changed.into_iter().for_each(|ip| self.state.tell(ip));
    }

    /// Every worker of every pod reports `restarts` more restarts than
    /// its own: a change to every status at once.
    pub fn restart_all(&self, restarts: u64) {
        self.state.epoch.store(restarts, Ordering::Relaxed);
        let asked: Vec<IpAddr> = self.state.told.lock().unwrap_or_else(|p| p.into_inner()).1.iter().copied().collect();
        asked.into_iter().for_each(|ip| self.state.tell(ip));
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, for one: wait rather than spin.
                tracing::warn!(error = %e, "fleet simulator: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(local) = stream.local_addr() else { continue };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(Arc::clone(&state), local, peer, request));
            // A connection the operator drops (a timeout) ends here.
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn answer(
    state: Arc<State>,
    local: SocketAddr,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != STATUS_PATH {
        return Ok(plain(StatusCode::NOT_FOUND, "not found"));
    }
    state.requests.fetch_add(1, Ordering::Relaxed);
    let port = request.headers().get(NOTIFY_PORT_HEADER).and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
    if let Some(port) = port {
        let mut told = state.told.lock().unwrap_or_else(|p| p.into_inner());
        told.0 = Some(SocketAddr::new(peer.ip(), port));
        told.1.insert(local.ip());
    }
    let Some(status) = state.status(local.ip(), local.port()) else {
        tokio::time::sleep(SILENCE).await;
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "silent"));
    };
    let body = serde_json::to_vec(&status).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(ip: &str, port: u16) -> anyhow::Result<(StatusCode, Option<ClusterdStatus>)> {
        use http_body_util::{BodyExt, Empty};
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        let response = tokio::time::timeout(
            Duration::from_secs(2),
            client.get(format!("http://{ip}:{port}{STATUS_PATH}").parse()?),
        )
        .await??;
        let code = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((code, serde_json::from_slice(&body).ok()))
    }

    #[tokio::test]
    async fn each_loopback_address_is_a_pod_of_its_own() -> anyhow::Result<()> {
        let sim = Simulator::start(0, 2).await?;
        let (a, b): (IpAddr, IpAddr) = ("127.64.0.7".parse()?, "127.64.1.9".parse()?);
        sim.crash(a, 1, "2026-01-01T00:01:00Z");
        sim.load(b, 0, 5);

        let (_, status) = get("127.64.0.7", sim.port).await?;
        let status = status.expect("a status document");
        assert_eq!((status.desired_workers, status.ready_workers), (2, 1));
        assert_eq!(status.workers[1].state, WorkerState::CrashLoop);
        assert_eq!(status.workers[1].restarts, 1);
        let (_, status) = get("127.64.1.9", sim.port).await?;
        let status = status.expect("a status document");
        assert_eq!((status.ready_workers, status.workers[0].in_flight), (2, 5));
        let (_, status) = get("127.64.200.1", sim.port).await?;
        assert_eq!(status.expect("a fresh pod").ready_workers, 2);

        sim.recover(a, 1, "2026-01-01T00:02:00Z");
        sim.restart_all(3);
        let (_, status) = get("127.64.0.7", sim.port).await?;
        let status = status.expect("status");
        assert_eq!(status.ready_workers, 2);
        assert_eq!(status.workers[1].restarts, 4, "its own restart and the epoch's");
        let (_, status) = get("127.64.9.9", sim.port).await?;
        assert_eq!(status.expect("status").workers[0].restarts, 3);
        assert_eq!(sim.requests(), 5);
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_pod_does_not_answer_in_time() -> anyhow::Result<()> {
        let sim = Simulator::start(0, 1).await?;
        sim.silence("127.64.0.3".parse()?, true);
        assert!(get("127.64.0.3", sim.port).await.is_err(), "held past the client's timeout");
        sim.silence("127.64.0.3".parse()?, false);
        assert_eq!(get("127.64.0.3", sim.port).await?.0, StatusCode::OK);
        Ok(())
    }
}
