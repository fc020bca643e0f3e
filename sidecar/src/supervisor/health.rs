//! Probing a worker's private port, and reading its memory use.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::HealthCheck;

/// True if the worker answered within `timeout`: HTTP 2xx/3xx (like a
/// Kubernetes httpGet probe), or an accepted TCP connection.
pub async fn probe(kind: HealthCheck, addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        if kind != HealthCheck::Http {
            return Some(true);
        }
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: clusterd-probe\r\nConnection: close\r\n\r\n"
        );
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
    match kind {
        HealthCheck::None => true,
        _ => tokio::time::timeout(timeout, attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false),
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    rest.get(2..5)?.parse().ok()
}

/// Resident set size of `pid` in MiB, from /proc/<pid>/status.
pub fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss_kib(&status).map(|kib| kib / 1024)
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
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

    #[test]
    fn vm_rss() {
        let status = "Name:\tnode\nVmPeak:\t  1000 kB\nVmRSS:\t   52428 kB\nThreads:\t7\n";
        assert_eq!(parse_vm_rss_kib(status), Some(52428));
        assert_eq!(parse_vm_rss_kib("Name:\tzombie\n"), None);
    }
}
