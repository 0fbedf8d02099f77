//! Errors as HTTP answers: a status per kind, and a JSON body with what the caller
//! can act on — never a worker's stderr (which may hold other calls' output) nor
//! anything else meant for the operator; those go to the log under the request id.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::Error;

/// Answers a call its caller cancelled (as nginx and gRPC gateways do).
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The HTTP status that fits an error kind.
pub fn status_for(error: &Error) -> StatusCode {
    match error {
        Error::Cancelled { .. } => {
            StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("499 is a valid status")
        }
        Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
        Error::Forbidden { .. } => StatusCode::FORBIDDEN,
        Error::UnknownCommand { .. } => StatusCode::NOT_FOUND,
        Error::SessionClosed { .. } => StatusCode::GONE,
        Error::TooManySessions { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::WorkerError { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::WorkerCrashed { .. } | Error::Protocol { .. } => StatusCode::BAD_GATEWAY,
        Error::SessionRebuildFailed { .. } => StatusCode::BAD_GATEWAY,
        Error::JournalFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        Error::SessionMoved { .. } => StatusCode::CONFLICT,
        Error::ReloadFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Saturated { .. }
        | Error::CheckoutTimeout { .. }
        | Error::ShuttingDown
        | Error::JournalUnavailable { .. }
        | Error::StartupFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Error::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        Error::UnexpectedResult { .. } | Error::InvalidConfig { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// A start-up failure's reason without any stderr it quotes.
fn without_stderr(reason: &str) -> &str {
    reason
        .split("; stderr tail")
        .next()
        .unwrap_or(reason)
        .trim_end()
}

/// The error's message for a client: as [`Error`]'s `Display`, minus stderr.
pub fn public_message(error: &Error) -> String {
    match error {
        Error::WorkerCrashed {
            worker,
            command,
            status,
            ..
        } => format!("worker {worker} died during `{command}` ({status})"),
        Error::StartupFailed { worker, reason, .. } => {
            format!(
                "worker {worker} failed to start: {}",
                without_stderr(reason)
            )
        }
        Error::SessionRebuildFailed {
            session_id,
            entry,
            entry_command,
            source,
        } => {
            let at = match (entry, entry_command) {
                (Some(entry), Some(command)) => format!(" (journal entry {entry}, `{command}`)"),
                _ => String::new(),
            };
            format!(
                "session `{session_id}` could not be rebuilt on a new worker{at}: {}; close it \
                 and start again",
                public_message(source)
            )
        }
        other => other.to_string(),
    }
}

/// The JSON body of an error: kind, message and the details a caller can act on.
pub fn error_body(error: &Error) -> Value {
    let mut body = json!({"kind": error.kind(), "message": public_message(error)});
    let details = match error {
        Error::Saturated { queued } => json!({"queued": queued}),
        Error::CheckoutTimeout { waited } => json!({"waited_ms": waited.as_millis()}),
        Error::RequestTimeout {
            worker,
            command,
            timeout,
            killed,
        } => json!({"worker": worker, "command": command, "timeout_ms": timeout.as_millis(),
                     "worker_killed": killed}),
        Error::WorkerCrashed {
            worker,
            command,
            status,
            ..
        } => json!({"worker": worker, "command": command, "status": status}),
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
            worker, command, ..
        }
        | Error::Cancelled { worker, command } => json!({"worker": worker, "command": command}),
        Error::StartupFailed { worker, .. } => json!({"worker": worker}),
        Error::SessionClosed { session_id }
        | Error::JournalUnavailable { session_id, .. }
        | Error::SessionMoved { session_id, .. } => json!({"session_id": session_id}),
        Error::TooManySessions { limit } => json!({"limit": limit}),
        Error::JournalFull {
            session_id,
            entries,
            bytes,
            max_entries,
            max_bytes,
            reason,
        } => json!({"session_id": session_id, "entries": entries, "bytes": bytes,
                     "max_entries": max_entries, "max_bytes": max_bytes, "reason": reason}),
        Error::SessionRebuildFailed {
            session_id,
            entry,
            entry_command,
            source,
        } => json!({"session_id": session_id, "entry": entry, "entry_command": entry_command,
                     "cause": error_body(source)}),
        Error::InvalidRequest { command, .. }
        | Error::UnexpectedResult { command, .. }
        | Error::Forbidden { command } => json!({"command": command}),
        _ => json!({}),
    };
    if let (Value::Object(body), Value::Object(details)) = (&mut body, details) {
        body.extend(details);
    }
    body
}

/// An error answer; a 503, a 429 or a `session_moved` says when to retry.
pub fn error_response(error: &Error, request_id: &str) -> Response {
    let status = status_for(error);
    if status.is_server_error() {
        // The whole error, stderr included, is for the operator.
        tracing::warn!(request_id, kind = error.kind(), %error, "call failed");
    }
    let mut body = error_body(error);
    body["request_id"] = json!(request_id);
    let mut response = (status, Json(json!({"error": body}))).into_response();
    let retry = matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) || matches!(error, Error::SessionMoved { .. });
    if retry {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// An answer for a request refused before it reached the pool.
pub fn refusal(kind: &str, status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"kind": kind, "message": message}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_no_stderr() {
        let crashed = Error::WorkerCrashed {
            worker: "w1 (pid 7)".into(),
            command: "c".into(),
            status: "exit status 1".into(),
            stderr_tail: "someone else's secret".into(),
        };
        assert_eq!(status_for(&crashed), StatusCode::BAD_GATEWAY);
        let body = error_body(&crashed);
        assert_eq!(body["kind"], "worker_crashed");
        assert_eq!(body["status"], "exit status 1");
        assert!(!body.to_string().contains("secret"), "{body}");
        let rebuild = Error::SessionRebuildFailed {
            session_id: "s".into(),
            entry: Some(2),
            entry_command: Some("boom".into()),
            source: Box::new(crashed),
        };
        let body = error_body(&rebuild);
        assert_eq!(body["entry"], 2);
        assert_eq!(body["entry_command"], "boom");
        assert!(!body.to_string().contains("secret"), "{body}");
        let start = Error::StartupFailed {
            worker: "w2".into(),
            reason: "exited during the handshake (exit status 3); stderr tail:\nsecret".into(),
            stderr_tail: "secret".into(),
        };
        assert!(!error_body(&start).to_string().contains("secret"));
    }

    #[test]
    fn every_kind_has_a_fitting_status() {
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
        assert_eq!(
            status_for(&Error::Forbidden {
                command: "shutdown".into()
            }),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status_for(&Error::TooManySessions { limit: 1 }),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
