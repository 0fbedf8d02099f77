//! Recently closed session ids, remembered for a while so that a call naming one is
//! refused instead of silently opening a new, empty session under the same id.
//!
//! Bounded in time and in size: ids are forgotten after [`LIFETIME`], and the oldest
//! first once [`CAPACITY`] are held. Insert and lookup are O(1) amortised.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a closed id is remembered.
pub const LIFETIME: Duration = Duration::from_secs(600);
/// Most ids remembered at once.
pub const CAPACITY: usize = 100_000;

/// The remembered ids.
#[derive(Debug, Default)]
pub struct Tombstones {
    closed_at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Tombstones {
    /// Remembers that `id` was closed now.
    pub fn insert(&mut self, id: &str) {
        let now = Instant::now();
        self.forget_old(now);
        while self.order.len() >= CAPACITY {
            self.pop_oldest();
        }
        self.closed_at.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
    }

    /// Whether `id` was closed within the lifetime.
    pub fn contains(&self, id: &str) -> bool {
        self.closed_at
            .get(id)
            .is_some_and(|at| at.elapsed() < LIFETIME)
    }

    fn forget_old(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= LIFETIME)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((at, id)) = self.order.pop_front()
            // A later close of the same id keeps its own, newer entry.
            && self.closed_at.get(&id) == Some(&at)
        {
            self.closed_at.remove(&id);
        }
    }

    /// Ids remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.closed_at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_capacity_oldest_first() {
        let mut tombstones = Tombstones::default();
        for i in 0..CAPACITY + 10 {
            tombstones.insert(&format!("s{i}"));
        }
        assert_eq!(tombstones.len(), CAPACITY);
        assert!(!tombstones.contains("s0"));
        assert!(tombstones.contains(&format!("s{}", CAPACITY + 9)));
        tombstones.insert("s5000");
        tombstones.insert("s5000");
        assert!(tombstones.contains("s5000"));
    }
}
