//! Real cgroup v1: clusterd runs inside a cpu cgroup whose CFS quota the
//! test changes, like the kubelet does on an in-place resize.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clustered_api::wire::WorkerState;
use common::*;
use nix::sys::signal::Signal;

const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";
const PERIOD: u64 = 100_000;

/// A cpu cgroup removed (after its processes are gone) on drop.
struct CpuCgroup(PathBuf);

impl CpuCgroup {
    fn create(test: &str) -> Option<CpuCgroup> {
        let root = PathBuf::from(CPU_ROOT);
        // Only a cgroup v1 cpu hierarchy we may write to will do.
        if !root.join("cpu.cfs_quota_us").exists() {
            return None;
        }
        let dir = root.join(format!("clustered-test-{test}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let cgroup = CpuCgroup(dir);
        cgroup.set_cpus(2).then_some(cgroup)
    }

    fn set_cpus(&self, cpus: u64) -> bool {
        std::fs::write(self.0.join("cpu.cfs_period_us"), PERIOD.to_string()).is_ok()
            && std::fs::write(self.0.join("cpu.cfs_quota_us"), (cpus * PERIOD).to_string()).is_ok()
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // rmdir fails while exiting processes are still members; retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

fn ready_count(status: &clustered_api::wire::ClusterdStatus) -> usize {
    status.workers.iter().filter(|w| w.state == WorkerState::Ready).count()
}

#[test]
fn workers_follow_the_cfs_quota() {
    // A real quota is the point of this test: without one it fails rather
    // than pass having checked nothing.
    let cgroup = CpuCgroup::create("follow")
        .unwrap_or_else(|| panic!("needs a writable cgroup v1 cpu hierarchy at {CPU_ROOT} (root on a cgroup v1 host)"));
    let procs = cgroup.0.join("cgroup.procs");
    // The shell joins the cgroup, then becomes clusterd.
    let join = format!("echo $$ > {} && exec \"$@\"", procs.display());
    let mut clusterd = Launch::node(&["--cpu-poll-interval", "300ms", "--health-period", "1s"])
        .wrapped(&["sh", "-c", &join, "sh"])
        .start();

    let status = clusterd.wait_ready(2);
    assert_eq!(status.cpu.cores, Some(2.0));
    assert_eq!(status.cpu.source, "cgroup-v1");
    assert_eq!(status.desired_workers, 2);

    assert!(cgroup.set_cpus(3));
    let status = clusterd.wait_status("3 ready workers", SLOW, |s| s.workers.len() == 3 && ready_count(s) == 3);
    assert_eq!(status.cpu.cores, Some(3.0));
    let removed: Vec<u32> = status.workers[1..].iter().filter_map(|w| w.pid).collect();

    assert!(cgroup.set_cpus(1));
    let status = clusterd.wait_status("1 worker", SLOW, |s| s.workers.len() == 1 && ready_count(s) == 1);
    assert_eq!(status.desired_workers, 1);
    assert_eq!(status.workers[0].id, 0, "the highest ids are removed first");
    for pid in removed {
        wait_until("removed worker to be drained and stopped", SLOW, || !process_alive(pid));
    }
    assert!(clusterd.logs().contains("removing worker slot"));

    clusterd.signal(Signal::SIGTERM);
    assert_eq!(clusterd.wait_exit(SLOW).code(), Some(0));
}

/// An in-place resize reaches the workers within a second of the kubelet
/// writing the quota, at the default poll: the autoscaler's vertical step
/// is only as fast as this. (It took 2–4 s when the limit was read every
/// 2 s and acted on at the second read that agreed.)
#[test]
fn a_resize_reaches_the_workers_within_a_second() {
    let cgroup = CpuCgroup::create("resize")
        .unwrap_or_else(|| panic!("needs a writable cgroup v1 cpu hierarchy at {CPU_ROOT} (root on a cgroup v1 host)"));
    let join = format!("echo $$ > {} && exec \"$@\"", cgroup.0.join("cgroup.procs").display());
    let mut clusterd = Launch::node(&["--health-period", "1s"]).wrapped(&["sh", "-c", &join, "sh"]).start();
    clusterd.wait_ready(2);

    let written = Instant::now();
    assert!(cgroup.set_cpus(3));
    let mut took = None;
    while written.elapsed() < SLOW {
        if clusterd.status().is_some_and(|s| s.workers.len() == 3) {
            took = Some(written.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = took.unwrap_or_else(|| panic!("no third worker after {SLOW:?}; logs:\n{}", clusterd.logs()));
    eprintln!("third worker started {took:?} after the quota was raised");
    assert!(took < Duration::from_secs(1), "the third worker started {took:?} after the quota was raised");
    clusterd.wait_status("3 ready workers", SLOW, |s| ready_count(s) == 3);

    clusterd.signal(Signal::SIGTERM);
    assert_eq!(clusterd.wait_exit(SLOW).code(), Some(0));
}
