//! `halakha-enrich`: structures each text with an OpenAI-compatible chat
//! completion (JSON schema, strict) and publishes `<ns>.enriched`.

pub mod config;
pub mod llm;
pub mod prompt;

use std::net::SocketAddr;
use std::sync::Arc;

use halakha_common::envelope::{Enriched, Ingested, SCHEMA_VERSION};
use halakha_common::health::{self, BoundServer, Readiness};
use halakha_common::{StageError, metrics as m};
use halakha_nats::runner::{Delivery, Handler};
use halakha_nats::{Names, Runner, Stage, connect, topology};
use tokio_util::sync::CancellationToken;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not connect to NATS")]
    Nats(#[from] async_nats::ConnectError),
    #[error("could not apply the JetStream topology")]
    Topology(#[from] topology::TopologyError),
    #[error("could not start the consumer")]
    Runner(#[from] halakha_nats::runner::RunnerError),
    #[error("could not read the prompt files")]
    Prompt(#[source] std::io::Error),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
    #[error("could not bind METRICS_ADDR on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The enrich handler: one structured completion per text.
pub struct EnrichHandler {
    llm: llm::Llm,
    prompt: prompt::Prompt,
}

impl Handler for EnrichHandler {
    type Input = Ingested;
    type Output = Enriched;

    async fn handle(&self, input: Ingested, _delivery: &Delivery) -> Result<Option<Enriched>, StageError> {
        let (enrichment, usage) = self.llm.enrich(&self.prompt, &input).await?;
        tracing::info!(id = %input.id, total_tokens = usage.total_tokens, "Enriched");
        Ok(Some(Enriched {
            schema_version: SCHEMA_VERSION,
            id: input.id,
            halakha: input.halakha,
            enrichment,
            model: self.llm.model().to_owned(),
            prompt_version: self.prompt.version.clone(),
            usage,
        }))
    }
}

pub struct App {
    admin: BoundServer,
    runner: Runner,
    handler: Arc<EnrichHandler>,
    client: async_nats::Client,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        halakha_common::install_crypto_provider();
        let metrics = m::install_recorder();
        let readiness = Readiness::new();
        let names = Names::new(config.namespace.clone());
        let prompt = prompt::Prompt::load(config.prompt_dir.as_deref()).map_err(StartError::Prompt)?;
        let llm = llm::Llm::new(&config)?;
        let (client, js) = connect::connect(&config.nats_url, "halakha-enrich", readiness.register("nats")).await?;
        topology::apply_streams(&js, &names).await?;
        let runner =
            Runner::bind(&js, &names, Stage::Enrich, config.runner.clone(), readiness.register("consumer")).await?;
        let addr = config.telemetry.metrics_addr;
        let admin = BoundServer::bind(addr, health::routes(metrics, readiness))
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        tracing::info!(model = %config.openai_model, prompt_version = %prompt.version, "Enrichment configured");
        Ok(Self { admin, runner, handler: Arc::new(EnrichHandler { llm, prompt }), client })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let Self { admin, runner, handler, client } = self;
        tracing::info!(metrics = ?admin.local_addr().ok(), "halakha-enrich started");
        let stop_admin = CancellationToken::new();
        let admin_task = tokio::spawn(admin.serve(stop_admin.clone()));
        runner.run(handler, shutdown).await;
        let _ = client.flush().await;
        stop_admin.cancel();
        let _ = admin_task.await;
    }
}
