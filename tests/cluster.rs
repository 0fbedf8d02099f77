//! Three nodes sharing a Redis journal behind HAProxy (`scripts/cluster.sh`), against
//! the real services: sessions survive the loss of a node and move back when it
//! returns, a paused node cannot write into a session another node took over, and a
//! Redis restart loses nothing acknowledged.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

const SESSIONS: usize = 64;
const LEASE: &str = "2s";

/// The next note's text.
static NOTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A cluster started by `scripts/cluster.sh up`; stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn up() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let node_args = format!(
            "--python-path {} --module snapshot_handlers --module snakepool_worker.dspy \
             --checkout-timeout 20s --session-idle 1h",
            common::fixtures().display()
        );
        let status = Command::new("sh")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
            .arg("up")
            .arg(dir.path())
            .env("SNAKEPOOL_BIN", env!("CARGO_BIN_EXE_snakepool"))
            .env("SNAKEPOOL_PYTHON", common::python())
            .env("SNAKEPOOL_LEASE_TTL", LEASE)
            .env("SNAKEPOOL_NODE_ARGS", node_args)
            .env_remove("SNAKEPOOL_CONFIG")
            .status()
            .unwrap();
        let cluster = Cluster { dir };
        assert!(
            status.success(),
            "the cluster did not start:\n{}",
            cluster.logs()
        );
        cluster
    }

    /// A value of `cluster.env`.
    fn var(&self, name: &str) -> String {
        let env = std::fs::read_to_string(self.dir.path().join("cluster.env")).unwrap();
        env.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in cluster.env"))
            .trim_matches('\'')
            .to_owned()
    }

    fn balancer(&self) -> String {
        self.var("BALANCER_URL")
    }

    fn node_url(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.var(&format!("NODE{n}_PORT")))
    }

    fn node_pid(&self, n: usize) -> i32 {
        self.var(&format!("NODE{n}_PID")).parse().unwrap()
    }

    fn signal(&self, n: usize, signal: libc::c_int) {
        // SAFETY: kill(2) on a pid this cluster started.
        assert_eq!(unsafe { libc::kill(self.node_pid(n), signal) }, 0);
    }

    /// Runs `scripts/cluster.sh WHAT DIR ARGS`.
    fn script(&self, what: &str, args: &[&str]) {
        let status = Command::new("sh")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
            .args([what, self.dir.path().to_str().unwrap()])
            .args(args)
            .env_remove("SNAKEPOOL_CONFIG")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cluster.sh {what} failed:\n{}",
            self.logs()
        );
    }

    fn start_node(&self, n: usize) {
        self.script("node", &[&n.to_string()]);
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for name in [
            "node1.log",
            "node2.log",
            "node3.log",
            "redis.log",
            "haproxy.log",
        ] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            all += &format!("--- {name}\n");
            for line in tail.into_iter().rev() {
                all += &format!("{line}\n");
            }
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
            .args(["down", self.dir.path().to_str().unwrap()])
            .status();
    }
}

/// A session call: status, body and the node that answered.
async fn call(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    command: &str,
    args: Value,
) -> (StatusCode, Value) {
    let sent = client
        .post(format!("{url}/v1/call"))
        .header("x-session-id", session)
        .json(&json!({"command": command, "args": args}))
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(json!({"text": text}));
            (status, body)
        }
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            json!({"transport": error.to_string()}),
        ),
    }
}

fn session(n: usize) -> String {
    format!("conversation-{n:02}")
}

/// Sets up each session: a DSPy program answering with its number, and no notes.
async fn set_up(client: &reqwest::Client, url: &str) {
    for n in 0..SESSIONS {
        let id = session(n);
        let script =
            json!({"provider": "dummy", "answers": vec![json!({"answer": format!("{n}")}); 64]});
        let (status, body) = call(client, url, &id, "configure_lm", script).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
        let (status, body) = call(
            client,
            url,
            &id,
            "create_program",
            json!({"signature": "question -> answer"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
    }
}

/// What the clients saw: per session, the notes acknowledged and those whose call
/// failed (which may or may not have landed), and every failure's status and kind.
#[derive(Clone, Default)]
struct Ledger {
    acknowledged: BTreeMap<String, Vec<u64>>,
    uncertain: BTreeMap<String, Vec<u64>>,
    failures: Vec<(StatusCode, String)>,
}

/// Clients adding notes to every session through `url` until `stop`, one call per
/// session at a time.
fn load(
    client: &reqwest::Client,
    url: &str,
    ledger: &Arc<Mutex<Ledger>>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|worker| {
            let (client, url, ledger, stop) =
                (client.clone(), url.to_owned(), ledger.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for n in (worker..SESSIONS).step_by(8) {
                        let id = session(n);
                        // Unique across every load run.
                        let text = NOTES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (status, body) =
                            call(&client, &url, &id, "note", json!({"text": text})).await;
                        let mut ledger = ledger.lock().unwrap();
                        if status == StatusCode::OK {
                            ledger.acknowledged.entry(id).or_default().push(text);
                        } else {
                            ledger.uncertain.entry(id).or_default().push(text);
                            let kind = body["error"]["kind"].as_str().unwrap_or("").to_owned();
                            ledger.failures.push((status, kind));
                        }
                    }
                }
            })
        })
        .collect()
}

/// Checks every session's state against what its clients saw: each acknowledged note
/// is there, in order, and nothing else but notes whose call failed; its program
/// answers with its number.
async fn check_state(client: &reqwest::Client, url: &str, ledger: &Ledger) {
    for n in 0..SESSIONS {
        let id = session(n);
        let (status, body) = call(client, url, &id, "notes", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
        let notes: Vec<u64> = serde_json::from_value(body["result"].clone()).unwrap();
        let acknowledged = ledger.acknowledged.get(&id).cloned().unwrap_or_default();
        let uncertain = ledger.uncertain.get(&id).cloned().unwrap_or_default();
        let kept: Vec<u64> = notes
            .iter()
            .copied()
            .filter(|note| !uncertain.contains(note))
            .collect();
        assert_eq!(
            kept, acknowledged,
            "{id}: acknowledged notes lost or reordered"
        );
        let (status, body) = call(
            client,
            url,
            &id,
            "execute_program",
            json!({"program_id": "prog_1", "inputs": {"question": "which?"}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
        assert_eq!(
            body["result"]["outputs"]["answer"],
            json!(format!("{n}")),
            "{id}"
        );
    }
}

async fn wait_for(what: &str, limit: Duration, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready().await {
        assert!(Instant::now() < deadline, "{what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the load for `duration` and returns what it saw.
async fn run_load(
    client: &reqwest::Client,
    url: &str,
    ledger: &Arc<Mutex<Ledger>>,
    duration: Duration,
    during: impl AsyncFnOnce(),
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = load(client, url, ledger, &stop);
    tokio::time::sleep(duration / 2).await;
    during().await;
    tokio::time::sleep(duration / 2).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_lost_node_a_paused_node_and_a_redis_restart() {
    let cluster = Cluster::up();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let balancer = cluster.balancer();
    set_up(&client, &balancer).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    // Node 2 is killed mid-load.
    run_load(
        &client,
        &balancer,
        &ledger,
        Duration::from_secs(6),
        async || {
            cluster.signal(2, libc::SIGKILL);
        },
    )
    .await;
    let seen = ledger.lock().unwrap().clone();
    check_state(&client, &balancer, &seen).await;
    {
        let ledger = ledger.lock().unwrap();
        // Only calls in flight on the killed node failed, each with a clear answer:
        // HAProxy's 502/503 for the connection lost, or a node's `session_moved`.
        for (status, kind) in &ledger.failures {
            assert!(
                (502..=504).contains(&status.as_u16()) || kind == "session_moved",
                "unexpected failure {status} {kind:?}"
            );
        }
        let acknowledged: usize = ledger.acknowledged.values().map(Vec::len).sum();
        assert!(
            acknowledged > SESSIONS,
            "the load ran: {acknowledged} calls"
        );
    }

    // Node 2 comes back: its sessions move back to it, without loss.
    cluster.start_node(2);
    wait_for(
        "node2 back in the balancer",
        Duration::from_secs(30),
        async || {
            let mut seen = std::collections::HashSet::new();
            for n in 0..SESSIONS {
                let answer = client
                    .get(format!("{balancer}/v1/pool"))
                    .header("x-session-id", session(n))
                    .send()
                    .await;
                if let Ok(answer) = answer
                    && let Ok(body) = answer.json::<Value>().await
                {
                    seen.insert(body["node"].as_str().unwrap_or("").to_owned());
                }
            }
            seen.contains("node2")
        },
    )
    .await;
    run_load(
        &client,
        &balancer,
        &ledger,
        Duration::from_secs(6),
        async || {},
    )
    .await;
    let seen = ledger.lock().unwrap().clone();
    check_state(&client, &balancer, &seen).await;
    let node2 = client
        .get(format!("{}/metrics", cluster.node_url(2)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(&node2, "snakepool_session_rebuilds_total") > 0.0,
        "sessions moved back to node2 and were rebuilt there:\n{node2}"
    );
    assert!(node2.contains(r#"node="node2""#), "{node2}");

    // A paused node cannot write into a session another node took over.
    let (node1, node3) = (cluster.node_url(1), cluster.node_url(3));
    let paused = "paused-session";
    let (status, _) = call(&client, &node1, paused, "note", json!({"text": 1})).await;
    assert_eq!(status, StatusCode::OK);
    let slow = {
        let (client, node1) = (client.clone(), node1.clone());
        tokio::spawn(async move {
            call(
                &client,
                &node1,
                paused,
                "note",
                json!({"text": 2, "delay": 1.0}),
            )
            .await
        })
    };
    wait_for(
        "the slow call to run on node1's worker",
        Duration::from_secs(10),
        async || {
            let answer = client.get(format!("{node1}/v1/pool")).send().await;
            let Ok(body) = answer else { return false };
            let Ok(pool) = body.json::<Value>().await else {
                return false;
            };
            pool["workers"]
                .as_array()
                .is_some_and(|workers| workers.iter().any(|w| w["in_flight"].as_u64() > Some(0)))
        },
    )
    .await;
    cluster.signal(1, libc::SIGSTOP);
    // Node 3 takes the session over once node 1's lease has run out.
    let (status, body) = call(&client, &node3, paused, "note", json!({"text": 3})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cluster.signal(1, libc::SIGCONT);
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["kind"], "session_moved", "{body}");
    let (_, notes) = call(&client, &node3, paused, "notes", json!({})).await;
    assert_eq!(
        notes["result"],
        json!([1, 3]),
        "the stale write did not land"
    );
    let node1_metrics = client
        .get(format!("{node1}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&node1_metrics, "snakepool_sessions_moved_total"),
        1.0,
        "{node1_metrics}"
    );

    // Redis restarted mid-load: calls fail with journal_unavailable while it is
    // down, and nothing acknowledged is lost.
    let failures_before = ledger.lock().unwrap().failures.len();
    let redis_pid: i32 = cluster.var("REDIS_PID").parse().unwrap();
    run_load(
        &client,
        &balancer,
        &ledger,
        Duration::from_secs(6),
        async || {
            // SAFETY: kill(2) on the Redis this cluster started.
            assert_eq!(unsafe { libc::kill(redis_pid, libc::SIGKILL) }, 0);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            cluster.script("redis", &[]);
        },
    )
    .await;
    let seen = ledger.lock().unwrap().clone();
    check_state(&client, &balancer, &seen).await;
    {
        let ledger = ledger.lock().unwrap();
        let during: HashMap<String, usize> = ledger.failures[failures_before..].iter().fold(
            HashMap::new(),
            |mut kinds, (_, kind)| {
                *kinds.entry(kind.clone()).or_default() += 1;
                kinds
            },
        );
        assert!(
            during.keys().all(|kind| kind == "journal_unavailable"),
            "{during:?}"
        );
        assert!(during.contains_key("journal_unavailable"), "{during:?}");
    }
}
