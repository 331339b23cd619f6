//! Dead letters for messages the broker gave up on.
//!
//! When a worker crashes, hangs or times out on a message `max_deliver`
//! times, the runner never gets to dead-letter it: the broker just stops
//! redelivering and emits a max-deliveries advisory. The advisories of the
//! stage consumers are kept in `<NS>_ADVISORIES`; this loop (run by
//! `halakha-ingest`) turns each into a dead-letter entry on the stage's
//! `<ns>.dlq.<stage>`, with the original message fetched from its stream.

use async_nats::jetstream;
use halakha_common::StageError;
use halakha_common::envelope::{DeadLetter, Envelope, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::names::{Names, Subject};
use crate::publisher::Publisher;
use crate::runner::{Delivery, Handled, Handler, Origin, attempt_history, dead_letter_entry, dead_letter_id};

/// `io.nats.jetstream.advisory.v1.max_deliver`, as the server sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaxDeliveries {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub stream: String,
    pub consumer: String,
    pub stream_seq: u64,
    pub deliveries: u64,
}

impl Envelope for MaxDeliveries {
    const KIND: &'static str = "max-deliveries advisory";
    fn id(&self) -> String {
        format!("{}:{}", self.stream, self.stream_seq)
    }
    fn schema_version(&self) -> u32 {
        1
    }
}

pub struct AdvisoryHandler {
    pub js: jetstream::Context,
    pub names: Names,
    pub publisher: Publisher,
    /// Failed attempts recorded by the stages, for the history.
    pub attempts: Option<jetstream::kv::Store>,
}

impl Handler for AdvisoryHandler {
    type Input = MaxDeliveries;
    type Output = DeadLetter;

    async fn handle(&self, a: MaxDeliveries, _delivery: &Delivery) -> Result<Handled<DeadLetter>, StageError> {
        let Some(stage) = self.names.stage_of(&a.stream, &a.consumer) else {
            tracing::warn!(stream = %a.stream, consumer = %a.consumer, "Advisory for a consumer that is not a stage; ignored");
            return Ok(Handled::Done);
        };
        let reason = format!(
            "the broker stopped redelivering after {} deliveries without an acknowledgement \
             (the worker crashed, hung or ran past ack_wait each time)",
            a.deliveries
        );
        let stream = self
            .js
            .get_stream(&a.stream)
            .await
            .map_err(|e| StageError::transient("could not open the stream of the advisory").with_source(e))?;
        let entry = match stream.get_raw_message(a.stream_seq).await {
            Ok(m) => {
                let id = serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from));
                let origin = Origin {
                    subject: m.subject.as_str(),
                    stream: &a.stream,
                    stream_seq: a.stream_seq,
                    headers: Some(&m.headers),
                    payload: &m.payload,
                };
                dead_letter_entry(stage.as_str(), ErrorKind::MaxDeliveries, reason, a.deliveries, id, &origin)
            }
            Err(e) => {
                // Gone from the stream (age limit): the entry says so.
                let origin =
                    Origin { subject: "", stream: &a.stream, stream_seq: a.stream_seq, headers: None, payload: &[] };
                let reason = format!("{reason}; the original message is no longer in the stream: {e}");
                dead_letter_entry(stage.as_str(), ErrorKind::MaxDeliveries, reason, a.deliveries, None, &origin)
            }
        };
        let mut entry = entry;
        entry.history = attempt_history(self.attempts.as_ref(), &a.stream, a.stream_seq).await;
        let subject = self.names.subject(Subject::DeadLetter(stage));
        self.publisher
            .publish_json(&subject, &dead_letter_id(&a.stream, a.stream_seq), &entry)
            .await
            .map_err(|e| StageError::transient("could not publish the dead letter").with_source(e))?;
        metrics::counter!(halakha_common::metrics::DEAD_LETTERS_TOTAL, "stage" => stage.as_str(), "kind" => "max_deliveries")
            .increment(1);
        tracing::error!(stage = %stage, seq = a.stream_seq, deliveries = a.deliveries, "Broker gave up on a message; dead-lettered");
        Ok(Handled::Done)
    }
}
