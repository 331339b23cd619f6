//! The ingest stage's view of the `halakhot` table.

use deadpool_postgres::Pool;
use halakha_common::db::DbError;
use halakha_common::envelope::Ingested;
use serde::Serialize;
use tokio_postgres::types::Type;

// Every statement here is unnamed (`query_typed`): it works through a
// transaction-mode pooler (Supabase port 6543, PgBouncer), which cannot
// keep named prepared statements between transactions.

/// Result of recording a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First time this id is seen.
    New,
    /// Known, still `accepted`: it may not have reached the broker yet, so
    /// it is published again (the sinks are idempotent).
    Pending,
    /// Known and past ingest: nothing to publish.
    Done { status: String },
}

/// Record the submission as `accepted` unless the id is already known.
pub async fn claim(pool: &Pool, m: &Ingested) -> Result<Claim, DbError> {
    let conn = pool.get().await?;
    let h = &m.halakha;
    let lang = h.lang.map(|l| l.as_str());
    let inserted = conn
        .query_typed_opt(
            "INSERT INTO halakhot (id, status, content, source, lang, schedule_days, received_at, date_post, image_url)
             VALUES ($1, 'accepted', $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO NOTHING
             RETURNING id",
            &[
                (&m.id, Type::TEXT),
                (&h.content, Type::TEXT),
                (&h.source, Type::TEXT),
                (&lang, Type::TEXT),
                (&i32::from(h.schedule_days), Type::INT4),
                (&h.received_at, Type::TIMESTAMPTZ),
                (&h.date_post(), Type::DATE),
                (&h.image_url, Type::TEXT),
            ],
        )
        .await?;
    if inserted.is_some() {
        return Ok(Claim::New);
    }
    let row = conn.query_typed_opt("SELECT status FROM halakhot WHERE id = $1", &[(&m.id, Type::TEXT)]).await?;
    let status: String = row.map(|r| r.get(0)).unwrap_or_else(|| "accepted".into());
    Ok(if status == "accepted" { Claim::Pending } else { Claim::Done { status } })
}

/// Mark a dead-lettered halakha `failed` with the reason, unless it was
/// published or changed after the failure (a redrive that already
/// succeeded must not be overwritten by a late status update).
pub async fn mark_failed(pool: &Pool, id: &str, error: &str, failed_at: time::OffsetDateTime) -> Result<u64, DbError> {
    let conn = pool.get().await?;
    Ok(conn
        .execute_typed(
            "UPDATE halakhot SET status = 'failed', error = $2, updated_at = now()
             WHERE id = $1 AND status <> 'published' AND updated_at <= $3",
            &[(&id, Type::TEXT), (&error, Type::TEXT), (&failed_at, Type::TIMESTAMPTZ)],
        )
        .await?)
}

/// What `GET /v1/halakhot/{id}` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StatusView {
    pub id: String,
    /// `accepted`, `enriched`, `published` or `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notion_page_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub async fn status(pool: &Pool, id: &str) -> Result<Option<StatusView>, DbError> {
    let conn = pool.get().await?;
    let row = conn
        .query_typed_opt(
            "SELECT id, status, title, notion_page_url, error FROM halakhot WHERE id = $1",
            &[(&id, Type::TEXT)],
        )
        .await?;
    Ok(row.map(|r| StatusView {
        id: r.get(0),
        status: r.get(1),
        title: r.get(2),
        notion_page_url: r.get(3),
        error: r.get(4),
    }))
}
