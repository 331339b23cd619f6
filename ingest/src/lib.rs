//! `halakha-ingest`: the pipeline's front door.
//!
//! Accepts texts over HTTP (`POST /v1/halakhot`, the batch route, the
//! original service's form route) and on `<ns>.submitted`, validates and
//! normalises them, derives the stable id, records them as `accepted` in
//! Postgres and publishes `<ns>.ingested`. It also marks dead-lettered
//! items `failed`, so their status says why.

pub mod config;
pub mod errors;
pub mod form;
pub mod guard;
pub mod http;
pub mod service;
pub mod store;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use halakha_common::cache::{self, Cache};
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
    #[error(transparent)]
    Redis(#[from] cache::InvalidRedisUrl),
}

pub use halakha_common::error::chain as error_chain;

/// Keep the invariant gauge: halakhot still open in Postgres minus the
/// messages waiting at enrich and publish (pending or unacknowledged).
async fn keep_the_books(
    pool: deadpool_postgres::Pool,
    js: async_nats::jetstream::Context,
    names: halakha_nats::Names,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let namespace = names.namespace().to_string();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Ok(status) = halakha_nats::ops::status(&js, &names).await else { continue };
        // Until every stage has run once, messages can wait where no
        // consumer counts them: no figure rather than a false alarm.
        if status.stages.iter().any(|s| !s.present) {
            continue;
        }
        if let Ok(n) = halakha_nats::ops::unaccounted(&pool, &status).await {
            metrics::gauge!(halakha_common::metrics::PIPELINE_UNACCOUNTED, "namespace" => namespace.clone())
                .set(n as f64);
        }
    }
}

/// How ingest's commits reach the disk: its claims do not wait for it. The
/// submission's durable record is its JetStream message, published (PubAck
/// awaited) before it is acknowledged or answered; a claim lost in a crash
/// of Postgres only lets a resubmission through again, to sinks that are
/// idempotent, and publish writes the row whole. The `failed` status waits
/// all the same ([`store::mark_failed`]).
pub const COMMITS: db::Commits = db::Commits::Relaxed;

/// A started stage: bound, connected, not yet serving.
pub struct App {
    stage: Prepared,
    api: BoundServer,
    handler: Arc<service::SubmittedHandler>,
    status: Runner,
    status_handler: Arc<service::StatusHandler>,
    advisories: Runner,
    advisory_handler: Arc<halakha_nats::advisory::AdvisoryHandler>,
    events: form::Events,
    form_linger: std::time::Duration,
    waiters: Arc<form::Waiters>,
    pool: deadpool_postgres::Pool,
    books_every: std::time::Duration,
}

impl App {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // First: series created before the recorder would be lost.
        halakha_common::metrics::install_recorder();
        let pool = db::pool_with(&config.database, COMMITS)?;
        if config.database.migrate_on_start {
            db::migrate(&pool).await?;
        }
        let stage = Prepared::new(Stage::Ingest, &config.stage).await?;
        let status = stage.bind_extra(stage.names.status_route(), "status_consumer").await?;
        let status_handler = Arc::new(service::StatusHandler { pool: pool.clone() });
        let advisories = stage.bind_extra(stage.names.advisory_route(), "advisory_consumer").await?;
        let advisory_handler = Arc::new(halakha_nats::advisory::AdvisoryHandler {
            js: stage.js.clone(),
            names: stage.names.clone(),
            publisher: Publisher::new(stage.js.clone()),
            attempts: halakha_nats::topology::attempts_bucket(&stage.js, &stage.names).await,
        });

        // The form route waits for these events, subscribed while it does.
        let events = form::Events {
            client: stage.client(),
            published: stage.names.subject(Subject::Published),
            dead: stage.names.dlq_wildcard(),
        };
        let waiters = Arc::new(form::Waiters::default());

        let books_pool = pool.clone();
        // One for both paths (HTTP and `<ns>.submitted`).
        let ingestor = Arc::new(service::Ingestor {
            claims: store::claims(pool.clone(), &config.database),
            pool,
            publisher: Publisher::new(stage.js.clone()),
            ingested_subject: stage.names.subject(Subject::Ingested),
            max_content_chars: config.max_content_chars,
        });
        let shared = Arc::new(match &config.redis.url {
            Some(url) => Cache::new(url, std::time::Duration::from_secs(120))?,
            None => Cache::off(),
        });
        db::report_health(&books_pool, &stage.readiness);
        for via in ["http", "nats"] {
            for duplicate in ["true", "false"] {
                metrics::counter!(halakha_common::metrics::INGEST_ACCEPTED_TOTAL, "via" => via, "duplicate" => duplicate)
                    .increment(0);
            }
        }
        shared.report_health(&stage.readiness);
        let guard = Arc::new(guard::Guard {
            keys: guard::ApiKeys::new(&config.api_keys),
            limiter: guard::RateLimiter::new(
                config.rate_limit_per_minute,
                config.rate_limit_burst,
                shared,
                stage.names.namespace().as_str(),
            ),
        });
        let limits = http::Limits {
            max_body_bytes: config.max_body_bytes,
            max_batch_bytes: config.max_batch_bytes,
            request_timeout: config.request_timeout,
            form_wait: config.form_wait,
        };
        let state =
            http::ApiState { ingestor: ingestor.clone(), waiters: waiters.clone(), form_wait: config.form_wait };
        let cors = Arc::new(guard::Cors::new(&config.cors_origins));
        let router = http::routes(state, guard, cors, &limits).merge(stage.health_routes());
        let api = bind("HTTP_ADDR", config.http_addr, router).await?;
        Ok(Self {
            stage,
            api,
            handler: Arc::new(service::SubmittedHandler { ingestor }),
            status,
            status_handler,
            advisories,
            advisory_handler,
            events,
            form_linger: config.form_wait,
            waiters,
            pool: books_pool,
            books_every: config.books_interval,
        })
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

    /// Serve until `shutdown` is cancelled, then drain: the consumers stop
    /// fetching and finish what they hold, the API finishes open requests.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let status = Box::pin(self.status.run(self.status_handler, shutdown.clone()));
        let advisories = Box::pin(self.advisories.run(self.advisory_handler, shutdown.clone()));
        let stop_listening = CancellationToken::new();
        let listener = tokio::spawn(form::listen(self.events, self.waiters, self.form_linger, stop_listening.clone()));
        let books = tokio::spawn(keep_the_books(
            self.pool,
            self.stage.js.clone(),
            self.stage.names.clone(),
            self.books_every,
            stop_listening.clone(),
        ));
        let result = self.stage.serve(self.handler, Some(self.api), vec![status, advisories], shutdown).await;
        stop_listening.cancel();
        let _ = listener.await;
        let _ = books.await;
        Ok(result?)
    }
}
