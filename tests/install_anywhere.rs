//! The binary works away from its source tree: run from an empty directory with a
//! home of its own and none of the project's variables, it writes its built-in worker
//! runtime to the user's cache and serves with the Python a user expects (the active
//! virtualenv, else `./.venv`, else `python3`).

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// Runs `snakepool ARGS` in `dir` with `home` as its home and a clean environment.
fn snakepool(dir: &Path, home: &Path, args: &[&str], extra: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_snakepool"));
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home);
    for (key, value) in extra {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_binary_serves_from_any_directory_with_the_expected_python() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();

    // No venv anywhere: python3 on the PATH, the runtime from the binary.
    let ping = snakepool(
        dir.path(),
        home.path(),
        &["call", "ping", "--workers", "1"],
        &[],
    );
    assert!(ping.status.success(), "{}", text(&ping));
    let pong: serde_json::Value = serde_json::from_slice(&ping.stdout).unwrap();
    assert_eq!(pong["status"], "ok", "{pong}");
    let cache = home.path().join(".cache/snakepool");
    let runtimes: Vec<_> = std::fs::read_dir(&cache)
        .unwrap_or_else(|e| panic!("no runtime cache at {}: {e}", cache.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("runtime-"))
        .collect();
    assert_eq!(runtimes.len(), 1, "{runtimes:?}");
    assert!(
        cache
            .join(&runtimes[0])
            .join("snakepool_worker/__init__.py")
            .exists()
    );
    let doctor = snakepool(dir.path(), home.path(), &["doctor"], &[]);
    assert!(text(&doctor).contains("no virtualenv"), "{}", text(&doctor));

    // An active virtualenv is used: the tests' own (`scripts/python-env.sh`).
    let python = common::python();
    let venv = Path::new(&python)
        .parent()
        .and_then(Path::parent)
        .filter(|dir| dir.join("pyvenv.cfg").exists())
        .expect("the tests run with a virtualenv's Python (scripts/python-env.sh)");
    let doctor = snakepool(
        dir.path(),
        home.path(),
        &["doctor"],
        &[("VIRTUAL_ENV", venv)],
    );
    let expected = format!("virtualenv in use: {}", venv.display());
    assert!(text(&doctor).contains(&expected), "{}", text(&doctor));

    // Else ./.venv of the working directory.
    std::os::unix::fs::symlink(venv, dir.path().join(".venv")).unwrap();
    let doctor = snakepool(dir.path(), home.path(), &["doctor"], &[]);
    assert!(
        text(&doctor).contains("virtualenv in use"),
        "{}",
        text(&doctor)
    );
}
