//! The fleet benchmark (`benches/fleet`; docs/benchmarks.md, "Fleet"):
//! the operator's release binary against `FLEET_SERVICES` ClusteredServices
//! of 3 pods each on kwok's simulated nodes, every pod's clusterd answered
//! by the fleet simulator in this process. Measures, settled and while the
//! fleet churns: the operator's RSS and CPU, API requests per second by
//! verb (the API server's own counts), status writes per ClusteredService
//! per minute, clusterd probes and words per second, reconciles in flight; during
//! churn, how long a worker crash takes to reach the ClusteredService's
//! status and a spec change to reach the Deployment; then the cold start:
//! the operator restarted while every pod's status changed, until every
//! ClusteredService shows it.
//!
//! Writes a Markdown report to `FLEET_REPORT` (default: stdout). Settings
//! from the environment: `FLEET_SERVICES` (1000), `FLEET_SETTLED_SECONDS`
//! (120), `FLEET_CHURN_SECONDS` (120), `FLEET_CRASHES_PER_SECOND` (2),
//! `FLEET_SPEC_CHANGES_PER_SECOND` (0.5), `FLEET_OPERATOR_ARGS` (added to
//! the operator's command line, space-separated).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::{ClusteredService, WorkerState};
use clustered_e2e::fleet::{ApiRequests, Nodes, OperatorProcess, Simulator, service};
use clustered_e2e::{Cluster, wait_for};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

const PODS: i32 = 3;
const WORKERS: u32 = 2;
/// The annotation a spec change sets on the pod template.
const REVISION: &str = "fleet.clustered.dev/revision";
/// A crashed worker runs again after this long, or once the status showed it.
const CRASH_HOLD: Duration = Duration::from_secs(30);
/// A silenced pod answers again after this long.
const SILENCE_HOLD: Duration = Duration::from_secs(20);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let services: usize = env("FLEET_SERVICES", 1000);
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("fleet-bench").await?;
    let sim = Arc::new(Simulator::start(0, WORKERS).await?);
    let nodes = Nodes::add(&cluster, "fleet-bench", services * PODS as usize).await?;
    let result = run(&cluster, &ns, &sim, services).await;
    eprintln!("fleet: cleaning up (namespace {ns}, simulated nodes)");
    let cleaned = cluster.delete_namespace(&ns).await;
    nodes.remove().await?;
    cleaned?;
    let report = result?;
    match std::env::var("FLEET_REPORT") {
        Ok(path) => std::fs::write(path, report)?,
        Err(_) => print!("{report}"),
    }
    Ok(())
}

/// Figures of one window.
#[derive(Default)]
struct Window {
    seconds: f64,
    rss_mib: f64,
    max_rss_mib: f64,
    cores: f64,
    writes_per_service_minute: f64,
    probes_per_second: f64,
    /// Words from the pods that their status changed.
    words_per_second: f64,
    api: BTreeMap<String, f64>,
    csvc_api: BTreeMap<String, f64>,
    in_flight_mean: f64,
    in_flight_max: f64,
}

async fn run(cluster: &Cluster, ns: &str, sim: &Arc<Simulator>, services: usize) -> anyhow::Result<String> {
    let args: Vec<String> =
        std::env::var("FLEET_OPERATOR_ARGS").unwrap_or_default().split_whitespace().map(String::from).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = cluster.client.clone();
    let csvcs: Api<ClusteredService> = Api::namespaced(client.clone(), ns);

    let operator = OperatorProcess::start(cluster, ns, &args).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_mib = operator.rss_kib()? as f64 / 1024.0;

    eprintln!("fleet: creating {services} ClusteredServices");
    let created = Instant::now();
    stream::iter(0..services)
        .map(|i| {
            let csvcs = csvcs.clone();
            async move {
                csvcs.create(&PostParams::default(), &service(&format!("svc-{i}"), PODS, WORKERS, sim.port)).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let first = converge(&csvcs, services, 0, Duration::from_secs(3600)).await?;
    let first_convergence = created.elapsed();
    eprintln!("fleet: converged from scratch in {first_convergence:?} ({first} settled)");
    tokio::time::sleep(Duration::from_secs(15)).await;

    let settled_seconds: u64 = env("FLEET_SETTLED_SECONDS", 120);
    eprintln!("fleet: settled window, {settled_seconds} s");
    let settled = window(&client, &operator, sim, services, Duration::from_secs(settled_seconds)).await?;

    let churn_seconds: u64 = env("FLEET_CHURN_SECONDS", 120);
    eprintln!("fleet: churn window, {churn_seconds} s");
    let (churn, latencies) = churn(&client, ns, &operator, sim, services, Duration::from_secs(churn_seconds)).await?;

    // Cold start: every pod's status changes while the operator is down.
    // The churn's last crashes and spec changes are reported first: once
    // the operator is stopped, nothing converges.
    eprintln!("fleet: cold start");
    converge(&csvcs, services, 0, Duration::from_secs(600)).await?;
    operator.stop().await?;
    sim.restart_all(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let operator = OperatorProcess::start(cluster, ns, &args).await?;
    converge(&csvcs, services, 1, Duration::from_secs(3600)).await?;
    let cold = started.elapsed();
    let cold_rss = operator.rss_kib()? as f64 / 1024.0;
    operator.stop().await?;

    Ok(report(services, idle_mib, first_convergence, cold, cold_rss, &settled, &churn, &latencies))
}

/// Waits until every ClusteredService's status describes its spec with all
/// pods and workers ready, and every worker's restarts at least `restarts`.
async fn converge(
    csvcs: &Api<ClusteredService>,
    services: usize,
    restarts: i32,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let want = format!("{PODS}/{PODS}/{}/{}", PODS as u32 * WORKERS, PODS as u32 * WORKERS);
    let last = std::cell::Cell::new(0);
    wait_for(timeout, "every ClusteredService converged", || {
        let (want, last) = (want.clone(), &last);
        async move {
            let list = csvcs.list(&ListParams::default()).await?;
            let done = list
                .items
                .iter()
                .filter(|c| {
                    c.status.as_ref().is_some_and(|s| {
                        s.observed_generation == c.metadata.generation
                            && format!("{}/{}", s.summary.pods, s.summary.workers) == want
                            && s.instances.iter().flat_map(|i| &i.workers).all(|w| w.restarts >= restarts)
                    })
                })
                .count();
            if done != last.get() {
                eprintln!("fleet: {done}/{services} converged");
                last.set(done);
            }
            Ok(done == services)
        }
    })
    .await?;
    Ok(last.get())
}

/// The API server's resources the fleet and the operator use.
const FLEET_RESOURCES: &[&str] = &[
    "clusteredservices",
    "deployments",
    "replicasets",
    "pods",
    "services",
    "poddisruptionbudgets",
    "horizontalpodautoscalers",
    "events",
    "endpointslices",
    "leases",
    "nodes",
];

/// Measures a window of `length` while whatever else runs goes on.
async fn window(
    client: &Client,
    operator: &OperatorProcess,
    sim: &Simulator,
    services: usize,
    length: Duration,
) -> anyhow::Result<Window> {
    let api0 = ApiRequests::read(client, FLEET_RESOURCES).await?;
    let csvc0 = ApiRequests::read(client, &["clusteredservices"]).await?;
    let writes0 = operator.metric("clustered_operator_status_writes_total").await?;
    let (probes0, words0, cpu0, started) = (sim.requests(), sim.words(), operator.cpu_seconds()?, Instant::now());
    let (mut in_flight, mut max_rss) = (Vec::new(), 0.0f64);
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(2)).await;
        in_flight.push(operator.metric("clustered_operator_reconciles_in_flight").await.unwrap_or(0.0));
        max_rss = max_rss.max(operator.rss_kib()? as f64 / 1024.0);
    }
    let seconds = started.elapsed().as_secs_f64();
    let writes = operator.metric("clustered_operator_status_writes_total").await? - writes0;
    Ok(Window {
        seconds,
        rss_mib: operator.rss_kib()? as f64 / 1024.0,
        max_rss_mib: max_rss,
        cores: (operator.cpu_seconds()? - cpu0) / seconds,
        writes_per_service_minute: writes / services as f64 / (seconds / 60.0),
        probes_per_second: (sim.requests() - probes0) as f64 / seconds,
        words_per_second: (sim.words() - words0) as f64 / seconds,
        api: ApiRequests::read(client, FLEET_RESOURCES).await?.rates_since(&api0, seconds),
        csvc_api: ApiRequests::read(client, &["clusteredservices"]).await?.rates_since(&csvc0, seconds),
        in_flight_mean: in_flight.iter().sum::<f64>() / in_flight.len().max(1) as f64,
        in_flight_max: in_flight.iter().copied().fold(0.0, f64::max),
    })
}

/// What the churn measured.
#[derive(Default)]
struct Latencies {
    crashes: usize,
    /// Crash → the ClusteredService's status shows it, seconds.
    freshness: Vec<f64>,
    spec_changes: usize,
    /// Spec change → the Deployment carries it, seconds.
    spec_to_deployment: Vec<f64>,
}

/// A small deterministic generator: the script is the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

type Pending = Arc<Mutex<HashMap<String, Vec<(String, u32, Instant)>>>>;

/// A churn window: workers crash (and run again), pods go silent for a
/// while, in-flight counts move, and spec changes are applied, while the
/// status and the Deployments are watched for them.
async fn churn(
    client: &Client,
    ns: &str,
    operator: &OperatorProcess,
    sim: &Arc<Simulator>,
    services: usize,
    length: Duration,
) -> anyhow::Result<(Window, Latencies)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // Pod address → (ClusteredService, pod).
    let addresses: Vec<(IpAddr, String, String)> = pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
            let owner = p.labels().get("clustered.dev/service")?.clone();
            Some((ip, owner, p.name_any()))
        })
        .collect();
    anyhow::ensure!(!addresses.is_empty(), "no pod has an address");
    let crashes: Pending = Arc::default();
    let changes: Arc<Mutex<HashMap<String, (u64, Instant)>>> = Arc::default();
    let latencies = Arc::new(Mutex::new(Latencies::default()));

    // Watchers: the ClusteredServices' status, the Deployments' template.
    let csvc_watch = {
        let (crashes, latencies) = (Arc::clone(&crashes), Arc::clone(&latencies));
        let api: Api<ClusteredService> = Api::namespaced(client.clone(), ns);
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(csvc)) = events.next().await {
                let mut crashes = crashes.lock().unwrap_or_else(|p| p.into_inner());
                let Some(waiting) = crashes.get_mut(&csvc.name_any()) else { continue };
                let instances = csvc.status.as_ref().map(|s| s.instances.as_slice()).unwrap_or_default();
                waiting.retain(|(pod, id, at)| {
                    let seen = instances.iter().any(|i| {
                        i.pod == *pod
                            && i.workers.iter().any(|w| w.id as u32 == *id && w.state == WorkerState::CrashLoop)
                    });
                    if seen {
                        latencies.lock().unwrap_or_else(|p| p.into_inner()).freshness.push(at.elapsed().as_secs_f64());
                    }
                    !seen
                });
            }
        })
    };
    let deployment_watch = {
        let (changes, latencies) = (Arc::clone(&changes), Arc::clone(&latencies));
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(deployment)) = events.next().await {
                let revision = deployment.spec.as_ref().and_then(|s| {
                    s.template.metadata.as_ref()?.annotations.as_ref()?.get(REVISION)?.parse::<u64>().ok()
                });
                let mut changes = changes.lock().unwrap_or_else(|p| p.into_inner());
                if let (Some(revision), Some(&(wanted, at))) = (revision, changes.get(&deployment.name_any()))
                    && revision >= wanted
                {
                    latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .spec_to_deployment
                        .push(at.elapsed().as_secs_f64());
                    changes.remove(&deployment.name_any());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    let script = {
        let (crashes, changes, latencies, sim) =
            (Arc::clone(&crashes), Arc::clone(&changes), Arc::clone(&latencies), Arc::clone(sim));
        let csvcs: Api<ClusteredService> = Api::namespaced(client.clone(), ns);
        let crash_every = Duration::from_secs_f64(1.0 / env("FLEET_CRASHES_PER_SECOND", 2.0f64));
        let change_every = Duration::from_secs_f64(1.0 / env("FLEET_SPEC_CHANGES_PER_SECOND", 0.5f64));
        tokio::spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut recoveries: Vec<(Instant, IpAddr, u32)> = Vec::new();
            let mut silenced: Vec<(Instant, IpAddr)> = Vec::new();
            let (mut next_crash, mut next_change, mut next_silence) = (Instant::now(), Instant::now(), Instant::now());
            let mut revision = 0u64;
            let now_text = || k8s_openapi::jiff::Timestamp::now().to_string();
            loop {
                let now = Instant::now();
                if now >= next_crash {
                    next_crash += crash_every;
                    let (ip, owner, pod) = &addresses[rng.below(addresses.len())];
                    let id = rng.below(WORKERS as usize) as u32;
                    let mut crashes = crashes.lock().unwrap_or_else(|p| p.into_inner());
                    let waiting = crashes.entry(owner.clone()).or_default();
                    if !waiting.iter().any(|(p, _, _)| p == pod) && !recoveries.iter().any(|(_, i, _)| i == ip) {
                        sim.crash(*ip, id, &now_text());
                        waiting.push((pod.clone(), id, now));
                        latencies.lock().unwrap_or_else(|p| p.into_inner()).crashes += 1;
                        recoveries.push((now + CRASH_HOLD, *ip, id));
                    }
                    // Load moves on another pod.
                    let (ip, _, _) = &addresses[rng.below(addresses.len())];
                    sim.load(*ip, rng.below(WORKERS as usize) as u32, rng.below(8) as u64);
                }
                if now >= next_silence {
                    next_silence += Duration::from_secs(5);
                    let (ip, _, _) = &addresses[rng.below(addresses.len())];
                    sim.silence(*ip, true);
                    silenced.push((now + SILENCE_HOLD, *ip));
                }
                if now >= next_change {
                    next_change += change_every;
                    revision += 1;
                    let name = format!("svc-{}", rng.below(services));
                    let patch = serde_json::json!({
                        "spec": { "template": { "metadata": { "annotations": { REVISION: revision.to_string() } } } }
                    });
                    changes.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), (revision, Instant::now()));
                    latencies.lock().unwrap_or_else(|p| p.into_inner()).spec_changes += 1;
                    if let Err(e) = csvcs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                        eprintln!("fleet: spec change of {name} failed: {e}");
                    }
                }
                recoveries.retain(|(at, ip, id)| {
                    let due = *at <= now;
                    if due {
                        sim.recover(*ip, *id, &now_text());
                    }
                    !due
                });
                silenced.retain(|(at, ip)| {
                    let due = *at <= now;
                    if due {
                        sim.silence(*ip, false);
                    }
                    !due
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let measured = window(client, operator, sim, services, length).await;
    script.abort();
    // Late arrivals of the window's last crashes still count.
    tokio::time::sleep(Duration::from_secs(10)).await;
    csvc_watch.abort();
    deployment_watch.abort();
    // Everything crashed or silenced runs and answers again.
    sim.heal_all(&k8s_openapi::jiff::Timestamp::now().to_string());
    let latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((measured?, latencies))
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank).copied()
}

#[allow(clippy::too_many_arguments)]
fn report(
    services: usize,
    idle_mib: f64,
    first: Duration,
    cold: Duration,
    cold_rss: f64,
    settled: &Window,
    churn: &Window,
    latencies: &Latencies,
) -> String {
    let secs = |v: Option<f64>| v.map_or("n/a".to_string(), |s| format!("{s:.2} s"));
    let rates = |m: &BTreeMap<String, f64>| {
        m.iter().filter(|(_, r)| **r >= 0.05).map(|(v, r)| format!("{v} {r:.1}")).collect::<Vec<_>>().join(", ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "#### {services} ClusteredServices × {PODS} pods ({} pods)\n", services * PODS as usize);
    let _ = writeln!(out, "| figure | settled | churn |");
    let _ = writeln!(out, "|---|---|---|");
    let row = |out: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(out, "| {name} | {a} | {b} |");
    };
    row(&mut out, "window", format!("{:.0} s", settled.seconds), format!("{:.0} s", churn.seconds));
    row(
        &mut out,
        "operator RSS (idle before the fleet: {idle:.0} MiB)".replace("{idle:.0}", &format!("{idle_mib:.0}")).as_str(),
        format!(
            "{:.0} MiB ({:.0} KiB per ClusteredService)",
            settled.rss_mib,
            (settled.rss_mib - idle_mib) * 1024.0 / services as f64
        ),
        format!("{:.0} MiB (max {:.0})", churn.rss_mib, churn.max_rss_mib),
    );
    row(&mut out, "operator CPU", format!("{:.3} cores", settled.cores), format!("{:.3} cores", churn.cores));
    row(
        &mut out,
        "status writes per ClusteredService per minute",
        format!("{:.3}", settled.writes_per_service_minute),
        format!("{:.3}", churn.writes_per_service_minute),
    );
    row(
        &mut out,
        "clusterd probes per second",
        format!("{:.0}", settled.probes_per_second),
        format!("{:.0}", churn.probes_per_second),
    );
    row(
        &mut out,
        "words from clusterd that its status changed, per second",
        format!("{:.1}", settled.words_per_second),
        format!("{:.1}", churn.words_per_second),
    );
    row(
        &mut out,
        "reconciles in flight (mean / max)",
        format!("{:.1} / {:.0}", settled.in_flight_mean, settled.in_flight_max),
        format!("{:.1} / {:.0}", churn.in_flight_mean, churn.in_flight_max),
    );
    row(&mut out, "API requests/s on ClusteredServices, by verb", rates(&settled.csvc_api), rates(&churn.csvc_api));
    row(&mut out, "API requests/s, all fleet resources, by verb", rates(&settled.api), rates(&churn.api));
    let _ = writeln!(out);
    let _ = writeln!(out, "| figure | value |");
    let _ = writeln!(out, "|---|---|");
    let _ = writeln!(
        out,
        "| status freshness, worker crash → ClusteredService status, p50 / p99 ({} of {} crashes seen) | {} / {} |",
        latencies.freshness.len(),
        latencies.crashes,
        secs(percentile(&latencies.freshness, 50.0)),
        secs(percentile(&latencies.freshness, 99.0)),
    );
    let _ = writeln!(
        out,
        "| spec change → Deployment during churn, p50 / p99 ({} of {} seen) | {} / {} |",
        latencies.spec_to_deployment.len(),
        latencies.spec_changes,
        secs(percentile(&latencies.spec_to_deployment, 50.0)),
        secs(percentile(&latencies.spec_to_deployment, 99.0)),
    );
    let _ = writeln!(
        out,
        "| from nothing: ClusteredServices created → all converged (Kubernetes creates the pods) | {:.0} s |",
        first.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| cold start: operator started, every pod's status changed → every ClusteredService shows it | {:.0} s (RSS then {cold_rss:.0} MiB) |",
        cold.as_secs_f64()
    );
    out
}
