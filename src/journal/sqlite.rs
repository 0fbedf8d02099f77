//! A durable journal: SQLite in WAL mode, in a data directory.
//!
//! One thread owns the database connection. Calls from any task are queued to it; it
//! takes every operation waiting at that moment, runs them in one transaction, commits,
//! and only then answers them: concurrent appends share one commit (group commit), and
//! an append is answered only once it is stored. An operation refused for what it asks
//! (a stale epoch) writes nothing and fails alone; a failing statement rolls the whole
//! batch back and fails every operation in it. With [`SyncPolicy::Normal`] a committed entry
//! survives the process being killed; with [`SyncPolicy::Full`] it also survives the
//! machine losing power.
//!
//! The data directory holds `journal.sqlite3` (and SQLite's `-wal` and `-shm` files)
//! and a `journal.lock` file, locked while a journal is open on the directory: a second
//! process opening the same directory is refused rather than mixing its sessions in.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use super::{JournalEntry, JournalError, JournalStats, SessionJournal, StoredSession};
use super::{millis, time_of};

/// Most operations committed together.
const MAX_BATCH: usize = 512;
/// Idle time after which the database thread frees its page cache.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// How hard a commit tries to reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// WAL with `synchronous = NORMAL`: a committed entry survives the process being
    /// killed, not necessarily a power loss.
    #[default]
    Normal,
    /// `synchronous = FULL`: every commit is flushed to the disk before it is answered.
    Full,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(SyncPolicy::Normal),
            "full" => Ok(SyncPolicy::Full),
            other => Err(format!("unknown sync policy `{other}`: normal or full")),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// An operation for the database thread.
enum Op {
    Append(String, u64, JournalEntry, Reply<JournalStats>),
    Entries(String, u64, Reply<Vec<Arc<JournalEntry>>>),
    Compact(String, u64, JournalEntry, usize, Reply<JournalStats>),
    Stats(String, u64, Reply<JournalStats>),
    Remove(String, Option<u64>, Reply<bool>),
    Stored(String, Reply<Option<StoredSession>>),
    Adopt(String, u64, Reply<Option<StoredSession>>),
    Touch(String, u64, SystemTime, Reply<()>),
    UnusedSince(SystemTime, usize, Reply<Vec<(String, u64)>>),
    MaxEpoch(Reply<u64>),
}

/// Session journals in SQLite (see the module documentation).
#[derive(Debug)]
pub struct SqliteJournal {
    ops: Mutex<std::sync::mpsc::Sender<Op>>,
    path: PathBuf,
    /// Sessions stored, as of the last commit.
    count: Arc<AtomicUsize>,
}

fn sql_error(context: &str) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
    move |e| JournalError::refused(format!("{context}: {e}"))
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `dir`.
    pub fn open(dir: &Path, sync: SyncPolicy) -> Result<SqliteJournal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            JournalError::refused(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })?;
        let lock = lock_dir(dir)?;
        let path = dir.join("journal.sqlite3");
        let context = format!("cannot open {}", path.display());
        let conn = Connection::open(&path).map_err(sql_error(&context))?;
        let synchronous = match sync {
            SyncPolicy::Normal => "NORMAL",
            SyncPolicy::Full => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {synchronous};
             CREATE TABLE IF NOT EXISTS sessions (
                 id TEXT PRIMARY KEY,
                 epoch INTEGER NOT NULL,
                 snapshot TEXT,
                 snapshot_bytes INTEGER,
                 entries INTEGER NOT NULL DEFAULT 0,
                 bytes INTEGER NOT NULL DEFAULT 0,
                 next_seq INTEGER NOT NULL DEFAULT 0,
                 created INTEGER NOT NULL DEFAULT 0,
                 last_used INTEGER NOT NULL DEFAULT 0
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS entries (
                 id TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 entry TEXT NOT NULL,
                 bytes INTEGER NOT NULL,
                 PRIMARY KEY (id, seq)
             ) WITHOUT ROWID;"
        ))
        .map_err(sql_error(&context))?;
        add_use_times(&conn).map_err(sql_error(&context))?;
        let stored: i64 = conn
            .query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))
            .map_err(sql_error(&context))?;
        let count = Arc::new(AtomicUsize::new(stored as usize));
        let (tx, rx) = std::sync::mpsc::channel();
        let counted = count.clone();
        std::thread::Builder::new()
            .name("snakepool-journal".into())
            .spawn(move || {
                let _lock = lock;
                serve(conn, rx, &counted);
            })
            .map_err(|e| JournalError::refused(format!("cannot start the journal thread: {e}")))?;
        Ok(SqliteJournal {
            ops: Mutex::new(tx),
            path,
            count,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, JournalError> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .ops
            .lock()
            .expect("journal queue poisoned")
            .send(op(tx));
        if sent.is_err() {
            return Err(JournalError::unavailable("the journal thread has stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(JournalError::unavailable("the journal thread has stopped")))
    }
}

/// Gives a journal written before sessions carried their times of creation and last
/// use those columns (set to the time of the upgrade), and indexes the last use.
fn add_use_times(conn: &Connection) -> rusqlite::Result<()> {
    let mut columns = conn.prepare("SELECT name FROM pragma_table_info('sessions')")?;
    let names: Vec<String> = columns
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let now = millis(SystemTime::now());
    for column in ["created", "last_used"] {
        if !names.iter().any(|n| n == column) {
            conn.execute_batch(&format!(
                "ALTER TABLE sessions ADD COLUMN {column} INTEGER NOT NULL DEFAULT {now}"
            ))?;
        }
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS sessions_by_last_use ON sessions (last_used)")
}

/// Takes the data directory's lock file, or says who holds it.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("journal.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| JournalError::refused(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock has no memory-safety preconditions; the descriptor is open.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        return Err(JournalError::refused(format!(
            "the data directory {} is in use by another snakepool process (its journal is \
             locked); give each server a data directory of its own",
            dir.display()
        )));
    }
    Ok(file)
}

/// The database thread: batches of operations, one transaction each. Once it has been
/// idle for [`SHRINK_AFTER`] after some work, it empties SQLite's page cache, so a
/// quiet server does not keep the cache a burst of sessions filled.
fn serve(mut conn: Connection, ops: std::sync::mpsc::Receiver<Op>, count: &AtomicUsize) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut worked = false;
    loop {
        let first = match ops.recv_timeout(SHRINK_AFTER) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => {
                if std::mem::take(&mut worked) && conn.execute_batch("PRAGMA shrink_memory").is_ok()
                {
                    crate::heap::release_freed_memory();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        worked = true;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch, count);
    }
}

/// A finished operation waiting for its batch's commit to be answered.
type Answer = Box<dyn FnOnce(Option<&JournalError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, JournalError>) -> Answer {
    Box::new(move |failed_commit| {
        let result = match (result, failed_commit) {
            (Ok(_), Some(error)) => Err(error.clone()),
            (result, _) => result,
        };
        let _ = reply.send(result);
    })
}

/// Runs a batch in one transaction and, once it is committed, adds the sessions it
/// stored (less those it removed) to `count` before answering.
fn run_batch(conn: &mut Connection, batch: Vec<Op>, count: &AtomicUsize) {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let error = JournalError::unavailable(format!("cannot begin a transaction: {e}"));
            for op in batch {
                fail(op, &error);
            }
            return;
        }
    };
    let mut added = 0;
    // An operation refused for what it asks (a stale epoch) writes nothing; a failing
    // statement, though, may leave part of an operation written, so it fails the whole
    // batch, rolled back.
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut broken: Option<JournalError> = None;
    for op in batch {
        match &broken {
            Some(error) => fail(op, error),
            None => match run_op(&tx, op, &mut added) {
                Ok(answer) => answers.push(answer),
                Err(error) => broken = Some(error),
            },
        }
    }
    let outcome = match broken {
        Some(error) => {
            let _ = tx.rollback();
            Some(error)
        }
        None => tx
            .commit()
            .err()
            .map(|e| JournalError::unavailable(format!("commit failed: {e}"))),
    };
    if outcome.is_none() && added != 0 {
        let now = count.load(Ordering::Relaxed) as isize + added;
        count.store(now.max(0) as usize, Ordering::Relaxed);
    }
    for answer in answers {
        answer(outcome.as_ref());
    }
}

fn fail(op: Op, error: &JournalError) {
    fn send<T>(reply: Reply<T>, error: &JournalError) {
        let _ = reply.send(Err(error.clone()));
    }
    match op {
        Op::Append(.., reply) | Op::Compact(.., reply) | Op::Stats(.., reply) => send(reply, error),
        Op::Entries(.., reply) => send(reply, error),
        Op::Remove(.., reply) => send(reply, error),
        Op::Stored(.., reply) | Op::Adopt(.., reply) => send(reply, error),
        Op::Touch(.., reply) => send(reply, error),
        Op::UnusedSince(.., reply) => send(reply, error),
        Op::MaxEpoch(reply) => send(reply, error),
    }
}

/// A statement failed: the batch is broken.
type Broken = JournalError;

/// Runs one operation: its answer (its own refusal included), or the failure of a
/// statement, which breaks the batch. Counts the sessions it adds (or removes) in
/// `added`.
fn run_op(tx: &Transaction<'_>, op: Op, added: &mut isize) -> Result<Answer, Broken> {
    Ok(match op {
        Op::Append(id, epoch, entry, reply) => {
            answer(reply, split(append(tx, &id, epoch, &entry, added))?)
        }
        Op::Entries(id, epoch, reply) => answer(reply, split(entries(tx, &id, epoch))?),
        Op::Compact(id, epoch, snapshot, replaced, reply) => answer(
            reply,
            split(compact(tx, &id, epoch, &snapshot, replaced, added))?,
        ),
        Op::Stats(id, epoch, reply) => answer(reply, split(stats(tx, &id, epoch))?),
        Op::Remove(id, epoch, reply) => answer(reply, split(remove(tx, &id, epoch, added))?),
        Op::Stored(id, reply) => answer(reply, split(stored(tx, &id))?),
        Op::Adopt(id, epoch, reply) => answer(reply, split(adopt(tx, &id, epoch))?),
        Op::Touch(id, epoch, used, reply) => answer(reply, split(touch(tx, &id, epoch, used))?),
        Op::UnusedSince(before, most, reply) => {
            answer(reply, split(unused_since(tx, before, most))?)
        }
        Op::MaxEpoch(reply) => answer(reply, split(max_epoch(tx))?),
    })
}

/// What an operation asks can be refused (`Ok(Err(..))`, nothing written) or a
/// statement can fail (`Err(..)`).
enum Failure {
    Refused(JournalError),
    Broken(JournalError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Broken(JournalError::unavailable(format!("SQLite: {e}")))
    }
}

fn split<T>(result: Result<T, Failure>) -> Result<Result<T, JournalError>, Broken> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(Failure::Refused(error)) => Ok(Err(error)),
        Err(Failure::Broken(error)) => Err(error),
    }
}

/// A session's row.
struct Row {
    epoch: i64,
    stats: JournalStats,
    next_seq: i64,
    created: i64,
    last_used: i64,
}

impl Row {
    fn stored(&self) -> StoredSession {
        StoredSession {
            epoch: self.epoch as u64,
            stats: self.stats,
            created: time_of(self.created),
            last_used: time_of(self.last_used),
        }
    }
}

fn row(tx: &Transaction<'_>, id: &str) -> Result<Option<Row>, Failure> {
    let mut query = tx.prepare_cached(
        "SELECT epoch, entries, bytes, snapshot_bytes, next_seq, created, last_used
         FROM sessions WHERE id = ?1",
    )?;
    Ok(query
        .query_row([id], |r| {
            Ok(Row {
                epoch: r.get(0)?,
                stats: JournalStats {
                    entries: r.get::<_, i64>(1)? as usize,
                    bytes: r.get::<_, i64>(2)? as usize,
                    snapshot_bytes: r.get::<_, Option<i64>>(3)?.map(|b| b as usize),
                },
                next_seq: r.get(4)?,
                created: r.get(5)?,
                last_used: r.get(6)?,
            })
        })
        .optional()?)
}

/// The session's row for a write in `epoch`, marked used now: started afresh for a
/// newer epoch (counted in `added` if the session is new to the store); a write of an
/// older epoch is refused.
fn for_epoch(
    tx: &Transaction<'_>,
    id: &str,
    epoch: u64,
    added: &mut isize,
) -> Result<Row, Failure> {
    let epoch = epoch as i64;
    let now = millis(SystemTime::now());
    match row(tx, id)? {
        Some(row) if row.epoch > epoch => Err(Failure::Refused(JournalError::refused(format!(
            "session `{id}` was closed: epoch {epoch} is older than its journal's {}",
            row.epoch
        )))),
        Some(row) if row.epoch == epoch => {
            tx.prepare_cached("UPDATE sessions SET last_used = ?2 WHERE id = ?1")?
                .execute(params![id, now])?;
            Ok(row)
        }
        old => {
            if old.is_none() {
                *added += 1;
            }
            tx.prepare_cached("DELETE FROM entries WHERE id = ?1")?
                .execute([id])?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions (id, epoch, created, last_used)
                 VALUES (?1, ?2, ?3, ?3)",
            )?
            .execute(params![id, epoch, now])?;
            Ok(Row {
                epoch,
                stats: JournalStats::default(),
                next_seq: 0,
                created: now,
                last_used: now,
            })
        }
    }
}

fn encode(entry: &JournalEntry) -> Result<String, Failure> {
    serde_json::to_string(entry)
        .map_err(|e| Failure::Refused(JournalError::refused(format!("entry is not JSON: {e}"))))
}

fn decode(text: &str) -> Result<Arc<JournalEntry>, Failure> {
    serde_json::from_str(text).map(Arc::new).map_err(|e| {
        Failure::Refused(JournalError::refused(format!(
            "a stored entry is not a journal entry: {e}"
        )))
    })
}

fn append(
    tx: &Transaction<'_>,
    id: &str,
    epoch: u64,
    entry: &JournalEntry,
    added: &mut isize,
) -> Result<JournalStats, Failure> {
    let text = encode(entry)?;
    let row = for_epoch(tx, id, epoch, added)?;
    let size = entry.size();
    tx.prepare_cached("INSERT INTO entries (id, seq, entry, bytes) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![id, row.next_seq, text, size as i64])?;
    let stats = JournalStats {
        entries: row.stats.entries + 1,
        bytes: row.stats.bytes + size,
        snapshot_bytes: row.stats.snapshot_bytes,
    };
    tx.prepare_cached("UPDATE sessions SET entries = ?2, bytes = ?3, next_seq = ?4 WHERE id = ?1")?
        .execute(params![
            id,
            stats.entries as i64,
            stats.bytes as i64,
            row.next_seq + 1
        ])?;
    Ok(stats)
}

fn entries(tx: &Transaction<'_>, id: &str, epoch: u64) -> Result<Vec<Arc<JournalEntry>>, Failure> {
    let snapshot: Option<Option<String>> = tx
        .prepare_cached("SELECT snapshot FROM sessions WHERE id = ?1 AND epoch = ?2")?
        .query_row(params![id, epoch as i64], |r| r.get(0))
        .optional()?;
    let Some(snapshot) = snapshot else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    if let Some(text) = snapshot {
        out.push(decode(&text)?);
    }
    let mut query = tx.prepare_cached("SELECT entry FROM entries WHERE id = ?1 ORDER BY seq")?;
    let rows = query.query_map([id], |r| r.get::<_, String>(0))?;
    for text in rows {
        out.push(decode(&text?)?);
    }
    Ok(out)
}

fn compact(
    tx: &Transaction<'_>,
    id: &str,
    epoch: u64,
    snapshot: &JournalEntry,
    replaced: usize,
    added: &mut isize,
) -> Result<JournalStats, Failure> {
    let text = encode(snapshot)?;
    for_epoch(tx, id, epoch, added)?;
    tx.prepare_cached(
        "DELETE FROM entries WHERE id = ?1 AND seq IN
             (SELECT seq FROM entries WHERE id = ?1 ORDER BY seq LIMIT ?2)",
    )?
    .execute(params![id, replaced as i64])?;
    tx.prepare_cached(
        "UPDATE sessions SET snapshot = ?2, snapshot_bytes = ?3,
             entries = (SELECT COUNT(*) FROM entries WHERE id = ?1),
             bytes = (SELECT COALESCE(SUM(bytes), 0) FROM entries WHERE id = ?1)
         WHERE id = ?1",
    )?
    .execute(params![id, text, snapshot.size() as i64])?;
    Ok(row(tx, id)?.map(|r| r.stats).unwrap_or_default())
}

fn stats(tx: &Transaction<'_>, id: &str, epoch: u64) -> Result<JournalStats, Failure> {
    Ok(row(tx, id)?
        .filter(|r| r.epoch == epoch as i64)
        .map(|r| r.stats)
        .unwrap_or_default())
}

fn remove(
    tx: &Transaction<'_>,
    id: &str,
    epoch: Option<u64>,
    added: &mut isize,
) -> Result<bool, Failure> {
    let Some(row) = row(tx, id)? else {
        return Ok(false);
    };
    let due = epoch.is_none_or(|e| row.epoch <= e as i64);
    if due {
        tx.prepare_cached("DELETE FROM entries WHERE id = ?1")?
            .execute([id])?;
        tx.prepare_cached("DELETE FROM sessions WHERE id = ?1")?
            .execute([id])?;
        *added -= 1;
    }
    Ok(due)
}

fn stored(tx: &Transaction<'_>, id: &str) -> Result<Option<StoredSession>, Failure> {
    Ok(row(tx, id)?.map(|row| row.stored()))
}

fn adopt(tx: &Transaction<'_>, id: &str, epoch: u64) -> Result<Option<StoredSession>, Failure> {
    let Some(mut row) = row(tx, id)? else {
        return Ok(None);
    };
    if row.epoch >= epoch as i64 {
        return Err(Failure::Refused(JournalError::refused(format!(
            "session `{id}` is stored in epoch {}, not older than {epoch}",
            row.epoch
        ))));
    }
    row.epoch = epoch as i64;
    row.last_used = millis(SystemTime::now());
    tx.prepare_cached("UPDATE sessions SET epoch = ?2, last_used = ?3 WHERE id = ?1")?
        .execute(params![id, row.epoch, row.last_used])?;
    Ok(Some(row.stored()))
}

fn touch(tx: &Transaction<'_>, id: &str, epoch: u64, used: SystemTime) -> Result<(), Failure> {
    tx.prepare_cached("UPDATE sessions SET last_used = ?3 WHERE id = ?1 AND epoch = ?2")?
        .execute(params![id, epoch as i64, millis(used)])?;
    Ok(())
}

fn unused_since(
    tx: &Transaction<'_>,
    before: SystemTime,
    most: usize,
) -> Result<Vec<(String, u64)>, Failure> {
    let mut query = tx.prepare_cached(
        "SELECT id, epoch FROM sessions WHERE last_used < ?1 ORDER BY last_used LIMIT ?2",
    )?;
    let rows = query.query_map(params![millis(before), most as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn max_epoch(tx: &Transaction<'_>) -> Result<u64, Failure> {
    let max: i64 = tx.query_row("SELECT COALESCE(MAX(epoch), 0) FROM sessions", [], |r| {
        r.get(0)
    })?;
    Ok(max as u64)
}

#[async_trait]
impl SessionJournal for SqliteJournal {
    async fn append(
        &self,
        id: &str,
        epoch: u64,
        entry: JournalEntry,
    ) -> Result<JournalStats, JournalError> {
        self.ask(|reply| Op::Append(id.to_owned(), epoch, entry, reply))
            .await
    }

    async fn entries(&self, id: &str, epoch: u64) -> Result<Vec<Arc<JournalEntry>>, JournalError> {
        self.ask(|reply| Op::Entries(id.to_owned(), epoch, reply))
            .await
    }

    async fn compact(
        &self,
        id: &str,
        epoch: u64,
        snapshot: JournalEntry,
        replaced: usize,
    ) -> Result<JournalStats, JournalError> {
        self.ask(|reply| Op::Compact(id.to_owned(), epoch, snapshot, replaced, reply))
            .await
    }

    async fn stats(&self, id: &str, epoch: u64) -> Result<JournalStats, JournalError> {
        self.ask(|reply| Op::Stats(id.to_owned(), epoch, reply))
            .await
    }

    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<bool, JournalError> {
        self.ask(|reply| Op::Remove(id.to_owned(), epoch, reply))
            .await
    }

    fn durable(&self) -> bool {
        true
    }

    fn session_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    async fn stored(&self, id: &str) -> Result<Option<StoredSession>, JournalError> {
        self.ask(|reply| Op::Stored(id.to_owned(), reply)).await
    }

    async fn adopt(&self, id: &str, epoch: u64) -> Result<Option<StoredSession>, JournalError> {
        self.ask(|reply| Op::Adopt(id.to_owned(), epoch, reply))
            .await
    }

    async fn touch(&self, id: &str, epoch: u64, used: SystemTime) -> Result<(), JournalError> {
        self.ask(|reply| Op::Touch(id.to_owned(), epoch, used, reply))
            .await
    }

    async fn unused_since(
        &self,
        before: SystemTime,
        most: usize,
    ) -> Result<Vec<(String, u64)>, JournalError> {
        self.ask(|reply| Op::UnusedSince(before, most, reply)).await
    }

    async fn max_epoch(&self) -> Result<u64, JournalError> {
        self.ask(Op::MaxEpoch).await
    }
}
