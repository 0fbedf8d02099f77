//! A journal shared by many nodes: Redis, with fenced ownership of each session.
//!
//! A node writes a session's journal only while it holds the session's lease: an owner
//! key (`node token`, with a TTL) that it takes when the session's first call reaches
//! it ([`SessionJournal::adopt`]), renews while the session is used, and gives back
//! when the session leaves its memory. Each new owner gets a greater token (the
//! session's fencing epoch), and every write is a Lua script that first checks the
//! owner key still holds the writer's node and token: a node that was paused or cut
//! off past its lease and comes back can never write into a session another node took
//! over; its write is refused as [`super::JournalErrorKind::Moved`]. A node asked for a
//! session another node holds waits, up to [`RedisOptions::lease_wait`], for that
//! lease to be released or to expire.
//!
//! Keys, per session (`{id}` is a hash tag, so one session's keys share a Redis
//! Cluster slot): `PREFIX:{id}:meta` (a hash: token, entries, bytes, snapshot,
//! snapshot size, created, last used), `PREFIX:{id}:log` (a list of `size:entry`), and
//! `PREFIX:{id}:owner`. `PREFIX:sessions` (a sorted set by last use) counts the
//! sessions. Journals expire after [`RedisOptions::retention`] without use (Redis's own
//! key expiry). Redis answers a write once it is applied; with `appendonly yes` and
//! `appendfsync always` it is on disk by then: see the deployment guide.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::{JournalEntry, JournalError, JournalStats, SessionJournal, StoredSession};
use super::{millis, time_of};

/// How a node uses a Redis journal.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// This node's name, unique among the nodes sharing the journal (letters, digits,
    /// `.`, `_`, `:`, `-`).
    pub node: String,
    /// How long a session's lease lasts without being renewed.
    pub lease_ttl: Duration,
    /// How long a node waits for another node's lease on a session to end.
    pub lease_wait: Duration,
    /// Journals not used for this long expire (`None`: never).
    pub retention: Option<Duration>,
    /// The prefix of every key.
    pub prefix: String,
    /// How long one Redis command may take before the store counts as unavailable.
    pub command_timeout: Duration,
}

impl RedisOptions {
    /// Options for node `node`: a 10 s lease, waited for up to 30 s, no retention,
    /// keys under `snakepool`, 2 s per command.
    pub fn new(node: impl Into<String>) -> RedisOptions {
        RedisOptions {
            node: node.into(),
            lease_ttl: Duration::from_secs(10),
            lease_wait: Duration::from_secs(30),
            retention: None,
            prefix: "snakepool".into(),
            command_timeout: Duration::from_secs(2),
        }
    }
}

/// Whether `node` is a usable node name.
pub fn check_node_name(node: &str) -> Result<(), String> {
    let valid = !node.is_empty()
        && node.len() <= 128
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "a node name is 1 to 128 letters, digits, `.`, `_`, `:` or `-`; got {node:?}"
        ))
    }
}

/// A session this node holds the lease of.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// The pool's epoch for it.
    epoch: u64,
    /// Its fencing token in Redis.
    token: u64,
    /// When the lease was last taken or renewed.
    renewed: Instant,
}

/// Session journals in Redis (see the module documentation).
pub struct RedisJournal {
    conn: ConnectionManager,
    options: RedisOptions,
    held: Mutex<HashMap<String, Held>>,
    count: AtomicUsize,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJournal")
            .field("node", &self.options.node)
            .finish_non_exhaustive()
    }
}

/// Keeps a session's journal from expiring for the retention (`ARGV[1]` ms, 0 for
/// ever) from now. Shared by the scripts below.
const KEEP: &str = r"
local function keep(ms)
  if tonumber(ms) > 0 then
    redis.call('PEXPIRE', KEYS[1], ms)
    redis.call('PEXPIRE', KEYS[2], ms)
  end
end
";

/// `mine`: whether the caller (owner value `value`, `node token`) still owns the
/// session whose meta and owner keys are `meta` and `owner`: it holds the lease, or its
/// lease ran out and nobody took the session since (its token is still the session's).
/// `owns`: the same, taking a lapsed lease again for `lease` ms. Shared by the scripts.
const OWNS: &str = r"
local function mine(meta, owner, value)
  local current = redis.call('GET', owner)
  if current then return current == value end
  return redis.call('HGET', meta, 'token') == string.match(value, ' (%d+)$')
end
local function owns(meta, owner, value, lease)
  if not mine(meta, owner, value) then return false end
  redis.call('SET', owner, value, 'PX', lease)
  return true
end
";

/// KEYS: meta, log, owner, index, token counter. ARGV: node, lease ms, now ms, id,
/// retention ms. Takes the lease unless another node holds it, with a token greater
/// than any given before (even to a session since deleted): `{1, token, entries,
/// bytes, snapshot bytes or -1, created, sessions}` or `{0, lease ms left, owner}`.
const ACQUIRE: &str = r"
local owner = redis.call('GET', KEYS[3])
if owner and string.sub(owner, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then
  return {0, redis.call('PTTL', KEYS[3]), owner}
end
local token = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], 'token', token)
if redis.call('HEXISTS', KEYS[1], 'created') == 0 then
  redis.call('HSET', KEYS[1], 'created', ARGV[3], 'entries', 0, 'bytes', 0)
end
redis.call('HSET', KEYS[1], 'used', ARGV[3])
redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
keep(ARGV[5])
local m = redis.call('HMGET', KEYS[1], 'entries', 'bytes', 'snap_bytes', 'created')
return {1, token, tonumber(m[1]), tonumber(m[2]), tonumber(m[3]) or -1, tonumber(m[4]),
        redis.call('ZCARD', KEYS[4])}
";

/// KEYS: meta, log, owner, index. ARGV: owner value, item, size, lease ms, now ms, id,
/// retention ms. `{1, entries, bytes, snapshot bytes or -1}`, or `{0}` if the lease is
/// not the writer's.
const APPEND: &str = r"
if not owns(KEYS[1], KEYS[3], ARGV[1], ARGV[4]) then return {0} end
redis.call('RPUSH', KEYS[2], ARGV[2])
local entries = redis.call('HINCRBY', KEYS[1], 'entries', 1)
local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[3])
redis.call('HSET', KEYS[1], 'used', ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
keep(ARGV[7])
return {1, entries, bytes, tonumber(redis.call('HGET', KEYS[1], 'snap_bytes')) or -1}
";

/// KEYS: meta, log, owner, index. ARGV: owner value, snapshot, its size, entries
/// replaced, lease ms, now ms, id, retention ms. As [`APPEND`].
const COMPACT: &str = r"
if not owns(KEYS[1], KEYS[3], ARGV[1], ARGV[5]) then return {0} end
local n = tonumber(ARGV[4])
local dropped = 0
if n > 0 then
  for _, item in ipairs(redis.call('LRANGE', KEYS[2], 0, n - 1)) do
    dropped = dropped + tonumber(string.match(item, '^(%d+):'))
  end
  redis.call('LTRIM', KEYS[2], n, -1)
end
local entries = redis.call('LLEN', KEYS[2])
local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', -dropped)
redis.call('HSET', KEYS[1], 'snap', ARGV[2], 'snap_bytes', ARGV[3], 'entries', entries,
           'used', ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[7])
keep(ARGV[8])
return {1, entries, bytes, tonumber(ARGV[3])}
";

/// KEYS: meta, log, owner. ARGV: owner value, lease ms. `{1, snapshot or false,
/// {items}}`, or `{0}` if the lease is not the reader's.
const ENTRIES: &str = r"
if not owns(KEYS[1], KEYS[3], ARGV[1], ARGV[2]) then return {0} end
return {1, redis.call('HGET', KEYS[1], 'snap'), redis.call('LRANGE', KEYS[2], 0, -1)}
";

/// KEYS: meta, log, owner. ARGV: owner value, lease ms, retention ms. 1 if renewed
/// (the journal's retention too: a session used only by calls that do not change it
/// is still in use), 0 if the lease is not the caller's.
const RENEW: &str = r"
if not owns(KEYS[1], KEYS[3], ARGV[1], ARGV[2]) then return 0 end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
keep(ARGV[3])
return 1
";

/// KEYS: meta, log, owner, index. ARGV: owner value, last use ms, id, retention ms,
/// release (1: give the lease back). If the session is still the caller's, records its
/// last use and, with release, gives the lease back; otherwise changes nothing.
const TOUCH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 or not mine(KEYS[1], KEYS[3], ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'used', ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
keep(ARGV[4])
if ARGV[5] == '1' then redis.call('DEL', KEYS[3]) end
return 1
";

/// KEYS: meta, log, owner, index. ARGV: owner value (empty: the caller holds no
/// lease), id. Deletes the session if it is the caller's, or (holding no lease) if no
/// node holds its lease: `{existed, sessions}`, or `{-1, owner}`.
const REMOVE: &str = r"
local owner = redis.call('GET', KEYS[3])
if ARGV[1] == '' then
  if owner then return {-1, owner} end
elseif not mine(KEYS[1], KEYS[3], ARGV[1]) then
  return {-1, owner or 'a newer owner'}
end
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
return {existed, redis.call('ZCARD', KEYS[4])}
";

struct Scripts {
    acquire: Script,
    append: Script,
    compact: Script,
    entries: Script,
    renew: Script,
    touch: Script,
    remove: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_keep = |body: &str| Script::new(&format!("{KEEP}{OWNS}{body}"));
        Scripts {
            acquire: with_keep(ACQUIRE),
            append: with_keep(APPEND),
            compact: with_keep(COMPACT),
            entries: Script::new(&format!("{OWNS}{ENTRIES}")),
            renew: with_keep(RENEW),
            touch: with_keep(TOUCH),
            remove: Script::new(&format!("{OWNS}{REMOVE}")),
        }
    }
}

fn unavailable(what: &str) -> impl Fn(redis::RedisError) -> JournalError + '_ {
    move |e| JournalError::unavailable(format!("Redis, {what}: {e}"))
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn items(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

fn stats(entries: &Value, bytes: &Value, snapshot: &Value) -> JournalStats {
    let snapshot = int(snapshot);
    JournalStats {
        entries: int(entries).max(0) as usize,
        bytes: int(bytes).max(0) as usize,
        snapshot_bytes: (snapshot >= 0).then_some(snapshot as usize),
    }
}

/// `url` with any password in it replaced by `***`, for messages.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// A journal entry from its JSON text.
fn decode(json: &str) -> Result<std::sync::Arc<JournalEntry>, JournalError> {
    serde_json::from_str(json)
        .map(std::sync::Arc::new)
        .map_err(|e| JournalError::refused(format!("a stored entry is not a journal entry: {e}")))
}

impl RedisJournal {
    /// Connects to the Redis at `url` (`redis://HOST:PORT/DB`).
    pub async fn open(url: &str, options: RedisOptions) -> Result<RedisJournal, JournalError> {
        check_node_name(&options.node).map_err(JournalError::refused)?;
        let shown = without_password(url);
        let client = redis::Client::open(url)
            .map_err(|e| JournalError::refused(format!("bad Redis URL {shown:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.command_timeout))
            .set_response_timeout(Some(options.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                JournalError::unavailable(format!("cannot reach Redis at {shown}: {e}"))
            })?;
        let index = format!("{}:sessions", options.prefix);
        let count: i64 = redis::cmd("ZCARD")
            .arg(&index)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("counting the sessions"))?;
        Ok(RedisJournal {
            conn,
            options,
            held: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(count.max(0) as usize),
            scripts: Scripts::new(),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.options.node
    }

    fn keys(&self, id: &str) -> [String; 4] {
        let prefix = &self.options.prefix;
        [
            format!("{prefix}:{{{id}}}:meta"),
            format!("{prefix}:{{{id}}}:log"),
            format!("{prefix}:{{{id}}}:owner"),
            format!("{prefix}:sessions"),
        ]
    }

    fn owner_value(&self, token: u64) -> String {
        format!("{} {token}", self.options.node)
    }

    fn lease_ms(&self) -> u64 {
        self.options.lease_ttl.as_millis() as u64
    }

    fn retention_ms(&self) -> u64 {
        self.options.retention.map_or(0, |r| r.as_millis() as u64)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().expect("held leases poisoned")
    }

    /// The lease this node holds on session `id` for `epoch`.
    fn lease(&self, id: &str, epoch: u64) -> Result<Held, JournalError> {
        match self.held().get(id) {
            Some(held) if held.epoch == epoch => Ok(*held),
            _ => Err(JournalError::moved(format!(
                "node {} does not hold the lease of session `{id}` (epoch {epoch})",
                self.options.node
            ))),
        }
    }

    /// Forgets the lease of `id` (of `epoch`): lost, given back or deleted.
    fn drop_lease(&self, id: &str, epoch: u64) {
        let mut held = self.held();
        if held.get(id).is_some_and(|h| h.epoch == epoch) {
            held.remove(id);
        }
    }

    fn renewed(&self, id: &str, epoch: u64) {
        if let Some(held) = self.held().get_mut(id).filter(|h| h.epoch == epoch) {
            held.renewed = Instant::now();
        }
    }

    fn lost(&self, id: &str, epoch: u64) -> JournalError {
        self.drop_lease(id, epoch);
        JournalError::moved(format!(
            "node {} lost the lease of session `{id}`: another node owns it now",
            self.options.node
        ))
    }

    async fn run(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
        what: &str,
    ) -> Result<Value, JournalError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable(what))
    }

    /// A write's answer: the journal's stats, or the lease lost.
    fn written(&self, id: &str, epoch: u64, reply: Value) -> Result<JournalStats, JournalError> {
        let reply = items(reply);
        if reply.first().map(int) != Some(1) || reply.len() < 4 {
            return Err(self.lost(id, epoch));
        }
        self.renewed(id, epoch);
        Ok(stats(&reply[1], &reply[2], &reply[3]))
    }

    /// Deletes session `id` unless another node holds its lease (`owner`: this node's
    /// owner value, if it holds it): whether it existed, or who holds it.
    async fn try_remove(
        &self,
        id: &str,
        owner: &str,
    ) -> Result<Result<bool, String>, JournalError> {
        let reply = items(
            self.run(
                &self.scripts.remove,
                &self.keys(id),
                &[owner.to_owned(), id.to_owned()],
                "removing a session",
            )
            .await?,
        );
        match reply.first().map(int) {
            Some(-1) => Ok(Err(reply.get(1).and_then(text).unwrap_or_default())),
            Some(existed) => {
                if let Some(count) = reply.get(1) {
                    self.count
                        .store(int(count).max(0) as usize, Ordering::Relaxed);
                }
                Ok(Ok(existed == 1))
            }
            None => Err(JournalError::unavailable(
                "Redis gave no answer to a removal",
            )),
        }
    }
}

#[async_trait]
impl SessionJournal for RedisJournal {
    async fn append(
        &self,
        id: &str,
        epoch: u64,
        entry: JournalEntry,
    ) -> Result<JournalStats, JournalError> {
        let lease = self.lease(id, epoch)?;
        let json = serde_json::to_string(&entry)
            .map_err(|e| JournalError::refused(format!("entry is not JSON: {e}")))?;
        let size = entry.size();
        let now = millis(SystemTime::now());
        let args = [
            self.owner_value(lease.token),
            format!("{size}:{json}"),
            size.to_string(),
            self.lease_ms().to_string(),
            now.to_string(),
            id.to_owned(),
            self.retention_ms().to_string(),
        ];
        let reply = self
            .run(&self.scripts.append, &self.keys(id), &args, "appending")
            .await?;
        self.written(id, epoch, reply)
    }

    async fn entries(
        &self,
        id: &str,
        epoch: u64,
    ) -> Result<Vec<std::sync::Arc<JournalEntry>>, JournalError> {
        let lease = self.lease(id, epoch)?;
        let reply = items(
            self.run(
                &self.scripts.entries,
                &self.keys(id)[..3],
                &[self.owner_value(lease.token), self.lease_ms().to_string()],
                "reading a journal",
            )
            .await?,
        );
        if reply.first().map(int) != Some(1) {
            return Err(self.lost(id, epoch));
        }
        let mut reply = reply.into_iter().skip(1);
        let snapshot = reply.next().as_ref().and_then(text);
        let logged = reply.next().map(items).unwrap_or_default();
        let mut out = Vec::with_capacity(logged.len() + 1);
        if let Some(snapshot) = snapshot {
            out.push(decode(&snapshot)?);
        }
        for item in &logged {
            // `size:entry`
            let item = text(item).unwrap_or_default();
            out.push(decode(
                item.split_once(':').map_or(&*item, |(_, json)| json),
            )?);
        }
        Ok(out)
    }

    async fn compact(
        &self,
        id: &str,
        epoch: u64,
        snapshot: JournalEntry,
        replaced: usize,
    ) -> Result<JournalStats, JournalError> {
        let lease = self.lease(id, epoch)?;
        let json = serde_json::to_string(&snapshot)
            .map_err(|e| JournalError::refused(format!("snapshot is not JSON: {e}")))?;
        let now = millis(SystemTime::now());
        let args = [
            self.owner_value(lease.token),
            json,
            snapshot.size().to_string(),
            replaced.to_string(),
            self.lease_ms().to_string(),
            now.to_string(),
            id.to_owned(),
            self.retention_ms().to_string(),
        ];
        let reply = self
            .run(&self.scripts.compact, &self.keys(id), &args, "compacting")
            .await?;
        self.written(id, epoch, reply)
    }

    async fn stats(&self, id: &str, epoch: u64) -> Result<JournalStats, JournalError> {
        if self.lease(id, epoch).is_err() {
            return Ok(JournalStats::default());
        }
        Ok(self.stored(id).await?.map(|s| s.stats).unwrap_or_default())
    }

    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<bool, JournalError> {
        let held = self.held().get(id).copied();
        let owner = match (held, epoch) {
            // A newer session under the id is this node's: the older one is gone.
            (Some(held), Some(epoch)) if held.epoch > epoch => return Ok(false),
            (Some(held), _) => self.owner_value(held.token),
            // This node never took that session over: what is stored is not its own.
            (None, Some(_)) => return Ok(false),
            (None, None) => String::new(),
        };
        let deadline = Instant::now() + self.options.lease_wait;
        loop {
            match self.try_remove(id, &owner).await? {
                Ok(existed) => {
                    if let Some(held) = held {
                        self.drop_lease(id, held.epoch);
                    }
                    return Ok(existed);
                }
                Err(other) if Instant::now() >= deadline => {
                    return Err(JournalError::moved(format!(
                        "session `{id}` is held by node {} past {:?}",
                        other.split(' ').next().unwrap_or("?"),
                        self.options.lease_wait
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn durable(&self) -> bool {
        true
    }

    fn session_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    async fn stored(&self, id: &str) -> Result<Option<StoredSession>, JournalError> {
        let mut conn = self.conn.clone();
        let fields: Vec<Value> = redis::cmd("HMGET")
            .arg(&self.keys(id)[0])
            .arg(&["token", "entries", "bytes", "snap_bytes", "created", "used"])
            .query_async(&mut conn)
            .await
            .map_err(unavailable("reading a session"))?;
        if fields
            .first()
            .is_none_or(|token| matches!(token, Value::Nil))
        {
            return Ok(None);
        }
        let snapshot = match &fields[3] {
            Value::Nil => Value::Int(-1),
            other => other.clone(),
        };
        Ok(Some(StoredSession {
            epoch: int(&fields[0]) as u64,
            stats: stats(&fields[1], &fields[2], &snapshot),
            created: time_of(int(&fields[4])),
            last_used: time_of(int(&fields[5])),
        }))
    }

    async fn adopt(&self, id: &str, epoch: u64) -> Result<Option<StoredSession>, JournalError> {
        let deadline = Instant::now() + self.options.lease_wait;
        let args = |now: i64| {
            [
                self.options.node.clone(),
                self.lease_ms().to_string(),
                now.to_string(),
                id.to_owned(),
                self.retention_ms().to_string(),
            ]
        };
        let reply = loop {
            let now = millis(SystemTime::now());
            let mut keys = self.keys(id).to_vec();
            keys.push(format!("{}:tokens", self.options.prefix));
            let reply = items(
                self.run(&self.scripts.acquire, &keys, &args(now), "taking a lease")
                    .await?,
            );
            if reply.first().map(int) == Some(1) && reply.len() >= 7 {
                break reply;
            }
            // Until the lease runs out, or a tenth of a second (it may be given back).
            let left = reply.get(1).map_or(25, int).clamp(5, 100);
            if Instant::now() >= deadline {
                let owner = reply.get(2).and_then(text).unwrap_or_default();
                return Err(JournalError::moved(format!(
                    "session `{id}` is held by node {} and was not released within {:?}",
                    owner.split(' ').next().unwrap_or("?"),
                    self.options.lease_wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(left as u64)).await;
        };
        let token = int(&reply[1]) as u64;
        self.count
            .store(int(&reply[6]).max(0) as usize, Ordering::Relaxed);
        self.held().insert(
            id.to_owned(),
            Held {
                epoch,
                token,
                renewed: Instant::now(),
            },
        );
        let stats = stats(&reply[2], &reply[3], &reply[4]);
        if stats.entries == 0 && stats.snapshot_bytes.is_none() {
            return Ok(None);
        }
        Ok(Some(StoredSession {
            epoch: token,
            stats,
            created: time_of(int(&reply[5])),
            last_used: SystemTime::now(),
        }))
    }

    async fn renew(&self, id: &str, epoch: u64) -> Result<(), JournalError> {
        let lease = self.lease(id, epoch)?;
        if lease.renewed.elapsed() < self.options.lease_ttl / 3 {
            return Ok(());
        }
        let reply = self
            .run(
                &self.scripts.renew,
                &self.keys(id)[..3],
                &[
                    self.owner_value(lease.token),
                    self.lease_ms().to_string(),
                    self.retention_ms().to_string(),
                ],
                "renewing a lease",
            )
            .await?;
        if int(&reply) != 1 {
            return Err(self.lost(id, epoch));
        }
        self.renewed(id, epoch);
        Ok(())
    }

    async fn touch(&self, id: &str, epoch: u64, used: SystemTime) -> Result<(), JournalError> {
        self.record_use(id, epoch, used, false).await
    }

    async fn release(&self, id: &str, epoch: u64, used: SystemTime) -> Result<(), JournalError> {
        self.record_use(id, epoch, used, true).await?;
        self.drop_lease(id, epoch);
        Ok(())
    }

    async fn unused_since(
        &self,
        _before: SystemTime,
        _most: usize,
    ) -> Result<Vec<(String, u64)>, JournalError> {
        // Redis expires unused journals itself; only the index needs pruning.
        self.prune_index().await?;
        Ok(Vec::new())
    }

    async fn max_epoch(&self) -> Result<u64, JournalError> {
        // The pool's epochs are its own; Redis's tokens fence between nodes.
        Ok(0)
    }
}

impl RedisJournal {
    async fn record_use(
        &self,
        id: &str,
        epoch: u64,
        used: SystemTime,
        release: bool,
    ) -> Result<(), JournalError> {
        let owner = self
            .held()
            .get(id)
            .filter(|h| h.epoch == epoch)
            .map(|h| self.owner_value(h.token))
            .unwrap_or_default();
        let args = [
            owner,
            millis(used).to_string(),
            id.to_owned(),
            self.retention_ms().to_string(),
            if release { "1" } else { "0" }.to_owned(),
        ];
        self.run(
            &self.scripts.touch,
            &self.keys(id),
            &args,
            "recording a session's use",
        )
        .await
        .map(drop)
    }

    /// Drops from the index the sessions whose journals Redis expired, oldest first, a
    /// bounded number at a time.
    async fn prune_index(&self) -> Result<(), JournalError> {
        let Some(retention) = self.options.retention else {
            return Ok(());
        };
        let Some(before) = SystemTime::now().checked_sub(retention) else {
            return Ok(());
        };
        let index = format!("{}:sessions", self.options.prefix);
        let mut conn = self.conn.clone();
        let stale: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(millis(before))
            .arg("LIMIT")
            .arg(0)
            .arg(256)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("listing unused sessions"))?;
        for id in stale {
            let meta = &self.keys(&id)[0];
            let exists: bool = redis::cmd("EXISTS")
                .arg(meta)
                .query_async(&mut conn)
                .await
                .map_err(unavailable("checking a session"))?;
            if !exists {
                let _: i64 = redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&id)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable("pruning the session index"))?;
            }
        }
        let count: i64 = redis::cmd("ZCARD")
            .arg(&index)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("counting the sessions"))?;
        self.count.store(count.max(0) as usize, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_show_no_password() {
        assert_eq!(
            without_password("redis://app:s3cret@db.internal:6379/0"),
            "redis://app:***@db.internal:6379/0"
        );
        assert_eq!(
            without_password("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }

    #[test]
    fn node_names_are_plain() {
        assert!(check_node_name("node-1.eu:8700").is_ok());
        assert!(check_node_name("").is_err());
        assert!(check_node_name("two words").is_err());
        assert!(check_node_name(&"n".repeat(129)).is_err());
    }
}
