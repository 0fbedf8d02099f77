//! The `snakepool` command.

mod cli;

use clap::{Parser, Subcommand};

/// The host allocates a few small buffers per call on every runtime thread; mimalloc's
/// thread-local free lists serve them at a fraction of the system allocator's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Pools of long-lived Python workers, with a DSPy bridge.
///
/// Logs go to stderr: `serve` logs at info (listening, workers started, lost with
/// their stderr, recycled, timeouts, session rebuilds, drain), the other commands at
/// warn. SNAKEPOOL_LOG or RUST_LOG (a tracing filter, e.g. `snakepool=debug,info`)
/// override --log-level.
#[derive(Parser)]
#[command(name = "snakepool", version, about, long_about)]
struct Cli {
    /// Least severe log level shown: error, warn, info, debug or trace.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines as `text` (coloured only on a terminal) or `json`.
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: cli::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a pool over HTTP.
    Serve(cli::serve::ServeArgs),
    /// Call one command, against a server (--url) or a pool of its own.
    Call(cli::call::CallArgs),
    /// Load-test a pool or a server; `bench startup` times worker start-up.
    Bench(BenchArgs),
    /// Check the Python environment and say how to fix what is wrong.
    Doctor(cli::doctor::DoctorArgs),
    /// Run DSPy programs in several sessions over a pool, kill a worker mid-run, and
    /// show that nothing is lost.
    Demo(cli::demo::DemoArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchCommand>,
    #[command(flatten)]
    load: cli::bench::LoadArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time to ready, respawn latency and memory per worker, zygote against fresh.
    Startup(cli::startup::StartupArgs),
}

/// Threads for the async runtime of `command`: `None` for tokio's default (one per
/// core); the chosen number; for `serve`, the cores its workers leave.
fn runtime_threads(command: &Command) -> Result<Option<usize>, String> {
    match command {
        Command::Serve(args) => args.runtime_threads(),
        Command::Call(args) => args.runtime_threads(),
        Command::Bench(BenchArgs { what: None, load }) => load.runtime_threads(),
        _ => Ok(None),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    match runtime_threads(&cli.command) {
        Ok(Some(threads)) => {
            runtime.worker_threads(threads);
        }
        Ok(None) => {}
        Err(message) => {
            eprintln!("error: {message}");
            return std::process::ExitCode::from(2);
        }
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> std::process::ExitCode {
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    if let Err(message) =
        cli::logging::init(cli.log_level.as_deref(), cli.log_format, default_level)
    {
        eprintln!("error: {message}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(args) => cli::serve::run(args).await,
        Command::Call(args) => return cli::call::run(args).await,
        Command::Bench(BenchArgs {
            what: Some(BenchCommand::Startup(args)),
            ..
        }) => cli::startup::run(args).await,
        Command::Bench(BenchArgs { what: None, load }) => cli::bench::run(load).await,
        Command::Doctor(args) => return cli::doctor::run(args).await,
        Command::Demo(args) => cli::demo::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
