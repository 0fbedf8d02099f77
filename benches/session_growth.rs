//! What 100k open sessions cost: host and worker memory, and the latency of a plain
//! `ping`, of a session call, of closing a session and of reading a page of sessions,
//! measured with 0 sessions open and again with `SESSIONS` (default 100,000) open, in
//! one run.
//!
//! Every session is opened by a real call in it (a `ping`, so it is pinned to a
//! worker and has a journal, but the worker keeps no state for it); 4 concurrent
//! callers load the pool while the TTL sweep runs every second, as in production.
//!
//! `cargo bench --bench session_growth` (env: `SESSIONS`, `SAMPLES`, `SNAKEPOOL_PYTHON`).
//!
//! Cores: not pinned; the host runs on a 2-thread runtime and the 2 workers float
//! over both cores, as `snakepool serve` does.

use std::time::{Duration, Instant};

use serde_json::json;
use snakepool::Pool;

mod support;

use support::{env_usize, rss_kib};

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Latencies {
    ping: (f64, f64),
    session_call: (f64, f64),
    close: (f64, f64),
    page: (f64, f64),
    host_cpu_per_ping_us: f64,
}

fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

async fn measure(pool: &Pool, samples: usize, tag: &str) -> Latencies {
    let mut pings = Vec::with_capacity(samples);
    let cpu = cpu_time();
    let mut callers = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        callers.push(tokio::spawn(async move {
            let mut own = Vec::with_capacity(samples / 4);
            for _ in 0..samples / 4 {
                let t = Instant::now();
                pool.call("ping", json!({})).await.unwrap();
                own.push(t.elapsed().as_secs_f64() * 1e6);
            }
            own
        }));
    }
    for caller in callers {
        pings.extend(caller.await.unwrap());
    }
    let host_cpu_per_ping_us = (cpu_time() - cpu).as_secs_f64() * 1e6 / pings.len() as f64;
    let mut session_calls = Vec::new();
    let mut closes = Vec::new();
    let mut pages = Vec::new();
    for i in 0..samples / 10 {
        let session = pool.session(&format!("{tag}-probe-{i}"));
        let t = Instant::now();
        session.call("ping", json!({})).await.unwrap();
        session_calls.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        pool.close_session(session.id()).await.unwrap();
        closes.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let page = pool.sessions_page(Some("s-050000"), 100);
        pages.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(page.sessions.len() <= 100);
    }
    Latencies {
        ping: p50_p99(pings),
        session_call: p50_p99(session_calls),
        close: p50_p99(closes),
        page: p50_p99(pages),
        host_cpu_per_ping_us,
    }
}

fn report(label: &str, sessions: usize, l: &Latencies, host_kib: u64, worker_kib: u64) {
    println!(
        "{label:<8} sessions {sessions:>6}  host RSS {:>7.1} MiB  workers RSS {:>7.1} MiB  \
         ping p50/p99 {:>6.0}/{:>6.0} µs (host CPU {:>5.1} µs/call)  session call {:>6.0}/{:>6.0} µs  \
         close {:>6.0}/{:>6.0} µs  page of 100 {:>6.0}/{:>6.0} µs",
        host_kib as f64 / 1024.0,
        worker_kib as f64 / 1024.0,
        l.ping.0,
        l.ping.1,
        l.host_cpu_per_ping_us,
        l.session_call.0,
        l.session_call.1,
        l.close.0,
        l.close.1,
        l.page.0,
        l.page.1,
    );
}

fn main() {
    let python = std::env::var("SNAKEPOOL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").to_owned());
    let sessions = env_usize("SESSIONS", 100_000);
    let samples = env_usize("SAMPLES", 20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = Pool::builder()
            .workers(2)
            .python(&python)
            .health_interval(None)
            .session_ttl(Some(Duration::from_secs(3600)))
            .max_sessions(sessions + samples)
            .start()
            .await
            .expect("pool starts");
        let worker_rss =
            |pool: &Pool| -> u64 { pool.status().workers.iter().map(|w| rss_kib(w.pid)).sum() };
        let me = std::process::id();
        let before = measure(&pool, samples, "before").await;
        report("empty", 0, &before, rss_kib(me), worker_rss(&pool));

        let opened = Instant::now();
        let mut openers = Vec::new();
        for part in 0..8 {
            let pool = pool.clone();
            openers.push(tokio::spawn(async move {
                for i in (part..sessions).step_by(8) {
                    pool.session(&format!("s-{i:06}"))
                        .call("ping", json!({}))
                        .await
                        .unwrap();
                }
            }));
        }
        for opener in openers {
            opener.await.unwrap();
        }
        println!(
            "opened {sessions} sessions (one call each) in {:.1} s",
            opened.elapsed().as_secs_f64()
        );
        let after = measure(&pool, samples, "after").await;
        report(
            "full",
            pool.status().sessions,
            &after,
            rss_kib(me),
            worker_rss(&pool),
        );
        pool.shutdown().await;
    });
}
