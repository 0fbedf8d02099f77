//! The fork server: one Python process that has imported the heavy modules once and
//! forks a ready worker on each request, in milliseconds.
//!
//! The host creates each worker's stdin, stdout and stderr pipes and passes the
//! child's ends to the zygote over a Unix `SOCK_SEQPACKET` socket (`SCM_RIGHTS`). The
//! zygote answers with the child's pid and later reports its exit status. Messages
//! are single JSON datagrams:
//!
//! - zygote → host: `{"op": "ready", "pid", "fork_safe", "threads", "preloaded"}`
//!   once; `{"op": "spawned", "request", "pid"}` or `{"op": "spawn_failed",
//!   "request", "reason", "unsafe"}` per request; `{"op": "exited", "pid", "code" |
//!   "signal"}` per child.
//! - host → zygote: `{"op": "spawn", "request", "worker_id", "argv"}` with three fds.
//!
//! Forked workers get their own process group and a thread watching the host's pid,
//! so they die with the host but outlive a zygote that dies. If the zygote dies, the
//! exits of its orphaned children are seen through their pidfds.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, sendmsg, socketpair,
};
use serde::Deserialize;
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::{
    ExitInfo, ExitReporter, ExitWatch, Pid, RawProcess, StderrTail, WorkerProgram, WorkerSpec,
};

/// The fd number the zygote finds its socket on.
const SOCKET_FD: RawFd = 3;

/// Largest message the zygote sends.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why a fork request did not produce a worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForkError {
    /// The zygote has more than one thread: forking it would be unsafe.
    #[error("the zygote is not fork-safe: {0}")]
    Unsafe(String),
    /// The zygote is gone.
    #[error("the zygote is down: {0}")]
    Down(String),
    /// The zygote tried and failed.
    #[error("the zygote could not fork: {0}")]
    Failed(String),
}

/// What the zygote said when it became ready.
#[derive(Debug, Clone, Deserialize)]
pub struct ZygoteHello {
    /// The zygote's pid.
    pub pid: Pid,
    /// Whether it had a single thread after preloading.
    pub fork_safe: bool,
    /// The threads it found, when not fork-safe.
    #[serde(default)]
    pub threads: Vec<String>,
    /// The modules it imported.
    #[serde(default)]
    pub preloaded: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    op: String,
    #[serde(default)]
    request: u64,
    #[serde(default)]
    pid: Option<Pid>,
    #[serde(default)]
    code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    reason: String,
    #[serde(default, rename = "unsafe")]
    not_fork_safe: bool,
}

type Pending = HashMap<u64, (ExitReporter, oneshot::Sender<Result<Pid, ForkError>>)>;

/// A running zygote and its bookkeeping.
pub struct Zygote {
    socket: AsyncFd<OwnedFd>,
    hello: ZygoteHello,
    pending: Mutex<Pending>,
    exits: Mutex<HashMap<Pid, ExitReporter>>,
    next_request: AtomicU64,
    alive: AtomicBool,
    exit: ExitWatch,
    stderr: StderrTail,
    startup_timeout: Duration,
}

impl std::fmt::Debug for Zygote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote")
            .field("pid", &self.hello.pid)
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

impl Zygote {
    /// Starts a zygote for `spec` (the worker runtime only) and waits until it has
    /// imported its modules.
    pub async fn start(spec: &WorkerSpec) -> Result<Arc<Zygote>, String> {
        let WorkerProgram::Runtime { python, .. } = &spec.program else {
            return Err("a custom worker command cannot be forked from a zygote".into());
        };
        let (host_end, zygote_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        set_nonblocking(&host_end).map_err(|e| format!("socket: {e}"))?;

        let mut argv: Vec<OsString> = vec![
            python.into(),
            "-m".into(),
            "snakepool_worker.zygote".into(),
            "--socket-fd".into(),
            SOCKET_FD.to_string().into(),
        ];
        argv.extend(
            spec.runtime_args("zygote")
                .unwrap_or_default()
                .into_iter()
                .map(OsString::from),
        );
        let mut command = spec.command(&argv);
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let child_fd = zygote_end.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; the new fd 3 is not close-on-exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(child_fd, SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot spawn {argv:?}: {e}"))?;
        drop(zygote_end);
        let pid = super::spawn::child_pid(&child).map_err(|e| format!("zygote: {e}"))?;
        let stderr = StderrTail::drain(
            child.stderr.take().expect("stderr is piped"),
            "zygote".into(),
            spec.stderr_lines,
        );
        let exit = ExitWatch::spawn(child, |_| {});
        // SAFETY: the AsyncFd owns the socket, so its fd stays open and the same.
        let socket = unsafe { AsyncFd::register(host_end) }.map_err(|e| format!("socket: {e}"))?;

        let hello = tokio::time::timeout(spec.startup_timeout, receive(&socket)).await;
        let hello = match hello {
            Ok(Ok(Some(raw))) => serde_json::from_slice::<ZygoteHello>(&raw)
                .map_err(|e| format!("bad hello from the zygote: {e}"))?,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = exit.wait(Duration::from_millis(500)).await;
                let tail = stderr.settled_snapshot(Duration::from_millis(500)).await;
                pid.signal_group(libc::SIGKILL);
                return Err(format!(
                    "the zygote exited while starting ({}); stderr tail:\n{tail}",
                    status.map_or("still running".into(), |s| s.to_string())
                ));
            }
            Err(_) => {
                pid.signal_group(libc::SIGKILL);
                return Err(format!(
                    "the zygote was not ready within {:?}; stderr tail:\n{}",
                    spec.startup_timeout,
                    stderr.snapshot()
                ));
            }
        };
        let zygote = Arc::new(Zygote {
            socket,
            hello,
            pending: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            exit,
            stderr,
            startup_timeout: spec.startup_timeout,
        });
        tokio::spawn(read_messages(zygote.clone()));
        Ok(zygote)
    }

    /// What the zygote said when it became ready.
    pub fn hello(&self) -> &ZygoteHello {
        &self.hello
    }

    /// The zygote's pid.
    pub fn pid(&self) -> u32 {
        self.hello.pid.get()
    }

    /// Whether the zygote is still serving.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.exit.exited()
    }

    /// The zygote's recent stderr lines.
    pub fn stderr_tail(&self) -> String {
        self.stderr.snapshot()
    }

    /// Forks worker `id` running the worker runtime with `args`.
    pub async fn fork(
        &self,
        id: &str,
        args: Vec<String>,
        on_exit: impl FnOnce(ExitInfo) + Send + 'static,
    ) -> Result<RawProcess, ForkError> {
        if !self.is_alive() {
            return Err(ForkError::Down("the zygote has exited".into()));
        }
        if !self.hello.fork_safe {
            return Err(ForkError::Unsafe(self.hello.threads.join(", ")));
        }
        let io = |e: std::io::Error| ForkError::Failed(e.to_string());
        let (stdin_r, stdin_w) = pipe_pair().map_err(io)?;
        let (stdout_r, stdout_w) = pipe_pair().map_err(io)?;
        let (stderr_r, stderr_w) = pipe_pair().map_err(io)?;

        let request = self.next_request.fetch_add(1, Ordering::SeqCst);
        let (watch, reporter) = ExitWatch::channel(on_exit);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("zygote requests poisoned")
            .insert(request, (reporter, tx));
        let message = json!({"op": "spawn", "request": request, "worker_id": id, "argv": args});
        let body = serde_json::to_vec(&message).expect("json");
        let fds = [
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ];
        if let Err(e) = self.send(&body, &fds).await {
            self.pending
                .lock()
                .expect("zygote requests poisoned")
                .remove(&request);
            return Err(ForkError::Down(format!("cannot reach the zygote: {e}")));
        }
        drop((stdin_r, stdout_w, stderr_w));
        let pid = match tokio::time::timeout(self.startup_timeout, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(ForkError::Down("the zygote exited".into())),
            Err(_) => {
                self.pending
                    .lock()
                    .expect("zygote requests poisoned")
                    .remove(&request);
                return Err(ForkError::Failed(format!(
                    "no answer within {:?}",
                    self.startup_timeout
                )));
            }
        };
        let stdin = pipe::Sender::from_owned_fd(stdin_w).map_err(io)?;
        let stdout = pipe::Receiver::from_owned_fd(stdout_r).map_err(io)?;
        let stderr = pipe::Receiver::from_owned_fd(stderr_r).map_err(io)?;
        Ok(RawProcess {
            pid,
            stdin: Box::new(stdin),
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            exit: watch,
        })
    }

    async fn send(&self, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        loop {
            let mut guard = self.socket.writable().await?;
            let sent = guard.try_io(|socket| {
                let iov = [IoSlice::new(body)];
                let rights = [ControlMessage::ScmRights(fds)];
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &iov,
                    &rights,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Stops the zygote (its forked workers live on, owned by the pool).
    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.hello.pid.signal_group(libc::SIGKILL);
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if !self.exit.exited() {
            self.hello.pid.signal_group(libc::SIGKILL);
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// One datagram from the zygote; `None` at end of stream.
async fn receive(socket: &AsyncFd<OwnedFd>) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut guard = socket.readable().await?;
        match guard.try_io(|s| {
            recv(s.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(std::io::Error::from)
        }) {
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(n)) => return Ok(Some(buf[..n].to_vec())),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

async fn read_messages(zygote: Arc<Zygote>) {
    while let Ok(Some(raw)) = receive(&zygote.socket).await {
        let message: Message = match serde_json::from_slice(&raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable message from the zygote");
                continue;
            }
        };
        match message.op.as_str() {
            "spawned" => {
                let entry = zygote
                    .pending
                    .lock()
                    .expect("zygote requests poisoned")
                    .remove(&message.request);
                let Some((reporter, tx)) = entry else {
                    continue;
                };
                let Some(pid) = message.pid else {
                    let reason = "the zygote reported a spawned worker without a valid pid";
                    let _ = tx.send(Err(ForkError::Failed(reason.into())));
                    continue;
                };
                zygote
                    .exits
                    .lock()
                    .expect("zygote exits poisoned")
                    .insert(pid, reporter);
                if tx.send(Ok(pid)).is_err() {
                    // The requester gave up: nobody will own this worker.
                    pid.signal_group(libc::SIGKILL);
                }
            }
            "spawn_failed" => {
                let entry = zygote
                    .pending
                    .lock()
                    .expect("zygote requests poisoned")
                    .remove(&message.request);
                if let Some((_, tx)) = entry {
                    let error = if message.not_fork_safe {
                        ForkError::Unsafe(message.reason)
                    } else {
                        ForkError::Failed(message.reason)
                    };
                    let _ = tx.send(Err(error));
                }
            }
            "exited" => {
                let reporter = message.pid.and_then(|pid| {
                    zygote
                        .exits
                        .lock()
                        .expect("zygote exits poisoned")
                        .remove(&pid)
                });
                if let Some(reporter) = reporter {
                    let info = match (message.code, message.signal) {
                        (Some(code), _) => ExitInfo::Code(code),
                        (None, Some(signal)) => ExitInfo::Signal(signal),
                        _ => ExitInfo::Unknown,
                    };
                    reporter.report(info);
                }
            }
            other => tracing::warn!(op = other, "unknown message from the zygote"),
        }
    }
    zygote.alive.store(false, Ordering::SeqCst);
    tracing::warn!(pid = zygote.hello.pid.get(), "the zygote has exited");
    zygote
        .pending
        .lock()
        .expect("zygote requests poisoned")
        .clear();
    let orphans: Vec<(Pid, ExitReporter)> = zygote
        .exits
        .lock()
        .expect("zygote exits poisoned")
        .drain()
        .collect();
    for (pid, reporter) in orphans {
        tokio::spawn(watch_orphan(pid, reporter));
    }
}

/// Waits for a worker whose zygote is gone to exit, through its pidfd.
async fn watch_orphan(pid: Pid, reporter: ExitReporter) {
    // SAFETY: pidfd_open takes plain integers; a valid result is an fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.get() as libc::pid_t, 0) };
    if fd < 0 {
        reporter.report(ExitInfo::Unknown);
        return;
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the AsyncFd owns the pidfd, so it stays open and the same.
    if let Ok(pidfd) = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
    {
        let _ = pidfd.readable().await;
    }
    reporter.report(ExitInfo::Unknown);
}
