//! The operator's command line for clusterd, parsed by clusterd itself: for
//! every valid fixture, the app container's command in the Deployment
//! becomes a clusterd `Config` with the settings the spec asked for. A
//! misspelt flag or value fails here instead of crash-looping pods in e2e.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use clusterd::config::{Config, HealthCheck, LogFormat, NodeCheck, RouteMatch, RouteSpec};
use clustered_api::clusterd::ClusterdArgs;
use clustered_api::v1alpha1::{AutoscalingMetric, ClusteredService, HealthCheckKind, PortMode, WorkerCount};
use clustered_operator::image::{ImageConfig, ResolvedImage};
use clustered_operator::resources::{CLUSTERD_BIN, Settings, clusterd_args, deployment_for};

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The valid fixtures and the example, as the API server stores them.
fn valid_specs() -> Vec<(PathBuf, ClusteredService)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path("crds/tests/fixtures/valid"))
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    files.push(repo_path("examples/clusteredservice.yaml"));
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("read fixture");
            let csvc = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            (file, csvc)
        })
        .collect()
}

/// clusterd's parsing and checks. `port_mode` is left as the flag says:
/// clusterd settles `auto` at start-up from the command it runs.
fn parse(command: &[String]) -> Result<Config, String> {
    let mut config = Config::try_parse_from(command).map_err(|e| e.to_string())?;
    let flag = config.port_mode;
    config.resolve_port_mode(|_| NodeCheck::Supported { version: "v22.0.0".into() })?;
    config.validate()?;
    config.port_mode = flag;
    Ok(config)
}

/// The part of clusterd's configuration the operator controls, routes in
/// pool-name order (clusterd keeps prefix and exact routes apart).
fn contract_part(c: &Config) -> ClusterdArgs {
    let mut routes = c.pools();
    routes.sort_by_key(RouteSpec::pool_name);
    ClusterdArgs {
        workers: c.workers,
        min_workers: c.min_workers,
        max_workers: c.max_workers,
        rounding: c.rounding,
        port: c.port,
        port_mode: c.port_mode,
        protocol: c.protocol,
        admin_port: c.admin_port,
        routes,
        health_check: c.health_check,
        health_path: c.health_path.clone(),
        health_period: c.health_period,
        health_timeout: c.health_timeout,
        health_failure_threshold: c.health_failure_threshold,
        hung_after: c.hung_after,
        initial_backoff: c.initial_backoff,
        max_backoff: c.max_backoff,
        stable_after: c.stable_after,
        crash_loop_threshold: c.crash_loop_threshold,
        max_requests: c.max_requests,
        max_memory_mib: c.max_memory_mib,
        max_concurrency: c.max_concurrency,
        max_queue: c.max_queue,
        queue_timeout: c.queue_timeout,
        sticky: c.sticky.clone(),
        upstream_protocol: c.upstream_protocol,
        drain_timeout: c.drain_timeout,
        log_format: c.log_format,
    }
}

fn seconds(n: i32) -> Duration {
    Duration::from_secs(n.try_into().expect("non-negative"))
}

fn millis(n: i32) -> Duration {
    Duration::from_millis(n.try_into().expect("non-negative"))
}

fn unsigned(n: i32) -> u32 {
    n.try_into().expect("non-negative")
}

#[test]
fn every_valid_spec_reaches_clusterd_as_asked() {
    for (file, csvc) in valid_specs() {
        let at = file.display();
        let spec = &csvc.spec;
        // A template without command runs its image's ENTRYPOINT/CMD: here a
        // config as the registry would give it (unused where command is set).
        let image = ResolvedImage {
            pinned: "example/app:1@sha256:0".into(),
            digest: "sha256:0".into(),
            config: ImageConfig {
                entrypoint: vec!["/usr/bin/node".into()],
                cmd: vec!["/app/server.js".into()],
                working_dir: None,
            },
        };
        let deployment =
            deployment_for(&csvc, &Settings::default(), Some(&image)).unwrap_or_else(|e| panic!("{at}: {e}"));
        let pod = deployment.spec.and_then(|d| d.template.spec).expect("pod spec");
        let app_name = spec.app_container_name().expect("app container");
        let app = pod.containers.iter().find(|c| c.name == app_name).expect("app container in the Deployment");
        let command = app.command.clone().expect("wrapped command");
        assert_eq!(command[0], CLUSTERD_BIN, "{at}");

        let c = parse(&command).unwrap_or_else(|e| panic!("{at}: clusterd rejects {command:?}: {e}"));

        // What the spec asked for, field by field, independently of the
        // operator's own mapping.
        let asked_app = spec.template.spec.as_ref().and_then(|p| p.containers.iter().find(|c| c.name == app_name));
        let asked_command = asked_app.and_then(|a| a.command.as_ref()).filter(|c| !c.is_empty());
        assert_eq!(&c.command, asked_command.unwrap_or(&image.config.entrypoint), "{at}: command");
        assert_eq!(c.workers, spec.workers.count, "{at}");
        // min/max bound `auto`; a fixed count is within them by the CRD's rules.
        let auto = spec.workers.count == WorkerCount::Auto;
        let bound = |b: Option<i32>| b.filter(|_| auto).map(unsigned);
        assert_eq!(c.min_workers, bound(spec.workers.min), "{at}");
        assert_eq!(c.max_workers, bound(spec.workers.max), "{at}");
        assert_eq!(c.rounding, spec.workers.rounding, "{at}");
        assert_eq!(i32::from(c.port), spec.port, "{at}");
        // Concurrency autoscaling needs the proxy's figures: `auto` is pinned.
        let concurrency = spec.autoscaling.as_ref().is_some_and(|a| a.metric == AutoscalingMetric::Concurrency);
        let asked_mode = if concurrency && spec.port_mode == PortMode::Auto { PortMode::Proxy } else { spec.port_mode };
        assert_eq!(c.port_mode, asked_mode, "{at}");
        assert_eq!(c.protocol, spec.protocol, "{at}");
        assert_eq!(i32::from(c.admin_port), spec.admin_port, "{at}");

        let mut asked_routes: Vec<RouteSpec> = spec
            .routes
            .iter()
            .map(|r| {
                let matcher = match (&r.path, &r.path_prefix) {
                    (Some(path), None) => RouteMatch::Exact(path.clone()),
                    (None, Some(prefix)) => RouteMatch::Prefix(prefix.clone()),
                    _ => panic!("{at}: a valid route has exactly one of path and pathPrefix"),
                };
                RouteSpec { matcher, workers: unsigned(r.workers) }
            })
            .collect();
        asked_routes.sort_by_key(RouteSpec::pool_name);
        assert_eq!(contract_part(&c).routes, asked_routes, "{at}: routes");

        let health = &spec.health_check;
        match health.kind {
            HealthCheckKind::Http => {
                assert_eq!(c.health_check, HealthCheck::Http, "{at}");
                assert_eq!(c.health_path, health.path, "{at}");
            }
            HealthCheckKind::Tcp => assert_eq!(c.health_check, HealthCheck::Tcp, "{at}"),
        }
        assert_eq!(c.health_period, seconds(health.period_seconds), "{at}");
        assert_eq!(c.health_timeout, seconds(health.timeout_seconds), "{at}");
        assert_eq!(c.health_failure_threshold, unsigned(health.failure_threshold), "{at}");
        assert_eq!(c.hung_after, seconds(health.hung_after_seconds), "{at}");

        let restart = &spec.restart;
        assert_eq!(c.initial_backoff, millis(restart.initial_backoff_millis), "{at}");
        assert_eq!(c.max_backoff, millis(restart.max_backoff_millis), "{at}");
        assert_eq!(c.stable_after, seconds(restart.stable_after_seconds), "{at}");
        assert_eq!(c.crash_loop_threshold, unsigned(restart.crash_loop_threshold), "{at}");
        assert_eq!(c.max_requests.map(|n| n as i64), restart.max_requests, "{at}");
        assert_eq!(c.max_memory_mib.map(|n| n as i64), restart.max_memory_mib, "{at}");
        assert_eq!(c.max_concurrency, spec.workers.max_concurrency.map(unsigned), "{at}");
        assert_eq!(c.max_queue, spec.workers.max_queue.map(unsigned), "{at}");
        assert_eq!(c.queue_timeout, spec.workers.queue_timeout_seconds.map(seconds), "{at}");
        assert_eq!(
            c.sticky.as_ref().map(ToString::to_string),
            spec.sticky
                .as_ref()
                .map(|s| { if s == "cookie" { "cookie=clusterd-worker".to_string() } else { s.clone() } }),
            "{at}"
        );
        assert_eq!(c.upstream_protocol, spec.upstream_protocol, "{at}");
        assert_eq!(c.drain_timeout, seconds(spec.shutdown.drain_timeout_seconds), "{at}");
        assert_eq!(c.log_format, LogFormat::Json, "{at}");

        // And every setting the operator sends arrives unchanged.
        let mut sent = clusterd_args(spec);
        sent.routes.sort_by_key(RouteSpec::pool_name);
        assert_eq!(contract_part(&c), sent, "{at}");
    }
}

/// The round trip above only proves the spellings the fixtures reach.
#[test]
fn the_fixtures_reach_every_value_the_crd_offers() {
    let sent: Vec<ClusterdArgs> = valid_specs().iter().map(|(_, csvc)| clusterd_args(&csvc.spec)).collect();
    let seen = |value: &dyn Fn(&ClusterdArgs) -> String| {
        let mut values: Vec<String> = sent.iter().map(value).collect();
        values.sort();
        values.dedup();
        values
    };
    assert_eq!(seen(&|a| a.port_mode.as_str().into()), ["auto", "inherit", "node", "proxy", "reuseport"]);
    assert_eq!(seen(&|a| a.protocol.as_str().into()), ["http", "tcp"]);
    assert_eq!(seen(&|a| a.health_check.as_str().into()), ["http", "tcp"]);
    assert_eq!(seen(&|a| a.rounding.as_str().into()), ["ceil", "floor", "round"]);
    assert_eq!(seen(&|a| (a.workers == WorkerCount::Auto).to_string()), ["false", "true"]);
}

/// A flag the operator leaves out means to clusterd what the contract's
/// default says, which is also the CRD's default.
#[test]
fn clusterd_without_flags_uses_the_contracts_defaults() {
    let c = parse(&["clusterd".into(), "--".into(), "app".into()]).expect("parse");
    assert_eq!(contract_part(&c), ClusterdArgs::default());
}
