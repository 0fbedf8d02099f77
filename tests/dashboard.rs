//! The dashboard in a real browser: headless Chromium, driven over the DevTools
//! protocol on a pipe (`--remote-debugging-pipe`), opens `GET /` of a `snakepool
//! serve` and the test reads what the page's script made of the event stream, while
//! workers are killed and crash. Also: the token (the page is open, the stream is
//! not) and the limit on open streams.
//!
//! The DOM is read from the running page rather than with `--dump-dom`: the page
//! keeps its event stream open, and Chromium's `--virtual-time-budget` never runs out
//! while a fetch is pending, so `--dump-dom` would wait forever (or, without a budget,
//! dump the page before the stream said anything).
//!
//! With `SNAKEPOOL_SCREENSHOT` set, the screenshot goes to `docs/dashboard.png`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, PipeReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{ServeProcess, kill9, spawn_serve, wait_until_async};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// How long the browser may take to answer a command, and the page or the pool to
/// show what is awaited.
const WAIT: Duration = Duration::from_secs(30);
/// How often a page is read again while waiting for it to show something.
const POLL: Duration = Duration::from_millis(100);
/// The charts the page draws (`canvas[data-chart]`).
const CHARTS: [&str; 3] = ["calls", "latency", "queue"];
const TOKEN: &str = "dashboard-test-token";

/// What the page shows, read by a script in it; `null` until the page has loaded.
const READ_VIEW: &str = r#"document.readyState === 'complete' && location.pathname === '/'
  && JSON.stringify({
  workers: [...document.querySelectorAll('#workers tbody tr')].map((row) => Number(row.dataset.pid)),
  charts: Object.fromEntries([...document.querySelectorAll('canvas[data-chart]')]
    .map((canvas) => [canvas.dataset.chart, Number(canvas.dataset.points)])),
  events: [...document.querySelectorAll('#events li')].map((item) => ({
    kind: item.dataset.kind, pid: Number(item.dataset.pid), text: item.textContent,
  })),
  login: !document.getElementById('login').hidden,
  login_error: document.getElementById('login-error').textContent,
})"#;

#[derive(Debug, Deserialize)]
struct View {
    /// The pids in the workers table.
    workers: Vec<u32>,
    /// Samples drawn, by chart.
    charts: HashMap<String, u32>,
    /// The recent worker events, newest first.
    events: Vec<ListedEvent>,
    /// Whether the token form is shown.
    login: bool,
    /// What the form says of the last token.
    login_error: String,
}

#[derive(Debug, Deserialize)]
struct ListedEvent {
    kind: String,
    pid: Option<u32>,
    text: String,
}

impl View {
    fn lists_workers(&self, pids: &[u32]) -> bool {
        self.workers.len() == pids.len() && pids.iter().all(|p| self.workers.contains(p))
    }

    fn charts_have(&self, points: u32) -> bool {
        CHARTS
            .iter()
            .all(|c| self.charts.get(*c).is_some_and(|&n| n >= points))
    }

    fn has_event(&self, kind: &str, pid: u32) -> bool {
        self.events
            .iter()
            .any(|e| e.kind == kind && e.pid == Some(pid))
    }
}

/// The Chromium on the PATH (`chromium`, else `chromium-browser`).
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "neither `chromium` nor `chromium-browser` is on the PATH: the dashboard test \
                 needs a headless Chromium (`sh scripts/services.sh`, as root, installs it)"
            )
        })
}

/// A headless Chromium showing one page, driven over the DevTools protocol on a pipe:
/// JSON messages ending in a NUL byte, commands on its fd 3, answers on its fd 4.
struct Browser {
    child: Child,
    commands: std::io::PipeWriter,
    answers: mpsc::Receiver<Value>,
    session: Option<String>,
    last_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on `url`, in a 1280×900 window, and attaches to its page.
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (their_commands, commands) = std::io::pipe().unwrap();
        let (answers_pipe, their_answers) = std::io::pipe().unwrap();
        let mut command = Command::new(chromium());
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .args([
                "--remote-debugging-pipe",
                "--window-size=1280,900",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (read_fd, write_fd) = (their_commands.as_raw_fd(), their_answers.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Moved up first, so that neither lands on the other's number; dup2
                // leaves the copies on 3 and 4 open across exec.
                let read_fd = libc::fcntl(read_fd, libc::F_DUPFD_CLOEXEC, 10);
                let write_fd = libc::fcntl(write_fd, libc::F_DUPFD_CLOEXEC, 10);
                if read_fd < 0
                    || write_fd < 0
                    || libc::dup2(read_fd, 3) < 0
                    || libc::dup2(write_fd, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("chromium starts");
        drop((their_commands, their_answers));
        let (sender, answers) = mpsc::channel();
        std::thread::spawn(move || read_messages(answers_pipe, sender));
        let mut browser = Browser {
            child,
            commands,
            answers,
            session: None,
            last_id: 0,
            _profile: profile,
        };
        let deadline = Instant::now() + WAIT;
        let page = loop {
            let targets = browser.command("Target.getTargets", json!({}));
            let page = targets["targetInfos"]
                .as_array()
                .and_then(|all| all.iter().find(|t| t["type"] == "page"))
                .map(|t| t["targetId"].clone());
            match page {
                Some(page) => break page,
                None if Instant::now() < deadline => std::thread::sleep(POLL),
                None => panic!("chromium opened no page within {WAIT:?}"),
            }
        };
        let attached = browser.command(
            "Target.attachToTarget",
            json!({"targetId": page, "flatten": true}),
        );
        browser.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        browser
    }

    /// Sends a command (to the page once attached) and waits for its result.
    fn command(&mut self, method: &str, params: Value) -> Value {
        self.try_command(method, params)
            .unwrap_or_else(|error| panic!("chromium refused {method}: {error}"))
    }

    /// Sends a command and waits for its result, or the error it met.
    fn try_command(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.last_id += 1;
        let id = self.last_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .expect("chromium reads its commands");
        let deadline = Instant::now() + WAIT;
        tokio::task::block_in_place(|| {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let answer = self.answers.recv_timeout(left).unwrap_or_else(|error| {
                    panic!("chromium did not answer {method} within {WAIT:?}: {error}")
                });
                if answer["id"] != id {
                    continue; // an event, or the answer to an earlier command
                }
                return match answer.get("error") {
                    Some(error) => Err(error.to_string()),
                    None => Ok(answer["result"].clone()),
                };
            }
        })
    }

    /// The value of a JavaScript expression in the page, or why it has none (the
    /// page may be between two documents).
    fn evaluate(&mut self, expression: &str) -> Result<Value, String> {
        let params = json!({"expression": expression, "returnByValue": true});
        let result = self.try_command("Runtime.evaluate", params)?;
        match result.get("exceptionDetails") {
            Some(exception) => Err(format!("the script failed: {exception}")),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// What the page shows, once it has loaded.
    fn view(&mut self) -> Result<Option<View>, String> {
        let json = self.evaluate(READ_VIEW)?;
        Ok(json
            .as_str()
            .map(|json| serde_json::from_str(json).unwrap()))
    }

    /// Reads the page until `shows` holds, failing the test after `limit`.
    async fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        shows: impl Fn(&View) -> bool,
    ) -> View {
        let deadline = Instant::now() + limit;
        loop {
            match self.view() {
                Ok(Some(view)) if shows(&view) => return view,
                view => assert!(
                    Instant::now() < deadline,
                    "the page did not show {what} within {limit:?}; it shows {view:#?}"
                ),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A PNG of the page as shown.
    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.command("Page.captureScreenshot", json!({"format": "png"}));
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .commands
            .write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Passes on each NUL-terminated JSON message Chromium writes, until the pipe closes.
fn read_messages(pipe: PipeReader, messages: mpsc::Sender<Value>) {
    let mut pipe = BufReader::new(pipe);
    let mut message = Vec::new();
    while pipe.read_until(0, &mut message).is_ok_and(|n| n > 0) {
        message.pop_if(|b| *b == 0);
        if let Ok(value) = serde_json::from_slice(&message)
            && messages.send(value).is_err()
        {
            return;
        }
        message.clear();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut bits, mut held, mut bytes) = (0u32, 0, Vec::with_capacity(text.len() / 4 * 3));
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        bits = (bits << 6) | value;
        held += 6;
        if held >= 8 {
            held -= 8;
            bytes.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    bytes
}

/// A `snakepool serve` with 2 workers, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let ServeProcess { child, url, .. } = spawn_serve(extra);
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's workers from `GET /v1/pool`: pid by worker id.
async fn workers(client: &reqwest::Client, url: &str, token: Option<&str>) -> HashMap<String, u32> {
    let mut request = client.get(format!("{url}/v1/pool"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let pool: Value = request.send().await.unwrap().json().await.unwrap();
    pool["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let pid = w["pid"].as_u64().unwrap() as u32;
            (w["id"].as_str().unwrap().to_owned(), pid)
        })
        .collect()
}

/// Polls `GET /v1/pool` until it has two workers, none of them `gone`; their pids.
async fn wait_for_replacement(client: &reqwest::Client, url: &str, gone: u32) -> Vec<u32> {
    let deadline = Instant::now() + WAIT;
    loop {
        let pids: Vec<u32> = workers(client, url, None).await.into_values().collect();
        if pids.len() == 2 && !pids.contains(&gone) {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "worker pid {gone} was not replaced within {WAIT:?}: {pids:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Calls `sleep` (0 to 30 ms) on three callers until aborted, for the charts.
fn keep_calling(client: &reqwest::Client, url: &str) -> tokio::task::JoinHandle<()> {
    let callers: Vec<_> = (0..3)
        .map(|caller| {
            let (client, url) = (client.clone(), url.to_owned());
            async move {
                for i in 0u32.. {
                    let seconds = f64::from((i + caller) % 7) * 0.005;
                    let _ = client
                        .post(format!("{url}/v1/call"))
                        .json(&json!({"command": "sleep", "args": {"seconds": seconds}}))
                        .send()
                        .await;
                }
            }
        })
        .collect();
    tokio::spawn(async move {
        futures::future::join_all(callers).await;
    })
}

/// Where the screenshot goes: `docs/dashboard.png` with `SNAKEPOOL_SCREENSHOT` set,
/// else a temporary folder (which lasts as long as the returned handle).
fn screenshot_path() -> (PathBuf, Option<tempfile::TempDir>) {
    if std::env::var_os("SNAKEPOOL_SCREENSHOT").is_some() {
        let docs = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"));
        return (docs.join("dashboard.png"), None);
    }
    let dir = tempfile::tempdir().unwrap();
    (dir.path().join("dashboard.png"), Some(dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_workers_charts_and_crashes_live() {
    chromium();
    let server = Server::start(&[]);
    let client = reqwest::Client::new();
    let first: Vec<u32> = workers(&client, &server.url, None)
        .await
        .into_values()
        .collect();
    assert_eq!(first.len(), 2, "{first:?}");
    let load = keep_calling(&client, &server.url);

    let mut browser = Browser::open(&format!("{}/", server.url));
    let view = browser
        .wait_for("both workers and three charts with samples", WAIT, |v| {
            v.lists_workers(&first) && v.charts_have(2)
        })
        .await;
    assert!(!view.login, "no token is configured, so none is asked for");

    // A worker killed with SIGKILL is replaced, and the open page follows.
    let killed = first[0];
    kill9(killed);
    let replaced = wait_for_replacement(&client, &server.url, killed).await;
    // A worker that crashes leaves its last words on stderr.
    let before = workers(&client, &server.url, None).await;
    let crash = client
        .post(format!("{}/v1/call", server.url))
        .json(&json!({"command": "crash"}))
        .send()
        .await
        .unwrap();
    assert_eq!(crash.status(), StatusCode::BAD_GATEWAY);
    let body: Value = crash.json().await.unwrap();
    // `w3 (pid 1234)`
    let worker = body["error"]["worker"]
        .as_str()
        .expect("the crashed worker");
    let crashed = before[worker.split_once(" (pid").map_or(worker, |(id, _)| id)];
    let now = wait_for_replacement(&client, &server.url, crashed).await;
    assert!(replaced.contains(&crashed), "{replaced:?} {crashed}");

    let shows_it_all = |v: &View| {
        v.lists_workers(&now)
            && v.has_event("lost", killed)
            && v.has_event("lost", crashed)
            && now
                .iter()
                .filter(|pid| !first.contains(pid))
                .all(|&pid| v.has_event("ready", pid))
            && v.events.iter().any(|e| {
                e.kind == "lost"
                    && e.pid == Some(crashed)
                    && e.text.contains("about to crash on purpose")
            })
    };
    browser
        .wait_for("the new workers and both crashes", WAIT, shows_it_all)
        .await;

    // A page opened afterwards lists them too, from the server's recent events.
    drop(browser);
    let mut browser = Browser::open(&format!("{}/", server.url));
    browser
        .wait_for("the crashes, on a page opened after them", WAIT, |v| {
            shows_it_all(v) && v.charts_have(2)
        })
        .await;

    // The README's picture shows a minute of calls; a test run's, a few seconds.
    let (path, temporary) = screenshot_path();
    let (points, limit) = match &temporary {
        None => (60, Duration::from_secs(90)),
        Some(_) => (5, WAIT),
    };
    browser
        .wait_for(&format!("{points} samples in each chart"), limit, |v| {
            v.charts_have(points)
        })
        .await;
    let png = browser.screenshot();
    std::fs::write(&path, &png).unwrap();
    let written = std::fs::read(&path).unwrap();
    assert!(written.len() > 10_000, "{} bytes", written.len());
    assert!(
        written.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{path:?} is not a PNG"
    );
    load.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_needs_the_token_and_the_page_does_not() {
    chromium();
    let server = Server::start(&["--token", TOKEN]);
    let client = reqwest::Client::new();
    let events = format!("{}/v1/dashboard/events", server.url);

    let page = client.get(format!("{}/", server.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("<canvas"));

    let refused = client.get(&events).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let stream = client.get(&events).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let content_type = stream.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    drop(stream);

    let pids: Vec<u32> = workers(&client, &server.url, Some(TOKEN))
        .await
        .into_values()
        .collect();
    // The token in the URL's fragment.
    let mut browser = Browser::open(&format!("{}/#token={TOKEN}", server.url));
    browser
        .wait_for("the workers", WAIT, |v| v.lists_workers(&pids) && !v.login)
        .await;
    drop(browser);
    // A refused token: the page asks for one, and takes it from its field.
    let mut browser = Browser::open(&format!("{}/#token=wrong", server.url));
    let view = browser
        .wait_for("the token field", WAIT, |v| v.login && v.workers.is_empty())
        .await;
    assert!(view.login_error.contains("refused"), "{view:?}");
    browser
        .evaluate(&format!(
            "document.getElementById('token').value = '{TOKEN}';
             document.getElementById('login').requestSubmit();"
        ))
        .expect("the token goes in its field");
    browser
        .wait_for("the workers", WAIT, |v| v.lists_workers(&pids) && !v.login)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_sixteen_streams_are_open_at_once() {
    let server = Server::start(&[]);
    let client = reqwest::Client::new();
    let events = format!("{}/v1/dashboard/events", server.url);
    let mut open = Vec::new();
    for _ in 0..16 {
        let stream = client.get(&events).send().await.unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        open.push(stream);
    }
    let refused = client.get(&events).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "too_many_streams", "{body}");

    // A stream whose client left gives its place back.
    drop(open.pop());
    wait_until_async("a stream's place to be given back", WAIT, || async {
        client.get(&events).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
}
