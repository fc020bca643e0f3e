//! The app image's config, read from its registry when the app container
//! sets no command (it then runs the image's ENTRYPOINT/CMD).

use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use tracing::info;

use super::Context;
use crate::image::{self, ResolvedImage, credentials, registry::Resolver};
use crate::resources;

/// The app image's digest and config when the app container sets no
/// command (`None` when it does). Resolved once per generation of the spec:
/// the same spec keeps its digest (across operator restarts too, read back
/// from the Deployment), a changed spec looks the tag up again. The error
/// is the Degraded message.
pub(super) async fn resolve_app_image(
    csvc: &ClusteredService,
    ns: &str,
    ctx: &Context,
) -> Result<Option<ResolvedImage>, String> {
    let Some(app) = resources::app_container(csvc) else { return Ok(None) };
    if app.command.as_ref().is_some_and(|c| !c.is_empty()) {
        return Ok(None);
    }
    let Some(image) = app.image.as_deref().filter(|i| !i.is_empty()) else {
        return Err(format!("the app container {:?} sets neither image nor command: set its image", app.name));
    };
    let generation = csvc.metadata.generation;
    let remembered = ctx.memory.remember(csvc, |m| m.image.clone());
    if let Some((g, i, resolved)) = remembered
        && g == generation
        && i == image
    {
        return Ok(Some(resolved));
    }
    // After a restart: the digest the live Deployment is pinned to, if it
    // was resolved for this very spec (the status says which spec it saw).
    let same_spec = csvc.status.as_ref().and_then(|s| s.observed_generation) == generation;
    let live = ctx.stores.deployments.get(&ObjectRef::new(&csvc.name_any()).within(ns));
    let live_image = live.as_ref().and_then(|d| {
        d.spec.as_ref()?.template.spec.as_ref()?.containers.iter().find(|c| c.name == app.name)?.image.clone()
    });
    let known = live_image.as_deref().filter(|_| same_spec).and_then(|live| image::pinned_digest(image, live));

    let registry = Resolver::registry_of(image)
        .map_err(|e| image::unavailable_message(&app.name, image, "its registry", &e, &[]))?;
    let pod = csvc.spec.template.spec.as_ref();
    let (secrets, names) = pull_secrets(ctx, ns, pod).await?;
    let credentials = credentials::for_registry(&secrets, &registry);
    let platform = image::platform_for(pod.and_then(|p| p.node_selector.as_ref()), &ctx.platform);
    match ctx.images.resolve(image, known, credentials, &platform).await {
        Ok(resolved) => {
            if known.is_none() {
                info!(%ns, name = %csvc.name_any(), image, digest = %resolved.digest, %platform, "resolved the app image");
            }
            ctx.memory.remember(csvc, |m| m.image = Some((generation, image.to_string(), resolved.clone())));
            Ok(Some(resolved))
        }
        Err(e) => Err(image::unavailable_message(&app.name, image, &registry, &e, &names)),
    }
}

/// The registry credentials of the pod's image pull secrets, then those of
/// its service account, as the kubelet uses them, with the secrets' names.
/// A secret that does not exist is skipped, as the kubelet does; one that
/// cannot be read or parsed is an error saying which.
async fn pull_secrets(
    ctx: &Context,
    ns: &str,
    pod: Option<&k8s_openapi::api::core::v1::PodSpec>,
) -> Result<(Vec<std::collections::BTreeMap<String, credentials::Credentials>>, Vec<String>), String> {
    let mut names: Vec<String> =
        pod.and_then(|p| p.image_pull_secrets.as_ref()).into_iter().flatten().map(|r| r.name.clone()).collect();
    let account = pod
        .and_then(|p| p.service_account_name.clone().or_else(|| p.service_account.clone()))
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    match accounts.get_opt(&account).await {
        Ok(sa) => names.extend(sa.and_then(|sa| sa.image_pull_secrets).into_iter().flatten().map(|r| r.name)),
        Err(e) => return Err(format!("cannot read the service account {account:?} for its image pull secrets: {e}")),
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut secrets = Vec::new();
    for name in &names {
        let secret = match api.get_opt(name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => continue,
            Err(e) => return Err(format!("cannot read the image pull secret {name:?}: {e}")),
        };
        let data = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        let entries = credentials::from_secret(secret.type_.as_deref(), &data)
            .map_err(|why| format!("the image pull secret {name:?} cannot be used: {why}"))?;
        secrets.push(entries);
    }
    Ok((secrets, names))
}
