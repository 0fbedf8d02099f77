//! A typed face over the DSPy commands of the `snakepool_worker.dspy` worker module.
//!
//! Programs and LM settings live in a session, so every call of a program goes to the
//! worker that holds it, and a program survives its worker's death: the session's
//! journal rebuilds it (optimized state included) on another worker.
//!
//! ```no_run
//! # async fn demo(pool: snakepool::Pool) -> snakepool::Result<()> {
//! use serde::Deserialize;
//! use serde_json::json;
//! use snakepool::dspy::{Dspy, FieldType, Lm, ProgramKind, Signature};
//!
//! #[derive(Deserialize)]
//! struct Answer {
//!     answer: i64,
//! }
//!
//! let dspy = Dspy::new(pool.session("user-42"));
//! dspy.configure_lm(&Lm::dummy(vec![json!({"reasoning": "2 and 2", "answer": "4"})]))
//!     .await?;
//! let signature = Signature::new()
//!     .instructions("Answer with a number.")
//!     .input("question", FieldType::Str, "a sum in words")
//!     .output("answer", FieldType::Int, "the result");
//! let program = dspy.create_program(signature, ProgramKind::ChainOfThought).await?;
//! let prediction = program
//!     .call::<_, Answer>(&json!({"question": "two plus two?"}))
//!     .await?;
//! assert_eq!(prediction.outputs.answer, 4);
//! # Ok(()) }
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::session::Session;

/// The type of a signature field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// `str`
    Str,
    /// `int`
    Int,
    /// `float`
    Float,
    /// `bool`
    Bool,
    /// `list[str]`
    ListStr,
    /// `dict`
    Dict,
}

impl FieldType {
    /// The type's name in a DSPy signature.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Str => "str",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::ListStr => "list[str]",
            FieldType::Dict => "dict",
        }
    }
}

/// One input or output field of a signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Field {
    /// The field's name.
    pub name: String,
    /// Its description, shown to the LM.
    #[serde(default)]
    pub desc: String,
    /// Its type, as a DSPy type name.
    #[serde(rename = "type", default = "default_type")]
    pub ty: String,
}

fn default_type() -> String {
    "str".to_owned()
}

/// A DSPy signature: a string like `"question -> answer"` or `"question: str -> answer:
/// int"`, or instructions with typed, described fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Signature {
    /// The string form.
    Text(String),
    /// The structured form.
    Structured {
        /// Instructions for the LM.
        instructions: String,
        /// Input fields.
        inputs: Vec<Field>,
        /// Output fields.
        outputs: Vec<Field>,
    },
}

impl Signature {
    /// An empty structured signature, to fill with the builder methods.
    pub fn new() -> Self {
        Signature::Structured {
            instructions: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Sets the instructions (turns a string signature into an empty structured one).
    pub fn instructions(self, text: impl Into<String>) -> Self {
        match self.structured() {
            Signature::Structured {
                inputs, outputs, ..
            } => Signature::Structured {
                instructions: text.into(),
                inputs,
                outputs,
            },
            Signature::Text(_) => unreachable!("structured() returns the structured form"),
        }
    }

    /// Adds an input field.
    pub fn input(self, name: &str, ty: FieldType, desc: &str) -> Self {
        self.with_field(true, name, ty, desc)
    }

    /// Adds an output field.
    pub fn output(self, name: &str, ty: FieldType, desc: &str) -> Self {
        self.with_field(false, name, ty, desc)
    }

    fn structured(self) -> Self {
        match self {
            Signature::Text(_) => Signature::new(),
            structured => structured,
        }
    }

    fn with_field(self, input: bool, name: &str, ty: FieldType, desc: &str) -> Self {
        let Signature::Structured {
            instructions,
            mut inputs,
            mut outputs,
        } = self.structured()
        else {
            unreachable!("structured() returns the structured form")
        };
        let field = Field {
            name: name.to_owned(),
            desc: desc.to_owned(),
            ty: ty.as_str().to_owned(),
        };
        if input {
            inputs.push(field);
        } else {
            outputs.push(field);
        }
        Signature::Structured {
            instructions,
            inputs,
            outputs,
        }
    }

    /// The signature as `create_program` takes it.
    pub fn to_json(&self) -> Value {
        match self {
            Signature::Text(text) => json!(text),
            Signature::Structured {
                instructions,
                inputs,
                outputs,
            } => json!({"instructions": instructions, "inputs": inputs, "outputs": outputs}),
        }
    }
}

impl Default for Signature {
    fn default() -> Self {
        Signature::new()
    }
}

impl From<&str> for Signature {
    fn from(text: &str) -> Self {
        Signature::Text(text.to_owned())
    }
}

impl From<String> for Signature {
    fn from(text: String) -> Self {
        Signature::Text(text)
    }
}

/// Which DSPy module runs the signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// `dspy.Predict`
    Predict,
    /// `dspy.ChainOfThought`: also returns its reasoning.
    ChainOfThought,
}

impl ProgramKind {
    fn as_str(self) -> &'static str {
        match self {
            ProgramKind::Predict => "predict",
            ProgramKind::ChainOfThought => "chain_of_thought",
        }
    }
}

/// The language model of a session.
#[derive(Clone, Debug, PartialEq)]
pub enum Lm {
    /// `dspy.utils.dummies.DummyLM`, for offline use and tests.
    Dummy {
        /// Either a list of answers (maps from output field to value) used in turn, or
        /// a map from a text found in the prompt to the answer for that prompt.
        answers: Value,
        /// Answer from a matching demo when there is one.
        follow_examples: bool,
    },
    /// One of the pool's LM profiles (see [`crate::PoolBuilder::lm_profile`]): the
    /// operator chose its model, endpoint and key.
    Profile {
        /// The profile's name.
        name: String,
        /// Sampling temperature, instead of the profile's.
        temperature: Option<f64>,
        /// Most tokens per answer, instead of the profile's.
        max_tokens: Option<u32>,
    },
    /// A model behind an OpenAI-compatible (or any litellm-supported) endpoint, named
    /// by the caller. Workers accept it only when the pool allows callers' LM
    /// settings ([`crate::PoolBuilder::allow_client_lm`]).
    Remote {
        /// The litellm model string, e.g. `openai/gpt-4o-mini`.
        model: String,
        /// The endpoint, e.g. `http://127.0.0.1:8080/v1`.
        api_base: Option<String>,
        /// The name of the worker environment variable holding the API key. The key
        /// itself never crosses the wire.
        api_key_env: Option<String>,
        /// Sampling temperature.
        temperature: Option<f64>,
        /// Most tokens per answer.
        max_tokens: Option<u32>,
    },
}

impl Lm {
    /// A DummyLM answering from `answers` in turn.
    pub fn dummy(answers: Vec<Value>) -> Self {
        Lm::Dummy {
            answers: Value::Array(answers),
            follow_examples: false,
        }
    }

    /// A DummyLM that answers any prompt containing a key of `answers` with that key's
    /// answer, as often as asked.
    pub fn dummy_by_prompt(answers: serde_json::Map<String, Value>) -> Self {
        Lm::Dummy {
            answers: Value::Object(answers),
            follow_examples: false,
        }
    }

    /// The pool's LM profile `name`.
    pub fn profile(name: impl Into<String>) -> Self {
        Lm::Profile {
            name: name.into(),
            temperature: None,
            max_tokens: None,
        }
    }

    /// A remote model at `api_base` (None: the provider's default endpoint).
    pub fn remote(model: impl Into<String>, api_base: Option<String>) -> Self {
        Lm::Remote {
            model: model.into(),
            api_base,
            api_key_env: None,
            temperature: None,
            max_tokens: None,
        }
    }

    /// Reads the API key from this environment variable of the worker.
    pub fn api_key_env(mut self, name: impl Into<String>) -> Self {
        if let Lm::Remote { api_key_env, .. } = &mut self {
            *api_key_env = Some(name.into());
        }
        self
    }

    /// The arguments of `configure_lm`.
    pub fn to_json(&self) -> Value {
        match self {
            Lm::Dummy {
                answers,
                follow_examples,
            } => {
                json!({"provider": "dummy", "answers": answers, "follow_examples": follow_examples})
            }
            Lm::Profile {
                name,
                temperature,
                max_tokens,
            } => {
                let mut args = json!({"profile": name});
                if let Some(t) = temperature {
                    args["temperature"] = json!(t);
                }
                if let Some(n) = max_tokens {
                    args["max_tokens"] = json!(n);
                }
                args
            }
            Lm::Remote {
                model,
                api_base,
                api_key_env,
                temperature,
                max_tokens,
            } => {
                let mut args = json!({"model": model});
                let extra = [
                    ("api_base", api_base.as_ref().map(|v| json!(v))),
                    ("api_key_env", api_key_env.as_ref().map(|v| json!(v))),
                    ("temperature", temperature.map(|v| json!(v))),
                    ("max_tokens", max_tokens.map(|v| json!(v))),
                ];
                for (key, value) in extra {
                    if let Some(value) = value {
                        args[key] = value;
                    }
                }
                args
            }
        }
    }
}

/// How `optimize` compiles a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimizer {
    /// `dspy.BootstrapFewShot`.
    BootstrapFewShot {
        /// Most demos generated by the program itself.
        max_bootstrapped_demos: usize,
        /// Most demos taken from the trainset as they are.
        max_labeled_demos: usize,
    },
    /// `dspy.LabeledFewShot`: up to `k` trainset examples become demos.
    LabeledFewShot {
        /// Most demos.
        k: usize,
    },
}

/// How a training example's predicted outputs are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Every output equals the expected one (case-insensitive).
    ExactMatch,
    /// Every output contains the expected one (case-insensitive).
    Contains,
}

/// A program's answer.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Prediction<O> {
    /// The output fields, typed as the caller asked.
    pub outputs: O,
    /// The reasoning of a chain of thought.
    #[serde(default)]
    pub reasoning: Option<String>,
    /// The LM usage DSPy reported for the call, by model.
    #[serde(default)]
    pub usage: Option<Value>,
}

/// What `optimize` did.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct OptimizeReport {
    /// Demos the program holds now.
    pub demos: usize,
    /// The program's new state (also what the session journal replays).
    pub state: Value,
}

/// One program of a session, as listed.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ProgramSummary {
    /// Its id.
    pub program_id: String,
    /// `predict` or `chain_of_thought`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its signature as a string.
    pub signature: String,
}

fn decode<T: DeserializeOwned>(command: &str, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::UnexpectedResult {
        command: command.to_owned(),
        reason: e.to_string(),
    })
}

/// DSPy in one session of a pool.
#[derive(Clone, Debug)]
pub struct Dspy {
    session: Session,
}

impl Dspy {
    /// DSPy commands through `session`.
    pub fn new(session: Session) -> Self {
        Dspy { session }
    }

    /// The session the programs live in.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Sets the session's language model.
    pub async fn configure_lm(&self, lm: &Lm) -> Result<()> {
        self.session.call("configure_lm", lm.to_json()).await?;
        Ok(())
    }

    /// Creates a program in the session.
    pub async fn create_program(
        &self,
        signature: impl Into<Signature>,
        kind: ProgramKind,
    ) -> Result<Program> {
        let args = json!({"signature": signature.into().to_json(), "type": kind.as_str()});
        let reply = self.session.call("create_program", args).await?;
        let id = reply["program_id"]
            .as_str()
            .ok_or_else(|| Error::UnexpectedResult {
                command: "create_program".into(),
                reason: format!("no program_id in {reply}"),
            })?;
        Ok(self.program(id))
    }

    /// A handle on an existing program of the session.
    pub fn program(&self, id: &str) -> Program {
        Program {
            session: self.session.clone(),
            id: id.to_owned(),
        }
    }

    /// The session's programs.
    pub async fn list_programs(&self) -> Result<Vec<ProgramSummary>> {
        let reply = self.session.call("list_programs", json!({})).await?;
        decode("list_programs", reply["programs"].clone())
    }
}

/// A DSPy program living in a session's worker.
#[derive(Clone, Debug)]
pub struct Program {
    session: Session,
    id: String,
}

impl Program {
    /// The program's id in its session.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs the program on `inputs` (a struct or map of its input fields) and
    /// deserialises its outputs into `O`.
    pub async fn call<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        inputs: &I,
    ) -> Result<Prediction<O>> {
        let inputs = serde_json::to_value(inputs).map_err(|e| Error::InvalidRequest {
            command: "execute_program".into(),
            reason: format!("inputs are not serialisable: {e}"),
        })?;
        let reply = self
            .session
            .call(
                "execute_program",
                json!({"program_id": self.id, "inputs": inputs}),
            )
            .await?;
        decode("execute_program", reply)
    }

    /// Compiles the program on `trainset` (maps of input and output fields); the
    /// optimized state replaces the program's and is journaled with the session.
    pub async fn optimize<T: Serialize>(
        &self,
        trainset: &[T],
        optimizer: Optimizer,
        metric: Metric,
    ) -> Result<OptimizeReport> {
        let mut args = json!({
            "program_id": self.id,
            "trainset": trainset,
            "metric": match metric {
                Metric::ExactMatch => "exact_match",
                Metric::Contains => "contains",
            },
        });
        match optimizer {
            Optimizer::BootstrapFewShot {
                max_bootstrapped_demos,
                max_labeled_demos,
            } => {
                args["optimizer"] = json!("bootstrap_few_shot");
                args["max_bootstrapped_demos"] = json!(max_bootstrapped_demos);
                args["max_labeled_demos"] = json!(max_labeled_demos);
            }
            Optimizer::LabeledFewShot { k } => {
                args["optimizer"] = json!("labeled_few_shot");
                args["k"] = json!(k);
            }
        }
        let reply = self.session.call("optimize_program", args).await?;
        decode("optimize_program", reply)
    }

    /// The program's saved state (demos, instructions).
    pub async fn dump_state(&self) -> Result<Value> {
        let reply = self
            .session
            .call("dump_program_state", json!({"program_id": self.id}))
            .await?;
        Ok(reply["state"].clone())
    }

    /// Replaces the program's state with a saved one.
    pub async fn load_state(&self, state: &Value) -> Result<()> {
        self.session
            .call(
                "load_program_state",
                json!({"program_id": self.id, "state": state}),
            )
            .await?;
        Ok(())
    }

    /// The program's type, signature and demo count.
    pub async fn info(&self) -> Result<Value> {
        self.session
            .call("get_program_info", json!({"program_id": self.id}))
            .await
    }

    /// Deletes the program from its session.
    pub async fn delete(self) -> Result<()> {
        self.session
            .call("delete_program", json!({"program_id": self.id}))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_structured_signatures() {
        let signature = Signature::new()
            .instructions("Be brief.")
            .input("question", FieldType::Str, "what is asked")
            .output("answer", FieldType::Int, "")
            .output("tags", FieldType::ListStr, "labels");
        assert_eq!(
            signature.to_json(),
            json!({
                "instructions": "Be brief.",
                "inputs": [{"name": "question", "desc": "what is asked", "type": "str"}],
                "outputs": [
                    {"name": "answer", "desc": "", "type": "int"},
                    {"name": "tags", "desc": "labels", "type": "list[str]"}
                ]
            })
        );
        assert_eq!(
            Signature::from("q -> a").to_json(),
            json!("q -> a"),
            "string signatures pass through"
        );
    }

    #[test]
    fn lm_arguments_never_carry_a_key() {
        assert_eq!(Lm::profile("fast").to_json(), json!({"profile": "fast"}));
        let lm = Lm::remote("openai/m", Some("http://127.0.0.1:1/v1".into())).api_key_env("K");
        assert_eq!(
            lm.to_json(),
            json!({"model": "openai/m", "api_base": "http://127.0.0.1:1/v1", "api_key_env": "K"})
        );
        assert_eq!(
            Lm::dummy(vec![json!({"answer": "x"})]).to_json()["provider"],
            "dummy"
        );
    }
}
