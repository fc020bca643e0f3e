//! Scaling to the CPU limit, rolling reloads and shutdown.

use std::time::Instant;

use nix::sys::signal::Signal;

use super::*;

impl Machine {
    pub(super) fn scale_to(&mut self, wanted: u32, now: Instant) -> Vec<Action> {
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

    pub(super) fn begin_reload(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!(workers = self.slots.len(), "rolling reload: replacing workers one at a time");
        self.reload_queue = self.slots.iter().map(|s| s.id).collect();
    }

    pub(super) fn begin_shutdown(&mut self, quick: bool, now: Instant) -> Vec<Action> {
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

    pub(super) fn signal_all(&self, signal: Signal) -> Vec<Action> {
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
}
