//! Publishing to JetStream: every publish carries a `Nats-Msg-Id` and waits
//! for its PubAck, so a message is either stored or reported as failed.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

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
///
/// Made inside a Tokio runtime, its sends (publishes and acks) go through
/// one outbox task per publisher, which waits until the runtime has run
/// every other ready task and then hands all the sends queued meanwhile to
/// the connection at once: the messages that many handlers finish at
/// about the same moment reach the broker in one write, not one write
/// each. The broker's CPU per message is mostly its reads, so this is most
/// of what batching publishes can give without holding a message back
/// (docs/PERFORMANCE.md). A single send waits for no other.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    outbox: Option<mpsc::UnboundedSender<Outgoing>>,
}

/// One send waiting in the outbox.
enum Outgoing {
    Publish {
        subject: String,
        message: jetstream::message::PublishMessage,
        sent: oneshot::Sender<Result<PublishAckFuture, jetstream::context::PublishError>>,
    },
    /// A plain ack (`+ACK` has an empty body) to a delivery's reply subject.
    Ack { reply: async_nats::Subject, sent: oneshot::Sender<Result<(), async_nats::PublishError>> },
}

/// After this many sends one at a time, the outbox looks again whether
/// sends come together (a burst): see [`outbox`].
const PROBE_EVERY: u32 = 8;

/// The outbox: take everything queued, after every other ready task ran.
///
/// Waiting for the other ready tasks costs a pass of the runtime's driver
/// (a system call). At a low rate, where every send comes alone, it would
/// be paid for nothing, so the outbox waits only while the last wait
/// gathered more than one send, and once every [`PROBE_EVERY`] sends
/// otherwise, to notice a burst.
async fn outbox(js: jetstream::Context, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    let client = js.client();
    let mut batch = Vec::new();
    let (mut gathering, mut alone) = (true, 0u32);
    while queue.recv_many(&mut batch, usize::MAX).await > 0 {
        alone += 1;
        if gathering || batch.len() > 1 || alone >= PROBE_EVERY {
            // Deferred until the runtime has no other ready task: handlers
            // woken together queue their sends first.
            tokio::task::yield_now().await;
            while let Ok(more) = queue.try_recv() {
                batch.push(more);
            }
            gathering = batch.len() > 1;
            alone = 0;
        }
        for out in batch.drain(..) {
            match out {
                Outgoing::Publish { subject, message, sent } => {
                    let _ = sent.send(js.send_publish(subject, message).await);
                }
                Outgoing::Ack { reply, sent } => {
                    let _ = sent.send(client.publish(reply, Bytes::new()).await);
                }
            }
        }
    }
}

impl Publisher {
    pub fn new(js: jetstream::Context) -> Self {
        let outbox = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (queue, rx) = mpsc::unbounded_channel();
            runtime.spawn(outbox(js.clone(), rx));
            queue
        });
        Self { js, outbox }
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// Hand a message to the broker; the future answers its PubAck.
    async fn send(
        &self,
        subject: &str,
        message: jetstream::message::PublishMessage,
    ) -> Result<PublishAckFuture, jetstream::context::PublishError> {
        match &self.outbox {
            Some(queue) => through(queue, |sent| Outgoing::Publish { subject: subject.to_owned(), message, sent })
                .await
                .unwrap_or_else(|| Err(outbox_gone())),
            None => self.js.send_publish(subject.to_owned(), message).await,
        }
    }

    /// Acknowledge a delivery (a plain `+ACK`: no confirmation round trip),
    /// through the outbox like the publishes.
    pub async fn ack(&self, msg: &jetstream::Message) -> Result<(), async_nats::Error> {
        let (Some(queue), Some(reply)) = (&self.outbox, msg.reply.clone()) else { return msg.ack().await };
        match through(queue, |sent| Outgoing::Ack { reply, sent }).await {
            Some(result) => result.map_err(Into::into),
            None => Err(Box::new(outbox_gone())),
        }
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
        let ack: PublishAckFuture = self.send(subject, msg).await.map_err(not_stored)?;
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

/// Queue a send in the outbox and wait until it is handed to the
/// connection: its answer, or none when the outbox is gone.
async fn through<T>(
    queue: &mpsc::UnboundedSender<Outgoing>,
    send: impl FnOnce(oneshot::Sender<T>) -> Outgoing,
) -> Option<T> {
    let (sent, answer) = oneshot::channel();
    queue.send(send(sent)).ok()?;
    answer.await.ok()
}

/// The outbox task is gone (the runtime shutting down): the broker was
/// not reached, as when the connection is lost.
fn outbox_gone() -> jetstream::context::PublishError {
    jetstream::context::PublishError::new(jetstream::context::PublishErrorKind::BrokenPipe)
}
