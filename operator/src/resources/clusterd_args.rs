//! The spec, as clusterd's command line (see `sidecar/README.md`).

use clustered_api::v1alpha1::{
    ClusteredServiceSpec, HealthCheckKind, PortMode, Protocol, Rounding, RoutePool, WorkerCount,
};

/// clusterd's flags for `spec`, without the `-- command` part.
pub fn clusterd_args(spec: &ClusteredServiceSpec) -> Vec<String> {
    let mut args = vec![
        format!("--workers={}", spec.workers.count),
        format!("--rounding={}", rounding(spec.workers.rounding)),
        format!("--port={}", spec.port),
        format!("--port-mode={}", port_mode(spec.port_mode)),
        format!("--protocol={}", protocol(spec.protocol)),
        format!("--admin-port={}", spec.admin_port),
    ];
    if let WorkerCount::Auto = spec.workers.count {
        args.extend(spec.workers.min.map(|n| format!("--min-workers={n}")));
        args.extend(spec.workers.max.map(|n| format!("--max-workers={n}")));
    }
    args.extend(spec.routes.iter().map(route_flag));

    let health = &spec.health_check;
    match health.kind {
        HealthCheckKind::Http => {
            args.push("--health-check=http".into());
            args.push(format!("--health-path={}", health.path));
        }
        HealthCheckKind::Tcp => args.push("--health-check=tcp".into()),
    }
    args.extend([
        format!("--health-period={}s", health.period_seconds),
        format!("--health-timeout={}s", health.timeout_seconds),
        format!("--health-failure-threshold={}", health.failure_threshold),
        format!("--hung-after={}s", health.hung_after_seconds),
    ]);

    let restart = &spec.restart;
    args.extend([
        format!("--initial-backoff={}ms", restart.initial_backoff_millis),
        format!("--max-backoff={}ms", restart.max_backoff_millis),
        format!("--stable-after={}s", restart.stable_after_seconds),
        format!("--crash-loop-threshold={}", restart.crash_loop_threshold),
    ]);
    args.extend(restart.max_requests.map(|n| format!("--max-requests={n}")));
    args.extend(restart.max_memory_mib.map(|n| format!("--max-memory-mib={n}")));

    args.push(format!("--drain-timeout={}s", spec.shutdown.drain_timeout_seconds));
    args.push("--log-format=json".into());
    args
}

/// `--route=/report=2` for a prefix, `--route-exact=/=1` for an exact path.
fn route_flag(route: &RoutePool) -> String {
    match (&route.path, &route.path_prefix) {
        (Some(path), _) => format!("--route-exact={path}={}", route.workers),
        (None, Some(prefix)) => format!("--route={prefix}={}", route.workers),
        // Rejected by the CRD's CEL rule; treated as the whole site.
        (None, None) => format!("--route=/={}", route.workers),
    }
}

fn rounding(r: Rounding) -> &'static str {
    match r {
        Rounding::Floor => "floor",
        Rounding::Ceil => "ceil",
        Rounding::Round => "round",
    }
}

fn port_mode(m: PortMode) -> &'static str {
    match m {
        PortMode::Proxy => "proxy",
        PortMode::Inherit => "inherit",
        PortMode::Reuseport => "reuseport",
    }
}

fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Http => "http",
        Protocol::Tcp => "tcp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{APP, csvc};

    #[test]
    fn defaults_become_explicit_flags() {
        let args = clusterd_args(&csvc(APP).spec);
        for expected in [
            "--workers=auto",
            "--rounding=floor",
            "--port=8080",
            "--port-mode=proxy",
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
        ] {
            assert!(args.iter().any(|a| a == expected), "missing {expected} in {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--route")));
        assert!(!args.iter().any(|a| a.starts_with("--max-requests")));
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
        let args = clusterd_args(&spec);
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

    #[test]
    fn fixed_count_ignores_bounds() {
        let spec = csvc(&format!("  workers: {{count: 3}}\n{APP}")).spec;
        let args = clusterd_args(&spec);
        assert!(args.contains(&"--workers=3".to_string()));
        assert!(!args.iter().any(|a| a.starts_with("--min-workers") || a.starts_with("--max-workers")));
    }
}
