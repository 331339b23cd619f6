//! Configuration of `halakha-ingest`.

use std::net::SocketAddr;

use halakha_common::config::{DatabaseConfig, Reader};
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
        }
        Self {
            stage: StageConfig::read(r, "0.0.0.0:9101", 16),
            http_addr: r.addr("HTTP_ADDR", "0.0.0.0:8000"),
            database: DatabaseConfig::read(r),
            api_keys,
            cors_origins,
            max_content_chars: r.ranged("MAX_CONTENT_CHARS", 50_000, 100..=1_000_000),
            max_body_bytes: r.ranged("MAX_BODY_BYTES", 1_048_576, 1024..=16_777_216),
        }
    }
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
