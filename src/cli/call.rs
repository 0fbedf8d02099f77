//! `snakepool call`: one command, against a server or a pool of its own.
//!
//! The result is printed as JSON on stdout; with `--stream`, each chunk the command
//! yields is printed on a line of its own as it comes, then the result. An error goes
//! to stderr, and the exit code says which kind it was (see [`exit_code`]).

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use snakepool::{CallOptions, CallStream, Error, StreamEvent};

use super::pool_args::PoolArgs;

/// Options of `snakepool call`.
#[derive(clap::Args, Debug)]
pub struct CallArgs {
    /// A running `snakepool serve`, e.g. http://127.0.0.1:8700; without it the call runs
    /// on a pool of its own.
    #[arg(long, env = "SNAKEPOOL_URL")]
    url: Option<String>,
    /// Bearer token for --url.
    #[arg(long, env = "SNAKEPOOL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Run the call in this session.
    #[arg(long)]
    session: Option<String>,
    /// Time the call may take, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Print each chunk a streaming command yields as it comes (one JSON value per
    /// line), then the result.
    #[arg(long)]
    stream: bool,
    /// The command.
    command: String,
    /// Its arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    #[command(flatten)]
    pool: PoolArgs,
}

impl CallArgs {
    /// Threads for the async runtime: the pool's choice, or the default for a call
    /// to a server.
    pub fn runtime_threads(&self) -> Result<Option<usize>, String> {
        match self.url {
            Some(_) => Ok(None),
            None => self.pool.runtime_threads(false),
        }
    }
}

/// Exit codes by error kind, so scripts can tell failures apart.
pub fn exit_code(kind: &str) -> u8 {
    match kind {
        "bad_request" | "invalid_request" | "body_too_large" => 2,
        "unknown_command" | "forbidden" => 3,
        "worker_error" => 4,
        "request_timeout" | "checkout_timeout" => 5,
        "worker_crashed" | "protocol" | "session_rebuild_failed" => 6,
        "saturated"
        | "shutting_down"
        | "starting"
        | "degraded"
        | "too_many_sessions"
        | "journal_unavailable"
        | "session_moved" => 7,
        "session_closed" | "session_not_found" => 8,
        "startup_failed" | "config" | "invalid_config" => 9,
        "connect" => 10,
        "unauthorized" => 11,
        "cancelled" => 12,
        _ => 1,
    }
}

fn fail(kind: &str, message: &str) -> ExitCode {
    eprintln!("error ({kind}): {message}");
    ExitCode::from(exit_code(kind))
}

fn report(error: &Error) -> ExitCode {
    let code = fail(error.kind(), &error.to_string());
    if let Error::WorkerError {
        traceback: Some(traceback),
        ..
    } = error
    {
        eprintln!("{traceback}");
    }
    code
}

/// A failed call as the CLI reports it: its kind and message.
type Failure = (String, String);

async fn call_server(args: &CallArgs, url: &str, call_args: Value) -> Result<Value, Failure> {
    let mut body = json!({"command": args.command, "args": call_args});
    if let Some(session) = &args.session {
        body["session_id"] = json!(session);
    }
    if let Some(timeout) = args.timeout {
        body["timeout_ms"] = json!(timeout.as_millis() as u64);
    }
    let endpoint = format!("{}/v1/call", url.trim_end_matches('/'));
    let mut request = reqwest::Client::new().post(&endpoint).json(&body);
    // The session id as a header too, so a load balancer can route by it.
    if let Some(session) = &args.session {
        request = request.header("x-session-id", session);
    }
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    if args.stream {
        request = request.header(reqwest::header::ACCEPT, "text/event-stream");
    }
    let response = request
        .send()
        .await
        .map_err(|e| ("connect".to_owned(), format!("{endpoint}: {e}")))?;
    let status = response.status();
    let is_events = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_events {
        return read_events(response).await;
    }
    let unreadable = |e: &dyn std::fmt::Display| {
        (
            format!("http_{}", status.as_u16()),
            format!("unreadable reply: {e}"),
        )
    };
    let reply: Value = response.json().await.map_err(|e| unreadable(&e))?;
    if status.is_success() {
        return Ok(reply["result"].clone());
    }
    Err(failure(&reply, status.as_u16()))
}

/// The kind and message of an `{"error": ...}` body.
fn failure(reply: &Value, status: u16) -> Failure {
    let error = &reply["error"];
    let kind = error["kind"]
        .as_str()
        .map_or_else(|| format!("http_{status}"), str::to_owned);
    let mut message = error["message"].as_str().unwrap_or("").to_owned();
    if let Some(traceback) = error["traceback"].as_str() {
        message = format!("{message}\n{traceback}");
    }
    (kind, message)
}

/// Prints the `chunk` events of a Server-Sent Events answer as they come; returns the
/// `result` event's result or the `error` event's failure.
async fn read_events(mut response: reqwest::Response) -> Result<Value, Failure> {
    let broken = |e: &dyn std::fmt::Display| ("connect".to_owned(), format!("event stream: {e}"));
    let mut buffer = String::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut event, mut data) = ("message", String::new());
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = name.trim();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            if data.is_empty() {
                continue; // a keep-alive
            }
            let value: Value = serde_json::from_str(&data).map_err(|e| broken(&e))?;
            match event {
                "chunk" => {
                    print(&value);
                }
                "result" => return Ok(value["result"].clone()),
                "error" => return Err(failure(&value, 200)),
                _ => {}
            }
        }
        match response.chunk().await.map_err(|e| broken(&e))? {
            Some(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
            None => return Err(broken(&"ended before the call's result")),
        }
    }
}

async fn call_own_pool(args: &CallArgs, call_args: Value) -> Result<Value, Error> {
    let mut settings = args
        .pool
        .settings()
        .map_err(|reason| Error::StartupFailed {
            worker: "-".into(),
            reason,
            stderr_tail: String::new(),
        })?;
    settings.workers = Some(settings.workers.unwrap_or(1));
    let pool = settings.builder().start().await?;
    let options = CallOptions {
        timeout: args.timeout,
        cancel: None,
    };
    let (command, session) = (&args.command, args.session.as_ref());
    let result = if args.stream {
        let started = match session {
            Some(id) => {
                pool.session(id)
                    .call_stream_with(command, call_args, options)
                    .await
            }
            None => pool.call_stream_with(command, call_args, options).await,
        };
        match started {
            Ok(stream) => print_stream(stream).await,
            Err(error) => Err(error),
        }
    } else {
        match session {
            Some(id) => {
                pool.session(id)
                    .call_with(command, call_args, options)
                    .await
            }
            None => pool.call_with(command, call_args, options).await,
        }
    };
    pool.shutdown().await;
    result
}

/// Prints a stream's chunks as they come; returns its result.
async fn print_stream(mut stream: CallStream) -> Result<Value, Error> {
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Chunk(chunk) => {
                print(&chunk);
            }
            StreamEvent::Result(result) => return Ok(result),
        }
    }
    Err(Error::ShuttingDown)
}

fn print(value: &Value) -> ExitCode {
    use std::io::Write;
    // A reader that went away (`| head`) is not an error of the call.
    let _ = writeln!(std::io::stdout().lock(), "{value}");
    ExitCode::SUCCESS
}

/// Runs the call and prints its result; the exit code tells the error kind.
pub async fn run(args: CallArgs) -> ExitCode {
    let call_args: Value = match serde_json::from_str(&args.args) {
        Ok(value @ Value::Object(_)) => value,
        Ok(_) => return fail("bad_request", "ARGS_JSON must be a JSON object"),
        Err(e) => return fail("bad_request", &format!("ARGS_JSON is not JSON: {e}")),
    };
    if args.url.is_some() {
        let pool_only = super::pool_args::given_on_command_line();
        if !pool_only.is_empty() {
            return fail(
                "bad_request",
                &format!(
                    "{} configure a pool of its own; with --url the call goes to a running \
                     server, so leave them out",
                    pool_only.join(", ")
                ),
            );
        }
    }
    match &args.url {
        Some(url) => match call_server(&args, url, call_args).await {
            Ok(value) => print(&value),
            Err((kind, message)) => fail(&kind, &message),
        },
        None => match call_own_pool(&args, call_args).await {
            Ok(value) => print(&value),
            Err(error) => report(&error),
        },
    }
}
