//! L7 proxy: each request goes to the least busy worker of its route pool.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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

/// After shutdown begins, how long fresh connections get to send a request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub const WORKER_HEADER: &str = "x-clusterd-worker";
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_CLUSTERD_WORKER: HeaderName = HeaderName::from_static(WORKER_HEADER);

pub struct HttpProxy {
    router: Arc<Router>,
    client: Client<HttpConnector, ProxyBody>,
    metrics: Arc<Metrics>,
}

impl HttpProxy {
    pub fn new(router: Arc<Router>, metrics: Arc<Metrics>) -> HttpProxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        HttpProxy { router, client, metrics }
    }

    /// Serves the shared port until `shutdown`, then lets open connections
    /// finish their current request and returns once all are closed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let graceful = GracefulShutdown::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn_connection(&graceful, stream, peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
        for (stream, peer) in super::drain_backlog(listener) {
            self.spawn_connection(&graceful, stream, peer);
        }
        // hyper closes a connection that has not sent its first request yet
        // as idle; give just-accepted ones time to be read before that.
        tokio::time::sleep(FIRST_REQUEST_GRACE).await;
        graceful.shutdown().await;
    }

    fn spawn_connection(self: &Arc<Self>, graceful: &GracefulShutdown, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(self);
        let service = service_fn(move |req| Arc::clone(&proxy).handle(req, peer));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
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
        let idempotent = is_idempotent(&parts.method);
        let body = match body.size_hint().exact() {
            Some(len) if len <= REPLAYABLE_BODY_LIMIT => match body.collect().await {
                Ok(collected) => RequestBody::Replayable(collected.to_bytes()),
                Err(e) => {
                    return Ok(plain(StatusCode::BAD_REQUEST, format!("reading request body: {e}\n")));
                }
            },
            _ => RequestBody::Streaming(Some(body)),
        };
        Ok(self.forward(&pool, &parts, body, idempotent).await)
    }

    async fn forward(
        &self,
        pool: &Pool,
        parts: &http::request::Parts,
        mut body: RequestBody,
        idempotent: bool,
    ) -> Response<ProxyBody> {
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
                    // Idempotent requests may be repeated whenever no response
                    // arrived; others only if the connection never opened.
                    let retry = body.is_replayable() && (idempotent || e.is_connect()) && tried.len() < MAX_ATTEMPTS;
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

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
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

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
