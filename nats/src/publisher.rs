//! Publishing to JetStream: every publish carries a `Nats-Msg-Id` and waits
//! for its PubAck, so a message is either stored or reported as failed.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use bytes::Bytes;
use serde::Serialize;

/// Why a message was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("could not serialise the message")]
    Serialize(#[from] serde_json::Error),
    #[error("JetStream did not store the message on {subject}")]
    NotStored {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
}

impl PublishError {
    /// True when the broker could not store the message now (no stream
    /// leader answering during an election or a restart, no PubAck in
    /// time, the connection lost): trying the same message again later is
    /// right. False when the message itself cannot be stored (it does not
    /// serialise, or it is larger than the server's `max_payload`).
    pub fn is_broker_unavailable(&self) -> bool {
        use jetstream::context::PublishErrorKind as K;
        match self {
            PublishError::Serialize(_) => false,
            PublishError::NotStored { source, .. } => {
                !matches!(source.kind(), K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence)
            }
        }
    }
}

/// A JetStream publisher that always de-duplicates and awaits the PubAck.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
}

impl Publisher {
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publish raw bytes with `Nats-Msg-Id: msg_id` and extra headers.
    pub async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
        headers: Option<HeaderMap>,
    ) -> Result<PublishAck, PublishError> {
        let not_stored = |source| PublishError::NotStored { subject: subject.to_owned(), source };
        let mut msg = jetstream::message::PublishMessage::build().payload(payload);
        if let Some(h) = headers {
            msg = msg.headers(h);
        }
        let msg = msg.message_id(msg_id);
        let ack: PublishAckFuture = self.js.send_publish(subject.to_owned(), msg).await.map_err(not_stored)?;
        ack.await.map_err(not_stored)
    }

    /// Publish a value as JSON.
    pub async fn publish_json<T: Serialize>(
        &self,
        subject: &str,
        msg_id: &str,
        value: &T,
    ) -> Result<PublishAck, PublishError> {
        let payload = Bytes::from(serde_json::to_vec(value)?);
        self.publish(subject, msg_id, payload, None).await
    }

    /// Publish a value as JSON with extra headers (a trace id).
    pub async fn publish_json_with<T: Serialize>(
        &self,
        subject: &str,
        msg_id: &str,
        value: &T,
        headers: HeaderMap,
    ) -> Result<PublishAck, PublishError> {
        let payload = Bytes::from(serde_json::to_vec(value)?);
        self.publish(subject, msg_id, payload, Some(headers)).await
    }
}
