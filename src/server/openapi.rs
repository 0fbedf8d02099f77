//! `GET /openapi.json`: the HTTP API as an OpenAPI 3.1 document, generated with
//! `utoipa` from the server's own types and built once.
//!
//! The schemas are those of the types the handlers answer with (`SessionInfo`,
//! `PoolStatus`, `MetricsSnapshot`, ...) and of the call body; where a handler answers
//! with a JSON object of its own making, a type here describes that object. The
//! operations (every route of [`super::router`], with its parameters, answers per
//! status, headers and token) are listed in [`operations`]; every error kind has its
//! status in [`ERROR_KINDS`].

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, Content, ContentBuilder, Ref, RefOr, Required, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::calls::CallBody;
use super::{CLIENT_REQUEST_ID_BYTES, DEFAULT_SESSIONS_PAGE, MAX_SESSIONS_PAGE};
use crate::pool::{ReloadReport, SessionInfo, SessionPage, SessionState};
use answers::{
    CallResult, CancelAccepted, ClosedSession, CommandList, ErrorBody, Health, PoolOverview,
};

/// `GET /openapi.json`: the document, built on first use.
pub(super) async fn document() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let json = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serialises")
    });
    ([(header::CONTENT_TYPE, "application/json")], json.as_str()).into_response()
}

const API_DESCRIPTION: &str = "Pools of long-lived Python worker processes over HTTP: calls, \
    sessions with affinity and journals, and the operator's views of the pool.\n\n\
    A server started with a token (`--token`) needs `Authorization: Bearer <token>` on every \
    route but `GET /health`, `GET /` and `GET /openapi.json`; with an admin token as well \
    (`--admin-token`), the operator's routes need that one instead (it also opens the client \
    routes). A server without tokens needs none.\n\n\
    Every answer carries an `X-Request-Id`: the client's own (16 to 128 characters of \
    `A-Za-z0-9-_`; any other is refused with `400 bad_request`) or 128 random bits. An error answers `{\"error\": {\"kind\", \"message\", \
    \"request_id\", ...details}}` with the status of its `kind` (see the `ErrorKind` schema).";

/// The document: its schemas, tags and, through [`Routes`], its operations and tokens.
#[derive(OpenApi)]
#[openapi(
    info(description = API_DESCRIPTION),
    components(schemas(
        CallBody,
        CallResult,
        ErrorBody,
        ErrorKind,
        CancelAccepted,
        CommandList,
        ClosedSession,
        SessionPage,
        PoolOverview,
        ReloadReport,
        Health,
    )),
    modifiers(&Routes),
    tags(
        (name = "calls", description = "Calling commands, and cancelling calls"),
        (name = "sessions", description = "Sessions: state on one worker, kept in a journal"),
        (name = "operator", description = "The pool: its state, metrics and reloads"),
        (name = "dashboard", description = "The live dashboard"),
        (name = "service", description = "Health and this document"),
    ),
)]
struct ApiDoc;

/// An error kind: its status, and when it is answered.
struct Kind {
    name: &'static str,
    status: u16,
    meaning: &'static str,
}

const fn kind(name: &'static str, status: u16, meaning: &'static str) -> Kind {
    Kind {
        name,
        status,
        meaning,
    }
}

/// Every `kind` an error answer may carry: those of [`crate::Error::kind`], with the
/// status [`super::status_for`] gives them, then the server's own refusals.
#[rustfmt::skip]
const ERROR_KINDS: &[Kind] = &[
    kind("saturated",              503, "the queue of callers waiting for a worker is full"),
    kind("checkout_timeout",       503, "no worker became free within the checkout timeout"),
    kind("request_timeout",        504, "the worker did not answer within the call's timeout"),
    kind("cancelled",              499, "the call was cancelled by its caller"),
    kind("worker_crashed",         502, "the worker died during the call"),
    kind("worker_error",           422, "the command raised a Python exception"),
    kind("unknown_command",        404, "the workers do not know the command"),
    kind("protocol",               502, "the worker broke the wire protocol"),
    kind("startup_failed",         503, "no worker can start, or the pool failed to start"),
    kind("invalid_request",        400, "the call cannot be made as given (arguments, session id)"),
    kind("forbidden",              403, "the command is internal to the pool"),
    kind("too_many_sessions",      429, "opening one more session would pass the session limit"),
    kind("invalid_config",         500, "a setting is out of range"),
    kind("unexpected_result",      500, "a result does not have the expected shape"),
    kind("session_closed",         410, "the session was closed"),
    kind("session_rebuild_failed", 502, "the session could not be rebuilt from its journal"),
    kind("journal_full",           507, "the session's journal is full and cannot be compacted"),
    kind("journal_unavailable",    503, "the journal store cannot be reached"),
    kind("session_moved",          409, "another node owns the session; retry"),
    kind("reload_failed",          422, "a reload of the handler code stopped"),
    kind("shutting_down",          503, "the server is shutting down"),
    // The server's own refusals.
    kind("bad_request",            400, "a malformed body, or an `X-Request-Id` that is not one"),
    kind("body_too_large",         413, "the body is larger than the server's limit"),
    kind("unauthorized",           401, "a valid bearer token is required"),
    kind("duplicate_request_id",   409, "a call with this request id is in flight"),
    kind("call_not_found",         404, "no call is in flight under this request id"),
    kind("not_cancellable",        409, "the command runs to completion"),
    kind("session_not_found",      404, "no session is open under this id"),
    kind("starting",               503, "the pool is starting"),
    kind("too_many_streams",       503, "the most dashboard streams are open"),
];

/// The kinds a route that needs the pool answers while the pool cannot serve.
const UNAVAILABLE: &[&str] = &["starting", "startup_failed", "shutting_down"];

fn error_kind(name: &str) -> &'static Kind {
    ERROR_KINDS
        .iter()
        .find(|kind| kind.name == name)
        .unwrap_or_else(|| panic!("error kind `{name}` is not in ERROR_KINDS"))
}

/// The `kind` of an error answer: one of [`ERROR_KINDS`].
struct ErrorKind;

impl PartialSchema for ErrorKind {
    fn schema() -> RefOr<Schema> {
        let mut table = String::from("What went wrong, and so the answer's status:\n\n");
        table += "| kind | status | when |\n|---|---|---|\n";
        for kind in ERROR_KINDS {
            table += &format!("| `{}` | {} | {} |\n", kind.name, kind.status, kind.meaning);
        }
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(table))
            .enum_values(Some(ERROR_KINDS.iter().map(|kind| kind.name)))
            .into()
    }
}

impl ToSchema for ErrorKind {}

/// The answers handlers build as JSON objects of their own making, described: only
/// their schemas are used, none is ever built.
#[expect(
    dead_code,
    reason = "the types describe answers; their fields are never read"
)]
mod answers {
    use serde_json::Value;
    use utoipa::ToSchema;
    use utoipa::openapi::schema::{ObjectBuilder, Type};

    use super::ErrorKind;
    use crate::metrics::MetricsSnapshot;
    use crate::pool::{PoolStatus, ZygoteStatus};

    /// An error answer.
    #[derive(ToSchema)]
    pub(super) struct ErrorBody {
        pub(super) error: ErrorDetails,
    }

    /// What went wrong: its kind and message, the request id, and the details that kind
    /// carries.
    #[derive(ToSchema)]
    pub(super) struct ErrorDetails {
        pub(super) kind: ErrorKind,
        /// What went wrong, for people (never a worker's stderr).
        pub(super) message: String,
        /// The request's id, as in `X-Request-Id` (absent in a `cause`, and when the
        /// `X-Request-Id` sent is refused).
        pub(super) request_id: Option<String>,
        /// The worker that served the call.
        pub(super) worker: Option<String>,
        /// The command.
        pub(super) command: Option<String>,
        /// The session.
        pub(super) session_id: Option<String>,
        /// `saturated`: callers already waiting.
        pub(super) queued: Option<u64>,
        /// `checkout_timeout`: how long the call waited for a worker.
        pub(super) waited_ms: Option<u64>,
        /// `request_timeout`: the timeout that expired.
        pub(super) timeout_ms: Option<u64>,
        /// `request_timeout`: whether the worker was killed (else only the call was
        /// cancelled).
        pub(super) worker_killed: Option<bool>,
        /// `worker_crashed`: how the worker ended, e.g. `exit status 3`.
        pub(super) status: Option<String>,
        /// `worker_error`: the exception's type, e.g. `ValueError`.
        pub(super) python_type: Option<String>,
        /// `worker_error`: the exception's message.
        pub(super) python_message: Option<String>,
        /// `worker_error`: the worker-side traceback, when sent.
        pub(super) traceback: Option<String>,
        /// `too_many_sessions`: the limit.
        pub(super) limit: Option<u64>,
        /// `journal_full`: entries in the journal.
        pub(super) entries: Option<u64>,
        /// `journal_full`: their size in bytes.
        pub(super) bytes: Option<u64>,
        /// `journal_full`: the limit on entries.
        pub(super) max_entries: Option<u64>,
        /// `journal_full`: the limit on bytes.
        pub(super) max_bytes: Option<u64>,
        /// `journal_full`: why the journal cannot be compacted.
        pub(super) reason: Option<String>,
        /// `session_rebuild_failed`: the position (from 0) of the journal entry whose replay
        /// failed.
        pub(super) entry: Option<u64>,
        /// `session_rebuild_failed`: that entry's command.
        pub(super) entry_command: Option<String>,
        /// `session_rebuild_failed`: the failure while replaying the journal.
        #[schema(no_recursion)]
        pub(super) cause: Option<Box<ErrorDetails>>,
    }

    /// A call's answer.
    #[derive(ToSchema)]
    pub(super) struct CallResult {
        /// What the command returned.
        pub(super) result: Value,
    }

    /// `DELETE /v1/calls/{request_id}`'s answer: the call is being cancelled.
    #[derive(ToSchema)]
    pub(super) struct CancelAccepted {
        /// The call's request id.
        pub(super) request_id: String,
        /// Always `true`.
        pub(super) cancelling: bool,
    }

    /// `DELETE /v1/sessions/{id}`'s answer.
    #[derive(ToSchema)]
    pub(super) struct ClosedSession {
        /// The closed session's id.
        pub(super) closed: String,
    }

    /// `GET /v1/commands`'s answer: the commands callers may send, in name order.
    #[derive(ToSchema)]
    pub(super) struct CommandList {
        pub(super) commands: Vec<ListedCommand>,
    }

    /// One command callers may send, with what the workers' manifest says about it.
    #[derive(ToSchema)]
    pub(super) struct ListedCommand {
        /// The name to call it by.
        pub(super) name: String,
        /// The first line of its handler's documentation.
        pub(super) doc: String,
        /// Its successful calls are journaled with their session.
        pub(super) mutates_session: bool,
        /// It may run beside other calls on one worker (an `async` handler).
        pub(super) concurrent: bool,
        /// It sends chunks before its result (a generator).
        pub(super) streams: bool,
        /// `DELETE /v1/calls/{request_id}` (or a disconnect) stops it early.
        pub(super) cancellable: bool,
        /// The JSON Schema of its `args`, or `null`; calls are not checked against it.
        pub(super) args_schema: Option<Value>,
    }

    /// `GET /v1/pool`'s answer: the node, its workers, queue and sessions, how workers are
    /// started, and the pool's totals.
    #[derive(ToSchema)]
    pub(super) struct PoolOverview {
        /// The node's name, `null` unless named.
        pub(super) node: Option<String>,
        #[serde(flatten)]
        pub(super) status: PoolStatus,
        /// How workers are started.
        pub(super) spawn: ZygoteStatus,
        /// Calls, errors, latencies and worker events since the pool started.
        pub(super) totals: MetricsSnapshot,
    }

    /// `GET /health`'s answer.
    #[derive(ToSchema)]
    pub(super) struct Health {
        /// `ready` (200); `starting`, `degraded` (no worker is ready), `shutting_down` or
        /// `failed` (the pool could not start) with 503.
        #[schema(schema_with = health_status)]
        pub(super) status: String,
        /// Workers ready (`ready`, and 0 with `degraded`).
        pub(super) workers: Option<u64>,
        /// `degraded`: why no worker is ready, e.g. the last start error.
        pub(super) reason: Option<String>,
        /// `degraded`: workers being started.
        pub(super) starting: Option<u64>,
    }

    /// `GET /health`'s `status`.
    fn health_status() -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([
                "ready",
                "starting",
                "degraded",
                "shutting_down",
                "failed",
            ]))
    }
}

/// Who may call a route when the server has tokens.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    /// Anyone: the route holds no data.
    Public,
    /// A client (the client token, or the admin token).
    Client,
    /// The operator (the admin token; the client token when there is none).
    Admin,
}

const CLIENT_TOKEN: &str = "client_token";
const ADMIN_TOKEN: &str = "admin_token";

impl Access {
    fn security(self) -> Vec<SecurityRequirement> {
        let token = |name| SecurityRequirement::new(name, Vec::<String>::new());
        match self {
            Access::Public => Vec::new(),
            Access::Client => vec![token(CLIENT_TOKEN), token(ADMIN_TOKEN)],
            Access::Admin => vec![token(ADMIN_TOKEN)],
        }
    }
}

/// Adds the operations and the tokens to the document.
struct Routes;

impl Modify for Routes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, method, operation) in operations() {
            openapi
                .paths
                .add_path_operation(path, vec![method], operation);
        }
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        let components = ComponentsBuilder::from(openapi.components.take().unwrap_or_default());
        openapi.components = Some(
            components
                .security_scheme(
                    CLIENT_TOKEN,
                    bearer(
                        "The client token (`--token`, `SNAKEPOOL_TOKEN`): opens the client \
                         routes, and the operator's too unless there is an admin token.",
                    ),
                )
                .security_scheme(
                    ADMIN_TOKEN,
                    bearer(
                        "The operator's token (`--admin-token`, `SNAKEPOOL_ADMIN_TOKEN`): opens \
                         every route. Without one, the client token opens the operator's routes.",
                    ),
                )
                .header(
                    REQUEST_ID,
                    HeaderBuilder::new()
                        .schema(Some(request_id_schema()))
                        .description(Some(
                            "The request's id: the client's own `X-Request-Id`, or 128 random \
                             bits. It names the call for `DELETE /v1/calls/{request_id}`.",
                        ))
                        .build(),
                )
                .header(
                    RETRY_AFTER,
                    HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(0)),
                        ))
                        .description(Some("Seconds to wait before trying again."))
                        .build(),
                )
                .header(
                    SESSION_STATE,
                    HeaderBuilder::new()
                        .schema(Some(schema_ref::<SessionState>()))
                        .description(Some(
                            "A session call's session: `created` by this call (a new id, or one \
                             closed before), `resumed`, or `rebuilt` from its journal.",
                        ))
                        .build(),
                )
                .header(
                    WWW_AUTHENTICATE,
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                        .description(Some("`Bearer`."))
                        .build(),
                )
                .schema(SessionState::name(), SessionState::schema())
                .build(),
        );
    }
}

const REQUEST_ID: &str = "X-Request-Id";
const RETRY_AFTER: &str = "Retry-After";
const SESSION_STATE: &str = "X-Session-State";
const WWW_AUTHENTICATE: &str = "WWW-Authenticate";

fn header_ref(name: &str) -> Ref {
    Ref::new(format!("#/components/headers/{name}"))
}

fn schema_ref<T: ToSchema>() -> Ref {
    Ref::from_schema_name(T::name())
}

/// A request id a client may choose.
fn request_id_schema() -> ObjectBuilder {
    let (shortest, longest) = CLIENT_REQUEST_ID_BYTES.into_inner();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!("^[A-Za-z0-9_-]{{{shortest},{longest}}}$")))
}

fn string_schema(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

fn json_content<T: ToSchema>() -> Content {
    ContentBuilder::new()
        .schema(Some(schema_ref::<T>()))
        .build()
}

fn json_answer<T: ToSchema>(description: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", json_content::<T>())
}

fn text_answer(description: &str, media_type: &str, body: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        media_type,
        ContentBuilder::new()
            .schema(Some(string_schema(body)))
            .build(),
    )
}

fn path_parameter(name: &str, description: &str) -> ParameterBuilder {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
}

/// An operation's common part: its id, tag, summary, description and tokens.
fn operation(
    id: &str,
    tag: &str,
    summary: &str,
    description: &str,
    access: Access,
) -> OperationBuilder {
    OperationBuilder::new()
        .operation_id(Some(id))
        .tag(tag)
        .summary(Some(summary))
        .description(Some(description))
        .securities(Some(access.security()))
}

/// Finishes an operation: the `X-Request-Id` it may be sent, the error answers of the
/// `errors` kinds (plus `bad_request`, and `unauthorized` unless it is public), and the
/// `X-Request-Id` every answer carries.
fn finish(operation: OperationBuilder, access: Access, errors: &[&str]) -> Operation {
    let mut kinds: Vec<&str> = errors.to_vec();
    kinds.push("bad_request");
    if access != Access::Public {
        kinds.push("unauthorized");
    }
    let mut by_status: BTreeMap<u16, Vec<&Kind>> = BTreeMap::new();
    for name in kinds {
        let kind = error_kind(name);
        by_status.entry(kind.status).or_default().push(kind);
    }
    let mut operation = operation.parameter(
        ParameterBuilder::new()
            .name(REQUEST_ID)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "The id to give the request (else the server draws one): make it \
                 unguessable, as knowing it allows cancelling the call.",
            ))
            .schema(Some(request_id_schema())),
    );
    for (status, kinds) in by_status {
        let mut description = String::from("An error answer:\n");
        for kind in &kinds {
            description += &format!("- `{}`: {}\n", kind.name, kind.meaning);
        }
        let mut answer = json_answer::<ErrorBody>(&description);
        let session_moved = kinds.iter().any(|kind| kind.name == "session_moved");
        if matches!(status, 429 | 503) || session_moved {
            answer = answer.header_ref(RETRY_AFTER, header_ref(RETRY_AFTER));
        }
        if status == 401 {
            answer = answer.header_ref(WWW_AUTHENTICATE, header_ref(WWW_AUTHENTICATE));
        }
        operation = operation.response(status.to_string(), answer.build());
    }
    let mut operation = operation.build();
    for answer in operation.responses.responses.values_mut() {
        if let RefOr::T(answer) = answer {
            answer
                .headers
                .insert(REQUEST_ID.into(), RefOr::Ref(header_ref(REQUEST_ID)));
        }
    }
    operation
}

/// Every route [`super::router`] serves, as `(path, method, operation)`.
fn operations() -> Vec<(&'static str, HttpMethod, Operation)> {
    vec![
        ("/v1/call", HttpMethod::Post, call()),
        ("/v1/calls/{request_id}", HttpMethod::Delete, cancel_call()),
        ("/v1/commands", HttpMethod::Get, list_commands()),
        ("/v1/sessions/{id}", HttpMethod::Delete, close_session()),
        ("/v1/sessions", HttpMethod::Get, list_sessions()),
        ("/v1/sessions/{id}", HttpMethod::Get, session_info()),
        ("/v1/pool", HttpMethod::Get, pool_status()),
        ("/v1/pool/reload", HttpMethod::Post, reload()),
        ("/metrics", HttpMethod::Get, metrics()),
        ("/v1/dashboard/events", HttpMethod::Get, dashboard_events()),
        ("/health", HttpMethod::Get, health()),
        ("/openapi.json", HttpMethod::Get, openapi_document()),
        ("/", HttpMethod::Get, dashboard_page()),
    ]
}

fn call() -> Operation {
    let body = RequestBodyBuilder::new()
        .description(Some(
            "The command, its `args` (a JSON object, `{}` by default; never `session_id`), \
             the session to run it in (a session call) and the timeout in milliseconds \
             (clamped to the server's range; the server's default without one).",
        ))
        .required(Some(Required::True))
        .content("application/json", json_content::<CallBody>())
        .build();
    let events = "Server-Sent Events, once a worker has the call: `event: chunk` (data: a \
                  chunk, as JSON) for each chunk the command yields, then `event: result` \
                  (data: `{\"result\": ...}`) or `event: error` (data: an error answer, \
                  `{\"error\": {...}}`).";
    let answer = ResponseBuilder::new()
        .description(
            "The command's result; with `Accept: text/event-stream`, its chunks and result \
             as Server-Sent Events. A session call says in `X-Session-State` what it found \
             its session to be.",
        )
        .content("application/json", json_content::<CallResult>())
        .content(
            "text/event-stream",
            ContentBuilder::new()
                .schema(Some(string_schema(events)))
                .example(Some(Value::from(
                    "event: chunk\ndata: {\"step\":1}\n\nevent: result\ndata: {\"result\":42}\n\n",
                )))
                .build(),
        )
        .header_ref(SESSION_STATE, header_ref(SESSION_STATE));
    let operation = operation(
        "call",
        "calls",
        "Call a command",
        "Runs the command on a worker (on the session's worker for a session call) and \
         answers its result. A call refused before it starts answers a JSON error, even to a \
         client that asked for events. A client that disconnects cancels its call if the \
         command is cancellable; any other runs to completion.",
        Access::Client,
    )
    .request_body(Some(body))
    .parameter(
        ParameterBuilder::new()
            .name("X-Session-Id")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "The session id, instead of the body's `session_id` (so that a load balancer \
                 can route by it); it must agree with the body's if both are given.",
            ))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
    )
    .parameter(
        ParameterBuilder::new()
            .name("Accept")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "`text/event-stream` for Server-Sent Events; a JSON answer otherwise.",
            ))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .example(Some(Value::from("text/event-stream"))),
    )
    .response("200", answer.build());
    let errors = [
        UNAVAILABLE,
        &[
            "invalid_request",
            "body_too_large",
            "forbidden",
            "unknown_command",
            "duplicate_request_id",
            "saturated",
            "checkout_timeout",
            "request_timeout",
            "cancelled",
            "worker_crashed",
            "worker_error",
            "protocol",
            "too_many_sessions",
            "session_closed",
            "session_rebuild_failed",
            "journal_full",
            "journal_unavailable",
            "session_moved",
        ],
    ]
    .concat();
    finish(operation, Access::Client, &errors)
}

fn cancel_call() -> Operation {
    let operation = operation(
        "cancel_call",
        "calls",
        "Cancel a call in flight",
        "Cancels the call in flight under this request id; the call answers `499 cancelled`. \
         Only async and streaming commands can be cancelled: any other runs to completion.",
        Access::Client,
    )
    .parameter(path_parameter(
        "request_id",
        "The call's request id (its `X-Request-Id`).",
    ))
    .response(
        "202",
        json_answer::<CancelAccepted>("The call is being cancelled.").build(),
    );
    finish(
        operation,
        Access::Client,
        &["call_not_found", "not_cancellable"],
    )
}

fn list_commands() -> Operation {
    let operation = operation(
        "list_commands",
        "calls",
        "List the commands",
        "The commands callers may send, in name order, with what the workers' manifest says \
         about each; internal commands are not listed.",
        Access::Client,
    )
    .response("200", json_answer::<CommandList>("The commands.").build());
    finish(operation, Access::Client, UNAVAILABLE)
}

fn session_parameter() -> ParameterBuilder {
    path_parameter("id", "The session's id.")
}

/// The kinds of a route that finds a session.
fn session_errors() -> Vec<&'static str> {
    [
        UNAVAILABLE,
        &["session_not_found", "journal_unavailable", "session_moved"],
    ]
    .concat()
}

fn close_session() -> Operation {
    let operation = operation(
        "close_session",
        "sessions",
        "Close a session",
        "Closes the session, in memory or only in the journal store; its id is free at once: \
         a later call opens a new, empty session.",
        Access::Client,
    )
    .parameter(session_parameter())
    .response(
        "200",
        json_answer::<ClosedSession>("The session is closed.").build(),
    );
    finish(operation, Access::Client, &session_errors())
}

fn list_sessions() -> Operation {
    let limit = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(MAX_SESSIONS_PAGE as u64))
        .default(Some(Value::from(DEFAULT_SESSIONS_PAGE)));
    let operation = operation(
        "list_sessions",
        "sessions",
        "List the sessions in memory",
        "Up to `limit` sessions in the pool's memory whose ids come after `after`, in id \
         order; `next_after` names the next page's `after` (`null` at the end). Other query \
         parameters are refused.",
        Access::Admin,
    )
    .parameter(
        ParameterBuilder::new()
            .name("limit")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some("The most sessions to answer."))
            .schema(Some(limit)),
    )
    .parameter(
        ParameterBuilder::new()
            .name("after")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some("Answer the sessions whose ids come after this one."))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
    )
    .response(
        "200",
        json_answer::<SessionPage>("One page of sessions.").build(),
    );
    let errors = [UNAVAILABLE, &["invalid_request"]].concat();
    finish(operation, Access::Admin, &errors)
}

fn session_info() -> Operation {
    let operation = operation(
        "session_info",
        "sessions",
        "Describe a session",
        "One open session, in memory or (evicted) only in the journal store.",
        Access::Admin,
    )
    .parameter(session_parameter())
    .response("200", json_answer::<SessionInfo>("The session.").build());
    finish(operation, Access::Admin, &session_errors())
}

fn pool_status() -> Operation {
    let operation = operation(
        "pool_status",
        "operator",
        "Describe the pool",
        "The node's name, each worker (id, pid, state, calls served, memory, sessions), the \
         queue, the zygote and the pool's totals.",
        Access::Admin,
    )
    .response("200", json_answer::<PoolOverview>("The pool.").build());
    finish(operation, Access::Admin, UNAVAILABLE)
}

fn reload() -> Operation {
    let operation = operation(
        "reload",
        "operator",
        "Reload the handler code",
        "A new zygote imports the code as it is now, then the workers are replaced one at a \
         time, each new one started before its predecessor retires; no call fails. If the new \
         code does not import or a worker running it cannot start, the reload stops and the \
         workers not yet replaced serve on.",
        Access::Admin,
    )
    .response(
        "200",
        json_answer::<ReloadReport>("The code is reloaded.").build(),
    );
    let errors = [UNAVAILABLE, &["reload_failed"]].concat();
    finish(operation, Access::Admin, &errors)
}

fn metrics() -> Operation {
    let operation = operation(
        "metrics",
        "operator",
        "Prometheus metrics",
        "Calls, errors by kind, worker starts, crashes and recycles, latency and queue-wait \
         histograms, and worker, queue and session gauges, in the OpenMetrics text format.",
        Access::Admin,
    )
    .response(
        "200",
        text_answer(
            "The metrics.",
            "application/openmetrics-text",
            "OpenMetrics text (version 1.0.0).",
        )
        .build(),
    );
    finish(operation, Access::Admin, &[])
}

fn dashboard_events() -> Operation {
    let events = "Server-Sent Events: `history` (the samples and worker events kept), the \
                  latest `snapshot`, then a `snapshot` every second (workers, queue, sessions, \
                  totals and that second's sample) and a `worker` event as each happens, until \
                  the client leaves or the server drains. Each event's data is JSON.";
    let operation = operation(
        "dashboard_events",
        "dashboard",
        "The dashboard's stream",
        "What the dashboard shows, as it happens.",
        Access::Admin,
    )
    .response(
        "200",
        text_answer("The stream.", "text/event-stream", events).build(),
    );
    let errors = [UNAVAILABLE, &["too_many_streams"]].concat();
    finish(operation, Access::Admin, &errors)
}

fn health() -> Operation {
    let operation = operation(
        "health",
        "service",
        "Whether the server can take calls",
        "Ready with at least one worker ready; otherwise why not.",
        Access::Public,
    )
    .response(
        "200",
        json_answer::<Health>("Ready: `{\"status\": \"ready\", \"workers\": N}`.").build(),
    )
    .response(
        "503",
        json_answer::<Health>(
            "Not ready: `starting`, `degraded` (with the reason), `shutting_down` or `failed`.",
        )
        .header_ref(RETRY_AFTER, header_ref(RETRY_AFTER))
        .build(),
    );
    finish(operation, Access::Public, &[])
}

fn openapi_document() -> Operation {
    let operation = operation(
        "openapi",
        "service",
        "This document",
        "The HTTP API as an OpenAPI 3.1 document.",
        Access::Public,
    )
    .response(
        "200",
        ResponseBuilder::new()
            .description("The document.")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                    .build(),
            )
            .build(),
    );
    finish(operation, Access::Public, &[])
}

fn dashboard_page() -> Operation {
    let operation = operation(
        "dashboard_page",
        "dashboard",
        "The live dashboard",
        "One page, its style and script built in; it reads `GET /v1/dashboard/events` with \
         the token from the URL fragment (`/#token=...`) or asks for it.",
        Access::Public,
    )
    .response(
        "200",
        text_answer("The page.", "text/html", "The dashboard's HTML page.").build(),
    );
    finish(operation, Access::Public, &[])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Error;
    use crate::server::{ServerState, status_for};

    /// One error of each variant.
    fn every_error() -> Vec<Error> {
        let text = || String::from("x");
        let crashed = Error::WorkerCrashed {
            worker: text(),
            command: text(),
            status: text(),
            stderr_tail: text(),
        };
        vec![
            Error::Saturated { queued: 1 },
            Error::CheckoutTimeout {
                waited: Duration::from_secs(1),
            },
            Error::RequestTimeout {
                worker: text(),
                command: text(),
                timeout: Duration::from_secs(1),
                killed: true,
            },
            Error::Cancelled {
                worker: text(),
                command: text(),
            },
            crashed.clone(),
            Error::WorkerError {
                worker: text(),
                command: text(),
                kind: text(),
                message: text(),
                traceback: None,
            },
            Error::UnknownCommand {
                worker: text(),
                command: text(),
                message: text(),
            },
            Error::Protocol {
                worker: text(),
                command: text(),
                detail: text(),
            },
            Error::StartupFailed {
                worker: text(),
                reason: text(),
                stderr_tail: text(),
            },
            Error::InvalidRequest {
                command: text(),
                reason: text(),
            },
            Error::UnexpectedResult {
                command: text(),
                reason: text(),
            },
            Error::Forbidden { command: text() },
            Error::TooManySessions { limit: 1 },
            Error::InvalidConfig {
                setting: "x",
                reason: text(),
            },
            Error::SessionClosed { session_id: text() },
            Error::SessionRebuildFailed {
                session_id: text(),
                entry: None,
                entry_command: None,
                source: Box::new(crashed),
            },
            Error::JournalFull {
                session_id: text(),
                entries: 1,
                bytes: 1,
                max_entries: 1,
                max_bytes: 1,
                reason: text(),
            },
            Error::JournalUnavailable {
                session_id: text(),
                reason: text(),
            },
            Error::SessionMoved {
                session_id: text(),
                reason: text(),
            },
            Error::ReloadFailed { reason: text() },
            Error::ShuttingDown,
        ]
    }

    #[test]
    fn every_error_kind_is_documented_with_its_status() {
        for error in every_error() {
            // Fails to compile when a variant is added: give it a sample above.
            match &error {
                Error::Saturated { .. }
                | Error::CheckoutTimeout { .. }
                | Error::RequestTimeout { .. }
                | Error::Cancelled { .. }
                | Error::WorkerCrashed { .. }
                | Error::WorkerError { .. }
                | Error::UnknownCommand { .. }
                | Error::Protocol { .. }
                | Error::StartupFailed { .. }
                | Error::InvalidRequest { .. }
                | Error::UnexpectedResult { .. }
                | Error::Forbidden { .. }
                | Error::TooManySessions { .. }
                | Error::InvalidConfig { .. }
                | Error::SessionClosed { .. }
                | Error::SessionRebuildFailed { .. }
                | Error::JournalFull { .. }
                | Error::JournalUnavailable { .. }
                | Error::SessionMoved { .. }
                | Error::ReloadFailed { .. }
                | Error::ShuttingDown => {}
            }
            assert_eq!(
                error_kind(error.kind()).status,
                status_for(&error).as_u16(),
                "{}",
                error.kind()
            );
        }
    }

    #[test]
    fn every_refusal_kind_is_documented() {
        let mut kinds = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/server"
        ))];
        let mut files = Vec::new();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|ext| ext == "rs") {
                    files.push(path);
                }
            }
        }
        for path in files {
            let source = std::fs::read_to_string(&path).unwrap();
            for (at, call) in source.match_indices("refusal(") {
                let first_argument = source[at + call.len()..].trim_start();
                let Some(literal) = first_argument.strip_prefix('"') else {
                    continue;
                };
                let kind = literal.split('"').next().unwrap();
                // A kind, not this test's own search.
                if kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    kinds.push(kind.to_owned());
                }
            }
        }
        assert!(kinds.iter().any(|kind| kind == "unauthorized"), "{kinds:?}");
        let unavailable = |state: &ServerState| {
            let Err(unavailable) = state.serving_pool() else {
                panic!("the pool serves");
            };
            unavailable.kind.to_owned()
        };
        let state = ServerState::starting();
        kinds.push(unavailable(&state));
        state.failed("x".into());
        kinds.push(unavailable(&state));
        state.drain();
        kinds.push(unavailable(&state));
        for kind in &kinds {
            error_kind(kind);
        }
        for kind in UNAVAILABLE {
            assert!(kinds.iter().any(|k| k == kind), "{kind}");
        }
    }
}
