//! Starting workers: forked from the zygote when that is possible and safe, fresh
//! otherwise.
//!
//! A zygote that dies is restarted in the background; until it is back, workers start
//! fresh, so no call waits on it. A zygote that is not fork-safe (a preloaded module
//! started a thread) is stopped for good, with a warning naming the threads.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pool::{PoolEvent, Shared};
use crate::worker::zygote::{ForkError, Zygote};
use crate::worker::{ExitInfo, RawProcess, Worker, WorkerProgram, WorkerSpec};

/// How workers are started.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpawnMode {
    /// Fork each worker from a zygote that has imported the modules once (falls back
    /// to fresh spawns when the zygote is down or unsafe, or for custom commands).
    #[default]
    Zygote,
    /// Start each worker as a new interpreter.
    Fresh,
}

impl std::str::FromStr for SpawnMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zygote" => Ok(SpawnMode::Zygote),
            "fresh" => Ok(SpawnMode::Fresh),
            other => Err(format!(
                "unknown spawn mode `{other}` (expected zygote or fresh)"
            )),
        }
    }
}

enum Slot {
    /// Not started yet, or down and due for a restart at this instant.
    Down { retry_at: Instant, failures: u32 },
    /// A restart is under way.
    Starting,
    /// Serving.
    Up(Arc<Zygote>),
    /// Never again, for this reason.
    Disabled,
}

/// The zygote's state, as reported by [`crate::Pool::zygote_status`].
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZygoteStatus {
    /// The configured spawn mode.
    pub mode: SpawnMode,
    /// `serving`, `starting`, `down` or `disabled`.
    pub state: &'static str,
    /// The zygote's pid while serving.
    pub pid: Option<u32>,
    /// The last reason it could not be used, if any.
    pub problem: Option<String>,
}

/// Starts workers for one pool.
pub(crate) struct Spawner {
    mode: SpawnMode,
    slot: std::sync::Mutex<Slot>,
    problem: std::sync::Mutex<Option<String>>,
}

impl Spawner {
    pub fn new(mode: SpawnMode, spec: &WorkerSpec) -> Self {
        let usable =
            mode == SpawnMode::Zygote && matches!(spec.program, WorkerProgram::Runtime { .. });
        let slot = if usable {
            Slot::Down {
                retry_at: Instant::now(),
                failures: 0,
            }
        } else {
            Slot::Disabled
        };
        Spawner {
            mode,
            slot: std::sync::Mutex::new(slot),
            problem: std::sync::Mutex::new(None),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> SpawnMode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().expect("zygote slot poisoned")
    }

    /// The zygote's pid, if one is serving.
    pub fn zygote_pid(&self) -> Option<u32> {
        match &*self.lock() {
            Slot::Up(z) if z.is_alive() => Some(z.pid()),
            _ => None,
        }
    }

    /// The zygote's state and last problem.
    pub fn status(&self) -> ZygoteStatus {
        let (state, pid) = match &*self.lock() {
            Slot::Up(z) if z.is_alive() => ("serving", Some(z.pid())),
            Slot::Up(_) | Slot::Down { .. } => ("down", None),
            Slot::Starting => ("starting", None),
            Slot::Disabled => ("disabled", None),
        };
        ZygoteStatus {
            mode: self.mode,
            state,
            pid,
            problem: self
                .problem
                .lock()
                .expect("zygote problem poisoned")
                .clone(),
        }
    }

    /// Logs, records and announces why the zygote is not used.
    fn report_problem(&self, shared: &Shared, reason: String) {
        tracing::warn!("{reason}");
        *self.problem.lock().expect("zygote problem poisoned") = Some(reason.clone());
        shared.notify(PoolEvent::ZygoteUnavailable { reason });
    }

    /// Starts the zygote and waits for it (used when the pool starts).
    pub async fn start_zygote(&self, shared: &Shared) {
        let due = matches!(*self.lock(), Slot::Down { .. });
        if due {
            *self.lock() = Slot::Starting;
            self.finish_start(shared, Zygote::start(&shared.config.worker).await, 0);
        }
    }

    fn finish_start(&self, shared: &Shared, started: Result<Arc<Zygote>, String>, failures: u32) {
        let mut slot = self.lock();
        if matches!(*slot, Slot::Disabled) {
            if let Ok(zygote) = started {
                zygote.kill();
            }
            return;
        }
        match started {
            Ok(zygote) if !zygote.hello().fork_safe => {
                let reason = format!(
                    "a preloaded module started threads ({}); forking would be unsafe, so \
                     workers start fresh",
                    zygote.hello().threads.join(", ")
                );
                zygote.kill();
                *slot = Slot::Disabled;
                drop(slot);
                self.report_problem(shared, reason);
            }
            Ok(zygote) => {
                let pid = zygote.pid();
                *slot = Slot::Up(zygote);
                drop(slot);
                tracing::info!(pid, "zygote ready");
                shared.notify(PoolEvent::ZygoteReady { pid });
            }
            Err(reason) => {
                let failures = failures + 1;
                let delay = shared.config.backoff(failures);
                *slot = Slot::Down {
                    retry_at: Instant::now() + delay,
                    failures,
                };
                drop(slot);
                let reason = format!("zygote failed to start ({reason}); workers start fresh");
                self.report_problem(shared, reason);
            }
        }
    }

    /// The serving zygote, or `None` (restarting it in the background when due).
    fn zygote(&self, shared: &Arc<Shared>) -> Option<Arc<Zygote>> {
        let mut slot = self.lock();
        if let Slot::Up(zygote) = &*slot {
            if zygote.is_alive() {
                return Some(zygote.clone());
            }
            let reason = format!(
                "the zygote (pid {}) exited; workers start fresh until it is back",
                zygote.pid()
            );
            self.report_problem(shared, reason);
            *slot = Slot::Down {
                retry_at: Instant::now(),
                failures: 0,
            };
        }
        if let Slot::Down { retry_at, failures } = *slot
            && retry_at <= Instant::now()
            && !shared.lock().shutting_down
        {
            *slot = Slot::Starting;
            let shared = shared.clone();
            tokio::spawn(async move {
                let started = Zygote::start(&shared.config.worker).await;
                shared.spawner.finish_start(&shared, started, failures);
            });
        }
        None
    }

    /// Marks the zygote unusable after it refused to fork unsafely.
    fn disable(&self, shared: &Shared, reason: String) {
        let previous = std::mem::replace(&mut *self.lock(), Slot::Disabled);
        if let Slot::Up(zygote) = previous {
            zygote.kill();
        }
        let reason = format!("the zygote is not fork-safe ({reason}); workers start fresh");
        self.report_problem(shared, reason);
    }

    /// Starts worker `id`, from the zygote if possible, and completes its handshake.
    pub async fn launch(
        &self,
        shared: &Arc<Shared>,
        id: &str,
        on_exit: impl Fn(ExitInfo) + Clone + Send + 'static,
    ) -> Result<Worker, Error> {
        let spec = &shared.config.worker;
        if let (Some(zygote), Some(args)) = (self.zygote(shared), spec.runtime_args(id)) {
            match zygote.fork(id, args, on_exit.clone()).await {
                Ok(process) => return Worker::handshake(spec, id, process).await,
                Err(ForkError::Unsafe(reason)) => self.disable(shared, reason),
                Err(error) => tracing::warn!(%error, worker = id, "fork failed; starting fresh"),
            }
        }
        let process = RawProcess::spawn_fresh(spec, id, on_exit)?;
        Worker::handshake(spec, id, process).await
    }

    /// Starts a new zygote (it imports the modules as they are now) and, once it is
    /// ready, puts it in place of the serving one, which is stopped; the workers it
    /// forked go on. On failure the serving one stays. Without a zygote in use, does
    /// nothing: fresh workers import the code as it is when they start.
    pub async fn renew_zygote(&self, shared: &Shared) -> Result<(), String> {
        if matches!(*self.lock(), Slot::Disabled) {
            return Ok(());
        }
        let zygote = Zygote::start(&shared.config.worker).await?;
        if !zygote.hello().fork_safe {
            zygote.kill();
            let reason = "the new code starts threads at import: workers start fresh".to_owned();
            self.disable(shared, reason);
            return Ok(());
        }
        let pid = zygote.pid();
        let previous = std::mem::replace(&mut *self.lock(), Slot::Up(zygote));
        if let Slot::Up(old) = previous {
            old.kill();
        }
        tracing::info!(pid, "new zygote ready");
        shared.notify(PoolEvent::ZygoteReady { pid });
        Ok(())
    }

    /// Stops the zygote for good.
    pub fn shutdown(&self) {
        let previous = std::mem::replace(&mut *self.lock(), Slot::Disabled);
        if let Slot::Up(zygote) = previous {
            zygote.kill();
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
