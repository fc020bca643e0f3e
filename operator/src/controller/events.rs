//! Events: what a person should hear about, once per transition.

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus, WorkerState};
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::Context;
use crate::status::{self, DEGRADED, NO_CPU_LIMIT};

/// Publishes the Events `transition_events` calls for.
pub(super) async fn publish_transitions(
    csvc: &ClusteredService,
    old: Option<&ClusteredServiceStatus>,
    new: &ClusteredServiceStatus,
    ctx: &Context,
) {
    for (type_, reason, note) in transition_events(old, new) {
        ctx.event(csvc, type_, &reason, note).await;
    }
}

/// Events for what a person should hear about: each new reason for being
/// degraded (or for the missing CPU limit), recovery, and workers entering
/// a crash loop. One Event per transition, so a cause that persists is
/// announced once, however often it is retried.
fn transition_events(
    old: Option<&ClusteredServiceStatus>,
    new: &ClusteredServiceStatus,
) -> Vec<(EventType, String, String)> {
    let mut events = Vec::new();
    let degraded =
        |s: Option<&ClusteredServiceStatus>| s.and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED)).cloned();
    let (before, now) = (degraded(old), degraded(Some(new)));
    if let Some(now) = now.filter(|n| before.as_ref().map(|b| (&b.status, &b.reason)) != Some((&n.status, &n.reason))) {
        if now.status != "True" && before.is_some_and(|b| b.status == "True") {
            events.push((EventType::Normal, "Recovered".into(), "no longer degraded".into()));
        }
        if now.status == "True" || now.reason == NO_CPU_LIMIT {
            events.push((EventType::Warning, now.reason, now.message));
        }
    }
    let before = old.map(|s| status::workers_in(&s.instances, WorkerState::CrashLoop)).unwrap_or_default();
    for worker in status::workers_in(&new.instances, WorkerState::CrashLoop).into_iter().filter(|w| !before.contains(w))
    {
        let note = format!("worker {worker} (pod/id) keeps crashing; clusterd restarts it at the maximum backoff");
        events.push((EventType::Warning, "WorkerCrashLoop".into(), note));
    }
    events
}

impl Context {
    pub(super) async fn event(&self, csvc: &ClusteredService, type_: EventType, reason: &str, note: String) {
        self.event_of(csvc, type_, reason, "Reconcile", note).await;
    }

    /// An Event with its own `action`: the recorder folds Events of the same
    /// reason and action into one series, keeping the first note.
    pub(super) async fn event_of(
        &self,
        csvc: &ClusteredService,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &csvc.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn with_degraded(status: &str, reason: &str) -> ClusteredServiceStatus {
        ClusteredServiceStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: DEGRADED.into(),
                status: status.into(),
                reason: reason.into(),
                message: format!("because {reason}"),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        }
    }

    fn reasons(old: Option<&ClusteredServiceStatus>, new: &ClusteredServiceStatus) -> Vec<(EventType, String)> {
        transition_events(old, new).into_iter().map(|(t, r, _)| (t, r)).collect()
    }

    #[test]
    fn one_event_per_transition_and_no_recovery_while_degraded() {
        let fine = with_degraded("False", "AsExpected");
        let pull = with_degraded("True", "ImagePullFailed");
        let crash = with_degraded("True", "ContainerCrashLoop");
        let no_limit = with_degraded("False", NO_CPU_LIMIT);
        assert_eq!(reasons(None, &fine), []);
        assert_eq!(reasons(Some(&fine), &pull), [(EventType::Warning, "ImagePullFailed".into())]);
        assert_eq!(reasons(Some(&pull), &pull), [], "a cause that persists is announced once");
        assert_eq!(reasons(Some(&pull), &crash), [(EventType::Warning, "ContainerCrashLoop".into())]);
        assert_eq!(reasons(Some(&crash), &fine), [(EventType::Normal, "Recovered".into())]);
        assert_eq!(
            reasons(Some(&crash), &no_limit),
            [(EventType::Normal, "Recovered".into()), (EventType::Warning, NO_CPU_LIMIT.into())]
        );
        assert_eq!(reasons(Some(&no_limit), &fine), []);
    }
}
