//! Reloading handler code without dropping a call: a new zygote imports the code as
//! it is now (if the zygote is in use), then the workers are replaced one at a time,
//! each new one started before its predecessor retires (which finishes its calls
//! first); sessions move to the new workers through their journals. If the new code
//! cannot be imported, or a new worker cannot start, the reload stops there and the
//! workers not yet replaced go on serving.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::Error;
use crate::pool::supervisor::Event;
use crate::pool::{PoolEvent, Shared};

/// What a reload did.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Workers replaced by workers running the new code.
    pub replaced: usize,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

impl Shared {
    /// Reloads the handler code (see the module documentation); one reload at a time.
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<ReloadReport, Error> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let failed = |reason: String| Error::ReloadFailed { reason };
        self.spawner
            .renew_zygote(self)
            .await
            .map_err(|e| failed(format!("the new code does not import: {e}")))?;
        let old: Vec<Arc<str>> = self.lock().slots.keys().cloned().collect();
        for (done, worker) in old.iter().enumerate() {
            self.replace(worker).await.map_err(|reason| {
                failed(format!(
                    "{reason}; {done} of {} workers run the new code, the others the old",
                    old.len()
                ))
            })?;
        }
        tracing::info!(replaced = old.len(), "handler code reloaded");
        Ok(ReloadReport {
            replaced: old.len(),
            took_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Replaces `worker` by a new one and waits until it is retired.
    async fn replace(self: &Arc<Self>, worker: &Arc<str>) -> Result<(), String> {
        let mut events = self.notices.subscribe();
        let _ = self.events.send(Event::Recycle {
            worker: worker.clone(),
        });
        let config = &self.config;
        let limit =
            config.worker.startup_timeout + config.request_timeout + config.max_restart_backoff;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.lock().slots.contains_key(worker) {
                return Ok(());
            }
            while let Ok(event) = events.try_recv() {
                if let PoolEvent::WorkerStartFailed { reason } = event {
                    return Err(format!("a worker with the new code cannot start: {reason}"));
                }
            }
            tokio::select! {
                () = changed => {}
                event = events.recv() => {
                    if let Ok(PoolEvent::WorkerStartFailed { reason }) = event {
                        return Err(format!("a worker with the new code cannot start: {reason}"));
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(format!("worker {worker} was not replaced within {limit:?}"));
                }
            }
        }
    }
}
