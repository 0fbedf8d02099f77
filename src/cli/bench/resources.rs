//! What the measured calls cost the machine, from `/proc`: the CPU time of watched
//! process trees (`--watch NAME=PID`: the process and every descendant), their PSS at
//! the end, the bench's own CPU time, and how busy the machine's cores were.
//!
//! CPU time is `utime + stime` of `/proc/PID/stat`, summed over the tree as it is at
//! each end of the window: a process that starts during the window counts from its
//! start, one that ends during it is left out from its last snapshot (counted in
//! `exited`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

/// A `--watch` value: `NAME=PID`.
pub fn parse_watch(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, e.g. server=1234, got {text:?}"))?;
    let pid = pid
        .trim()
        .parse::<u32>()
        .map_err(|e| format!("PID of {name:?}: {e}"))?;
    if name.trim().is_empty() {
        return Err(format!("expected NAME=PID, got {text:?}"));
    }
    Ok((name.trim().to_owned(), pid))
}

/// Clock ticks per second of the times in `/proc/PID/stat`.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The fields of `/proc/PID/stat` after the parenthesised command name.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `utime + stime` of one process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(&pid.to_string())?;
    // After the name: state (0), ppid (1), ... utime (11), stime (12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `root` and all its descendants now.
fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = stat_fields(&pid.to_string())
                .and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()));
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut all = vec![root];
    let mut next = 0;
    while next < all.len() {
        if let Some(kids) = children.get(&all[next]) {
            all.extend(kids);
        }
        next += 1;
    }
    all
}

/// PSS of one process in KiB, from `/proc/PID/smaps_rollup`.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// CPU ticks of every process of a tree.
fn tree_ticks(root: u32) -> HashMap<u32, u64> {
    tree(root)
        .into_iter()
        .filter_map(|pid| cpu_ticks(pid).map(|t| (pid, t)))
        .collect()
}

/// The `cpu` line of `/proc/stat`: (all ticks, idle + iowait ticks).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let all: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((all, idle))
}

/// The state at the start of the measured calls.
pub struct Snapshot {
    watched: Vec<(String, u32, HashMap<u32, u64>)>,
    own: u64,
    machine: Option<(u64, u64)>,
    /// The pool's host process and the CPU ticks of its tree (the host and its
    /// workers), if known.
    host: Option<(u32, HashMap<u32, u64>)>,
}

impl Snapshot {
    /// Takes the state now; `host` is the pid of the process running the pool (this
    /// one for a pool of the bench's own, a server's for `--url`), if known.
    pub fn take(watch: &[(String, u32)], host: Option<u32>) -> Snapshot {
        Snapshot {
            watched: watch
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, tree_ticks(*pid)))
                .collect(),
            own: cpu_ticks(std::process::id()).unwrap_or(0),
            machine: machine_ticks(),
            host: host.map(|pid| (pid, tree_ticks(pid))),
        }
    }

    /// What the window cost, `calls` calls having been made in it.
    pub fn finish(self, calls: u64, elapsed: Duration) -> Resources {
        let hz = ticks_per_second();
        let per_call = |seconds: f64| {
            if calls == 0 {
                None
            } else {
                Some(seconds * 1e6 / calls as f64)
            }
        };
        let mut watched = BTreeMap::new();
        for (name, root, before) in self.watched {
            let after = tree_ticks(root);
            let mut by_process: Vec<(u32, u64)> = after
                .iter()
                .map(|(pid, t)| {
                    (
                        *pid,
                        t.saturating_sub(before.get(pid).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, ticks)| *ticks > 0)
                .collect();
            by_process.sort_by_key(|(pid, ticks)| (std::cmp::Reverse(*ticks), *pid));
            let ticks: u64 = by_process.iter().map(|(_, t)| t).sum();
            let exited = before.keys().filter(|pid| !after.contains_key(pid)).count();
            let cpu_s = ticks as f64 / hz;
            watched.insert(
                name,
                ProcessTree {
                    pid: root,
                    processes: after.len(),
                    exited,
                    cpu_s,
                    cpu_us_per_call: per_call(cpu_s),
                    cores: cpu_s / elapsed.as_secs_f64(),
                    busiest: by_process
                        .iter()
                        .map(|(pid, t)| BusyProcess {
                            pid: *pid,
                            cpu_s: *t as f64 / hz,
                        })
                        .collect(),
                    pss_kib: after.keys().filter_map(|pid| pss_kib(*pid)).sum(),
                },
            );
        }
        let (host_cpu_s, worker_cpu_s) = match self.host {
            Some((host, before)) => {
                let after = tree_ticks(host);
                let spent = |pid: &u32, now: &u64| {
                    now.saturating_sub(before.get(pid).copied().unwrap_or(0)) as f64 / hz
                };
                let host_s = after.get(&host).map_or(0.0, |now| spent(&host, now));
                let workers_s: f64 = after
                    .iter()
                    .filter(|(pid, _)| **pid != host)
                    .map(|(pid, now)| spent(pid, now))
                    .sum();
                (Some(host_s), Some(workers_s))
            }
            None => (None, None),
        };
        let own = cpu_ticks(std::process::id()).unwrap_or(0);
        let bench_cpu_s = own.saturating_sub(self.own) as f64 / hz;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let busy_cores = match (self.machine, machine_ticks()) {
            (Some((all0, idle0)), Some((all1, idle1))) if all1 > all0 => {
                let all = (all1 - all0) as f64;
                let idle = idle1.saturating_sub(idle0) as f64;
                // /proc/stat counts every online CPU; the affinity mask may show fewer.
                let online = online_cpus().unwrap_or(cores) as f64;
                Some((all - idle) / all * online)
            }
            _ => None,
        };
        Resources {
            cores,
            busy_cores,
            bench_cpu_s,
            bench_cpu_us_per_call: per_call(bench_cpu_s),
            host_cpu_s,
            host_cpu_us_per_call: host_cpu_s.and_then(per_call),
            worker_cpu_s,
            worker_cpu_us_per_call: worker_cpu_s.and_then(per_call),
            watched,
        }
    }
}

/// CPUs online, from `/proc/stat`'s per-CPU lines.
fn online_cpus() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    (n > 0).then_some(n)
}

/// One watched process tree over the window.
#[derive(Serialize)]
pub struct ProcessTree {
    /// Its root.
    pub pid: u32,
    /// Processes in the tree at the end.
    pub processes: usize,
    /// Processes of the tree at the start that were gone at the end.
    pub exited: usize,
    /// CPU seconds (user + system) of the tree in the window.
    pub cpu_s: f64,
    /// The same per counted call, in µs.
    pub cpu_us_per_call: Option<f64>,
    /// Average cores the tree kept busy.
    pub cores: f64,
    /// The tree's processes that used CPU in the window, busiest first.
    pub busiest: Vec<BusyProcess>,
    /// Sum of the PSS of the tree's processes at the end, KiB.
    pub pss_kib: u64,
}

/// One process's share of a tree's CPU time.
#[derive(Serialize)]
pub struct BusyProcess {
    pub pid: u32,
    pub cpu_s: f64,
}

/// What the measured calls cost.
#[derive(Serialize)]
pub struct Resources {
    /// CPUs this process may run on.
    pub cores: usize,
    /// Average cores busy on the whole machine in the window (`/proc/stat`).
    pub busy_cores: Option<f64>,
    /// The bench's own CPU seconds in the window.
    pub bench_cpu_s: f64,
    /// The same per counted call, in µs.
    pub bench_cpu_us_per_call: Option<f64>,
    /// CPU seconds of the process running the pool (this one, load generator
    /// included, for a pool of its own; the server for `--url`) in the window.
    pub host_cpu_s: Option<f64>,
    /// The same per counted call, in µs.
    pub host_cpu_us_per_call: Option<f64>,
    /// CPU seconds of the pool's worker processes (and zygote) in the window.
    pub worker_cpu_s: Option<f64>,
    /// The same per counted call, in µs.
    pub worker_cpu_us_per_call: Option<f64>,
    /// Each `--watch` tree by name.
    pub watched: BTreeMap<String, ProcessTree>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_values_parse() {
        assert_eq!(parse_watch("server=12"), Ok(("server".into(), 12)));
        assert!(parse_watch("server").is_err());
        assert!(parse_watch("=12").is_err());
        assert!(parse_watch("lm=x").is_err());
    }

    #[test]
    fn the_own_tree_is_found_and_costs_time() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        let snapshot = Snapshot::take(&[("me".into(), me)], Some(me));
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let resources = snapshot.finish(10, started.elapsed());
        let me = &resources.watched["me"];
        assert!(me.pss_kib > 0 && me.processes >= 1, "{x}");
        assert!(resources.bench_cpu_s >= 0.0);
        // As a host without workers: its own time, none for workers.
        assert!(resources.host_cpu_s.is_some_and(|s| s >= 0.0));
        assert_eq!(resources.worker_cpu_s, Some(0.0));
    }
}
