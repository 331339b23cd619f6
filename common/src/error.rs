//! The error taxonomy every stage handler speaks.

use std::time::Duration;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a stage handler reports when it cannot finish a message.
///
/// The stage runner turns the kind into a broker action: a transient error
/// is nak'ed with a delay (honouring `retry_after`), a permanent one is
/// dead-lettered at once.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Might succeed later: timeout, connection refused, 429, 5xx.
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        /// What the remote side asked us to wait, when it said.
        retry_after: Option<Duration>,
        #[source]
        source: Option<Source>,
    },
    /// Will never succeed as it is: invalid input, 4xx, invalid model output.
    #[error("permanent: {reason}")]
    Permanent {
        reason: String,
        #[source]
        source: Option<Source>,
    },
    /// Nothing is wrong with the message, but the stage must stop for a
    /// while (provider quota exhausted, daily budget spent). The runner
    /// stops fetching, holds the message with in-progress acks and tries it
    /// again after `resume_after`: no delivery is spent, nothing is
    /// dead-lettered.
    #[error("paused: {reason}")]
    Paused { reason: String, resume_after: Duration },
}

impl StageError {
    pub fn transient(reason: impl Into<String>) -> Self {
        StageError::Transient { reason: reason.into(), retry_after: None, source: None }
    }

    pub fn transient_after(reason: impl Into<String>, retry_after: Option<Duration>) -> Self {
        StageError::Transient { reason: reason.into(), retry_after, source: None }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        StageError::Permanent { reason: reason.into(), source: None }
    }

    pub fn paused(reason: impl Into<String>, resume_after: Duration) -> Self {
        StageError::Paused { reason: reason.into(), resume_after }
    }

    /// Attach the underlying error, kept in the cause chain.
    pub fn with_source(mut self, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        match &mut self {
            StageError::Transient { source, .. } | StageError::Permanent { source, .. } => {
                *source = Some(Box::new(error));
            }
            StageError::Paused { .. } => {}
        }
        self
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, StageError::Transient { .. })
    }

    /// The reason followed by every cause in the chain, for logs and
    /// dead-letter entries.
    pub fn full_reason(&self) -> String {
        let mut out = match self {
            StageError::Transient { reason, .. }
            | StageError::Permanent { reason, .. }
            | StageError::Paused { reason, .. } => reason.clone(),
        };
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StageError::Transient { retry_after, .. } => *retry_after,
            StageError::Paused { resume_after, .. } => Some(*resume_after),
            StageError::Permanent { .. } => None,
        }
    }

    pub fn is_paused(&self) -> bool {
        matches!(self, StageError::Paused { .. })
    }
}

/// An error and its causes on one line: `outer: cause: root cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Map an HTTP status code of an outside API to an error kind, following
/// the delivery rules: 408, 409, 429 and 5xx (529 included) are transient,
/// every other 4xx is permanent. Returns `None` for success codes.
pub fn classify_http_status(status: u16) -> Option<bool> {
    match status {
        200..=399 => None,
        408 | 409 | 425 | 429 => Some(true),
        500..=599 => Some(true),
        _ => Some(false),
    }
}

/// Parse a `Retry-After` header value given in seconds (the form OpenAI and
/// Notion send). HTTP dates are not used by either API and are ignored.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_kinds_as_the_delivery_rules_say() {
        for transient in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert_eq!(classify_http_status(transient), Some(true), "{transient}");
        }
        for permanent in [400, 401, 403, 404, 413, 422] {
            assert_eq!(classify_http_status(permanent), Some(false), "{permanent}");
        }
        assert_eq!(classify_http_status(200), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_rejects_garbage() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn full_reason_keeps_the_cause_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = StageError::transient("database unreachable").with_source(io);
        assert_eq!(e.full_reason(), "database unreachable: refused");
        assert!(e.is_transient());
    }
}
