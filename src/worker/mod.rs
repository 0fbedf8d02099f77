//! One Python worker process: spawn, handshake, one call at a time, stderr, kill.
//!
//! A [`Worker`] knows nothing about other workers. Whoever holds it `&mut` owns its
//! channel; a call either returns the worker's answer or leaves the worker marked
//! [`Worker::is_lost`] (killed, crashed or out of protocol), never half-used.

mod exit;
mod manifest;
mod pid;
pub mod spawn;
mod stderr;
pub mod zygote;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

pub use exit::{ExitInfo, ExitReporter, ExitWatch};
pub use manifest::{CommandInfo, Manifest};
pub use pid::Pid;
pub use spawn::{WorkerProgram, WorkerSpec};
pub use stderr::StderrTail;

use crate::error::Error;
use crate::protocol::{FrameError, HANDSHAKE_ID, HostCodec, JournalHint, Request};

/// How long to wait for a dead worker's exit status and last stderr lines.
const POST_MORTEM_WAIT: Duration = Duration::from_millis(500);

/// How long a reply may take to surface after its worker exited.
const EXITED_REPLY_GRACE: Duration = Duration::from_millis(50);

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

/// The request a worker is serving: what an abandoned call must wait for.
#[derive(Debug)]
struct InFlight {
    id: u64,
    deadline: tokio::time::Instant,
}

/// A started, handshaken worker process.
pub struct Worker {
    id: Arc<str>,
    pid: Pid,
    input: Option<FramedWrite<WorkerInput, HostCodec>>,
    output: FramedRead<WorkerOutput, HostCodec>,
    exit: ExitWatch,
    stderr: StderrTail,
    manifest: Arc<Manifest>,
    next_id: u64,
    calls_served: u64,
    started_at: Instant,
    lost: bool,
    /// A request was sent and its reply not yet read: the worker cannot take another
    /// call until [`Worker::finish_abandoned`] has read (and dropped) that reply.
    in_flight: Option<InFlight>,
    stop_grace: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("calls_served", &self.calls_served)
            .field("lost", &self.lost)
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
        let startup_failed = |reason: String, stderr_tail: String| Error::StartupFailed {
            worker: id.to_owned(),
            reason,
            stderr_tail,
        };
        let RawProcess {
            pid,
            stdin,
            stdout,
            stderr,
            exit,
        } = process;
        let stderr = StderrTail::drain(stderr, id.to_owned(), spec.stderr_lines);
        let mut worker = Worker {
            id: Arc::from(id),
            pid,
            input: Some(FramedWrite::new(
                stdin,
                HostCodec::new(spec.max_frame_bytes),
            )),
            output: FramedRead::new(stdout, HostCodec::new(spec.max_frame_bytes)),
            exit,
            stderr,
            manifest: Arc::new(Manifest::default()),
            next_id: HANDSHAKE_ID + 1,
            calls_served: 0,
            started_at: Instant::now(),
            lost: false,
            in_flight: None,
            stop_grace: spec.stop_grace,
        };
        let hello = Request {
            id: HANDSHAKE_ID,
            command: "ping".to_owned(),
            args: json!({"initialization": true, "worker_id": id}),
        };
        match worker.exchange(&hello, spec.startup_timeout).await {
            Ok((result, _)) => {
                worker.manifest = Arc::new(Manifest::from_handshake(&result));
                Ok(worker)
            }
            Err(error) => {
                worker.kill();
                let stderr_tail = worker.stderr.settled_snapshot(POST_MORTEM_WAIT).await;
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
                Err(startup_failed(reason, stderr_tail))
            }
        }
    }

    /// The pool-assigned id, e.g. `w3`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The OS process id (also the id of its process group).
    pub fn pid(&self) -> u32 {
        self.pid.get()
    }

    /// What the worker said about itself in the handshake.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Calls answered by this worker so far (handshake excluded).
    pub fn calls_served(&self) -> u64 {
        self.calls_served
    }

    /// When the worker became ready.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// The worker's recent stderr lines.
    pub fn stderr_tail(&self) -> String {
        self.stderr.snapshot()
    }

    /// True once the worker was killed, died, or broke the protocol: it must not be
    /// used again.
    pub fn is_lost(&self) -> bool {
        self.lost || self.in_flight.is_some() || self.exit.exited()
    }

    /// Checks, without waiting, that an idle worker is fit for a call: alive, and not
    /// having written anything nobody asked for (a second reply, stray bytes, end of
    /// output). An unfit worker is killed, so the caller can take another one before
    /// sending anything to this one.
    pub fn is_usable(&mut self) -> bool {
        if self.is_lost() {
            return false;
        }
        let problem = match self.output.next().now_or_never() {
            // Nothing whole arrived; but part of a frame is no better.
            None if self.output.read_buffer().is_empty() && !self.output.decoder().mid_frame() => {
                return true;
            }
            None => "wrote part of a frame while idle".to_owned(),
            Some(Some(Ok(reply))) => format!("sent a reply nobody asked for (id {})", reply.id),
            Some(Some(Err(error))) => format!("wrote bytes while idle: {error}"),
            Some(None) => "closed its output".to_owned(),
        };
        tracing::warn!(worker = %self.name(), %problem, "idle worker is unfit; killed");
        self.kill();
        false
    }

    /// Sends one request and waits up to `timeout` for its reply.
    ///
    /// On timeout the worker is killed, so a late reply can never reach another caller.
    pub async fn call(
        &mut self,
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
        &mut self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        if !args.is_object() {
            return Err(Error::InvalidRequest {
                command: command.to_owned(),
                reason: "arguments must be a JSON object".into(),
            });
        }
        let request = Request {
            id: self.next_id,
            command: command.to_owned(),
            args,
        };
        self.next_id += 1;
        let result = self.exchange(&request, timeout).await;
        if !self.is_lost() {
            self.calls_served += 1;
        }
        result
    }

    async fn exchange(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        let command = request.command.as_str();
        if self.is_lost() {
            return Err(self.crashed(command).await);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.send_and_receive(request, deadline)).await {
            Ok(result) => result,
            Err(_) => {
                self.kill();
                Err(Error::RequestTimeout {
                    worker: self.name(),
                    command: command.to_owned(),
                    timeout,
                })
            }
        }
    }

    async fn send_and_receive(
        &mut self,
        request: &Request,
        deadline: tokio::time::Instant,
    ) -> Result<(Value, Option<JournalHint>), Error> {
        let command = request.command.as_str();
        let input = self.input.as_mut().expect("input open while not lost");
        // Once the frame is in the writer's buffer the request counts as sent: were
        // the call abandoned from here on, its reply must still be read before anyone
        // else uses the worker.
        let sent = match input.feed(request).await {
            Ok(()) => {
                self.in_flight = Some(InFlight {
                    id: request.id,
                    deadline,
                });
                input.flush().await
            }
            Err(error) => Err(error),
        };
        match sent {
            Ok(()) => {}
            Err(FrameError::TooLarge { len, max }) => {
                return Err(Error::InvalidRequest {
                    command: command.to_owned(),
                    reason: format!("request of {len} bytes exceeds the {max}-byte frame limit"),
                });
            }
            Err(FrameError::Io(_)) => return Err(self.crashed(command).await),
            Err(other) => {
                return Err(Error::InvalidRequest {
                    command: command.to_owned(),
                    reason: other.to_string(),
                });
            }
        }
        let frame = tokio::select! {
            biased;
            frame = self.output.next() => frame,
            _ = self.exit.wait_forever() => {
                // It exited with the request in flight. A reply it wrote just before
                // may still be in the pipe; a grandchild holding the pipe open must not
                // keep us waiting for end of file.
                tokio::time::timeout(EXITED_REPLY_GRACE, self.output.next())
                    .await
                    .unwrap_or_default()
            }
        };
        match frame {
            Some(Ok(reply)) if reply.id == request.id => {
                self.in_flight = None;
                let journal = reply.journal;
                let outcome = reply.outcome.map(|result| (result, journal));
                outcome.map_err(|remote| match remote.kind.as_str() {
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
            Some(Ok(reply)) => Err(self.violation(
                command,
                format!(
                    "reply id {} does not match request id {}",
                    reply.id, request.id
                ),
            )),
            Some(Err(FrameError::Io(_))) | None => Err(self.crashed(command).await),
            Some(Err(error)) => Err(self.violation(command, error.to_string())),
        }
    }

    /// Finishes a call whose caller went away after sending it: sends what is left of
    /// the request, reads its reply within the call's deadline and drops it. Returns
    /// whether the worker is fit for the next call; one that is not (no reply in time,
    /// a wrong reply, a dead process) is killed.
    pub async fn finish_abandoned(&mut self) -> bool {
        let Some(pending) = self.in_flight.take() else {
            return !self.is_lost();
        };
        let outcome = tokio::time::timeout_at(pending.deadline, async {
            if let Some(input) = self.input.as_mut() {
                input.flush().await.map_err(|e| e.to_string())?;
            }
            match self.output.next().await {
                Some(Ok(reply)) if reply.id == pending.id => Ok(()),
                Some(Ok(reply)) => Err(format!(
                    "reply id {} does not match request id {}",
                    reply.id, pending.id
                )),
                Some(Err(error)) => Err(error.to_string()),
                None => Err("closed its output".to_owned()),
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => {
                self.calls_served += 1;
                true
            }
            Ok(Err(problem)) => {
                tracing::warn!(worker = %self.name(), %problem, "abandoned call ended badly; worker killed");
                self.kill();
                false
            }
            Err(_) => {
                tracing::warn!(worker = %self.name(), "abandoned call ran past its timeout; worker killed");
                self.kill();
                false
            }
        }
    }

    /// Whether a call was sent and abandoned before its reply was read (and the
    /// worker is otherwise alive).
    pub fn has_abandoned_call(&self) -> bool {
        self.in_flight.is_some() && !self.lost && !self.exit.exited()
    }

    fn violation(&mut self, command: &str, detail: String) -> Error {
        self.kill();
        tracing::warn!(worker = %self.name(), command, %detail, "protocol violation; worker killed");
        Error::Protocol {
            worker: self.name(),
            command: command.to_owned(),
            detail,
        }
    }

    /// The worker's channel closed: wait briefly for its exit status and stderr tail.
    async fn crashed(&mut self, command: &str) -> Error {
        let status = match self.exit.wait(POST_MORTEM_WAIT).await {
            Some(info) => info.to_string(),
            None => "closed its output while still running; killed".to_owned(),
        };
        // Whatever it started dies with it (a grandchild may hold its pipes).
        self.kill();
        self.input = None;
        Error::WorkerCrashed {
            worker: self.name(),
            command: command.to_owned(),
            status,
            stderr_tail: self.stderr.settled_snapshot(POST_MORTEM_WAIT).await,
        }
    }

    /// `id (pid N)`, as used in messages.
    pub fn name(&self) -> String {
        format!("{} (pid {})", self.id, self.pid)
    }

    /// Kills the worker's whole process group at once. The worker is lost afterwards.
    pub fn kill(&mut self) {
        self.lost = true;
        self.input = None;
        self.pid.signal_group(libc::SIGKILL);
    }

    /// Stops the worker gracefully: close stdin, wait the grace period, `SIGTERM`,
    /// wait again, then `SIGKILL` the group. Returns how the process ended.
    pub async fn stop(mut self) -> Option<ExitInfo> {
        self.input = None;
        if let Some(info) = self.exit.wait(self.stop_grace).await {
            self.pid.signal_group(libc::SIGKILL);
            return Some(info);
        }
        self.pid.signal_group(libc::SIGTERM);
        if let Some(info) = self.exit.wait(self.stop_grace).await {
            self.pid.signal_group(libc::SIGKILL);
            return Some(info);
        }
        self.pid.signal_group(libc::SIGKILL);
        self.exit.wait(self.stop_grace).await
    }

    /// A handle that reports the process's exit, usable after the worker is dropped.
    pub fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker nobody holds any more must not live on.
        if !self.exit.exited() {
            self.pid.signal_group(libc::SIGKILL);
        }
    }
}
