//! The HTTP server under a flood of 10,000 malformed requests keeps serving well-formed
//! ones.
//!
//! A real server on a random loopback port, over a pool of two real workers, gets
//! 10,000 malformed requests, 32 at a time: invalid JSON, wrong types, unknown fields,
//! `args` that are not an object, wrong or missing content types, bodies over the
//! 4 KiB limit, unknown routes and methods, bad session ids, unknown commands, and raw
//! TCP garbage and truncated HTTP. Each HTTP-level request must get its own 4xx with
//! the error kind the API gives it; a well-formed `ping` every 25 requests must
//! succeed throughout; and afterwards the server still answers, the same two workers
//! serve, none crashed, and no malformed request reached a worker except the unknown
//! commands.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::builder;
use futures::StreamExt;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use snakepool::Pool;
use snakepool::server::{ConnectionLimits, ServerOptions, ServerState, router, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Malformed requests sent.
const MALFORMED: usize = 10_000;
/// Requests in flight at once.
const CONCURRENCY: usize = 32;
/// A well-formed `ping` goes out after every this many malformed requests.
const PING_EVERY: usize = 25;
/// The server's body limit.
const BODY_LIMIT: usize = 4096;
/// Longest any single exchange may take.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);
/// Longest the whole flood may take before the test fails.
const FLOOD_LIMIT: Duration = Duration::from_secs(120);

/// The kinds of malformed request, sent in turn.
const KINDS: usize = 24;

/// What the server must answer an HTTP request.
#[derive(Debug)]
enum Want {
    /// This status with a JSON error body of this kind.
    Error(StatusCode, &'static str),
    /// This status with a JSON error body of this kind and a message saying this.
    ErrorSaying(StatusCode, &'static str, &'static str),
    /// This status from axum itself (no body of the API's).
    Status(StatusCode),
}

/// What the server must answer raw bytes on a connection, before closing it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RawWant {
    /// Nothing: the request never got as far as a request.
    Nothing,
    /// hyper's own `400 Bad Request`, no body.
    Hyper400,
    /// The API's `400` with a `bad_request` JSON body: the request line and headers
    /// were fine, the body was not.
    Api400,
    /// Nothing, or hyper's `400`, depending on what the junk looks like.
    NothingOrHyper400,
}

/// One request of the flood.
enum Job {
    Malformed(usize),
    Ping,
}

/// A request built from the reqwest client: method, path, content type, body.
struct Http {
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

impl Http {
    fn call(content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Http {
        Http {
            method: Method::POST,
            path: "/v1/call".into(),
            content_type,
            body: body.into(),
        }
    }

    fn json(body: impl Into<Vec<u8>>) -> Http {
        Http::call(Some("application/json"), body)
    }

    fn bare(method: Method, path: impl Into<String>) -> Http {
        Http {
            method,
            path: path.into(),
            content_type: None,
            body: Vec::new(),
        }
    }
}

/// A malformed request: either an HTTP request or raw bytes for a TCP connection.
enum Malformed {
    Http(Http, Want),
    Raw(Vec<u8>, RawWant),
}

/// The `i`th malformed request. `i % KINDS` picks the kind; `i / KINDS` varies it.
fn malformed(i: usize) -> Malformed {
    let v = i / KINDS;
    let bad = |body: Vec<u8>| Malformed::Http(Http::json(body), bad_request());
    match i % KINDS {
        // Not JSON at all.
        0 => bad(["{not json", "{\"command\": \"ping\"", "]", "nul\u{0}l"][v % 4].into()),
        // An empty body.
        1 => bad(Vec::new()),
        // Invalid UTF-8 inside a string.
        2 => bad(b"{\"command\": \"p\xffing\"}".to_vec()),
        // `command` missing or not a string.
        3 => bad([
            r#"{"args": {}}"#,
            r#"{"command": 7}"#,
            r#"{"command": null}"#,
            "[]",
        ][v % 4]
            .into()),
        // `timeout_ms` or `session_id` of the wrong type.
        4 => bad([
            r#"{"command": "ping", "timeout_ms": "soon"}"#,
            r#"{"command": "ping", "timeout_ms": -5}"#,
            r#"{"command": "ping", "session_id": ["a"]}"#,
            r#"{"command": "ping", "session_id": 42}"#,
        ][v % 4]
            .into()),
        // An unknown field.
        5 => bad(format!(r#"{{"command": "ping", "surprise{v}": 1}}"#).into()),
        // `args` that is not an object.
        6 | 7 => {
            let args = ["[1, 2]", "\"text\"", "null", "17", "true"][v % 5];
            let body = format!(r#"{{"command": "echo", "args": {args}}}"#);
            Malformed::Http(
                Http::json(body),
                Want::Error(StatusCode::BAD_REQUEST, "invalid_request"),
            )
        }
        // Nesting deeper than serde_json's recursion limit (128).
        8 => {
            let depth = 200 + v % 300;
            let body = format!(
                r#"{{"command": "echo", "args": {{"deep": {}{}}}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            bad(body.into())
        }
        // A well-formed body with the wrong content type or none. axum's own answer
        // would be 415; the API answers every malformed body with 400 `bad_request`
        // (README: "400 (malformed body or arguments)"), saying what was wrong.
        9 => {
            let content_type = [
                Some("text/plain"),
                None,
                Some("application/x-www-form-urlencoded"),
                Some("application/jsonx"),
            ][v % 4];
            Malformed::Http(
                Http::call(content_type, r#"{"command": "ping"}"#),
                Want::ErrorSaying(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "Content-Type: application/json",
                ),
            )
        }
        // Bodies over the limit: JSON, garbage, and garbage just over.
        10 | 11 => {
            let body = match v % 3 {
                0 => json!({"command": "echo", "args": {"blob": "x".repeat(2 * BODY_LIMIT)}})
                    .to_string()
                    .into_bytes(),
                1 => vec![b'\xfe'; 3 * BODY_LIMIT],
                _ => vec![b'{'; BODY_LIMIT + 1],
            };
            Malformed::Http(
                Http::json(body),
                Want::Error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            )
        }
        // Unknown routes.
        12 => {
            let (method, path) = [
                (Method::GET, "/v1/nope".to_owned()),
                (Method::POST, "/v1/calls".to_owned()),
                (Method::POST, "/v2/call".to_owned()),
                (Method::GET, "/index.html".to_owned()),
                (Method::GET, format!("/v1/call/{v}")),
                (Method::GET, format!("/{}", "a".repeat(2000))),
                (Method::DELETE, "/v1/sessions/".to_owned()),
            ][v % 7]
                .clone();
            Malformed::Http(
                Http::bare(method, path),
                Want::Status(StatusCode::NOT_FOUND),
            )
        }
        // Known routes, wrong methods.
        13 | 14 => {
            let (method, path) = [
                (Method::GET, "/v1/call"),
                (Method::PUT, "/v1/call"),
                (Method::DELETE, "/v1/call"),
                (Method::POST, "/health"),
                (Method::DELETE, "/v1/pool"),
                (Method::PATCH, "/metrics"),
                (Method::POST, "/v1/sessions"),
                (Method::PUT, "/v1/sessions/s1"),
                (Method::OPTIONS, "/v1/pool"),
            ][v % 9]
                .clone();
            Malformed::Http(
                Http::bare(method, path),
                Want::Status(StatusCode::METHOD_NOT_ALLOWED),
            )
        }
        // Closing a session that was never opened.
        15 => Malformed::Http(
            Http::bare(Method::DELETE, format!("/v1/sessions/never-opened-{v}")),
            Want::Error(StatusCode::NOT_FOUND, "session_not_found"),
        ),
        // A session id that is not valid percent-encoded UTF-8.
        16 => Malformed::Http(
            Http::bare(Method::DELETE, "/v1/sessions/%FF%FE"),
            Want::Status(StatusCode::BAD_REQUEST),
        ),
        // A command no worker has: the only kind that reaches a worker.
        17 => Malformed::Http(
            Http::json(format!(r#"{{"command": "no_such_command_{v}"}}"#)),
            Want::Error(StatusCode::NOT_FOUND, "unknown_command"),
        ),
        // Raw bytes that are not HTTP.
        18 => Malformed::Raw(junk(i), RawWant::NothingOrHyper400),
        // A request line and headers cut short.
        19 => {
            let head = b"POST /v1/call HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: applic";
            Malformed::Raw(head[..1 + v % (head.len() - 1)].to_vec(), RawWant::Nothing)
        }
        // A body shorter than its Content-Length.
        20 => Malformed::Raw(
            b"POST /v1/call HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"command\": \"pi"
                .to_vec(),
            RawWant::Api400,
        ),
        // Heads no HTTP/1.1 server accepts, and blank lines alone.
        21 => {
            let (bytes, want) = [
                (
                    &b"POST /v1/call HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"[..],
                    RawWant::Hyper400,
                ),
                (b"GET /health HTTP/9.9\r\n\r\n", RawWant::Hyper400),
                (
                    b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",
                    RawWant::Hyper400,
                ),
                (b"\r\n\r\n\r\n\r\n", RawWant::Nothing),
            ][v % 4];
            Malformed::Raw(bytes.to_vec(), want)
        }
        // A chunked body whose chunk sizes are not hex.
        22 => Malformed::Raw(
            b"POST /v1/call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
            RawWant::Api400,
        ),
        // The right path with an HTTP method no one has heard of.
        _ => Malformed::Http(
            Http::bare(Method::from_bytes(b"FROB").unwrap(), "/v1/call"),
            Want::Status(StatusCode::METHOD_NOT_ALLOWED),
        ),
    }
}

fn bad_request() -> Want {
    Want::Error(StatusCode::BAD_REQUEST, "bad_request")
}

/// Deterministic junk bytes, different for each `i`.
fn junk(i: usize) -> Vec<u8> {
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len = 1 + (state % 600) as usize;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends one HTTP request and checks the answer against `want`.
async fn check_http(client: &Client, url: &str, http: Http, want: &Want) -> Result<(), String> {
    let what = format!("{} {}", http.method, truncate(&http.path));
    let mut request = client.request(http.method, format!("{url}{}", http.path));
    if let Some(content_type) = http.content_type {
        request = request.header("content-type", content_type);
    }
    let response = request
        .body(http.body)
        .send()
        .await
        .map_err(|e| format!("{what}: no response: {e}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("{what}: body cut short: {e}"))?;
    match want {
        Want::Error(want_status, kind) | Want::ErrorSaying(want_status, kind, _) => {
            let body: Value = serde_json::from_str(&text).map_err(|e| {
                format!("{what}: {status} with a body that is not JSON ({e}): {text}")
            })?;
            if status != *want_status || body["error"]["kind"] != *kind {
                return Err(format!(
                    "{what}: wanted {want_status} `{kind}`, got {status} {text}"
                ));
            }
            let Some(message) = body["error"]["message"].as_str() else {
                return Err(format!("{what}: error without a message: {text}"));
            };
            if let Want::ErrorSaying(_, _, saying) = want
                && !message.contains(saying)
            {
                return Err(format!(
                    "{what}: wanted a message saying {saying:?}: {text}"
                ));
            }
        }
        Want::Status(want_status) => {
            if status != *want_status {
                return Err(format!("{what}: wanted {want_status}, got {status} {text}"));
            }
        }
    }
    Ok(())
}

/// Writes raw bytes on a new connection, closes the writing half, reads whatever comes
/// back until the server closes, and checks it against `want`.
async fn check_raw(addr: SocketAddr, bytes: &[u8], want: RawWant) -> Result<(), String> {
    let what = format!(
        "raw {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{what}: connect: {e}"))?;
    // The server may answer and close before all of the junk is written.
    if stream.write_all(bytes).await.is_ok() {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer).await {
        Ok(_) => {}
        // A reset after the server answered a request it could not read is fine;
        // what arrived before it is still checked.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(format!("{what}: read: {e}")),
    }
    let answer = String::from_utf8_lossy(&answer);
    let got = if answer.is_empty() {
        RawWant::Nothing
    } else if let Some(body) = answer
        .strip_prefix("HTTP/1.1 400 Bad Request\r\n")
        .and_then(|rest| rest.split_once("\r\n\r\n"))
        .map(|(_, body)| body)
    {
        if body.is_empty() {
            RawWant::Hyper400
        } else if serde_json::from_str::<Value>(body)
            .is_ok_and(|body| body["error"]["kind"] == "bad_request")
        {
            RawWant::Api400
        } else {
            return Err(format!("{what}: a 400 with an unexpected body: {answer:?}"));
        }
    } else {
        return Err(format!("{what}: wanted {want:?}, got {answer:?}"));
    };
    let right = match want {
        RawWant::NothingOrHyper400 => matches!(got, RawWant::Nothing | RawWant::Hyper400),
        want => got == want,
    };
    if right {
        Ok(())
    } else {
        Err(format!("{what}: wanted {want:?}, got {got:?}: {answer:?}"))
    }
}

fn truncate(path: &str) -> &str {
    &path[..path.len().min(60)]
}

async fn ping(client: &Client, url: &str) -> Result<(), String> {
    let response = client
        .post(format!("{url}/v1/call"))
        .json(&json!({"command": "ping"}))
        .send()
        .await
        .map_err(|e| format!("ping: no response: {e}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("ping: bad body: {e}"))?;
    if status == StatusCode::OK && body["result"]["status"] == "ok" {
        Ok(())
    } else {
        Err(format!("ping: {status} {body}"))
    }
}

/// The samples of an OpenMetrics text, by name with labels.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("sample line");
            (name.to_owned(), value.parse().expect("numeric sample"))
        })
        .collect()
}

fn worker_pids(pool: &Pool) -> Vec<u32> {
    let mut pids: Vec<u32> = pool.status().workers.iter().map(|w| w.pid).collect();
    pids.sort_unstable();
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_requests_leave_the_server_serving() {
    let pool = builder(2).start().await.unwrap();
    let state = ServerState::starting();
    state.ready(pool.clone());
    let options = ServerOptions {
        token: None,
        body_limit: BODY_LIMIT,
        ..ServerOptions::default()
    };
    let app = router(state, &options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(addr.ip().is_loopback());
    let limits = ConnectionLimits {
        max_connections: 1024,
        header_read_timeout: Duration::from_secs(10),
        close_timeout: Duration::from_secs(10),
    };
    tokio::spawn(serve(listener, app, limits, std::future::pending()));
    let url = format!("http://{addr}");
    let client = Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(EXCHANGE_LIMIT)
        .build()
        .unwrap();
    ping(&client, &url)
        .await
        .expect("the server serves before the flood");
    let pids = worker_pids(&pool);
    assert_eq!(pids.len(), 2);

    let mut jobs = Vec::with_capacity(MALFORMED + MALFORMED / PING_EVERY);
    for i in 0..MALFORMED {
        jobs.push(Job::Malformed(i));
        if i % PING_EVERY == PING_EVERY - 1 {
            jobs.push(Job::Ping);
        }
    }
    let pings = jobs.iter().filter(|j| matches!(j, Job::Ping)).count();
    let unknown_commands = (0..MALFORMED).filter(|i| i % KINDS == 17).count();

    let started = Instant::now();
    let flood = futures::stream::iter(jobs)
        .map(|job| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let (label, result) = match job {
                    Job::Ping => ("ping".to_owned(), ping(&client, &url).await),
                    Job::Malformed(i) => {
                        let label = format!("kind {:02}", i % KINDS);
                        let result = match malformed(i) {
                            Malformed::Http(http, want) => {
                                check_http(&client, &url, http, &want).await
                            }
                            Malformed::Raw(bytes, want) => {
                                match tokio::time::timeout(
                                    EXCHANGE_LIMIT,
                                    check_raw(addr, &bytes, want),
                                )
                                .await
                                {
                                    Ok(result) => result,
                                    Err(_) => Err(format!("raw request {i}: no end in time")),
                                }
                            }
                        };
                        (label, result)
                    }
                };
                (label, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>();
    let results = tokio::time::timeout(FLOOD_LIMIT, flood)
        .await
        .expect("the flood finished in time");
    let elapsed = started.elapsed();

    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (label, result) in results {
        let entry = counts.entry(label).or_default();
        entry.0 += 1;
        if let Err(failure) = result {
            entry.1 += 1;
            failures.push(failure);
        }
    }
    eprintln!(
        "{MALFORMED} malformed requests and {pings} pings in {:.2} s; by kind (sent, failed): {counts:?}",
        elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} exchanges went wrong, first ones:\n{}",
        failures.len(),
        MALFORMED + pings,
        failures[..failures.len().min(20)].join("\n")
    );
    assert_eq!(counts["ping"].0, pings);
    assert_eq!(
        counts.values().map(|c| c.0).sum::<usize>(),
        MALFORMED + pings
    );

    // Still serving, with the same workers, none crashed, nothing else reached them.
    ping(&client, &url)
        .await
        .expect("the server serves after the flood");
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health, json!({"status": "ready", "workers": 2}));
    assert_eq!(worker_pids(&pool), pids, "the same two workers serve");

    let metrics = client.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    let samples = samples(&text);
    let calls = (pings + 2 + unknown_commands) as f64;
    assert_eq!(samples["snakepool_workers"], 2.0, "{text}");
    assert_eq!(samples["snakepool_worker_crashes_total"], 0.0, "{text}");
    assert_eq!(samples["snakepool_worker_starts_total"], 2.0, "{text}");
    assert_eq!(
        samples["snakepool_worker_start_failures_total"], 0.0,
        "{text}"
    );
    assert_eq!(samples["snakepool_calls_total"], calls, "{text}");
    assert_eq!(
        samples["snakepool_calls_ok_total"],
        (pings + 2) as f64,
        "{text}"
    );
    assert_eq!(
        samples[r#"snakepool_call_errors_total{kind="unknown_command"}"#], unknown_commands as f64,
        "{text}"
    );
    let other_errors: f64 = samples
        .iter()
        .filter(|(name, _)| name.starts_with("snakepool_call_errors_total{"))
        .filter(|(name, _)| !name.contains("unknown_command"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(other_errors, 0.0, "{text}");
    assert_eq!(samples["snakepool_queued_callers"], 0.0, "{text}");
    assert_eq!(samples["snakepool_sessions"], 0.0, "{text}");
    assert!(text.ends_with("# EOF\n"));

    pool.shutdown().await;
}
