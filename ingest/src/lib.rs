//! `halakha-ingest`: the pipeline's front door.
//!
//! Accepts texts over HTTP (`POST /v1/halakhot`) and on `<ns>.submitted`,
//! validates and normalises them, derives the stable id, records them as
//! `accepted` in Postgres and publishes `<ns>.ingested`.

pub mod config;
pub mod http;
pub mod service;
pub mod store;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use halakha_common::db;
use halakha_common::health::{BoundServer, Readiness};
use halakha_nats::names::Subject;
use halakha_nats::stage::{Prepared, StageStartError, bind};
use halakha_nats::{Publisher, Runner, Stage};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Stage(#[from] StageStartError),
    #[error("database")]
    Db(#[from] db::DbError),
}

/// A started stage: bound, connected, not yet serving.
pub struct App {
    stage: Prepared,
    api: BoundServer,
    handler: Arc<service::SubmittedHandler>,
    status: Runner,
    status_handler: Arc<service::StatusHandler>,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let pool = db::pool(&config.database)?;
        db::migrate(&pool).await?;
        let stage = Prepared::new(Stage::Ingest, &config.stage).await?;
        let status = stage.bind_extra(stage.names.status_route(), "status_consumer").await?;
        let status_handler = Arc::new(service::StatusHandler { pool: pool.clone() });
        let ingestor = service::Ingestor { pool, max_content_chars: config.max_content_chars };
        let state = http::ApiState {
            ingestor: ingestor.clone(),
            publisher: Publisher::new(stage.js.clone()),
            ingested_subject: stage.names.subject(Subject::Ingested),
            keys: Arc::new(http::ApiKeys::new(&config.api_keys)),
        };
        let router = http::routes(state, config.max_body_bytes).merge(stage.health_routes());
        let api = bind("HTTP_ADDR", config.http_addr, router).await?;
        Ok(Self { stage, api, handler: Arc::new(service::SubmittedHandler { ingestor }), status, status_handler })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.api.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.stage.metrics_addr()
    }

    pub fn readiness(&self) -> Readiness {
        self.stage.readiness.clone()
    }

    /// Serve until `shutdown` is cancelled, then drain: the consumer stops
    /// fetching and finishes what it holds, the API finishes open requests.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let status = Box::pin(self.status.run(self.status_handler, shutdown.clone()));
        Ok(self.stage.serve(self.handler, Some(self.api), vec![status], shutdown).await?)
    }
}
