//! The Deployment: the user's pod template with clusterd injected.

use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, Lifecycle, LifecycleHandler, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, SleepAction, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use thiserror::Error;

use super::{Settings, child_meta, clusterd_args, selector_labels};
use crate::image::{self, ResolvedImage};
use crate::updates::{SPEC_HASH, TEMPLATE_REVISION, TEMPLATE_REVISION_ANNOTATION, spec_hash};

/// Where the init container puts clusterd, inside the app container.
pub const CLUSTERD_BIN: &str = "/clustered/bin/clusterd";
const CLUSTERD_DIR: &str = "/clustered/bin";
const CLUSTERD_VOLUME: &str = "clusterd-bin";
/// The init container that copies clusterd into every pod.
pub const INSTALL_CONTAINER: &str = "clusterd-install";
pub const APP_PORT_NAME: &str = "http";
pub const ADMIN_PORT_NAME: &str = "clusterd-admin";
/// Prometheus' `kubernetes-pods` convention: `prometheus.io/{scrape,port,path}`.
const SCRAPE_PREFIX: &str = "prometheus.io/";

/// Why a ClusteredService cannot become a Deployment. The CRD's rules
/// reject these at admission; they can still reach the operator from
/// objects stored before the rules existed.
#[derive(Debug, Error, PartialEq)]
pub enum TemplateError {
    #[error("spec.template.spec is missing")]
    MissingPodSpec,
    #[error("spec.template.spec.containers has no container named {0:?}")]
    UnknownAppContainer(String),
    #[error("the app container {0:?} has no command for clusterd to run")]
    MissingCommand(String),
    #[error(
        "the app container {0:?} sets no command, and its image {1} has neither ENTRYPOINT nor CMD: set command on the container"
    )]
    NothingToRun(String, String),
}

/// The Deployment running `csvc`, for a template whose app container sets
/// its `command`.
pub fn deployment(csvc: &ClusteredService, settings: &Settings) -> Result<Deployment, TemplateError> {
    deployment_for(csvc, settings, None)
}

/// The Deployment running `csvc`. An app container without `command` runs
/// what `image` (its image, resolved) says, and is pinned to its digest.
pub fn deployment_for(
    csvc: &ClusteredService,
    settings: &Settings,
    image: Option<&ResolvedImage>,
) -> Result<Deployment, TemplateError> {
    let spec = &csvc.spec;
    let mut template: PodTemplateSpec = spec.template.clone();
    let pod = template.spec.as_mut().ok_or(TemplateError::MissingPodSpec)?;
    let app_name = spec.app_container_name().ok_or(TemplateError::MissingPodSpec)?.to_string();
    let app = pod
        .containers
        .iter_mut()
        .find(|c| c.name == app_name)
        .ok_or_else(|| TemplateError::UnknownAppContainer(app_name.clone()))?;
    wrap_app_container(app, csvc, image)?;
    inject_clusterd(pod, settings, spec.shutdown.drain_timeout_seconds);
    place_pods(pod, csvc);

    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels.get_or_insert_with(Default::default).extend(selector_labels(csvc));
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    // The usual scrape annotations point at clusterd's /metrics, unless the
    // template names a scrape target of its own (they allow only one).
    if !annotations.keys().any(|k| k.starts_with(SCRAPE_PREFIX)) {
        annotations.extend([
            (format!("{SCRAPE_PREFIX}scrape"), "true".to_string()),
            (format!("{SCRAPE_PREFIX}port"), spec.admin_port.to_string()),
            (format!("{SCRAPE_PREFIX}path"), "/metrics".to_string()),
        ]);
    }
    annotations.insert(TEMPLATE_REVISION_ANNOTATION.into(), TEMPLATE_REVISION.into());

    let mut metadata = child_meta(csvc);
    // Tells the user's changes apart from the operator's (a new clusterd).
    metadata.annotations = Some([(SPEC_HASH.to_string(), spec_hash(csvc))].into());
    Ok(Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(csvc)), ..Default::default() },
            template,
            ..Default::default()
        }),
        status: None,
    })
}

/// The app's command becomes `clusterd <flags> -- <command>`; its ports and
/// probes are clusterd's. Without a `command`, the image's ENTRYPOINT is
/// the command and its CMD the `args` (unless the template sets them), and
/// the image is pinned to the digest they were read from.
fn wrap_app_container(
    app: &mut Container,
    csvc: &ClusteredService,
    image: Option<&ResolvedImage>,
) -> Result<(), TemplateError> {
    let spec = &csvc.spec;
    let command = match (app.command.take().filter(|c| !c.is_empty()), image) {
        (Some(command), _) => command,
        (None, None) => return Err(TemplateError::MissingCommand(app.name.clone())),
        (None, Some(resolved)) => {
            let process = image::process(None, app.args.as_deref(), &resolved.config)
                .map_err(|_| TemplateError::NothingToRun(app.name.clone(), resolved.pinned.clone()))?;
            app.image = Some(resolved.pinned.clone());
            app.args = Some(process.args).filter(|a| !a.is_empty());
            process.command
        }
    };
    let mut wrapped = vec![CLUSTERD_BIN.to_string()];
    wrapped.extend(clusterd_args(spec).to_args());
    wrapped.push("--".into());
    wrapped.extend(command);
    // `args` stay as they are: Kubernetes appends them after `command`, so
    // they still reach the app.
    app.command = Some(wrapped);

    let ports = app.ports.get_or_insert_with(Vec::new);
    ports.retain(|p| p.container_port != spec.port && p.container_port != spec.admin_port);
    ports.push(container_port(APP_PORT_NAME, spec.port));
    ports.push(container_port(ADMIN_PORT_NAME, spec.admin_port));

    let probe = |path: &str, failure_threshold| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    };
    app.liveness_probe.get_or_insert_with(|| probe("/healthz", 3));
    app.readiness_probe.get_or_insert_with(|| Probe { period_seconds: Some(2), ..probe("/readyz", 1) });

    app.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
        name: CLUSTERD_VOLUME.into(),
        mount_path: CLUSTERD_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    });
    Ok(())
}

/// The init container that copies clusterd into a shared emptyDir, the
/// volume itself, and the pod-level settings clusterd relies on.
fn inject_clusterd(pod: &mut PodSpec, settings: &Settings, drain_timeout_seconds: i32) {
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: CLUSTERD_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity("64Mi".into())), ..Default::default() }),
        ..Default::default()
    });
    pod.init_containers.get_or_insert_with(Vec::new).insert(
        0,
        Container {
            name: INSTALL_CONTAINER.into(),
            image: Some(settings.clusterd_image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            command: Some(vec!["/clusterd".into(), "--install-to".into(), CLUSTERD_BIN.into()]),
            volume_mounts: Some(vec![VolumeMount {
                name: CLUSTERD_VOLUME.into(),
                mount_path: CLUSTERD_DIR.into(),
                ..Default::default()
            }]),
            resources: Some(ResourceRequirements {
                requests: Some(
                    [("cpu".into(), Quantity("10m".into())), ("memory".into(), Quantity("16Mi".into()))].into(),
                ),
                limits: Some(
                    [("cpu".into(), Quantity("100m".into())), ("memory".into(), Quantity("32Mi".into()))].into(),
                ),
                ..Default::default()
            }),
            security_context: Some(restricted_security_context()),
            ..Default::default()
        },
    );

    // The app's workers get no API credentials: clusterd reports health over
    // its admin port instead. Users who need a token say so explicitly.
    pod.automount_service_account_token.get_or_insert(false);

    // Wait for endpoints to drop the pod before clusterd stops accepting,
    // then give the drain its full time.
    let pre_stop = settings.pre_stop_delay_seconds;
    let needed = pre_stop + i64::from(drain_timeout_seconds) + 5;
    let grace = pod.termination_grace_period_seconds.get_or_insert(needed);
    *grace = (*grace).max(needed);
    if pre_stop > 0 {
        for container in &mut pod.containers {
            if container.command.as_ref().and_then(|c| c.first()).is_some_and(|c| c == CLUSTERD_BIN) {
                container.lifecycle.get_or_insert_with(Lifecycle::default).pre_stop.get_or_insert(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: pre_stop }),
                    ..Default::default()
                });
            }
        }
    }
}

/// Topology keys the pods spread over, nodes first.
const SPREAD_TOPOLOGY_KEYS: [&str; 2] = ["kubernetes.io/hostname", "topology.kubernetes.io/zone"];
/// The taints the node lifecycle controller puts on a node that stops
/// reporting; pods tolerating them stay bound for `tolerationSeconds`.
const NODE_LOSS_TAINTS: [&str; 2] = ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"];

/// Where the pods go, unless the template says: spread one by one over
/// nodes and zones (a preference, so a small cluster still runs them all),
/// and moved off a lost node after `spec.nodeLossTolerationSeconds`.
fn place_pods(pod: &mut PodSpec, csvc: &ClusteredService) {
    if pod.topology_spread_constraints.as_ref().is_none_or(Vec::is_empty) {
        pod.topology_spread_constraints = Some(
            SPREAD_TOPOLOGY_KEYS
                .iter()
                .map(|key| TopologySpreadConstraint {
                    max_skew: 1,
                    topology_key: (*key).into(),
                    when_unsatisfiable: "ScheduleAnyway".into(),
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(csvc)),
                        ..Default::default()
                    }),
                    // Spread each rollout's pods, not old and new together.
                    match_label_keys: Some(vec!["pod-template-hash".into()]),
                    ..Default::default()
                })
                .collect(),
        );
    }
    let tolerations = pod.tolerations.get_or_insert_with(Vec::new);
    for key in NODE_LOSS_TAINTS {
        if !tolerations.iter().any(|t| t.key.as_deref() == Some(key)) {
            tolerations.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(csvc.spec.node_loss_toleration_seconds),
                ..Default::default()
            });
        }
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort { name: Some(name.into()), container_port: port, protocol: Some("TCP".into()), ..Default::default() }
}

/// What the `restricted` Pod Security Standard asks of a container.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::SERVICE_LABEL;
    use crate::resources::test_support::{APP, csvc};

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec")
    }

    #[test]
    fn without_command_the_image_s_entrypoint_and_cmd_run_under_clusterd_pinned() {
        let cr =
            csvc("  template:\n    spec:\n      containers:\n        - name: app\n          image: reg:5000/app:1\n");
        let resolved = ResolvedImage {
            pinned: crate::image::pinned("reg:5000/app:1", "sha256:abc"),
            digest: "sha256:abc".into(),
            config: crate::image::ImageConfig {
                entrypoint: vec!["/docker-entrypoint.sh".into()],
                cmd: vec!["node".into(), "server.js".into()],
                working_dir: None,
            },
        };
        let d = deployment_for(&cr, &Settings::default(), Some(&resolved)).expect("deployment");
        let app = &d.spec.expect("spec").template.spec.expect("pod").containers[0];
        assert_eq!(app.image.as_deref(), Some("reg:5000/app:1@sha256:abc"));
        let command = app.command.as_ref().expect("command");
        let sep = command.iter().position(|a| a == "--").expect("-- separator");
        assert_eq!(
            (command[0].as_str(), &command[sep + 1..]),
            (CLUSTERD_BIN, &["/docker-entrypoint.sh".to_string()][..])
        );
        assert_eq!(app.args.as_deref(), Some(&["node".to_string(), "server.js".to_string()][..]));

        // The template's args replace CMD; an image with nothing to run is refused.
        let with_args = csvc(
            "  template:\n    spec:\n      containers:\n        - name: app\n          image: reg:5000/app:1\n          args: [npm, start]\n",
        );
        let d = deployment_for(&with_args, &Settings::default(), Some(&resolved)).expect("deployment");
        let app = &d.spec.expect("spec").template.spec.expect("pod").containers[0];
        assert_eq!(app.args.as_deref(), Some(&["npm".to_string(), "start".to_string()][..]));
        let empty = ResolvedImage { config: Default::default(), ..resolved };
        assert!(matches!(
            deployment_for(&cr, &Settings::default(), Some(&empty)).err(),
            Some(TemplateError::NothingToRun(..))
        ));
    }

    #[test]
    fn app_command_is_wrapped_by_clusterd() {
        let d = deployment(&csvc(APP), &Settings::default()).expect("deployment");
        let app = &pod_spec(&d).containers[0];
        let command = app.command.as_ref().expect("command");
        assert_eq!(command[0], CLUSTERD_BIN);
        let sep = command.iter().position(|a| a == "--").expect("-- separator");
        assert_eq!(&command[sep + 1..], ["node", "server.js"]);
        assert!(command[1..sep].contains(&"--port=8080".to_string()));
        assert_eq!(app.args.as_deref(), Some(&["--verbose".to_string()][..]), "args still reach the app");
    }

    #[test]
    fn ports_probes_and_volume_are_clusterd_s() {
        let d = deployment(&csvc(APP), &Settings::default()).expect("deployment");
        let pod = pod_spec(&d);
        let app = &pod.containers[0];
        let ports: Vec<_> = app.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
        assert_eq!(ports, [(Some("http"), 8080), (Some("clusterd-admin"), 9901)]);
        let path = |p: &Option<Probe>| p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone());
        assert_eq!(path(&app.liveness_probe).as_deref(), Some("/healthz"));
        assert_eq!(path(&app.readiness_probe).as_deref(), Some("/readyz"));
        let mount = &app.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (CLUSTERD_DIR, Some(true)));
        let init = &pod.init_containers.as_ref().expect("init containers")[0];
        assert_eq!(init.image.as_deref(), Some("clustered.dev/clusterd:dev"));
        assert_eq!(init.command.as_ref().expect("init command").last().map(String::as_str), Some(CLUSTERD_BIN));
        assert_eq!(init.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
        assert_eq!(pod.volumes.as_ref().expect("volumes")[0].name, CLUSTERD_VOLUME);
    }

    #[test]
    fn no_token_and_a_grace_period_covering_the_drain() {
        let d = deployment(&csvc(&format!("  shutdown: {{drainTimeoutSeconds: 40}}\n{APP}")), &Settings::default())
            .expect("deployment");
        let pod = pod_spec(&d);
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.termination_grace_period_seconds, Some(3 + 40 + 5));
        let pre_stop = pod.containers[0].lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).expect("preStop");
        assert_eq!(pre_stop.sleep.as_ref().map(|s| s.seconds), Some(3));
    }

    #[test]
    fn the_user_s_explicit_choices_win() {
        let yaml = "  template:
    spec:
      automountServiceAccountToken: true
      terminationGracePeriodSeconds: 120
      containers:
        - name: app
          command: [node, server.js]
          readinessProbe:
            httpGet: {path: /mine, port: 8080}
";
        let d = deployment(&csvc(yaml), &Settings::default()).expect("deployment");
        let pod = pod_spec(&d);
        assert_eq!(pod.automount_service_account_token, Some(true));
        assert_eq!(pod.termination_grace_period_seconds, Some(120));
        let readiness = pod.containers[0].readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
        assert_eq!(readiness.and_then(|h| h.path.as_deref()), Some("/mine"));
    }

    #[test]
    fn pods_spread_over_nodes_and_zones_and_leave_a_lost_node_after_the_toleration() {
        let d = deployment(&csvc(&format!("  nodeLossTolerationSeconds: 45\n{APP}")), &Settings::default())
            .expect("deployment");
        let pod = pod_spec(&d);
        let spread = pod.topology_spread_constraints.as_ref().expect("spread");
        let keys: Vec<_> = spread.iter().map(|c| c.topology_key.as_str()).collect();
        assert_eq!(keys, SPREAD_TOPOLOGY_KEYS);
        for c in spread {
            assert_eq!((c.max_skew, c.when_unsatisfiable.as_str()), (1, "ScheduleAnyway"));
            let selector = c.label_selector.as_ref().and_then(|s| s.match_labels.as_ref()).expect("selector");
            assert_eq!(selector.get(SERVICE_LABEL).map(String::as_str), Some("web"));
        }
        let tolerations: Vec<_> = pod
            .tolerations
            .iter()
            .flatten()
            .map(|t| (t.key.as_deref(), t.effect.as_deref(), t.toleration_seconds))
            .collect();
        assert_eq!(
            tolerations,
            [
                (Some(NODE_LOSS_TAINTS[0]), Some("NoExecute"), Some(45)),
                (Some(NODE_LOSS_TAINTS[1]), Some("NoExecute"), Some(45))
            ]
        );
        // Default: 30 s.
        let d = deployment(&csvc(APP), &Settings::default()).expect("deployment");
        assert!(pod_spec(&d).tolerations.iter().flatten().all(|t| t.toleration_seconds == Some(30)));
    }

    #[test]
    fn the_template_s_own_spread_and_tolerations_win() {
        let yaml = "  template:
    spec:
      topologySpreadConstraints:
        - {maxSkew: 2, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule}
      tolerations:
        - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 600}
        - {key: dedicated, operator: Equal, value: web, effect: NoSchedule}
      containers:
        - name: app
          command: [node, server.js]
";
        let d = deployment(&csvc(yaml), &Settings::default()).expect("deployment");
        let pod = pod_spec(&d);
        let spread = pod.topology_spread_constraints.as_ref().expect("spread");
        assert_eq!((spread.len(), spread[0].max_skew), (1, 2));
        let tolerations: Vec<_> =
            pod.tolerations.iter().flatten().map(|t| (t.key.as_deref(), t.toleration_seconds)).collect();
        assert_eq!(
            tolerations,
            [
                (Some("node.kubernetes.io/unreachable"), Some(600)),
                (Some("dedicated"), None),
                (Some("node.kubernetes.io/not-ready"), Some(30))
            ]
        );
    }

    #[test]
    fn app_container_by_name_and_others_untouched() {
        let yaml = "  appContainer: app
  template:
    spec:
      containers:
        - name: shipper
          command: [sleep, infinity]
        - name: app
          command: [python3, app.py]
";
        let d = deployment(&csvc(yaml), &Settings::default()).expect("deployment");
        let pod = pod_spec(&d);
        assert_eq!(pod.containers[0].command.as_deref(), Some(&["sleep".to_string(), "infinity".to_string()][..]));
        assert_eq!(pod.containers[1].command.as_ref().expect("app")[0], CLUSTERD_BIN);
    }

    #[test]
    fn replicas_selector_labels_and_owner() {
        let d = deployment(&csvc(&format!("  replicas: 5\n{APP}")), &Settings::default()).expect("deployment");
        let spec = d.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(5));
        let selector = spec.selector.match_labels.as_ref().expect("selector");
        assert_eq!(selector.get(SERVICE_LABEL).map(String::as_str), Some("web"));
        let pod_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("pod labels");
        assert_eq!(pod_labels.get(SERVICE_LABEL).map(String::as_str), Some("web"));
        let owner = &d.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("ClusteredService", "web", Some(true))
        );
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn pods_carry_the_scrape_annotations_unless_the_template_names_its_own() {
        let annotations = |d: &Deployment| {
            d.spec.as_ref().and_then(|s| s.template.metadata.as_ref()?.annotations.clone()).unwrap_or_default()
        };
        let d = deployment(&csvc(APP), &Settings::default()).expect("deployment");
        let ours = annotations(&d);
        assert_eq!(ours.get("prometheus.io/scrape").map(String::as_str), Some("true"));
        assert_eq!(ours.get("prometheus.io/port").map(String::as_str), Some("9901"));
        assert_eq!(ours.get("prometheus.io/path").map(String::as_str), Some("/metrics"));
        assert_eq!(ours.get(TEMPLATE_REVISION_ANNOTATION).map(String::as_str), Some(TEMPLATE_REVISION));

        let own = APP.replace(
            "  template:\n",
            "  template:\n    metadata:\n      annotations:\n        prometheus.io/port: \"3000\"\n",
        );
        assert_ne!(own, APP, "the fixture's template starts as expected");
        let theirs = annotations(&deployment(&csvc(&own), &Settings::default()).expect("deployment"));
        assert_eq!(theirs.get("prometheus.io/port").map(String::as_str), Some("3000"));
        assert!(!theirs.contains_key("prometheus.io/scrape"), "{theirs:?}");
    }

    #[test]
    fn broken_templates_are_errors_not_panics() {
        let no_command = csvc("  template:\n    spec:\n      containers:\n        - name: app\n");
        assert_eq!(
            deployment(&no_command, &Settings::default()).err(),
            Some(TemplateError::MissingCommand("app".into()))
        );
        let unknown = csvc(&format!("  appContainer: web\n{APP}"));
        assert_eq!(
            deployment(&unknown, &Settings::default()).err(),
            Some(TemplateError::UnknownAppContainer("web".into()))
        );
        let no_containers = csvc("  template:\n    spec:\n      containers: []\n");
        assert_eq!(deployment(&no_containers, &Settings::default()).err(), Some(TemplateError::MissingPodSpec));
    }
}
