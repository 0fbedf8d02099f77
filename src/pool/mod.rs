//! The pool: owns the workers and routes calls to them.
//!
//! The pool keeps books only. A caller checks a worker out under a short lock, does
//! the call's pipe I/O itself with no lock held, and hands the worker back. A
//! supervisor task replaces lost workers, recycles old ones, pings idle ones and
//! expires idle sessions.

mod config;
mod eviction;
mod journaling;
mod pipelining;
mod reload;
mod retention;
mod scheduler;
mod session_table;
mod sessions;
mod spawner;
mod supervisor;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc};

pub use config::{JournalLimits, PoolBuilder, PoolConfig};
pub use reload::ReloadReport;
pub use session_table::MAX_SESSION_ID_BYTES;
pub use spawner::{SpawnMode, ZygoteStatus};

use crate::call::{CallOptions, CallStream};
use crate::error::{Error, Result};
use crate::journal::{JournalEntry, SessionJournal};
use crate::metrics::{Counter, Metrics, MetricsSnapshot, PoolGauges};
use crate::session::{Opened, Session};
use crate::worker::{CallControl, ChunkSource, ExitInfo, Worker, chunk_channel};
use scheduler::{Lease, Mode, State};
use supervisor::Event;

/// Something that happened in the pool, for observers (see [`Pool::subscribe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// A worker completed its handshake and joined the pool.
    WorkerReady {
        /// Its id.
        worker: Arc<str>,
        /// Its process id.
        pid: u32,
    },
    /// A worker died, timed out or broke the protocol and was removed.
    WorkerLost {
        /// Its id.
        worker: Arc<str>,
        /// Its process id.
        pid: u32,
        /// Its last lines on stderr, as read when it was removed (they may hold
        /// other calls' output: for operators, not callers).
        stderr_tail: String,
    },
    /// A worker's replacement is ready; the worker retires when free.
    WorkerRecycled {
        /// The retiring worker's id.
        worker: Arc<str>,
    },
    /// A worker failed to start.
    WorkerStartFailed {
        /// Why, with its stderr tail.
        reason: String,
    },
    /// A session's journal was replayed on a new worker.
    SessionRebuilt {
        /// The session.
        session_id: Arc<str>,
        /// Its new worker.
        worker: Arc<str>,
        /// Journal entries replayed.
        replayed: usize,
    },
    /// A session was closed by its TTL.
    SessionExpired {
        /// The session.
        session_id: Arc<str>,
    },
    /// An idle session's state was freed on its worker; it stays open and is rebuilt
    /// on its next call.
    SessionEvicted {
        /// The session.
        session_id: Arc<str>,
    },
    /// The zygote is serving: workers are forked from it.
    ZygoteReady {
        /// Its process id.
        pid: u32,
    },
    /// The zygote cannot be used (down, failed to start, or not fork-safe); workers
    /// start fresh meanwhile.
    ZygoteUnavailable {
        /// Why, including the offending threads when not fork-safe.
        reason: String,
    },
}

/// One worker as seen from outside the pool.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct WorkerInfo {
    /// The pool-assigned id.
    pub id: String,
    /// The OS process id.
    pub pid: u32,
    /// `idle`, `busy`, `recycling` or `retiring`.
    pub state: &'static str,
    /// Calls running on it now.
    pub in_flight: usize,
    /// Calls served.
    pub calls_served: u64,
    /// Sessions pinned to it.
    pub sessions: usize,
    /// Resident memory at the last check.
    pub rss_bytes: Option<u64>,
    /// Seconds since it became ready.
    pub age_s: f64,
}

/// One open session as seen from outside the pool.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    /// The session's id.
    pub id: String,
    /// The worker it is pinned to.
    pub worker: Option<String>,
    /// Seconds since it was opened.
    pub age_s: f64,
    /// Seconds since its last call.
    pub idle_s: f64,
    /// Entries in its journal after its snapshot (all of them without one).
    pub journal_entries: usize,
    /// Their size in bytes.
    pub journal_bytes: usize,
    /// The size of the snapshot its journal starts with, if it has one.
    pub snapshot_bytes: Option<usize>,
    /// Seconds since its journal was last compacted into a snapshot.
    pub compacted_s: Option<f64>,
    /// Times it was rebuilt on a new worker (since it was last taken into memory).
    pub rebuilds: u32,
    /// Its state is on no worker: evicted while idle (or its worker lost, or the
    /// server restarted), it is rebuilt from its journal by its next call.
    pub evicted: bool,
}

/// Whether the pool can serve calls now.
#[derive(Clone, Debug, Serialize)]
pub struct PoolHealth {
    /// Workers ready for calls.
    pub ready_workers: usize,
    /// Workers being started.
    pub starting: usize,
    /// Why the last worker start failed, while no worker is running.
    pub start_error: Option<String>,
    /// Whether the pool is shutting down.
    pub shutting_down: bool,
}

impl PoolHealth {
    /// At least one worker is ready and the pool is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready_workers > 0 && !self.shutting_down
    }
}

/// One page of the open sessions, in id order.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct SessionPage {
    /// The sessions.
    pub sessions: Vec<SessionInfo>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next_after: Option<String>,
}

/// Commands only the pool itself sends, whatever a worker's manifest says.
pub const INTERNAL_COMMANDS: &[&str] = &[
    "shutdown",
    "cleanup_session",
    "snapshot_session",
    "restore_session",
];

/// Runs the I/O part of a session call so that a caller who goes away (a dropped
/// future, a disconnected HTTP client) neither kills the worker nor loses a journal
/// entry nor lets the session's next call overtake it: the caller drives the call
/// itself, and if it is dropped before the call ended, the rest of the call goes on
/// in a task of its own (within its timeout) and its reply is dropped. (A plain call
/// needs none of this: its lease finishes an abandoned call by itself.)
pub(crate) async fn detached<T: Send + 'static>(
    call: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let mut call = FinishedIfDropped(Some(Box::pin(call)));
    std::future::poll_fn(|context| {
        let running = call.0.as_mut().expect("polled until it ends");
        let outcome = running.as_mut().poll(context);
        if outcome.is_ready() {
            call.0 = None;
        }
        outcome
    })
    .await
}

/// A call that, dropped before it ended, is finished on a task of its own.
struct FinishedIfDropped<F: Future + Send + 'static>(Option<std::pin::Pin<Box<F>>>);

impl<F: Future + Send + 'static> Drop for FinishedIfDropped<F> {
    fn drop(&mut self) {
        if let Some(call) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                call.await;
            });
        }
    }
}

fn session_info(id: &str, e: &session_table::SessionEntry, now: Instant) -> SessionInfo {
    SessionInfo {
        id: id.to_owned(),
        worker: e.worker.as_deref().map(str::to_owned),
        age_s: now.duration_since(e.created).as_secs_f64(),
        idle_s: now.duration_since(e.last_used).as_secs_f64(),
        journal_entries: e.journal.entries,
        journal_bytes: e.journal.bytes,
        snapshot_bytes: e.journal.snapshot_bytes,
        compacted_s: e.compacted_at.map(|t| now.duration_since(t).as_secs_f64()),
        rebuilds: e.rebuilds,
        evicted: e.worker.is_none() && !e.fresh,
    }
}

/// What a durable journal knows of a session evicted from the pool's memory.
fn stored_session_info(id: &str, stored: &crate::journal::StoredSession) -> SessionInfo {
    let since = |t: std::time::SystemTime| {
        std::time::SystemTime::now()
            .duration_since(t)
            .unwrap_or_default()
            .as_secs_f64()
    };
    SessionInfo {
        id: id.to_owned(),
        worker: None,
        age_s: since(stored.created),
        idle_s: since(stored.last_used),
        journal_entries: stored.stats.entries,
        journal_bytes: stored.stats.bytes,
        snapshot_bytes: stored.stats.snapshot_bytes,
        compacted_s: None,
        rebuilds: 0,
        evicted: true,
    }
}

/// Runs a call on its leased worker; the lease is held until the call settles.
pub(crate) async fn run_leased(
    lease: Lease,
    command: &str,
    args: Value,
    timeout: Duration,
    control: CallControl,
) -> Result<Value> {
    // The lease travels with the call: if this future is dropped mid-call, the worker
    // finishes (or cancels) the call in the background and the capacity comes back
    // when it settles. No task per call on the fast path.
    let worker = lease.worker().clone();
    worker
        .call_controlled(command, args, timeout, lease.into_hold(), control)
        .await
        .map(|(result, _)| result)
}

/// What a session call found its session to be.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// New: the call is its first (the id was not open, or was closed before).
    Created,
    /// Open, with its state on its worker.
    Resumed,
    /// Open, and rebuilt from its journal before the call (its worker was lost, it
    /// was evicted while idle, or the server restarted).
    Rebuilt,
}

impl SessionState {
    /// `created`, `resumed` or `rebuilt`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Created => "created",
            SessionState::Resumed => "resumed",
            SessionState::Rebuilt => "rebuilt",
        }
    }
}

/// A session call's result, with what the call found its session to be.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionReply {
    /// The command's result.
    pub result: Value,
    /// Created, resumed or rebuilt.
    pub state: SessionState,
}

/// A session call as its caller made it.
pub(crate) struct SessionCall {
    pub command: String,
    pub args: Value,
    pub timeout: Duration,
    pub control: CallControl,
}

/// The pool's state at one moment.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    /// Running workers.
    pub workers: Vec<WorkerInfo>,
    /// Workers being started.
    pub starting: usize,
    /// Callers waiting for a worker.
    pub queued: usize,
    /// Open sessions.
    pub sessions: usize,
    /// Whether the pool is shutting down.
    pub shutting_down: bool,
}

/// State shared by the pool handle, its supervisor and leases.
pub(crate) struct Shared {
    pub config: PoolConfig,
    state: Mutex<State>,
    pub metrics: Metrics,
    pub events: mpsc::UnboundedSender<Event>,
    notices: broadcast::Sender<PoolEvent>,
    pub journal: Arc<dyn SessionJournal>,
    /// Signalled whenever workers leave or join, for shutdown to wait on.
    pub changed: Notify,
    pub spawner: spawner::Spawner,
    /// Commands the workers' manifest flags as internal (known after the first
    /// worker is admitted).
    pub internal_commands: OnceLock<BTreeSet<String>>,
    /// The manifest of the first worker admitted (every worker runs the same
    /// program): which commands may overlap.
    pub manifest: OnceLock<Arc<crate::worker::Manifest>>,
    /// How long the calls of each pipelinable command run.
    pub running_times: pipelining::RunningTimes,
    /// A sweep of the journal store for unused sessions is running.
    pub sweeping_store: std::sync::atomic::AtomicBool,
    /// Held by the reload under way.
    pub reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pool state poisoned")
    }

    pub(crate) fn notify(&self, event: PoolEvent) {
        let _ = self.notices.send(event);
    }

    /// What runs when worker `id`'s process exits: tell the supervisor.
    pub(crate) fn exit_hook(&self, id: &Arc<str>) -> impl Fn(ExitInfo) + Clone + Send + 'static {
        let events = self.events.clone();
        let id = id.clone();
        move |info| {
            let _ = events.send(Event::Exited {
                worker: id.clone(),
                info,
            });
        }
    }
}

/// Stops the supervisor when the last pool handle goes away.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shared.events.send(Event::Stop);
    }
}

/// A pool of Python worker processes. Cheap to clone; all clones share the pool.
#[derive(Clone)]
pub struct Pool {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.shared().config.workers)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A builder with default settings.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    pub(crate) async fn start(
        config: PoolConfig,
        journal: Arc<dyn SessionJournal>,
    ) -> Result<Pool> {
        // Stored sessions are taken over lazily, by their next call; only their epochs
        // matter now.
        let max_epoch = journal
            .max_epoch()
            .await
            .map_err(|e| Error::InvalidConfig {
                setting: "journal",
                reason: format!("cannot read the stored sessions: {e}"),
            })?;
        let (events, receiver) = mpsc::unbounded_channel();
        let (notices, _) = broadcast::channel(1024);
        let mut state = State::default();
        state.sessions.start_after(max_epoch);
        let ids: Vec<Arc<str>> = (0..config.workers).map(|_| state.new_worker_id()).collect();
        let spawner = spawner::Spawner::new(config.spawn_mode, &config.worker);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            metrics: Metrics::default(),
            events,
            notices,
            journal,
            changed: Notify::new(),
            spawner,
            internal_commands: OnceLock::new(),
            manifest: OnceLock::new(),
            running_times: pipelining::RunningTimes::default(),
            sweeping_store: std::sync::atomic::AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
        });
        shared.spawner.start_zygote(&shared).await;
        let started = futures::future::join_all(
            ids.iter()
                .map(|id| shared.spawner.launch(&shared, id, shared.exit_hook(id))),
        )
        .await;
        let mut workers = Vec::with_capacity(started.len());
        let mut first_error = None;
        for result in started {
            match result {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    shared.metrics.bump(Counter::WorkerStartFailure);
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            futures::future::join_all(workers.into_iter().map(Worker::stop)).await;
            return Err(error);
        }
        for worker in workers {
            shared.admit(worker);
        }
        tokio::spawn(supervisor::run(shared.clone(), receiver));
        Ok(Pool {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// Calls `command` on any free worker, with the pool's request timeout.
    ///
    /// `args` must be a JSON object without `session_id` (the pool sets that, for
    /// session calls only: [`Error::InvalidRequest`]), and the pool's internal commands
    /// ([`INTERNAL_COMMANDS`] and those a worker flags `internal`) are refused with
    /// [`Error::Forbidden`]. Dropping the returned future while the call waits for a
    /// worker takes it out of the queue; once sent, the call runs to completion (or
    /// its timeout) on its worker and the reply is dropped.
    pub async fn call(&self, command: &str, args: Value) -> Result<Value> {
        let timeout = self.request_timeout();
        self.call_with_timeout(command, args, timeout).await
    }

    /// Calls `command` on any free worker; the worker is killed if it takes longer
    /// than `timeout`.
    pub async fn call_with_timeout(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        self.call_with(command, args, CallOptions::default().timeout(timeout))
            .await
    }

    /// [`Pool::call`] with options: a timeout of its own, a token that cancels it.
    pub async fn call_with(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<Value> {
        let started = Instant::now();
        let timeout = options.timeout.unwrap_or_else(|| self.request_timeout());
        let control = CallControl {
            chunks: None,
            cancel: options.cancel,
        };
        let result = self.run_plain(command, args, timeout, control).await;
        self.finish(command, result, started)
    }

    /// Starts `command` on any free worker and streams its output: resolves once a
    /// worker has the call (refusals and a full queue fail here), then yields the
    /// chunks the handler yields and ends with its result or error. See
    /// [`CallStream`] for pacing and cancellation.
    pub async fn call_stream(&self, command: &str, args: Value) -> Result<CallStream> {
        self.call_stream_with(command, args, CallOptions::default())
            .await
    }

    /// [`Pool::call_stream`] with options.
    pub async fn call_stream_with(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<CallStream> {
        let started = Instant::now();
        let timeout = options.timeout.unwrap_or_else(|| self.request_timeout());
        let checked = self.check_call(command, &args);
        let leased = match checked {
            Ok(()) => self.plain_lease(self.shared().mode_of(command)).await,
            Err(error) => Err(error),
        };
        let lease = match leased {
            Ok(lease) => lease,
            Err(error) => return self.finish(command, Err(error), started),
        };
        let (sink, source) = chunk_channel();
        let control = CallControl {
            chunks: Some(sink),
            cancel: options.cancel,
        };
        let pool = self.clone();
        let command = command.to_owned();
        Ok(CallStream::spawn(source, async move {
            let result = run_leased(lease, &command, args, timeout, control).await;
            pool.finish(&command, result, started)
        }))
    }

    /// Capacity for a plain call of `command` in `mode` on any worker.
    async fn plain_lease(&self, mode: Mode) -> Result<Lease> {
        loop {
            let lease = self
                .shared()
                .checkout(None, mode)
                .await?
                .expect("plain checkouts are never rerouted");
            if lease.worker().is_usable() {
                return Ok(lease);
            }
            // It died or misbehaved while idle, and nothing was sent to it: take
            // another.
        }
    }

    /// Whether calls of `command` can be cancelled: the workers run it as a task of
    /// their event loop (an `async` handler or a generator).
    pub fn is_cancellable(&self, command: &str) -> bool {
        self.shared()
            .manifest
            .get()
            .is_some_and(|m| m.cancellable(command))
    }

    /// Refuses what no caller may send: arguments that are not an object or that
    /// carry their own `session_id`, and the pool's internal commands. [`Pool::call`]
    /// and [`Session::call`] check this themselves; this checks ahead of opening a
    /// session for the call.
    pub fn check_call(&self, command: &str, args: &Value) -> Result<()> {
        let Some(map) = args.as_object() else {
            return Err(Error::InvalidRequest {
                command: command.to_owned(),
                reason: "arguments must be a JSON object".into(),
            });
        };
        if map.contains_key("session_id") {
            return Err(Error::InvalidRequest {
                command: command.to_owned(),
                reason: "`args.session_id` is set by the pool, never by a caller; make a \
                         session call instead (`session_id` beside `args` over HTTP)"
                    .into(),
            });
        }
        let flagged = self
            .shared()
            .internal_commands
            .get()
            .is_some_and(|names| names.contains(command));
        if flagged || INTERNAL_COMMANDS.contains(&command) {
            return Err(Error::Forbidden {
                command: command.to_owned(),
            });
        }
        Ok(())
    }

    /// Counts a call that ended; a call that lost its worker after shutdown's
    /// deadline failed because of the shutdown.
    fn finish<T>(&self, command: &str, result: Result<T>, started: Instant) -> Result<T> {
        let result = match result {
            Err(error) if error.lost_worker() && self.shared().lock().aborting => {
                Err(Error::ShuttingDown)
            }
            other => other,
        };
        let kind = result.as_ref().err().map(Error::kind);
        let metrics = &self.shared().metrics;
        let latency = started.elapsed();
        metrics.record_call(kind, latency);
        metrics.commands.record(command, kind.is_some(), latency);
        result
    }

    pub(crate) async fn session_call(
        &self,
        session: &Session,
        epoch: u64,
        turn: tokio::sync::OwnedMutexGuard<()>,
        call: SessionCall,
    ) -> Result<SessionReply> {
        let started = Instant::now();
        let command = call.command.clone();
        let result = match self
            .shared()
            .start_session_call(&session.id, epoch, turn, call)
            .await
        {
            Ok((run, state)) => detached(run)
                .await
                .map(|result| SessionReply { result, state }),
            Err(error) => Err(error),
        };
        self.finish(&command, result, started)
    }

    /// Starts a session call whose chunks go to `chunks`, once the session's worker
    /// has it.
    pub(crate) async fn session_stream(
        &self,
        session: &Session,
        epoch: u64,
        turn: tokio::sync::OwnedMutexGuard<()>,
        call: SessionCall,
        chunks: ChunkSource,
    ) -> Result<CallStream> {
        let started = Instant::now();
        let command = call.command.clone();
        let (run, state) = match self
            .shared()
            .start_session_call(&session.id, epoch, turn, call)
            .await
        {
            Ok(started) => started,
            Err(error) => return self.finish(&command, Err(error), started),
        };
        let pool = self.clone();
        let stream = CallStream::spawn(
            chunks,
            async move { pool.finish(&command, run.await, started) },
        );
        Ok(stream.in_session(state))
    }

    /// A handle on session `id`, opening it if it is not open. Its calls always go
    /// to one worker, in order. If the session cannot be opened (see [`Session`]),
    /// its calls fail with the reason.
    pub fn session(&self, id: &str) -> Session {
        let opened = self
            .shared()
            .open_session(id)
            .map(|(epoch, order)| Opened { epoch, order });
        Session {
            pool: self.clone(),
            id: Arc::from(id),
            opened,
        }
    }

    /// Whether session `id` is open.
    pub fn has_session(&self, id: &str) -> bool {
        self.shared().lock().sessions.get(id).is_some()
    }

    /// The timeout for a call whose caller asked for `requested`: the pool's request
    /// timeout when it asked for none, else what it asked for within
    /// `min_request_timeout..=max_request_timeout`. A caller can neither kill a
    /// worker with a tiny timeout nor hold one forever with a huge one.
    pub fn client_timeout(&self, requested: Option<Duration>) -> Duration {
        let config = self.config();
        requested.map_or(config.request_timeout, |t| {
            t.clamp(config.min_request_timeout, config.max_request_timeout)
        })
    }

    /// Closes session `id`, whatever handle opened it: its worker frees its state and
    /// its journal is dropped, in memory and in a durable store alike. Closing a
    /// session that is not open does nothing. Returns whether it was open.
    pub async fn close_session(&self, id: &str) -> Result<bool> {
        self.shared().close_session(id, None).await
    }

    pub(crate) async fn close_session_epoch(&self, id: &str, epoch: u64) -> Result<()> {
        self.shared().close_session(id, Some(epoch)).await.map(drop)
    }

    pub(crate) fn session_worker(&self, id: &str) -> Option<String> {
        let st = self.shared().lock();
        st.sessions
            .get(id)
            .and_then(|e| e.worker.as_deref().map(str::to_owned))
    }

    /// Whether the pool can serve calls now, and if not, why.
    pub fn health(&self) -> PoolHealth {
        let st = self.shared().lock();
        PoolHealth {
            ready_workers: st.slots.len(),
            starting: st.starting,
            start_error: st.fatal.as_ref().map(ToString::to_string),
            shutting_down: st.shutting_down,
        }
    }

    /// The zygote's pid, while one serves this pool.
    pub fn zygote_pid(&self) -> Option<u32> {
        self.shared().spawner.zygote_pid()
    }

    /// The zygote's state and the last reason it could not be used.
    pub fn zygote_status(&self) -> ZygoteStatus {
        self.shared().spawner.status()
    }

    /// How workers are started.
    pub fn spawn_mode(&self) -> SpawnMode {
        self.shared().spawner.mode()
    }

    /// The default request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.shared().config.request_timeout
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared().config
    }

    /// A copy of the pool's metrics.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared().metrics.snapshot()
    }

    /// The pool's metrics and state in the Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        let status = self.status();
        let (journal_entries, journal_bytes) = self.shared().lock().sessions.journal_totals();
        let gauges = PoolGauges {
            workers: status.workers.len(),
            busy: status.workers.iter().filter(|w| w.state != "idle").count(),
            starting: status.starting,
            queued: status.queued,
            sessions: status.sessions,
            stored_sessions: self.shared().journal.session_count(),
            journal_entries,
            journal_bytes,
        };
        let node = self.shared().config.node.as_deref();
        self.shared().metrics.prometheus_text(gauges, node)
    }

    /// The journal of open session `id`: its snapshot entry (if compacted) and the
    /// entries after it, oldest first; empty if it is not open.
    pub async fn journal_entries(&self, id: &str) -> Result<Vec<Arc<JournalEntry>>> {
        let Some(epoch) = self.shared().lock().sessions.get(id).map(|e| e.epoch) else {
            return Ok(Vec::new());
        };
        self.shared()
            .journal
            .entries(id, epoch)
            .await
            .map_err(|e| Error::InvalidRequest {
                command: "journal".into(),
                reason: e.to_string(),
            })
    }

    /// Reloads the handler code without dropping a call: a new zygote imports the
    /// code as it is now, then each worker is replaced, one at a time, by one running
    /// it (the old one finishes its calls first; its sessions move to the new workers
    /// through their journals). Fails with [`Error::ReloadFailed`] if the new code does
    /// not import or a new worker cannot start; the workers not yet replaced go on
    /// serving. One reload runs at a time.
    pub async fn reload(&self) -> Result<ReloadReport> {
        self.shared().reload().await
    }

    /// Observes pool events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        self.shared().notices.subscribe()
    }

    /// The workers, queue and sessions right now.
    pub fn status(&self) -> PoolStatus {
        let st = self.shared().lock();
        let now = Instant::now();
        let workers = st
            .slots
            .iter()
            .map(|(id, s)| WorkerInfo {
                id: id.to_string(),
                pid: s.pid,
                state: match (s.retire, s.recycling, s.in_flight > 0) {
                    (true, _, _) => "retiring",
                    (_, true, _) => "recycling",
                    (_, _, true) => "busy",
                    _ => "idle",
                },
                in_flight: s.in_flight,
                calls_served: s.calls,
                sessions: s.pinned.len(),
                rss_bytes: s.rss_bytes,
                age_s: now.duration_since(s.started_at).as_secs_f64(),
            })
            .collect();
        PoolStatus {
            workers,
            starting: st.starting,
            queued: st.queued(),
            sessions: st.sessions.len(),
            shutting_down: st.shutting_down,
        }
    }

    /// The commands callers may send, in name order, with their documentation and
    /// argument schemas, from the manifest of the first worker admitted (every worker
    /// runs the same program; none is known before). Internal commands are left out.
    pub fn commands(&self) -> Vec<crate::worker::CommandInfo> {
        self.shared()
            .manifest
            .get()
            .map(|manifest| {
                manifest
                    .public_commands()
                    .filter(|info| !INTERNAL_COMMANDS.contains(&info.name.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every session in the pool's memory, in id order (see [`Pool::sessions_page`]
    /// for a bounded read). On a durable journal, sessions evicted from their workers
    /// are only in the store: see [`Pool::session_info`].
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions_page(None, usize::MAX).sessions
    }

    /// Session `id`, if it is open: in the pool's memory or, evicted, only in a
    /// durable journal.
    pub async fn session_info(&self, id: &str) -> Result<Option<SessionInfo>> {
        {
            let st = self.shared().lock();
            if let Some((key, entry)) = st.sessions.get_key_value(id) {
                return Ok(Some(session_info(key, entry, Instant::now())));
            }
        }
        let journal = &self.shared().journal;
        if !journal.durable() {
            return Ok(None);
        }
        let stored = journal
            .stored(id)
            .await
            .map_err(|e| crate::pool::sessions::journal_error(id, e))?;
        Ok(stored.map(|stored| stored_session_info(id, &stored)))
    }

    /// Up to `limit` sessions in the pool's memory whose ids come after `after`, in id
    /// order.
    pub fn sessions_page(&self, after: Option<&str>, limit: usize) -> SessionPage {
        let st = self.shared().lock();
        let now = Instant::now();
        let sessions: Vec<SessionInfo> = st
            .sessions
            .page(after, limit)
            .map(|(id, e)| session_info(id, e, now))
            .collect();
        let more = sessions
            .last()
            .is_some_and(|last| st.sessions.page(Some(&last.id), 1).next().is_some());
        let next_after = more
            .then(|| sessions.last().map(|s| s.id.clone()))
            .flatten();
        SessionPage {
            sessions,
            next_after,
        }
    }

    /// Like [`Pool::shutdown`], but calls still running after `deadline` are failed
    /// with [`Error::ShuttingDown`] and their workers killed.
    pub async fn shutdown_within(&self, deadline: Duration) {
        let shutdown = self.shutdown();
        tokio::pin!(shutdown);
        if tokio::time::timeout(deadline, &mut shutdown).await.is_ok() {
            return;
        }
        let busy: Vec<(Arc<str>, u32)> = {
            let mut st = self.shared().lock();
            st.aborting = true;
            st.slots.iter().map(|(id, s)| (id.clone(), s.pid)).collect()
        };
        for (id, pid) in busy {
            tracing::warn!(worker = %id, pid, "still busy at the shutdown deadline; killing it");
            if let Some(pid) = crate::worker::Pid::new(pid) {
                pid.signal_group(libc::SIGKILL);
            }
        }
        shutdown.await;
    }

    /// Stops taking calls, fails queued callers with `ShuttingDown`, lets calls in
    /// flight finish, then stops every worker (stdin close, SIGTERM, SIGKILL).
    pub async fn shutdown(&self) {
        let shared = self.shared();
        let idle = {
            let mut st = shared.lock();
            st.shutting_down = true;
            st.fail_waiters(&Error::ShuttingDown);
            let idle: Vec<Arc<str>> = st
                .slots
                .iter()
                .filter(|(_, s)| s.is_idle())
                .map(|(id, _)| id.clone())
                .collect();
            let mut workers = Vec::with_capacity(idle.len());
            for id in idle {
                if let Some(slot) = st.remove_worker(&id) {
                    st.stopping.push(slot.worker.exit_watch());
                    workers.push(slot.worker);
                }
            }
            workers
        };
        futures::future::join_all(idle.into_iter().map(Worker::stop)).await;
        loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = shared.lock();
                if st.slots.is_empty() && st.starting == 0 {
                    break;
                }
            }
            changed.await;
        }
        shared.spawner.shutdown();
        let stopping = std::mem::take(&mut shared.lock().stopping);
        let grace = shared.config.worker.stop_grace * 3;
        futures::future::join_all(stopping.iter().map(|exit| exit.wait(grace))).await;
        shared.release_sessions().await;
        let _ = shared.events.send(Event::Stop);
    }
}
