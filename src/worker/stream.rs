//! A streaming call's chunks on their way from the worker to the consumer, with the
//! credit that paces the worker's generator.
//!
//! The worker may send `stream_window` chunks of a call ahead of the host's credit.
//! The host grants credit only for chunks its consumer has taken, so at most a window
//! of chunks waits in memory per stream however slowly the consumer reads; a worker
//! that sends more than its credit breaks the protocol. Whoever drives the call (the
//! caller's task) writes the credit frames: the consumer only counts what it took and
//! wakes that task once half a window has been taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Counters shared by the two ends of one stream.
#[derive(Debug, Default)]
struct Flow {
    /// Chunks received and not yet taken by the consumer.
    queued: AtomicUsize,
    /// Chunks taken by the consumer and not yet granted back to the worker.
    taken: AtomicUsize,
    /// The worker's window (0 until the call is sent to a worker).
    window: AtomicUsize,
    /// Wakes the driving task when credit is due.
    due: Notify,
}

impl Flow {
    fn threshold(&self) -> usize {
        (self.window.load(Ordering::Acquire) / 2).max(1)
    }
}

/// The worker's end of a stream: where the reader puts the call's chunks.
#[derive(Clone, Debug)]
pub struct ChunkSink {
    tx: mpsc::UnboundedSender<Value>,
    flow: Arc<Flow>,
}

/// The consumer's end of a stream: the call's chunks in order.
#[derive(Debug)]
pub struct ChunkSource {
    rx: mpsc::UnboundedReceiver<Value>,
    flow: Arc<Flow>,
}

/// A new stream's two ends.
pub fn chunk_channel() -> (ChunkSink, ChunkSource) {
    let (tx, rx) = mpsc::unbounded_channel();
    let flow = Arc::new(Flow::default());
    (
        ChunkSink {
            tx,
            flow: flow.clone(),
        },
        ChunkSource { rx, flow },
    )
}

/// What became of a chunk handed to a sink.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Queued for the consumer.
    Queued,
    /// The consumer is gone: the chunk was dropped and its credit is due at once.
    Dropped,
    /// The worker sent more than its credit allows: `outstanding` chunks.
    OverCredit { outstanding: usize, window: usize },
}

impl ChunkSink {
    /// Sets the window of the worker the call goes to.
    pub(crate) fn attach(&self, window: usize) {
        self.flow.window.store(window, Ordering::Release);
    }

    /// Hands a chunk to the consumer, checking the worker kept within its credit.
    pub(crate) fn deliver(&self, value: Value) -> Delivered {
        let window = self.flow.window.load(Ordering::Acquire);
        let queued = self.flow.queued.fetch_add(1, Ordering::AcqRel) + 1;
        let outstanding = queued + self.flow.taken.load(Ordering::Acquire);
        if outstanding > window {
            return Delivered::OverCredit {
                outstanding,
                window,
            };
        }
        match self.tx.send(value) {
            Ok(()) => Delivered::Queued,
            Err(_) => {
                self.flow.queued.fetch_sub(1, Ordering::AcqRel);
                Delivered::Dropped
            }
        }
    }

    /// Credit to grant now: chunks taken since the last grant, once they reach half a
    /// window (0 otherwise).
    pub(crate) fn credit_due(&self) -> usize {
        if self.flow.taken.load(Ordering::Acquire) < self.flow.threshold() {
            return 0;
        }
        self.flow.taken.swap(0, Ordering::AcqRel)
    }

    /// Resolves when credit may be due (the consumer took half a window).
    pub(crate) async fn wants_credit(&self) {
        self.flow.due.notified().await;
    }

    /// Resolves once the consumer is gone.
    pub(crate) async fn consumer_gone(&self) {
        self.tx.closed().await;
    }
}

impl ChunkSource {
    /// The next chunk; `None` once the call has ended and every chunk was taken.
    pub async fn recv(&mut self) -> Option<Value> {
        let value = self.rx.recv().await?;
        self.took_one();
        Some(value)
    }

    /// The next chunk if one is waiting (`poll` form, for [`futures::Stream`] impls).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Value>> {
        let polled = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(_)) = &polled {
            self.took_one();
        }
        polled
    }

    fn took_one(&self) {
        self.flow.queued.fetch_sub(1, Ordering::AcqRel);
        let taken = self.flow.taken.fetch_add(1, Ordering::AcqRel) + 1;
        if taken >= self.flow.threshold() {
            self.flow.due.notify_one();
        }
    }
}

/// What else a call listens to besides its reply and its timeout.
#[derive(Debug, Default)]
pub struct CallControl {
    /// Where its chunks go; without one, chunks are dropped and credited at once.
    pub chunks: Option<ChunkSink>,
    /// Cancelled when the caller wants the call stopped: a cancellable call is
    /// cancelled on its worker; any other runs to completion.
    pub cancel: Option<CancellationToken>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn credit_comes_due_per_half_window_taken() {
        let (sink, mut source) = chunk_channel();
        sink.attach(4);
        for n in 0..4 {
            assert_eq!(sink.deliver(json!(n)), Delivered::Queued);
        }
        assert_eq!(
            sink.deliver(json!(4)),
            Delivered::OverCredit {
                outstanding: 5,
                window: 4
            }
        );
        assert_eq!(source.recv().await, Some(json!(0)));
        assert_eq!(sink.credit_due(), 0, "one taken, half a window is two");
        assert_eq!(source.recv().await, Some(json!(1)));
        sink.wants_credit().await;
        assert_eq!(sink.credit_due(), 2);
        assert_eq!(sink.credit_due(), 0);
        drop(source);
        sink.consumer_gone().await;
        assert_eq!(sink.deliver(json!(5)), Delivered::Dropped);
    }
}
