//! This operator against the previous release's CRD, as after a `helm
//! upgrade` (Helm installs CRDs but never upgrades them). Its own binary:
//! the older CRD is served cluster-wide while it runs, and this build's is
//! put back at the end.

use std::time::Duration;

use clustered_api::v1alpha1::ClusteredService;
use clustered_e2e::{Cluster, Operator, demo_service, repo_root, wait_for};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, ListParams, PostParams};

/// Under an older CRD the API server drops the status fields it does not
/// know. The status then never equals what the operator computes; before
/// this was handled, every reconcile (every 2 s here) wrote it again. Now
/// the operator says what is wrong, once, and writes only real changes.
#[tokio::test]
async fn an_older_crd_is_named_and_costs_no_write_storm() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    install_previous_crd(&cluster).await?;
    let result = under_previous_crd(&cluster).await;
    cluster.install_crd().await?;
    result
}

async fn under_previous_crd(cluster: &Cluster) -> anyhow::Result<()> {
    let ns = cluster.namespace("crd-skew").await?;
    let operator = Operator::start(cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    csvcs.create(&PostParams::default(), &demo_service("old-crd", |_| {})).await?;
    wait_for(Duration::from_secs(120), "Available, with its worker reported", || async {
        let status = csvcs.get("old-crd").await?.status.unwrap_or_default();
        Ok(status.ready_replicas == 1
            && status.workers.ready == 1
            && status.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True"))
    })
    .await?;
    let stored = serde_json::to_value(csvcs.get("old-crd").await?.status)?;
    assert!(stored.get("clusterd").is_none(), "the previous CRD stores status.clusterd: {stored}");

    // Settled: nothing changes now but the workers' CPU and memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = operator.metrics.status_writes.get();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let writes = operator.metrics.status_writes.get() - before;
    operator.stop().await;
    assert!(writes <= 2, "{writes} status writes in 20 s of a settled service (a reconcile every 2 s)");

    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    let outdated: Vec<Event> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("CRDOutdated"))
        .collect();
    assert_eq!(outdated.len(), 1, "one CRDOutdated Event: {outdated:?}");
    let note = outdated[0].message.clone().unwrap_or_default();
    assert!(note.contains("status.clusterd") && note.contains("kubectl apply"), "{note}");
    cluster.delete_namespace(&ns).await
}

/// The CRD of the previous release (`crds/tests/fixtures/crd-0.1.0.yaml`).
async fn install_previous_crd(cluster: &Cluster) -> anyhow::Result<()> {
    cluster.apply_crd(&repo_root().join("crds/tests/fixtures/crd-0.1.0.yaml")).await?;
    let api: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    let name = ClusteredService::crd_name();
    wait_for(Duration::from_secs(30), "the previous CRD served", || async {
        let served = serde_json::to_string(&api.get(name).await?.spec)?;
        Ok(!served.contains("clusterdVersion"))
    })
    .await?;
    // The API server swaps its handler for the new schema a moment later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}
