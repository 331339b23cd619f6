//! The HTTP API of `halakha-ingest`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use halakha_common::envelope::Submission;
use halakha_common::metrics as m;
use halakha_common::trace::{TRACEPARENT, TraceContext};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use utoipa::{OpenApi, ToSchema};

use crate::errors::{ApiError, ApiJson, ErrorBody, ErrorDetail, parse_value};
use crate::form;
use crate::guard::{self, Cors, Guard};
use crate::service::Ingestor;
use crate::store::{self, StatusView};
use futures::StreamExt;

/// Most items in one batch.
pub const MAX_BATCH_ITEMS: usize = 500;

/// Shared state of the API routes, cloned for every request (axum's
/// `State`): what it holds is behind `Arc`s, so a clone is a few counter
/// increments (a profile under load showed the `Ingestor`'s clone and drop
/// at 3 % of ingest's time: its client handles and subject string).
#[derive(Clone)]
pub struct ApiState {
    pub ingestor: Arc<Ingestor>,
    pub waiters: Arc<form::Waiters>,
    pub form_wait: Duration,
}

/// Limits of the API.
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch_bytes: usize,
    pub request_timeout: Duration,
    pub form_wait: Duration,
}

/// The API routes (authenticated, rate-limited, CORS-aware), without the
/// health routes.
pub fn routes(state: ApiState, guard: Arc<Guard>, cors: Arc<Cors>, limits: &Limits) -> Router {
    let single = Router::new()
        .route("/v1/halakhot", post(submit))
        .route("/v1/halakhot/{id}", get(get_status))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(limits.request_timeout, guard::timeout));
    let batch = Router::new()
        .route("/v1/halakhot/batch", post(submit_batch))
        .layer(DefaultBodyLimit::max(limits.max_batch_bytes))
        .layer(middleware::from_fn_with_state(limits.request_timeout, guard::timeout));
    // The form route waits for publication: its own, longer bound.
    let legacy = Router::new()
        .route(form::ROUTE, post(form::submit))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(limits.form_wait + Duration::from_secs(10), guard::timeout));
    single
        .merge(batch)
        .merge(legacy)
        .route_layer(middleware::from_fn_with_state(guard, guard::require_key))
        .route_layer(middleware::from_fn(count_requests))
        .route_layer(middleware::from_fn(trace_requests))
        .with_state(state)
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .layer(middleware::from_fn_with_state(cors, guard::cors))
}

/// Continue the caller's W3C `traceparent` (or start a trace): the
/// handlers pass it on in the NATS headers, and the request's log lines
/// carry its `trace_id`.
async fn trace_requests(mut req: Request, next: Next) -> Response {
    let trace = TraceContext::continue_from(req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()));
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let span = tracing::info_span!("http_request", method = %req.method(), route, trace_id = %trace.trace_id());
    req.extensions_mut().insert(trace);
    next.run(req).instrument(span).await
}

async fn count_requests(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "route" => route.clone(), "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(m::HTTP_REQUESTS_TOTAL, "route" => route, "method" => method, "status" => status).increment(1);
    resp
}

/// A submission was accepted (or was known already).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AcceptedBody {
    pub id: String,
    /// Always `accepted`: see `GET /v1/halakhot/{id}` for progress.
    pub status: String,
    /// True when this id was submitted before (nothing new is published
    /// once it is past ingest).
    pub duplicate: bool,
}

impl AcceptedBody {
    fn new(id: String, duplicate: bool) -> Self {
        Self { id, status: "accepted".into(), duplicate }
    }
}

/// Submit one halakha text.
#[utoipa::path(
    post, path = "/v1/halakhot", request_body = Submission,
    responses(
        (status = 202, description = "Accepted (or known already: `duplicate`)", body = AcceptedBody),
        (status = 400, description = "Not UTF-8 or not JSON", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A field breaks a rule; `field` names it", body = ErrorBody),
        (status = 429, description = "Rate limit of the key; see Retry-After", body = ErrorBody),
        (status = 503, description = "Cannot accept work now; retry", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn submit(
    State(s): State<ApiState>,
    Extension(trace): Extension<TraceContext>,
    ApiJson(submission): ApiJson<Submission>,
) -> Result<Response, ApiError> {
    let accepted = s.ingestor.accept(submission, 0, &trace).await?;
    tracing::info!(id = %accepted.id, duplicate = accepted.duplicate, "Submission accepted");
    Ok((StatusCode::ACCEPTED, Json(AcceptedBody::new(accepted.id, accepted.duplicate))).into_response())
}

/// The status of a halakha.
#[utoipa::path(
    get, path = "/v1/halakhot/{id}",
    params(("id" = String, Path, description = "The id returned at submission")),
    responses(
        (status = 200, body = StatusView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get_status(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if id.len() > 128 {
        return Err(ApiError::not_found());
    }
    match store::status(&s.ingestor.pool, &id).await {
        Ok(Some(view)) => Ok(Json(view).into_response()),
        Ok(None) => Err(ApiError::not_found()),
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "Could not read a status");
            Err(ApiError::unavailable())
        }
    }
}

/// One batch item, read as a submission on its own so that one bad item
/// does not spoil the others.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = Submission)]
pub struct BatchItem(Value);

/// A batch: a JSON array of submissions, or an object with `items` and
/// `spread`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BatchInput {
    /// Item *i* is scheduled `schedule_days + i` days ahead.
    Items(Vec<BatchItem>),
    Wrapped {
        items: Vec<BatchItem>,
        /// `false`: every item keeps its own `schedule_days`.
        #[serde(default)]
        spread: Option<bool>,
    },
}

/// `?spread=false` works for the array form too.
#[derive(Debug, Deserialize)]
pub struct BatchQuery {
    spread: Option<bool>,
}

/// The result of one item, in the order sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResult {
    pub index: usize,
    /// 202 accepted, 422 invalid, 503 not accepted now (retry the item).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// One result per item, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchBody {
    pub accepted: usize,
    pub rejected: usize,
    pub results: Vec<ItemResult>,
}

/// Submit up to 500 texts; valid items are accepted even when others fail.
#[utoipa::path(
    post, path = "/v1/halakhot/batch", request_body = BatchInput,
    params(("spread" = Option<bool>, Query, description = "false: no schedule spreading")),
    responses(
        (status = 207, description = "One result per item, in order", body = BatchBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "Not a list of items, empty, or over 500 items", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn submit_batch(
    State(s): State<ApiState>,
    Extension(trace): Extension<TraceContext>,
    Query(q): Query<BatchQuery>,
    ApiJson(input): ApiJson<BatchInput>,
) -> Result<Response, ApiError> {
    let (items, spread) = match input {
        BatchInput::Items(items) => (items, q.spread.unwrap_or(true)),
        BatchInput::Wrapped { items, spread } => (items, spread.or(q.spread).unwrap_or(true)),
    };
    if items.is_empty() {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "empty", "the batch has no items").field("items"));
    }
    if items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_items",
            format!("the batch has {} items; the limit is {MAX_BATCH_ITEMS}", items.len()),
        )
        .field("items"));
    }
    // A few items at a time, results kept in order.
    let results: Vec<ItemResult> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(index, item)| {
            let ingestor = s.ingestor.clone();
            async move {
                let extra = if spread { u16::try_from(index).unwrap_or(u16::MAX) } else { 0 };
                let outcome = match parse_value::<Submission>(item.0) {
                    Ok(submission) => ingestor.accept(submission, extra, &trace).await.map_err(ApiError::from),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(a) => {
                        ItemResult { index, status: 202, id: Some(a.id), duplicate: Some(a.duplicate), error: None }
                    }
                    Err(mut e) => {
                        e.detail.field = Some(match e.detail.field.take() {
                            Some(f) => format!("[{index}].{f}"),
                            None => format!("[{index}]"),
                        });
                        ItemResult {
                            index,
                            status: e.status.as_u16(),
                            id: None,
                            duplicate: None,
                            error: Some(e.detail),
                        }
                    }
                }
            }
        })
        .buffered(8)
        .collect()
        .await;
    let accepted = results.iter().filter(|r| r.status == 202).count();
    let body = BatchBody { accepted, rejected: results.len() - accepted, results };
    tracing::info!(accepted = body.accepted, rejected = body.rejected, "Batch handled");
    Ok((StatusCode::MULTI_STATUS, Json(body)).into_response())
}

/// The HTTP contract, served at `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "halakha-ingest", description = "Submit halakha texts to the pipeline and follow them."),
    paths(submit, submit_batch, get_status, form::submit),
    components(schemas(
        Submission, AcceptedBody, StatusView, BatchInput, BatchBody, ItemResult, ErrorBody, ErrorDetail,
        form::FormInput, form::FormPublished, form::FormPending
    )),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_route_and_both_key_schemes() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("serialises");
        for path in ["/v1/halakhot", "/v1/halakhot/batch", "/v1/halakhot/{id}", form::ROUTE] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
        assert!(doc["components"]["schemas"]["Submission"]["properties"]["content"].is_object());
    }
}
