//! Upgraded connections (WebSocket) through the HTTP proxy, with real
//! clients from the npm registry: `ws` and `socket.io`.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Pinned; installed once into ~/.cache/clustered/npm (see `npm_modules`).
const REALTIME: &[&str] = &["ws@8.23.0", "socket.io@4.8.4", "socket.io-client@4.8.4"];

fn start(args: &[&str]) -> (Clusterd, PathBuf) {
    let modules = npm_modules(REALTIME);
    let app = test_app("realtime.js");
    let clusterd = Launch::new(args, &["node", &app]).env("NODE_PATH", &modules.display().to_string()).start();
    clusterd.wait_ready(2);
    (clusterd, modules)
}

/// Sum of `clusterd_upgraded_connections{...}` over workers on /metrics.
fn connections_metric(clusterd: &Clusterd) -> f64 {
    let response = get(clusterd.admin, "/metrics", Duration::from_secs(5)).expect("metrics");
    let text = String::from_utf8_lossy(&response.body).into_owned();
    text.lines()
        .filter(|l| l.starts_with("clusterd_upgraded_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Echo on every client, then `kill -9` of one worker: its clients
/// reconnect to the other worker and echo again.
fn echo_count_and_fail_over(kind: &str, clients: usize) {
    let _serial = serial();
    let (clusterd, modules) = start(&["--workers", "2"]);
    let port = clusterd.port.to_string();
    let client = NodeClient::start("realtime_client.js", &[kind, &port, &clients.to_string()], &modules);
    let (echo, _) = client.wait_event("echo", SLOW);
    assert_eq!(echo["errors"], serde_json::json!([]), "{echo}\nlogs:\n{}", clusterd.logs());
    let pids = echo_pids(&echo);
    assert!(pids.iter().all(Option::is_some), "every client echoed: {echo}");
    let workers: HashSet<u32> = pids.iter().flatten().copied().collect();
    assert_eq!(workers.len(), 2, "connections spread over both workers: {echo}");

    // Every client holds one upgraded connection.
    let status = clusterd.wait_status("connections counted", SLOW, |s| {
        s.workers.iter().map(|w| w.connections).sum::<u64>() == clients as u64
    });
    assert!(status.workers.iter().all(|w| w.connections > 0), "{status:#?}");
    assert_eq!(connections_metric(&clusterd), clients as f64);

    let victim = pids[0].expect("pid");
    let moved: Vec<usize> = (0..clients).filter(|&i| pids[i] == Some(victim)).collect();
    let survivor = *workers.iter().find(|&&p| p != victim).expect("other worker");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill -9 a worker");
    let mut closed = Vec::new();
    while closed.len() < moved.len() {
        let (event, _) = client.wait_event("closed", SLOW);
        closed.push(event["index"].as_u64().expect("index") as usize);
    }
    closed.sort_unstable();
    assert_eq!(closed, moved, "exactly the killed worker's clients lost their connection");
    let mut client = client;
    client.send("reconnect");
    let (echo, _) = client.wait_event("echo", SLOW);
    let after = echo_pids(&echo);
    for i in 0..clients {
        let expected = if moved.contains(&i) { survivor } else { pids[i].expect("pid") };
        assert_eq!(after[i], Some(expected), "client {i} after the kill: {echo}\nlogs:\n{}", clusterd.logs());
    }
    client.finish();
    clusterd.wait_status("connections closed", SLOW, |s| s.workers.iter().all(|w| w.connections == 0));
}

#[test]
fn websocket_clients_echo_and_move_to_the_other_worker_after_kill_9() {
    echo_count_and_fail_over("ws", 6);
}

#[test]
fn socketio_websocket_clients_echo_and_move_to_the_other_worker_after_kill_9() {
    echo_count_and_fail_over("sio-websocket", 6);
}

#[test]
fn upgraded_connections_stay_open_until_the_drain_deadline_at_shutdown() {
    let _serial = serial();
    let (mut clusterd, modules) = start(&["--workers", "2", "--drain-timeout", "4s"]);
    let port = clusterd.port.to_string();
    let mut client = NodeClient::start("realtime_client.js", &["ws", &port, "2"], &modules);
    let (echo, _) = client.wait_event("echo", SLOW);
    assert!(echo_pids(&echo).iter().all(Option::is_some), "{echo}\nlogs:\n{}", clusterd.logs());

    let term = Instant::now();
    clusterd.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_secs(2));
    client.send("echo");
    let (echo, others) = client.wait_event("echo", SLOW);
    assert!(others.is_empty(), "nothing closed before the deadline: {others:?}");
    assert!(echo_pids(&echo).iter().all(Option::is_some), "still served while draining: {echo}");

    let (_, _) = client.wait_event("closed", SLOW);
    let closed_after = term.elapsed();
    assert!(
        closed_after >= Duration::from_millis(3500),
        "closed {closed_after:?} after SIGTERM, before the 4 s deadline"
    );
    assert!(clusterd.wait_exit(SLOW).success(), "logs:\n{}", clusterd.logs());
}

#[test]
fn upgraded_connections_keep_a_reloaded_worker_until_its_drain_deadline() {
    let _serial = serial();
    let (clusterd, modules) = start(&["--workers", "2", "--drain-timeout", "4s"]);
    let port = clusterd.port.to_string();
    let mut client = NodeClient::start("realtime_client.js", &["ws", &port, "2"], &modules);
    let (echo, _) = client.wait_event("echo", SLOW);
    let before: HashSet<Option<u32>> = echo_pids(&echo).into_iter().collect();
    assert!(!before.contains(&None), "{echo}");

    let reload = Instant::now();
    clusterd.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_secs(2));
    client.send("echo");
    let (echo, others) = client.wait_event("echo", SLOW);
    assert!(others.is_empty(), "nothing closed before the deadline: {others:?}");
    let during: HashSet<Option<u32>> = echo_pids(&echo).into_iter().collect();
    assert_eq!(during, before, "the old workers still serve their connections while draining");

    let (_, _) = client.wait_event("closed", SLOW);
    let closed_after = reload.elapsed();
    assert!(
        closed_after >= Duration::from_millis(3500),
        "closed {closed_after:?} after SIGHUP, before the 4 s deadline"
    );
    // Each client was on one of the replaced workers; the second drain may end later.
    let (_, _) = client.wait_event("closed", SLOW);
    client.send("reconnect");
    let (echo, _) = client.wait_event("echo", SLOW);
    for pid in echo_pids(&echo) {
        assert!(pid.is_some_and(|p| !before.contains(&Some(p))), "reconnected to a new worker: {echo}");
    }
    client.finish();
}

#[test]
fn websocket_upgrades_follow_route_pools() {
    let _serial = serial();
    let (clusterd, modules) = start(&["--workers", "2", "--route", "/ws=1"]);
    let status = clusterd.status().expect("status");
    let pool_pid = status.workers.iter().find(|w| w.pool.as_deref() == Some("/ws")).and_then(|w| w.pid);
    let port = clusterd.port.to_string();
    let client = NodeClient::start("realtime_client.js", &["ws", &port, "4"], &modules);
    let (echo, _) = client.wait_event("echo", SLOW);
    assert!(
        echo_pids(&echo).iter().all(|&pid| pid == pool_pid),
        "every /ws connection on the /ws pool's worker {pool_pid:?}: {echo}"
    );
    client.finish();
}
