//! A session's journal as calls change the session: each such call journaled, the
//! journal compacted into a snapshot when it is due and every command in it has one,
//! and calls refused once a journal that cannot be compacted is full.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::Error;
use crate::journal::JournalEntry;
use crate::metrics::Counter;
use crate::pool::Shared;
use crate::worker::Worker;

impl Shared {
    /// Refuses a call that would change session state when the session's journal is
    /// full and cannot be compacted.
    pub(crate) fn check_journal_room(
        &self,
        id: &str,
        epoch: u64,
        command: &str,
    ) -> Result<(), Error> {
        let mutates = self
            .manifest
            .get()
            .is_some_and(|m| m.mutates_session(command));
        let limits = self.config.journal_limits;
        let mut st = self.lock();
        let Some(entry) = st.sessions.get_mut(id, epoch) else {
            return Ok(());
        };
        if !mutates || !limits.full(&entry.journal) {
            return Ok(());
        }
        let reason = match &entry.unsnapshotted {
            Some(command) => format!(
                "{command} changes session state and no session snapshot covers it; add \
                 session_snapshot / session_restore hooks to its module, or close the session"
            ),
            None => "its snapshots keep failing (see the server log); close the session".into(),
        };
        Err(Error::JournalFull {
            session_id: id.to_owned(),
            entries: entry.journal.entries,
            bytes: entry.journal.bytes,
            max_entries: limits.max_entries,
            max_bytes: limits.max_bytes,
            reason,
        })
    }

    /// Journals a call that changed session `id`'s state (served by `worker`), then
    /// compacts the journal into a snapshot if it is due and can be.
    pub(crate) async fn journal_call(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        worker: &Worker,
        entry: JournalEntry,
    ) -> Result<(), Error> {
        // Only an uncovered command is described (for the journal-full message).
        let uncovered = (!worker.manifest().snapshot_covers(entry.command()))
            .then(|| worker.manifest().describe_command(entry.command()));
        let started = std::time::Instant::now();
        let appended = self.journal.append(id, epoch, entry).await;
        let stats = match appended {
            Ok(stats) => stats,
            // Closed meanwhile (and perhaps opened again): its write has nowhere to go,
            // and the store rightly refused it.
            Err(_) if self.lock().sessions.get_mut(id, epoch).is_none() => return Ok(()),
            Err(error) => return Err(self.journal_failed(id, epoch, error, true).await),
        };
        self.metrics.record_journal_write(started.elapsed());
        let limits = self.config.journal_limits;
        let compact = {
            let mut st = self.lock();
            st.sessions.get_mut(id, epoch).map(|session| {
                session.journal = stats;
                if session.unsnapshotted.is_none() {
                    session.unsnapshotted = uncovered;
                }
                session.unsnapshotted.is_none()
                    && limits.compaction_due(&stats)
                    && stats.entries >= session.compact_not_before
            })
        };
        match compact {
            // Closed meanwhile: whatever was written for it goes too.
            None => {
                let _ = self.journal.remove(id, Some(epoch)).await;
            }
            Some(true) => {
                let worker_id: Arc<str> = Arc::from(worker.id());
                self.compact(id, epoch, &worker_id, stats.entries).await;
            }
            Some(false) => {}
        }
        Ok(())
    }

    /// Replaces the first `entries` of the session's journal (all it holds: the
    /// caller holds the session's turn) by a snapshot taken on `worker`. A failure is
    /// logged, and compaction is tried again after as many entries more.
    pub(crate) async fn compact(
        self: &Arc<Self>,
        id: &str,
        epoch: u64,
        worker: &Arc<str>,
        entries: usize,
    ) {
        let snapshot = match self.take_snapshot(id, worker).await {
            Ok(parts) => JournalEntry::new(
                "restore_session",
                &json!({"session_id": id, "parts": parts}),
            ),
            Err(error) => {
                tracing::warn!(session = id, %error, "session snapshot failed; the journal keeps growing");
                let retry_at = entries + self.config.journal_limits.compact_entries;
                if let Some(session) = self.lock().sessions.get_mut(id, epoch) {
                    session.compact_not_before = retry_at;
                }
                return;
            }
        };
        let started = std::time::Instant::now();
        let compacted = self.journal.compact(id, epoch, snapshot, entries).await;
        self.metrics.record_journal_write(started.elapsed());
        match compacted {
            Ok(stats) => {
                self.metrics.bump(Counter::JournalCompaction);
                if let Some(session) = self.lock().sessions.get_mut(id, epoch) {
                    session.journal = stats;
                    session.compact_not_before = 0;
                    session.compacted_at = Some(std::time::Instant::now());
                }
            }
            Err(error) => {
                tracing::warn!(session = id, %error, "journal compaction failed");
                self.journal_failed(id, epoch, error, true).await;
            }
        }
    }

    /// The session's state on `worker`, as `snapshot_session` gives it.
    async fn take_snapshot(self: &Arc<Self>, id: &str, worker: &Arc<str>) -> Result<Value, Error> {
        let mode = self.mode_of("snapshot_session");
        let Some(lease) = self.checkout_internal(Some(worker), mode).await? else {
            return Err(Error::InvalidRequest {
                command: "snapshot_session".into(),
                reason: format!("worker {worker} left the pool"),
            });
        };
        let args = json!({"session_id": id});
        let timeout = self.config.request_timeout;
        let mut reply = lease
            .worker()
            .call("snapshot_session", args, timeout)
            .await?;
        match reply.get_mut("parts").map(Value::take) {
            Some(parts @ Value::Object(_)) => Ok(parts),
            _ => Err(Error::UnexpectedResult {
                command: "snapshot_session".into(),
                reason: format!("expected {{\"parts\": {{...}}}}, got {reply}"),
            }),
        }
    }
}
