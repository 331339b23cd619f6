//! `halakha-enrich`: structures each text with an OpenAI-compatible chat
//! completion (JSON schema, strict) and publishes `<ns>.enriched`.

pub mod config;
pub mod limits;
pub mod llm;
pub mod prompt;
pub mod rules;

use std::net::SocketAddr;
use std::sync::Arc;

use halakha_common::StageError;
use halakha_common::cache::{self, Cache};
use halakha_common::envelope::{Enriched, Enrichment, Ingested, SCHEMA_VERSION, Usage};
use halakha_common::text::sha256_hex;
use halakha_nats::Stage;
use halakha_nats::runner::{Delivery, Handled, Handler};
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
    #[error(transparent)]
    Cache(#[from] cache::InvalidRedisUrl),
}

/// The enrich handler: one structured completion per text, cached.
pub struct EnrichHandler {
    llm: llm::Llm,
    prompt: prompt::Prompt,
    cache: Arc<Cache>,
    cache_prefix: String,
}

impl EnrichHandler {
    /// The cache key: what determines the answer (the text and its declared
    /// language, the model, the instructions and the schema version).
    fn cache_key(&self, input: &Ingested) -> String {
        let lang = input.halakha.lang.map(|l| l.as_str()).unwrap_or("");
        let text = sha256_hex(format!("{lang}\0{}", input.halakha.content).as_bytes());
        format!("{}:v{SCHEMA_VERSION}:{}:{}:{text}", self.cache_prefix, self.llm.model(), self.prompt.version)
    }
}

impl Handler for EnrichHandler {
    type Input = Ingested;
    type Output = Enriched;

    fn dead_letter_context(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("model".to_owned(), self.llm.model().to_owned()),
            ("prompt_version".to_owned(), self.prompt.version.clone()),
            ("schema_version".to_owned(), SCHEMA_VERSION.to_string()),
        ]
        .into()
    }

    async fn handle(&self, input: Ingested, _delivery: &Delivery) -> Result<Handled<Enriched>, StageError> {
        // With the cache off, no key and no copy to store: a SHA-256 over
        // the text (1.9 % of enrich's samples in the bench's profile) and
        // a serialised answer, made for nothing.
        let key = self.cache.is_on().then(|| self.cache_key(&input));
        let cached = match &key {
            Some(key) => self.cache.get(key).await.and_then(|bytes| serde_json::from_slice::<Enrichment>(&bytes).ok()),
            None => None,
        };
        let (enrichment, usage) = match cached {
            Some(enrichment) => {
                tracing::info!(id = %input.id, "Enrichment found in the cache; no API call");
                (enrichment, Usage::default())
            }
            None => {
                let (enrichment, usage) = self.llm.enrich(&self.prompt, &input).await?;
                if let Some(key) = &key
                    && let Ok(bytes) = serde_json::to_vec(&enrichment)
                {
                    self.cache.set(key, &bytes).await;
                }
                tracing::debug!(id = %input.id, total_tokens = usage.total_tokens, "Enriched");
                (enrichment, usage)
            }
        };
        Ok(Handled::Publish(Enriched {
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
        // First: series created before the recorder would be lost.
        halakha_common::metrics::install_recorder();
        let prompt = prompt::Prompt::load(config.prompt_dir.as_deref()).map_err(StartError::Prompt)?;
        halakha_common::install_crypto_provider();
        let cache = Arc::new(match &config.redis.url {
            Some(url) => Cache::new(url, config.cache_ttl)?,
            None => {
                tracing::info!("REDIS_URL is not set: the enrichment cache is off, provider limits are per replica");
                Cache::off()
            }
        });
        let limits =
            Arc::new(limits::Limits::new(config.limits.clone(), cache.clone(), config.stage.namespace.as_str()));
        let llm = llm::Llm::new(&config, limits)?;
        let cache_prefix = format!("{}:enrich", config.stage.namespace);
        let stage = Prepared::new(Stage::Enrich, &config.stage).await?;
        cache.report_health(&stage.readiness);
        stage.readiness.info(
            "openai",
            serde_json::json!({"status": "configured", "base_url": config.openai_base_url, "model": config.openai_model}),
        );
        tracing::info!(model = %config.openai_model, prompt_version = %prompt.version, "Enrichment configured");
        Ok(Self { stage, handler: Arc::new(EnrichHandler { llm, prompt, cache, cache_prefix }) })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.stage.metrics_addr()
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        Ok(self.stage.serve(self.handler, None, Vec::new(), shutdown).await?)
    }
}
