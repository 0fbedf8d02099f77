//! Many calls per worker: `async` commands overlap on one worker up to its
//! `max_concurrency`, sync commands have the worker to themselves, a session's calls
//! stay in order while different sessions overlap, a timed-out or abandoned async call
//! is cancelled (the worker serves on), and a worker whose event loop is blocked is
//! killed by the heartbeat.

mod common;

use std::time::Duration;

use common::{WAIT, builder, pid_of, wait_for_event, wait_until, wait_until_async};
use serde_json::json;
use snakepool::{Error, PoolBuilder, PoolEvent};

fn concurrent(n: usize) -> PoolBuilder {
    builder(n).module("async_handlers").max_concurrency(8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_overlap_on_one_worker() {
    let pool = concurrent(1).start().await.unwrap();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call("meet", json!({"group": "g", "n": 8})).await })
        })
        .collect();
    let mut pids = Vec::new();
    for call in calls {
        // Each call returns only once all eight are in flight on the worker together.
        let reply = call.await.unwrap().unwrap();
        assert_eq!(reply["together"], 8);
        pids.push(pid_of(&reply));
    }
    pids.dedup();
    assert_eq!(pids.len(), 1, "one worker served them all");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_command_waits_for_the_async_calls_and_runs_alone() {
    let pool = concurrent(1).start().await.unwrap();
    let napping = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("nap", json!({"seconds": 0.5})).await })
    };
    wait_until("the nap to run", WAIT, || {
        pool.status().workers[0].in_flight == 1
    })
    .await;
    let sync = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sync_pid", json!({})).await })
    };
    wait_until("the sync call to queue", WAIT, || pool.status().queued == 1).await;
    // While it waits for the worker to itself, no async call jumps ahead of it.
    let later = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("nap", json!({"seconds": 0})).await })
    };
    wait_until("the later call to queue", WAIT, || {
        pool.status().queued == 2
    })
    .await;
    napping.await.unwrap().unwrap();
    sync.await.unwrap().unwrap();
    later.await.unwrap().unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_overlap_on_one_worker_and_each_keeps_its_order() {
    let pool = concurrent(1).start().await.unwrap();
    let (alice, bob) = (pool.session("alice"), pool.session("bob"));
    // The two sessions' calls meet on the worker: they run at the same time.
    let a = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.call("meet", json!({"group": "s", "n": 2})).await })
    };
    let b = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.call("meet", json!({"group": "s", "n": 2})).await })
    };
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    // Within one session, a slow call made first still comes first.
    let first = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.call("note", json!({"value": 1, "delay": 0.3})).await })
    };
    wait_until("the first note to run", WAIT, || {
        pool.status().workers[0].in_flight == 1
    })
    .await;
    let second = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.call("note", json!({"value": 2})).await })
    };
    bob.call("note", json!({"value": "b"})).await.unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(alice.call("notes", json!({})).await.unwrap(), json!([1, 2]));
    assert_eq!(bob.call("notes", json!({})).await.unwrap(), json!(["b"]));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_async_call_is_cancelled_and_the_others_finish() {
    let pool = concurrent(1).start().await.unwrap();
    let pid = pool.status().workers[0].pid;
    let other = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("nap", json!({"seconds": 1})).await })
    };
    let err = pool
        .call_with_timeout(
            "nap",
            json!({"seconds": 30, "tag": "timed-out"}),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::RequestTimeout { killed: false, .. }),
        "{err:?}"
    );
    assert_eq!(pid_of(&other.await.unwrap().unwrap()), pid);
    let cancelled = pool.call("cancelled", json!({})).await.unwrap();
    assert_eq!(cancelled, json!(["timed-out"]));
    assert_eq!(
        pool.status().workers[0].pid,
        pid,
        "the worker was not killed"
    );
    assert_eq!(pool.metrics().worker_crashes, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_async_call_is_cancelled_on_the_worker() {
    let pool = concurrent(1).start().await.unwrap();
    let pid = pool.status().workers[0].pid;
    let dropped = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.call("nap", json!({"seconds": 30, "tag": "dropped"}))
                .await
        })
    };
    // Leased is not yet sent: wait until the worker runs it.
    wait_until_async("the nap to run on the worker", WAIT, || async {
        pool.call("napping", json!({})).await.unwrap() == json!(["dropped"])
    })
    .await;
    dropped.abort();
    wait_until("the nap to be cancelled", WAIT, || {
        pool.status().workers[0].in_flight == 0
    })
    .await;
    let cancelled = pool.call("cancelled", json!({})).await.unwrap();
    assert_eq!(cancelled, json!(["dropped"]));
    assert_eq!(pool.status().workers[0].pid, pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_event_loop_is_killed_by_the_heartbeat_and_its_calls_fail() {
    let pool = concurrent(1)
        .heartbeat(Duration::from_millis(100), Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let pid = pool.status().workers[0].pid;
    let napping = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("nap", json!({"seconds": 30})).await })
    };
    wait_until("the nap to run", WAIT, || {
        pool.status().workers[0].in_flight == 1
    })
    .await;
    let blocking = pool.call("block_loop", json!({"seconds": 30})).await;
    assert!(
        matches!(blocking, Err(Error::WorkerCrashed { .. })),
        "{blocking:?}"
    );
    let napped = napping.await.unwrap();
    assert!(
        matches!(napped, Err(Error::WorkerCrashed { .. })),
        "{napped:?}"
    );
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;
    let next = pool.call("sync_pid", json!({})).await.unwrap();
    assert_ne!(pid_of(&next), pid);
    pool.shutdown().await;
}
