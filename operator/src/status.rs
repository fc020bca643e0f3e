//! The observed state: a pure function from the pods and what their
//! clusterds report to the ClusteredService's status.

use std::collections::BTreeMap;

use clustered_api::v1alpha1::{
    ClusteredService, ClusteredServiceStatus, Instance, InstanceWorker, Summary, WorkerState, WorkerTotals,
};
use clustered_api::wire::ClusterdStatus;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::resources::selector_string;

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What one pod's clusterd said, or why it could not be asked.
pub type Report = Result<ClusterdStatus, String>;

/// Everything the status is computed from.
pub struct Observed<'a> {
    pub deployment: Option<&'a Deployment>,
    /// The CR's pods, including terminating ones.
    pub pods: Vec<&'a Pod>,
    /// Reports by pod name, for the pods that were asked.
    pub reports: &'a BTreeMap<String, Report>,
    /// Why the spec could not be turned into a Deployment, if it could not.
    pub problem: Option<String>,
}

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
        degraded(observed.problem.as_deref(), observed.deployment, &instances),
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
        instances,
        conditions,
    }
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

/// Degraded when something needs a person: a worker crash-looping, a
/// rollout that stopped making progress, or a ready pod whose workers are
/// not all serving.
fn degraded(problem: Option<&str>, deployment: Option<&Deployment>, instances: &[Instance]) -> Verdict {
    if let Some(problem) = problem {
        return (DEGRADED, true, "InvalidSpec", problem.to_string());
    }
    let crash_looping = workers_in(instances, WorkerState::CrashLoop);
    if !crash_looping.is_empty() {
        return (DEGRADED, true, "WorkerCrashLoop", format!("workers crash-looping: {}", crash_looping.join(", ")));
    }
    let stalled = deployment
        .and_then(|d| d.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Progressing").cloned())
        .filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    if let Some(c) = stalled {
        return (DEGRADED, true, "ProgressDeadlineExceeded", c.message.unwrap_or_default());
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
    (DEGRADED, false, "AsExpected", "no worker is crash-looping or failing health checks".into())
}

/// `pod/id` of every worker in `state`.
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
pub fn changed(old: Option<&ClusteredServiceStatus>, new: &ClusteredServiceStatus) -> bool {
    old != Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{APP, csvc};
    use clustered_api::wire::{CpuLimit, WorkerStatus};
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};

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
    fn crash_loop_degrades_and_names_the_worker() {
        let cr = csvc(APP);
        let a = pod("web-a", true);
        let reports = BTreeMap::from([("web-a".to_string(), report(&[WorkerState::Ready, WorkerState::CrashLoop]))]);
        let d = settled_deployment(1);
        let status = compute(
            &cr,
            &Observed { deployment: Some(&d), pods: vec![&a], reports: &reports, problem: None },
            Timestamp::UNIX_EPOCH,
        );
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "WorkerCrashLoop"));
        assert!(degraded.message.contains("web-a/1"), "{}", degraded.message);
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
        let t2 = Timestamp::from_second(2_000).expect("t2");
        let mut cr = cr;
        cr.status = Some(compute(&cr, &observed, t1));
        let again = compute(&cr, &observed, t2);
        assert!(!changed(cr.status.as_ref(), &again), "nothing changed, nothing to write");
        assert_eq!(condition(&again, AVAILABLE).last_transition_time, Time(t1));

        let down = pod("web-a", false);
        let observed = Observed { deployment: Some(&d), pods: vec![&down], reports: &reports, problem: None };
        let flipped = compute(&cr, &observed, t2);
        assert_eq!(condition(&flipped, AVAILABLE).status, "False");
        assert_eq!(condition(&flipped, AVAILABLE).last_transition_time, Time(t2));
        assert!(changed(cr.status.as_ref(), &flipped));
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
}
