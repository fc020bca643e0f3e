//! The supervisor's decisions, without processes: the worker slots and
//! their state, fed with events (exits, probe results, signals, CPU limit
//! changes, the proxy drained, the periodic tick) and the time `now`, and
//! answering with the [`Action`]s to take. What it needs to know about the
//! world it asks through [`Observe`]. Forking, signalling, probing and the
//! proxy's rotation are done by the supervisor in `mod.rs`, which reports a
//! spawn's outcome back with [`Machine::spawned`].

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustered_api::wire::{CpuLimit, WorkerState};
use jiff::Timestamp;
use nix::sys::signal::Signal;

use super::reaper::ExitInfo;
use super::worker::{Proc, Slot, backoff};
use crate::config::{Config, HealthCheck, PortMode, RouteSpec};
use crate::policy::{WorkerPolicy, slot_layout};

/// Probe interval while a worker is starting, so it joins the rotation soon.
pub const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A drained worker stays out of rotation at least this long before its
/// SIGTERM, so requests that picked it just before removal still arrive.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// After SIGKILL at the deadline, how long to wait for the last exits.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long processes the workers left behind get between SIGTERM and
/// SIGKILL at shutdown (the workers' own drain is over by then).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// Why a process is started; decides what a failed spawn means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnKind {
    /// The first process of a slot at start-up.
    First,
    /// An empty slot's backoff is over.
    Restart,
    /// A worker exited cleanly (status 0 after it was Ready): no backoff.
    AfterCleanExit,
    /// A slot added because the CPU limit grew.
    ScaleUp,
    /// A process to take over from a running one (reload, recycle).
    Replacement,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a process for the slot; report with [`Machine::spawned`].
    Spawn { slot: u32, kind: SpawnKind },
    /// Signal a worker's process group.
    Signal { pid: u32, signal: Signal },
    /// Signal processes the workers left behind (and the groups they lead).
    SignalOrphans { pids: Vec<u32>, signal: Signal },
    /// Probe a proxied worker's port; report with [`Machine::probed`].
    Probe { pid: u32, starting: bool, interval: Duration },
    /// Shutdown began: say so on /readyz, stop taking new connections.
    StopAccepting,
}

/// What the decisions read from the world, only when they need it.
pub trait Observe {
    /// Requests the proxy has in flight to the process, and upgraded
    /// connections (WebSocket…) open to it: a drain waits for both, up to
    /// its deadline.
    fn in_flight(&self, pid: u32) -> u64;
    /// Requests the process has served.
    fn requests(&self, pid: u32) -> u64;
    /// Requests that came back from the process (answered or failed).
    fn finished(&self, pid: u32) -> u64;
    /// Resident memory of the process and those it started, in MiB (the
    /// figure /status shows).
    fn rss_mib(&self, pid: u32) -> Option<u64>;
    /// Whether the process, or one it started (a wrapper's child, a
    /// pre-fork server's workers), listens on the shared port (reuseport mode).
    fn listens(&self, pid: u32, port: u16) -> bool;
    /// Live processes the workers left behind, adopted by clusterd.
    fn orphans(&self) -> Vec<u32>;
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

#[derive(Debug)]
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

pub struct Machine {
    config: Arc<Config>,
    policy: WorkerPolicy,
    pools: Vec<RouteSpec>,
    cpu: CpuLimit,
    /// CPUs clusterd may run on: the worker count when no limit is known.
    affinity: usize,
    /// A new worker count seen once, applied when the next poll confirms it.
    pending_desired: Option<u32>,
    slots: Vec<Slot>,
    /// Processes that left their slot (reload, recycle, scale-down) and are draining.
    retired: Vec<Proc>,
    reload_queue: VecDeque<u32>,
    /// Memory is read from /proc once per health period, not every tick.
    next_memory_check: Instant,
    shutdown: Option<Shutdown>,
}

impl Machine {
    pub fn new(config: Arc<Config>, cpu: CpuLimit, affinity: usize, now: Instant) -> Machine {
        Machine {
            policy: config.policy(),
            pools: config.pools(),
            config,
            cpu,
            affinity,
            pending_desired: None,
            slots: Vec::new(),
            retired: Vec::new(),
            reload_queue: VecDeque::new(),
            next_memory_check: now,
            shutdown: None,
        }
    }

    // ---- views ----------------------------------------------------------

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn slot(&self, id: u32) -> Option<&Slot> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// Processes draining after they left their slot.
    pub fn retired(&self) -> &[Proc] {
        &self.retired
    }

    pub fn cpu(&self) -> &CpuLimit {
        &self.cpu
    }

    pub fn cores(&self) -> f64 {
        self.cpu.cores.unwrap_or(self.affinity as f64)
    }

    pub fn draining(&self) -> bool {
        self.shutdown.is_some()
    }

    /// The state /status shows for a slot.
    pub fn shown_state(&self, slot: &Slot) -> WorkerState {
        if self.shutdown.is_some() && slot.current.is_none() {
            WorkerState::Stopped
        } else {
            slot.state(self.config.crash_loop_threshold)
        }
    }

    /// The processes in rotation: each slot's current one, when ready.
    pub fn in_rotation(&self) -> impl Iterator<Item = (&Slot, &Proc)> {
        self.slots.iter().filter_map(|s| s.current.as_ref().filter(|p| p.state.is_ready()).map(|p| (s, p)))
    }

    /// Whether `slot`, out of rotation or not, will have a process in
    /// rotation within `within` unless it fails: one is starting (after a
    /// clean exit, a scale-up, a short backoff) or its restart is due by
    /// then. Not in a crash loop nor at shutdown. The proxy holds a request
    /// that finds its pool empty for such a slot rather than answer 503.
    pub fn back_soon(&self, slot: &Slot, now: Instant, within: Duration) -> bool {
        if self.shutdown.is_some() || slot.crashes >= self.config.crash_loop_threshold {
            return false;
        }
        match &slot.current {
            Some(proc) => proc.state == WorkerState::Starting,
            None => slot.spawning.is_some() || slot.restart_at.is_some_and(|at| at <= now + within),
        }
    }

    /// Every worker process: each slot's current one and replacement, and
    /// those draining after they left their slot.
    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.slots.iter().flat_map(Slot::procs).chain(self.retired.iter())
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

    fn is_proxy(&self) -> bool {
        self.config.port_mode == PortMode::Proxy
    }

    // ---- start and spawns -----------------------------------------------

    /// The first workers: one spawn per slot of the layout.
    pub fn start(&mut self) -> Vec<Action> {
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
        self.slots = layout.iter().enumerate().map(|(id, pool)| Slot::new(id as u32, pool.as_str().into())).collect();
        self.slots.iter_mut().map(|slot| spawn(slot, SpawnKind::First)).collect()
    }

    /// A spawn asked for by an [`Action::Spawn`] succeeded (with the pid) or failed.
    pub fn spawned(&mut self, id: u32, kind: SpawnKind, result: Result<u32, &io::Error>, now: Instant) -> Vec<Action> {
        let config = Arc::clone(&self.config);
        let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) else {
            return Vec::new();
        };
        slot.spawning = None;
        match (result, kind) {
            (Ok(pid), SpawnKind::Replacement) => slot.replacement = Some(Proc::new(pid, id, now)),
            (Ok(pid), kind) => {
                slot.current = Some(Proc::new(pid, id, now));
                match kind {
                    SpawnKind::Restart => {
                        slot.restart_at = None;
                        slot.restarts += 1;
                    }
                    SpawnKind::AfterCleanExit => slot.restart_at = None,
                    _ => {}
                }
            }
            (Err(e), SpawnKind::First) => {
                tracing::error!(worker = id, error = %e, "spawning worker failed");
                slot.restart_at = Some(now + config.initial_backoff);
            }
            (Err(e), SpawnKind::ScaleUp) => {
                tracing::error!(worker = id, error = %e, "spawning worker failed");
                slot.crashes = 1;
                slot.restart_at = Some(now + config.initial_backoff);
            }
            (Err(e), SpawnKind::Restart | SpawnKind::AfterCleanExit) => {
                tracing::error!(worker = id, error = %e, "restarting worker failed");
                schedule_restart(slot, &config, now);
            }
            (Err(e), SpawnKind::Replacement) => {
                tracing::error!(worker = id, error = %e, "spawning replacement failed");
                if std::mem::take(&mut slot.reloading) {
                    // The reload goes on with the next worker.
                    return self.advance_reload();
                }
            }
        }
        Vec::new()
    }

    // ---- events ---------------------------------------------------------

    pub fn exited(&mut self, pid: u32, exit: ExitInfo, now: Instant) {
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
                if proc.as_ref().is_some_and(|p| is_clean_exit(p, exit)) {
                    // Done, not broken (e.g. an app that exits after N
                    // requests): no backoff, and not a crash.
                    slot.crashes = 0;
                    slot.clean_exits += 1;
                    slot.clean_exit_pending = true;
                    slot.restart_at = Some(now);
                    tracing::info!(worker = slot.id, pid, "worker exited cleanly after serving; restarting it at once");
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
            tracing::info!(worker = proc.worker_id, pid, %exit, "drained worker stopped");
            return;
        }
        tracing::debug!(pid, %exit, "reaped an orphaned process");
    }

    /// Node mode: the worker listens on the shared socket, so it is Ready.
    pub fn listening(&mut self, pid: u32) {
        let proc = self
            .slots
            .iter_mut()
            .flat_map(|s| s.current.iter_mut().chain(s.replacement.iter_mut()))
            .find(|p| p.pid == pid && p.state == WorkerState::Starting && !p.killed);
        if let Some(proc) = proc {
            tracing::info!(worker = proc.worker_id, pid, "worker ready: listening on the shared socket");
            proc.set_state(WorkerState::Ready);
        }
    }

    /// Whether `pid` is a worker process that has not exited.
    pub fn is_live(&self, pid: u32) -> bool {
        self.procs().any(|p| p.pid == pid)
    }

    /// A probe's result. A failed probe of a worker with requests in
    /// flight that finished one lately (within the probes' own window,
    /// `--health-period` × `--health-failure-threshold`) says it is busy,
    /// not broken: a single-threaded worker behind a queue of requests
    /// answers its probe late. It stays in rotation. One that finishes
    /// nothing for that long counts its failures as before.
    pub fn probed(&mut self, pid: u32, healthy: bool, world: &dyn Observe, now: Instant) {
        let config = &self.config;
        let threshold = config.health_failure_threshold;
        let window = config.health_period * threshold;
        let Some(proc) = self
            .slots
            .iter_mut()
            .flat_map(|s| s.current.iter_mut().chain(s.replacement.iter_mut()))
            .find(|p| p.pid == pid)
        else {
            return;
        };
        proc.probing = false;
        let finished = world.finished(pid);
        if finished > proc.finished_at_probe {
            proc.finished_at_probe = finished;
            proc.last_progress = now;
        }
        if healthy {
            proc.failures = 0;
            proc.failing_since = None;
            if matches!(proc.state, WorkerState::Starting | WorkerState::Unhealthy) {
                tracing::info!(worker = proc.worker_id, pid, "worker ready");
                proc.set_state(WorkerState::Ready);
                proc.last_progress = now;
            }
            return;
        }
        let busy = world.in_flight(pid) > 0 && now.duration_since(proc.last_progress) <= window;
        if proc.state == WorkerState::Ready && busy {
            tracing::debug!(worker = proc.worker_id, pid, "probe failed while requests come back: busy, not broken");
            proc.failures = 0;
            proc.failing_since = None;
            return;
        }
        proc.failures += 1;
        if proc.state != WorkerState::Starting {
            proc.failing_since.get_or_insert(now);
        }
        if proc.state == WorkerState::Ready && proc.failures >= threshold {
            tracing::warn!(worker = proc.worker_id, pid, failures = proc.failures, "worker unhealthy; out of rotation");
            proc.set_state(WorkerState::Unhealthy);
        }
    }

    pub fn signal(&mut self, signal: Signal, now: Instant) -> Vec<Action> {
        tracing::info!(signal = signal.as_str(), "signal received");
        match signal {
            Signal::SIGTERM | Signal::SIGINT => self.begin_shutdown(false, now),
            Signal::SIGQUIT => self.begin_shutdown(true, now),
            Signal::SIGHUP => {
                self.begin_reload();
                Vec::new()
            }
            other => self.signal_all(other),
        }
    }

    /// A CPU limit as polled; `affinity` is the CPUs clusterd may run on now.
    pub fn cpu_limit(&mut self, limit: CpuLimit, affinity: usize, now: Instant) -> Vec<Action> {
        if self.shutdown.is_some() {
            return Vec::new();
        }
        self.affinity = affinity;
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
            return self.scale_to(wanted, now);
        } else {
            // Debounce: act only when the next poll sees the same count.
            self.pending_desired = Some(wanted);
        }
        Vec::new()
    }

    /// The proxy closed its listener and every client connection.
    pub fn proxy_drained(&mut self) -> Vec<Action> {
        if let Some(shutdown) = &mut self.shutdown
            && shutdown.phase == Phase::ProxyDraining
        {
            tracing::info!("proxy drained; stopping workers");
            shutdown.phase = Phase::Stopping;
            return self.signal_all(Signal::SIGTERM);
        }
        Vec::new()
    }

    // ---- scaling, reload, shutdown --------------------------------------

    fn scale_to(&mut self, wanted: u32, now: Instant) -> Vec<Action> {
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
        let mut actions = Vec::new();
        for (id, pool) in layout.iter().enumerate().skip(self.slots.len()) {
            let mut slot = Slot::new(id as u32, pool.as_str().into());
            actions.push(spawn(&mut slot, SpawnKind::ScaleUp));
            self.slots.push(slot);
        }
        actions
    }

    fn begin_reload(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!(workers = self.slots.len(), "rolling reload: replacing workers one at a time");
        self.reload_queue = self.slots.iter().map(|s| s.id).collect();
    }

    fn begin_shutdown(&mut self, quick: bool, now: Instant) -> Vec<Action> {
        if let Some(shutdown) = &mut self.shutdown {
            // A second signal skips whatever is left of the grace period.
            return match shutdown.phase {
                Phase::ProxyDraining => {
                    shutdown.phase = Phase::Stopping;
                    self.signal_all(Signal::SIGTERM)
                }
                Phase::Stopping => {
                    shutdown.phase = Phase::Killed(now);
                    self.signal_all(Signal::SIGKILL)
                }
                Phase::Killed(_) => Vec::new(),
            };
        }
        tracing::info!(quick, drain_timeout = ?self.config.drain_timeout, "shutting down");
        self.reload_queue.clear();
        let deadline = now + self.config.drain_timeout;
        let exit_code = if quick { 128 + Signal::SIGQUIT as u8 } else { 0 };
        // The proxy finishes in-flight requests before the workers stop; in
        // the other modes the workers do that themselves.
        let phase = if self.is_proxy() && !quick { Phase::ProxyDraining } else { Phase::Stopping };
        self.shutdown = Some(Shutdown { phase, deadline, exit_code, orphans: OrphanStop::NotYet });
        let mut actions = vec![Action::StopAccepting];
        if phase == Phase::Stopping {
            actions.extend(self.signal_all(if quick { Signal::SIGQUIT } else { Signal::SIGTERM }));
        }
        actions
    }

    fn signal_all(&self, signal: Signal) -> Vec<Action> {
        self.procs().map(|p| Action::Signal { pid: p.pid, signal }).collect()
    }

    /// Once shutdown is complete: the exit code.
    pub fn finished(&self, now: Instant) -> Option<u8> {
        let shutdown = self.shutdown.as_ref()?;
        if self.procs().next().is_none() {
            return (shutdown.orphans == OrphanStop::Done).then_some(shutdown.exit_code);
        }
        match shutdown.phase {
            Phase::Killed(at) if now.duration_since(at) >= KILL_WAIT => {
                tracing::error!("workers did not exit after SIGKILL; giving up on them");
                Some(shutdown.exit_code)
            }
            _ => None,
        }
    }

    // ---- the periodic tick ---------------------------------------------

    /// First part of the tick: empty slots whose backoff is over restart.
    /// The supervisor reports these spawns before [`Machine::tick`], so the
    /// new processes are checked in the same tick.
    pub fn restart_due(&mut self, now: Instant) -> Vec<Action> {
        if self.shutdown.is_some() {
            return Vec::new();
        }
        self.slots
            .iter_mut()
            .filter(|s| s.current.is_none() && s.spawning.is_none() && s.restart_at.is_some_and(|at| at <= now))
            .map(|slot| {
                let kind = if std::mem::take(&mut slot.clean_exit_pending) {
                    SpawnKind::AfterCleanExit
                } else {
                    SpawnKind::Restart
                };
                spawn(slot, kind)
            })
            .collect()
    }

    /// The rest of the tick: probes and hung workers, replacements, reload,
    /// drains, and the shutdown's steps.
    pub fn tick(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.shutdown.is_some() {
            actions.extend(self.tick_shutdown(now, world));
        } else {
            actions.extend(self.check_procs(now, world));
            self.promote_ready_replacements(now);
            actions.extend(self.start_recycles(now, world));
            actions.extend(self.advance_reload());
        }
        actions.extend(self.advance_drains(now, world));
        actions
    }

    fn tick_shutdown(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
        let workers_gone = self.procs().next().is_none();
        let Some(shutdown) = &mut self.shutdown else {
            return Vec::new();
        };
        if workers_gone {
            let (step, action) = stop_orphans(shutdown.orphans, now, world);
            shutdown.orphans = step;
            return action.into_iter().collect();
        }
        if now < shutdown.deadline {
            return Vec::new();
        }
        match shutdown.phase {
            Phase::ProxyDraining => {
                tracing::warn!("drain timeout: in-flight requests did not finish; stopping workers");
                shutdown.phase = Phase::Stopping;
                // The deadline already passed: TERM and KILL right away.
                shutdown.deadline = now + Duration::from_secs(1);
                self.signal_all(Signal::SIGTERM)
            }
            Phase::Stopping => {
                tracing::warn!("drain timeout: killing workers that are still running");
                shutdown.phase = Phase::Killed(now);
                self.signal_all(Signal::SIGKILL)
            }
            Phase::Killed(_) => Vec::new(),
        }
    }

    fn check_procs(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
        let config = Arc::clone(&self.config);
        let proxy = self.is_proxy();
        let mut actions = Vec::new();
        for slot in &mut self.slots {
            for proc in slot.current.iter_mut().chain(slot.replacement.iter_mut()) {
                let action = if proxy {
                    check_proxied(proc, &config, now)
                } else {
                    check_shared_port(proc, &config, now, world)
                };
                actions.extend(action);
            }
        }
        actions
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

    fn start_recycles(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
        let (max_requests, max_mib) = (self.config.max_requests, self.config.max_memory_mib);
        if max_requests.is_none() && max_mib.is_none() {
            return Vec::new();
        }
        let check_memory = max_mib.is_some() && now >= self.next_memory_check;
        if check_memory {
            self.next_memory_check = now + self.config.health_period;
        }
        let mut actions = Vec::new();
        for slot in &mut self.slots {
            let Some(proc) = slot.current.as_ref().filter(|p| p.state == WorkerState::Ready) else {
                continue;
            };
            if slot.replacement.is_some() || slot.spawning.is_some() {
                continue;
            }
            let served = world.requests(proc.pid);
            let rss = || max_mib.filter(|_| check_memory).and_then(|max| world.rss_mib(proc.pid).filter(|&r| r > max));
            let reason = if max_requests.is_some_and(|max| served >= max) {
                format!("served {served} requests")
            } else if let Some(rss) = rss() {
                format!("RSS {rss} MiB")
            } else {
                continue;
            };
            tracing::info!(worker = slot.id, pid = proc.pid, %reason, "recycling worker");
            actions.push(spawn(slot, SpawnKind::Replacement));
        }
        actions
    }

    fn advance_reload(&mut self) -> Vec<Action> {
        if self.slots.iter().any(|s| s.reloading) {
            return Vec::new();
        }
        while let Some(id) = self.reload_queue.pop_front() {
            let Some(slot) = self.slots.iter_mut().find(|s| s.id == id && s.current.is_some()) else {
                continue;
            };
            slot.reloading = true;
            if slot.replacement.is_some() || slot.spawning.is_some() {
                // A recycle already replaces this one.
                return Vec::new();
            }
            return vec![spawn(slot, SpawnKind::Replacement)];
        }
        Vec::new()
    }

    fn advance_drains(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
        let proxy = self.is_proxy();
        let mut actions = Vec::new();
        for proc in &mut self.retired {
            let Some(drain) = proc.drain.as_mut() else {
                continue;
            };
            let idle = !proxy || world.in_flight(proc.pid) == 0;
            let grace_over = now.duration_since(drain.began) >= DRAIN_GRACE;
            if !drain.term_sent && ((idle && grace_over) || now >= drain.deadline) {
                drain.term_sent = true;
                actions.push(Action::Signal { pid: proc.pid, signal: Signal::SIGTERM });
            } else if drain.term_sent && !drain.kill_sent && now >= drain.deadline + Duration::from_secs(1) {
                tracing::warn!(pid = proc.pid, "drained worker ignored SIGTERM; killing it");
                drain.kill_sent = true;
                actions.push(Action::Signal { pid: proc.pid, signal: Signal::SIGKILL });
            }
        }
        actions
    }
}

/// Asks for a process for the slot.
fn spawn(slot: &mut Slot, kind: SpawnKind) -> Action {
    slot.spawning = Some(kind);
    Action::Spawn { slot: slot.id, kind }
}

/// A clean exit: status 0 from a process that had been Ready. It restarts
/// at once and is not counted as a crash. One that exits 0 before it was
/// ever Ready is a crash like any other (a tight loop of exits backs off).
fn is_clean_exit(proc: &Proc, exit: ExitInfo) -> bool {
    exit == ExitInfo::Code(0) && proc.state != WorkerState::Starting
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
fn stop_orphans(step: OrphanStop, now: Instant, world: &dyn Observe) -> (OrphanStop, Option<Action>) {
    if step == OrphanStop::Done {
        return (step, None);
    }
    let orphans = world.orphans();
    if orphans.is_empty() {
        return (OrphanStop::Done, None);
    }
    match step {
        OrphanStop::NotYet => {
            tracing::info!(?orphans, "stopping processes the workers left behind");
            (OrphanStop::Terminated(now), Some(Action::SignalOrphans { pids: orphans, signal: Signal::SIGTERM }))
        }
        OrphanStop::Terminated(at) if now.duration_since(at) >= ORPHAN_GRACE => {
            tracing::warn!(?orphans, "processes the workers left behind ignored SIGTERM; killing them");
            (OrphanStop::Killed(now), Some(Action::SignalOrphans { pids: orphans, signal: Signal::SIGKILL }))
        }
        OrphanStop::Killed(at) if now.duration_since(at) >= KILL_WAIT => {
            tracing::error!(?orphans, "processes did not exit after SIGKILL; giving up on them");
            (OrphanStop::Done, None)
        }
        step => (step, None),
    }
}

/// What a worker that exits before it is ready may have missed: the modes
/// where the app must take part in sharing the port.
fn not_ready_hint(mode: PortMode) -> Option<&'static str> {
    match mode {
        PortMode::Proxy | PortMode::Auto => None,
        PortMode::Node => Some(
            "node mode shares the port through Node's cluster module: the worker must be Node itself (not a \
             wrapper like npm that starts node as a child) and call listen(PORT); proxy mode needs nothing from the app",
        ),
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
fn check_proxied(proc: &mut Proc, config: &Config, now: Instant) -> Option<Action> {
    let hung = match proc.state {
        WorkerState::Starting => now.duration_since(proc.started) >= config.hung_after,
        _ => proc.failing_since.is_some_and(|since| now.duration_since(since) >= config.hung_after),
    };
    if hung && !proc.killed {
        tracing::warn!(worker = proc.worker_id, pid = proc.pid, hung_after = ?config.hung_after, "worker hung; killing it");
        proc.killed = true;
        return Some(Action::Signal { pid: proc.pid, signal: Signal::SIGKILL });
    }
    if proc.probing || now < proc.next_check || proc.killed {
        return None;
    }
    if config.health_check == HealthCheck::None {
        // Without probes a worker is ready as soon as it is started.
        proc.set_state(WorkerState::Ready);
        return None;
    }
    let starting = proc.state == WorkerState::Starting;
    let interval = if starting { STARTING_PROBE_INTERVAL.min(config.health_period) } else { config.health_period };
    proc.next_check = now + interval;
    proc.probing = true;
    Some(Action::Probe { pid: proc.pid, starting, interval })
}

/// inherit/reuseport/node modes: workers share one port, so they cannot be
/// probed one by one. In inherit mode a live worker counts as Ready after
/// the startup grace; in reuseport mode it must also have bound the port
/// itself by then; in node mode it says when it listens (see
/// [`Machine::listening`]). One that never does is killed at `hung_after`.
fn check_shared_port(proc: &mut Proc, config: &Config, now: Instant, world: &dyn Observe) -> Option<Action> {
    if proc.state != WorkerState::Starting || proc.killed {
        return None;
    }
    let age = now.duration_since(proc.started);
    let mode = config.port_mode;
    if mode != PortMode::Node && (age < config.startup_grace || now < proc.next_check) {
        return None;
    }
    proc.next_check = now + STARTING_PROBE_INTERVAL;
    if mode == PortMode::Inherit || (mode == PortMode::Reuseport && world.listens(proc.pid, config.port)) {
        tracing::info!(worker = proc.worker_id, pid = proc.pid, "worker ready");
        proc.set_state(WorkerState::Ready);
        None
    } else if age >= config.hung_after {
        tracing::warn!(worker = proc.worker_id, pid = proc.pid, "worker never listened on the shared port; killing it");
        proc.killed = true;
        Some(Action::Signal { pid: proc.pid, signal: Signal::SIGKILL })
    } else {
        None
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
