//! One sample a second of a pool: calls and errors per second, the latency
//! percentiles of that second's calls, the queue, and a snapshot of the whole pool.
//!
//! The pool's own latency summaries cover every call since it started; the percentiles
//! of one second come from the difference between two readings of the call duration
//! histogram of `/metrics` (its buckets, interpolated within the bucket as Prometheus'
//! `histogram_quantile` does).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use crate::pool::Pool;

/// The call duration histogram's buckets in the Prometheus text.
const BUCKET_PREFIX: &str = "snakepool_call_duration_seconds_bucket{";

/// What the pool did in one second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(super) struct Sample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Calls finished per second.
    pub calls_per_s: f64,
    /// Failed calls per second.
    pub errors_per_s: f64,
    /// Median latency of the calls finished in that second (none without calls).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency of those calls.
    pub p99_ms: Option<f64>,
    /// Callers waiting for a worker when it was taken.
    pub queued: usize,
    /// Sessions in the pool's memory when it was taken.
    pub sessions: usize,
}

/// Cumulative counts of calls at most `le` seconds long, in increasing `le` order.
type Buckets = Vec<(f64, u64)>;

/// Takes samples of one pool, each relative to the one before.
#[derive(Debug, Default)]
pub(super) struct Sampler {
    last: Option<Reading>,
}

/// The pool's counters at one moment.
#[derive(Debug)]
struct Reading {
    taken: Instant,
    calls: u64,
    failed: u64,
    buckets: Buckets,
}

impl Sampler {
    /// A sample of the time since the last one, and a snapshot of the pool as JSON
    /// (the dashboard's `snapshot` event).
    pub fn take(&mut self, pool: &Pool) -> (Sample, String) {
        let metrics = pool.metrics();
        let reading = Reading {
            taken: Instant::now(),
            calls: metrics.calls,
            failed: metrics.calls.saturating_sub(metrics.calls_ok),
            buckets: parse_buckets(&pool.prometheus_text()),
        };
        let status = pool.status();
        let mut sample = Sample {
            at_ms: now_ms(),
            calls_per_s: 0.0,
            errors_per_s: 0.0,
            p50_ms: None,
            p99_ms: None,
            queued: status.queued,
            sessions: status.sessions,
        };
        if let Some(last) = &self.last {
            let seconds = reading.taken.duration_since(last.taken).as_secs_f64();
            if seconds > 0.0 {
                sample.calls_per_s = reading.calls.saturating_sub(last.calls) as f64 / seconds;
                sample.errors_per_s = reading.failed.saturating_sub(last.failed) as f64 / seconds;
            }
            let window = difference(&reading.buckets, &last.buckets);
            sample.p50_ms = quantile(&window, 0.5).map(|s| s * 1000.0);
            sample.p99_ms = quantile(&window, 0.99).map(|s| s * 1000.0);
        }
        self.last = Some(reading);
        let snapshot = json!({
            "at_ms": sample.at_ms,
            "node": pool.config().node,
            "workers": status.workers,
            "starting": status.starting,
            "queued": status.queued,
            "sessions": status.sessions,
            "shutting_down": status.shutting_down,
            "totals": metrics,
            "sample": sample,
        });
        (sample, snapshot.to_string())
    }
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The call duration buckets of a pool's Prometheus text (summed over any labels
/// other than `le`).
fn parse_buckets(text: &str) -> Buckets {
    let mut buckets: Buckets = Vec::new();
    for (le, count) in text.lines().filter_map(parse_bucket) {
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The bound and count of one `..._bucket{...,le="0.5"} 12` line.
fn parse_bucket(line: &str) -> Option<(f64, u64)> {
    let (labels, value) = line.strip_prefix(BUCKET_PREFIX)?.rsplit_once("} ")?;
    let le = labels.split("le=\"").nth(1)?.split('"').next()?;
    let le = if le == "+Inf" {
        f64::INFINITY
    } else {
        le.parse().ok()?
    };
    Some((le, value.trim().parse().ok()?))
}

/// The calls counted in `now` but not in `before`, bucket by bucket.
fn difference(now: &Buckets, before: &Buckets) -> Buckets {
    now.iter()
        .map(|&(le, count)| {
            let earlier = before.iter().find(|(b, _)| *b == le).map_or(0, |&(_, c)| c);
            (le, count.saturating_sub(earlier))
        })
        .collect()
}

/// The `q` quantile in seconds of cumulative `buckets`, interpolated linearly within
/// its bucket; the highest finite bound if it falls past it; `None` without calls.
fn quantile(buckets: &Buckets, q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let share = (rank - below as f64) / (count - below).max(1) as f64;
            return Some(lower + (le - lower) * share);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::{Metrics, PoolGauges};

    fn buckets_after(calls: &[(u64, Duration)]) -> Buckets {
        let metrics = Metrics::default();
        for &(n, latency) in calls {
            for _ in 0..n {
                metrics.record_call(None, latency);
            }
        }
        parse_buckets(&metrics.prometheus_text(PoolGauges::default(), Some("n1")))
    }

    #[test]
    fn reads_the_call_duration_buckets() {
        let buckets = buckets_after(&[(3, Duration::from_millis(2))]);
        assert!(buckets.len() > 10, "{buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 3)));
        assert_eq!(buckets.first().map(|b| b.1), Some(0));
    }

    #[test]
    fn series_with_other_labels_add_up() {
        let text = "snakepool_call_duration_seconds_bucket{a=\"x\",le=\"+Inf\"} 3\n\
                    snakepool_call_duration_seconds_bucket{a=\"x\",le=\"0.5\"} 1\n\
                    snakepool_call_duration_seconds_bucket{a=\"y\",le=\"0.5\"} 2\n\
                    snakepool_call_duration_seconds_bucket{a=\"y\",le=\"+Inf\"} 4\n\
                    snakepool_call_duration_seconds_count 7\n";
        assert_eq!(parse_buckets(text), vec![(0.5, 3), (f64::INFINITY, 7)]);
    }

    #[test]
    fn percentiles_of_the_calls_between_two_readings() {
        let before = buckets_after(&[(100, Duration::from_secs(2))]);
        let now = buckets_after(&[
            (100, Duration::from_secs(2)),
            (98, Duration::from_millis(1)),
            (2, Duration::from_millis(500)),
        ]);
        let window = difference(&now, &before);
        let p50 = quantile(&window, 0.5).unwrap();
        let p99 = quantile(&window, 0.99).unwrap();
        // Within the bucket holding 1 ms, and the one holding 500 ms (the 2 s calls
        // before the window are left out).
        assert!((0.0005..=0.002).contains(&p50), "{p50}");
        assert!((0.25..=1.0).contains(&p99), "{p99}");
        assert_eq!(quantile(&difference(&now, &now), 0.5), None);
    }

    #[test]
    fn a_quantile_past_the_last_bound_is_that_bound() {
        let buckets = vec![(0.1, 0), (1.0, 0), (f64::INFINITY, 4)];
        assert_eq!(quantile(&buckets, 0.5), Some(1.0));
        assert_eq!(quantile(&Vec::new(), 0.5), None);
    }
}
