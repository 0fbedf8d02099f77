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
    /// Run DSPy programs in several sessions over a pool, kill a worker mid-run, and
    /// show that nothing is lost.
    Demo(cli::demo::DemoArgs),
    /// Benchmarks.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
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
        Command::Demo(args) => cli::demo::run(args).await,
        Command::Bench(BenchArgs {
            what: BenchCommand::Startup(args),
        }) => cli::startup::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
