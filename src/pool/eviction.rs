//! Idle sessions leave their workers: after `session_idle` without a call, a session's
//! journal is compacted (if it can be), its state is freed on its worker, and it is
//! unpinned; it stays open, in the journal store, and its next call rebuilds it on any
//! worker. A worker's memory then follows its active sessions, not every session ever
//! opened on it. On a durable store the session leaves the pool's memory as well
//! (unless a [`crate::Session`] handle on it is held): the pool's memory then follows
//! the active sessions too, and the next call under its id takes its journal over.

use std::sync::Arc;

use serde_json::json;

use futures::StreamExt;

use crate::metrics::Counter;
use crate::pool::scheduler::Mode;
use crate::pool::{PoolEvent, Shared};

/// Sessions released at once at shutdown.
const RELEASE_CONCURRENCY: usize = 64;

impl Shared {
    /// Picks up to `most` sessions idle past `idle` that a worker still holds, for
    /// eviction: `(id, epoch, worker)`.
    pub(crate) fn idle_resident_sessions(
        &self,
        idle: std::time::Duration,
        most: usize,
    ) -> Vec<(Arc<str>, u64, Arc<str>)> {
        self.lock().sessions.idle_resident(idle, most)
    }

    /// Evicts session `id` (of `epoch`) from `worker`, unless a call of it is running
    /// or due (its turn is taken) or it moved meanwhile.
    pub(crate) async fn evict_session(
        self: &Arc<Self>,
        id: Arc<str>,
        epoch: u64,
        worker: Arc<str>,
    ) {
        self.try_evict(&id, epoch, &worker).await;
        self.lock().sessions.evicted(&id, epoch);
    }

    /// Lets a durable store know that every session in memory leaves this pool (it is
    /// stopping): their last use is recorded, and nodes sharing the store may take
    /// them over at once instead of waiting for their leases to run out.
    pub(crate) async fn release_sessions(&self) {
        if !self.journal.durable() {
            return;
        }
        let held = self.lock().sessions.taken_over();
        let now = std::time::SystemTime::now();
        futures::stream::iter(held)
            .for_each_concurrent(RELEASE_CONCURRENCY, |(id, epoch, idle)| async move {
                let used = now.checked_sub(idle).unwrap_or(now);
                if let Err(error) = self.journal.release(&id, epoch, used).await {
                    tracing::warn!(session = %id, %error, "releasing a session at shutdown failed");
                }
            })
            .await;
    }

    async fn try_evict(self: &Arc<Self>, id: &Arc<str>, epoch: u64, worker: &Arc<str>) {
        let turn = {
            let mut st = self.lock();
            let Some(entry) = st.sessions.get_mut(id, epoch) else {
                return;
            };
            if entry.worker.as_deref() != Some(&**worker) {
                return;
            }
            let Ok(turn) = entry.order.clone().try_lock_owned() else {
                return;
            };
            let idle = entry.last_used.elapsed();
            (turn, entry.journal, entry.unsnapshotted.is_none(), idle)
        };
        let (_turn, journal, compactable, idle) = turn;
        if compactable && journal.entries > 0 {
            self.compact(id, epoch, worker, journal.entries).await;
        }
        let Ok(Some(lease)) = self.checkout_internal(Some(worker), Mode::Exclusive).await else {
            return;
        };
        let args = json!({"session_id": &**id});
        let cleaned = lease
            .worker()
            .call("cleanup_session", args, self.config.request_timeout)
            .await;
        drop(lease);
        if let Err(error) = cleaned {
            tracing::warn!(session = %id, %error, "evicting an idle session failed; it stays on its worker");
            return;
        }
        {
            let mut st = self.lock();
            if let Some(slot) = st.slots.get_mut(worker) {
                slot.pinned.remove(id);
                // Give back the room of many sessions evicted at once.
                if slot.pinned.capacity() > 64 && slot.pinned.len() * 4 < slot.pinned.capacity() {
                    slot.pinned.shrink_to_fit();
                }
            }
            st.sessions.unpin(worker, [id.clone()]);
        }
        if self.journal.durable() {
            let now = std::time::SystemTime::now();
            let used = now.checked_sub(idle).unwrap_or(now);
            // Out of memory, it is free for another node sharing the store; kept in
            // memory (a handle on it is held), it stays this node's.
            let recorded = if self.lock().sessions.forget_evicted(id, epoch) {
                self.journal.release(id, epoch, used).await
            } else {
                self.journal.touch(id, epoch, used).await
            };
            if let Err(error) = recorded {
                tracing::warn!(session = %id, %error, "recording an evicted session's last use failed");
            }
        }
        self.metrics.bump(Counter::SessionEviction);
        self.notify(PoolEvent::SessionEvicted {
            session_id: id.clone(),
        });
    }
}
