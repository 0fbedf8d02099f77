//! The Redis journal against a real `redis-server`: two nodes share it; a node
//! writes a session only while it holds the session's lease; a node that lost its
//! lease (paused past it) has its writes refused; a lease given back is taken at
//! once; a session is removed only by its owner or when nobody holds it.

mod common;

use std::time::{Duration, Instant};

use common::services::RedisServer;
use serde_json::json;
use snakepool::journal::JournalErrorKind;
use snakepool::{JournalEntry, RedisJournal, RedisOptions, SessionJournal};

fn entry(n: u64) -> JournalEntry {
    JournalEntry::new("note", &json!({"n": n}))
}

async fn node(redis: &RedisServer, name: &str) -> RedisJournal {
    let options = RedisOptions {
        lease_ttl: Duration::from_millis(400),
        lease_wait: Duration::from_secs(5),
        ..RedisOptions::new(name)
    };
    RedisJournal::open(&redis.url(), options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_fence_writes_between_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;

    // A new session: nothing stored; the lease is a's.
    assert!(a.adopt("s", 1).await.unwrap().is_none());
    a.append("s", 1, entry(1)).await.unwrap();
    let stats = a.append("s", 1, entry(2)).await.unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(a.session_count(), 1);

    // b waits for a's lease to run out (a does not renew it), then takes the session.
    let asked = Instant::now();
    let taken = b.adopt("s", 7).await.unwrap().expect("stored");
    assert!(
        asked.elapsed() >= Duration::from_millis(200),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(taken.stats.entries, 2);
    assert!(taken.epoch > 1, "a greater fencing token: {taken:?}");
    let entries = b.entries("s", 7).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| (**e).clone()).collect::<Vec<_>>(),
        [entry(1), entry(2)]
    );

    // a comes back: its write is refused, and it no longer holds the session.
    let stale = a.append("s", 1, entry(3)).await.unwrap_err();
    assert_eq!(stale.kind, JournalErrorKind::Moved, "{stale}");
    assert_eq!(
        a.renew("s", 1).await.unwrap_err().kind,
        JournalErrorKind::Moved
    );
    assert_eq!(b.append("s", 7, entry(3)).await.unwrap().entries, 3);

    // A compaction keeps what follows the entries it replaces.
    let snapshot = JournalEntry::new("restore_session", &json!({"parts": {"n": 2}}));
    let stats = b.compact("s", 7, snapshot.clone(), 2).await.unwrap();
    assert_eq!(
        (stats.entries, stats.snapshot_bytes),
        (1, Some(snapshot.size()))
    );
    let entries = b.entries("s", 7).await.unwrap();
    assert_eq!(*entries[0], snapshot);
    assert_eq!(*entries[1], entry(3));

    // A lease given back is taken at once.
    b.release("s", 7, std::time::SystemTime::now())
        .await
        .unwrap();
    let asked = Instant::now();
    let back = a.adopt("s", 2).await.unwrap().expect("stored");
    assert!(
        asked.elapsed() < Duration::from_millis(300),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(back.stats.snapshot_bytes, Some(snapshot.size()));

    // Only the owner, or anyone once nobody holds it, removes it.
    assert!(
        !b.remove("s", Some(7)).await.unwrap(),
        "b no longer holds it"
    );
    assert!(a.stored("s").await.unwrap().is_some());
    assert!(a.remove("s", Some(2)).await.unwrap());
    assert!(a.stored("s").await.unwrap().is_none());
    assert_eq!(a.session_count(), 0);
    // A session made again under the id gets a token never given before.
    assert!(b.adopt("s", 8).await.unwrap().is_none());
    let again = b.stored("s").await.unwrap().unwrap();
    assert!(again.epoch > back.epoch, "{again:?} after {back:?}");
    a.append("gone", 2, entry(1)).await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_unavailable_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path());
    let a = node(&redis, "a").await;
    assert!(a.adopt("kept", 1).await.unwrap().is_none());
    for n in 0..20 {
        a.append("kept", 1, entry(n)).await.unwrap();
    }
    redis.kill();
    let down = a.append("kept", 1, entry(20)).await.unwrap_err();
    assert_eq!(down.kind, JournalErrorKind::Unavailable, "{down}");
    redis.restart();
    // Reconnected, with every acknowledged entry (the append-only file, fsynced).
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries = loop {
        match a.entries("kept", 1).await {
            Ok(entries) => break entries,
            Err(error) if Instant::now() < deadline => {
                assert_eq!(error.kind, JournalErrorKind::Unavailable, "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("Redis did not come back: {error}"),
        }
    };
    assert_eq!(entries.len(), 20);
}
