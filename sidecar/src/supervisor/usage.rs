//! Per-worker CPU and memory, read from /proc.
//!
//! A worker is its process and every process it started: its descendants
//! and whatever stays in its process group, the tree readiness already
//! looks at ([`super::orphans::process_tree`]), so a wrapper
//! (`sh -c 'python3 app.py'`) or a pre-fork server is measured whole. Every
//! [`SAMPLE_INTERVAL`] one pass over `/proc/*/stat` gives each process's
//! parent, group, CPU time and resident pages; the figures per worker are
//! sums over its tree. Between samples only the last total of each live
//! worker process is kept, so nothing grows with pid churn.
//!
//! What the numbers mean is decided here without /proc ([`Sampler::sample`]
//! and [`cpu_cores`]); [`read_procs`] and [`run`] are the effects.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::Event;
use super::orphans::tree_of;

/// How often the workers are measured; the CPU figure is the use over it.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// What one process's `/proc/<pid>/stat` says, for a live (not zombie) one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub ppid: u32,
    pub group: u32,
    /// CPU time in clock ticks: its own (user + system) and that of the
    /// children it waited for, so a child's time stays in the tree's total
    /// after the child exits.
    pub ticks: u64,
    /// Resident pages (what `VmRSS` counts).
    pub rss_pages: u64,
}

/// Parses a `/proc/<pid>/stat` line; `None` for a zombie or garbage. The
/// command name may hold spaces and parentheses, so fields are counted
/// after its last `)`.
pub fn parse_stat(pid: u32, stat: &str) -> Option<ProcStat> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // fields[0] is field 3 of proc(5): state, ppid, pgrp, ..., utime (14),
    // stime, cutime, cstime (17), ..., rss (24).
    let field = |n: usize| fields.get(n - 3).copied();
    if field(3)? == "Z" {
        return None;
    }
    let number = |n: usize| field(n)?.parse::<i64>().ok().map(|v| v.max(0) as u64);
    Some(ProcStat {
        pid,
        ppid: field(4)?.parse().ok()?,
        group: field(5)?.parse().ok()?,
        ticks: number(14)? + number(15)? + number(16)? + number(17)?,
        rss_pages: number(24)?,
    })
}

/// One worker process's figures in a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// Cores used since the previous sample; `None` at the first one.
    pub cpu_cores: Option<f64>,
    /// CPU seconds used since the previous sample (since the process
    /// started, at the first one): what the `_total` counter adds.
    pub cpu_seconds: f64,
    /// Resident memory of the tree, in bytes.
    pub rss_bytes: u64,
}

/// Cores used between two totals of CPU ticks taken `elapsed` apart. A
/// total that went down (a process of the tree that exited without its
/// parent waiting for it took its time along) counts as no use.
pub fn cpu_cores(before: u64, after: u64, elapsed: Duration, ticks_per_second: u64) -> Option<f64> {
    if elapsed.is_zero() || ticks_per_second == 0 {
        return None;
    }
    Some(after.saturating_sub(before) as f64 / ticks_per_second as f64 / elapsed.as_secs_f64())
}

/// The last totals of the worker processes; turns samples into [`Usage`].
#[derive(Debug)]
pub struct Sampler {
    ticks_per_second: u64,
    page_size: u64,
    /// Per worker process: its tree's CPU ticks at the last sample, and when.
    last: HashMap<u32, (u64, Instant)>,
}

impl Sampler {
    pub fn new(ticks_per_second: u64, page_size: u64) -> Sampler {
        Sampler { ticks_per_second, page_size, last: HashMap::new() }
    }

    /// The figures of each of `roots` (worker processes) that is alive in
    /// `procs` (one pass over /proc, taken at `now`). Totals are kept for
    /// those roots only: a process that is gone is forgotten.
    pub fn sample(&mut self, roots: &[u32], procs: &[ProcStat], now: Instant) -> HashMap<u32, Usage> {
        let by_pid: HashMap<u32, &ProcStat> = procs.iter().map(|p| (p.pid, p)).collect();
        let links: Vec<(u32, u32, u32)> = procs.iter().map(|p| (p.pid, p.ppid, p.group)).collect();
        let mut last = HashMap::with_capacity(roots.len());
        let mut usage = HashMap::with_capacity(roots.len());
        for &root in roots.iter().filter(|root| by_pid.contains_key(root)) {
            let tree = tree_of(root, &links);
            let members = tree.iter().filter_map(|pid| by_pid.get(pid));
            let (ticks, pages) = members.fold((0, 0), |(t, r), p| (t + p.ticks, r + p.rss_pages));
            let before = self.last.get(&root).copied();
            let new_ticks = ticks.saturating_sub(before.map_or(0, |(t, _)| t));
            usage.insert(
                root,
                Usage {
                    cpu_cores: before
                        .and_then(|(t, at)| cpu_cores(t, ticks, now.duration_since(at), self.ticks_per_second)),
                    cpu_seconds: new_ticks as f64 / self.ticks_per_second.max(1) as f64,
                    rss_bytes: pages * self.page_size,
                },
            );
            last.insert(root, (ticks, now));
        }
        self.last = last;
        usage
    }
}

/// Every live process in /proc.
pub fn read_procs() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| parse_stat(pid, &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
        .collect()
}

/// Measures the worker processes `pids` names every [`SAMPLE_INTERVAL`]
/// (off the runtime's threads) and sends the figures to the supervisor.
pub async fn run(pids: watch::Receiver<Vec<u32>>, events: UnboundedSender<Event>) {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks_per_second = sysconf(SysconfVar::CLK_TCK).ok().flatten().map_or(100, |t| t.max(1) as u64);
    let page_size = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |p| p.max(1) as u64);
    let mut sampler = Sampler::new(ticks_per_second, page_size);
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let roots = pids.borrow().clone();
        let measured = tokio::task::spawn_blocking(move || {
            let usage = sampler.sample(&roots, &read_procs(), Instant::now());
            (sampler, usage)
        })
        .await;
        let Ok((back, usage)) = measured else { return };
        sampler = back;
        if events.send(Event::Usage(usage)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: u32, ppid: u32, group: u32, ticks: u64, rss_pages: u64) -> ProcStat {
        ProcStat { pid, ppid, group, ticks, rss_pages }
    }

    #[test]
    fn stat_lines_give_parent_group_ticks_and_rss() {
        let line = "4242 (my (odd) name) S 17 4200 4200 0 -1 4194560 100 0 0 0 150 50 7 3 20 0 1 0 12345 \
                    1000000 2560 18446744073709551615";
        assert_eq!(parse_stat(4242, line), Some(stat(4242, 17, 4200, 210, 2560)));
        let zombie = "4242 (sh) Z 17 4200 4200 0 -1 4194560 100 0 0 0 150 50 7 3 20 0 1 0 12345 0 0";
        assert_eq!(parse_stat(4242, zombie), None);
        assert_eq!(parse_stat(1, "garbage"), None);
        assert_eq!(parse_stat(1, "1 (short) S 0 1 1 0"), None);
    }

    #[test]
    fn this_process_parses() {
        let me = std::process::id();
        let line = std::fs::read_to_string(format!("/proc/{me}/stat")).expect("own stat");
        let stat = parse_stat(me, &line).expect("parsed");
        assert!(stat.rss_pages > 0);
        assert!(read_procs().iter().any(|p| p.pid == me));
    }

    #[test]
    fn cores_are_ticks_over_time() {
        let second = Duration::from_secs(1);
        assert_eq!(cpu_cores(100, 200, second, 100), Some(1.0));
        assert_eq!(cpu_cores(100, 150, 2 * second, 100), Some(0.25));
        assert_eq!(cpu_cores(100, 500, 2 * second, 100), Some(2.0), "two threads or processes busy");
        assert_eq!(cpu_cores(200, 100, second, 100), Some(0.0), "a total that went down is no use");
        assert_eq!(cpu_cores(100, 200, Duration::ZERO, 100), None);
    }

    #[test]
    fn a_worker_is_summed_over_its_tree_and_cpu_needs_two_samples() {
        let t0 = Instant::now();
        let mut sampler = Sampler::new(100, 4096);
        // Worker 10 (a shell) runs 11, whose child 12 left the group; 13
        // stayed in its group but was re-parented to clusterd (1); 20 is
        // another worker.
        let first = [stat(10, 1, 10, 5, 100), stat(11, 10, 10, 100, 1000), stat(12, 11, 12, 50, 500)];
        let mut procs = first.to_vec();
        procs.extend([stat(13, 1, 10, 0, 10), stat(20, 1, 20, 30, 300), stat(30, 1, 30, 999, 999)]);
        let usage = sampler.sample(&[10, 20], &procs, t0);
        assert_eq!(usage[&10].rss_bytes, 1610 * 4096);
        assert_eq!(usage[&10].cpu_cores, None, "one sample is no interval");
        assert_eq!(usage[&10].cpu_seconds, 1.55, "the first sample counts the time since the start");
        assert_eq!(usage[&20].rss_bytes, 300 * 4096);

        // 2 s later: 11 used one core, 12 exited and 11 waited for it (its
        // time moves to 11's cutime), 20 idled.
        let procs = [stat(10, 1, 10, 5, 100), stat(11, 10, 10, 350, 1000), stat(20, 1, 20, 30, 300)];
        let usage = sampler.sample(&[10, 20], &procs, t0 + Duration::from_secs(2));
        assert_eq!(usage[&10].cpu_cores, Some(1.0));
        assert_eq!(usage[&10].cpu_seconds, 2.0);
        assert_eq!(usage[&10].rss_bytes, 1100 * 4096);
        assert_eq!(usage[&20].cpu_cores, Some(0.0));
    }

    #[test]
    fn only_live_roots_are_remembered() {
        let t0 = Instant::now();
        let mut sampler = Sampler::new(100, 4096);
        // Many short-lived workers: each is kept while it lives, then forgotten.
        for pid in 100..1100 {
            let usage = sampler.sample(&[pid, 99], &[stat(pid, 1, pid, 1, 1)], t0);
            assert!(!usage.contains_key(&99), "a root that is not running has no figures");
            assert_eq!(sampler.last.len(), 1);
        }
        assert!(sampler.sample(&[5], &[], t0).is_empty());
        assert!(sampler.last.is_empty());
    }
}
