//! Workers that break the protocol or misbehave as processes: each misbehaviour gives
//! its exact error (or none, where the caller was served all the same), the pool keeps
//! serving on a new worker, and no process is left behind.
//!
//! The workers run `fixtures/hostile_worker.py MODE`, which serves `echo` normally and
//! misbehaves on the command `misbehave`. Custom worker commands always start fresh,
//! whatever the spawn mode.

mod common;

use std::future::Future;
use std::time::Duration;

use common::{fixtures, pid_of, python, wait_for_event, wait_gone};
use serde_json::json;
use snakepool::{Error, Pool, PoolBuilder, PoolEvent};
use tokio::sync::broadcast;

/// Longer than any misbehaving call may take: reaching it means the call hung.
const HANG: Duration = Duration::from_secs(20);

/// How long a killed process may take to disappear.
const GONE: Duration = Duration::from_secs(10);

/// A one-worker pool running `hostile_worker.py` with `mode_args`.
fn hostile(mode_args: &str) -> PoolBuilder {
    let script = fixtures().join("hostile_worker.py");
    Pool::builder()
        .workers(1)
        .worker_cmd(format!("{} {} {mode_args}", python(), script.display()))
        .request_timeout(Duration::from_secs(60))
        .checkout_timeout(Duration::from_secs(20))
        .startup_timeout(Duration::from_secs(20))
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .stop_grace(Duration::from_millis(500))
}

/// Awaits `step`, failing the test if it takes longer than [`HANG`].
async fn promptly<T>(step: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, step)
        .await
        .expect("hung instead of finishing")
}

/// An `echo` through the pool: checks the reply and returns the pid that served it.
async fn served_by(pool: &Pool, n: u64) -> u32 {
    let reply = promptly(pool.call("echo", json!({"n": n})))
        .await
        .unwrap_or_else(|e| panic!("echo failed: {e:?}"));
    assert_eq!(reply["args"], json!({"n": n}), "{reply}");
    pid_of(&reply)
}

/// The pid of the pool's only worker, checked to be the one serving calls.
async fn only_worker(pool: &Pool) -> u32 {
    let status = pool.status();
    assert_eq!(status.workers.len(), 1, "{status:?}");
    let pid = status.workers[0].pid;
    assert_eq!(
        served_by(pool, 1).await,
        pid,
        "echo is served by the worker"
    );
    pid
}

/// Waits for the pool to report that the worker with `pid` was removed.
async fn lost(events: &mut broadcast::Receiver<PoolEvent>, pid: u32) {
    wait_for_event(
        events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;
}

/// Checks that the pool serves the next calls from a new worker, that it removed the
/// misbehaving worker `old` (no later than while serving them) and killed it; returns the
/// new worker's pid.
async fn replaced_and_serving(
    pool: &Pool,
    events: &mut broadcast::Receiver<PoolEvent>,
    old: u32,
) -> u32 {
    let new = served_by(pool, 2).await;
    assert_ne!(new, old, "a new worker serves after the misbehaviour");
    assert_eq!(served_by(pool, 3).await, new, "and keeps serving");
    lost(events, old).await;
    assert!(
        wait_gone(old, GONE),
        "the misbehaving worker {old} was killed"
    );
    assert_eq!(pool.metrics().worker_crashes, 1);
    new
}

/// Shuts the pool down and checks that none of `pids` outlived it.
async fn shutdown_leaves_nothing(pool: Pool, pids: &[u32]) {
    promptly(pool.shutdown()).await;
    for &pid in pids {
        assert!(wait_gone(pid, GONE), "process {pid} outlived the pool");
    }
}

/// A one-worker pool of `mode` workers, its events, its worker's pid (checked to
/// serve), and the result of the call that makes the worker misbehave.
async fn misbehave(
    mode: &str,
) -> (
    Pool,
    broadcast::Receiver<PoolEvent>,
    u32,
    Result<serde_json::Value, Error>,
) {
    let pool = hostile(mode).start().await.unwrap();
    let events = pool.subscribe();
    let old = only_worker(&pool).await;
    let result = promptly(pool.call("misbehave", json!({}))).await;
    (pool, events, old, result)
}

/// Every decimal number in `text`, in order.
fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_stdout_is_a_protocol_error() {
    let (pool, mut events, old, result) = misbehave("garbage").await;
    let err = result.unwrap_err();
    assert_eq!(err.kind(), "protocol", "{err:?}");
    match &err {
        Error::Protocol {
            command, detail, ..
        } => {
            assert_eq!(command, "misbehave");
            // The first four bytes of the text, read as a frame header, announce a frame
            // far beyond the limit: refused without waiting for (or allocating) a body.
            let announced = u32::from_be_bytes(*b"Trac");
            assert!(detail.contains("frame"), "{detail}");
            assert!(detail.contains(&announced.to_string()), "{detail}");
            assert!(detail.contains("exceeds"), "{detail}");
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    let new = replaced_and_serving(&pool, &mut events, old).await;
    assert_eq!(pool.metrics().errors.get("protocol"), Some(&1));
    shutdown_leaves_nothing(pool, &[old, new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_gib_frame_header_is_refused_at_once() {
    // The request timeout is 60 s: failing within `HANG` means the header alone was
    // enough, with no wait for a body that never comes.
    let (pool, mut events, old, result) = misbehave("huge_header").await;
    let err = result.unwrap_err();
    assert_eq!(err.kind(), "protocol", "{err:?}");
    match &err {
        Error::Protocol {
            command, detail, ..
        } => {
            assert_eq!(command, "misbehave");
            assert!(detail.contains("4294967295"), "{detail}");
            assert!(detail.contains("exceeds"), "{detail}");
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    let new = replaced_and_serving(&pool, &mut events, old).await;
    shutdown_leaves_nothing(pool, &[old, new]).await;
}

/// A worker in `mode` answers the call, then leaves output nobody asked for in its
/// pipe. The call succeeds, and the next caller is served by a new worker: the pool
/// drops the tainted one before sending it anything, so no call fails.
async fn idle_output_replaces_the_worker_without_failing_anyone(mode: &str) {
    let pool = hostile(mode).start().await.unwrap();
    let mut events = pool.subscribe();
    let old = only_worker(&pool).await;
    let reply = promptly(pool.call("misbehave", json!({"k": "v"})))
        .await
        .expect("the reply before the stray output answers the call");
    assert_eq!(reply, json!({"pid": old, "args": {"k": "v"}}));
    let new = replaced_and_serving(&pool, &mut events, old).await;
    let metrics = pool.metrics();
    assert!(metrics.errors.is_empty(), "no call failed: {metrics:?}");
    assert_eq!(metrics.calls_ok, metrics.calls);
    shutdown_leaves_nothing(pool, &[old, new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reply_to_one_request_replaces_the_idle_worker_without_failing_anyone() {
    idle_output_replaces_the_worker_without_failing_anyone("reply_twice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_byte_after_a_reply_replaces_the_idle_worker_without_failing_anyone() {
    // One byte: not even a whole frame header, but output nobody asked for all the
    // same. Sent to this worker, the next request's reply would be read behind it.
    idle_output_replaces_the_worker_without_failing_anyone("stray_newline").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_another_id_is_a_protocol_error() {
    let (pool, mut events, old, result) = misbehave("wrong_id").await;
    let err = result.unwrap_err();
    assert_eq!(err.kind(), "protocol", "{err:?}");
    match &err {
        Error::Protocol {
            command, detail, ..
        } => {
            assert_eq!(command, "misbehave");
            assert!(detail.contains("does not match"), "{detail}");
            // Both ids are named: the one received, and the one it should have been.
            match numbers(detail)[..] {
                [got, wanted] => assert_eq!(got, wanted + 1000, "{detail}"),
                _ => panic!("expected the two ids in {detail:?}"),
            }
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    let new = replaced_and_serving(&pool, &mut events, old).await;
    shutdown_leaves_nothing(pool, &[old, new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_replies_times_out_and_is_killed() {
    let pool = hostile("never_reply").start().await.unwrap();
    let mut events = pool.subscribe();
    let old = only_worker(&pool).await;
    let timeout = Duration::from_millis(300);
    let err = promptly(pool.call_with_timeout("misbehave", json!({}), timeout))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "request_timeout", "{err:?}");
    match &err {
        Error::RequestTimeout {
            command,
            timeout: t,
            ..
        } => {
            assert_eq!(command, "misbehave");
            assert_eq!(*t, timeout);
        }
        other => panic!("expected RequestTimeout, got {other:?}"),
    }
    let new = replaced_and_serving(&pool, &mut events, old).await;
    shutdown_leaves_nothing(pool, &[old, new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_closes_stdout_and_lives_on_is_a_crash() {
    let (pool, mut events, old, result) = misbehave("close_stdout").await;
    let err = result.unwrap_err();
    assert_eq!(err.kind(), "worker_crashed", "{err:?}");
    match &err {
        Error::WorkerCrashed {
            command,
            status,
            stderr_tail,
            ..
        } => {
            assert_eq!(command, "misbehave");
            assert!(status.contains("closed its output"), "{status}");
            assert!(
                stderr_tail.contains("closing stdout on purpose"),
                "{stderr_tail}"
            );
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    let new = replaced_and_serving(&pool, &mut events, old).await;
    shutdown_leaves_nothing(pool, &[old, new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_while_a_grandchild_holds_its_pipe_is_a_crash_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let pool = hostile(&format!("grandchild_holds_pipe {}", pid_file.display()))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let old = only_worker(&pool).await;
    // The grandchild keeps the pipe open for 600 s and the request timeout is 60 s:
    // only the worker's exit can end this call within `HANG`.
    let err = promptly(pool.call("misbehave", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "worker_crashed", "{err:?}");
    match &err {
        Error::WorkerCrashed {
            command, status, ..
        } => {
            assert_eq!(command, "misbehave");
            assert_eq!(status, "exit status 9");
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .expect("the worker wrote its grandchild's pid")
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_gone(grandchild, GONE),
        "the grandchild {grandchild} holding the pipe died with its worker"
    );
    let new = replaced_and_serving(&pool, &mut events, old).await;
    shutdown_leaves_nothing(pool, &[old, grandchild, new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_of_stderr_do_not_block_the_worker() {
    let pool = hostile("flood_stderr").start().await.unwrap();
    let pid = only_worker(&pool).await;
    let reply = promptly(pool.call("misbehave", json!({})))
        .await
        .unwrap_or_else(|e| panic!("a chatty worker is served: {e:?}"));
    assert_eq!(reply, json!({"flooded": 50 * 1024 * 1024}));
    assert_eq!(served_by(&pool, 2).await, pid, "the same worker serves on");
    let metrics = pool.metrics();
    assert_eq!(metrics.worker_crashes, 0);
    assert!(metrics.errors.is_empty(), "{metrics:?}");
    shutdown_leaves_nothing(pool, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_during_the_handshake_fails_the_start_with_its_stderr() {
    let err = promptly(hostile("exit_in_handshake").start())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "startup_failed", "{err:?}");
    match &err {
        Error::StartupFailed {
            reason,
            stderr_tail,
            ..
        } => {
            assert!(reason.contains("exit status 7"), "{reason}");
            assert!(
                stderr_tail.contains("dying during the handshake"),
                "{stderr_tail}"
            );
            // The worker names its pid in its last words: it must be gone.
            let line = stderr_tail
                .lines()
                .find(|l| l.contains("dying during the handshake"))
                .unwrap();
            let pid = numbers(line)[0] as u32;
            assert!(wait_gone(pid, GONE), "the failed worker {pid} is gone");
        }
        other => panic!("expected StartupFailed, got {other:?}"),
    }
}
