//! Findings of a review of the hardening: each test shows one hole, against a real pool
//! or a real `snakepool serve`, and fails until it is fixed.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use snakepool::{Error, PoolEvent};

use common::{WAIT, builder, fixtures, python, wait_for_event, wait_until, wait_until_async};

// ---------------------------------------------------------------------------------
// A `snakepool serve` of our own
// ---------------------------------------------------------------------------------

/// A running `snakepool serve`, killed when dropped.
struct Serve {
    child: Child,
    url: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Starts `snakepool serve` with `workers` workers, the test handlers and `extra`
/// flags, and waits until its pool is ready.
fn serve(workers: usize, extra: &[&str]) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_snakepool"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SNAKEPOOL_JOURNAL", "memory")
        .args(["--workers", &workers.to_string()])
        .args(["--python", &python()])
        .args(["--python-path", fixtures().to_str().unwrap()])
        .args(["--module", "sp_test_handlers"])
        .args(extra);
    for (key, _) in std::env::vars() {
        if key.starts_with("SNAKEPOOL_") && key != "SNAKEPOOL_SPAWN" {
            command.env_remove(key);
        }
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    let url = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    let ready = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(ready.starts_with("pool ready"), "{ready}");
    Serve {
        child,
        url,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        _dir: dir,
    }
}

impl Serve {
    async fn call(&self, body: Value) -> (StatusCode, String) {
        let response = self
            .client
            .post(format!("{}/v1/call", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    async fn session_ids(&self) -> Vec<String> {
        let page: Value = self
            .client
            .get(format!("{}/v1/sessions?limit=1000", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    }

    fn host_port(&self) -> String {
        self.url.strip_prefix("http://").unwrap().to_owned()
    }
}

/// The kind of an `{"error": {...}}` body, or what the body was instead.
fn error_kind(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(value) => value["error"]["kind"]
            .as_str()
            .map_or_else(|| format!("no kind in {value}"), str::to_owned),
        Err(_) => format!(
            "not JSON ({} bytes: {:?})",
            body.len(),
            body.chars().take(80).collect::<String>()
        ),
    }
}

/// A connection that sends pipelined requests and never reads an answer, with a tiny
/// receive window: once the server's answers fill the socket buffers, the server's
/// write to it blocks. Returns once sending would block for half a second (the server
/// has stopped reading from it too).
fn stalled_reader(host_port: &str) -> std::net::TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    let addr: std::net::SocketAddrV4 = host_port.parse().unwrap();
    let raw = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a plain connect on a socket we own, with a sockaddr_in on the stack.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    let socket = std::net::TcpStream::from(fd);
    socket.set_nonblocking(true).unwrap();
    let requests = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < Duration::from_millis(500) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server kept reading pipelined requests"
        );
        match std::io::Write::write(&mut &socket, &requests) {
            Ok(_) => last_progress = Instant::now(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            // The server closed it: no slot is held.
            Err(_) => break,
        }
    }
    socket
}

/// Sends one `GET /health` on a fresh connection; the status line, if one arrives
/// within `limit`.
async fn health_within(host_port: &str, limit: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(host_port).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = vec![0u8; 256];
        let n = stream.read(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.lines().next().map(str::to_owned)
    };
    tokio::time::timeout(limit, attempt).await.ok().flatten()
}

/// Writes a Python command module named `name` into `dir`.
fn write_module(dir: &Path, name: &str, source: &str) {
    std::fs::write(dir.join(format!("{name}.py")), source).unwrap();
}

// ---------------------------------------------------------------------------------
// HTTP layer
// ---------------------------------------------------------------------------------

/// An error body above 64 KiB (a Python exception with a long message, an unknown
/// command with a long name) reaches the client empty: no kind, no request id.
#[tokio::test(flavor = "multi_thread")]
async fn large_error_bodies_reach_the_client_empty() {
    let serve = serve(2, &[]);
    let (status, body) = serve
        .call(json!({"command": "fail", "args": {"message": "m".repeat(30_000)}}))
        .await;
    let (status2, body2) = serve.call(json!({"command": "x".repeat(70_000)})).await;
    assert_eq!(
        (status, error_kind(&body), status2, error_kind(&body2)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "worker_error".to_owned(),
            StatusCode::NOT_FOUND,
            "unknown_command".to_owned()
        ),
        "error bodies above 64 KiB must still say what went wrong"
    );
}

/// A client that pipelines requests and never reads the answers holds its
/// connection (and so a `max_connections` slot) forever: neither the header nor the
/// body timeout applies to a blocked write. With the token on, any unauthenticated
/// client can do it (`/health` needs none, 401 answers fill buffers as well).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_holds_a_connection_slot_forever() {
    let serve = serve(
        1,
        &[
            "--max-connections",
            "1",
            "--header-read-timeout",
            "1s",
            "--body-read-timeout",
            "1s",
            "--token",
            "s3cret",
        ],
    );
    let host_port = serve.host_port();
    assert!(
        health_within(&host_port, WAIT).await.is_some(),
        "server answers"
    );
    let hp = host_port.clone();
    let stalled = tokio::task::spawn_blocking(move || stalled_reader(&hp))
        .await
        .unwrap();
    // Six times the server's own timeouts.
    let answer = health_within(&host_port, Duration::from_secs(6)).await;
    drop(stalled);
    assert!(
        answer.is_some(),
        "a client that stopped reading kept the only connection slot for 6 s \
         (header and body timeouts are 1 s): nobody else is served"
    );
}

/// After SIGTERM, `serve` waits for every open connection with no deadline: a client
/// that stopped reading keeps the process alive long past `drain_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_stalled_reader_does_not_exit_after_the_drain_deadline() {
    let mut serve = serve(1, &["--drain-timeout", "1s", "--header-read-timeout", "1s"]);
    let host_port = serve.host_port();
    let stalled = tokio::task::spawn_blocking(move || stalled_reader(&host_port))
        .await
        .unwrap();
    signal(serve.child.id(), libc::SIGTERM);
    let started = Instant::now();
    let mut exited = false;
    while started.elapsed() < Duration::from_secs(8) {
        if matches!(serve.child.try_wait(), Ok(Some(_))) {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stalled);
    assert!(
        exited,
        "snakepool serve still running 8 s after SIGTERM with --drain-timeout 1s \
         (one client has stopped reading)"
    );
}

// ---------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------

/// A session expired by its TTL is freed on its worker only once the worker is free.
/// Meanwhile its id may be used again: that opens a new session, whose first call
/// waits for the old one's clean-up (which would otherwise wipe the new state, both
/// being the same id on the worker), and says it created the session.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_sessions_id_opens_a_new_session_that_its_clean_up_cannot_wipe() {
    let serve = serve(2, &["--session-ttl", "500ms"]);
    let (status, body) = serve
        .call(json!({"command": "set_value", "session_id": "ttl-victim",
                     "args": {"key": "k", "value": "old"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Both workers busy for a while: the expired session's cleanup must wait.
    let sleepers: Vec<_> = (0..2)
        .map(|_| {
            let client = serve.client.clone();
            let url = serve.url.clone();
            tokio::spawn(async move {
                client
                    .post(format!("{url}/v1/call"))
                    .json(&json!({"command": "sleep", "args": {"seconds": 2.5}}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    wait_until_async("the session to expire", WAIT, || async {
        !serve.session_ids().await.contains(&"ttl-victim".to_owned())
    })
    .await;
    let response = serve
        .client
        .post(format!("{}/v1/call", serve.url))
        .json(&json!({"command": "set_value", "session_id": "ttl-victim",
                      "args": {"key": "k", "value": "new"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-session-state"], "created");
    for sleeper in sleepers {
        assert_eq!(sleeper.await.unwrap(), StatusCode::OK);
    }
    let (status, body) = serve
        .call(json!({"command": "get_value", "session_id": "ttl-victim",
                     "args": {"key": "k"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("\"new\""),
        "the new session's state was wiped: {body}"
    );
}

/// Expiring many sessions at once queues one `cleanup_session` per session: they fill
/// `max_queue` (clients' calls are refused as saturated) and the cleanups past the
/// queue limit are skipped without a word, so their state stays on the worker forever.
#[tokio::test(flavor = "multi_thread")]
async fn mass_expiry_fills_the_queue_and_leaks_worker_state() {
    let pool = builder(1)
        .max_queue(4)
        .session_ttl(Some(Duration::from_millis(300)))
        .start()
        .await
        .unwrap();
    for i in 0..40 {
        pool.session(&format!("s{i}"))
            .call("set_value", json!({"key": "k", "value": i}))
            .await
            .unwrap();
    }
    // The worker is busy while the sessions expire.
    let sleeper = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 1.5})).await })
    };
    wait_until("the sessions to expire", WAIT, || {
        pool.status().sessions == 0
    })
    .await;
    let during = pool.call("echo", json!({"x": 1})).await;
    sleeper.await.unwrap().unwrap();
    wait_until("the cleanups to finish", WAIT, || {
        pool.status().queued == 0 && !common::any_busy(&pool)
    })
    .await;
    let stats = pool.call("get_stats", json!({})).await.unwrap();
    let left = stats["sessions"].as_u64().unwrap();
    assert!(
        during.is_ok() && left == 0,
        "a client's call during the expiry: {:?}; sessions the worker still holds after \
         all 40 expired: {left}",
        during.map_err(|e| e.kind())
    );
    pool.shutdown().await;
}

/// `GET /v1/sessions` hands whoever may call it every client's session id, and a
/// session id is all it takes to call into (or `DELETE`) that session: with an admin
/// token, clients cannot list sessions (nor read the pool or metrics).
#[tokio::test(flavor = "multi_thread")]
async fn with_an_admin_token_clients_cannot_list_each_others_sessions() {
    let serve = serve(2, &["--token", "client-tok", "--admin-token", "admin-tok"]);
    let secret_id = format!("alice-{:016x}", rand::random::<u64>());
    let call = |token: &'static str, body: Value| {
        let request = serve
            .client
            .post(format!("{}/v1/call", serve.url))
            .bearer_auth(token)
            .json(&body);
        async move { request.send().await.unwrap().status() }
    };
    let stored = json!({"command": "set_value", "session_id": secret_id,
                        "args": {"key": "card", "value": "4111-alice"}});
    assert_eq!(call("client-tok", stored).await, StatusCode::OK);
    for path in ["/v1/sessions", "/v1/pool", "/metrics"] {
        let get = |token: &'static str| {
            let request = serve
                .client
                .get(format!("{}{path}", serve.url))
                .bearer_auth(token);
            async move { request.send().await.unwrap().status() }
        };
        assert_eq!(get("client-tok").await, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(get("admin-tok").await, StatusCode::OK, "{path}");
    }
    // The operator's token still makes calls.
    assert_eq!(
        call("admin-tok", json!({"command": "ping"})).await,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------
// Abandoned calls
// ---------------------------------------------------------------------------------

const DYING: &str = r#"
import os, time
from snakepool_worker import command

@command("fork_then_die")
def fork_then_die(args, ctx):
    """Fork a child that lingers (as multiprocessing's fork does), then die."""
    if os.fork() == 0:
        time.sleep(float(args.get("linger", 30)))
        os._exit(0)
    time.sleep(float(args.get("after", 0.3)))
    os._exit(3)
"#;

/// A worker that dies during a call whose caller went away is noticed only at the
/// call's deadline when its output pipe stays open (a forked child holds it): the
/// abandoned-call path reads the pipe only, while a live caller also watches the
/// process exit. The pool runs a worker short for up to the whole timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_dying_during_an_abandoned_call_is_noticed_only_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    write_module(dir.path(), "review_dying", DYING);
    let pool = builder(1)
        .python_path(dir.path())
        .module("review_dying")
        .start()
        .await
        .unwrap();
    // A caller that waits sees the death at once.
    let started = Instant::now();
    let live = pool
        .call_with_timeout(
            "fork_then_die",
            json!({"after": 0.3, "linger": 10}),
            Duration::from_secs(30),
        )
        .await;
    assert!(
        matches!(live, Err(Error::WorkerCrashed { .. }))
            && started.elapsed() < Duration::from_secs(3),
        "{live:?} after {:?}",
        started.elapsed()
    );
    wait_until("a replacement", WAIT, || pool.health().ready_workers == 1).await;
    let mut events = pool.subscribe();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        pool.call_with_timeout(
            "fork_then_die",
            json!({"after": 0.3, "linger": 10}),
            Duration::from_secs(30),
        ),
    )
    .await;
    assert!(abandoned.is_err(), "the call was abandoned while running");
    let started = Instant::now();
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        wait_for_event(&mut events, |e| matches!(e, PoolEvent::WorkerLost { .. })),
    )
    .await;
    let waited = started.elapsed();
    pool.shutdown_within(Duration::from_millis(100)).await;
    assert!(
        lost.is_ok(),
        "the worker died 0.3 s into an abandoned call; the pool had not noticed after \
         {waited:?} (it waits for the call's 30 s deadline)"
    );
}
