//! The pool serving real Python workers: handshake, concurrency, errors that leave
//! the worker serving, stdout and stderr hygiene.

mod common;

use std::time::Duration;

use common::{WAIT, any_busy, builder, pid_of, wait_until};
use serde_json::json;
use snakepool::Error;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_carries_the_manifest() {
    let pool = builder(2).start().await.unwrap();
    let pong = pool.call("ping", json!({"manifest": true})).await.unwrap();
    let manifest = &pong["manifest"];
    assert_eq!(manifest["runtime"], "snakepool_worker");
    assert_eq!(manifest["protocol_version"], 1);
    assert_eq!(manifest["pid"], pong["pid"]);
    assert_eq!(manifest["commands"]["set_value"]["mutates_session"], true);
    assert_eq!(manifest["commands"]["get_value"]["mutates_session"], false);
    assert!(manifest["commands"]["cleanup_session"].is_object());

    let status = pool.status();
    assert_eq!(status.workers.len(), 2);
    let pids: Vec<u32> = status.workers.iter().map(|w| w.pid).collect();
    assert!(pids.contains(&(pong["pid"].as_u64().unwrap() as u32)));
    assert_eq!(pool.metrics().worker_starts, 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_workers_serve_n_calls_at_once() {
    // Each call waits in its worker until all four have arrived: if the pool ran them
    // one after another, the first would never see the others and fail.
    let n = 4;
    let pool = builder(n).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = json!({"dir": dir.path(), "n": n, "limit_s": 20});
    let calls = (0..n).map(|_| pool.call("rendezvous", args.clone()));
    let results = futures::future::join_all(calls).await;
    let mut pids: Vec<u32> = results.into_iter().map(|r| pid_of(&r.unwrap())).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), n, "every call ran on its own worker");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_exception_is_a_worker_error_and_the_worker_keeps_serving() {
    let pool = builder(1).start().await.unwrap();
    let before = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    match pool.call("fail", json!({"message": "no such thing"})).await {
        Err(Error::WorkerError {
            kind,
            message,
            traceback,
            command,
            ..
        }) => {
            assert_eq!(kind, "ValueError");
            assert_eq!(message, "no such thing");
            assert_eq!(command, "fail");
            assert!(traceback.unwrap().contains("raise ValueError"));
        }
        other => panic!("expected WorkerError, got {other:?}"),
    }
    let after = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    assert_eq!(before, after, "the same worker still serves");
    assert_eq!(pool.metrics().errors.get("worker_error"), Some(&1));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_is_reported_and_the_pool_serves() {
    let pool = builder(1).start().await.unwrap();
    match pool.call("no_such_command", json!({})).await {
        Err(Error::UnknownCommand {
            command, message, ..
        }) => {
            assert_eq!(command, "no_such_command");
            assert!(message.contains("echo"), "lists known commands: {message}");
        }
        other => panic!("expected UnknownCommand, got {other:?}"),
    }
    assert_eq!(
        pool.call("echo", json!({"a": 1})).await.unwrap(),
        json!({"a": 1})
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_must_be_an_object() {
    let pool = builder(1).start().await.unwrap();
    let err = pool.call("echo", json!([1, 2])).await.unwrap_err();
    assert_eq!(err.kind(), "invalid_request");
    assert_eq!(pool.call("echo", json!({})).await.unwrap(), json!({}));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_larger_than_the_frame_limit_is_refused_before_sending() {
    // Room for the handshake's manifest, not for the blob.
    let pool = builder(1).max_frame_bytes(32_768).start().await.unwrap();
    let pid = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    let err = pool
        .call("echo", json!({"blob": "x".repeat(80_000)}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRequest { reason, .. } if reason.contains("32768")),
        "{err:?}"
    );
    assert_eq!(pid_of(&pool.call("whoami", json!({})).await.unwrap()), pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_in_a_handler_does_not_corrupt_frames() {
    let pool = builder(1).start().await.unwrap();
    for _ in 0..5 {
        let reply = pool.call("noisy", json!({"lines": 500})).await.unwrap();
        assert_eq!(reply, json!("still fine"));
    }
    assert_eq!(
        pool.call("echo", json!({"ok": true})).await.unwrap()["ok"],
        true
    );
    assert_eq!(pool.metrics().worker_crashes, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_of_stderr_does_not_deadlock() {
    let pool = builder(1).start().await.unwrap();
    for _ in 0..3 {
        let written = pool
            .call("flood_stderr", json!({"bytes": 1 << 20}))
            .await
            .unwrap();
        assert!(written.as_u64().unwrap() >= 1 << 20);
    }
    assert_eq!(pool.call("echo", json!({"n": 1})).await.unwrap()["n"], 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_style_string_errors_are_understood() {
    let pool = common::rogue(1, "string_errors").start().await.unwrap();
    assert_eq!(
        pool.call("echo", json!({"x": 1})).await.unwrap(),
        json!({"x": 1})
    );
    match pool.call("frobnicate", json!({})).await {
        Err(Error::WorkerError {
            kind,
            message,
            traceback,
            ..
        }) => {
            assert_eq!(kind, "Error");
            assert_eq!(message, "unknown command frobnicate");
            assert_eq!(traceback, None);
        }
        other => panic!("expected WorkerError, got {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_calls_in_flight_and_stops_every_worker() {
    let pool = builder(2).start().await.unwrap();
    let pids: Vec<u32> = pool.status().workers.iter().map(|w| w.pid).collect();
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 0.3})).await })
    };
    wait_until("the slow call to hold a worker", WAIT, || any_busy(&pool)).await;
    pool.shutdown().await;
    assert!(slow.await.unwrap().is_ok(), "the call in flight finished");
    assert!(matches!(
        pool.call("echo", json!({})).await,
        Err(Error::ShuttingDown)
    ));
    for pid in pids {
        assert!(
            common::wait_gone(pid, Duration::from_secs(10)),
            "worker {pid} still running"
        );
    }
}
