//! Sessions survive the server: `serve` keeps its session journals in SQLite in its
//! data directory, so after it is killed with SIGKILL and started again on the same
//! directory every session answers its next call with its state (rebuilt from its
//! journal on a worker), and a second server cannot open a directory in use.

mod common;

use std::io::Read;

use common::{ServeProcess, spawn_serve};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SESSIONS: usize = 24;

fn durable(dir: &std::path::Path) -> ServeProcess {
    spawn_serve(&[
        "--journal",
        "sqlite",
        "--data-dir",
        dir.to_str().unwrap(),
        "--module",
        "snakepool_worker.dspy",
    ])
}

async fn call(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    command: &str,
    args: Value,
) -> Value {
    let response = client
        .post(format!("{url}/v1/call"))
        .json(&json!({"command": command, "session_id": session, "args": args}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{session} {command}: {body}");
    body["result"].clone()
}

/// Waits for `child` to exit; kills it and fails the test if it is still running
/// after `limit`.
fn wait_exit(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a second server on the same data directory still runs after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn answer(n: usize) -> String {
    format!("answer number {n}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_answer_with_their_state_after_the_server_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut first = durable(dir.path());
    for n in 0..SESSIONS {
        let session = format!("user-{n}");
        let script = json!({"provider": "dummy", "answers": vec![json!({"answer": answer(n)}); 4]});
        call(&client, &first.url, &session, "configure_lm", script).await;
        let created = call(
            &client,
            &first.url,
            &session,
            "create_program",
            json!({"signature": "question -> answer"}),
        )
        .await;
        assert_eq!(created["program_id"], "prog_1");
        call(
            &client,
            &first.url,
            &session,
            "set_value",
            json!({"key": "n", "value": n}),
        )
        .await;
    }

    // A second server may not share the directory.
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
        .args(["--python", &common::python()])
        .args([
            "--journal",
            "sqlite",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .env_remove("SNAKEPOOL_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut second, common::WAIT);
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("in use"), "{stderr}");

    // No goodbye: the process is killed.
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let mut again = durable(dir.path());
    // Nothing is loaded ahead of its call: the sessions are in the store only.
    let get = |path: String| {
        let client = client.clone();
        async move {
            let response = client.get(path).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, listed) = get(format!("{}/v1/sessions", again.url)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["sessions"], json!([]), "{listed}");
    let (status, info) = get(format!("{}/v1/sessions/user-0", again.url)).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(
        (&info["evicted"], &info["worker"]),
        (&json!(true), &Value::Null)
    );
    assert!(info["journal_entries"].as_u64().unwrap() > 0, "{info}");
    // One closed while only the store holds it is gone for good.
    let last = format!("user-{}", SESSIONS - 1);
    let closed = client
        .delete(format!("{}/v1/sessions/{last}", again.url))
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), StatusCode::OK);
    let (status, _) = get(format!("{}/v1/sessions/{last}", again.url)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let fresh = client
        .post(format!("{}/v1/call", again.url))
        .json(&json!({"command": "list_programs", "session_id": last, "args": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.headers()["x-session-state"], "created");
    let fresh: Value = fresh.json().await.unwrap();
    assert_eq!(fresh["result"]["programs"], json!([]), "{fresh}");

    for n in 0..SESSIONS - 1 {
        let session = format!("user-{n}");
        let value = call(
            &client,
            &again.url,
            &session,
            "get_value",
            json!({"key": "n"}),
        )
        .await;
        assert_eq!(value, json!(n), "{session}");
        let run = call(
            &client,
            &again.url,
            &session,
            "execute_program",
            json!({"program_id": "prog_1", "inputs": {"question": "who are you?"}}),
        )
        .await;
        assert_eq!(run["outputs"]["answer"], json!(answer(n)), "{session}");
    }
    let sessions: Value = client
        .get(format!("{}/v1/sessions?limit=1000", again.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), SESSIONS);
    let (_, info) = get(format!("{}/v1/sessions/user-0", again.url)).await;
    assert_eq!(info["evicted"], json!(false), "{info}");
    again.child.kill().unwrap();
    again.child.wait().unwrap();
}
