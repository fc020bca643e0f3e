//! The concurrency autoscaler's decision, in the manner of Knative's: a
//! pure function of the samples it was fed, the pods and `now`, so every
//! rule is unit-tested without a cluster.
//!
//! - desired pods = ⌈average in-flight requests ÷ (target per worker ×
//!   workers per pod)⌉, averaged over the stable window (60 s);
//! - the same over the panic window (6 s): when it wants at least twice the
//!   ready pods, the autoscaler panics: it follows the panic window, and
//!   never removes a pod, until a stable window has passed without a burst;
//! - a lower count only after it has been recommended for the whole
//!   scale-down stabilisation window (the highest recommendation wins);
//! - no pod is removed while pods are still starting, for at most
//!   [`STARTING_GRACE`]: a pod that never becomes ready (an image that
//!   cannot be pulled, a crash loop, no room on any node) does not hold
//!   the count up for good;
//! - min and max always win.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Knative's default stable window.
pub const STABLE_WINDOW: Duration = Duration::from_secs(60);
/// Knative's default panic window (10% of the stable window).
pub const PANIC_WINDOW: Duration = Duration::from_secs(6);
/// Panic when the panic window wants this many times the ready pods.
pub const PANIC_THRESHOLD: f64 = 2.0;
/// The longest a scale-down waits for starting pods to become ready: a
/// slow image pull and start fit in it; a pod that needs longer is stuck.
pub const STARTING_GRACE: Duration = Duration::from_secs(120);

/// What the pods' clusterds reported at one instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at: Instant,
    /// Requests in flight, summed over every pod that answered.
    pub in_flight: u64,
    /// Workers of those pods, summed.
    pub workers: u32,
    /// Pods that answered.
    pub pods: u32,
}

/// `spec.autoscaling`, as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    pub target_per_worker: f64,
    pub scale_down_stabilization: Duration,
}

/// The pods as they are now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pods {
    /// `spec.replicas`.
    pub current: i32,
    /// Pods that are ready.
    pub ready: i32,
    /// Pods that exist but are not ready yet.
    pub starting: i32,
}

/// Why the desired count is what it is (`status.autoscaling.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No pod reported workers in the stable window: the count is kept.
    NoMetrics,
    /// Follows the stable window.
    Stable,
    /// Follows the panic window; no pod is removed.
    Panic,
    /// A lower count was recommended, but not for the whole stabilisation window.
    StabilizingScaleDown,
    /// A lower count is due, but pods are still starting (for at most
    /// [`STARTING_GRACE`]).
    PodsStarting,
    /// Raised to `minReplicas`.
    Minimum,
    /// Capped at `maxReplicas`.
    Maximum,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The pod count to set now.
    pub desired: i32,
    /// What the load asks for, within min and max, before a scale-down is
    /// held back (stabilisation, starting pods): `status.autoscaling.desiredReplicas`.
    pub recommended: i32,
    pub reason: Reason,
    pub panic: bool,
    /// Average in-flight requests per worker over the stable window.
    pub per_worker: Option<f64>,
    pub message: String,
}

/// What the autoscaler of one ClusteredService remembers between decisions.
#[derive(Debug, Default)]
pub struct Autoscaler {
    samples: VecDeque<Sample>,
    /// Recommendations (before stabilisation) within the stabilisation window.
    recommendations: VecDeque<(Instant, i32)>,
    /// The last time the panic window was over the threshold, while panicking.
    panic_since: Option<Instant>,
    /// Since when a scale-down has been held for starting pods.
    held_for_starting_since: Option<Instant>,
}

impl Autoscaler {
    pub fn record(&mut self, sample: Sample) {
        self.samples.push_back(sample);
    }

    pub fn decide(&mut self, policy: &Policy, pods: Pods, now: Instant) -> Decision {
        let within = |at: Instant, window: Duration| now.saturating_duration_since(at) < window;
        self.samples.retain(|s| within(s.at, STABLE_WINDOW) && s.workers > 0);
        self.recommendations.retain(|&(at, _)| within(at, policy.scale_down_stabilization));
        let clamp = |n: i32| n.clamp(policy.min, policy.max);

        let Some(latest) = self.samples.back().copied() else {
            self.panic_since = None;
            self.held_for_starting_since = None;
            let desired = clamp(pods.current);
            let (reason, message) = match bounded(pods.current, desired) {
                Some(bound) => bound,
                None => (Reason::NoMetrics, "no pod reported its workers in the last 60 s: pod count kept".into()),
            };
            return Decision { desired, recommended: desired, reason, panic: false, per_worker: None, message };
        };

        // Capacity of one pod, from the pods' current worker counts.
        let per_pod = policy.target_per_worker * f64::from(latest.workers) / f64::from(latest.pods.max(1));
        let average = |window: Duration| {
            let (sum, n) = self
                .samples
                .iter()
                .filter(|s| within(s.at, window))
                .fold((0u64, 0u32), |(sum, n), s| (sum + s.in_flight, n + 1));
            sum as f64 / f64::from(n.max(1))
        };
        let stable_load = average(STABLE_WINDOW);
        let panic_load = average(PANIC_WINDOW);
        let stable_pods = (stable_load / per_pod).ceil() as i32;
        let panic_pods_exact = panic_load / per_pod;
        let panic_pods = panic_pods_exact.ceil() as i32;
        let per_worker = {
            let workers: u32 = self.samples.iter().map(|s| s.workers).sum();
            let in_flight: u64 = self.samples.iter().map(|s| s.in_flight).sum();
            f64::from(workers).max(1.0).recip() * in_flight as f64
        };

        let over_threshold = panic_pods_exact / f64::from(pods.ready.max(1)) >= PANIC_THRESHOLD;
        if over_threshold {
            self.panic_since = Some(now);
        } else if self.panic_since.is_some_and(|since| !within(since, STABLE_WINDOW)) {
            self.panic_since = None;
        }
        let panic = self.panic_since.is_some();

        let target = policy.target_per_worker;
        let (raw, mut reason, mut message) = if panic {
            let load = panic_load / (per_pod / target);
            let why = if over_threshold {
                format!("at least twice the {} ready", pods.ready)
            } else {
                format!("{} ready; the last burst was within 60 s", pods.ready)
            };
            let message = format!(
                "panic: {load:.2} in flight per worker over the last 6 s (target {target}) wants {panic_pods} pods, \
                 {why}; no pod is removed while panicking"
            );
            (panic_pods.max(pods.current), Reason::Panic, message)
        } else {
            let message = format!(
                "{per_worker:.2} in flight per worker over the last 60 s (target {target}): {stable_pods} pods"
            );
            (stable_pods, Reason::Stable, message)
        };
        let recommended = clamp(raw);
        if let Some(bound) = bounded(raw, recommended) {
            (reason, message) = (bound.0, format!("{message}; {}", bound.1));
        }
        self.recommendations.push_back((now, recommended));

        let mut desired = recommended;
        if desired < pods.current {
            let highest = self.recommendations.iter().map(|&(_, n)| n).max().unwrap_or(desired);
            if highest > desired {
                desired = highest.min(pods.current);
                reason = Reason::StabilizingScaleDown;
                message = format!(
                    "{message}; scaling down to no fewer than the {highest} recommended in the last {} s",
                    policy.scale_down_stabilization.as_secs()
                );
            }
        }
        if desired < pods.current && pods.starting > 0 {
            let since = *self.held_for_starting_since.get_or_insert(now);
            if within(since, STARTING_GRACE) {
                desired = pods.current;
                reason = Reason::PodsStarting;
                message = format!("{message}; not scaling down while {} pods are starting", pods.starting);
            } else {
                message = format!(
                    "{message}; scaling down although {} pods are not ready: they have not become ready in {} s",
                    pods.starting,
                    STARTING_GRACE.as_secs()
                );
            }
        } else {
            self.held_for_starting_since = None;
        }
        let clamped = clamp(desired);
        if let Some(bound) = bounded(desired, clamped) {
            (reason, message) = (bound.0, format!("{message}; {}", bound.1));
        }
        Decision { desired: clamped, recommended, reason, panic, per_worker: Some(per_worker), message }
    }
}

/// The reason and message when `clamped` differs from `wanted`.
fn bounded(wanted: i32, clamped: i32) -> Option<(Reason, String)> {
    match wanted.cmp(&clamped) {
        std::cmp::Ordering::Less => Some((Reason::Minimum, format!("raised to minReplicas {clamped}"))),
        std::cmp::Ordering::Greater => Some((Reason::Maximum, format!("capped at maxReplicas {clamped}"))),
        std::cmp::Ordering::Equal => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy =
        Policy { min: 1, max: 10, target_per_worker: 1.0, scale_down_stabilization: Duration::from_secs(30) };

    /// An autoscaler fed `in_flight` every 2 s from `from` to `to` seconds
    /// after `t0`, from `pods` pods of `workers_per_pod` workers each.
    struct Feed {
        t0: Instant,
        scaler: Autoscaler,
    }

    impl Feed {
        fn new() -> Self {
            Self { t0: Instant::now(), scaler: Autoscaler::default() }
        }

        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }

        fn load(&mut self, from: u64, to: u64, in_flight: u64, pods: u32, workers_per_pod: u32) {
            for s in (from..to).step_by(2) {
                let at = self.at(s);
                self.scaler.record(Sample { at, in_flight, workers: pods * workers_per_pod, pods });
            }
        }

        fn decide(&mut self, policy: &Policy, pods: Pods, secs: u64) -> Decision {
            let now = self.at(secs);
            self.scaler.decide(policy, pods, now)
        }
    }

    fn pods(current: i32) -> Pods {
        Pods { current, ready: current, starting: 0 }
    }

    #[test]
    fn without_samples_the_count_is_kept_within_the_bounds() {
        let mut feed = Feed::new();
        let d = feed.decide(&POLICY, pods(3), 0);
        assert_eq!((d.desired, d.reason, d.per_worker), (3, Reason::NoMetrics, None));
        let d = feed.decide(&POLICY, pods(0), 0);
        assert_eq!((d.desired, d.reason), (1, Reason::Minimum));
        let d = feed.decide(&POLICY, pods(12), 0);
        assert_eq!((d.desired, d.reason), (10, Reason::Maximum));
    }

    #[test]
    fn samples_without_workers_do_not_count() {
        let mut feed = Feed::new();
        feed.scaler.record(Sample { at: feed.at(0), in_flight: 0, workers: 0, pods: 1 });
        assert_eq!(feed.decide(&POLICY, pods(2), 1).reason, Reason::NoMetrics);
    }

    #[test]
    fn steady_load_asks_for_load_over_capacity_rounded_up() {
        let mut feed = Feed::new();
        // 5 in flight, 2 workers per pod at 1.0 each: 2.5 -> 3 pods.
        feed.load(0, 60, 5, 2, 2);
        let d = feed.decide(&POLICY, pods(2), 60);
        assert_eq!((d.desired, d.reason, d.panic), (3, Reason::Stable, false));
        assert_eq!(d.per_worker, Some(1.25));
        // A target of 0.5 doubles the pods.
        let half = Policy { target_per_worker: 0.5, ..POLICY };
        assert_eq!(feed.decide(&half, pods(2), 60).desired, 5);
    }

    #[test]
    fn workers_per_pod_set_the_capacity_of_a_pod() {
        let mut feed = Feed::new();
        feed.load(0, 60, 8, 1, 4);
        assert_eq!(feed.decide(&POLICY, pods(1), 60).desired, 2, "8 in flight / (4 workers × 1.0)");
        let mut feed = Feed::new();
        feed.load(0, 60, 8, 1, 1);
        assert_eq!(feed.decide(&POLICY, pods(1), 60).desired, 8, "8 in flight / (1 worker × 1.0)");
    }

    #[test]
    fn the_bounds_always_win() {
        let mut feed = Feed::new();
        feed.load(0, 60, 100, 1, 1);
        let d = feed.decide(&POLICY, pods(3), 60);
        assert_eq!((d.desired, d.reason), (10, Reason::Maximum));
        assert!(d.message.contains("capped at maxReplicas 10"), "{}", d.message);
        let mut feed = Feed::new();
        feed.load(0, 60, 0, 1, 1);
        let min3 = Policy { min: 3, ..POLICY };
        let d = feed.decide(&min3, pods(1), 60);
        assert_eq!((d.desired, d.reason), (3, Reason::Minimum));
    }

    #[test]
    fn a_burst_panics_and_scales_up_from_the_panic_window() {
        let mut feed = Feed::new();
        // Idle for 54 s, then 6 s of 6 in flight on one 1-worker pod: the
        // stable window averages 0.6 (1 pod), the panic window 6 (6 pods).
        feed.load(0, 54, 0, 1, 1);
        feed.load(54, 60, 6, 1, 1);
        let d = feed.decide(&POLICY, pods(1), 60);
        assert_eq!((d.desired, d.reason, d.panic), (6, Reason::Panic, true));
        assert!(d.message.starts_with("panic: 6.00 in flight per worker"), "{}", d.message);
    }

    #[test]
    fn below_twice_the_ready_pods_there_is_no_panic() {
        let mut feed = Feed::new();
        feed.load(0, 54, 0, 2, 1);
        // Panic window wants 3 pods; 2 are ready: 1.5× is below the threshold.
        feed.load(54, 60, 3, 2, 1);
        let d = feed.decide(&POLICY, pods(2), 60);
        assert!(!d.panic, "{d:?}");
        assert_eq!(d.reason, Reason::Stable);
        // Exactly twice: panic.
        feed.load(60, 66, 4, 2, 1);
        assert!(feed.decide(&POLICY, pods(2), 66).panic);
    }

    #[test]
    fn panic_counts_only_ready_pods() {
        let mut feed = Feed::new();
        feed.load(0, 6, 4, 1, 1);
        // 4 pods asked for, 1 ready and 3 starting: 4 pods wanted is 4× the ready.
        let d = feed.decide(&POLICY, Pods { current: 4, ready: 1, starting: 3 }, 6);
        assert!(d.panic);
        assert_eq!(d.desired, 4);
    }

    #[test]
    fn no_pod_is_removed_while_panicking_and_panic_ends_a_stable_window_after_the_last_burst() {
        let mut feed = Feed::new();
        feed.load(0, 6, 6, 1, 1);
        assert_eq!(feed.decide(&POLICY, pods(1), 6).desired, 6);
        // The burst is over; 6 pods now, idle. Still panicking: keep 6.
        feed.load(6, 40, 0, 6, 1);
        let d = feed.decide(&POLICY, pods(6), 40);
        assert_eq!((d.desired, d.reason, d.panic), (6, Reason::Panic, true));
        // 60 s after the last time over the threshold (at 6 s), panic ends.
        feed.load(40, 66, 0, 6, 1);
        let d = feed.decide(&POLICY, pods(6), 66);
        assert!(!d.panic, "{d:?}");
    }

    #[test]
    fn a_renewed_burst_extends_the_panic() {
        let mut feed = Feed::new();
        feed.load(0, 6, 6, 1, 1);
        feed.decide(&POLICY, pods(1), 6);
        feed.load(6, 50, 0, 6, 1);
        feed.load(50, 56, 40, 6, 1);
        assert!(feed.decide(&POLICY, pods(6), 56).panic, "40 in flight on 6 pods: over the threshold again");
        feed.load(56, 80, 0, 10, 1);
        assert!(feed.decide(&POLICY, pods(10), 80).panic, "within 60 s of the renewed burst");
    }

    #[test]
    fn scale_down_waits_for_the_stabilisation_window() {
        let mut feed = Feed::new();
        let policy = Policy { scale_down_stabilization: Duration::from_secs(30), ..POLICY };
        feed.load(0, 60, 4, 4, 1);
        assert_eq!(feed.decide(&policy, pods(4), 60).desired, 4);
        // The load stops; the stable window average falls as idle samples come in.
        let mut last = None;
        for t in (62..=180).step_by(2) {
            feed.load(t - 2, t, 0, 4, 1);
            let d = feed.decide(&policy, pods(4), t);
            last = Some((t, d.clone()));
            if d.desired < 4 {
                break;
            }
            assert!(matches!(d.reason, Reason::Stable | Reason::StabilizingScaleDown), "{d:?}");
        }
        let (t, d) = last.expect("decided");
        // The stable window says 3 pods from t = 74 s (average 3 of 4):
        // the 30 s stabilisation holds 4 until that recommendation of 4 has aged out.
        assert!((100..=110).contains(&t), "scaled down at {t} s: {d:?}");
        assert_eq!(d.desired, 3, "one step: the highest recommendation of the window");
    }

    #[test]
    fn without_stabilisation_scale_down_follows_the_stable_window() {
        let mut feed = Feed::new();
        let policy = Policy { scale_down_stabilization: Duration::ZERO, ..POLICY };
        feed.load(0, 60, 4, 4, 1);
        feed.load(60, 120, 0, 4, 1);
        let d = feed.decide(&policy, pods(4), 120);
        assert_eq!((d.desired, d.reason), (1, Reason::Minimum), "idle for a whole stable window: minimum");
    }

    #[test]
    fn while_pods_start_no_pod_is_removed() {
        let mut feed = Feed::new();
        let policy = Policy { scale_down_stabilization: Duration::ZERO, ..POLICY };
        feed.load(0, 60, 0, 2, 1);
        let d = feed.decide(&policy, Pods { current: 3, ready: 2, starting: 1 }, 60);
        assert_eq!((d.desired, d.reason), (3, Reason::PodsStarting));
        assert!(d.message.contains("1 pods are starting"), "{}", d.message);
        // Scaling up is not held.
        feed.load(60, 120, 10, 2, 1);
        let d = feed.decide(&policy, Pods { current: 3, ready: 2, starting: 1 }, 120);
        assert!(d.desired > 3, "{d:?}");
    }

    #[test]
    fn a_pod_that_never_becomes_ready_holds_a_scale_down_only_for_the_grace() {
        let mut feed = Feed::new();
        let policy = Policy { scale_down_stabilization: Duration::ZERO, ..POLICY };
        let stuck = Pods { current: 3, ready: 2, starting: 1 };
        feed.load(0, 60, 0, 2, 1);
        let d = feed.decide(&policy, stuck, 60);
        assert_eq!(
            (d.desired, d.recommended, d.reason),
            (3, 1, Reason::PodsStarting),
            "held, but the recommendation shows"
        );
        feed.load(60, 178, 0, 2, 1);
        assert_eq!(feed.decide(&policy, stuck, 178).desired, 3, "still within the grace");
        feed.load(178, 182, 0, 2, 1);
        let d = feed.decide(&policy, stuck, 182);
        assert_eq!(d.desired, 1, "{d:?}");
        assert!(d.message.contains("have not become ready in 120 s"), "{}", d.message);
        // Once no pod is starting the grace starts over for the next one.
        feed.load(182, 190, 0, 1, 1);
        feed.decide(&policy, pods(1), 190);
        feed.load(190, 200, 0, 2, 1);
        assert_eq!(feed.decide(&policy, stuck, 200).reason, Reason::PodsStarting);
    }

    #[test]
    fn a_panic_that_outlives_its_burst_does_not_claim_twice_the_ready_pods() {
        let mut feed = Feed::new();
        feed.load(0, 54, 0, 2, 1);
        feed.load(54, 60, 4, 2, 1);
        let d = feed.decide(&POLICY, pods(2), 60);
        assert!(d.panic && d.message.contains("at least twice the 2 ready"), "{}", d.message);
        // The burst eases to 3 pods' worth (1.5× the ready pods): still
        // panicking, but not because of twice the ready pods.
        feed.load(60, 70, 3, 2, 1);
        let d = feed.decide(&POLICY, pods(2), 70);
        assert!(d.panic, "{d:?}");
        assert!(!d.message.contains("twice"), "{}", d.message);
        assert!(d.message.contains("the last burst was within 60 s"), "{}", d.message);
    }

    #[test]
    fn old_samples_are_forgotten() {
        let mut feed = Feed::new();
        feed.load(0, 10, 50, 1, 1);
        // 70 s later every sample is older than the stable window.
        let d = feed.decide(&POLICY, pods(2), 80);
        assert_eq!((d.desired, d.reason), (2, Reason::NoMetrics));
    }

    #[test]
    fn observed_concurrency_is_per_worker_over_the_stable_window() {
        let mut feed = Feed::new();
        feed.load(0, 30, 3, 1, 2);
        feed.load(30, 60, 1, 1, 2);
        // At 59 s every sample (0..58 s) is within the window.
        let d = feed.decide(&POLICY, pods(1), 59);
        assert_eq!(d.per_worker, Some(1.0), "(3 + 1) / 2 in flight over 2 workers");
    }
}
