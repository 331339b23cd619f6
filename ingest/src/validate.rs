//! One validation and one id derivation for both ways in (HTTP and
//! `<ns>.submitted`).

use halakha_common::envelope::{Halakha, Ingested, Lang, SCHEMA_VERSION, Submission};
use halakha_common::text;
use serde::Serialize;
use time::OffsetDateTime;

/// Longest `source`, in characters.
pub const MAX_SOURCE_CHARS: usize = 500;
/// Longest `idempotency_key`, in characters.
pub const MAX_KEY_CHARS: usize = 200;
/// Largest `schedule_days`.
pub const MAX_SCHEDULE_DAYS: i64 = 365;
/// Longest `image_url`, in characters.
pub const MAX_URL_CHARS: usize = 2000;

/// A rejected submission: what is wrong, and with which field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
    pub field: &'static str,
}

fn invalid(code: &'static str, field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { code, field, message: message.into() }
}

/// Guess the language from the script: Hebrew letters mean `he`; Latin
/// text with French accents or words means `fr`; other Latin text `en`.
pub fn detect_lang(content: &str) -> Option<Lang> {
    let (mut hebrew, mut latin, mut french) = (0usize, 0usize, 0usize);
    for c in content.chars() {
        match c {
            '\u{05d0}'..='\u{05ea}' => hebrew += 1,
            'a'..='z' | 'A'..='Z' => latin += 1,
            'é' | 'è' | 'ê' | 'à' | 'â' | 'ç' | 'ù' | 'û' | 'ô' | 'î' | 'ï' | 'ë' | 'œ' => {
                latin += 1;
                french += 1;
            }
            _ => {}
        }
    }
    if hebrew > 0 && hebrew >= latin {
        Some(Lang::He)
    } else if latin == 0 {
        None
    } else if french * 200 >= latin || content.contains(" le ") && content.contains(" la ") {
        Some(Lang::Fr)
    } else {
        Some(Lang::En)
    }
}

/// Validate and normalise a submission into the `Ingested` envelope.
/// `extra_days` is added to `schedule_days` after it is checked (item *i*
/// of a spread batch is scheduled *i* days later).
pub fn validate(
    s: Submission,
    max_content_chars: usize,
    extra_days: u16,
    now: OffsetDateTime,
) -> Result<Ingested, Invalid> {
    if s.schema_version != SCHEMA_VERSION {
        return Err(invalid("unsupported_schema_version", "schema_version", format!("must be {SCHEMA_VERSION}")));
    }
    let content = text::normalize(&s.content);
    if content.is_empty() {
        return Err(invalid("empty", "content", "must not be empty"));
    }
    let chars = content.chars().count();
    if chars > max_content_chars {
        return Err(invalid(
            "too_long",
            "content",
            format!("has {chars} characters; the limit is {max_content_chars}"),
        ));
    }
    let schedule_days = s.schedule_days.unwrap_or(0);
    if !(0..=MAX_SCHEDULE_DAYS).contains(&schedule_days) {
        return Err(invalid("out_of_range", "schedule_days", format!("must be between 0 and {MAX_SCHEDULE_DAYS}")));
    }
    let lang = match s.lang.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        Some(l) => Some(l.parse::<Lang>().map_err(|_| invalid("unsupported", "lang", "must be one of he, en, fr"))?),
        None => detect_lang(&content),
    };
    let source = optional_text(s.source.as_deref(), "source", MAX_SOURCE_CHARS)?;
    let key = optional_text(s.idempotency_key.as_deref(), "idempotency_key", MAX_KEY_CHARS)?;
    let image_url = optional_text(s.image_url.as_deref(), "image_url", MAX_URL_CHARS)?;
    if let Some(url) = &image_url
        && !is_http_url(url)
    {
        return Err(invalid("invalid_url", "image_url", "must be an http:// or https:// URL"));
    }
    let id = text::derive_id(key.as_deref(), &content);
    Ok(Ingested {
        schema_version: SCHEMA_VERSION,
        id,
        halakha: Halakha {
            content,
            lang,
            source,
            schedule_days: u16::try_from(schedule_days).unwrap_or(0).saturating_add(extra_days),
            received_at: now,
            image_url,
        },
    })
}

fn is_http_url(u: &str) -> bool {
    let rest = u.strip_prefix("https://").or_else(|| u.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.chars().any(char::is_whitespace))
}

fn optional_text(value: Option<&str>, field: &'static str, max: usize) -> Result<Option<String>, Invalid> {
    let Some(v) = text::normalize_optional(value) else { return Ok(None) };
    if v.chars().count() > max {
        return Err(invalid("too_long", field, format!("must have at most {max} characters")));
    }
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(content: &str) -> Submission {
        Submission {
            schema_version: 1,
            content: content.into(),
            schedule_days: None,
            lang: None,
            source: None,
            idempotency_key: None,
            image_url: None,
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH
    }

    #[test]
    fn blank_content_is_refused_naming_the_field() {
        let e = validate(sub(" \n\t "), 100, 0, now()).expect_err("blank");
        assert_eq!((e.code, e.field), ("empty", "content"));
    }

    #[test]
    fn content_over_the_limit_is_refused_in_characters_not_bytes() {
        // 10 Hebrew letters are 20 bytes but 10 characters.
        assert!(validate(sub("נוהג בכוי:"), 10, 0, now()).is_ok());
        let e = validate(sub("נוהג בכוי:!"), 10, 0, now()).expect_err("too long");
        assert_eq!(e.field, "content");
    }

    #[test]
    fn schedule_days_outside_0_to_365_is_refused() {
        for bad in [-1, 366] {
            let mut s = sub("x");
            s.schedule_days = Some(bad);
            assert_eq!(validate(s, 100, 0, now()).expect_err("range").field, "schedule_days");
        }
    }

    #[test]
    fn nul_and_control_characters_are_removed_and_the_id_follows_the_clean_text() {
        let a = validate(sub("a\u{0}b\u{7}\n"), 100, 0, now()).expect("valid");
        let b = validate(sub("ab"), 100, 0, now()).expect("valid");
        assert_eq!(a.halakha.content, "ab");
        assert_eq!(a.id, b.id);
    }

    #[test]
    fn idempotency_key_gives_the_id_and_language_is_detected_from_the_script() {
        let mut s = sub("יתגבר כארי לעמוד בבוקר");
        s.idempotency_key = Some("ksa-he-1-1".into());
        let i = validate(s, 100, 0, now()).expect("valid");
        assert_eq!(i.id, text::derive_id(Some("ksa-he-1-1"), ""));
        assert_eq!(i.halakha.lang, Some(Lang::He));
        assert_eq!(detect_lang("Celui qui récite le Chema le soir"), Some(Lang::Fr));
        assert_eq!(detect_lang("I have set Hashem before me always."), Some(Lang::En));
    }

    #[test]
    fn a_submission_names_the_id_its_validation_gives() {
        use halakha_common::envelope::Envelope;
        // The runner logs and dead-letters a submission under this id
        // before validating it.
        for key in [None, Some("ksa-he-1-1"), Some("  ksa-he-1-1\n"), Some(" \t "), Some("e\u{301}\u{7}")] {
            let mut s = sub("  e\u{301}cole\u{0}\n");
            s.idempotency_key = key.map(str::to_owned);
            let named = s.id();
            assert_eq!(named, validate(s, 100, 0, now()).expect("valid").id, "{key:?}");
        }
    }

    #[test]
    fn image_urls_must_be_http_and_extra_days_shift_the_schedule() {
        let mut s = sub("x");
        s.image_url = Some("javascript:alert(1)".into());
        assert_eq!(validate(s, 100, 0, now()).expect_err("url").code, "invalid_url");
        let mut s = sub("x");
        s.image_url = Some("https://images.example.org/a.png".into());
        s.schedule_days = Some(3);
        let i = validate(s, 100, 4, now()).expect("valid");
        assert_eq!(i.halakha.schedule_days, 7);
        assert_eq!(i.halakha.image_url.as_deref(), Some("https://images.example.org/a.png"));
    }

    #[test]
    fn an_unknown_language_is_refused() {
        let mut s = sub("x");
        s.lang = Some("ru".into());
        assert_eq!(validate(s, 100, 0, now()).expect_err("lang").field, "lang");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::errors::parse_json;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any bytes: a submission, or a JSON error with a status and a code.
        #[test]
        fn any_body_is_accepted_or_rejected_with_a_reason(body in prop::collection::vec(any::<u8>(), 0..512)) {
            match parse_json::<Submission>(&body) {
                Ok(s) => {
                    // ...and then validation decides, again without panicking.
                    match validate(s, 1000, 3, OffsetDateTime::UNIX_EPOCH) {
                        Ok(i) => prop_assert_eq!(i.id.len(), 32),
                        Err(e) => prop_assert!(!e.message.is_empty() && !e.code.is_empty()),
                    }
                }
                Err(e) => {
                    prop_assert!(e.status.is_client_error());
                    prop_assert!(!e.detail.code.is_empty() && !e.detail.message.is_empty());
                }
            }
        }

        /// Structured but hostile fields: never a panic, and an accepted
        /// text is always within the limits.
        #[test]
        fn hostile_fields_are_validated_without_panic(
            content in ".{0,300}",
            days in any::<i64>(),
            lang in prop::option::of(".{0,4}"),
            key in prop::option::of(".{0,300}"),
        ) {
            let s = Submission {
                schema_version: 1,
                content,
                schedule_days: Some(days),
                lang,
                source: None,
                idempotency_key: key,
                image_url: None,
            };
            if let Ok(i) = validate(s, 200, 0, OffsetDateTime::UNIX_EPOCH) {
                prop_assert!(!i.halakha.content.is_empty() && i.halakha.content.chars().count() <= 200);
                prop_assert!(i.halakha.schedule_days <= 365);
                prop_assert!(!i.halakha.content.contains('\0'));
            }
        }

        /// Every envelope decoder meets arbitrary bytes without panicking.
        #[test]
        fn envelope_decoding_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<halakha_common::Ingested>(&body);
            let _ = serde_json::from_slice::<halakha_common::Enriched>(&body);
            let _ = serde_json::from_slice::<halakha_common::Published>(&body);
            let _ = serde_json::from_slice::<halakha_common::DeadLetter>(&body);
        }
    }
}
