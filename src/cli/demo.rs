//! `snakepool demo`: DSPy programs in several sessions over a pool of workers, a worker
//! killed mid-run, and the proof that its sessions' programs still answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use snakepool::dspy::{Dspy, FieldType, Lm, Prediction, Program, ProgramKind, Signature};
use snakepool::lm_policy::LmProfile;
use snakepool::{Error, Pool};
use tokio::sync::Notify;

/// Options of `snakepool demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Workers in the pool.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// A real model (litellm name, e.g. `openai/gpt-4o-mini`); without it the demo uses
    /// DSPy's DummyLM.
    #[arg(long, env = "SNAKEPOOL_LM")]
    lm: Option<String>,
    /// The model's OpenAI-compatible endpoint, e.g. `http://127.0.0.1:8080/v1`.
    #[arg(long, env = "SNAKEPOOL_API_BASE")]
    api_base: Option<String>,
    /// The environment variable holding the API key (read by the workers).
    #[arg(long, env = "SNAKEPOOL_API_KEY_ENV")]
    api_key_env: Option<String>,
    /// Python interpreter with DSPy installed; without it the demo sets up its own venv.
    #[arg(long, env = "SNAKEPOOL_PYTHON")]
    python: Option<String>,
    /// Questions asked of each program.
    #[arg(long, default_value_t = 10)]
    questions: usize,
}

const SESSIONS: [&str; 4] = ["alice", "bob", "carol", "dave"];

const CAPITALS: [(&str, &str); 8] = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Canada", "Ottawa"),
    ("Norway", "Oslo"),
    ("Egypt", "Cairo"),
    ("Chile", "Santiago"),
];

fn capital_question(i: usize) -> (String, String) {
    let (country, city) = CAPITALS[i % CAPITALS.len()];
    (
        format!("What is the capital of {country}?"),
        city.to_owned(),
    )
}

fn sum_question(session: usize, i: usize) -> (String, i64, i64) {
    let a = (7 * i + 3 * session + 11) as i64;
    let b = (5 * i + 13) as i64;
    (format!("What is {a} plus {b}?"), a, b)
}

/// DummyLM answers keyed by question, so every question has its scripted answer.
fn dummy_lm(session: usize, questions: usize) -> Lm {
    let mut answers = serde_json::Map::new();
    for i in 0..questions {
        let (q, city) = capital_question(i);
        answers.insert(q, json!({"answer": city}));
        let (q, a, b) = sum_question(session, i);
        answers.insert(
            q,
            json!({"reasoning": format!("{a} + {b} = {}", a + b), "answer": (a + b).to_string()}),
        );
    }
    Lm::dummy_by_prompt(answers)
}

#[derive(Deserialize)]
struct CapitalAnswer {
    answer: String,
}

#[derive(Deserialize)]
struct SumAnswer {
    answer: i64,
}

/// What one program of one session did during the run.
#[derive(Default)]
struct Tally {
    asked: usize,
    answered: usize,
    correct: usize,
    retried: usize,
    failed: BTreeMap<&'static str, usize>,
    first_error: Option<String>,
    sample: String,
}

impl Tally {
    fn failed(&mut self, error: &Error) {
        *self.failed.entry(error.kind()).or_default() += 1;
        self.first_error.get_or_insert_with(|| error.to_string());
    }
}

/// One session's programs and bookkeeping.
struct DemoSession {
    name: &'static str,
    dspy: Dspy,
    predictor: Program,
    reasoner: Program,
}

fn make_lm(args: &DemoArgs, session: usize) -> Lm {
    match &args.lm {
        None => dummy_lm(session, args.questions),
        Some(_) => Lm::profile(DEMO_PROFILE),
    }
}

/// The LM profile the demo defines from `--lm`, `--api-base` and `--api-key-env`.
const DEMO_PROFILE: &str = "demo";

fn demo_profile(args: &DemoArgs) -> Option<LmProfile> {
    let model = args.lm.as_ref()?;
    let mut profile = LmProfile::new(model.clone());
    profile.api_base.clone_from(&args.api_base);
    profile.api_key_env.clone_from(&args.api_key_env);
    Some(profile)
}

/// Runs one call, retrying once if the worker died under it (the session is rebuilt
/// on another worker before the retry).
async fn with_one_retry<T, F, Fut>(call: F, tally: &mut Tally) -> Result<T, Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    match call().await {
        Err(error) if error.lost_worker() => {
            tally.retried += 1;
            call().await
        }
        other => other,
    }
}

/// Where a program's calls report their progress.
#[derive(Clone)]
struct Progress {
    bar: ProgressBar,
    done: Arc<(AtomicUsize, Notify)>,
}

impl Progress {
    fn one_more(&self) {
        self.bar.inc(1);
        self.done.0.fetch_add(1, Ordering::SeqCst);
        self.done.1.notify_waiters();
    }
}

/// Asks `program` each question in turn; `judge` says whether an answer is right and
/// how to show it.
async fn ask<O, J>(program: Program, questions: Vec<String>, judge: J, progress: Progress) -> Tally
where
    O: DeserializeOwned,
    J: Fn(usize, &Prediction<O>) -> (bool, String),
{
    let mut tally = Tally::default();
    for (i, question) in questions.iter().enumerate() {
        tally.asked += 1;
        let inputs = json!({ "question": question });
        match with_one_retry(|| program.call::<_, O>(&inputs), &mut tally).await {
            Ok(prediction) => {
                tally.answered += 1;
                let (correct, shown) = judge(i, &prediction);
                tally.correct += usize::from(correct);
                tally.sample = format!("{question} → {shown}");
            }
            Err(error) => tally.failed(&error),
        }
        progress.one_more();
    }
    tally
}

async fn ask_capitals(program: Program, questions: usize, progress: Progress) -> Tally {
    let asked = (0..questions).map(|i| capital_question(i).0).collect();
    let judge = |i: usize, p: &Prediction<CapitalAnswer>| {
        let city = capital_question(i).1;
        let answer = &p.outputs.answer;
        let correct = answer.to_lowercase().contains(&city.to_lowercase());
        (correct, answer.clone())
    };
    ask(program, asked, judge, progress).await
}

async fn ask_sums(program: Program, session: usize, questions: usize, progress: Progress) -> Tally {
    let asked = (0..questions).map(|i| sum_question(session, i).0).collect();
    let judge = |i: usize, p: &Prediction<SumAnswer>| {
        let (_, a, b) = sum_question(session, i);
        let reasoning = p.reasoning.clone().unwrap_or_default();
        let shown = format!("{} ({reasoning})", p.outputs.answer);
        (p.outputs.answer == a + b, shown)
    };
    ask(program, asked, judge, progress).await
}

/// The interpreter to use: `configured`, or the project's venv with DSPy (set up on
/// first use).
pub async fn python_with_dspy(configured: Option<&str>) -> Result<String, String> {
    if let Some(python) = configured {
        return Ok(python.to_owned());
    }
    let venv = super::env::demo_venv();
    let python =
        tokio::task::spawn_blocking(move || snakepool::pyenv::ensure_dspy_env(&venv, "python3"))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("setting up Python with DSPy: {e}"))?;
    Ok(python.display().to_string())
}

async fn open_session(pool: &Pool, index: usize, args: &DemoArgs) -> Result<DemoSession, Error> {
    let name = SESSIONS[index];
    let dspy = Dspy::new(pool.session(name));
    dspy.configure_lm(&make_lm(args, index)).await?;
    let predictor = dspy
        .create_program("question -> answer", ProgramKind::Predict)
        .await?;
    let arithmetic = Signature::new()
        .instructions("Add the two numbers in the question.")
        .input("question", FieldType::Str, "an addition in words")
        .output("answer", FieldType::Int, "the sum");
    let reasoner = dspy
        .create_program(arithmetic, ProgramKind::ChainOfThought)
        .await?;
    Ok(DemoSession {
        name,
        dspy,
        predictor,
        reasoner,
    })
}

fn worker_pid(pool: &Pool, worker: &str) -> Option<u32> {
    pool.status()
        .workers
        .into_iter()
        .find(|w| w.id == worker)
        .map(|w| w.pid)
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<(), String> {
    let python = python_with_dspy(args.python.as_deref()).await?;
    match &args.lm {
        None => println!(
            "LM: DSPy DummyLM with scripted answers — no model is configured, so no model is \
             called. Pass --lm MODEL --api-base URL to use a real one."
        ),
        Some(model) => println!(
            "LM: {model} at {}",
            args.api_base
                .as_deref()
                .unwrap_or("the provider's default endpoint")
        ),
    }

    let started = Instant::now();
    let mut builder = Pool::builder()
        .workers(args.workers)
        .python(&python)
        .module("snakepool_worker.dspy")
        .preload("dspy")
        .request_timeout(Duration::from_secs(120));
    if let Some(profile) = demo_profile(&args) {
        builder = builder.lm_profile(DEMO_PROFILE, profile);
    }
    let pool = builder.start().await.map_err(|e| e.to_string())?;
    println!(
        "{} workers ready in {:.2?}, each with DSPy imported",
        args.workers,
        started.elapsed()
    );

    let mut sessions = Vec::new();
    for index in 0..SESSIONS.len() {
        sessions.push(
            open_session(&pool, index, &args)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let placement: Vec<(String, String)> = sessions
        .iter()
        .map(|s| {
            let worker = s.dspy.session().worker_id().unwrap_or_default();
            (s.name.to_owned(), worker)
        })
        .collect();
    println!(
        "sessions with a predictor and a chain of thought each: {}",
        placement
            .iter()
            .map(|(s, w)| format!("{s}→{w}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let total = sessions.len() * 2 * args.questions;
    let progress = ProgressBar::new(total as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} calls [{elapsed}] {msg}")
            .expect("valid progress template"),
    );
    // Calls answered per session, so the kill lands in the middle of the first
    // session's run.
    let done: Vec<Arc<(AtomicUsize, Notify)>> = sessions
        .iter()
        .map(|_| Arc::new((AtomicUsize::new(0), Notify::new())))
        .collect();
    let mut tasks = Vec::new();
    for (index, session) in sessions.iter().enumerate() {
        let report = Progress {
            bar: progress.clone(),
            done: done[index].clone(),
        };
        tasks.push(tokio::spawn(ask_capitals(
            session.predictor.clone(),
            args.questions,
            report.clone(),
        )));
        tasks.push(tokio::spawn(ask_sums(
            session.reasoner.clone(),
            index,
            args.questions,
            report,
        )));
    }

    // Halfway through its calls, kill the first session's worker from outside.
    let victim_session = &sessions[0];
    let victim_done = &done[0];
    loop {
        let notified = victim_done.1.notified();
        if victim_done.0.load(Ordering::SeqCst) >= args.questions {
            break;
        }
        notified.await;
    }
    let victim = victim_session.dspy.session().worker_id();
    let victim_pid = victim.as_deref().and_then(|w| worker_pid(&pool, w));
    if let (Some(worker), Some(pid)) = (&victim, victim_pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        progress.suspend(|| {
            println!(
                "killed worker {worker} (pid {pid}) holding session `{}` with kill -9, \
                 {} of its {} calls in",
                victim_session.name,
                victim_done.0.load(Ordering::SeqCst),
                2 * args.questions
            )
        });
    }

    let mut tallies = Vec::new();
    for task in tasks {
        tallies.push(task.await.map_err(|e| e.to_string())?);
    }
    progress.finish_and_clear();

    println!();
    println!(
        "{:<7} {:<17} {:<9} {:>8} {:>8} {:>8}  sample",
        "session", "program", "worker", "answered", "correct", "retried"
    );
    for (index, session) in sessions.iter().enumerate() {
        let before = &placement[index].1;
        let now = session.dspy.session().worker_id().unwrap_or_default();
        let worker = if *before == now {
            now
        } else {
            format!("{before}→{now}")
        };
        for (kind, tally) in [
            ("predict", &tallies[2 * index]),
            ("chain_of_thought", &tallies[2 * index + 1]),
        ] {
            println!(
                "{:<7} {:<17} {:<9} {:>8} {:>8} {:>8}  {}",
                session.name,
                kind,
                worker,
                format!("{}/{}", tally.answered, tally.asked),
                tally.correct,
                tally.retried,
                tally.sample
            );
            for (error, count) in &tally.failed {
                println!("        {count} call(s) failed: {error}");
            }
            if let Some(first) = &tally.first_error {
                println!("        first failure: {first}");
            }
        }
    }

    // The killed worker's session: its programs were rebuilt from the journal.
    let programs = victim_session
        .dspy
        .list_programs()
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "\nsession `{}` after the kill: {} programs rebuilt from its journal on worker {} ({})",
        victim_session.name,
        programs.len(),
        victim_session
            .dspy
            .session()
            .worker_id()
            .unwrap_or_default(),
        programs
            .iter()
            .map(|p| format!("{} {}", p.program_id, p.signature))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let m = pool.metrics();
    println!(
        "pool: {} calls, {} ok, errors {:?}; latency p50 {:.2} ms, p99 {:.2} ms; \
         worker starts {}, crashes {}, restarts {}; session rebuilds {}",
        m.calls,
        m.calls_ok,
        m.errors,
        m.call_latency.p50_us as f64 / 1000.0,
        m.call_latency.p99_us as f64 / 1000.0,
        m.worker_starts,
        m.worker_crashes,
        m.worker_starts.saturating_sub(args.workers as u64),
        m.session_rebuilds
    );
    for session in &sessions {
        let _ = session.dspy.session().close().await;
    }
    pool.shutdown().await;
    let lost: usize = tallies.iter().map(|t| t.asked - t.answered).sum();
    if lost > 0 {
        return Err(format!("{lost} questions got no answer"));
    }
    Ok(())
}
