//! Stream and consumer definitions, kept as JSON files under
//! `nats/topology/` in the server's own format (the `nats` CLI reads them
//! with `nats stream add --config` and `nats consumer add --config`).
//!
//! The files are written for the default namespace `halakha`; for another
//! namespace the stream names and subjects are rewritten field by field.
//! They are compiled into the binaries, so a deployment needs no files.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde_json::Value;

use crate::names::{ADVISORY_CONSUMER, DEFAULT_NAMESPACE, Names, Route, STATUS_CONSUMER};

const STREAM_FILES: [(&str, &str); 6] = [
    ("HALAKHA_SUBMITTED", include_str!("../topology/streams/HALAKHA_SUBMITTED.json")),
    ("HALAKHA_INGESTED", include_str!("../topology/streams/HALAKHA_INGESTED.json")),
    ("HALAKHA_ENRICHED", include_str!("../topology/streams/HALAKHA_ENRICHED.json")),
    ("HALAKHA_PUBLISHED", include_str!("../topology/streams/HALAKHA_PUBLISHED.json")),
    ("HALAKHA_DLQ", include_str!("../topology/streams/HALAKHA_DLQ.json")),
    ("HALAKHA_ADVISORIES", include_str!("../topology/streams/HALAKHA_ADVISORIES.json")),
];

const CONSUMER_FILES: [(&str, &str); 5] = [
    ("ingest", include_str!("../topology/consumers/HALAKHA_SUBMITTED.ingest.json")),
    ("enrich", include_str!("../topology/consumers/HALAKHA_INGESTED.enrich.json")),
    ("publish", include_str!("../topology/consumers/HALAKHA_ENRICHED.publish.json")),
    (STATUS_CONSUMER, include_str!("../topology/consumers/HALAKHA_DLQ.ingest-status.json")),
    (ADVISORY_CONSUMER, include_str!("../topology/consumers/HALAKHA_ADVISORIES.ingest-advisories.json")),
];

/// Why the topology could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("no consumer definition named {0}")]
    UnknownConsumer(String),
    #[error("topology file {file} is invalid")]
    Invalid {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not look up stream {stream}")]
    GetStream {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("could not create stream {stream}")]
    CreateStream {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("could not update stream {stream}")]
    UpdateStream {
        stream: String,
        #[source]
        source: jetstream::context::UpdateStreamError,
    },
    #[error("could not create or update consumer {consumer} on {stream}")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
}

/// Rewrite a subject of the default namespace into `names`' namespace
/// (`halakha.x` and the stream-name tokens of advisory subjects).
fn rewrite_subject(names: &Names, subject: &str) -> String {
    if subject.starts_with("$JS.") {
        return subject.split('.').map(|t| rewrite_stream(names, t)).collect::<Vec<_>>().join(".");
    }
    match subject.strip_prefix(DEFAULT_NAMESPACE).filter(|r| r.starts_with('.')) {
        Some(rest) => format!("{}{rest}", names.namespace()),
        None => subject.to_owned(),
    }
}

/// Rewrite a stream name of the default namespace (`HALAKHA_X`).
fn rewrite_stream(names: &Names, stream: &str) -> String {
    let prefix = DEFAULT_NAMESPACE.to_ascii_uppercase();
    match stream.strip_prefix(&prefix).filter(|r| r.starts_with('_')) {
        Some(rest) => format!("{}{rest}", names.namespace().as_str().to_ascii_uppercase()),
        None => stream.to_owned(),
    }
}

fn rewrite(names: &Names, mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        if let Some(Value::String(name)) = obj.get_mut("name") {
            *name = rewrite_stream(names, name);
        }
        for key in ["subjects", "filter_subjects"] {
            if let Some(Value::Array(items)) = obj.get_mut(key) {
                for item in items.iter_mut() {
                    if let Value::String(s) = item {
                        *s = rewrite_subject(names, s);
                    }
                }
            }
        }
        if let Some(Value::String(s)) = obj.get_mut("filter_subject") {
            *s = rewrite_subject(names, s);
        }
        if let Some(Value::String(s)) = obj.get_mut("description") {
            *s = rewrite_subject(names, s);
        }
    }
    v
}

fn parse<T: serde::de::DeserializeOwned>(names: &Names, file: &str, text: &str) -> Result<T, TopologyError> {
    let invalid = |source| TopologyError::Invalid { file: file.to_owned(), source };
    let value: Value = serde_json::from_str(text).map_err(invalid)?;
    serde_json::from_value(rewrite(names, value)).map_err(invalid)
}

/// The stream definitions for a namespace.
/// The files say `num_replicas: 1`; `STREAM_REPLICAS` (in `names`) sets it.
pub fn streams(names: &Names) -> Result<Vec<stream::Config>, TopologyError> {
    STREAM_FILES
        .iter()
        .map(|(file, text)| {
            let mut c: stream::Config = parse(names, file, text)?;
            c.num_replicas = names.stream_replicas();
            Ok(c)
        })
        .collect()
}

/// Settings an operator may override per stage without editing the files.
#[derive(Debug, Clone, Default)]
pub struct ConsumerOverrides {
    pub max_deliver: Option<i64>,
    pub ack_wait: Option<Duration>,
    pub max_ack_pending: Option<i64>,
}

/// The consumer definition of a route, with overrides applied.
pub fn consumer(names: &Names, route: &Route, o: &ConsumerOverrides) -> Result<consumer::pull::Config, TopologyError> {
    let (file, text) = CONSUMER_FILES
        .iter()
        .find(|(name, _)| *name == route.consumer)
        .ok_or_else(|| TopologyError::UnknownConsumer(route.consumer.clone()))?;
    let mut c: consumer::pull::Config = parse(names, file, text)?;
    if let Some(v) = o.max_deliver {
        c.max_deliver = v;
    }
    if let Some(v) = o.ack_wait {
        c.ack_wait = v;
    }
    if let Some(v) = o.max_ack_pending {
        c.max_ack_pending = v;
    }
    Ok(c)
}

/// Create every stream of the namespace, or update it to the definition.
/// Idempotent: running it twice changes nothing.
pub async fn apply_streams(js: &jetstream::Context, names: &Names) -> Result<(), TopologyError> {
    for config in streams(names)? {
        let name = config.name.clone();
        match js.get_stream(&name).await {
            Ok(_) => {
                js.update_stream(config)
                    .await
                    .map_err(|source| TopologyError::UpdateStream { stream: name.clone(), source })?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                js.create_stream(config)
                    .await
                    .map_err(|source| TopologyError::CreateStream { stream: name.clone(), source })?;
            }
            Err(source) => return Err(TopologyError::GetStream { stream: name, source }),
        }
        tracing::debug!(stream = %name, "Stream applied");
    }
    Ok(())
}

/// Create or update the durable consumer of a stage.
pub async fn apply_consumer(
    js: &jetstream::Context,
    route: &Route,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, TopologyError> {
    let err = |source| TopologyError::Consumer {
        stream: route.input_stream.clone(),
        consumer: route.consumer.clone(),
        source,
    };
    js.create_consumer_on_stream(config, &route.input_stream).await.map_err(err)
}

/// The bucket of failed attempts (created if missing; kept 7 days). Best
/// effort: without it, dead letters carry only their last attempt.
pub async fn attempts_bucket(js: &jetstream::Context, names: &Names) -> Option<jetstream::kv::Store> {
    let bucket = names.attempts_bucket();
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Some(store);
    }
    // The bucket's stream, made directly (the client's own bucket creation
    // reads account details that NATS 2.9 answers differently).
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("Failed deliveries of pipeline messages, by stream and sequence".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(7 * 24 * 3600),
        storage: stream::StorageType::File,
        num_replicas: names.stream_replicas(),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    match js.create_stream(config).await.map(|_| ()) {
        Ok(()) => js.get_key_value(&bucket).await.ok(),
        Err(error) => match js.get_key_value(&bucket).await {
            Ok(store) => Some(store),
            Err(_) => {
                tracing::warn!(%error, %bucket, "No attempts bucket: dead letters will carry only their last attempt");
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Stage;

    fn names(ns: &str) -> Names {
        Names::new(ns.parse().expect("valid"))
    }

    #[test]
    fn the_files_parse_into_server_configs_for_the_default_namespace() {
        let n = names("halakha");
        let s = streams(&n).expect("valid files");
        let got: Vec<_> = s.iter().map(|c| c.name.clone()).collect();
        assert_eq!(got, n.streams());
        assert_eq!(s[4].subjects, vec!["halakha.dlq.>"]);
        assert_eq!(s[0].duplicate_window, Duration::from_secs(120));
        let routes = Stage::ALL.iter().map(|s| n.route(*s)).chain([n.status_route(), n.advisory_route()]);
        for route in routes {
            let c = consumer(&n, &route, &ConsumerOverrides::default()).expect("valid");
            assert_eq!(c.durable_name.as_deref(), Some(route.consumer.as_str()));
            assert_eq!(c.filter_subject, route.input_subject);
            assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
        }
    }

    #[test]
    fn another_namespace_rewrites_names_and_subjects_only() {
        let n = names("t_42");
        let s = streams(&n).expect("valid");
        assert_eq!(s[1].name, "T_42_INGESTED");
        assert_eq!(s[1].subjects, vec!["t_42.ingested"]);
        assert_eq!(s[4].subjects, vec!["t_42.dlq.>"]);
        assert_eq!(s[5].name, "T_42_ADVISORIES");
        assert_eq!(s[5].subjects[1], "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.T_42_INGESTED.enrich");
        let o = ConsumerOverrides { max_deliver: Some(2), ..Default::default() };
        let c = consumer(&n, &n.route(Stage::Publish), &o).expect("valid");
        assert_eq!(c.filter_subject, "t_42.enriched");
        assert_eq!(c.max_deliver, 2);
    }
}
