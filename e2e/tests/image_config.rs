//! Pod templates as users write them: the app container sets no `command`,
//! so the operator reads the image's ENTRYPOINT/CMD from the local cluster's
//! registries (`e2e/cluster/up` runs them; `e2e/cluster/images` pushes the
//! images) and the kubelet pulls the pinned digest from there.

use std::time::Duration;

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus, WorkerState};
use clustered_e2e::{Cluster, Operator, auth_registry_credentials, registries, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

const POD_START: Duration = Duration::from_secs(180);

/// A ClusteredService of `image` with a template that sets no command.
fn from_image(name: &str, image: &str, replicas: i32, pull_secret: Option<&str>) -> ClusteredService {
    let secrets: Vec<serde_json::Value> = pull_secret.map(|s| serde_json::json!({ "name": s })).into_iter().collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "clustered.dev/v1alpha1",
        "kind": "ClusteredService",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            // Explicit: these tests are about the image's command, not
            // which port mode `auto` settles on.
            "portMode": "proxy",
            "workers": { "count": 2 },
            "healthCheck": { "path": "/healthz", "periodSeconds": 1, "timeoutSeconds": 1 },
            "shutdown": { "drainTimeoutSeconds": 1 },
            "template": { "spec": {
                "imagePullSecrets": secrets,
                "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
                "containers": [{
                    "name": "app",
                    "image": image,
                    "resources": { "requests": { "cpu": "50m", "memory": "32Mi" }, "limits": { "cpu": "1", "memory": "128Mi" } },
                    "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } }
                }]
            }}
        }
    }))
    .expect("valid ClusteredService")
}

fn registry() -> String {
    registries()[0].clone()
}

fn auth_registry() -> String {
    registries()[1].clone()
}

/// The app container of the Deployment named `name`.
async fn app_of(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<Option<Container>> {
    Ok(deployments
        .get_opt(name)
        .await?
        .and_then(|d| d.spec?.template.spec?.containers.into_iter().find(|c| c.name == "app")))
}

fn workers_ready(status: &ClusteredServiceStatus, want: usize) -> bool {
    status.ready_replicas >= 1
        && status.instances.iter().any(|i| {
            i.workers.len() == want && i.workers.iter().all(|w| w.state == WorkerState::Ready && w.pid.is_some())
        })
}

async fn wait_workers_ready(csvcs: &Api<ClusteredService>, name: &str) -> anyhow::Result<()> {
    wait_for(POD_START, "a pod with 2 ready workers", || async {
        Ok(csvcs.get(name).await?.status.is_some_and(|s| workers_ready(&s, 2)))
    })
    .await
}

fn degraded(status: Option<&ClusteredServiceStatus>) -> Option<(String, String)> {
    let c = status?.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True")?;
    Some((c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn an_image_s_entrypoint_and_cmd_run_under_clusterd_from_the_registry() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("img-plain").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);

    // ENTRYPOINT /usr/bin/node, CMD /app/server.js (e2e/cluster/images).
    let image = format!("{}/clustered/demo-app:dev", registry());
    csvcs.create(&PostParams::default(), &from_image("plain", &image, 1, None)).await?;
    wait_workers_ready(&csvcs, "plain").await?;
    let app = app_of(&deployments, "plain").await?.expect("app container");
    let pinned = app.image.clone().unwrap_or_default();
    assert!(pinned.starts_with(&format!("{image}@sha256:")), "image pinned to its digest: {pinned}");
    let command = app.command.clone().unwrap_or_default();
    let sep = command.iter().position(|a| a == "--").expect("clusterd's -- separator");
    assert_eq!(&command[sep + 1..], ["/usr/bin/node"], "ENTRYPOINT after clusterd's flags: {command:?}");
    assert_eq!(app.args.as_deref(), Some(&["/app/server.js".to_string()][..]), "CMD as args");

    // The shell-script ENTRYPOINT image: the script execs the CMD per worker.
    let script = format!("{}/clustered/demo-app-entrypoint:dev", registry());
    csvcs.create(&PostParams::default(), &from_image("script", &script, 1, None)).await?;
    wait_workers_ready(&csvcs, "script").await?;
    let app = app_of(&deployments, "script").await?.expect("app container");
    let command = app.command.unwrap_or_default();
    assert_eq!(command.last().map(String::as_str), Some("/usr/local/bin/docker-entrypoint.sh"));
    assert_eq!(app.args.as_deref(), Some(&["node".to_string(), "/app/server.js".to_string()][..]));

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn a_private_image_needs_its_pull_secret_and_says_so() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("img-secret").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);

    let image = format!("{}/clustered/private-app:dev", auth_registry());
    // The template names a secret that does not exist yet: the lookup is
    // anonymous, refused, and the status says to add a pull secret.
    csvcs.create(&PostParams::default(), &from_image("private", &image, 1, Some("registry-login"))).await?;
    wait_for(Duration::from_secs(60), "Degraded: ImageConfigUnavailable", || async {
        Ok(degraded(csvcs.get("private").await?.status.as_ref()).is_some_and(|(r, _)| r == "ImageConfigUnavailable"))
    })
    .await?;
    let (_, message) = degraded(csvcs.get("private").await?.status.as_ref()).expect("degraded");
    assert!(message.contains("anonymous") && message.contains("add a pull secret"), "{message}");
    assert!(message.contains("set command"), "{message}");

    // The secret appears: the retry (with backoff) resolves, the kubelet
    // pulls with the same secret, the workers run.
    let (user, password) = auth_registry_credentials()?;
    cluster.kubectl(&[
        "-n",
        &ns,
        "create",
        "secret",
        "docker-registry",
        "registry-login",
        &format!("--docker-server={}", auth_registry()),
        &format!("--docker-username={user}"),
        &format!("--docker-password={password}"),
    ])?;
    wait_workers_ready(&csvcs, "private").await?;
    assert_eq!(degraded(csvcs.get("private").await?.status.as_ref()), None);

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn a_missing_image_is_image_config_unavailable_with_an_event() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("img-missing").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);

    let image = format!("{}/clustered/no-such-image:dev", registry());
    csvcs.create(&PostParams::default(), &from_image("missing", &image, 1, None)).await?;
    wait_for(Duration::from_secs(60), "Degraded: ImageConfigUnavailable", || async {
        Ok(degraded(csvcs.get("missing").await?.status.as_ref()).is_some_and(|(r, _)| r == "ImageConfigUnavailable"))
    })
    .await?;
    let (_, message) = degraded(csvcs.get("missing").await?.status.as_ref()).expect("degraded");
    assert!(message.contains(&image) && message.contains("no such image"), "{message}");
    assert!(message.contains("check the image name and tag") && message.contains("set command"), "{message}");
    // Nothing runs an image that could not be resolved.
    assert!(deployments.get_opt("missing").await?.is_none());
    // The Service is still made: one bad template does not stop the rest.
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    assert!(services.get_opt("missing").await?.is_some());

    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    wait_for(Duration::from_secs(30), "an ImageConfigUnavailable Event", || async {
        Ok(events.list(&ListParams::default()).await?.items.iter().any(|e| {
            e.reason.as_deref() == Some("ImageConfigUnavailable")
                && e.note.as_deref().is_some_and(|n| n.contains("no such image"))
        }))
    })
    .await?;

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

#[tokio::test]
async fn a_moved_tag_is_picked_up_on_the_next_spec_change_not_silently() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let ns = cluster.namespace("img-moved").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);

    // A tag of this test's own, pushed twice with different images.
    let image = format!("{}/clustered/moving-{}:dev", registry(), std::process::id());
    let push = |tarball: &str| -> anyhow::Result<String> {
        let tar = images_dir().join(tarball);
        let out = std::process::Command::new(cluster.bin_dir.join("ocipush"))
            .args(["--plain-http", &tar.to_string_lossy(), &image])
            .output()?;
        anyhow::ensure!(out.status.success(), "ocipush: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8(out.stdout)?;
        Ok(line.split_whitespace().nth(1).unwrap_or_default().to_string())
    };
    let first = push("demo-app_dev.tar")?;

    // No pods needed: the Deployment's pinned image is what is checked.
    csvcs.create(&PostParams::default(), &from_image("moving", &image, 0, None)).await?;
    let pinned_to = |digest: String| {
        let deployments = deployments.clone();
        let image = image.clone();
        async move { Ok(app_of(&deployments, "moving").await?.and_then(|a| a.image) == Some(format!("{image}@{digest}"))) }
    };
    wait_for(Duration::from_secs(30), "Deployment pinned to the first digest", || pinned_to(first.clone())).await?;

    let second = push("toolbox_dev.tar")?;
    assert_ne!(first, second);
    // Reconciles without a spec change (a deleted child is restored) keep
    // the digest the spec was resolved to.
    services.delete("moving", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(30), "Service restored", || async { Ok(services.get_opt("moving").await?.is_some()) })
        .await?;
    assert!(pinned_to(first.clone()).await?, "a moved tag must not change the pods without a spec change");

    // A spec change resolves the tag again.
    let patch = serde_json::json!({ "spec": { "workers": { "count": 3 } } });
    csvcs.patch("moving", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for(Duration::from_secs(30), "Deployment pinned to the new digest", || pinned_to(second.clone())).await?;

    operator.stop().await;
    cluster.delete_namespace(&ns).await
}

/// Where `e2e/cluster/images` leaves its tarballs.
fn images_dir() -> std::path::PathBuf {
    let cache = std::env::var("CLUSTERED_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/clustered", std::env::var("HOME").unwrap_or_default()));
    std::path::PathBuf::from(cache).join("images")
}
