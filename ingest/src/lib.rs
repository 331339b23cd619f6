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

use halakha_common::health::{self, BoundServer, Readiness};
use halakha_common::{db, metrics as m};
use halakha_nats::names::Subject;
use halakha_nats::{Names, Publisher, Runner, Stage, connect, topology};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not connect to NATS")]
    Nats(#[from] async_nats::ConnectError),
    #[error("could not apply the JetStream topology")]
    Topology(#[from] topology::TopologyError),
    #[error("could not start the consumer")]
    Runner(#[from] halakha_nats::runner::RunnerError),
    #[error("database")]
    Db(#[from] db::DbError),
    #[error("could not bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed")]
    Serve(#[source] std::io::Error),
}

/// A started stage: bound, connected, not yet serving.
pub struct App {
    api: BoundServer,
    admin: BoundServer,
    runner: Runner,
    handler: Arc<service::SubmittedHandler>,
    readiness: Readiness,
    client: async_nats::Client,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        halakha_common::install_crypto_provider();
        let metrics = m::install_recorder();
        let readiness = Readiness::new();
        let names = Names::new(config.namespace.clone());

        let (client, js) = connect::connect(&config.nats_url, "halakha-ingest", readiness.register("nats")).await?;
        topology::apply_streams(&js, &names).await?;

        let pool = db::pool(&config.database)?;
        db::migrate(&pool).await?;

        let ingestor = service::Ingestor { pool, max_content_chars: config.max_content_chars };
        let publisher = Publisher::new(js.clone());
        let runner =
            Runner::bind(&js, &names, Stage::Ingest, config.runner.clone(), readiness.register("consumer")).await?;

        let state = http::ApiState {
            ingestor: ingestor.clone(),
            publisher,
            ingested_subject: names.subject(Subject::Ingested),
            keys: Arc::new(http::ApiKeys::new(&config.api_keys)),
        };
        let health_routes = health::routes(metrics.clone(), readiness.clone());
        let api_router = http::routes(state, config.max_body_bytes).merge(health_routes.clone());
        let api = BoundServer::bind(config.http_addr, api_router).await.map_err(|source| StartError::Bind {
            what: "HTTP_ADDR",
            addr: config.http_addr,
            source,
        })?;
        let admin = BoundServer::bind(config.telemetry.metrics_addr, health_routes)
            .await
            .map_err(|source| StartError::Bind { what: "METRICS_ADDR", addr: config.telemetry.metrics_addr, source })?;

        Ok(Self { api, admin, runner, handler: Arc::new(service::SubmittedHandler { ingestor }), readiness, client })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.api.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serve until `shutdown` is cancelled, then drain: the consumer stops
    /// fetching and finishes what it holds, the API finishes open requests.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self { api, admin, runner, handler, readiness: _, client } = self;
        tracing::info!(http = %api.local_addr().map_err(StartError::Serve)?, metrics = %admin.local_addr().map_err(StartError::Serve)?, "halakha-ingest started");
        let stop_api = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let api_task = tokio::spawn(api.serve(stop_api.clone()));
        let admin_task = tokio::spawn(admin.serve(stop_admin.clone()));
        runner.run(handler, shutdown.clone()).await;
        stop_api.cancel();
        let api_result = api_task.await;
        let _ = client.flush().await;
        stop_admin.cancel();
        let _ = admin_task.await;
        match api_result {
            Ok(r) => r.map_err(StartError::Serve),
            Err(_) => Ok(()),
        }
    }
}
