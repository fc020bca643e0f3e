//! Three real nodes on this machine (`NODES=3 e2e/cluster/up`, what `make
//! test` runs), each in its own zone: spread, `kubectl drain` under load,
//! a zone drained, a node lost without warning, and in-place resize and
//! the concurrency autoscaler on a pod that is not on the first node.
//!
//! These tests cordon, drain and kill nodes that every e2e test shares:
//! they run one at a time, and each leaves the nodes as it found them
//! (uncordoned, the killed node back) even when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clustered_api::v1alpha1::ClusteredService;
use clustered_e2e::{Cluster, Operator, app_container, demo_service, load, repo_root, wait_for};
use clustered_operator::resources::SERVICE_LABEL;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use tokio::time::Instant;

const POD_START: Duration = Duration::from_secs(180);
const ZONE: &str = "topology.kubernetes.io/zone";
const IMAGES: &[&str] = &["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"];

/// One test at a time: each changes the nodes the others run on.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The nodes by name, with their zones; fails unless there are three
/// zones, and puts every node back to work when dropped.
struct Nodes {
    zones: BTreeMap<String, String>,
    kubeconfig: std::path::PathBuf,
    kubectl: std::path::PathBuf,
}

impl Nodes {
    async fn get(cluster: &Cluster) -> anyhow::Result<Nodes> {
        let api: Api<Node> = Api::all(cluster.client.clone());
        let zones: BTreeMap<String, String> = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|n| Some((n.name_any(), n.labels().get(ZONE)?.clone())))
            .collect();
        let distinct: BTreeSet<&String> = zones.values().collect();
        ensure!(
            zones.len() >= 3 && distinct.len() >= 3,
            "these tests need 3 nodes in 3 zones, found {zones:?}: run `NODES=3 e2e/cluster/up` (as `make test` does)"
        );
        Ok(Nodes { zones, kubeconfig: cluster.kubeconfig.clone(), kubectl: cluster.bin_dir.join("kubectl") })
    }

    /// The node that is not the first (which holds no control plane here,
    /// but is where a single-node test would have put everything).
    fn last(&self) -> String {
        self.zones.keys().last().expect("nodes").clone()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        // A killed node comes back (idempotent: < 1 s when all is up),
        // then every node takes pods again.
        let up =
            std::process::Command::new(repo_root().join("e2e/cluster/up")).stdout(std::process::Stdio::null()).status();
        if !up.is_ok_and(|s| s.success()) {
            eprintln!("WARNING: e2e/cluster/up failed while restoring the nodes");
        }
        for node in self.zones.keys() {
            let _ = std::process::Command::new(&self.kubectl)
                .args(["uncordon", node])
                .env("KUBECONFIG", &self.kubeconfig)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

/// The demo app, `replicas` pods of one worker.
fn demo(name: &str, replicas: i32, edit: impl FnOnce(&mut serde_json::Value)) -> ClusteredService {
    demo_service(name, |v| {
        v["spec"]["replicas"] = replicas.into();
        edit(v);
    })
}

fn pod_ready(pod: &Pod) -> bool {
    clustered_operator::status::pod_ready(pod) && pod.metadata.deletion_timestamp.is_none()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// Every pod of service `name` (terminating ones too).
async fn pods_of(pods: &Api<Pod>, name: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods.list(&ListParams::default().labels(&format!("{SERVICE_LABEL}={name}"))).await?.items)
}

/// Ready pods by name, with their nodes.
async fn ready_placement(pods: &Api<Pod>, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(pods_of(pods, name).await?.iter().filter(|p| pod_ready(p)).map(|p| (p.name_any(), node_of(p))).collect())
}

/// Waits for `want` ready pods whose nodes satisfy `placed`, and for the
/// status to say the same (every pod, its node, all ready); returns them.
async fn wait_placed(
    csvcs: &Api<ClusteredService>,
    pods: &Api<Pod>,
    name: &str,
    want: usize,
    what: &str,
    placed: impl Fn(&BTreeMap<String, String>) -> bool,
) -> anyhow::Result<BTreeMap<String, String>> {
    let result = std::sync::Mutex::new(BTreeMap::new());
    wait_for(POD_START, what, || {
        let (result, placed) = (&result, &placed);
        async move {
            let ready = ready_placement(pods, name).await?;
            let all = pods_of(pods, name).await?;
            let status = csvcs.get(name).await?.status.unwrap_or_default();
            let reported: BTreeMap<String, String> =
                status.instances.iter().map(|i| (i.pod.clone(), i.node.clone().unwrap_or_default())).collect();
            *result.lock().expect("not poisoned") = ready.clone();
            anyhow::ensure!(ready.len() == want && all.len() == want, "ready {ready:?}, pods {}", all.len());
            anyhow::ensure!(placed(&ready), "placed {ready:?}");
            anyhow::ensure!(
                reported == ready && status.ready_replicas == want as i32,
                "status: {reported:?}, {} ready",
                status.ready_replicas
            );
            Ok(true)
        }
    })
    .await?;
    Ok(result.into_inner().expect("not poisoned"))
}

fn distinct_nodes(placement: &BTreeMap<String, String>) -> usize {
    placement.values().collect::<BTreeSet<_>>().len()
}

/// Bounded load through the Service's ClusterIP: at most 20 000 requests
/// and 4 minutes, whatever the test does.
async fn start_load(
    services: &Api<Service>,
    name: &str,
) -> anyhow::Result<(Arc<AtomicBool>, tokio::task::JoinHandle<load::Report>)> {
    let ip = services.get(name).await?.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let url = format!("http://{ip}:8080/light");
    wait_for(Duration::from_secs(60), "the Service answers", || async {
        Ok(load::get(&load::client(), &url).await.is_ok())
    })
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move { load::run(&url, 4, 20_000, Duration::from_secs(240), flag).await });
    Ok((stop, task))
}

/// Samples the lowest number of ready pods until stopped.
fn watch_min_ready(pods: Api<Pod>, name: &str) -> (Arc<AtomicBool>, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let min = Arc::new(AtomicUsize::new(usize::MAX));
    let (flag, low, name) = (stop.clone(), min.clone(), name.to_string());
    let task = tokio::spawn(async move {
        while !flag.load(Ordering::Relaxed) {
            if let Ok(ready) = ready_placement(&pods, &name).await {
                low.fetch_min(ready.len(), Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (stop, min, task)
}

/// `kubectl ARGS` off the runtime's threads (the load keeps running);
/// its stdout and stderr together.
async fn kubectl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let (kubectl, kubeconfig) = (cluster.bin_dir.join("kubectl"), cluster.kubeconfig.clone());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(kubectl).args(&args).env("KUBECONFIG", kubeconfig).output()
    })
    .await??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "kubectl failed: {text}");
    Ok(text)
}

const DRAIN: &[&str] = &["drain", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=150s"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spread_over_three_nodes_then_a_node_and_a_zone_drained_under_load() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::get().await?;
    cluster.require_images(IMAGES).await?;
    cluster.ensure_crd_serves(&["nodeLossTolerationSeconds"]).await?;
    let nodes = Nodes::get(&cluster).await?;
    let ns = cluster.namespace("nodes-drain").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);

    // Spread by default: one pod per node, so one per zone.
    csvcs.create(&PostParams::default(), &demo("web", 3, |_| {})).await?;
    let placed = wait_placed(&csvcs, &pods, "web", 3, "3 pods on 3 nodes", |p| distinct_nodes(p) == 3).await?;
    let zones: BTreeSet<&String> = placed.values().map(|n| &nodes.zones[n]).collect();
    assert_eq!(zones.len(), 3, "one pod per zone: {placed:?}");
    eprintln!("spread: {placed:?}");

    // 1. Drain one node under load: nothing fails, the budget holds, the
    // status follows the pod to its new node.
    let victim = nodes.last();
    let (stop_load, load) = start_load(&services, "web").await?;
    let (stop_watch, min_ready, watch) = watch_min_ready(pods.clone(), "web");
    let drained = kubectl(&cluster, &[DRAIN, &[victim.as_str()][..]].concat()).await;
    let moved =
        wait_placed(&csvcs, &pods, "web", 3, "3 pods ready off the drained node", |p| p.values().all(|n| *n != victim))
            .await;
    stop_load.store(true, Ordering::Relaxed);
    stop_watch.store(true, Ordering::Relaxed);
    let report = load.await?;
    watch.await?;
    drained?;
    let moved = moved?;
    eprintln!("drained {victim}: {moved:?}; load {report:?}");
    assert_eq!(report.failed, 0, "requests failed during the drain: {report:?}");
    assert!(report.ok > 50, "{report:?}");
    assert!(min_ready.load(Ordering::Relaxed) >= 2, "more than the budget's one pod was down");
    kubectl(&cluster, &["uncordon", &victim]).await?;

    // 2. A whole zone down: the node holding two pods now. Its two pods
    // may not go at once (the budget allows one): kubectl drain is told to
    // wait for the first replacement before the second eviction.
    let mut per_node: BTreeMap<&String, usize> = BTreeMap::new();
    for node in moved.values() {
        *per_node.entry(node).or_default() += 1;
    }
    let (crowded, _) = per_node.iter().max_by_key(|(_, n)| **n).expect("a node");
    let zone = nodes.zones[*crowded].clone();
    let in_zone: Vec<&String> = nodes.zones.iter().filter(|(_, z)| **z == zone).map(|(n, _)| n).collect();
    let (stop_load, load) = start_load(&services, "web").await?;
    let (stop_watch, min_ready, watch) = watch_min_ready(pods.clone(), "web");
    let selector = format!("{ZONE}={zone}");
    let drained = kubectl(&cluster, &[DRAIN, &["-l", selector.as_str()][..]].concat()).await;
    let after = wait_placed(&csvcs, &pods, "web", 3, "3 pods ready outside the drained zone", |p| {
        p.values().all(|n| nodes.zones[n] != zone)
    })
    .await;
    stop_load.store(true, Ordering::Relaxed);
    stop_watch.store(true, Ordering::Relaxed);
    let report = load.await?;
    watch.await?;
    let drain_log = drained?;
    let after = after?;
    eprintln!("zone {zone} ({in_zone:?}) drained: {after:?}; load {report:?}");
    assert_eq!(report.failed, 0, "requests failed during the zone drain: {report:?}");
    assert!(min_ready.load(Ordering::Relaxed) >= 2, "more than the budget's one pod was down");
    assert!(
        drain_log.contains("disruption budget"),
        "the second eviction should have waited for the PodDisruptionBudget: {drain_log}"
    );
    for node in &in_zone {
        kubectl(&cluster, &["uncordon", node]).await?;
    }

    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    drop(nodes);
    Ok(())
}

/// What the node-loss test saw, in seconds after the kill.
#[derive(Debug, Default)]
struct Timeline {
    node_not_ready: Option<f64>,
    status_names_node: Option<f64>,
    pod_evicted: Option<f64>,
    replacement_ready: Option<f64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_lost_without_warning_is_named_then_replaced_and_cleaned_up_when_back() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::get().await?;
    cluster.require_images(IMAGES).await?;
    cluster.ensure_crd_serves(&["nodeLossTolerationSeconds"]).await?;
    let nodes = Nodes::get(&cluster).await?;
    let ns = cluster.namespace("nodes-lost").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let node_api: Api<Node> = Api::all(cluster.client.clone());

    // A tight toleration keeps the test short (the default is 30 s).
    const TOLERATION: i64 = 10;
    let csvc = demo("lost", 3, |v| v["spec"]["nodeLossTolerationSeconds"] = TOLERATION.into());
    csvcs.create(&PostParams::default(), &csvc).await?;
    let placed = wait_placed(&csvcs, &pods, "lost", 3, "3 pods on 3 nodes", |p| distinct_nodes(p) == 3).await?;
    let victim = nodes.last();
    let stranded = placed.iter().find(|(_, n)| **n == victim).map(|(p, _)| p.clone()).context("a pod on the victim")?;

    // The machine dies: kubelet, containerd, shims and the pods' processes.
    let killed = Instant::now();
    let status = std::process::Command::new(repo_root().join("e2e/cluster/kill-node")).arg(&victim).status()?;
    ensure!(status.success(), "kill-node {victim} failed");
    let secs = || killed.elapsed().as_secs_f64();
    let mut seen = Timeline::default();
    let mut degraded_message = String::new();
    let deadline = killed + Duration::from_secs(180);
    while seen.replacement_ready.is_none() || seen.status_names_node.is_none() {
        ensure!(Instant::now() < deadline, "after 180 s: {seen:?}; last Degraded message: {degraded_message}");
        if seen.node_not_ready.is_none() {
            let node = node_api.get(&victim).await?;
            let ready = node.status.and_then(|s| s.conditions).unwrap_or_default();
            if ready.iter().any(|c| c.type_ == "Ready" && c.status != "True") {
                seen.node_not_ready = Some(secs());
            }
        }
        let status = csvcs.get("lost").await?.status.unwrap_or_default();
        if let Some(d) = status.conditions.iter().find(|c| c.type_ == "Degraded") {
            degraded_message = format!("{}: {}", d.reason, d.message);
            if seen.status_names_node.is_none()
                && d.status == "True"
                && d.reason == "NodeUnreachable"
                && d.message.contains(&victim)
                && d.message.contains(&stranded)
            {
                seen.status_names_node = Some(secs());
            }
        }
        let all = pods_of(&pods, "lost").await?;
        if seen.pod_evicted.is_none()
            && all.iter().any(|p| p.name_any() == stranded && p.metadata.deletion_timestamp.is_some())
        {
            seen.pod_evicted = Some(secs());
        }
        let serving = all.iter().filter(|p| pod_ready(p) && node_of(p) != victim).count();
        if seen.replacement_ready.is_none() && seen.pod_evicted.is_some() && serving == 3 {
            seen.replacement_ready = Some(secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "node loss timeline (s after SIGKILL, node-monitor-grace-period 20 s, nodeLossTolerationSeconds {TOLERATION}): {seen:?}"
    );
    eprintln!("Degraded while the node is lost: {degraded_message}");
    let named = seen.status_names_node.expect("named");
    assert!(named <= 30.0, "the status named the lost node after {named:.1} s (bound: 30 s)");
    // One Event for the cause.
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields("regarding.name=lost"))
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "NodeUnreachable"), "{reasons:?}");
    // The replacements serve.
    let ip = services.get("lost").await?.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let client = load::client();
    for _ in 0..30 {
        load::get(&client, &format!("http://{ip}:8080/light")).await?;
    }

    // The node comes back: its evicted pod goes, no duplicate stays, and
    // the status is clean again.
    let back = Instant::now();
    let up =
        tokio::process::Command::new(repo_root().join("e2e/cluster/up")).stdout(std::process::Stdio::null()).status();
    ensure!(up.await?.success(), "e2e/cluster/up did not bring {victim} back");
    wait_for(Duration::from_secs(120), "exactly 3 pods, a clean status", || async {
        let all = pods_of(&pods, "lost").await?;
        let status = csvcs.get("lost").await?.status.unwrap_or_default();
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").cloned();
        anyhow::ensure!(
            all.len() == 3 && all.iter().all(pod_ready) && status.instances.len() == 3 && status.ready_replicas == 3,
            "{} pods ({} ready), status {:?}",
            all.len(),
            all.iter().filter(|p| pod_ready(p)).count(),
            status.summary
        );
        anyhow::ensure!(degraded.as_ref().is_some_and(|d| d.status == "False"), "{degraded:?}");
        Ok(true)
    })
    .await?;
    eprintln!("{victim} back and the status clean {:.1} s after `up` started", back.elapsed().as_secs_f64());

    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    drop(nodes);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_place_resize_and_concurrency_autoscaling_off_the_first_node() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::get().await?;
    cluster.require_images(IMAGES).await?;
    cluster.ensure_crd_serves(&["nodeLossTolerationSeconds", "observedConcurrencyPerWorker"]).await?;
    let nodes = Nodes::get(&cluster).await?;
    let ns = cluster.namespace("nodes-far").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);

    // Pinned to the last node: its kubelet's cgroup root is not the
    // machine's, so clusterd must find its limit there too.
    let far = nodes.last();
    let csvc = demo("far", 1, |v| {
        v["spec"]["workers"] = serde_json::json!({ "count": "auto" });
        v["spec"]["healthCheck"] = serde_json::json!({ "path": "/healthz", "periodSeconds": 1, "timeoutSeconds": 1 });
        v["spec"]["autoscaling"] = serde_json::json!({ "minReplicas": 1, "maxReplicas": 2, "metric": "concurrency",
            "targetPerWorker": 0.5, "scaleDownStabilizationSeconds": 10 });
        v["spec"]["template"]["spec"]["nodeSelector"] = serde_json::json!({ "kubernetes.io/hostname": far });
        app_container(v)["resources"]["requests"]["cpu"] = "100m".into();
    });
    csvcs.create(&PostParams::default(), &csvc).await?;
    let placed =
        wait_placed(&csvcs, &pods, "far", 1, "the pod on the last node", |p| p.values().all(|n| *n == far)).await?;
    let pod = placed.keys().next().expect("a pod").clone();
    let workers = |cpu: f64, n: i32| {
        let (csvcs, pod) = (csvcs.clone(), pod.clone());
        async move {
            let status = csvcs.get("far").await?.status.unwrap_or_default();
            let i = status.instances.iter().find(|i| i.pod == pod).context("instance")?;
            anyhow::ensure!(
                i.cpu_limit == Some(cpu) && i.desired_workers == n && i.ready_workers == n,
                "{:?} CPUs, {}/{} workers",
                i.cpu_limit,
                i.ready_workers,
                i.desired_workers
            );
            Ok(true)
        }
    };
    wait_for(Duration::from_secs(60), "1 CPU, 1 worker", || workers(1.0, 1)).await?;

    // In-place resize: no restart, clusterd follows with a second worker.
    let patch = r#"{"spec":{"containers":[{"name":"app","resources":{"limits":{"cpu":"2"}}}]}}"#;
    kubectl(
        &cluster,
        &["-n", &ns, "patch", "pod", &pod, "--subresource", "resize", "--type", "strategic", "-p", patch],
    )
    .await?;
    wait_for(Duration::from_secs(60), "2 CPUs, 2 workers", || workers(2.0, 2)).await?;
    let restarts = pods.get(&pod).await?.status.and_then(|s| s.container_statuses).unwrap_or_default();
    assert!(restarts.iter().all(|c| c.restart_count == 0), "the resize restarted a container: {restarts:?}");

    // The concurrency autoscaler reads this pod and adds one.
    let ip = services.get("far").await?.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let url = format!("http://{ip}:8080/?ms=300");
    let load = tokio::spawn(async move { load::run(&url, 4, 2_000, Duration::from_secs(120), flag).await });
    let grown = wait_for(Duration::from_secs(90), "a scale-up to 2 pods", || async {
        Ok(csvcs.get("far").await?.spec.replicas == 2)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await?;
    grown?;
    assert!(report.ok > 0, "{report:?}");

    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    drop(nodes);
    Ok(())
}
