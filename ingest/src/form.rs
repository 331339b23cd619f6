//! The original service's form route, kept for its clients:
//! `POST /api/v1/processing/halakhot/post` with form fields `content`,
//! `schedule_days` and `last_img` (an image URL). It waits, up to
//! `FORM_WAIT_SECS`, for the item to be published, listening for the
//! `<ns>.published` event (and `<ns>.dlq.>` for a failure) rather than
//! polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use halakha_common::envelope::{DeadLetter, Published, Submission};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::errors::{ApiError, ErrorBody, read_body};
use crate::http::ApiState;
use crate::store;

pub const ROUTE: &str = "/api/v1/processing/halakhot/post";

/// How an item ended.
#[derive(Debug, Clone)]
pub enum Finished {
    Published(Published),
    Failed(DeadLetter),
}

/// Requests waiting for their item to finish, by halakha id.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Vec<oneshot::Sender<Finished>>>>,
}

impl Waiters {
    /// Wait for `id`. Register before publishing, so the event cannot be missed.
    pub fn register(&self, id: &str) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.map.lock() {
            map.entry(id.to_owned()).or_default().push(tx);
        }
        rx
    }

    fn notify(&self, id: &str, finished: &Finished) {
        let senders = self.map.lock().ok().and_then(|mut map| map.remove(id));
        for tx in senders.into_iter().flatten() {
            let _ = tx.send(finished.clone());
        }
    }

    /// Drop the waiters of `id` that gave up.
    pub fn forget(&self, id: &str) {
        if let Ok(mut map) = self.map.lock()
            && let Some(list) = map.get_mut(id)
        {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                map.remove(id);
            }
        }
    }
}

/// Deliver published and dead-letter events to the waiters until shutdown.
pub async fn listen(
    mut published: async_nats::Subscriber,
    mut dead: async_nats::Subscriber,
    waiters: Arc<Waiters>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(msg) = published.next() => {
                if let Ok(p) = serde_json::from_slice::<Published>(&msg.payload) {
                    let id = p.id.clone();
                    waiters.notify(&id, &Finished::Published(p));
                }
            }
            Some(msg) = dead.next() => {
                if let Ok(d) = serde_json::from_slice::<DeadLetter>(&msg.payload)
                    && let Some(id) = d.id.clone()
                {
                    waiters.notify(&id, &Finished::Failed(d));
                }
            }
            else => return,
        }
    }
}

/// The form fields, as the original service took them.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct FormInput {
    pub content: Option<String>,
    /// Days ahead (0..=365), as text.
    pub schedule_days: Option<String>,
    /// URL of the post's image (written to Notion's `Image`); empty = none.
    pub last_img: Option<String>,
}

/// Published within the wait.
#[derive(Debug, Serialize, ToSchema)]
pub struct FormPublished {
    /// `success`, as the original service answered.
    pub status: String,
    pub id: String,
    /// Null when the Notion sink is off.
    pub notion_page_url: Option<String>,
    pub message: String,
}

/// Still in flight when the wait ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct FormPending {
    /// `accepted`.
    pub status: String,
    pub id: String,
    pub message: String,
}

async fn read_form(req: Request, state: &ApiState) -> Result<FormInput, ApiError> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_form", e.body_text()))?;
        let mut input = FormInput::default();
        while let Some(field) =
            multipart.next_field().await.map_err(|e| ApiError::new(e.status(), "invalid_form", e.body_text()))?
        {
            let name = field.name().unwrap_or("").to_owned();
            let value = field.text().await.map_err(|e| ApiError::new(e.status(), "invalid_form", e.body_text()))?;
            match name.as_str() {
                "content" => input.content = Some(value),
                "schedule_days" => input.schedule_days = Some(value),
                "last_img" => input.last_img = Some(value),
                _ => {}
            }
        }
        Ok(input)
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        let bytes = read_body(req, state).await?;
        if std::str::from_utf8(&bytes).is_err() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_utf8", "the body is not valid UTF-8"));
        }
        serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_form", e.to_string()))
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send a form: application/x-www-form-urlencoded or multipart/form-data",
        ))
    }
}

fn to_submission(input: FormInput) -> Result<Submission, ApiError> {
    let Some(content) = input.content else {
        return Err(
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_field", "content is required").field("content")
        );
    };
    let schedule_days = match input.schedule_days.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<i64>().map_err(|_| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_type", "schedule_days must be a whole number")
                .field("schedule_days")
        })?),
    };
    Ok(Submission {
        schema_version: halakha_common::envelope::SCHEMA_VERSION,
        content,
        schedule_days,
        lang: None,
        source: None,
        idempotency_key: None,
        image_url: input.last_img.filter(|u| !u.trim().is_empty()),
    })
}

fn published(id: String, url: Option<String>) -> Response {
    let message = match url {
        Some(_) => "halakha processed and Notion page created",
        None => "halakha processed (Notion sink off)",
    };
    Json(FormPublished { status: "success".into(), id, notion_page_url: url, message: message.into() }).into_response()
}

fn failed(reason: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "processing_failed", format!("the halakha could not be processed: {reason}"))
}

/// Submit one text as a form and wait for it to be published.
#[utoipa::path(
    post, path = "/api/v1/processing/halakhot/post",
    request_body(content = FormInput, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Published within FORM_WAIT_SECS", body = FormPublished),
        (status = 202, description = "Still in flight; follow GET /v1/halakhot/{id}", body = FormPending),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 502, description = "Processing failed (dead-lettered); the reason is given", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn submit(State(s): State<ApiState>, req: Request) -> Result<Response, ApiError> {
    let trace = req
        .extensions()
        .get::<halakha_common::trace::TraceContext>()
        .copied()
        .unwrap_or_else(halakha_common::trace::TraceContext::new_root);
    let input = read_form(req, &s).await?;
    let message = s.ingestor.prepare(to_submission(input)?, 0)?;
    let id = message.id.clone();
    let waiting = s.waiters.register(&id);
    let result = async {
        let accepted = s.ingestor.submit(message, &trace).await?;
        if accepted.settled.is_some() {
            // Known: answer at once if it already ended.
            let view = store::status(&s.ingestor.pool, &id).await.map_err(|_| ApiError::unavailable())?;
            match view {
                Some(v) if v.status == "published" => return Ok(published(id.clone(), v.notion_page_url)),
                Some(v) if v.status == "failed" => return Err(failed(v.error.as_deref().unwrap_or("unknown"))),
                _ => {}
            }
        }
        match tokio::time::timeout(s.form_wait, waiting).await {
            Ok(Ok(Finished::Published(p))) => Ok(published(id.clone(), p.notion_page_url)),
            Ok(Ok(Finished::Failed(d))) => Err(failed(&format!("{}: {}", d.stage, d.reason))),
            Ok(Err(_)) | Err(_) => Ok((
                StatusCode::ACCEPTED,
                Json(FormPending {
                    status: "accepted".into(),
                    id: id.clone(),
                    message: format!("still in flight; follow GET /v1/halakhot/{id}"),
                }),
            )
                .into_response()),
        }
    }
    .await;
    s.waiters.forget(&id);
    result
}
