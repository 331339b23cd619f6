//! The Notion REST API, as the posts database of the original service
//! expects it.
//!
//! Limits respected before sending: at most 2000 characters per rich-text
//! item (long values become several items, split on grapheme boundaries so
//! no letter loses its niqqud), at most 100 items per rich-text array and
//! 100 blocks per request.

use std::time::Duration;

use halakha_common::StageError;
use halakha_common::envelope::Enriched;
use halakha_common::error::{classify_http_status, parse_retry_after};
use halakha_common::metrics as m;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};
use unicode_segmentation::UnicodeSegmentation;

use crate::config::NotionConfig;

/// Notion's limit per rich-text item, counted as JavaScript does (UTF-16
/// code units), which is never less than the count of characters.
pub const MAX_TEXT: usize = 2000;
/// Notion's limit of items in one rich-text array, and of blocks per request.
pub const MAX_ITEMS: usize = 100;

/// Property names of the posts database.
pub mod props {
    pub const TITLE: &str = "question";
    pub const TEXT_POST: &str = "text_post";
    pub const LEGEND: &str = "legend";
    pub const CONTENT: &str = "content";
    pub const DATE: &str = "date_post";
    pub const STATUS: &str = "status";
    pub const HALAKHA_ID: &str = "Halakha ID";
    pub const IMAGE: &str = "Image";
}

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

/// Paragraph blocks holding `text`, at most 100 rich-text items each.
fn paragraphs(text: &str) -> Vec<Value> {
    rich_text(text)
        .chunks(MAX_ITEMS)
        .map(|items| json!({"object": "block", "type": "paragraph", "paragraph": {"rich_text": items}}))
        .collect()
}

/// The page body of a `POST /v1/pages`.
pub fn page_body(config: &NotionConfig, m: &Enriched) -> Value {
    let e = &m.enrichment;
    let mut title = rich_text(&e.question);
    title.truncate(MAX_ITEMS);
    let properties = json!({
        props::TITLE: {"title": title},
        props::TEXT_POST: rich_text_prop(&e.text_post),
        props::LEGEND: rich_text_prop(&e.legend),
        props::CONTENT: rich_text_prop(&m.halakha.content),
        props::DATE: {"date": {"start": m.halakha.date_post().to_string()}},
        props::STATUS: {"status": {"name": config.status}},
        props::HALAKHA_ID: {"rich_text": [{"type": "text", "text": {"content": m.id}}]},
    });
    let mut properties = properties;
    if let (Some(url), Some(props)) = (&m.halakha.image_url, properties.as_object_mut()) {
        props.insert(
            props::IMAGE.to_owned(),
            json!({"files": [{"name": "image", "type": "external", "external": {"url": url}}]}),
        );
    }
    let mut children = paragraphs(&e.answer);
    children.push(json!({"object": "block", "type": "divider", "divider": {}}));
    children.extend(paragraphs(&m.halakha.content));
    children.truncate(MAX_ITEMS);
    json!({
        "parent": {"database_id": config.database_id},
        "properties": properties,
        "children": children,
    })
}

/// Notion's error object.
#[derive(Debug, Deserialize)]
struct ApiError {
    code: Option<String>,
    message: Option<String>,
}

pub struct Notion {
    http: reqwest::Client,
    config: NotionConfig,
}

impl Notion {
    pub fn new(config: NotionConfig) -> Result<Self, reqwest::Error> {
        let http =
            reqwest::Client::builder().timeout(config.timeout).connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Self { http, config })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.config.base_url))
            .bearer_auth(self.config.token.expose_secret())
            .header("Notion-Version", &self.config.version)
    }

    async fn send(&self, operation: &'static str, req: reqwest::RequestBuilder) -> Result<Value, StageError> {
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
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let err = error_for(operation, status, retry_after, &resp.text().await.unwrap_or_default());
        let outcome = if err.is_transient() { "transient" } else { "permanent" };
        metrics::counter!(m::NOTION_REQUESTS_TOTAL, "operation" => operation, "outcome" => outcome).increment(1);
        Err(err)
    }

    /// Create the page of a halakha.
    pub async fn create(&self, m: &Enriched) -> Result<Page, StageError> {
        let v = self.send("create_page", self.post("/v1/pages").json(&page_body(&self.config, m))).await?;
        serde_json::from_value(v).map_err(|e| StageError::transient("the Notion page has no id or url").with_source(e))
    }

    /// Find the page of a halakha by its `Halakha ID` property.
    pub async fn find(&self, id: &str) -> Result<Option<Page>, StageError> {
        let body = json!({"filter": {"property": props::HALAKHA_ID, "rich_text": {"equals": id}}, "page_size": 1});
        let path = format!("/v1/databases/{}/query", self.config.database_id);
        let v = self.send("query_database", self.post(&path).json(&body)).await?;
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
