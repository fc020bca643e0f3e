//! One reaper for everything: orphaned grandchildren are re-parented to
//! clusterd (as PID 1 of a PID namespace, or as child subreaper) and reaped.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Each worker orphans two `sleep 2` grandchildren, then becomes the app.
fn orphaning_worker() -> Vec<String> {
    let script = format!("(sleep 2 &); (sleep 2 &); exec node {}", app("server.js"));
    vec!["sh".into(), "-c".into(), script]
}

fn proc_status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// (pid, name, state) of the children of `parent`, from the host's /proc.
fn children(parent: u32) -> Vec<(u32, String, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let status = proc_status(pid)?;
            let ppid: u32 = field(&status, "PPid:")?.parse().ok()?;
            (ppid == parent).then(|| {
                let name = field(&status, "Name:").unwrap_or("").to_string();
                let state = field(&status, "State:").unwrap_or("").to_string();
                (pid, name, state)
            })
        })
        .collect()
}

fn zombies(parent: u32) -> Vec<(u32, String, String)> {
    children(parent).into_iter().filter(|(_, _, state)| state.starts_with('Z')).collect()
}

fn assert_orphans_adopted_and_reaped(clusterd: &Clusterd, clusterd_pid: u32) {
    wait_until("orphaned sleeps to be re-parented to clusterd", SLOW, || {
        children(clusterd_pid).iter().filter(|(_, name, _)| name == "sleep").count() >= 4
    });
    wait_until("orphans to exit and be reaped", SLOW, || {
        !children(clusterd_pid).iter().any(|(_, name, _)| name == "sleep")
    });
    let left = zombies(clusterd_pid);
    assert!(left.is_empty(), "zombies left: {left:?}\nlogs:\n{}", clusterd.logs());
}

#[test]
fn as_pid1_in_a_pid_namespace_every_zombie_is_reaped() {
    let _serial = serial();
    let mut launch = Launch::new(&["--workers", "2"], &[]).wrapped(&["unshare", "--pid", "--fork", "--mount-proc"]);
    launch.command = orphaning_worker();
    let mut clusterd = launch.start();
    let status = clusterd.wait_ready(2);
    assert_eq!(status.pid, 1, "clusterd should be PID 1 in its namespace");

    // The launched process is `unshare`; clusterd is its only child.
    let host_pid = children(clusterd.pid()).first().map(|c| c.0).expect("clusterd under unshare");
    assert_orphans_adopted_and_reaped(&clusterd, host_pid);

    kill(Pid::from_raw(host_pid as i32), Signal::SIGTERM).expect("SIGTERM clusterd");
    let exit = clusterd.wait_exit(SLOW);
    assert_eq!(exit.code(), Some(0), "logs:\n{}", clusterd.logs());
    assert!(proc_status(host_pid).is_none(), "clusterd (pid 1) still exists");
}

#[test]
fn as_subreaper_orphans_are_reaped() {
    let _serial = serial();
    let mut launch = Launch::new(&["--workers", "2"], &[]);
    launch.command = orphaning_worker();
    let mut clusterd = launch.start();
    let status = clusterd.wait_ready(2);
    assert_ne!(status.pid, 1);
    let pid = clusterd.pid();
    assert_orphans_adopted_and_reaped(&clusterd, pid);
    let workers = worker_pids(&status);
    clusterd.signal(Signal::SIGTERM);
    assert_eq!(clusterd.wait_exit(SLOW).code(), Some(0));
    assert!(workers.iter().all(|&p| !process_alive(p)));
}

#[test]
fn sigkilled_clusterd_takes_its_workers_along() {
    let _serial = serial();
    let mut clusterd = Launch::node(&["--workers", "2"]).start();
    let workers = worker_pids(&clusterd.wait_ready(2));
    clusterd.signal(Signal::SIGKILL);
    clusterd.wait_exit(SLOW);
    // PR_SET_PDEATHSIG: the kernel kills the workers; their reaper is now init.
    for pid in workers {
        wait_until("worker to die with clusterd", Duration::from_secs(10), || !process_alive(pid));
    }
}

/// A daemon a worker started in a session of its own (so not in the
/// worker's process group) is stopped when clusterd shuts down.
#[test]
fn sigterm_leaves_no_process_a_worker_started_behind() {
    let _serial = serial();
    let entry = format!("LIFELINE_TEST={}-{}", std::process::id(), free_port());
    let (key, value) = entry.split_once('=').expect("entry");
    let mut clusterd = Launch::misbehaving(&["--workers", "1"]).env(key, value).start();
    clusterd.wait_ready(1);
    let response = get(clusterd.port, "/grandchild", Duration::from_secs(10)).expect("request");
    let daemon: u32 = String::from_utf8_lossy(&response.body).parse().expect("the daemon's pid");
    assert!(process_alive(daemon));

    clusterd.signal(Signal::SIGTERM);
    assert_eq!(clusterd.wait_exit(SLOW).code(), Some(0), "logs:\n{}", clusterd.logs());
    wait_until("the daemon to be gone", Duration::from_secs(5), || !process_alive(daemon));
    // Nothing of clusterd's is left either (its lifeline exits with it).
    wait_until("no process of the tree to be left", Duration::from_secs(5), || marked(&entry).is_empty());
}

/// The processes whose environment holds `entry` (zombies have none),
/// with their name, process group and session.
fn marked(entry: &str) -> Vec<(u32, String, u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
        })
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
            // After the name: state, ppid, pgrp, session.
            let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
            Some((pid, name, fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
        })
        .collect()
}

/// clusterd outside a container, SIGKILLed: the workers die with it
/// (PDEATHSIG) and so does everything they started, whether it stayed in
/// the worker's process group or left it with `setsid` (the lifeline).
#[test]
fn sigkilled_clusterd_leaves_no_process_of_its_workers_behind() {
    let _serial = serial();
    // Every process of the tree carries this variable, wherever it moves.
    let entry = format!("LIFELINE_TEST={}-{}", std::process::id(), free_port());
    let (key, value) = entry.split_once('=').expect("entry");
    let script = format!("sleep 120 & setsid sleep 121 & exec node {}", app("server.js"));
    let mut launch = Launch::new(&["--workers", "2"], &[]).env(key, value);
    launch.command = vec!["sh".into(), "-c".into(), script];
    let mut clusterd = launch.start();
    let workers = worker_pids(&clusterd.wait_ready(2));

    let sleeps = |tree: &[(u32, String, u32, u32)]| tree.iter().filter(|p| p.1 == "sleep").count();
    wait_until("each worker to start its two sleeps", SLOW, || sleeps(&marked(&entry)) == 4);
    let tree = marked(&entry);
    let in_a_worker_group = tree.iter().filter(|p| p.1 == "sleep" && workers.contains(&p.2)).count();
    let in_own_session = tree.iter().filter(|p| p.1 == "sleep" && p.3 == p.0).count();
    assert_eq!((in_a_worker_group, in_own_session), (2, 2), "processes: {tree:?}");

    clusterd.signal(Signal::SIGKILL);
    clusterd.wait_exit(SLOW);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marked(&entry).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = marked(&entry);
    for process in &left {
        let _ = kill(Pid::from_raw(process.0 as i32), Signal::SIGKILL);
    }
    assert!(left.is_empty(), "left behind (now killed by the test): {left:?}");
}

/// A worker that dies takes what is left of its process group along: a
/// wrapper (`npm start`, `sh -c`) killed with SIGKILL would otherwise
/// leave its server running beside the replacement, for good. A daemon
/// that left the group (`setsid`) is left alone until shutdown, as under
/// tini.
#[test]
fn a_dead_workers_process_group_goes_with_it() {
    let _serial = serial();
    let entry = format!("GROUP_TEST={}-{}", std::process::id(), free_port());
    let (key, value) = entry.split_once('=').expect("entry");
    // `sh` forks node (no exec: a command follows it) and a daemon.
    let script = format!("setsid sleep 121 & node {}; exit 3", app("server.js"));
    let mut launch = Launch::new(&["--workers", "1", "--port-mode", "proxy"], &[]).env(key, value);
    launch.command = vec!["sh".into(), "-c".into(), script];
    let mut clusterd = launch.start();
    let wrapper = worker_pids(&clusterd.wait_ready(1))[0];
    let named = |name: &str| -> Vec<u32> { marked(&entry).into_iter().filter(|p| p.1 == name).map(|p| p.0).collect() };
    wait_until("the wrapper's node and daemon to start", SLOW, || {
        named("node").len() == 1 && named("sleep").len() == 1
    });
    let (server, daemon) = (named("node")[0], named("sleep")[0]);

    kill(Pid::from_raw(wrapper as i32), Signal::SIGKILL).expect("SIGKILL the wrapper");
    let status = clusterd.wait_status("the replacement ready", SLOW, |s| {
        s.ready_workers == 1 && s.workers[0].pid.is_some_and(|pid| pid != wrapper)
    });
    assert_eq!(status.workers[0].restarts, 1);
    wait_until("the dead wrapper's server to be stopped", Duration::from_secs(10), || !process_alive(server));
    assert!(process_alive(daemon), "a daemon in a session of its own stays until shutdown");
    assert_eq!(named("node").len(), 1, "one server: the replacement's");
    assert_eq!(get(clusterd.port, "/", Duration::from_secs(5)).expect("request").status, 200);

    clusterd.signal(Signal::SIGTERM);
    assert_eq!(clusterd.wait_exit(SLOW).code(), Some(0), "logs:\n{}", clusterd.logs());
    wait_until("nothing of the tree to be left", Duration::from_secs(5), || marked(&entry).is_empty());
}
