//! Session journals: the calls that rebuild a session's state on a new worker.
//!
//! A journal records, in order, each successful call to a command whose manifest flag
//! says `mutates_session`. It sits behind [`SessionJournal`], which knows nothing of
//! the pool, so that a store shared between hosts can back it.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One journaled call: replaying the entries in order rebuilds the session's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The command.
    pub command: String,
    /// Its arguments, `session_id` included, as they were sent.
    pub args: Value,
}

/// A failure of the journal's backing store.
#[derive(Debug, thiserror::Error)]
#[error("session journal: {0}")]
pub struct JournalError(pub String);

/// Where session journals are kept.
#[async_trait]
pub trait SessionJournal: Send + Sync + std::fmt::Debug {
    /// Appends one entry to the session's journal.
    async fn append(
        &self,
        session_id: &str,
        entry: JournalEntry,
    ) -> std::result::Result<(), JournalError>;
    /// The session's entries, oldest first.
    async fn entries(
        &self,
        session_id: &str,
    ) -> std::result::Result<Vec<JournalEntry>, JournalError>;
    /// Forgets the session.
    async fn remove(&self, session_id: &str) -> std::result::Result<(), JournalError>;
    /// How many entries the session has.
    async fn len(&self, session_id: &str) -> std::result::Result<usize, JournalError>;
}

/// The default journal: in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    sessions: Mutex<HashMap<String, Vec<JournalEntry>>>,
}

#[async_trait]
impl SessionJournal for MemoryJournal {
    async fn append(
        &self,
        session_id: &str,
        entry: JournalEntry,
    ) -> std::result::Result<(), JournalError> {
        self.sessions
            .lock()
            .expect("journal poisoned")
            .entry(session_id.to_owned())
            .or_default()
            .push(entry);
        Ok(())
    }

    async fn entries(
        &self,
        session_id: &str,
    ) -> std::result::Result<Vec<JournalEntry>, JournalError> {
        Ok(self
            .sessions
            .lock()
            .expect("journal poisoned")
            .get(session_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn remove(&self, session_id: &str) -> std::result::Result<(), JournalError> {
        self.sessions
            .lock()
            .expect("journal poisoned")
            .remove(session_id);
        Ok(())
    }

    async fn len(&self, session_id: &str) -> std::result::Result<usize, JournalError> {
        Ok(self
            .sessions
            .lock()
            .expect("journal poisoned")
            .get(session_id)
            .map_or(0, Vec::len))
    }
}
