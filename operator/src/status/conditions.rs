//! The three conditions, each a verdict with its reason and message.

use clustered_api::v1alpha1::{ClusteredService, Instance, WorkerCount, WorkerState, WorkerTotals};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use super::instances::{worker_oom_kill, workers_in};
use super::node_loss;
use super::pods::{deployment_condition, pod_trouble};
use super::{AVAILABLE, DEGRADED, IMAGE_CONFIG_UNAVAILABLE, Observed, PROGRESSING, Problem};

pub(super) type Verdict = (&'static str, bool, &'static str, String);

/// Available when no more pods are missing than the disruption budget
/// allows (one), and at least one serves. A pod serves once it is ready
/// and the Service's EndpointSlices list it: before that the Service does
/// not route to it, however ready it is.
pub(super) fn available(desired: i32, ready: i32, serving: i32) -> Verdict {
    if desired == 0 {
        return (AVAILABLE, true, "ScaledToZero", "no pods are wanted".into());
    }
    let needed = (desired - 1).max(1);
    let mut message = format!("{serving} of {desired} pods serve through the Service, at least {needed} needed");
    if ready > serving {
        message += &format!(" ({} ready, not yet in the Service's endpoints)", ready - serving);
    }
    if serving >= needed {
        (AVAILABLE, true, "MinimumPodsAvailable", message)
    } else {
        (AVAILABLE, false, "MinimumPodsUnavailable", message)
    }
}

pub(super) fn progressing(
    csvc: &ClusteredService,
    deployment: Option<&Deployment>,
    pods: i32,
    ready: i32,
    workers: &WorkerTotals,
) -> Verdict {
    let desired = csvc.spec.replicas;
    let Some(deployment) = deployment else {
        return (PROGRESSING, true, "Creating", "the Deployment does not exist yet".into());
    };
    let status = deployment.status.clone().unwrap_or_default();
    if status.observed_generation < deployment.metadata.generation {
        return (PROGRESSING, true, "RollingOut", "the Deployment controller has not seen the latest spec yet".into());
    }
    let updated = status.updated_replicas.unwrap_or(0);
    if updated < desired || pods != desired {
        let message = format!("{updated} of {desired} pods updated, {pods} exist");
        return (PROGRESSING, true, "RollingOut", message);
    }
    if ready < desired || workers.ready < workers.desired {
        let message = format!("{ready} of {desired} pods and {} of {} workers ready", workers.ready, workers.desired);
        return (PROGRESSING, true, "WaitingForReady", message);
    }
    (PROGRESSING, false, "Complete", format!("{desired} pods with {} workers are up to date and ready", workers.ready))
}

/// Degraded when something needs a person: the operator's own work
/// failing, pods on a node that stopped reporting, pods that cannot be created, scheduled, pulled or kept
/// running, a worker crash-looping, a rollout that stopped making progress,
/// or a ready pod whose workers are not all serving. The first cause found
/// wins, in that order.
pub(super) fn degraded(
    csvc: &ClusteredService,
    observed: &Observed<'_>,
    live: &[&Pod],
    instances: &[Instance],
    now: Timestamp,
) -> Verdict {
    match &observed.problem {
        Some(Problem::InvalidSpec(why)) => return (DEGRADED, true, "InvalidSpec", why.clone()),
        Some(Problem::ReconcileError(why)) => return (DEGRADED, true, "ReconcileError", why.clone()),
        Some(Problem::ImageConfigUnavailable(why)) => return (DEGRADED, true, IMAGE_CONFIG_UNAVAILABLE, why.clone()),
        Some(Problem::ContestedByAnotherWriter(why)) => {
            return (DEGRADED, true, "ContestedByAnotherWriter", why.clone());
        }
        None => {}
    }
    // Terminating pods count here: evicted from a lost node, they stay
    // until it comes back.
    let lost = node_loss::lost_nodes(&observed.pods);
    if !lost.is_empty() {
        let message = node_loss::message(&lost, csvc.spec.node_loss_toleration_seconds);
        return (DEGRADED, true, node_loss::NODE_UNREACHABLE, message);
    }
    if let Some((reason, message)) = pod_trouble(observed.deployment, live, now) {
        return (DEGRADED, true, reason, message);
    }
    if let Some(message) = worker_oom_kill(instances, now) {
        return (DEGRADED, true, "OOMKilled", message);
    }
    let crash_looping = workers_in(instances, WorkerState::CrashLoop);
    if !crash_looping.is_empty() {
        let mut message = format!("workers crash-looping: {}", crash_looping.join(", "));
        // clusterd's account of the last exit says what the app missed
        // (e.g. what inherit or reuseport mode needs from it).
        let last_exit = instances
            .iter()
            .flat_map(|i| &i.workers)
            .find(|w| w.state == WorkerState::CrashLoop)
            .and_then(|w| w.last_exit.as_deref());
        if let Some(exit) = last_exit {
            message.push_str(&format!("; last exit: {exit}"));
        }
        return (DEGRADED, true, "WorkerCrashLoop", message);
    }
    let stalled = deployment_condition(observed.deployment, "Progressing")
        .filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    if let Some(c) = stalled {
        return (DEGRADED, true, "ProgressDeadlineExceeded", c.message.clone().unwrap_or_default());
    }
    let unhealthy = workers_in(instances, WorkerState::Unhealthy);
    if !unhealthy.is_empty() {
        return (
            DEGRADED,
            true,
            "WorkersUnhealthy",
            format!("workers failing health checks: {}", unhealthy.join(", ")),
        );
    }
    if let Some(message) = no_cpu_limit(csvc, observed) {
        return (DEGRADED, false, NO_CPU_LIMIT, message);
    }
    (DEGRADED, false, "AsExpected", "no worker is crash-looping or failing health checks".into())
}

/// Reason of the (not degraded) condition saying the worker count came
/// from the node's CPUs because the container has no CPU limit.
pub const NO_CPU_LIMIT: &str = "NoCpuLimit";

/// With `count: auto`, a clusterd that found no CPU limit in its cgroup
/// runs one worker per CPU of the node: rarely what the user meant.
fn no_cpu_limit(csvc: &ClusteredService, observed: &Observed<'_>) -> Option<String> {
    if csvc.spec.workers.count != WorkerCount::Auto {
        return None;
    }
    let (pod, status) = observed
        .reports
        .iter()
        .filter_map(|(pod, report)| Some((pod, report.as_ref().ok()?)))
        .find(|(_, status)| status.cpu.cores.is_none())?;
    Some(format!(
        "the app container has no CPU limit, so clusterd used the node's CPU count: pod {pod} runs {} workers; \
         set resources.limits.cpu on the app container (or a fixed spec.workers.count)",
        status.desired_workers
    ))
}
