//! When the host process (a program using the library, or `snakepool serve`) is
//! SIGKILLed, nothing it started survives: not the workers, not the zygote, not a
//! process a handler started — in both spawn modes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ServeProcess, alive, builder, server_pids, spawn_serve, wait_gone};
use serde_json::{Value, json};
use snakepool::SpawnMode;

/// The host half of the orphan tests: started in a child process, it runs a pool in
/// the mode named by `SNAKEPOOL_ORPHAN_MODE`, has a handler start a grandchild,
/// reports every pid it knows and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs only as the child process of the sigkilled_host tests"]
async fn host_process_for_orphan_test() {
    let mode: SpawnMode = std::env::var("SNAKEPOOL_ORPHAN_MODE")
        .unwrap()
        .parse()
        .unwrap();
    let pool = builder(3).spawn_mode(mode).start().await.unwrap();
    let mut pids: Vec<u32> = pool.status().workers.iter().map(|w| w.pid).collect();
    pids.extend(pool.zygote_pid());
    let grandchild = pool.call("spawn_grandchild", json!({})).await.unwrap();
    pids.push(grandchild.as_u64().unwrap() as u32);
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("PIDS {}", pids.join(" "));
    std::future::pending::<()>().await;
}

fn sigkilled_host_leaves_nothing(mode: &str, expected: usize) {
    let mut host = Command::new(std::env::current_exe().unwrap())
        .args([
            "host_process_for_orphan_test",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("SNAKEPOOL_ORPHAN_MODE", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(host.stdout.take().unwrap());
    let pids: Vec<u32> = stdout
        .lines()
        .map(Result::unwrap)
        .find_map(|line| {
            line.strip_prefix("PIDS ")
                .map(|rest| rest.split(' ').map(|p| p.parse().unwrap()).collect())
        })
        .expect("the host reported its processes");
    assert_eq!(pids.len(), expected, "{pids:?}");
    assert!(
        pids.iter().all(|p| alive(*p)),
        "all running before the kill"
    );

    host.kill().unwrap();
    host.wait().unwrap();
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "process {pid} outlived its host ({mode} mode)"
        );
    }
}

#[test]
fn sigkilled_host_leaves_nothing_in_fresh_mode() {
    // Three workers and a handler's grandchild.
    sigkilled_host_leaves_nothing("fresh", 4);
}

#[test]
fn sigkilled_host_leaves_nothing_in_zygote_mode() {
    // Three workers, the zygote and a handler's grandchild.
    sigkilled_host_leaves_nothing("zygote", 5);
}

/// `snakepool serve` SIGKILLed: no worker, zygote or handler-started process survives.
async fn sigkilled_server_leaves_nothing(mode: &str) {
    let ServeProcess {
        child: mut server,
        url,
        ..
    } = spawn_serve(&["--spawn", mode]);
    let client = reqwest::Client::new();
    let grandchild: Value = client
        .post(format!("{url}/v1/call"))
        .json(&json!({"command": "spawn_grandchild"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut pids = server_pids(&client, &url).await;
    pids.push(grandchild["result"].as_u64().unwrap() as u32);
    assert_eq!(pids.len(), if mode == "zygote" { 4 } else { 3 }, "{pids:?}");
    assert!(pids.iter().all(|p| alive(*p)));

    server.kill().unwrap();
    server.wait().unwrap();
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "process {pid} outlived `snakepool serve` ({mode} mode)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_leaves_nothing_in_fresh_mode() {
    sigkilled_server_leaves_nothing("fresh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_leaves_nothing_in_zygote_mode() {
    sigkilled_server_leaves_nothing("zygote").await;
}
