//! The spec, as clusterd's command line (see `sidecar/README.md`).

use std::time::Duration;

use clustered_api::clusterd::{ClusterdArgs, LogFormat, RouteMatch, RouteSpec, defaults};
use clustered_api::v1alpha1::{AutoscalingMetric, ClusteredServiceSpec, PortMode, RoutePool, WorkerCount};

/// clusterd's settings for `spec`; `.to_args()` gives the flags, without
/// the `-- command` part.
///
/// The CRD's schema bounds every number, so the conversions below only
/// fall back (to 0, or the default port) for objects the API server would
/// have rejected.
pub fn clusterd_args(spec: &ClusteredServiceSpec) -> ClusterdArgs {
    let workers = &spec.workers;
    // min/max bound `auto`; a fixed count is already within them.
    let bounds = |bound: Option<i32>| match workers.count {
        WorkerCount::Auto => bound.map(count),
        WorkerCount::Fixed(_) => None,
    };
    let health = &spec.health_check;
    let restart = &spec.restart;
    ClusterdArgs {
        workers: workers.count,
        min_workers: bounds(workers.min),
        max_workers: bounds(workers.max),
        rounding: workers.rounding,
        port: port(spec.port, defaults::PORT),
        port_mode: port_mode(spec),
        protocol: spec.protocol,
        admin_port: port(spec.admin_port, defaults::ADMIN_PORT),
        routes: spec.routes.iter().map(route).collect(),
        health_check: health.kind.into(),
        health_path: health.path.clone(),
        health_period: seconds(health.period_seconds),
        health_timeout: seconds(health.timeout_seconds),
        health_failure_threshold: count(health.failure_threshold),
        hung_after: seconds(health.hung_after_seconds),
        initial_backoff: millis(restart.initial_backoff_millis),
        max_backoff: millis(restart.max_backoff_millis),
        stable_after: seconds(restart.stable_after_seconds),
        crash_loop_threshold: count(restart.crash_loop_threshold),
        max_requests: restart.max_requests.map(|n| u64::try_from(n).unwrap_or(0)),
        max_memory_mib: restart.max_memory_mib.map(|n| u64::try_from(n).unwrap_or(0)),
        max_concurrency: workers.max_concurrency.map(count),
        max_queue: workers.max_queue.map(count),
        queue_timeout: workers.queue_timeout_seconds.map(seconds),
        // The CRD's pattern admits only values that parse.
        sticky: spec.sticky.as_deref().and_then(|s| s.parse().ok()),
        upstream_protocol: spec.upstream_protocol,
        drain_timeout: seconds(spec.shutdown.drain_timeout_seconds),
        // The kubelet keeps the logs; JSON lines are what log shippers read.
        log_format: LogFormat::Json,
    }
}

/// The spec's port mode, except that concurrency autoscaling needs the
/// proxy's in-flight figures, which `auto` alone would not guarantee.
fn port_mode(spec: &ClusteredServiceSpec) -> PortMode {
    let concurrency = spec.autoscaling.as_ref().is_some_and(|a| a.metric == AutoscalingMetric::Concurrency);
    match spec.port_mode {
        PortMode::Auto if concurrency => PortMode::Proxy,
        mode => mode,
    }
}

fn route(route: &RoutePool) -> RouteSpec {
    let matcher = match (&route.path, &route.path_prefix) {
        (Some(path), _) => RouteMatch::Exact(path.clone()),
        (None, Some(prefix)) => RouteMatch::Prefix(prefix.clone()),
        // Rejected by the CRD's CEL rule; treated as the whole site.
        (None, None) => RouteMatch::Prefix("/".into()),
    };
    RouteSpec { matcher, workers: count(route.workers) }
}

fn port(port: i32, default: u16) -> u16 {
    u16::try_from(port).unwrap_or(default)
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn seconds(n: i32) -> Duration {
    Duration::from_secs(u64::try_from(n).unwrap_or(0))
}

fn millis(n: i32) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{APP, csvc};

    #[test]
    fn concurrency_autoscaling_pins_auto_to_the_proxy() {
        let mut csvc = csvc(APP);
        csvc.spec.autoscaling =
            Some(serde_json::from_value(serde_json::json!({"metric": "concurrency", "maxReplicas": 3})).expect("spec"));
        assert_eq!(clusterd_args(&csvc.spec).port_mode, PortMode::Proxy);
        csvc.spec.port_mode = PortMode::Inherit;
        assert_eq!(clusterd_args(&csvc.spec).port_mode, PortMode::Inherit, "admission refuses it; not changed here");
        csvc.spec.autoscaling = None;
        csvc.spec.port_mode = PortMode::Auto;
        assert_eq!(clusterd_args(&csvc.spec).port_mode, PortMode::Auto);
    }

    /// The exact flags and their order are part of the pod template: a
    /// change here rolls every pod of every ClusteredService.
    #[test]
    fn defaults_become_explicit_flags() {
        let args = clusterd_args(&csvc(APP).spec).to_args();
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
                "--log-format=json",
            ]
        );
    }

    #[test]
    fn every_field_reaches_clusterd() {
        let spec = csvc(&format!(
            "  port: 3000
  portMode: inherit
  protocol: TCP
  adminPort: 9100
  workers: {{count: auto, min: 2, max: 6, rounding: Ceil}}
  routes:
    - {{pathPrefix: /report, workers: 2}}
    - {{path: /, workers: 1}}
  healthCheck: {{type: TCP, periodSeconds: 3, timeoutSeconds: 1, failureThreshold: 2, hungAfterSeconds: 20}}
  restart: {{initialBackoffMillis: 200, maxBackoffMillis: 9000, stableAfterSeconds: 20, crashLoopThreshold: 4, maxRequests: 1000, maxMemoryMib: 300}}
  shutdown: {{drainTimeoutSeconds: 7}}
{APP}"
        ))
        .spec;
        let args = clusterd_args(&spec).to_args();
        for expected in [
            "--workers=auto",
            "--min-workers=2",
            "--max-workers=6",
            "--rounding=ceil",
            "--port=3000",
            "--port-mode=inherit",
            "--protocol=tcp",
            "--admin-port=9100",
            "--route=/report=2",
            "--route-exact=/=1",
            "--health-check=tcp",
            "--health-period=3s",
            "--health-timeout=1s",
            "--health-failure-threshold=2",
            "--hung-after=20s",
            "--initial-backoff=200ms",
            "--max-backoff=9000ms",
            "--stable-after=20s",
            "--crash-loop-threshold=4",
            "--max-requests=1000",
            "--max-memory-mib=300",
            "--drain-timeout=7s",
        ] {
            assert!(args.iter().any(|a| a == expected), "missing {expected} in {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--health-path")), "TCP checks have no path");
    }

    /// The flags clusterd 0.1.0 took, and the values it allowed where it
    /// listed them, from its `--help` (kept as a fixture).
    fn previous_clusterd_flags() -> std::collections::BTreeMap<String, Option<Vec<String>>> {
        let help = include_str!("../../tests/fixtures/clusterd-0.1.0-help.txt");
        let mut flags = std::collections::BTreeMap::new();
        let mut last: Option<String> = None;
        for line in help.lines() {
            let line = line.trim();
            if let Some(flag) = line.strip_prefix("--").and_then(|f| f.split([' ', '=']).next()) {
                flags.insert(flag.to_string(), None);
                last = Some(flag.to_string());
            }
            if let (Some(flag), Some((_, values))) = (&last, line.split_once("[possible values: ")) {
                let values = values.trim_end_matches(']').split(", ").map(str::to_string).collect();
                flags.insert(flag.clone(), Some(values));
            }
        }
        flags
    }

    /// An operator upgraded beside a pinned, older `clusterdImage` (or a
    /// rollback of the clusterd alone) renders flags for the previous
    /// clusterd: every setting it had must still come out in a form it takes.
    #[test]
    fn the_previous_clusterd_takes_every_flag_rendered_for_its_settings() {
        let flags = previous_clusterd_flags();
        assert!(flags.len() > 30 && flags["port-mode"].as_ref().is_some_and(|v| v.contains(&"node".into())));
        let specs = [
            "  port: 3000
  portMode: inherit
  protocol: TCP
  adminPort: 9100
  workers: {count: auto, min: 2, max: 6, rounding: Ceil}
  healthCheck: {type: TCP, periodSeconds: 3, timeoutSeconds: 1, failureThreshold: 2, hungAfterSeconds: 20}
  restart: {initialBackoffMillis: 200, maxBackoffMillis: 9000, stableAfterSeconds: 20, crashLoopThreshold: 4, maxRequests: 1000, maxMemoryMib: 300}
  shutdown: {drainTimeoutSeconds: 7}
",
            "  portMode: proxy
  upstreamProtocol: h2c
  sticky: cookie=SRV
  workers: {count: 4, maxConcurrency: 8, maxQueue: 50, queueTimeoutSeconds: 3}
  routes:
    - {pathPrefix: /report, workers: 2}
    - {path: /, workers: 1}
  healthCheck: {type: HTTP, path: /healthz}
",
            "  portMode: node\n  workers: {count: auto, rounding: Round}\n",
            "  portMode: reuseport\n  sticky: header=X-User\n  upstreamProtocol: auto\n",
        ];
        for spec in specs {
            let args = clusterd_args(&csvc(&format!("{spec}{APP}")).spec).to_args();
            for arg in &args {
                let (flag, value) = arg.trim_start_matches("--").split_once('=').expect("--flag=value");
                let allowed = flags.get(flag).unwrap_or_else(|| panic!("clusterd 0.1.0 has no --{flag} ({args:?})"));
                if let Some(allowed) = allowed {
                    assert!(
                        allowed.iter().any(|a| a == value),
                        "clusterd 0.1.0 takes --{flag} {allowed:?}, not {value}"
                    );
                }
            }
        }
    }

    #[test]
    fn numbers_the_schema_forbids_fall_back() {
        assert_eq!(port(70_000, 9901), 9901);
        assert_eq!(port(3000, 9901), 3000);
        assert_eq!(count(-1), 0);
        assert_eq!(seconds(-5), Duration::ZERO);
        assert_eq!(millis(250), Duration::from_millis(250));
    }

    #[test]
    fn fixed_count_ignores_bounds() {
        let spec = csvc(&format!("  workers: {{count: 3}}\n{APP}")).spec;
        let args = clusterd_args(&spec).to_args();
        assert!(args.contains(&"--workers=3".to_string()));
        assert!(!args.iter().any(|a| a.starts_with("--min-workers") || a.starts_with("--max-workers")));
    }
}
