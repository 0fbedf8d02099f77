//! `snakepool bench --chaos RATE`: load the pool while killing random workers with
//! SIGKILL, and prove that nothing is lost.
//!
//! Plain callers call `probe_echo` with a unique nonce and check that the reply echoes
//! exactly their own arguments; every other caller uses `probe_echo_async`, which holds
//! its call open a few milliseconds, so that many calls are in flight at once on the
//! workers being killed. Session callers each hold a DSPy chain of thought
//! (DummyLM) and ask it questions with known answers. At the end every call is one of:
//! succeeded, failed with an error kind (e.g. `worker_crashed` for a call whose worker
//! was killed under it), **lost** (no answer at all, or somebody else's answer), or
//! **state lost** (a session call that found its program or LM gone after a kill).
//! Lost and state lost must be 0; the command fails otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use snakepool::dspy::{Dspy, Lm, Program, ProgramKind};
use snakepool::{Error, Pool};

/// What a chaos run does.
pub struct ChaosPlan {
    /// Worker kills per second.
    pub rate: f64,
    /// Sessions with a DSPy program under load (0: plain calls only).
    pub dspy_sessions: usize,
    /// Plain callers.
    pub concurrency: usize,
    /// Plain calls to make, unless `duration` is set.
    pub requests: u64,
    /// Run for this long instead.
    pub duration: Option<Duration>,
    /// Time each call may take.
    pub timeout: Option<Duration>,
    /// Print one JSON object.
    pub json: bool,
}

/// Questions the DummyLM answers, and their answers.
const QUESTIONS: usize = 16;

fn question(i: usize) -> (String, i64) {
    let (a, b) = (3 * i as i64 + 2, 7 * i as i64 + 5);
    (format!("What is {a} plus {b}?"), a + b)
}

fn dummy_lm() -> Lm {
    let mut answers = serde_json::Map::new();
    for i in 0..QUESTIONS {
        let (q, sum) = question(i);
        answers.insert(q, json!({"reasoning": "adding", "answer": sum.to_string()}));
    }
    Lm::dummy_by_prompt(answers)
}

/// Error types that mean a session's state was gone on its worker.
const STATE_LOST_TYPES: [&str; 4] = [
    "ProgramNotFound",
    "LMNotConfigured",
    "SessionRequired",
    "DummyAnswersExhausted",
];

fn state_was_lost(error: &Error) -> bool {
    match error {
        Error::WorkerError { kind, .. } => STATE_LOST_TYPES.contains(&kind.as_str()),
        Error::SessionRebuildFailed { .. } | Error::SessionClosed { .. } => true,
        _ => false,
    }
}

/// Outcomes of the run.
#[derive(Default, Serialize, Deserialize, Debug, Clone)]
pub struct ChaosReport {
    /// Calls made (plain and session).
    pub sent: u64,
    /// Calls answered correctly.
    pub succeeded: u64,
    /// Calls answered with an error, by kind.
    pub failed: BTreeMap<String, u64>,
    /// Calls with no answer at all.
    pub lost_no_answer: u64,
    /// Calls answered with somebody else's result.
    pub lost_wrong_answer: u64,
    /// `lost_no_answer + lost_wrong_answer`.
    pub lost: u64,
    /// Plain calls made with the concurrent command (several in flight per worker).
    pub concurrent_calls: u64,
    /// Session calls made.
    pub session_calls: u64,
    /// Session calls that found their state gone.
    pub state_lost: u64,
    /// Workers killed.
    pub kills: u64,
    /// Workers started to replace killed ones.
    pub worker_restarts: u64,
    /// Sessions rebuilt from their journal.
    pub session_rebuilds: u64,
    /// Length of the run.
    pub elapsed_s: f64,
}

impl ChaosReport {
    fn merge(&mut self, other: ChaosReport) {
        self.sent += other.sent;
        self.succeeded += other.succeeded;
        for (kind, n) in other.failed {
            *self.failed.entry(kind).or_default() += n;
        }
        self.lost_no_answer += other.lost_no_answer;
        self.lost_wrong_answer += other.lost_wrong_answer;
        self.concurrent_calls += other.concurrent_calls;
        self.session_calls += other.session_calls;
        self.state_lost += other.state_lost;
    }

    fn fail(&mut self, error: &Error) {
        *self.failed.entry(error.kind().to_owned()).or_default() += 1;
    }
}

/// When the load stops.
struct Budget {
    deadline: Option<Instant>,
    left: AtomicU64,
    stop: AtomicBool,
}

impl Budget {
    /// Takes one plain call from the budget; false once it is spent.
    fn take(&self) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        match self.deadline {
            Some(deadline) => Instant::now() < deadline,
            None => self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok(),
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
            && self
                .deadline
                .is_none_or(|deadline| Instant::now() < deadline)
    }
}

/// A call may queue, run, and be retried once by the pool's rerouting; it must have
/// an answer well within this, or it counts as lost.
fn answer_deadline(pool: &Pool, timeout: Duration) -> Duration {
    timeout + pool.config().checkout_timeout + Duration::from_secs(10)
}

async fn plain_caller(
    pool: Pool,
    caller: usize,
    budget: Arc<Budget>,
    timeout: Duration,
    progress: ProgressBar,
) -> ChaosReport {
    let mut report = ChaosReport::default();
    let deadline = answer_deadline(&pool, timeout);
    let mut n = 0u64;
    let concurrent = caller % 2 == 1;
    let (command, args) = if concurrent {
        ("probe_echo_async", json!({"caller": caller, "hold_ms": 20}))
    } else {
        ("probe_echo", json!({"caller": caller}))
    };
    while budget.take() {
        n += 1;
        let mut args = args.clone();
        args["n"] = json!(n);
        report.sent += 1;
        report.concurrent_calls += u64::from(concurrent);
        let call = pool.call_with_timeout(command, args.clone(), timeout);
        match tokio::time::timeout(deadline, call).await {
            Err(_) => report.lost_no_answer += 1,
            Ok(Ok(reply)) if reply["echo"] == args => report.succeeded += 1,
            Ok(Ok(_)) => report.lost_wrong_answer += 1,
            Ok(Err(error)) => report.fail(&error),
        }
        progress.inc(1);
    }
    report
}

async fn open_session(pool: &Pool, index: usize) -> Result<Program, Error> {
    let dspy = Dspy::new(pool.session(&format!("chaos-{index}")));
    dspy.configure_lm(&dummy_lm()).await?;
    dspy.create_program("question -> answer: int", ProgramKind::ChainOfThought)
        .await
}

#[derive(Deserialize)]
struct Sum {
    answer: i64,
}

async fn session_caller(
    pool: Pool,
    program: Program,
    budget: Arc<Budget>,
    timeout: Duration,
    progress: ProgressBar,
) -> ChaosReport {
    let mut report = ChaosReport::default();
    let deadline = answer_deadline(&pool, timeout);
    let mut i = 0;
    while budget.running() {
        let (q, expected) = question(i % QUESTIONS);
        i += 1;
        report.sent += 1;
        report.session_calls += 1;
        let inputs = json!({ "question": q });
        match tokio::time::timeout(deadline, program.call::<_, Sum>(&inputs)).await {
            Err(_) => report.lost_no_answer += 1,
            Ok(Ok(p)) if p.outputs.answer == expected => report.succeeded += 1,
            Ok(Ok(_)) => report.lost_wrong_answer += 1,
            Ok(Err(error)) if state_was_lost(&error) => {
                report.state_lost += 1;
                report.fail(&error);
            }
            Ok(Err(error)) => report.fail(&error),
        }
        progress.inc(1);
    }
    report
}

/// Kills a random worker `rate` times a second until the load stops.
async fn killer(pool: Pool, rate: f64, budget: Arc<Budget>, progress: ProgressBar) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.tick().await;
    let mut kills = 0;
    while budget.running() {
        tick.tick().await;
        let workers = pool.status().workers;
        if workers.is_empty() {
            continue;
        }
        let victim = workers[rand::random_range(0..workers.len())].pid;
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) } == 0 {
            kills += 1;
            progress.set_message(format!("{kills} workers killed"));
        }
    }
    kills
}

async fn start_pool(settings: snakepool::config::Settings, dspy: bool) -> Result<Pool, String> {
    let mut builder = settings.builder().module("snakepool_worker.probe");
    if dspy {
        builder = builder.module("snakepool_worker.dspy").preload("dspy");
    }
    builder
        .start()
        .await
        .map_err(|e| format!("the pool did not start: {e}"))
}

/// Runs the chaos benchmark on a pool of its own built from `settings`.
pub async fn run(plan: ChaosPlan, settings: snakepool::config::Settings) -> Result<(), String> {
    let pool = start_pool(settings, plan.dspy_sessions > 0).await?;
    let starts_before = pool.metrics().worker_starts;
    let mut programs = Vec::new();
    for index in 0..plan.dspy_sessions {
        programs.push(
            open_session(&pool, index)
                .await
                .map_err(|e| format!("cannot open DSPy session {index}: {e}"))?,
        );
    }
    let timeout = plan.timeout.unwrap_or_else(|| pool.request_timeout());
    let budget = Arc::new(Budget {
        deadline: plan.duration.map(|d| Instant::now() + d),
        left: AtomicU64::new(plan.requests),
        stop: AtomicBool::new(false),
    });
    let progress = ProgressBar::new_spinner();
    progress.set_style(
        ProgressStyle::with_template("{spinner} {pos} calls [{elapsed}] {msg}")
            .expect("valid progress template"),
    );
    progress.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let killer_task = tokio::spawn(killer(
        pool.clone(),
        plan.rate,
        budget.clone(),
        progress.clone(),
    ));
    let sessions: Vec<_> = programs
        .into_iter()
        .map(|program| {
            tokio::spawn(session_caller(
                pool.clone(),
                program,
                budget.clone(),
                timeout,
                progress.clone(),
            ))
        })
        .collect();
    let plain: Vec<_> = (0..plan.concurrency)
        .map(|caller| {
            tokio::spawn(plain_caller(
                pool.clone(),
                caller,
                budget.clone(),
                timeout,
                progress.clone(),
            ))
        })
        .collect();
    let mut report = ChaosReport::default();
    for task in plain {
        report.merge(task.await.map_err(|e| e.to_string())?);
    }
    budget.stop.store(true, Ordering::SeqCst);
    for task in sessions {
        report.merge(task.await.map_err(|e| e.to_string())?);
    }
    report.kills = killer_task.await.map_err(|e| e.to_string())?;
    report.elapsed_s = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let metrics = pool.metrics();
    report.worker_restarts = metrics.worker_starts - starts_before;
    report.session_rebuilds = metrics.session_rebuilds;
    report.lost = report.lost_no_answer + report.lost_wrong_answer;
    pool.shutdown().await;
    print_report(&report, &plan);
    if report.lost > 0 || report.state_lost > 0 {
        return Err(format!(
            "{} calls lost and {} session calls lost their state",
            report.lost, report.state_lost
        ));
    }
    Ok(())
}

fn print_report(report: &ChaosReport, plan: &ChaosPlan) {
    if plan.json {
        println!("{}", json!(report));
        return;
    }
    let failed: Value = json!(report.failed);
    println!(
        "chaos       {:.1} kills/s over {:.1} s: {} workers killed, {} replacements started",
        plan.rate, report.elapsed_s, report.kills, report.worker_restarts
    );
    println!(
        "calls       {} sent ({} concurrent, {} in {} DSPy sessions), {} succeeded",
        report.sent,
        report.concurrent_calls,
        report.session_calls,
        plan.dspy_sessions,
        report.succeeded
    );
    println!("failed      {failed}");
    println!(
        "lost        {} (no answer {}, wrong answer {})",
        report.lost, report.lost_no_answer, report.lost_wrong_answer
    );
    println!(
        "state lost  {} (sessions rebuilt from their journal: {})",
        report.state_lost, report.session_rebuilds
    );
}
