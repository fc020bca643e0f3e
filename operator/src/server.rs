//! `/healthz`, `/readyz` and `/metrics` of the operator, and where clusterd
//! says that its status changed (`wire::CHANGED_PATH`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clustered_api::wire::{CHANGED_PATH, HELLO_QUERY};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// What the server answers from, and where it passes clusterd's words.
pub struct Health {
    /// Set while the replica either leads with its caches listed (it
    /// reconciles) or waits as a standby: both are fit for a rollout.
    /// Clear while a new leader lists its caches.
    pub ready: Arc<AtomicBool>,
    /// Cleared while a watch does not recover although the API server
    /// answers (see [`crate::watches::watchdog`]): Kubernetes then
    /// restarts the operator.
    pub live: Arc<AtomicBool>,
    /// The addresses of pods whose clusterd said its status changed, for
    /// the controller to ask again. Bounded: a word that does not fit is
    /// dropped, and the pod's next regular ask reads the change.
    pub changed: mpsc::Sender<IpAddr>,
}

pub async fn serve(addr: SocketAddr, registry: Arc<Registry>, health: Arc<Health>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "serving /healthz, /readyz, /metrics and {CHANGED_PATH}");
    serve_on(listener, registry, health).await
}

/// [`serve`] on a listener already bound (the tests bind port 0).
pub async fn serve_on(listener: TcpListener, registry: Arc<Registry>, health: Arc<Health>) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let (registry, health) = (registry.clone(), health.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (registry, health) = (registry.clone(), health.clone());
                async move { Ok::<_, Infallible>(route(&req, peer.ip().to_canonical(), &registry, &health)) }
            });
            if let Err(e) =
                auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await
            {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn route(req: &Request<Incoming>, peer: IpAddr, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    match req.uri().path() {
        // The pod is known by its address; the word is only "ask me again"
        // (a hello only checks that words arrive).
        CHANGED_PATH if req.method() == http::Method::POST => {
            if req.uri().query() != Some(HELLO_QUERY) {
                let _ = health.changed.try_send(peer);
            }
            text(StatusCode::NO_CONTENT, String::new())
        }
        "/healthz" if health.live.load(Ordering::Relaxed) => text(StatusCode::OK, "ok\n".into()),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "watches do not recover\n".into()),
        "/readyz" if !health.live.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "watches do not recover\n".into())
        }
        "/readyz" if health.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                    );
                    response
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
