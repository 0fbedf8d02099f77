//! Sessions that last, in one run:
//!
//! 1. **Journal growth**: one session, `BUMPS` (default 1,000,000) calls that change its
//!    state (a counter with a snapshot): host memory before and after, what its journal
//!    holds, and the time of its rebuild after its worker is killed; then a DSPy session
//!    with 3 programs after 1,000 such calls, rebuilt the same way.
//! 2. **Durable appends**: 8 sessions calling `bump` at once, journaled in memory and in
//!    SQLite (`SyncPolicy::Normal`), alternating rounds: calls per second of each.
//! 3. **Idle eviction**: `EVICT_SESSIONS` (default 100,000) sessions opened with one
//!    such call each, then evicted when idle: host and worker memory at the start, with
//!    the sessions on the workers, and after every one was evicted.
//!    Then `EVICT_DSPY_SESSIONS` (default 2,000) DSPy sessions (a dummy LM and a program
//!    each) the same way: the workers' memory.
//! 4. **Restart**: `RESTART_SESSIONS` (default 10,000) sessions stored in SQLite, the
//!    pool stopped and started again on the same directory: time to ready and to the
//!    first answered call of a stored session.
//!
//! `cargo bench --bench session_lifetime` (env: the sizes above, `ROUNDS`,
//! `SNAKEPOOL_PYTHON`). Cores: not pinned; a 2-thread runtime and 2 workers float over
//! both cores, as `snakepool serve` does.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
mod support;

use support::{env_usize, rss_kib};

use snakepool::{JournalLimits, Pool, PoolBuilder, PoolEvent, SyncPolicy};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The host's and the workers' RSS, KiB.
fn memory(pool: &Pool) -> (u64, u64) {
    let workers = pool.status().workers.iter().map(|w| rss_kib(w.pid)).sum();
    (rss_kib(std::process::id()), workers)
}

fn builder(python: &str) -> PoolBuilder {
    Pool::builder()
        .workers(2)
        .python(python)
        .python_path(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python"))
        .module("session_handlers")
        .health_interval(None)
        .session_ttl(None)
        .session_idle(None)
}

/// Kills the worker `session` is pinned to and waits until the pool has replaced it.
async fn kill_worker_of(pool: &Pool, session: &snakepool::Session) {
    let mut events = pool.subscribe();
    let pinned = session.worker_id().expect("pinned");
    let pid = pool
        .status()
        .workers
        .iter()
        .find(|w| w.id == pinned)
        .expect("its worker")
        .pid;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lost = false;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            Ok(Ok(PoolEvent::WorkerLost { pid: p, .. })) if p == pid => lost = true,
            Ok(Ok(PoolEvent::WorkerReady { .. })) if lost => return,
            _ => {}
        }
    }
    panic!("worker {pid} was not replaced within 30 s");
}

async fn journal_growth(python: &str, bumps: usize) {
    let pool = builder(python).start().await.unwrap();
    let session = pool.session("long-lived");
    session.call("bump", json!({})).await.unwrap();
    let (host_before, _) = memory(&pool);
    let started = Instant::now();
    for _ in 1..bumps {
        session.call("bump", json!({})).await.unwrap();
    }
    let elapsed = started.elapsed();
    let (host_after, _) = memory(&pool);
    let info = pool.session_info("long-lived").await.unwrap().unwrap();
    println!(
        "journal growth: {bumps} state-changing calls in {:.1} s ({:.0} µs each); host RSS \
         {:.1} -> {:.1} MiB ({:+.2} MiB); journal {} entries, {} bytes after a snapshot of {} \
         bytes; {} compactions",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / bumps as f64,
        mib(host_before),
        mib(host_after),
        (host_after as f64 - host_before as f64) / 1024.0,
        info.journal_entries,
        info.journal_bytes,
        info.snapshot_bytes.unwrap_or(0),
        pool.metrics().journal_compactions,
    );
    kill_worker_of(&pool, &session).await;
    let started = Instant::now();
    let count = session.call("count", json!({})).await.unwrap();
    let rebuild = started.elapsed();
    assert_eq!(count, json!(bumps));
    println!(
        "  rebuild after its worker was killed: first call {:.2} ms (count {count})",
        rebuild.as_secs_f64() * 1e3
    );
    pool.shutdown().await;

    let pool = builder(python)
        .module("snakepool_worker.dspy")
        .preload("dspy")
        .start()
        .await
        .unwrap();
    let session = pool.session("dspy");
    let script = json!({"provider": "dummy", "answers": vec![json!({"answer": "42"}); 4]});
    session.call("configure_lm", script.clone()).await.unwrap();
    for _ in 0..3 {
        session
            .call("create_program", json!({"signature": "question -> answer"}))
            .await
            .unwrap();
    }
    for _ in 0..1000 {
        session.call("configure_lm", script.clone()).await.unwrap();
    }
    let info = pool.session_info("dspy").await.unwrap().unwrap();
    kill_worker_of(&pool, &session).await;
    let started = Instant::now();
    let run = session
        .call(
            "execute_program",
            json!({"program_id": "prog_3", "inputs": {"question": "?"}}),
        )
        .await
        .unwrap();
    let rebuild = started.elapsed();
    assert_eq!(run["outputs"]["answer"], "42");
    println!(
        "  DSPy session, 3 programs, 1,004 state-changing calls (journal: snapshot of {} \
         bytes + {} entries): rebuild + first call {:.2} ms",
        info.snapshot_bytes.unwrap_or(0),
        info.journal_entries,
        rebuild.as_secs_f64() * 1e3
    );
    pool.shutdown().await;
}

/// Calls per second of 8 sessions calling `bump` at once, `calls` each.
async fn bump_rate(pool: &Pool, round: usize, calls: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|s| {
            let session = pool.session(&format!("r{round}-s{s}"));
            tokio::spawn(async move {
                for _ in 0..calls {
                    session.call("bump", json!({})).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (8 * calls) as f64 / started.elapsed().as_secs_f64()
}

async fn durable_appends(python: &str, rounds: usize, calls: usize) {
    let dir = tempfile::tempdir().unwrap();
    let memory_pool = builder(python).start().await.unwrap();
    let durable_pool = builder(python)
        .durable_journal(dir.path(), SyncPolicy::Normal)
        .start()
        .await
        .unwrap();
    let (mut in_memory, mut in_sqlite) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first.
        if round % 2 == 0 {
            in_memory.push(bump_rate(&memory_pool, round, calls).await);
            in_sqlite.push(bump_rate(&durable_pool, round, calls).await);
        } else {
            in_sqlite.push(bump_rate(&durable_pool, round, calls).await);
            in_memory.push(bump_rate(&memory_pool, round, calls).await);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, d) = (median(in_memory.clone()), median(in_sqlite.clone()));
    println!(
        "durable appends: 8 sessions × {calls} state-changing calls, {rounds} rounds: memory \
         journal {m:.0} calls/s {in_memory:.0?}, SQLite journal {d:.0} calls/s {in_sqlite:.0?} \
         ({:.2}× the memory journal's)",
        d / m
    );
    memory_pool.shutdown().await;
    durable_pool.shutdown().await;
}

/// Opens `n` sessions with one `bump` each, 16 at a time.
async fn open_sessions(pool: &Pool, prefix: &str, n: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            let session = pool.session(&format!("{prefix}-{i:06}"));
            async move { session.call("bump", json!({})).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// Waits until `sessions` sessions were evicted and have left the pool's memory, then
/// a little longer for the workers' collection and the host's trim after the last.
async fn wait_evicted(pool: &Pool, sessions: usize) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    while (pool.metrics().session_evictions as usize) < sessions || pool.status().sessions > 0 {
        assert!(
            Instant::now() < deadline,
            "only {} of {sessions} sessions evicted in 600 s ({} still in memory)",
            pool.metrics().session_evictions,
            pool.status().sessions,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let evicted = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    evicted
}

/// A pool on a SQLite journal in `dir` (as `snakepool serve` runs by default) whose
/// sessions are evicted after 2 s idle.
fn evicting(python: &str, dir: &std::path::Path, sessions: usize) -> PoolBuilder {
    builder(python)
        .durable_journal(dir, SyncPolicy::Normal)
        .session_idle(Some(Duration::from_secs(2)))
        .max_sessions(sessions + 1)
}

async fn idle_eviction(python: &str, sessions: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pool = evicting(python, dir.path(), sessions)
        .journal_limits(JournalLimits::default())
        .start()
        .await
        .unwrap();
    pool.call("ping", json!({})).await.unwrap();
    let (host_idle, workers_idle) = memory(&pool);
    let started = Instant::now();
    open_sessions(&pool, "idle", sessions).await;
    let opened = started.elapsed();
    let (host_full, workers_full) = memory(&pool);
    let evicted = wait_evicted(&pool, sessions).await;
    let (host_after, workers_after) = memory(&pool);
    let started = Instant::now();
    let back = pool
        .session("idle-000042")
        .call_reporting("count", json!({}), snakepool::CallOptions::default())
        .await
        .unwrap();
    let came_back = started.elapsed();
    assert_eq!(
        (back.result, back.state),
        (json!(1), snakepool::SessionState::Rebuilt)
    );
    println!(
        "idle eviction (SQLite journal): {sessions} sessions opened in {:.1} s, all evicted \
         and out of memory {:.1} s later (2 s idle); host RSS {:.1} -> {:.1} -> {:.1} MiB \
         ({:+.0}% of idle), workers RSS {:.1} -> {:.1} -> {:.1} MiB ({:+.0}% of idle) (idle, \
         with the sessions, after eviction); an evicted session's next call answered in \
         {:.1} ms, rebuilt from the store",
        opened.as_secs_f64(),
        evicted.as_secs_f64(),
        mib(host_idle),
        mib(host_full),
        mib(host_after),
        percent_over(host_after, host_idle),
        mib(workers_idle),
        mib(workers_full),
        mib(workers_after),
        percent_over(workers_after, workers_idle),
        came_back.as_secs_f64() * 1e3,
    );
    pool.shutdown().await;
}

fn percent_over(now: u64, base: u64) -> f64 {
    (now as f64 / base as f64 - 1.0) * 100.0
}

async fn idle_dspy_eviction(python: &str, sessions: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pool = evicting(python, dir.path(), sessions)
        .module("snakepool_worker.dspy")
        .preload("dspy")
        .start()
        .await
        .unwrap();
    pool.call("ping", json!({})).await.unwrap();
    let (_, workers_idle) = memory(&pool);
    futures::stream::iter(0..sessions)
        .map(|i| {
            let session = pool.session(&format!("dspy-{i:06}"));
            async move {
                let script = json!({"provider": "dummy", "answers": [{"answer": "42"}]});
                session.call("configure_lm", script).await.unwrap();
                session
                    .call("create_program", json!({"signature": "question -> answer"}))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let (_, workers_full) = memory(&pool);
    wait_evicted(&pool, sessions).await;
    let (_, workers_after) = memory(&pool);
    println!(
        "  {sessions} DSPy sessions (a dummy LM and a program each): workers RSS {:.1} -> \
         {:.1} -> {:.1} MiB ({:+.0}% of idle) (idle, with the sessions, after eviction)",
        mib(workers_idle),
        mib(workers_full),
        mib(workers_after),
        percent_over(workers_after, workers_idle),
    );
    pool.shutdown().await;
}

async fn restart(python: &str, sessions: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pool = builder(python)
        .durable_journal(dir.path(), SyncPolicy::Normal)
        .max_sessions(sessions + 1)
        .start()
        .await
        .unwrap();
    open_sessions(&pool, "stored", sessions).await;
    pool.shutdown().await;
    drop(pool);
    // The journal's thread lets go of the directory once the old pool is gone.
    let started = Instant::now();
    let pool = loop {
        match builder(python)
            .durable_journal(dir.path(), SyncPolicy::Normal)
            .max_sessions(sessions + 1)
            .start()
            .await
        {
            Ok(pool) => break pool,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("the pool did not start again: {error}"),
        }
    };
    let ready = started.elapsed();
    let first = pool
        .session("stored-000042")
        .call("count", json!({}))
        .await
        .unwrap();
    let answered = started.elapsed();
    assert_eq!(first, json!(1));
    println!(
        "restart: {sessions} stored sessions; the pool was ready {:.0} ms after start, the \
         first call of a stored session answered at {:.0} ms ({} sessions open, none \
         replayed ahead of its call)",
        ready.as_secs_f64() * 1e3,
        answered.as_secs_f64() * 1e3,
        pool.status().sessions,
    );
    pool.shutdown().await;
}

fn main() {
    let python = std::env::var("SNAKEPOOL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        journal_growth(&python, env_usize("BUMPS", 1_000_000)).await;
        durable_appends(&python, env_usize("ROUNDS", 3), env_usize("APPENDS", 2_000)).await;
        idle_eviction(&python, env_usize("EVICT_SESSIONS", 100_000)).await;
        idle_dspy_eviction(&python, env_usize("EVICT_DSPY_SESSIONS", 2_000)).await;
        restart(&python, env_usize("RESTART_SESSIONS", 10_000)).await;
    });
}
