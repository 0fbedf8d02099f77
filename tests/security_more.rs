//! More of a hostile client's attempts and of the limits, against real servers and
//! pools (beside `tests/security.rs` and `tests/pool_limits.rs`):
//!
//! - the CLI refuses internal commands and `args.session_id`; a command a worker's
//!   manifest flags `internal` (not one of the pool's built-in names) is refused by
//!   `Pool::call`, `Session::call` and HTTP, and never runs;
//! - a crashed worker's stderr goes to the server's log, under the call's request id;
//! - reserved input names are refused at `execute_program` by a real server;
//! - with client LM settings allowed, an endpoint named without a key variable never
//!   receives the operator's `OPENAI_API_KEY`; workers never see the server's tokens;
//! - LM response caches are per profile, on disk under the operator's directory;
//! - a session replay that hangs is given up at the rebuild deadline;
//! - a worker over its memory limit never serves the very next call, however many
//!   callers wait for it;
//! - a body of exactly `--body-limit` bytes is accepted; a stalled body is cut off at
//!   `--body-read-timeout`.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode as AxumStatus;
use axum::response::{IntoResponse, Response};
use common::{WAIT, builder, fixtures, pid_of, python, wait_for_event};
use reqwest::StatusCode;
use serde_json::{Value, json};
use snakepool::{Error, PoolEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------
// A real `snakepool serve`
// ---------------------------------------------------------------------------------

/// How to start one `snakepool serve` (one worker, the security handlers loaded).
#[derive(Default)]
struct ServeCmd {
    args: Vec<String>,
    env: Vec<(String, String)>,
    config: Option<String>,
}

impl ServeCmd {
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
            .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
            .args(["--python", &python()])
            .args(["--python-path", fixtures().to_str().unwrap()])
            .args(["--module", "security_handlers"])
            .env("SNAKEPOOL_JOURNAL", "memory");
        if let Some(toml) = &self.config {
            let path = dir.path().join("snakepool.toml");
            std::fs::write(&path, toml).unwrap();
            command.args(["--config", path.to_str().unwrap()]);
        }
        command.args(&self.args);
        // Only the spawn mode is inherited (scripts/test.sh runs the suite in each).
        for (key, _) in std::env::vars() {
            if (key.starts_with("SNAKEPOOL_") && key != "SNAKEPOOL_SPAWN")
                || key == "OPENAI_API_KEY"
            {
                command.env_remove(key);
            }
        }
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
                let Ok(line) = line else { return };
                let _ = lines_tx.send(line);
            }
        });
        let mut serve = Serve {
            child,
            url: String::new(),
            token,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stderr_path,
            _dir: dir,
        };
        let started = Instant::now();
        let next_line = |what: &str| -> String {
            let left = Duration::from_secs(40).saturating_sub(started.elapsed());
            lines.recv_timeout(left).unwrap_or_else(|error| {
                panic!(
                    "snakepool serve {:?}: no {what} line ({error}); stderr:\n{}",
                    self.args,
                    serve.stderr()
                )
            })
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

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    request_id: String,
    text: String,
    body: Value,
}

impl Reply {
    fn kind(&self) -> &str {
        self.body["error"]["kind"].as_str().unwrap_or("")
    }

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

    #[track_caller]
    fn expect_python(&self, python_type: &str, what: &str) {
        let found = self.body["error"]["python_type"].as_str().unwrap_or("");
        assert_eq!(
            (self.status.as_u16(), self.kind(), found),
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
    /// Holds the log and the settings file as long as the server runs.
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Its log so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    async fn post_call(&self, body: Value) -> Reply {
        let mut request = self.client.post(format!("{}/v1/call", self.url));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.json(&body).send().await.unwrap_or_else(|error| {
            panic!(
                "POST /v1/call {body}: no answer: {error:?}\nlog:\n{}",
                self.stderr()
            )
        });
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            request_id,
            text,
            body,
        }
    }

    async fn plain(&self, command: &str, args: Value) -> Reply {
        self.post_call(json!({"command": command, "args": args}))
            .await
    }

    async fn in_session(&self, session: &str, command: &str, args: Value) -> Reply {
        self.post_call(json!({"command": command, "args": args, "session_id": session}))
            .await
    }

    async fn assert_serves(&self, after: &str) {
        let reply = self.plain("ping", json!({})).await;
        assert_eq!(
            reply.expect_ok(&format!("ping after {after}"))["status"],
            "ok"
        );
    }
}

/// Writes a Python command module named `name` into `dir`.
fn write_module(dir: &Path, name: &str, source: &str) {
    std::fs::write(dir.join(format!("{name}.py")), source).unwrap();
}

// ---------------------------------------------------------------------------------
// A fake OpenAI-compatible model server on 127.0.0.1
// ---------------------------------------------------------------------------------

/// What the fake model server received: each request as text (request line, headers,
/// body) and the model it named.
#[derive(Clone, Default)]
struct FakeLm {
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl FakeLm {
    fn models(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(model, _)| model.clone())
            .collect()
    }

    #[track_caller]
    fn assert_never_saw(&self, secret: &str) {
        for (_, dump) in self.seen.lock().unwrap().iter() {
            assert!(
                !dump.contains(secret),
                "the model server received {secret:?}:\n{dump}"
            );
        }
    }
}

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
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("").to_owned();
    fake.seen.lock().unwrap().push((model, dump));
    if parts.uri.path() != "/v1/chat/completions" {
        return (AxumStatus::NOT_FOUND, "no such route").into_response();
    }
    let reply = common::chat_completion_reply(&request["model"]);
    (AxumStatus::OK, axum::Json(reply)).into_response()
}

/// Starts the fake model server; returns its `http://127.0.0.1:PORT/v1` and its log.
async fn start_fake_lm() -> (String, FakeLm) {
    let fake = FakeLm::default();
    let app = axum::Router::new()
        .fallback(fake_lm_handler)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), fake)
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
    let serve = ServeCmd::default().start().await;
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

@command("gap_host_only", internal=True)
def gap_host_only(args, ctx):
    """Only the host may send this; it leaves a mark if it ever runs."""
    Path(args["mark"]).touch()
    return "ran"

@command("gap_public")
def gap_public(args, ctx):
    return "public"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_manifest_flags_internal_is_refused_everywhere_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "gap_internal", INTERNAL_MODULE);
    let mark = dir.path().join("ran");
    let pool = builder(1)
        .python_path(dir.path())
        .module("gap_internal")
        .start()
        .await
        .unwrap();
    let args = json!({"mark": mark});
    let session = pool.session("alice");
    for (what, result) in [
        ("Pool::call", pool.call("gap_host_only", args.clone()).await),
        (
            "Session::call",
            session.call("gap_host_only", args.clone()).await,
        ),
    ] {
        assert!(
            matches!(&result, Err(Error::Forbidden { command }) if command == "gap_host_only"),
            "{what}: {result:?}"
        );
    }
    let url = common::serve_in_process(&pool, &snakepool::server::ServerOptions::default()).await;
    let client = reqwest::Client::new();
    for body in [
        json!({"command": "gap_host_only", "args": args}),
        json!({"command": "gap_host_only", "args": args, "session_id": "alice"}),
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
    assert!(names.contains(&"gap_public"), "{names:?}");
    assert!(!names.contains(&"gap_host_only"), "listed: {names:?}");
    assert!(!mark.exists(), "the internal command ran");
    assert_eq!(pool.call("gap_public", json!({})).await.unwrap(), "public");
    pool.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Secrets and the LM policy
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_input_names_are_refused_at_execute_program() {
    let serve = ServeCmd::default().start().await;
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
    let (api_base, fake) = start_fake_lm().await;
    let serve = ServeCmd::default()
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

@command("gap_env")
def gap_env(args, ctx):
    return {name: os.environ.get(name) for name in args["names"]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_never_see_the_servers_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "gap_env", ENV_MODULE);
    let serve = ServeCmd::default()
        .args(&["--python-path", dir.path().to_str().unwrap()])
        .args(&["--module", "gap_env"])
        .env("SNAKEPOOL_TOKEN", "tok-client-secret")
        .env("SNAKEPOOL_ADMIN_TOKEN", "tok-admin-secret")
        .env("GAP_VISIBLE", "visible")
        .start()
        .await;
    let seen = serve
        .plain(
            "gap_env",
            json!({"names": ["SNAKEPOOL_TOKEN", "SNAKEPOOL_ADMIN_TOKEN", "GAP_VISIBLE"]}),
        )
        .await;
    assert_eq!(
        seen.expect_ok("gap_env"),
        &json!({"SNAKEPOOL_TOKEN": null, "SNAKEPOOL_ADMIN_TOKEN": null,
                "GAP_VISIBLE": "visible"}),
        "the worker's environment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm_response_caches_are_per_profile_in_the_operators_directory() {
    let (api_base, fake) = start_fake_lm().await;
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
    let serve = ServeCmd::default()
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
    let serve = ServeCmd::default().start().await;
    let marker = format!("GAP-LAST-WORDS-{}", std::process::id());
    let crashed = serve.plain("sec_die", json!({"marker": marker})).await;
    crashed.expect_error(502, "worker_crashed", "a worker that kills itself");
    assert!(!crashed.text.contains(&marker), "{}", crashed.text);
    let id = crashed.request_id.clone();
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
    let serve = ServeCmd::default()
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
    let serve = ServeCmd::default()
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

@command("gap_hang_on_replay", mutates_session=True)
def gap_hang_on_replay(args, ctx):
    """Succeed on the worker that first runs it; hang a minute on any other (a replay)."""
    if args.get("first_pid", os.getpid()) != os.getpid():
        time.sleep(60)
    ctx.journal_as("gap_hang_on_replay", {"first_pid": os.getpid()})
    ctx.session["armed"] = True
    return {"pid": os.getpid()}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_hangs_is_given_up_at_the_rebuild_deadline() {
    const REBUILD: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "gap_hanging", HANGING_MODULE);
    let pool = builder(2)
        .python_path(dir.path())
        .module("gap_hanging")
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
    let pid = pid_of(&session.call("gap_hang_on_replay", json!({})).await.unwrap());
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
            assert_eq!(entry_command.as_deref(), Some("gap_hang_on_replay"));
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
    let pool = builder(1)
        .max_rss_bytes(1)
        .health_interval(None)
        .start()
        .await
        .unwrap();
    let mut served = Vec::new();
    for _ in 0..20 {
        served.push(pid_of(&pool.call("whoami", json!({})).await.unwrap()));
    }
    let mut distinct = served.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        served.len(),
        "a worker over its limit served again: {served:?}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_memory_limit_serves_no_other_waiting_caller() {
    // Two workers, four callers always waiting: while one worker's memory is read
    // after its call, neither a waiting caller nor the other worker's release may
    // hand it another call.
    let pool = builder(2)
        .max_rss_bytes(1)
        .health_interval(None)
        .start()
        .await
        .unwrap();
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
    let mut distinct = served.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        served.len(),
        "a worker over its limit served again"
    );
    pool.shutdown().await;
}
