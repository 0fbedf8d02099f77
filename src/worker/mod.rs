//! One Python worker process: spawn, handshake, calls, stderr, kill.
//!
//! A [`Worker`] knows nothing about other workers. It is a cheap handle: several
//! calls may be in flight on one worker at once when its manifest announces
//! concurrency (the pool decides how many). There is no reader task: whoever waits
//! for a reply reads the worker's output and hands the replies of other calls to
//! their callers, so a lone call costs no extra task switch. Every call ends with its
//! worker's answer or a typed error; a worker that times out a call it cannot cancel,
//! crashes or breaks the protocol is killed, and every call still in flight on it
//! fails ([`Worker::is_lost`]). A call whose caller goes away after sending it is
//! finished in the background within its timeout (or cancelled, for a concurrent
//! command), so its reply never reaches anyone else.

mod exit;
mod in_flight;
mod manifest;
mod outbox;
mod pid;
pub mod runtime;
pub mod spawn;
mod stderr;
mod stream;
pub mod zygote;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::Instant as Deadline;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

pub use exit::{ExitInfo, ExitReporter, ExitWatch};
pub use manifest::{CommandInfo, Concurrency, Manifest};
pub use pid::Pid;
pub use spawn::{WorkerProgram, WorkerSpec};
pub use stderr::StderrTail;
pub use stream::{CallControl, ChunkSink, ChunkSource, chunk_channel};

use crate::error::Error;
use crate::protocol::{
    Cancel, Chunk, Credit, Frame, FrameError, HANDSHAKE_ID, HostCodec, JournalHint, Reply, Request,
    encode_frame,
};
use in_flight::{InFlight, Place, Settled, Waiting};
use outbox::Outbox;
use stream::Delivered;

/// How long to wait for a dead worker's exit status and last stderr lines.
const POST_MORTEM_WAIT: Duration = Duration::from_millis(500);

/// How long a reply may take to surface after its worker exited.
const EXITED_REPLY_GRACE: Duration = Duration::from_millis(50);

/// Stands in for a timeout too large to represent.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long a worker has to confirm a cancelled call before it is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// How a pipelined call ([`Worker::call_in_line`]) ended.
pub(crate) enum InLine {
    /// It ran: its result, and how long it ran on the worker.
    Settled {
        result: Result<Value, Error>,
        took: Duration,
    },
    /// Its worker died (with `error`) before it started: it did not run, and can be
    /// sent elsewhere with `args`.
    NotStarted { args: Value, error: Error },
}

/// The host's end of a worker's stdin.
pub type WorkerInput = Box<dyn AsyncWrite + Send + Unpin>;
/// The host's end of a worker's stdout or stderr.
pub type WorkerOutput = Box<dyn AsyncRead + Send + Unpin>;

/// A worker process just started, however it was created, before its handshake.
pub struct RawProcess {
    /// Its process id (also its process group's id).
    pub pid: Pid,
    /// The host's end of its stdin.
    pub stdin: WorkerInput,
    /// The host's end of its stdout.
    pub stdout: WorkerOutput,
    /// The host's end of its stderr.
    pub stderr: WorkerOutput,
    /// Reports its exit.
    pub exit: ExitWatch,
}

impl RawProcess {
    /// Spawns a fresh process for worker `id` as `spec` says.
    pub fn spawn_fresh(
        spec: &WorkerSpec,
        id: &str,
        on_exit: impl FnOnce(ExitInfo) + Send + 'static,
    ) -> Result<RawProcess, Error> {
        let mut child = spec.spawn(id).map_err(|e| Error::StartupFailed {
            worker: id.to_owned(),
            reason: format!("cannot spawn {:?}: {e}", spec.argv(id)),
            stderr_tail: String::new(),
        })?;
        let pid = spawn::child_pid(&child).map_err(|e| Error::StartupFailed {
            worker: id.to_owned(),
            reason: e.to_string(),
            stderr_tail: String::new(),
        })?;
        let stdin = Box::new(child.stdin.take().expect("stdin is piped"));
        let stdout = Box::new(child.stdout.take().expect("stdout is piped"));
        let stderr = Box::new(child.stderr.take().expect("stderr is piped"));
        Ok(RawProcess {
            pid,
            stdin,
            stdout,
            stderr,
            exit: ExitWatch::spawn(child, on_exit),
        })
    }
}

type Output = FramedRead<WorkerOutput, HostCodec>;

/// The state of one worker process shared by every handle on it.
struct Conn {
    id: Arc<str>,
    pid: Pid,
    manifest: std::sync::OnceLock<Arc<Manifest>>,
    started_at: Instant,
    stop_grace: Duration,
    input: Arc<Outbox>,
    max_frame_bytes: usize,
    /// Held by whoever reads replies at the moment.
    output: tokio::sync::Mutex<Output>,
    pending: Mutex<InFlight>,
    next_id: AtomicU64,
    calls_served: AtomicU64,
    lost: AtomicBool,
    exit: ExitWatch,
    stderr: StderrTail,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.input.close();
        // A worker nobody holds any more must not live on.
        if !self.exit.exited() {
            self.pid.signal_group(libc::SIGKILL);
        }
    }
}

/// A started, handshaken worker process. Cheap to clone: clones are handles on the
/// same process.
#[derive(Clone)]
pub struct Worker {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.conn.id)
            .field("pid", &self.conn.pid)
            .field("calls_served", &self.calls_served())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Worker {
    /// Spawns a fresh worker process and completes the handshake within the spec's
    /// start-up timeout.
    ///
    /// `on_exit` is called once, from a background task, when the process exits for
    /// any reason (including while idle).
    pub async fn start(
        spec: &WorkerSpec,
        id: &str,
        on_exit: impl FnOnce(ExitInfo) + Send + 'static,
    ) -> Result<Worker, Error> {
        let process = RawProcess::spawn_fresh(spec, id, on_exit)?;
        Worker::handshake(spec, id, process).await
    }

    /// Completes the handshake with a started process.
    pub async fn handshake(
        spec: &WorkerSpec,
        id: &str,
        process: RawProcess,
    ) -> Result<Worker, Error> {
        let RawProcess {
            pid,
            stdin,
            stdout,
            stderr,
            exit,
        } = process;
        let stderr = StderrTail::drain(stderr, id.to_owned(), spec.stderr_lines);
        let worker = Worker {
            conn: Arc::new(Conn {
                id: Arc::from(id),
                pid,
                manifest: std::sync::OnceLock::new(),
                started_at: Instant::now(),
                stop_grace: spec.stop_grace,
                input: Outbox::start(stdin),
                max_frame_bytes: spec.max_frame_bytes,
                output: tokio::sync::Mutex::new(FramedRead::new(
                    stdout,
                    HostCodec::new(spec.max_frame_bytes),
                )),
                pending: Mutex::new(InFlight::default()),
                next_id: AtomicU64::new(HANDSHAKE_ID),
                calls_served: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                exit,
                stderr,
            }),
        };
        let hello = json!({"initialization": true, "worker_id": id});
        match worker
            .call_holding("ping", hello, spec.startup_timeout, None)
            .await
        {
            Ok((result, _)) => {
                let _ = worker
                    .conn
                    .manifest
                    .set(Arc::new(Manifest::from_handshake(&result)));
                worker.conn.calls_served.store(0, Ordering::Relaxed);
                Ok(worker)
            }
            Err(error) => {
                worker.kill();
                let stderr_tail = worker.conn.stderr.settled_snapshot(POST_MORTEM_WAIT).await;
                let reason = match error {
                    Error::RequestTimeout { timeout, .. } => {
                        format!("no handshake reply within {timeout:?}")
                    }
                    Error::WorkerCrashed { status, .. } => {
                        format!("exited during the handshake ({status})")
                    }
                    Error::WorkerError { kind, message, .. } => {
                        format!("handshake ping failed: {kind}: {message}")
                    }
                    other => format!("handshake failed: {other}"),
                };
                Err(Error::StartupFailed {
                    worker: id.to_owned(),
                    reason,
                    stderr_tail,
                })
            }
        }
    }

    /// The pool-assigned id, e.g. `w3`.
    pub fn id(&self) -> &str {
        &self.conn.id
    }

    /// The OS process id (also the id of its process group).
    pub fn pid(&self) -> u32 {
        self.conn.pid.get()
    }

    /// What the worker said about itself in the handshake.
    pub fn manifest(&self) -> &Arc<Manifest> {
        self.conn
            .manifest
            .get()
            .expect("the manifest is set by the handshake")
    }

    /// Calls answered by this worker so far (handshake excluded).
    pub fn calls_served(&self) -> u64 {
        self.conn.calls_served.load(Ordering::Relaxed)
    }

    /// Calls sent to the worker and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .len()
    }

    /// When the worker became ready.
    pub fn started_at(&self) -> Instant {
        self.conn.started_at
    }

    /// The worker's recent stderr lines.
    pub fn stderr_tail(&self) -> String {
        self.conn.stderr.snapshot()
    }

    /// True once the worker was killed, died, or broke the protocol: it must not be
    /// used again.
    pub fn is_lost(&self) -> bool {
        self.conn.lost.load(Ordering::Acquire) || self.conn.exit.exited()
    }

    /// Checks, without waiting, that a worker with no call in flight is fit for one:
    /// alive, and not having written anything nobody asked for (a second reply, stray
    /// bytes, end of output). An unfit worker is killed, so the caller can take
    /// another one before sending anything to this one.
    pub fn is_usable(&self) -> bool {
        if self.is_lost() {
            return false;
        }
        // Held while the output is looked at: no call can be sent meanwhile, so a reply
        // read here can only be one nobody asked for.
        let pending = self.conn.pending.lock().expect("pending calls poisoned");
        if self.is_lost() {
            // A check that held this lock just now (the idle sweep's, or another
            // caller's) found it unfit and read what it wrote.
            return false;
        }
        if pending.len() > 0 {
            // Whoever waits for those calls reads the output and checks it.
            return true;
        }
        let Ok(mut output) = self.conn.output.try_lock() else {
            return true;
        };
        let problem = match output.next().now_or_never() {
            // Nothing whole arrived; but part of a frame is no better.
            None if output.read_buffer().is_empty() && !output.decoder().mid_frame() => {
                return true;
            }
            None => "wrote part of a frame while idle".to_owned(),
            Some(Some(Ok(frame))) => format!("sent a frame nobody asked for (id {})", frame.id()),
            Some(Some(Err(error))) => format!("wrote bytes while idle: {error}"),
            Some(None) => "closed its output".to_owned(),
        };
        // Marked lost before the lock goes: a check waiting for it must not find the
        // output empty (this one read it) and take the worker as fit.
        self.kill();
        drop((output, pending));
        tracing::warn!(worker = %self.name(), %problem, "idle worker is unfit; killed");
        false
    }

    /// Sends one request and waits up to `timeout` for its reply.
    ///
    /// On timeout a concurrent command is cancelled; anything else (or a cancel the
    /// worker does not confirm) has the worker killed, so a late reply can never
    /// reach another caller.
    pub async fn call(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.call_with_hint(command, args, timeout)
            .await
            .map(|(result, _)| result)
    }

    /// Like [`Worker::call`], also returning what the worker asked to journal instead
    /// of this call, if anything.
    pub async fn call_with_hint(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        self.call_holding(command, args, timeout, None).await
    }

    /// Like [`Worker::call_with_hint`]; `hold` is dropped when the call settles —
    /// answered, failed, or finished in the background after its caller went away.
    pub async fn call_holding(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
        hold: Option<Box<dyn Send>>,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        self.call_controlled(command, args, timeout, hold, CallControl::default())
            .await
    }

    /// Like [`Worker::call_holding`], streaming the call's chunks to `control.chunks`
    /// (granting the worker credit as they are taken) and cancelling the call when
    /// `control.cancel` fires or the chunks' consumer goes away. Only a cancellable
    /// command is cancelled (it then fails with [`Error::Cancelled`] unless its reply
    /// was on its way); any other runs to completion, its chunks dropped.
    pub async fn call_controlled(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
        hold: Option<Box<dyn Send>>,
        control: CallControl,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        if !args.is_object() {
            return Err(Error::InvalidRequest {
                command: command.to_owned(),
                reason: "arguments must be a JSON object".into(),
            });
        }
        if self.is_lost() {
            return Err(self.crash_error(command).await);
        }
        let manifest = self.conn.manifest.get();
        let cancellable = manifest.is_some_and(|m| m.cancellable(command));
        let CallControl { chunks, cancel } = control;
        if let Some(sink) = &chunks {
            sink.attach(manifest.map_or(0, |m| m.stream_window()));
        }
        let mut call =
            PendingCall::register(self, command, hold, timeout, cancellable, chunks.clone());
        // Not written: the pipe's failure is the call's, as `settled` reports.
        drop(call.send(args).await?);
        let deadline = call.deadline;
        let cancel = cancel.filter(|_| cancellable);
        let cancel_when_orphaned = cancellable && chunks.is_some();
        loop {
            tokio::select! {
                biased;
                settled = call.settled() => return self.outcome(command, settled),
                () = tokio::time::sleep_until(deadline) => return Err(call.timed_out(timeout).await),
                () = when_some(chunks.as_ref(), ChunkSink::wants_credit) => {
                    let sink = chunks.as_ref().expect("only polled with a sink");
                    let due = sink.credit_due();
                    if due > 0 {
                        let credit = Credit { id: call.id, credit: u32::try_from(due).unwrap_or(u32::MAX) };
                        // A dead pipe shows as the call's failure.
                        let _ = self.send_frame(&credit).await;
                    }
                }
                () = when_some(chunks.as_ref(), ChunkSink::consumer_gone), if cancel_when_orphaned => {
                    return call.cancel(self).await;
                }
                () = when_some(cancel.as_ref(), CancellationToken::cancelled) => {
                    return call.cancel(self).await;
                }
            }
        }
    }

    /// Sends a call of a command the worker runs inline ([`Manifest::pipelines`])
    /// ahead of the calls it is running or has been sent: it waits in the pipe and
    /// runs after them. Its timeout counts from its start (when the reply before it
    /// arrived). If the worker dies before the call started, it did not run: its
    /// arguments come back ([`InLine::NotStarted`]) to be sent elsewhere.
    pub(crate) async fn call_in_line(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
        hold: Option<Box<dyn Send>>,
    ) -> InLine {
        let sent = Instant::now();
        let mut call = PendingCall::register(self, command, hold, timeout, false, None);
        call.in_line = true;
        let request = match call.send(args).await {
            Ok(Sent::Written(request)) => request,
            Ok(Sent::Unwritten(request)) => {
                call.stage = Stage::Done;
                return InLine::NotStarted {
                    args: request.args,
                    error: self.lost_error(command),
                };
            }
            Err(error) => {
                return InLine::Settled {
                    result: Err(error),
                    took: Duration::ZERO,
                };
            }
        };
        let mut deadline = call.deadline;
        loop {
            tokio::select! {
                biased;
                settled = call.settled() => {
                    return match settled {
                        Settled::NotStarted(error) => InLine::NotStarted { args: request.args, error },
                        Settled::Reply(reply, took) => InLine::Settled {
                            took: took.unwrap_or_else(|| sent.elapsed()),
                            result: self.outcome(command, Settled::Reply(reply, None)).map(|(value, _)| value),
                        },
                        failed => InLine::Settled {
                            took: sent.elapsed(),
                            result: self.outcome(command, failed).map(|(value, _)| value),
                        },
                    };
                }
                () = tokio::time::sleep_until(deadline) => {
                    match self.deadline_in_line(call.id, timeout) {
                        Some(later) if later > Deadline::now() => deadline = later,
                        _ => return InLine::Settled {
                            result: Err(call.timed_out(timeout).await),
                            took: timeout,
                        },
                    }
                }
            }
        }
    }

    /// When pipelined call `id`, with `timeout`, runs out of time: `timeout` after
    /// its start, or no sooner than `timeout` from now while it waits behind another.
    /// `None` if it is not a pipelined call in flight.
    fn deadline_in_line(&self, id: u64, timeout: Duration) -> Option<Deadline> {
        let place = self
            .conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .place(id);
        match place {
            Place::Running(since) => Some(
                Deadline::from_std(since)
                    .checked_add(timeout)
                    .unwrap_or_else(|| deadline_after(FOREVER)),
            ),
            Place::Behind => Some(deadline_after(timeout)),
            Place::Elsewhere => None,
        }
    }

    fn outcome(
        &self,
        command: &str,
        settled: Settled,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        let reply = match settled {
            Settled::Reply(reply, _) => reply,
            Settled::Failed(error) | Settled::NotStarted(error) => return Err(error),
        };
        let journal = reply.journal;
        reply
            .outcome
            .map(|result| (result, journal))
            .map_err(|remote| match remote.kind.as_str() {
                "UnknownCommand" => Error::UnknownCommand {
                    worker: self.name(),
                    command: command.to_owned(),
                    message: remote.message,
                },
                _ => Error::WorkerError {
                    worker: self.name(),
                    command: command.to_owned(),
                    kind: remote.kind,
                    message: remote.message,
                    traceback: remote.traceback,
                },
            })
    }

    /// Waits for the call whose outcome `rx` receives, reading the worker's output
    /// meanwhile if no one else does.
    async fn wait_for(&self, rx: &mut oneshot::Receiver<Settled>) -> Settled {
        loop {
            let mut output = tokio::select! {
                biased;
                settled = &mut *rx => {
                    return settled.unwrap_or_else(|_| Settled::Failed(self.lost_error("-")));
                }
                output = self.conn.output.lock() => output,
            };
            if let Ok(settled) = rx.try_recv() {
                return settled;
            }
            self.read_one(&mut output).await;
        }
    }

    /// Reads one frame and hands it to its caller; a crash or a violation fails every
    /// call in flight.
    async fn read_one(&self, output: &mut Output) {
        let frame = tokio::select! {
            biased;
            frame = output.next() => frame,
            _ = self.conn.exit.wait_forever() => {
                // It exited. A reply it wrote just before may still be in the pipe; a
                // grandchild holding the pipe open must not keep us waiting for end of
                // file.
                tokio::time::timeout(EXITED_REPLY_GRACE, output.next())
                    .await
                    .unwrap_or_default()
            }
        };
        match frame {
            Some(Ok(Frame::Reply(reply))) => self.route(reply),
            Some(Ok(Frame::Chunk(chunk))) => {
                if let Some(credit) = self.route_chunk(chunk) {
                    // A dead pipe shows when the next frame is read.
                    let _ = self.send_frame(&credit).await;
                }
            }
            Some(Err(FrameError::Io(_))) | None => self.crash().await,
            Some(Err(error)) => self.violation(error.to_string()),
        }
    }

    /// Hands a chunk to its call's consumer; returns the credit to grant at once for a
    /// chunk nobody takes (its caller does not stream, or left).
    fn route_chunk(&self, chunk: Chunk) -> Option<Credit> {
        let window = self.conn.manifest.get().map_or(0, |m| m.stream_window());
        let delivered = {
            let pending = self.conn.pending.lock().expect("pending calls poisoned");
            match pending.get(chunk.id) {
                None => None,
                Some(Waiting {
                    chunks: Some(sink), ..
                }) => Some(sink.deliver(chunk.value)),
                Some(_) if window == 0 => Some(Delivered::OverCredit {
                    outstanding: 1,
                    window,
                }),
                Some(_) => Some(Delivered::Dropped),
            }
        };
        match delivered {
            Some(Delivered::Queued) => None,
            Some(Delivered::Dropped) => Some(Credit {
                id: chunk.id,
                credit: 1,
            }),
            Some(Delivered::OverCredit {
                outstanding,
                window,
            }) => {
                self.violation(format!(
                    "call {} has {outstanding} chunks outstanding, past its credit of {window}",
                    chunk.id
                ));
                None
            }
            None => {
                self.violation(format!(
                    "chunk for id {} does not match a request in flight",
                    chunk.id
                ));
                None
            }
        }
    }

    fn route(&self, reply: Reply) {
        let answered = self
            .conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .answered(reply.id);
        let (waiting, took) = match answered {
            Ok(answered) => answered,
            Err(out_of_order) => {
                self.violation(format!(
                    "reply id {} came before the reply to {}, sent ahead of it",
                    reply.id, out_of_order.expected
                ));
                return;
            }
        };
        self.conn.calls_served.fetch_add(1, Ordering::Relaxed);
        match waiting {
            Some(waiting) => {
                let _ = waiting.tx.send(Settled::Reply(reply, took));
                drop(waiting.hold);
            }
            // A pipelined call that settled already (it timed out): its reply only
            // moves the line on.
            None if took.is_some() => {}
            None => {
                let in_flight = self
                    .conn
                    .pending
                    .lock()
                    .expect("pending calls poisoned")
                    .ids();
                self.violation(format!(
                    "reply id {} does not match a request in flight ({in_flight:?})",
                    reply.id
                ));
            }
        }
    }

    /// Fails every call in flight with the error `make` gives for its command.
    fn fail_all(&self, make: impl Fn(&str) -> Error) {
        self.settle_all(make, Settled::Failed);
    }

    /// The worker's output ended: fails every call in flight with the error `make`
    /// gives for its command, except that those that waited behind a pipelined call
    /// are settled as not started (they never ran).
    fn fail_after_exit(&self, make: impl Fn(&str) -> Error) {
        self.settle_all(make, Settled::NotStarted);
    }

    fn settle_all(&self, make: impl Fn(&str) -> Error, unstarted: impl Fn(Error) -> Settled) {
        let waiting = self
            .conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .drain();
        for (w, started) in waiting {
            let error = make(&w.command);
            let settled = if started {
                Settled::Failed(error)
            } else {
                unstarted(error)
            };
            let _ = w.tx.send(settled);
            drop(w.hold);
        }
    }

    fn violation(&self, detail: String) {
        self.kill();
        tracing::warn!(worker = %self.name(), %detail, "protocol violation; worker killed");
        let worker = self.name();
        self.fail_all(|command| Error::Protocol {
            worker: worker.clone(),
            command: command.to_owned(),
            detail: detail.clone(),
        });
    }

    /// The worker's output closed or its process exited: fail every call in flight
    /// with its exit status and stderr tail.
    async fn crash(&self) {
        let error = self.crash_error("-").await;
        self.fail_after_exit(|command| match &error {
            Error::WorkerCrashed {
                worker,
                status,
                stderr_tail,
                ..
            } => Error::WorkerCrashed {
                worker: worker.clone(),
                command: command.to_owned(),
                status: status.clone(),
                stderr_tail: stderr_tail.clone(),
            },
            other => other.clone(),
        });
    }

    /// The error for a call that meets a dead worker: waits briefly for its exit
    /// status and stderr tail, and makes sure it is dead.
    async fn crash_error(&self, command: &str) -> Error {
        let status = match self.conn.exit.wait(POST_MORTEM_WAIT).await {
            Some(info) => info.to_string(),
            None if self.conn.lost.load(Ordering::Acquire) => "killed".to_owned(),
            None => "closed its output while still running; killed".to_owned(),
        };
        // Whatever it started dies with it (a grandchild may hold its pipes).
        self.kill();
        Error::WorkerCrashed {
            worker: self.name(),
            command: command.to_owned(),
            status,
            stderr_tail: self.conn.stderr.settled_snapshot(POST_MORTEM_WAIT).await,
        }
    }

    /// The error for a call whose outcome was lost with its worker.
    fn lost_error(&self, command: &str) -> Error {
        Error::WorkerCrashed {
            worker: self.name(),
            command: command.to_owned(),
            status: "lost".to_owned(),
            stderr_tail: self.conn.stderr.snapshot(),
        }
    }

    /// Kills the worker because call `command` ran past its timeout; every other call
    /// in flight fails with [`Error::WorkerCrashed`], but those waiting behind a
    /// pipelined call: they stay until the worker's output ends, which shows whether
    /// they started.
    fn kill_after_timeout(&self, command: &str) {
        self.kill();
        let worker = self.name();
        let status = format!("killed: `{command}` on it ran past its timeout");
        let tail = self.conn.stderr.snapshot();
        let started = self
            .conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .drain_started();
        for w in started {
            let _ = w.tx.send(Settled::Failed(Error::WorkerCrashed {
                worker: worker.clone(),
                command: w.command.clone(),
                status: status.clone(),
                stderr_tail: tail.clone(),
            }));
            drop(w.hold);
        }
    }

    /// Writes a control frame (cancel, credit) to the worker.
    async fn send_frame(&self, frame: &impl serde::Serialize) -> Result<(), FrameError> {
        let frame = encode_frame(frame, self.conn.max_frame_bytes)?;
        self.conn.input.push(frame)?;
        Ok(self.conn.input.flush()?)
    }

    /// `id (pid N)`, as used in messages.
    pub fn name(&self) -> String {
        format!("{} (pid {})", self.conn.id, self.conn.pid)
    }

    /// Kills the worker's whole process group at once. The worker is lost afterwards.
    pub fn kill(&self) {
        self.conn.lost.store(true, Ordering::Release);
        self.conn.pid.signal_group(libc::SIGKILL);
    }

    /// Stops the worker gracefully: close stdin, wait the grace period, `SIGTERM`,
    /// wait again, then `SIGKILL` the group. Returns how the process ended.
    pub async fn stop(self) -> Option<ExitInfo> {
        let conn = &self.conn;
        conn.input.close();
        if let Some(info) = conn.exit.wait(conn.stop_grace).await {
            conn.pid.signal_group(libc::SIGKILL);
            return Some(info);
        }
        conn.pid.signal_group(libc::SIGTERM);
        if let Some(info) = conn.exit.wait(conn.stop_grace).await {
            conn.pid.signal_group(libc::SIGKILL);
            return Some(info);
        }
        conn.pid.signal_group(libc::SIGKILL);
        conn.exit.wait(conn.stop_grace).await
    }

    /// A handle that reports the process's exit, usable after the worker is dropped.
    pub fn exit_watch(&self) -> ExitWatch {
        self.conn.exit.clone()
    }
}

/// What became of a request [`PendingCall::send`] was to write.
enum Sent {
    /// Written to the worker.
    Written(Request),
    /// Not (wholly) written: the worker was lost, and never had it.
    Unwritten(Request),
}

/// Where a call is: registered (not yet written), sent, or settled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Registered,
    Sent,
    Done,
}

/// One call from registration to its outcome. Dropped before its outcome (its caller
/// went away), a sent call is finished in the background: cancelled if it can be,
/// else left to answer within its timeout; past that the worker is killed.
struct PendingCall {
    worker: Worker,
    id: u64,
    command: String,
    rx: Option<oneshot::Receiver<Settled>>,
    deadline: Deadline,
    timeout: Duration,
    cancellable: bool,
    /// Sent ahead of the worker's earlier calls (pipelined).
    in_line: bool,
    stage: Stage,
}

impl PendingCall {
    fn register(
        worker: &Worker,
        command: &str,
        hold: Option<Box<dyn Send>>,
        timeout: Duration,
        cancellable: bool,
        chunks: Option<ChunkSink>,
    ) -> PendingCall {
        let deadline = deadline_after(timeout);
        let id = worker.conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        worker
            .conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .insert(
                id,
                Waiting {
                    command: command.to_owned(),
                    tx,
                    hold,
                    chunks,
                },
            );
        PendingCall {
            worker: worker.clone(),
            id,
            command: command.to_owned(),
            rx: Some(rx),
            deadline,
            timeout,
            cancellable,
            in_line: false,
            stage: Stage::Registered,
        }
    }

    fn unregister(&mut self) {
        self.stage = Stage::Done;
        let waiting = self
            .worker
            .conn
            .pending
            .lock()
            .expect("pending calls poisoned")
            .remove(self.id);
        drop(waiting);
    }

    /// Writes the request, and gives it back (a pipelined call that never started is
    /// sent again elsewhere). A refused request (too large, not serialisable) is
    /// unregistered and returned as an error; a dead pipe fails every call in flight,
    /// this one included, which [`PendingCall::settled`] then reports. A pipelined
    /// call is not written to a worker known to be lost.
    async fn send(&mut self, args: Value) -> Result<Sent, Error> {
        let request = Request {
            id: self.id,
            command: self.command.clone(),
            args,
        };
        let frame = match encode_frame(&request, self.worker.conn.max_frame_bytes) {
            Ok(frame) => frame,
            Err(error) => {
                self.unregister();
                let reason = match error {
                    FrameError::TooLarge { len, max } => {
                        format!("request of {len} bytes exceeds the {max}-byte frame limit")
                    }
                    other => other.to_string(),
                };
                return Err(Error::InvalidRequest {
                    command: self.command.clone(),
                    reason,
                });
            }
        };
        let conn = &self.worker.conn;
        let at_once = {
            let mut pending = conn.pending.lock().expect("pending calls poisoned");
            // Under the lock the line is kept under, so the line's order is the pipe's,
            // and a call never joins the line of a worker found lost.
            if self.in_line && self.worker.is_lost() {
                drop(pending);
                self.unregister();
                return Ok(Sent::Unwritten(request));
            }
            if conn.input.push(frame).is_err() {
                drop(pending);
                return Ok(self.unwritten(request).await);
            }
            // From here on the request counts as sent.
            self.stage = Stage::Sent;
            if self.in_line {
                pending.sent_in_line(self.id)
            } else {
                pending.len() == 1
            }
        };
        // A call alone on its worker is written now; one behind others goes with the
        // next batch.
        if !at_once {
            conn.input.flush_soon();
        } else if conn.input.flush().is_err() {
            return Ok(self.unwritten(request).await);
        }
        Ok(Sent::Written(request))
    }

    /// The worker's input failed before the request was (wholly) written: the worker
    /// never had it, and every call in flight fails with the worker.
    async fn unwritten(&mut self, request: Request) -> Sent {
        self.stage = Stage::Sent;
        self.worker.crash().await;
        Sent::Unwritten(request)
    }

    /// The call's outcome (cancel-safe: waiting can be given up and resumed).
    async fn settled(&mut self) -> Settled {
        let rx = self.rx.as_mut().expect("receiver kept until settled");
        let settled = self.worker.wait_for(rx).await;
        self.stage = Stage::Done;
        settled
    }

    /// The call ran past its timeout: cancel it if it can be cancelled and the worker
    /// confirms in time; else kill the worker.
    async fn timed_out(mut self, timeout: Duration) -> Error {
        let worker = self.worker.name();
        if self.cancellable && self.worker.send_frame(&Cancel::of(self.id)).await.is_ok() {
            let grace = Deadline::now() + CANCEL_GRACE;
            if tokio::time::timeout_at(grace, self.settled()).await.is_ok() {
                return Error::RequestTimeout {
                    worker,
                    command: self.command.clone(),
                    timeout,
                    killed: false,
                };
            }
        }
        self.stage = Stage::Done;
        tracing::warn!(worker = %worker, command = %self.command, ?timeout, "call ran past its timeout; worker killed");
        self.worker.kill_after_timeout(&self.command);
        Error::RequestTimeout {
            worker,
            command: self.command.clone(),
            timeout,
            killed: true,
        }
    }
}

impl PendingCall {
    /// The caller cancelled the (cancellable) call: ask the worker to cancel it and
    /// wait for its answer within the grace period; a worker that does not answer is
    /// killed. A reply that was already on its way stands.
    async fn cancel(mut self, worker: &Worker) -> Result<(Value, Option<JournalHint>), Error> {
        let cancelled = Error::Cancelled {
            worker: worker.name(),
            command: self.command.clone(),
        };
        if worker.send_frame(&Cancel::of(self.id)).await.is_ok() {
            let grace = Deadline::now() + CANCEL_GRACE;
            match tokio::time::timeout_at(grace, self.settled()).await {
                Ok(Settled::Reply(
                    Reply {
                        outcome: Err(remote),
                        ..
                    },
                    _,
                )) if remote.kind == "Cancelled" => return Err(cancelled),
                Ok(settled) => return worker.outcome(&self.command, settled),
                Err(_) => {}
            }
        }
        self.stage = Stage::Done;
        worker.kill_after_timeout(&self.command);
        Err(cancelled)
    }
}

/// `timeout` from now; a timeout too large to add is as good as none.
fn deadline_after(timeout: Duration) -> Deadline {
    Deadline::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Deadline::now() + FOREVER)
}

/// Waits for `wait(value)` when there is a value; never resolves otherwise.
async fn when_some<'a, T, F: Future<Output = ()>>(
    value: Option<&'a T>,
    wait: impl FnOnce(&'a T) -> F,
) {
    match value {
        Some(value) => wait(value).await,
        None => std::future::pending().await,
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        match self.stage {
            Stage::Done => {}
            Stage::Registered => self.unregister(),
            Stage::Sent => {
                let (worker, id) = (self.worker.clone(), self.id);
                let (cancellable, command) = (self.cancellable, self.command.clone());
                let (mut deadline, timeout) = (self.deadline, self.timeout);
                let Some(mut rx) = self.rx.take() else {
                    return;
                };
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    worker.kill_after_timeout(&command);
                    return;
                };
                runtime.spawn(async move {
                    if cancellable && worker.send_frame(&Cancel::of(id)).await.is_ok() {
                        deadline = deadline.min(Deadline::now() + CANCEL_GRACE);
                    }
                    loop {
                        let wait = tokio::time::timeout_at(deadline, worker.wait_for(&mut rx));
                        if wait.await.is_ok() {
                            return;
                        }
                        match worker.deadline_in_line(id, timeout) {
                            Some(later) if later > Deadline::now() => deadline = later,
                            _ => break,
                        }
                    }
                    tracing::warn!(worker = %worker.name(), command, "a call its caller left ran past its timeout; worker killed");
                    worker.kill_after_timeout(&command);
                });
            }
        }
    }
}
