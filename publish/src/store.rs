//! The publish stage's writes to Postgres: an upsert keyed by id, so a
//! redelivery changes nothing.

use deadpool_postgres::Pool;
use halakha_common::config::DatabaseConfig;
use halakha_common::db::{self, DbError, GroupCommit, Statements};
use halakha_common::envelope::Enriched;
use tokio_postgres::types::Type;

// The upsert's two statements, run for every batch, are prepared once per
// connection unless the pool goes through a transaction-mode pooler
// (Supabase port 6543, PgBouncer), which cannot keep named statements
// between transactions ([`Statements`]). The other statements are always
// unnamed (`execute_typed`).

/// What the row says about the Notion page.
#[derive(Debug, Clone, Default)]
pub struct NotionState {
    pub page_id: Option<String>,
    pub page_url: Option<String>,
    /// A create of its page was set out on before this upsert (a page may
    /// exist that the row does not know): look it up before creating.
    pub create_started: bool,
}

/// The upsert's first statement: the rows ($1..$8 the submitted text's
/// columns, $9..$21 the enrichment's, $26 whether the row is published
/// now) and any new tag, theme and source names ($22..$25). Answers each
/// row's Notion page and whether a create was set out on before.
pub const UPSERT_ROWS_SQL: &str = "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::timestamptz[],
                     $7::date[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int2[], $13::text[],
                     $14::text[], $15::text[], $16::text[], $17::text[], $18::int4[], $19::int4[], $20::int4[],
                     $21::int4[], $26::bool[])
                 AS u(id, content, source, lang, schedule_days, received_at, date_post, image_url, title, question,
                      answer, difficulty_level, text_post, legend, language, model, prompt_version, schema_version,
                      prompt_tokens, completion_tokens, total_tokens, published)),
             h AS (
                 INSERT INTO halakhot (id, status, content, source, lang, schedule_days, received_at, date_post,
                     title, question, answer, difficulty_level, text_post, legend, language,
                     model, prompt_version, schema_version, prompt_tokens, completion_tokens, total_tokens, image_url,
                     published_at, notion_create_started_at)
                 SELECT id, CASE WHEN published THEN 'published' ELSE 'enriched' END, content, source, lang,
                     schedule_days, received_at, date_post, title, question, answer, difficulty_level, text_post,
                     legend, language, model, prompt_version, schema_version, prompt_tokens, completion_tokens,
                     total_tokens, image_url, CASE WHEN published THEN now() END,
                     CASE WHEN published THEN NULL ELSE now() END
                 FROM input ORDER BY id
                 ON CONFLICT (id) DO UPDATE SET
                     status = CASE WHEN halakhot.status = 'published' OR EXCLUDED.status = 'published'
                                   THEN 'published' ELSE 'enriched' END,
                     published_at = CASE WHEN EXCLUDED.status = 'published'
                                         THEN COALESCE(halakhot.published_at, now()) ELSE halakhot.published_at END,
                     content = EXCLUDED.content, source = EXCLUDED.source, lang = EXCLUDED.lang,
                     schedule_days = EXCLUDED.schedule_days, date_post = EXCLUDED.date_post,
                     title = EXCLUDED.title, question = EXCLUDED.question, answer = EXCLUDED.answer,
                     difficulty_level = EXCLUDED.difficulty_level, text_post = EXCLUDED.text_post,
                     legend = EXCLUDED.legend, language = EXCLUDED.language, model = EXCLUDED.model,
                     prompt_version = EXCLUDED.prompt_version, schema_version = EXCLUDED.schema_version,
                     prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
                     total_tokens = EXCLUDED.total_tokens, image_url = EXCLUDED.image_url,
                     -- The Notion path (not published by this upsert) is
                     -- about to create the page unless the row has one.
                     notion_create_started_at = CASE
                         WHEN EXCLUDED.status = 'enriched' AND halakhot.notion_page_id IS NULL
                         THEN COALESCE(halakhot.notion_create_started_at, now())
                         ELSE halakhot.notion_create_started_at END,
                     error = NULL, updated_at = now()
                 RETURNING id, notion_page_id, notion_page_url),
             t AS (INSERT INTO tags (name) SELECT unnest($22::text[]) ON CONFLICT (name) DO NOTHING),
             th AS (INSERT INTO themes (name) SELECT unnest($23::text[]) ON CONFLICT (name) DO NOTHING),
             s AS (INSERT INTO sources (name, reference)
                   SELECT DISTINCT n, r FROM unnest($24::text[], $25::text[]) AS u(n, r) WHERE n <> ''
                   ORDER BY n, r
                   ON CONFLICT (name, reference) DO NOTHING)
             -- `before` is the row as the statement found it (the snapshot
             -- does not see the upsert).
             SELECT h.id, h.notion_page_id, h.notion_page_url, before.notion_create_started_at IS NOT NULL
             FROM h LEFT JOIN halakhot before ON before.id = h.id";

/// The upsert's second statement: the links hold exactly this
/// enrichment's names (a redelivery or a replay with other names replaces
/// them). $1 the ids; then (id, name) pairs of tags, themes, and (id,
/// name, reference) of sources.
pub const UPSERT_LINKS_SQL: &str = "WITH tp AS (SELECT DISTINCT u.hid, t.id AS tag_id
                     FROM unnest($2::text[], $3::text[]) AS u(hid, n) JOIN tags t ON t.name = u.n),
              dt AS (DELETE FROM halakha_tags x WHERE x.halakha_id = ANY($1)
                     AND NOT EXISTS (SELECT 1 FROM tp WHERE tp.hid = x.halakha_id AND tp.tag_id = x.tag_id)),
              it AS (INSERT INTO halakha_tags (halakha_id, tag_id) SELECT hid, tag_id FROM tp
                     ORDER BY hid, tag_id ON CONFLICT DO NOTHING),
              thp AS (SELECT DISTINCT u.hid, t.id AS theme_id
                      FROM unnest($4::text[], $5::text[]) AS u(hid, n) JOIN themes t ON t.name = u.n),
              dth AS (DELETE FROM halakha_themes x WHERE x.halakha_id = ANY($1)
                      AND NOT EXISTS (SELECT 1 FROM thp WHERE thp.hid = x.halakha_id AND thp.theme_id = x.theme_id)),
              ith AS (INSERT INTO halakha_themes (halakha_id, theme_id) SELECT hid, theme_id FROM thp
                      ORDER BY hid, theme_id ON CONFLICT DO NOTHING),
              sp AS (SELECT DISTINCT u.hid, s.id AS source_id
                     FROM unnest($6::text[], $7::text[], $8::text[]) AS u(hid, n, r)
                     JOIN sources s ON s.name = u.n AND s.reference = u.r),
              ds AS (DELETE FROM halakha_sources x WHERE x.halakha_id = ANY($1)
                     AND NOT EXISTS (SELECT 1 FROM sp WHERE sp.hid = x.halakha_id AND sp.source_id = x.source_id)),
              isrc AS (INSERT INTO halakha_sources (halakha_id, source_id) SELECT hid, source_id FROM sp
                       ORDER BY hid, source_id ON CONFLICT DO NOTHING)
         SELECT 1";

/// Upsert the enriched halakha and its tags, themes and sources (see
/// [`upsert_many`]).
pub async fn upsert(pool: &Pool, how: Statements, m: &Enriched, published: bool) -> Result<NotionState, DbError> {
    let mut states = upsert_many(pool, how, &[(m, published)]).await?;
    Ok(states.pop().unwrap_or_default())
}

fn clean(v: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = v.iter().map(|x| x.trim()).filter(|x| !x.is_empty()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Upsert enriched halakhot with their tags, themes and sources, in one
/// transaction of two multi-row statements (the rows and any new names,
/// then the links), answered in order: the cost of a statement in Postgres
/// (parse, plan, commit) is paid once per batch, not once per message.
/// A row already `published` stays `published`; `published` makes the row
/// published at once (no Notion page to wait for). An id twice in `items`
/// is written twice, in order, by a second transaction (each row's write
/// stands on its own: if the second fails, the group commit writes every
/// item again alone, and the upsert gives the same rows).
pub async fn upsert_many(
    pool: &Pool,
    how: Statements,
    items: &[(&Enriched, bool)],
) -> Result<Vec<NotionState>, DbError> {
    let conn = pool.get().await?;
    let mut states: Vec<NotionState> = vec![NotionState::default(); items.len()];
    // Rounds of distinct ids: one statement cannot update a row twice.
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    {
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, (m, _)) in items.iter().enumerate() {
            let round = seen.entry(m.id.as_str()).and_modify(|r| *r += 1).or_insert(0);
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push(i);
        }
    }
    for round in rounds {
        let found = upsert_round(&conn, how, items, &round).await?;
        for i in round {
            if let Some(state) = found.get(items[i].0.id.as_str()) {
                states[i] = state.clone();
            }
        }
    }
    Ok(states)
}

/// One round of [`upsert_many`]: the items at `which`, distinct ids, in
/// one transaction sent in one round trip ([`db::write_transaction`]).
async fn upsert_round(
    tx: &deadpool_postgres::Client,
    how: Statements,
    items: &[(&Enriched, bool)],
    which: &[usize],
) -> Result<std::collections::HashMap<String, NotionState>, DbError> {
    // Rows in id order: concurrent batches lock them in the same order.
    let mut which = which.to_vec();
    which.sort_by(|a, b| items[*a].0.id.cmp(&items[*b].0.id));
    let sel: Vec<&Enriched> = which.iter().map(|i| items[*i].0).collect();
    let to_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let c = db::HalakhaColumns::new(sel.iter().map(|m| (m.id.as_str(), &m.halakha)));
    let titles: Vec<&str> = sel.iter().map(|m| m.enrichment.title.as_str()).collect();
    let questions: Vec<&str> = sel.iter().map(|m| m.enrichment.question.as_str()).collect();
    let answers: Vec<&str> = sel.iter().map(|m| m.enrichment.answer.as_str()).collect();
    let levels: Vec<i16> = sel.iter().map(|m| i16::from(m.enrichment.difficulty_level)).collect();
    let posts: Vec<&str> = sel.iter().map(|m| m.enrichment.text_post.as_str()).collect();
    let legends: Vec<&str> = sel.iter().map(|m| m.enrichment.legend.as_str()).collect();
    let languages: Vec<&str> = sel.iter().map(|m| m.enrichment.language.as_str()).collect();
    let models: Vec<&str> = sel.iter().map(|m| m.model.as_str()).collect();
    let prompts: Vec<&str> = sel.iter().map(|m| m.prompt_version.as_str()).collect();
    let versions: Vec<i32> = sel.iter().map(|m| i32::try_from(m.schema_version).unwrap_or(i32::MAX)).collect();
    let prompt_tokens: Vec<i32> = sel.iter().map(|m| to_i32(m.usage.prompt_tokens)).collect();
    let completion_tokens: Vec<i32> = sel.iter().map(|m| to_i32(m.usage.completion_tokens)).collect();
    let total_tokens: Vec<i32> = sel.iter().map(|m| to_i32(m.usage.total_tokens)).collect();
    let published: Vec<bool> = which.iter().map(|i| items[*i].1).collect();
    // The links, as (halakha id, name) pairs; the names, each once, sorted
    // (concurrent batches insert them in the same order).
    let (mut tag_ids, mut tag_names, mut theme_ids, mut theme_names) = (vec![], vec![], vec![], vec![]);
    let (mut src_ids, mut src_names, mut src_refs) = (vec![], vec![], vec![]);
    for m in &sel {
        for t in clean(&m.enrichment.tags) {
            tag_ids.push(m.id.as_str());
            tag_names.push(t);
        }
        for t in clean(&m.enrichment.themes) {
            theme_ids.push(m.id.as_str());
            theme_names.push(t);
        }
        for s in &m.enrichment.sources {
            src_ids.push(m.id.as_str());
            src_names.push(s.name.trim());
            src_refs.push(s.reference.as_deref().unwrap_or("").trim());
        }
    }
    let sorted = |v: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
        out.sort_unstable();
        out.dedup();
        out
    };
    let (all_tags, all_themes) = (sorted(&tag_names), sorted(&theme_names));
    // New tag, theme and source names are inserted here, in their own
    // statement: the links (next statement) then see them, and names a
    // concurrent transaction inserted (this one waited for it) too.
    // $1..$8: the submitted text's columns; then the enrichment's.
    let mut row_params = c.binds();
    row_params.extend::<[(&(dyn tokio_postgres::types::ToSql + Sync), Type); 18]>([
        (&titles, Type::TEXT_ARRAY),
        (&questions, Type::TEXT_ARRAY),
        (&answers, Type::TEXT_ARRAY),
        (&levels, Type::INT2_ARRAY),
        (&posts, Type::TEXT_ARRAY),
        (&legends, Type::TEXT_ARRAY),
        (&languages, Type::TEXT_ARRAY),
        (&models, Type::TEXT_ARRAY),
        (&prompts, Type::TEXT_ARRAY),
        (&versions, Type::INT4_ARRAY),
        (&prompt_tokens, Type::INT4_ARRAY),
        (&completion_tokens, Type::INT4_ARRAY),
        (&total_tokens, Type::INT4_ARRAY),
        (&all_tags, Type::TEXT_ARRAY),
        (&all_themes, Type::TEXT_ARRAY),
        (&src_names, Type::TEXT_ARRAY),
        (&src_refs, Type::TEXT_ARRAY),
        (&published, Type::BOOL_ARRAY),
    ]);
    // The links hold exactly this enrichment's names (a redelivery or a
    // replay with other names replaces them).
    let link_params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 8] = [
        (&c.ids, Type::TEXT_ARRAY),
        (&tag_ids, Type::TEXT_ARRAY),
        (&tag_names, Type::TEXT_ARRAY),
        (&theme_ids, Type::TEXT_ARRAY),
        (&theme_names, Type::TEXT_ARRAY),
        (&src_ids, Type::TEXT_ARRAY),
        (&src_names, Type::TEXT_ARRAY),
        (&src_refs, Type::TEXT_ARRAY),
    ];
    let (rows_statement, links_statement) = tokio::try_join!(
        db::prepare(tx, how, UPSERT_ROWS_SQL, &row_params),
        db::prepare(tx, how, UPSERT_LINKS_SQL, &link_params)
    )?;
    // Both statements in one round trip: the connection runs them in the
    // order they are sent (both are prepared, so neither waits before
    // sending; biased, so the rows go first), and the links see the names
    // the first one inserted. If the rows fail before the links are sent,
    // the links are not sent at all: the transaction is lost anyway.
    let both = async {
        tokio::try_join!(biased; db::run(tx, &rows_statement, &row_params), db::run(tx, &links_statement, &link_params))
    };
    let (rows, _) = db::write_transaction(tx, both).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (r.get::<_, String>(0), NotionState { page_id: r.get(1), page_url: r.get(2), create_started: r.get(3) })
        })
        .collect())
}

/// Upserts written as a group commit: each message (with whether its
/// upsert publishes the row) waits for its own answer, the ones waiting
/// together share one transaction.
pub type Rows = GroupCommit<(Enriched, bool), NotionState>;

pub fn rows(pool: Pool, config: &DatabaseConfig) -> Rows {
    let how = config.statements();
    GroupCommit::new(
        pool,
        config,
        move |pool, items: Vec<(Enriched, bool)>| async move {
            let refs: Vec<(&Enriched, bool)> = items.iter().map(|(m, p)| (m, *p)).collect();
            let states = upsert_many(&pool, how, &refs).await;
            (items, states)
        },
        move |pool, (m, published): (Enriched, bool)| async move {
            let state = upsert(&pool, how, &m, published).await;
            ((m, published), state)
        },
    )
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
