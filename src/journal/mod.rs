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
//! later session under the same id. A store shared by many nodes ([`RedisJournal`])
//! takes each session over into the node's epoch ([`SessionJournal::adopt`]) and
//! fences the nodes from each other with tokens of its own.

mod memory;
mod redis;
mod sqlite;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use memory::MemoryJournal;
pub use redis::{RedisJournal, RedisOptions, check_node_name};
pub use sqlite::{SqliteJournal, SyncPolicy};

/// One journaled call: replaying the entries in order rebuilds the session's state.
///
/// The arguments are kept as JSON text: a small object as a `serde_json::Value` costs
/// several hundred bytes of tree nodes, as text about its length, and a journal entry
/// is only read back to be replayed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalEntry {
    command: String,
    args: Box<RawValue>,
}

impl PartialEq for JournalEntry {
    fn eq(&self, other: &Self) -> bool {
        self.command == other.command && self.args.get() == other.args.get()
    }
}

impl JournalEntry {
    /// The entry of a call of `command` with `args` (`session_id` included, as sent).
    pub fn new(command: impl Into<String>, args: &Value) -> JournalEntry {
        JournalEntry {
            command: command.into(),
            args: serde_json::value::to_raw_value(args).expect("a JSON value serialises"),
        }
    }

    /// The command.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Its arguments.
    pub fn args(&self) -> Value {
        serde_json::from_str(self.args.get()).expect("stored arguments are JSON")
    }

    /// The entry's size as it is counted against the journal's limits: its command
    /// and its arguments as JSON.
    pub fn size(&self) -> usize {
        self.command.len() + self.args.get().len()
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

/// A session as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    /// The epoch its journal was last written or taken over in.
    pub epoch: u64,
    /// What its journal holds.
    pub stats: JournalStats,
    /// When its journal was first written.
    pub created: SystemTime,
    /// When the session was last used, as far as the store knows: its last write, or
    /// the time a pool gave when it let the session go.
    pub last_used: SystemTime,
}

/// `time` in milliseconds since the Unix epoch, as the stores keep times.
fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A stored time back as a `SystemTime`.
fn time_of(millis: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64)
}

/// A failure of the journal's store, or its refusal.
#[derive(Clone, Debug, thiserror::Error)]
#[error("session journal: {message}")]
pub struct JournalError {
    /// What kind of failure.
    pub kind: JournalErrorKind,
    /// What happened, for a person.
    pub message: String,
}

/// Kinds of [`JournalError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalErrorKind {
    /// The store refused what was asked (a write for an older epoch, bad data):
    /// asking again will not help.
    Refused,
    /// The store cannot be reached or failed to write: nothing was stored; asking
    /// again later may work.
    Unavailable,
    /// Another pool owns the session now: this one must drop its copy of it.
    Moved,
}

impl JournalError {
    /// A refusal (see [`JournalErrorKind::Refused`]).
    pub fn refused(message: impl Into<String>) -> JournalError {
        JournalError {
            kind: JournalErrorKind::Refused,
            message: message.into(),
        }
    }

    /// The store failing (see [`JournalErrorKind::Unavailable`]).
    pub fn unavailable(message: impl Into<String>) -> JournalError {
        JournalError {
            kind: JournalErrorKind::Unavailable,
            message: message.into(),
        }
    }

    /// The session owned elsewhere (see [`JournalErrorKind::Moved`]).
    pub fn moved(message: impl Into<String>) -> JournalError {
        JournalError {
            kind: JournalErrorKind::Moved,
            message: message.into(),
        }
    }
}

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
    /// Forgets the session's journal: with an epoch, only if its epoch is that one or
    /// older. Returns whether there was one.
    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<bool, JournalError>;
    /// Whether journals outlive this process. A pool on a durable journal lets
    /// sessions evicted from their workers leave its memory too, and finds them here
    /// again by id ([`SessionJournal::adopt`]) when they are next used.
    fn durable(&self) -> bool {
        false
    }
    /// How many sessions the store holds.
    fn session_count(&self) -> usize;
    /// The session `id` as stored, whatever its epoch.
    async fn stored(&self, id: &str) -> Result<Option<StoredSession>, JournalError>;
    /// Takes the stored journal of session `id`, written in an older epoch, over into
    /// `epoch` (writes of the older epoch are refused from then on) and marks it used:
    /// what it holds, or `None` if the store holds no journal for `id`.
    async fn adopt(&self, id: &str, epoch: u64) -> Result<Option<StoredSession>, JournalError>;
    /// Records when session `id` (of `epoch`) was last used.
    async fn touch(&self, id: &str, epoch: u64, used: SystemTime) -> Result<(), JournalError>;
    /// Session `id` (of `epoch`), last used at `used`, has left this pool's memory:
    /// records its last use and lets another pool sharing the store take it over.
    async fn release(&self, id: &str, epoch: u64, used: SystemTime) -> Result<(), JournalError> {
        self.touch(id, epoch, used).await
    }
    /// Confirms, before a call of session `id` (of `epoch`), that this pool still owns
    /// it (a store shared between pools); fails with [`JournalErrorKind::Moved`] if
    /// another one took it over.
    async fn renew(&self, _id: &str, _epoch: u64) -> Result<(), JournalError> {
        Ok(())
    }
    /// Up to `most` sessions last used before `before`, least recently used first:
    /// `(id, epoch)`.
    async fn unused_since(
        &self,
        before: SystemTime,
        most: usize,
    ) -> Result<Vec<(String, u64)>, JournalError>;
    /// The greatest epoch the store holds (0 when empty): a pool starting on it gives
    /// its sessions greater ones.
    async fn max_epoch(&self) -> Result<u64, JournalError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(n: u64) -> JournalEntry {
        JournalEntry::new("note", &json!({"n": n}))
    }

    /// What every store must do.
    async fn conformance(journal: &dyn SessionJournal) {
        // Epochs keep a closed session's writes out of its successor.
        journal.append("s", 1, entry(1)).await.unwrap();
        let stats = journal.append("s", 2, entry(2)).await.unwrap();
        assert_eq!(stats.entries, 1, "a newer epoch starts afresh");
        assert!(journal.append("s", 1, entry(3)).await.is_err());
        let entries = journal.entries("s", 2).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(*entries[0], entry(2));
        assert!(journal.entries("s", 1).await.unwrap().is_empty());
        assert!(
            !journal.remove("s", Some(1)).await.unwrap(),
            "a newer one stays"
        );
        assert_eq!(journal.stats("s", 2).await.unwrap().entries, 1);
        assert!(
            journal.remove("s", Some(3)).await.unwrap(),
            "an older one goes"
        );
        assert_eq!(
            journal.stats("s", 2).await.unwrap(),
            JournalStats::default()
        );
        assert!(!journal.remove("s", None).await.unwrap());

        // Compaction replaces the entries it covers.
        for n in 0..5 {
            journal.append("c", 7, entry(n)).await.unwrap();
        }
        let snapshot = JournalEntry::new("restore_session", &json!({"parts": {"p": [0, 1, 2, 3]}}));
        let stats = journal.compact("c", 7, snapshot.clone(), 4).await.unwrap();
        assert_eq!(stats.entries, 1);
        assert_eq!(stats.bytes, entry(4).size());
        assert_eq!(stats.snapshot_bytes, Some(snapshot.size()));
        let entries = journal.entries("c", 7).await.unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(*entries[0], snapshot);
        assert_eq!(*entries[1], entry(4));
        journal.append("c", 7, entry(5)).await.unwrap();
        let expected = JournalStats {
            entries: 2,
            bytes: entry(4).size() + entry(5).size(),
            snapshot_bytes: Some(snapshot.size()),
        };
        assert_eq!(journal.session_count(), 1);
        assert_eq!(journal.max_epoch().await.unwrap(), 7);

        // A stored session is found by id, and taken over into a newer epoch.
        let stored = journal.stored("c").await.unwrap().unwrap();
        assert_eq!((stored.epoch, stored.stats), (7, expected));
        assert!(stored.created <= stored.last_used);
        assert!(journal.adopt("gone", 8).await.unwrap().is_none());
        let adopted = journal.adopt("c", 9).await.unwrap().unwrap();
        assert_eq!((adopted.epoch, adopted.stats), (9, expected));
        assert_eq!(journal.entries("c", 9).await.unwrap().len(), 3);
        assert!(journal.entries("c", 7).await.unwrap().is_empty());
        assert!(
            journal.append("c", 7, entry(6)).await.is_err(),
            "the old epoch's writes are refused"
        );
        assert!(
            journal.adopt("c", 8).await.is_err(),
            "never back to an older epoch"
        );

        // Retention finds the sessions unused since a time, oldest first.
        let long_ago = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        journal.append("d", 10, entry(0)).await.unwrap();
        journal.touch("d", 10, long_ago).await.unwrap();
        let later = long_ago + std::time::Duration::from_secs(10);
        journal.touch("c", 9, later).await.unwrap();
        journal.touch("c", 7, long_ago).await.unwrap();
        let now = SystemTime::now() + std::time::Duration::from_secs(1);
        let unused = journal.unused_since(now, 10).await.unwrap();
        assert_eq!(unused, [("d".to_owned(), 10), ("c".to_owned(), 9)]);
        assert_eq!(journal.unused_since(now, 1).await.unwrap().len(), 1);
        assert_eq!(
            journal
                .unused_since(long_ago + std::time::Duration::from_secs(1), 10)
                .await
                .unwrap(),
            [("d".to_owned(), 10)]
        );
        assert!(journal.remove("d", Some(10)).await.unwrap());
        assert_eq!(journal.session_count(), 1);
    }

    #[tokio::test]
    async fn the_memory_journal_conforms() {
        conformance(&MemoryJournal::default()).await;
    }

    #[tokio::test]
    async fn the_sqlite_journal_conforms_and_keeps_its_journals() {
        let dir = tempfile::tempdir().unwrap();
        {
            let journal = SqliteJournal::open(dir.path(), SyncPolicy::Normal).unwrap();
            conformance(&journal).await;
            // A second journal on the same directory is refused while this one is open.
            let error = SqliteJournal::open(dir.path(), SyncPolicy::Normal).unwrap_err();
            assert!(error.message.contains("in use"), "{error}");
        }
        // Opened again (the first one's thread has let go of the lock once dropped).
        let journal = wait_for_reopen(dir.path()).await;
        assert_eq!(journal.session_count(), 1);
        assert_eq!(journal.max_epoch().await.unwrap(), 9);
        assert_eq!(journal.entries("c", 9).await.unwrap().len(), 3);
    }

    /// Opens the journal in `dir` once the previous one's thread has closed it.
    async fn wait_for_reopen(dir: &std::path::Path) -> SqliteJournal {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SqliteJournal::open(dir, SyncPolicy::Full) {
                Ok(journal) => return journal,
                Err(error) if std::time::Instant::now() > deadline => {
                    panic!("the journal was not released: {error}")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(SqliteJournal::open(dir.path(), SyncPolicy::Normal).unwrap());
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    for n in 0..50 {
                        journal.append(&format!("w{w}"), 1, entry(n)).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        for w in 0..8 {
            let entries = journal.entries(&format!("w{w}"), 1).await.unwrap();
            let order: Vec<u64> = entries
                .iter()
                .map(|e| e.args()["n"].as_u64().unwrap())
                .collect();
            assert_eq!(order, (0..50).collect::<Vec<_>>());
        }
    }
}
