//! When the host process is SIGKILLed, no worker process survives.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{alive, builder, wait_gone};

/// The host half of `sigkilled_host_leaves_no_worker`: started in a child process,
/// it runs a pool, reports its worker pids and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs only as the child process of sigkilled_host_leaves_no_worker"]
async fn host_process_for_orphan_test() {
    let pool = builder(3).start().await.unwrap();
    let pids: Vec<String> = pool
        .status()
        .workers
        .iter()
        .map(|w| w.pid.to_string())
        .collect();
    println!("WORKER_PIDS {}", pids.join(" "));
    std::future::pending::<()>().await;
}

#[test]
fn sigkilled_host_leaves_no_worker() {
    let mut host = Command::new(std::env::current_exe().unwrap())
        .args([
            "host_process_for_orphan_test",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(host.stdout.take().unwrap());
    let pids: Vec<u32> = stdout
        .lines()
        .map(Result::unwrap)
        .find_map(|line| {
            line.strip_prefix("WORKER_PIDS ")
                .map(|rest| rest.split(' ').map(|p| p.parse().unwrap()).collect())
        })
        .expect("the host reported its workers");
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| alive(*p)));

    host.kill().unwrap();
    host.wait().unwrap();
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "worker {pid} outlived its host"
        );
    }
}
