//! Every error the API answers, as JSON: `{"error": {"code", "message", "field"}}`,
//! and the body readers that produce them with exact codes.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::validate::Invalid;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, in a stable `code`, a sentence, and the field at fault.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `invalid_json`, `invalid_utf8`,
    /// `invalid_type`, `missing_field`, `empty`, `too_long`, `out_of_range`,
    /// `unsupported`, `invalid_url`, `too_many_items`, `payload_too_large`,
    /// `unsupported_media_type`, `rate_limited`, `not_found`, `timeout`,
    /// `unavailable`, `processing_failed`.
    pub code: String,
    pub message: String,
    /// The field at fault (`content`, `schedule_days`, `[3].content`, ...), or null.
    pub field: Option<String>,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail { code: code.into(), message: message.into(), field: None },
            retry_after: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the pipeline cannot accept work right now; retry later",
        )
        .retry_after(5)
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no halakha with this id")
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: self.detail.clone() }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code, e.message).field(e.field)
    }
}

impl From<crate::service::AcceptFailure> for ApiError {
    fn from(e: crate::service::AcceptFailure) -> Self {
        match e {
            crate::service::AcceptFailure::Invalid(invalid) => invalid.into(),
            crate::service::AcceptFailure::Unavailable => ApiError::unavailable(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        let headers = resp.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"halakha\""));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Read `bytes` as JSON of `T`, with exact error codes: `invalid_utf8` and
/// `invalid_json` (400), `invalid_type` and `missing_field` (422, naming
/// the field).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        let at = e.valid_up_to();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            format!("the body is not valid UTF-8 (invalid byte at offset {at})"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(from_path_error)?;
    de.end().map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    Ok(value)
}

/// Read an already parsed JSON value as `T` (a batch item), with the same
/// codes as [`parse_json`].
pub fn parse_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(from_path_error)
}

fn from_path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let message = inner.to_string();
    match inner.classify() {
        serde_json::error::Category::Data => {
            // serde names a missing field only in its message.
            if let Some(name) = message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                let field = if path == "." { name.to_owned() } else { format!("{path}.{name}") };
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_field", format!("{field} is required"))
                    .field(field)
            } else {
                let err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_type", message);
                if path == "." { err } else { err.field(path) }
            }
        }
        _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the body is not valid JSON: {message}")),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Read the body, mapping the body limit to 413 `payload_too_large`.
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the body is over the size limit")
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "the body could not be read")
        }
    })
}

/// A JSON body with this API's error answers (415, 413, 400, 422).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as Content-Type: application/json",
            ));
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halakha_common::Submission;

    fn err(body: &[u8]) -> (u16, String, Option<String>) {
        let e = parse_json::<Submission>(body).expect_err("an error");
        (e.status.as_u16(), e.detail.code, e.detail.field)
    }

    #[test]
    fn each_kind_of_bad_body_gets_its_own_code_and_field() {
        assert_eq!(err(b"{\"content\": \"\xff\"}"), (400, "invalid_utf8".into(), None));
        assert_eq!(err(b"{\"content\": "), (400, "invalid_json".into(), None));
        assert_eq!(err(b"{\"content\": \"x\"} trailing"), (400, "invalid_json".into(), None));
        assert_eq!(err(b"{\"content\": 5}"), (422, "invalid_type".into(), Some("content".into())));
        assert_eq!(
            err(b"{\"content\": \"x\", \"schedule_days\": \"abc\"}"),
            (422, "invalid_type".into(), Some("schedule_days".into()))
        );
        assert_eq!(err(b"{\"source\": \"x\"}"), (422, "missing_field".into(), Some("content".into())));
        assert_eq!(err(b"[1]"), (422, "invalid_type".into(), None));
    }
}
