//! The `snakepool` binary: `call` output and exit codes, configuration precedence, and
//! `doctor`.

mod common;

use std::process::{Command, Output};

use common::{fixtures, python};
use serde_json::Value;

fn snakepool(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_snakepool"));
    command
        .args(args)
        .env_remove("SNAKEPOOL_REQUEST_TIMEOUT")
        .env_remove("SNAKEPOOL_CONFIG")
        .env_remove("SNAKEPOOL_URL");
    command
}

/// `snakepool call` with the test handlers on a pool of its own.
fn call(args: &[&str]) -> Command {
    let mut command = snakepool(&["call", "--python", &python()]);
    command
        .args(["--python-path", fixtures().to_str().unwrap()])
        .args(["--module", "sp_test_handlers", "--spawn", "fresh"])
        .args(args);
    command
}

fn run(mut command: Command) -> (i32, Value, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        status.code().unwrap_or(-1),
        value,
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn call_prints_the_result_as_json() {
    let (code, value, _) = run(call(&["echo", r#"{"a": [1, 2]}"#]));
    assert_eq!(code, 0);
    assert_eq!(value, serde_json::json!({"a": [1, 2]}));
    let (code, value, _) = run(call(&["--session", "s", "whoami"]));
    assert_eq!(code, 0);
    assert_eq!(value["session_id"], "s");
}

/// Every line of stdout, as JSON.
fn lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn call_stream_prints_each_chunk_then_the_result() {
    let streamed = [
        "--module",
        "async_handlers",
        "--stream",
        "count_sync",
        r#"{"n": 3}"#,
    ];
    let output = call(&streamed).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(lines(&output), [0, 1, 2, 3].map(|n| serde_json::json!(n)));

    // Through a server: Server-Sent Events, and an error mid-stream keeps its kind.
    let mut server = common::spawn_serve(&["--module", "async_handlers"]);
    let through = |args: &[&str]| {
        let mut command = snakepool(&["call", "--url", &server.url, "--stream"]);
        command.args(args).output().unwrap()
    };
    let output = through(&["count_sync", r#"{"n": 2}"#]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(lines(&output), [0, 1, 1].map(|n| serde_json::json!(n)));
    let output = through(&["count", r#"{"n": 3, "fail_at": 1}"#]);
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    assert_eq!(lines(&output), [serde_json::json!({"n": 0})]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("failed at chunk 1"));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[test]
fn call_exit_codes_tell_the_error_kinds_apart() {
    let cases: [(&[&str], i32, &str); 5] = [
        (&["no_such_command"], 3, "unknown_command"),
        (&["fail", r#"{"message": "nope"}"#], 4, "ValueError"),
        (&["echo", "{not json"], 2, "ARGS_JSON"),
        (&["crash"], 6, "worker_crashed"),
        (
            &["--timeout", "200ms", "sleep", r#"{"seconds": 30}"#],
            5,
            "request_timeout",
        ),
    ];
    for (args, expected, mention) in cases {
        let (code, value, stderr) = run(call(args));
        assert_eq!(code, expected, "{args:?}: {stderr}");
        assert_eq!(value, Value::Null, "nothing on stdout for {args:?}");
        assert!(stderr.contains(mention), "{args:?}: {stderr}");
    }
}

#[test]
fn call_without_a_reachable_server_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = run(snakepool(&["call", "--url", &url, "ping"]));
    assert_eq!(code, 10, "{stderr}");
    assert!(stderr.contains("connect"), "{stderr}");
}

#[test]
fn call_runs_any_protocol_v1_script() {
    let script = fixtures().join("rogue_worker.py");
    let worker_cmd = format!("{} {} string_errors", python(), script.display());
    let (code, value, _) = run(snakepool(&[
        "call",
        "--worker-cmd",
        &worker_cmd,
        "echo",
        r#"{"x": 1}"#,
    ]));
    assert_eq!(code, 0);
    assert_eq!(value["x"], 1);
}

#[test]
fn flags_beat_environment_beat_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("snakepool.toml");
    std::fs::write(&config, "request_timeout = \"150ms\"\n").unwrap();
    let config = config.to_str().unwrap();
    let slow = ["sleep", r#"{"seconds": 0.6}"#];

    // The file alone: 150 ms is too short.
    let mut command = call(&["--config", config]);
    command.args(slow);
    assert_eq!(run(command).0, 5);

    // The environment over the file: 20 s is enough.
    let mut command = call(&["--config", config]);
    command.args(slow).env("SNAKEPOOL_REQUEST_TIMEOUT", "20s");
    assert_eq!(run(command).0, 0);

    // A flag over the environment: too short again.
    let mut command = call(&["--config", config, "--request-timeout", "150ms"]);
    command.args(slow).env("SNAKEPOOL_REQUEST_TIMEOUT", "20s");
    assert_eq!(run(command).0, 5);
}

#[test]
fn a_bad_config_key_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "spawn = \"zygote\"\nmax_qeue = 4\n").unwrap();
    let (code, _, stderr) = run(call(&["--config", config.to_str().unwrap(), "ping"]));
    assert_eq!(code, 9, "{stderr}");
    assert!(stderr.contains("max_qeue"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[test]
fn doctor_reports_each_check() {
    let (code, _, _) = run(snakepool(&["doctor", "--python", &python()]));
    let output = snakepool(&["doctor", "--python", &python()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(code, 0, "{text}");
    for expected in ["Python 3.", "snakepool_worker", "DSPy", "zygote"] {
        assert!(text.contains(expected), "{expected} missing in:\n{text}");
    }
    let output = snakepool(&["doctor", "--python", "/nonexistent/python3"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("fix:"), "{text}");
}
