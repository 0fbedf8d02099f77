//! Which language models workers may reach: the operator's named LM profiles, whether
//! callers may name a model, endpoint and key variable themselves, where cached LM
//! answers are kept, and which saved DSPy programs every worker serves without a
//! session.
//!
//! The policy travels to the workers in their environment (it is read by
//! `snakepool_worker.dspy`), never over the wire, and a caller only ever names a
//! profile. Keys stay in the workers' environment: a profile names the variable that
//! holds its key, and variables starting with `SNAKEPOOL_` are never usable as keys.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variable carrying the profiles to the workers, as a JSON object.
pub const PROFILES_ENV: &str = "SNAKEPOOL_LM_PROFILES";
/// Environment variable saying whether callers may give LM settings (`allow` or `deny`).
pub const CLIENT_SETTINGS_ENV: &str = "SNAKEPOOL_LM_CLIENT_SETTINGS";
/// Environment variable naming the directory of the profiles' response caches.
pub const CACHE_DIR_ENV: &str = "SNAKEPOOL_LM_CACHE_DIR";
/// Environment variable carrying the served programs to the workers, as a JSON object.
pub const PROGRAMS_ENV: &str = "SNAKEPOOL_PROGRAMS";

/// A saved DSPy program every worker loads at start-up (`[program.NAME]`), run as a
/// plain call with `execute_program {"program": NAME, "inputs": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedProgram {
    /// The file `dump_program_state` (or DSPy's `program.save`) wrote.
    pub path: PathBuf,
    /// The LM profile it runs with (in a settings file: optional when exactly one
    /// profile is defined).
    #[serde(default)]
    pub profile: String,
}

/// One named language model set up by the operator (`[lm.NAME]` in the settings file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmProfile {
    /// The model, as DSPy/litellm name it, e.g. `openai/gpt-4o-mini`.
    pub model: String,
    /// The endpoint, for OpenAI-compatible servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// The worker environment variable holding the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Most tokens per answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Retries of transient provider errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u64>,
    /// Cache answers (per profile; on disk under the cache directory when one is set).
    #[serde(default)]
    pub cache: bool,
}

impl LmProfile {
    /// A profile for `model` with DSPy's defaults.
    pub fn new(model: impl Into<String>) -> Self {
        LmProfile {
            model: model.into(),
            ..LmProfile::default()
        }
    }

    /// The endpoint, e.g. `http://127.0.0.1:8080/v1`.
    pub fn api_base(mut self, url: impl Into<String>) -> Self {
        self.api_base = Some(url.into());
        self
    }

    /// The worker environment variable holding the key.
    pub fn api_key_env(mut self, name: impl Into<String>) -> Self {
        self.api_key_env = Some(name.into());
        self
    }

    /// Sampling temperature.
    pub fn temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Caches answers of this profile.
    pub fn cache(mut self, cache: bool) -> Self {
        self.cache = cache;
        self
    }
}

/// The operator's LM policy for a pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LmPolicy {
    /// Profiles by name.
    pub profiles: BTreeMap<String, LmProfile>,
    /// Whether callers may give `model`, `api_base` and `api_key_env` themselves
    /// (off by default).
    pub client_settings: bool,
    /// Where profiles with `cache = true` keep their caches; memory only when unset.
    pub cache_dir: Option<PathBuf>,
    /// Saved programs served without a session, by name.
    pub programs: BTreeMap<String, ServedProgram>,
}

/// Whether `name` can name a profile or a program.
fn valid_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name.chars().all(allowed)
}

impl LmPolicy {
    /// Checks the profiles; the error names the profile and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for (name, profile) in &self.profiles {
            if !valid_name(name) {
                return Err(format!(
                    "LM profile name {name:?} must be 1 to 128 letters, digits, `_`, `-` or \
                     `.` (and not `.` or `..`)"
                ));
            }
            if let Some(url) = &profile.api_base
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(format!(
                    "LM profile `{name}`: api_base must be an http:// or https:// URL, got {url:?}"
                ));
            }
            if profile.model.trim().is_empty() {
                return Err(format!("LM profile `{name}` has no model"));
            }
            if let Some(var) = &profile.api_key_env
                && var.to_ascii_uppercase().starts_with("SNAKEPOOL_")
            {
                return Err(format!(
                    "LM profile `{name}`: api_key_env `{var}` is one of the pool's own \
                     variables, which are never usable as keys"
                ));
            }
        }
        for (name, program) in &self.programs {
            if !valid_name(name) {
                return Err(format!(
                    "program name {name:?} must be 1 to 128 letters, digits, `_`, `-` or `.`"
                ));
            }
            if program.profile.is_empty() {
                return Err(format!(
                    "program `{name}` names no LM profile: give one (`,profile=NAME` on the \
                     command line, `profile = \"NAME\"` in the file)"
                ));
            }
            if !self.profiles.contains_key(&program.profile) {
                return Err(format!(
                    "program `{name}` runs with LM profile `{}`, which is not defined",
                    program.profile
                ));
            }
            if let Err(error) = std::fs::metadata(&program.path) {
                return Err(format!(
                    "program `{name}`: cannot read {}: {error}",
                    program.path.display()
                ));
            }
        }
        Ok(())
    }

    /// The workers' environment carrying this policy.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                PROFILES_ENV.to_owned(),
                serde_json::to_string(&self.profiles).expect("profiles serialise"),
            ),
            (
                CLIENT_SETTINGS_ENV.to_owned(),
                if self.client_settings {
                    "allow"
                } else {
                    "deny"
                }
                .to_owned(),
            ),
        ];
        if let Some(dir) = &self.cache_dir {
            env.push((CACHE_DIR_ENV.to_owned(), dir.display().to_string()));
        }
        if !self.programs.is_empty() {
            let programs: BTreeMap<&String, ServedProgram> = self
                .programs
                .iter()
                .map(|(name, program)| {
                    let path =
                        std::path::absolute(&program.path).unwrap_or_else(|_| program.path.clone());
                    (
                        name,
                        ServedProgram {
                            path,
                            profile: program.profile.clone(),
                        },
                    )
                })
                .collect();
            env.push((
                PROGRAMS_ENV.to_owned(),
                serde_json::to_string(&programs).expect("programs serialise"),
            ));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_travels_as_environment_and_refuses_pool_variables() {
        let mut policy = LmPolicy::default();
        policy.profiles.insert(
            "fast".into(),
            LmProfile::new("openai/m").api_key_env("OPENAI_API_KEY"),
        );
        policy.validate().unwrap();
        let env: BTreeMap<_, _> = policy.worker_env().into_iter().collect();
        assert_eq!(env[CLIENT_SETTINGS_ENV], "deny");
        let profiles: serde_json::Value = serde_json::from_str(&env[PROFILES_ENV]).unwrap();
        assert_eq!(profiles["fast"]["model"], "openai/m");
        assert_eq!(profiles["fast"]["api_key_env"], "OPENAI_API_KEY");
        assert!(!env.contains_key(CACHE_DIR_ENV));

        policy.profiles.insert(
            "evil".into(),
            LmProfile::new("openai/m").api_key_env("SNAKEPOOL_TOKEN"),
        );
        let err = policy.validate().unwrap_err();
        assert!(
            err.contains("evil") && err.contains("SNAKEPOOL_TOKEN"),
            "{err}"
        );
    }

    #[test]
    fn served_programs_need_a_defined_profile_and_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qa.json");
        std::fs::write(&file, "{}").unwrap();
        let mut policy = LmPolicy::default();
        policy
            .profiles
            .insert("mini".into(), LmProfile::new("openai/m"));
        policy.programs.insert(
            "qa".into(),
            ServedProgram {
                path: file.clone(),
                profile: "mini".into(),
            },
        );
        policy.validate().unwrap();
        let env: BTreeMap<_, _> = policy.worker_env().into_iter().collect();
        let programs: serde_json::Value = serde_json::from_str(&env[PROGRAMS_ENV]).unwrap();
        assert_eq!(programs["qa"]["profile"], "mini");
        assert!(std::path::Path::new(programs["qa"]["path"].as_str().unwrap()).is_absolute());

        let qa = policy.programs.get_mut("qa").unwrap();
        qa.profile = "nope".into();
        assert!(policy.validate().unwrap_err().contains("nope"));
        let qa = policy.programs.get_mut("qa").unwrap();
        qa.profile = String::new();
        assert!(
            policy
                .validate()
                .unwrap_err()
                .contains("names no LM profile")
        );
        let qa = policy.programs.get_mut("qa").unwrap();
        qa.profile = "mini".into();
        qa.path = dir.path().join("missing.json");
        assert!(policy.validate().unwrap_err().contains("missing.json"));
    }
}
