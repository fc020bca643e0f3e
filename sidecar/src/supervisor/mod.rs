//! The supervisor: one task that owns every worker slot and reacts to
//! events (exits from the reaper, probe results, signals, CPU limit changes,
//! status requests) and to a short periodic tick for its timers.

pub mod health;
pub mod orphans;
pub mod output;
pub mod reaper;
pub mod spawn;
pub mod worker;

use std::collections::VecDeque;
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

use crate::config::{Config, HealthCheck, PortMode, RouteSpec};
use crate::logging::Stream;
use crate::metrics::Metrics;
use crate::policy::{WorkerPolicy, slot_layout};
use crate::proxy::{Backend, Router};
use reaper::ExitInfo;
use spawn::{CommandSpec, WorkerSetup};
use worker::{Proc, Slot, backoff};

const TICK: Duration = Duration::from_millis(100);
/// Probe interval while a worker is starting, so it joins the rotation soon.
const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A drained worker stays out of rotation at least this long before its
/// SIGTERM, so requests that picked it just before removal still arrive.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// After SIGKILL at the deadline, how long to wait for the last exits.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long processes the workers left behind get between SIGTERM and
/// SIGKILL at shutdown (the workers' own drain is over by then).
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the proxy to finish in-flight requests.
    ProxyDraining,
    /// Workers got their stop signal.
    Stopping,
    /// Stragglers got SIGKILL at this instant.
    Killed(Instant),
}

struct Shutdown {
    phase: Phase,
    deadline: Instant,
    exit_code: u8,
    /// Once the workers are gone: adopted processes still to be stopped.
    orphans: OrphanStop,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum OrphanStop {
    #[default]
    NotYet,
    Terminated(Instant),
    Killed(Instant),
    Done,
}

pub struct Supervisor {
    config: Arc<Config>,
    spec: CommandSpec,
    policy: WorkerPolicy,
    pools: Vec<RouteSpec>,
    port: PortSetup,
    events: UnboundedSender<Event>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    cpu: CpuLimit,
    /// A new worker count seen once, applied when the next poll confirms it.
    pending_desired: Option<u32>,
    slots: Vec<Slot>,
    /// Processes that left their slot (reload, recycle, scale-down) and are draining.
    retired: Vec<Proc>,
    reload_queue: VecDeque<u32>,
    /// Memory is read from /proc once per health period, not every tick.
    next_memory_check: Instant,
    shutdown: Option<Shutdown>,
    started_at: Timestamp,
}

/// Why the first workers could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the worker command: {0}")]
pub struct StartError(#[source] pub io::Error);

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        spec: CommandSpec,
        port: PortSetup,
        cpu: CpuLimit,
        events: UnboundedSender<Event>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> Supervisor {
        let policy = config.policy();
        Supervisor {
            pools: config.pools(),
            config,
            spec,
            policy,
            port,
            events,
            shared,
            metrics,
            cpu,
            pending_desired: None,
            slots: Vec::new(),
            retired: Vec::new(),
            reload_queue: VecDeque::new(),
            next_memory_check: Instant::now(),
            shutdown: None,
            started_at: Timestamp::now(),
        }
    }

    fn cores(&self) -> f64 {
        self.cpu.cores.unwrap_or_else(|| crate::cgroup::affinity_count() as f64)
    }

    /// The worker slots for the CPU limit now, within the worker cap (a
    /// detected limit can be anything; configured counts were checked).
    fn layout(&self) -> Vec<String> {
        slot_layout(self.policy.desired(self.cores()).min(self.config.worker_cap), &self.pools)
    }

    fn warn_if_capped(&self) {
        let (desired, cap) = (self.policy.desired(self.cores()), self.config.worker_cap);
        if desired > cap {
            tracing::warn!(desired, cap, "the CPU limit asks for more workers than --worker-cap; running the cap");
        }
    }

    /// Starts the first workers; fails only if the command cannot be run at all.
    pub fn start(&mut self) -> Result<(), StartError> {
        self.warn_if_capped();
        let layout = self.layout();
        let workers = layout.len() as u32;
        tracing::info!(cores = ?self.cpu.cores, source = %self.cpu.source, workers, "starting workers");
        if f64::from(workers) > 4.0 * self.cores() {
            tracing::warn!(
                workers,
                cpus = self.cores(),
                "more than 4 workers per CPU: they will mostly wait for each other (fewer --workers, or a higher CPU limit)"
            );
        }
        if self.config.min_ready > workers {
            tracing::warn!(
                min_ready = self.config.min_ready,
                workers,
                "--min-ready is above the worker count: /readyz fails until more workers run"
            );
        }
        let now = Instant::now();
        for (id, pool) in layout.iter().enumerate() {
            let mut slot = Slot::new(id as u32, pool.as_str().into());
            match self.spawn_proc(&slot, layout.len() as u32, now) {
                Ok(proc) => slot.current = Some(proc),
                Err(e) if id == 0 => return Err(StartError(e)),
                Err(e) => {
                    tracing::error!(worker = id, error = %e, "spawning worker failed");
                    slot.restart_at = Some(now + self.config.initial_backoff);
                }
            }
            self.slots.push(slot);
        }
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
            if let Some(code) = self.finished() {
                return code;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited(pid, exit) => self.on_exit(pid, exit),
            Event::Probe { pid, healthy } => self.on_probe(pid, healthy),
            Event::Signal(signal) => self.on_signal(signal),
            Event::CpuLimit(limit) => self.on_cpu_limit(limit),
            Event::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Event::ProxyDrained => self.on_proxy_drained(),
        }
        self.publish();
    }

    // ---- spawning -------------------------------------------------------

    fn spawn_proc(&self, slot: &Slot, workers: u32, now: Instant) -> io::Result<Proc> {
        let mut setup = WorkerSetup::default();
        let id = slot.id.to_string();
        setup.env.push(("WORKER_ID".into(), id.clone()));
        setup.env.push(("NODE_APP_INSTANCE".into(), id));
        setup.env.push(("CLUSTERD_WORKERS".into(), workers.to_string()));
        setup.env.push(("CLUSTERD_POOL".into(), slot.pool.to_string()));
        setup.env.push(("CLUSTERD_PORT_MODE".into(), self.config.port_mode.as_str().into()));
        let addr = match &self.port {
            PortSetup::Proxy { .. } => {
                let port = free_loopback_port()?;
                setup.env.push(("HOST".into(), Ipv4Addr::LOCALHOST.to_string()));
                setup.env.push(("PORT".into(), port.to_string()));
                SocketAddr::from((Ipv4Addr::LOCALHOST, port))
            }
            PortSetup::Inherit(listener) => {
                let listener =
                    listener.as_ref().ok_or_else(|| io::Error::other("the shared socket is already closed"))?;
                setup.listen_fd = Some(listener.as_raw_fd());
                setup.env.push(("PORT".into(), self.config.port.to_string()));
                setup.env.push(("LISTEN_FDS".into(), "1".into()));
                setup.env.push(("LISTEN_FDNAMES".into(), "clusterd".into()));
                SocketAddr::from((self.config.bind, self.config.port))
            }
            PortSetup::Reuseport => {
                // The workers bind the shared port themselves: on clusterd's --bind.
                setup.env.push(("HOST".into(), self.config.bind.to_string()));
                setup.env.push(("PORT".into(), self.config.port.to_string()));
                setup.env.push(("CLUSTERD_REUSEPORT".into(), "1".into()));
                SocketAddr::from((self.config.bind, self.config.port))
            }
        };
        let spawned = spawn::spawn(&self.spec, &setup)?;
        tracing::info!(worker = slot.id, pid = spawned.pid, pool = %slot.pool, "worker started");
        if let Some(stdout) = spawned.stdout {
            output::forward(stdout, slot.id, Stream::Stdout, self.config.log_format);
        }
        if let Some(stderr) = spawned.stderr {
            output::forward(stderr, slot.id, Stream::Stderr, self.config.log_format);
        }
        let backend = Arc::new(Backend::new(slot.id, spawned.pid, addr, Arc::clone(&slot.pool), &self.metrics));
        Ok(Proc::new(backend, now))
    }

    fn is_proxy(&self) -> bool {
        matches!(self.port, PortSetup::Proxy { .. })
    }

    // ---- events ---------------------------------------------------------

    fn on_exit(&mut self, pid: u32, exit: ExitInfo) {
        let now = Instant::now();
        let shutting_down = self.shutdown.is_some();
        let config = Arc::clone(&self.config);
        for slot in &mut self.slots {
            if slot.current.as_ref().is_some_and(|p| p.pid == pid) {
                let proc = slot.current.take();
                let hint = proc.as_ref().filter(|p| p.state == WorkerState::Starting).and_then(|_| {
                    // Died before it was ready: say what the mode needs.
                    not_ready_hint(config.port_mode)
                });
                slot.last_exit = Some(match hint {
                    Some(hint) => {
                        tracing::warn!(worker = slot.id, pid, %exit, "worker exited before it was ready: {hint}");
                        format!("{exit} before it was ready: {hint}")
                    }
                    None => exit.to_string(),
                });
                slot.since = Timestamp::now();
                if shutting_down {
                    tracing::info!(worker = slot.id, pid, %exit, "worker stopped");
                    return;
                }
                if let Some(replacement) = slot.replacement.take() {
                    // A reload or recycle was under way: its process takes over.
                    tracing::warn!(worker = slot.id, pid, %exit, "worker exited; its replacement takes over");
                    slot.current = Some(replacement);
                    slot.reloading = false;
                    return;
                }
                if proc.is_some_and(|p| now.duration_since(p.started) >= config.stable_after) {
                    slot.crashes = 0;
                }
                let delay = schedule_restart(slot, &config, now);
                tracing::warn!(worker = slot.id, pid, %exit, crashes = slot.crashes, restart_in = ?delay, "worker exited");
                return;
            }
            if slot.replacement.as_ref().is_some_and(|p| p.pid == pid) {
                slot.replacement = None;
                slot.reloading = false;
                slot.last_exit = Some(exit.to_string());
                slot.crashes += 1;
                tracing::warn!(worker = slot.id, pid, %exit, "replacement worker exited before it was ready; keeping the old one");
                return;
            }
        }
        if let Some(index) = self.retired.iter().position(|p| p.pid == pid) {
            let proc = self.retired.swap_remove(index);
            tracing::info!(worker = proc.backend.worker_id, pid, %exit, "drained worker stopped");
            return;
        }
        tracing::debug!(pid, %exit, "reaped an orphaned process");
    }

    fn on_probe(&mut self, pid: u32, healthy: bool) {
        let threshold = self.config.health_failure_threshold;
        let now = Instant::now();
        let Some(proc) = self
            .slots
            .iter_mut()
            .flat_map(|s| s.current.iter_mut().chain(s.replacement.iter_mut()))
            .find(|p| p.pid == pid)
        else {
            return;
        };
        proc.probing = false;
        if healthy {
            proc.failures = 0;
            proc.failing_since = None;
            if matches!(proc.state, WorkerState::Starting | WorkerState::Unhealthy) {
                tracing::info!(worker = proc.backend.worker_id, pid, "worker ready");
                proc.set_state(WorkerState::Ready);
            }
            return;
        }
        proc.failures += 1;
        if proc.state != WorkerState::Starting {
            proc.failing_since.get_or_insert(now);
        }
        if proc.state == WorkerState::Ready && proc.failures >= threshold {
            tracing::warn!(
                worker = proc.backend.worker_id,
                pid,
                failures = proc.failures,
                "worker unhealthy; out of rotation"
            );
            proc.set_state(WorkerState::Unhealthy);
        }
    }

    fn on_signal(&mut self, signal: Signal) {
        tracing::info!(signal = signal.as_str(), "signal received");
        match signal {
            Signal::SIGTERM | Signal::SIGINT => self.begin_shutdown(false),
            Signal::SIGQUIT => self.begin_shutdown(true),
            Signal::SIGHUP => self.begin_reload(),
            other => self.signal_all(other),
        }
    }

    fn on_cpu_limit(&mut self, limit: CpuLimit) {
        if self.shutdown.is_some() {
            return;
        }
        if limit != self.cpu {
            tracing::info!(cores = ?limit.cores, source = %limit.source, "CPU limit changed");
            self.cpu = limit;
            self.warn_if_capped();
        }
        let wanted = self.layout().len() as u32;
        let current = self.slots.len() as u32;
        if wanted == current {
            self.pending_desired = None;
        } else if self.pending_desired == Some(wanted) {
            self.pending_desired = None;
            self.scale_to(wanted);
        } else {
            // Debounce: act only when the next poll sees the same count.
            self.pending_desired = Some(wanted);
        }
    }

    fn on_proxy_drained(&mut self) {
        if let Some(shutdown) = &mut self.shutdown
            && shutdown.phase == Phase::ProxyDraining
        {
            tracing::info!("proxy drained; stopping workers");
            shutdown.phase = Phase::Stopping;
            self.signal_all(Signal::SIGTERM);
        }
    }

    // ---- scaling, reload, shutdown --------------------------------------

    fn scale_to(&mut self, wanted: u32) {
        let now = Instant::now();
        let layout = self.layout();
        tracing::info!(from = self.slots.len(), to = wanted, "scaling workers");
        while self.slots.len() > layout.len() {
            let Some(slot) = self.slots.pop() else { break };
            tracing::info!(worker = slot.id, "removing worker slot; draining it");
            for mut proc in slot.current.into_iter().chain(slot.replacement) {
                proc.begin_drain(now, self.config.drain_timeout);
                self.retired.push(proc);
            }
        }
        for id in self.slots.len()..layout.len() {
            let mut slot = Slot::new(id as u32, layout[id].as_str().into());
            match self.spawn_proc(&slot, layout.len() as u32, now) {
                Ok(proc) => slot.current = Some(proc),
                Err(e) => {
                    tracing::error!(worker = id, error = %e, "spawning worker failed");
                    slot.crashes = 1;
                    slot.restart_at = Some(now + self.config.initial_backoff);
                }
            }
            self.slots.push(slot);
        }
    }

    fn begin_reload(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!(workers = self.slots.len(), "rolling reload: replacing workers one at a time");
        self.reload_queue = self.slots.iter().map(|s| s.id).collect();
    }

    fn begin_shutdown(&mut self, quick: bool) {
        let now = Instant::now();
        if let Some(shutdown) = &mut self.shutdown {
            // A second signal skips whatever is left of the grace period.
            match shutdown.phase {
                Phase::ProxyDraining => {
                    shutdown.phase = Phase::Stopping;
                    self.signal_all(Signal::SIGTERM);
                }
                Phase::Stopping => {
                    shutdown.phase = Phase::Killed(now);
                    self.signal_all(Signal::SIGKILL);
                }
                Phase::Killed(_) => {}
            }
            return;
        }
        tracing::info!(quick, drain_timeout = ?self.config.drain_timeout, "shutting down");
        self.shared.draining.store(true, Ordering::SeqCst);
        self.reload_queue.clear();
        let deadline = now + self.config.drain_timeout;
        let exit_code = if quick { 128 + Signal::SIGQUIT as u8 } else { 0 };
        let phase = match &mut self.port {
            PortSetup::Proxy { shutdown, .. } if !quick => {
                shutdown.cancel();
                Phase::ProxyDraining
            }
            PortSetup::Proxy { shutdown, .. } => {
                shutdown.cancel();
                Phase::Stopping
            }
            PortSetup::Inherit(listener) => {
                // Close clusterd's copy so the port stops accepting once the
                // workers close theirs.
                listener.take();
                Phase::Stopping
            }
            PortSetup::Reuseport => Phase::Stopping,
        };
        self.shutdown = Some(Shutdown { phase, deadline, exit_code, orphans: OrphanStop::NotYet });
        if phase == Phase::Stopping {
            self.signal_all(if quick { Signal::SIGQUIT } else { Signal::SIGTERM });
        }
    }

    fn all_procs(&self) -> impl Iterator<Item = &Proc> {
        self.slots.iter().flat_map(Slot::procs).chain(self.retired.iter())
    }

    fn signal_all(&self, signal: Signal) {
        for proc in self.all_procs() {
            signal_group(proc.pid, signal);
        }
    }

    fn finished(&self) -> Option<u8> {
        let shutdown = self.shutdown.as_ref()?;
        if self.all_procs().next().is_none() {
            return (shutdown.orphans == OrphanStop::Done).then_some(shutdown.exit_code);
        }
        match shutdown.phase {
            Phase::Killed(at) if at.elapsed() >= KILL_WAIT => {
                tracing::error!("workers did not exit after SIGKILL; giving up on them");
                Some(shutdown.exit_code)
            }
            _ => None,
        }
    }

    // ---- the periodic tick ---------------------------------------------

    fn tick(&mut self, now: Instant) {
        if self.shutdown.is_some() {
            self.tick_shutdown(now);
        } else {
            self.restart_due_slots(now);
            self.check_procs(now);
            self.promote_ready_replacements(now);
            self.start_recycles(now);
            self.advance_reload(now);
        }
        self.advance_drains(now);
        self.publish();
    }

    fn tick_shutdown(&mut self, now: Instant) {
        let workers_gone = self.all_procs().next().is_none();
        let Some(shutdown) = &mut self.shutdown else {
            return;
        };
        if workers_gone {
            shutdown.orphans = stop_orphans(shutdown.orphans, now);
            return;
        }
        if now < shutdown.deadline {
            return;
        }
        match shutdown.phase {
            Phase::ProxyDraining => {
                tracing::warn!("drain timeout: in-flight requests did not finish; stopping workers");
                shutdown.phase = Phase::Stopping;
                // The deadline already passed: TERM and KILL right away.
                shutdown.deadline = now + Duration::from_secs(1);
                self.signal_all(Signal::SIGTERM);
            }
            Phase::Stopping => {
                tracing::warn!("drain timeout: killing workers that are still running");
                shutdown.phase = Phase::Killed(now);
                self.signal_all(Signal::SIGKILL);
            }
            Phase::Killed(_) => {}
        }
    }

    fn restart_due_slots(&mut self, now: Instant) {
        let workers = self.slots.len() as u32;
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.current.is_some() || slot.restart_at.is_none_or(|at| at > now) {
                continue;
            }
            let result = self.spawn_proc(slot, workers, now);
            let slot = &mut self.slots[index];
            match result {
                Ok(proc) => {
                    slot.current = Some(proc);
                    slot.restart_at = None;
                    slot.restarts += 1;
                    self.metrics.restarts.inc();
                }
                Err(e) => {
                    tracing::error!(worker = slot.id, error = %e, "restarting worker failed");
                    schedule_restart(slot, &self.config, now);
                }
            }
        }
    }

    fn check_procs(&mut self, now: Instant) {
        let config = Arc::clone(&self.config);
        let proxy = self.is_proxy();
        let reuseport = matches!(self.port, PortSetup::Reuseport);
        let events = self.events.clone();
        for slot in &mut self.slots {
            for proc in slot.current.iter_mut().chain(slot.replacement.iter_mut()) {
                if proxy {
                    check_proxied(proc, &config, &events, now);
                } else {
                    check_shared_port(proc, &config, reuseport, now);
                }
            }
        }
    }

    fn promote_ready_replacements(&mut self, now: Instant) {
        for slot in &mut self.slots {
            if !slot.replacement.as_ref().is_some_and(|p| p.state == WorkerState::Ready) {
                continue;
            }
            let new = slot.replacement.take();
            if let Some(mut old) = std::mem::replace(&mut slot.current, new) {
                tracing::info!(worker = slot.id, old = old.pid, new = ?slot.current.as_ref().map(|p| p.pid), "replacement ready; draining the old worker");
                old.begin_drain(now, self.config.drain_timeout);
                self.retired.push(old);
            }
            slot.reloading = false;
        }
    }

    fn start_recycles(&mut self, now: Instant) {
        let (max_requests, max_mib) = (self.config.max_requests, self.config.max_memory_mib);
        if max_requests.is_none() && max_mib.is_none() {
            return;
        }
        let check_memory = max_mib.is_some() && now >= self.next_memory_check;
        if check_memory {
            self.next_memory_check = now + self.config.health_period;
        }
        let workers = self.slots.len() as u32;
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            let Some(proc) = slot.current.as_ref().filter(|p| p.state == WorkerState::Ready) else {
                continue;
            };
            if slot.replacement.is_some() {
                continue;
            }
            let served = proc.backend.requests.load(Ordering::Relaxed);
            let reason = if max_requests.is_some_and(|max| served >= max) {
                format!("served {served} requests")
            } else if let Some(rss) =
                max_mib.filter(|_| check_memory).and_then(|max| health::rss_mib(proc.pid).filter(|&rss| rss > max))
            {
                format!("RSS {rss} MiB")
            } else {
                continue;
            };
            tracing::info!(worker = slot.id, pid = proc.pid, %reason, "recycling worker");
            self.start_replacement(index, workers, now);
        }
    }

    fn start_replacement(&mut self, index: usize, workers: u32, now: Instant) -> bool {
        match self.spawn_proc(&self.slots[index], workers, now) {
            Ok(proc) => {
                self.slots[index].replacement = Some(proc);
                true
            }
            Err(e) => {
                tracing::error!(worker = self.slots[index].id, error = %e, "spawning replacement failed");
                false
            }
        }
    }

    fn advance_reload(&mut self, now: Instant) {
        if self.slots.iter().any(|s| s.reloading) {
            return;
        }
        let workers = self.slots.len() as u32;
        while let Some(id) = self.reload_queue.pop_front() {
            let Some(index) = self.slots.iter().position(|s| s.id == id && s.current.is_some()) else {
                continue;
            };
            if self.slots[index].replacement.is_some() {
                // A recycle already replaces this one.
                self.slots[index].reloading = true;
                return;
            }
            if self.start_replacement(index, workers, now) {
                self.slots[index].reloading = true;
                return;
            }
        }
    }

    fn advance_drains(&mut self, now: Instant) {
        let proxy = self.is_proxy();
        for proc in &mut self.retired {
            let Some(drain) = proc.drain.as_mut() else {
                continue;
            };
            // Upgraded connections keep it too: they close at the deadline.
            let idle = !proxy || proc.backend.is_idle();
            let grace_over = now.duration_since(drain.began) >= DRAIN_GRACE;
            if !drain.term_sent && ((idle && grace_over) || now >= drain.deadline) {
                drain.term_sent = true;
                signal_group(proc.pid, Signal::SIGTERM);
            } else if drain.term_sent && !drain.kill_sent && now >= drain.deadline + Duration::from_secs(1) {
                tracing::warn!(pid = proc.pid, "drained worker ignored SIGTERM; killing it");
                drain.kill_sent = true;
                signal_group(proc.pid, Signal::SIGKILL);
            }
        }
    }

    // ---- views ----------------------------------------------------------

    /// Pushes the rotation to the proxy and the counters to the admin server.
    fn publish(&self) {
        let ready = self.slots.iter().filter(|s| s.current.as_ref().is_some_and(|p| p.state.is_ready())).count();
        self.shared.ready.store(ready as u32, Ordering::SeqCst);
        self.metrics.cpu_limit.set(self.cores());
        self.metrics.desired_workers.set(self.slots.len() as i64);
        let PortSetup::Proxy { router, .. } = &self.port else {
            return;
        };
        for pool in router.pools() {
            let members = self
                .slots
                .iter()
                .filter(|s| *s.pool == *pool.name)
                .filter_map(|s| s.current.as_ref())
                .filter(|p| p.state.is_ready())
                .map(|p| Arc::clone(&p.backend))
                .collect();
            pool.set_members(members);
        }
    }

    pub fn status(&self) -> ClusterdStatus {
        let threshold = self.config.crash_loop_threshold;
        let proxy = self.is_proxy();
        let workers: Vec<WorkerStatus> = self
            .slots
            .iter()
            .map(|slot| {
                let proc = slot.current.as_ref();
                WorkerStatus {
                    id: slot.id,
                    pid: proc.map(|p| p.pid),
                    state: if self.shutdown.is_some() && proc.is_none() {
                        WorkerState::Stopped
                    } else {
                        slot.state(threshold)
                    },
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                    since: Some(proc.map_or(slot.since, |p| p.since).to_string()),
                    pool: Some(slot.pool.to_string()),
                    port: proc.filter(|_| proxy).map(|p| p.backend.addr.port()),
                    in_flight: proc.map_or(0, |p| p.backend.in_flight.load(Ordering::Relaxed)),
                    requests: proc.map_or(0, |p| p.backend.requests.load(Ordering::Relaxed)),
                    connections: proc.map_or(0, |p| p.backend.connections.load(Ordering::Relaxed)),
                }
            })
            .collect();
        ClusterdStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            cpu: self.cpu.clone(),
            desired_workers: self.slots.len() as u32,
            ready_workers: workers.iter().filter(|w| w.state.is_ready()).count() as u32,
            port_mode: self.config.port_mode.as_str().to_string(),
            port: self.config.port,
            started_at: self.started_at.to_string(),
            draining: self.shutdown.is_some(),
            workers,
            pools: match &self.port {
                PortSetup::Proxy { router, .. } => router.pools().map(|pool| pool.status()).collect(),
                _ => Vec::new(),
            },
        }
    }
}

/// Counts a crash and sets when the slot restarts: exponential backoff, and
/// the maximum backoff once the slot is in CrashLoop.
fn schedule_restart(slot: &mut Slot, config: &Config, now: Instant) -> Duration {
    slot.crashes += 1;
    let delay = if slot.crashes >= config.crash_loop_threshold {
        config.max_backoff
    } else {
        backoff(slot.crashes, config.initial_backoff, config.max_backoff)
    };
    slot.restart_at = Some(now + delay);
    delay
}

/// One step of stopping adopted processes once the workers are gone:
/// SIGTERM, SIGKILL after [`ORPHAN_GRACE`], give up after [`KILL_WAIT`].
fn stop_orphans(step: OrphanStop, now: Instant) -> OrphanStop {
    if step == OrphanStop::Done {
        return step;
    }
    let orphans = orphans::children_of(std::process::id());
    if orphans.is_empty() {
        return OrphanStop::Done;
    }
    match step {
        OrphanStop::NotYet => {
            tracing::info!(?orphans, "stopping processes the workers left behind");
            orphans::signal(&orphans, Signal::SIGTERM);
            OrphanStop::Terminated(now)
        }
        OrphanStop::Terminated(at) if now.duration_since(at) >= ORPHAN_GRACE => {
            tracing::warn!(?orphans, "processes the workers left behind ignored SIGTERM; killing them");
            orphans::signal(&orphans, Signal::SIGKILL);
            OrphanStop::Killed(now)
        }
        OrphanStop::Killed(at) if now.duration_since(at) >= KILL_WAIT => {
            tracing::error!(?orphans, "processes did not exit after SIGKILL; giving up on them");
            OrphanStop::Done
        }
        step => step,
    }
}

/// What a worker that exits before it is ready may have missed: the modes
/// where the app must take part in sharing the port.
fn not_ready_hint(mode: PortMode) -> Option<&'static str> {
    match mode {
        PortMode::Proxy => None,
        PortMode::Inherit => Some(
            "inherit mode passes the shared socket as fd 3 (LISTEN_FDS=1) and the app must listen on it \
             (an app that listens on PORT itself gets EADDRINUSE); proxy mode needs nothing from the app",
        ),
        PortMode::Reuseport => Some(
            "reuseport mode needs the app to bind PORT with SO_REUSEPORT (Node >= 22.12: \
             listen({port, reusePort: true})); proxy mode needs nothing from the app",
        ),
    }
}

/// Proxy mode: probe the worker's private port; hung workers get SIGKILL.
fn check_proxied(proc: &mut Proc, config: &Config, events: &UnboundedSender<Event>, now: Instant) {
    let hung = match proc.state {
        WorkerState::Starting => now.duration_since(proc.started) >= config.hung_after,
        _ => proc.failing_since.is_some_and(|since| now.duration_since(since) >= config.hung_after),
    };
    if hung && !proc.killed {
        tracing::warn!(worker = proc.backend.worker_id, pid = proc.pid, hung_after = ?config.hung_after, "worker hung; killing it");
        proc.killed = true;
        signal_group(proc.pid, Signal::SIGKILL);
        return;
    }
    if proc.probing || now < proc.next_check || proc.killed {
        return;
    }
    if config.health_check == HealthCheck::None {
        // Without probes a worker is ready as soon as it is started.
        proc.set_state(WorkerState::Ready);
        return;
    }
    let starting = proc.state == WorkerState::Starting;
    let interval = if starting { STARTING_PROBE_INTERVAL.min(config.health_period) } else { config.health_period };
    proc.next_check = now + interval;
    proc.probing = true;
    let (kind, addr, pid, events) = (config.health_check, proc.backend.addr, proc.pid, events.clone());
    let (path, timeout) = (config.health_path.clone(), config.health_timeout);
    tokio::spawn(async move {
        let healthy = if starting {
            // Keeps trying within the interval, so a (re)started worker is
            // in rotation moments after it listens, not at the next tick.
            health::probe_starting(kind, addr, &path, timeout, interval).await
        } else {
            health::probe(kind, addr, &path, timeout).await
        };
        let _ = events.send(Event::Probe { pid, healthy });
    });
}

/// inherit/reuseport modes: workers share one port, so they cannot be
/// probed one by one. A live worker counts as Ready after the startup grace;
/// in reuseport mode it must also have bound the port itself by then.
fn check_shared_port(proc: &mut Proc, config: &Config, reuseport: bool, now: Instant) {
    if proc.state != WorkerState::Starting || proc.killed {
        return;
    }
    let age = now.duration_since(proc.started);
    if age < config.startup_grace || now < proc.next_check {
        return;
    }
    proc.next_check = now + STARTING_PROBE_INTERVAL;
    if !reuseport || health::listens_on(proc.pid, config.port) {
        tracing::info!(worker = proc.backend.worker_id, pid = proc.pid, "worker ready");
        proc.set_state(WorkerState::Ready);
    } else if age >= config.hung_after {
        tracing::warn!(
            worker = proc.backend.worker_id,
            pid = proc.pid,
            "worker never bound the shared port; killing it"
        );
        proc.killed = true;
        signal_group(proc.pid, Signal::SIGKILL);
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
