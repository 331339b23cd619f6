//! `halakha-publish`: the sinks. Each enriched halakha becomes one row in
//! Postgres and (when `NOTION_TOKEN` is set) one Notion page, then
//! `<ns>.published` is announced.

pub mod config;
pub mod notion;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use deadpool_postgres::Pool;
use halakha_common::cache::{self, Cache};
use halakha_common::envelope::{Enriched, Published, SCHEMA_VERSION};
use halakha_common::{StageError, db, metrics as m};
use halakha_nats::Stage;
use halakha_nats::runner::{Delivery, Handled, Handler};
use halakha_nats::stage::{Prepared, StageStartError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Stage(#[from] StageStartError),
    #[error("database")]
    Db(#[from] db::DbError),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Redis(#[from] cache::InvalidRedisUrl),
}

fn db_error(what: &str, e: db::DbError) -> StageError {
    e.into_stage_error(what)
}

/// Row first, then the page, then the row marked `published`.
pub struct PublishHandler {
    pool: Pool,
    /// The upserts, written in batches.
    rows: store::Rows,
    notion: Option<notion::Notion>,
}

impl Handler for PublishHandler {
    type Input = Enriched;
    type Output = Published;

    async fn handle(&self, input: Enriched, _delivery: &Delivery) -> Result<Handled<Published>, StageError> {
        // Without the Notion sink the row is published by its upsert: one
        // transaction per halakha. With it: the row, then the page, then
        // the row marked published.
        let (input, page) = match &self.notion {
            None => {
                let ((input, _), _) =
                    self.rows.write((input, true)).await.map_err(|e| db_error("store the halakha", e))?;
                (input, None)
            }
            Some(notion) => {
                let ((input, _), state) =
                    self.rows.write((input, false)).await.map_err(|e| db_error("store the halakha", e))?;
                metrics::counter!(m::DB_WRITES_TOTAL, "status" => "enriched").increment(1);
                let page = self.page(notion, &input, state).await?;
                store::mark_published(&self.pool, &input.id, Some(&page.id), Some(&page.url))
                    .await
                    .map_err(|e| db_error("mark the halakha published", e))?;
                (input, Some(page))
            }
        };
        metrics::counter!(m::DB_WRITES_TOTAL, "status" => "published").increment(1);
        let (page_id, page_url) = (page.as_ref().map(|p| p.id.clone()), page.as_ref().map(|p| p.url.clone()));
        tracing::debug!(id = %input.id, notion_page = page_id.as_deref().unwrap_or("-"), "Published");
        Ok(Handled::Publish(Published {
            schema_version: SCHEMA_VERSION,
            date_post: input.halakha.date_post(),
            id: input.id,
            title: input.enrichment.title,
            status: "published".into(),
            notion_page_id: page_id,
            notion_page_url: page_url.filter(|u| !u.is_empty()),
            published_at: OffsetDateTime::now_utc(),
        }))
    }
}

impl PublishHandler {
    /// Exactly one complete page per id. Notion has no idempotency key, so:
    /// a page id stored in Postgres is reused; else, when a create was set
    /// out on before (its answer may have been lost), a page whose
    /// `Halakha ID` is this id is looked up and reused; else the page is
    /// created (one request) and its id stored at once. Blocks beyond the
    /// first 100 are appended, resuming after the ones a page already has.
    async fn page(
        &self,
        notion: &notion::Notion,
        input: &Enriched,
        state: store::NotionState,
    ) -> Result<notion::Page, StageError> {
        let blocks = notion::blocks(input);
        let found = match (&state.page_id, state.create_started) {
            (None, true) => notion.find(&input.id).await?,
            _ => None,
        };
        let (page, complete_up_to) = match (state.page_id, found) {
            (Some(id), _) => (notion::Page { id, url: state.page_url.unwrap_or_default() }, None),
            (None, Some(found)) => {
                tracing::info!(id = %input.id, page = %found.id, "Notion page found by Halakha ID; reusing it");
                store::store_page(&self.pool, &input.id, &found.id, &found.url)
                    .await
                    .map_err(|e| db_error("store the Notion page", e))?;
                (found, None)
            }
            (None, None) => {
                let created = notion.create(input, &blocks).await?;
                store::store_page(&self.pool, &input.id, &created.id, &created.url)
                    .await
                    .map_err(|e| db_error("store the Notion page", e))?;
                (created, Some(blocks.len().min(notion::MAX_ITEMS)))
            }
        };
        if blocks.len() > notion::MAX_ITEMS {
            let existing = match complete_up_to {
                Some(n) => n,
                None => notion.count_children(&page.id).await?,
            };
            if existing < blocks.len() {
                notion.append(&page.id, &blocks[existing..]).await?;
            }
        }
        Ok(page)
    }
}

/// How publish's commits reach the disk: each waits for it. The input is
/// acknowledged after the upsert, and nothing upstream would write the row
/// again.
pub const COMMITS: db::Commits = db::Commits::Durable;

pub struct App {
    stage: Prepared,
    handler: Arc<PublishHandler>,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // First: series created before the recorder would be lost.
        halakha_common::metrics::install_recorder();
        halakha_common::install_crypto_provider();
        let shared = Arc::new(match &config.redis.url {
            Some(url) => Cache::new(url, std::time::Duration::from_secs(5))?,
            None => Cache::off(),
        });
        let notion_info = match &config.notion {
            Some(c) => serde_json::json!({"status": "configured", "base_url": c.base_url, "version": c.version}),
            None => serde_json::json!({"status": "disabled"}),
        };
        let redis = shared.clone();
        let notion = match config.notion.clone() {
            Some(c) => {
                let rate = notion::RateLimit::new(c.requests_per_second, shared, config.stage.namespace.as_str());
                Some(notion::Notion::new(c, rate)?)
            }
            None => {
                tracing::warn!("NOTION_TOKEN is not set: the Notion sink is off, halakhot are only stored in Postgres");
                None
            }
        };
        let pool = db::pool_with(&config.database, COMMITS)?;
        if config.database.migrate_on_start {
            db::migrate(&pool).await?;
        }
        let stage = Prepared::new(Stage::Publish, &config.stage).await?;
        db::report_health(&pool, &stage.readiness);
        redis.report_health(&stage.readiness);
        stage.readiness.info("notion", notion_info);
        let rows = store::rows(pool.clone(), &config.database);
        Ok(Self { stage, handler: Arc::new(PublishHandler { pool, rows, notion }) })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.stage.metrics_addr()
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        Ok(self.stage.serve(self.handler, None, Vec::new(), shutdown).await?)
    }
}
