//! Readiness latch and the small HTTP server for `/metrics`, `/health`
//! and `/health/ready`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A set of named conditions; the process is ready when all hold.
///
/// Each subsystem (NATS connection, database, consumer loop) registers its
/// own condition, so `/health/ready` can say which one is failing.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a condition, initially not ready.
    pub fn register(&self, name: &'static str) -> ReadyFlag {
        self.set(name, false);
        ReadyFlag { readiness: self.clone(), name }
    }

    fn set(&self, name: &'static str, ok: bool) {
        if let Ok(mut checks) = self.checks.lock() {
            checks.insert(name, ok);
        }
    }

    /// Names of the conditions that do not hold.
    pub fn failing(&self) -> Vec<&'static str> {
        match self.checks.lock() {
            Ok(checks) => checks.iter().filter(|(_, ok)| !**ok).map(|(n, _)| *n).collect(),
            Err(_) => vec!["poisoned"],
        }
    }

    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }
}

/// One condition of a [`Readiness`].
#[derive(Clone)]
pub struct ReadyFlag {
    readiness: Readiness,
    name: &'static str,
}

impl ReadyFlag {
    pub fn set(&self, ok: bool) {
        self.readiness.set(self.name, ok);
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// The `/metrics`, `/health` and `/health/ready` routes, to serve alone on
/// `METRICS_ADDR` or to merge into an API router.
pub fn routes(metrics: PrometheusHandle, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(|| async { (StatusCode::OK, axum::Json(serde_json::json!({"status": "ok"}))) }))
        .route("/health/ready", get(ready))
        .with_state(AdminState { metrics, readiness })
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render())
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let failing = s.readiness.failing();
    if failing.is_empty() {
        (StatusCode::OK, axum::Json(serde_json::json!({"status": "ready"})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"status": "not_ready", "failing": failing})))
    }
}

/// A bound HTTP server, not yet serving.
pub struct BoundServer {
    listener: TcpListener,
    router: Router,
}

impl BoundServer {
    pub async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        Ok(Self { listener: TcpListener::bind(addr).await?, router })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` is cancelled, then finish open requests.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        axum::serve(self.listener, self.router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_failing_until_every_flag_is_set() {
        let r = Readiness::new();
        let nats = r.register("nats");
        let db = r.register("database");
        assert_eq!(r.failing(), vec!["database", "nats"]);
        nats.set(true);
        db.set(true);
        assert!(r.is_ready());
        db.set(false);
        assert_eq!(r.failing(), vec!["database"]);
    }
}
