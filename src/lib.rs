//! snakepool: pools of long-lived Python worker processes, called from Rust.
//!
//! Plain calls go to any free worker; session calls always go to the session's own
//! worker, in order, and a session whose worker died is rebuilt on another from its
//! journal before its next call. Workers that time out, crash or break the protocol
//! are killed and replaced; no caller ever sees another call's reply.
//!
//! ```no_run
//! # async fn demo() -> snakepool::Result<()> {
//! use serde_json::json;
//!
//! let pool = snakepool::Pool::builder().workers(2).start().await?;
//! let pong = pool.call("ping", json!({})).await?;
//! assert_eq!(pong["status"], "ok");
//! pool.shutdown().await;
//! # Ok(()) }
//! ```

pub mod call;
pub mod command_metrics;
pub mod config;
pub mod dspy;
pub mod error;
mod heap;
pub mod journal;
pub mod lm_policy;
pub mod metrics;
pub mod pool;
pub mod protocol;
#[cfg(feature = "cli")]
pub mod pyenv;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod worker;

pub use call::{CallOptions, CallStream, CancellationToken, StreamEvent};
pub use error::{Error, Result};

/// The README's Rust examples, compiled as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
pub use journal::{
    JournalEntry, JournalError, JournalStats, MemoryJournal, RedisJournal, RedisOptions,
    SessionJournal, SqliteJournal, StoredSession, SyncPolicy,
};
pub use metrics::MetricsSnapshot;
pub use pool::{
    JournalLimits, Pool, PoolBuilder, PoolConfig, PoolEvent, PoolStatus, ReloadReport, SessionInfo,
    SessionReply, SessionState, SpawnMode, WorkerInfo, ZygoteStatus,
};
pub use session::Session;
