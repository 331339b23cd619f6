//! Metric names (one place, Prometheus conventions) and the exporter.
//!
//! Labels are bounded: stage names, outcomes, route templates, status
//! classes; never ids, raw paths or error messages.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages a stage finished, by `stage` and `outcome`
/// (`ack`, `nak`, `term`, `dead_letter`).
pub const STAGE_MESSAGES_TOTAL: &str = "halakha_stage_messages_total";
/// Time a handler spent on one message, by `stage`.
pub const STAGE_HANDLE_SECONDS: &str = "halakha_stage_handle_duration_seconds";
/// Messages being handled right now, by `stage`.
pub const STAGE_IN_FLIGHT: &str = "halakha_stage_in_flight";
/// 1 while the stage is paused (quota exhausted, budget spent), by `stage`.
pub const STAGE_PAUSED: &str = "halakha_stage_paused";
/// Pauses, by `stage`.
pub const STAGE_PAUSES_TOTAL: &str = "halakha_stage_pauses_total";
/// The pipeline's books, by `namespace`: halakhot accepted but neither
/// published nor failed, minus the messages pending at enrich and publish.
/// 0 when the pipeline is idle; above 0 for long, something was lost.
pub const PIPELINE_UNACCOUNTED: &str = "halakha_pipeline_unaccounted";
/// Dead-letter entries written, by `stage` and `kind`.
pub const DEAD_LETTERS_TOTAL: &str = "halakha_dead_letters_total";
/// Publishes to JetStream that failed (no PubAck), by `stage`.
pub const PUBLISH_ERRORS_TOTAL: &str = "halakha_publish_errors_total";
/// HTTP requests served by ingest, by `route` template, `method`, `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "halakha_http_requests_total";
/// Authenticated requests, by `key` fingerprint (8 hex digits, not secret).
pub const HTTP_REQUESTS_BY_KEY_TOTAL: &str = "halakha_http_requests_by_key_total";
/// Requests refused for their key, by `reason` (`missing`, `invalid`).
pub const HTTP_AUTH_FAILURES_TOTAL: &str = "halakha_http_auth_failures_total";
/// Requests refused by the per-key rate limit, by `key` fingerprint.
pub const HTTP_RATE_LIMITED_TOTAL: &str = "halakha_http_rate_limited_total";
/// Submissions accepted by ingest, by `via` (`http`, `nats`) and `duplicate`.
pub const INGEST_ACCEPTED_TOTAL: &str = "halakha_ingest_accepted_total";
/// Chat completion calls, by `outcome` (`ok`, `transient`, `permanent`).
pub const OPENAI_REQUESTS_TOTAL: &str = "halakha_enrich_openai_requests_total";
/// Repair turns, by `outcome` (`attempted`, `fixed`, `failed`).
pub const OPENAI_REPAIRS_TOTAL: &str = "halakha_enrich_repairs_total";
/// Tokens used, by `kind` (`prompt`, `completion`) and `model`.
pub const OPENAI_TOKENS_TOTAL: &str = "halakha_enrich_openai_tokens_total";
/// Estimated cost from `OPENAI_PRICES`, in millionths of a US dollar, by `model`.
pub const OPENAI_COST_MICRODOLLARS_TOTAL: &str = "halakha_enrich_estimated_cost_microdollars_total";
/// Times the provider said the quota is exhausted.
pub const OPENAI_QUOTA_EXHAUSTED_TOTAL: &str = "halakha_enrich_quota_exhausted_total";
/// Chat completion latency.
pub const OPENAI_REQUEST_SECONDS: &str = "halakha_enrich_openai_request_duration_seconds";
/// Notion API calls, by `operation` and `outcome`.
pub const NOTION_REQUESTS_TOTAL: &str = "halakha_publish_notion_requests_total";
/// Cache look-ups and writes, by `outcome` (`hit`, `miss`, `error`).
pub const CACHE_REQUESTS_TOTAL: &str = "halakha_cache_requests_total";
/// Rows written to Postgres by publish, by `status`.
pub const DB_WRITES_TOTAL: &str = "halakha_publish_db_writes_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide Prometheus recorder (once) and return the
/// handle that renders `/metrics`.
pub fn install_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which
            // case our handle renders an empty page rather than crashing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
