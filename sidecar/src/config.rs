//! Command line of clusterd. The long flag names are a contract with the
//! operator, which renders a `ClusteredService` spec into them; their
//! values and defaults are shared with it in `clustered_api::clusterd`.

use std::net::IpAddr;
use std::time::Duration;

use clap::{CommandFactory, Parser, error::ErrorKind};
use clustered_api::clusterd::defaults;
pub use clustered_api::clusterd::{
    HealthCheck, LogFormat, PortMode, Protocol, Rounding, RouteMatch, RouteSpec, Sticky, UpstreamProtocol, WorkerCount,
};

pub use crate::node::NodeCheck;
use crate::policy::{WorkerPolicy, slot_layout};

/// Default of --worker-cap.
pub const DEFAULT_WORKER_CAP: u32 = 1024;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "clusterd",
    version,
    about = "Runs one worker of <command> per CPU of the container's limit, shares one port between them and supervises them.",
    override_usage = "clusterd [OPTIONS] -- <command> [args...]\n       clusterd ls [-o table|json|yaml] [-w] [--admin-port N]",
    after_help = "`clusterd ls --help`: the workers of a running clusterd as a table, like `pm2 ls`.",
    // `--workers -1` is a bad value to explain, not a flag (clap's tip would
    // be to pass it after `--`, which makes it the worker command).
    allow_negative_numbers = true
)]
pub struct Config {
    /// `auto` (= the CPU limit, see --rounding) or a fixed number of workers.
    #[arg(long, env = "CLUSTERD_WORKERS", default_value_t = WorkerCount::default())]
    pub workers: WorkerCount,
    /// Lower bound for the worker count.
    #[arg(long)]
    pub min_workers: Option<u32>,
    /// Upper bound for the worker count.
    #[arg(long)]
    pub max_workers: Option<u32>,
    /// How a fractional CPU limit becomes a worker count (always at least 1).
    #[arg(long, value_enum, default_value_t = Rounding::default())]
    pub rounding: Rounding,
    /// CPU limit in cores, overriding cgroup detection (e.g. 2.5).
    #[arg(long, env = "CLUSTERD_CPU_LIMIT")]
    pub cpu_limit: Option<f64>,
    /// How often the cgroup CPU limit is re-read to scale workers (a few
    /// small files: at the default, an in-place resize reaches the workers
    /// within half a second, for well under 0.1 % of a core).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub cpu_poll_interval: Duration,

    /// The shared port the workers serve on.
    #[arg(long, env = "CLUSTERD_PORT", default_value_t = defaults::PORT)]
    pub port: u16,
    /// Address of the shared port.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// How workers share the port (`auto`: `node` for a Node command
    /// without proxy-only settings, else `proxy`).
    #[arg(long, value_enum, default_value_t = PortMode::default())]
    pub port_mode: PortMode,
    /// Why `port_mode` is what it is, once `auto` is resolved.
    #[arg(skip)]
    pub port_mode_reason: String,
    /// Proxy mode only: `http` balances requests, `tcp` balances connections.
    #[arg(long, value_enum, default_value_t = Protocol::default())]
    pub protocol: Protocol,
    /// What the HTTP proxy speaks to workers: `http1`, `h2c` (HTTP/2
    /// cleartext, prior knowledge) or `auto` (the client's version).
    /// Clients may always use HTTP/1.1 or h2c on the shared port.
    #[arg(long, value_enum, default_value_t = UpstreamProtocol::default())]
    pub upstream_protocol: UpstreamProtocol,
    /// `PREFIX=N`: N dedicated workers for paths starting with PREFIX
    /// (longest prefix wins; proxy + http only). Repeatable.
    #[arg(long = "route", value_parser = RouteSpec::parse_prefix)]
    pub routes: Vec<RouteSpec>,
    /// `PATH=N`: N dedicated workers for exactly PATH (query ignored); an
    /// exact match wins over any prefix. The pool is named `=PATH`. Repeatable.
    #[arg(long = "route-exact", value_parser = RouteSpec::parse_exact)]
    pub exact_routes: Vec<RouteSpec>,

    /// Port of /healthz, /readyz, /status and /metrics.
    #[arg(long, default_value_t = defaults::ADMIN_PORT)]
    pub admin_port: u16,
    /// Address of the admin port.
    #[arg(long, default_value = "0.0.0.0")]
    pub admin_bind: IpAddr,

    /// How workers are probed (proxy mode; see README for the other modes).
    #[arg(long, value_enum, default_value_t = HealthCheck::default())]
    pub health_check: HealthCheck,
    /// Path of the HTTP probe (2xx/3xx = healthy).
    #[arg(long, default_value = defaults::HEALTH_PATH)]
    pub health_path: String,
    #[arg(long, default_value = human(defaults::HEALTH_PERIOD), value_parser = humantime::parse_duration)]
    pub health_period: Duration,
    #[arg(long, default_value = human(defaults::HEALTH_TIMEOUT), value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,
    /// Consecutive failed probes before a worker leaves the rotation.
    #[arg(long, default_value_t = defaults::HEALTH_FAILURE_THRESHOLD)]
    pub health_failure_threshold: u32,
    /// A worker failing probes (or not starting) for this long is killed and restarted.
    #[arg(long, default_value = human(defaults::HUNG_AFTER), value_parser = humantime::parse_duration)]
    pub hung_after: Duration,
    /// inherit/reuseport modes: a live worker counts as Ready after this long.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub startup_grace: Duration,

    #[arg(long, default_value = human(defaults::INITIAL_BACKOFF), value_parser = humantime::parse_duration)]
    pub initial_backoff: Duration,
    #[arg(long, default_value = human(defaults::MAX_BACKOFF), value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
    /// A worker that ran this long resets its backoff.
    #[arg(long, default_value = human(defaults::STABLE_AFTER), value_parser = humantime::parse_duration)]
    pub stable_after: Duration,
    /// Consecutive crashes after which a slot is reported as CrashLoop.
    #[arg(long, default_value_t = defaults::CRASH_LOOP_THRESHOLD)]
    pub crash_loop_threshold: u32,

    /// Recycle a worker after it served this many requests (proxy mode).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Admission control (proxy mode, `--protocol http`): at most N requests
    /// in flight per worker; others wait in a queue per route pool.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: Option<u32>,
    /// Requests that may wait per pool when every worker is at
    /// --max-concurrency; beyond it: 503 with Retry-After (default 100).
    #[arg(long)]
    pub max_queue: Option<u32>,
    /// How long a request may wait in the queue before its 503 (default 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Sticky sessions (proxy mode, `--protocol http`): `cookie[=NAME]` (a
    /// cookie clusterd sets names the worker) or `header=NAME` (the
    /// header's value is hashed to a worker).
    #[arg(long)]
    pub sticky: Option<Sticky>,
    /// Recycle a worker whose RSS exceeds this many MiB.
    #[arg(long)]
    pub max_memory_mib: Option<u64>,

    /// Time from SIGTERM until stragglers are SIGKILLed.
    #[arg(long, default_value = human(defaults::DRAIN_TIMEOUT), value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// /readyz answers 200 when at least this many workers are Ready.
    #[arg(long, default_value_t = 1)]
    pub min_ready: u32,
    #[arg(long, value_enum, default_value_t = LogFormat::default())]
    pub log_format: LogFormat,

    /// Hard cap on the number of worker processes: a count above it (from
    /// --workers, --min-workers, --cpu-limit or --route) is refused, and a
    /// detected CPU limit above it runs this many workers.
    #[arg(long, default_value_t = DEFAULT_WORKER_CAP, value_parser = clap::value_parser!(u32).range(1..))]
    pub worker_cap: u32,
    /// Listen backlog of the shared port (default: the system's maximum,
    /// net.core.somaxconn).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=nix::libc::SOMAXCONN as i64))]
    pub backlog: Option<i32>,

    /// Copy this binary to PATH (e.g. into a shared volume) and exit.
    #[arg(long, value_name = "PATH")]
    pub install_to: Option<std::path::PathBuf>,

    /// The worker command and its arguments.
    #[arg(last = true, required_unless_present = "install_to", num_args = 1.., value_name = "command")]
    pub command: Vec<String>,
}

/// Admission control of the HTTP proxy (`--max-concurrency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Requests in flight per worker.
    pub max_concurrency: u64,
    /// Requests waiting per pool.
    pub max_queue: usize,
    pub queue_timeout: Duration,
}

/// A default duration as `--help` shows it and clap parses it.
fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Config {
    /// Parses the command line and settles `--port-mode auto`; exits with
    /// status 2 and a message on bad arguments.
    pub fn from_args() -> Config {
        let mut config = Config::parse();
        let checked = if config.install_to.is_some() {
            Ok(())
        } else {
            config.resolve_port_mode(crate::node::inspect).and_then(|()| config.validate())
        };
        if let Err(msg) = checked {
            Config::command().error(ErrorKind::ArgumentConflict, msg).exit();
        }
        config
    }

    /// Replaces `--port-mode auto` by the mode it stands for and records why
    /// in `port_mode_reason`. `inspect` tells whether the command runs Node
    /// (only asked when the answer matters).
    pub fn resolve_port_mode(&mut self, inspect: impl FnOnce(&[String]) -> NodeCheck) -> Result<(), String> {
        let (mode, reason) = match self.port_mode {
            PortMode::Auto => match self.proxy_only_setting() {
                Some(setting) => (PortMode::Proxy, format!("{setting} needs the proxy")),
                None => match inspect(&self.command) {
                    NodeCheck::Supported { version } => (
                        PortMode::Node,
                        format!(
                            "a Node {version} command: the workers share the port through Node's cluster protocol, no hop"
                        ),
                    ),
                    NodeCheck::Unsupported(why) => {
                        (PortMode::Proxy, format!("{why}; the proxy needs nothing from the app"))
                    }
                    NodeCheck::NotNode => {
                        (PortMode::Proxy, "not a Node command: the proxy needs nothing from the app".to_string())
                    }
                },
            },
            PortMode::Node => match inspect(&self.command) {
                NodeCheck::Supported { version } => (PortMode::Node, format!("--port-mode node (Node {version})")),
                NodeCheck::Unsupported(why) => return Err(format!("--port-mode node: {why}; use --port-mode proxy")),
                NodeCheck::NotNode => {
                    return Err("--port-mode node needs a Node command (`node …`, `nodejs …`, or a script whose #! \
                                line runs node); use --port-mode proxy for anything else"
                        .into());
                }
            },
            mode => (mode, format!("--port-mode {}", mode.as_str())),
        };
        self.port_mode = mode;
        self.port_mode_reason = reason;
        Ok(())
    }

    /// The first setting given that only the proxy can carry out.
    fn proxy_only_setting(&self) -> Option<&'static str> {
        let http = self.protocol == Protocol::Http;
        [
            (!self.pools().is_empty(), "--route (route pools)"),
            (!http, "--protocol tcp"),
            (self.max_requests.is_some(), "--max-requests"),
            (self.max_concurrency.is_some(), "--max-concurrency"),
            (self.sticky.is_some(), "--sticky"),
            (self.upstream_protocol != UpstreamProtocol::Http1, "--upstream-protocol"),
        ]
        .into_iter()
        .find_map(|(given, setting)| given.then_some(setting))
    }

    /// Checks that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if let (Some(min), Some(max)) = (self.min_workers, self.max_workers)
            && min > max
        {
            return Err(format!("--min-workers {min} is greater than --max-workers {max}"));
        }
        if self.max_workers == Some(0) {
            return Err("--max-workers must be at least 1".into());
        }
        if let Some(cpu) = self.cpu_limit
            && !(cpu.is_finite() && cpu > 0.0)
        {
            return Err(format!("--cpu-limit must be a positive number of cores, got {cpu}"));
        }
        if !self.pools().is_empty() && (self.port_mode != PortMode::Proxy || self.protocol != Protocol::Http) {
            return Err("--route needs --port-mode proxy and --protocol http".into());
        }
        let mut prefixes: Vec<String> = self.pools().iter().map(RouteSpec::pool_name).collect();
        prefixes.sort_unstable();
        if prefixes.windows(2).any(|w| w[0] == w[1]) {
            return Err("each --route prefix may be given only once".into());
        }
        if !self.health_path.starts_with('/') {
            return Err(format!("--health-path must start with '/', got {:?}", self.health_path));
        }
        if self.health_failure_threshold == 0 {
            return Err("--health-failure-threshold must be at least 1".into());
        }
        if self.cpu_poll_interval.is_zero() || self.health_period.is_zero() {
            return Err("--cpu-poll-interval and --health-period must be greater than 0".into());
        }
        if self.port_mode == PortMode::Auto {
            return Err("--port-mode auto must be resolved before validation".into());
        }
        if self.port_mode != PortMode::Reuseport && self.port == 0 {
            return Err("--port must not be 0".into());
        }
        self.validate_timings()?;
        if self.admin_port == 0 {
            return Err("--admin-port must not be 0: probes and the operator need a fixed port \
                        (the default is 9901)"
                .into());
        }
        if self.max_memory_mib == Some(0) {
            return Err("--max-memory-mib 0 would recycle every worker as soon as it starts; give a limit \
                        in MiB (e.g. 512), or leave the flag out"
                .into());
        }
        if self.hung_after.is_zero() {
            return Err("--hung-after 0s would kill every worker as it starts; give it a duration like 30s".into());
        }
        if self.max_requests.is_some() && self.port_mode != PortMode::Proxy {
            return Err(format!(
                "--max-requests needs --port-mode proxy: in {} mode requests do not pass through clusterd, \
                 so they cannot be counted (use --max-memory-mib, or proxy mode)",
                self.port_mode.as_str()
            ));
        }
        self.validate_admission()?;
        if self.admin_port == self.port
            && (self.admin_bind == self.bind || self.admin_bind.is_unspecified() || self.bind.is_unspecified())
        {
            return Err(format!(
                "--admin-port {} is the same as --port: give the admin port another number",
                self.port
            ));
        }
        self.validate_counts()
    }

    /// Probes and restarts: settings under which no worker could be Ready
    /// or restart as documented.
    fn validate_timings(&self) -> Result<(), String> {
        if self.health_timeout.is_zero() {
            return Err("--health-timeout 0s fails every probe, so no worker would ever be Ready; \
                        give it a duration like 1s"
                .into());
        }
        if self.crash_loop_threshold == 0 {
            return Err("--crash-loop-threshold must be at least 1 (consecutive crashes before a slot \
                        is reported as CrashLoop)"
                .into());
        }
        if self.initial_backoff > self.max_backoff {
            return Err(format!(
                "--initial-backoff {} is above --max-backoff {}: lower --initial-backoff or raise --max-backoff",
                human(self.initial_backoff),
                human(self.max_backoff)
            ));
        }
        Ok(())
    }

    /// --max-concurrency and its queue; --sticky.
    fn validate_admission(&self) -> Result<(), String> {
        if self.upstream_protocol != UpstreamProtocol::Http1
            && (self.port_mode != PortMode::Proxy || self.protocol != Protocol::Http)
        {
            return Err("--upstream-protocol needs --port-mode proxy and --protocol http".into());
        }
        if self.sticky.is_some() && (self.port_mode != PortMode::Proxy || self.protocol != Protocol::Http) {
            return Err(
                "--sticky needs --port-mode proxy and --protocol http: only the HTTP proxy sees cookies and headers"
                    .into(),
            );
        }
        if self.max_concurrency.is_none() {
            for (flag, given) in
                [("--max-queue", self.max_queue.is_some()), ("--queue-timeout", self.queue_timeout.is_some())]
            {
                if given {
                    return Err(format!(
                        "{flag} sizes the queue of --max-concurrency: give --max-concurrency N too, or drop {flag}"
                    ));
                }
            }
            return Ok(());
        }
        if self.port_mode != PortMode::Proxy || self.protocol != Protocol::Http {
            return Err(
                "--max-concurrency needs --port-mode proxy and --protocol http: only the HTTP proxy sees each request"
                    .into(),
            );
        }
        if self.queue_timeout.is_some_and(|t| t.is_zero()) {
            return Err("--queue-timeout must be greater than 0 (use --max-queue 0 for no queue)".into());
        }
        Ok(())
    }

    /// The admission limits, when --max-concurrency is given.
    pub fn admission(&self) -> Option<Admission> {
        Some(Admission {
            max_concurrency: self.max_concurrency?.into(),
            max_queue: self.max_queue.unwrap_or(defaults::MAX_QUEUE) as usize,
            queue_timeout: self.queue_timeout.unwrap_or(defaults::QUEUE_TIMEOUT),
        })
    }

    /// Worker counts clusterd can actually run (see --worker-cap).
    fn validate_counts(&self) -> Result<(), String> {
        let cap = self.worker_cap;
        let above = |what: String, n: u64| {
            Err(format!("{what} asks for {n} workers, above the worker cap of {cap} (--worker-cap)"))
        };
        if let WorkerCount::Fixed(n) = self.workers
            && n > cap
        {
            return above(format!("--workers {n}"), n.into());
        }
        if let Some(min) = self.min_workers.filter(|&min| min > cap) {
            return above(format!("--min-workers {min}"), min.into());
        }
        let routed: u64 = self.pools().iter().map(|r| u64::from(r.workers)).sum();
        if routed + 1 > u64::from(cap) {
            // The default pool always keeps one worker besides the routes'.
            return above("--route (with the default pool's worker)".into(), routed + 1);
        }
        if let Some(cpu) = self.cpu_limit {
            let desired = self.policy().desired(cpu);
            if desired > cap {
                return above(format!("--cpu-limit {cpu}"), desired.into());
            }
        }
        if let WorkerCount::Fixed(n) = self.workers {
            let workers = slot_layout(n, &self.pools()).len() as u32;
            if self.min_ready > workers {
                return Err(format!(
                    "--min-ready {} is more than the {workers} workers that will run: /readyz would never pass; \
                     lower --min-ready or raise --workers",
                    self.min_ready
                ));
            }
        }
        Ok(())
    }

    /// How many workers to run for a CPU limit.
    pub fn policy(&self) -> WorkerPolicy {
        WorkerPolicy { workers: self.workers, min: self.min_workers, max: self.max_workers, rounding: self.rounding }
    }

    /// Every route pool: prefix routes, then exact ones.
    pub fn pools(&self) -> Vec<RouteSpec> {
        self.routes.iter().chain(&self.exact_routes).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut c = Config::try_parse_from(args).map_err(|e| e.to_string())?;
        c.resolve_port_mode(|_| NodeCheck::NotNode)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = parse(&["clusterd", "--", "node", "server.js"]).expect("parse");
        assert_eq!(c.workers, WorkerCount::Auto);
        assert_eq!(c.port, 8080);
        assert_eq!(c.admin_port, 9901);
        assert_eq!(c.port_mode, PortMode::Proxy);
        assert_eq!(c.health_period, Duration::from_secs(5));
        assert_eq!(c.initial_backoff, Duration::from_millis(100));
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
        assert_eq!(c.command, vec!["node", "server.js"]);
    }

    #[test]
    fn routes_parse_and_validate() {
        let c = parse(&["clusterd", "--route", "/report=2", "--", "x"]).expect("parse");
        assert_eq!(c.routes, vec![RouteSpec { matcher: RouteMatch::Prefix("/report".into()), workers: 2 }]);
        assert!(parse(&["clusterd", "--route", "report=2", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--route", "/a=0", "--", "x"]).is_err());
        let c = parse(&["clusterd", "--route", "/=1", "--route-exact", "/=1", "--", "x"]).expect("parse");
        let names: Vec<String> = c.pools().iter().map(RouteSpec::pool_name).collect();
        assert_eq!(names, ["/", "=/"]);
        assert!(parse(&["clusterd", "--route", "/a=1", "--route", "/a=2", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--route", "/a=1", "--port-mode", "inherit", "--", "x"]).is_err());
    }

    #[test]
    fn admission_flags_validate() {
        let c = parse(&["clusterd", "--max-concurrency", "2", "--", "x"]).expect("parse");
        let admission = c.admission().expect("admission");
        assert_eq!((admission.max_concurrency, admission.max_queue), (2, 100));
        assert!(parse(&["clusterd", "--", "x"]).expect("parse").admission().is_none());
        let err = parse(&["clusterd", "--max-queue", "5", "--", "x"]).expect_err("queue alone");
        assert!(err.contains("--max-queue") && err.contains("--max-concurrency"), "{err}");
        assert!(parse(&["clusterd", "--queue-timeout", "1s", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--max-concurrency", "0", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--max-concurrency", "1", "--protocol", "tcp", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--max-concurrency", "1", "--port-mode", "inherit", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--max-concurrency", "1", "--queue-timeout", "0s", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--max-concurrency", "1", "--max-queue", "0", "--", "x"]).is_ok());
    }

    fn resolved(args: &[&str], node: NodeCheck) -> Result<Config, String> {
        let mut c = Config::try_parse_from(args).map_err(|e| e.to_string())?;
        c.resolve_port_mode(|_| node)?;
        c.validate()?;
        Ok(c)
    }

    fn node(version: &str) -> NodeCheck {
        NodeCheck::Supported { version: version.into() }
    }

    #[test]
    fn auto_chooses_node_for_a_node_command_without_proxy_only_settings() {
        let c = resolved(&["clusterd", "--", "node", "app.js"], node("v22.1.0")).expect("valid");
        assert_eq!(c.port_mode, PortMode::Node);
        assert!(c.port_mode_reason.contains("Node v22.1.0"), "{}", c.port_mode_reason);

        for extra in [
            &["--route", "/report=1"][..],
            &["--protocol", "tcp"],
            &["--max-requests", "100"],
            &["--max-concurrency", "1"],
            &["--sticky", "cookie"],
            &["--upstream-protocol", "h2c"],
        ] {
            let args: Vec<&str> =
                ["clusterd"].into_iter().chain(extra.iter().copied()).chain(["--", "node", "a.js"]).collect();
            let c = resolved(&args, node("v22.1.0")).expect("valid");
            assert_eq!(c.port_mode, PortMode::Proxy, "{extra:?}");
            assert!(c.port_mode_reason.contains(extra[0]), "{extra:?}: {}", c.port_mode_reason);
        }
    }

    #[test]
    fn auto_falls_back_to_the_proxy_and_says_why() {
        let c = resolved(&["clusterd", "--", "python3", "app.py"], NodeCheck::NotNode).expect("valid");
        assert_eq!(
            (c.port_mode, c.port_mode_reason.as_str()),
            (PortMode::Proxy, "not a Node command: the proxy needs nothing from the app")
        );
        let old = NodeCheck::Unsupported("Node v16.20.2 is older than 18".into());
        let c = resolved(&["clusterd", "--", "node", "a.js"], old).expect("valid");
        assert_eq!(c.port_mode, PortMode::Proxy);
        assert!(c.port_mode_reason.starts_with("Node v16.20.2 is older than 18"), "{}", c.port_mode_reason);
        let c =
            resolved(&["clusterd", "--port-mode", "inherit", "--", "node", "a.js"], node("v22.1.0")).expect("valid");
        assert_eq!(c.port_mode, PortMode::Inherit, "an explicit mode is kept");
    }

    #[test]
    fn node_mode_refuses_what_it_cannot_run() {
        let err =
            resolved(&["clusterd", "--port-mode", "node", "--", "python3"], NodeCheck::NotNode).expect_err("not node");
        assert!(err.contains("--port-mode node needs a Node command"), "{err}");
        let old = NodeCheck::Unsupported("Node v16.20.2 is older than 18".into());
        let err = resolved(&["clusterd", "--port-mode", "node", "--", "node", "a.js"], old).expect_err("too old");
        assert!(err.contains("v16.20.2") && err.contains("--port-mode proxy"), "{err}");
        let err = resolved(&["clusterd", "--port-mode", "node", "--route", "/a=1", "--", "node"], node("v22.1.0"))
            .expect_err("routes need the proxy");
        assert!(err.contains("--route"), "{err}");
    }

    #[test]
    fn bad_bounds_are_rejected() {
        assert!(parse(&["clusterd", "--min-workers", "3", "--max-workers", "2", "--", "x"]).is_err());
        assert!(parse(&["clusterd", "--cpu-limit", "0", "--", "x"]).is_err());
        assert!(parse(&["clusterd"]).is_err());
        assert!(parse(&["clusterd", "--install-to", "/tmp/x"]).is_ok());
    }
}
