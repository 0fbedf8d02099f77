//! Session routing: pinning a session to one worker, rebuilding it on a new worker
//! (within bounds) when the old one is gone, and closing it.
//!
//! A session call first waits for its worker in the caller's future: a caller that
//! goes away while queued never touches a worker. From then on the call runs on a
//! task of its own (rebuild, call, journal append), so it finishes, and its journal
//! entry is kept, even if the caller is gone (a cancellable command whose stream's
//! reader left is cancelled, and a cancelled call is not journaled).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::OwnedMutexGuard;

use crate::error::Error;
use crate::journal::{JournalEntry, JournalError, JournalErrorKind};
use crate::metrics::Counter;
use crate::pool::scheduler::{Lease, Mode, State};
use crate::pool::{PoolEvent, SessionCall, SessionState, Shared, detached};
use crate::protocol::JournalHint;

/// Where a session's next call goes.
enum Route {
    /// To this worker.
    Pinned(Arc<str>),
    /// No worker is running: take the first one free and pin to it.
    AnyFree,
}

/// Why a rebuild failed: the journal entry being replayed, if any, and the error.
struct ReplayFailure {
    entry: Option<(usize, String)>,
    error: Error,
}

/// The pool's error for a journal store's failure in session `session_id`.
pub(crate) fn journal_error(session_id: &str, error: JournalError) -> Error {
    let session_id = session_id.to_owned();
    let reason = error.message;
    match error.kind {
        JournalErrorKind::Moved => Error::SessionMoved { session_id, reason },
        JournalErrorKind::Unavailable | JournalErrorKind::Refused => {
            Error::JournalUnavailable { session_id, reason }
        }
    }
}

impl Shared {
    /// Opens (or returns the open) session `id`: its epoch and ordering lock.
    pub(crate) fn open_session(
        &self,
        id: &str,
    ) -> Result<(u64, Arc<tokio::sync::Mutex<()>>), Error> {
        let mut st = self.lock();
        if st.shutting_down {
            return Err(Error::ShuttingDown);
        }
        st.sessions
            .open(id, self.config.max_sessions, self.journal.durable())
    }

    /// Before the first call of a session opened on a durable store: takes over the
    /// journal the store holds under its id, if any (the session is then rebuilt from
    /// it), or checks there is room in the store for one more session.
    async fn take_over_stored(&self, id: &str, epoch: u64) -> Result<(), Error> {
        let due = self
            .lock()
            .sessions
            .get_mut(id, epoch)
            .is_some_and(|e| std::mem::take(&mut e.look_up_store));
        if !due {
            return Ok(());
        }
        let adopted = self.journal.adopt(id, epoch).await;
        let mut st = self.lock();
        let Some(entry) = st.sessions.get_mut(id, epoch) else {
            return Ok(());
        };
        match adopted {
            Ok(Some(stored)) => {
                entry.journal = stored.stats;
                entry.replay_pending = true;
                entry.fresh = false;
                let age = std::time::SystemTime::now()
                    .duration_since(stored.created)
                    .unwrap_or_default();
                entry.created = Instant::now().checked_sub(age).unwrap_or(entry.created);
                Ok(())
            }
            Ok(None) => {
                let limit = self.config.max_stored_sessions;
                if self.journal.session_count() < limit {
                    return Ok(());
                }
                if let Some((_, gate)) = st.sessions.remove(id, Some(epoch)) {
                    st.sessions.closed(id, gate);
                }
                Err(Error::TooManySessions { limit })
            }
            Err(error) => {
                entry.look_up_store = true;
                Err(journal_error(id, error))
            }
        }
    }

    /// Picks the session's worker, pinning it to the least-loaded one if it has none.
    fn route(&self, id: &str, epoch: u64) -> Result<Route, Error> {
        let mut st = self.lock();
        if st.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let entry = st
            .sessions
            .get_mut(id, epoch)
            .ok_or_else(|| Error::SessionClosed {
                session_id: id.to_owned(),
            })?;
        if let Some(broken) = &entry.broken {
            return Err(broken.clone());
        }
        let pinned = entry.worker.clone();
        st.sessions.touch(id, epoch);
        if let Some(worker) = pinned {
            return Ok(Route::Pinned(worker));
        }
        let best = st
            .slots
            .iter()
            .filter(|(_, s)| !s.retire)
            .min_by_key(|(_, s)| (s.recycling, s.pinned.len(), s.in_flight))
            .map(|(id, _)| id.clone());
        let Some(worker) = best else {
            return Ok(Route::AnyFree);
        };
        pin(&mut st, id, epoch, &worker);
        Ok(Route::Pinned(worker))
    }

    /// Waits for capacity in `mode` on the session's worker (pinning the session
    /// first if needed).
    async fn session_checkout(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        mode: Mode,
    ) -> Result<Lease, Error> {
        loop {
            let lease = match self.route(id, epoch)? {
                Route::Pinned(worker) => match self.checkout(Some(&worker), mode).await? {
                    Some(lease) => lease,
                    None => continue,
                },
                Route::AnyFree => {
                    let lease = self
                        .checkout(None, mode)
                        .await?
                        .expect("plain checkouts are never rerouted");
                    let worker: Arc<str> = Arc::from(lease.worker().id());
                    let mut st = self.lock();
                    let still_unpinned = st
                        .sessions
                        .get_mut(id, epoch)
                        .is_some_and(|e| e.worker.is_none());
                    if still_unpinned && st.slots.contains_key(&worker) {
                        pin(&mut st, id, epoch, &worker);
                    }
                    drop(st);
                    lease
                }
            };
            if lease.worker().is_usable() {
                return Ok(lease);
            }
            // Died or misbehaved while idle: nothing was sent to it. Route again.
        }
    }

    fn replay_pending(&self, id: &str, epoch: u64) -> bool {
        self.lock()
            .sessions
            .get_mut(id, epoch)
            .is_some_and(|e| e.replay_pending)
    }

    /// Rebuilds the session on the leased worker if it lost its worker: under the
    /// pool's rebuild deadline (not the call's timeout), on at most
    /// `max_rebuild_attempts` workers. A session that cannot be rebuilt is marked
    /// broken: its calls fail at once until it is closed.
    async fn rebuild_if_pending(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        mut lease: Lease,
    ) -> Result<Lease, Error> {
        let started = Instant::now();
        let deadline = started + self.config.rebuild_timeout;
        let mut attempts = 0;
        while self.replay_pending(id, epoch) {
            attempts += 1;
            let failure = match self.replay(id, epoch, &mut lease, deadline).await {
                Ok(()) => {
                    if let Some(entry) = self.lock().sessions.get_mut(id, epoch) {
                        entry.replay_pending = false;
                        entry.rebuilds += 1;
                    }
                    self.metrics.record_rebuild(started.elapsed());
                    break;
                }
                // The store failing is not the session's fault: it stays due for a
                // rebuild, by its next call.
                Err(ReplayFailure {
                    error: error @ (Error::JournalUnavailable { .. } | Error::SessionMoved { .. }),
                    ..
                }) => return Err(error),
                Err(failure) => failure,
            };
            let retry = failure.error.lost_worker()
                && attempts < self.config.max_rebuild_attempts
                && Instant::now() < deadline;
            if retry {
                tracing::warn!(session = id, attempt = attempts, error = %failure.error, "session rebuild lost its worker; trying another");
                drop(lease);
                lease = self.session_checkout(id, epoch, Mode::Exclusive).await?;
                continue;
            }
            let (entry, entry_command) = failure.entry.unzip();
            let error = Error::SessionRebuildFailed {
                session_id: id.to_owned(),
                entry,
                entry_command,
                source: Box::new(failure.error),
            };
            tracing::error!(session = id, attempts, %error, "session given up: it cannot be rebuilt");
            if let Some(entry) = self.lock().sessions.get_mut(id, epoch) {
                entry.broken = Some(error.clone());
            }
            return Err(error);
        }
        Ok(lease)
    }

    /// Replays the session's journal on the leased worker, each entry within what is
    /// left of `deadline`.
    async fn replay(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        lease: &mut Lease,
        deadline: Instant,
    ) -> Result<(), ReplayFailure> {
        let entries = match self.journal.entries(id, epoch).await {
            Ok(entries) => entries,
            Err(e) => {
                return Err(ReplayFailure {
                    entry: None,
                    error: self.journal_failed(id, epoch, e, false).await,
                });
            }
        };
        // A journal read back from a store may hold commands no snapshot covers: then it
        // must never be compacted, or their part of the state would be lost.
        let manifest = lease.worker().manifest().clone();
        let uncovered = entries
            .iter()
            .find(|e| e.command() != "restore_session" && !manifest.snapshot_covers(e.command()));
        if let Some(entry) = uncovered
            && let Some(session) = self.lock().sessions.get_mut(id, epoch)
        {
            session
                .unsnapshotted
                .get_or_insert_with(|| manifest.describe_command(entry.command()));
        }
        for (index, entry) in entries.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let failed = |error| ReplayFailure {
                entry: Some((index, entry.command().to_owned())),
                error,
            };
            if left.is_zero() {
                return Err(failed(Error::RequestTimeout {
                    worker: lease.worker().name(),
                    command: entry.command().to_owned(),
                    timeout: self.config.rebuild_timeout,
                    killed: false,
                }));
            }
            lease
                .worker()
                .call(entry.command(), entry.args(), left)
                .await
                .map_err(failed)?;
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.metrics.bump(Counter::SessionRebuild);
        tracing::info!(session = id, worker = %lease.worker().name(), replayed = entries.len(), "session rebuilt from its journal");
        self.notify(PoolEvent::SessionRebuilt {
            session_id: Arc::from(id),
            worker: Arc::from(lease.worker().id()),
            replayed: entries.len(),
        });
        Ok(())
    }

    /// Starts one call in session `id`, holding the session's `turn`: waits for the
    /// session's worker, then returns the rest of the call (rebuild if due, the call,
    /// its journal entry if the command mutates session state) to run on a task of
    /// its own, and what the call finds the session to be.
    pub(crate) async fn start_session_call(
        self: &Arc<Self>,
        id: &Arc<str>,
        epoch: u64,
        turn: OwnedMutexGuard<()>,
        call: SessionCall,
    ) -> Result<
        (
            impl Future<Output = Result<Value, Error>> + Send + 'static,
            SessionState,
        ),
        Error,
    > {
        let SessionCall {
            command,
            mut args,
            timeout,
            control,
        } = call;
        let Some(map) = args.as_object_mut() else {
            return Err(Error::InvalidRequest {
                command,
                reason: "arguments must be a JSON object".into(),
            });
        };
        map.insert("session_id".into(), json!(&**id));
        self.take_over_stored(id, epoch).await?;
        match self.journal.renew(id, epoch).await {
            Ok(()) => {}
            // Moved while idle here: nothing of this call ran yet, so it follows the
            // session, taking it over again once the other node lets go.
            Err(error) if error.kind == JournalErrorKind::Moved => {
                self.let_go(id, epoch, &error.message, true).await;
                self.take_over_stored(id, epoch).await?;
            }
            Err(error) => return Err(journal_error(id, error)),
        }
        // A rebuild replays on the worker alone; the call itself overlaps others if
        // its command may.
        let rebuild = self.replay_pending(id, epoch);
        let mode = if rebuild {
            Mode::Exclusive
        } else {
            self.mode_of(&command)
        };
        self.check_journal_room(id, epoch, &command)?;
        let lease = self.session_checkout(id, epoch, mode).await?;
        let fresh = self
            .lock()
            .sessions
            .get_mut(id, epoch)
            .is_some_and(|entry| std::mem::take(&mut entry.fresh));
        let state = match (fresh, rebuild) {
            (true, _) => SessionState::Created,
            (false, true) => SessionState::Rebuilt,
            (false, false) => SessionState::Resumed,
        };
        let shared = self.clone();
        let id = id.clone();
        let run = async move {
            let _turn = turn;
            let lease = shared.rebuild_if_pending(&id, epoch, lease).await?;
            let worker = lease.worker().clone();
            let mutates = worker.manifest().mutates_session(&command);
            let original = mutates.then(|| args.clone());
            let result = worker
                .call_controlled(&command, args, timeout, None, control)
                .await;
            drop(lease);
            let (value, hint) = result?;
            if let Some(args) = original {
                let entry = match hint {
                    Some(JournalHint { command, mut args }) => {
                        if let Some(map) = args.as_object_mut() {
                            map.insert("session_id".into(), json!(&*id));
                        }
                        JournalEntry::new(command, &args)
                    }
                    None => JournalEntry::new(command, &args),
                };
                shared.journal_call(&id, epoch, &worker, entry).await?;
            }
            Ok(value)
        };
        Ok((run, state))
    }

    /// Closes session `id` (only the given epoch, if any): frees its state on its
    /// worker and drops its journal. Closing a closed session does nothing. Returns
    /// whether the session was open (in the pool or, on a durable store, only there).
    pub(crate) async fn close_session(
        self: &Arc<Self>,
        id: &str,
        epoch: Option<u64>,
    ) -> Result<bool, Error> {
        if let Some(closing) = self.take_session(id, epoch) {
            return self.clean_up_session(id, closing).await.map(|()| true);
        }
        if epoch.is_some() || !self.journal.durable() {
            return Ok(false);
        }
        // Only the store holds it (if anything does): a session opened under its id
        // meanwhile waits for its first call until the journal is gone.
        let gate = self.lock().sessions.close_gate(Arc::from(id));
        let removed = self.journal.remove(id, None).await;
        self.lock().sessions.closed(id, gate);
        removed.map_err(|e| journal_error(id, e))
    }

    /// Takes session `id` (only the given epoch, if any) out of the table, so its
    /// calls fail with `SessionClosed` from now on; `None` if it was not open. A
    /// session opened again under its id waits until [`Shared::clean_up_session`] is
    /// done with the returned [`Closing`].
    pub(crate) fn take_session(&self, id: &str, epoch: Option<u64>) -> Option<Closing> {
        let mut st = self.lock();
        let (entry, gate) = st.sessions.remove(id, epoch)?;
        let worker = entry.worker.filter(|w| {
            st.slots.get_mut(w).is_some_and(|slot| {
                slot.pinned.remove(id);
                slot.manifest.has_command("cleanup_session")
            })
        });
        Some(Closing {
            epoch: entry.epoch,
            by_id: epoch.is_none(),
            worker,
            gate,
        })
    }

    /// Drops the journal of a session taken out of the table, then has its worker
    /// free its state; then its id is free for a new session's calls.
    pub(crate) async fn clean_up_session(
        self: &Arc<Self>,
        id: &str,
        closing: Closing,
    ) -> Result<(), Error> {
        // The journal goes first: a session opened again under this id starts empty.
        let epoch = (!closing.by_id).then_some(closing.epoch);
        let removed = self
            .journal
            .remove(id, epoch)
            .await
            .map(drop)
            .map_err(|e| journal_error(id, e));
        if removed.is_ok() {
            self.free_on_worker(id, closing).await;
        } else {
            self.lock().sessions.closed(id, closing.gate);
        }
        removed
    }

    /// Has the worker of a session taken out of the table free its state; then its id
    /// is free for a new session's calls.
    async fn free_on_worker(self: &Arc<Self>, id: &str, closing: Closing) {
        if let Some(worker) = &closing.worker {
            self.free_state(worker, id).await;
        }
        self.lock().sessions.closed(id, closing.gate);
    }

    /// Has `worker` free session `id`'s state (`cleanup_session`, run to its end even
    /// if the caller goes away); a failure is logged.
    async fn free_state(self: &Arc<Self>, worker: &Arc<str>, id: &str) {
        let Ok(Some(lease)) = self.checkout_internal(Some(worker), Mode::Exclusive).await else {
            return;
        };
        let args = json!({"session_id": id});
        let timeout = self.config.request_timeout;
        let cleanup =
            detached(async move { lease.worker().call("cleanup_session", args, timeout).await });
        if let Err(error) = cleanup.await {
            tracing::warn!(session = id, %error, "cleanup_session failed");
        }
    }

    /// The pool's error for a journal store's failure in session `id` (of `epoch`).
    /// When another node owns the session now, this one lets go of its copy first
    /// (see [`Shared::let_go`]; `free_state`: have its worker free the state, which
    /// the caller must not hold a lease on).
    pub(crate) async fn journal_failed(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        error: JournalError,
        free_state: bool,
    ) -> Error {
        if error.kind == JournalErrorKind::Moved {
            self.let_go(id, epoch, &error.message, free_state).await;
        }
        journal_error(id, error)
    }

    /// Another node owns session `id` now: this node unpins it, has its worker free
    /// its state (with `free_state`), and its next call here takes it over again from
    /// the store (waiting for the other node's lease), rebuilding it.
    async fn let_go(self: &Arc<Self>, id: &str, epoch: u64, reason: &str, free_state: bool) {
        let worker = {
            let mut st = self.lock();
            let Some(entry) = st.sessions.get_mut(id, epoch) else {
                return;
            };
            let worker = entry.worker.clone();
            if let Some(worker) = &worker {
                if let Some(slot) = st.slots.get_mut(worker) {
                    slot.pinned.remove(id);
                }
                st.sessions.unpin(worker, [Arc::from(id)]);
            }
            if let Some(entry) = st.sessions.get_mut(id, epoch) {
                entry.replay_pending = false;
                entry.look_up_store = true;
            }
            worker
        };
        self.metrics.bump(Counter::SessionMoved);
        tracing::warn!(
            session = id,
            reason,
            "another node owns the session now; this node let go of its copy"
        );
        if let Some(worker) = worker.filter(|_| free_state) {
            self.free_state(&worker, id).await;
        }
    }

    /// Up to `most` sessions idle past the TTL and not in a call, oldest first:
    /// `(id, epoch)`.
    pub(crate) fn expired_sessions(&self, ttl: Duration, most: usize) -> Vec<(Arc<str>, u64)> {
        self.lock().sessions.expired(ttl, most)
    }
}

/// A session taken out of the table whose state is yet to be freed.
pub(crate) struct Closing {
    epoch: u64,
    /// Closed by id, whatever its epoch: whatever the store holds under the id goes
    /// (the session may not have taken its stored journal over yet).
    by_id: bool,
    /// The worker holding its state, if it can clean it up.
    worker: Option<Arc<str>>,
    /// Held until the clean-up is done (see [`SessionTable::remove`]).
    gate: tokio::sync::OwnedMutexGuard<()>,
}

/// Pins session `id` (of `epoch`) to `worker`.
fn pin(st: &mut State, id: &str, epoch: u64, worker: &Arc<str>) {
    if st.sessions.pin(id, epoch, worker)
        && let Some(slot) = st.slots.get_mut(worker)
    {
        slot.pinned.insert(Arc::from(id));
    }
}
