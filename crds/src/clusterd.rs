//! clusterd's command line: the contract between the operator, which renders
//! a spec into flags ([`ClusterdArgs::to_args`]), and clusterd, which parses
//! them (its `config` module uses these types).
//!
//! Every value's string form is written once, here ([`PortMode::as_str`] …),
//! and so is every default: [`defaults`] for numbers and durations, the
//! `#[default]` variant for enums. Only `std` is needed; the `crd` feature
//! adds the CRD's serde and schema forms, the `clap` feature the parsers.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What clusterd assumes for a flag that is not given; the CRD defaults to
/// the same values.
pub mod defaults {
    use std::time::Duration;

    pub const PORT: u16 = 8080;
    pub const ADMIN_PORT: u16 = 9901;
    pub const HEALTH_PATH: &str = "/";
    pub const HEALTH_PERIOD: Duration = Duration::from_secs(5);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    pub const HEALTH_FAILURE_THRESHOLD: u32 = 3;
    pub const HUNG_AFTER: Duration = Duration::from_secs(30);
    pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
    pub const STABLE_AFTER: Duration = Duration::from_secs(30);
    pub const CRASH_LOOP_THRESHOLD: u32 = 5;
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
    /// Requests that may wait per pool under `--max-concurrency`
    /// (Passenger's default request queue size).
    pub const MAX_QUEUE: u32 = 100;
    /// How long a request may wait in that queue.
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// `auto` or a fixed number of workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkerCount {
    /// One worker per core of the CPU limit.
    #[default]
    Auto,
    Fixed(u32),
}

impl fmt::Display for WorkerCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerCount::Auto => f.write_str("auto"),
            WorkerCount::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for WorkerCount {
    type Err = String;

    /// `auto` (or PM2's `max`) or a positive integer.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" | "max" => Ok(WorkerCount::Auto),
            n => match n.parse::<u32>() {
                Ok(0) | Err(_) => Err(format!("expected `auto` or a positive integer, got {s:?}")),
                Ok(n) => Ok(WorkerCount::Fixed(n)),
            },
        }
    }
}

/// Writes `as_str` (the flag value) and, with the `clap` feature, a
/// `ValueEnum` that parses exactly those strings, so the operator's and
/// clusterd's spellings cannot drift apart.
macro_rules! flag_values {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in the order `--help` lists them.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The value as clusterd's flag spells it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        #[cfg(feature = "clap")]
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                Self::ALL
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.as_str()))
            }
        }
    };
}

/// Rounding of a fractional CPU limit to a worker count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "crd", derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema))]
pub enum Rounding {
    /// 2.5 CPUs → 2 workers (as Go's automaxprocs does).
    #[default]
    Floor,
    /// 2.5 CPUs → 3 workers.
    Ceil,
    /// 2.5 CPUs → 3 workers, 2.4 → 2.
    Round,
}
flag_values!(Rounding { Floor => "floor", Ceil => "ceil", Round => "round" });

/// How the workers of a pod share the port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "crd", derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema))]
#[cfg_attr(feature = "crd", serde(rename_all = "lowercase"))]
pub enum PortMode {
    /// clusterd chooses: `node` for a Node command (Node 18 or later)
    /// without route pools or other proxy-only settings, `proxy` for
    /// everything else. `/status` says which and why.
    #[default]
    Auto,
    /// clusterd listens on the port and balances each request (or TCP
    /// connection) to the least busy worker; each worker listens on a
    /// private loopback port given in `PORT`. Needed for route pools and
    /// per-worker health checks.
    Proxy,
    /// clusterd binds the port once and hands the listening socket to every
    /// worker as fd 3 (`LISTEN_FDS=1`, systemd style): Node's
    /// `listen({fd: 3})`, gunicorn/uvicorn `--fd 3`.
    Inherit,
    /// Every worker binds the port itself with SO_REUSEPORT and the kernel
    /// spreads connections.
    Reuseport,
    /// Node apps, unmodified: clusterd speaks the primary's side of Node's
    /// `cluster` protocol, so a worker's plain `listen(PORT)` gets clusterd's
    /// listening socket (no hop, as under PM2), and its `listening` message
    /// makes it Ready.
    Node,
}
flag_values!(PortMode {
    Auto => "auto",
    Proxy => "proxy",
    Inherit => "inherit",
    Reuseport => "reuseport",
    Node => "node",
});

/// Protocol on the shared port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "crd", derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema))]
pub enum Protocol {
    #[default]
    #[cfg_attr(feature = "crd", serde(rename = "HTTP"))]
    Http,
    #[cfg_attr(feature = "crd", serde(rename = "TCP"))]
    Tcp,
}
flag_values!(Protocol { Http => "http", Tcp => "tcp" });

/// What the HTTP proxy speaks to the workers: HTTP/1.1, HTTP/2 cleartext
/// (prior knowledge, as gRPC servers expect), or the client's own version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "crd", derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema))]
pub enum UpstreamProtocol {
    #[default]
    #[cfg_attr(feature = "crd", serde(rename = "http1"))]
    Http1,
    #[cfg_attr(feature = "crd", serde(rename = "h2c"))]
    H2c,
    #[cfg_attr(feature = "crd", serde(rename = "auto"))]
    Auto,
}
flag_values!(UpstreamProtocol { Http1 => "http1", H2c => "h2c", Auto => "auto" });

/// How clusterd probes each worker. `None` exists only on the command line:
/// the CRD offers `HTTP` and `TCP`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthCheck {
    #[default]
    Http,
    Tcp,
    None,
}
flag_values!(HealthCheck { Http => "http", Tcp => "tcp", None => "none" });

/// clusterd's own log lines and the workers' output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
flag_values!(LogFormat { Text => "text", Json => "json" });

/// Which request paths a route pool serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteMatch {
    /// Exactly this path (query ignored); wins over any prefix.
    Exact(String),
    /// Every path starting with this prefix; the longest prefix wins.
    Prefix(String),
}

/// One route pool: `--route PREFIX=N` or `--route-exact PATH=N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub matcher: RouteMatch,
    pub workers: u32,
}

impl RouteSpec {
    /// The pool's name in /status and metrics: the prefix, or `=PATH`.
    pub fn pool_name(&self) -> String {
        match &self.matcher {
            RouteMatch::Exact(path) => format!("={path}"),
            RouteMatch::Prefix(prefix) => prefix.clone(),
        }
    }

    /// The route as one flag.
    pub fn to_arg(&self) -> String {
        match &self.matcher {
            RouteMatch::Exact(path) => format!("--route-exact={path}={}", self.workers),
            RouteMatch::Prefix(prefix) => format!("--route={prefix}={}", self.workers),
        }
    }

    /// The value of `--route`: `PREFIX=N`.
    pub fn parse_prefix(value: &str) -> Result<RouteSpec, String> {
        let (prefix, workers) = parse_route(value)?;
        Ok(RouteSpec { matcher: RouteMatch::Prefix(prefix), workers })
    }

    /// The value of `--route-exact`: `PATH=N`.
    pub fn parse_exact(value: &str) -> Result<RouteSpec, String> {
        let (path, workers) = parse_route(value)?;
        Ok(RouteSpec { matcher: RouteMatch::Exact(path), workers })
    }
}

fn parse_route(s: &str) -> Result<(String, u32), String> {
    let (prefix, n) = s.split_once('=').ok_or_else(|| format!("expected PREFIX=N, got {s:?}"))?;
    if !prefix.starts_with('/') {
        return Err(format!("route prefix must start with '/', got {prefix:?}"));
    }
    if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("a request path never contains white space or control characters: {prefix:?}"));
    }
    if let Some(at) = prefix.find(['?', '#']) {
        return Err(format!(
            "a route matches the request's path only, never its query or fragment, so {prefix:?} could never \
             match: give the path alone ({:?})",
            &prefix[..at]
        ));
    }
    let workers: u32 = n.parse().map_err(|_| format!("route worker count must be a positive integer, got {n:?}"))?;
    if workers == 0 {
        return Err("a route needs at least 1 worker".into());
    }
    Ok((prefix.to_string(), workers))
}

/// Sticky sessions (`--sticky`): what ties a client to one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sticky {
    /// clusterd sets a cookie naming the worker (`cookie` or `cookie=NAME`).
    Cookie(String),
    /// The client's own header value (e.g. a session id) is hashed to a
    /// worker (`header=NAME`).
    Header(String),
}

impl Sticky {
    pub const DEFAULT_COOKIE: &'static str = "clusterd-worker";

    /// The flag, as `to_args` writes it.
    pub fn to_arg(&self) -> String {
        format!("--sticky={self}")
    }
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::Cookie(name) => write!(f, "cookie={name}"),
            Sticky::Header(name) => write!(f, "header={name}"),
        }
    }
}

impl FromStr for Sticky {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = match s.split_once('=') {
            Some((kind, name)) => (kind, Some(name)),
            None => (s, None),
        };
        let token = |name: &str| {
            let ok =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if ok { Ok(name.to_string()) } else { Err(format!("{name:?} is not a valid cookie or header name")) }
        };
        match (kind, name) {
            ("cookie", None) => Ok(Sticky::Cookie(Sticky::DEFAULT_COOKIE.into())),
            ("cookie", Some(name)) => token(name).map(Sticky::Cookie),
            ("header", Some(name)) => token(name).map(|n| Sticky::Header(n.to_ascii_lowercase())),
            _ => Err(format!("expected `cookie`, `cookie=NAME` or `header=NAME`, got {s:?}")),
        }
    }
}

/// The settings the operator passes to clusterd. clusterd has more flags
/// (bind addresses, CPU limit override, …); these are the ones a
/// `ClusteredService` spec controls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterdArgs {
    pub workers: WorkerCount,
    pub min_workers: Option<u32>,
    pub max_workers: Option<u32>,
    pub rounding: Rounding,
    pub port: u16,
    pub port_mode: PortMode,
    pub protocol: Protocol,
    pub admin_port: u16,
    /// In the order given; the flags keep it.
    pub routes: Vec<RouteSpec>,
    pub health_check: HealthCheck,
    /// Only passed for HTTP checks.
    pub health_path: String,
    pub health_period: Duration,
    pub health_timeout: Duration,
    pub health_failure_threshold: u32,
    pub hung_after: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub stable_after: Duration,
    pub crash_loop_threshold: u32,
    pub max_requests: Option<u64>,
    pub max_memory_mib: Option<u64>,
    /// Admission control: requests in flight per worker; the queue flags
    /// are only sent with it.
    pub max_concurrency: Option<u32>,
    pub max_queue: Option<u32>,
    pub queue_timeout: Option<Duration>,
    pub sticky: Option<Sticky>,
    /// Only sent when not the default (so existing pods do not roll).
    pub upstream_protocol: UpstreamProtocol,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
}

impl Default for ClusterdArgs {
    fn default() -> Self {
        Self {
            workers: WorkerCount::default(),
            min_workers: None,
            max_workers: None,
            rounding: Rounding::default(),
            port: defaults::PORT,
            port_mode: PortMode::default(),
            protocol: Protocol::default(),
            admin_port: defaults::ADMIN_PORT,
            routes: Vec::new(),
            health_check: HealthCheck::default(),
            health_path: defaults::HEALTH_PATH.into(),
            health_period: defaults::HEALTH_PERIOD,
            health_timeout: defaults::HEALTH_TIMEOUT,
            health_failure_threshold: defaults::HEALTH_FAILURE_THRESHOLD,
            hung_after: defaults::HUNG_AFTER,
            initial_backoff: defaults::INITIAL_BACKOFF,
            max_backoff: defaults::MAX_BACKOFF,
            stable_after: defaults::STABLE_AFTER,
            crash_loop_threshold: defaults::CRASH_LOOP_THRESHOLD,
            max_requests: None,
            max_memory_mib: None,
            max_concurrency: None,
            max_queue: None,
            queue_timeout: None,
            sticky: None,
            upstream_protocol: UpstreamProtocol::default(),
            drain_timeout: defaults::DRAIN_TIMEOUT,
            log_format: LogFormat::default(),
        }
    }
}

impl ClusterdArgs {
    /// clusterd's flags, every setting explicit, without the `-- command`
    /// part. The order and spelling are stable: they are part of the pod
    /// template, and a change would roll every pod.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--workers={}", self.workers),
            format!("--rounding={}", self.rounding.as_str()),
            format!("--port={}", self.port),
            format!("--port-mode={}", self.port_mode.as_str()),
            format!("--protocol={}", self.protocol.as_str()),
            format!("--admin-port={}", self.admin_port),
        ];
        args.extend(self.min_workers.map(|n| format!("--min-workers={n}")));
        args.extend(self.max_workers.map(|n| format!("--max-workers={n}")));
        args.extend(self.routes.iter().map(RouteSpec::to_arg));

        args.push(format!("--health-check={}", self.health_check.as_str()));
        if self.health_check == HealthCheck::Http {
            args.push(format!("--health-path={}", self.health_path));
        }
        args.extend([
            format!("--health-period={}", seconds(self.health_period)),
            format!("--health-timeout={}", seconds(self.health_timeout)),
            format!("--health-failure-threshold={}", self.health_failure_threshold),
            format!("--hung-after={}", seconds(self.hung_after)),
            format!("--initial-backoff={}", millis(self.initial_backoff)),
            format!("--max-backoff={}", millis(self.max_backoff)),
            format!("--stable-after={}", seconds(self.stable_after)),
            format!("--crash-loop-threshold={}", self.crash_loop_threshold),
        ]);
        args.extend(self.max_requests.map(|n| format!("--max-requests={n}")));
        args.extend(self.max_memory_mib.map(|n| format!("--max-memory-mib={n}")));
        args.extend(self.max_concurrency.map(|n| format!("--max-concurrency={n}")));
        args.extend(self.max_queue.map(|n| format!("--max-queue={n}")));
        args.extend(self.queue_timeout.map(|d| format!("--queue-timeout={}", seconds(d))));
        args.extend(self.sticky.as_ref().map(Sticky::to_arg));
        if self.upstream_protocol != UpstreamProtocol::default() {
            args.push(format!("--upstream-protocol={}", self.upstream_protocol.as_str()));
        }

        args.push(format!("--drain-timeout={}", seconds(self.drain_timeout)));
        args.push(format!("--log-format={}", self.log_format.as_str()));
        args
    }
}

/// `30s`, or `1500ms` when not whole seconds (flags carry milliseconds).
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { millis(d) }
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_count_parses_and_prints() {
        assert_eq!("auto".parse::<WorkerCount>(), Ok(WorkerCount::Auto));
        assert_eq!("max".parse::<WorkerCount>(), Ok(WorkerCount::Auto));
        assert_eq!("3".parse::<WorkerCount>(), Ok(WorkerCount::Fixed(3)));
        assert!("0".parse::<WorkerCount>().is_err());
        assert!("lots".parse::<WorkerCount>().is_err());
        assert_eq!(WorkerCount::Auto.to_string(), "auto");
        assert_eq!(WorkerCount::Fixed(4).to_string(), "4");
    }

    #[test]
    fn routes_parse_and_print() {
        let prefix = RouteSpec::parse_prefix("/report=2").expect("prefix");
        assert_eq!(prefix, RouteSpec { matcher: RouteMatch::Prefix("/report".into()), workers: 2 });
        assert_eq!(prefix.pool_name(), "/report");
        assert_eq!(prefix.to_arg(), "--route=/report=2");
        let exact = RouteSpec::parse_exact("/=1").expect("exact");
        assert_eq!(exact, RouteSpec { matcher: RouteMatch::Exact("/".into()), workers: 1 });
        assert_eq!(exact.pool_name(), "=/");
        assert_eq!(exact.to_arg(), "--route-exact=/=1");
        // The first `=` splits; the CRD allows no `=` or white space in a path.
        assert!(RouteSpec::parse_prefix("/a=1=2").is_err());
        assert!(RouteSpec::parse_prefix("/a b=1").is_err());
        assert!(RouteSpec::parse_prefix("report=2").is_err());
        assert!(RouteSpec::parse_prefix("/a=0").is_err());
        assert!(RouteSpec::parse_exact("/a").is_err());
    }

    #[test]
    fn sticky_parses_and_prints() {
        assert_eq!("cookie".parse(), Ok(Sticky::Cookie("clusterd-worker".into())));
        assert_eq!("cookie=sid".parse(), Ok(Sticky::Cookie("sid".into())));
        assert_eq!("header=X-Session".parse(), Ok(Sticky::Header("x-session".into())));
        assert_eq!(Sticky::Header("x-session".into()).to_arg(), "--sticky=header=x-session");
        for bad in ["header", "cookie=", "cookie=a b", "ip", "header=a;b"] {
            assert!(bad.parse::<Sticky>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_keep_their_unit() {
        assert_eq!(seconds(Duration::from_secs(30)), "30s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1500ms");
        assert_eq!(millis(Duration::from_secs(15)), "15000ms");
    }

    #[test]
    fn defaults_are_rendered_explicitly() {
        let args = ClusterdArgs::default().to_args();
        assert_eq!(
            args,
            [
                "--workers=auto",
                "--rounding=floor",
                "--port=8080",
                "--port-mode=auto",
                "--protocol=http",
                "--admin-port=9901",
                "--health-check=http",
                "--health-path=/",
                "--health-period=5s",
                "--health-timeout=2s",
                "--health-failure-threshold=3",
                "--hung-after=30s",
                "--initial-backoff=100ms",
                "--max-backoff=15000ms",
                "--stable-after=30s",
                "--crash-loop-threshold=5",
                "--drain-timeout=25s",
                "--log-format=text",
            ]
        );
    }

    #[test]
    fn optional_flags_appear_when_set() {
        let args = ClusterdArgs {
            min_workers: Some(2),
            max_workers: Some(6),
            routes: vec![
                RouteSpec { matcher: RouteMatch::Prefix("/report".into()), workers: 2 },
                RouteSpec { matcher: RouteMatch::Exact("/".into()), workers: 1 },
            ],
            health_check: HealthCheck::Tcp,
            max_requests: Some(1000),
            max_memory_mib: Some(300),
            max_concurrency: Some(4),
            max_queue: Some(20),
            queue_timeout: Some(Duration::from_secs(3)),
            sticky: Some(Sticky::Cookie("sid".into())),
            upstream_protocol: UpstreamProtocol::H2c,
            ..ClusterdArgs::default()
        }
        .to_args();
        for expected in [
            "--min-workers=2",
            "--max-workers=6",
            "--route=/report=2",
            "--route-exact=/=1",
            "--health-check=tcp",
            "--max-requests=1000",
            "--max-memory-mib=300",
            "--max-concurrency=4",
            "--max-queue=20",
            "--queue-timeout=3s",
            "--sticky=cookie=sid",
            "--upstream-protocol=h2c",
        ] {
            assert!(args.iter().any(|a| a == expected), "missing {expected} in {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--health-path")), "only HTTP checks have a path");
    }

    #[test]
    fn every_enum_value_has_its_own_spelling() {
        fn distinct(values: &[&str]) -> bool {
            values.iter().enumerate().all(|(i, v)| !values[..i].contains(v))
        }
        assert!(distinct(&Rounding::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()));
        assert!(distinct(&PortMode::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()));
        assert!(distinct(&Protocol::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()));
        assert!(distinct(&HealthCheck::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()));
        assert!(distinct(&UpstreamProtocol::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()));
        assert!(distinct(&LogFormat::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>()));
    }
}
