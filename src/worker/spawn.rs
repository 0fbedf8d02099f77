//! Building and spawning a worker's OS process.
//!
//! Each worker runs in its own process group (so the whole group can be killed by id),
//! gets a signal when the host thread that spawned it dies (`PR_SET_PDEATHSIG` on
//! Linux: `SIGTERM` for the worker runtime, which then kills what its handlers
//! started; `SIGKILL` for any other program), is killed when its handle is dropped,
//! and starts with a thread-limiting environment unless the caller or the inherited
//! environment says otherwise.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::Pid;

use crate::protocol::DEFAULT_MAX_FRAME_BYTES;

/// Environment given to every worker unless overridden: one thread per numeric
/// library (100 workers must not mean 6,000 threads), unbuffered output, and no
/// price-map download by litellm on first use.
pub const DEFAULT_ENV: &[(&str, &str)] = &[
    ("PYTHONUNBUFFERED", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
    ("VECLIB_MAXIMUM_THREADS", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
];

/// The host's variable holding the HTTP server's token; removed from every worker's
/// environment.
pub const SERVER_TOKEN_ENV: &str = "SNAKEPOOL_TOKEN";

/// The host's variable holding the HTTP server's admin token; removed likewise.
pub const ADMIN_TOKEN_ENV: &str = "SNAKEPOOL_ADMIN_TOKEN";

/// The variable telling the worker runtime how many calls it may run at once.
pub const MAX_CONCURRENCY_ENV: &str = "SNAKEPOOL_MAX_CONCURRENCY";

/// Which program a worker runs.
#[derive(Clone, Debug)]
pub enum WorkerProgram {
    /// `python -m snakepool_worker --worker-id ID [--module M]...`.
    Runtime {
        /// The Python interpreter.
        python: PathBuf,
        /// Extra command modules to import.
        modules: Vec<String>,
        /// Modules imported at start-up only to warm them (e.g. `dspy`).
        preload: Vec<String>,
        /// Directories prepended to `PYTHONPATH`.
        python_path: Vec<PathBuf>,
    },
    /// Any protocol-v1 program; `{worker_id}` in an argument is replaced by the id.
    Command(Vec<String>),
}

impl WorkerProgram {
    /// Parses a shell-like command line, e.g. `python3 bridge.py --worker-id {worker_id}`.
    pub fn from_command_line(line: &str) -> Result<Self, String> {
        let argv = shell_words::split(line).map_err(|e| format!("bad worker command: {e}"))?;
        if argv.is_empty() {
            return Err("worker command is empty".into());
        }
        Ok(WorkerProgram::Command(argv))
    }
}

/// Everything needed to start one worker.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// The program to run.
    pub program: WorkerProgram,
    /// Environment set for the worker, over the inherited environment and the defaults.
    pub env: Vec<(String, String)>,
    /// How long spawn plus handshake may take.
    pub startup_timeout: Duration,
    /// The largest frame accepted from or sent to the worker.
    pub max_frame_bytes: usize,
    /// How long a stopping worker gets after stdin closes, and again after `SIGTERM`.
    pub stop_grace: Duration,
    /// How many recent stderr lines to keep for error messages.
    pub stderr_lines: usize,
    /// Most calls a worker runs at once, for workers that can run several (given to
    /// the worker runtime as `SNAKEPOOL_MAX_CONCURRENCY`).
    pub max_concurrency: usize,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        WorkerSpec {
            program: WorkerProgram::Runtime {
                python: PathBuf::from("python3"),
                modules: Vec::new(),
                preload: Vec::new(),
                python_path: Vec::new(),
            },
            env: Vec::new(),
            startup_timeout: Duration::from_secs(30),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            stop_grace: Duration::from_secs(2),
            stderr_lines: 64,
            max_concurrency: 32,
        }
    }
}

impl WorkerSpec {
    /// The worker runtime's arguments for worker `worker_id` (after
    /// `python -m snakepool_worker`); `None` for a custom worker command.
    pub fn runtime_args(&self, worker_id: &str) -> Option<Vec<String>> {
        let WorkerProgram::Runtime {
            modules, preload, ..
        } = &self.program
        else {
            return None;
        };
        let mut args = vec![
            "--worker-id".to_owned(),
            worker_id.to_owned(),
            "--max-frame-bytes".to_owned(),
            self.max_frame_bytes.to_string(),
        ];
        for module in modules {
            args.extend(["--module".to_owned(), module.clone()]);
        }
        for module in preload {
            args.extend(["--preload".to_owned(), module.clone()]);
        }
        Some(args)
    }

    /// The argv for the worker with id `worker_id`.
    pub fn argv(&self, worker_id: &str) -> Vec<OsString> {
        match &self.program {
            WorkerProgram::Runtime { python, .. } => {
                let mut argv: Vec<OsString> =
                    vec![python.into(), "-m".into(), "snakepool_worker".into()];
                argv.extend(
                    self.runtime_args(worker_id)
                        .unwrap_or_default()
                        .into_iter()
                        .map(OsString::from),
                );
                argv
            }
            WorkerProgram::Command(args) => args
                .iter()
                .map(|a| a.replace("{worker_id}", worker_id).into())
                .collect(),
        }
    }

    /// A command running `argv` the way every worker process runs: its own process
    /// group, killed on drop and with the host, worker environment, piped stderr.
    pub fn command(&self, argv: &[OsString]) -> Command {
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        for (key, value) in DEFAULT_ENV {
            if std::env::var_os(key).is_none() {
                command.env(key, value);
            }
        }
        command.env("SNAKEPOOL_HOST_PID", std::process::id().to_string());
        // The server's tokens are the host's secrets; no worker needs them.
        command.env_remove(SERVER_TOKEN_ENV);
        command.env_remove(ADMIN_TOKEN_ENV);
        command.env(MAX_CONCURRENCY_ENV, self.max_concurrency.to_string());
        if let WorkerProgram::Runtime { python_path, .. } = &self.program {
            let mut paths: Vec<PathBuf> = python_path.clone();
            if let Some(existing) = std::env::var_os("PYTHONPATH") {
                paths.extend(std::env::split_paths(&existing));
            }
            if let Ok(joined) = std::env::join_paths(paths) {
                command.env("PYTHONPATH", joined);
            }
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        // The worker runtime turns SIGTERM into "kill what my handlers started, then
        // exit"; any other program is killed outright.
        let signal = match self.program {
            WorkerProgram::Runtime { .. } => libc::SIGTERM,
            WorkerProgram::Command(_) => libc::SIGKILL,
        };
        set_parent_death_signal(&mut command, signal);
        command
    }

    /// Spawns a fresh worker process with piped stdin, stdout and stderr.
    pub fn spawn(&self, worker_id: &str) -> std::io::Result<Child> {
        self.command(&self.argv(worker_id))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
    }
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(command: &mut Command, signal: libc::c_int) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (prctl, getppid, _exit).
    let host = std::process::id() as libc::pid_t;
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The host may have died between fork and prctl.
            if libc::getppid() != host {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_command: &mut Command, _signal: libc::c_int) {}

/// The pid of a process just spawned; `None` only if it was already reaped.
pub fn child_pid(child: &Child) -> std::io::Result<Pid> {
    child
        .id()
        .and_then(Pid::new)
        .ok_or_else(|| std::io::Error::other("the process was reaped before its pid could be read"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_substitutes_worker_id() {
        let spec = WorkerSpec {
            program: WorkerProgram::from_command_line("python3 'my bridge.py' --id {worker_id}")
                .unwrap(),
            ..WorkerSpec::default()
        };
        assert_eq!(
            spec.argv("w7"),
            vec!["python3", "my bridge.py", "--id", "w7"]
                .into_iter()
                .map(OsString::from)
                .collect::<Vec<_>>()
        );
        assert!(WorkerProgram::from_command_line("  ").is_err());
        assert!(WorkerProgram::from_command_line("python3 'unclosed").is_err());
    }
}
