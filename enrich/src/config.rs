//! Configuration of `halakha-enrich`.

use std::path::PathBuf;
use std::time::Duration;

use halakha_common::config::{Reader, RedisConfig};
use halakha_nats::stage::StageConfig;
use secrecy::SecretString;

#[derive(Debug, Clone)]
pub struct Config {
    /// NATS, namespace, telemetry and consumer tuning.
    pub stage: StageConfig,
    pub openai_api_key: SecretString,
    pub openai_base_url: String,
    pub openai_model: String,
    pub openai_timeout: Duration,
    /// A folder holding `structure.md` to replace the built-in instructions.
    pub prompt_dir: Option<PathBuf>,
    /// Upper bound on generated tokens per call (`OPENAI_MAX_COMPLETION_TOKENS`).
    pub max_completion_tokens: u32,
    /// The enrichment cache (`REDIS_URL`).
    pub redis: RedisConfig,
    /// How long a cached enrichment is kept (`CACHE_TTL_SECS`).
    pub cache_ttl: Duration,
}

impl Config {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let base = r.string_or("OPENAI_BASE_URL", "https://api.openai.com/v1");
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            r.error("OPENAI_BASE_URL", "must be an http:// or https:// URL");
        }
        let prompt_dir = r.raw("ENRICH_PROMPT_DIR").map(PathBuf::from);
        if let Some(dir) = &prompt_dir
            && !dir.join(crate::prompt::STRUCTURE_FILE).is_file()
        {
            r.error("ENRICH_PROMPT_DIR", format!("must be a folder containing {}", crate::prompt::STRUCTURE_FILE));
        }
        Self {
            stage: StageConfig::read(r, "0.0.0.0:9102", 4),
            openai_api_key: r.secret("OPENAI_API_KEY"),
            openai_base_url: base.trim_end_matches('/').to_owned(),
            openai_model: r.string_or("OPENAI_MODEL", "gpt-4o-mini"),
            openai_timeout: r.seconds("OPENAI_TIMEOUT_SECS", 300, 60..=600),
            prompt_dir,
            max_completion_tokens: r.ranged("OPENAI_MAX_COMPLETION_TOKENS", 4096, 256..=32_768),
            redis: RedisConfig::read(r),
            cache_ttl: r.seconds("CACHE_TTL_SECS", 30 * 24 * 3600, 60..=365 * 24 * 3600),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halakha_common::config::Map;

    #[test]
    fn an_empty_environment_names_the_api_key() {
        let src = Map::default();
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        assert_eq!(r.finish(c).expect_err("missing").names(), vec!["OPENAI_API_KEY"]);
    }

    #[test]
    fn the_api_key_and_redis_url_never_reach_debug_output() {
        let src = Map::new([("OPENAI_API_KEY", "sk-live-hunter2"), ("REDIS_URL", "redis://:pw-hunter3@cache:6379")]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        let c = r.finish(c).expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("hunter3"), "{shown}");
    }

    #[test]
    fn the_timeout_must_stay_within_60_to_600_seconds() {
        let src = Map::new([("OPENAI_API_KEY", "sk-test"), ("OPENAI_TIMEOUT_SECS", "5")]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        assert_eq!(r.finish(c).expect_err("range").names(), vec!["OPENAI_TIMEOUT_SECS"]);
    }
}
