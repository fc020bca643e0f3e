//! Why pods are missing or not running, from the Deployment and the pods.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::RECENT_EXIT_SECONDS;

/// Why pods are missing or not running, from the Deployment's conditions
/// and the pods' own status: the reason and the underlying message.
pub fn pod_trouble(deployment: Option<&Deployment>, pods: &[&Pod], now: Timestamp) -> Option<(&'static str, String)> {
    // The ReplicaSet's FailedCreate (admission, quota) is copied into the
    // Deployment's ReplicaFailure condition.
    if let Some(c) = deployment_condition(deployment, "ReplicaFailure").filter(|c| c.status == "True") {
        return Some(("PodCreationFailed", c.message.clone().unwrap_or_else(|| c.reason.clone().unwrap_or_default())));
    }
    pods.iter().find_map(|pod| {
        let name = pod.name_any();
        let status = pod.status.as_ref()?;
        let unschedulable =
            status.conditions.iter().flatten().find(|c| {
                c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
            });
        if let Some(c) = unschedulable {
            return Some(("Unschedulable", format!("pod {name}: {}", c.message.clone().unwrap_or_default())));
        }
        let containers =
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
        containers
            .filter_map(|c| {
                container_trouble(c, now)
                    .map(|(reason, why)| (reason, format!("pod {name}, container {}: {why}", c.name)))
            })
            .min_by_key(|(reason, _)| CONTAINER_REASONS.iter().position(|r| r == reason))
    })
}

pub(super) fn deployment_condition<'a>(
    deployment: Option<&'a Deployment>,
    type_: &str,
) -> Option<&'a DeploymentCondition> {
    deployment?.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
}

/// Container reasons, most telling first.
const CONTAINER_REASONS: [&str; 4] = ["ImagePullFailed", "ContainerCannotStart", "OOMKilled", "ContainerCrashLoop"];

/// What is wrong with one container, if anything: an image that cannot be
/// pulled, a container that cannot be created, or one that keeps exiting
/// (with the message it left in its termination log, clusterd's own error).
fn container_trouble(c: &ContainerStatus, now: Timestamp) -> Option<(&'static str, String)> {
    let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
    let waiting_reason = waiting.and_then(|w| w.reason.as_deref()).unwrap_or_default();
    let waiting_message = || waiting.and_then(|w| w.message.clone()).unwrap_or_else(|| waiting_reason.to_string());
    match waiting_reason {
        "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" | "InvalidImageName" => {
            return Some(("ImagePullFailed", waiting_message()));
        }
        "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
            return Some(("ContainerCannotStart", waiting_message()));
        }
        _ => {}
    }
    // The exit to explain: the current one, or the last one while the
    // container waits to be restarted or if it was recent (a container
    // that crashes again and again runs in between: that is no recovery).
    let current = c.state.as_ref().and_then(|s| s.terminated.as_ref());
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).filter(|t| {
        waiting_reason == "CrashLoopBackOff"
            || t.finished_at.as_ref().is_some_and(|at| now.as_second() - at.0.as_second() < RECENT_EXIT_SECONDS)
    });
    let exit = current
        .filter(|t| t.exit_code != 0)
        .or(last.filter(|t| t.exit_code != 0 || waiting_reason == "CrashLoopBackOff"))?;
    let reason = if exit.reason.as_deref() == Some("OOMKilled") { "OOMKilled" } else { "ContainerCrashLoop" };
    let mut why = format!("exited with code {}", exit.exit_code);
    if let Some(r) = exit.reason.as_deref().filter(|r| !r.is_empty()) {
        why.push_str(&format!(" ({r})"));
    }
    if let Some(m) = exit.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        why.push_str(&format!(": {m}"));
    }
    Some((reason, why))
}
