//! L7 proxy: each request goes to the least busy worker of its route pool.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backend, InFlight, Pool, Router, UpgradedConnection};
use crate::body::{ProxyBody, full, plain};
use crate::config::{Admission, Sticky, UpstreamProtocol};
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
/// Connecting to a worker for an upgrade request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub const WORKER_HEADER: &str = "x-clusterd-worker";
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
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
    /// `--max-concurrency` and its queue; `None`: no limit.
    admission: Option<Admission>,
    /// `--sticky`: what ties a client to a worker.
    sticky: Option<Sticky>,
}

/// Where a sticky client was before: the worker it should go to, and the
/// cookie token it sent (a new one is set when it differs).
#[derive(Default)]
struct Affinity {
    preferred: Option<Arc<Backend>>,
    cookie_sent: Option<String>,
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
            metrics,
            shutdown,
            drain_timeout,
            tunnels: TaskTracker::new(),
            started: Instant::now(),
            admission: None,
            sticky: None,
        }
    }

    pub fn upstream(mut self, upstream: UpstreamProtocol) -> HttpProxy {
        self.upstream = upstream;
        self
    }

    pub fn sticky(mut self, sticky: Option<Sticky>) -> HttpProxy {
        self.sticky = sticky;
        self
    }

    /// The request's sticky worker, if `--sticky` is on and it has one alive.
    fn affinity(&self, pool: &Pool, headers: &HeaderMap) -> Affinity {
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
    fn stick(&self, response: &mut Response<ProxyBody>, backend: &Backend, affinity: &Affinity) {
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

    pub fn admission(mut self, admission: Option<Admission>) -> HttpProxy {
        self.admission = admission;
        self
    }

    /// A worker of `pool` for one request (not one of `tried`), counted as
    /// in flight. Under admission control the request waits, in a bounded
    /// queue, until a worker has fewer than `max_concurrency` requests; a
    /// full queue or a wait of `queue_timeout` gets a `503`.
    async fn admit(
        &self,
        pool: &Arc<Pool>,
        tried: &[u32],
        affinity: &Affinity,
    ) -> Result<InFlight, Response<ProxyBody>> {
        // A sticky client's worker, unless it already failed this request.
        let preferred = affinity.preferred.as_ref().filter(|b| !tried.contains(&b.pid));
        let candidate = || preferred.cloned().or_else(|| pool.pick(tried));
        let Some(limits) = self.admission else {
            let backend = candidate().ok_or_else(|| no_worker(pool, tried.is_empty()))?;
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
            let backend = candidate().ok_or_else(|| no_worker(pool, tried.is_empty()))?;
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
        let affinity = self.affinity(&pool, req.headers());
        if is_upgrade(req.headers()) {
            return Ok(self.upgrade(&pool, req, peer, &affinity).await);
        }
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
            _ => RequestBody::Streaming(Some(body), Arc::default()),
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
            let guard = match self.admit(pool, &tried, affinity).await {
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
                    self.stick(&mut response, &backend, affinity);
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
            let guard = match self.admit(pool, &tried, affinity).await {
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
                self.stick(&mut response, &backend, affinity);
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
            self.stick(&mut response, &backend, affinity);
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

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

/// An HTTP/1.1 upgrade request: `Upgrade` plus `Connection: upgrade`.
/// (Checked on every request: the `Upgrade` lookup comes first, it is cheap.)
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
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

enum RequestBody {
    Replayable(Bytes),
    /// Sent as it arrives; the flag says the client's body turned out
    /// malformed (a bad chunk) while it was sent.
    Streaming(Option<Incoming>, Arc<AtomicBool>),
}

impl RequestBody {
    fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
    }

    fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable(bytes) => Some(full(bytes.clone())),
            RequestBody::Streaming(body, malformed) => {
                let malformed = Arc::clone(malformed);
                body.take().map(|inner| UnsyncBoxBody::new(ClientBody { inner, malformed }))
            }
        }
    }

    /// Whether the failure was the client's: its body could not be read.
    fn malformed(&self) -> bool {
        matches!(self, RequestBody::Streaming(_, malformed) if malformed.load(Ordering::Relaxed))
    }
}

/// A client's streamed request body, which notes a read error: the request
/// then failed through the client's fault (400), not the worker's (502).
struct ClientBody {
    inner: Incoming,
    malformed: Arc<AtomicBool>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &frame {
            self.malformed.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn build_request(parts: &http::request::Parts, backend: &Backend, body: ProxyBody, h2c: bool) -> Request<ProxyBody> {
    let mut uri = uri::Parts::default();
    uri.scheme = Some(uri::Scheme::HTTP);
    uri.authority = Some(backend.authority.clone());
    uri.path_and_query = Some(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    let uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = parts.headers.clone();
    if !h2c && parts.version == http::Version::HTTP_10 {
        // Passed on as it came: it may lack Host, which HTTP/1.1 requires.
        *request.version_mut() = http::Version::HTTP_10;
    }
    if !h2c
        && !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        // An HTTP/2 client names the host in `:authority`.
        request.headers_mut().insert(header::HOST, authority);
    }
    if h2c {
        *request.version_mut() = http::Version::HTTP_2;
        // gRPC servers require it; the only TE value HTTP/2 allows.
        if parts.headers.get(header::TE).is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            request.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
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

/// The Host the worker gets is the client's (see `build_request`): an
/// HTTP/1.1 request without one is refused (RFC 9112, section 3.2); an
/// HTTP/1.0 one goes without.
fn missing_host(req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let missing = req.version() == http::Version::HTTP_11
        && !req.headers().contains_key(header::HOST)
        && req.uri().authority().is_none();
    missing.then(|| {
        plain(
            StatusCode::BAD_REQUEST,
            "clusterd: an HTTP/1.1 request needs a Host header (RFC 9112, section 3.2)\n".into(),
        )
    })
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

/// Admission control's answer: try again shortly (another pod may have room).
fn busy(pool: &Pool, why: &str) -> Response<ProxyBody> {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, format!("clusterd: {why} (pool {:?})\n", pool.name));
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
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

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; clusterd-worker-x=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("clusterd-worker=abc"));
        assert_eq!(cookie(&headers, "clusterd-worker"), Some("abc"));
        assert_eq!(cookie(&headers, "a"), Some("1"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&headers));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&headers));
        headers.remove(header::UPGRADE);
        assert!(!is_upgrade(&headers));
    }
}
