//! The publish stage's writes to Postgres: an upsert keyed by id, so a
//! redelivery changes nothing.

use deadpool_postgres::Pool;
use halakha_common::db::DbError;
use halakha_common::envelope::Enriched;
use tokio_postgres::types::Type;

// Every statement here is unnamed (`query_typed`, `execute_typed`): it
// works through a transaction-mode pooler (Supabase port 6543, PgBouncer),
// which cannot keep named prepared statements between transactions.

/// What the row says about the Notion page.
#[derive(Debug, Clone, Default)]
pub struct NotionState {
    pub page_id: Option<String>,
    pub page_url: Option<String>,
}

/// Upsert the enriched halakha and its tags, themes and sources, in one
/// transaction of two statements (the row and any new names, then the
/// links): the publish stage's cost is mostly Postgres' work per statement.
/// A row already `published` stays `published`; `published` makes the row
/// published at once (no Notion page to wait for).
pub async fn upsert(pool: &Pool, m: &Enriched, published: bool) -> Result<NotionState, DbError> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    let h = &m.halakha;
    let e = &m.enrichment;
    let to_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let lang = h.lang.map(|l| l.as_str());
    let clean = |v: &[String]| -> Vec<String> {
        let mut out: Vec<String> = v.iter().map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect();
        out.sort();
        out.dedup();
        out
    };
    let (tags, themes) = (clean(&e.tags), clean(&e.themes));
    let names: Vec<&str> = e.sources.iter().map(|s| s.name.trim()).collect();
    let refs: Vec<&str> = e.sources.iter().map(|s| s.reference.as_deref().unwrap_or("").trim()).collect();
    // New tag, theme and source names are inserted here, in their own
    // statement: the links (next statement) then see them, and names a
    // concurrent transaction inserted (this one waited for it) too.
    let row = tx
        .query_typed_one(
            "WITH h AS (
                 INSERT INTO halakhot (id, status, content, source, lang, schedule_days, received_at, date_post,
                     title, question, answer, difficulty_level, text_post, legend, language,
                     model, prompt_version, schema_version, prompt_tokens, completion_tokens, total_tokens, image_url,
                     published_at)
                 VALUES ($1, CASE WHEN $26 THEN 'published' ELSE 'enriched' END, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                     $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, CASE WHEN $26 THEN now() END)
                 ON CONFLICT (id) DO UPDATE SET
                     status = CASE WHEN halakhot.status = 'published' OR $26 THEN 'published' ELSE 'enriched' END,
                     published_at = CASE WHEN $26 THEN COALESCE(halakhot.published_at, now()) ELSE halakhot.published_at END,
                     content = EXCLUDED.content, source = EXCLUDED.source, lang = EXCLUDED.lang,
                     schedule_days = EXCLUDED.schedule_days, date_post = EXCLUDED.date_post,
                     title = EXCLUDED.title, question = EXCLUDED.question, answer = EXCLUDED.answer,
                     difficulty_level = EXCLUDED.difficulty_level, text_post = EXCLUDED.text_post,
                     legend = EXCLUDED.legend, language = EXCLUDED.language, model = EXCLUDED.model,
                     prompt_version = EXCLUDED.prompt_version, schema_version = EXCLUDED.schema_version,
                     prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
                     total_tokens = EXCLUDED.total_tokens, image_url = EXCLUDED.image_url,
                     error = NULL, updated_at = now()
                 RETURNING notion_page_id, notion_page_url),
             t AS (INSERT INTO tags (name) SELECT unnest($22::text[]) ON CONFLICT (name) DO NOTHING),
             th AS (INSERT INTO themes (name) SELECT unnest($23::text[]) ON CONFLICT (name) DO NOTHING),
             s AS (INSERT INTO sources (name, reference)
                   SELECT DISTINCT n, r FROM unnest($24::text[], $25::text[]) AS u(n, r) WHERE n <> ''
                   ON CONFLICT (name, reference) DO NOTHING)
             SELECT notion_page_id, notion_page_url FROM h",
            &[
                (&m.id, Type::TEXT),
                (&h.content, Type::TEXT),
                (&h.source, Type::TEXT),
                (&lang, Type::TEXT),
                (&i32::from(h.schedule_days), Type::INT4),
                (&h.received_at, Type::TIMESTAMPTZ),
                (&h.date_post(), Type::DATE),
                (&e.title, Type::TEXT),
                (&e.question, Type::TEXT),
                (&e.answer, Type::TEXT),
                (&i16::from(e.difficulty_level), Type::INT2),
                (&e.text_post, Type::TEXT),
                (&e.legend, Type::TEXT),
                (&e.language.as_str(), Type::TEXT),
                (&m.model, Type::TEXT),
                (&m.prompt_version, Type::TEXT),
                (&i32::try_from(m.schema_version).unwrap_or(i32::MAX), Type::INT4),
                (&to_i32(m.usage.prompt_tokens), Type::INT4),
                (&to_i32(m.usage.completion_tokens), Type::INT4),
                (&to_i32(m.usage.total_tokens), Type::INT4),
                (&h.image_url, Type::TEXT),
                (&tags, Type::TEXT_ARRAY),
                (&themes, Type::TEXT_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&refs, Type::TEXT_ARRAY),
                (&published, Type::BOOL),
            ],
        )
        .await?;
    // The links hold exactly this enrichment's names (a redelivery or a
    // replay with other names replaces them).
    tx.execute_typed(
        "WITH dt AS (DELETE FROM halakha_tags WHERE halakha_id = $1
                     AND tag_id NOT IN (SELECT id FROM tags WHERE name = ANY($2))),
              it AS (INSERT INTO halakha_tags (halakha_id, tag_id)
                     SELECT $1, id FROM tags WHERE name = ANY($2) ON CONFLICT DO NOTHING),
              dth AS (DELETE FROM halakha_themes WHERE halakha_id = $1
                      AND theme_id NOT IN (SELECT id FROM themes WHERE name = ANY($3))),
              ith AS (INSERT INTO halakha_themes (halakha_id, theme_id)
                      SELECT $1, id FROM themes WHERE name = ANY($3) ON CONFLICT DO NOTHING),
              ds AS (DELETE FROM halakha_sources WHERE halakha_id = $1 AND source_id NOT IN (
                         SELECT s.id FROM sources s JOIN unnest($4::text[], $5::text[]) AS u(n, r)
                         ON s.name = u.n AND s.reference = u.r)),
              isrc AS (INSERT INTO halakha_sources (halakha_id, source_id)
                       SELECT DISTINCT $1, s.id FROM sources s JOIN unnest($4::text[], $5::text[]) AS u(n, r)
                       ON s.name = u.n AND s.reference = u.r ON CONFLICT DO NOTHING)
         SELECT 1",
        &[
            (&m.id, Type::TEXT),
            (&tags, Type::TEXT_ARRAY),
            (&themes, Type::TEXT_ARRAY),
            (&names, Type::TEXT_ARRAY),
            (&refs, Type::TEXT_ARRAY),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(NotionState { page_id: row.get(0), page_url: row.get(1) })
}

/// Store the page right after it was created, before anything else can
/// fail: a redelivery then finds it here and never creates another.
pub async fn store_page(pool: &Pool, id: &str, page_id: &str, page_url: &str) -> Result<(), DbError> {
    let conn = pool.get().await?;
    conn.execute_typed(
        "UPDATE halakhot SET notion_page_id = $2, notion_page_url = $3, updated_at = now() WHERE id = $1",
        &[(&id, Type::TEXT), (&page_id, Type::TEXT), (&page_url, Type::TEXT)],
    )
    .await?;
    Ok(())
}

/// Store the page and mark the row `published`.
pub async fn mark_published(
    pool: &Pool,
    id: &str,
    page_id: Option<&str>,
    page_url: Option<&str>,
) -> Result<(), DbError> {
    let conn = pool.get().await?;
    conn.execute_typed(
        "UPDATE halakhot SET status = 'published', notion_page_id = COALESCE($2, notion_page_id),
             notion_page_url = COALESCE($3, notion_page_url), published_at = COALESCE(published_at, now()),
             error = NULL, updated_at = now()
         WHERE id = $1",
        &[(&id, Type::TEXT), (&page_id, Type::TEXT), (&page_url, Type::TEXT)],
    )
    .await?;
    Ok(())
}
