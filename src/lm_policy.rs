//! Which language models workers may reach: the operator's named LM profiles, whether
//! callers may name a model, endpoint and key variable themselves, and where cached LM
//! answers are kept.
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
}

impl LmPolicy {
    /// Checks the profiles; the error names the profile and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for (name, profile) in &self.profiles {
            let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
            if name.is_empty()
                || name.len() > 128
                || name == "."
                || name == ".."
                || !name.chars().all(allowed)
            {
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
}
