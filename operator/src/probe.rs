//! Asks each ready pod's clusterd for its `/status`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clustered_api::wire::{ClusterdStatus, NOTIFY_PORT_HEADER, STATUS_PATH};
use futures::{StreamExt, stream};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tokio::sync::Semaphore;

use crate::status::Report;

/// A status document is small; anything larger is not clusterd.
const MAX_BODY: usize = 1 << 20;

/// Shared by all reconciles: one connection pool and one bound on how many
/// pods are asked at once, however many ClusteredServices there are.
#[derive(Clone)]
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
    permits: Arc<Semaphore>,
    timeout: Duration,
    /// The operator's port that each clusterd asked tells of its changes
    /// (`wire::NOTIFY_PORT_HEADER`); none, and clusterd must be asked often.
    notify_port: Option<u16>,
}

impl Prober {
    pub fn new(concurrency: usize, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        // No connection kept between probes, as the kubelet's HTTP probes
        // keep none: an idle pooled connection costs ~22 KiB of buffers,
        // channel and task (heaptrack, 300-service fleet), three per
        // ClusteredService, a third of the operator's heap; a handshake
        // every status interval costs next to nothing. Each probe says
        // `Connection: close` (see `ask`).
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
        Self { client, permits: Arc::new(Semaphore::new(concurrency)), timeout, notify_port: None }
    }

    /// Each pod asked is also asked to tell the operator, at `port` of the
    /// address it is asked from, when its status changes.
    pub fn telling(self, port: u16) -> Self {
        Self { notify_port: Some(port), ..self }
    }

    /// Reports of every pod that has an IP, keyed by pod name.
    pub async fn reports(&self, pods: &[&Pod], admin_port: u16) -> BTreeMap<String, Report> {
        // Collected first: an iterator borrowing the pods must not live
        // across an await of this (Send) future.
        let asks: Vec<(String, String)> =
            pods.iter().filter_map(|pod| Some((pod.name_any(), pod.status.as_ref()?.pod_ip.clone()?))).collect();
        stream::iter(asks)
            .map(|(name, ip)| async move { (name, self.ask(&ip, admin_port).await) })
            .buffer_unordered(16)
            .collect()
            .await
    }

    async fn ask(&self, ip: &str, port: u16) -> Report {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        let uri: hyper::Uri =
            format!("http://{host}:{port}{STATUS_PATH}").parse().map_err(|e| format!("bad address {ip}: {e}"))?;
        // clusterd closes first, so the closed connection's TIME_WAIT stays
        // with each pod (a dozen a minute) rather than with the operator
        // (thousands a second in a large fleet).
        let mut request = hyper::Request::get(uri).header(hyper::header::CONNECTION, "close");
        if let Some(port) = self.notify_port {
            request = request.header(NOTIFY_PORT_HEADER, port);
        }
        let request = request.body(Empty::new()).map_err(|e| format!("bad request to {ip}: {e}"))?;
        let fetch = async {
            let response = self.client.request(request).await.map_err(|e| format!("clusterd unreachable: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("clusterd answered {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading clusterd status: {e}"))?
                .to_bytes();
            serde_json::from_slice::<ClusterdStatus>(&body).map_err(|e| format!("clusterd status unreadable: {e}"))
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .unwrap_or_else(|_| Err(format!("clusterd did not answer within {:?}", self.timeout)))
    }
}
