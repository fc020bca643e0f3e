//! clusterd updates paced across the fleet.
//!
//! A new clusterd image (a `helm upgrade` of the operator) changes every
//! Deployment's pod template. Written at once, every ClusteredService would
//! roll at the same moment, and a bad clusterd would reach them all before
//! anyone could stop it. Instead the Deployments form a wave:
//!
//! * a Deployment whose pods carry another clusterd is *waiting*; the
//!   waiting ones take their turn in a stable order (namespace, name);
//! * one that carries the operator's clusterd and has not finished rolling
//!   out is *rolling*; at most [`Policy::max_rolling`] roll at once, and
//!   each waits for those before it to be available again;
//! * one whose rollout failed (its progress deadline passed) *stops* the
//!   wave until it is fixed, rolled back or deleted.
//!
//! An operator release that changes what it adds to every pod template
//! (say, scrape annotations) bumps [`TEMPLATE_REVISION`]: pods of an older
//! revision wait and take their turn the same way, even on the same image.
//!
//! A change the user makes to the spec is not paced: it rolls its service
//! at once, onto the new clusterd. The Deployment carries a hash of the
//! spec it was made from, so that change is told apart from the operator's.
//!
//! Everything is read from the live Deployments (level-triggered): a stale
//! cache only shows fewer rolling and more waiting, and the waiting that
//! already started are the first in the order, so they hold the slots.

use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;

use crate::resources::INSTALL_CONTAINER;

/// Annotation of a Deployment: the hash of the spec it was made from
/// (replicas aside, which autoscalers change all the time).
pub const SPEC_HASH: &str = "clustered.dev/spec-hash";

/// Pod template annotation: the revision of what the operator adds to
/// every pod template (beside the spec and the clusterd image).
pub const TEMPLATE_REVISION_ANNOTATION: &str = "clustered.dev/template-revision";

/// Bumped with every change to what the operator adds to each pod
/// template, so a release that makes one is paced like a new clusterd.
/// 1 (no annotation): up to 0.1; 2: Prometheus scrape annotations.
pub const TEMPLATE_REVISION: &str = "2";

/// How clusterd updates reach the pods (chart value `clusterdUpdates`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Roll services onto a new clusterd by themselves; when off, a service
    /// takes it with its next spec change.
    pub automatic: bool,
    /// Services rolling for a clusterd update at once.
    pub max_rolling: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self { automatic: true, max_rolling: 2 }
    }
}

/// What the Deployment's pod template is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Template {
    /// The spec, with the operator's clusterd.
    Render,
    /// The live pod template, as it is: the clusterd update waits.
    KeepLive(Held),
}

/// Why a service's pods do not get the operator's clusterd yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// `Queued`, `Stopped` or `Manual`.
    pub reason: &'static str,
    pub message: String,
}

/// The hash of `csvc`'s spec that tells the user's changes apart.
pub fn spec_hash(csvc: &ClusteredService) -> String {
    let mut spec = serde_json::to_value(&csvc.spec).unwrap_or_default();
    if let Some(spec) = spec.as_object_mut() {
        spec.remove("replicas");
    }
    // Object keys serialize sorted: the same spec, the same text.
    format!("{:016x}", crate::stable_hash(spec.to_string().as_bytes()))
}

/// The clusterd image the Deployment's pods are made with.
pub fn clusterd_image(deployment: &Deployment) -> Option<&str> {
    let pod = deployment.spec.as_ref()?.template.spec.as_ref()?;
    pod.init_containers.as_ref()?.iter().find(|c| c.name == INSTALL_CONTAINER)?.image.as_deref()
}

/// Whether the Deployment's pods are made as this operator makes them: with
/// the `target` clusterd and this operator's [`TEMPLATE_REVISION`].
pub fn is_current(deployment: &Deployment, target: &str) -> bool {
    let template = deployment.spec.as_ref().map(|s| &s.template);
    let revision = template.and_then(|t| t.metadata.as_ref()?.annotations.as_ref()?.get(TEMPLATE_REVISION_ANNOTATION));
    clusterd_image(deployment) == Some(target) && revision.map_or("1", String::as_str) == TEMPLATE_REVISION
}

/// Where a Deployment's latest rollout stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    Complete,
    InProgress,
    /// The Deployment controller gave up waiting (its message).
    Failed(String),
}

/// As `kubectl rollout status` judges it: the controller has seen the
/// latest template, every pod runs it and is available, no old one is left.
pub fn rollout(deployment: &Deployment) -> Rollout {
    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = deployment.status.as_ref() else { return Rollout::InProgress };
    if status.observed_generation < deployment.metadata.generation {
        return Rollout::InProgress;
    }
    let deadline_passed = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if let Some(c) = deadline_passed {
        return Rollout::Failed(c.message.clone().unwrap_or_else(|| "progress deadline exceeded".into()));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let done = updated >= wanted
        && status.replicas.unwrap_or(0) <= updated
        && status.available_replicas.unwrap_or(0) >= updated;
    if done { Rollout::Complete } else { Rollout::InProgress }
}

/// The fleet's clusterd update at one moment, for a target image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wave {
    /// `namespace/name` of the Deployments on another clusterd (or an older
    /// template revision), in turn order.
    pub waiting: Vec<String>,
    /// Those made as this operator makes them, still rolling out.
    pub rolling: Vec<String>,
    /// The first whose rollout failed, and why.
    pub failed: Option<(String, String)>,
}

impl Wave {
    pub fn observe<'a>(deployments: impl IntoIterator<Item = &'a Deployment>, target: &str) -> Wave {
        let mut wave = Wave::default();
        let mut failed = Vec::new();
        for d in deployments {
            if d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
            match (is_current(d, target), rollout(d)) {
                (false, _) => wave.waiting.push(key),
                (true, Rollout::Complete) => {}
                (true, Rollout::InProgress) => wave.rolling.push(key),
                (true, Rollout::Failed(why)) => failed.push((key, why)),
            }
        }
        wave.waiting.sort();
        wave.rolling.sort();
        failed.sort();
        wave.failed = failed.into_iter().next();
        wave
    }

    /// Whether `key`, waiting, may start rolling now; if not, why.
    pub fn turn(&self, key: &str, policy: &Policy) -> Result<(), Held> {
        if let Some((failed, why)) = &self.failed {
            return Err(Held {
                reason: "Stopped",
                message: format!(
                    "the clusterd update is stopped: {failed} did not roll out ({why}); fix or roll back that \
                     service, or delete it, and the update goes on"
                ),
            });
        }
        let slots = policy.max_rolling.saturating_sub(self.rolling.len());
        let ahead = self.waiting.iter().take_while(|k| k.as_str() < key).count();
        if ahead < slots {
            return Ok(());
        }
        // No position or count in the message: it would change, and be
        // written, for every waiting service at every step of the wave.
        Err(Held {
            reason: "Queued",
            message: format!(
                "waiting for its turn: services roll onto the new clusterd {} at a time, in namespace/name order, \
                 each once those before it are available again",
                policy.max_rolling
            ),
        })
    }
}

/// What `csvc`'s pod template is made from, given its live Deployment.
/// `wave` is only observed when the live pods carry another clusterd.
pub fn template(
    csvc: &ClusteredService,
    live: Option<&Deployment>,
    target: &str,
    policy: &Policy,
    wave: impl FnOnce() -> Wave,
) -> Template {
    let Some(live) = live else { return Template::Render };
    if clusterd_image(live).is_none() || is_current(live, target) {
        // Not made by the operator at all, or made as it makes them.
        return Template::Render;
    }
    // An older operator wrote no hash: its Deployment is taken as made
    // from the current spec (the hash is written with the next write).
    let changed = live.annotations().get(SPEC_HASH).is_some_and(|h| *h != spec_hash(csvc));
    if changed {
        return Template::Render;
    }
    if !policy.automatic {
        return Template::KeepLive(Held {
            reason: "Manual",
            message: format!(
                "automatic clusterd updates are off (chart value clusterdUpdates.automatic): the pods take {target} \
                 with the next change to the spec"
            ),
        });
    }
    let key = format!("{}/{}", csvc.namespace().unwrap_or_default(), csvc.name_any());
    match wave().turn(&key, policy) {
        Ok(()) => Template::Render,
        Err(held) => Template::KeepLive(held),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::resources::test_support::{APP, csvc};

    const OLD: &str = "clustered.dev/clusterd:1";
    const NEW: &str = "clustered.dev/clusterd:2";

    fn deployment(ns: &str, name: &str, image: &str, rollout: Rollout) -> Deployment {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: Some([(TEMPLATE_REVISION_ANNOTATION.into(), TEMPLATE_REVISION.into())].into()),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        init_containers: Some(vec![Container {
                            name: INSTALL_CONTAINER.into(),
                            image: Some(image.into()),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(3),
                replicas: Some(2),
                updated_replicas: Some(2),
                available_replicas: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        d.metadata.name = Some(name.into());
        d.metadata.namespace = Some(ns.into());
        d.metadata.generation = Some(3);
        let status = d.status.as_mut().expect("a status");
        match rollout {
            Rollout::Complete => {}
            Rollout::InProgress => status.replicas = Some(3),
            Rollout::Failed(why) => {
                status.available_replicas = Some(1);
                status.conditions = Some(vec![DeploymentCondition {
                    type_: "Progressing".into(),
                    status: "False".into(),
                    reason: Some("ProgressDeadlineExceeded".into()),
                    message: Some(why),
                    ..Default::default()
                }]);
            }
        }
        d
    }

    #[test]
    fn rollout_status_as_kubectl_judges_it() {
        assert_eq!(rollout(&deployment("a", "x", NEW, Rollout::Complete)), Rollout::Complete);
        assert_eq!(rollout(&deployment("a", "x", NEW, Rollout::InProgress)), Rollout::InProgress);
        let failed = deployment("a", "x", NEW, Rollout::Failed("ReplicaSet x has timed out".into()));
        assert_eq!(rollout(&failed), Rollout::Failed("ReplicaSet x has timed out".into()));
        // The controller has not seen the newest template yet.
        let mut unseen = deployment("a", "x", NEW, Rollout::Complete);
        unseen.metadata.generation = Some(4);
        assert_eq!(rollout(&unseen), Rollout::InProgress);
        // Old pods still around.
        let mut surge = deployment("a", "x", NEW, Rollout::Complete);
        surge.status.as_mut().expect("a status").available_replicas = Some(1);
        assert_eq!(rollout(&surge), Rollout::InProgress);
    }

    #[test]
    fn at_most_max_rolling_start_in_namespace_then_name_order() {
        let fleet = [
            deployment("b", "one", OLD, Rollout::Complete),
            deployment("a", "two", OLD, Rollout::Complete),
            deployment("a", "one", OLD, Rollout::Complete),
            deployment("c", "done", NEW, Rollout::Complete),
        ];
        let wave = Wave::observe(&fleet, NEW);
        assert_eq!(wave.waiting, ["a/one", "a/two", "b/one"]);
        assert!(wave.rolling.is_empty());
        let policy = Policy { automatic: true, max_rolling: 2 };
        assert_eq!(wave.turn("a/one", &policy), Ok(()));
        assert_eq!(wave.turn("a/two", &policy), Ok(()));
        let held = wave.turn("b/one", &policy).expect_err("its turn has not come");
        assert_eq!(held.reason, "Queued");
        assert!(held.message.contains("roll onto the new clusterd 2 at a time"), "{}", held.message);
    }

    #[test]
    fn a_rolling_service_holds_its_slot_until_available() {
        let policy = Policy { automatic: true, max_rolling: 2 };
        let fleet = [
            deployment("a", "one", NEW, Rollout::InProgress),
            deployment("a", "two", OLD, Rollout::Complete),
            deployment("a", "three", OLD, Rollout::Complete),
        ];
        let wave = Wave::observe(&fleet, NEW);
        assert_eq!(wave.rolling, ["a/one"]);
        // One slot left: the first waiting (a/three) takes it, a/two waits.
        assert_eq!(wave.turn("a/three", &policy), Ok(()));
        assert!(wave.turn("a/two", &policy).is_err());
    }

    #[test]
    fn a_stale_cache_never_starts_more_than_max_rolling() {
        // a/x1 and a/x2 started, but the cache still shows them waiting:
        // they are first in the order, so they still hold both slots.
        let policy = Policy { automatic: true, max_rolling: 2 };
        let stale = [
            deployment("a", "x1", OLD, Rollout::Complete),
            deployment("a", "x2", OLD, Rollout::Complete),
            deployment("a", "x3", OLD, Rollout::Complete),
        ];
        assert!(Wave::observe(&stale, NEW).turn("a/x3", &policy).is_err());
        // Half caught up: one seen rolling, one still waiting.
        let half = [
            deployment("a", "x1", NEW, Rollout::InProgress),
            deployment("a", "x2", OLD, Rollout::Complete),
            deployment("a", "x3", OLD, Rollout::Complete),
        ];
        assert!(Wave::observe(&half, NEW).turn("a/x3", &policy).is_err());
    }

    #[test]
    fn a_failed_rollout_stops_the_wave_and_says_which() {
        let policy = Policy { automatic: true, max_rolling: 5 };
        let fleet = [
            deployment("a", "bad", NEW, Rollout::Failed("ReplicaSet bad-1 has timed out progressing".into())),
            deployment("a", "next", OLD, Rollout::Complete),
        ];
        let held = Wave::observe(&fleet, NEW).turn("a/next", &policy).expect_err("stopped");
        assert_eq!(held.reason, "Stopped");
        assert!(held.message.contains("a/bad did not roll out (ReplicaSet bad-1 has timed out"), "{}", held.message);
    }

    fn live_for(csvc: &ClusteredService, image: &str, hash: Option<String>) -> Deployment {
        let mut d = deployment("shop", "web", image, Rollout::Complete);
        if let Some(hash) = hash {
            d.metadata.annotations = Some([(SPEC_HASH.to_string(), hash)].into());
        }
        let _ = csvc;
        d
    }

    #[test]
    fn the_operators_clusterd_change_waits_for_the_wave_and_a_users_change_does_not() {
        let csvc = csvc(APP);
        let policy = Policy::default();
        let queued =
            || Wave { waiting: vec!["a/first".into(), "a/second".into(), "shop/web".into()], ..Wave::default() };
        let no_wave = || -> Wave { panic!("the wave is only observed for an update") };

        // No Deployment yet, or already on the operator's clusterd: rendered.
        assert_eq!(template(&csvc, None, NEW, &policy, no_wave), Template::Render);
        let current = live_for(&csvc, NEW, Some(spec_hash(&csvc)));
        assert_eq!(template(&csvc, Some(&current), NEW, &policy, no_wave), Template::Render);

        // Another clusterd, same spec: its turn has not come.
        let same_spec = live_for(&csvc, OLD, Some(spec_hash(&csvc)));
        assert!(
            matches!(template(&csvc, Some(&same_spec), NEW, &policy, queued), Template::KeepLive(h) if h.reason == "Queued")
        );
        // Made by an operator that wrote no hash: the same.
        let unhashed = live_for(&csvc, OLD, None);
        assert!(matches!(template(&csvc, Some(&unhashed), NEW, &policy, queued), Template::KeepLive(_)));
        // Its turn: rendered.
        let first = || Wave { waiting: vec!["shop/web".into()], ..Wave::default() };
        assert_eq!(template(&csvc, Some(&same_spec), NEW, &policy, first), Template::Render);

        // The user changed the spec since: rolls at once, onto the new clusterd.
        let changed = live_for(&csvc, OLD, Some("0000000000000000".into()));
        assert_eq!(template(&csvc, Some(&changed), NEW, &policy, no_wave), Template::Render);

        // Automatic updates off: only a spec change brings the new clusterd.
        let manual = Policy { automatic: false, ..Policy::default() };
        match template(&csvc, Some(&same_spec), NEW, &manual, no_wave) {
            Template::KeepLive(held) => {
                assert_eq!(held.reason, "Manual");
                assert!(held.message.contains("clusterdUpdates.automatic"), "{}", held.message);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(template(&csvc, Some(&changed), NEW, &manual, no_wave), Template::Render);
    }

    #[test]
    fn a_new_template_revision_on_the_same_clusterd_is_paced_the_same_way() {
        let csvc = csvc(APP);
        let mut older = live_for(&csvc, NEW, Some(spec_hash(&csvc)));
        older.spec.as_mut().and_then(|s| s.template.metadata.as_mut()).expect("metadata").annotations = None;
        assert!(!is_current(&older, NEW), "no annotation is revision 1");
        let queued =
            || Wave { waiting: vec!["a/first".into(), "a/second".into(), "shop/web".into()], ..Wave::default() };
        assert!(matches!(
            template(&csvc, Some(&older), NEW, &Policy::default(), queued),
            Template::KeepLive(h) if h.reason == "Queued"
        ));
        let wave = Wave::observe([&older], NEW);
        assert_eq!(wave.waiting, ["shop/web"]);
        assert!(is_current(&deployment("shop", "web", NEW, Rollout::Complete), NEW));
    }

    #[test]
    fn the_spec_hash_ignores_replicas_only() {
        let a = csvc(APP);
        let mut scaled = a.clone();
        scaled.spec.replicas += 3;
        assert_eq!(spec_hash(&a), spec_hash(&scaled));
        let mut changed = a.clone();
        changed.spec.port += 1;
        assert_ne!(spec_hash(&a), spec_hash(&changed));
    }
}
