//! The supervisor: one task that owns every worker slot and reacts to
//! events (exits from the reaper, probe results, signals, CPU limit changes,
//! status requests) and to a short periodic tick for its timers.
//!
//! What to do is decided in [`machine`], without processes; this module
//! carries it out: it forks workers, signals them, probes them, and keeps
//! the proxy's rotation and the admin server's counters up to date.

pub mod health;
pub mod machine;
pub mod orphans;
pub mod output;
pub mod reaper;
pub mod spawn;
pub mod usage;
pub mod worker;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clustered_api::wire::{ClusterdStatus, CpuLimit, WorkerState, WorkerStatus};
use jiff::Timestamp;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::logging::Stream;
use crate::metrics::Metrics;
use crate::node;
use crate::proxy::{self, Backend, Router};
use machine::{Action, Machine, Observe, SpawnKind};
use reaper::ExitInfo;
use spawn::{CommandSpec, WorkerSetup};

const TICK: Duration = Duration::from_millis(100);

pub enum Event {
    Exited(u32, ExitInfo),
    Probe {
        pid: u32,
        healthy: bool,
    },
    Signal(Signal),
    CpuLimit(CpuLimit),
    Status(oneshot::Sender<ClusterdStatus>),
    /// The proxy closed its listener and every client connection.
    ProxyDrained,
    /// Node mode: what a worker's IPC channel says.
    Node {
        pid: u32,
        report: node::channel::Report,
    },
    /// CPU and memory of each worker process ([`usage::run`]).
    Usage(HashMap<u32, usage::Usage>),
}

/// What the admin server reads without asking the supervisor.
#[derive(Debug, Default)]
pub struct Shared {
    pub ready: AtomicU32,
    pub draining: AtomicBool,
}

/// How the workers reach the shared port.
pub enum PortSetup {
    Proxy {
        router: Arc<Router>,
        shutdown: CancellationToken,
    },
    /// clusterd's listening socket, handed to each worker as fd 3.
    Inherit(Option<StdTcpListener>),
    Reuseport,
    /// The sockets Node workers get through their IPC channels, and the
    /// preload that lets them drain kept-alive connections.
    Node {
        sockets: Arc<node::channel::Sockets>,
        preload: Option<node::preload::Preload>,
    },
}

pub struct Supervisor {
    config: Arc<Config>,
    machine: Machine,
    spec: CommandSpec,
    port: PortSetup,
    /// Proxy mode only: each live worker process's place in the rotation.
    backends: HashMap<u32, Arc<Backend>>,
    /// Node mode only: each live worker process's IPC channel.
    channels: HashMap<u32, node::channel::Channel>,
    /// Node mode: `NODE_UNIQUE_ID` of the last worker started.
    node_ids: u32,
    events: UnboundedSender<Event>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    started_at: Timestamp,
    /// The worker processes, for [`usage::run`] to measure.
    pids: tokio::sync::watch::Sender<Vec<u32>>,
    /// The status but its moving figures, for [`crate::notify::run`].
    settled: tokio::sync::watch::Sender<ClusterdStatus>,
    /// The last sample's figures per worker process.
    usage: HashMap<u32, usage::Usage>,
    /// Slots whose memory the metrics show.
    measured_slots: Vec<u32>,
}

/// Why the first workers could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the worker command: {0}")]
pub struct StartError(#[source] pub io::Error);

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        spec: CommandSpec,
        port: PortSetup,
        cpu: CpuLimit,
        events: UnboundedSender<Event>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> Supervisor {
        let machine = Machine::new(Arc::clone(&config), cpu, crate::cgroup::affinity_count(), Instant::now());
        Supervisor {
            config,
            machine,
            spec,
            port,
            backends: HashMap::new(),
            channels: HashMap::new(),
            node_ids: 0,
            events,
            shared,
            metrics,
            started_at: Timestamp::now(),
            pids: tokio::sync::watch::Sender::new(Vec::new()),
            settled: tokio::sync::watch::Sender::new(ClusterdStatus::default()),
            usage: HashMap::new(),
            measured_slots: Vec::new(),
        }
    }

    /// The worker processes to measure, kept up to date by the supervisor.
    pub fn worker_pids(&self) -> tokio::sync::watch::Receiver<Vec<u32>> {
        self.pids.subscribe()
    }

    /// The status but its moving figures, kept up to date by the supervisor.
    pub fn settled_status(&self) -> tokio::sync::watch::Receiver<ClusterdStatus> {
        self.settled.subscribe()
    }

    /// Starts the first workers; fails only if the command cannot be run at all.
    pub fn start(&mut self) -> Result<(), StartError> {
        let actions = self.machine.start();
        self.execute(actions, Instant::now()).map_err(StartError)?;
        self.publish();
        Ok(())
    }

    /// Runs until shutdown completes; returns the exit code.
    pub async fn run(mut self, mut events: UnboundedReceiver<Event>) -> u8 {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => return 1,
                },
                _ = tick.tick() => self.tick(Instant::now()),
            }
            if let Some(code) = self.machine.finished(Instant::now()) {
                return code;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        let actions = match event {
            Event::Exited(pid, exit) => {
                self.backends.remove(&pid);
                self.channels.remove(&pid);
                self.machine.exited(pid, exit, now)
            }
            Event::Node { pid, report: node::channel::Report::Listening } => {
                self.machine.listening(pid);
                Vec::new()
            }
            Event::Node { pid, report: node::channel::Report::Disconnected } => {
                // The worker finished its connections (or ran out of time):
                // now the SIGTERM it was due, unless it is gone already.
                if self.machine.is_live(pid) {
                    signal_group(pid, Signal::SIGTERM);
                }
                Vec::new()
            }
            Event::Probe { pid, healthy } => {
                let world = World { backends: &self.backends, usage: &self.usage };
                self.machine.probed(pid, healthy, &world, now);
                Vec::new()
            }
            Event::Signal(signal) => self.machine.signal(signal, now),
            Event::CpuLimit(limit) => self.machine.cpu_limit(limit, crate::cgroup::affinity_count(), now),
            Event::Status(reply) => {
                let _ = reply.send(self.status());
                Vec::new()
            }
            Event::ProxyDrained => self.machine.proxy_drained(),
            Event::Usage(usage) => {
                self.record_usage(usage);
                Vec::new()
            }
        };
        // Only the first workers' spawns can fail the whole of clusterd.
        let _ = self.execute(actions, now);
        self.publish();
    }

    fn tick(&mut self, now: Instant) {
        // Restarts first, so the new processes are checked in this tick.
        let restarts = self.machine.restart_due(now);
        let _ = self.execute(restarts, now);
        let world = World { backends: &self.backends, usage: &self.usage };
        let actions = self.machine.tick(now, &world);
        let _ = self.execute(actions, now);
        self.publish();
    }

    // ---- effects --------------------------------------------------------

    /// Carries out the machine's actions, reporting spawns back to it. A
    /// failed first spawn of slot 0 is returned: the command cannot run.
    fn execute(&mut self, actions: Vec<Action>, now: Instant) -> io::Result<()> {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { slot, kind } => {
                    let result = self.spawn_proc(slot);
                    match &result {
                        Ok(_) if kind == SpawnKind::Restart => {
                            self.metrics.restarts.inc();
                        }
                        Ok(_) if kind == SpawnKind::AfterCleanExit => {
                            self.metrics.clean_exits.inc();
                        }
                        Err(_) if kind == SpawnKind::First && slot == 0 => return result.map(drop),
                        _ => {}
                    }
                    queue.extend(self.machine.spawned(slot, kind, result.as_ref().copied(), now));
                }
                Action::Signal { pid, signal } => match self.channels.get(&pid) {
                    // A Node worker is first asked to disconnect, as Node's
                    // primary does: it stops accepting on the shared socket
                    // (which clusterd cannot close for it) and finishes its
                    // connections; SIGTERM follows (Event::Node).
                    Some(channel) if signal == Signal::SIGTERM => channel.disconnect(),
                    _ => signal_group(pid, signal),
                },
                Action::SignalOrphans { pids, signal } => orphans::signal(&pids, signal),
                Action::SignalGroup { group, signal } => {
                    // ESRCH: the group is empty, nothing was left behind.
                    let _ = killpg(Pid::from_raw(group as i32), signal);
                }
                Action::Probe { pid, starting, interval } => self.probe(pid, starting, interval),
                Action::StopAccepting => self.stop_accepting(),
            }
        }
        Ok(())
    }

    fn spawn_proc(&mut self, id: u32) -> io::Result<u32> {
        let workers = self.machine.slots().len() as u32;
        let pool =
            self.machine.slot(id).map(|s| Arc::clone(&s.pool)).ok_or_else(|| io::Error::other("no such slot"))?;
        let mut setup = WorkerSetup::default();
        setup.env.push(("WORKER_ID".into(), id.to_string()));
        setup.env.push(("NODE_APP_INSTANCE".into(), id.to_string()));
        setup.env.push(("CLUSTERD_WORKERS".into(), workers.to_string()));
        setup.env.push(("CLUSTERD_POOL".into(), pool.to_string()));
        setup.env.push(("CLUSTERD_PORT_MODE".into(), self.config.port_mode.as_str().into()));
        if let Some((key, token)) = crate::lifeline::cookie() {
            setup.env.push((key.into(), token.into()));
        }
        let proxy_addr = match &self.port {
            PortSetup::Proxy { .. } => {
                let port = free_loopback_port()?;
                setup.env.push(("HOST".into(), Ipv4Addr::LOCALHOST.to_string()));
                setup.env.push(("PORT".into(), port.to_string()));
                Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            }
            PortSetup::Inherit(listener) => {
                let listener =
                    listener.as_ref().ok_or_else(|| io::Error::other("the shared socket is already closed"))?;
                setup.listen_fd = Some(listener.as_raw_fd());
                setup.env.push(("PORT".into(), self.config.port.to_string()));
                setup.env.push(("LISTEN_FDS".into(), "1".into()));
                setup.env.push(("LISTEN_FDNAMES".into(), "clusterd".into()));
                None
            }
            PortSetup::Reuseport => {
                // The workers bind the shared port themselves: on clusterd's --bind.
                setup.env.push(("HOST".into(), self.config.bind.to_string()));
                setup.env.push(("PORT".into(), self.config.port.to_string()));
                setup.env.push(("CLUSTERD_REUSEPORT".into(), "1".into()));
                None
            }
            PortSetup::Node { .. } => None,
        };
        // Node mode: the worker's end of its channel, as Node's
        // child_process.fork() passes it (NODE_CHANNEL_FD).
        let node_channel = match &self.port {
            PortSetup::Node { sockets, preload } => {
                if let Some(preload) = preload {
                    let existing = std::env::var("NODE_OPTIONS").ok();
                    setup.env.push(("NODE_OPTIONS".into(), preload.node_options(existing.as_deref())));
                }
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
                self.node_ids += 1;
                setup.node_channel_fd = Some(theirs.as_raw_fd());
                setup.env.push(("NODE_UNIQUE_ID".into(), self.node_ids.to_string()));
                setup.env.push(("NODE_CHANNEL_FD".into(), "3".into()));
                setup.env.push(("PORT".into(), self.config.port.to_string()));
                let stopping = node::channel::Stopping::new(self.config.drain_timeout, preload.is_some());
                Some((ours, theirs, Arc::clone(sockets), stopping))
            }
            _ => None,
        };
        let spawned = spawn::spawn(&self.spec, &setup)?;
        if let Some((ours, theirs, sockets, stopping)) = node_channel {
            // The child has its copy; ours must go so that its exit closes the channel.
            drop(theirs);
            let (events, pid) = (self.events.clone(), spawned.pid);
            let report = move |report| {
                let _ = events.send(Event::Node { pid, report });
            };
            let channel = node::channel::start(ours, id, sockets, stopping, report)?;
            self.channels.insert(spawned.pid, channel);
        }
        tracing::info!(worker = id, pid = spawned.pid, pool = %pool, "worker started");
        if let Some(stdout) = spawned.stdout {
            output::forward(stdout, id, Stream::Stdout, self.config.log_format);
        }
        if let Some(stderr) = spawned.stderr {
            output::forward(stderr, id, Stream::Stderr, self.config.log_format);
        }
        if let Some(addr) = proxy_addr {
            self.backends.insert(spawned.pid, Arc::new(Backend::new(id, spawned.pid, addr, pool, &self.metrics)));
        }
        Ok(spawned.pid)
    }

    /// Probes a proxied worker's private port in a task of its own.
    fn probe(&self, pid: u32, starting: bool, interval: Duration) {
        let Some(addr) = self.backends.get(&pid).map(|b| b.addr) else {
            return;
        };
        let spec = health::ProbeSpec::new(&self.config);
        let events = self.events.clone();
        tokio::spawn(async move {
            let healthy = if starting {
                // Keeps trying within the interval, so a (re)started worker is
                // in rotation moments after it listens, not at the next tick.
                health::probe_starting(&spec, addr, interval).await
            } else {
                health::probe(&spec, addr).await
            };
            let _ = events.send(Event::Probe { pid, healthy });
        });
    }

    fn stop_accepting(&mut self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        match &mut self.port {
            PortSetup::Proxy { shutdown, .. } => shutdown.cancel(),
            // Close clusterd's copy so the port stops accepting once the
            // workers close theirs.
            PortSetup::Inherit(listener) => drop(listener.take()),
            PortSetup::Node { sockets, .. } => sockets.close_shared(),
            PortSetup::Reuseport => {}
        }
    }

    // ---- views ----------------------------------------------------------

    /// A sample of the workers' CPU and memory: kept for /status and the
    /// memory recycling, added to the metrics per slot.
    fn record_usage(&mut self, usage: HashMap<u32, usage::Usage>) {
        let mut memory = BTreeMap::new();
        for proc in self.machine.procs() {
            if let Some(u) = usage.get(&proc.pid) {
                self.metrics.add_worker_cpu(proc.worker_id, u.cpu_seconds);
                *memory.entry(proc.worker_id).or_insert(0) += u.rss_bytes;
            }
        }
        self.metrics.set_worker_memory(&memory, &self.measured_slots);
        self.measured_slots = memory.into_keys().collect();
        self.usage = usage;
    }

    /// Pushes the rotation to the proxy and the counters to the admin server.
    fn publish(&self) {
        self.pids.send_if_modified(|pids| {
            let live: Vec<u32> = self.machine.procs().map(|p| p.pid).collect();
            let changed = *pids != live;
            *pids = live;
            changed
        });
        self.settled.send_if_modified(|settled| {
            let now = self.status().settled();
            let changed = *settled != now;
            *settled = now;
            changed
        });
        let ready = self.machine.in_rotation().count();
        self.shared.ready.store(ready as u32, Ordering::SeqCst);
        self.metrics.cpu_limit.set(self.machine.cores());
        self.metrics.desired_workers.set(self.machine.slots().len() as i64);
        let PortSetup::Proxy { router, .. } = &self.port else {
            return;
        };
        for pool in router.pools() {
            let members = self
                .machine
                .in_rotation()
                .filter(|(slot, _)| *slot.pool == *pool.name)
                .filter_map(|(_, proc)| self.backends.get(&proc.pid).cloned())
                .collect();
            pool.set_members(members);
            let now = Instant::now();
            let mut slots = self.machine.slots().iter().filter(|slot| *slot.pool == *pool.name);
            pool.set_back_soon(slots.any(|slot| self.machine.back_soon(slot, now, proxy::choice::HOLD)));
        }
    }

    pub fn status(&self) -> ClusterdStatus {
        let mut workers: Vec<WorkerStatus> = self
            .machine
            .slots()
            .iter()
            .map(|slot| {
                let proc = slot.current.as_ref();
                let backend = proc.and_then(|p| self.backends.get(&p.pid));
                WorkerStatus {
                    id: slot.id,
                    pid: proc.map(|p| p.pid),
                    state: self.machine.shown_state(slot),
                    restarts: slot.restarts,
                    clean_exits: slot.clean_exits,
                    last_exit: slot.last_exit.clone(),
                    since: Some(proc.map_or(slot.since, |p| p.since).to_string()),
                    pool: Some(slot.pool.to_string()),
                    port: backend.map(|b| b.addr.port()),
                    in_flight: backend.map_or(0, |b| b.in_flight.load(Ordering::Relaxed)),
                    requests: backend.map_or(0, |b| b.requests.load(Ordering::Relaxed)),
                    connections: backend.map_or(0, |b| b.connections.load(Ordering::Relaxed)),
                    started_at: proc.map(|p| p.started_at.to_string()),
                    cpu_cores: proc.and_then(|p| self.usage.get(&p.pid)?.cpu_cores),
                    memory_bytes: proc.and_then(|p| Some(self.usage.get(&p.pid)?.rss_bytes)),
                }
            })
            .collect();
        let desired_workers = workers.len() as u32;
        // Processes that left their slot and still finish their requests
        // (reload, recycle, scale-down): listed after the slots, under the
        // id of the slot they served.
        workers.extend(self.machine.retired().iter().map(|proc| {
            let backend = self.backends.get(&proc.pid);
            WorkerStatus {
                id: proc.worker_id,
                pid: Some(proc.pid),
                state: WorkerState::Draining,
                since: Some(proc.since.to_string()),
                pool: backend.map(|b| b.pool.to_string()),
                port: backend.map(|b| b.addr.port()),
                in_flight: backend.map_or(0, |b| b.in_flight.load(Ordering::Relaxed)),
                requests: backend.map_or(0, |b| b.requests.load(Ordering::Relaxed)),
                connections: backend.map_or(0, |b| b.connections.load(Ordering::Relaxed)),
                started_at: Some(proc.started_at.to_string()),
                cpu_cores: self.usage.get(&proc.pid).and_then(|u| u.cpu_cores),
                memory_bytes: self.usage.get(&proc.pid).map(|u| u.rss_bytes),
                ..WorkerStatus::default()
            }
        }));
        ClusterdStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            cpu: self.machine.cpu().clone(),
            desired_workers,
            ready_workers: workers.iter().filter(|w| w.state.is_ready()).count() as u32,
            port_mode: self.config.port_mode.as_str().to_string(),
            port_mode_reason: self.config.port_mode_reason.clone(),
            port: self.config.port,
            started_at: self.started_at.to_string(),
            draining: self.machine.draining(),
            workers,
            pools: match &self.port {
                PortSetup::Proxy { router, .. } => router.pools().map(|pool| pool.status()).collect(),
                _ => Vec::new(),
            },
            // The admin server's to tell.
            notifies: None,
        }
    }
}

/// What the machine reads from the world: the proxy's counters and /proc.
struct World<'a> {
    backends: &'a HashMap<u32, Arc<Backend>>,
    usage: &'a HashMap<u32, usage::Usage>,
}

impl Observe for World<'_> {
    fn in_flight(&self, pid: u32) -> u64 {
        self.backends
            .get(&pid)
            .map_or(0, |b| b.in_flight.load(Ordering::Relaxed) + b.connections.load(Ordering::Relaxed))
    }

    fn requests(&self, pid: u32) -> u64 {
        self.backends.get(&pid).map_or(0, |b| b.requests.load(Ordering::Relaxed))
    }

    fn finished(&self, pid: u32) -> u64 {
        self.backends.get(&pid).map_or(0, |b| b.finished.load(Ordering::Relaxed))
    }

    /// The worker's whole tree, as /status shows it (last sample).
    fn rss_mib(&self, pid: u32) -> Option<u64> {
        self.usage.get(&pid).map(|u| u.rss_bytes >> 20)
    }

    fn listens(&self, pid: u32, port: u16) -> bool {
        health::any_listens_on(&orphans::process_tree(pid), port)
    }

    fn orphans(&self) -> Vec<u32> {
        let mut orphans = orphans::children_of(std::process::id());
        // The lifeline is clusterd's own child, not something a worker left.
        orphans.retain(|&pid| Some(pid) != crate::lifeline::pid());
        orphans
    }
}

/// Signals the worker's process group (the worker and anything it started).
fn signal_group(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32);
    if killpg(pid, signal).is_err() {
        let _ = kill(pid, signal);
    }
}

/// A free port on 127.0.0.1 for a worker to bind.
fn free_loopback_port() -> io::Result<u16> {
    Ok(StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}
