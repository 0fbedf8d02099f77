//! Helpers shared by the integration tests: pools of real Python workers.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod services;

use snakepool::{Pool, PoolBuilder, PoolEvent, SpawnMode};
use tokio::sync::broadcast;

/// The folder holding the Python fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// The interpreter the tests use: `$SNAKEPOOL_PYTHON`, else the project's `.venv`
/// (`scripts/python-env.sh`), else `python3`.
pub fn python() -> String {
    if let Some(python) = std::env::var_os("SNAKEPOOL_PYTHON") {
        return python.to_string_lossy().into_owned();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

/// How the tests start workers: `$SNAKEPOOL_SPAWN` (`zygote` or `fresh`), else the
/// pool's default (the test script runs the behavioural tests in both modes).
pub fn spawn_mode() -> SpawnMode {
    std::env::var("SNAKEPOOL_SPAWN")
        .ok()
        .and_then(|mode| mode.parse().ok())
        .unwrap_or_default()
}

/// A builder for `n` runtime workers with the test handlers loaded and short timeouts.
pub fn builder(n: usize) -> PoolBuilder {
    Pool::builder()
        .spawn_mode(spawn_mode())
        .workers(n)
        .python(python())
        .python_path(fixtures())
        .module("sp_test_handlers")
        .request_timeout(Duration::from_secs(20))
        .checkout_timeout(Duration::from_secs(20))
        .startup_timeout(Duration::from_secs(20))
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .stop_grace(Duration::from_millis(500))
}

/// A builder running `rogue_worker.py` in the given mode.
pub fn rogue(n: usize, mode_args: &str) -> PoolBuilder {
    let script = fixtures().join("rogue_worker.py");
    Pool::builder()
        .workers(n)
        .worker_cmd(format!("{} {} {mode_args}", python(), script.display()))
        .request_timeout(Duration::from_secs(20))
        .startup_timeout(Duration::from_secs(20))
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .stop_grace(Duration::from_millis(500))
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Waits for the first event matching `pred`, failing the test after 30 s.
pub async fn wait_for_event(
    events: &mut broadcast::Receiver<PoolEvent>,
    pred: impl Fn(&PoolEvent) -> bool,
) -> PoolEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if pred(&event) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("pool event stream closed"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("expected pool event did not happen within 30 s")
}

/// How long a test waits for something that should happen almost at once (a call
/// reaching its worker, a caller joining the queue) before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// How often `wait_until` and `wait_until_async` check their condition.
const POLL: Duration = Duration::from_millis(2);

/// Checks `cond` every 2 ms until it holds; panics with
/// `timed out after {limit:?} waiting for {what}` if it still does not after `limit`.
/// For conditions no pool event announces; prefer `wait_for_event` where one does.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    wait_until_async(what, limit, || std::future::ready(cond())).await;
}

/// `wait_until` for a condition that must itself be awaited (e.g. an HTTP request);
/// the deadline covers the checks too, so a check that hangs fails the same way.
pub async fn wait_until_async<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let poll = async {
        while !cond().await {
            tokio::time::sleep(POLL).await;
        }
    };
    if tokio::time::timeout(limit, poll).await.is_err() {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}

/// Whether any of the pool's workers is checked out by a caller.
pub fn any_busy(pool: &Pool) -> bool {
    pool.status().workers.iter().any(|w| w.state == "busy")
}

/// The pid a handler that announces itself in `dir` wrote there, if it has yet:
/// `rendezvous` creates a file named after its pid before it waits.
pub fn handler_pid(dir: &Path) -> Option<u32> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .next()
}

/// Waits until a handler that announces itself in `dir` (see `handler_pid`) is
/// running, and returns its pid.
pub async fn wait_for_handler_pid(dir: &Path) -> u32 {
    let mut pid = None;
    wait_until("the handler to write its pid", WAIT, || {
        pid = handler_pid(dir);
        pid.is_some()
    })
    .await;
    pid.unwrap()
}

/// Sends SIGKILL to one process.
pub fn kill9(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The pid of the worker that served `whoami`.
pub fn pid_of(value: &serde_json::Value) -> u32 {
    value["pid"].as_u64().expect("pid in reply") as u32
}

/// Waits until process `pid` is gone (pidfd readiness, not polling), up to `limit`.
/// Returns whether it is gone.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    // SAFETY: plain system calls on integers and a stack pollfd.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as libc::c_int;
        if fd < 0 {
            return !alive(pid);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ready = libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int);
        libc::close(fd);
        ready == 1 || !alive(pid)
    }
}

/// A `snakepool serve` process on a random loopback port, ready to serve.
pub struct ServeProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The rest of its stdout.
    pub stdout: std::io::BufReader<std::process::ChildStdout>,
}

/// Starts `snakepool serve` with 2 workers and the test handlers, plus `extra` flags,
/// and waits for its "pool ready" line.
pub fn spawn_serve(extra: &[&str]) -> ServeProcess {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"])
        // Sessions in memory unless `extra` names a durable journal.
        .env("SNAKEPOOL_JOURNAL", "memory")
        .args(["--python", &python()])
        .args(["--python-path", fixtures().to_str().unwrap()])
        .args(["--module", "sp_test_handlers"])
        .args(extra)
        .env_remove("SNAKEPOOL_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("the first line names the address")
        .to_owned();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("pool ready"), "{line}");
    ServeProcess { child, url, stdout }
}

/// The pids of a server's workers and zygote, from `GET /v1/pool`.
pub async fn server_pids(client: &reqwest::Client, url: &str) -> Vec<u32> {
    let pool: serde_json::Value = client
        .get(format!("{url}/v1/pool"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut pids: Vec<u32> = pool["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    pids.extend(pool["spawn"]["pid"].as_u64().map(|p| p as u32));
    pids
}

/// An OpenAI-compatible chat completion answering a DSPy chain of thought ("what is
/// forty plus two") for `model`: what the fake LM servers of the tests send back.
pub fn chat_completion_reply(model: &serde_json::Value) -> serde_json::Value {
    let content = "[[ ## reasoning ## ]]\nForty plus two is forty-two.\n\n\
                   [[ ## answer ## ]]\n42\n\n[[ ## completed ## ]]";
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}
    })
}

/// Serves the HTTP API over `pool` in this process, on a random loopback port; returns
/// its base URL.
pub async fn serve_in_process(pool: &Pool, options: &snakepool::server::ServerOptions) -> String {
    let state = snakepool::server::ServerState::starting();
    state.ready(pool.clone());
    let app = snakepool::server::router(state, options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Kills the worker session `session` is pinned to with SIGKILL and waits until the
/// pool has seen it go; returns its pid.
pub async fn kill_session_worker(pool: &Pool, session: &snakepool::Session) -> u32 {
    let mut events = pool.subscribe();
    let pinned = session
        .worker_id()
        .expect("the session is pinned to a worker");
    let pid = pool
        .status()
        .workers
        .iter()
        .find(|w| w.id == pinned)
        .expect("its worker is running")
        .pid;
    kill9(pid);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;
    pid
}
