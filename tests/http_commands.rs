//! `GET /v1/commands`: the commands callers may send, with their argument schemas.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{ServeProcess, spawn_serve};
use reqwest::StatusCode;
use serde_json::{Value, json};

const INTERNAL: [&str; 4] = [
    "shutdown",
    "cleanup_session",
    "snapshot_session",
    "restore_session",
];

const DSPY_COMMANDS: [&str; 10] = [
    "configure_lm",
    "create_program",
    "execute_program",
    "optimize_program",
    "dump_program_state",
    "load_program_state",
    "list_programs",
    "get_program_info",
    "delete_program",
    "reset_state",
];

/// Stops a `snakepool serve` process as an operator would (SIGTERM) and waits for it.
fn stop(mut serve: ServeProcess) {
    let pid = i32::try_from(serve.child.id()).unwrap();
    // SAFETY: `kill` only sends a signal to the child this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    while serve.child.try_wait().unwrap().is_none() {
        if started.elapsed() > common::WAIT {
            serve.child.kill().unwrap();
            serve.child.wait().unwrap();
            panic!("serve did not stop within {:?} of SIGTERM", common::WAIT);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn get(client: &reqwest::Client, url: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = client.get(format!("{url}/v1/commands"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The listed command `name`.
fn command<'a>(commands: &'a [Value], name: &str) -> &'a Value {
    commands
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("`{name}` is not listed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_public_commands_with_their_schemas_in_name_order() {
    let serve = spawn_serve(&["--module", "snakepool_worker.dspy"]);
    let (status, body) = get(&reqwest::Client::new(), &serve.url, None).await;
    stop(serve);
    assert_eq!(status, StatusCode::OK, "{body}");
    let commands = body["commands"].as_array().unwrap();
    let names: Vec<&str> = commands
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    for name in INTERNAL {
        assert!(!names.contains(&name), "internal `{name}` is listed");
    }
    for name in DSPY_COMMANDS
        .iter()
        .chain(&["ping", "get_stats", "echo", "set_value"])
    {
        assert!(names.contains(name), "`{name}` is missing from {names:?}");
    }
    for listed in commands {
        let keys: BTreeSet<&str> = listed
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let expected = [
            "args_schema",
            "cancellable",
            "concurrent",
            "doc",
            "mutates_session",
            "name",
            "streams",
        ];
        assert_eq!(keys, BTreeSet::from(expected), "{listed}");
    }

    let ping = command(commands, "ping");
    assert_eq!(ping["mutates_session"], false);
    assert!(ping["doc"].as_str().unwrap().starts_with("Liveness check"));
    assert_eq!(ping["args_schema"]["type"], "object");
    assert_eq!(
        ping["args_schema"]["properties"]["manifest"]["type"],
        "boolean"
    );

    // The fixture's own schemas, as declared; a command without one has null.
    let set_value = command(commands, "set_value");
    assert_eq!(set_value["mutates_session"], true);
    assert_eq!(
        set_value["doc"],
        "Store args.key = args.value in the session."
    );
    assert_eq!(
        set_value["args_schema"]["required"],
        json!(["key", "value"])
    );
    assert_eq!(
        set_value["args_schema"]["properties"]["key"]["type"],
        "string"
    );
    assert_eq!(
        command(commands, "sleep")["args_schema"]["properties"]["seconds"]["minimum"],
        0
    );
    assert_eq!(command(commands, "echo")["args_schema"], Value::Null);
    assert_eq!(command(commands, "sleep")["cancellable"], false);

    for name in DSPY_COMMANDS {
        let schema = &command(commands, name)["args_schema"];
        assert_eq!(schema["type"], "object", "{name}");
        assert_eq!(schema["additionalProperties"], false, "{name}");
        let properties = schema["properties"].as_object().unwrap();
        for required in schema["required"].as_array().into_iter().flatten() {
            assert!(
                properties.contains_key(required.as_str().unwrap()),
                "{name}"
            );
        }
    }
    let create = command(commands, "create_program");
    assert_eq!(create["mutates_session"], true);
    assert_eq!(create["args_schema"]["required"], json!(["signature"]));
    assert_eq!(
        create["args_schema"]["properties"]["type"]["enum"],
        json!(["predict", "chain_of_thought"])
    );
    let optimize = &command(commands, "optimize_program")["args_schema"];
    assert_eq!(
        optimize["properties"]["optimizer"]["enum"],
        json!(["bootstrap_few_shot", "labeled_few_shot"])
    );
    assert_eq!(optimize["required"], json!(["program_id", "trainset"]));
    let execute = command(commands, "execute_program");
    assert_eq!(execute["concurrent"], true);
    assert_eq!(execute["streams"], true);
    assert_eq!(execute["cancellable"], true);
    assert_eq!(execute["mutates_session"], false);
    assert_eq!(
        command(commands, "list_programs")["args_schema"]["properties"],
        json!({})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_the_client_token_when_the_server_has_one() {
    let serve = spawn_serve(&["--token", "client-tok", "--admin-token", "admin-tok"]);
    let client = reqwest::Client::new();
    let refused = get(&client, &serve.url, None).await;
    let wrong = get(&client, &serve.url, Some("other")).await;
    let client_token = get(&client, &serve.url, Some("client-tok")).await;
    let admin_token = get(&client, &serve.url, Some("admin-tok")).await;
    stop(serve);
    for (status, body) in [refused, wrong] {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["kind"], "unauthorized");
    }
    // A client route: the client token opens it, and so does the admin token.
    for (status, body) in [client_token, admin_token] {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body["commands"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "echo")
        );
    }
}
