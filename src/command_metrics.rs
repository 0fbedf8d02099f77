//! Calls, errors and latency by command, for Prometheus. Only the commands the
//! workers' manifest lists get a label of their own, at most [`MAX_COMMAND_LABELS`] of
//! them; any other name (a caller's typo, a flood of made-up names) is counted as
//! `other`, so the labels stay bounded whatever callers send.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets_range};
use prometheus_client::registry::Registry;

/// Most commands with metrics of their own.
pub const MAX_COMMAND_LABELS: usize = 256;

/// The label of the commands without one of their own.
const OTHER: &str = "other";

type Labels = Vec<(String, String)>;

fn seconds() -> Histogram {
    // 50 µs to 5 min, 24 buckets, as the pool's call latency.
    Histogram::new(exponential_buckets_range(0.000_05, 300.0, 24))
}

/// One label's metrics, taken from the families on its first call (so a call costs
/// no label hashing).
#[derive(Debug)]
struct Series {
    calls: Counter,
    errors: Counter,
    latency: Histogram,
}

/// Per-command counters and latency histograms.
#[derive(Debug)]
pub struct CommandMetrics {
    /// The series of each command with a label of its own, once it was called.
    series: OnceLock<HashMap<String, OnceLock<Series>>>,
    other: OnceLock<Series>,
    calls: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for CommandMetrics {
    fn default() -> Self {
        CommandMetrics {
            series: OnceLock::new(),
            other: OnceLock::new(),
            calls: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(seconds),
        }
    }
}

impl CommandMetrics {
    /// Gives these commands labels of their own (the first call wins: every worker
    /// runs the same program); past [`MAX_COMMAND_LABELS`], in name order, they count
    /// as `other`.
    pub fn define<'a>(&self, commands: impl IntoIterator<Item = &'a str>) {
        let mut names: Vec<&str> = commands.into_iter().filter(|c| *c != OTHER).collect();
        names.sort_unstable();
        names.dedup();
        names.truncate(MAX_COMMAND_LABELS);
        let _ = self.series.set(
            names
                .into_iter()
                .map(|name| (name.to_owned(), OnceLock::new()))
                .collect(),
        );
    }

    /// The series of `command`, or of `other`.
    fn series(&self, command: &str) -> &Series {
        let (label, cell) = match self.series.get().and_then(|known| known.get(command)) {
            Some(cell) => (command, cell),
            None => (OTHER, &self.other),
        };
        cell.get_or_init(|| {
            let labels = vec![("command".to_owned(), label.to_owned())];
            Series {
                calls: self.calls.get_or_create(&labels).clone(),
                errors: self.errors.get_or_create(&labels).clone(),
                latency: self.latency.get_or_create(&labels).clone(),
            }
        })
    }

    /// Records a finished call of `command`: whether it failed, and how long it took.
    pub fn record(&self, command: &str, failed: bool, latency: Duration) {
        let series = self.series(command);
        series.calls.inc();
        if failed {
            series.errors.inc();
        }
        series.latency.observe(latency.as_secs_f64());
    }

    /// Adds the families to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "command_calls",
            "Calls by command (commands past the label limit count as `other`)",
            self.calls.clone(),
        );
        registry.register(
            "command_errors",
            "Failed calls by command",
            self.errors.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Call latency by command, queueing included",
            self.latency.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &CommandMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn known_commands_get_labels_and_others_share_one() {
        let metrics = CommandMetrics::default();
        metrics.define(["ping", "echo"]);
        metrics.record("ping", false, Duration::from_micros(80));
        metrics.record("echo", true, Duration::from_micros(80));
        for n in 0..1000 {
            metrics.record(&format!("made-up-{n}"), true, Duration::from_micros(80));
        }
        let text = text(&metrics);
        assert!(
            text.contains(r#"command_calls_total{command="ping"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"command_errors_total{command="echo"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"command_calls_total{command="other"} 1000"#),
            "{text}"
        );
        assert!(!text.contains("made-up"), "{text}");
    }

    #[test]
    fn labels_are_capped() {
        let metrics = CommandMetrics::default();
        let names: Vec<String> = (0..MAX_COMMAND_LABELS + 50)
            .map(|n| format!("c{n:04}"))
            .collect();
        metrics.define(names.iter().map(String::as_str));
        for name in &names {
            metrics.record(name, false, Duration::from_micros(10));
        }
        let text = text(&metrics);
        let labelled = text
            .lines()
            .filter(|l| l.starts_with("command_calls_total{"))
            .count();
        assert_eq!(labelled, MAX_COMMAND_LABELS + 1, "{text}");
        assert!(
            text.contains(r#"command_calls_total{command="other"} 50"#),
            "{text}"
        );
    }
}
