//! Service, PodDisruptionBudget and HorizontalPodAutoscaler.

use clustered_api::v1alpha1::{AutoscalingMetric, ClusteredService, Protocol};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior,
    HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::{APP_PORT_NAME, child_meta, selector_labels};

/// A ClusterIP Service on the shared port.
pub fn service(csvc: &ClusteredService) -> Service {
    let app_protocol = match csvc.spec.protocol {
        Protocol::Http => "http",
        Protocol::Tcp => "tcp",
    };
    Service {
        metadata: child_meta(csvc),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(csvc)),
            ports: Some(vec![ServicePort {
                name: Some(APP_PORT_NAME.into()),
                port: csvc.spec.port,
                target_port: Some(IntOrString::String(APP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                app_protocol: Some(app_protocol.into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// At most one pod down for voluntary disruptions (drains, rolling node
/// maintenance): each pod is a whole cluster of workers.
pub fn pod_disruption_budget(csvc: &ClusteredService) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(csvc),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(csvc)), ..Default::default() }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The HPA for `spec.autoscaling` on CPU, scaling the CR itself through its
/// scale subresource (so `spec.replicas` stays the one source of truth).
/// None in `concurrency` mode: the operator scales then.
pub fn hpa(csvc: &ClusteredService) -> Option<HorizontalPodAutoscaler> {
    let auto = csvc.spec.autoscaling.as_ref().filter(|a| a.metric == AutoscalingMetric::Cpu)?;
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(csvc),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(ClusteredService::api_version(&()).into_owned()),
                kind: ClusteredService::kind(&()).into_owned(),
                name: csvc.name_any(),
            },
            min_replicas: Some(auto.min_replicas),
            max_replicas: auto.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(auto.target_cpu_utilization_percentage),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            behavior: auto.scale_down_stabilization_seconds.map(|seconds| HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules { stabilization_window_seconds: Some(seconds), ..Default::default() }),
                scale_up: None,
            }),
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::SERVICE_LABEL;
    use crate::resources::test_support::{APP, csvc};

    #[test]
    fn service_targets_the_shared_port_by_name() {
        let svc = service(&csvc(&format!("  port: 3000\n  protocol: TCP\n{APP}")));
        let spec = svc.spec.expect("spec");
        let port = &spec.ports.expect("ports")[0];
        assert_eq!(port.port, 3000);
        assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
        assert_eq!(port.app_protocol.as_deref(), Some("tcp"));
        assert_eq!(spec.selector.expect("selector").get(SERVICE_LABEL).map(String::as_str), Some("web"));
        assert_eq!(svc.metadata.owner_references.expect("owner")[0].name, "web");
    }

    #[test]
    fn pdb_allows_one_pod_down() {
        let pdb = pod_disruption_budget(&csvc(APP));
        assert_eq!(pdb.spec.expect("spec").max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn hpa_only_with_autoscaling_and_targets_the_cr() {
        assert!(hpa(&csvc(APP)).is_none());
        let with = csvc(&format!(
            "  autoscaling: {{minReplicas: 2, maxReplicas: 7, targetCpuUtilizationPercentage: 60}}\n{APP}"
        ));
        let spec = hpa(&with).expect("hpa").spec.expect("spec");
        assert_eq!(spec.scale_target_ref.kind, "ClusteredService");
        assert_eq!(spec.scale_target_ref.api_version.as_deref(), Some("clustered.dev/v1alpha1"));
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 7));
        let metrics = spec.metrics.expect("metrics");
        let target = &metrics[0].resource.as_ref().expect("resource").target;
        assert_eq!(target.average_utilization, Some(60));
        assert_eq!(spec.behavior, None, "the HPA's own scale-down stabilisation unless the CR sets one");
    }

    #[test]
    fn hpa_scale_down_stabilisation_comes_from_the_cr() {
        let with = csvc(&format!("  autoscaling: {{maxReplicas: 3, scaleDownStabilizationSeconds: 15}}\n{APP}"));
        let behavior = hpa(&with).expect("hpa").spec.expect("spec").behavior.expect("behavior");
        let down = behavior.scale_down.expect("scaleDown");
        assert_eq!(down.stabilization_window_seconds, Some(15));
        assert_eq!(behavior.scale_up, None);
    }

    #[test]
    fn no_hpa_in_concurrency_mode() {
        let with = csvc(&format!("  autoscaling: {{maxReplicas: 3, metric: concurrency}}\n{APP}"));
        assert!(hpa(&with).is_none());
    }
}
