//! Where the command's log goes and how it looks: stderr, `text` (coloured only on a
//! terminal) or `json` lines, at `info` for `serve` and `warn` for the other commands
//! unless `--log-level`, `SNAKEPOOL_LOG` or `RUST_LOG` says otherwise.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// The filter: `SNAKEPOOL_LOG`, else `RUST_LOG` (both tracing filters, e.g.
/// `snakepool=debug,info`), else `level`, else `default`.
fn filter(level: Option<&str>, default: &str) -> Result<EnvFilter, String> {
    for var in ["SNAKEPOOL_LOG", "RUST_LOG"] {
        if let Some(value) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
            return EnvFilter::try_new(&value).map_err(|e| format!("{var}={value:?}: {e}"));
        }
    }
    let level = level.unwrap_or(default);
    EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))
}

/// Starts logging to stderr.
pub fn init(level: Option<&str>, format: LogFormat, default: &str) -> Result<(), String> {
    let filter = filter(level, default)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
