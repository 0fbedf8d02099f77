//! Streaming and cancelling over HTTP: `POST /v1/call` with `Accept: text/event-stream`
//! answers Server-Sent Events as the handler yields; `DELETE /v1/calls/{request_id}`
//! cancels a call in flight (the id comes in the answer's headers as the call starts,
//! or the client names the call); a client that leaves cancels its call.

mod common;

use common::{WAIT, builder, serve_in_process, wait_until_async};
use reqwest::StatusCode;
use serde_json::{Value, json};
use snakepool::Pool;
use snakepool::server::ServerOptions;

struct Server {
    url: String,
    pool: Pool,
    client: reqwest::Client,
}

impl Server {
    async fn start() -> Server {
        let pool = builder(1)
            .module("async_handlers")
            .max_concurrency(8)
            .start()
            .await
            .unwrap();
        Server {
            url: serve_in_process(&pool, &ServerOptions::default()).await,
            pool,
            client: reqwest::Client::new(),
        }
    }

    fn post(&self, body: Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/call", self.url))
            .json(&body)
    }

    async fn stream(&self, body: Value) -> reqwest::Response {
        self.post(body)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap()
    }

    async fn cancel(&self, request_id: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .delete(format!("{}/v1/calls/{request_id}", self.url))
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn call(&self, command: &str) -> Value {
        self.pool.call(command, json!({})).await.unwrap()
    }
}

/// Server-Sent Events as they arrive: `(event, data)`.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    fn new(response: reqwest::Response) -> Events {
        let kind = response.headers()["content-type"].to_str().unwrap();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        Events {
            response,
            buffer: String::new(),
        }
    }

    /// The next event; `None` at the end of the body.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("the event stream stalled")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every remaining event.
    async fn rest(&mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_answered_with_chunk_events_then_the_result() {
    let server = Server::start().await;
    let response = server
        .stream(json!({"command": "count", "args": {"n": 20}}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    assert_eq!(id.len(), 32, "128 random bits: {id}");
    let events = Events::new(response).rest().await;
    let (chunks, last) = events.split_at(20);
    for (n, (name, data)) in chunks.iter().enumerate() {
        assert_eq!((name.as_str(), data), ("chunk", &json!({"n": n})));
    }
    assert_eq!(last[0].0, "result");
    assert_eq!(last[0].1["result"]["total"], 20);
    assert_eq!(last.len(), 1);

    // A failure mid-stream ends it with an error event shaped as the JSON error body.
    let response = server
        .stream(json!({"command": "count", "args": {"n": 5, "fail_at": 2}}))
        .await;
    let id = request_id(&response);
    let events = Events::new(response).rest().await;
    assert_eq!(events.len(), 3, "{events:?}");
    let (name, data) = &events[2];
    assert_eq!(name, "error");
    assert_eq!(data["error"]["kind"], "worker_error");
    assert_eq!(data["error"]["python_type"], "ValueError");
    assert_eq!(data["error"]["request_id"], json!(id));

    // Refused before it starts: a plain JSON error with its status.
    let response = server.stream(json!({"command": "shutdown"})).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "forbidden");

    // A session streams too, and its calls stay in order.
    let response = server
        .stream(json!({"command": "tally", "session_id": "s1", "args": {"add": 4}}))
        .await;
    let events = Events::new(response).rest().await;
    assert_eq!(events[0], ("chunk".to_owned(), json!(0)));
    assert_eq!(events[1], ("result".to_owned(), json!({"result": 4})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_a_stream_by_the_id_in_its_headers() {
    let server = Server::start().await;
    let response = server
        .stream(json!({"command": "count", "args": {"n": 1000, "delay": 0.02, "tag": "del"}}))
        .await;
    let id = request_id(&response);
    let mut events = Events::new(response);
    assert_eq!(events.next().await.unwrap().0, "chunk");
    let (status, body) = server.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let rest = events.rest().await;
    let (name, data) = rest.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["kind"], "cancelled");
    assert_eq!(server.call("cancelled").await, json!(["del"]));
    // Gone once it ended.
    let (status, body) = server.cancel(&id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["kind"], "call_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_a_json_call_named_by_its_client() {
    let server = Server::start().await;
    let name = "my-call-0123456789abcdef";
    let call = {
        let request = server
            .post(json!({"command": "nap", "args": {"seconds": 30, "tag": "named"}}))
            .header("x-request-id", name);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    wait_until_async("the nap to run on the worker", WAIT, || async {
        server.call("napping").await == json!(["named"])
    })
    .await;
    // Another call may not take the same name while it runs.
    let duplicate = server
        .post(json!({"command": "nap", "args": {"seconds": 0}}))
        .header("x-request-id", name)
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    let (status, _) = server.cancel(name).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let response = call.await.unwrap();
    assert_eq!(response.status().as_u16(), 499);
    assert_eq!(request_id(&response), name);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "cancelled");
    assert_eq!(body["error"]["request_id"], name);

    // Names a client may not choose.
    for bad in ["short", &"x".repeat(129), "has space in it 0123"] {
        let response = server
            .post(json!({"command": "nap", "args": {"seconds": 0}}))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_call_is_not_cancellable_and_runs_to_completion() {
    let server = Server::start().await;
    let name = "sync-call-0123456789abcdef";
    let call = {
        let request = server
            .post(json!({"command": "sleep_sync", "args": {"seconds": 0.5}}))
            .header("x-request-id", name);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    wait_until_async("the sync call to be in flight", WAIT, || async {
        let response = server
            .client
            .delete(format!("{}/v1/calls/{name}", server.url))
            .send()
            .await
            .unwrap();
        response.status() == StatusCode::CONFLICT
    })
    .await;
    let response = call.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"]["slept"], 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_call() {
    let server = Server::start().await;
    // A stream whose reader hangs up.
    let response = server
        .stream(json!({"command": "count", "args": {"n": 1000, "delay": 0.02, "tag": "sse"}}))
        .await;
    let mut events = Events::new(response);
    assert_eq!(events.next().await.unwrap().0, "chunk");
    drop(events);
    wait_until_async("the stream to be cancelled", WAIT, || async {
        server.call("cancelled").await == json!(["sse"])
    })
    .await;
    // A JSON call whose client hangs up.
    let call = {
        let request =
            server.post(json!({"command": "nap", "args": {"seconds": 30, "tag": "json"}}));
        tokio::spawn(async move { request.send().await })
    };
    wait_until_async("the nap to run on the worker", WAIT, || async {
        server.call("napping").await == json!(["json"])
    })
    .await;
    call.abort();
    wait_until_async("the nap to be cancelled", WAIT, || async {
        server.call("cancelled").await == json!(["sse", "json"])
    })
    .await;
    assert_eq!(server.pool.metrics().worker_crashes, 0);
}
