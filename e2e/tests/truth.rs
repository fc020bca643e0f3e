//! The operator tells the truth on the real cluster: drift on its children
//! is reverted, and the status says why pods are missing or why the
//! operator itself could not do its part, each with its own reason, the
//! underlying message and an Event. Each test runs its own operator scoped
//! to its namespace; independent cases run side by side.

use std::time::Duration;

use clustered_api::v1alpha1::ClusteredService;
use clustered_e2e::{Cluster, Operator, app_container, demo_service, wait_for};
use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

/// A ClusteredService of the demo app meeting the `restricted` Pod Security
/// Standard, with `edit` applied to its JSON first.
fn csvc(name: &str, replicas: i32, edit: impl FnOnce(&mut serde_json::Value)) -> ClusteredService {
    demo_service(name, |v| {
        v["spec"]["replicas"] = replicas.into();
        v["spec"]["shutdown"]["drainTimeoutSeconds"] = 1.into();
        app_container(v)["resources"]["requests"]["cpu"] = "20m".into();
        edit(v);
    })
}

fn degraded(csvc: &ClusteredService) -> Option<&Condition> {
    csvc.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Degraded")
}

/// Events about the ClusteredService `name` with `reason`.
async fn events_about(events: &Api<Event>, name: &str, reason: &str) -> anyhow::Result<Vec<Event>> {
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("ClusteredService") && r.name.as_deref() == Some(name))
        })
        .collect())
}

#[tokio::test]
async fn drift_on_children_is_reverted_and_is_not_a_scale() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("op-drift").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(cluster.client.clone(), &ns);
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);

    csvcs.create(&PostParams::default(), &csvc("drift", 0, |_| {})).await?;
    wait_for(Duration::from_secs(30), "children created", || async {
        Ok(deployments.get_opt("drift").await?.is_some()
            && services.get_opt("drift").await?.is_some()
            && pdbs.get_opt("drift").await?.is_some())
    })
    .await?;

    // What people do to children by hand.
    let kubectl = |args: &[&str]| cluster.kubectl(&[&["-n", ns.as_str()][..], args].concat());
    kubectl(&["set", "env", "deployment/drift", "FOO=bar"])?;
    kubectl(&["scale", "deployment/drift", "--replicas=2"])?;
    // Even the label the operator's cache is selected by.
    kubectl(&["label", "deployment/drift", "clustered.dev/service=someone-else", "--overwrite"])?;
    kubectl(&["label", "service/drift", "app.kubernetes.io/managed-by=someone-else", "--overwrite"])?;
    let port = r#"[{"op": "replace", "path": "/spec/ports/0/port", "value": 9999}]"#;
    kubectl(&["patch", "service/drift", "--type=json", "-p", port])?;

    wait_for(Duration::from_secs(30), "every edit reverted", || async {
        let d = deployments.get("drift").await?;
        let spec = d.spec.clone().unwrap_or_default();
        let app = spec.template.spec.as_ref().map(|p| p.containers[0].clone()).unwrap_or_default();
        let no_env = app.env.unwrap_or_default().iter().all(|e| e.name != "FOO");
        let label = d.metadata.labels.unwrap_or_default().get("clustered.dev/service").cloned();
        let svc = services.get("drift").await?;
        let svc_label = svc.metadata.labels.unwrap_or_default().get("app.kubernetes.io/managed-by").cloned();
        let ports: Vec<(Option<String>, i32)> =
            svc.spec.and_then(|s| s.ports).unwrap_or_default().into_iter().map(|p| (p.name, p.port)).collect();
        Ok(no_env
            && spec.replicas == Some(0)
            && label.as_deref() == Some("drift")
            && svc_label.as_deref() == Some("clustered-operator")
            && ports == [(Some("http".to_string()), 8080)])
    })
    .await?;
    assert!(events_about(&events, "drift", "Scaled").await?.is_empty(), "drift repair announced as a scale");

    // Repaired once: the operator does not keep rewriting what matches.
    let writes = operator.metrics.child_writes.get();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(operator.metrics.child_writes.get(), writes, "children rewritten while nothing changed");

    // A deleted child comes back at once, not at the next resync.
    kubectl(&["delete", "poddisruptionbudget/drift"])?;
    wait_for(Duration::from_secs(30), "PodDisruptionBudget re-created", || async {
        Ok(pdbs.get_opt("drift").await?.is_some())
    })
    .await?;

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

/// One broken ClusteredService and what its status must say.
struct Case {
    csvc: ClusteredService,
    reason: &'static str,
    /// The status is `Degraded=True`, except for `NoCpuLimit`.
    degraded: bool,
    /// Part of the underlying message the condition must carry.
    message: &'static str,
}

#[tokio::test]
async fn status_explains_every_missing_pod_and_reconcile_error() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("op-truth").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    let app = "/spec/template/spec/containers/0";

    let cases = [
        Case {
            csvc: csvc("no-image", 1, |v| {
                v.pointer_mut(app).expect("app")["image"] = "clustered.dev/no-such:dev".into()
            }),
            reason: "ImagePullFailed",
            degraded: true,
            message: "clustered.dev/no-such:dev",
        },
        Case {
            csvc: csvc("no-room", 1, |v| {
                v.pointer_mut(app).expect("app")["resources"] = serde_json::json!({ "limits": { "cpu": "64" } })
            }),
            reason: "Unschedulable",
            degraded: true,
            message: "Insufficient cpu",
        },
        Case {
            csvc: csvc("forbidden", 1, |v| {
                v.pointer_mut(app).expect("app").as_object_mut().expect("object").remove("securityContext");
            }),
            reason: "PodCreationFailed",
            degraded: true,
            message: "PodSecurity",
        },
        Case {
            csvc: csvc("no-binary", 1, |v| {
                v.pointer_mut(app).expect("app")["command"] = serde_json::json!(["/no/such/binary"])
            }),
            reason: "ContainerCrashLoop",
            degraded: true,
            message: r#"cannot run "/no/such/binary""#,
        },
        Case {
            // A worker that outgrows the container's 128Mi: the kernel
            // kills the worker, the container lives on.
            csvc: csvc("worker-oom", 1, |v| {
                v.pointer_mut(app).expect("app")["command"] = serde_json::json!([
                    "node",
                    "-e",
                    "const h = []; setInterval(() => h.push(Buffer.alloc(8 << 20, 1)), 20)"
                ])
            }),
            reason: "OOMKilled",
            degraded: true,
            message: "worker 0: OOM killed",
        },
        Case {
            // The CRD lets the pod template through; the Deployment's
            // validation refuses it.
            csvc: csvc("refused", 0, |v| v["spec"]["template"]["spec"]["restartPolicy"] = "Never".into()),
            reason: "ReconcileError",
            degraded: true,
            message: "restartPolicy",
        },
        Case {
            csvc: csvc("no-limit", 1, |v| {
                v["spec"]["workers"] = serde_json::json!({ "count": "auto" });
                v.pointer_mut(app).expect("app")["resources"] = serde_json::json!({ "requests": { "cpu": "20m" } });
            }),
            reason: "NoCpuLimit",
            degraded: false,
            message: "node's CPU count",
        },
    ];
    for case in &cases {
        csvcs.create(&PostParams::default(), &case.csvc).await?;
    }
    let started = std::time::Instant::now();
    try_join_all(cases.iter().map(|case| {
        let (csvcs, events) = (csvcs.clone(), events.clone());
        let name = case.csvc.metadata.name.clone().unwrap_or_default();
        async move {
            let what = format!("{name}: Degraded reason {} with an Event", case.reason);
            wait_for(Duration::from_secs(60), &what, || async {
                let current = csvcs.get(&name).await?;
                let condition = degraded(&current);
                let shown = condition.is_some_and(|c| {
                    c.reason == case.reason
                        && c.status == if case.degraded { "True" } else { "False" }
                        && c.message.contains(case.message)
                });
                if !shown {
                    // Said if the wait times out.
                    let seen = condition.map(|c| format!("{} {}: {}", c.status, c.reason, c.message));
                    anyhow::bail!("Degraded is {seen:?}");
                }
                Ok(!events_about(&events, &name, case.reason).await?.is_empty())
            })
            .await
        }
    }))
    .await?;
    let took = started.elapsed();

    // The causes persist: no false recovery, the reasons stay, and no child
    // that matches is rewritten meanwhile.
    let writes = operator.metrics.child_writes.get();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(operator.metrics.child_writes.get(), writes, "children rewritten while nothing changed");
    for case in &cases {
        let name = case.csvc.metadata.name.clone().unwrap_or_default();
        let current = csvcs.get(&name).await?;
        assert_eq!(degraded(&current).map(|c| c.reason.as_str()), Some(case.reason), "{name}");
        assert!(events_about(&events, &name, "Recovered").await?.is_empty(), "{name} announced as recovered");
    }

    // Fixed, the refused one recovers.
    let fix = serde_json::json!({ "spec": { "template": { "spec": { "restartPolicy": null } } } });
    csvcs.patch("refused", &PatchParams::default(), &Patch::Merge(&fix)).await?;
    wait_for(Duration::from_secs(30), "refused: recovered", || async {
        let current = csvcs.get("refused").await?;
        Ok(degraded(&current).is_some_and(|c| c.status == "False")
            && !events_about(&events, "refused", "Recovered").await?.is_empty())
    })
    .await?;
    assert!(took < Duration::from_secs(60), "every cause shown within {took:?}");

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}
