//! The periodic tick: restarts whose backoff is over, health checks,
//! drains and their deadlines, dead workers' groups, orphans at shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustered_api::wire::WorkerState;
use nix::sys::signal::Signal;

use super::*;

impl Machine {
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
        actions.extend(self.kill_leftover_groups(now));
        actions
    }

    /// SIGKILL for what is left of dead workers' groups, their grace over.
    /// A number a new worker took again (its group now) is not touched: the
    /// old group was empty when that pid was handed out.
    pub(super) fn kill_leftover_groups(&mut self, now: Instant) -> Vec<Action> {
        let (due, waiting) = std::mem::take(&mut self.leftover_groups).into_iter().partition(|&(_, at)| at <= now);
        self.leftover_groups = waiting;
        due.into_iter()
            .filter(|&(group, _)| !self.is_live(group))
            .map(|(group, _)| Action::SignalGroup { group, signal: Signal::SIGKILL })
            .collect()
    }

    pub(super) fn tick_shutdown(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
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

    pub(super) fn check_procs(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
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

    pub(super) fn promote_ready_replacements(&mut self, now: Instant) {
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

    pub(super) fn start_recycles(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
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

    pub(super) fn advance_reload(&mut self) -> Vec<Action> {
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

    pub(super) fn advance_drains(&mut self, now: Instant, world: &dyn Observe) -> Vec<Action> {
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
            } else if drain.term_sent && !drain.kill_sent && now >= drain.deadline + DRAIN_KILL_AFTER {
                tracing::warn!(pid = proc.pid, "drained worker ignored SIGTERM; killing it");
                drain.kill_sent = true;
                actions.push(Action::Signal { pid: proc.pid, signal: Signal::SIGKILL });
            }
        }
        actions
    }
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
