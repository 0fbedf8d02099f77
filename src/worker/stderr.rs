//! Draining a worker's stderr: every line goes to `tracing` with the worker id and
//! into a bounded ring of recent lines used in error messages.
//!
//! The pipe is read continuously, whatever the worker writes, so a chatty worker can
//! never block on a full pipe. Lines longer than [`MAX_LINE_BYTES`] are cut.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// Longest line kept; the rest of a longer line is dropped.
pub const MAX_LINE_BYTES: usize = 4096;

/// The recent stderr lines of one worker, shared between the drain task and the worker.
#[derive(Clone, Debug)]
pub struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    capacity: usize,
    closed: watch::Receiver<bool>,
}

impl StderrTail {
    /// Starts draining `stream` on a task of its own; `worker` labels the log lines.
    pub fn drain<R>(stream: R, worker: String, capacity: usize) -> StderrTail
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (closed_tx, closed) = watch::channel(false);
        let tail = StderrTail {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity: capacity.max(1),
            closed,
        };
        let ring = tail.clone();
        tokio::spawn(async move {
            ring.read_lines(stream, &worker).await;
            let _ = closed_tx.send(true);
        });
        tail
    }

    async fn read_lines<R: AsyncRead + Unpin>(&self, mut stream: R, worker: &str) {
        let mut buf = BytesMut::with_capacity(8192);
        let mut line: Vec<u8> = Vec::new();
        let mut cut = false;
        loop {
            buf.clear();
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            for chunk in buf.split_inclusive(|b| *b == b'\n') {
                let (body, ends_line) = match chunk.split_last() {
                    Some((b'\n', body)) => (body, true),
                    _ => (chunk, false),
                };
                let room = MAX_LINE_BYTES.saturating_sub(line.len());
                if body.len() > room {
                    cut = true;
                }
                line.extend_from_slice(&body[..body.len().min(room)]);
                if ends_line {
                    self.push(worker, &line, cut);
                    line.clear();
                    cut = false;
                }
            }
        }
        if !line.is_empty() {
            self.push(worker, &line, cut);
        }
    }

    fn push(&self, worker: &str, raw: &[u8], cut: bool) {
        let mut text = String::from_utf8_lossy(raw)
            .trim_end_matches('\r')
            .to_owned();
        if cut {
            text.push_str(" …[line cut]");
        }
        tracing::info!(target: "snakepool::worker::stderr", worker, "{text}");
        let mut lines = self.lines.lock().expect("stderr ring poisoned");
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(text);
    }

    /// The most recent lines, oldest first, joined with newlines.
    pub fn snapshot(&self) -> String {
        let lines = self.lines.lock().expect("stderr ring poisoned");
        lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits up to `limit` for the worker to close stderr, then returns the tail.
    ///
    /// Used after a worker died, so its last words are in the error message. The wait
    /// is bounded because a grandchild may hold the pipe open.
    pub async fn settled_snapshot(&self, limit: Duration) -> String {
        let mut closed = self.closed.clone();
        let _ = tokio::time::timeout(limit, closed.wait_for(|c| *c)).await;
        self.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn keeps_last_lines_and_cuts_long_ones() {
        let (mut writer, reader) = tokio::io::duplex(1024);
        let tail = StderrTail::drain(reader, "w-test".into(), 3);
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let text = format!("one\ntwo\nthree\n{long}\nlast-without-newline");
        writer.write_all(text.as_bytes()).await.unwrap();
        drop(writer);
        let snapshot = tail.settled_snapshot(Duration::from_secs(5)).await;
        let lines: Vec<&str> = snapshot.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "three");
        assert!(lines[1].starts_with(&"x".repeat(MAX_LINE_BYTES)));
        assert!(lines[1].ends_with("[line cut]"));
        assert_eq!(lines[2], "last-without-newline");
    }
}
