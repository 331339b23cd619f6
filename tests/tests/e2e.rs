//! End to end: the three stages against the machine's real NATS JetStream
//! and Postgres, with OpenAI and Notion replaced by contract-keeping fakes.
//! One test binary for the whole workspace.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use halakha_common::envelope::{DeadLetter, Published};
use halakha_tests::fakes::{self, Model};
use halakha_tests::{API_KEY, S, TestEnv, corpus, spawn_enrich, spawn_ingest, spawn_publish};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_corpus_texts_submitted_over_http_and_nats_end_as_fifty_published_rows_and_pages() {
    let env = TestEnv::new().await;
    let (openai, completions) = fakes::openai(Model::Faithful).await;
    let (notion, creates) = fakes::notion().await;
    let ingest = spawn_ingest(&env, &[]).await;
    let enrich = spawn_enrich(&env, &openai.uri(), &[("CONCURRENCY", "8")]).await;
    let publish = spawn_publish(&env, Some(&notion.uri()), &[("CONCURRENCY", "8")]).await;
    let started = Instant::now();

    // 50 real texts of every language, long ones included.
    let items: Vec<_> = corpus().into_iter().step_by(8).take(50).collect();
    assert_eq!(items.len(), 50);
    assert!(items.iter().any(|i| i.text.chars().count() > 2000), "a text over Notion's item limit is part of the run");
    let http = reqwest::Client::new();
    let base = format!("http://{}", ingest.http_addr.unwrap());
    let mut ids = BTreeSet::new();
    let mut http_ids = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let body =
            json!({"content": item.text, "schedule_days": i % 3, "source": item.source, "idempotency_key": item.id});
        if i % 2 == 0 {
            let resp = http.post(format!("{base}/v1/halakhot")).bearer_auth(API_KEY).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["status"], "accepted");
            assert_eq!(v["duplicate"], false);
            let id = v["id"].as_str().unwrap().to_owned();
            http_ids.push(id.clone());
            ids.insert(id);
        } else {
            let subject = env.names.subject(S::Submitted);
            let ack = env.js.publish(subject, serde_json::to_vec(&body).unwrap().into()).await.unwrap();
            ack.await.unwrap();
            ids.insert(halakha_common::text::derive_id(Some(&item.id), ""));
        }
    }
    assert_eq!(ids.len(), 50);

    let published: Vec<Published> = env.collect(S::Published, 50, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    eprintln!("50 texts published end to end in {elapsed:?}");
    let got: BTreeSet<String> = published.iter().map(|p| p.id.clone()).collect();
    assert_eq!(got, ids, "every submitted id is published once");

    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT count(*) FROM halakhot WHERE status = 'published'
               AND title <> '' AND question <> '' AND answer <> '' AND text_post <> '' AND legend <> ''
               AND notion_page_url LIKE 'https://www.notion.so/%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 50);
    let tags = db.query_one("SELECT count(*) FROM halakha_tags", &[]).await.unwrap();
    assert_eq!(tags.get::<_, i64>(0), 50, "each row linked to its tag once");
    assert_eq!(creates.load(Ordering::SeqCst), 50, "exactly one Notion page per halakha");
    assert_eq!(completions.load(Ordering::SeqCst), 50, "one completion per text");
    assert_eq!(env.stream_len(S::DeadLetter(halakha_nats::Stage::Ingest)).await, 0, "nothing dead-lettered");

    // The status route shows the result.
    let resp =
        http.get(format!("{base}/v1/halakhot/{}", http_ids[0])).header("x-api-key", API_KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "published");
    assert!(v["notion_page_url"].as_str().unwrap().starts_with("https://www.notion.so/"));
    assert!(!v["title"].as_str().unwrap().is_empty());

    for stage in [ingest, enrich, publish] {
        stage.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_the_model_answers_with_invalid_json_ends_in_the_enrich_dead_letters_and_is_not_published() {
    let env = TestEnv::new().await;
    let (openai, completions) = fakes::openai(Model::InvalidJson).await;
    let (notion, creates) = fakes::notion().await;
    let ingest = spawn_ingest(&env, &[]).await;
    let enrich = spawn_enrich(&env, &openai.uri(), &[]).await;
    let publish = spawn_publish(&env, Some(&notion.uri()), &[]).await;

    let item = corpus().into_iter().find(|i| i.lang == "fr").unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{}", ingest.http_addr.unwrap());
    let resp = http
        .post(format!("{base}/v1/halakhot"))
        .header("x-api-key", API_KEY)
        .json(&json!({"content": item.text, "idempotency_key": item.id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    let dead: Vec<DeadLetter> =
        env.collect(S::DeadLetter(halakha_nats::Stage::Enrich), 1, Duration::from_secs(60)).await;
    let entry = &dead[0];
    assert_eq!(entry.id.as_deref(), Some(id.as_str()));
    assert_eq!(entry.stage, "enrich");
    assert!(entry.reason.contains("not valid JSON"), "reason: {}", entry.reason);
    assert_eq!(entry.subject, env.names.subject(S::Ingested));
    assert!(entry.payload.as_deref().unwrap().contains(&id), "the original payload is kept");
    assert!(completions.load(Ordering::SeqCst) >= 1);

    let db = env.db().await;
    let status: String = db.query_one("SELECT status FROM halakhot WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_ne!(status, "published");
    assert_eq!(env.stream_len(S::Published).await, 0);
    assert_eq!(creates.load(Ordering::SeqCst), 0);

    for stage in [ingest, enrich, publish] {
        stage.stop().await;
    }
    env.cleanup().await;
}
