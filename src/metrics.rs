//! Counters and latency histograms of one pool, read through [`MetricsSnapshot`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{
    Histogram as PromHistogram, exponential_buckets_range,
};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Highest latency the histograms track exactly: one hour, in microseconds.
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// A latency distribution in microseconds.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// A point-in-time copy of a pool's metrics.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Calls made (plain and session), including failed ones.
    pub calls: u64,
    /// Calls that returned a result.
    pub calls_ok: u64,
    /// Failed calls by [`crate::Error::kind`].
    pub errors: BTreeMap<&'static str, u64>,
    /// Time from asking for a worker to getting one.
    pub queue_wait: LatencySummary,
    /// Time of the whole call, queue wait included.
    pub call_latency: LatencySummary,
    /// Workers that completed their handshake.
    pub worker_starts: u64,
    /// Workers that failed to start.
    pub worker_start_failures: u64,
    /// Workers that died, timed out or broke the protocol.
    pub worker_crashes: u64,
    /// Workers retired by request count or memory.
    pub worker_recycles: u64,
    /// Idle workers that failed a health ping.
    pub health_failures: u64,
    /// Sessions rebuilt on a new worker from their journal.
    pub session_rebuilds: u64,
    /// Session journals compacted into a snapshot.
    pub journal_compactions: u64,
    /// Idle sessions evicted from their workers.
    pub session_evictions: u64,
    /// Sessions this node dropped because another node owns them now (its write, or
    /// lease renewal, was refused by the shared journal).
    pub sessions_moved: u64,
}

/// The live metrics of one pool; cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    calls: AtomicU64,
    calls_ok: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    queue_wait: LatencyHistogram,
    call_latency: LatencyHistogram,
    worker_starts: AtomicU64,
    worker_start_failures: AtomicU64,
    worker_crashes: AtomicU64,
    worker_recycles: AtomicU64,
    health_failures: AtomicU64,
    session_rebuilds: AtomicU64,
    journal_compactions: AtomicU64,
    session_evictions: AtomicU64,
    sessions_moved: AtomicU64,
    /// The same latencies in Prometheus buckets, for `/metrics`.
    call_seconds: PromHistogram,
    /// Calls, errors and latency by command.
    pub commands: crate::command_metrics::CommandMetrics,
    queue_wait_seconds: PromHistogram,
    rebuild_seconds: PromHistogram,
    journal_write_seconds: PromHistogram,
}

/// The pool's state at scrape time, exported as gauges next to the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolGauges {
    /// Running workers.
    pub workers: usize,
    /// Workers serving a call.
    pub busy: usize,
    /// Workers being started.
    pub starting: usize,
    /// Callers waiting for a worker.
    pub queued: usize,
    /// Sessions in the pool's memory.
    pub sessions: usize,
    /// Sessions the journal store holds.
    pub stored_sessions: usize,
    /// Entries in their journals (after their snapshots).
    pub journal_entries: usize,
    /// Bytes of those entries and of the snapshots.
    pub journal_bytes: usize,
}

/// One of the pool's plain counters.
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    /// A worker completed its handshake.
    WorkerStart,
    /// A worker failed to start.
    WorkerStartFailure,
    /// A worker died, timed out or broke the protocol.
    WorkerCrash,
    /// A worker was retired by request count or memory.
    WorkerRecycle,
    /// An idle worker failed its health ping.
    HealthFailure,
    /// A session was rebuilt from its journal.
    SessionRebuild,
    /// A session's journal was compacted into a snapshot.
    JournalCompaction,
    /// An idle session was evicted from its worker.
    SessionEviction,
    /// A session was dropped: another node owns it now.
    SessionMoved,
}

fn seconds_buckets() -> PromHistogram {
    // 50 µs to 5 min, 24 buckets.
    PromHistogram::new(exponential_buckets_range(0.000_05, 300.0, 24))
}

/// Shards of a [`LatencyHistogram`]: about one per thread recording at once.
const SHARDS: usize = 8;

/// A latency histogram (µs) in shards, each thread recording into its own, so calls
/// finishing on different threads do not contend for one lock or cache line.
#[derive(Debug)]
struct LatencyHistogram {
    shards: [Mutex<Histogram<u64>>; SHARDS],
}

impl LatencyHistogram {
    fn new() -> Self {
        LatencyHistogram {
            shards: std::array::from_fn(|_| {
                Mutex::new(
                    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
                        .expect("valid histogram bounds"),
                )
            }),
        }
    }

    fn record(&self, value: Duration) {
        thread_local! {
            static SHARD: usize = {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) as usize % SHARDS
            };
        }
        let shard = SHARD.with(|shard| *shard);
        let _ = self.shards[shard]
            .lock()
            .expect("histogram poisoned")
            .record(micros(value));
    }

    /// Every shard's values together.
    fn merged(&self) -> Histogram<u64> {
        let mut all =
            Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("valid histogram bounds");
        for shard in &self.shards {
            let _ = all.add(&*shard.lock().expect("histogram poisoned"));
        }
        all
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_TRACKED_US)
}

fn summarise(h: &LatencyHistogram) -> LatencySummary {
    let h = h.merged();
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        mean_us: h.mean(),
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            calls: AtomicU64::new(0),
            calls_ok: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            queue_wait: LatencyHistogram::new(),
            call_latency: LatencyHistogram::new(),
            worker_starts: AtomicU64::new(0),
            worker_start_failures: AtomicU64::new(0),
            worker_crashes: AtomicU64::new(0),
            worker_recycles: AtomicU64::new(0),
            health_failures: AtomicU64::new(0),
            session_rebuilds: AtomicU64::new(0),
            journal_compactions: AtomicU64::new(0),
            session_evictions: AtomicU64::new(0),
            sessions_moved: AtomicU64::new(0),
            call_seconds: seconds_buckets(),
            commands: crate::command_metrics::CommandMetrics::default(),
            queue_wait_seconds: seconds_buckets(),
            rebuild_seconds: seconds_buckets(),
            journal_write_seconds: seconds_buckets(),
        }
    }
}

impl Metrics {
    /// Records a finished call: its outcome's kind (`None` for success) and latency.
    pub fn record_call(&self, error_kind: Option<&'static str>, latency: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match error_kind {
            None => {
                self.calls_ok.fetch_add(1, Ordering::Relaxed);
            }
            Some(kind) => {
                *self
                    .errors
                    .lock()
                    .expect("error counts poisoned")
                    .entry(kind)
                    .or_default() += 1;
            }
        }
        self.call_latency.record(latency);
        self.call_seconds.observe(latency.as_secs_f64());
    }

    /// Records how long a caller waited for a worker.
    pub fn record_queue_wait(&self, wait: Duration) {
        self.queue_wait.record(wait);
        self.queue_wait_seconds.observe(wait.as_secs_f64());
    }

    /// Records how long rebuilding a session on a new worker took.
    pub fn record_rebuild(&self, took: Duration) {
        self.rebuild_seconds.observe(took.as_secs_f64());
    }

    /// Records how long the journal store took to write (an append or a compaction).
    pub fn record_journal_write(&self, took: Duration) {
        self.journal_write_seconds.observe(took.as_secs_f64());
    }

    /// Adds one to a plain counter.
    pub fn bump(&self, counter: Counter) {
        self.cell(counter).fetch_add(1, Ordering::Relaxed);
    }

    /// A counter's value now.
    pub fn count(&self, counter: Counter) -> u64 {
        self.cell(counter).load(Ordering::Relaxed)
    }

    fn cell(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::WorkerStart => &self.worker_starts,
            Counter::WorkerStartFailure => &self.worker_start_failures,
            Counter::WorkerCrash => &self.worker_crashes,
            Counter::WorkerRecycle => &self.worker_recycles,
            Counter::HealthFailure => &self.health_failures,
            Counter::SessionRebuild => &self.session_rebuilds,
            Counter::JournalCompaction => &self.journal_compactions,
            Counter::SessionEviction => &self.session_evictions,
            Counter::SessionMoved => &self.sessions_moved,
        }
    }

    /// A consistent-enough copy of every metric.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            errors: self.errors.lock().expect("error counts poisoned").clone(),
            queue_wait: summarise(&self.queue_wait),
            call_latency: summarise(&self.call_latency),
            worker_starts: self.worker_starts.load(Ordering::Relaxed),
            worker_start_failures: self.worker_start_failures.load(Ordering::Relaxed),
            worker_crashes: self.worker_crashes.load(Ordering::Relaxed),
            worker_recycles: self.worker_recycles.load(Ordering::Relaxed),
            health_failures: self.health_failures.load(Ordering::Relaxed),
            session_rebuilds: self.session_rebuilds.load(Ordering::Relaxed),
            journal_compactions: self.journal_compactions.load(Ordering::Relaxed),
            session_evictions: self.session_evictions.load(Ordering::Relaxed),
            sessions_moved: self.sessions_moved.load(Ordering::Relaxed),
        }
    }
}

impl Metrics {
    /// The metrics and `gauges` in the Prometheus text format, names prefixed
    /// `snakepool_`, each labelled `node` when the pool has a node name.
    pub fn prometheus_text(&self, gauges: PoolGauges, node: Option<&str>) -> String {
        let snap = self.snapshot();
        let labels = node.map(|node| ("node".into(), node.to_owned().into()));
        let mut registry = Registry::with_prefix_and_labels("snakepool", labels.into_iter());
        let counters: [(&str, &str, u64); 11] = [
            (
                "calls",
                "Calls made, plain and session, failed ones included",
                snap.calls,
            ),
            ("calls_ok", "Calls that returned a result", snap.calls_ok),
            (
                "worker_starts",
                "Workers that completed their handshake",
                snap.worker_starts,
            ),
            (
                "worker_start_failures",
                "Workers that failed to start",
                snap.worker_start_failures,
            ),
            (
                "worker_crashes",
                "Workers that died, timed out or broke the protocol",
                snap.worker_crashes,
            ),
            (
                "worker_recycles",
                "Workers retired by call count or memory",
                snap.worker_recycles,
            ),
            (
                "health_failures",
                "Idle workers that failed a health ping",
                snap.health_failures,
            ),
            (
                "session_rebuilds",
                "Sessions rebuilt from their journal",
                snap.session_rebuilds,
            ),
            (
                "journal_compactions",
                "Session journals compacted into a snapshot",
                snap.journal_compactions,
            ),
            (
                "session_evictions",
                "Idle sessions evicted from their workers (kept, rebuilt on their next call)",
                snap.session_evictions,
            ),
            (
                "sessions_moved",
                "Sessions dropped because another node owns them now (a stale write or \
                 lease renewal refused by the shared journal)",
                snap.sessions_moved,
            ),
        ];
        for (name, help, value) in counters {
            let counter = PromCounter::<u64>::default();
            counter.inc_by(value);
            registry.register(name, help, counter);
        }
        let errors = Family::<Vec<(String, String)>, PromCounter>::default();
        for (kind, count) in &snap.errors {
            errors
                .get_or_create(&vec![("kind".to_owned(), (*kind).to_owned())])
                .inc_by(*count);
        }
        registry.register("call_errors", "Failed calls by error kind", errors);
        self.commands.register(&mut registry);
        let gauge_values = [
            ("workers", "Running workers", gauges.workers),
            ("workers_busy", "Workers serving a call", gauges.busy),
            ("workers_starting", "Workers being started", gauges.starting),
            (
                "queued_callers",
                "Callers waiting for a worker",
                gauges.queued,
            ),
            ("sessions", "Sessions in the pool's memory", gauges.sessions),
            (
                "stored_sessions",
                "Sessions the journal store holds",
                gauges.stored_sessions,
            ),
            (
                "journal_entries",
                "Entries in the journals of the sessions in memory, after their snapshots",
                gauges.journal_entries,
            ),
            (
                "journal_bytes",
                "Bytes of the journals of the sessions in memory, snapshots included",
                gauges.journal_bytes,
            ),
        ];
        for (name, help, value) in gauge_values {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            registry.register(name, help, gauge);
        }
        registry.register(
            "call_duration_seconds",
            "Time of whole calls, queue wait included",
            self.call_seconds.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from asking for a worker to getting one",
            self.queue_wait_seconds.clone(),
        );
        registry.register(
            "session_rebuild_seconds",
            "Time of rebuilding a session on a new worker from its journal",
            self.rebuild_seconds.clone(),
        );
        registry.register(
            "journal_write_seconds",
            "Time the journal store took to store an entry or a compaction",
            self.journal_write_seconds.clone(),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_errors_and_latency() {
        let metrics = Metrics::default();
        metrics.record_call(None, Duration::from_micros(100));
        metrics.record_call(Some("worker_error"), Duration::from_micros(300));
        metrics.record_call(Some("worker_error"), Duration::from_micros(200));
        metrics.bump(Counter::WorkerCrash);
        let snap = metrics.snapshot();
        assert_eq!(snap.calls, 3);
        assert_eq!(snap.calls_ok, 1);
        assert_eq!(snap.errors.get("worker_error"), Some(&2));
        assert_eq!(snap.call_latency.count, 3);
        assert_eq!(snap.call_latency.p50_us, 200);
        assert!(snap.call_latency.max_us >= 300);
        assert_eq!(snap.worker_crashes, 1);
    }

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.record_call(None, Duration::from_millis(2));
        metrics.record_call(Some("request_timeout"), Duration::from_secs(1));
        let text = metrics.prometheus_text(
            PoolGauges {
                workers: 4,
                ..PoolGauges::default()
            },
            None,
        );
        assert!(text.contains("snakepool_calls_total 2"), "{text}");
        assert!(
            text.contains(r#"snakepool_call_errors_total{kind="request_timeout"} 1"#),
            "{text}"
        );
        assert!(text.contains("snakepool_workers 4"), "{text}");
        assert!(
            text.contains("snakepool_call_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
