//! An unmodified Node app (examples/app/plain.js: listen(PORT), nothing
//! else) on the local cluster with the default `portMode: auto`: clusterd
//! picks node mode (no hop), the status says so, and a rolling update
//! under load through the Service, on new and on kept-alive connections,
//! loses no request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clustered_api::v1alpha1::{ClusteredService, WorkerState};
use clustered_e2e::{Cluster, Operator, app_container, demo_service, load, wait_for};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};

const POD_START: Duration = Duration::from_secs(180);

/// The plain app, 2 pods × 2 workers, in the default port mode.
fn plain_app(name: &str) -> ClusteredService {
    demo_service(name, |v| {
        v["spec"].as_object_mut().expect("spec").remove("portMode");
        v["spec"]["replicas"] = 2.into();
        v["spec"]["workers"]["count"] = 2.into();
        v["spec"]["shutdown"]["drainTimeoutSeconds"] = 5.into();
        app_container(v)["command"] = serde_json::json!(["node", "/app/plain.js"]);
        app_container(v)["resources"]["limits"]["cpu"] = "2".into();
    })
}

#[tokio::test]
async fn an_unmodified_node_app_runs_without_a_hop_through_a_rolling_update() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("node-mode").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    csvcs.create(&PostParams::default(), &plain_app("plain")).await?;

    let all_ready = |s: &clustered_api::v1alpha1::ClusteredServiceStatus| {
        s.ready_replicas == 2
            && s.instances.len() == 2
            && s.instances
                .iter()
                .all(|i| i.workers.len() == 2 && i.workers.iter().all(|w| w.state == WorkerState::Ready))
    };
    wait_for(POD_START, "2 pods × 2 ready workers", || async {
        Ok(csvcs.get("plain").await?.status.as_ref().is_some_and(all_ready))
    })
    .await?;
    let status = csvcs.get("plain").await?.status.expect("status");
    assert_eq!(status.port_mode.as_deref(), Some("node"), "{status:?}");
    for instance in &status.instances {
        let reason = instance.port_mode_reason.as_deref().unwrap_or_default();
        assert!(reason.contains("a Node v") && reason.contains("no hop"), "{reason}");
    }
    let columns = cluster.kubectl(&["get", "csvc", "plain", "-n", &ns, "--no-headers"])?;
    assert!(columns.split_whitespace().any(|c| c == "node"), "the MODE column: {columns}");

    let ip = services.get("plain").await?.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    let url = format!("http://{ip}:8080/");
    let client = load::client();
    wait_for(Duration::from_secs(60), "the Service answers", || async { Ok(load::get(&client, &url).await.is_ok()) })
        .await?;
    let answer = load::get(&client, &url).await?;
    assert!(answer.worker.is_none(), "no proxy header: the worker answered the connection itself");

    // A spec change rolls every pod while 2 clients keep sending on new
    // connections and 4 on kept-alive ones (as an ingress controller does):
    // a stopping worker closes those after their in-flight request. (This
    // app answers at once, so at a worker's disconnect its kept-alive
    // connections are idle and Node ≥ 19 closes them, and hyper re-sends a
    // request that meets a pooled connection closed before it was written:
    // this passes without clusterd's drain preload too. The preload is what
    // saves requests on connections busy at the disconnect, tested with slow
    // requests in sidecar/tests/node_cluster.rs.)
    let stop = Arc::new(AtomicBool::new(false));
    let (load_url, flag) = (url.clone(), stop.clone());
    let generator = tokio::spawn(async move { load::run(&load_url, 2, 200_000, Duration::from_secs(300), flag).await });
    let (load_url, flag) = (url.clone(), stop.clone());
    let kept_alive =
        tokio::spawn(async move { load::run_keepalive(&load_url, 4, 200_000, Duration::from_secs(300), flag).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<String> = status.instances.iter().map(|i| i.pod.clone()).collect();
    let env = serde_json::json!([{ "op": "add", "path": "/spec/template/spec/containers/0/env",
        "value": [{ "name": "APP_VERSION", "value": "v2" }] }]);
    csvcs.patch("plain", &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(env)?)).await?;
    wait_for(POD_START, "every pod replaced and ready", || async {
        let status = csvcs.get("plain").await?.status;
        Ok(status.as_ref().is_some_and(|s| all_ready(s) && s.instances.iter().all(|i| !before.contains(&i.pod))))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let report = generator.await?;
    assert!(report.ok > 100, "{report:?}");
    assert_eq!(report.failed, 0, "failed requests during the rolling update: {:?}", report.errors);
    let report = kept_alive.await?;
    assert!(report.ok > 100, "{report:?}");
    assert_eq!(report.failed, 0, "failed requests on kept-alive connections: {:?}", report.errors);

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}
