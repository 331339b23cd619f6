//! The original service's form route, kept for its clients:
//! `POST /api/v1/processing/halakhot/post` with form fields `content`,
//! `schedule_days` and `last_img` (an image URL). It waits, up to
//! `FORM_WAIT_SECS`, for the item to be published, listening for the
//! `<ns>.published` event (and `<ns>.dlq.>` for a failure) rather than
//! polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use halakha_common::envelope::{DeadLetter, Published, Submission};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::errors::{ApiError, ErrorBody, read_body};
use crate::http::ApiState;
use crate::store;

pub const ROUTE: &str = "/api/v1/processing/halakhot/post";

/// Longest wait for the events' subscription before a request is refused
/// (503).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// How an item ended.
#[derive(Debug, Clone)]
pub enum Finished {
    Published(Published),
    Failed(DeadLetter),
}

/// Requests waiting for their item to finish, by halakha id, and whether
/// the events that end them are subscribed to. The subscription is held
/// only while someone waits (and for a linger after): otherwise every item
/// the pipeline publishes would be sent to ingest and read for nobody.
pub struct Waiters {
    state: Mutex<Waiting>,
    /// Woken by a waiter that found nothing subscribed.
    wanted: Notify,
    /// True while the events are subscribed to; changed under `state`'s lock.
    listening: watch::Sender<bool>,
}

struct Waiting {
    map: HashMap<String, Vec<oneshot::Sender<Finished>>>,
    /// The last time a waiter came or went.
    last_seen: Instant,
}

impl Default for Waiters {
    fn default() -> Self {
        Self {
            state: Mutex::new(Waiting { map: HashMap::new(), last_seen: Instant::now() }),
            wanted: Notify::new(),
            listening: watch::Sender::new(false),
        }
    }
}

impl Waiters {
    /// Wait for `id`. Returns once the events are subscribed to, so that an
    /// item published after this (by this request or another) cannot be
    /// missed: the subscription is sent on the connection that publishes.
    pub async fn register(&self, id: &str) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        let mut ready = {
            let Ok(mut state) = self.state.lock() else { return rx };
            state.map.entry(id.to_owned()).or_default().push(tx);
            state.last_seen = Instant::now();
            if *self.listening.borrow() {
                return rx;
            }
            self.listening.subscribe()
        };
        self.wanted.notify_one();
        let _ = ready.wait_for(|on| *on).await;
        rx
    }

    fn notify(&self, id: &str, finished: &Finished) {
        let senders = self.state.lock().ok().and_then(|mut state| state.map.remove(id));
        for tx in senders.into_iter().flatten() {
            let _ = tx.send(finished.clone());
        }
    }

    /// Drop the waiters of `id` that gave up.
    pub fn forget(&self, id: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.last_seen = Instant::now();
            if let Some(list) = state.map.get_mut(id) {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    state.map.remove(id);
                }
            }
        }
    }

    fn set_listening(&self, on: bool) {
        if let Ok(_state) = self.state.lock() {
            self.listening.send_replace(on);
        }
    }

    /// Stop listening if no one has waited for `linger` (requests whose
    /// client went away count as gone).
    fn stop_if_idle(&self, linger: Duration) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        state.map.retain(|_, list| {
            list.retain(|tx| !tx.is_closed());
            !list.is_empty()
        });
        if state.map.is_empty() && state.last_seen.elapsed() >= linger {
            self.listening.send_replace(false);
            return true;
        }
        false
    }

    fn anyone_waiting(&self) -> bool {
        self.state.lock().is_ok_and(|state| !state.map.is_empty())
    }
}

/// The subjects whose events end a wait.
pub struct Events {
    pub client: async_nats::Client,
    pub published: String,
    pub dead: String,
}

/// Subscribe to the published and dead-letter events while requests wait
/// (and for `linger` after the last one), delivering them to the waiters,
/// until shutdown.
pub async fn listen(events: Events, waiters: Arc<Waiters>, linger: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = waiters.wanted.notified() => {}
        }
        if !waiters.anyone_waiting() {
            continue;
        }
        let subscribed = async {
            let published = events.client.subscribe(events.published.clone()).await?;
            let dead = events.client.subscribe(events.dead.clone()).await?;
            // On the wire before any later publish: the connection sends in order.
            events.client.flush().await?;
            Ok::<_, async_nats::Error>((published, dead))
        };
        let (mut published, mut dead) = match subscribed.await {
            Ok(subscribed) => subscribed,
            Err(error) => {
                tracing::warn!(%error, "Could not subscribe to the published events; trying again");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                waiters.wanted.notify_one();
                continue;
            }
        };
        waiters.set_listening(true);
        let mut idle = tokio::time::interval(linger);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                msg = published.next() => match msg {
                    Some(msg) => {
                        if let Ok(p) = serde_json::from_slice::<Published>(&msg.payload) {
                            let id = p.id.clone();
                            waiters.notify(&id, &Finished::Published(p));
                        }
                    }
                    None => break waiters.set_listening(false),
                },
                msg = dead.next() => match msg {
                    Some(msg) => {
                        if let Ok(d) = serde_json::from_slice::<DeadLetter>(&msg.payload)
                            && let Some(id) = d.id.clone()
                        {
                            waiters.notify(&id, &Finished::Failed(d));
                        }
                    }
                    None => break waiters.set_listening(false),
                },
                _ = idle.tick() => if waiters.stop_if_idle(linger) { break },
            }
        }
        let _ = published.unsubscribe().await;
        let _ = dead.unsubscribe().await;
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
    let deadline = tokio::time::Instant::now() + s.form_wait;
    // Nothing is submitted unless the events can be heard. Subscribing
    // takes a moment unless the broker is out of reach: then the request
    // fails as a publish to it would.
    let subscribed = tokio::time::Instant::now() + s.form_wait.min(SUBSCRIBE_WAIT);
    let waiting = tokio::time::timeout_at(subscribed, s.waiters.register(&id)).await.map_err(|_| {
        s.waiters.forget(&id);
        tracing::warn!(%id, "Could not subscribe to the published events in time");
        ApiError::unavailable()
    })?;
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
        match tokio::time::timeout_at(deadline, waiting).await {
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
