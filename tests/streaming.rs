//! Streaming calls: a generator's chunks reach the caller as they are yielded and the
//! call ends with its result; a slow reader slows the generator (the worker runs at
//! most a window ahead); dropping the stream or cancelling the call's token cancels
//! it on the worker, which serves on; a worker that streams past its credit is killed.

mod common;

use std::time::Duration;

use common::{WAIT, builder, pid_of, rogue, wait_until_async};
use futures::StreamExt;
use serde_json::{Value, json};
use snakepool::{CallOptions, CallStream, CancellationToken, Error, Pool, StreamEvent};

async fn pool() -> Pool {
    builder(1)
        .module("async_handlers")
        .max_concurrency(8)
        .start()
        .await
        .unwrap()
}

/// Every event of a stream, the error (if any) as the last.
async fn collect(mut stream: CallStream) -> (Vec<Value>, Result<Value, Error>) {
    let mut chunks = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream stalled")
    {
        match event {
            Ok(StreamEvent::Chunk(chunk)) => chunks.push(chunk),
            Ok(StreamEvent::Result(result)) => {
                assert!(stream.next().await.is_none(), "the result is the last item");
                return (chunks, Ok(result));
            }
            Err(error) => {
                assert!(stream.next().await.is_none(), "an error is the last item");
                return (chunks, Err(error));
            }
        }
    }
    panic!("the stream ended without a result or an error");
}

async fn produced(pool: &Pool, tag: &str) -> u64 {
    let value = pool.call("produced", json!({"tag": tag})).await.unwrap();
    value.as_u64().unwrap()
}

async fn cancelled(pool: &Pool) -> Value {
    pool.call("cancelled", json!({})).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generators_stream_their_chunks_then_their_result() {
    let pool = pool().await;
    let stream = pool
        .call_stream("count", json!({"n": 40, "tag": "whole"}))
        .await
        .unwrap();
    let (chunks, result) = collect(stream).await;
    let expected: Vec<Value> = (0..40).map(|n| json!({"n": n})).collect();
    assert_eq!(
        chunks, expected,
        "every chunk, in order, past several windows"
    );
    assert_eq!(result.unwrap()["total"], 40);

    let stream = pool
        .call_stream("count_sync", json!({"n": 5}))
        .await
        .unwrap();
    let (chunks, result) = collect(stream).await;
    assert_eq!(chunks, [0, 1, 2, 3, 4].map(|n| json!(n)));
    assert_eq!(
        result.unwrap(),
        json!(10),
        "a sync generator returns its result"
    );

    // Called without streaming, a generator's chunks are dropped (and credited).
    let result = pool.call("count", json!({"n": 50})).await.unwrap();
    assert_eq!(result["total"], 50);
    let result = pool.call("count_sync", json!({"n": 50})).await.unwrap();
    assert_eq!(result, json!(1225));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_generator_a_window_ahead() {
    let pool = pool().await;
    let mut stream = pool
        .call_stream("count", json!({"n": 500, "tag": "slow"}))
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first, StreamEvent::Chunk(json!({"n": 0})));
    // The worker's window is 16 chunks: with one taken (and no credit yet, which
    // comes per half window), the generator stops within a window of what was read.
    wait_until_async("the generator to fill its window", WAIT, || async {
        produced(&pool, "slow").await >= 16
    })
    .await;
    for _ in 0..20 {
        // Other calls come and go on the worker meanwhile; the generator stays put.
        assert!(produced(&pool, "slow").await <= 17);
    }
    let (chunks, result) = collect(stream).await;
    assert_eq!(chunks.len(), 499);
    assert_eq!(result.unwrap()["total"], 500);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_the_generator_and_the_worker_serves_on() {
    let pool = pool().await;
    let pid = pool.status().workers[0].pid;
    let mut stream = pool
        .call_stream("count", json!({"n": 1000, "delay": 0.01, "tag": "left"}))
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_until_async("the generator to be cancelled", WAIT, || async {
        cancelled(&pool).await == json!(["left"])
    })
    .await;
    assert!(produced(&pool, "left").await < 1000);
    assert_eq!(
        pool.status().workers[0].pid,
        pid,
        "the worker was not killed"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_token_cancels_the_call_on_its_worker() {
    let pool = pool().await;
    let pid = pool.status().workers[0].pid;
    let token = CancellationToken::new();
    let call = {
        let pool = pool.clone();
        let options = CallOptions::default().cancel_on(token.clone());
        tokio::spawn(async move {
            pool.call_with("nap", json!({"seconds": 30, "tag": "token"}), options)
                .await
        })
    };
    wait_until_async("the nap to run on the worker", WAIT, || async {
        pool.call("napping", json!({})).await.unwrap() == json!(["token"])
    })
    .await;
    token.cancel();
    let error = call.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Cancelled { .. }), "{error:?}");
    assert_eq!(error.kind(), "cancelled");
    assert_eq!(cancelled(&pool).await, json!(["token"]));
    assert_eq!(pool.status().workers[0].pid, pid);
    assert_eq!(pool.metrics().worker_crashes, 0);

    // A sync command is not cancellable: it runs to completion.
    let token = CancellationToken::new();
    token.cancel();
    let options = CallOptions::default().cancel_on(token);
    let reply = pool
        .call_with("sync_pid", json!({}), options)
        .await
        .unwrap();
    assert_eq!(pid_of(&reply), pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_streams_in_order_and_journals_the_stream() {
    let pool = builder(2)
        .module("async_handlers")
        .max_concurrency(8)
        .start()
        .await
        .unwrap();
    let session = pool.session("streamer");
    let stream = session
        .call_stream("tally", json!({"add": 2}))
        .await
        .unwrap();
    // A call made after the stream started waits for it.
    let next = {
        let session = session.clone();
        tokio::spawn(async move { session.call("tally", json!({"add": 3})).await })
    };
    let (chunks, result) = collect(stream).await;
    assert_eq!((chunks, result.unwrap()), (vec![json!(0)], json!(2)));
    assert_eq!(next.await.unwrap().unwrap(), json!(5));

    // The stream was journaled: a rebuilt session has its tally.
    common::kill_session_worker(&pool, &session).await;
    let stream = session
        .call_stream("tally", json!({"add": 1}))
        .await
        .unwrap();
    let (chunks, result) = collect(stream).await;
    assert_eq!((chunks, result.unwrap()), (vec![json!(5)], json!(6)));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_streaming_past_its_credit_is_killed() {
    for window in ["2", "0"] {
        let pool = rogue(1, &format!("flood_chunks {window}"))
            .start()
            .await
            .unwrap();
        let pid = pool.status().workers[0].pid;
        let stream = pool.call_stream("stream", json!({})).await.unwrap();
        let (_, result) = collect(stream).await;
        let error = result.unwrap_err();
        assert!(
            matches!(&error, Error::Protocol { detail, .. } if detail.contains("credit")),
            "window {window}: {error:?}"
        );
        assert!(common::wait_gone(pid, Duration::from_secs(5)));
        pool.shutdown().await;
    }
}
