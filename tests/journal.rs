//! Bounded session journals: a session whose state has a snapshot keeps a short
//! journal (compacted into a snapshot every so many entries) and is rebuilt from it;
//! one without fills up to its limit and then refuses calls that would change it,
//! saying which command lacks a snapshot; a write for a closed session never reaches
//! a later session under the same id.

mod common;

use common::{builder, kill_session_worker, wait_for_event};
use serde_json::json;
use snakepool::{CallOptions, Error, JournalLimits, Pool, PoolEvent, SessionState};

fn limits() -> JournalLimits {
    JournalLimits {
        compact_entries: 10,
        compact_bytes: 1 << 20,
        max_entries: 25,
        max_bytes: 1 << 20,
    }
}

async fn pool() -> Pool {
    builder(2)
        .module("snapshot_handlers")
        .journal_limits(limits())
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshotted_session_keeps_a_short_journal_and_is_rebuilt_from_it() {
    let pool = pool().await;
    let session = pool.session("long-lived");
    for n in 0..105 {
        session.call("note", json!({"text": n})).await.unwrap();
    }
    let info = &pool.sessions()[0];
    assert!(info.journal_entries < 10, "{info:?}");
    assert_eq!(pool.metrics().journal_compactions, 10);
    let journal = pool.journal_entries("long-lived").await.unwrap();
    assert_eq!(journal[0].command(), "restore_session");
    assert_eq!(
        journal.len(),
        1 + 5,
        "the snapshot of 100 notes, then 5 more"
    );

    kill_session_worker(&pool, &session).await;
    let notes = session.call("notes", json!({})).await.unwrap();
    assert_eq!(notes, json!((0..105).collect::<Vec<_>>()));
    assert_eq!(pool.metrics().session_rebuilds, 1);
    // It goes on compacting after the rebuild.
    for n in 105..110 {
        session.call("note", json!({"text": n})).await.unwrap();
    }
    assert_eq!(pool.metrics().journal_compactions, 11);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_without_snapshots_fills_up_and_then_refuses_changes() {
    let pool = pool().await;
    let session = pool.session("unsnapshotted");
    for n in 0..25 {
        session
            .call("set_value", json!({"key": "k", "value": n}))
            .await
            .unwrap();
    }
    let error = session
        .call("set_value", json!({"key": "k", "value": 25}))
        .await
        .unwrap_err();
    let Error::JournalFull {
        entries,
        max_entries,
        reason,
        ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!((*entries, *max_entries), (25, 25));
    assert!(
        reason.contains("`set_value` (module `sp_test_handlers`)"),
        "{reason}"
    );
    assert_eq!(error.kind(), "journal_full");
    // Nothing was lost: reads still work, the state is the last stored, and it is
    // rebuilt whole.
    assert_eq!(
        session
            .call("get_value", json!({"key": "k"}))
            .await
            .unwrap(),
        24
    );
    kill_session_worker(&pool, &session).await;
    assert_eq!(
        session
            .call("get_value", json!({"key": "k"}))
            .await
            .unwrap(),
        24
    );
    assert_eq!(pool.metrics().journal_compactions, 0);
    // Closing it frees everything; the id starts afresh.
    session.close().await.unwrap();
    let again = pool.session("unsnapshotted");
    again
        .call("set_value", json!({"key": "k", "value": "new"}))
        .await
        .unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_for_a_closed_session_never_reaches_its_successor() {
    let pool = pool().await;
    let first = pool.session("reused");
    let late = {
        let first = first.clone();
        tokio::spawn(async move {
            first
                .call("note", json!({"text": "late", "delay": 0.5}))
                .await
        })
    };
    common::wait_until("the slow call to run", common::WAIT, || {
        pool.status().workers.iter().any(|w| w.in_flight > 0)
    })
    .await;
    // Closed while its call runs; the id is opened again at once.
    pool.close_session("reused").await.unwrap();
    let second = pool.session("reused");
    second.call("note", json!({"text": "fresh"})).await.unwrap();
    late.await.unwrap().unwrap();
    let journal = pool.journal_entries("reused").await.unwrap();
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(journal[0].args()["text"], "fresh");
    kill_session_worker(&pool, &second).await;
    assert_eq!(
        second.call("notes", json!({})).await.unwrap(),
        json!(["fresh"])
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_leave_their_worker_and_come_back_on_their_next_call() {
    let pool = builder(1)
        .module("snapshot_handlers")
        .journal_limits(limits())
        .session_idle(Some(std::time::Duration::from_millis(200)))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let noted = pool.session("noted");
    let valued = pool.session("valued");
    let states: Vec<SessionState> = {
        let mut states = Vec::new();
        for n in 0..3 {
            let reply = noted
                .call_reporting("note", json!({"text": n}), CallOptions::default())
                .await
                .unwrap();
            states.push(reply.state);
        }
        states
    };
    use SessionState::{Created, Rebuilt, Resumed};
    assert_eq!(states, [Created, Resumed, Resumed]);
    valued
        .call("set_value", json!({"key": "k", "value": "v"}))
        .await
        .unwrap();
    let worker_sessions = |stats: &serde_json::Value| stats["sessions"].as_u64().unwrap();
    let before = pool.call("get_stats", json!({})).await.unwrap();
    assert_eq!(worker_sessions(&before), 2, "{before}");
    for _ in 0..2 {
        wait_for_event(&mut events, |e| {
            matches!(e, PoolEvent::SessionEvicted { .. })
        })
        .await;
    }
    let after = pool.call("get_stats", json!({})).await.unwrap();
    assert_eq!(worker_sessions(&after), 0, "their state is freed: {after}");
    assert!(noted.worker_id().is_none());
    // The snapshotted one was compacted on its way out.
    let journal = pool.journal_entries("noted").await.unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].command(), "restore_session");
    // Both come back, whole, on their next call.
    let back = noted
        .call_reporting("notes", json!({}), CallOptions::default())
        .await
        .unwrap();
    assert_eq!((back.result, back.state), (json!([0, 1, 2]), Rebuilt));
    assert_eq!(
        valued.call("get_value", json!({"key": "k"})).await.unwrap(),
        "v"
    );
    let metrics = pool.metrics();
    assert_eq!(
        (metrics.session_evictions, metrics.session_rebuilds),
        (2, 2)
    );
    let text = pool.prometheus_text();
    for line in [
        "snakepool_session_evictions_total 2",
        "snakepool_session_rebuild_seconds_count 2",
        "snakepool_journal_entries 1",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert!(
        text.contains("snakepool_journal_write_seconds_count"),
        "{text}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dspy_session_is_compacted_and_rebuilt_from_its_snapshot() {
    let pool = builder(2)
        .module("snakepool_worker.dspy")
        .journal_limits(JournalLimits {
            compact_entries: 2,
            ..limits()
        })
        .start()
        .await
        .unwrap();
    let session = pool.session("dspy-long");
    let script = json!({"provider": "dummy", "answers": vec![json!({"answer": "yes"}); 8]});
    session.call("configure_lm", script).await.unwrap();
    for _ in 0..3 {
        session
            .call("create_program", json!({"signature": "question -> answer"}))
            .await
            .unwrap();
    }
    assert_eq!(pool.metrics().journal_compactions, 2);
    let journal = pool.journal_entries("dspy-long").await.unwrap();
    assert_eq!(journal[0].command(), "restore_session");
    assert!(journal.len() <= 2, "{journal:?}");

    kill_session_worker(&pool, &session).await;
    let listed = session.call("list_programs", json!({})).await.unwrap();
    let ids: Vec<&str> = listed["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["program_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["prog_1", "prog_2", "prog_3"]);
    let run = session
        .call(
            "execute_program",
            json!({"program_id": "prog_3", "inputs": {"question": "still here?"}}),
        )
        .await
        .unwrap();
    assert_eq!(run["outputs"]["answer"], "yes");
    let created = session
        .call("create_program", json!({"signature": "question -> answer"}))
        .await
        .unwrap();
    assert_eq!(
        created["program_id"], "prog_4",
        "the id counter came back too"
    );
    pool.shutdown().await;
}
