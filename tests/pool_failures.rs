//! Failures: each gives its exact error kind, and the pool serves afterwards.

mod common;

use std::time::Duration;

use common::{
    WAIT, any_busy, builder, kill9, pid_of, rogue, wait_for_event, wait_for_handler_pid, wait_until,
};
use serde_json::json;
use snakepool::{Error, PoolEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_worker_and_the_next_call_gets_a_new_one() {
    let pool = builder(1).start().await.unwrap();
    let old = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    let err = pool
        .call_with_timeout("sleep", json!({"seconds": 30}), Duration::from_millis(200))
        .await
        .unwrap_err();
    match &err {
        Error::RequestTimeout {
            command, timeout, ..
        } => {
            assert_eq!(command, "sleep");
            assert_eq!(*timeout, Duration::from_millis(200));
        }
        other => panic!("expected RequestTimeout, got {other:?}"),
    }
    let new = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    assert_ne!(old, new, "the timed-out worker was replaced");
    assert!(
        common::wait_gone(old, Duration::from_secs(10)),
        "the timed-out worker was killed"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_exit_in_a_handler_is_a_crash_with_status_and_stderr() {
    let pool = builder(1).start().await.unwrap();
    match pool.call("crash", json!({"code": 7})).await {
        Err(Error::WorkerCrashed {
            status,
            stderr_tail,
            command,
            ..
        }) => {
            assert_eq!(status, "exit status 7");
            assert_eq!(command, "crash");
            assert!(
                stderr_tail.contains("about to crash on purpose"),
                "{stderr_tail}"
            );
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    assert_eq!(
        pool.call("echo", json!({"a": 2})).await.unwrap(),
        json!({"a": 2})
    );
    assert_eq!(pool.metrics().worker_crashes, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_call_is_a_crash_and_the_pool_recovers() {
    let pool = builder(1).start().await.unwrap();
    // The handler names its own pid before it waits: only then has the call reached
    // its worker. (A worker killed between checkout and sending is not a crash of the
    // call: the pool sends the call to another worker instead.)
    let dir = tempfile::tempdir().unwrap();
    let call = {
        let pool = pool.clone();
        let args = json!({"dir": dir.path(), "n": 2, "limit_s": 30});
        tokio::spawn(async move { pool.call("rendezvous", args).await })
    };
    let pid = wait_for_handler_pid(dir.path()).await;
    assert!(
        pool.status()
            .workers
            .iter()
            .any(|w| w.pid == pid && w.state == "busy"),
        "the handler's pid {pid} is a busy worker of the pool: {:?}",
        pool.status().workers
    );
    kill9(pid);
    match call.await.unwrap() {
        Err(Error::WorkerCrashed { status, .. }) => {
            assert_eq!(status, "killed by signal 9 (SIGKILL)");
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    let new = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    assert_ne!(new, pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_killed_from_outside_is_replaced_without_failing_calls() {
    let pool = builder(2).start().await.unwrap();
    let mut events = pool.subscribe();
    let victim = pool.status().workers[0].pid;
    kill9(victim);
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid, .. } if *pid == victim),
    )
    .await;
    wait_for_event(&mut events, |e| matches!(e, PoolEvent::WorkerReady { .. })).await;
    for _ in 0..20 {
        let pid = pid_of(&pool.call("whoami", json!({})).await.unwrap());
        assert_ne!(pid, victim);
    }
    assert_eq!(
        pool.status().workers.len(),
        2,
        "the replacement rejoined the pool"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_from_a_worker_is_refused_and_the_worker_replaced() {
    // The worker announces a 3 GiB frame and sends nothing more: reading the body would
    // hang until the timeout; refusing it at the header fails the call at once.
    let pool = rogue(1, "oversized")
        .max_frame_bytes(1 << 20)
        .request_timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let old = pool.status().workers[0].pid;
    match pool.call("anything", json!({})).await {
        Err(Error::Protocol { detail, .. }) => {
            assert!(detail.contains("3221225472"), "{detail}");
            assert!(detail.contains("exceeds"), "{detail}");
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    wait_for_event(&mut events, |e| matches!(e, PoolEvent::WorkerReady { .. })).await;
    let pong = pool.call("ping", json!({})).await.unwrap();
    assert_ne!(pid_of(&pong), old);
    assert!(common::wait_gone(old, Duration::from_secs(10)));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_the_wrong_id_replaces_the_worker() {
    let pool = rogue(1, "wrong_id").start().await.unwrap();
    let old = pool.status().workers[0].pid;
    match pool.call("echo", json!({})).await {
        Err(Error::Protocol { detail, .. }) => {
            assert!(detail.contains("does not match"), "{detail}")
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    let pong = pool.call("ping", json!({})).await.unwrap();
    assert_ne!(
        pid_of(&pong),
        old,
        "no caller talks to the stale worker again"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_says_saturated_at_once() {
    let pool = builder(1).max_queue(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();
    // Occupy the worker until a second party arrives at the rendezvous.
    let busy = {
        let pool = pool.clone();
        let args = json!({"dir": gate, "n": 2, "limit_s": 20});
        tokio::spawn(async move { pool.call("rendezvous", args).await })
    };
    wait_until("the worker to be busy", WAIT, || any_busy(&pool)).await;
    let queued = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("echo", json!({"queued": true})).await })
    };
    wait_until("one caller to queue", WAIT, || pool.status().queued == 1).await;
    match pool.call("echo", json!({})).await {
        Err(Error::Saturated { queued }) => assert_eq!(queued, 1),
        other => panic!("expected Saturated, got {other:?}"),
    }
    // Release the busy worker: the rendezvous completes when a second file appears.
    std::fs::write(gate.join("releaser"), b"").unwrap();
    busy.await.unwrap().unwrap();
    assert_eq!(queued.await.unwrap().unwrap()["queued"], true);
    assert_eq!(pool.call("echo", json!({"n": 3})).await.unwrap()["n"], 3);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_leaves_nothing_queued() {
    let pool = builder(1)
        .checkout_timeout(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let busy = {
        let pool = pool.clone();
        let args = json!({"dir": dir.path(), "n": 2, "limit_s": 20});
        tokio::spawn(async move { pool.call("rendezvous", args).await })
    };
    wait_until("the worker to be busy", WAIT, || any_busy(&pool)).await;
    match pool.call("echo", json!({})).await {
        Err(Error::CheckoutTimeout { waited }) => assert!(waited >= Duration::from_millis(100)),
        other => panic!("expected CheckoutTimeout, got {other:?}"),
    }
    assert_eq!(pool.status().queued, 0);
    std::fs::write(dir.path().join("releaser"), b"").unwrap();
    busy.await.unwrap().unwrap();
    assert_eq!(pool.call("echo", json!({"n": 4})).await.unwrap()["n"], 4);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_at_start_gives_a_startup_error_with_its_stderr() {
    let err = rogue(2, "die_at_start").start().await.unwrap_err();
    match err {
        Error::StartupFailed {
            reason,
            stderr_tail,
            ..
        } => {
            assert!(reason.contains("exit status 4"), "{reason}");
            assert!(
                stderr_tail.contains("cannot load model weights"),
                "{stderr_tail}"
            );
        }
        other => panic!("expected StartupFailed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_module_gives_a_startup_error_naming_it() {
    let err = builder(1)
        .module("no_such_module_xyz")
        .start()
        .await
        .unwrap_err();
    match err {
        Error::StartupFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("no_such_module_xyz"), "{stderr_tail}")
        }
        other => panic!("expected StartupFailed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_start_workers_fails_calls_at_once_and_never_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("broken");
    let pool = rogue(1, &format!("fail_if {}", marker.display()))
        .checkout_timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let pid = pool
        .call("ping", json!({}))
        .await
        .map(|p| pid_of(&p))
        .unwrap();
    std::fs::write(&marker, b"").unwrap();
    let mut events = pool.subscribe();
    kill9(pid);
    // Far more failures than any give-up threshold: the supervisor keeps trying.
    for _ in 0..8 {
        wait_for_event(&mut events, |e| {
            matches!(e, PoolEvent::WorkerStartFailed { .. })
        })
        .await;
    }
    assert!(!pool.health().is_ready());
    // Well under the 30 s checkout timeout: the caller is told at once.
    let answer = tokio::time::timeout(Duration::from_secs(5), pool.call("echo", json!({})))
        .await
        .expect("a call while no worker can start fails at once");
    match answer {
        Err(Error::StartupFailed { stderr_tail, .. }) => {
            assert!(stderr_tail.contains("broken on purpose"), "{stderr_tail}")
        }
        other => panic!("expected StartupFailed, got {other:?}"),
    }
    assert!(pool.health().start_error.is_some());
    std::fs::remove_file(&marker).unwrap();
    wait_for_event(&mut events, |e| matches!(e, PoolEvent::WorkerReady { .. })).await;
    assert!(pool.health().is_ready());
    pool.call("echo", json!({})).await.unwrap();
    assert!(pool.metrics().worker_start_failures >= 8);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_mid_call_leaves_the_call_to_finish_on_its_worker() {
    let pool = builder(1).start().await.unwrap();
    let mut events = pool.subscribe();
    let pid = pool.status().workers[0].pid;
    let abandoned = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 0.5})).await })
    };
    wait_until("the worker to be busy", WAIT, || any_busy(&pool)).await;
    abandoned.abort();
    wait_until("the abandoned call to finish", WAIT, || {
        pool.status()
            .workers
            .iter()
            .any(|w| w.calls_served == 1 && w.state == "idle")
    })
    .await;
    let reply = pool.call("whoami", json!({})).await.unwrap();
    assert_eq!(pid_of(&reply), pid, "the worker served on");
    assert_eq!(pool.metrics().worker_crashes, 0);
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, PoolEvent::WorkerLost { .. }),
            "no worker was lost: {event:?}"
        );
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_recycled_after_n_calls_with_the_replacement_ready_first() {
    let pool = builder(1).recycle_after(5, 0.0).start().await.unwrap();
    let mut events = pool.subscribe();
    let first = pool.status().workers[0].pid;
    for _ in 0..5 {
        pool.call("echo", json!({})).await.unwrap();
    }
    wait_for_event(&mut events, |e| {
        matches!(e, PoolEvent::WorkerRecycled { .. })
    })
    .await;
    let pid = pid_of(&pool.call("whoami", json!({})).await.unwrap());
    assert_ne!(pid, first);
    assert_eq!(pool.metrics().worker_recycles, 1);
    assert_eq!(pool.metrics().errors.len(), 0, "no call failed");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_above_the_memory_limit_are_recycled() {
    let pool = builder(1)
        .max_rss_bytes(1024)
        .health_interval(Some(Duration::from_millis(100)))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    wait_for_event(&mut events, |e| {
        matches!(e, PoolEvent::WorkerRecycled { .. })
    })
    .await;
    assert!(pool.metrics().worker_recycles >= 1);
    pool.call("echo", json!({})).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_idle_worker_fails_its_health_ping_and_is_replaced() {
    let pool = builder(1)
        .health_interval(Some(Duration::from_millis(50)))
        .health_timeout(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let mut events = pool.subscribe();
    let pid = pool.status().workers[0].pid;
    // A stopped process cannot answer: it looks exactly like a hung interpreter.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    wait_for_event(
        &mut events,
        |e| matches!(e, PoolEvent::WorkerLost { pid: p, .. } if *p == pid),
    )
    .await;
    assert!(pool.metrics().health_failures >= 1);
    let reply = pool.call("whoami", json!({})).await.unwrap();
    assert_ne!(pid_of(&reply), pid);
    assert!(
        common::wait_gone(pid, Duration::from_secs(10)),
        "the hung worker was killed"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_callers_are_served_first_come_first_served() {
    // Every call holds the only worker until the test releases it, and marks its own
    // folder while it runs: the order recorded is the worker's, not the order in which
    // callers happen to wake up with their replies.
    let pool = builder(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gate = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        path
    };
    let held = gate("held");
    let busy = {
        let pool = pool.clone();
        let args = json!({"dir": held, "n": 2, "limit_s": 20});
        tokio::spawn(async move { pool.call("rendezvous", args).await })
    };
    wait_for_handler_pid(&held).await;
    let gates: Vec<_> = (0..6).map(|i| gate(&i.to_string())).collect();
    let mut waiting = Vec::new();
    for (i, folder) in gates.iter().enumerate() {
        let caller = pool.clone();
        let args = json!({"dir": folder, "n": 2, "limit_s": 20});
        waiting.push(tokio::spawn(async move {
            caller.call("rendezvous", args).await
        }));
        let what = format!("caller {i} to queue");
        wait_until(&what, WAIT, || pool.status().queued == i + 1).await;
    }
    std::fs::write(held.join("releaser"), b"").unwrap();
    busy.await.unwrap().unwrap();
    let mut served = Vec::new();
    for _ in 0..gates.len() {
        let mut next = None;
        wait_until("the next waiting caller to reach the worker", WAIT, || {
            next = (0..gates.len())
                .find(|i| !served.contains(i) && common::handler_pid(&gates[*i]).is_some());
            next.is_some()
        })
        .await;
        let i = next.unwrap();
        served.push(i);
        std::fs::write(gates[i].join("releaser"), b"").unwrap();
    }
    for task in waiting {
        task.await.unwrap().unwrap();
    }
    assert_eq!(served, vec![0, 1, 2, 3, 4, 5]);
    let metrics = pool.metrics();
    assert_eq!(metrics.calls, 7);
    assert_eq!(metrics.queue_wait.count, 7);
    assert!(metrics.queue_wait.max_us > 0);
    assert_eq!(metrics.call_latency.count, 7);
    pool.shutdown().await;
}
