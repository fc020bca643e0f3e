//! Workers' stdout/stderr, labelled with the worker id.
//!
//! Output is bytes: whatever a worker writes is passed on (decoded lossily
//! only for the JSON log format), and its pipe is read for as long as the
//! worker keeps it open, whatever it contains. Lines longer than
//! [`MAX_LINE`] are cut into pieces; each piece after the first is labelled
//! `[worker N+]` (text) or `continued: true` (JSON).

use std::io::Write;
use std::os::fd::OwnedFd;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::config::LogFormat;
use crate::logging::{self, Room, Stream};

/// The longest piece of output passed on as one line.
pub const MAX_LINE: usize = 16 * 1024;
/// Bytes read from a worker's pipe at once: its lines are queued together.
const READ_CHUNK: usize = 64 * 1024;

/// Copies a worker pipe line by line until the worker closes it. While
/// clusterd's output queue is full the pipe is not read (backpressure, see
/// [`crate::logging`]).
pub fn forward(fd: impl Into<OwnedFd>, worker: u32, stream: Stream, format: LogFormat) {
    let mut receiver = match pipe::Receiver::from_owned_fd(fd.into()) {
        Ok(receiver) => receiver,
        Err(e) => {
            tracing::warn!(worker, error = %e, "cannot read worker output");
            return;
        }
    };
    tokio::spawn(async move {
        let mut lines = Splitter::default();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut out = Vec::with_capacity(READ_CHUNK + 1024);
        loop {
            let n = match receiver.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(worker, stream = stream.as_str(), error = %e, "reading worker output failed");
                    break;
                }
            };
            pass_on(format, worker, stream, &mut out, |emit| lines.feed(&buf[..n], emit), n).await;
        }
        pass_on(format, worker, stream, &mut out, |emit| lines.finish(emit), MAX_LINE).await;
    });
}

/// Passes on the lines `split` yields: in the text format as one write of
/// whole, labelled lines; in the JSON format as log events, once there is
/// room for about `len` bytes of them.
async fn pass_on(
    format: LogFormat,
    worker: u32,
    stream: Stream,
    out: &mut Vec<u8>,
    split: impl FnOnce(&mut dyn FnMut(&[u8], bool)),
    len: usize,
) {
    match format {
        // Passed through with a label: cheap, and the app's own log format
        // (and encoding) stays as it was.
        LogFormat::Text => {
            out.clear();
            split(&mut |line, continued| {
                if continued {
                    write!(out, "[worker {worker}+] ").ok();
                } else {
                    write!(out, "[worker {worker}] ").ok();
                }
                out.extend_from_slice(line);
                out.push(b'\n');
            });
            if !out.is_empty() {
                logging::write(stream, out).await;
            }
            if out.capacity() > 4 * READ_CHUNK {
                *out = Vec::with_capacity(READ_CHUNK + 1024);
            }
        }
        LogFormat::Json => {
            // JSON escapes and the event's fields at most about double it.
            if logging::wait_room(2 * len + 512).await == Room::Stalled {
                let mut lines = 0;
                split(&mut |_, _| lines += 1);
                logging::count_dropped(lines);
                return;
            }
            split(&mut |line, continued| {
                let text = String::from_utf8_lossy(line);
                let stream = stream.as_str();
                if continued {
                    tracing::info!(target: logging::WORKER_TARGET, worker, stream, continued, "{text}");
                } else {
                    tracing::info!(target: logging::WORKER_TARGET, worker, stream, "{text}");
                }
            });
        }
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes, without
/// their newline. A longer line comes out in pieces, all but the first
/// marked as continuations. Holds at most `MAX_LINE` bytes.
#[derive(Debug, Default)]
struct Splitter {
    partial: Vec<u8>,
    continued: bool,
}

impl Splitter {
    /// Feeds `chunk`, calling `emit(piece, continued)` for each complete piece.
    fn feed(&mut self, mut chunk: &[u8], emit: &mut dyn FnMut(&[u8], bool)) {
        while !chunk.is_empty() {
            let room = MAX_LINE - self.partial.len();
            // One byte past the room may still be the newline that ends a
            // line of exactly MAX_LINE bytes.
            let window = &chunk[..chunk.len().min(room + 1)];
            if let Some(end) = window.iter().position(|&b| b == b'\n') {
                self.emit_with_partial(&chunk[..end], emit);
                self.continued = false;
                chunk = &chunk[end + 1..];
            } else if chunk.len() > room {
                self.emit_with_partial(&chunk[..room], emit);
                self.continued = true;
                chunk = &chunk[room..];
            } else {
                self.partial.extend_from_slice(chunk);
                return;
            }
        }
    }

    /// Passes on what is left when the stream ends without a newline.
    fn finish(&mut self, emit: &mut dyn FnMut(&[u8], bool)) {
        if !self.partial.is_empty() {
            emit(&self.partial, self.continued);
            self.partial.clear();
        }
    }

    fn emit_with_partial(&mut self, tail: &[u8], emit: &mut dyn FnMut(&[u8], bool)) {
        if self.partial.is_empty() {
            emit(tail, self.continued);
        } else {
            self.partial.extend_from_slice(tail);
            emit(&self.partial, self.continued);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` and returns every piece with its continuation flag.
    fn split(chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        let mut splitter = Splitter::default();
        let mut emit = |piece: &[u8], continued: bool| out.push((piece.to_vec(), continued));
        for chunk in chunks {
            splitter.feed(chunk, &mut emit);
            assert!(splitter.partial.len() <= MAX_LINE);
        }
        splitter.finish(&mut emit);
        out
    }

    #[test]
    fn lines_are_split_at_newlines_across_chunks() {
        let pieces = split(&[b"one\ntw", b"o\n\nthr", b"ee"]);
        let expected: Vec<(Vec<u8>, bool)> =
            vec![(b"one".to_vec(), false), (b"two".to_vec(), false), (vec![], false), (b"three".to_vec(), false)];
        assert_eq!(pieces, expected);
    }

    #[test]
    fn bytes_that_are_not_utf8_pass_unchanged() {
        let pieces = split(&[b"\xff\xfe ok \xc3\x28\n"]);
        assert_eq!(pieces, vec![(b"\xff\xfe ok \xc3\x28".to_vec(), false)]);
    }

    #[test]
    fn long_lines_are_cut_into_marked_pieces() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        // Whole, and in small chunks: the same pieces.
        for pieces in [split(&[&input]), split(&input.chunks(1000).collect::<Vec<_>>())] {
            let lens: Vec<(usize, bool)> = pieces.iter().map(|(p, c)| (p.len(), *c)).collect();
            assert_eq!(lens, vec![(MAX_LINE, false), (MAX_LINE, true), (10, true), (4, false)]);
        }
    }

    #[test]
    fn a_line_of_exactly_the_maximum_is_one_piece() {
        let mut input = vec![b'y'; MAX_LINE];
        input.push(b'\n');
        for chunks in [vec![&input[..]], vec![&input[..MAX_LINE], &input[MAX_LINE..]]] {
            let lens: Vec<(usize, bool)> = split(&chunks).iter().map(|(p, c)| (p.len(), *c)).collect();
            assert_eq!(lens, vec![(MAX_LINE, false)]);
        }
    }

    #[test]
    fn output_without_a_final_newline_is_passed_on_at_the_end() {
        assert_eq!(split(&[b"a\nrest"]), vec![(b"a".to_vec(), false), (b"rest".to_vec(), false)]);
    }
}
