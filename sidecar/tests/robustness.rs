//! clusterd against apps that misbehave with their output, and readers of
//! clusterd's own output that stall: a worker is never lost to what it
//! writes, clusterd never freezes and its memory stays bounded. Every load
//! is bounded in clients, time and count.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clustered_api::wire::WorkerState;
use common::*;

/// The continuation label of a cut line, for worker 0.
const CONTINUED: &[u8] = b"[worker 0+] ";

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn output_that_is_not_utf8_never_costs_a_worker() {
    let _serial = serial();
    let clusterd = Launch::misbehaving(&["--workers", "1"]).start();
    clusterd.wait_ready(1);
    for i in 0..20 {
        let response = get(clusterd.port, "/binary", Duration::from_secs(10)).expect("request");
        assert_eq!(response.status, 200, "request {i}; logs:\n{}", clusterd.logs());
    }
    // Passed through as they were, on stdout and on stderr (two pipes, read
    // apart: stderr's lines may come after stdout's last one).
    let binary = b"[worker 0] \xff\xfe \xc3\x28\x80\n";
    wait_until("the worker's lines in the log", SLOW, || {
        let log = clusterd.log_bytes();
        count(&log, b"wrote bytes that are not UTF-8") == 20 && count(&log, binary) == 40
    });
    let status = clusterd.status().expect("status");
    assert_eq!(status.workers[0].restarts, 0, "logs:\n{}", clusterd.logs());
}

#[test]
fn a_line_without_newline_is_cut_and_memory_stays_bounded() {
    let _serial = serial();
    const LONG: usize = 48 << 20;
    let clusterd = Launch::misbehaving(&["--workers", "1"]).env("LONG_LINE_BYTES", &LONG.to_string()).start();
    wait_until("the long line passed through", SLOW, || clusterd.logs().contains("[worker 0] long line done"));
    let peak_mib = clusterd.peak_rss_kib() / 1024;
    assert!(peak_mib < 24, "clusterd's peak RSS is {peak_mib} MiB after a {} MiB line", LONG >> 20);
    // 16 KiB pieces after the first, each passed on or (when the log file
    // could not keep up with the burst) counted as dropped.
    let expected = LONG / (16 * 1024) - 1;
    wait_until("every piece passed on or counted as dropped", SLOW, || {
        let dropped = clusterd.metric("clusterd_log_lines_dropped_total").unwrap_or(0.0) as usize;
        count(&clusterd.log_bytes(), CONTINUED) + dropped >= expected
    });
    let log = clusterd.log_bytes();
    let pieces = count(&log, CONTINUED);
    assert!(pieces > 0 && pieces <= expected, "{pieces} pieces");
    assert!(log.split(|&b| b == b'\n').all(|line| line.len() <= 16 * 1024 + CONTINUED.len()));
    assert_eq!(get(clusterd.port, "/", Duration::from_secs(5)).expect("request").status, 200);
}

/// The soak of issue 11: 10 MB of mixed output (not UTF-8, no newlines)
/// while nobody reads clusterd's stdout and stderr for 5 s, under load.
#[test]
fn stalled_output_reader_never_freezes_clusterd() {
    let _serial = serial();
    // Each worker writes 5 MB over 7 s.
    let mut clusterd = Launch::misbehaving(&["--workers", "2"])
        .env("NOISE_BYTES", "5000000")
        .env("NOISE_SECONDS", "7")
        .stalled_output()
        .start();
    clusterd.wait_ready(2);
    let load = Load::start(clusterd.port, "/", 2, Duration::from_secs(8), 4_000);
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let (slowest, stop, admin) = (Arc::clone(&slowest), Arc::clone(&stop), clusterd.admin);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = get(admin, "/healthz", Duration::from_secs(5)).is_ok_and(|r| r.status == 200);
                let took = if ok { started.elapsed() } else { Duration::MAX };
                let mut slowest = slowest.lock().expect("lock");
                *slowest = (*slowest).max(took);
                drop(slowest);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    clusterd.read_output();
    let outcomes = load.finish();
    stop.store(true, Ordering::Relaxed);
    timer.join().expect("timer");

    assert_none_failed(&outcomes);
    let slowest = *slowest.lock().expect("lock");
    assert!(slowest < Duration::from_millis(100), "/healthz took {slowest:?} while output stalled");
    let peak_mib = clusterd.peak_rss_kib() / 1024;
    assert!(peak_mib < 16, "clusterd's peak RSS is {peak_mib} MiB");
    wait_until("the drop counted in /metrics", SLOW, || {
        clusterd.metric("clusterd_log_lines_dropped_total").is_some_and(|n| n > 0.0)
    });
    wait_until("the stall said in the log", SLOW, || clusterd.logs().contains("output flows again"));
    wait_until("both workers' noise passed on", SLOW, || count(&clusterd.log_bytes(), b"] noise done") == 2);
    let status = clusterd.status().expect("status");
    assert!(status.workers.iter().all(|w| w.restarts == 0), "{status:#?}");
}

#[test]
fn a_request_that_hangs_its_worker_is_answered_once_and_not_replayed() {
    let _serial = serial();
    let hung_after = Duration::from_secs(2);
    let clusterd = Launch::misbehaving(&[
        "--workers",
        "3",
        "--health-period",
        "300ms",
        "--health-timeout",
        "300ms",
        "--hung-after",
        "2s",
    ])
    .start();
    let before = clusterd.wait_ready(3);

    let started = Instant::now();
    let response = get(clusterd.port, "/hang", SLOW).expect("an answer, not a dropped connection");
    let waited = started.elapsed();
    assert_eq!(response.status, 502, "{:?}", String::from_utf8_lossy(&response.body));
    assert!(waited < hung_after * 2, "the client waited {waited:?}: the request was replayed");

    let after = clusterd.wait_status("the hung worker replaced", SLOW, |s| {
        s.workers.iter().any(|w| w.restarts > 0) && s.workers.iter().all(|w| w.state == WorkerState::Ready)
    });
    let killed: Vec<u32> = after.workers.iter().filter(|w| w.restarts > 0).map(|w| w.id).collect();
    assert_eq!(killed.len(), 1, "workers killed by one hanging GET: {killed:?}\n{after:#?}");
    let id = killed[0] as usize;
    assert_ne!(after.workers[id].pid, before.workers[id].pid);
}

/// What a keep-alive client saw of its requests on one reused connection.
#[derive(Debug, Default)]
struct KeepAliveRun {
    answered: usize,
    /// Requests written on the open connection that got no response.
    lost: usize,
    /// The server said `Connection: close` and the client stopped.
    told_to_close: bool,
}

/// Sends GET /light on one connection every `pause` until the server closes
/// it or `deadline` passes, reading each response by its Content-Length.
fn keep_alive_client(port: u16, pause: Duration, deadline: Instant) -> KeepAliveRun {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut run = KeepAliveRun::default();
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    while Instant::now() < deadline {
        if writer.write_all(b"GET /light HTTP/1.1\r\nHost: clusterd\r\n\r\n").is_err() {
            run.lost += 1;
            break;
        }
        let (mut length, mut close, mut status_line) = (0usize, false, String::new());
        if reader.read_line(&mut status_line).unwrap_or(0) == 0 {
            run.lost += 1;
            break;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            close |= lower.starts_with("connection:") && lower.contains("close");
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() || !status_line.contains(" 200 ") {
            run.lost += 1;
            break;
        }
        run.answered += 1;
        if close {
            run.told_to_close = true;
            break;
        }
        std::thread::sleep(pause);
    }
    run
}

#[test]
fn sigterm_closes_keep_alive_connections_without_losing_requests() {
    let _serial = serial();
    let mut clusterd = Launch::misbehaving(&["--workers", "2"]).start();
    clusterd.wait_ready(2);
    let deadline = Instant::now() + Duration::from_secs(15);
    // Clients with think times from busy to leisurely (all below a second).
    let clients: Vec<_> = [5u64, 50, 200, 400, 700]
        .into_iter()
        .map(|ms| {
            let port = clusterd.port;
            std::thread::spawn(move || keep_alive_client(port, Duration::from_millis(ms), deadline))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    clusterd.signal(nix::sys::signal::Signal::SIGTERM);
    let runs: Vec<KeepAliveRun> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    assert_eq!(clusterd.wait_exit(SLOW).code(), Some(0));
    for run in &runs {
        assert_eq!(run.lost, 0, "{runs:?}");
        assert!(run.told_to_close, "{runs:?}");
        assert!(run.answered >= 2, "{runs:?}");
    }
}

/// RFC 9112: a malformed chunked body and an HTTP/1.1 request without Host
/// get 400 from clusterd; an
/// HTTP/1.0 one reaches the app without a Host, never with the worker's
/// loopback address; a Host given reaches the app as it was.
#[test]
fn malformed_requests_get_400_and_the_app_sees_the_clients_host_or_none() {
    let _serial = serial();
    let clusterd = Launch::misbehaving(&["--workers", "1"]).start();
    clusterd.wait_ready(1);
    let raw = |request: &str| -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", clusterd.port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        stream.write_all(request.as_bytes()).expect("send");
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    };
    // A bad chunk in a chunked body is the client's fault: 400, not 502.
    let response = raw(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nbad\r\n0\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = raw("GET /host HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = raw("GET /host HTTP/1.0\r\n\r\n");
    assert!(response.contains(" 200 ") && response.ends_with("\r\n\r\n(none)"), "{response}");
    let response = raw("GET /host HTTP/1.1\r\nHost: shop.example:8443\r\nConnection: close\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("shop.example:8443"), "{response}");
}
