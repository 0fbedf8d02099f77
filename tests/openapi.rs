//! `GET /openapi.json`: the document is valid OpenAPI 3.1, names every route the router
//! registers and no other, and every operation in it answers on a live server as it
//! says: documented statuses, media types and headers, bodies that fit their schemas,
//! and the bearer tokens it names.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ServeProcess, spawn_serve};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every route `router()` registers. A route added there and not here fails
/// `every_route_is_documented`, and so does one missing from the document.
const ROUTES: &[&str] = &[
    "POST /v1/call",
    "DELETE /v1/calls/{request_id}",
    "GET /v1/commands",
    "DELETE /v1/sessions/{id}",
    "GET /v1/sessions",
    "GET /v1/sessions/{id}",
    "GET /v1/pool",
    "POST /v1/pool/reload",
    "GET /metrics",
    "GET /v1/dashboard/events",
    "GET /health",
    "GET /openapi.json",
    "GET /",
];

const CLIENT_TOKEN: &str = "openapi-client-token";
const ADMIN_TOKEN: &str = "openapi-admin-token";
/// The probe whose `X-Request-Id` is not one a client may choose.
const BAD_REQUEST_ID: &str = "a bad X-Request-Id";
/// The session the probes open, read and close.
const SESSION: &str = "openapi-probe-session";

/// A `snakepool serve` with both tokens, stopped (SIGTERM) when dropped.
struct Server(ServeProcess);

impl Server {
    fn start() -> Server {
        Server(spawn_serve(&[
            "--token",
            CLIENT_TOKEN,
            "--admin-token",
            ADMIN_TOKEN,
        ]))
    }

    fn url(&self) -> &str {
        &self.0.url
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let child = &mut self.0.child;
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: `kill` only sends a signal to the child this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > common::WAIT {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

async fn fetch_document(url: &str) -> Value {
    let response = reqwest::get(format!("{url}/openapi.json")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
    assert_eq!(content_type, "application/json");
    response.json().await.unwrap()
}

/// Runs `script` under the tests' Python with `input` as JSON on its stdin; `Err`
/// with what it wrote to stderr if it failed.
fn run_python(script: &str, input: &Value) -> Result<(), String> {
    let mut child = Command::new(common::python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        return Ok(());
    }
    Err(String::from_utf8_lossy(&output.stderr).into_owned())
}

const VALIDATE_DOCUMENT: &str = "
import json, sys
try:
    from openapi_spec_validator import validate
except ImportError as error:
    sys.exit(f'{error}: pip install -r python/requirements-dev.txt')
try:
    validate(json.load(sys.stdin))
except Exception as error:
    sys.exit(f'{type(error).__name__}: {error}')
";

/// Validates each check's `instance` against its `schema`, with the document's
/// components in reach of `$ref`, as OpenAPI 3.1 schemas.
const VALIDATE_ANSWERS: &str = "
import json, sys
from openapi_schema_validator import OAS31Validator
data = json.load(sys.stdin)
failures = []
for check in data['checks']:
    schema = dict(check['schema'], components=data['components'])
    for error in OAS31Validator(schema).iter_errors(check['instance']):
        path = '/'.join(str(p) for p in error.absolute_path)
        failures.append(f\"{check['label']}: {error.message} (at /{path})\")
sys.exit('\\n'.join(failures) if failures else 0)
";

/// Every `(METHOD, path)` of the document.
fn documented_routes(document: &Value) -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes
}

/// The routes registered in `src/server` (`.route("/path", get(...).post(...))`).
fn registered_routes() -> BTreeSet<String> {
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/server"
    ))];
    let mut routes = BTreeSet::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for (at, call) in source.match_indices(".route(\"") {
                let rest = &source[at + call.len()..];
                let (route, rest) = rest.split_once('"').unwrap();
                // The handlers: up to the parenthesis that closes `.route(`.
                let mut depth = 1;
                let end = rest
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '(' => 1,
                            ')' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map_or(rest.len(), |(i, _)| i);
                for method in ["get", "post", "put", "delete", "patch"] {
                    let handlers = &rest[..end];
                    let called = handlers.match_indices(&format!("{method}(")).any(|(i, _)| {
                        !handlers[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                    });
                    if called {
                        routes.insert(format!("{} {route}", method.to_uppercase()));
                    }
                }
            }
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_openapi_3_1() {
    let server = Server::start();
    let document = fetch_document(server.url()).await;
    let version = document["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1"), "{version}");
    if let Err(message) = run_python(VALIDATE_DOCUMENT, &document) {
        panic!("openapi-spec-validator rejects the document: {message}");
    }
    // The same document every time: it is built once.
    assert_eq!(fetch_document(server.url()).await, document);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented() {
    let server = Server::start();
    let document = fetch_document(server.url()).await;
    let listed: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    assert_eq!(listed.len(), ROUTES.len(), "a route is listed twice");
    let registered = registered_routes();
    assert_eq!(
        registered, listed,
        "the routes registered in src/server differ from ROUTES"
    );
    let documented = documented_routes(&document);
    let undocumented: Vec<&String> = listed.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&listed).collect();
    assert!(undocumented.is_empty(), "not documented: {undocumented:?}");
    assert!(unknown.is_empty(), "documented but not served: {unknown:?}");
}

/// Sends requests to a live server and checks each answer against the document.
struct Probe {
    client: reqwest::Client,
    url: String,
    document: Value,
    /// Bodies to validate against their documented schemas, at the end.
    checks: Vec<Value>,
}

/// What a server answered.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    /// The body, unless it is an event stream (never read to its end).
    body: Vec<u8>,
}

impl Probe {
    async fn new(url: &str) -> Probe {
        Probe {
            client: reqwest::Client::new(),
            url: url.to_owned(),
            document: fetch_document(url).await,
            checks: Vec::new(),
        }
    }

    /// The operations of the document, as `(method, path, operation)`.
    fn operations(&self) -> Vec<(String, String, Value)> {
        let mut operations = Vec::new();
        for (path, item) in self.document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                operations.push((method.to_uppercase(), path.clone(), operation.clone()));
            }
        }
        operations
    }

    /// `path` with sample values for its path parameters.
    fn url_of(&self, path: &str) -> String {
        let path = path
            .replace("{id}", SESSION)
            .replace("{request_id}", "openapi-probe-request-0001");
        assert!(
            !path.contains('{'),
            "no sample value for a parameter of {path}"
        );
        format!("{}{path}", self.url)
    }

    fn request(&self, method: &str, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let request = self.client.request(method, self.url_of(path));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let streams = headers
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
        let body = if streams {
            Vec::new()
        } else {
            response.bytes().await.unwrap().to_vec()
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Sends `request` for `method path` and checks the answer against the operation's
    /// documented answers; the answer.
    async fn check(
        &mut self,
        label: &str,
        method: &str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Answer {
        let answer = Self::send(request).await;
        let label = format!("{method} {path} ({label}, {})", answer.status);
        assert_ne!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{label}");
        assert!(
            answer.status != StatusCode::NOT_FOUND || !answer.body.is_empty(),
            "{label}: the router's bare 404, no such route"
        );
        let operation = &self.document["paths"][path][method.to_lowercase()];
        let documented = operation["responses"][answer.status.as_str()].clone();
        assert!(
            documented.is_object(),
            "{label}: the status is not documented"
        );
        // Only the answer refusing the client's own id goes without one.
        let refused_id = label.contains(BAD_REQUEST_ID);
        assert!(
            answer.headers.contains_key("x-request-id") || refused_id,
            "{label}: no X-Request-Id"
        );
        for (name, header) in documented["headers"].as_object().into_iter().flatten() {
            let Some(value) = answer.headers.get(name.as_str()) else {
                continue;
            };
            let value = value.to_str().unwrap();
            let schema = self.component(header)["schema"].clone();
            let instance = match schema["type"].as_str() {
                Some("integer") => json!(value.parse::<i64>().expect(&label)),
                _ => json!(value),
            };
            self.expect_fits(format!("{label} header {name}"), &schema, instance);
        }
        let content = &documented["content"];
        let Some(content_type) = answer.headers.get(reqwest::header::CONTENT_TYPE) else {
            assert!(answer.body.is_empty(), "{label}: a body without a type");
            return answer;
        };
        let essence = content_type.to_str().unwrap().split(';').next().unwrap();
        let media = &content[essence.trim()];
        assert!(
            media.is_object(),
            "{label}: `{essence}` is not documented ({content})"
        );
        if essence == "application/json" {
            let body: Value = serde_json::from_slice(&answer.body).expect(&label);
            self.expect_fits(label, &media["schema"], body);
        }
        answer
    }

    /// A header object, from the components if `value` refers to one.
    fn component<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value["$ref"].as_str() {
            Some(pointer) => self.document.pointer(&pointer[1..]).unwrap(),
            None => value,
        }
    }

    fn expect_fits(&mut self, label: String, schema: &Value, instance: Value) {
        self.checks
            .push(json!({"label": label, "schema": schema, "instance": instance}));
    }

    /// Validates the bodies and headers seen against their schemas.
    fn validate(&self) {
        let input = json!({"components": self.document["components"], "checks": self.checks});
        if let Err(failures) = run_python(VALIDATE_ANSWERS, &input) {
            panic!("answers that do not fit the document:\n{failures}");
        }
    }
}

/// A small valid body for an operation that takes one.
fn sample_body(method: &str, path: &str) -> Value {
    match (method, path) {
        ("POST", "/v1/call") => json!({"command": "echo", "args": {"n": 1}, "session_id": SESSION}),
        _ => json!({}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() {
    let server = Server::start();
    let mut probe = Probe::new(server.url()).await;
    let admin = Some(ADMIN_TOKEN);
    // A session for the session routes to find.
    let open = probe
        .request("POST", "/v1/call", admin)
        .json(&sample_body("POST", "/v1/call"));
    let opened = probe
        .check("open a session", "POST", "/v1/call", open)
        .await;
    assert_eq!(opened.status, StatusCode::OK);
    assert_eq!(opened.headers["x-session-state"], "created");

    for (method, path, operation) in probe.operations() {
        let body = operation
            .get("requestBody")
            .map(|_| sample_body(&method, &path));
        let mut request = probe.request(&method, &path, admin);
        if let Some(body) = &body {
            request = request.json(body);
        }
        probe
            .check("a valid request", &method, &path, request)
            .await;

        let request = probe
            .request(&method, &path, admin)
            .header("x-request-id", "short");
        let answer = probe.check(BAD_REQUEST_ID, &method, &path, request).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} {path}");

        if body.is_some() {
            let request = probe.request(&method, &path, admin).json(&json!({}));
            let answer = probe.check("an empty body", &method, &path, request).await;
            assert!(answer.status.is_client_error(), "{method} {path}");
        }
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            let Some(minimum) = parameter["schema"]["minimum"].as_i64() else {
                continue;
            };
            if parameter["in"] != "query" {
                continue;
            }
            let name = parameter["name"].as_str().unwrap();
            let url = format!("{}?{name}={}", probe.url_of(&path), minimum - 1);
            let request = probe
                .client
                .request(Method::from_bytes(method.as_bytes()).unwrap(), url)
                .bearer_auth(ADMIN_TOKEN);
            let label = format!("{name} below its minimum");
            let answer = probe.check(&label, &method, &path, request).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} {path}");
        }
    }

    // The call's other answers.
    let calls = [
        ("a Python exception", json!({"command": "fail"}), 422),
        (
            "an unknown command",
            json!({"command": "no_such_command"}),
            404,
        ),
        ("an internal command", json!({"command": "shutdown"}), 403),
        (
            "arguments not an object",
            json!({"command": "echo", "args": [1]}),
            400,
        ),
    ];
    for (label, body, status) in calls {
        let request = probe.request("POST", "/v1/call", admin).json(&body);
        let answer = probe.check(label, "POST", "/v1/call", request).await;
        assert_eq!(answer.status.as_u16(), status, "{label}");
    }
    let request = probe
        .request("POST", "/v1/call", admin)
        .header("accept", "text/event-stream")
        .json(&sample_body("POST", "/v1/call"));
    let answer = probe.check("events", "POST", "/v1/call", request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    assert!(answer.headers.contains_key("x-session-state"));

    probe.validate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokens_are_as_documented() {
    let server = Server::start();
    let mut probe = Probe::new(server.url()).await;
    let schemes = &probe.document["components"]["securitySchemes"];
    for scheme in ["client_token", "admin_token"] {
        assert_eq!(schemes[scheme]["type"], "http", "{scheme}");
        assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}");
    }
    for (method, path, operation) in probe.operations() {
        let accepted: Vec<&str> = operation["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} names no security"))
            .iter()
            .flat_map(|requirement| requirement.as_object().unwrap().keys())
            .map(String::as_str)
            .collect();
        let public = accepted.is_empty();
        let body = operation
            .get("requestBody")
            .map(|_| sample_body(&method, &path));
        for (token, name) in [
            (None, "no token"),
            (Some(CLIENT_TOKEN), "client_token"),
            (Some(ADMIN_TOKEN), "admin_token"),
        ] {
            let mut request = probe.request(&method, &path, token);
            if let Some(body) = &body {
                request = request.json(body);
            }
            let answer = probe.check(name, &method, &path, request).await;
            let opens = public || accepted.contains(&name);
            assert_eq!(
                answer.status == StatusCode::UNAUTHORIZED,
                !opens,
                "{method} {path} with {name}: {}",
                answer.status
            );
            if !opens {
                assert_eq!(answer.headers["www-authenticate"], "Bearer");
            }
        }
    }
    probe.validate();
}
