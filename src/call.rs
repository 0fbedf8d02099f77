//! What a caller may ask of one call beyond its command and arguments: a timeout of
//! its own, a token that cancels it, and its output as a stream of chunks.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use serde_json::Value;
use tokio::sync::oneshot;
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pool::SessionState;
use crate::worker::ChunkSource;

/// Options of one call. The default is the pool's request timeout and no way to
/// cancel but dropping the call.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// The call's timeout; the pool's request timeout when `None`.
    pub timeout: Option<Duration>,
    /// Cancelling this token cancels the call: a cancellable command (an `async`
    /// handler or a generator) is cancelled on its worker and the call fails with
    /// [`Error::Cancelled`]; any other runs to completion.
    pub cancel: Option<CancellationToken>,
}

impl CallOptions {
    /// With a timeout of its own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Cancelled by `token`.
    pub fn cancel_on(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }
}

/// One item of a [`CallStream`].
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// A value the handler yielded.
    Chunk(Value),
    /// The call's result; the last item.
    Result(Value),
}

/// A streaming call's output: its chunks as the worker yields them, then its result
/// or the error that ended it; then the stream ends.
///
/// The worker's generator runs at most a window of chunks (16 by default) ahead of
/// what has been taken from this stream: a slow reader slows the generator, and
/// memory does not grow. Dropping the stream cancels a cancellable call; any other
/// runs to completion and its output is dropped.
#[derive(Debug)]
pub struct CallStream {
    chunks: ChunkSource,
    outcome: Option<oneshot::Receiver<Result<Value>>>,
    /// The outcome, once it arrived while chunks may still be waiting.
    ended: Option<Result<Value>>,
    /// For a session call: what it found its session to be.
    session: Option<SessionState>,
}

impl CallStream {
    /// The stream of a call running on a task of its own as `run`.
    pub(crate) fn spawn(
        chunks: ChunkSource,
        run: impl Future<Output = Result<Value>> + Send + 'static,
    ) -> CallStream {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(run.await);
        });
        CallStream {
            chunks,
            outcome: Some(rx),
            ended: None,
            session: None,
        }
    }

    /// The stream of a session call that found its session `state`.
    pub(crate) fn in_session(mut self, state: SessionState) -> CallStream {
        self.session = Some(state);
        self
    }

    /// For a session call: whether its session was created, resumed or rebuilt.
    pub fn session_state(&self) -> Option<SessionState> {
        self.session
    }
}

impl Stream for CallStream {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(outcome) = &mut this.outcome
            && let Poll::Ready(received) = Pin::new(outcome).poll(cx)
        {
            this.outcome = None;
            // The task ended: every chunk was routed before its reply.
            this.ended = Some(received.unwrap_or(Err(Error::ShuttingDown)));
        }
        match this.chunks.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => return Poll::Ready(Some(Ok(StreamEvent::Chunk(chunk)))),
            Poll::Ready(None) | Poll::Pending => {}
        }
        match this.ended.take() {
            Some(outcome) => Poll::Ready(Some(outcome.map(StreamEvent::Result))),
            None if this.outcome.is_none() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}
