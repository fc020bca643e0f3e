//! L7 proxy: each request goes to the least busy worker of its route pool.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backend, InFlight, Pool, Router};
use crate::body::{ProxyBody, full, plain};
use crate::metrics::Metrics;

/// Bodies up to this size are buffered so the request can be retried.
const REPLAYABLE_BODY_LIMIT: u64 = 64 * 1024;
/// Attempts per retryable request, each on a different worker.
const MAX_ATTEMPTS: usize = 3;
/// Shorter than common app keep-alive timeouts (Node: 5 s) so the pool rarely
/// reuses a connection the worker is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Once shutdown begins, a client connection is closed when it has been
/// idle (no new request) this long; one that sends a request sooner gets
/// its answer with `Connection: close`. Closing an idle keep-alive
/// connection races with a request the client may be sending, so it is done
/// only after a pause that active clients do not make.
const DRAIN_IDLE_CLOSE: Duration = Duration::from_secs(1);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub const WORKER_HEADER: &str = "x-clusterd-worker";
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_CLUSTERD_WORKER: HeaderName = HeaderName::from_static(WORKER_HEADER);

pub struct HttpProxy {
    router: Arc<Router>,
    client: Client<HttpConnector, ProxyBody>,
    metrics: Arc<Metrics>,
    /// Cancelled when clusterd shuts down.
    shutdown: CancellationToken,
    /// The origin of the per-connection activity clocks.
    started: Instant,
}

impl HttpProxy {
    pub fn new(router: Arc<Router>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> HttpProxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        HttpProxy { router, client, metrics, shutdown, started: Instant::now() }
    }

    /// Serves the shared port until shutdown, then lets open connections
    /// finish (see [`DRAIN_IDLE_CLOSE`]) and returns once all are closed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let connections = TaskTracker::new();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn_connection(&connections, stream, peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
        for (stream, peer) in super::drain_backlog(listener) {
            self.spawn_connection(&connections, stream, peer);
        }
        connections.close();
        connections.wait().await;
    }

    fn spawn_connection(self: &Arc<Self>, connections: &TaskTracker, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        // When this connection last began a request (or was accepted).
        let last_request = Arc::new(AtomicU64::new(self.clock()));
        let service = service_fn({
            let (proxy, last_request) = (Arc::clone(self), Arc::clone(&last_request));
            move |req| {
                last_request.store(proxy.clock(), Ordering::Relaxed);
                Arc::clone(&proxy).handle(req, peer)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let proxy = Arc::clone(self);
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = proxy.shutdown.cancelled() => proxy.close_when_idle(conn, &last_request).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }

    /// Milliseconds since the proxy started: the connections' activity clock.
    fn clock(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Shutting down: runs `conn` until the client closes it, its next
    /// response (marked `Connection: close`) is sent, or it has been idle
    /// for [`DRAIN_IDLE_CLOSE`]; a request in progress always finishes.
    async fn close_when_idle<C: GracefulConnection>(
        &self,
        mut conn: Pin<&mut C>,
        last_request: &AtomicU64,
    ) -> Result<(), C::Error> {
        loop {
            let idle = Duration::from_millis(self.clock().saturating_sub(last_request.load(Ordering::Relaxed)));
            if idle >= DRAIN_IDLE_CLOSE {
                conn.as_mut().graceful_shutdown();
                return conn.await;
            }
            tokio::select! {
                result = conn.as_mut() => return result,
                () = tokio::time::sleep(DRAIN_IDLE_CLOSE - idle) => {}
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let pool = Arc::clone(self.router.route(req.uri().path()));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        append_forwarded_for(&mut parts.headers, peer.ip());
        let body = match body.size_hint().exact() {
            Some(len) if len <= REPLAYABLE_BODY_LIMIT => match body.collect().await {
                Ok(collected) => RequestBody::Replayable(collected.to_bytes()),
                Err(e) => {
                    return Ok(plain(StatusCode::BAD_REQUEST, format!("reading request body: {e}\n")));
                }
            },
            _ => RequestBody::Streaming(Some(body)),
        };
        let mut response = self.forward(&pool, &parts, body).await;
        if self.shutdown.is_cancelled() {
            // The client reconnects, and finds a pod that is not stopping.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response)
    }

    /// Sends the request to a worker of `pool`. It goes to another worker
    /// only if the first could not be reached at all: a request that reached
    /// a worker is never replayed, whatever its method, so a request that
    /// hangs or crashes its worker costs one worker, not every worker it
    /// would be retried on.
    async fn forward(&self, pool: &Pool, parts: &http::request::Parts, mut body: RequestBody) -> Response<ProxyBody> {
        let mut tried = Vec::new();
        loop {
            let Some(backend) = pool.pick(&tried) else {
                return no_worker(pool, tried.is_empty());
            };
            tried.push(backend.pid);
            let guard = InFlight::start(Arc::clone(&backend), Arc::clone(&self.metrics));
            let Some(attempt_body) = body.for_attempt() else {
                return plain(StatusCode::BAD_GATEWAY, "request body already sent to a failed worker\n".into());
            };
            let request = build_request(parts, &backend, attempt_body);
            match self.client.request(request).await {
                Ok(response) => return respond(response, guard),
                Err(e) => {
                    self.metrics.proxy_errors.inc();
                    // A failed connect never reached the app. (A pooled
                    // connection that closed before the request went out is
                    // retried by the client itself.)
                    let retry = e.is_connect() && body.is_replayable() && tried.len() < MAX_ATTEMPTS;
                    tracing::debug!(worker = backend.worker_id, pid = backend.pid, error = ?e, retry, "worker request failed");
                    if !retry {
                        return plain(StatusCode::BAD_GATEWAY, format!("worker {} failed: {e}\n", backend.worker_id));
                    }
                    self.metrics.retries.inc();
                }
            }
        }
    }
}

enum RequestBody {
    Replayable(Bytes),
    Streaming(Option<Incoming>),
}

impl RequestBody {
    fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
    }

    fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable(bytes) => Some(full(bytes.clone())),
            RequestBody::Streaming(body) => body.take().map(UnsyncBoxBody::new),
        }
    }
}

fn build_request(parts: &http::request::Parts, backend: &Backend, body: ProxyBody) -> Request<ProxyBody> {
    let mut uri = uri::Parts::default();
    uri.scheme = Some(uri::Scheme::HTTP);
    uri.authority = Some(backend.authority.clone());
    uri.path_and_query = Some(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    let uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = parts.headers.clone();
    request
}

/// The worker's response, labelled with its worker id; the request stays
/// counted as in flight until its body has been sent.
fn respond(response: Response<Incoming>, guard: InFlight) -> Response<ProxyBody> {
    let backend = guard.backend();
    backend.count_request();
    let worker = HeaderValue::from(backend.worker_id);
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(X_CLUSTERD_WORKER.clone(), worker);
    let body = TrackedBody { inner: body, _guard: guard };
    Response::from_parts(parts, UnsyncBoxBody::new(body))
}

/// Removes headers that describe one connection, not the message.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

fn no_worker(pool: &Pool, first_attempt: bool) -> Response<ProxyBody> {
    let text = if first_attempt {
        format!("clusterd: no worker available in pool {:?}\n", pool.name)
    } else {
        format!("clusterd: no other worker available in pool {:?} after a worker failed\n", pool.name)
    };
    plain(StatusCode::SERVICE_UNAVAILABLE, text)
}

/// A worker's response body that keeps the request counted as in flight
/// until the last byte went out.
struct TrackedBody {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, IpAddr::from([10, 0, 0, 1]));
        append_forwarded_for(&mut headers, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
    }
}
