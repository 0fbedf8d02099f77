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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pool::{PoolBuilder, SpawnMode};

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
    /// Largest frame either way, in bytes.
    pub max_frame_bytes: Option<usize>,
    /// Address the HTTP server listens on.
    pub listen: Option<SocketAddr>,
    /// Bearer token every route but `/health` requires.
    pub token: Option<String>,
    /// Largest HTTP request body, in bytes.
    pub body_limit: Option<usize>,
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

macro_rules! layer {
    ($top:expr, $bottom:expr, $($field:ident),+) => {
        Settings { $($field: $top.$field.or($bottom.$field)),+ }
    };
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

    /// These settings, with `lower`'s filling what these leave unset.
    pub fn over(self, lower: Settings) -> Settings {
        layer!(
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
            max_frame_bytes,
            listen,
            token,
            body_limit
        )
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
        if let Some(n) = self.max_frame_bytes {
            b = b.max_frame_bytes(n);
        }
        b
    }

    /// The listen address, defaulting to loopback port 8700.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
