//! The worker runtime (`snakepool_worker`) built into this library. It is written once
//! per version to a directory of its own, which workers get first on their
//! `PYTHONPATH`: a binary works away from its source tree, and its workers always
//! speak its protocol, whatever other version the chosen Python has installed.

use std::io;
use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/runtime_files.rs"));

/// Marks a runtime directory as completely written.
const COMPLETE: &str = ".complete";

/// Writes the built-in runtime under `cache` (once per version; later calls find it)
/// and returns the directory to put on `PYTHONPATH`.
pub fn install(cache: &Path) -> io::Result<PathBuf> {
    let name = format!("runtime-{}-{DIGEST}", env!("CARGO_PKG_VERSION"));
    let dir = cache.join(&name);
    if dir.join(COMPLETE).exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache)?;
    // Written aside (a folder of its own per attempt: pools of one process may start
    // at once), then renamed into place: a concurrent start finds either nothing or a
    // whole runtime.
    let partial = cache.join(format!(
        ".{name}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    for (path, bytes) in FILES {
        let target = partial.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, bytes)?;
    }
    std::fs::write(partial.join(COMPLETE), b"")?;
    match std::fs::rename(&partial, &dir) {
        Ok(()) => Ok(dir),
        // Another process put a whole one there first.
        Err(_) if dir.join(COMPLETE).exists() => {
            let _ = std::fs::remove_dir_all(&partial);
            Ok(dir)
        }
        Err(error) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_written_once_and_whole() {
        let cache = tempfile::tempdir().unwrap();
        let dir = install(cache.path()).unwrap();
        assert!(dir.join("snakepool_worker/__init__.py").exists());
        assert!(dir.join("snakepool_worker/dspy/__init__.py").exists());
        assert!(FILES.iter().all(|(path, _)| path.ends_with(".py")));
        // A second install finds it.
        std::fs::write(dir.join("snakepool_worker/marker"), b"kept").unwrap();
        assert_eq!(install(cache.path()).unwrap(), dir);
        assert!(dir.join("snakepool_worker/marker").exists());
    }
}
