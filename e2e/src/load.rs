//! A small, bounded HTTP load generator for the end-to-end tests: it counts
//! what succeeded and what failed, and which worker and pod answered. It
//! is not a benchmark (see `benches/`); it only asserts on outcomes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

/// One answer of the demo app.
#[derive(Clone, Debug)]
pub struct Answer {
    /// `x-clusterd-worker` header: the worker slot that served it.
    pub worker: Option<String>,
    /// The app's JSON body.
    pub body: serde_json::Value,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
    /// Answers by worker slot id.
    pub by_worker: BTreeMap<String, u64>,
}

/// A client that opens a new connection for every request, as many
/// independent users would: a kept-alive connection to a terminating pod
/// would otherwise decide the outcome.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector)
}

/// A client that keeps its connections alive between requests, as an
/// ingress controller does to the pods behind it: a stopping pod must close
/// them itself without cutting off a request.
pub fn keepalive_client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector)
}

/// One GET; an error for anything but a 2xx answer.
pub async fn get(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> anyhow::Result<Answer> {
    let request = async {
        let response = client.get(url.parse()?).await?;
        let status = response.status();
        let worker = response.headers().get("x-clusterd-worker").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "{url}: {status} {}", String::from_utf8_lossy(&body));
        Ok(Answer { worker, body: serde_json::from_slice(&body).unwrap_or_default() })
    };
    tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer in 30 s"))?
}

/// How many connections a [`run`] opens per second at most, over all its
/// loops. A closed connection holds its local port for a minute (TIME_WAIT), and
/// the test host has 28 232 of them: unpaced, the fresh-connection loops of
/// a long run against a fast route ran out (EADDRNOTAVAIL) in CI.
pub const MAX_CONNECTIONS_PER_SECOND: u32 = 200;

/// Runs `clients` sequential request loops against `url` until `stop` is
/// set, `max_requests` were sent, or `max_time` passed, whichever is first,
/// at most [`MAX_CONNECTIONS_PER_SECOND`] in all.
/// Each loop opens a new connection per request ([`client`]).
pub async fn run(url: &str, clients: usize, max_requests: u64, max_time: Duration, stop: Arc<AtomicBool>) -> Report {
    let period = Duration::from_secs(1) * clients.max(1) as u32 / MAX_CONNECTIONS_PER_SECOND;
    run_with(client, Some(period), url, clients, max_requests, max_time, stop).await
}

/// [`run`] with each loop on one kept-alive connection ([`keepalive_client`]),
/// unpaced: it holds no port per request.
pub async fn run_keepalive(
    url: &str,
    clients: usize,
    max_requests: u64,
    max_time: Duration,
    stop: Arc<AtomicBool>,
) -> Report {
    run_with(keepalive_client, None, url, clients, max_requests, max_time, stop).await
}

async fn run_with(
    make_client: fn() -> Client<HttpConnector, Empty<Bytes>>,
    period: Option<Duration>,
    url: &str,
    clients: usize,
    max_requests: u64,
    max_time: Duration,
    stop: Arc<AtomicBool>,
) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + max_time;
    let loops = (0..clients).map(|_| {
        let (url, report, sent, stop) = (url.to_string(), report.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let client = make_client();
            let mut pace = period.map(tokio::time::interval);
            if let Some(pace) = &mut pace {
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            while !stop.load(Ordering::Relaxed)
                && tokio::time::Instant::now() < deadline
                && sent.fetch_add(1, Ordering::Relaxed) < max_requests
            {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                let outcome = get(&client, &url).await;
                let mut report = report.lock().await;
                match outcome {
                    Ok(answer) => {
                        report.ok += 1;
                        *report.by_worker.entry(answer.worker.unwrap_or_default()).or_default() += 1;
                    }
                    Err(e) => {
                        report.failed += 1;
                        if report.errors.len() < 5 {
                            report.errors.push(format!("{e:#}"));
                        }
                    }
                }
            }
        })
    });
    for handle in loops.collect::<Vec<_>>() {
        let _ = handle.await;
    }
    Arc::try_unwrap(report).map(Mutex::into_inner).unwrap_or_default()
}
