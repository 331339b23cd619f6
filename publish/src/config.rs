//! Configuration of `halakha-publish`.

use std::time::Duration;

use halakha_common::config::{DatabaseConfig, Reader};
use halakha_nats::stage::StageConfig;
use secrecy::SecretString;

/// The Notion sink, present when `NOTION_TOKEN` is set.
#[derive(Debug, Clone)]
pub struct NotionConfig {
    pub token: SecretString,
    pub database_id: String,
    pub base_url: String,
    pub version: String,
    pub timeout: Duration,
    /// The `status` given to new pages (`NOTION_STATUS`).
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// NATS, namespace, telemetry and consumer tuning.
    pub stage: StageConfig,
    pub database: DatabaseConfig,
    pub notion: Option<NotionConfig>,
}

impl Config {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let token = r.optional_secret("NOTION_TOKEN");
        let database_id = r.raw("NOTION_DATABASE_ID");
        let base_url = r.string_or("NOTION_BASE_URL", "https://api.notion.com");
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            r.error("NOTION_BASE_URL", "must be an http:// or https:// URL");
        }
        let version = r.string_or("NOTION_VERSION", "2022-06-28");
        let timeout = r.seconds("NOTION_TIMEOUT_SECS", 60, 30..=120);
        let status = r.string_or("NOTION_STATUS", "En cours");
        let notion = match (token, database_id) {
            (Some(token), Some(database_id)) => Some(NotionConfig {
                token,
                database_id,
                base_url: base_url.trim_end_matches('/').to_owned(),
                version,
                timeout,
                status,
            }),
            (Some(_), None) => {
                r.error("NOTION_DATABASE_ID", "required when NOTION_TOKEN is set");
                None
            }
            (None, _) => None,
        };
        Self { stage: StageConfig::read(r, "0.0.0.0:9103", 4), database: DatabaseConfig::read(r), notion }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halakha_common::config::Map;

    #[test]
    fn an_empty_environment_names_the_database_and_leaves_notion_off() {
        let src = Map::default();
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        assert_eq!(r.finish(c).expect_err("missing").names(), vec!["DATABASE_URL"]);
    }

    #[test]
    fn a_notion_token_without_a_database_is_refused() {
        let src = Map::new([
            ("DATABASE_URL", "postgres://localhost/x"),
            ("NOTION_TOKEN", "secret_abc"),
            ("NOTION_TIMEOUT_SECS", "5"),
        ]);
        let mut r = Reader::new(&src);
        let c = Config::read(&mut r);
        let e = r.finish(c).expect_err("invalid");
        assert_eq!(e.names(), vec!["NOTION_TIMEOUT_SECS", "NOTION_DATABASE_ID"]);
        assert!(!e.to_string().contains("secret_abc"));
    }
}
