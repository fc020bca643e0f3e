//! One reconcile: observe (the stores, each pod's clusterd), decide (the
//! desired children, the status: pure functions), act (write what differs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tracing::warn;

use super::app_image::resolve_app_image;
use super::children::{Ensured, ensure, scaled_from};
use super::status_writes::write_status;
use super::{Context, Error};
use crate::metrics::ResultLabel;
use crate::resources;
use crate::status::{self, Observed, Problem, Report};
use crate::updates::{self, Template};
use crate::{autoscale, endpoints};

/// How soon to look again when the cache was behind the API server.
const STALE_RETRY: Duration = Duration::from_secs(1);

/// How soon a service whose clusterd update waits looks at the wave again.
const TURN_RECHECK: Duration = Duration::from_secs(5);

/// Longest a reconcile may take: a few API requests and a probe of each
/// pod's clusterd (each bounded by the probe timeout).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) async fn reconcile(csvc: Arc<ClusteredService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles_in_flight.inc();
    // A hung request must not stall this object for good: the retry sends
    // new requests.
    let result = tokio::time::timeout(RECONCILE_TIMEOUT, reconcile_inner(&csvc, &ctx))
        .await
        .unwrap_or(Err(Error::Timeout(RECONCILE_TIMEOUT)));
    ctx.metrics.observe_duration(started.elapsed());
    ctx.metrics.reconciles_in_flight.dec();
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&ResultLabel { result: outcome }).inc();
    if result.is_ok() {
        ctx.memory.remember(&csvc, |m| m.failures = 0);
    }
    result
}

async fn reconcile_inner(csvc: &ClusteredService, ctx: &Context) -> Result<Action, Error> {
    // The status is computed from every store: one that has not been
    // listed yet would show pods or the Deployment as missing.
    if !ctx.synced.wait().await {
        return Ok(Action::await_change());
    }
    if csvc.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let ns = csvc.namespace().ok_or(Error::NoNamespace)?;
    let name = csvc.name_any();
    let stores = &ctx.stores;

    let mut problem = None;
    let mut results = Vec::new();
    // An app container without command runs its image's ENTRYPOINT/CMD; if
    // they cannot be read, the Deployment stays as it is.
    let (image, image_failure) = match resolve_app_image(csvc, &ns, ctx).await {
        Ok(image) => (image, None),
        Err(why) => {
            warn!(%ns, %name, %why, "image config unavailable");
            problem = Some(Problem::ImageConfigUnavailable(why.clone()));
            (None, Some(why))
        }
    };
    let previous = stores.deployments.get(&ObjectRef::new(&name).within(&ns));
    let target = ctx.settings.clusterd_image.as_str();
    let template = updates::template(csvc, previous.as_deref(), target, &ctx.settings.clusterd_updates, || {
        updates::Wave::observe(stores.deployments.state().iter().map(AsRef::as_ref), target)
    });
    match resources::deployment_for(csvc, &ctx.settings, image.as_ref()) {
        _ if image_failure.is_some() => {}
        Ok(mut deployment) => {
            if let (Template::KeepLive(_), Some(live)) = (&template, &previous) {
                keep_live_template(&mut deployment, live);
            }
            let result = ensure(ctx, csvc, &stores.deployments, &ns, &name, Some(deployment)).await;
            if let (Ok(Ensured::Written), Some(previous)) = (&result, previous) {
                if let Some(from) = scaled_from(&previous, csvc.spec.replicas) {
                    let note = format!("pods {from} → {}", csvc.spec.replicas);
                    ctx.event(csvc, EventType::Normal, "Scaled", note).await;
                }
                if let (Template::Render, Some(old)) = (&template, updates::clusterd_image(&previous))
                    && old != target
                {
                    let note = format!("pods roll onto clusterd {target} (from {old})");
                    ctx.event(csvc, EventType::Normal, "ClusterdUpdate", note).await;
                }
            }
            results.push(("Deployment", result));
        }
        Err(e) => problem = Some(Problem::InvalidSpec(e.to_string())),
    }
    let service = Some(resources::service(csvc));
    results.push(("Service", ensure(ctx, csvc, &stores.services, &ns, &name, service).await));
    let pdb = Some(resources::pod_disruption_budget(csvc));
    results.push(("PodDisruptionBudget", ensure(ctx, csvc, &stores.pdbs, &ns, &name, pdb).await));
    let hpa = resources::hpa(csvc);
    results.push(("HorizontalPodAutoscaler", ensure(ctx, csvc, &stores.hpas, &ns, &name, hpa).await));
    let stale = results.iter().any(|(_, r)| matches!(r, Ok(Ensured::Stale)));
    if let Some(why) = results.iter().find_map(|(_, r)| match r {
        Ok(Ensured::Contested(why)) => Some(why.clone()),
        _ => None,
    }) {
        problem = problem.or(Some(Problem::ContestedByAnotherWriter(why)));
    }
    let refused = results.into_iter().find_map(|(kind, r)| Some((kind, r.err()?)));
    if let Some((kind, e)) = &refused {
        warn!(%ns, %name, %kind, error = %e, "could not apply a child");
        let why = format!("applying the {kind}: {}", api_message(e));
        problem = problem.or(Some(Problem::ReconcileError(why)));
    }

    let key = ObjectRef::from(csvc);
    let pods: Vec<Arc<Pod>> = stores.pods.get(&key);
    let askable: Vec<&Pod> =
        pods.iter().map(AsRef::as_ref).filter(|p| p.metadata.deletion_timestamp.is_none() && has_started(p)).collect();
    let admin_port = u16::try_from(csvc.spec.admin_port).unwrap_or(clustered_api::clusterd::defaults::ADMIN_PORT);
    let reports = ctx.prober.reports(&askable, admin_port).await;
    ctx.metrics.status_probes.inc_by(reports.len() as u64);
    let failed = reports.values().filter(|r| r.is_err()).count();
    ctx.metrics.status_probe_failures.inc_by(failed as u64);

    let deployment = stores.deployments.get(&ObjectRef::new(&name).within(&ns));
    let slices = stores.endpoint_slices.get(&key);
    let serving = endpoints::serving_pods(slices.iter().map(AsRef::as_ref));
    let observed = Observed {
        deployment: deployment.as_deref(),
        pods: pods.iter().map(AsRef::as_ref).collect(),
        reports: &reports,
        problem,
        serving: &serving,
        clusterd_update: match &template {
            Template::KeepLive(held) => Some((target, held)),
            Template::Render => None,
        },
    };
    let now = Timestamp::now();
    let mut new_status = status::compute(csvc, &observed, now);
    let hpa = stores.hpas.get(&ObjectRef::new(&name).within(&ns));
    new_status.autoscaling = autoscale::reconcile(ctx, csvc, &new_status, &reports, hpa.as_deref()).await;
    let wait = write_status(csvc, &ns, new_status, now, ctx).await?;
    // The failure is in the status now; the error drives the backoff.
    if let Some((_, e)) = refused {
        return Err(e);
    }
    if let Some(why) = image_failure {
        return Err(Error::ImageConfig(why));
    }
    if stale {
        return Ok(Action::requeue(STALE_RETRY));
    }
    if let Some(wait) = wait {
        return Ok(Action::requeue(wait));
    }
    // Worker states change without any Kubernetes event: ask clusterd again,
    // rarely once every pod tells of its changes. Without running pods,
    // watch events trigger every reconcile that matters; the heartbeat only
    // keeps `observedAt` current.
    let heartbeat = ctx.heartbeat(csvc).until_next(now);
    let next = match next_ask(&reports, ctx.status_interval, ctx.settled_status_interval) {
        Some(ask) => ask.min(heartbeat),
        None => heartbeat,
    };
    // The concurrency autoscaler samples clusterd at its own pace.
    let next = if autoscale::scales_on_concurrency(csvc) { next.min(autoscale::SAMPLE_INTERVAL) } else { next };
    // Nothing about a waiting service changes when its turn comes.
    let next = if matches!(template, Template::KeepLive(_)) { next.min(TURN_RECHECK) } else { next };
    Ok(Action::requeue(next))
}

/// When the pods asked are asked again if nothing else happens: at the
/// settled interval once each tells of its changes (a change then comes
/// with its word), at the regular one while any does not (an older
/// clusterd, one whose words do not arrive, one that did not answer).
/// `None` without pods to ask.
fn next_ask(reports: &BTreeMap<String, Report>, regular: Duration, settled: Duration) -> Option<Duration> {
    if reports.is_empty() {
        return None;
    }
    let tells = |report: &Report| report.as_ref().is_ok_and(|status| status.notifies.is_some());
    Some(if reports.values().all(tells) { settled.max(regular) } else { regular })
}

/// The pods stay as they are while the clusterd update waits: the live pod
/// template replaces the rendered one (everything else is the spec's).
fn keep_live_template(deployment: &mut Deployment, live: &Deployment) {
    if let (Some(desired), Some(live)) = (deployment.spec.as_mut(), live.spec.as_ref()) {
        desired.template = live.template.clone();
    }
}

/// The API server's own message for a refused request.
fn api_message(e: &Error) -> String {
    match e {
        Error::Kube(kube::Error::Api(r)) => r.message.clone(),
        e => e.to_string(),
    }
}

/// A pod whose containers have started has an IP and, soon, a clusterd.
fn has_started(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| s.pod_ip.is_some() && s.phase.as_deref() == Some("Running"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustered_api::wire::ClusterdStatus;

    const REGULAR: Duration = Duration::from_secs(5);
    const SETTLED: Duration = Duration::from_secs(60);

    fn pods(reports: &[Report]) -> BTreeMap<String, Report> {
        reports.iter().enumerate().map(|(i, r)| (format!("pod-{i}"), r.clone())).collect()
    }

    #[test]
    fn pods_that_tell_of_their_changes_are_asked_rarely_all_others_often() {
        let telling = Ok(ClusterdStatus { notifies: Some("10.0.0.9:8080".into()), ..Default::default() });
        let silent = Ok(ClusterdStatus::default());
        let next = |reports: &[Report]| next_ask(&pods(reports), REGULAR, SETTLED);
        assert_eq!(next(&[telling.clone(), telling.clone()]), Some(SETTLED));
        assert_eq!(next(&[telling.clone(), silent]), Some(REGULAR), "an older clusterd, or unreached");
        assert_eq!(next(&[telling, Err("clusterd unreachable".into())]), Some(REGULAR));
        assert_eq!(next(&[]), None);
    }
}
