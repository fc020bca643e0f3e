//! Keeping the operator's view of the cluster current through API server
//! and etcd restarts: the client's retry policy, the watches' backoff, and
//! a record of which watches are failing, read by the liveness probe.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{error, info, warn};

/// The shortest and the longest pause between two attempts of a failing
/// watch (jitter adds up to as much again). client-go's 30 s, kube-rs's
/// default, would leave a watch asleep for up to a minute after the API
/// server is back; one operator's handful of watches retrying every few
/// seconds costs an API server nothing.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(250);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);

/// A watch is stuck when it has failed without a success for this long...
const STUCK_AFTER: Duration = Duration::from_secs(90);
/// ...and failed again within this window: a watch that resumed where it
/// left off reports nothing until the next change, so silence after errors
/// means it recovered. Longer than a failed attempt can take (the client's
/// 30 s connect timeout plus the longest pause).
const STILL_FAILING: Duration = Duration::from_secs(45);

/// How often the watchdog looks at the watches.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(10);

/// The operator's API client.
///
/// kube-rs retries every request answered with 429, 503 or 504 up to 15
/// times inside the request, sleeping 5 ms × 2ⁿ with up to 200 % jitter
/// between attempts: an API server that answers 503 while it starts keeps a
/// request (a watch's re-list, a reconcile's apply) asleep for minutes
/// after it is ready, with nothing logged. Every caller here retries on
/// its own terms (watches with [`backoff`], reconciles with the
/// controller's error policy, the lease every renewal period), so the
/// client fails fast instead.
pub fn client(mut config: kube::Config) -> Result<Client, kube::Error> {
    config.default_retry = false;
    Client::try_from(config)
}

/// Opens once the stores the reconciles read have all been listed, for
/// any number of waiters.
///
/// kube-runtime's `Store::wait_until_ready` keeps a single waker: when
/// many reconciles await it at once, as at every start with several
/// ClusteredServices, the store's first list wakes only the last one that
/// polled it, and the others sleep until their reconcile timeout (30 s).
/// So one task awaits the stores, and this gate wakes every waiter.
#[derive(Clone)]
pub struct Synced(tokio::sync::watch::Receiver<bool>);

impl Synced {
    /// A gate opened when `listed` resolves to true; `then` runs as it opens
    /// (the operator's readiness).
    pub fn after(listed: impl Future<Output = bool> + Send + 'static, then: impl FnOnce() + Send + 'static) -> Synced {
        let (open, gate) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if listed.await {
                then();
                let _ = open.send(true);
            }
        });
        Synced(gate)
    }

    /// Waits until the gate is open; false if it never will (a watch was
    /// dropped before its store was listed: the controller is stopping).
    pub async fn wait(&self) -> bool {
        self.0.clone().wait_for(|open| *open).await.is_ok()
    }
}

/// The pause between two attempts of a failing watch: from 250 ms,
/// doubling, to 3 s (plus jitter); reset by the first success.
pub fn backoff() -> impl Backoff {
    watcher::ExponentialBackoff::from(
        backon::ExponentialBuilder::default()
            .with_min_delay(WATCH_RETRY_MIN)
            .with_max_delay(WATCH_RETRY_MAX)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times(),
    )
}

/// The backoff the controller puts over all its trigger streams together:
/// none, because each watch already backs off on its own ([`watch`]).
///
/// kube-runtime's `Controller` merges its watches into one stream and
/// wraps that in client-go's backoff (800 ms doubling to 30 s, reset by
/// the next event). While it sleeps it polls none of the watches, so when
/// the API server restarts, each watch's error lengthens a pause shared
/// by all of them: the sixth error put every watch (and the stores they
/// fill) to sleep for 22 s, seen as watches noticing the restart 10–20 s
/// late and spec changes applied minutes after the API server was back.
pub fn trigger_backoff() -> impl Backoff {
    NoPause
}

struct NoPause;

impl Iterator for NoPause {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl Backoff for NoPause {
    fn reset(&mut self) {}
}

/// A watch of `K` that retries with [`backoff`] and reports each attempt's
/// outcome to `health`.
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    health: &Arc<WatchHealth>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + use<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let health = Arc::clone(health);
    let kind = K::kind(&()).into_owned();
    watcher(api, config)
        .inspect(move |result| match result {
            Ok(_) => health.succeeded(&kind, Instant::now()),
            Err(e) => health.failed(&kind, e, Instant::now()),
        })
        .backoff(backoff())
}

/// Which watches are failing, and since when.
#[derive(Default)]
pub struct WatchHealth {
    watches: Mutex<BTreeMap<String, Failing>>,
}

/// A watch that has failed since its last success.
#[derive(Clone, Debug, PartialEq)]
struct Failing {
    since: Instant,
    last: Instant,
    error: String,
}

/// A watch that has not recovered: what it watches, for how long it has
/// failed, and its last error.
#[derive(Clone, Debug, PartialEq)]
pub struct Stuck {
    pub kind: String,
    pub failing_for: Duration,
    pub error: String,
}

impl WatchHealth {
    fn succeeded(&self, kind: &str, _now: Instant) {
        if self.lock().remove(kind).is_some() {
            info!(%kind, "watch recovered");
        }
    }

    fn failed(&self, kind: &str, error: &impl Display, now: Instant) {
        let mut watches = self.lock();
        let ongoing = watches.get(kind).filter(|f| now.duration_since(f.last) < STILL_FAILING);
        let since = ongoing.map_or(now, |f| f.since);
        if ongoing.is_none() {
            warn!(%kind, %error, "watch failed; retrying");
        }
        watches.insert(kind.to_string(), Failing { since, last: now, error: error.to_string() });
    }

    /// The watches that keep failing at `now`.
    pub fn stuck(&self, now: Instant) -> Vec<Stuck> {
        self.failing(now).into_iter().filter(|s| s.failing_for >= STUCK_AFTER).collect()
    }

    /// The watches that failed since their last success, and not long ago.
    pub fn failing(&self, now: Instant) -> Vec<Stuck> {
        self.lock()
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) < STILL_FAILING)
            .map(|(kind, f)| Stuck {
                kind: kind.clone(),
                failing_for: now.duration_since(f.since),
                error: f.error.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Failing>> {
        self.watches.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Clears `live` while a watch is stuck and the API server answers a
/// fresh client, so that Kubernetes restarts the operator as a last
/// resort. While the API server itself is unreachable a restart cannot
/// help (and its crash-loop backoff would only delay the recovery), so
/// the operator then stays live.
pub async fn watchdog(health: Arc<WatchHealth>, config: kube::Config, live: Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let mut tick = tokio::time::interval(WATCHDOG_PERIOD);
    loop {
        tick.tick().await;
        let stuck = health.stuck(Instant::now());
        let broken = !stuck.is_empty() && api_answers(&config).await;
        if broken {
            for s in &stuck {
                error!(kind = %s.kind, failing_for = ?s.failing_for, error = %s.error,
                    "watch does not recover although the API server answers; failing the liveness probe");
            }
        }
        live.store(!broken, Ordering::Relaxed);
    }
}

/// True when the API server answers a request made on a new connection.
async fn api_answers(config: &kube::Config) -> bool {
    let Ok(client) = client(config.clone()) else {
        return false;
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await, Ok(Ok(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cause of the 30 s stall at start: of many reconciles waiting for
    /// a store, kube's `wait_until_ready` wakes one. The gate wakes all.
    #[tokio::test]
    async fn every_waiter_is_woken_when_the_stores_are_listed() {
        use k8s_openapi::api::core::v1::Pod;
        use kube::runtime::reflector;
        use kube::runtime::watcher::Event;

        // Two stores: the gate must be its store's only waiter.
        let (gated, mut gated_writer) = reflector::store::<Pod>();
        let (store, mut writer) = reflector::store::<Pod>();
        let waiters = |wait: &dyn Fn() -> futures::future::BoxFuture<'static, bool>| {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..8 {
                set.spawn(wait());
            }
            set
        };
        let listed = async move { gated.wait_until_ready().await.is_ok() };
        let gate = Synced::after(listed, || {});
        let mut through_gate = waiters(&|| {
            let gate = gate.clone();
            Box::pin(async move { gate.wait().await })
        });
        let mut through_store = waiters(&|| {
            let store = store.clone();
            Box::pin(async move { store.wait_until_ready().await.is_ok() })
        });
        tokio::task::yield_now().await;
        for writer in [&mut gated_writer, &mut writer] {
            writer.apply_watcher_event(&Event::Init);
            writer.apply_watcher_event(&Event::InitDone);
        }

        let all = |set: &mut tokio::task::JoinSet<bool>| {
            let set = std::mem::take(set);
            async move { set.join_all().await.into_iter().filter(|&woken| woken).count() }
        };
        let woken = tokio::time::timeout(Duration::from_secs(2), all(&mut through_gate)).await;
        assert_eq!(woken, Ok(8), "every reconcile waiting at the gate goes on");
        // Documents why the gate exists: if kube-runtime ever wakes every
        // waiter of a store, this fails and the gate can go.
        let woken_directly = tokio::time::timeout(Duration::from_millis(500), all(&mut through_store)).await;
        assert!(woken_directly.is_err(), "kube-runtime's store now wakes all its waiters");
    }

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_watch_failing_again_and_again_is_stuck_after_a_while() {
        let health = WatchHealth::default();
        let t0 = Instant::now();
        for s in (0..=90).step_by(5) {
            health.failed("Pod", &"connection refused", at(t0, s));
        }
        assert!(health.stuck(at(t0, 80)).is_empty(), "not stuck before STUCK_AFTER");
        let stuck = health.stuck(at(t0, 91));
        assert_eq!(stuck.len(), 1);
        assert_eq!((stuck[0].kind.as_str(), stuck[0].error.as_str()), ("Pod", "connection refused"));
        assert_eq!(stuck[0].failing_for, Duration::from_secs(91));
    }

    #[test]
    fn a_success_or_a_quiet_spell_ends_a_failure() {
        let health = WatchHealth::default();
        let t0 = Instant::now();
        for s in (0..=100).step_by(5) {
            health.failed("Pod", &"gone", at(t0, s));
        }
        health.succeeded("Pod", at(t0, 101));
        assert!(health.stuck(at(t0, 102)).is_empty());

        // Resumed without a success (no change to report): silence.
        for s in (200..=300).step_by(5) {
            health.failed("Deployment", &"gone", at(t0, s));
        }
        assert_eq!(health.stuck(at(t0, 301)).len(), 1);
        assert!(health.stuck(at(t0, 300 + 45)).is_empty(), "quiet since its last failure: recovered");
        // A new failure after the quiet spell starts a new episode.
        health.failed("Deployment", &"gone", at(t0, 400));
        assert!(health.stuck(at(t0, 401)).is_empty());
    }

    #[test]
    fn the_watch_backoff_stays_short() {
        let mut backoff = backoff();
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next().expect("never gives up")).collect();
        assert!(delays[0] < Duration::from_millis(500), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= 2 * WATCH_RETRY_MAX), "{delays:?}");
        backoff.reset();
        assert!(backoff.next().is_some_and(|d| d < Duration::from_millis(500)));
    }

    #[test]
    fn the_controller_adds_no_pause_of_its_own() {
        let mut backoff = trigger_backoff();
        assert!((0..100).all(|_| backoff.next() == Some(Duration::ZERO)), "never gives up, never sleeps");
    }
}
