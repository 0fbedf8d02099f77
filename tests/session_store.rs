//! On a durable journal the pool's session table is a cache of the store: a session
//! evicted from its worker leaves the pool's memory too (unless a handle on it is
//! held), and the next call under its id takes its journal over and rebuilds it;
//! closing it removes it from the store; sessions unused for the TTL leave the store;
//! the store holds at most `max_stored_sessions`.

mod common;

use std::time::Duration;

use common::{builder, wait_for_event, wait_until};
use serde_json::json;
use snakepool::{CallOptions, Error, JournalLimits, Pool, PoolBuilder, PoolEvent, SessionState};

fn durable(dir: &std::path::Path) -> PoolBuilder {
    builder(1)
        .module("snapshot_handlers")
        .journal_limits(JournalLimits {
            compact_entries: 10,
            ..JournalLimits::default()
        })
        .durable_journal(dir, snakepool::SyncPolicy::Normal)
}

/// Calls `command` in session `id` through a handle of its own, as a server does
/// for each request.
async fn call_in(
    pool: &Pool,
    id: &str,
    command: &str,
    args: serde_json::Value,
) -> (serde_json::Value, SessionState) {
    let reply = pool
        .session(id)
        .call_reporting(command, args, CallOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{command} in {id}: {e}"));
    (reply.result, reply.state)
}

fn gauge(pool: &Pool, name: &str) -> u64 {
    let text = pool.prometheus_text();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_sessions_leave_memory_and_come_back_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let pool = durable(dir.path())
        .session_idle(Some(Duration::from_millis(200)))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let ids: Vec<String> = (0..12).map(|n| format!("user-{n}")).collect();
    for id in &ids {
        for n in 0..3 {
            call_in(&pool, id, "note", json!({"text": n})).await;
        }
    }
    // A handle held keeps its session in memory, evicted from its worker or not.
    let held = pool.session("held");
    held.call("note", json!({"text": "kept"})).await.unwrap();
    for _ in 0..=ids.len() {
        wait_for_event(&mut events, |e| {
            matches!(e, PoolEvent::SessionEvicted { .. })
        })
        .await;
    }
    wait_until(
        "evicted sessions to leave memory",
        Duration::from_secs(10),
        || pool.status().sessions == 1,
    )
    .await;
    assert_eq!(pool.sessions()[0].id, "held");
    assert_eq!(
        gauge(&pool, "snakepool_stored_sessions"),
        ids.len() as u64 + 1
    );
    let stats = pool.call("get_stats", json!({})).await.unwrap();
    assert_eq!(stats["sessions"], 0, "the worker holds none: {stats}");

    // What the store knows of one that left memory.
    let info = pool.session_info("user-3").await.unwrap().expect("stored");
    assert!(info.evicted && info.worker.is_none(), "{info:?}");
    assert!(
        info.snapshot_bytes.is_some(),
        "compacted on its way out: {info:?}"
    );
    assert!(info.age_s >= info.idle_s, "{info:?}");

    // Each comes back whole on its next call, wherever it lands.
    for id in &ids[..6] {
        let (notes, state) = call_in(&pool, id, "notes", json!({})).await;
        assert_eq!(
            (notes, state),
            (json!([0, 1, 2]), SessionState::Rebuilt),
            "{id}"
        );
    }
    let back = held
        .call_reporting("notes", json!({}), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (back.result, back.state),
        (json!(["kept"]), SessionState::Rebuilt)
    );

    // Closing one only the store holds removes it for good: its id starts afresh.
    assert!(pool.close_session("user-9").await.unwrap());
    assert!(pool.session_info("user-9").await.unwrap().is_none());
    assert!(!pool.close_session("user-9").await.unwrap());
    assert!(!pool.close_session("nobody").await.unwrap());
    let (notes, state) = call_in(&pool, "user-9", "notes", json!({})).await;
    assert_eq!((notes, state), (json!([]), SessionState::Created));
    assert_eq!(gauge(&pool, "snakepool_stored_sessions"), ids.len() as u64);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_unused_for_the_ttl_leave_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let pool = durable(dir.path())
        .session_idle(Some(Duration::from_millis(100)))
        .session_ttl(Some(Duration::from_millis(1500)))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    call_in(&pool, "passing", "note", json!({"text": 1})).await;
    wait_for_event(&mut events, |e| {
        matches!(e, PoolEvent::SessionEvicted { .. })
    })
    .await;
    wait_until(
        "the evicted session to leave memory",
        Duration::from_secs(10),
        || pool.status().sessions == 0,
    )
    .await;
    assert_eq!(gauge(&pool, "snakepool_stored_sessions"), 1);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::SessionExpired { session_id } if &**session_id == "passing"),
    )
    .await;
    assert_eq!(gauge(&pool, "snakepool_stored_sessions"), 0);
    assert!(pool.session_info("passing").await.unwrap().is_none());
    let (notes, state) = call_in(&pool, "passing", "notes", json!({})).await;
    assert_eq!((notes, state), (json!([]), SessionState::Created));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_at_most_max_stored_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let pool = durable(dir.path())
        .max_stored_sessions(3)
        .start()
        .await
        .unwrap();
    for id in ["a", "b", "c"] {
        call_in(&pool, id, "note", json!({"text": id})).await;
    }
    let refused = pool.session("d").call("note", json!({"text": "d"})).await;
    assert!(
        matches!(refused, Err(Error::TooManySessions { limit: 3 })),
        "{refused:?}"
    );
    assert!(!pool.has_session("d"), "a refused session is not kept");
    // The sessions stored go on; closing one makes room.
    let (notes, _) = call_in(&pool, "b", "notes", json!({})).await;
    assert_eq!(notes, json!(["b"]));
    assert!(pool.close_session("a").await.unwrap());
    let (_, state) = call_in(&pool, "d", "note", json!({"text": "d"})).await;
    assert_eq!(state, SessionState::Created);
    pool.shutdown().await;
}
