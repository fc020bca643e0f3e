//! What of a pod and an EndpointSlice is cached: the fleet has several of
//! each per ClusteredService, and the status reads little of them. Managed
//! fields and annotations go (the largest part of a small object), and so
//! does a pod's spec but for its node: the containers, volumes and probes
//! of the template are the Deployment's, which is cached whole.

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ObjectMeta;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{APP, csvc};
    use crate::status::{Observed, compute};
    use k8s_openapi::jiff::Timestamp;

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
}
