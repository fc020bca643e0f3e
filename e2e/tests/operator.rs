//! The operator against the real local cluster: children created, updated
//! and garbage-collected; status built from real clusterds in real pods;
//! the scale subresource; a restart mid-reconcile converging without
//! duplicates. Each test runs its own operator scoped to its namespace.

use std::time::Duration;

use anyhow::Context as _;
use clustered_api::v1alpha1::{ClusteredService, WorkerState};
use clustered_e2e::{Cluster, Operator, demo_service, wait_for};
use clustered_operator::status::Heartbeat;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

const POD_START: Duration = Duration::from_secs(180);

/// A ClusteredService of the demo app with a fixed number of workers.
fn demo(name: &str, replicas: i32, workers: u32) -> ClusteredService {
    demo_service(name, |v| {
        v["spec"]["replicas"] = replicas.into();
        v["spec"]["workers"]["count"] = workers.into();
        v["spec"]["healthCheck"] = serde_json::json!({ "path": "/healthz", "periodSeconds": 1, "timeoutSeconds": 1 });
    })
}

#[tokio::test]
async fn children_follow_the_spec_and_are_garbage_collected() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("op-children").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let client = cluster.client.clone();
    let csvcs: Api<ClusteredService> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);

    let created = csvcs.create(&PostParams::default(), &demo("shop", 0, 2)).await?;
    wait_for(Duration::from_secs(30), "children created", || async {
        Ok(deployments.get_opt("shop").await?.is_some()
            && services.get_opt("shop").await?.is_some()
            && pdbs.get_opt("shop").await?.is_some())
    })
    .await?;
    let deployment = deployments.get("shop").await?;
    let owner = &deployment.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ClusteredService", created.uid().unwrap_or_default().as_str())
    );
    let pod = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let command = pod.containers[0].command.clone().unwrap_or_default();
    assert_eq!(command.first().map(String::as_str), Some("/clustered/bin/clusterd"));
    assert!(command.contains(&"--workers=2".to_string()), "{command:?}");
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.init_containers.as_ref().map(Vec::len), Some(1));
    assert!(hpas.get_opt("shop").await?.is_none());

    // Change the spec: the children follow.
    let patch = serde_json::json!({ "spec": { "port": 9090, "replicas": 0, "workers": { "count": 3 },
        "autoscaling": { "minReplicas": 1, "maxReplicas": 4 } } });
    csvcs.patch("shop", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for(Duration::from_secs(30), "children updated", || async {
        let svc_port = services.get("shop").await?.spec.and_then(|s| s.ports).map(|p| p[0].port);
        let command =
            deployments.get("shop").await?.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].command.clone());
        let has_hpa = hpas.get_opt("shop").await?.is_some();
        Ok(svc_port == Some(9090)
            && has_hpa
            && command.flatten().is_some_and(|c| c.contains(&"--workers=3".to_string())))
    })
    .await?;
    let hpa = hpas.get("shop").await?.spec.expect("hpa spec");
    assert_eq!((hpa.scale_target_ref.kind.as_str(), hpa.max_replicas), ("ClusteredService", 4));

    let patch = serde_json::json!({ "spec": { "autoscaling": null } });
    csvcs.patch("shop", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for(Duration::from_secs(30), "HPA removed", || async { Ok(hpas.get_opt("shop").await?.is_none()) }).await?;

    // Someone deletes a child: it comes back.
    services.delete("shop", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(30), "Service recreated", || async { Ok(services.get_opt("shop").await?.is_some()) })
        .await?;

    assert_eq!(operator.metrics.tracked_objects.get(), 1);
    csvcs.delete("shop", &DeleteParams::foreground()).await?;
    wait_for(Duration::from_secs(60), "children garbage-collected", || async {
        Ok(deployments.get_opt("shop").await?.is_none()
            && services.get_opt("shop").await?.is_none()
            && pdbs.get_opt("shop").await?.is_none())
    })
    .await?;
    // Nothing of a deleted ClusteredService stays in the operator's memory.
    wait_for(Duration::from_secs(30), "bookkeeping of the deleted object dropped", || async {
        Ok(csvcs.get_opt("shop").await?.is_none() && operator.metrics.tracked_objects.get() == 0)
    })
    .await?;
    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn status_reports_every_pod_s_workers_and_follows_scale() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("op-status").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let started = std::time::Instant::now();
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    csvcs.create(&PostParams::default(), &demo("web", 1, 2)).await?;

    let settled = |pods: usize| {
        let csvcs = csvcs.clone();
        move || {
            let csvcs = csvcs.clone();
            async move {
                let csvc = csvcs.get("web").await?;
                let Some(status) = csvc.status else {
                    return Ok(false);
                };
                let available = status.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True");
                let all_workers_ready = status.instances.len() == pods
                    && status
                        .instances
                        .iter()
                        .all(|i| i.workers.len() == 2 && i.workers.iter().all(|w| w.state == WorkerState::Ready));
                Ok(available
                    && all_workers_ready
                    && status.ready_replicas == pods as i32
                    && status.observed_generation == csvc.metadata.generation)
            }
        }
    };
    wait_for(POD_START, "1 pod with 2 ready workers in status", settled(1)).await?;
    let status = csvcs.get("web").await?.status.expect("status");
    assert_eq!(status.workers.ready, 2);
    assert_eq!(status.summary.workers, "2/2");
    assert_eq!(status.selector, "clustered.dev/service=web");
    assert_eq!(status.instances[0].cpu_limit, Some(1.0), "clusterd reads the pod's CPU limit from its cgroup");
    assert!(status.instances[0].workers.iter().all(|w| w.pid.is_some()));

    // Status writes are coalesced to one a second at most, and a settled
    // service is not written at all, however often clusterd is asked.
    // When the figures were confirmed, for `kubectl get` to show their age.
    let observed_at = status.observed_at.as_ref().expect("status.observedAt").0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(observed_at);
    assert!(age.as_secs() < 60 + 10, "observedAt is {age:?} old");
    let table = cluster.kubectl(&["get", "-n", &ns, "csvc/web"])?;
    assert!(table.lines().next().is_some_and(|header| header.contains("OBSERVED")), "{table}");

    let writes = operator.metrics.status_writes.get();
    let quiet_from = k8s_openapi::jiff::Timestamp::now();
    assert!(writes <= started.elapsed().as_secs() + 1, "{writes} status writes in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(7)).await;
    // Unless its minute's heartbeat fell in these seconds (the one
    // ClusteredService of this operator's fleet; a moment up to 2 s before
    // them may be written in them).
    let uid = csvcs.get("web").await?.metadata.uid.context("uid")?;
    let heartbeat =
        Heartbeat::of(1, &uid).due(quiet_from - Duration::from_secs(2), k8s_openapi::jiff::Timestamp::now());
    let written = operator.metrics.status_writes.get() - writes;
    assert_eq!(written, u64::from(heartbeat), "status written while nothing changed (heartbeat due: {heartbeat})");

    // A worker's crash is no Kubernetes event: clusterd tells the operator
    // (which asks a settled pod only every SETTLED_STATUS_INTERVAL).
    let victim = status.instances[0].workers[1].pid.context("worker 1's pid")?;
    // The image has node but no `kill`.
    let kill = format!("process.kill({victim}, 'SIGKILL')");
    cluster.kubectl(&["exec", "-n", &ns, &status.instances[0].pod, "-c", "app", "--", "node", "-e", &kill])?;
    wait_for(Duration::from_secs(30), "worker 1's restart in the status", || async {
        let status = csvcs.get("web").await?.status.unwrap_or_default();
        Ok(status.instances.first().and_then(|i| i.workers.get(1)).is_some_and(|w| w.restarts == 1))
    })
    .await?;
    assert!(operator.metrics.status_changes_told.get() > 0, "the crash was not told");

    cluster.kubectl(&["scale", "-n", &ns, "csvc/web", "--replicas=2"])?;
    wait_for(POD_START, "2 pods with 2 ready workers each", settled(2)).await?;
    let table = cluster.kubectl(&["get", "csvc", "web", "-n", &ns, "--no-headers"])?;
    let columns: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(&columns[1..4], ["2/2", "4/4", "proxy"], "{table}");
    // The scale is announced as an Event on the ClusteredService.
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    wait_for(Duration::from_secs(30), "a Scaled event on csvc/web", || async {
        Ok(events.list(&ListParams::default()).await?.items.iter().any(|e| {
            let about = e.regarding.as_ref();
            e.reason.as_deref() == Some("Scaled")
                && e.note.as_deref() == Some("pods 1 → 2")
                && about
                    .is_some_and(|r| r.kind.as_deref() == Some("ClusteredService") && r.name.as_deref() == Some("web"))
        }))
    })
    .await?;

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn a_restart_mid_reconcile_converges_without_duplicates() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("op-restart").await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let replicasets: Api<ReplicaSet> = Api::namespaced(cluster.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);

    csvcs.create(&PostParams::default(), &demo("api", 2, 1)).await?;
    // Killed as soon as it has started writing, again and again.
    for _ in 0..3 {
        let operator = Operator::start(&cluster, &ns).await?;
        wait_for(Duration::from_secs(30), "operator at work", || async {
            Ok(deployments.get_opt("api").await?.is_some())
        })
        .await?;
        operator.kill();
    }
    let operator = Operator::start(&cluster, &ns).await?;
    wait_for(POD_START, "2 ready pods in status", || async {
        Ok(csvcs.get("api").await?.status.is_some_and(|s| s.ready_replicas == 2 && s.instances.len() == 2))
    })
    .await?;
    assert_eq!(deployments.list(&ListParams::default()).await?.items.len(), 1);
    assert_eq!(replicasets.list(&ListParams::default()).await?.items.len(), 1, "the pod template never flapped");
    let running = pods.list(&ListParams::default()).await?.items;
    assert_eq!(running.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count(), 2);

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn a_restarted_operator_writes_no_false_outage() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("op-no-outage").await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let mut operator = Operator::start(&cluster, &ns).await?;
    csvcs.create(&PostParams::default(), &demo("steady", 1, 1)).await?;
    let healthy = |status: &clustered_api::v1alpha1::ClusteredServiceStatus| {
        status.ready_replicas == 1 && status.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True")
    };
    wait_for(POD_START, "1 ready pod, available", || async {
        Ok(csvcs.get("steady").await?.status.is_some_and(|s| healthy(&s)))
    })
    .await?;

    // Every status written from now on, as a watch of the object sees it.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let (csvcs, seen) = (csvcs.clone(), seen.clone());
        tokio::spawn(async move {
            let config = watcher::Config::default().fields("metadata.name=steady");
            watcher(csvcs, config)
                .applied_objects()
                .for_each(|csvc| {
                    if let Ok(status) = csvc.map(|c| c.status) {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(status);
                    }
                    std::future::ready(())
                })
                .await;
        })
    };
    // Restarted several times: whether the first reconcile runs before the
    // Pod and Deployment caches are listed is a race.
    for _ in 0..5 {
        operator.stop().await;
        operator = Operator::start(&cluster, &ns).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Its children were verified against the live objects, not re-applied.
        assert_eq!(operator.metrics.child_writes.get(), 0, "a restarted operator rewrote children");
    }
    recorder.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(!seen.is_empty(), "the watch saw the object");
    for status in &seen {
        let status = status.as_ref().expect("a status");
        assert!(healthy(status), "a restarted operator wrote a false outage: {status:#?}");
    }

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

/// Changes made while no operator ran reach their Deployments as soon as
/// one starts and its caches are listed. Every reconcile waits for the
/// caches; kube-runtime's store wakes only one waiter, so on the previous
/// build all but one of these reconciles slept until their 30 s timeout.
#[tokio::test]
async fn changes_made_while_the_operator_was_down_are_applied_at_its_start() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("op-cold-start").await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let names: Vec<String> = (0..8).map(|i| format!("cold-{i}")).collect();
    let operator = Operator::start(&cluster, &ns).await?;
    for name in &names {
        csvcs.create(&PostParams::default(), &demo(name, 0, 1)).await?;
    }
    wait_for(Duration::from_secs(60), "8 Deployments", || async {
        Ok(deployments.list(&ListParams::default()).await?.items.len() == names.len())
    })
    .await?;
    operator.stop().await;

    for name in &names {
        let patch = serde_json::json!({ "spec": { "workers": { "count": 2 } } });
        csvcs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    let started = tokio::time::Instant::now();
    let operator = Operator::start(&cluster, &ns).await?;
    let applied = || async {
        let all = deployments.list(&ListParams::default()).await?.items;
        Ok(all.iter().filter(|d| container_command(d).contains(&"--workers=2".to_string())).count() == names.len())
    };
    wait_for(Duration::from_secs(60), "every change applied", applied).await?;
    let took = started.elapsed();
    let ready = operator.ready.load(std::sync::atomic::Ordering::Relaxed);
    let timeouts = operator
        .metrics
        .reconcile_errors
        .get_or_create(&clustered_operator::metrics::ErrorLabel { error: "timeout" })
        .get();
    operator.stop().await;
    assert!(ready, "the operator reports ready once it reconciles");
    assert_eq!(timeouts, 0, "no reconcile waited out its timeout");
    // The stall was the reconcile timeout (30 s); a cold start with 8
    // objects lists 5 caches and sends a few requests per object.
    assert!(took < Duration::from_secs(15), "the changes took {took:?} after the operator started");
    Ok(())
}

fn container_command(deployment: &Deployment) -> Vec<String> {
    let pod = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    pod.and_then(|p| p.containers[0].command.clone()).unwrap_or_default()
}

/// kube-proxy's default `minSyncPeriod` (1 s, iptables mode) and the sync itself.
const KUBE_PROXY_SYNC: Duration = Duration::from_millis(1500);

/// `Available` means the Service answers: a user (or `make demo`) that
/// waits for the condition and sends a request gets an answer within
/// kube-proxy's sync period. On the previous build Available followed the
/// pods' readiness, which the Service's endpoints follow later (0.1–2.1 s):
/// 4 of 10 first requests failed.
#[tokio::test]
async fn available_means_the_service_answers_at_once() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("op-available").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let names: Vec<String> = (0..10).map(|i| format!("fresh-{i}")).collect();
    for name in &names {
        csvcs.create(&PostParams::default(), &demo(name, 1, 1)).await?;
    }
    let first_request = |name: String| {
        let (csvcs, services) = (csvcs.clone(), services.clone());
        async move {
            wait_for(POD_START, "Available", || async {
                let status = csvcs.get(&name).await?.status.unwrap_or_default();
                Ok(status.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True"))
            })
            .await?;
            let ip = services.get(&name).await?.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
            let client = clustered_e2e::load::client();
            let url = format!("http://{ip}:8080/light");
            // What no operator can see: kube-proxy programs a node from the
            // EndpointSlices at most once per sync period (1 s by default).
            let deadline = tokio::time::Instant::now() + KUBE_PROXY_SYNC;
            // Nor this: a pod IP reused from a deleted pod can meet a failed
            // entry in this host's neighbour cache ("No route to host")
            // until the kernel probes the address again (~3 s).
            let neighbour_deadline = deadline + Duration::from_secs(3);
            loop {
                match clustered_e2e::load::get(&client, &url).await {
                    Ok(_) => return Ok(()),
                    Err(e) if format!("{e:#}").contains("No route to host") => {
                        if tokio::time::Instant::now() >= neighbour_deadline {
                            return Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    };
    let outcomes = futures::future::join_all(names.iter().cloned().map(first_request)).await;
    operator.stop().await;
    let failed: Vec<String> = outcomes.iter().filter_map(|o| o.as_ref().err()).map(|e| format!("{e:#}")).collect();
    assert!(failed.is_empty(), "{} of 10 first requests after Available failed: {failed:?}", failed.len());
    Ok(())
}

/// Two operators with different settings on one namespace, as `make demo`'s
/// and a test's were: they stop fighting. Each undoes the other's change a
/// few times, then leaves it (and says so in its status; with two writers
/// the status alternates between their views, so the test asserts on the
/// Deployment). On the previous build they rewrote the Deployment about 30
/// times a second for as long as both ran.
#[tokio::test]
async fn two_operators_on_one_namespace_stop_fighting() -> anyhow::Result<()> {
    use clustered_operator::resources::Settings;
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("op-two-writers").await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let first = Operator::start(&cluster, &ns).await?;
    let other = Settings { clusterd_image: "clustered.dev/clusterd:other".into(), ..Settings::default() };
    let second = Operator::start_with(&cluster, &ns, other).await?;
    csvcs.create(&PostParams::default(), &demo("contested", 0, 1)).await?;

    let generation =
        || async { anyhow::Ok(deployments.get_opt("contested").await?.and_then(|d| d.metadata.generation)) };
    tokio::time::sleep(Duration::from_secs(15)).await;
    let fought = generation().await?.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let later = generation().await?.unwrap_or_default();
    first.stop().await;
    second.stop().await;
    assert!(fought >= 3, "the two operators did not both write the Deployment (generation {fought})");
    assert!(later - fought <= 2, "the Deployment was rewritten {} more times in 20 s", later - fought);
    Ok(())
}
