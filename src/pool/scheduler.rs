//! The pool's books: which workers exist, which are idle, who waits for one.
//!
//! Everything here runs under the pool's lock and never awaits: checkout and release
//! only move a [`Worker`] between the idle list, a waiter's channel and a caller's
//! [`Lease`]. The caller does the pipe I/O after the lock is released.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::pool::session_table::SessionTable;
use crate::pool::supervisor::{Event, resident_bytes};
use crate::pool::{PoolEvent, Shared};
use crate::worker::{ExitWatch, Manifest, Worker};

/// What the pool knows about one running worker.
#[derive(Debug)]
pub(crate) struct Slot {
    pub pid: u32,
    pub busy: bool,
    pub calls: u64,
    /// The sessions pinned to it.
    pub pinned: HashSet<Arc<str>>,
    pub started_at: Instant,
    pub last_used: Instant,
    pub manifest: Arc<Manifest>,
    /// Retire after this many calls.
    pub recycle_at: Option<u64>,
    /// A replacement is being started for this worker.
    pub recycling: bool,
    /// The replacement is ready: stop this worker when it is next free.
    pub retire: bool,
    pub rss_bytes: Option<u64>,
}

/// What a waiting caller receives.
pub(crate) enum Handoff {
    /// A worker for the caller's exclusive use.
    Worker(Box<Worker>),
    /// The worker the caller waited for is gone: route the call again.
    Reroute,
    /// The caller's wait ends with this error.
    Fail(Error),
}

/// One caller waiting for a worker, any worker or a given one.
pub(crate) struct Waiter {
    pub seq: u64,
    pub target: Option<Arc<str>>,
    pub tx: oneshot::Sender<Handoff>,
}

/// The pool's mutable state, behind its lock.
#[derive(Default)]
pub(crate) struct State {
    pub slots: BTreeMap<Arc<str>, Slot>,
    pub idle: Vec<Worker>,
    pub waiters: VecDeque<Waiter>,
    pub sessions: SessionTable,
    /// Workers being started.
    pub starting: usize,
    pub shutting_down: bool,
    /// Shutdown's deadline passed: calls still running are failed with
    /// `ShuttingDown` and their workers killed.
    pub aborting: bool,
    /// The last start attempt failed and no worker is running: calls fail at once
    /// with this error until a worker starts.
    pub fatal: Option<Error>,
    /// Exit watches of workers being stopped, awaited by shutdown.
    pub stopping: Vec<ExitWatch>,
    pub next_worker: u64,
    pub next_waiter: u64,
}

impl State {
    /// A fresh worker id, `w1`, `w2`, ...
    pub fn new_worker_id(&mut self) -> Arc<str> {
        self.next_worker += 1;
        Arc::from(format!("w{}", self.next_worker))
    }

    fn take_idle(&mut self, id: &str) -> Option<Worker> {
        let pos = self.idle.iter().position(|w| w.id() == id)?;
        Some(self.idle.swap_remove(pos))
    }

    /// Forgets worker `id`: unpins its sessions (their journal will be replayed) and
    /// sends its waiters to route again. Returns the worker if it was idle.
    pub fn remove_worker(&mut self, id: &str) -> Option<Worker> {
        let slot = self.slots.remove(id)?;
        self.sessions.unpin(id, slot.pinned);
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            if waiter.target.as_deref() == Some(id) {
                let _ = waiter.tx.send(Handoff::Reroute);
            } else {
                kept.push_back(waiter);
            }
        }
        self.waiters = kept;
        self.take_idle(id)
    }

    /// Gives `worker` to the first waiter that can take it, else makes it idle.
    pub fn hand_over(&mut self, mut worker: Worker) {
        if let Some(slot) = self.slots.get_mut(worker.id()) {
            slot.busy = true;
        }
        let mut i = 0;
        while i < self.waiters.len() {
            let fits = match &self.waiters[i].target {
                None => true,
                Some(target) => **target == *worker.id(),
            };
            if !fits {
                i += 1;
                continue;
            }
            let waiter = self.waiters.remove(i).expect("index in range");
            match waiter.tx.send(Handoff::Worker(Box::new(worker))) {
                Ok(()) => return,
                // The waiter gave up; try the next one.
                Err(Handoff::Worker(back)) => worker = *back,
                Err(_) => unreachable!("only workers are sent here"),
            }
        }
        if let Some(slot) = self.slots.get_mut(worker.id()) {
            slot.busy = false;
        }
        self.idle.push(worker);
    }

    /// Fails every waiter with `error`.
    pub fn fail_waiters(&mut self, error: &Error) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.tx.send(Handoff::Fail(error.clone()));
        }
    }

    /// Workers that count towards the pool's size: running and not being replaced,
    /// plus those starting.
    pub fn capacity(&self) -> usize {
        self.slots.values().filter(|s| !s.recycling).count() + self.starting
    }

    /// Callers waiting for a worker.
    pub fn queued(&self) -> usize {
        self.waiters.len()
    }
}

/// Stops a worker the pool no longer counts, gracefully and in the background;
/// shutdown waits for it through `stopping`.
pub(crate) fn stop_in_background(mut st: std::sync::MutexGuard<'_, State>, worker: Worker) {
    st.stopping.push(worker.exit_watch());
    drop(st);
    tokio::spawn(worker.stop());
}

/// A caller's place in the queue. Dropping it (the caller gave up, or its future was
/// dropped) takes the place out of the queue, and gives back a worker handed over in
/// the meantime, so an abandoned wait never holds a queue slot or a worker.
struct QueuedWait {
    shared: Arc<Shared>,
    seq: u64,
    rx: Option<oneshot::Receiver<Handoff>>,
}

impl QueuedWait {
    fn receiver(&mut self) -> &mut oneshot::Receiver<Handoff> {
        self.rx.as_mut().expect("receiver kept until the wait ends")
    }

    /// Leaves the queue; returns what was handed over before leaving, if anything.
    fn withdraw(&mut self) -> Option<Handoff> {
        let mut rx = self.rx.take()?;
        self.shared.lock().waiters.retain(|w| w.seq != self.seq);
        rx.try_recv().ok()
    }
}

impl Drop for QueuedWait {
    fn drop(&mut self) {
        if let Some(Handoff::Worker(worker)) = self.withdraw() {
            self.shared.release(*worker);
        }
    }
}

/// A worker checked out for one caller. Dropping the lease returns the worker to the
/// pool, or, if a call was cut short or the worker is lost, removes and kills it.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    worker: Option<Worker>,
}

impl Lease {
    pub fn new(shared: Arc<Shared>, worker: Worker) -> Self {
        Lease {
            shared,
            worker: Some(worker),
        }
    }

    pub fn worker(&mut self) -> &mut Worker {
        self.worker
            .as_mut()
            .expect("lease holds its worker until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut worker) = self.worker.take() else {
            return;
        };
        if worker.has_abandoned_call()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The caller went away mid-call: the call runs to completion (within its
            // timeout) and its reply is dropped; the worker stays busy until then.
            let shared = self.shared.clone();
            runtime.spawn(async move {
                worker.finish_abandoned().await;
                shared.release(worker);
            });
            return;
        }
        self.shared.release(worker);
    }
}

impl Shared {
    /// Waits for a worker: any worker (`target` None) or the given one. `Ok(None)`
    /// means the target is gone and the caller must route again.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        target: Option<&Arc<str>>,
    ) -> Result<Option<Lease>, Error> {
        let asked = Instant::now();
        let mut wait = {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(Error::ShuttingDown);
            }
            if st.slots.is_empty()
                && let Some(fatal) = &st.fatal
            {
                return Err(fatal.clone());
            }
            let taken = match target {
                None => st.idle.pop(),
                Some(id) if !st.slots.contains_key(id) => return Ok(None),
                Some(id) => st.take_idle(id),
            };
            if let Some(worker) = taken {
                if let Some(slot) = st.slots.get_mut(worker.id()) {
                    slot.busy = true;
                }
                drop(st);
                self.metrics.record_queue_wait(asked.elapsed());
                return Ok(Some(Lease::new(self.clone(), worker)));
            }
            if st.waiters.len() >= self.config.max_queue {
                return Err(Error::Saturated {
                    queued: st.waiters.len(),
                });
            }
            st.next_waiter += 1;
            let seq = st.next_waiter;
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter {
                seq,
                target: target.cloned(),
                tx,
            });
            QueuedWait {
                shared: self.clone(),
                seq,
                rx: Some(rx),
            }
        };
        let timeout = self.config.checkout_timeout;
        let handoff = match tokio::time::timeout(timeout, wait.receiver()).await {
            Ok(Ok(handoff)) => handoff,
            Ok(Err(_)) => Handoff::Fail(Error::ShuttingDown),
            Err(_) => match wait.withdraw() {
                // A worker was handed over just as the wait expired.
                Some(handoff @ Handoff::Worker(_)) => handoff,
                _ => {
                    return Err(Error::CheckoutTimeout {
                        waited: asked.elapsed(),
                    });
                }
            },
        };
        wait.rx = None;
        match handoff {
            Handoff::Worker(worker) => {
                self.metrics.record_queue_wait(asked.elapsed());
                Ok(Some(Lease::new(self.clone(), *worker)))
            }
            Handoff::Reroute => Ok(None),
            Handoff::Fail(error) => Err(error),
        }
    }

    /// Takes back a worker after a call: idle again, to the next waiter, retired, or
    /// (if lost) removed so the supervisor replaces it.
    pub(crate) fn release(self: &Arc<Self>, worker: Worker) {
        let id: Arc<str> = Arc::from(worker.id());
        // Read outside the lock: it is a file read.
        let over_limit = !worker.is_lost() && self.over_memory_limit(&worker);
        let mut st = self.lock();
        if worker.is_lost() {
            let pid = worker.pid();
            self.forget_lost(st, &id, pid);
            let _ = self.events.send(Event::Capacity);
            drop(worker);
            return;
        }
        let retire = st.shutting_down || st.slots.get(&id).is_none_or(|s| s.retire);
        if retire {
            st.remove_worker(&id);
            stop_in_background(st, worker);
            self.changed.notify_waiters();
            return;
        }
        if over_limit {
            tracing::info!(worker = %worker.name(), "worker above its memory limit after a call; retiring it");
            st.remove_worker(&id);
            stop_in_background(st, worker);
            self.metrics.bump(crate::metrics::Counter::WorkerRecycle);
            self.notify(PoolEvent::WorkerRecycled { worker: id });
            let _ = self.events.send(Event::Capacity);
            self.changed.notify_waiters();
            return;
        }
        let slot = st.slots.get_mut(&id).expect("slot checked above");
        slot.calls = worker.calls_served();
        slot.last_used = Instant::now();
        let recycle = slot
            .recycle_at
            .is_some_and(|limit| slot.calls >= limit && !slot.recycling);
        st.hand_over(worker);
        drop(st);
        if recycle {
            let _ = self.events.send(Event::Recycle { worker: id });
        }
    }

    /// Whether `worker` is above the pool's resident memory limit, if it has one (read
    /// after every call, so a worker over it never serves another).
    fn over_memory_limit(&self, worker: &Worker) -> bool {
        self.config
            .max_rss_bytes
            .is_some_and(|limit| resident_bytes(worker.pid()).is_some_and(|rss| rss > limit))
    }

    /// Forgets a worker that died, timed out or broke the protocol. It is counted and
    /// announced once, whichever path notices it first (its caller, or the supervisor
    /// seeing its process exit); returns whether it was still known.
    pub(crate) fn forget_lost(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        id: &Arc<str>,
        pid: u32,
    ) -> bool {
        let known = st.slots.contains_key(id);
        let idle = st.remove_worker(id);
        drop(st);
        drop(idle);
        if known {
            self.metrics.bump(crate::metrics::Counter::WorkerCrash);
            self.notify(PoolEvent::WorkerLost {
                worker: id.clone(),
                pid,
            });
        }
        self.changed.notify_waiters();
        known
    }

    /// Adds a freshly started worker to the pool (or stops it if shutting down).
    pub(crate) fn admit(self: &Arc<Self>, worker: Worker) {
        let id: Arc<str> = Arc::from(worker.id());
        let pid = worker.pid();
        let mut st = self.lock();
        if st.shutting_down {
            stop_in_background(st, worker);
            return;
        }
        let recycle_at = self.config.recycle_after_calls.map(|after| {
            let spread = (after as f64 * self.config.recycle_jitter) as u64;
            after + rand::random_range(0..=spread)
        });
        let now = Instant::now();
        st.slots.insert(
            id.clone(),
            Slot {
                pid,
                busy: true,
                calls: 0,
                pinned: HashSet::new(),
                started_at: now,
                last_used: now,
                manifest: worker.manifest().clone(),
                recycle_at,
                recycling: false,
                retire: false,
                rss_bytes: None,
            },
        );
        st.fatal = None;
        self.internal_commands
            .get_or_init(|| worker.manifest().internal_commands());
        st.hand_over(worker);
        drop(st);
        self.metrics.bump(crate::metrics::Counter::WorkerStart);
        self.notify(PoolEvent::WorkerReady { worker: id, pid });
    }

    /// Checks every idle worker, without waiting, for output nobody asked for (and for
    /// death); unfit ones are removed and replaced before any caller meets them.
    pub(crate) fn sweep_idle(self: &Arc<Self>) {
        let idle = std::mem::take(&mut self.lock().idle);
        // The checks read the pipes, so they run outside the lock.
        let mut fit = Vec::new();
        let mut unfit = Vec::new();
        for mut worker in idle {
            if worker.is_usable() {
                fit.push(worker);
            } else {
                unfit.push(worker);
            }
        }
        let mut st = self.lock();
        for worker in fit {
            st.hand_over(worker);
        }
        drop(st);
        for worker in unfit {
            self.release(worker);
        }
    }

    /// Takes idle workers unused for `idle_for` out of the pool for a health ping.
    pub(crate) fn take_stale_idle(self: &Arc<Self>, idle_for: Duration) -> Vec<Lease> {
        let now = Instant::now();
        let mut st = self.lock();
        let stale: Vec<Arc<str>> = st
            .slots
            .iter()
            .filter(|(_, s)| !s.busy && now.duration_since(s.last_used) >= idle_for)
            .map(|(id, _)| id.clone())
            .collect();
        let mut leases = Vec::new();
        for id in stale {
            if let Some(worker) = st.take_idle(&id) {
                if let Some(slot) = st.slots.get_mut(&id) {
                    slot.busy = true;
                }
                leases.push(Lease::new(self.clone(), worker));
            }
        }
        leases
    }
}
