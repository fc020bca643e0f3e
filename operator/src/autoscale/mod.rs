//! `spec.autoscaling`: what the autoscaler reports in
//! `status.autoscaling`, and in `concurrency` mode the scaling itself: the
//! operator samples the in-flight requests every pod's clusterd reports,
//! [`decide`]s, and sets `spec.replicas` through the scale subresource.
//! (In `cpu` mode an HPA scales; see `resources::hpa`.)

pub mod decide;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::{AutoscalingMetric, AutoscalingStatus, ClusteredService, ClusteredServiceStatus};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::resources::MANAGER;
use crate::status::Report;
pub use decide::Autoscaler;
use decide::{Decision, Pods, Policy, Sample};

/// How often a ClusteredService in `concurrency` mode is sampled: the
/// panic window (6 s) then holds three samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// What the autoscaler needs from the controller that runs it: the API
/// client, the autoscaler state it keeps per ClusteredService, and Events.
pub trait Host {
    fn client(&self) -> &Client;

    /// Runs `f` on the concurrency autoscaler of `csvc`.
    fn with_autoscaler<T>(&self, csvc: &ClusteredService, f: impl FnOnce(&mut Autoscaler) -> T) -> T;

    /// Publishes an Event; the recorder folds Events of the same reason and
    /// action into one series, keeping the first note.
    fn publish(
        &self,
        csvc: &ClusteredService,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> impl Future<Output = ()> + Send;
}

/// True when the operator itself scales `csvc` (and must sample it often).
pub fn scales_on_concurrency(csvc: &ClusteredService) -> bool {
    csvc.spec.autoscaling.as_ref().is_some_and(|a| a.metric == AutoscalingMetric::Concurrency)
}

/// One sample from the pods' reports: in-flight requests and ready workers
/// of every pod that answered and has a ready worker.
pub fn sample(reports: &BTreeMap<String, Report>, at: Instant) -> Sample {
    let mut sample = Sample { at, in_flight: 0, workers: 0, pods: 0 };
    for status in reports.values().filter_map(|r| r.as_ref().ok()).filter(|s| s.ready_workers > 0) {
        sample.in_flight += status.workers.iter().map(|w| w.in_flight).sum::<u64>();
        sample.workers += status.ready_workers;
        sample.pods += 1;
    }
    sample
}

/// `status.autoscaling` for `csvc` (None without `spec.autoscaling`); in
/// `concurrency` mode also samples, decides and scales.
pub async fn reconcile(
    ctx: &impl Host,
    csvc: &ClusteredService,
    status: &ClusteredServiceStatus,
    reports: &BTreeMap<String, Report>,
    hpa: Option<&HorizontalPodAutoscaler>,
) -> Option<AutoscalingStatus> {
    let auto = csvc.spec.autoscaling.as_ref()?;
    if auto.metric == AutoscalingMetric::Cpu {
        return Some(from_hpa(csvc, hpa));
    }
    let policy = Policy {
        min: auto.min_replicas,
        max: auto.max_replicas,
        target_per_worker: auto.target_per_worker(),
        scale_down_stabilization: Duration::from_secs(auto.scale_down_stabilization_seconds().max(0) as u64),
    };
    let current = csvc.spec.replicas;
    let pods =
        Pods { current, ready: status.ready_replicas, starting: (status.replicas - status.ready_replicas).max(0) };
    let now = Instant::now();
    let decision = ctx.with_autoscaler(csvc, |scaler| {
        scaler.record(sample(reports, now));
        scaler.decide(&policy, pods, now)
    });
    let previous = csvc.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let mut last_scale_time = previous.and_then(|p| p.last_scale_time.clone());
    let (mut reason, mut message) = (decision.reason.to_string(), decision.message.clone());
    let mut replicas = current;
    if decision.desired != current {
        match scale(ctx.client(), csvc, decision.desired).await {
            Ok(()) => {
                replicas = decision.desired;
                info!(name = %csvc.name_any(), from = current, to = decision.desired, reason = %decision.reason, "autoscaled");
                last_scale_time = Some(Timestamp::now().to_string());
                let note = format!("pods {current} → {}: {}", decision.desired, decision.message);
                // One Event per transition: the same reason and action
                // would be folded into the first Event's series.
                let action = format!("Scale{current}To{}", decision.desired);
                ctx.publish(csvc, EventType::Normal, "Autoscaled", &action, note).await;
            }
            Err(e) => {
                warn!(name = %csvc.name_any(), error = %e, "could not scale");
                reason = "ScaleFailed".into();
                message = format!("setting spec.replicas to {} through the scale subresource: {e}", decision.desired);
                ctx.publish(csvc, EventType::Warning, "AutoscaleFailed", "Reconcile", message.clone()).await;
            }
        }
    }
    if previous.is_some_and(|p| p.panic) != decision.panic {
        let (why, note) = if decision.panic {
            ("AutoscalerPanic", format!("bursting load: {}", decision.message))
        } else {
            ("AutoscalerCalm", "the panic window has stayed below twice the ready pods for 60 s".to_string())
        };
        ctx.publish(csvc, EventType::Normal, why, "Reconcile", note).await;
    }
    Some(concurrency_status(&decision, replicas, reason, message, last_scale_time))
}

fn concurrency_status(
    decision: &Decision,
    current_replicas: i32,
    reason: String,
    message: String,
    last_scale_time: Option<String>,
) -> AutoscalingStatus {
    AutoscalingStatus {
        metric: AutoscalingMetric::Concurrency,
        current_replicas,
        desired_replicas: decision.desired,
        // Two decimals: the status is not rewritten for noise.
        observed_concurrency_per_worker: decision.per_worker.map(|c| (c * 100.0).round() / 100.0),
        panic: decision.panic,
        last_scale_time,
        reason,
        message,
    }
}

/// Sets `spec.replicas` through the scale subresource, as `kubectl scale` and the HPA do.
async fn scale(client: &Client, csvc: &ClusteredService, replicas: i32) -> Result<(), kube::Error> {
    let ns = csvc.namespace().unwrap_or_default();
    let api: Api<ClusteredService> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({ "spec": { "replicas": replicas } });
    api.patch_scale(
        &csvc.name_any(),
        &PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() },
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// `cpu` mode: the HPA's own view.
fn from_hpa(csvc: &ClusteredService, hpa: Option<&HorizontalPodAutoscaler>) -> AutoscalingStatus {
    let status = hpa.and_then(|h| h.status.as_ref());
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    // The condition that explains the count best: a failure first, then a
    // limit reached, then the ordinary state.
    let telling = conditions
        .iter()
        .find(|c| c.status == "False" && c.type_ != "ScalingLimited")
        .or_else(|| conditions.iter().find(|c| c.type_ == "ScalingLimited" && c.status == "True"))
        .or_else(|| conditions.iter().find(|c| c.type_ == "ScalingActive"));
    let (reason, message) = match telling {
        Some(c) => (c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default()),
        None => ("WaitingForHPA".into(), "the HorizontalPodAutoscaler has not reported yet".into()),
    };
    AutoscalingStatus {
        metric: AutoscalingMetric::Cpu,
        current_replicas: csvc.spec.replicas,
        desired_replicas: status.map_or(csvc.spec.replicas, |s| s.desired_replicas),
        observed_concurrency_per_worker: None,
        panic: false,
        last_scale_time: status.and_then(|s| s.last_scale_time.as_ref()).map(|t| t.0.to_string()),
        reason,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustered_api::wire::{ClusterdStatus, WorkerStatus};

    fn report(in_flight: &[u64], ready: u32) -> Report {
        Ok(ClusterdStatus {
            ready_workers: ready,
            workers: in_flight.iter().map(|&n| WorkerStatus { in_flight: n, ..Default::default() }).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_sample_sums_the_pods_with_ready_workers() {
        let at = Instant::now();
        let reports = BTreeMap::from([
            ("a".to_string(), report(&[2, 1], 2)),
            ("b".to_string(), report(&[0], 1)),
            ("c".to_string(), report(&[5], 0)),
            ("d".to_string(), Err("clusterd unreachable".to_string())),
        ]);
        assert_eq!(sample(&reports, at), Sample { at, in_flight: 3, workers: 3, pods: 2 });
    }
}
