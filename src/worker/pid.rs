//! Process ids that can be signalled safely.
//!
//! `killpg(0, sig)` signals the caller's own process group, so a pid of 0 reaching a
//! kill would take down the host. [`Pid`] cannot be 0: every process the pool signals
//! is named by one, and a missing or zero pid is an error where it is first seen.

use std::fmt;
use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The id of a live (or recently live) process, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(NonZeroU32);

impl Pid {
    /// `None` for 0, and for values that do not fit a `pid_t`.
    pub fn new(pid: u32) -> Option<Pid> {
        if i32::try_from(pid).is_err() {
            return None;
        }
        NonZeroU32::new(pid).map(Pid)
    }

    /// The pid as a plain number.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// Sends `signal` to the process group led by this pid; a group that is gone is
    /// fine.
    pub fn signal_group(self, signal: libc::c_int) {
        // SAFETY: killpg has no memory-safety preconditions; the pid is positive, so
        // this never addresses the caller's own group (0) or every process (-1).
        unsafe {
            libc::killpg(self.0.get() as libc::pid_t, signal);
        }
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Pid {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Pid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = u32::deserialize(deserializer)?;
        Pid::new(raw).ok_or_else(|| serde::de::Error::custom(format!("invalid pid {raw}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_out_of_range_pids_do_not_exist() {
        assert_eq!(Pid::new(0), None);
        assert_eq!(Pid::new(u32::MAX), None);
        assert_eq!(Pid::new(42).map(Pid::get), Some(42));
        assert!(serde_json::from_str::<Pid>("0").is_err());
        assert_eq!(serde_json::from_str::<Pid>("7").unwrap().get(), 7);
    }
}
