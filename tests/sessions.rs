//! Sessions: strict affinity, ordering, journal replay after a worker dies, close, TTL.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{builder, kill9, pid_of, wait_for_event};
use serde_json::json;
use snakepool::{Error, PoolEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_holds_for_every_call_across_many_sessions() {
    let pool = builder(4).start().await.unwrap();
    let sessions = 24;
    let calls_each = 25;
    let tasks = (0..sessions).map(|i| {
        let session = pool.session(&format!("s{i}"));
        tokio::spawn(async move {
            let mut pids = Vec::with_capacity(calls_each);
            for _ in 0..calls_each {
                let reply = session.call("whoami", json!({})).await.unwrap();
                assert_eq!(reply["session_id"], session.id());
                pids.push(pid_of(&reply));
            }
            pids
        })
    });
    let mut per_worker: HashMap<u32, usize> = HashMap::new();
    for task in futures::future::join_all(tasks).await {
        let pids = task.unwrap();
        assert!(
            pids.iter().all(|p| *p == pids[0]),
            "a session's calls all ran on one worker: {pids:?}"
        );
        *per_worker.entry(pids[0]).or_default() += 1;
    }
    assert_eq!(per_worker.len(), 4, "sessions spread over all workers");
    assert!(
        per_worker.values().all(|n| *n == sessions / 4),
        "{per_worker:?}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_its_calls_in_order() {
    let pool = builder(2).start().await.unwrap();
    let session = pool.session("ordered");
    let calls = (0..50).map(|i| {
        let session = session.clone();
        async move {
            session
                .call("append_value", json!({"key": "log", "value": i}))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let last = results.last().unwrap().as_ref().unwrap();
    assert_eq!(*last, json!((0..50).collect::<Vec<_>>()));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_survives_its_worker_being_killed() {
    let pool = builder(2).start().await.unwrap();
    let mut events = pool.subscribe();
    let session = pool.session("survivor");
    session
        .call("set_value", json!({"key": "model", "value": "v1"}))
        .await
        .unwrap();
    session
        .call("append_value", json!({"key": "history", "value": 1}))
        .await
        .unwrap();
    session
        .call("append_value", json!({"key": "history", "value": 2}))
        .await
        .unwrap();
    let before = pid_of(&session.call("whoami", json!({})).await.unwrap());

    kill9(before);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid, .. } if *pid == before),
    )
    .await;

    assert_eq!(
        session
            .call("get_value", json!({"key": "model"}))
            .await
            .unwrap(),
        "v1"
    );
    assert_eq!(
        session
            .call("get_value", json!({"key": "history"}))
            .await
            .unwrap(),
        json!([1, 2]),
        "mutating calls were replayed once each, in order"
    );
    let after = pid_of(&session.call("whoami", json!({})).await.unwrap());
    assert_ne!(before, after);
    assert_eq!(pool.metrics().session_rebuilds, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_survives_a_crash_inside_its_own_call() {
    let pool = builder(1).start().await.unwrap();
    let session = pool.session("crashy");
    session
        .call("set_value", json!({"key": "k", "value": 42}))
        .await
        .unwrap();
    let err = session.call("crash", json!({})).await.unwrap_err();
    assert_eq!(err.kind(), "worker_crashed");
    assert_eq!(
        session
            .call("get_value", json!({"key": "k"}))
            .await
            .unwrap(),
        42
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_isolated_from_each_other() {
    let pool = builder(1).start().await.unwrap();
    let a = pool.session("a");
    let b = pool.session("b");
    a.call("set_value", json!({"key": "k", "value": "from a"}))
        .await
        .unwrap();
    match b.call("get_value", json!({"key": "k"})).await {
        Err(Error::WorkerError { kind, .. }) => assert_eq!(kind, "KeyError"),
        other => panic!("expected KeyError, got {other:?}"),
    }
    assert_eq!(
        a.call("get_value", json!({"key": "k"})).await.unwrap(),
        "from a"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_refuse_calls_and_free_worker_state() {
    let pool = builder(1).start().await.unwrap();
    let session = pool.session("short-lived");
    session
        .call("set_value", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let stats = pool.call("get_stats", json!({})).await.unwrap();
    assert_eq!(stats["sessions"], 1);
    session.close().await.unwrap();
    match session.call("get_value", json!({"key": "k"})).await {
        Err(Error::SessionClosed { session_id }) => assert_eq!(session_id, "short-lived"),
        other => panic!("expected SessionClosed, got {other:?}"),
    }
    let stats = pool.call("get_stats", json!({})).await.unwrap();
    assert_eq!(
        stats["sessions"], 0,
        "cleanup_session freed the worker's state"
    );

    // The same id opens a new, empty session.
    let again = pool.session("short-lived");
    let err = again
        .call("get_value", json!({"key": "k"}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "worker_error");
    assert!(pool.sessions().iter().any(|s| s.id == "short-lived"));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_after_their_ttl() {
    let pool = builder(1)
        .session_ttl(Some(Duration::from_millis(100)))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let session = pool.session("ephemeral");
    session
        .call("set_value", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::SessionExpired { session_id } if &**session_id == "ephemeral"),
    )
    .await;
    assert_eq!(
        session.call("whoami", json!({})).await.unwrap_err().kind(),
        "session_closed"
    );
    assert!(pool.sessions().is_empty());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycling_moves_sessions_with_their_state() {
    let pool = builder(1).recycle_after(4, 0.0).start().await.unwrap();
    let mut events = pool.subscribe();
    let session = pool.session("moving");
    session
        .call("set_value", json!({"key": "k", "value": "kept"}))
        .await
        .unwrap();
    let first = pid_of(&session.call("whoami", json!({})).await.unwrap());
    for _ in 0..3 {
        pool.call("echo", json!({})).await.unwrap();
    }
    wait_for_event(&mut events, |e| {
        matches!(e, PoolEvent::WorkerRecycled { .. })
    })
    .await;
    assert_eq!(
        session
            .call("get_value", json!({"key": "k"}))
            .await
            .unwrap(),
        "kept"
    );
    assert_ne!(
        pid_of(&session.call("whoami", json!({})).await.unwrap()),
        first
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_hint_replays_the_result_instead_of_the_call() {
    let pool = builder(2).start().await.unwrap();
    let mut events = pool.subscribe();
    let session = pool.session("hinted");
    let token = session
        .call("set_random", json!({"key": "t"}))
        .await
        .unwrap();
    let pid = pid_of(&session.call("whoami", json!({})).await.unwrap());
    kill9(pid);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;
    // Replaying `set_random` itself would store a new token.
    assert_eq!(
        session
            .call("get_value", json!({"key": "t"}))
            .await
            .unwrap(),
        token
    );
    pool.shutdown().await;
}
