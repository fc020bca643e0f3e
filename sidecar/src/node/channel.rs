//! One Node worker's IPC channel, clusterd's end: hands the worker the
//! listening socket its `listen()` asks for, tells the supervisor when it
//! listens on the shared port, and asks it to disconnect before it stops.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::protocol::{self, FromWorker, Lines, Listen};

/// libuv's (negative errno) answer to a `listen()` node mode cannot serve.
const UV_ENOTSUP: i32 = -(nix::libc::ENOTSUP);

/// The ports the workers listen on. clusterd's own `--port` it accepts on
/// itself and hands out connection by connection ([`Dispatch`]); any other
/// TCP port a worker listens on is bound on first request and the socket
/// shared, as Node's primary does for its `SCHED_NONE` policy.
pub struct Sockets {
    port: u16,
    dispatch: Arc<Dispatch>,
    stop: CancellationToken,
    others: Mutex<HashMap<String, Arc<TcpListener>>>,
    backlog: Option<i32>,
}

impl Sockets {
    /// Starts accepting on `shared` (already listening); call within the runtime.
    pub fn new(shared: TcpListener, port: u16, backlog: Option<i32>) -> io::Result<Sockets> {
        shared.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(shared)?;
        let dispatch = Arc::new(Dispatch::default());
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&dispatch).serve(listener, stop.clone()));
        Ok(Sockets { port, dispatch, stop, others: Mutex::default(), backlog })
    }

    /// Closes the shared port: shutdown began.
    pub fn close_shared(&self) {
        self.stop.cancel();
    }

    /// The socket to share for a `listen()` on another port than `--port`,
    /// or the libuv error that `listen()` fails with.
    fn socket_for(&self, worker: u32, listen: &Listen) -> Result<Arc<TcpListener>, i32> {
        let Some(port) = listen.tcp_port().filter(|_| listen.fd.is_none()) else {
            tracing::warn!(
                worker,
                listen = %listen.key(),
                "node mode shares TCP ports only (not pipes, UDP or listen({{fd}})); that listen() fails with \
                 ENOTSUP: use --port-mode proxy"
            );
            return Err(UV_ENOTSUP);
        };
        tracing::warn!(
            worker,
            port,
            shared = self.port,
            "a worker listens on a port other than --port (PORT): sharing it too, but only --port gets the Service's traffic"
        );
        let mut others = lock(&self.others);
        if let Some(socket) = others.get(&listen.key()) {
            return Ok(Arc::clone(socket));
        }
        let ip = match (&listen.address, listen.address_type.as_str()) {
            (Some(address), _) => address.parse().map_err(|_| -(nix::libc::EADDRNOTAVAIL))?,
            (None, "6") => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            (None, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let socket = crate::listen_shared(SocketAddr::new(ip, port), self.backlog)
            .and_then(|l| l.set_nonblocking(true).map(|()| Arc::new(l)))
            .map_err(|e| -e.raw_os_error().unwrap_or(nix::libc::EINVAL))?;
        others.insert(listen.key(), Arc::clone(&socket));
        Ok(socket)
    }
}

/// Where a worker's channel takes connections to hand to its worker.
type Handoff = mpsc::UnboundedSender<TcpStream>;

/// How long a connection is held while no worker listens on `--port` (all
/// crashed, starting, or stopped): about a worker restart. Then it is
/// closed, as proxy mode answers 503 at once; clusterd cannot answer on the
/// app's behalf, since it does not know its protocol.
pub const NO_LISTENER_HOLD: Duration = Duration::from_secs(2);
/// Connections clusterd holds while waiting for a worker; more wait in the
/// kernel's accept queue (`--backlog`).
pub const MAX_HELD: usize = 256;

/// Connections accepted on `--port`, handed to the workers in turn (Node's
/// default round-robin scheduling). A worker is offered the next connection
/// only once it has acknowledged the last, so one whose event loop is
/// blocked gets none; a shared accept queue instead lets the first worker
/// to wake take a whole burst (libuv accepts until the queue is empty).
///
/// While workers listen but are all busy, a connection waits for one, as
/// under Node's own primary; when none listens, it waits at most
/// [`NO_LISTENER_HOLD`].
pub struct Dispatch {
    /// Workers ready for a connection, the longest-waiting first.
    free: Mutex<VecDeque<Handoff>>,
    offered: Notify,
    /// Workers whose server listens on `--port`.
    listening: AtomicUsize,
    held: Arc<Semaphore>,
    hold: Duration,
    /// Last warning about closed connections, to keep the log short.
    warned: Mutex<Option<tokio::time::Instant>>,
}

impl Default for Dispatch {
    fn default() -> Dispatch {
        Dispatch::new(MAX_HELD, NO_LISTENER_HOLD)
    }
}

impl Dispatch {
    fn new(max_held: usize, hold: Duration) -> Dispatch {
        Dispatch {
            free: Mutex::default(),
            offered: Notify::new(),
            listening: AtomicUsize::new(0),
            held: Arc::new(Semaphore::new(max_held)),
            hold,
            warned: Mutex::default(),
        }
    }

    fn offer(&self, worker: Handoff) {
        lock(&self.free).push_back(worker);
        self.offered.notify_one();
    }

    fn listener_joined(&self) {
        self.listening.fetch_add(1, Ordering::SeqCst);
    }

    fn listener_left(&self) {
        self.listening.fetch_sub(1, Ordering::SeqCst);
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener, stop: CancellationToken) {
        loop {
            let held = tokio::select! {
                held = Arc::clone(&self.held).acquire_owned() => held,
                _ = stop.cancelled() => return,
            };
            let Ok(held) = held else { return };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            match accepted.and_then(|(stream, _)| stream.into_std()) {
                Ok(stream) => {
                    let (dispatch, stop) = (Arc::clone(&self), stop.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = dispatch.hand_off(stream) => {}
                            _ = stop.cancelled() => {}
                        }
                        drop(held);
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "cannot accept on the shared port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Gives `stream` to the next free worker, waiting for one if need be;
    /// closes it when no worker has listened for [`Dispatch::hold`].
    async fn hand_off(&self, mut stream: TcpStream) {
        let mut deadline = tokio::time::Instant::now() + self.hold;
        loop {
            let offered = self.offered.notified();
            tokio::pin!(offered);
            offered.as_mut().enable();
            let next = lock(&self.free).pop_front();
            match next {
                Some(worker) => match worker.send(stream) {
                    Ok(()) => return,
                    // That worker is gone: the next one.
                    Err(mpsc::error::SendError(back)) => stream = back,
                },
                None => tokio::select! {
                    _ = offered => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        if self.listening.load(Ordering::SeqCst) == 0 {
                            self.closing(&stream);
                            return;
                        }
                        // Busy, not gone: keep waiting, and look again later.
                        deadline += self.hold;
                    }
                },
            }
        }
    }

    fn closing(&self, stream: &TcpStream) {
        let now = tokio::time::Instant::now();
        let mut warned = lock(&self.warned);
        if warned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10)) {
            *warned = Some(now);
            tracing::warn!(
                peer = ?stream.peer_addr().ok(),
                waited = ?self.hold,
                "closing connections: no worker listens on the shared port (further ones are not logged for 10s)"
            );
        }
    }

    /// A connection a worker did not take: to another worker.
    fn resubmit(self: &Arc<Self>, stream: TcpStream) {
        let dispatch = Arc::clone(self);
        tokio::spawn(async move { dispatch.hand_off(stream).await });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the channel tells the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The worker listens on the shared port.
    Listening,
    /// A requested disconnect is over: the worker closed the channel, or
    /// it did not within the bound. Time for SIGTERM.
    Disconnected,
}

/// The supervisor's handle on a worker's channel.
pub struct Channel {
    disconnect: mpsc::UnboundedSender<()>,
}

impl Channel {
    /// Stops handing the worker connections and asks it to finish its own
    /// (Node's `worker.disconnect()`); [`Report::Disconnected`] follows.
    pub fn disconnect(&self) {
        let _ = self.disconnect.send(());
    }
}

/// How a worker is stopped.
#[derive(Debug, Clone, Copy)]
pub struct Stopping {
    /// From the drain message (the worker has the drain preload) to the
    /// disconnect: kept-alive connections busy in that time close after
    /// their response, so those left at the disconnect, which Node (≥ 19)
    /// closes at once, have been idle that long. Zero: no drain message.
    pub drain_pause: Duration,
    /// From the disconnect until SIGTERM at the latest.
    pub disconnect_wait: Duration,
}

impl Stopping {
    /// The pause proxy mode also leaves a kept-alive connection before
    /// closing it: a second, or less with a short `--drain-timeout`.
    pub fn new(drain_timeout: Duration, preload: bool) -> Stopping {
        let pause = if preload { Duration::from_secs(1).min(drain_timeout / 4) } else { Duration::ZERO };
        Stopping { drain_pause: pause, disconnect_wait: drain_timeout / 2 }
    }
}

/// Serves clusterd's end of a worker's channel until the worker closes it.
pub fn start(
    stream: std::os::unix::net::UnixStream,
    worker: u32,
    sockets: Arc<Sockets>,
    stopping: Stopping,
    report: impl Fn(Report) + Send + Sync + 'static,
) -> io::Result<Channel> {
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    let (disconnect, requests) = mpsc::unbounded_channel();
    let (handoff, connections) = mpsc::unbounded_channel();
    let peer = Peer { stream, worker, sockets, seq: 0, handoff, shared_key: None, handing: None };
    tokio::spawn(peer.serve(requests, connections, stopping, report));
    Ok(Channel { disconnect })
}

struct Peer {
    stream: UnixStream,
    worker: u32,
    sockets: Arc<Sockets>,
    /// Our own message numbers.
    seq: u64,
    /// Where the dispatcher puts this worker's next connection.
    handoff: Handoff,
    /// The worker's server on `--port`, while it listens there.
    shared_key: Option<String>,
    /// The connection sent and not yet acknowledged: its `newconn` seq.
    handing: Option<(u64, TcpStream)>,
}

impl Peer {
    async fn serve(
        mut self,
        mut requests: mpsc::UnboundedReceiver<()>,
        mut connections: mpsc::UnboundedReceiver<TcpStream>,
        stopping: Stopping,
        report: impl Fn(Report),
    ) {
        let mut lines = Lines::default();
        let mut buf = vec![0u8; 8 * 1024];
        let mut asked = false;
        // Set once a disconnect was asked for: when to send it.
        let mut disconnect_at: Option<tokio::time::Instant> = None;
        // Set once it was sent: until when to wait; cleared when reported.
        let mut disconnecting: Option<tokio::time::Instant> = None;
        let later = || tokio::time::Instant::now() + Duration::from_secs(3600);
        loop {
            tokio::select! {
                readable = self.stream.readable() => {
                    if readable.is_err() {
                        break;
                    }
                    let n = match self.stream.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => break,
                    };
                    let (complete, dropped) = lines.push(&buf[..n]);
                    if dropped > 0 {
                        tracing::warn!(worker = self.worker, dropped, "dropped over-long IPC messages from a worker");
                    }
                    for line in complete {
                        if let Err(e) = self.handle(&line, &report).await {
                            tracing::debug!(worker = self.worker, error = %e, "cannot answer the worker");
                        }
                    }
                }
                Some(connection) = connections.recv() => {
                    if let Err(e) = self.send_connection(connection).await {
                        tracing::debug!(worker = self.worker, error = %e, "cannot hand a connection to the worker");
                    }
                }
                Some(()) = requests.recv(), if !asked => {
                    asked = true;
                    // No new connections for it, whatever its server does.
                    self.set_shared(None);
                    let pause = stopping.drain_pause;
                    let drained = pause.is_zero() || self.write(&protocol::drain(), None).await.is_ok();
                    disconnect_at = Some(tokio::time::Instant::now() + if drained { pause } else { Duration::ZERO });
                }
                _ = tokio::time::sleep_until(disconnect_at.unwrap_or_else(later)), if disconnect_at.is_some() => {
                    disconnect_at = None;
                    self.seq += 1;
                    if self.write(&protocol::disconnect(self.seq), None).await.is_ok() {
                        disconnecting = Some(tokio::time::Instant::now() + stopping.disconnect_wait);
                    } else {
                        report(Report::Disconnected);
                    }
                }
                _ = tokio::time::sleep_until(disconnecting.unwrap_or_else(later)), if disconnecting.is_some() => {
                    tracing::info!(
                        worker = self.worker,
                        wait = ?stopping.disconnect_wait,
                        "worker did not disconnect in time"
                    );
                    disconnecting = None;
                    report(Report::Disconnected);
                }
            }
        }
        // The worker closed the channel (disconnected, or exited): what it
        // did not take goes to the others.
        self.set_shared(None);
        connections.close();
        let untaken = self.handing.take().map(|(_, c)| c).into_iter();
        for connection in untaken.chain(std::iter::from_fn(|| connections.try_recv().ok())) {
            self.sockets.dispatch.resubmit(connection);
        }
        if disconnecting.is_some() || disconnect_at.is_some() {
            report(Report::Disconnected);
        }
    }

    async fn handle(&mut self, line: &[u8], report: &impl Fn(Report)) -> io::Result<()> {
        let message = match protocol::parse(line) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(worker = self.worker, error = %e, "ignoring an IPC message");
                return Ok(());
            }
        };
        self.seq += 1;
        match message {
            FromWorker::QueryServer { seq, listen } if self.is_shared_port(&listen) => {
                let key = listen.key();
                self.write(&protocol::round_robin_reply(seq, self.seq, &key, self.sockets.port), None).await?;
                self.set_shared(Some(key));
                self.sockets.dispatch.offer(self.handoff.clone());
                Ok(())
            }
            FromWorker::QueryServer { seq, listen } => match self.sockets.socket_for(self.worker, &listen) {
                Ok(socket) => {
                    let reply = protocol::handle_reply(seq, self.seq, &listen.key());
                    self.write(&reply, Some(socket.as_raw_fd())).await
                }
                Err(errno) => self.write(&protocol::error_reply(seq, self.seq, errno), None).await,
            },
            FromWorker::Listening { listen } => {
                if self.is_shared_port(&listen) {
                    report(Report::Listening);
                }
                Ok(())
            }
            FromWorker::Accepted { ack, accepted } => {
                if let Some((_, connection)) = self.handing.take_if(|(seq, _)| *seq == ack) {
                    // Taken: the worker has its own descriptor; ours closes.
                    if !accepted {
                        self.sockets.dispatch.resubmit(connection);
                    }
                    if self.shared_key.is_some() {
                        self.sockets.dispatch.offer(self.handoff.clone());
                    }
                }
                Ok(())
            }
            FromWorker::Close { key } => {
                if self.shared_key.as_ref() == Some(&key) {
                    // Its server closed (disconnect, or server.close()): no more connections.
                    self.set_shared(None);
                }
                Ok(())
            }
            FromWorker::ExitedAfterDisconnect { seq } => self.write(&protocol::ack(seq, self.seq), None).await,
            FromWorker::HandleNack => {
                // libuv only NACKs a descriptor it lost, which a local
                // socketpair does not lose. Say so if it happens.
                tracing::warn!(worker = self.worker, "the worker could not receive a socket");
                Ok(())
            }
            FromWorker::Online | FromWorker::HandleAck | FromWorker::Other => Ok(()),
        }
    }

    /// Records whether the worker's server listens on `--port`.
    fn set_shared(&mut self, key: Option<String>) {
        match (self.shared_key.is_some(), key.is_some()) {
            (false, true) => self.sockets.dispatch.listener_joined(),
            (true, false) => self.sockets.dispatch.listener_left(),
            _ => {}
        }
        self.shared_key = key;
    }

    fn is_shared_port(&self, listen: &Listen) -> bool {
        listen.fd.is_none() && listen.tcp_port() == Some(self.sockets.port)
    }

    /// Sends one connection to the worker, unless its server is closed.
    async fn send_connection(&mut self, connection: TcpStream) -> io::Result<()> {
        let Some(key) = self.shared_key.clone() else {
            self.sockets.dispatch.resubmit(connection);
            return Ok(());
        };
        self.seq += 1;
        let sent = self.write(&protocol::new_connection(self.seq, &key), Some(connection.as_raw_fd())).await;
        match sent {
            Ok(()) => self.handing = Some((self.seq, connection)),
            Err(_) => self.sockets.dispatch.resubmit(connection),
        }
        sent
    }

    /// Writes one message, with a descriptor in SCM_RIGHTS if given.
    async fn write(&mut self, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        let Some(fd) = fd else {
            return self.stream.write_all(bytes).await;
        };
        let raw = self.stream.as_raw_fd();
        let sent = loop {
            self.stream.writable().await?;
            let fds = [fd];
            let result = self.stream.try_io(Interest::WRITABLE, || {
                let rights = [ControlMessage::ScmRights(&fds)];
                sendmsg::<()>(raw, &[IoSlice::new(bytes)], &rights, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match result {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        // The descriptor went with the first byte; the rest is plain data.
        self.stream.write_all(&bytes[sent..]).await
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A dispatcher on a loopback port, holding at most `max_held`.
    async fn dispatch(max_held: usize, hold: Duration) -> (Arc<Dispatch>, u16, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let dispatch = Arc::new(Dispatch::new(max_held, hold));
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&dispatch).serve(listener, stop.clone()));
        (dispatch, port, stop)
    }

    /// Connects and reads until the peer closes: whether it did before `within`.
    async fn closed_within(port: u16, within: Duration) -> bool {
        tokio::task::spawn_blocking(move || {
            let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            client.set_read_timeout(Some(within)).expect("timeout");
            let mut byte = [0u8; 1];
            // EOF or a reset: closed. A timeout: still held.
            !matches!(client.read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        })
        .await
        .expect("client")
    }

    #[test]
    fn the_drain_pause_is_a_second_or_a_quarter_of_a_short_drain_timeout() {
        let stopping = Stopping::new(Duration::from_secs(25), true);
        assert_eq!(
            (stopping.drain_pause, stopping.disconnect_wait),
            (Duration::from_secs(1), Duration::from_millis(12_500))
        );
        assert_eq!(Stopping::new(Duration::from_secs(2), true).drain_pause, Duration::from_millis(500));
        assert_eq!(Stopping::new(Duration::from_secs(25), false).drain_pause, Duration::ZERO, "no preload, no pause");
    }

    #[tokio::test]
    async fn with_no_worker_listening_connections_are_closed_after_the_hold() {
        let (dispatch, port, stop) = dispatch(2, Duration::from_millis(200)).await;
        // More than may be held at once: each is still closed, none waits forever.
        let clients: Vec<_> = (0..5).map(|_| tokio::spawn(closed_within(port, Duration::from_secs(20)))).collect();
        for client in clients {
            assert!(client.await.expect("client"), "closed");
        }
        // Only the permit of the next accept is taken.
        assert!(dispatch.held.available_permits() >= 1, "nothing left held");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_listening_worker_that_is_busy_keeps_its_connections_waiting() {
        let (dispatch, port, stop) = dispatch(4, Duration::from_millis(100)).await;
        // A worker listens but has not acknowledged its last connection.
        dispatch.listener_joined();
        assert!(!closed_within(port, Duration::from_millis(600)).await, "held past the hold");
        // It becomes free: the next connection goes to it.
        let (worker, mut connections) = mpsc::unbounded_channel();
        dispatch.offer(worker);
        let client = tokio::task::spawn_blocking(move || TcpStream::connect(("127.0.0.1", port)).expect("connect"));
        let handed = tokio::time::timeout(Duration::from_secs(10), connections.recv()).await;
        assert!(matches!(handed, Ok(Some(_))), "handed to the worker");
        drop(client.await);
        stop.cancel();
    }
}
