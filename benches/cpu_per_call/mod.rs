//! Section 6 of the comparison: CPU time per call of the host and of the workers, read
//! from `/proc` over each round only, for `ping` from many callers: a pool that sends
//! quick calls ahead (pipelining, the default), the same pool sending one call at a
//! time per worker, and the same calls through `snakepool serve` over HTTP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::{Value, json};
use snakepool::Pool;

use crate::{HANDLERS_DIR, Rounds, Settings, compare_pool, multi_thread, secs_since, throughput};

/// The paths measured, in table order.
pub const PATHS: [&str; 3] = [
    "pool, quick calls sent ahead (`pipeline_depth` 16, the default)",
    "pool, one call at a time per worker (`pipeline_depth` 1)",
    "`snakepool serve`, HTTP/1.1 with keep-alive, load generated in the bench",
];

/// One path's figures, one value per round.
#[derive(Default)]
pub struct PathCpu {
    pub per_s: Rounds,
    /// The host's CPU per call: the bench process for the pools (the load generator
    /// included), the server process for HTTP.
    pub host_us: Rounds,
    /// All its workers' CPU per call.
    pub workers_us: Rounds,
    /// The HTTP client's CPU per call (the bench process), for HTTP only.
    pub client_us: Rounds,
}

/// Section 6's figures, per [`PATHS`] entry.
pub struct CpuPerCall {
    pub paths: [PathCpu; 3],
}

/// CPU seconds (user and system) process `pid` has used; `self` for this process.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // After the name: state is field 3, utime 14, stime 15.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|pid| cpu_seconds(&pid.to_string())).sum()
}

/// CPU seconds of the host and of the workers now.
struct Reading {
    host: f64,
    workers: f64,
    client: f64,
}

impl Reading {
    fn take(host: &str, workers: &[u32]) -> Reading {
        Reading {
            host: cpu_seconds(host),
            workers: cpu_of(workers),
            client: cpu_seconds("self"),
        }
    }

    /// Adds this round's figures (since `self`) to `path`.
    fn record(&self, host: &str, workers: &[u32], calls: usize, per_s: f64, path: &mut PathCpu) {
        let now = Reading::take(host, workers);
        let per_call = |before: f64, after: f64| (after - before) * 1e6 / calls as f64;
        path.per_s.push(per_s);
        path.host_us.push(per_call(self.host, now.host));
        path.workers_us.push(per_call(self.workers, now.workers));
        path.client_us.push(per_call(self.client, now.client));
    }
}

async fn ping_pool(python: &str, workers: usize, depth: usize) -> Pool {
    compare_pool(python, workers)
        .pipeline_depth(depth)
        .start()
        .await
        .expect("pool starts")
}

fn pids(pool: &Pool) -> Vec<u32> {
    pool.status().workers.iter().map(|w| w.pid).collect()
}

/// A `snakepool serve` on a free port of 127.0.0.1, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(python: &str, workers: usize) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_snakepool"))
            .args(["serve", "--listen", "127.0.0.1:0", "--journal", "memory"])
            .args(["--workers", &workers.to_string(), "--python", python])
            .args([
                "--python-path",
                HANDLERS_DIR,
                "--module",
                "compare_handlers",
            ])
            .args(["--log-level", "warn"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("snakepool serve starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut url = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("serve's output");
            if let Some(at) = line.strip_prefix("listening on ") {
                url = Some(at.trim().to_owned());
            }
            if line.starts_with("pool ready") {
                break;
            }
        }
        Server {
            url: url.expect("serve printed where it listens"),
            child,
        }
    }

    async fn worker_pids(&self, client: &reqwest::Client) -> Vec<u32> {
        let pool: Value = client
            .get(format!("{}/v1/pool", self.url))
            .send()
            .await
            .expect("GET /v1/pool")
            .json()
            .await
            .expect("pool status");
        pool["workers"]
            .as_array()
            .map(|workers| {
                workers
                    .iter()
                    .filter_map(|w| w["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `calls` pings over HTTP by `callers` tasks in a closed loop; calls/s.
async fn http_throughput(client: &reqwest::Client, url: &str, callers: usize, calls: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            let url = format!("{url}/v1/call");
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let answer = client
                        .post(&url)
                        .json(&json!({"command": "ping"}))
                        .send()
                        .await
                        .expect("POST /v1/call");
                    assert!(answer.status().is_success(), "{}", answer.status());
                    answer.bytes().await.expect("an answer");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("caller finished");
    }
    calls as f64 / secs_since(started)
}

/// Measures every path, `s.rounds` rounds, the order rotating between rounds.
pub fn measure(s: &Settings) -> CpuPerCall {
    let runtime = multi_thread();
    let pipelined = runtime.block_on(ping_pool(&s.python, 2, 16));
    let one_at_a_time = runtime.block_on(ping_pool(&s.python, 2, 1));
    let server = Server::start(&s.python, 2);
    let client = reqwest::Client::new();
    let server_workers = runtime.block_on(server.worker_pids(&client));
    let server_pid = server.child.id().to_string();
    let mut out = CpuPerCall {
        paths: Default::default(),
    };
    let (callers, calls, http_calls) = (s.cpu_callers, s.cpu_calls, s.http_calls);
    // Warm-up: the pools learn that `ping` is quick; the connections open.
    for pool in [&pipelined, &one_at_a_time] {
        runtime.block_on(throughput(pool, "ping", callers, 2000));
    }
    runtime.block_on(http_throughput(&client, &server.url, callers, 2000));
    for round in 0..s.rounds {
        for k in 0..PATHS.len() {
            let path = (round + k) % PATHS.len();
            match path {
                0 | 1 => {
                    let pool = if path == 0 {
                        &pipelined
                    } else {
                        &one_at_a_time
                    };
                    let workers = pids(pool);
                    let before = Reading::take("self", &workers);
                    let per_s = runtime.block_on(throughput(pool, "ping", callers, calls));
                    before.record("self", &workers, calls, per_s, &mut out.paths[path]);
                }
                _ => {
                    let before = Reading::take(&server_pid, &server_workers);
                    let per_s = runtime.block_on(http_throughput(
                        &client,
                        &server.url,
                        callers,
                        http_calls,
                    ));
                    before.record(
                        &server_pid,
                        &server_workers,
                        http_calls,
                        per_s,
                        &mut out.paths[path],
                    );
                }
            }
        }
        let [a, b, c] = &out.paths;
        println!(
            "  round {}: sent ahead {:.0}/s ({:.1} µs host CPU/call), one at a time {:.0}/s ({:.1}), HTTP {:.0}/s ({:.1} server)",
            round + 1,
            crate::last(&a.per_s),
            crate::last(&a.host_us),
            crate::last(&b.per_s),
            crate::last(&b.host_us),
            crate::last(&c.per_s),
            crate::last(&c.host_us),
        );
    }
    runtime.block_on(async {
        pipelined.shutdown().await;
        one_at_a_time.shutdown().await;
    });
    drop(server);
    out
}
