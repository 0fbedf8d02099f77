//! Session journals: the calls that rebuild a session's state on a new worker.
//!
//! A journal records, in order, each successful call to a command whose manifest flag
//! says `mutates_session`. When the session's commands are covered by snapshots, the
//! pool replaces the journal so far by one snapshot entry (a `restore_session` call)
//! every so many entries or bytes, so a journal stays short however long its session
//! lives; a rebuild replays the snapshot and the entries after it.
//!
//! A journal sits behind [`SessionJournal`], which knows nothing of the pool, so that
//! a durable store, or one shared between hosts, can back it. Journals are keyed by
//! session id and epoch (the pool gives each session it opens a new, greater epoch): a
//! write for an epoch older than the journal's is refused, and one for a newer epoch
//! starts the journal afresh, so nothing written for a closed session can reach a
//! later session under the same id.

mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use memory::MemoryJournal;

/// One journaled call: replaying the entries in order rebuilds the session's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The command.
    pub command: String,
    /// Its arguments, `session_id` included, as they were sent.
    pub args: Value,
}

impl JournalEntry {
    /// The entry's size as it is counted against the journal's limits: its command
    /// and its arguments as JSON.
    pub fn size(&self) -> usize {
        self.command.len() + serde_json::to_vec(&self.args).map_or(0, |v| v.len())
    }
}

/// What a journal holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    /// Entries after the snapshot (all of them without one).
    pub entries: usize,
    /// Their size in bytes ([`JournalEntry::size`]).
    pub bytes: usize,
    /// The snapshot entry's size, if the journal starts with one.
    pub snapshot_bytes: Option<usize>,
}

/// A failure of the journal's backing store.
#[derive(Debug, thiserror::Error)]
#[error("session journal: {0}")]
pub struct JournalError(pub String);

/// Where session journals are kept.
#[async_trait]
pub trait SessionJournal: Send + Sync + std::fmt::Debug {
    /// Appends one entry to the journal of session `id` in `epoch`; returns what the
    /// journal holds then. An older epoch than the journal's is refused; a newer one
    /// drops what the journal held before.
    async fn append(
        &self,
        id: &str,
        epoch: u64,
        entry: JournalEntry,
    ) -> Result<JournalStats, JournalError>;
    /// The session's snapshot (if any) and entries, oldest first; empty for another
    /// epoch than the journal's.
    async fn entries(&self, id: &str, epoch: u64) -> Result<Vec<Arc<JournalEntry>>, JournalError>;
    /// Replaces the snapshot (if any) and the first `replaced` entries after it by
    /// `snapshot`, which holds the state they built.
    async fn compact(
        &self,
        id: &str,
        epoch: u64,
        snapshot: JournalEntry,
        replaced: usize,
    ) -> Result<JournalStats, JournalError>;
    /// What the journal of session `id` in `epoch` holds.
    async fn stats(&self, id: &str, epoch: u64) -> Result<JournalStats, JournalError>;
    /// Forgets the session's journal: of `epoch` only, if given.
    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<(), JournalError>;
}
