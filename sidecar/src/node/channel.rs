//! One Node worker's IPC channel, clusterd's end: hands the worker the
//! listening socket its `listen()` asks for, tells the supervisor when it
//! listens on the shared port, and asks it to disconnect before it stops.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{Notify, mpsc};
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

/// Connections accepted on `--port`, handed to the workers in turn (Node's
/// default round-robin scheduling). A worker is offered the next connection
/// only once it has acknowledged the last, so one whose event loop is
/// blocked gets none; a shared accept queue instead lets the first worker
/// to wake take a whole burst (libuv accepts until the queue is empty).
#[derive(Default)]
pub struct Dispatch {
    /// Workers ready for a connection, the longest-waiting first.
    free: Mutex<VecDeque<Handoff>>,
    offered: Notify,
}

impl Dispatch {
    fn offer(&self, worker: Handoff) {
        lock(&self.free).push_back(worker);
        self.offered.notify_one();
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            match accepted.and_then(|(stream, _)| stream.into_std()) {
                Ok(stream) => {
                    tokio::select! {
                        _ = self.hand_off(stream) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "cannot accept on the shared port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Gives `stream` to the next free worker, waiting for one if need be.
    async fn hand_off(&self, mut stream: TcpStream) {
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
                None => offered.await,
            }
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
    /// Asks the worker to stop accepting and finish its connections
    /// (Node's `worker.disconnect()`); [`Report::Disconnected`] follows.
    pub fn disconnect(&self) {
        let _ = self.disconnect.send(());
    }
}

/// Serves clusterd's end of a worker's channel until the worker closes it.
pub fn start(
    stream: std::os::unix::net::UnixStream,
    worker: u32,
    sockets: Arc<Sockets>,
    disconnect_wait: Duration,
    report: impl Fn(Report) + Send + Sync + 'static,
) -> io::Result<Channel> {
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    let (disconnect, requests) = mpsc::unbounded_channel();
    let (handoff, connections) = mpsc::unbounded_channel();
    let peer = Peer { stream, worker, sockets, seq: 0, handoff, shared_key: None, handing: None };
    tokio::spawn(peer.serve(requests, connections, disconnect_wait, report));
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
        disconnect_wait: Duration,
        report: impl Fn(Report),
    ) {
        let mut lines = Lines::default();
        let mut buf = vec![0u8; 8 * 1024];
        // Set once a disconnect was asked for; cleared when reported.
        let mut disconnecting: Option<tokio::time::Instant> = None;
        let mut asked = false;
        loop {
            let deadline = disconnecting.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
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
                    self.seq += 1;
                    if self.write(&protocol::disconnect(self.seq), None).await.is_ok() {
                        disconnecting = Some(tokio::time::Instant::now() + disconnect_wait);
                    } else {
                        report(Report::Disconnected);
                    }
                }
                _ = tokio::time::sleep_until(deadline), if disconnecting.is_some() => {
                    tracing::info!(worker = self.worker, wait = ?disconnect_wait, "worker did not disconnect in time");
                    disconnecting = None;
                    report(Report::Disconnected);
                }
            }
        }
        // The worker closed the channel (disconnected, or exited): what it
        // did not take goes to the others.
        connections.close();
        let untaken = self.handing.take().map(|(_, c)| c).into_iter();
        for connection in untaken.chain(std::iter::from_fn(|| connections.try_recv().ok())) {
            self.sockets.dispatch.resubmit(connection);
        }
        if disconnecting.is_some() {
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
                self.shared_key = Some(key);
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
                    self.shared_key = None;
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
