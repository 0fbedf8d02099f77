//! The one error type callers see, with a variant per cause they can act on.

use std::time::Duration;

/// A worker's identity in messages: its pool-assigned id and its OS pid.
pub type WorkerName = String;

/// Everything a call through the pool can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkout queue is full; nothing was queued. Retry later.
    #[error("pool saturated: {queued} callers already waiting for a worker")]
    Saturated {
        /// How many callers were already queued.
        queued: usize,
    },
    /// No worker became free within the checkout timeout; nothing was left queued.
    #[error("no worker became free within {waited:?}")]
    CheckoutTimeout {
        /// How long the caller waited.
        waited: Duration,
    },
    /// The worker did not answer in time. A concurrent command was cancelled and the
    /// worker serves on; otherwise the worker was killed and is being replaced.
    #[error("worker {worker} did not answer `{command}` within {timeout:?}; {}", if *.killed { "it was killed" } else { "the call was cancelled" })]
    RequestTimeout {
        /// The worker that served the call.
        worker: WorkerName,
        /// The command that timed out.
        command: String,
        /// The timeout that expired.
        timeout: Duration,
        /// Whether the worker was killed (else only the call was cancelled).
        killed: bool,
    },
    /// The caller cancelled the call (dropped its stream, disconnected, or asked by
    /// id); the worker cancelled it and serves on.
    #[error("`{command}` on worker {worker} was cancelled by its caller")]
    Cancelled {
        /// The worker that ran the call.
        worker: WorkerName,
        /// The cancelled command.
        command: String,
    },
    /// The worker process died while serving the call.
    #[error("worker {worker} died during `{command}` ({status}); stderr tail:\n{stderr_tail}")]
    WorkerCrashed {
        /// The worker that died.
        worker: WorkerName,
        /// The command in flight.
        command: String,
        /// How it ended, e.g. `exit status 3` or `killed by signal 9`.
        status: String,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The command raised an exception in the worker; the worker keeps serving.
    #[error("`{command}` failed on worker {worker}: {kind}: {message}")]
    WorkerError {
        /// The worker that ran the command.
        worker: WorkerName,
        /// The command that failed.
        command: String,
        /// The exception type, e.g. `ValueError`.
        kind: String,
        /// The exception message.
        message: String,
        /// The worker-side traceback, when sent.
        traceback: Option<String>,
    },
    /// The worker does not know the command.
    #[error("unknown command `{command}` (worker {worker}: {message})")]
    UnknownCommand {
        /// The worker that was asked.
        worker: WorkerName,
        /// The command name.
        command: String,
        /// The worker's message, usually listing the commands it knows.
        message: String,
    },
    /// The worker broke the wire protocol; it was killed and is being replaced.
    #[error("worker {worker} broke the protocol during `{command}`: {detail}")]
    Protocol {
        /// The offending worker.
        worker: WorkerName,
        /// The command in flight.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// A worker could not be started (or kept failing to start).
    #[error("worker {worker} failed to start: {reason}; stderr tail:\n{stderr_tail}")]
    StartupFailed {
        /// The worker that failed.
        worker: WorkerName,
        /// Why: spawn error, exit during handshake, handshake timeout.
        reason: String,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The request cannot be sent as given (too large, arguments not an object).
    #[error("invalid request `{command}`: {reason}")]
    InvalidRequest {
        /// The command.
        command: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The worker's result does not have the shape the caller asked for.
    #[error("unexpected result from `{command}`: {reason}")]
    UnexpectedResult {
        /// The command.
        command: String,
        /// What did not fit.
        reason: String,
    },
    /// The command is the pool's own (e.g. `shutdown`, `cleanup_session`): only the
    /// pool sends it, never a caller.
    #[error("`{command}` is internal to the pool and cannot be called")]
    Forbidden {
        /// The command.
        command: String,
    },
    /// Opening one more session would pass the pool's `max_sessions`; nothing was
    /// opened. Close sessions or retry later.
    #[error("too many open sessions: the limit is {limit}")]
    TooManySessions {
        /// The limit.
        limit: usize,
    },
    /// A setting given to the builder is out of range; nothing was started.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The session was closed (explicitly or by its TTL).
    #[error("session `{session_id}` is closed")]
    SessionClosed {
        /// The session's id.
        session_id: String,
    },
    /// The session's state could not be rebuilt on a new worker. The session stays
    /// unusable (its calls fail with this error at once) until it is closed.
    #[error("session `{session_id}` could not be rebuilt on a new worker{}: {source}", describe_entry(*.entry, .entry_command.as_deref()))]
    SessionRebuildFailed {
        /// The session's id.
        session_id: String,
        /// The position (from 0) of the journal entry whose replay failed, if one did.
        entry: Option<usize>,
        /// That entry's command.
        entry_command: Option<String>,
        /// The failure while replaying its journal.
        source: Box<Error>,
    },
    /// The session's journal is at its limit and cannot be compacted into a snapshot;
    /// the call, which would change session state, was not made. Nothing was lost.
    #[error(
        "the journal of session `{session_id}` is full ({entries} entries, {bytes} bytes; the limits are {max_entries} entries, {max_bytes} bytes) and cannot be compacted: {reason}"
    )]
    JournalFull {
        /// The session's id.
        session_id: String,
        /// Entries in its journal.
        entries: usize,
        /// Their size in bytes.
        bytes: usize,
        /// The limit on entries.
        max_entries: usize,
        /// The limit on bytes.
        max_bytes: usize,
        /// Why it cannot be compacted, e.g. the command whose module offers no snapshot.
        reason: String,
    },
    /// The session journal's store cannot be reached or failed to store an entry: the
    /// call's change, if it made one, was not acknowledged. Retry later.
    #[error("the journal store is unavailable for session `{session_id}`: {reason}")]
    JournalUnavailable {
        /// The session's id.
        session_id: String,
        /// What the store said.
        reason: String,
    },
    /// Another node owns the session now (this one lost its lease, or could not get
    /// it in time): nothing this call did was acknowledged, and this node dropped its
    /// copy of the session. Retry: the call goes to the session's owner.
    #[error("session `{session_id}` is owned by another node: {reason}")]
    SessionMoved {
        /// The session's id.
        session_id: String,
        /// What the store said.
        reason: String,
    },
    /// A reload of the handler code stopped: the new code does not import, or a
    /// worker running it cannot start. The workers not yet replaced serve on.
    #[error("reload failed: {reason}")]
    ReloadFailed {
        /// What went wrong, and how many workers run the new code.
        reason: String,
    },
    /// The pool is shutting down and takes no new calls.
    #[error("the pool is shutting down")]
    ShuttingDown,
}

impl Error {
    /// A short, stable name for the cause, used as a metrics label and in HTTP bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Saturated { .. } => "saturated",
            Error::CheckoutTimeout { .. } => "checkout_timeout",
            Error::RequestTimeout { .. } => "request_timeout",
            Error::Cancelled { .. } => "cancelled",
            Error::WorkerCrashed { .. } => "worker_crashed",
            Error::WorkerError { .. } => "worker_error",
            Error::UnknownCommand { .. } => "unknown_command",
            Error::Protocol { .. } => "protocol",
            Error::StartupFailed { .. } => "startup_failed",
            Error::InvalidRequest { .. } => "invalid_request",
            Error::Forbidden { .. } => "forbidden",
            Error::TooManySessions { .. } => "too_many_sessions",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::UnexpectedResult { .. } => "unexpected_result",
            Error::SessionClosed { .. } => "session_closed",
            Error::SessionRebuildFailed { .. } => "session_rebuild_failed",
            Error::JournalFull { .. } => "journal_full",
            Error::JournalUnavailable { .. } => "journal_unavailable",
            Error::SessionMoved { .. } => "session_moved",
            Error::ReloadFailed { .. } => "reload_failed",
            Error::ShuttingDown => "shutting_down",
        }
    }

    /// Whether the worker that served the call was lost with it.
    pub fn lost_worker(&self) -> bool {
        matches!(
            self,
            Error::RequestTimeout { killed: true, .. }
                | Error::WorkerCrashed { .. }
                | Error::Protocol { .. }
        )
    }
}

fn describe_entry(entry: Option<usize>, command: Option<&str>) -> String {
    match (entry, command) {
        (Some(entry), Some(command)) => format!(" (journal entry {entry}, `{command}`)"),
        (Some(entry), None) => format!(" (journal entry {entry})"),
        _ => String::new(),
    }
}

/// Result with the pool's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
