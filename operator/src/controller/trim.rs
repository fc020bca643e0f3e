//! What of each object is cached. The fleet has several pods and
//! EndpointSlices per ClusteredService, and the status reads little of
//! them: managed fields and annotations go (the largest part of a small
//! object), and so does a pod's spec but for its node (the containers,
//! volumes and probes of the template are the Deployment's).
//!
//! Of the ClusteredServices and their one-per-service children, the
//! managed fields' field sets go (a tree of every field each writer set,
//! often as large as the object; kept: who wrote when, read to name a
//! contesting writer, and whether the operator set a Deployment's
//! replicas), and so does `kubectl apply`'s copy of the whole object in an
//! annotation. Nothing cached is sent back whole: a child's replace body
//! leaves managed fields to the API server, and a status write sends only
//! the status.

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::Resource;
use kube::api::ObjectMeta;

use crate::resources::MANAGER;

/// `kubectl apply`'s record of the last object it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Keeps a pod's identity, labels, deletion, node and status.
pub(super) fn pod(pod: &mut Pod) {
    metadata(&mut pod.metadata);
    pod.spec = pod.spec.take().map(|spec| PodSpec { node_name: spec.node_name, ..PodSpec::default() });
}

/// Keeps a slice's identity, labels and endpoints (which pods are ready).
pub(super) fn endpoint_slice(slice: &mut EndpointSlice) {
    metadata(&mut slice.metadata);
    for endpoint in &mut slice.endpoints {
        endpoint.hints = None;
        endpoint.deprecated_topology = None;
    }
}

fn metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
}

/// A ClusteredService or a child of which there is one per service: its
/// spec, labels, annotations and owners stay whole (a child's replace
/// keeps what others set), its managed fields shrink to who wrote when.
pub(super) fn whole_but_field_sets<K: Resource>(object: &mut K) {
    if let Some(managed) = &mut object.meta_mut().managed_fields {
        managed.iter_mut().for_each(keep_replicas_only);
    }
    if let Some(annotations) = &mut object.meta_mut().annotations {
        annotations.remove(LAST_APPLIED);
    }
}

/// Drops an entry's field set, but for the operator's own `spec.replicas`.
fn keep_replicas_only(entry: &mut ManagedFieldsEntry) {
    let replicas = entry.manager.as_deref() == Some(MANAGER)
        && entry.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").and_then(|s| s.get("f:replicas")).is_some());
    entry.fields_v1 = replicas.then(|| FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}})));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{APP, csvc};
    use crate::status::{Observed, compute};
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::jiff::Timestamp;
    use kube::ResourceExt;

    /// A pod as the API server serves it, from a kubelet-run cluster.
    fn full_pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": "ns", "uid": "u-1", "resourceVersion": "42",
                "labels": {"clustered.dev/service": "web", "pod-template-hash": "abc"},
                "annotations": {"clustered.dev/restartedAt": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc", "uid": "u-0"}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
            },
            "spec": {
                "nodeName": "node-b",
                "containers": [{"name": "app", "image": "demo:1", "env": [{"name": "A", "value": "1"}]}],
            },
            "status": {
                "phase": "Running", "podIP": "10.88.1.7",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "image": "demo:1", "imageID": "", "ready": true,
                                       "restartCount": 2, "state": {"running": {}}}],
            },
        }))
        .expect("pod")
    }

    #[test]
    fn a_trimmed_pod_gives_the_status_an_untrimmed_one_gives() {
        let csvc = csvc(&format!("  replicas: 2\n{APP}"));
        let full = [full_pod("web-1"), full_pod("web-2")];
        let mut trimmed = full.clone();
        trimmed.iter_mut().for_each(pod);
        let status_of = |pods: &[Pod]| {
            let observed = Observed {
                deployment: None,
                pods: pods.iter().collect(),
                reports: &Default::default(),
                problem: None,
                clusterd_update: None,
                serving: &Default::default(),
            };
            compute(&csvc, &observed, Timestamp::from_second(1_000).expect("now"))
        };
        assert_eq!(status_of(&trimmed), status_of(&full));
        let kept = &trimmed[0];
        assert!(kept.metadata.managed_fields.is_none() && kept.metadata.annotations.is_none());
        assert!(kept.spec.as_ref().is_some_and(|s| s.containers.is_empty()));
        assert_eq!(trimmed[0].spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("node-b"));
    }

    /// A Deployment the operator wrote (replicas included), scaled by the
    /// Deployment controller's status writes, applied once with kubectl.
    fn live_deployment(replicas_owner: &str) -> Deployment {
        let entry = |manager: &str, subresource: Option<&str>, fields: serde_json::Value| {
            serde_json::json!({"manager": manager, "operation": "Update", "apiVersion": "apps/v1",
                               "time": "2026-12-07T10:00:00Z", "subresource": subresource,
                               "fieldsType": "FieldsV1", "fieldsV1": fields})
        };
        let spec = serde_json::json!({"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {}}}}});
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "ns", "resourceVersion": "7",
                "annotations": {LAST_APPLIED: "{\"the\": \"whole object\"}", "deployment.kubernetes.io/revision": "3"},
                "managedFields": [
                    entry(replicas_owner, None, spec),
                    entry("kube-controller-manager", Some("status"), serde_json::json!({"f:status": {"f:replicas": {}}})),
                ],
            },
            "spec": {"replicas": 3, "selector": {}, "template": {}},
        }))
        .expect("deployment")
    }

    #[test]
    fn a_trimmed_child_keeps_what_the_operator_reads_of_its_writers() {
        for (owner, scaled) in [(MANAGER, Some(3)), ("kubectl-scale", None)] {
            let mut live = live_deployment(owner);
            whole_but_field_sets(&mut live);
            assert_eq!(super::super::children::scaled_from(&live, 5), scaled, "replicas set by {owner}");
            let managed = live.metadata.managed_fields.as_deref().unwrap_or_default();
            let writers: Vec<_> = managed.iter().map(|m| (m.manager.as_deref(), m.time.is_some())).collect();
            assert_eq!(writers, [(Some(owner), true), (Some("kube-controller-manager"), true)]);
            let field_sets: Vec<_> = managed.iter().map(|m| m.fields_v1.as_ref().map(|f| f.0.to_string())).collect();
            let expected = (owner == MANAGER).then(|| r#"{"f:spec":{"f:replicas":{}}}"#.to_string());
            assert_eq!(field_sets, [expected, None], "only the operator's replicas are kept");
            let annotations: Vec<_> = live.annotations().keys().map(String::as_str).collect();
            assert_eq!(
                annotations,
                ["deployment.kubernetes.io/revision"],
                "others' annotations stay; kubectl's copy goes"
            );
        }
    }
}
