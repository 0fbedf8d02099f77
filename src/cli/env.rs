//! What the command takes from its environment when not told: the workers' Python,
//! where the worker runtime is written, where a server keeps its sessions, and the
//! venv `snakepool demo` sets up. (The library reads none of these.)

use std::path::PathBuf;

/// The workers' Python unless `--python`/`SNAKEPOOL_PYTHON` says: the active
/// virtualenv's (`$VIRTUAL_ENV`), else `./.venv`'s, else `python3` on the `PATH`.
pub fn default_python() -> PathBuf {
    let active = std::env::var_os("VIRTUAL_ENV")
        .filter(|v| !v.is_empty())
        .map(|venv| PathBuf::from(venv).join("bin").join("python"));
    let local = PathBuf::from(".venv").join("bin").join("python");
    active
        .into_iter()
        .chain([local])
        .find(|python| python.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A directory under the user's `$XDG_*_HOME` (else `~/FALLBACK`), else the working
/// directory: `snakepool` there.
fn user_dir(xdg: &str, fallback: &[&str]) -> PathBuf {
    let base = std::env::var_os(xdg)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| fallback.iter().fold(PathBuf::from(home), |p, c| p.join(c)))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("snakepool")
}

/// Where the worker runtime built into the binary is written, once per version:
/// `snakepool` under the user's cache directory.
pub fn runtime_cache() -> PathBuf {
    user_dir("XDG_CACHE_HOME", &[".cache"])
}

/// A server's data directory unless `--data-dir` says: `snakepool` under the user's
/// state directory.
pub fn data_dir() -> PathBuf {
    user_dir("XDG_STATE_HOME", &[".local", "state"])
}

/// The venv `snakepool demo` sets up: `$SNAKEPOOL_VENV`, else `./.venv`.
pub fn demo_venv() -> PathBuf {
    std::env::var_os("SNAKEPOOL_VENV")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(".venv"), PathBuf::from)
}
