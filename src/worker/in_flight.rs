//! The calls in flight on one worker, and the order of the calls sent ahead.
//!
//! A call of a command the worker runs inline (a sync handler) may be sent ahead of
//! the worker's earlier calls, *pipelined*, when the worker announces it: such calls
//! wait in the pipe and run one after another, each only once the replies before it
//! are wholly in the pipe. So of the pipelined calls without a reply only the first
//! can have started (it runs since its predecessor's reply arrived, or since it was
//! sent); when the worker dies, every one after it is known not to have run, and can
//! be sent to another worker without ever running twice.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::protocol::Reply;
use crate::worker::ChunkSink;

/// How a call ended: its reply, the error that ended it, or — for a pipelined call
/// whose worker died before it started — not at all.
pub(super) enum Settled {
    /// Answered; for a pipelined call, with how long it ran on the worker.
    Reply(Reply, Option<Duration>),
    Failed(Error),
    /// Its worker died before it started; `Error` is what it met there.
    NotStarted(Error),
}

/// A call waiting for its outcome.
pub(super) struct Waiting {
    pub command: String,
    /// Where the outcome goes.
    pub tx: oneshot::Sender<Settled>,
    /// Dropped when the call settles, however it settles (the pool keeps the worker's
    /// capacity for the call in it).
    pub hold: Option<Box<dyn Send>>,
    /// Where its chunks go, if its caller streams them.
    pub chunks: Option<ChunkSink>,
}

/// Where a pipelined call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// Running on the worker since then.
    Running(Instant),
    /// In the pipe behind another pipelined call.
    Behind,
    /// Not a pipelined call in flight.
    Elsewhere,
}

/// A reply to a pipelined call that is not the first in line: the worker does not
/// keep the order it promised.
#[derive(Debug)]
pub(super) struct OutOfOrder {
    pub expected: u64,
}

/// The calls in flight on one worker.
#[derive(Default)]
pub(super) struct InFlight {
    calls: HashMap<u64, Waiting>,
    /// The pipelined calls not yet answered, in the order they were written.
    in_line: VecDeque<u64>,
    /// When the first of them started.
    head_since: Option<Instant>,
}

impl InFlight {
    /// Calls waiting for their outcome.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn insert(&mut self, id: u64, waiting: Waiting) {
        self.calls.insert(id, waiting);
    }

    pub fn get(&self, id: u64) -> Option<&Waiting> {
        self.calls.get(&id)
    }

    /// Forgets a call that was never written.
    pub fn remove(&mut self, id: u64) -> Option<Waiting> {
        self.calls.remove(&id)
    }

    /// Call `id` is queued to be written as a pipelined call (under the same lock as
    /// its frame is queued, so the order here is the order in the pipe). Returns
    /// whether it is first in line: running as soon as it is written.
    pub fn sent_in_line(&mut self, id: u64) -> bool {
        let first = self.in_line.is_empty();
        if first {
            self.head_since = Some(Instant::now());
        }
        self.in_line.push_back(id);
        first
    }

    /// The reply to call `id` arrived: takes its waiter out (`None` if it settled
    /// already, e.g. timed out), with how long it ran if it was pipelined (always
    /// `Some` then). The next pipelined call starts now.
    pub fn answered(&mut self, id: u64) -> Result<(Option<Waiting>, Option<Duration>), OutOfOrder> {
        let took = match self.in_line.front() {
            Some(&first) if first == id => {
                self.in_line.pop_front();
                let now = Instant::now();
                let took = Some(
                    self.head_since
                        .map_or(Duration::ZERO, |since| now.duration_since(since)),
                );
                self.head_since = (!self.in_line.is_empty()).then_some(now);
                took
            }
            Some(&first) if self.in_line.contains(&id) => {
                return Err(OutOfOrder { expected: first });
            }
            _ => None,
        };
        Ok((self.calls.remove(&id), took))
    }

    /// Where pipelined call `id` is.
    pub fn place(&self, id: u64) -> Place {
        match self.in_line.iter().position(|&queued| queued == id) {
            Some(0) => Place::Running(self.head_since.unwrap_or_else(Instant::now)),
            Some(_) => Place::Behind,
            None => Place::Elsewhere,
        }
    }

    /// The ids of the calls in flight, for messages.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.calls.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Takes every waiter out, each with whether it may have started (every call but
    /// those waiting behind a pipelined one).
    pub fn drain(&mut self) -> Vec<(Waiting, bool)> {
        let behind: Vec<u64> = self.in_line.drain(..).skip(1).collect();
        self.head_since = None;
        self.calls
            .drain()
            .map(|(id, waiting)| (waiting, !behind.contains(&id)))
            .collect()
    }

    /// Takes out every waiter but those waiting behind a pipelined call, which stay
    /// (with the line) until the worker's output ends and tells whether they started.
    pub fn drain_started(&mut self) -> Vec<Waiting> {
        let behind: Vec<u64> = self.in_line.iter().skip(1).copied().collect();
        let started: Vec<u64> = self
            .calls
            .keys()
            .copied()
            .filter(|id| !behind.contains(id))
            .collect();
        started
            .into_iter()
            .filter_map(|id| self.calls.remove(&id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> (Waiting, oneshot::Receiver<Settled>) {
        let (tx, rx) = oneshot::channel();
        let waiting = Waiting {
            command: "ping".into(),
            tx,
            hold: None,
            chunks: None,
        };
        (waiting, rx)
    }

    fn line(ids: &[u64]) -> InFlight {
        let mut in_flight = InFlight::default();
        for &id in ids {
            in_flight.insert(id, waiting().0);
            in_flight.sent_in_line(id);
        }
        in_flight
    }

    #[test]
    fn the_first_in_line_runs_and_the_rest_wait_behind_it() {
        let mut in_flight = line(&[1, 2, 3]);
        assert!(matches!(in_flight.place(1), Place::Running(_)));
        assert_eq!(in_flight.place(2), Place::Behind);
        let (answered, took) = in_flight.answered(1).unwrap();
        assert!(answered.is_some() && took.is_some());
        assert!(matches!(in_flight.place(2), Place::Running(_)));
        assert_eq!(in_flight.place(1), Place::Elsewhere);
    }

    #[test]
    fn a_reply_out_of_line_is_refused() {
        let mut in_flight = line(&[1, 2, 3]);
        let Err(out_of_order) = in_flight.answered(3) else {
            panic!("a reply out of line was taken");
        };
        assert_eq!(out_of_order.expected, 1);
    }

    #[test]
    fn only_calls_behind_the_first_are_known_not_to_have_started() {
        let mut in_flight = line(&[1, 2, 3]);
        in_flight.insert(9, waiting().0);
        let mut started: Vec<(String, bool)> = in_flight
            .drain()
            .into_iter()
            .map(|(w, started)| (w.command, started))
            .collect();
        started.sort();
        assert_eq!(started.iter().filter(|(_, s)| *s).count(), 2);
        assert_eq!(started.iter().filter(|(_, s)| !*s).count(), 2);
        assert_eq!(in_flight.len(), 0);
    }

    #[test]
    fn after_a_timeout_the_waiting_calls_stay_and_a_late_reply_moves_the_line() {
        let mut in_flight = line(&[1, 2, 3]);
        assert_eq!(in_flight.drain_started().len(), 1);
        let (answered, took) = in_flight.answered(1).unwrap();
        assert!(answered.is_none(), "the timed-out call settled already");
        assert!(took.is_some(), "a late reply of a call in line");
        assert!(matches!(in_flight.place(2), Place::Running(_)));
        let drained = in_flight.drain();
        assert_eq!(drained.iter().filter(|(_, started)| *started).count(), 1);
    }
}
