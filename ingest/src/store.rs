//! The ingest stage's view of the `halakhot` table.

use deadpool_postgres::Pool;
use halakha_common::config::DatabaseConfig;
use halakha_common::db::{self, DbError, GroupCommit, Statements};
use halakha_common::envelope::Ingested;
use serde::Serialize;
use tokio_postgres::types::Type;

// The claim, run for every submission, is prepared once per connection
// unless the pool goes through a transaction-mode pooler (Supabase port
// 6543, PgBouncer), which cannot keep named statements between
// transactions ([`Statements`]). The other statements are always unnamed
// (`query_typed`).

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
pub async fn claim(pool: &Pool, how: Statements, m: &Ingested) -> Result<Claim, DbError> {
    let mut claims = claim_many(pool, how, std::slice::from_ref(m)).await?;
    Ok(claims.pop().unwrap_or(Claim::Pending))
}

/// The claim: insert each submission as `accepted` unless its id is known,
/// and answer, in the order given, whether it was inserted and the status
/// it has. $1..$8: the submitted text's columns ([`halakha_common::db::HalakhaColumns::binds`]).
/// The statement's snapshot does not see the rows it inserts: a new id
/// comes back from `ins`, a known one with its status from `halakhot`.
pub const CLAIM_SQL: &str = "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[],
                                      $6::timestamptz[], $7::date[], $8::text[])
                     WITH ORDINALITY AS u(id, content, source, lang, schedule_days, received_at, date_post, image_url, ord)),
             ins AS (
                 INSERT INTO halakhot (id, status, content, source, lang, schedule_days, received_at, date_post, image_url)
                 SELECT id, 'accepted', content, source, lang, schedule_days, received_at, date_post, image_url
                 FROM input ORDER BY ord
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id)
             SELECT ins.id IS NOT NULL, h.status
             FROM input i LEFT JOIN ins ON ins.id = i.id LEFT JOIN halakhot h ON h.id = i.id
             ORDER BY i.ord";

/// [`claim`] for many submissions in one statement (one parse, one plan,
/// one commit), answered in order. An id twice in `items` is `New` once
/// and `Pending` after.
pub async fn claim_many(pool: &Pool, how: Statements, items: &[Ingested]) -> Result<Vec<Claim>, DbError> {
    let conn = pool.get().await?;
    let c = db::HalakhaColumns::new(items.iter().map(|m| (m.id.as_str(), &m.halakha)));
    // In a write transaction of its own: on a direct connection the claim
    // runs on its generic plan, made once per connection and safe on
    // tables of any size ([`db::WRITE_SETTINGS`]). In autocommit it was
    // planned at every run: 0.15 ms of planning for 0.09 ms of running,
    // for one row.
    let rows = db::write_statement(&conn, how, CLAIM_SQL, &c.binds()).await?;
    let mut claimed = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (m, row) in items.iter().zip(&rows) {
        let inserted: bool = row.get(0);
        let status: Option<String> = row.get(1);
        out.push(if inserted && claimed.insert(m.id.as_str()) {
            Claim::New
        } else {
            // Inserted by an earlier item of this batch, or by a
            // transaction this statement's snapshot does not see yet:
            // still `accepted`.
            match status {
                Some(status) if status != "accepted" => Claim::Done { status },
                _ => Claim::Pending,
            }
        });
    }
    Ok(out)
}

/// Claims written as a group commit: each submission waits for its own
/// answer, the ones waiting together share one statement.
pub type Claims = GroupCommit<Ingested, Claim>;

pub fn claims(pool: Pool, config: &DatabaseConfig) -> Claims {
    let how = config.statements();
    GroupCommit::new(
        pool,
        config,
        move |pool, items: Vec<Ingested>| async move {
            let claims = claim_many(&pool, how, &items).await;
            (items, claims)
        },
        move |pool, m: Ingested| async move {
            let claim = claim(&pool, how, &m).await;
            (m, claim)
        },
    )
}

/// Mark a dead-lettered halakha `failed` with the reason, unless it was
/// published or changed after the failure (a redrive that already
/// succeeded must not be overwritten by a late status update).
/// Its commit waits for the disk, whatever the pool's setting
/// ([`halakha_common::db::Commits`]): the dead letter that causes it is
/// acknowledged after it, and nothing else would write the status again.
pub async fn mark_failed(pool: &Pool, id: &str, error: &str, failed_at: time::OffsetDateTime) -> Result<u64, DbError> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = on").await?;
    let changed = tx
        .execute_typed(
            "UPDATE halakhot SET status = 'failed', error = $2, updated_at = now()
             WHERE id = $1 AND status <> 'published' AND updated_at <= $3",
            &[(&id, Type::TEXT), (&error, Type::TEXT), (&failed_at, Type::TIMESTAMPTZ)],
        )
        .await?;
    tx.commit().await?;
    Ok(changed)
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
