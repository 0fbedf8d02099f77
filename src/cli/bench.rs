//! `snakepool bench`: a load generator against its own pool or a server.

use super::pool_args::PoolArgs;

/// Options of `snakepool bench` (load).
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
}

/// Runs the load benchmark.
pub async fn run(_args: LoadArgs) -> Result<(), String> {
    Err("the load benchmark is being written".into())
}
