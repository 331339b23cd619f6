//! The Notion REST API, as the posts database of the original service
//! expects it.
//!
//! Limits respected before sending: at most 2000 characters per rich-text
//! item (long values become several items, split on grapheme boundaries so
//! no letter loses its niqqud), at most 100 items per rich-text array, 100
//! blocks per request (the rest appended with `PATCH /v1/blocks/{id}/children`),
//! and an average of 3 requests per second for the integration.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use halakha_common::cache::Cache;

use halakha_common::StageError;
use halakha_common::envelope::Enriched;
use halakha_common::error::{classify_http_status, parse_retry_after};
use halakha_common::metrics as m;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};
use unicode_segmentation::UnicodeSegmentation;

use crate::config::{NotionConfig, Parent};

/// Notion's limit per rich-text item, counted as JavaScript does (UTF-16
/// code units), which is never less than the count of characters.
pub const MAX_TEXT: usize = 2000;
/// Notion's limit of items in one rich-text array, and of blocks per request.
pub const MAX_ITEMS: usize = 100;

/// A page that exists in Notion.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Page {
    pub id: String,
    pub url: String,
}

/// Split `text` into pieces of at most [`MAX_TEXT`] UTF-16 units without
/// cutting a grapheme cluster. Concatenating the pieces gives `text` back.
pub fn split_text(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0;
    for g in text.graphemes(true) {
        let len = g.encode_utf16().count();
        if cur_len + len > MAX_TEXT && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            cur_len = 0;
        }
        cur.push_str(g);
        cur_len += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn rich_text(text: &str) -> Vec<Value> {
    split_text(text).into_iter().map(|t| json!({"type": "text", "text": {"content": t}})).collect()
}

/// A rich-text property value; over 100 items it would be refused, so a
/// property keeps the first 100 (200,000 characters) and the body blocks
/// carry the full text.
fn rich_text_prop(text: &str) -> Value {
    let mut items = rich_text(text);
    items.truncate(MAX_ITEMS);
    json!({"rich_text": items})
}

/// Paragraph blocks holding `text`: one per line (blank lines dropped),
/// each split into rich-text items, at most 100 items a block.
fn paragraphs(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|line| {
            rich_text(line)
                .chunks(MAX_ITEMS)
                .map(|items| json!({"object": "block", "type": "paragraph", "paragraph": {"rich_text": items}}))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The page body, in order: the answer, a divider, the full text. The
/// concatenation of the blocks' texts is the answer and the text, whole.
pub fn blocks(m: &Enriched) -> Vec<Value> {
    let mut children = paragraphs(&m.enrichment.answer);
    children.push(json!({"object": "block", "type": "divider", "divider": {}}));
    children.extend(paragraphs(&m.halakha.content));
    children
}

/// The properties of a page, named as configured.
pub fn properties(config: &NotionConfig, m: &Enriched) -> Value {
    let e = &m.enrichment;
    let p = &config.properties;
    let mut title = rich_text(&e.question);
    title.truncate(MAX_ITEMS);
    let mut props = serde_json::Map::new();
    props.insert(p.title.clone(), json!({"title": title}));
    props.insert(p.text_post.clone(), rich_text_prop(&e.text_post));
    props.insert(p.legend.clone(), rich_text_prop(&e.legend));
    props.insert(p.content.clone(), rich_text_prop(&m.halakha.content));
    props.insert(p.date.clone(), json!({"date": {"start": m.halakha.date_post().to_string()}}));
    props.insert(p.status.clone(), json!({"status": {"name": config.status}}));
    props.insert(p.halakha_id.clone(), json!({"rich_text": [{"type": "text", "text": {"content": m.id}}]}));
    if let Some(url) = &m.halakha.image_url {
        props.insert(
            p.image.clone(),
            json!({"files": [{"name": "image", "type": "external", "external": {"url": url}}]}),
        );
    }
    Value::Object(props)
}

fn parent(config: &NotionConfig) -> Value {
    match &config.parent {
        Parent::Database(id) => json!({"type": "database_id", "database_id": id}),
        Parent::DataSource(id) => json!({"type": "data_source_id", "data_source_id": id}),
    }
}

/// Notion's error object.
#[derive(Debug, Deserialize)]
struct ApiError {
    code: Option<String>,
    message: Option<String>,
}

/// Notion's "average of 3 requests per second per integration": shared by
/// every replica through Redis (fixed one-second windows) when configured,
/// else per replica (evenly spaced requests).
pub struct RateLimit {
    per_second: u32,
    local: DefaultDirectRateLimiter,
    shared: Arc<Cache>,
    key: String,
}

impl RateLimit {
    pub fn new(per_second: u32, shared: Arc<Cache>, namespace: &str) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            per_second,
            local: DefaultDirectRateLimiter::direct(Quota::per_second(rate).allow_burst(NonZeroU32::MIN)),
            shared,
            key: format!("{namespace}:publish:notion-rate"),
        }
    }

    pub async fn acquire(&self) {
        if self.shared.is_on() {
            loop {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let key = format!("{}:{}", self.key, now.as_secs());
                match self.shared.incr_with_ttl(&key, Duration::from_secs(5)).await {
                    Some(n) if n <= i64::from(self.per_second) => return,
                    Some(_) => {
                        let to_next = Duration::from_millis(1000 - u64::from(now.subsec_millis()));
                        tokio::time::sleep(to_next).await;
                    }
                    None => break,
                }
            }
        }
        self.local.until_ready().await;
    }
}

pub struct Notion {
    http: reqwest::Client,
    config: NotionConfig,
    rate: RateLimit,
}

impl Notion {
    pub fn new(config: NotionConfig, rate: RateLimit) -> Result<Self, reqwest::Error> {
        let http =
            reqwest::Client::builder().timeout(config.timeout).connect_timeout(Duration::from_secs(10)).build()?;
        metrics::counter!(m::NOTION_RATE_LIMITED_TOTAL).increment(0);
        Ok(Self { http, config, rate })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.config.base_url))
            .bearer_auth(self.config.token.expose_secret())
            .header("Notion-Version", &self.config.version)
    }

    async fn send(&self, operation: &'static str, req: reqwest::RequestBuilder) -> Result<Value, StageError> {
        self.rate.acquire().await;
        let result = req.send().await;
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!(m::NOTION_REQUESTS_TOTAL, "operation" => operation, "outcome" => "transient")
                    .increment(1);
                let what = if e.is_timeout() { "timed out" } else { "failed" };
                return Err(StageError::transient(format!("the Notion {operation} request {what}")).with_source(e));
            }
        };
        let status = resp.status();
        if status.is_success() {
            metrics::counter!(m::NOTION_REQUESTS_TOTAL, "operation" => operation, "outcome" => "ok").increment(1);
            return resp.json().await.map_err(|e| {
                StageError::transient(format!("the Notion {operation} answer could not be read")).with_source(e)
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            metrics::counter!(m::NOTION_RATE_LIMITED_TOTAL).increment(1);
        }
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let err = error_for(operation, status, retry_after, &resp.text().await.unwrap_or_default());
        let outcome = if err.is_transient() { "transient" } else { "permanent" };
        metrics::counter!(m::NOTION_REQUESTS_TOTAL, "operation" => operation, "outcome" => outcome).increment(1);
        Err(err)
    }

    /// Create the page of a halakha with its properties and the first
    /// `children` (at most 100).
    pub async fn create(&self, m: &Enriched, children: &[Value]) -> Result<Page, StageError> {
        let body = json!({
            "parent": parent(&self.config),
            "properties": properties(&self.config, m),
            "children": &children[..children.len().min(MAX_ITEMS)],
        });
        let v = self.send("create_page", self.request(reqwest::Method::POST, "/v1/pages").json(&body)).await?;
        serde_json::from_value(v).map_err(|e| StageError::transient("the Notion page has no id or url").with_source(e))
    }

    /// Append blocks to a page, 100 per request.
    pub async fn append(&self, page_id: &str, children: &[Value]) -> Result<(), StageError> {
        for chunk in children.chunks(MAX_ITEMS) {
            let path = format!("/v1/blocks/{page_id}/children");
            self.send("append_blocks", self.request(reqwest::Method::PATCH, &path).json(&json!({"children": chunk})))
                .await?;
        }
        Ok(())
    }

    /// How many blocks a page has (to resume an interrupted append).
    pub async fn count_children(&self, page_id: &str) -> Result<usize, StageError> {
        let mut count = 0;
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/blocks/{page_id}/children?page_size=100");
            if let Some(c) = &cursor {
                path.push_str(&format!("&start_cursor={c}"));
            }
            let v = self.send("list_blocks", self.request(reqwest::Method::GET, &path)).await?;
            count += v["results"].as_array().map_or(0, Vec::len);
            match (v["has_more"].as_bool(), v["next_cursor"].as_str()) {
                (Some(true), Some(next)) => cursor = Some(next.to_owned()),
                _ => return Ok(count),
            }
        }
    }

    /// Find the page of a halakha by its `Halakha ID` property.
    pub async fn find(&self, id: &str) -> Result<Option<Page>, StageError> {
        let body = json!({
            "filter": {"property": self.config.properties.halakha_id, "rich_text": {"equals": id}},
            "page_size": 1
        });
        let path = match &self.config.parent {
            Parent::Database(d) => format!("/v1/databases/{d}/query"),
            Parent::DataSource(d) => format!("/v1/data_sources/{d}/query"),
        };
        let v = self.send("query", self.request(reqwest::Method::POST, &path).json(&body)).await?;
        let first = v.get("results").and_then(|r| r.get(0)).cloned();
        match first {
            Some(p) => Ok(Some(
                serde_json::from_value(p)
                    .map_err(|e| StageError::transient("a Notion result has no id or url").with_source(e))?,
            )),
            None => Ok(None),
        }
    }
}

/// Map a Notion error answer to a kind, keeping Notion's `code` and
/// `message` in the reason.
pub fn error_for(operation: &str, status: StatusCode, retry_after: Option<Duration>, body: &str) -> StageError {
    let api: ApiError = serde_json::from_str(body).unwrap_or(ApiError { code: None, message: None });
    let reason = format!(
        "Notion {operation} answered {}: {} {}",
        status.as_u16(),
        api.code.as_deref().unwrap_or("unknown_error"),
        api.message.as_deref().unwrap_or("").chars().take(500).collect::<String>()
    );
    match classify_http_status(status.as_u16()) {
        Some(false) => StageError::permanent(reason.trim_end()),
        _ => StageError::transient_after(reason.trim_end(), retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_split_into_items_without_losing_a_character() {
        let text = "שַׁבָּת ".repeat(700); // 5,600 characters with niqqud
        let parts = split_text(&text);
        assert!(parts.len() >= 3);
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= MAX_TEXT));
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn a_split_never_separates_a_letter_from_its_niqqud() {
        let text = "שַׁ".repeat(1500);
        for part in split_text(&text) {
            let first = part.chars().next().expect("non-empty");
            assert_eq!(first, 'ש', "a part starts with a combining mark");
        }
    }

    #[test]
    fn notion_errors_map_to_kinds_with_code_and_message() {
        let body = r#"{"object":"error","status":400,"code":"validation_error","message":"status is not a property that exists."}"#;
        let e = error_for("create_page", StatusCode::BAD_REQUEST, None, body);
        assert!(!e.is_transient());
        assert!(e.full_reason().contains("validation_error") && e.full_reason().contains("status is not a property"));
        let e = error_for("create_page", StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(3)), "{}");
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        let e = error_for("create_page", StatusCode::from_u16(529).expect("status"), None, "");
        assert!(e.is_transient());
    }
}
