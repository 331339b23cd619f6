//! Operator actions on the pipeline's streams: replay a stage's input and
//! put dead letters back where they failed. The `halakha` CLI calls these;
//! tests call them directly against a real server.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use base64::Engine as _;
use bytes::Bytes;
use halakha_common::envelope::DeadLetter;
use serde::Serialize;

use crate::names::{Names, Stage, Subject};
use crate::publisher::{PublishError, Publisher};

/// Why an operator action failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("could not open stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("could not read stream {stream}")]
    Info {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("{0}")]
    Purge(String),
    #[error("could not remove dead letter {seq}")]
    Delete {
        seq: u64,
        #[source]
        source: jetstream::stream::DeleteMessageError,
    },
}

/// What an action did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub found: u64,
    pub sent: u64,
    pub skipped: u64,
}

async fn stream(js: &jetstream::Context, name: String) -> Result<Stream, OpsError> {
    js.get_stream(&name).await.map_err(|source| OpsError::Stream { stream: name, source })
}

/// Headers for a re-sent message: the original ones but its `Nats-Msg-Id`
/// (the publisher sets a fresh one, so the de-duplication window does not
/// drop it; the halakha id in the payload stays the same).
fn fresh_headers(original: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in original.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case("Nats-Msg-Id") {
            continue;
        }
        for v in values {
            headers.append(name, v.as_str());
        }
    }
    headers
}

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Whose input stream.
    pub stage: Stage,
    /// First stream sequence.
    pub from: u64,
    /// Last stream sequence (default: the last stored).
    pub to: Option<u64>,
    /// Only messages stored at or after this time.
    pub since: Option<time::OffsetDateTime>,
    /// Only messages stored before this time.
    pub until: Option<time::OffsetDateTime>,
    /// Only these halakha ids (empty: every id).
    pub ids: Vec<String>,
    /// Count only; send nothing.
    pub dry_run: bool,
    /// Time between two sends (a rate limit).
    pub pace: Option<Duration>,
}

/// The halakha id of a stored message: its `id` field, or for a raw
/// submission the id ingest derives from it.
fn id_of(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
        return Some(id.to_owned());
    }
    let s: halakha_common::Submission = serde_json::from_value(v).ok()?;
    Some(halakha_common::Envelope::id(&s))
}

/// Re-publish the stored messages `from..=to` of a stage's input stream
/// back to it; `progress` is told each sequence handled.
pub async fn replay(
    js: &jetstream::Context,
    names: &Names,
    spec: &Replay,
    mut progress: impl FnMut(u64),
) -> Result<Report, OpsError> {
    let Replay { stage, from, to, since, until, ids, dry_run, pace } = spec.clone();
    let route = names.route(stage);
    let mut s = stream(js, route.input_stream.clone()).await?;
    let last = s
        .info()
        .await
        .map_err(|e| OpsError::Info { stream: route.input_stream.clone(), source: e.into() })?
        .state
        .last_sequence;
    let to = to.unwrap_or(last).min(last);
    let publisher = Publisher::new(js.clone());
    let tag = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let mut report = Report::default();
    let first = s.cached_info().state.first_sequence;
    for seq in from.max(first).max(1)..=to {
        match s.get_raw_message(seq).await {
            Ok(m) => {
                let stored = m.time;
                let in_time = since.is_none_or(|t| stored >= t) && until.is_none_or(|t| stored < t);
                let wanted = ids.is_empty() || id_of(&m.payload).is_some_and(|id| ids.contains(&id));
                if !(in_time && wanted) {
                    progress(seq);
                    continue;
                }
                report.found += 1;
                if !dry_run {
                    let msg_id = format!("replay:{tag}:{}:{seq}", route.input_stream);
                    publisher
                        .publish(&route.input_subject, &msg_id, m.payload, Some(fresh_headers(&m.headers)))
                        .await?;
                    report.sent += 1;
                    if let Some(p) = pace {
                        tokio::time::sleep(p).await;
                    }
                }
            }
            Err(_) => report.skipped += 1, // deleted or aged out
        }
        progress(seq);
    }
    Ok(report)
}

/// One stored dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub entry: DeadLetter,
}

/// Which dead letters.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub stage: Option<Stage>,
    /// Failed at or after this time.
    pub since: Option<time::OffsetDateTime>,
    /// The reason contains this text (case-insensitive).
    pub reason: Option<String>,
}

/// The dead letters matching `filter`, oldest first.
pub async fn dlq_find(js: &jetstream::Context, names: &Names, filter: &DlqFilter) -> Result<Vec<Entry>, OpsError> {
    let needle = filter.reason.as_deref().map(str::to_lowercase);
    Ok(dlq_list(js, names, filter.stage)
        .await?
        .into_iter()
        .filter(|e| filter.since.is_none_or(|t| e.entry.failed_at >= t))
        .filter(|e| needle.as_deref().is_none_or(|n| e.entry.reason.to_lowercase().contains(n)))
        .collect())
}

/// The dead letters, oldest first, optionally of one stage.
pub async fn dlq_list(js: &jetstream::Context, names: &Names, stage: Option<Stage>) -> Result<Vec<Entry>, OpsError> {
    let name = names.stream(Subject::DeadLetter(Stage::Ingest));
    let mut s = stream(js, name.clone()).await?;
    let state = s.info().await.map_err(|e| OpsError::Info { stream: name, source: e.into() })?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = s.get_raw_message(seq).await else { continue };
        let Ok(entry) = serde_json::from_slice::<DeadLetter>(&m.payload) else { continue };
        if stage.is_none_or(|st| entry.stage == st.as_str()) {
            out.push(Entry { seq, entry });
        }
    }
    Ok(out)
}

/// Put dead letters back where they failed (their original subject), with
/// their original payload and headers and a fresh `Nats-Msg-Id`; each entry
/// is removed only after its re-publication was acknowledged.
pub async fn dlq_redrive(
    js: &jetstream::Context,
    names: &Names,
    seqs: &[u64],
    dry_run: bool,
    pace: Option<Duration>,
    mut progress: impl FnMut(u64),
) -> Result<Report, OpsError> {
    let name = names.stream(Subject::DeadLetter(Stage::Ingest));
    let dlq = stream(js, name).await?;
    let publisher = Publisher::new(js.clone());
    let mut report = Report::default();
    for &seq in seqs {
        let Ok(m) = dlq.get_raw_message(seq).await else {
            report.skipped += 1;
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<DeadLetter>(&m.payload) else {
            report.skipped += 1;
            continue;
        };
        report.found += 1;
        // The whole original: from the entry, or from its stream when the
        // entry kept only its start.
        let payload: Option<Bytes> = if entry.payload_truncated_from.is_some() {
            match stream(js, entry.stream.clone()).await?.get_raw_message(entry.stream_seq).await {
                Ok(original) => Some(original.payload),
                Err(_) => None,
            }
        } else if let Some(text) = &entry.payload {
            Some(Bytes::from(text.clone()))
        } else {
            entry
                .payload_base64
                .as_deref()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .map(Bytes::from)
        };
        let Some(payload) = payload.filter(|_| !entry.subject.is_empty()) else {
            report.skipped += 1;
            continue;
        };
        if dry_run {
            continue;
        }
        let mut original = HeaderMap::new();
        for (k, vs) in &entry.headers {
            for v in vs {
                original.append(k.as_str(), v.as_str());
            }
        }
        let msg_id = format!("redrive:{}:{}:{seq}", entry.stream, entry.stream_seq);
        publisher.publish(&entry.subject, &msg_id, payload, Some(fresh_headers(&original))).await?;
        dlq.delete_message(seq).await.map_err(|source| OpsError::Delete { seq, source })?;
        report.sent += 1;
        progress(seq);
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    Ok(report)
}

/// One stage's consumer, as the server reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StageStatus {
    pub stage: String,
    pub stream: String,
    pub consumer: String,
    /// False when the consumer does not exist (the stage never ran).
    pub present: bool,
    /// Stored, not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once, not yet acknowledged.
    pub redelivered: u64,
    /// Pull requests waiting.
    pub waiting: u64,
    /// Last delivery (RFC 3339), if any.
    pub last_active: Option<String>,
    /// Entries on `<ns>.dlq.<stage>`.
    pub dead_letters: u64,
    /// Messages delivered by this consumer so far (for throughput).
    pub delivered: u64,
}

/// The pipeline, stage by stage.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub namespace: String,
    pub stages: Vec<StageStatus>,
}

/// The consumers of the stages and their dead-letter depth.
pub async fn status(js: &jetstream::Context, names: &Names) -> Result<Status, OpsError> {
    use futures::TryStreamExt;
    let dlq_name = names.stream(Subject::DeadLetter(Stage::Ingest));
    let dlq = stream(js, dlq_name.clone()).await?;
    let mut depth = std::collections::HashMap::new();
    if let Ok(mut subjects) = dlq.info_with_subjects(names.dlq_wildcard()).await {
        while let Ok(Some((subject, count))) = subjects.try_next().await {
            depth.insert(subject, count as u64);
        }
    }
    let mut stages = Vec::new();
    for stage in Stage::ALL {
        let route = names.route(stage);
        let s = stream(js, route.input_stream.clone()).await?;
        let dead_letters = depth.get(&route.dlq_subject).copied().unwrap_or(0);
        let info = match s.consumer_info(&route.consumer).await {
            Ok(info) => info,
            Err(e) if matches!(e.kind(), jetstream::context::ConsumerInfoErrorKind::NotFound) => {
                stages.push(StageStatus {
                    stage: stage.as_str().to_owned(),
                    stream: route.input_stream.clone(),
                    consumer: route.consumer.clone(),
                    present: false,
                    pending: 0,
                    ack_pending: 0,
                    redelivered: 0,
                    waiting: 0,
                    last_active: None,
                    dead_letters,
                    delivered: 0,
                });
                continue;
            }
            Err(e) => return Err(OpsError::Info { stream: route.input_stream.clone(), source: e.into() }),
        };
        stages.push(StageStatus {
            stage: stage.as_str().to_owned(),
            stream: route.input_stream.clone(),
            consumer: route.consumer.clone(),
            present: true,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
            waiting: info.num_waiting as u64,
            last_active: info
                .delivered
                .last_active
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
            dead_letters,
            delivered: info.delivered.consumer_sequence,
        });
    }
    Ok(Status { namespace: names.namespace().to_string(), stages })
}

/// The pipeline's books: halakhot neither published nor failed, minus the
/// messages waiting at enrich and publish. 0 when idle; above 0 for long,
/// something was lost. Needs a stage's consumer to exist to count it.
pub async fn unaccounted(pool: &deadpool_postgres::Pool, status: &Status) -> Result<i64, halakha_common::db::DbError> {
    let open = halakha_common::db::open_halakhot(pool).await?;
    let waiting: u64 = status.stages.iter().filter(|s| s.stage != "ingest").map(|s| s.pending + s.ack_pending).sum();
    Ok(open - i64::try_from(waiting).unwrap_or(i64::MAX))
}

/// What the server has for the namespace: each stream and its consumers.
pub async fn topology_show(js: &jetstream::Context, names: &Names) -> Result<Vec<String>, OpsError> {
    use futures::TryStreamExt;
    let mut lines = Vec::new();
    let mut all = names.streams();
    all.push(format!("KV_{}", names.attempts_bucket()));
    for name in all {
        match js.get_stream(&name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| OpsError::Info { stream: name.clone(), source: e.into() })?;
                lines.push(format!(
                    "{name}  subjects {:?}  messages {}  bytes {}  max_age {}s",
                    info.config.subjects,
                    info.state.messages,
                    info.state.bytes,
                    info.config.max_age.as_secs()
                ));
                let mut consumers = s.consumers();
                while let Ok(Some(c)) = consumers.try_next().await {
                    lines.push(format!(
                        "  consumer {}  pending {}  unacked {}  max_deliver {}  ack_wait {}s",
                        c.name,
                        c.num_pending,
                        c.num_ack_pending,
                        c.config.max_deliver,
                        c.config.ack_wait.as_secs()
                    ));
                }
            }
            Err(_) => lines.push(format!("{name}  missing")),
        }
    }
    Ok(lines)
}

/// Remove dead letters (of one stage, or all). Returns how many.
pub async fn dlq_purge(js: &jetstream::Context, names: &Names, stage: Option<Stage>) -> Result<u64, OpsError> {
    let dlq = stream(js, names.stream(Subject::DeadLetter(Stage::Ingest))).await?;
    let filter = match stage {
        Some(s) => names.subject(Subject::DeadLetter(s)),
        None => names.dlq_wildcard(),
    };
    let purged = dlq.purge().filter(filter).await.map_err(|e| OpsError::Purge(e.to_string()))?;
    Ok(purged.purged)
}

/// One difference between the topology files and the server.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    pub object: String,
    pub field: String,
    pub file: String,
    pub server: String,
}

/// Compare the stream and consumer definitions with what the server has.
pub async fn topology_diff(js: &jetstream::Context, names: &Names) -> Result<Vec<Difference>, OpsError> {
    let mut out = Vec::new();
    let mut push = |object: &str, field: &str, file: String, server: String| {
        if file != server {
            out.push(Difference { object: object.to_owned(), field: field.to_owned(), file, server });
        }
    };
    for want in crate::topology::streams(names).map_err(|e| OpsError::Purge(e.to_string()))? {
        match js.get_stream(&want.name).await {
            Ok(mut s) => {
                let have = s
                    .info()
                    .await
                    .map_err(|e| OpsError::Info { stream: want.name.clone(), source: e.into() })?
                    .config
                    .clone();
                push(&want.name, "subjects", format!("{:?}", want.subjects), format!("{:?}", have.subjects));
                push(&want.name, "max_age", format!("{:?}", want.max_age), format!("{:?}", have.max_age));
                push(&want.name, "num_replicas", want.num_replicas.to_string(), have.num_replicas.to_string());
                push(&want.name, "storage", format!("{:?}", want.storage), format!("{:?}", have.storage));
                push(
                    &want.name,
                    "duplicate_window",
                    format!("{:?}", want.duplicate_window),
                    format!("{:?}", have.duplicate_window),
                );
                push(&want.name, "storage", format!("{:?}", want.storage), format!("{:?}", have.storage));
                push(&want.name, "retention", format!("{:?}", want.retention), format!("{:?}", have.retention));
            }
            Err(_) => push(&want.name, "stream", "present".into(), "missing".into()),
        }
    }
    for route in Stage::ALL.iter().map(|s| names.route(*s)).chain([names.status_route(), names.advisory_route()]) {
        let want = crate::topology::consumer(names, &route, &Default::default())
            .map_err(|e| OpsError::Purge(e.to_string()))?;
        let object = format!("{}/{}", route.input_stream, route.consumer);
        match js.get_stream(&route.input_stream).await {
            Ok(s) => match s.consumer_info(&route.consumer).await {
                Ok(info) => {
                    push(&object, "filter_subject", want.filter_subject.clone(), info.config.filter_subject.clone());
                    push(
                        &object,
                        "ack_policy",
                        format!("{:?}", want.ack_policy),
                        format!("{:?}", info.config.ack_policy),
                    );
                }
                Err(_) => push(&object, "consumer", "present".into(), "missing".into()),
            },
            Err(_) => push(&object, "consumer", "present".into(), "missing".into()),
        }
    }
    Ok(out)
}
