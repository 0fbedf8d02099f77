//! `POST /v1/call` (a JSON answer, or Server-Sent Events for a caller that accepts
//! them) and `DELETE /v1/calls/{request_id}`, which cancels a call in flight.
//!
//! Every call in flight is registered under its request id with a token that cancels
//! it, for as long as its answer is being produced: the registry holds one entry per
//! open request, so the connection limit bounds it. A request id is 128 random bits
//! unless the client names its call itself (`X-Request-Id`, at least 16 characters):
//! knowing the id is what allows cancelling the call. A client that disconnects
//! cancels its call too; either way only a cancellable command (an `async` handler or
//! a generator) stops early, any other runs to completion and its answer is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::errors::{error_body, refusal};
use super::{RequestId, ServerState, answer_error};
use crate::call::{CallOptions, CallStream, StreamEvent};
use crate::pool::{Pool, SessionState};

/// The calls in flight, by request id.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    calls: Mutex<HashMap<Arc<str>, Running>>,
}

#[derive(Debug)]
struct Running {
    command: String,
    cancel: CancellationToken,
}

/// Keeps a call registered while its answer is produced; unregisters on drop.
struct Registration {
    state: Arc<ServerState>,
    id: Arc<str>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.state.in_flight.lock().remove(&self.id);
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Running>> {
        self.calls.lock().expect("calls in flight poisoned")
    }
}

/// Registers call `id`; `None` when a call with that id is already in flight.
fn register(
    state: &Arc<ServerState>,
    id: &RequestId,
    command: &str,
    cancel: CancellationToken,
) -> Option<Registration> {
    let mut calls = state.in_flight.lock();
    if calls.contains_key(&id.0) {
        return None;
    }
    let command = command.to_owned();
    calls.insert(id.0.clone(), Running { command, cancel });
    Some(Registration {
        state: state.clone(),
        id: id.0.clone(),
    })
}

/// The body of `POST /v1/call`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CallBody {
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

/// The body of a call's successful answer.
#[derive(serde::Serialize)]
struct Answer {
    result: Value,
}

/// Whether the client asked for Server-Sent Events.
fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// `POST /v1/call`.
pub(super) async fn call(
    State(state): State<Arc<ServerState>>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Json<CallBody>, JsonRejection>,
) -> Response {
    let Json(mut body) = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refusal(
                "body_too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                rejection.body_text(),
            );
        }
        Err(rejection) => {
            return refusal(
                "bad_request",
                StatusCode::BAD_REQUEST,
                rejection.body_text(),
            );
        }
    };
    if !body.args.is_object() {
        return refusal(
            "invalid_request",
            StatusCode::BAD_REQUEST,
            "`args` must be a JSON object".into(),
        );
    }
    match session_from_header(&headers, body.session_id.as_deref()) {
        Ok(Some(id)) => body.session_id = Some(id),
        Ok(None) => {}
        Err(message) => return refusal("invalid_request", StatusCode::BAD_REQUEST, message),
    }
    let pool = match state.serving_pool() {
        Ok(pool) => pool.clone(),
        Err(unavailable) => return unavailable.into_response(),
    };
    // Refused calls open no session.
    if let Err(error) = pool.check_call(&body.command, &body.args) {
        return answer_error(&error, &request_id);
    }
    let cancel = CancellationToken::new();
    let Some(registration) = register(&state, &request_id, &body.command, cancel.clone()) else {
        return refusal(
            "duplicate_request_id",
            StatusCode::CONFLICT,
            format!("a call with request id `{}` is in flight", request_id.0),
        );
    };
    let options = CallOptions {
        timeout: Some(pool.client_timeout(body.timeout_ms.map(Duration::from_millis))),
        cancel: Some(cancel.clone()),
    };
    if wants_events(&headers) {
        return match start_stream(&pool, body, options).await {
            Ok(stream) => {
                let session = stream.session_state();
                let mut response = events(stream, request_id, registration).into_response();
                tell_session_state(&mut response, session);
                response
            }
            Err(error) => answer_error(&error, &request_id),
        };
    }
    // A client that hangs up drops this future: its call is cancelled.
    let cancel_if_gone = cancel.drop_guard();
    let result = match &body.session_id {
        Some(id) => pool
            .session(id)
            .call_reporting(&body.command, body.args, options)
            .await
            .map(|reply| (reply.result, Some(reply.state))),
        None => pool
            .call_with(&body.command, body.args, options)
            .await
            .map(|result| (result, None)),
    };
    cancel_if_gone.disarm();
    drop(registration);
    match result {
        Ok((result, session)) => {
            let mut response = Json(Answer { result }).into_response();
            tell_session_state(&mut response, session);
            response
        }
        Err(error) => answer_error(&error, &request_id),
    }
}

/// The session id of an `X-Session-Id` header (so a load balancer can route by it
/// without reading the body); it must agree with the body's `session_id` if both
/// are given.
fn session_from_header(
    headers: &HeaderMap,
    in_body: Option<&str>,
) -> Result<Option<String>, String> {
    let Some(value) = headers.get(SESSION_ID_HEADER) else {
        return Ok(None);
    };
    let Ok(id) = std::str::from_utf8(value.as_bytes()) else {
        return Err("the X-Session-Id header is not UTF-8".into());
    };
    match in_body {
        Some(body) if body != id => Err(format!(
            "the X-Session-Id header ({:?}) and the body's `session_id` ({:?}) differ",
            id.escape_debug().to_string(),
            body.escape_debug().to_string()
        )),
        _ => Ok(Some(id.to_owned())),
    }
}

/// The header a session call may carry its session id in.
pub(super) const SESSION_ID_HEADER: &str = "x-session-id";

/// Says in `X-Session-State` what a session call found its session to be.
fn tell_session_state(response: &mut Response, state: Option<SessionState>) {
    if let Some(state) = state {
        response
            .headers_mut()
            .insert("x-session-state", HeaderValue::from_static(state.as_str()));
    }
}

async fn start_stream(
    pool: &Pool,
    body: CallBody,
    options: CallOptions,
) -> crate::Result<CallStream> {
    match &body.session_id {
        Some(id) => {
            pool.session(id)
                .call_stream_with(&body.command, body.args, options)
                .await
        }
        None => {
            pool.call_stream_with(&body.command, body.args, options)
                .await
        }
    }
}

/// A call's stream as Server-Sent Events: `chunk` events, then one `result` (data
/// `{"result": ...}`) or `error` (data `{"error": {...}}`, as a JSON error body).
fn events(
    stream: CallStream,
    request_id: RequestId,
    registration: Registration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = stream.map(move |event| {
        // Held until the stream ends or the client leaves.
        let _registered = &registration;
        Ok(match event {
            Ok(StreamEvent::Chunk(chunk)) => json_event("chunk", &chunk),
            Ok(StreamEvent::Result(result)) => json_event("result", &json!({"result": result})),
            Err(error) => {
                let mut body = error_body(&error);
                body["request_id"] = json!(&*request_id.0);
                if super::errors::status_for(&error).is_server_error() {
                    tracing::warn!(request_id = &*request_id.0, kind = error.kind(), %error, "streamed call failed");
                }
                json_event("error", &json!({"error": body}))
            }
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn json_event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// `DELETE /v1/calls/{request_id}`: cancels the call in flight under that id.
pub(super) async fn cancel_call(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
) -> Response {
    let running = {
        let calls = state.in_flight.lock();
        calls
            .get(id.as_str())
            .map(|r| (r.command.clone(), r.cancel.clone()))
    };
    let Some((command, cancel)) = running else {
        return refusal(
            "call_not_found",
            StatusCode::NOT_FOUND,
            format!("no call in flight with request id `{}`", id.escape_debug()),
        );
    };
    let cancellable = state
        .pool()
        .is_some_and(|pool| pool.is_cancellable(&command));
    if !cancellable {
        return refusal(
            "not_cancellable",
            StatusCode::CONFLICT,
            format!(
                "`{command}` runs to completion: only async and streaming commands can be \
                 cancelled"
            ),
        );
    }
    cancel.cancel();
    (
        StatusCode::ACCEPTED,
        Json(json!({"request_id": id, "cancelling": true})),
    )
        .into_response()
}
