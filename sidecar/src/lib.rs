//! clusterd: an in-pod cluster manager. It runs one worker of the user's
//! command per CPU of the container's limit, shares one port between them
//! (proxy, inherited socket or SO_REUSEPORT), supervises and reloads them,
//! and reports on an admin port. See README.md for the user's view.

pub mod admin;
pub mod body;
pub mod cgroup;
pub mod config;
pub mod lifeline;
pub mod logging;
pub mod ls;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod signals;
pub mod supervisor;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Config, PortMode, Protocol};
use metrics::Metrics;
use proxy::Router;
use supervisor::spawn::CommandSpec;
use supervisor::{Event, PortSetup, Shared, Supervisor};

/// Exit statuses when clusterd cannot run (clap exits 2 on bad arguments).
pub mod exit {
    pub const INTERNAL: u8 = 1;
    pub const BAD_ARGS: u8 = 2;
    pub const CANNOT_BIND: u8 = 3;
    /// The command exists but cannot be executed (like a shell).
    pub const CANNOT_EXECUTE: u8 = 126;
    /// The command was not found (like a shell).
    pub const NOT_FOUND: u8 = 127;
}

/// A failure before the workers run, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot bind the {what} port {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: io::Error },
    #[error("cannot run {command:?}: {source}")]
    Command { command: String, source: io::Error },
    #[error("{0}")]
    Other(#[from] io::Error),
}

impl StartupError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::Bind { .. } => exit::CANNOT_BIND,
            StartupError::Command { source, .. } if source.kind() == io::ErrorKind::NotFound => exit::NOT_FOUND,
            StartupError::Command { .. } => exit::CANNOT_EXECUTE,
            StartupError::Other(_) => exit::INTERNAL,
        }
    }
}

/// Entry point of the binary.
pub fn main_entry() -> ExitCode {
    // `clusterd ls …`: the worker command always follows `--`, so a first
    // argument `ls` cannot be meant as one.
    if std::env::args_os().nth(1).is_some_and(|a| a == "ls") {
        return ls::main(std::env::args_os().skip(1));
    }
    let config = Config::from_args();
    if let Some(dest) = &config.install_to {
        return match install_self(dest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let message = format!("cannot install to {}: {e}", dest.display());
                eprintln!("clusterd: {message}");
                write_termination_message(Path::new(TERMINATION_LOG), &message);
                ExitCode::from(exit::INTERNAL)
            }
        };
    }
    // Before any thread starts: the lifeline is forked and must be able to
    // allocate in the child.
    let lifeline = lifeline::start();
    // Flushes queued output when clusterd exits.
    let _log_guard = logging::init(config.log_format);
    match lifeline {
        Ok(()) => tracing::debug!(pid = lifeline::pid(), "lifeline started"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot start the lifeline: if clusterd is SIGKILLed, what its workers started outlives it"
        ),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads(cgroup::detect(config.cpu_limit).cores))
        .thread_name("clusterd")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let code = match runtime.block_on(run(config)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("clusterd: {e}");
            write_termination_message(Path::new(TERMINATION_LOG), &e.to_string());
            e.exit_code()
        }
    };
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

/// Where Kubernetes reads a container's last words (its default
/// `terminationMessagePath`): they become `lastState.terminated.message`,
/// which the operator puts in the ClusteredService's status.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// Writes clusterd's fatal error to `path` if that file exists (Kubernetes
/// mounts it); never creates it, so outside Kubernetes nothing is written.
pub fn write_termination_message(path: &Path, message: &str) {
    use std::io::Write;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(message.as_bytes()));
    match written {
        Err(e) if e.kind() != io::ErrorKind::NotFound => eprintln!("clusterd: cannot write {}: {e}", path.display()),
        _ => {}
    }
}

/// Copies this binary to `dest` (an init container fills a shared volume
/// this way); written beside it first, then renamed, so it is never partial.
pub fn install_self(dest: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = dest.with_extension("partial");
    std::fs::copy(&exe, &partial)?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, dest)?;
    // Node-mode workers load it from there: nothing to write at run time.
    node::preload::install_beside(dest)
}

/// The shared (or admin) port, listening with `backlog` or the system's maximum
/// (net.core.somaxconn; tokio's default is 1024 and std's 128, and
/// connections beyond the backlog wait for a client retransmit, ~1 s).
pub(crate) fn listen_shared(addr: SocketAddr, backlog: Option<i32>) -> io::Result<std::net::TcpListener> {
    use nix::sys::socket::{Backlog, listen};
    let listener = std::net::TcpListener::bind(addr)?;
    let backlog = backlog.map_or(Ok(Backlog::MAXALLOWABLE), Backlog::new)?;
    // listen() again on a listening socket only changes its backlog.
    listen(&listener, backlog)?;
    Ok(listener)
}

/// Threads for clusterd's own work (the proxy above all). They take CPU
/// from the same quota as the workers, so one per two CPUs of the limit,
/// 1 to 4: on a 1-CPU quota a second thread only adds contention
/// (`benches/run` measured 18% more proxy throughput with one).
fn runtime_threads(cores: Option<f64>) -> usize {
    let cores = cores.unwrap_or_else(|| cgroup::affinity_count() as f64);
    ((cores / 2.0).ceil() as usize).clamp(1, 4)
}

/// Runs clusterd until it shuts down; returns the exit status.
pub async fn run(config: Config) -> Result<u8, StartupError> {
    let config = Arc::new(config);
    become_subreaper();
    // Handlers go in before the first fork so no exit or signal is missed.
    let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    signals::install(events_tx.clone())?;

    let command = config.command.join(" ");
    let spec = CommandSpec::resolve(&config.command)
        .map_err(|source| StartupError::Command { command: command.clone(), source })?;
    let cpu = cgroup::detect(config.cpu_limit);

    let admin_addr = SocketAddr::new(config.admin_bind, config.admin_port);
    // The system's maximum backlog, as on the shared port: a burst of probes
    // and scrapes must not wait for SYN retransmits.
    let admin_listener = listen_shared(admin_addr, None)
        .and_then(|l| l.set_nonblocking(true).and_then(|()| TcpListener::from_std(l)))
        .map_err(|source| StartupError::Bind { what: "admin", addr: admin_addr, source })?;
    let shared_addr = SocketAddr::new(config.bind, config.port);
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared::default());
    let proxy_shutdown = CancellationToken::new();
    let router = Arc::new(Router::new(&config.pools(), &metrics));
    let (port, proxy_listener) = match config.port_mode {
        PortMode::Proxy => {
            let listener = listen_shared(shared_addr, config.backlog)
                .and_then(|l| l.set_nonblocking(true).and_then(|()| TcpListener::from_std(l)))
                .map_err(|source| StartupError::Bind { what: "shared", addr: shared_addr, source })?;
            (PortSetup::Proxy { router: Arc::clone(&router), shutdown: proxy_shutdown.clone() }, Some(listener))
        }
        PortMode::Inherit => {
            let listener = listen_shared(shared_addr, config.backlog).map_err(|source| StartupError::Bind {
                what: "shared",
                addr: shared_addr,
                source,
            })?;
            (PortSetup::Inherit(Some(listener)), None)
        }
        PortMode::Reuseport => (PortSetup::Reuseport, None),
        PortMode::Node => {
            let sockets = listen_shared(shared_addr, config.backlog)
                .and_then(|l| node::channel::Sockets::new(l, config.port, config.backlog))
                .map_err(|source| StartupError::Bind { what: "shared", addr: shared_addr, source })?;
            let preload = node::preload::Preload::install()
                .inspect(|p| tracing::debug!(path = %p.path().display(), "node-mode drain preload"))
                .map_err(|e| {
                    tracing::warn!(
                        error = %e,
                        "cannot write the node-mode drain preload: in-flight requests on kept-alive connections may be \
                         reset when a worker stops"
                    )
                })
                .ok();
            (PortSetup::Node { sockets: Arc::new(sockets), preload }, None)
        }
        PortMode::Auto => {
            return Err(io::Error::other("--port-mode auto was not resolved (Config::resolve_port_mode)").into());
        }
    };

    let mut supervisor = Supervisor::new(
        Arc::clone(&config),
        spec,
        port,
        cpu,
        events_tx.clone(),
        Arc::clone(&shared),
        Arc::clone(&metrics),
    );
    supervisor.start().map_err(|e| StartupError::Command { command, source: e.0 })?;
    tracing::info!(
        port = config.port,
        mode = config.port_mode.as_str(),
        why = %config.port_mode_reason,
        admin = config.admin_port,
        pid = std::process::id(),
        "clusterd running"
    );

    let (exits_tx, mut exits_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(supervisor::reaper::run(sigchld, exits_tx));
    let events = events_tx.clone();
    tokio::spawn(async move {
        while let Some((pid, exit)) = exits_rx.recv().await {
            if events.send(Event::Exited(pid, exit)).is_err() {
                break;
            }
        }
    });
    if let Some(listener) = proxy_listener {
        spawn_proxy(&config, listener, router, Arc::clone(&metrics), proxy_shutdown, events_tx.clone());
    }
    tokio::spawn(logging::watch_drops(Arc::clone(&metrics)));
    tokio::spawn(supervisor::usage::run(supervisor.worker_pids(), events_tx.clone()));
    let notify = notify::Notify::new();
    tokio::spawn(Arc::clone(&notify).run(supervisor.settled_status()));
    let admin =
        Arc::new(admin::Admin { shared, events: events_tx.clone(), metrics, min_ready: config.min_ready, notify });
    tokio::spawn(admin.serve(admin_listener));
    if config.cpu_limit.is_none() {
        tokio::spawn(poll_cpu_limit(config.cpu_poll_interval, events_tx.clone()));
    }
    drop(events_tx);

    let code = supervisor.run(events_rx).await;
    // Anything still unreaped (e.g. orphans that just exited) goes now.
    supervisor::reaper::reap_exited();
    tracing::info!(code, "clusterd exiting");
    Ok(code)
}

fn spawn_proxy(
    config: &Config,
    listener: TcpListener,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    let (protocol, drain_timeout, admission) = (config.protocol, config.drain_timeout, config.admission());
    let (sticky, upstream) = (config.sticky.clone(), config.upstream_protocol);
    tokio::spawn(async move {
        match protocol {
            Protocol::Http => {
                let proxy = Arc::new(
                    proxy::http::HttpProxy::new(router, metrics, shutdown, drain_timeout)
                        .admission(admission)
                        .sticky(sticky)
                        .upstream(upstream),
                );
                proxy.serve(listener).await;
            }
            Protocol::Tcp => {
                let pool = Arc::clone(router.route("/"));
                proxy::tcp::serve(listener, pool, metrics, shutdown).await;
            }
        }
        let _ = events.send(Event::ProxyDrained);
    });
}

async fn poll_cpu_limit(interval: std::time::Duration, events: tokio::sync::mpsc::UnboundedSender<Event>) {
    let Ok(files) = tokio::task::spawn_blocking(cgroup::LimitFiles::open).await else { return };
    let files = Arc::new(files);
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let files = Arc::clone(&files);
        let Ok(limit) = tokio::task::spawn_blocking(move || files.read()).await else { continue };
        if events.send(Event::CpuLimit(limit)).is_err() {
            return;
        }
    }
}

/// Orphaned grandchildren are re-parented to clusterd instead of the host's
/// init, so the single reaper collects them. PID 1 gets them anyway.
fn become_subreaper() {
    if std::process::id() != 1
        && let Err(e) = nix::sys::prctl::set_child_subreaper(true)
    {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
}

#[cfg(test)]
mod tests {
    use super::{runtime_threads, write_termination_message};

    #[test]
    fn the_fatal_error_goes_to_an_existing_termination_log_only() {
        let dir = std::env::temp_dir().join(format!("clusterd-termlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("termination-log");
        std::fs::write(&log, "an older, longer message").expect("log file");
        write_termination_message(&log, "cannot run \"/no/such/binary\"");
        assert_eq!(std::fs::read_to_string(&log).expect("read"), "cannot run \"/no/such/binary\"");

        let missing = dir.join("not-mounted");
        write_termination_message(&missing, "anything");
        assert!(!missing.exists(), "outside Kubernetes nothing is created");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn one_runtime_thread_per_two_cpus_of_the_limit() {
        assert_eq!(runtime_threads(Some(0.5)), 1);
        assert_eq!(runtime_threads(Some(1.0)), 1);
        assert_eq!(runtime_threads(Some(2.0)), 1);
        assert_eq!(runtime_threads(Some(3.0)), 2);
        assert_eq!(runtime_threads(Some(64.0)), 4);
    }
}
