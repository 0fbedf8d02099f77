//! The supervisor task: keeps the pool at its size (with back-off on failed starts),
//! recycles workers, pings idle ones, and expires idle sessions.
//!
//! It reacts to [`Event`]s and to a maintenance tick; it never does a worker's pipe
//! I/O itself (health pings run on tasks of their own).

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::metrics::Counter;
use crate::pool::scheduler::stop_in_background;
use crate::pool::{PoolEvent, Shared};
use crate::worker::{ExitInfo, Worker};

/// Most sessions closed by their TTL per maintenance tick, so a wave of expiries
/// cannot flood the workers with cleanups.
const EXPIRE_PER_TICK: usize = 256;
/// Most idle sessions evicted from their workers per maintenance tick.
const EVICT_PER_TICK: usize = 1024;

/// What the supervisor reacts to.
#[derive(Debug)]
pub(crate) enum Event {
    /// A worker process exited (idle or busy).
    Exited { worker: Arc<str>, info: ExitInfo },
    /// A worker was removed: start replacements up to the pool's size.
    Capacity,
    /// A worker reached its call limit: start its replacement.
    Recycle { worker: Arc<str> },
    /// A start attempt finished.
    Started {
        replacing: Option<Arc<str>>,
        result: Box<Result<Worker, Error>>,
    },
    /// The pool handle is gone or shut down: stop supervising.
    Stop,
}

struct Supervisor {
    shared: Arc<Shared>,
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
    /// Sessions evicted as of the last time freed memory was handed back.
    evictions_trimmed: u64,
}

/// Runs the supervisor until [`Event::Stop`] or until every sender is gone.
pub(crate) async fn run(shared: Arc<Shared>, mut events: mpsc::UnboundedReceiver<Event>) {
    let mut tick = tokio::time::interval(shared.config.maintenance_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sup = Supervisor {
        shared,
        failures: 0,
        retry_at: None,
        evictions_trimmed: 0,
    };
    loop {
        let retry_at = sup.retry_at;
        let retry = async move {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                None | Some(Event::Stop) => break,
                Some(event) => sup.handle(event),
            },
            () = retry => {
                sup.retry_at = None;
                sup.ensure_capacity();
            }
            _ = tick.tick() => sup.maintain(),
        }
    }
    // The workers go with the supervisor (the pool handle was dropped): the last
    // handle on a worker kills it.
    let slots = std::mem::take(&mut sup.shared.lock().slots);
    drop(slots);
}

impl Supervisor {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { worker, info } => self.on_exit(&worker, info),
            Event::Capacity => self.ensure_capacity(),
            Event::Recycle { worker } => self.start_replacement(worker),
            Event::Started { replacing, result } => self.on_started(replacing, *result),
            Event::Stop => {}
        }
    }

    /// An idle worker that died is removed at once; a busy one is left to its caller.
    fn on_exit(&mut self, worker: &Arc<str>, info: ExitInfo) {
        let st = self.shared.lock();
        let Some(pid) = st.slots.get(worker).filter(|s| s.is_idle()).map(|s| s.pid) else {
            return;
        };
        if self.shared.forget_lost(st, worker, pid) {
            tracing::warn!(worker = %worker, pid, status = %info, "idle worker exited; replacing it");
        }
        self.ensure_capacity();
    }

    fn ensure_capacity(&mut self) {
        if self.retry_at.is_some() {
            return;
        }
        let ids: Vec<Arc<str>> = {
            let mut st = self.shared.lock();
            if st.shutting_down {
                return;
            }
            let missing = self.shared.config.workers.saturating_sub(st.capacity());
            st.starting += missing;
            (0..missing).map(|_| st.new_worker_id()).collect()
        };
        for id in ids {
            self.spawn_start(id, None);
        }
    }

    fn start_replacement(&mut self, old: Arc<str>) {
        if self.retry_at.is_some() {
            return;
        }
        let id = {
            let mut st = self.shared.lock();
            if st.shutting_down {
                return;
            }
            match st.slots.get_mut(&old) {
                Some(slot) if !slot.recycling => slot.recycling = true,
                _ => return,
            }
            st.starting += 1;
            st.new_worker_id()
        };
        self.spawn_start(id, Some(old));
    }

    fn spawn_start(&self, id: Arc<str>, replacing: Option<Arc<str>>) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let on_exit = shared.exit_hook(&id);
            let result = shared.spawner.launch(&shared, &id, on_exit).await;
            let _ = shared.events.send(Event::Started {
                replacing,
                result: Box::new(result),
            });
        });
    }

    fn on_started(&mut self, replacing: Option<Arc<str>>, result: Result<Worker, Error>) {
        self.shared.lock().starting -= 1;
        match result {
            Ok(worker) => {
                self.failures = 0;
                self.shared.admit(worker);
                if let Some(old) = replacing {
                    self.retire(&old);
                }
            }
            Err(error) => {
                self.failures += 1;
                self.shared.metrics.bump(Counter::WorkerStartFailure);
                tracing::error!(%error, attempt = self.failures, "worker failed to start");
                self.shared.notify(PoolEvent::WorkerStartFailed {
                    reason: error.to_string(),
                });
                let mut st = self.shared.lock();
                if let Some(slot) = replacing.and_then(|old| st.slots.get_mut(&old)) {
                    slot.recycling = false;
                }
                // Never give up: retry at the back-off's pace, forever. While no worker
                // runs, callers are told at once why none can start.
                if st.slots.is_empty() {
                    st.fail_waiters(&error);
                    st.fatal = Some(error);
                }
                drop(st);
                let delay = self.shared.config.backoff(self.failures);
                self.retry_at = Some(tokio::time::Instant::now() + delay);
            }
        }
        self.shared.changed.notify_waiters();
    }

    /// The replacement of `old` is ready: retire `old` now if idle, else when free.
    fn retire(&self, old: &Arc<str>) {
        let mut st = self.shared.lock();
        let Some(slot) = st.slots.get_mut(old) else {
            return;
        };
        slot.retire = true;
        let busy = !slot.is_idle();
        tracing::info!(worker = %old, "worker reached its call limit; recycling it");
        self.shared.metrics.bump(Counter::WorkerRecycle);
        self.shared.notify(PoolEvent::WorkerRecycled {
            worker: old.clone(),
        });
        if busy {
            return;
        }
        if let Some(slot) = st.remove_worker(old) {
            stop_in_background(st, slot.worker);
        }
    }

    fn maintain(&mut self) {
        let shared = self.shared.clone();
        let config = &shared.config;
        shared.sweep_idle();
        if let Some(interval) = config.health_interval {
            for lease in self.shared.take_stale_idle(interval) {
                let timeout = config.health_timeout;
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    let worker = lease.worker();
                    if let Err(error) = worker.call("ping", json!({}), timeout).await {
                        tracing::warn!(%error, "idle worker failed its health ping");
                        shared.metrics.bump(Counter::HealthFailure);
                        worker.kill();
                    }
                });
            }
        }
        self.heartbeats();
        self.check_memory();
        // Only workers that can free a session's state (and so journal it: our runtime,
        // not a bare protocol-v1 script) have their idle sessions evicted.
        let can_evict =
            self.shared.manifest.get().is_some_and(|m| {
                m.has_command("cleanup_session") && m.has_command("restore_session")
            });
        let evictions = self.shared.metrics.count(Counter::SessionEviction);
        if evictions != self.evictions_trimmed {
            self.evictions_trimmed = evictions;
            crate::heap::release_freed_memory();
        }
        if let Some(idle) = config.session_idle.filter(|_| can_evict) {
            for (id, epoch, worker) in self.shared.idle_resident_sessions(idle, EVICT_PER_TICK) {
                let shared = self.shared.clone();
                tokio::spawn(async move { shared.evict_session(id, epoch, worker).await });
            }
        }
        if let Some(ttl) = config.session_ttl {
            self.shared.sweep_store(ttl, EXPIRE_PER_TICK);
            for (id, epoch) in self.shared.expired_sessions(ttl, EXPIRE_PER_TICK) {
                let Some(closing) = self.shared.take_session(&id, Some(epoch)) else {
                    continue;
                };
                tracing::info!(session = %id, "session expired");
                // Closed, then announced before the clean-up (which may wait for a busy
                // worker), so a server refuses the id and nobody reopens it meanwhile.
                self.shared.notify(PoolEvent::SessionExpired {
                    session_id: id.clone(),
                });
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    if let Err(error) = shared.clean_up_session(&id, closing).await {
                        tracing::warn!(session = %id, %error, "cleaning up an expired session failed");
                    }
                });
            }
        }
    }

    /// Pings the event loop of every worker running concurrent calls, once per
    /// heartbeat interval. A loop that does not answer within the heartbeat timeout is
    /// blocked: the worker is killed, its calls fail with `WorkerCrashed` and their
    /// sessions are rebuilt.
    fn heartbeats(&self) {
        for worker in self.shared.due_heartbeats() {
            let shared = self.shared.clone();
            let timeout = shared.config.heartbeat_timeout;
            tokio::spawn(async move {
                if let Err(error) = worker.call("ping", json!({}), timeout).await {
                    tracing::error!(worker = %worker.name(), %error, "no heartbeat answer: its event loop is blocked; killed");
                    shared.metrics.bump(Counter::HealthFailure);
                    worker.kill();
                }
                shared.heartbeat_done(&worker);
            });
        }
    }

    /// Reads each worker's resident memory; starts the replacement of any above the
    /// limit.
    fn check_memory(&mut self) {
        let pids: Vec<(Arc<str>, u32)> = {
            let st = self.shared.lock();
            st.slots.iter().map(|(id, s)| (id.clone(), s.pid)).collect()
        };
        let readings: Vec<(Arc<str>, Option<u64>)> = pids
            .into_iter()
            .map(|(id, pid)| (id, resident_bytes(pid)))
            .collect();
        let mut over = Vec::new();
        {
            let mut st = self.shared.lock();
            for (id, rss) in readings {
                if let Some(slot) = st.slots.get_mut(&id) {
                    slot.rss_bytes = rss;
                    let limit = self.shared.config.max_rss_bytes;
                    if rss.zip(limit).is_some_and(|(r, l)| r > l) && !slot.recycling {
                        over.push(id);
                    }
                }
            }
        }
        for id in over {
            tracing::info!(worker = %id, "worker above its memory limit; recycling it");
            self.start_replacement(id);
        }
    }
}

/// Resident memory of process `pid` in bytes, from `/proc/PID/statm`.
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
