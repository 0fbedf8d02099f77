//! Side-by-side benchmarks of snakepool, every figure measured in one process run,
//! written to `BENCHMARKS.md` and `docs/bench/*.png`.
//!
//! `scripts/benchmarks.sh` sets up the Python environment and runs this as
//! `cargo bench --bench compare`. It compares:
//!
//! 1. a `ping` through the pool with a hand-written blocking pipe round trip to the
//!    same worker runtime (the pool's own overhead);
//! 2. snakepool with Python's `concurrent.futures.ProcessPoolExecutor` on the same tiny
//!    task: throughput with concurrent callers, and serial latency;
//! 3. a DSPy chain of thought (DummyLM) through `execute_program` with the same program
//!    called in-process in Python;
//! 4. the start-up of N DSPy workers one by one, in parallel, and forked from a
//!    zygote, against `python -c "import dspy"`;
//! 5. throughput as the number of workers grows;
//! 6. CPU time per call of the host and the workers, with quick calls sent ahead and
//!    without, and through `snakepool serve` (`cpu_per_call`).
//!
//! The paths being compared alternate (latency rounds in slices, throughput rounds
//! whole), so drift on this noisy VM hits them alike. Settings come from the environment (see [`SETTINGS`]); the Python side runs
//! `benches/python/*.py` under `$SNAKEPOOL_PYTHON`, an interpreter with DSPy.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Value, json};
use snakepool::dspy::{Dspy, Lm, Program, ProgramKind};
use snakepool::{Pool, SpawnMode};
use support::RawWorker;
use tokio::runtime::Runtime;

mod cpu_per_call;
mod support;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the section `scripts/lm-serving-bench.sh` writes begins in `BENCHMARKS.md`.
const LM_SERVING_MARKER: &str = "<!-- lm-serving:";
const HANDLERS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python");
const PPE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/ppe_bench.py");
const DSPY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/dspy_direct.py");
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
const QUESTION: &str = "What is 2 plus 3?";
/// Workers of the pools compared with the ProcessPoolExecutor.
const VERSUS_WORKERS: usize = 2;

/// The tunable settings: environment variable, default, meaning.
const SETTINGS: &[(&str, &str, &str)] = &[
    ("BENCH_ROUNDS", "5", "rounds of every cheap measurement"),
    (
        "BENCH_SLICES",
        "10",
        "slices a latency round is cut into, alternating paths (1-3)",
    ),
    ("BENCH_PINGS", "5000", "pings per round (1)"),
    (
        "BENCH_SERIAL_CALLS",
        "2000",
        "calls per serial-latency round (2)",
    ),
    ("BENCH_CALLERS", "8", "concurrent callers (2)"),
    (
        "BENCH_POOL_CALLS",
        "20000",
        "snakepool calls per throughput round (2)",
    ),
    (
        "BENCH_PPE_TASKS",
        "10000",
        "ProcessPoolExecutor tasks per round (2)",
    ),
    ("BENCH_DSPY_CALLS", "1000", "DSPy calls per round (3)"),
    ("BENCH_STARTUP_ROUNDS", "3", "rounds of every start-up (4)"),
    ("BENCH_STARTUP_WORKERS", "4,8", "pool sizes started (4)"),
    ("BENCH_SCALE_WORKERS", "1,2,4,8", "pool sizes (5)"),
    ("BENCH_SCALE_CALLERS", "16", "concurrent callers (5)"),
    (
        "BENCH_SCALE_CALLS",
        "10000",
        "snakepool calls per round (5)",
    ),
    (
        "BENCH_SCALE_PPE_TASKS",
        "5000",
        "ProcessPoolExecutor tasks per round (5)",
    ),
    ("BENCH_CPU_CALLERS", "32", "concurrent callers (6)"),
    ("BENCH_CPU_CALLS", "100000", "calls per pool round (6)"),
    ("BENCH_HTTP_CALLS", "40000", "calls per HTTP round (6)"),
];

const SNAKE: RGBColor = RGBColor(31, 119, 180);
const SNAKE_LIGHT: RGBColor = RGBColor(120, 175, 215);
const PPE: RGBColor = RGBColor(255, 127, 14);
const PPE_LIGHT: RGBColor = RGBColor(253, 174, 107);
const BASELINE: RGBColor = RGBColor(140, 140, 140);
const ONE_BY_ONE: RGBColor = RGBColor(214, 39, 40);

type PlotResult = Result<(), Box<dyn Error>>;

// ---------------------------------------------------------------------------------
// Settings and the machine
// ---------------------------------------------------------------------------------

/// What to measure and how much of it.
struct Settings {
    python: String,
    cpus: usize,
    rounds: usize,
    slices: usize,
    pings: usize,
    serial_calls: usize,
    callers: usize,
    pool_calls: usize,
    ppe_tasks: usize,
    dspy_calls: usize,
    startup_rounds: usize,
    startup_workers: Vec<usize>,
    scale_workers: Vec<usize>,
    scale_callers: usize,
    scale_calls: usize,
    scale_ppe_tasks: usize,
    cpu_callers: usize,
    cpu_calls: usize,
    http_calls: usize,
}

/// The value of setting `name`: the environment's, else its default in [`SETTINGS`].
fn setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        SETTINGS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, default, _)| (*default).to_owned())
            .expect("a known setting")
    })
}

/// Setting `name` as a positive number.
fn count(name: &str) -> usize {
    let value = setting(name);
    match value.parse::<usize>() {
        Ok(n) if n > 0 => n,
        _ => panic!("{name}={value}: expected a positive number"),
    }
}

/// Setting `name` as a comma-separated list of positive numbers.
fn counts(name: &str) -> Vec<usize> {
    let value = setting(name);
    value
        .split(',')
        .map(|part| match part.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{name}={value}: expected positive numbers separated by commas"),
        })
        .collect()
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            python: std::env::var("SNAKEPOOL_PYTHON")
                .unwrap_or_else(|_| format!("{ROOT}/.venv/bin/python")),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            rounds: count("BENCH_ROUNDS"),
            slices: count("BENCH_SLICES"),
            pings: count("BENCH_PINGS"),
            serial_calls: count("BENCH_SERIAL_CALLS"),
            callers: count("BENCH_CALLERS"),
            pool_calls: count("BENCH_POOL_CALLS"),
            ppe_tasks: count("BENCH_PPE_TASKS"),
            dspy_calls: count("BENCH_DSPY_CALLS"),
            startup_rounds: count("BENCH_STARTUP_ROUNDS"),
            startup_workers: counts("BENCH_STARTUP_WORKERS"),
            scale_workers: counts("BENCH_SCALE_WORKERS"),
            scale_callers: count("BENCH_SCALE_CALLERS"),
            scale_calls: count("BENCH_SCALE_CALLS"),
            scale_ppe_tasks: count("BENCH_SCALE_PPE_TASKS"),
            cpu_callers: count("BENCH_CPU_CALLERS"),
            cpu_calls: count("BENCH_CPU_CALLS"),
            http_calls: count("BENCH_HTTP_CALLS"),
        }
    }

    /// Every CPU of the machine.
    fn all_cpus(&self) -> Vec<usize> {
        (0..self.cpus).collect()
    }
}

/// The machine and software the figures were measured on.
struct Machine {
    cpu_model: String,
    memory: String,
    kernel: String,
    python: String,
    dspy: String,
    rustc: String,
    commit: String,
    date: String,
    load_before: String,
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The first line of a command's output, or `unknown`.
fn output_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The value of `key` in a `key : value` file such as `/proc/cpuinfo`.
fn proc_field(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Machine {
    fn probe(python: &str) -> Machine {
        let versions = output_line(
            python,
            &[
                "-c",
                "import sys, importlib.metadata as m; print(sys.version.split()[0], m.version('dspy'))",
            ],
        );
        let (py, dspy) = versions
            .split_once(' ')
            .map_or((versions.clone(), "unknown".to_owned()), |(a, b)| {
                (a.to_owned(), b.to_owned())
            });
        let dirty = !output_line("git", &["status", "--porcelain"]).eq("unknown");
        let commit = output_line("git", &["rev-parse", "--short", "HEAD"]);
        Machine {
            cpu_model: proc_field("/proc/cpuinfo", "model name"),
            memory: proc_field("/proc/meminfo", "MemTotal"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            python: py,
            dspy,
            rustc: output_line("rustc", &["--version"]),
            commit: if dirty {
                format!("{commit} with local changes")
            } else {
                commit
            },
            date: output_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_before: load_average(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------

/// One figure, one value per round.
#[derive(Clone, Debug, Default)]
struct Rounds(Vec<f64>);

impl Rounds {
    fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut values = self.0.clone();
        values.sort_by(f64::total_cmp);
        values
    }

    /// The median (the upper one for an even count).
    fn median(&self) -> f64 {
        let values = self.sorted();
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// The values in measurement order, formatted by `format`.
    fn list(&self, format: fn(f64) -> String) -> String {
        self.0
            .iter()
            .map(|v| format(*v))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The p50 and p99 latency of each round, in µs.
#[derive(Clone, Debug, Default)]
struct Latency {
    p50: Rounds,
    p99: Rounds,
}

impl Latency {
    /// Adds a round from its raw samples (µs).
    fn push_samples(&mut self, mut samples: Vec<f64>) {
        samples.sort_by(f64::total_cmp);
        self.p50.push(quantile(&samples, 0.5));
        self.p99.push(quantile(&samples, 0.99));
    }
}

/// The `samples_us` list of a helper's answer.
fn samples(answer: &Value) -> Vec<f64> {
    answer["samples_us"]
        .as_array()
        .unwrap_or_else(|| panic!("no `samples_us` in {answer}"))
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

/// A latency path: makes the given number of calls, returns each one's µs.
type Caller<'a> = Box<dyn FnMut(usize) -> Vec<f64> + 'a>;

/// One round of `calls` calls per path, cut into `slices` slices that alternate
/// between the paths, so that noise on the machine hits every path alike; each path's
/// samples.
fn interleaved(calls: usize, slices: usize, paths: &mut [Caller]) -> Vec<Vec<f64>> {
    let mut out = vec![Vec::with_capacity(calls); paths.len()];
    let per_slice = calls.div_ceil(slices);
    for _ in 0..slices {
        for (samples, path) in out.iter_mut().zip(paths.iter_mut()) {
            samples.extend(path(per_slice));
        }
    }
    out
}

/// Adds one round of `interleaved` samples to each latency.
fn push_round(latencies: &mut [&mut Latency], rounds: Vec<Vec<f64>>) {
    for (latency, samples) in latencies.iter_mut().zip(rounds) {
        latency.push_samples(samples);
    }
}

/// The q-quantile of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// Field `key` of a helper's answer as a number.
fn number(answer: &Value, key: &str) -> f64 {
    answer[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {answer}"))
}

fn secs_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

fn micros_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------
// Cores, runtimes, processes
// ---------------------------------------------------------------------------------

/// Restricts the main thread to `cpus`; every thread and process started from it
/// afterwards (runtimes, their workers, helpers) inherits that.
fn confine_host(cpus: &[usize]) {
    support::set_affinity(0, cpus);
}

/// Pins every worker of `pool` to `cpus`.
fn pin_workers(pool: &Pool, cpus: &[usize]) {
    for worker in pool.status().workers {
        support::set_affinity(worker.pid, cpus);
    }
}

/// A two-thread runtime, as `#[tokio::main]` gives on this machine.
fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The builder of a pool of `workers` workers running the bench's commands
/// (`compare_handlers`), forked from a zygote, without health pings.
fn compare_pool(python: &str, workers: usize) -> snakepool::PoolBuilder {
    Pool::builder()
        .workers(workers)
        .python(python)
        .python_path(HANDLERS_DIR)
        .module("compare_handlers")
        .spawn_mode(SpawnMode::Zygote)
        .health_interval(None)
}

/// A pool of `workers` workers with the `add` command, forked from a zygote.
async fn plain_pool(python: &str, workers: usize) -> Pool {
    compare_pool(python, workers)
        .start()
        .await
        .expect("pool starts")
}

/// A pool of `workers` DSPy workers with DSPy preloaded.
async fn dspy_pool(python: &str, workers: usize, mode: SpawnMode) -> Pool {
    Pool::builder()
        .workers(workers)
        .python(python)
        .module("snakepool_worker.dspy")
        .preload("dspy")
        .spawn_mode(mode)
        .health_interval(None)
        .start()
        .await
        .expect("DSPy pool starts")
}

/// A Python helper script that answers each JSON request line with one JSON line.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn start(python: &str, script: &str) -> Helper {
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} {script}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Helper {
            child,
            stdin,
            stdout,
        }
    }

    /// The next answer line.
    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("helper output");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("helper answered {line:?}"))
    }

    fn ask(&mut self, request: &Value) -> Value {
        let stdin = self.stdin.as_mut().expect("helper running");
        writeln!(stdin, "{request}").expect("helper input");
        stdin.flush().expect("helper input");
        self.read()
    }
}

impl Drop for Helper {
    /// Closes the helper's input, which ends it (and its executors) cleanly.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------

/// `n` calls of `add` one at a time; per-call latency in µs.
async fn serial_adds(pool: &Pool, n: usize) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let sum = pool.call("add", json!({"a": i, "b": 1})).await.unwrap();
        samples.push(micros_since(started));
        assert_eq!(sum, json!(i + 1));
    }
    samples
}

/// `n` pings one at a time; per-call latency in µs.
async fn serial_pings(pool: &Pool, n: usize) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        pool.call("ping", json!({})).await.unwrap();
        samples.push(micros_since(started));
    }
    samples
}

/// One caller: calls `command` until `calls` calls have been claimed.
async fn caller(pool: Pool, command: &'static str, next: Arc<AtomicUsize>, calls: usize) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= calls {
            return;
        }
        if command == "add" {
            let sum = pool.call("add", json!({"a": i, "b": 1})).await.unwrap();
            assert_eq!(sum, json!(i + 1));
        } else {
            pool.call(command, json!({})).await.unwrap();
        }
    }
}

/// `calls` calls of `command` made by `callers` tokio tasks in a closed loop; calls/s.
async fn throughput(pool: &Pool, command: &'static str, callers: usize, calls: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| tokio::spawn(caller(pool.clone(), command, next.clone(), calls)))
        .collect();
    for task in tasks {
        task.await.expect("caller finished");
    }
    calls as f64 / secs_since(started)
}

fn ppe_serial(workers: usize, calls: usize) -> Value {
    json!({"op": "serial", "workers": workers, "task": "add", "calls": calls})
}

fn ppe_throughput(workers: usize, task: &str, mode: &str, tasks: usize, callers: usize) -> Value {
    json!({"op": "throughput", "workers": workers, "task": task, "mode": mode,
           "tasks": tasks, "concurrency": callers})
}

// ---------------------------------------------------------------------------------
// 1. Ping round trip: raw pipe against the pool
// ---------------------------------------------------------------------------------

/// `n` pings over a raw pipe; per-call latency in µs.
fn raw_pings(raw: &mut RawWorker, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let started = Instant::now();
            raw.round_trip("ping", json!({}));
            micros_since(started)
        })
        .collect()
}
/// Section 1's figures: raw pipe, pool on a current-thread runtime, pool on a
/// multi-thread runtime.
struct RoundTrip {
    raw: Latency,
    current: Latency,
    multi: Latency,
}

fn measure_roundtrip(s: &Settings) -> RoundTrip {
    confine_host(&[0]);
    let mut raw = RawWorker::start(
        &s.python,
        &format!("{ROOT}/python:{HANDLERS_DIR}"),
        &["compare_handlers"],
    );
    let (multi, current) = (multi_thread(), current_thread());
    let pool_multi = multi.block_on(plain_pool(&s.python, 1));
    let pool_current = current.block_on(plain_pool(&s.python, 1));
    pin_workers(&pool_multi, &[0]);
    pin_workers(&pool_current, &[0]);
    raw_pings(&mut raw, 1000);
    multi.block_on(serial_pings(&pool_multi, 1000));
    current.block_on(serial_pings(&pool_current, 1000));
    let mut out = RoundTrip {
        raw: Latency::default(),
        current: Latency::default(),
        multi: Latency::default(),
    };
    for round in 1..=s.rounds {
        let mut paths: [Caller; 3] = [
            Box::new(|n| raw_pings(&mut raw, n)),
            Box::new(|n| multi.block_on(serial_pings(&pool_multi, n))),
            Box::new(|n| current.block_on(serial_pings(&pool_current, n))),
        ];
        let samples = interleaved(s.pings, s.slices, &mut paths);
        push_round(
            &mut [&mut out.raw, &mut out.multi, &mut out.current],
            samples,
        );
        println!(
            "  round {round}: raw {:.1} µs, pool current-thread {:.1} µs, multi-thread {:.1} µs",
            last(&out.raw.p50),
            last(&out.current.p50),
            last(&out.multi.p50)
        );
    }
    multi.block_on(pool_multi.shutdown());
    current.block_on(pool_current.shutdown());
    out
}

fn last(rounds: &Rounds) -> f64 {
    rounds.0.last().copied().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------
// 2. snakepool against ProcessPoolExecutor
// ---------------------------------------------------------------------------------

/// The throughput paths of section 2, in table order, for `callers` callers.
fn versus_paths(callers: usize) -> [String; 4] {
    [
        format!("snakepool: {callers} tokio tasks, each `pool.call` in a loop"),
        format!("ProcessPoolExecutor: {callers} tasks kept in flight by one thread"),
        format!("ProcessPoolExecutor: {callers} threads, each `submit().result()` in a loop"),
        "ProcessPoolExecutor: all tasks submitted at once, then waited for".to_owned(),
    ]
}
const PPE_MODES: [&str; 3] = ["window", "threads", "burst"];

/// Section 2's figures: serial latency ([snakepool, PPE]) pinned to CPU 0 and on both
/// cores, and throughput per [`versus_paths`] entry on both cores.
struct Versus {
    serial_pinned: [Latency; 2],
    serial_spread: [Latency; 2],
    throughput: [Rounds; 4],
}

/// A snakepool pool and a ProcessPoolExecutor helper started on the same CPUs.
struct Contenders {
    runtime: Runtime,
    pool: Pool,
    ppe: Helper,
}

impl Contenders {
    fn start(s: &Settings, cpus: &[usize]) -> Contenders {
        confine_host(cpus);
        let runtime = multi_thread();
        let pool = runtime.block_on(plain_pool(&s.python, VERSUS_WORKERS));
        pin_workers(&pool, cpus);
        let mut ppe = Helper::start(&s.python, PPE_SCRIPT);
        runtime.block_on(serial_adds(&pool, 1000));
        ppe.ask(&ppe_serial(VERSUS_WORKERS, 1000));
        Contenders { runtime, pool, ppe }
    }

    /// One serial round each: [snakepool, PPE].
    fn serial_round(&mut self, s: &Settings, out: &mut [Latency; 2]) {
        let (runtime, pool, ppe) = (&self.runtime, &self.pool, &mut self.ppe);
        let mut paths: [Caller; 2] = [
            Box::new(|n| runtime.block_on(serial_adds(pool, n))),
            Box::new(|n| samples(&ppe.ask(&ppe_serial(VERSUS_WORKERS, n)))),
        ];
        let samples = interleaved(s.serial_calls, s.slices, &mut paths);
        let [a, b] = out;
        push_round(&mut [a, b], samples);
    }

    /// One throughput round of every path in [`versus_paths`].
    fn throughput_round(&mut self, s: &Settings, out: &mut [Rounds; 4]) {
        out[0].push(
            self.runtime
                .block_on(throughput(&self.pool, "add", s.callers, s.pool_calls)),
        );
        for (k, mode) in PPE_MODES.iter().enumerate() {
            let request = ppe_throughput(VERSUS_WORKERS, "add", mode, s.ppe_tasks, s.callers);
            out[k + 1].push(number(&self.ppe.ask(&request), "per_s"));
        }
    }

    fn stop(self) {
        self.runtime.block_on(self.pool.shutdown());
    }
}

fn measure_versus(s: &Settings) -> Versus {
    let mut out = Versus {
        serial_pinned: Default::default(),
        serial_spread: Default::default(),
        throughput: Default::default(),
    };
    let mut pinned = Contenders::start(s, &[0]);
    for _ in 0..s.rounds {
        pinned.serial_round(s, &mut out.serial_pinned);
    }
    pinned.stop();
    let mut spread = Contenders::start(s, &s.all_cpus());
    spread.throughput_round(s, &mut Default::default());
    for round in 1..=s.rounds {
        spread.serial_round(s, &mut out.serial_spread);
        spread.throughput_round(s, &mut out.throughput);
        println!(
            "  round {round}: serial p50 snakepool {:.0} µs, PPE {:.0} µs; throughput snakepool {:.0}/s, PPE {:.0}/s",
            last(&out.serial_spread[0].p50),
            last(&out.serial_spread[1].p50),
            last(&out.throughput[0]),
            last(&out.throughput[1])
        );
    }
    spread.stop();
    out
}

// ---------------------------------------------------------------------------------
// 3. DSPy through the pool against DSPy in-process
// ---------------------------------------------------------------------------------

/// Section 3's figures.
struct DspyOverhead {
    pool: Latency,
    direct: Latency,
}

/// The chain of thought with its DummyLM, created in a session of `pool`.
async fn dspy_program(pool: &Pool) -> Program {
    let dspy = Dspy::new(pool.session("bench"));
    let mut answers = serde_json::Map::new();
    answers.insert(
        QUESTION.into(),
        json!({"reasoning": "2 + 3 = 5", "answer": "5"}),
    );
    dspy.configure_lm(&Lm::dummy_by_prompt(answers))
        .await
        .expect("configure_lm");
    dspy.create_program("question -> answer: int", ProgramKind::ChainOfThought)
        .await
        .expect("create_program")
}

/// `n` calls of `program`; per-call latency in µs.
async fn dspy_calls(program: &Program, n: usize) -> Vec<f64> {
    let inputs = json!({"question": QUESTION});
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let prediction = program
            .call::<_, Value>(&inputs)
            .await
            .expect("a prediction");
        samples.push(micros_since(started));
        assert_eq!(prediction.outputs["answer"], json!(5));
    }
    samples
}

fn measure_dspy(s: &Settings) -> DspyOverhead {
    confine_host(&[0]);
    let mut direct = Helper::start(&s.python, DSPY_SCRIPT);
    direct.read();
    let runtime = multi_thread();
    let pool = runtime.block_on(dspy_pool(&s.python, 1, SpawnMode::Fresh));
    pin_workers(&pool, &[0]);
    let program = runtime.block_on(dspy_program(&pool));
    runtime.block_on(dspy_calls(&program, 200));
    let mut out = DspyOverhead {
        pool: Latency::default(),
        direct: Latency::default(),
    };
    for round in 1..=s.rounds {
        let mut paths: [Caller; 2] = [
            Box::new(|n| runtime.block_on(dspy_calls(&program, n))),
            Box::new(|n| samples(&direct.ask(&json!(n)))),
        ];
        let samples = interleaved(s.dspy_calls, s.slices, &mut paths);
        push_round(&mut [&mut out.pool, &mut out.direct], samples);
        println!(
            "  round {round}: through the pool {:.0} µs, direct {:.0} µs",
            last(&out.pool.p50),
            last(&out.direct.p50)
        );
    }
    runtime.block_on(pool.shutdown());
    out
}

// ---------------------------------------------------------------------------------
// 4. Start-up of DSPy workers
// ---------------------------------------------------------------------------------

/// The start-up strategies, in table order.
const STRATEGIES: [&str; 3] = [
    "one by one (fresh, each after the last is ready)",
    "snakepool fresh (all at once)",
    "snakepool zygote (forked)",
];

/// Start-up times (ms) of one pool size, per [`STRATEGIES`] entry.
struct StartupSize {
    workers: usize,
    strategies: [Rounds; 3],
}

/// Section 4's figures.
struct Startup {
    import_ms: Rounds,
    sizes: Vec<StartupSize>,
}

/// Milliseconds of `python -c "import dspy"`.
fn import_dspy_ms(python: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new(python)
        .args(["-c", "import dspy"])
        .status()
        .expect("python runs");
    assert!(status.success(), "`import dspy` failed");
    secs_since(started) * 1000.0
}

/// `n` one-worker pools, each started after the previous one is ready; ms until the
/// last is ready.
async fn start_one_by_one(python: &str, n: usize) -> f64 {
    let started = Instant::now();
    let mut pools = Vec::with_capacity(n);
    for _ in 0..n {
        pools.push(dspy_pool(python, 1, SpawnMode::Fresh).await);
    }
    let ms = secs_since(started) * 1000.0;
    futures::future::join_all(pools.iter().map(Pool::shutdown)).await;
    ms
}

/// One pool of `n` workers; ms until all are ready. Notes a zygote that did not serve.
async fn start_pool(python: &str, n: usize, mode: SpawnMode, notes: &mut Vec<String>) -> f64 {
    let started = Instant::now();
    let pool = dspy_pool(python, n, mode).await;
    let ms = secs_since(started) * 1000.0;
    if mode == SpawnMode::Zygote && pool.zygote_pid().is_none() {
        let problem = pool.zygote_status().problem.unwrap_or_default();
        notes.push(format!(
            "a zygote pool of {n} started its workers fresh: {problem}"
        ));
    }
    pool.shutdown().await;
    ms
}

fn measure_startup(s: &Settings, notes: &mut Vec<String>) -> Startup {
    confine_host(&s.all_cpus());
    let runtime = multi_thread();
    let mut out = Startup {
        import_ms: Rounds::default(),
        sizes: s
            .startup_workers
            .iter()
            .map(|&workers| StartupSize {
                workers,
                strategies: Default::default(),
            })
            .collect(),
    };
    for round in 1..=s.startup_rounds {
        out.import_ms.push(import_dspy_ms(&s.python));
        for size in &mut out.sizes {
            let n = size.workers;
            let [one, fresh, zygote] = &mut size.strategies;
            one.push(runtime.block_on(start_one_by_one(&s.python, n)));
            fresh.push(runtime.block_on(start_pool(&s.python, n, SpawnMode::Fresh, notes)));
            zygote.push(runtime.block_on(start_pool(&s.python, n, SpawnMode::Zygote, notes)));
            println!(
                "  round {round}, {n} workers: one by one {:.0} ms, fresh {:.0} ms, zygote {:.0} ms",
                last(one),
                last(fresh),
                last(zygote)
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// 5. Throughput as workers grow
// ---------------------------------------------------------------------------------

/// Section 5's figures: calls/s per pool size, snakepool and ProcessPoolExecutor.
struct Scaling {
    workers: Vec<usize>,
    snakepool: Vec<Rounds>,
    ppe: Vec<Rounds>,
}

fn measure_scaling(s: &Settings) -> Scaling {
    confine_host(&s.all_cpus());
    let runtime = multi_thread();
    let pools: Vec<Pool> = s
        .scale_workers
        .iter()
        .map(|&w| runtime.block_on(plain_pool(&s.python, w)))
        .collect();
    let mut ppe = Helper::start(&s.python, PPE_SCRIPT);
    let k = pools.len();
    let mut out = Scaling {
        workers: s.scale_workers.clone(),
        snakepool: vec![Rounds::default(); k],
        ppe: vec![Rounds::default(); k],
    };
    for (pool, &w) in pools.iter().zip(&s.scale_workers) {
        runtime.block_on(throughput(pool, "ping", s.scale_callers, 2000));
        ppe.ask(&ppe_throughput(w, "ping", "window", 1000, s.scale_callers));
    }
    for round in 1..=s.rounds {
        for (i, (pool, &w)) in pools.iter().zip(&s.scale_workers).enumerate() {
            let calls = s.scale_calls;
            out.snakepool[i].push(runtime.block_on(throughput(
                pool,
                "ping",
                s.scale_callers,
                calls,
            )));
            let request = ppe_throughput(w, "ping", "window", s.scale_ppe_tasks, s.scale_callers);
            out.ppe[i].push(number(&ppe.ask(&request), "per_s"));
        }
        let line: Vec<String> = (0..k)
            .map(|i| {
                format!(
                    "{}w {:.0}/{:.0}",
                    s.scale_workers[i],
                    last(&out.snakepool[i]),
                    last(&out.ppe[i])
                )
            })
            .collect();
        println!(
            "  round {round} (snakepool/PPE calls/s): {}",
            line.join(", ")
        );
    }
    for pool in &pools {
        runtime.block_on(pool.shutdown());
    }
    out
}

// ---------------------------------------------------------------------------------
// Number formatting
// ---------------------------------------------------------------------------------

/// µs with one decimal below 100, none above.
fn fmt_us(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// A whole number with thousands separators.
fn fmt_int(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// Seconds with two decimals, from ms.
fn fmt_s(ms: f64) -> String {
    format!("{:.2}", ms / 1000.0)
}

/// An axis tick: whole numbers with separators, fractions with one decimal.
fn fmt_tick(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        fmt_int(v)
    } else {
        format!("{v:.1}")
    }
}

fn fmt_ratio(v: f64) -> String {
    format!("{v:.2}×")
}

// ---------------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------------

/// Loads the DejaVu fonts for the plots' text; fails early, before any measurement.
fn register_fonts() {
    let font = std::env::var("BENCH_FONT").unwrap_or_else(|_| FONT.to_owned());
    let load = |path: &str| -> &'static [u8] {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("font {path}: {e} (set BENCH_FONT to a .ttf file)"));
        Box::leak(bytes.into_boxed_slice())
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, load(&font))
        .unwrap_or_else(|_| panic!("{font} is not a usable font"));
    if Path::new(FONT_BOLD).exists() {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, load(FONT_BOLD));
    }
}

/// One horizontal bar: the median, the spread of the rounds, and a label after it.
struct Bar {
    label: String,
    rounds: Rounds,
    color: RGBColor,
    text: String,
}

/// A chart of horizontal bars, first bar on top, with an optional vertical line.
struct BarPanel<'a> {
    title: &'a str,
    axis: &'a str,
    bars: Vec<Bar>,
    reference: Option<f64>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn title_font(size: u32) -> FontDesc<'static> {
    ("sans-serif", size).into_font().style(FontStyle::Bold)
}

fn text_style(size: u32, h: HPos) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", size).into_font()).pos(Pos::new(h, VPos::Center))
}

/// A new PNG at `path`, white, of `size` pixels.
fn canvas(path: &Path, size: (u32, u32)) -> Result<Area<'_>, Box<dyn Error>> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    Ok(root)
}

fn draw_bars(area: &Area, panel: &BarPanel) -> PlotResult {
    let n = panel.bars.len() as i32;
    let right = panel
        .bars
        .iter()
        .map(|b| b.rounds.max())
        .chain(panel.reference)
        .fold(0.0, f64::max)
        * 1.42;
    let labels: Vec<String> = panel.bars.iter().rev().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, title_font(20))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(330)
        .build_cartesian_2d(0f64..right, (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n as usize)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|x| fmt_tick(*x))
        .x_desc(panel.axis)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (i, bar) in panel.bars.iter().enumerate() {
        draw_bar(&mut chart, n - 1 - i as i32, bar, right)?;
    }
    if let Some(x) = panel.reference {
        draw_reference(&mut chart, x)?;
    }
    Ok(())
}

type BarChart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<RangedCoordf64, SegmentedCoord<RangedCoordi32>>,
>;

fn draw_bar(chart: &mut BarChart, y: i32, bar: &Bar, right: f64) -> PlotResult {
    let median = bar.rounds.median();
    let mut rect = Rectangle::new(
        [
            (0.0, SegmentValue::Exact(y)),
            (median, SegmentValue::Exact(y + 1)),
        ],
        bar.color.filled(),
    );
    rect.set_margin(7, 7, 0, 0);
    let center = SegmentValue::CenterOf(y);
    let (lo, hi) = (bar.rounds.min(), bar.rounds.max());
    let spread = PathElement::new(
        vec![(lo, center.clone()), (hi, center.clone())],
        BLACK.stroke_width(2),
    );
    let text = Text::new(
        bar.text.clone(),
        (hi.max(median) + right * 0.012, center),
        text_style(15, HPos::Left),
    );
    chart.draw_series(std::iter::once(rect))?;
    chart.draw_series(std::iter::once(spread))?;
    chart.draw_series(std::iter::once(text))?;
    Ok(())
}

fn draw_reference(chart: &mut BarChart, x: f64) -> PlotResult {
    let line = DashedPathElement::new(
        vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Last)],
        6,
        4,
        BLACK.stroke_width(2),
    );
    chart.draw_series(std::iter::once(line))?;
    Ok(())
}

/// A bar whose text is its median and its ratio to `base`.
fn ratio_bar(label: &str, rounds: &Rounds, base: f64, unit: &str, color: RGBColor) -> Bar {
    let median = rounds.median();
    let value = if unit == "/s" {
        format!("{}/s", fmt_int(median))
    } else {
        format!("{} {unit}", fmt_us(median))
    };
    Bar {
        label: label.to_owned(),
        rounds: rounds.clone(),
        color,
        text: format!("{value}  ({})", fmt_ratio(median / base)),
    }
}

fn plot_latency(path: &Path, rt: &RoundTrip, dspy: &DspyOverhead) -> PlotResult {
    let root = canvas(path, (1100, 640))?;
    let (top, bottom) = root.split_vertically(360);
    let raw = rt.raw.p50.median();
    draw_bars(
        &top,
        &BarPanel {
            title: "Ping round trip, p50 (host and worker on CPU 0)",
            axis: "µs per call (median of rounds; whisker: min–max of rounds)",
            bars: vec![
                ratio_bar("raw blocking pipe", &rt.raw.p50, raw, "µs", BASELINE),
                ratio_bar(
                    "pool, current-thread runtime",
                    &rt.current.p50,
                    raw,
                    "µs",
                    SNAKE_LIGHT,
                ),
                ratio_bar(
                    "pool, multi-thread runtime",
                    &rt.multi.p50,
                    raw,
                    "µs",
                    SNAKE,
                ),
            ],
            reference: None,
        },
    )?;
    let direct = dspy.direct.p50.median();
    draw_bars(
        &bottom,
        &BarPanel {
            title: "DSPy ChainOfThought + DummyLM, p50 (all on CPU 0)",
            axis: "µs per call (median of rounds; whisker: min–max of rounds)",
            bars: vec![
                ratio_bar(
                    "in-process Python",
                    &dspy.direct.p50,
                    direct,
                    "µs",
                    BASELINE,
                ),
                ratio_bar(
                    "execute_program through the pool",
                    &dspy.pool.p50,
                    direct,
                    "µs",
                    SNAKE,
                ),
            ],
            reference: None,
        },
    )?;
    root.present()?;
    Ok(())
}

fn plot_versus(path: &Path, v: &Versus, callers: usize) -> PlotResult {
    let root = canvas(path, (1100, 760))?;
    let (top, bottom) = root.split_vertically(380);
    let base = v.throughput[0].median();
    let labels = [
        format!("snakepool, {callers} tokio tasks"),
        format!("PPE, {callers} in flight"),
        format!("PPE, {callers} threads"),
        "PPE, all submitted at once".to_owned(),
    ];
    let colors = [SNAKE, PPE, PPE_LIGHT, PPE_LIGHT];
    let bars = (0..4)
        .map(|i| ratio_bar(&labels[i], &v.throughput[i], base, "/s", colors[i]))
        .collect();
    let title =
        format!("Throughput of add, {VERSUS_WORKERS} workers, both cores (ratio to snakepool)");
    draw_bars(
        &top,
        &BarPanel {
            title: &title,
            axis: "calls per second (median of rounds; whisker: min–max)",
            bars,
            reference: None,
        },
    )?;
    let base = v.serial_pinned[0].p50.median();
    let bars = vec![
        ratio_bar(
            "snakepool, CPU 0",
            &v.serial_pinned[0].p50,
            base,
            "µs",
            SNAKE,
        ),
        ratio_bar("PPE, CPU 0", &v.serial_pinned[1].p50, base, "µs", PPE),
        ratio_bar(
            "snakepool, both cores",
            &v.serial_spread[0].p50,
            base,
            "µs",
            SNAKE_LIGHT,
        ),
        ratio_bar(
            "PPE, both cores",
            &v.serial_spread[1].p50,
            base,
            "µs",
            PPE_LIGHT,
        ),
    ];
    draw_bars(
        &bottom,
        &BarPanel {
            title: "Serial round trip of add, p50 (ratio to snakepool on CPU 0)",
            axis: "µs per call (median of rounds; whisker: min–max)",
            bars,
            reference: None,
        },
    )?;
    root.present()?;
    Ok(())
}

fn plot_startup(path: &Path, st: &Startup) -> PlotResult {
    let height = 150 + 62 * (1 + 3 * st.sizes.len() as u32);
    let root = canvas(path, (1100, height))?;
    let import = st.import_ms.median();
    let colors = [ONE_BY_ONE, PPE, SNAKE];
    let short = ["one by one", "snakepool fresh", "snakepool zygote"];
    let seconds = |r: &Rounds| Rounds(r.0.iter().map(|ms| ms / 1000.0).collect());
    let mut bars = vec![Bar {
        label: "python -c \"import dspy\"".to_owned(),
        rounds: seconds(&st.import_ms),
        color: BASELINE,
        text: format!("{} s  (1.00×)", fmt_s(import)),
    }];
    for size in &st.sizes {
        for k in 0..3 {
            let median = size.strategies[k].median();
            bars.push(Bar {
                label: format!("{} workers, {}", size.workers, short[k]),
                rounds: seconds(&size.strategies[k]),
                color: colors[k],
                text: format!(
                    "{} s  ({} import)",
                    fmt_s(median),
                    fmt_ratio(median / import)
                ),
            });
        }
    }
    draw_bars(
        &root,
        &BarPanel {
            title: "Start-up of DSPy workers (preload dspy) until all are ready",
            axis: "seconds (median of rounds; whisker: min–max)",
            bars,
            reference: Some(import / 1000.0),
        },
    )?;
    root.present()?;
    Ok(())
}

/// Plots one throughput line with its points, whiskers and value labels.
fn draw_line<'a, 'b>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    rounds: &[Rounds],
    color: RGBColor,
    name: &str,
) -> PlotResult {
    let points: Vec<(f64, f64)> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| (i as f64, r.median()))
        .collect();
    chart
        .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
    chart.draw_series(rounds.iter().enumerate().map(|(i, r)| {
        PathElement::new(
            vec![(i as f64, r.min()), (i as f64, r.max())],
            BLACK.stroke_width(2),
        )
    }))?;
    let style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom));
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y)| Text::new(fmt_int(y), (x + 0.05, y), style.clone())),
    )?;
    Ok(())
}

fn plot_scaling(path: &Path, sc: &Scaling, callers: usize, cpus: usize) -> PlotResult {
    let root = canvas(path, (1000, 540))?;
    let k = sc.workers.len();
    let top = sc
        .snakepool
        .iter()
        .chain(&sc.ppe)
        .map(Rounds::max)
        .fold(0.0, f64::max)
        * 1.3;
    let title = format!("Throughput of ping as workers grow ({callers} callers, {cpus} cores)");
    let mut chart = ChartBuilder::on(&root)
        .caption(title, title_font(20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.35f64..(k as f64 - 0.65), 0f64..top)?;
    let workers = sc.workers.clone();
    chart
        .configure_mesh()
        .x_labels(k)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                workers
                    .get(i as usize)
                    .map_or(String::new(), usize::to_string)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| fmt_int(*y))
        .x_desc("workers")
        .y_desc("calls per second")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    draw_line(
        &mut chart,
        &sc.snakepool,
        SNAKE,
        "snakepool, pool.call(\"ping\")",
    )?;
    draw_line(
        &mut chart,
        &sc.ppe,
        PPE,
        "ProcessPoolExecutor, submit(ping)",
    )?;
    if let Some(i) = sc.workers.iter().position(|&w| w == cpus) {
        let x = i as f64;
        chart.draw_series(std::iter::once(DashedPathElement::new(
            vec![(x, 0.0), (x, top)],
            6,
            4,
            BLACK.mix(0.5).stroke_width(1),
        )))?;
        let style =
            TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Left, VPos::Top));
        chart.draw_series(std::iter::once(Text::new(
            format!(" workers = cores ({cpus})"),
            (x, top),
            style,
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// BENCHMARKS.md
// ---------------------------------------------------------------------------------

/// Everything measured, for the report.
struct Report<'a> {
    settings: &'a Settings,
    machine: Machine,
    roundtrip: RoundTrip,
    versus: Versus,
    dspy: DspyOverhead,
    startup: Startup,
    scaling: Scaling,
    cpu: cpu_per_call::CpuPerCall,
    notes: Vec<String>,
    elapsed: Duration,
    load_after: String,
}

/// A Markdown table of figures: the first column left-aligned, the others right.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let aligns: String = (0..headers.len())
        .map(|i| if i == 0 { 'l' } else { 'r' })
        .collect();
    aligned_table(headers, &aligns, rows)
}

/// A Markdown table; `aligns` has one letter per column, `l` or `r`.
fn aligned_table(headers: &[&str], aligns: &str, rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    let aligns: Vec<&str> = aligns
        .chars()
        .map(|a| if a == 'r' { "---:" } else { "---" })
        .collect();
    out += &format!("| {} |\n", aligns.join(" | "));
    for row in rows {
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

/// A table row for a latency: p50 median, p50 per round, p99 median, ratio.
fn latency_row(name: &str, l: &Latency, base: f64) -> Vec<String> {
    let p50 = l.p50.median();
    vec![
        name.to_owned(),
        format!("**{}**", fmt_us(p50)),
        l.p50.list(fmt_us),
        fmt_us(l.p99.median()),
        fmt_ratio(p50 / base),
    ]
}

const LATENCY_HEADERS: [&str; 5] = [
    "path",
    "p50 µs (median)",
    "p50 µs per round",
    "p99 µs (median)",
    "p50 ratio",
];

fn md_header(r: &Report) -> String {
    let m = &r.machine;
    let s = r.settings;
    format!(
        "# Benchmarks\n\n\
         Generated by `scripts/benchmarks.sh` (`cargo bench --bench compare`) on {date}. \
         Every figure on this page comes from **one process run** of that bench \
         ({secs:.0} s), so all comparisons share the same machine state. Within each \
         comparison the paths alternate — a latency round is cut into {slices} slices \
         that alternate between the paths, throughput rounds alternate whole — so noise \
         on the machine hits them alike. Tables give the median of the rounds and every round's value; plots show the median \
         as the bar and the range of the rounds as a whisker; ratios are to the first \
         row of their table or plot.\n\n\
         ## Machine\n\n{machine}\n\
         ## Cores\n\n\
         This VM wakes an idle core slowly: a message that has to wake the other core \
         costs ~100 µs, against ~6–17 µs when both ends stay on one warm core. So each \
         measurement says where it ran:\n\n\
         - **CPU 0** — the bench process (every thread of its tokio runtime) and every \
         Python process it talks to are pinned to CPU 0 with `sched_setaffinity`. This \
         measures the cost of the path itself, without core wake-ups.\n\
         - **both cores** — nothing pinned; the scheduler places host threads and \
         workers on the {cpus} cores. This is how a deployment runs, and the only fair \
         setting for throughput.\n\n\
         Both sides of a comparison always ran under the same setting. The Rust side \
         uses a multi-thread tokio runtime with 2 worker threads (what `#[tokio::main]` \
         gives on this machine) unless a row says otherwise.\n\n",
        date = m.date,
        slices = s.slices,
        secs = r.elapsed.as_secs_f64(),
        machine = aligned_table(
            &["", ""],
            "ll",
            &[
                vec![
                    "CPU".into(),
                    format!("{}, {} cores (`nproc`)", m.cpu_model, s.cpus)
                ],
                vec!["memory".into(), gib(&m.memory)],
                vec!["kernel".into(), m.kernel.clone()],
                vec!["Python".into(), m.python.clone()],
                vec!["DSPy".into(), m.dspy.clone()],
                vec!["Rust".into(), m.rustc.clone()],
                vec!["snakepool".into(), m.commit.clone()],
                vec![
                    "load average (1, 5, 15 min)".into(),
                    format!("{} before the run, {} after", m.load_before, r.load_after)
                ],
            ]
        ),
        cpus = s.cpus,
    )
}

fn md_summary(r: &Report) -> String {
    let rt = &r.roundtrip;
    let raw = rt.raw.p50.median();
    let multi = rt.multi.p50.median();
    let v = &r.versus;
    let serial = v.serial_spread[1].p50.median() / v.serial_spread[0].p50.median();
    let direct = r.dspy.direct.p50.median();
    let pooled = r.dspy.pool.p50.median();
    let mut out = String::from("## Summary\n\n");
    out += &format!(
        "- The pool adds **{} µs** to a ping round trip ({} µs raw pipe → {} µs through \
         `pool.call`, multi-thread runtime, CPU 0).\n",
        fmt_us(multi - raw),
        fmt_us(raw),
        fmt_us(multi)
    );
    out += &format!(
        "- Against `ProcessPoolExecutor` with the same {VERSUS_WORKERS} workers and {} \
         callers, snakepool does {}; a serial call is **{:.1}×** faster (both cores).\n",
        r.settings.callers,
        versus_throughput(v),
        serial
    );
    let [ahead, one, http] = &r.cpu.paths;
    out += &format!(
        "- With {} callers on 2 workers, a `ping` costs the host **{} µs** of CPU and the \
         workers {} µs ({} calls/s, {} those of one call at a time per worker); \
         through `snakepool serve` the server spends {} µs per HTTP call.\n",
        r.settings.cpu_callers,
        fmt_tick(ahead.host_us.median()),
        fmt_tick(ahead.workers_us.median()),
        fmt_int(ahead.per_s.median()),
        fmt_ratio(ahead.per_s.median() / one.per_s.median()),
        fmt_tick(http.host_us.median()),
    );
    out += &format!(
        "- A DSPy chain of thought through the pool costs {} µs more than calling it \
         in-process ({} → {} µs, {}).\n",
        fmt_us(pooled - direct),
        fmt_us(direct),
        fmt_us(pooled),
        fmt_ratio(pooled / direct)
    );
    if let Some(size) = r.startup.sizes.last() {
        let [one, fresh, zygote] = &size.strategies;
        out += &format!(
            "- {} DSPy workers are ready in **{} s** forked from a zygote, against {} s \
             started all at once and {} s one by one; `import dspy` alone takes {} s.\n",
            size.workers,
            fmt_s(zygote.median()),
            fmt_s(fresh.median()),
            fmt_s(one.median()),
            fmt_s(r.startup.import_ms.median())
        );
    }
    out + "\n"
}

/// snakepool's throughput against PPE's equivalent closed loop and, when another
/// way of submitting was faster, against that one too.
fn versus_throughput(v: &Versus) -> String {
    let snakepool = v.throughput[0].median();
    let window = v.throughput[1].median();
    let best = v.throughput[1..]
        .iter()
        .map(Rounds::median)
        .fold(0.0, f64::max);
    let head = format!(
        "**{:.1}×** the calls per second of PPE's equivalent closed loop",
        snakepool / window
    );
    if best > window {
        format!(
            "{head} ({:.1}× those of its fastest way of submitting)",
            snakepool / best
        )
    } else {
        format!("{head}, PPE's fastest way of submitting here")
    }
}

fn md_roundtrip(r: &Report) -> String {
    let rt = &r.roundtrip;
    let raw = rt.raw.p50.median();
    let s = r.settings;
    format!(
        "## 1. The pool's own overhead: ping round trip\n\n\
         ![Ping and DSPy latency](docs/bench/latency.png)\n\n\
         A `ping` to one worker, one call at a time, {rounds} rounds × {pings} calls, \
         **CPU 0** (host threads and worker). *Raw blocking pipe*: the bench writes the \
         4-byte-length JSON frame to `python -m snakepool_worker` itself and blocks \
         reading the reply — the floor for any host. *Pool*: `pool.call(\"ping\", {{}})` \
         on a one-worker pool (same runtime, same modules), on a current-thread and on a \
         multi-thread tokio runtime. 1,000 warm-up calls per path first; each round is \
         cut into {slices} slices that alternate between the three paths.\n\n{table}\n\
         The difference is the pool's bookkeeping (checkout, lease, metrics), the async \
         pipe I/O and, on the multi-thread runtime, a hop between runtime threads.\n\n",
        rounds = s.rounds,
        slices = s.slices,
        pings = fmt_int(s.pings as f64),
        table = table(
            &LATENCY_HEADERS,
            &[
                latency_row("raw blocking pipe", &rt.raw, raw),
                latency_row("pool, current-thread runtime", &rt.current, raw),
                latency_row("pool, multi-thread runtime", &rt.multi, raw),
            ]
        ),
    )
}

fn md_versus(r: &Report) -> String {
    let v = &r.versus;
    let s = r.settings;
    let base = v.throughput[0].median();
    let paths = versus_paths(s.callers);
    let rows: Vec<Vec<String>> = (0..4)
        .map(|i| {
            vec![
                paths[i].clone(),
                format!("**{}**", fmt_int(v.throughput[i].median())),
                v.throughput[i].list(fmt_int),
                fmt_ratio(v.throughput[i].median() / base),
            ]
        })
        .collect();
    let serial_base = v.serial_pinned[0].p50.median();
    let serial_rows = vec![
        latency_row(
            "snakepool `pool.call`, CPU 0",
            &v.serial_pinned[0],
            serial_base,
        ),
        latency_row(
            "PPE `submit().result()`, CPU 0",
            &v.serial_pinned[1],
            serial_base,
        ),
        latency_row(
            "snakepool `pool.call`, both cores",
            &v.serial_spread[0],
            serial_base,
        ),
        latency_row(
            "PPE `submit().result()`, both cores",
            &v.serial_spread[1],
            serial_base,
        ),
    ];
    format!(
        "## 2. snakepool against `concurrent.futures.ProcessPoolExecutor`\n\n\
         ![snakepool against ProcessPoolExecutor](docs/bench/vs_process_pool.png)\n\n\
         The same tiny task on both: add two numbers (`add(i, 1)`; snakepool's `add` \
         command in `benches/python/compare_handlers.py`, PPE's function in \
         `benches/python/ppe_bench.py`), {workers} workers each, every result checked. \
         The PPE side is a Python process (`benches/python/ppe_bench.py`) that the \
         bench drives over a pipe, alternating with snakepool (serial rounds in \
         {slices} slices, throughput rounds whole); it times itself with `time.perf_counter()`, so the pipe to it is not counted. \
         Its executor uses Python's default start method (fork on Linux) and \
         `submit`, i.e. chunksize 1. Both sides start their workers and warm them up \
         before the first round.\n\n\
         **Throughput** (both cores, {rounds} rounds; snakepool {pool_calls} calls per \
         round, PPE {ppe_tasks} tasks per round). snakepool: {callers} tokio tasks, each \
         awaiting `pool.call(\"add\", …)` in a loop — a closed loop with {callers} calls \
         in flight. PPE, measured three ways: the equivalent closed loop (one thread \
         keeps exactly {callers} tasks in flight, a done-callback frees a slot), \
         {callers} Python threads each doing `submit().result()` in a loop (the literal \
         {callers} callers; they contend for the GIL), and everything submitted at once \
         then waited for (PPE's best case, unbounded in flight).\n\n{tp}\n\
         **Serial latency** ({rounds} rounds × {serial} calls, one call at a time): \
         `pool.call` against `executor.submit(add, i, 1).result()`, pinned to CPU 0 and \
         on both cores.\n\n{serial_table}\n\
         A PPE call crosses more hops than a snakepool call: the caller's thread, the \
         executor's management thread, a `multiprocessing` queue (pickling, a lock and \
         a pipe) to the worker and back the same way. On both cores each hop may wake \
         the other core, which is what the both-cores figures add.\n\n",
        workers = VERSUS_WORKERS,
        slices = s.slices,
        rounds = s.rounds,
        pool_calls = fmt_int(s.pool_calls as f64),
        ppe_tasks = fmt_int(s.ppe_tasks as f64),
        callers = s.callers,
        serial = fmt_int(s.serial_calls as f64),
        tp = table(
            &["path", "calls/s (median)", "calls/s per round", "ratio"],
            &rows
        ),
        serial_table = table(&LATENCY_HEADERS, &serial_rows),
    )
}

fn md_dspy(r: &Report) -> String {
    let d = &r.dspy;
    let s = r.settings;
    let direct = d.direct.p50.median();
    let pooled = d.pool.p50.median();
    format!(
        "## 3. DSPy through the pool against DSPy in-process\n\n\
         (Plot: lower half of `docs/bench/latency.png` above.)\n\n\
         `dspy.ChainOfThought(\"question -> answer: int\")` with a `DummyLM` answering \
         \"What is 2 plus 3?\", {rounds} rounds × {calls} calls, **CPU 0**. Through the \
         pool: `Program::call` (the `execute_program` command) in a session of a \
         one-worker pool started fresh with `--preload dspy`. In-process: \
         `benches/python/dspy_direct.py` calls the same program under the same per-call \
         `dspy.context(lm=…, track_usage=True, disable_history=True)` the worker uses. \
         200 warm-up calls each; each round is cut into {slices} slices that alternate \
         between the two.\n\n{table}\n\
         Median overhead: **{overhead} µs** per call ({ratio}) for the pipe, JSON, the \
         session lookup, input checks and output typing.\n\n",
        rounds = s.rounds,
        slices = s.slices,
        calls = fmt_int(s.dspy_calls as f64),
        table = table(
            &LATENCY_HEADERS,
            &[
                latency_row("in-process Python", &d.direct, direct),
                latency_row("`execute_program` through the pool", &d.pool, direct),
            ]
        ),
        overhead = fmt_us(pooled - direct),
        ratio = fmt_ratio(pooled / direct),
    )
}

fn md_startup(r: &Report) -> String {
    let st = &r.startup;
    let s = r.settings;
    let import = st.import_ms.median();
    let mut rows = vec![vec![
        "`python -c \"import dspy\"`".to_owned(),
        "—".to_owned(),
        format!("**{}**", fmt_s(import)),
        st.import_ms.list(fmt_s),
        fmt_ratio(1.0),
    ]];
    for size in &st.sizes {
        for (k, name) in STRATEGIES.iter().enumerate() {
            let rounds = &size.strategies[k];
            rows.push(vec![
                (*name).to_owned(),
                size.workers.to_string(),
                format!("**{}**", fmt_s(rounds.median())),
                rounds.list(fmt_s),
                fmt_ratio(rounds.median() / import),
            ]);
        }
    }
    format!(
        "## 4. Start-up of DSPy workers\n\n\
         ![Start-up of DSPy workers](docs/bench/startup.png)\n\n\
         Time from the start until every worker has answered its handshake, with DSPy \
         imported in each (`.module(\"snakepool_worker.dspy\").preload(\"dspy\")`), \
         **both cores**, {rounds}; each round times `import dspy` once and then \
         every strategy and size in turn.\n\n\
         - *one by one*: the old design — start a fresh worker, wait for its handshake, \
         then start the next (emulated with one-worker pools, `SpawnMode::Fresh`, \
         started in sequence).\n\
         - *snakepool fresh*: one pool, `SpawnMode::Fresh`: every worker a new \
         interpreter, all spawned at once.\n\
         - *snakepool zygote*: one pool, `SpawnMode::Zygote`: one process imports DSPy \
         once and forks the workers (the time includes the zygote's own start).\n\n\
         {table}\n\
         {reading}\n\n",
        reading = startup_reading(st, s.cpus),
        rounds = plural(s.startup_rounds, "round"),
        table = table(
            &[
                "strategy",
                "workers",
                "s (median)",
                "s per round",
                "÷ import dspy"
            ],
            &rows
        ),
    )
}

/// What the start-up table says, for the largest pool measured.
fn startup_reading(st: &Startup, cpus: usize) -> String {
    let Some(size) = st.sizes.last() else {
        return String::new();
    };
    let [one, fresh, zygote] = &size.strategies;
    format!(
        "With {n} workers on {cpus} cores, starting fresh interpreters all at once takes \
         {fresh_ratio} the time of starting them one by one: each of them spends about \
         as much CPU importing DSPy as `import dspy` alone, and the {cpus} cores are the \
         limit, not the waiting. Forking from a zygote pays for the import once: \
         {zygote_s} s, {speedup:.1}× faster than one by one. (`python -c \"import \
         dspy\"` also pays for the interpreter's exit, which a zygote never does, so a \
         zygote pool can be ready sooner than that baseline.)",
        n = size.workers,
        fresh_ratio = fmt_ratio(fresh.median() / one.median()),
        zygote_s = fmt_s(zygote.median()),
        speedup = one.median() / zygote.median(),
    )
}

/// `n` and `word`, in the plural unless `n` is 1.
fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `/proc/meminfo`'s `N kB` in GiB.
fn gib(kb: &str) -> String {
    kb.trim_end_matches(" kB").parse::<f64>().map_or_else(
        |_| kb.to_owned(),
        |k| format!("{:.1} GiB", k / 1024.0 / 1024.0),
    )
}

fn md_scaling(r: &Report) -> String {
    let sc = &r.scaling;
    let s = r.settings;
    let rows: Vec<Vec<String>> = (0..sc.workers.len())
        .map(|i| {
            vec![
                sc.workers[i].to_string(),
                format!("**{}**", fmt_int(sc.snakepool[i].median())),
                sc.snakepool[i].list(fmt_int),
                format!("**{}**", fmt_int(sc.ppe[i].median())),
                sc.ppe[i].list(fmt_int),
                fmt_ratio(sc.snakepool[i].median() / sc.ppe[i].median()),
            ]
        })
        .collect();
    format!(
        "## 5. Throughput as workers grow\n\n\
         ![Throughput against workers](docs/bench/scaling.png)\n\n\
         `ping` with a **fixed {callers} concurrent callers** whatever the pool size, \
         **both cores**, {rounds} rounds (snakepool {calls} calls per round: {callers} \
         tokio tasks calling `pool.call(\"ping\", {{}})` in a loop; PPE {ppe_tasks} \
         tasks per round of a `ping()` function returning a small dict, {callers} kept \
         in flight by one thread as in section 2). All pools and executors stay up \
         for the whole section; rounds go through every size in turn.\n\n{table}\n\
         The machine has {cpus} cores, shared by the host's runtime threads and the \
         workers, so no pool size gets more than {cpus} cores of work done: past {cpus} \
         workers the differences come from how the scheduler shares the cores (and from \
         this run's noise), not from added capacity.\n\n",
        callers = s.scale_callers,
        rounds = s.rounds,
        calls = fmt_int(s.scale_calls as f64),
        ppe_tasks = fmt_int(s.scale_ppe_tasks as f64),
        cpus = s.cpus,
        table = table(
            &[
                "workers",
                "snakepool calls/s",
                "per round",
                "PPE calls/s",
                "per round",
                "snakepool ÷ PPE",
            ],
            &rows
        ),
    )
}

fn md_cpu(r: &Report) -> String {
    let s = r.settings;
    let paths = &r.cpu.paths;
    let rows: Vec<Vec<String>> = cpu_per_call::PATHS
        .iter()
        .zip(paths)
        .map(|(name, path)| {
            let client = if std::ptr::eq(path, &paths[2]) {
                fmt_tick(path.client_us.median())
            } else {
                "—".to_owned()
            };
            vec![
                (*name).to_owned(),
                format!("**{}**", fmt_int(path.per_s.median())),
                path.per_s.list(fmt_int),
                format!("**{}**", fmt_tick(path.host_us.median())),
                path.host_us.list(fmt_tick),
                fmt_tick(path.workers_us.median()),
                client,
            ]
        })
        .collect();
    let [ahead, one, http] = paths;
    format!(
        "## 6. CPU per call\n\n\
         `ping` from **{callers} concurrent callers** on **2 workers**, **both cores**, \
         {rounds} rounds, the order of the paths rotating from round to round; pools \
         {calls} calls per round, HTTP {http_calls}. CPU time is read from `/proc` \
         (user + system, all threads) just before and after each round, so start-up \
         and warm-up are excluded. *Host* is the bench process for the pools (its \
         {callers} callers included: the load generator runs in the same process) and \
         the `snakepool serve` process for HTTP, whose load comes from the bench \
         process over loopback (*client*).\n\n{table}\n\
         Sending quick calls ahead gives {gain} the calls per second of one call at a \
         time per worker, with {host_share} of the host's CPU per call and {worker_share} \
         of the workers'. Through HTTP, the server spends {http_host} µs of CPU per \
         call and the calls per second are {http_share} of the in-process pool's: the \
         client, the server and the workers share the 2 cores.\n\n\
         **Where the time went.** Before this version, on the VM's earlier AMD EPYC \
         host (`snakepool bench --workers 2 --concurrency 32 --requests 200000 --command \
         ping`, separate runs): 30,000–38,600 calls/s, 19.4–19.9 µs of host CPU and \
         14.2–15.9 µs of worker CPU per call. `perf stat` counted 3 context switches, 2 \
         reads, 1 `writev` and 1 `write` per call, and `perf record -g` put 27% of the \
         host's samples in the kernel's pipe writes and wake-ups (`anon_pipe_write` \
         waking the worker blocked in `epoll_wait`) against 15% in snakepool's own \
         code: a sync call went out only when the previous reply was in, so every \
         call put the worker to sleep and woke it. Now quick calls wait in the \
         worker's pipe (section \"Pipelining\" of the README): the worker reads \
         several per `read`, the host's requests for a busy worker go out together \
         (about 4 per `writev`), replies come in several per `read`, and context \
         switches fell from 3 per call to about 0.1. What is left on the host is \
         mostly JSON (the reply's `Value`), the runtime's task wake-ups, the call's \
         timer and the metrics. `scripts/profile-host.sh` reproduces the profile. \
         The server's own share fell twice more: with mimalloc as the binary's \
         allocator (median 41.6 → 36.1 µs per HTTP call over 5 alternating runs of \
         `snakepool bench --url`) and with a runtime of as many threads as the \
         workers leave cores, 1 here (32.5–39.9 µs against 35.1–42.5 µs with 2, at \
         the same calls per second), both measured on the slower Intel host.\n\n",
        callers = s.cpu_callers,
        rounds = s.rounds,
        calls = fmt_int(s.cpu_calls as f64),
        http_calls = fmt_int(s.http_calls as f64),
        table = table(
            &[
                "path",
                "calls/s",
                "per round",
                "host CPU µs/call",
                "per round",
                "workers CPU µs/call",
                "client CPU µs/call",
            ],
            &rows
        ),
        gain = fmt_ratio(ahead.per_s.median() / one.per_s.median()),
        host_share = fmt_ratio(ahead.host_us.median() / one.host_us.median()),
        worker_share = fmt_ratio(ahead.workers_us.median() / one.workers_us.median()),
        http_host = fmt_tick(http.host_us.median()),
        http_share = fmt_ratio(http.per_s.median() / ahead.per_s.median()),
    )
}

fn md_footer(r: &Report) -> String {
    let mut out = String::new();
    if !r.notes.is_empty() {
        out += "## Notes from this run\n\n";
        for note in &r.notes {
            out += &format!("- {note}\n");
        }
        out += "\n";
    }
    let rows: Vec<Vec<String>> = SETTINGS
        .iter()
        .map(|(name, default, meaning)| {
            vec![
                format!("`{name}`"),
                setting(name),
                (*default).to_owned(),
                (*meaning).to_owned(),
            ]
        })
        .collect();
    out + &format!(
        "## Reproducing\n\n\
         ```sh\nscripts/benchmarks.sh\n```\n\n\
         It sets up the Python environment (`scripts/python-env.sh`), exports its \
         interpreter as `SNAKEPOOL_PYTHON` and runs `cargo bench --bench compare`, \
         which rewrites this file and `docs/bench/*.png`. Rounds and sizes come from \
         the environment; this run used:\n\n{}\n\
         Figures on this VM vary by up to 2× between runs, more while other work runs \
         on it (see the load average above); compare within one run.\n",
        aligned_table(
            &["variable", "this run", "default", "meaning"],
            "lrrl",
            &rows
        )
    )
}

fn markdown(r: &Report) -> String {
    [
        md_header(r),
        md_summary(r),
        md_roundtrip(r),
        md_versus(r),
        md_dspy(r),
        md_startup(r),
        md_scaling(r),
        md_cpu(r),
        md_footer(r),
    ]
    .concat()
}

// ---------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------

fn plot_all(r: &Report, dir: &Path) -> PlotResult {
    std::fs::create_dir_all(dir)?;
    plot_latency(&dir.join("latency.png"), &r.roundtrip, &r.dspy)?;
    plot_versus(
        &dir.join("vs_process_pool.png"),
        &r.versus,
        r.settings.callers,
    )?;
    plot_startup(&dir.join("startup.png"), &r.startup)?;
    plot_scaling(
        &dir.join("scaling.png"),
        &r.scaling,
        r.settings.scale_callers,
        r.settings.cpus,
    )?;
    Ok(())
}

fn main() {
    let started = Instant::now();
    register_fonts();
    let settings = Settings::from_env();
    let machine = Machine::probe(&settings.python);
    println!(
        "{} × {}, Python {}, DSPy {}",
        settings.cpus, machine.cpu_model, machine.python, machine.dspy
    );
    let mut notes = Vec::new();
    println!("[1/6] ping round trip: raw pipe against the pool (CPU 0)");
    let roundtrip = measure_roundtrip(&settings);
    println!("[2/6] snakepool against ProcessPoolExecutor");
    let versus = measure_versus(&settings);
    println!("[3/6] DSPy through the pool against in-process (CPU 0)");
    let dspy = measure_dspy(&settings);
    println!("[4/6] start-up of DSPy workers (both cores)");
    let startup = measure_startup(&settings, &mut notes);
    println!("[5/6] throughput as workers grow (both cores)");
    let scaling = measure_scaling(&settings);
    println!("[6/6] CPU per call: sent ahead, one at a time, HTTP (both cores)");
    let cpu = cpu_per_call::measure(&settings);
    let report = Report {
        settings: &settings,
        machine,
        roundtrip,
        versus,
        dspy,
        startup,
        scaling,
        cpu,
        notes,
        elapsed: started.elapsed(),
        load_after: load_average(),
    };
    let root = PathBuf::from(ROOT);
    plot_all(&report, &root.join("docs/bench")).expect("plots drawn");
    let text = markdown(&report);
    let path = root.join("BENCHMARKS.md");
    // The last section is another bench's (scripts/lm-serving-bench.sh): kept as it is.
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(LM_SERVING_MARKER).map(|at| old[at..].to_owned()))
        .unwrap_or_default();
    std::fs::write(&path, format!("{text}{kept}")).expect("BENCHMARKS.md written");
    println!("\n{text}");
    println!(
        "wrote BENCHMARKS.md and docs/bench/*.png in {:.0} s",
        secs_since(started)
    );
}
