//! The children made to match the desired ones: created when missing,
//! replaced when they drifted, deleted when no longer wanted.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::{Context, Error};
use crate::resources::MANAGER;

/// Annotation older operators kept their applied state in; dropped from
/// children as they are rewritten (the live object is compared instead).
const APPLIED_HASH: &str = "clustered.dev/applied-hash";

/// Undoing this many changes to one child within [`CONTEST_WINDOW`] means
/// another writer keeps making them: a second operator (an old and a new
/// one both running), a controller, a script. Nobody edits by hand that fast.
const CONTEST_REPAIRS: usize = 5;
const CONTEST_WINDOW: Duration = Duration::from_secs(60);

/// What `ensure` did.
#[derive(Debug, PartialEq)]
pub(super) enum Ensured {
    Unchanged,
    Written,
    /// The cache was behind the API server (a conflict): look again soon.
    Stale,
    /// Another writer keeps changing the child back: it was left alone,
    /// and this says who and what to do.
    Contested(String),
}

/// Makes the live child match `desired`, or deletes it when `None`.
///
/// Missing: created. Present: the API server renders `desired` onto the
/// live object (a dry-run replace, so defaults and normalisation are its
/// own) and the result is compared with the live object; any difference in
/// the spec, or in the labels and owner the operator sets, is drift and
/// the child is replaced. A replace, not an apply: fields someone else
/// added (an env var, a Service port) go as well. A child the API server
/// confirmed in sync is not asked about again until it or `desired` changes.
pub(super) async fn ensure<K>(
    ctx: &Context,
    csvc: &ClusteredService,
    store: &Store<K>,
    ns: &str,
    name: &str,
    desired: Option<K>,
) -> Result<Ensured, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let current = store.get(&ObjectRef::new(name).within(ns));
    let Some(desired) = desired else {
        if current.is_some() {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {
                    ctx.metrics.child_writes.inc();
                    return Ok(Ensured::Written);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Ensured::Unchanged);
    };
    let kind = K::kind(&()).into_owned();
    let params = |dry_run| PostParams { dry_run, field_manager: Some(MANAGER.into()) };
    let live = match current {
        Some(live) => live,
        None => match api.create(&params(false), &desired).await {
            Ok(_) => {
                let hash = content_hash(&desired);
                ctx.memory.remember(csvc, |m| m.written.insert(kind.clone(), hash));
                ctx.metrics.child_writes.inc();
                info!(%kind, %ns, %name, "created");
                return Ok(Ensured::Written);
            }
            // Not in the cache but there: the cache is behind, or someone
            // removed the label the cache is selected by. Compare with it.
            Err(kube::Error::Api(e)) if e.code == 409 => Arc::new(api.get(name).await?),
            Err(e) => return Err(e.into()),
        },
    };
    let hash = content_hash(&desired);
    let version = live.resource_version().unwrap_or_default();
    let verified = (hash, version);
    if ctx.memory.remember(csvc, |m| m.verified.get(&kind) == Some(&verified)) {
        return Ok(Ensured::Unchanged);
    }
    let live_json = serde_json::to_value(&*live).map_err(Error::Encode)?;
    let body: K =
        serde_json::from_value(onto_live(&live_json, &serde_json::to_value(&desired).map_err(Error::Encode)?))
            .map_err(Error::Encode)?;
    let rendered = match api.replace(name, &params(true), &body).await {
        Ok(rendered) => rendered,
        Err(e) => return stale_or(e),
    };
    if !drifted(&serde_json::to_value(&rendered).map_err(Error::Encode)?, &live_json) {
        ctx.memory.remember(csvc, |m| m.verified.insert(kind, verified));
        return Ok(Ensured::Unchanged);
    }
    // Writing what was written (or confirmed) before means someone changed
    // the child since: undo it, unless that keeps happening.
    let now = Instant::now();
    let (repair, fight) = ctx.memory.remember(csvc, |m| {
        let ours = |h: Option<&String>| h == Some(&verified.0);
        let repair = ours(m.written.get(&kind)) || ours(m.verified.get(&kind).map(|(h, _)| h));
        (repair, contested(m.repairs.entry(kind.clone()).or_default(), now))
    });
    if fight {
        let why = contest_message(&kind, live.managed_fields());
        warn!(%kind, %ns, %name, %why, "not undoing the change: another writer keeps making it");
        return Ok(Ensured::Contested(why));
    }
    match api.replace(name, &params(false), &body).await {
        Ok(_) => {
            ctx.memory.remember(csvc, |m| {
                if repair {
                    m.repairs.entry(kind.clone()).or_default().push_back(now);
                }
                m.written.insert(kind.clone(), verified.0.clone());
            });
            ctx.metrics.child_writes.inc();
            info!(%kind, %ns, %name, "replaced (desired state changed or drifted)");
            Ok(Ensured::Written)
        }
        Err(e) => stale_or(e),
    }
}

/// True when the changes undone within the window (older ones are
/// dropped) show another writer at work.
fn contested(repairs: &mut VecDeque<Instant>, now: Instant) -> bool {
    while repairs.front().is_some_and(|&at| now.saturating_duration_since(at) >= CONTEST_WINDOW) {
        repairs.pop_front();
    }
    repairs.len() >= CONTEST_REPAIRS
}

/// Who keeps changing a child, from its managed fields, and what to do.
fn contest_message(kind: &str, managed: &[ManagedFieldsEntry]) -> String {
    // Writers of the object itself: the Deployment controller's status
    // updates (subresource `status`) change nothing the operator owns.
    let last = managed
        .iter()
        .filter(|m| m.operation.as_deref() == Some("Update") && m.subresource.is_none())
        .max_by_key(|m| m.time.as_ref().map(|t| t.0));
    let writer = last.and_then(|m| m.manager.as_deref()).unwrap_or("unknown");
    let hint = if writer == MANAGER {
        "another clustered operator, with other settings, manages this namespace too (an old and a new one during an upgrade, or two releases): \
         keep one (`kubectl get deployments -A -l app.kubernetes.io/name=clustered-operator`), or scope each to its own namespaces (watchNamespace)"
            .to_string()
    } else {
        format!("stop {writer:?} from changing it, or change the ClusteredService instead")
    };
    format!(
        "the {kind} was changed back {CONTEST_REPAIRS} times within {} s; the last writer was field manager {writer:?}: {hint}. \
         The operator leaves it until the changes stop",
        CONTEST_WINDOW.as_secs()
    )
}

/// A conflict means the cache was behind: not a failure, look again soon.
fn stale_or(e: kube::Error) -> Result<Ensured, Error> {
    match e {
        kube::Error::Api(ref r) if r.code == 409 => Ok(Ensured::Stale),
        e => Err(e.into()),
    }
}

/// The body of a replace: the live object (its resourceVersion, server-set
/// metadata but managed fields, others' labels) with the desired spec, the desired labels and
/// annotations on top and the desired owner references.
fn onto_live(live: &serde_json::Value, desired: &serde_json::Value) -> serde_json::Value {
    let mut body = live.clone();
    if let Some(meta) = body.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        // The cache keeps them trimmed; left out, the API server keeps its own.
        meta.remove("managedFields");
    }
    if let Some(object) = body.as_object_mut() {
        object.remove("status");
        match desired.get("spec") {
            Some(spec) => object.insert("spec".into(), spec.clone()),
            None => object.remove("spec"),
        };
    }
    let meta = &mut body["metadata"];
    for field in ["labels", "annotations"] {
        if let Some(ours) = desired["metadata"][field].as_object() {
            for (key, value) in ours {
                meta[field][key] = value.clone();
            }
        }
    }
    if let Some(annotations) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
        annotations.remove(APPLIED_HASH);
    }
    meta["ownerReferences"] = desired["metadata"]["ownerReferences"].clone();
    body
}

/// True when `rendered` (the API server's rendering of the desired object)
/// and `live` differ in anything the operator owns: the whole spec, its
/// labels' and annotations' values, the owner references.
fn drifted(rendered: &serde_json::Value, live: &serde_json::Value) -> bool {
    let differ = |field: &str| {
        rendered["metadata"][field]
            .as_object()
            .is_some_and(|ours| ours.iter().any(|(k, v)| live["metadata"][field].get(k) != Some(v)))
    };
    rendered.get("spec") != live.get("spec")
        || differ("labels")
        || differ("annotations")
        || rendered["metadata"]["ownerReferences"] != live["metadata"]["ownerReferences"]
}

/// The pod count before a scale the user asked for, or `None`. A scale is
/// the operator changing the Deployment's replicas it set itself; a count
/// someone else set on the Deployment (`kubectl scale deployment`) is
/// drift, and undoing it is not a scale.
pub(super) fn scaled_from(previous: &Deployment, desired: i32) -> Option<i32> {
    let from = previous.spec.as_ref()?.replicas.filter(|&r| r != desired)?;
    let ours = previous.managed_fields().iter().any(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").and_then(|s| s.get("f:replicas")).is_some())
    });
    ours.then_some(from)
}

fn content_hash(value: &impl Serialize) -> String {
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(value).unwrap_or_default().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_changes_undone_within_a_minute_are_a_contest() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut repairs: VecDeque<Instant> = [0, 10, 20, 30].map(at).into();
        assert!(!contested(&mut repairs, at(40)), "four is a busy person");
        repairs.push_back(at(40));
        assert!(contested(&mut repairs, at(41)));
        // A minute after the first, it drops out of the window.
        assert!(!contested(&mut repairs, at(60)));
        assert_eq!(repairs.len(), 4);
    }

    #[test]
    fn the_contest_names_the_last_writer_and_the_fix() {
        let entry = |manager: &str, secs: i64| ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Update".into()),
            time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"),
            )),
            ..Default::default()
        };
        let status_update =
            ManagedFieldsEntry { subresource: Some("status".into()), ..entry("kube-controller-manager", 3) };
        let m = contest_message("Deployment", &[entry("kubectl-edit", 1), entry(MANAGER, 2), status_update]);
        assert!(m.contains("field manager \"clustered-operator\"") && m.contains("another clustered operator"), "{m}");
        let m = contest_message("Deployment", &[entry(MANAGER, 1), entry("argocd-controller", 2)]);
        assert!(m.contains("stop \"argocd-controller\" from changing it"), "{m}");
    }
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use serde_json::json;

    fn live_service() -> serde_json::Value {
        json!({
            "metadata": {
                "name": "web", "resourceVersion": "42",
                "labels": {"clustered.dev/service": "web", "team": "shop"},
                "annotations": {"clustered.dev/applied-hash": "00", "note": "keep"},
                "ownerReferences": [{"uid": "1234"}],
                "managedFields": [{"manager": "clustered-operator", "operation": "Update"}],
            },
            "spec": {"clusterIP": "10.96.0.7", "ports": [{"name": "http", "port": 9999}, {"name": "x", "port": 1}]},
            "status": {"loadBalancer": {}},
        })
    }

    fn desired_service() -> serde_json::Value {
        json!({
            "metadata": {"name": "web", "labels": {"clustered.dev/service": "web"}, "ownerReferences": [{"uid": "1234"}]},
            "spec": {"ports": [{"name": "http", "port": 8080}]},
        })
    }

    #[test]
    fn the_replace_body_keeps_the_live_metadata_and_takes_the_whole_desired_spec() {
        let body = onto_live(&live_service(), &desired_service());
        assert_eq!(body["spec"], json!({"ports": [{"name": "http", "port": 8080}]}), "ports replaced as a list");
        assert_eq!(body["metadata"]["resourceVersion"], "42", "the replace is conditional on what was compared");
        assert_eq!(body["metadata"]["labels"]["team"], "shop", "others' labels stay");
        assert_eq!(body["metadata"]["annotations"], json!({"note": "keep"}), "the old hash annotation goes");
        assert!(
            body["metadata"].get("managedFields").is_none(),
            "the API server keeps its own (the cache's are trimmed)"
        );
        assert!(body.get("status").is_none());
    }

    #[test]
    fn drift_is_any_difference_in_spec_our_labels_or_owner() {
        let mut rendered = live_service();
        rendered["metadata"]["labels"] = json!({"clustered.dev/service": "web"});
        assert!(!drifted(&rendered, &live_service()), "others' labels and annotations are not drift");

        let mut live = live_service();
        live["spec"]["ports"][0]["port"] = json!(8080);
        assert!(drifted(&rendered, &live), "a changed port");
        let mut live = live_service();
        live["metadata"]["labels"]["clustered.dev/service"] = json!("other");
        assert!(drifted(&rendered, &live), "a changed label of ours");
        let mut live = live_service();
        live["metadata"]["ownerReferences"] = json!([]);
        assert!(drifted(&rendered, &live), "a removed owner");
        let mut live = live_service();
        live["spec"]["sessionAffinity"] = json!("ClientIP");
        assert!(drifted(&rendered, &live), "a field someone added");
        // An older operator wrote no spec hash: writing it is a change.
        let mut ours = rendered.clone();
        ours["metadata"]["annotations"]["clustered.dev/spec-hash"] = json!("0123");
        assert!(drifted(&ours, &live_service()), "an annotation of ours missing");
    }

    #[test]
    fn the_replace_body_carries_our_annotations_beside_others() {
        let mut desired = desired_service();
        desired["metadata"]["annotations"] = json!({"clustered.dev/spec-hash": "0123"});
        let body = onto_live(&live_service(), &desired);
        assert_eq!(body["metadata"]["annotations"], json!({"note": "keep", "clustered.dev/spec-hash": "0123"}));
    }

    fn deployment(replicas: i32, replicas_owner: &str) -> Deployment {
        Deployment {
            metadata: kube::api::ObjectMeta {
                managed_fields: Some(vec![
                    ManagedFieldsEntry {
                        manager: Some(replicas_owner.into()),
                        fields_v1: Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}}))),
                        ..Default::default()
                    },
                    ManagedFieldsEntry {
                        manager: Some(MANAGER.into()),
                        fields_v1: Some(FieldsV1(json!({"f:spec": {"f:template": {}}}))),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            },
            spec: Some(DeploymentSpec { replicas: Some(replicas), ..Default::default() }),
            status: None,
        }
    }

    #[test]
    fn a_scale_is_the_operator_changing_its_own_replica_count() {
        assert_eq!(scaled_from(&deployment(1, MANAGER), 2), Some(1));
        assert_eq!(scaled_from(&deployment(2, MANAGER), 2), None, "no change");
        assert_eq!(scaled_from(&deployment(5, "kubectl"), 2), None, "undoing someone's scale is drift repair");
    }
}
