//! `snakepool bench`: a load generator against its own pool or a server.
//!
//! `--concurrency` callers call one command in a loop until `--requests` calls are made
//! or `--duration` has passed. Each caller keeps its own latency histogram (no lock per
//! call); they are merged at the end. Warm-up calls (one per caller) are not counted.
//! With `--dspy-profile` every call runs a DSPy program against an LM instead (see
//! [`dspy`]); with `--watch NAME=PID` the report also gives the CPU time and memory of
//! those process trees while the counted calls ran (see [`resources`]).

mod dspy;
mod resources;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{StatusCode, Url, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use snakepool::{MetricsSnapshot, Pool, Session};

use self::dspy::{DspyLoad, DspyReport};
use self::resources::{Resources, Snapshot};
use super::chaos::{self, ChaosPlan};
use super::pool_args::PoolArgs;

/// Highest latency recorded: one hour, in microseconds.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// How often the progress bar is redrawn.
const TICK: Duration = Duration::from_millis(100);

/// Longest a keep-alive connection to `--url` stays unused before it is dropped.
const IDLE_CONNECTION: Duration = Duration::from_secs(3);

/// Options of `snakepool bench` (load).
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Load a running server instead of a pool of its own, e.g. http://127.0.0.1:8700.
    #[arg(long)]
    url: Option<String>,
    /// Bearer token for --url.
    #[arg(long, env = "SNAKEPOOL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Concurrent callers.
    #[arg(
        long,
        default_value_t = 8,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    concurrency: usize,
    /// Calls to make in all.
    #[arg(
        long,
        default_value_t = 10_000,
        conflicts_with = "duration",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    requests: u64,
    /// Call for this long instead of a number of calls, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Command to call.
    #[arg(long, default_value = "ping")]
    command: String,
    /// Arguments of every call, a JSON object.
    #[arg(long, default_value = "{}", value_name = "JSON", value_parser = parse_args)]
    args: Value,
    /// Sessions bench-0..K-1 to call in (caller i uses session i mod K); 0 for plain calls
    /// (with --dspy-profile: one session per caller, named bench-T-0..K-1 with T the
    /// start time in ms, so that each run's sessions are new, whatever a durable
    /// journal kept of earlier runs).
    #[arg(long, default_value_t = 0)]
    sessions: usize,
    /// Run a DSPy program against this LM profile of the server (or of --lm-profile):
    /// each session runs `configure_lm {"profile": NAME}` and `create_program` once, then
    /// every call is `execute_program` with a new question.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["command", "args", "chaos"])]
    dspy_profile: Option<String>,
    /// With --dspy-profile: the program's type, predict or chain_of_thought.
    #[arg(long, default_value = "predict", value_name = "TYPE", requires = "dspy_profile",
          value_parser = ["predict", "chain_of_thought"])]
    dspy_program: String,
    /// Report the CPU time and PSS of process PID and all its descendants while the
    /// counted calls run, under NAME (repeatable), e.g. server=1234.
    #[arg(long, value_name = "NAME=PID", value_parser = resources::parse_watch)]
    watch: Vec<(String, u32)>,
    /// Time each call may take, e.g. 500ms (default: the pool's request timeout).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Kill a random worker with SIGKILL this many times a second while the load runs,
    /// and check that no call is lost (own pool only; calls `probe_echo`).
    #[arg(long, value_name = "RATE", conflicts_with_all = ["url", "sessions"])]
    chaos: Option<f64>,
    /// With --chaos: sessions holding a DSPy program (DummyLM) under load.
    #[arg(long, default_value_t = 4, requires = "chaos")]
    dspy_sessions: usize,
    #[command(flatten)]
    pub pool: PoolArgs,
}

fn parse_args(text: &str) -> Result<Value, String> {
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err("must be a JSON object, e.g. '{\"a\": 1}'".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// The error kind of a failed call, `None` for success.
type Outcome = Option<Cow<'static, str>>;

impl LoadArgs {
    /// Threads for the async runtime: the pool's choice, or the default when loading
    /// a server.
    pub fn runtime_threads(&self) -> Result<Option<usize>, String> {
        match self.url {
            Some(_) => Ok(None),
            None => self.pool.runtime_threads(false),
        }
    }

    /// The session ids of the run: `bench-I`, or `bench-T-I` for a DSPy load, whose
    /// sessions are new (a durable journal may keep a session of an earlier run).
    fn session_ids(&self) -> Vec<String> {
        let count = self.session_count();
        match &self.dspy_profile {
            None => (0..count).map(|i| format!("bench-{i}")).collect(),
            Some(_) => {
                let started = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_millis());
                (0..count).map(|i| format!("bench-{started}-{i}")).collect()
            }
        }
    }

    /// Sessions of the run: `--sessions`, or one per caller for a DSPy load.
    fn session_count(&self) -> usize {
        match (self.sessions, &self.dspy_profile) {
            (0, Some(_)) => self.concurrency,
            (n, _) => n,
        }
    }
}

/// A failed call: its error kind and what the pool or server said.
struct Failure {
    kind: Cow<'static, str>,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// A pool of this process's own.
struct PoolTarget {
    pool: Pool,
    sessions: Vec<Session>,
    command: String,
    args: Value,
    timeout: Duration,
}

impl PoolTarget {
    async fn start(args: &LoadArgs, ids: &[String]) -> Result<PoolTarget, String> {
        let pool = args
            .pool
            .settings()?
            .builder()
            .start()
            .await
            .map_err(|e| format!("the pool did not start: {e}"))?;
        let sessions = ids.iter().map(|id| pool.session(id)).collect();
        Ok(PoolTarget {
            timeout: args.timeout.unwrap_or_else(|| pool.request_timeout()),
            pool,
            sessions,
            command: args.command.clone(),
            args: args.args.clone(),
        })
    }

    async fn call(&self, caller: usize) -> Outcome {
        let args = self.args.clone();
        let result = if self.sessions.is_empty() {
            self.pool
                .call_with_timeout(&self.command, args, self.timeout)
                .await
        } else {
            self.sessions[caller % self.sessions.len()]
                .call_with_timeout(&self.command, args, self.timeout)
                .await
        };
        result.err().map(|e| Cow::Borrowed(e.kind()))
    }

    /// One call of any command, in session `session` (by index) or plain.
    async fn call_command(
        &self,
        session: Option<usize>,
        command: &str,
        args: Value,
    ) -> Result<Value, Failure> {
        let result = match session {
            Some(i) => {
                self.sessions[i % self.sessions.len()]
                    .call_with_timeout(command, args, self.timeout)
                    .await
            }
            None => {
                self.pool
                    .call_with_timeout(command, args, self.timeout)
                    .await
            }
        };
        result.map_err(|e| Failure {
            kind: Cow::Borrowed(e.kind()),
            message: e.to_string(),
        })
    }
}

/// A server's `POST /v1/call`, over one keep-alive client.
struct HttpTarget {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
    sessions: Vec<String>,
    /// The request body of each session (one body for plain calls), encoded once.
    bodies: Vec<Bytes>,
    /// `timeout_ms` of every call.
    timeout_ms: Option<u128>,
}

/// The header a session call carries its session id in, for load balancers.
const SESSION_ID: &str = "x-session-id";

/// The error body of the API.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    kind: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    python_type: Option<String>,
}

/// The message of an error with its causes, e.g. `error sending request: ... refused`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

fn call_body(args: &LoadArgs, session_id: Option<&str>) -> Bytes {
    let mut body = json!({"command": args.command, "args": args.args});
    if let Some(id) = session_id {
        body["session_id"] = json!(id);
    }
    if let Some(timeout) = args.timeout {
        body["timeout_ms"] = json!(timeout.as_millis().max(1));
    }
    Bytes::from(body.to_string())
}

/// The error kind of a finished HTTP call.
fn classify(status: StatusCode, body: &[u8]) -> Outcome {
    if status.is_success() {
        let reply: Result<Value, _> = serde_json::from_slice(body);
        return match reply {
            Ok(reply) if reply.get("result").is_some() => None,
            _ => Some(Cow::Borrowed("bad_response")),
        };
    }
    let kind = serde_json::from_slice::<ErrorBody>(body)
        .map_or_else(|_| format!("http_{}", status.as_u16()), |b| b.error.kind);
    Some(Cow::Owned(kind))
}

fn transport_kind(error: &reqwest::Error) -> Outcome {
    Some(Cow::Borrowed(if error.is_connect() {
        "connect"
    } else {
        "transport"
    }))
}

impl HttpTarget {
    /// Checks the URL, then (unless `probe` is false: the load's own setup calls do it)
    /// makes one call: a server that cannot be reached or refuses the token is a setup
    /// error.
    async fn connect(
        url: &str,
        args: &LoadArgs,
        sessions: Vec<String>,
        probe: bool,
    ) -> Result<HttpTarget, String> {
        let base = url.trim_end_matches('/').to_owned();
        Url::parse(&format!("{base}/v1/call")).map_err(|e| format!("--url {url}: {e}"))?;
        // A connection left idle (e.g. by a caller whose warm-up call finished early)
        // is dropped before servers close theirs (uvicorn after 5 s, `serve` after 10 s),
        // so that no call is sent on a connection the server is closing.
        let client = reqwest::Client::builder()
            .pool_idle_timeout(IDLE_CONNECTION)
            .build()
            .map_err(|e| format!("HTTP client: {}", error_chain(&e)))?;
        let bodies = if sessions.is_empty() {
            vec![call_body(args, None)]
        } else {
            sessions
                .iter()
                .map(|id| call_body(args, Some(id)))
                .collect()
        };
        let target = HttpTarget {
            client,
            base,
            token: args.token.clone(),
            sessions,
            bodies,
            timeout_ms: args.timeout.map(|t| t.as_millis().max(1)),
        };
        if !probe {
            return Ok(target);
        }
        let reply = target
            .send(0)
            .await
            .map_err(|e| format!("cannot reach {url}: {}", error_chain(&e)))?;
        if matches!(
            reply.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            return Err(format!(
                "{url} refused the call ({}); pass its token with --token",
                reply.status()
            ));
        }
        Ok(target)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, caller: usize) -> reqwest::Result<reqwest::Response> {
        let mut request = self
            .request(reqwest::Method::POST, "/v1/call")
            .header(header::CONTENT_TYPE, "application/json")
            .body(self.bodies[caller % self.bodies.len()].clone());
        // The session id as a header too, so a load balancer can route by it.
        if !self.sessions.is_empty() {
            request = request.header(SESSION_ID, &self.sessions[caller % self.sessions.len()]);
        }
        request.send().await
    }

    async fn call(&self, caller: usize) -> Outcome {
        let reply = match self.send(caller).await {
            Ok(reply) => reply,
            Err(e) => return transport_kind(&e),
        };
        let status = reply.status();
        match reply.bytes().await {
            Ok(body) => classify(status, &body),
            Err(e) => transport_kind(&e),
        }
    }

    /// One call of any command, in session `session` (by index) or plain; the result, or
    /// the error kind and message of the reply.
    async fn call_command(
        &self,
        session: Option<usize>,
        command: &str,
        args: Value,
    ) -> Result<Value, Failure> {
        let mut body = json!({"command": command, "args": args});
        let mut request = self
            .request(reqwest::Method::POST, "/v1/call")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(i) = session {
            let id = &self.sessions[i % self.sessions.len()];
            body["session_id"] = json!(id);
            request = request.header(SESSION_ID, id);
        }
        if let Some(ms) = self.timeout_ms {
            body["timeout_ms"] = json!(ms);
        }
        let transport = |e: reqwest::Error| Failure {
            kind: transport_kind(&e).unwrap_or_default(),
            message: error_chain(&e),
        };
        let reply = request
            .body(body.to_string())
            .send()
            .await
            .map_err(transport)?;
        let status = reply.status();
        let bytes = reply.bytes().await.map_err(transport)?;
        if status.is_success() {
            let reply: Option<Value> = serde_json::from_slice(&bytes).ok();
            return match reply {
                Some(Value::Object(mut reply)) if reply.contains_key("result") => {
                    Ok(reply.remove("result").unwrap_or_default())
                }
                _ => Err(Failure {
                    kind: Cow::Borrowed("bad_response"),
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                }),
            };
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(ErrorBody { error }) => Failure {
                message: match error.python_type {
                    Some(t) => format!("{t}: {}", error.message),
                    None => error.message,
                },
                kind: Cow::Owned(error.kind),
            },
            Err(_) => Failure {
                kind: Cow::Owned(format!("http_{}", status.as_u16())),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            },
        })
    }

    /// Closes the run's sessions on the server; failures only leave them to its TTL.
    async fn close_sessions(&self) {
        let closing = self.sessions.iter().map(|id| {
            self.request(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"))
                .send()
        });
        futures::future::join_all(closing).await;
    }
}

/// Where the calls go.
enum Via {
    Pool(PoolTarget),
    Http(HttpTarget),
}

impl Via {
    async fn open(args: &LoadArgs) -> Result<Via, String> {
        let probe = args.dspy_profile.is_none();
        let ids = args.session_ids();
        match &args.url {
            Some(url) => Ok(Via::Http(HttpTarget::connect(url, args, ids, probe).await?)),
            None => Ok(Via::Pool(PoolTarget::start(args, &ids).await?)),
        }
    }

    /// The id of session `i`.
    fn session_id(&self, i: usize) -> String {
        match self {
            Via::Pool(t) => t.sessions[i % t.sessions.len()].id().to_owned(),
            Via::Http(t) => t.sessions[i % t.sessions.len()].clone(),
        }
    }

    /// The command and arguments of the run.
    async fn call(&self, caller: usize) -> Outcome {
        match self {
            Via::Pool(t) => t.call(caller).await,
            Via::Http(t) => t.call(caller).await,
        }
    }

    async fn request(
        &self,
        session: Option<usize>,
        command: &str,
        args: Value,
    ) -> Result<Value, Failure> {
        match self {
            Via::Pool(t) => t.call_command(session, command, args).await,
            Via::Http(t) => t.call_command(session, command, args).await,
        }
    }

    fn name(&self) -> String {
        match self {
            Via::Pool(_) => "pool".into(),
            Via::Http(t) => t.base.clone(),
        }
    }
}

/// What the callers load: where the calls go, and what they are.
struct Target {
    via: Via,
    dspy: Option<DspyLoad>,
}

impl Target {
    /// The pid of the process running the pool: this one, or the server's (from its
    /// `GET /v1/pool`, if it says).
    async fn host_pid(&self) -> Option<u32> {
        match &self.via {
            Via::Pool(_) => Some(std::process::id()),
            Via::Http(target) => {
                let pool: Value = target
                    .request(reqwest::Method::GET, "/v1/pool")
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                pool["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok())
            }
        }
    }

    async fn open(args: &LoadArgs) -> Result<Target, String> {
        let via = Via::open(args).await?;
        let dspy = match &args.dspy_profile {
            Some(profile) => {
                let prepared =
                    DspyLoad::prepare(&via, profile, &args.dspy_program, args.session_count())
                        .await;
                match prepared {
                    Ok(load) => Some(load),
                    Err(message) => {
                        Target { via, dspy: None }.close().await;
                        return Err(message);
                    }
                }
            }
            None => None,
        };
        Ok(Target { via, dspy })
    }

    async fn call(&self, caller: usize) -> Outcome {
        match &self.dspy {
            Some(load) => load.call(&self.via, caller).await,
            None => self.via.call(caller).await,
        }
    }

    /// One uncounted call per caller: workers, sessions and connections get ready.
    async fn warm_up(&self, callers: usize) {
        futures::future::join_all((0..callers).map(|i| self.call(i))).await;
        if let Some(load) = &self.dspy {
            load.reset();
        }
    }

    fn name(&self) -> String {
        self.via.name()
    }

    fn workers(&self) -> Option<usize> {
        match &self.via {
            Via::Pool(t) => Some(t.pool.config().workers),
            Via::Http(_) => None,
        }
    }

    fn metrics(&self) -> Option<MetricsSnapshot> {
        match &self.via {
            Via::Pool(t) => Some(t.pool.metrics()),
            Via::Http(_) => None,
        }
    }

    async fn close(self) {
        match self.via {
            Via::Pool(t) => t.pool.shutdown().await,
            Via::Http(t) => t.close_sessions().await,
        }
    }
}

/// When the callers stop.
#[derive(Clone)]
enum Budget {
    /// After this many calls in all; the counter holds the calls handed out.
    Calls { total: u64, taken: Arc<AtomicU64> },
    /// At this instant.
    Until(Instant),
}

impl Budget {
    fn new(args: &LoadArgs, started: Instant) -> Budget {
        match args.duration {
            Some(duration) => Budget::Until(started + duration),
            None => Budget::Calls {
                total: args.requests,
                taken: Arc::default(),
            },
        }
    }

    /// Whether a caller may make one more call.
    fn take(&self) -> bool {
        match self {
            Budget::Calls { total, taken } => taken.fetch_add(1, Ordering::Relaxed) < *total,
            Budget::Until(deadline) => Instant::now() < *deadline,
        }
    }
}

/// One caller's results, merged into the run's at the end.
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn record(&mut self, outcome: Outcome, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        self.latency.saturating_record(micros);
        match outcome {
            None => self.ok += 1,
            Some(kind) => match self.errors.get_mut(kind.as_ref()) {
                Some(count) => *count += 1,
                None => {
                    self.errors.insert(kind.into_owned(), 1);
                }
            },
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
    }
}

/// Calls until the budget is spent.
async fn caller(target: Arc<Target>, index: usize, budget: Budget, done: Arc<AtomicU64>) -> Tally {
    let mut tally = Tally::new();
    while budget.take() {
        let started = Instant::now();
        let outcome = target.call(index).await;
        tally.record(outcome, started.elapsed());
        done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

/// A bar over the calls, or over the time for `--duration`.
fn progress_bar(budget: &Budget) -> ProgressBar {
    let (length, template) = match budget {
        Budget::Calls { total, .. } => {
            (*total, "{bar:40} {pos}/{len} calls, {per_sec:0}, ETA {eta}")
        }
        Budget::Until(deadline) => (
            deadline.duration_since(Instant::now()).as_millis() as u64,
            "{bar:40} {msg}, ETA {eta}",
        ),
    };
    let bar = ProgressBar::new(length);
    bar.set_style(ProgressStyle::with_template(template).expect("valid progress template"));
    bar
}

/// Redraws the bar from the calls done until aborted.
async fn follow(bar: ProgressBar, budget: Budget, done: Arc<AtomicU64>, started: Instant) {
    let mut ticks = tokio::time::interval(TICK);
    loop {
        ticks.tick().await;
        let calls = done.load(Ordering::Relaxed);
        match budget {
            Budget::Calls { .. } => bar.set_position(calls),
            Budget::Until(_) => {
                let elapsed = started.elapsed();
                let rate = calls as f64 / elapsed.as_secs_f64();
                bar.set_message(format!("{calls} calls, {rate:.0}/s"));
                bar.set_position(elapsed.as_millis() as u64);
            }
        }
    }
}

/// The measured part of the run: all callers from start to finish, and what it cost.
async fn measure(target: &Arc<Target>, args: &LoadArgs) -> (Tally, Duration, Resources) {
    let snapshot = Snapshot::take(&args.watch, target.host_pid().await);
    let started = Instant::now();
    let budget = Budget::new(args, started);
    let done = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(&budget);
    let ticker = tokio::spawn(follow(bar.clone(), budget.clone(), done.clone(), started));
    let callers: Vec<_> = (0..args.concurrency)
        .map(|i| tokio::spawn(caller(target.clone(), i, budget.clone(), done.clone())))
        .collect();
    let mut total = Tally::new();
    for tally in futures::future::join_all(callers).await {
        total.merge(tally.expect("a caller panicked"));
    }
    let elapsed = started.elapsed();
    let resources = snapshot.finish(total.latency.len(), elapsed);
    ticker.abort();
    bar.finish_and_clear();
    (total, elapsed, resources)
}

/// Latency percentiles in microseconds.
#[derive(Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// The pool's own counters over its life, warm-up included.
#[derive(Serialize)]
struct PoolCounters {
    worker_crashes: u64,
    worker_restarts: u64,
    worker_recycles: u64,
    worker_start_failures: u64,
    session_rebuilds: u64,
}

impl PoolCounters {
    fn of(metrics: &MetricsSnapshot, workers: usize) -> PoolCounters {
        PoolCounters {
            worker_crashes: metrics.worker_crashes,
            worker_restarts: metrics.worker_starts.saturating_sub(workers as u64),
            worker_recycles: metrics.worker_recycles,
            worker_start_failures: metrics.worker_start_failures,
            session_rebuilds: metrics.session_rebuilds,
        }
    }
}

/// Everything the run reports, as printed with `--json`.
#[derive(Serialize)]
struct Report {
    target: String,
    command: String,
    concurrency: usize,
    sessions: usize,
    workers: Option<usize>,
    /// Threads of this process's async runtime: the host's, when the pool is its own.
    runtime_threads: usize,
    requests: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed_s: f64,
    throughput_rps: f64,
    latency_us: Latency,
    pool: Option<PoolCounters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dspy: Option<DspyReport>,
    resources: Resources,
}

impl Report {
    fn new(
        args: &LoadArgs,
        target: &Target,
        tally: Tally,
        elapsed: Duration,
        resources: Resources,
    ) -> Report {
        let requests = tally.latency.len();
        let workers = target.workers();
        Report {
            target: target.name(),
            command: match &target.dspy {
                Some(_) => "execute_program".into(),
                None => args.command.clone(),
            },
            concurrency: args.concurrency,
            sessions: args.session_count(),
            workers,
            runtime_threads: tokio::runtime::Handle::current().metrics().num_workers(),
            requests,
            ok: tally.ok,
            latency_us: Latency::of(&tally.latency),
            errors: tally.errors,
            elapsed_s: elapsed.as_secs_f64(),
            throughput_rps: requests as f64 / elapsed.as_secs_f64(),
            pool: target
                .metrics()
                .zip(workers)
                .map(|(m, w)| PoolCounters::of(&m, w)),
            dspy: target.dspy.as_ref().map(DspyLoad::report),
            resources,
        }
    }

    fn print_table(&self) {
        let target = match self.workers {
            Some(n) => format!(
                "{} ({n} workers; host runtime threads {})",
                self.target, self.runtime_threads
            ),
            None => self.target.clone(),
        };
        let sessions = match self.sessions {
            0 => "plain calls".to_owned(),
            n => format!("{n} sessions"),
        };
        let l = &self.latency_us;
        println!("target      {target}");
        println!(
            "load        `{}`, {} callers, {sessions}",
            self.command, self.concurrency
        );
        println!("requests    {}", self.requests);
        println!("ok          {}", self.ok);
        println!("errors      {}", error_list(&self.errors));
        println!("elapsed     {:.2} s", self.elapsed_s);
        println!("throughput  {:.0} req/s", self.throughput_rps);
        println!(
            "latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            micros(l.p50),
            micros(l.p90),
            micros(l.p99),
            micros(l.p999),
            micros(l.max)
        );
        if let Some(p) = &self.pool {
            println!(
                "pool        worker crashes {}, restarts {}, recycles {}, start failures {}, \
                 session rebuilds {}",
                p.worker_crashes,
                p.worker_restarts,
                p.worker_recycles,
                p.worker_start_failures,
                p.session_rebuilds
            );
        }
        if let Some(d) = &self.dspy {
            println!(
                "dspy        profile {}, {} `{}`, answers matching the question {}",
                d.profile, d.program_type, d.signature, d.answers_matching
            );
        }
        let r = &self.resources;
        let busy = r
            .busy_cores
            .map_or_else(|| "?".into(), |b| format!("{b:.2}"));
        println!(
            "cpu         machine {busy} of {} cores busy; bench {:.2} s{}",
            r.cores,
            r.bench_cpu_s,
            per_call(r.bench_cpu_us_per_call)
        );
        if let (Some(host), Some(workers)) = (r.host_cpu_s, r.worker_cpu_s) {
            println!(
                "cpu/call    host {host:.2} s{}, workers {workers:.2} s{}",
                per_call(r.host_cpu_us_per_call),
                per_call(r.worker_cpu_us_per_call)
            );
        }
        for (name, t) in &r.watched {
            println!(
                "{name:<11} pid {} ({} processes): cpu {:.2} s{}, {:.2} cores; PSS {:.1} MiB",
                t.pid,
                t.processes,
                t.cpu_s,
                per_call(t.cpu_us_per_call),
                t.cores,
                t.pss_kib as f64 / 1024.0
            );
        }
    }
}

/// ` (N µs/call)`, or nothing without calls.
fn per_call(us: Option<f64>) -> String {
    us.map_or_else(String::new, |us| format!(" ({us:.0} µs/call)"))
}

fn error_list(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    let items: Vec<String> = errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
    items.join(", ")
}

/// A latency with its unit: µs below a millisecond, ms below a second, else s.
fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// Runs the load benchmark.
pub async fn run(args: LoadArgs) -> Result<(), String> {
    if let Some(rate) = args.chaos {
        let plan = ChaosPlan {
            rate,
            dspy_sessions: args.dspy_sessions,
            concurrency: args.concurrency,
            requests: args.requests,
            duration: args.duration,
            timeout: args.timeout,
            json: args.json,
        };
        return chaos::run(plan, args.pool.settings()?).await;
    }
    let target = Arc::new(Target::open(&args).await?);
    target.warm_up(args.concurrency).await;
    let (tally, elapsed, resources) = measure(&target, &args).await;
    let report = Report::new(&args, &target, tally, elapsed, resources);
    let target = Arc::into_inner(target).expect("the callers are done");
    target.close().await;
    if args.json {
        println!("{}", json!(report));
    } else {
        report.print_table();
    }
    // A run with failed calls is not a clean measurement: say so in the exit code.
    let failed: u64 = report.errors.values().sum();
    if failed > 0 {
        let kinds: Vec<String> = report
            .errors
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        return Err(format!("{failed} calls failed ({})", kinds.join(", ")));
    }
    Ok(())
}
