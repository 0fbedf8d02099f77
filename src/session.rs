//! The session handle: strict worker affinity, calls one at a time in order.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::OwnedMutexGuard;

use crate::call::{CallOptions, CallStream};
use crate::error::{Error, Result};
use crate::pool::{Pool, SessionCall, SessionReply};
use crate::worker::{CallControl, ChunkSink, chunk_channel};

/// A handle on one session of a pool. Clones share the session.
///
/// Every call goes to the session's own worker, one at a time in the order they were
/// made. If that worker dies, the next call first rebuilds the session's state on
/// another worker by replaying the journal.
///
/// Making the handle opens the session. If it cannot be opened (an id that is too
/// long or holds control characters, `max_sessions` reached, the pool shutting down),
/// every call on the handle fails with that error.
#[derive(Clone, Debug)]
pub struct Session {
    pub(crate) pool: Pool,
    pub(crate) id: Arc<str>,
    pub(crate) opened: std::result::Result<Opened, Error>,
}

/// What opening a session gave its handle.
#[derive(Clone, Debug)]
pub(crate) struct Opened {
    /// Distinguishes the session from a later one under the same id.
    pub epoch: u64,
    /// Held for the duration of each call, so calls run one at a time, in order.
    pub order: Arc<tokio::sync::Mutex<()>>,
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn opened(&self) -> Result<&Opened> {
        self.opened.as_ref().map_err(Clone::clone)
    }

    /// Calls `command` on the session's worker, with `session_id` added to `args`.
    ///
    /// The pool owns the session id: `args` must not carry a `session_id` of its own,
    /// and the pool's internal commands are refused (see [`Pool::call`]).
    pub async fn call(&self, command: &str, args: Value) -> Result<Value> {
        let timeout = self.pool.request_timeout();
        self.call_with_timeout(command, args, timeout).await
    }

    /// Like [`Session::call`] with a timeout of its own.
    pub async fn call_with_timeout(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        self.call_with(command, args, CallOptions::default().timeout(timeout))
            .await
    }

    /// Like [`Session::call`] with options: a timeout of its own, a token that
    /// cancels it.
    pub async fn call_with(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<Value> {
        self.call_reporting(command, args, options)
            .await
            .map(|reply| reply.result)
    }

    /// Like [`Session::call_with`], also saying whether the call found the session
    /// new (created), with its state on its worker (resumed), or rebuilt from its
    /// journal first.
    pub async fn call_reporting(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<SessionReply> {
        let (opened, turn, call) = self.take_turn(command, args, options, None).await?;
        self.pool.session_call(self, opened.epoch, turn, call).await
    }

    /// Starts `command` in the session and streams its output, like
    /// [`Pool::call_stream`]: resolves once the session's earlier calls are done and
    /// its worker has this one.
    pub async fn call_stream(&self, command: &str, args: Value) -> Result<CallStream> {
        self.call_stream_with(command, args, CallOptions::default())
            .await
    }

    /// [`Session::call_stream`] with options.
    pub async fn call_stream_with(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<CallStream> {
        let (sink, source) = chunk_channel();
        let (opened, turn, call) = self.take_turn(command, args, options, Some(sink)).await?;
        self.pool
            .session_stream(self, opened.epoch, turn, call, source)
            .await
    }

    /// Checks a call and waits for the session's turn.
    async fn take_turn(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
        chunks: Option<ChunkSink>,
    ) -> Result<(&Opened, OwnedMutexGuard<()>, SessionCall)> {
        let opened = self.opened()?;
        self.pool.check_call(command, &args)?;
        let turn = opened.order.clone().lock_owned().await;
        let call = SessionCall {
            command: command.to_owned(),
            args,
            timeout: options
                .timeout
                .unwrap_or_else(|| self.pool.request_timeout()),
            control: CallControl {
                chunks,
                cancel: options.cancel,
            },
        };
        Ok((opened, turn, call))
    }

    /// The id of the worker the session is pinned to, if any.
    pub fn worker_id(&self) -> Option<String> {
        self.pool.session_worker(&self.id)
    }

    /// Closes the session: later calls fail with `SessionClosed`, the worker is told
    /// to free the session's state, and the journal is dropped.
    pub async fn close(&self) -> Result<()> {
        let opened = self.opened()?;
        let _turn = opened.order.lock().await;
        self.pool.close_session_epoch(&self.id, opened.epoch).await
    }
}
