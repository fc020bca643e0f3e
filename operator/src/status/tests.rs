use super::*;
use crate::resources::test_support::{APP, csvc};
use clustered_api::v1alpha1::WorkerState;
use clustered_api::wire::{CpuLimit, OOM_KILLED, WorkerStatus};
use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodCondition, PodSpec, PodStatus,
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

/// The pods' names: every pod listed in the Service's endpoints.
fn routed(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name_any()).collect()
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
        &Observed {
            deployment: Some(&d),
            pods: vec![&b, &a],
            reports: &reports,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[&b, &a]),
        },
        Timestamp::UNIX_EPOCH,
    );

    assert_eq!(status.observed_generation, Some(4));
    assert_eq!((status.replicas, status.ready_replicas), (2, 2));
    assert_eq!(status.selector, "clustered.dev/service=web");
    assert_eq!(status.workers, WorkerTotals { desired: 4, ready: 4 });
    assert_eq!(status.summary, Summary { pods: "2/2".into(), workers: "4/4".into(), cpu: None, memory: None });
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
    let status = compute(
        &cr,
        &Observed {
            deployment: Some(&d),
            pods: vec![&a],
            reports: &recent,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[&a]),
        },
        now,
    );
    let degraded = condition(&status, DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "OOMKilled"));
    assert!(degraded.message.starts_with("pod web-a, worker 1: OOM killed"), "{}", degraded.message);

    let old = oom_at(Timestamp::from_second(1_000_000 - RECENT_EXIT_SECONDS - 1).expect("time"));
    let status = compute(
        &cr,
        &Observed {
            deployment: Some(&d),
            pods: vec![&a],
            reports: &old,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[&a]),
        },
        now,
    );
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
        &Observed {
            deployment: Some(&d),
            pods: vec![&a],
            reports: &reports,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[&a]),
        },
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
        &Observed {
            deployment: None,
            pods: vec![&a, &gone],
            reports: &reports,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[&a, &gone]),
        },
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
    let observed = Observed {
        deployment: Some(&d),
        pods: vec![&a],
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &routed(&[&a]),
    };
    let t1 = Timestamp::from_second(1_000).expect("t1");
    let t2 = Timestamp::from_second(1_030).expect("t2");
    // Its heartbeat moments are t1, t1 + 1 min, …
    let every_minute = Heartbeat { period: MIN_HEARTBEAT, phase: Duration::from_secs(1_000 % 60) };
    let mut cr = cr;
    cr.status = Some(compute(&cr, &observed, t1));
    let again = compute(&cr, &observed, t2);
    assert!(!changed(cr.status.as_ref(), &again, t2, every_minute), "nothing changed, nothing to write");
    assert_eq!(condition(&again, AVAILABLE).last_transition_time, Time(t1));
    // A minute on, the same figures are written again: observedAt says
    // they are current.
    let t3 = Timestamp::from_second(1_000 + MIN_HEARTBEAT.as_secs() as i64).expect("t3");
    let later = compute(&cr, &observed, t3);
    assert!(changed(cr.status.as_ref(), &later, t3, every_minute), "heartbeat");
    assert_eq!(later.observed_at, Some(Time(t3)));

    let down = pod("web-a", false);
    let observed = Observed {
        deployment: Some(&d),
        pods: vec![&down],
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &routed(&[&down]),
    };
    let flipped = compute(&cr, &observed, t2);
    assert_eq!(condition(&flipped, AVAILABLE).status, "False");
    assert_eq!(condition(&flipped, AVAILABLE).last_transition_time, Time(t2));
    assert!(changed(cr.status.as_ref(), &flipped, t2, every_minute));
    let mut moved = again.clone();
    moved.port_mode = Some("node".into());
    assert!(changed(cr.status.as_ref(), &moved, t2, every_minute), "any field but observedAt counts");
}

#[test]
fn scaled_to_zero_is_available() {
    let cr = csvc(&format!("  replicas: 0\n{APP}"));
    let reports = BTreeMap::new();
    let d = settled_deployment(0);
    let status = compute(
        &cr,
        &Observed {
            deployment: Some(&d),
            pods: vec![],
            reports: &reports,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[]),
        },
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
    let oom = |at| pod_with("web-a", vec![container("app", running.clone(), Some(exited(137, "OOMKilled", "", at)))]);
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
    let mut observed = Observed {
        deployment: Some(&d),
        pods: vec![&p],
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &routed(&[&p]),
    };
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
    let observed = Observed {
        deployment: Some(&d),
        pods: vec![&a],
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &routed(&[&a]),
    };
    let status = compute(&csvc(APP), &observed, Timestamp::UNIX_EPOCH);
    let degraded = condition(&status, DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("False", NO_CPU_LIMIT));
    assert!(degraded.message.contains("node's CPU count: pod web-a runs 2 workers"), "{}", degraded.message);

    // A fixed worker count does not depend on the CPUs.
    let fixed = csvc(&format!("  workers: {{count: 2}}\n{APP}"));
    assert_eq!(condition(&compute(&fixed, &observed, Timestamp::UNIX_EPOCH), DEGRADED).reason, "AsExpected");
}

#[test]
fn a_ready_pod_serves_only_once_the_service_s_endpoints_list_it() {
    let cr = csvc(&format!("  replicas: 1\n{APP}"));
    let a = pod("web-a", true);
    let reports = BTreeMap::from([("web-a".to_string(), report(&[WorkerState::Ready]))]);
    let d = settled_deployment(1);
    let observe = |serving: &BTreeSet<String>| {
        compute(
            &cr,
            &Observed {
                deployment: Some(&d),
                pods: vec![&a],
                reports: &reports,
                problem: None,
                clusterd_update: None,
                serving,
            },
            Timestamp::UNIX_EPOCH,
        )
    };
    let not_yet = observe(&BTreeSet::new());
    let available = condition(&not_yet, AVAILABLE);
    assert_eq!((available.status.as_str(), available.reason.as_str()), ("False", "MinimumPodsUnavailable"));
    assert!(available.message.contains("1 ready, not yet in the Service's endpoints"), "{}", available.message);
    assert_eq!(not_yet.ready_replicas, 1, "the pod itself is ready");

    let listed = observe(&routed(&[&a]));
    assert_eq!(condition(&listed, AVAILABLE).status, "True");
}

#[test]
fn the_ready_column_never_shows_more_pods_than_wanted() {
    // A rollout of one pod: the old one still serves beside the new one.
    let cr = csvc(&format!("  replicas: 1\n{APP}"));
    let (old, new) = (pod("web-old", true), pod("web-new", true));
    let reports = BTreeMap::new();
    let d = settled_deployment(1);
    let status = compute(
        &cr,
        &Observed {
            deployment: Some(&d),
            pods: vec![&old, &new],
            reports: &reports,
            problem: None,
            clusterd_update: None,
            serving: &routed(&[&old, &new]),
        },
        Timestamp::UNIX_EPOCH,
    );
    assert_eq!(status.summary.pods, "1/1");
    assert_eq!(status.ready_replicas, 2, "the count itself stays true");
}

#[test]
fn pods_on_a_lost_node_degrade_with_the_node_and_pods_named_evicted_ones_included() {
    let cr = csvc(&format!("  replicas: 3\n  nodeLossTolerationSeconds: 20\n{APP}"));
    let healthy = |name: &str| {
        let mut p = pod(name, true);
        p.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions").push(PodCondition {
            type_: "ContainersReady".into(),
            status: "True".into(),
            ..Default::default()
        });
        p
    };
    let (a, b) = (healthy("web-a"), healthy("web-b"));
    // Marked not ready by the node lifecycle controller: Ready flipped,
    // ContainersReady left as the kubelet last reported it.
    let mut stranded = healthy("web-c");
    stranded.spec.as_mut().expect("spec").node_name = Some("node-3".into());
    stranded.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions")[0].status = "False".into();
    let reports = BTreeMap::new();
    let serving = routed(&[&a, &b, &stranded]);
    let observe = |pods| Observed {
        deployment: None,
        pods,
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &serving,
    };
    let status = compute(&cr, &observe(vec![&a, &b, &stranded]), Timestamp::UNIX_EPOCH);
    let degraded = condition(&status, DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", node_loss::NODE_UNREACHABLE));
    assert!(degraded.message.contains("node node-3") && degraded.message.contains("web-c"), "{}", degraded.message);
    assert!(degraded.message.contains("20 s"), "{}", degraded.message);

    // Evicted (terminating) until its node comes back: still named.
    let mut evicted = stranded.clone();
    evicted.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    let status = compute(&cr, &observe(vec![&a, &b, &evicted]), Timestamp::UNIX_EPOCH);
    assert_eq!(condition(&status, DEGRADED).reason, node_loss::NODE_UNREACHABLE);
    assert_eq!(status.instances.len(), 2);

    // Gone: clean again.
    let status = compute(&cr, &observe(vec![&a, &b]), Timestamp::UNIX_EPOCH);
    assert_eq!(condition(&status, DEGRADED).status, "False");
}

#[test]
fn heartbeats_cost_the_same_whatever_the_fleet_size() {
    assert_eq!(Heartbeat::of(1, "a").period, MIN_HEARTBEAT);
    assert_eq!(Heartbeat::of(60, "a").period, MIN_HEARTBEAT, "up to 60 services: every minute");
    for fleet in [1_000, 10_000, 100_000] {
        let per_second = fleet as f64 / Heartbeat::of(fleet, "a").period.as_secs_f64();
        assert!((per_second - 1.0 / FLEET_HEARTBEAT_SPACING.as_secs_f64()).abs() < 1e-9, "{fleet}: {per_second}/s");
    }
}

#[test]
fn a_fleet_written_at_once_has_its_heartbeats_spread_over_the_period() {
    let fleet = 600;
    let written = Timestamp::from_second(100_000).expect("cold start");
    let mut due_per_minute = [0; 10];
    for i in 0..fleet {
        let heartbeat = Heartbeat::of(fleet, &format!("uid-{i}"));
        assert_eq!(heartbeat.period, Duration::from_secs(600));
        let first = (1..=600).find(|s| heartbeat.due(written, Timestamp::from_second(100_000 + s).expect("t")));
        let first = first.expect("due within one period");
        due_per_minute[((first - 1) / 60) as usize] += 1;
        let next = Timestamp::from_second(100_000 + first).expect("t");
        assert!(!heartbeat.due(next, Timestamp::from_second(100_000 + first + 599).expect("t")), "once a period");
        assert_eq!(heartbeat.until_next(next), Duration::from_secs(600));
    }
    // 60 a minute on average; no minute holds the whole fleet.
    assert!(due_per_minute.iter().all(|&n| (30..=90).contains(&n)), "{due_per_minute:?}");
}

/// A report whose workers use `usage` (cores, MiB) each.
fn report_using(usage: &[(f64, u64)]) -> Report {
    let mut status = report(&vec![WorkerState::Ready; usage.len()])?;
    for (worker, &(cores, mib)) in status.workers.iter_mut().zip(usage) {
        worker.cpu_cores = Some(cores);
        worker.memory_bytes = Some(mib << 20);
    }
    Ok(status)
}

#[test]
fn workers_cpu_and_memory_pass_through_and_add_up_per_pod_and_service() {
    let cr = csvc(&format!("  replicas: 2\n{APP}"));
    let (a, b, c) = (pod("web-a", true), pod("web-b", true), pod("web-c", false));
    let reports = BTreeMap::from([
        ("web-a".to_string(), report_using(&[(0.98412, 52), (0.25, 40)])),
        ("web-b".to_string(), report_using(&[(0.0171, 30)])),
        // An older clusterd, without the figures: unknown, not zero.
        ("web-c".to_string(), report(&[WorkerState::Ready])),
    ]);
    let d = settled_deployment(2);
    let observed = Observed {
        deployment: Some(&d),
        pods: vec![&a, &b, &c],
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &routed(&[&a, &b]),
    };
    let status = compute(&cr, &observed, Timestamp::UNIX_EPOCH);
    let first = &status.instances[0];
    assert_eq!(first.workers[0].cpu_cores, Some(0.984), "to the millicore");
    assert_eq!(first.workers[0].memory_bytes, Some(52 << 20));
    assert_eq!((first.cpu_cores, first.memory_bytes), (Some(1.234), Some(92 << 20)));
    let older = &status.instances[2];
    assert_eq!((older.cpu_cores, older.memory_bytes, older.workers[0].cpu_cores), (None, None, None));
    assert_eq!((status.summary.cpu.as_deref(), status.summary.memory.as_deref()), (Some("1251m"), Some("122Mi")));

    // Nobody reports figures: no column value rather than a false zero.
    let reports = BTreeMap::from([("web-a".to_string(), report(&[WorkerState::Ready]))]);
    let observed = Observed { reports: &reports, pods: vec![&a], ..observed };
    let status = compute(&cr, &observed, Timestamp::UNIX_EPOCH);
    assert_eq!((status.summary.cpu, status.summary.memory), (None, None));
}

#[test]
fn cpu_and_memory_alone_do_not_make_a_write() {
    let mut cr = csvc(APP);
    let a = pod("web-a", true);
    let d = settled_deployment(1);
    let serving = routed(&[&a]);
    let at = |reports| {
        let observed = Observed {
            deployment: Some(&d),
            pods: vec![&a],
            reports,
            problem: None,
            clusterd_update: None,
            serving: &serving,
        };
        move |cr: &ClusteredService, t| compute(cr, &observed, t)
    };
    let t1 = Timestamp::from_second(1_000).expect("t1");
    let t2 = Timestamp::from_second(1_030).expect("t2");
    // Its heartbeat moments are t1, t1 + 1 min, …
    let every_minute = Heartbeat { period: MIN_HEARTBEAT, phase: Duration::from_secs(1_000 % 60) };
    let before = BTreeMap::from([("web-a".to_string(), report_using(&[(0.5, 100)]))]);
    cr.status = Some(at(&before)(&cr, t1));
    let busier = BTreeMap::from([("web-a".to_string(), report_using(&[(0.9, 180)]))]);
    let new = at(&busier)(&cr, t2);
    assert_eq!(new.summary.cpu.as_deref(), Some("900m"));
    assert!(!changed(cr.status.as_ref(), &new, t2, every_minute), "figures alone wait for the heartbeat");
    let t3 = Timestamp::from_second(1_000 + MIN_HEARTBEAT.as_secs() as i64).expect("t3");
    assert!(changed(cr.status.as_ref(), &at(&busier)(&cr, t3), t3, every_minute), "the heartbeat carries them");
    // With any other change they go along at once.
    let mut restarted = busier.clone();
    if let Some(Ok(status)) = restarted.get_mut("web-a") {
        status.workers[0].restarts += 1;
    }
    assert!(changed(cr.status.as_ref(), &at(&restarted)(&cr, t2), t2, every_minute));
}

#[test]
fn a_process_draining_after_a_reload_does_not_repeat_its_slot() {
    let cr = csvc(APP);
    let a = pod("web-a", true);
    let Ok(mut status) = report(&[WorkerState::Ready, WorkerState::Ready]) else { unreachable!() };
    // The old process of slot 0 still finishes its requests.
    status.workers.push(WorkerStatus { id: 0, pid: Some(99), state: WorkerState::Draining, ..Default::default() });
    let reports = BTreeMap::from([("web-a".to_string(), Ok(status))]);
    let d = settled_deployment(1);
    let observed = Observed {
        deployment: Some(&d),
        pods: vec![&a],
        reports: &reports,
        problem: None,
        clusterd_update: None,
        serving: &routed(&[&a]),
    };
    let status = compute(&cr, &observed, Timestamp::UNIX_EPOCH);
    let workers = &status.instances[0].workers;
    let ids: Vec<i32> = workers.iter().map(|w| w.id).collect();
    assert_eq!(ids, [0, 1], "the CRD keys workers by id: an id twice is refused");
    assert_eq!(workers[0].pid, Some(100), "the slot's current process is shown");
}
