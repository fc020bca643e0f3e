//! The operator through restarts of the control plane: kube-apiserver and
//! etcd are killed (SIGKILL) mid-test and restarted by `e2e/cluster/up`; a
//! spec change made as soon as the API server is back must be applied
//! within 15 s. The operator runs in this process with the client and
//! watches its binary uses.
//!
//! These tests take the whole cluster down for a while: they run one at a
//! time (a lock in this binary), and no other test binary runs beside them
//! under `cargo test`. By hand, on a shared cluster, hold its lock with
//! `-o`, or the restarted etcd and kube-apiserver inherit it and hold it
//! for ever: `flock -x -o /tmp/clustered-cluster.lock cargo test -p clustered-e2e --test recovery`.

use std::time::Duration;

use clustered_api::v1alpha1::ClusteredService;
use clustered_e2e::{Cluster, Operator, demo_service, wait_for};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// The goal: a spec change applied this soon after the API server is back.
const APPLIED_WITHIN: Duration = Duration::from_secs(15);

/// How long the component stays down: longer than a watch's first few
/// retries, so that they back off.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// One restart at a time: each takes the whole API down.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn service(name: &str) -> ClusteredService {
    demo_service(name, |v| v["spec"]["replicas"] = 0.into())
}

#[tokio::test]
async fn a_spec_change_is_applied_within_15_s_of_a_kube_apiserver_restart() -> anyhow::Result<()> {
    spec_change_after_restart_of("kube-apiserver", "rec-apiserver").await
}

#[tokio::test]
async fn a_spec_change_is_applied_within_15_s_of_an_etcd_restart() -> anyhow::Result<()> {
    spec_change_after_restart_of("etcd", "rec-etcd").await
}

async fn spec_change_after_restart_of(component: &str, test: &str) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace(test).await?;
    let operator = Operator::start(&cluster, &ns).await?;
    // The test's own requests must not sleep in the client's retries either.
    let client = clustered_operator::watches::client(cluster.config().await?)?;
    let csvcs: Api<ClusteredService> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);

    csvcs.create(&PostParams::default(), &service("web")).await?;
    let applied = |port: i32| {
        let (csvcs, services) = (csvcs.clone(), services.clone());
        move || {
            let (csvcs, services) = (csvcs.clone(), services.clone());
            async move {
                let csvc = csvcs.get("web").await?;
                let status_current = csvc.status.as_ref().is_some_and(|s| {
                    s.observed_generation.is_some() && s.observed_generation == csvc.metadata.generation
                });
                let svc_port = services.get("web").await?.spec.and_then(|s| s.ports).map(|p| p[0].port);
                Ok(status_current && svc_port == Some(port))
            }
        }
    };
    wait_for(Duration::from_secs(60), "children and status of the first generation", applied(8080)).await?;

    let (back, restore) = cluster.restart_component(component, DOWN_FOR).await?;
    eprintln!("{component} restarted; the API server answers /readyz again");
    let outcome = async {
        // The CRD's endpoint may be served a moment after /readyz.
        wait_for(APPLIED_WITHIN, "the spec change accepted", || async {
            let patch = serde_json::json!({ "spec": { "port": 9090 } });
            csvcs.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await?;
            Ok(true)
        })
        .await?;
        // CLUSTERED_RECOVERY_WAIT_SECS waits longer, to measure a slow recovery.
        let wait = std::env::var("CLUSTERED_RECOVERY_WAIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(APPLIED_WITHIN, Duration::from_secs);
        wait_for(wait.saturating_sub(back.elapsed()), "the spec change applied and in status", applied(9090)).await?;
        let took = back.elapsed();
        eprintln!("spec change applied {took:?} after the API server was back ({component} restart)");
        anyhow::ensure!(took <= APPLIED_WITHIN, "applied after {took:?}, more than {APPLIED_WITHIN:?}");
        anyhow::Ok(())
    }
    .await;
    // Whatever happened, the cluster is restored before the next test.
    restore.finished().await?;
    if outcome.is_err() {
        eprintln!("failing watches: {:?}", operator.watches.failing(std::time::Instant::now()));
    }
    outcome?;
    operator.stop().await;
    cluster.delete_namespace(&ns).await
}
