//! Request-smuggling shapes at the proxy. Each raw request goes to clusterd
//! (proxy mode, a node:http worker that echoes what it received) and to a
//! bare hyper server, the parser the proxy is built on. The proxy must
//! refuse what hyper refuses, and what it forwards must be one request the
//! worker reads as hyper did: the body hyper decoded, framed one way only.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What happened to a raw request.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Answered 2xx; the echo of what the server (the worker) received.
    Accepted(serde_json::Value),
    /// Answered 4xx, or the connection closed without an answer.
    Refused(String),
}

/// A hyper HTTP/1 server on its own runtime that echoes, as the worker
/// does, the headers and body it parsed.
fn bare_hyper() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let headers: Vec<String> = req
                            .headers()
                            .iter()
                            .flat_map(|(k, v)| [k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()])
                            .collect();
                        let body = req.into_body().collect().await?.to_bytes();
                        let echo = serde_json::json!({
                            "rawHeaders": headers,
                            "body": body.iter().map(|&b| char::from(b)).collect::<String>(),
                        });
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(echo.to_string()))))
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
    });
    port
}

fn send(port: u16, raw: &[u8]) -> Outcome {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(raw).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    match status {
        200..=299 => {
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
            // Chunked or not, the echo is one JSON object.
            let json = body.find('{').and_then(|i| body.rfind('}').map(|j| &body[i..=j])).unwrap_or_default();
            Outcome::Accepted(serde_json::from_str(json).unwrap_or(serde_json::Value::Null))
        }
        0 => Outcome::Refused(format!("closed: {text:?}")),
        _ => Outcome::Refused(text.lines().next().unwrap_or_default().to_string()),
    }
}

/// The header values the server saw under `name` (any case).
fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    let raw: Vec<String> = serde_json::from_value(echo["rawHeaders"].clone()).unwrap_or_default();
    raw.chunks(2).filter(|kv| kv[0].eq_ignore_ascii_case(name)).map(|kv| kv[1].clone()).collect()
}

#[test]
fn smuggling_shapes_are_refused_or_normalised_as_hyper_does() {
    let clusterd = Launch::new(&["--port-mode", "proxy", "--workers", "1"], &["node", &test_app("echo.js")]).start();
    clusterd.wait_ready(1);
    let hyper = bare_hyper();
    let port = clusterd.port;

    let cases: [(&str, String); 6] = [
        ("conflicting Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!".into()),
        ("repeated equal Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".into()),
        (
            "Transfer-Encoding with Content-Length",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("Transfer-Encoding not chunked last", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        ("obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\nConnection: close\r\n\r\n".into()),
        ("bare LF in the head", "GET / HTTP/1.1\nHost: a\nX-Lf: yes\nConnection: close\n\n".into()),
    ];
    let mut report = Vec::new();
    for (shape, raw) in &cases {
        let by_hyper = send(hyper, raw.as_bytes());
        let by_clusterd = send(port, raw.as_bytes());
        report.push(format!("{shape}: hyper {by_hyper:?}\n    clusterd {by_clusterd:?}"));
        match (&by_hyper, &by_clusterd) {
            (Outcome::Refused(_), Outcome::Refused(_)) => {}
            (Outcome::Accepted(h), Outcome::Accepted(w)) => {
                assert_eq!(w["body"], h["body"], "{shape}: the worker read another body than hyper");
                let (lengths, encodings) = (seen(w, "content-length"), seen(w, "transfer-encoding"));
                assert!(lengths.len() <= 1, "{shape}: the worker saw Content-Length {lengths:?}");
                assert!(
                    lengths.is_empty() || encodings.is_empty(),
                    "{shape}: the worker saw both Content-Length {lengths:?} and Transfer-Encoding {encodings:?}"
                );
            }
            _ => panic!("{shape}: hyper {by_hyper:?}, clusterd {by_clusterd:?}"),
        }
    }
    eprintln!("{}", report.join("\n"));
}
