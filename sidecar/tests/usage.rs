//! Per-worker CPU and memory with real processes: a worker that burns a
//! core, one that holds a known amount of memory, one behind a shell
//! wrapper, and `--max-memory-mib` recycling on the same figure.

mod common;

use std::time::Duration;

use clustered_api::wire::{ClusterdStatus, WorkerState, WorkerStatus};
use common::*;

const MIB: u64 = 1 << 20;

fn usage_app(modes: &[&str]) -> Vec<String> {
    let mut command = vec!["python3".to_string(), test_app("usage.py")];
    command.extend(modes.iter().map(|m| m.to_string()));
    command
}

fn worker(status: &ClusterdStatus, id: u32) -> &WorkerStatus {
    status.workers.iter().find(|w| w.id == id).expect("worker slot")
}

/// The value of `name` with the label set `labels` on /metrics.
fn labelled_metric(clusterd: &Clusterd, name: &str, labels: &str) -> Option<f64> {
    let text =
        String::from_utf8_lossy(&get(clusterd.admin, "/metrics", Duration::from_secs(5)).ok()?.body).into_owned();
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

#[test]
fn a_busy_worker_uses_a_core_and_an_allocating_one_holds_its_memory() {
    let _serial = serial();
    let command = usage_app(&["burn", "alloc:120", "idle"]);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let clusterd = Launch::new(&["--workers", "3"], &command).start();
    // Two samples at least: the CPU figure is the use between them.
    let status = clusterd.wait_status("CPU figures of every worker", SLOW, |s| {
        s.workers.len() == 3 && s.workers.iter().all(|w| w.cpu_cores.is_some() && w.memory_bytes.is_some())
    });
    // Another sample, so the burner's figure covers a whole interval of burning.
    let first_pid = worker(&status, 0).pid;
    std::thread::sleep(Duration::from_millis(2500));
    let status = clusterd.status().expect("status");
    assert_eq!(worker(&status, 0).pid, first_pid, "the burner kept running");
    let (burn, alloc, idle) = (worker(&status, 0), worker(&status, 1), worker(&status, 2));
    let cores = |w: &WorkerStatus| w.cpu_cores.expect("cpu figure");
    let mib = |w: &WorkerStatus| w.memory_bytes.expect("memory figure") / MIB;
    // One core at most (one thread); the machine is shared, so well below
    // one is possible, but never idle.
    assert!((0.3..=1.1).contains(&cores(burn)), "burner: {} cores\n{status:#?}", cores(burn));
    assert!(cores(idle) < 0.1, "idle worker: {} cores", cores(idle));
    assert!(cores(alloc) < 0.1, "allocating worker once allocated: {} cores", cores(alloc));
    // Python itself is about 10-20 MiB.
    assert!((120..=160).contains(&mib(alloc)), "allocating worker: {} MiB", mib(alloc));
    assert!(mib(idle) < 60 && mib(idle) > 1, "idle worker: {} MiB", mib(idle));
    assert!(burn.started_at.is_some());

    // The same figures, per worker slot, on /metrics.
    let cpu = labelled_metric(&clusterd, "clusterd_worker_cpu_seconds_total", "worker=\"0\"").expect("cpu counter");
    assert!(cpu > 1.0, "the burner's CPU seconds: {cpu}");
    let idle_cpu = labelled_metric(&clusterd, "clusterd_worker_cpu_seconds_total", "worker=\"2\"").expect("counter");
    assert!(idle_cpu < cpu / 4.0, "idle {idle_cpu} s against busy {cpu} s");
    let bytes = labelled_metric(&clusterd, "clusterd_worker_resident_memory_bytes", "worker=\"1\"").expect("gauge");
    assert!((120.0..=160.0).contains(&(bytes / MIB as f64)), "allocating worker's gauge: {bytes} bytes");
}

#[test]
fn a_wrapped_worker_is_measured_with_the_processes_it_started() {
    let _serial = serial();
    // `sh -c` runs python as its child (the `; exit` keeps the shell from
    // exec'ing it): the shell alone is a few hundred KiB.
    let script = format!("python3 {} alloc:100; exit $?", test_app("usage.py"));
    let clusterd = Launch::new(&["--workers", "1"], &["sh", "-c", &script]).start();
    let status = clusterd.wait_status("the wrapped worker's memory", SLOW, |s| {
        s.workers[0].state == WorkerState::Ready && s.workers[0].memory_bytes.is_some_and(|b| b >= 100 * MIB)
    });
    let bytes = status.workers[0].memory_bytes.expect("memory");
    assert!(bytes < 140 * MIB, "{} MiB", bytes / MIB);
}

#[test]
fn max_memory_recycles_on_the_whole_tree_s_memory() {
    let _serial = serial();
    // The shell is far below 50 MiB; the python it started is above.
    let script = format!("python3 {} alloc:80; exit $?", test_app("usage.py"));
    let clusterd =
        Launch::new(&["--workers", "1", "--max-memory-mib", "50", "--health-period", "500ms"], &["sh", "-c", &script])
            .start();
    let first = clusterd.wait_status("worker ready", SLOW, |s| s.workers[0].state == WorkerState::Ready);
    let old = first.workers[0].pid.expect("pid");
    clusterd.wait_status("worker recycled", SLOW, |s| {
        s.workers[0].pid.is_some_and(|p| p != old) && s.workers[0].state == WorkerState::Ready
    });
    let logs = clusterd.logs();
    assert!(logs.contains("recycling worker") && logs.contains("RSS "), "{logs}");
    wait_until("old worker to stop", SLOW, || !process_alive(old));
}
