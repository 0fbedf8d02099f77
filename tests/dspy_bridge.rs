//! The DSPy bridge through the pool: the real `dspy.LM` client against an
//! OpenAI-compatible server on 127.0.0.1, optimized programs surviving a worker's
//! death, and sessions isolated from each other.

mod common;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{builder, kill_session_worker};
use serde::Deserialize;
use serde_json::{Value, json};
use snakepool::dspy::{Dspy, FieldType, Lm, Metric, Optimizer, ProgramKind, Signature};
use snakepool::lm_policy::LmProfile;
use snakepool::{Error, MemoryJournal};

/// One request the fake model server received: its Authorization header and body.
type SeenRequest = (Option<String>, Value);

/// What the fake model server saw.
#[derive(Clone, Default)]
struct Seen {
    requests: Arc<Mutex<Vec<SeenRequest>>>,
}

/// An OpenAI-compatible chat completion: answers every question with 42, in the
/// field format DSPy's ChatAdapter reads.
async fn chat_completions(
    State(seen): State<Seen>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    seen.requests.lock().unwrap().push((auth, body.clone()));
    let reply = common::chat_completion_reply(&body["model"]);
    (StatusCode::OK, Json(reply))
}

async fn start_fake_llm() -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), seen)
}

#[derive(Deserialize, Debug)]
struct Sum {
    answer: i64,
}

#[derive(Deserialize, Debug)]
struct Text {
    answer: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_runs_through_the_real_lm_client_against_a_local_server() {
    let (api_base, seen) = start_fake_llm().await;
    let pool = builder(1)
        .env("SP_TEST_API_KEY", "sk-local-test")
        .lm_profile(
            "local",
            LmProfile::new("openai/local-test-model")
                .api_base(api_base)
                .api_key_env("SP_TEST_API_KEY"),
        )
        .start()
        .await
        .unwrap();
    let dspy = Dspy::new(pool.session("remote"));
    dspy.configure_lm(&Lm::profile("local")).await.unwrap();
    let signature = Signature::new()
        .instructions("Answer the arithmetic question.")
        .input("question", FieldType::Str, "a question")
        .output("answer", FieldType::Int, "the number");
    let program = dspy
        .create_program(signature, ProgramKind::ChainOfThought)
        .await
        .unwrap();
    let prediction = program
        .call::<_, Sum>(&json!({"question": "What is 40 plus 2?"}))
        .await
        .unwrap();
    assert_eq!(prediction.outputs.answer, 42);
    assert_eq!(
        prediction.reasoning.as_deref(),
        Some("Forty plus two is forty-two.")
    );
    let usage = prediction.usage.expect("usage reported");
    assert_eq!(
        usage["openai/local-test-model"]["total_tokens"], 43,
        "{usage}"
    );

    let requests = seen.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let (auth, body) = &requests[0];
    assert_eq!(auth.as_deref(), Some("Bearer sk-local-test"));
    assert_eq!(body["model"], "local-test-model");
    let prompt = body["messages"].to_string();
    assert!(prompt.contains("What is 40 plus 2?"), "{prompt}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimized_program_keeps_its_optimization_after_its_worker_dies() {
    let pool = builder(2)
        .journal(Arc::new(MemoryJournal::default()))
        .start()
        .await
        .unwrap();
    let session = pool.session("optimizer");
    let dspy = Dspy::new(session.clone());
    dspy.configure_lm(&Lm::Dummy {
        answers: json!(vec![json!({"answer": "no idea"}); 20]),
        follow_examples: true,
    })
    .await
    .unwrap();
    let program = dspy
        .create_program("question -> answer", ProgramKind::Predict)
        .await
        .unwrap();
    let question = json!({"question": "What is the capital of Atlantis?"});
    let before = program.call::<_, Text>(&question).await.unwrap();
    assert_eq!(before.outputs.answer, "no idea");

    let trainset =
        [json!({"question": "What is the capital of Atlantis?", "answer": "Poseidonia"})];
    let report = program
        .optimize(
            &trainset,
            Optimizer::LabeledFewShot { k: 4 },
            Metric::ExactMatch,
        )
        .await
        .unwrap();
    assert_eq!(report.demos, 1);
    let optimized = program.call::<_, Text>(&question).await.unwrap();
    assert_eq!(optimized.outputs.answer, "Poseidonia");

    let commands: Vec<String> = pool
        .journal_entries("optimizer")
        .await
        .unwrap()
        .iter()
        .map(|e| e.command().to_owned())
        .collect();
    assert_eq!(
        commands,
        ["configure_lm", "create_program", "load_program_state"],
        "the optimizer's result is journaled, not its run"
    );

    let worker = session.worker_id().unwrap();
    kill_session_worker(&pool, &session).await;

    let rebuilt = program.call::<_, Text>(&question).await.unwrap();
    assert_eq!(
        rebuilt.outputs.answer, "Poseidonia",
        "optimized behaviour survived"
    );
    assert_ne!(session.worker_id().unwrap(), worker);
    assert_eq!(pool.metrics().session_rebuilds, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_on_one_worker_keep_their_own_lm_and_programs() {
    let pool = builder(1).start().await.unwrap();
    let one = Dspy::new(pool.session("one"));
    let two = Dspy::new(pool.session("two"));
    one.configure_lm(&Lm::dummy(vec![json!({"answer": "from one"}); 3]))
        .await
        .unwrap();
    two.configure_lm(&Lm::dummy(vec![json!({"answer": "from two"}); 3]))
        .await
        .unwrap();
    let p1 = one
        .create_program("question -> answer", ProgramKind::Predict)
        .await
        .unwrap();
    let p2 = two
        .create_program("question -> answer", ProgramKind::Predict)
        .await
        .unwrap();
    let q = json!({"question": "who are you?"});
    assert_eq!(
        p1.call::<_, Text>(&q).await.unwrap().outputs.answer,
        "from one"
    );
    assert_eq!(
        p2.call::<_, Text>(&q).await.unwrap().outputs.answer,
        "from two"
    );
    assert_eq!(one.list_programs().await.unwrap().len(), 1);
    assert_eq!(two.list_programs().await.unwrap().len(), 1);

    // A third session has no LM at all, whatever the others configured.
    let three = Dspy::new(pool.session("three"));
    let p3 = three
        .create_program("question -> answer", ProgramKind::Predict)
        .await
        .unwrap();
    match p3.call::<_, Text>(&q).await {
        Err(Error::WorkerError { kind, .. }) => assert_eq!(kind, "LMNotConfigured"),
        other => panic!("expected LMNotConfigured, got {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_program_calls_give_precise_errors_and_the_session_keeps_working() {
    let pool = builder(1).start().await.unwrap();
    let dspy = Dspy::new(pool.session("errors"));
    dspy.configure_lm(&Lm::dummy(vec![json!({"answer": "ok"}); 5]))
        .await
        .unwrap();
    let program = dspy
        .create_program("question, context -> answer", ProgramKind::Predict)
        .await
        .unwrap();
    let kind_of = |result: Result<snakepool::dspy::Prediction<Text>, Error>| match result {
        Err(Error::WorkerError { kind, message, .. }) => (kind, message),
        other => panic!("expected a worker error, got {other:?}"),
    };
    let (kind, message) = kind_of(program.call(&json!({"question": "q"})).await);
    assert_eq!(kind, "MissingInput");
    assert!(message.contains("context"), "{message}");
    let (kind, _) = kind_of(
        program
            .call(&json!({"question": "q", "context": "c", "extra": 1}))
            .await,
    );
    assert_eq!(kind, "UnknownInput");
    let (kind, _) = kind_of(dspy.program("prog_404").call(&json!({})).await);
    assert_eq!(kind, "ProgramNotFound");
    match dspy
        .create_program("question: tensor -> answer", ProgramKind::Predict)
        .await
    {
        Err(Error::WorkerError { kind, .. }) => assert_eq!(kind, "UnsupportedType"),
        other => panic!("expected UnsupportedType, got {other:?}"),
    }
    let ok = program
        .call::<_, Text>(&json!({"question": "q", "context": "c"}))
        .await
        .unwrap();
    assert_eq!(ok.outputs.answer, "ok");
    pool.shutdown().await;
}
