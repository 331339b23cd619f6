//! Configuration of `halakha-ingest`.

use std::net::SocketAddr;
use std::time::Duration;

use halakha_common::config::{DatabaseConfig, Reader, RedisConfig};
use halakha_nats::stage::StageConfig;
use secrecy::{ExposeSecret, SecretString};

/// Every setting of the ingest stage.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS, namespace, telemetry and consumer tuning.
    pub stage: StageConfig,
    pub http_addr: SocketAddr,
    pub database: DatabaseConfig,
    pub api_keys: Vec<SecretString>,
    pub cors_origins: Vec<String>,
    /// Longest accepted text, in characters (`MAX_CONTENT_CHARS`).
    pub max_content_chars: usize,
    /// Largest accepted request body, in bytes (`MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Largest accepted batch body, in bytes (`MAX_BATCH_BYTES`).
    pub max_batch_bytes: usize,
    /// Requests per minute per API key (`RATE_LIMIT_PER_MINUTE`, 0 = off).
    pub rate_limit_per_minute: u32,
    /// Requests a key may send at once above the steady rate (`RATE_LIMIT_BURST`).
    pub rate_limit_burst: u32,
    /// Longest time a request may take (`REQUEST_TIMEOUT_SECS`).
    pub request_timeout: Duration,
    /// How long the original service's form route waits for publication
    /// before answering 202 (`FORM_WAIT_SECS`).
    pub form_wait: Duration,
    /// Shared rate limits across replicas (`REDIS_URL`; unset = per replica).
    pub redis: RedisConfig,
    /// How often the invariant gauge is computed (`BOOKS_INTERVAL_SECS`).
    pub books_interval: Duration,
}

/// Shortest accepted API key.
pub const MIN_API_KEY_LEN: usize = 32;

impl Config {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let api_keys: Vec<SecretString> = r.list("API_KEYS").into_iter().map(SecretString::from).collect();
        if api_keys.is_empty() {
            r.error("API_KEYS", "required but not set");
        } else if api_keys.iter().any(|k| k.expose_secret().chars().count() < MIN_API_KEY_LEN) {
            r.error("API_KEYS", format!("every key must have at least {MIN_API_KEY_LEN} characters"));
        }
        let cors_origins = r.list("CORS_ORIGINS");
        if cors_origins.iter().any(|o| o == "*") {
            r.error("CORS_ORIGINS", "must list origins; '*' is not allowed");
        } else if cors_origins.iter().any(|o| !valid_origin(o)) {
            r.error(
                "CORS_ORIGINS",
                "each origin must look like https://example.org (scheme, host, optional port, no path)",
            );
        }
        Self {
            stage: StageConfig::read(r, "0.0.0.0:9101", 16),
            http_addr: r.addr("HTTP_ADDR", "0.0.0.0:8000"),
            database: DatabaseConfig::read(r),
            api_keys,
            cors_origins,
            max_content_chars: r.ranged("MAX_CONTENT_CHARS", 50_000, 100..=1_000_000),
            max_body_bytes: r.ranged("MAX_BODY_BYTES", 1_048_576, 1024..=16_777_216),
            max_batch_bytes: r.ranged("MAX_BATCH_BYTES", 16_777_216, 1024..=268_435_456),
            rate_limit_per_minute: r.ranged("RATE_LIMIT_PER_MINUTE", 600, 0..=1_000_000),
            rate_limit_burst: r.ranged("RATE_LIMIT_BURST", 60, 1..=100_000),
            request_timeout: r.seconds("REQUEST_TIMEOUT_SECS", 30, 1..=600),
            form_wait: r.seconds("FORM_WAIT_SECS", 120, 1..=600),
            redis: RedisConfig::read(r),
            books_interval: r.seconds("BOOKS_INTERVAL_SECS", 15, 1..=3600),
        }
    }
}

/// `scheme://host[:port]`, as browsers send in `Origin`.
fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else { return false };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && rest.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use halakha_common::config::Map;

    #[test]
    fn an_empty_environment_names_every_required_variable() {
        let src = Map::default();
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        let errors = r.finish(c).expect_err("required variables are missing");
        assert_eq!(errors.names(), vec!["API_KEYS", "DATABASE_URL"]);
    }

    #[test]
    fn origins_must_be_scheme_and_host_only() {
        assert!(valid_origin("https://halakha.example.org"));
        assert!(valid_origin("http://localhost:3000"));
        assert!(!valid_origin("https://example.org/path"));
        assert!(!valid_origin("example.org"));
        assert!(!valid_origin("ftp://example.org"));
    }

    #[test]
    fn short_keys_and_wildcard_origins_are_refused_without_echoing_them() {
        let src = Map::new([
            ("API_KEYS", "short-key-value-xyz"),
            ("CORS_ORIGINS", "*"),
            ("DATABASE_URL", "postgres://localhost/x"),
            ("PIPELINE_NAMESPACE", "Bad.Name"),
        ]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        let errors = r.finish(c).expect_err("invalid");
        assert_eq!(errors.names(), vec!["API_KEYS", "CORS_ORIGINS", "PIPELINE_NAMESPACE"]);
        assert!(!errors.to_string().contains("short-key-value-xyz"));
    }
}
