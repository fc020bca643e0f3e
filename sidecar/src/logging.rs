//! Where clusterd's own log and its workers' output go: stdout and stderr,
//! each through a bounded, lossy queue drained by a thread of its own. A
//! reader that stalls (a full pipe, a paused `kubectl logs -f`, a stuck
//! container runtime) then costs dropped lines, counted in
//! `clusterd_log_lines_dropped_total` and said once in the log, and never
//! blocks the proxy or the supervisor.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::LogFormat;
use crate::metrics::Metrics;

/// Lines (a worker's output line or one log event each) queued per stream
/// before lines are dropped. Worker lines are at most
/// [`crate::supervisor::output::MAX_LINE`] bytes, so a queue holds at most
/// 4 MiB.
const QUEUED_LINES: usize = 256;

/// How often the drop counters are read into the metric and the log.
const DROP_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

struct Sinks {
    stdout: NonBlocking,
    stderr: NonBlocking,
    dropped: [ErrorCounter; 2],
}

static SINKS: OnceLock<Sinks> = OnceLock::new();

/// Keeps the writer threads; dropping it flushes what is queued (waiting
/// about a second at most when the reader stalls).
#[must_use]
pub struct Guard {
    _writers: Vec<WorkerGuard>,
}

/// Sets up the queues and clusterd's own log (on stderr).
pub fn init(format: LogFormat) -> Guard {
    let queue =
        |name: &str| NonBlockingBuilder::default().lossy(true).buffered_lines_limit(QUEUED_LINES).thread_name(name);
    let (stdout, stdout_guard) = queue("clusterd-stdout").finish(io::stdout());
    let (stderr, stderr_guard) = queue("clusterd-stderr").finish(io::stderr());

    let filter = tracing_subscriber::EnvFilter::try_from_env("CLUSTERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(stderr.clone());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    let dropped = [stdout.error_counter(), stderr.error_counter()];
    let _ = SINKS.set(Sinks { stdout, stderr, dropped });
    Guard { _writers: vec![stdout_guard, stderr_guard] }
}

/// Queues `bytes` for `stream`; never blocks. Before [`init`] (in unit
/// tests) it writes directly.
pub fn write(stream: Stream, bytes: &[u8]) {
    let Some(sinks) = SINKS.get() else {
        let _ = match stream {
            Stream::Stdout => io::stdout().write_all(bytes),
            Stream::Stderr => io::stderr().write_all(bytes),
        };
        return;
    };
    let mut sink = match stream {
        Stream::Stdout => sinks.stdout.clone(),
        Stream::Stderr => sinks.stderr.clone(),
    };
    let _ = sink.write_all(bytes);
}

/// Lines dropped so far because a reader stalled.
fn dropped() -> u64 {
    SINKS.get().map_or(0, |s| s.dropped.iter().map(|c| c.dropped_lines() as u64).sum())
}

/// Mirrors the drop counters into the metric and says in the log when
/// lines start being dropped and when output flows again.
pub async fn watch_drops(metrics: std::sync::Arc<Metrics>) {
    let mut ticker = tokio::time::interval(DROP_CHECK_INTERVAL);
    let (mut seen, mut stall_began_at) = (0, None);
    loop {
        ticker.tick().await;
        let total = dropped();
        if total > seen {
            metrics.log_lines_dropped.inc_by(total - seen);
            if stall_began_at.is_none() {
                tracing::warn!("a reader of clusterd's output stalls: dropping output lines until it reads again");
                stall_began_at = Some(seen);
            }
        } else if let Some(before) = stall_began_at.take() {
            tracing::warn!(dropped = total - before, "output flows again; lines were dropped meanwhile");
        }
        seen = total;
    }
}
