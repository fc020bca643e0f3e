//! Workers' output is data: a burst reaches clusterd's stdout whole, line
//! for line, whether it goes to a file or to a pipe read at full speed. A
//! reader that stalls never blocks the admin port, and the lines dropped
//! then are counted and said to be its doing. Real processes throughout.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Lines per worker; 2 workers write 1,000,000 in all.
const LINES: usize = 500_000;
const DONE: &[u8] = b"burst done";

fn burst_app() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/burst.py").display().to_string()
}

/// clusterd with 2 burst workers; its stdout goes to `stdout`, its stderr
/// to a file.
struct Burst {
    child: Child,
    admin: u16,
    stderr: PathBuf,
}

impl Burst {
    fn start(lines: usize, stdout: Stdio) -> Burst {
        let (port, admin) = (free_port(), free_port());
        let stderr = std::env::temp_dir().join(format!("clusterd-logs-{}-{port}.err", std::process::id()));
        let child = Command::new(bin())
            .args(["--workers", "2", "--port-mode", "proxy", "--hung-after", "120s"])
            .args(["--port", &port.to_string(), "--admin-port", &admin.to_string()])
            .args(["--bind", "127.0.0.1", "--admin-bind", "127.0.0.1", "--", "python3", &burst_app()])
            .env("LINES", lines.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn clusterd");
        Burst { child, admin, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn dropped(&self) -> Option<f64> {
        let response = get(self.admin, "/metrics", Duration::from_secs(5)).ok()?;
        let text = String::from_utf8_lossy(&response.body).into_owned();
        text.lines().find_map(|l| l.strip_prefix("clusterd_log_lines_dropped_total ")?.trim().parse().ok())
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.stderr);
        }
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Every worker line is whole and each worker's lines arrive all, in order.
fn assert_every_line_intact(out: &[u8], lines: usize) {
    let mut next: HashMap<u32, usize> = HashMap::new();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let text = std::str::from_utf8(line).expect("ASCII lines");
        let Some(rest) = text.strip_prefix("[worker ") else { panic!("not a worker line: {text:?}") };
        let (worker, body) = rest.split_once("] ").unwrap_or_else(|| panic!("no label: {text:?}"));
        let worker: u32 = worker.parse().unwrap_or_else(|_| panic!("bad label: {text:?}"));
        if body.as_bytes() == DONE {
            continue;
        }
        let expected_seq = next.entry(worker).or_default();
        let expected = format!("w{worker} {:07} {}", *expected_seq, "x".repeat(*expected_seq % 41));
        assert_eq!(body, expected, "worker {worker}: line {expected_seq} lost or cut");
        *expected_seq += 1;
    }
    assert_eq!(next.len(), 2, "lines of two workers");
    for (worker, n) in next {
        assert_eq!(n, lines, "worker {worker} lost {} lines", lines - n);
    }
}

#[test]
fn a_million_lines_into_a_file_arrive_whole() {
    let _serial = serial();
    let path = std::env::temp_dir().join(format!("clusterd-logs-{}.out", std::process::id()));
    let file = std::fs::File::create(&path).expect("stdout file");
    let burst = Burst::start(LINES, Stdio::from(file));
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        let out = std::fs::read(&path).expect("read stdout");
        if count(&out, DONE) == 2 {
            break out;
        }
        assert!(Instant::now() < deadline, "the bursts did not finish; stderr:\n{}", burst.stderr());
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_every_line_intact(&out, LINES);
    assert_eq!(burst.dropped(), Some(0.0), "stderr:\n{}", burst.stderr());
    assert!(!burst.stderr().contains("dropping"), "stderr:\n{}", burst.stderr());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_million_lines_into_a_pipe_read_at_full_speed_arrive_whole() {
    let _serial = serial();
    let mut burst = Burst::start(LINES, Stdio::piped());
    let mut stdout = burst.child.stdout.take().expect("stdout");
    // Reads as fast as it can, until both bursts are in.
    let reader = std::thread::spawn(move || {
        let (mut out, mut buf, mut done) = (Vec::new(), vec![0u8; 1 << 16], 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while done < 2 && Instant::now() < deadline {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // DONE may straddle two reads.
                    let from = out.len().saturating_sub(DONE.len() - 1);
                    out.extend_from_slice(&buf[..n]);
                    done += count(&out[from..], DONE);
                }
            }
        }
        out
    });
    let out = reader.join().expect("reader");
    assert_eq!(count(&out, DONE), 2, "the bursts did not finish; stderr:\n{}", burst.stderr());
    assert_every_line_intact(&out, LINES);
    assert_eq!(burst.dropped(), Some(0.0), "stderr:\n{}", burst.stderr());
    assert!(!burst.stderr().contains("dropping"), "stderr:\n{}", burst.stderr());
}

#[test]
fn a_stalled_reader_never_blocks_the_admin_port_and_its_drops_are_reported() {
    let _serial = serial();
    // Nobody reads stdout: the pipe (64 KiB) and clusterd's queue fill.
    let burst = Burst::start(200_000, Stdio::piped());
    wait_until("the admin port up", SLOW, || get(burst.admin, "/healthz", Duration::from_secs(1)).is_ok());
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(6) {
        let asked = Instant::now();
        let response = get(burst.admin, "/healthz", Duration::from_secs(5));
        assert!(response.is_ok_and(|r| r.status == 200), "/healthz failed; stderr:\n{}", burst.stderr());
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(slowest < Duration::from_millis(500), "/healthz took {slowest:?} while stdout stalled");
    wait_until("the drop counted in /metrics", SLOW, || burst.dropped().is_some_and(|n| n > 0.0));
    wait_until("the stall said in the log", SLOW, || {
        burst.stderr().contains("the reader of clusterd's stdout has read nothing")
    });
}

#[test]
fn bytes_that_are_not_utf8_and_a_last_line_without_newline_survive() {
    let _serial = serial();
    let path = std::env::temp_dir().join(format!("clusterd-logs-bin-{}.out", std::process::id()));
    let (port, admin) = (free_port(), free_port());
    // The server's own stdout goes elsewhere: the worker's pipe closes
    // after the last line, which is passed on then.
    let script = r#"printf '\377\376\000bin\r\ntail without newline'; exec python3 -m http.server "$PORT" --bind 127.0.0.1 >/dev/null"#;
    let mut child = Command::new(bin())
        .args(["--workers", "1", "--port-mode", "proxy", "--port", &port.to_string()])
        .args(["--admin-port", &admin.to_string(), "--bind", "127.0.0.1", "--admin-bind", "127.0.0.1"])
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&path).expect("stdout file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn clusterd");
    wait_until("the worker ready", SLOW, || {
        get(admin, "/status", Duration::from_secs(5)).is_ok_and(|r| r.json()["readyWorkers"] == 1)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    assert!(child.wait().expect("wait").success());
    let out = std::fs::read(&path).expect("stdout");
    let _ = std::fs::remove_file(&path);
    assert!(count(&out, b"[worker 0] \xff\xfe\x00bin\r\n") == 1, "{:?}", String::from_utf8_lossy(&out));
    assert!(out.ends_with(b"[worker 0] tail without newline\n"), "{:?}", String::from_utf8_lossy(&out));
}
