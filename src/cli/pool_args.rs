//! Pool settings on the command line: flags, each with an environment variable, and an
//! optional TOML file underneath (flags over environment over file over defaults).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use serde::Deserialize;
use snakepool::config::{JournalKind, Settings};
use snakepool::lm_policy::{LmProfile, ServedProgram};
use snakepool::{SpawnMode, SyncPolicy};

use super::env;

/// Flags shared by the commands that run a pool of their own.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PoolArgs {
    /// TOML settings file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "SNAKEPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Workers kept running.
    #[arg(long, env = "SNAKEPOOL_WORKERS")]
    pub workers: Option<usize>,
    /// Command module every worker imports (repeatable).
    #[arg(long = "module", env = "SNAKEPOOL_MODULES", value_delimiter = ',')]
    pub modules: Vec<String>,
    /// Module imported at start-up to warm it, e.g. dspy (repeatable).
    #[arg(long = "preload", env = "SNAKEPOOL_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,
    /// Any protocol-v1 program instead of the worker runtime; `{worker_id}` is replaced.
    #[arg(long, env = "SNAKEPOOL_WORKER_CMD")]
    pub worker_cmd: Option<String>,
    /// Python interpreter of the worker runtime.
    #[arg(long, env = "SNAKEPOOL_PYTHON")]
    pub python: Option<PathBuf>,
    /// Directory added to the workers' PYTHONPATH (repeatable).
    #[arg(
        long = "python-path",
        env = "SNAKEPOOL_PYTHON_PATH",
        value_delimiter = ':'
    )]
    pub python_path: Vec<PathBuf>,
    /// How workers start: zygote (forked) or fresh.
    #[arg(long, env = "SNAKEPOOL_SPAWN")]
    pub spawn: Option<SpawnMode>,
    /// Default time a call may take, e.g. 30s.
    #[arg(long, env = "SNAKEPOOL_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Longest wait for a free worker, e.g. 10s (with a Redis journal, also for another
    /// node's lease on a session to end).
    #[arg(long, env = "SNAKEPOOL_CHECKOUT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub checkout_timeout: Option<Duration>,
    /// Spawn plus handshake per worker, e.g. 30s.
    #[arg(long, env = "SNAKEPOOL_STARTUP_TIMEOUT", value_parser = humantime::parse_duration)]
    pub startup_timeout: Option<Duration>,
    /// Callers allowed to wait for a worker.
    #[arg(long, env = "SNAKEPOOL_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Retire a worker after about this many calls.
    #[arg(long, env = "SNAKEPOOL_RECYCLE_AFTER")]
    pub recycle_after: Option<u64>,
    /// Retire a worker above this resident memory (MiB).
    #[arg(long, env = "SNAKEPOOL_MAX_RSS_MB")]
    pub max_rss_mb: Option<u64>,
    /// Ping idle workers after this long, e.g. 30s.
    #[arg(long, env = "SNAKEPOOL_HEALTH_INTERVAL", value_parser = humantime::parse_duration)]
    pub health_interval: Option<Duration>,
    /// Close sessions idle this long, e.g. 1h.
    #[arg(long, env = "SNAKEPOOL_SESSION_TTL", value_parser = humantime::parse_duration)]
    pub session_ttl: Option<Duration>,
    /// Free the state of sessions idle this long on their workers (default 10m); they
    /// stay open and are rebuilt on their next call.
    #[arg(long, env = "SNAKEPOOL_SESSION_IDLE", value_parser = humantime::parse_duration)]
    pub session_idle: Option<Duration>,
    /// Largest frame either way (bytes).
    #[arg(long, env = "SNAKEPOOL_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Most sessions in memory at once (default 100000; with a durable journal,
    /// sessions evicted from their workers leave memory and do not count).
    #[arg(long, env = "SNAKEPOOL_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Most sessions the durable journal holds (default 10000000).
    #[arg(long, env = "SNAKEPOOL_MAX_STORED_SESSIONS")]
    pub max_stored_sessions: Option<usize>,
    /// Most calls one worker runs at once, for async commands (default 32; 1: one
    /// call at a time).
    #[arg(long, env = "SNAKEPOOL_WORKER_CONCURRENCY")]
    pub max_concurrency: Option<usize>,
    /// Most quick sync calls sent to one worker ahead of their turn (default 16; 1:
    /// none).
    #[arg(long, env = "SNAKEPOOL_PIPELINE_DEPTH")]
    pub pipeline_depth: Option<usize>,
    /// Threads of the host's async runtime (default for `serve`: the cores the
    /// workers leave free, at least a quarter of the cores and at least 1; for the
    /// other commands one per core).
    #[arg(long, env = "SNAKEPOOL_RUNTIME_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub runtime_threads: Option<u16>,
    /// Shortest timeout a caller may ask for (default 1s).
    #[arg(long, env = "SNAKEPOOL_MIN_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub min_request_timeout: Option<Duration>,
    /// Longest timeout a caller may ask for (default 10m).
    #[arg(long, env = "SNAKEPOOL_MAX_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub max_request_timeout: Option<Duration>,
    /// How long a session's rebuild on a new worker may take in all (default 60s).
    #[arg(long, env = "SNAKEPOOL_REBUILD_TIMEOUT", value_parser = humantime::parse_duration)]
    pub rebuild_timeout: Option<Duration>,
    /// On how many workers a session's rebuild is tried (default 3).
    #[arg(long, env = "SNAKEPOOL_MAX_REBUILD_ATTEMPTS")]
    pub max_rebuild_attempts: Option<u32>,
    /// Compact a session's journal into a snapshot after this many entries (default
    /// 256).
    #[arg(long, env = "SNAKEPOOL_JOURNAL_COMPACT_ENTRIES")]
    pub journal_compact_entries: Option<usize>,
    /// ... or once its entries take this many bytes (default 262144).
    #[arg(long, env = "SNAKEPOOL_JOURNAL_COMPACT_BYTES")]
    pub journal_compact_bytes: Option<usize>,
    /// Most entries a journal that cannot be compacted may hold (default 10000).
    #[arg(long, env = "SNAKEPOOL_JOURNAL_MAX_ENTRIES")]
    pub journal_max_entries: Option<usize>,
    /// Most bytes its entries may take (default 16777216).
    #[arg(long, env = "SNAKEPOOL_JOURNAL_MAX_BYTES")]
    pub journal_max_bytes: Option<usize>,
    /// Where session journals are kept: `sqlite` in --data-dir (sessions survive a
    /// restart; the default of `serve`), `memory`, or `redis://HOST:PORT/DB` (shared by
    /// the nodes of a cluster; see --node).
    #[arg(long, env = "SNAKEPOOL_JOURNAL")]
    pub journal: Option<JournalKind>,
    /// This node's name among the nodes sharing a Redis journal (default
    /// HOSTNAME:PORT for `serve`); also the `node` label of its metrics.
    #[arg(long, env = "SNAKEPOOL_NODE")]
    pub node: Option<String>,
    /// How long a node's lease on a session lasts without use, e.g. `10s` (the
    /// default): after it, another node may take the session over.
    #[arg(long, env = "SNAKEPOOL_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// The durable journal's directory (default: `snakepool` under the user's state
    /// directory). One server per directory.
    #[arg(long, env = "SNAKEPOOL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `normal` (a commit survives the process being killed) or `full` (also a power
    /// loss; slower).
    #[arg(long, env = "SNAKEPOOL_JOURNAL_SYNC")]
    pub journal_sync: Option<SyncPolicy>,
    /// LM profile `NAME:model=M[,api_base=URL][,api_key_env=VAR][,temperature=T][,max_tokens=N][,cache=true]`
    /// (repeatable); callers select it with `configure_lm {"profile": NAME}`.
    #[arg(long = "lm-profile", env = "SNAKEPOOL_LM_PROFILE", value_delimiter = ';',
          value_parser = parse_lm_profile)]
    pub lm_profiles: Vec<(String, LmProfile)>,
    /// Let callers give an LM's model, api_base and api_key_env themselves (off:
    /// they pick a profile).
    #[arg(long, env = "SNAKEPOOL_ALLOW_CLIENT_LM")]
    pub allow_client_lm: bool,
    /// Directory of the response caches of LM profiles with cache=true (memory only
    /// when unset).
    #[arg(long, env = "SNAKEPOOL_LM_CACHE_DIR")]
    pub lm_cache_dir: Option<PathBuf>,
    /// Saved DSPy program served by every worker without a session:
    /// `NAME=PATH[,profile=PROFILE]` (the profile may be left out when only one is
    /// defined); callers run `execute_program {"program": NAME, "inputs": {...}}`.
    #[arg(long = "program", env = "SNAKEPOOL_PROGRAM", value_delimiter = ';',
          value_parser = parse_program)]
    pub programs: Vec<(String, ServedProgram)>,
}

/// Parses `NAME=PATH[,profile=PROFILE]`.
fn parse_program(text: &str) -> Result<(String, ServedProgram), String> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH[,profile=PROFILE], got {text:?}"))?;
    let (path, profile) = match rest.rsplit_once(",profile=") {
        Some((path, profile)) => (path, profile.trim().to_owned()),
        None => (rest, String::new()),
    };
    if path.trim().is_empty() {
        return Err(format!("program `{name}` has no file"));
    }
    Ok((
        name.trim().to_owned(),
        ServedProgram {
            path: PathBuf::from(path.trim()),
            profile,
        },
    ))
}

/// Parses `NAME:key=value,...` into a named LM profile.
fn parse_lm_profile(text: &str) -> Result<(String, LmProfile), String> {
    let (name, pairs) = text
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:model=...,..., got {text:?}"))?;
    let mut table = toml::Table::new();
    for pair in pairs.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("expected key=value in LM profile `{name}`, got {pair:?}"))?;
        let value = value.trim();
        let value = if let Ok(n) = value.parse::<i64>() {
            toml::Value::Integer(n)
        } else if let Ok(x) = value.parse::<f64>() {
            toml::Value::Float(x)
        } else if let Ok(b) = value.parse::<bool>() {
            toml::Value::Boolean(b)
        } else {
            toml::Value::String(value.to_owned())
        };
        table.insert(key.trim().to_owned(), value);
    }
    let profile = LmProfile::deserialize(toml::Value::Table(table))
        .map_err(|e| format!("LM profile `{name}`: {e}"))?;
    Ok((name.trim().to_owned(), profile))
}

fn non_empty<T>(values: &[T]) -> Option<Vec<T>>
where
    T: Clone,
{
    (!values.is_empty()).then(|| values.to_vec())
}

impl PoolArgs {
    /// The flags (and their environment variables) as a settings layer.
    pub fn flags(&self) -> Settings {
        Settings {
            workers: self.workers,
            modules: non_empty(&self.modules),
            preload: non_empty(&self.preload),
            worker_cmd: self.worker_cmd.clone(),
            python: self.python.clone(),
            python_path: non_empty(&self.python_path),
            spawn: self.spawn,
            request_timeout: self.request_timeout,
            checkout_timeout: self.checkout_timeout,
            startup_timeout: self.startup_timeout,
            max_queue: self.max_queue,
            recycle_after: self.recycle_after,
            max_rss_mb: self.max_rss_mb,
            health_interval: self.health_interval,
            session_ttl: self.session_ttl,
            session_idle: self.session_idle,
            max_frame_bytes: self.max_frame_bytes,
            max_sessions: self.max_sessions,
            max_stored_sessions: self.max_stored_sessions,
            max_concurrency: self.max_concurrency,
            pipeline_depth: self.pipeline_depth,
            runtime_threads: self.runtime_threads.map(usize::from),
            min_request_timeout: self.min_request_timeout,
            max_request_timeout: self.max_request_timeout,
            rebuild_timeout: self.rebuild_timeout,
            max_rebuild_attempts: self.max_rebuild_attempts,
            journal_compact_entries: self.journal_compact_entries,
            journal_compact_bytes: self.journal_compact_bytes,
            journal_max_entries: self.journal_max_entries,
            journal_max_bytes: self.journal_max_bytes,
            journal: self.journal.clone(),
            node: self.node.clone(),
            lease_ttl: self.lease_ttl,
            data_dir: self.data_dir.clone(),
            journal_sync: self.journal_sync,
            lm: (!self.lm_profiles.is_empty())
                .then(|| self.lm_profiles.iter().cloned().collect::<BTreeMap<_, _>>()),
            lm_client_settings: self.allow_client_lm.then_some(true),
            lm_cache_dir: self.lm_cache_dir.clone(),
            program: (!self.programs.is_empty())
                .then(|| self.programs.iter().cloned().collect::<BTreeMap<_, _>>()),
            ..Settings::default()
        }
    }

    /// Threads for the async runtime of a command that runs this pool: the chosen
    /// number, or with `serving` what [`Settings::server_runtime_threads`] picks;
    /// `Ok(None)` for tokio's default (one per core), also when the settings cannot
    /// be read (the command then says why).
    pub fn runtime_threads(&self, serving: bool) -> Result<Option<usize>, String> {
        let Ok(settings) = self.settings() else {
            return Ok(None);
        };
        if !serving {
            return settings.chosen_runtime_threads();
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        settings.server_runtime_threads(cores).map(Some)
    }

    /// Flags over the settings file (if any).
    pub fn settings(&self) -> Result<Settings, String> {
        self.settings_with(Settings::default())
    }

    /// Flags, then `extra` (more flags of the calling command), then the file.
    pub fn settings_with(&self, extra: Settings) -> Result<Settings, String> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path).map_err(|e| e.to_string())?,
            None => Settings::default(),
        };
        let mut settings = self.flags().over(extra).over(file);
        // What the environment says where nothing else did.
        settings.python.get_or_insert_with(env::default_python);
        settings
            .runtime_cache
            .get_or_insert_with(env::runtime_cache);
        settings.data_dir.get_or_insert_with(env::data_dir);
        Ok(settings)
    }
}

/// Flags of the HTTP server, over the same file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Address to listen on (default 127.0.0.1:8700).
    #[arg(long, env = "SNAKEPOOL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Bearer token required on every route but /health.
    #[arg(long, env = "SNAKEPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token of the operator's routes (GET /v1/sessions, /v1/pool, /metrics),
    /// which then refuse the client token: clients cannot list each other's sessions.
    #[arg(long, env = "SNAKEPOOL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest request body (bytes, default 16 MiB).
    #[arg(long, env = "SNAKEPOOL_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Most HTTP connections open at once (default 1024).
    #[arg(long, env = "SNAKEPOOL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Longest wait for a request head, also how long an idle connection is kept
    /// (default 10s).
    #[arg(long, env = "SNAKEPOOL_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// Longest wait for a request body (default 30s).
    #[arg(long, env = "SNAKEPOOL_BODY_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Option<Duration>,
    /// After SIGTERM, how long calls in flight may run before they are failed and
    /// their workers killed (default 30s).
    #[arg(long, env = "SNAKEPOOL_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
}

impl ServerArgs {
    /// The flags as a settings layer.
    pub fn flags(&self) -> Settings {
        Settings {
            listen: self.listen,
            token: self.token.clone(),
            admin_token: self.admin_token.clone(),
            body_limit: self.body_limit,
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            drain_timeout: self.drain_timeout,
            ..Settings::default()
        }
    }
}

/// The pool's flags given on this process's command line (not those set from the
/// environment), e.g. `--workers`: for commands that take them only without `--url`.
pub fn given_on_command_line() -> Vec<String> {
    use clap::Args as _;
    let pool = PoolArgs::augment_args(clap::Command::new("pool"));
    let longs: Vec<&str> = pool.get_arguments().filter_map(|a| a.get_long()).collect();
    let mut given: Vec<String> = std::env::args()
        .skip(1)
        .filter_map(|arg| {
            let name = arg.strip_prefix("--")?.split('=').next()?.to_owned();
            longs.contains(&name.as_str()).then(|| format!("--{name}"))
        })
        .collect();
    given.dedup();
    given
}
