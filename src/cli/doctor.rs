//! `snakepool doctor` (being written).

/// Options of `snakepool doctor`.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

/// Runs the checks.
pub async fn run(_args: DoctorArgs) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
