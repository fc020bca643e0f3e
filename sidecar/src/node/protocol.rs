//! The wire format of Node's cluster IPC, as far as a primary needs it.
//!
//! One JSON document per line (Node's default `json` serialization). A
//! message that carries a handle is wrapped as `{"cmd":"NODE_HANDLE",
//! "type":"net.Native","msg":…}` and sent with the descriptor in
//! SCM_RIGHTS; the worker answers `NODE_HANDLE_ACK`. Cluster messages have
//! `cmd: "NODE_CLUSTER"`, an `act` and a `seq`; a reply names the request's
//! `seq` in `ack` (Node's `lib/internal/cluster/{child,primary,utils}.js`).

use serde_json::{Value, json};

/// Longest line accepted from a worker; longer ones are dropped whole.
pub const MAX_LINE: usize = 64 * 1024;

/// What a worker asks to listen on (the arguments of its `listen()`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listen {
    pub address: Option<String>,
    pub port: i64,
    /// Node's `addressType`: `4`, `6`, `-1` (a pipe path) or `udp4`/`udp6`.
    pub address_type: String,
    /// `listen({fd})`: a descriptor of the worker's own.
    pub fd: Option<i64>,
}

impl Listen {
    /// The handle's key, which the worker quotes when it closes it.
    pub fn key(&self) -> String {
        let address = self.address.as_deref().unwrap_or("");
        let fd = self.fd.map(|fd| fd.to_string()).unwrap_or_default();
        format!("{address}:{}:{}:{fd}", self.port, self.address_type)
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.address_type.as_str(), "4" | "6")
    }

    /// The TCP port, when it is one.
    pub fn tcp_port(&self) -> Option<u16> {
        self.is_tcp().then(|| u16::try_from(self.port).ok()).flatten()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker {
    Online,
    QueryServer {
        seq: u64,
        listen: Listen,
    },
    Listening {
        listen: Listen,
    },
    Close {
        key: String,
    },
    /// `worker.disconnect()` from inside: wants an ack.
    ExitedAfterDisconnect {
        seq: u64,
    },
    HandleAck,
    HandleNack,
    /// The answer to a `newconn`: whether the worker took the connection.
    Accepted {
        ack: u64,
        accepted: bool,
    },
    /// The app's own `process.send()` messages and anything unknown.
    Other,
}

/// Reads one line from a worker.
pub fn parse(line: &[u8]) -> Result<FromWorker, String> {
    let message: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let seq = || message.get("seq").and_then(Value::as_u64).ok_or("no seq");
    Ok(match (str_field(&message, "cmd"), str_field(&message, "act")) {
        (Some("NODE_HANDLE_ACK"), _) => FromWorker::HandleAck,
        (Some("NODE_HANDLE_NACK"), _) => FromWorker::HandleNack,
        (Some("NODE_CLUSTER"), Some("online")) => FromWorker::Online,
        (Some("NODE_CLUSTER"), Some("queryServer")) => {
            FromWorker::QueryServer { seq: seq()?, listen: listen(&message) }
        }
        (Some("NODE_CLUSTER"), Some("listening")) => FromWorker::Listening { listen: listen(&message) },
        (Some("NODE_CLUSTER"), Some("close")) => {
            FromWorker::Close { key: str_field(&message, "key").unwrap_or_default().to_string() }
        }
        (Some("NODE_CLUSTER"), Some("exitedAfterDisconnect")) => FromWorker::ExitedAfterDisconnect { seq: seq()? },
        (Some("NODE_CLUSTER"), None) if message.get("accepted").is_some() => FromWorker::Accepted {
            ack: message.get("ack").and_then(Value::as_u64).ok_or("no ack")?,
            accepted: message.get("accepted").and_then(Value::as_bool).unwrap_or(false),
        },
        _ => FromWorker::Other,
    })
}

fn str_field<'a>(message: &'a Value, name: &str) -> Option<&'a str> {
    message.get(name).and_then(Value::as_str)
}

fn listen(message: &Value) -> Listen {
    let address_type = match message.get("addressType") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "4".to_string(),
    };
    Listen {
        address: str_field(message, "address").map(str::to_string),
        port: message.get("port").and_then(Value::as_i64).unwrap_or(0),
        address_type,
        fd: message.get("fd").and_then(Value::as_i64),
    }
}

fn line(message: Value) -> Vec<u8> {
    let mut bytes = message.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// The answer to `queryServer` that goes with the listening socket.
pub fn handle_reply(ack: u64, seq: u64, key: &str) -> Vec<u8> {
    let reply = json!({"cmd": "NODE_CLUSTER", "errno": 0, "key": key, "ack": ack, "data": null, "seq": seq});
    line(json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": reply}))
}

/// The answer to `queryServer` for a port clusterd accepts on itself and
/// hands out connection by connection (Node's round-robin scheduling): the
/// worker's server gets a stand-in handle whose address is `sockname`.
pub fn round_robin_reply(ack: u64, seq: u64, key: &str, port: u16) -> Vec<u8> {
    let sockname = json!({"address": "0.0.0.0", "family": "IPv4", "port": port});
    line(
        json!({"cmd": "NODE_CLUSTER", "errno": 0, "key": key, "ack": ack, "data": null, "sockname": sockname, "seq": seq}),
    )
}

/// One accepted connection for the worker's server `key`, sent with the
/// connection's descriptor; the worker answers with `accepted`.
pub fn new_connection(seq: u64, key: &str) -> Vec<u8> {
    let message = json!({"cmd": "NODE_CLUSTER", "act": "newconn", "key": key, "seq": seq});
    line(json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": message}))
}

/// The answer to `queryServer` when there is no socket: the worker's
/// `listen()` fails with this (negative) libuv error number.
pub fn error_reply(ack: u64, seq: u64, errno: i32) -> Vec<u8> {
    line(json!({"cmd": "NODE_CLUSTER", "errno": errno, "ack": ack, "data": null, "seq": seq}))
}

pub fn ack(ack: u64, seq: u64) -> Vec<u8> {
    line(json!({"cmd": "NODE_CLUSTER", "ack": ack, "seq": seq}))
}

/// Node's `worker.disconnect()`: the worker closes its servers, lets its
/// open connections finish, then closes the channel.
pub fn disconnect(seq: u64) -> Vec<u8> {
    line(json!({"cmd": "NODE_CLUSTER", "act": "disconnect", "seq": seq}))
}

/// clusterd's own message, before a disconnect: the drain preload
/// (`drain.js`) makes the worker's responses close their connections. A
/// `NODE_` command reaches only internal listeners, never the app's
/// `process.on('message')`, and Node's cluster code ignores it.
pub fn drain() -> Vec<u8> {
    line(json!({"cmd": DRAIN}))
}

/// The drain message's command (drain.js listens for it).
pub const DRAIN: &str = "NODE_CLUSTERD_DRAIN";

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes; a longer
/// line is dropped up to its newline, so memory stays bounded.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
    discarding: bool,
}

impl Lines {
    /// Feeds bytes; returns the complete lines and how many were dropped.
    pub fn push(&mut self, mut bytes: &[u8]) -> (Vec<Vec<u8>>, usize) {
        let (mut lines, mut dropped) = (Vec::new(), 0);
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if std::mem::take(&mut self.discarding) {
                dropped += 1;
            } else {
                self.partial.extend_from_slice(&bytes[..end]);
                lines.push(std::mem::take(&mut self.partial));
            }
            bytes = &bytes[end + 1..];
        }
        if !self.discarding {
            self.partial.extend_from_slice(bytes);
            if self.partial.len() > MAX_LINE {
                self.partial = Vec::new();
                self.discarding = true;
            }
        }
        (lines, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_node_18_to_24_parse() {
        // As Node 22 sends them (18 and 20 have no `flags`).
        let query = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":8080,"addressType":4,"flags":0,"backlog":0,"seq":1}"#;
        let listen = Listen { address: None, port: 8080, address_type: "4".into(), fd: None };
        assert_eq!(parse(query), Ok(FromWorker::QueryServer { seq: 1, listen: listen.clone() }));
        assert_eq!(listen.tcp_port(), Some(8080));
        let listening = br#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"data":null,"address":null,"port":8080,"addressType":4,"backlog":0,"seq":2}"#;
        assert_eq!(parse(listening), Ok(FromWorker::Listening { listen }));
        assert_eq!(parse(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#), Ok(FromWorker::Online));
        assert_eq!(parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#), Ok(FromWorker::HandleAck));
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"close","key":"k","seq":3}"#),
            Ok(FromWorker::Close { key: "k".into() })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":4}"#),
            Ok(FromWorker::ExitedAfterDisconnect { seq: 4 })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"seq":6}"#),
            Ok(FromWorker::Accepted { ack: 5, accepted: true })
        );
        assert_eq!(parse(br#""ready""#), Ok(FromWorker::Other), "PM2-style process.send('ready')");
        assert!(parse(b"{not json").is_err());
        assert!(parse(br#"{"cmd":"NODE_CLUSTER","act":"queryServer"}"#).is_err(), "a query needs its seq");
    }

    #[test]
    fn pipes_and_udp_are_not_tcp() {
        let pipe =
            br#"{"cmd":"NODE_CLUSTER","act":"queryServer","address":"/tmp/s.sock","port":-1,"addressType":-1,"seq":1}"#;
        let FromWorker::QueryServer { listen, .. } = parse(pipe).expect("parses") else { panic!() };
        assert_eq!(listen.tcp_port(), None);
        let udp =
            br#"{"cmd":"NODE_CLUSTER","act":"queryServer","address":"0.0.0.0","port":53,"addressType":"udp4","seq":1}"#;
        let FromWorker::QueryServer { listen, .. } = parse(udp).expect("parses") else { panic!() };
        assert!(!listen.is_tcp());
    }

    #[test]
    fn replies_are_single_json_lines() {
        let reply = handle_reply(1, 7, "k");
        assert_eq!(reply.last(), Some(&b'\n'));
        let value: Value = serde_json::from_slice(&reply).expect("json");
        assert_eq!(value["cmd"], "NODE_HANDLE");
        assert_eq!(value["type"], "net.Native");
        assert_eq!(value["msg"]["cmd"], "NODE_CLUSTER");
        assert_eq!((value["msg"]["ack"].as_u64(), value["msg"]["errno"].as_i64()), (Some(1), Some(0)));
        let error: Value = serde_json::from_slice(&error_reply(2, 8, -95)).expect("json");
        assert_eq!((error["ack"].as_u64(), error["errno"].as_i64()), (Some(2), Some(-95)));
        assert!(error.get("key").is_none(), "no key: the worker's listen() fails");
        let rr: Value = serde_json::from_slice(&round_robin_reply(3, 10, "k", 8080)).expect("json");
        assert_eq!((rr["ack"].as_u64(), rr["sockname"]["port"].as_u64()), (Some(3), Some(8080)));
        let conn: Value = serde_json::from_slice(&new_connection(11, "k")).expect("json");
        assert_eq!((conn["cmd"].as_str(), conn["msg"]["act"].as_str()), (Some("NODE_HANDLE"), Some("newconn")));
        let disconnect: Value = serde_json::from_slice(&disconnect(9)).expect("json");
        assert_eq!(disconnect["act"], "disconnect");
        let drain: Value = serde_json::from_slice(&drain()).expect("json");
        assert_eq!(drain["cmd"], DRAIN);
        assert!(crate::node::preload::SOURCE.contains(DRAIN), "drain.js listens for it");
    }

    #[test]
    fn lines_split_and_overlong_ones_are_dropped_whole() {
        let mut lines = Lines::default();
        assert_eq!(lines.push(b"{\"a\":1}\n{\"b\""), (vec![b"{\"a\":1}".to_vec()], 0));
        assert_eq!(lines.push(b":2}\n"), (vec![b"{\"b\":2}".to_vec()], 0));
        let huge = vec![b'x'; MAX_LINE + 10];
        assert_eq!(lines.push(&huge), (vec![], 0));
        assert_eq!(lines.push(&huge), (vec![], 0), "still dropping, memory bounded");
        assert!(lines.partial.is_empty());
        assert_eq!(lines.push(b"tail\n{\"c\":3}\n"), (vec![b"{\"c\":3}".to_vec()], 1));
    }
}
