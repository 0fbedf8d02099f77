//! The HTTP API over one pool (axum).
//!
//! - `POST /v1/call` `{command, args?, session_id?, timeout_ms?}` → `200 {"result"}`
//!   or `{"error": {"kind", "message", "request_id", ...}}` with a status that fits
//!   the kind; with `Accept: text/event-stream`, Server-Sent Events once a worker has
//!   the call (`chunk` events, then `result` or `error`). `DELETE
//!   /v1/calls/{request_id}` cancels a call in flight (see [`calls`]).
//! - `DELETE /v1/sessions/{id}`, `GET /v1/sessions?limit=&after=`, `GET
//!   /v1/sessions/{id}`, `GET /v1/pool`, `GET /health` (200 ready; 503 starting,
//!   degraded or shutting down), `GET /metrics`.
//! - `GET /`, the live dashboard's page, and `GET /v1/dashboard/events`, its stream
//!   (see [`dashboard`]).
//!
//! With a token, every route but `/health` and `/` (a page without data) needs
//! `Authorization: Bearer <token>`; with an admin token as well, the routes that show
//! every client's sessions and the pool (`GET /v1/sessions[/{id}]`, `GET /v1/pool`,
//! `GET /metrics`, `GET /v1/dashboard/events`) need that one instead.
//! Every answer carries an `X-Request-Id`; failures are logged under it with what the
//! client is not shown (a worker's stderr). A caller's `timeout_ms` is clamped to the
//! pool's range, and a client that disconnects mid-call cancels it if its command is
//! cancellable; any other runs to completion (see [`Pool::call`]). A session call's
//! answer says in `X-Session-State` whether the session was `created` by it (a new id,
//! or one closed by `DELETE` or its TTL), `resumed`, or `rebuilt` from its journal.

mod calls;
mod commands;
mod dashboard;
mod errors;
mod listen;
mod openapi;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use tower_http::timeout::RequestBodyTimeoutLayer;

pub use errors::{error_body, public_message, status_for};
pub use listen::{ConnectionLimits, serve};

use crate::error::Error;
use crate::pool::Pool;
use errors::{error_response, refusal};

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;
const FAILED: u8 = 3;

/// Most sessions `GET /v1/sessions` returns at once, and how many without `limit`.
pub const MAX_SESSIONS_PAGE: usize = 1000;
const DEFAULT_SESSIONS_PAGE: usize = 100;

/// How the server treats requests.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Bearer token required on every route but `/health` and `/` (the dashboard's
    /// page, which holds no data).
    pub token: Option<String>,
    /// Bearer token of the operator's routes (`GET /v1/sessions`, `GET /v1/pool`,
    /// `GET /metrics`, `GET /v1/dashboard/events`), which show every client's session
    /// ids. When set, the client token no longer opens them; it also opens the client
    /// routes.
    pub admin_token: Option<String>,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Longest time a client may take to send a request body.
    pub body_read_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            token: None,
            admin_token: None,
            body_limit: crate::config::DEFAULT_BODY_LIMIT,
            body_read_timeout: crate::config::DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// The request id of the request being served, also sent as `X-Request-Id`.
#[derive(Clone, Debug)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// 128 random bits as 32 lowercase hex digits.
    fn random() -> RequestId {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let bits = rand::random::<u128>();
        let mut text = [0u8; 32];
        for (i, digit) in text.iter_mut().enumerate() {
            *digit = DIGITS[((bits >> (124 - 4 * i)) & 0xf) as usize];
        }
        RequestId(Arc::from(
            std::str::from_utf8(&text).expect("hex digits are ASCII"),
        ))
    }
}

/// The server's view of its pool: starting, ready, draining or failed.
#[derive(Debug, Default)]
pub struct ServerState {
    pool: OnceLock<Pool>,
    phase: AtomicU8,
    failure: OnceLock<String>,
    /// The calls in flight, for `DELETE /v1/calls/{request_id}`.
    in_flight: calls::InFlight,
    /// The dashboard's recent samples and worker events, and its open streams.
    dashboard: dashboard::Dashboard,
}

impl ServerState {
    /// A server whose pool is still starting.
    pub fn starting() -> Arc<ServerState> {
        Arc::new(ServerState::default())
    }

    /// The pool is ready: start serving calls.
    pub fn ready(self: &Arc<Self>, pool: Pool) {
        let _ = self.pool.set(pool);
        let _ = self
            .phase
            .compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst);
        dashboard::record(self);
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
        let mut response = refusal(self.kind, StatusCode::SERVICE_UNAVAILABLE, self.message);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }
}

/// An error answer that names its request id.
fn answer_error(error: &Error, request_id: &RequestId) -> Response {
    let mut response = error_response(error, &request_id.0);
    response.extensions_mut().insert(request_id.clone());
    response
}

async fn close_session(
    State(state): State<Arc<ServerState>>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    match pool.close_session(&id).await {
        Ok(true) => Json(json!({"closed": id})).into_response(),
        Ok(false) => refusal(
            "session_not_found",
            StatusCode::NOT_FOUND,
            format!("no open session `{}`", id.escape_debug()),
        ),
        Err(error) => answer_error(&error, &request_id),
    }
}

/// Reads `GET /v1/sessions`'s `limit` and `after`.
fn page_params(params: &HashMap<String, String>) -> Result<(usize, Option<&str>), String> {
    if let Some(unknown) = params
        .keys()
        .find(|k| !["limit", "after"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown query parameter `{unknown}`; use `limit` and `after`"
        ));
    }
    let limit = match params.get("limit") {
        None => DEFAULT_SESSIONS_PAGE,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_SESSIONS_PAGE).contains(&n) => n,
            _ => {
                return Err(format!(
                    "`limit` must be a whole number from 1 to {MAX_SESSIONS_PAGE}, got {text:?}"
                ));
            }
        },
    };
    Ok((limit, params.get("after").map(String::as_str)))
}

async fn list_sessions(
    State(state): State<Arc<ServerState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    let (limit, after) = match page_params(&params) {
        Ok(page) => page,
        Err(message) => return refusal("invalid_request", StatusCode::BAD_REQUEST, message),
    };
    let page = pool.sessions_page(after, limit);
    Json(json!(page)).into_response()
}

async fn session_info(
    State(state): State<Arc<ServerState>>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    match pool.session_info(&id).await {
        Ok(Some(info)) => Json(json!(info)).into_response(),
        Err(error) => answer_error(&error, &request_id),
        Ok(None) => refusal(
            "session_not_found",
            StatusCode::NOT_FOUND,
            format!("no open session `{}`", id.escape_debug()),
        ),
    }
}

/// `POST /v1/pool/reload`: reloads the handler code without dropping a call.
async fn reload(
    State(state): State<Arc<ServerState>>,
    Extension(request_id): Extension<RequestId>,
) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool.clone(),
        Err(unavailable) => return unavailable.into_response(),
    };
    match pool.reload().await {
        Ok(report) => Json(json!(report)).into_response(),
        Err(error) => answer_error(&error, &request_id),
    }
}

async fn pool_status(State(state): State<Arc<ServerState>>) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    let status = pool.status();
    Json(json!({
        "node": pool.config().node,
        "pid": std::process::id(),
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
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => {
            let status = match unavailable.kind {
                "startup_failed" => "failed",
                kind => kind,
            };
            let mut response = unavailable.into_response();
            *response.body_mut() = axum::body::Body::from(json!({"status": status}).to_string());
            return response;
        }
    };
    let health = pool.health();
    if health.is_ready() {
        return Json(json!({"status": "ready", "workers": health.ready_workers})).into_response();
    }
    let reason = match &health.start_error {
        Some(error) => format!(
            "no worker is ready; the last start failed: {}",
            public_message(&Error::StartupFailed {
                worker: "-".into(),
                reason: error.clone(),
                stderr_tail: String::new(),
            })
        ),
        None => format!("no worker is ready ({} starting)", health.starting),
    };
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "degraded", "reason": reason, "workers": 0,
                    "starting": health.starting})),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
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

/// The bearer tokens a group of routes accepts.
#[derive(Clone)]
struct Tokens(Arc<[String]>);

async fn require_token(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    if tokens.0.iter().any(|t| authorized(request.headers(), t)) {
        return next.run(request).await;
    }
    let mut response = refusal(
        "unauthorized",
        StatusCode::UNAUTHORIZED,
        "a valid bearer token is required".into(),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Shortest and longest request id a client may choose.
const CLIENT_REQUEST_ID_BYTES: std::ops::RangeInclusive<usize> = 16..=128;

/// The id the client chose for its request (`X-Request-Id`), if it chose one; an
/// error message if it is not one of ours.
fn client_request_id(headers: &HeaderMap) -> Result<Option<RequestId>, String> {
    let Some(value) = headers.get("x-request-id") else {
        return Ok(None);
    };
    let id = value.to_str().unwrap_or_default();
    let fits = CLIENT_REQUEST_ID_BYTES.contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !fits {
        return Err(format!(
            "X-Request-Id must be {} to {} characters of A-Z, a-z, 0-9, '-' and '_' (it is \
             what allows cancelling the call: make it unguessable)",
            CLIENT_REQUEST_ID_BYTES.start(),
            CLIENT_REQUEST_ID_BYTES.end()
        ));
    }
    Ok(Some(RequestId(Arc::from(id))))
}

/// Gives each request an id, for its handler and its answer's `X-Request-Id`: the
/// client's own, or 128 random bits.
async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = match client_request_id(request.headers()) {
        Ok(Some(id)) => id,
        Ok(None) => RequestId::random(),
        Err(message) => return refusal("bad_request", StatusCode::BAD_REQUEST, message),
    };
    request.extensions_mut().insert(id.clone());
    let mut response = next.run(request).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        response = with_request_id(response, &id).await;
    }
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Largest error body the server puts a request id into.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Adds `request_id` to an `{"error": {...}}` body that lacks one, whoever made it
/// (a handler, an extractor's rejection, the token check).
async fn with_request_id(response: Response, id: &RequestId) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let small = axum::body::HttpBody::size_hint(response.body())
        .exact()
        .is_some_and(|len| len <= ERROR_BODY_LIMIT as u64);
    // Answers built by `error_response` carry their id already; large or streamed
    // bodies pass unchanged.
    if !is_json || !small || response.extensions().get::<RequestId>().is_some() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, ERROR_BODY_LIMIT).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    let mut value: Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(_) => return Response::from_parts(parts, axum::body::Body::from(bytes)),
    };
    if let Some(error) = value.get_mut("error").and_then(Value::as_object_mut) {
        error.entry("request_id").or_insert_with(|| json!(&*id.0));
    }
    let bytes = serde_json::to_vec(&value).expect("a JSON value serialises");
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The API's routes over `state`.
pub fn router(state: Arc<ServerState>, options: &ServerOptions) -> Router {
    let mut client = Router::new()
        .route("/v1/call", post(calls::call))
        .route("/v1/calls/{request_id}", delete(calls::cancel_call))
        .route("/v1/commands", get(commands::list_commands))
        .route("/v1/sessions/{id}", delete(close_session));
    let mut admin = Router::new()
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", get(session_info))
        .route("/v1/pool", get(pool_status))
        .route("/v1/pool/reload", post(reload))
        .route("/metrics", get(metrics))
        .route("/v1/dashboard/events", get(dashboard::events));
    let client_tokens: Vec<String> = options
        .token
        .iter()
        .chain(options.admin_token.iter())
        .cloned()
        .collect();
    let admin_tokens: Vec<String> = options
        .admin_token
        .as_ref()
        .or(options.token.as_ref())
        .cloned()
        .into_iter()
        .collect();
    if options.token.is_some() {
        let tokens = Tokens(client_tokens.into());
        client = client.layer(middleware::from_fn_with_state(tokens, require_token));
    }
    if !admin_tokens.is_empty() {
        let tokens = Tokens(admin_tokens.into());
        admin = admin.layer(middleware::from_fn_with_state(tokens, require_token));
    }
    client
        .merge(admin)
        .route("/health", get(health))
        .route("/openapi.json", get(openapi::document))
        .route("/", get(dashboard::page))
        .layer(DefaultBodyLimit::max(options.body_limit))
        .layer(RequestBodyTimeoutLayer::new(options.body_read_timeout))
        .layer(middleware::from_fn(assign_request_id))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (RequestId::random(), RequestId::random());
        for id in [&a, &b] {
            assert_eq!(id.0.len(), 32, "{}", id.0);
            assert!(
                id.0.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        assert_ne!(a.0, b.0);
    }

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
    fn session_pages_are_bounded() {
        let params = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(page_params(&params(&[])).unwrap(), (100, None));
        assert_eq!(
            page_params(&params(&[("limit", "1000"), ("after", "b")])).unwrap(),
            (1000, Some("b"))
        );
        for bad in ["0", "1001", "x", "-1"] {
            assert!(page_params(&params(&[("limit", bad)])).is_err(), "{bad}");
        }
        assert!(page_params(&params(&[("offset", "3")])).is_err());
    }
}
