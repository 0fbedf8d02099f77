//! `snakepool call` (being written).

/// Options of `snakepool call`.
#[derive(clap::Args, Debug)]
pub struct CallArgs {}

/// Runs one call.
pub async fn run(_args: CallArgs) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
