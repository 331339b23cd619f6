//! Configuration of `halakha-publish`.

use std::time::Duration;

use halakha_common::config::{DatabaseConfig, Reader, RedisConfig};
use halakha_nats::stage::StageConfig;
use secrecy::SecretString;

/// Where pages go: a database (API versions up to 2022-06-28) or a data
/// source (2025-09-03 and later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    Database(String),
    DataSource(String),
}

/// Names of the posts database's properties (defaults: the original's).
#[derive(Debug, Clone)]
pub struct Properties {
    pub title: String,
    pub text_post: String,
    pub legend: String,
    pub content: String,
    pub date: String,
    pub status: String,
    pub image: String,
    pub halakha_id: String,
}

impl Properties {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            title: r.string_or("NOTION_PROPERTY_TITLE", "question"),
            text_post: r.string_or("NOTION_PROPERTY_TEXT_POST", "text_post"),
            legend: r.string_or("NOTION_PROPERTY_LEGEND", "legend"),
            content: r.string_or("NOTION_PROPERTY_CONTENT", "content"),
            date: r.string_or("NOTION_PROPERTY_DATE", "date_post"),
            status: r.string_or("NOTION_PROPERTY_STATUS", "status"),
            image: r.string_or("NOTION_PROPERTY_IMAGE", "Image"),
            halakha_id: r.string_or("NOTION_PROPERTY_HALAKHA_ID", "Halakha ID"),
        }
    }
}

/// The Notion sink, present when `NOTION_TOKEN` is set.
#[derive(Debug, Clone)]
pub struct NotionConfig {
    pub token: SecretString,
    pub parent: Parent,
    pub base_url: String,
    pub version: String,
    pub timeout: Duration,
    /// The `status` given to new pages (`NOTION_STATUS`).
    pub status: String,
    pub properties: Properties,
    /// Requests per second for the integration (`NOTION_REQUESTS_PER_SECOND`).
    pub requests_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// NATS, namespace, telemetry and consumer tuning.
    pub stage: StageConfig,
    pub database: DatabaseConfig,
    pub notion: Option<NotionConfig>,
    /// Shared Notion rate limit across replicas (`REDIS_URL`).
    pub redis: RedisConfig,
}

impl Config {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let token = r.optional_secret("NOTION_TOKEN");
        let database_id = r.raw("NOTION_DATABASE_ID");
        let data_source_id = r.raw("NOTION_DATA_SOURCE_ID");
        let properties = Properties::read(r);
        let requests_per_second = r.ranged("NOTION_REQUESTS_PER_SECOND", 3, 1..=100);
        let base_url = r.string_or("NOTION_BASE_URL", "https://api.notion.com");
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            r.error("NOTION_BASE_URL", "must be an http:// or https:// URL");
        }
        let version = r.string_or("NOTION_VERSION", "2022-06-28");
        let timeout = r.seconds("NOTION_TIMEOUT_SECS", 60, 30..=120);
        let status = r.string_or("NOTION_STATUS", "En cours");
        let parent = match (database_id, data_source_id) {
            (Some(d), None) => Some(Parent::Database(d)),
            (None, Some(d)) => Some(Parent::DataSource(d)),
            (Some(_), Some(_)) => {
                r.error("NOTION_DATA_SOURCE_ID", "set NOTION_DATABASE_ID or NOTION_DATA_SOURCE_ID, not both");
                None
            }
            (None, None) => None,
        };
        let notion = match (token, parent) {
            (Some(token), Some(parent)) => Some(NotionConfig {
                token,
                parent,
                base_url: base_url.trim_end_matches('/').to_owned(),
                version,
                timeout,
                status,
                properties,
                requests_per_second,
            }),
            (Some(_), None) => {
                r.error("NOTION_DATABASE_ID", "required when NOTION_TOKEN is set (or NOTION_DATA_SOURCE_ID)");
                None
            }
            (None, _) => None,
        };
        Self {
            stage: StageConfig::read(r, "0.0.0.0:9103", 4),
            database: DatabaseConfig::read(r),
            notion,
            redis: RedisConfig::read(r),
        }
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
