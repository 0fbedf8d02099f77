//! `GET /v1/commands`: the commands callers may send, with what the workers' manifest
//! says about each.
//!
//! `{"commands": [{name, doc, mutates_session, concurrent, streams, cancellable,
//! args_schema}]}` in name order, internal commands left out. `args_schema` is the JSON
//! Schema of the command's `args` object as its module declared it (`null` when it
//! declared none); it documents the arguments, and calls are not checked against it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::ServerState;

/// One command as `GET /v1/commands` lists it.
#[derive(Debug, Serialize)]
struct Listed {
    /// The name to call it by.
    name: String,
    /// The first line of its handler's documentation.
    doc: String,
    /// Its successful calls are journaled with their session.
    mutates_session: bool,
    /// It may run beside other calls on one worker (an `async` handler).
    concurrent: bool,
    /// It sends chunks before its result (a generator).
    streams: bool,
    /// `DELETE /v1/calls/{request_id}` (or a disconnect) stops it early.
    cancellable: bool,
    /// The JSON Schema of its `args`, or `null`.
    args_schema: Option<Value>,
}

/// `GET /v1/commands`.
pub(super) async fn list_commands(State(state): State<Arc<ServerState>>) -> Response {
    let pool = match state.serving_pool() {
        Ok(pool) => pool,
        Err(unavailable) => return unavailable.into_response(),
    };
    let commands: Vec<Listed> = pool
        .commands()
        .into_iter()
        .map(|info| Listed {
            cancellable: pool.is_cancellable(&info.name),
            name: info.name,
            doc: info.doc,
            mutates_session: info.mutates_session,
            concurrent: info.concurrent,
            streams: info.streams,
            args_schema: info.args_schema,
        })
        .collect();
    Json(json!({ "commands": commands })).into_response()
}
