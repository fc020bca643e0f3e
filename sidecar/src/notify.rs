//! Tells whoever asked for it that the status changed: the operator asks
//! `/status` with [`NOTIFY_PORT_HEADER`], and from then on learns of a
//! crash at once and need hardly ask a settled pod at all. The pod holds no
//! credentials and keeps no connection; a lost word costs only freshness,
//! since the asker still asks now and then.

use std::net::SocketAddr;
use std::time::Duration;

use clustered_api::wire::{CHANGED_PATH, ClusterdStatus};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

/// A burst of changes (a worker crashes, backs off, restarts) is told at
/// most this often: the asker reads the whole status anyway.
const MIN_GAP: Duration = Duration::from_millis(250);

/// An asker that does not answer in this time is not waited for.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Where the word goes: the last asker that wanted it.
pub type Target = watch::Sender<Option<SocketAddr>>;

/// Says `POST` [`CHANGED_PATH`] to the target each time the settled status
/// ([`ClusterdStatus::settled`]) changes, until the status is dropped.
pub async fn run(mut settled: watch::Receiver<ClusterdStatus>, target: watch::Receiver<Option<SocketAddr>>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(TIMEOUT));
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
    while settled.changed().await.is_ok() {
        settled.borrow_and_update();
        let Some(to) = *target.borrow() else { continue };
        tell(&client, to).await;
        tokio::time::sleep(MIN_GAP).await;
    }
}

async fn tell(client: &Client<HttpConnector, Empty<Bytes>>, to: SocketAddr) {
    let request = hyper::Request::post(format!("http://{to}{CHANGED_PATH}"))
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new());
    let Ok(request) = request else { return };
    match tokio::time::timeout(TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => tracing::trace!(%to, "status change told"),
        Ok(Ok(response)) => tracing::debug!(%to, status = %response.status(), "status change refused"),
        Ok(Err(e)) => tracing::debug!(%to, error = %e, "status change not told"),
        Err(_) => tracing::debug!(%to, "status change not told in time"),
    }
}
