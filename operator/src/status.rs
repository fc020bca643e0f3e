//! The observed state: a pure function from the pods and what their
//! clusterds report to the ClusteredService's status.

use std::collections::BTreeMap;

use clustered_api::v1alpha1::{
    ClusteredService, ClusteredServiceStatus, Instance, InstanceWorker, Summary, WorkerCount, WorkerState, WorkerTotals,
};
use clustered_api::wire::{ClusterdStatus, OOM_KILLED};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::resources::selector_string;

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
    /// Why the operator could not do its own part, if it could not.
    pub problem: Option<Problem>,
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
    let workers = WorkerTotals {
        desired: instances.iter().map(|i| i.desired_workers).sum(),
        ready: instances.iter().map(|i| i.ready_workers).sum(),
    };
    let desired_replicas = csvc.spec.replicas;

    let previous = csvc.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conditions = [
        available(desired_replicas, ready_replicas),
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
            pods: format!("{ready_replicas}/{desired_replicas}"),
            workers: format!("{}/{}", workers.ready, workers.desired),
        },
        workers,
        conditions,
        observed_at: Some(Time(now)),
        port_mode: port_modes(&instances),
        instances,
        // Filled in by the autoscaler (see `autoscale::reconcile`).
        autoscaling: None,
    }
}

/// The port modes the pods report, distinct and sorted.
fn port_modes(instances: &[Instance]) -> Option<String> {
    let modes: std::collections::BTreeSet<&str> = instances.iter().filter_map(|i| i.port_mode.as_deref()).collect();
    (!modes.is_empty()).then(|| modes.into_iter().collect::<Vec<_>>().join(","))
}

fn instance(pod: &Pod, report: Option<&Report>) -> Instance {
    let mut instance = Instance {
        pod: pod.name_any(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ..Instance::default()
    };
    match report {
        Some(Ok(status)) => {
            instance.cpu_limit = status.cpu.cores;
            instance.desired_workers = status.desired_workers as i32;
            instance.port_mode = Some(status.port_mode.clone()).filter(|m| !m.is_empty());
            instance.port_mode_reason = Some(status.port_mode_reason.clone()).filter(|r| !r.is_empty());
            instance.ready_workers = status.workers.iter().filter(|w| w.state.is_ready()).count() as i32;
            instance.workers = status
                .workers
                .iter()
                .map(|w| InstanceWorker {
                    id: w.id as i32,
                    pid: w.pid.map(i64::from),
                    state: w.state,
                    restarts: w.restarts as i32,
                    last_exit: w.last_exit.clone(),
                    since: w.since.clone(),
                })
                .collect();
        }
        Some(Err(why)) => instance.message = Some(why.clone()),
        None => instance.message = Some(pending_reason(pod)),
    }
    instance
}

fn pending_reason(pod: &Pod) -> String {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    format!("pod is {phase}; clusterd not asked yet")
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

type Verdict = (&'static str, bool, &'static str, String);

/// Available when no more pods are missing than the disruption budget
/// allows (one), and at least one serves.
fn available(desired: i32, ready: i32) -> Verdict {
    if desired == 0 {
        return (AVAILABLE, true, "ScaledToZero", "no pods are wanted".into());
    }
    let needed = (desired - 1).max(1);
    let message = format!("{ready} of {desired} pods ready, at least {needed} needed");
    if ready >= needed {
        (AVAILABLE, true, "MinimumPodsAvailable", message)
    } else {
        (AVAILABLE, false, "MinimumPodsUnavailable", message)
    }
}

fn progressing(
    csvc: &ClusteredService,
    deployment: Option<&Deployment>,
    pods: i32,
    ready: i32,
    workers: &WorkerTotals,
) -> Verdict {
    let desired = csvc.spec.replicas;
    let Some(deployment) = deployment else {
        return (PROGRESSING, true, "Creating", "the Deployment does not exist yet".into());
    };
    let status = deployment.status.clone().unwrap_or_default();
    if status.observed_generation < deployment.metadata.generation {
        return (PROGRESSING, true, "RollingOut", "the Deployment controller has not seen the latest spec yet".into());
    }
    let updated = status.updated_replicas.unwrap_or(0);
    if updated < desired || pods != desired {
        let message = format!("{updated} of {desired} pods updated, {pods} exist");
        return (PROGRESSING, true, "RollingOut", message);
    }
    if ready < desired || workers.ready < workers.desired {
        let message = format!("{ready} of {desired} pods and {} of {} workers ready", workers.ready, workers.desired);
        return (PROGRESSING, true, "WaitingForReady", message);
    }
    (PROGRESSING, false, "Complete", format!("{desired} pods with {} workers are up to date and ready", workers.ready))
}

/// Degraded when something needs a person: the operator's own work
/// failing, pods that cannot be created, scheduled, pulled or kept
/// running, a worker crash-looping, a rollout that stopped making progress,
/// or a ready pod whose workers are not all serving. The first cause found
/// wins, in that order.
fn degraded(
    csvc: &ClusteredService,
    observed: &Observed<'_>,
    live: &[&Pod],
    instances: &[Instance],
    now: Timestamp,
) -> Verdict {
    match &observed.problem {
        Some(Problem::InvalidSpec(why)) => return (DEGRADED, true, "InvalidSpec", why.clone()),
        Some(Problem::ReconcileError(why)) => return (DEGRADED, true, "ReconcileError", why.clone()),
        Some(Problem::ImageConfigUnavailable(why)) => return (DEGRADED, true, IMAGE_CONFIG_UNAVAILABLE, why.clone()),
        None => {}
    }
    if let Some((reason, message)) = pod_trouble(observed.deployment, live, now) {
        return (DEGRADED, true, reason, message);
    }
    if let Some(message) = worker_oom_kill(instances, now) {
        return (DEGRADED, true, "OOMKilled", message);
    }
    let crash_looping = workers_in(instances, WorkerState::CrashLoop);
    if !crash_looping.is_empty() {
        let mut message = format!("workers crash-looping: {}", crash_looping.join(", "));
        // clusterd's account of the last exit says what the app missed
        // (e.g. what inherit or reuseport mode needs from it).
        let last_exit = instances
            .iter()
            .flat_map(|i| &i.workers)
            .find(|w| w.state == WorkerState::CrashLoop)
            .and_then(|w| w.last_exit.as_deref());
        if let Some(exit) = last_exit {
            message.push_str(&format!("; last exit: {exit}"));
        }
        return (DEGRADED, true, "WorkerCrashLoop", message);
    }
    let stalled = deployment_condition(observed.deployment, "Progressing")
        .filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    if let Some(c) = stalled {
        return (DEGRADED, true, "ProgressDeadlineExceeded", c.message.clone().unwrap_or_default());
    }
    let unhealthy = workers_in(instances, WorkerState::Unhealthy);
    if !unhealthy.is_empty() {
        return (
            DEGRADED,
            true,
            "WorkersUnhealthy",
            format!("workers failing health checks: {}", unhealthy.join(", ")),
        );
    }
    if let Some(message) = no_cpu_limit(csvc, observed) {
        return (DEGRADED, false, NO_CPU_LIMIT, message);
    }
    (DEGRADED, false, "AsExpected", "no worker is crash-looping or failing health checks".into())
}

/// Reason of the (not degraded) condition saying the worker count came
/// from the node's CPUs because the container has no CPU limit.
pub const NO_CPU_LIMIT: &str = "NoCpuLimit";

/// With `count: auto`, a clusterd that found no CPU limit in its cgroup
/// runs one worker per CPU of the node: rarely what the user meant.
fn no_cpu_limit(csvc: &ClusteredService, observed: &Observed<'_>) -> Option<String> {
    if csvc.spec.workers.count != WorkerCount::Auto {
        return None;
    }
    let (pod, status) = observed
        .reports
        .iter()
        .filter_map(|(pod, report)| Some((pod, report.as_ref().ok()?)))
        .find(|(_, status)| status.cpu.cores.is_none())?;
    Some(format!(
        "the app container has no CPU limit, so clusterd used the node's CPU count: pod {pod} runs {} workers; \
         set resources.limits.cpu on the app container (or a fixed spec.workers.count)",
        status.desired_workers
    ))
}

/// Why pods are missing or not running, from the Deployment's conditions
/// and the pods' own status: the reason and the underlying message.
pub fn pod_trouble(deployment: Option<&Deployment>, pods: &[&Pod], now: Timestamp) -> Option<(&'static str, String)> {
    // The ReplicaSet's FailedCreate (admission, quota) is copied into the
    // Deployment's ReplicaFailure condition.
    if let Some(c) = deployment_condition(deployment, "ReplicaFailure").filter(|c| c.status == "True") {
        return Some(("PodCreationFailed", c.message.clone().unwrap_or_else(|| c.reason.clone().unwrap_or_default())));
    }
    pods.iter().find_map(|pod| {
        let name = pod.name_any();
        let status = pod.status.as_ref()?;
        let unschedulable =
            status.conditions.iter().flatten().find(|c| {
                c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
            });
        if let Some(c) = unschedulable {
            return Some(("Unschedulable", format!("pod {name}: {}", c.message.clone().unwrap_or_default())));
        }
        let containers =
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
        containers
            .filter_map(|c| {
                container_trouble(c, now)
                    .map(|(reason, why)| (reason, format!("pod {name}, container {}: {why}", c.name)))
            })
            .min_by_key(|(reason, _)| CONTAINER_REASONS.iter().position(|r| r == reason))
    })
}

fn deployment_condition<'a>(
    deployment: Option<&'a Deployment>,
    type_: &str,
) -> Option<&'a k8s_openapi::api::apps::v1::DeploymentCondition> {
    deployment?.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
}

/// Container reasons, most telling first.
const CONTAINER_REASONS: [&str; 4] = ["ImagePullFailed", "ContainerCannotStart", "OOMKilled", "ContainerCrashLoop"];

/// What is wrong with one container, if anything: an image that cannot be
/// pulled, a container that cannot be created, or one that keeps exiting
/// (with the message it left in its termination log, clusterd's own error).
fn container_trouble(c: &ContainerStatus, now: Timestamp) -> Option<(&'static str, String)> {
    let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
    let waiting_reason = waiting.and_then(|w| w.reason.as_deref()).unwrap_or_default();
    let waiting_message = || waiting.and_then(|w| w.message.clone()).unwrap_or_else(|| waiting_reason.to_string());
    match waiting_reason {
        "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" | "InvalidImageName" => {
            return Some(("ImagePullFailed", waiting_message()));
        }
        "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
            return Some(("ContainerCannotStart", waiting_message()));
        }
        _ => {}
    }
    // The exit to explain: the current one, or the last one while the
    // container waits to be restarted or if it was recent (a container
    // that crashes again and again runs in between: that is no recovery).
    let current = c.state.as_ref().and_then(|s| s.terminated.as_ref());
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).filter(|t| {
        waiting_reason == "CrashLoopBackOff"
            || t.finished_at.as_ref().is_some_and(|at| now.as_second() - at.0.as_second() < RECENT_EXIT_SECONDS)
    });
    let exit = current
        .filter(|t| t.exit_code != 0)
        .or(last.filter(|t| t.exit_code != 0 || waiting_reason == "CrashLoopBackOff"))?;
    let reason = if exit.reason.as_deref() == Some("OOMKilled") { "OOMKilled" } else { "ContainerCrashLoop" };
    let mut why = format!("exited with code {}", exit.exit_code);
    if let Some(r) = exit.reason.as_deref().filter(|r| !r.is_empty()) {
        why.push_str(&format!(" ({r})"));
    }
    if let Some(m) = exit.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        why.push_str(&format!(": {m}"));
    }
    Some((reason, why))
}

/// `pod/id` of every worker in `state`.
/// A worker the kernel's OOM killer stopped at the container's memory limit
/// within [`RECENT_EXIT_SECONDS`] (clusterd reads the cgroup's OOM kill
/// count; the container itself lives on, so the Pod does not say so).
fn worker_oom_kill(instances: &[Instance], now: Timestamp) -> Option<String> {
    instances.iter().find_map(|i| {
        i.workers.iter().find_map(|w| {
            let exit = w.last_exit.as_deref().filter(|e| e.starts_with(OOM_KILLED))?;
            let since: Timestamp = w.since.as_deref()?.parse().ok()?;
            (now.as_second() - since.as_second() < RECENT_EXIT_SECONDS)
                .then(|| format!("pod {}, worker {}: {exit}; raise the memory limit or fix the leak", i.pod, w.id))
        })
    })
}

pub fn workers_in(instances: &[Instance], state: WorkerState) -> Vec<String> {
    instances
        .iter()
        .flat_map(|i| i.workers.iter().filter(move |w| w.state == state).map(move |w| format!("{}/{}", i.pod, w.id)))
        .collect()
}

fn transition_time(previous: &[Condition], type_: &str, status: bool, now: Timestamp) -> Time {
    let status = if status { "True" } else { "False" };
    previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now))
}

/// True when `new` differs from `old` in anything but condition timestamps
/// (which only move with a status change anyway), so unchanged status is
/// never written.
/// How often a status that has not changed is written anyway, to refresh
/// its `observedAt`: while the operator is down the time ages, a sign that
/// the figures may be stale (`kubectl get csvc` shows it as `OBSERVED`).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);

/// True when `new` (computed at `now`) must be written: it differs from
/// `old` in anything but `observedAt`, or `old` is a heartbeat old.
pub fn changed(old: Option<&ClusteredServiceStatus>, new: &ClusteredServiceStatus, now: Timestamp) -> bool {
    let Some(old) = old else { return true };
    let observed_long_ago =
        old.observed_at.as_ref().is_none_or(|t| now.as_second() - t.0.as_second() >= HEARTBEAT.as_secs() as i64);
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
    } = new;
    let same = (observed_generation, replicas, ready_replicas, selector, workers, summary)
        == (&old.observed_generation, &old.replicas, &old.ready_replicas, &old.selector, &old.workers, &old.summary)
        && (instances, conditions, autoscaling, port_mode)
            == (&old.instances, &old.conditions, &old.autoscaling, &old.port_mode);
    observed_long_ago || !same
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{APP, csvc};
    use clustered_api::wire::{CpuLimit, WorkerStatus};
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodCondition, PodSpec, PodStatus,
    };

    fn pod(name: &str, ready: bool) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: Some(PodSpec { node_name: Some("node-1".into()), ..Default::default() }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn report(states: &[WorkerState]) -> Report {
        Ok(ClusterdStatus {
            cpu: CpuLimit { cores: Some(2.0), source: "cgroup-v1".into() },
            desired_workers: states.len() as u32,
            workers: states
                .iter()
                .enumerate()
                .map(|(id, &state)| WorkerStatus {
                    id: id as u32,
                    pid: Some(100 + id as u32),
                    state,
                    restarts: id as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn settled_deployment(replicas: i32) -> Deployment {
        Deployment {
            metadata: kube::api::ObjectMeta { generation: Some(1), ..Default::default() },
            spec: None,
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(replicas),
                updated_replicas: Some(replicas),
                ready_replicas: Some(replicas),
                ..Default::default()
            }),
        }
    }

    fn condition<'a>(status: &'a ClusteredServiceStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).expect("condition present")
    }

    #[test]
    fn healthy_service_is_available_settled_and_not_degraded() {
        let cr = csvc(&format!("  replicas: 2\n{APP}"));
        let (a, b) = (pod("web-a", true), pod("web-b", true));
        let reports = BTreeMap::from([
            ("web-a".to_string(), report(&[WorkerState::Ready, WorkerState::Ready])),
            ("web-b".to_string(), report(&[WorkerState::Ready, WorkerState::Ready])),
        ]);
        let d = settled_deployment(2);
        let status = compute(
            &cr,
            &Observed { deployment: Some(&d), pods: vec![&b, &a], reports: &reports, problem: None },
            Timestamp::UNIX_EPOCH,
        );

        assert_eq!(status.observed_generation, Some(4));
        assert_eq!((status.replicas, status.ready_replicas), (2, 2));
        assert_eq!(status.selector, "clustered.dev/service=web");
        assert_eq!(status.workers, WorkerTotals { desired: 4, ready: 4 });
        assert_eq!(status.summary, Summary { pods: "2/2".into(), workers: "4/4".into() });
        assert_eq!(status.instances.iter().map(|i| i.pod.as_str()).collect::<Vec<_>>(), ["web-a", "web-b"]);
        let first = &status.instances[0];
        assert_eq!((first.cpu_limit, first.node.as_deref()), (Some(2.0), Some("node-1")));
        assert_eq!(first.workers[1].pid, Some(101));
        assert_eq!(first.workers[1].restarts, 1);
        assert_eq!(condition(&status, AVAILABLE).status, "True");
        assert_eq!(condition(&status, PROGRESSING).reason, "Complete");
        assert_eq!(condition(&status, DEGRADED).status, "False");
        assert!(status.conditions.iter().all(|c| c.observed_generation == Some(4)));
    }

    #[test]
    fn a_worker_oom_kill_is_oom_killed_while_recent() {
        let cr = csvc(APP);
        let a = pod("web-a", true);
        let oom_at = |since: Timestamp| {
            let mut r = report(&[WorkerState::Ready, WorkerState::Ready]);
            if let Ok(r) = &mut r {
                r.workers[1].last_exit = Some(format!("{OOM_KILLED} (SIGKILL from the kernel)"));
                r.workers[1].since = Some(since.to_string());
            }
            BTreeMap::from([("web-a".to_string(), r)])
        };
        let d = settled_deployment(1);
        let now = Timestamp::from_second(1_000_000).expect("time");
        let recent = oom_at(Timestamp::from_second(1_000_000 - 60).expect("time"));
        let status =
            compute(&cr, &Observed { deployment: Some(&d), pods: vec![&a], reports: &recent, problem: None }, now);
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "OOMKilled"));
        assert!(degraded.message.starts_with("pod web-a, worker 1: OOM killed"), "{}", degraded.message);

        let old = oom_at(Timestamp::from_second(1_000_000 - RECENT_EXIT_SECONDS - 1).expect("time"));
        let status =
            compute(&cr, &Observed { deployment: Some(&d), pods: vec![&a], reports: &old, problem: None }, now);
        assert_eq!(condition(&status, DEGRADED).status, "False", "an OOM kill long ago is history");
    }

    #[test]
    fn crash_loop_degrades_and_names_the_worker() {
        let cr = csvc(APP);
        let a = pod("web-a", true);
        let mut looping = report(&[WorkerState::Ready, WorkerState::CrashLoop]);
        if let Ok(r) = &mut looping {
            r.workers[1].last_exit = Some("exit code 1 before it was ready: inherit mode passes …".into());
        }
        let reports = BTreeMap::from([("web-a".to_string(), looping)]);
        let d = settled_deployment(1);
        let status = compute(
            &cr,
            &Observed { deployment: Some(&d), pods: vec![&a], reports: &reports, problem: None },
            Timestamp::UNIX_EPOCH,
        );
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "WorkerCrashLoop"));
        assert!(degraded.message.contains("web-a/1"), "{}", degraded.message);
        assert!(degraded.message.ends_with("; last exit: exit code 1 before it was ready: inherit mode passes …"));
        assert_eq!(status.workers, WorkerTotals { desired: 2, ready: 1 });
    }

    #[test]
    fn unreachable_clusterd_and_terminating_pods() {
        let cr = csvc(&format!("  replicas: 3\n{APP}"));
        let a = pod("web-a", false);
        let mut gone = pod("web-z", true);
        gone.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let reports = BTreeMap::from([("web-a".to_string(), Err("connection refused".to_string()))]);
        let status = compute(
            &cr,
            &Observed { deployment: None, pods: vec![&a, &gone], reports: &reports, problem: None },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(status.replicas, 1, "terminating pods are not counted");
        assert_eq!(status.instances.len(), 1, "and have no instance");
        assert_eq!(status.instances[0].message.as_deref(), Some("connection refused"));
        assert_eq!(condition(&status, AVAILABLE).status, "False");
        assert_eq!(condition(&status, PROGRESSING).reason, "Creating");
        assert_eq!(status.summary.pods, "0/3");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let cr = csvc(APP);
        let a = pod("web-a", true);
        let reports = BTreeMap::from([("web-a".to_string(), report(&[WorkerState::Ready]))]);
        let d = settled_deployment(1);
        let observed = Observed { deployment: Some(&d), pods: vec![&a], reports: &reports, problem: None };
        let t1 = Timestamp::from_second(1_000).expect("t1");
        let t2 = Timestamp::from_second(1_030).expect("t2");
        let mut cr = cr;
        cr.status = Some(compute(&cr, &observed, t1));
        let again = compute(&cr, &observed, t2);
        assert!(!changed(cr.status.as_ref(), &again, t2), "nothing changed, nothing to write");
        assert_eq!(condition(&again, AVAILABLE).last_transition_time, Time(t1));
        // A minute on, the same figures are written again: observedAt says
        // they are current.
        let t3 = Timestamp::from_second(1_000 + HEARTBEAT.as_secs() as i64).expect("t3");
        let later = compute(&cr, &observed, t3);
        assert!(changed(cr.status.as_ref(), &later, t3), "heartbeat");
        assert_eq!(later.observed_at, Some(Time(t3)));

        let down = pod("web-a", false);
        let observed = Observed { deployment: Some(&d), pods: vec![&down], reports: &reports, problem: None };
        let flipped = compute(&cr, &observed, t2);
        assert_eq!(condition(&flipped, AVAILABLE).status, "False");
        assert_eq!(condition(&flipped, AVAILABLE).last_transition_time, Time(t2));
        assert!(changed(cr.status.as_ref(), &flipped, t2));
        let mut moved = again.clone();
        moved.port_mode = Some("node".into());
        assert!(changed(cr.status.as_ref(), &moved, t2), "any field but observedAt counts");
    }

    #[test]
    fn scaled_to_zero_is_available() {
        let cr = csvc(&format!("  replicas: 0\n{APP}"));
        let reports = BTreeMap::new();
        let d = settled_deployment(0);
        let status = compute(
            &cr,
            &Observed { deployment: Some(&d), pods: vec![], reports: &reports, problem: None },
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(condition(&status, AVAILABLE).reason, "ScaledToZero");
        assert_eq!(condition(&status, PROGRESSING).status, "False");
    }

    fn container(name: &str, state: ContainerState, last: Option<ContainerStateTerminated>) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(state),
            last_state: last.map(|t| ContainerState { terminated: Some(t), ..Default::default() }),
            restart_count: 1,
            ..Default::default()
        }
    }

    fn waiting(reason: &str, message: &str) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message: Some(message.into()) }),
            ..Default::default()
        }
    }

    fn exited(code: i32, reason: &str, message: &str, at: i64) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: code,
            reason: Some(reason.into()),
            message: Some(message.into()).filter(|m: &String| !m.is_empty()),
            finished_at: Some(Time(Timestamp::from_second(at).expect("time"))),
            ..Default::default()
        }
    }

    fn pod_with(name: &str, containers: Vec<ContainerStatus>) -> Pod {
        let mut p = pod(name, false);
        p.status.as_mut().expect("status").container_statuses = Some(containers);
        p
    }

    const NOW: i64 = 10_000;

    fn trouble(deployment: Option<&Deployment>, pods: &[&Pod]) -> Option<(&'static str, String)> {
        pod_trouble(deployment, pods, Timestamp::from_second(NOW).expect("now"))
    }

    #[test]
    fn a_missing_image_is_image_pull_failed_with_the_kubelet_s_message() {
        let p = pod_with(
            "web-a",
            vec![container("app", waiting("ErrImageNeverPull", "Container image \"x:1\" is not present"), None)],
        );
        let (reason, message) = trouble(None, &[&p]).expect("trouble");
        assert_eq!(reason, "ImagePullFailed");
        assert_eq!(message, "pod web-a, container app: Container image \"x:1\" is not present");
        let backoff = pod_with("web-a", vec![container("app", waiting("ImagePullBackOff", "Back-off pulling"), None)]);
        assert_eq!(trouble(None, &[&backoff]).expect("trouble").0, "ImagePullFailed");
    }

    #[test]
    fn an_unschedulable_pod_says_why() {
        let mut p = pod("web-a", false);
        p.status.as_mut().expect("status").conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/1 nodes are available: 1 Insufficient cpu.".into()),
            ..Default::default()
        }]);
        assert_eq!(
            trouble(None, &[&p]),
            Some(("Unschedulable", "pod web-a: 0/1 nodes are available: 1 Insufficient cpu.".into()))
        );
    }

    #[test]
    fn a_replica_failure_is_pod_creation_failed_and_comes_first() {
        let mut d = settled_deployment(1);
        d.status.as_mut().expect("status").conditions = Some(vec![DeploymentCondition {
            type_: "ReplicaFailure".into(),
            status: "True".into(),
            reason: Some("FailedCreate".into()),
            message: Some("pods \"web-x\" is forbidden: violates PodSecurity \"restricted:latest\"".into()),
            ..Default::default()
        }]);
        let other = pod_with("web-a", vec![container("app", waiting("ErrImagePull", "nope"), None)]);
        let (reason, message) = trouble(Some(&d), &[&other]).expect("trouble");
        assert_eq!(reason, "PodCreationFailed");
        assert!(message.contains("violates PodSecurity"), "{message}");
    }

    #[test]
    fn a_crash_loop_carries_clusterd_s_own_message() {
        let last = exited(127, "Error", "cannot run \"/no/such/binary\": No such file or directory (os error 2)", NOW);
        let p = pod_with("web-a", vec![container("app", waiting("CrashLoopBackOff", "back-off 10s"), Some(last))]);
        let (reason, message) = trouble(None, &[&p]).expect("trouble");
        assert_eq!(reason, "ContainerCrashLoop");
        assert_eq!(
            message,
            "pod web-a, container app: exited with code 127 (Error): cannot run \"/no/such/binary\": No such file or directory (os error 2)"
        );
    }

    #[test]
    fn an_oom_kill_is_oom_killed_until_the_container_has_run_a_while() {
        let running = ContainerState { running: Some(Default::default()), ..Default::default() };
        let oom =
            |at| pod_with("web-a", vec![container("app", running.clone(), Some(exited(137, "OOMKilled", "", at)))]);
        let recent = oom(NOW - 30);
        assert_eq!(
            trouble(None, &[&recent]),
            Some(("OOMKilled", "pod web-a, container app: exited with code 137 (OOMKilled)".into()))
        );
        // Still counted while it runs between kills: no false recovery.
        let mut ready = oom(NOW - 30);
        ready.status.as_mut().expect("status").container_statuses.as_mut().expect("containers")[0].ready = true;
        assert_eq!(trouble(None, &[&ready]).map(|t| t.0), Some("OOMKilled"));
        // Long ago, and running since: fine.
        let old = oom(NOW - RECENT_EXIT_SECONDS - 1);
        assert_eq!(trouble(None, &[&old]), None);
    }

    #[test]
    fn healthy_and_starting_containers_are_no_trouble() {
        let running = ContainerState { running: Some(Default::default()), ..Default::default() };
        let fine = pod_with("web-a", vec![container("app", running, None)]);
        let starting = pod_with("web-b", vec![container("app", waiting("ContainerCreating", ""), None)]);
        assert_eq!(trouble(Some(&settled_deployment(2)), &[&fine, &starting]), None);
    }

    #[test]
    fn pod_trouble_outranks_workers_and_reconcile_errors_outrank_both() {
        let cr = csvc(APP);
        let p = pod_with("web-a", vec![container("app", waiting("ErrImagePull", "no such image"), None)]);
        let reports = BTreeMap::from([("web-a".to_string(), report(&[WorkerState::CrashLoop]))]);
        let d = settled_deployment(1);
        let mut observed = Observed { deployment: Some(&d), pods: vec![&p], reports: &reports, problem: None };
        let status = compute(&cr, &observed, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&status, DEGRADED).reason, "ImagePullFailed");

        observed.problem = Some(Problem::ReconcileError("applying the Service: exceeded quota".into()));
        let status = compute(&cr, &observed, Timestamp::UNIX_EPOCH);
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ReconcileError"));
        assert_eq!(degraded.message, "applying the Service: exceeded quota");
    }

    #[test]
    fn no_cpu_limit_is_said_when_clusterd_used_the_node_s_cpus() {
        let a = pod("web-a", true);
        let mut unlimited = report(&[WorkerState::Ready, WorkerState::Ready]);
        if let Ok(status) = unlimited.as_mut() {
            status.cpu = CpuLimit { cores: None, source: "affinity".into() };
        }
        let reports = BTreeMap::from([("web-a".to_string(), unlimited)]);
        let d = settled_deployment(1);
        let observed = Observed { deployment: Some(&d), pods: vec![&a], reports: &reports, problem: None };
        let status = compute(&csvc(APP), &observed, Timestamp::UNIX_EPOCH);
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("False", NO_CPU_LIMIT));
        assert!(degraded.message.contains("node's CPU count: pod web-a runs 2 workers"), "{}", degraded.message);

        // A fixed worker count does not depend on the CPUs.
        let fixed = csvc(&format!("  workers: {{count: 2}}\n{APP}"));
        assert_eq!(condition(&compute(&fixed, &observed, Timestamp::UNIX_EPOCH), DEGRADED).reason, "AsExpected");
    }
}
