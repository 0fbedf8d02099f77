//! The pool's books of open sessions: which worker each is pinned to, when each was
//! last used, and the limit on how many may be open.
//!
//! Sessions are kept ordered by id (for paging through them) and indexed by last use
//! (so expiring idle ones looks only at those past their TTL). Every operation is
//! logarithmic in the number of sessions or linear in what it returns; none scans the
//! whole table. Runs under the pool's lock and never awaits.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::journal::JournalStats;

/// The longest session id, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 256;

/// Checks a session id: 1 to [`MAX_SESSION_ID_BYTES`] bytes, no control characters.
pub(crate) fn check_session_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("a session id must not be empty".into());
    }
    if id.len() > MAX_SESSION_ID_BYTES {
        return Err(format!(
            "a session id is at most {MAX_SESSION_ID_BYTES} bytes, this one has {}",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(format!(
            "a session id must not contain control characters, found {c:?}"
        ));
    }
    Ok(())
}

/// The pool's record of one open session.
#[derive(Debug)]
pub(crate) struct SessionEntry {
    /// Distinguishes this session from an earlier one with the same id.
    pub epoch: u64,
    /// The worker the session is pinned to.
    pub worker: Option<Arc<str>>,
    /// The session lost its worker: replay the journal before the next call.
    pub replay_pending: bool,
    /// The session could not be rebuilt: its calls fail with this error until it is
    /// closed.
    pub broken: Option<Error>,
    pub created: Instant,
    pub last_used: Instant,
    /// Serialises the session's calls, in the order they were made.
    pub order: Arc<tokio::sync::Mutex<()>>,
    /// What its journal holds, as of its last write.
    pub journal: JournalStats,
    /// The first journaled command no session snapshot covers: the journal cannot be
    /// compacted and grows up to its limit.
    pub unsnapshotted: Option<String>,
    /// Compaction is not tried again before the journal holds this many entries (after
    /// a snapshot failed); 0 when it may be tried whenever it is due.
    pub compact_not_before: usize,
    /// No call of the session has started yet.
    pub fresh: bool,
    /// Times it was rebuilt on a new worker.
    pub rebuilds: u32,
    /// When its journal was last compacted into a snapshot.
    pub compacted_at: Option<Instant>,
    /// Being evicted from its worker (picked by [`SessionTable::idle_resident`]).
    pub evicting: bool,
    /// The durable store may hold this id's journal from before (the session left the
    /// pool's memory when it was evicted, or the server restarted): its first call
    /// takes it over.
    pub look_up_store: bool,
}

/// All open sessions.
#[derive(Debug, Default)]
pub(crate) struct SessionTable {
    entries: BTreeMap<Arc<str>, SessionEntry>,
    /// `(last_used, epoch, id)` of every entry, oldest first.
    by_last_use: BTreeSet<(Instant, u64, Arc<str>)>,
    /// The same for the entries pinned to a worker (whose state a worker holds).
    resident: BTreeSet<(Instant, u64, Arc<str>)>,
    /// Ids whose closed session's state is still being freed on its worker: locked
    /// until it is. A session opened again under such an id takes the lock as its turn,
    /// so its first call waits for the clean-up (which would otherwise wipe it).
    closing: std::collections::HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>,
    next_epoch: u64,
}

impl SessionTable {
    /// Open sessions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Opens session `id` unless open (then returns the open one), within `limit`.
    /// With `look_up_store`, its first call looks for a journal the store holds
    /// under its id.
    pub fn open(
        &mut self,
        id: &str,
        limit: usize,
        look_up_store: bool,
    ) -> Result<(u64, Arc<tokio::sync::Mutex<()>>), Error> {
        if let Some(entry) = self.entries.get(id) {
            return Ok((entry.epoch, entry.order.clone()));
        }
        check_session_id(id).map_err(|reason| Error::InvalidRequest {
            command: "session".into(),
            reason,
        })?;
        if self.entries.len() >= limit {
            return Err(Error::TooManySessions { limit });
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let order = self
            .closing
            .get(id)
            .cloned()
            .unwrap_or_else(|| Arc::new(tokio::sync::Mutex::new(())));
        let now = Instant::now();
        let id: Arc<str> = Arc::from(id);
        self.by_last_use.insert((now, epoch, id.clone()));
        self.entries.insert(
            id,
            SessionEntry {
                epoch,
                worker: None,
                replay_pending: false,
                broken: None,
                created: now,
                last_used: now,
                order: order.clone(),
                journal: JournalStats::default(),
                unsnapshotted: None,
                compact_not_before: 0,
                fresh: true,
                rebuilds: 0,
                compacted_at: None,
                evicting: false,
                look_up_store,
            },
        );
        Ok((epoch, order))
    }

    /// Sessions opened from now on get epochs greater than `epoch` (the greatest one
    /// a durable store holds, for a pool starting on it).
    pub fn start_after(&mut self, epoch: u64) {
        self.next_epoch = self.next_epoch.max(epoch);
    }

    /// Entries and bytes (snapshots included) of every open session's journal.
    pub fn journal_totals(&self) -> (usize, usize) {
        self.entries.values().fold((0, 0), |(entries, bytes), e| {
            let snapshot = e.journal.snapshot_bytes.unwrap_or(0);
            (
                entries + e.journal.entries,
                bytes + e.journal.bytes + snapshot,
            )
        })
    }

    /// The open session `id`, whatever its epoch.
    pub fn get(&self, id: &str) -> Option<&SessionEntry> {
        self.entries.get(id)
    }

    /// The open session `id` with its id as the table holds it.
    pub fn get_key_value(&self, id: &str) -> Option<(&Arc<str>, &SessionEntry)> {
        self.entries.get_key_value(id)
    }

    /// The open session `id` if it is still the one of `epoch`.
    pub fn get_mut(&mut self, id: &str, epoch: u64) -> Option<&mut SessionEntry> {
        self.entries.get_mut(id).filter(|e| e.epoch == epoch)
    }

    /// Marks session `id` (of `epoch`) as used now.
    pub fn touch(&mut self, id: &str, epoch: u64) {
        let Some((key, entry)) = self.entries.get_key_value(id) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        let key = key.clone();
        let entry = self.entries.get_mut(id).expect("looked up above");
        let now = Instant::now();
        let old = (entry.last_used, entry.epoch, key.clone());
        self.by_last_use.remove(&old);
        if self.resident.remove(&old) {
            self.resident.insert((now, epoch, key.clone()));
        }
        entry.last_used = now;
        self.by_last_use.insert((now, epoch, key));
    }

    /// Pins session `id` (of `epoch`) to `worker`; returns whether it is open.
    pub fn pin(&mut self, id: &str, epoch: u64, worker: &Arc<str>) -> bool {
        let Some((key, entry)) = self.entries.get_key_value(id) else {
            return false;
        };
        if entry.epoch != epoch {
            return false;
        }
        let slot = (entry.last_used, entry.epoch, key.clone());
        let entry = self.entries.get_mut(id).expect("looked up above");
        entry.worker = Some(worker.clone());
        self.resident.insert(slot);
        true
    }

    /// The sessions whose stored journal this pool took over (or started): `(id,
    /// epoch, time since last use)`.
    pub fn taken_over(&self) -> Vec<(Arc<str>, u64, Duration)> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.look_up_store)
            .map(|(id, e)| (id.clone(), e.epoch, e.last_used.elapsed()))
            .collect()
    }

    /// Picks sessions pinned to a worker, idle for at least `idle`, not in a call and
    /// not already being evicted, for eviction: up to `most` of `(id, epoch, worker)`,
    /// oldest first. Each stays marked `evicting` until [`SessionTable::evicted`].
    pub fn idle_resident(&mut self, idle: Duration, most: usize) -> Vec<(Arc<str>, u64, Arc<str>)> {
        let Some(cutoff) = Instant::now().checked_sub(idle) else {
            return Vec::new();
        };
        let picked: Vec<(Arc<str>, u64, Arc<str>)> = self
            .resident
            .iter()
            .take_while(|(used, _, _)| *used <= cutoff)
            .filter_map(|(_, epoch, id)| {
                let entry = self.entries.get(id)?;
                let worker = entry.worker.clone()?;
                let free = !entry.evicting && entry.order.try_lock().is_ok();
                free.then(|| (id.clone(), *epoch, worker))
            })
            .take(most)
            .collect();
        for (id, _, _) in &picked {
            if let Some(entry) = self.entries.get_mut(id) {
                entry.evicting = true;
            }
        }
        picked
    }

    /// The eviction of session `id` (of `epoch`) is over, whatever its outcome.
    pub fn evicted(&mut self, id: &str, epoch: u64) {
        if let Some(entry) = self.get_mut(id, epoch) {
            entry.evicting = false;
        }
    }

    /// Removes session `id` (only of `epoch`, if given). Its id stays closing, and a
    /// session opened again under it waits, until the returned guard is dropped (once
    /// the removed session's state is freed on its worker).
    pub fn remove(
        &mut self,
        id: &str,
        epoch: Option<u64>,
    ) -> Option<(SessionEntry, tokio::sync::OwnedMutexGuard<()>)> {
        let (key, entry) = self.entries.get_key_value(id)?;
        if epoch.is_some_and(|e| e != entry.epoch) {
            return None;
        }
        let key = key.clone();
        let slot = (entry.last_used, entry.epoch, key.clone());
        self.by_last_use.remove(&slot);
        self.resident.remove(&slot);
        let guard = self.close_gate(key);
        self.entries.remove(id).map(|entry| (entry, guard))
    }

    /// Keeps id `id` closing until the returned guard is dropped (see
    /// [`SessionTable::remove`]): for closing a session only the store holds.
    pub fn close_gate(&mut self, id: Arc<str>) -> tokio::sync::OwnedMutexGuard<()> {
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let guard = gate.clone().try_lock_owned().expect("a new lock is free");
        self.closing.insert(id, gate);
        guard
    }

    /// Lets session `id` (of `epoch`), just evicted from its worker, leave the table
    /// too, its journal being in a durable store, unless a handle on it is held or a
    /// call of it waits (anything holding its ordering lock besides the table and the
    /// evicting caller's `turn`). Returns whether it left.
    pub fn forget_evicted(&mut self, id: &str, epoch: u64) -> bool {
        let Some((key, entry)) = self.entries.get_key_value(id) else {
            return false;
        };
        if entry.epoch != epoch || entry.worker.is_some() || Arc::strong_count(&entry.order) > 2 {
            return false;
        }
        let slot = (entry.last_used, entry.epoch, key.clone());
        self.by_last_use.remove(&slot);
        self.resident.remove(&slot);
        self.entries.remove(id);
        true
    }

    /// The clean-up behind `guard` (from [`SessionTable::remove`]) is done: id `id` is
    /// no longer closing (unless closed again since).
    pub fn closed(&mut self, id: &str, guard: tokio::sync::OwnedMutexGuard<()>) {
        if self
            .closing
            .get(id)
            .is_some_and(|gate| Arc::ptr_eq(gate, tokio::sync::OwnedMutexGuard::mutex(&guard)))
        {
            self.closing.remove(id);
        }
    }

    /// Up to `most` sessions idle for at least `ttl` and not in a call: `(id,
    /// epoch)`, oldest first.
    pub fn expired(&self, ttl: Duration, most: usize) -> Vec<(Arc<str>, u64)> {
        let Some(cutoff) = Instant::now().checked_sub(ttl) else {
            return Vec::new();
        };
        self.by_last_use
            .iter()
            .take_while(|(used, _, _)| *used <= cutoff)
            .filter(|(_, _, id)| {
                self.entries
                    .get(id)
                    .is_some_and(|e| e.order.try_lock().is_ok())
            })
            .map(|(_, epoch, id)| (id.clone(), *epoch))
            .take(most)
            .collect()
    }

    /// Up to `limit` sessions with ids after `after`, in id order.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Iterator<Item = (&Arc<str>, &SessionEntry)> {
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        self.entries
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
    }

    /// Unpins `sessions` from `worker` (gone, or no longer holding them): each is
    /// rebuilt from its journal before its next call.
    pub fn unpin(&mut self, worker: &str, sessions: impl IntoIterator<Item = Arc<str>>) {
        for id in sessions {
            if let Some(entry) = self.entries.get_mut(&id)
                && entry.worker.as_deref() == Some(worker)
            {
                entry.worker = None;
                entry.replay_pending = true;
                self.resident.remove(&(entry.last_used, entry.epoch, id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(check_session_id("user-42").is_ok());
        assert!(check_session_id(&"x".repeat(MAX_SESSION_ID_BYTES)).is_ok());
        assert!(check_session_id(&"x".repeat(MAX_SESSION_ID_BYTES + 1)).is_err());
        assert!(check_session_id("").is_err());
        assert!(check_session_id("a\nb").is_err());
        assert!(check_session_id("a\u{7}b").is_err());
        assert!(check_session_id("ünïcode ok").is_ok());
    }

    #[test]
    fn the_limit_counts_open_sessions_and_reopening_is_free() {
        let mut table = SessionTable::default();
        table.open("a", 2, false).unwrap();
        table.open("b", 2, false).unwrap();
        table.open("a", 2, false).unwrap();
        assert!(matches!(
            table.open("c", 2, false),
            Err(Error::TooManySessions { limit: 2 })
        ));
        table.remove("a", None).unwrap();
        table.open("c", 2, false).unwrap();
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn pages_follow_id_order_and_expiry_follows_last_use() {
        let mut table = SessionTable::default();
        for id in ["d", "b", "a", "c"] {
            table.open(id, 10, false).unwrap();
        }
        let first: Vec<_> = table.page(None, 2).map(|(id, _)| id.to_string()).collect();
        assert_eq!(first, ["a", "b"]);
        let next: Vec<_> = table
            .page(Some("b"), 2)
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(next, ["c", "d"]);
        let epoch_b = table.get("b").unwrap().epoch;
        table.touch("b", epoch_b);
        let expired: Vec<_> = table
            .expired(Duration::ZERO, 10)
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(expired.last().map(String::as_str), Some("b"));
        let epoch_a = table.get("a").unwrap().epoch;
        assert!(table.remove("a", Some(epoch_a + 100)).is_none());
        assert!(table.remove("a", Some(epoch_a)).is_some());
        assert_eq!(table.expired(Duration::ZERO, 10).len(), 3);
        assert_eq!(table.expired(Duration::ZERO, 2).len(), 2);
    }
}
