//! The status written, at most once a second per ClusteredService and
//! only when it changed (or its heartbeat is due).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::error;

use super::events::publish_transitions;
use super::{Context, Error};
use crate::resources::MANAGER;
use crate::status;

/// A status write at most this often per ClusteredService.
const STATUS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes `new` unless it equals the stored status. Returns how long to
/// wait when a write happened less than a second ago (writes are coalesced).
pub(super) async fn write_status(
    csvc: &ClusteredService,
    ns: &str,
    new: ClusteredServiceStatus,
    now: Timestamp,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let old = csvc.status.as_ref();
    // Under an older CRD the stored status lacks this operator's new fields
    // and never equals the computed one. While it is still exactly what the
    // last write left, what was sent is the status to compare with.
    let sent = ctx.memory.remember(csvc, |m| {
        m.pruned_write.as_deref().filter(|(_, stored)| Some(stored) == old).map(|(sent, _)| sent.clone())
    });
    if !status::changed(sent.as_ref().or(old), &new, now, ctx.heartbeat(csvc)) {
        return Ok(None);
    }
    let since_last = ctx.memory.remember(csvc, |m| m.last_status_write.map(|t| t.elapsed()));
    if let Some(elapsed) = since_last.filter(|&e| e < STATUS_WRITE_INTERVAL) {
        return Ok(Some(STATUS_WRITE_INTERVAL - elapsed));
    }
    publish_transitions(csvc, old, &new, ctx).await;

    let api: Api<ClusteredService> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": ClusteredService::api_version(&()),
        "kind": ClusteredService::kind(&()),
        "status": new,
    });
    let name = csvc.name_any();
    let written = match ctx.crd_outdated.load(Ordering::Relaxed) {
        false => match api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await {
            // An older CRD: apply refuses a field its schema lacks, and the
            // whole status with it. A replace stores the rest.
            Err(kube::Error::Api(e)) if e.message.contains(NOT_IN_SCHEMA) => replace_status(csvc, &new, &api).await?,
            written => written?,
        },
        true => replace_status(csvc, &new, &api).await?,
    };
    ctx.metrics.status_writes.inc();
    let stored = written.status.unwrap_or_default();
    let lost =
        lost_field(&serde_json::to_value(&new).unwrap_or_default(), &serde_json::to_value(&stored).unwrap_or_default());
    if let Some(field) = &lost {
        crd_outdated(csvc, field, ctx).await;
    }
    ctx.memory.remember(csvc, |m| {
        m.last_status_write = Some(Instant::now());
        m.pruned_write = lost.map(|_| Box::new((new, stored)));
    });
    Ok(None)
}

/// How the API server refuses an apply with a field its schema lacks.
const NOT_IN_SCHEMA: &str = "field not declared in schema";

/// Writes `status` by a replace (conditional on the cached object's
/// resourceVersion): the API server drops the fields its schema lacks.
async fn replace_status(
    csvc: &ClusteredService,
    status: &ClusteredServiceStatus,
    api: &Api<ClusteredService>,
) -> Result<ClusteredService, Error> {
    let mut object = csvc.clone();
    object.status = Some(status.clone());
    object.metadata.managed_fields = None;
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    Ok(api.replace_status(&csvc.name_any(), &params, &object).await?)
}

/// Says once per object (an Event) and once per process (the log) that
/// the cluster's CRD is older than this operator.
async fn crd_outdated(csvc: &ClusteredService, field: &str, ctx: &Context) {
    let note = format!(
        "the API server dropped {field} from the status: the ClusteredService CRD in the cluster is older than this \
         operator. Helm installs CRDs but never upgrades them: kubectl apply --server-side -f \
         charts/clustered/crds/clusteredservice.yaml"
    );
    if !ctx.crd_outdated.swap(true, Ordering::Relaxed) {
        error!(%note, "CRD outdated");
    }
    if !ctx.memory.remember(csvc, |m| m.pruned_write.is_some()) {
        ctx.event(csvc, EventType::Warning, "CRDOutdated", note).await;
    }
}

/// The first field of `sent` that `stored` lacks (`status.a.b`, `status.list[2].c`),
/// as the API server prunes what its schema does not know.
fn lost_field(sent: &serde_json::Value, stored: &serde_json::Value) -> Option<String> {
    fn walk(sent: &serde_json::Value, stored: &serde_json::Value, path: String) -> Option<String> {
        match (sent, stored) {
            (serde_json::Value::Object(sent), serde_json::Value::Object(stored)) => sent.iter().find_map(|(k, v)| {
                let path = format!("{path}.{k}");
                match stored.get(k) {
                    None if !v.is_null() => Some(path),
                    None => None,
                    Some(s) => walk(v, s, path),
                }
            }),
            (serde_json::Value::Array(sent), serde_json::Value::Array(stored)) => {
                sent.iter().zip(stored).enumerate().find_map(|(i, (v, s))| walk(v, s, format!("{path}[{i}]")))
            }
            _ => None,
        }
    }
    walk(sent, stored, "status".into())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::lost_field;

    #[test]
    fn a_field_the_api_server_dropped_is_named() {
        let sent =
            json!({"replicas": 2, "clusterd": {"image": "x"}, "instances": [{"pod": "a", "clusterdVersion": "0.2.0"}]});
        assert_eq!(lost_field(&sent, &sent), None);
        let stored = json!({"replicas": 2, "instances": [{"pod": "a", "clusterdVersion": "0.2.0"}]});
        assert_eq!(lost_field(&sent, &stored).as_deref(), Some("status.clusterd"));
        let stored = json!({"replicas": 2, "clusterd": {"image": "x"}, "instances": [{"pod": "a"}]});
        assert_eq!(lost_field(&sent, &stored).as_deref(), Some("status.instances[0].clusterdVersion"));
        // Values the API server changed (defaults, normalisation) are not lost fields.
        let stored =
            json!({"replicas": 3, "clusterd": {"image": "y"}, "instances": [{"pod": "a", "clusterdVersion": "0.2.0"}]});
        assert_eq!(lost_field(&sent, &stored), None);
    }
}
