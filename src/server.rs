//! The HTTP API over one pool (axum).
//!
//! - `POST /v1/call` `{command, args?, session_id?, timeout_ms?}` → `200 {"result"}`
//!   or `{"error": {"kind", "message", ...}}` with a status that fits the kind.
//! - `DELETE /v1/sessions/{id}`, `GET /v1/sessions`, `GET /v1/pool`,
//!   `GET /health` (200 ready, 503 starting or shutting down), `GET /metrics`.
//!
//! With a token, every route but `/health` needs `Authorization: Bearer <token>`.
//! A session closed by `DELETE` or by its TTL answers `410 Gone` for ten minutes,
//! rather than a later call silently opening a new, empty session under its id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use tokio::sync::broadcast;

use crate::error::Error;
use crate::pool::{Pool, PoolEvent};

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;
const FAILED: u8 = 3;

/// How the server treats requests.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Bearer token required on every route but `/health`.
    pub token: Option<String>,
    /// Largest request body in bytes.
    pub body_limit: usize,
}

/// How long a closed session's id keeps answering `410 Gone` before it can be
/// opened again.
const TOMBSTONE_LIFETIME: Duration = Duration::from_secs(600);

/// The server's view of its pool: starting, ready, draining or failed.
#[derive(Debug, Default)]
pub struct ServerState {
    pool: OnceLock<Pool>,
    phase: AtomicU8,
    failure: OnceLock<String>,
    /// Recently closed (or expired) session ids: a call naming one is refused rather
    /// than silently opening a new, empty session.
    closed: Mutex<HashMap<String, Instant>>,
}

impl ServerState {
    /// A server whose pool is still starting.
    pub fn starting() -> Arc<ServerState> {
        Arc::new(ServerState::default())
    }

    /// The pool is ready: start serving calls.
    pub fn ready(self: &Arc<Self>, pool: Pool) {
        let mut events = pool.subscribe();
        let state = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(PoolEvent::SessionExpired { session_id }) => match state.upgrade() {
                        Some(state) => state.tombstone(&session_id),
                        None => return,
                    },
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let _ = self.pool.set(pool);
        let _ = self
            .phase
            .compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The pool could not start.
    pub fn failed(&self, reason: String) {
        let _ = self.failure.set(reason);
        self.phase.store(FAILED, Ordering::SeqCst);
    }

    /// Stop taking calls (shutdown has begun).
    pub fn drain(&self) {
        self.phase.store(DRAINING, Ordering::SeqCst);
    }

    fn tombstone(&self, id: &str) {
        let now = Instant::now();
        let mut closed = self.closed.lock().expect("tombstones poisoned");
        closed.retain(|_, at| now.duration_since(*at) < TOMBSTONE_LIFETIME);
        closed.insert(id.to_owned(), now);
    }

    fn is_tombstoned(&self, id: &str) -> bool {
        self.closed
            .lock()
            .expect("tombstones poisoned")
            .get(id)
            .is_some_and(|at| at.elapsed() < TOMBSTONE_LIFETIME)
    }

    /// Why the pool could not start, if it could not.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// The pool, once ready.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.get()
    }

    fn serving_pool(&self) -> Result<&Pool, Unavailable> {
        let (kind, message) = match (self.phase.load(Ordering::SeqCst), self.pool.get()) {
            (READY, Some(pool)) => return Ok(pool),
            (DRAINING, _) => ("shutting_down", "the server is shutting down"),
            (FAILED, _) => (
                "startup_failed",
                self.failure.get().map_or("the pool failed to start", |s| s),
            ),
            _ => ("starting", "the pool is starting"),
        };
        Err(Unavailable {
            kind,
            message: message.to_owned(),
        })
    }
}

/// Why the server cannot take a call right now; answered with 503 and `Retry-After`.
struct Unavailable {
    kind: &'static str,
    message: String,
}

impl IntoResponse for Unavailable {
    fn into_response(self) -> Response {
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"kind": self.kind, "message": self.message}})),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }
}

/// The HTTP status that fits an error kind.
pub fn status_for(error: &Error) -> StatusCode {
    match error {
        Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
        Error::UnknownCommand { .. } => StatusCode::NOT_FOUND,
        Error::SessionClosed { .. } => StatusCode::GONE,
        Error::WorkerError { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::WorkerCrashed { .. } | Error::Protocol { .. } => StatusCode::BAD_GATEWAY,
        Error::SessionRebuildFailed { .. } => StatusCode::BAD_GATEWAY,
        Error::Saturated { .. }
        | Error::CheckoutTimeout { .. }
        | Error::ShuttingDown
        | Error::StartupFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Error::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        Error::UnexpectedResult { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON body of an error: kind, message and the details a caller can act on.
pub fn error_body(error: &Error) -> Value {
    let mut body = json!({"kind": error.kind(), "message": error.to_string()});
    let details = match error {
        Error::Saturated { queued } => json!({"queued": queued}),
        Error::CheckoutTimeout { waited } => json!({"waited_ms": waited.as_millis()}),
        Error::RequestTimeout {
            worker,
            command,
            timeout,
        } => json!({"worker": worker, "command": command, "timeout_ms": timeout.as_millis()}),
        Error::WorkerCrashed {
            worker,
            command,
            status,
            stderr_tail,
        } => json!({"worker": worker, "command": command, "status": status,
                     "stderr_tail": stderr_tail}),
        Error::WorkerError {
            worker,
            command,
            kind,
            message,
            traceback,
        } => json!({"worker": worker, "command": command, "python_type": kind,
                     "python_message": message, "traceback": traceback}),
        Error::UnknownCommand {
            worker, command, ..
        } => json!({"worker": worker, "command": command}),
        Error::Protocol {
            worker,
            command,
            detail,
        } => json!({"worker": worker, "command": command, "detail": detail}),
        Error::StartupFailed {
            worker,
            stderr_tail,
            ..
        } => json!({"worker": worker, "stderr_tail": stderr_tail}),
        Error::SessionClosed { session_id } => json!({"session_id": session_id}),
        Error::SessionRebuildFailed { session_id, source } => {
            json!({"session_id": session_id, "cause": error_body(source)})
        }
        Error::InvalidRequest { command, .. } | Error::UnexpectedResult { command, .. } => {
            json!({"command": command})
        }
        Error::ShuttingDown => json!({}),
    };
    if let (Value::Object(body), Value::Object(details)) = (&mut body, details) {
        body.extend(details);
    }
    body
}

fn error_response(error: &Error) -> Response {
    let mut response =
        (status_for(error), Json(json!({"error": error_body(error)}))).into_response();
    if status_for(error) == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn bad_request(kind: &str, status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"kind": kind, "message": message}})),
    )
        .into_response()
}

/// The body of `POST /v1/call`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    command: String,
    #[serde(default = "empty_object")]
    args: Value,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn empty_object() -> Value {
    json!({})
}

async fn call(
    State(state): State<Arc<ServerState>>,
    body: Result<Json<CallBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return bad_request(
                "body_too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                rejection.body_text(),
            );
        }
        Err(rejection) => {
            return bad_request(
                "bad_request",
                StatusCode::BAD_REQUEST,
                rejection.body_text(),
            );
        }
    };
    if !body.args.is_object() {
        return bad_request(
            "invalid_request",
            StatusCode::BAD_REQUEST,
            "`args` must be a JSON object".into(),
        );
    }
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    let timeout = body
        .timeout_ms
        .map_or_else(|| pool.request_timeout(), Duration::from_millis);
    let result = match &body.session_id {
        Some(id) if state.is_tombstoned(id) => Err(Error::SessionClosed {
            session_id: id.clone(),
        }),
        Some(id) => {
            pool.session(id)
                .call_with_timeout(&body.command, body.args, timeout)
                .await
        }
        None => {
            pool.call_with_timeout(&body.command, body.args, timeout)
                .await
        }
    };
    match result {
        Ok(result) => Json(json!({"result": result})).into_response(),
        Err(error) => error_response(&error),
    }
}

async fn close_session(State(state): State<Arc<ServerState>>, Path(id): Path<String>) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    if !pool.sessions().iter().any(|s| s.id == id) {
        return bad_request(
            "session_not_found",
            StatusCode::NOT_FOUND,
            format!("no open session `{id}`"),
        );
    }
    state.tombstone(&id);
    match pool.close_session(&id).await {
        Ok(()) => Json(json!({"closed": id})).into_response(),
        Err(error) => error_response(&error),
    }
}

async fn list_sessions(State(state): State<Arc<ServerState>>) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    let mut sessions = Vec::new();
    for info in pool.sessions() {
        let journal_length = pool.journal_len(&info.id).await.ok();
        let mut entry = json!(info);
        entry["journal_length"] = json!(journal_length);
        sessions.push(entry);
    }
    Json(json!({"sessions": sessions})).into_response()
}

async fn pool_status(State(state): State<Arc<ServerState>>) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    let status = pool.status();
    Json(json!({
        "workers": status.workers,
        "starting": status.starting,
        "queued": status.queued,
        "sessions": status.sessions,
        "shutting_down": status.shutting_down,
        "spawn": pool.zygote_status(),
        "totals": pool.metrics(),
    }))
    .into_response()
}

async fn health(State(state): State<Arc<ServerState>>) -> Response {
    match state.serving_pool() {
        Ok(pool) => {
            Json(json!({"status": "ready", "workers": pool.status().workers.len()})).into_response()
        }
        Err(unavailable) => {
            let status = match unavailable.kind {
                "startup_failed" => "failed",
                kind => kind,
            };
            let mut response = unavailable.into_response();
            *response.body_mut() = axum::body::Body::from(json!({"status": status}).to_string());
            response
        }
    }
}

async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    let text = match state.pool() {
        Some(pool) => pool.prometheus_text(),
        None => "# EOF\n".to_owned(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same_secret(given.trim().as_bytes(), token.as_bytes()))
}

async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    if authorized(request.headers(), &token) {
        return next.run(request).await;
    }
    let mut response = bad_request(
        "unauthorized",
        StatusCode::UNAUTHORIZED,
        "a valid bearer token is required".into(),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The API's routes over `state`.
pub fn router(state: Arc<ServerState>, options: &ServerOptions) -> Router {
    let mut api = Router::new()
        .route("/v1/call", post(call))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", delete(close_session))
        .route("/v1/pool", get(pool_status))
        .route("/metrics", get(metrics));
    if let Some(token) = &options.token {
        let token: Arc<str> = Arc::from(token.as_str());
        api = api.layer(middleware::from_fn_with_state(token, require_token));
    }
    api.route("/health", get(health))
        .layer(DefaultBodyLimit::max(options.body_limit))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorized(&headers, "s3cret"));
        assert!(!authorized(&headers, "other"));
        headers.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(!authorized(&headers, "s3cret"));
    }

    #[test]
    fn every_error_kind_has_a_fitting_status() {
        let crashed = Error::WorkerCrashed {
            worker: "w1".into(),
            command: "c".into(),
            status: "exit status 1".into(),
            stderr_tail: "boom".into(),
        };
        assert_eq!(status_for(&crashed), StatusCode::BAD_GATEWAY);
        let body = error_body(&crashed);
        assert_eq!(body["kind"], "worker_crashed");
        assert_eq!(body["stderr_tail"], "boom");
        assert_eq!(
            status_for(&Error::SessionClosed {
                session_id: "s".into()
            }),
            StatusCode::GONE
        );
        assert_eq!(
            status_for(&Error::Saturated { queued: 3 }),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
