//! Metric names (one place, Prometheus conventions), their catalog and the
//! exporter.
//!
//! Labels are bounded: stage names, outcomes, route templates, status
//! codes, model names; never ids, raw paths or error messages. Every metric
//! is described (`# HELP`) and listed in [`CATALOG`], from which
//! `docs/METRICS.md` is generated (a test keeps the two equal, and the
//! end-to-end suite checks the catalog against what each stage serves).

use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// --- Every stage (the runner) ---------------------------------------------

/// Messages fetched from the stage's consumer, by `stage`.
pub const STAGE_RECEIVED_TOTAL: &str = "halakha_stage_messages_received_total";
/// Messages a stage finished, by `stage` and `outcome`.
pub const STAGE_PROCESSED_TOTAL: &str = "halakha_stage_messages_processed_total";
/// Time from fetch to acknowledgement of one message, by `stage`.
pub const STAGE_PROCESSING_SECONDS: &str = "halakha_stage_processing_duration_seconds";
/// Messages being handled right now, by `stage`.
pub const STAGE_IN_FLIGHT: &str = "halakha_stage_messages_in_flight";
/// Consumer lag from the server's consumer info, by `stage`.
pub const CONSUMER_PENDING: &str = "halakha_stage_consumer_pending_messages";
pub const CONSUMER_ACK_PENDING: &str = "halakha_stage_consumer_ack_pending_messages";
pub const CONSUMER_REDELIVERED: &str = "halakha_stage_consumer_redelivered_messages";
/// 1 while the stage is paused (quota exhausted, budget spent, database
/// unreachable), by `stage`.
pub const STAGE_PAUSED: &str = "halakha_stage_paused";
pub const STAGE_PAUSES_TOTAL: &str = "halakha_stage_pauses_total";
pub const DEAD_LETTERS_TOTAL: &str = "halakha_dead_letters_total";
/// Publishes to JetStream that got no PubAck, by `stage`.
pub const PUBLISH_ERRORS_TOTAL: &str = "halakha_stage_publish_errors_total";
/// Pull requests the broker never ended (no 408), by `stage`.
pub const UNENDED_PULLS_TOTAL: &str = "halakha_stage_unended_pull_requests_total";
/// Messages from a pull request past its expiry, handed back, by `stage`.
pub const LATE_DELIVERIES_TOTAL: &str = "halakha_stage_late_deliveries_total";
/// 1 when `/health/ready` would answer 200, read at each scrape.
pub const READY: &str = "halakha_ready";
/// 1 when a dependency answers (or is configured), by `dependency`.
pub const DEPENDENCY_UP: &str = "halakha_dependency_up";
/// Constant 1, labelled with the binary and its version.
pub const BUILD_INFO: &str = "halakha_build_info";

// --- Ingest ---------------------------------------------------------------

pub const PIPELINE_UNACCOUNTED: &str = "halakha_pipeline_unaccounted";
pub const HTTP_REQUESTS_TOTAL: &str = "halakha_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "halakha_http_request_duration_seconds";
pub const HTTP_REQUESTS_BY_KEY_TOTAL: &str = "halakha_http_requests_by_key_total";
pub const HTTP_AUTH_FAILURES_TOTAL: &str = "halakha_http_auth_failures_total";
pub const HTTP_RATE_LIMITED_TOTAL: &str = "halakha_http_rate_limited_total";
pub const INGEST_ACCEPTED_TOTAL: &str = "halakha_ingest_accepted_total";

// --- Enrich ---------------------------------------------------------------

pub const OPENAI_REQUESTS_TOTAL: &str = "halakha_enrich_openai_requests_total";
pub const OPENAI_REQUEST_SECONDS: &str = "halakha_enrich_openai_request_duration_seconds";
pub const OPENAI_TOKENS_TOTAL: &str = "halakha_enrich_openai_tokens_total";
pub const OPENAI_COST_MICRODOLLARS_TOTAL: &str = "halakha_enrich_estimated_cost_microdollars_total";
pub const OPENAI_QUOTA_EXHAUSTED_TOTAL: &str = "halakha_enrich_quota_exhausted_total";
pub const OPENAI_REPAIRS_TOTAL: &str = "halakha_enrich_repairs_total";
pub const CACHE_REQUESTS_TOTAL: &str = "halakha_cache_requests_total";

// --- Publish --------------------------------------------------------------

pub const NOTION_REQUESTS_TOTAL: &str = "halakha_publish_notion_requests_total";
pub const NOTION_RATE_LIMITED_TOTAL: &str = "halakha_publish_notion_rate_limited_total";
pub const DB_WRITES_TOTAL: &str = "halakha_publish_db_writes_total";

// --- Database pool (ingest, publish) ---------------------------------------

pub const DB_POOL_CONNECTIONS: &str = "halakha_db_pool_connections";
pub const DB_POOL_MAX_CONNECTIONS: &str = "halakha_db_pool_max_connections";
pub const DB_POOL_WAITING: &str = "halakha_db_pool_waiting_requests";
pub const DB_BATCH_SIZE: &str = "halakha_db_batch_rows";

/// The outcomes of [`STAGE_PROCESSED_TOTAL`]. A retried message is counted
/// `retried` each time it is handed back, and once more with its final
/// outcome: never as lost.
pub const OUTCOMES: [&str; 4] = ["ok", "retried", "dead_lettered", "duplicate"];

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One documented metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Every label it carries, with its values where they are fixed.
    pub labels: &'static [(&'static str, &'static str)],
    /// The binaries that serve it (`ingest`, `enrich`, `publish`).
    pub served_by: &'static [&'static str],
    pub help: &'static str,
}

const ALL: &[&str] = &["ingest", "enrich", "publish"];
const DB: &[&str] = &["ingest", "publish"];
const STAGE: (&str, &str) =
    ("stage", "`ingest`, `enrich`, `publish`; ingest also `ingest-status`, `ingest-advisories`");

/// Every metric the pipeline exports.
pub const CATALOG: &[Metric] = &[
    Metric {
        name: BUILD_INFO,
        kind: Kind::Gauge,
        labels: &[("binary", "`halakha-ingest`, `halakha-enrich`, `halakha-publish`"), ("version", "crate version")],
        served_by: ALL,
        help: "Always 1; its labels name the binary and its version.",
    },
    Metric {
        name: READY,
        kind: Kind::Gauge,
        labels: &[],
        served_by: ALL,
        help: "1 when the stage is ready (what /health/ready answers with 200), probed at each scrape.",
    },
    Metric {
        name: DEPENDENCY_UP,
        kind: Kind::Gauge,
        labels: &[("dependency", "`nats`, `postgres`, `redis`, `openai`, `notion`"), ("required", "`true`, `false`")],
        served_by: ALL,
        help: "1 when the dependency answers its probe (or, for an outside API, is configured), probed at each scrape.",
    },
    Metric {
        name: STAGE_RECEIVED_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE],
        served_by: ALL,
        help: "Messages delivered to the stage by its JetStream consumer (redeliveries included).",
    },
    Metric {
        name: STAGE_PROCESSED_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE, ("outcome", "`ok`, `retried`, `dead_lettered`, `duplicate`")],
        served_by: ALL,
        help: "Messages the stage finished with: ok (output published, input acked), retried (handed back with a delay), dead_lettered, duplicate (its effect was already done).",
    },
    Metric {
        name: STAGE_PROCESSING_SECONDS,
        kind: Kind::Histogram,
        labels: &[STAGE],
        served_by: ALL,
        help: "Time from delivery to acknowledgement of one message, in seconds.",
    },
    Metric {
        name: STAGE_IN_FLIGHT,
        kind: Kind::Gauge,
        labels: &[STAGE],
        served_by: ALL,
        help: "Messages being handled right now.",
    },
    Metric {
        name: CONSUMER_PENDING,
        kind: Kind::Gauge,
        labels: &[STAGE],
        served_by: ALL,
        help: "Messages in the stream not yet delivered to the stage's consumer (the lag), from the server's consumer info.",
    },
    Metric {
        name: CONSUMER_ACK_PENDING,
        kind: Kind::Gauge,
        labels: &[STAGE],
        served_by: ALL,
        help: "Messages delivered to the stage's consumer and not yet acknowledged, from the server's consumer info.",
    },
    Metric {
        name: CONSUMER_REDELIVERED,
        kind: Kind::Gauge,
        labels: &[STAGE],
        served_by: ALL,
        help: "Messages delivered more than once and not yet acknowledged, from the server's consumer info.",
    },
    Metric {
        name: STAGE_PAUSED,
        kind: Kind::Gauge,
        labels: &[STAGE],
        served_by: ALL,
        help: "1 while the stage is paused (provider quota exhausted, daily budget spent, database unreachable).",
    },
    Metric {
        name: STAGE_PAUSES_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE],
        served_by: ALL,
        help: "Pauses the stage entered.",
    },
    Metric {
        name: UNENDED_PULLS_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE],
        served_by: ALL,
        help: "Pull requests the broker did not end (no 408) within 1 s of their expiry; the stage pulled again 50 ms after it (nats-server 2.9 drops the end of a request a message meets as it expires).",
    },
    Metric {
        name: LATE_DELIVERIES_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE],
        served_by: ALL,
        help: "Messages delivered to a pull request the stage had stopped waiting for (past its expiry), handed back at once for redelivery: each spends one delivery.",
    },
    Metric {
        name: DEAD_LETTERS_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE, ("kind", "`permanent`, `max_deliveries`")],
        served_by: ALL,
        help: "Dead-letter entries the stage wrote.",
    },
    Metric {
        name: PUBLISH_ERRORS_TOTAL,
        kind: Kind::Counter,
        labels: &[STAGE],
        served_by: ALL,
        help: "Publishes to JetStream that got no PubAck (the message is retried).",
    },
    Metric {
        name: PIPELINE_UNACCOUNTED,
        kind: Kind::Gauge,
        labels: &[("namespace", "`PIPELINE_NAMESPACE`")],
        served_by: &["ingest"],
        help: "Halakhot accepted but neither published nor failed, minus the messages waiting at enrich and publish: 0 when idle; above 0 for long, something was lost.",
    },
    Metric {
        name: HTTP_REQUESTS_TOTAL,
        kind: Kind::Counter,
        labels: &[
            ("method", "HTTP method"),
            ("route", "route template, never the raw path"),
            ("status", "status code"),
        ],
        served_by: &["ingest"],
        help: "HTTP requests answered by the ingest API.",
    },
    Metric {
        name: HTTP_REQUEST_SECONDS,
        kind: Kind::Histogram,
        labels: &[("method", "HTTP method"), ("route", "route template")],
        served_by: &["ingest"],
        help: "Time to answer an HTTP request, in seconds.",
    },
    Metric {
        name: HTTP_REQUESTS_BY_KEY_TOTAL,
        kind: Kind::Counter,
        labels: &[("key", "key fingerprint (8 hex digits, not secret)")],
        served_by: &["ingest"],
        help: "Authenticated HTTP requests, by API key fingerprint.",
    },
    Metric {
        name: HTTP_AUTH_FAILURES_TOTAL,
        kind: Kind::Counter,
        labels: &[("reason", "`missing`, `invalid`")],
        served_by: &["ingest"],
        help: "HTTP requests refused for their API key.",
    },
    Metric {
        name: HTTP_RATE_LIMITED_TOTAL,
        kind: Kind::Counter,
        labels: &[("key", "key fingerprint")],
        served_by: &["ingest"],
        help: "HTTP requests refused by the per-key rate limit.",
    },
    Metric {
        name: INGEST_ACCEPTED_TOTAL,
        kind: Kind::Counter,
        labels: &[("via", "`http`, `nats`"), ("duplicate", "`true`, `false`")],
        served_by: &["ingest"],
        help: "Submissions accepted by ingest.",
    },
    Metric {
        name: OPENAI_REQUESTS_TOTAL,
        kind: Kind::Counter,
        labels: &[("outcome", "`ok`, `rate_limited`, `transient`, `permanent`, `quota`")],
        served_by: &["enrich"],
        help: "Chat completion calls to OpenAI, by outcome (rate_limited: HTTP 429 other than quota).",
    },
    Metric {
        name: OPENAI_REQUEST_SECONDS,
        kind: Kind::Histogram,
        labels: &[],
        served_by: &["enrich"],
        help: "Chat completion latency, in seconds.",
    },
    Metric {
        name: OPENAI_TOKENS_TOTAL,
        kind: Kind::Counter,
        labels: &[("kind", "`prompt`, `completion`"), ("model", "`OPENAI_MODEL`")],
        served_by: &["enrich"],
        help: "Tokens used, as the provider reported them.",
    },
    Metric {
        name: OPENAI_COST_MICRODOLLARS_TOTAL,
        kind: Kind::Counter,
        labels: &[("model", "`OPENAI_MODEL`")],
        served_by: &["enrich"],
        help: "Estimated cost from OPENAI_PRICES, in millionths of a US dollar.",
    },
    Metric {
        name: OPENAI_QUOTA_EXHAUSTED_TOTAL,
        kind: Kind::Counter,
        labels: &[],
        served_by: &["enrich"],
        help: "Times the provider said the quota is exhausted (the stage pauses).",
    },
    Metric {
        name: OPENAI_REPAIRS_TOTAL,
        kind: Kind::Counter,
        labels: &[("outcome", "`attempted`, `fixed`, `failed`")],
        served_by: &["enrich"],
        help: "Repair turns for a completion that failed its schema or rules.",
    },
    Metric {
        name: CACHE_REQUESTS_TOTAL,
        kind: Kind::Counter,
        labels: &[("outcome", "`hit`, `miss`, `error`")],
        served_by: ALL,
        help: "Redis requests (enrich: the enrichment cache; all: shared rate limits), when REDIS_URL is set.",
    },
    Metric {
        name: NOTION_REQUESTS_TOTAL,
        kind: Kind::Counter,
        labels: &[
            ("operation", "`create_page`, `append_blocks`, `list_blocks`, `query`"),
            ("outcome", "`ok`, `transient`, `permanent`"),
        ],
        served_by: &["publish"],
        help: "Notion API calls.",
    },
    Metric {
        name: NOTION_RATE_LIMITED_TOTAL,
        kind: Kind::Counter,
        labels: &[],
        served_by: &["publish"],
        help: "Notion answers with HTTP 429 (the shared limiter should keep this at 0).",
    },
    Metric {
        name: DB_WRITES_TOTAL,
        kind: Kind::Counter,
        labels: &[("status", "`published`, `enriched`")],
        served_by: &["publish"],
        help: "Rows upserted into the halakhot table by publish.",
    },
    Metric {
        name: DB_POOL_CONNECTIONS,
        kind: Kind::Gauge,
        labels: &[("state", "`in_use`, `idle`")],
        served_by: DB,
        help: "Postgres connections held by the pool, read at each scrape.",
    },
    Metric {
        name: DB_POOL_MAX_CONNECTIONS,
        kind: Kind::Gauge,
        labels: &[],
        served_by: DB,
        help: "The pool's size limit (DATABASE_POOL_SIZE).",
    },
    Metric {
        name: DB_POOL_WAITING,
        kind: Kind::Gauge,
        labels: &[],
        served_by: DB,
        help: "Tasks waiting for a Postgres connection, read at each scrape.",
    },
    Metric {
        name: DB_BATCH_SIZE,
        kind: Kind::Histogram,
        labels: &[],
        served_by: DB,
        help: "Messages written per statement by the group commit (ingest's claims, publish's upserts): \
               1 when idle, larger under load.",
    },
];

/// The buckets of [`DB_BATCH_SIZE`] (rows).
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The buckets of every `_seconds` histogram: from 5 ms (a cache hit) to
/// two minutes (a slow completion).
pub const SECONDS_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// How often histogram samples are folded into their buckets when no
/// scrape does it (the exporter's own default).
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

type Collector = Box<dyn Fn() + Send + Sync>;
static COLLECTORS: Mutex<Vec<Collector>> = Mutex::new(Vec::new());

/// Install the process-wide Prometheus recorder (once), describe every
/// metric of the catalog, and return the handle that renders `/metrics`.
pub fn install_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DB_BATCH_SIZE.into()), &BATCH_BUCKETS))
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which
            // case our handle renders an empty page rather than crashing.
            let _ = metrics::set_global_recorder(recorder);
            // Histogram samples wait in the recorder until they are
            // folded into their buckets, which a scrape or an upkeep does:
            // without one, a stage nobody scrapes would keep every sample
            // of every message. One small thread keeps them folded,
            // whichever runtime (or none) installed the recorder.
            // It has started (and named itself) when this returns.
            let upkept = handle.clone();
            let (started, running) = std::sync::mpsc::sync_channel::<()>(0);
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                let _ = started.send(());
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkept.run_upkeep();
                }
            });
            if spawned.is_ok() {
                let _ = running.recv();
            }
            for m in CATALOG {
                match m.kind {
                    Kind::Counter => metrics::describe_counter!(m.name, m.help),
                    Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
                    Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
                }
            }
            handle
        })
        .clone()
}

/// Mark the binary (`halakha_build_info`).
pub fn build_info(binary: String) {
    metrics::gauge!(BUILD_INFO, "binary" => binary, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Create a stage's series at zero, so a rate or an alert sees 0 rather
/// than no data before the first event. (`increment(0)`: a series that
/// exists already keeps its value.)
pub fn init_stage(stage: &'static str) {
    metrics::counter!(STAGE_RECEIVED_TOTAL, "stage" => stage).increment(0);
    for outcome in OUTCOMES {
        metrics::counter!(STAGE_PROCESSED_TOTAL, "stage" => stage, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(STAGE_IN_FLIGHT, "stage" => stage).increment(0.0);
    metrics::gauge!(STAGE_PAUSED, "stage" => stage).increment(0.0);
    metrics::counter!(STAGE_PAUSES_TOTAL, "stage" => stage).increment(0);
    for kind in ["permanent", "max_deliveries"] {
        metrics::counter!(DEAD_LETTERS_TOTAL, "stage" => stage, "kind" => kind).increment(0);
    }
    metrics::counter!(PUBLISH_ERRORS_TOTAL, "stage" => stage).increment(0);
    metrics::counter!(UNENDED_PULLS_TOTAL, "stage" => stage).increment(0);
    metrics::counter!(LATE_DELIVERIES_TOTAL, "stage" => stage).increment(0);
}

/// Create counters of fixed label values at zero (see [`init_stage`]).
pub fn init_counters(name: &'static str, label: &'static str, values: &[&'static str]) {
    for v in values {
        metrics::counter!(name, label => *v).increment(0);
    }
}

/// Run `collect` before every render of `/metrics` (gauges read from a
/// live object, such as the database pool).
pub fn on_scrape(collect: impl Fn() + Send + Sync + 'static) {
    if let Ok(mut c) = COLLECTORS.lock() {
        c.push(Box::new(collect));
    }
}

/// Render the metrics page, after running the scrape-time collectors.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Ok(c) = COLLECTORS.lock() {
        for collect in c.iter() {
            collect();
        }
    }
    handle.render()
}

/// `docs/METRICS.md`, generated from [`CATALOG`].
pub fn catalog_markdown() -> String {
    let mut out = String::from(
        "# Metrics\n\n\
         Generated from `common/src/metrics.rs` (`CATALOG`); do not edit by hand. \
         Regenerate with `UPDATE_METRICS_DOC=1 cargo test -p halakha-common metrics_doc`.\n\n\
         Each stage serves its metrics on `METRICS_ADDR` (`/metrics`, Prometheus text format). \
         Every `_seconds` histogram has the buckets ",
    );
    let buckets: Vec<String> = SECONDS_BUCKETS.iter().map(|b| b.to_string()).collect();
    out.push_str(&format!("{} (seconds); `{DB_BATCH_SIZE}` has ", buckets.join(", ")));
    let rows: Vec<String> = BATCH_BUCKETS.iter().map(|b| b.to_string()).collect();
    out.push_str(&format!("{} (rows).\n\n", rows.join(", ")));
    out.push_str("| metric | type | labels | served by | meaning |\n|---|---|---|---|---|\n");
    for m in CATALOG {
        let labels = if m.labels.is_empty() {
            "—".to_owned()
        } else {
            m.labels.iter().map(|(l, v)| format!("`{l}`: {v}")).collect::<Vec<_>>().join("<br>")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            m.served_by.join(", "),
            m.help
        ));
    }
    out
}

/// The catalog entry of `name` (a family name, or a histogram's
/// `_bucket`/`_sum`/`_count` series).
pub fn lookup(name: &str) -> Option<&'static Metric> {
    CATALOG.iter().find(|m| m.name == name).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            CATALOG.iter().find(|m| m.name == base && m.kind == Kind::Histogram)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without an upkeep the exporter keeps every histogram sample until
    /// a scrape: the process that installs the recorder must run one.
    #[test]
    fn installing_the_recorder_starts_the_thread_that_folds_histogram_samples() {
        install_recorder();
        let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(threads.iter().any(|t| t == "metrics-upkeep"), "threads: {threads:?}");
    }

    #[test]
    fn metrics_doc_is_generated_from_the_catalog() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md");
        let want = catalog_markdown();
        if std::env::var_os("UPDATE_METRICS_DOC").is_some() {
            std::fs::write(path, &want).expect("write docs/METRICS.md");
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/METRICS.md is stale: run UPDATE_METRICS_DOC=1 cargo test -p halakha-common metrics_doc"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("halakha_"), "{}", m.name);
            assert!(m.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            if m.kind == Kind::Histogram {
                assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_rows"),
                    "{}: histograms are in seconds (or rows)",
                    m.name
                );
            }
            assert!(!m.served_by.is_empty() && !m.help.is_empty(), "{}", m.name);
        }
    }

    /// Every `halakha_*` name in `text`.
    fn names_in(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("halakha_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
            out.push(&tail[..end]);
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn the_alerts_and_the_dashboard_use_only_catalogued_metrics() {
        let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
        let alerts = std::fs::read_to_string(format!("{deploy}/prometheus/alerts.yml")).expect("alerts.yml");
        let dashboard =
            std::fs::read_to_string(format!("{deploy}/grafana/dashboards/halakha.json")).expect("dashboard JSON");
        for (file, text) in [("alerts.yml", &alerts), ("halakha.json", &dashboard)] {
            let names = names_in(text);
            assert!(!names.is_empty(), "{file}");
            for name in names {
                assert!(lookup(name).is_some(), "{file} uses {name}, which no stage exports");
            }
        }
        // The dashboard is JSON, each panel has its queries, and it shows
        // throughput, latency percentiles, lag, dead letters, tokens, cost.
        let d: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
        let panels = d["panels"].as_array().expect("panels");
        let exprs: Vec<&str> = panels
            .iter()
            .filter(|p| p["type"] != "row")
            .flat_map(|p| {
                let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
                assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
                targets.iter().map(|t| t["expr"].as_str().expect("an expr"))
            })
            .collect();
        for needed in [
            STAGE_PROCESSED_TOTAL,
            "halakha_stage_processing_duration_seconds_bucket",
            CONSUMER_PENDING,
            DEAD_LETTERS_TOTAL,
            OPENAI_TOKENS_TOTAL,
            OPENAI_COST_MICRODOLLARS_TOTAL,
        ] {
            assert!(exprs.iter().any(|e| e.contains(needed)), "the dashboard shows {needed}");
        }
    }

    #[test]
    fn lookup_finds_histogram_series() {
        assert_eq!(
            lookup("halakha_stage_processing_duration_seconds_bucket").map(|m| m.name),
            Some(STAGE_PROCESSING_SECONDS)
        );
        assert!(lookup("halakha_stage_messages_received_total_count").is_none());
        assert!(lookup("halakha_nothing").is_none());
    }
}
