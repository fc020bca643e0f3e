use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use clustered_operator::{
    controller,
    image::registry::Resolver,
    leader::{self, Elector},
    metrics::Metrics,
    probe::Prober,
    resources::Settings,
    server, updates, watches,
};
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use tracing::{error, info};

/// Runs ClusteredServices: one Deployment of clusterd-managed workers each,
/// with status gathered from every pod's clusterd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Image with the clusterd binary, copied into every pod.
    #[arg(long, env = "CLUSTERD_IMAGE", default_value = "clustered.dev/clusterd:dev")]
    clusterd_image: String,
    /// Roll existing services onto a new `--clusterd-image` by themselves,
    /// a few at a time; when false, each takes it with its next spec change.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    automatic_clusterd_updates: bool,
    /// Services rolling onto a new clusterd at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    max_clusterd_rollouts: u16,
    /// Watch one namespace only (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics, and where each clusterd
    /// tells of its changes (`--status-notifications`).
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Seconds between two reads of a pod's clusterd status when nothing else
    /// happens, for a clusterd that does not tell the operator of changes.
    #[arg(long, default_value_t = 5)]
    status_interval_seconds: u64,
    /// Ask each clusterd to tell the operator (at the `--listen` port of the
    /// address it is asked from) when its status changes: a crash shows at
    /// once, and a settled pod is asked only every
    /// `--settled-status-interval-seconds`. Pods must reach that port.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    status_notifications: bool,
    /// Seconds between two reads of a clusterd that tells of its changes.
    #[arg(long, default_value_t = 60)]
    settled_status_interval_seconds: u64,
    /// Milliseconds a clusterd gets to answer.
    #[arg(long, default_value_t = 2000)]
    probe_timeout_ms: u64,
    /// ClusteredServices reconciled at once (the others wait their turn).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_reconciles: u16,
    /// Pods asked at once, over all ClusteredServices.
    #[arg(long, default_value_t = 64)]
    probe_concurrency: usize,
    /// Seconds a stopping pod waits for endpoints to drop it before clusterd drains.
    #[arg(long, default_value_t = 3)]
    pre_stop_delay_seconds: i64,
    /// Elect a leader on a Lease: of all operators sharing the Lease (every
    /// replica, and an old and a new pod during an upgrade) only one
    /// reconciles. `--leader-elect=false` only for a lone operator run by
    /// hand, never beside another.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "clustered-system")]
    lease_namespace: String,
    #[arg(long, default_value = "clustered-operator")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Registry (`host:port`) read over plain HTTP instead of HTTPS when an
    /// app container's image config is looked up (repeat, or comma-separate).
    #[arg(long, env = "PLAIN_HTTP_REGISTRIES", value_delimiter = ',')]
    plain_http_registry: Vec<String>,
    /// Seconds one image config lookup may take, all registry requests included.
    #[arg(long, default_value_t = 10)]
    registry_timeout_seconds: u64,
    /// `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: String,
}

/// Words of changed pods waiting for the controller; more are dropped (the
/// pods' next regular ask reads them).
const CHANGES_QUEUED: usize = 4096;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let kube_config = kube::Config::infer().await.context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let client = watches::client(kube_config.clone()).context("building the Kubernetes client")?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let watch_health = Arc::new(watches::WatchHealth::default());
    let live = Arc::new(AtomicBool::new(true));
    let ready = Arc::new(AtomicBool::new(false));
    let (changed, changes) = tokio::sync::mpsc::channel(CHANGES_QUEUED);
    let health = Arc::new(server::Health { ready: ready.clone(), live: live.clone(), changed });
    let server = tokio::spawn(server::serve(args.listen, Arc::new(registry), health.clone()));
    let watchdog = tokio::spawn(watches::watchdog(watch_health.clone(), kube_config, live));

    // One shutdown flag for the whole process: a SIGTERM that arrives while
    // this replica is still waiting for the lease must not be forgotten.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    };

    let identity = args.identity.clone().unwrap_or_else(|| format!("clustered-operator-{}", std::process::id()));
    let elector =
        args.leader_elect.then(|| Elector::new(client.clone(), &args.lease_namespace, &args.lease_name, &identity));
    if let Some(elector) = &elector {
        // A standby is fit for a rollout's traffic (of several replicas,
        // only one ever leads); the leader is ready once it reconciles.
        ready.store(true, Ordering::Relaxed);
        tokio::select! {
            biased;
            () = stopped() => return Ok(()),
            () = elector.acquire() => {}
        }
        ready.store(false, Ordering::Relaxed);
        metrics.leader.set(1);
    }

    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "clustered-operator".into(), instance: Some(identity) });
    let settings = Settings {
        clusterd_image: args.clusterd_image,
        pre_stop_delay_seconds: args.pre_stop_delay_seconds,
        clusterd_updates: updates::Policy {
            automatic: args.automatic_clusterd_updates,
            max_rolling: usize::from(args.max_clusterd_rollouts),
        },
    };
    let mut prober = Prober::new(args.probe_concurrency, Duration::from_millis(args.probe_timeout_ms));
    if args.status_notifications {
        prober = prober.telling(args.listen.port());
    }
    info!(namespace = ?args.namespace, "starting controller");

    let shutdown = async move {
        stopped().await;
        info!("shutting down");
    };
    let status_interval = Duration::from_secs(args.status_interval_seconds);
    let images = Arc::new(Resolver::new(args.plain_http_registry, Duration::from_secs(args.registry_timeout_seconds)));
    let config = controller::Config {
        images,
        namespace: args.namespace,
        settings,
        prober,
        recorder,
        metrics,
        status_interval,
        settled_status_interval: Duration::from_secs(args.settled_status_interval_seconds),
        changes,
        watches: watch_health,
        ready,
        concurrency: args.max_concurrent_reconciles,
    };
    let run = controller::run(client, config, shutdown);
    match &elector {
        Some(elector) => {
            if let Err(why) = leader::run_while_leading(elector, run).await {
                error!(%why, "lost leadership, stopping");
            }
        }
        None => run.await,
    }
    server.abort();
    watchdog.abort();
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" { builder.json().init() } else { builder.init() }
}
