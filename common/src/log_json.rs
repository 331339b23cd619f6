//! JSON log lines, written straight into the line's buffer.
//!
//! The lines have the shape of `tracing-subscriber`'s JSON format with
//! `flatten_event(true)` and `with_current_span(false)`:
//!
//! ```json
//! {"timestamp":"…","level":"INFO","message":"Message handled","outcome":"ok",
//!  "target":"halakha_nats::runner","spans":[{"stage":"enrich","seq":7,"name":"message"}]}
//! ```
//!
//! That format keeps each span's fields as a JSON object and, for every
//! line, parses each object back into a map of values and serialises it
//! again (and does the same when a span records a field after its start);
//! its event fields go through a map of values too: 4.3 µs for the
//! runner's span and its `Message handled` line, against 1.15 µs here
//! (docs/PERFORMANCE.md). Here a span's fields are kept as the inside of
//! a JSON object (`"stage":"enrich","seq":7`), a field recorded later is
//! appended to it, and a line copies it as it is: nothing is parsed and
//! no value is allocated (a `Debug` value's text is escaped as it is
//! formatted).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter: one JSON object per line.
#[derive(Debug, Default)]
pub(crate) struct JsonLines {
    timer: SystemTime,
}

/// The span-field formatter that goes with [`JsonLines`]: a span's fields
/// as the members of a JSON object, without the braces.
#[derive(Debug, Default)]
pub(crate) struct JsonMembers;

impl<'writer> FormatFields<'writer> for JsonMembers {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut members = Members::new(&mut writer, true);
        fields.record(&mut members);
        members.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut members = Members::new(&mut current.fields, first);
        fields.record(&mut members);
        members.result
    }
}

impl<S> FormatEvent<S, JsonMembers> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonMembers>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        self.timer.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level().as_str())?;
        let mut members = Members::new(&mut writer, false);
        event.record(&mut members);
        members.result?;
        writer.write_str(",\"target\":")?;
        string(&mut writer, meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            writer.write_str(",\"spans\":[")?;
            for (i, span) in scope.from_root().enumerate() {
                if i > 0 {
                    writer.write_char(',')?;
                }
                writer.write_char('{')?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<JsonMembers>>()
                    && !fields.fields.is_empty()
                {
                    writer.write_str(&fields.fields)?;
                    writer.write_char(',')?;
                }
                writer.write_str("\"name\":")?;
                string(&mut writer, span.name())?;
                writer.write_char('}')?;
            }
            writer.write_char(']')?;
        }
        writer.write_str("}\n")
    }
}

/// Writes each field it visits as a JSON member (`"name":value`), with a
/// comma before every member but the first.
struct Members<'a, W: fmt::Write> {
    out: &'a mut W,
    first: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> Members<'a, W> {
    fn new(out: &'a mut W, first: bool) -> Self {
        Self { out, first, result: Ok(()) }
    }

    fn member(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            string(self.out, name)?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl<W: fmt::Write> Visit for Members<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity (serde_json writes them as null too).
        self.member(field, |out| if value.is_finite() { write!(out, "{value}") } else { out.write_str("null") });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| out.write_str(if value { "true" } else { "false" }));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| string(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// A JSON string.
fn string<W: fmt::Write + ?Sized>(out: &mut W, value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what is written to it as the inside of a JSON string (RFC 8259,
/// section 7: the quotation mark, the reverse solidus and the control
/// characters), passing the runs between them through in one write.
struct Escaped<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, byte) in s.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            // Every byte matched above is ASCII, so `i` is a char boundary.
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::subscriber::with_default;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<serde_json::Value> {
            let bytes = self.0.lock().expect("buffer").clone();
            String::from_utf8(bytes)
                .expect("lines in UTF-8")
                .lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .collect()
        }
    }

    /// Every kind of field, in spans nested two deep, one of them with a
    /// field recorded after its start, and text that needs escaping.
    fn log_everything() {
        let outer = tracing::info_span!("http_request", method = %"POST", route = "/v1/halakhot", r#type = "a\"b");
        let _outer = outer.enter();
        let span = tracing::info_span!(
            "message",
            stage = "enrich",
            seq = 7u64,
            attempt = 2i64,
            id = tracing::field::Empty,
            trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736",
        );
        span.record("id", "3f1c\u{5d4}\u{5dc}\u{5db}\u{5d4}");
        let _span = span.enter();
        let error = std::io::Error::other("quote \" backslash \\ newline \n tab \t bell \u{7} unit \u{1f} é");
        tracing::info!(outcome = "ok", elapsed_ms = 12u64, "Message handled");
        tracing::warn!(error = %error, debug = ?("x", 1), ratio = 0.5, nan = f64::NAN, negative = -3i64, yes = true, bytes = &b"\x00\xff"[..], "Transient failure; will retry");
        tracing::error!(message = "a message field", count = 1u64);
        drop(_span);
        drop(_outer);
        tracing::info!(big = u128::MAX, "Outside every span");
    }

    fn run(subscriber: impl Subscriber + Send + Sync + 'static) {
        with_default(subscriber, log_everything);
    }

    fn without_timestamp(mut lines: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
        for line in &mut lines {
            let stamp = line.as_object_mut().and_then(|o| o.remove("timestamp"));
            let stamp = stamp.as_ref().and_then(|s| s.as_str()).unwrap_or_default().to_owned();
            // RFC 3339 in UTC, as `SystemTime` writes it.
            assert!(
                time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339).is_ok(),
                "{stamp}"
            );
        }
        lines
    }

    #[test]
    fn lines_are_what_tracing_subscribers_json_format_writes() {
        let ours = Buffer::default();
        run(tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .with_ansi(false)
            .fmt_fields(JsonMembers)
            .event_format(JsonLines::default())
            .finish());
        let reference = Buffer::default();
        run(tracing_subscriber::fmt()
            .with_writer(reference.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish());

        let ours = without_timestamp(ours.lines());
        let reference = without_timestamp(reference.lines());
        assert_eq!(ours.len(), 4);
        assert_eq!(ours, reference);
        // What the tests and scripts read.
        assert_eq!(ours[0]["message"], "Message handled");
        assert_eq!(ours[0]["spans"][1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ours[0]["spans"][1]["id"], "3f1c\u{5d4}\u{5dc}\u{5db}\u{5d4}");
        assert_eq!(ours[0]["spans"][0]["type"], "a\"b");
        assert_eq!(ours[1]["nan"], serde_json::Value::Null);
        assert!(ours[3].get("spans").is_none());
    }

    #[test]
    fn every_control_character_is_escaped() {
        let text: String = (0u8..0x20).map(char::from).chain("\"\\ é \u{5d4}".chars()).collect();
        let mut out = String::new();
        string(&mut out, &text).expect("a String takes any text");
        assert!(out.bytes().all(|b| b >= 0x20), "{out}");
        assert_eq!(serde_json::from_str::<String>(&out).expect("a JSON string"), text);
    }
}
