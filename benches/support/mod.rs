//! What several benchmarks share: CPU pinning, the raw pipe worker they measure the
//! pool against, settings from the environment and processes' memory.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};

/// The value of environment variable `name` as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The resident memory of process `pid`, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Restricts thread or process `pid` (0: the calling thread) to `cpus`; processes and
/// threads started from it afterwards inherit that.
pub fn set_affinity(pid: u32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        );
    }
}

/// The worker runtime driven by hand over blocking pipes: the floor for any host.
pub struct RawWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    next_id: u64,
}

impl RawWorker {
    /// Starts `python -m snakepool_worker` with `python_path` and `modules`, and
    /// completes its handshake.
    pub fn start(python: &str, python_path: &str, modules: &[&str]) -> RawWorker {
        let mut command = Command::new(python);
        command.args(["-m", "snakepool_worker", "--worker-id", "raw"]);
        for module in modules {
            command.args(["--module", module]);
        }
        let mut child = command
            .env("PYTHONPATH", python_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut raw = RawWorker {
            child,
            stdin,
            stdout,
            next_id: 0,
        };
        raw.round_trip("ping", json!({"initialization": true}));
        raw
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One request and its reply, with blocking writes and reads.
    pub fn round_trip(&mut self, command: &str, args: Value) -> Value {
        let request = json!({"id": self.next_id, "command": command, "args": args});
        let body = serde_json::to_vec(&request).expect("json");
        self.next_id += 1;
        let mut frame = Vec::with_capacity(body.len() + 4);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        self.stdin.write_all(&frame).expect("worker input");
        let mut header = [0u8; 4];
        self.stdout.read_exact(&mut header).expect("worker output");
        let mut reply = vec![0u8; u32::from_be_bytes(header) as usize];
        self.stdout.read_exact(&mut reply).expect("worker output");
        serde_json::from_slice(&reply).expect("json reply")
    }
}

impl Drop for RawWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
