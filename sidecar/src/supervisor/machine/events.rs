//! The machine's events: exits, spawn outcomes, probe results, listening
//! and drained workers, signals and CPU limit changes.

use std::sync::Arc;
use std::time::Instant;

use clustered_api::wire::WorkerState;
use nix::sys::signal::Signal;

use super::*;

impl Machine {
    /// A process was reaped. A worker's process group is stopped with it:
    /// a wrapper's server (`npm start`, `sh -c`) or anything else it left
    /// in its group would otherwise run on beside its replacement, holding
    /// memory, a port or, with an inherited socket, taking connections.
    /// Processes that left the group (a `setsid` daemon) stay until
    /// shutdown, as under tini.
    pub fn exited(&mut self, pid: u32, exit: ExitInfo, now: Instant) -> Vec<Action> {
        let Some(proc) = self.forget(pid, exit, now) else {
            return Vec::new();
        };
        if self.shutdown.is_some() {
            // At shutdown the adopted processes are stopped all together.
            return Vec::new();
        }
        match proc.drain {
            // Drained and told to stop already: what is left finishes its
            // connections until the drain's own deadline.
            Some(drain) if drain.term_sent => {
                let kill_at = (now + ORPHAN_GRACE).max(drain.deadline + DRAIN_KILL_AFTER);
                self.leftover_groups.push((pid, kill_at));
                Vec::new()
            }
            _ => {
                self.leftover_groups.push((pid, now + ORPHAN_GRACE));
                vec![Action::SignalGroup { group: pid, signal: Signal::SIGTERM }]
            }
        }
    }

    /// Takes an exited process out of its slot (deciding the slot's
    /// restart) or out of the drained ones; `None` if it was no worker.
    fn forget(&mut self, pid: u32, exit: ExitInfo, now: Instant) -> Option<Proc> {
        let shutting_down = self.shutdown.is_some();
        let config = Arc::clone(&self.config);
        for slot in &mut self.slots {
            if slot.current.as_ref().is_some_and(|p| p.pid == pid) {
                let proc = slot.current.take()?;
                // Died before it was ready: say what the mode needs.
                let hint = (proc.state == WorkerState::Starting).then(|| not_ready_hint(config.port_mode)).flatten();
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
                    return Some(proc);
                }
                if let Some(replacement) = slot.replacement.take() {
                    // A reload or recycle was under way: its process takes over.
                    tracing::warn!(worker = slot.id, pid, %exit, "worker exited; its replacement takes over");
                    slot.current = Some(replacement);
                    slot.reloading = false;
                    return Some(proc);
                }
                if is_clean_exit(&proc, exit) {
                    // Done, not broken (e.g. an app that exits after N
                    // requests): no backoff, and not a crash.
                    slot.crashes = 0;
                    slot.clean_exits += 1;
                    slot.clean_exit_pending = true;
                    slot.restart_at = Some(now);
                    tracing::info!(worker = slot.id, pid, "worker exited cleanly after serving; restarting it at once");
                    return Some(proc);
                }
                if now.duration_since(proc.started) >= config.stable_after {
                    slot.crashes = 0;
                }
                let delay = schedule_restart(slot, &config, now);
                tracing::warn!(worker = slot.id, pid, %exit, crashes = slot.crashes, restart_in = ?delay, "worker exited");
                return Some(proc);
            }
            if slot.replacement.as_ref().is_some_and(|p| p.pid == pid) {
                let proc = slot.replacement.take();
                slot.reloading = false;
                slot.last_exit = Some(exit.to_string());
                slot.crashes += 1;
                tracing::warn!(worker = slot.id, pid, %exit, "replacement worker exited before it was ready; keeping the old one");
                return proc;
            }
        }
        if let Some(index) = self.retired.iter().position(|p| p.pid == pid) {
            let proc = self.retired.swap_remove(index);
            tracing::info!(worker = proc.worker_id, pid, %exit, "drained worker stopped");
            return Some(proc);
        }
        tracing::debug!(pid, %exit, "reaped an orphaned process");
        None
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
}

/// A clean exit: status 0 from a process that had been Ready. It restarts
/// at once and is not counted as a crash. One that exits 0 before it was
/// ever Ready is a crash like any other (a tight loop of exits backs off).
fn is_clean_exit(proc: &Proc, exit: ExitInfo) -> bool {
    exit == ExitInfo::Code(0) && proc.state != WorkerState::Starting
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
