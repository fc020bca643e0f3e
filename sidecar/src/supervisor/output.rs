//! Workers' stdout/stderr, labelled with the worker id.

use std::io::Write;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;

use crate::config::LogFormat;

#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Copies a worker pipe line by line until the worker closes it.
pub fn forward(fd: impl Into<OwnedFd>, worker: u32, stream: Stream, format: LogFormat) {
    let receiver = match pipe::Receiver::from_owned_fd(fd.into()) {
        Ok(receiver) => receiver,
        Err(e) => {
            tracing::warn!(worker, error = %e, "cannot read worker output");
            return;
        }
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(receiver).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => emit(&line, worker, stream, format),
                Ok(None) => break,
                Err(e) => {
                    // Not UTF-8 or a read error: skip the rest rather than spin.
                    tracing::debug!(worker, error = %e, "worker output ended");
                    break;
                }
            }
        }
    });
}

fn emit(line: &str, worker: u32, stream: Stream, format: LogFormat) {
    match format {
        // Plain text is passed through with a prefix: cheap, and the app's
        // own log format stays readable.
        LogFormat::Text => {
            let _ = match stream {
                Stream::Stdout => writeln!(std::io::stdout().lock(), "[worker {worker}] {line}"),
                Stream::Stderr => writeln!(std::io::stderr().lock(), "[worker {worker}] {line}"),
            };
        }
        LogFormat::Json => {
            tracing::info!(target: "clusterd::worker", worker, stream = stream.as_str(), "{line}");
        }
    }
}
