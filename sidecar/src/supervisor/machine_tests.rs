//! The supervisor's decisions, without processes: fake pids, explicit time.

use std::collections::HashMap;

use clap::Parser;

use super::*;

const SIGTERM: Signal = Signal::SIGTERM;
const SIGKILL: Signal = Signal::SIGKILL;

/// A world where the tests set every reading.
#[derive(Default)]
struct FakeWorld {
    in_flight: HashMap<u32, u64>,
    requests: HashMap<u32, u64>,
    finished: HashMap<u32, u64>,
    rss: HashMap<u32, u64>,
    listening: Vec<u32>,
    orphans: Vec<u32>,
}

impl Observe for FakeWorld {
    fn in_flight(&self, pid: u32) -> u64 {
        self.in_flight.get(&pid).copied().unwrap_or(0)
    }
    fn requests(&self, pid: u32) -> u64 {
        self.requests.get(&pid).copied().unwrap_or(0)
    }
    fn finished(&self, pid: u32) -> u64 {
        self.finished.get(&pid).copied().unwrap_or(0)
    }
    fn rss_mib(&self, pid: u32) -> Option<u64> {
        self.rss.get(&pid).copied()
    }
    fn listens(&self, pid: u32, _port: u16) -> bool {
        self.listening.contains(&pid)
    }
    fn orphans(&self) -> Vec<u32> {
        self.orphans.clone()
    }
}

/// Timings short and distinct enough to tell the decisions apart.
const BASE: &[&str] = &[
    "--initial-backoff",
    "100ms",
    "--max-backoff",
    "1s",
    "--crash-loop-threshold",
    "3",
    "--stable-after",
    "10s",
    "--hung-after",
    "5s",
    "--health-failure-threshold",
    "2",
    "--health-period",
    "1s",
    "--drain-timeout",
    "10s",
    "--startup-grace",
    "1s",
];

struct Harness {
    machine: Machine,
    world: FakeWorld,
    t0: Instant,
    next_pid: u32,
    /// Slots whose next spawn fails.
    failing: Vec<u32>,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn signals(actions: &[Action]) -> Vec<(u32, Signal)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { pid, signal } => Some((*pid, *signal)),
            _ => None,
        })
        .collect()
}

fn spawns(actions: &[Action]) -> Vec<Action> {
    actions.iter().filter(|a| matches!(a, Action::Spawn { .. })).cloned().collect()
}

impl Harness {
    /// A machine on 2 CPUs with [`BASE`] and `args`.
    fn new(args: &[&str]) -> Harness {
        let mut argv = vec!["clusterd"];
        argv.extend(BASE);
        argv.extend(args);
        argv.extend(["--", "app"]);
        let mut config = Config::try_parse_from(argv).expect("valid arguments");
        // "app" runs Node only where a test asks for node mode; `auto` is the proxy.
        let node = if args.contains(&"node") {
            crate::node::NodeCheck::Supported { version: "v22.0.0".into() }
        } else {
            crate::node::NodeCheck::NotNode
        };
        config.resolve_port_mode(|_| node).expect("a valid port mode");
        let config = Arc::new(config);
        let t0 = Instant::now();
        let cpu = CpuLimit { cores: Some(2.0), source: "override".into() };
        Harness {
            machine: Machine::new(config, cpu, 2, t0),
            world: FakeWorld::default(),
            t0,
            next_pid: 100,
            failing: Vec::new(),
        }
    }

    fn at(&self, millis: u64) -> Instant {
        self.t0 + ms(millis)
    }

    /// Carries out spawns with fresh fake pids (or fails them for the
    /// slots in `failing`); returns the other actions, in order.
    fn run(&mut self, actions: Vec<Action>, now: Instant) -> Vec<Action> {
        let mut queue = VecDeque::from(actions);
        let mut done = Vec::new();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { slot, kind } => {
                    let failed = io::Error::other("fork failed");
                    let result = if let Some(i) = self.failing.iter().position(|&s| s == slot) {
                        self.failing.remove(i);
                        Err(&failed)
                    } else {
                        self.next_pid += 1;
                        Ok(self.next_pid)
                    };
                    queue.extend(self.machine.spawned(slot, kind, result, now));
                    done.push(action);
                }
                other => done.push(other),
            }
        }
        done
    }

    fn start(&mut self) -> Vec<Action> {
        let actions = self.machine.start();
        self.run(actions, self.t0)
    }

    /// One tick as the supervisor runs it: restarts, then the rest.
    fn tick(&mut self, now: Instant) -> Vec<Action> {
        let restarts = self.machine.restart_due(now);
        let mut actions = self.run(restarts, now);
        let rest = self.machine.tick(now, &self.world);
        actions.extend(self.run(rest, now));
        actions
    }

    fn signal(&mut self, signal: Signal, now: Instant) -> Vec<Action> {
        let actions = self.machine.signal(signal, now);
        self.run(actions, now)
    }

    fn pid(&self, slot: usize) -> u32 {
        self.machine.slots[slot].current.as_ref().expect("a process in the slot").pid
    }

    fn replacement(&self, slot: usize) -> Option<u32> {
        self.machine.slots[slot].replacement.as_ref().map(|p| p.pid)
    }

    fn state(&self, slot: usize) -> WorkerState {
        self.machine.shown_state(&self.machine.slots[slot])
    }

    fn exit(&mut self, pid: u32, now: Instant) {
        self.machine.exited(pid, ExitInfo::Code(1), now);
    }

    /// Every process of every slot answers its probe.
    fn all_healthy(&mut self, now: Instant) {
        let pids: Vec<u32> = self.machine.slots.iter().flat_map(Slot::procs).map(|p| p.pid).collect();
        for pid in pids {
            self.machine.probed(pid, true, &self.world, now);
        }
    }

    fn retired(&self) -> Vec<(u32, WorkerState)> {
        self.machine.retired.iter().map(|p| (p.pid, p.state)).collect()
    }
}

// ---- start and restarts -------------------------------------------------

#[test]
fn start_asks_for_one_process_per_slot() {
    let mut h = Harness::new(&["--workers", "3"]);
    let actions = h.start();
    assert_eq!(actions.iter().filter(|a| matches!(a, Action::Spawn { kind: SpawnKind::First, .. })).count(), 3);
    assert!((0..3).all(|s| h.state(s) == WorkerState::Starting));
    assert_eq!([h.pid(0), h.pid(1), h.pid(2)], [101, 102, 103]);
}

#[test]
fn a_slot_that_could_not_start_retries_after_the_initial_backoff() {
    let mut h = Harness::new(&["--workers", "2"]);
    h.failing.push(1);
    h.start();
    assert_eq!(h.state(1), WorkerState::Backoff);
    assert!(h.tick(h.at(99)).iter().all(|a| !matches!(a, Action::Spawn { .. })));
    let actions = h.tick(h.at(100));
    assert!(actions.contains(&Action::Spawn { slot: 1, kind: SpawnKind::Restart }));
    assert_eq!(h.state(1), WorkerState::Starting);
    assert_eq!(h.machine.slots[1].restarts, 1);
}

#[test]
fn a_clean_exit_after_serving_restarts_at_once_and_is_no_crash() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    h.all_healthy(h.at(200));
    // Well within --stable-after, far more often than the crash-loop threshold.
    let mut now = h.at(300);
    for exit in 1..=10 {
        h.machine.exited(h.pid(0), ExitInfo::Code(0), now);
        assert_eq!(h.machine.slots[0].crashes, 0, "exit {exit}");
        assert_eq!(h.state(0), WorkerState::Starting, "exit {exit}: no Backoff, no CrashLoop");
        let spawned = spawns(&h.tick(now));
        assert_eq!(spawned, vec![Action::Spawn { slot: 0, kind: SpawnKind::AfterCleanExit }], "exit {exit}");
        now += ms(50);
        h.all_healthy(now);
        now += ms(50);
    }
    let slot = &h.machine.slots[0];
    assert_eq!((slot.clean_exits, slot.restarts), (10, 0), "counted apart from crash restarts");
}

#[test]
fn a_slot_is_back_soon_while_it_restarts_at_once_or_after_a_short_backoff() {
    let mut h = Harness::new(&["--workers", "1"]);
    let within = ms(2000);
    let back_soon = |h: &Harness, now| h.machine.back_soon(&h.machine.slots[0], now, within);
    h.start();
    assert!(back_soon(&h, h.at(0)), "starting");
    h.all_healthy(h.at(200));
    assert!(!back_soon(&h, h.at(200)), "in rotation: nothing to wait for");
    // A clean exit: restarted at once.
    h.machine.exited(h.pid(0), ExitInfo::Code(0), h.at(300));
    assert!(back_soon(&h, h.at(300)), "restart due now");
    h.tick(h.at(300));
    assert!(back_soon(&h, h.at(300)), "its new process is starting");
    h.all_healthy(h.at(400));
    // Crashes: back soon while the backoff ends within the bound (100, 200,
    // 400 ms here), never once in a crash loop (threshold 3).
    let mut now = h.at(500);
    for crash in 1..=3 {
        h.exit(h.pid(0), now);
        assert_eq!(back_soon(&h, now), crash < 3, "crash {crash}");
        now += ms(1000);
        h.tick(now);
    }
    assert!(!back_soon(&h, now), "crash loop: its starting process may well crash again");
    // A backoff that ends past the bound: not yet (100 ms here, against 50).
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    h.all_healthy(h.at(200));
    h.exit(h.pid(0), h.at(300));
    assert!(!h.machine.back_soon(&h.machine.slots[0], h.at(300), ms(50)), "a backoff past the bound");
    assert!(h.machine.back_soon(&h.machine.slots[0], h.at(360), ms(50)), "…until it is within it");
    h.signal(SIGTERM, h.at(360));
    assert!(!h.machine.back_soon(&h.machine.slots[0], h.at(360), ms(50)), "shutting down");
}

#[test]
fn an_exit_0_before_ready_or_a_crash_after_a_clean_exit_still_backs_off() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    // Never Ready: a command that exits 0 at once must not spin.
    h.machine.exited(h.pid(0), ExitInfo::Code(0), h.at(100));
    assert_eq!((h.machine.slots[0].crashes, h.state(0)), (1, WorkerState::Backoff));
    assert!(spawns(&h.tick(h.at(150))).is_empty());
    assert_eq!(spawns(&h.tick(h.at(200))), vec![Action::Spawn { slot: 0, kind: SpawnKind::Restart }]);
    // Ready, then killed by a signal: a crash, whatever came before.
    h.all_healthy(h.at(300));
    h.machine.exited(h.pid(0), ExitInfo::Signal(SIGKILL), h.at(400));
    assert_eq!(h.state(0), WorkerState::Backoff);
    assert_eq!(h.machine.slots[0].clean_exits, 0);
}

#[test]
fn restarts_back_off_exponentially_then_the_slot_is_in_crash_loop() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let mut now = h.at(1000);
    // Crashes 1 and 2: 100 ms, 200 ms; crash 3 reaches the threshold: max backoff.
    for (crash, delay, shown) in
        [(1, 100, WorkerState::Backoff), (2, 200, WorkerState::Backoff), (3, 1000, WorkerState::CrashLoop)]
    {
        h.exit(h.pid(0), now);
        assert_eq!(h.machine.slots[0].crashes, crash);
        assert_eq!(h.state(0), shown);
        assert!(h.tick(now + ms(delay - 1)).is_empty(), "crash {crash}: restarted early");
        now += ms(delay);
        assert_eq!(spawns(&h.tick(now)), vec![Action::Spawn { slot: 0, kind: SpawnKind::Restart }], "crash {crash}");
    }
    assert_eq!(h.machine.slots[0].restarts, 3);
}

#[test]
fn a_worker_that_stayed_up_resets_the_backoff() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    h.exit(h.pid(0), h.at(0));
    h.tick(h.at(100));
    h.exit(h.pid(0), h.at(200));
    assert_eq!(h.machine.slots[0].crashes, 2);
    h.tick(h.at(400));
    // Up for --stable-after (10 s) before this crash: it counts as the first.
    h.exit(h.pid(0), h.at(10_400));
    assert_eq!(h.machine.slots[0].crashes, 1);
    assert_eq!(h.machine.slots[0].restart_at, Some(h.at(10_500)));
}

#[test]
fn a_worker_that_dies_before_it_is_ready_says_what_the_mode_needs() {
    for (mode, hint) in [
        ("inherit", Some("fd 3")),
        ("reuseport", Some("SO_REUSEPORT")),
        ("node", Some("listen(PORT)")),
        ("proxy", None),
    ] {
        let mut h = Harness::new(&["--workers", "1", "--port-mode", mode]);
        h.start();
        h.exit(h.pid(0), h.at(10));
        let last = h.machine.slots[0].last_exit.clone().expect("last exit");
        assert!(last.starts_with("exit code 1"), "{mode}: {last}");
        match hint {
            Some(hint) => assert!(last.contains(hint) && last.contains("proxy mode needs nothing"), "{mode}: {last}"),
            None => assert_eq!(last, "exit code 1", "{mode}"),
        }
    }
}

// ---- probes and hung workers --------------------------------------------

#[test]
fn a_starting_worker_is_probed_often_and_joins_the_rotation_when_healthy() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    assert_eq!(h.tick(h.at(0)), vec![Action::Probe { pid, starting: true, interval: STARTING_PROBE_INTERVAL }]);
    // One probe at a time.
    assert!(h.tick(h.at(300)).is_empty());
    h.machine.probed(pid, false, &h.world, h.at(300));
    assert_eq!(h.state(0), WorkerState::Starting, "a starting worker's failed probes are not failures yet");
    assert_eq!(h.tick(h.at(300)), vec![Action::Probe { pid, starting: true, interval: STARTING_PROBE_INTERVAL }]);
    h.machine.probed(pid, true, &h.world, h.at(400));
    assert_eq!(h.state(0), WorkerState::Ready);
    assert_eq!(h.machine.in_rotation().count(), 1);
    // Ready: probed once per --health-period.
    assert!(h.tick(h.at(499)).is_empty());
    assert_eq!(h.tick(h.at(500)), vec![Action::Probe { pid, starting: false, interval: ms(1000) }]);
}

#[test]
fn failed_probes_take_a_worker_out_of_rotation_until_it_recovers() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.all_healthy(h.at(0));
    h.machine.probed(pid, false, &h.world, h.at(1000));
    assert_eq!(h.state(0), WorkerState::Ready, "one failure is below the threshold (2)");
    h.machine.probed(pid, false, &h.world, h.at(2000));
    assert_eq!(h.state(0), WorkerState::Unhealthy);
    assert_eq!(h.machine.in_rotation().count(), 0);
    h.machine.probed(pid, true, &h.world, h.at(3000));
    assert_eq!(h.state(0), WorkerState::Ready);
    assert_eq!(h.machine.in_rotation().count(), 1);
}

#[test]
fn a_busy_worker_stays_in_rotation_while_requests_come_back() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.all_healthy(h.at(0));
    // Requests queued at the worker: every probe times out, yet one comes
    // back at least every 2 s, within the probes' window (1 s × 2).
    h.world.in_flight.insert(pid, 3);
    let finished = [1, 1, 2, 3, 3, 4, 5];
    for (at, finished) in [1000, 2000, 3000, 4000, 5000, 6000, 7000].into_iter().zip(finished) {
        h.world.finished.insert(pid, finished);
        h.machine.probed(pid, false, &h.world, h.at(at));
        assert_eq!(h.state(0), WorkerState::Ready, "busy, not unhealthy, at {at} ms");
    }
    assert!(signals(&h.tick(h.at(7100))).is_empty(), "busy past --hung-after (5 s), not hung");
    // Nothing comes back any more (last at 7 s): out of rotation after the
    // window, killed at --hung-after.
    h.machine.probed(pid, false, &h.world, h.at(8000));
    h.machine.probed(pid, false, &h.world, h.at(9000));
    assert_eq!(h.state(0), WorkerState::Ready, "9 s is within 2 s of the last answer");
    h.machine.probed(pid, false, &h.world, h.at(10_000));
    h.machine.probed(pid, false, &h.world, h.at(11_000));
    assert_eq!(h.state(0), WorkerState::Unhealthy);
    assert!(signals(&h.tick(h.at(14_900))).is_empty());
    assert_eq!(signals(&h.tick(h.at(15_000))), vec![(pid, SIGKILL)], "failing since 10 s");
}

#[test]
fn an_idle_worker_failing_probes_leaves_the_rotation() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.all_healthy(h.at(0));
    h.world.finished.insert(pid, 10);
    h.machine.probed(pid, false, &h.world, h.at(1000));
    h.machine.probed(pid, false, &h.world, h.at(2000));
    assert_eq!(h.state(0), WorkerState::Unhealthy, "nothing in flight: the failures count");
}

#[test]
fn a_worker_that_never_gets_ready_is_killed_once_at_hung_after() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.tick(h.at(0));
    h.machine.probed(pid, false, &h.world, h.at(200));
    assert!(signals(&h.tick(h.at(4999))).is_empty());
    assert_eq!(signals(&h.tick(h.at(5000))), vec![(pid, SIGKILL)]);
    assert!(h.tick(h.at(6000)).is_empty(), "killed once, not probed any more");
    // Its exit restarts the slot as any crash does.
    h.exit(pid, h.at(6000));
    assert_eq!(h.state(0), WorkerState::Backoff);
}

#[test]
fn a_worker_failing_probes_for_hung_after_is_killed() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.all_healthy(h.at(0));
    h.machine.probed(pid, false, &h.world, h.at(1000));
    h.machine.probed(pid, true, &h.world, h.at(2000));
    h.machine.probed(pid, false, &h.world, h.at(3000));
    // Failing since 3 s (the recovery at 2 s reset the run).
    assert!(signals(&h.tick(h.at(7999))).is_empty());
    assert_eq!(signals(&h.tick(h.at(8000))), vec![(pid, SIGKILL)]);
}

#[test]
fn without_probes_a_worker_is_ready_when_started() {
    let mut h = Harness::new(&["--workers", "1", "--health-check", "none"]);
    h.start();
    assert!(h.tick(h.at(0)).is_empty(), "no probe");
    assert_eq!(h.state(0), WorkerState::Ready);
}

#[test]
fn inherit_mode_workers_are_ready_after_the_startup_grace() {
    let mut h = Harness::new(&["--workers", "1", "--port-mode", "inherit"]);
    h.start();
    assert!(h.tick(h.at(999)).is_empty());
    assert_eq!(h.state(0), WorkerState::Starting);
    assert!(h.tick(h.at(1000)).is_empty());
    assert_eq!(h.state(0), WorkerState::Ready);
}

#[test]
fn reuseport_workers_must_bind_the_port_or_are_killed_at_hung_after() {
    let mut h = Harness::new(&["--workers", "2", "--port-mode", "reuseport"]);
    h.start();
    let (binds, never) = (h.pid(0), h.pid(1));
    h.world.listening.push(binds);
    assert!(h.tick(h.at(1000)).is_empty());
    assert_eq!((h.state(0), h.state(1)), (WorkerState::Ready, WorkerState::Starting));
    // Looked at every 200 ms: the check at 4.8 s finds it too young.
    assert!(h.tick(h.at(4800)).is_empty());
    assert!(h.tick(h.at(4900)).is_empty(), "not looked at between checks");
    assert_eq!(signals(&h.tick(h.at(5000))), vec![(never, SIGKILL)]);
    assert!(h.tick(h.at(5200)).is_empty(), "killed once");
}

#[test]
fn node_workers_are_ready_when_they_say_they_listen_and_killed_if_they_never_do() {
    let mut h = Harness::new(&["--workers", "2", "--port-mode", "node"]);
    h.start();
    let (listens, never) = (h.pid(0), h.pid(1));
    assert!(h.tick(h.at(50)).is_empty());
    h.machine.listening(listens);
    assert_eq!((h.state(0), h.state(1)), (WorkerState::Ready, WorkerState::Starting), "no grace period");
    assert!(h.tick(h.at(2000)).is_empty(), "alive is not ready");
    assert_eq!(h.state(1), WorkerState::Starting);
    assert_eq!(signals(&h.tick(h.at(5000))), vec![(never, SIGKILL)]);
    h.machine.listening(never);
    assert_eq!(h.state(1), WorkerState::Starting, "a killed worker stays out");
    assert!(h.machine.is_live(never), "until it is reaped");
    h.exit(never, h.at(5010));
    assert!(!h.machine.is_live(never));
}

// ---- recycling and drains -----------------------------------------------

/// Proxy mode, one worker, Ready at 0 and probed: the harness for recycles.
fn ready_proxy(args: &[&str]) -> Harness {
    let mut argv = vec!["--workers", "1"];
    argv.extend(args);
    let mut h = Harness::new(&argv);
    h.start();
    h.tick(h.at(0));
    h.all_healthy(h.at(0));
    h
}

/// One worker recycled at `--max-requests 1`: its replacement is ready and
/// the old process (`old`, replaced by `new`) is draining.
fn recycled_and_draining() -> (Harness, u32, u32) {
    let mut h = ready_proxy(&["--max-requests", "1"]);
    let old = h.pid(0);
    h.world.requests.insert(old, 1);
    h.tick(h.at(0));
    let new = h.replacement(0).expect("a replacement");
    h.machine.probed(new, true, &h.world, h.at(0));
    h.tick(h.at(0));
    (h, old, new)
}

#[test]
fn max_requests_recycles_through_a_replacement_then_drains_the_old_worker() {
    let mut h = ready_proxy(&["--max-requests", "10"]);
    let old = h.pid(0);
    h.world.requests.insert(old, 9);
    assert!(h.tick(h.at(100)).is_empty());
    h.world.requests.insert(old, 10);
    assert_eq!(spawns(&h.tick(h.at(200))), vec![Action::Spawn { slot: 0, kind: SpawnKind::Replacement }]);
    let new = h.replacement(0).expect("a replacement");
    // Only one replacement at a time; the old worker serves meanwhile.
    assert!(spawns(&h.tick(h.at(300))).is_empty());
    assert_eq!(h.pid(0), old);
    h.machine.probed(new, true, &h.world, h.at(400));
    h.tick(h.at(400));
    assert_eq!(h.pid(0), new);
    assert_eq!(h.retired(), vec![(old, WorkerState::Draining)]);
    // In flight: no SIGTERM until idle (the grace is over at 600).
    h.world.in_flight.insert(old, 1);
    assert!(signals(&h.tick(h.at(700))).is_empty());
    h.world.in_flight.insert(old, 0);
    assert_eq!(signals(&h.tick(h.at(800))), vec![(old, SIGTERM)]);
    // Ignores SIGTERM: SIGKILL a second after the drain deadline (400 + 10 s).
    assert!(signals(&h.tick(h.at(11_399))).is_empty());
    assert_eq!(signals(&h.tick(h.at(11_400))), vec![(old, SIGKILL)]);
    h.exit(old, h.at(11_500));
    assert!(h.retired().is_empty());
    assert_eq!(h.state(0), WorkerState::Ready);
}

#[test]
fn a_drained_worker_busy_until_the_deadline_gets_sigterm_then() {
    let (mut h, old, _new) = recycled_and_draining();
    h.world.in_flight.insert(old, 3);
    assert!(signals(&h.tick(h.at(9999))).is_empty());
    assert_eq!(signals(&h.tick(h.at(10_000))), vec![(old, SIGTERM)]);
}

#[test]
fn memory_is_checked_once_per_health_period() {
    let mut h = ready_proxy(&["--max-memory-mib", "100"]);
    let pid = h.pid(0);
    h.world.rss.insert(pid, 150);
    // The check at 0 (when the harness got it ready) was the first; the
    // next is due at 1 s.
    assert!(h.tick(h.at(500)).iter().all(|a| !matches!(a, Action::Spawn { .. })));
    assert!(h.tick(h.at(1000)).contains(&Action::Spawn { slot: 0, kind: SpawnKind::Replacement }));
}

#[test]
fn memory_below_the_limit_does_not_recycle() {
    let mut h = ready_proxy(&["--max-memory-mib", "100"]);
    h.world.rss.insert(h.pid(0), 100);
    assert!(h.tick(h.at(1000)).iter().all(|a| !matches!(a, Action::Spawn { .. })));
}

#[test]
fn a_replacement_that_dies_before_it_is_ready_leaves_the_old_worker() {
    let mut h = ready_proxy(&["--max-requests", "5"]);
    let old = h.pid(0);
    h.world.requests.insert(old, 5);
    h.tick(h.at(100));
    let new = h.replacement(0).expect("a replacement");
    h.exit(new, h.at(200));
    assert_eq!((h.pid(0), h.replacement(0)), (old, None));
    assert_eq!(h.state(0), WorkerState::Ready);
    assert_eq!(h.machine.slots[0].crashes, 1);
}

#[test]
fn when_the_old_worker_dies_its_replacement_takes_over() {
    let mut h = ready_proxy(&["--max-requests", "5"]);
    let old = h.pid(0);
    h.world.requests.insert(old, 5);
    h.tick(h.at(100));
    let new = h.replacement(0).expect("a replacement");
    h.exit(old, h.at(200));
    assert_eq!((h.pid(0), h.replacement(0)), (new, None));
    assert_eq!(h.machine.slots[0].crashes, 0, "not a crash of the slot");
    assert!(h.tick(h.at(300)).iter().all(|a| !matches!(a, Action::Spawn { kind: SpawnKind::Restart, .. })));
}

// ---- what a dead worker leaves in its process group ---------------------

fn group_signals(actions: &[Action]) -> Vec<(u32, Signal)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SignalGroup { group, signal } => Some((*group, *signal)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_dead_workers_group_gets_sigterm_then_sigkill_after_the_grace() {
    let mut h = ready_proxy(&[]);
    let dead = h.pid(0);
    let actions = h.machine.exited(dead, ExitInfo::Signal(SIGKILL), h.at(1_000));
    assert_eq!(group_signals(&actions), vec![(dead, SIGTERM)]);
    assert!(group_signals(&h.tick(h.at(2_999))).is_empty());
    assert_eq!(group_signals(&h.tick(h.at(3_000))), vec![(dead, SIGKILL)]);
    assert!(group_signals(&h.tick(h.at(4_000))).is_empty(), "once");
    // An adopted process reaped is nobody's group.
    assert!(h.machine.exited(4242, ExitInfo::Code(0), h.at(4_000)).is_empty());
}

#[test]
fn a_dead_workers_number_taken_by_a_new_worker_is_not_killed() {
    let mut h = ready_proxy(&[]);
    let dead = h.pid(0);
    h.machine.exited(dead, ExitInfo::Code(1), h.at(1_000));
    // The restart (backoff 100 ms) happens to get the same pid.
    h.next_pid = dead - 1;
    h.tick(h.at(1_100));
    assert_eq!(h.pid(0), dead);
    assert!(group_signals(&h.tick(h.at(3_000))).is_empty());
}

#[test]
fn a_drained_worker_leaves_its_group_until_the_drains_deadline() {
    let (mut h, old, _) = recycled_and_draining();
    assert_eq!(signals(&h.tick(h.at(300))), vec![(old, SIGTERM)]);
    // The wrapper exits on SIGTERM; its server still finishes connections,
    // not told to stop twice, and killed a second after the deadline (10 s).
    assert!(h.machine.exited(old, ExitInfo::Signal(SIGTERM), h.at(400)).is_empty());
    assert!(group_signals(&h.tick(h.at(10_999))).is_empty());
    assert_eq!(group_signals(&h.tick(h.at(11_000))), vec![(old, SIGKILL)]);
}

#[test]
fn at_shutdown_a_workers_group_is_left_to_the_orphans_stop() {
    let mut h = ready_proxy(&[]);
    let pid = h.pid(0);
    h.signal(SIGTERM, h.at(0));
    assert!(h.machine.exited(pid, ExitInfo::Code(0), h.at(100)).is_empty());
    assert!(group_signals(&h.tick(h.at(5_000))).is_empty());
}

// ---- rolling reload -----------------------------------------------------

#[test]
fn sighup_replaces_the_workers_one_at_a_time() {
    let mut h = Harness::new(&["--workers", "2"]);
    h.start();
    h.tick(h.at(0));
    h.all_healthy(h.at(0));
    let (old0, old1) = (h.pid(0), h.pid(1));
    assert!(h.signal(Signal::SIGHUP, h.at(100)).is_empty());
    assert_eq!(h.tick(h.at(100)), vec![Action::Spawn { slot: 0, kind: SpawnKind::Replacement }]);
    let actions = h.tick(h.at(200));
    assert!(!actions.iter().any(|a| matches!(a, Action::Spawn { .. })), "slot 1 waits: {actions:?}");
    h.all_healthy(h.at(300));
    let actions = h.tick(h.at(300));
    assert!(actions.contains(&Action::Spawn { slot: 1, kind: SpawnKind::Replacement }), "{actions:?}");
    assert_ne!(h.pid(0), old0);
    assert_eq!(h.pid(1), old1);
    h.all_healthy(h.at(400));
    h.tick(h.at(400));
    assert_ne!(h.pid(1), old1);
    assert_eq!(h.retired(), vec![(old0, WorkerState::Draining), (old1, WorkerState::Draining)]);
}

#[test]
fn a_reload_whose_replacement_cannot_be_spawned_goes_on_with_the_next_worker() {
    let mut h = Harness::new(&["--workers", "2"]);
    h.start();
    h.all_healthy(h.at(0));
    h.failing.push(0);
    h.signal(Signal::SIGHUP, h.at(0));
    assert_eq!(
        spawns(&h.tick(h.at(100))),
        [
            Action::Spawn { slot: 0, kind: SpawnKind::Replacement },
            Action::Spawn { slot: 1, kind: SpawnKind::Replacement }
        ]
    );
    assert_eq!((h.replacement(0).is_some(), h.replacement(1).is_some()), (false, true));
}

// ---- scaling ------------------------------------------------------------

fn cpu(cores: f64) -> CpuLimit {
    CpuLimit { cores: Some(cores), source: "cgroup-v2".into() }
}

#[test]
fn a_new_cpu_limit_is_applied_when_a_second_poll_confirms_it() {
    let mut h = Harness::new(&[]);
    h.start();
    h.all_healthy(h.at(0));
    assert_eq!(h.machine.slots.len(), 2);
    let gone = h.pid(1);
    assert!(h.machine.cpu_limit(cpu(1.0), 2, h.at(100)).is_empty(), "one poll is not enough");
    assert_eq!(h.machine.slots.len(), 2);
    assert!(h.machine.cpu_limit(cpu(1.0), 2, h.at(200)).is_empty());
    assert_eq!(h.machine.slots.len(), 1);
    assert_eq!(h.retired(), vec![(gone, WorkerState::Draining)]);
    assert_eq!(signals(&h.tick(h.at(400))), vec![(gone, SIGTERM)], "idle after the drain grace");

    let actions = h.machine.cpu_limit(cpu(3.0), 2, h.at(500));
    assert!(actions.is_empty());
    let actions = h.machine.cpu_limit(cpu(3.0), 2, h.at(600));
    assert_eq!(
        actions,
        [Action::Spawn { slot: 1, kind: SpawnKind::ScaleUp }, Action::Spawn { slot: 2, kind: SpawnKind::ScaleUp }]
    );
}

#[test]
fn a_limit_that_flaps_back_is_never_applied() {
    let mut h = Harness::new(&[]);
    h.start();
    h.machine.cpu_limit(cpu(1.0), 2, h.at(100));
    h.machine.cpu_limit(cpu(2.0), 2, h.at(200));
    h.machine.cpu_limit(cpu(1.0), 2, h.at(300));
    assert_eq!(h.machine.slots.len(), 2);
}

#[test]
fn a_scaled_up_slot_that_cannot_start_backs_off() {
    let mut h = Harness::new(&[]);
    h.start();
    h.failing.push(2);
    h.machine.cpu_limit(cpu(3.0), 2, h.at(0));
    let actions = h.machine.cpu_limit(cpu(3.0), 2, h.at(0));
    h.run(actions, h.at(0));
    assert_eq!(h.state(2), WorkerState::Backoff);
    assert_eq!(h.machine.slots[2].restart_at, Some(h.at(100)));
}

// ---- signals and shutdown -----------------------------------------------

#[test]
fn other_signals_are_forwarded_to_every_process() {
    let mut h = Harness::new(&["--workers", "2"]);
    h.start();
    let actions = h.signal(Signal::SIGUSR1, h.at(0));
    assert_eq!(signals(&actions), vec![(h.pid(0), Signal::SIGUSR1), (h.pid(1), Signal::SIGUSR1)]);
}

#[test]
fn proxy_shutdown_waits_for_the_proxy_then_stops_the_workers() {
    let mut h = Harness::new(&["--workers", "2"]);
    h.start();
    let pids = [h.pid(0), h.pid(1)];
    assert_eq!(h.signal(SIGTERM, h.at(0)), vec![Action::StopAccepting]);
    assert!(h.machine.draining());
    assert!(h.tick(h.at(100)).is_empty(), "in-flight requests first");
    assert_eq!(signals(&h.machine.proxy_drained()), vec![(pids[0], SIGTERM), (pids[1], SIGTERM)]);
    // One stops; the other is killed at the deadline.
    h.exit(pids[0], h.at(200));
    assert_eq!(h.state(0), WorkerState::Stopped);
    assert!(h.tick(h.at(9999)).is_empty(), "no restart while shutting down");
    assert_eq!(signals(&h.tick(h.at(10_000))), vec![(pids[1], SIGKILL)]);
    assert_eq!(h.machine.finished(h.at(10_000)), None);
    h.exit(pids[1], h.at(10_100));
    assert_eq!(h.machine.finished(h.at(10_100)), None, "orphans not looked at yet");
    h.tick(h.at(10_200));
    assert_eq!(h.machine.finished(h.at(10_200)), Some(0));
}

#[test]
fn a_proxy_that_does_not_drain_in_time_is_not_waited_for() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.signal(SIGTERM, h.at(0));
    assert_eq!(signals(&h.tick(h.at(10_000))), vec![(pid, SIGTERM)]);
    assert_eq!(signals(&h.tick(h.at(11_000))), vec![(pid, SIGKILL)]);
    // Workers that survive SIGKILL are given up on after KILL_WAIT.
    assert_eq!(h.machine.finished(h.at(15_999)), None);
    assert_eq!(h.machine.finished(h.at(16_000)), Some(0));
}

#[test]
fn a_second_signal_skips_the_rest_of_the_grace_period() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    h.signal(SIGTERM, h.at(0));
    assert_eq!(signals(&h.signal(Signal::SIGINT, h.at(100))), vec![(pid, SIGTERM)]);
    assert_eq!(signals(&h.signal(SIGTERM, h.at(200))), vec![(pid, SIGKILL)]);
    assert!(h.signal(SIGTERM, h.at(300)).is_empty());
}

#[test]
fn in_the_shared_port_modes_workers_are_stopped_at_once() {
    for mode in ["inherit", "reuseport"] {
        let mut h = Harness::new(&["--workers", "1", "--port-mode", mode]);
        h.start();
        let pid = h.pid(0);
        assert_eq!(h.signal(SIGTERM, h.at(0)), vec![Action::StopAccepting, Action::Signal { pid, signal: SIGTERM }]);
    }
}

#[test]
fn sigquit_stops_at_once_with_sigquit_and_exits_131() {
    let mut h = Harness::new(&["--workers", "1"]);
    h.start();
    let pid = h.pid(0);
    let actions = h.signal(Signal::SIGQUIT, h.at(0));
    assert_eq!(actions, vec![Action::StopAccepting, Action::Signal { pid, signal: Signal::SIGQUIT }]);
    h.exit(pid, h.at(100));
    h.tick(h.at(200));
    assert_eq!(h.machine.finished(h.at(200)), Some(131));
}

#[test]
fn draining_workers_are_signalled_at_shutdown_too() {
    let (mut h, old, new) = recycled_and_draining();
    h.world.in_flight.insert(old, 1);
    h.signal(SIGTERM, h.at(50));
    assert_eq!(signals(&h.machine.proxy_drained()), vec![(new, SIGTERM), (old, SIGTERM)]);
}

#[test]
fn processes_the_workers_left_are_stopped_after_them() {
    let mut h = Harness::new(&["--workers", "1", "--port-mode", "inherit"]);
    h.start();
    let pid = h.pid(0);
    h.signal(SIGTERM, h.at(0));
    h.world.orphans = vec![900, 901];
    assert!(h.tick(h.at(50)).is_empty(), "not while a worker runs");
    h.exit(pid, h.at(100));
    let orphans = |signal| vec![Action::SignalOrphans { pids: vec![900, 901], signal }];
    assert_eq!(h.tick(h.at(100)), orphans(SIGTERM));
    assert!(h.tick(h.at(2099)).is_empty());
    assert_eq!(h.tick(h.at(2100)), orphans(SIGKILL));
    assert_eq!(h.machine.finished(h.at(2200)), None);
    // They never go: given up on after KILL_WAIT.
    assert!(h.tick(h.at(7100)).is_empty());
    assert_eq!(h.machine.finished(h.at(7100)), Some(0));
}

#[test]
fn shutdown_ends_as_soon_as_the_orphans_are_gone() {
    let mut h = Harness::new(&["--workers", "1", "--port-mode", "inherit"]);
    h.start();
    let pid = h.pid(0);
    h.signal(SIGTERM, h.at(0));
    h.exit(pid, h.at(100));
    h.world.orphans = vec![900];
    h.tick(h.at(100));
    h.world.orphans.clear();
    h.tick(h.at(200));
    assert_eq!(h.machine.finished(h.at(200)), Some(0));
}

#[test]
fn no_reload_or_scaling_once_shutting_down() {
    let mut h = Harness::new(&[]);
    h.start();
    h.signal(SIGTERM, h.at(0));
    h.signal(Signal::SIGHUP, h.at(0));
    assert!(h.machine.reload_queue.is_empty());
    h.machine.cpu_limit(cpu(4.0), 2, h.at(0));
    assert!(h.machine.cpu_limit(cpu(4.0), 2, h.at(0)).is_empty());
    assert_eq!(h.machine.slots.len(), 2);
}
