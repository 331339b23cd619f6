//! `halakha-enrich`: structures each text with an OpenAI-compatible chat
//! completion (JSON schema, strict) and publishes `<ns>.enriched`.

pub mod config;
pub mod llm;
pub mod prompt;

use std::net::SocketAddr;
use std::sync::Arc;

use halakha_common::StageError;
use halakha_common::envelope::{Enriched, Ingested, SCHEMA_VERSION};
use halakha_nats::Stage;
use halakha_nats::runner::{Delivery, Handler};
use halakha_nats::stage::{Prepared, StageStartError};
use tokio_util::sync::CancellationToken;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Stage(#[from] StageStartError),
    #[error("could not read the prompt files")]
    Prompt(#[source] std::io::Error),
    #[error("could not build the HTTP client")]
    Http(#[from] reqwest::Error),
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
    stage: Prepared,
    handler: Arc<EnrichHandler>,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let prompt = prompt::Prompt::load(config.prompt_dir.as_deref()).map_err(StartError::Prompt)?;
        halakha_common::install_crypto_provider();
        let llm = llm::Llm::new(&config)?;
        let stage = Prepared::new(Stage::Enrich, &config.stage).await?;
        tracing::info!(model = %config.openai_model, prompt_version = %prompt.version, "Enrichment configured");
        Ok(Self { stage, handler: Arc::new(EnrichHandler { llm, prompt }) })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.stage.metrics_addr()
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        Ok(self.stage.serve(self.handler, None, shutdown).await?)
    }
}
