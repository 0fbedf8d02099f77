//! Setting up a Python environment with DSPy for the workers, idempotently and with
//! visible progress.
//!
//! The environment is a venv in a directory the caller chooses. A stamp file records
//! what was installed; when it matches, the set-up is a no-op.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The requirements the DSPy bridge is tested against.
pub const DSPY_REQUIREMENTS: &str = include_str!("../python/requirements-dspy.txt");

const STAMP_FILE: &str = ".snakepool-dspy-stamp";

/// A failed set-up step, with what the tool printed.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {detail}")]
pub struct EnvError {
    /// The step, e.g. `creating the virtualenv`.
    pub step: String,
    /// The command's error output or the OS error.
    pub detail: String,
}

/// The interpreter inside venv `dir`.
pub fn venv_python(dir: &Path) -> PathBuf {
    dir.join("bin").join("python")
}

/// The requirement lines of [`DSPY_REQUIREMENTS`], comments and blanks dropped.
pub fn dspy_requirements() -> Vec<String> {
    DSPY_REQUIREMENTS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Makes sure venv `dir` exists with DSPy installed; returns its interpreter.
///
/// `base_python` creates the venv. Progress goes to stderr as a spinner per step.
pub fn ensure_dspy_env(dir: &Path, base_python: &str) -> Result<PathBuf, EnvError> {
    let python = venv_python(dir);
    let requirements = dspy_requirements();
    let want = requirements.join("\n");
    let stamp = dir.join(STAMP_FILE);
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(python);
    }
    if !python.exists() {
        run_step(
            &format!("creating a Python virtualenv in {}", dir.display()),
            Command::new(base_python).arg("-m").arg("venv").arg(dir),
        )?;
    }
    run_step(
        &format!(
            "installing {} (first run only; this takes a minute)",
            requirements.join(", ")
        ),
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&requirements),
    )?;
    std::fs::write(&stamp, &want).map_err(|e| EnvError {
        step: "recording the installed requirements".into(),
        detail: e.to_string(),
    })?;
    Ok(python)
}

fn run_step(step: &str, command: &mut Command) -> Result<(), EnvError> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .expect("valid progress template"),
    );
    spinner.set_message(step.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(120));
    let output = command.output();
    spinner.finish_and_clear();
    let failed = |detail: String| EnvError {
        step: step.to_owned(),
        detail,
    };
    let output = output.map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(failed(format!("{}\n{}", output.status, tail.join("\n"))));
    }
    eprintln!("✓ {step}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_are_pinned_lines() {
        let reqs = dspy_requirements();
        assert!(!reqs.is_empty());
        assert!(reqs.iter().all(|r| r.starts_with("dspy==")), "{reqs:?}");
    }

    #[test]
    fn an_up_to_date_env_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(venv_python(dir.path()), b"").unwrap();
        std::fs::write(dir.path().join(STAMP_FILE), dspy_requirements().join("\n")).unwrap();
        // No python at this base path: any step would fail, so success means no step ran.
        let python = ensure_dspy_env(dir.path(), "/nonexistent/python3").unwrap();
        assert_eq!(python, venv_python(dir.path()));
    }

    #[test]
    fn a_failed_step_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_dspy_env(&dir.path().join("venv"), "/nonexistent/python3").unwrap_err();
        assert!(err.step.contains("creating a Python virtualenv"), "{err}");
    }
}
