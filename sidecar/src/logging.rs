//! Where clusterd's own log and its workers' output go: stdout and stderr.
//!
//! Logs are data. Each stream has a queue sized in bytes, drained by a
//! thread of its own that writes whatever is queued in as few system calls
//! as it can. Workers' output waits for room in the queue: while it waits,
//! the worker's pipe is not read, so a worker that writes faster than
//! clusterd's reader reads is slowed down, as it would be without clusterd.
//! Only when the reader stalls (a write makes no progress for
//! [`STALL_AFTER`]: a full pipe nobody reads, a stuck container runtime) is
//! worker output dropped, so that a stuck reader cannot freeze the workers;
//! the drop is counted in `clusterd_log_lines_dropped_total` and said in
//! the log. clusterd's own log never waits (it is written from the async
//! runtime): it has a reserve above the queue's size and is dropped beyond
//! it. Nothing here ever blocks the runtime, the proxy or the admin port.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;
use crate::metrics::Metrics;

/// Bytes of worker output queued per stream before workers wait.
const QUEUE_BYTES: usize = 1 << 20;
/// Room above [`QUEUE_BYTES`] for clusterd's own log, which never waits.
const LOG_RESERVE: usize = 256 << 10;
/// Most bytes written in one system call: a stalled write is noticed at
/// this grain (a pipe that is read slowly still makes progress).
const WRITE_BATCH: usize = 64 << 10;
/// A write that makes no progress for this long means the reader stalls:
/// worker output is then dropped (and counted) instead of waited for.
pub const STALL_AFTER: Duration = Duration::from_secs(2);
/// How often a worker's output waiting for room looks for a stall.
const STALL_CHECK: Duration = Duration::from_millis(100);
/// How long clusterd's exit waits for queued output to be written.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);
/// How often the drop counters are read into the metric and the log.
const DROP_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The tracing target of workers' output in the JSON log format: those
/// events waited for room already (see [`wait_room`]).
pub const WORKER_TARGET: &str = "clusterd::worker";

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

/// Whether there is room for worker output, or the reader stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Free,
    Stalled,
}

#[derive(Debug, Default)]
struct Queue {
    buf: Vec<u8>,
    /// The writer is in a write that has made no progress since then.
    writing_since: Option<Instant>,
    /// The last write error, until a write succeeds again.
    failing: Option<String>,
    closed: bool,
    done: bool,
}

impl Queue {
    fn stalled(&self, now: Instant) -> bool {
        self.failing.is_some() || self.writing_since.is_some_and(|since| now.duration_since(since) >= STALL_AFTER)
    }

    fn fits(&self, len: usize, limit: usize) -> bool {
        self.buf.is_empty() || self.buf.len() + len <= limit
    }
}

/// One output stream: its queue and the thread that writes it.
struct Sink {
    stream: Stream,
    queue: Mutex<Queue>,
    /// Wakes the writer (data, close) and the exit's flush (done).
    wake: Condvar,
    /// Wakes worker output waiting for room.
    room: tokio::sync::Notify,
    dropped: AtomicU64,
}

impl Sink {
    fn new(stream: Stream) -> Sink {
        Sink {
            stream,
            queue: Mutex::default(),
            wake: Condvar::new(),
            room: tokio::sync::Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_locked(&self, queue: &mut Queue, bytes: &[u8]) {
        let was_empty = queue.buf.is_empty();
        queue.buf.extend_from_slice(bytes);
        if was_empty {
            self.wake.notify_all();
        }
    }

    fn drop_lines(&self, bytes: &[u8]) {
        self.drop_count(lines_in(bytes));
    }

    fn drop_count(&self, lines: u64) {
        self.dropped.fetch_add(lines, Ordering::Relaxed);
    }

    /// Queues clusterd's own log without ever waiting (`forced`: worker
    /// output that already waited for room).
    fn push_log(&self, bytes: &[u8], forced: bool) {
        let mut queue = self.lock();
        if forced || queue.fits(bytes.len(), QUEUE_BYTES + LOG_RESERVE) {
            self.push_locked(&mut queue, bytes);
        } else {
            drop(queue);
            self.drop_lines(bytes);
        }
    }

    /// Queues worker output, waiting for room while the reader keeps up.
    async fn push_output(&self, bytes: &[u8]) {
        if self.wait_room(bytes.len(), Some(bytes)).await == Room::Stalled {
            self.drop_lines(bytes);
        }
    }

    /// Waits until `len` bytes fit in the queue (and queues `bytes` then,
    /// if given), or until the reader is seen to stall.
    async fn wait_room(&self, len: usize, bytes: Option<&[u8]>) -> Room {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up between the two is kept.
            notified.as_mut().enable();
            {
                let mut queue = self.lock();
                if queue.fits(len, QUEUE_BYTES) {
                    if let Some(bytes) = bytes {
                        self.push_locked(&mut queue, bytes);
                    }
                    return Room::Free;
                }
                if queue.stalled(Instant::now()) {
                    return Room::Stalled;
                }
            }
            let _ = tokio::time::timeout(STALL_CHECK, notified).await;
        }
    }

    /// The writer thread: takes everything queued and writes it.
    fn drain(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            {
                let mut queue = self.lock();
                while queue.buf.is_empty() && !queue.closed {
                    queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                if queue.buf.is_empty() {
                    queue.done = true;
                    self.wake.notify_all();
                    return;
                }
                std::mem::swap(&mut queue.buf, &mut batch);
                queue.writing_since = Some(Instant::now());
            }
            self.room.notify_waiters();
            let mut written = 0;
            while written < batch.len() {
                let end = (written + WRITE_BATCH).min(batch.len());
                let result = out.write_all(&batch[written..end]).and_then(|()| out.flush());
                let mut queue = self.lock();
                match result {
                    Ok(()) => {
                        written = end;
                        queue.writing_since = Some(Instant::now());
                        queue.failing = None;
                    }
                    Err(e) => {
                        // Lost for good (a closed stdout): count it and go on.
                        queue.failing = Some(e.to_string());
                        drop(queue);
                        self.drop_lines(&batch[written..]);
                        break;
                    }
                }
            }
            self.lock().writing_since = None;
            batch.clear();
            // A burst's batch is not kept for ever.
            batch.shrink_to(QUEUE_BYTES);
        }
    }

    /// Stops the writer once the queue is written, waiting at most `timeout`.
    fn close(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut queue = self.lock();
        queue.closed = true;
        self.wake.notify_all();
        while !queue.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            queue = self.wake.wait_timeout(queue, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Why lines are dropped now, for the log.
    fn why_dropping(&self) -> String {
        let queue = self.lock();
        let stream = self.stream.as_str();
        if let Some(error) = &queue.failing {
            format!("writing to clusterd's {stream} fails ({error}): its output is lost")
        } else if queue.stalled(Instant::now()) {
            format!(
                "the reader of clusterd's {stream} has read nothing for {}s or more: dropping worker output \
                 until it reads again",
                STALL_AFTER.as_secs()
            )
        } else {
            format!("clusterd's own log outpaced the reader of its {stream}: dropping log lines")
        }
    }
}

fn lines_in(bytes: &[u8]) -> u64 {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    newlines + u64::from(bytes.last().is_some_and(|&b| b != b'\n'))
}

struct Sinks {
    stdout: Arc<Sink>,
    stderr: Arc<Sink>,
}

impl Sinks {
    fn get(&self, stream: Stream) -> &Sink {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    fn all(&self) -> [&Sink; 2] {
        [&self.stdout, &self.stderr]
    }
}

static SINKS: OnceLock<Sinks> = OnceLock::new();

/// Writes what is queued when clusterd exits (waiting [`FLUSH_AT_EXIT`]
/// at most when the reader stalls).
#[must_use]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(sinks) = SINKS.get() {
            let deadline = Instant::now() + FLUSH_AT_EXIT;
            for sink in sinks.all() {
                sink.close(deadline.saturating_duration_since(Instant::now()));
            }
        }
    }
}

/// clusterd's own log events (and, in the JSON format, its workers' lines):
/// each event arrives in one `write`.
struct LogWriter {
    forced: bool,
}

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match SINKS.get() {
            Some(sinks) => sinks.stderr.push_log(bytes, self.forced),
            None => io::stderr().write_all(bytes)?,
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct MakeLog;

impl<'a> MakeWriter<'a> for MakeLog {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter { forced: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        LogWriter { forced: meta.target() == WORKER_TARGET }
    }
}

/// Starts the writer threads and clusterd's own log (on stderr).
pub fn init(format: LogFormat) -> Guard {
    let stdout = Arc::new(Sink::new(Stream::Stdout));
    let stderr = Arc::new(Sink::new(Stream::Stderr));
    let started = [(Arc::clone(&stdout), "clusterd-stdout"), (Arc::clone(&stderr), "clusterd-stderr")].into_iter().all(
        |(sink, name)| {
            std::thread::Builder::new()
                .name(name.into())
                // Not locked for good: `eprintln!` (fatal errors) must still get through.
                .spawn(move || match sink.stream {
                    Stream::Stdout => sink.drain(io::stdout()),
                    Stream::Stderr => sink.drain(io::stderr()),
                })
                .is_ok()
        },
    );
    // Without its writer threads, output is written directly (see `write`).
    if started {
        let _ = SINKS.set(Sinks { stdout, stderr });
    }

    let filter = tracing_subscriber::EnvFilter::try_from_env("CLUSTERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(MakeLog);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Guard(())
}

/// Queues worker output for `stream`: waits (without blocking the runtime)
/// while the queue is full and the reader keeps up; drops and counts it
/// while the reader stalls. Before [`init`] (in unit tests) it writes
/// directly.
pub async fn write(stream: Stream, bytes: &[u8]) {
    match SINKS.get() {
        Some(sinks) => sinks.get(stream).push_output(bytes).await,
        None => {
            let _ = match stream {
                Stream::Stdout => io::stdout().write_all(bytes),
                Stream::Stderr => io::stderr().write_all(bytes),
            };
        }
    }
}

/// Waits for room for about `len` bytes on clusterd's own log (stderr),
/// where worker output goes as [`WORKER_TARGET`] events in the JSON
/// format. [`Room::Stalled`]: the caller drops the output and says so with
/// [`count_dropped`].
pub async fn wait_room(len: usize) -> Room {
    match SINKS.get() {
        Some(sinks) => sinks.stderr.wait_room(len, None).await,
        None => Room::Free,
    }
}

/// Counts worker lines dropped by the caller (see [`wait_room`]).
pub fn count_dropped(lines: u64) {
    if let Some(sinks) = SINKS.get() {
        sinks.stderr.drop_count(lines);
    }
}

/// Mirrors the drop counters into the metric and says in the log when
/// lines start being dropped, why, and when output flows again.
pub async fn watch_drops(metrics: Arc<Metrics>) {
    let Some(sinks) = SINKS.get() else { return };
    let mut ticker = tokio::time::interval(DROP_CHECK_INTERVAL);
    let mut seen = [0u64; 2];
    let mut episode: [Option<u64>; 2] = [None, None];
    loop {
        ticker.tick().await;
        for (i, sink) in sinks.all().into_iter().enumerate() {
            let total = sink.dropped.load(Ordering::Relaxed);
            if total > seen[i] {
                metrics.log_lines_dropped.inc_by(total - seen[i]);
                if episode[i].is_none() {
                    tracing::warn!("{}", sink.why_dropping());
                    episode[i] = Some(seen[i]);
                }
            } else if let Some(before) = episode[i].take() {
                tracing::warn!(
                    stream = sink.stream.as_str(),
                    dropped = total - before,
                    "output flows again; lines were dropped meanwhile"
                );
            }
            seen[i] = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that takes a while per write, as a slow pipe reader does.
    struct Slow(Arc<Mutex<Vec<u8>>>, Duration);

    impl Write for Slow {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            std::thread::sleep(self.1);
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn start(delay: Duration) -> (Arc<Sink>, Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
        let sink = Arc::new(Sink::new(Stream::Stdout));
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (sink, out) = (Arc::clone(&sink), Arc::clone(&out));
            std::thread::spawn(move || sink.drain(Slow(out, delay)))
        };
        (sink, out, writer)
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_up_loses_nothing_and_lines_stay_whole() {
        let (sink, out, writer) = start(Duration::from_millis(1));
        let line = |i: usize| format!("line {i:06} {}\n", "x".repeat(i % 300));
        for i in 0..20_000 {
            sink.push_output(line(i).as_bytes()).await;
            assert!(sink.lock().buf.len() <= QUEUE_BYTES + 400);
        }
        sink.close(Duration::from_secs(10));
        writer.join().expect("writer");
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 0);
        let out = out.lock().expect("lock");
        let expected: String = (0..20_000).map(line).collect();
        assert!(*out == expected.as_bytes(), "output differs");
    }

    #[tokio::test]
    async fn a_stalled_reader_costs_counted_lines_after_the_stall_only() {
        // Each write takes longer than STALL_AFTER.
        let (sink, _out, _writer) = start(STALL_AFTER + Duration::from_secs(1));
        let mut line = vec![b'x'; 64 << 10];
        line.push(b'\n');
        let started = Instant::now();
        // The first line goes to the (stuck) writer, then the queue fills.
        sink.push_output(&line).await;
        while sink.lock().writing_since.is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..QUEUE_BYTES / line.len() {
            sink.push_output(&line).await;
        }
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 0, "nothing dropped before the stall");
        // The next one waits until the stall is seen, then is dropped.
        sink.push_output(&line).await;
        assert!(started.elapsed() >= STALL_AFTER, "dropped after {:?}", started.elapsed());
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 1);
        assert!(sink.why_dropping().contains("has read nothing"), "{}", sink.why_dropping());
        // clusterd's own log never waits: within its reserve it is queued.
        sink.push_log(b"own log\n", false);
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn lines_are_counted_with_a_last_one_without_newline() {
        assert_eq!(lines_in(b""), 0);
        assert_eq!(lines_in(b"a\nb\n"), 2);
        assert_eq!(lines_in(b"a\nb"), 2);
    }
}
