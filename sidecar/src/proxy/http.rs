//! L7 proxy: each request goes to the least busy worker of its route pool.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::choice::{Affinity, Chooser};
use super::request::{RequestBody, append_forwarded_for, build_request, is_upgrade, missing_host, strip_hop_by_hop};
use super::{InFlight, Pool, Router, UpgradedConnection};
use crate::body::{ProxyBody, full, plain};
use crate::config::{Admission, Sticky, UpstreamProtocol};
use crate::metrics::Metrics;

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
/// Connecting to a worker for an upgrade request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub const WORKER_HEADER: &str = "x-clusterd-worker";
static X_CLUSTERD_WORKER: HeaderName = HeaderName::from_static(WORKER_HEADER);

pub struct HttpProxy {
    router: Arc<Router>,
    client: Client<HttpConnector, ProxyBody>,
    /// HTTP/2 cleartext (prior knowledge) to the workers.
    h2c_client: Client<HttpConnector, ProxyBody>,
    upstream: UpstreamProtocol,
    metrics: Arc<Metrics>,
    /// Cancelled when clusterd shuts down.
    shutdown: CancellationToken,
    /// Upgraded connections stay open this long after shutdown begins (the
    /// drain deadline), then are closed.
    drain_timeout: Duration,
    /// The upgraded connections (client joined to worker), waited for at shutdown.
    tunnels: TaskTracker,
    /// The origin of the per-connection activity clocks.
    started: Instant,
    /// Which worker takes a request.
    choice: Chooser,
}

impl HttpProxy {
    pub fn new(
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        drain_timeout: Duration,
    ) -> HttpProxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            // The client's Host goes through as it was (see `build_request`),
            // never the worker's loopback address.
            .set_host(false)
            .build(connector.clone());
        let h2c_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(connector);
        HttpProxy {
            router,
            client,
            h2c_client,
            upstream: UpstreamProtocol::Http1,
            shutdown,
            drain_timeout,
            tunnels: TaskTracker::new(),
            started: Instant::now(),
            choice: Chooser::new(Arc::clone(&metrics)),
            metrics,
        }
    }

    pub fn upstream(mut self, upstream: UpstreamProtocol) -> HttpProxy {
        self.upstream = upstream;
        self
    }

    pub fn sticky(mut self, sticky: Option<Sticky>) -> HttpProxy {
        self.choice.sticky = sticky;
        self
    }

    pub fn admission(mut self, admission: Option<Admission>) -> HttpProxy {
        self.choice.admission = admission;
        self
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
        // Upgrades begun by the last requests are tracked by now.
        self.tunnels.close();
        self.tunnels.wait().await;
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
        let proxy = Arc::clone(self);
        connections.spawn(async move {
            // HTTP/1.1, or HTTP/2 when the client opens with its preface.
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
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
    async fn close_when_idle<C: hyper_util::server::graceful::GracefulConnection>(
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
        if let Some(response) = missing_host(&req) {
            return Ok(response);
        }
        let pool = Arc::clone(self.router.route(req.uri().path()));
        let affinity = self.choice.affinity(&pool, req.headers());
        if is_upgrade(req.headers()) {
            return Ok(self.upgrade(&pool, req, peer, &affinity).await);
        }
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        append_forwarded_for(&mut parts.headers, peer.ip());
        let body = match RequestBody::read(body).await {
            Ok(body) => body,
            Err(response) => return Ok(response),
        };
        let mut response = self.forward(&pool, &parts, body, &affinity).await;
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
    async fn forward(
        &self,
        pool: &Arc<Pool>,
        parts: &http::request::Parts,
        mut body: RequestBody,
        affinity: &Affinity,
    ) -> Response<ProxyBody> {
        let mut tried = Vec::new();
        loop {
            let guard = match self.choice.admit(pool, &tried, affinity).await {
                Ok(guard) => guard,
                Err(response) => return response,
            };
            let backend = Arc::clone(guard.backend());
            tried.push(backend.pid);
            let Some(attempt_body) = body.for_attempt() else {
                return plain(StatusCode::BAD_GATEWAY, "request body already sent to a failed worker\n".into());
            };
            let h2c = match self.upstream {
                UpstreamProtocol::Http1 => false,
                UpstreamProtocol::H2c => true,
                UpstreamProtocol::Auto => parts.version == http::Version::HTTP_2,
            };
            let request = build_request(parts, &backend, attempt_body, h2c);
            let client = if h2c { &self.h2c_client } else { &self.client };
            match client.request(request).await {
                Ok(response) => {
                    let mut response = respond(response, guard);
                    self.choice.stick(&mut response, &backend, affinity);
                    return response;
                }
                Err(e) => {
                    self.metrics.proxy_errors.inc();
                    // A failed connect never reached the app. (A pooled
                    // connection that closed before the request went out is
                    // retried by the client itself.)
                    let retry = e.is_connect() && body.is_replayable() && tried.len() < MAX_ATTEMPTS;
                    tracing::debug!(worker = backend.worker_id, pid = backend.pid, error = ?e, retry, "worker request failed");
                    if body.malformed() {
                        return plain(StatusCode::BAD_REQUEST, format!("clusterd: reading the request body: {e}\n"));
                    }
                    if !retry {
                        return plain(StatusCode::BAD_GATEWAY, format!("worker {} failed: {e}\n", backend.worker_id));
                    }
                    self.metrics.retries.inc();
                }
            }
        }
    }
}

impl HttpProxy {
    /// Forwards an upgrade request (WebSocket...) to a worker of `pool` on a
    /// connection of its own; if the worker answers `101`, the client's
    /// connection and the worker's are joined until either side closes
    /// (or the drain deadline). Any other answer is passed on as usual.
    async fn upgrade(
        &self,
        pool: &Arc<Pool>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        affinity: &Affinity,
    ) -> Response<ProxyBody> {
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        append_forwarded_for(&mut parts.headers, peer.ip());
        if let Some(protocol) = protocol {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        let mut body = Some(UnsyncBoxBody::new(body));
        let mut tried = Vec::new();
        loop {
            let guard = match self.choice.admit(pool, &tried, affinity).await {
                Ok(guard) => guard,
                Err(response) => return response,
            };
            let backend = Arc::clone(guard.backend());
            tried.push(backend.pid);
            let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.addr)).await {
                Ok(Ok(stream)) => stream,
                failed => {
                    self.metrics.proxy_errors.inc();
                    tracing::debug!(worker = backend.worker_id, ?failed, "connecting to worker for an upgrade failed");
                    // Nothing reached the worker: another one may take it.
                    if tried.len() < MAX_ATTEMPTS {
                        self.metrics.retries.inc();
                        continue;
                    }
                    return plain(StatusCode::BAD_GATEWAY, format!("worker {} unreachable\n", backend.worker_id));
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(body) = body.take() else {
                return plain(StatusCode::BAD_GATEWAY, "upgrade request already sent\n".into());
            };
            let mut request = Request::from_parts(parts, body);
            // A connection of its own: the origin form, as a client sends it.
            *request.uri_mut() = request.uri().path_and_query().map_or(Uri::from_static("/"), |p| {
                Uri::from_maybe_shared(Bytes::copy_from_slice(p.as_str().as_bytes())).unwrap_or_default()
            });
            let mut response = match send_on_new_connection(stream, request).await {
                Ok(response) => response,
                Err(e) => {
                    self.metrics.proxy_errors.inc();
                    tracing::debug!(worker = backend.worker_id, error = %e, "upgrade request failed");
                    return plain(StatusCode::BAD_GATEWAY, format!("worker {} failed: {e}\n", backend.worker_id));
                }
            };
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                let mut response = respond(response, guard);
                self.choice.stick(&mut response, &backend, affinity);
                return response;
            }
            let worker_side = hyper::upgrade::on(&mut response);
            backend.count_request();
            let connection = UpgradedConnection::start(Arc::clone(&backend));
            drop(guard);
            let closing = self.closing();
            let worker = backend.worker_id;
            self.tunnels.spawn(async move {
                let _connection = connection;
                tokio::select! {
                    result = join(client_side, worker_side) => {
                        if let Err(e) = result {
                            tracing::debug!(worker, error = %e, "upgraded connection ended with an error");
                        }
                    }
                    () = closing => tracing::debug!(worker, "drain deadline: closing an upgraded connection"),
                }
            });
            let (mut parts, _) = response.into_parts();
            parts.headers.insert(X_CLUSTERD_WORKER.clone(), HeaderValue::from(worker));
            let mut response = Response::from_parts(parts, full(Bytes::new()));
            self.choice.stick(&mut response, &backend, affinity);
            return response;
        }
    }

    /// Completes at the drain deadline: `drain_timeout` after shutdown began.
    fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        let (shutdown, drain_timeout) = (self.shutdown.clone(), self.drain_timeout);
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(drain_timeout).await;
        }
    }
}

/// Sends one request on a fresh connection that may then be upgraded.
async fn send_on_new_connection(stream: TcpStream, request: Request<ProxyBody>) -> hyper::Result<Response<Incoming>> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "worker connection for an upgrade ended with an error");
        }
    });
    sender.send_request(request).await
}

/// Copies bytes both ways between the two upgraded connections until both
/// sides have closed.
async fn join(client: hyper::upgrade::OnUpgrade, worker: hyper::upgrade::OnUpgrade) -> Result<(), String> {
    let (client, worker) = tokio::try_join!(client, worker).map_err(|e| e.to_string())?;
    let (mut client, mut worker) = (TokioIo::new(client), TokioIo::new(worker));
    tokio::io::copy_bidirectional(&mut client, &mut worker).await.map(|_| ()).map_err(|e| e.to_string())
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
