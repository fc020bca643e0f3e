//! Worker slots and the processes that fill them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustered_api::wire::WorkerState;
use jiff::Timestamp;

use super::machine::SpawnKind;

/// One running worker process, as the supervisor's decisions see it (its
/// proxy backend, in proxy mode, is kept by the supervisor beside it).
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    /// The slot it serves.
    pub worker_id: u32,
    pub state: WorkerState,
    pub since: Timestamp,
    pub started: Instant,
    /// When it started, as /status shows it.
    pub started_at: Timestamp,
    /// When the next probe (or readiness check) is due.
    pub next_check: Instant,
    pub probing: bool,
    pub failures: u32,
    /// Start of the current run of failed probes.
    pub failing_since: Option<Instant>,
    /// Requests it had finished at its last probe, and when that count
    /// last grew (see `Machine::probed`).
    pub finished_at_probe: u64,
    pub last_progress: Instant,
    pub drain: Option<Drain>,
    pub killed: bool,
}

impl Proc {
    pub fn new(pid: u32, worker_id: u32, now: Instant) -> Proc {
        Proc {
            pid,
            worker_id,
            state: WorkerState::Starting,
            since: Timestamp::now(),
            started: now,
            started_at: Timestamp::now(),
            next_check: now,
            probing: false,
            failures: 0,
            failing_since: None,
            finished_at_probe: 0,
            last_progress: now,
            drain: None,
            killed: false,
        }
    }

    pub fn set_state(&mut self, state: WorkerState) {
        if self.state != state {
            self.state = state;
            self.since = Timestamp::now();
        }
    }

    /// Takes the process out of rotation to finish its in-flight work.
    pub fn begin_drain(&mut self, now: Instant, timeout: Duration) {
        self.set_state(WorkerState::Draining);
        self.drain.get_or_insert(Drain { began: now, deadline: now + timeout, term_sent: false, kill_sent: false });
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub began: Instant,
    pub deadline: Instant,
    pub term_sent: bool,
    pub kill_sent: bool,
}

/// A stable worker id and whatever process currently serves it.
#[derive(Debug)]
pub struct Slot {
    pub id: u32,
    pub pool: Arc<str>,
    pub current: Option<Proc>,
    /// A new process warming up to take over from `current` (reload, recycle).
    pub replacement: Option<Proc>,
    pub reloading: bool,
    /// A process was asked for and its spawn not reported yet.
    pub spawning: Option<SpawnKind>,
    /// Restarts after crashes (not after clean exits).
    pub restarts: u32,
    /// Exits with status 0 after the process was Ready: restarted at once.
    pub clean_exits: u32,
    /// The slot is empty after a clean exit: its restart has no backoff.
    pub clean_exit_pending: bool,
    /// Crashes since the last process that stayed up for `stable_after`.
    pub crashes: u32,
    pub last_exit: Option<String>,
    /// When the slot is empty: when to start the next process.
    pub restart_at: Option<Instant>,
    pub since: Timestamp,
}

impl Slot {
    pub fn new(id: u32, pool: Arc<str>) -> Slot {
        Slot {
            id,
            pool,
            current: None,
            replacement: None,
            reloading: false,
            spawning: None,
            restarts: 0,
            clean_exits: 0,
            clean_exit_pending: false,
            crashes: 0,
            last_exit: None,
            restart_at: None,
            since: Timestamp::now(),
        }
    }

    /// The state shown for the slot.
    pub fn state(&self, crash_loop_threshold: u32) -> WorkerState {
        match (&self.current, self.restart_at) {
            (Some(proc), _) => proc.state,
            (None, Some(_)) if self.clean_exit_pending => WorkerState::Starting,
            (None, Some(_)) if self.crashes >= crash_loop_threshold => WorkerState::CrashLoop,
            (None, Some(_)) => WorkerState::Backoff,
            (None, None) => WorkerState::Stopped,
        }
    }

    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.current.iter().chain(self.replacement.iter())
    }
}

/// Restart delay after `crashes` consecutive crashes: initial × 2^(n-1), capped.
pub fn backoff(crashes: u32, initial: Duration, max: Duration) -> Duration {
    let exponent = crashes.saturating_sub(1).min(31);
    initial.saturating_mul(1u32 << exponent).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(1, ms(100), ms(15_000)), ms(100));
        assert_eq!(backoff(2, ms(100), ms(15_000)), ms(200));
        assert_eq!(backoff(4, ms(100), ms(15_000)), ms(800));
        assert_eq!(backoff(9, ms(100), ms(15_000)), ms(15_000));
        assert_eq!(backoff(500, ms(100), ms(15_000)), ms(15_000));
    }

    #[test]
    fn empty_slot_states() {
        let mut slot = Slot::new(0, "default".into());
        assert_eq!(slot.state(5), WorkerState::Stopped);
        slot.restart_at = Some(Instant::now());
        slot.crashes = 2;
        assert_eq!(slot.state(5), WorkerState::Backoff);
        slot.crashes = 5;
        assert_eq!(slot.state(5), WorkerState::CrashLoop);
    }
}
