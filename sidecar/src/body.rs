//! Response bodies of clusterd's own answers, shared by the proxy (errors
//! such as "no worker available") and the admin server.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// The body type of every response clusterd sends: a worker's streamed
/// body or one of clusterd's own.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

pub fn full(bytes: Bytes) -> ProxyBody {
    UnsyncBoxBody::new(Full::new(bytes).map_err(|never: Infallible| match never {}))
}

pub fn plain(status: StatusCode, text: String) -> Response<ProxyBody> {
    with_type(status, text, "text/plain; charset=utf-8")
}

pub fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
