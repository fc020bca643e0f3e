//! `clusterd ls` against a real running clusterd: the table, `-o json|yaml`,
//! `-w`, colour only on a terminal, and a clear error when nothing answers.

mod common;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clustered_api::wire::ClusterdStatus;
use common::*;

fn ls(admin: u16, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("ls")
        .args(["--admin-port", &admin.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run clusterd ls")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "clusterd ls failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

/// Two idle Python workers, once both have CPU and memory figures.
fn measured() -> (Clusterd, ClusterdStatus) {
    let clusterd = Launch::new(&["--workers", "2"], &["python3", &test_app("usage.py"), "idle"]).start();
    let status = clusterd.wait_status("figures of both workers", SLOW, |s| {
        s.ready_workers == 2 && s.workers.iter().all(|w| w.cpu_cores.is_some() && w.memory_bytes.is_some())
    });
    (clusterd, status)
}

#[test]
fn the_table_shows_each_worker_with_its_figures() {
    let _serial = serial();
    let (clusterd, status) = measured();
    let text = stdout(&ls(clusterd.admin, &[]));
    println!("{text}");
    assert!(!text.contains('\x1b'), "no colour into a pipe:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with(&format!("clusterd {} (pid {})", status.version, clusterd.pid())), "{text}");
    assert!(lines[0].contains("2/2 workers ready"), "{text}");
    let header: Vec<&str> = lines[1].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(
        header,
        ["ID", "STATE", "PID", "RESTARTS", "UPTIME", "CPU", "MEMORY", "REQUESTS", "POOL", "LAST EXIT"],
        "{text}"
    );
    assert_eq!(lines.len(), 4, "a row per worker:\n{text}");
    for (row, worker) in lines[2..].iter().zip(&status.workers) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let pid = worker.pid.expect("pid").to_string();
        assert_eq!(cells[..4], [worker.id.to_string().as_str(), "Ready", pid.as_str(), "0"], "{row}");
        assert!(cells[4].ends_with('s') || cells[4].ends_with('m'), "uptime {row}");
        let cpu: f64 = cells[5].strip_suffix('%').and_then(|c| c.parse().ok()).expect("CPU %");
        assert!(cpu < 20.0, "an idle worker: {row}");
        let mib: f64 = cells[6].strip_suffix("Mi").and_then(|m| m.parse().ok()).expect("memory in Mi");
        assert!((2.0..100.0).contains(&mib), "a Python worker's memory: {row}");
        assert_eq!((cells[8], cells[9]), ("default", "-"), "{row}");
    }
}

#[test]
fn json_and_yaml_are_the_status_document() {
    let _serial = serial();
    let (clusterd, status) = measured();
    let pids = |s: &ClusterdStatus| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
    let json: ClusterdStatus = serde_json::from_str(&stdout(&ls(clusterd.admin, &["-o", "json"]))).expect("JSON");
    assert_eq!((json.pid, pids(&json)), (clusterd.pid(), pids(&status)));
    let yaml: ClusterdStatus = serde_yaml::from_str(&stdout(&ls(clusterd.admin, &["-o", "yaml"]))).expect("YAML");
    assert_eq!((yaml.pid, pids(&yaml)), (clusterd.pid(), pids(&status)));
    assert!(yaml.workers.iter().all(|w| w.memory_bytes.is_some()));
}

#[test]
fn watch_prints_again_until_stopped() {
    let _serial = serial();
    let (clusterd, _) = measured();
    let mut watch = Command::new(bin())
        .args(["ls", "-w", "--interval", "300ms", "--admin-port", &clusterd.admin.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("clusterd ls -w");
    let mut out = watch.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(watch.try_wait().expect("wait").is_none(), "-w keeps running");
    watch.kill().expect("stop the watch");
    watch.wait().expect("reap");
    let text = reader.join().expect("reader");
    let tables = text.matches("ID   STATE").count();
    assert!(tables >= 3, "a table every 300 ms for 1.5 s, got {tables}:\n{text}");
    assert!(!text.contains('\x1b'), "a pipe gets no screen clearing nor colour");
}

#[test]
fn a_terminal_gets_colour_unless_no_color() {
    let _serial = serial();
    let (clusterd, _) = measured();
    let run_in_terminal = |env: &[(&str, &str)]| {
        // `script` gives the command a pseudo-terminal as stdout.
        let command = format!("{} ls --admin-port {}", bin(), clusterd.admin);
        let mut script = Command::new("script");
        script.args(["-qec", &command, "/dev/null"]).stdin(Stdio::null()).env_remove("NO_COLOR");
        for (k, v) in env {
            script.env(k, v);
        }
        stdout(&script.output().expect("script"))
    };
    let coloured = run_in_terminal(&[]);
    assert!(coloured.contains("\x1b[32mReady"), "Ready in green on a terminal:\n{coloured:?}");
    let plain = run_in_terminal(&[("NO_COLOR", "1")]);
    assert!(plain.contains("Ready") && !plain.contains("\x1b["), "NO_COLOR:\n{plain:?}");
}

#[test]
fn nothing_listening_is_a_clear_error() {
    let port = free_port();
    let started = Instant::now();
    let output = ls(port, &["--timeout", "2s"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read http://127.0.0.1:{port}/status"))
            && stderr.contains(&format!("--admin-port {port}")),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let bad = ls(port, &["-o", "xml"]);
    assert_eq!(bad.status.code(), Some(2), "a bad flag is exit 2");
}
