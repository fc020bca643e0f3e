//! Which worker takes a request: its sticky worker (`--sticky`), else the
//! least busy of its pool; under `--max-concurrency` it may wait in the
//! pool's queue, and when the pool is empty while a worker restarts it
//! waits a moment for that worker ([`Hold`]).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use tokio::sync::Semaphore;

use super::{Backend, InFlight, Pool};
use crate::body::{ProxyBody, plain};
use crate::config::{Admission, Sticky};
use crate::metrics::Metrics;

/// How long a request that finds its pool empty waits for a worker that is
/// restarting: about a worker restart, the bound node mode holds a
/// connection for when no worker listens.
pub const HOLD: Duration = crate::node::channel::NO_LISTENER_HOLD;
/// Requests (and TCP connections) waiting so at once, over all pools; the
/// next ones get their `503` at once.
pub const MAX_HELD: usize = crate::node::channel::MAX_HELD;

/// Where a sticky client was before: the worker it should go to, and the
/// cookie token it sent (a new one is set when it differs).
#[derive(Default)]
pub struct Affinity {
    preferred: Option<Arc<Backend>>,
    cookie_sent: Option<String>,
}

/// Chooses workers for the HTTP proxy.
pub struct Chooser {
    metrics: Arc<Metrics>,
    /// `--max-concurrency` and its queue; `None`: no limit.
    pub admission: Option<Admission>,
    /// `--sticky`: what ties a client to a worker.
    pub sticky: Option<Sticky>,
    hold: Hold,
}

impl Chooser {
    pub fn new(metrics: Arc<Metrics>) -> Chooser {
        Chooser { metrics, admission: None, sticky: None, hold: Hold::default() }
    }

    /// The request's sticky worker, if `--sticky` is on and it has one alive.
    pub fn affinity(&self, pool: &Pool, headers: &HeaderMap) -> Affinity {
        match &self.sticky {
            None => Affinity::default(),
            Some(Sticky::Cookie(name)) => {
                let cookie_sent = cookie(headers, name).map(str::to_string);
                let preferred = cookie_sent.as_deref().and_then(|token| pool.by_token(token));
                Affinity { preferred, cookie_sent }
            }
            Some(Sticky::Header(name)) => {
                let preferred = headers.get(name.as_str()).and_then(|value| pool.by_hash(value.as_bytes()));
                Affinity { preferred, cookie_sent: None }
            }
        }
    }

    /// Sets the sticky cookie on `response` unless the client sent this
    /// worker's token already.
    pub fn stick(&self, response: &mut Response<ProxyBody>, backend: &Backend, affinity: &Affinity) {
        let Some(Sticky::Cookie(name)) = &self.sticky else {
            return;
        };
        if affinity.cookie_sent.as_deref() == Some(&*backend.sticky_token) {
            return;
        }
        let cookie = format!("{name}={}; Path=/; HttpOnly; SameSite=Lax", backend.sticky_token);
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }

    /// A worker of `pool` for one request (not one of `tried`), counted as
    /// in flight. Under admission control the request waits, in a bounded
    /// queue, until a worker has fewer than `max_concurrency` requests; a
    /// full queue or a wait of `queue_timeout` gets a `503`. An empty pool
    /// gets a `503` once the [`Hold`] gives up.
    pub async fn admit(
        &self,
        pool: &Arc<Pool>,
        tried: &[u32],
        affinity: &Affinity,
    ) -> Result<InFlight, Response<ProxyBody>> {
        // A sticky client's worker, unless it already failed this request.
        let preferred = affinity.preferred.as_ref().filter(|b| !tried.contains(&b.pid));
        let candidate = || preferred.cloned().or_else(|| pool.pick(tried));
        let Some(limits) = self.admission else {
            let backend = self
                .hold
                .pick(pool, !tried.is_empty(), candidate)
                .await
                .ok_or_else(|| no_worker(pool, tried.is_empty()))?;
            return Ok(InFlight::start(backend, Arc::clone(&self.metrics)));
        };
        let mut waiting = None;
        loop {
            // Registered before looking, so a place freed meanwhile is not missed.
            let freed = pool.queue.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            // The least busy member is full only when every member is (a
            // sticky client waits for its own worker).
            let backend = self
                .hold
                .pick(pool, !tried.is_empty(), candidate)
                .await
                .ok_or_else(|| no_worker(pool, tried.is_empty()))?;
            if let Some(guard) = InFlight::try_start(backend, &self.metrics, limits.max_concurrency, pool) {
                if let Some(waiting) = waiting {
                    super::Waiting::admitted(waiting);
                }
                return Ok(guard);
            }
            if waiting.is_none() {
                let Some(entered) = pool.queue.enter(limits.max_queue) else {
                    pool.queue.reject();
                    return Err(busy(pool, "every worker is busy and the queue is full"));
                };
                waiting = Some(entered);
            }
            let since = waiting.as_ref().map_or_else(std::time::Instant::now, super::Waiting::since);
            let deadline = tokio::time::Instant::from_std(since + limits.queue_timeout);
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                pool.queue.reject();
                return Err(busy(pool, "no worker was free within --queue-timeout"));
            }
        }
    }
}

/// Holds requests that find their pool empty while one of its workers is
/// on its way back (all of them exited cleanly at once, say: restarted at
/// once, Ready a few hundred milliseconds later), instead of answering
/// `503` for that moment. At most [`MAX_HELD`] wait, each at most
/// [`HOLD`]; a pool whose workers are not coming back soon (crash loop,
/// long backoff, shutdown) answers at once.
pub struct Hold {
    places: Arc<Semaphore>,
    within: Duration,
}

impl Default for Hold {
    fn default() -> Hold {
        Hold::new(MAX_HELD, HOLD)
    }
}

impl Hold {
    fn new(places: usize, within: Duration) -> Hold {
        Hold { places: Arc::new(Semaphore::new(places)), within }
    }

    /// `candidate()` now, or, while it finds nothing and `pool` has a
    /// worker back soon, the first it finds once the pool's members change
    /// (within [`HOLD`] and if a place is free). `refused`: the workers
    /// tried refused the connection, so they are leaving (a worker that
    /// exits cleanly stops listening first) and the pool changes shortly;
    /// nothing reached them, so the request waits as well.
    pub async fn pick(
        &self,
        pool: &Pool,
        refused: bool,
        candidate: impl Fn() -> Option<Arc<Backend>>,
    ) -> Option<Arc<Backend>> {
        if let Some(backend) = candidate() {
            return Some(backend);
        }
        let deadline = tokio::time::Instant::now() + self.within;
        let mut place = None;
        loop {
            // Registered before looking, so members that join meanwhile are not missed.
            let joined = pool.queue.freed.notified();
            let mut joined = std::pin::pin!(joined);
            joined.as_mut().enable();
            if let Some(backend) = candidate() {
                return Some(backend);
            }
            if !(refused || pool.back_soon()) {
                return None;
            }
            if place.is_none() {
                place = Some(Arc::clone(&self.places).try_acquire_owned().ok()?);
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return candidate();
            }
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

fn no_worker(pool: &Pool, first_attempt: bool) -> Response<ProxyBody> {
    let text = if first_attempt {
        format!("clusterd: no worker available in pool {:?}\n", pool.name)
    } else {
        format!("clusterd: no other worker available in pool {:?} after a worker failed\n", pool.name)
    };
    plain(StatusCode::SERVICE_UNAVAILABLE, text)
}

/// Admission control's answer: try again shortly (another pod may have room).
fn busy(pool: &Pool, why: &str) -> Response<ProxyBody> {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, format!("clusterd: {why} (pool {:?})\n", pool.name));
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use super::*;

    fn backend(id: u32) -> Arc<Backend> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + id as u16));
        Arc::new(Backend::new(id, 100 + id, addr, "default".into(), &Metrics::new()))
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; clusterd-worker-x=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("clusterd-worker=abc"));
        assert_eq!(cookie(&headers, "clusterd-worker"), Some("abc"));
        assert_eq!(cookie(&headers, "a"), Some("1"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[tokio::test]
    async fn an_empty_pool_with_a_worker_back_soon_waits_for_it() {
        let pool = Arc::new(Pool::new("default", &Metrics::new()));
        pool.set_back_soon(true);
        let hold = Hold::new(4, Duration::from_secs(5));
        let started = Instant::now();
        let joining = Arc::clone(&pool);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            joining.set_members(vec![backend(7)]);
        });
        let picked = hold.pick(&pool, false, || pool.pick(&[])).await;
        assert_eq!(picked.map(|b| b.worker_id), Some(7));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn after_every_worker_refused_the_connection_the_request_waits_for_a_new_one() {
        // Worker 1 stopped listening (it is exiting) but clusterd has not
        // seen its exit yet: it is still a member, and nothing is back soon.
        let pool = Arc::new(Pool::new("default", &Metrics::new()));
        pool.set_members(vec![backend(1)]);
        let hold = Hold::new(4, Duration::from_secs(5));
        let refused = [101];
        let joining = Arc::clone(&pool);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            joining.set_members(vec![]);
            joining.set_back_soon(true);
            tokio::time::sleep(Duration::from_millis(100)).await;
            joining.set_members(vec![backend(2)]);
        });
        let picked = hold.pick(&pool, true, || pool.pick(&refused)).await;
        assert_eq!(picked.map(|b| b.worker_id), Some(2));
    }

    #[tokio::test]
    async fn an_empty_pool_answers_at_once_unless_a_worker_is_back_soon() {
        let pool = Pool::new("default", &Metrics::new());
        let hold = Hold::new(4, Duration::from_secs(5));
        let started = Instant::now();
        assert!(hold.pick(&pool, false, || pool.pick(&[])).await.is_none());
        assert!(started.elapsed() < Duration::from_millis(100), "no wait: {:?}", started.elapsed());
    }

    /// A request held in a task: whether it got a worker, and how long it waited.
    fn held_pick(hold: &Arc<Hold>, pool: &Arc<Pool>) -> tokio::task::JoinHandle<(bool, Duration)> {
        let (hold, pool) = (Arc::clone(hold), Arc::clone(pool));
        tokio::spawn(async move {
            let started = Instant::now();
            let picked = hold.pick(&pool, false, || pool.pick(&[])).await;
            (picked.is_some(), started.elapsed())
        })
    }

    #[tokio::test]
    async fn the_hold_is_bounded_in_time_and_in_places() {
        let pool = Arc::new(Pool::new("default", &Metrics::new()));
        pool.set_back_soon(true);
        let hold = Arc::new(Hold::new(1, Duration::from_millis(300)));
        // One place: the first waits out the bound, the second is not held.
        let first = held_pick(&hold, &pool);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert!(hold.pick(&pool, false, || pool.pick(&[])).await.is_none());
        assert!(started.elapsed() < Duration::from_millis(100), "held without a place: {:?}", started.elapsed());
        let (picked, waited) = first.await.expect("task");
        assert!(!picked && waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "{waited:?}");
        // The worker stops coming back (it crash-loops): waiters give up at once.
        let waiter = held_pick(&hold, &pool);
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.set_back_soon(false);
        let (picked, waited) = waiter.await.expect("task");
        assert!(!picked && waited < Duration::from_millis(250), "{waited:?}");
    }
}
