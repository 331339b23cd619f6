//! What every stage binary does around its handler: connect, apply the
//! topology, bind the consumer and the admin server, then serve until
//! shutdown and drain in order (readiness first, consumer, API, admin last).

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::jetstream;
use halakha_common::config::{Reader, TelemetryConfig};
use halakha_common::health::{self, BoundServer, Readiness};
use halakha_common::metrics as m;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};

use crate::names::{Names, Namespace, Route, Stage};
use crate::runner::{Handler, Runner, RunnerConfig, RunnerError};
use crate::topology::{self, TopologyError};

/// Why a stage could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum StageStartError {
    #[error("could not connect to NATS")]
    Nats(#[from] async_nats::ConnectError),
    #[error("could not apply the JetStream topology")]
    Topology(#[from] TopologyError),
    #[error("could not start the consumer")]
    Runner(#[from] RunnerError),
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

/// The settings every stage shares: NATS, namespace, telemetry, runner.
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// May carry credentials (`nats://user:password@host`): kept secret.
    pub nats_url: SecretString,
    pub namespace: Namespace,
    /// Replicas of each stream (`STREAM_REPLICAS`, 1..=5).
    pub stream_replicas: usize,
    pub telemetry: TelemetryConfig,
    pub runner: RunnerConfig,
}

impl StageConfig {
    /// Read the shared variables with the stage's defaults.
    pub fn read(r: &mut Reader<'_>, default_metrics_addr: &str, default_concurrency: usize) -> Self {
        Self {
            nats_url: SecretString::from(r.string_or("NATS_URL", "nats://127.0.0.1:4222")),
            namespace: r.parse_or("PIPELINE_NAMESPACE", Namespace::default()),
            stream_replicas: r.ranged("STREAM_REPLICAS", 1, 1..=5),
            telemetry: TelemetryConfig::read(r, default_metrics_addr),
            runner: RunnerConfig::read(r, default_concurrency),
        }
    }
}

/// A stage connected and bound, ready to serve.
pub struct Prepared {
    pub names: Names,
    pub js: jetstream::Context,
    pub readiness: Readiness,
    pub metrics: PrometheusHandle,
    client: async_nats::Client,
    runner: Runner,
    runner_config: RunnerConfig,
    admin: BoundServer,
}

/// Bind a TCP address, naming the variable it came from on failure.
pub async fn bind(what: &'static str, addr: SocketAddr, router: axum::Router) -> Result<BoundServer, StageStartError> {
    BoundServer::bind(addr, router).await.map_err(|source| StageStartError::Bind { what, addr, source })
}

impl Prepared {
    /// Connect to NATS, apply the streams and the stage's consumer, bind
    /// `METRICS_ADDR`.
    pub async fn new(stage: Stage, c: &StageConfig) -> Result<Self, StageStartError> {
        halakha_common::install_crypto_provider();
        let metrics = m::install_recorder();
        let readiness = Readiness::new();
        let names = Names::new(c.namespace.clone()).with_stream_replicas(c.stream_replicas);
        let client_name = format!("halakha-{stage}");
        m::build_info(client_name.clone());
        let (client, js) =
            crate::connect::connect(c.nats_url.expose_secret(), &client_name, readiness.register("nats")).await?;
        topology::apply_streams(&js, &names).await?;
        let runner = Runner::bind(
            &js,
            &names,
            names.route(stage),
            c.runner.clone(),
            readiness.register("consumer"),
            readiness.register("progress"),
        )
        .await?;
        let admin =
            bind("METRICS_ADDR", c.telemetry.metrics_addr, health::routes(metrics.clone(), readiness.clone())).await?;
        Ok(Self { names, js, readiness, metrics, client, runner, runner_config: c.runner.clone(), admin })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Bind a further consumer loop of this stage (run it with
    /// [`Runner::run`] and hand the future to [`Prepared::serve`]).
    pub async fn bind_extra(&self, route: Route, ready_name: &'static str) -> Result<Runner, StageStartError> {
        let flag = self.readiness.register(ready_name);
        let progress = self.readiness.register(route.name);
        Ok(Runner::bind(&self.js, &self.names, route, self.runner_config.clone(), flag, progress).await?)
    }

    /// The NATS connection, for subscriptions of the stage's own.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// The health routes, to merge into a stage's own API.
    pub fn health_routes(&self) -> axum::Router {
        health::routes(self.metrics.clone(), self.readiness.clone())
    }

    /// Serve until `shutdown`, then drain: the consumers stop fetching and
    /// finish what they hold, the API (if any) finishes open requests,
    /// pending publishes are flushed, the admin server stops last.
    /// `extra` are further consumer loops, built on the same `shutdown`.
    pub async fn serve<H: Handler>(
        self,
        handler: Arc<H>,
        api: Option<BoundServer>,
        extra: Vec<BoxFuture<'static, ()>>,
        shutdown: CancellationToken,
    ) -> Result<(), StageStartError> {
        let Self { runner, admin, client, readiness, .. } = self;
        // Not ready from the first moment of shutdown: load balancers and
        // orchestrators stop sending work while the stage drains.
        let running = readiness.register("running");
        running.set(true);
        let watch = shutdown.clone();
        tokio::spawn(async move {
            watch.cancelled().await;
            running.set(false);
        });
        let stage = runner.route().stage;
        tracing::info!(
            stage = %stage,
            metrics_addr = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            http_addr = %api.as_ref().and_then(|a| a.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
            "Stage started"
        );
        let stop_admin = CancellationToken::new();
        let admin_task = tokio::spawn(admin.serve(stop_admin.clone()));
        let stop_api = CancellationToken::new();
        let api_task = api.map(|a| tokio::spawn(a.serve(stop_api.clone())));
        futures::future::join(runner.run(handler, shutdown), futures::future::join_all(extra)).await;
        stop_api.cancel();
        let api_result = match api_task {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        if let Err(error) = client.flush().await {
            tracing::warn!(%error, "Could not flush NATS on shutdown");
        }
        stop_admin.cancel();
        let _ = admin_task.await;
        tracing::info!(stage = %stage, "Stage stopped");
        api_result.map_err(StageStartError::Serve)
    }
}

/// A token cancelled on the first SIGINT or SIGTERM: the stage drains. A
/// second signal exits at once (status 130), for an operator who will not
/// wait for the drain.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let mut signals = halakha_common::shutdown::Signals::new();
    tokio::spawn(async move {
        let first = signals.next().await;
        tracing::info!(signal = first, "Shutdown requested; draining (a second signal exits at once)");
        trigger.cancel();
        let second = signals.next().await;
        tracing::warn!(signal = second, "Second signal: exiting now without finishing the drain");
        halakha_common::telemetry::finish();
        std::process::exit(130);
    });
    token
}
