//! The one module that builds subject, stream and consumer names.
//!
//! Every name is derived from the pipeline namespace (`PIPELINE_NAMESPACE`),
//! so two pipelines, or two test runs, share a NATS server without seeing
//! each other. Nothing else in the code base writes a subject string.

use std::fmt;
use std::str::FromStr;

/// A validated pipeline namespace: `[a-z0-9_-]+`, at most 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

/// The namespace the topology files are written with.
pub const DEFAULT_NAMESPACE: &str = "halakha";

impl Namespace {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace(DEFAULT_NAMESPACE.to_owned())
    }
}

impl FromStr for Namespace {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok { Ok(Namespace(s.to_owned())) } else { Err("must match [a-z0-9_-]+ (at most 64 characters)") }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pipeline's stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Stage {
    #[default]
    Ingest,
    Enrich,
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Ingest, Stage::Enrich, Stage::Publish];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Enrich => "enrich",
            Stage::Publish => "publish",
        }
    }
}

impl FromStr for Stage {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingest" => Ok(Stage::Ingest),
            "enrich" => Ok(Stage::Enrich),
            "publish" => Ok(Stage::Publish),
            _ => Err("expected ingest, enrich or publish"),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a pipeline subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Submitted,
    Ingested,
    Enriched,
    Published,
    DeadLetter(Stage),
}

impl Subject {
    /// The token after the namespace, and the stream suffix.
    fn token(self) -> &'static str {
        match self {
            Subject::Submitted => "submitted",
            Subject::Ingested => "ingested",
            Subject::Enriched => "enriched",
            Subject::Published => "published",
            Subject::DeadLetter(_) => "dlq",
        }
    }
}

/// Where a consumer loop reads, writes and dead-letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Label in logs and metrics: the stage name, or `ingest-status`.
    pub name: &'static str,
    /// The stage that owns the loop (and whose dead-letter subject it uses).
    pub stage: Stage,
    pub input_subject: String,
    pub input_stream: String,
    pub consumer: String,
    /// Where outputs go; `None` for a loop that only records.
    pub output_subject: Option<String>,
    pub dlq_subject: String,
}

/// The consumer of `halakha-ingest` that marks dead-lettered items `failed`.
pub const STATUS_CONSUMER: &str = "ingest-status";
/// The consumer of `halakha-ingest` that turns max-deliveries advisories
/// into dead letters.
pub const ADVISORY_CONSUMER: &str = "ingest-advisories";

/// Names derived from one namespace (and the replica count its streams
/// are made with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: Namespace,
    stream_replicas: usize,
}

impl Names {
    pub fn new(ns: Namespace) -> Self {
        Self { ns, stream_replicas: 1 }
    }

    /// Streams (and the attempts bucket) with `n` replicas
    /// (`STREAM_REPLICAS`: 1 on one server, 3 in a cluster).
    pub fn with_stream_replicas(mut self, n: usize) -> Self {
        self.stream_replicas = n.max(1);
        self
    }

    pub fn stream_replicas(&self) -> usize {
        self.stream_replicas
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// `<ns>.submitted`, `<ns>.dlq.enrich`, ...
    pub fn subject(&self, s: Subject) -> String {
        match s {
            Subject::DeadLetter(stage) => format!("{}.dlq.{}", self.ns, stage),
            other => format!("{}.{}", self.ns, other.token()),
        }
    }

    /// `<ns>.dlq.>`: every dead-letter subject.
    pub fn dlq_wildcard(&self) -> String {
        format!("{}.dlq.>", self.ns)
    }

    /// Stream holding a subject: `HALAKHA_SUBMITTED`, ..., `HALAKHA_DLQ`.
    pub fn stream(&self, s: Subject) -> String {
        format!("{}_{}", self.stream_prefix(), s.token().to_ascii_uppercase())
    }

    /// Every stream of the namespace.
    pub fn streams(&self) -> Vec<String> {
        let mut all: Vec<String> = [
            Subject::Submitted,
            Subject::Ingested,
            Subject::Enriched,
            Subject::Published,
            Subject::DeadLetter(Stage::Ingest),
        ]
        .into_iter()
        .map(|s| self.stream(s))
        .collect();
        all.push(self.advisories_stream());
        all
    }

    /// The key-value bucket keeping the failed attempts of each message
    /// (for the dead letters' history).
    pub fn attempts_bucket(&self) -> String {
        format!("{}_ATTEMPTS", self.stream_prefix())
    }

    /// The stream keeping the max-deliveries advisories of the stages.
    pub fn advisories_stream(&self) -> String {
        format!("{}_ADVISORIES", self.stream_prefix())
    }

    /// The stage whose consumer is `consumer` on `stream`, if any.
    pub fn stage_of(&self, stream: &str, consumer: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| {
            let r = self.route(*s);
            r.input_stream == stream && r.consumer == consumer
        })
    }

    /// The loop of ingest that turns advisories into dead letters.
    pub fn advisory_route(&self) -> Route {
        Route {
            name: ADVISORY_CONSUMER,
            stage: Stage::Ingest,
            input_subject: "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>".into(),
            input_stream: self.advisories_stream(),
            consumer: ADVISORY_CONSUMER.to_owned(),
            output_subject: None,
            dlq_subject: self.subject(Subject::DeadLetter(Stage::Ingest)),
        }
    }

    fn stream_prefix(&self) -> String {
        self.ns.as_str().to_ascii_uppercase()
    }

    /// The route of a stage: its input stream and durable consumer, its
    /// output subject and its dead-letter subject.
    pub fn route(&self, stage: Stage) -> Route {
        let (input, output) = match stage {
            Stage::Ingest => (Subject::Submitted, Subject::Ingested),
            Stage::Enrich => (Subject::Ingested, Subject::Enriched),
            Stage::Publish => (Subject::Enriched, Subject::Published),
        };
        Route {
            name: stage.as_str(),
            stage,
            input_subject: self.subject(input),
            input_stream: self.stream(input),
            consumer: stage.as_str().to_owned(),
            output_subject: Some(self.subject(output)),
            dlq_subject: self.subject(Subject::DeadLetter(stage)),
        }
    }

    /// The status loop of ingest: every dead letter, nothing published.
    pub fn status_route(&self) -> Route {
        let dlq = Subject::DeadLetter(Stage::Ingest);
        Route {
            name: STATUS_CONSUMER,
            stage: Stage::Ingest,
            input_subject: self.dlq_wildcard(),
            input_stream: self.stream(dlq),
            consumer: STATUS_CONSUMER.to_owned(),
            output_subject: None,
            dlq_subject: self.subject(dlq),
        }
    }

    /// Parse a subject of this namespace back to its kind.
    pub fn parse(&self, subject: &str) -> Option<Subject> {
        let rest = subject.strip_prefix(self.ns.as_str())?.strip_prefix('.')?;
        match rest {
            "submitted" => Some(Subject::Submitted),
            "ingested" => Some(Subject::Ingested),
            "enriched" => Some(Subject::Enriched),
            "published" => Some(Subject::Published),
            _ => rest.strip_prefix("dlq.")?.parse().ok().map(Subject::DeadLetter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &str) -> Names {
        Names::new(ns.parse().expect("valid namespace"))
    }

    #[test]
    fn every_subject_round_trips_through_build_and_parse() {
        let n = names("t-1_x");
        let all = [
            Subject::Submitted,
            Subject::Ingested,
            Subject::Enriched,
            Subject::Published,
            Subject::DeadLetter(Stage::Ingest),
            Subject::DeadLetter(Stage::Enrich),
            Subject::DeadLetter(Stage::Publish),
        ];
        for s in all {
            assert_eq!(n.parse(&n.subject(s)), Some(s), "{s:?}");
        }
        assert_eq!(n.parse("other.submitted"), None);
        assert_eq!(n.parse("t-1_x.dlq.nowhere"), None);
        assert_eq!(n.parse("t-1_xsubmitted"), None);
    }

    #[test]
    fn default_names_match_the_design() {
        let n = names("halakha");
        assert_eq!(n.subject(Subject::DeadLetter(Stage::Enrich)), "halakha.dlq.enrich");
        let r = n.route(Stage::Enrich);
        assert_eq!(r.input_subject, "halakha.ingested");
        assert_eq!(r.input_stream, "HALAKHA_INGESTED");
        assert_eq!(r.output_subject.as_deref(), Some("halakha.enriched"));
        let status = n.status_route();
        assert_eq!((status.input_stream.as_str(), status.input_subject.as_str()), ("HALAKHA_DLQ", "halakha.dlq.>"));
        assert_eq!(r.consumer, "enrich");
        assert_eq!(n.stream(Subject::DeadLetter(Stage::Publish)), "HALAKHA_DLQ");
    }

    #[test]
    fn namespaces_outside_the_rule_are_refused() {
        for bad in ["", "Halakha", "a.b", "a b", "a>", "*"] {
            assert!(bad.parse::<Namespace>().is_err(), "{bad:?}");
        }
    }
}
