//! `snakepool call`: one command, against a server or a pool of its own.
//!
//! The result is printed as JSON on stdout. An error goes to stderr, and the exit code
//! says which kind it was (see [`exit_code`]).

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use snakepool::Error;

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
    /// The command.
    command: String,
    /// Its arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    #[command(flatten)]
    pool: PoolArgs,
}

/// Exit codes by error kind, so scripts can tell failures apart.
pub fn exit_code(kind: &str) -> u8 {
    match kind {
        "bad_request" | "invalid_request" | "body_too_large" => 2,
        "unknown_command" | "forbidden" => 3,
        "worker_error" => 4,
        "request_timeout" | "checkout_timeout" => 5,
        "worker_crashed" | "protocol" | "session_rebuild_failed" => 6,
        "saturated" | "shutting_down" | "starting" | "degraded" | "too_many_sessions" => 7,
        "session_closed" | "session_not_found" => 8,
        "startup_failed" | "config" | "invalid_config" => 9,
        "connect" => 10,
        "unauthorized" => 11,
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

async fn call_server(
    args: &CallArgs,
    url: &str,
    call_args: Value,
) -> Result<Value, (String, String)> {
    let mut body = json!({"command": args.command, "args": call_args});
    if let Some(session) = &args.session {
        body["session_id"] = json!(session);
    }
    if let Some(timeout) = args.timeout {
        body["timeout_ms"] = json!(timeout.as_millis() as u64);
    }
    let endpoint = format!("{}/v1/call", url.trim_end_matches('/'));
    let mut request = reqwest::Client::new().post(&endpoint).json(&body);
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| ("connect".to_owned(), format!("{endpoint}: {e}")))?;
    let status = response.status();
    let reply: Value = response.json().await.map_err(|e| {
        (
            format!("http_{}", status.as_u16()),
            format!("unreadable reply: {e}"),
        )
    })?;
    if status.is_success() {
        return Ok(reply["result"].clone());
    }
    let error = &reply["error"];
    let kind = error["kind"]
        .as_str()
        .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned);
    let mut message = error["message"].as_str().unwrap_or("").to_owned();
    if let Some(traceback) = error["traceback"].as_str() {
        message = format!("{message}\n{traceback}");
    }
    Err((kind, message))
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
    let timeout = args.timeout.unwrap_or_else(|| pool.request_timeout());
    let result = match &args.session {
        Some(id) => {
            pool.session(id)
                .call_with_timeout(&args.command, call_args, timeout)
                .await
        }
        None => {
            pool.call_with_timeout(&args.command, call_args, timeout)
                .await
        }
    };
    pool.shutdown().await;
    result
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
