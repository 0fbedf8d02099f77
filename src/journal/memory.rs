//! The default journal: in this process's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{JournalEntry, JournalError, JournalStats, SessionJournal, StoredSession};

/// One session's journal.
#[derive(Debug)]
struct Journal {
    epoch: u64,
    snapshot: Option<(Arc<JournalEntry>, usize)>,
    entries: Vec<(Arc<JournalEntry>, usize)>,
    bytes: usize,
    created: SystemTime,
    last_used: SystemTime,
}

impl Journal {
    fn new(epoch: u64) -> Journal {
        let now = SystemTime::now();
        Journal {
            epoch,
            snapshot: None,
            entries: Vec::new(),
            bytes: 0,
            created: now,
            last_used: now,
        }
    }

    fn stored(&self) -> StoredSession {
        StoredSession {
            epoch: self.epoch,
            stats: self.stats(),
            created: self.created,
            last_used: self.last_used,
        }
    }

    fn stats(&self) -> JournalStats {
        JournalStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            snapshot_bytes: self.snapshot.as_ref().map(|(_, size)| *size),
        }
    }
}

/// Session journals in this process's memory. Entries are shared, not copied, when
/// read.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    sessions: Mutex<HashMap<String, Journal>>,
}

impl MemoryJournal {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Journal>> {
        self.sessions.lock().expect("journal poisoned")
    }
}

/// The journal of `id` for writing in `epoch`: a newer epoch starts it afresh, an
/// older one is refused.
fn for_epoch<'a>(
    sessions: &'a mut HashMap<String, Journal>,
    id: &str,
    epoch: u64,
) -> Result<&'a mut Journal, JournalError> {
    let journal = sessions
        .entry(id.to_owned())
        .or_insert_with(|| Journal::new(epoch));
    if journal.epoch > epoch {
        return Err(JournalError::refused(format!(
            "session `{id}` was closed: epoch {epoch} is older than its journal's {}",
            journal.epoch
        )));
    }
    if journal.epoch < epoch {
        *journal = Journal::new(epoch);
    }
    journal.last_used = SystemTime::now();
    Ok(journal)
}

#[async_trait]
impl SessionJournal for MemoryJournal {
    async fn append(
        &self,
        id: &str,
        epoch: u64,
        entry: JournalEntry,
    ) -> Result<JournalStats, JournalError> {
        let mut sessions = self.lock();
        let journal = for_epoch(&mut sessions, id, epoch)?;
        let size = entry.size();
        journal.entries.push((Arc::new(entry), size));
        journal.bytes += size;
        Ok(journal.stats())
    }

    async fn entries(&self, id: &str, epoch: u64) -> Result<Vec<Arc<JournalEntry>>, JournalError> {
        let sessions = self.lock();
        let Some(journal) = sessions.get(id).filter(|j| j.epoch == epoch) else {
            return Ok(Vec::new());
        };
        Ok(journal
            .snapshot
            .iter()
            .chain(&journal.entries)
            .map(|(entry, _)| entry.clone())
            .collect())
    }

    async fn compact(
        &self,
        id: &str,
        epoch: u64,
        snapshot: JournalEntry,
        replaced: usize,
    ) -> Result<JournalStats, JournalError> {
        let mut sessions = self.lock();
        let journal = for_epoch(&mut sessions, id, epoch)?;
        let replaced = replaced.min(journal.entries.len());
        let dropped: usize = journal
            .entries
            .drain(..replaced)
            .map(|(_, size)| size)
            .sum();
        journal.bytes -= dropped;
        let size = snapshot.size();
        journal.snapshot = Some((Arc::new(snapshot), size));
        Ok(journal.stats())
    }

    async fn stats(&self, id: &str, epoch: u64) -> Result<JournalStats, JournalError> {
        let sessions = self.lock();
        Ok(sessions
            .get(id)
            .filter(|j| j.epoch == epoch)
            .map(Journal::stats)
            .unwrap_or_default())
    }

    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<bool, JournalError> {
        let mut sessions = self.lock();
        let due = sessions
            .get(id)
            .is_some_and(|j| epoch.is_none_or(|e| j.epoch <= e));
        if due {
            sessions.remove(id);
        }
        Ok(due)
    }

    fn session_count(&self) -> usize {
        self.lock().len()
    }

    async fn stored(&self, id: &str) -> Result<Option<StoredSession>, JournalError> {
        Ok(self.lock().get(id).map(Journal::stored))
    }

    async fn adopt(&self, id: &str, epoch: u64) -> Result<Option<StoredSession>, JournalError> {
        let mut sessions = self.lock();
        let Some(journal) = sessions.get_mut(id) else {
            return Ok(None);
        };
        if journal.epoch >= epoch {
            return Err(JournalError::refused(format!(
                "session `{id}` is stored in epoch {}, not older than {epoch}",
                journal.epoch
            )));
        }
        journal.epoch = epoch;
        journal.last_used = SystemTime::now();
        Ok(Some(journal.stored()))
    }

    async fn touch(&self, id: &str, epoch: u64, used: SystemTime) -> Result<(), JournalError> {
        if let Some(journal) = self.lock().get_mut(id).filter(|j| j.epoch == epoch) {
            journal.last_used = used;
        }
        Ok(())
    }

    async fn unused_since(
        &self,
        before: SystemTime,
        most: usize,
    ) -> Result<Vec<(String, u64)>, JournalError> {
        let sessions = self.lock();
        let mut unused: Vec<(SystemTime, &String, u64)> = sessions
            .iter()
            .filter(|(_, j)| j.last_used < before)
            .map(|(id, j)| (j.last_used, id, j.epoch))
            .collect();
        unused.sort_unstable();
        Ok(unused
            .into_iter()
            .take(most)
            .map(|(_, id, epoch)| (id.clone(), epoch))
            .collect())
    }

    async fn max_epoch(&self) -> Result<u64, JournalError> {
        Ok(self.lock().values().map(|j| j.epoch).max().unwrap_or(0))
    }
}
