//! The desired state: pure functions from a ClusteredService to the objects
//! that run it. Nothing here talks to the API server, so every spec field's
//! effect is unit-tested.

mod clusterd_args;
mod deployment;
mod extras;

use std::collections::BTreeMap;

use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

pub use clusterd_args::clusterd_args;
pub use deployment::{ADMIN_PORT_NAME, APP_PORT_NAME, CLUSTERD_BIN, INSTALL_CONTAINER, deployment, deployment_for};
pub use extras::{hpa, pod_disruption_budget, service};

/// Label that ties every child object and pod to its ClusteredService.
pub const SERVICE_LABEL: &str = "clustered.dev/service";

/// Field manager of every write the operator makes.
pub const MANAGER: &str = "clustered-operator";

/// Settings of the operator that shape the children, not the CR.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image holding the clusterd binary, copied into each pod by an init container.
    pub clusterd_image: String,
    /// Seconds the pod waits after it is told to stop, before clusterd gets
    /// SIGTERM, so that endpoints and kube-proxy stop sending it traffic first.
    pub pre_stop_delay_seconds: i64,
    /// How a new `clusterd_image` reaches the pods of existing services.
    pub clusterd_updates: crate::updates::Policy,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            clusterd_image: "clustered.dev/clusterd:dev".into(),
            pre_stop_delay_seconds: 3,
            clusterd_updates: crate::updates::Policy::default(),
        }
    }
}

/// The app container of `csvc`'s template, if the template has it.
pub fn app_container(csvc: &ClusteredService) -> Option<&k8s_openapi::api::core::v1::Container> {
    let name = csvc.spec.app_container_name()?;
    csvc.spec.template.spec.as_ref()?.containers.iter().find(|c| c.name == name)
}

/// Labels selecting the pods of `csvc`.
pub fn selector_labels(csvc: &ClusteredService) -> BTreeMap<String, String> {
    BTreeMap::from([(SERVICE_LABEL.to_string(), csvc.name_any())])
}

/// The selector as the string the scale subresource and the HPA read.
pub fn selector_string(csvc: &ClusteredService) -> String {
    format!("{SERVICE_LABEL}={}", csvc.name_any())
}

/// Metadata of a child object: same name and namespace, owned by `csvc`
/// (so deleting the CR garbage-collects it), labelled as ours.
fn child_meta(csvc: &ClusteredService) -> ObjectMeta {
    let mut labels = selector_labels(csvc);
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    ObjectMeta {
        name: Some(csvc.name_any()),
        namespace: csvc.namespace(),
        labels: Some(labels),
        owner_references: owner_reference(csvc).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner_reference(csvc: &ClusteredService) -> Option<OwnerReference> {
    csvc.controller_owner_ref(&())
}

#[cfg(test)]
pub(crate) mod test_support {
    use clustered_api::v1alpha1::ClusteredService;

    /// A ClusteredService as the API server would return it after defaulting.
    pub(crate) fn csvc(yaml_spec: &str) -> ClusteredService {
        let doc = format!(
            "apiVersion: clustered.dev/v1alpha1\nkind: ClusteredService\nmetadata:\n  name: web\n  namespace: shop\n  uid: 1234-5678\n  generation: 4\nspec:\n{yaml_spec}"
        );
        serde_yaml::from_str(&doc).expect("test CR parses")
    }

    pub(crate) const APP: &str = "  template:
    spec:
      containers:
        - name: app
          image: example/app:1
          command: [node, server.js]
          args: [--verbose]
          resources:
            limits: {cpu: '2'}
";
}
