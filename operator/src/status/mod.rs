//! The observed state: a pure function from the pods and what their
//! clusterds report to the ClusteredService's status.
//!
//! * [`conditions`]: Available, Progressing and Degraded, with their reasons.
//! * [`pods`]: why pods are missing or not running.
//! * [`instances`]: each pod's workers, as its clusterd reports them.
//! * [`node_loss`]: pods stranded on a node that stopped reporting.
//! * here: the status as a whole, and when it is worth writing.

mod conditions;
mod instances;
pub mod node_loss;
mod pods;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clustered_api::v1alpha1::{
    ClusterdState, ClusteredService, ClusteredServiceStatus, Instance, PendingClusterdUpdate, Summary, WorkerTotals,
};
use clustered_api::wire::ClusterdStatus;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::resources::selector_string;
use crate::updates::{self, Held};
pub use conditions::NO_CPU_LIMIT;
use conditions::{available, degraded, progressing};
use instances::{clusterd_versions, instance, port_modes, same_but_usage, usage_summary};
pub use instances::{pod_ready, workers_in};
pub use pods::pod_trouble;

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// Degraded reason: the image's ENTRYPOINT/CMD could not be read.
pub const IMAGE_CONFIG_UNAVAILABLE: &str = "ImageConfigUnavailable";

/// What one pod's clusterd said, or why it could not be asked.
pub type Report = Result<ClusterdStatus, String>;

/// Everything the status is computed from.
pub struct Observed<'a> {
    pub deployment: Option<&'a Deployment>,
    /// The CR's pods, including terminating ones.
    pub pods: Vec<&'a Pod>,
    /// Reports by pod name, for the pods that were asked.
    pub reports: &'a BTreeMap<String, Report>,
    /// Pods the Service routes to (listed ready in its EndpointSlices).
    pub serving: &'a BTreeSet<String>,
    /// Why the operator could not do its own part, if it could not.
    pub problem: Option<Problem>,
    /// The operator's clusterd image, and why it does not reach the pods
    /// yet, if it does not.
    pub clusterd_update: Option<(&'a str, &'a Held)>,
}

/// A failure of the operator's own work, as opposed to the pods'.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    /// The spec cannot be turned into a Deployment.
    InvalidSpec(String),
    /// The API server refused a child object (the API's message).
    ReconcileError(String),
    /// The app container sets no command and its image's config could not
    /// be read from the registry (what failed and how to fix it).
    ImageConfigUnavailable(String),
    /// Another writer keeps undoing the operator's changes to a child (who,
    /// and what to do).
    ContestedByAnotherWriter(String),
}

/// A container that ran and stopped this long ago still counts as
/// crashing, so a crash loop's running moments are not reported as a recovery.
const RECENT_EXIT_SECONDS: i64 = 300;

/// The status for `csvc` given what was observed. Conditions keep their
/// `lastTransitionTime` when their status did not change.
pub fn compute(csvc: &ClusteredService, observed: &Observed<'_>, now: Timestamp) -> ClusteredServiceStatus {
    let generation = csvc.metadata.generation;
    let mut live: Vec<&Pod> =
        observed.pods.iter().copied().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    live.sort_by_key(|p| p.name_any());

    let instances: Vec<Instance> =
        live.iter().map(|pod| instance(pod, observed.reports.get(&pod.name_any()))).collect();
    let ready_replicas = live.iter().filter(|p| pod_ready(p)).count() as i32;
    let serving = live.iter().filter(|p| pod_ready(p) && observed.serving.contains(&p.name_any())).count() as i32;
    let workers = WorkerTotals {
        desired: instances.iter().map(|i| i.desired_workers).sum(),
        ready: instances.iter().map(|i| i.ready_workers).sum(),
    };
    let desired_replicas = csvc.spec.replicas;
    let (cpu, memory) = usage_summary(&instances);

    let previous = csvc.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conditions = [
        available(desired_replicas, ready_replicas, serving),
        progressing(csvc, observed.deployment, live.len() as i32, ready_replicas, &workers),
        degraded(csvc, observed, &live, &instances, now),
    ]
    .into_iter()
    .map(|(type_, status, reason, message)| Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: transition_time(previous, type_, status, now),
    })
    .collect();

    ClusteredServiceStatus {
        observed_generation: generation,
        replicas: live.len() as i32,
        ready_replicas,
        selector: selector_string(csvc),
        summary: Summary {
            // During a rollout the old pods serve beside the new ones: the
            // READY column says whether the wanted count serves, never 2/1.
            pods: format!("{}/{desired_replicas}", ready_replicas.min(desired_replicas)),
            workers: format!("{}/{}", workers.ready, workers.desired),
            cpu,
            memory,
        },
        workers,
        conditions,
        observed_at: Some(Time(now)),
        port_mode: port_modes(&instances),
        clusterd: clusterd_state(observed, &instances),
        instances,
        // Filled in by the autoscaler (see `autoscale::reconcile`).
        autoscaling: None,
    }
}

fn clusterd_state(observed: &Observed<'_>, instances: &[Instance]) -> Option<ClusterdState> {
    let state = ClusterdState {
        image: observed.deployment.and_then(updates::clusterd_image).map(str::to_string),
        version: clusterd_versions(instances),
        pending: observed.clusterd_update.map(|(image, held)| PendingClusterdUpdate {
            image: image.to_string(),
            reason: held.reason.to_string(),
            message: held.message.clone(),
        }),
    };
    (state != ClusterdState::default()).then_some(state)
}

fn transition_time(previous: &[Condition], type_: &str, status: bool, now: Timestamp) -> Time {
    let status = if status { "True" } else { "False" };
    previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now))
}

/// The shortest heartbeat period: how often a status that has not changed
/// is written anyway in a small fleet, to refresh its `observedAt` (while
/// the operator is down the time ages, a sign that the figures may be
/// stale; `kubectl get csvc` shows it as `OBSERVED`).
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(60);

/// Over the whole fleet, at most one heartbeat write in this time.
pub const FLEET_HEARTBEAT_SPACING: Duration = Duration::from_secs(1);

/// When a ClusteredService's unchanged status is rewritten: once a
/// `period`, at its own `phase` within the period, so a fleet's heartbeats
/// are spread evenly instead of falling due together after a cold start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heartbeat {
    pub period: Duration,
    pub phase: Duration,
}

impl Heartbeat {
    /// The heartbeat of one of `fleet` ClusteredServices (`uid` places it
    /// in the period). The period is a minute, or longer in a fleet so
    /// large that a minute would cost the API server more than
    /// a write every [`FLEET_HEARTBEAT_SPACING`] (and its watchers as many
    /// events) for news of nothing. The operator's own liveness does not
    /// depend on it: its Lease is renewed every 5 s whatever the fleet's
    /// size, as the kubelet's Lease took over from its node status.
    pub fn of(fleet: usize, uid: &str) -> Self {
        let period =
            MIN_HEARTBEAT.max(FLEET_HEARTBEAT_SPACING.saturating_mul(u32::try_from(fleet).unwrap_or(u32::MAX)));
        let hash = crate::stable_hash(uid.as_bytes());
        Self { period, phase: Duration::from_secs(hash % period.as_secs()) }
    }

    /// The index of the period slot `t` (seconds) falls in.
    fn slot(&self, t: i64) -> i64 {
        (t - self.phase.as_secs() as i64).div_euclid(self.period.as_secs().max(1) as i64)
    }

    /// True when one of this service's heartbeat moments lies after
    /// `written` and no later than `now`.
    pub fn due(&self, written: Timestamp, now: Timestamp) -> bool {
        self.slot(now.as_second()) > self.slot(written.as_second())
    }

    /// How long from `now` until the next heartbeat moment.
    pub fn until_next(&self, now: Timestamp) -> Duration {
        let period = self.period.as_secs().max(1) as i64;
        let next = (self.slot(now.as_second()) + 1) * period + self.phase.as_secs() as i64;
        Duration::from_secs((next - now.as_second()).max(1) as u64)
    }
}

/// True when `new` (computed at `now`) must be written: it differs from
/// `old` in anything but `observedAt`, or a heartbeat fell due since `old`.
pub fn changed(
    old: Option<&ClusteredServiceStatus>,
    new: &ClusteredServiceStatus,
    now: Timestamp,
    heartbeat: Heartbeat,
) -> bool {
    let Some(old) = old else { return true };
    let observed_long_ago = old.observed_at.as_ref().is_none_or(|t| heartbeat.due(t.0, now));
    // Field by field, without copying the instances; a new field is a
    // compile error here until it is compared.
    let ClusteredServiceStatus {
        observed_at: _,
        observed_generation,
        replicas,
        ready_replicas,
        selector,
        workers,
        summary,
        instances,
        conditions,
        autoscaling,
        port_mode,
        clusterd,
    } = new;
    // CPU and memory alone do not make a write (see `same_but_usage`).
    let Summary { pods, workers: worker_summary, cpu: _, memory: _ } = summary;
    let same = (observed_generation, replicas, ready_replicas, selector, workers, pods, worker_summary)
        == (
            &old.observed_generation,
            &old.replicas,
            &old.ready_replicas,
            &old.selector,
            &old.workers,
            &old.summary.pods,
            &old.summary.workers,
        )
        && (conditions, autoscaling, port_mode, clusterd)
            == (&old.conditions, &old.autoscaling, &old.port_mode, &old.clusterd)
        && same_but_usage(instances, &old.instances);
    observed_long_ago || !same
}

#[cfg(test)]
mod tests;
