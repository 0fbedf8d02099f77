//! `snakepool doctor`: checks the Python side and says how to fix each problem.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use snakepool::worker::zygote::Zygote;
use snakepool::worker::{WorkerProgram, WorkerSpec};

/// Options of `snakepool doctor`.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The interpreter to check (default: $SNAKEPOOL_PYTHON, else the active
    /// virtualenv's, else ./.venv's, else python3).
    #[arg(long, env = "SNAKEPOOL_PYTHON")]
    python: Option<PathBuf>,
    /// Extra command module to check (repeatable).
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Directory the modules are found in (repeatable).
    #[arg(
        long = "python-path",
        env = "SNAKEPOOL_PYTHON_PATH",
        value_delimiter = ':'
    )]
    python_path: Vec<PathBuf>,
}

/// How one check went.
enum Outcome {
    Ok(String),
    Warn(String, String),
    Fail(String, String),
}

fn print(outcome: &Outcome) {
    match outcome {
        Outcome::Ok(what) => println!("✓ {what}"),
        Outcome::Warn(what, fix) => println!("! {what}\n    → {fix}"),
        Outcome::Fail(what, fix) => println!("✗ {what}\n    → fix: {fix}"),
    }
}

/// The directory the binary's worker runtime is written to (set once by [`run`]).
static RUNTIME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn runtime_dir() -> PathBuf {
    RUNTIME.get().cloned().unwrap_or_default()
}

/// Runs `python -c code` with the worker runtime and `extra` on the path; its stdout.
async fn python_says_with(
    python: &PathBuf,
    code: &str,
    extra: &[PathBuf],
) -> Result<String, String> {
    let mut paths = vec![runtime_dir()];
    paths.extend(extra.iter().cloned());
    let joined = std::env::join_paths(paths).map_err(|e| e.to_string())?;
    let output = tokio::process::Command::new(python)
        .args(["-c", code])
        .env("PYTHONPATH", joined)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(stderr.lines().last().unwrap_or("failed").to_owned())
    }
}

async fn python_says(python: &PathBuf, code: &str) -> Result<String, String> {
    python_says_with(python, code, &[]).await
}

const ABOUT_PYTHON: &str = "import json, sys; print(json.dumps({'version': \
    '.'.join(map(str, sys.version_info[:3])), 'ok': sys.version_info >= (3, 9), \
    'executable': sys.executable, 'venv': sys.prefix != sys.base_prefix, 'prefix': sys.prefix}))";

const ABOUT_DSPY: &str = "import time; t = time.perf_counter(); import dspy; \
    import sys; print(dspy.__version__, round((time.perf_counter() - t) * 1000), \
    'litellm' in sys.modules)";

async fn check_python(python: &PathBuf, outcomes: &mut Vec<Outcome>) -> bool {
    match python_says(python, ABOUT_PYTHON).await {
        Ok(text) => {
            let about: Value = serde_json::from_str(&text).unwrap_or_default();
            let version = about["version"].as_str().unwrap_or("?");
            let executable = about["executable"].as_str().unwrap_or("?");
            if about["ok"] == true {
                outcomes.push(Outcome::Ok(format!("Python {version} at {executable}")));
            } else {
                outcomes.push(Outcome::Fail(
                    format!("Python {version} at {executable} is too old"),
                    "use Python 3.9 or newer (--python or SNAKEPOOL_PYTHON)".into(),
                ));
            }
            if about["venv"] == true {
                let prefix = about["prefix"].as_str().unwrap_or("?");
                outcomes.push(Outcome::Ok(format!("virtualenv in use: {prefix}")));
            } else {
                outcomes.push(Outcome::Warn(
                    "no virtualenv: the system interpreter is used".into(),
                    "`snakepool demo` creates .venv with DSPy; or point SNAKEPOOL_PYTHON at a venv"
                        .into(),
                ));
            }
            true
        }
        Err(e) => {
            outcomes.push(Outcome::Fail(
                format!("cannot run {}: {e}", python.display()),
                "install python3 or pass --python / SNAKEPOOL_PYTHON".into(),
            ));
            false
        }
    }
}

async fn check_runtime(python: &PathBuf, args: &DoctorArgs, outcomes: &mut Vec<Outcome>) {
    let code = "import snakepool_worker, json; print(snakepool_worker.__version__)";
    match python_says(python, code).await {
        Ok(version) => outcomes.push(Outcome::Ok(format!(
            "worker runtime snakepool_worker {version} (built into this binary) imports"
        ))),
        Err(e) => outcomes.push(Outcome::Fail(
            format!("snakepool_worker does not import: {e}"),
            format!(
                "the runtime is written to {}: check that this Python can read it",
                runtime_dir().display()
            ),
        )),
    }
    match python_says(python, "import orjson").await {
        Ok(_) => outcomes.push(Outcome::Ok("orjson installed (faster JSON)".into())),
        Err(_) => outcomes.push(Outcome::Warn(
            "orjson not installed: the standard json module is used".into(),
            "pip install orjson for faster frames (optional)".into(),
        )),
    }
    for module in &args.modules {
        let code = format!("import {module}");
        match python_says_with(python, &code, &args.python_path).await {
            Ok(_) => outcomes.push(Outcome::Ok(format!("module {module} imports"))),
            Err(e) => outcomes.push(Outcome::Fail(
                format!("module {module} does not import: {e}"),
                "add its folder with --python-path, or install it in the venv".into(),
            )),
        }
    }
}

async fn check_dspy(python: &PathBuf, outcomes: &mut Vec<Outcome>) -> bool {
    match python_says(python, ABOUT_DSPY).await {
        Ok(text) => {
            let parts: Vec<&str> = text.split_whitespace().collect();
            let (version, ms, litellm) = match parts.as_slice() {
                [v, ms, litellm] => (*v, *ms, *litellm == "True"),
                _ => (text.as_str(), "?", false),
            };
            outcomes.push(Outcome::Ok(format!(
                "DSPy {version} installed; `import dspy` takes {ms} ms"
            )));
            if litellm {
                outcomes.push(Outcome::Warn(
                    "importing DSPy also imports litellm (slow, starts threads)".into(),
                    "use DSPy 3.4 or newer, which imports litellm lazily".into(),
                ));
            }
            true
        }
        Err(e) => {
            outcomes.push(Outcome::Warn(
                format!("DSPy is not importable ({e}): the DSPy commands are unavailable"),
                "`snakepool demo` installs it into .venv; or `pip install dspy`".into(),
            ));
            false
        }
    }
}

async fn check_zygote(python: &Path, dspy: bool, outcomes: &mut Vec<Outcome>) {
    let spec = WorkerSpec {
        program: WorkerProgram::Runtime {
            python: python.to_path_buf(),
            modules: Vec::new(),
            preload: if dspy {
                vec!["dspy".into()]
            } else {
                Vec::new()
            },
            python_path: vec![runtime_dir()],
        },
        startup_timeout: Duration::from_secs(60),
        ..WorkerSpec::default()
    };
    match Zygote::start(&spec).await {
        Ok(zygote) if zygote.hello().fork_safe => {
            outcomes.push(Outcome::Ok(format!(
                "a zygote preloading {} is single-threaded: workers can be forked",
                if dspy { "DSPy" } else { "the runtime" }
            )));
            zygote.kill();
        }
        Ok(zygote) => {
            outcomes.push(Outcome::Warn(
                format!(
                    "a zygote would not be fork-safe: threads {}",
                    zygote.hello().threads.join(", ")
                ),
                "workers will start fresh; remove the module that starts threads at import from --preload".into(),
            ));
            zygote.kill();
        }
        Err(e) => outcomes.push(Outcome::Fail(
            format!("a zygote cannot start: {e}"),
            "use --spawn fresh, or fix the error above".into(),
        )),
    }
}

/// Runs every check; exit code 1 if any failed.
pub async fn run(args: DoctorArgs) -> ExitCode {
    let python = args
        .python
        .clone()
        .unwrap_or_else(super::env::default_python);
    let mut outcomes = Vec::new();
    let cache = super::env::runtime_cache();
    match snakepool::worker::runtime::install(&cache) {
        Ok(dir) => {
            let _ = RUNTIME.set(dir);
        }
        Err(e) => {
            print(&Outcome::Fail(
                format!(
                    "cannot write the worker runtime under {}: {e}",
                    cache.display()
                ),
                "make the user's cache directory writable, or set XDG_CACHE_HOME".into(),
            ));
            return ExitCode::FAILURE;
        }
    }
    if check_python(&python, &mut outcomes).await {
        check_runtime(&python, &args, &mut outcomes).await;
        let dspy = check_dspy(&python, &mut outcomes).await;
        check_zygote(&python, dspy, &mut outcomes).await;
    }
    outcomes.iter().for_each(print);
    let failed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Fail(..)))
        .count();
    if failed == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failed} problem(s) found");
        ExitCode::FAILURE
    }
}
