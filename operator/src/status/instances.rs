//! Each pod's instance: its workers as its clusterd reports them.

use std::collections::BTreeSet;

use clustered_api::v1alpha1::{Instance, InstanceWorker, WorkerState};
use clustered_api::wire::OOM_KILLED;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{RECENT_EXIT_SECONDS, Report};

/// The port modes the pods report, distinct and sorted.
pub(super) fn port_modes(instances: &[Instance]) -> Option<String> {
    let modes: BTreeSet<&str> = instances.iter().filter_map(|i| i.port_mode.as_deref()).collect();
    (!modes.is_empty()).then(|| modes.into_iter().collect::<Vec<_>>().join(","))
}

/// The versions the pods' clusterd report, as [`port_modes`].
pub(super) fn clusterd_versions(instances: &[Instance]) -> Option<String> {
    let versions: BTreeSet<&str> = instances.iter().filter_map(|i| i.clusterd_version.as_deref()).collect();
    (!versions.is_empty()).then(|| versions.into_iter().collect::<Vec<_>>().join(","))
}

pub(super) fn instance(pod: &Pod, report: Option<&Report>) -> Instance {
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
            instance.clusterd_version = Some(status.version.clone()).filter(|v| !v.is_empty());
            instance.port_mode_reason = Some(status.port_mode_reason.clone()).filter(|r| !r.is_empty());
            instance.ready_workers = status.workers.iter().filter(|w| w.state.is_ready()).count() as i32;
            // One entry per slot: the list is keyed by id in the CRD, and
            // the API server refuses a status with an id twice. clusterd
            // lists a process still draining after a reload under its old
            // slot's id, after the slots.
            let mut slots = BTreeSet::new();
            instance.workers = status
                .workers
                .iter()
                .filter(|w| slots.insert(w.id))
                .map(|w| InstanceWorker {
                    id: w.id as i32,
                    pid: w.pid.map(i64::from),
                    state: w.state,
                    restarts: w.restarts as i32,
                    last_exit: w.last_exit.clone(),
                    since: w.since.clone(),
                    cpu_cores: w.cpu_cores.map(round_cores),
                    memory_bytes: w.memory_bytes.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
                })
                .collect();
            instance.cpu_cores = sum(instance.workers.iter().map(|w| w.cpu_cores)).map(round_cores);
            instance.memory_bytes = sum(instance.workers.iter().map(|w| w.memory_bytes));
        }
        Some(Err(why)) => instance.message = Some(why.clone()),
        None => instance.message = Some(pending_reason(pod)),
    }
    instance
}

/// Cores to the millicore, as Kubernetes counts CPU.
fn round_cores(cores: f64) -> f64 {
    (cores * 1000.0).round() / 1000.0
}

/// The sum of the figures that are known; `None` when none is.
fn sum<T: std::iter::Sum<T>>(figures: impl Iterator<Item = Option<T>>) -> Option<T> {
    let mut known = figures.flatten().peekable();
    known.peek().is_some().then(|| known.sum())
}

/// The CPU and memory of every pod's workers, as `kubectl top` writes them
/// (`1250m`, `312Mi`): the CPU and MEMORY columns of `kubectl get csvc -o wide`.
pub(super) fn usage_summary(instances: &[Instance]) -> (Option<String>, Option<String>) {
    let cores = sum(instances.iter().map(|i| i.cpu_cores));
    let bytes = sum(instances.iter().map(|i| i.memory_bytes));
    (cores.map(|c| format!("{}m", (c * 1000.0).round() as i64)), bytes.map(|b| format!("{}Mi", b >> 20)))
}

/// Equal but for the CPU and memory figures, which move at every poll: a
/// status is not written for them alone (they ride along with any other
/// change, and with the heartbeat at least every minute), or every pod's
/// every poll would cost a write. Field by field: a new field is a compile
/// error here until it is placed.
pub(super) fn same_but_usage(a: &[Instance], b: &[Instance]) -> bool {
    let same_worker = |x: &InstanceWorker, y: &InstanceWorker| {
        let InstanceWorker { id, pid, state, restarts, last_exit, since, cpu_cores: _, memory_bytes: _ } = x;
        (id, pid, state, restarts, last_exit, since) == (&y.id, &y.pid, &y.state, &y.restarts, &y.last_exit, &y.since)
    };
    let same_instance = |x: &Instance, y: &Instance| {
        let Instance {
            pod,
            node,
            cpu_limit,
            desired_workers,
            ready_workers,
            message,
            port_mode,
            port_mode_reason,
            workers,
            cpu_cores: _,
            memory_bytes: _,
            clusterd_version,
        } = x;
        (pod, node, cpu_limit, desired_workers, ready_workers, message, port_mode, port_mode_reason, clusterd_version)
            == (
                &y.pod,
                &y.node,
                &y.cpu_limit,
                &y.desired_workers,
                &y.ready_workers,
                &y.message,
                &y.port_mode,
                &y.port_mode_reason,
                &y.clusterd_version,
            )
            && workers.len() == y.workers.len()
            && workers.iter().zip(&y.workers).all(|(w, v)| same_worker(w, v))
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_instance(x, y))
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

/// A worker the kernel's OOM killer stopped at the container's memory limit
/// within [`RECENT_EXIT_SECONDS`] (clusterd reads the cgroup's OOM kill
/// count; the container itself lives on, so the Pod does not say so).
pub(super) fn worker_oom_kill(instances: &[Instance], now: Timestamp) -> Option<String> {
    instances.iter().find_map(|i| {
        i.workers.iter().find_map(|w| {
            let exit = w.last_exit.as_deref().filter(|e| e.starts_with(OOM_KILLED))?;
            let since: Timestamp = w.since.as_deref()?.parse().ok()?;
            (now.as_second() - since.as_second() < RECENT_EXIT_SECONDS)
                .then(|| format!("pod {}, worker {}: {exit}; raise the memory limit or fix the leak", i.pod, w.id))
        })
    })
}

/// `pod/id` of every worker in `state`.
pub fn workers_in(instances: &[Instance], state: WorkerState) -> Vec<String> {
    instances
        .iter()
        .flat_map(|i| i.workers.iter().filter(move |w| w.state == state).map(move |w| format!("{}/{}", i.pod, w.id)))
        .collect()
}
