//! Tells whoever asked for it that the status changed: the operator asks
//! `/status` with [`NOTIFY_PORT_HEADER`], and from then on learns of a
//! crash at once and need hardly ask a settled pod at all. The pod holds no
//! credentials and keeps no connection. `/status` says whom it tells only
//! while words reach them, so an asker that cannot be reached (a port a
//! network policy closes) sees that, and keeps asking often.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustered_api::wire::{CHANGED_PATH, ClusterdStatus, HELLO_QUERY};
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

pub struct Notify {
    /// The last asker that wanted to be told.
    target: watch::Sender<Option<SocketAddr>>,
    /// The target, once a word reached it; cleared when one did not.
    reached: Mutex<Option<SocketAddr>>,
}

impl Notify {
    pub fn new() -> Arc<Notify> {
        Arc::new(Notify { target: watch::Sender::new(None), reached: Mutex::new(None) })
    }

    /// `to` asked to be told from now on. A first word (a hello) checks that
    /// words reach it: at once for a new target, and again for one that a
    /// word did not reach.
    pub fn asked_by(&self, to: SocketAddr) {
        if *self.target.borrow() != Some(to) || self.reached().is_none() {
            self.target.send_replace(Some(to));
        }
    }

    /// Whom words reach (`/status`'s `notifies`): the target, once a word
    /// reached it (not a previous target, while a new one's hello is due).
    pub fn reached(&self) -> Option<SocketAddr> {
        let reached = *self.reached.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        reached.filter(|&to| *self.target.borrow() == Some(to))
    }

    /// Says `POST` [`CHANGED_PATH`] to the target each time the settled
    /// status ([`ClusterdStatus::settled`]) changes, and a hello to each new
    /// target, until the supervisor is gone.
    pub async fn run(self: Arc<Self>, mut settled: watch::Receiver<ClusterdStatus>) {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        connector.set_nodelay(true);
        let client: Client<_, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
        let mut target = self.target.subscribe();
        loop {
            let changed = tokio::select! {
                gone = settled.changed() => match gone {
                    Ok(()) => true,
                    Err(_) => return,
                },
                Ok(()) = target.changed() => settled.has_changed().unwrap_or(false),
            };
            settled.borrow_and_update();
            let Some(to) = *target.borrow_and_update() else { continue };
            let reached = tell(&client, to, changed).await;
            *self.reached.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = reached.then_some(to);
            tokio::time::sleep(MIN_GAP).await;
        }
    }
}

/// One word; true if it was taken.
async fn tell(client: &Client<HttpConnector, Empty<Bytes>>, to: SocketAddr, changed: bool) -> bool {
    let query = if changed { String::new() } else { format!("?{HELLO_QUERY}") };
    let request = hyper::Request::post(format!("http://{to}{CHANGED_PATH}{query}"))
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new());
    let Ok(request) = request else { return false };
    match tokio::time::timeout(TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => true,
        Ok(Ok(response)) => {
            tracing::debug!(%to, status = %response.status(), "status change refused");
            false
        }
        Ok(Err(e)) => {
            tracing::debug!(%to, error = %e, "status change not told");
            false
        }
        Err(_) => {
            tracing::debug!(%to, "status change not told in time");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_asker_is_not_named_until_its_hello_arrives() {
        let notify = Notify::new();
        let (old, new) = (SocketAddr::from(([10, 0, 0, 1], 8080)), SocketAddr::from(([10, 0, 0, 2], 8080)));
        notify.asked_by(old);
        assert_eq!(notify.reached(), None, "no word has arrived yet");
        *notify.reached.lock().expect("not poisoned") = Some(old);
        assert_eq!(notify.reached(), Some(old));
        // A new operator (a new leader) asks: it must keep asking often
        // until its own hello arrives, not trust the old one's.
        notify.asked_by(new);
        assert_eq!(notify.reached(), None);
    }
}
