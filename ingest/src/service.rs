//! Accepting a submission, whichever way it came in: one validation, one
//! id derivation, one durable claim.

use deadpool_postgres::Pool;
use halakha_common::StageError;
use halakha_common::db::DbError;
use halakha_common::envelope::{DeadLetter, Envelope, Ingested, Submission};
use halakha_common::metrics as m;
use halakha_common::trace::TraceContext;
use halakha_nats::runner::{Delivery, Handled, Handler};
use halakha_nats::{PublishError, Publisher};
use time::OffsetDateTime;

use crate::store::{self, Claim};
use crate::validate::{self, Invalid};

/// How a submission reached us (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum Via {
    Http,
    Nats,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::Nats => "nats",
        }
    }
}

/// What to do after a submission was recorded.
#[derive(Debug)]
pub enum Decision {
    /// Publish `<ns>.ingested` (`duplicate`: the id was known but may not
    /// have reached the broker, so it is published again under the same
    /// `Nats-Msg-Id`).
    Publish { message: Ingested, duplicate: bool },
    /// Already past ingest: publish nothing.
    Duplicate { id: String, status: String },
}

/// Validation, id derivation and the durable record, shared by every path.
pub struct Ingestor {
    pub pool: Pool,
    /// The claims, written in batches.
    pub claims: store::Claims,
    pub publisher: Publisher,
    pub ingested_subject: String,
    pub max_content_chars: usize,
}

impl Ingestor {
    /// Validate and normalise (no side effect).
    pub fn prepare(&self, submission: Submission, extra_days: u16) -> Result<Ingested, Invalid> {
        validate::validate(submission, self.max_content_chars, extra_days, OffsetDateTime::now_utc())
    }

    /// Claim the id in Postgres: the durable half of idempotency.
    pub async fn record(&self, message: Ingested, via: Via) -> Result<Decision, DbError> {
        let (message, claim) = self.claims.write(message).await?;
        let decision = match claim {
            Claim::New => Decision::Publish { message, duplicate: false },
            Claim::Pending => Decision::Publish { message, duplicate: true },
            Claim::Done { status } => Decision::Duplicate { id: message.id, status },
        };
        let duplicate = !matches!(decision, Decision::Publish { duplicate: false, .. });
        metrics::counter!(m::INGEST_ACCEPTED_TOTAL, "via" => via.as_str(), "duplicate" => if duplicate { "true" } else { "false" })
            .increment(1);
        Ok(decision)
    }

    /// Publish `<ns>.ingested` under the halakha id (the broker's half of
    /// idempotency). True when the broker had it already.
    pub async fn publish(&self, message: &Ingested, trace: &TraceContext) -> Result<bool, PublishError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(halakha_common::envelope::TRACE_HEADER, trace.header().as_str());
        Ok(self.publisher.publish_json_with(&self.ingested_subject, &message.id, message, headers).await?.duplicate)
    }

    /// Validate, record and publish: the whole acceptance of one HTTP item.
    pub async fn accept(
        &self,
        submission: Submission,
        extra_days: u16,
        trace: &TraceContext,
    ) -> Result<Accepted, AcceptFailure> {
        let message = self.prepare(submission, extra_days)?;
        self.submit(message, trace).await
    }

    /// Record and publish a prepared message (the HTTP routes; the NATS
    /// path leaves the publishing to the runner).
    pub async fn submit(&self, message: Ingested, trace: &TraceContext) -> Result<Accepted, AcceptFailure> {
        match self.record(message, Via::Http).await {
            Ok(Decision::Publish { message, duplicate }) => match self.publish(&message, trace).await {
                Ok(again) => Ok(Accepted { id: message.id, duplicate: duplicate || again, settled: None }),
                Err(error) => {
                    tracing::error!(id = %message.id, %error, "Could not publish an accepted submission");
                    Err(AcceptFailure::Unavailable)
                }
            },
            Ok(Decision::Duplicate { id, status }) => Ok(Accepted { id, duplicate: true, settled: Some(status) }),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "Could not record a submission");
                Err(AcceptFailure::Unavailable)
            }
        }
    }
}

/// An accepted submission.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: String,
    pub duplicate: bool,
    /// Known and past ingest (nothing was sent again): its status.
    pub settled: Option<String>,
}

/// Why one HTTP submission was not accepted.
#[derive(Debug)]
pub enum AcceptFailure {
    Invalid(Invalid),
    Unavailable,
}

impl From<Invalid> for AcceptFailure {
    fn from(e: Invalid) -> Self {
        AcceptFailure::Invalid(e)
    }
}

/// The `<ns>.submitted` path: the runner publishes what this returns.
pub struct SubmittedHandler {
    pub ingestor: std::sync::Arc<Ingestor>,
}

impl Handler for SubmittedHandler {
    type Input = Submission;
    type Output = Ingested;

    async fn handle(&self, input: Submission, _delivery: &Delivery) -> Result<Handled<Ingested>, StageError> {
        let message =
            self.ingestor.prepare(input, 0).map_err(|e| StageError::permanent(format!("invalid submission: {e}")))?;
        match self.ingestor.record(message, Via::Nats).await {
            Ok(Decision::Publish { message, .. }) => Ok(Handled::Publish(message)),
            Ok(Decision::Duplicate { id, status }) => {
                tracing::info!(%id, %status, "Duplicate submission; already past ingest");
                Ok(Handled::Duplicate)
            }
            Err(e) => Err(e.into_stage_error("record the submission")),
        }
    }

    /// Both paths publish `<ns>.ingested` under the halakha id, so the
    /// broker drops a second submission of one text within its window.
    fn output_message_id(&self, output: &Ingested, _delivery: &Delivery) -> String {
        output.id()
    }
}

/// Marks dead-lettered halakhot `failed`, so `GET /v1/halakhot/{id}` can say
/// why an item will not be published.
pub struct StatusHandler {
    pub pool: Pool,
}

impl Handler for StatusHandler {
    type Input = DeadLetter;
    type Output = DeadLetter;

    async fn handle(&self, entry: DeadLetter, _delivery: &Delivery) -> Result<Handled<DeadLetter>, StageError> {
        let Some(id) = entry.id.as_deref() else { return Ok(Handled::Done) };
        let error = format!("{}: {}", entry.stage, entry.reason);
        let changed = store::mark_failed(&self.pool, id, &error, entry.failed_at)
            .await
            .map_err(|e| e.into_stage_error("record the failure"))?;
        if changed > 0 {
            tracing::info!(%id, stage = %entry.stage, "Marked failed");
        }
        Ok(Handled::Done)
    }
}
