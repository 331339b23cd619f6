//! Configuration of `halakha-enrich`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use halakha_common::config::{Reader, RedisConfig};
use halakha_nats::stage::StageConfig;
use secrecy::SecretString;

use crate::limits::LimitsConfig;

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
    /// How long the stage pauses when the provider says the quota is
    /// exhausted (`OPENAI_QUOTA_PAUSE_SECS`).
    pub quota_pause: Duration,
    /// Requests and tokens per minute, daily token budget.
    pub limits: LimitsConfig,
    /// USD per million prompt and completion tokens, by model (`OPENAI_PRICES`).
    pub prices: HashMap<String, (f64, f64)>,
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
            openai_timeout: match r.raw("OPENAI_TIMEOUT_MS") {
                // For tests and fast local servers: a finer bound than the
                // documented 60..=600 seconds.
                Some(_) => Duration::from_millis(r.ranged("OPENAI_TIMEOUT_MS", 300_000, 100..=600_000)),
                None => r.seconds("OPENAI_TIMEOUT_SECS", 300, 60..=600),
            },
            prompt_dir,
            max_completion_tokens: r.ranged("OPENAI_MAX_COMPLETION_TOKENS", 4096, 256..=32_768),
            redis: RedisConfig::read(r),
            cache_ttl: r.seconds("CACHE_TTL_SECS", 30 * 24 * 3600, 60..=365 * 24 * 3600),
            quota_pause: r.seconds("OPENAI_QUOTA_PAUSE_SECS", 300, 1..=86_400),
            limits: LimitsConfig {
                requests_per_minute: r.ranged("OPENAI_REQUESTS_PER_MINUTE", 0, 0..=1_000_000),
                tokens_per_minute: r.ranged("OPENAI_TOKENS_PER_MINUTE", 0, 0..=100_000_000),
                daily_token_budget: r.ranged("OPENAI_DAILY_TOKEN_BUDGET", 0, 0..=u64::MAX / 2),
            },
            prices: prices(r),
        }
    }
}

/// Default prices (USD per million prompt:completion tokens).
pub const DEFAULT_PRICES: &str = "gpt-4o-mini=0.15:0.60,gpt-4o=2.50:10.00,gpt-4.1-mini=0.40:1.60,gpt-4.1=2.00:8.00";

/// `model=prompt:completion,...`, USD per million tokens.
fn prices(r: &mut Reader<'_>) -> HashMap<String, (f64, f64)> {
    let text = r.string_or("OPENAI_PRICES", DEFAULT_PRICES);
    let mut out = HashMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = item.split_once('=').and_then(|(model, p)| {
            let (i, o) = p.split_once(':')?;
            let (i, o): (f64, f64) = (i.trim().parse().ok()?, o.trim().parse().ok()?);
            (i >= 0.0 && o >= 0.0).then(|| (model.trim().to_owned(), (i, o)))
        });
        match parsed {
            Some((model, p)) => {
                out.insert(model, p);
            }
            None => {
                r.error("OPENAI_PRICES", "expected model=prompt:completion,... (USD per million tokens)");
                break;
            }
        }
    }
    out
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
    fn prices_read_as_a_table_and_a_bad_one_is_named() {
        let src = Map::new([("OPENAI_API_KEY", "k"), ("OPENAI_PRICES", "m1=1.5:3,m2=0:0")]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        let c = r.finish(c).expect("valid");
        assert_eq!(c.prices["m1"], (1.5, 3.0));
        let src = Map::new([("OPENAI_API_KEY", "k"), ("OPENAI_PRICES", "m1=cheap")]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        assert_eq!(r.finish(c).expect_err("invalid").names(), vec!["OPENAI_PRICES"]);
    }

    #[test]
    fn the_timeout_must_stay_within_60_to_600_seconds() {
        let src = Map::new([("OPENAI_API_KEY", "sk-test"), ("OPENAI_TIMEOUT_SECS", "5")]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        assert_eq!(r.finish(c).expect_err("range").names(), vec!["OPENAI_TIMEOUT_SECS"]);
    }
}
