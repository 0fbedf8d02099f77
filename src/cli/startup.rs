//! `snakepool bench startup`: time to ready, respawn latency and per-worker memory, in
//! zygote and fresh mode, against `python -c "import dspy"` timed in the same run.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use snakepool::{Pool, PoolEvent, SpawnMode};

/// Options of `snakepool bench startup`.
#[derive(clap::Args, Debug)]
pub struct StartupArgs {
    /// Workers per pool.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Spawn mode to measure; both when absent.
    #[arg(long)]
    spawn: Option<SpawnMode>,
    /// Pool starts measured per mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Worker kills timed per mode for the respawn latency.
    #[arg(long, default_value_t = 20)]
    respawns: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Python interpreter with DSPy; without it the project's venv is set up and used.
    #[arg(long, env = "SNAKEPOOL_PYTHON")]
    python: Option<String>,
}

/// Memory of one process from `/proc/PID/smaps_rollup`, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Memory {
    pss_kib: u64,
    uss_kib: u64,
}

fn memory_of(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Some(Memory {
        pss_kib: field("Pss:"),
        uss_kib: field("Private_Clean:") + field("Private_Dirty:"),
    })
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

/// One mode's figures.
#[derive(Debug, Serialize)]
struct ModeReport {
    mode: SpawnMode,
    ready_ms_median: f64,
    ready_ms_rounds: Vec<f64>,
    ready_vs_import: f64,
    respawn_ms_median: f64,
    respawn_ms_p90: f64,
    worker_pss_kib_median: u64,
    worker_uss_kib_median: u64,
    zygote_uss_kib: Option<u64>,
}

async fn import_dspy_ms(python: &str) -> Result<f64, String> {
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let status = tokio::process::Command::new(python)
            .args(["-c", "import dspy"])
            .status()
            .await
            .map_err(|e| format!("running {python}: {e}"))?;
        if !status.success() {
            return Err(format!("`{python} -c \"import dspy\"` failed ({status})"));
        }
        rounds.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&mut rounds))
}

async fn start_pool(python: &str, workers: usize, mode: SpawnMode) -> Result<Pool, String> {
    Pool::builder()
        .workers(workers)
        .python(python)
        .module("snakepool_worker.dspy")
        .preload("dspy")
        .spawn_mode(mode)
        .health_interval(None)
        .start()
        .await
        .map_err(|e| e.to_string())
}

async fn measure_mode(
    args: &StartupArgs,
    python: &str,
    mode: SpawnMode,
    import_ms: f64,
) -> Result<ModeReport, String> {
    let mut ready = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let started = Instant::now();
        let pool = start_pool(python, args.workers, mode).await?;
        ready.push(started.elapsed().as_secs_f64() * 1000.0);
        pool.shutdown().await;
    }
    let ready_ms_rounds = ready.clone();
    let ready_ms_median = median(&mut ready);

    let pool = start_pool(python, args.workers, mode).await?;
    if mode == SpawnMode::Zygote && pool.zygote_pid().is_none() {
        let problem = pool.zygote_status().problem.unwrap_or_default();
        pool.shutdown().await;
        return Err(format!("the zygote is not serving: {problem}"));
    }
    let mut events = pool.subscribe();
    let mut respawns = Vec::new();
    for _ in 0..args.respawns {
        let Some(victim) = pool.status().workers.first().map(|w| w.pid) else {
            break;
        };
        let killed = Instant::now();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) };
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(PoolEvent::WorkerReady { .. }) => return Ok(()),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .map_err(|_| "no replacement within 60 s".to_owned())??;
        respawns.push(killed.elapsed().as_secs_f64() * 1000.0);
    }
    let mut pss = Vec::new();
    let mut uss = Vec::new();
    for worker in pool.status().workers {
        if let Some(m) = memory_of(worker.pid) {
            pss.push(m.pss_kib as f64);
            uss.push(m.uss_kib as f64);
        }
    }
    let zygote_uss_kib = pool.zygote_pid().and_then(memory_of).map(|m| m.uss_kib);
    pool.shutdown().await;
    Ok(ModeReport {
        mode,
        ready_ms_median,
        ready_ms_rounds,
        ready_vs_import: ready_ms_median / import_ms,
        respawn_ms_median: median(&mut respawns.clone()),
        respawn_ms_p90: percentile(&mut respawns, 0.9),
        worker_pss_kib_median: median(&mut pss) as u64,
        worker_uss_kib_median: median(&mut uss) as u64,
        zygote_uss_kib,
    })
}

/// Runs the start-up benchmark.
pub async fn run(args: StartupArgs) -> Result<(), String> {
    let python = super::demo::python_with_dspy(args.python.as_deref()).await?;
    let import_ms = import_dspy_ms(&python).await?;
    let modes = match args.spawn {
        Some(mode) => vec![mode],
        None => vec![SpawnMode::Fresh, SpawnMode::Zygote],
    };
    let mut reports = Vec::new();
    for mode in modes {
        reports.push(measure_mode(&args, &python, mode, import_ms).await?);
    }
    if args.json {
        println!(
            "{}",
            json!({"workers": args.workers, "import_dspy_ms": import_ms, "modes": reports})
        );
        return Ok(());
    }
    println!(
        "{} DSPy workers per pool; `python -c \"import dspy\"` median {:.0} ms (same run)",
        args.workers, import_ms
    );
    println!(
        "{:<7} {:>13} {:>10} {:>15} {:>13} {:>13} {:>13}",
        "mode",
        "ready (ms)",
        "÷ import",
        "respawn p50/p90",
        "worker PSS",
        "worker USS",
        "zygote USS"
    );
    for r in &reports {
        println!(
            "{:<7} {:>13.0} {:>9.2}× {:>8.1}/{:<6.1} {:>10} KiB {:>9} KiB {:>13}",
            format!("{:?}", r.mode).to_lowercase(),
            r.ready_ms_median,
            r.ready_vs_import,
            r.respawn_ms_median,
            r.respawn_ms_p90,
            r.worker_pss_kib_median,
            r.worker_uss_kib_median,
            r.zygote_uss_kib
                .map_or("-".to_owned(), |k| format!("{k} KiB")),
        );
    }
    Ok(())
}
