//! Starts a pool of Python workers, makes plain and session calls, kills a worker and
//! shows that its session is rebuilt on another, then prints the pool's metrics.
//!
//! Run with `cargo run --release --example quickstart`.

use std::time::{Duration, Instant};

use serde_json::json;
use snakepool::{Pool, PoolEvent};

#[tokio::main]
async fn main() -> snakepool::Result<()> {
    let started = Instant::now();
    let pool = Pool::builder()
        .workers(4)
        .python_path(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/handlers"))
        .module("quickstart_handlers")
        .request_timeout(Duration::from_secs(10))
        .start()
        .await?;
    println!("4 workers ready in {:?}", started.elapsed());

    // Plain calls go to any free worker, all at once.
    let texts = [
        "the quick brown fox",
        "jumps over",
        "the lazy dog",
        "again and again",
    ];
    let calls = texts
        .iter()
        .cycle()
        .take(200)
        .map(|text| pool.call("word_count", json!({ "text": text })));
    let replies = futures::future::try_join_all(calls).await?;
    let words: u64 = replies
        .iter()
        .map(|r| r["words"].as_u64().unwrap_or(0))
        .sum();
    println!("200 concurrent calls counted {words} words");

    // A session's calls always go to its own worker.
    let session = pool.session("notebook");
    session
        .call("remember", json!({"fact": "water boils at 100 C"}))
        .await?;
    session
        .call("remember", json!({"fact": "light is fast"}))
        .await?;
    let before = session.call("recall", json!({})).await?;
    let pid = before["pid"].as_u64().unwrap_or_default() as u32;
    println!("session `notebook` lives on pid {pid}: {}", before["notes"]);

    // Kill that worker from outside; the next call rebuilds the session elsewhere.
    let mut events = pool.subscribe();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    while let Ok(event) = events.recv().await {
        if matches!(event, PoolEvent::WorkerLost { pid: p, .. } if p == pid) {
            break;
        }
    }
    let after = session.call("recall", json!({})).await?;
    println!(
        "after kill -9 of pid {pid}: session now on pid {} with notes {}",
        after["pid"], after["notes"]
    );

    // A Python exception is an error value; the worker keeps serving.
    match pool.call("word_count", json!({})).await {
        Err(e) => println!("bad arguments give a clear error: {e}"),
        Ok(v) => println!("unexpected success: {v}"),
    }

    let m = pool.metrics();
    println!(
        "calls {} (ok {}), latency p50 {} µs p99 {} µs, worker starts {}, crashes {}, session rebuilds {}",
        m.calls,
        m.calls_ok,
        m.call_latency.p50_us,
        m.call_latency.p99_us,
        m.worker_starts,
        m.worker_crashes,
        m.session_rebuilds
    );
    session.close().await?;
    pool.shutdown().await;
    Ok(())
}
