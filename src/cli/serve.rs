//! `snakepool serve` (being written).

/// Options of `snakepool serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

/// Runs the server.
pub async fn run(_args: ServeArgs) -> Result<(), String> {
    Err("being written".into())
}
