//! The supervisor's decisions, without processes: the worker slots and
//! their state, fed with events (exits, probe results, signals, CPU limit
//! changes, the proxy drained, the periodic tick) and the time `now`, and
//! answering with the [`Action`]s to take. What it needs to know about the
//! world it asks through [`Observe`]. Forking, signalling, probing and the
//! proxy's rotation are done by the supervisor in `mod.rs`, which reports a
//! spawn's outcome back with [`Machine::spawned`].
//!
//! Here: the slots, the views the supervisor reads and the first spawns;
//! [`events`], [`scaling`] (the CPU limit, reloads, shutdown) and [`tick`]
//! (restarts, health checks, drains) are the rest of its `impl`.

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

mod events;
mod scaling;
mod tick;

/// Probe interval while a worker is starting, so it joins the rotation soon.
pub const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A drained worker stays out of rotation at least this long before its
/// SIGTERM, so requests that picked it just before removal still arrive.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// A drained worker that ignored its SIGTERM gets SIGKILL this long after
/// the drain's deadline.
pub const DRAIN_KILL_AFTER: Duration = Duration::from_secs(1);
/// After SIGKILL at the deadline, how long to wait for the last exits.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long processes the workers left behind get between SIGTERM and
/// SIGKILL: at shutdown (the workers' own drain is over by then), and what
/// is left of a dead worker's process group.
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
    /// Signal what is left of an exited worker's process group (its pid
    /// names the group while a member lives). Never the pid itself: the
    /// worker is gone.
    SignalGroup { group: u32, signal: Signal },
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
    /// Process groups of exited workers, SIGTERMed, to be SIGKILLed at the
    /// instant given.
    leftover_groups: Vec<(u32, Instant)>,
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
            leftover_groups: Vec::new(),
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
}

/// Asks for a process for the slot.
fn spawn(slot: &mut Slot, kind: SpawnKind) -> Action {
    slot.spawning = Some(kind);
    Action::Spawn { slot: slot.id, kind }
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

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
