//! Pool settings and the builder that starts a pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::journal::{
    JournalStats, MemoryJournal, RedisJournal, RedisOptions, SessionJournal, SqliteJournal,
    SyncPolicy,
};
use crate::lm_policy::{LmPolicy, LmProfile, ServedProgram};
use crate::pool::{Pool, SpawnMode};
use crate::worker::{WorkerProgram, WorkerSpec};

/// Every setting of a pool. Build one with [`Pool::builder`].
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// How each worker is started.
    pub worker: WorkerSpec,
    /// Number of workers kept running.
    pub workers: usize,
    /// Default time a call may take before its worker is killed.
    pub request_timeout: Duration,
    /// How long a caller may wait in the queue for a worker.
    pub checkout_timeout: Duration,
    /// Most callers that may wait for a worker; one more is refused as saturated.
    pub max_queue: usize,
    /// Most quick sync calls sent to one worker ahead of their turn (1: none).
    pub pipeline_depth: usize,
    /// Retire a worker after about this many calls.
    pub recycle_after_calls: Option<u64>,
    /// Random extra calls before retiring, as a fraction of `recycle_after_calls`,
    /// so workers do not all retire at once.
    pub recycle_jitter: f64,
    /// Retire a worker whose resident memory exceeds this many bytes.
    pub max_rss_bytes: Option<u64>,
    /// Ping idle workers that have not served a call for this long.
    pub health_interval: Option<Duration>,
    /// How long a health ping may take before the worker is replaced.
    pub health_timeout: Duration,
    /// Close sessions idle for this long (and drop them from the journal store).
    pub session_ttl: Option<Duration>,
    /// Free the state of sessions idle for this long on their workers; they stay open
    /// and are rebuilt on their next call.
    pub session_idle: Option<Duration>,
    /// First delay before retrying a failed worker start; doubles on each failure.
    pub restart_backoff: Duration,
    /// Longest delay between start attempts.
    pub max_restart_backoff: Duration,
    /// Fork workers from a zygote or start each fresh.
    pub spawn_mode: SpawnMode,
    /// Most sessions in the pool's memory at once; opening one more fails with
    /// `TooManySessions`. (On a durable journal, sessions evicted from their workers
    /// leave its memory and do not count.)
    pub max_sessions: usize,
    /// Most sessions a durable journal may hold; a new session past it fails with
    /// `TooManySessions`.
    pub max_stored_sessions: usize,
    /// This pool's name among the nodes sharing a journal: its lease owner in Redis,
    /// the `node` label of its metrics.
    pub node: Option<String>,
    /// Shortest timeout a caller may ask for (see [`crate::Pool::client_timeout`]).
    pub min_request_timeout: Duration,
    /// Longest timeout a caller may ask for.
    pub max_request_timeout: Duration,
    /// How long rebuilding a session on a new worker may take in all, whatever the
    /// timeout of the call that triggered it.
    pub rebuild_timeout: Duration,
    /// On how many workers a session's rebuild is tried before the session is given up
    /// with `SessionRebuildFailed`.
    pub max_rebuild_attempts: u32,
    /// Which language models workers may reach.
    pub lm: LmPolicy,
    /// How often a worker running concurrent calls is pinged to prove its event loop
    /// still answers.
    pub heartbeat_interval: Duration,
    /// How long that ping may take before the worker is killed (its calls fail with
    /// `WorkerCrashed` and their sessions are rebuilt).
    pub heartbeat_timeout: Duration,
    /// When session journals are compacted, and how large they may grow.
    pub journal_limits: JournalLimits,
}

/// Where a builder's pool keeps its session journals.
#[derive(Debug)]
enum JournalChoice {
    /// A store the caller made.
    Given(Arc<dyn SessionJournal>),
    /// SQLite in this directory.
    Sqlite(PathBuf, SyncPolicy),
    /// Redis at this URL, shared with other nodes, with this lease time.
    Redis(String, Duration),
}

/// When a session's journal is compacted into a snapshot, and how large a journal
/// that cannot be compacted may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalLimits {
    /// Compact once this many entries follow the snapshot.
    pub compact_entries: usize,
    /// Compact once the entries after the snapshot take this many bytes.
    pub compact_bytes: usize,
    /// Most entries a journal may hold; past it, calls that would change session
    /// state fail with `JournalFull`.
    pub max_entries: usize,
    /// Most bytes its entries may take.
    pub max_bytes: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        JournalLimits {
            compact_entries: 256,
            compact_bytes: 256 * 1024,
            max_entries: 10_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl JournalLimits {
    /// Whether a journal holding `stats` is due for compaction.
    pub fn compaction_due(&self, stats: &JournalStats) -> bool {
        stats.entries >= self.compact_entries || stats.bytes >= self.compact_bytes
    }

    /// Whether a journal holding `stats` has no room for another entry.
    pub fn full(&self, stats: &JournalStats) -> bool {
        stats.entries >= self.max_entries || stats.bytes >= self.max_bytes
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            worker: WorkerSpec::default(),
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            request_timeout: Duration::from_secs(30),
            checkout_timeout: Duration::from_secs(30),
            max_queue: 1024,
            pipeline_depth: 16,
            recycle_after_calls: None,
            recycle_jitter: 0.1,
            max_rss_bytes: None,
            health_interval: Some(Duration::from_secs(30)),
            health_timeout: Duration::from_secs(5),
            session_ttl: Some(Duration::from_secs(3600)),
            session_idle: Some(Duration::from_secs(600)),
            restart_backoff: Duration::from_millis(100),
            max_restart_backoff: Duration::from_secs(10),
            spawn_mode: SpawnMode::default(),
            max_sessions: 100_000,
            max_stored_sessions: 10_000_000,
            node: None,
            min_request_timeout: Duration::from_secs(1),
            max_request_timeout: Duration::from_secs(600),
            rebuild_timeout: Duration::from_secs(60),
            max_rebuild_attempts: 3,
            lm: LmPolicy::default(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            journal_limits: JournalLimits::default(),
        }
    }
}

impl PoolConfig {
    /// Refuses values that cannot work, naming the setting.
    fn validate(&self) -> Result<()> {
        let invalid =
            |setting: &'static str, reason: String| Err(Error::InvalidConfig { setting, reason });
        if self.workers == 0 {
            return invalid("workers", "a pool needs at least one worker".into());
        }
        if let Some(node) = &self.node {
            crate::journal::check_node_name(node).map_err(|reason| Error::InvalidConfig {
                setting: "node",
                reason,
            })?;
        }
        if self.max_sessions == 0 {
            return invalid("max_sessions", "must be at least 1".into());
        }
        if self.max_stored_sessions == 0 {
            return invalid("max_stored_sessions", "must be at least 1".into());
        }
        if self.worker.max_concurrency == 0 {
            return invalid("max_concurrency", "must be at least 1".into());
        }
        if self.pipeline_depth == 0 {
            return invalid("pipeline_depth", "must be at least 1".into());
        }
        let journal = &self.journal_limits;
        if journal.compact_entries == 0 || journal.compact_entries > journal.max_entries {
            return invalid(
                "journal_compact_entries",
                format!(
                    "must be at least 1 and at most journal_max_entries ({}), got {}",
                    journal.max_entries, journal.compact_entries
                ),
            );
        }
        if journal.compact_bytes == 0 || journal.compact_bytes > journal.max_bytes {
            return invalid(
                "journal_compact_bytes",
                format!(
                    "must be at least 1 and at most journal_max_bytes ({}), got {}",
                    journal.max_bytes, journal.compact_bytes
                ),
            );
        }
        if self.max_rebuild_attempts == 0 {
            return invalid("max_rebuild_attempts", "must be at least 1".into());
        }
        if self.min_request_timeout.is_zero() || self.min_request_timeout > self.max_request_timeout
        {
            return invalid(
                "min_request_timeout",
                format!(
                    "must be above zero and at most max_request_timeout ({:?}), got {:?}",
                    self.max_request_timeout, self.min_request_timeout
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.recycle_jitter) {
            return invalid(
                "recycle_jitter",
                format!("must be within 0..=1, got {}", self.recycle_jitter),
            );
        }
        self.lm.validate().or_else(|reason| invalid("lm", reason))
    }

    /// How often the supervisor looks at idle workers, memory and session TTLs.
    pub(crate) fn maintenance_interval(&self) -> Duration {
        let shortest = [
            self.health_interval,
            self.session_ttl,
            self.session_idle,
            Some(self.heartbeat_interval),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(1));
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// The delay before start attempt number `failures + 1`.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        self.restart_backoff
            .saturating_mul(factor)
            .min(self.max_restart_backoff)
    }
}

/// Builds and starts a [`Pool`].
///
/// ```no_run
/// # async fn demo() -> snakepool::Result<()> {
/// use std::time::Duration;
/// use serde_json::json;
///
/// let pool = snakepool::Pool::builder()
///     .workers(4)
///     .module("my_handlers")
///     .request_timeout(Duration::from_secs(30))
///     .start()
///     .await?;
/// let pong = pool.call("ping", json!({})).await?;
/// let session = pool.session("user-42");
/// session.call("ping", json!({})).await?;
/// session.close().await?;
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct PoolBuilder {
    config: PoolConfig,
    modules: Vec<String>,
    preload: Vec<String>,
    python: Option<PathBuf>,
    python_path: Vec<PathBuf>,
    worker_cmd: Option<String>,
    journal: Option<JournalChoice>,
    runtime_cache: Option<PathBuf>,
}

impl PoolBuilder {
    /// Starts from an existing configuration.
    pub fn from_config(config: PoolConfig) -> Self {
        PoolBuilder {
            config,
            ..PoolBuilder::default()
        }
    }

    /// Number of workers (at least one).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// Imports an extra command module in every worker (repeatable).
    pub fn module(mut self, module: impl Into<String>) -> Self {
        self.modules.push(module.into());
        self
    }

    /// Imports a module at worker start-up to warm it, e.g. `dspy` (repeatable).
    pub fn preload(mut self, module: impl Into<String>) -> Self {
        self.preload.push(module.into());
        self
    }

    /// The Python interpreter for the worker runtime.
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = Some(python.into());
        self
    }

    /// Where the built-in worker runtime is written, once per version (default: a
    /// `snakepool` folder in the system's temporary directory).
    pub fn runtime_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_cache = Some(dir.into());
        self
    }

    /// A directory prepended to the workers' `PYTHONPATH` (repeatable).
    pub fn python_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.python_path.push(dir.into());
        self
    }

    /// Runs any protocol-v1 program instead of the worker runtime, e.g.
    /// `python3 bridge.py --worker-id {worker_id}`.
    pub fn worker_cmd(mut self, command_line: impl Into<String>) -> Self {
        self.worker_cmd = Some(command_line.into());
        self
    }

    /// Sets an environment variable for every worker (over the defaults).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.worker.env.push((key.into(), value.into()));
        self
    }

    /// Default time a call may take before its worker is killed.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// How long a caller may wait for a free worker.
    pub fn checkout_timeout(mut self, timeout: Duration) -> Self {
        self.config.checkout_timeout = timeout;
        self
    }

    /// How long spawn plus handshake may take per worker.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.config.worker.startup_timeout = timeout;
        self
    }

    /// Most callers allowed to wait for a worker.
    pub fn max_queue(mut self, n: usize) -> Self {
        self.config.max_queue = n;
        self
    }

    /// Retire each worker after about `calls` calls, with `jitter` (a fraction of
    /// `calls`) of random extra calls.
    pub fn recycle_after(mut self, calls: u64, jitter: f64) -> Self {
        self.config.recycle_after_calls = Some(calls.max(1));
        self.config.recycle_jitter = jitter;
        self
    }

    /// Retire a worker whose resident memory exceeds `bytes`.
    pub fn max_rss_bytes(mut self, bytes: u64) -> Self {
        self.config.max_rss_bytes = Some(bytes);
        self
    }

    /// Ping idle workers after this long without a call (`None` disables).
    pub fn health_interval(mut self, interval: Option<Duration>) -> Self {
        self.config.health_interval = interval;
        self
    }

    /// How long a health ping may take before the worker is killed and replaced.
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.config.health_timeout = timeout;
        self
    }

    /// Close sessions idle for this long (`None`: only explicit close).
    pub fn session_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.config.session_ttl = ttl;
        self
    }

    /// Free the state of sessions idle this long on their workers (`None`: never);
    /// they stay open and are rebuilt on their next call.
    pub fn session_idle(mut self, idle: Option<Duration>) -> Self {
        self.config.session_idle = idle;
        self
    }

    /// First delay and cap of the back-off between failed worker starts.
    pub fn restart_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.config.restart_backoff = first;
        self.config.max_restart_backoff = max.max(first);
        self
    }

    /// Most calls one worker runs at once (at least 1; default 32), for commands
    /// its runtime may overlap (`async` handlers). 1 runs one call at a time.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.config.worker.max_concurrency = n;
        self
    }

    /// Most calls sent to one worker ahead of their turn (at least 1; default 16; 1
    /// sends none ahead). Only plain calls of a sync command whose calls have taken
    /// under a millisecond on average are sent ahead: they wait in the worker's pipe
    /// instead of the pool's queue, so the worker goes from one to the next without
    /// waiting for the host (see the README's "Pipelining"). A pool with a memory
    /// limit ([`PoolBuilder::max_rss_bytes`]) sends none ahead: each worker's memory
    /// is read after every call, before it serves again.
    pub fn pipeline_depth(mut self, n: usize) -> Self {
        self.config.pipeline_depth = n;
        self
    }

    /// How often a worker running concurrent calls is pinged, and how long the ping
    /// may take before the worker is killed as blocked.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self.config.heartbeat_timeout = timeout;
        self
    }

    /// When session journals are compacted, and how large they may grow.
    pub fn journal_limits(mut self, limits: JournalLimits) -> Self {
        self.config.journal_limits = limits;
        self
    }

    /// Most sessions in the pool's memory at once (at least 1).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.config.max_sessions = n;
        self
    }

    /// This pool's name among nodes sharing a journal (see [`PoolConfig::node`]).
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.config.node = Some(name.into());
        self
    }

    /// Most sessions a durable journal may hold (at least 1).
    pub fn max_stored_sessions(mut self, n: usize) -> Self {
        self.config.max_stored_sessions = n;
        self
    }

    /// The range a caller's own timeout is clamped to (see
    /// [`Pool::client_timeout`](crate::Pool::client_timeout)).
    pub fn client_timeout_range(mut self, min: Duration, max: Duration) -> Self {
        self.config.min_request_timeout = min;
        self.config.max_request_timeout = max;
        self
    }

    /// How long a session's rebuild may take in all, and on how many workers it is
    /// tried, before the session is given up.
    pub fn rebuild_limits(mut self, timeout: Duration, attempts: u32) -> Self {
        self.config.rebuild_timeout = timeout;
        self.config.max_rebuild_attempts = attempts;
        self
    }

    /// Adds a named LM profile that callers select with
    /// `configure_lm {"profile": NAME}`.
    pub fn lm_profile(mut self, name: impl Into<String>, profile: LmProfile) -> Self {
        self.config.lm.profiles.insert(name.into(), profile);
        self
    }

    /// Whether callers may give an LM's `model`, `api_base` and `api_key_env`
    /// themselves (off by default: they pick a profile). Only allow it when every
    /// caller is trusted with every key in the workers' environment.
    pub fn allow_client_lm(mut self, allow: bool) -> Self {
        self.config.lm.client_settings = allow;
        self
    }

    /// Serves the saved DSPy program in `path` (what `dump_program_state` or DSPy's
    /// `program.save` wrote) as `name` on every worker, with LM profile `profile`:
    /// callers run it as a plain call, `execute_program {"program": name, ...}`.
    pub fn program(
        mut self,
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        profile: impl Into<String>,
    ) -> Self {
        self.config.lm.programs.insert(
            name.into(),
            ServedProgram {
                path: path.into(),
                profile: profile.into(),
            },
        );
        self
    }

    /// Where profiles with `cache = true` keep their response caches (memory only
    /// when unset).
    pub fn lm_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.lm.cache_dir = Some(dir.into());
        self
    }

    /// Fork workers from a zygote (default) or start each fresh.
    pub fn spawn_mode(mut self, mode: SpawnMode) -> Self {
        self.config.spawn_mode = mode;
        self
    }

    /// Largest frame accepted from or sent to a worker.
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.config.worker.max_frame_bytes = bytes;
        self
    }

    /// Grace period for a stopping worker after stdin closes and again after SIGTERM.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.config.worker.stop_grace = grace;
        self
    }

    /// Where session journals are kept (default: in memory).
    pub fn journal(mut self, journal: Arc<dyn SessionJournal>) -> Self {
        self.journal = Some(JournalChoice::Given(journal));
        self
    }

    /// Keeps session journals in SQLite in `dir` (opened when the pool starts; a
    /// directory another process uses is refused). A pool started on a directory
    /// that holds sessions resumes them: each is rebuilt on its first call.
    pub fn durable_journal(mut self, dir: impl Into<PathBuf>, sync: SyncPolicy) -> Self {
        self.journal = Some(JournalChoice::Sqlite(dir.into(), sync));
        self
    }

    /// Keeps session journals in the Redis at `url` (`redis://HOST:PORT/DB`), shared
    /// with the other nodes of a cluster: any node can rebuild any session, and a
    /// node serves a session only while it holds its lease (renewed while the session
    /// is used; a new owner waits up to the checkout timeout for it to end). Needs
    /// [`PoolBuilder::node`]; `session_ttl` becomes the journals' retention in Redis.
    pub fn redis_journal(mut self, url: impl Into<String>, lease_ttl: Duration) -> Self {
        self.journal = Some(JournalChoice::Redis(url.into(), lease_ttl));
        self
    }

    /// The configuration this builder would start; a value out of range is refused
    /// with [`Error::InvalidConfig`] naming the setting.
    pub fn config(&self) -> Result<PoolConfig> {
        let mut config = self.config.clone();
        config.validate()?;
        if let Some(line) = &self.worker_cmd {
            config.worker.program =
                WorkerProgram::from_command_line(line).map_err(|reason| Error::StartupFailed {
                    worker: "-".into(),
                    reason,
                    stderr_tail: String::new(),
                })?;
        } else if let WorkerProgram::Runtime {
            python,
            modules,
            preload,
            python_path,
        } = &mut config.worker.program
        {
            preload.extend(self.preload.iter().cloned());
            if let Some(p) = &self.python {
                python.clone_from(p);
            }
            modules.extend(self.modules.iter().cloned());
            let mut dirs = self.python_path.clone();
            dirs.append(python_path);
            *python_path = dirs;
        }
        // The LM policy comes last, so it wins over an `env()` entry of the same name.
        let policy_env = config.lm.worker_env();
        config.worker.env.extend(policy_env);
        Ok(config)
    }

    /// Spawns every worker at once and returns when all are ready.
    ///
    /// Fails with [`Error::StartupFailed`] (with the worker's stderr tail) if any
    /// worker cannot start; the others are stopped.
    pub async fn start(self) -> Result<Pool> {
        let mut config = self.config()?;
        if let WorkerProgram::Runtime { python_path, .. } = &mut config.worker.program {
            let cache = self
                .runtime_cache
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("snakepool"));
            let runtime =
                crate::worker::runtime::install(&cache).map_err(|e| Error::InvalidConfig {
                    setting: "runtime_cache",
                    reason: format!(
                        "cannot write the worker runtime under {}: {e}",
                        cache.display()
                    ),
                })?;
            python_path.insert(0, runtime);
        }
        let journal: Arc<dyn SessionJournal> = match self.journal {
            None => Arc::new(MemoryJournal::default()),
            Some(JournalChoice::Given(journal)) => journal,
            Some(JournalChoice::Sqlite(dir, sync)) => {
                let journal =
                    SqliteJournal::open(&dir, sync).map_err(|e| Error::InvalidConfig {
                        setting: "data_dir",
                        reason: e.message,
                    })?;
                Arc::new(journal)
            }
            Some(JournalChoice::Redis(url, lease_ttl)) => {
                let Some(node) = config.node.clone() else {
                    return Err(Error::InvalidConfig {
                        setting: "node",
                        reason: "a Redis journal is shared between nodes: give this one a name"
                            .into(),
                    });
                };
                let options = RedisOptions {
                    lease_ttl,
                    lease_wait: config.checkout_timeout,
                    retention: config.session_ttl,
                    ..RedisOptions::new(node)
                };
                let journal =
                    RedisJournal::open(&url, options)
                        .await
                        .map_err(|e| Error::InvalidConfig {
                            setting: "journal",
                            reason: e.message,
                        })?;
                Arc::new(journal)
            }
        };
        Pool::start(config, journal).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = PoolConfig {
            restart_backoff: Duration::from_millis(100),
            max_restart_backoff: Duration::from_millis(500),
            ..PoolConfig::default()
        };
        let delays: Vec<u128> = (1..=5).map(|f| config.backoff(f).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn worker_cmd_replaces_runtime_and_modules_accumulate() {
        let config = Pool::builder().module("a").module("b").config().unwrap();
        match config.worker.program {
            WorkerProgram::Runtime { modules, .. } => assert_eq!(modules, vec!["a", "b"]),
            other => panic!("unexpected program {other:?}"),
        }
        let config = Pool::builder()
            .worker_cmd("python3 x.py {worker_id}")
            .config()
            .unwrap();
        assert!(matches!(config.worker.program, WorkerProgram::Command(_)));
        let bad = Pool::builder().worker_cmd("'unclosed").config();
        assert!(matches!(bad, Err(Error::StartupFailed { .. })));
    }

    #[test]
    fn bad_values_are_refused_naming_the_setting() {
        let setting = |b: PoolBuilder| match b.config() {
            Err(Error::InvalidConfig { setting, .. }) => setting,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        assert_eq!(setting(Pool::builder().workers(0)), "workers");
        assert_eq!(setting(Pool::builder().max_sessions(0)), "max_sessions");
        let journal = JournalLimits::default();
        let too_late = JournalLimits {
            compact_entries: journal.max_entries + 1,
            ..journal
        };
        assert_eq!(
            setting(Pool::builder().journal_limits(too_late)),
            "journal_compact_entries"
        );
        let never = JournalLimits {
            compact_bytes: 0,
            ..journal
        };
        assert_eq!(
            setting(Pool::builder().journal_limits(never)),
            "journal_compact_bytes"
        );
        assert_eq!(
            setting(Pool::builder().max_concurrency(0)),
            "max_concurrency"
        );
        assert_eq!(setting(Pool::builder().pipeline_depth(0)), "pipeline_depth");
        assert_eq!(
            setting(
                Pool::builder()
                    .client_timeout_range(Duration::from_secs(5), Duration::from_secs(1))
            ),
            "min_request_timeout"
        );
        assert_eq!(
            setting(Pool::builder().recycle_after(10, 2.0)),
            "recycle_jitter"
        );
        assert_eq!(
            setting(
                Pool::builder().lm_profile("x", LmProfile::new("m").api_key_env("SNAKEPOOL_TOKEN"))
            ),
            "lm"
        );
        let config = Pool::builder()
            .lm_profile("fast", LmProfile::new("openai/m"))
            .config()
            .unwrap();
        assert!(
            config
                .worker
                .env
                .iter()
                .any(|(k, v)| k == crate::lm_policy::PROFILES_ENV && v.contains("openai/m"))
        );
    }
}
