//! L4 proxy: each connection goes to the worker with the fewest open
//! connections and bytes are copied both ways.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::choice::Hold;
use super::{InFlight, Pool};
use crate::metrics::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_ATTEMPTS: usize = 3;

/// Serves until `shutdown`, then waits for open connections to end.
pub async fn serve(listener: TcpListener, pool: Arc<Pool>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let hold = Arc::new(Hold::default());
    loop {
        let client = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = client.set_nodelay(true);
        tracker.spawn(relay(client, Arc::clone(&pool), Arc::clone(&metrics), Arc::clone(&hold)));
    }
    for (client, _) in super::drain_backlog(listener) {
        tracker.spawn(relay(client, Arc::clone(&pool), Arc::clone(&metrics), Arc::clone(&hold)));
    }
    tracker.close();
    tracker.wait().await;
}

async fn relay(mut client: TcpStream, pool: Arc<Pool>, metrics: Arc<Metrics>, hold: Arc<Hold>) {
    let mut tried = Vec::new();
    while tried.len() < MAX_ATTEMPTS {
        let Some(backend) = hold.pick(&pool, !tried.is_empty(), || pool.pick(&tried)).await else {
            break;
        };
        tried.push(backend.pid);
        let guard = InFlight::start(Arc::clone(&backend), Arc::clone(&metrics));
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.addr)).await;
        match connected {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                backend.count_request();
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(worker = backend.worker_id, error = %e, "tcp relay ended with an error");
                }
                drop(guard);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(worker = backend.worker_id, error = %e, "connecting to worker failed")
            }
            Err(_) => tracing::debug!(worker = backend.worker_id, "connecting to worker timed out"),
        }
        metrics.proxy_errors.inc();
        metrics.retries.inc();
    }
    tracing::debug!("no worker available for a tcp connection; closing it");
}
