//! A worker the kernel's OOM killer stops at the memory limit of clusterd's
//! cgroup is reported as OOM killed, not as one more `killed by SIGKILL`
//! (the operator turns that into the `OOMKilled` reason).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clustered_api::wire::{OOM_KILLED, WorkerState};
use common::*;

const LIMIT: u64 = 192 << 20;

/// A memory cgroup with a limit, removed (after its processes are gone) on
/// drop: cgroup v1's memory hierarchy, or cgroup v2's.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn create() -> MemoryCgroup {
        let name = format!("clustered-oom-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .map(Path::new)
            .into_iter()
            .find(|root| std::fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| c.contains("memory")));
        let (dir, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), "memory.limit_in_bytes")
        } else if let Some(root) = v2 {
            (root.join(&name), "memory.max")
        } else {
            panic!("this test needs a memory cgroup (v1 or v2) it may write to");
        };
        std::fs::create_dir(&dir).expect("create the memory cgroup (the tests run as root)");
        std::fs::write(dir.join(limit_file), LIMIT.to_string()).expect("set the memory limit");
        MemoryCgroup(dir)
    }

    /// Runs the command in this cgroup.
    fn wrapper(&self) -> Vec<String> {
        let procs = self.0.join("cgroup.procs").display().to_string();
        ["sh".into(), "-c".into(), format!("echo $$ > {procs} && exec \"$@\""), "sh".into()].into()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_worker_killed_at_the_memory_limit_is_reported_as_oom_killed() {
    let _serial = serial();
    let cgroup = MemoryCgroup::create();
    let wrapper = cgroup.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut clusterd = Launch::misbehaving(&["--workers", "2"]).wrapped(&wrapper).start();
    let before = clusterd.wait_ready(2);
    let leaking = before.workers.iter().map(|w| w.pid).collect::<Vec<_>>();

    // The request never gets an answer: its worker grows until the kernel
    // kills it.
    let response = get(clusterd.port, "/leak", SLOW);
    assert!(!response.as_ref().is_ok_and(|r| r.status < 500), "{:?}", response.map(|r| r.status));

    let status = clusterd.wait_status("a worker OOM killed and replaced", SLOW, |s| {
        s.workers.iter().any(|w| w.last_exit.is_some() && w.state == WorkerState::Ready && !leaking.contains(&w.pid))
    });
    let killed = status.workers.iter().find(|w| w.last_exit.is_some()).expect("the worker that exited");
    let last_exit = killed.last_exit.as_deref().unwrap_or_default();
    assert!(last_exit.starts_with(OOM_KILLED), "lastExit: {last_exit}");
    // The other worker was not touched, and clusterd stays up.
    assert!(status.workers.iter().filter(|w| w.last_exit.is_none()).count() == 1, "{status:?}");
    assert!(clusterd.logs().contains(OOM_KILLED), "the log says so too");

    clusterd.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(clusterd.wait_exit(SLOW).success());
}

/// A worker clusterd SIGKILLs itself (a hung worker) is not blamed on the OOM killer.
#[test]
fn a_worker_clusterd_kills_as_hung_is_not_called_oom_killed() {
    let _serial = serial();
    let cgroup = MemoryCgroup::create();
    let wrapper = cgroup.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let clusterd = Launch::misbehaving(&[
        "--workers",
        "1",
        "--health-period",
        "300ms",
        "--health-timeout",
        "300ms",
        "--hung-after",
        "1s",
    ])
    .wrapped(&wrapper)
    .start();
    clusterd.wait_ready(1);
    let _ = get(clusterd.port, "/hang", SLOW);
    let status = clusterd.wait_status("the hung worker killed", SLOW, |s| s.workers[0].last_exit.is_some());
    let last_exit = status.workers[0].last_exit.as_deref().unwrap_or_default();
    assert!(!last_exit.starts_with(OOM_KILLED), "lastExit: {last_exit}");
}
