//! The subcommands of the `snakepool` binary.

pub mod bench;
pub mod call;
pub mod chaos;
pub mod demo;
pub mod doctor;
pub mod env;
pub mod logging;
pub mod pool_args;
pub mod serve;
pub mod startup;
