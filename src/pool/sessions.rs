//! Session routing: pinning a session to one worker, replaying its journal on a new
//! worker when the old one is gone, and closing it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::Error;
use crate::metrics::Counter;
use crate::pool::scheduler::Lease;
use crate::pool::{PoolEvent, Shared};
use crate::protocol::JournalHint;
use crate::session::JournalEntry;

/// The pool's record of one open session.
#[derive(Debug)]
pub(crate) struct SessionEntry {
    /// Distinguishes this session from an earlier one with the same id.
    pub epoch: u64,
    /// The worker the session is pinned to.
    pub worker: Option<Arc<str>>,
    /// The session lost its worker: replay the journal before the next call.
    pub replay_pending: bool,
    pub created: Instant,
    pub last_used: Instant,
    /// Serialises the session's calls, in the order they were made.
    pub order: Arc<tokio::sync::Mutex<()>>,
}

/// Where a session's next call goes.
enum Route {
    /// To this worker.
    Pinned(Arc<str>),
    /// No worker is running: take the first one free and pin to it.
    AnyFree,
}

fn journal_error(session_id: &str, error: impl std::fmt::Display) -> Error {
    Error::SessionRebuildFailed {
        session_id: session_id.to_owned(),
        source: Box::new(Error::InvalidRequest {
            command: "journal".into(),
            reason: error.to_string(),
        }),
    }
}

impl Shared {
    /// Opens (or returns the open) session `id`: its epoch and ordering lock.
    pub(crate) fn open_session(&self, id: &str) -> (u64, Arc<tokio::sync::Mutex<()>>) {
        let mut st = self.lock();
        if let Some(entry) = st.sessions.get(id) {
            return (entry.epoch, entry.order.clone());
        }
        st.next_epoch += 1;
        let epoch = st.next_epoch;
        let order = Arc::new(tokio::sync::Mutex::new(()));
        let now = Instant::now();
        st.sessions.insert(
            Arc::from(id),
            SessionEntry {
                epoch,
                worker: None,
                replay_pending: false,
                created: now,
                last_used: now,
                order: order.clone(),
            },
        );
        (epoch, order)
    }

    /// Picks the session's worker, pinning it to the least-loaded one if it has none.
    fn route(&self, id: &str, epoch: u64) -> Result<Route, Error> {
        let mut st = self.lock();
        if st.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let closed = || Error::SessionClosed {
            session_id: id.to_owned(),
        };
        let entry = st
            .sessions
            .get_mut(id)
            .filter(|e| e.epoch == epoch)
            .ok_or_else(closed)?;
        entry.last_used = Instant::now();
        if let Some(worker) = &entry.worker {
            return Ok(Route::Pinned(worker.clone()));
        }
        let best = st
            .slots
            .iter()
            .filter(|(_, s)| !s.retire)
            .min_by_key(|(_, s)| (s.recycling, s.sessions, s.busy))
            .map(|(id, _)| id.clone());
        let Some(worker) = best else {
            return Ok(Route::AnyFree);
        };
        self.pin(&mut st, id, &worker);
        Ok(Route::Pinned(worker))
    }

    fn pin(&self, st: &mut crate::pool::scheduler::State, session: &str, worker: &Arc<str>) {
        if let Some(slot) = st.slots.get_mut(worker) {
            slot.sessions += 1;
        }
        if let Some(entry) = st.sessions.get_mut(session) {
            entry.worker = Some(worker.clone());
        }
    }

    /// Checks out the session's worker, rebuilding the session there first if needed.
    async fn session_lease(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<Lease, Error> {
        loop {
            let lease = match self.route(id, epoch)? {
                Route::Pinned(worker) => match self.checkout(Some(&worker)).await? {
                    Some(lease) => lease,
                    None => continue,
                },
                Route::AnyFree => {
                    let mut lease = self
                        .checkout(None)
                        .await?
                        .expect("plain checkouts are never rerouted");
                    let worker: Arc<str> = Arc::from(lease.worker().id());
                    let mut st = self.lock();
                    let still_unpinned = st
                        .sessions
                        .get(id)
                        .is_some_and(|e| e.epoch == epoch && e.worker.is_none());
                    if still_unpinned && st.slots.contains_key(&worker) {
                        self.pin(&mut st, id, &worker);
                    }
                    drop(st);
                    lease
                }
            };
            let mut lease = lease;
            if !lease.worker().is_usable() {
                // Died or misbehaved while idle: nothing was sent to it. Route again.
                continue;
            }
            let pending = self
                .lock()
                .sessions
                .get(id)
                .is_some_and(|e| e.epoch == epoch && e.replay_pending);
            if pending {
                match self.replay(id, &mut lease, timeout).await {
                    Ok(()) => {
                        if let Some(entry) = self.lock().sessions.get_mut(id) {
                            entry.replay_pending = false;
                        }
                    }
                    Err(error) if error.lost_worker() => continue,
                    Err(error) => {
                        return Err(Error::SessionRebuildFailed {
                            session_id: id.to_owned(),
                            source: Box::new(error),
                        });
                    }
                }
            }
            return Ok(lease);
        }
    }

    /// Replays the session's journal on the leased worker.
    async fn replay(&self, id: &str, lease: &mut Lease, timeout: Duration) -> Result<(), Error> {
        let entries = self
            .journal
            .entries(id)
            .await
            .map_err(|e| journal_error(id, e))?;
        if entries.is_empty() {
            return Ok(());
        }
        for entry in &entries {
            lease
                .worker()
                .call(&entry.command, entry.args.clone(), timeout)
                .await?;
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

    /// One call in session `id`: on its worker, journaled if the command mutates
    /// session state.
    pub(crate) async fn session_call(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        command: &str,
        mut args: Value,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let Some(map) = args.as_object_mut() else {
            return Err(Error::InvalidRequest {
                command: command.to_owned(),
                reason: "arguments must be a JSON object".into(),
            });
        };
        map.insert("session_id".into(), json!(id));
        let mut lease = self.session_lease(id, epoch, timeout).await?;
        let worker = lease.worker();
        let mutates = worker.manifest().mutates_session(command);
        let original = mutates.then(|| args.clone());
        let result = worker.call_with_hint(command, args, timeout).await;
        drop(lease);
        let (value, hint) = result?;
        if let Some(args) = original {
            let entry = match hint {
                Some(JournalHint { command, mut args }) => {
                    if let Some(map) = args.as_object_mut() {
                        map.insert("session_id".into(), json!(id));
                    }
                    JournalEntry { command, args }
                }
                None => JournalEntry {
                    command: command.to_owned(),
                    args,
                },
            };
            self.journal
                .append(id, entry)
                .await
                .map_err(|e| journal_error(id, e))?;
        }
        Ok(value)
    }

    /// Closes session `id` (only the given epoch, if any): frees its state on its
    /// worker and drops its journal. Closing a closed session does nothing.
    pub(crate) async fn close_session(
        self: &Arc<Self>,
        id: &str,
        epoch: Option<u64>,
    ) -> Result<(), Error> {
        let worker = {
            let mut st = self.lock();
            let matches = st
                .sessions
                .get(id)
                .is_some_and(|e| epoch.is_none_or(|ep| ep == e.epoch));
            if !matches {
                return Ok(());
            }
            let entry = st.sessions.remove(id).expect("checked above");

            entry.worker.filter(|w| {
                st.slots.get_mut(w).is_some_and(|slot| {
                    slot.sessions = slot.sessions.saturating_sub(1);
                    slot.manifest.has_command("cleanup_session")
                })
            })
        };
        if let Some(worker) = worker
            && let Ok(Some(mut lease)) = self.checkout(Some(&worker)).await
        {
            let args = json!({"session_id": id});
            let timeout = self.config.request_timeout;
            if let Err(error) = lease.worker().call("cleanup_session", args, timeout).await {
                tracing::warn!(session = id, %error, "cleanup_session failed");
            }
        }
        self.journal
            .remove(id)
            .await
            .map_err(|e| journal_error(id, e))?;
        Ok(())
    }

    /// Sessions idle past the TTL and not in a call: `(id, epoch)`.
    pub(crate) fn expired_sessions(&self, ttl: Duration) -> Vec<(Arc<str>, u64)> {
        let now = Instant::now();
        self.lock()
            .sessions
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_used) >= ttl && e.order.try_lock().is_ok())
            .map(|(id, e)| (id.clone(), e.epoch))
            .collect()
    }
}
