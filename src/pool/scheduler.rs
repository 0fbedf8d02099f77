//! The pool's books: which workers exist, how many calls each runs, who waits.
//!
//! A worker runs either one call that has it to itself (an *exclusive* call: any
//! command of a worker that does not announce concurrency, or a command not flagged
//! concurrent), or up to its `max_concurrency` *shared* calls at once, or a line of up
//! to `pipeline_depth` *pipelined* calls: quick sync calls sent ahead, which the worker
//! runs one after another (see `worker::in_flight`). A caller checks
//! out capacity on a worker under the lock and gets a [`Lease`]; it does the pipe I/O
//! with no lock held, and the capacity comes back when the call settles (the lease
//! travels with the call, so a caller that goes away leaves it to the call).
//! Waiters are served first come, first served; an exclusive waiter keeps later
//! callers off the worker it waits for, so it cannot starve.
//!
//! Everything here runs under the pool's lock and never awaits.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::pool::session_table::SessionTable;
use crate::pool::supervisor::{Event, resident_bytes};
use crate::pool::{PoolEvent, Shared};
use crate::worker::{ExitWatch, Manifest, Worker};

/// How a call uses its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Alone: nothing else runs on the worker meanwhile.
    Exclusive,
    /// Beside other shared calls, up to the worker's `max_concurrency`.
    Shared,
    /// In line behind other pipelined calls, up to the pool's `pipeline_depth`.
    Pipelined,
}

/// What the pool knows about one running worker.
#[derive(Debug)]
pub(crate) struct Slot {
    pub worker: Worker,
    pub pid: u32,
    /// Calls checked out on it (sent or about to be).
    pub in_flight: usize,
    /// How they hold it (`None` while it is idle).
    pub held: Option<Mode>,
    /// Most shared calls at once.
    pub limit: usize,
    /// Most pipelined calls at once.
    pub depth: usize,
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
    /// The replacement is ready: stop this worker when its calls are done.
    pub retire: bool,
    pub rss_bytes: Option<u64>,
    /// Releases reading its memory right now: no call takes it until they are done.
    pub memory_checks: usize,
    /// Found above the memory limit: it takes no call, and is retired once idle.
    pub over_memory: bool,
    /// When its event loop is next pinged, while it runs concurrent calls.
    pub heartbeat_due: Instant,
    /// A heartbeat ping is in flight.
    pub heartbeat_pending: bool,
}

impl Slot {
    /// Whether a call in `mode` fits now.
    fn has_room(&self, mode: Mode) -> bool {
        if self.retire || self.over_memory || self.memory_checks > 0 {
            return false;
        }
        match mode {
            Mode::Exclusive => self.in_flight == 0,
            Mode::Shared => {
                matches!(self.held, None | Some(Mode::Shared)) && self.in_flight < self.limit
            }
            Mode::Pipelined => {
                self.in_flight == 0
                    || (self.held == Some(Mode::Pipelined) && self.in_flight < self.depth)
            }
        }
    }

    /// Room for a call in some mode, or none at all.
    fn has_any_room(&self) -> bool {
        // Room for an exclusive call is room for the others.
        self.has_room(Mode::Shared) || self.has_room(Mode::Pipelined)
    }

    fn take(&mut self, mode: Mode) {
        self.in_flight += 1;
        self.held = Some(mode);
    }

    /// A call's capacity comes back.
    fn give_back(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.held = None;
        }
    }

    /// Whether it has no call.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0
    }
}

/// What a waiting caller receives.
pub(crate) enum Handoff {
    /// Capacity on this worker, already counted.
    Granted(Worker),
    /// The worker the caller waited for is gone: route the call again.
    Reroute,
    /// The caller's wait ends with this error.
    Fail(Error),
}

/// One caller waiting for capacity, on any worker or a given one.
pub(crate) struct Waiter {
    pub seq: u64,
    pub target: Option<Arc<str>>,
    pub mode: Mode,
    /// The pool's own call: not counted against `max_queue`.
    pub internal: bool,
    pub tx: oneshot::Sender<Handoff>,
}

/// The pool's mutable state, behind its lock.
#[derive(Default)]
pub(crate) struct State {
    pub slots: BTreeMap<Arc<str>, Slot>,
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

    /// The worker with room for a call in `mode`: `target`, or the least busy one.
    fn pick(
        &self,
        target: Option<&Arc<str>>,
        mode: Mode,
        blocked: &BTreeSet<Arc<str>>,
    ) -> Option<Arc<str>> {
        match target {
            Some(id) => self
                .slots
                .get(id)
                .filter(|s| s.has_room(mode) && !blocked.contains(id))
                .map(|_| id.clone()),
            None => self
                .slots
                .iter()
                .filter(|(id, s)| s.has_room(mode) && !blocked.contains(*id))
                .min_by_key(|(_, s)| (s.in_flight, s.recycling))
                .map(|(id, _)| id.clone()),
        }
    }

    /// Forgets worker `id`: unpins its sessions (their journal will be replayed) and
    /// sends its waiters to route again. Returns its slot if it was known.
    pub fn remove_worker(&mut self, id: &str) -> Option<Slot> {
        let mut slot = self.slots.remove(id)?;
        self.sessions.unpin(id, std::mem::take(&mut slot.pinned));
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            if waiter.target.as_deref() == Some(id) {
                let _ = waiter.tx.send(Handoff::Reroute);
            } else {
                kept.push_back(waiter);
            }
        }
        self.waiters = kept;
        Some(slot)
    }

    /// Hands free capacity to waiters, first come first served. A waiter that cannot
    /// be served keeps the worker it waits for (or, waiting for any, the least busy
    /// one) from later waiters in an exclusive wait, so exclusive calls do not starve.
    pub fn grant_waiters(&mut self) {
        let mut blocked = BTreeSet::new();
        let mut i = 0;
        while i < self.waiters.len() {
            // No worker has room for any call: the rest of the queue waits, without a
            // look at each.
            if !self.slots.values().any(Slot::has_any_room) {
                break;
            }
            let (target, mode) = (self.waiters[i].target.clone(), self.waiters[i].mode);
            let Some(id) = self.pick(target.as_ref(), mode, &blocked) else {
                if mode != Mode::Shared {
                    let hold = target.or_else(|| {
                        self.slots
                            .iter()
                            .filter(|(id, s)| !s.retire && !blocked.contains(*id))
                            .min_by_key(|(_, s)| s.in_flight)
                            .map(|(id, _)| id.clone())
                    });
                    blocked.extend(hold);
                }
                i += 1;
                continue;
            };
            let waiter = self.waiters.remove(i).expect("index in range");
            let slot = self.slots.get_mut(&id).expect("picked from the slots");
            slot.take(waiter.mode);
            if waiter
                .tx
                .send(Handoff::Granted(slot.worker.clone()))
                .is_err()
            {
                // The waiter gave up: give the capacity back and look again.
                slot.give_back();
            }
        }
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

/// Capacity for one call on one worker. Dropping the lease gives the capacity back
/// (and removes the worker if it was lost). Pass it into the call
/// ([`Lease::into_hold`]) so the capacity comes back when the call settles, even if
/// its caller goes away.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    worker: Worker,
}

impl Lease {
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// The lease as a value a call drops when it settles.
    pub fn into_hold(self) -> Option<Box<dyn Send>> {
        Some(Box::new(self))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(&self.worker);
    }
}

impl Shared {
    /// Waits for capacity for a call in `mode`: on any worker (`target` None) or the
    /// given one. `Ok(None)` means the target is gone and the caller must route again.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        target: Option<&Arc<str>>,
        mode: Mode,
    ) -> Result<Option<Lease>, Error> {
        self.wait_for_capacity(target, mode, true).await
    }

    /// Like [`Shared::checkout`] for the pool's own calls (a closed session's
    /// cleanup): never refused as saturated, so callers cannot crowd them out.
    pub(crate) async fn checkout_internal(
        self: &Arc<Self>,
        target: Option<&Arc<str>>,
        mode: Mode,
    ) -> Result<Option<Lease>, Error> {
        self.wait_for_capacity(target, mode, false).await
    }

    async fn wait_for_capacity(
        self: &Arc<Self>,
        target: Option<&Arc<str>>,
        mode: Mode,
        bounded: bool,
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
            if let Some(id) = target
                && !st.slots.contains_key(id)
            {
                return Ok(None);
            }
            // First come, first served: with callers waiting, join the queue.
            if st.waiters.is_empty()
                && let Some(id) = st.pick(target, mode, &BTreeSet::new())
            {
                let slot = st.slots.get_mut(&id).expect("picked from the slots");
                slot.take(mode);
                let worker = slot.worker.clone();
                drop(st);
                self.metrics.record_queue_wait(asked.elapsed());
                return Ok(Some(self.lease(worker)));
            }
            if bounded && st.waiters.len() >= self.config.max_queue {
                let callers = st.waiters.iter().filter(|w| !w.internal).count();
                if callers >= self.config.max_queue {
                    return Err(Error::Saturated { queued: callers });
                }
            }
            st.next_waiter += 1;
            let seq = st.next_waiter;
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter {
                seq,
                target: target.cloned(),
                mode,
                internal: !bounded,
                tx,
            });
            st.grant_waiters();
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
                // Capacity was granted just as the wait expired.
                Some(handoff @ Handoff::Granted(_)) => handoff,
                _ => {
                    return Err(Error::CheckoutTimeout {
                        waited: asked.elapsed(),
                    });
                }
            },
        };
        wait.rx = None;
        match handoff {
            Handoff::Granted(worker) => {
                self.metrics.record_queue_wait(asked.elapsed());
                Ok(Some(self.lease(worker)))
            }
            Handoff::Reroute => Ok(None),
            Handoff::Fail(error) => Err(error),
        }
    }

    fn lease(self: &Arc<Self>, worker: Worker) -> Lease {
        Lease {
            shared: self.clone(),
            worker,
        }
    }

    /// The mode a call of `command` needs on this pool's workers.
    pub(crate) fn mode_of(&self, command: &str) -> Mode {
        match self.manifest.get() {
            Some(manifest) if manifest.is_concurrent(command) => Mode::Shared,
            _ => Mode::Exclusive,
        }
    }

    /// Gives back the capacity of a settled call: to the next waiters, retiring or
    /// recycling the worker when its calls are done, or (if lost) removing it so the
    /// supervisor replaces it.
    pub(crate) fn release(self: &Arc<Self>, worker: &Worker) {
        let id: Arc<str> = Arc::from(worker.id());
        let mut st = self.lock();
        if worker.is_lost() {
            let pid = worker.pid();
            self.forget_lost(st, &id, pid);
            let _ = self.events.send(Event::Capacity);
            return;
        }
        let Some(slot) = st.slots.get_mut(&id) else {
            return;
        };
        slot.give_back();
        slot.calls = worker.calls_served();
        slot.last_used = Instant::now();
        let idle = slot.in_flight == 0;
        let recycle = slot
            .recycle_at
            .is_some_and(|limit| slot.calls >= limit && !slot.recycling);
        let retire = slot.retire;
        if idle && (st.shutting_down || retire) {
            if let Some(slot) = st.remove_worker(&id) {
                stop_in_background(st, slot.worker);
            }
            self.changed.notify_waiters();
            return;
        }
        // Its memory is read after every call (a file read, outside the lock), and no
        // call takes it meanwhile: a worker found over the limit never serves again.
        if self.config.max_rss_bytes.is_some()
            && let Some(slot) = st.slots.get_mut(&id)
        {
            slot.memory_checks += 1;
            drop(st);
            let over = self.over_memory_limit(worker);
            st = self.lock();
            let Some(slot) = st.slots.get_mut(&id) else {
                return;
            };
            slot.memory_checks -= 1;
            slot.over_memory |= over;
            if slot.over_memory && slot.is_idle() {
                self.retire_over_memory(st, &id);
                return;
            }
        }
        st.grant_waiters();
        drop(st);
        if recycle {
            let _ = self.events.send(Event::Recycle { worker: id });
        }
    }

    /// Retires idle worker `id`, found above its memory limit after a call, before
    /// it serves again; the supervisor starts its replacement.
    fn retire_over_memory(
        self: &Arc<Self>,
        mut st: std::sync::MutexGuard<'_, State>,
        id: &Arc<str>,
    ) {
        tracing::info!(worker = %id, "worker above its memory limit after a call; retiring it");
        if let Some(slot) = st.remove_worker(id) {
            stop_in_background(st, slot.worker);
        } else {
            drop(st);
        }
        self.metrics.bump(crate::metrics::Counter::WorkerRecycle);
        self.notify(PoolEvent::WorkerRecycled { worker: id.clone() });
        let _ = self.events.send(Event::Capacity);
        self.changed.notify_waiters();
        self.lock().grant_waiters();
    }

    /// Whether `worker` is above the pool's resident memory limit, if it has one.
    fn over_memory_limit(&self, worker: &Worker) -> bool {
        self.config
            .max_rss_bytes
            .is_some_and(|limit| resident_bytes(worker.pid()).is_some_and(|rss| rss > limit))
    }

    /// Forgets a worker that died, timed out or broke the protocol. It is counted and
    /// announced once, whichever path notices it first (a caller, or the supervisor
    /// seeing its process exit); returns whether it was still known.
    pub(crate) fn forget_lost(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        id: &Arc<str>,
        pid: u32,
    ) -> bool {
        let removed = st.remove_worker(id);
        let known = removed.is_some();
        if let Some(slot) = &removed {
            // Whatever it still runs fails now (it is dead or being killed).
            slot.worker.kill();
        }
        st.grant_waiters();
        drop(st);
        // The slot goes before the event, as its worker's stderr tail is read.
        if let Some(stderr_tail) = removed.map(|slot| slot.worker.stderr_tail()) {
            self.metrics.bump(crate::metrics::Counter::WorkerCrash);
            tracing::warn!(worker = %id, pid, stderr_tail = %stderr_tail, "worker lost (died, timed out or broke the protocol); replacing it");
            self.notify(PoolEvent::WorkerLost {
                worker: id.clone(),
                pid,
                stderr_tail,
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
        let manifest = worker.manifest().clone();
        let limit = manifest.max_concurrency();
        st.slots.insert(
            id.clone(),
            Slot {
                worker,
                pid,
                in_flight: 0,
                held: None,
                limit,
                depth: self.config.pipeline_depth.max(1),
                calls: 0,
                pinned: HashSet::new(),
                started_at: now,
                last_used: now,
                manifest: manifest.clone(),
                recycle_at,
                recycling: false,
                retire: false,
                rss_bytes: None,
                memory_checks: 0,
                over_memory: false,
                heartbeat_due: now,
                heartbeat_pending: false,
            },
        );
        st.fatal = None;
        if self.manifest.set(manifest.clone()).is_ok() {
            self.metrics
                .commands
                .define(manifest.public_commands().map(|c| c.name.as_str()));
            self.running_times.define(&manifest);
        }
        self.internal_commands
            .get_or_init(|| manifest.internal_commands());
        st.grant_waiters();
        drop(st);
        self.metrics.bump(crate::metrics::Counter::WorkerStart);
        tracing::info!(worker = %id, pid, "worker ready");
        self.notify(PoolEvent::WorkerReady { worker: id, pid });
    }

    /// Checks every idle worker, without waiting, for output nobody asked for (and for
    /// death); unfit ones are removed and replaced before any caller meets them.
    pub(crate) fn sweep_idle(self: &Arc<Self>) {
        let idle: Vec<Worker> = self
            .lock()
            .slots
            .values()
            .filter(|s| s.is_idle())
            .map(|s| s.worker.clone())
            .collect();
        // The checks read the pipes, so they run outside the lock.
        for worker in idle.into_iter().filter(|w| !w.is_usable()) {
            let id: Arc<str> = Arc::from(worker.id());
            let st = self.lock();
            self.forget_lost(st, &id, worker.pid());
            let _ = self.events.send(Event::Capacity);
        }
    }

    /// Workers running concurrent calls whose heartbeat is due: marked as being
    /// pinged.
    pub(crate) fn due_heartbeats(&self) -> Vec<Worker> {
        let now = Instant::now();
        let mut st = self.lock();
        st.slots
            .values_mut()
            .filter(|s| {
                s.held == Some(Mode::Shared)
                    && s.limit > 1
                    && !s.heartbeat_pending
                    && now >= s.heartbeat_due
            })
            .map(|s| {
                s.heartbeat_pending = true;
                s.worker.clone()
            })
            .collect()
    }

    /// A heartbeat of `worker` ended: the next one is due after the interval.
    pub(crate) fn heartbeat_done(&self, worker: &Worker) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.get_mut(worker.id()) {
            slot.heartbeat_pending = false;
            slot.heartbeat_due = Instant::now() + self.config.heartbeat_interval;
        }
    }

    /// Takes idle workers unused for `idle_for` out of the pool for a health ping.
    pub(crate) fn take_stale_idle(self: &Arc<Self>, idle_for: Duration) -> Vec<Lease> {
        let now = Instant::now();
        let mut st = self.lock();
        if !st.waiters.is_empty() {
            return Vec::new();
        }
        let mut leases = Vec::new();
        for slot in st.slots.values_mut() {
            if slot.is_idle() && !slot.retire && now.duration_since(slot.last_used) >= idle_for {
                slot.take(Mode::Exclusive);
                leases.push(slot.worker.clone());
            }
        }
        drop(st);
        leases
            .into_iter()
            .map(|worker| self.lease(worker))
            .collect()
    }
}

/// A caller's place in the queue. Dropping it (the caller gave up, or its future was
/// dropped) takes the place out of the queue, and gives back capacity granted in the
/// meantime, so an abandoned wait never holds a queue slot or a worker.
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
        if let Some(Handoff::Granted(worker)) = self.withdraw() {
            self.shared.release(&worker);
        }
    }
}
