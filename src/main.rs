//! The `snakepool` command.

mod cli;

use clap::{Parser, Subcommand};

/// Pools of long-lived Python workers, with a DSPy bridge.
#[derive(Parser)]
#[command(name = "snakepool", version, about)]
struct Cli {
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SNAKEPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
