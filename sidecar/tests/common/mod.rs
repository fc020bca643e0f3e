//! Helpers for the integration tests: start the real clusterd binary, talk
//! HTTP to it over loopback, poll /status, and run bounded load.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clustered_api::wire::{ClusterdStatus, WorkerState};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The clusterd under test: this build's, or `CLUSTERD_TEST_BIN` (to run
/// a test against another build, e.g. to see it fail before a fix).
pub fn bin() -> String {
    std::env::var("CLUSTERD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_clusterd").to_string())
}

/// Generous: the machine has 2 cores and other tests may be running.
pub const SLOW: Duration = Duration::from_secs(30);

/// Serializes the tests of one file: load tests on 2 cores should not overlap.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn app(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/app").join(name);
    path.canonicalize().expect("example app exists").display().to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A running clusterd, killed (with its workers) when dropped.
pub struct Clusterd {
    pub child: Child,
    pub port: u16,
    pub admin: u16,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

pub struct Launch {
    pub args: Vec<String>,
    pub command: Vec<String>,
    /// Run through this prefix (e.g. `unshare ...`).
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr go to pipes that nobody reads until
    /// [`Clusterd::read_output`].
    pub stall_output: bool,
    /// Working directory (an image's WORKDIR).
    pub current_dir: Option<PathBuf>,
}

impl Launch {
    pub fn new(args: &[&str], command: &[&str]) -> Launch {
        Launch {
            args: args.iter().map(|s| s.to_string()).collect(),
            command: command.iter().map(|s| s.to_string()).collect(),
            wrapper: Vec::new(),
            env: Vec::new(),
            stall_output: false,
            current_dir: None,
        }
    }

    pub fn current_dir(mut self, dir: &std::path::Path) -> Launch {
        self.current_dir = Some(dir.to_path_buf());
        self
    }

    /// The misbehaving test app (tests/apps/misbehave.js).
    pub fn misbehaving(args: &[&str]) -> Launch {
        let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/misbehave.js");
        Launch::new(args, &["node", &app.display().to_string()])
    }

    /// Nobody reads clusterd's stdout and stderr (pipes) until
    /// [`Clusterd::read_output`].
    pub fn stalled_output(mut self) -> Launch {
        self.stall_output = true;
        self
    }

    pub fn node(args: &[&str]) -> Launch {
        Launch::new(args, &["node", &app("server.js")])
    }

    pub fn python(args: &[&str]) -> Launch {
        Launch::new(args, &["python3", &app("server.py")])
    }

    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn wrapped(mut self, wrapper: &[&str]) -> Launch {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn start(self) -> Clusterd {
        let port = free_port();
        let admin = free_port();
        let log = std::env::temp_dir().join(format!("clusterd-test-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut argv: Vec<String> = self.wrapper.clone();
        argv.push(bin());
        argv.extend(["--port".into(), port.to_string(), "--admin-port".into(), admin.to_string()]);
        argv.extend(["--bind".into(), "127.0.0.1".into(), "--admin-bind".into(), "127.0.0.1".into()]);
        // Tests written before `auto` became the default mean the proxy.
        if !self.args.iter().any(|a| a.starts_with("--port-mode")) {
            argv.extend(["--port-mode".into(), "proxy".into()]);
        }
        argv.extend(self.args.iter().cloned());
        argv.push("--".into());
        argv.extend(self.command.iter().cloned());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).env("FAULTS", "1").env("CLUSTERD_LOG", "clusterd=debug").stdin(Stdio::null());
        if self.stall_output {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            command.stdout(log_file.try_clone().expect("dup log")).stderr(log_file);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        let child = command.spawn().expect("spawn clusterd");
        Clusterd { child, port, admin, log, exited: None }
    }
}

impl Clusterd {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&self.log_bytes()).into_owned()
    }

    pub fn log_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.log).unwrap_or_default()
    }

    /// Starts reading the stalled stdout and stderr into the log file.
    pub fn read_output(&mut self) {
        let (Some(stdout), Some(stderr)) = (self.child.stdout.take(), self.child.stderr.take()) else {
            panic!("clusterd's output is not stalled");
        };
        for mut pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let mut log = std::fs::OpenOptions::new().append(true).open(&self.log).expect("log file");
            std::thread::spawn(move || std::io::copy(&mut pipe, &mut log));
        }
    }

    /// clusterd's peak resident memory (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("clusterd's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    /// The value of an unlabelled metric on /metrics.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let response = get(self.admin, "/metrics", Duration::from_secs(5)).ok()?;
        let text = String::from_utf8_lossy(&response.body).into_owned();
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn status(&self) -> Option<ClusterdStatus> {
        let response = get(self.admin, "/status", Duration::from_secs(5)).ok()?;
        serde_json::from_slice(&response.body).ok()
    }

    /// Polls /status until `check` holds; panics with the logs on timeout.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&ClusterdStatus) -> bool,
    ) -> ClusterdStatus {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(status) = self.status() {
                if check(&status) {
                    return status;
                }
                last = Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}; last status: {last:#?}\nlogs:\n{}", self.logs());
    }

    pub fn wait_ready(&self, workers: usize) -> ClusterdStatus {
        self.wait_status(&format!("{workers} ready workers"), SLOW, |s| {
            s.workers.len() == workers && s.workers.iter().all(|w| w.state == WorkerState::Ready)
        })
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal clusterd");
    }

    /// Waits for clusterd to exit; panics with the logs on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("clusterd did not exit in {timeout:?}\nlogs:\n{}", self.logs());
    }
}

impl Drop for Clusterd {
    fn drop(&mut self) {
        if self.exited.is_none() && self.child.try_wait().ok().flatten().is_none() {
            // Workers die with it (PR_SET_PDEATHSIG).
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

pub fn worker_pids(status: &ClusterdStatus) -> Vec<u32> {
    status.workers.iter().filter_map(|w| w.pid).collect()
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; count it as gone only when reaped
    // elsewhere, so check the state too.
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => !status.lines().any(|l| l.starts_with("State:") && l.contains('Z')),
        Err(_) => false,
    }
}

pub fn wait_until(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn worker(&self) -> Option<u32> {
        self.header("x-clusterd-worker").or(self.header("x-worker-id")).and_then(|w| w.parse().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub fn request(port: u16, method: &str, path: &str, timeout: Duration) -> std::io::Result<HttpResponse> {
    let mut stream = connect_and_send(port, method, path, timeout)?;
    read_response(&mut stream)
}

pub fn get(port: u16, path: &str, timeout: Duration) -> std::io::Result<HttpResponse> {
    request(port, "GET", path, timeout)
}

pub fn connect_and_send(port: u16, method: &str, path: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    Ok(stream)
}

pub fn read_response(stream: &mut TcpStream) -> std::io::Result<HttpResponse> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::other(format!("bad response: {:?}", String::from_utf8_lossy(&raw))))
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<HashMap<_, _>>();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        body = dechunk(&body)?;
    }
    Some(HttpResponse { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The outcome of one request made by [`Load`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request had been written to an open connection.
    pub sent: Instant,
    /// From `sent` to the whole response read.
    pub latency: Duration,
    pub result: Result<(u16, Option<u32>), String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self.result, Ok((200, _)))
    }
}

/// Bounded load: `clients` threads, each sending requests one after another
/// until stopped, `max_duration` passed or `max_per_client` were made.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    pub fn start(port: u16, path: &str, clients: usize, max_duration: Duration, max_per_client: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let path = path.to_string();
                std::thread::spawn(move || {
                    let end = Instant::now() + max_duration;
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end && outcomes.len() < max_per_client {
                        outcomes.push(one_request(port, &path));
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, threads }
    }

    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().flat_map(|t| t.join().expect("load thread")).collect()
    }
}

fn one_request(port: u16, path: &str) -> Outcome {
    let timeout = Duration::from_secs(20);
    let mut stream = match connect_and_send(port, "GET", path, timeout) {
        Ok(stream) => stream,
        // Never got a connection: counted as sent "now" (it failed at once).
        Err(e) => {
            return Outcome {
                sent: Instant::now(),
                latency: Duration::ZERO,
                result: Err(format!("connect/send: {e}")),
            };
        }
    };
    let sent = Instant::now();
    let result = read_response(&mut stream).map(|r| (r.status, r.worker())).map_err(|e| format!("read: {e}"));
    Outcome { sent, latency: sent.elapsed(), result }
}

pub fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| !o.ok()).collect()
}

/// Fails the test, naming the first few failures, unless every request succeeded.
pub fn assert_none_failed(outcomes: &[Outcome]) {
    let failed = failures(outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
}

impl Load {
    /// Waits for every client to finish its bounded run.
    pub fn finish_when_done(self) -> Vec<Outcome> {
        self.threads.into_iter().flat_map(|t| t.join().expect("load thread")).collect()
    }
}

/// Installs pinned npm packages (e.g. `ws@8.23.0`) once into
/// `~/.cache/clustered/npm/<packages>` and returns its `node_modules` (for
/// NODE_PATH).
pub fn npm_modules(packages: &[&str]) -> PathBuf {
    let dir = install_once("npm", packages, |dir| {
        let mut npm = Command::new("npm");
        npm.args(["install", "--no-audit", "--no-fund", "--no-save", "--loglevel=error", "--prefix"])
            .arg(dir)
            .args(packages);
        npm
    });
    dir.join("node_modules")
}

/// Installs pinned PyPI packages (e.g. `gunicorn==27.0.1`) once into
/// `~/.cache/clustered/pip/<packages>` with pip's `--target` and returns
/// that directory (for PYTHONPATH; console scripts are in its `bin`).
pub fn pip_packages(packages: &[&str]) -> PathBuf {
    install_once("pip", packages, |dir| {
        let mut pip = Command::new("python3");
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--upgrade",
            "--root-user-action=ignore",
        ])
        .arg("--target")
        .arg(dir)
        .args(packages);
        pip
    })
}

/// Runs the `installer` command made for `~/.cache/clustered/<tool>/<packages>`
/// once, and returns that directory. A file lock keeps parallel tests from
/// racing; once installed, no network is needed.
fn install_once(tool: &str, packages: &[&str], installer: impl FnOnce(&Path) -> Command) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let root = PathBuf::from(home).join(".cache/clustered").join(tool);
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("{tool} cache dir: {e}"));
    let dir = root.join(packages.join("+").replace('/', "%"));
    let done = dir.join(".installed");
    let lock = std::fs::File::create(root.join(".lock")).unwrap_or_else(|e| panic!("{tool} cache lock: {e}"));
    lock.lock().unwrap_or_else(|e| panic!("lock the {tool} cache: {e}"));
    if !done.exists() {
        std::fs::create_dir_all(&dir).expect("package dir");
        let status = installer(&dir).stdin(Stdio::null()).status().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(status.success(), "{tool} install {packages:?} failed: {status}");
        std::fs::write(&done, packages.join("\n")).expect("mark installed");
    }
    dir
}

/// A test app under tests/apps.
pub fn test_app(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps").join(name).display().to_string()
}

/// A node process driven line by line: commands on its stdin, one JSON
/// event per line on its stdout (see tests/apps/realtime_client.js).
pub struct NodeClient {
    child: Child,
    events: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl NodeClient {
    pub fn start(script: &str, args: &[&str], node_path: &std::path::Path) -> NodeClient {
        let mut child = Command::new("node")
            .arg(test_app(script))
            .args(args)
            .env("NODE_PATH", node_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn node client");
        let stdout = child.stdout.take().expect("client stdout");
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        NodeClient { child, events }
    }

    pub fn send(&mut self, command: &str) {
        let stdin = self.child.stdin.as_mut().expect("client stdin");
        writeln!(stdin, "{command}").expect("write to client");
    }

    /// The next event named `name` (others are returned too, in order, as
    /// the second value), within `timeout`.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> (serde_json::Value, Vec<serde_json::Value>) {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if event["event"] == name => return (event, others),
                Ok(event) => others.push(event),
                Err(e) => panic!("no {name:?} event from the client ({e}); other events: {others:?}"),
            }
        }
    }

    /// Events already printed, without waiting.
    pub fn pending_events(&self) -> Vec<serde_json::Value> {
        self.events.try_iter().collect()
    }

    /// Closes its stdin: the clients disconnect and it exits.
    pub fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids in an echo event (`null` for a client whose echo failed).
pub fn echo_pids(event: &serde_json::Value) -> Vec<Option<u32>> {
    event["pids"].as_array().expect("pids").iter().map(|p| p.as_u64().map(|p| p as u32)).collect()
}
