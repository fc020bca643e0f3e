//! Probing a worker's private port, and reading its memory use.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::{Config, HealthCheck, UpstreamProtocol};

/// How workers are probed (proxy mode).
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub kind: HealthCheck,
    pub path: String,
    pub timeout: Duration,
    /// The workers speak HTTP/2 only (`--upstream-protocol h2c`): the HTTP
    /// probe does too.
    pub http2: bool,
}

impl ProbeSpec {
    pub fn new(config: &Config) -> ProbeSpec {
        ProbeSpec {
            kind: config.health_check,
            path: config.health_path.clone(),
            timeout: config.health_timeout,
            http2: config.upstream_protocol == UpstreamProtocol::H2c,
        }
    }
}

/// True if the worker answered within the timeout: HTTP 2xx/3xx (like a
/// Kubernetes httpGet probe), or an accepted TCP connection. Over h2c, an
/// HTTP/2 answer below 500: gRPC servers answer a plain GET with 415 or a
/// gRPC error, which still shows their HTTP/2 stack serving, while a 5xx
/// is an app saying it cannot serve.
pub async fn probe(spec: &ProbeSpec, addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        if spec.kind != HealthCheck::Http {
            return Some(true);
        }
        if spec.http2 {
            return probe_h2c(stream, addr, &spec.path).await;
        }
        let path = &spec.path;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: clusterd-probe\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut len = 0;
        // The status code is within the first 12 bytes: "HTTP/1.1 200".
        while len < 12 {
            let n = stream.read(&mut buf[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Some(parse_status(&buf[..len]).is_some_and(|code| (200..400).contains(&code)))
    };
    match spec.kind {
        HealthCheck::None => true,
        _ => tokio::time::timeout(spec.timeout, attempt).await.ok().flatten().unwrap_or(false),
    }
}

/// `GET path` over HTTP/2 with prior knowledge (hyper's client); the
/// connection is driven here and dropped with the probe (no task is left).
async fn probe_h2c(stream: TcpStream, addr: SocketAddr, path: &str) -> Option<bool> {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.ok()?;
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::USER_AGENT, "clusterd-probe")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    tokio::select! {
        response = sender.send_request(request) => Some(response.ok()?.status().as_u16() < 500),
        _ = conn => None,
    }
}

/// Spacing of a starting worker's probes: a refused loopback connection
/// costs microseconds, and the worker joins the rotation this soon after it
/// listens.
const STARTING_RETRY: Duration = Duration::from_millis(20);

/// Probes a starting worker again and again until it answers healthy or
/// `window` has passed.
pub async fn probe_starting(spec: &ProbeSpec, addr: SocketAddr, window: Duration) -> bool {
    let deadline = Instant::now() + window;
    loop {
        if probe(spec, addr).await {
            return true;
        }
        if Instant::now() + STARTING_RETRY >= deadline {
            return false;
        }
        tokio::time::sleep(STARTING_RETRY).await;
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    rest.get(2..5)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(b"HTTP/1.1"), None);
    }
}

/// True if process `pid` holds a TCP socket listening on `port`: its socket
/// inodes (from /proc/<pid>/fd) against the LISTEN entries of
/// /proc/<pid>/net/tcp{,6}. In reuseport mode this tells, per worker,
/// whether it has bound the shared port yet.
pub fn listens_on(pid: u32, port: u16) -> bool {
    any_listens_on(&[pid], port)
}

/// True if one of `pids` holds a TCP socket listening on `port` (the first
/// one's network namespace is the one looked at).
pub fn any_listens_on(pids: &[u32], port: u16) -> bool {
    let Some(first) = pids.first() else {
        return false;
    };
    let listening: Vec<u64> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{first}/net/{table}")).ok())
        .flat_map(|content| listening_sockets(&content, port).map(|s| s.inode).collect::<Vec<_>>())
        .collect();
    if listening.is_empty() {
        return false;
    }
    pids.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| socket_inode(target.to_str()?))
                .any(|inode| listening.contains(&inode))
        })
    })
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// A socket in LISTEN state, from a /proc/net/tcp{,6} table.
#[derive(Debug, PartialEq, Eq)]
pub struct ListeningSocket {
    /// The local address; `None` in a tcp6 table.
    pub address: Option<Ipv4Addr>,
    pub inode: u64,
}

/// The sockets in LISTEN state (`0A`) on `port` in a /proc/net/tcp table.
pub fn listening_sockets(table: &str, port: u16) -> impl Iterator<Item = ListeningSocket> + '_ {
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local_address, local_port) = fields.get(1)?.rsplit_once(':')?;
        let listening = *fields.get(3)? == "0A";
        let matches = u16::from_str_radix(local_port, 16).ok()? == port;
        if !(listening && matches) {
            return None;
        }
        // The kernel prints an IPv4 address's bytes as one native-endian u32.
        let address = u32::from_str_radix(local_address, 16).ok().map(|raw| Ipv4Addr::from(raw.to_ne_bytes()));
        Some(ListeningSocket { address, inode: fields.get(9)?.parse().ok()? })
    })
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    #[test]
    fn listening_sockets_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   \
            1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        let unspecified = ListeningSocket { address: Some(Ipv4Addr::UNSPECIFIED), inode: 4242 };
        assert_eq!(listening_sockets(table, 8080).collect::<Vec<_>>(), vec![unspecified]);
        assert_eq!(listening_sockets(table, 8081).count(), 0);
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn this_process_listening_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(listens_on(std::process::id(), port));
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }
}
