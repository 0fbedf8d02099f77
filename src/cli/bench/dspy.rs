//! `snakepool bench --dspy-profile NAME`: every call runs a DSPy program against a
//! real LM.
//!
//! Before the clock starts, each session runs `configure_lm {"profile": NAME}` and
//! `create_program {"signature": "question -> answer", "type": TYPE}` once. Every
//! counted call is then `execute_program` on its session's program with a question
//! of its own ("What is A plus B?"); a reply without `outputs.answer` is a
//! `bad_response`. Answers equal to A + B are counted apart (`answers_matching`): the
//! fake LM of `benches/lm_serving` computes them, so any other answer there is a call
//! answered with another call's reply; a real model may of course be wrong.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::{Value, json};

use super::{Failure, Outcome, Via};

/// The signature of the program every session creates.
pub const SIGNATURE: &str = "question -> answer";

/// The load: each session's program, and the questions asked so far.
pub struct DspyLoad {
    profile: String,
    program_type: String,
    programs: Vec<String>,
    asked: AtomicU64,
    matching: AtomicU64,
}

/// The question of call `n` and its answer.
fn question(n: u64) -> (String, u64) {
    let (a, b) = (n % 1000 + 1, n / 1000 % 1000 + 7);
    (format!("What is {a} plus {b}?"), a + b)
}

/// Whether `answer` (text or number) is `expected`.
fn matches(answer: &Value, expected: u64) -> bool {
    match answer {
        Value::String(text) => text.trim().trim_end_matches('.') == expected.to_string(),
        Value::Number(n) => n.as_u64() == Some(expected),
        _ => false,
    }
}

/// What a setup call failed with, for the user.
fn setup_error(target: &str, session: &str, command: &str, failure: &Failure) -> String {
    match failure.kind.as_ref() {
        "connect" | "transport" => format!("cannot reach {target}: {}", failure.message),
        "unauthorized" | "http_401" | "http_403" => {
            format!("{target} refused the call ({failure}); pass its token with --token")
        }
        _ => format!("session {session}: {command} failed: {failure}"),
    }
}

impl DspyLoad {
    /// Configures the LM and creates the program in every session, all sessions at
    /// once; the first failure is a setup error.
    pub async fn prepare(
        via: &Via,
        profile: &str,
        program_type: &str,
        sessions: usize,
    ) -> Result<DspyLoad, String> {
        let target = via.name();
        let setups = (0..sessions).map(|i| {
            let target = &target;
            let id = via.session_id(i);
            async move {
                via.request(Some(i), "configure_lm", json!({"profile": profile}))
                    .await
                    .map_err(|f| setup_error(target, &id, "configure_lm", &f))?;
                let args = json!({"signature": SIGNATURE, "type": program_type});
                let created = via
                    .request(Some(i), "create_program", args)
                    .await
                    .map_err(|f| setup_error(target, &id, "create_program", &f))?;
                created["program_id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        format!(
                            "session {id}: create_program answered without a program_id: {created}"
                        )
                    })
            }
        });
        let programs = futures::future::try_join_all(setups).await?;
        Ok(DspyLoad {
            profile: profile.to_owned(),
            program_type: program_type.to_owned(),
            programs,
            asked: AtomicU64::new(0),
            matching: AtomicU64::new(0),
        })
    }

    /// One `execute_program` for `caller`, on its session's program.
    pub async fn call(&self, via: &Via, caller: usize) -> Outcome {
        let session = caller % self.programs.len();
        let (question, expected) = question(self.asked.fetch_add(1, Ordering::Relaxed));
        let args = json!({
            "program_id": self.programs[session],
            "inputs": {"question": question},
        });
        match via.request(Some(session), "execute_program", args).await {
            Ok(result) => {
                let answer = &result["outputs"]["answer"];
                if answer.is_null() {
                    return Some(Cow::Borrowed("bad_response"));
                }
                if matches(answer, expected) {
                    self.matching.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Err(failure) => Some(failure.kind),
        }
    }

    /// Forgets the answers counted so far (the warm-up's).
    pub fn reset(&self) {
        self.matching.store(0, Ordering::Relaxed);
    }

    pub fn report(&self) -> DspyReport {
        DspyReport {
            profile: self.profile.clone(),
            program_type: self.program_type.clone(),
            signature: SIGNATURE,
            answers_matching: self.matching.load(Ordering::Relaxed),
        }
    }
}

/// The DSPy part of the report.
#[derive(Serialize)]
pub struct DspyReport {
    pub profile: String,
    pub program_type: String,
    pub signature: &'static str,
    /// Counted calls whose answer was A + B.
    pub answers_matching: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_differ_and_answers_are_checked() {
        let (q0, a0) = question(0);
        let (q1, a1) = question(1);
        assert_ne!(q0, q1);
        assert_eq!((q0.as_str(), a0), ("What is 1 plus 7?", 8));
        assert_eq!(a1, 9);
        assert_eq!(question(123_456).1, 457 + 130);
        assert!(matches(&json!("8"), 8));
        assert!(matches(&json!(" 8."), 8));
        assert!(matches(&json!(8), 8));
        assert!(!matches(&json!("9"), 8));
        assert!(!matches(&Value::Null, 8));
    }
}
