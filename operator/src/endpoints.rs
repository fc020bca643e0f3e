//! Which pods a ClusteredService's Service routes to: the pods its
//! EndpointSlices list as ready. A pod can be Ready a moment before the
//! EndpointSlice controller lists it, and kube-proxy programs a node only
//! from the slices, so `Available` counts these pods, not Ready ones.

use std::collections::BTreeSet;

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label the EndpointSlice controller sets to the owning Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Names of the pods that `slices` (all of one Service's) list as ready.
/// An endpoint whose readiness is not given counts as ready, as the
/// EndpointSlice API says consumers must read it.
pub fn serving_pods<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> BTreeSet<String> {
    slices
        .into_iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|target| target.kind.as_deref() == Some("Pod"))
        .filter_map(|target| target.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    fn endpoint(pod: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec!["10.88.0.9".into()],
            conditions: Some(EndpointConditions { ready, ..Default::default() }),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice { address_type: "IPv4".into(), endpoints, ..Default::default() }
    }

    #[test]
    fn the_serving_pods_are_the_ready_endpoints_of_every_slice() {
        let slices = [
            slice(vec![endpoint("a", Some(true)), endpoint("b", Some(false))]),
            slice(vec![endpoint("c", None)]),
            slice(vec![]),
        ];
        let serving: Vec<String> = serving_pods(&slices).into_iter().collect();
        assert_eq!(serving, ["a", "c"], "b is not ready (starting or terminating); c's readiness is unknown");
    }
}
