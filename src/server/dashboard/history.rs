//! What the dashboard remembers: the last few minutes of samples and the last worker
//! events, in rings of fixed size, and the latest snapshot of the pool.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use super::sampler::{Sample, now_ms};
use crate::pool::PoolEvent;

/// Samples kept: five minutes, one a second.
pub(super) const SAMPLES: usize = 300;
/// Worker events kept.
pub(super) const EVENTS: usize = 50;
/// Most lines of a worker's stderr tail an event keeps.
const TAIL_LINES: usize = 20;
/// Most bytes of those lines.
const TAIL_BYTES: usize = 4096;

/// A worker (or zygote) event, as the dashboard lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct RecentEvent {
    /// Its number, from 1, in the order the events happened.
    pub seq: u64,
    /// When it was seen, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `ready`, `lost`, `recycled`, `start_failed`, `zygote_ready` or
    /// `zygote_unavailable`.
    pub kind: &'static str,
    /// The worker's id, if it is about one.
    pub worker: Option<String>,
    /// The process id, when known.
    pub pid: Option<u32>,
    /// The stderr tail of a lost worker, or why a start failed or the zygote is
    /// unavailable; empty otherwise.
    pub detail: String,
}

/// The rings and the latest snapshot.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: VecDeque<Sample>,
    events: VecDeque<RecentEvent>,
    snapshot: Option<Arc<str>>,
    last_seq: u64,
}

impl History {
    /// Keeps `sample` (dropping the oldest past [`SAMPLES`]) and `snapshot`.
    pub fn push_sample(&mut self, sample: Sample, snapshot: Arc<str>) {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.snapshot = Some(snapshot);
    }

    /// Keeps the dashboard's view of `event` (dropping the oldest past [`EVENTS`]);
    /// `None` for the events it does not list (those of sessions).
    pub fn push_event(&mut self, event: &PoolEvent) -> Option<&RecentEvent> {
        let (kind, worker, pid, detail) = match event {
            PoolEvent::WorkerReady { worker, pid } => ("ready", Some(worker), Some(*pid), ""),
            PoolEvent::WorkerLost {
                worker,
                pid,
                stderr_tail,
            } => ("lost", Some(worker), Some(*pid), stderr_tail.as_str()),
            PoolEvent::WorkerRecycled { worker } => ("recycled", Some(worker), None, ""),
            PoolEvent::WorkerStartFailed { reason } => {
                ("start_failed", None, None, reason.as_str())
            }
            PoolEvent::ZygoteReady { pid } => ("zygote_ready", None, Some(*pid), ""),
            PoolEvent::ZygoteUnavailable { reason } => {
                ("zygote_unavailable", None, None, reason.as_str())
            }
            PoolEvent::SessionRebuilt { .. }
            | PoolEvent::SessionExpired { .. }
            | PoolEvent::SessionEvicted { .. } => return None,
        };
        self.last_seq += 1;
        if self.events.len() == EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(RecentEvent {
            seq: self.last_seq,
            at_ms: now_ms(),
            kind,
            worker: worker.map(|w| w.to_string()),
            pid,
            detail: tail(detail),
        });
        self.events.back()
    }

    /// The latest snapshot, as JSON.
    pub fn snapshot(&self) -> Option<Arc<str>> {
        self.snapshot.clone()
    }

    /// The samples and events kept, oldest first, as JSON (the dashboard's `history`
    /// event).
    pub fn to_json(&self) -> String {
        json!({
            "window_s": SAMPLES,
            "samples": self.samples,
            "events": self.events,
        })
        .to_string()
    }
}

/// The last [`TAIL_LINES`] lines of `text`, and at most their last [`TAIL_BYTES`].
fn tail(text: &str) -> String {
    let start = text
        .rmatch_indices('\n')
        .nth(TAIL_LINES - 1)
        .map_or(0, |(at, _)| at + 1);
    let mut cut = start.max(text.len().saturating_sub(TAIL_BYTES));
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at_ms,
            calls_per_s: 1.0,
            errors_per_s: 0.0,
            p50_ms: Some(1.0),
            p99_ms: None,
            queued: 0,
            sessions: 0,
        }
    }

    #[test]
    fn rings_keep_the_newest() {
        let mut history = History::default();
        for at in 0..(SAMPLES as u64 + 5) {
            history.push_sample(sample(at), Arc::from(format!("{{\"at\":{at}}}")));
        }
        for pid in 0..(EVENTS as u32 + 3) {
            let lost = PoolEvent::WorkerLost {
                worker: Arc::from("w1"),
                pid,
                stderr_tail: "boom".into(),
            };
            assert_eq!(history.push_event(&lost).unwrap().seq, u64::from(pid) + 1);
        }
        let value: serde_json::Value = serde_json::from_str(&history.to_json()).unwrap();
        let samples = value["samples"].as_array().unwrap();
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!(samples[0]["at_ms"], 5);
        let events = value["events"].as_array().unwrap();
        assert_eq!(events.len(), EVENTS);
        assert_eq!(events[0]["pid"], 3);
        assert_eq!(events[EVENTS - 1]["kind"], "lost");
        assert_eq!(events[EVENTS - 1]["detail"], "boom");
        assert_eq!(
            history.snapshot().as_deref(),
            Some(format!("{{\"at\":{}}}", SAMPLES + 4).as_str())
        );
    }

    #[test]
    fn session_events_are_not_listed() {
        let mut history = History::default();
        let evicted = PoolEvent::SessionEvicted {
            session_id: Arc::from("s"),
        };
        assert!(history.push_event(&evicted).is_none());
        assert!(history.to_json().contains("\"events\":[]"));
    }

    #[test]
    fn stderr_tails_are_cut_to_their_end() {
        let lines: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        let kept = tail(&lines.join("\n"));
        assert!(
            kept.starts_with("line 80\n") && kept.ends_with("line 99"),
            "{kept}"
        );
        let long = "é".repeat(TAIL_BYTES);
        let kept = tail(&long);
        assert!(kept.len() <= TAIL_BYTES && kept.chars().all(|c| c == 'é'));
        assert_eq!(tail("short"), "short");
    }
}
