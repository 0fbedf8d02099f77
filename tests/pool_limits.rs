//! Every limit a caller of the Rust API meets, at the limit and past it: the pool's
//! own commands and session ids, open sessions, callers' timeouts, the queue when
//! callers give up, memory per worker, and rebuilding a session that kills its
//! workers.

mod common;

use std::time::Duration;

use common::{WAIT, builder, pid_of, wait_for_event, wait_until};
use serde_json::json;
use snakepool::pool::MAX_SESSION_ID_BYTES;
use snakepool::{Error, PoolEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_owns_session_ids_and_its_own_commands() {
    let pool = builder(1).start().await.unwrap();
    let bob = pool.session("bob");
    bob.call("set_value", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    for (command, args) in [
        ("get_value", json!({"key": "k", "session_id": "bob"})),
        ("cleanup_session", json!({"session_id": "bob"})),
    ] {
        match pool.call(command, args).await {
            Err(Error::InvalidRequest { reason, .. }) => {
                assert!(reason.contains("args.session_id"), "{reason}")
            }
            other => panic!("expected InvalidRequest for {command}, got {other:?}"),
        }
    }
    let alice = pool.session("alice");
    match alice
        .call("get_value", json!({"key": "k", "session_id": "bob"}))
        .await
    {
        Err(Error::InvalidRequest { .. }) => {}
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    for command in ["shutdown", "cleanup_session"] {
        for result in [
            pool.call(command, json!({})).await,
            alice.call(command, json!({})).await,
        ] {
            assert!(
                matches!(&result, Err(Error::Forbidden { command: c }) if c == command),
                "{command}: {result:?}"
            );
        }
    }
    assert_eq!(bob.call("get_value", json!({"key": "k"})).await.unwrap(), 1);
    assert_eq!(pool.metrics().worker_crashes, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_have_a_length_limit_and_no_control_characters() {
    let pool = builder(1).start().await.unwrap();
    let longest = "x".repeat(MAX_SESSION_ID_BYTES);
    pool.session(&longest)
        .call("ping", json!({}))
        .await
        .unwrap();
    for bad in [
        "x".repeat(MAX_SESSION_ID_BYTES + 1),
        "a\nb".to_owned(),
        "bell\u{7}".to_owned(),
        String::new(),
    ] {
        match pool.session(&bad).call("ping", json!({})).await {
            Err(Error::InvalidRequest { .. }) => {}
            other => panic!("expected InvalidRequest for {bad:?}, got {other:?}"),
        }
        assert!(!pool.has_session(&bad));
    }
    pool.close_session(&longest).await.unwrap();
    assert!(!pool.has_session(&longest));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sessions_are_capped_and_closing_one_makes_room() {
    let pool = builder(1).max_sessions(3).start().await.unwrap();
    for id in ["a", "b", "c"] {
        pool.session(id).call("ping", json!({})).await.unwrap();
    }
    // Reopening an open session is not a new one.
    pool.session("a").call("ping", json!({})).await.unwrap();
    match pool.session("d").call("ping", json!({})).await {
        Err(Error::TooManySessions { limit: 3 }) => {}
        other => panic!("expected TooManySessions, got {other:?}"),
    }
    pool.close_session("b").await.unwrap();
    pool.session("d").call("ping", json!({})).await.unwrap();
    assert_eq!(pool.status().sessions, 3);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_timeout_is_clamped_to_the_pools_range() {
    let pool = builder(1)
        .client_timeout_range(Duration::from_millis(800), Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    assert_eq!(pool.client_timeout(None), pool.request_timeout());
    assert_eq!(
        pool.client_timeout(Some(Duration::from_millis(1))),
        Duration::from_millis(800)
    );
    assert_eq!(
        pool.client_timeout(Some(Duration::from_millis(800))),
        Duration::from_millis(800)
    );
    assert_eq!(
        pool.client_timeout(Some(Duration::from_millis(1500))),
        Duration::from_millis(1500)
    );
    assert_eq!(
        pool.client_timeout(Some(Duration::from_secs(1 << 40))),
        Duration::from_secs(2)
    );
    // A 1 ms request becomes 800 ms: a 300 ms call succeeds and no worker dies.
    let pid = pool.status().workers[0].pid;
    let timeout = pool.client_timeout(Some(Duration::from_millis(1)));
    pool.call_with_timeout("sleep", json!({"seconds": 0.3}), timeout)
        .await
        .unwrap();
    assert_eq!(pool.status().workers[0].pid, pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_who_give_up_in_the_queue_free_their_place() {
    let pool = builder(1).max_queue(1).start().await.unwrap();
    let busy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 1})).await })
    };
    wait_until("the worker to be busy", WAIT, || {
        pool.status().workers.iter().any(|w| w.state == "busy")
    })
    .await;
    for _ in 0..5 {
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call("whoami", json!({})).await })
        };
        wait_until("the caller to queue", WAIT, || pool.status().queued == 1).await;
        queued.abort();
        wait_until("the queue to empty", WAIT, || pool.status().queued == 0).await;
    }
    // The queue holds one again, and the abandoned callers never reached a worker.
    let next = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("whoami", json!({})).await })
    };
    wait_until("the caller to queue", WAIT, || pool.status().queued == 1).await;
    assert!(matches!(
        pool.call("whoami", json!({})).await,
        Err(Error::Saturated { queued: 1 })
    ));
    busy.await.unwrap().unwrap();
    next.await.unwrap().unwrap();
    assert_eq!(pool.status().workers[0].calls_served, 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_memory_limit_never_serves_again() {
    let probe = builder(1).start().await.unwrap();
    let rss = probe.status().workers[0].pid;
    let base = std::fs::read_to_string(format!("/proc/{rss}/statm"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4096;
    probe.shutdown().await;
    // Room for 40 MiB more than a fresh worker, checked after every call.
    let pool = builder(1)
        .max_rss_bytes(base + 40 * 1024 * 1024)
        .health_interval(None)
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let first = pid_of(&pool.call("hold_memory", json!({"mb": 10})).await.unwrap());
    // Below the limit: the same worker serves on.
    assert_eq!(
        pid_of(&pool.call("whoami", json!({})).await.unwrap()),
        first
    );
    // This call crosses the limit: the worker is retired before it serves again.
    let crossing = pool.call("hold_memory", json!({"mb": 60})).await.unwrap();
    assert_eq!(pid_of(&crossing), first);
    wait_for_event(&mut events, |e| {
        matches!(e, PoolEvent::WorkerRecycled { .. })
    })
    .await;
    let next = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    assert_ne!(next, first, "the worker over its limit served another call");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_kills_its_workers_is_given_up_after_the_attempts() {
    let pool = builder(3)
        .rebuild_limits(Duration::from_secs(20), 2)
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let session = pool.session("doomed");
    session
        .call("set_value", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let pid = pid_of(&session.call("crash_on_replay", json!({})).await.unwrap());
    common::kill9(pid);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;
    let lost_before = pool.metrics().worker_crashes;
    match session.call("get_value", json!({"key": "k"})).await {
        Err(Error::SessionRebuildFailed {
            entry,
            entry_command,
            ..
        }) => {
            assert_eq!(entry, Some(1));
            assert_eq!(entry_command.as_deref(), Some("crash_on_replay"));
        }
        other => panic!("expected SessionRebuildFailed, got {other:?}"),
    }
    // Two attempts, two workers: no more.
    assert_eq!(pool.metrics().worker_crashes - lost_before, 2);
    // The session is given up: later calls fail at once, killing nothing.
    let started = std::time::Instant::now();
    assert!(matches!(
        session.call("get_value", json!({"key": "k"})).await,
        Err(Error::SessionRebuildFailed { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(pool.metrics().worker_crashes - lost_before, 2);
    // Everyone else is served; closing the session frees its id.
    pool.call("whoami", json!({})).await.unwrap();
    pool.session("other").call("ping", json!({})).await.unwrap();
    session.close().await.unwrap();
    pool.session("doomed")
        .call("ping", json!({}))
        .await
        .unwrap();
    pool.shutdown().await;
}
