//! A short chaos round: workers are SIGKILLed at random under plain calls (sync, and
//! concurrent ones several to a worker) and DSPy session load, and no call is lost and
//! no session loses its state.

mod common;

use std::process::Command;

use serde_json::Value;

fn chaos_round(spawn: &str, rate: &str) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_snakepool"))
        .args(["bench", "--chaos", rate, "--duration", "2s", "--json"])
        .args([
            "--workers",
            "3",
            "--concurrency",
            "6",
            "--dspy-sessions",
            "2",
        ])
        .args(["--spawn", spawn, "--python", &common::python()])
        .env_remove("SNAKEPOOL_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn assert_nothing_lost(report: &Value) {
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["lost_no_answer"], 0, "{report}");
    assert_eq!(report["lost_wrong_answer"], 0, "{report}");
    assert_eq!(report["state_lost"], 0, "{report}");
    assert!(report["kills"].as_u64().unwrap() >= 2, "{report}");
    assert!(report["succeeded"].as_u64().unwrap() > 0, "{report}");
    assert!(report["session_calls"].as_u64().unwrap() > 0, "{report}");
    assert!(report["concurrent_calls"].as_u64().unwrap() > 0, "{report}");
    // Every call is accounted for: succeeded, failed with a kind, or lost.
    let failed: u64 = report["failed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        report["sent"].as_u64().unwrap(),
        report["succeeded"].as_u64().unwrap() + failed,
        "{report}"
    );
    for kind in report["failed"].as_object().unwrap().keys() {
        assert_eq!(
            kind, "worker_crashed",
            "only calls whose worker was killed fail"
        );
    }
}

#[test]
fn chaos_with_forked_workers_loses_nothing() {
    assert_nothing_lost(&chaos_round("zygote", "8"));
}

#[test]
fn chaos_with_fresh_workers_loses_nothing() {
    assert_nothing_lost(&chaos_round("fresh", "2"));
}
