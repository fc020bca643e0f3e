//! The admin port: /healthz, /readyz, /status (which may ask to be told of
//! changes, see [`crate::notify`]), /metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clustered_api::wire::{ClusterdStatus, NOTIFY_PORT_HEADER, STATUS_PATH};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::body::{ProxyBody, plain, with_type};
use crate::metrics::Metrics;
use crate::notify::Notify;
use crate::supervisor::{Event, Shared};

pub struct Admin {
    pub shared: Arc<Shared>,
    pub events: UnboundedSender<Event>,
    pub metrics: Arc<Metrics>,
    pub min_ready: u32,
    /// Who is told of status changes ([`NOTIFY_PORT_HEADER`]).
    pub notify: Arc<Notify>,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let admin = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |req| Arc::clone(&admin).handle(req, peer));
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let response = match req.uri().path() {
            "/healthz" => plain(StatusCode::OK, "ok\n".into()),
            "/readyz" => self.readyz(),
            STATUS_PATH => match self.notify_to(&req, peer) {
                Err(why) => plain(StatusCode::BAD_REQUEST, why),
                Ok(()) => match self.status_json().await {
                    Some(json) => with_type(StatusCode::OK, json, "application/json"),
                    None => plain(StatusCode::SERVICE_UNAVAILABLE, "supervisor is gone\n".into()),
                },
            },
            "/metrics" => match self.status().await {
                Some(status) => with_type(
                    StatusCode::OK,
                    self.metrics.render(&status),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                None => plain(StatusCode::SERVICE_UNAVAILABLE, "supervisor is gone\n".into()),
            },
            _ => plain(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz, /status, /metrics\n".into()),
        };
        Ok(response)
    }

    fn readyz(&self) -> Response<ProxyBody> {
        let ready = self.shared.ready.load(Ordering::SeqCst);
        if self.shared.draining.load(Ordering::SeqCst) {
            plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        } else if ready >= self.min_ready {
            plain(StatusCode::OK, format!("ready: {ready} workers\n"))
        } else {
            plain(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {ready} of {} workers ready\n", self.min_ready))
        }
    }

    /// An ask with [`NOTIFY_PORT_HEADER`] makes its sender the one told of
    /// changes: its own address, at the port it names.
    fn notify_to(&self, req: &Request<Incoming>, peer: SocketAddr) -> Result<(), String> {
        let Some(value) = req.headers().get(NOTIFY_PORT_HEADER) else { return Ok(()) };
        let port = value.to_str().ok().and_then(|v| v.parse::<u16>().ok()).filter(|&port| port != 0);
        let port = port.ok_or_else(|| format!("{NOTIFY_PORT_HEADER} must be a port number, 1 to 65535\n"))?;
        self.notify.asked_by(SocketAddr::new(peer.ip().to_canonical(), port));
        Ok(())
    }

    async fn status(&self) -> Option<ClusterdStatus> {
        let (reply, answer) = oneshot::channel();
        self.events.send(Event::Status(reply)).ok()?;
        let mut status = answer.await.ok()?;
        status.notifies = self.notify.reached().map(|to| to.to_string());
        Some(status)
    }

    async fn status_json(&self) -> Option<String> {
        let status = self.status().await?;
        serde_json::to_string_pretty(&status).ok()
    }
}
