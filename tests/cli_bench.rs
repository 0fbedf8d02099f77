//! `snakepool bench`: the built binary against a pool of its own and against a small
//! stand-in for the HTTP API.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// Runs `snakepool bench` with `args`, unaffected by settings in the environment.
async fn bench(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .arg("bench")
        .args(args)
        .env_remove("SNAKEPOOL_TOKEN")
        .env_remove("SNAKEPOOL_WORKERS")
        .env_remove("SNAKEPOOL_CONFIG")
        .output()
        .await
        .expect("snakepool runs")
}

/// Runs `snakepool bench --json` on a pool of the test interpreter; returns the report.
async fn bench_pool(args: &[&str]) -> Value {
    let python = common::python();
    let mut all = vec!["--json", "--python", &python];
    all.extend_from_slice(args);
    report(&bench(&all).await)
}

/// The JSON report of a successful run.
fn report(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        let stdout = String::from_utf8_lossy(&output.stdout);
        panic!("stdout is not one JSON object ({e}): {stdout}\nstderr: {stderr}")
    })
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {report}"))
}

#[tokio::test]
async fn plain_calls_are_counted_with_latency_percentiles() {
    let r = bench_pool(&[
        "--workers",
        "2",
        "--concurrency",
        "4",
        "--requests",
        "5000",
        "--command",
        "ping",
    ])
    .await;
    assert_eq!(count(&r, "requests"), 5000, "{r}");
    assert_eq!(count(&r, "ok"), 5000, "{r}");
    assert_eq!(r["errors"], json!({}), "{r}");
    assert!(r["throughput_rps"].as_f64().unwrap() > 0.0, "{r}");
    let latency = &r["latency_us"];
    let (p50, p99, max) = (
        latency["p50"].as_u64().unwrap(),
        latency["p99"].as_u64().unwrap(),
        latency["max"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{r}");
    assert_eq!(
        (r["target"].as_str(), count(&r, "workers")),
        (Some("pool"), 2)
    );
    assert_eq!(count(&r, "concurrency"), 4);
    assert_eq!(r["pool"]["worker_crashes"], 0, "{r}");
    // CPU per call, the host's and the workers' apart.
    let resources = &r["resources"];
    for field in ["host_cpu_us_per_call", "worker_cpu_us_per_call"] {
        assert!(
            resources[field].as_f64().is_some_and(|us| us > 0.0),
            "{field}: {r}"
        );
    }
}

#[tokio::test]
async fn call_errors_are_reported_by_kind_and_fail_the_run() {
    let python = common::python();
    let output = bench(&[
        "--json",
        "--python",
        &python,
        "--requests",
        "50",
        "--command",
        "no_such_command",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "failed calls fail the run");
    assert!(
        stderr.contains("50 calls failed (50 unknown_command)"),
        "{stderr}"
    );
    // The report is printed all the same.
    let r: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(r["errors"], json!({"unknown_command": 50}), "{r}");
    assert_eq!((count(&r, "requests"), count(&r, "ok")), (50, 0), "{r}");
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    assert_eq!(count(&r, "workers"), cpus as u64, "the pool's default: {r}");
}

#[tokio::test]
async fn calls_spread_over_sessions() {
    let fixtures = common::fixtures();
    let r = bench_pool(&[
        "--workers",
        "2",
        "--python-path",
        fixtures.to_str().unwrap(),
        "--module",
        "sp_test_handlers",
        "--sessions",
        "3",
        "--concurrency",
        "5",
        "--requests",
        "120",
        "--command",
        "append_value",
        "--args",
        r#"{"key": "k", "value": 1}"#,
    ])
    .await;
    assert_eq!((count(&r, "requests"), count(&r, "ok")), (120, 120), "{r}");
    assert_eq!(count(&r, "sessions"), 3);
}

#[tokio::test]
async fn a_duration_bounds_the_run() {
    let r = bench_pool(&["--workers", "1", "--duration", "200ms"]).await;
    assert!(count(&r, "requests") > 0, "{r}");
    assert_eq!(count(&r, "ok"), count(&r, "requests"), "{r}");
    assert!(r["elapsed_s"].as_f64().unwrap() >= 0.2, "{r}");
}

#[tokio::test]
async fn bad_flags_fail_before_any_call() {
    let output = bench(&["--args", "not json"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--args"), "{stderr}");
    assert!(output.stdout.is_empty());

    let output = bench(&["--requests", "5", "--duration", "1s"]).await;
    assert!(!output.status.success());
}

#[tokio::test]
async fn the_runtime_threads_are_tokios_default_unless_chosen() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as u64;
    let args = ["--workers", "1", "--requests", "20", "--command", "ping"];
    let r = bench_pool(&args).await;
    assert_eq!(count(&r, "runtime_threads"), cores, "{r}");
    let chosen: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--runtime-threads", "3"])
        .collect();
    let r = bench_pool(&chosen).await;
    assert_eq!(count(&r, "runtime_threads"), 3, "{r}");

    let output = bench(&["--runtime-threads", "0", "--requests", "1"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--runtime-threads"), "{stderr}");
}

/// What the stand-in server saw.
#[derive(Default)]
struct Seen {
    sessions: BTreeMap<String, u64>,
    timeouts_ms: BTreeMap<u64, u64>,
    closed: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

const TOKEN: &str = "s3cret";

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"))
}

fn unauthorized() -> (StatusCode, Json<Value>) {
    let body = json!({"error": {"kind": "unauthorized", "message": "token"}});
    (StatusCode::UNAUTHORIZED, Json(body))
}

/// `POST /v1/call`: `ping` answers, anything else is an unknown command.
async fn call(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return unauthorized();
    }
    {
        let mut seen = seen.lock().unwrap();
        let session = body["session_id"].as_str().unwrap_or("-").to_owned();
        *seen.sessions.entry(session).or_default() += 1;
        if let Some(ms) = body["timeout_ms"].as_u64() {
            *seen.timeouts_ms.entry(ms).or_default() += 1;
        }
    }
    if body["command"] == "ping" && body["args"].is_object() {
        return (StatusCode::OK, Json(json!({"result": {"status": "ok"}})));
    }
    let error = json!({"error": {"kind": "unknown_command", "message": "no such command"}});
    (StatusCode::NOT_FOUND, Json(error))
}

/// `DELETE /v1/sessions/{id}`.
async fn close(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return unauthorized();
    }
    seen.lock().unwrap().closed.push(id);
    (StatusCode::OK, Json(json!({"closed": true})))
}

/// Serves the stand-in API on a free loopback port; returns its URL.
async fn serve(seen: Shared) -> String {
    let app = Router::new()
        .route("/v1/call", post(call))
        .route("/v1/sessions/{id}", delete(close))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_server_is_loaded_over_http() {
    let seen = Shared::default();
    let url = serve(seen.clone()).await;
    let ok = report(
        &bench(&[
            "--url",
            &url,
            "--token",
            TOKEN,
            "--requests",
            "100",
            "--sessions",
            "2",
            "--concurrency",
            "4",
            "--timeout",
            "2s",
            "--json",
        ])
        .await,
    );
    assert_eq!(
        (count(&ok, "requests"), count(&ok, "ok")),
        (100, 100),
        "{ok}"
    );
    assert_eq!(ok["errors"], json!({}), "{ok}");
    assert_eq!(ok["target"], json!(url));
    assert_eq!(ok["workers"], Value::Null);
    {
        let seen = seen.lock().unwrap();
        let sessions: Vec<&str> = seen.sessions.keys().map(String::as_str).collect();
        assert_eq!(sessions, ["bench-0", "bench-1"], "only session calls");
        assert_eq!(seen.timeouts_ms.keys().collect::<Vec<_>>(), [&2000]);
        let mut closed = seen.closed.clone();
        closed.sort();
        assert_eq!(closed, ["bench-0", "bench-1"]);
    }

    let output = bench(&[
        "--url",
        &url,
        "--token",
        TOKEN,
        "--requests",
        "100",
        "--command",
        "nope",
        "--json",
    ])
    .await;
    assert!(!output.status.success(), "failed calls fail the run");
    let failing: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        failing["errors"],
        json!({"unknown_command": 100}),
        "{failing}"
    );
    assert_eq!(count(&failing, "ok"), 0);
}

#[tokio::test]
async fn a_server_that_refuses_the_token_is_a_setup_error() {
    let url = serve(Shared::default()).await;
    let output = bench(&["--url", &url, "--requests", "10", "--json"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--token"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_setup_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let output = bench(&["--url", &url, "--requests", "10", "--json"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(output.stdout.is_empty());
}

/// An OpenAI-compatible chat completion that answers "What is A plus B?" with A + B in
/// DSPy's ChatAdapter format, counting the completions.
async fn sum_completion(
    State(completions): State<Arc<AtomicU64>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    completions.fetch_add(1, Ordering::Relaxed);
    let prompt = body["messages"].to_string();
    let sum = prompt.split("What is ").skip(1).find_map(|rest| {
        let (a, rest) = rest.split_once(" plus ")?;
        let (b, _) = rest.split_once('?')?;
        Some(a.parse::<i64>().ok()? + b.parse::<i64>().ok()?)
    });
    let content = format!(
        "[[ ## answer ## ]]\n{}\n\n[[ ## completed ## ]]",
        sum.unwrap_or(-1)
    );
    Json(json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dspy_load_runs_programs_on_a_real_serve_against_a_fake_lm() {
    let completions = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/v1/chat/completions", post(sum_completion))
        .with_state(completions.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lm = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let profile = format!("fake:model=openai/fake,api_base={lm},api_key_env=SP_BENCH_LM_KEY");
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(["--python", &common::python(), "--lm-profile", &profile])
        .env("SP_BENCH_LM_KEY", "sk-bench")
        .env("SNAKEPOOL_JOURNAL", "memory")
        .env_remove("SNAKEPOOL_CONFIG")
        .env_remove("SNAKEPOOL_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(serve.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    let url = url.strip_prefix("listening on ").unwrap().to_owned();
    assert!(lines.next().unwrap().unwrap().starts_with("pool ready"));
    let pid = serve.id().to_string();

    let r = report(
        &bench(&[
            "--url",
            &url,
            "--dspy-profile",
            "fake",
            "--concurrency",
            "3",
            "--requests",
            "12",
            "--watch",
            &format!("server={pid}"),
            "--json",
        ])
        .await,
    );
    assert_eq!((count(&r, "requests"), count(&r, "ok")), (12, 12), "{r}");
    assert_eq!(count(&r, "sessions"), 3, "one session per caller: {r}");
    assert_eq!(r["command"], "execute_program");
    assert_eq!(r["dspy"]["answers_matching"], 12, "{r}");
    assert_eq!(
        completions.load(Ordering::Relaxed),
        15,
        "12 counted calls and one warm-up call per caller, each one completion"
    );
    let server = &r["resources"]["watched"]["server"];
    assert!(
        count(server, "processes") >= 3,
        "serve, zygote, workers: {r}"
    );
    assert!(count(server, "pss_kib") > 0, "{r}");
    assert!(server["cpu_s"].as_f64().unwrap() > 0.0, "{r}");
    // The server's pid comes from its /v1/pool: its CPU per call, and its workers'.
    for field in ["host_cpu_us_per_call", "worker_cpu_us_per_call"] {
        assert!(
            r["resources"][field].as_f64().is_some_and(|us| us > 0.0),
            "{field}: {r}"
        );
    }

    let output = bench(&["--url", &url, "--dspy-profile", "nope", "--requests", "5"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("configure_lm failed"), "{stderr}");
    assert!(output.stdout.is_empty());

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(serve.id() as libc::pid_t, libc::SIGTERM) };
    serve.wait().unwrap();
}
