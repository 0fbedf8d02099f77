//! The HTTP API through a real server on a random loopback port: every status, the
//! token, bad bodies, metrics, and a graceful shutdown of the `serve` command.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    ServeProcess, WAIT, any_busy, builder, serve_in_process, server_pids, spawn_serve,
    wait_for_event, wait_gone, wait_until, wait_until_async,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use snakepool::server::{ServerOptions, ServerState, router};
use snakepool::{Pool, PoolBuilder, PoolEvent};

struct Server {
    url: String,
    pool: Pool,
    client: reqwest::Client,
}

impl Server {
    async fn start(builder: PoolBuilder, token: Option<&str>, body_limit: usize) -> Server {
        let pool = builder.start().await.unwrap();
        let options = ServerOptions {
            token: token.map(str::to_owned),
            body_limit,
            ..ServerOptions::default()
        };
        Server {
            url: serve_in_process(&pool, &options).await,
            pool,
            client: reqwest::Client::new(),
        }
    }

    async fn call(&self, body: Value) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let response = self
            .client
            .post(format!("{}/v1/call", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        (status, response.json().await.unwrap(), headers)
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_kind_gets_its_status_and_the_pool_keeps_serving() {
    let server = Server::start(
        builder(1)
            .max_queue(0)
            .checkout_timeout(Duration::from_secs(20)),
        None,
        1 << 20,
    )
    .await;
    let ok = |v: &Value| v["result"]["status"] == "ok";

    let (status, body, _) = server.call(json!({"command": "ping"})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ok(&body), "{body}");

    let (status, body, _) = server.call(json!({"command": "nope"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["kind"], "unknown_command");

    let (status, body, _) = server
        .call(json!({"command": "fail", "args": {"message": "bad"}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["kind"], "worker_error");
    assert_eq!(body["error"]["python_type"], "ValueError");
    assert!(
        body["error"]["traceback"]
            .as_str()
            .unwrap()
            .contains("ValueError")
    );

    let (status, body, _) = server.call(json!({"command": "echo", "args": [1]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["kind"], "invalid_request");

    // max_queue is 0 here: wait for each replacement before the next call.
    let mut events = server.pool.subscribe();
    let replaced = |e: &PoolEvent| matches!(e, PoolEvent::WorkerReady { .. });
    let (status, body, _) = server.call(json!({"command": "crash"})).await;
    wait_for_event(&mut events, replaced).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["error"]["kind"], "worker_crashed");
    // stderr goes to the log, never to a client: it may hold other calls' output.
    assert!(body["error"].get("stderr_tail").is_none(), "{body}");
    assert!(!body.to_string().contains("about to crash"), "{body}");
    assert!(body["error"]["request_id"].is_string(), "{body}");

    let (status, body, _) = server
        .call(json!({"command": "sleep", "args": {"seconds": 30}, "timeout_ms": 200}))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body["error"]["kind"], "request_timeout");
    wait_for_event(&mut events, replaced).await;

    // Saturated: the only worker is held and no caller may wait.
    let dir = tempfile::tempdir().unwrap();
    let held = {
        let url = server.url.clone();
        let args = json!({"command": "rendezvous", "args": {"dir": dir.path(), "n": 2}});
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/call"))
                .json(&args)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    wait_until("the rendezvous call to hold the worker", WAIT, || {
        any_busy(&server.pool)
    })
    .await;
    let (status, body, headers) = server.call(json!({"command": "ping"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["kind"], "saturated");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    std::fs::write(dir.path().join("released"), b"").unwrap();
    assert_eq!(held.await.unwrap(), StatusCode::OK);

    // A session call says what it found: here a new session.
    let (status, _, headers) = server
        .call(json!({"command": "set_value", "session_id": "s1",
                     "args": {"key": "k", "value": 1}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-session-state"], "created");
    let (status, sessions) = server.get("/v1/sessions").await;
    assert_eq!(status, StatusCode::OK);
    let sessions: Value = serde_json::from_str(&sessions).unwrap();
    assert_eq!(sessions["sessions"][0]["id"], "s1");
    assert_eq!(sessions["sessions"][0]["journal_entries"], 1);
    let response = server
        .client
        .delete(format!("{}/v1/sessions/s1", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Its id is free at once: the next call opens a new, empty session, and says so.
    let (status, body, headers) = server
        .call(json!({"command": "get_value", "session_id": "s1", "args": {"key": "k"}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["python_type"], "KeyError");
    let (status, _, headers_after) = server
        .call(json!({"command": "set_value", "session_id": "s1",
                     "args": {"key": "k", "value": 2}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // (A failed first call still created it.)
    assert_eq!(headers.get("x-session-state"), None);
    assert_eq!(headers_after["x-session-state"], "resumed");
    let (status, info) = server.get("/v1/sessions/s1").await;
    assert_eq!(status, StatusCode::OK);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (info["id"].clone(), info["journal_entries"].clone()),
        (json!("s1"), json!(1))
    );
    let response = server
        .client
        .delete(format!("{}/v1/sessions/never-opened", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let (status, body, _) = server.call(json!({"command": "ping"})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ok(&body));
    server.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_bodies_are_refused_clearly() {
    let server = Server::start(builder(1), None, 4096).await;
    for (body, what) in [
        ("{not json", "syntax"),
        (r#"{"args": {}}"#, "missing command"),
        (r#"{"command": 7}"#, "command not a string"),
        (r#"{"command": "ping", "surprise": 1}"#, "unknown field"),
    ] {
        let response = server
            .client
            .post(format!("{}/v1/call", server.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["error"]["kind"], "bad_request", "{what}");
    }
    let response = server
        .client
        .post(format!("{}/v1/call", server.url))
        .json(&json!({"command": "echo", "args": {"blob": "x".repeat(10_000)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["error"]["kind"], "body_too_large");
    let (status, body, _) = server
        .call(json!({"command": "echo", "args": {"n": 1}}))
        .await;
    assert_eq!((status, &body["result"]["n"]), (StatusCode::OK, &json!(1)));
    server.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_everywhere_but_health() {
    let server = Server::start(builder(1), Some("s3cret"), 1 << 20).await;
    let (status, _) = server.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/v1/pool", "/v1/sessions", "/metrics"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(body.contains("unauthorized"), "{body}");
    }
    let (status, _, headers) = server.call(json!({"command": "ping"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
    let wrong = server
        .client
        .post(format!("{}/v1/call", server.url))
        .bearer_auth("guess")
        .json(&json!({"command": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = server
        .client
        .post(format!("{}/v1/call", server.url))
        .bearer_auth("s3cret")
        .json(&json!({"command": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    server.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_status_and_prometheus_metrics_describe_the_pool() {
    let server = Server::start(builder(2), None, 1 << 20).await;
    for _ in 0..5 {
        server.call(json!({"command": "ping"})).await;
    }
    server.call(json!({"command": "nope"})).await;
    let (status, pool) = server.get("/v1/pool").await;
    assert_eq!(status, StatusCode::OK);
    let pool: Value = serde_json::from_str(&pool).unwrap();
    assert_eq!(pool["workers"].as_array().unwrap().len(), 2);
    assert_eq!(pool["workers"][0]["state"], "idle");
    assert!(pool["workers"][0]["pid"].as_u64().unwrap() > 0);
    assert_eq!(pool["totals"]["calls"], 6);
    assert_eq!(pool["queued"], 0);

    let (status, text) = server.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let mut samples = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().expect("numeric sample");
        samples.insert(name.to_owned(), value);
    }
    assert_eq!(samples["snakepool_calls_total"], 6.0);
    assert_eq!(samples["snakepool_calls_ok_total"], 5.0);
    assert_eq!(
        samples[r#"snakepool_call_errors_total{kind="unknown_command"}"#],
        1.0
    );
    assert_eq!(samples["snakepool_workers"], 2.0);
    assert_eq!(samples["snakepool_call_duration_seconds_count"], 6.0);
    // By command: the manifest's commands have labels; a made-up name counts as other.
    assert_eq!(
        samples[r#"snakepool_command_calls_total{command="ping"}"#],
        5.0
    );
    assert_eq!(
        samples[r#"snakepool_command_errors_total{command="other"}"#],
        1.0
    );
    assert_eq!(
        samples[r#"snakepool_command_duration_seconds_count{command="ping"}"#],
        5.0
    );
    assert!(!text.contains("nope"), "{text}");
    assert!(text.ends_with("# EOF\n"));
    server.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_starting_until_the_pool_is_ready() {
    let state = ServerState::starting();
    let app = router(
        state.clone(),
        &ServerOptions {
            token: None,
            body_limit: 1024,
            ..ServerOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    let call = client
        .post(format!("{url}/v1/call"))
        .json(&json!({"command": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = call.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "starting");

    let pool = builder(1).start().await.unwrap();
    state.ready(pool.clone());
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    state.drain();
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_calls_in_flight_then_stops_every_worker() {
    let ServeProcess { mut child, url, .. } = spawn_serve(&[]);
    let client = reqwest::Client::new();
    let pids = server_pids(&client, &url).await;
    let slow = {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/call"))
                .json(&json!({"command": "sleep", "args": {"seconds": 0.5}}))
                .send()
                .await
                .unwrap()
        })
    };
    let (client_ref, url_ref) = (&client, &url);
    wait_until_async("the slow call to hold a worker", WAIT, || async move {
        let pool: Value = client_ref
            .get(format!("{url_ref}/v1/pool"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pool["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "busy")
    })
    .await;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let response = slow.await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the call in flight finished"
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "serve exited cleanly: {status}");
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "process {pid} left behind"
        );
    }
}

#[test]
fn serve_refuses_zero_runtime_threads_from_its_settings_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("snakepool.toml");
    std::fs::write(&config, "workers = 1\nruntime_threads = 0\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("SNAKEPOOL_RUNTIME_THREADS")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("runtime_threads must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_key_is_named_and_serve_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("snakepool.toml");
    std::fs::write(
        &config,
        "workers = 2\nrequest_timeout = \"5s\"\nwrokers = 3\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("wrokers"), "{stderr}");
    assert!(stderr.contains("snakepool.toml"), "{stderr}");
}
