//! The seed's scenario end to end on the real local cluster, installed the
//! way users install it: `helm install`, `kubectl apply` of the example,
//! then the behaviours the product promises, one step after the other
//! (they share one release and one ClusteredService).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus, WorkerState};
use clustered_e2e::{Cluster, load, repo_root, wait_for};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

const RELEASE_NS: &str = "clustered-system";
const SLOW: Duration = Duration::from_secs(240);

fn step(what: &str) {
    eprintln!("\n=== {what}");
}

#[tokio::test]
async fn seed_scenario_end_to_end() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster
        .require_images(&[
            "clustered.dev/clusterd:dev",
            "clustered.dev/operator:dev",
            "clustered.dev/demo-app:dev",
            "clustered.dev/demo-app:v2",
        ])
        .await?;
    let chart = repo_root().join("charts/clustered");
    let chart = chart.to_str().expect("utf-8 path");

    step("the chart lints and its manifests pass a server-side dry run");
    cluster.helm(&["lint", chart])?;
    // Offline, helm renders for an old default version: render for this server.
    let version: serde_json::Value = serde_json::from_str(&cluster.kubectl(&["version", "-o", "json"])?)?;
    let server = version["serverVersion"]["gitVersion"].as_str().expect("server version").to_string();
    let manifests = cluster.helm(&[
        "template",
        "clustered",
        chart,
        "--namespace",
        RELEASE_NS,
        "--set",
        "replicas=2",
        "--kube-version",
        &server,
    ])?;
    let _ = cluster.helm(&["uninstall", "clustered", "--namespace", RELEASE_NS, "--wait"]);
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!("{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"{RELEASE_NS}\"}}}}"),
    )?;
    cluster.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &manifests)?;

    step("helm install with two operator replicas and leader election");
    cluster.helm(&[
        "install",
        "clustered",
        chart,
        "--namespace",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        "replicas=2",
        "--wait",
        "--timeout",
        "4m",
    ])?;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), RELEASE_NS);
    wait_for(Duration::from_secs(60), "a leader holds the lease", || async {
        let holder = leases.get_opt("clustered-operator").await?.and_then(|l| l.spec?.holder_identity);
        Ok(holder.is_some_and(|h| h.starts_with("clustered-operator-")))
    })
    .await?;

    let ns = cluster.namespace("scenario").await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);

    step("kubectl apply -f examples/clusteredservice.yaml: 2 pods × 2 workers, Available");
    let example = repo_root().join("examples/clusteredservice.yaml");
    cluster.kubectl(&["apply", "-n", &ns, "-f", example.to_str().expect("utf-8 path")])?;
    // clusterd can report its workers ready a probe period before the
    // kubelet marks the pod Ready, and Available needs only one of two pods:
    // wait for all three facts.
    wait_until(&csvcs, "2 ready pods with 2 ready workers each, Available", |s| {
        s.ready_replicas == 2
            && s.instances.len() == 2
            && s.instances.iter().all(|i| ready_workers(i) == 2)
            && condition(s, "Available")
    })
    .await?;
    let status = csvcs.get("demo").await?.status.expect("status");
    assert_eq!((status.replicas, status.ready_replicas), (2, 2));
    assert!(status.instances.iter().all(|i| i.cpu_limit == Some(2.0)), "{:?}", status.instances);

    step("the app container has no service-account token; the namespace enforces `restricted`");
    let pod_names: Vec<String> = status.instances.iter().map(|i| i.pod.clone()).collect();
    for pod in &pod_names {
        let spec = pods.get(pod).await?.spec.expect("pod spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        let probe =
            "process.stdout.write(String(require('fs').existsSync('/var/run/secrets/kubernetes.io/serviceaccount')))";
        let seen = cluster.kubectl(&["exec", "-n", &ns, pod, "-c", "app", "--", "node", "-e", probe])?;
        assert_eq!(seen, "false", "pod {pod} can see a token");
    }
    let ns_labels = cluster.kubectl(&["get", "namespace", &ns, "-o", "jsonpath={.metadata.labels}"])?;
    assert!(ns_labels.contains("\"pod-security.kubernetes.io/enforce\":\"restricted\""), "{ns_labels}");

    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let ip = services.get("demo").await?.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    let base = format!("http://{ip}:8080");
    // kube-proxy programs a new Service asynchronously; the product's
    // behaviour starts once the Service answers.
    wait_for(Duration::from_secs(60), "the Service answers", || async {
        Ok(load::get(&load::client(), &format!("{base}/light")).await.is_ok())
    })
    .await?;

    step("the light route is served by other workers while heavy requests run");
    light_route_stays_free(&base).await?;

    step("kill -9 a worker under load: it is replaced, its restart counted, no request fails");
    let victim_pod = &pod_names[0];
    let instance = status.instances.iter().find(|i| &i.pod == victim_pod).expect("instance");
    let victim = instance.workers.iter().find(|w| w.state == WorkerState::Ready).expect("a ready worker").clone();
    let pid = victim.pid.expect("pid");
    let report = under_load(&format!("{base}/light"), async {
        let kill = format!("process.kill({pid}, 'SIGKILL')");
        cluster.kubectl(&["exec", "-n", &ns, victim_pod, "-c", "app", "--", "node", "-e", &kill])?;
        wait_until(&csvcs, "the killed worker replaced and counted", |s| {
            s.instances.iter().filter(|i| &i.pod == victim_pod).flat_map(|i| &i.workers).any(|w| {
                w.id == victim.id && w.restarts > victim.restarts && w.pid != Some(pid) && w.state == WorkerState::Ready
            })
        })
        .await
    })
    .await?;
    assert_eq!(report.failed, 0, "failed requests while a worker was killed: {:?}", report.errors);

    step("kubectl clustered ls demo: a row per pod and worker, the killed worker's restart and how it ended");
    let table = cluster.kubectl_clustered(&["ls", "demo", "-n", &ns])?;
    eprintln!("{table}");
    let id = victim.id.to_string();
    let row = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&victim_pod.as_str()) && cells.get(2) == Some(&id.as_str()))
        .unwrap_or_else(|| panic!("no row for worker {id} of {victim_pod}:\n{table}"));
    assert!(row[5].parse::<i32>().is_ok_and(|n| n > victim.restarts), "restarts: {row:?}");
    assert!(row.ends_with(&["killed", "by", "SIGKILL"]), "last exit: {row:?}");
    assert_eq!(table.lines().skip(2).count(), 4, "2 pods of 2 workers:\n{table}");
    let json: serde_json::Value = serde_json::from_str(&cluster.kubectl_clustered(&["ls", "-n", &ns, "-o", "json"])?)?;
    assert_eq!(json["items"][0]["name"], "demo", "{json}");

    step("resize the pod's CPU limit to 3 in place: clusterd runs 3 workers");
    let resize = r#"{"spec":{"containers":[{"name":"app","resources":{"limits":{"cpu":"3"}}}]}}"#;
    cluster.kubectl(&["patch", "pod", victim_pod, "-n", &ns, "--subresource", "resize", "-p", resize])?;
    wait_until(&csvcs, "3 ready workers on the resized pod", |s| {
        s.instances.iter().any(|i| &i.pod == victim_pod && i.cpu_limit == Some(3.0) && ready_workers(i) == 3)
    })
    .await?;

    step("kubectl scale csvc/demo --replicas=3: 3 pods");
    cluster.kubectl(&["scale", "-n", &ns, "csvc/demo", "--replicas=3"])?;
    wait_until(&csvcs, "3 ready pods", |s| s.ready_replicas == 3 && s.instances.len() == 3).await?;

    step("rolling update of the image under load: no request fails");
    let report = under_load(&format!("{base}/light"), async {
        let image =
            r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"clustered.dev/demo-app:v2"}]"#;
        cluster.kubectl(&["patch", "csvc", "demo", "-n", &ns, "--type", "json", "-p", image])?;
        let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
        wait_for(SLOW, "every pod on the new image and ready", || async {
            let d = deployments.get("demo").await?;
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
            let st = d.status.unwrap_or_default();
            let all_new = pods
                .list(&ListParams::default().labels("clustered.dev/service=demo"))
                .await?
                .items
                .iter()
                .all(|p| image_of(p).as_deref() == Some("clustered.dev/demo-app:v2"));
            Ok(all_new
                && st.updated_replicas == Some(want)
                && st.ready_replicas == Some(want)
                && st.replicas == Some(want))
        })
        .await
    })
    .await?;
    assert_eq!(report.failed, 0, "failed requests during the rolling update: {:?}", report.errors);
    assert!(report.ok > 0);

    step("7 more ClusteredServices beside the demo, for the clusterd update");
    let example: ClusteredService = serde_yaml::from_str(&std::fs::read_to_string(&example)?)?;
    let others: Vec<String> = (1..=7).map(|i| format!("svc-{i}")).collect();
    for name in &others {
        let mut csvc = example.clone();
        csvc.metadata.name = Some(name.clone());
        csvc.spec.replicas = 1;
        csvcs.create(&Default::default(), &csvc).await?;
    }
    wait_for(SLOW, "the 7 Available", || async {
        let listed = csvcs.list(&ListParams::default()).await?.items;
        Ok(listed.iter().filter(|c| c.status.as_ref().is_some_and(|s| condition(s, "Available"))).count() == 8)
    })
    .await?;

    step(
        "helm upgrade to the default single operator with a new clusterd image: paced, 2 services at a time, never two writers",
    );
    // The previous chart ran one replica without leader election and a
    // RollingUpdate: the new operator started beside the old one, and the
    // two rewrote every Deployment back and forth (generation 1 → 14).
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(cluster.client.clone(), &ns);
    let demo_sets = ListParams::default().labels("clustered.dev/service=demo");
    let generation = |d: Deployment| d.metadata.generation.unwrap_or_default();
    let before = generation(deployments.get("demo").await?);
    let sets_before = replica_sets.list(&demo_sets).await?.items.len();
    let old_clusterd = "clustered.dev/clusterd:dev";
    let clusterd = format!("{}/clustered/clusterd:dev", clustered_e2e::registries()[0]);
    let upgrade = helm_in_background(
        &cluster,
        &["upgrade", "clustered", chart, "--namespace", RELEASE_NS, "--reuse-values", "--set", "replicas=1"],
        &[format!("clusterdImage={clusterd}")],
    );
    let started = std::time::Instant::now();
    let mut seen = WaveSeen::default();
    let report = under_load(&format!("{base}/light"), async {
        seen = watch_wave(&deployments, &csvcs, &clusterd, 8).await?;
        upgrade.await?
    })
    .await?;
    let took = started.elapsed();
    eprintln!("e2e: clusterd update of 8 services took {took:.1?}; at most {} rolling at once", seen.max_rolling);
    assert_eq!(report.failed, 0, "failed requests during the clusterd update: {:?}", report.errors);
    assert!(report.ok > 0);
    assert!(seen.max_rolling <= 2, "{} services rolled at once", seen.max_rolling);
    assert!(seen.queued_said, "no waiting service said Queued in its status");
    wait_for(SLOW, "every pod on the new clusterd, and every status saying so", || async {
        let on_new = pods.list(&ListParams::default()).await?.items.iter().all(|p| clusterd_of(p) == Some(&clusterd));
        let said = csvcs.list(&ListParams::default()).await?.items.iter().all(|c| {
            c.status
                .as_ref()
                .and_then(|s| s.clusterd.as_ref())
                .is_some_and(|d| d.image.as_deref() == Some(&clusterd) && d.pending.is_none() && d.version.is_some())
        });
        Ok(on_new && said)
    })
    .await?;
    // Settled: a second writer would keep changing it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = generation(deployments.get("demo").await?);
    let sets_after = replica_sets.list(&demo_sets).await?.items.len();
    assert_eq!((after - before, sets_after - sets_before), (1, 1), "the demo's generations and ReplicaSets added");

    step("helm rollback: back to the previous clusterd, paced the same way");
    let rollback = helm_in_background(&cluster, &["rollback", "clustered", "--namespace", RELEASE_NS, "--wait"], &[]);
    let started = std::time::Instant::now();
    let report = under_load(&format!("{base}/light"), async {
        seen = watch_wave(&deployments, &csvcs, old_clusterd, 8).await?;
        rollback.await?
    })
    .await?;
    eprintln!(
        "e2e: clusterd rollback of 8 services took {:.1?}; at most {} rolling at once",
        started.elapsed(),
        seen.max_rolling
    );
    assert_eq!(report.failed, 0, "failed requests during the rollback: {:?}", report.errors);
    assert!(seen.max_rolling <= 2, "{} services rolled at once", seen.max_rolling);

    step("automatic clusterd updates off: nothing rolls, the status says why; a spec change takes the new clusterd");
    cluster.helm(&[
        "upgrade",
        "clustered",
        chart,
        "--namespace",
        RELEASE_NS,
        "--reuse-values",
        "--set",
        "clusterdUpdates.automatic=false",
        "--set",
        &format!("clusterdImage={clusterd}"),
        "--wait",
        "--timeout",
        "4m",
    ])?;
    wait_for(SLOW, "every service says Manual", || async {
        let listed = csvcs.list(&ListParams::default()).await?.items;
        Ok(listed.iter().all(|c| {
            c.status.as_ref().and_then(|s| s.clusterd.as_ref()?.pending.as_ref()).is_some_and(|p| {
                p.reason == "Manual" && p.image == clusterd && p.message.contains("clusterdUpdates.automatic")
            })
        }))
    })
    .await?;
    let on_old = |d: &Deployment| clusterd_of_template(d) == Some(old_clusterd);
    assert!(deployments.list(&ListParams::default()).await?.items.iter().all(on_old), "a Deployment rolled");
    let env =
        r#"[{"op":"add","path":"/spec/template/spec/containers/0/env/-","value":{"name":"CHANGED","value":"1"}}]"#;
    cluster.kubectl(&["patch", "csvc", "svc-1", "-n", &ns, "--type", "json", "-p", env])?;
    wait_for(SLOW, "svc-1 rolled onto the new clusterd with its change", || async {
        Ok(clusterd_of_template(&deployments.get("svc-1").await?) == Some(clusterd.as_str()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let listed = deployments.list(&ListParams::default()).await?.items;
    let still_old: Vec<String> = listed.iter().filter(|d| on_old(d)).map(|d| d.name_any()).collect();
    assert_eq!(still_old.len(), 7, "only the changed service takes the new clusterd: {still_old:?}");
    for name in &others {
        csvcs.delete(name, &Default::default()).await?;
    }

    step("an invalid ClusteredService is rejected with its message");
    let invalid = repo_root().join("crds/tests/fixtures/invalid/routes-without-proxy.yaml");
    let rejected = cluster.kubectl(&["apply", "-n", &ns, "-f", invalid.to_str().expect("utf-8 path")]);
    let message = format!("{:#}", rejected.expect_err("invalid CR accepted"));
    assert!(message.contains("spec.routes (route pools) need spec.portMode: proxy"), "{message}");

    step("delete the ClusteredService: everything it owned is garbage-collected");
    cluster.kubectl(&["delete", "csvc", "demo", "-n", &ns, "--wait=true"])?;
    wait_for(SLOW, "children and pods gone", || async {
        let left = cluster.kubectl(&["get", "deployment,replicaset,service,pdb,pod", "-n", &ns, "-o", "name"])?;
        Ok(left.trim().is_empty())
    })
    .await?;
    cluster.delete_namespace(&ns).await?;

    step("helm uninstall leaves nothing behind (CRDs stay, as Helm keeps them by design)");
    cluster.helm(&["uninstall", "clustered", "--namespace", RELEASE_NS, "--wait"])?;
    // The operator's pods get their grace period to stop; then nothing is left.
    let kinds = "deployment,replicaset,pod,service,serviceaccount,role,rolebinding,lease";
    wait_for(Duration::from_secs(60), "the release's objects gone", || async {
        let left = cluster.kubectl(&["get", kinds, "-n", RELEASE_NS, "-o", "name"])?;
        Ok(left.lines().all(|l| l == "serviceaccount/default"))
    })
    .await?;
    let cluster_wide = cluster.kubectl(&["get", "clusterrole,clusterrolebinding", "-o", "name"])?;
    assert!(!cluster_wide.contains("clustered-operator"), "{cluster_wide}");
    cluster.delete_namespace(RELEASE_NS).await
}

/// Heavy requests for `/` keep the route pool's worker busy; every light
/// request meanwhile is answered, by other workers, before the heavy ones
/// are done. Outcomes only: how fast is a benchmark's question.
async fn light_route_stays_free(base: &str) -> anyhow::Result<()> {
    let client = load::client();
    let heavy: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/?ms=1500"));
            tokio::spawn(async move { load::get(&client, &url).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut light_workers = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let answer = load::get(&client, &format!("{base}/light")).await?;
        light_workers.insert(answer.worker.unwrap_or_default());
    }
    let light_done_while_heavy_ran = heavy.iter().any(|h| !h.is_finished());
    let mut heavy_workers = std::collections::BTreeSet::new();
    for h in heavy {
        heavy_workers.insert(h.await??.worker.unwrap_or_default());
    }
    assert!(light_done_while_heavy_ran, "light requests waited for the heavy ones");
    assert!(
        light_workers.is_disjoint(&heavy_workers),
        "light {light_workers:?} shared workers with heavy {heavy_workers:?}"
    );
    Ok(())
}

/// Runs `during` while 4 clients send GETs to `url`; returns their report.
async fn under_load(url: &str, during: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<load::Report> {
    let stop = Arc::new(AtomicBool::new(false));
    let (url, flag) = (url.to_string(), stop.clone());
    let generator = tokio::spawn(async move { load::run(&url, 4, 200_000, Duration::from_secs(300), flag).await });
    let result = during.await;
    stop.store(true, Ordering::Relaxed);
    let report = generator.await?;
    result.map(|()| report)
}

async fn wait_until(
    csvcs: &Api<ClusteredService>,
    what: &str,
    check: impl Fn(&ClusteredServiceStatus) -> bool,
) -> anyhow::Result<()> {
    wait_for(SLOW, what, || async { Ok(csvcs.get("demo").await?.status.as_ref().is_some_and(&check)) }).await
}

fn ready_workers(instance: &clustered_api::v1alpha1::Instance) -> usize {
    instance.workers.iter().filter(|w| w.state == WorkerState::Ready).count()
}

fn condition(status: &ClusteredServiceStatus, type_: &str) -> bool {
    status.conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Runs helm on a blocking thread, so the load and the sampling go on.
fn helm_in_background(cluster: &Cluster, args: &[&str], set: &[String]) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let cluster = cluster.clone();
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    for value in set {
        args.extend(["--set".into(), value.clone()]);
    }
    if args[0] == "upgrade" {
        args.extend(["--wait", "--timeout", "4m"].map(String::from));
    }
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.helm(&args).map(drop)
    })
}

/// What a clusterd update looked like from outside.
#[derive(Debug, Default)]
struct WaveSeen {
    /// The most Deployments on the new clusterd and not yet rolled out, at
    /// one moment.
    max_rolling: usize,
    /// Whether a waiting service said `Queued` in its status.
    queued_said: bool,
}

/// Samples the namespace until its `count` Deployments are all on
/// `clusterd` and rolled out, as `kubectl rollout status` judges it.
async fn watch_wave(
    deployments: &Api<Deployment>,
    csvcs: &Api<ClusteredService>,
    clusterd: &str,
    count: usize,
) -> anyhow::Result<WaveSeen> {
    let mut seen = WaveSeen::default();
    let deadline = tokio::time::Instant::now() + SLOW;
    loop {
        let listed = deployments.list(&ListParams::default()).await?.items;
        let on_new: Vec<&Deployment> = listed.iter().filter(|d| clusterd_of_template(d) == Some(clusterd)).collect();
        let rolling = on_new.iter().filter(|d| !rolled_out(d)).count();
        seen.max_rolling = seen.max_rolling.max(rolling);
        seen.queued_said |= csvcs.list(&ListParams::default()).await?.items.iter().any(|c| {
            c.status.as_ref().and_then(|s| s.clusterd.as_ref()?.pending.as_ref()).is_some_and(|p| p.reason == "Queued")
        });
        if on_new.len() == count && rolling == 0 {
            return Ok(seen);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} Deployments on {clusterd}, {rolling} rolling, after {SLOW:?}",
            on_new.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rolled_out(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    st.observed_generation >= d.metadata.generation
        && st.updated_replicas == Some(want)
        && st.replicas == Some(want)
        && st.available_replicas == Some(want)
}

fn clusterd_of_template(d: &Deployment) -> Option<&str> {
    let init = d.spec.as_ref()?.template.spec.as_ref()?.init_containers.as_ref()?;
    init.iter().find(|c| c.name == "clusterd-install")?.image.as_deref()
}

fn clusterd_of(pod: &Pod) -> Option<&String> {
    pod.spec.as_ref()?.init_containers.as_ref()?.iter().find(|c| c.name == "clusterd-install")?.image.as_ref()
}

fn image_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.containers.iter().find(|c| c.name == "app")?.image.clone()
}
