//! Ping round trip through the pool against a raw pipe round trip to the same Python
//! worker runtime, measured in one run.
//!
//! `cargo bench --bench roundtrip` (env: `ROUNDS`, `PINGS`, `SNAKEPOOL_PYTHON`).
//!
//! Cores: by default (`BENCH_PIN=same`) the host and the Python worker are both pinned
//! to CPU 0, so neither waits for an idle core to wake per message (this VM wakes idle
//! cores slowly, ~80-115 µs). `BENCH_PIN=split` pins the worker to CPU 1 instead, which
//! measures that wake-up. Rounds alternate raw, pool (multi-thread runtime) and pool
//! (current-thread runtime); each reports its median, and the summary gives the median
//! of the round medians and the pool/raw ratio.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use snakepool::Pool;
use support::RawWorker;

mod support;

fn pin(pid: u32, cpu: usize) {
    support::set_affinity(pid, &[cpu]);
}

/// The workers' CPU: 0 beside the host, or 1 with `BENCH_PIN=split` on a machine that
/// has it. Read before the host pins itself, since the pinned host sees one CPU.
fn worker_cpu() -> usize {
    static CPU: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| {
        let split = std::env::var("BENCH_PIN").is_ok_and(|v| v == "split");
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        usize::from(split && cpus > 1)
    })
}

fn python() -> String {
    std::env::var("SNAKEPOOL_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A raw pipe worker pinned beside (or apart from) the host.
fn start_raw() -> RawWorker {
    let raw = RawWorker::start(
        &python(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/python"),
        &[],
    );
    pin(raw.pid(), worker_cpu());
    raw
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn micros(d: Duration) -> u64 {
    (d.as_nanos() as u64 / 1000).max(1)
}

async fn start_pool() -> Pool {
    let pool = Pool::builder()
        .workers(1)
        .python(python())
        .health_interval(None)
        .start()
        .await
        .expect("pool starts");
    for worker in pool.status().workers {
        pin(worker.pid, worker_cpu());
    }
    pool
}

async fn pool_round(pool: &Pool, pings: usize) -> Histogram<u64> {
    let mut h = histogram();
    for _ in 0..pings {
        let t = Instant::now();
        pool.call("ping", json!({})).await.unwrap();
        h.record(micros(t.elapsed())).unwrap();
    }
    h
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    worker_cpu();
    pin(0, 0);
    let rounds = env_usize("ROUNDS", 5);
    let pings = env_usize("PINGS", 5000);

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut raw = start_raw();
    let pool_mt = multi.block_on(start_pool());
    let pool_ct = single.block_on(start_pool());

    // Warm-up: every path, so caches and branch predictors are in the same state.
    for _ in 0..1000 {
        raw.round_trip("ping", json!({}));
    }
    multi.block_on(pool_round(&pool_mt, 1000));
    single.block_on(pool_round(&pool_ct, 1000));

    let names = [
        "raw pipe",
        "pool (multi-thread rt)",
        "pool (current-thread rt)",
    ];
    let mut p50: [Vec<f64>; 3] = Default::default();
    let mut p99: [Vec<f64>; 3] = Default::default();
    println!(
        "ping round trip, {rounds} rounds × {pings} pings, host on CPU 0, worker on CPU {}",
        worker_cpu()
    );
    println!(
        "{:<26} {:>6} {:>9} {:>9} {:>9}",
        "path", "round", "p50 µs", "p99 µs", "max µs"
    );
    for round in 1..=rounds {
        let mut h = histogram();
        for _ in 0..pings {
            let t = Instant::now();
            raw.round_trip("ping", json!({}));
            h.record(micros(t.elapsed())).unwrap();
        }
        let results = [
            h,
            multi.block_on(pool_round(&pool_mt, pings)),
            single.block_on(pool_round(&pool_ct, pings)),
        ];
        for (i, h) in results.iter().enumerate() {
            p50[i].push(h.value_at_quantile(0.5) as f64);
            p99[i].push(h.value_at_quantile(0.99) as f64);
            println!(
                "{:<26} {:>6} {:>9} {:>9} {:>9}",
                names[i],
                round,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
    }
    let base = median(&mut p50[0].clone());
    println!("\nmedian of round medians:");
    let mut summary = serde_json::Map::new();
    for i in 0..3 {
        let m50 = median(&mut p50[i]);
        let m99 = median(&mut p99[i]);
        println!(
            "{:<26} p50 {:>7.1} µs  p99 {:>7.1} µs  ratio to raw {:>5.2}×",
            names[i],
            m50,
            m99,
            m50 / base
        );
        summary.insert(
            names[i].into(),
            json!({"p50_us": m50, "p99_us": m99, "ratio_to_raw": m50 / base}),
        );
    }
    println!("{}", Value::Object(summary));
    multi.block_on(pool_mt.shutdown());
    single.block_on(pool_ct.shutdown());
}
