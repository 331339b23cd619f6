//! W3C Trace Context (`traceparent`): one trace id follows a submission
//! from the HTTP request (or the `<ns>.submitted` message) through every
//! stage's NATS headers, log spans and dead-letter entries.
//!
//! The header is `version-traceid-parentid-flags`, e.g.
//! `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`. Each hop keeps
//! the trace id and gets a new span id, so a collector (or an operator
//! with `grep`) sees one trace per submission.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

/// The header's name, in HTTP and in NATS messages.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed or started trace context.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// Parse a `traceparent` value; `None` when it breaks the spec (then a
    /// receiver starts a new trace, as the spec says).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.splitn(5, '-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == "00" && rest.is_some() {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self { trace_id, span_id, flags })
    }

    /// A new trace (sampled).
    pub fn new_root() -> Self {
        let trace_id = (u128::from(random_u64()) << 64) | u128::from(random_u64());
        Self { trace_id: trace_id.max(1), span_id: random_u64().max(1), flags: 0x01 }
    }

    /// The next hop: same trace, new span id.
    pub fn child(&self) -> Self {
        Self { span_id: random_u64().max(1), ..*self }
    }

    /// Continue the trace of an incoming `traceparent`, or start one.
    pub fn continue_from(header: Option<&str>) -> Self {
        header.and_then(Self::parse).map_or_else(Self::new_root, |parent| parent.child())
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The `traceparent` value of this hop (always version 00).
    pub fn header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_u64() -> u64 {
    // A fresh RandomState is keyed from the OS's randomness: enough for
    // ids that must be unique, not secret.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_round_trips() {
        let t = TraceContext::parse(SPEC_EXAMPLE).expect("valid");
        assert_eq!(t.header(), SPEC_EXAMPLE);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let t = TraceContext::parse(SPEC_EXAMPLE).expect("valid");
        let c = t.child();
        assert_eq!(c.trace_id(), t.trace_id());
        assert_ne!(c.header(), t.header());
        assert!(TraceContext::parse(&c.header()).is_some());
        assert_eq!(TraceContext::continue_from(Some(SPEC_EXAMPLE)).trace_id(), t.trace_id());
    }

    #[test]
    fn invalid_values_start_a_new_trace() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let fresh = TraceContext::continue_from(Some("garbage"));
        assert_eq!(fresh.trace_id().len(), 32);
        assert_ne!(TraceContext::new_root().trace_id(), TraceContext::new_root().trace_id());
        // A later version with more fields is read for its known part.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
    }
}
