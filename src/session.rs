//! Sessions: a handle with strict worker affinity, and the journal that rebuilds a
//! session's state on a new worker when its worker dies.
//!
//! The journal records, in order, each successful call to a command whose manifest
//! flag says `mutates_session`. It sits behind [`SessionJournal`] so that a store
//! shared between hosts can back it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::pool::Pool;

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

/// A handle on one session of a pool. Clones share the session.
///
/// Every call goes to the session's own worker, one at a time in the order they were
/// made. If that worker dies, the next call first rebuilds the session's state on
/// another worker by replaying the journal.
#[derive(Clone, Debug)]
pub struct Session {
    pub(crate) pool: Pool,
    pub(crate) id: Arc<str>,
    pub(crate) epoch: u64,
    pub(crate) order: Arc<tokio::sync::Mutex<()>>,
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Calls `command` on the session's worker, with `session_id` added to `args`.
    pub async fn call(&self, command: &str, args: Value) -> Result<Value> {
        let timeout = self.pool.request_timeout();
        self.call_with_timeout(command, args, timeout).await
    }

    /// Like [`Session::call`] with a timeout of its own.
    pub async fn call_with_timeout(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let _turn = self.order.lock().await;
        self.pool.session_call(self, command, args, timeout).await
    }

    /// The id of the worker the session is pinned to, if any.
    pub fn worker_id(&self) -> Option<String> {
        self.pool.session_worker(&self.id)
    }

    /// Closes the session: later calls fail with `SessionClosed`, the worker is told
    /// to free the session's state, and the journal is dropped.
    pub async fn close(&self) -> Result<()> {
        let _turn = self.order.lock().await;
        self.pool.close_session_epoch(&self.id, self.epoch).await
    }
}
