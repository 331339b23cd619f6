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
        source: jetstream::context::RequestError,
    },
    #[error(transparent)]
    Publish(#[from] PublishError),
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
#[derive(Debug, Clone)]
pub struct Replay {
    /// Whose input stream.
    pub stage: Stage,
    /// First stream sequence.
    pub from: u64,
    /// Last stream sequence (default: the last stored).
    pub to: Option<u64>,
    /// Count only; send nothing.
    pub dry_run: bool,
    /// Time between two sends (a rate limit).
    pub pace: Option<Duration>,
}

/// Re-publish the stored messages `from..=to` of a stage's input stream
/// back to it; `progress` is told each sequence handled.
pub async fn replay(
    js: &jetstream::Context,
    names: &Names,
    spec: &Replay,
    mut progress: impl FnMut(u64),
) -> Result<Report, OpsError> {
    let Replay { stage, from, to, dry_run, pace } = spec.clone();
    let route = names.route(stage);
    let mut s = stream(js, route.input_stream.clone()).await?;
    let last = s
        .info()
        .await
        .map_err(|e| OpsError::Info { stream: route.input_stream.clone(), source: e })?
        .state
        .last_sequence;
    let to = to.unwrap_or(last).min(last);
    let publisher = Publisher::new(js.clone());
    let tag = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let mut report = Report::default();
    for seq in from.max(1)..=to {
        match s.get_raw_message(seq).await {
            Ok(m) => {
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

/// The dead letters, oldest first, optionally of one stage.
pub async fn dlq_list(js: &jetstream::Context, names: &Names, stage: Option<Stage>) -> Result<Vec<Entry>, OpsError> {
    let name = names.stream(Subject::DeadLetter(Stage::Ingest));
    let mut s = stream(js, name.clone()).await?;
    let state = s.info().await.map_err(|e| OpsError::Info { stream: name, source: e })?.state.clone();
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
    }
    Ok(report)
}
