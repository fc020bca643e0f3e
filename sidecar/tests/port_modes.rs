//! Each way of sharing the port, with real workers answering over loopback.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use clusterd::supervisor::health::listening_sockets;
use common::*;

/// Sends requests (4 at a time, bounded) until two distinct workers answered.
fn distinct_workers(port: u16, path: &str) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + SLOW;
    let mut batches = 0;
    while seen.len() < 2 && Instant::now() < deadline && batches < 100 {
        batches += 1;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let path = path.to_string();
                std::thread::spawn(move || get(port, &path, Duration::from_secs(10)))
            })
            .collect();
        for handle in handles {
            let response = handle.join().expect("client thread").expect("request");
            assert_eq!(response.status, 200, "body: {}", String::from_utf8_lossy(&response.body));
            seen.insert(response.json()["worker"].as_u64().expect("worker in body") as u32);
        }
    }
    seen
}

#[test]
fn proxy_http_spreads_requests_and_labels_the_worker() {
    let _serial = serial();
    let clusterd = Launch::node(&["--workers", "2", "--health-period", "1s"]).start();
    let status = clusterd.wait_ready(2);
    assert_eq!(status.port_mode, "proxy");
    assert!(status.workers.iter().all(|w| w.port.is_some() && w.pool.as_deref() == Some("default")));
    assert!(distinct_workers(clusterd.port, "/?ms=20").len() >= 2);
    let response = get(clusterd.port, "/light", Duration::from_secs(10)).expect("request");
    // The proxy's label agrees with the app's own.
    assert_eq!(response.header("x-clusterd-worker"), response.header("x-worker-id"));
    let status = clusterd.status().expect("status");
    assert!(status.workers.iter().map(|w| w.requests).sum::<u64>() >= 2);
    let metrics = get(clusterd.admin, "/metrics", Duration::from_secs(5)).expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("clusterd_requests_total{pool=\"default\",worker=\"0\"}"), "{text}");
    assert!(text.contains("clusterd_workers{state=\"Ready\"} 2"), "{text}");
    assert!(text.contains("clusterd_desired_workers 2"), "{text}");
}

#[test]
fn proxy_tcp_spreads_connections() {
    let _serial = serial();
    let clusterd = Launch::node(&["--workers", "2", "--protocol", "tcp", "--health-check", "tcp"]).start();
    clusterd.wait_ready(2);
    assert!(distinct_workers(clusterd.port, "/?ms=20").len() >= 2);
}

#[test]
fn inherit_mode_with_node() {
    let _serial = serial();
    let clusterd = Launch::node(&["--workers", "2", "--port-mode", "inherit", "--startup-grace", "300ms"]).start();
    let status = clusterd.wait_ready(2);
    assert_eq!(status.port_mode, "inherit");
    assert!(distinct_workers(clusterd.port, "/?ms=30").len() >= 2);
}

#[test]
fn inherit_mode_with_python() {
    let _serial = serial();
    let clusterd = Launch::python(&["--workers", "2", "--port-mode", "inherit", "--startup-grace", "300ms"]).start();
    clusterd.wait_ready(2);
    assert!(distinct_workers(clusterd.port, "/?ms=30").len() >= 2);
}

#[test]
fn inherit_mode_passes_systemd_socket_activation_env() {
    let _serial = serial();
    // A worker that reports what it got, then serves the fd with Python.
    let script = "import os,sys; ok = os.environ['LISTEN_PID'] == str(os.getpid()) and os.environ['LISTEN_FDS'] == '1' \
                  and os.environ['LISTEN_FDNAMES'] == 'clusterd'; print('LISTEN_OK' if ok else 'LISTEN_BAD', os.environ.get('LISTEN_PID'), os.getpid(), flush=True); \
                  os.execvp('python3', ['python3', sys.argv[1]])";
    let clusterd = Launch::new(
        &["--workers", "1", "--port-mode", "inherit", "--startup-grace", "300ms"],
        &["python3", "-c", script, &app("server.py")],
    )
    .start();
    clusterd.wait_ready(1);
    let response = get(clusterd.port, "/pid", Duration::from_secs(10)).expect("request");
    assert_eq!(response.status, 200);
    wait_until("the worker's report", SLOW, || clusterd.logs().contains("LISTEN_"));
    assert!(clusterd.logs().contains("LISTEN_OK"), "logs:\n{}", clusterd.logs());
}

#[test]
fn reuseport_mode_with_python() {
    let _serial = serial();
    let clusterd = Launch::python(&["--workers", "2", "--port-mode", "reuseport", "--startup-grace", "500ms"]).start();
    let status = clusterd.wait_ready(2);
    assert_eq!(status.port_mode, "reuseport");
    assert!(distinct_workers(clusterd.port, "/?ms=10").len() >= 2);
    // The workers bind where clusterd was told to (--bind 127.0.0.1, via HOST).
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let listening: Vec<_> = listening_sockets(&table, clusterd.port).map(|s| s.address).collect();
    assert_eq!(listening, vec![Some(Ipv4Addr::LOCALHOST); 2], "listening sockets on the shared port: {listening:?}");
}

/// A worker that serves from a process it started (a shell wrapper that
/// does not exec, a pre-fork server) is Ready once that process listens,
/// and is not killed at --hung-after.
#[test]
fn reuseport_readiness_sees_the_workers_process_tree() {
    let _serial = serial();
    let script = format!("python3 {}; exit $?", app("server.py"));
    let clusterd = Launch::new(
        &["--workers", "2", "--port-mode", "reuseport", "--startup-grace", "300ms", "--hung-after", "3s"],
        &["sh", "-c", &script],
    )
    .start();
    let status = clusterd.wait_ready(2);
    assert!(distinct_workers(clusterd.port, "/?ms=10").len() >= 2);
    // Past --hung-after: the same processes, still Ready.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let after = clusterd.wait_ready(2);
    assert_eq!(worker_pids(&after), worker_pids(&status), "restarted: {after:#?}\nlogs:\n{}", clusterd.logs());
    assert!(after.workers.iter().all(|w| w.restarts == 0), "{after:#?}");
}

/// gunicorn, a pre-fork server (its master binds, its workers serve), from
/// PyPI, pinned.
const GUNICORN: &str = "gunicorn==27.0.1";

/// gunicorn under clusterd: `command` runs it (from a shell that stays, or
/// not) with 2 sync workers and the WSGI app of tests/apps. Each clusterd
/// worker becomes Ready and serves, and none is killed at --hung-after.
fn gunicorn_serves(mode: &str, command: &[&str]) {
    let packages = pip_packages(&[GUNICORN]);
    let clusterd = Launch::new(
        &["--workers", "2", "--port-mode", mode, "--startup-grace", "300ms", "--hung-after", "3s"],
        command,
    )
    .env("PYTHONPATH", &packages.display().to_string())
    .env("PATH", &format!("{}:{}", packages.join("bin").display(), std::env::var("PATH").unwrap_or_default()))
    .current_dir(&std::path::PathBuf::from(test_app("")))
    .start();
    let status = clusterd.wait_ready(2);
    assert_eq!(status.port_mode, mode);
    assert!(distinct_workers(clusterd.port, "/").len() >= 2, "logs:\n{}", clusterd.logs());
    std::thread::sleep(Duration::from_secs(4));
    let after = clusterd.wait_ready(2);
    assert_eq!(worker_pids(&after), worker_pids(&status), "restarted: {after:#?}\nlogs:\n{}", clusterd.logs());
    assert!(after.workers.iter().all(|w| w.restarts == 0), "{after:#?}");
    let response = get(clusterd.port, "/", Duration::from_secs(10)).expect("request");
    let served_by = response.json()["pid"].as_u64().expect("pid") as u32;
    assert!(!worker_pids(&after).contains(&served_by), "a gunicorn worker, not its master, served");
}

/// `gunicorn --reuse-port` as the worker command: it binds the shared port
/// (`PORT`, gunicorn's default bind when set) with SO_REUSEPORT.
#[test]
fn gunicorn_with_reuse_port_in_reuseport_mode() {
    let _serial = serial();
    gunicorn_serves("reuseport", &["gunicorn", "--reuse-port", "--workers", "2", "wsgi_app:app"]);
}

/// The same behind a shell that does not exec it (`sh -c '…; exit $?'`):
/// gunicorn's master is the worker's child.
#[test]
fn gunicorn_behind_a_shell_in_reuseport_mode() {
    let _serial = serial();
    let script = r#"gunicorn --reuse-port --bind "$HOST:$PORT" --workers 2 wsgi_app:app; exit $?"#;
    gunicorn_serves("reuseport", &["sh", "-c", script]);
}

/// In inherit mode gunicorn takes the shared socket from `LISTEN_FDS` by
/// itself, with no `--bind` (the README's advice).
#[test]
fn gunicorn_takes_the_inherited_socket_without_bind() {
    let _serial = serial();
    gunicorn_serves("inherit", &["gunicorn", "--workers", "2", "wsgi_app:app"]);
}

/// An unmodified app (it listens on PORT itself) in the modes that need the
/// app's help: the worker's last exit says what the mode needs.
#[test]
fn an_app_that_ignores_the_mode_is_told_what_the_mode_needs() {
    let _serial = serial();
    let plain_listen = "require('http').createServer((q, s) => s.end('ok')).listen(Number(process.env.PORT))";
    for (mode, needle) in [("inherit", "passes the shared socket as fd 3"), ("reuseport", "SO_REUSEPORT")] {
        let clusterd = Launch::new(
            &["--port-mode", mode, "--workers", "2", "--startup-grace", "3s"],
            &["node", "-e", plain_listen],
        )
        .start();
        let status = clusterd.wait_status(&format!("{mode}: a worker's exit explained"), SLOW, |s| {
            s.workers.iter().any(|w| w.last_exit.as_deref().is_some_and(|e| e.contains(needle)))
        });
        let exit = status.workers.iter().find_map(|w| w.last_exit.clone()).unwrap_or_default();
        assert!(exit.contains("before it was ready") && exit.contains("proxy mode needs nothing"), "{exit}");
        assert!(clusterd.logs().contains(needle), "{mode}: {}", clusterd.logs());
    }
}
