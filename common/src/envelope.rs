//! Versioned messages carried between stages.
//!
//! Every message has a `schema_version` and the stable halakha `id`. The
//! JSON of each version is frozen by the snapshot tests at the bottom of
//! this file: messages already stored in a stream must stay readable after
//! an upgrade. A breaking change bumps [`SCHEMA_VERSION`] and keeps a reader
//! for the previous one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::text;

/// The envelope version this build writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;

// `YYYY-MM-DD`, the form Notion and Postgres use for dates.
time::serde::format_description!(iso_date, Date, "[year]-[month]-[day]");

fn current_version() -> u32 {
    SCHEMA_VERSION
}

fn published_status() -> String {
    "published".into()
}

/// Behaviour common to every envelope.
pub trait Envelope {
    /// Short name used in logs and metrics (`submission`, `ingested`, ...).
    const KIND: &'static str;
    /// The stable halakha id.
    fn id(&self) -> String;
    /// The version this message was written with.
    fn schema_version(&self) -> u32;
}

/// Language of a halakha text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    He,
    En,
    Fr,
}

impl Lang {
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::He => "he",
            Lang::En => "en",
            Lang::Fr => "fr",
        }
    }
}

impl std::str::FromStr for Lang {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "he" => Ok(Lang::He),
            "en" => Ok(Lang::En),
            "fr" => Ok(Lang::Fr),
            other => Err(format!("unsupported language {other:?}: expected he, en or fr")),
        }
    }
}

/// What an upstream system submits, over HTTP or on `<ns>.submitted`.
///
/// `schema_version` may be omitted by upstream systems (it defaults to the
/// current one). The stable id is derived, see [`Submission::id`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Submission {
    #[serde(default = "current_version")]
    pub schema_version: u32,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_days: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// An image for the post (http or https URL), written to Notion's `Image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

impl Envelope for Submission {
    const KIND: &'static str = "submission";
    /// The id the pipeline will give this submission: from its
    /// `idempotency_key` ([`text::normalize_optional`], as ingest's
    /// validation reads it), else from its normalised content, which is
    /// normalised only then: with a key the id does not depend on it.
    fn id(&self) -> String {
        match text::normalize_optional(self.idempotency_key.as_deref()) {
            Some(key) => text::derive_id(Some(&key), ""),
            None => text::derive_id(None, &text::normalize(&self.content)),
        }
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

/// The input text and its scheduling, carried unchanged through the stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halakha {
    /// NFC-normalised, trimmed text.
    pub content: String,
    /// Declared or detected language of the text, if known.
    pub lang: Option<Lang>,
    pub source: Option<String>,
    pub schedule_days: u16,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// An image for the post, when the submission gave one (added in v1
    /// as an optional field: older messages read as `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

impl Halakha {
    /// The day the post is scheduled for: processing day + `schedule_days`.
    pub fn date_post(&self) -> Date {
        self.received_at.date().saturating_add(time::Duration::days(i64::from(self.schedule_days)))
    }
}

/// Accepted by ingest, published on `<ns>.ingested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingested {
    pub schema_version: u32,
    pub id: String,
    #[serde(flatten)]
    pub halakha: Halakha,
}

impl Envelope for Ingested {
    const KIND: &'static str = "ingested";
    fn id(&self) -> String {
        self.id.clone()
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

/// A cited source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourceRef {
    /// The work, as the text names it (e.g. `Psalms`, `Shulchan Arukh`).
    pub name: String,
    /// Chapter, verse or paragraph, when the text gives one.
    pub reference: Option<String>,
}

/// What the language model makes of a text ("What a halakha becomes").
///
/// The JSON schema sent to the model is generated from this type (see
/// `halakha-enrich`), so the two cannot drift apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Enrichment {
    /// A short title for the ruling.
    pub title: String,
    /// The practical question the ruling answers.
    pub question: String,
    /// The ruling's answer, faithful to the text.
    pub answer: String,
    /// Short lowercase keywords.
    pub tags: Vec<String>,
    /// Broad themes.
    pub themes: Vec<String>,
    /// Works the text itself cites.
    pub sources: Vec<SourceRef>,
    /// 1 (anyone can follow it) to 5 (advanced study).
    #[schema(minimum = 1, maximum = 5)]
    pub difficulty_level: u8,
    /// The text of the social-media post, built from the answer.
    pub text_post: String,
    /// The caption of the post.
    pub legend: String,
    /// The language of the halakha text.
    pub language: Lang,
}

/// Token usage reported by the model provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// Structured by enrich, published on `<ns>.enriched`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enriched {
    pub schema_version: u32,
    pub id: String,
    #[serde(flatten)]
    pub halakha: Halakha,
    pub enrichment: Enrichment,
    pub model: String,
    pub prompt_version: String,
    pub usage: Usage,
}

impl Envelope for Enriched {
    const KIND: &'static str = "enriched";
    fn id(&self) -> String {
        self.id.clone()
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

/// Stored and (when the sink is on) on Notion; published on `<ns>.published`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub schema_version: u32,
    pub id: String,
    pub title: String,
    /// The row's status once both effects are durable: `published`.
    /// (Added to v1 as a field with a default: older events still read.)
    #[serde(default = "published_status")]
    pub status: String,
    #[serde(with = "iso_date")]
    pub date_post: Date,
    pub notion_page_id: Option<String>,
    pub notion_page_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub published_at: OffsetDateTime,
}

impl Envelope for Published {
    const KIND: &'static str = "published";
    fn id(&self) -> String {
        self.id.clone()
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message can never succeed as it is (invalid input, rejected by an API).
    Permanent,
    /// Transient failures until the consumer's `max_deliver` was reached.
    MaxDeliveries,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Permanent => "permanent",
            ErrorKind::MaxDeliveries => "max_deliveries",
        }
    }
}

/// One failed delivery of a message, as the dead letter recounts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The delivery number (1 for the first).
    pub attempt: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub reason: String,
}

/// The header carrying a submission's trace through every stage: W3C
/// `traceparent` (see [`crate::trace`]).
pub const TRACE_HEADER: &str = crate::trace::TRACEPARENT;

/// The trace header of messages written before `traceparent` (still read
/// for the trace id of their dead letters).
pub const LEGACY_TRACE_HEADER: &str = "Halakha-Trace-Id";

/// A message a stage gave up on, published on `<ns>.dlq.<stage>`.
///
/// Keeps the original payload and headers so it can be put back where it
/// failed. The payload is kept as text when it is UTF-8, else in base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema_version: u32,
    /// The halakha id when the payload could be read far enough to know it.
    pub id: Option<String>,
    pub stage: String,
    pub error_kind: ErrorKind,
    pub reason: String,
    /// Deliveries of the original message, this one included.
    pub attempts: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
    /// Where the original message was.
    pub subject: String,
    pub stream: String,
    pub stream_seq: u64,
    pub headers: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Set when the payload was too large to keep whole in the entry (the
    /// broker limits message size): its size in bytes. Only the start is
    /// kept; the whole message stays at `stream`/`stream_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_truncated_from: Option<u64>,
    /// Every failed delivery before this one, oldest first, with the last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Attempt>,
    /// The submission's W3C trace id (from `traceparent`; older messages:
    /// `Halakha-Trace-Id`), when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// What the stage worked with, where relevant (enrich: `model`,
    /// `prompt_version`, `schema_version`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context: BTreeMap<String, String>,
}

impl Envelope for DeadLetter {
    const KIND: &'static str = "dead_letter";
    fn id(&self) -> String {
        self.id.clone().unwrap_or_default()
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    fn halakha() -> Halakha {
        Halakha {
            content: "נוהג בכוי:".into(),
            lang: Some(Lang::He),
            source: Some("Shulchan Arukh, Yoreh De'ah 65:6".into()),
            schedule_days: 2,
            received_at: datetime!(2026-11-24 06:00:00 UTC),
            image_url: None,
        }
    }

    fn enrichment() -> Enrichment {
        Enrichment {
            title: "t".into(),
            question: "q".into(),
            answer: "a".into(),
            tags: vec!["tag".into()],
            themes: vec!["theme".into()],
            sources: vec![SourceRef { name: "Shulchan Arukh".into(), reference: None }],
            difficulty_level: 2,
            text_post: "p".into(),
            legend: "l".into(),
            language: Lang::He,
        }
    }

    /// Freezes the JSON of `value` and proves it reads back unchanged.
    fn snapshot<T>(value: &T, frozen: &str)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_string(value).expect("serialises");
        assert_eq!(json, frozen, "the v1 JSON changed: bump SCHEMA_VERSION instead");
        let back: T = serde_json::from_str(frozen).expect("frozen v1 JSON still reads");
        assert_eq!(&back, value);
    }

    #[test]
    fn submission_v1_json_is_frozen_and_schema_version_defaults() {
        let s = Submission {
            schema_version: 1,
            content: "text".into(),
            schedule_days: Some(3),
            lang: Some("fr".into()),
            source: None,
            idempotency_key: Some("k".into()),
            image_url: None,
        };
        snapshot(&s, r#"{"schema_version":1,"content":"text","schedule_days":3,"lang":"fr","idempotency_key":"k"}"#);
        let minimal: Submission = serde_json::from_str(r#"{"content":"x"}"#).expect("reads");
        assert_eq!(minimal.schema_version, SCHEMA_VERSION);
    }

    #[test]
    fn ingested_v1_json_is_frozen() {
        let m = Ingested { schema_version: 1, id: "abc".into(), halakha: halakha() };
        snapshot(
            &m,
            r#"{"schema_version":1,"id":"abc","content":"נוהג בכוי:","lang":"he","source":"Shulchan Arukh, Yoreh De'ah 65:6","schedule_days":2,"received_at":"2026-11-24T06:00:00Z"}"#,
        );
    }

    #[test]
    fn enriched_v1_json_is_frozen() {
        let m = Enriched {
            schema_version: 1,
            id: "abc".into(),
            halakha: halakha(),
            enrichment: enrichment(),
            model: "gpt-4o-mini".into(),
            prompt_version: "p1".into(),
            usage: Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 },
        };
        snapshot(
            &m,
            r#"{"schema_version":1,"id":"abc","content":"נוהג בכוי:","lang":"he","source":"Shulchan Arukh, Yoreh De'ah 65:6","schedule_days":2,"received_at":"2026-11-24T06:00:00Z","enrichment":{"title":"t","question":"q","answer":"a","tags":["tag"],"themes":["theme"],"sources":[{"name":"Shulchan Arukh","reference":null}],"difficulty_level":2,"text_post":"p","legend":"l","language":"he"},"model":"gpt-4o-mini","prompt_version":"p1","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        );
    }

    #[test]
    fn published_v1_json_is_frozen() {
        let m = Published {
            schema_version: 1,
            id: "abc".into(),
            title: "t".into(),
            status: "published".into(),
            date_post: date!(2026 - 11 - 26),
            notion_page_id: Some("p".into()),
            notion_page_url: Some("https://www.notion.so/p".into()),
            published_at: datetime!(2026-11-24 06:00:01 UTC),
        };
        snapshot(
            &m,
            r#"{"schema_version":1,"id":"abc","title":"t","status":"published","date_post":"2026-11-26","notion_page_id":"p","notion_page_url":"https://www.notion.so/p","published_at":"2026-11-24T06:00:01Z"}"#,
        );
    }

    #[test]
    fn a_published_event_written_before_the_status_field_still_reads() {
        let old = r#"{"schema_version":1,"id":"abc","title":"t","date_post":"2026-11-26","notion_page_id":null,"notion_page_url":null,"published_at":"2026-11-24T06:00:01Z"}"#;
        let p: Published = serde_json::from_str(old).expect("reads");
        assert_eq!(p.status, "published");
    }

    #[test]
    fn dead_letter_v1_json_is_frozen() {
        let m = DeadLetter {
            schema_version: 1,
            id: Some("abc".into()),
            stage: "enrich".into(),
            error_kind: ErrorKind::Permanent,
            reason: "model output is not valid JSON".into(),
            attempts: 1,
            failed_at: datetime!(2026-11-24 06:00:02 UTC),
            subject: "halakha.ingested".into(),
            stream: "HALAKHA_INGESTED".into(),
            stream_seq: 7,
            headers: BTreeMap::from([("Nats-Msg-Id".into(), vec!["abc".into()])]),
            payload: Some("{}".into()),
            payload_base64: None,
            payload_truncated_from: None,
            history: Vec::new(),
            trace_id: None,
            context: BTreeMap::new(),
        };
        snapshot(
            &m,
            r#"{"schema_version":1,"id":"abc","stage":"enrich","error_kind":"permanent","reason":"model output is not valid JSON","attempts":1,"failed_at":"2026-11-24T06:00:02Z","subject":"halakha.ingested","stream":"HALAKHA_INGESTED","stream_seq":7,"headers":{"Nats-Msg-Id":["abc"]},"payload":"{}"}"#,
        );
    }

    #[test]
    fn date_post_is_processing_day_plus_schedule_days() {
        assert_eq!(halakha().date_post(), date!(2026 - 11 - 26));
    }
}
