//! Pipelining: quick sync calls wait in a worker's pipe, run in order, keep their own
//! timeouts from their start, and never run twice when the call ahead of them kills
//! the worker. Every wait has a deadline; gates are FIFOs the test opens.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{WAIT, builder, wait_until};
use serde_json::{Value, json};
use snakepool::{Error, Pool};

/// Calls of `line_up` that teach the pool it is quick.
async fn warm_up(pool: &Pool) {
    for _ in 0..20 {
        pool.call("line_up", json!({})).await.unwrap();
    }
}

fn make_fifo(path: &Path) {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Opens the gate a `line_up` call waits at (its FIFO) and closes it again.
async fn open_gate(path: &Path) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || drop(std::fs::OpenOptions::new().write(true).open(path)))
        .await
        .unwrap();
}

fn in_flight(pool: &Pool) -> usize {
    pool.status().workers.iter().map(|w| w.in_flight).sum()
}

/// How often each token is in the tokens file.
fn counted(path: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}

/// Starts `count` `line_up` calls (each with its own token) with `timeout`.
fn followers(
    pool: &Pool,
    path: &Path,
    count: usize,
    timeout: Duration,
) -> Vec<tokio::task::JoinHandle<Result<Value, Error>>> {
    (0..count)
        .map(|i| {
            let pool = pool.clone();
            let args = json!({"path": path, "token": format!("f{i}")});
            tokio::spawn(async move { pool.call_with_timeout("line_up", args, timeout).await })
        })
        .collect()
}

#[tokio::test]
async fn quick_calls_are_sent_ahead_and_each_caller_gets_its_own_reply() {
    let pool = builder(1).start().await.unwrap();
    warm_up(&pool).await;
    let callers: Vec<_> = (0..16)
        .map(|caller| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut most_in_flight = 0;
                for i in 0..300 {
                    let args = json!({"caller": caller, "i": i});
                    assert_eq!(pool.call("echo", args.clone()).await.unwrap(), args);
                    most_in_flight = most_in_flight.max(in_flight(&pool));
                }
                most_in_flight
            })
        })
        .collect();
    let mut most_in_flight = 0;
    for caller in callers {
        most_in_flight = most_in_flight.max(caller.await.unwrap());
    }
    assert!(
        most_in_flight > 1,
        "no call was ever sent ahead on the one worker"
    );
    assert!(
        most_in_flight <= 16,
        "past the pipeline depth: {most_in_flight}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn calls_behind_one_that_crashes_the_worker_run_elsewhere_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, path) = (dir.path().join("gate"), dir.path().join("tokens"));
    make_fifo(&gate);
    let pool = builder(1).start().await.unwrap();
    warm_up(&pool).await;
    let first_pid = pool.status().workers[0].pid;

    let crasher = {
        let pool = pool.clone();
        let args = json!({"gate": gate, "exit": true});
        tokio::spawn(async move { pool.call("line_up", args).await })
    };
    wait_until("the crashing call to reach the worker", WAIT, || {
        in_flight(&pool) == 1
    })
    .await;
    let behind = followers(&pool, &path, 8, Duration::from_secs(20));
    wait_until("8 calls to wait in line behind it", WAIT, || {
        in_flight(&pool) == 9 && pool.status().queued == 0
    })
    .await;
    open_gate(&gate).await;

    let crashed = crasher.await.unwrap();
    assert!(
        matches!(crashed, Err(Error::WorkerCrashed { .. })),
        "{crashed:?}"
    );
    for follower in behind {
        let result = follower
            .await
            .unwrap()
            .expect("a call behind the crash fails");
        assert_ne!(common::pid_of(&result), first_pid, "ran on the dead worker");
    }
    let counts = counted(&path);
    assert_eq!(counts.len(), 8, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "a call ran twice: {counts:?}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_pipelined_calls_timeout_counts_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, path) = (dir.path().join("gate"), dir.path().join("tokens"));
    make_fifo(&gate);
    let pool = builder(1).start().await.unwrap();
    warm_up(&pool).await;

    // The call ahead never gets through its gate and times out after 1.5 s; the calls
    // behind it have 0.7 s each, counted from their own start, so they do not time
    // out while they wait: they go to the next worker once the first is killed.
    let stuck = {
        let pool = pool.clone();
        let args = json!({"gate": gate});
        tokio::spawn(async move {
            pool.call_with_timeout("line_up", args, Duration::from_millis(1500))
                .await
        })
    };
    wait_until("the stuck call to reach the worker", WAIT, || {
        in_flight(&pool) == 1
    })
    .await;
    let behind = followers(&pool, &path, 4, Duration::from_millis(700));
    wait_until("4 calls to wait in line behind it", WAIT, || {
        in_flight(&pool) == 5
    })
    .await;

    let stuck = stuck.await.unwrap();
    assert!(
        matches!(stuck, Err(Error::RequestTimeout { killed: true, .. })),
        "{stuck:?}"
    );
    for follower in behind {
        follower
            .await
            .unwrap()
            .expect("a call timed out while waiting in line");
    }
    assert!(counted(&path).values().all(|&n| n == 1));
    pool.shutdown().await;
}

#[tokio::test]
async fn slow_commands_wait_in_the_pools_queue_not_in_a_workers_pipe() {
    let pool = builder(1).start().await.unwrap();
    let nap = json!({"seconds": 0.02});
    pool.call("sleep", nap.clone()).await.unwrap();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call("sleep", json!({"seconds": 0.3})).await })
        })
        .collect();
    wait_until(
        "one slow call on the worker and two in the queue",
        WAIT,
        || {
            let status = pool.status();
            in_flight(&pool) == 1 && status.queued == 2
        },
    )
    .await;
    for call in calls {
        call.await.unwrap().unwrap();
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_depth_of_one_sends_nothing_ahead() {
    let pool = builder(1).pipeline_depth(1).start().await.unwrap();
    warm_up(&pool).await;
    let callers: Vec<_> = (0..8)
        .map(|caller| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut most_in_flight = 0;
                for i in 0..100 {
                    pool.call("echo", json!({"caller": caller, "i": i}))
                        .await
                        .unwrap();
                    most_in_flight = most_in_flight.max(in_flight(&pool));
                }
                most_in_flight
            })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 1);
    }
    pool.shutdown().await;
}
