//! The cost of running a DSPy program through the pool: `execute_program` of a chain of
//! thought with DummyLM through a session, against the same program called directly in
//! a Python process (same DSPy, same DummyLM, same per-call `dspy.context`), in one run.
//!
//! `cargo bench --bench dspy_overhead` (env: `CALLS`, `ROUNDS`, `SNAKEPOOL_PYTHON` — an
//! interpreter with DSPy; `./scripts/python-env.sh` prints one).
//!
//! Cores: the host and the workers are pinned to CPU 0 and the direct Python run too,
//! so both paths run on one warm core.

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use snakepool::Pool;
use snakepool::dspy::{Dspy, Lm, ProgramKind};

mod support;

use support::env_usize;

const DIRECT: &str = r#"
import json, os, sys, time
os.sched_setaffinity(0, {0})
import dspy
from dspy.utils.dummies import DummyLM
calls, rounds = int(sys.argv[1]), int(sys.argv[2])
lm = DummyLM({"What is 2 plus 3?": {"reasoning": "2 + 3 = 5", "answer": "5"}})
program = dspy.ChainOfThought("question -> answer: int")
def once():
    with dspy.context(lm=lm, track_usage=True, disable_history=True):
        return program(question="What is 2 plus 3?")
for _ in range(200):
    once()
medians = []
for _ in range(rounds):
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        once()
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    medians.append(samples[len(samples) // 2])
print(json.dumps(medians))
"#;

fn pin_host() {
    support::set_affinity(0, &[0]);
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    pin_host();
    let python = std::env::var("SNAKEPOOL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").to_owned());
    let calls = env_usize("CALLS", 2000);
    let rounds = env_usize("ROUNDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let pool_medians: Vec<f64> = runtime.block_on(async {
        let pool = Pool::builder()
            .workers(1)
            .python(&python)
            .module("snakepool_worker.dspy")
            .preload("dspy")
            .health_interval(None)
            .start()
            .await
            .expect("pool starts");
        let dspy = Dspy::new(pool.session("bench"));
        let mut answers = serde_json::Map::new();
        answers.insert(
            "What is 2 plus 3?".into(),
            json!({"reasoning": "2 + 3 = 5", "answer": "5"}),
        );
        dspy.configure_lm(&Lm::dummy_by_prompt(answers))
            .await
            .unwrap();
        let program = dspy
            .create_program("question -> answer: int", ProgramKind::ChainOfThought)
            .await
            .unwrap();
        let inputs = json!({"question": "What is 2 plus 3?"});
        for _ in 0..200 {
            program.call::<_, Value>(&inputs).await.unwrap();
        }
        let mut medians = Vec::new();
        for _ in 0..rounds {
            let mut samples = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                program.call::<_, Value>(&inputs).await.unwrap();
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
            medians.push(median(&mut samples));
        }
        pool.shutdown().await;
        medians
    });

    let output = Command::new(&python)
        .args(["-c", DIRECT, &calls.to_string(), &rounds.to_string()])
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "direct run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let direct_medians: Vec<f64> = serde_json::from_slice(&output.stdout).unwrap();

    println!("ChainOfThought + DummyLM, {rounds} rounds × {calls} calls, all on CPU 0");
    println!("{:<34} round medians (µs)", "path");
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("{:<34} {}", "direct in Python", show(&direct_medians));
    println!(
        "{:<34} {}",
        "execute_program through the pool",
        show(&pool_medians)
    );
    let direct = median(&mut direct_medians.clone());
    let pooled = median(&mut pool_medians.clone());
    println!(
        "median: direct {direct:.0} µs, pool {pooled:.0} µs, overhead {:.0} µs ({:.2}×)",
        pooled - direct,
        pooled / direct
    );
    println!(
        "{}",
        json!({"direct_us": direct, "pool_us": pooled, "overhead_us": pooled - direct, "ratio": pooled / direct})
    );
}
