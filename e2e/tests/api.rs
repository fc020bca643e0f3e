//! The CRD against a real kube-apiserver: accepted, served with its
//! printer columns, scale subresource and `kubectl explain` text; every
//! invalid fixture rejected with the message it names.

use std::path::PathBuf;

use clustered_api::v1alpha1::ClusteredService;
use clustered_e2e::{Cluster, repo_root};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};

fn fixture_files(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("crds/tests/fixtures").join(kind))
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
}

fn dynamic_api(cluster: &Cluster, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(cluster.client.clone(), ns, &ApiResource::erase::<ClusteredService>(&()))
}

fn read_object(path: &PathBuf) -> DynamicObject {
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("read")).expect("fixture is YAML of an object")
}

const DRY_RUN: PostParams = PostParams { dry_run: true, field_manager: None };

#[tokio::test]
async fn valid_fixtures_and_the_example_are_accepted() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("api-valid").await?;
    let api = dynamic_api(&cluster, &ns);
    let mut files = fixture_files("valid");
    files.push(repo_root().join("examples/clusteredservice.yaml"));
    for file in files {
        let created = api.create(&DRY_RUN, &read_object(&file)).await;
        let created = created.map_err(|e| anyhow::anyhow!("{} was rejected: {e}", file.display()))?;
        // Defaults come from the schema, so what the server stores parses
        // into the operator's types.
        let typed: ClusteredService = serde_json::from_value(serde_json::to_value(&created)?)?;
        assert!(typed.spec.port > 0);
    }
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn invalid_fixtures_are_rejected_with_their_messages() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("api-invalid").await?;
    let api = dynamic_api(&cluster, &ns);
    let mut wrong = Vec::new();
    let files = fixture_files("invalid");
    assert!(files.len() >= 10, "the invalid fixtures are missing");
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("expect line");
        match api.create(&DRY_RUN, &read_object(&file)).await {
            Ok(_) => wrong.push(format!("{}: accepted, but must fail with {expect:?}", file.display())),
            Err(kube::Error::Api(status)) if status.message.contains(expect) => {}
            Err(e) => wrong.push(format!("{}: wanted {expect:?}, got: {e}", file.display())),
        }
    }
    cluster.delete_namespace(&ns).await?;
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    Ok(())
}

#[tokio::test]
async fn kubectl_sees_short_name_columns_explain_and_scale() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("api-kubectl").await?;
    let example = std::fs::read_to_string(repo_root().join("crds/tests/fixtures/valid/minimal.yaml"))?;
    cluster.kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], &example)?;

    let table = cluster.kubectl(&["get", "csvc", "-n", &ns])?;
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "WORKERS", "PORT", "MODE", "AGE", "OBSERVED"], "{table}");
    let wide = cluster.kubectl(&["get", "clusteredservices", "-n", &ns, "-o", "wide"])?;
    for column in ["PORT", "DESIRED", "AVAILABLE", "REASON"] {
        assert!(wide.lines().next().unwrap_or_default().contains(column), "{wide}");
    }

    let explain = cluster.kubectl(&["explain", "clusteredservice.spec.workers.count"])?;
    assert!(explain.contains("one worker per CPU"), "{explain}");

    cluster.kubectl(&["scale", "-n", &ns, "csvc/minimal", "--replicas=5"])?;
    let replicas = cluster.kubectl(&["get", "csvc/minimal", "-n", &ns, "-o", "jsonpath={.spec.replicas}"])?;
    assert_eq!(replicas, "5");
    let scale = cluster.kubectl(&[
        "get",
        "--raw",
        &format!("/apis/clustered.dev/v1alpha1/namespaces/{ns}/clusteredservices/minimal/scale"),
    ])?;
    let scale: serde_json::Value = serde_json::from_str(&scale)?;
    assert_eq!(scale["spec"]["replicas"], 5, "{scale}");

    cluster.delete_namespace(&ns).await
}

/// The operator's own use of the API (watches, server-side apply of the
/// status, dry-run replaces of its children, the scale subresource and
/// garbage collection through owner references) on this API server. Pods
/// need not run: on the floor tier there are no nodes.
#[tokio::test]
async fn the_operator_makes_children_and_status_on_this_api_server() -> anyhow::Result<()> {
    use clustered_e2e::{Operator, demo_service, wait_for};
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use std::time::Duration;

    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("api-operator").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(cluster.client.clone(), &ns);
    csvcs.create(&PostParams::default(), &demo_service("api", |v| v["spec"]["replicas"] = 0.into())).await?;

    wait_for(Duration::from_secs(60), "children, and a status saying ScaledToZero", || async {
        let status = csvcs.get("api").await?.status.unwrap_or_default();
        let scaled_to_zero = status.conditions.iter().any(|c| c.type_ == "Available" && c.reason == "ScaledToZero");
        Ok(deployments.get_opt("api").await?.is_some()
            && services.get_opt("api").await?.is_some()
            && pdbs.get_opt("api").await?.is_some()
            && scaled_to_zero
            && status.observed_generation == Some(1))
    })
    .await?;

    cluster.kubectl(&["scale", "-n", &ns, "csvc/api", "--replicas=1"])?;
    wait_for(Duration::from_secs(60), "the Deployment scaled with the ClusteredService", || async {
        Ok(deployments.get("api").await?.spec.and_then(|s| s.replicas) == Some(1))
    })
    .await?;

    csvcs.delete("api", &Default::default()).await?;
    wait_for(Duration::from_secs(60), "children garbage-collected", || async {
        Ok(deployments.get_opt("api").await?.is_none() && services.get_opt("api").await?.is_none())
    })
    .await?;
    operator.stop().await;
    cluster.delete_namespace(&ns).await
}
