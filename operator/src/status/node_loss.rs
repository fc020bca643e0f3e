//! Pods stranded on a node that stopped reporting. Told from the pods'
//! own trouble by what Kubernetes writes on the pods themselves, so the
//! operator needs no access to Nodes:
//! - the node lifecycle controller marks every pod of a node whose lease
//!   expired (`node-monitor-grace-period`) `Ready=False` and nothing else,
//!   while a kubelet that takes a pod out of service always turns
//!   `ContainersReady` false with it;
//! - the taint manager evicts them after their `tolerationSeconds` with a
//!   `DisruptionTarget` condition (`DeletionByTaintManager`), and the pod
//!   garbage collector does the same for pods of a deleted node
//!   (`DeletionByPodGC`). Evicted pods stay `Terminating` until their
//!   kubelet confirms, i.e. until the node comes back or is deleted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use kube::ResourceExt;

/// Degraded reason: pods sit on a node that is not ready or unreachable.
pub const NODE_UNREACHABLE: &str = "NodeUnreachable";

/// The nodes that stopped reporting, each with the names of the pods on it
/// (terminating ones included: they are not gone while their node is).
pub fn lost_nodes(pods: &[&Pod]) -> BTreeMap<String, Vec<String>> {
    let mut lost: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in pods.iter().filter(|p| on_lost_node(p)) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
        lost.entry(node).or_default().push(pod.name_any());
    }
    for names in lost.values_mut() {
        names.sort();
    }
    lost
}

fn on_lost_node(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let find = |type_: &str| conditions.iter().find(|c| c.type_ == type_);
    let is = |c: Option<&PodCondition>, status: &str| c.is_some_and(|c| c.status == status);
    let evicted = find("DisruptionTarget").is_some_and(|c| {
        c.status == "True" && matches!(c.reason.as_deref(), Some("DeletionByTaintManager" | "DeletionByPodGC"))
    });
    let ready = find("Ready");
    let marked_not_ready = is(ready, "False")
        && ready.and_then(|c| c.reason.as_deref()) != Some("ReadinessGatesNotReady")
        && is(find("ContainersReady"), "True");
    evicted || marked_not_ready
}

/// The Degraded message: which node, which pods, and when they move.
pub fn message(lost: &BTreeMap<String, Vec<String>>, toleration_seconds: i64) -> String {
    let nodes: Vec<String> = lost
        .iter()
        .map(|(node, pods)| format!("node {node} is not ready or unreachable, with pods {}", pods.join(", ")))
        .collect();
    format!(
        "{}; pods not evicted yet are replaced on other nodes {toleration_seconds} s after their node was \
         marked (spec.nodeLossTolerationSeconds), and the node's pods are removed when it comes back",
        nodes.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, conditions: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": []},
            "status": {"conditions": conditions},
        }))
        .expect("pod")
    }

    fn cond(type_: &str, status: &str, reason: Option<&str>) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason})
    }

    #[test]
    fn pods_the_node_controller_marked_or_the_taint_manager_evicted_name_their_node() {
        let marked = pod(
            "web-a",
            "n3",
            serde_json::json!([cond("Ready", "False", None), cond("ContainersReady", "True", None)]),
        );
        let evicted = pod(
            "web-b",
            "n3",
            serde_json::json!([
                cond("Ready", "False", None),
                cond("ContainersReady", "True", None),
                cond("DisruptionTarget", "True", Some("DeletionByTaintManager"))
            ]),
        );
        let healthy =
            pod("web-c", "n1", serde_json::json!([cond("Ready", "True", None), cond("ContainersReady", "True", None)]));
        let lost = lost_nodes(&[&evicted, &healthy, &marked]);
        assert_eq!(lost, BTreeMap::from([("n3".to_string(), vec!["web-a".to_string(), "web-b".to_string()])]));
        let message = message(&lost, 30);
        assert!(message.starts_with("node n3 is not ready or unreachable, with pods web-a, web-b;"), "{message}");
        assert!(message.contains("30 s"), "{message}");
    }

    #[test]
    fn the_pods_own_trouble_and_drains_are_not_node_loss() {
        // The kubelet turns both false: a failing readiness probe, a pod stopping.
        let probe = pod(
            "a",
            "n1",
            serde_json::json!([
                cond("Ready", "False", Some("ContainersNotReady")),
                cond("ContainersReady", "False", Some("ContainersNotReady"))
            ]),
        );
        let gates = pod(
            "b",
            "n1",
            serde_json::json!([
                cond("Ready", "False", Some("ReadinessGatesNotReady")),
                cond("ContainersReady", "True", None)
            ]),
        );
        // kubectl drain goes through the eviction API.
        let drained = pod(
            "c",
            "n1",
            serde_json::json!([
                cond("Ready", "True", None),
                cond("ContainersReady", "True", None),
                cond("DisruptionTarget", "True", Some("EvictionByEvictionAPI"))
            ]),
        );
        let unscheduled = pod("d", "", serde_json::json!([cond("PodScheduled", "False", Some("Unschedulable"))]));
        assert!(lost_nodes(&[&probe, &gates, &drained, &unscheduled]).is_empty());
    }
}
