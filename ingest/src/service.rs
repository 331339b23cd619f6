//! Accepting a submission, whichever way it came in.

use deadpool_postgres::Pool;
use halakha_common::StageError;
use halakha_common::envelope::{DeadLetter, Envelope, Ingested, Submission};
use halakha_common::metrics as m;
use halakha_nats::runner::{Delivery, Handler};
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
    /// Publish `<ns>.ingested`.
    Publish { message: Ingested, duplicate: bool },
    /// Already past ingest: publish nothing.
    Duplicate { id: String },
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("the database is unavailable")]
    Database(#[from] halakha_common::db::DbError),
}

/// Validation, id derivation and the durable record, shared by both paths.
#[derive(Clone)]
pub struct Ingestor {
    pub pool: Pool,
    pub max_content_chars: usize,
}

impl Ingestor {
    pub async fn accept(&self, submission: Submission, via: Via) -> Result<Decision, AcceptError> {
        let message = validate::validate(submission, self.max_content_chars, OffsetDateTime::now_utc())?;
        let claim = store::claim(&self.pool, &message).await?;
        let decision = match claim {
            Claim::New => Decision::Publish { message, duplicate: false },
            Claim::Pending => Decision::Publish { message, duplicate: true },
            Claim::Done { .. } => Decision::Duplicate { id: message.id },
        };
        let duplicate = !matches!(decision, Decision::Publish { duplicate: false, .. });
        metrics::counter!(m::INGEST_ACCEPTED_TOTAL, "via" => via.as_str(), "duplicate" => if duplicate { "true" } else { "false" }).increment(1);
        Ok(decision)
    }
}

/// The `<ns>.submitted` path: the runner publishes what this returns.
pub struct SubmittedHandler {
    pub ingestor: Ingestor,
}

impl Handler for SubmittedHandler {
    type Input = Submission;
    type Output = Ingested;

    async fn handle(&self, input: Submission, _delivery: &Delivery) -> Result<Option<Ingested>, StageError> {
        match self.ingestor.accept(input, Via::Nats).await {
            Ok(Decision::Publish { message, .. }) => Ok(Some(message)),
            Ok(Decision::Duplicate { id }) => {
                tracing::info!(%id, "Duplicate submission; already processed");
                Ok(None)
            }
            Err(AcceptError::Invalid(e)) => Err(StageError::permanent(format!("invalid submission: {e}"))),
            Err(e @ AcceptError::Database(_)) => {
                Err(StageError::transient("could not record the submission").with_source(e))
            }
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

    async fn handle(&self, entry: DeadLetter, _delivery: &Delivery) -> Result<Option<DeadLetter>, StageError> {
        let Some(id) = entry.id.as_deref() else { return Ok(None) };
        let error = format!("{}: {}", entry.stage, entry.reason);
        let changed = store::mark_failed(&self.pool, id, &error, entry.failed_at)
            .await
            .map_err(|e| StageError::transient("could not record the failure").with_source(e))?;
        if changed > 0 {
            tracing::info!(%id, stage = %entry.stage, "Marked failed");
        }
        Ok(None)
    }
}
