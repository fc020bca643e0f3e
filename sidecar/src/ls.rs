//! `clusterd ls`: the workers of a running clusterd as a table, like
//! `pm2 ls`, read from its admin port's `/status`. `-o json|yaml` prints
//! the document itself, `-w` prints it again every interval; colour only
//! when stdout is a terminal (and `NO_COLOR` is unset).
//!
//! [`render`] and [`table`] are pure; [`main`] fetches and prints.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clustered_api::clusterd::defaults;
use clustered_api::table::Output;
use clustered_api::table::{Row, age, colour_wanted, layout, mebibytes, percent, separator};
use clustered_api::wire::{ClusterdStatus, STATUS_PATH, WorkerStatus};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;

/// A status document is small; anything larger is not clusterd.
const MAX_BODY: usize = 1 << 20;

#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "clusterd ls",
    about = "Shows the workers of a running clusterd (slot, state, pid, restarts, uptime, CPU, memory, requests, \
             last exit), read from its admin port's /status."
)]
pub struct LsArgs {
    /// The clusterd's --admin-port.
    #[arg(long, env = "CLUSTERD_ADMIN_PORT", default_value_t = defaults::ADMIN_PORT)]
    pub admin_port: u16,
    /// The host its admin port listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_host: String,
    /// `table`, or the status document as `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Watch: print again every --interval until interrupted.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// How often -w prints.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// How long to wait for an answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs `clusterd ls ARGS` (`args` starts with `ls`).
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = LsArgs::parse_from(args);
    if args.interval.is_zero() || args.timeout.is_zero() {
        eprintln!("clusterd ls: --interval and --timeout must be greater than 0");
        return ExitCode::from(crate::exit::BAD_ARGS);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("clusterd ls: cannot start the async runtime: {e}");
            return ExitCode::from(crate::exit::INTERNAL);
        }
    };
    runtime.block_on(run(&args))
}

async fn run(args: &LsArgs) -> ExitCode {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let host = if args.admin_host.contains(':') { format!("[{}]", args.admin_host) } else { args.admin_host.clone() };
    let url = format!("http://{host}:{}{STATUS_PATH}", args.admin_port);
    let terminal = std::io::stdout().is_terminal();
    let colour = colour_wanted(terminal);
    let mut ticker = tokio::time::interval(args.interval);
    let mut first = true;
    loop {
        ticker.tick().await;
        let status = match tokio::time::timeout(args.timeout, fetch(&client, &url)).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return fail(&url, args.admin_port, &e),
            Err(_) => return fail(&url, args.admin_port, &format!("no answer within {:?}", args.timeout)),
        };
        let text = match render(&status, args.output, Timestamp::now(), colour) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("clusterd ls: {e}");
                return ExitCode::from(crate::exit::INTERNAL);
            }
        };
        let mut out = std::io::stdout().lock();
        let separator = separator(first, args.output, terminal);
        first = false;
        let written = write!(out, "{separator}{text}").and_then(|()| out.flush());
        if written.is_err() || !args.watch {
            // A closed pipe (`| head`) ends the watch quietly.
            return ExitCode::SUCCESS;
        }
    }
}

fn fail(url: &str, port: u16, why: &str) -> ExitCode {
    eprintln!("clusterd ls: cannot read {url}: {why} (is clusterd running with --admin-port {port}?)");
    ExitCode::from(crate::exit::INTERNAL)
}

async fn fetch(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
) -> Result<ClusterdStatus, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad address: {e}"))?;
    let response = client.get(uri).await.map_err(|e| match std::error::Error::source(&e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    })?;
    if !response.status().is_success() {
        return Err(format!("clusterd answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(|e| e.to_string())?.to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("not a clusterd status document: {e}"))
}

/// The text `-o output` prints for `status`, at `now`.
pub fn render(status: &ClusterdStatus, output: Output, now: Timestamp, colour: bool) -> Result<String, String> {
    match output {
        Output::Table => Ok(table(status, now, colour)),
        Output::Json => serde_json::to_string_pretty(status).map(|s| s + "\n").map_err(|e| e.to_string()),
        Output::Yaml => serde_yaml::to_string(status).map_err(|e| e.to_string()),
    }
}

const HEADERS: [&str; 10] =
    ["ID", "STATE", "PID", "RESTARTS", "UPTIME", "CPU", "MEMORY", "REQUESTS", "POOL", "LAST EXIT"];

/// A summary line, then one row per worker (and per process still draining).
pub fn table(status: &ClusterdStatus, now: Timestamp, colour: bool) -> String {
    let proxy = status.port_mode == "proxy";
    let rows: Vec<Row> =
        status.workers.iter().map(|w| Row { cells: row(w, proxy, now), state: Some(w.state) }).collect();
    let cpu = match status.cpu.cores {
        Some(cores) => format!("CPU limit {cores} ({})", status.cpu.source),
        None => format!("no CPU limit ({})", status.cpu.source),
    };
    let summary = format!(
        "clusterd {} (pid {}): {}/{} workers ready, port {} ({}), {cpu}{}\n",
        status.version,
        status.pid,
        status.ready_workers,
        status.desired_workers,
        status.port,
        status.port_mode,
        if status.draining { ", shutting down" } else { "" },
    );
    summary + &layout(&HEADERS, &rows, colour)
}

fn row(w: &WorkerStatus, proxy: bool, now: Timestamp) -> Vec<String> {
    let dash = || "-".to_string();
    vec![
        w.id.to_string(),
        format!("{:?}", w.state),
        w.pid.map_or_else(dash, |p| p.to_string()),
        w.restarts.to_string(),
        w.started_at
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map_or_else(dash, |t| age(now.as_second() - t.as_second())),
        w.cpu_cores.map_or_else(dash, percent),
        w.memory_bytes.map_or_else(dash, mebibytes),
        if proxy { w.requests.to_string() } else { dash() },
        w.pool.clone().unwrap_or_else(dash),
        w.last_exit.clone().unwrap_or_else(dash),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustered_api::wire::{CpuLimit, WorkerState};

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn status() -> ClusterdStatus {
        ClusterdStatus {
            version: "0.1.0".into(),
            pid: 4242,
            cpu: CpuLimit { cores: Some(2.0), source: "cgroup-v2".into() },
            desired_workers: 2,
            ready_workers: 1,
            port_mode: "proxy".into(),
            port: 8080,
            workers: vec![
                WorkerStatus {
                    id: 0,
                    pid: Some(101),
                    state: WorkerState::Ready,
                    restarts: 2,
                    last_exit: Some("killed by SIGKILL".into()),
                    pool: Some("default".into()),
                    requests: 1234,
                    started_at: Some("2026-12-07T08:00:00Z".into()),
                    cpu_cores: Some(0.984),
                    memory_bytes: Some(52 << 20),
                    ..Default::default()
                },
                WorkerStatus {
                    id: 1,
                    state: WorkerState::Backoff,
                    pool: Some("default".into()),
                    last_exit: Some("exit code 1".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_table_row_per_worker_with_its_figures() {
        let text = table(&status(), at("2026-12-07T08:03:12Z"), false);
        let expected = "\
clusterd 0.1.0 (pid 4242): 1/2 workers ready, port 8080 (proxy), CPU limit 2 (cgroup-v2)
ID   STATE     PID   RESTARTS   UPTIME   CPU   MEMORY   REQUESTS   POOL      LAST EXIT
0    Ready     101   2          3m12s    98%   52Mi     1234       default   killed by SIGKILL
1    Backoff   -     0          -        -     -        0          default   exit code 1
";
        assert_eq!(text, expected);
        assert!(!text.contains('\x1b'), "no colour unless asked");
    }

    #[test]
    fn colour_marks_the_state_only_and_keeps_the_columns() {
        let text = table(&status(), at("2026-12-07T08:03:12Z"), true);
        assert!(text.contains("\x1b[32mReady     \x1b[0m101"), "{text}");
        assert!(text.contains("\x1b[33mBackoff   \x1b[0m-"), "{text}");
        let plain = text.replace("\x1b[32m", "").replace("\x1b[33m", "").replace("\x1b[0m", "");
        assert_eq!(plain, table(&status(), at("2026-12-07T08:03:12Z"), false));
    }

    #[test]
    fn requests_are_shown_only_where_the_proxy_counts_them() {
        let mut node = status();
        node.port_mode = "node".into();
        let text = table(&node, at("2026-12-07T08:03:12Z"), false);
        assert!(text.lines().nth(2).is_some_and(|row| !row.contains("1234")), "{text}");
    }

    #[test]
    fn json_and_yaml_are_the_status_document() {
        let now = at("2026-12-07T08:03:12Z");
        let json = render(&status(), Output::Json, now, true).expect("json");
        assert_eq!(serde_json::from_str::<ClusterdStatus>(&json).expect("parse"), status());
        let yaml = render(&status(), Output::Yaml, now, true).expect("yaml");
        assert_eq!(serde_yaml::from_str::<ClusterdStatus>(&yaml).expect("parse"), status());
        assert!(!json.contains('\x1b') && !yaml.contains('\x1b'));
    }

    #[test]
    fn flags_parse() {
        let args = LsArgs::parse_from(["ls", "-o", "yaml", "-w", "--admin-port", "9000"]);
        assert_eq!((args.output, args.watch, args.admin_port), (Output::Yaml, true, 9000));
        assert!(LsArgs::try_parse_from(["ls", "-o", "xml"]).is_err());
    }
}
