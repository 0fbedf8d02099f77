//! Workers forked from the zygote: fork-ready, owned by the pool, independent of the
//! zygote's own life, and never forked from an unsafe (threaded) zygote.

mod common;

use std::time::Duration;

use common::{builder, kill9, pid_of, wait_for_event, wait_gone};
use serde_json::json;
use snakepool::{PoolEvent, SpawnMode};

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit(')').next().unwrap();
    after_name
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

fn process_group_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit(')').next().unwrap();
    after_name
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_forked_from_the_zygote_into_their_own_groups() {
    let pool = builder(3)
        .spawn_mode(SpawnMode::Zygote)
        .start()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().expect("a zygote serves the pool");
    for worker in pool.status().workers {
        assert_eq!(parent_of(worker.pid), zygote, "worker {} forked", worker.id);
        assert_eq!(
            process_group_of(worker.pid),
            worker.pid,
            "own process group"
        );
    }
    let reply = pool.call("whoami", json!({})).await.unwrap();
    assert!(reply["worker_id"].as_str().unwrap().starts_with('w'));
    pool.shutdown().await;
    assert!(
        wait_gone(zygote, Duration::from_secs(10)),
        "zygote stopped with the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_zygote_fails_no_call_and_it_comes_back() {
    let pool = builder(2)
        .spawn_mode(SpawnMode::Zygote)
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let zygote = pool.zygote_pid().unwrap();
    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 0.5})).await })
    };
    kill9(zygote);
    assert!(wait_gone(zygote, Duration::from_secs(10)));
    // Forked workers outlive their zygote: the call in flight completes.
    in_flight.await.unwrap().unwrap();
    for _ in 0..10 {
        pool.call("echo", json!({})).await.unwrap();
    }
    // A worker lost now is replaced (fresh while the zygote is down), and the next
    // start brings the zygote back.
    let victim = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    kill9(victim);
    wait_for_event(&mut events, |e| matches!(e, PoolEvent::ZygoteReady { .. })).await;
    let new_zygote = pool.zygote_pid().unwrap();
    assert_ne!(new_zygote, zygote);
    while pool.status().workers.len() < 2 {
        wait_for_event(&mut events, |e| matches!(e, PoolEvent::WorkerReady { .. })).await;
    }
    for _ in 0..10 {
        pool.call("echo", json!({})).await.unwrap();
    }
    assert_eq!(pool.metrics().errors.len(), 0, "no call failed");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_module_with_a_thread_makes_the_pool_start_fresh_with_a_warning() {
    let pool = builder(2)
        .spawn_mode(SpawnMode::Zygote)
        .preload("sp_thread_starter")
        .start()
        .await
        .unwrap();
    let zygote = pool.zygote_status();
    assert_eq!(zygote.state, "disabled");
    assert_eq!(zygote.pid, None);
    let warning = zygote.problem.expect("a warning says why");
    assert!(warning.contains("metrics-flusher"), "{warning}");
    assert!(warning.contains("fork"), "{warning}");
    for worker in pool.status().workers {
        assert_eq!(
            parent_of(worker.pid),
            std::process::id(),
            "workers started fresh, as children of the host"
        );
    }
    pool.call("echo", json!({})).await.unwrap();
    pool.shutdown().await;
}
