//! What a request becomes on its way to a worker: validated (`Host`),
//! stripped of the client connection's headers, `x-forwarded-for` added,
//! addressed to the worker, its body buffered when small enough to be sent
//! again.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::Backend;
use crate::body::{ProxyBody, full, plain};

/// Bodies up to this size are buffered so the request can be retried.
const REPLAYABLE_BODY_LIMIT: u64 = 64 * 1024;
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The Host the worker gets is the client's (see `build_request`): an
/// HTTP/1.1 request without one is refused (RFC 9112, section 3.2); an
/// HTTP/1.0 one goes without.
pub(super) fn missing_host<B>(req: &Request<B>) -> Option<Response<ProxyBody>> {
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
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

pub(super) fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

/// An HTTP/1.1 upgrade request: `Upgrade` plus `Connection: upgrade`.
/// (Checked on every request: the `Upgrade` lookup comes first, it is cheap.)
pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

pub(super) fn build_request(
    parts: &http::request::Parts,
    backend: &Backend,
    body: ProxyBody,
    h2c: bool,
) -> Request<ProxyBody> {
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

/// A request's body as it goes to the worker(s).
pub(super) enum RequestBody {
    Replayable(Bytes),
    /// Sent as it arrives; the flag says the client's body turned out
    /// malformed (a bad chunk) while it was sent.
    Streaming(Option<Incoming>, Arc<AtomicBool>),
}

impl RequestBody {
    /// A body of known size up to [`REPLAYABLE_BODY_LIMIT`] is read whole
    /// (a client's bad body gets `400`); a larger or unsized one streams.
    pub(super) async fn read(body: Incoming) -> Result<RequestBody, Response<ProxyBody>> {
        match body.size_hint().exact() {
            Some(len) if len <= REPLAYABLE_BODY_LIMIT => match body.collect().await {
                Ok(collected) => Ok(RequestBody::Replayable(collected.to_bytes())),
                Err(e) => Err(plain(StatusCode::BAD_REQUEST, format!("reading request body: {e}\n"))),
            },
            _ => Ok(RequestBody::Streaming(Some(body), Arc::default())),
        }
    }

    pub(super) fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
    }

    pub(super) fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable(bytes) => Some(full(bytes.clone())),
            RequestBody::Streaming(body, malformed) => {
                let malformed = Arc::clone(malformed);
                body.take().map(|inner| UnsyncBoxBody::new(ClientBody { inner, malformed }))
            }
        }
    }

    /// Whether the failure was the client's: its body could not be read.
    pub(super) fn malformed(&self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

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
    fn an_http_1_1_request_needs_a_host() {
        let request = |version, uri: &str, host: Option<&'static str>| {
            let mut builder = Request::builder().version(version).uri(uri);
            if let Some(host) = host {
                builder = builder.header(header::HOST, host);
            }
            builder.body(()).expect("request")
        };
        let refused = missing_host(&request(http::Version::HTTP_11, "/", None)).expect("400");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert!(missing_host(&request(http::Version::HTTP_11, "/", Some("example.com"))).is_none());
        assert!(missing_host(&request(http::Version::HTTP_11, "http://example.com/", None)).is_none(), "absolute form");
        assert!(missing_host(&request(http::Version::HTTP_10, "/", None)).is_none(), "HTTP/1.0 may omit it");
    }

    fn parts(version: http::Version, uri: &str, headers: &[(HeaderName, &'static str)]) -> http::request::Parts {
        let mut builder = Request::builder().version(version).uri(uri);
        for (name, value) in headers {
            builder = builder.header(name, *value);
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_worker_gets_the_clients_host_and_its_own_address() {
        let backend = Backend::new(0, 1, "127.0.0.1:4001".parse().expect("addr"), "default".into(), &Metrics::new());
        // HTTP/1.1 to the worker: Host as the client sent it.
        let request = build_request(
            &parts(http::Version::HTTP_11, "/a?b=1", &[(header::HOST, "example.com")]),
            &backend,
            full(Bytes::new()),
            false,
        );
        assert_eq!(request.uri(), "http://127.0.0.1:4001/a?b=1");
        assert_eq!(request.headers()[header::HOST], "example.com");
        // An HTTP/2 client names the host in :authority only.
        let request = build_request(
            &parts(http::Version::HTTP_2, "http://example.com/x", &[]),
            &backend,
            full(Bytes::new()),
            false,
        );
        assert_eq!(request.headers()[header::HOST], "example.com");
        // h2c to the worker (gRPC): `te: trailers` stays, HTTP/2 all the way.
        let request = build_request(
            &parts(http::Version::HTTP_2, "http://example.com/x", &[(header::TE, "trailers")]),
            &backend,
            full(Bytes::new()),
            true,
        );
        assert_eq!(request.version(), http::Version::HTTP_2);
        assert_eq!(request.headers()[header::TE], "trailers");
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
