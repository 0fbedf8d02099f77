//! Reloading handler code under load: `POST /v1/pool/reload` and SIGHUP replace every
//! worker by one running the new code without failing a call; sessions keep their
//! state; new code that does not import leaves the old workers serving.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::spawn_serve;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Writes the reloadable module answering `version` with `version` (each version a
/// different length, so no stale bytecode is mistaken for it).
fn write_module(dir: &Path, version: &str, body_ok: bool) {
    let body = if body_ok {
        format!(
            "from snakepool_worker import command\n\n@command(\"version\")\ndef version(args, ctx):\n    return {version:?}\n# {}\n",
            "x".repeat(version.len() * 7)
        )
    } else {
        "this is not Python (\n".to_owned()
    };
    std::fs::write(dir.join("reloadable.py"), body).unwrap();
}

async fn call(client: &reqwest::Client, url: &str, body: Value) -> (StatusCode, Value) {
    let response = client
        .post(format!("{url}/v1/call"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn version(client: &reqwest::Client, url: &str) -> String {
    let (status, body) = call(client, url, json!({"command": "version"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["result"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_replace_the_code_without_failing_a_call() {
    let code = tempfile::tempdir().unwrap();
    write_module(code.path(), "v1", true);
    let mut server = spawn_serve(&[
        "--python-path",
        code.path().to_str().unwrap(),
        "--module",
        "reloadable",
    ]);
    let url = server.url.clone();
    let client = reqwest::Client::new();
    assert_eq!(version(&client, &url).await, "v1");
    let (status, body) = call(
        &client,
        &url,
        json!({"command": "set_value", "session_id": "kept", "args": {"key": "k", "value": 7}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Callers keep calling through every reload below; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|n| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut calls = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = if n % 2 == 0 {
                        json!({"command": "version"})
                    } else {
                        json!({"command": "get_value", "session_id": "kept", "args": {"key": "k"}})
                    };
                    let (status, answer) = call(&client, &url, body).await;
                    calls += 1;
                    if status != StatusCode::OK || (n % 2 == 1 && answer["result"] != 7) {
                        failures.push(format!("{status} {answer}"));
                    }
                }
                (calls, failures)
            })
        })
        .collect();

    // A reload by request: every worker replaced.
    write_module(code.path(), "v2", true);
    let response = client
        .post(format!("{url}/v1/pool/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["replaced"], 2, "{report}");
    assert_eq!(version(&client, &url).await, "v2");

    // New code that does not import: refused, the workers serve on.
    write_module(code.path(), "v3", false);
    let response = client
        .post(format!("{url}/v1/pool/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["kind"], "reload_failed", "{refused}");
    assert_eq!(version(&client, &url).await, "v2");

    // SIGHUP reloads too.
    write_module(code.path(), "v4444", true);
    // SAFETY: kill(2) on the server this test started.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while version(&client, &url).await != "v4444" {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the code");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every worker runs it once the reload is through.
    let reloaded = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(version(&client, &url).await);
        }
        if seen.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < reloaded,
            "old workers still serve: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let (calls, failures) = caller.await.unwrap();
        total += calls;
        assert!(
            failures.is_empty(),
            "calls failed during reloads: {failures:?}"
        );
    }
    assert!(total > 20, "the callers ran: {total} calls");
    let _ = server.child.kill();
    let _ = server.child.wait();
}
