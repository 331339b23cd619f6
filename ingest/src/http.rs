//! The HTTP API of `halakha-ingest`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use halakha_common::envelope::Submission;
use halakha_common::metrics as m;
use halakha_nats::Publisher;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::service::{AcceptError, Decision, Ingestor, Via};
use crate::store;

/// Shared state of the API routes.
#[derive(Clone)]
pub struct ApiState {
    pub ingestor: Ingestor,
    pub publisher: Publisher,
    pub ingested_subject: String,
    pub keys: Arc<ApiKeys>,
}

/// The accepted API keys, kept as SHA-256 digests so every comparison has
/// the same length and runs in constant time.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    pub fn new(keys: &[SecretString]) -> Self {
        Self { digests: keys.iter().map(|k| Sha256::digest(k.expose_secret().as_bytes()).into()).collect() }
    }

    /// True when `presented` is one of the keys. Every key is compared, in
    /// constant time, whatever matches first.
    pub fn verify(&self, presented: &str) -> bool {
        let p: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut any = 0u8;
        for d in &self.digests {
            let diff = d.iter().zip(p.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            any |= u8::from(diff == 0);
        }
        any == 1
    }
}

/// A JSON error: `{"error": {"code", "message", "field"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }

    fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the pipeline cannot accept work right now; retry later",
        )
    }

    fn from_rejection(r: JsonRejection) -> Self {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_field",
            _ => "invalid_json",
        };
        Self::new(status, code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"halakha\""));
        }
        resp
    }
}

/// The API routes (authenticated), without the health routes.
pub fn routes(state: ApiState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/halakhot", post(submit))
        .route("/v1/halakhot/{id}", get(get_status))
        .route_layer(middleware::from_fn_with_state(state.keys.clone(), require_key))
        .route_layer(middleware::from_fn(count_requests))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(token.trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

async fn require_key(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    match presented_key(req.headers()) {
        Some(k) if keys.verify(k) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an API key is required (Authorization: Bearer or X-API-Key)",
        )
        .into_response(),
    }
}

async fn count_requests(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS_TOTAL, "route" => route, "method" => method, "status" => status).increment(1);
    resp
}

async fn submit(
    State(s): State<ApiState>,
    body: Result<Json<Submission>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(submission) = body.map_err(ApiError::from_rejection)?;
    let (id, duplicate) = match s.ingestor.accept(submission, Via::Http).await {
        Ok(Decision::Publish { message, duplicate }) => {
            let ack = s.publisher.publish_json(&s.ingested_subject, &message.id, &message).await.map_err(|error| {
                tracing::error!(id = %message.id, error = %error_chain(&error), "Could not publish an accepted submission");
                ApiError::unavailable()
            })?;
            (message.id, duplicate || ack.duplicate)
        }
        Ok(Decision::Duplicate { id }) => (id, true),
        Err(AcceptError::Invalid(e)) => {
            return Err(ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: e.code,
                message: e.message,
                field: Some(e.field),
            });
        }
        Err(e @ AcceptError::Database(_)) => {
            tracing::error!(error = %error_chain(&e), "Could not record a submission");
            return Err(ApiError::unavailable());
        }
    };
    tracing::info!(%id, duplicate, "Submission accepted");
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id, "status": "accepted", "duplicate": duplicate}))).into_response())
}

async fn get_status(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if id.len() > 128 {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no halakha with this id"));
    }
    match store::status(&s.ingestor.pool, &id).await {
        Ok(Some(view)) => Ok(Json(view).into_response()),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no halakha with this id")),
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "Could not read a status");
            Err(ApiError::unavailable())
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = ApiKeys::new(&[SecretString::from("a".repeat(32)), SecretString::from("b".repeat(40))]);
        assert!(keys.verify(&"a".repeat(32)));
        assert!(keys.verify(&"b".repeat(40)));
        assert!(!keys.verify(&"a".repeat(31)));
        assert!(!keys.verify(""));
    }

    #[test]
    fn the_key_is_read_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "xyz".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("xyz"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(presented_key(&h), None);
    }
}
