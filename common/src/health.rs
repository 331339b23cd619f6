//! Readiness latch and the small HTTP server for `/metrics`, `/health`
//! and `/health/ready`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An active check of a dependency: `Err` says why it is down.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// How long one probe may take before the dependency counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
enum Dependency {
    /// Probed at each `/health/ready`; a required one that is down makes
    /// the stage not ready.
    Probe { required: bool, probe: Probe },
    /// Configuration only (an outside API is not called for a health
    /// check: it would cost quota): what the stage will use.
    Info(serde_json::Value),
}

/// A set of named conditions and dependencies; the process is ready when
/// every condition holds and every required dependency answers.
///
/// Each subsystem (NATS connection, consumer loop) registers its own
/// condition, and each dependency (Postgres, Redis) its probe, so
/// `/health/ready` can say which one is failing.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    dependencies: Arc<Mutex<BTreeMap<&'static str, Dependency>>>,
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

    /// Probe `name` at each readiness check.
    pub fn probe(&self, name: &'static str, required: bool, probe: Probe) {
        if let Ok(mut deps) = self.dependencies.lock() {
            deps.insert(name, Dependency::Probe { required, probe });
        }
    }

    /// Report `name`'s configuration (`{"status": "configured", ...}` or
    /// `{"status": "disabled"}`); never a secret.
    pub fn info(&self, name: &'static str, info: serde_json::Value) {
        if let Ok(mut deps) = self.dependencies.lock() {
            deps.insert(name, Dependency::Info(info));
        }
    }

    /// Every condition and dependency, probed now: the `/health/ready`
    /// answer, and whether the stage is ready.
    pub async fn report(&self) -> (bool, serde_json::Value) {
        use serde_json::{Value, json};
        let checks: BTreeMap<&'static str, bool> = self.checks.lock().map(|c| c.clone()).unwrap_or_default();
        let deps: Vec<(&'static str, Dependency)> =
            self.dependencies.lock().map(|d| d.iter().map(|(k, v)| (*k, v.clone())).collect()).unwrap_or_default();
        let probed = futures::future::join_all(deps.into_iter().map(|(name, dep)| async move {
            match dep {
                Dependency::Info(info) => (name, true, info),
                Dependency::Probe { required, probe } => {
                    let started = Instant::now();
                    let result = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
                    };
                    let latency_ms = started.elapsed().as_millis() as u64;
                    match result {
                        Ok(()) => (name, true, json!({"status": "up", "required": required, "latency_ms": latency_ms})),
                        Err(error) => {
                            (name, !required, json!({"status": "down", "required": required, "error": error}))
                        }
                    }
                }
            }
        }))
        .await;
        let mut failing: Vec<&'static str> = checks.iter().filter(|(_, ok)| !**ok).map(|(n, _)| *n).collect();
        let mut dependencies = serde_json::Map::new();
        // The NATS connection is a condition kept by the client's events.
        if let Some(up) = checks.get("nats") {
            dependencies.insert("nats".into(), json!({"status": if *up { "up" } else { "down" }, "required": true}));
        }
        for (name, ok, value) in probed {
            if !ok {
                failing.push(name);
            }
            dependencies.insert(name.into(), value);
        }
        let conditions: serde_json::Map<String, Value> =
            checks.iter().filter(|(n, _)| **n != "nats").map(|(n, ok)| ((*n).to_owned(), Value::Bool(*ok))).collect();
        let ready = failing.is_empty();
        let body = json!({
            "status": if ready { "ready" } else { "not_ready" },
            "dependencies": dependencies,
            "checks": conditions,
            "failing": failing,
        });
        (ready, body)
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
    // Readiness as metrics, probed at each scrape: what an alert needs,
    // since Prometheus does not read `/health/ready`.
    let (ready, body) = s.readiness.report().await;
    metrics::gauge!(crate::metrics::READY).set(if ready { 1.0 } else { 0.0 });
    if let Some(deps) = body["dependencies"].as_object() {
        for (name, dep) in deps.iter().filter(|(_, d)| d["status"] != "disabled") {
            let up = matches!(dep["status"].as_str(), Some("up" | "configured"));
            let required = if dep["required"] == true { "true" } else { "false" };
            metrics::gauge!(crate::metrics::DEPENDENCY_UP, "dependency" => name.clone(), "required" => required)
                .set(if up { 1.0 } else { 0.0 });
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], crate::metrics::render(&s.metrics))
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let (ready, body) = s.readiness.report().await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body))
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

    fn probe(result: Result<(), &'static str>) -> Probe {
        Arc::new(move || Box::pin(async move { result.map_err(String::from) }))
    }

    #[tokio::test]
    async fn a_required_dependency_down_makes_the_stage_not_ready_an_optional_one_does_not() {
        let r = Readiness::new();
        r.register("nats").set(true);
        r.probe("postgres", true, probe(Ok(())));
        r.probe("redis", false, probe(Err("connection refused")));
        r.info("openai", serde_json::json!({"status": "configured", "model": "gpt-4o-mini"}));
        let (ready, body) = r.report().await;
        assert!(ready, "{body}");
        assert_eq!(body["dependencies"]["nats"]["status"], "up");
        assert_eq!(body["dependencies"]["postgres"]["status"], "up");
        assert_eq!(body["dependencies"]["redis"]["status"], "down");
        assert_eq!(body["dependencies"]["redis"]["error"], "connection refused");
        assert_eq!(body["dependencies"]["openai"]["status"], "configured");

        r.probe("postgres", true, probe(Err("refused")));
        let (ready, body) = r.report().await;
        assert!(!ready);
        assert_eq!(body["failing"], serde_json::json!(["postgres"]));
        assert_eq!(body["status"], "not_ready");
    }
}
