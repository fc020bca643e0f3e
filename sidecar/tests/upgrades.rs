//! Upgraded connections (WebSocket) through the HTTP proxy, with real
//! clients from the npm registry: `ws` and `socket.io`.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// One GET with extra header lines, on a fresh connection.
fn request_with(port: u16, path: &str, headers: &str) -> HttpResponse {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(SLOW)).expect("timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    read_response(&mut stream).expect("response")
}
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
    echo_and_fail_over(kind, clients, &["--workers", "2"], true);
}

fn echo_and_fail_over(kind: &str, clients: usize, args: &[&str], upgraded: bool) -> Clusterd {
    let _serial = serial();
    let (clusterd, modules) = start(args);
    let port = clusterd.port.to_string();
    let client = NodeClient::start("realtime_client.js", &[kind, &port, &clients.to_string()], &modules);
    let (echo, _) = client.wait_event("echo", SLOW);
    assert_eq!(echo["errors"], serde_json::json!([]), "{echo}\nlogs:\n{}", clusterd.logs());
    let pids = echo_pids(&echo);
    let mut client = client;
    for _ in 0..3 {
        client.send("echo");
        let (again, _) = client.wait_event("echo", SLOW);
        assert_eq!(echo_pids(&again), pids, "each client stays on its worker: {again}");
    }
    assert_eq!(unknown_sessions(&clusterd), 0, "{}", clusterd.logs());
    assert!(pids.iter().all(Option::is_some), "every client echoed: {echo}");
    let workers: HashSet<u32> = pids.iter().flatten().copied().collect();
    assert_eq!(workers.len(), 2, "connections spread over both workers: {echo}");

    if upgraded {
        // Every client holds one upgraded connection.
        let status = clusterd.wait_status("connections counted", SLOW, |s| {
            s.workers.iter().map(|w| w.connections).sum::<u64>() == clients as u64
        });
        assert!(status.workers.iter().all(|w| w.connections > 0), "{status:#?}");
        assert_eq!(connections_metric(&clusterd), clients as f64);
    }

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
    client.send("reconnect");
    let (echo, _) = client.wait_event("echo", SLOW);
    let after = echo_pids(&echo);
    for i in 0..clients {
        let expected = if moved.contains(&i) { survivor } else { pids[i].expect("pid") };
        assert_eq!(after[i], Some(expected), "client {i} after the kill: {echo}\nlogs:\n{}", clusterd.logs());
    }
    // (The errors are the killed worker's disconnects.)
    client.finish();
    clusterd.wait_status("connections closed", SLOW, |s| s.workers.iter().all(|w| w.connections == 0));
    clusterd
}

fn unknown_sessions(clusterd: &Clusterd) -> usize {
    clusterd.logs().matches("Session ID unknown").count()
}

/// socket.io's long-polling transport sends each poll as a new request: all
/// must reach the worker that holds the session.
#[test]
fn socketio_polling_with_a_sticky_cookie_keeps_sessions_and_fails_over() {
    let clusterd = echo_and_fail_over("sio-polling", 6, &["--workers", "2", "--sticky", "cookie"], false);
    // After the kill, a poll of a lost session reaches the other worker
    // once: that "Session ID unknown" is how the client learns to start a
    // new session. Before the kill there were none (checked above).
    let unknown = unknown_sessions(&clusterd);
    assert!(unknown <= 6, "{unknown} unknown sessions after the kill\n{}", clusterd.logs());
}

#[test]
fn socketio_polling_with_a_sticky_header_keeps_sessions() {
    // socket.io-client sends no header of its own; cookie mode is its case.
    // Header mode: the same key always reaches the same worker.
    let _serial = serial();
    let (clusterd, _) = start(&["--workers", "2", "--sticky", "header=x-session"]);
    for session in ["alice", "bob", "carol", "dave"] {
        let workers: HashSet<u32> = (0..6)
            .map(|_| {
                let response = request_with(clusterd.port, "/", &format!("x-session: {session}\r\n"));
                response.worker().expect("worker header")
            })
            .collect();
        assert_eq!(workers.len(), 1, "session {session} on {workers:?}");
    }
}

/// The same test without --sticky fails: polls land on the other worker.
#[test]
fn socketio_polling_without_sticky_loses_sessions() {
    let _serial = serial();
    let (clusterd, modules) = start(&["--workers", "2"]);
    let port = clusterd.port.to_string();
    let client = NodeClient::start("realtime_client.js", &["sio-polling", &port, "6"], &modules);
    let (echo, _) = client.wait_event("echo", SLOW);
    assert!(unknown_sessions(&clusterd) > 0, "expected 'Session ID unknown' without sticky: {echo}");
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
