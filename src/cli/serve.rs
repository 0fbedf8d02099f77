//! `snakepool serve`: the HTTP API over one pool.
//!
//! The listener is bound first, so `/health` answers 503 while the workers start.
//! SIGTERM or SIGINT stops taking calls and lets the calls in flight finish within
//! the drain timeout; calls still running then are failed with `shutting_down` and
//! their workers killed. Then every worker is stopped and `serve` exits.

use std::io::Write;

use snakepool::config::{
    DEFAULT_BODY_LIMIT, DEFAULT_BODY_READ_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONNECTIONS, JournalKind, Settings,
};
use snakepool::server::{ConnectionLimits, ServerOptions, ServerState, router, serve};
use tokio::signal::unix::{SignalKind, signal};

use super::pool_args::{PoolArgs, ServerArgs};

/// Options of `snakepool serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    server: ServerArgs,
}

impl ServeArgs {
    /// Threads for the server's async runtime.
    pub fn runtime_threads(&self) -> Result<Option<usize>, String> {
        self.pool.runtime_threads(true)
    }
}

/// How long connections get, past the drain deadline, to deliver the last answers.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Prints a status line on stdout (scripts read `listening on URL` and `pool ready`
/// there) and logs it; a closed stdout (e.g. a supervisor that went away) is no reason
/// to fail.
fn say(line: &str) {
    tracing::info!("{line}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn termination() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// This machine's host name (`localhost` if it has none).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is passed.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if ok && !name.is_empty() && snakepool::journal::check_node_name(&name).is_ok() {
        name
    } else {
        "localhost".into()
    }
}

/// Reloads the handler code on each SIGHUP (as `POST /v1/pool/reload` does), one
/// reload at a time; the outcome goes to the log and to stdout.
async fn reload_on_hangup(state: std::sync::Arc<ServerState>) {
    let mut hangups = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hangups.recv().await.is_some() {
        let Some(pool) = state.pool().cloned() else {
            tracing::warn!("SIGHUP before the pool is ready: nothing to reload");
            continue;
        };
        say("SIGHUP: reloading the handler code");
        match pool.reload().await {
            Ok(report) => say(&format!(
                "reloaded: {} workers run the new code ({} ms)",
                report.replaced, report.took_ms
            )),
            Err(error) => {
                tracing::error!(%error, "reload failed");
                say(&format!("reload failed: {error}"));
            }
        }
    }
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> Result<(), String> {
    let mut settings: Settings = args.pool.settings_with(args.server.flags())?;
    // A server keeps its sessions across restarts unless told otherwise.
    settings.journal.get_or_insert(JournalKind::Sqlite);
    settings.builder().config().map_err(|e| e.to_string())?;
    let addr = settings.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // A node of a cluster is named after where it runs unless named.
    if matches!(settings.journal, Some(JournalKind::Redis(_))) && settings.node.is_none() {
        settings.node = Some(format!("{}:{}", host_name(), local.port()));
    }
    let builder = settings.builder();
    let options = ServerOptions {
        token: settings.token.clone(),
        admin_token: settings.admin_token.clone(),
        body_limit: settings.body_limit.unwrap_or(DEFAULT_BODY_LIMIT),
        body_read_timeout: settings
            .body_read_timeout
            .unwrap_or(DEFAULT_BODY_READ_TIMEOUT),
    };
    let drain_timeout = settings.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    let limits = ConnectionLimits {
        max_connections: settings.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        header_read_timeout: settings
            .header_read_timeout
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
        // Calls end by the drain deadline; their answers get a little longer.
        close_timeout: drain_timeout + CLOSE_GRACE,
    };
    if limits.max_connections == 0 {
        return Err("max_connections must be at least 1".into());
    }
    if options.admin_token.is_some() && options.token.is_none() {
        return Err("--admin-token needs --token: without one, every route is open".into());
    }
    if options.token.is_none() && !local.ip().is_loopback() {
        eprintln!(
            "warning: listening on {local} without a token; anyone who can reach it can run commands"
        );
    }
    say(&format!("listening on http://{local}"));
    tracing::info!(
        runtime_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "async runtime"
    );

    let state = ServerState::starting();
    let app = router(state.clone(), &options);
    let starter = {
        let state = state.clone();
        tokio::spawn(async move {
            match builder.start().await {
                Ok(pool) => {
                    let workers = pool.status().workers.len();
                    state.ready(pool);
                    say(&format!("pool ready: {workers} workers"));
                    Ok(())
                }
                Err(error) => {
                    state.failed(error.to_string());
                    Err(())
                }
            }
        })
    };

    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
    let watch_start = tokio::spawn(async move {
        if let Ok(Err(_)) = starter.await {
            let _ = failed_tx.send(());
        }
    });
    let reloads = tokio::spawn(reload_on_hangup(state.clone()));
    let draining = state.clone();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            signal = termination() => {
                say(&format!("{signal}: finishing calls in flight (up to {drain_timeout:?}), then stopping the workers"));
            }
            Ok(_) = failed_rx => {}
        }
        draining.drain();
        // The pool's shutdown runs beside the server's: past the deadline it fails
        // the calls still running, so their connections can finish.
        let stopping = draining
            .pool()
            .cloned()
            .map(|pool| tokio::spawn(async move { pool.shutdown_within(drain_timeout).await }));
        let _ = stopped_tx.send(stopping);
    };
    serve(listener, app, limits, stop).await;
    watch_start.abort();
    reloads.abort();
    if let Some(reason) = state.failure() {
        return Err(format!("the pool failed to start: {reason}"));
    }
    if let Ok(Some(stopping)) = stopped_rx.await {
        let _ = stopping.await;
    } else if let Some(pool) = state.pool() {
        pool.shutdown_within(drain_timeout).await;
    }
    say("stopped");
    Ok(())
}
