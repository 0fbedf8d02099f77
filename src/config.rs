//! Pool and server settings from a TOML file, the environment and flags.
//!
//! Every setting is optional at each level; [`Settings::over`] layers them (flags over
//! environment over file over defaults; the command-line parser folds the environment
//! into the flags). A file with an unknown key or a wrong type is refused with an
//! error naming the key and its line.
//!
//! ```toml
//! workers = 4
//! modules = ["my_handlers"]
//! python_path = ["./handlers"]
//! request_timeout = "30s"
//! spawn = "zygote"
//! listen = "127.0.0.1:8700"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::journal::SyncPolicy;
use crate::lm_policy::{LmProfile, ServedProgram};
use crate::pool::{PoolBuilder, PoolConfig, SpawnMode};

/// Where session journals are kept: `memory`, `sqlite` or a `redis://` URL.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum JournalKind {
    /// In the server's memory: lost when it stops.
    Memory,
    /// In SQLite in the data directory: sessions survive a restart.
    Sqlite,
    /// In the Redis at this URL, shared by the nodes of a cluster.
    Redis(String),
}

impl std::str::FromStr for JournalKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(JournalKind::Memory),
            "sqlite" => Ok(JournalKind::Sqlite),
            url if url.starts_with("redis://") => Ok(JournalKind::Redis(url.to_owned())),
            other => Err(format!(
                "unknown journal `{other}`: memory, sqlite or redis://HOST:PORT/DB"
            )),
        }
    }
}

impl TryFrom<String> for JournalKind {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<JournalKind> for String {
    fn from(kind: JournalKind) -> String {
        match kind {
            JournalKind::Memory => "memory".into(),
            JournalKind::Sqlite => "sqlite".into(),
            JournalKind::Redis(url) => url,
        }
    }
}

/// How long a node's lease on a session lasts without use, by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// One layer of settings; `None` means "not set here".
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Workers kept running.
    pub workers: Option<usize>,
    /// Command modules imported by every worker.
    pub modules: Option<Vec<String>>,
    /// Modules imported at start-up to warm them.
    pub preload: Option<Vec<String>>,
    /// Any protocol-v1 program instead of the runtime, with `{worker_id}`.
    pub worker_cmd: Option<String>,
    /// Interpreter of the worker runtime.
    pub python: Option<PathBuf>,
    /// Directories added to the workers' `PYTHONPATH`.
    pub python_path: Option<Vec<PathBuf>>,
    /// `zygote` or `fresh`.
    pub spawn: Option<SpawnMode>,
    /// Default time a call may take.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Longest wait for a free worker.
    #[serde(default, with = "humantime_serde")]
    pub checkout_timeout: Option<Duration>,
    /// Spawn plus handshake per worker.
    #[serde(default, with = "humantime_serde")]
    pub startup_timeout: Option<Duration>,
    /// Callers allowed to wait for a worker.
    pub max_queue: Option<usize>,
    /// Retire a worker after about this many calls.
    pub recycle_after: Option<u64>,
    /// Random extra calls before retiring, as a fraction.
    pub recycle_jitter: Option<f64>,
    /// Retire a worker above this resident memory, in MiB.
    pub max_rss_mb: Option<u64>,
    /// Ping idle workers after this long.
    #[serde(default, with = "humantime_serde")]
    pub health_interval: Option<Duration>,
    /// Close sessions idle this long.
    #[serde(default, with = "humantime_serde")]
    pub session_ttl: Option<Duration>,
    /// Free idle sessions' state on their workers after this long.
    #[serde(default, with = "humantime_serde")]
    pub session_idle: Option<Duration>,
    /// Largest frame either way, in bytes.
    pub max_frame_bytes: Option<usize>,
    /// Most sessions in memory at once.
    pub max_sessions: Option<usize>,
    /// Most sessions a durable journal holds.
    pub max_stored_sessions: Option<usize>,
    /// Most calls one worker runs at once (for `async` commands).
    pub max_concurrency: Option<usize>,
    /// Most quick sync calls sent to one worker ahead of their turn.
    pub pipeline_depth: Option<usize>,
    /// Threads of the host's async runtime (see [`Settings::server_runtime_threads`]).
    pub runtime_threads: Option<usize>,
    /// Shortest timeout a caller may ask for.
    #[serde(default, with = "humantime_serde")]
    pub min_request_timeout: Option<Duration>,
    /// Longest timeout a caller may ask for.
    #[serde(default, with = "humantime_serde")]
    pub max_request_timeout: Option<Duration>,
    /// How long a session's rebuild on a new worker may take in all.
    #[serde(default, with = "humantime_serde")]
    pub rebuild_timeout: Option<Duration>,
    /// On how many workers a session's rebuild is tried.
    pub max_rebuild_attempts: Option<u32>,
    /// Compact a session's journal into a snapshot after this many entries.
    pub journal_compact_entries: Option<usize>,
    /// ... or once its entries take this many bytes.
    pub journal_compact_bytes: Option<usize>,
    /// Most entries a journal that cannot be compacted may hold.
    pub journal_max_entries: Option<usize>,
    /// Most bytes its entries may take.
    pub journal_max_bytes: Option<usize>,
    /// Where session journals are kept: `memory` or `sqlite` (in `data_dir`).
    pub journal: Option<JournalKind>,
    /// The directory of the durable journal (default: `snakepool` in the working
    /// directory; the command line's default is under the user's state directory).
    pub data_dir: Option<PathBuf>,
    /// Where the worker runtime built into the library is written.
    pub runtime_cache: Option<PathBuf>,
    /// How hard the durable journal's commits try to reach the disk.
    pub journal_sync: Option<SyncPolicy>,
    /// This node's name among the nodes sharing a Redis journal.
    pub node: Option<String>,
    /// How long a node's lease on a session lasts without use (Redis journal).
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
    /// LM profiles by name (`[lm.NAME]` tables).
    pub lm: Option<BTreeMap<String, LmProfile>>,
    /// Whether callers may give an LM's model, endpoint and key variable themselves.
    pub lm_client_settings: Option<bool>,
    /// Where LM profiles with `cache = true` keep their caches.
    pub lm_cache_dir: Option<PathBuf>,
    /// Saved DSPy programs every worker serves without a session (`[program.NAME]`).
    pub program: Option<BTreeMap<String, ServedProgram>>,
    /// Address the HTTP server listens on.
    pub listen: Option<SocketAddr>,
    /// Bearer token every route but `/health` requires.
    pub token: Option<String>,
    /// Bearer token of the operator's routes (sessions list, pool, metrics).
    pub admin_token: Option<String>,
    /// Largest HTTP request body, in bytes.
    pub body_limit: Option<usize>,
    /// Most HTTP connections open at once.
    pub max_connections: Option<usize>,
    /// Longest wait for a request head (also how long an idle connection is kept).
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// Longest wait for a request body.
    #[serde(default, with = "humantime_serde")]
    pub body_read_timeout: Option<Duration>,
    /// After SIGTERM, how long calls in flight may run before they are failed.
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
}

/// A settings file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings (names the key and line).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8700";

/// The default HTTP body limit: 16 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// The default cap on open HTTP connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default wait for a request head (and idle keep-alive).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The default wait for a request body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The default time calls in flight get after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

macro_rules! layer {
    ($top:expr, $bottom:expr, $($field:ident),+) => {
        Settings { $($field: $top.$field.or($bottom.$field)),+ }
    };
}

/// `top`'s entries over `bottom`'s, by name.
fn merge_by_name<T>(
    top: Option<BTreeMap<String, T>>,
    bottom: Option<BTreeMap<String, T>>,
) -> Option<BTreeMap<String, T>> {
    match (top, bottom) {
        (Some(top), Some(mut bottom)) => {
            bottom.extend(top);
            Some(bottom)
        }
        (top, bottom) => top.or(bottom),
    }
}

impl Settings {
    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML settings.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// These settings, with `lower`'s filling what these leave unset. LM profiles
    /// and programs are merged by name, this layer's winning.
    pub fn over(self, lower: Settings) -> Settings {
        let lm = merge_by_name(self.lm.clone(), lower.lm.clone());
        let program = merge_by_name(self.program.clone(), lower.program.clone());
        let mut merged = layer!(
            self,
            lower,
            workers,
            modules,
            preload,
            worker_cmd,
            python,
            python_path,
            spawn,
            request_timeout,
            checkout_timeout,
            startup_timeout,
            max_queue,
            recycle_after,
            recycle_jitter,
            max_rss_mb,
            health_interval,
            session_ttl,
            session_idle,
            max_frame_bytes,
            max_sessions,
            max_stored_sessions,
            max_concurrency,
            pipeline_depth,
            runtime_threads,
            min_request_timeout,
            max_request_timeout,
            rebuild_timeout,
            max_rebuild_attempts,
            journal_compact_entries,
            journal_compact_bytes,
            journal_max_entries,
            journal_max_bytes,
            journal,
            data_dir,
            runtime_cache,
            journal_sync,
            node,
            lease_ttl,
            lm,
            lm_client_settings,
            lm_cache_dir,
            program,
            listen,
            token,
            admin_token,
            body_limit,
            max_connections,
            header_read_timeout,
            body_read_timeout,
            drain_timeout
        );
        merged.lm = lm;
        merged.program = program;
        merged
    }

    /// A pool builder with these settings over the defaults.
    pub fn builder(&self) -> PoolBuilder {
        let mut b = PoolBuilder::default();
        if let Some(n) = self.workers {
            b = b.workers(n);
        }
        for module in self.modules.iter().flatten() {
            b = b.module(module);
        }
        for module in self.preload.iter().flatten() {
            b = b.preload(module);
        }
        if let Some(line) = &self.worker_cmd {
            b = b.worker_cmd(line);
        }
        if let Some(python) = &self.python {
            b = b.python(python);
        }
        if let Some(dir) = &self.runtime_cache {
            b = b.runtime_cache(dir);
        }
        for dir in self.python_path.iter().flatten() {
            b = b.python_path(dir);
        }
        if let Some(mode) = self.spawn {
            b = b.spawn_mode(mode);
        }
        if let Some(t) = self.request_timeout {
            b = b.request_timeout(t);
        }
        if let Some(t) = self.checkout_timeout {
            b = b.checkout_timeout(t);
        }
        if let Some(t) = self.startup_timeout {
            b = b.startup_timeout(t);
        }
        if let Some(n) = self.max_queue {
            b = b.max_queue(n);
        }
        if let Some(n) = self.recycle_after {
            b = b.recycle_after(n, self.recycle_jitter.unwrap_or(0.1));
        }
        if let Some(mb) = self.max_rss_mb {
            b = b.max_rss_bytes(mb * 1024 * 1024);
        }
        if self.health_interval.is_some() {
            b = b.health_interval(self.health_interval);
        }
        if self.session_ttl.is_some() {
            b = b.session_ttl(self.session_ttl);
        }
        if self.session_idle.is_some() {
            b = b.session_idle(self.session_idle);
        }
        if let Some(n) = self.max_frame_bytes {
            b = b.max_frame_bytes(n);
        }
        if let Some(n) = self.max_sessions {
            b = b.max_sessions(n);
        }
        if let Some(n) = self.max_stored_sessions {
            b = b.max_stored_sessions(n);
        }
        if let Some(n) = self.pipeline_depth {
            b = b.pipeline_depth(n);
        }
        if let Some(n) = self.max_concurrency {
            b = b.max_concurrency(n);
        }
        let defaults = PoolConfig::default();
        if self.min_request_timeout.is_some() || self.max_request_timeout.is_some() {
            b = b.client_timeout_range(
                self.min_request_timeout
                    .unwrap_or(defaults.min_request_timeout),
                self.max_request_timeout
                    .unwrap_or(defaults.max_request_timeout),
            );
        }
        if self.rebuild_timeout.is_some() || self.max_rebuild_attempts.is_some() {
            b = b.rebuild_limits(
                self.rebuild_timeout.unwrap_or(defaults.rebuild_timeout),
                self.max_rebuild_attempts
                    .unwrap_or(defaults.max_rebuild_attempts),
            );
        }
        let journal = defaults.journal_limits;
        b = b.journal_limits(crate::pool::JournalLimits {
            compact_entries: self
                .journal_compact_entries
                .unwrap_or(journal.compact_entries),
            compact_bytes: self.journal_compact_bytes.unwrap_or(journal.compact_bytes),
            max_entries: self.journal_max_entries.unwrap_or(journal.max_entries),
            max_bytes: self.journal_max_bytes.unwrap_or(journal.max_bytes),
        });
        match &self.journal {
            Some(JournalKind::Sqlite) => {
                let dir = self
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("snakepool"));
                b = b.durable_journal(dir, self.journal_sync.unwrap_or_default());
            }
            Some(JournalKind::Redis(url)) => {
                b = b.redis_journal(url, self.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL));
            }
            Some(JournalKind::Memory) | None => {}
        }
        if let Some(node) = &self.node {
            b = b.node(node);
        }
        for (name, profile) in self.lm.iter().flatten() {
            b = b.lm_profile(name, profile.clone());
        }
        if let Some(allow) = self.lm_client_settings {
            b = b.allow_client_lm(allow);
        }
        if let Some(dir) = &self.lm_cache_dir {
            b = b.lm_cache_dir(dir);
        }
        let only_profile = match self.lm.as_ref().map(|p| p.keys().collect::<Vec<_>>()) {
            Some(names) if names.len() == 1 => Some(names[0].clone()),
            _ => None,
        };
        for (name, program) in self.program.iter().flatten() {
            // A program that names no profile runs with the only one, if there is one.
            let profile = match (program.profile.as_str(), &only_profile) {
                ("", Some(only)) => only.clone(),
                (named, _) => named.to_owned(),
            };
            b = b.program(name, &program.path, profile);
        }
        b
    }

    /// The listen address, defaulting to loopback port 8700.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"))
    }

    /// The `runtime_threads` the operator chose, if any.
    pub fn chosen_runtime_threads(&self) -> Result<Option<usize>, String> {
        match self.runtime_threads {
            Some(0) => Err("runtime_threads must be at least 1".into()),
            chosen => Ok(chosen),
        }
    }

    /// Threads for the async runtime of a server of this pool on `cores` cores: the
    /// operator's choice, else the cores the workers leave free, but at least a
    /// quarter of the cores and at least one. Each worker keeps a core busy under
    /// load; server threads beyond the free cores only take turns with the workers,
    /// and every turn costs a context switch and a cross-core wake-up.
    pub fn server_runtime_threads(&self, cores: usize) -> Result<usize, String> {
        let workers = self.workers.unwrap_or(cores);
        Ok(self
            .chosen_runtime_threads()?
            .unwrap_or_else(|| cores.saturating_sub(workers).max(cores / 4).max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_threads_leave_the_workers_their_cores() {
        let with = |workers: Option<usize>, threads: Option<usize>| Settings {
            workers,
            runtime_threads: threads,
            ..Settings::default()
        };
        let threads = |settings: Settings, cores| settings.server_runtime_threads(cores).unwrap();
        // Two cores, two workers (the default: one per core): one host thread.
        assert_eq!(threads(with(None, None), 2), 1);
        assert_eq!(threads(with(Some(2), None), 2), 1);
        assert_eq!(threads(with(Some(8), None), 2), 1);
        assert_eq!(threads(with(Some(2), None), 16), 14);
        assert_eq!(threads(with(Some(16), None), 16), 4);
        assert_eq!(threads(with(Some(0), None), 1), 1);
        // The operator's choice wins; none is refused.
        assert_eq!(threads(with(Some(2), Some(3)), 2), 3);
        let none = with(None, Some(0)).server_runtime_threads(2).unwrap_err();
        assert!(none.contains("runtime_threads"), "{none}");
        assert_eq!(with(Some(2), None).chosen_runtime_threads(), Ok(None));
        assert!(with(None, Some(0)).chosen_runtime_threads().is_err());
    }

    #[test]
    fn parses_every_kind_of_value() {
        let settings = Settings::from_toml(
            r#"
            workers = 3
            modules = ["a", "b"]
            spawn = "fresh"
            request_timeout = "1500ms"
            session_ttl = "10m"
            listen = "127.0.0.1:9000"
            max_rss_mb = 512
            "#,
        )
        .unwrap();
        assert_eq!(settings.workers, Some(3));
        assert_eq!(settings.modules, Some(vec!["a".into(), "b".into()]));
        assert_eq!(settings.spawn, Some(SpawnMode::Fresh));
        assert_eq!(settings.request_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(settings.session_ttl, Some(Duration::from_secs(600)));
        assert_eq!(settings.listen_addr().port(), 9000);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = Settings::from_toml("workers = 2\nwokers = 3\n").unwrap_err();
        assert!(err.contains("wokers"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = Settings::from_toml("workers = \"many\"\n").unwrap_err();
        assert!(err.contains("workers"), "{err}");
        let err = Settings::from_toml("spawn = \"cloned\"\n").unwrap_err();
        assert!(err.contains("cloned"), "{err}");
    }

    #[test]
    fn lm_profiles_are_tables_merged_by_name() {
        let file = Settings::from_toml(
            r#"
            lm_client_settings = false
            [lm.fast]
            model = "openai/small"
            api_base = "http://127.0.0.1:9/v1"
            api_key_env = "LM_KEY"
            temperature = 0.2
            [lm.slow]
            model = "openai/big"
            cache = true
            "#,
        )
        .unwrap();
        let profiles = file.lm.clone().unwrap();
        assert_eq!(profiles["fast"].api_key_env.as_deref(), Some("LM_KEY"));
        assert!(profiles["slow"].cache);
        let err = Settings::from_toml("[lm.x]\nmodel = \"m\"\napi_key = \"sk\"\n").unwrap_err();
        assert!(err.contains("api_key"), "{err}");
        let mut flag_profiles = BTreeMap::new();
        flag_profiles.insert("fast".to_owned(), LmProfile::new("openai/other"));
        let flags = Settings {
            lm: Some(flag_profiles),
            ..Settings::default()
        };
        let merged = flags.over(file).lm.unwrap();
        assert_eq!(merged["fast"].model, "openai/other");
        assert_eq!(merged["slow"].model, "openai/big");
    }

    #[test]
    fn a_served_program_runs_with_the_only_profile_unless_it_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qa.json");
        std::fs::write(&file, "{}").unwrap();
        let text = format!(
            "[lm.mini]\nmodel = \"openai/m\"\n[program.qa]\npath = {:?}\n",
            file.display().to_string()
        );
        let settings = Settings::from_toml(&text).unwrap();
        let config = settings.builder().config().unwrap();
        assert_eq!(config.lm.programs["qa"].profile, "mini");
        let two = format!("{text}[lm.big]\nmodel = \"openai/b\"\n");
        let err = Settings::from_toml(&two)
            .unwrap()
            .builder()
            .config()
            .unwrap_err();
        assert!(err.to_string().contains("names no LM profile"), "{err}");
    }

    #[test]
    fn upper_layers_win_field_by_field() {
        let flags = Settings {
            workers: Some(8),
            ..Settings::default()
        };
        let file = Settings {
            workers: Some(2),
            max_queue: Some(5),
            ..Settings::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.workers, Some(8));
        assert_eq!(merged.max_queue, Some(5));
        assert_eq!(merged.listen_addr().to_string(), DEFAULT_LISTEN);
        let config = merged.builder().config().unwrap();
        assert_eq!((config.workers, config.max_queue), (8, 5));
    }
}
