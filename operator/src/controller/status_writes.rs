//! The status written, at most once a second per ClusteredService and
//! only when it changed (or its heartbeat is due).

use std::time::{Duration, Instant};

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};

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
    if !status::changed(old, &new, now, ctx.heartbeat(csvc)) {
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
    api.patch_status(&csvc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
    ctx.metrics.status_writes.inc();
    ctx.memory.remember(csvc, |m| m.last_status_write = Some(Instant::now()));
    Ok(None)
}
