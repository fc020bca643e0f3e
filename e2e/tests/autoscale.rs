//! Autoscaling on the real local cluster, driven by bounded load through
//! the ClusteredService's Service: on CPU (the HPA the operator creates,
//! fed by metrics-server) and on concurrency (the operator itself, from
//! the in-flight requests clusterd reports). Both must grow the pods
//! within the bounds under load and shrink back after it.
//!
//! The CRD is cluster-wide and other tests may install theirs while these
//! run: each test re-installs this build's CRD whenever the served one
//! lacks the autoscaling fields (which it would otherwise prune).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clustered_api::v1alpha1::{AutoscalingMetric, ClusteredService};
use clustered_e2e::{Cluster, Operator, app_container, demo_service, load, wait_for};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};

const POD_START: Duration = Duration::from_secs(180);

/// The demo app, one worker per pod, scaled by `autoscaling`.
fn demo(name: &str, autoscaling: serde_json::Value) -> ClusteredService {
    demo_service(name, |v| {
        v["spec"]["healthCheck"] = serde_json::json!({ "path": "/healthz", "periodSeconds": 1, "timeoutSeconds": 1 });
        v["spec"]["autoscaling"] = autoscaling;
        app_container(v)["resources"]["requests"]["cpu"] = "100m".into();
    })
}

/// The autoscaling fields this build's CRD serves.
const AUTOSCALING_FIELDS: &[&str] = &["scaleDownStabilizationSeconds", "observedConcurrencyPerWorker"];

async fn ensure_our_crd(cluster: &Cluster) -> anyhow::Result<()> {
    cluster.ensure_crd_serves(AUTOSCALING_FIELDS).await
}

/// What a scaling run saw.
#[derive(Debug, Default)]
struct Seen {
    max_replicas: i32,
}

/// Waits until `spec.replicas` satisfies `done`, recording the highest
/// count seen; keeps this build's CRD served meanwhile.
async fn watch_replicas(
    cluster: &Cluster,
    csvcs: &Api<ClusteredService>,
    name: &str,
    timeout: Duration,
    what: &str,
    seen: &mut Seen,
    done: impl Fn(i32) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        ensure_our_crd(cluster).await?;
        let csvc = csvcs.get(name).await?;
        let replicas = csvc.spec.replicas;
        seen.max_replicas = seen.max_replicas.max(replicas);
        if done(replicas) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {timeout:?} waiting for {what}: spec.replicas {replicas}, status.autoscaling {:?}",
                csvc.status.and_then(|s| s.autoscaling)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records the highest `spec.replicas` for `duration`.
async fn record_for(
    cluster: &Cluster,
    csvcs: &Api<ClusteredService>,
    name: &str,
    duration: Duration,
    seen: &mut Seen,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < until {
        ensure_our_crd(cluster).await?;
        seen.max_replicas = seen.max_replicas.max(csvcs.get(name).await?.spec.replicas);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Starts bounded load on `path` through the Service's ClusterIP (from
/// this host). Returns the flag that stops it and the task.
async fn start_load(
    services: &Api<Service>,
    name: &str,
    path: &str,
    clients: usize,
) -> anyhow::Result<(Arc<AtomicBool>, tokio::task::JoinHandle<load::Report>)> {
    let ip = services.get(name).await?.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    let base = format!("http://{ip}:8080");
    wait_for(Duration::from_secs(60), "the Service answers", || async {
        Ok(load::get(&load::client(), &format!("{base}/light")).await.is_ok())
    })
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let url = format!("{base}{path}");
    // Bounded: at most 20 000 requests and 5 minutes, whatever the test does.
    let task = tokio::spawn(async move { load::run(&url, clients, 20_000, Duration::from_secs(300), flag).await });
    Ok((stop, task))
}

async fn reasons_of_events(cluster: &Cluster, ns: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), ns);
    let list = events.list(&ListParams::default().fields(&format!("regarding.name={name}"))).await?;
    Ok(list.items.into_iter().filter_map(|e| Some(format!("{}: {}", e.reason?, e.note.unwrap_or_default()))).collect())
}

#[tokio::test]
async fn cpu_autoscaling_grows_under_load_and_shrinks_after() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("autoscale-cpu").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(cluster.client.clone(), &ns);

    ensure_our_crd(&cluster).await?;
    // Low CPU target: one busy worker (1 CPU against 100m requested) is far above it.
    let autoscaling = serde_json::json!({ "minReplicas": 1, "maxReplicas": 3,
        "targetCpuUtilizationPercentage": 30, "scaleDownStabilizationSeconds": 10 });
    let created = csvcs.create(&PostParams::default(), &demo("cpu", autoscaling)).await?;
    let stored = created.spec.autoscaling.expect("autoscaling kept");
    assert_eq!((stored.metric, stored.scale_down_stabilization_seconds), (AutoscalingMetric::Cpu, Some(10)));
    wait_for(POD_START, "the pod ready", || async {
        Ok(csvcs.get("cpu").await?.status.is_some_and(|s| s.ready_replicas == 1))
    })
    .await?;
    // The CR's stabilisation is in the HPA's behavior.
    let hpa = hpas.get("cpu").await?.spec.expect("hpa spec");
    let down = hpa.behavior.and_then(|b| b.scale_down).expect("scaleDown behavior");
    assert_eq!(down.stabilization_window_seconds, Some(10));

    let load_started = tokio::time::Instant::now();
    let (stop, load) = start_load(&services, "cpu", "/?ms=50", 3).await?;
    let mut seen = Seen::default();
    // metrics-server scrapes every 15 s and the HPA syncs every 15 s.
    let grown =
        watch_replicas(&cluster, &csvcs, "cpu", Duration::from_secs(180), "a scale-up", &mut seen, |r| r >= 2).await;
    let grown_after = load_started.elapsed();
    // Under load a while longer: the count must stay within maxReplicas.
    let kept = record_for(&cluster, &csvcs, "cpu", Duration::from_secs(30), &mut seen).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await?;
    let load_stopped = tokio::time::Instant::now();
    grown?;
    kept?;
    eprintln!("scaled up {grown_after:?} after the load started; {report:?}");
    assert!(seen.max_replicas <= 3, "above maxReplicas: {seen:?}");
    assert!(report.ok > 0, "{report:?}");
    let status = csvcs.get("cpu").await?.status.and_then(|s| s.autoscaling).expect("status.autoscaling");
    assert_eq!(status.metric, AutoscalingMetric::Cpu);
    assert!(status.desired_replicas >= 2, "{status:?}");
    let wide = cluster.kubectl(&["-n", &ns, "get", "csvc", "cpu", "-o", "wide"])?;
    assert!(wide.lines().next().is_some_and(|h| h.contains("DESIRED")), "{wide}");

    // Idle: back to one pod once the HPA has seen low CPU for the 10 s window.
    watch_replicas(&cluster, &csvcs, "cpu", Duration::from_secs(240), "the scale-down to 1", &mut seen, |r| r == 1)
        .await?;
    eprintln!("back to 1 pod {:?} after the load stopped", load_stopped.elapsed());
    assert!(seen.max_replicas <= 3, "above maxReplicas: {seen:?}");

    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}

#[tokio::test]
async fn concurrency_autoscaling_grows_under_load_and_shrinks_after() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("autoscale-conc").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(cluster.client.clone(), &ns);

    ensure_our_crd(&cluster).await?;
    let autoscaling = serde_json::json!({ "minReplicas": 1, "maxReplicas": 3, "metric": "concurrency",
        "targetPerWorker": 0.5, "scaleDownStabilizationSeconds": 10 });
    let created = csvcs.create(&PostParams::default(), &demo("conc", autoscaling)).await?;
    assert_eq!(created.spec.autoscaling.expect("autoscaling kept").metric, AutoscalingMetric::Concurrency);
    wait_for(POD_START, "the pod ready and sampled", || async {
        let status = csvcs.get("conc").await?.status.unwrap_or_default();
        Ok(status.ready_replicas == 1
            && status.autoscaling.is_some_and(|a| a.observed_concurrency_per_worker.is_some()))
    })
    .await?;
    assert!(hpas.get_opt("conc").await?.is_none(), "no HPA in concurrency mode");

    // Slow requests (300 ms of CPU each) from 4 clients: about 4 in flight
    // on one worker, eight times the 0.5 target.
    let load_started = tokio::time::Instant::now();
    let (stop, load) = start_load(&services, "conc", "/?ms=300", 4).await?;
    let mut seen = Seen::default();
    let grown =
        watch_replicas(&cluster, &csvcs, "conc", Duration::from_secs(90), "a scale-up", &mut seen, |r| r >= 2).await;
    let grown_after = load_started.elapsed();
    let kept = record_for(&cluster, &csvcs, "conc", Duration::from_secs(20), &mut seen).await;
    let under_load = csvcs.get("conc").await?.status.and_then(|s| s.autoscaling);
    stop.store(true, Ordering::Relaxed);
    let report = load.await?;
    let load_stopped = tokio::time::Instant::now();
    grown?;
    kept?;
    eprintln!("scaled up {grown_after:?} after the load started; {report:?}");
    assert!(seen.max_replicas <= 3, "above maxReplicas: {seen:?}");
    assert!(report.ok > 0, "{report:?}");
    let status = under_load.expect("status.autoscaling");
    assert_eq!(status.metric, AutoscalingMetric::Concurrency);
    assert!(status.desired_replicas >= 2 && status.desired_replicas <= 3, "{status:?}");
    assert!(status.observed_concurrency_per_worker.is_some_and(|c| c > 0.5), "{status:?}");
    assert!(status.last_scale_time.is_some(), "{status:?}");
    let events = reasons_of_events(&cluster, &ns, "conc").await?;
    assert!(events.iter().any(|e| e.starts_with("Autoscaled: pods 1 → ")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("AutoscalerPanic: ")), "a burst from idle panics: {events:?}");
    let wide = cluster.kubectl(&["-n", &ns, "get", "csvc", "conc", "-o", "wide"])?;
    assert!(wide.lines().next().is_some_and(|h| h.contains("DESIRED")), "{wide}");

    // Idle: the panic ends 60 s after the last burst, the 60 s stable
    // window empties, then the 10 s stabilisation: back to one pod.
    watch_replicas(&cluster, &csvcs, "conc", Duration::from_secs(240), "the scale-down to 1", &mut seen, |r| r == 1)
        .await?;
    eprintln!("back to 1 pod {:?} after the load stopped", load_stopped.elapsed());
    assert!(seen.max_replicas <= 3, "above maxReplicas: {seen:?}");
    let status = csvcs.get("conc").await?.status.and_then(|s| s.autoscaling).expect("status.autoscaling");
    assert!(!status.panic, "{status:?}");
    // The Event follows the scale.
    wait_for(Duration::from_secs(15), "an Autoscaled Event for the scale-down", || async {
        let events = reasons_of_events(&cluster, &ns, "conc").await?;
        anyhow::ensure!(events.iter().any(|e| e.starts_with("Autoscaled: ") && e.contains(" → 1:")), "{events:?}");
        Ok(true)
    })
    .await?;

    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}
