//! The attacker's regression suite: every test runs a real `snakepool serve` process on
//! a loopback port and attacks it the way an HTTP client can. Each checks the exact
//! status and error kind, that the victim's state is intact afterwards, and that the
//! pool still serves.
//!
//! Session isolation (`args.session_id`, internal commands, worker renames, session id
//! limits), secrets and the LM policy (profiles, forbidden client settings, upstream
//! bodies, reserved field names), limits (timeouts, hang-ups, sessions, connections,
//! slow headers, listing pages, drain on SIGTERM, crash bodies) and a pool that never
//! dies quietly (failing starts, bounded session rebuilds). Then the CLI's refusals,
//! internal commands a worker's manifest flags, the operator's variables and tokens
//! kept from workers and model servers, per-profile response caches, a crashed
//! worker's stderr in the server's log, body limits at and past their values, the
//! rebuild deadline, and memory limits checked after every call.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode as AxumStatus;
use axum::response::{IntoResponse, Response};
use common::{WAIT, builder, pid_of, wait_for_event};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use snakepool::{Error, Pool, PoolEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------
// Processes and paths
// ---------------------------------------------------------------------------------

/// The Python fixtures folder.
fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// `$SNAKEPOOL_PYTHON`, else the project's `.venv`, else `python3`.
fn python() -> String {
    if let Some(python) = std::env::var_os("SNAKEPOOL_PYTHON").filter(|p| !p.is_empty()) {
        return python.to_string_lossy().into_owned();
    }
    let venv = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".to_owned()
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Polls `probe` every 20 ms until it returns `Ok`, panicking after `limit` with
/// `what` and the last thing `probe` saw.
async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("{what}: not within {limit:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How to start one `snakepool serve`.
struct ServeCmd {
    args: Vec<String>,
    env: Vec<(String, String)>,
    config: Option<String>,
    runtime: bool,
}

impl ServeCmd {
    /// `workers` runtime workers with the security handlers loaded.
    fn new(workers: usize) -> ServeCmd {
        ServeCmd {
            args: vec!["--workers".into(), workers.to_string()],
            env: Vec::new(),
            config: None,
            runtime: true,
        }
    }

    fn args(mut self, args: &[&str]) -> ServeCmd {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    fn env(mut self, key: &str, value: &str) -> ServeCmd {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A settings file with this TOML text, passed with `--config`.
    fn config(mut self, toml: &str) -> ServeCmd {
        self.config = Some(toml.to_owned());
        self
    }

    /// Runs `cmd` as the worker program instead of the runtime.
    fn worker_cmd(mut self, cmd: &str) -> ServeCmd {
        self.args
            .extend(["--worker-cmd".to_owned(), cmd.to_owned()]);
        self.runtime = false;
        self
    }

    async fn start(self) -> Serve {
        match tokio::task::spawn_blocking(move || self.start_blocking()).await {
            Ok(serve) => serve,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    fn start_blocking(self) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("serve.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_snakepool"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SNAKEPOOL_JOURNAL", "memory");
        if self.runtime {
            command
                .args(["--python", &python()])
                .args(["--python-path", fixtures().to_str().unwrap()])
                .args(["--module", "security_handlers"]);
        }
        if let Some(toml) = &self.config {
            let path = dir.path().join("snakepool.toml");
            std::fs::write(&path, toml).unwrap();
            command.args(["--config", path.to_str().unwrap()]);
        }
        command.args(&self.args);
        // Only the spawn mode is inherited (scripts/test.sh runs the suite in each).
        for (key, _) in std::env::vars() {
            if key.starts_with("SNAKEPOOL_") && key != "SNAKEPOOL_SPAWN" {
                command.env_remove(key);
            }
        }
        command.env_remove("SP_TEST_KEY");
        command.env_remove("OPENAI_API_KEY");
        let mut token = None;
        for (key, value) in &self.env {
            if key == "SNAKEPOOL_TOKEN" {
                token = Some(value.clone());
            }
            command.env(key, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                match line {
                    // Nobody may listen any more: keep draining regardless.
                    Ok(line) => {
                        let _ = lines_tx.send(line);
                    }
                    Err(_) => return,
                }
            }
        });
        let mut serve = Serve {
            child,
            url: String::new(),
            token,
            client: client(Duration::from_secs(20)),
            stderr_path,
            dir,
        };
        let started = Instant::now();
        let mut next_line = |what: &str| -> String {
            let left = Duration::from_secs(40).saturating_sub(started.elapsed());
            match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(error) => {
                    signal(serve.child.id(), libc::SIGKILL);
                    let _ = serve.child.wait();
                    panic!(
                        "snakepool serve {:?}: no {what} line ({error}); stderr:\n{}",
                        self.args,
                        serve.stderr()
                    );
                }
            }
        };
        let first = next_line("`listening on`");
        let url = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the first line names the address: {first}"))
            .to_owned();
        let ready = next_line("`pool ready`");
        assert!(ready.starts_with("pool ready"), "{ready}");
        serve.url = url;
        serve
    }
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

/// One HTTP answer: status, headers, the body as text and as JSON (the text as a JSON
/// string when it is not JSON).
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    body: Value,
}

impl Reply {
    async fn from(response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
        Reply {
            status,
            headers,
            text,
            body,
        }
    }

    fn kind(&self) -> &str {
        self.body["error"]["kind"].as_str().unwrap_or("")
    }

    fn python_type(&self) -> &str {
        self.body["error"]["python_type"].as_str().unwrap_or("")
    }

    /// Panics unless the status and error kind are these.
    #[track_caller]
    fn expect_error(&self, status: u16, kind: &str, what: &str) {
        assert_eq!(
            (self.status.as_u16(), self.kind()),
            (status, kind),
            "{what}: expected {status} `{kind}`, got {} {}",
            self.status,
            self.text
        );
    }

    /// Panics unless the status is 200.
    #[track_caller]
    fn expect_ok(&self, what: &str) -> &Value {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{what}: expected 200, got {}",
            self.text
        );
        &self.body["result"]
    }

    /// Panics unless this is a 422 worker error with this Python type.
    #[track_caller]
    fn expect_python(&self, python_type: &str, what: &str) {
        assert_eq!(
            (self.status.as_u16(), self.kind(), self.python_type()),
            (422, "worker_error", python_type),
            "{what}: expected 422 worker_error {python_type}, got {} {}",
            self.status,
            self.text
        );
    }
}

/// A running `snakepool serve`, killed when dropped.
struct Serve {
    child: Child,
    url: String,
    token: Option<String>,
    client: reqwest::Client,
    stderr_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Serve {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `HOST:PORT` it listens on.
    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// A temporary folder that lives as long as the server.
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request_with(&self.client, method, path)
    }

    fn request_with(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let builder = client.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    async fn send(&self, builder: reqwest::RequestBuilder, what: &str) -> Reply {
        match builder.send().await {
            Ok(response) => Reply::from(response).await,
            Err(error) => panic!(
                "{what}: no HTTP answer: {error:?}\nserve stderr (tail):\n{}",
                tail(&self.stderr(), 3000)
            ),
        }
    }

    async fn post_call(&self, body: Value) -> Reply {
        let what = format!("POST /v1/call {body}");
        self.send(
            self.request(reqwest::Method::POST, "/v1/call").json(&body),
            &what,
        )
        .await
    }

    async fn plain(&self, command: &str, args: Value) -> Reply {
        self.post_call(json!({"command": command, "args": args}))
            .await
    }

    async fn in_session(&self, session: &str, command: &str, args: Value) -> Reply {
        self.post_call(json!({"command": command, "args": args, "session_id": session}))
            .await
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(
            self.request(reqwest::Method::GET, path),
            &format!("GET {path}"),
        )
        .await
    }

    async fn delete_session(&self, id: &str) -> Reply {
        let path = format!("/v1/sessions/{}", percent_encode(id));
        self.send(
            self.request(reqwest::Method::DELETE, &path),
            &format!("DELETE {path}"),
        )
        .await
    }

    async fn pool(&self) -> Value {
        let reply = self.get("/v1/pool").await;
        assert_eq!(reply.status, StatusCode::OK, "GET /v1/pool: {}", reply.text);
        reply.body
    }

    /// The sessions listed by `GET /v1/sessions` (first page, default size).
    async fn sessions(&self) -> Vec<Value> {
        let reply = self.get("/v1/sessions").await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "GET /v1/sessions: {}",
            reply.text
        );
        reply.body["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn journal_length(&self, session: &str) -> Value {
        self.sessions()
            .await
            .into_iter()
            .find(|s| s["id"] == session)
            .map(|s| s["journal_entries"].clone())
            .unwrap_or_else(|| panic!("session {session} is not listed"))
    }

    /// A `ping` succeeds: the pool still serves.
    async fn assert_serves(&self, after: &str) {
        let reply = self.plain("ping", json!({})).await;
        let result = reply.expect_ok(&format!("ping after {after}"));
        assert_eq!(result["status"], "ok", "ping after {after}: {}", reply.text);
    }
}

fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Every byte but the unreserved ones as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The worker pids of a `GET /v1/pool` answer, sorted.
fn worker_pids(pool: &Value) -> Vec<u32> {
    let mut pids: Vec<u32> = pool["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("workers in {pool}"))
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    pids.sort_unstable();
    pids
}

/// Worker crashes counted by the pool.
fn crashes(pool: &Value) -> u64 {
    pool["totals"]["worker_crashes"]
        .as_u64()
        .unwrap_or_else(|| panic!("totals.worker_crashes in {pool}"))
}

/// The calls served by the only worker.
fn calls_served(pool: &Value) -> u64 {
    let workers = pool["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "one worker expected: {pool}");
    workers[0]["calls_served"].as_u64().unwrap()
}

fn unique(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{label}-{}-{nanos:x}", std::process::id())
}

fn dummy_lm(answer: &str) -> Value {
    json!({"provider": "dummy", "answers": [{"answer": answer}, {"answer": answer}]})
}

/// Opens session `id` as a DSPy session: a dummy LM answering `answer` and one
/// program, `prog_1`.
async fn dspy_victim(serve: &Serve, id: &str, answer: &str) {
    serve
        .in_session(id, "configure_lm", dummy_lm(answer))
        .await
        .expect_ok("victim configure_lm");
    let created = serve
        .in_session(
            id,
            "create_program",
            json!({"signature": "question -> answer"}),
        )
        .await;
    assert_eq!(
        created.expect_ok("victim create_program")["program_id"],
        "prog_1"
    );
}

/// The victim's programs are still there and its LM still answers.
async fn assert_victim_intact(serve: &Serve, id: &str, answer: &str, journal: &Value) {
    let listed = serve.in_session(id, "list_programs", json!({})).await;
    let programs = listed.expect_ok("victim list_programs")["programs"].clone();
    assert_eq!(
        programs.as_array().map(Vec::len),
        Some(1),
        "victim's programs: {programs}"
    );
    assert_eq!(programs[0]["program_id"], "prog_1", "{programs}");
    assert_eq!(
        &serve.journal_length(id).await,
        journal,
        "victim's journal length changed"
    );
    let run = serve
        .in_session(
            id,
            "execute_program",
            json!({"program_id": "prog_1", "inputs": {"question": "still there?"}}),
        )
        .await;
    assert_eq!(
        run.expect_ok("victim execute_program")["outputs"]["answer"],
        answer,
        "the victim's LM was replaced"
    );
}

// ---------------------------------------------------------------------------------
// Session isolation
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_id_inside_args_is_refused_and_the_victim_keeps_its_state() {
    let serve = ServeCmd::new(1).start().await;
    dspy_victim(&serve, "bob", "bob's answer").await;
    let journal = serve.journal_length("bob").await;
    assert_eq!(journal, json!(2), "configure_lm and create_program");

    let attacks = [
        json!({"command": "list_programs", "args": {"session_id": "bob"}}),
        json!({"command": "reset_state", "args": {"session_id": "bob"}}),
        json!({"command": "delete_program",
               "args": {"session_id": "bob", "program_id": "prog_1"}}),
        json!({"command": "configure_lm",
               "args": {"session_id": "bob", "provider": "dummy",
                        "answers": [{"answer": "mallory's answer"}]}}),
        json!({"command": "reset_state", "session_id": "mallory",
               "args": {"session_id": "bob"}}),
        json!({"command": "configure_lm", "session_id": "mallory",
               "args": {"session_id": "bob", "provider": "dummy",
                        "answers": [{"answer": "mallory's answer"}]}}),
        json!({"command": "sec_set", "session_id": "mallory",
               "args": {"session_id": "bob", "key": "k", "value": "v"}}),
    ];
    for attack in attacks {
        let reply = serve.post_call(attack.clone()).await;
        reply.expect_error(400, "invalid_request", &attack.to_string());
        let message = reply.body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("args.session_id"),
            "{attack}: the message names args.session_id: {}",
            reply.text
        );
    }

    assert_victim_intact(&serve, "bob", "bob's answer", &journal).await;
    serve.assert_serves("args.session_id attacks").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_commands_are_forbidden_and_no_worker_stops() {
    let serve = ServeCmd::new(1).start().await;
    dspy_victim(&serve, "bob", "bob's answer").await;
    let journal = serve.journal_length("bob").await;
    let before = serve.pool().await;

    let attacks = [
        json!({"command": "shutdown"}),
        json!({"command": "shutdown", "args": {}}),
        json!({"command": "shutdown", "session_id": "bob"}),
        json!({"command": "cleanup_session", "args": {}}),
        json!({"command": "cleanup_session", "session_id": "bob"}),
        json!({"command": "cleanup_session", "session_id": "bob", "args": {}}),
    ];
    for attack in attacks {
        serve
            .post_call(attack.clone())
            .await
            .expect_error(403, "forbidden", &attack.to_string());
    }
    // Calls after the attacks go down the same pipe: a worker that had obeyed
    // `shutdown` would have been replaced (or failed these) by now.
    for _ in 0..3 {
        serve.assert_serves("internal commands").await;
    }
    let after = serve.pool().await;
    assert_eq!(
        worker_pids(&after),
        worker_pids(&before),
        "a worker was stopped: {before} -> {after}"
    );
    assert_eq!(crashes(&after), crashes(&before), "{after}");
    for pid in worker_pids(&after) {
        assert!(alive(pid), "worker {pid} is gone");
    }
    assert_victim_intact(&serve, "bob", "bob's answer", &journal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_bridge_without_a_manifest_is_not_told_to_stop_by_a_client() {
    let cmd = format!(
        "{} {} bridge",
        python(),
        fixtures().join("security_handlers.py").display()
    );
    let serve = ServeCmd::new(1).worker_cmd(&cmd).start().await;
    let before = serve.pool().await;
    for attack in [
        json!({"command": "shutdown"}),
        json!({"command": "shutdown", "session_id": "bob"}),
        json!({"command": "cleanup_session"}),
        json!({"command": "cleanup_session", "session_id": "bob"}),
    ] {
        serve.post_call(attack.clone()).await.expect_error(
            403,
            "forbidden",
            &format!("old bridge: {attack}"),
        );
    }
    for _ in 0..3 {
        serve
            .assert_serves("internal commands to an old bridge")
            .await;
    }
    let who = serve.in_session("bob", "whoami", json!({})).await;
    assert_eq!(
        who.expect_ok("a session call to the old bridge")["session_id"],
        "bob"
    );
    let after = serve.pool().await;
    assert_eq!(
        worker_pids(&after),
        worker_pids(&before),
        "the bridge was stopped: {before} -> {after}"
    );
    assert_eq!(crashes(&after), crashes(&before), "{after}");
    assert!(worker_pids(&after).into_iter().all(alive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_cannot_rename_a_worker() {
    let serve = ServeCmd::new(1).start().await;
    let before = serve.pool().await;
    let ids: Vec<Value> = before["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].clone())
        .collect();
    for id in &ids {
        let id = id.as_str().unwrap_or("");
        assert!(
            id.len() > 1 && id.starts_with('w') && id[1..].chars().all(|c| c.is_ascii_digit()),
            "worker ids are w1..: {before}"
        );
    }

    let reply = serve.plain("ping", json!({"worker_id": "evil"})).await;
    assert!(
        !reply.status.is_server_error(),
        "ping with a worker_id: {} {}",
        reply.status,
        reply.text
    );
    if reply.status == StatusCode::OK {
        assert_ne!(
            reply.body["result"]["worker_id"], "evil",
            "the ping renamed the worker: {}",
            reply.text
        );
    }
    for _ in 0..3 {
        let who = serve.plain("sec_whoami", json!({})).await;
        let result = who.expect_ok("sec_whoami after the rename attempt");
        assert_ne!(result["worker_id"], "evil", "{}", who.text);
        assert_eq!(
            result["worker_id"], ids[0],
            "the runtime's id: {}",
            who.text
        );
    }
    let after = serve.pool().await;
    let after_ids: Vec<Value> = after["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].clone())
        .collect();
    assert_eq!(after_ids, ids, "{after}");
    assert_eq!(worker_pids(&after), worker_pids(&before));
    serve.assert_serves("a rename attempt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_bounded_printable_and_deletable_whatever_their_bytes() {
    let serve = ServeCmd::new(1).start().await;
    let too_long = [
        "a".repeat(257),
        format!("{}a", "é".repeat(128)), // 257 bytes, 129 characters
    ];
    let control = [
        "line\nbreak",
        "bell\u{7}",
        "tab\there",
        "nul\u{0}byte",
        "esc\u{1b}[31m",
        "del\u{7f}",
    ];
    for id in too_long.iter().map(String::as_str).chain(control) {
        serve.in_session(id, "ping", json!({})).await.expect_error(
            400,
            "invalid_request",
            &format!("session id {id:?}"),
        );
    }
    let listed: Vec<Value> = serve
        .sessions()
        .await
        .into_iter()
        .map(|s| s["id"].clone())
        .collect();
    assert!(listed.is_empty(), "refused ids opened sessions: {listed:?}");

    let odd = [
        "a".repeat(256),
        "é".repeat(128), // 256 bytes
        "has space".to_owned(),
        "ünï cødé ☃".to_owned(),
        "per%cent+plus".to_owned(),
        "q?x=1#frag".to_owned(),
    ];
    for id in &odd {
        serve
            .in_session(id, "ping", json!({}))
            .await
            .expect_ok(&format!("open session {id:?}"));
    }
    assert_eq!(serve.sessions().await.len(), odd.len());
    for id in &odd {
        let reply = serve.delete_session(id).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "DELETE {id:?}: {}",
            reply.text
        );
        serve.delete_session(id).await.expect_error(
            404,
            "session_not_found",
            &format!("second DELETE {id:?}"),
        );
    }
    for id in ["nobody home ✓", "%", "b".repeat(256).as_str()] {
        serve.delete_session(id).await.expect_error(
            404,
            "session_not_found",
            &format!("DELETE never opened {id:?}"),
        );
    }
    for id in [
        "c".repeat(257),
        "line\nbreak".to_owned(),
        "\u{7}".to_owned(),
    ] {
        let reply = serve.delete_session(&id).await;
        assert!(
            matches!(reply.status.as_u16(), 400 | 404),
            "DELETE {id:?}: {} {}",
            reply.status,
            reply.text
        );
    }
    assert!(serve.sessions().await.is_empty());
    serve.assert_serves("odd session ids").await;
}

// ---------------------------------------------------------------------------------
// Secrets and the LM policy
// ---------------------------------------------------------------------------------

/// One request the fake model server received, as text: request line, every header,
/// body.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    model: String,
    authorization: Option<String>,
    dump: String,
}

#[derive(Clone, Default)]
struct FakeLm {
    seen: Arc<Mutex<Vec<Seen>>>,
    marker: Arc<Mutex<String>>,
}

impl FakeLm {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The model each request named, in order.
    fn models(&self) -> Vec<String> {
        self.seen().into_iter().map(|seen| seen.model).collect()
    }

    #[track_caller]
    fn assert_never_saw(&self, secret: &str) {
        for request in self.seen() {
            assert!(
                !request.dump.contains(secret),
                "the model server received {secret:?}:\n{}",
                request.dump
            );
        }
    }
}

/// An OpenAI-compatible server: `/v1/chat/completions` answers 42 with reasoning;
/// `/e404/...` and `/e500/...` fail with the marker in their bodies.
async fn fake_lm_handler(State(fake): State<FakeLm>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 24)
        .await
        .unwrap_or_default();
    let mut dump = format!("{} {}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        dump.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    dump.push('\n');
    dump.push_str(&String::from_utf8_lossy(&body));
    let path = parts.uri.path().to_owned();
    let model = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|request| request["model"].as_str().map(str::to_owned))
        .unwrap_or_default();
    fake.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        model,
        authorization: parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        dump,
    });
    let marker = fake.marker.lock().unwrap().clone();
    let failure = |status: AxumStatus| {
        let body = json!({"error": {
            "message": format!("{marker} upstream internal detail at {path}"),
            "type": "internal", "code": marker,
        }});
        (status, axum::Json(body)).into_response()
    };
    match path.as_str() {
        "/v1/chat/completions" => {
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let reply = common::chat_completion_reply(&request["model"]);
            (AxumStatus::OK, axum::Json(reply)).into_response()
        }
        "/e404/v1/chat/completions" => failure(AxumStatus::NOT_FOUND),
        "/e500/v1/chat/completions" => failure(AxumStatus::INTERNAL_SERVER_ERROR),
        _ => (AxumStatus::NOT_FOUND, Body::from("no such route")).into_response(),
    }
}

/// Starts the fake model server; returns its `http://127.0.0.1:PORT` and its log.
async fn start_fake_lm() -> (String, FakeLm) {
    let fake = FakeLm::default();
    *fake.marker.lock().unwrap() = unique("UPSTREAM-MARKER");
    let app = axum::Router::new()
        .fallback(fake_lm_handler)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fake)
}

const TOKEN: &str = "tok-secret";
const KEY: &str = "sk-fine";

/// create_program + execute_program in `session`, whatever happened before: if an
/// attacker's LM had been configured, this is the call that would leak the key.
async fn try_to_use_the_lm(serve: &Serve, session: &str) -> Reply {
    let _ = serve
        .in_session(
            session,
            "create_program",
            json!({"signature": "question -> answer: int", "type": "chain_of_thought",
                   "program_id": "probe"}),
        )
        .await;
    serve
        .in_session(
            session,
            "execute_program",
            json!({"program_id": "probe", "inputs": {"question": "What is 40 plus 2?"}}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_choose_lm_endpoints_or_keys_but_operator_profiles_work() {
    let (fake_url, fake) = start_fake_lm().await;
    let api_base = format!("{fake_url}/v1");
    let config = format!(
        "[lm.fake]\nmodel = \"openai/x\"\napi_base = \"{api_base}\"\napi_key_env = \"SP_TEST_KEY\"\n"
    );
    let serve = ServeCmd::new(1)
        .config(&config)
        .env("SNAKEPOOL_TOKEN", TOKEN)
        .env("SP_TEST_KEY", KEY)
        .start()
        .await;

    // The token is in force.
    let anonymous = serve
        .client
        .post(format!("{}/v1/call", serve.url))
        .json(&json!({"command": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let attacks = [
        json!({"model": "openai/x", "api_base": api_base, "api_key_env": "SNAKEPOOL_TOKEN"}),
        json!({"model": "openai/x", "api_base": api_base, "api_key_env": "SP_TEST_KEY"}),
        json!({"model": "openai/x", "api_base": api_base}),
        json!({"model": "openai/x", "api_key_env": "SNAKEPOOL_TOKEN"}),
        json!({"model": "openai/x"}),
        json!({"profile": "fake", "api_base": api_base, "api_key_env": "SNAKEPOOL_TOKEN"}),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let session = format!("eve-{i}");
        serve
            .in_session(&session, "configure_lm", attack.clone())
            .await
            .expect_python("LMSettingsForbidden", &format!("configure_lm {attack}"));
        let used = try_to_use_the_lm(&serve, &session).await;
        assert_ne!(used.status, StatusCode::OK, "{attack}: {}", used.text);
    }
    assert!(
        fake.seen().is_empty(),
        "refused settings reached the model server: {:?}",
        fake.seen()
    );

    serve
        .in_session("alice", "configure_lm", json!({"profile": "nope"}))
        .await
        .expect_python("LMProfileNotFound", "an unknown profile");

    let configured = serve
        .in_session("alice", "configure_lm", json!({"profile": "fake"}))
        .await;
    configured.expect_ok("configure_lm with the operator's profile");
    for secret in [
        api_base.as_str(),
        fake_url.trim_start_matches("http://"),
        "SP_TEST_KEY",
        KEY,
        TOKEN,
    ] {
        assert!(
            !configured.text.contains(secret),
            "configure_lm's answer shows {secret:?}: {}",
            configured.text
        );
    }
    let run = try_to_use_the_lm(&serve, "alice").await;
    assert_eq!(
        run.expect_ok("execute_program with the profile's LM")["outputs"]["answer"],
        42,
        "{}",
        run.text
    );
    let seen = fake.seen();
    assert!(!seen.is_empty(), "the model server was never called");
    for request in &seen {
        assert_eq!(request.path, "/v1/chat/completions", "{}", request.dump);
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer sk-fine"),
            "{}",
            request.dump
        );
    }
    fake.assert_never_saw(TOKEN);
    serve.assert_serves("LM policy attacks").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowing_client_lm_settings_still_never_sends_the_server_token() {
    let (fake_url, fake) = start_fake_lm().await;
    let api_base = format!("{fake_url}/v1");
    let by_flag = ServeCmd::new(1)
        .args(&["--allow-client-lm"])
        .env("SNAKEPOOL_TOKEN", TOKEN)
        .env("SP_TEST_KEY", KEY)
        .start();
    let by_file = ServeCmd::new(1)
        .config("lm_client_settings = true\n")
        .env("SNAKEPOOL_TOKEN", TOKEN)
        .env("SP_TEST_KEY", KEY)
        .start();
    let (by_flag, by_file) = tokio::join!(by_flag, by_file);

    for (serve, how) in [
        (&by_flag, "--allow-client-lm"),
        (&by_file, "lm_client_settings"),
    ] {
        serve
            .in_session(
                "eve",
                "configure_lm",
                json!({"model": "openai/x", "api_base": api_base,
                       "api_key_env": "SNAKEPOOL_TOKEN"}),
            )
            .await
            .expect_python(
                "LMSettingsForbidden",
                &format!("{how}: the token's variable"),
            );
        let used = try_to_use_the_lm(serve, "eve").await;
        assert_ne!(used.status, StatusCode::OK, "{how}: {}", used.text);
        fake.assert_never_saw(TOKEN);

        // What the operator allowed does work.
        serve
            .in_session(
                "carol",
                "configure_lm",
                json!({"model": "openai/x", "api_base": api_base,
                       "api_key_env": "SP_TEST_KEY"}),
            )
            .await
            .expect_ok(&format!("{how}: client settings allowed"));
        let run = try_to_use_the_lm(serve, "carol").await;
        assert_eq!(
            run.expect_ok(&format!("{how}: execute_program"))["outputs"]["answer"],
            42
        );
        serve.assert_serves(how).await;
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "one LM call per server: {seen:?}");
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer sk-fine"),
            "{}",
            request.dump
        );
    }
    fake.assert_never_saw(TOKEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_bodies_are_not_echoed_to_the_client() {
    let (fake_url, fake) = start_fake_lm().await;
    let marker = fake.marker.lock().unwrap().clone();
    let config = format!(
        "[lm.e404]\nmodel = \"openai/x\"\napi_base = \"{fake_url}/e404/v1\"\n\
         api_key_env = \"SP_TEST_KEY\"\n\n\
         [lm.e500]\nmodel = \"openai/x\"\napi_base = \"{fake_url}/e500/v1\"\n\
         api_key_env = \"SP_TEST_KEY\"\n"
    );
    let serve = ServeCmd::new(2)
        .config(&config)
        .env("SP_TEST_KEY", KEY)
        .start()
        .await;
    let attempt = |profile: &'static str| {
        let serve = &serve;
        async move {
            let session = format!("s-{profile}");
            serve
                .in_session(&session, "configure_lm", json!({"profile": profile}))
                .await
                .expect_ok(&format!("configure_lm profile {profile}"));
            (profile, try_to_use_the_lm(serve, &session).await)
        }
    };
    let (r404, r500) = tokio::join!(attempt("e404"), attempt("e500"));
    for (profile, reply) in [r404, r500] {
        reply.expect_python("LMCallFailed", &format!("upstream {profile}"));
        assert!(
            !reply.text.contains(&marker),
            "the upstream {profile} body reached the client: {}",
            reply.text
        );
    }
    assert!(
        fake.seen().iter().any(|r| r.path.starts_with("/e404/")),
        "the 404 route was never called: {:?}",
        fake.seen()
    );
    assert!(
        fake.seen().iter().any(|r| r.path.starts_with("/e500/")),
        "the 500 route was never called"
    );
    serve.assert_serves("upstream errors").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_state_cannot_bring_its_own_lm() {
    let (fake_url, fake) = start_fake_lm().await;
    let api_base = format!("{fake_url}/v1");
    let serve = ServeCmd::new(1)
        .env("OPENAI_API_KEY", "sk-operator-openai")
        .env("SP_TEST_KEY", KEY)
        .start()
        .await;
    let answer = "from the session's LM";
    serve
        .in_session(
            "mallory",
            "configure_lm",
            json!({"provider": "dummy", "answers": vec![json!({"answer": answer}); 8]}),
        )
        .await
        .expect_ok("configure_lm dummy");
    serve
        .in_session(
            "mallory",
            "create_program",
            json!({"signature": "question -> answer"}),
        )
        .await
        .expect_ok("create_program");
    let dumped = serve
        .in_session(
            "mallory",
            "dump_program_state",
            json!({"program_id": "prog_1"}),
        )
        .await;
    let state = dumped.expect_ok("dump_program_state")["state"].clone();
    assert!(state.is_object(), "{}", dumped.text);

    let mut programs = vec!["prog_1".to_owned()];
    let smuggled_lms = [
        // The operator's OPENAI_API_KEY would go with a model that names no key.
        json!({"model": "openai/x", "api_base": api_base, "model_type": "chat"}),
        json!({"model": "openai/x", "api_base": api_base, "api_key": "sk-attacker",
               "model_type": "chat", "temperature": 0.0, "max_tokens": 100}),
    ];
    for (i, lm) in smuggled_lms.iter().enumerate() {
        let mut smuggling = state.clone();
        smuggling["lm"] = lm.clone();
        let loaded = serve
            .in_session(
                "mallory",
                "load_program_state",
                json!({"program_id": "prog_1", "state": smuggling}),
            )
            .await;
        assert!(
            loaded.status == StatusCode::OK || loaded.python_type() == "InvalidState",
            "load_program_state with an LM: {} {}",
            loaded.status,
            loaded.text
        );
        let id = format!("smuggled_{i}");
        let created = serve
            .in_session(
                "mallory",
                "create_program",
                json!({"signature": "question -> answer", "state": smuggling,
                       "program_id": id}),
            )
            .await;
        if created.status == StatusCode::OK {
            programs.push(id);
        } else {
            created.expect_python("InvalidState", "create_program with an LM in its state");
        }
    }
    for program in &programs {
        let run = serve
            .in_session(
                "mallory",
                "execute_program",
                json!({"program_id": program, "inputs": {"question": "who answers?"}}),
            )
            .await;
        assert_eq!(
            run.expect_ok(&format!("execute {program}"))["outputs"]["answer"],
            answer,
            "{program} did not use the session's LM"
        );
    }
    assert!(
        fake.seen().is_empty(),
        "a program state made the worker call a client-chosen server: {:?}",
        fake.seen()
    );
    serve.assert_serves("LM smuggling").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_input_names_are_refused() {
    let serve = ServeCmd::new(1).start().await;
    serve
        .in_session("r", "configure_lm", dummy_lm("fine"))
        .await
        .expect_ok("configure_lm");
    for signature in [
        "config -> answer",
        "lm -> answer",
        "demos -> answer",
        "question, lm -> answer",
    ] {
        serve
            .in_session("r", "create_program", json!({"signature": signature}))
            .await
            .expect_python("ReservedFieldName", signature);
    }
    let listed = serve.in_session("r", "list_programs", json!({})).await;
    assert_eq!(
        listed.expect_ok("list_programs")["programs"],
        json!([]),
        "a refused program was kept"
    );
    serve
        .in_session(
            "r",
            "create_program",
            json!({"signature": "question -> answer"}),
        )
        .await
        .expect_ok("an ordinary signature");
    serve.assert_serves("reserved names").await;
}

// ---------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_millisecond_timeout_is_clamped_and_kills_nothing() {
    let serve = ServeCmd::new(1).start().await;
    let before = serve.pool().await;
    for _ in 0..3 {
        let reply = serve
            .post_call(json!({"command": "sec_sleep", "args": {"seconds": 0.3},
                              "timeout_ms": 1}))
            .await;
        reply.expect_ok("timeout_ms 1 on a 0.3 s call (clamped up to 1 s)");
    }
    let after = serve.pool().await;
    assert_eq!(
        worker_pids(&after),
        worker_pids(&before),
        "a worker was killed"
    );
    assert_eq!(crashes(&after), crashes(&before), "{after}");
    serve.assert_serves("tiny timeouts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_timeout_is_clamped_to_the_maximum() {
    let serve = ServeCmd::new(1)
        .args(&["--max-request-timeout", "2s", "--request-timeout", "2s"])
        .start()
        .await;
    let started = Instant::now();
    let reply = serve
        .send(
            serve
                .request_with(
                    &client(Duration::from_secs(15)),
                    reqwest::Method::POST,
                    "/v1/call",
                )
                .json(&json!({"command": "sec_sleep", "args": {"seconds": 10},
                               "timeout_ms": 4_611_686_018_427_387_904_u64})),
            "timeout_ms 2^62",
        )
        .await;
    let elapsed = started.elapsed();
    reply.expect_error(504, "request_timeout", "timeout_ms 2^62");
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(6),
        "answered after {elapsed:?}, expected about 2 s"
    );
    serve.assert_serves("a clamped timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_does_not_kill_the_worker() {
    let serve = ServeCmd::new(1)
        .args(&["--health-interval", "1h"])
        .start()
        .await;
    let before = serve.pool().await;
    let served = calls_served(&before);
    let impatient = client(Duration::from_millis(200));
    let hung_up = serve
        .request_with(&impatient, reqwest::Method::POST, "/v1/call")
        .json(&json!({"command": "sec_sleep", "args": {"seconds": 1}}))
        .send()
        .await;
    match hung_up {
        Err(error) => assert!(error.is_timeout(), "{error:?}"),
        Ok(response) => panic!("a 1 s call answered within 200 ms: {response:?}"),
    }
    let pids = worker_pids(&before);
    wait_until(
        "the abandoned call completes on the same worker",
        Duration::from_secs(5),
        || async {
            let pool = serve.pool().await;
            if worker_pids(&pool) == pids && calls_served(&pool) == served + 1 {
                Ok(())
            } else {
                Err(pool.to_string())
            }
        },
    )
    .await;
    let after = serve.pool().await;
    assert_eq!(crashes(&after), crashes(&before), "{after}");
    serve.assert_serves("a hang-up").await;
    assert_eq!(worker_pids(&serve.pool().await), pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_clients_that_hang_up_never_reach_a_worker() {
    let serve = ServeCmd::new(1)
        .args(&["--health-interval", "1h"])
        .start()
        .await;
    let before = serve.pool().await;
    let served = calls_served(&before);
    let held = {
        let request = serve
            .request(reqwest::Method::POST, "/v1/call")
            .json(&json!({"command": "sec_sleep", "args": {"seconds": 2}}));
        tokio::spawn(async move { request.send().await.map(|r| r.status()) })
    };
    wait_until("the worker is busy", Duration::from_secs(5), || async {
        let pool = serve.pool().await;
        if pool["workers"][0]["state"] == "busy" {
            Ok(())
        } else {
            Err(pool.to_string())
        }
    })
    .await;
    let impatient = client(Duration::from_millis(700));
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            serve
                .request_with(&impatient, reqwest::Method::POST, "/v1/call")
                .json(&json!({"command": "sec_whoami"}))
                .send()
        })
        .collect();
    for outcome in futures::future::join_all(waiters).await {
        match outcome {
            Err(error) => assert!(error.is_timeout(), "{error:?}"),
            Ok(response) => panic!(
                "a queued call answered while the only worker was busy: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            ),
        }
    }
    assert_eq!(held.await.unwrap().unwrap(), StatusCode::OK);
    // FIFO: any abandoned call still queued would run before this one.
    serve.assert_serves("ten hang-ups in the queue").await;
    let after = serve.pool().await;
    assert_eq!(worker_pids(&after), worker_pids(&before));
    assert_eq!(
        calls_served(&after),
        served + 2,
        "only the held call and the last ping ran: {after}"
    );
    assert_eq!(crashes(&after), crashes(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_of_sessions_is_capped() {
    let serve = ServeCmd::new(1)
        .args(&["--max-sessions", "3"])
        .start()
        .await;
    for id in ["s1", "s2", "s3"] {
        serve
            .in_session(id, "sec_set", json!({"key": "k", "value": id}))
            .await
            .expect_ok(id);
    }
    serve
        .in_session("s4", "ping", json!({}))
        .await
        .expect_error(429, "too_many_sessions", "a 4th session");
    let s2 = serve.in_session("s2", "sec_get", json!({"key": "k"})).await;
    assert_eq!(s2.expect_ok("an open session still works"), "s2");
    let deleted = serve.delete_session("s1").await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    serve
        .in_session("s4", "ping", json!({}))
        .await
        .expect_ok("a session after one was closed");
    serve
        .in_session("s5", "ping", json!({}))
        .await
        .expect_error(429, "too_many_sessions", "over the cap again");
    serve.assert_serves("the session cap").await;
}

const HEALTH_REQUEST: &[u8] =
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

/// Reads what arrives within `limit`: `None` if nothing did (still waiting), else the
/// bytes (empty on EOF or reset).
async fn read_within(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(limit, stream.read(&mut buf)).await {
        Err(_) => None,
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        Ok(Err(_)) => Some(Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_or_are_refused() {
    let serve = ServeCmd::new(1)
        .args(&["--max-connections", "4"])
        .start()
        .await;
    let addr = serve.url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    // Idle connections are held open by the server (nothing was sent on them).
    let mut fifth = TcpStream::connect(&addr).await;
    let mut refused = true;
    if let Ok(stream) = fifth.as_mut()
        && stream.write_all(HEALTH_REQUEST).await.is_ok()
    {
        match read_within(stream, Duration::from_millis(800)).await {
            None => refused = false,
            Some(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.starts_with("HTTP/1.1 200"),
                    "a 5th connection was served while 4 were open: {text}"
                );
            }
        }
    }
    if !refused {
        // Waiting, not refused: it is served once a slot frees up.
        drop(idle.pop());
        let stream = fifth.as_mut().unwrap();
        let answer = read_within(stream, Duration::from_secs(5))
            .await
            .expect("the 5th connection was not served after one closed");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    drop(fifth);
    drop(idle);
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_until(
        "requests work after the connections closed",
        Duration::from_secs(5),
        || async {
            match serve
                .request_with(&fresh, reqwest::Method::GET, "/health")
                .send()
                .await
            {
                Ok(r) if r.status() == StatusCode::OK => Ok(()),
                Ok(r) => Err(format!("{}", r.status())),
                Err(e) => Err(format!("{e:?}")),
            }
        },
    )
    .await;
    let reply = serve
        .send(
            serve
                .request_with(&fresh, reqwest::Method::POST, "/v1/call")
                .json(&json!({"command": "ping"})),
            "ping",
        )
        .await;
    reply.expect_ok("ping after the connection cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_trickling_request_head_is_cut_off() {
    let serve = ServeCmd::new(1)
        .args(&["--header-read-timeout", "1s"])
        .start()
        .await;
    let addr = serve.url.trim_start_matches("http://").to_owned();

    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let sent = Instant::now();

    // A trickle: one byte of a header every 200 ms, never finishing the head.
    let trickle = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await
                .unwrap();
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return started.elapsed(),
                        Ok(_) => {} // e.g. a 408 before the close
                    },
                    _ = tick.tick() => {
                        if started.elapsed() > Duration::from_secs(6) {
                            panic!("a trickling head was still open after 6 s");
                        }
                        if stream.write_all(b"a").await.is_err() {
                            return started.elapsed();
                        }
                    }
                }
            }
        })
    };

    // Others are served meanwhile.
    for _ in 0..3 {
        let reply = serve.get("/health").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        serve.assert_serves("a stalled head").await;
    }

    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // e.g. a 408 before the close
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("a stalled request head was not cut off within 5 s");
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "cut off after {:?}, before the 1 s header timeout",
        sent.elapsed()
    );
    let trickled = trickle.await.unwrap();
    assert!(
        trickled < Duration::from_secs(5),
        "a trickling head stayed open {trickled:?}"
    );
    serve.assert_serves("slow heads").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_list_is_paged_by_id() {
    let serve = ServeCmd::new(1).start().await;
    for id in ["s-c", "s-a", "s-e", "s-b", "s-d"] {
        serve.in_session(id, "ping", json!({})).await.expect_ok(id);
    }
    let page = |path: &'static str| {
        let serve = &serve;
        async move {
            let reply = serve.get(path).await;
            assert_eq!(reply.status, StatusCode::OK, "GET {path}: {}", reply.text);
            let ids: Vec<String> = reply.body["sessions"]
                .as_array()
                .unwrap_or_else(|| panic!("GET {path}: {}", reply.text))
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect();
            (ids, reply.body["next_after"].clone(), reply.text)
        }
    };
    let (ids, next, text) = page("/v1/sessions?limit=2").await;
    assert_eq!(
        (ids, next),
        (vec!["s-a".into(), "s-b".into()], json!("s-b")),
        "{text}"
    );
    let (ids, next, text) = page("/v1/sessions?limit=2&after=s-b").await;
    assert_eq!(
        (ids, next),
        (vec!["s-c".into(), "s-d".into()], json!("s-d")),
        "{text}"
    );
    let (ids, next, text) = page("/v1/sessions?limit=2&after=s-d").await;
    assert_eq!((ids, next), (vec!["s-e".into()], Value::Null), "{text}");
    let (ids, next, text) = page("/v1/sessions?limit=1000").await;
    assert_eq!(ids.len(), 5, "{text}");
    assert_eq!(next, Value::Null, "{text}");
    for bad in [
        "/v1/sessions?limit=0",
        "/v1/sessions?limit=1001",
        "/v1/sessions?limit=abc",
        "/v1/sessions?limit=-1",
        "/v1/sessions?limit=99999999999999999999999",
    ] {
        serve
            .get(bad)
            .await
            .expect_error(400, "invalid_request", bad);
    }
    serve.assert_serves("paging").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_sessions_among_thousands_stays_correct() {
    const OPEN: usize = 2000;
    let serve = ServeCmd::new(2)
        .args(&["--max-sessions", "10000"])
        .start()
        .await;
    let id = |i: usize| format!("m-{i:05}");
    let opened: Vec<Reply> = futures::stream::iter(0..OPEN)
        .map(|i| {
            let serve = &serve;
            async move { serve.in_session(&id(i), "ping", json!({})).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for reply in &opened {
        reply.expect_ok("opening a session");
    }
    let started = Instant::now();
    for i in 0..50 {
        let reply = serve.delete_session(&id(i * 40)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "DELETE {}: {}",
            id(i * 40),
            reply.text
        );
    }
    let took = started.elapsed();
    eprintln!("50 DELETEs among {OPEN} sessions took {took:?}");
    serve
        .in_session(&id(0), "ping", json!({}))
        .await
        .expect_ok("a deleted session's id opens a new session at once");
    serve
        .in_session(&id(1), "ping", json!({}))
        .await
        .expect_ok("a session that was not deleted");
    serve
        .delete_session(&id(40))
        .await
        .expect_error(404, "session_not_found", "a second DELETE");

    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let path = match &after {
            Some(after) => format!("/v1/sessions?limit=1000&after={}", percent_encode(after)),
            None => "/v1/sessions?limit=1000".to_owned(),
        };
        let reply = serve.get(&path).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{path}: {}",
            tail(&reply.text, 500)
        );
        for session in reply.body["sessions"].as_array().unwrap() {
            listed.push(session["id"].as_str().unwrap().to_owned());
        }
        match reply.body["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    // The deleted sessions are gone, but for the one opened again under its id.
    let expected: Vec<String> = (0..OPEN)
        .filter(|i| i % 40 != 0 || *i == 0)
        .map(id)
        .collect();
    assert_eq!(listed.len(), expected.len());
    assert_eq!(listed, expected, "every open session, in id order");
    serve.assert_serves("thousands of sessions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_calls_past_the_drain_deadline_and_stops_everything() {
    let mut serve = ServeCmd::new(1)
        .args(&["--drain-timeout", "1s"])
        .start()
        .await;
    let slow = {
        let request = serve
            .request_with(
                &client(Duration::from_secs(15)),
                reqwest::Method::POST,
                "/v1/call",
            )
            .json(&json!({"command": "sec_sleep", "args": {"seconds": 30}}));
        tokio::spawn(async move {
            let response = request.send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.text().await?, Instant::now()))
        })
    };
    let pool = wait_until("the worker is busy", Duration::from_secs(5), || async {
        let pool = serve.pool().await;
        if pool["workers"][0]["state"] == "busy" {
            Ok(pool)
        } else {
            Err(pool.to_string())
        }
    })
    .await;
    let mut pids = worker_pids(&pool);
    pids.extend(pool["spawn"]["pid"].as_u64().map(|p| p as u32));

    let sigterm = Instant::now();
    signal(serve.child.id(), libc::SIGTERM);
    let (status, text, answered) = slow
        .await
        .unwrap()
        .expect("the call in flight got an HTTP answer");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert_eq!(
        (status.as_u16(), body["error"]["kind"].as_str()),
        (503, Some("shutting_down")),
        "the call past the drain deadline: {text}"
    );
    assert!(
        answered.duration_since(sigterm) < Duration::from_secs(5),
        "answered {:?} after SIGTERM",
        answered.duration_since(sigterm)
    );
    let exit = wait_until("serve exits", Duration::from_secs(6), || {
        let status = serve.child.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    assert!(
        exit.success(),
        "serve exited with {exit}: {}",
        serve.stderr()
    );
    assert!(
        sigterm.elapsed() < Duration::from_secs(6),
        "serve took {:?}",
        sigterm.elapsed()
    );
    for pid in pids {
        wait_until(
            &format!("process {pid} ends"),
            Duration::from_secs(3),
            || async move {
                if alive(pid) {
                    Err("alive".to_owned())
                } else {
                    Ok(())
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_bodies_carry_no_stderr_and_every_answer_has_a_request_id() {
    let serve = ServeCmd::new(1)
        .args(&["--body-limit", "4096"])
        .env("SNAKEPOOL_TOKEN", "tok-ids")
        .start()
        .await;
    let marker = unique("STDERR-MARKER");
    let last_words = unique("LAST-WORDS");
    // Every answer is checked; the mismatches are reported together at the end.
    let mut request_ids = Vec::new();
    let mut problems = Vec::new();
    let mut note = |reply: &Reply, what: &str| {
        let Some(id) = reply
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| !id.is_empty())
        else {
            problems.push(format!(
                "{what}: no X-Request-Id header: {:?}",
                reply.headers
            ));
            return;
        };
        if reply.body.get("error").is_some() && reply.body["error"]["request_id"] != id {
            problems.push(format!(
                "{what}: the body's request_id is not the header's {id}: {}",
                reply.text
            ));
        }
        request_ids.push(id.to_owned());
    };

    let written = serve.plain("sec_stderr", json!({"marker": marker})).await;
    written.expect_ok("the handler writing to stderr");
    note(&written, "sec_stderr");
    let crashed = serve.plain("sec_die", json!({"marker": last_words})).await;
    crashed.expect_error(502, "worker_crashed", "a worker that kills itself");
    note(&crashed, "sec_die");
    let error = &crashed.body["error"];
    for field in ["worker", "command", "status", "request_id"] {
        assert!(
            error.get(field).is_some_and(|v| !v.is_null()),
            "the crash body has `{field}`: {}",
            crashed.text
        );
    }
    assert_eq!(error["command"], "sec_die");
    assert!(
        error.get("stderr_tail").is_none(),
        "the crash body has a stderr_tail: {}",
        crashed.text
    );
    for secret in [&marker, &last_words] {
        assert!(
            !crashed.text.contains(secret.as_str()),
            "the crash body shows the worker's stderr: {}",
            crashed.text
        );
    }

    let ping = serve.plain("ping", json!({})).await;
    ping.expect_ok("ping after the crash");
    note(&ping, "ping");
    let unknown = serve.plain("no_such_command", json!({})).await;
    unknown.expect_error(404, "unknown_command", "an unknown command");
    note(&unknown, "unknown command");
    let invalid = serve
        .post_call(json!({"command": "ping", "args": [1]}))
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST, "{}", invalid.text);
    note(&invalid, "args not an object");
    let malformed = serve
        .send(
            serve
                .request(reqwest::Method::POST, "/v1/call")
                .header("content-type", "application/json")
                .body("{not json"),
            "malformed body",
        )
        .await;
    assert_eq!(
        malformed.status,
        StatusCode::BAD_REQUEST,
        "{}",
        malformed.text
    );
    note(&malformed, "malformed body");
    let too_large = serve
        .post_call(json!({"command": "ping", "args": {"blob": "x".repeat(10_000)}}))
        .await;
    too_large.expect_error(413, "body_too_large", "a body over --body-limit");
    note(&too_large, "body too large");
    let no_route = serve.get("/v1/no-such-route").await;
    assert_eq!(no_route.status, StatusCode::NOT_FOUND, "{}", no_route.text);
    note(&no_route, "unknown route");
    let anonymous = Reply::from(
        serve
            .client
            .post(format!("{}/v1/call", serve.url))
            .json(&json!({"command": "ping"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    anonymous.expect_error(401, "unauthorized", "a call without the token");
    note(&anonymous, "no token");
    let missing = serve.delete_session("never-opened").await;
    missing.expect_error(404, "session_not_found", "DELETE of a missing session");
    note(&missing, "DELETE missing");
    for path in ["/health", "/v1/pool", "/v1/sessions", "/metrics"] {
        let reply = serve.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text);
        note(&reply, path);
    }
    let health = Reply::from(
        serve
            .client
            .get(format!("{}/health", serve.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);
    note(&health, "/health without a token");
    serve.assert_serves("a crash").await;
    let mut distinct = request_ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        request_ids.len(),
        "request ids repeat: {request_ids:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------
// The pool never dies quietly
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_workers_cannot_start_says_so_fails_fast_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("workers-may-start");
    let attempts = dir.path().join("failed-attempts");
    std::fs::write(&flag, b"").unwrap();
    let cmd = format!(
        "{} {} gate {} {} {{worker_id}}",
        python(),
        fixtures().join("security_handlers.py").display(),
        flag.display(),
        attempts.display()
    );
    let serve = ServeCmd::new(1)
        .worker_cmd(&cmd)
        .args(&["--checkout-timeout", "10s"])
        .start()
        .await;
    serve.assert_serves("start-up").await;
    let failed_attempts = || {
        std::fs::read_to_string(&attempts)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };

    std::fs::remove_file(&flag).unwrap();
    for pid in worker_pids(&serve.pool().await) {
        signal(pid, libc::SIGKILL);
    }
    let health = wait_until("/health says degraded", Duration::from_secs(10), || async {
        let reply = serve.get("/health").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.body["status"] == "degraded" {
            Ok(reply)
        } else {
            Err(format!("{} {}", reply.status, reply.text))
        }
    })
    .await;
    assert!(
        health.body["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "/health gives a reason: {}",
        health.text
    );

    let started = Instant::now();
    let reply = serve.plain("ping", json!({})).await;
    reply.expect_error(503, "startup_failed", "a call while no worker can start");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the call waited {:?} (checkout timeout 10 s)",
        started.elapsed()
    );

    // More failed starts than a supervisor that gives up would make.
    wait_until(
        "the pool keeps retrying",
        Duration::from_secs(20),
        || async {
            let n = failed_attempts();
            if n >= 6 {
                Ok(())
            } else {
                Err(format!("{n} failed attempts"))
            }
        },
    )
    .await;
    let reply = serve.get("/health").await;
    assert_eq!(
        (reply.status, &reply.body["status"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("degraded")),
        "{}",
        reply.text
    );
    serve
        .plain("ping", json!({}))
        .await
        .expect_error(503, "startup_failed", "still no worker");

    std::fs::write(&flag, b"").unwrap();
    wait_until(
        "the pool recovers by itself",
        Duration::from_secs(20),
        || async {
            let reply = serve.get("/health").await;
            if reply.status == StatusCode::OK && reply.body["status"] == "ready" {
                Ok(())
            } else {
                Err(format!(
                    "{} {} after {} failed attempts",
                    reply.status,
                    reply.text,
                    failed_attempts()
                ))
            }
        },
    )
    .await;
    serve.assert_serves("recovery").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_kills_workers_on_replay_fails_bounded_and_alone() {
    let serve = ServeCmd::new(2).start().await;
    let flag = serve.dir().join("poison-armed");
    let log = serve.dir().join("poison-kills");
    serve
        .in_session("poisoned", "sec_set", json!({"key": "k", "value": 1}))
        .await
        .expect_ok("sec_set");
    serve
        .in_session("poisoned", "sec_poison", json!({"flag": flag, "log": log}))
        .await
        .expect_ok("sec_poison, first run");
    serve
        .in_session("healthy", "sec_set", json!({"key": "k", "value": "fine"}))
        .await
        .expect_ok("the other session");
    let kills = || {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };

    let sessions = serve.sessions().await;
    let worker = sessions
        .iter()
        .find(|s| s["id"] == "poisoned")
        .map(|s| s["worker"].clone())
        .unwrap_or_else(|| panic!("poisoned is listed: {sessions:?}"));
    let pool = serve.pool().await;
    let crashes_before = crashes(&pool);
    let pid = pool["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == worker)
        .and_then(|w| w["pid"].as_u64())
        .unwrap_or_else(|| panic!("worker {worker} in {pool}")) as u32;
    signal(pid, libc::SIGKILL);
    wait_until(
        "the killed worker leaves the pool",
        Duration::from_secs(10),
        || async {
            let pool = serve.pool().await;
            if !alive(pid) && !worker_pids(&pool).contains(&pid) {
                Ok(())
            } else {
                Err(pool.to_string())
            }
        },
    )
    .await;

    let started = Instant::now();
    let reply = serve
        .in_session("poisoned", "sec_get", json!({"key": "k"}))
        .await;
    let took = started.elapsed();
    reply.expect_error(502, "session_rebuild_failed", "the poisoned session");
    assert!(took < Duration::from_secs(15), "the rebuild took {took:?}");
    let error = &reply.body["error"];
    assert_eq!(error["entry_command"], "sec_poison", "{}", reply.text);
    assert!(
        matches!(error["entry"].as_u64(), Some(1 | 2)),
        "`entry` is the index of the second journal entry (0- or 1-based): {}",
        reply.text
    );
    let killed = kills();
    assert!(
        !killed.is_empty() && killed.len() <= 3,
        "workers killed by the replay: {killed:?}"
    );

    // Others are unaffected.
    let healthy = serve
        .in_session("healthy", "sec_get", json!({"key": "k"}))
        .await;
    assert_eq!(healthy.expect_ok("the other session"), "fine");
    serve.assert_serves("a failed rebuild").await;

    // The session keeps failing the same way, at once, without another kill.
    let started = Instant::now();
    let again = serve
        .in_session("poisoned", "sec_get", json!({"key": "k"}))
        .await;
    again.expect_error(502, "session_rebuild_failed", "the poisoned session again");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the second failure took {:?}",
        started.elapsed()
    );
    assert_eq!(again.body["error"]["entry_command"], "sec_poison");
    assert_eq!(kills(), killed, "a later call killed more workers");
    let after = serve.pool().await;
    assert!(
        crashes(&after) <= crashes_before + 1 + killed.len() as u64,
        "crashes {} -> {}",
        crashes_before,
        crashes(&after)
    );
    let healthy = serve
        .in_session("healthy", "sec_get", json!({"key": "k"}))
        .await;
    assert_eq!(healthy.expect_ok("the other session, again"), "fine");
}

// ---------------------------------------------------------------------------------
// More attacks and limits: the CLI, manifest-flagged internal commands, secrets of
// the environment, per-profile caches, the server's log, body limits, rebuild
// deadlines, memory limits
// ---------------------------------------------------------------------------------

/// Writes a Python command module named `name` into `dir`.
fn write_module(dir: &Path, name: &str, source: &str) {
    std::fs::write(dir.join(format!("{name}.py")), source).unwrap();
}

/// Creates a chain-of-thought program in `session` (whatever its LM) and runs it on
/// the question the fake model server answers.
async fn run_the_lm(serve: &Serve, session: &str) -> Reply {
    serve
        .in_session(
            session,
            "create_program",
            json!({"signature": "question -> answer: int", "type": "chain_of_thought",
                   "program_id": "probe"}),
        )
        .await
        .expect_ok(&format!("{session}: create_program"));
    serve
        .in_session(
            session,
            "execute_program",
            json!({"program_id": "probe", "inputs": {"question": "What is 40 plus 2?"}}),
        )
        .await
}

// ---------------------------------------------------------------------------------
// Session isolation
// ---------------------------------------------------------------------------------

/// `snakepool call` with the test handlers on a pool of its own, or against `url`.
fn snakepool_call(url: Option<&str>, args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_snakepool"));
    command.arg("call");
    for (key, _) in std::env::vars() {
        if key.starts_with("SNAKEPOOL_") && key != "SNAKEPOOL_SPAWN" {
            command.env_remove(key);
        }
    }
    match url {
        Some(url) => {
            command.args(["--url", url]);
        }
        None => {
            command
                .args(["--python", &python()])
                .args(["--python-path", fixtures().to_str().unwrap()])
                .args(["--module", "sp_test_handlers", "--spawn", "fresh"]);
        }
    }
    let output = command.args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_internal_commands_and_a_session_id_in_args() {
    let serve = ServeCmd::new(1).start().await;
    let url = serve.url.clone();
    let cases = tokio::task::spawn_blocking(move || {
        let mut cases = Vec::new();
        for target in [None, Some(url.as_str())] {
            for command in ["shutdown", "cleanup_session"] {
                cases.push((
                    format!("{target:?} {command}"),
                    snakepool_call(target, &[command, r#"{"session_id": "bob"}"#]),
                    snakepool_call(target, &[command]),
                ));
            }
            cases.push((
                format!("{target:?} ping with args.session_id"),
                snakepool_call(target, &["ping", r#"{"session_id": "bob"}"#]),
                snakepool_call(
                    target,
                    &["--session", "bob", "ping", r#"{"session_id": "x"}"#],
                ),
            ));
        }
        cases
    })
    .await
    .unwrap();
    for (what, with_session_arg, plain) in cases {
        let (code, stderr) = &with_session_arg;
        // args.session_id is checked first, whatever the command.
        assert_eq!(
            *code, 2,
            "{what} with args.session_id: exit {code}: {stderr}"
        );
        assert!(
            stderr.contains("invalid_request") && stderr.contains("args.session_id"),
            "{what}: {stderr}"
        );
        let (code, stderr) = &plain;
        if what.ends_with("args.session_id") {
            assert_eq!(*code, 2, "{what} (session call): exit {code}: {stderr}");
        } else {
            assert_eq!(*code, 3, "{what}: exit {code}: {stderr}");
            assert!(stderr.contains("error (forbidden)"), "{what}: {stderr}");
        }
    }
    serve.assert_serves("CLI attacks").await;
}

const INTERNAL_MODULE: &str = r#"
from pathlib import Path
from snakepool_worker import command

@command("op_host_only", internal=True)
def op_host_only(args, ctx):
    """Only the host may send this; it leaves a mark if it ever runs."""
    Path(args["mark"]).touch()
    return "ran"

@command("op_public")
def op_public(args, ctx):
    return "public"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_manifest_flags_internal_is_refused_everywhere_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "op_internal", INTERNAL_MODULE);
    let mark = dir.path().join("ran");
    let pool = builder(1)
        .python_path(dir.path())
        .module("op_internal")
        .start()
        .await
        .unwrap();
    let args = json!({"mark": mark});
    let session = pool.session("alice");
    for (what, result) in [
        ("Pool::call", pool.call("op_host_only", args.clone()).await),
        (
            "Session::call",
            session.call("op_host_only", args.clone()).await,
        ),
    ] {
        assert!(
            matches!(&result, Err(Error::Forbidden { command }) if command == "op_host_only"),
            "{what}: {result:?}"
        );
    }
    let url = common::serve_in_process(&pool, &snakepool::server::ServerOptions::default()).await;
    let client = reqwest::Client::new();
    for body in [
        json!({"command": "op_host_only", "args": args}),
        json!({"command": "op_host_only", "args": args, "session_id": "alice"}),
    ] {
        let response = client
            .post(format!("{url}/v1/call"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let reply: Value = response.json().await.unwrap();
        assert_eq!(
            (status, reply["error"]["kind"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "HTTP {body}: {reply}"
        );
    }
    let commands: Value = client
        .get(format!("{url}/v1/commands"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = commands["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(names.contains(&"op_public"), "{names:?}");
    assert!(!names.contains(&"op_host_only"), "listed: {names:?}");
    assert!(!mark.exists(), "the internal command ran");
    assert_eq!(pool.call("op_public", json!({})).await.unwrap(), "public");
    pool.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Secrets and the LM policy
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_input_names_are_refused_at_execute_program() {
    let serve = ServeCmd::new(1).start().await;
    // One scripted answer: a refused call that reached the LM would use it up.
    serve
        .in_session(
            "r",
            "configure_lm",
            json!({"provider": "dummy", "answers": [{"answer": "kept"}]}),
        )
        .await
        .expect_ok("configure_lm");
    serve
        .in_session(
            "r",
            "create_program",
            json!({"signature": "question -> answer"}),
        )
        .await
        .expect_ok("create_program");
    for extra in [
        json!({"config": {"api_base": "http://169.254.169.254"}}),
        json!({"lm": "openai/x"}),
        json!({"demos": []}),
    ] {
        let mut inputs = json!({"question": "q"});
        inputs
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serve
            .in_session(
                "r",
                "execute_program",
                json!({"program_id": "prog_1", "inputs": inputs}),
            )
            .await
            .expect_python("ReservedFieldName", &format!("execute_program {extra}"));
    }
    let run = serve
        .in_session(
            "r",
            "execute_program",
            json!({"program_id": "prog_1", "inputs": {"question": "q"}}),
        )
        .await;
    assert_eq!(
        run.expect_ok("an ordinary run")["outputs"]["answer"],
        "kept"
    );
    serve.assert_serves("reserved inputs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_endpoint_without_a_key_variable_never_gets_the_operators_key() {
    const OPERATOR_KEY: &str = "sk-operator-openai-secret";
    let (fake_url, fake) = start_fake_lm().await;
    let api_base = format!("{fake_url}/v1");
    let serve = ServeCmd::new(1)
        .args(&["--allow-client-lm"])
        .env("OPENAI_API_KEY", OPERATOR_KEY)
        .start()
        .await;
    serve
        .in_session(
            "eve",
            "configure_lm",
            json!({"model": "openai/x", "api_base": api_base}),
        )
        .await
        .expect_ok("client settings are allowed");
    let run = run_the_lm(&serve, "eve").await;
    assert_eq!(run.expect_ok("execute_program")["outputs"]["answer"], 42);
    assert_eq!(fake.models().len(), 1, "one LM call");
    fake.assert_never_saw(OPERATOR_KEY);
    serve.assert_serves("a client endpoint").await;
}

const ENV_MODULE: &str = r#"
import os
from snakepool_worker import command

@command("op_env")
def op_env(args, ctx):
    return {name: os.environ.get(name) for name in args["names"]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_never_see_the_servers_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "op_env", ENV_MODULE);
    let serve = ServeCmd::new(1)
        .args(&["--python-path", dir.path().to_str().unwrap()])
        .args(&["--module", "op_env"])
        .env("SNAKEPOOL_TOKEN", "tok-client-secret")
        .env("SNAKEPOOL_ADMIN_TOKEN", "tok-admin-secret")
        .env("OP_VISIBLE", "visible")
        .start()
        .await;
    let seen = serve
        .plain(
            "op_env",
            json!({"names": ["SNAKEPOOL_TOKEN", "SNAKEPOOL_ADMIN_TOKEN", "OP_VISIBLE"]}),
        )
        .await;
    assert_eq!(
        seen.expect_ok("op_env"),
        &json!({"SNAKEPOOL_TOKEN": null, "SNAKEPOOL_ADMIN_TOKEN": null,
                "OP_VISIBLE": "visible"}),
        "the worker's environment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm_response_caches_are_per_profile_in_the_operators_directory() {
    let (fake_url, fake) = start_fake_lm().await;
    let api_base = format!("{fake_url}/v1");
    let profile = |model: &str, cache: bool| {
        format!("model = \"openai/{model}\"\napi_base = \"{api_base}\"\ncache = {cache}\n")
    };
    let config = format!(
        "[lm.cached]\n{}\n[lm.cached_too]\n{}\n[lm.uncached]\n{}",
        profile("m", true),
        profile("m", true),
        profile("m", false)
    );
    let caches = tempfile::tempdir().unwrap();
    let serve = ServeCmd::new(1)
        .config(&config)
        .args(&["--lm-cache-dir", caches.path().to_str().unwrap()])
        .start()
        .await;
    // The same model, endpoint and question in each session: only the profile differs.
    let mut calls = Vec::new();
    for (session, profile) in [
        ("a", "cached"),
        ("b", "cached"),
        ("c", "cached_too"),
        ("d", "uncached"),
        ("e", "uncached"),
    ] {
        serve
            .in_session(session, "configure_lm", json!({"profile": profile}))
            .await
            .expect_ok(&format!("configure_lm {profile}"));
        let run = run_the_lm(&serve, session).await;
        assert_eq!(
            run.expect_ok(&format!("{session} ({profile})"))["outputs"]["answer"],
            42
        );
        calls.push(fake.models().len());
    }
    assert_eq!(
        calls,
        vec![1, 1, 2, 3, 4],
        "LM calls after each session: `b` answered from `cached`'s cache, `cached_too` \
         has a cache of its own, `uncached` none"
    );
    for (name, expected) in [("cached", true), ("cached_too", true), ("uncached", false)] {
        let dir = caches.path().join(name);
        let filled = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
        assert_eq!(
            filled,
            expected,
            "{}: cache on disk for profile {name}",
            dir.display()
        );
    }
    let stray: Vec<_> = std::fs::read_dir(caches.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| !["cached", "cached_too"].contains(&name.as_str()))
        .collect();
    assert!(stray.is_empty(), "other caches: {stray:?}");
}

// ---------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_stderr_goes_to_the_log_under_the_calls_request_id() {
    let serve = ServeCmd::new(1).start().await;
    let marker = format!("CRASH-LAST-WORDS-{}", std::process::id());
    let crashed = serve.plain("sec_die", json!({"marker": marker})).await;
    crashed.expect_error(502, "worker_crashed", "a worker that kills itself");
    assert!(!crashed.text.contains(&marker), "{}", crashed.text);
    let id = crashed.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(!id.is_empty(), "no X-Request-Id");
    assert_eq!(crashed.body["error"]["request_id"], id.as_str());
    let logged = || {
        let log = serve.stderr();
        let under_id = log
            .lines()
            .any(|line| line.contains(&id) && line.contains("worker_crashed"));
        log.contains(&marker) && under_id
    };
    let found = tokio::time::timeout(WAIT, async {
        while !logged() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "after {WAIT:?} the log holds no line of the worker's stderr ({marker}) and no \
         `worker_crashed` line with request id {id}:\n{}",
        serve.stderr()
    );
    serve.assert_serves("a crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not() {
    const LIMIT: usize = 4096;
    let serve = ServeCmd::new(1)
        .args(&["--body-limit", &LIMIT.to_string()])
        .start()
        .await;
    let body = |len: usize| {
        let empty = json!({"command": "ping", "args": {"blob": ""}}).to_string();
        json!({"command": "ping", "args": {"blob": "x".repeat(len - empty.len())}})
    };
    assert_eq!(body(LIMIT).to_string().len(), LIMIT);
    serve
        .post_call(body(LIMIT))
        .await
        .expect_ok("a body of exactly --body-limit bytes");
    serve.post_call(body(LIMIT + 1)).await.expect_error(
        413,
        "body_too_large",
        "one byte over --body-limit",
    );
    serve.assert_serves("the body limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_off_at_the_body_read_timeout() {
    let serve = ServeCmd::new(1)
        .args(&["--body-read-timeout", "1s", "--header-read-timeout", "30s"])
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(serve.addr()).await.unwrap();
    let body = br#"{"command": "ping"}"#;
    let head = format!(
        "POST /v1/call HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..5]).await.unwrap();
    let sent = Instant::now();
    // The rest of the body never comes: the server answers (or hangs up) by itself.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "a stalled body was still open 10 s later (--body-read-timeout 1s)"
    );
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(6),
        "cut off after {waited:?}, expected about 1 s"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "a stalled body got: {text}"
    );
    serve.assert_serves("a stalled body").await;
}

// ---------------------------------------------------------------------------------
// The pool never dies quietly
// ---------------------------------------------------------------------------------

const HANGING_MODULE: &str = r#"
import os, time
from snakepool_worker import command

@command("op_hang_on_replay", mutates_session=True)
def op_hang_on_replay(args, ctx):
    """Succeed on the worker that first runs it; hang a minute on any other (a replay)."""
    if args.get("first_pid", os.getpid()) != os.getpid():
        time.sleep(60)
    ctx.journal_as("op_hang_on_replay", {"first_pid": os.getpid()})
    ctx.session["armed"] = True
    return {"pid": os.getpid()}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_hangs_is_given_up_at_the_rebuild_deadline() {
    const REBUILD: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "op_hanging", HANGING_MODULE);
    let pool = builder(2)
        .python_path(dir.path())
        .module("op_hanging")
        .rebuild_limits(REBUILD, 3)
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let session = pool.session("stuck");
    session
        .call("set_value", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let pid = pid_of(&session.call("op_hang_on_replay", json!({})).await.unwrap());
    let other = pool.session("other");
    other
        .call("set_value", json!({"key": "k", "value": "fine"}))
        .await
        .unwrap();
    common::kill9(pid);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;

    // The call's own timeout is 20 s and the replay hangs 60 s: only the rebuild
    // deadline can end this.
    let started = Instant::now();
    let result = session.call("get_value", json!({"key": "k"})).await;
    let took = started.elapsed();
    match &result {
        Err(Error::SessionRebuildFailed {
            entry,
            entry_command,
            ..
        }) => {
            assert_eq!(*entry, Some(1), "{result:?}");
            assert_eq!(entry_command.as_deref(), Some("op_hang_on_replay"));
        }
        other => panic!("expected SessionRebuildFailed, got {other:?} after {took:?}"),
    }
    assert!(
        took >= REBUILD - Duration::from_millis(200) && took < REBUILD * 4,
        "given up after {took:?}; the rebuild deadline is {REBUILD:?}"
    );
    // Given up: the next call fails at once; the other session is served.
    let started = Instant::now();
    assert!(matches!(
        session.call("get_value", json!({"key": "k"})).await,
        Err(Error::SessionRebuildFailed { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        other.call("get_value", json!({"key": "k"})).await.unwrap(),
        "fine"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_memory_limit_does_not_serve_the_very_next_call() {
    // Every worker is over a 1-byte limit after its first call. No waiting between
    // calls: the check after each call must retire the worker before the next one
    // reaches it (the supervisor's periodic check would be too late).
    let pool = over_memory_after_one_call(1).await;
    let mut served = Vec::new();
    for _ in 0..20 {
        served.push(pid_of(&pool.call("whoami", json!({})).await.unwrap()));
    }
    assert_each_served_once(&served);
    pool.shutdown().await;
}

/// A pool of `workers` whose every worker is over its memory limit after one call.
async fn over_memory_after_one_call(workers: usize) -> Pool {
    builder(workers)
        .max_rss_bytes(1)
        .health_interval(None)
        .start()
        .await
        .unwrap()
}

/// Fails unless every pid in `served` is different: no worker served twice.
fn assert_each_served_once(served: &[u32]) {
    let mut distinct = served.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        served.len(),
        "a worker over its limit served again: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_memory_limit_serves_no_other_waiting_caller() {
    // Two workers, four callers always waiting: while one worker's memory is read
    // after its call, neither a waiting caller nor the other worker's release may
    // hand it another call.
    let pool = over_memory_after_one_call(2).await;
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut served = Vec::new();
                for _ in 0..30 {
                    served.push(pid_of(&pool.call("whoami", json!({})).await.unwrap()));
                }
                served
            })
        })
        .collect();
    let mut served = Vec::new();
    for caller in callers {
        served.extend(caller.await.unwrap());
    }
    assert_each_served_once(&served);
    pool.shutdown().await;
}
