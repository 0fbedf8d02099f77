//! The subcommands of the `snakepool` binary.

pub mod demo;
pub mod startup;
