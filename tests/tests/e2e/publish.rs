//! The sinks: one row and one whole Notion page per halakha, within
//! Notion's limits, whatever crashes and redeliveries happen.

use std::time::Duration;

use halakha_common::envelope::Published;
use halakha_tests::{API_KEY, Pipeline, S, Spec, corpus};
use serde_json::{Value, json};

/// The paragraph texts of a page's blocks after the divider (the text).
fn text_blocks(children: &[Value]) -> Vec<String> {
    let divider = children.iter().position(|b| b["type"] == "divider").expect("a divider");
    children[divider + 1..]
        .iter()
        .map(|b| {
            b["paragraph"]["rich_text"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["text"]["content"].as_str().unwrap())
                .collect::<String>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twenty_longest_texts_each_become_exactly_one_whole_page_within_notions_limits() {
    let p = Pipeline::start(Spec { notion_rate: Some(3), ..Spec::default() }).await;
    let mut items = corpus();
    items.sort_by_key(|i| std::cmp::Reverse(i.text.chars().count()));
    let items: Vec<_> = items.into_iter().take(20).collect();
    assert!(items.iter().filter(|i| i.text.chars().count() > 4000).count() >= 5);
    assert!(items.iter().any(|i| i.lang == "he" && i.text.chars().count() > 20_000));
    let body: Vec<Value> = items.iter().map(|i| json!({"content": i.text, "idempotency_key": i.id})).collect();
    let resp =
        p.http.post(format!("{}/v1/halakhot/batch", p.base)).bearer_auth(API_KEY).json(&body).send().await.unwrap();
    let results: Value = resp.json().await.unwrap();
    let ids: Vec<String> =
        results["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();

    let published: Vec<Published> = p.env.collect(S::Published, 20, Duration::from_secs(120)).await;
    assert_eq!(published.len(), 20);
    let notion = p.notion_state.as_ref().unwrap();
    for (item, id) in items.iter().zip(&ids) {
        let pages = notion.pages_for(id);
        assert_eq!(pages.len(), 1, "{}: exactly one page", item.id);
        let expected: Vec<String> = halakha_common::text::normalize(&item.text)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect();
        assert_eq!(text_blocks(&pages[0].children), expected, "{}: the whole text, not a character lost", item.id);
    }
    let longest = notion.pages_for(&ids[0]);
    assert!(longest[0].children.len() > 100, "the longest text needed appended blocks");
    assert_eq!(notion.rejected_400.load(std::sync::atomic::Ordering::SeqCst), 0, "never a 400 from Notion");
    // A first create needs no lookup: one request per page, not two. (A
    // create refused with a 429, rare here, is retried after a lookup.)
    let (queries, refused) = (
        notion.queries.load(std::sync::atomic::Ordering::SeqCst),
        notion.rate_limited.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(queries <= refused, "{queries} lookups for {refused} refusals: no lookup before a first create");
    eprintln!("rate-limited answers: {}", notion.rate_limited.load(std::sync::atomic::Ordering::SeqCst));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_publish_between_the_notion_create_and_its_store_leaves_exactly_one_page() {
    let ack = [("ACK_WAIT_SECS", "5")];
    let mut p = Pipeline::start(Spec { publish_vars: &ack, ..Spec::default() }).await;
    let notion = p.notion_state.clone().unwrap();
    // The next page is made, but its answer never reaches publish in time.
    *notion.hang_next_create.lock().unwrap() = Some(Duration::from_secs(60));
    let item = corpus().into_iter().find(|i| i.lang == "he" && i.text.chars().count() > 500).unwrap();
    let id = p.submit(json!({"content": item.text})).await["id"].as_str().unwrap().to_owned();

    // Wait for the page to exist in Notion (the fake's own record).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while notion.pages_for(&id).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no page was created");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.kill("publish").await;
    let db = p.env.db().await;
    let stored: Option<String> =
        db.query_one("SELECT notion_page_id FROM halakhot WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(stored, None, "killed before the page id was stored");

    // A new publish gets the message again after ack_wait, finds the page
    // by its Halakha ID, and reuses it.
    p.add_publish(&[("ACK_WAIT_SECS", "5"), ("NOTION_REQUESTS_PER_SECOND", "100")]).await;
    let published: Vec<Published> = p.env.collect(S::Published, 1, Duration::from_secs(60)).await;
    let pages = notion.pages_for(&id);
    assert_eq!(pages.len(), 1, "exactly one page for the id");
    assert_eq!(p.creates(), 1);
    assert_eq!(notion.queries.load(std::sync::atomic::Ordering::SeqCst), 1, "the interrupted create made a lookup");
    assert_eq!(published[0].notion_page_url.as_deref(), Some(pages[0].url.as_str()));
    let row = db.query_one("SELECT notion_page_id, status FROM halakhot WHERE id = $1", &[&id]).await.unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(pages[0].id.as_str()));
    assert_eq!(row.get::<_, String>(1), "published");
    p.stop().await;
}

/// What a redelivery must not change: the row, its links, the row count.
async fn snapshot(db: &tokio_postgres::Client, id: &str) -> String {
    db.query_one(
        "SELECT concat_ws('|', title, question, notion_page_id, notion_page_url, published_at::text, status,
                (SELECT count(*) FROM halakha_tags WHERE halakha_id = $1)::text,
                (SELECT count(*) FROM halakhot)::text)
           FROM halakhot WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_enriched_message_changes_nothing() {
    let p = Pipeline::start(Spec::default()).await;
    let item = corpus().into_iter().find(|i| i.lang == "fr").unwrap();
    let id = p.submit(json!({"content": item.text})).await["id"].as_str().unwrap().to_owned();
    let first: Vec<Published> = p.env.collect(S::Published, 1, Duration::from_secs(30)).await;
    let db = p.env.db().await;
    let before = snapshot(&db, &id).await;

    // The enriched message again, as a redelivery past the broker's
    // de-duplication window would bring it.
    p.env.republish(S::Enriched, 1).await;
    let events: Vec<Published> = p.env.collect(S::Published, 2, Duration::from_secs(30)).await;

    assert_eq!(snapshot(&db, &id).await, before, "the same row");
    assert_eq!(p.creates(), 1, "no second page");
    let distinct: std::collections::BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(distinct.len(), 1, "a consumer de-duplicating on id counts one publication");
    assert_eq!(events[1].notion_page_url, first[0].notion_page_url);
    assert_eq!(events[1].status, "published");
    p.stop().await;
}

fn database(url: String, ca_file: Option<&str>) -> halakha_common::config::DatabaseConfig {
    halakha_common::config::DatabaseConfig {
        url: url.into(),
        timeout: Duration::from_secs(10),
        pool_size: 1,
        ca_file: ca_file.map(std::path::PathBuf::from),
        migrate_on_start: true,
    }
}

/// A pool of one connection to the test's database, migrated.
async fn migrated_pool(env: &halakha_tests::TestEnv) -> halakha_common::db::Pool {
    let pool = halakha_common::db::pool(&database(env.database_url.clone(), None)).unwrap();
    halakha_common::db::migrate(&pool).await.unwrap();
    pool
}

async fn scalar(conn: &tokio_postgres::Client, sql: &str) -> String {
    // The simple protocol: this check itself prepares no statement.
    let rows = conn.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_reached_over_tls_when_the_url_asks_for_it_and_verification_is_real() {
    let env = halakha_tests::TestEnv::new().await;
    let pool = halakha_common::db::pool(&database(format!("{}?sslmode=require", env.database_url), None)).unwrap();
    halakha_common::db::migrate(&pool).await.unwrap();
    let conn = pool.get().await.unwrap();
    assert_eq!(scalar(&conn, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await, "true");
    drop(conn);

    let plain = halakha_common::db::pool(&database(format!("{}?sslmode=disable", env.database_url), None)).unwrap();
    let conn = plain.get().await.unwrap();
    assert_eq!(scalar(&conn, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await, "false");
    drop(conn);

    // verify-full checks the certificate: the local server's self-signed
    // "snakeoil" certificate names the host, not 127.0.0.1, so it fails.
    let snakeoil = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    assert!(std::path::Path::new(snakeoil).is_file(), "Debian's postgresql ships this certificate");
    let strict =
        halakha_common::db::pool(&database(format!("{}?sslmode=verify-full", env.database_url), Some(snakeoil)))
            .unwrap();
    let Err(err) = strict.get().await else { panic!("the certificate does not name 127.0.0.1") };
    let chain = halakha_ingest::error_chain(&err);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");
    env.cleanup().await;
}

/// Ingest's pool commits without waiting for the disk (its claim is made
/// up for by the broker and publish's upsert); every other pool, and any
/// pool behind a transaction pooler (no startup options there), waits; a
/// `failed` status written through the relaxed pool waits all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_ingests_claims_commit_without_waiting_for_the_disk() {
    use halakha_common::db::{Commits, pool, pool_with};
    let env = halakha_tests::TestEnv::new().await;
    let direct = database(env.database_url.clone(), None);
    let pooled = database(format!("{}?pgbouncer=true", env.database_url), None);
    for (config, commits, expected) in
        [(&direct, Commits::Relaxed, "off"), (&direct, Commits::Durable, "on"), (&pooled, Commits::Relaxed, "on")]
    {
        let p = pool_with(config, commits).unwrap();
        let conn = p.get().await.unwrap();
        assert_eq!(scalar(&conn, "SHOW synchronous_commit").await, expected, "{commits:?}");
    }
    assert_eq!(halakha_ingest::COMMITS, Commits::Relaxed, "ingest's pool");
    assert_eq!(halakha_publish::COMMITS, Commits::Durable, "publish's pool");
    let durable = pool(&direct).unwrap();
    assert_eq!(scalar(&durable.get().await.unwrap(), "SHOW synchronous_commit").await, "on", "the default");

    let relaxed = pool_with(&direct, halakha_ingest::COMMITS).unwrap();
    halakha_common::db::migrate(&relaxed).await.unwrap();
    let how = direct.statements();
    let item = corpus().into_iter().find(|i| i.lang == "fr").unwrap();
    let ingested = ingested_from(&item);
    let claimed = halakha_ingest::store::claim(&relaxed, how, &ingested).await.unwrap();
    assert_eq!(claimed, halakha_ingest::store::Claim::New);
    let later = time::OffsetDateTime::now_utc() + Duration::from_secs(1);
    assert_eq!(halakha_ingest::store::mark_failed(&relaxed, &ingested.id, "why", later).await.unwrap(), 1);
    let conn = relaxed.get().await.unwrap();
    assert_eq!(scalar(&conn, "SHOW synchronous_commit").await, "off", "the durable commit's setting stayed in it");
    let status = format!("SELECT status || ' ' || error FROM halakhot WHERE id = '{}'", ingested.id);
    assert_eq!(scalar(&conn, &status).await, "failed why");
    drop(conn);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_every_statement_is_unnamed_and_elsewhere_the_writes_are_prepared_once() {
    use halakha_common::db::Statements;
    let env = halakha_tests::TestEnv::new().await;
    let pool = migrated_pool(&env).await;
    let count = "SELECT count(*)::text FROM pg_prepared_statements";

    // The check sees a named statement when there is one...
    {
        let conn = pool.get().await.unwrap();
        let named = conn.prepare("SELECT 1").await.unwrap();
        assert_eq!(scalar(&conn, count).await, "1");
        drop(named);
    }
    // ...and, behind a pooler (the URL says so), the stages' statements
    // leave none (one connection: pool of 1).
    let pooled = database(format!("{}?pgbouncer=true", env.database_url), None);
    assert_eq!(pooled.statements(), Statements::Unnamed);
    let how = pooled.statements();
    let fresh = halakha_common::db::pool(&pooled).unwrap();
    let items: Vec<_> = corpus().into_iter().filter(|i| i.lang == "he").take(3).collect();
    let ingested = ingested_from(&items[0]);
    assert_eq!(halakha_ingest::store::claim(&fresh, how, &ingested).await.unwrap(), halakha_ingest::store::Claim::New);
    let enriched = enriched_with_tags(&ingested, &["שבת"]);
    halakha_publish::store::upsert(&fresh, how, &enriched, false).await.unwrap();
    halakha_publish::store::store_page(&fresh, &enriched.id, "page", "https://www.notion.so/page").await.unwrap();
    halakha_publish::store::mark_published(&fresh, &enriched.id, Some("page"), None).await.unwrap();
    halakha_ingest::store::mark_failed(&fresh, &enriched.id, "x", time::OffsetDateTime::now_utc()).await.unwrap();
    let view = halakha_ingest::store::status(&fresh, &enriched.id).await.unwrap().unwrap();
    assert_eq!(view.status, "published");
    let conn = fresh.get().await.unwrap();
    assert_eq!(scalar(&conn, count).await, "0", "no named prepared statement was left on the connection");
    drop(conn);

    // On a direct connection the write path's three statements (the claim,
    // the upsert's rows and links) are prepared once and reused.
    let direct = database(env.database_url.clone(), None);
    assert_eq!(direct.statements(), Statements::Named);
    let how = direct.statements();
    let kept = halakha_common::db::pool(&direct).unwrap();
    for item in &items[1..] {
        let ingested = ingested_from(item);
        assert_eq!(
            halakha_ingest::store::claim(&kept, how, &ingested).await.unwrap(),
            halakha_ingest::store::Claim::New
        );
        halakha_publish::store::upsert(&kept, how, &enriched_with_tags(&ingested, &["שבת"]), true).await.unwrap();
    }
    let conn = kept.get().await.unwrap();
    assert_eq!(scalar(&conn, count).await, "3", "one named statement per write-path statement");
    // ...and planned once: each ran on its generic plan, and was not
    // planned again for its second run.
    let plans = "SELECT string_agg(CASE WHEN statement LIKE '%halakha_tags%' THEN 'links'
                                        WHEN statement LIKE '%DO UPDATE%' THEN 'rows' ELSE 'claim' END
                                   || ' ' || generic_plans || '/' || custom_plans, ', ' ORDER BY statement LIKE '%halakha_tags%', statement LIKE '%DO UPDATE%')
                 FROM pg_prepared_statements";
    assert_eq!(
        scalar(&conn, plans).await,
        "claim 2/0, rows 2/0, links 2/0",
        "generic plans / custom plans of each statement"
    );
    // ...and the write path's settings stayed in its transactions: any
    // other named statement is planned at every run, with the tables'
    // size of the moment.
    assert_eq!(scalar(&conn, "SHOW plan_cache_mode").await, "force_custom_plan");
    assert_eq!(scalar(&conn, "SHOW enable_seqscan").await, "on");
    drop(conn);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_on_every_subject_is_dead_lettered_with_a_reason_and_nothing_goes_downstream() {
    let p = Pipeline::start(Spec::default()).await;
    let env = &p.env;
    // Not UTF-8: a dead letter would keep it in base64, a third larger than
    // the broker's 1 MiB limit, unless it keeps only the start.
    let big = vec![0xff; 1_000_000];
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"not json at all".to_vec()),
        ("unknown schema_version", br#"{"schema_version": 7, "id": "x", "content": "x"}"#.to_vec()),
        ("missing fields", br#"{"schema_version": 1}"#.to_vec()),
        ("invalid UTF-8", vec![0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d]),
        ("almost 1 MiB", big.clone()),
    ];
    for subject in [S::Submitted, S::Ingested, S::Enriched] {
        for (_, payload) in &poison {
            env.js.publish(env.names.subject(subject), payload.clone().into()).await.unwrap().await.unwrap();
        }
    }
    // A message over the broker's limit never enters: refused with a reason.
    let over = env.js.publish(env.names.subject(S::Submitted), vec![b'x'; 1_048_577].into()).await;
    let refused = match over {
        Err(e) => e.to_string(),
        Ok(ack) => ack.await.err().map(|e| e.to_string()).unwrap_or_default(),
    };
    assert!(!refused.is_empty(), "a payload over max_payload is refused");

    let dead = env.dead_letters(15, Duration::from_secs(60)).await;
    for stage in ["ingest", "enrich", "publish"] {
        let mine: Vec<_> = dead.iter().filter(|d| d.stage == stage).collect();
        assert_eq!(mine.len(), 5, "{stage}: {mine:?}");
        assert!(mine.iter().all(|d| !d.reason.is_empty() && d.error_kind == halakha_common::ErrorKind::Permanent));
        let big_one = mine.iter().find(|d| d.payload_truncated_from.is_some()).expect("the big payload");
        assert_eq!(big_one.payload_truncated_from, Some(1_000_000));
        let kept = big_one.payload_base64.as_deref().unwrap().len();
        assert!(kept <= halakha_nats::runner::MAX_KEPT_PAYLOAD * 4 / 3 + 4, "{kept}");
    }
    assert_eq!(env.stream_len(S::Published).await, 0);
    assert_eq!(p.creates(), 0);
    p.stop().await;
}

fn ingested_from(item: &halakha_tests::CorpusItem) -> halakha_common::Ingested {
    let submission = halakha_common::Submission {
        schema_version: 1,
        content: item.text.clone(),
        schedule_days: Some(1),
        lang: None,
        source: Some(item.source.clone()),
        idempotency_key: None,
        image_url: None,
    };
    halakha_ingest::validate::validate(submission, 100_000, 0, time::OffsetDateTime::now_utc()).unwrap()
}

fn enriched_with_tags(m: &halakha_common::Ingested, tags: &[&str]) -> halakha_common::Enriched {
    halakha_common::Enriched {
        schema_version: 1,
        id: m.id.clone(),
        halakha: m.halakha.clone(),
        enrichment: halakha_common::Enrichment {
            title: format!("title of {}", tags.join(",")),
            question: "q".into(),
            answer: "a".into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            themes: vec!["prayer".into()],
            sources: vec![halakha_common::SourceRef { name: "Shulchan Arukh".into(), reference: Some(tags[0].into()) }],
            difficulty_level: 2,
            text_post: "p".into(),
            legend: "l".into(),
            language: halakha_common::Lang::He,
        },
        model: "m".into(),
        prompt_version: "v".into(),
        usage: halakha_common::Usage::default(),
    }
}

/// A row's tag names and source references (each joined by commas, empty
/// when there are none) and its title.
async fn links(db: &tokio_postgres::Client, id: &str) -> (String, String, String) {
    let row = db
        .query_one(
            "SELECT (SELECT coalesce(string_agg(t.name, ',' ORDER BY t.name), '') FROM halakha_tags x
                     JOIN tags t ON t.id = x.tag_id WHERE x.halakha_id = $1),
                    (SELECT coalesce(string_agg(s.reference, ',' ORDER BY s.reference), '') FROM halakha_sources x
                     JOIN sources s ON s.id = x.source_id WHERE x.halakha_id = $1),
                    (SELECT title FROM halakhot WHERE id = $1)",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// The group commit writes many messages in one statement: each must come
/// out as if written alone, in order, an id twice in a batch included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_writes_answers_each_message_as_if_it_were_written_alone() {
    use halakha_common::db::Statements;
    use halakha_ingest::store::Claim;
    let env = halakha_tests::TestEnv::new().await;
    let pool = migrated_pool(&env).await;
    let items: Vec<_> = corpus().into_iter().filter(|i| i.lang != "ru").take(5).collect();
    let msgs: Vec<_> = items.iter().map(ingested_from).collect();

    // Claims: five new ids and the first one again in the same statement.
    let mut batch = msgs.clone();
    batch.push(msgs[0].clone());
    let claims = halakha_ingest::store::claim_many(&pool, Statements::Named, &batch).await.unwrap();
    assert_eq!(claims, [vec![Claim::New; 5], vec![Claim::Pending]].concat());
    let db = env.db().await;
    db.execute("UPDATE halakhot SET status = 'published' WHERE id = $1", &[&msgs[1].id]).await.unwrap();
    let again = halakha_ingest::store::claim_many(&pool, Statements::Named, &msgs[..3]).await.unwrap();
    assert_eq!(again, vec![Claim::Pending, Claim::Done { status: "published".into() }, Claim::Pending]);

    // Upserts: the first id twice (the later enrichment wins, as it would
    // written after), the others once; every row published, its links its own.
    let first = enriched_with_tags(&msgs[0], &["a", "b"]);
    let second = enriched_with_tags(&msgs[2], &["c"]);
    let first_again = enriched_with_tags(&msgs[0], &["d"]);
    let states = halakha_publish::store::upsert_many(
        &pool,
        Statements::Named,
        &[(&first, true), (&second, true), (&first_again, true)],
    )
    .await
    .unwrap();
    assert_eq!(states.len(), 3);
    assert_eq!(links(&db, &msgs[0].id).await, ("d".into(), "d".into(), "title of d".into()));
    assert_eq!(links(&db, &msgs[2].id).await, ("c".into(), "c".into(), "title of c".into()));
    let published: i64 = db
        .query_one(
            "SELECT count(*) FROM halakhot WHERE status = 'published' AND id = ANY($1)",
            &[&vec![msgs[0].id.clone(), msgs[2].id.clone()]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 2);
    // A later enrichment replaces the links, in a batch as alone.
    let replaced = enriched_with_tags(&msgs[2], &["c", "e"]);
    halakha_publish::store::upsert_many(&pool, Statements::Named, &[(&replaced, true), (&first, true)]).await.unwrap();
    assert_eq!(links(&db, &msgs[2].id).await, ("c,e".into(), "c".into(), "title of c,e".into()));
    assert_eq!(links(&db, &msgs[0].id).await, ("a,b".into(), "a".into(), "title of a,b".into()));

    // The Notion path marks the create it sets out on: the first upsert of
    // a row has no mark before it, the next one (a redelivery) has.
    let notion_path = enriched_with_tags(&msgs[3], &["f"]);
    let states = halakha_publish::store::upsert_many(&pool, Statements::Named, &[(&notion_path, false)]).await.unwrap();
    assert!(!states[0].create_started);
    let states = halakha_publish::store::upsert_many(&pool, Statements::Named, &[(&notion_path, false)]).await.unwrap();
    assert!(states[0].create_started, "a redelivery looks the page up first");
    env.cleanup().await;
}

/// The upsert's two statements are pipelined on one connection and the
/// links need the names the rows statement inserts: on a connection whose
/// statements are not prepared yet (both prepared in the same round trip),
/// the links must still run second. A fresh pool per round, new names each
/// time, both ways of sending statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_new_connection_the_links_still_see_the_names_the_same_upsert_inserted() {
    use halakha_common::db::Statements;
    let env = halakha_tests::TestEnv::new().await;
    let config = database(env.database_url.clone(), None);
    halakha_common::db::migrate(&halakha_common::db::pool(&config).unwrap()).await.unwrap();
    let db = env.db().await;
    let items: Vec<_> = corpus().into_iter().filter(|i| i.lang != "ru").take(3).collect();
    let msgs: Vec<_> = items.iter().map(ingested_from).collect();
    for round in 0..40 {
        let how = if round % 4 == 3 { Statements::Unnamed } else { Statements::Named };
        let fresh = halakha_common::db::pool(&config).unwrap();
        let (a, b) = (format!("new-{round}-a"), format!("new-{round}-b"));
        let enriched: Vec<_> =
            msgs.iter().enumerate().map(|(i, m)| enriched_with_tags(m, &[if i % 2 == 0 { &a } else { &b }])).collect();
        let batch: Vec<_> = enriched.iter().map(|e| (e, true)).collect();
        halakha_publish::store::upsert_many(&fresh, how, &batch).await.unwrap();
        for e in &enriched {
            let tag = &e.enrichment.tags[0];
            assert_eq!(links(&db, &e.id).await.0, *tag, "round {round} ({how:?}): the row is linked to its new tag");
        }
    }
    env.cleanup().await;
}

/// A batch's BEGIN, statements and COMMIT go in one round trip: when a
/// statement fails, nothing of the batch is kept, and the one connection of
/// the pool comes back outside any transaction (the next batch on it
/// commits). Both ways of sending statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upsert_batch_keeps_nothing_and_leaves_its_connection_outside_any_transaction() {
    use halakha_common::db::Statements;
    let env = halakha_tests::TestEnv::new().await;
    let pool = migrated_pool(&env).await;
    let db = env.db().await;
    let items: Vec<_> = corpus().into_iter().filter(|i| i.lang != "ru").take(6).collect();
    let msgs: Vec<_> = items.iter().map(ingested_from).collect();
    for (round, how) in [Statements::Named, Statements::Unnamed].into_iter().enumerate() {
        let (good, bad, next) = (&msgs[round * 3], &msgs[round * 3 + 1], &msgs[round * 3 + 2]);
        let good = enriched_with_tags(good, &[&format!("kept-{round}")]);
        // The table's check refuses a difficulty outside 1..=5.
        let mut bad = enriched_with_tags(bad, &[&format!("refused-{round}")]);
        bad.enrichment.difficulty_level = 9;
        let failed = halakha_publish::store::upsert_many(&pool, how, &[(&good, true), (&bad, true)]).await;
        assert!(failed.is_err(), "{how:?}: the check refuses the batch");
        let kept: i64 = db
            .query_one("SELECT count(*) FROM halakhot WHERE id = ANY($1)", &[&vec![good.id.clone(), bad.id.clone()]])
            .await
            .unwrap()
            .get(0);
        assert_eq!(kept, 0, "{how:?}: nothing of the failed batch is kept");
        let names: i64 = db
            .query_one("SELECT count(*) FROM tags WHERE name LIKE $1", &[&format!("%-{round}")])
            .await
            .unwrap()
            .get(0);
        assert_eq!(names, 0, "{how:?}: not even its new tag names");
        // The same (only) connection writes and commits the next batch.
        let next = enriched_with_tags(next, &[&format!("next-{round}")]);
        halakha_publish::store::upsert_many(&pool, how, &[(&next, true)]).await.unwrap();
        assert_eq!(links(&db, &next.id).await.0, format!("next-{round}"), "{how:?}: the next batch is committed");
        let state = scalar(&db, &format!("SELECT status FROM halakhot WHERE id = '{}'", next.id)).await;
        assert_eq!(state, "published");
    }
    env.cleanup().await;
}

/// A statement's first poll sends it; this future's first poll then waits
/// for its answer, as a thread taken off the CPU between the send and the
/// read would (Postgres answered before the thread came back), so the first
/// poll of the transaction's work already returns the statement's error.
/// The test body runs on the test's own thread (`block_on`), not on a
/// worker: the connection's task answers meanwhile on the runtime's workers.
struct AnsweredInItsFirstPoll<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for AnsweredInItsFirstPoll<F> {
    type Output = F::Output;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let polled = self.0.as_mut().poll(cx);
            if polled.is_ready() || std::time::Instant::now() > deadline {
                return polled;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The end of a write transaction (`COMMIT`) is sent whatever the work's
/// first poll returns, and answered before the connection is given back:
/// a statement refused by Postgres before the next part of the round trip
/// was polled leaves nothing kept and the connection outside any
/// transaction. A statement the client refuses before sending it (its
/// parameters do not match) while an earlier one was sent: the end is a
/// rollback, so the sent one is not kept either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_transaction_ends_whatever_its_statements_first_poll_returns() {
    use halakha_common::db::{Prepared, Statements, run, write_transaction};
    use tokio_postgres::types::Type;
    let env = halakha_tests::TestEnv::new().await;
    let pool = migrated_pool(&env).await;
    let db = env.db().await;
    let conn = pool.get().await.unwrap();
    let insert = Prepared::Unnamed("INSERT INTO tags (name) VALUES ($1)");
    // A name, then no name (refused by Postgres: `name` is NOT NULL),
    // answered within the work's first poll.
    let first: &(dyn tokio_postgres::types::ToSql + Sync) = &"refused-by-postgres";
    let none: &(dyn tokio_postgres::types::ToSql + Sync) = &None::<&str>;
    let (binds, no_name) = ([(first, Type::TEXT)], [(none, Type::TEXT)]);
    let refused = write_transaction(&conn, async {
        tokio::try_join!(biased; run(&conn, &insert, &binds), AnsweredInItsFirstPoll(Box::pin(run(&conn, &insert, &no_name))))
    })
    .await;
    assert!(refused.as_ref().is_err_and(|e| e.as_db_error().is_some()), "Postgres refuses: {refused:?}");
    conn.batch_execute("SELECT 1").await.expect("the connection is outside any transaction");
    assert_eq!(scalar(&db, "SELECT count(*) FROM tags WHERE name = 'refused-by-postgres'").await, "0");

    // Refused by the client: a named statement of one parameter given none.
    let named =
        halakha_common::db::prepare(&conn, Statements::Named, "SELECT $1::text", &[(first, Type::TEXT)]).await.unwrap();
    let sent: &(dyn tokio_postgres::types::ToSql + Sync) = &"sent-then-rolled-back";
    let binds = [(sent, Type::TEXT)];
    let refused = write_transaction(&conn, async {
        tokio::try_join!(biased; run(&conn, &insert, &binds), run(&conn, &named, &[]))
    })
    .await;
    assert!(refused.as_ref().is_err_and(|e| e.as_db_error().is_none()), "the client refuses: {refused:?}");
    conn.batch_execute("SELECT 1").await.expect("the connection is outside any transaction");
    assert_eq!(scalar(&db, "SELECT count(*) FROM tags WHERE name = 'sent-then-rolled-back'").await, "0");

    // And the next transaction on the connection commits.
    let next: &(dyn tokio_postgres::types::ToSql + Sync) = &"committed";
    write_transaction(&conn, run(&conn, &insert, &[(next, Type::TEXT)])).await.unwrap();
    assert_eq!(scalar(&db, "SELECT count(*) FROM tags WHERE name = 'committed'").await, "1");
    drop(conn);
    env.cleanup().await;
}

/// The write path's generic plans are made once per connection, possibly
/// while the tables are empty, and kept as they grow: each must look rows
/// up by key (no sequential scan, no hash or merge join over a table),
/// whatever the sizes it was planned with. Planned here on empty tables,
/// with the settings the write path's transactions use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_paths_generic_plans_made_on_empty_tables_look_every_row_up_by_key() {
    let env = halakha_tests::TestEnv::new().await;
    // The tables, made by the migrations (and left empty).
    migrated_pool(&env).await;
    let db = env.db().await;
    db.batch_execute(&format!("BEGIN; {}", halakha_common::db::WRITE_SETTINGS)).await.unwrap();
    for (name, sql) in [
        ("claim", halakha_ingest::store::CLAIM_SQL),
        ("rows", halakha_publish::store::UPSERT_ROWS_SQL),
        ("links", halakha_publish::store::UPSERT_LINKS_SQL),
    ] {
        // Every parameter is an array with an explicit cast: an empty one
        // of each gives the generic plan (it does not depend on values).
        let params = (1..=40).filter(|n| sql.contains(&format!("${n}::")) || sql.contains(&format!("${n})"))).count();
        db.batch_execute(&format!("PREPARE {name} AS {sql}")).await.unwrap();
        let args = vec!["'{}'"; params].join(", ");
        let plan: Vec<String> = db
            .simple_query(&format!("EXPLAIN (COSTS OFF) EXECUTE {name}({args})"))
            .await
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
                _ => None,
            })
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Index"), "{name}: the plan uses the keys:\n{plan}");
        for bad in ["Seq Scan", "Hash Join", "Merge Join", "Materialize"] {
            assert!(!plan.contains(bad), "{name}: no {bad} in a plan kept while tables grow:\n{plan}");
        }
    }
    db.batch_execute("ROLLBACK").await.unwrap();
    env.cleanup().await;
}
