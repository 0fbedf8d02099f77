//! Pipelining: which plain calls go to a worker ahead of their turn, and sending them.
//!
//! A plain call may be sent to a worker that is still running earlier calls when the
//! workers run its command inline (a sync handler; [`Manifest::pipelines`]) and the
//! command's calls have been quick: a moving average of how long they ran is under
//! [`QUICK_CALL`]. It then waits in the worker's pipe rather than in the pool's queue,
//! and the worker goes from one call to the next without waiting for the host. A
//! command whose calls take longer is never queued behind another call on a worker,
//! so a slow call cannot hold up calls another worker could run; and a command first
//! runs alone until its calls have been timed.
//!
//! A pipelined call's timeout counts from its start on the worker. If its worker dies
//! before it started (another call crashed it or timed out), it did not run and is
//! sent to another worker, up to [`NOT_STARTED_ATTEMPTS`] times in all.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::Result;
use crate::pool::scheduler::Mode;
use crate::pool::{Pool, Shared, run_leased};
use crate::worker::{CallControl, InLine, Manifest};

/// Calls of a command that run for less than this on average may be pipelined.
const QUICK_CALL: Duration = Duration::from_millis(1);

/// Most workers a pipelined call is sent to when each dies before it starts.
const NOT_STARTED_ATTEMPTS: usize = 4;

/// No running time measured yet.
const UNMEASURED: u64 = u64::MAX;

/// A moving average of how long each pipelinable command's calls ran on a worker.
#[derive(Debug, Default)]
pub(crate) struct RunningTimes {
    /// Nanoseconds by command, for the commands the workers run inline.
    by_command: OnceLock<HashMap<String, AtomicU64>>,
}

impl RunningTimes {
    /// Tracks the commands `manifest` says may be pipelined (the first call wins:
    /// every worker runs the same program).
    pub fn define(&self, manifest: &Manifest) {
        let _ = self.by_command.set(
            manifest
                .public_commands()
                .filter(|info| manifest.pipelines(&info.name))
                .map(|info| (info.name.clone(), AtomicU64::new(UNMEASURED)))
                .collect(),
        );
    }

    fn average(&self, command: &str) -> Option<&AtomicU64> {
        self.by_command.get()?.get(command)
    }

    /// Whether `command`'s calls may be pipelined: it is tracked and quick.
    pub fn is_quick(&self, command: &str) -> bool {
        self.average(command)
            .is_some_and(|ns| ns.load(Ordering::Relaxed) < QUICK_CALL.as_nanos() as u64)
    }

    /// Whether `command`'s calls are timed.
    pub fn tracks(&self, command: &str) -> bool {
        self.average(command).is_some()
    }

    /// A call of `command` ran for `took` (an eighth of the new average).
    pub fn record(&self, command: &str, took: Duration) {
        let Some(average) = self.average(command) else {
            return;
        };
        let sample = u64::try_from(took.as_nanos()).unwrap_or(UNMEASURED - 1);
        let old = average.load(Ordering::Relaxed);
        let new = if old == UNMEASURED {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        // Calls finishing at once may each overwrite the other's sample: an average
        // needs no more.
        average.store(new.min(UNMEASURED - 1), Ordering::Relaxed);
    }
}

impl Shared {
    /// Whether this pool sends calls ahead: its depth allows it, and no memory limit
    /// asks for each worker's memory to be read after every call before it serves
    /// again.
    fn pipelines(&self) -> bool {
        self.config.pipeline_depth > 1 && self.config.max_rss_bytes.is_none()
    }
}

impl Pool {
    /// Runs a plain call: pipelined when its command is quick (see the module), else
    /// on a worker with room for it.
    pub(crate) async fn run_plain(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
        control: CallControl,
    ) -> Result<Value> {
        self.check_call(command, &args)?;
        let shared = self.shared();
        let times = &shared.running_times;
        if shared.pipelines() && times.is_quick(command) {
            return self.run_in_line(command, args, timeout).await;
        }
        let lease = self.plain_lease(shared.mode_of(command)).await?;
        let started = times.tracks(command).then(Instant::now);
        let result = run_leased(lease, command, args, timeout, control).await;
        if let Some(started) = started {
            times.record(command, started.elapsed());
        }
        result
    }

    /// Sends a quick call ahead on the least busy worker; again elsewhere if its
    /// worker dies before it starts.
    async fn run_in_line(
        &self,
        command: &str,
        mut args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let times = &self.shared().running_times;
        let mut attempts = 0;
        loop {
            let lease = self.plain_lease(Mode::Pipelined).await?;
            let worker = lease.worker().clone();
            match worker
                .call_in_line(command, args, timeout, lease.into_hold())
                .await
            {
                InLine::Settled { result, took } => {
                    times.record(command, took);
                    return result;
                }
                InLine::NotStarted { args: back, error } => {
                    attempts += 1;
                    if attempts == NOT_STARTED_ATTEMPTS {
                        return Err(error);
                    }
                    tracing::debug!(worker = %worker.name(), command, "worker lost before a pipelined call started; sending it to another");
                    args = back;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{CommandInfo, Concurrency};

    fn manifest() -> Manifest {
        let mut manifest = Manifest {
            concurrency: Some(Concurrency {
                max_concurrency: 32,
                stream_window: 16,
                pipelining: true,
            }),
            ..Manifest::default()
        };
        for (name, concurrent) in [("sync", false), ("async", true)] {
            manifest.commands.insert(
                name.into(),
                CommandInfo {
                    name: name.into(),
                    concurrent,
                    ..CommandInfo::default()
                },
            );
        }
        manifest
    }

    #[test]
    fn only_sync_commands_measured_quick_are_pipelined() {
        let times = RunningTimes::default();
        times.define(&manifest());
        assert!(times.tracks("sync") && !times.tracks("async"));
        assert!(
            !times.is_quick("sync"),
            "unmeasured commands run alone first"
        );
        times.record("sync", Duration::from_micros(20));
        assert!(times.is_quick("sync"));
        times.record("async", Duration::from_micros(20));
        assert!(!times.is_quick("async") && !times.is_quick("unknown"));
    }

    #[test]
    fn a_slow_call_makes_its_command_run_alone_until_calls_are_quick_again() {
        let times = RunningTimes::default();
        times.define(&manifest());
        times.record("sync", Duration::from_micros(20));
        times.record("sync", Duration::from_secs(5));
        assert!(!times.is_quick("sync"));
        let mut quick_again_after = 0;
        while !times.is_quick("sync") {
            times.record("sync", Duration::from_micros(20));
            quick_again_after += 1;
            assert!(quick_again_after < 200, "never quick again");
        }
        assert!(quick_again_after > 10, "one slow call counts for a while");
    }

    #[test]
    fn a_manifest_without_pipelining_pipelines_nothing() {
        let mut manifest = manifest();
        manifest.concurrency.as_mut().unwrap().pipelining = false;
        let times = RunningTimes::default();
        times.define(&manifest);
        times.record("sync", Duration::from_micros(20));
        assert!(!times.is_quick("sync"));
    }
}
